"""Prefix-cache hit rate of each routing policy on a trace, in simulated time.

Replays the trace (pdbox/replay/routing.py) over N simulated workers, each
with an LRU prefix cache of C tokens, and compares:

- prefix, round_robin, least_loaded (the router's own Picker);
- shared_lru: one LRU of N × C tokens, the ceiling a partitioned cache can
  approach but not beat by much;
- the prefix policy fed by the approximate index at several LRU bounds,
  against the precise index (the true caches, as KV events give);
- the prefix policy at other cache sizes and arrival rates, to show the
  defaults were not fitted to one point.

Goal: prefix ≥ 95 % of shared_lru's hit rate with imbalance ≤ 1.25.
"""

from __future__ import annotations

import time
from typing import Any

from pdbox.replay.routing import replay
from pdbox.replay.traces import MOONCAKE_BLOCK_TOKENS, TraceRequest

HIT_RATE_GOAL = 0.95  # of shared_lru's
IMBALANCE_GOAL = 1.25
INDEX_BOUNDS = (0.25, 0.5, 1.0, 2.0, 4.0)  # approximate index, × the cache's blocks
SWEEP_CACHES = (250_000, 500_000, 2_000_000, 4_000_000)
SWEEP_RATES = (0.5, 2.0)


def row(label: str, r: dict[str, Any], ceiling: float | None = None) -> dict[str, Any]:
    return {
        "run": label,
        "hit_rate": round(r["hit_rate"], 4),
        "of_ceiling": round(r["hit_rate"] / ceiling, 3) if ceiling else None,
        "imbalance": round(r["imbalance"], 3),
        "ttft_p50_s": round(r["ttft_p50_s"], 2),
        "ttft_p90_s": round(r["ttft_p90_s"], 2),
    }


def run(reqs: list[TraceRequest], n: int, c: int) -> dict[str, Any]:
    """Every replay; `goal_met`, the three tables and the time they took."""
    t0 = time.perf_counter()
    main_runs = {p: replay(reqs, n, c, p) for p in
                 ("shared_lru", "prefix", "round_robin", "least_loaded")}
    ceiling = main_runs["shared_lru"]["hit_rate"]
    policies = [row(p, r, ceiling) for p, r in main_runs.items()]

    cache_blocks = c // MOONCAKE_BLOCK_TOKENS
    indexes = [row("prefix, precise index", main_runs["prefix"], ceiling)]
    for frac in INDEX_BOUNDS:
        bound = max(1, int(cache_blocks * frac))
        r = replay(reqs, n, c, "prefix", index="approx", index_blocks=bound)
        indexes.append(row(f"prefix, approx index {bound} blocks ({frac:g}× cache)", r,
                           ceiling))

    sweep = []
    for cache in SWEEP_CACHES:
        ceil = replay(reqs, n, cache, "shared_lru")["hit_rate"]
        r = replay(reqs, n, cache, "prefix")
        sweep.append(row(f"prefix, {n}×{cache:,} tokens (ceiling {ceil:.3f})", r, ceil))
    for scale in SWEEP_RATES:
        ceil = replay(reqs, n, c, "shared_lru", rate_scale=scale)["hit_rate"]
        r = replay(reqs, n, c, "prefix", rate_scale=scale)
        sweep.append(row(f"prefix, arrival rate ×{scale:g}", r, ceil))

    p = main_runs["prefix"]
    ok = p["hit_rate"] >= HIT_RATE_GOAL * ceiling and p["imbalance"] <= IMBALANCE_GOAL
    return {"goal_met": ok, "policies": policies, "indexes": indexes, "sweep": sweep,
            "elapsed_s": round(time.perf_counter() - t0, 1)}


def render(result: dict[str, Any]) -> str:
    """Markdown tables, as docs/ROUTING.md quotes them."""
    out = [f"{result['trace']}: {result['requests']} requests, {result['workers']} workers × "
           f"{result['cache_tokens']:,} tokens ({result['elapsed_s']:.1f} s for all runs)", ""]
    for title, rows in (("Policies", result["policies"]), ("Indexes", result["indexes"]),
                        ("Other sizes and rates", result["sweep"])):
        out += [f"### {title}", "",
                "| run | hit rate | of ceiling | imbalance | TTFT p50 s | TTFT p90 s |",
                "|---|---|---|---|---|---|"]
        for r in rows:
            of = "" if r["of_ceiling"] is None else f"{r['of_ceiling']:.1%}"
            out.append(f"| {r['run']} | {r['hit_rate']:.3f} | {of} | {r['imbalance']:.3f} "
                       f"| {r['ttft_p50_s']:.1f} | {r['ttft_p90_s']:.1f} |")
        out.append("")
    out.append(f"goal (prefix ≥ 95 % of shared_lru, imbalance ≤ 1.25): "
               f"{'met' if result['goal_met'] else 'MISSED'}")
    return "\n".join(out)
