"""Block hashes and the two prefix indexes the router scores workers with.

A prompt is cut into blocks of the engine's KV block size. Each block's hash
chains its parent's, so equal hashes mean equal tokens *and* equal prefix, and
"how much of this prompt does worker W hold" is the count of leading hashes W
holds. Only full blocks count: vLLM never caches a partial last block.

Two indexes answer that question:

- `ApproxIndex` remembers what the router itself sent where. It needs nothing
  from the workers, but it cannot see evictions, so it is bounded by an LRU
  per worker that should be about the worker's cache size.
- `PreciseIndex` is fed by vLLM's KV-cache events (`kv_events.py`), so it
  knows what each worker really holds, evictions included. While a worker's
  event feed is healthy (`trusted`), its precise view is the truth for it;
  the approximate index serves only workers without one.

Both are plain dicts in one thread (the router's event loop); no locks.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Hashable, Iterable, Sequence
from typing import Any, Protocol

# Seed of the first block's hash. Any constant works; a named one documents intent.
_ROOT = 0x5D_B0_C5


def block_hashes(token_ids: Sequence[int], block_size: int,
                 parent: int | None = None) -> list[int]:
    """Chained hashes of the full blocks of `token_ids` (after the block `parent`,
    when these ids continue a prompt whose earlier blocks are hashed already).

    Python's hash of a tuple of ints does not depend on PYTHONHASHSEED (only
    str/bytes hashing is salted), so these are stable across processes too.
    """
    if block_size <= 0:
        raise ValueError("block_size must be positive")
    ids = token_ids if isinstance(token_ids, tuple) else tuple(token_ids)
    out: list[int] = []
    parent = _ROOT if parent is None else parent
    for start in range(0, len(ids) - block_size + 1, block_size):
        parent = hash((parent, ids[start : start + block_size]))
        out.append(parent)
    return out


def chain_hash(parent: int | None, block_tokens: Sequence[int]) -> int:
    """The hash of one block given its parent's (None for the first block)."""
    return hash((_ROOT if parent is None else parent, tuple(block_tokens)))


def _leading(held: dict[int, Any] | OrderedDict[int, Any], hashes: Sequence[int]) -> int:
    n = 0
    for h in hashes:
        if h not in held:
            break
        n += 1
    return n


class ApproxIndex:
    """What the router sent where, LRU-bounded per worker.

    `record` inserts a prompt's blocks last-to-first, so the leading blocks end
    up most recent. vLLM frees a finished request's blocks tail first for the
    same reason: evicting a prompt's first block would orphan all the blocks
    after it, because matches are counted from the start.
    """

    def __init__(self, blocks_per_worker: int):
        if blocks_per_worker < 1:
            raise ValueError("blocks_per_worker must be at least 1")
        self.blocks_per_worker = blocks_per_worker
        self._workers: dict[str, OrderedDict[int, None]] = {}

    def match(self, worker_id: str, hashes: Sequence[int]) -> int:
        held = self._workers.get(worker_id)
        return _leading(held, hashes) if held else 0

    def match_all(self, worker_ids: Iterable[str], hashes: Sequence[int]) -> dict[str, int]:
        return {w: self.match(w, hashes) for w in worker_ids}

    def record(self, worker_id: str, hashes: Sequence[int]) -> None:
        held = self._workers.setdefault(worker_id, OrderedDict())
        for h in reversed(hashes):
            if h in held:
                held.move_to_end(h)
            else:
                held[h] = None
        over = len(held) - self.blocks_per_worker
        for _ in range(max(0, over)):
            held.popitem(last=False)

    def remove_worker(self, worker_id: str) -> None:
        self._workers.pop(worker_id, None)

    def clear(self, worker_id: str) -> None:
        if worker_id in self._workers:
            self._workers[worker_id] = OrderedDict()

    def size(self, worker_id: str) -> int:
        return len(self._workers.get(worker_id, ()))

    def workers(self) -> list[str]:
        return list(self._workers)


class Feed(Protocol):
    """A worker's KV-event feed as the index sees it (kv_events.KVEventSubscriber)."""

    def trusted(self, now: float) -> bool: ...

    def snapshot(self) -> dict[str, Any]: ...


class _WorkerBlocks:
    """One worker's blocks as its KV events describe them."""

    __slots__ = ("by_engine", "held", "lineage")

    def __init__(self, lineage: OrderedDict[Hashable, tuple[int, Hashable]] | None = None):
        # engine (vLLM) block hash -> router chained hash, in insertion order (for the bound)
        self.by_engine: OrderedDict[Hashable, int] = OrderedDict()
        # router hash -> how many engine blocks carry it (LoRA/salt variants share tokens)
        self.held: dict[int, int] = {}
        # engine hash -> (router hash, parent engine hash) of every block ever
        # announced: survives a clear after lost events, so a block announced
        # later on an old prefix can still be placed in its chain.
        self.lineage: OrderedDict[Hashable, tuple[int, Hashable]] = (
            lineage if lineage is not None else OrderedDict())

    def add(self, engine_hash: Hashable, router_hash: int) -> None:
        old = self.by_engine.get(engine_hash)
        if old is not None:
            self.by_engine.move_to_end(engine_hash)
            if old == router_hash:
                return
            self._drop_router(old)
        self.by_engine[engine_hash] = router_hash
        self.held[router_hash] = self.held.get(router_hash, 0) + 1

    def remove(self, engine_hash: Hashable) -> None:
        router_hash = self.by_engine.pop(engine_hash, None)
        if router_hash is not None:
            self._drop_router(router_hash)

    def evict_oldest(self) -> None:
        _, router_hash = self.by_engine.popitem(last=False)
        self._drop_router(router_hash)

    def _drop_router(self, router_hash: int) -> None:
        n = self.held.get(router_hash, 0) - 1
        if n <= 0:
            self.held.pop(router_hash, None)
        else:
            self.held[router_hash] = n


# A block held only in a host-memory tier (vLLM's OffloadingConnector, `medium`
# "CPU") saves its prefill but must be copied back to the GPU first: it counts
# as this much of a block held on the device.
HOST_TIER_WEIGHT = 0.5
DEVICE_MEDIA = (None, "GPU", "gpu", "cuda")


class PreciseIndex:
    """What each worker really caches, from vLLM's KV-cache events.

    vLLM's own block hashes depend on its hash function and seed, which the
    router does not share, so each stored block is re-hashed here from the
    token ids the event carries, chained on the router hash of its parent.
    A block whose parent the index never saw (events lost before we
    subscribed) cannot be placed in a chain and is ignored.

    A stored block's ancestors are in the worker's cache at that moment
    (vLLM caches a block only for a request that holds its prefix), so a
    block chained on a parent dropped by a clear puts that parent's chain
    back, from the lineage the clear kept.

    Bounded as a safety net for lost `BlockRemoved` events: past
    `max_blocks_per_worker` the oldest stored blocks are forgotten.

    `feeds` holds each worker's event feed; `trusted(worker, now)` says
    whether the precise view of that worker may be believed. `on_event`, if
    set, is told in one sentence about a feed's gap, recovery or death.
    """

    def __init__(self, block_size: int, max_blocks_per_worker: int = 1 << 18):
        if block_size <= 0 or max_blocks_per_worker < 1:
            raise ValueError("block_size and max_blocks_per_worker must be positive")
        self.block_size = block_size
        self.max_blocks_per_worker = max_blocks_per_worker
        self._workers: dict[str, _WorkerBlocks] = {}
        # Blocks in a host-memory tier, per worker (events whose medium is not the device).
        self._host: dict[str, _WorkerBlocks] = {}
        self.events_applied = 0
        self.blocks_skipped = 0
        self.feeds: dict[str, Feed] = {}
        self.on_event: Callable[[str], None] | None = None

    def notify(self, message: str) -> None:
        if self.on_event is not None:
            self.on_event(message)

    def trusted(self, worker_id: str, now: float) -> bool:
        feed = self.feeds.get(worker_id)
        return feed is not None and feed.trusted(now)

    def apply(self, worker_id: str, event: dict[str, Any]) -> str | None:
        """Apply one decoded event (a dict with "type" and vLLM's field names).

        Returns None when applied, else why not (the subscriber counts it).
        """
        kind = event.get("type")
        why: str | None = None
        if kind == "BlockStored":
            why = self._stored(worker_id, event)
        elif kind == "BlockRemoved":
            tiers = self._host if event.get("medium") not in DEVICE_MEDIA else self._workers
            wb = tiers.get(worker_id)
            if wb is not None:
                for h in event.get("block_hashes") or ():
                    wb.remove(_key(h))
        elif kind == "AllBlocksCleared":
            self.clear(worker_id)
        else:
            return f"unknown event type {kind!r}"
        if why is None:
            self.events_applied += 1
        return why

    def _stored(self, worker_id: str, ev: dict[str, Any]) -> str | None:
        group = ev.get("group_idx")
        if group not in (None, 0):
            return None  # hybrid models: only the first (full attention) group is indexed
        engine_hashes = ev.get("block_hashes") or []
        tokens = ev.get("token_ids") or []
        size = int(ev.get("block_size") or self.block_size)
        if size != self.block_size:
            # Token-exact matching needs the router's blocks to equal the engine's.
            self.blocks_skipped += len(engine_hashes)
            return f"block size {size}, router uses {self.block_size}"
        wb = self._workers.setdefault(worker_id, _WorkerBlocks())
        if ev.get("medium") not in DEVICE_MEDIA:
            return self._stored_host(worker_id, ev, wb, size)
        parent_engine = ev.get("parent_block_hash")
        parent_key: Hashable = None
        if parent_engine is None:
            parent: int | None = None
        else:
            parent_key = _key(parent_engine)
            parent = wb.by_engine.get(parent_key)
            if parent is None:
                parent = self._restore_chain(wb, parent_key)
            if parent is None:
                self.blocks_skipped += len(engine_hashes)
                return "parent block never announced"
        why = None
        for i, eh in enumerate(engine_hashes):
            block = tokens[i * size : (i + 1) * size]
            if len(block) < size:
                self.blocks_skipped += len(engine_hashes) - i
                why = "partial block"
                break
            parent = chain_hash(parent, block)
            key = _key(eh)
            wb.add(key, parent)
            wb.lineage[key] = (parent, parent_key)
            wb.lineage.move_to_end(key)
            parent_key = key
        while len(wb.by_engine) > self.max_blocks_per_worker:
            wb.evict_oldest()
        while len(wb.lineage) > self.max_blocks_per_worker:
            wb.lineage.popitem(last=False)
        return why

    def _stored_host(self, worker_id: str, ev: dict[str, Any], device: _WorkerBlocks,
                     size: int) -> str | None:
        """A block copied to a host tier: placed by the chain the device tier knows
        (offloaded blocks were device blocks first), else by its parent there."""
        host = self._host.setdefault(worker_id, _WorkerBlocks(device.lineage))
        parent_key: Hashable = None if ev.get("parent_block_hash") is None \
            else _key(ev["parent_block_hash"])
        parent = None
        if parent_key is not None:
            parent = host.by_engine.get(parent_key) or device.by_engine.get(parent_key)
            if parent is None and parent_key in device.lineage:
                parent = device.lineage[parent_key][0]
            if parent is None:
                self.blocks_skipped += len(ev.get("block_hashes") or [])
                return "parent block never announced"
        tokens = ev.get("token_ids") or []
        for i, eh in enumerate(ev.get("block_hashes") or []):
            key = _key(eh)
            known = device.lineage.get(key)
            block = tokens[i * size : (i + 1) * size]
            if known is not None:
                parent = known[0]
            elif len(block) == size:
                parent = chain_hash(parent, block)
            else:
                self.blocks_skipped += 1
                return "partial block"
            host.add(key, parent)
        while len(host.by_engine) > self.max_blocks_per_worker:
            host.evict_oldest()
        return None

    @staticmethod
    def _restore_chain(wb: _WorkerBlocks, engine_key: Hashable) -> int | None:
        """Mark a known block and its known ancestors held again; its router hash."""
        known = wb.lineage.get(engine_key)
        if known is None:
            return None
        key: Hashable = engine_key
        for _ in range(len(wb.lineage)):  # a chain is never longer (and never loops)
            if key is None or key in wb.by_engine:
                break
            entry = wb.lineage.get(key)
            if entry is None:
                break
            wb.add(key, entry[0])
            key = entry[1]
        return known[0]

    def match(self, worker_id: str, hashes: Sequence[int]) -> float:
        """Leading blocks the worker holds: one for each on the device, and
        HOST_TIER_WEIGHT for each only in a host tier."""
        wb = self._workers.get(worker_id)
        host = self._host.get(worker_id)
        if host is None or not host.held:
            return _leading(wb.held, hashes) if wb else 0
        device = wb.held if wb else {}
        n = 0.0
        for h in hashes:
            if h in device:
                n += 1.0
            elif h in host.held:
                n += HOST_TIER_WEIGHT
            else:
                break
        return n

    def match_all(self, worker_ids: Iterable[str], hashes: Sequence[int]) -> dict[str, float]:
        return {w: self.match(w, hashes) for w in worker_ids}

    def clear(self, worker_id: str) -> None:
        """Forget what the worker holds; keep how its blocks chain (see `_stored`)."""
        wb = self._workers.get(worker_id)
        if wb is not None:
            self._workers[worker_id] = _WorkerBlocks(wb.lineage)
        self._host.pop(worker_id, None)

    def remove_worker(self, worker_id: str) -> None:
        """The worker left or restarted: its cache and its engine's hashes are gone."""
        self._workers.pop(worker_id, None)
        self._host.pop(worker_id, None)

    def size(self, worker_id: str) -> int:
        wb = self._workers.get(worker_id)
        return len(wb.by_engine) if wb else 0


def _key(h: Any) -> Hashable:
    # Engine hashes are ints (VLLM_KV_EVENTS_USE_INT_BLOCK_HASHES) or bytes;
    # msgpack may hand bytes back as a list in odd encoders, so normalise.
    if isinstance(h, list):
        return tuple(h)
    return h
