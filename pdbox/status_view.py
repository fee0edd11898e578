"""The control API's status snapshot, built from what the appliance holds.

One function of its inputs: the registry (what the router knows of each
worker), the fleet's workers (what the supervisor knows), the router's and the
autoscaler's snapshots, and the hardware readings.
"""

from __future__ import annotations

import time
from typing import Any

from pdbox.config import Profile


def health_view(w: Any, now: float) -> dict[str, Any]:
    """What the supervisor knows of a managed worker's failures: its failures in a
    row, whether it crash-loops, its back-off and when it tries next, and how long
    it has been silent on /health."""
    nxt = w.next_try_in(now)
    silent = now - w.unhealthy_since if w.unhealthy_since is not None else None
    return {
        "failures": w.failures,
        "crash_looping": w.crash_looping,
        "backoff_s": round(w.backoff_s, 1) if nxt is not None else None,
        "next_try_in_s": round(nxt, 1) if nxt is not None else None,
        "missed_probes": w.missed_probes,
        "silent_s": round(silent, 1) if silent is not None else None,
    }


def workers_view(backends: dict[str, Any], managed: dict[str, Any],
                 now: float | None = None) -> list[dict[str, Any]]:
    """One row per worker: routed ones first from the registry, then those not yet in it.

    `now` is the supervisor's clock (monotonic), for the back-off's countdown.
    """
    now = time.monotonic() if now is None else now
    rows = []
    for b in backends.values():
        w = managed.get(b.id)
        spec = w.spec if w else None
        rows.append({
            "id": b.id, "role": b.role, "state": w.state if w else b.state,
            "pid": w.pid if w else None,
            "port": spec.ports.http if spec else _port_of(b.url),
            "url": b.url,
            "slice": spec.slice if spec else "attached",
            "cores": spec.cores if spec and spec.cores else None,
            "sm_percent": spec.sm_percent if spec else None,
            "memory_fraction": spec.memory_fraction if spec else None,
            "queue": b.waiting, "running": b.running, "inflight": b.inflight,
            "kv_usage": b.kv_usage, "prefix_hit_rate": b.prefix_hit_rate(),
            "restarts": w.restarts if w else 0, "routed": b.routed,
            "last_recovery_s": w.last_recovery_s if w else None,
            "log": str(w.log_path) if w else None,
            **(health_view(w, now) if w else {}),
        })
    for w in managed.values():
        if w.id not in backends:
            rows.append({"id": w.id, "role": w.role, "state": w.state, "pid": w.pid,
                         "port": w.spec.ports.http, "slice": w.spec.slice,
                         "cores": w.spec.cores or None, "sm_percent": w.spec.sm_percent,
                         "memory_fraction": w.spec.memory_fraction, "queue": None,
                         "running": None, "inflight": 0, "kv_usage": None,
                         "prefix_hit_rate": None, "restarts": w.restarts,
                         "last_recovery_s": w.last_recovery_s, "log": str(w.log_path),
                         **health_view(w, now)})
    rows.sort(key=lambda x: x["id"])
    return rows


def autoscaler_view(profile: Profile, auto: dict[str, Any], workers: list[dict[str, Any]],
                    pinned: Any, enabled: bool) -> dict[str, Any]:
    auto["enabled"] = enabled
    roles = auto.setdefault("roles", {})
    for role, rc in profile.roles().items():
        cur = len([w for w in workers if w["role"] == role and w["state"] not in
                   ("draining", "stopped")])
        r = roles.setdefault(role, {})
        r.update({"current": cur, "min": rc.min, "max": rc.max, "pinned": pinned(role)})
        r.setdefault("desired", r.get("pinned") or cur)
    return auto


def _port_of(url: str) -> int | None:
    try:
        return int(url.rsplit(":", 1)[1].split("/")[0])
    except (IndexError, ValueError):
        return None
