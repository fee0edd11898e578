"""The trace workload: a scaled trace window replayed at its own arrival times.

Every request is a streamed `/v1/completions` with the prompt as token ids
(so shared trace blocks are shared token prefixes), `max_tokens` the scaled
answer and `ignore_eos`, so the box generates exactly what the trace asked.
Requests still open `drain_s` after the last arrival are cut off and count
as timeouts. The pure parts (window, scaling, goodput) are in trace.py and
goodput.py.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import aiohttp

from pdbox import config
from pdbox.bench.client import Req, served_model, stream
from pdbox.bench.goodput import Outcome, summarize, tpot
from pdbox.bench.progress import Progress
from pdbox.bench.report import Column, Row
from pdbox.bench.trace import ScaledRequest

# The table's columns; --json has every figure (p90s, counts, each request).
COLUMNS = [
    Column("goodput_rps", "goodput req/s", "higher", "req/s"),
    Column("slo_attainment", "in SLO", "higher"),
    Column("ttft_p50_s", "TTFT p50 s", "lower", "TTFT s"),
    Column("ttft_p99_s", "p99", "lower", "TTFT s"),
    Column("tpot_p50_ms", "TPOT p50 ms", "lower", "TPOT ms"),
    Column("tpot_p99_ms", "p99", "lower", "TPOT ms"),
    Column("output_tokens_per_s", "tokens/s", "higher", "tokens/s"),
    Column("failed", "429/err/timeout"),
]


def outcome(r: Req | None) -> Outcome:
    """What one request came to, from the client's record."""
    if r is None:
        return Outcome("timeout", detail="never sent before the deadline")
    if r.error == "cancelled":
        return Outcome("timeout", r.ttft, None, r.tokens, "cut off at the drain deadline")
    if r.status == 429:
        return Outcome("refused", detail=r.error)
    if r.status != 200 or r.error or not r.done:
        return Outcome("error", r.ttft, None, r.tokens, r.error or f"HTTP {r.status}")
    first = r.events[0] if r.events else None
    last = r.events[-1] if r.events else None
    return Outcome("ok", r.ttft, tpot(first, last, r.tokens), r.tokens)


def body(model: str, s: ScaledRequest) -> dict[str, Any]:
    return {"model": model, "prompt": list(s.prompt), "max_tokens": s.max_tokens,
            "ignore_eos": True}


async def replay(endpoint: str, scaled: Sequence[ScaledRequest], drain_s: float,
                 progress: Progress | None = None,
                 clock: Callable[[], float] = time.monotonic,
                 ) -> tuple[list[Req | None], float]:
    """Send each request at its arrival time; returns each one's record (None if
    it never started) and the wall time from the first arrival to the last answer."""
    url = f"{endpoint}/completions"
    sinks: list[list[Req]] = [[] for _ in scaled]
    ended: list[float | None] = [None] * len(scaled)
    timeout = aiohttp.ClientTimeout(total=None, sock_connect=30)
    async with aiohttp.ClientSession(timeout=timeout,
                                     connector=aiohttp.TCPConnector(limit=0)) as session:
        model = await served_model(session, endpoint)

        async def one(i: int, s: ScaledRequest) -> None:
            await stream(session, url, body(model, s), "trace", sinks[i], clock)
            ended[i] = clock()

        t0 = clock()
        last_arrival = scaled[-1].arrival_s if scaled else 0.0
        tasks: list[asyncio.Task[None]] = []
        for i, s in enumerate(scaled):
            while (wait := t0 + s.arrival_s - clock()) > 0:
                _tick(progress, "replay", t0 + last_arrival - clock(), sinks, tasks)
                await asyncio.sleep(min(wait, 1.0))
            tasks.append(asyncio.create_task(one(i, s)))
        deadline = t0 + last_arrival + drain_s
        pending = {t for t in tasks if not t.done()}
        while pending and clock() < deadline:
            _tick(progress, "draining", deadline - clock(), sinks, tasks)
            _, pending = await asyncio.wait(pending, timeout=min(1.0, deadline - clock()))
        for t in pending:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    ends = [e for e in ended if e is not None]
    end = deadline if pending else max(ends, default=t0)
    return [s[0] if s else None for s in sinks], max(0.0, end - t0)


def _tick(progress: Progress | None, phase: str, left_s: float, sinks: list[list[Req]],
          tasks: Sequence[asyncio.Task[None]]) -> None:
    if progress is None:
        return
    started = [s[0] for s in sinks if s]
    refused = sum(1 for r in started if r.status == 429)
    open_ = sum(1 for t in tasks if not t.done())
    progress.update(phase, max(0.0, left_s),
                    f"{len(tasks)} sent, {open_} open, {refused} refused")


def per_request(scaled: Sequence[ScaledRequest], reqs: Sequence[Req | None],
                outcomes: Sequence[Outcome]) -> list[dict[str, Any]]:
    out = []
    for s, r, o in zip(scaled, reqs, outcomes, strict=True):
        out.append({
            "index": s.index, "arrival_s": round(s.arrival_s, 3), "status": o.status,
            "ttft_s": None if o.ttft_s is None else round(o.ttft_s, 4),
            "tpot_s": None if o.tpot_s is None else round(o.tpot_s, 5),
            "input_tokens": len(s.prompt), "output_tokens": o.output_tokens,
            "max_tokens": s.max_tokens, "pd": r.pd if r else "",
            **({"detail": o.detail[:160]} if o.detail else {}),
        })
    return out


@dataclass
class TraceWorkload:
    """One scaled window, the same for every setup, judged at one pair of SLOs
    (the first setup's), so that the setups are compared on the same terms."""

    scaled: list[ScaledRequest]
    slo_ttft_s: float
    slo_itl_s: float
    drain_s: float = 120.0
    keep_requests: bool = True
    name: str = "trace"

    @property
    def columns(self) -> list[Column]:
        return COLUMNS

    def expected_s(self) -> float:
        return (self.scaled[-1].arrival_s if self.scaled else 0.0) + self.drain_s

    async def run(self, endpoint: str, profile: config.Profile,
                  progress: Progress) -> dict[str, Any]:
        reqs, wall = await replay(endpoint, self.scaled, self.drain_s, progress)
        outcomes = [outcome(r) for r in reqs]
        res = summarize(outcomes, wall, self.slo_ttft_s, self.slo_itl_s)
        pd: dict[str, int] = {}
        for r in reqs:
            if r is not None and r.status == 200:
                pd[r.pd or "?"] = pd.get(r.pd or "?", 0) + 1
        res["pd_by_request"] = pd
        if self.keep_requests:
            res["requests"] = per_request(self.scaled, reqs, outcomes)
        progress.note(f"{progress.prefix} goodput {res['goodput_rps']} req/s "
                      f"({res['good']}/{res['sent']} in SLO), TTFT p50 {res['ttft_p50_s']} s, "
                      f"TPOT p50 {res['tpot_p50_s']} s, {res['output_tokens_per_s']} tokens/s, "
                      f"{res['refused_429']} refused, {res['errors']} errors, "
                      f"{res['timeouts']} timeouts")
        return res

    def rows(self, label: str, result: dict[str, Any]) -> list[Row]:
        figs = dict(result)
        for q in ("p50", "p90", "p99"):
            v = result.get(f"tpot_{q}_s")
            figs[f"tpot_{q}_ms"] = None if v is None else round(1000 * v, 2)
        figs["failed"] = f"{result['refused_429']}/{result['errors']}/{result['timeouts']}"
        return [Row("", label, figs)]
