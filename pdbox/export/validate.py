"""Offline validation of an export.

Core kinds are checked against the Kubernetes OpenAPI schemas that the
`kubernetes-validate` package ships (strict: unknown fields fail). The
InferencePool is checked against its CRD's schema, shipped beside this module,
plus the CRD's two CEL rules re-stated in Python (JSON Schema cannot express
them). The scheduler config is checked for dangling plugin references, which
the EPP would only report when it starts in the cluster.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from pdbox.export import targets as T
from pdbox.export.ledger import Export

POOL_SCHEMA = Path(__file__).with_name("inferencepool-v1.schema.json")

# Plugin types of llm-d-inference-scheduler v0.8.0 an export may use.
KNOWN_PLUGINS = {
    "approx-prefix-cache-producer",
    "prefix-cache-scorer",
    "queue-scorer",
    "kv-cache-utilization-scorer",
    "max-score-picker",
    "random-picker",
    "prefill-filter",
    "decode-filter",
    "prefix-based-pd-decider",
    "always-disagg-pd-decider",
    "disagg-headers-handler",
    "disagg-profile-handler",
    "single-profile-handler",
}


class ValidatorMissing(Exception):
    """kubernetes-validate is not installed (it is a dev dependency)."""


def validate(export: Export, k8s_version: str = T.KUBERNETES_VERSION) -> list[str]:
    """Every problem found, as 'Kind/name: message' lines; empty when valid."""
    try:
        import kubernetes_validate
    except ImportError:
        raise ValidatorMissing(
            "validation needs the kubernetes-validate package (pip install kubernetes-validate)"
        ) from None
    errors: list[str] = []
    for obj in export.objects:
        where = f"{obj.get('kind')}/{obj.get('metadata', {}).get('name')}"
        if obj.get("kind") == "InferencePool":
            errors += [f"{where}: {e}" for e in validate_inference_pool(obj)]
            continue
        try:
            kubernetes_validate.validate(obj, k8s_version, strict=True)
        except kubernetes_validate.ValidationError as exc:
            path = ".".join(str(p) for p in exc.path)
            errors.append(f"{where}: {path}: {exc.message}")
        except kubernetes_validate.SchemaNotFoundError as exc:
            errors.append(f"{where}: {exc.message}")
    from pdbox.export.llmd import epp_config_of

    errors += [f"EndpointPickerConfig: {e}" for e in validate_epp_config(epp_config_of(export))]
    return errors


def validate_inference_pool(obj: dict[str, Any]) -> list[str]:
    import jsonschema

    doc = json.loads(POOL_SCHEMA.read_text())
    errors = []
    if obj.get("apiVersion") != doc["apiVersion"]:
        errors.append(f"apiVersion must be {doc['apiVersion']}, not {obj.get('apiVersion')}")
    validator = jsonschema.Draft202012Validator(doc["schema"])
    for err in sorted(validator.iter_errors(obj), key=lambda e: list(e.path)):
        path = ".".join(str(p) for p in err.path)
        errors.append(f"{path}: {err.message}")
    spec = obj.get("spec") or {}
    ref = spec.get("endpointPickerRef") or {}
    if ref and ref.get("kind", "Service") == "Service" and "port" not in ref:
        errors.append("spec.endpointPickerRef: port is required when kind is 'Service'")
    numbers = [p.get("number") for p in spec.get("targetPorts") or [] if isinstance(p, dict)]
    if len(numbers) != len(set(numbers)):
        errors.append("spec.targetPorts: port number must be unique")
    return errors


def validate_epp_config(cfg: dict[str, Any]) -> list[str]:
    errors = []
    if cfg.get("apiVersion") != T.EPP_CONFIG_API_VERSION:
        errors.append(f"apiVersion must be {T.EPP_CONFIG_API_VERSION}")
    if cfg.get("kind") != "EndpointPickerConfig":
        errors.append("kind must be EndpointPickerConfig")
    defined: dict[str, str] = {}
    for p in cfg.get("plugins", []):
        name = p.get("name", p.get("type"))
        if p.get("type") not in KNOWN_PLUGINS:
            errors.append(f"plugin type {p.get('type')!r} is not one of v0.8.0's used here")
        if name in defined:
            errors.append(f"plugin {name!r} is defined twice")
        defined[name] = p.get("type", "")
    for p in cfg.get("plugins", []):
        for ref in (p.get("parameters", {}).get("deciders") or {}).values():
            if ref not in defined:
                errors.append(f"{p['type']} names decider {ref!r}, which is not defined")
    for prof in cfg.get("schedulingProfiles", []):
        for entry in prof.get("plugins", []):
            ref = entry.get("pluginRef")
            if ref not in defined:
                errors.append(f"profile {prof.get('name')!r} refers to undefined plugin {ref!r}")
            w = entry.get("weight")
            if w is not None and (not isinstance(w, int) or w < 0):
                errors.append(
                    f"profile {prof.get('name')!r}: weight of {ref} must be a whole number"
                )
    handlers = [t for t in defined.values() if t.endswith("profile-handler")]
    if len(handlers) != 1:
        errors.append(f"needs exactly one profile handler, found {len(handlers)}")
    names = {p.get("name") for p in cfg.get("schedulingProfiles", [])}
    if "disagg-profile-handler" in handlers and not {"prefill", "decode"} <= names:
        errors.append("P/D needs scheduling profiles named prefill and decode")
    return errors
