"""The control API's status snapshot, built from what the appliance holds.

One function of its inputs: the registry (what the router knows of each
worker), the fleet's workers (what the supervisor knows), the router's and the
autoscaler's snapshots, and the hardware readings.
"""

from __future__ import annotations

from typing import Any

from pdbox.config import Profile


def workers_view(backends: dict[str, Any], managed: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per worker: routed ones first from the registry, then those not yet in it."""
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
        })
    for w in managed.values():
        if w.id not in backends:
            rows.append({"id": w.id, "role": w.role, "state": w.state, "pid": w.pid,
                         "port": w.spec.ports.http, "slice": w.spec.slice,
                         "cores": w.spec.cores or None, "sm_percent": w.spec.sm_percent,
                         "memory_fraction": w.spec.memory_fraction, "queue": None,
                         "running": None, "inflight": 0, "kv_usage": None,
                         "prefix_hit_rate": None, "restarts": w.restarts,
                         "last_recovery_s": w.last_recovery_s, "log": str(w.log_path)})
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
