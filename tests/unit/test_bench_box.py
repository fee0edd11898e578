"""A benchmark box's stop: its own group and every worker group it recorded, nothing left."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from pdbox.bench.box import Box
from pdbox.bench.procs import live_group_pids

STUBBORN = ("import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
            "print('up', flush=True); time.sleep(60)")


def _spawn(code: str) -> subprocess.Popen[bytes]:
    p = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE,
                         start_new_session=True)
    assert p.stdout is not None and p.stdout.readline() == b"up\n"
    return p


def test_stop_ends_the_box_and_reports_a_worker_group_left_behind(tmp_path: Path) -> None:
    pdbox = _spawn("import time; print('up', flush=True); time.sleep(60)")
    worker = _spawn(STUBBORN)  # a worker group pdbox failed to end
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "state.json").write_text(json.dumps(
        {"workers": [{"id": "decode-0", "pgid": worker.pid}]}))
    box = Box(pdbox, tmp_path, tmp_path / "log")
    try:
        left = box.stop(grace_s=5.0, settle_s=0.3)
        assert pdbox.poll() is not None
        assert left == [worker.pid] and box.leftover == left  # reported, then killed
        worker.wait(5)
        assert live_group_pids(worker.pid) == []
    finally:
        for p in (pdbox, worker):
            if p.poll() is None:
                p.kill()
                p.wait(5)


def test_stop_of_a_clean_box_reports_nothing(tmp_path: Path) -> None:
    pdbox = _spawn("import time; print('up', flush=True); time.sleep(60)")
    box = Box(pdbox, tmp_path, tmp_path / "log")
    assert box.stop(grace_s=5.0, settle_s=0.3) == []
    assert box.stop(grace_s=5.0, settle_s=0.3) == []  # twice is harmless
