"""The workers the router can send to, and what it last read of them.

The registry is fed by whoever owns the workers: the supervisor in a managed
box, or a fixed list of URLs in attach mode. A background task scrapes each
ready worker's /metrics (queue, running, KV use, NIXL transfer figures, and
vLLM's latency histograms as deltas per scrape: engine_stats.py); the
router's own in-flight count is kept here too because it is always current.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field

import aiohttp

from pdbox.router.engine_stats import ENGINE_HISTOGRAMS, EngineWindow, summarize
from pdbox.router.metrics import WANTED, info_label, parse_prometheus
from pdbox.router.policy import WorkerView

ROUTABLE = {"ready"}


@dataclass
class Backend:
    id: str
    role: str  # prefill | decode | aggregated
    url: str
    state: str = "starting"
    inflight: int = 0
    waiting: int = 0
    running: int = 0
    kv_usage: float = 0.0
    metrics: dict[str, float] = field(default_factory=dict)
    scraped_at: float = 0.0
    scrape_errors: int = 0
    routed: int = 0
    kv_events_endpoint: str | None = None
    num_blocks: int = 0  # the worker's KV cache size in blocks, from vllm:cache_config_info
    # The --max-num-seqs the worker was started with (0: not known).
    max_num_seqs: int = 0
    # Its --max-num-batched-tokens: the most prompt tokens one engine step
    # prefills, so the longest a prefill there holds up its streams per step
    # (0: not known).
    step_tokens: int = 0
    # What the worker was seen to run at most: its running count at a scrape that
    # showed a waiting queue while its max_num_seqs or its KV cache was full
    # (`learn_limit`); 0 while no such limit is known.
    max_running: int = 0
    engine: EngineWindow = field(default_factory=EngineWindow)  # vLLM's histograms, per scrape

    @property
    def slots(self) -> int:
        """Requests it runs at once: a learnt limit, else its max_num_seqs (0: not known)."""
        return self.max_running or self.max_num_seqs

    @property
    def routable(self) -> bool:
        return self.state in ROUTABLE

    def view(self) -> WorkerView:
        return WorkerView(
            id=self.id,
            role=self.role,
            url=self.url,
            ready=self.routable,
            waiting=self.waiting,
            running=self.running,
            inflight=self.inflight,
            kv_usage=self.kv_usage,
            slots=self.slots,
        )

    def engine_itl_s(self, since: float) -> float | None:
        """The worker's mean inter-token latency since `since`, as its engine measured it."""
        return summarize(self.engine.since("itl", since)).mean

    def engine_ttft_s(self, since: float) -> float | None:
        """The worker's mean time to first token since `since`, as its engine measured it."""
        return summarize(self.engine.since("ttft", since)).mean

    def prefix_hit_rate(self) -> float | None:
        q = self.metrics.get("vllm:prefix_cache_queries_total")
        h = self.metrics.get("vllm:prefix_cache_hits_total")
        if not q:
            return None
        return (h or 0.0) / q


class Registry:
    def __init__(self) -> None:
        self.backends: dict[str, Backend] = {}

    def upsert(self, id: str, role: str, url: str, state: str, kv_events: str | None = None,
               max_num_seqs: int = 0, step_tokens: int = 0) -> Backend:
        b = self.backends.get(id)
        if b is None or b.url != url:
            b = Backend(id=id, role=role, url=url, state=state, kv_events_endpoint=kv_events,
                        max_num_seqs=max_num_seqs, step_tokens=step_tokens)
            self.backends[id] = b
        else:
            b.state = state
            b.kv_events_endpoint = kv_events
            b.max_num_seqs = max_num_seqs or b.max_num_seqs
            b.step_tokens = step_tokens or b.step_tokens
        return b

    def remove(self, id: str) -> None:
        self.backends.pop(id, None)

    def get(self, id: str) -> Backend | None:
        return self.backends.get(id)

    def of_roles(self, roles: tuple[str, ...], routable_only: bool = True) -> list[Backend]:
        return [
            b for b in self.backends.values() if b.role in roles and (b.routable or not routable_only)
        ]

    def decode_roles(self) -> tuple[str, ...]:
        """Roles that serve a request end to end: decode in P/D, aggregated otherwise."""
        return ("decode", "aggregated")


async def scrape_once(session: aiohttp.ClientSession, b: Backend, timeout: float = 2.0) -> None:
    try:
        async with session.get(
            f"{b.url}/metrics", timeout=aiohttp.ClientTimeout(total=timeout)
        ) as resp:
            text = await resp.text()
    except (TimeoutError, aiohttp.ClientError, OSError):
        b.scrape_errors += 1
        return
    scrape = parse_prometheus(text, WANTED, ENGINE_HISTOGRAMS.values())
    m = scrape.values
    for name, h in scrape.histograms.items():  # their sums and counts, as plain series
        m[f"{name}_sum"] = h.sum
        m[f"{name}_count"] = h.count
    if not b.num_blocks:
        found = info_label(text, "vllm:cache_config_info", "num_gpu_blocks")
        if found and found.isdigit():
            b.num_blocks = int(found)
    b.metrics = m
    b.waiting = int(m.get("vllm:num_requests_waiting", 0))
    b.running = int(m.get("vllm:num_requests_running", 0))
    b.kv_usage = float(m.get("vllm:kv_cache_usage_perc", 0.0))
    learn_limit(b)
    b.scraped_at = time.monotonic()
    b.engine.update(b.scraped_at, scrape.histograms)
    b.scrape_errors = 0


# A KV cache this full leaves no room for another request's blocks: a queue seen
# then is the cache's limit. (vLLM preempts or queues at 100 %; a little below it
# a request's prompt blocks no longer fit.)
KV_FULL = 0.9


def learn_limit(b: Backend) -> None:
    """What the worker runs at most, from its last scrape.

    A waiting queue alone says little: with chunked prefill a request also waits
    while another's prompt chunk takes the step's whole token budget, and then
    the running count is far below what the worker can run. Taking that count as
    the limit would shrink admission to it, and a worker sent no more than it runs
    never shows a queue again to correct it. So a queue teaches a limit only
    when the worker ran its max_num_seqs or its KV cache was full; and a learnt
    limit is forgotten once the worker runs that many with no queue and room in
    its cache (it was a passing state, such as a few long prompts).
    """
    if b.running <= 0:
        return
    full = (b.max_num_seqs and b.running >= b.max_num_seqs) or b.kv_usage >= KV_FULL
    if b.waiting > 0 and full:
        b.max_running = b.running
    elif b.max_running and b.waiting == 0 and b.running >= b.max_running \
            and b.kv_usage < KV_FULL:
        b.max_running = 0


async def scrape_loop(
    registry: Registry,
    session: aiohttp.ClientSession,
    busy_interval_s: float = 0.1,
    idle_interval_s: float = 1.0,
) -> None:
    """Scrape often while a worker has work, rarely while it is idle.

    A vLLM /metrics answer is about 60 KB of text that the worker's API
    server renders on the worker's own core; polling an idle worker ten
    times a second would cost it CPU for figures that do not change.
    """
    last: dict[str, float] = {}
    while True:
        now = time.monotonic()
        due = []
        for b in list(registry.backends.values()):
            if b.state not in ("ready", "draining", "warming"):
                continue
            busy = b.inflight > 0 or b.running > 0 or b.waiting > 0
            interval = busy_interval_s if busy else idle_interval_s
            if now - last.get(b.id, 0.0) >= interval:
                last[b.id] = now
                due.append(scrape_once(session, b))
        if due:
            await asyncio.gather(*due)
        await asyncio.sleep(busy_interval_s / 2)
