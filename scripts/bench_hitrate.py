#!/usr/bin/env python3
"""Prefix-cache hit rate of each routing policy on the Mooncake trace.

Replays the trace (pdbox/replay/routing.py) over WORKERS simulated workers,
each with an LRU prefix cache of CACHE tokens, and compares:

- prefix, round_robin, least_loaded (the router's own Picker);
- shared_lru: one LRU of WORKERS × CACHE tokens, the ceiling a partitioned
  cache can approach but not beat by much;
- the prefix policy fed by the approximate index at several LRU bounds,
  against the precise index (the true caches, as KV events give);
- the prefix policy at other cache sizes and arrival rates, to show the
  defaults were not fitted to one point.

Goal: prefix ≥ 95 % of shared_lru's hit rate with imbalance ≤ 1.25.

    .venv/bin/python scripts/bench_hitrate.py [TRACE] [--json] [--check]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pdbox.bench.machine import record as machine_record  # noqa: E402
from pdbox.replay.routing import replay  # noqa: E402
from pdbox.replay.traces import MOONCAKE_BLOCK_TOKENS, load  # noqa: E402

DEFAULT_TRACE = ROOT.parent / "shared" / "traces" / "mooncake_synthetic_trace.jsonl"


def _row(label: str, r: dict, ceiling: float | None = None) -> dict:
    out = {
        "run": label,
        "hit_rate": round(r["hit_rate"], 4),
        "of_ceiling": round(r["hit_rate"] / ceiling, 3) if ceiling else None,
        "imbalance": round(r["imbalance"], 3),
        "ttft_p50_s": round(r["ttft_p50_s"], 2),
        "ttft_p90_s": round(r["ttft_p90_s"], 2),
    }
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("trace", nargs="?", default=str(DEFAULT_TRACE))
    ap.add_argument("--workers", type=int, default=4)
    ap.add_argument("--cache-tokens", type=int, default=1_000_000)
    ap.add_argument("--json", action="store_true", help="print JSON instead of tables")
    ap.add_argument("--check", action="store_true", help="exit 1 if the goal is missed")
    args = ap.parse_args()
    try:
        reqs = load(args.trace)
    except Exception as exc:  # a missing or bad file: one sentence, no traceback
        print(f"error: {exc}", file=sys.stderr)
        return 2
    n, c = args.workers, args.cache_tokens
    t0 = time.perf_counter()
    main_runs = {p: replay(reqs, n, c, p) for p in
                 ("shared_lru", "prefix", "round_robin", "least_loaded")}
    ceiling = main_runs["shared_lru"]["hit_rate"]
    policies = [_row(p, r, ceiling) for p, r in main_runs.items()]

    cache_blocks = c // MOONCAKE_BLOCK_TOKENS
    index_rows = [_row("prefix, precise index", main_runs["prefix"], ceiling)]
    for frac in (0.25, 0.5, 1.0, 2.0, 4.0):
        bound = max(1, int(cache_blocks * frac))
        r = replay(reqs, n, c, "prefix", index="approx", index_blocks=bound)
        index_rows.append(_row(f"prefix, approx index {bound} blocks ({frac:g}× cache)",
                               r, ceiling))

    sweep_rows = []
    for cache in (250_000, 500_000, 2_000_000, 4_000_000):
        ceil = replay(reqs, n, cache, "shared_lru")["hit_rate"]
        r = replay(reqs, n, cache, "prefix")
        sweep_rows.append(_row(f"prefix, {n}×{cache:,} tokens (ceiling {ceil:.3f})", r, ceil))
    for scale in (0.5, 2.0):
        ceil = replay(reqs, n, c, "shared_lru", rate_scale=scale)["hit_rate"]
        r = replay(reqs, n, c, "prefix", rate_scale=scale)
        sweep_rows.append(_row(f"prefix, arrival rate ×{scale:g}", r, ceil))
    elapsed = time.perf_counter() - t0

    p = main_runs["prefix"]
    ok = p["hit_rate"] >= 0.95 * ceiling and p["imbalance"] <= 1.25
    result = {
        "trace": Path(args.trace).name,
        "requests": len(reqs),
        "workers": n,
        "cache_tokens": c,
        "goal_met": ok,
        "policies": policies,
        "indexes": index_rows,
        "sweep": sweep_rows,
        "elapsed_s": round(elapsed, 1),
        "machine": machine_record(),
    }
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print(f"{result['trace']}: {len(reqs)} requests, {n} workers × {c:,} tokens "
              f"({elapsed:.1f} s for all runs)\n")
        for title, rows in (("Policies", policies), ("Indexes", index_rows),
                            ("Other sizes and rates", sweep_rows)):
            print(f"### {title}\n")
            print("| run | hit rate | of ceiling | imbalance | TTFT p50 s | TTFT p90 s |")
            print("|---|---|---|---|---|---|")
            for row in rows:
                of = "" if row["of_ceiling"] is None else f"{row['of_ceiling']:.1%}"
                print(f"| {row['run']} | {row['hit_rate']:.3f} | {of} | {row['imbalance']:.3f} "
                      f"| {row['ttft_p50_s']:.1f} | {row['ttft_p90_s']:.1f} |")
            print()
        print(f"goal (prefix ≥ 95 % of shared_lru, imbalance ≤ 1.25): {'met' if ok else 'MISSED'}")
    return 1 if args.check and not ok else 0


if __name__ == "__main__":
    sys.exit(main())
