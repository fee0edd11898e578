"""The run folder of `pdbox up`: private modes, a live pdbox refused, and the
leftovers of a dead one ended, never anyone else's process.

The leftover tests start real `sleep` process groups (start_new_session, as
the supervisor does) and record them in state.json the way `pdbox up` does.
"""

from __future__ import annotations

import json
import os
import re
import signal
import stat
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest

from pdbox import runstate
from pdbox.runfolder import STATE, TOKEN
from pdbox.runstate import RunFolderError, clear, end_leftovers, prepare, write_state
from tests.helpers import process_gone


def _mode(p: Path) -> int:
    return stat.S_IMODE(p.stat().st_mode)


@pytest.fixture
def procs() -> Iterator[list[subprocess.Popen[bytes]]]:
    """Processes a test starts; whatever is left is killed and reaped."""
    started: list[subprocess.Popen[bytes]] = []
    yield started
    for p in started:
        if p.poll() is None:
            try:
                os.killpg(p.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        p.wait(timeout=5)


def _group(procs: list[subprocess.Popen[bytes]], argv: list[str] | None = None,
           **kw: Any) -> subprocess.Popen[bytes]:
    p = subprocess.Popen(argv or ["sleep", "60"], start_new_session=True, **kw)
    procs.append(p)
    return p


def _dead_pid() -> int:
    p = subprocess.Popen(["true"])
    p.wait()
    return p.pid


def _state(folder: Path, **state: Any) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / STATE).write_text(json.dumps(state))


# ------------------------------------------------------------------ a new folder


def test_prepare_makes_a_private_folder_and_token(tmp_path: Path) -> None:
    run = tmp_path / "home" / "run"
    token, notes = prepare(run)
    assert notes == []
    assert _mode(run) == 0o700
    assert _mode(run / "logs") == 0o700
    assert _mode(run / TOKEN) == 0o600
    assert (run / TOKEN).read_text().strip() == token
    assert len(token) >= 32
    assert not (run / ".write-test").exists()


def test_prepare_tightens_an_open_folder_and_renews_the_token(tmp_path: Path) -> None:
    run = tmp_path / "run"
    run.mkdir(mode=0o755)
    os.chmod(run, 0o755)
    first, _ = prepare(run)
    second, _ = prepare(run)
    assert _mode(run) == 0o700
    assert first != second
    assert (run / TOKEN).read_text().strip() == second


def test_write_state_is_private_and_clear_removes_it(tmp_path: Path) -> None:
    prepare(tmp_path)
    mine = {"pid": os.getpid(), "workers": []}
    write_state(tmp_path, mine)
    assert _mode(tmp_path / STATE) == 0o600
    assert json.loads((tmp_path / STATE).read_text()) == mine
    clear(tmp_path)
    assert not (tmp_path / STATE).exists() and not (tmp_path / TOKEN).exists()
    clear(tmp_path)  # twice is fine


def test_clear_leaves_another_live_pdbox_alone(
    tmp_path: Path, procs: list[subprocess.Popen[bytes]]
) -> None:
    other = _group(procs)
    prepare(tmp_path)
    write_state(tmp_path, {"pid": other.pid, "workers": []})
    clear(tmp_path)
    assert (tmp_path / STATE).exists() and (tmp_path / TOKEN).exists()


# --------------------------------------------------------------- a live pdbox


def test_a_live_pdbox_is_refused(tmp_path: Path, procs: list[subprocess.Popen[bytes]]) -> None:
    live = _group(procs)
    created = psutil.Process(live.pid).create_time()
    _state(tmp_path, pid=live.pid, create_time=created, endpoint="http://127.0.0.1:8000/v1")
    (tmp_path / TOKEN).write_text("old\n")
    with pytest.raises(RunFolderError) as err:
        prepare(tmp_path)
    msg = str(err.value)
    assert msg == (f"pdbox is already running (pid {live.pid}, http://127.0.0.1:8000/v1); "
                   "stop it with: pdbox down")
    # Its files are left alone.
    assert (tmp_path / TOKEN).read_text() == "old\n"
    assert live.poll() is None


def test_a_recycled_pid_is_not_a_live_pdbox(
    tmp_path: Path, procs: list[subprocess.Popen[bytes]]
) -> None:
    other = _group(procs)
    created = psutil.Process(other.pid).create_time()
    _state(tmp_path, pid=other.pid, create_time=created - 3600, endpoint="x")
    token, _ = prepare(tmp_path)
    assert token and other.poll() is None
    assert not (tmp_path / STATE).exists()


def test_this_process_preparing_again_is_not_refused(tmp_path: Path) -> None:
    _state(tmp_path, pid=os.getpid(), create_time=psutil.Process().create_time())
    prepare(tmp_path)


def test_a_damaged_state_file_is_replaced(tmp_path: Path) -> None:
    tmp_path.mkdir(exist_ok=True)
    (tmp_path / STATE).write_text("{not json")
    (tmp_path / "mps" / "pipe").mkdir(parents=True)
    _, notes = prepare(tmp_path)
    assert notes == []
    assert not (tmp_path / STATE).exists()
    assert not (tmp_path / "mps").exists()


# -------------------------------------------------------- leftovers of a dead one


def test_leftover_worker_groups_are_ended(
    tmp_path: Path, procs: list[subprocess.Popen[bytes]]
) -> None:
    leader = _group(procs, ["sh", "-c", "sleep 60 & echo $!; wait"], stdout=subprocess.PIPE)
    assert leader.stdout is not None
    child = int(leader.stdout.readline())
    created = psutil.Process(leader.pid).create_time()
    dead = _dead_pid()
    _state(tmp_path, pid=dead, create_time=1.0, workers=[
        {"id": "decode-0", "pgid": leader.pid, "create_time": created, "port": 9}])
    t0 = time.monotonic()
    token, notes = prepare(tmp_path)
    assert time.monotonic() - t0 < 2
    assert len(notes) == 1
    assert re.fullmatch(rf"ended 1 leftover worker group\(s\) of pdbox {dead}, which died: "
                        r"2 process\(es\), gone in \d+\.\d s", notes[0]), notes
    assert leader.wait(timeout=2) in (-signal.SIGTERM, -signal.SIGKILL)
    assert process_gone(child)
    assert (tmp_path / TOKEN).read_text().strip() == token
    assert not (tmp_path / STATE).exists()


def test_a_group_whose_leader_left_is_still_ended(
    tmp_path: Path, procs: list[subprocess.Popen[bytes]]
) -> None:
    leader = _group(procs, ["sh", "-c", "sleep 60 >/dev/null 2>&1 & echo $!"],
                    stdout=subprocess.PIPE)
    assert leader.stdout is not None
    orphan = int(leader.stdout.readline())
    created = psutil.Process(leader.pid).create_time()
    leader.wait(timeout=5)
    assert os.getpgid(orphan) == leader.pid
    state = {"workers": [{"id": "decode-0", "pgid": leader.pid, "create_time": created}]}
    try:
        ended = end_leftovers(state, grace_s=2.0)
        assert ended.groups == [leader.pid] and ended.processes == 1 and ended.left == []
        assert process_gone(orphan)
    finally:
        try:
            os.kill(orphan, signal.SIGKILL)
        except ProcessLookupError:
            pass


def test_a_group_whose_start_time_differs_is_left_alone(
    tmp_path: Path, procs: list[subprocess.Popen[bytes]]
) -> None:
    """The pid was recycled: it is someone else's process now."""
    other = _group(procs)
    created = psutil.Process(other.pid).create_time()
    dead = _dead_pid()
    _state(tmp_path, pid=dead, workers=[
        {"id": "decode-0", "pgid": other.pid, "create_time": created - 100.0}])
    _, notes = prepare(tmp_path)
    assert notes == [f"pdbox {dead} died without stopping; none of its worker processes "
                     "was left running"]
    time.sleep(0.2)
    assert other.poll() is None
    os.killpg(other.pid, signal.SIGKILL)
    assert other.wait(timeout=5) == -signal.SIGKILL


def test_a_live_leader_without_a_start_time_is_left_alone(
    procs: list[subprocess.Popen[bytes]]
) -> None:
    other = _group(procs)
    assert end_leftovers({"workers": [{"pgid": other.pid, "create_time": None}]}).groups == []
    assert other.poll() is None


def test_groups_already_gone_and_bad_records_are_skipped() -> None:
    state = {"workers": [{"pgid": _dead_pid(), "create_time": 1.0}, {"pgid": 0}, {"id": "x"}]}
    assert end_leftovers(state, grace_s=0.1).groups == []
    assert end_leftovers({}).groups == []


def test_a_group_that_ignores_sigterm_gets_sigkill(
    procs: list[subprocess.Popen[bytes]]
) -> None:
    stubborn = _group(procs, ["sh", "-c", "trap '' TERM; echo up; while :; do sleep 0.05; done"],
                      stdout=subprocess.PIPE)
    assert stubborn.stdout is not None and stubborn.stdout.readline() == b"up\n"
    created = psutil.Process(stubborn.pid).create_time()
    t0 = time.monotonic()
    assert end_leftovers({"workers": [{"pgid": stubborn.pid, "create_time": created}]},
                         grace_s=0.5).groups == [stubborn.pid]
    assert 0.4 < time.monotonic() - t0 < 2
    assert stubborn.wait(timeout=2) == -signal.SIGKILL


def _marked(procs: list[subprocess.Popen[bytes]], pdbox: int, start: str) -> subprocess.Popen[bytes]:
    """A process whose environment says that pdbox `pdbox` started it, in its own group."""
    env = dict(os.environ, PDBOX_PARENT_PID=str(pdbox), PDBOX_PARENT_START=start)
    return _group(procs, [sys.executable, "-c", "import time; time.sleep(60)"], env=env)


def _environ_set(pid: int) -> None:
    deadline = time.monotonic() + 5
    while "PDBOX_PARENT_PID" not in psutil.Process(pid).environ():
        assert time.monotonic() < deadline
        time.sleep(0.02)


def test_worker_processes_the_state_did_not_record_are_ended(
    tmp_path: Path, procs: list[subprocess.Popen[bytes]]
) -> None:
    """A group recorded nowhere (a worker being replaced when pdbox died) is found by the
    pdbox marks in its environment; a process of another pdbox with the same pid is not."""
    dead = _dead_pid()
    unrecorded = _marked(procs, dead, "1000.000")
    of_another = _marked(procs, dead, "5000.000")  # the pid's earlier or later owner
    _environ_set(unrecorded.pid)
    _environ_set(of_another.pid)
    _state(tmp_path, pid=dead, create_time=1000.0, workers=[])
    _, notes = prepare(tmp_path)
    assert unrecorded.wait(timeout=5) == -signal.SIGTERM
    assert notes and notes[0].startswith(f"ended 1 leftover worker group(s) of pdbox {dead}")
    assert of_another.poll() is None


def test_a_zombie_pdbox_is_not_running(tmp_path: Path) -> None:
    """A pdbox killed by SIGKILL whose parent has not reaped it yet."""
    z = subprocess.Popen(["sleep", "60"])
    created = psutil.Process(z.pid).create_time()
    z.kill()
    deadline = time.monotonic() + 3
    while psutil.Process(z.pid).status() != psutil.STATUS_ZOMBIE:
        assert time.monotonic() < deadline
        time.sleep(0.01)
    try:
        _state(tmp_path, pid=z.pid, create_time=created, endpoint="x")
        _, notes = prepare(tmp_path)
        assert notes == [f"pdbox {z.pid} died without stopping; none of its worker processes "
                         "was left running"]
    finally:
        z.wait()


def test_group_alive_ignores_zombies(procs: list[subprocess.Popen[bytes]]) -> None:
    p = _group(procs)
    assert runstate._group_alive(p.pid)
    os.killpg(p.pid, signal.SIGKILL)
    deadline = time.monotonic() + 3
    while psutil.Process(p.pid).status() != psutil.STATUS_ZOMBIE:
        assert time.monotonic() < deadline
        time.sleep(0.01)
    assert not runstate._group_alive(p.pid)  # a zombie not yet reaped
    p.wait()
    assert not runstate._group_alive(p.pid)


# ------------------------------------------------------------------ bad folders


def test_a_folder_that_cannot_be_made_is_one_sentence(tmp_path: Path) -> None:
    blocker = tmp_path / "home"
    blocker.write_text("a file where the folder should be")
    with pytest.raises(RunFolderError) as err:
        prepare(blocker / "run")
    msg = str(err.value)
    assert msg.startswith(f"cannot create the run folder {blocker / 'run'}: ")
    assert msg.endswith("set PDBOX_HOME to a writable folder")
    assert "\n" not in msg and "Errno" not in msg


def test_a_folder_that_cannot_be_written_is_one_sentence(tmp_path: Path) -> None:
    run = tmp_path / "run"
    run.mkdir()
    (run / (TOKEN + ".tmp")).mkdir()  # the token cannot be written
    with pytest.raises(RunFolderError) as err:
        prepare(run)
    msg = str(err.value)
    assert msg.startswith(f"cannot write to the run folder {run}: ")
    assert "PDBOX_HOME" in msg and "\n" not in msg
