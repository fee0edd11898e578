"""Off the request path: the router's status snapshot, and what it learns from the
workers' engine figures once a second (the appliance's history loop calls both)."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from pdbox.calibration import Calibration
from pdbox.router.admission import Admission
from pdbox.router.backends import Backend, Registry
from pdbox.router.engine_stats import engine_snapshot
from pdbox.router.legs import Legs
from pdbox.router.metrics import RouterMetrics
from pdbox.router.migration import Migrator
from pdbox.router.policy import PDDecider
from pdbox.router.prefix_index import PreciseIndex
from pdbox.router.record import Recorder
from pdbox.router.soft_roles import RoleMix, SoftRoles, split_shares


class RouterStatus:
    def __init__(self, registry: Registry, metrics: RouterMetrics, admission: Admission,
                 decider: PDDecider, soft: SoftRoles, role_mix: RoleMix,
                 precise: PreciseIndex | None, recorder: Recorder, legs: Legs,
                 calibration: dict[str, Calibration],
                 slice_key: Callable[[str], str], migrator: Migrator | None = None) -> None:
        self.registry = registry
        self.metrics = metrics
        self.admission = admission
        self.decider = decider
        self.soft = soft
        self.role_mix = role_mix
        self.precise = precise
        self.recorder = recorder
        self.legs = legs
        self.calibration = calibration
        self.slice_key = slice_key
        self.migrator = migrator
        self._seen: dict[tuple[str, ...], tuple[float, ...]] = {}
        # worker -> (sum, count) of its engine prefill time when last learnt from
        self._prefill_seen: dict[str, tuple[float, float]] = {}
        self._pulled_before: dict[str, bool] = {}

    def learn_transfers(self) -> None:
        """Feed the decider what the workers' engines measured since the last call.

        - vLLM counts each KV pull on the decode worker in
          vllm:nixl_xfer_time_seconds (sum and count); the difference since
          the previous call is the mean of the transfers that just happened.
        - vllm:request_prefill_time_seconds (from the engine scheduling a
          request to its first token: no queue, no HTTP) with
          vllm:request_prefill_kv_computed_tokens (prompt tokens computed,
          cache hits excluded) give each worker's own prefill speed, the
          decider's preferred teacher.
        """
        pulls, pulled = self.legs.kv_pulls, self.legs.kv_pulled
        for b in self.registry.backends.values():
            self.decider.set_slice(b.id, self.slice_key(b.role))
            xfer = self._delta(b, "vllm:nixl_xfer_time_seconds_sum",
                               "vllm:nixl_xfer_time_seconds_count")
            if xfer is not None and xfer[1] > 0 and xfer[0] >= 0:
                self.decider.observe_transfer(xfer[0] / xfer[1])
            # A request whose KV was pulled counts as "computed" on the decode worker
            # (vLLM reports the prefill side's cache hits for it), with the pull as its
            # prefill time: a window that holds one is no prefill speed. NIXL's own
            # counters lag a stats tick, hence the previous call's too.
            was_pulled = bool(xfer and xfer[1] > 0)
            mixed = was_pulled or b.id in pulled or self._pulled_before.get(b.id, False)
            self._pulled_before[b.id] = was_pulled
            if not pulls.get(b.id):
                pulled.discard(b.id)
            # Prompt tokens computed and engine prefill time of the requests
            # that finished since the last call (the same requests in both).
            tokens = self._delta(b, "vllm:request_prefill_kv_computed_tokens_sum",
                                 "vllm:request_prefill_kv_computed_tokens_count")
            seconds = b.engine.total("prefill")
            prev = self._prefill_seen.get(b.id)
            if seconds is not None:
                self._prefill_seen[b.id] = (seconds.sum, seconds.count)
            if tokens is not None and seconds is not None and prev is not None \
                    and seconds.count - prev[1] == tokens[1] > 0 and not mixed:
                self.decider.observe_engine_prefill(b.id, tokens[0], seconds.sum - prev[0],
                                                    tokens[1])

    def _delta(self, b: Backend, *names: str) -> tuple[float, ...] | None:
        """How much each named series grew since the previous call (None: first sight).

        A count that fell means the worker restarted: start again from there.
        """
        now = tuple(b.metrics.get(n) for n in names)
        if any(v is None for v in now):
            return None
        cur = tuple(float(v) for v in now if v is not None)
        prev = self._seen.get((b.id, *names))
        self._seen[(b.id, *names)] = cur
        if prev is None or any(c < p for c, p in zip(cur, prev, strict=True)):
            return None
        return tuple(c - p for c, p in zip(cur, prev, strict=True))

    def snapshot(self, policy: str, window_s: float = 60.0) -> dict[str, Any]:
        now = time.monotonic()
        since = now - window_s
        m = self.metrics
        remote, local = m.pd.get(path="remote"), m.pd.get(path="local")
        xfer_ms = mbps = None
        tsum = tcnt = bsum = 0.0
        for b in self.registry.backends.values():
            tsum += b.metrics.get("vllm:nixl_xfer_time_seconds_sum", 0.0)
            tcnt += b.metrics.get("vllm:nixl_xfer_time_seconds_count", 0.0)
            bsum += b.metrics.get("vllm:nixl_bytes_transferred_sum", 0.0)
        if tcnt:
            xfer_ms = 1000 * tsum / tcnt
            mbps = (bsum / 1e6) / tsum if tsum else None
        return {
            **m.live_figures(now, since),
            "pd_remote": int(remote),
            "pd_local": int(local),
            "pd_share": remote / (remote + local) if remote + local else None,
            "fallbacks": int(m.fallbacks.total()),
            "rejected_429": int(m.rejected.total()),
            "queued": self.admission.queued,
            # Each way a request ended (pdbox_requests_total), and why 429s were given.
            "ends": {dict(k).get("outcome", ""): int(v) for k, v in m.requests.values.items()},
            "rejected_by": dict(self.admission.refused_by),
            # Streams moved off dead or frozen workers, and the workers taken for frozen.
            "migrations": self.migrator.snapshot() if self.migrator is not None else {},
            "nixl_xfer_ms": xfer_ms,
            "nixl_mb_per_s": mbps,
            "policy": policy,
            "decider": self.decider.estimates(),
            "calibration": {k: c.to_dict() for k, c in self.calibration.items()},
            "soft_roles": self.soft_roles(now),
            "kv_events": {wid: f.snapshot() for wid, f in sorted(self.precise.feeds.items())}
            if self.precise is not None else {},
            "last_decisions": [d.to_dict() for d in list(self.recorder.decisions)[-10:]],
            "engine": engine_snapshot(self.registry.backends.values(), now),
        }

    def soft_roles(self, now: float) -> dict[str, Any]:
        """Each worker's effective role mix over the window, and the box's split of legs."""
        mix = self.role_mix.mix(now, sorted(self.registry.backends))
        return {"enabled": self.soft.enabled, "window_s": self.role_mix.window_s,
                "role_mix": mix, "split": split_shares(mix),
                "prefilling": {b.id: self.soft.prefilling(b.id, now)
                               for b in self.registry.backends.values() if b.role == "prefill"}}
