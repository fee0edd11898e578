"""Run one workload against several setups, one after the other, on the same cores.

For each setup: start a box (`pdbox up --headless` with the setup's profile,
its own PDBOX_HOME, the autoscaler off unless asked), wait until every
worker is ready, drive the workload, read pdbox's own figures from its
status, stop the box and check that none of its processes is left. Then the
next setup. The load average is sampled throughout: on a shared box, it
says how much of the machine each setup really had.

Ctrl-C (or SIGTERM) stops the box being driven before the run ends.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import aiohttp

from pdbox import config
from pdbox.bench import box as boxes
from pdbox.bench import machine
from pdbox.bench.machine import LoadTracker
from pdbox.bench.progress import Progress
from pdbox.bench.report import Column, Row
from pdbox.bench.setups import Materialized

LOAD_SAMPLE_S = 5.0
# pdbox's own figures worth keeping beside the client's (docs/ROUTING.md).
ROUTER_KEYS = ("requests_total", "output_tokens_total", "pd_remote", "pd_local", "pd_share",
               "fallbacks", "rejected_429", "nixl_xfer_ms", "ttft_p50_s", "ttft_p99_s",
               "itl_p50_s", "itl_p99_s")


class WorkloadError(Exception):
    """A workload that could not finish against a setup; str() says which and why."""


class Workload(Protocol):
    name: str
    columns: list[Column]

    def expected_s(self) -> float:
        """Roughly how long `run` takes, for the progress line."""
        ...

    def run(self, endpoint: str, profile: config.Profile,
            progress: Progress) -> Awaitable[dict[str, Any]]: ...

    def rows(self, label: str, result: dict[str, Any]) -> list[Row]: ...


@dataclass
class Harness:
    setups: list[Materialized]
    work: Path  # a scratch folder: profiles, each box's home and log
    progress: Progress = field(default_factory=Progress)
    start_timeout_s: float = 900.0
    stop_grace_s: float = 60.0
    clock: Callable[[], float] = time.monotonic

    @contextlib.contextmanager
    def box(self, m: Materialized, tag: str = "") -> Iterator[boxes.Box]:
        """A started box for `m`, stopped on the way out whatever happens."""
        name = f"{m.file.stem}{tag}"
        work = self.work / name
        n = 1
        while work.exists():  # a setup started twice (probes, then the run) gets a new home
            n += 1
            work = self.work / f"{name}-{n}"
        work.mkdir(parents=True)
        self.progress.update("starting pdbox")
        b = boxes.start(work, m.file, timeout_s=self.start_timeout_s)
        try:
            yield b
        finally:
            self.progress.update("stopping pdbox")
            left = b.stop(self.stop_grace_s)
            if left:
                self.progress.note(f"warning: {m.setup.label}: {len(left)} process(es) were "
                                   f"still running after the stop and were killed: {left}")

    def run(self, workload: Workload) -> list[dict[str, Any]]:
        out = []
        for i, m in enumerate(self.setups):
            self.progress.setup(i, len(self.setups), m.setup.label)
            out.append(self.run_one(m, workload))
        return out

    def run_one(self, m: Materialized, workload: Workload) -> dict[str, Any]:
        loads = LoadTracker()
        with self.box(m) as b:
            loads.start()
            try:
                result = asyncio.run(sampled(workload.run(b.endpoint, m.profile,
                                                          self.progress), loads))
            except (aiohttp.ClientError, OSError, ValueError, KeyError) as exc:
                # The box stops on the way out; say which setup failed, with its log.
                raise WorkloadError(f"setup {m.setup.label!r}: the {workload.name} workload "
                                    f"failed ({exc or type(exc).__name__}); the box's log "
                                    f"ended with:\n{b.log_tail()}") from None
            pdbox_side = pdbox_figures(b)
        rec = describe(m)
        rec.update({
            "start_s": _r(b.ready_s), "endpoint_s": _r(b.endpoint_s),
            "load": loads.summary(), "result": result, "pdbox": pdbox_side,
            "leftover_pids": b.leftover,
        })
        return rec


def describe(m: Materialized) -> dict[str, Any]:
    p = m.profile
    return {
        "label": m.setup.label, "spec": m.setup.spec, "profile": m.setup.profile,
        "mode": p.mode.kind, "dtype": machine.resolved_dtype(p),
        "dtype_requested": p.model.dtype, "max_model_len": p.model.max_model_len,
        "overrides": {k: v for k, v in m.setup.overrides},
        "vllm_args": list(m.setup.vllm_args),
        "slo": {"ttft_s": p.slo.ttft_s, "itl_s": p.slo.itl_s},
        "autoscaler": p.autoscaler.enabled,
    }


async def sampled(work: Awaitable[dict[str, Any]], loads: LoadTracker) -> dict[str, Any]:
    """Run `work` while sampling the load average every LOAD_SAMPLE_S."""
    async def sample() -> None:
        while True:
            loads.sample()
            await asyncio.sleep(LOAD_SAMPLE_S)

    task = asyncio.create_task(sample())
    try:
        return await work
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        loads.sample()


def pdbox_figures(b: boxes.Box) -> dict[str, Any]:
    """The router's counters and the workers, from one status call (cheap)."""
    try:
        st = b.status()
    except (OSError, ValueError) as exc:
        return {"error": str(exc)[:200]}
    router = st.get("router", {}) or {}
    hardware = st.get("hardware", {}) or {}
    return {
        "dtype": hardware.get("dtype"),
        "calibration": hardware.get("calibration") or {},
        "router": {k: router.get(k) for k in ROUTER_KEYS},
        "soft_roles": (router.get("soft_roles") or {}).get("enabled"),
        "workers": [{k: w.get(k) for k in ("id", "role", "state", "cores", "restarts")}
                    for w in st.get("workers", [])],
    }


def _r(x: float | None) -> float | None:
    return None if x is None else round(x, 1)


@contextlib.contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
    """SIGTERM unwinds like Ctrl-C, so every box is stopped on the way out."""
    try:
        old = signal.signal(signal.SIGTERM, signal.default_int_handler)
    except ValueError:  # not the main thread: leave signals alone
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, old)
