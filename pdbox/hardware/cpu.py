"""CPU telemetry and core bookkeeping, over psutil.

Per-core utilisation is computed from the deltas between two samples of
`psutil.cpu_times(percpu=True)` that this object keeps itself. That never
blocks (no `interval=` sleep) and, unlike `psutil.cpu_percent(interval=None)`,
whose previous sample is one module-wide global, two readers (the status
route and the TUI, say) do not steal each other's interval.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Iterable
from types import ModuleType
from typing import Any

import psutil

from pdbox.config import Profile, parse_core_set
from pdbox.hardware.nvml import GpuTelemetry


class CpuTelemetry:
    """Per-core utilisation since the previous sample, and memory in use."""

    def __init__(self, ps: ModuleType = psutil):
        self._ps = ps
        self._lock = threading.Lock()
        self._last = self._times()

    def _times(self) -> list[tuple[float, float]]:
        """(busy, total) seconds per core, counted as psutil counts them."""
        out = []
        for t in self._ps.cpu_times(percpu=True):
            # On Linux guest time is already inside user/nice: do not count it twice.
            total = sum(t) - getattr(t, "guest", 0.0) - getattr(t, "guest_nice", 0.0)
            idle = t.idle + getattr(t, "iowait", 0.0)
            out.append((total - idle, total))
        return out

    def per_core(self) -> list[float | None]:
        """Busy percent of each core since the last call (None: no time has passed)."""
        with self._lock:
            now = self._times()
            prev, self._last = self._last, now
        out: list[float | None] = []
        for i, (busy, total) in enumerate(now):
            if i >= len(prev):  # a core came online
                out.append(None)
                continue
            d_total = total - prev[i][1]
            d_busy = busy - prev[i][0]
            if d_total <= 0:
                out.append(None)
                continue
            out.append(round(min(100.0, max(0.0, 100.0 * d_busy / d_total)), 1))
        return out

    def memory(self) -> tuple[int, int]:
        """(used, total) bytes; "used" is what is not available to new processes."""
        vm = self._ps.virtual_memory()
        return int(vm.total - vm.available), int(vm.total)

    def snapshot(self) -> dict[str, Any]:
        """The CPU part of `hardware` in the status snapshot (docs/CONTROL_API.md)."""
        used, total = self.memory()
        return {
            "kind": "cpu",
            "cpu_percent_per_core": self.per_core(),
            "memory_used_bytes": used,
            "memory_total_bytes": total,
        }


def usable_cores() -> list[int]:
    """The cores this process may run on (its affinity mask), sorted."""
    try:
        return sorted(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # pragma: no cover - not Linux
        return list(range(os.cpu_count() or 1))


def profile_cores(profile: Profile) -> list[int]:
    """Every core named by any role's core sets in the profile."""
    cores: set[int] = set()
    for role in profile.roles().values():
        for spec in role.cores:
            cores.update(parse_core_set(spec))
    return sorted(cores)


def free_cores(
    profile: Profile,
    used_core_sets: Iterable[str],
    available: Iterable[int] | None = None,
) -> list[int]:
    """Cores a new worker could take: those the profile hands out (all usable
    cores if it names none) that exist here and no running worker holds."""
    usable = set(usable_cores() if available is None else available)
    named = set(profile_cores(profile)) or usable
    used: set[int] = set()
    for spec in used_core_sets:
        if spec:
            used.update(parse_core_set(spec))
    return sorted((named & usable) - used)


_default_cpu: CpuTelemetry | None = None
_default_lock = threading.Lock()


def default_cpu() -> CpuTelemetry:
    """One process-wide sampler, so successive snapshots measure successive intervals."""
    global _default_cpu
    with _default_lock:
        if _default_cpu is None:
            _default_cpu = CpuTelemetry()
        return _default_cpu


def hardware_snapshot(
    gpu: GpuTelemetry,
    mps_state: dict[str, Any] | None,
    cpu: CpuTelemetry | None = None,
) -> dict[str, Any]:
    """The whole `hardware` object of the status snapshot.

    kind is "cuda" when a GPU answers, else "cpu"; CPU and memory figures are
    there either way (a GPU box still has host cores worth watching). Unknown
    GPU figures are None, as the control API promises.
    """
    base = (cpu or default_cpu()).snapshot()
    gpus = gpu.devices()
    base["kind"] = "cuda" if gpus else "cpu"
    base["gpus"] = [g.to_dict() for g in gpus]
    base["mps"] = (
        dict(mps_state)
        if mps_state is not None
        else {"enabled": False, "running": False, "pipe_dir": None}
    )
    return base
