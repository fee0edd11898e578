"""The P/D decider under streams, against each long prompt sent alone.

    pdbox bench decider                      # cpu-tiny as shipped (hybrid P/D)

For each prompt length (default ~900 and ~2,000 tokens, unique token ids, so
no prefix-cache hit shortens them):

1. Alone: no stream running, the prompt sent forced local
   (`x-pdbox-pd: local`: prefilled where it decodes) and forced remote
   (`x-pdbox-pd: remote`: prefilled on the prefill worker, its KV pulled by the
   decode worker), `repeats` times each; TTFT p50 of each path.
2. Under streams: `per_worker` streams for each serving worker (placed by the
   router), then, once every stream has its first tokens, the same length on
   the router's own choice; its TTFT and path, and the worst gap between two
   tokens of any stream while it was prefilled (from its sending to its first
   token and half a second after). The streams are cut before the next round.

Goals (per length): worst gap ≤ 2× the profile's ITL target; TTFT under
streams ≤ 1.3× the better of local and remote alone.
"""

from __future__ import annotations

import asyncio
import random
import statistics
from dataclasses import dataclass
from typing import Any

import aiohttp

from pdbox import config
from pdbox.bench.client import Req, stream
from pdbox.bench.progress import Progress
from pdbox.bench.report import Column, Row

GAP_GOAL_ITL = 2.0  # worst stream gap, in ITL targets
TTFT_GOAL = 1.3  # TTFT under streams against the better path alone
# After a long prompt's first token its decode joins the streams' steps; gaps
# this long after it still count as its doing.
AFTER_S = 0.5


@dataclass(frozen=True)
class Params:
    lengths: tuple[int, ...] = (900, 2000)
    per_worker: int = 3
    repeats: int = 2
    stream_tokens: int = 600
    seed: int = 11


class DeciderWorkload:
    name = "decider"

    def __init__(self, params: Params) -> None:
        self.p = params
        self.rng = random.Random(params.seed)
        self.columns = [
            Column("ttft_local_s", "alone local TTFT s", "lower", "latency s"),
            Column("ttft_remote_s", "alone remote TTFT s", "lower", "latency s"),
            Column("ttft_streams_s", "under streams TTFT s", "lower", "latency s"),
            Column("ttft_ratio", "÷ best alone"),
            Column("worst_gap_s", "worst stream gap s", "lower", "latency s"),
            Column("paths", "paths under streams"),
        ]

    def config(self) -> dict[str, Any]:
        return {**self.p.__dict__, "lengths": list(self.p.lengths)}

    def expected_s(self) -> float:
        return 40.0 * len(self.p.lengths) * self.p.repeats

    def _prompt(self, n: int) -> list[int]:
        return [self.rng.randrange(1000, 10000) for _ in range(n)]

    async def _alone(self, url: str, name: str, n: int, path: str) -> list[float]:
        out = []
        for _ in range(self.p.repeats):
            body = {"model": name, "prompt": self._prompt(n), "max_tokens": 2}
            r = await _forced(url, body, path)
            if r.ttft is None:
                raise ValueError(f"a forced {path} {n}-token prompt got no token: "
                                 f"{r.error or r.status}")
            out.append(r.ttft)
        return out

    async def _under_streams(self, s: aiohttp.ClientSession, url: str, name: str,
                             n: int, workers: int) -> dict[str, Any]:
        streams: list[Req] = []
        body = {"model": name, "max_tokens": self.p.stream_tokens, "ignore_eos": True}
        tasks = []
        for _ in range(self.p.per_worker * workers):
            tasks.append(asyncio.create_task(stream(
                s, url, dict(body, prompt=self._prompt(24)), "stream", streams)))
            await asyncio.sleep(0.15)
        try:
            for _ in range(600):  # every stream past its first tokens (at most 60 s)
                if len(streams) == len(tasks) and all(len(r.events) >= 2 for r in streams):
                    break
                await asyncio.sleep(0.1)
            await asyncio.sleep(1.0)
            long_r = await stream(s, url, {"model": name, "prompt": self._prompt(n),
                                           "max_tokens": 2}, "long")
        finally:
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
        if long_r.ttft is None:
            raise ValueError(f"a {n}-token prompt under streams got no token: {long_r.error}")
        t0, t1 = long_r.sent, long_r.sent + long_r.ttft + AFTER_S
        gaps = [b - a for r in streams for a, b in zip(r.events, r.events[1:], strict=False)
                if t0 <= b and a <= t1]
        return {"ttft_s": long_r.ttft, "path": long_r.pd, "decode": long_r.decode,
                "prefill": long_r.prefill, "reason": long_r.reason[:300],
                "worst_gap_s": max(gaps, default=None),
                "homes": sorted(r.decode for r in streams)}

    async def run(self, endpoint: str, profile: config.Profile,
                  progress: Progress) -> dict[str, Any]:
        url = f"{endpoint}/completions"
        name = profile.model.served_name
        workers = sum(rc.replicas for rc in profile.roles().values())
        out: dict[str, Any] = {"itl_target_s": profile.slo.itl_s, "lengths": {}}
        async with aiohttp.ClientSession() as s:
            for n in self.p.lengths:
                row: dict[str, Any] = {}
                for path in ("local", "remote"):
                    progress.update(f"{n}-token prompt alone, {path}")
                    row[f"alone_{path}_s"] = await self._alone(url, name, n, path)
                rounds = []
                for i in range(self.p.repeats):
                    progress.update(f"{n}-token prompt under streams {i + 1}/{self.p.repeats}")
                    rounds.append(await self._under_streams(s, url, name, n, workers))
                row["under_streams"] = rounds
                out["lengths"][str(n)] = row
        return out

    def rows(self, label: str, result: dict[str, Any]) -> list[Row]:
        rows = []
        for n, row in (result.get("lengths") or {}).items():
            f = _summary(row)
            rows.append(Row(f"{n} tokens", label, {
                "ttft_local_s": f["local"], "ttft_remote_s": f["remote"],
                "ttft_streams_s": f["ttft"], "ttft_ratio": f["ttft"] / f["best"],
                "worst_gap_s": f["gap"],
                "paths": " ".join(f"{r['path']}:{r['prefill'] or '-'}>{r['decode']}"
                                  for r in row["under_streams"])}))
        return rows


def _summary(row: dict[str, Any]) -> dict[str, Any]:
    """One length's figures: TTFT p50 alone on each path and the better of them, TTFT p50
    under streams, and the worst stream gap of any round (None: no gap measured)."""
    local = statistics.median(row["alone_local_s"])
    remote = statistics.median(row["alone_remote_s"])
    rounds = row["under_streams"]
    gaps = [r["worst_gap_s"] for r in rounds if r["worst_gap_s"] is not None]
    return {"local": local, "remote": remote, "best": min(local, remote),
            "ttft": statistics.median(r["ttft_s"] for r in rounds),
            "gap": max(gaps, default=None)}


def goals(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per setup and length: the gap goal and the TTFT goal, met or not."""
    out = []
    for s in results:
        itl = s["result"].get("itl_target_s") or 0.0
        for n, row in (s["result"].get("lengths") or {}).items():
            f = _summary(row)
            gap, ttft, best = f["gap"] or 0.0, f["ttft"], f["best"]
            out.append({"setup": s["label"], "tokens": int(n),
                        "worst_gap_s": round(gap, 3), "gap_goal_s": GAP_GOAL_ITL * itl,
                        "gap_met": gap <= GAP_GOAL_ITL * itl,
                        "ttft_ratio": round(ttft / best, 2), "ttft_goal": TTFT_GOAL,
                        "ttft_met": ttft <= TTFT_GOAL * best})
    return out


async def _forced(url: str, body: dict[str, Any], path: str) -> Req:
    """`stream` with the P/D path forced by header."""
    async with aiohttp.ClientSession(headers={"x-pdbox-pd": path}) as forced:
        return await stream(forced, url, body, f"alone-{path}")
