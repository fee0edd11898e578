#!/usr/bin/env python3
"""Phased benchmark: a traffic mix that changes, soft roles against fixed setups.

Three setups on the same two cores, one after the other in one run, each behind pdbox's
router (`pdbox up --headless`, its own PDBOX_HOME, the autoscaler off):

  - soft:       cpu-tiny with soft roles (the default): the prefill worker also serves
                short requests whole while it has no prefill work
  - fixed-pd:   cpu-tiny with `router.soft_roles = false`: a fixed P/D split
  - aggregated: cpu-aggregated (two aggregated workers, one per core)

Workload, identical for each setup, in phases of `--phase-s` seconds each:

  1. chat:        S chat streams (short unique prompt, `--stream-tokens` tokens with
                  ignore_eos, restarted as they finish), S = 12 by default: more than one
                  decode core keeps up with
  2. long-1.5s:   the same streams plus a unique ~600-token prompt every 1.5 s
  3. long-3s:     the same streams plus one every 3 s
  4. chat-again:  streams only

Measured client-side per phase: ITL p99 (gaps between SSE token events of the streams),
TTFT p50/p90 of every request sent in the phase (streams and long prompts; long prompts
also apart), output tokens/s (token events received in the phase), and 429s (a refused
request is retried after its Retry-After, at most 1 s).

Goal (issue 15): in every phase soft roles are within 10 % of the better fixed setup on
each figure, and over the whole run they beat both. Run it under the worker lock:

    flock /tmp/pdbox-real.lock .venv/bin/python scripts/bench_phases.py --json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import aiohttp

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "scripts"))

from bench_interference import (  # noqa: E402
    Bodies,
    Req,
    _ms,
    _r,
    start_setup,
    stream,
)

from pdbox.router.metrics import percentile as pct  # noqa: E402
from tests.e2e.conftest import stop_group  # noqa: E402

SETUPS: dict[str, tuple[str, dict[str, str]]] = {
    "soft": ("cpu-tiny", {"router.soft_roles": "true"}),
    "fixed-pd": ("cpu-tiny", {"router.soft_roles": "false"}),
    "aggregated": ("cpu-aggregated", {}),
}
# (name, seconds between long prompts; None: none)
PHASES: tuple[tuple[str, float | None], ...] = (
    ("chat", None), ("long-1.5s", 1.5), ("long-3s", 3.0), ("chat-again", None))


async def workload(endpoint: str, args: argparse.Namespace, seed: int) -> dict[str, Any]:
    url = f"{endpoint}/completions"
    rng = random.Random(seed)
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=900)) as session:
        bodies = await Bodies.open(session, endpoint, args, rng)
        long_body, chat_body = bodies.long, bodies.stream

        # Warm-up: each worker computes, the decider sees legs of each kind.
        for _ in range(2):
            await stream(session, url, dict(chat_body(), max_tokens=16), "warm")
            await stream(session, url, long_body(), "warm")

        stop = asyncio.Event()
        reqs: list[Req] = []
        refused = [0]

        async def retrying(body: dict[str, Any], kind: str) -> None:
            while not stop.is_set():
                r = await stream(session, url, body, kind, reqs)
                if not r.error.startswith("429"):
                    return
                refused[0] += 1
                reqs.remove(r)
                await asyncio.sleep(0.5 + rng.random() * 0.5)

        async def stream_loop() -> None:
            while not stop.is_set():
                await retrying(chat_body(), "stream")

        t0 = time.monotonic()
        loops = [asyncio.create_task(stream_loop()) for _ in range(args.streams)]
        bounds: list[tuple[str, float, float, int]] = []
        longs: list[asyncio.Task[None]] = []
        for name, every in PHASES:
            start, before = time.monotonic(), refused[0]
            end = start + args.phase_s
            while time.monotonic() < end:
                if every is None:
                    await asyncio.sleep(min(1.0, end - time.monotonic()))
                    continue
                longs.append(asyncio.create_task(retrying(long_body(), "long")))
                await asyncio.sleep(min(every, max(0.0, end - time.monotonic())))
            bounds.append((name, start, time.monotonic(), refused[0] - before))
        stop.set()
        for t in loops:
            t.cancel()
        await asyncio.gather(*loops, return_exceptions=True)
        await asyncio.gather(*longs, return_exceptions=True)
    t1 = time.monotonic()
    out = {"phases": {n: figures(reqs, a, b, r) for n, a, b, r in bounds}}
    out["whole_run"] = figures(reqs, t0, bounds[-1][2], refused[0])
    out["pd_by_kind"] = {k: _count(r.pd for r in reqs if r.kind == k) for k in ("stream", "long")}
    out["decode_worker_by_kind"] = {k: _count(r.decode for r in reqs if r.kind == k)
                                    for k in ("stream", "long")}
    out["errors"] = [r.error for r in reqs if r.error and r.error != "cancelled"][:10]
    out["wall_s"] = round(t1 - t0, 1)
    return out


def figures(reqs: list[Req], t0: float, t1: float, refused: int) -> dict[str, Any]:
    gaps: list[float] = []
    tokens = 0
    ttfts: list[float] = []
    long_ttfts: list[float] = []
    for r in reqs:
        ev = [t for t in r.events if t0 <= t <= t1]
        tokens += len(ev)
        if r.kind == "stream":
            gaps += [b - a for a, b in zip(ev, ev[1:], strict=False)]
        if t0 <= r.sent < t1 and r.ttft is not None:
            ttfts.append(r.ttft)
            if r.kind == "long":
                long_ttfts.append(r.ttft)
    window = t1 - t0
    return {
        "window_s": round(window, 1),
        "itl_p50_ms": _ms(pct(gaps, 0.5)),
        "itl_p99_ms": _ms(pct(gaps, 0.99)),
        "ttft_p50_s": _r(pct(ttfts, 0.5)),
        "ttft_p90_s": _r(pct(ttfts, 0.9)),
        "long_ttft_p50_s": _r(pct(long_ttfts, 0.5)),
        "long_ttft_p90_s": _r(pct(long_ttfts, 0.9)),
        "output_tokens_per_s": round(tokens / window, 2) if window > 0 else None,
        "requests_started": sum(1 for r in reqs if t0 <= r.sent < t1),
        "refused_429": refused,
    }


def _count(values: Any) -> dict[str, int]:
    out: dict[str, int] = {}
    for v in values:
        out[v or "?"] = out.get(v or "?", 0) + 1
    return out


def verdict(results: dict[str, Any]) -> dict[str, Any]:
    """Soft against the better of the fixed setups, per phase and figure (10 % slack)."""
    if not {"soft", "fixed-pd", "aggregated"} <= set(results):
        return {}
    lower = ("itl_p99_ms", "ttft_p50_s", "ttft_p90_s")
    out: dict[str, Any] = {}
    for phase in [*results["soft"]["phases"], "whole_run"]:
        def get(setup: str, key: str, phase: str = phase) -> float | None:
            d = results[setup]
            return (d["whole_run"] if phase == "whole_run" else d["phases"][phase]).get(key)

        row: dict[str, Any] = {}
        for key in (*lower, "output_tokens_per_s"):
            s, f, a = get("soft", key), get("fixed-pd", key), get("aggregated", key)
            if s is None or f is None or a is None:
                row[key] = None
                continue
            if key in lower:
                best, beats = min(f, a), s < min(f, a)
                within = s <= 1.1 * best
            else:
                best, beats = max(f, a), s > max(f, a)
                within = s >= 0.9 * best
            row[key] = {"soft": s, "best_fixed": best, "within_10pct": within,
                        "beats_both": beats}
        out[phase] = row
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--setups", default="soft,fixed-pd,aggregated",
                    help="comma-separated, run in this order: " + ", ".join(SETUPS))
    ap.add_argument("--streams", type=int, default=12)
    ap.add_argument("--stream-tokens", type=int, default=128)
    ap.add_argument("--long-tokens", type=int, default=600)
    ap.add_argument("--long-max-tokens", type=int, default=16)
    ap.add_argument("--phase-s", type=float, default=60.0)
    ap.add_argument("--seed", type=int, default=15)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="pdbox-phases-") as tmp:
        for name in args.setups.split(","):
            base, overrides = SETUPS[name]
            t = time.monotonic()
            box = start_setup(Path(tmp), base, f"phases-{name}", overrides)
            started = time.monotonic() - t
            try:
                load_before = os.getloadavg()[0]
                res = asyncio.run(workload(box.endpoint, args, args.seed))
                res["loadavg_1m"] = [round(load_before, 1), round(os.getloadavg()[0], 1)]
                st = box.status()
                res["soft_roles"] = st.get("router", {}).get("soft_roles")
            finally:
                stop_group(box.proc)
            res["profile"], res["start_s"] = base, round(started, 1)
            results[name] = res
            print(f"{name}: done", file=sys.stderr)
    results["verdict"] = verdict(results)
    if args.json:
        print(json.dumps(results, indent=2))
        return
    for name, res in results.items():
        if name == "verdict":
            continue
        print(f"\n{name} ({res['profile']}, load {res['loadavg_1m']})")
        for phase, f in [*res["phases"].items(), ("whole run", res["whole_run"])]:
            print(f"  {phase:<11} ITL p99 {f['itl_p99_ms']} ms  TTFT p50/p90 {f['ttft_p50_s']}/"
                  f"{f['ttft_p90_s']} s  long {f['long_ttft_p50_s']}/{f['long_ttft_p90_s']} s  "
                  f"{f['output_tokens_per_s']} tok/s  429s {f['refused_429']}")


if __name__ == "__main__":
    main()
