"""The supervisor: start, watch, restart, drain and stop vLLM worker processes.

Each worker runs in its own process group (start_new_session), so stopping it
is one killpg: SIGTERM, then SIGKILL after a grace period, which also reaches
the engine-core processes vLLM forks. When a worker's main process dies on its
own (a crash, an OOM kill), its engine core lives on in that group with parent
1, holding memory and the worker's ports; so the supervisor ends the old group
the same way and starts the replacement only once no process of it is left,
then removes the shared memory that group left in /dev/shm (shm.py).

When to try again after a failure, when a failure ends pdbox, and when a
silent worker counts as frozen is restart_policy.py's. Processes, the clock
and the health probe are injected (procs.py), so the lifecycle is tested with
fakes and no sleeping.
"""

from __future__ import annotations

import asyncio
import os
import signal
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from pdbox.workers import restart_policy as policy
from pdbox.workers import shm
from pdbox.workers.procs import (  # noqa: F401 - re-exported for callers and tests
    Clock,
    Launcher,
    PopenLauncher,
    PopenProc,
    Prober,
    Proc,
    RealClock,
    group_running,
)
from pdbox.workers.vllm import WorkerSpec

STATES = ("starting", "warming", "ready", "unresponsive", "draining", "restarting", "backoff",
          "failed", "stopped")
# Waiting for its next start: at once after one failure, after a back-off in a crash loop.
WAITING = ("restarting", "backoff")


class SupervisorError(Exception):
    """pdbox cannot go on (a worker keeps failing to start); str() is for the user."""


# ----------------------------------------------------------------------- worker


@dataclass
class Worker:
    spec: WorkerSpec
    log_path: Path
    state: str = "starting"
    proc: Proc | None = None
    restarts: int = 0
    # Failures that end pdbox: ended on its own before it was ever ready.
    start_failures: int = 0
    # Failures in a row, of any kind, with no stable ready period between.
    failures: int = 0
    ever_ready: bool = False
    ready_since: float | None = None
    # Its last start-up, spawn to ready (warm-up included): the back-off's ceiling.
    start_s: float | None = None
    backoff_s: float = 0.0
    started_at: float = 0.0
    next_start_at: float = 0.0
    # The first /health probe of the current run of misses, and how many.
    unhealthy_since: float | None = None
    missed_probes: int = 0
    last_probe: float = float("-inf")
    exit_code: int | None = None
    generation: int = 0
    # The process group of a main process that died: what is left of it is
    # ended (SIGTERM, then SIGKILL) before the replacement may start.
    leftover: Proc | None = None
    leftover_since: float = 0.0
    leftover_killed: bool = False
    # /dev/shm files its processes held: removed once its group is gone.
    segments: set[str] = field(default_factory=set)
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

    @property
    def crash_looping(self) -> bool:
        """Failed again before it served a stable period: no capacity to count on."""
        return policy.crash_looping(self.failures)

    def next_try_in(self, now: float) -> float | None:
        """Seconds until its next start, while it waits for one."""
        if self.state not in WAITING or self.proc is not None:
            return None
        return max(0.0, self.next_start_at - now)

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
    # None: the worker's own measured start-up time (restart_policy.Backoff).
    backoff_cap_s: float | None = None
    stable_s: float = 60.0
    stop_grace_s: float = 10.0
    # A worker silent on /health this long is taken for hung and restarted.
    health_timeout_s: float = 15.0
    health_interval_s: float = 2.0
    # The probe's timeout: probe_multiple x (decode step + itl_s), at least probe_floor_s.
    itl_s: float = 0.25
    probe_multiple: float = 4.0
    probe_floor_s: float = 1.0
    probe_misses: int = 2
    tick_s: float = 0.5
    sequential_start: bool = False  # GPUs: one engine after another

    def backoff(self) -> policy.Backoff:
        return policy.Backoff(base_s=self.backoff_base_s, cap_s=self.backoff_cap_s,
                              stable_s=self.stable_s,
                              max_start_failures=self.max_start_failures)

    def freeze(self) -> policy.Freeze:
        return policy.Freeze(itl_s=self.itl_s, multiple=self.probe_multiple,
                             floor_s=self.probe_floor_s, misses=self.probe_misses,
                             restart_after_s=self.health_timeout_s)


Event = Callable[[str, str], None]  # (kind, message)


def how_it_ended(code: int) -> str:
    if code < 0:
        try:
            return f"was killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"was killed by signal {-code}"
    return f"exited with code {code}"


def _nth(n: int) -> str:
    suffix = "th" if 10 <= n % 100 <= 20 else {1: "st", 2: "nd", 3: "rd"}.get(n % 10, "th")
    return f"{n}{suffix}"


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
    # The measured decode step of the worker's slice (calibration), or None:
    # it sizes the /health probe's timeout.
    step_s: Callable[[WorkerSpec], float | None] = lambda spec: None
    # Removes a gone group's /dev/shm files: (path, bytes) of each removed.
    sweep: Callable[[set[str]], list[tuple[str, int]]] = shm.remove_left
    workers: dict[str, Worker] = field(default_factory=dict)
    fatal: str | None = None
    _recent: deque[str] = field(default_factory=lambda: deque(maxlen=200))
    # Workers being stopped on purpose (restart, drain): tick() leaves them
    # alone, so their exit is not taken for a crash.
    _stopping: set[str] = field(default_factory=set)
    # Roles of which a worker was ready once: the configuration works.
    _roles_ready: set[str] = field(default_factory=set)
    # Per starting worker, its start probe and warm-up (seconds, with the fleet's
    # calibration) in flight: a task, so that tick() goes on watching the others.
    _starts: dict[str, asyncio.Task[None]] = field(default_factory=dict)

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
        w.missed_probes = 0
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

    def probe_timeout_s(self, w: Worker) -> float:
        return self.settings.freeze().probe_timeout_s(self.step_s(w.spec))

    async def tick(self) -> None:
        """One pass over every worker: notice exits, freezes, readiness; restart with back-off."""
        now = self.clock.now()
        due: list[tuple[Worker, Proc]] = []
        for w in list(self.workers.values()):
            if w.leftover is not None and not self._reap_leftover(w, now):
                continue  # the old group still runs: no replacement yet
            if w.state in ("stopped", "failed") or w.id in self._stopping:
                continue
            if w.proc is None:
                if w.state in (*WAITING, "starting") and now >= w.next_start_at:
                    if not (self.settings.sequential_start and self._someone_starting()):
                        self._spawn(w)
                continue
            proc = w.proc
            code = proc.poll()
            if code is not None:
                self._exited(w, code, now, proc=proc)
                continue
            if w.state in ("starting", "warming"):
                self._check_start(w, proc, now)
            elif w.state in ("ready", "unresponsive", "draining"):
                if w.state == "ready" and w.failures and self.settings.backoff().forgiven(
                        w.ready_since, now):
                    w.failures = 0  # served long enough: earlier failures are forgiven
                # A probe costs the API server about 2 ms; one per probe timeout
                # (at most health_interval_s apart) keeps the freeze bound at three
                # timeouts and a tick, and a miss is checked again at once.
                interval = 0.0 if w.missed_probes else min(
                    self.settings.health_interval_s, self.probe_timeout_s(w))
                if now - w.last_probe >= interval:
                    w.last_probe = now
                    due.append((w, proc))
        if due:
            # Together: a frozen worker's probe, waiting out its timeout, must
            # not hold up the others' probes.
            oks = await asyncio.gather(*(self.prober.healthy(w.spec, self.probe_timeout_s(w))
                                         for w, _ in due))
            for (w, proc), ok in zip(due, oks, strict=True):
                if self._current(w, proc):
                    # /health is the API server's alone: a stopped engine core
                    # (SIGSTOP) is seen in /proc instead.
                    stopped = proc.stopped() if ok else []
                    self._probed(w, proc, ok and not stopped, now, stopped)
        # Let start checks begun in this tick take their first step (a fake
        # prober's end there; a real one's go on between ticks).
        await asyncio.sleep(0)

    def _check_start(self, w: Worker, proc: Proc, now: float) -> None:
        """Start a starting worker's probe and warm-up unless one is in flight; end
        a worker that is not ready within the start timeout."""
        task = self._starts.get(w.id)
        if now - w.started_at > self.settings.start_timeout_s:
            # Also when /health answers but warm-up never succeeds.
            if task is not None:
                task.cancel()
                self._starts.pop(w.id, None)
            proc.signal_group(signal.SIGKILL)
            self._exited(w, -9, now, reason="did not become ready in time", proc=proc,
                         killed=True)
            return
        if task is not None and not task.done():
            return
        if task is not None:
            self._starts.pop(w.id, None)
            if not task.cancelled() and (exc := task.exception()) is not None:
                self.on_event("error", f"{w.id}: start check failed: {exc!r}")
        self._starts[w.id] = asyncio.ensure_future(self._starting(w, proc))

    async def _starting(self, w: Worker, proc: Proc) -> None:
        if not (await self.prober.healthy(w.spec) and self._current(w, proc)):
            return
        self._set(w, "warming", f"{w.id} answers /health; warming up")
        warm = await self.prober.warm_up(w.spec)
        if not self._current(w, proc):
            return
        if warm:
            self._became_ready(w, proc)
        else:
            self._set(w, "starting")

    def _became_ready(self, w: Worker, proc: Proc) -> None:
        now = self.clock.now()
        w.start_failures = 0
        w.ever_ready = True
        w.ready_since = now
        w.start_s = now - w.started_at
        self._roles_ready.add(w.role)
        # What this group holds in /dev/shm, in case it later dies whole.
        w.segments |= proc.segments()
        self._set(w, "ready", self._ready_message(w, now))

    def _probed(self, w: Worker, proc: Proc, ok: bool, sent_at: float,
                stopped: list[int] | None = None) -> None:
        """One probe's answer: a miss, a freeze, a hang, or back to ready."""
        now = self.clock.now()
        if ok:
            if w.state == "unresponsive" and w.unhealthy_since is not None:
                self._set(w, "ready", f"{w.id} answers /health again after "
                                      f"{now - w.unhealthy_since:.1f} s; routed to again")
            w.unhealthy_since, w.missed_probes = None, 0
            return
        fz = self.settings.freeze()
        w.missed_probes += 1
        if w.unhealthy_since is None:
            w.unhealthy_since = sent_at
        if w.state == "ready" and w.missed_probes >= fz.misses:
            what = (f"has stopped process(es) {', '.join(map(str, stopped))}" if stopped else
                    f"missed {w.missed_probes} /health probes of "
                    f"{self.probe_timeout_s(w):.1f} s")
            self._set(w, "unresponsive", (
                f"{w.id} {what}; not routed to until it answers "
                f"(restarted if silent for {fz.restart_after_s:.0f} s)"))
        if now - w.unhealthy_since >= fz.restart_after_s:
            self.on_event("worker", f"{w.id} stopped answering /health for "
                                    f"{now - w.unhealthy_since:.0f} s; restarting it")
            w.segments |= proc.segments()
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
            self._sweep(w)
            return True
        if not w.leftover_killed and now - w.leftover_since >= self.settings.stop_grace_s:
            # vLLM's engine core can ignore SIGTERM for a long time once its
            # API server is gone.
            w.segments |= old.segments()
            old.signal_group(signal.SIGKILL)
            w.leftover_killed = True
            self.on_event("worker", f"{w.id}: old process group {old.pid} did not stop on "
                                    "SIGTERM; killed it")
        return False

    def _sweep(self, w: Worker) -> None:
        """Remove the /dev/shm files the worker's gone group left (a SIGKILL
        also kills the resource tracker that would have)."""
        held, w.segments = w.segments, set()
        if not held:
            return
        removed = self.sweep(held)
        if removed:
            mb = sum(size for _, size in removed) / 1e6
            names = ", ".join(os.path.basename(p) for p, _ in removed)
            self.on_event("worker", f"{w.id}: removed {len(removed)} shared-memory "
                                    f"segment(s) its old processes left ({mb:.0f} MB: {names})")

    def _exited(self, w: Worker, code: int, now: float, reason: str = "",
                proc: Proc | None = None, killed: bool = False) -> None:
        w.exit_code = code
        w.proc = None
        if (task := self._starts.pop(w.id, None)) is not None:
            task.cancel()  # a start check of the process that is gone
        if proc is not None:
            # The main process is gone, but vLLM's engine core (and its workers)
            # may live on in the group: end them before anything replaces them.
            w.segments |= proc.segments()
            if not killed:
                proc.signal_group(signal.SIGTERM)
            w.leftover, w.leftover_since, w.leftover_killed = proc, now, killed
        if w.state == "draining":
            self._set(w, "stopped", f"{w.id} stopped")
            return
        was_starting = w.state in ("starting", "warming")
        why = reason or how_it_ended(code)
        if w.down_since is None and not was_starting:
            w.down_since, w.down_reason = now, why
        bo = self.settings.backoff()
        if w.ready_since is not None and bo.forgiven(w.ready_since, now):
            w.failures = 0
        w.ready_since, w.unhealthy_since, w.missed_probes = None, None, 0
        w.failures += 1
        if was_starting and not w.ever_ready and policy.ended_on_its_own(code, killed):
            w.start_failures += 1
        if bo.fatal(ever_ready=w.ever_ready, role_ever_ready=w.role in self._roles_ready,
                    own_failures=w.start_failures):
            tail = "\n".join(w.log_tail(20))
            self.fatal = (
                f"{w.id} failed to start {w.start_failures} times ({why}); "
                f"last lines of {w.log_path}:\n{tail}"
            )
            self._set(w, "failed", f"{w.id} failed to start {w.start_failures} times")
            return
        delay = w.backoff_s = bo.delay(w.failures, w.start_s)
        w.restarts += 1
        w.next_start_at = now + delay
        if w.crash_looping:
            self._set(w, "backoff", (
                f"{w.id} {why}; {_nth(w.failures)} failure in a row, next try in {delay:.0f} s "
                f"(back-off, at most {bo.ceiling(w.start_s):.0f} s); the others serve"))
        else:
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
        """The operator's restart: a fresh try, whatever failed before."""
        w = self.workers[wid]
        await self._stop_one(w)
        w.restarts += 1
        w.start_failures = w.failures = 0
        w.ready_since = None
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
        for w in ws:
            if (task := self._starts.pop(w.id, None)) is not None:
                task.cancel()
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
        for w, proc in live:
            if proc.group_alive():
                w.segments |= proc.segments()
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
        for w in {id(w): w for w, _ in live}.values():
            if w.proc is None and w.leftover is None:
                self._sweep(w)

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
