"""Creating the run folder of `pdbox up`, and cleaning up after a pdbox that died.

A pdbox killed with SIGKILL leaves its workers running. Their process groups
are recorded in state.json with each leader's start time, so the next
`pdbox up` ends exactly those groups (and never a recycled pid) before it
starts clean.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import time
from pathlib import Path
from typing import Any

import psutil

from pdbox.runfolder import STATE, TOKEN, new_token, pid_alive, write_private
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
        if ended:
            notes.append(f"ended {ended} leftover worker group(s) of a pdbox that died")
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
    try:
        p = psutil.Process(pid)
        created = state.get("create_time")
        return created is None or abs(p.create_time() - float(created)) < 1.0
    except (psutil.Error, ValueError):
        return False


def end_leftovers(state: dict[str, Any], grace_s: float = 5.0) -> int:
    """SIGTERM then SIGKILL each recorded worker group whose leader is still the same process."""
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
    for g in groups:
        _killpg(g, signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    while time.monotonic() < deadline and any(_group_alive(g) for g in groups):
        time.sleep(0.1)
    for g in groups:
        _killpg(g, signal.SIGKILL)
    return len(groups)


def _group_alive(pgid: int) -> bool:
    # Zombies do not count: a group whose members all died waits only for a
    # reaper (which may never come inside a container), not for us.
    return group_running(pgid)


def _killpg(pgid: int, sig: int) -> None:
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass


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
