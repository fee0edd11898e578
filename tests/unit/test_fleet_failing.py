"""The fleet's view of failing workers: a crash-looping one is no capacity on its way
for admission, and an unresponsive one keeps what the router believes it caches until
it is restarted. Fake processes, no vLLM."""

from __future__ import annotations

import asyncio
import signal
from pathlib import Path
from typing import Any, cast

from pdbox import config
from pdbox.fleet import Fleet
from pdbox.ports import PortAllocator
from pdbox.router.app import Router
from pdbox.router.backends import Registry
from pdbox.workers.supervisor import Supervisor
from tests.unit.test_supervisor import FakeClock, FakeLauncher, FakeProber


class FakeRouter:
    precise = None

    def __init__(self) -> None:
        self.forgotten: list[str] = []
        self.coming: list[list[float]] = []

    def serving_roles(self) -> tuple[str, ...]:
        return ("decode",)

    def forget_worker(self, wid: str) -> None:
        self.forgotten.append(wid)

    def capacity_changed(self, coming: Any = None) -> None:
        self.coming.append(list(coming or []))


def _fleet(tmp_path: Path) -> tuple[Fleet, FakeRouter, FakeLauncher, FakeProber, FakeClock]:
    router = FakeRouter()
    fleet = Fleet(config.load("cpu-tiny"), tmp_path, Registry(), cast(Router, router),
                  model_path="/models/m", event=lambda kind, msg: None, on_change=lambda: None)
    fleet.ports = PortAllocator(pool=range(24700, 24800))
    fleet.online = [0, 1]
    clock = FakeClock()
    launcher, prober = FakeLauncher(clock), FakeProber()
    fleet.supervisor = Supervisor(launcher=launcher, prober=prober, clock=clock,
                                  log_dir=tmp_path, on_state=fleet._on_worker_state,
                                  respec=fleet._fresh_ports, sweep=lambda paths: [])
    return fleet, router, launcher, prober, clock


def test_a_crash_looping_worker_is_not_coming_capacity(tmp_path: Path) -> None:
    fleet, router, launcher, prober, clock = _fleet(tmp_path)
    sup = fleet.supervisor
    assert sup is not None

    async def main() -> None:
        w = fleet.add_worker("decode")
        assert len(fleet.capacity_coming()) == 1  # a first start is on its way
        prober.health[w.id] = True
        await sup.tick()
        assert w.state == "ready"
        launcher.last(w.id).exit(-signal.SIGKILL)
        await sup.tick()
        assert w.state == "restarting" and len(fleet.capacity_coming()) == 1
        clock.t = w.next_start_at
        prober.health[w.id] = False
        await sup.tick()  # starts again, and is killed again while it starts
        launcher.last(w.id).exit(-signal.SIGKILL)
        await sup.tick()
        assert w.state == "backoff" and fleet.capacity_coming() == []
        clock.t = w.next_start_at
        await sup.tick()
        assert w.state == "starting" and fleet.capacity_coming() == []
        assert router.coming[-1] == []
        assert w.id in fleet.serving_note()

    asyncio.run(main())


def test_an_unresponsive_worker_keeps_its_cache_until_restarted(tmp_path: Path) -> None:
    fleet, router, launcher, prober, clock = _fleet(tmp_path)
    sup = fleet.supervisor
    assert sup is not None

    async def main() -> None:
        w = fleet.add_worker("decode")
        prober.health[w.id] = True
        await sup.tick()
        prober.health[w.id] = False
        await sup.tick()
        clock.advance(0.5)
        await sup.tick()
        assert w.state == "unresponsive"
        b = fleet.registry.get(w.id)
        assert b is not None and not b.routable and router.forgotten == []
        clock.advance(sup.settings.health_timeout_s)
        await sup.tick()
        assert w.state == "restarting" and router.forgotten == [w.id]

    asyncio.run(main())
