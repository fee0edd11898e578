"""Which processes of a process group still run, read from /proc.

Standard library only: the lifeline (pdbox/workers/lifeline.py) imports it in
every process of a worker, where startup time counts.
"""

from __future__ import annotations

import os


def live_pids(pgid: int) -> list[int]:
    """The group's processes that still run; zombies do not count.

    A zombie only waits for a reaper, which may never come inside a container,
    so a group of zombies is a group that is gone.
    """
    try:
        entries = os.listdir("/proc")
    except OSError:
        return []
    out = []
    for entry in entries:
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as f:
                fields = f.read().rsplit(b")", 1)[1].split()
            # fields[0] is the state, fields[2] the process group.
            if int(fields[2]) == pgid and fields[0] not in (b"Z", b"X"):
                out.append(int(entry))
        except (OSError, IndexError, ValueError):
            continue
    return out


def stopped_pids(pgid: int) -> list[int]:
    """The group's processes that are stopped (SIGSTOP, or traced): alive, but they
    run nothing until continued."""
    out = []
    for pid in live_pids(pgid):
        try:
            with open(f"/proc/{pid}/stat", "rb") as f:
                state = f.read().rsplit(b")", 1)[1].split()[0]
        except (OSError, IndexError):
            continue
        if state in (b"T", b"t"):
            out.append(pid)
    return out


def running(pgid: int) -> bool:
    """True while a process of the group is alive (zombies do not count)."""
    try:
        os.killpg(pgid, 0)
    except (ProcessLookupError, PermissionError):
        return False
    if not os.path.isdir("/proc"):
        return True  # no /proc: trust the signal check
    return bool(live_pids(pgid))


def cmdline(pid: int) -> bytes:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read()
    except OSError:
        return b""


def signal_pid(pid: int, sig: int) -> None:
    """Send `sig` to one process; one already gone (or not ours) is no error."""
    try:
        os.kill(pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def signal_group(pgid: int, sig: int) -> None:
    """Send `sig` to a process group; a group already gone is no error."""
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass
