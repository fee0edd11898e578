#!/usr/bin/env python3
"""Replay benchmark of soft roles and re-split on one GPU (issue 15), against every static
split: the conversation trace, then a prefill-heavy segment (Mooncake: long inputs, short
outputs), through `pdbox replay --autoscale`'s split replay.

    .venv/bin/python scripts/bench_split_replay.py --profile gh200-pd --then-rate-scale 0.5

Goal: SLO attainment ≥ the best static split chosen in hindsight, and ≥ 1.2× the profile's
default split. Every static split here runs with soft roles off, as `--fixed-split` does.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from pdbox import config  # noqa: E402
from pdbox.bench.machine import for_profile as machine_record  # noqa: E402
from pdbox.replay.split_sim import simulate_split, split_report  # noqa: E402
from pdbox.replay.traces import concat, load  # noqa: E402
from pdbox.resplit import describe_split, parse_split  # noqa: E402

TRACES = Path("/work/shared/traces")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--profile", default="gh200-pd")
    ap.add_argument("--first", default=str(TRACES / "AzureLLMInferenceTrace_conv.csv"))
    ap.add_argument("--then", default=str(TRACES / "mooncake_synthetic_trace.jsonl"))
    ap.add_argument("--head-s", type=float, default=900.0)
    ap.add_argument("--then-rate-scale", type=float, default=0.5)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    p = config.load(args.profile)
    first = [r for r in load(args.first) if r.arrival_s < args.head_s]
    then = [r for r in load(args.then) if r.arrival_s < args.head_s]
    reqs = concat(first, then, args.then_rate_scale)
    runs = split_report(reqs, p, 1.0, None)
    static = {}
    for pre in range(10, 100, 10):
        s = parse_split(p, f"{pre}/{100 - pre}")
        static[describe_split(s)] = simulate_split(reqs, p, soft=False, resplit=False, split=s)
    best_name, best = max(static.items(), key=lambda kv: kv[1]["slo_attainment"])
    adaptive, default = runs["adaptive"], runs["default_split"]
    out = {
        "profile": p.name, "requests": len(reqs), "first": len(first), "then": len(then),
        "then_rate_scale": args.then_rate_scale, "model": adaptive["model"],
        "runs": {k: _row(v) for k, v in runs.items()},
        "static": {k: _row(v) for k, v in static.items()},
        "best_static": best_name,
        "adaptive_vs_best_static": round(adaptive["slo_attainment"] / best["slo_attainment"], 3),
        "adaptive_vs_default": round(adaptive["slo_attainment"] / default["slo_attainment"], 3),
    }
    out["goal_best_static_met"] = adaptive["slo_attainment"] >= best["slo_attainment"]
    out["goal_1_2x_default_met"] = out["adaptive_vs_default"] >= 1.2
    out["machine"] = machine_record(p)
    if args.json:
        print(json.dumps(out, indent=2))
        return
    for name, row in [*out["runs"].items(), *out["static"].items()]:
        print(f"{name:<34} {row}")
    print({k: v for k, v in out.items() if k not in ("runs", "static")})


def _row(r: dict) -> dict:
    return {k: r[k] for k in ("slo_attainment", "ttft_p50_s", "ttft_p90_s", "itl_p90_s",
                              "paths", "end_split")} | {
        "resplits": [f"{m['t']:.0f}s → {m['to']}" for m in r["resplits"]]}


if __name__ == "__main__":
    main()
