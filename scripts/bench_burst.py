#!/usr/bin/env python3
"""A burst of concurrent multi-turn chats through the official openai SDK.

Each of `--chats` conversations starts at once with its own ~`--system-tokens`
system prompt (unique text, so no prefix cache hides the prefill) and runs
`--turns` turns, each streamed so that TTFT is measured as the client sees it:
from sending the turn (retries and their Retry-After waits included) to the
first content token. The SDK keeps its default retries (2), which honour
Retry-After; nothing here retries on its own.

Prints one JSON object: turns answered, errors (by kind), 429s seen by the
SDK's retries (counted from the router's /metrics), TTFT p50/p90/max, and wall
time. Exit 1 if any turn failed.

  .venv/bin/python scripts/bench_burst.py --endpoint http://127.0.0.1:8000/v1
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import sys
import time
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pdbox.bench.machine import record as machine_record  # noqa: E402
from pdbox.router.metrics import percentile, sum_series  # noqa: E402

WORDS = ("alpha beta gamma delta river mountain cloud stone paper light shadow garden music "
         "copper violet window harbor meadow lantern orbit canyon falcon ember glacier "
         "quartz willow thunder marble saffron cobalt").split()
QUESTIONS = ("Summarise the notes above in one sentence.", "Name one word from the notes.",
             "What is the mood of the notes?", "Give the notes a short title.")


def system_prompt(rng: random.Random, tokens: int) -> str:
    # About one token a word for these words with SmolLM2's tokenizer.
    return "You are a helpful assistant. Notes: " + " ".join(
        rng.choice(WORDS) for _ in range(tokens))


def rejected_total(base: str) -> float:
    try:
        text = urllib.request.urlopen(f"{base}/metrics", timeout=10).read().decode()
    except OSError:
        return float("nan")
    return sum_series(text, "pdbox_rejected_total")


async def chat(client, model: str, idx: int, args: argparse.Namespace,
               ttfts: list[float], errors: list[str]) -> int:
    rng = random.Random(args.seed * 1000 + idx)
    messages = [{"role": "system", "content": system_prompt(rng, args.system_tokens)}]
    done = 0
    for turn in range(args.turns):
        messages.append({"role": "user", "content": QUESTIONS[(idx + turn) % len(QUESTIONS)]})
        t0 = time.monotonic()
        first: float | None = None
        parts: list[str] = []
        try:
            stream = await client.chat.completions.create(
                model=model, messages=messages, max_tokens=args.max_tokens, stream=True,
                temperature=0)
            async for chunk in stream:
                if chunk.choices and chunk.choices[0].delta.content:
                    if first is None:
                        first = time.monotonic() - t0
                    parts.append(chunk.choices[0].delta.content)
        except Exception as exc:  # noqa: BLE001 - every failure is counted, by kind
            errors.append(f"{type(exc).__name__}: {str(exc)[:160]}")
            return done
        if first is None:
            errors.append("empty answer")
            return done
        ttfts.append(first)
        messages.append({"role": "assistant", "content": "".join(parts)})
        done += 1
    return done


async def run(args: argparse.Namespace) -> dict:
    from openai import AsyncOpenAI

    client = AsyncOpenAI(base_url=args.endpoint, api_key=args.api_key or "none",
                         timeout=args.timeout)
    base = args.endpoint.rsplit("/v1", 1)[0]
    before = rejected_total(base)
    ttfts: list[float] = []
    errors: list[str] = []
    t0 = time.monotonic()
    done = await asyncio.gather(*(chat(client, args.model, i, args, ttfts, errors)
                                  for i in range(args.chats)))
    wall = time.monotonic() - t0
    await client.close()
    kinds: dict[str, int] = {}
    for e in errors:
        kinds[e.split(":", 1)[0]] = kinds.get(e.split(":", 1)[0], 0) + 1
    return {
        "chats": args.chats, "turns_per_chat": args.turns, "system_tokens": args.system_tokens,
        "turns_answered": sum(done), "turns_wanted": args.chats * args.turns,
        "errors": len(errors), "error_kinds": kinds, "first_errors": errors[:3],
        "rejected_429": rejected_total(base) - before,
        "ttft_p50_s": percentile(ttfts, 0.5), "ttft_p90_s": percentile(ttfts, 0.9),
        "ttft_max_s": max(ttfts) if ttfts else None, "wall_s": round(wall, 1),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--endpoint", default="http://127.0.0.1:8000/v1")
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--api-key", default="")
    ap.add_argument("--chats", type=int, default=40)
    ap.add_argument("--turns", type=int, default=2)
    ap.add_argument("--system-tokens", type=int, default=1500)
    ap.add_argument("--max-tokens", type=int, default=24)
    ap.add_argument("--timeout", type=float, default=600.0, help="per request, as the SDK's")
    ap.add_argument("--seed", type=int, default=1)
    args = ap.parse_args()
    out = asyncio.run(run(args))
    out["machine"] = machine_record()
    print(json.dumps(out, indent=2))
    sys.exit(1 if out["errors"] else 0)


if __name__ == "__main__":
    main()
