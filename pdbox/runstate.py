"""Creating the run folder of `pdbox up`, and cleaning up after a pdbox that died.

A pdbox killed with SIGKILL takes its workers along (pdbox/workers/lifeline.py),
but what could not follow it (a process stuck in the kernel, a worker of an
older pdbox) is ended here. Worker process groups are recorded in state.json
with each leader's start time, and every worker process carries its pdbox's
pid and start time in its environment, so the next `pdbox up` ends exactly
those (and never a recycled pid) before it starts clean.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil

from pdbox import strays
from pdbox.runfolder import STATE, TOKEN, new_token, pid_alive, write_private
from pdbox.workers import pgroup
from pdbox.workers.supervisor import group_running


class RunFolderError(Exception):
    """The run folder cannot be used; str() says why and what to do."""


def prepare(folder: Path) -> tuple[str, list[str]]:
    """Make the folder (0700), end a dead pdbox's leftovers; return (token, notes)."""
    notes: list[str] = []
    try:
        folder.mkdir(parents=True, exist_ok=True)
        os.chmod(folder, 0o700)
    except OSError as exc:
        raise RunFolderError(f"cannot create the run folder {folder}: {exc.strerror}; "
                             "set PDBOX_HOME to a writable folder") from None
    state_file = folder / STATE
    if state_file.exists():
        try:
            state = json.loads(state_file.read_text())
        except (OSError, ValueError):
            state = {}
        pid = int(state.get("pid", 0) or 0)
        if pid and pid != os.getpid() and pid_alive(pid) and _is_pdbox(pid, state):
            raise RunFolderError(
                f"pdbox is already running (pid {pid}, {state.get('endpoint', '?')}); "
                "stop it with: pdbox down")
        ended = end_leftovers(state)
        if ended.pdbox or ended.processes:
            # One line either way: that a pdbox died without stopping is worth knowing.
            notes.append(ended.note())
        for name in (STATE, TOKEN):
            (folder / name).unlink(missing_ok=True)
        shutil.rmtree(folder / "mps", ignore_errors=True)
    logs = folder / "logs"
    try:
        logs.mkdir(exist_ok=True)
        os.chmod(logs, 0o700)
        token = new_token()
        write_private(folder / TOKEN, token + "\n")
        probe = folder / ".write-test"
        write_private(probe, "x" * 4096)
        probe.unlink()
    except OSError as exc:
        raise RunFolderError(f"cannot write to the run folder {folder}: {exc.strerror}; "
                             "free some disk space or set PDBOX_HOME elsewhere") from None
    return token, notes


def _is_pdbox(pid: int, state: dict[str, Any]) -> bool:
    # A zombie counts as gone: a pdbox killed by SIGKILL is one until whoever
    # started it reaps it, and must not block the next start meanwhile.
    created = state.get("create_time")
    try:
        return strays.pdbox_alive(pid, None if created is None else float(created))
    except (TypeError, ValueError):
        return False


@dataclass(frozen=True)
class Ended:
    """What `end_leftovers` found of a dead pdbox, and ended."""

    pdbox: int
    groups: list[int]
    processes: int  # processes of those groups, and strays outside them, when found
    seconds: float
    left: list[int]  # pids still running after SIGKILL (in uninterruptible sleep)

    def note(self) -> str:
        who = f"pdbox {self.pdbox}" if self.pdbox else "a pdbox"
        if not self.processes:
            return f"{who} died without stopping; none of its worker processes was left running"
        line = (f"ended {len(self.groups)} leftover worker group(s) of {who}, which died: "
                f"{self.processes} process(es), gone in {self.seconds:.1f} s")
        if self.left:
            line += f"; still running: {', '.join(map(str, self.left))}"
        return line


def end_leftovers(state: dict[str, Any], grace_s: float = 5.0) -> Ended:
    """End what a dead pdbox left: each recorded worker group whose leader is
    still the same process, and any process whose environment names that pdbox
    (a group it had not recorded yet, an engine core whose group leader died)."""
    groups: list[int] = []
    for w in state.get("workers", []):
        pgid, created = w.get("pgid"), w.get("create_time")
        if not pgid:
            continue
        try:
            leader = psutil.Process(int(pgid))
            # A live leader must prove it is the one we started; without a
            # recorded start time it may be anyone's process by now.
            if created is None or abs(leader.create_time() - float(created)) > 1.0:
                continue  # the pid was reused by something else
        except psutil.NoSuchProcess:
            # The leader is gone, but its group may live on (engine-core children).
            if not _group_alive(int(pgid)):
                continue
        except psutil.Error:
            continue
        groups.append(int(pgid))
    pid = int(state.get("pid", 0) or 0)
    created = state.get("create_time")
    marked = strays.started_by(pid, None if created is None else float(created)) if pid else []
    mine = {p.pid for p in marked}
    for p in marked:
        # A group joins only when it is the worker's own: led by one of these
        # processes, or by none any more.
        if p.pgid not in groups and (p.pgid in mine or not psutil.pid_exists(p.pgid)):
            groups.append(p.pgid)
    pids = [p.pid for p in marked if p.pgid not in groups]
    found = len({q for g in groups for q in pgroup.live_pids(g)} | set(pids))
    t0 = time.monotonic()
    left = terminate(groups, pids, grace_s)
    return Ended(pid, groups, found, time.monotonic() - t0, left)


def terminate(groups: list[int], pids: list[int], grace_s: float,
              kill_wait_s: float = 5.0) -> list[int]:
    """SIGTERM the groups and processes, SIGKILL what still runs after the grace
    (at once with no grace), and wait for it to go; returns the pids still
    running after that."""

    def alive() -> list[int]:
        out = [q for g in groups for q in pgroup.live_pids(g)]
        return out + [q for q in pids if _running(q) and q not in out]

    if grace_s > 0:  # else they had their grace already
        for g in groups:
            pgroup.signal_group(g, signal.SIGTERM)
        for q in pids:
            pgroup.signal_pid(q, signal.SIGTERM)
        deadline = time.monotonic() + grace_s
        while time.monotonic() < deadline and alive():
            time.sleep(0.1)
    for g in groups:
        pgroup.signal_group(g, signal.SIGKILL)
    for q in pids:
        pgroup.signal_pid(q, signal.SIGKILL)
    # SIGKILL is not instant: ports and memory are free only once they are gone.
    deadline = time.monotonic() + kill_wait_s
    while time.monotonic() < deadline and alive():
        time.sleep(0.05)
    return alive()


def _running(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def _group_alive(pgid: int) -> bool:
    # Zombies do not count: a group whose members all died waits only for a
    # reaper (which may never come inside a container), not for us.
    return group_running(pgid)




def write_state(folder: Path, state: dict[str, Any]) -> None:
    write_private(folder / STATE, json.dumps(state, indent=2))


def clear(folder: Path) -> None:
    """Remove what marks a live pdbox; never fails (it runs on the way out of errors).

    Only our own: a second `pdbox up` refused because one already runs must
    not take that one's state and token away on its way out.
    """
    try:
        owner = int(json.loads((folder / STATE).read_text()).get("pid", 0) or 0)
    except (OSError, ValueError, AttributeError, TypeError):
        owner = 0
    if owner and owner != os.getpid() and pid_alive(owner):
        return
    for name in (STATE, TOKEN):
        try:
            (folder / name).unlink(missing_ok=True)
        except OSError:
            pass  # e.g. the folder could never be made: nothing of ours is there
