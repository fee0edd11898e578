"""The memory ledger of one GPU worker: pure arithmetic, no device.

Under MPS a worker's memory is capped twice over if nothing is done: the MPS
pinned limit caps what it may allocate, and vLLM sizes its KV cache from
`gpu_memory_utilization x total`, where "total" is whatever cudaMemGetInfo
reports inside the client (the card, or the cap: see docs/GPU.md). pdbox
therefore decides the KV cache itself, from the cap:

    kv = cap - weights - activations - CUDA graphs - runtime reserve

and hands vLLM `--kv-cache-memory-bytes kv`, which makes vLLM skip its own
profiling arithmetic (vllm/v1/worker/gpu_worker.py, determine_available_memory).
The reserves below stand in for what that profiling would have measured, so
they err on the large side; docs/GPU.md says where each comes from.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from pdbox.plan.model_facts import ModelFacts

MIB = 1024**2
GIB = 1024**3
# pdbox passes both to vLLM on a GPU, so the activation estimate below is
# about the numbers vLLM really uses (its own defaults depend on the device
# memory it sees, which MPS may change).
GPU_MAX_NUM_BATCHED_TOKENS = 8192
GPU_MAX_NUM_SEQS = 256
# CUDA graph pool for the decode batch sizes vLLM captures. An assumption
# meant to err large, to be checked against vLLM's log on the first GPU run.
CUDA_GRAPH_RESERVE = 2 * GIB
# CUDA context, cuBLAS/cuDNN workspaces and allocator slack.
RUNTIME_RESERVE = 1 * GIB
# What the cards report through NVML (memory.total): used when no GPU is at
# hand to ask, e.g. `pdbox plan` on a laptop. GH200 480GB: 96 GB HBM3.
KNOWN_GPU_MEMORY = {
    "GH200": 97871 * MIB,
    "H100": 81559 * MIB,
}


def cap_bytes(fraction: float, total_bytes: int) -> int:
    """A memory fraction of the card, exactly as the MPS pinned limit that
    pdbox writes for it (rounded down to whole MiB)."""
    from pdbox.hardware.mps import mem_limit_bytes, mem_limit_for

    return mem_limit_bytes(mem_limit_for(fraction, total_bytes)) or 0


def activation_bytes(facts: ModelFacts, max_batched_tokens: int, max_num_seqs: int) -> int:
    """Peak activations of one forward pass, as vLLM's profile run would see them.

    One chunk of `max_batched_tokens` holds at the widest point the MLP's
    gate/up output and its activation (3 x intermediate), the QKV projection
    and a few hidden-size buffers (residual, norm out, attention out); the
    sampler holds float32 logits and probabilities for `max_num_seqs` rows.
    """
    qkv = (facts.num_heads + 2 * facts.num_kv_heads) * facts.head_dim
    per_token = (3 * facts.intermediate_size + 4 * facts.hidden_size + qkv) * facts.dtype_bytes
    sampler = max_num_seqs * facts.vocab_size * 4 * 2
    return max_batched_tokens * per_token + sampler


@dataclass(frozen=True)
class MemoryLedger:
    """Where one worker's memory budget goes, in bytes."""

    budget: int  # the MPS cap, or fraction x card when time-sliced
    weights: int
    activations: int
    cuda_graphs: int
    runtime_reserve: int
    kv_bytes_per_token: int
    block_size: int
    max_model_len: int

    @property
    def headroom(self) -> int:
        return self.activations + self.cuda_graphs + self.runtime_reserve

    @property
    def kv_cache_bytes(self) -> int:
        """Whole KV blocks that fit in what is left (0 when nothing is)."""
        left = self.budget - self.weights - self.headroom
        block = self.kv_bytes_per_token * self.block_size
        return max(0, left // block * block)

    @property
    def kv_tokens(self) -> int:
        return self.kv_cache_bytes // self.kv_bytes_per_token

    @property
    def unused(self) -> int:
        return self.budget - self.weights - self.headroom - self.kv_cache_bytes

    def problem(self, who: str, budget_text: str, role: str = "the role") -> str | None:
        """One sentence when this worker cannot start, else None."""
        floor = self.weights + self.headroom
        if floor >= self.budget:
            return (f"{who}'s memory budget of {gib(self.budget)} ({budget_text}) is below its "
                    f"{gib(self.weights)} of weights plus {gib(self.headroom)} of headroom "
                    f"for activations, CUDA graphs and the runtime: raise {role}.memory_fraction "
                    "or serve a smaller model")
        need = self.max_model_len * self.kv_bytes_per_token
        if self.kv_tokens < self.max_model_len:
            return (f"{who}'s memory budget of {gib(self.budget)} ({budget_text}) leaves "
                    f"{gib(self.kv_cache_bytes)} of KV cache ({self.kv_tokens} tokens) after "
                    f"{gib(self.weights)} of weights and {gib(self.headroom)} of headroom; "
                    f"one {self.max_model_len}-token sequence needs {gib(need)}: raise "
                    f"{role}.memory_fraction or lower model.max_model_len")
        return None

    def to_dict(self) -> dict[str, Any]:
        return {
            "budget_bytes": self.budget,
            "weights_bytes": self.weights,
            "activations_bytes": self.activations,
            "cuda_graphs_bytes": self.cuda_graphs,
            "runtime_reserve_bytes": self.runtime_reserve,
            "headroom_bytes": self.headroom,
            "kv_bytes_per_token": self.kv_bytes_per_token,
            "kv_cache_bytes": self.kv_cache_bytes,
            "kv_tokens": self.kv_tokens,
            "unused_bytes": self.unused,
            "block_size": self.block_size,
            "max_model_len": self.max_model_len,
        }


def gpu_ledger(
    facts: ModelFacts,
    budget: int,
    *,
    block_size: int,
    max_model_len: int,
    max_num_seqs: int = GPU_MAX_NUM_SEQS,
    max_batched_tokens: int = GPU_MAX_NUM_BATCHED_TOKENS,
    cuda_graphs: bool = True,
    kv_dtype_bytes: int | None = None,
) -> MemoryLedger:
    return MemoryLedger(
        budget=budget,
        weights=facts.weights_bytes,
        activations=activation_bytes(facts, max_batched_tokens, max_num_seqs),
        cuda_graphs=CUDA_GRAPH_RESERVE if cuda_graphs else 0,
        runtime_reserve=RUNTIME_RESERVE,
        kv_bytes_per_token=facts.kv_bytes_per_token(kv_dtype_bytes),
        block_size=block_size,
        max_model_len=max_model_len,
    )


def cpu_ledger(facts: ModelFacts, kv_cache_gib: float, *, block_size: int,
               max_model_len: int, kv_dtype_bytes: int | None = None) -> MemoryLedger:
    """On a CPU the KV cache is set directly (VLLM_CPU_KVCACHE_SPACE) and the
    weights live beside it in host memory, so the budget is weights + cache."""
    kv = int(kv_cache_gib * GIB)
    return MemoryLedger(
        budget=facts.weights_bytes + kv,
        weights=facts.weights_bytes,
        activations=0,
        cuda_graphs=0,
        runtime_reserve=0,
        kv_bytes_per_token=facts.kv_bytes_per_token(kv_dtype_bytes),
        block_size=block_size,
        max_model_len=max_model_len,
    )


def gib(n: float) -> str:
    return f"{n / GIB:.2f} GiB"
