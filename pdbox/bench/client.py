"""One streamed completion, timed event by event: the client every workload uses.

Figures are client-side on purpose: they include the router, admission and
the network, as a user of the box sees them.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import aiohttp


@dataclass
class Req:
    kind: str  # the workload's name for it: stream | long | warm | trace
    sent: float
    ttft: float | None = None
    events: list[float] = field(default_factory=list)  # arrival time of each token event
    pd: str = ""  # the router's x-pdbox-* headers: where the request went and why
    reason: str = ""
    decode: str = ""
    prefill: str = ""
    prompt_tokens: int = 0
    completion_tokens: int | None = None  # from the usage chunk, when one came
    cached_tokens: int | None = None  # prompt tokens the worker found cached (usage details)
    pieces: list[str] = field(default_factory=list)  # the answer's text, chunk by chunk
    status: int = 0  # HTTP status; 0 before an answer
    done: bool = False  # the answer ended normally (finish_reason or [DONE])
    error: str = ""  # "cancelled" when the workload cut it off

    @property
    def text(self) -> str:
        """The answer as received (a multi-turn workload sends it back as history)."""
        return "".join(self.pieces)

    @property
    def tokens(self) -> int:
        """Output tokens received: the server's count when it gave one."""
        return self.completion_tokens if self.completion_tokens is not None else len(self.events)


def _token_event(d: dict[str, Any]) -> bool:
    """True for a chunk that carries an output token. A completion chunk with
    empty text still does while the answer runs (a multi-byte character split
    over tokens), but not as the closing chunk; a chat chunk with no content
    (the role chunk) does not."""
    ch = d.get("choices") or []
    if not ch:
        return False
    c = ch[0]
    if "text" in c:
        return bool(c["text"]) or c.get("finish_reason") is None
    return bool((c.get("delta") or {}).get("content"))


def _piece(d: dict[str, Any]) -> str:
    c = d["choices"][0]
    return c.get("text") or (c.get("delta") or {}).get("content") or ""


async def stream(session: aiohttp.ClientSession, url: str, body: dict[str, Any], kind: str,
                 sink: list[Req] | None = None,
                 clock: Callable[[], float] = time.monotonic) -> Req:
    """POST `body` streamed; every SSE event's arrival time is recorded.

    The Req goes into `sink` at once, so a request cancelled at the end of a
    window still counts the events it received.
    """
    r = Req(kind, clock())
    if sink is not None:
        sink.append(r)
    body = dict(body, stream=True, stream_options={"include_usage": True})
    try:
        async with session.post(url, json=body) as resp:
            h = resp.headers
            r.status = resp.status
            r.pd, r.reason = h.get("x-pdbox-pd", ""), h.get("x-pdbox-pd-reason", "")
            r.decode = h.get("x-pdbox-decode-worker", "")
            r.prefill = h.get("x-pdbox-prefill-worker", "")
            if resp.status != 200:
                r.error = f"{resp.status}: {(await resp.text())[:200]}"
                return r
            async for line in resp.content:
                if line.startswith(b"data: [DONE]"):
                    r.done = True
                    continue
                if not line.startswith(b"data: {"):
                    continue
                now = clock()
                d = json.loads(line[6:])
                if d.get("usage"):
                    usage = d["usage"]
                    r.prompt_tokens = usage.get("prompt_tokens", 0) or 0
                    r.completion_tokens = usage.get("completion_tokens")
                    r.cached_tokens = (usage.get("prompt_tokens_details") or {}).get(
                        "cached_tokens")
                if _token_event(d):
                    if r.ttft is None:
                        r.ttft = now - r.sent
                    r.events.append(now)
                    r.pieces.append(_piece(d))
                ch = d.get("choices") or []
                if ch and ch[0].get("finish_reason"):
                    r.done = True
            if not r.done:
                r.error = "the answer ended before its last token"
    except asyncio.CancelledError:
        r.error = "cancelled"
        raise
    except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
        r.error = str(exc) or type(exc).__name__
        r.done = False
    return r


async def served_model(session: aiohttp.ClientSession, endpoint: str) -> str:
    """The first model the endpoint serves (`endpoint` ends in /v1)."""
    async with session.get(f"{endpoint}/models") as resp:
        return (await resp.json())["data"][0]["id"]
