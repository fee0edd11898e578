"""A worker's ports are checked again right before it starts or restarts: one
that something else took meanwhile is swapped for a fresh one, and the spec
(argv, env, URL) stays consistent with it. Fake processes, no vLLM."""

from __future__ import annotations

import asyncio
import socket
from pathlib import Path
from typing import Any, cast

from pdbox import config
from pdbox.fleet import Fleet
from pdbox.ports import PortAllocator, is_free
from pdbox.router.app import Router
from pdbox.router.backends import Registry
from pdbox.workers.supervisor import Supervisor, Worker
from tests.unit.test_supervisor import FakeClock, FakeLauncher, FakeProber


class FakeRouter:
    precise = None

    def serving_roles(self) -> tuple[str, ...]:
        return ("decode",)

    def forget_worker(self, wid: str) -> None:
        pass

    def capacity_changed(self, coming: Any = None) -> None:
        pass


def _fleet(tmp_path: Path) -> tuple[Fleet, FakeLauncher, list[str]]:
    events: list[str] = []
    registry = Registry()
    fleet = Fleet(config.load("cpu-tiny"), tmp_path, registry, cast(Router, FakeRouter()),
                  model_path="/models/m", event=lambda kind, msg: events.append(msg),
                  on_change=lambda: None)
    fleet.ports = PortAllocator(pool=range(24600, 24700))
    fleet.online = [0, 1]
    clock = FakeClock()
    launcher = FakeLauncher(clock)
    fleet.supervisor = Supervisor(launcher=launcher, prober=FakeProber(), clock=clock,
                                  log_dir=tmp_path, on_state=fleet._on_worker_state,
                                  respec=fleet._fresh_ports)
    return fleet, launcher, events


def _argv_port(w: Worker) -> int:
    return int(w.spec.argv[w.spec.argv.index("--port") + 1])


def test_a_port_taken_before_a_restart_is_swapped_for_a_fresh_one(tmp_path: Path) -> None:
    fleet, launcher, events = _fleet(tmp_path)

    async def main() -> None:
        w = fleet.add_worker("decode")
        assert fleet.supervisor is not None
        first = w.spec.ports
        assert _argv_port(w) == first.http and first.side_channel
        with socket.socket() as squatter:  # an outgoing connection would hold it the same
            squatter.bind(("127.0.0.1", first.http))
            squatter.listen()
            await fleet.supervisor.restart(w.id)
            await fleet.supervisor.tick()
        assert launcher.count(w.id) == 2
        now = w.spec.ports
        assert now.http != first.http and now.http in fleet.ports.pool
        assert now.side_channel == first.side_channel and now.kv_events == first.kv_events
        assert _argv_port(w) == now.http
        assert w.spec.env["VLLM_NIXL_SIDE_CHANNEL_PORT"] == str(first.side_channel)
        backend = fleet.registry.get(w.id)
        assert backend is not None and backend.url == f"http://127.0.0.1:{now.http}"
        assert f"{w.id}: port {first.http} -> {now.http} (something else took the old one)" \
            in events

    asyncio.run(main())


def test_free_ports_are_kept_across_a_restart(tmp_path: Path) -> None:
    fleet, launcher, events = _fleet(tmp_path)

    async def main() -> None:
        w = fleet.add_worker("prefill")
        assert fleet.supervisor is not None
        spec = w.spec
        await fleet.supervisor.restart(w.id)
        await fleet.supervisor.tick()
        assert launcher.count(w.id) == 2
        assert w.spec is spec
        assert not [e for e in events if "took the old one" in e]

    asyncio.run(main())


def test_a_side_channel_taken_before_the_first_start_is_swapped(tmp_path: Path) -> None:
    fleet, _, events = _fleet(tmp_path)
    # The allocator hands out ports in turn from its start: hold the second one.
    start = next(p for p in fleet.ports.pool
                 if all(is_free("127.0.0.1", q) for q in (p, p + 1, p + 2)))
    fleet.ports = PortAllocator(pool=fleet.ports.pool, start=start)
    real_take = fleet.ports.take

    held: list[socket.socket] = []

    def take_then_squat() -> int:
        port = real_take()
        if port == start + 1:  # the side channel: something takes it at once
            s = socket.socket()
            s.bind(("127.0.0.1", port))
            s.listen()
            held.append(s)
        return port

    fleet.ports.take = take_then_squat  # type: ignore[method-assign]

    async def main() -> None:
        w = fleet.add_worker("decode")
        side = w.spec.ports.side_channel
        assert side != start + 1 and side in fleet.ports.pool
        assert w.spec.env["VLLM_NIXL_SIDE_CHANNEL_PORT"] == str(side)
        assert any("NIXL side channel" in e for e in events)

    try:
        asyncio.run(main())
    finally:
        for s in held:
            s.close()
