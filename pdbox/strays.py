"""Worker processes that outlived the pdbox that started them.

Every process of a pdbox worker (the API server, vLLM's engine core and its
model workers) carries `PDBOX_PARENT_PID` and `PDBOX_PARENT_START` in its
environment, set when the worker was built. A process whose pdbox is gone (no
such pid, or a pid reused by another process) is a stray, and so is one left
in a worker group whose main process died while pdbox runs on: vLLM's engine
core survives its API server with parent 1 and keeps its memory and ports.
The supervisor ends such groups itself; `pdbox doctor` reports any it finds.

`find_strays` is a function of the process list, so tests need no processes.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import psutil

PARENT_PID = "PDBOX_PARENT_PID"
PARENT_START = "PDBOX_PARENT_START"


@dataclass(frozen=True)
class ProcInfo:
    pid: int
    ppid: int
    pgid: int
    name: str
    rss_bytes: int
    env: dict[str, str]


@dataclass(frozen=True)
class Stray:
    pid: int
    pgid: int
    name: str
    rss_bytes: int
    why: str

    @property
    def end_command(self) -> str:
        return f"kill -TERM -- -{self.pgid}; sleep 5; kill -KILL -- -{self.pgid}"


def find_strays(procs: Iterable[ProcInfo],
                pdbox_alive: Callable[[int, float | None], bool]) -> list[Stray]:
    """The pdbox worker processes that belong to no running pdbox.

    `pdbox_alive(pid, start_time)` says whether that pid is still the pdbox that
    started the worker (start_time None: unknown, trust the pid).
    """
    procs = list(procs)
    alive = {p.pid for p in procs}
    out: list[Stray] = []
    for p in procs:
        raw = p.env.get(PARENT_PID)
        if not raw or not raw.isdigit():
            continue
        owner = int(raw)
        try:
            start: float | None = float(p.env.get(PARENT_START, ""))
        except ValueError:
            start = None
        if not pdbox_alive(owner, start):
            why = f"its pdbox (pid {owner}) is gone"
        elif p.pgid not in alive and p.ppid == 1:
            why = f"its worker's main process (pid {p.pgid}) died; pdbox {owner} runs on"
        else:
            continue
        out.append(Stray(p.pid, p.pgid, p.name, p.rss_bytes, why))
    return out


def scan() -> list[ProcInfo]:
    """This machine's processes that carry a pdbox parent in their environment."""
    out = []
    me = os.getpid()
    for proc in psutil.process_iter(["pid", "ppid", "name"]):
        try:
            if proc.pid == me:
                continue
            env = proc.environ()
            if PARENT_PID not in env:
                continue
            out.append(ProcInfo(proc.pid, proc.info["ppid"] or 0, os.getpgid(proc.pid),
                                proc.info["name"] or "?", proc.memory_info().rss,
                                {k: env[k] for k in (PARENT_PID, PARENT_START) if k in env}))
        except (psutil.Error, OSError):
            continue
    return out


def started_by(pid: int, start: float | None,
               procs: Iterable[ProcInfo] | None = None) -> list[ProcInfo]:
    """The live processes whose environment says that this pdbox started them.

    `start` is the pdbox's start time (None: the pid alone decides), so that a
    pdbox that reused a dead one's pid does not claim its processes.
    """
    out = []
    for p in scan() if procs is None else procs:
        if p.env.get(PARENT_PID) != str(pid):
            continue
        try:
            if start is not None and abs(float(p.env.get(PARENT_START, "")) - start) >= 1.0:
                continue
        except ValueError:
            pass  # the worker did not know its pdbox's start time
        out.append(p)
    return out


def pdbox_alive(pid: int, start: float | None) -> bool:
    """Whether `pid` is still the pdbox that started at `start` (None: trust the pid).

    A zombie is gone: a pdbox killed by SIGKILL stays one until whoever
    started it reaps it, and its workers must not wait for that.
    """
    try:
        p = psutil.Process(pid)
        if p.status() == psutil.STATUS_ZOMBIE:
            return False
        return start is None or abs(p.create_time() - start) < 1.0
    except psutil.Error:
        return False
