"""The shared memory a worker's processes hold in /dev/shm, and what is left of it.

vLLM's engine core and model worker share two large segments (multiprocessing
shared memory, `psm_*`: 251,658,260 + 167,772,180 bytes per cpu-tiny worker).
multiprocessing's resource tracker, a process of the same group, unlinks
them when the worker stops cleanly; a SIGKILL of the whole group (a hang, a
main process that died and left an engine core that ignores SIGTERM) kills
the tracker too, and the segments stay until the machine reboots. A chaos run
would fill /dev/shm (a tmpfs in RAM) that way.

So the supervisor records which segments a worker's processes map or hold
open (once the worker is ready, and again right before it ends the group),
and once no process of that group runs, removes those that still exist and
that no other live process maps or holds open. Only names seen in that
worker's own processes are ever touched; a segment a peer worker also maps
(UCX's shared-memory transport between P/D workers) is left alone.

Standard library only, Linux only (elsewhere every function finds nothing).
"""

from __future__ import annotations

import os

from pdbox.workers import pgroup

SHM = "/dev/shm/"


def _held_by(pid: int) -> set[str]:
    """The /dev/shm files one process maps or holds open (not the unlinked ones)."""
    out: set[str] = set()
    try:
        with open(f"/proc/{pid}/maps", "rb") as f:
            for line in f:
                i = line.find(SHM.encode())
                if i >= 0 and not line.rstrip().endswith(b"(deleted)"):
                    out.add(line[i:].rstrip().decode("utf-8", "replace"))
    except OSError:
        pass
    try:
        fds = os.listdir(f"/proc/{pid}/fd")
    except OSError:
        fds = []
    for fd in fds:
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if target.startswith(SHM) and not target.endswith("(deleted)"):
            out.add(target)
    return out


def group_segments(pgid: int) -> set[str]:
    """The /dev/shm files the group's live processes map or hold open."""
    out: set[str] = set()
    for pid in pgroup.live_pids(pgid):
        out |= _held_by(pid)
    return out


def in_use(paths: set[str]) -> set[str]:
    """Those of `paths` that some live process (of this user) maps or holds open."""
    if not paths:
        return set()
    try:
        entries = [int(e) for e in os.listdir("/proc") if e.isdigit()]
    except OSError:
        return set(paths)  # cannot tell: treat all as in use
    used: set[str] = set()
    for pid in entries:
        used |= _held_by(pid) & paths
        if used == paths:
            break
    return used


def remove_left(paths: set[str]) -> list[tuple[str, int]]:
    """Unlink those of `paths` that still exist and no live process holds.

    Call it only once no process of the group that held them runs. Returns
    (path, bytes) of each file removed.
    """
    candidates = {p for p in paths if p.startswith(SHM) and "/" not in p[len(SHM):]
                  and os.path.exists(p)}
    removed = []
    for path in sorted(candidates - in_use(candidates)):
        try:
            size = os.stat(path).st_size
            os.unlink(path)
        except OSError:
            continue
        removed.append((path, size))
    return removed
