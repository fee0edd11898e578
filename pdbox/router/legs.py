"""Stage 5, legs: the prefill leg (remote P/D) and the decode leg, over HTTP.

Each leg keeps the books the other stages read while it is open: in-flight
counts (the picker's load), soft roles' prefilling and whole streams, the
decider's prefill backlog, and the KV events a prefill makes due. A decode
leg whose pooled connection the worker had just closed is sent once more;
any other failure before the answer's first byte goes back to the caller,
which tries another worker once.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import aiohttp

from pdbox.router.choose import Route
from pdbox.router.match import PrefixMatch
from pdbox.router.metrics import RouterMetrics
from pdbox.router.migration import Migrator
from pdbox.router.parse import Call
from pdbox.router.pd import PrefillFailed, decode_body, prefill_leg
from pdbox.router.policy import PDDecider
from pdbox.router.prompt import Prompt
from pdbox.router.record import Decision
from pdbox.router.soft_roles import SoftRoles
from pdbox.router.sse_meter import wants_usage, with_usage
from pdbox.router.stalls import STEP_MARGIN, Frozen


class Legs:
    def __init__(self, match: PrefixMatch, decider: PDDecider, soft: SoftRoles,
                 metrics: RouterMetrics, migrator: Migrator, prefill_timeout_s: float,
                 upstream_timeout: aiohttp.ClientTimeout,
                 events: Callable[[str, str], None] | None) -> None:
        self.match = match
        self.decider = decider
        self.soft = soft
        self.metrics = metrics
        self.migrator = migrator
        self.prefill_timeout_s = prefill_timeout_s
        self.timeout = upstream_timeout
        self.events = events
        self.session: aiohttp.ClientSession | None = None
        # decode worker -> remote (KV-pulling) requests open on it; and the workers that
        # had one since the decider last learnt from their engine figures (status.py)
        self.kv_pulls: dict[str, int] = {}
        self.kv_pulled: set[str] = set()

    # -------------------------------------------------------------- prefill

    def prefill_bound_s(self, worker_id: str, uncached: int, now: float,
                        deadline: float | None) -> float:
        """How long a prefill leg may take before its worker is taken for stalled.

        The prefills queued there and this prompt at the worker's measured speed,
        plus one longest step (stalls.py), STEP_MARGIN times over; never past
        `router.prefill_timeout_s` nor the request's deadline. A leg that waits
        longer falls back to a local prefill rather than wait on a frozen worker.
        """
        tps = self.decider.prefill_tps(worker_id)
        need = self.decider.queue_s(worker_id, now) + uncached / max(tps, 1.0)
        bound = STEP_MARGIN * need + self.migrator.stall_s_of(worker_id)
        if deadline is not None:
            bound = min(bound, max(0.001, deadline - now))
        return min(bound, self.prefill_timeout_s)

    async def prefill(self, call: Call, prompt: Prompt, route: Route,
                      deadline: float | None = None) -> None:
        """Leg 1 of a remote route: the prefill worker computes the prompt's KV.

        On failure the route falls back to a local prefill, and says why. A leg
        that outlasts its bound, or whose worker is taken for frozen meanwhile
        (another of its legs stalled), falls back at once and takes the worker
        for stalled: nothing waits on a frozen prefill worker.
        """
        prefill = route.prefill
        assert prefill is not None and self.session is not None
        rid = call.request_id
        prefill.inflight += 1
        self.soft.leg_started(prefill.id)
        # The decider times the leg net of the prefills already queued there.
        sent = time.monotonic()
        bound = self.prefill_bound_s(prefill.id, route.uncached, sent, deadline)
        self.decider.prefill_sent(prefill.id, rid, route.uncached, sent)
        ok = False
        leg = asyncio.ensure_future(prefill_leg(self.session, prefill.url, call.path, call.body,
                                                rid, bound))
        freezes = self.migrator.freezes
        key = freezes.watch(prefill.id, leg.cancel)
        try:
            try:
                route.kv_params = await leg
            except asyncio.CancelledError:
                if not leg.cancelled() or _cancelling():
                    raise  # the client went away: not the worker's doing
                raise PrefillFailed("prefill worker taken for frozen") from None
            ok = True
            self.metrics.routed.inc(worker=prefill.id, leg="prefill")
            self.match.record(prefill.id, prompt.hashes)
            self.match.sent(rid, prefill.id, prompt.hashes, sent)
            self.match.blocks_cached(rid)
        except PrefillFailed as exc:
            if "timed out" in str(exc) and bound < self.prefill_timeout_s and (
                    deadline is None or time.monotonic() < deadline):
                # Past what its queue and speed explain: frozen, or as good as.
                freezes.stalled(prefill, f"its prefill leg took over {bound:.1f} s")
            self.metrics.fallbacks.inc(cause=_cause(str(exc)))
            route.pd, route.prefill = "local", None
            route.reason = f"local (fallback): {exc}"
            if self.events:
                self.events("router", f"{rid}: prefill on {prefill.id} failed, "
                            f"decoding locally: {exc}")
        finally:
            freezes.unwatch(prefill.id, key)
            if not leg.done():
                leg.cancel()
            prefill.inflight -= 1
            self.soft.leg_ended(prefill.id, time.monotonic())
            self.decider.prefill_done(prefill.id, rid, time.monotonic(), ok)

    # --------------------------------------------------------------- decode

    def decision(self, call: Call, prompt: Prompt, route: Route) -> Decision:
        """The route as the decision log and the answer's headers tell it."""
        self.metrics.pd.inc(path=route.pd)
        prefill_id = route.prefill.id if route.prefill is not None else None
        route.headers = {
            "x-request-id": call.request_id,
            "x-pdbox-decode-worker": route.decode.id,
            "x-pdbox-pd": route.pd,
            "x-pdbox-pd-reason": _header_safe(route.reason),
        }
        if prefill_id:
            route.headers["x-pdbox-prefill-worker"] = prefill_id
        return Decision(call.request_id, route.decode.id, prefill_id, route.pd, route.reason,
                        prompt.tokens, route.matched_tokens)

    @contextmanager
    def open(self, call: Call, prompt: Prompt, route: Route) -> Iterator[None]:
        """The books of a decode leg, from before it is sent until its answer ends."""
        decode, rid = route.decode, call.request_id
        if route.pd in ("local", "whole"):
            # Its first token ends the prefill where it decodes (relay.py).
            self.decider.prefill_sent(decode.id, rid, route.uncached, time.monotonic(),
                                      local=True)
        decode.inflight += 1
        decode.routed += 1
        whole = route.pd == "whole"
        if whole:
            self.soft.whole_started(decode.id)
        self.match.sent(rid, decode.id, prompt.hashes, time.monotonic())
        pulling = route.kv_params is not None
        if pulling:
            self.kv_pulls[decode.id] = self.kv_pulls.get(decode.id, 0) + 1
            self.kv_pulled.add(decode.id)
        try:
            yield
        finally:
            decode.inflight -= 1
            if whole:
                self.soft.whole_ended(decode.id)
            # No first token seen (failed, client left): end its backlog entry unlearnt.
            self.decider.prefill_done(decode.id, rid, time.monotonic(), ok=False)
            self.match.done(rid)
            if pulling:
                self.kv_pulls[decode.id] -= 1

    def upstream_body(self, call: Call) -> tuple[dict[str, Any], dict[str, Any], bool]:
        """(the request as the client's stream sees it, the decode leg's body, whether
        to drop the usage chunk).

        A stream's usage chunk is its exact token count: it is asked for, and
        dropped again on the way back when the client did not ask (relay.py).
        """
        strip_usage = call.stream and not wants_usage(call.body)
        sent = with_usage(call.body) if strip_usage else call.body
        # generated ids back for token-id prompts, so a moved stream continues exactly
        return sent, self.migrator.first_leg(sent, call.path), strip_usage

    async def send_decode(self, call: Call, route: Route, body: dict[str, Any],
                          deadline: float | None = None) -> aiohttp.ClientResponse:
        """Leg 2 (or the only leg); raises TimeoutError or aiohttp.ClientError.

        Its timeout is what is left of the request's time limit (`deadline`),
        so the answer, streamed or not, ends by then.
        """
        assert self.session is not None
        # Bytes: a str body costs aiohttp an extra payload wrapper per request.
        data = body_bytes(call, decode_body(body, route.kv_params))
        url = f"{route.decode.url}{call.path}"
        headers = {"Content-Type": "application/json", "X-Request-Id": call.request_id}
        timeout = self.timeout
        if deadline is not None:
            timeout = aiohttp.ClientTimeout(total=max(0.001, deadline - time.monotonic()),
                                            sock_connect=self.timeout.sock_connect)
        # A worker taken for frozen (another of its streams stalled) sends no headers
        # either: the wait for them is cancelled then, and the request goes elsewhere.
        # The request's own task is cancelled and uncancelled, not a task made per request.
        task = asyncio.current_task()
        frozen: list[bool] = []

        def fail() -> None:
            if task is not None and not frozen:
                frozen.append(True)
                task.cancel()

        freezes = self.migrator.freezes
        key = freezes.watch(route.decode.id, fail)
        try:
            try:
                return await self.session.post(url, data=data, headers=headers,
                                               timeout=timeout)
            except aiohttp.ServerDisconnectedError:
                # A pooled connection the worker had just closed: one fresh try.
                return await self.session.post(url, data=data, headers=headers,
                                               timeout=timeout)
        except asyncio.CancelledError:
            if frozen and task is not None and task.uncancel() == 0:
                raise Frozen(f"{route.decode.id} was taken for frozen") from None
            raise
        finally:
            freezes.unwatch(route.decode.id, key)


def body_bytes(call: Call, body: dict[str, Any]) -> bytes:
    """`body` as JSON bytes: the client's own bytes with the router's new keys
    appended where that is all that changed (a long prompt is not encoded
    again), else encoded anew."""
    raw, orig = call.raw, call.body
    if raw and all(k in body and body[k] is v for k, v in orig.items()):
        added = {k: v for k, v in body.items() if k not in orig}
        head = raw.rstrip()
        if not added:
            return raw
        if head.endswith(b"}"):
            return head[:-1] + b"," + json.dumps(added, separators=(",", ":")).encode()[1:]
    return json.dumps(body).encode()


_UNSAFE = {c: "?" for c in (*range(32), 127)}


def _header_safe(text: str) -> str:
    """Printable ASCII only, 300 characters at most (the reason is a header value)."""
    text = text[:300]
    if text.isascii() and text.isprintable():
        return text
    return text.translate(_UNSAFE).encode("ascii", "replace").decode()


def _cancelling() -> bool:
    """Whether the running task itself is being cancelled (the client left)."""
    task = asyncio.current_task()
    return task is not None and task.cancelling() > 0


def _cause(message: str) -> str:
    if "frozen" in message:
        return "stalled"
    if "timed out" in message:
        return "timeout"
    if "unreachable" in message:
        return "unreachable"
    if "answered" in message:
        return "error"
    return "invalid"
