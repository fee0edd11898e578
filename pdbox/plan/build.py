"""What `pdbox up` would start, worked out without starting it.

`build_plan` gives, for every worker the profile starts: its slice (cores,
or SM share and MPS memory cap), the exact vLLM argv and the environment pdbox
sets, and its memory ledger. `Plan.refusal()` is the one sentence that stops
`pdbox plan` and `pdbox up` alike when the profile cannot fit. Nothing here
touches a device: the card's size is given (NVML at `up`, a known card or
--gpu-memory-gib for `plan`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pdbox.config import Profile
from pdbox.hardware.mps import MEMORY_BUDGET, client_env, mem_limit_for
from pdbox.plan.memory import GIB, KNOWN_GPU_MEMORY, MemoryLedger, cap_bytes, cpu_ledger, gib
from pdbox.plan.model_facts import ModelFacts
from pdbox.workers import vllm as vllm_spec

# Placeholder ports: `pdbox up` takes free ones at start.
_PORT_BASE = 18000
# Only these variables are shown: the rest is the user's own environment.
_SHOWN_ENV_PREFIXES = ("CUDA_", "VLLM_", "UCX_", "PDBOX_WORKER", "HF_HUB_OFFLINE")


class PlanError(Exception):
    """A plan that cannot be made or cannot fit. str() is one sentence."""


@dataclass(frozen=True)
class WorkerPlan:
    id: str
    role: str
    slice: str
    argv: list[str]
    env: dict[str, str]
    ledger: MemoryLedger | None
    mps_memory_limit: str | None = None
    budget_text: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "role": self.role,
            "slice": self.slice,
            "mps_memory_limit": self.mps_memory_limit,
            "budget": self.budget_text,
            "argv": self.argv,
            "env": self.env,
            "memory": self.ledger.to_dict() if self.ledger else None,
        }


@dataclass
class Plan:
    profile: str
    device: str
    sharing: str
    model: str
    facts: ModelFacts | None
    gpu_total_bytes: int | None
    gpu_total_from: str
    offload_bytes: int
    served_name: str = ""  # the name clients ask for (vLLM --served-model-name)
    workers: list[WorkerPlan] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def refusal(self) -> str | None:
        return self.problems[0] if self.problems else None

    def to_dict(self) -> dict[str, Any]:
        return {
            "profile": self.profile,
            "device": self.device,
            "sharing": self.sharing,
            "model": self.model,
            "served_name": self.served_name,
            "model_facts": self.facts.to_dict() if self.facts else None,
            "gpu_total_bytes": self.gpu_total_bytes,
            "gpu_total_from": self.gpu_total_from,
            "kv_offload_bytes_per_worker": self.offload_bytes,
            "fits": not self.problems,
            "refusal": self.refusal(),
            "problems": self.problems,
            "notes": self.notes,
            "workers": [w.to_dict() for w in self.workers],
        }


def known_gpu_total(profile: Profile) -> int | None:
    match = profile.hardware.gpu_match.upper()
    return next((v for k, v in KNOWN_GPU_MEMORY.items() if k == match), None)


def build_plan(
    profile: Profile,
    facts: ModelFacts | None,
    *,
    model_arg: str,
    gpu_total_bytes: int | None = None,
    gpu_total_from: str = "",
    run_dir: Path | None = None,
    python: str = "python",
) -> Plan:
    """The plan of `profile` serving the model `facts` describe (None: unknown)."""
    p = profile
    cuda = p.hardware.device == "cuda"
    mps = cuda and p.hardware.sharing == "mps"
    if cuda and gpu_total_bytes is None:
        gpu_total_bytes = known_gpu_total(p)
        gpu_total_from = (f"what NVML reports for a {p.hardware.gpu_match}; no GPU seen here"
                          if gpu_total_bytes else "")
    plan = Plan(p.name, p.hardware.device, p.hardware.sharing, model_arg, facts,
                gpu_total_bytes if cuda else None, gpu_total_from if cuda else "",
                vllm_spec.offload_bytes(p) if cuda else 0, p.model.served_name)
    if cuda and gpu_total_bytes is None:
        plan.problems.append(
            f"{p.name}: the GPU's memory is unknown (no GPU seen through NVML and "
            f"hardware.gpu_match {p.hardware.gpu_match!r} names no known card); "
            "give it with --gpu-memory-gib")
        return plan
    if facts is None:
        plan.notes.append("model facts unknown: no memory ledger")
    elif facts.max_position_embeddings and p.model.max_model_len > facts.max_position_embeddings:
        # vLLM refuses this at start-up too (unless VLLM_ALLOW_LONG_MAX_MODEL_LEN).
        plan.problems.append(
            f"{p.name}: model.max_model_len {p.model.max_model_len} is above the "
            f"{facts.max_position_embeddings} tokens {facts.name or 'the model'} was made for: "
            "lower model.max_model_len")
    from pdbox.hardware.mps import MpsDaemon

    daemon_env = MpsDaemon(run_dir or Path("/run/pdbox"), base_env={}).env() if mps else None
    port = _PORT_BASE
    for role, rc in p.roles().items():
        for index in range(rc.replicas):
            ports = vllm_spec.WorkerPorts(
                http=port,
                side_channel=port + 1 if p.is_pd and role != "aggregated" else 0,
                kv_events=port + 2 if p.router.kv_events else 0,
            )
            port += 10
            plan.workers.append(_worker(plan, p, role, index, ports, facts, model_arg,
                                        daemon_env, python))
    if cuda:
        _check_card(plan, p)
    if plan.offload_bytes:
        plan.notes.append(
            f"each GPU worker keeps up to {gib(plan.offload_bytes)} of KV in host memory "
            "(OffloadingConnector after NIXL); host memory must hold that for every worker")
    return plan


def _worker(plan: Plan, p: Profile, role: str, index: int, ports: vllm_spec.WorkerPorts,
            facts: ModelFacts | None, model_arg: str, daemon_env: dict[str, str] | None,
            python: str) -> WorkerPlan:
    rc = p.role(role)
    wid = vllm_spec.worker_id(role, index)
    ledger: MemoryLedger | None = None
    limit: str | None = None
    budget_text = ""
    mps_env = None
    if p.hardware.device == "cuda":
        total = plan.gpu_total_bytes
        assert total is not None
        budget = cap_bytes(rc.memory_fraction, total)
        if daemon_env is not None:
            limit = mem_limit_for(rc.memory_fraction, total, p.hardware.gpu_index)
            mps_env = client_env(daemon_env, rc.sm_percent, limit, p.hardware.gpu_index)
            budget_text = f"MPS cap {rc.memory_fraction:g} of {gib(total)}"
        else:
            budget_text = (f"{rc.memory_fraction:g} of {gib(total)}, time-sliced: vLLM "
                           "profiles its own KV cache; this ledger is the estimate")
        if facts is not None:
            ledger = vllm_spec.worker_ledger(p, role, budget, facts)
            problem = ledger.problem(wid, budget_text, role)
            if problem:
                plan.problems.append(f"{p.name}: {problem}")
    elif facts is not None:
        kv_gib = rc.kv_cache_gib
        budget_text = f"{rc.kv_cache_gib:g} GiB KV cache (VLLM_CPU_KVCACHE_SPACE) + weights"
        blocks = vllm_spec.extra_flag_value(p, "--num-gpu-blocks-override")
        if blocks and blocks.isdigit():
            # A cache set in blocks overrides the GiB (engine.extra_args).
            kv_gib = int(blocks) * p.model.block_size * facts.kv_bytes_per_token() / GIB
            budget_text = f"{blocks} KV blocks (--num-gpu-blocks-override) + weights"
        ledger = cpu_ledger(facts, kv_gib, block_size=p.model.block_size,
                            max_model_len=p.model.max_model_len)
        if ledger.kv_tokens < p.model.max_model_len:
            plan.problems.append(
                f"{p.name}: {wid}'s KV cache of {gib(ledger.kv_cache_bytes)} holds "
                f"{ledger.kv_tokens} tokens, fewer than one {p.model.max_model_len}-token "
                f"sequence: raise {role}.kv_cache_gib or lower model.max_model_len")
    # Only an MPS worker is given its KV cache; a time-sliced one sizes its own.
    spec = vllm_spec.build(p, role, index, ports, model_arg, online_cores=None, base_env={},
                           mps_env=mps_env, python=python,
                           memory=ledger if mps_env is not None else None)
    env = {k: v for k, v in sorted(spec.env.items()) if k.startswith(_SHOWN_ENV_PREFIXES)}
    return WorkerPlan(wid, role, spec.slice, spec.argv, env, ledger, limit, budget_text)


def _check_card(plan: Plan, p: Profile) -> None:
    """Caps over the card: every worker at its role's max replicas."""
    total = plan.gpu_total_bytes
    assert total is not None
    caps = sum(cap_bytes(rc.memory_fraction, total) * rc.max for rc in p.roles().values())
    limit = int(total * MEMORY_BUDGET)
    if caps > limit:
        plan.problems.append(
            f"{p.name}: the workers' memory budgets at their max replicas add up to "
            f"{gib(caps)}, over {MEMORY_BUDGET:g} of the card's {gib(total)} ({gib(limit)}): "
            "lower memory_fraction or max of a role")
