"""One HorizontalPodAutoscaler per role with the local autoscaler's targets,
windows and bounds.

The HPA reads per-pod vLLM gauges through the custom metrics API, which needs
prometheus-adapter (docs/EXPORT.md has its rules). HPA takes the largest
replica count its metrics ask for, as pdbox's autoscaler takes the largest
of its per-metric wishes.
"""

from __future__ import annotations

import math
from typing import Any

from pdbox.config import Profile, RoleConfig
from pdbox.export import targets as T
from pdbox.export.ledger import Ledger
from pdbox.export.names import Names

HPA_DEFAULT_TOLERANCE = 0.1  # kube-controller-manager --horizontal-pod-autoscaler-tolerance
MAX_WINDOW_S = 3600  # HPA's limit for stabilizationWindowSeconds
MAX_PERIOD_S = 1800  # HPA's limit for a scaling policy's periodSeconds


def quantity(x: float) -> str:
    """A Kubernetes quantity: whole numbers plain, fractions in milli-units."""
    if float(x).is_integer():
        return str(int(x))
    return f"{round(x * 1000)}m"


def pods_metric(name: str, target: float) -> dict[str, Any]:
    return {
        "type": "Pods",
        "pods": {
            "metric": {"name": name},
            "target": {"type": "AverageValue", "averageValue": quantity(target)},
        },
    }


def book(profile: Profile, led: Ledger) -> None:
    """The autoscaler's own keys (not per role)."""
    a = profile.autoscaler
    if not a.enabled:
        led.map("autoscaler.enabled", "no HorizontalPodAutoscaler", None)
        for key in (
            "period_s",
            "tolerance",
            "scale_down_window_s",
            "max_scale_up_step",
            "panic_window_s",
            "panic_threshold",
            "target_queue_per_worker",
            "target_kv_usage",
            "target_utilization",
            "resplit",
            "resplit_dwell_s",
        ):
            led.ignore(f"autoscaler.{key}", "autoscaler disabled")
        return
    led.map("autoscaler.enabled", "one HorizontalPodAutoscaler per role", "HorizontalPodAutoscaler")
    period = _period(a.period_s)
    led.map("autoscaler.period_s", "scaleUp policy periodSeconds", period)
    led.warn(
        "autoscaler.period_s",
        f"the HPA controller evaluates every pod set on one cluster-wide period "
        f"(--horizontal-pod-autoscaler-sync-period, default 15 s), not every {a.period_s:g} s; "
        "the export uses the period for the scale-up rate only",
    )
    if abs(a.tolerance - HPA_DEFAULT_TOLERANCE) < 1e-9:
        led.map("autoscaler.tolerance", "HPA default tolerance (0.1)", None)
    else:
        led.warn(
            "autoscaler.tolerance",
            f"{a.tolerance:g} differs from the HPA's cluster-wide tolerance (0.1, "
            "--horizontal-pod-autoscaler-tolerance); per-HPA tolerance is an alpha field "
            "(HPAConfigurableTolerance) and is not exported",
        )
    window = min(MAX_WINDOW_S, math.ceil(a.scale_down_window_s))
    led.map("autoscaler.scale_down_window_s", "scaleDown stabilizationWindowSeconds", window)
    if a.scale_down_window_s > MAX_WINDOW_S:
        led.warn("autoscaler.scale_down_window_s", f"capped at the HPA's limit of {MAX_WINDOW_S} s")
    led.map("autoscaler.max_scale_up_step", "scaleUp policy type Pods value", a.max_scale_up_step)
    for key in ("panic_window_s", "panic_threshold"):
        led.warn(
            f"autoscaler.{key}",
            "the HPA has no panic mode; a burst is followed at the scale-up policy's rate",
        )
    led.map(
        "autoscaler.target_queue_per_worker",
        f"Pods metric {T.METRIC_QUEUE}",
        quantity(a.target_queue_per_worker),
    )
    led.map("autoscaler.target_kv_usage", f"Pods metric {T.METRIC_KV}", quantity(a.target_kv_usage))
    led.warn(
        "autoscaler.target_utilization",
        "vLLM exports no per-pod utilization gauge to scale on; only the queue and KV-use "
        "targets are exported",
    )
    if a.resplit:
        led.warn(
            "autoscaler.resplit",
            "re-splitting one GPU between roles has no meaning when each pod has its own",
        )
    else:
        led.ignore("autoscaler.resplit", "off")
    led.ignore("autoscaler.resplit_dwell_s", "no re-split in the export")


def hpa(profile: Profile, role: str, rc: RoleConfig, names: Names, led: Ledger) -> dict[str, Any]:
    a = profile.autoscaler
    low = rc.min
    if low < 1:
        low = 1
        led.warn(
            f"{role}.min",
            "0 needs the HPAScaleToZero alpha feature gate; exported as minReplicas 1",
        )
    else:
        led.map(f"{role}.min", "HPA minReplicas", low)
    led.map(f"{role}.max", "HPA maxReplicas", rc.max)
    return {
        "apiVersion": "autoscaling/v2",
        "kind": "HorizontalPodAutoscaler",
        "metadata": names.meta(names.role(role), role),
        "spec": {
            "scaleTargetRef": {
                "apiVersion": "apps/v1",
                "kind": "Deployment",
                "name": names.role(role),
            },
            "minReplicas": low,
            "maxReplicas": rc.max,
            "metrics": [
                pods_metric(T.METRIC_QUEUE, a.target_queue_per_worker),
                pods_metric(T.METRIC_KV, a.target_kv_usage),
            ],
            "behavior": {
                "scaleUp": {
                    "stabilizationWindowSeconds": 0,
                    "selectPolicy": "Max",
                    "policies": [
                        {
                            "type": "Pods",
                            "value": a.max_scale_up_step,
                            "periodSeconds": _period(a.period_s),
                        }
                    ],
                },
                "scaleDown": {
                    "stabilizationWindowSeconds": min(
                        MAX_WINDOW_S, math.ceil(a.scale_down_window_s)
                    ),
                },
            },
        },
    }


def book_role_without_hpa(role: str, led: Ledger) -> None:
    for key in ("min", "max"):
        led.ignore(f"{role}.{key}", "autoscaler disabled: replicas stay as exported")


def _period(period_s: float) -> int:
    return max(1, min(MAX_PERIOD_S, math.ceil(period_s)))
