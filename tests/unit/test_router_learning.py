"""The router feeds the adaptive decider from the workers' own NIXL figures."""

from __future__ import annotations

from pdbox import config
from pdbox.router.app import Router
from pdbox.router.backends import Registry
from pdbox.router.tokenize import CharBlockTokenizer


def test_transfer_time_learnt_from_nixl_metric_deltas() -> None:
    reg = Registry()
    b = reg.upsert("decode-0", "decode", "http://127.0.0.1:1", "ready")
    r = Router(config.load("cpu-tiny"), reg, CharBlockTokenizer(), ["smollm2"])
    b.metrics = {"vllm:nixl_xfer_time_seconds_sum": 0.5, "vllm:nixl_xfer_time_seconds_count": 10}
    r.learn_transfers()
    assert r.decider.estimates()["transfer_s"] is None  # first sight: no delta yet
    b.metrics = {"vllm:nixl_xfer_time_seconds_sum": 0.9, "vllm:nixl_xfer_time_seconds_count": 12}
    r.learn_transfers()
    assert abs(r.decider.estimates()["transfer_s"] - 0.2) < 1e-9
    r.learn_transfers()  # nothing new: no observation
    assert abs(r.decider.estimates()["transfer_s"] - 0.2) < 1e-9


def test_prefill_speed_learnt_from_the_engines_own_prefill_time() -> None:
    from pdbox.router.metrics import PromHistogram

    reg = Registry()
    b = reg.upsert("prefill-0", "prefill", "http://127.0.0.1:1", "ready")
    r = Router(config.load("cpu-tiny"), reg, CharBlockTokenizer(), ["smollm2"])
    r.decider.set_slice("prefill-0", "1 core(s)")
    r.decider.set_slice("decode-0", "1 core(s)")

    def scrape(t: float, tokens: float, seconds: float, n: float) -> None:
        b.metrics = {"vllm:request_prefill_kv_computed_tokens_sum": tokens,
                     "vllm:request_prefill_kv_computed_tokens_count": n}
        b.engine.update(t, {"vllm:request_prefill_time_seconds": PromHistogram(
            {1.0: n, float("inf"): n}, seconds, n)})

    scrape(1.0, 100, 0.5, 1)
    r.learn_transfers()
    scrape(2.0, 100, 0.5, 1)  # nothing finished
    r.learn_transfers()
    assert r.decider.estimates()["prefill_tps_by_slice"] == {}
    scrape(3.0, 100 + 600, 0.5 + 3.0, 2)  # the first change sets the baseline
    r.learn_transfers()
    assert r.decider.estimates()["prefill_tps_by_slice"] == {}
    scrape(4.0, 700 + 1200, 3.5 + 3.0, 4)  # two prompts of 600 tokens, 1.5 s each
    r.learn_transfers()
    assert r.decider.prefill_tps("prefill-0") == 400.0
    assert r.decider.prefill_tps("decode-0") == 400.0  # same slice
    assert r.decider.estimates()["teacher"]["prefill-0"] == "engine"


def test_a_decode_window_with_pulled_kv_teaches_no_prefill_speed() -> None:
    """vLLM counts a pulled prompt as computed on the decode worker, its pull as prefill time."""
    from pdbox.router.metrics import PromHistogram

    reg = Registry()
    b = reg.upsert("decode-0", "decode", "http://127.0.0.1:1", "ready")
    r = Router(config.load("cpu-tiny"), reg, CharBlockTokenizer(), ["smollm2"])

    def scrape(t: float, tokens: float, seconds: float, n: float, pulls: float) -> None:
        b.metrics = {"vllm:request_prefill_kv_computed_tokens_sum": tokens,
                     "vllm:request_prefill_kv_computed_tokens_count": n,
                     "vllm:nixl_xfer_time_seconds_sum": 0.01 * pulls,
                     "vllm:nixl_xfer_time_seconds_count": pulls}
        b.engine.update(t, {"vllm:request_prefill_time_seconds": PromHistogram(
            {1.0: n, float("inf"): n}, seconds, n)})

    for t in (1.0, 2.0):
        scrape(t, 100 * t, 0.5 * t, t, 0)
        r.learn_transfers()
    scrape(3.0, 200 + 600, 1.0 + 0.02, 3, 1)  # a 600-token prompt pulled in 20 ms
    r.learn_transfers()
    scrape(4.0, 800, 1.02, 3, 1)  # NIXL's counters lag: the next window is skipped too
    r.learn_transfers()
    assert r.decider.estimates()["prefill_tps_by_slice"] == {}
    assert r.decider.estimates()["slices"]["decode-0"] == "1 core(s)"
