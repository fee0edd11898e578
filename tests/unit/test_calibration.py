"""Warm-up calibration: the fit, the file, and what it seeds in the router's learners."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web

from pdbox import calibration
from pdbox.calibration import Calibration, decode_step, fit_prefill
from pdbox.router.admission import Admission
from pdbox.router.decider import PDDecider


def test_two_lengths_separate_the_prompt_from_the_fixed_cost() -> None:
    tps, overhead = fit_prefill([(16, 0.05 + 16 / 2000), (1000, 0.05 + 1000 / 2000)])
    assert tps == pytest.approx(2000)
    assert overhead == pytest.approx(0.05)


def test_a_longer_prompt_that_was_not_slower_gives_a_low_speed_not_an_absurd_one() -> None:
    tps, overhead = fit_prefill([(16, 0.30), (64, 0.28)])
    assert tps == pytest.approx(64 / 0.28) and overhead == 0.0
    with pytest.raises(ValueError):
        fit_prefill([])


def test_decode_step_is_the_median_gap() -> None:
    assert decode_step([0.05, 0.05, 0.9, 0.051, 0.049]) == 0.05
    with pytest.raises(ValueError):
        decode_step([])


def cal(**over) -> Calibration:
    base = dict(prefill_tps=2000.0, overhead_s=0.05, decode_step_s={1: 0.05, 4: 0.08},
                prefill_points=((16, 0.058), (1000, 0.55)), took_s=2.0)
    return Calibration(**{**base, **over})


def test_step_between_and_beyond_the_measured_batches() -> None:
    c = cal()
    assert c.step_at(1) == 0.05 and c.step_at(4) == pytest.approx(0.08)
    assert c.step_at(7) == pytest.approx(0.11)
    assert c.streams_within(0.1, 32) == 6
    assert c.streams_within(0.01, 32) == 1  # never below one
    assert c.streams_within(10.0, 8) == 8  # never past the cap
    assert c.streams_within(0.1) == 6  # no cap: where the line crosses the target
    flat = cal(decode_step_s={1: 0.05, 4: 0.05})
    assert flat.streams_within(0.1) == 0 and flat.streams_within(0.1, 8) == 8
    assert c.request_s(256, 64, 1) == pytest.approx(0.05 + 0.128 + 3.2)


def test_the_file_round_trips_and_a_damaged_one_is_no_figures(tmp_path: Path) -> None:
    figures = {calibration.slice_key("1 core(s)", "float32", "smollm2"): cal()}
    calibration.save(tmp_path, figures)
    back = calibration.load(tmp_path)
    assert list(back) == ["1 core(s) · float32 · smollm2"]
    assert back["1 core(s) · float32 · smollm2"].decode_step_s == {1: 0.05, 4: 0.08}
    (tmp_path / calibration.FILE).write_text("{not json")
    assert calibration.load(tmp_path) == {}
    (tmp_path / calibration.FILE).write_text(json.dumps({"k": {"prefill_tps": 1}}))
    assert calibration.load(tmp_path) == {}
    assert calibration.load(tmp_path / "absent") == {}


def test_a_seed_replaces_the_prior_until_live_prefills_teach() -> None:
    d = PDDecider(prior_prefill_tps=1000.0)
    d.set_slice("decode-0", "1 core(s)")
    d.seed("1 core(s)", 4000.0, itl_s=0.03)
    assert d.prefill_tps("decode-0") == pytest.approx(4000.0)
    assert d.prior_itl_s == 0.03
    # A second worker of the same slice calibrated: both seeds count.
    d.seed("1 core(s)", 2000.0)
    assert 2000.0 < d.prefill_tps("decode-0") < 4000.0
    # Live traffic taught the slice: a later seed (a restart) leaves it.
    d._learn("decode-0", 500.0, 1.0)
    taught = d.prefill_tps("decode-0")
    d.seed("1 core(s)", 9000.0)
    assert d.prefill_tps("decode-0") == taught


def test_admission_takes_a_seeded_hold_only_before_any_request() -> None:
    a = Admission(queue_bound=4, max_inflight=2, clock=lambda: 0.0)
    a.seed_hold(3.5)
    assert a.hold_estimate_s() == 3.5
    a.seed_hold(-1)
    assert a.hold_estimate_s() == 3.5


def _timed_server_calibration(step_tokens: int = 0, per_step_s: float = 0.0,
                              seen: list[int] | None = None) -> Calibration:
    """Calibrate against a real HTTP server whose prefill costs 1 ms per prompt token
    plus 20 ms, plus `per_step_s` for each engine step of `step_tokens` (0: one
    step), and whose stream steps take 10 ms alone and 20 ms beside others."""
    import math

    from pdbox.workers.calibrate import Calibrator

    running = 0

    async def completions(request: web.Request) -> web.StreamResponse:
        nonlocal running
        body = await request.json()
        assert isinstance(body["prompt"], list) and all(1000 <= t < 10000 for t in body["prompt"])
        if not body.get("stream"):
            n = len(body["prompt"])
            if seen is not None:
                seen.append(n)
            steps = math.ceil(n / step_tokens) if step_tokens else 1
            await asyncio.sleep(0.02 + 0.001 * n + per_step_s * steps)
            return web.json_response({"choices": [{"text": "x"}]})
        resp = web.StreamResponse()
        await resp.prepare(request)
        running += 1
        try:
            for _ in range(body["max_tokens"]):
                await asyncio.sleep(0.01 if running == 1 else 0.02)
                await resp.write(b'data: {"choices": [{"text": "x"}]}\n\n')
        finally:
            running -= 1
        await resp.write(b"data: [DONE]\n\n")
        return resp

    async def main() -> Calibration:
        app = web.Application()
        app.router.add_post("/v1/completions", completions)
        runner = web.AppRunner(app)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        try:
            async with aiohttp.ClientSession() as s:
                return await Calibrator(s, "m", 4096, target_s=0.3,
                                        step_tokens=step_tokens).run(f"http://127.0.0.1:{port}")
        finally:
            await runner.cleanup()

    return asyncio.run(main())


def test_the_calibrator_against_a_timed_server() -> None:
    c = _timed_server_calibration()
    assert c.prefill_tps == pytest.approx(1000, rel=0.3)
    assert c.prefill_points[1][0] > 64  # sized up from the short prompt's speed
    assert c.decode_step_s[1] == pytest.approx(0.01, abs=0.006)
    assert c.decode_step_s[4] == pytest.approx(0.02, abs=0.008)
    assert c.took_s < 5


def test_every_prefill_probe_fits_in_one_step_of_the_workers_budget() -> None:
    """A worker with a 128-token budget and 40 ms per step: a 300-token probe would
    run in three steps and measure 2 ms a token; within one step the line is the
    server's 1 ms a token, so the next budget does not shrink from its own cost."""
    seen: list[int] = []
    c = _timed_server_calibration(step_tokens=128, per_step_s=0.04, seen=seen)
    assert max(seen) <= 128 and c.prefill_points[1][0] <= 128, seen
    assert c.prefill_tps == pytest.approx(1000, rel=0.3)


def test_the_router_seeds_its_learners_from_a_calibration() -> None:
    from pdbox import config
    from pdbox.router.app import Router
    from pdbox.router.backends import Registry
    from pdbox.router.tokenize import CharBlockTokenizer

    p = config.load("cpu-tiny")
    r = Router(p, Registry(), CharBlockTokenizer(), ["smollm2"])
    # A slow machine: 400 tokens/s, and a step past the ITL target from 5 streams on.
    slow = cal(prefill_tps=400.0, decode_step_s={1: 0.1, 4: 0.22})
    r.seed_calibration("prefill", slow, "1 core(s) · float32 · smollm2")
    r.decider.set_slice("prefill-0", r._slice_key("prefill"))
    assert r.decider.prefill_tps("prefill-0") == pytest.approx(400.0)
    assert r.decider.prior_itl_s == 0.1
    assert r.soft.settings.max_streams == 4  # 0.1 + 0.04 x 3 = 0.22 <= 0.25 < 0.26
    # The gate cpu-tiny derives ("auto"): 400 tokens/s in the 150 ms the 250 ms
    # target leaves beside a 100 ms step.
    assert p.router.fixed_gate is None
    assert r.decider.gate("prefill-0") == 60
    assert r.admission.hold_estimate_s() == pytest.approx(
        slow.request_s(60, 64, r.admission.max_inflight))
    assert r.snapshot()["calibration"]["1 core(s) · float32 · smollm2"]["prefill_tps"] == 400.0
