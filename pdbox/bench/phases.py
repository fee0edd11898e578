"""Phased workload: a traffic mix that changes, in phases of `phase_s` seconds.

1. chat:        S chat streams (short unique prompt, `stream_tokens` tokens with
                ignore_eos, restarted as they finish), S = 12 by default: more than
                one decode core keeps up with
2. long-1.5s:   the same streams plus a unique ~600-token prompt every 1.5 s
3. long-3s:     the same streams plus one every 3 s
4. chat-again:  streams only

Measured client-side per phase: ITL p99 (gaps between SSE token events of the
streams), TTFT p50/p90 of every request sent in the phase (long prompts also
apart), output tokens/s (token events received in the phase), and 429s (a
refused request is retried after 0.5–1 s; its TTFT counts from the retry that
was admitted).

Goal (soft roles): in every phase the first setup is within 10 % of the better
of the others on each figure, and over the whole run it beats them all.
"""

from __future__ import annotations

import asyncio
import random
import time
from dataclasses import asdict, dataclass
from typing import Any

import aiohttp

from pdbox import config
from pdbox.bench.client import Req, stream
from pdbox.bench.interference import Bodies, _ms, _r, count
from pdbox.bench.progress import Progress
from pdbox.bench.report import Column, Row
from pdbox.router.metrics import percentile as pct

PRESETS = {
    # The default box: hybrid P/D with step budgets from the measured speeds.
    "hybrid": "cpu-tiny",
    "soft": "cpu-tiny,router.hybrid=false,engine.step_budget=default",
    "fixed-pd": "cpu-tiny,router.soft_roles=false,router.hybrid=false,"
                "engine.step_budget=default",
    "aggregated": "cpu-aggregated",
    # Sarathi-Serve's answer on the same workers: aggregated with a small step
    # token budget (chunked prefill), the baseline a serious user would pick.
    "sarathi-256": "cpu-aggregated,--max-num-batched-tokens=256",
    "sarathi-512": "cpu-aggregated,--max-num-batched-tokens=512",
}
DEFAULT_SETUPS = ("hybrid", "aggregated", "sarathi-256", "sarathi-512", "fixed-pd")
# (name, seconds between long prompts; None: none)
PHASES: tuple[tuple[str, float | None], ...] = (
    ("chat", None), ("long-1.5s", 1.5), ("long-3s", 3.0), ("chat-again", None))
LOWER = ("itl_p99_ms", "ttft_p50_s", "ttft_p90_s")

COLUMNS = [
    Column("itl_p99_ms", "ITL p99 ms", "lower", "ITL ms"),
    Column("ttft_p50_s", "TTFT p50 s", "lower", "TTFT s"),
    Column("ttft_p90_s", "p90", "lower", "TTFT s"),
    Column("long_ttft_p50_s", "long TTFT p50 s", "lower", "TTFT s"),
    Column("long_ttft_p90_s", "p90", "lower", "TTFT s"),
    Column("output_tokens_per_s", "tokens/s", "higher", "tokens/s"),
    Column("refused_429", "429s"),
]


@dataclass(frozen=True)
class Params:
    streams: int = 12
    stream_tokens: int = 128
    long_tokens: int = 600
    long_max_tokens: int = 16
    phase_s: float = 60.0
    seed: int = 15


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


def verdict(setups: list[dict[str, Any]]) -> dict[str, Any]:
    """The first setup against the better of the others, per phase and figure (10 % slack)."""
    if len(setups) < 2:
        return {}
    first, others = setups[0], setups[1:]

    def get(s: dict[str, Any], phase: str, key: str) -> float | None:
        res = s["result"]
        return (res["whole_run"] if phase == "whole_run" else res["phases"][phase]).get(key)

    out: dict[str, Any] = {}
    for phase in [*first["result"]["phases"], "whole_run"]:
        row: dict[str, Any] = {}
        for key in (*LOWER, "output_tokens_per_s"):
            mine = get(first, phase, key)
            theirs = [get(o, phase, key) for o in others]
            if mine is None or any(v is None for v in theirs):
                row[key] = None
                continue
            vals = [float(v) for v in theirs if v is not None]
            if key in LOWER:
                best = min(vals)
                beats, within = mine < best, mine <= 1.1 * best
            else:
                best = max(vals)
                beats, within = mine > best, mine >= 0.9 * best
            row[key] = {first["label"]: mine, "best_other": best, "within_10pct": within,
                        "beats_all": beats}
        out[phase] = row
    return out


@dataclass
class PhasesWorkload:
    params: Params
    name: str = "phases"

    @property
    def columns(self) -> list[Column]:
        return COLUMNS

    def expected_s(self) -> float:
        return 15.0 + len(PHASES) * self.params.phase_s

    def config(self) -> dict[str, Any]:
        return asdict(self.params)

    async def run(self, endpoint: str, profile: config.Profile,
                  progress: Progress) -> dict[str, Any]:
        p = self.params
        url = f"{endpoint}/completions"
        rng = random.Random(p.seed)
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=900)) as session:
            progress.update("warm-up")
            bodies = await Bodies.open(session, endpoint, rng, p.long_tokens, p.long_max_tokens,
                                       p.stream_tokens)
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
                    if r.status != 429:
                        return
                    refused[0] += 1
                    reqs.remove(r)
                    await asyncio.sleep(0.5 + rng.random() * 0.5)

            async def stream_loop() -> None:
                while not stop.is_set():
                    await retrying(chat_body(), "stream")

            t0 = time.monotonic()
            end_all = t0 + len(PHASES) * p.phase_s
            loops = [asyncio.create_task(stream_loop()) for _ in range(p.streams)]
            bounds: list[tuple[str, float, float, int]] = []
            longs: list[asyncio.Task[None]] = []
            for name, every in PHASES:
                start, before = time.monotonic(), refused[0]
                end = start + p.phase_s
                while time.monotonic() < end:
                    progress.update(f"phase {name}", end_all - time.monotonic(),
                                    f"{refused[0]} refused")
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
        out: dict[str, Any] = {"phases": {n: figures(reqs, a, b, r) for n, a, b, r in bounds}}
        out["whole_run"] = figures(reqs, t0, bounds[-1][2], refused[0])
        out["pd_by_kind"] = {k: count(r.pd for r in reqs if r.kind == k)
                             for k in ("stream", "long")}
        out["decode_worker_by_kind"] = {k: count(r.decode for r in reqs if r.kind == k)
                                        for k in ("stream", "long")}
        out["errors"] = [r.error for r in reqs if r.error and r.error != "cancelled"][:10]
        out["wall_s"] = round(t1 - t0, 1)
        w = out["whole_run"]
        progress.note(f"{progress.prefix} whole run: ITL p99 {w['itl_p99_ms']} ms, TTFT "
                      f"p50/p90 {w['ttft_p50_s']}/{w['ttft_p90_s']} s, "
                      f"{w['output_tokens_per_s']} tokens/s, {w['refused_429']} refused")
        return out

    def rows(self, label: str, result: dict[str, Any]) -> list[Row]:
        rows = [Row(name, label, figs) for name, figs in result["phases"].items()]
        return rows + [Row("whole run", label, result["whole_run"])]
