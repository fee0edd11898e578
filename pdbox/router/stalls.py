"""Frozen workers, seen from their streams: how long a silence may last, and what follows.

A worker that stops answering (SIGSTOP, a deadlock, a swap storm) keeps its
sockets open: nothing resets, its streams just go quiet. The router takes a
stream for stalled once it waits longer than the longest step the worker can
legitimately take (`stall_bound_s`), and then takes the whole worker for
frozen (`Freezes.stalled`):

- every leg open on it fails at once (streams move elsewhere, from their
  first token or before it; a prefill leg falls back), not one silence each;
- it is out of rotation (its registry state reads `stalled`, so the picker,
  the prefill pick and admission's capacity leave it out);
- a probe sends it a one-token completion every second; the first answer
  puts it back (`ready`). A worker that stays frozen is the supervisor's to
  restart (its health probe); its state change replaces `stalled`.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable
from typing import Any

import aiohttp

from pdbox.router.backends import Backend, Registry

# vLLM's default chunked-prefill budget per engine step for the OpenAI server on
# a CPU (EngineArgs' CPU defaults: 2048 × world size); GPU profiles say theirs
# (pdbox/workers/vllm.py, gpu_batch_limits).
CPU_STEP_TOKENS = 2048
# How many longest steps a stream may wait before it is taken for stalled.
# One step is the longest a running worker is silent (a full prefill chunk
# plus a decode step); the margin covers what the calibration did not see: a
# busier core (another worker, the router, a client on a 2-core box), a speed
# learnt on warm prompts, the scrape and HTTP between. It is a ratio, not a
# time, so it holds on any machine: a slower machine has longer steps and a
# longer bound, a faster one a shorter bound.
STEP_MARGIN = 4.0
STALLED = "stalled"  # registry state of a worker taken for frozen
# The supervisor's state for a worker silent to its health probe (workers/supervisor.py).
UNRESPONSIVE = "unresponsive"


class Frozen(aiohttp.ServerTimeoutError):
    """A leg's worker was taken for frozen before it answered: try another worker."""
PROBE_S = 1.0


def stall_bound_s(step_tokens: int, prefill_tps: float, itl_slo_s: float) -> float:
    """Seconds of silence after which a stream's worker is taken for frozen.

    The longest step a worker takes is one chunk of prefill (`step_tokens` at
    its measured prefill speed) beside its decode streams' step (at most the
    ITL target while it meets it); STEP_MARGIN of those.
    """
    step = step_tokens / max(prefill_tps, 1.0) + itl_slo_s
    return STEP_MARGIN * step


class Freezes:
    """Workers taken for frozen, the legs open on each, and the probe that brings
    them back. Shared by every stream and leg of one router."""

    def __init__(self, registry: Registry, events: Callable[[str, str], None] | None = None,
                 on_change: Callable[[], None] = lambda: None,
                 probe_body: dict[str, Any] | None = None,
                 clock: Callable[[], float] = time.monotonic, probe_s: float = PROBE_S) -> None:
        self.registry = registry
        self.events = events
        self.on_change = on_change  # capacity changed (admission)
        self.probe_body = probe_body or {"prompt": "hi", "max_tokens": 1}
        self.clock = clock
        self.probe_s = probe_s
        self.session: aiohttp.ClientSession | None = None
        self._legs: dict[str, dict[int, Callable[[], None]]] = {}
        self.since: dict[str, float] = {}  # worker id -> taken for frozen at
        self.seen = 0  # freezes seen since start
        self.history: list[dict[str, Any]] = []  # the last few, for the status snapshot
        self._tasks: set[asyncio.Task[None]] = set()

    # --------------------------------------------------------------- legs

    def watch(self, worker_id: str, fail: Callable[[], None]) -> int:
        """Register a leg open on `worker_id`; `fail()` ends it if the worker freezes."""
        key = id(fail)
        self._legs.setdefault(worker_id, {})[key] = fail
        return key

    def unwatch(self, worker_id: str, key: int) -> None:
        legs = self._legs.get(worker_id)
        if legs is not None:
            legs.pop(key, None)
            if not legs:
                del self._legs[worker_id]

    def open_legs(self, worker_id: str) -> int:
        return len(self._legs.get(worker_id, ()))

    # ------------------------------------------------------------- freezes

    def stalled(self, b: Backend, why: str) -> None:
        """`b` sent nothing for its bound: out of rotation, its legs failed now."""
        cur = self.registry.get(b.id)
        if cur is b and b.state == "ready":
            b.state = STALLED
            now = self.clock()
            self.since[b.id] = now
            self.seen += 1
            self.history = [*self.history[-9:], {"worker": b.id, "why": why, "at": time.time(),
                                                 "back_after_s": None}]
            if self.events:
                self.events("router", f"{b.id} taken for frozen ({why}); its streams move "
                            "and no request goes to it until it answers again")
            self.on_change()
            if self.session is not None:
                task = asyncio.get_running_loop().create_task(self._probe(b))
                self._tasks.add(task)
                task.add_done_callback(self._tasks.discard)
        self.fail_legs(b.id)

    def fail_legs(self, worker_id: str) -> None:
        """End every leg open on the worker now (each goes elsewhere or falls back)."""
        for fail in list(self._legs.get(worker_id, {}).values()):
            fail()

    async def _probe(self, b: Backend) -> None:
        """Bring `b` back once it answers a one-token completion (the engine steps,
        not only the HTTP server); stop when the supervisor took it over."""
        assert self.session is not None
        body = json.dumps(self.probe_body).encode()
        while self.registry.get(b.id) is b and b.state == STALLED:
            t0 = self.clock()
            try:
                async with self.session.post(
                        f"{b.url}/v1/completions", data=body,
                        headers={"Content-Type": "application/json"},
                        timeout=aiohttp.ClientTimeout(total=self.probe_s * 5)) as r:
                    ok = r.status == 200
                    await r.read()
            except (TimeoutError, aiohttp.ClientError, OSError):
                ok = False
            if ok and self.registry.get(b.id) is b and b.state == STALLED:
                b.state = "ready"
                took = self.clock() - self.since.pop(b.id, self.clock())
                for h in self.history:
                    if h["worker"] == b.id and h["back_after_s"] is None:
                        h["back_after_s"] = round(took, 1)
                if self.events:
                    self.events("router", f"{b.id} answers again after {took:.1f} s; "
                                "routed to again")
                self.on_change()
                return
            await asyncio.sleep(max(0.0, self.probe_s - (self.clock() - t0)))
        self.since.pop(b.id, None)

    def snapshot(self) -> dict[str, Any]:
        now = self.clock()
        return {"now": {w: round(now - t, 1) for w, t in self.since.items()},
                "seen": self.seen, "last": self.history[-5:]}

    def close(self) -> None:
        for t in list(self._tasks):
            t.cancel()
