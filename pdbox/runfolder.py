"""The run folder of a live `pdbox up`: how other commands find and reach it.

Layout (mode 0700, files 0600):
  state.json      pid, pgid, control_url, endpoint, profile, workers' pids/pgids
  control.token   bearer token for the control API
  logs/<worker>.log and pdbox.log
"""

from __future__ import annotations

import json
import os
import secrets
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pdbox import paths

STATE = "state.json"
TOKEN = "control.token"


class NotRunning(Exception):
    """No live pdbox for this PDBOX_HOME."""


@dataclass(frozen=True)
class RunInfo:
    folder: Path
    pid: int
    control_url: str
    endpoint: str
    token: str
    state: dict[str, Any]


def write_private(path: Path, text: str) -> None:
    """Write a file readable by its owner only, atomically."""
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def new_token() -> str:
    return secrets.token_urlsafe(32)


def pid_alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def read(folder: Path | None = None) -> RunInfo:
    """The live instance, or NotRunning with the reason."""
    folder = folder or paths.run_dir()
    try:
        state = json.loads((folder / STATE).read_text())
        token = (folder / TOKEN).read_text().strip()
    except (OSError, ValueError):
        raise NotRunning("pdbox is not running (start it with: pdbox up)") from None
    pid = int(state.get("pid", 0))
    if not pid_alive(pid):
        raise NotRunning("pdbox is not running (start it with: pdbox up)")
    return RunInfo(
        folder=folder,
        pid=pid,
        control_url=state["control_url"],
        endpoint=state["endpoint"],
        token=token,
        state=state,
    )
