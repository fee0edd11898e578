"""What the supervisor is given: a clock, a way to start a worker's process
group, and a health prober. Real ones here; tests pass fakes."""

from __future__ import annotations

import asyncio
import os
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from pdbox.workers import pgroup, shm
from pdbox.workers.vllm import WorkerSpec


def group_running(pgid: int) -> bool:
    """True while a process of the group is alive (zombies do not count)."""
    return pgroup.running(pgid)


class Clock(Protocol):
    def now(self) -> float: ...
    async def sleep(self, seconds: float) -> None: ...


class RealClock:
    def now(self) -> float:
        return time.monotonic()

    async def sleep(self, seconds: float) -> None:
        await asyncio.sleep(seconds)


class Proc(Protocol):
    pid: int

    def poll(self) -> int | None: ...
    def signal_group(self, sig: int) -> None: ...
    def group_alive(self) -> bool: ...
    def segments(self) -> set[str]: ...
    def stopped(self) -> list[int]: ...


class Launcher(Protocol):
    def spawn(self, spec: WorkerSpec, log_path: Path) -> Proc: ...


class Prober(Protocol):
    async def healthy(self, spec: WorkerSpec, timeout_s: float | None = None) -> bool: ...
    async def warm_up(self, spec: WorkerSpec) -> bool: ...


@dataclass
class PopenProc:
    popen: subprocess.Popen[bytes]

    @property
    def pid(self) -> int:
        return self.popen.pid

    def poll(self) -> int | None:
        return self.popen.poll()

    def signal_group(self, sig: int) -> None:
        # The worker leads its own group (start_new_session), so pgid == pid.
        pgroup.signal_group(self.popen.pid, sig)

    def group_alive(self) -> bool:
        self.popen.poll()  # reap the leader, so it does not count as alive
        return group_running(self.popen.pid)

    def segments(self) -> set[str]:
        """The /dev/shm files the group's live processes map or hold open."""
        return shm.group_segments(self.popen.pid)

    def stopped(self) -> list[int]:
        """Processes of the group stopped by a signal. vLLM's /health is the API
        server's alone: with only the engine core stopped it still answers."""
        return pgroup.stopped_pids(self.popen.pid)


class PopenLauncher:
    def spawn(self, spec: WorkerSpec, log_path: Path) -> Proc:
        fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        try:
            popen = subprocess.Popen(
                spec.argv,
                env=spec.env,
                stdin=subprocess.DEVNULL,
                stdout=fd,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                close_fds=True,
            )
        finally:
            os.close(fd)
        return PopenProc(popen)
