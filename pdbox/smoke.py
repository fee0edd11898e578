"""`pdbox smoke`: scripted end-to-end checks against a running pdbox.

Each check talks to pdbox as a client would (the OpenAI endpoint) or as the
operator would (the control API), and turns what it saw into one
`CheckResult`: ok, failed or skipped, with a one-line detail and its duration.
The results print as a table, JSON or JUnit XML; any failure means a non-zero
exit, so CI can run `pdbox smoke --up` as the proof that a box really serves.

`UpProcess` starts a `pdbox up --headless` of its own for `--up` and stops it
again, process groups and all, also when the checks are interrupted.
"""

from __future__ import annotations

import asyncio
import json
import os
import queue
import random
import signal
import subprocess
import sys
import threading
import time
import uuid
import xml.etree.ElementTree as ET
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import psutil

from pdbox.control_client import ControlClient, ControlError, sse_data
from pdbox.router.metrics import info_label, sum_series

NIXL_COUNT = "vllm:nixl_xfer_time_seconds_count"
# Greedy tokens the P/D correctness check compares (remote P/D against the prefill worker).
GREEDY_TOKENS = 16
# The P/D checks test the remote path itself: on an idle box the decider rightly
# prefills locally (nothing to stall, no transfer to pay), so they ask for remote.
FORCE_REMOTE = {"x-pdbox-pd": "remote"}
# Roles that answer clients; scaling one of them is what the scale check exercises.
SERVING_ROLES = ("decode", "aggregated")
GONE_STATES = ("draining", "stopped")


@dataclass(frozen=True)
class CheckResult:
    name: str
    ok: bool
    detail: str
    seconds: float = 0.0
    skipped: bool = False

    @property
    def status(self) -> str:
        return "skip" if self.skipped else ("ok" if self.ok else "FAIL")

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "ok": self.ok, "detail": self.detail,
                "skipped": self.skipped, "seconds": round(self.seconds, 3)}


class CheckFailed(Exception):
    """A check saw something wrong; str() is the detail."""


class CheckSkipped(Exception):
    """A check does not apply to this pdbox (ok, with the reason as detail)."""


# ----------------------------------------------------------------- prompts

# Plain words tokenize to about 1.2 tokens each with a small BPE vocabulary,
# so N words is a little over N tokens. Random order keeps every prompt
# unique, so no prefix cache can serve it.
_WORDS = (
    "river mountain garden window silver morning quiet letter market bridge winter yellow "
    "orange forest candle engine harbor pocket ladder planet summer button valley circle "
    "island rabbit thunder pencil meadow basket mirror anchor copper feather lantern marble "
    "shadow blanket castle dragon signal tunnel violin wagon saddle pepper ribbon timber "
    "cotton kettle needle orchard pillow puzzle rocket sailor tablet walnut zipper acorn "
    "barrel canyon desert falcon glacier hammer jacket kitten lemon magnet nectar oyster "
    "parrot quartz radish salmon tomato umbrella velvet whistle yogurt zebra cobalt granite"
).split()


def unique_text(words: int, rng: random.Random | None = None) -> str:
    rng = rng or random.Random(uuid.uuid4().int)
    nonce = uuid.UUID(int=rng.getrandbits(128)).hex
    return f"[{nonce}] " + " ".join(rng.choice(_WORDS) for _ in range(words))


def _preview(text: str, n: int = 40) -> str:
    text = " ".join(text.split())
    return repr(text if len(text) <= n else text[: n - 1] + "…")


def _text(answer: Any) -> str:
    try:
        return str(answer["choices"][0]["text"])
    except (KeyError, IndexError, TypeError):
        raise CheckFailed(f"no completion text in {_preview(str(answer))}") from None


def _worker_url(w: dict[str, Any]) -> str | None:
    if isinstance(w.get("url"), str):
        return w["url"].rstrip("/")
    if w.get("port"):
        return f"http://127.0.0.1:{w['port']}"
    return None


# ------------------------------------------------------------------ checks


class Smoke:
    """The checks, against one OpenAI endpoint and (optionally) its control API.

    `clock` and `sleep` are injected so the waits of the scale check can be
    tested without sleeping.
    """

    def __init__(self, endpoint: str, control: ControlClient | None,
                 session: aiohttp.ClientSession, *, scale_timeout_s: float = 600.0,
                 clock: Callable[[], float] = time.monotonic,
                 sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
                 poll_s: float = 2.0):
        self.endpoint = normalize_endpoint(endpoint)
        self.root = self.endpoint[: -len("/v1")]
        self.control = control
        self.http = session
        self.scale_timeout_s = scale_timeout_s
        self.clock = clock
        self.sleep = sleep
        self.poll_s = poll_s
        self.model: str | None = None

    # -- helpers

    async def _model(self) -> str:
        if self.model is None:
            async with self.http.get(f"{self.endpoint}/models") as r:
                data = await r.json(content_type=None)
            self.model = str(data["data"][0]["id"])
        return self.model

    async def _post(self, path: str, body: Any, *, raw: bytes | None = None,
                    content_type: str = "application/json",
                    headers: dict[str, str] | None = None) -> tuple[int, dict[str, str], Any]:
        data = raw if raw is not None else json.dumps(body).encode()
        async with self.http.post(f"{self.endpoint}{path}", data=data,
                                  headers={"Content-Type": content_type, **(headers or {})}) as r:
            text = await r.text()
            try:
                parsed = json.loads(text)
            except ValueError:
                parsed = text
            return r.status, {k.lower(): v for k, v in r.headers.items()}, parsed

    async def _stream(self, path: str, body: dict[str, Any], headers: dict[str, str] | None = None
                      ) -> tuple[int, dict[str, str], list[dict[str, Any]], bool, float | None]:
        """POST a streamed request; (status, headers, chunks, saw [DONE], first-token s)."""
        t0 = self.clock()
        chunks: list[dict[str, Any]] = []
        done = False
        first: float | None = None
        async with self.http.post(f"{self.endpoint}{path}", json=body, headers=headers) as r:
            headers = {k.lower(): v for k, v in r.headers.items()}
            if r.status != 200:
                await r.read()
                return r.status, headers, [], False, None
            async for payload in sse_data(r.content):
                if payload.strip() == "[DONE]":
                    done = True
                    continue
                try:
                    obj = json.loads(payload)
                except ValueError:
                    raise CheckFailed(f"a stream chunk is not JSON: {_preview(payload)}") from None
                if isinstance(obj, dict) and "error" in obj:
                    raise CheckFailed(f"the stream carried an error: {obj['error']}")
                if first is None:
                    first = self.clock() - t0
                chunks.append(obj)
        return r.status, headers, chunks, done, first

    async def _status(self) -> dict[str, Any]:
        assert self.control is not None
        try:
            return await self.control.status()
        except ControlError as exc:
            raise CheckFailed(f"the control API failed: {exc}") from None

    # -- the checks; each returns its detail or raises CheckFailed / CheckSkipped

    async def check_health(self) -> str:
        async with self.http.get(f"{self.root}/health") as r:
            text = await r.text()
        if r.status != 200:
            raise CheckFailed(f"GET /health answered {r.status}: {_preview(text)}")
        return "GET /health 200"

    async def check_models(self) -> str:
        async with self.http.get(f"{self.endpoint}/models") as r:
            status = r.status
            data = await r.json(content_type=None) if status == 200 else await r.text()
        if status != 200:
            raise CheckFailed(f"GET /v1/models answered {status}: {_preview(str(data))}")
        ids = [m.get("id") for m in data.get("data", []) if isinstance(m, dict)] \
            if isinstance(data, dict) else []
        if not ids or not all(isinstance(i, str) for i in ids):
            raise CheckFailed(f"GET /v1/models listed no model: {_preview(json.dumps(data))}")
        self.model = ids[0]
        return f"models: {', '.join(ids)}"

    async def check_completion(self) -> str:
        model = await self._model()
        status, headers, data = await self._post("/completions", {
            "model": model, "prompt": "The capital of France is", "max_tokens": 8,
            "temperature": 0})
        if status != 200:
            raise CheckFailed(f"POST /v1/completions answered {status}: {_preview(str(data), 120)}")
        try:
            text = data["choices"][0]["text"]
            n = int(data["usage"]["completion_tokens"])
        except (KeyError, IndexError, TypeError, ValueError):
            raise CheckFailed(f"not a completion: {_preview(json.dumps(data), 120)}") from None
        if not isinstance(text, str) or not text.strip() or n < 1:
            raise CheckFailed(f"an empty completion ({n} tokens)")
        where = f" on {headers['x-pdbox-decode-worker']}" if "x-pdbox-decode-worker" in headers \
            else ""
        return f"{n} tokens{where}: {_preview(text)}"

    async def check_stream_chat(self) -> str:
        model = await self._model()
        status, headers, chunks, done, first = await self._stream("/chat/completions", {
            "model": model, "stream": True, "max_tokens": 16, "temperature": 0,
            "messages": [{"role": "user", "content": "Say hello in one short sentence."}]})
        if status != 200:
            raise CheckFailed(f"POST /v1/chat/completions (stream) answered {status}")
        if not headers.get("content-type", "").startswith("text/event-stream"):
            raise CheckFailed(f"the stream is labelled {headers.get('content-type')!r}, "
                              "not text/event-stream")
        text = ""
        pieces = 0
        for c in chunks:
            for ch in c.get("choices") or []:
                delta = (ch.get("delta") or {}).get("content")
                if isinstance(delta, str) and delta:
                    text += delta
                    pieces += 1
        if not done:
            raise CheckFailed(f"the stream ended without data: [DONE] after {len(chunks)} chunks")
        if pieces == 0:
            raise CheckFailed(f"the stream carried no content in {len(chunks)} chunks")
        ttft = f", first chunk after {first:.2f} s" if first is not None else ""
        return f"{pieces} content chunks{ttft}: {_preview(text)}"

    async def check_bad_input(self) -> str:
        model = await self._model()
        cases = [
            ("malformed JSON", 400, b'{"model": "x", "messages": [', "application/json"),
            ("unknown model", 404, json.dumps({
                "model": f"no-such-model-{uuid.uuid4().hex[:6]}",
                "messages": [{"role": "user", "content": "hi"}]}).encode(),
             "application/json"),
            ("wrong content type", 415, json.dumps({
                "model": model, "messages": [{"role": "user", "content": "hi"}]}).encode(),
             "text/plain"),
        ]
        wrong: list[str] = []
        seen: list[str] = []
        for label, want, raw, ctype in cases:
            status, _, data = await self._post("/chat/completions", None, raw=raw,
                                               content_type=ctype)
            err = data.get("error") if isinstance(data, dict) else None
            shaped = isinstance(err, dict) and isinstance(err.get("message"), str) \
                and isinstance(err.get("type"), str)
            if status != want:
                wrong.append(f"{label}: {status}, want {want}")
            elif not shaped:
                wrong.append(f"{label}: {status} without an OpenAI error body "
                             f"({_preview(str(data))})")
            else:
                seen.append(f"{label} {status}")
        if wrong:
            raise CheckFailed("; ".join(wrong))
        return ", ".join(seen) + " (OpenAI error bodies)"

    async def check_prefix_hit(self) -> str:
        model = await self._model()
        system = ("You are a careful assistant. Reference notes follow. "
                  + unique_text(250))
        body = {"model": model, "max_tokens": 4, "temperature": 0, "messages": [
            {"role": "system", "content": system},
            {"role": "user", "content": "Name one word from the notes."}]}
        got: list[tuple[int, int, str]] = []
        for _ in range(2):
            status, headers, data = await self._post("/chat/completions", body)
            if status != 200:
                raise CheckFailed(f"POST /v1/chat/completions answered {status}: "
                                  f"{_preview(str(data), 120)}")
            usage = (data.get("usage") if isinstance(data, dict) else None) or {}
            details = usage.get("prompt_tokens_details") or {}
            cached = details.get("cached_tokens") if isinstance(details, dict) else None
            if not isinstance(cached, int):
                raise CheckFailed("usage.prompt_tokens_details.cached_tokens is missing "
                                  f"(usage: {json.dumps(usage)})")
            got.append((int(usage.get("prompt_tokens") or 0), cached,
                        headers.get("x-pdbox-decode-worker", "?")))
        (n, c1, w1), (_, c2, w2) = got
        detail = f"{n} prompt tokens; cached {c1} then {c2} ({w1}, then {w2})"
        if c2 <= 0:
            raise CheckFailed(detail)
        return detail

    async def check_pd(self) -> str:
        if self.control is None:
            raise CheckSkipped("no control API (the endpoint is not this PDBOX_HOME's pdbox)")
        snap = await self._status()
        if snap.get("mode") != "pd":
            raise CheckSkipped("not a P/D profile")
        decoders = {w["id"]: _worker_url(w) for w in snap.get("workers", [])
                    if w.get("role") == "decode" and w.get("state") == "ready"}
        decoders = {k: v for k, v in decoders.items() if v}
        if not decoders:
            raise CheckFailed("no ready decode worker in the status snapshot")
        model = await self._model()
        reasons: list[str] = []
        words = 500
        for attempt in range(1, 4):
            before = {wid: await self._nixl_count(url) for wid, url in decoders.items()}
            status, headers, chunks, done, _ = await self._stream("/completions", {
                "model": model, "prompt": unique_text(words), "max_tokens": 4,
                "temperature": 0, "stream": True}, FORCE_REMOTE)
            if status != 200 or not done or not chunks:
                raise CheckFailed(f"the long streamed completion failed (status {status}, "
                                  f"{len(chunks)} chunks, [DONE] {'seen' if done else 'missing'})")
            pd = headers.get("x-pdbox-pd", "")
            reason = headers.get("x-pdbox-pd-reason", "")
            wid = headers.get("x-pdbox-decode-worker", "")
            if pd != "remote":
                reasons.append(f"try {attempt} ({words} words): {pd or 'no x-pdbox-pd'}: {reason}")
                words = int(words * 1.6)
                continue
            url = decoders.get(wid)
            if url is None:
                raise CheckFailed(f"remote P/D on {wid!r}, a worker the status did not list")
            moved = await self._wait_nixl(url, before.get(wid, 0.0))
            pre = headers.get("x-pdbox-prefill-worker", "?")
            if moved <= 0:
                raise CheckFailed(f"x-pdbox-pd: remote ({pre} → {wid}) but {NIXL_COUNT} on {wid} "
                                  f"stayed at {before.get(wid, 0.0):g}; reason: {reason}")
            return (f"remote on try {attempt} ({pre} → {wid}), NIXL transfers +{moved:g}; "
                    f"reason: {reason}")
        raise CheckFailed("the router prefilled locally every time: " + " | ".join(reasons))

    async def check_pd_greedy(self) -> str:
        """A remote P/D answer is the answer: greedy tokens equal the prefill worker's own.

        The prompt goes through the router until it is prefilled remotely, then
        straight to the prefill worker that prefilled it, both at temperature 0
        with `ignore_eos`, and the first GREEDY_TOKENS tokens must be equal. A
        garbled KV transfer changes them. Each request runs with nothing else
        in flight: on a CPU, bf16 results depend on the batch, so greedy
        answers may part ways under load without anything being wrong.
        """
        if self.control is None:
            raise CheckSkipped("no control API (the endpoint is not this PDBOX_HOME's pdbox)")
        snap = await self._status()
        if snap.get("mode") != "pd":
            raise CheckSkipped("not a P/D profile")
        prefills = {w["id"]: _worker_url(w) for w in snap.get("workers", [])
                    if w.get("role") == "prefill" and w.get("state") == "ready"}
        if not any(prefills.values()):
            raise CheckFailed("no ready prefill worker in the status snapshot")
        model = await self._model()
        reasons: list[str] = []
        words = 400
        some_url = next(u for u in prefills.values() if u)
        for attempt in range(1, 4):
            await self._wait_idle()
            prompt = await self._aligned_prompt(some_url, model, unique_text(words))
            body = {"model": model, "prompt": prompt, "max_tokens": GREEDY_TOKENS,
                    "temperature": 0, "ignore_eos": True}
            status, headers, data = await self._post("/completions", body, headers=FORCE_REMOTE)
            if status != 200:
                raise CheckFailed(f"the greedy completion failed: {status} {_preview(str(data))}")
            if headers.get("x-pdbox-pd") != "remote":
                reasons.append(f"try {attempt} ({words} words): "
                               f"{headers.get('x-pdbox-pd-reason') or 'no reason'}")
                words = int(words * 1.6)
                continue
            pre = headers.get("x-pdbox-prefill-worker", "")
            url = prefills.get(pre)
            if not url:
                raise CheckFailed(f"remote P/D through {pre!r}, a worker the status did not list")
            await self._wait_idle()
            async with self.http.post(f"{url}/v1/completions", json=body) as r:
                alone = await r.json(content_type=None)
                if r.status != 200:
                    raise CheckFailed(f"{pre} alone answered {r.status}: {_preview(str(alone))}")
            got, want = _text(data), _text(alone)
            n = (data.get("usage") or {}).get("completion_tokens")
            if got != want:
                at = next((i for i, (a, b) in enumerate(zip(got, want, strict=False)) if a != b),
                          min(len(got), len(want)))
                raise CheckFailed(f"remote P/D ({pre} → {headers.get('x-pdbox-decode-worker')}) "
                                  f"answered {_preview(got)}, {pre} alone {_preview(want)}: "
                                  f"they part at character {at}")
            if n is not None and n < GREEDY_TOKENS:
                raise CheckFailed(f"only {n} tokens came back; {GREEDY_TOKENS} were asked for")
            return (f"remote on try {attempt} ({pre} → {headers.get('x-pdbox-decode-worker')}) "
                    f"and {pre} alone agree on {n or GREEDY_TOKENS} greedy tokens: {_preview(got)}")
        raise CheckFailed("the router prefilled locally every time: " + " | ".join(reasons))

    async def _aligned_prompt(self, url: str, model: str, text: str) -> str | list[int]:
        """The text's token ids cut to k whole KV blocks plus one token.

        Then both paths compute exactly one prompt token over the same KV: the
        decode worker over the blocks it pulled, the prefill worker over the
        same blocks from its prefix cache. Any other length leaves a partial
        block that one side recomputes in a pass of another shape, and on a CPU
        bf16 results follow the shape, so a near tie may flip a greedy token
        without anything being wrong. Falls back to the text when the worker
        does not say its block size or cannot tokenize.
        """
        try:
            async with self.http.get(f"{url}/metrics") as r:
                block_size = info_label(await r.text(), "vllm:cache_config_info", "block_size")
            async with self.http.post(f"{url}/tokenize",
                                      json={"model": model, "prompt": text}) as r:
                ids = (await r.json(content_type=None)).get("tokens") if r.status == 200 else None
        except (TimeoutError, aiohttp.ClientError, ValueError, AttributeError):
            return text
        if not (block_size or "").isdigit() or not isinstance(ids, list) \
                or not all(isinstance(i, int) for i in ids):
            return text
        block = int(block_size)
        whole = (len(ids) - 1) // block
        if whole < 1:
            return text
        return ids[: whole * block + 1]

    async def _wait_idle(self, within_s: float = 60.0) -> None:
        """Wait until no worker has requests (the comparison needs an unbatched request)."""
        deadline = self.clock() + within_s
        while True:
            snap = await self._status()
            busy = [w["id"] for w in snap.get("workers", [])
                    if (w.get("running") or 0) + (w.get("queue") or 0) + (w.get("inflight") or 0)]
            if not busy:
                return
            if self.clock() >= deadline:
                raise CheckFailed(f"{', '.join(busy)} stayed busy for {within_s:g} s: the greedy "
                                  "comparison needs a request with nothing batched beside it")
            await self.sleep(self.poll_s / 4)

    async def _nixl_count(self, url: str) -> float:
        try:
            async with self.http.get(f"{url}/metrics") as r:
                text = await r.text()
        except (TimeoutError, aiohttp.ClientError) as exc:
            raise CheckFailed(f"could not read {url}/metrics: {exc}") from None
        return sum_series(text, NIXL_COUNT)

    async def _wait_nixl(self, url: str, before: float, within_s: float = 15.0) -> float:
        """vLLM publishes transfer stats with its engine's next stats tick: allow a few seconds."""
        deadline = self.clock() + within_s
        while True:
            moved = await self._nixl_count(url) - before
            if moved > 0 or self.clock() >= deadline:
                return moved
            await self.sleep(0.5)

    async def check_scale(self) -> str:
        if self.control is None:
            raise CheckSkipped("no control API (the endpoint is not this PDBOX_HOME's pdbox)")
        snap = await self._status()
        roles = (snap.get("autoscaler") or {}).get("roles") or {}
        role = next((r for r in SERVING_ROLES if r in roles), None)
        if role is None:
            raise CheckSkipped("the status lists no decode or aggregated role")
        mine = [w for w in snap.get("workers", []) if w.get("role") == role]
        if mine and all(w.get("slice") == "attached" for w in mine):
            raise CheckSkipped("workers attached with --attach are not scaled by pdbox")
        info = roles[role]
        current = sum(1 for w in mine if w.get("state") not in GONE_STATES)
        top = int(info.get("max") or 0)
        if current >= top:
            raise CheckSkipped(f"{role} already has {current} of at most {top} workers")
        before_ids = {w["id"] for w in mine}
        notes: list[str] = []
        t0 = self.clock()
        try:
            await self._scale(role, current + 1)
            new = await self._wait(
                f"{role} {current}→{current + 1}",
                lambda s: self._new_ready(s, role, before_ids))
            t_up = self.clock() - t0
            notes.append(f"{role} {current}→{current + 1}: {new} ready in {t_up:.1f} s")
            served = []
            for i in range(2):
                status, headers, data = await self._post("/completions", {
                    "model": await self._model(), "prompt": f"Count to {i + 3}:",
                    "max_tokens": 4, "temperature": 0})
                if status != 200:
                    raise CheckFailed(f"a request with {current + 1} {role} workers answered "
                                      f"{status}: {_preview(str(data), 120)}")
                served.append(headers.get("x-pdbox-decode-worker", "?"))
            notes.append(f"requests served by {', '.join(served)}")
            t1 = self.clock()
            await self._scale(role, current)
            await self._wait(f"{role} {current + 1}→{current}",
                             lambda s: self._gone(s, role, new, current))
            notes.append(f"{current + 1}→{current} in {self.clock() - t1:.1f} s")
        finally:
            try:
                await self._scale(role, "auto")
                notes.append("back to auto")
            except CheckFailed:
                pass
        return "; ".join(notes)

    async def _scale(self, role: str, n: int | str) -> None:
        assert self.control is not None
        try:
            await self.control.scale(role, n)
        except ControlError as exc:
            raise CheckFailed(f"scale {role} to {n} was refused: {exc}") from None

    async def _wait(self, what: str, done: Callable[[dict[str, Any]], Any]) -> Any:
        deadline = self.clock() + self.scale_timeout_s
        while True:
            got = done(await self._status())
            if got:
                return got
            if self.clock() >= deadline:
                raise CheckFailed(f"{what} did not finish within {self.scale_timeout_s:g} s")
            await self.sleep(self.poll_s)

    @staticmethod
    def _new_ready(snap: dict[str, Any], role: str, before: set[str]) -> str | None:
        for w in snap.get("workers", []):
            if w.get("role") == role and w.get("id") not in before:
                if w.get("state") == "ready":
                    return str(w["id"])
                if w.get("state") == "failed":
                    raise CheckFailed(f"the new {role} worker {w['id']} failed to start")
        return None

    @staticmethod
    def _gone(snap: dict[str, Any], role: str, wid: str, want: int) -> bool:
        """The drained worker has stopped (or left the snapshot) and `want` remain."""
        ws = [w for w in snap.get("workers", []) if w.get("role") == role]
        alive = [w for w in ws if w.get("state") not in GONE_STATES]
        stopped = all(w.get("state") == "stopped" for w in ws if w.get("id") == wid)
        return stopped and len(alive) == want


# The order is deliberate: cheap checks first, so a broken box fails fast; the
# P/D check after the streamed chat, from which the router has learnt how
# slowly the decode worker prefills; scaling last, as it disturbs the box.
CHECKS: tuple[tuple[str, str], ...] = (
    ("health", "check_health"),
    ("models", "check_models"),
    ("completion", "check_completion"),
    ("stream_chat", "check_stream_chat"),
    ("bad_input", "check_bad_input"),
    ("prefix_hit", "check_prefix_hit"),
    ("pd_transfer", "check_pd"),
    ("pd_greedy", "check_pd_greedy"),
    ("scale", "check_scale"),
)


def normalize_endpoint(url: str) -> str:
    url = url.rstrip("/")
    return url if url.endswith("/v1") else url + "/v1"


async def run_checks(
    endpoint: str,
    control: ControlClient | None,
    *,
    names: Sequence[str] | None = None,
    request_timeout_s: float = 300.0,
    scale_timeout_s: float = 600.0,
    on_start: Callable[[str], None] = lambda name: None,
    clock: Callable[[], float] = time.monotonic,
) -> list[CheckResult]:
    """Run the checks in order; an exception in one check fails that check only."""
    timeout = aiohttp.ClientTimeout(total=request_timeout_s, sock_connect=10)
    results: list[CheckResult] = []
    async with aiohttp.ClientSession(timeout=timeout) as session:
        smoke = Smoke(endpoint, control, session, scale_timeout_s=scale_timeout_s, clock=clock)
        for name, attr in CHECKS:
            if names is not None and name not in names:
                continue
            on_start(name)
            t0 = clock()
            try:
                detail = await getattr(smoke, attr)()
                results.append(CheckResult(name, True, detail, clock() - t0))
            except CheckSkipped as exc:
                results.append(CheckResult(name, True, str(exc), clock() - t0, skipped=True))
            except CheckFailed as exc:
                results.append(CheckResult(name, False, str(exc), clock() - t0))
            except TimeoutError:
                results.append(CheckResult(name, False, f"no answer within {request_timeout_s:g} s",
                                           clock() - t0))
            except aiohttp.ClientError as exc:
                results.append(CheckResult(name, False, f"HTTP failed: {exc}", clock() - t0))
            except (KeyError, IndexError, TypeError, ValueError) as exc:
                results.append(CheckResult(name, False, f"unexpected answer: {exc!r}",
                                           clock() - t0))
    if control is not None:
        await control.close()
    return results


# ------------------------------------------------------------------ output


def exit_code(results: Sequence[CheckResult]) -> int:
    return 0 if results and all(r.ok for r in results) else 1


def render_table(results: Sequence[CheckResult]) -> str:
    width = max([len("check")] + [len(r.name) for r in results])
    lines = [f"{'check':<{width}}  {'result':<6}  {'seconds':>8}  detail"]
    for r in results:
        lines.append(f"{r.name:<{width}}  {r.status:<6}  {r.seconds:>8.2f}  {r.detail}")
    failed = sum(1 for r in results if not r.ok)
    skipped = sum(1 for r in results if r.skipped)
    passed = len(results) - failed - skipped
    lines.append("")
    lines.append(f"{passed} passed, {failed} failed, {skipped} skipped")
    return "\n".join(lines)


def to_json(results: Sequence[CheckResult], extra: dict[str, Any] | None = None
            ) -> dict[str, Any]:
    out: dict[str, Any] = {"checks": [r.to_dict() for r in results]}
    if extra:
        out.update(extra)
    return out


def to_junit(results: Sequence[CheckResult], suite: str = "pdbox smoke") -> str:
    failures = sum(1 for r in results if not r.ok)
    skipped = sum(1 for r in results if r.skipped)
    total = sum(r.seconds for r in results)
    root = ET.Element("testsuites", name=suite, tests=str(len(results)),
                      failures=str(failures), errors="0", skipped=str(skipped),
                      time=f"{total:.3f}")
    ts = ET.SubElement(root, "testsuite", name=suite, tests=str(len(results)),
                       failures=str(failures), errors="0", skipped=str(skipped),
                       time=f"{total:.3f}",
                       timestamp=time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime()))
    for r in results:
        tc = ET.SubElement(ts, "testcase", classname="pdbox.smoke", name=r.name,
                           time=f"{r.seconds:.3f}")
        if not r.ok:
            ET.SubElement(tc, "failure", message=r.detail, type="CheckFailed").text = r.detail
        elif r.skipped:
            ET.SubElement(tc, "skipped", message=r.detail)
        else:
            ET.SubElement(tc, "system-out").text = r.detail
    ET.indent(root)
    return '<?xml version="1.0" encoding="utf-8"?>\n' + ET.tostring(root, encoding="unicode") \
        + "\n"


# ------------------------------------------------------------- pdbox up


class UpFailed(Exception):
    """The pdbox started for the checks did not come up; str() says why."""


class UpProcess:
    """A `pdbox up --headless` child in its own process group, stopped without orphans.

    The workers run in process groups of their own, which a signal to the
    pdbox's group does not reach; pdbox stops them on SIGTERM. If it does not
    exit within the grace period, its group is killed and so are the worker
    groups recorded in its state.json (by leader start time, never a reused pid).
    """

    def __init__(self, profile: str | None, *, env: dict[str, str] | None = None,
                 stop_grace_s: float = 120.0, settle_s: float = 10.0,
                 echo: Callable[[str], None] | None = None):
        self.profile = profile
        self.env = env if env is not None else dict(os.environ)
        self.stop_grace_s = stop_grace_s
        self.settle_s = settle_s
        self.echo = echo
        self.proc: subprocess.Popen[str] | None = None
        self.endpoint: str | None = None
        self.stderr_tail: deque[str] = deque(maxlen=20)
        self._lines: queue.Queue[str | None] = queue.Queue()
        self._state: dict[str, Any] = {}

    def argv(self) -> list[str]:
        argv = [sys.executable, "-m", "pdbox.cli", "up", "--headless", "--port", "0"]
        if self.profile:
            argv += ["--profile", self.profile]
        return argv

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None else None

    def start(self) -> None:
        self.proc = subprocess.Popen(
            self.argv(), env=self.env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
            stderr=subprocess.PIPE, text=True, bufsize=1, start_new_session=True)
        threading.Thread(target=self._read_stdout, daemon=True).start()
        threading.Thread(target=self._read_stderr, daemon=True).start()

    def _read_stdout(self) -> None:
        assert self.proc is not None and self.proc.stdout is not None
        for line in self.proc.stdout:
            self._lines.put(line.strip())
        self._lines.put(None)

    def _read_stderr(self) -> None:
        assert self.proc is not None and self.proc.stderr is not None
        for line in self.proc.stderr:
            line = line.rstrip("\n")
            self.stderr_tail.append(line)
            if self.echo is not None:
                self.echo(line)

    def wait_ready(self, timeout_s: float) -> str:
        """The endpoint line `pdbox up` prints when it serves, or UpFailed."""
        deadline = time.monotonic() + timeout_s
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise UpFailed(f"pdbox up was not ready within {timeout_s:g} s"
                               + self._last_words())
            try:
                line = self._lines.get(timeout=min(left, 1.0))
            except queue.Empty:
                continue
            if line is None:
                assert self.proc is not None
                try:
                    how = f"exited with code {self.proc.wait(timeout=30)}"
                except subprocess.TimeoutExpired:
                    how = "closed its output"
                raise UpFailed(f"pdbox up {how} before it was ready" + self._last_words())
            if line.startswith(("http://", "https://")):
                self.endpoint = line
                return line

    def _last_words(self) -> str:
        lines = [x for x in self.stderr_tail if x.strip()]
        return f": {lines[-1]}" if lines else ""

    def remember_state(self, state: dict[str, Any]) -> None:
        """The run folder's state (worker groups) as last read, for the SIGKILL path."""
        self._state = state

    def stop(self) -> StopResult:
        """SIGTERM the group and wait; then SIGKILL whatever is left of it or of its workers."""
        if self.proc is None:
            return StopResult(None, 0.0, [])
        state = self._read_state() or self._state
        groups = {self.proc.pid} | {int(w["pgid"]) for w in state.get("workers", [])
                                    if isinstance(w, dict) and w.get("pgid")}
        t0 = time.monotonic()
        forced = False
        _killpg(self.proc.pid, signal.SIGTERM)
        try:
            code: int | None = self.proc.wait(timeout=self.stop_grace_s)
        except subprocess.TimeoutExpired:
            forced = True
            _killpg(self.proc.pid, signal.SIGKILL)
            try:
                code = self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                code = None
        # pdbox SIGKILLs each worker group as it stops; give the last members a
        # moment to go before calling them left behind.
        deadline = time.monotonic() + (0.0 if forced else self.settle_s)
        while live_members(groups) and time.monotonic() < deadline:
            time.sleep(0.2)
        left = []
        for p in live_members(groups):
            try:
                left.append(f"{p.name()} (pid {p.pid})")
                p.kill()
            except psutil.Error:
                continue
        return StopResult(code, time.monotonic() - t0, left, forced)

    def _read_state(self) -> dict[str, Any]:
        from pdbox import paths, runfolder

        try:
            state = json.loads((paths.run_dir() / runfolder.STATE).read_text())
        except (OSError, ValueError):
            return {}
        return state if isinstance(state, dict) and state.get("pid") == self.pid else {}


@dataclass(frozen=True)
class StopResult:
    code: int | None  # pdbox's exit code; None if it never started or would not die
    seconds: float
    left: list[str]  # processes still alive after pdbox exited, now killed
    forced: bool = False  # pdbox itself had to be SIGKILLed

    @property
    def clean(self) -> bool:
        return self.code == 0 and not self.left and not self.forced


def live_members(pgids: set[int]) -> list[psutil.Process]:
    """Processes of these groups that still run (zombies only wait to be reaped)."""
    out = []
    for p in psutil.process_iter(["status"]):
        try:
            if p.info["status"] == psutil.STATUS_ZOMBIE:
                continue
            if os.getpgid(p.pid) in pgids:
                out.append(p)
        except (psutil.Error, OSError):
            continue
    return out


def _killpg(pgid: int, sig: int) -> None:
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def write_junit(path: Path, results: Sequence[CheckResult]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(to_junit(results))
