"""A burst of concurrent multi-turn chats through the official openai SDK.

Each conversation starts at once with its own system prompt (unique text, so
no prefix cache hides the prefill) and runs its turns one after the other,
each streamed, so TTFT is what the client sees: from sending the turn
(retries and their Retry-After waits included) to the first content token.
The SDK keeps its default retries (2), which honour Retry-After; nothing here
retries on its own, because the point is how a stock client fares.
"""

from __future__ import annotations

import asyncio
import random
import time
import urllib.request
from dataclasses import dataclass
from typing import Any

from pdbox.router.metrics import percentile, sum_series

# About one token a word with SmolLM2's tokenizer.
WORDS = ("alpha beta gamma delta river mountain cloud stone paper light shadow garden music "
         "copper violet window harbor meadow lantern orbit canyon falcon ember glacier "
         "quartz willow thunder marble saffron cobalt").split()
QUESTIONS = ("Summarise the notes above in one sentence.", "Name one word from the notes.",
             "What is the mood of the notes?", "Give the notes a short title.")


class BurstError(Exception):
    """The burst cannot run here; str() is the sentence to show."""


@dataclass(frozen=True)
class Params:
    endpoint: str = "http://127.0.0.1:8000/v1"
    model: str = "smollm2"
    api_key: str = ""
    chats: int = 40
    turns: int = 2
    system_tokens: int = 1500
    max_tokens: int = 24
    timeout: float = 600.0  # per request, as the SDK counts it
    seed: int = 1


def system_prompt(rng: random.Random, tokens: int) -> str:
    return "You are a helpful assistant. Notes: " + " ".join(
        rng.choice(WORDS) for _ in range(tokens))


def rejected_total(base: str) -> float:
    """The router's 429 count; NaN where /metrics does not answer (a bare server)."""
    try:
        text = urllib.request.urlopen(f"{base}/metrics", timeout=10).read().decode()
    except OSError:
        return float("nan")
    return sum_series(text, "pdbox_rejected_total")


async def chat(client: Any, p: Params, idx: int, ttfts: list[float],
               errors: list[str]) -> int:
    """One conversation; returns the turns answered. A failed turn ends it."""
    rng = random.Random(p.seed * 1000 + idx)
    messages = [{"role": "system", "content": system_prompt(rng, p.system_tokens)}]
    done = 0
    for turn in range(p.turns):
        messages.append({"role": "user", "content": QUESTIONS[(idx + turn) % len(QUESTIONS)]})
        t0 = time.monotonic()
        first: float | None = None
        parts: list[str] = []
        try:
            stream = await client.chat.completions.create(
                model=p.model, messages=messages, max_tokens=p.max_tokens, stream=True,
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


async def run(p: Params) -> dict[str, Any]:
    """Every conversation at once; the figures the JSON reports."""
    try:
        from openai import AsyncOpenAI
    except ImportError:
        raise BurstError("the burst drives the official openai SDK, which is not "
                         "installed here (pip install openai)") from None
    client = AsyncOpenAI(base_url=p.endpoint, api_key=p.api_key or "none", timeout=p.timeout)
    base = p.endpoint.rsplit("/v1", 1)[0]
    before = rejected_total(base)
    ttfts: list[float] = []
    errors: list[str] = []
    t0 = time.monotonic()
    try:
        done = await asyncio.gather(*(chat(client, p, i, ttfts, errors)
                                      for i in range(p.chats)))
    finally:
        await client.close()
    wall = time.monotonic() - t0
    kinds: dict[str, int] = {}
    for e in errors:
        kind = e.split(":", 1)[0]
        kinds[kind] = kinds.get(kind, 0) + 1
    return {
        "chats": p.chats, "turns_per_chat": p.turns, "system_tokens": p.system_tokens,
        "turns_answered": sum(done), "turns_wanted": p.chats * p.turns,
        "errors": len(errors), "error_kinds": kinds, "first_errors": errors[:3],
        "rejected_429": rejected_total(base) - before,
        "ttft_p50_s": percentile(ttfts, 0.5), "ttft_p90_s": percentile(ttfts, 0.9),
        "ttft_max_s": max(ttfts) if ttfts else None, "wall_s": round(wall, 1),
    }
