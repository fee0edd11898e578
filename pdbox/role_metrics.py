"""The live autoscaler's inputs: one `RoleMetrics` per role, read from the running box.

Replay builds the same `RoleMetrics` from its simulation (pdbox/replay/autoscale.py);
this is the appliance's side. It is a function of what it is given (router metrics,
registry, supervisor workers, per-core CPU readings and the clock), so tests build it
without processes.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from pdbox.autoscaler import RoleMetrics
from pdbox.config import Profile, parse_core_set

STARTING_STATES = ("starting", "warming", "restarting")


def role_metrics(
    profile: Profile,
    *,
    now: float,
    period_s: float,
    router_metrics: Any,
    admission_queued: float,
    backends: Mapping[str, Any],
    workers: Iterable[Any],
    per_core: Sequence[float | None] = (),
) -> dict[str, RoleMetrics]:
    """What each role measured over the last period (at least 10 s)."""
    out: dict[str, RoleMetrics] = {}
    since = now - max(period_s, 10.0)
    m = router_metrics
    workers = list(workers)
    for role in profile.roles():
        ws = [w for w in workers if w.role == role]
        ready = [w for w in ws if w.state == "ready"]
        starting = [w for w in ws if w.state in STARTING_STATES]
        draining = [w for w in ws if w.state == "draining"]
        bs = [b for b in (backends.get(w.id) for w in ready) if b is not None]
        waiting = float(sum(b.waiting for b in bs))
        if role in ("decode", "aggregated"):
            waiting += admission_queued
        kv = sum(b.kv_usage for b in bs) / len(bs) if bs else None
        util = None
        # A decoding vLLM worker reads near 100 % CPU at any batch size, so
        # utilization is a scaling signal for prefill only.
        if per_core and profile.hardware.device == "cpu" and role == "prefill":
            cores = {c for w in ready for c in parse_core_set(w.spec.cores or "0")}
            vals = [per_core[c] for c in cores if c < len(per_core) and per_core[c] is not None]
            util = (sum(vals) / len(vals) / 100.0) if vals else None  # type: ignore[arg-type]
        out[role] = RoleMetrics(
            ready=len(ready), starting=len(starting), draining=len(draining),
            waiting=waiting,
            ttft_p90_s=m.ttft.percentile(0.9, since) if role != "decode" else None,
            itl_p90_s=m.itl.percentile(0.9, since) if role != "prefill" else None,
            kv_usage=kv, utilization=util)
    return out
