"""The lifeline: every process of a worker ends the worker when its pdbox dies.

The end-to-end test starts a stand-in pdbox that starts a stand-in worker the
way the supervisor does (its own process group, the worker environment and
sitecustomize on PYTHONPATH). The worker ignores SIGTERM, as a hung vLLM API
server would, and has an exec'd child and a forked child that ignore it too;
SIGKILL of the stand-in pdbox must take all three along. The escalation order
and the pid-reuse checks are tested with fakes.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import psutil
import pytest

from pdbox.workers import lifeline, pgroup
from pdbox.workers.vllm import PACKAGE_ROOT, SITE_DIR
from tests.helpers import process_gone

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"),
                                reason="pidfds and process groups as on Linux")


def _env(pdbox: int | None = None, start: str | None = None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if k not in ("PDBOX_WORKER_TUNING", "PDBOX_PARENT_PID", "PDBOX_PARENT_START",
                        lifeline.GROUP)}
    env["PYTHONPATH"] = os.pathsep.join((str(SITE_DIR), str(PACKAGE_ROOT)))
    if pdbox is not None:
        env["PDBOX_PARENT_PID"] = str(pdbox)
    if start is not None:
        env["PDBOX_PARENT_START"] = start
    return env


# ------------------------------------------------------------ a real worker tree

_WORKER = textwrap.dedent("""\
    import os, signal, subprocess, sys, time
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # a hung API server
    exec_child = subprocess.Popen([sys.executable, "-c",
        "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(60)"])
    forked = os.fork()
    if forked == 0:
        time.sleep(60)
        os._exit(0)
    print(os.environ.get("PDBOX_WORKER_PGID"), exec_child.pid, forked, flush=True)
    time.sleep(60)
""")

_PDBOX = textwrap.dedent("""\
    import json, os, subprocess, sys, time
    worker = subprocess.Popen([sys.executable, "-c", sys.argv[1]], env=json.loads(sys.argv[2])
        | {"PDBOX_PARENT_PID": str(os.getpid())}, stdout=subprocess.PIPE,
        stderr=open(sys.argv[3], "w"), start_new_session=True)
    print(worker.pid, worker.stdout.readline().decode().strip(), flush=True)
    time.sleep(60)
""")


def test_a_sigkilled_pdbox_takes_every_process_of_a_hung_worker_along(tmp_path: Path) -> None:
    import json

    log = tmp_path / "worker.log"
    pdbox = subprocess.Popen([sys.executable, "-c", _PDBOX, _WORKER, json.dumps(_env()),
                              str(log)], stdout=subprocess.PIPE, start_new_session=True)
    pids: list[int] = []
    try:
        assert pdbox.stdout is not None
        leader, group, exec_child, forked = map(int, pdbox.stdout.readline().split())
        pids = [leader, exec_child, forked]
        assert group == leader  # the worker's first process leads its own group
        assert all(os.getpgid(p) == leader for p in pids)
        time.sleep(0.5)  # the exec'd child's interpreter starts its watch
        t0 = time.monotonic()
        pdbox.kill()  # not reaped yet: a zombie pdbox is a dead one
        assert all(process_gone(p, timeout=lifeline.GRACE_S + 3) for p in pids), \
            [p for p in pids if not process_gone(p, 0)]
        took = time.monotonic() - t0
        # They ignore SIGTERM, so the SIGKILL after the grace ended them.
        assert lifeline.GRACE_S - 0.5 < took < lifeline.GRACE_S + 2.5
        assert not pgroup.live_pids(leader)
        text = log.read_text()
        assert f"pdbox (pid {pdbox.pid}) is gone; ending worker process group {leader}" in text
        assert "still run 3 s after SIGTERM; killing" in text
    finally:
        for p in pids:
            try:
                os.kill(p, signal.SIGKILL)
            except ProcessLookupError:
                pass
        try:
            os.killpg(pdbox.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        pdbox.wait(5)


def test_sitecustomize_watches_only_in_a_worker() -> None:
    code = "import threading; print(sorted(t.name for t in threading.enumerate()))"
    me = psutil.Process()
    plain = subprocess.run([sys.executable, "-c", code], env=_env(), capture_output=True,
                           text=True, timeout=30)
    worker = subprocess.run([sys.executable, "-c", code],
                            env=_env(os.getpid(), f"{me.create_time():.3f}"),
                            capture_output=True, text=True, timeout=30)
    assert "pdbox-lifeline" not in plain.stdout
    assert "pdbox-lifeline" in worker.stdout, worker.stderr


def test_a_worker_whose_pdbox_is_already_gone_ends_at_once(tmp_path: Path) -> None:
    """Not started by that pdbox, so not a group leader: it ends only itself."""
    gone = subprocess.Popen(["true"])
    gone.wait()
    t0 = time.monotonic()
    proc = subprocess.run([sys.executable, "-c", "import time; time.sleep(30)"],
                          env=_env(gone.pid), capture_output=True, text=True, timeout=30)
    assert proc.returncode == -signal.SIGTERM
    assert time.monotonic() - t0 < 10
    assert f"pdbox (pid {gone.pid}) is gone; ending process " in proc.stderr


# ------------------------------------------------------------------- wait_gone


def _sleeper() -> subprocess.Popen[bytes]:
    return subprocess.Popen(["sleep", "30"])


def _waiter(pid: int, start: float | None) -> threading.Thread:
    t = threading.Thread(target=lifeline.wait_gone, args=(pid, start, 0.05), daemon=True)
    t.start()
    return t


@pytest.mark.parametrize("pidfd", [True, False])
def test_wait_gone_returns_when_the_process_exits(monkeypatch: pytest.MonkeyPatch,
                                                  pidfd: bool) -> None:
    if not pidfd:
        monkeypatch.setattr(os, "pidfd_open", _no_pidfd)
    p = _sleeper()
    t = _waiter(p.pid, psutil.Process(p.pid).create_time())
    time.sleep(0.2)
    assert t.is_alive()
    p.kill()  # left a zombie on purpose until the end: it counts as gone
    t.join(3)
    assert not t.is_alive()
    p.wait()


def _no_pidfd(pid: int) -> int:
    raise OSError(38, "Function not implemented")


def test_wait_gone_does_not_wait_for_a_reused_pid() -> None:
    p = _sleeper()
    try:
        t = _waiter(p.pid, psutil.Process(p.pid).create_time() - 100.0)
        t.join(3)
        assert not t.is_alive()
    finally:
        p.kill()
        p.wait()


def test_wait_gone_for_no_such_process() -> None:
    p = subprocess.Popen(["true"])
    p.wait()
    t = _waiter(p.pid, None)
    t.join(3)
    assert not t.is_alive()


# ------------------------------------------------------------------ end_worker


class _Recorder:
    def __init__(self, members: dict[int, bytes]) -> None:
        self.members = members
        self.sent: list[tuple[str, int, int]] = []

    def killpg(self, pgid: int, sig: int) -> None:
        self.sent.append(("group", pgid, sig))

    def kill(self, pid: int, sig: int) -> None:
        self.sent.append(("pid", pid, sig))


def test_end_worker_kills_the_resource_tracker_last(monkeypatch: pytest.MonkeyPatch) -> None:
    me = os.getpid()
    rec = _Recorder({me: b"python\0-m\0pdbox.workers.launch", 11: b"VLLM::EngineCore",
                     12: b"python\0-c\0from multiprocessing.resource_tracker import main"})
    monkeypatch.setattr(os, "killpg", rec.killpg)
    monkeypatch.setattr(os, "kill", rec.kill)
    monkeypatch.setattr(pgroup, "live_pids", lambda g: list(rec.members))
    monkeypatch.setattr(pgroup, "cmdline", lambda p: rec.members[p])
    monkeypatch.setattr(lifeline.time, "sleep", lambda s: rec.sent.append(("sleep", 0, int(s))))
    lifeline.end_worker(99, 500, grace_s=3, tracker_s=2)
    assert rec.sent == [
        ("group", 500, signal.SIGTERM), ("sleep", 0, 3),
        # The engine core first, this process last, the tracker not yet.
        ("pid", 11, signal.SIGKILL), ("pid", me, signal.SIGKILL), ("sleep", 0, 2),
        ("group", 500, signal.SIGKILL)]


def test_end_worker_outside_a_worker_group_ends_only_itself(
        monkeypatch: pytest.MonkeyPatch) -> None:
    rec = _Recorder({})
    monkeypatch.setattr(os, "killpg", rec.killpg)
    monkeypatch.setattr(os, "kill", rec.kill)
    monkeypatch.setattr(lifeline.time, "sleep", lambda s: None)
    lifeline.end_worker(99, None, grace_s=0, tracker_s=0)
    me = os.getpid()
    assert rec.sent == [("pid", me, signal.SIGTERM), ("pid", me, signal.SIGKILL),
                        ("pid", me, signal.SIGKILL)]
    assert not any(kind == "group" for kind, _, _ in rec.sent)


def test_worker_group_needs_the_group_to_be_this_processes(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(lifeline.GROUP, str(os.getpgrp()))
    assert lifeline.worker_group() == os.getpgrp()
    monkeypatch.setenv(lifeline.GROUP, str(os.getpgrp() + 1))
    assert lifeline.worker_group() is None
    monkeypatch.delenv(lifeline.GROUP)
    assert lifeline.worker_group() is None
