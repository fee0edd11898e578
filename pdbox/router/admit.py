"""Stage 3, admit: a slot for the request, a place in the fair queue, or a 429.

The queue itself (priority, aging, the TTFT rule, Retry-After) is
admission.py; this stage sizes it from the workers and answers the client.
"""

from __future__ import annotations

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
    """The request is not admitted; `response` is the 429 to answer."""

    def __init__(self, response: web.Response) -> None:
        super().__init__("refused")
        self.response = response


class AdmitStage:
    def __init__(self, admission: Admission, metrics: RouterMetrics, per_worker: int,
                 serving: Callable[[], list[Backend]]) -> None:
        self.admission = admission
        self.metrics = metrics
        self.per_worker = per_worker
        self.serving = serving  # workers that may serve a request now

    async def acquire(self, call: Call, prompt: Prompt) -> Ticket:
        key = object()  # the autoscaler's mean wait reads the oldest waiter's age
        self.metrics.waiting_since[key] = time.monotonic()
        try:
            ticket = await self.admission.acquire(call.priority, prompt.est_tokens,
                                                  retried=call.retried)
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
        per = self.per_worker
        n = max(1, len(self.serving()))
        self.admission.max_inflight = n * per
        if coming_ready_at is not None:
            self.admission.capacity_coming([(t, per) for t in coming_ready_at])
        self.admission._dispatch()  # let waiters in if capacity grew
