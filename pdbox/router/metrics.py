"""The router's live figures, their Prometheus exposition, and a reader of Prometheus text.

Small on purpose: the router exports a handful of counters and histograms and
reads a handful of vLLM's series, so a full client library would only add
weight to the pdbox process. This module also holds pdbox's one percentile
function and its one Prometheus-text parser; everything else (replay, smoke,
scripts, tests) calls these.

What each live figure is computed from is written up in docs/ROUTING.md
("Live figures").
"""

from __future__ import annotations

import bisect
import functools
import math
import re
from collections import deque
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field

LATENCY_BUCKETS = (
    0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75,
    1.0, 1.5, 2.0, 3.0, 5.0, 7.5, 10.0, 20.0, 30.0, 60.0, 120.0,
)  # fmt: skip
RATE_WINDOW_S = 10.0  # req/s and tokens/s are counts over this trailing window
RECENT_SAMPLES = 16_384  # bound on a histogram's recent samples (each may carry a weight)


def percentile(values: Sequence[float], q: float,
               weights: Sequence[float] | None = None) -> float | None:
    """Nearest-rank percentile (q in 0..1) of `values`; None when there are none.

    With `weights`, a value counts as that many samples: the router records one
    inter-token gap per network read, weighted by the tokens the read carried.
    """
    if not values:
        return None
    if weights is None:
        s = sorted(values)
        return s[min(len(s) - 1, max(0, math.ceil(q * len(s)) - 1))]
    pairs = sorted(zip(values, weights, strict=True))
    total = sum(w for _, w in pairs)
    if total <= 0:
        return None
    need = q * total
    acc = 0.0
    for v, w in pairs:
        acc += w
        if acc >= need - 1e-9 and acc > 0:
            return v
    return pairs[-1][0]


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
    counts: list[float] = field(default_factory=list)
    total: float = 0.0
    n: float = 0
    # Recent (time, value, weight) samples for the percentiles shown in the TUI/status.
    recent: deque[tuple[float, float, float]] = field(
        default_factory=lambda: deque(maxlen=RECENT_SAMPLES))

    def __post_init__(self) -> None:
        self.counts = [0] * (len(self.buckets) + 1)

    def observe(self, value: float, now: float = 0.0, weight: float = 1) -> None:
        """One sample, or `weight` equal samples (one read carrying that many tokens)."""
        self.counts[bisect.bisect_left(self.buckets, value)] += weight
        self.total += value * weight
        self.n += weight
        self.recent.append((now, value, weight))

    def window(self, since: float | None = None) -> tuple[list[float], list[float]]:
        vals: list[float] = []
        weights: list[float] = []
        for t, v, w in self.recent:
            if since is None or t >= since:
                vals.append(v)
                weights.append(w)
        return vals, weights

    def percentile(self, q: float, since: float | None = None) -> float | None:
        vals, weights = self.window(since)
        return percentile(vals, q, weights)

    def percentiles(self, qs: Sequence[float], since: float | None = None) -> list[float | None]:
        """Several percentiles of one window, sorted once (the status snapshot reads
        p50 and p99 of up to RECENT_SAMPLES samples every second)."""
        vals, weights = self.window(since)
        if not vals:
            return [None] * len(qs)
        if all(w == 1 for w in weights):
            vals.sort()
            n = len(vals)
            return [vals[min(n - 1, max(0, math.ceil(q * n) - 1))] for q in qs]
        total = sum(weights)
        if total <= 0:
            return [None] * len(qs)
        # `percentile` with weights, every q in one pass over one sort of the indices.
        out: list[float | None] = [None] * len(qs)
        want = sorted((q * total - 1e-9, i) for i, q in enumerate(qs))
        j = 0
        acc = 0.0
        for k in sorted(range(len(vals)), key=vals.__getitem__):
            acc += weights[k]
            while j < len(want) and acc >= want[j][0] and acc > 0:
                out[want[j][1]] = vals[k]
                j += 1
            if j == len(want):
                break
        top = max(vals)
        return [top if v is None else v for v in out]

    def mean(self, since: float | None = None) -> float | None:
        vals, weights = self.window(since)
        total = sum(weights)
        return sum(v * w for v, w in zip(vals, weights, strict=True)) / total if total else None

    def render(self) -> list[str]:
        out = [f"# HELP {self.name} {self.help}", f"# TYPE {self.name} histogram"]
        cum = 0.0
        for b, c in zip(self.buckets, self.counts, strict=False):
            cum += c
            out.append(f'{self.name}_bucket{{le="{b:g}"}} {cum:g}')
        cum += self.counts[-1]
        out.append(f'{self.name}_bucket{{le="+Inf"}} {cum:g}')
        out.append(f"{self.name}_sum {self.total:.6f}")
        out.append(f"{self.name}_count {self.n:g}")
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


class TokenRate:
    """Completion tokens over a trailing window, bounded by time rather than by count.

    Each entry is (time, tokens). Bounding by count is what once capped the
    figure near 410 tokens/s: a fixed number of samples over a fixed window.
    """

    def __init__(self, keep_s: float = 60.0) -> None:
        self.keep_s = keep_s
        self._events: deque[tuple[float, float]] = deque()

    def add(self, tokens: float, now: float) -> None:
        if tokens:
            self._events.append((now, tokens))
        while self._events and self._events[0][0] < now - self.keep_s:
            self._events.popleft()

    def total(self, since: float) -> float:
        return sum(n for t, n in self._events if t >= since)

    def per_s(self, now: float, window_s: float = RATE_WINDOW_S) -> float:
        return self.total(now - window_s) / window_s


class RouterMetrics:
    """Everything the router measures about the requests it serves."""

    def __init__(self) -> None:
        self.requests = Counter(
            "pdbox_requests_total",
            "Requests by how they ended: ok (a whole answer), error_event (a stream ended "
            "by an explicit error event), error (502 before the answer), upstream_error (the "
            "worker's own error passed on), timeout (504 or an error event at "
            "router.request_timeout_s), rejected (429), unavailable (503), bad_request, "
            "client_closed.")
        self.ttft = Histogram(
            "pdbox_ttft_seconds",
            "Time to first token from the router's view: the first token event of a stream; "
            "for an answer that is not streamed, end-to-end time less its decode time.")
        self.ttft_source = Counter(
            "pdbox_ttft_samples_total",
            "TTFT samples by where they came from: stream, engine (vLLM per-request "
            "metrics) or estimate (decode time from the worker's inter-token latency).")
        self.itl = Histogram("pdbox_itl_seconds",
                             "Time between streamed tokens (a read's gap spread over its tokens).")
        self.e2e = Histogram("pdbox_e2e_seconds", "Request latency, end to end.")
        self.admission_wait = Histogram("pdbox_admission_wait_seconds",
                                        "Time a request waited in the router's admission queue.")
        self.routed = Counter("pdbox_routed_total", "Requests routed, by worker and leg.")
        self.prefix_tokens = Counter("pdbox_prefix_match_tokens_total",
                                     "Prompt tokens the chosen decode worker already held.")
        self.prompt_tokens = Counter("pdbox_prompt_tokens_total", "Prompt tokens routed.")
        self.output_tokens = Counter(
            "pdbox_output_tokens_total",
            "Completion tokens returned: usage.completion_tokens, streamed or not.")
        self.pd = Counter("pdbox_pd_total", "P/D decisions: remote prefill or local.")
        self.fallbacks = Counter("pdbox_fallbacks_total",
                                 "Remote prefills that fell back to local prefill, by cause.")
        self.retries = Counter("pdbox_retries_total", "Requests retried on another worker.")
        self.rejected = Counter("pdbox_rejected_total", "Requests answered 429 (queue full).")
        self.kv_xfer_failures = Gauge("pdbox_worker_nixl_failed_transfers",
                                      "NIXL transfers that failed, per worker (from vLLM).")
        self.inflight = Gauge("pdbox_inflight", "Requests in flight, per worker.")
        self.queued = Gauge("pdbox_queued", "Requests waiting in the router's admission queue.")
        self.tokens = TokenRate()
        # Requests waiting for admission now: key -> when they arrived. The autoscaler's
        # mean wait falls back to the oldest of them when nobody was admitted lately.
        self.waiting_since: dict[object, float] = {}

    def add_tokens(self, tokens: float, now: float) -> None:
        self.output_tokens.inc(tokens)
        self.tokens.add(tokens, now)

    def live_figures(self, now: float, since: float) -> dict[str, float | int | None]:
        """The status snapshot's request figures (docs/ROUTING.md, "Live figures"):
        rates over the last RATE_WINDOW_S, latency percentiles since `since`."""
        finished = sum(w for t, _, w in self.e2e.recent if t >= now - RATE_WINDOW_S)
        ttft = self.ttft.percentiles((0.5, 0.99), since)
        itl = self.itl.percentiles((0.5, 0.99), since)
        return {
            "requests_total": int(self.requests.total()),
            "rps": finished / RATE_WINDOW_S,
            "tokens_per_s": self.tokens.per_s(now, RATE_WINDOW_S),
            "rate_window_s": RATE_WINDOW_S,
            "output_tokens_total": int(self.output_tokens.total()),
            "ttft_p50_s": ttft[0],
            "ttft_p99_s": ttft[1],
            "itl_p50_s": itl[0],
            "itl_p99_s": itl[1],
        }

    def oldest_wait_s(self, now: float) -> float | None:
        return now - min(self.waiting_since.values()) if self.waiting_since else None

    def render(self) -> str:
        lines: list[str] = []
        for m in (self.requests, self.ttft, self.ttft_source, self.itl, self.e2e,
                  self.admission_wait, self.routed, self.prefix_tokens, self.prompt_tokens,
                  self.output_tokens, self.pd, self.fallbacks, self.retries, self.rejected,
                  self.kv_xfer_failures, self.inflight, self.queued):
            lines += m.render()
        return "\n".join(lines) + "\n"


def answer_figures(answer: object, e2e_s: float,
                   itl_s: float | None) -> tuple[int, float | None, str]:
    """(completion tokens, TTFT, its source) of an answer that was not streamed.

    The router sees only the whole answer, so its TTFT is the end-to-end time
    less the decode time after the first token. vLLM says that decode time
    itself when started with --enable-per-request-metrics
    (`metrics.generation_time_ms`: first to last token); otherwise it is the
    decode steps after the first token times the worker's recent inter-token
    latency `itl_s` (engine-side, from vLLM's histogram). With one token
    there is no decode time; with neither figure there is no TTFT (None).
    """
    if not isinstance(answer, dict):
        return 0, None, "none"
    usage = answer.get("usage")
    tokens = usage.get("completion_tokens") if isinstance(usage, dict) else None
    if not isinstance(tokens, int) or isinstance(tokens, bool) or tokens < 0:
        return 0, None, "none"
    timing = answer.get("metrics")
    gen_ms = timing.get("generation_time_ms") if isinstance(timing, dict) else None
    if isinstance(gen_ms, int | float) and not isinstance(gen_ms, bool):
        return tokens, max(0.0, e2e_s - gen_ms / 1000), "engine"
    choices = answer.get("choices")
    sequences = max(1, len(choices) if isinstance(choices, list) else 1)
    steps = math.ceil(tokens / sequences) - 1  # decode steps after each sequence's first token
    if steps <= 0:
        return tokens, e2e_s, "estimate"
    if itl_s is None:
        return tokens, None, "none"
    return tokens, max(0.0, e2e_s - steps * itl_s), "estimate"


# -------------------------------------------------------- Prometheus text (vLLM's /metrics)

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
    "vllm:request_prefill_kv_computed_tokens_sum",
    "vllm:request_prefill_kv_computed_tokens_count",
)


@dataclass
class PromHistogram:
    """One histogram summed over its labels: cumulative bucket counts by upper bound."""

    buckets: dict[float, float] = field(default_factory=dict)
    sum: float = 0.0
    count: float = 0.0


@dataclass
class Scrape:
    values: dict[str, float] = field(default_factory=dict)  # plain series, summed over labels
    histograms: dict[str, PromHistogram] = field(default_factory=dict)


_LE = re.compile(r'le="([^"]*)"')


@functools.lru_cache(maxsize=64)
def _series_re(names: tuple[str, ...]) -> re.Pattern[str]:
    return re.compile(r"^(" + "|".join(re.escape(n) for n in names)
                      + r")(?:\{([^}\n]*)\})? (\S+)(?: -?\d+)?$", re.M)


def series(text: str, names: Iterable[str]) -> Iterator[tuple[str, str, float]]:
    """(name, label text, value) of every sample of the named series; NaN skipped.

    One compiled regex over the whole text: vLLM's /metrics is ~60 KB and is
    read up to ten times a second per worker, so a Python loop over its lines
    would be the router's largest cost.
    """
    for m in _series_re(tuple(names)).finditer(text):
        try:
            value = float(m.group(3))
        except ValueError:
            continue
        if not math.isnan(value):
            yield m.group(1), m.group(2) or "", value


def parse_prometheus(text: str, names: Iterable[str] = (),
                     histograms: Iterable[str] = ()) -> Scrape:
    """Sum each named series over its labels, and each named histogram per bucket bound."""
    names = tuple(names)
    hists = tuple(histograms)
    parts = {f"{h}{suffix}": (h, suffix) for h in hists for suffix in ("_bucket", "_sum", "_count")}
    out = Scrape()
    for name, labels, value in series(text, names + tuple(parts)):
        if name in parts:
            base, suffix = parts[name]
            h = out.histograms.setdefault(base, PromHistogram())
            if suffix == "_sum":
                h.sum += value
            elif suffix == "_count":
                h.count += value
            else:
                le = _LE.search(labels)
                if le is not None:
                    bound = float(le.group(1))
                    h.buckets[bound] = h.buckets.get(bound, 0.0) + value
        else:
            out.values[name] = out.values.get(name, 0.0) + value
    return out


def info_label(text: str, name: str, label: str) -> str | None:
    """A label's value on an info series (vLLM's `vllm:cache_config_info{block_size="128",…}`)."""
    want = f'{label}="'
    for _, lbl, _ in series(text, (name,)):
        i = lbl.find(want)
        if i >= 0:
            j = i + len(want)
            return lbl[j:lbl.find('"', j)]
    return None


def sum_series(text: str, name: str, **labels: str) -> float:
    """One series summed over the samples whose labels include `labels` (0 when absent)."""
    want = [f'{k}="{v}"' for k, v in labels.items()]
    return sum(v for _, lbl, v in series(text, (name,)) if all(w in lbl for w in want))


def parse_vllm_metrics(text: str) -> dict[str, float]:
    """The vLLM gauges and counters the router reads, each summed over its labels."""
    return parse_prometheus(text, WANTED).values


def bucket_quantile(q: float, buckets: dict[float, float]) -> float | None:
    """Prometheus' histogram_quantile over cumulative bucket counts (linear in a bucket).

    A quantile that falls in the +Inf bucket answers the highest finite bound,
    as Prometheus does.
    """
    bounds = sorted(buckets)
    if not bounds:
        return None
    total = buckets[bounds[-1]]
    if total <= 0:
        return None
    rank = q * total
    lo_bound, lo_count = 0.0, 0.0
    for b in bounds:
        c = buckets[b]
        if c >= rank:
            if math.isinf(b):
                return lo_bound
            if c == lo_count:
                return b
            return lo_bound + (b - lo_bound) * (rank - lo_count) / (c - lo_count)
        lo_bound, lo_count = b, c
    return lo_bound
