"""Replay a trace through the router's Picker in simulated time.

The model is deliberately simple, so its figures are easy to reason about:

- Each worker has an LRU prefix cache of `cache_tokens` tokens, counted in
  the trace's blocks (512 tokens for Mooncake). A request's hit is the number
  of its leading blocks the worker holds; then all its blocks become the most
  recent, leading blocks last (so an eviction takes a prompt's tail first, as
  vLLM's free queue does).
- Each worker runs one continuous batch. Prefills are serial: a request waits
  for the prefills queued before it, then takes
  `uncached_tokens / prefill_tps` seconds. Its TTFT is that wait plus its own
  prefill. Decoding then runs beside other streams at `decode_s_per_token`
  per output token (batching assumed free).
- The router sees, per worker, `waiting` (prefills not finished), `running`
  (decoding) and `kv_usage` (tokens of live requests / cache size), the same
  figures vLLM's /metrics gives the live router.

Mooncake traces name blocks by `hash_ids`, already chained (equal id = equal
block and equal prefix), so they are the block hashes. Azure traces carry no
prefix data: every request gets unique blocks, and hit rate is 0 whatever
the policy; its replay measures balance only.

`index="precise"` lets the Picker see the true caches (what KV events give);
`index="approx"` gives it an `ApproxIndex` of `index_blocks` per worker that
only learns from its own routing decisions.
"""

from __future__ import annotations

import heapq
import itertools
from collections import OrderedDict, deque
from collections.abc import Sequence
from dataclasses import dataclass, field

from pdbox.replay.traces import MOONCAKE_BLOCK_TOKENS, TraceRequest
from pdbox.router.metrics import percentile
from pdbox.router.policy import POLICIES, Picker, ScoreWeights, WorkerView
from pdbox.router.prefix_index import ApproxIndex

SHARED = "shared_lru"
REPLAY_POLICIES = (*POLICIES, SHARED)


@dataclass(frozen=True)
class CostModel:
    prefill_tps: float = 10_000.0  # uncached prompt tokens per second, per worker
    decode_s_per_token: float = 0.030  # per output token of one stream


@dataclass
class _Worker:
    id: str
    cache_blocks: int
    cache: OrderedDict[int, None] = field(default_factory=OrderedDict)
    # (prefill end, tokens): FIFO with non-decreasing ends, since prefills are serial
    prefilling: deque[tuple[float, int]] = field(default_factory=deque)
    finishes: list[tuple[float, int]] = field(default_factory=list)  # heap (end, tokens)
    prefill_free_at: float = 0.0
    live_tokens: int = 0
    uncached_tokens: int = 0
    prompt_tokens: int = 0
    requests: int = 0

    def advance(self, now: float) -> None:
        # A request holds KV (counts in kv_usage) from the end of its prefill to
        # its last token; while it waits for its prefill it holds none.
        while self.prefilling and self.prefilling[0][0] <= now:
            _, tokens = self.prefilling.popleft()
            self.live_tokens += tokens
        while self.finishes and self.finishes[0][0] <= now:
            _, tokens = heapq.heappop(self.finishes)
            self.live_tokens -= tokens

    def view(self, cache_tokens: int) -> WorkerView:
        waiting = len(self.prefilling)
        running = len(self.finishes) - waiting
        return WorkerView(
            id=self.id,
            role="decode",
            url="",
            waiting=waiting,
            running=max(0, running),
            kv_usage=min(1.0, self.live_tokens / cache_tokens) if cache_tokens else 0.0,
        )


def _match(cache: OrderedDict[int, None], hashes: Sequence[int]) -> int:
    n = 0
    for h in hashes:
        if h not in cache:
            break
        n += 1
    return n


def _insert(cache: OrderedDict[int, None], hashes: Sequence[int], bound: int) -> None:
    for h in reversed(hashes):
        if h in cache:
            cache.move_to_end(h)
        else:
            cache[h] = None
    while len(cache) > bound:
        cache.popitem(last=False)


def _blocks_of(req: TraceRequest, block_tokens: int, counter: itertools.count) -> list[int]:
    if req.hash_ids:
        return list(req.hash_ids)
    # No prefix data: unique negative ids, so they never collide with trace ids.
    n = max(1, -(-req.input_tokens // block_tokens))
    return [-next(counter) - 1 for _ in range(n)]


def replay(
    requests: Sequence[TraceRequest],
    workers: int = 4,
    cache_tokens: int = 1_000_000,
    policy: str = "prefix",
    weights: object | None = None,
    balance_abs: float = 8,
    balance_rel: float = 1.5,
    index: str = "precise",
    index_blocks: int | None = None,
    cost: CostModel | None = None,
    block_tokens: int = MOONCAKE_BLOCK_TOKENS,
    rate_scale: float = 1.0,
) -> dict[str, object]:
    """Route `requests` over `workers` simulated workers; return the figures.

    `policy="shared_lru"` is the ceiling: one LRU of workers × cache_tokens
    shared by all (no duplication, no partitioning), routed least-loaded.
    """
    if policy not in REPLAY_POLICIES:
        raise ValueError(f"unknown policy {policy!r}; use one of {', '.join(REPLAY_POLICIES)}")
    if index not in ("precise", "approx"):
        raise ValueError(f"unknown index {index!r}; use precise or approx")
    if workers < 1 or cache_tokens < block_tokens:
        raise ValueError("need at least one worker and a cache of at least one block")
    if rate_scale <= 0:
        raise ValueError("rate_scale must be above 0")
    cost = cost or CostModel()
    blocks_per_worker = cache_tokens // block_tokens
    shared = policy == SHARED
    pool = [_Worker(f"w{i}", blocks_per_worker) for i in range(workers)]
    shared_cache: OrderedDict[int, None] = OrderedDict()
    shared_bound = blocks_per_worker * workers
    approx = ApproxIndex(index_blocks or blocks_per_worker) if index == "approx" else None
    picker = Picker(weights or ScoreWeights(), balance_abs=balance_abs, balance_rel=balance_rel)
    route_policy = "least_loaded" if shared else policy
    ids = [w.id for w in pool]
    by_id = {w.id: w for w in pool}
    unique = itertools.count()

    hit_blocks = total_blocks = 0
    ttfts: list[float] = []
    for req in requests:
        now = req.arrival_s / rate_scale
        hashes = _blocks_of(req, block_tokens, unique)
        for w in pool:
            w.advance(now)
        if route_policy == "prefix":
            if approx is not None:
                prefix = approx.match_all(ids, hashes)
            else:
                prefix = {w.id: _match(w.cache, hashes) for w in pool}
        else:
            prefix = {}
        views = [w.view(cache_tokens) for w in pool]
        chosen = by_id[picker.pick(views, prefix, len(hashes), route_policy).worker_id]
        if approx is not None:
            approx.record(chosen.id, hashes)

        cache = shared_cache if shared else chosen.cache
        hit = _match(cache, hashes)
        _insert(cache, hashes, shared_bound if shared else blocks_per_worker)
        hit_blocks += hit
        total_blocks += len(hashes)
        uncached = max(0, req.input_tokens - hit * block_tokens)

        start = max(now, chosen.prefill_free_at)
        prefill_end = start + uncached / cost.prefill_tps
        chosen.prefill_free_at = prefill_end
        finish = prefill_end + req.output_tokens * cost.decode_s_per_token
        live = req.input_tokens + req.output_tokens
        chosen.prefilling.append((prefill_end, live))
        heapq.heappush(chosen.finishes, (finish, live))
        chosen.uncached_tokens += uncached
        chosen.prompt_tokens += req.input_tokens
        chosen.requests += 1
        ttfts.append(prefill_end - now)

    uncached_per = [w.uncached_tokens for w in pool]
    mean_uncached = sum(uncached_per) / len(pool)
    return {
        "policy": policy,
        "index": "shared" if shared else (index if policy == "prefix" else None),
        "index_blocks": (
            (index_blocks or blocks_per_worker) if approx is not None and policy == "prefix" else None
        ),
        "workers": workers,
        "cache_tokens": cache_tokens,
        "requests": len(requests),
        "hit_rate": hit_blocks / total_blocks if total_blocks else 0.0,
        "hit_blocks": hit_blocks,
        "total_blocks": total_blocks,
        "imbalance": max(uncached_per) / mean_uncached if mean_uncached > 0 else 1.0,
        "ttft_p50_s": percentile(ttfts, 0.5),
        "ttft_p90_s": percentile(ttfts, 0.9),
        "ttft_p99_s": percentile(ttfts, 0.99),
        "per_worker": {
            w.id: {
                "requests": w.requests,
                "prompt_tokens": w.prompt_tokens,
                "uncached_tokens": w.uncached_tokens,
            }
            for w in pool
        },
        "cost_model": {
            "prefill_tps": cost.prefill_tps,
            "decode_s_per_token": cost.decode_s_per_token,
            "block_tokens": block_tokens,
            "rate_scale": rate_scale,
        },
    }
