"""Streams that survive a dead worker (request migration, as NVIDIA Dynamo calls it).

When the worker serving a stream dies (connection reset, end of stream before
``[DONE]``, an error event) or stalls (no bytes for its worker's stall
bound, stalls.py), the router continues the answer on another worker that can
serve whole requests. It re-sends the prompt plus the text relayed so far
(chat: the partial answer as a final assistant message, continued with
vLLM's ``continue_final_message``; completions: prompt + text, or prompt ids +
generated ids when the prompt was token ids), asks for the tokens still owed
(``max_tokens`` minus the tokens relayed) and splices the continuation into
the client's stream: same id/created/model, no second role chunk, one
``[DONE]``, and a usage chunk that covers the whole answer. Only when no
worker can take it over does the stream end with an explicit error event.

`Splice` (splice.py) is the pure part (SSE framing, counting, rewriting, the
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
from pdbox.router.kv_move import handoff
from pdbox.router.metrics import Counter
from pdbox.router.splice import (  # noqa: F401 - importable from here, as before
    UNREAD_BYTES,
    Splice,
    UpstreamError,
    _kind,
    refusal,
    upstream_body,
)
from pdbox.router.stalls import Freezes

# How long a stream may wait for a worker to take it over when none is ready
# (every worker that serves whole requests restarting), unless the request's
# own deadline (router.request_timeout_s) comes first: the router sets this to
# that limit, so a stream waits as long as its client may.
WAIT_S = 60.0
# A dead worker still reads "ready" until the supervisor's next tick (or the
# attach health probe) notices; until then it counts as coming back.
NOTICE_S = 5.0
# An excluded worker becomes a candidate again once seen not ready (it
# restarted) or after this long (a stall that the health check never saw).
EXCLUDE_S = 60.0
# Moves a stream may make per worker of the box that can serve it: a stream
# survives as many crashes as come while any worker can take it, and a request
# that kills every worker it lands on (a poison request) stops after killing
# each of them this many times, whatever the box's size. The request's deadline
# bounds it too.
MOVES_PER_WORKER = 2
POLL_S = 0.25
KEEPALIVE_S = 5.0
KEEPALIVE = b": pdbox: continuing this stream on another worker\n\n"
# States of a worker that may serve again soon (the supervisor's; "unresponsive" is a
# worker silent to its health probe that may answer again, "backoff" one that
# restarts after a pause).
COMING_STATES = ("starting", "warming", "restarting", "unresponsive", "backoff")
DEADLINE_SLACK_S = 0.05


class StreamLost(aiohttp.ClientError):
    """No worker could take the stream over; str() says why. The relay ends the
    stream with an error event, as for any worker failure."""


class Stalled(TimeoutError):
    """The worker sent nothing for the stall timeout, or was taken for frozen
    from another of its streams (set on its response body)."""


class PastDeadline(StreamLost):
    """The request reached its limit (router.request_timeout_s) before its answer ended."""


class Moving(Exception):
    """Set on a leg's body to take the stream off a live worker (flowing decode)."""


@dataclass
class Settings:
    # Silence after which a stream's worker is taken for frozen, when the router
    # gives no per-worker bound (stalls.stall_bound_s); tests set it directly.
    stall_s: float = 10.0
    wait_s: float = WAIT_S
    notice_s: float = NOTICE_S
    exclude_s: float = EXCLUDE_S
    moves_per_worker: int = MOVES_PER_WORKER
    max_moves: int | None = None  # a fixed cap instead (0: migration off)
    poll_s: float = POLL_S
    keepalive_s: float = KEEPALIVE_S


class Migrator:
    """Shared by every stream of one router: where continuations may go, and the record."""

    def __init__(self, registry: Registry, events: Any = None, settings: Settings | None = None,
                 clock: Callable[[], float] = time.monotonic,
                 roles: Callable[[], tuple[str, ...]] | None = None,
                 stall_s: Callable[[Backend], float] | None = None,
                 freezes: Freezes | None = None) -> None:
        self.registry = registry
        # Roles that serve whole requests: decode and aggregated, and prefill where
        # soft roles let a prefill worker serve whole (the router's serving_roles).
        self.roles = roles or registry.decode_roles
        self.counter = Counter("pdbox_migrations_total",
                               "Streams whose worker died or stalled: moved to another worker, "
                               "failed (no worker could take them), refused (n > 1, logprobs...).")
        # Streams by the moves they took, counted when they end: how many crashes
        # one answer went through.
        self.moved_streams = Counter("pdbox_moved_streams_total",
                                     "Streams that were moved, by how many moves each took.")
        self.events = events
        self.settings = settings or Settings()
        self.clock = clock
        # Per worker: the silence after which its streams take it for frozen.
        self._stall_s = stall_s
        self.freezes = freezes or Freezes(registry, events)
        self.most_moves = 0  # the most moves one stream took
        self.recent: list[dict[str, Any]] = []  # the last moves, for the status snapshot
        # Streams open now, by request id: what flowing decode may move.
        self.live: dict[str, MigratingStream] = {}
        # Moves off a live worker by KV (kv_move.py), and what the last ones cost.
        self.flows = Counter("pdbox_stream_flows_total",
                             "Streams moved off a live worker, by how: kv (the new worker "
                             "pulled the stream's KV) or recompute (the KV leg failed).")
        self.flow_recent: list[dict[str, Any]] = []

    def stall_s(self, worker: Backend) -> float:
        return self._stall_s(worker) if self._stall_s is not None else self.settings.stall_s

    def stall_s_of(self, worker_id: str) -> float:
        b = self.registry.get(worker_id)
        return self.stall_s(b) if b is not None else self.settings.stall_s

    def move_budget(self) -> int:
        """Moves one stream may take (see MOVES_PER_WORKER)."""
        if self.settings.max_moves is not None:
            return self.settings.max_moves
        return self.settings.moves_per_worker * max(1, len(self.serving()))

    def render(self) -> str:
        return "".join(line + "\n" for line in self.counter.render()
                       + self.moved_streams.render() + self.flows.render())

    def movable(self, worker_id: str) -> list[MigratingStream]:
        """Streams on `worker_id` that a move could take now (oldest first)."""
        return [st for st in self.live.values() if st.worker.id == worker_id and st.movable]

    def move(self, request_id: str, target: Backend, why: str) -> bool:
        """Move a running stream to `target` by KV; False when it cannot move now."""
        st = self.live.get(request_id)
        return st is not None and st.move(target, why)

    def flowed(self, request_id: str, frm: str, to: str, tokens: int, why: str,
               cost: dict[str, Any]) -> None:
        how = "kv" if cost.get("ok") else "recompute"
        self.flows.inc(how=how)
        self.flow_recent = [*self.flow_recent[-9:], {
            "request_id": request_id, "from": frm, "to": to, "tokens": tokens, "how": how,
            "why": why[:200], "at": time.time(), **cost}]
        if self.events:
            self.events("router", f"stream {request_id} moved from {frm} to {to} by {how} "
                        f"after {tokens} tokens ({why}; KV leg {cost.get('leg_ms', 0):.0f} ms, "
                        f"{cost.get('computed_on_old', 0)} tokens computed for it)")

    def flow_paused(self, request_id: str, seconds: float) -> None:
        """The gap the client saw across a move by KV: from the last token relayed
        from the old worker to the first from the new one (the move's real cost to
        its stream, which the balancer and clearing weigh, flowing.FlowView.move_s)."""
        for rec in reversed(self.flow_recent):
            if rec.get("request_id") == request_id:
                rec["pause_ms"] = round(1000 * seconds, 1)
                return

    def moved(self, request_id: str, frm: str, to: str, move: int, tokens: int,
              why: str) -> None:
        self.most_moves = max(self.most_moves, move)
        self.recent = [*self.recent[-9:], {"request_id": request_id, "from": frm, "to": to,
                                           "move": move, "tokens": tokens, "why": why[:200],
                                           "at": time.time()}]
        self.record("moved", f"stream {request_id} moved from {frm} to {to} after {tokens} "
                    f"tokens (move {move}; {why})")

    def snapshot(self) -> dict[str, Any]:
        c = self.counter
        return {"moved": int(c.get(outcome="moved")), "failed": int(c.get(outcome="failed")),
                "refused": int(c.get(outcome="refused")), "most_moves": self.most_moves,
                "recent": self.recent[-5:], "frozen": self.freezes.snapshot(),
                "flows": {"kv": int(self.flows.get(how="kv")),
                          "recompute": int(self.flows.get(how="recompute")),
                          "recent": self.flow_recent[-5:]}}

    def first_leg(self, body: dict[str, Any], path: str) -> dict[str, Any]:
        return upstream_body(body, _kind(path))

    def record(self, outcome: str, message: str) -> None:
        self.counter.inc(outcome=outcome)
        if self.events:
            self.events("router", message)

    def stream(self, session: aiohttp.ClientSession, upstream: aiohttp.ClientResponse,
               worker: Backend, body: dict[str, Any], path: str, request_id: str,
               prompt_tokens: int, timeout: aiohttp.ClientTimeout,
               deadline: float | None = None) -> MigratingStream:
        return MigratingStream(self, session, upstream, worker, body, _kind(path), path, request_id,
                               prompt_tokens, timeout, deadline)

    def serving(self, routable_only: bool = False) -> list[Backend]:
        """Workers that serve whole requests (in any state unless `routable_only`)."""
        return self.registry.of_roles(self.roles(), routable_only=routable_only)


class MigratingStream:
    """What the relay reads in place of a worker's response body (`readany`)."""

    def __init__(self, migrator: Migrator, session: aiohttp.ClientSession,
                 upstream: aiohttp.ClientResponse, worker: Backend, body: dict[str, Any],
                 kind: str, path: str, request_id: str, prompt_tokens: int,
                 timeout: aiohttp.ClientTimeout, deadline: float | None = None) -> None:
        self.m = migrator
        self.session = session
        self.upstream = upstream
        self.worker = worker
        self.path = path
        self.request_id = request_id
        self.timeout = timeout
        # When the request must have ended (the migrator's clock): router.request_timeout_s
        # from its arrival. Each continuation gets what is left of it.
        self.deadline = deadline
        self.refused = refusal(body, kind)
        self.splice = Splice(body, kind, prompt_tokens)
        self.moves = 0
        self._own_leg = False  # the current leg's inflight count is ours to give back
        self._excluded: dict[str, tuple[Backend, float, bool]] = {}  # id -> (it, when, seen down)
        self._placing_since: float | None = None
        self._loop = asyncio.get_running_loop()
        self._read_since: float | None = None  # waiting on the worker since (loop time)
        self._watch: asyncio.TimerHandle | None = None  # the stall check (_arm)
        self._stall_s = migrator.stall_s(worker)
        self._last_keepalive = 0.0
        self._why = ""
        self._stall_why = ""
        self._out = b""
        self._ended = False
        self._moves_counted = False
        # Registered with the freeze book while a leg is open: a freeze of its
        # worker seen from another stream fails this leg at once.
        self._frozen_key: int | None = migrator.freezes.watch(worker.id, self._frozen)
        # Flowing decode: the worker to move to, the live one to pull the KV from.
        self.flows = 0
        self._flow_to: Backend | None = None
        self._handoff_from: Backend | None = None
        # Set once the old worker answered a move's one-token leg (or the move was
        # given up): a prompt that waits to be prefilled there goes after it.
        self.handed: asyncio.Event | None = None
        # A move by KV began while the stream waited from this time (loop time):
        # the read that `Moving` ended started when the last token was relayed.
        self._pause_from: float | None = None
        migrator.live[request_id] = self

    @property
    def movable(self) -> bool:
        """Whether a move off a live worker may start now: the stream has tokens, is not
        being placed, owes more, and may be continued elsewhere at all."""
        return (self.refused is None and not self._ended and self._placing_since is None
                and self._flow_to is None and self.splice.started
                and not self.splice.finished and self.splice.why_not() is None)

    def silent_s(self) -> float:
        """How long the stream has waited on its worker for its next bytes (0 when not)."""
        since = self._read_since
        return 0.0 if since is None else max(0.0, self._loop.time() - since)

    def move(self, target: Backend, why: str) -> bool:
        """Take this stream to `target`, its KV pulled from the current worker."""
        if not self.movable or target.id == self.worker.id or not target.routable:
            return False
        self._flow_to, self._why = target, why
        self.handed = asyncio.Event()
        self.upstream.content.set_exception(Moving())
        return True

    def _handed_off(self) -> None:
        if self.handed is not None:
            self.handed.set()

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
            except Moving:
                self._pause_from, self._read_since = self._read_since, None
                self._flowing()
                continue
            except TimeoutError:
                self._read_since = None
                self._failed(self._stall_why or f"{self.worker.id} sent nothing for "
                             f"{self._stall_s:.1f} s")
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
                if self._pause_from is not None:
                    self.m.flow_paused(self.request_id, self._loop.time() - self._pause_from)
                    self._pause_from = None
                return out

    # ------------------------------------------------------------ stalls

    def _arm(self) -> None:
        """Watch this leg for a stall: once a token has come, a worker that sends
        nothing for its stall bound while the relay waits on it is taken for frozen.

        One timer per stream, moved on only when it fires, rather than a
        timeout around every read (the relay reads once per few events).
        """
        self._watch = self._loop.call_later(self._stall_s, self._check)

    def _check(self) -> None:
        self._watch = None
        stall = self._stall_s
        now = self._loop.time()
        since = self._read_since
        if since is not None and now - since >= stall:
            # The whole worker is frozen, not this stream: its other legs fail too
            # (through _frozen, this one included) and it leaves the rotation.
            self._stall_why = f"{self.worker.id} sent nothing for {now - since:.1f} s"
            self.m.freezes.stalled(self.worker, self._stall_why)
            self._frozen()
            return
        self._watch = self._loop.call_at((now if since is None else since) + stall, self._check)

    def _frozen(self) -> None:
        """The worker of the open leg was taken for frozen: fail the leg's read now."""
        if not self._ended and self._placing_since is None:
            if not self._stall_why:
                self._stall_why = f"{self.worker.id} was taken for frozen"
            self.upstream.content.set_exception(Stalled())

    def _disarm(self) -> None:
        if self._watch is not None:
            self._watch.cancel()
            self._watch = None

    def _unwatch(self) -> None:
        if self._frozen_key is not None:
            self.m.freezes.unwatch(self.worker.id, self._frozen_key)
            self._frozen_key = None

    async def _passthrough(self) -> bytes:
        try:
            return await self.upstream.content.readany()
        except (TimeoutError, aiohttp.ClientError):
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
        self._unwatch()
        self._handed_off()
        if self._own_leg:
            if self._ended:
                self.upstream.release()
            else:
                self.upstream.close()
        self._give_back()
        if self.m.live.get(self.request_id) is self:
            del self.m.live[self.request_id]
        if self.moves and not self._moves_counted:
            self._moves_counted = True
            self.m.moved_streams.inc(moves=str(self.moves))

    def _drop_leg(self) -> None:
        self._disarm()
        self._unwatch()
        self.upstream.close()  # the worker aborts what it was still generating
        self._give_back()

    def _give_back(self) -> None:
        if self._own_leg:
            self._own_leg = False
            self.worker.inflight -= 1

    # ---------------------------------------------------------- migrating

    def _left_s(self, now: float) -> float | None:
        """Seconds left before the deadline; at or below 0 within DEADLINE_SLACK_S (a
        leg's own timeout, set to the deadline, fires a timer tick early or late)."""
        if self.deadline is None:
            return None
        left = self.deadline - now
        return left if left > DEADLINE_SLACK_S else 0.0

    def _failed(self, why: str) -> None:
        """The current leg is lost: close it and start looking for a new worker."""
        self._drop_leg()
        self._stall_why = ""
        if self.splice.finished:  # it died after its last token: nothing to move
            self._out, self._ended = self.splice.closing(), True
            return
        now = self.m.clock()
        self._excluded[self.worker.id] = (self.worker, now, False)
        self._why = why
        left = self._left_s(now)
        if left is not None and left <= 0:
            self._lose("the request reached its time limit", past=True)
        no = self.splice.why_not()
        if no is not None:
            self._lose(f"it cannot be moved ({no})")
        budget = self.m.move_budget()
        if self.moves - self.flows >= budget:  # moves after failures, not flowing ones
            self._lose(f"it was already moved {self.moves} times" if self.moves
                       else "stream migration is off")
        self.splice.begin_leg()
        if self.splice.continuation() is None:  # all tokens owed were relayed
            self._out, self._ended = self.splice.closing(), True
            return
        self._placing_since = now
        self._last_keepalive = now

    def _flowing(self) -> None:
        """Leave the live worker on purpose: its leg closes (vLLM aborts the request and
        keeps its full blocks cached), and the continuation goes to the chosen worker
        with the KV pulled from this one (kv_move.py)."""
        old = self.worker
        self._drop_leg()
        self._stall_why = ""
        self.splice.begin_leg()
        if self.splice.continuation() is None:
            self._out, self._ended = self.splice.closing(), True
            self._flow_to = None
            self._handed_off()
            return
        self._handoff_from = old
        now = self.m.clock()
        self._placing_since = now
        self._last_keepalive = now

    def _lose(self, why: str, past: bool = False) -> None:
        msg = f"{self._why}; {why} (after {self.splice.tokens} tokens)"
        self.m.record("failed", f"stream {self.request_id} lost: {msg}")
        raise (PastDeadline if past else StreamLost)(msg)

    async def _place(self) -> bool:
        """Start the continuation on a worker; False when a keep-alive is due first."""
        s = self.m.settings
        assert self._placing_since is not None
        while True:
            now = self.m.clock()
            left = self._left_s(now)
            if left is not None and left <= 0:
                self._lose("the request reached its time limit before a worker could "
                           "take it over", past=True)
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
        flow = self._flow_to
        if flow is not None:
            self._flow_to = None
            if flow.routable and self.m.registry.get(flow.id) is flow:
                return flow
            self._handoff_from = None  # the chosen worker went away: a plain move
            self._handed_off()
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
        if self.m.freezes.since:  # a frozen worker may answer again
            return True
        return any(b.routable and not down and now - t < self.m.settings.notice_s
                   for b, t, down in self._excluded.values())

    async def _open(self, target: Backend) -> bool:
        """Send the continuation to `target`; False (and `target` excluded) if it fails."""
        body = self.splice.continuation()
        assert body is not None
        now = self.m.clock()
        rid = f"{self.request_id}-m{self.moves + 1}"
        left = self._left_s(now)
        timeout = self.timeout if left is None else aiohttp.ClientTimeout(
            total=max(0.001, left), sock_connect=self.timeout.sock_connect)
        source, cost = self._handoff_from, None
        if source is not None:
            self._handoff_from = None
            bound = self.m.stall_s(source) if left is None else min(left, self.m.stall_s(source))
            params, cost = await handoff(self.session, source.url, self.path, body, rid, bound)
            self._handed_off()
            if params is not None:
                body = {**body, "kv_transfer_params": params}
        try:
            resp = await self.session.post(
                f"{target.url}{self.path}", data=json.dumps(body).encode(),
                headers={"Content-Type": "application/json", "X-Request-Id": rid},
                timeout=timeout)
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
        if cost is not None:
            self.flows += 1
            self.m.flowed(self.request_id, self.worker.id, target.id, self.splice.tokens,
                          self._why, cost.to_dict())
        else:
            self.m.moved(self.request_id, self.worker.id, target.id, self.moves,
                         self.splice.tokens, self._why)
        self.upstream, self.worker = resp, target
        target.inflight += 1
        self._own_leg = True
        self._placing_since = None
        self._stall_s = self.m.stall_s(target)
        self._frozen_key = self.m.freezes.watch(target.id, self._frozen)
        return True
