"""Time each leg of a P/D request separately, against a plain request on the same worker.

Legs: (1) prefill on the prefill worker with ``do_remote_decode`` and one output
token; (2) on the decode worker, the NIXL pull plus the first decode step (its
time to first streamed token); then the remaining decode. The comparison that
matters for the prefill leg is a plain one-token request of a prompt of the same
length on the same prefill worker, cold (unique text, nothing cached) and warm
(the prompt's prefix already cached).
"""

from __future__ import annotations

import json
import random
import statistics
import time
import urllib.request
import uuid
from dataclasses import dataclass, field
from typing import Any

from pdbox.router.pd import prefill_body

WORDS = ("alpha beta gamma delta river mountain cloud stone paper light shadow garden music "
         "copper violet window harbor meadow lantern orbit canyon ember thistle quartz").split()


def unique_prompt(rng: random.Random, words: int) -> str:
    return f"[{uuid.uuid4().hex}] " + " ".join(rng.choice(WORDS) for _ in range(words))


def _post(url: str, body: dict[str, Any], rid: str, timeout: float = 300) -> tuple[dict, float]:
    req = urllib.request.Request(url, data=json.dumps(body).encode(), headers={
        "Content-Type": "application/json", "X-Request-Id": rid})
    t = time.monotonic()
    with urllib.request.urlopen(req, timeout=timeout) as r:
        out = json.load(r)
    return out, time.monotonic() - t


def _stream_first(url: str, body: dict[str, Any], rid: str, timeout: float = 300
                  ) -> tuple[float, float]:
    body = dict(body, stream=True)
    req = urllib.request.Request(url, data=json.dumps(body).encode(), headers={
        "Content-Type": "application/json", "X-Request-Id": rid})
    t = time.monotonic()
    first = None
    with urllib.request.urlopen(req, timeout=timeout) as r:
        for line in r:
            if first is None and line.startswith(b"data: {"):
                first = time.monotonic() - t
    return first if first is not None else float("nan"), time.monotonic() - t


@dataclass
class LegTimes:
    prompt_tokens: int = 0
    prefill_leg_s: list[float] = field(default_factory=list)
    plain_s: list[float] = field(default_factory=list)
    decode_first_s: list[float] = field(default_factory=list)
    decode_total_s: list[float] = field(default_factory=list)

    def summary(self) -> dict[str, Any]:
        med = statistics.median
        out: dict[str, Any] = {"prompt_tokens": self.prompt_tokens, "n": len(self.prefill_leg_s)}
        if self.prefill_leg_s and self.plain_s:
            out.update(prefill_leg_p50_s=med(self.prefill_leg_s), plain_p50_s=med(self.plain_s),
                       ratio=med(self.prefill_leg_s) / med(self.plain_s))
        if self.decode_first_s:
            out.update(decode_first_token_p50_s=med(self.decode_first_s),
                       decode_total_p50_s=med(self.decode_total_s))
        return out


def measure(prefill_url: str, decode_url: str, model: str, *, words: int = 600, rounds: int = 3,
            warm: bool = False, decode_tokens: int = 8, seed: int = 0) -> LegTimes:
    """Alternate P/D flows and plain requests; `warm` repeats one prompt so both hit the cache."""
    rng = random.Random(seed)
    lt = LegTimes()
    shared = unique_prompt(rng, words)
    if warm:  # fill the prefill worker's prefix cache once
        _post(f"{prefill_url}/v1/completions",
              {"model": model, "prompt": shared, "max_tokens": 1}, uuid.uuid4().hex)
    for _ in range(rounds):
        prompt = shared if warm else unique_prompt(rng, words)
        body = {"model": model, "prompt": prompt, "max_tokens": decode_tokens}
        rid = uuid.uuid4().hex
        out, t1 = _post(f"{prefill_url}/v1/completions", prefill_body(body), rid)
        lt.prompt_tokens = out.get("usage", {}).get("prompt_tokens", 0)
        kv = out.get("kv_transfer_params")
        first, total = _stream_first(f"{decode_url}/v1/completions",
                                     dict(body, kv_transfer_params=kv), rid)
        lt.prefill_leg_s.append(t1)
        lt.decode_first_s.append(first)
        lt.decode_total_s.append(total)
        plain = shared if warm else unique_prompt(rng, words)
        _, t2 = _post(f"{prefill_url}/v1/completions",
                      {"model": model, "prompt": plain, "max_tokens": 1}, uuid.uuid4().hex)
        lt.plain_s.append(t2)
    return lt
