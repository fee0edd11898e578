"""Process-group measurements shared by benchmarks and end-to-end tests."""

from __future__ import annotations

import os
import time

import psutil


def group_pids(pgid: int) -> list[int]:
    out = []
    for p in psutil.process_iter():
        try:
            if os.getpgid(p.pid) == pgid:
                out.append(p.pid)
        except (ProcessLookupError, psutil.Error):
            pass
    return out


def live_group_pids(pgid: int) -> list[int]:
    """Processes of the group still running; zombies only wait for a reaper
    (which may never come inside a container) and do not count."""
    out = []
    for pid in group_pids(pgid):
        try:
            if psutil.Process(pid).status() != psutil.STATUS_ZOMBIE:
                out.append(pid)
        except psutil.Error:
            pass
    return out


def group_cpu(pgid: int, seconds: float) -> float:
    """Cores a process group used over `seconds` (an idle spin shows here)."""
    procs = [psutil.Process(p) for p in group_pids(pgid)]
    before = {p.pid: sum(p.cpu_times()[:2]) for p in procs}
    time.sleep(seconds)
    used = 0.0
    for p in procs:
        try:
            used += sum(p.cpu_times()[:2]) - before[p.pid]
        except psutil.Error:
            pass
    return round(used / seconds, 3)
