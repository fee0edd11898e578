"""The trace driver against the mock OpenAI server: TTFT, TPOT and status per request."""

from __future__ import annotations

import asyncio

import pytest

from pdbox import config
from pdbox.bench.progress import Progress
from pdbox.bench.trace import ScaledRequest
from pdbox.bench.trace_run import TraceWorkload, outcome, replay
from pdbox.devtools.mock_openai import Faults, MockConfig, MockServer


def _reqs(n: int, gap_s: float = 0.05, max_tokens: int = 8) -> list[ScaledRequest]:
    return [ScaledRequest(i, i * gap_s, tuple(range(100, 140)), max_tokens, 2000, 100)
            for i in range(n)]


async def _run(cfg: MockConfig, faults: Faults | None, n: int, drain_s: float = 5.0):
    async with MockServer(cfg, faults) as m:
        reqs, wall = await replay(f"{m.url}/v1", _reqs(n), drain_s)
        seen = [s["body"] for s in m.seen]
    return reqs, wall, seen


def test_streamed_requests_record_ttft_tpot_and_ok() -> None:
    reqs, wall, seen = asyncio.run(_run(MockConfig(tokens=64, ttft_ms=60, itl_ms=15), None, 3))
    outs = [outcome(r) for r in reqs]
    assert [o.status for o in outs] == ["ok"] * 3
    for o in outs:
        assert o.output_tokens == 8
        assert 0.055 <= o.ttft_s < 1.0
        assert o.tpot_s == pytest.approx(0.015, abs=0.01)
    assert 0.1 < wall < 3.0
    # What the box was asked: token ids, the scaled answer, no early stop, usage streamed.
    body = seen[0]
    assert body["prompt"] == list(range(100, 140)) and body["max_tokens"] == 8
    assert body["ignore_eos"] is True and body["stream"] is True
    assert body["stream_options"] == {"include_usage": True}


@pytest.mark.parametrize("faults, status", [
    (Faults(fail_status=429), "refused"),
    (Faults(fail_status=500), "error"),
    (Faults(fail_after_chunks=3), "error"),
])
def test_refusals_and_failures_are_told_apart(faults: Faults, status: str) -> None:
    reqs, _, _ = asyncio.run(_run(MockConfig(tokens=16, itl_ms=2), faults, 1))
    assert outcome(reqs[0]).status == status


def test_a_stalled_answer_is_cut_at_the_drain_deadline_as_a_timeout() -> None:
    reqs, wall, _ = asyncio.run(_run(MockConfig(tokens=16, itl_ms=2),
                                     Faults(stall_after_chunks=3), 1, drain_s=0.5))
    o = outcome(reqs[0])
    assert o.status == "timeout" and o.output_tokens == 3
    assert 0.4 < wall < 2.0


def test_the_workload_summarises_at_the_given_slos() -> None:
    async def go() -> dict:
        async with MockServer(MockConfig(tokens=16, ttft_ms=30, itl_ms=40)) as m:
            w = TraceWorkload(_reqs(4), slo_ttft_s=3.0, slo_itl_s=0.02, drain_s=5.0)
            return await w.run(f"{m.url}/v1", config.load("cpu-tiny"), Progress(quiet=True))

    res = asyncio.run(go())
    assert (res["sent"], res["ok"], res["good"]) == (4, 4, 0)  # TPOT 40 ms > 20 ms
    assert res["tpot_p50_s"] == pytest.approx(0.04, abs=0.015)
    assert res["output_tokens_per_s"] > 0
    assert [r["status"] for r in res["requests"]] == ["ok"] * 4
