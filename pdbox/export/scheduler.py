"""llm-d's inference scheduler (the EPP): its plugin config, its Deployment,
and the InferencePool that ties the model-server pods to it.

The EndpointPickerConfig mirrors pdbox's router: the same scorer weights
(prefix, queue, KV use), prefix matching at the engine's KV block size, and
the P/D decider with the same uncached-token threshold.
"""

from __future__ import annotations

from fractions import Fraction
from typing import Any

from pdbox.config import Profile
from pdbox.export import targets as T
from pdbox.export.ledger import Ledger
from pdbox.export.names import Names

CONFIG_FILE = "epp-config.yaml"
# What a profile's "auto" P/D gate becomes in llm-d, whose decider takes a fixed
# count: pdbox's speeds are measured on this box, not on the cluster's GPUs. The
# GPU profiles fix 512; a CPU profile exported to a GPU cluster gets the same.
EXPORT_AUTO_GATE = 512
PRODUCER = "approx-prefix-cache-producer"
SCORERS = {
    "prefix": "prefix-cache-scorer",
    "queue": "queue-scorer",
    "kv": "kv-cache-utilization-scorer",
}


def integer_weights(weights: dict[str, float]) -> tuple[dict[str, int], bool]:
    """Scale weights to whole numbers with the same ratios.

    The EPP reads weights as integers; max-score-picker's choice depends only
    on their ratios, so 1.5/1/1 becomes 3/2/2. Returns (weights, exact).
    """
    fracs = {k: Fraction(v).limit_denominator(100) for k, v in weights.items()}
    lcm = 1
    for f in fracs.values():
        lcm = lcm * f.denominator // _gcd(lcm, f.denominator)
    out = {k: int(f * lcm) for k, f in fracs.items()}
    exact = all(abs(out[k] / lcm - weights[k]) < 1e-9 for k in weights)
    return out, exact


def _gcd(a: int, b: int) -> int:
    while b:
        a, b = b, a % b
    return a


def epp_config(profile: Profile, led: Ledger) -> dict[str, Any]:
    r = profile.router
    block = profile.model.block_size
    max_blocks = max(1, profile.model.max_model_len // block)
    producer = {
        "type": PRODUCER,
        "parameters": {
            # autoTune would size blocks from server metrics; pin them to the
            # engine's KV block size, as pdbox's index does.
            "autoTune": False,
            "blockSizeTokens": block,
            "maxPrefixBlocksToMatch": max_blocks,
            "lruCapacityPerServer": r.index_blocks_per_worker,
        },
    }
    led.map(
        "router.index_blocks_per_worker",
        f"{PRODUCER} lruCapacityPerServer",
        r.index_blocks_per_worker,
    )
    if r.kv_events:
        led.warn(
            "router.kv_events",
            "pdbox builds an exact prefix index from vLLM's KV events; the export uses "
            f"llm-d's {PRODUCER} (an index of its own routing history), because the exact "
            "one (precise-prefix-cache-producer) also needs a tokenizer and "
            "--kv-events-config per pod",
        )
    else:
        led.map("router.kv_events", f"{PRODUCER} (routing-history index)", PRODUCER)

    # Scorers and picker from the policy.
    plugins: list[dict[str, Any]] = [producer]
    scored: list[dict[str, Any]] = []
    picker = "max-score-picker"
    if r.policy == "round_robin":
        picker = "random-picker"
        led.warn(
            "router.policy",
            "llm-d has no round-robin picker; exported as random-picker with no scorers, "
            "which spreads requests uniformly at random",
        )
        for wk in ("prefix", "queue", "kv"):
            led.ignore(f"router.weights.{wk}", "round_robin uses no scorer")
    else:
        raw = {"prefix": r.weights.prefix, "queue": r.weights.queue, "kv": r.weights.kv}
        if r.policy == "least_loaded":
            raw["prefix"] = 0.0
            led.ignore("router.weights.prefix", "least_loaded ignores prefix affinity")
        ints, exact = integer_weights({k: v for k, v in raw.items() if v > 0})
        for wk in ("prefix", "queue", "kv"):
            if wk in ints:
                scored.append({"pluginRef": SCORERS[wk], "weight": ints[wk]})
                led.map(f"router.weights.{wk}", f"{SCORERS[wk]} weight", ints[wk])
                if not exact:
                    led.warn(
                        f"router.weights.{wk}",
                        "weights were rounded to whole numbers; their ratios changed slightly",
                    )
            elif not (wk == "prefix" and r.policy == "least_loaded"):
                led.map(f"router.weights.{wk}", f"{SCORERS[wk]} left out (weight 0)", None)
        led.map("router.policy", "scorers in each scheduling profile", picker)
    used = [s["pluginRef"] for s in scored]
    plugins += [{"type": name} for name in SCORERS.values() if name in used]
    plugins.append({"type": picker})

    if profile.is_pd:
        plugins += _pd_plugins(profile, led)
        profiles = [
            {
                "name": role,
                "plugins": [{"pluginRef": f"{role}-filter"}, {"pluginRef": picker}] + scored,
            }
            for role in ("prefill", "decode")
        ]
    else:
        plugins.append({"type": "single-profile-handler"})
        profiles = [{"name": "default", "plugins": [{"pluginRef": picker}, *scored]}]
        led.ignore("router.pd_min_uncached_tokens", "no P/D in an aggregated profile")
        led.ignore("router.pd_decider", "no P/D in an aggregated profile")
        led.ignore("router.soft_roles", "no P/D in an aggregated profile")
        led.ignore("router.soft_roles_hold_s", "no P/D in an aggregated profile")
        led.ignore("router.hybrid", "no P/D in an aggregated profile")
    return {
        "apiVersion": T.EPP_CONFIG_API_VERSION,
        "kind": "EndpointPickerConfig",
        "plugins": plugins,
        "schedulingProfiles": profiles,
    }


def _pd_plugins(profile: Profile, led: Ledger) -> list[dict[str, Any]]:
    r = profile.router
    gate = r.fixed_gate
    if gate is None:
        # llm-d's decider takes a fixed count; "auto" follows speeds measured on
        # this box, which say nothing of the cluster's GPUs.
        gate = EXPORT_AUTO_GATE
        led.warn("router.pd_min_uncached_tokens",
                 f"\"auto\" follows this box's measured speeds; llm-d takes a fixed count, "
                 f"so the export sets {gate} tokens (set an integer in the profile to choose)")
    if gate == 0:
        decider: dict[str, Any] = {"type": "always-disagg-pd-decider"}
        led.map(
            "router.pd_min_uncached_tokens",
            "always-disagg-pd-decider (threshold 0)",
            "always-disagg-pd-decider",
        )
    else:
        decider = {
            "type": "prefix-based-pd-decider",
            "parameters": {"nonCachedTokens": gate},
        }
        led.map(
            "router.pd_min_uncached_tokens",
            "prefix-based-pd-decider nonCachedTokens (llm-d estimates tokens as bytes / 4)",
            gate,
        )
    if r.soft_roles:
        led.warn(
            "router.soft_roles",
            "a prefill pod serving short requests whole while it has no prefill work has no "
            "llm-d equivalent: the exported pods keep a fixed P/D split",
        )
        led.ignore("router.soft_roles_hold_s", "soft roles are not exported")
        if r.hybrid:
            led.warn("router.hybrid", "pods that serve whole requests and split per request in "
                     "either direction have no llm-d equivalent: the export keeps a fixed "
                     "P/D split")
        else:
            led.ignore("router.hybrid", "off")
    else:
        led.ignore("router.soft_roles", "off: a fixed P/D split, as the export")
        led.ignore("router.soft_roles_hold_s", "soft roles are off")
        led.ignore("router.hybrid", "soft roles are off")
    if r.pd_decider == "adaptive":
        led.warn(
            "router.pd_decider",
            '"adaptive" also predicts TTFT from prefill speed, transfer time and queueing; '
            "llm-d v0.8.0 has no such decider, so the export keeps only the uncached-token "
            "threshold",
        )
    else:
        led.map("router.pd_decider", "prefix-based-pd-decider", decider["type"])
    return [
        {"type": "prefill-filter"},
        {"type": "decode-filter"},
        decider,
        # Puts the chosen prefill pod in the x-prefiller-host-port header for
        # the decode pod's routing sidecar.
        {"type": "disagg-headers-handler"},
        {
            "type": "disagg-profile-handler",
            "parameters": {"deciders": {"prefill": decider["type"]}},
        },
    ]


def epp_objects(profile: Profile, names: Names, config_text: str) -> list[dict[str, Any]]:
    """ServiceAccount, Role, RoleBinding, ConfigMap, Deployment and Service of the EPP."""
    comp = "epp"
    sa = {"apiVersion": "v1", "kind": "ServiceAccount", "metadata": names.meta(names.epp, comp)}
    read = ["get", "list", "watch"]
    role = {
        "apiVersion": "rbac.authorization.k8s.io/v1",
        "kind": "Role",
        "metadata": names.meta(names.epp, comp),
        "rules": [
            {"apiGroups": [""], "resources": ["pods"], "verbs": read},
            {
                "apiGroups": ["inference.networking.k8s.io"],
                "resources": ["inferencepools"],
                "verbs": read,
            },
            {
                "apiGroups": ["inference.networking.x-k8s.io"],
                "resources": ["inferenceobjectives", "inferencemodelrewrites"],
                "verbs": read,
            },
        ],
    }
    binding = {
        "apiVersion": "rbac.authorization.k8s.io/v1",
        "kind": "RoleBinding",
        "metadata": names.meta(names.epp, comp),
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": names.epp},
        "subjects": [{"kind": "ServiceAccount", "name": names.epp, "namespace": names.namespace}],
    }
    cm = {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": names.meta(names.epp_config, comp),
        "data": {CONFIG_FILE: config_text},
    }
    selector = {"app.kubernetes.io/instance": names.base, "app.kubernetes.io/component": comp}
    health = {"grpc": {"port": T.EPP_HEALTH_PORT, "service": "inference-extension"}}
    deploy = {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": names.meta(names.epp, comp),
        "spec": {
            "replicas": 1,
            "selector": {"matchLabels": selector},
            "template": {
                "metadata": {"labels": {**names.common_labels(), **selector}},
                "spec": {
                    "serviceAccountName": names.epp,
                    "containers": [
                        {
                            "name": "epp",
                            "image": T.EPP_IMAGE,
                            "args": [
                                f"--pool-name={names.pool}",
                                f"--pool-namespace={names.namespace}",
                                f"--config-file=/config/{CONFIG_FILE}",
                                f"--grpc-port={T.EPP_GRPC_PORT}",
                                f"--grpc-health-port={T.EPP_HEALTH_PORT}",
                                f"--metrics-port={T.EPP_METRICS_PORT}",
                                # vLLM renamed the KV-use gauge; tell the EPP.
                                "--kv-cache-usage-percentage-metric=vllm:kv_cache_usage_perc",
                            ],
                            "ports": [
                                {"name": "grpc", "containerPort": T.EPP_GRPC_PORT},
                                {"name": "grpc-health", "containerPort": T.EPP_HEALTH_PORT},
                                {"name": "metrics", "containerPort": T.EPP_METRICS_PORT},
                            ],
                            "readinessProbe": {**health, "periodSeconds": 2},
                            "livenessProbe": {
                                **health,
                                "periodSeconds": 10,
                                "initialDelaySeconds": 5,
                            },
                            "volumeMounts": [{"name": "config", "mountPath": "/config"}],
                        }
                    ],
                    "volumes": [{"name": "config", "configMap": {"name": names.epp_config}}],
                },
            },
        },
    }
    svc = {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": names.meta(names.epp, comp),
        "spec": {
            "selector": selector,
            "ports": [
                {
                    "name": "grpc-ext-proc",
                    "port": T.EPP_GRPC_PORT,
                    "protocol": "TCP",
                    "appProtocol": "http2",
                },
                {"name": "http-metrics", "port": T.EPP_METRICS_PORT, "protocol": "TCP"},
            ],
        },
    }
    return [sa, role, binding, cm, deploy, svc]


def inference_pool(names: Names) -> dict[str, Any]:
    return {
        "apiVersion": T.INFERENCE_POOL_API_VERSION,
        "kind": "InferencePool",
        "metadata": names.meta(names.pool, "inference-pool"),
        "spec": {
            "selector": {"matchLabels": names.pool_labels()},
            "targetPorts": [{"number": T.POOL_PORT}],
            "endpointPickerRef": {"name": names.epp, "port": {"number": T.EPP_GRPC_PORT}},
        },
    }


def book_router_locals(profile: Profile, led: Ledger) -> None:
    """Router keys with no counterpart in the scheduler config."""
    r = profile.router
    for key in ("host", "port"):
        led.warn(
            f"router.{key}",
            "the cluster's entry point is a Gateway listener with an HTTPRoute to the "
            "InferencePool (see docs/EXPORT.md); pdbox's own listener has no equivalent",
        )
    hints = {
        "queue_bound": "llm-d's scheduler has no admission queue bound in this config; "
        "requests beyond capacity wait in vLLM's queues",
        "max_inflight_per_worker": "the scheduler caps no per-pod in-flight count; vLLM's "
        "--max-num-seqs bounds each pod's concurrency",
        "max_body_bytes": "request size limits belong to the Gateway implementation",
        "request_timeout_s": f"set it on the HTTPRoute: rules[].timeouts.request: "
        f"{r.request_timeout_s:g}s",
        "prefill_timeout_s": "the routing sidecar's prefill leg has no timeout argument in v0.8.0",
        "balance_abs": "llm-d has no balance threshold; the queue and KV-use scorer weights "
        "trade prefix locality against load on every request",
        "balance_rel": "llm-d has no balance threshold; the queue and KV-use scorer weights "
        "trade prefix locality against load on every request",
        "api_key_env": "API keys are checked by the Gateway; the vLLM pods get no --api-key",
    }
    for key, hint in hints.items():
        led.warn(f"router.{key}", hint)
    for key in ("ttft_s", "itl_s"):
        led.warn(
            f"slo.{key}",
            "no SLO target in llm-d's threshold decider or the HPA; llm-d's SLO-aware "
            "scheduling (predicted latency, x-slo-* headers) is a separate, experimental path",
        )
