"""Stage 3, match: how many of a prompt's leading blocks each worker holds.

Two indexes answer (prefix_index.py): a worker's KV events while its feed is
healthy (they see evictions), else what the router itself sent there. This
stage also owns the promise a prefill makes: once a worker has prefilled a
prompt its index lacked, that worker's KV events about it are due, and a
feed that stays silent is taken for dead (kv_events.py).
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Sequence

from pdbox.router.backends import Registry
from pdbox.router.prefix_index import ApproxIndex, PreciseIndex


class PrefixMatch:
    def __init__(self, registry: Registry, approx: ApproxIndex,
                 precise: PreciseIndex | None) -> None:
        self.registry = registry
        self.approx = approx
        self.precise = precise
        # request id -> (worker, prompt block hashes, sent at): KV events due once prefilled
        self._awaiting: dict[str, tuple[str, Sequence[int], float]] = {}

    def match(self, ids: Iterable[str], hashes: Sequence[int]) -> dict[str, float]:
        """Leading blocks each worker holds: from its KV events while their feed is
        healthy (they see evictions), else from what the router sent it."""
        ids = list(ids)
        m: dict[str, float] = dict(self.approx.match_all(ids, hashes))
        if self.precise is not None and self.precise.feeds:
            now = time.monotonic()
            for wid in ids:
                if self.precise.trusted(wid, now):
                    m[wid] = self.precise.match(wid, hashes)
        return m

    def record(self, worker_id: str, hashes: Sequence[int]) -> None:
        """The router sent these blocks to this worker (the approximate index)."""
        self.approx.record(worker_id, hashes)

    def size_index(self) -> None:
        """Bound the approximate index by what a worker's KV cache really holds.

        An index larger than the cache believes in blocks long evicted; one
        smaller forgets blocks still there. Replays put the best bound at the
        cache size itself (docs/ROUTING.md).
        """
        sizes = [b.num_blocks for b in self.registry.backends.values() if b.num_blocks]
        if sizes:
            self.approx.blocks_per_worker = min(sizes)

    # ------------------------------------------------------- due KV events

    def sent(self, request_id: str, worker_id: str, hashes: Sequence[int], at: float) -> None:
        if self.precise is not None:
            self._awaiting[request_id] = (worker_id, hashes, at)

    def blocks_cached(self, request_id: str) -> None:
        """A request's prefill is done on a worker: if its index lacks the prompt's
        blocks, that worker's KV events about them are due (a silent feed is dead)."""
        sent = self._awaiting.pop(request_id, None)
        if sent is None or self.precise is None:
            return
        wid, hashes, since = sent
        feed = self.precise.feeds.get(wid)
        if feed is not None and self.precise.match(wid, hashes) < len(hashes):
            feed.expect(since, time.monotonic())

    def done(self, request_id: str) -> None:
        self._awaiting.pop(request_id, None)

    def forget_worker(self, worker_id: str) -> None:
        self.approx.remove_worker(worker_id)
        if self.precise is not None:
            self.precise.remove_worker(worker_id)
