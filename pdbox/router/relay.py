"""Stage 6, relay: the worker's answer back to the client.

An answer that is not streamed is passed on whole and read once for its
figures. A stream is passed on event by event through two wrappers, each
doing only what it must per read:

- migration (migration.py) keeps the first leg's events as bytes and reads
  them only when the worker fails or stalls, to continue the answer
  elsewhere;
- metering (sse_meter.py) parses each event once: tokens for TTFT, ITL and
  tokens/s, and the usage chunk the client did not ask for, dropped.
"""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

import aiohttp
from aiohttp import web

from pdbox.router import openai_errors as oe
from pdbox.router.backends import Backend
from pdbox.router.choose import Route
from pdbox.router.match import PrefixMatch
from pdbox.router.migration import MigratingStream, Migrator, PastDeadline
from pdbox.router.parse import Call
from pdbox.router.policy import PDDecider
from pdbox.router.record import Recorder
from pdbox.router.sse_meter import SseMeter

DONE = b"data: [DONE]\n\n"  # a stream's last event: it leaves with the terminator


def one_choice(body: dict[str, Any]) -> bool:
    """The answer has one choice: n is 1 and a completions prompt is one prompt."""
    n = body.get("n")
    if n not in (None, 1) or body.get("best_of") not in (None, 1):
        return False
    p = body.get("prompt")
    return not (isinstance(p, list) and p and not isinstance(p[0], int) and len(p) > 1)


class Relay:
    def __init__(self, recorder: Recorder, decider: PDDecider, match: PrefixMatch,
                 migrator: Migrator, timeout: aiohttp.ClientTimeout) -> None:
        self.recorder = recorder
        self.metrics = recorder.metrics
        self.decider = decider
        self.match = match
        self.migrator = migrator
        self.timeout = timeout

    async def answer(self, upstream: aiohttp.ClientResponse, call: Call,
                     route: Route, deadline: float | None = None) -> web.Response:
        """A whole answer (or a worker's error), passed on as it came."""
        decode = route.decode
        try:
            data = await upstream.read()
        except (TimeoutError, aiohttp.ClientError) as exc:
            if deadline is not None and time.monotonic() >= deadline:
                self.recorder.outcome("timeout")
                return oe.error_response(504, f"Worker {decode.id} did not finish within the "
                                         "request's time limit.", "timeout",
                                         headers=route.headers)
            self.recorder.outcome("error")
            return oe.error_response(502, f"Worker {decode.id} failed: {exc}.",
                                     "upstream_error", headers=route.headers)
        ok = upstream.status == 200
        self.recorder.outcome("ok" if ok else "upstream_error")
        if ok:
            self.recorder.answer(decode, data, call.t0)
            self.match.blocks_cached(call.request_id)
        return web.Response(body=data, status=upstream.status, headers=route.headers,
                            content_type=upstream.content_type or "application/json")

    async def stream(self, request: web.Request, session: aiohttp.ClientSession,
                     upstream: aiohttp.ClientResponse, call: Call, route: Route,
                     sent: dict[str, Any], strip_usage: bool,
                     prompt_tokens: int, deadline: float | None = None) -> web.StreamResponse:
        source = self.migrator.stream(session, upstream, route.decode, sent, call.path,
                                      call.request_id, prompt_tokens, self.timeout, deadline)
        try:
            return await self._pass(request, upstream, source, call, route, strip_usage)
        finally:
            source.close()

    async def _pass(self, request: web.Request, upstream: aiohttp.ClientResponse,
                    source: MigratingStream, call: Call, route: Route,
                    strip_usage: bool) -> web.StreamResponse:
        """Pass an SSE stream through event by event, timing TTFT and ITL on the way.

        Tokens are counted per SSE event (sse_meter.py), never per network
        read; a read's gap since the previous one is spread over the tokens it
        carried. The usage chunk at the end makes the count exact.

        A failure reading the worker ends the stream with an error event (the
        status line went out long ago); a failure writing to the client means
        the client left, which is no worker's fault: the upstream request is
        closed so the worker aborts it, and nothing more is sent.
        """
        decode, rid, t0 = route.decode, call.request_id, call.t0
        resp = web.StreamResponse(status=200, headers=route.headers)
        resp.content_type = "text/event-stream"
        resp.headers["Cache-Control"] = "no-cache"
        first: float | None = None
        last = 0.0
        tail = b""  # the last events, held back to leave with the end of the stream
        meter = SseMeter(strip_usage, one_choice=one_choice(call.body))
        m = self.metrics
        try:
            await resp.prepare(request)
            while True:
                try:
                    chunk = await source.readany()
                except (TimeoutError, aiohttp.ClientError) as exc:
                    if tail:  # the answer was whole: what failed after it does not matter
                        break
                    await self._failed(resp, decode, exc)
                    return resp
                if not chunk:
                    break
                read = meter.feed(chunk)
                if read.tokens:
                    now = time.monotonic()
                    if first is None:
                        first = now
                        self.recorder.ttft(now - t0, now, "stream")
                        self.decider.prefill_done(decode.id, rid, now)
                        self.match.blocks_cached(rid)
                    else:
                        gap = (now - last) / read.tokens
                        m.itl.observe(gap, now, weight=read.tokens)
                        self.decider.observe_itl(decode.id, gap)
                    last = now
                    m.add_tokens(read.tokens, now)
                if tail:
                    await resp.write(tail)  # something after [DONE]: pass it on as it came
                    tail = b""
                if read.forward.endswith(DONE):
                    # The end: it leaves with the chunked terminator, in one send.
                    tail = read.forward
                elif read.forward:
                    await resp.write(read.forward)
            await resp.write_eof(tail + meter.close())
        except (ConnectionError, aiohttp.ClientConnectionError):
            self._client_left(upstream)
            return resp
        except asyncio.CancelledError:  # the client went away (handler cancellation)
            self._client_left(upstream)
            raise
        self.recorder.stream_done(t0, meter.tokens, meter.total_tokens)
        return resp

    def _client_left(self, upstream: aiohttp.ClientResponse) -> None:
        upstream.close()  # drops the connection: vLLM aborts the request
        self.recorder.outcome("client_closed")

    async def _failed(self, resp: web.StreamResponse, decode: Backend,
                      exc: BaseException) -> None:
        """End the stream with an explicit error event, then [DONE]: counted as a
        timeout when the request reached its time limit, else as an error event."""
        if isinstance(exc, PastDeadline):
            err = oe.error_body(504, f"The request reached its time limit mid-stream: {exc}.",
                                "timeout")
            self.recorder.outcome("timeout")
        else:
            err = oe.error_body(502, f"Worker {decode.id} failed mid-stream: {exc}.",
                                "upstream_error")
            self.recorder.outcome("error_event")
        try:
            await resp.write(f"data: {json.dumps(err)}\n\ndata: [DONE]\n\n".encode())
            await resp.write_eof()
        except (ConnectionError, aiohttp.ClientError):
            pass
