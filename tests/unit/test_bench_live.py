"""Pure parts of the live benchmarks: profile variants, percentiles, the run summaries."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from pdbox import config
from pdbox.bench import interference as bi
from pdbox.bench import phases as bp
from pdbox.bench.client import Req
from pdbox.bench.setups import NO_AUTOSCALER, write_variant
from pdbox.router.metrics import percentile as pct


def test_variant_replaces_and_adds_keys(tmp_path: Path) -> None:
    path = write_variant(tmp_path, "cpu-aggregated", "agg-test", {
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
    path = write_variant(tmp_path, "cpu-tiny", "tiny-test", {
        **NO_AUTOSCALER, "router.pd_decider": '"threshold"', "nixl.progress_delay_us": "0"})
    p = config.load(str(path))
    assert (p.autoscaler.enabled, p.router.pd_decider, p.nixl.progress_delay_us) == (
        False, "threshold", 0)


def test_pct_nearest_rank() -> None:
    xs = [float(i) for i in range(1, 101)]
    assert pct(xs, 0.5) == 50.0
    assert pct(xs, 0.99) == 99.0
    assert pct(xs, 1.0) == 100.0
    assert pct([], 0.5) is None


def test_summary_counts_only_the_window_and_gaps_within_a_request() -> None:
    s1 = Req("stream", 0.0, events=[0.5, 1.0, 1.1, 1.2, 9.0])
    s2 = Req("stream", 0.0, events=[2.0, 2.05])
    long_ = Req("long", 1.0, ttft=2.0, events=[3.0, 3.1], pd="remote", reason="remote: x")
    out = bi.summarise([s1, s2], [long_], [], t0=0.9, t1=5.0)
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


def test_goals_pair_each_pd_setup_with_each_aggregated_one() -> None:
    fig = {"itl_p99_ms": 100.0, "long_ttft_p50_s": 1.0, "output_tokens_per_s": 50.0}
    setups = [{"label": "pd-a", "mode": "pd", "result": fig},
              {"label": "pd-t", "mode": "pd", "result": fig},
              {"label": "agg", "mode": "aggregated", "result": fig}]
    assert set(bi.goals(setups)) == {"pd-a vs agg", "pd-t vs agg"}


def test_phase_figures_count_ttft_of_requests_started_in_the_phase() -> None:
    reqs = [Req("stream", 0.5, ttft=0.2, events=[0.7, 0.8, 0.9]),
            Req("long", 1.5, ttft=1.0, events=[2.5]),
            Req("stream", 3.0, ttft=0.1, events=[3.1])]
    f = bp.figures(reqs, 0.0, 2.0, refused=2)
    assert f["ttft_p50_s"] == 0.2 and f["long_ttft_p50_s"] == 1.0
    assert f["requests_started"] == 2 and f["refused_429"] == 2
    assert f["output_tokens_per_s"] == 1.5  # 3 events in 2 s


def test_phases_verdict_first_against_the_best_other() -> None:
    def res(itl: float, ttft: float, tps: float) -> dict:
        f = {"itl_p99_ms": itl, "ttft_p50_s": ttft, "ttft_p90_s": ttft,
             "output_tokens_per_s": tps}
        return {"phases": {"chat": f}, "whole_run": f}

    setups = [{"label": "soft", "result": res(105.0, 0.5, 95.0)},
              {"label": "fixed", "result": res(100.0, 0.8, 80.0)},
              {"label": "agg", "result": res(300.0, 0.6, 100.0)}]
    v = bp.verdict(setups)
    assert v["chat"]["itl_p99_ms"]["within_10pct"] and not v["chat"]["itl_p99_ms"]["beats_all"]
    assert v["chat"]["ttft_p50_s"]["beats_all"]
    assert v["chat"]["output_tokens_per_s"]["best_other"] == 100.0
    assert bp.verdict(setups[:1]) == {}
