"""The supervisor's lifecycle with fake processes, a fake prober and a fake clock.

No test sleeps: the clock only moves when a test (or the supervisor's own
sleep) moves it. The fake processes exit when signalled, after a delay on
the fake clock, or never (a process that ignores SIGTERM). A few tests at the
end start real `sleep` processes to check the process-group handling.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest

from pdbox.workers.supervisor import (
    PopenLauncher,
    RealClock,
    Supervisor,
    SupervisorError,
    SupervisorSettings,
    Worker,
)
from pdbox.workers.vllm import WorkerPorts, WorkerSpec
from tests.helpers import process_gone

# ----------------------------------------------------------------------- fakes


class FakeClock:
    def __init__(self, t: float = 0.0) -> None:
        self.t = t
        self.slept: list[float] = []
        # Runs at every sleep: what else the event loop would do meanwhile.
        self.on_sleep: Callable[[], Awaitable[None]] | None = None

    def now(self) -> float:
        return self.t

    async def sleep(self, seconds: float) -> None:
        self.slept.append(seconds)
        self.t += seconds
        if self.on_sleep is not None:
            await self.on_sleep()

    def advance(self, seconds: float) -> None:
        self.t += seconds


class FakeProc:
    """A worker process group. SIGKILL ends it at once; SIGTERM after `term_delay`
    seconds on the clock, or never when term_delay is None."""

    def __init__(self, pid: int, clock: FakeClock, term_delay: float | None = 0.0) -> None:
        self.pid = pid
        self.clock = clock
        self.term_delay = term_delay
        self.code: int | None = None
        self.exit_at: float | None = None
        self.signals: list[int] = []
        self.linger = 0.0
        self.killed_at: float | None = None
        # Children left in the group when the leader dies on its own; they stop
        # on SIGTERM unless `orphans_ignore_term`, and always on SIGKILL.
        self.orphans = False
        self.orphans_ignore_term = False
        # The /dev/shm files its processes map (the real one reads /proc).
        self.shm: set[str] = set()
        self.stopped_pids: list[int] = []  # processes of the group in state T

    def poll(self) -> int | None:
        if self.code is None and self.exit_at is not None and self.clock.now() >= self.exit_at:
            self.code = -signal.SIGTERM
        return self.code

    def signal_group(self, sig: int) -> None:
        self.signals.append(sig)
        if sig == signal.SIGKILL:
            self.killed_at = self.clock.now()
        if sig == signal.SIGKILL and self.code is None:
            self.code = -signal.SIGKILL
        elif sig == signal.SIGTERM and self.term_delay is not None and self.exit_at is None:
            self.exit_at = self.clock.now() + self.term_delay

    def group_alive(self) -> bool:
        # `linger`: children of the group that outlive the leader for a while.
        if self.poll() is None:
            return True
        if self.orphans and self.killed_at is None and not (
                signal.SIGTERM in self.signals and not self.orphans_ignore_term):
            return True  # an engine core that outlives its main process
        return self.killed_at is not None and self.clock.now() < self.killed_at + self.linger

    def exit(self, code: int) -> None:
        self.code = code

    def segments(self) -> set[str]:
        return set(self.shm) if self.group_alive() else set()

    def stopped(self) -> list[int]:
        return list(self.stopped_pids)


class FakeLauncher:
    def __init__(self, clock: FakeClock) -> None:
        self.clock = clock
        self.procs: list[tuple[str, FakeProc]] = []
        self.term_delay: float | None = 0.0
        self.log_lines: list[str] = []
        self.fail: OSError | None = None

    def spawn(self, spec: WorkerSpec, log_path: Path) -> FakeProc:
        if self.fail is not None:
            raise self.fail
        if self.log_lines:
            with open(log_path, "a") as f:
                f.write("".join(line + "\n" for line in self.log_lines))
        proc = FakeProc(1000 + len(self.procs), self.clock, self.term_delay)
        self.procs.append((spec.id, proc))
        return proc

    def last(self, wid: str) -> FakeProc:
        return [p for i, p in self.procs if i == wid][-1]

    def count(self, wid: str) -> int:
        return sum(1 for i, _ in self.procs if i == wid)


class FakeProber:
    def __init__(self) -> None:
        self.health: dict[str, bool] = {}
        self.warm: dict[str, bool] = {}
        self.asked: list[tuple[str, str]] = []
        self.timeouts: list[float | None] = []

    async def healthy(self, spec: WorkerSpec, timeout_s: float | None = None) -> bool:
        self.asked.append(("health", spec.id))
        self.timeouts.append(timeout_s)
        return self.health.get(spec.id, False)

    async def warm_up(self, spec: WorkerSpec) -> bool:
        self.asked.append(("warm", spec.id))
        return self.warm.get(spec.id, True)


def spec(wid: str = "decode-0", port: int = 9000) -> WorkerSpec:
    role, index = wid.rsplit("-", 1)
    return WorkerSpec(id=wid, role=role, index=int(index), argv=["true"], env={},
                      ports=WorkerPorts(http=port), cores="1")


class Rig:
    def __init__(self, tmp_path: Path, **settings: object) -> None:
        self.clock = FakeClock()
        self.launcher = FakeLauncher(self.clock)
        self.prober = FakeProber()
        self.events: list[str] = []
        self.states: list[tuple[str, str]] = []
        self.swept: list[set[str]] = []
        self.sup = Supervisor(
            launcher=self.launcher, prober=self.prober, clock=self.clock, log_dir=tmp_path,
            settings=SupervisorSettings(**settings),  # type: ignore[arg-type]
            on_event=lambda kind, msg: self.events.append(msg),
            on_state=lambda w: self.states.append((w.id, w.state)),
            sweep=self._sweep,
        )

    def _sweep(self, paths: set[str]) -> list[tuple[str, int]]:
        self.swept.append(set(paths))
        return [(p, 100_000_000) for p in sorted(paths)]

    def tick(self) -> None:
        asyncio.run(self.sup.tick())

    def ready(self, wid: str = "decode-0") -> Worker:
        w = self.sup.add(spec(wid)) if wid not in self.sup.workers else self.sup.workers[wid]
        self.prober.health[wid] = True
        self.tick()
        assert w.state == "ready"
        return w


@pytest.fixture
def rig(tmp_path: Path) -> Rig:
    return Rig(tmp_path)


# ------------------------------------------------------------------- start-up


def test_starting_warming_ready(rig: Rig) -> None:
    w = rig.sup.add(spec())
    assert w.state == "starting" and w.pid == 1000
    rig.tick()
    assert w.state == "starting"  # /health not answering yet
    rig.prober.health["decode-0"] = True
    rig.clock.advance(1)
    rig.tick()
    assert w.state == "ready"
    assert [s for i, s in rig.states] == ["starting", "warming", "ready"]
    assert rig.prober.asked[-2:] == [("health", "decode-0"), ("warm", "decode-0")]
    assert "decode-0 ready on port 9000" in rig.events


def test_a_failed_warm_up_stays_starting_then_succeeds(rig: Rig) -> None:
    w = rig.sup.add(spec())
    rig.prober.health["decode-0"] = True
    rig.prober.warm["decode-0"] = False
    rig.tick()
    assert w.state == "starting"
    rig.prober.warm["decode-0"] = True
    rig.tick()
    assert w.state == "ready"


def test_wait_ready_returns_once_all_are_ready(rig: Rig) -> None:
    rig.sup.add(spec("prefill-0", 9001))
    rig.sup.add(spec("decode-0", 9002))
    rig.prober.health["prefill-0"] = True

    async def later() -> None:
        if rig.clock.now() >= 3:
            rig.prober.health["decode-0"] = True

    rig.clock.on_sleep = later
    asyncio.run(rig.sup.wait_ready())
    assert {w.state for w in rig.sup.workers.values()} == {"ready"}
    assert rig.clock.now() == pytest.approx(3.0)


def test_wait_ready_any_of_returns_with_the_first_ready(rig: Rig) -> None:
    rig.sup.add(spec("prefill-0", 9001))
    rig.sup.add(spec("decode-0", 9002))
    rig.prober.health["decode-0"] = True
    asyncio.run(rig.sup.wait_ready(any_of=["decode-0"]))
    assert rig.sup.workers["decode-0"].state == "ready"
    assert rig.sup.workers["prefill-0"].state == "starting"


def test_wait_ready_times_out(rig: Rig) -> None:
    rig.sup.add(spec())
    with pytest.raises(SupervisorError, match="did not become ready in time"):
        asyncio.run(rig.sup.wait_ready(timeout=5))


# ------------------------------------------------------------ crash and restart


def test_a_ready_worker_that_dies_is_restarted_after_backoff(rig: Rig) -> None:
    w = rig.ready()
    rig.launcher.last("decode-0").exit(1)
    rig.clock.advance(2)
    rig.tick()
    assert w.state == "restarting" and w.restarts == 1 and w.exit_code == 1
    assert w.next_start_at == pytest.approx(3.0)  # backoff_base_s after the exit
    assert any("exited with code 1; restarting in 1s" in e for e in rig.events)
    rig.clock.advance(0.5)
    rig.tick()
    assert rig.launcher.count("decode-0") == 1
    rig.clock.advance(0.5)
    rig.tick()
    assert rig.launcher.count("decode-0") == 2
    assert w.state == "starting" and w.pid == 1001 and w.generation == 2
    rig.tick()
    assert w.state == "ready" and w.restarts == 1


def crash(rig: Rig, code: int, ignore_term: bool) -> tuple[Worker, FakeProc]:
    """A ready worker whose main process dies, leaving its engine core in the group."""
    w = rig.ready()
    old = rig.launcher.last("decode-0")
    old.orphans, old.orphans_ignore_term = True, ignore_term
    old.exit(code)
    rig.tick()
    return w, old


def test_a_dead_main_process_has_its_group_ended_before_the_replacement(rig: Rig) -> None:
    """The crash case: the engine core outlives its main process and ignores SIGTERM."""
    w, old = crash(rig, -9, ignore_term=True)
    assert old.signals == [signal.SIGTERM]
    assert w.state == "restarting" and w.leftover is old
    assert rig.sup.pgids() == [old.pid]
    rig.clock.advance(5)  # past the backoff, within the stop grace
    rig.tick()
    assert rig.launcher.count("decode-0") == 1  # no replacement beside the old group
    rig.clock.advance(rig.sup.settings.stop_grace_s)
    rig.tick()
    assert old.signals == [signal.SIGTERM, signal.SIGKILL]
    assert any("did not stop on SIGTERM; killed it" in e for e in rig.events)
    rig.tick()
    assert rig.launcher.count("decode-0") == 2 and w.leftover is None
    rig.tick()
    assert w.state == "ready"
    assert any("back in 15 s after it was killed by SIGKILL" in e for e in rig.events)
    assert w.last_recovery_s == pytest.approx(15.0)


def test_a_dead_main_process_whose_group_stops_on_sigterm(rig: Rig) -> None:
    w, old = crash(rig, 1, ignore_term=False)
    assert old.signals == [signal.SIGTERM] and w.state == "restarting"
    rig.clock.advance(1)
    rig.tick()
    assert rig.launcher.count("decode-0") == 2
    assert signal.SIGKILL not in old.signals


def test_a_killed_group_has_its_shared_memory_removed_once_gone(rig: Rig) -> None:
    """The segments recorded while its processes ran, swept after the SIGKILL."""
    w = rig.ready()
    old = rig.launcher.last("decode-0")
    old.shm = {"/dev/shm/psm_a", "/dev/shm/psm_b"}
    old.orphans, old.orphans_ignore_term = True, True
    old.exit(-9)
    rig.tick()
    assert w.segments == {"/dev/shm/psm_a", "/dev/shm/psm_b"} and rig.swept == []
    rig.clock.advance(rig.sup.settings.stop_grace_s)
    rig.tick()  # SIGKILL: still running until this tick reaps it
    rig.tick()
    assert rig.swept == [{"/dev/shm/psm_a", "/dev/shm/psm_b"}] and w.segments == set()
    assert any("removed 2 shared-memory segment(s) its old processes left (200 MB: psm_a, "
               "psm_b)" in e for e in rig.events)


def test_a_hung_worker_has_its_shared_memory_removed(rig: Rig) -> None:
    w = rig.ready()
    rig.launcher.last("decode-0").shm = {"/dev/shm/psm_h"}
    rig.prober.health["decode-0"] = False
    for t in (0.0, 0.5, 15.0):
        rig.clock.t = t
        rig.tick()
    assert w.state == "restarting"
    rig.tick()
    assert rig.swept == [{"/dev/shm/psm_h"}]


def test_stop_all_sweeps_each_group(tmp_path: Path) -> None:
    r = Rig(tmp_path)
    r.launcher.term_delay = None  # ignores SIGTERM: SIGKILL after the grace
    r.ready("prefill-0")
    r.ready("decode-0")
    r.launcher.last("prefill-0").shm = {"/dev/shm/psm_p"}
    r.launcher.last("decode-0").shm = {"/dev/shm/psm_d"}
    asyncio.run(r.sup.stop_all())
    assert sorted(map(sorted, r.swept)) == [["/dev/shm/psm_d"], ["/dev/shm/psm_p"]]


def test_stop_all_also_ends_a_dead_main_process_group(rig: Rig) -> None:
    w, old = crash(rig, -9, ignore_term=True)
    asyncio.run(rig.sup.stop_all())
    assert signal.SIGKILL in old.signals and not old.group_alive()
    assert w.leftover is None and w.state == "stopped"


def test_start_failures_back_off_exponentially_then_fatal(tmp_path: Path) -> None:
    r = Rig(tmp_path, max_start_failures=6, backoff_base_s=1.0, backoff_cap_s=5.0)
    r.launcher.log_lines = [f"line {i}" for i in range(30)] + ["ValueError: no such model"]
    w = r.sup.add(spec())
    delays, states = [], []
    while w.state != "failed":
        r.launcher.last("decode-0").exit(1)
        r.tick()
        if w.state == "failed":
            break
        states.append(w.state)
        delays.append(w.next_start_at - r.clock.now())
        assert w.next_try_in(r.clock.now()) == pytest.approx(delays[-1])
        r.clock.t = w.next_start_at - 0.01
        r.tick()
        assert w.proc is None  # not before the backoff is over
        r.clock.t = w.next_start_at
        r.tick()
        assert w.state == "starting"
    assert delays == [1.0, 2.0, 4.0, 5.0, 5.0]
    assert states == ["restarting"] + ["backoff"] * 4
    assert any("2nd failure in a row, next try in 2 s (back-off, at most 5 s)" in e
               for e in r.events)
    assert w.start_failures == 6
    assert r.sup.fatal is not None
    assert r.sup.fatal.startswith("decode-0 failed to start 6 times (exited with code 1)")
    assert "ValueError: no such model" in r.sup.fatal
    assert "line 29" in r.sup.fatal and "line 5\n" not in r.sup.fatal
    assert str(w.log_path) in r.sup.fatal
    with pytest.raises(SupervisorError, match="no such model"):
        asyncio.run(r.sup.wait_ready())
    # A failed worker is left alone.
    r.clock.advance(100)
    r.tick()
    assert r.launcher.count("decode-0") == 6


def test_becoming_ready_forgets_earlier_start_failures(tmp_path: Path) -> None:
    r = Rig(tmp_path, max_start_failures=2)
    w = r.sup.add(spec())
    r.launcher.last("decode-0").exit(1)
    r.tick()
    assert w.start_failures == 1
    r.clock.advance(1)
    r.tick()
    r.ready()
    assert w.start_failures == 0 and w.ever_ready
    r.launcher.last("decode-0").exit(1)
    r.tick()
    # Failed again before it served a stable period: a crash loop, never fatal.
    assert w.state == "backoff" and w.crash_looping and r.sup.fatal is None


def ready_then(r: Rig, wid: str = "decode-0") -> tuple[Worker, FakeProc]:
    w = r.ready(wid)
    return w, r.launcher.last(wid)


def test_a_worker_that_was_ready_never_ends_the_box(tmp_path: Path) -> None:
    """Killed again and again while it restarts: it backs off to the ceiling, keeps
    trying, and is back once the kills stop."""
    r = Rig(tmp_path, max_start_failures=3, backoff_cap_s=None)
    w, _ = ready_then(r)
    delays = []
    for _ in range(8):
        r.launcher.last("decode-0").exit(-signal.SIGKILL)
        r.tick()
        assert r.sup.fatal is None and w.state in ("restarting", "backoff")
        delays.append(w.backoff_s)
        r.clock.t = w.next_start_at
        r.tick()
        assert w.state == "starting"  # killed while restarting, on the next turn
    assert delays == [1.0, 2.0, 4.0, 8.0, 10.0, 10.0, 10.0, 10.0]  # ceiling: start-up, >= 10 s
    assert w.crash_looping and w.failures == 8
    r.prober.health["decode-0"] = True
    r.tick()
    assert w.state == "ready" and w.failures == 8  # not forgiven at once
    r.clock.advance(r.sup.settings.stable_s)
    r.tick()
    assert w.failures == 0 and not w.crash_looping


def test_the_ceiling_is_the_measured_start_up(tmp_path: Path) -> None:
    r = Rig(tmp_path, backoff_cap_s=None)
    w = r.sup.add(spec())
    r.clock.advance(45)  # a 45 s start-up
    r.prober.health["decode-0"] = True
    r.tick()
    assert w.state == "ready" and w.start_s == pytest.approx(45)
    for _ in range(8):
        r.launcher.last("decode-0").exit(-signal.SIGKILL)
        r.tick()
        r.clock.t = w.next_start_at
        r.tick()
    assert w.backoff_s == pytest.approx(45)


def test_a_first_start_killed_by_a_signal_is_not_fatal(tmp_path: Path) -> None:
    """Never ready, but SIGKILLed (chaos, the OOM killer): not a configuration error."""
    r = Rig(tmp_path, max_start_failures=2)
    w = r.sup.add(spec())
    for _ in range(5):
        r.launcher.last("decode-0").exit(-signal.SIGKILL)
        r.tick()
        r.clock.t = w.next_start_at
        r.tick()
    assert r.sup.fatal is None and w.start_failures == 0 and w.failures == 5


def test_a_new_worker_of_a_role_that_works_is_not_fatal(tmp_path: Path) -> None:
    """A scale-up worker that exits at start: its role was ready before, so it backs off."""
    r = Rig(tmp_path, max_start_failures=2)
    r.ready("decode-0")
    w = r.sup.add(spec("decode-1", 9003))
    for _ in range(4):
        r.launcher.last("decode-1").exit(1)
        r.tick()
        r.clock.t = w.next_start_at
        r.tick()
    assert r.sup.fatal is None and w.start_failures == 4 and w.state == "starting"


def test_start_timeout_kills_the_group(tmp_path: Path) -> None:
    r = Rig(tmp_path, start_timeout_s=10.0)
    w = r.sup.add(spec())
    proc = r.launcher.last("decode-0")
    r.clock.advance(10)
    r.tick()
    assert w.state == "starting" and proc.signals == []
    r.clock.advance(0.5)
    r.tick()
    assert proc.signals == [signal.SIGKILL]
    assert w.state == "restarting" and w.start_failures == 1 and w.proc is None
    assert any("did not become ready in time" in e for e in r.events)


def test_start_timeout_also_when_warm_up_never_succeeds(tmp_path: Path) -> None:
    r = Rig(tmp_path, start_timeout_s=10.0)
    w = r.sup.add(spec())
    r.prober.health["decode-0"] = True
    r.prober.warm["decode-0"] = False
    r.tick()
    assert w.state == "starting"
    r.clock.advance(11)
    r.tick()
    assert r.launcher.procs[0][1].signals == [signal.SIGKILL]
    assert w.state == "restarting" and w.start_failures == 1


def test_a_launcher_error_counts_as_a_start_failure(tmp_path: Path) -> None:
    r = Rig(tmp_path, max_start_failures=2)
    r.launcher.fail = FileNotFoundError(2, "No such file or directory", "/gone/python")
    w = r.sup.add(spec())
    assert w.state == "restarting" and w.proc is None and w.start_failures == 1
    r.clock.advance(1)
    r.tick()
    assert w.state == "failed"
    assert r.sup.fatal is not None and "could not be started" in r.sup.fatal


# ------------------------------------------------------------------------ hangs


def test_a_freeze_is_unresponsive_after_two_misses_then_restarted(rig: Rig) -> None:
    w = rig.ready()  # at t = 0: "unhealthy since 0.0" must still count
    proc = rig.launcher.last("decode-0")
    rig.prober.health["decode-0"] = False
    rig.tick()
    assert w.unhealthy_since == 0.0 and w.missed_probes == 1 and w.state == "ready"
    rig.clock.advance(rig.sup.settings.tick_s)
    rig.tick()  # a miss is probed again at once, not after the interval
    assert w.missed_probes == 2 and w.state == "unresponsive"
    assert any("missed 2 /health probes of 1.0 s; not routed to" in e for e in rig.events)
    assert rig.states[-1] == ("decode-0", "unresponsive")
    rig.clock.t = 14.9
    rig.tick()
    assert w.state == "unresponsive" and proc.signals == []
    rig.clock.t = 15.0
    rig.tick()
    assert proc.signals == [signal.SIGKILL]
    assert w.state == "restarting" and w.restarts == 1 and w.start_failures == 0
    assert any("stopped answering /health for 15 s; restarting it" in e for e in rig.events)


def test_an_unresponsive_worker_that_answers_again_is_ready(rig: Rig) -> None:
    w = rig.ready()
    rig.prober.health["decode-0"] = False
    rig.tick()
    rig.clock.advance(0.5)
    rig.tick()
    assert w.state == "unresponsive"
    rig.clock.advance(10)
    rig.prober.health["decode-0"] = True
    rig.tick()
    assert w.state == "ready" and w.unhealthy_since is None and w.missed_probes == 0
    assert any("answers /health again after 10.5 s; routed to again" in e for e in rig.events)
    # The restart limit starts again with the next run of misses.
    rig.prober.health["decode-0"] = False
    rig.clock.advance(10)
    rig.tick()
    rig.clock.advance(10)
    rig.tick()
    assert w.state == "unresponsive" and rig.launcher.last("decode-0").signals == []


def test_a_stopped_engine_core_is_a_freeze_though_health_answers(rig: Rig) -> None:
    """vLLM's /health is the API server's: a SIGSTOPped engine core is seen in /proc."""
    w = rig.ready()
    proc = rig.launcher.last("decode-0")
    proc.stopped_pids = [4242]
    rig.tick()
    rig.clock.advance(0.5)
    rig.tick()
    assert w.state == "unresponsive"
    assert any("has stopped process(es) 4242; not routed to" in e for e in rig.events)
    proc.stopped_pids = []  # SIGCONT
    rig.clock.advance(0.5)
    rig.tick()
    assert w.state == "ready"


def test_a_ready_worker_is_probed_once_per_probe_timeout(rig: Rig) -> None:
    rig.ready()
    rig.tick()  # the first probe of a ready worker comes at once
    asked = len(rig.prober.asked)
    rig.clock.advance(0.5)
    rig.tick()
    assert len(rig.prober.asked) == asked  # within the interval: min(2 s, the 1 s timeout)
    rig.clock.advance(0.5)
    rig.tick()
    assert len(rig.prober.asked) == asked + 1


def test_one_miss_is_not_a_freeze(rig: Rig) -> None:
    w = rig.ready()
    rig.prober.health["decode-0"] = False
    rig.tick()
    rig.prober.health["decode-0"] = True
    rig.clock.advance(0.5)
    rig.tick()
    assert w.state == "ready" and w.missed_probes == 0
    assert ("decode-0", "unresponsive") not in rig.states


def test_the_probe_timeout_follows_the_step_and_the_itl_target(tmp_path: Path) -> None:
    r = Rig(tmp_path, itl_s=0.25, probe_multiple=4.0, probe_floor_s=1.0)
    r.sup.step_s = lambda spec: 0.05
    r.ready()
    r.clock.advance(2)
    r.tick()
    assert r.prober.timeouts[-1] == pytest.approx(4 * (0.05 + 0.25))
    r.sup.step_s = lambda spec: None
    r.clock.advance(2)
    r.tick()
    assert r.prober.timeouts[-1] == pytest.approx(1.0)


class _FrozenProber(FakeProber):
    """decode-0's probe waits out its timeout on the clock (a stopped API server)."""

    def __init__(self, clock: FakeClock) -> None:
        super().__init__()
        self.clock = clock
        self.started: list[tuple[str, float]] = []

    async def healthy(self, spec: WorkerSpec, timeout_s: float | None = None) -> bool:
        self.started.append((spec.id, self.clock.now()))
        if spec.id == "decode-0":
            await asyncio.sleep(0)
            return False
        return await super().healthy(spec, timeout_s)


def test_ready_workers_are_probed_together(tmp_path: Path) -> None:
    r = Rig(tmp_path)
    r.ready("decode-0")
    r.ready("prefill-0")
    prober = _FrozenProber(r.clock)
    prober.health = {"prefill-0": True}
    r.sup.prober = prober
    r.clock.advance(2)
    r.tick()
    assert sorted(i for i, _ in prober.started) == ["decode-0", "prefill-0"]
    assert r.sup.workers["prefill-0"].missed_probes == 0
    assert r.sup.workers["decode-0"].missed_probes == 1


class _SlowWarmProber(FakeProber):
    """decode-0's warm-up (with its calibration) takes a while on the event loop."""

    def __init__(self) -> None:
        super().__init__()
        self.release = asyncio.Event()

    async def warm_up(self, spec: WorkerSpec) -> bool:
        if spec.id == "decode-0":
            await self.release.wait()
        return await super().warm_up(spec)


def test_a_warm_up_does_not_hold_up_the_watch_of_the_others(tmp_path: Path) -> None:
    """While decode-0 warms up, prefill-0's crash is seen and its restart begins."""
    r = Rig(tmp_path)
    r.ready("prefill-0")
    prober = _SlowWarmProber()
    prober.health = {"prefill-0": True, "decode-0": True}
    r.sup.prober = prober

    async def main() -> None:
        d = r.sup.add(spec("decode-0", 9002))
        await r.sup.tick()
        assert d.state == "warming"
        r.launcher.last("prefill-0").exit(-signal.SIGKILL)
        r.clock.advance(0.5)
        await r.sup.tick()  # not held up by decode-0's warm-up
        assert r.sup.workers["prefill-0"].state == "restarting" and d.state == "warming"
        r.clock.advance(1)
        await r.sup.tick()
        assert r.launcher.count("prefill-0") == 2
        prober.release.set()
        await r.sup.tick()
        assert d.state == "ready"
        await r.sup.stop_all()

    asyncio.run(main())


def test_a_worker_stopped_while_it_warms_up_drops_its_start_check(rig: Rig) -> None:
    prober = _SlowWarmProber()
    prober.health = {"decode-0": True}
    rig.sup.prober = prober

    async def main() -> None:
        w = rig.sup.add(spec())
        await rig.sup.tick()
        assert w.state == "warming" and "decode-0" in rig.sup._starts
        task = rig.sup._starts["decode-0"]
        await rig.sup.stop_all()
        await asyncio.sleep(0)
        assert task.cancelled() and rig.sup._starts == {} and w.state == "stopped"

    asyncio.run(main())


def test_a_worker_that_dies_while_it_warms_up_drops_its_start_check(rig: Rig) -> None:
    prober = _SlowWarmProber()
    prober.health = {"decode-0": True}
    rig.sup.prober = prober

    async def main() -> None:
        w = rig.sup.add(spec())
        await rig.sup.tick()
        task = rig.sup._starts["decode-0"]
        rig.launcher.last("decode-0").exit(-signal.SIGKILL)
        await rig.sup.tick()
        await asyncio.sleep(0)
        assert task.cancelled() and w.state == "restarting"
        rig.clock.advance(1)
        await rig.sup.tick()  # the new process gets a start check of its own
        assert rig.launcher.count("decode-0") == 2
        await rig.sup.tick()
        assert rig.sup._starts["decode-0"] is not task
        await rig.sup.stop_all()

    asyncio.run(main())


class _BrokenProber(FakeProber):
    async def warm_up(self, spec: WorkerSpec) -> bool:
        raise RuntimeError("calibration blew up")


def test_a_start_check_that_raises_is_an_event_and_is_tried_again(rig: Rig) -> None:
    rig.sup.prober = _BrokenProber()
    rig.sup.prober.health["decode-0"] = True  # type: ignore[attr-defined]
    w = rig.sup.add(spec())
    rig.tick()
    rig.tick()
    assert any("start check failed: RuntimeError('calibration blew up')" in e
               for e in rig.events)
    assert w.state == "warming" and rig.sup.fatal is None


# ------------------------------------------------------------------- stopping


def test_stop_all_escalates_to_sigkill_after_the_grace(tmp_path: Path) -> None:
    r = Rig(tmp_path, stop_grace_s=10.0)
    r.launcher.term_delay = None  # ignores SIGTERM
    a, b = r.ready("prefill-0"), r.ready("decode-0")
    pa, pb = r.launcher.last("prefill-0"), r.launcher.last("decode-0")
    asyncio.run(r.sup.stop_all())
    assert pa.signals == [signal.SIGTERM, signal.SIGKILL]
    assert pb.signals == [signal.SIGTERM, signal.SIGKILL]
    assert 10.0 <= r.clock.now() < 10.2
    assert a.state == b.state == "stopped"
    assert r.sup.pgids() == []


def test_stop_all_does_not_wait_when_workers_exit(tmp_path: Path) -> None:
    r = Rig(tmp_path, stop_grace_s=10.0)
    r.launcher.term_delay = 0.25
    r.ready("prefill-0")
    r.ready("decode-0")
    asyncio.run(r.sup.stop_all())
    assert r.clock.now() == pytest.approx(0.3)
    # The group is killed even though its leader left: vLLM's children may remain.
    for _, p in r.launcher.procs:
        assert p.signals == [signal.SIGTERM, signal.SIGKILL]


def test_stop_all_returns_once_the_whole_group_is_gone(tmp_path: Path) -> None:
    r = Rig(tmp_path, stop_grace_s=10.0)
    w = r.ready()
    proc = r.launcher.last("decode-0")
    proc.linger = 0.5
    asyncio.run(r.sup.stop_all())
    assert 0.5 <= r.clock.now() < 0.7
    assert not proc.group_alive() and w.proc is None


class _SlowChildren(FakeProc):
    """The leader leaves at once on SIGTERM; its children take `children_s` longer,
    as vLLM's engine core does once its API server has gone."""

    children_s = 1.0

    def group_alive(self) -> bool:
        if self.poll() is None:
            return True
        if self.killed_at is not None:
            return False
        assert self.exit_at is not None
        return self.clock.now() < self.exit_at + self.children_s


def test_stop_all_gives_the_whole_group_its_grace(tmp_path: Path) -> None:
    """No SIGKILL while the engine core still stops cleanly after its main process left."""
    r = Rig(tmp_path, stop_grace_s=10.0)
    w = r.ready()
    slow = _SlowChildren(w.pid or 0, r.clock, term_delay=0.0)
    w.proc = slow
    asyncio.run(r.sup.stop_all())
    assert slow.killed_at is not None and slow.killed_at >= 1.0
    assert r.clock.now() < 1.2


def test_stop_all_after_stop_all_and_a_worker_waiting_to_restart(rig: Rig) -> None:
    w = rig.ready()
    rig.launcher.last("decode-0").exit(1)
    rig.tick()
    assert w.state == "restarting"
    asyncio.run(rig.sup.stop_all())
    asyncio.run(rig.sup.stop_all())
    assert w.state == "stopped"
    rig.clock.advance(5)
    rig.tick()
    assert rig.launcher.count("decode-0") == 1


def test_a_drained_worker_that_exits_is_stopped(rig: Rig) -> None:
    w = rig.ready()
    rig.sup.begin_drain("decode-0")
    assert w.state == "draining"
    rig.launcher.last("decode-0").exit(0)
    rig.tick()
    assert w.state == "stopped" and w.restarts == 0
    rig.clock.advance(60)
    rig.tick()
    assert rig.launcher.count("decode-0") == 1


def test_finish_drain_stops_and_forgets(rig: Rig) -> None:
    rig.ready()
    rig.sup.begin_drain("decode-0")
    asyncio.run(rig.sup.finish_drain("decode-0"))
    assert "decode-0" not in rig.sup.workers
    assert rig.launcher.last("decode-0").signals == [signal.SIGTERM, signal.SIGKILL]
    assert rig.states[-1] == ("decode-0", "stopped")


def test_restart_on_request(rig: Rig) -> None:
    w = rig.ready()
    old = rig.launcher.last("decode-0")
    asyncio.run(rig.sup.restart("decode-0"))
    assert old.signals == [signal.SIGTERM, signal.SIGKILL]
    assert w.state == "restarting" and w.restarts == 1
    rig.tick()
    assert rig.launcher.count("decode-0") == 2 and w.state == "starting"


def test_a_tick_during_a_restart_does_not_take_the_stop_for_a_crash(rig: Rig) -> None:
    """The supervise loop keeps ticking while restart() waits for SIGTERM to work."""
    w = rig.ready()
    rig.launcher.term_delay = None
    old = rig.launcher.last("decode-0")
    old.term_delay = 0.3
    rig.clock.on_sleep = rig.sup.tick
    asyncio.run(rig.sup.restart("decode-0"))
    assert w.restarts == 1
    assert old.signals == [signal.SIGTERM, signal.SIGKILL]
    assert not any("exited with code" in e for e in rig.events)


def test_a_tick_during_finish_drain(rig: Rig) -> None:
    rig.ready()
    rig.launcher.last("decode-0").term_delay = 0.3
    rig.sup.begin_drain("decode-0")
    rig.clock.on_sleep = rig.sup.tick
    asyncio.run(rig.sup.finish_drain("decode-0"))
    assert "decode-0" not in rig.sup.workers
    assert [s for _, s in rig.states].count("stopped") == 1


# ------------------------------------------------------------ sequential start


def test_sequential_start_spawns_one_after_another(tmp_path: Path) -> None:
    r = Rig(tmp_path, sequential_start=True)
    p = r.sup.add(spec("prefill-0", 9001))
    d = r.sup.add(spec("decode-0", 9002))
    assert [i for i, _ in r.launcher.procs] == ["prefill-0"]
    assert d.state == "starting" and d.proc is None
    r.tick()
    assert [i for i, _ in r.launcher.procs] == ["prefill-0"]
    r.prober.health["prefill-0"] = True
    r.tick()
    assert p.state == "ready"  # at the end of the tick: decode-0 starts on the next
    assert [i for i, _ in r.launcher.procs] == ["prefill-0"]
    r.tick()
    assert [i for i, _ in r.launcher.procs] == ["prefill-0", "decode-0"]
    r.prober.health["decode-0"] = True
    r.tick()
    assert d.state == "ready"


def test_sequential_restart_waits_for_the_one_starting(tmp_path: Path) -> None:
    r = Rig(tmp_path, sequential_start=True)
    r.ready("prefill-0")
    r.ready("decode-0")
    r.launcher.last("prefill-0").exit(1)
    r.launcher.last("decode-0").exit(1)
    r.tick()
    r.clock.advance(1)
    r.tick()
    assert r.launcher.count("prefill-0") == 2 and r.launcher.count("decode-0") == 1
    r.tick()  # prefill-0 answers and is ready at the end of this tick
    assert r.sup.workers["prefill-0"].state == "ready" and r.launcher.count("decode-0") == 1
    r.tick()  # then decode-0 may start
    assert r.launcher.count("decode-0") == 2


# --------------------------------------------------------- real process groups


def _real_spec(argv: list[str]) -> WorkerSpec:
    return WorkerSpec(id="decode-0", role="decode", index=0, argv=argv,
                      env={"PATH": os.environ.get("PATH", "/usr/bin:/bin")},
                      ports=WorkerPorts(http=1))


def test_popen_launcher_starts_its_own_group_and_logs_privately(tmp_path: Path) -> None:
    log = tmp_path / "decode-0.log"
    proc = PopenLauncher().spawn(
        _real_spec([sys.executable, "-c", "print('hello', flush=True); import time; "
                    "time.sleep(30)"]), log)
    try:
        assert os.getpgid(proc.pid) == proc.pid
        assert os.getpgid(proc.pid) != os.getpgrp()
        assert (log.stat().st_mode & 0o777) == 0o600
        deadline = time.monotonic() + 5
        while "hello" not in log.read_text() and time.monotonic() < deadline:
            time.sleep(0.02)
        assert "hello" in log.read_text()
        assert proc.poll() is None
    finally:
        proc.signal_group(signal.SIGKILL)
    deadline = time.monotonic() + 3
    while proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    assert proc.poll() == -signal.SIGKILL
    proc.signal_group(signal.SIGTERM)  # a group that is gone is no error


def _leader_and_child(w: Worker) -> tuple[int, int]:
    """The worker's main pid, and its child's pid once the main process has logged it."""
    assert w.pid is not None
    deadline = time.monotonic() + 5
    while not w.log_path.read_text().strip() and time.monotonic() < deadline:
        time.sleep(0.02)
    return w.pid, int(w.log_path.read_text().split()[0])


def test_real_crash_leaves_nothing_of_the_old_group(tmp_path: Path) -> None:
    """SIGKILL of the main process only: its child ignores SIGTERM, like vLLM's engine core.
    The supervisor ends the old group before the replacement starts."""
    script = ("import subprocess, time;"
              "c = subprocess.Popen(['python3', '-c', 'import signal, time; "
              "signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(60)']);"
              "print(c.pid, flush=True); time.sleep(60)")
    prober = FakeProber()
    sup = Supervisor(launcher=PopenLauncher(), prober=prober, clock=RealClock(),
                     log_dir=tmp_path, settings=SupervisorSettings(
                         stop_grace_s=0.5, backoff_base_s=0.1))
    w = sup.add(_real_spec([sys.executable, "-c", script]))
    leader, child = _leader_and_child(w)
    os.kill(leader, signal.SIGKILL)

    async def until_replaced() -> None:
        while w.pid in (None, leader):
            await sup.tick()
            await asyncio.sleep(0.05)

    asyncio.run(asyncio.wait_for(until_replaced(), 10))
    assert process_gone(child), "the old group's child outlived its main process"
    asyncio.run(sup.stop_all())
    subprocess.run(["true"])


def test_real_stop_reaches_children_and_stubborn_leaders(tmp_path: Path) -> None:
    """A leader that ignores SIGTERM, with a child in its group: both are gone after stop_all."""
    script = ("import signal, subprocess, sys, time; signal.signal(signal.SIGTERM, signal.SIG_IGN);"
              "c = subprocess.Popen(['sleep', '30']); print(c.pid, flush=True); time.sleep(30)")
    sup = Supervisor(launcher=PopenLauncher(), prober=FakeProber(), clock=RealClock(),
                     log_dir=tmp_path, settings=SupervisorSettings(stop_grace_s=0.5))
    w = sup.add(_real_spec([sys.executable, "-c", script]))
    leader, child = _leader_and_child(w)
    t0 = time.monotonic()
    asyncio.run(sup.stop_all())
    assert 0.4 < time.monotonic() - t0 < 3
    assert process_gone(leader) and process_gone(child)
    assert w.state == "stopped"
    subprocess.run(["true"])  # let Popen reap what it started
