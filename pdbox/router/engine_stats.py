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

from pdbox.router.metrics import PromHistogram, bucket_quantile

ENGINE_HISTOGRAMS = {
    "ttft": "vllm:time_to_first_token_seconds",
    "itl": "vllm:inter_token_latency_seconds",
    "queue": "vllm:request_queue_time_seconds",
    "prefill": "vllm:request_prefill_time_seconds",
    "e2e": "vllm:e2e_request_latency_seconds",
}
ENGINE_WINDOW_S = 60.0


@dataclass(frozen=True)
class Delta:
    t: float
    key: str  # a key of ENGINE_HISTOGRAMS
    count: float
    sum: float
    buckets: tuple[tuple[float, float], ...]  # (upper bound, cumulative count) of the delta


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
    """One worker's histogram deltas over a trailing window."""

    def __init__(self, keep_s: float = 300.0) -> None:
        self.keep_s = keep_s
        self._last: dict[str, PromHistogram] = {}
        self.deltas: deque[Delta] = deque()

    def update(self, now: float, histograms: Mapping[str, PromHistogram]) -> None:
        """Record what changed since the previous scrape.

        A count that went down means the worker restarted: its histograms
        began again from zero, so the new values are the delta.
        """
        for key, name in ENGINE_HISTOGRAMS.items():
            h = histograms.get(name)
            if h is None:
                continue
            prev = self._last.get(key)
            self._last[key] = h
            if prev is None:
                continue  # the first scrape holds the worker's whole past, not "recent"
            if h.count < prev.count:
                prev = PromHistogram()
            count = h.count - prev.count
            if count <= 0:
                continue
            buckets = tuple((b, h.buckets[b] - prev.buckets.get(b, 0.0))
                            for b in sorted(h.buckets))
            self.deltas.append(Delta(now, key, count, h.sum - prev.sum, buckets))
        while self.deltas and self.deltas[0].t < now - self.keep_s:
            self.deltas.popleft()

    def since(self, key: str, since: float) -> list[Delta]:
        return [d for d in self.deltas if d.key == key and d.t >= since]


def summarize(deltas: Iterable[Delta]) -> Summary:
    """Count, mean and bucket-interpolated p50/p90 of deltas, from one or many workers."""
    count = total = 0.0
    buckets: dict[float, float] = {}
    for d in deltas:
        count += d.count
        total += d.sum
        for b, c in d.buckets:
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
        s = summarize(d for w in windows.values() for d in w.since(key, since))
        out.update(s.to_dict(key))
    return out
