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
