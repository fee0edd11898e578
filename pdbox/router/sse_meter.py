"""Counting the tokens of an OpenAI SSE stream as it passes through the router.

A network read may hold several SSE events, or part of one; counting reads
(or `data: ` strings, which include the role chunk, the usage chunk and
`[DONE]`) is not counting tokens. The meter splits the stream into whole
events and counts, per event, the choices that carry generated output. The
stream's usage chunk, which the router asks the worker for when the client
did not, gives the exact total at the end; the router then drops that chunk
from the client's stream, so the client sees what it asked for.

Pure code: bytes in, bytes and counts out.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

_EVENT_END = re.compile(rb"\r?\n\r?\n")
_decode = json.JSONDecoder().raw_decode  # a str without the bytes sniffing of json.loads


@dataclass
class Read:
    """What one network read held."""

    forward: bytes  # the bytes to send on to the client (whole events only)
    tokens: int  # token events among them


def wants_usage(body: dict[str, Any]) -> bool:
    opts = body.get("stream_options")
    return isinstance(opts, dict) and opts.get("include_usage") is True


def with_usage(body: dict[str, Any]) -> dict[str, Any]:
    """The request as sent to the worker: a stream that ends with its usage chunk."""
    opts = body.get("stream_options")
    out = dict(body)
    out["stream_options"] = {**(opts if isinstance(opts, dict) else {}), "include_usage": True}
    return out


def choice_tokens(choice: Any) -> int:
    """1 when a streamed choice carries generated output (text, content, reasoning, a tool call).

    vLLM sends one event per engine step and skips steps whose text is held
    back (an incomplete UTF-8 sequence), so an event is one token in the
    common case; the usage chunk corrects the total at the end.
    """
    if not isinstance(choice, dict):
        return 0
    if choice.get("text"):
        return 1
    delta = choice.get("delta")
    if isinstance(delta, dict) and (delta.get("content") or delta.get("reasoning_content")
                                    or delta.get("reasoning") or delta.get("tool_calls")):
        return 1
    return 0


_STRING_VALUES = (b'"content":"', b'"text":"', b'"reasoning_content":"', b'"reasoning":"')


def quick_tokens(event: bytes) -> int | None:
    """`choice_tokens` of a one-choice event in compact JSON (vLLM's form), read
    without parsing it; None when only a parse can tell.

    Exact because of how JSON escapes strings: inside a string every quote is
    preceded by a backslash, so `"content":"` can only be the key `content`
    with a string value, and `"content":""` only an empty one. A usage chunk,
    several choices (or tool calls, whose entries have an index too), an error
    event, spaces after colons or a multi-line event go to the parser.
    """
    if not event.startswith(b"data: {") or b"\n" in event or b'"usage"' in event \
            or b'": ' in event or event.count(b'"index":') != 1 \
            or b'"choices":[{' not in event:
        return None
    for key in _STRING_VALUES:
        i = event.find(key)
        if i >= 0 and event[i + len(key):i + len(key) + 1] != b'"':
            return 1
    return 0


_EMPTY_VALUES = tuple(key + b'"' for key in _STRING_VALUES)


def quick_read_tokens(whole: bytes) -> int | None:
    """`choice_tokens` summed over a read of whole events of one choice each, in
    compact JSON, with a few substring counts over the read instead of a loop
    over its events; None when only a parse can tell.

    The caller vouches for one choice per event (the request asked for one:
    vLLM then sends one per event). Then, as `quick_tokens` says, `"content":"`
    and `"text":"` can only be a choice's output, each event holds at most one
    of them, and the empty ones end in `""`. Usage chunks, reasoning, tool
    calls and spaced-out JSON are left to the parser.
    """
    if b'"usage"' in whole or b'": ' in whole or b'"reasoning' in whole \
            or b'"tool_calls"' in whole:
        return None
    n = whole.count(b'"content":"')
    if n:
        n -= whole.count(b'"content":""')
    t = whole.count(b'"text":"')
    if t:
        n += t - whole.count(b'"text":""')
    return n


class SseMeter:
    """Splits a stream into whole events and counts their tokens, one parse per event.

    The common case (events ending in a blank line, no carriage returns) is
    split with one `rfind` and one `split`, and forwarded without a copy when
    nothing is dropped; anything else takes the general path.
    """

    def __init__(self, strip_usage: bool = False, one_choice: bool = False) -> None:
        self.strip_usage = strip_usage
        # the request asked for one choice, so each event carries one (quick_read_tokens)
        self.one_choice = one_choice
        self.tokens = 0  # token events counted so far
        self.usage_tokens: int | None = None  # usage.completion_tokens, once seen
        self.engine_metrics: dict[str, Any] | None = None  # vLLM per-request metrics, if sent
        self._buf = b""

    def feed(self, chunk: bytes) -> Read:
        buf = self._buf + chunk if self._buf else chunk
        if b"\r" in buf:
            return self._feed_any(buf)
        end = buf.rfind(b"\n\n")
        if end < 0:
            self._buf = buf
            return Read(b"", 0)
        whole, self._buf = buf[:end + 2], buf[end + 2:]
        quick = quick_read_tokens(whole) if self.one_choice else None
        if quick is not None:
            self.tokens += quick
            return Read(whole, quick)
        events = whole.split(b"\n\n")
        events.pop()  # the empty tail after the last blank line
        tokens = 0
        kept: list[bytes] | None = None  # set once an event is dropped
        for i, event in enumerate(events):
            n, keep = self._event(event)
            tokens += n
            if not keep and kept is None:
                kept = events[:i]
            elif keep and kept is not None:
                kept.append(event)
        if kept is not None:
            whole = b"".join(e + b"\n\n" for e in kept)
        self.tokens += tokens
        return Read(whole, tokens)

    def _feed_any(self, buf: bytes) -> Read:
        out: list[bytes] = []
        tokens = 0
        start = 0
        for m in _EVENT_END.finditer(buf):
            event = buf[start:m.end()]
            start = m.end()
            n, keep = self._event(event)
            tokens += n
            if keep:
                out.append(event)
        self._buf = buf[start:]
        self.tokens += tokens
        return Read(b"".join(out), tokens)

    def close(self) -> bytes:
        """Whatever trails the last whole event (a stream cut short): passed on as is."""
        rest, self._buf = self._buf, b""
        return rest

    @property
    def total_tokens(self) -> int:
        """The stream's completion tokens: its usage when it gave one, else the events counted."""
        return self.usage_tokens if self.usage_tokens is not None else self.tokens

    def _event(self, event: bytes) -> tuple[int, bool]:
        quick = quick_tokens(event)
        if quick is not None:
            return quick, True
        obj = self._parse(event)
        if obj is None:
            return 0, True
        choices = obj.get("choices")
        usage = obj.get("usage")
        if isinstance(usage, dict) and isinstance(usage.get("completion_tokens"), int):
            self.usage_tokens = usage["completion_tokens"]
            if isinstance(obj.get("metrics"), dict):
                self.engine_metrics = obj["metrics"]
            if not choices:  # the usage chunk itself
                return 0, not self.strip_usage
        if not isinstance(choices, list):
            return 0, True
        return sum(choice_tokens(c) for c in choices), True

    @staticmethod
    def _parse(event: bytes) -> dict[str, Any] | None:
        """The event's JSON object, or None ([DONE], a comment, not JSON)."""
        if event.startswith(b"data:") and b"\n" not in event.rstrip(b"\r\n"):
            data = event[5:]
        else:
            data = b"".join(line[5:] for line in event.splitlines() if line.startswith(b"data:"))
        try:
            text = data.decode().strip()
        except UnicodeDecodeError:
            return None
        if not text or text == "[DONE]":
            return None
        try:
            obj = _decode(text)[0]
        except ValueError:
            return None
        return obj if isinstance(obj, dict) else None
