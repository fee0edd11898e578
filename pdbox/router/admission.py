"""Admission: a bounded, fair queue in front of the workers.

At most `max_inflight` requests are let through at once; the next
`queue_bound` wait; past that a request is refused at once with `QueueFull`
(the HTTP layer answers 429 with Retry-After).

Who goes next is the waiter with the smallest *virtual start*:

    arrival + class_delay (batch only) + est_tokens * cost_s_per_token (capped)

- interactive requests go before batch requests that arrived up to
  `batch_delay_s` later, yet a batch request that has waited that long goes
  before any newer interactive one: aging, so batch never starves;
- within a class it is arrival order, with a small bias for short prompts so
  a burst of long requests does not hold short ones back; the bias is capped
  (`max_cost_s`), so a long request is overtaken only by requests arriving
  within that window, never indefinitely.

A request is refused (429) only when it could not be answered in time:

- `wait_limit_s` (the router passes `router.request_timeout_s`, the longest a
  request may stay open): a request whose predicted wait plus LIMIT_HOLDS
  slot holds passes it is refused at once, since queued it would end in a
  timeout. Below that it queues, however many workers are down: while
  capacity is short the queue, not a refusal, is the quickest way to an
  answer. A waiter that the prediction failed (interactive requests kept
  overtaking it, holds grew) is refused when it has less than LIMIT_HOLDS
  holds left, with Retry-After, rather than left to time out. Nothing here is
  a per-worker constant; the slots are what the workers run (admit.py);
- `queue_bound` bounds the router's memory, whatever the prediction.

Batch requests may hold at most `batch_share` of the in-flight slots, so an
interactive request finds a free slot soon even when batch traffic floods,
and an interactive request at a full queue turns away the newest batch
waiter. `interactive_wait_s` (off unless given) refuses an interactive request
expected to wait longer than that at once, for a box that would rather answer
429 than miss a TTFT target.

A refused request is told when to come back (Retry-After), and the answer is
meant to be true for well-behaved clients (the openai SDKs retry twice and
honour Retry-After):

- the wait is estimated from the requests ahead, the slots, and how long a slot
  is held: the larger of the running mean and the age of the requests holding
  slots now (at the start of a burst the mean still remembers short requests);
- a worker that is starting counts as capacity that is coming at its expected
  ready time;
- each refusal reserves a later return slot, so a burst of refused clients is
  spread over the time capacity really frees instead of all coming back at once
  to be refused again;
- the answer is capped at `max_retry_after_s` (60 s), the longest delay that
  common SDKs honour; a longer one makes them retry at once or give up;
- a client that comes back after a refusal (the openai SDKs say so with their
  retry count) is queued, not refused again by the TTFT rule: its target is
  missed already, and the queue is now the quickest way to its answer. The
  queue bound still holds.

The clock is injected, so tests drive arrival times without sleeping.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import math
import statistics
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

PRIORITIES = ("interactive", "batch")


# A request needs this many slot holds left before its limit to be worth
# starting: one for its own service, one for a hold longer than the mean (the
# mean is of requests already served; a request's own length is unknown).
LIMIT_HOLDS = 2.0

RECENT_HOLDS = 32  # holds the service time is the median of

# The longest Retry-After the common SDKs honour (openai-python: 60 s before
# 2.x, 120 s after); past it they retry at once with a short backoff or give up.
MAX_RETRY_AFTER_S = 60.0


class QueueFull(Exception):
    """The wait queue is at its bound; retry after `retry_after_s` seconds."""

    def __init__(self, retry_after_s: float, queued: int):
        self.retry_after_s = retry_after_s
        self.queued = queued
        super().__init__(
            f"the router's queue is full ({queued} waiting); retry in {retry_after_s:.0f} s"
        )


@dataclass(eq=False)
class Ticket:
    priority: str
    est_tokens: int
    arrived: float
    admitted: float | None = None
    released: bool = False

    @property
    def waited_s(self) -> float:
        return 0.0 if self.admitted is None else self.admitted - self.arrived


@dataclass(order=True)
class _Waiter:
    key: float
    seq: int
    ticket: Ticket = field(compare=False)
    future: asyncio.Future[Ticket] = field(compare=False)


class Admission:
    def __init__(
        self,
        queue_bound: int,
        max_inflight: int,
        clock: Callable[[], float] = time.monotonic,
        batch_delay_s: float = 30.0,
        cost_s_per_token: float = 5e-5,
        max_cost_s: float = 2.0,
        prior_hold_s: float = 2.0,
        batch_share: float = 0.5,
        interactive_wait_s: float | None = None,
        wait_limit_s: float | None = None,
    ):
        if queue_bound < 0 or max_inflight < 1:
            raise ValueError("queue_bound must be ≥ 0 and max_inflight ≥ 1")
        self.queue_bound = queue_bound
        self.max_inflight = max_inflight
        self.clock = clock
        self.batch_delay_s = batch_delay_s
        self.cost_s_per_token = cost_s_per_token
        self.max_cost_s = max_cost_s
        self._heap: list[_Waiter] = []
        self._seq = itertools.count()
        self._inflight = 0
        self._inflight_batch = 0
        self.batch_share = batch_share
        self.interactive_wait_s = interactive_wait_s
        self.wait_limit_s = wait_limit_s
        self.refused_by: dict[str, int] = {"limit": 0, "queue_bound": 0, "ttft": 0}
        self._hold_s = prior_hold_s  # EWMA of how long a ticket is held
        self._recent_holds: deque[float] = deque(maxlen=RECENT_HOLDS)
        self.rejected = 0
        self.admitted = 0
        self.max_retry_after_s = MAX_RETRY_AFTER_S
        self._held: set[Ticket] = set()  # tickets holding a slot now
        # Capacity on its way: (absolute time it is expected ready, slots it adds).
        self._coming: list[tuple[float, int]] = []
        # Return times promised to refused clients, latest last.
        self._promised: list[float] = []

    # ------------------------------------------------------------------ public

    @property
    def inflight(self) -> int:
        return self._inflight

    @property
    def queued(self) -> int:
        return sum(1 for w in self._heap if not w.future.done())

    def virtual_start(self, priority: str, est_tokens: int, arrived: float) -> float:
        cost = min(self.max_cost_s, max(0, est_tokens) * self.cost_s_per_token)
        delay = self.batch_delay_s if priority == "batch" else 0.0
        return arrived + delay + cost

    async def acquire(self, priority: str = "interactive", est_tokens: int = 0,
                      retried: bool = False) -> Ticket:
        """A slot, after a wait in the queue; QueueFull (429) when refused.

        `retried`: the client was refused before and came back as told. The TTFT
        rule no longer refuses it: it has missed its target already, and a second
        refusal would only push its answer later (and spend its retries).
        """
        if priority not in PRIORITIES:
            raise ValueError(f"unknown priority {priority!r}; use interactive or batch")
        now = self.clock()
        ticket = Ticket(priority, est_tokens, now)
        if self._inflight < self.max_inflight and not self._heap and self._may_start(priority):
            return self._admit(ticket, now)
        expected: float | None = None
        if self.wait_limit_s is not None:
            expected = self.expected_wait_s(priority)
            if expected + LIMIT_HOLDS * self.service_s() > self.wait_limit_s:
                self._refused("limit")
                raise QueueFull(self._promise(expected), self.queued)
        if priority == "interactive" and self.interactive_wait_s is not None and not retried:
            expected = self.expected_wait_s(priority) if expected is None else expected
            if expected > self.interactive_wait_s:
                self._refused("ttft")
                raise QueueFull(self._promise(expected), self.queued)
        if self.queued >= self.queue_bound and not (
            priority == "interactive" and self._turn_away_batch()
        ):
            self._refused("queue_bound")
            raise QueueFull(self.retry_after_s(), self.queued)
        fut: asyncio.Future[Ticket] = asyncio.get_running_loop().create_future()
        heapq.heappush(
            self._heap,
            _Waiter(self.virtual_start(priority, est_tokens, now), next(self._seq), ticket, fut),
        )
        self._dispatch()
        if self.wait_limit_s is not None and not fut.done():
            self._watch_limit(ticket, fut)
        try:
            return await fut
        except asyncio.CancelledError:
            # The client went away. If we had already let it in, give the slot back.
            if fut.done() and not fut.cancelled():
                self.release(fut.result())
            else:
                fut.cancel()
                self._compact()
                self._dispatch()
            raise

    def release(self, ticket: Ticket) -> None:
        if ticket.released or ticket.admitted is None:
            return
        ticket.released = True
        self._held.discard(ticket)
        self._inflight -= 1
        if ticket.priority == "batch":
            self._inflight_batch -= 1
        held = max(0.0, self.clock() - ticket.admitted)
        self._hold_s += 0.2 * (held - self._hold_s)
        self._recent_holds.append(held)
        self._dispatch()

    def _watch_limit(self, ticket: Ticket, fut: asyncio.Future[Ticket]) -> None:
        """Refuse the waiter once it has less than LIMIT_HOLDS holds left before its
        limit (checked when that time comes, with the hold as it is then)."""
        assert self.wait_limit_s is not None
        left = ticket.arrived + self.wait_limit_s - self.clock()
        due = left - LIMIT_HOLDS * self.service_s()

        def check() -> None:
            if fut.done():
                return
            if ticket.arrived + self.wait_limit_s - self.clock() \
                    >= LIMIT_HOLDS * self.service_s() + 0.05:
                self._watch_limit(ticket, fut)  # holds got shorter: look again then
                return
            self._refused("limit")
            fut.set_exception(QueueFull(self._promise(self.expected_wait_s(ticket.priority)),
                                        self.queued))
            self._compact()

        asyncio.get_running_loop().call_later(max(0.0, due), check)

    def _refused(self, rule: str) -> None:
        self.rejected += 1
        self.refused_by[rule] += 1

    def retry_after_s(self) -> float:
        """When a client refused now should come back: after the queue ahead of it
        has drained, and after the clients already told to come back earlier."""
        waiting = self.queued + 1
        return self._promise(self._wait_for(waiting))

    def capacity_coming(self, coming: list[tuple[float, int]]) -> None:
        """Workers that are starting: (absolute time expected ready, slots each adds)."""
        self._coming = sorted(coming)

    def seed_hold(self, seconds: float) -> None:
        """A measured guess of a slot's hold (warm-up calibration), while no
        request has been released yet to teach the running mean."""
        if seconds > 0 and self.admitted == 0:
            self._hold_s = seconds

    def service_s(self) -> float:
        """What one more request will hold its slot for: the median of the last
        RECENT_HOLDS holds (the prior or calibration until a few ended).

        The limit rule asks this, not `hold_estimate_s`: while workers are down,
        the requests holding slots are old because they wait for a worker, not
        because a request takes that long, and their ages (or a mean that a few
        such ends inflate) would refuse requests that are answered in time.
        """
        if len(self._recent_holds) < 4:
            return self._hold_s
        return statistics.median(self._recent_holds)

    def hold_estimate_s(self) -> float:
        """How long a slot is held: the running mean, or longer while the requests
        holding slots now are already older than that."""
        now = self.clock()
        ages = sorted(now - t.admitted for t in self._held if t.admitted is not None)
        if not ages:
            return self._hold_s
        return max(self._hold_s, ages[len(ages) // 2])

    def _wait_for(self, ahead: int) -> float:
        """Seconds until `ahead` requests have started, counting capacity that is coming."""
        hold = max(self.hold_estimate_s(), 1e-3)  # a mean of instant requests is not 0 s
        now = self.clock()
        slots, t, left = float(max(1, self.max_inflight)), 0.0, float(ahead)
        for ready_at, added in self._coming:
            dt = max(0.0, ready_at - now) - t
            if dt <= 0:
                slots += added
                continue
            can = dt * slots / hold  # requests started before that capacity arrives
            if can >= left:
                break
            left -= can
            t += dt
            slots += added
        return t + left * hold / slots

    def _promise(self, wait_s: float) -> float:
        """Reserve a return time at least `wait_s` away and after the last one promised,
        one slot interval apart; returns the delay in seconds (1 ≤ delay ≤ the cap)."""
        now = self.clock()
        self._promised = [p for p in self._promised if p > now]
        interval = self.hold_estimate_s() / max(1, self.max_inflight + sum(
            n for _, n in self._coming))
        at = now + max(1.0, wait_s)
        if self._promised:
            at = max(at, self._promised[-1] + interval)
        delay = min(self.max_retry_after_s, at - now)
        self._promised.append(now + delay)
        return delay

    def snapshot(self) -> dict[str, float | int]:
        now = self.clock()
        return {
            "inflight": self._inflight,
            "inflight_batch": self._inflight_batch,
            "queued": self.queued,
            "queue_bound": self.queue_bound,
            "admitted": self.admitted,
            "rejected": self.rejected,
            "rejected_limit": self.refused_by["limit"],
            "rejected_queue_bound": self.refused_by["queue_bound"],
            "rejected_ttft": self.refused_by["ttft"],
            "wait_limit_s": self.wait_limit_s or 0.0,
            "hold_s": round(self.hold_estimate_s(), 3),
            "service_s": round(self.service_s(), 3),
            "slots_coming": sum(n for _, n in self._coming),
            "retries_promised": sum(1 for p in self._promised if p > now),
        }

    # ----------------------------------------------------------------- helpers

    def _admit(self, ticket: Ticket, now: float | None = None) -> Ticket:
        ticket.admitted = self.clock() if now is None else now
        self._held.add(ticket)
        self._inflight += 1
        if ticket.priority == "batch":
            self._inflight_batch += 1
        self.admitted += 1
        return ticket

    def _turn_away_batch(self) -> bool:
        """Make room for an interactive request by answering the newest batch waiter 429.

        Without this, batch traffic that fills the queue would lock interactive
        requests out entirely; batch clients are the ones built to retry.
        """
        newest: _Waiter | None = None
        for w in self._heap:
            if w.ticket.priority == "batch" and not w.future.done():
                if newest is None or w.seq > newest.seq:
                    newest = w
        if newest is None:
            return False
        self._refused("queue_bound")
        newest.future.set_exception(QueueFull(self.retry_after_s(), self.queued))
        return True

    def _compact(self) -> None:
        # Cancelled waiters deep in the heap are skipped lazily; keep them from piling up.
        if len(self._heap) > 2 * self.queue_bound + 16:
            self._heap = [w for w in self._heap if not w.future.done()]
            heapq.heapify(self._heap)

    def _batch_cap(self) -> int:
        return max(1, math.floor(self.batch_share * self.max_inflight))

    def _may_start(self, priority: str) -> bool:
        return priority != "batch" or self._inflight_batch < self._batch_cap()

    def expected_wait_s(self, priority: str) -> float:
        """Rough wait before a new request of `priority` starts: the requests that
        go before it, each holding a slot for the mean hold time."""
        ahead = sum(1 for w in self._heap if not w.future.done()
                    and (priority == "batch" or w.ticket.priority == "interactive"))
        free = self._inflight < self.max_inflight and self._may_start(priority)
        if free and ahead == 0:
            return 0.0
        return self._wait_for(ahead + 1)

    def _dispatch(self) -> None:
        held_back: list[_Waiter] = []
        while self._heap and self._inflight < self.max_inflight:
            w = heapq.heappop(self._heap)
            if w.future.done():  # cancelled while waiting
                continue
            if not self._may_start(w.ticket.priority):
                held_back.append(w)  # batch at its share: let interactive ones pass
                continue
            w.future.set_result(self._admit(w.ticket))
        for w in held_back:
            heapq.heappush(self._heap, w)
        # Drop cancelled waiters lingering at the top so `queued` stays exact.
        while self._heap and self._heap[0].future.done():
            heapq.heappop(self._heap)
