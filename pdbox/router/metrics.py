"""Prometheus text exposition for the router, and a reader for vLLM's /metrics.

Small on purpose: the router exports a handful of counters and histograms and
reads a handful of gauges, so a full client library would only add weight to
the pdbox process.
"""

from __future__ import annotations

import bisect
import math
import re
from collections import deque
from dataclasses import dataclass, field

LATENCY_BUCKETS = (
    0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75,
    1.0, 1.5, 2.0, 3.0, 5.0, 7.5, 10.0, 20.0, 30.0, 60.0, 120.0,
)  # fmt: skip


def _labels(labels: dict[str, str]) -> str:
    if not labels:
        return ""
    inner = ",".join(
        f'{k}="{str(v).replace(chr(92), chr(92) * 2).replace(chr(34), chr(92) + chr(34))}"'
        for k, v in sorted(labels.items())
    )
    return "{" + inner + "}"


@dataclass
class Counter:
    name: str
    help: str
    values: dict[tuple[tuple[str, str], ...], float] = field(default_factory=dict)

    def inc(self, amount: float = 1.0, **labels: str) -> None:
        key = tuple(sorted(labels.items()))
        self.values[key] = self.values.get(key, 0.0) + amount

    def get(self, **labels: str) -> float:
        return self.values.get(tuple(sorted(labels.items())), 0.0)

    def total(self) -> float:
        return sum(self.values.values())

    def render(self) -> list[str]:
        out = [f"# HELP {self.name} {self.help}", f"# TYPE {self.name} counter"]
        for key, v in sorted(self.values.items()):
            out.append(f"{self.name}{_labels(dict(key))} {v:g}")
        return out


@dataclass
class Histogram:
    name: str
    help: str
    buckets: tuple[float, ...] = LATENCY_BUCKETS
    counts: list[int] = field(default_factory=list)
    total: float = 0.0
    n: int = 0
    # Recent samples for percentiles shown in the TUI/status (bounded).
    recent: deque[tuple[float, float]] = field(default_factory=lambda: deque(maxlen=4096))

    def __post_init__(self) -> None:
        self.counts = [0] * (len(self.buckets) + 1)

    def observe(self, value: float, now: float = 0.0) -> None:
        self.counts[bisect.bisect_left(self.buckets, value)] += 1
        self.total += value
        self.n += 1
        self.recent.append((now, value))

    def percentile(self, q: float, since: float | None = None) -> float | None:
        vals = sorted(v for t, v in self.recent if since is None or t >= since)
        if not vals:
            return None
        idx = min(len(vals) - 1, max(0, math.ceil(q * len(vals)) - 1))
        return vals[idx]

    def render(self) -> list[str]:
        out = [f"# HELP {self.name} {self.help}", f"# TYPE {self.name} histogram"]
        cum = 0
        for b, c in zip(self.buckets, self.counts, strict=False):
            cum += c
            out.append(f'{self.name}_bucket{{le="{b:g}"}} {cum}')
        cum += self.counts[-1]
        out.append(f'{self.name}_bucket{{le="+Inf"}} {cum}')
        out.append(f"{self.name}_sum {self.total:.6f}")
        out.append(f"{self.name}_count {self.n}")
        return out


@dataclass
class Gauge:
    name: str
    help: str
    values: dict[tuple[tuple[str, str], ...], float] = field(default_factory=dict)

    def set(self, value: float, **labels: str) -> None:
        self.values[tuple(sorted(labels.items()))] = value

    def render(self) -> list[str]:
        out = [f"# HELP {self.name} {self.help}", f"# TYPE {self.name} gauge"]
        for key, v in sorted(self.values.items()):
            out.append(f"{self.name}{_labels(dict(key))} {v:g}")
        return out


# ------------------------------------------------------------ vLLM's /metrics

WANTED = (
    "vllm:num_requests_waiting",
    "vllm:num_requests_running",
    "vllm:kv_cache_usage_perc",
    "vllm:prefix_cache_queries_total",
    "vllm:prefix_cache_hits_total",
    "vllm:nixl_xfer_time_seconds_sum",
    "vllm:nixl_xfer_time_seconds_count",
    "vllm:nixl_bytes_transferred_sum",
    "vllm:nixl_bytes_transferred_count",
    "vllm:nixl_num_failed_transfers_total",
    "vllm:prompt_tokens_total",
    "vllm:generation_tokens_total",
)


_WANTED_RE = re.compile(
    r"^(" + "|".join(re.escape(n) for n in WANTED) + r")(?:\{[^}\n]*\})? (\S+)$", re.M)


def parse_vllm_metrics(text: str) -> dict[str, float]:
    """Sum each wanted series over its labels.

    One compiled regex over the whole text: vLLM's /metrics is ~60 KB and is
    read up to ten times a second per worker, so a Python loop over its lines
    would be the router's largest cost.
    """
    out: dict[str, float] = {}
    for m in _WANTED_RE.finditer(text):
        try:
            value = float(m.group(2))
        except ValueError:
            continue
        if math.isnan(value):
            continue
        name = m.group(1)
        out[name] = out.get(name, 0.0) + value
    return out
