"""Warm-up calibration: time a new worker's prefill and decode, in a few seconds.

Run once per worker start, after its first completion and before it is
marked ready, so nothing else shares its slice:

1. prefill at two prompt lengths, one output token each. The short prompt
   sizes the long one to take about `target_s` on this machine (a CPU
   without native bf16 prefills 5-6x slower than one with it), so the
   whole calibration stays within a few seconds everywhere. Neither is
   longer than the worker's step budget (`step_tokens`): each is one engine
   step, so the points are what a step of about the budget's size costs
   here, which is what the next budget is sized from. (A prompt over the
   budget runs in several steps, each with its ~50 ms fixed cost on a CPU:
   timed that way, a small budget measured a low speed, which made the next
   budget smaller still, start after start.);
2. the decode step: one stream alone, then `streams` together.

Prompts are random token ids, so no prefix-cache hit shortens them and no
tokenizer is needed; ids between 1,000 and 10,000 exist in every
vocabulary pdbox serves.
"""

from __future__ import annotations

import asyncio
import json
import random
import time
from collections.abc import Callable

import aiohttp

from pdbox.calibration import Calibration, decode_step, fit_prefill

SHORT_TOKENS = 16
MIN_LONG_TOKENS = 64
MAX_LONG_TOKENS = 1024
STREAM_TOKENS = 16
BATCH_STREAMS = 4
# Below this difference between the two prompts' times, timer and scheduling
# noise is a large share of it.
MIN_SPREAD_S = 0.2


class CalibrationError(Exception):
    """A calibration request failed; str() says which."""


class Calibrator:
    def __init__(self, session: aiohttp.ClientSession, served_name: str,
                 max_model_len: int = 4096, target_s: float = 0.5,
                 clock: Callable[[], float] = time.perf_counter,
                 rng: random.Random | None = None, step_tokens: int = 0) -> None:
        self.session = session
        self.served_name = served_name
        self.max_model_len = max_model_len
        # The worker's max_num_batched_tokens (0: vLLM's default, over MAX_LONG_TOKENS).
        self.longest = min(MAX_LONG_TOKENS, max_model_len // 2,
                           step_tokens if step_tokens > 0 else MAX_LONG_TOKENS)
        self.target_s = target_s
        self.clock = clock
        self.rng = rng or random.Random()
        self.timeout = aiohttp.ClientTimeout(total=60)

    def _prompt(self, n: int) -> list[int]:
        return [self.rng.randrange(1000, 10000) for _ in range(n)]

    async def run(self, url: str) -> Calibration:
        t0 = self.clock()
        short = await self._prefill(url, SHORT_TOKENS)
        # The short prompt's time includes the fixed cost, so this speed is low
        # and the long prompt comes out shorter than the target, never longer.
        rough_tps = SHORT_TOKENS / max(short, 1e-3)
        long_n = int(min(self.longest, max(MIN_LONG_TOKENS, rough_tps * self.target_s)))
        long = await self._prefill(url, long_n)
        points = [(SHORT_TOKENS, short), (long_n, long)]
        tps, overhead = fit_prefill(points)
        if long - short < MIN_SPREAD_S and long_n < self.longest:
            # A fast machine: the two times differ by little more than noise.
            # A prompt sized from the fitted speed separates them.
            long_n = int(min(self.longest, max(long_n * 2, tps * self.target_s)))
            points[1] = (long_n, await self._prefill(url, long_n))
            tps, overhead = fit_prefill(points)
        steps = {1: decode_step(await self._stream(url))}
        gaps = await asyncio.gather(*(self._stream(url) for _ in range(BATCH_STREAMS)))
        steps[BATCH_STREAMS] = decode_step([g for gs in gaps for g in gs])
        return Calibration(prefill_tps=tps, overhead_s=overhead, decode_step_s=steps,
                           prefill_points=tuple(points), took_s=self.clock() - t0)

    async def _prefill(self, url: str, n: int) -> float:
        body = {"model": self.served_name, "prompt": self._prompt(n), "max_tokens": 1}
        t = self.clock()
        try:
            async with self.session.post(f"{url}/v1/completions", json=body,
                                         timeout=self.timeout) as r:
                await r.read()
                if r.status != 200:
                    raise CalibrationError(f"a {n}-token prompt got HTTP {r.status}")
        except (TimeoutError, aiohttp.ClientError, OSError) as exc:
            raise CalibrationError(f"a {n}-token prompt failed: {exc!r}") from None
        return self.clock() - t

    async def _stream(self, url: str) -> list[float]:
        """Gaps between the token events of one stream, its first token excluded."""
        body = {"model": self.served_name, "prompt": self._prompt(SHORT_TOKENS),
                "max_tokens": STREAM_TOKENS, "ignore_eos": True, "stream": True}
        stamps: list[float] = []
        try:
            async with self.session.post(f"{url}/v1/completions", json=body,
                                         timeout=self.timeout) as r:
                if r.status != 200:
                    raise CalibrationError(f"a stream got HTTP {r.status}")
                async for raw in r.content:
                    line = raw.strip()
                    if not line.startswith(b"data:") or line == b"data: [DONE]":
                        continue
                    try:
                        chunk = json.loads(line[5:])
                    except ValueError:
                        continue
                    if chunk.get("choices"):
                        stamps.append(self.clock())
        except (TimeoutError, aiohttp.ClientError, OSError) as exc:
            raise CalibrationError(f"a stream failed: {exc!r}") from None
        gaps = [b - a for a, b in zip(stamps, stamps[1:], strict=False)]
        if not gaps:
            raise CalibrationError("a stream returned fewer than two tokens")
        return gaps
