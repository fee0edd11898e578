"""pdbox's stop: it says how long it took and that no worker process is left,
having ended any process that names it as its pdbox but left its worker group.

The fleet is a stand-in (its stop is the supervisor's, tested in
test_supervisor.py); the stray is a real process carrying the worker marks.
"""

from __future__ import annotations

import asyncio
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil

from pdbox import config
from pdbox.appliance import Appliance
from pdbox.strays import ProcInfo, started_by


class _Fleet:
    stopped = False

    async def stop(self) -> None:
        self.stopped = True


def _app(tmp_path: Path) -> Appliance:
    return Appliance(config.load("cpu-tiny"), tmp_path / "run")


def test_stop_ends_a_worker_process_outside_its_group_and_says_so(tmp_path: Path) -> None:
    me = psutil.Process()
    env = dict(os.environ, PDBOX_PARENT_PID=str(me.pid),
               PDBOX_PARENT_START=f"{me.create_time():.3f}")
    stray = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"], env=env,
                             start_new_session=True)
    try:
        deadline = time.monotonic() + 5
        while "PDBOX_PARENT_PID" not in psutil.Process(stray.pid).environ():
            assert time.monotonic() < deadline
            time.sleep(0.02)
        app = _app(tmp_path)
        app.fleet = _Fleet()  # type: ignore[assignment]
        app.request_shutdown()
        asyncio.run(app.stop())
        assert app.fleet.stopped  # type: ignore[attr-defined]
        assert stray.wait(timeout=5) == -signal.SIGKILL
        assert re.fullmatch(r"stopped in \d+\.\d s; all worker processes gone",
                            app.stop_summary), app.stop_summary
        assert any(e["message"] == app.stop_summary for e in app.events)
    finally:
        if stray.poll() is None:
            stray.kill()
            stray.wait()


def test_stop_without_workers_says_how_long(tmp_path: Path) -> None:
    app = _app(tmp_path)
    asyncio.run(app.stop())
    assert re.fullmatch(r"stopped in \d+\.\d s", app.stop_summary)


def test_started_by_matches_pid_and_start_time() -> None:
    def proc(pid: int, env: dict[str, str]) -> ProcInfo:
        return ProcInfo(pid, 1, pid, "python", 0, env)

    procs = [
        proc(1, {"PDBOX_PARENT_PID": "50", "PDBOX_PARENT_START": "100.000"}),
        proc(2, {"PDBOX_PARENT_PID": "50", "PDBOX_PARENT_START": "900.000"}),  # pid reused
        proc(3, {"PDBOX_PARENT_PID": "50"}),  # start unknown: the pid decides
        proc(4, {"PDBOX_PARENT_PID": "51", "PDBOX_PARENT_START": "100.000"}),
    ]
    assert [p.pid for p in started_by(50, 100.2, procs)] == [1, 3]
    assert [p.pid for p in started_by(50, None, procs)] == [1, 2, 3]
