"""The versions an export is written for.

llm-d's scheduler configuration changes between releases (plugin names moved
from pd-profile-handler/threshold to disagg-profile-handler plus a decider,
and prefix tracking moved out of prefix-cache-scorer into a producer). An
export is therefore pinned: every name below was read from these releases,
and docs/EXPORT.md cites the files.
"""

from __future__ import annotations

# Kubernetes version whose OpenAPI schemas (shipped by kubernetes-validate)
# the manifests are checked against. Native sidecars (init containers with
# restartPolicy: Always), which the routing sidecar uses, need 1.29 or later.
KUBERNETES_VERSION = "1.30"

# llm-d inference scheduler (the EPP) v0.8.0, which embeds
# gateway-api-inference-extension v1.5.0.
EPP_IMAGE = "ghcr.io/llm-d/llm-d-inference-scheduler:v0.8.0"
EPP_CONFIG_API_VERSION = "inference.networking.x-k8s.io/v1alpha1"
ROUTING_SIDECAR_IMAGE = "ghcr.io/llm-d/llm-d-routing-sidecar:v0.8.0"

# InferencePool, GA API of gateway-api-inference-extension (v1.x).
INFERENCE_POOL_API_VERSION = "inference.networking.k8s.io/v1"

# vLLM images matching the versions pdbox runs locally (pyproject extras).
VLLM_IMAGES = {
    "cuda": "vllm/vllm-openai:v0.33.0",
    "cpu": "public.ecr.aws/q9t5s3a7/vllm-cpu-release-repo:v0.32.0",
}

# Ports. The decode pod's routing sidecar takes the pool port and forwards to
# vLLM on VLLM_BEHIND_SIDECAR_PORT, as in llm-d's P/D guide.
POOL_PORT = 8000
VLLM_BEHIND_SIDECAR_PORT = 8200
NIXL_SIDE_CHANNEL_PORT = 5600
EPP_GRPC_PORT = 9002
EPP_HEALTH_PORT = 9003
EPP_METRICS_PORT = 9090

# Label llm-d's prefill-filter and decode-filter read.
ROLE_LABEL = "llm-d.ai/role"

# Metric names as prometheus-adapter exposes them to the HPA (see
# docs/EXPORT.md for the adapter rule that renames vLLM's "vllm:" prefix).
METRIC_QUEUE = "vllm_num_requests_waiting"
METRIC_KV = "vllm_kv_cache_usage_perc"
