"""Engine-side figures: vLLM's own latency histograms, read as deltas per scrape.

The router's clock sees a request from outside: admission, network, the
prefill leg. vLLM's histograms see it from inside the engine: how long it
queued (`vllm:request_queue_time_seconds`), how long its prefill ran
(`vllm:request_prefill_time_seconds`), when its first token came
(`vllm:time_to_first_token_seconds`) and the gaps between tokens
(`vllm:inter_token_latency_seconds`). Like a Prometheus `rate()` over a
window, the difference between two scrapes is what happened between them,
so a trailing window of those differences gives recent percentiles and means
per worker, streamed or not. Pure code: the scrape loop feeds it.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from pdbox.router.metrics import PromHistogram, bucket_quantile

ENGINE_HISTOGRAMS = {
    "ttft": "vllm:time_to_first_token_seconds",
    "itl": "vllm:inter_token_latency_seconds",
    "queue": "vllm:request_queue_time_seconds",
    "prefill": "vllm:request_prefill_time_seconds",
    "e2e": "vllm:e2e_request_latency_seconds",
}
ENGINE_WINDOW_S = 60.0  # the trailing window of the engine figures in status and the TUI


@dataclass(frozen=True)
class Summary:
    count: float
    mean: float | None
    p50: float | None
    p90: float | None

    def to_dict(self, prefix: str) -> dict[str, float | None]:
        return {f"{prefix}_count": self.count, f"{prefix}_mean_s": self.mean,
                f"{prefix}_p50_s": self.p50, f"{prefix}_p90_s": self.p90}


EMPTY = Summary(0.0, None, None, None)


class EngineWindow:
    """One worker's histograms, as running totals of their per-scrape deltas.

    A mark of the totals is kept per `resolution_s` (the latest within that
    time replaces the one before), so what happened since any moment is the
    newest mark less the last mark before it: a few subtractions per
    question, and at most keep_s / resolution_s marks per histogram however
    often the worker is scraped.
    """

    def __init__(self, keep_s: float = 2 * ENGINE_WINDOW_S, resolution_s: float = 1.0) -> None:
        self.keep_s = keep_s
        self.resolution_s = resolution_s
        self._last: dict[str, PromHistogram] = {}
        self._total: dict[str, PromHistogram] = {}
        # key -> marks (time, totals then); `_base[key]`: the totals before the first mark.
        self._marks: dict[str, deque[tuple[float, PromHistogram]]] = {}
        self._base: dict[str, PromHistogram] = {}

    def update(self, now: float, histograms: Mapping[str, PromHistogram]) -> None:
        """Add what changed since the previous scrape.

        The first scrape of a worker is its baseline (its whole past is not
        "recent"). A count that went down means the worker restarted: its
        histograms began again from zero, so the new values are the delta.
        """
        for key, name in ENGINE_HISTOGRAMS.items():
            h = histograms.get(name)
            if h is None:
                continue
            prev = self._last.get(key)
            self._last[key] = h
            if prev is None:
                continue
            if h.count < prev.count:
                prev = PromHistogram()
            if h.count <= prev.count:
                continue
            total = self._total.setdefault(key, PromHistogram())
            total = _plus(total, h, prev)
            self._total[key] = total
            marks = self._marks.setdefault(key, deque())
            if marks and marks[-1][0] > now - self.resolution_s:
                marks[-1] = (marks[-1][0], total)
            else:
                marks.append((now, total))
            while len(marks) > 1 and marks[0][0] < now - self.keep_s:
                self._base[key] = marks.popleft()[1]

    def total(self, key: str) -> PromHistogram | None:
        """Everything the histogram gained since the first scrape, across restarts
        (monotonic, so a reader can take its own differences, as the decider does)."""
        return self._total.get(key)

    def since(self, key: str, since: float) -> list[PromHistogram]:
        """What the histogram gained since `since` (a list: empty when nothing)."""
        marks = self._marks.get(key)
        if not marks or marks[-1][0] < since:
            return []
        before = self._base.get(key, PromHistogram())
        for t, total in marks:
            if t >= since:
                break
            before = total
        gained = _plus(marks[-1][1], PromHistogram(), before)
        return [gained] if gained.count > 0 else []


def _plus(a: PromHistogram, b: PromHistogram, minus: PromHistogram) -> PromHistogram:
    """a + b - minus, bucket by bucket."""
    bounds = set(a.buckets) | set(b.buckets) | set(minus.buckets)
    return PromHistogram(
        {x: a.buckets.get(x, 0.0) + b.buckets.get(x, 0.0) - minus.buckets.get(x, 0.0)
         for x in bounds},
        a.sum + b.sum - minus.sum, a.count + b.count - minus.count)


def summarize(histograms: Iterable[PromHistogram]) -> Summary:
    """Count, mean and bucket-interpolated p50/p90, over one or many workers' gains."""
    count = total = 0.0
    buckets: dict[float, float] = {}
    for h in histograms:
        count += h.count
        total += h.sum
        for b, c in h.buckets.items():
            buckets[b] = buckets.get(b, 0.0) + c
    if count <= 0:
        return EMPTY
    if buckets and math.inf not in buckets:
        buckets[math.inf] = count
    return Summary(count, total / count, bucket_quantile(0.5, buckets),
                   bucket_quantile(0.9, buckets))


def engine_figures(windows: Mapping[str, EngineWindow], since: float) -> dict[str, float | None]:
    """The engine-side figures of a set of workers since `since`, flat for JSON."""
    out: dict[str, float | None] = {}
    for key in ENGINE_HISTOGRAMS:
        s = summarize(h for w in windows.values() for h in w.since(key, since))
        out.update(s.to_dict(key))
    return out


def engine_snapshot(backends: Iterable[Any], now: float) -> dict[str, Any]:
    """The status snapshot's `engine`: the figures over the last ENGINE_WINDOW_S for every
    worker together, per role and per worker, with what each has waiting now."""
    bs = list(backends)
    since = now - ENGINE_WINDOW_S

    def of(group: list[Any]) -> dict[str, Any]:
        return {**engine_figures({b.id: b.engine for b in group}, since),
                "waiting": sum(b.waiting for b in group)}

    return {"window_s": ENGINE_WINDOW_S, "all": of(bs),
            "roles": {role: of([b for b in bs if b.role == role])
                      for role in sorted({b.role for b in bs})},
            "workers": {b.id: of([b]) for b in bs}}
