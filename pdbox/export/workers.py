"""vLLM Deployments: one per role, with the same model, vLLM arguments and
NIXL settings the local workers get.

The local argv lives in pdbox.workers.vllm; this module rebuilds the same
flags for a container (no host, no in-process tuning hooks), and a unit test
compares the kv-transfer-config of both so they cannot drift apart.
"""

from __future__ import annotations

import json
import math
from typing import Any

from pdbox.config import Profile, RoleConfig, parse_core_set
from pdbox.export import targets as T
from pdbox.export.ledger import Ledger
from pdbox.export.names import Names
from pdbox.workers.vllm import offload_bytes, offload_connector

KV_ROLE = {"prefill": "kv_producer", "decode": "kv_consumer"}
SIDECAR_CONNECTOR = "nixlv2"
HF_TOKEN_SECRET = "hf-token"


def kv_transfer_config(profile: Profile, role: str) -> dict[str, Any]:
    """The same NixlConnector config as a local worker, plus the NIXL backend.

    kv_producer/kv_consumer rather than llm-d guides' kv_both: vLLM marks
    kv_both deprecated, and the roles never swap.
    """
    nixl = {
        "kv_connector": "NixlConnector",
        "kv_role": KV_ROLE[role],
        "kv_buffer_device": profile.nixl.buffer_device,
        "kv_load_failure_policy": profile.nixl.kv_load_failure_policy,
        "kv_connector_extra_config": {"backends": [profile.nixl.backend]},
    }
    offload = offload_connector(profile, KV_ROLE[role])
    if offload is None:
        return nixl
    # NIXL first, then the host-memory tier, as a local worker runs them.
    return {**{k: v for k, v in nixl.items() if k != "kv_connector_extra_config"},
            "kv_connector": "MultiConnector",
            "kv_connector_extra_config": {"connectors": [nixl, offload]}}


def model_ref(profile: Profile, led: Ledger) -> str:
    """What vLLM in a pod loads: a hub id (pulled by the pod) or a path."""
    src = profile.model.source
    if src.startswith("embedded:"):
        from pdbox.workers.embedded import EMBEDDED_MODELS  # light: a dict

        hf = EMBEDDED_MODELS[src.split(":", 1)[1]].hf_name
        led.warn(
            "model.source",
            f"{src} is converted on this box from a GGUF file; pods download the hub "
            f"checkpoint {hf} instead (same model, bf16), so they need hub access "
            f"(optional Secret {HF_TOKEN_SECRET!r}, key 'token')",
        )
        led.map("model.source", "vLLM positional model", hf)
        return hf
    if src.startswith(("/", "./", "../", "~")):
        led.warn(
            "model.source",
            f"{src} is a folder on this box; mount the same folder at that path in the "
            "vLLM containers (e.g. a PersistentVolume) or change it to a hub id",
        )
    led.map("model.source", "vLLM positional model", src)
    return src


def vllm_args(profile: Profile, role: str, rc: RoleConfig, port: int, model: str) -> list[str]:
    m, e = profile.model, profile.engine
    args = [
        model,
        "--served-model-name",
        m.served_name,
        "--port",
        str(port),
        "--max-model-len",
        str(m.max_model_len),
        "--dtype",
        m.dtype,
        "--block-size",
        str(m.block_size),
        "--enable-prefix-caching",
        f"-O{e.optimization_level}",
    ]
    if e.enforce_eager:
        args.append("--enforce-eager")
    if rc.max_num_seqs:
        args += ["--max-num-seqs", str(rc.max_num_seqs)]
    if rc.max_num_batched_tokens:
        args += ["--max-num-batched-tokens", str(rc.max_num_batched_tokens)]
    if profile.router.priority_scheduling:
        args += ["--scheduling-policy", "priority"]
    if profile.is_pd and role in KV_ROLE:
        args += [
            "--kv-transfer-config",
            json.dumps(kv_transfer_config(profile, role), separators=(",", ":")),
        ]
    elif (offload := offload_connector(profile, "kv_both")) is not None:
        args += ["--kv-transfer-config", json.dumps(offload, separators=(",", ":"))]
    if profile.hardware.device == "cuda":
        args += ["--gpu-memory-utilization", f"{rc.memory_fraction:g}"]
    return args + list(e.extra_args)


def book_shared(profile: Profile, led: Ledger) -> None:
    """Keys that every role's Deployment carries the same way: booked once."""
    m, e, n, hw = profile.model, profile.engine, profile.nixl, profile.hardware
    led.map("model.served_name", "vLLM --served-model-name", m.served_name)
    led.map("model.max_model_len", "vLLM --max-model-len", m.max_model_len)
    led.map("model.dtype", "vLLM --dtype", m.dtype)
    led.map("model.block_size", "vLLM --block-size", m.block_size)
    led.map("engine.optimization_level", "vLLM -O", f"-O{e.optimization_level}")
    led.map(
        "engine.enforce_eager",
        "vLLM --enforce-eager",
        "--enforce-eager" if e.enforce_eager else None,
    )
    if profile.kv.offload_gib and hw.device == "cuda":
        led.map("kv.offload_gib", "vLLM OffloadingConnector cpu_bytes_to_use in "
                "--kv-transfer-config, and the pod's memory request", offload_bytes(profile))
    else:
        led.ignore("kv.offload_gib", "no host-memory KV tier")
    for arg in e.extra_args:
        led.map("engine.extra_args", "vLLM arguments, appended", arg)
    if not e.extra_args:
        led.map("engine.extra_args", "vLLM arguments (none)", None)
    led.map(
        "engine.allow_trust_remote_code",
        "gate for --trust-remote-code in engine.extra_args (checked at load)",
        None,
    )
    led.map(
        "engine.start_timeout_s",
        "startupProbe failureThreshold x periodSeconds (10 s)",
        _startup_failures(profile),
    )
    led.map(
        "engine.health_timeout_s",
        "livenessProbe failureThreshold x periodSeconds (10 s)",
        _liveness_failures(profile),
    )
    led.ignore("engine.calibrate", "pdbox's own warm-up timing; the router there learns live")
    if e.step_budget == "auto":
        led.warn("engine.step_budget", "sized from this machine's measured speed; set each "
                 "role's max_num_batched_tokens for the cluster's GPUs")
    else:
        led.ignore("engine.step_budget", "vLLM's default")
    led.warn(
        "engine.max_start_failures",
        f"pdbox gives up after {e.max_start_failures} failed starts; Kubernetes restarts "
        "a failing pod forever with back-off (CrashLoopBackOff)",
    )
    led.map(
        "autoscaler.drain_timeout_s",
        "pod terminationGracePeriodSeconds",
        math.ceil(profile.autoscaler.drain_timeout_s),
    )
    led.map(
        "router.priority_scheduling",
        "vLLM --scheduling-policy",
        "priority" if profile.router.priority_scheduling else None,
    )

    if profile.is_pd:
        led.map("nixl.backend", "kv_connector_extra_config.backends", n.backend)
        led.map("nixl.buffer_device", "kv-transfer-config kv_buffer_device", n.buffer_device)
        led.map(
            "nixl.kv_load_failure_policy",
            "kv-transfer-config kv_load_failure_policy",
            n.kv_load_failure_policy,
        )
        led.map("nixl.ucx_tls", "env UCX_TLS", n.ucx_tls)
        transports = set(n.ucx_tls.split(","))
        network = transports & {"tcp", "rc", "rc_x", "rc_v", "ud", "ud_x", "dc", "dc_x", "ib"}
        if not network:
            led.warn(
                "nixl.ucx_tls",
                f"{n.ucx_tls} only reaches a peer on the same node; prefill and decode pods "
                "on different nodes need a network transport (rc for InfiniBand/RoCE, or tcp)",
            )
        elif "cuda_ipc" in transports and not network - {"tcp"}:
            led.warn(
                "nixl.ucx_tls",
                "cuda_ipc moves KV between GPUs of one node only; across nodes it goes over "
                "tcp through host memory. Add rc for GPUDirect RDMA on InfiniBand/RoCE",
            )
        led.warn(
            "nixl.progress_delay_us",
            "is applied by pdbox's in-worker patch, which stock vLLM images lack; NIXL's "
            "progress thread will poll without pause (about one core per pod)",
        )
    else:
        for key in ("backend", "ucx_tls", "progress_delay_us", "buffer_device"):
            led.ignore(f"nixl.{key}", "no KV transfer without P/D")
        led.ignore("nixl.kv_load_failure_policy", "no KV transfer without P/D")

    if hw.device == "cpu":
        led.map("hardware.sharing", "whole CPUs per pod (requests == limits)", "cpu")
        led.map(
            "hardware.worker_memory_gib",
            "memory request, plus the role's kv_cache_gib",
            "memory",
        )
        for key in ("gpu_match", "gpu_index"):
            led.ignore(f"hardware.{key}", "CPU profile")
    else:
        led.map("hardware.sharing", "one GPU per pod", "nvidia.com/gpu")
        if hw.sharing == "mps":
            led.warn(
                "hardware.sharing",
                '"mps" splits one GPU between roles; plain Kubernetes gives each pod a whole '
                "GPU (nvidia.com/gpu: 1). The closest is the NVIDIA device plugin's MPS "
                "sharing (sharing.mps.replicas), which splits a GPU into equal parts only",
            )
        elif hw.sharing == "timeslice":
            led.warn(
                "hardware.sharing",
                '"timeslice" maps to the NVIDIA device plugin\'s time-slicing config '
                "(sharing.timeSlicing.resources[].replicas) on the node, which pdbox cannot "
                "set; as exported each pod gets one nvidia.com/gpu",
            )
        if hw.gpu_match:
            led.warn(
                "hardware.gpu_match",
                f"{hw.gpu_match!r} is a substring of the GPU name; Kubernetes matches labels "
                "exactly, so add a nodeSelector such as nvidia.com/gpu.product: "
                "<exact product> (from GPU feature discovery)",
            )
        else:
            led.ignore("hardware.gpu_match", "empty: any GPU")
        led.warn(
            "hardware.gpu_index",
            f"GPU {hw.gpu_index} of this box; in a cluster the device plugin assigns GPUs",
        )
        led.ignore("hardware.worker_memory_gib", "CPU workers only")


def book_role(profile: Profile, role: str, rc: RoleConfig, led: Ledger) -> None:
    k = role
    if profile.hardware.device == "cpu":
        cpus = role_cpus(rc)
        led.map(f"{k}.cores", "resources cpu (cores in one core set)", cpus)
        led.warn(
            f"{k}.cores",
            f"pins the worker to cores {', '.join(rc.cores)} of this box; Kubernetes does "
            "not pin to core numbers. With the kubelet's static CPU manager policy the pod "
            "(Guaranteed QoS, whole CPUs) gets exclusive cores of its own",
        )
        led.map(f"{k}.kv_cache_gib", "env VLLM_CPU_KVCACHE_SPACE", _gib(rc.kv_cache_gib))
        led.ignore(f"{k}.sm_percent", "CPU profile")
        led.ignore(f"{k}.memory_fraction", "CPU profile")
    else:
        led.map(f"{k}.memory_fraction", "vLLM --gpu-memory-utilization", f"{rc.memory_fraction:g}")
        if profile.hardware.sharing == "mps" and rc.sm_percent < 100:
            led.warn(
                f"{k}.sm_percent",
                f"{rc.sm_percent}% of the SMs has no per-pod equivalent in Kubernetes; the pod "
                f"gets a whole GPU, and --gpu-memory-utilization {rc.memory_fraction:g} leaves "
                "the rest of its memory unused (raise it to about 0.9 on a dedicated GPU)",
            )
        else:
            led.map(f"{k}.sm_percent", "a whole GPU per pod", "nvidia.com/gpu")
        led.ignore(f"{k}.cores", "GPU profile")
        led.ignore(f"{k}.kv_cache_gib", "GPU profile: the KV cache is sized by memory_fraction")
    led.map(
        f"{k}.max_num_seqs",
        "vLLM --max-num-seqs",
        str(rc.max_num_seqs) if rc.max_num_seqs else None,
    )
    led.map(
        f"{k}.max_num_batched_tokens",
        "vLLM --max-num-batched-tokens",
        str(rc.max_num_batched_tokens) if rc.max_num_batched_tokens else None,
    )


def role_cpus(rc: RoleConfig) -> int:
    """Whole CPUs a worker of the role computes on (its largest core set)."""
    return max(len(parse_core_set(cs)) for cs in rc.cores) if rc.cores else 1


def role_memory(profile: Profile, rc: RoleConfig) -> str:
    """A CPU worker's memory: the resident budget plus its KV cache, in Mi.

    FINDINGS: one worker with a 1 GiB KV cache used about 3.9 GB resident.
    """
    mib = math.ceil((profile.hardware.worker_memory_gib + rc.kv_cache_gib) * 1024)
    return f"{mib // 1024}Gi" if mib % 1024 == 0 else f"{mib}Mi"


def deployment(
    profile: Profile,
    role: str,
    rc: RoleConfig,
    names: Names,
    replicas: int,
    image: str,
    model: str,
) -> dict[str, Any]:
    pd_role = profile.is_pd and role in KV_ROLE
    behind_sidecar = pd_role and role == "decode"
    vllm_port = T.VLLM_BEHIND_SIDECAR_PORT if behind_sidecar else T.POOL_PORT
    cuda = profile.hardware.device == "cuda"

    env: list[dict[str, Any]] = []
    if pd_role:
        env += [
            {
                "name": "VLLM_NIXL_SIDE_CHANNEL_HOST",
                "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}},
            },
            {"name": "VLLM_NIXL_SIDE_CHANNEL_PORT", "value": str(T.NIXL_SIDE_CHANNEL_PORT)},
            {"name": "UCX_TLS", "value": profile.nixl.ucx_tls},
        ]
    if not cuda:
        env.append({"name": "VLLM_CPU_KVCACHE_SPACE", "value": _gib(rc.kv_cache_gib)})
    if not profile.model.source.startswith(("/", "./", "../", "~")):
        env.append(
            {
                "name": "HF_TOKEN",
                "valueFrom": {
                    "secretKeyRef": {"name": HF_TOKEN_SECRET, "key": "token", "optional": True}
                },
            }
        )

    if cuda:
        resources: dict[str, Any] = {"limits": {"nvidia.com/gpu": "1"}}
        if profile.kv.offload_gib:
            # The host KV tier is pinned host memory: the pod must be given it.
            mem = f"{math.ceil(profile.kv.offload_gib)}Gi"
            resources["requests"] = {"memory": mem}
    else:
        cpu, mem = str(role_cpus(rc)), role_memory(profile, rc)
        # requests == limits with whole CPUs: Guaranteed QoS, which the static
        # CPU manager needs to give the pod exclusive cores.
        resources = {"requests": {"cpu": cpu, "memory": mem}, "limits": {"cpu": cpu, "memory": mem}}

    ports = [{"name": "vllm", "containerPort": vllm_port, "protocol": "TCP"}]
    if pd_role:
        ports.append({"name": "nixl", "containerPort": T.NIXL_SIDE_CHANNEL_PORT, "protocol": "TCP"})

    container: dict[str, Any] = {
        "name": "vllm",
        "image": image,
        "command": ["vllm", "serve"],
        "args": vllm_args(profile, role, rc, vllm_port, model),
        "env": env,
        "ports": ports,
        "resources": resources,
        "startupProbe": {
            "httpGet": {"path": "/health", "port": vllm_port},
            "periodSeconds": 10,
            "failureThreshold": _startup_failures(profile),
        },
        "readinessProbe": {
            "httpGet": {"path": "/health", "port": vllm_port},
            "periodSeconds": 5,
            "timeoutSeconds": 2,
        },
        "livenessProbe": {
            "httpGet": {"path": "/health", "port": vllm_port},
            "periodSeconds": 10,
            "timeoutSeconds": 5,
            "failureThreshold": _liveness_failures(profile),
        },
        "volumeMounts": [{"name": "shm", "mountPath": "/dev/shm"}],
    }
    pod_spec: dict[str, Any] = {
        "terminationGracePeriodSeconds": math.ceil(profile.autoscaler.drain_timeout_s),
        "containers": [container],
        # vLLM and UCX use shared memory; a container's default /dev/shm is 64 MiB.
        "volumes": [{"name": "shm", "emptyDir": {"medium": "Memory"}}],
    }
    if behind_sidecar:
        pod_spec["initContainers"] = [routing_sidecar()]

    labels = {**names.common_labels(), **names.pool_labels(), "app.kubernetes.io/component": role}
    if pd_role:
        labels[T.ROLE_LABEL] = role
    selector = {"app.kubernetes.io/instance": names.base, "app.kubernetes.io/component": role}
    meta = names.meta(names.role(role), role)
    meta["annotations"] = {"pdbox.dev/profile": profile.name}
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": meta,
        "spec": {
            "replicas": replicas,
            "selector": {"matchLabels": selector},
            "template": {"metadata": {"labels": labels}, "spec": pod_spec},
        },
    }


def routing_sidecar() -> dict[str, Any]:
    """llm-d's routing sidecar on the decode pod: it runs the prefill leg on the
    pod the scheduler picked (x-prefiller-host-port header), then the decode leg
    on the local vLLM, as pdbox's router does in-process. A native sidecar
    (restartPolicy: Always), so it starts before vLLM and outlives it."""
    return {
        "name": "routing-sidecar",
        "image": T.ROUTING_SIDECAR_IMAGE,
        "restartPolicy": "Always",
        "args": [
            f"--port={T.POOL_PORT}",
            f"--vllm-port={T.VLLM_BEHIND_SIDECAR_PORT}",
            f"--connector={SIDECAR_CONNECTOR}",
            "--secure-proxy=false",
        ],
        "ports": [{"name": "http", "containerPort": T.POOL_PORT, "protocol": "TCP"}],
        # requests == limits, so a CPU pod stays in the Guaranteed QoS class.
        "resources": {
            "requests": {"cpu": "100m", "memory": "128Mi"},
            "limits": {"cpu": "100m", "memory": "128Mi"},
        },
    }


def _startup_failures(profile: Profile) -> int:
    return max(1, math.ceil(profile.engine.start_timeout_s / 10))


def _liveness_failures(profile: Profile) -> int:
    return max(1, math.ceil(profile.engine.health_timeout_s / 10))


def _gib(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else f"{x:g}"
