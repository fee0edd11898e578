"""The autoscaler replay: simulated workers, simulated time, the real controller."""

from __future__ import annotations

import dataclasses
import importlib.util
import random
import time

import pytest

from pdbox import config
from pdbox.replay.autoscale import WorkerModel, format_timeline, run, simulate
from pdbox.replay.traces import TraceRequest


def pd_profile(decode_max: int = 4) -> config.Profile:
    p = config.load("cpu-tiny")
    return dataclasses.replace(
        p, decode=dataclasses.replace(p.decode, max=decode_max, cores=("1", "2", "3", "4"))
    )


def steady(n: int, gap_s: float, inp: int = 200, out: int = 50) -> list[TraceRequest]:
    return [TraceRequest(i * gap_s, inp, out) for i in range(n)]


def test_one_request_follows_the_capacity_model() -> None:
    p = config.load("cpu-aggregated")
    out = simulate([TraceRequest(0.0, 520, 11)], p, fixed=1)
    m = WorkerModel()
    assert out["completed"] == 1
    assert out["ttft_p50_s"] == pytest.approx(520 / m.prefill_tokens_per_s, abs=1e-3)
    assert out["itl_p50_s"] == pytest.approx(m.itl_base_s, abs=1e-3)
    assert out["slo_attainment"] == 1.0


def test_pd_request_goes_through_prefill_transfer_and_decode() -> None:
    m = WorkerModel()
    out = simulate([TraceRequest(0.0, 260, 5)], pd_profile(), fixed=1)
    assert out["ttft_p50_s"] == pytest.approx(1.0 + m.kv_transfer_s + m.itl_base_s, abs=1e-3)
    assert out["duration_s"] == pytest.approx(1.0 + m.kv_transfer_s + 5 * m.itl_base_s, abs=0.01)


def test_fixed_holds_every_role_clamped_into_its_bounds() -> None:
    out = simulate(steady(200, 2.0), pd_profile(), fixed=3)
    assert out["scale_events"] == 0 and out["decisions"] == []
    assert out["replicas_timeline"] == [{"t": 0.0, "prefill": 1, "decode": 3}]
    assert out["worker_seconds"] == pytest.approx(4 * out["duration_s"], rel=1e-3)


def test_light_load_stays_at_min_and_meets_the_slo() -> None:
    out = simulate(steady(300, 3.0), pd_profile())
    assert out["completed"] == 300
    assert out["scale_events"] == 0
    assert out["slo_attainment"] == 1.0
    assert out["mean_workers"] == pytest.approx(2.0)


def test_burst_scales_decode_up_then_back_down() -> None:
    # Quiet, then a burst of long generations that overloads one decode worker, then quiet.
    reqs = steady(20, 5.0, out=20)
    reqs += [TraceRequest(100.0 + i * 0.3, 100, 400) for i in range(300)]
    reqs += [TraceRequest(200.0 + i * 10.0, 100, 20) for i in range(150)]
    out = simulate(reqs, pd_profile())
    ups = [d for d in out["decisions"] if d["role"] == "decode" and d["to"] > d["from"]]
    downs = [d for d in out["decisions"] if d["role"] == "decode" and d["to"] < d["from"]]
    assert ups and downs
    assert ups[0]["ts"] < 130.0  # within a few periods of the burst
    assert max(p["decode"] for p in out["replicas_timeline"]) >= 3
    assert out["replicas_timeline"][-1]["decode"] == 1
    assert all(b["to"] == b["from"] - 1 for b in downs)  # one at a time
    fixed = simulate(reqs, pd_profile(), fixed=1)
    assert out["slo_attainment"] > fixed["slo_attainment"]


def test_rate_scale_stretches_time() -> None:
    reqs = steady(100, 1.0)
    slow = simulate(reqs, pd_profile(), rate_scale=0.5, fixed=1)
    fast = simulate(reqs, pd_profile(), rate_scale=1.0, fixed=1)
    assert slow["duration_s"] == pytest.approx(2 * fast["duration_s"], rel=0.05)
    with pytest.raises(ValueError, match="rate-scale"):
        simulate(reqs, pd_profile(), rate_scale=0.0)


def test_run_adds_a_timeline_and_the_keys_the_command_prints() -> None:
    out = run(steady(50, 1.0), pd_profile(), 1.0, None, None)
    for key in (
        "slo_attainment",
        "worker_seconds",
        "scale_events",
        "requests",
        "replicas_timeline",
        "timeline",
    ):
        assert key in out
    lines = out["timeline"].splitlines()
    assert lines[0].startswith("prefill") and lines[1].startswith("decode")


def test_format_timeline_shows_the_peak_of_each_bucket() -> None:
    result = {
        "duration_s": 100.0,
        "replicas_timeline": [
            {"t": 0.0, "decode": 1},
            {"t": 50.0, "decode": 3},
            {"t": 51.0, "decode": 2},
        ],
    }
    line = format_timeline(result, width=10).splitlines()[0]
    assert line.split()[1] == "1111132222"


def test_plot_without_matplotlib_is_a_clear_error(tmp_path) -> None:
    target = tmp_path / "x.png"
    if importlib.util.find_spec("matplotlib") is None:
        with pytest.raises(ValueError, match="--plot needs matplotlib"):
            run(steady(5, 1.0), pd_profile(), 1.0, None, str(target))
    else:
        run(steady(5, 1.0), pd_profile(), 1.0, None, str(target))
        assert target.stat().st_size > 0


def test_a_trace_of_azure_size_replays_fast() -> None:
    rng = random.Random(3)
    t, reqs = 0.0, []
    for _ in range(19_366):
        t += rng.expovariate(0.28)
        reqs.append(
            TraceRequest(
                t, int(rng.lognormvariate(6.8, 0.6)), int(rng.lognormvariate(4.9, 0.8)) + 1
            )
        )
    start = time.perf_counter()
    out = simulate(reqs, pd_profile())
    assert time.perf_counter() - start < 30.0
    assert out["completed"] == len(reqs)
