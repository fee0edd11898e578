"""Stage 3, admit: a slot for the request, a place in the fair queue, or a 429.

The queue itself (priority, aging, the TTFT rule, Retry-After) is
admission.py; this stage sizes it from the workers and answers the client.

How many requests a worker takes at once is what the worker reports: vLLM
runs up to its `max_num_seqs` and queues the rest, and its /metrics say how
many run and how many wait. A worker seen with a waiting queue while at its
max_num_seqs or with its KV cache full was full at its running count
(`backends.learn_limit`, `Backend.max_running`); otherwise it takes the
max_num_seqs it was started with, or, where that is not known,
`UNREPORTED_SLOTS`, vLLM's default max_num_seqs on a GPU: guessing high
corrects itself (the worker queues, reports it, and the guess becomes its
running count), guessing low never would (it would never fill). This is
`router.max_inflight_per_worker = 0`, the default; a profile's number above 0
is a fixed cap per worker instead (the 2-core CPU profiles keep 8, so that
requests wait in the router's fair queue rather than in vLLM's).
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Callable

from aiohttp import web

from pdbox.router import openai_errors as oe
from pdbox.router.admission import Admission, QueueFull, Ticket
from pdbox.router.backends import Backend
from pdbox.router.metrics import RouterMetrics
from pdbox.router.parse import Call
from pdbox.router.prompt import Prompt


class Refused(Exception):
    """The request is not admitted; `response` is the answer (429, or 504 when it
    waited until its time limit)."""

    def __init__(self, response: web.Response) -> None:
        super().__init__("refused")
        self.response = response


UNREPORTED_SLOTS = 256  # vLLM's default max_num_seqs on a GPU (128 on a CPU)


def worker_slots(b: Backend) -> int:
    """Requests a worker takes at once, as it reported (see the module)."""
    return b.slots or UNREPORTED_SLOTS


class AdmitStage:
    def __init__(self, admission: Admission, metrics: RouterMetrics, per_worker: int,
                 serving: Callable[[], list[Backend]]) -> None:
        self.admission = admission
        self.metrics = metrics
        self.per_worker = per_worker  # the profile's cap; 0: what the workers report
        self.from_workers = per_worker <= 0
        self.serving = serving  # workers that may serve a request now

    def slots(self, b: Backend) -> int:
        return worker_slots(b) if self.from_workers else self.per_worker

    async def acquire(self, call: Call, prompt: Prompt, deadline: float | None = None) -> Ticket:
        """A slot; `deadline` (monotonic) bounds the wait: the request's time limit.

        Admission refuses what it predicts would wait past the limit; a request
        that was admitted to the queue and still reaches the limit there (the
        workers went slower than predicted) ends with an explicit 504.
        """
        if self.from_workers:  # the workers' reports move with every scrape
            self.resize()
        key = object()  # the autoscaler's mean wait reads the oldest waiter's age
        self.metrics.waiting_since[key] = time.monotonic()
        try:
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            async with asyncio.timeout(left):
                ticket = await self.admission.acquire(call.priority, prompt.est_tokens,
                                                      retried=call.retried)
        except TimeoutError:
            self.metrics.requests.inc(outcome="timeout")
            raise Refused(oe.error_response(
                504, "The request waited in pdbox's queue until its time limit.", "timeout",
                headers={"Retry-After": "1"})) from None
        except QueueFull as exc:
            self.metrics.rejected.inc()
            self.metrics.requests.inc(outcome="rejected")
            # Both forms: retry-after-ms keeps the spread of return times that
            # admission planned; Retry-After is the standard, in whole seconds.
            raise Refused(oe.error_response(
                429, "pdbox is saturated; retry later.", "rate_limit_exceeded",
                headers={"Retry-After": str(max(1, math.ceil(exc.retry_after_s))),
                         "retry-after-ms": str(max(1, round(exc.retry_after_s * 1000)))})
            ) from None
        finally:
            self.metrics.waiting_since.pop(key, None)
        self.metrics.admission_wait.observe(ticket.waited_s, time.monotonic())
        return ticket

    def release(self, ticket: Ticket) -> None:
        self.admission.release(ticket)

    def resize(self, coming_ready_at: list[float] | None = None) -> None:
        """Admission capacity follows the workers that can serve.

        `coming_ready_at`: when each worker that is starting is expected to be
        ready (monotonic seconds); admission counts it as capacity on its way.
        """
        serving = self.serving()
        if self.from_workers:
            total = sum(self.slots(b) for b in serving) or UNREPORTED_SLOTS
            per = UNREPORTED_SLOTS
        else:
            per = self.per_worker
            total = max(1, len(serving)) * per
        grew = total > self.admission.max_inflight
        self.admission.max_inflight = total
        if coming_ready_at is not None:
            self.admission.capacity_coming([(t, per) for t in coming_ready_at])
        if grew or coming_ready_at is not None:
            self.admission._dispatch()  # let waiters in if capacity grew
