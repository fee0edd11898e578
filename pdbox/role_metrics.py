"""The live autoscaler's inputs: one `RoleMetrics` per role, read from the running box.

Replay builds the same `RoleMetrics` from its simulation (pdbox/replay/autoscale.py);
this is the appliance's side. It is a function of what it is given (router metrics,
registry, supervisor workers, per-core CPU readings and the clock), so tests build it
without processes. Every field replay fills is filled here too
(tests/unit/test_role_metrics.py fails otherwise); docs/AUTOSCALER.md says what each
is computed from.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from pdbox.autoscaler import RoleMetrics
from pdbox.config import Profile, parse_core_set
from pdbox.router.engine_stats import summarize

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
        # A crash-looping worker is no capacity on its way, even while it starts
        # again; an unresponsive one serves nothing until it answers.
        failing = [w for w in ws if w.state == "unresponsive" or (
            w.state in (*STARTING_STATES, "backoff") and getattr(w, "crash_looping", False))]
        starting = [w for w in ws if w.state in STARTING_STATES and w not in failing]
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
            failing=len(failing),
            waiting=waiting,
            mean_wait_s=mean_wait_s(role, m, bs, now, since),
            ttft_p90_s=m.ttft.percentile(0.9, since) if role != "decode" else None,
            itl_p90_s=itl_p90_s(m, bs, since) if role != "prefill" else None,
            kv_usage=kv, utilization=util)
    return out


def mean_wait_s(role: str, router_metrics: Any, backends: Sequence[Any], now: float,
                since: float) -> float | None:
    """How long this role's requests waited before being served, over the period.

    As replay measures it: the queue in front of the role, then the worker's
    own. In front of decode (or aggregated) workers stands the router's
    admission queue: the mean wait of the requests admitted in the period,
    or, when none was, the age of the oldest still waiting. Inside a worker it
    is vLLM's `vllm:request_queue_time_seconds`, read as deltas per scrape;
    while requests wait there and none has finished waiting yet, the wait is
    unknown (None), which the autoscaler reads as "requests wait".
    """
    queued = summarize(h for b in backends for h in b.engine.since("queue", since))
    if queued.count:
        in_worker: float | None = queued.mean
    elif any(b.waiting for b in backends):
        in_worker = None
    else:
        in_worker = 0.0
    if role == "prefill" or in_worker is None:
        return in_worker
    admitted = router_metrics.admission_wait.mean(since)
    if admitted is None:
        admitted = router_metrics.oldest_wait_s(now) or 0.0
    return admitted + in_worker


def itl_p90_s(router_metrics: Any, backends: Sequence[Any], since: float) -> float | None:
    """ITL p90: the router's, per streamed token; with no stream in the period (answers
    that are not streamed have no client-side gaps) the role's engines' own, from vLLM's
    `vllm:inter_token_latency_seconds` deltas."""
    seen = router_metrics.itl.percentile(0.9, since)
    if seen is not None:
        return seen
    return summarize(h for b in backends for h in b.engine.since("itl", since)).p90
