"""`pdbox export llm-d`: a profile as plain Kubernetes manifests for llm-d.

Plain manifests rather than Helm values for llm-d's charts: they apply with
`kubectl apply -f DIR`, validate offline against the Kubernetes schemas, and
do not depend on a chart version whose values layout changes between llm-d
releases. docs/EXPORT.md maps every profile key.
"""

from __future__ import annotations

from typing import Any

from pdbox.config import Profile
from pdbox.export import autoscale, scheduler, workers
from pdbox.export import targets as T
from pdbox.export.ledger import Export, Ledger
from pdbox.export.names import Names


def build(
    profile: Profile,
    *,
    namespace: str = "default",
    replicas: dict[str, int] | None = None,
    image: str | None = None,
) -> Export:
    """Every object of the export, in apply order, and the ledger of keys.

    `replicas` overrides the profile's starting replica count per role (the
    counts a running pdbox's autoscaler settled on).
    """
    from pdbox.export.render import config_text  # PyYAML, imported lazily

    replicas = dict(replicas or {})
    names = Names(profile.name, namespace)
    led = Ledger()
    image = image or T.VLLM_IMAGES[profile.hardware.device]

    led.map("name", "annotation pdbox.dev/profile", profile.name)
    led.ignore("description", "free text; does not affect serving")
    led.map(
        "mode.kind",
        "P/D: prefill and decode Deployments, disagg-profile-handler; "
        "aggregated: one Deployment, single-profile-handler",
        "disagg-profile-handler" if profile.is_pd else "single-profile-handler",
    )
    led.map("hardware.device", "vLLM image", image)
    workers.book_shared(profile, led)
    scheduler.book_router_locals(profile, led)
    autoscale.book(profile, led)

    model = workers.model_ref(profile, led)
    cfg = scheduler.epp_config(profile, led)
    objects: list[dict[str, Any]] = scheduler.epp_objects(profile, names, config_text(cfg))

    hpas: list[dict[str, Any]] = []
    used: dict[str, int] = {}
    for role, rc in profile.roles().items():
        workers.book_role(profile, role, rc, led)
        count = replicas.get(role, rc.replicas)
        used[role] = count
        where = "from the running pdbox" if role in replicas else "from the profile"
        led.map(f"{role}.replicas", f"Deployment spec.replicas ({where})", count)
        objects.append(workers.deployment(profile, role, rc, names, count, image, model))
        if profile.autoscaler.enabled:
            hpas.append(autoscale.hpa(profile, role, rc, names, led))
        else:
            autoscale.book_role_without_hpa(role, led)
    objects.append(scheduler.inference_pool(names))
    objects += hpas
    return Export(
        profile=profile.name,
        objects=objects,
        warnings=_dedupe(led).warnings,
        mapped=led.mapped,
        ignored=led.ignored,
        replicas_from_status={r: used[r] for r in replicas if r in used},
    )


def _dedupe(led: Ledger) -> Ledger:
    seen: set[tuple[str, str]] = set()
    out = []
    for w in led.warnings:
        if (w.key, w.message) not in seen:
            seen.add((w.key, w.message))
            out.append(w)
    led.warnings = out
    return led


def epp_config_of(export: Export) -> dict[str, Any]:
    """The EndpointPickerConfig inside an export's ConfigMap, parsed back."""
    import yaml

    for obj in export.objects:
        if obj["kind"] == "ConfigMap" and scheduler.CONFIG_FILE in obj.get("data", {}):
            return yaml.safe_load(obj["data"][scheduler.CONFIG_FILE])
    raise KeyError("no EndpointPickerConfig in this export")
