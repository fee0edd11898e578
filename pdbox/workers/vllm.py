"""argv and environment for one vLLM worker of a role.

Pure functions: a profile, a role, the worker's index and its ports in; a
WorkerSpec out. argv is always a list (never a shell string), so nothing in a
profile can inject a command; extra_args were checked against a deny-list
when the profile was loaded.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from pdbox.config import Profile, RoleConfig, parse_core_set
from pdbox.plan.memory import (
    GIB,
    GPU_MAX_NUM_BATCHED_TOKENS,
    GPU_MAX_NUM_SEQS,
    MemoryLedger,
    gpu_ledger,
)
from pdbox.plan.model_facts import DTYPE_BYTES, FactsError, ModelFacts
from pdbox.workers.tuning import CHECKED_VERSIONS, Tuning

SITE_DIR = Path(__file__).parent / "_site"
PACKAGE_ROOT = Path(__file__).resolve().parents[2]
KV_ROLE = {"prefill": "kv_producer", "decode": "kv_consumer"}


@dataclass(frozen=True)
class WorkerPorts:
    http: int
    side_channel: int = 0  # NIXL side channel (P/D only)
    kv_events: int = 0  # ZMQ publisher of KV-cache events (0: off)


@dataclass(frozen=True)
class WorkerSpec:
    id: str
    role: str
    index: int
    argv: list[str]
    env: dict[str, str]
    ports: WorkerPorts
    cores: str = ""  # CPU: the core set the worker computes on
    sm_percent: int | None = None
    memory_fraction: float | None = None
    extra: dict[str, str] = field(default_factory=dict)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.ports.http}"

    def _flag(self, name: str) -> int:
        """An integer flag's value in argv; 0 when it is left to vLLM's default."""
        v = flag_value(self.argv, name)
        return int(v) if v and v.isdigit() else 0

    @property
    def max_num_seqs(self) -> int:
        return self._flag("--max-num-seqs")

    @property
    def max_num_batched_tokens(self) -> int:
        return self._flag("--max-num-batched-tokens")

    @property
    def slice(self) -> str:
        if self.cores:
            return f"cores {self.cores}"
        if self.sm_percent is not None:
            return f"SM {self.sm_percent}% mem {self.memory_fraction:.2f}"
        return ""


def worker_id(role: str, index: int) -> str:
    return f"{role}-{index}"


def helper_cores(profile: Profile, online: list[int]) -> list[int]:
    """Cores no role computes on: where API servers and NIXL threads can go."""
    used: set[int] = set()
    for rc in profile.roles().values():
        for cs in rc.cores:
            used.update(parse_core_set(cs))
    return [c for c in online if c not in used]


def kv_transfer_config(profile: Profile, role: str) -> dict[str, object] | None:
    """The worker's KV connector: NIXL for a P/D role, followed by vLLM's
    OffloadingConnector (a host-memory tier) when `kv.offload_gib` is set.

    The two go in an explicit MultiConnector, NIXL first: vLLM's
    `--kv-offloading-size` shortcut would replace the connector and drop NIXL.
    An aggregated GPU worker with offload gets the OffloadingConnector alone.
    """
    offload = offload_connector(profile, KV_ROLE.get(role, "kv_both"))
    if not (profile.is_pd and role in KV_ROLE):
        return offload
    nixl: dict[str, object] = {
        "kv_connector": "NixlConnector",
        "kv_role": KV_ROLE[role],
        "kv_buffer_device": profile.nixl.buffer_device,
        "kv_load_failure_policy": profile.nixl.kv_load_failure_policy,
    }
    if offload is None:
        return nixl
    return {
        "kv_connector": "MultiConnector",
        "kv_role": KV_ROLE[role],
        "kv_buffer_device": profile.nixl.buffer_device,
        "kv_load_failure_policy": profile.nixl.kv_load_failure_policy,
        "kv_connector_extra_config": {"connectors": [nixl, offload]},
    }


def offload_connector(profile: Profile, kv_role: str) -> dict[str, object] | None:
    if not profile.kv.offload_gib or profile.hardware.device != "cuda":
        return None
    return {
        "kv_connector": "OffloadingConnector",
        "kv_role": kv_role,
        "kv_connector_extra_config": {"cpu_bytes_to_use": offload_bytes(profile)},
    }


def offload_bytes(profile: Profile) -> int:
    return int(profile.kv.offload_gib * GIB)


def flag_value(args: Sequence[str], flag: str) -> str | None:
    """The value `args` give `flag` (the last one wins, as in argparse), in either
    "--flag=V" or "--flag V" form."""
    value = None
    for i, arg in enumerate(args):
        if arg == flag and i + 1 < len(args):
            value = args[i + 1]
        elif arg.startswith(flag + "="):
            value = arg.split("=", 1)[1]
    return value


def extra_flag_value(profile: Profile, flag: str) -> str | None:
    """The value a profile's engine.extra_args give `flag`."""
    return flag_value(profile.engine.extra_args, flag)


def gpu_batch_limits(profile: Profile, rc: RoleConfig) -> tuple[int, int]:
    """(max_num_batched_tokens, max_num_seqs) a GPU worker runs with."""
    tokens = extra_flag_value(profile, "--max-num-batched-tokens")
    seqs = extra_flag_value(profile, "--max-num-seqs")
    return (int(tokens) if tokens and tokens.isdigit()
            else rc.max_num_batched_tokens or GPU_MAX_NUM_BATCHED_TOKENS,
            int(seqs) if seqs and seqs.isdigit() else rc.max_num_seqs or GPU_MAX_NUM_SEQS)


def worker_ledger(profile: Profile, role: str, budget: int, facts: ModelFacts) -> MemoryLedger:
    """The memory ledger of one GPU worker of `role` with `budget` bytes."""
    rc = profile.role(role)
    tokens, seqs = gpu_batch_limits(profile, rc)
    kv_dtype = extra_flag_value(profile, "--kv-cache-dtype")
    return gpu_ledger(
        facts, budget,
        block_size=profile.model.block_size,
        max_model_len=profile.model.max_model_len,
        max_num_seqs=seqs,
        max_batched_tokens=tokens,
        cuda_graphs=not profile.engine.enforce_eager and profile.engine.optimization_level > 0,
        kv_dtype_bytes=DTYPE_BYTES.get(kv_dtype or ""),
    )


def planned_budget(mps_env: dict[str, str] | None) -> int | None:
    """A GPU worker's memory budget under MPS: its pinned limit. None when
    time-sliced: a worker alone on the card sees the card, and vLLM's own
    profiling with --gpu-memory-utilization is then right."""
    limit = (mps_env or {}).get("CUDA_MPS_PINNED_DEVICE_MEM_LIMIT")
    if not limit:
        return None
    from pdbox.hardware.mps import mem_limit_bytes

    return mem_limit_bytes(limit)


def _ledger_from_files(profile: Profile, role: str, model_path: str,
                       budget: int | None) -> MemoryLedger | None:
    """The ledger from the model's config.json on this machine, if it is here.
    `pdbox up` makes sure it is (and that the plan fits) before any worker."""
    if budget is None:
        return None
    from pdbox.plan.sources import facts_for_source

    try:
        facts = facts_for_source(model_path, dtype=profile.model.dtype)
    except FactsError:
        return None
    ledger = worker_ledger(profile, role, budget, facts)
    return ledger if ledger.problem("", "") is None else None


def kv_events_config(wid: str, port: int) -> dict[str, object]:
    # The replay socket lets the router's subscriber recover batches it lost
    # (a sequence gap) instead of clearing the worker's prefix index.
    from pdbox.router.kv_events import REPLAY_BUFFER_STEPS, replay_endpoint_for

    endpoint = f"tcp://127.0.0.1:{port}"
    return {
        "enable_kv_cache_events": True,
        "publisher": "zmq",
        "endpoint": endpoint,
        "replay_endpoint": replay_endpoint_for(endpoint),
        "buffer_steps": REPLAY_BUFFER_STEPS,
        "topic": f"kv@{wid}",
    }


def build(
    profile: Profile,
    role: str,
    index: int,
    ports: WorkerPorts,
    model_path: str,
    *,
    online_cores: list[int] | None = None,
    base_env: dict[str, str] | None = None,
    mps_env: dict[str, str] | None = None,
    gpu_total_bytes: int | None = None,
    python: str | None = None,
    cores: str | None = None,
    memory: MemoryLedger | None = None,
) -> WorkerSpec:
    """The full command line and environment of one worker.

    Under MPS, `memory` (the plan's ledger for this worker) sets the KV cache
    with --kv-cache-memory-bytes. Without it the ledger is worked out here
    from the MPS cap in `mps_env` and the model's config.json, when both are
    at hand. A time-sliced worker (no cap) is sized by vLLM itself.
    """
    rc: RoleConfig = profile.role(role)
    wid = worker_id(role, index)
    cuda = profile.hardware.device == "cuda"
    argv = [
        python or sys.executable,
        "-m",
        "pdbox.workers.launch",
        "--model",
        model_path,
        "--served-model-name",
        profile.model.served_name,
        "--host",
        "127.0.0.1",
        "--port",
        str(ports.http),
        "--max-model-len",
        str(profile.model.max_model_len),
        "--dtype",
        profile.model.dtype,
        "--block-size",
        str(profile.model.block_size),
        "--enable-prefix-caching",
        "--enable-prompt-tokens-details",
        # pdbox polls /metrics and /health; an access-log line for each would
        # bury the worker's real log (and grow it without bound).
        "--disable-uvicorn-access-log",
        f"-O{profile.engine.optimization_level}",
    ]
    if profile.engine.enforce_eager:
        argv.append("--enforce-eager")
    if cuda:
        # Explicit on a GPU: vLLM's defaults follow the device memory it sees,
        # which MPS may report as the cap; the plan's activation reserve
        # assumes these numbers.
        tokens, seqs = gpu_batch_limits(profile, rc)
        argv += ["--max-num-batched-tokens", str(tokens), "--max-num-seqs", str(seqs)]
    else:
        if rc.max_num_seqs:
            argv += ["--max-num-seqs", str(rc.max_num_seqs)]
        if rc.max_num_batched_tokens:
            argv += ["--max-num-batched-tokens", str(rc.max_num_batched_tokens)]
    if profile.router.priority_scheduling:
        argv += ["--scheduling-policy", "priority"]
    kv_config = kv_transfer_config(profile, role)
    if kv_config is not None:
        argv += ["--kv-transfer-config", json.dumps(kv_config)]
    if ports.kv_events:
        argv += ["--kv-events-config", json.dumps(kv_events_config(wid, ports.kv_events))]
    if cuda:
        # With --kv-cache-memory-bytes, vLLM uses the utilization only for its
        # start-up check "free >= total x utilization", which the role's own
        # fraction passes whether the client sees the card or its MPS cap
        # (docs/GPU.md, "One memory truth").
        argv += ["--gpu-memory-utilization", f"{rc.memory_fraction:.3f}"]
        if memory is None:
            memory = _ledger_from_files(profile, role, model_path, planned_budget(mps_env))
        if memory is not None and memory.kv_cache_bytes > 0:
            argv += ["--kv-cache-memory-bytes", str(memory.kv_cache_bytes)]
    if "--trust-remote-code" in profile.engine.extra_args:
        pass  # allowed explicitly by the profile (checked at load time)
    argv += list(profile.engine.extra_args)

    env = dict(base_env if base_env is not None else os.environ)
    # sitecustomize (worker tuning) and pdbox itself must be importable in
    # every process of the worker.
    env["PYTHONPATH"] = os.pathsep.join(
        p for p in (str(SITE_DIR), str(PACKAGE_ROOT), env.get("PYTHONPATH", "")) if p
    )
    env["PYTHONUNBUFFERED"] = "1"
    env["PDBOX_PARENT_PID"] = str(os.getpid())
    # With the pid, tells a stray worker process from one whose pdbox still runs
    # (pdbox doctor), even once the pid is reused.
    env["PDBOX_PARENT_START"] = _own_start_time()
    env.setdefault("VLLM_LOGGING_LEVEL", "INFO")
    # Never log prompts or completions unless the user asks for it.
    env.setdefault("VLLM_DEBUG_LOG_API_SERVER_RESPONSE", "false")
    env["HF_HUB_OFFLINE"] = env.get("HF_HUB_OFFLINE", "1" if model_path.startswith("/") else "0")
    tuning_cores: tuple[int, ...] = ()
    process_cores: tuple[int, ...] = ()
    # CPU: the core set placement chose (pdbox.placement), else the role's in turn.
    cores = "" if cuda else (cores if cores is not None else rc.core_set(index))
    if not cuda:
        compute = parse_core_set(cores)
        env["VLLM_CPU_KVCACHE_SPACE"] = _gib(rc.kv_cache_gib)
        env["VLLM_CPU_OMP_THREADS_BIND"] = cores
        tuning_cores = tuple(compute)
        # Helper threads (API server, engine loop, NIXL progress) go to cores
        # no role computes on when there are any; otherwise they share the
        # worker's own cores, so they never steal another role's core.
        spare = helper_cores(profile, online_cores or compute)
        process_cores = tuple(sorted(set(compute) | set(spare)))
    else:
        env["CUDA_VISIBLE_DEVICES"] = str(profile.hardware.gpu_index)
        if mps_env:
            env.update(mps_env)
    if profile.is_pd and role in KV_ROLE:
        env["VLLM_NIXL_SIDE_CHANNEL_HOST"] = "127.0.0.1"
        env["VLLM_NIXL_SIDE_CHANNEL_PORT"] = str(ports.side_channel)
        env["UCX_TLS"] = profile.nixl.ucx_tls
    delay = profile.nixl.progress_delay_us if profile.is_pd else None
    tuning = Tuning(
        nixl_delay_us=delay if delay else None,
        kv_cores=tuning_cores,
        process_cores=process_cores,
        expect=dict(CHECKED_VERSIONS),
    )
    env["PDBOX_WORKER_TUNING"] = tuning.to_env()
    return WorkerSpec(
        id=wid,
        role=role,
        index=index,
        argv=argv,
        env=env,
        ports=ports,
        cores=cores,
        sm_percent=rc.sm_percent if cuda else None,
        memory_fraction=rc.memory_fraction if cuda else None,
    )


def _gib(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else f"{x:g}"


def _own_start_time() -> str:
    try:
        import psutil

        return f"{psutil.Process().create_time():.3f}"
    except Exception:  # noqa: BLE001 - an unknown start time only weakens the stray check
        return ""
