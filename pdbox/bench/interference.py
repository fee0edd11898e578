"""Interference workload: decode smoothness under long prompts.

Identical for each setup: S decode streams (a short unique prompt, N tokens
with ignore_eos, restarted as they finish) while L long prompts of unique
text (~630 tokens, so no prefix cache hides them) arrive one every
`interval_s`, after `lead_s`. Measured client-side:

- ITL of the decode streams: gaps between SSE token events as the client reads them;
- TTFT of the long prompts: send to first token event;
- output tokens/s: token events of every request inside the measured window;
- per long prompt the router's x-pdbox-pd / x-pdbox-pd-reason headers.

Goals (a P/D setup against an aggregated one): ITL p99 ≤ 0.5×, long-prompt
TTFT p50 ≤ 1.3×, tokens/s ≥ 0.9×.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from typing import Any

import aiohttp

from pdbox import config
from pdbox.bench.client import Req, served_model, stream
from pdbox.bench.pd_legs import unique_prompt
from pdbox.bench.progress import Progress
from pdbox.bench.report import Column, Row
from pdbox.router.metrics import percentile as pct

PRESETS = {
    "pd-adaptive": "cpu-tiny,router.pd_decider=adaptive",
    "pd-threshold": "cpu-tiny,router.pd_decider=threshold",
    "aggregated": "cpu-aggregated",
}
DEFAULT_SETUPS = ("pd-adaptive", "pd-threshold", "aggregated")

COLUMNS = [
    Column("itl_p50_ms", "ITL p50 ms", "lower", "ITL ms"),
    Column("itl_p99_ms", "p99", "lower", "ITL ms"),
    Column("itl_max_ms", "max", "lower", "ITL ms"),
    Column("itl_over_250ms_share", "gaps>250ms", "lower"),
    Column("long_ttft_p50_s", "long TTFT p50 s", "lower", "TTFT s"),
    Column("long_ttft_p90_s", "p90", "lower", "TTFT s"),
    Column("output_tokens_per_s", "tokens/s", "higher", "tokens/s"),
    Column("long_remote_share", "remote"),
]


@dataclass(frozen=True)
class Params:
    streams: int = 4
    stream_tokens: int = 200
    long_prompts: int = 7
    long_tokens: int = 630
    long_max_tokens: int = 16
    interval_s: float = 3.0
    lead_s: float = 3.0
    seed: int = 1


async def calibrate_words(session: aiohttp.ClientSession, url: str, model: str,
                          rng: random.Random, target_tokens: int) -> int:
    """How many words of unique_prompt text make about target_tokens tokens."""
    body = {"model": model, "prompt": unique_prompt(rng, 200), "max_tokens": 1}
    async with session.post(url, json=body) as resp:
        n = (await resp.json())["usage"]["prompt_tokens"]
    return max(10, round(200 * target_tokens / n))


class Bodies:
    """The two kinds of request, each with a unique prompt: a long prompt of
    about `long_tokens` tokens, and a short one that streams."""

    def __init__(self, model: str, words: int, rng: random.Random, long_max_tokens: int,
                 stream_tokens: int) -> None:
        self.model, self.words, self.rng = model, words, rng
        self.long_max_tokens, self.stream_tokens = long_max_tokens, stream_tokens

    @classmethod
    async def open(cls, session: aiohttp.ClientSession, endpoint: str, rng: random.Random,
                   long_tokens: int, long_max_tokens: int, stream_tokens: int) -> Bodies:
        """The served model, and the prompt length that makes `long_tokens`."""
        model = await served_model(session, endpoint)
        words = await calibrate_words(session, f"{endpoint}/completions", model, rng,
                                      long_tokens)
        return cls(model, words, rng, long_max_tokens, stream_tokens)

    def long(self) -> dict[str, Any]:
        return {"model": self.model, "prompt": unique_prompt(self.rng, self.words),
                "max_tokens": self.long_max_tokens, "ignore_eos": True}

    def stream(self) -> dict[str, Any]:
        return {"model": self.model,
                "prompt": unique_prompt(self.rng, 12) + " Tell a long story.",
                "max_tokens": self.stream_tokens, "ignore_eos": True, "temperature": 0.0}


def summarise(streams: list[Req], longs: list[Req], warm: list[Req], t0: float,
              t1: float) -> dict[str, Any]:
    """The window's figures; only events inside [t0, t1], gaps only within a request."""
    gaps: list[float] = []
    tokens = 0
    for r in streams:
        ev = [t for t in r.events if t0 <= t <= t1]
        gaps += [b - a for a, b in zip(ev, ev[1:], strict=False)]
        tokens += len(ev)
    for r in longs:
        tokens += sum(1 for t in r.events if t0 <= t <= t1)
    ttfts = [r.ttft for r in longs if r.ttft is not None]
    window = t1 - t0
    remote = [r for r in longs if r.pd == "remote"]
    return {
        "window_s": round(window, 2),
        "itl_p50_ms": _ms(pct(gaps, 0.5)),
        "itl_p99_ms": _ms(pct(gaps, 0.99)),
        "itl_p999_ms": _ms(pct(gaps, 0.999)),
        "itl_max_ms": _ms(max(gaps) if gaps else None),
        "itl_samples": len(gaps),
        # p99 depends on how many gaps a run has; the share over the SLO does not.
        "itl_over_250ms_share": round(sum(g > 0.25 for g in gaps) / len(gaps), 4) if gaps else None,
        "itl_stall_s": round(sum(g for g in gaps if g > 0.25), 2),
        "long_ttft_p50_s": _r(pct(ttfts, 0.5)),
        "long_ttft_p90_s": _r(pct(ttfts, 0.9)),
        "long_ttft_s": [_r(x) for x in ttfts],
        "long_prompt_tokens": [r.prompt_tokens for r in longs],
        "output_tokens_per_s": round(tokens / window, 2) if window > 0 else None,
        "output_tokens": tokens,
        "streams_completed": len(streams),
        "long_remote_share": (len(remote) / len(longs)) if longs else None,
        "errors": [r.error for r in streams + longs if r.error and r.error != "cancelled"],
        "long_decisions": [{"pd": r.pd, "reason": r.reason, "decode": r.decode,
                            "prefill": r.prefill, "ttft_s": _r(r.ttft)} for r in longs],
        "stream_pd": count(r.pd for r in streams),
        "warmup_pd": count(r.pd for r in warm),
    }


def compare(pd: dict[str, Any], agg: dict[str, Any]) -> dict[str, Any]:
    """The three goals of a P/D setup against an aggregated one."""
    def ratio(a: Any, b: Any) -> float | None:
        return round(a / b, 3) if a is not None and b else None

    itl = ratio(pd["itl_p99_ms"], agg["itl_p99_ms"])
    ttft = ratio(pd["long_ttft_p50_s"], agg["long_ttft_p50_s"])
    tps = ratio(pd["output_tokens_per_s"], agg["output_tokens_per_s"])
    return {
        "itl_p99_ratio": itl, "itl_p99_ok": itl is not None and itl <= 0.5,
        "ttft_p50_ratio": ttft, "ttft_p50_ok": ttft is not None and ttft <= 1.3,
        "tokens_per_s_ratio": tps, "tokens_per_s_ok": tps is not None and tps >= 0.9,
    }


def goals(setups: list[dict[str, Any]]) -> dict[str, Any]:
    """Each P/D setup against each aggregated one, by label."""
    out: dict[str, Any] = {}
    for pd in (s for s in setups if s["mode"] == "pd"):
        for agg in (s for s in setups if s["mode"] == "aggregated"):
            out[f"{pd['label']} vs {agg['label']}"] = compare(pd["result"], agg["result"])
    return out


def count(values: Iterable[str]) -> dict[str, int]:
    out: dict[str, int] = {}
    for v in values:
        out[v or "?"] = out.get(v or "?", 0) + 1
    return out


def _ms(x: float | None) -> float | None:
    return None if x is None else round(1000 * x, 1)


def _r(x: float | None) -> float | None:
    return None if x is None else round(x, 3)


@dataclass
class InterferenceWorkload:
    params: Params
    name: str = "interference"

    @property
    def columns(self) -> list[Column]:
        return COLUMNS

    def expected_s(self) -> float:
        p = self.params
        return 20.0 + p.lead_s + p.long_prompts * p.interval_s

    def config(self) -> dict[str, Any]:
        return asdict(self.params)

    async def run(self, endpoint: str, profile: config.Profile,
                  progress: Progress) -> dict[str, Any]:
        p = self.params
        url = f"{endpoint}/completions"
        rng = random.Random(p.seed)
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=600)) as session:
            progress.update("warm-up")
            bodies = await Bodies.open(session, endpoint, rng, p.long_tokens, p.long_max_tokens,
                                       p.stream_tokens)
            long_body, stream_body = bodies.long, bodies.stream
            # Warm-up: every worker computes once, and the decider sees a few legs of
            # each kind (short, long alone, long under streams) before measuring.
            warm: list[Req] = []
            for _ in range(2):
                warm.append(await stream(session, url, dict(stream_body(), max_tokens=16),
                                         "warm"))
                warm.append(await stream(session, url, long_body(), "warm"))
            bg = [asyncio.create_task(stream(session, url, dict(stream_body(), max_tokens=48),
                                             "warm")) for _ in range(p.streams)]
            await asyncio.sleep(1.0)
            warm.append(await stream(session, url, long_body(), "warm"))
            warm += await asyncio.gather(*bg)

            stop = asyncio.Event()
            streams: list[Req] = []

            async def stream_loop() -> None:
                while not stop.is_set():
                    await stream(session, url, stream_body(), "stream", streams)

            t_start = time.monotonic()
            end_at = t_start + p.lead_s + p.long_prompts * p.interval_s
            loops = [asyncio.create_task(stream_loop()) for _ in range(p.streams)]
            progress.update("streams", end_at - time.monotonic())
            await asyncio.sleep(p.lead_s)
            longs: list[asyncio.Task[Req]] = []
            for i in range(p.long_prompts):
                longs.append(asyncio.create_task(stream(session, url, long_body(), "long")))
                progress.update("long prompts", end_at - time.monotonic(),
                                f"{i + 1}/{p.long_prompts} sent")
                await asyncio.sleep(p.interval_s)
            long_reqs = list(await asyncio.gather(*longs))
            t_end = time.monotonic()
            stop.set()
            # Streams still open are measured up to t_end: their partial events count.
            for t in loops:
                t.cancel()
            await asyncio.gather(*loops, return_exceptions=True)
        res = summarise(streams, long_reqs, warm, t_start, t_end)
        progress.note(f"{progress.prefix} ITL p50/p99/max {res['itl_p50_ms']}/"
                      f"{res['itl_p99_ms']}/{res['itl_max_ms']} ms, long TTFT p50/p90 "
                      f"{res['long_ttft_p50_s']}/{res['long_ttft_p90_s']} s, "
                      f"{res['output_tokens_per_s']} tokens/s, remote {res['long_remote_share']}")
        return res

    def rows(self, label: str, result: dict[str, Any]) -> list[Row]:
        return [Row("", label, result)]
