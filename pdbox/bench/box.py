"""A `pdbox up --headless` started for one benchmark setup, and stopped without leftovers.

Each box runs in its own process group with its own PDBOX_HOME (so its run
folder, token and logs are its own); the converted model is shared through
PDBOX_MODELS_DIR so it is made once. pdbox starts each worker in a process
group of its own and records them in state.json: `stop()` ends pdbox's
group (SIGTERM, then SIGKILL after a grace) and then checks every group the
box ever recorded, ending and reporting any process still alive.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pdbox import paths
from pdbox.bench.procs import live_group_pids


class BoxError(Exception):
    """The box did not start; str() says why, with the tail of its log."""


@dataclass
class Box:
    proc: subprocess.Popen[bytes]
    home: Path
    log: Path
    endpoint: str = ""
    endpoint_s: float | None = None  # spawn to the endpoint line
    ready_s: float | None = None  # spawn to every worker ready
    groups: set[int] = field(default_factory=set)  # worker process groups seen
    leftover: list[int] = field(default_factory=list)  # pids alive after stop(), then killed

    @property
    def base(self) -> str:
        return self.endpoint.rsplit("/v1", 1)[0]

    def status(self, timeout: float = 10) -> dict[str, Any]:
        token = (self.home / "run" / "control.token").read_text().strip()
        req = urllib.request.Request(f"{self.base}/pdbox/v1/status",
                                     headers={"Authorization": f"Bearer {token}"})
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return json.load(r)

    def note_groups(self) -> None:
        """Remember the worker groups state.json names now (restarts make new ones)."""
        try:
            state = json.loads((self.home / "run" / "state.json").read_text())
        except (OSError, ValueError):
            return
        for w in state.get("workers", []):
            if w.get("pgid"):
                self.groups.add(int(w["pgid"]))

    def log_tail(self, lines: int = 15) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def stop(self, grace_s: float = 60.0, settle_s: float = 5.0) -> list[int]:
        """Stop the box; returns the pids that were still alive afterwards (then killed).

        pdbox ends its workers' groups itself; `settle_s` is how long they get
        to go after pdbox has exited before they count as left behind."""
        self.note_groups()
        if self.proc.poll() is None:
            _killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(grace_s)
            except subprocess.TimeoutExpired:
                _killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)
        left: list[int] = []
        # Give the groups pdbox was ending a moment, then end what remains:
        # those are processes this box started, never anyone else's.
        deadline = time.monotonic() + settle_s
        groups = {self.proc.pid, *self.groups}
        while True:
            alive = {g: live_group_pids(g) for g in groups}
            alive = {g: p for g, p in alive.items() if p}
            if not alive or time.monotonic() >= deadline:
                break
            time.sleep(0.2)
        for g, pids in alive.items():
            left += pids
            _killpg(g, signal.SIGKILL)
        self.leftover = sorted(left)
        return self.leftover


def _killpg(pgid: int, sig: int) -> None:
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def start(work: Path, profile_file: Path, extra: list[str] | None = None,
          timeout_s: float = 900.0, all_ready: bool = True,
          clock: Callable[[], float] = time.monotonic) -> Box:
    """`pdbox up --headless --port 0 --profile FILE` in `work`; returns once it serves
    and, with `all_ready`, once every worker is ready. Never leaves it running on failure."""
    home = work / "home"
    home.mkdir(parents=True, exist_ok=True)
    log = work / "pdbox.log"
    env = dict(os.environ, PDBOX_HOME=str(home), PDBOX_MODELS_DIR=str(paths.models_dir()))
    t0 = clock()
    with open(log, "wb") as err:
        proc = subprocess.Popen(
            [sys.executable, "-m", "pdbox.cli", "up", "--headless", "--port", "0",
             "--profile", str(profile_file), *(extra or [])],
            stdout=subprocess.PIPE, stderr=err, env=env, start_new_session=True)
    box = Box(proc, home, log)
    try:
        _wait_endpoint(box, t0 + timeout_s, clock)
        box.endpoint_s = clock() - t0
        box.note_groups()
        if all_ready:
            _wait_ready(box, t0 + timeout_s, clock)
        box.ready_s = clock() - t0
        box.note_groups()
        return box
    except BaseException:
        box.stop(grace_s=30.0)
        raise


def _wait_endpoint(box: Box, deadline: float, clock: Callable[[], float]) -> None:
    assert box.proc.stdout is not None
    fd = box.proc.stdout.fileno()
    os.set_blocking(fd, False)
    buf = ""
    while clock() < deadline:
        try:
            chunk = os.read(fd, 4096).decode(errors="replace")
        except BlockingIOError:
            chunk = ""
        buf += chunk
        m = re.search(r"(http://\S+/v1)\n", buf)
        if m:
            box.endpoint = m.group(1)
            return
        if box.proc.poll() is not None:
            raise BoxError(f"pdbox up exited with {box.proc.returncode}:\n{box.log_tail()}")
        time.sleep(0.3)
    raise BoxError(f"pdbox up did not serve in time:\n{box.log_tail()}")


def _wait_ready(box: Box, deadline: float, clock: Callable[[], float]) -> None:
    last: list[tuple[str, str]] = []
    while clock() < deadline:
        if box.proc.poll() is not None:
            raise BoxError(f"pdbox up exited with {box.proc.returncode}:\n{box.log_tail()}")
        try:
            workers = box.status().get("workers", [])
            last = [(w.get("id", "?"), w.get("state", "?")) for w in workers]
            if workers and all(w.get("state") == "ready" for w in workers):
                return
        except (OSError, ValueError):
            pass
        time.sleep(1.0)
    raise BoxError(f"not every worker was ready in time ({last}):\n{box.log_tail()}")
