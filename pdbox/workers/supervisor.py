"""The supervisor: start, watch, restart, drain and stop vLLM worker processes.

Each worker runs in its own process group (start_new_session), so stopping it
is one killpg: SIGTERM, then SIGKILL after a grace period, which also reaches
the engine-core processes vLLM forks. When a worker's main process dies on its
own (a crash, an OOM kill), its engine core lives on in that group with parent
1, holding memory and the worker's ports; so the supervisor ends the old group
the same way and starts the replacement only once no process of it is left. Processes, the clock and the health
probe are injected, so the lifecycle (backoff, start failures, stop
escalation) is tested with fakes and no sleeping.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from pdbox.workers import pgroup
from pdbox.workers.vllm import WorkerSpec

STATES = ("starting", "warming", "ready", "draining", "restarting", "failed", "stopped")


def group_running(pgid: int) -> bool:
    """True while a process of the group is alive (zombies do not count)."""
    return pgroup.running(pgid)


class SupervisorError(Exception):
    """pdbox cannot go on (a worker keeps failing to start); str() is for the user."""


# ------------------------------------------------------------------ injectables


class Clock(Protocol):
    def now(self) -> float: ...
    async def sleep(self, seconds: float) -> None: ...


class RealClock:
    def now(self) -> float:
        return time.monotonic()

    async def sleep(self, seconds: float) -> None:
        await asyncio.sleep(seconds)


class Proc(Protocol):
    pid: int

    def poll(self) -> int | None: ...
    def signal_group(self, sig: int) -> None: ...
    def group_alive(self) -> bool: ...


class Launcher(Protocol):
    def spawn(self, spec: WorkerSpec, log_path: Path) -> Proc: ...


class Prober(Protocol):
    async def healthy(self, spec: WorkerSpec) -> bool: ...
    async def warm_up(self, spec: WorkerSpec) -> bool: ...


@dataclass
class PopenProc:
    popen: subprocess.Popen[bytes]

    @property
    def pid(self) -> int:
        return self.popen.pid

    def poll(self) -> int | None:
        return self.popen.poll()

    def signal_group(self, sig: int) -> None:
        # The worker leads its own group (start_new_session), so pgid == pid.
        try:
            os.killpg(self.popen.pid, sig)
        except (ProcessLookupError, PermissionError):
            pass

    def group_alive(self) -> bool:
        self.popen.poll()  # reap the leader, so it does not count as alive
        return group_running(self.popen.pid)


class PopenLauncher:
    def spawn(self, spec: WorkerSpec, log_path: Path) -> Proc:
        fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        try:
            popen = subprocess.Popen(
                spec.argv,
                env=spec.env,
                stdin=subprocess.DEVNULL,
                stdout=fd,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                close_fds=True,
            )
        finally:
            os.close(fd)
        return PopenProc(popen)


# ----------------------------------------------------------------------- worker


@dataclass
class Worker:
    spec: WorkerSpec
    log_path: Path
    state: str = "starting"
    proc: Proc | None = None
    restarts: int = 0
    start_failures: int = 0
    started_at: float = 0.0
    next_start_at: float = 0.0
    unhealthy_since: float | None = None
    last_probe: float = float("-inf")
    exit_code: int | None = None
    generation: int = 0
    # The process group of a main process that died: what is left of it is
    # ended (SIGTERM, then SIGKILL) before the replacement may start.
    leftover: Proc | None = None
    leftover_since: float = 0.0
    leftover_killed: bool = False
    # When the worker stopped serving unexpectedly, and why: the replacement's
    # "back in N s" event reports the recovery time.
    down_since: float | None = None
    down_reason: str = ""
    last_recovery_s: float | None = None

    @property
    def id(self) -> str:
        return self.spec.id

    @property
    def role(self) -> str:
        return self.spec.role

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc else None

    def log_tail(self, lines: int = 20) -> list[str]:
        try:
            with open(self.log_path, "rb") as f:
                f.seek(0, os.SEEK_END)
                size = f.tell()
                f.seek(max(0, size - 64 * 1024))
                data = f.read().decode("utf-8", "replace")
        except OSError:
            return []
        return data.splitlines()[-lines:]


@dataclass
class SupervisorSettings:
    start_timeout_s: float = 600.0
    max_start_failures: int = 3
    backoff_base_s: float = 1.0
    backoff_cap_s: float = 30.0
    stop_grace_s: float = 10.0
    # A ready worker whose /health fails for this long is restarted (a hang).
    health_timeout_s: float = 15.0
    health_interval_s: float = 2.0
    tick_s: float = 0.5
    sequential_start: bool = False  # GPUs: one engine after another


Event = Callable[[str, str], None]  # (kind, message)


@dataclass
class Supervisor:
    launcher: Launcher
    prober: Prober
    clock: Clock
    log_dir: Path
    settings: SupervisorSettings = field(default_factory=SupervisorSettings)
    on_event: Event = lambda kind, msg: None
    on_state: Callable[[Worker], None] = lambda w: None
    # Called right before every start and restart: the spec to start with.
    # The fleet swaps ports that something else took since they were handed
    # out (a GPU worker may wait minutes for its turn to start).
    respec: Callable[[WorkerSpec], WorkerSpec] = lambda spec: spec
    workers: dict[str, Worker] = field(default_factory=dict)
    fatal: str | None = None
    _recent: deque[str] = field(default_factory=lambda: deque(maxlen=200))
    # Workers being stopped on purpose (restart, drain): tick() leaves them
    # alone, so their exit is not taken for a crash.
    _stopping: set[str] = field(default_factory=set)

    # -------------------------------------------------------------- lifecycle

    def add(self, spec: WorkerSpec) -> Worker:
        w = Worker(spec=spec, log_path=self.log_dir / f"{spec.id}.log")
        self.workers[spec.id] = w
        if not self.settings.sequential_start or not self._someone_starting():
            self._spawn(w)
        else:
            w.next_start_at = 0.0  # spawned by tick() once the one starting now is ready
        return w

    def _someone_starting(self) -> bool:
        return any(
            w.state in ("starting", "warming") and w.proc is not None for w in self.workers.values()
        )

    def _spawn(self, w: Worker) -> None:
        w.spec = self.respec(w.spec)
        w.generation += 1
        w.started_at = self.clock.now()
        w.exit_code = None
        w.unhealthy_since = None
        w.state = "starting"
        try:
            w.proc = self.launcher.spawn(w.spec, w.log_path)
        except OSError as exc:
            # e.g. the interpreter is gone or the log folder is not writable:
            # a start failure like any other, so it backs off and ends in `fatal`.
            w.proc = None
            self._exited(w, 127, w.started_at, reason=f"could not be started ({exc})")
            return
        self._set(w, "starting", f"{w.id} starting (pid {w.proc.pid}, {w.spec.slice or 'gpu'})")

    def _set(self, w: Worker, state: str, message: str | None = None) -> None:
        if w.state != state or message:
            w.state = state
            if message:
                self.on_event("worker", message)
            self.on_state(w)

    def _backoff(self, failures: int) -> float:
        return min(self.settings.backoff_base_s * 2 ** max(0, failures - 1), self.settings.backoff_cap_s)

    async def tick(self) -> None:
        """One pass over every worker: notice exits, hangs, readiness; restart with backoff."""
        now = self.clock.now()
        for w in list(self.workers.values()):
            if w.leftover is not None and not self._reap_leftover(w, now):
                continue  # the old group still runs: no replacement yet
            if w.state in ("stopped", "failed") or w.id in self._stopping:
                continue
            if w.proc is None:
                if w.state in ("restarting", "starting") and now >= w.next_start_at:
                    if not (self.settings.sequential_start and self._someone_starting()):
                        self._spawn(w)
                continue
            proc = w.proc
            code = proc.poll()
            if code is not None:
                self._exited(w, code, now, proc=proc)
                continue
            if w.state == "starting":
                if await self.prober.healthy(w.spec) and self._current(w, proc):
                    self._set(w, "warming", f"{w.id} answers /health; warming up")
                    warm = await self.prober.warm_up(w.spec)
                    if not self._current(w, proc):
                        continue
                    if warm:
                        w.start_failures = 0
                        self._set(w, "ready", self._ready_message(w, self.clock.now()))
                        continue
                    self._set(w, "starting")
                if self._current(w, proc) and now - w.started_at > self.settings.start_timeout_s:
                    # Also when /health answers but warm-up never succeeds.
                    proc.signal_group(signal.SIGKILL)
                    self._exited(w, -9, now, reason="did not become ready in time", proc=proc,
                                 killed=True)
            elif w.state in ("ready", "draining"):
                # Probing a ready worker costs its API server CPU on the worker's
                # own core; every couple of seconds is plenty to catch a hang.
                if now - w.last_probe < self.settings.health_interval_s:
                    continue
                w.last_probe = now
                healthy = await self.prober.healthy(w.spec)
                if not self._current(w, proc):
                    continue
                if healthy:
                    w.unhealthy_since = None
                else:
                    if w.unhealthy_since is None:
                        w.unhealthy_since = now
                    if now - w.unhealthy_since >= self.settings.health_timeout_s:
                        self.on_event("worker", f"{w.id} stopped answering /health; restarting it")
                        proc.signal_group(signal.SIGKILL)
                        self._exited(w, -9, now, reason="hung", proc=proc, killed=True)

    def _current(self, w: Worker, proc: Proc) -> bool:
        """False once a stop or restart took this worker's process away during an await."""
        return w.proc is proc and w.id not in self._stopping

    def _ready_message(self, w: Worker, now: float) -> str:
        msg = f"{w.id} ready on port {w.spec.ports.http}"
        if w.down_since is not None:
            w.last_recovery_s = now - w.down_since
            msg += f"; back in {w.last_recovery_s:.0f} s after it {w.down_reason}"
            w.down_since = None
        return msg

    def _reap_leftover(self, w: Worker, now: float) -> bool:
        """End what is left of a dead main process's group; True once none of it runs."""
        old = w.leftover
        assert old is not None
        if not old.group_alive():
            w.leftover = None
            return True
        if not w.leftover_killed and now - w.leftover_since >= self.settings.stop_grace_s:
            # vLLM's engine core can ignore SIGTERM for a long time once its
            # API server is gone.
            old.signal_group(signal.SIGKILL)
            w.leftover_killed = True
            self.on_event("worker", f"{w.id}: old process group {old.pid} did not stop on "
                                    "SIGTERM; killed it")
        return False

    def _exited(self, w: Worker, code: int, now: float, reason: str = "",
                proc: Proc | None = None, killed: bool = False) -> None:
        w.exit_code = code
        w.proc = None
        if proc is not None:
            # The main process is gone, but vLLM's engine core (and its workers)
            # may live on in the group: end them before anything replaces them.
            if not killed:
                proc.signal_group(signal.SIGTERM)
            w.leftover, w.leftover_since, w.leftover_killed = proc, now, killed
        if w.state == "draining":
            self._set(w, "stopped", f"{w.id} stopped")
            return
        was_starting = w.state in ("starting", "warming")
        why = reason or f"exited with code {code}"
        if w.down_since is None and not was_starting:
            w.down_since, w.down_reason = now, why
        if was_starting:
            w.start_failures += 1
            if w.start_failures >= self.settings.max_start_failures:
                tail = "\n".join(w.log_tail(20))
                self.fatal = (
                    f"{w.id} failed to start {w.start_failures} times ({why}); "
                    f"last lines of {w.log_path}:\n{tail}"
                )
                self._set(w, "failed", f"{w.id} failed to start {w.start_failures} times")
                return
            delay = self._backoff(w.start_failures)
        else:
            delay = self._backoff(1)
        w.restarts += 1
        w.next_start_at = now + delay
        self._set(w, "restarting", f"{w.id} {why}; restarting in {delay:.0f}s")

    async def wait_ready(self, ids: list[str] | None = None, timeout: float | None = None,
                         any_of: list[str] | None = None) -> None:
        """Tick until the given workers are ready (all of `ids`, default every one; or
        one of `any_of`), or raise SupervisorError."""
        deadline = None if timeout is None else self.clock.now() + timeout
        while True:
            await self.tick()
            if self.fatal:
                raise SupervisorError(self.fatal)
            if any_of and any(self.workers[i].state == "ready" for i in any_of):
                return
            ws = [self.workers[i] for i in (ids or list(self.workers))]
            if not any_of and all(w.state == "ready" for w in ws):
                return
            if deadline is not None and self.clock.now() > deadline:
                raise SupervisorError("workers did not become ready in time")
            await self.clock.sleep(self.settings.tick_s)

    async def restart(self, wid: str) -> None:
        w = self.workers[wid]
        await self._stop_one(w)
        w.restarts += 1
        w.start_failures = 0
        w.next_start_at = self.clock.now()
        self._set(w, "restarting", f"{w.id} restart requested")

    def begin_drain(self, wid: str) -> None:
        w = self.workers[wid]
        self._set(w, "draining", f"{w.id} draining")

    async def finish_drain(self, wid: str) -> None:
        """Stop a drained worker and forget it."""
        w = self.workers[wid]
        await self._stop_one(w)
        self._set(w, "stopped", f"{w.id} stopped")
        self.workers.pop(wid, None)

    async def _stop_one(self, w: Worker) -> None:
        if w.proc is None and w.leftover is None:
            return
        self._stopping.add(w.id)
        try:
            await self._stop_procs([w])
        finally:
            self._stopping.discard(w.id)

    async def _stop_procs(self, ws: list[Worker]) -> None:
        # The processes are taken now: tick() may run during the grace period.
        live = [(w, w.proc) for w in ws if w.proc is not None]
        live += [(w, w.leftover) for w in ws if w.leftover is not None]
        for _, proc in live:
            proc.signal_group(signal.SIGTERM)
        # The grace is for the whole group: vLLM's engine core and model
        # workers finish their own clean stop after the main process has gone.
        deadline = self.clock.now() + self.settings.stop_grace_s
        while self.clock.now() < deadline:
            if not any(proc.group_alive() for _, proc in live):
                break
            await self.clock.sleep(0.1)
        for _, proc in live:
            # SIGKILL the whole group even when the leader is gone: the
            # engine-core children may still be alive in it.
            proc.signal_group(signal.SIGKILL)
        # Return only once no process of those groups runs any more, so that
        # "pdbox stopped" really means nothing of it is left.
        deadline = self.clock.now() + 10.0
        while self.clock.now() < deadline and any(proc.group_alive() for _, proc in live):
            await self.clock.sleep(0.1)
        for w, proc in live:
            if w.proc is proc:
                w.proc = None
            if w.leftover is proc and not proc.group_alive():
                w.leftover = None

    async def stop_all(self) -> None:
        ws = list(self.workers.values())
        self._stopping.update(w.id for w in ws)
        try:
            await self._stop_procs(ws)
        finally:
            self._stopping.difference_update(w.id for w in ws)
        for w in ws:
            if w.state != "stopped":
                self._set(w, "stopped")

    def pgids(self) -> list[int]:
        return [w.proc.pid for w in self.workers.values() if w.proc is not None] + [
            w.leftover.pid for w in self.workers.values() if w.leftover is not None]
