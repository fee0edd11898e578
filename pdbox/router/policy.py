"""Which worker serves a request, and whether its prefill runs remotely.

`Picker` scores candidate workers the way llm-d's inference scheduler does:
a weighted sum of a prefix scorer (share of the prompt's blocks the worker
already caches), a queue scorer (load, min-max normalised across the
candidates) and a KV scorer (free KV cache). Like sglang-router, a worker
whose load runs ahead of the least-loaded one by both an absolute and a
relative margin loses its prefix score: affinity without balance loses
(FINDINGS: pinned conversations doubled TTFT when caches had room).

`PDDecider` (decider.py, re-exported here) decides per request whether a
prefill worker should compute the prompt and ship its KV over NIXL, or the
decode worker should prefill it itself.
"""

from __future__ import annotations

import itertools
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from pdbox.router.decider import PDDecider, PDDecision

__all__ = ["POLICIES", "NoWorker", "PDDecider", "PDDecision", "Pick", "Picker", "ScoreWeights",
           "WorkerView"]

POLICIES = ("prefix", "least_loaded", "round_robin")


class NoWorker(Exception):
    """No candidate is ready; str() says which role had none."""


@dataclass
class WorkerView:
    """One worker as the router sees it at decision time."""

    id: str
    role: str
    url: str
    ready: bool = True
    waiting: int = 0  # vllm:num_requests_waiting
    running: int = 0  # vllm:num_requests_running
    inflight: int = 0  # requests the router has open on it (fresher than /metrics)
    kv_usage: float = 0.0  # vllm:kv_cache_usage_perc, 0..1
    slots: int = 0  # requests it runs at once, as it reported (admit.worker_slots; 0: not known)

    @property
    def load(self) -> int:
        return self.waiting + self.running + self.inflight


@dataclass(frozen=True)
class ScoreWeights:
    prefix: float = 3.0
    queue: float = 2.0
    kv: float = 2.0


@dataclass
class Pick:
    worker_id: str
    # worker id -> total score (for round_robin/least_loaded: the load, negated)
    scores: dict[str, float]
    reason: str
    # worker id -> {"prefix": .., "queue": .., "kv": .., "guarded": 0/1}
    parts: dict[str, dict[str, float]] = field(default_factory=dict)


class Picker:
    """Chooses one worker among candidates of one role.

    `weights` is any object with `prefix`, `queue` and `kv` attributes (the
    profile's `router.weights` works). Ties are broken first by session
    affinity, then by rotation so an idle box still spreads its requests.
    """

    def __init__(
        self,
        weights: object | None = None,
        balance_abs: float = 8,
        balance_rel: float = 1.5,
        session_capacity: int = 10_000,
        session_tolerance: float = 0.05,
    ):
        w = weights or ScoreWeights()
        self.w_prefix = float(getattr(w, "prefix", 3.0))
        self.w_queue = float(getattr(w, "queue", 2.0))
        self.w_kv = float(getattr(w, "kv", 2.0))
        self.balance_abs = balance_abs
        self.balance_rel = balance_rel
        self.session_tolerance = session_tolerance
        self._sessions: OrderedDict[str, str] = OrderedDict()
        self._session_capacity = session_capacity
        self._turn = itertools.count()

    # ------------------------------------------------------------------ public

    def pick(
        self,
        candidates: Sequence[WorkerView],
        prefix_blocks: Mapping[str, int],
        total_blocks: int,
        policy: str,
        session_key: str | None = None,
    ) -> Pick:
        ready = sorted((c for c in candidates if c.ready), key=lambda c: c.id)
        if not ready:
            role = candidates[0].role if candidates else "any"
            raise NoWorker(f"no ready {role} worker")
        turn = next(self._turn)
        if policy == "round_robin":
            chosen = ready[turn % len(ready)]
            pick = Pick(
                chosen.id,
                {c.id: -float(c.load) for c in ready},
                f"round_robin: turn {turn % len(ready) + 1} of {len(ready)}",
            )
        elif policy == "least_loaded":
            pick = self._least_loaded(ready, turn)
        elif policy == "prefix":
            pick = self._prefix(ready, prefix_blocks, total_blocks, session_key, turn)
        else:
            raise ValueError(f"unknown policy {policy!r}; use one of {', '.join(POLICIES)}")
        if session_key:
            self._remember(session_key, pick.worker_id)
        return pick

    def session_worker(self, session_key: str) -> str | None:
        return self._sessions.get(session_key)

    def forget_worker(self, worker_id: str) -> None:
        """Drop session bindings to a worker that left."""
        for key in [k for k, v in self._sessions.items() if v == worker_id]:
            del self._sessions[key]

    # ----------------------------------------------------------------- helpers

    def _least_loaded(self, ready: list[WorkerView], turn: int) -> Pick:
        rotated = ready[turn % len(ready) :] + ready[: turn % len(ready)]
        chosen = min(rotated, key=lambda c: (c.load, c.kv_usage))
        return Pick(
            chosen.id,
            {c.id: -float(c.load) for c in ready},
            f"least_loaded: {chosen.id} has load {chosen.load} "
            f"(max {max(c.load for c in ready)})",
        )

    def _prefix(
        self,
        ready: list[WorkerView],
        prefix_blocks: Mapping[str, int],
        total_blocks: int,
        session_key: str | None,
        turn: int,
    ) -> Pick:
        loads = [c.load for c in ready]
        lo, hi = min(loads), max(loads)
        scores: dict[str, float] = {}
        parts: dict[str, dict[str, float]] = {}
        guarded: list[str] = []
        for c in ready:
            share = prefix_blocks.get(c.id, 0) / total_blocks if total_blocks > 0 else 0.0
            share = min(1.0, max(0.0, share))
            overloaded = c.load - lo > self.balance_abs and c.load > lo * self.balance_rel
            if overloaded and share > 0:
                guarded.append(c.id)
                share = 0.0
            queue = 1.0 if hi == lo else (hi - c.load) / (hi - lo)
            kv = 1.0 - min(1.0, max(0.0, c.kv_usage))
            total = self.w_prefix * share + self.w_queue * queue + self.w_kv * kv
            scores[c.id] = total
            parts[c.id] = {"prefix": share, "queue": queue, "kv": kv, "guarded": float(overloaded)}
        best = max(scores.values())
        # Ties: the session's previous worker first, then the least loaded, then rotation.
        tied = [c for c in ready if scores[c.id] >= best - 1e-9]
        least = min(c.load for c in tied)
        tied = [c for c in tied if c.load == least]
        sticky = self._sessions.get(session_key) if session_key else None
        by_session = False
        if sticky is not None and sticky in scores and scores[sticky] >= best - self.session_tolerance:
            chosen_id = sticky
            by_session = True
        else:
            chosen_id = tied[turn % len(tied)].id
        held = prefix_blocks.get(chosen_id, 0)
        chosen = next(c for c in ready if c.id == chosen_id)
        reason = (
            f"prefix: {chosen_id} holds {held}/{total_blocks} blocks"
            f" ({parts[chosen_id]['prefix']:.0%} counted), load {chosen.load} (min {lo}),"
            f" score {scores[chosen_id]:.2f}"
        )
        if by_session:
            reason += "; session affinity"
        if guarded:
            reason += f"; prefix ignored on {', '.join(guarded)} (load over balance margin)"
        return Pick(chosen_id, scores, reason, parts)

    def _remember(self, key: str, worker_id: str) -> None:
        self._sessions[key] = worker_id
        self._sessions.move_to_end(key)
        while len(self._sessions) > self._session_capacity:
            self._sessions.popitem(last=False)
