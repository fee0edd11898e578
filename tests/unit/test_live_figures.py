"""The live figures: percentiles, Prometheus text, engine-side deltas, SSE token counting,
and a router in front of mock workers feeding TTFT and tokens/s from every request."""

from __future__ import annotations

import asyncio
import json
import math
import time

import pytest

from pdbox.devtools.mock_openai import MockConfig
from pdbox.router.engine_stats import EngineWindow, engine_figures, summarize
from pdbox.router.metrics import (
    Histogram,
    PromHistogram,
    TokenRate,
    answer_figures,
    bucket_quantile,
    parse_prometheus,
    parse_vllm_metrics,
    percentile,
    sum_series,
)
from pdbox.router.sse_meter import SseMeter, wants_usage, with_usage
from tests.helpers import sse_events
from tests.unit.test_router_app import Box, chat, completion, run

# ------------------------------------------------------------------ percentile


def test_percentile_is_nearest_rank() -> None:
    xs = [5.0, 1.0, 3.0, 2.0, 4.0]
    assert percentile(xs, 0.5) == 3.0
    assert percentile(xs, 0.9) == 5.0
    assert percentile(xs, 0.0) == 1.0
    assert percentile([], 0.5) is None


def test_weighted_percentile_counts_a_value_that_many_times() -> None:
    # 0.01 s seen 9 times (one read of nine tokens), 1.0 s once.
    assert percentile([0.01, 1.0], 0.5, [9, 1]) == 0.01
    assert percentile([0.01, 1.0], 0.95, [9, 1]) == 1.0
    h = Histogram("h", "")
    h.observe(0.01, now=1.0, weight=9)
    h.observe(1.0, now=2.0)
    assert h.n == 10 and h.percentile(0.9) == 0.01 and h.percentile(0.99) == 1.0
    assert h.mean() == pytest.approx((0.09 + 1.0) / 10)
    assert h.percentile(0.5, since=1.5) == 1.0


def test_token_rate_has_no_ceiling() -> None:
    r = TokenRate()
    for i in range(20_000):  # 2,000 tokens/s for 10 s
        r.add(1, now=100.0 + i / 2000)
    assert r.per_s(110.0, 10.0) == pytest.approx(2000, rel=0.01)
    r.add(5, now=500.0)  # older entries fall out of the kept window
    assert r.total(0.0) == 5


# ------------------------------------------------------------- Prometheus text

TEXT = """# HELP vllm:num_requests_waiting x
vllm:num_requests_waiting{engine="0",model_name="m"} 2.0
vllm:num_requests_waiting{engine="1",model_name="m"} 1.0
vllm:num_requests_waiting_by_reason{reason="x"} 9.0
vllm:kv_cache_usage_perc{engine="0"} NaN
vllm:time_to_first_token_seconds_bucket{engine="0",le="0.1",model_name="m"} 1.0
vllm:time_to_first_token_seconds_bucket{engine="0",le="1.0",model_name="m"} 3.0
vllm:time_to_first_token_seconds_bucket{engine="0",le="+Inf",model_name="m"} 4.0
vllm:time_to_first_token_seconds_sum{engine="0",model_name="m"} 6.5
vllm:time_to_first_token_seconds_count{engine="0",model_name="m"} 4.0
pdbox_routed_total{leg="decode",worker="d-0"} 3 1700000000000
pdbox_routed_total{leg="prefill",worker="p-0"} 2
"""


def test_one_parser_sums_series_and_histograms() -> None:
    s = parse_prometheus(TEXT, ["vllm:num_requests_waiting", "vllm:kv_cache_usage_perc"],
                         ["vllm:time_to_first_token_seconds"])
    assert s.values == {"vllm:num_requests_waiting": 3.0}  # NaN skipped, longer name ignored
    h = s.histograms["vllm:time_to_first_token_seconds"]
    assert (h.count, h.sum) == (4.0, 6.5)
    assert h.buckets == {0.1: 1.0, 1.0: 3.0, math.inf: 4.0}
    assert parse_vllm_metrics(TEXT)["vllm:num_requests_waiting"] == 3.0


def test_sum_series_filters_labels_and_accepts_timestamps() -> None:
    assert sum_series(TEXT, "pdbox_routed_total") == 5.0
    assert sum_series(TEXT, "pdbox_routed_total", worker="d-0") == 3.0
    assert sum_series(TEXT, "pdbox_missing_total") == 0.0


def test_bucket_quantile_interpolates_like_prometheus() -> None:
    b = {0.1: 1.0, 1.0: 3.0, math.inf: 4.0}
    assert bucket_quantile(0.25, b) == pytest.approx(0.1)
    assert bucket_quantile(0.5, b) == pytest.approx(0.1 + 0.9 * 0.5)
    assert bucket_quantile(0.99, b) == 1.0  # in +Inf: the highest finite bound
    assert bucket_quantile(0.5, {}) is None


# ------------------------------------------------------------ engine-side deltas


def hist(count: float, total: float, le_1: float) -> dict[str, PromHistogram]:
    return {"vllm:request_queue_time_seconds":
            PromHistogram({0.1: le_1, 1.0: count, math.inf: count}, total, count)}


def test_engine_window_keeps_deltas_per_scrape() -> None:
    w = EngineWindow()
    w.update(0.0, hist(10, 50.0, 0))  # the worker's whole past: not "recent"
    assert summarize(w.since("queue", 0.0)).count == 0
    w.update(1.0, hist(10, 50.0, 0))  # nothing new
    w.update(2.0, hist(12, 50.4, 2))  # two requests queued 0.2 s each
    s = summarize(w.since("queue", 0.0))
    assert (s.count, s.mean) == (2, pytest.approx(0.2))
    assert s.p50 is not None and s.p50 <= 0.1
    w.update(3.0, hist(1, 3.0, 0))  # a restart: counts start again
    assert summarize(w.since("queue", 2.5)).mean == pytest.approx(3.0)
    assert summarize(w.since("queue", 10.0)).count == 0
    figs = engine_figures({"d-0": w}, 0.0)
    assert figs["queue_count"] == 3 and figs["ttft_mean_s"] is None


def test_engine_window_stays_small_however_often_it_is_scraped() -> None:
    w = EngineWindow(keep_s=120.0, resolution_s=1.0)
    for i in range(30_000):  # ten scrapes a second for 50 minutes, one request each
        w.update(i / 10, hist(i, i * 0.5, i))
    assert len(w._marks["queue"]) <= 122
    s = summarize(w.since("queue", 2999.9 - 60))
    assert s.count == pytest.approx(600, abs=10) and s.mean == pytest.approx(0.5)
    assert summarize(w.since("queue", 0.0)).count == pytest.approx(1200, abs=10)  # kept: 120 s


# ------------------------------------------------------------- SSE token counting


def ev(obj: object) -> bytes:
    return f"data: {json.dumps(obj)}\n\n".encode()


ROLE = ev({"choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}}]})
TOK = ev({"choices": [{"index": 0, "delta": {"content": " a"}}]})
USAGE = ev({"choices": [], "usage": {"completion_tokens": 3, "prompt_tokens": 5}})
DONE = b"data: [DONE]\n\n"


def test_meter_counts_token_events_not_reads_or_data_lines() -> None:
    m = SseMeter()
    stream = ROLE + TOK + TOK + TOK + USAGE + DONE
    reads = [stream[:7], stream[7:200], stream[200:]]  # events cut anywhere
    forwarded = b""
    counts = []
    for r in reads:
        out = m.feed(r)
        forwarded += out.forward
        counts.append(out.tokens)
    forwarded += m.close()
    assert sum(counts) == 3 and m.tokens == 3
    assert m.usage_tokens == 3 and m.total_tokens == 3
    assert forwarded == stream  # nothing asked for is dropped


def test_meter_strips_the_usage_chunk_the_client_did_not_ask_for() -> None:
    m = SseMeter(strip_usage=True)
    out = m.feed(ROLE + TOK + USAGE + DONE)
    assert out.forward == ROLE + TOK + DONE
    assert m.total_tokens == 3  # from usage, although one event was seen


def test_meter_counts_completions_tool_calls_and_crlf() -> None:
    m = SseMeter()
    text = b'data: {"choices":[{"text":"x"},{"text":""}]}\r\n\r\n'
    call = ev({"choices": [{"delta": {"tool_calls": [{"index": 0}]}}]})
    err = ev({"error": {"message": "boom"}})
    assert m.feed(text + call + err + b"data: not json\n\n").tokens == 2


def test_usage_is_asked_for_without_touching_the_clients_body() -> None:
    body = {"stream": True, "stream_options": {"continuous_usage_stats": False}}
    sent = with_usage(body)
    assert sent["stream_options"] == {"continuous_usage_stats": False, "include_usage": True}
    assert "include_usage" not in body["stream_options"]
    assert wants_usage(sent) and not wants_usage(body) and not wants_usage({})


# ------------------------------------------------------------ non-streamed answers


def answer(tokens: int, choices: int = 1, **extra: object) -> dict[str, object]:
    return {"choices": [{}] * choices, "usage": {"completion_tokens": tokens}, **extra}


def test_answer_ttft_from_vllm_per_request_metrics() -> None:
    a = answer(9, metrics={"generation_time_ms": 800.0})
    assert answer_figures(a, 1.0, itl_s=0.5) == (9, pytest.approx(0.2), "engine")


def test_answer_ttft_estimated_from_engine_itl() -> None:
    assert answer_figures(answer(9), 1.0, itl_s=0.1) == (9, pytest.approx(0.2), "estimate")
    # n=3 choices of 3 tokens: two decode steps after the first token.
    assert answer_figures(answer(9, 3), 1.0, itl_s=0.1)[1] == pytest.approx(0.8)
    assert answer_figures(answer(1), 0.7, itl_s=None) == (1, 0.7, "estimate")
    assert answer_figures(answer(9), 1.0, itl_s=None) == (9, None, "none")
    assert answer_figures({"error": "x"}, 1.0, itl_s=0.1) == (0, None, "none")


# ---------------------------------------------------- through the router, mock workers

ONE_ITL = {"aggregated-0": MockConfig(tokens=8, itl_ms=5)}


def test_non_streamed_answers_feed_ttft_and_tokens_per_s() -> None:
    async def check(box: Box) -> None:
        from pdbox.router.backends import scrape_loop

        # As in pdbox: the workers' /metrics are read all along.
        loop = asyncio.create_task(scrape_loop(box.router.registry, box.client, 0.01, 0.01))
        await asyncio.sleep(0.05)
        total = 0
        for i in range(6):
            async with box.post("/v1/chat/completions", chat(f"q{i}", max_tokens=4 + i)) as r:
                assert r.status == 200
                total += (await r.json())["usage"]["completion_tokens"]
        loop.cancel()
        snap = box.router.snapshot()
        assert snap["output_tokens_total"] == total
        assert snap["tokens_per_s"] * snap["rate_window_s"] == pytest.approx(total)
        assert box.router.metrics.ttft.n >= 5  # the first may come before any ITL was read
        ttft = snap["ttft_p50_s"]
        assert ttft is not None and ttft < 0.02  # no TTFT delay: e2e is all decode
        assert snap["rps"] * snap["rate_window_s"] == pytest.approx(6)
        text = await box.metrics()
        assert f"pdbox_output_tokens_total {total}" in text
        assert "pdbox_output_chunks_total" not in text

    run(check, ONE_ITL)


def test_non_streamed_ttft_uses_vllm_per_request_timing() -> None:
    cfg = MockConfig(tokens=8, itl_ms=20, ttft_ms=50, per_request_metrics=True)

    async def check(box: Box) -> None:
        async with box.post("/v1/completions", completion("hi")) as r:
            assert r.status == 200
        ttft = box.router.metrics.ttft.percentile(0.5)
        assert ttft is not None and 0.04 < ttft < 0.12  # 50 ms, not the 190 ms end to end
        assert box.router.metrics.ttft_source.get(source="engine") == 1

    run(check, {"aggregated-0": cfg})


def test_stream_usage_is_asked_for_counted_and_hidden() -> None:
    async def check(box: Box) -> None:
        async with box.post("/v1/chat/completions", chat(stream=True)) as r:
            events = sse_events(await r.read())
        assert events[-1] == "[DONE]"
        assert not any(isinstance(e, dict) and e.get("usage") for e in events)
        seen = box.mocks["aggregated-0"].seen[-1]["body"]
        assert seen["stream_options"] == {"include_usage": True}
        async with box.post("/v1/chat/completions",
                            chat(stream=True, stream_options={"include_usage": True})) as r:
            events = sse_events(await r.read())
        assert events[-2]["usage"]["completion_tokens"] == 8
        m = box.router.metrics
        assert m.output_tokens.total() == 16
        assert m.ttft.n == 2 and m.ttft_source.get(source="stream") == 2
        assert m.itl.n == 14  # 7 gaps per stream: role, usage and [DONE] are no tokens

    run(check, ONE_ITL)


def test_fast_stream_is_measured_in_tokens_not_reads() -> None:
    """2,000 tokens/s from the worker reads as about 2,000 tokens/s, not one per read."""
    n = 3000
    cfg = MockConfig(tokens=n, itl_ms=0.5)

    async def check(box: Box) -> None:
        t0 = time.monotonic()
        async with box.post("/v1/completions", completion("go", stream=True, max_tokens=n)) as r:
            body = await r.read()
        took = time.monotonic() - t0
        m = box.router.metrics
        assert m.output_tokens.total() == n
        assert m.itl.n == n - 1
        rate = m.tokens.total(t0) / took
        assert 1500 < rate < 2300, rate
        mean_itl = m.itl.mean()
        assert mean_itl is not None and mean_itl == pytest.approx(took / n, rel=0.2)
        assert sum(1 for e in sse_events(body) if isinstance(e, dict)) == n

    run(check, {"aggregated-0": cfg}, timeout=30)


def test_engine_histograms_reach_the_snapshot() -> None:
    from pdbox.router.backends import scrape_once

    cfg = MockConfig(tokens=5, itl_ms=10, ttft_ms=30)

    async def check(box: Box) -> None:
        b = box.router.registry.get("aggregated-0")
        assert b is not None
        await scrape_once(box.client, b)  # the baseline
        for _ in range(3):
            async with box.post("/v1/chat/completions", chat()) as r:
                assert r.status == 200
        await scrape_once(box.client, b)
        eng = box.router.snapshot()["engine"]
        w = eng["workers"]["aggregated-0"]
        assert w["ttft_count"] == 3 and 0.025 < w["ttft_mean_s"] < 0.1
        assert w["itl_count"] == 12 and 0.008 < w["itl_mean_s"] < 0.05
        assert w["queue_mean_s"] == 0.0 and w["waiting"] == 0
        assert eng["roles"]["aggregated"]["prefill_count"] == 3
        assert b.engine_itl_s(0.0) == pytest.approx(w["itl_mean_s"])

    run(check, {"aggregated-0": cfg})
