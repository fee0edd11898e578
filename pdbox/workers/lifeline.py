"""Every process of a worker ends the worker when the pdbox that started it dies.

The worker's first process (vLLM's API server) gets SIGTERM from the kernel
when pdbox dies (PR_SET_PDEATHSIG, see launch.py), and vLLM then stops its
engine core and model workers: 0.2-0.6 s with streams in flight. The other
processes have no parent-death signal of their own, which left gaps:
- pdbox killed while the workers load the model: the engine core does not act
  on SIGTERM until it is built, and vLLM waits 5 s before it kills it
  (measured: the last process gone 7.0 s after pdbox);
- an API server that is hung (stopped, or wedged) never acts on its signal,
  and its engine core runs on with no pdbox left to end it;
- an API server that dies with pdbox (the OOM killer) leaves its engine core
  and model workers with parent 1.

So sitecustomize starts this watch in every Python process of a worker (the
API server, the engine core, model workers, multiprocessing's helpers), and
it starts again in a forked child. A daemon thread waits on a pidfd of the
pdbox process: no polling, and no pid-reuse race once it is open. When pdbox
exits, the thread sends SIGTERM to the worker's process group, so that vLLM
stops as it would on `pdbox down`; GRACE_S later it SIGKILLs whatever of the
group still runs. Every process watches the same pdbox, so the grace counts
from pdbox's death whichever process is the last one left. multiprocessing's
resource tracker is killed last: once the others are gone it removes the
shared memory they leave behind (vLLM's queues, hundreds of MB in /dev/shm).
"""

from __future__ import annotations

import os
import select
import signal
import sys
import threading
import time

from pdbox.strays import PARENT_PID, PARENT_START, pdbox_alive
from pdbox.workers import pgroup

# Set by the worker's first process when it leads its own group, so that the
# processes it starts end the whole group, and never a group that is not a
# worker's (a worker started by hand, a test) but only themselves.
GROUP = "PDBOX_WORKER_PGID"
GRACE_S = 3.0  # vLLM's own clean stop takes well under a second
TRACKER_S = 2.0  # for the resource tracker to clean up once the others are gone
POLL_S = 0.5  # only without pidfds (kernels before 5.3, some seccomp profiles)
TRACKER = b"multiprocessing.resource_tracker"

_watching_in: int | None = None  # the pid whose watch thread runs
_fork_hook = False


def install() -> None:
    """Watch this process's pdbox; a no-op outside a pdbox worker."""
    global _watching_in, _fork_hook
    raw = os.environ.get(PARENT_PID, "")
    if not raw.isdigit() or not sys.platform.startswith("linux") or _watching_in == os.getpid():
        return
    pdbox = int(raw)
    try:
        start: float | None = float(os.environ.get(PARENT_START, ""))
    except ValueError:
        start = None
    if os.getppid() == pdbox and os.getpgrp() == os.getpid():
        os.environ[GROUP] = str(os.getpid())
    _watching_in = os.getpid()
    threading.Thread(target=_watch, args=(pdbox, start, worker_group()),
                     name="pdbox-lifeline", daemon=True).start()
    if not _fork_hook:
        # Threads do not survive fork(): a forked child (multiprocessing's
        # "fork" method) starts its own watch. Registered once; forked
        # children inherit it.
        os.register_at_fork(after_in_child=install)
        _fork_hook = True


def worker_group() -> int | None:
    """This process's worker group, or None when it is not in one."""
    raw = os.environ.get(GROUP, "")
    return int(raw) if raw.isdigit() and os.getpgrp() == int(raw) else None


def _watch(pdbox: int, start: float | None, group: int | None) -> None:
    wait_gone(pdbox, start)
    end_worker(pdbox, group)


def wait_gone(pid: int, start: float | None, poll_s: float = POLL_S) -> None:
    """Return once `pid` is no longer the pdbox that started at `start`."""
    try:
        fd: int | None = os.pidfd_open(pid)
    except (OSError, AttributeError):
        fd = None  # gone already, or no pidfds here: poll instead
    try:
        # Checked after the pidfd is open: from then on it cannot name a
        # process that reused the pid.
        if not pdbox_alive(pid, start):
            return
        if fd is not None:
            p = select.poll()
            p.register(fd, select.POLLIN)
            events = p.poll()  # blocks until pdbox exits
            if any(ev & select.POLLIN for _, ev in events):
                return
            # The fd went bad (something in the process closed it): poll instead.
        while pdbox_alive(pid, start):
            time.sleep(poll_s)
    finally:
        if fd is not None:
            os.close(fd)


def end_worker(pdbox: int, group: int | None, grace_s: float = GRACE_S,
               tracker_s: float = TRACKER_S) -> None:
    """SIGTERM the worker's group; SIGKILL what still runs after the grace."""
    me = os.getpid()
    _say(f"pdbox (pid {pdbox}) is gone; ending "
         + (f"worker process group {group}" if group else f"process {me}"))
    _signal(group, me, signal.SIGTERM)
    time.sleep(grace_s)
    # Still here: some process of the worker did not stop on SIGTERM.
    pids = pgroup.live_pids(group) if group else [me]
    rest = sorted((p for p in pids if TRACKER not in pgroup.cmdline(p)), key=lambda p: p == me)
    if rest:
        _say(f"{len(rest)} process(es) still run {grace_s:.0f} s after SIGTERM; killing "
             + ", ".join(map(str, rest)))
    for pid in rest:  # this process last, so that the others surely get theirs
        pgroup.signal_pid(pid, signal.SIGKILL)
    time.sleep(tracker_s)
    _signal(group, me, signal.SIGKILL)


def _signal(group: int | None, me: int, sig: int) -> None:
    try:
        if group:
            os.killpg(group, sig)
        else:
            os.kill(me, sig)
    except (ProcessLookupError, PermissionError):
        pass




def _say(message: str) -> None:
    try:
        print(f"pdbox lifeline (pid {os.getpid()}): {message}", file=sys.stderr, flush=True)
    except (OSError, ValueError):
        pass  # stderr closed while the process stops
