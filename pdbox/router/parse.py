"""Stage 1, parse: an HTTP request becomes one typed `Call`, or a 4xx.

Everything the later stages read about the request is decided here once:
the body (validated), its kind and upstream path, priority, request id,
session key and the client's forced P/D path. Nothing here touches a worker,
so bad input never reaches one.
"""

from __future__ import annotations

import itertools
import time
import uuid
from dataclasses import dataclass
from typing import Any

from aiohttp import web

from pdbox.router import openai_errors as oe

PATHS = {"chat": "/v1/chat/completions", "completions": "/v1/completions"}
# Request ids: a random prefix per router process and a counter, as unique as a
# uuid4 per request and without its system call.
_RUN = uuid.uuid4().hex[:16]
_SEQ = itertools.count()
BATCH_VLLM_PRIORITY = 10  # vLLM: lower value is served first


@dataclass(slots=True)
class Call:
    """One request as every stage sees it."""

    kind: str  # chat | completions
    body: dict[str, Any]
    max_tokens: int | None
    priority: str  # interactive | batch
    request_id: str
    session_key: str | None
    force: str  # x-pdbox-pd as sent, lower case ("" when absent)
    retried: bool  # the client says it was refused before
    t0: float  # arrival (monotonic)
    raw: bytes = b""  # the body as it came, while `body` still says the same (legs.py)

    @property
    def path(self) -> str:
        return PATHS[self.kind]

    @property
    def stream(self) -> bool:
        return bool(self.body.get("stream"))

    @property
    def forced(self) -> bool:
        """The client chose a P/D path itself (x-pdbox-pd other than auto)."""
        return self.force not in ("", "auto")


class RequestParser:
    def __init__(self, max_body_bytes: int, max_model_len: int, served_names: list[str],
                 priority_scheduling: bool) -> None:
        self.max_body_bytes = max_body_bytes
        self.max_model_len = max_model_len
        self.served_names = served_names
        self.priority_scheduling = priority_scheduling

    async def parse(self, request: web.Request, kind: str, t0: float | None = None) -> Call:
        """The request as a `Call`; raises oe.BadRequest for the client's mistakes."""
        t0 = time.monotonic() if t0 is None else t0
        body, raw = await oe.read_body(request, self.max_body_bytes)
        max_tokens = oe.validate(body, kind, self.max_model_len)
        if body["model"] not in self.served_names:
            raise oe.BadRequest(404, f"The model `{body['model']}` does not exist; "
                                f"this server serves {', '.join(self.served_names)}.",
                                param="model", code="model_not_found")
        headers = request.headers
        priority = priority_of(headers.get("x-pdbox-priority", ""), body)
        user = body.get("user")
        return Call(
            kind=kind, body=body, max_tokens=max_tokens, priority=priority,
            request_id=headers.get("X-Request-Id") or f"pdbox-{_RUN}{next(_SEQ):016x}",
            session_key=headers.get("x-session-id") or (user if isinstance(user, str) else None),
            force=headers.get("x-pdbox-pd", "").strip().lower(),
            retried=_retried(headers.get("x-stainless-retry-count", "")), t0=t0, raw=raw)

    def to_vllm_priority(self, call: Call) -> None:
        """Our own priority field is not vLLM's; pass vLLM an integer only where the
        profile turned priority scheduling on."""
        body = call.body
        if "priority" in body or self.priority_scheduling:
            call.raw = b""  # the body changes: the bytes no longer say it
        if isinstance(body.get("priority"), str):
            body.pop("priority")
        if self.priority_scheduling:
            body["priority"] = BATCH_VLLM_PRIORITY if call.priority == "batch" else 0
        else:
            body.pop("priority", None)


def priority_of(header: str, body: dict[str, Any]) -> str:
    h = header.strip().lower()
    p = body.get("priority")
    if h == "batch" or p == "batch" or (isinstance(p, int) and not isinstance(p, bool) and p > 0):
        return "batch"
    if h not in ("", "interactive", "batch"):
        raise oe.BadRequest(400, "x-pdbox-priority must be 'interactive' or 'batch'.")
    return "interactive"


def _retried(raw: str) -> bool:
    """The client says this is a retry of a request refused before (the openai and
    other Stainless-generated SDKs send their retry count with every attempt)."""
    raw = raw.strip()
    return raw.isdigit() and int(raw) > 0
