"""The pure part of a moved stream: SSE framing, counting, rewriting, and the
request that continues an answer elsewhere (used by migration.py).

`Splice` is the client's view of one answer across the legs (workers) that
produced it; it touches no socket, so it is tested on bytes alone.
"""

from __future__ import annotations

import json
import time
from typing import Any

# First-leg events kept unparsed up to this many bytes; past it they are read (Splice).
UNREAD_BYTES = 64 * 1024
_decode = json.JSONDecoder().raw_decode  # a str without the bytes sniffing of json.loads


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
