"""The /dev/shm clean-up of a killed worker group, on real files and processes."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pdbox.workers import shm

pytestmark = pytest.mark.skipif(not os.path.isdir("/dev/shm") or not os.path.isdir("/proc"),
                                reason="needs /dev/shm and /proc")

HOLD = ("import mmap, os, sys, time; fd = os.open(sys.argv[1], os.O_RDWR); "
        "m = mmap.mmap(fd, 4096); print('mapped', flush=True); time.sleep(60)")


def _segment(tag: str) -> Path:
    path = Path(f"/dev/shm/pdbox-test-{os.getpid()}-{tag}")
    path.write_bytes(b"\0" * 4096)
    return path


def _holder(path: Path) -> subprocess.Popen[str]:
    p = subprocess.Popen([sys.executable, "-c", HOLD, str(path)], stdout=subprocess.PIPE,
                         text=True, start_new_session=True)
    assert p.stdout is not None and p.stdout.readline().strip() == "mapped"
    return p


def test_a_group_s_segments_are_seen_and_removed_once_it_is_gone() -> None:
    mine, other = _segment("mine"), _segment("other")
    a, b = _holder(mine), _holder(other)
    try:
        assert shm.group_segments(a.pid) == {str(mine)}
        recorded = shm.group_segments(a.pid) | {str(other)}  # even a name it never held
        os.killpg(a.pid, signal.SIGKILL)
        a.wait(5)
        removed = shm.remove_left(recorded)
        # Only what no live process maps: the other group's segment stays.
        assert removed == [(str(mine), 4096)]
        assert not mine.exists() and other.exists()
    finally:
        for p in (a, b):
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait(5)
        for path in (mine, other):
            path.unlink(missing_ok=True)


def test_nothing_outside_dev_shm_is_touched(tmp_path: Path) -> None:
    f = tmp_path / "x"
    f.write_text("x")
    assert shm.remove_left({str(f), "/dev/shm/../etc/passwd", "/dev/shm/gone-" + str(
        time.time())}) == []
    assert f.exists()


def test_a_stopped_process_of_a_group_is_seen() -> None:
    from pdbox.workers import pgroup

    p = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"],
                         start_new_session=True)
    try:
        assert pgroup.stopped_pids(p.pid) == []
        os.kill(p.pid, signal.SIGSTOP)
        deadline = time.monotonic() + 5
        while not pgroup.stopped_pids(p.pid) and time.monotonic() < deadline:
            time.sleep(0.01)
        assert pgroup.stopped_pids(p.pid) == [p.pid]
        os.kill(p.pid, signal.SIGCONT)
        deadline = time.monotonic() + 5
        while pgroup.stopped_pids(p.pid) and time.monotonic() < deadline:
            time.sleep(0.01)
        assert pgroup.stopped_pids(p.pid) == []
    finally:
        os.killpg(p.pid, signal.SIGKILL)
        p.wait(5)
