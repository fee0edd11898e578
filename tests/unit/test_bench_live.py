"""Pure parts of the live benchmarks: profile variants, percentiles, the run summary."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import pytest

from pdbox import config

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "scripts"))

import bench_interference as bi  # noqa: E402


def test_variant_replaces_and_adds_keys(tmp_path: Path) -> None:
    path = bi.write_variant(tmp_path, "cpu-aggregated", "agg-test", {
        "autoscaler.enabled": "false",  # section absent in cpu-aggregated: added
        "router.policy": '"round_robin"',  # key present: replaced
        "engine.extra_args": json.dumps(["--num-gpu-blocks-override=80"]),  # key absent: added
    })
    p = config.load(str(path))
    assert p.name == "agg-test"
    assert p.autoscaler.enabled is False
    assert p.router.policy == "round_robin"
    assert p.engine.extra_args == ("--num-gpu-blocks-override=80",)
    assert p.role("aggregated").replicas == 2


def test_variant_of_cpu_tiny_sets_decider_and_delay(tmp_path: Path) -> None:
    path = bi.write_variant(tmp_path, "cpu-tiny", "tiny-test", {
        **bi.NO_AUTOSCALER, "router.pd_decider": '"threshold"', "nixl.progress_delay_us": "0"})
    p = config.load(str(path))
    assert (p.autoscaler.enabled, p.router.pd_decider, p.nixl.progress_delay_us) == (
        False, "threshold", 0)


def test_pct_nearest_rank() -> None:
    xs = [float(i) for i in range(1, 101)]
    assert bi.pct(xs, 0.5) == 50.0
    assert bi.pct(xs, 0.99) == 99.0
    assert bi.pct(xs, 1.0) == 100.0
    assert bi.pct([], 0.5) is None


def test_summary_counts_only_the_window_and_gaps_within_a_request() -> None:
    args = argparse.Namespace()
    s1 = bi.Req("stream", 0.0, events=[0.5, 1.0, 1.1, 1.2, 9.0])
    s2 = bi.Req("stream", 0.0, events=[2.0, 2.05])
    long_ = bi.Req("long", 1.0, ttft=2.0, events=[3.0, 3.1], pd="remote", reason="remote: x")
    out = bi.summarise([s1, s2], [long_], [], t0=0.9, t1=5.0, args=args)
    # s1 in window: 1.0, 1.1, 1.2 -> gaps 0.1, 0.1; s2: 0.05. Never a gap across requests.
    assert out["itl_samples"] == 3
    assert out["itl_max_ms"] == pytest.approx(100.0)
    assert out["output_tokens"] == 3 + 2 + 2
    assert out["long_remote_share"] == 1.0
    assert out["long_ttft_p50_s"] == 2.0
    assert out["itl_over_250ms_share"] == 0.0


def test_compare_states_each_goal() -> None:
    agg = {"itl_p99_ms": 1000.0, "long_ttft_p50_s": 1.0, "output_tokens_per_s": 50.0}
    pd = {"itl_p99_ms": 400.0, "long_ttft_p50_s": 1.4, "output_tokens_per_s": 46.0}
    c = bi.compare(pd, agg)
    assert (c["itl_p99_ok"], c["ttft_p50_ok"], c["tokens_per_s_ok"]) == (True, False, True)
