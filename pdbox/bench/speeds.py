"""One request alone: TTFT at a short and a long prompt, and the decode step.

The figures a user needs to compare dtypes (or builds, or machines) on the
hardware at hand, free of queueing: each request runs alone, and each
prompt is random token ids, so no prefix-cache hit shortens it.

    pdbox bench speeds --profile 'bf16:cpu-aggregated,model.dtype=bfloat16' \\
        --against 'fp32:cpu-aggregated,model.dtype=float32'

Per setup: TTFT p50 at each prompt length over `repeats` requests, the
decode step (median gap between tokens of a stream alone), and the
warm-up calibration pdbox measured at start (docs/ROUTING.md).
"""

from __future__ import annotations

import random
import statistics
from dataclasses import dataclass
from typing import Any

import aiohttp

from pdbox import config
from pdbox.bench.client import stream
from pdbox.bench.progress import Progress
from pdbox.bench.report import Column, Row


@dataclass(frozen=True)
class Params:
    short_tokens: int = 64
    long_tokens: int = 1024
    repeats: int = 3
    stream_tokens: int = 64
    seed: int = 7


class SpeedsWorkload:
    name = "speeds"

    def __init__(self, params: Params) -> None:
        self.p = params
        self.rng = random.Random(params.seed)
        self.columns = [
            Column("ttft_short_s", f"TTFT {params.short_tokens} tok s", "lower", "latency s"),
            Column("ttft_long_s", f"TTFT {params.long_tokens} tok s", "lower", "latency s"),
            Column("prefill_tps", "prefill tok/s", "higher", "tokens/s"),
            Column("decode_step_s", "decode step s", "lower", "latency s"),
            Column("calib_prefill_tps", "calibrated prefill tok/s", "higher"),
            Column("calib_step_s", "calibrated step s", "lower"),
        ]

    def config(self) -> dict[str, Any]:
        return dict(self.p.__dict__)

    def expected_s(self) -> float:
        return 30.0

    def _prompt(self, n: int) -> list[int]:
        return [self.rng.randrange(1000, 10000) for _ in range(n)]

    async def run(self, endpoint: str, profile: config.Profile,
                  progress: Progress) -> dict[str, Any]:
        url = f"{endpoint}/completions"
        name = profile.model.served_name
        out: dict[str, Any] = {}
        async with aiohttp.ClientSession() as s:
            for key, n in (("short", self.p.short_tokens), ("long", self.p.long_tokens)):
                times = []
                for i in range(self.p.repeats):
                    progress.update(f"{n}-token prompt {i + 1}/{self.p.repeats}")
                    body = {"model": name, "prompt": self._prompt(n), "max_tokens": 1}
                    r = await stream(s, url, body, key)
                    if r.ttft is None:
                        raise ValueError(f"a {n}-token prompt got no token: {r.error or r.status}")
                    times.append(r.ttft)
                out[f"ttft_{key}_s"] = statistics.median(times)
                out[f"ttft_{key}_all_s"] = times
            progress.update("decode step")
            body = {"model": name, "prompt": self._prompt(16), "max_tokens": self.p.stream_tokens,
                    "ignore_eos": True}
            r = await stream(s, url, body, "stream")
            gaps = [b - a for a, b in zip(r.events, r.events[1:], strict=False)]
            if not gaps:
                raise ValueError(f"a stream returned fewer than two tokens: {r.error or r.status}")
            out["decode_step_s"] = statistics.median(gaps)
        spread = out["ttft_long_s"] - out["ttft_short_s"]
        out["prefill_tps"] = (self.p.long_tokens - self.p.short_tokens) / spread \
            if spread > 0 else None
        return out

    def rows(self, label: str, result: dict[str, Any]) -> list[Row]:
        figures = {k: result.get(k) for k in ("ttft_short_s", "ttft_long_s", "prefill_tps",
                                               "decode_step_s")}
        cal = result.get("calibration") or {}
        if cal:
            first = next(iter(cal.values()))
            figures["calib_prefill_tps"] = first.get("prefill_tps")
            figures["calib_step_s"] = (first.get("decode_step_s") or {}).get("1")
        return [Row("alone", label, figures)]
