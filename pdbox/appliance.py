"""The appliance: one pdbox process's supervisor, router, autoscaler and control API.

Everything long-running lives on one asyncio loop. The TUI (when shown) is a
client of the control API like `pdbox top`; it never reaches in here.
"""

from __future__ import annotations

import asyncio
import hmac
import os
import signal
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import psutil
from aiohttp import web

from pdbox import __version__, control_api, runstate
from pdbox.autoscaler import Autoscaler, HardwareBudget, RoleMetrics
from pdbox.config import Profile
from pdbox.fleet import Fleet
from pdbox.hardware.dtype import resolve as resolve_dtype
from pdbox.ports import check_free
from pdbox.router.app import Router
from pdbox.router.backends import Registry, scrape_loop
from pdbox.router.openai_errors import error_response
from pdbox.workers.supervisor import SupervisorError


class StartError(Exception):
    """pdbox could not start; str() is the one sentence (plus a log tail) for the user."""


@dataclass(frozen=True)
class Attach:
    role: str  # prefill | decode | aggregated
    url: str


class Appliance:
    def __init__(
        self,
        profile: Profile,
        run_dir: Path,
        *,
        host: str | None = None,
        port: int | None = None,
        attach: list[Attach] | None = None,
        api_key: str | None = None,
        on_progress: Callable[[str], None] = lambda msg: None,
        stop_grace_s: float = 30.0,
        echo_events: bool = False,
    ) -> None:
        # The dtype is settled once, here, from the profile as loaded, so the
        # reason still says whether the profile or the CPU chose it.
        self.profile, self.dtype_choice = resolve_dtype(profile)
        profile = self.profile
        self.run_dir = run_dir
        self.host = host or profile.router.host
        self.port = profile.router.port if port is None else port
        self.attach = attach or []
        self.api_key = api_key
        self.on_progress = on_progress
        self.stop_grace_s = stop_grace_s
        # Headless: worker, scale and error events also go to stderr.
        self.echo_events = echo_events
        self.started = time.monotonic()
        self.registry = Registry()
        self.events: deque[dict[str, Any]] = deque(maxlen=200)
        self._subscribers: list[asyncio.Queue[dict[str, Any]]] = []
        self._tasks: list[asyncio.Task[Any]] = []
        self._stop = asyncio.Event()
        self._stop_asked: float | None = None  # monotonic time of the stop request
        self._stopping = False
        # One line on how the stop went, for the user (set by stop()).
        self.stop_summary = ""
        self.fleet: Fleet | None = None  # managed workers (none in attach mode)
        self.router: Router | None = None
        self.autoscaler = Autoscaler(profile)
        self.model_path = ""
        self.served_names = [profile.model.served_name]
        self.gpu: Any = None
        self.cpu: Any = None
        self.fatal: str | None = None
        self.history: dict[str, deque[Any]] = {k: deque(maxlen=300) for k in
                                               ("t", "rps", "tokens_per_s", "ttft_p50_s")}
        self._log_file: Any = None
        self.endpoint = ""
        self.control_url = ""
        self._runner: web.AppRunner | None = None

    # ---------------------------------------------------------------- events

    def event(self, kind: str, message: str) -> None:
        ev = {"ts": time.time(), "kind": kind, "message": message}
        self.events.append(ev)
        if self._log_file is not None:
            self._log_file.write(time.strftime("%H:%M:%S ") + f"[{kind}] {message}\n")
            self._log_file.flush()
        if self.echo_events and kind in ("worker", "scale", "error", "router"):
            self.on_progress(message)
        for q in list(self._subscribers):
            if q.qsize() < 500:
                q.put_nowait(ev)

    def subscribe(self) -> asyncio.Queue[dict[str, Any]]:
        q: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        self._subscribers.append(q)
        return q

    def unsubscribe(self, q: asyncio.Queue[dict[str, Any]]) -> None:
        if q in self._subscribers:
            self._subscribers.remove(q)

    # ----------------------------------------------------------------- start

    async def start(self) -> None:
        try:
            token, notes = runstate.prepare(self.run_dir)
        except runstate.RunFolderError as exc:
            raise StartError(str(exc)) from None
        self.token = token
        fd = os.open(self.run_dir / "logs" / "pdbox.log", os.O_WRONLY | os.O_CREAT | os.O_APPEND,
                     0o600)
        self._log_file = os.fdopen(fd, "a")
        for n in notes:  # what a pdbox that died left, and what was ended of it
            self.on_progress(n)
            self.event("pdbox", n)
        from pdbox.ports import PortTaken

        try:
            check_free(self.host, self.port, "the OpenAI endpoint")
        except PortTaken as exc:
            raise StartError(str(exc)) from None
        self._hardware_init()
        self._announce_dtype()
        tokenizer = await self._prepare_model()
        self.router = Router(self.profile, self.registry, tokenizer, self.served_names,
                             events=self.event)
        await self.router.start()
        await self._serve_http()
        self._write_state()
        if self.attach:
            for i, a in enumerate(self.attach):
                self.registry.upsert(f"{a.role}-{i}", a.role, a.url.rstrip("/"), "ready")
            self.router.capacity_changed()
            self._tasks.append(asyncio.create_task(self._attach_health_loop()))
        else:
            await self._start_workers()
            self._tasks.append(asyncio.create_task(self._watch_fleet()))
        assert self.router.session is not None
        self._tasks.append(asyncio.create_task(scrape_loop(self.registry, self.router.session)))
        self._tasks.append(asyncio.create_task(self._history_loop()))
        if self.profile.autoscaler.enabled and not self.attach:
            self._tasks.append(asyncio.create_task(self._autoscale_loop()))
        note = self.fleet.serving_note() if self.fleet else ""
        self.event("pdbox", f"serving {self.endpoint} ({self.profile.name})"
                   + (f" ({note})" if note else ""))

    def _announce_dtype(self) -> None:
        c = self.dtype_choice
        line = f"dtype {c.dtype}" + (f" (profile: {c.requested})" if c.requested != c.dtype
                                     else "") + f": {c.reason}"
        self.on_progress(line)
        self.event("pdbox", line)
        if c.warning:
            self.on_progress(f"warning: {c.warning}")
            self.event("error", c.warning)

    def _hardware_init(self) -> None:
        from pdbox.hardware.cpu import CpuTelemetry
        from pdbox.hardware.nvml import NoGpu, default_telemetry

        self.cpu = CpuTelemetry()
        self.gpu = default_telemetry() if self.profile.hardware.device == "cuda" else NoGpu()

    async def _prepare_model(self) -> Any:
        from pdbox.router.tokenize import CharBlockTokenizer, tokenizer_for_model

        if self.attach:
            names = await self._attached_model_names()
            if names:
                self.served_names = names
            return CharBlockTokenizer()
        from pdbox.workers.model import ModelError, resolve_model

        self.on_progress(f"preparing model {self.profile.model.source}")
        loop = asyncio.get_running_loop()
        try:
            resolved = await loop.run_in_executor(
                None, lambda: resolve_model(self.profile.model.source, progress=True))
        except ModelError as exc:
            raise StartError(str(exc)) from None
        self.model_path = resolved.model_arg
        # A folder's own tokenizer; a hub model's from the local Hugging Face cache
        # once a worker has downloaded it (until then by characters, and an event
        # says so); never the network.
        return tokenizer_for_model(resolved.source, resolved.tokenizer_dir,
                                   on_event=lambda m: self.event("router", m))

    async def _attached_model_names(self) -> list[str]:
        names: list[str] = []
        async with aiohttp.ClientSession() as s:
            for a in self.attach:
                try:
                    async with s.get(f"{a.url.rstrip('/')}/v1/models",
                                     timeout=aiohttp.ClientTimeout(total=5)) as r:
                        data = await r.json(content_type=None)
                    for m in data.get("data", []):
                        if isinstance(m.get("id"), str) and m["id"] not in names:
                            names.append(m["id"])
                except (TimeoutError, aiohttp.ClientError, ValueError, AttributeError):
                    self.event("router", f"could not read models of {a.url}")
        return names

    async def _serve_http(self) -> None:
        assert self.router is not None
        app = web.Application(client_max_size=self.profile.router.max_body_bytes + 1,
                              middlewares=[self._api_key_middleware])
        self.router.add_routes(app)
        control_api.add_routes(app, self, self.token)
        self._runner = web.AppRunner(app, handler_cancellation=True, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.host, self.port, reuse_address=True)
        try:
            await site.start()
        except OSError as exc:
            raise StartError(f"cannot listen on {self.host}:{self.port}: {exc.strerror}; "
                             "choose another with --port") from None
        sockets = site._server.sockets if site._server else []  # type: ignore[union-attr]
        port = sockets[0].getsockname()[1] if sockets else self.port
        self.port = port
        shown = "127.0.0.1" if self.host in ("0.0.0.0", "") else self.host
        self.endpoint = f"http://{shown}:{port}/v1"
        self.control_url = f"http://{shown}:{port}"

    @web.middleware
    async def _api_key_middleware(self, request: web.Request, handler: Any) -> web.StreamResponse:
        if self.api_key and request.path.startswith("/v1/"):
            got = request.headers.get("Authorization", "").encode("utf-8", "surrogateescape")
            if not hmac.compare_digest(got, f"Bearer {self.api_key}".encode()):
                return error_response(401, "Invalid or missing API key.", "authentication_error")
        return await handler(request)

    def _write_state(self) -> None:
        me = psutil.Process()
        workers = []
        if self.fleet is not None and self.fleet.supervisor is not None:
            for w in self.fleet.supervisor.workers.values():
                if w.proc is None:
                    continue
                try:
                    created = psutil.Process(w.proc.pid).create_time()
                except psutil.Error:
                    created = None
                workers.append({"id": w.id, "pgid": w.proc.pid, "create_time": created,
                                "port": w.spec.ports.http})
        runstate.write_state(self.run_dir, {
            "pid": os.getpid(), "create_time": me.create_time(), "version": __version__,
            "profile": self.profile.name, "endpoint": self.endpoint,
            "control_url": self.control_url, "workers": workers,
        })

    # --------------------------------------------------------------- workers

    async def _start_workers(self) -> None:
        assert self.router is not None
        self.fleet = Fleet(self.profile, self.run_dir, self.registry, self.router,
                           model_path=self.model_path, event=self.event,
                           on_change=self._write_state, gpu=self.gpu)
        p = self.profile
        if p.hardware.device == "cuda" and p.hardware.sharing == "mps":
            from pdbox.hardware.mps import MpsError

            try:
                self.fleet.start_mps()
            except MpsError as exc:
                raise StartError(str(exc)) from None
        try:
            await self.fleet.start(self.on_progress)
        except SupervisorError as exc:
            raise StartError(str(exc)) from None

    async def _watch_fleet(self) -> None:
        """Stop pdbox when a worker keeps failing to start (the fleet says fatal)."""
        assert self.fleet is not None
        while self.fleet.fatal is None:
            await asyncio.sleep(0.5)
        self.fatal = self.fleet.fatal
        self._stop.set()

    async def _attach_health_loop(self) -> None:
        async with aiohttp.ClientSession() as s:
            while True:
                for b in list(self.registry.backends.values()):
                    try:
                        async with s.get(f"{b.url}/health",
                                         timeout=aiohttp.ClientTimeout(total=3)) as r:
                            ok = r.status == 200
                    except (TimeoutError, aiohttp.ClientError, OSError):
                        ok = False
                    new = "ready" if ok else "failed"
                    if new != b.state:
                        b.state = new
                        self.event("worker", f"{b.id} ({b.url}) {new}")
                        assert self.router is not None
                        self.router.capacity_changed()
                await asyncio.sleep(1.0)

    # --------------------------------------------------------------- scaling

    def role_workers(self, role: str) -> list[Any]:
        return self.fleet.role_workers(role) if self.fleet else []

    async def scale(self, role: str, replicas: int | None) -> dict[str, Any]:
        if role not in self.profile.roles():
            raise ValueError(f"this profile has no role {role!r}; roles: "
                             f"{', '.join(self.profile.roles())}")
        if self.attach:
            raise ValueError("workers attached with --attach cannot be scaled by pdbox")
        rc = self.profile.role(role)
        if replicas is None:
            self.autoscaler.unpin(role)
            self.event("scale", f"{role}: back to the autoscaler")
            return {"role": role, "replicas": "auto"}
        if not rc.min <= replicas <= rc.max:
            raise ValueError(f"{role} replicas must lie within [{rc.min}, {rc.max}] "
                             "(the profile's min and max)")
        self.autoscaler.pin(role, replicas)
        self.event("scale", f"{role}: pinned to {replicas} by the operator")
        assert self.fleet is not None
        await self.fleet.set_replicas(role, replicas, "operator")
        return {"role": role, "replicas": replicas}

    async def scale_split(self, spec: str | None) -> dict[str, Any]:
        """Pin the prefill/decode split (`pdbox scale split A/B`), or unpin it (None)."""
        if self.attach or self.fleet is None:
            raise ValueError("workers attached with --attach cannot be re-split by pdbox")
        return self.fleet.resplitter.pin_split(spec)

    async def _autoscale_loop(self) -> None:
        period = self.profile.autoscaler.period_s
        while True:
            await asyncio.sleep(period)
            try:
                metrics = self._role_metrics(period)
                vm = psutil.virtual_memory()
                budget = HardwareBudget(free_memory_bytes=vm.available,
                                        cpu_count=psutil.cpu_count())
                assert self.fleet is not None
                for d in self.autoscaler.step(time.monotonic(), metrics, budget):
                    self.event("scale", d.reason)
                    await self.fleet.set_replicas(d.role, d.to, d.reason)
                self.fleet.maybe_resplit(self.router.metrics.itl.percentile(
                    0.9, time.monotonic() - max(period, 10.0)) if self.router else None)
            except Exception as exc:  # noqa: BLE001 - the controller must never take pdbox down
                self.event("error", f"autoscaler step failed: {exc!r}")

    def _role_metrics(self, period: float) -> dict[str, RoleMetrics]:
        assert self.router is not None
        from pdbox.role_metrics import role_metrics

        return role_metrics(
            self.profile, now=time.monotonic(), period_s=period,
            router_metrics=self.router.metrics, admission_queued=self.router.admission.queued,
            backends=self.registry.backends,
            workers=self.fleet.workers() if self.fleet else (),
            per_core=self.cpu.per_core() if self.cpu else ())

    # ---------------------------------------------------------------- control

    def set_policy(self, policy: str) -> None:
        assert self.router is not None
        self.router.policy = policy
        self.event("policy", f"routing policy set to {policy}")

    def move_stream(self, request_id: str, to: str) -> dict[str, Any]:
        """Move a running stream to worker `to`, its KV pulled from where it runs
        (flowing decode, router/kv_move.py). KeyError: no such stream or worker;
        ValueError: it cannot move now."""
        assert self.router is not None
        m = self.router.migrator
        st = m.live.get(request_id)
        if st is None:
            raise KeyError(f"There is no open stream {request_id!r}.")
        target = self.router.registry.get(to)
        if target is None:
            raise KeyError(f"There is no worker {to!r}.")
        frm = st.worker.id
        if not st.move(target, "asked through the control API"):
            raise ValueError(f"Stream {request_id!r} cannot move to {to} now (it is on {frm}, "
                             "not started, being moved, or the worker is not ready).")
        return {"request_id": request_id, "from": frm, "to": to, "moving": True}

    async def restart_worker(self, worker_id: str) -> None:
        if self.fleet is None:
            raise KeyError(worker_id)
        await self.fleet.restart(worker_id)

    def log_tail(self, worker_id: str, lines: int) -> list[str] | None:
        if worker_id == "pdbox":
            path = self.run_dir / "logs" / "pdbox.log"
        elif self.fleet is not None and worker_id in (sup := self._managed()):
            return sup[worker_id].log_tail(lines)
        elif worker_id in self.registry.backends:
            b = self.registry.backends[worker_id]
            return [f"{worker_id} is attached ({b.url}); its log is wherever it was started."]
        else:
            return None
        try:
            return path.read_text(errors="replace").splitlines()[-lines:]
        except OSError:
            return []

    def request_shutdown(self) -> None:
        if self._stop_asked is None:
            self._stop_asked = time.monotonic()
        self._stop.set()

    def _end_stragglers(self) -> list[int]:
        """Worker processes still running once the supervisor stopped every group:
        any whose environment names this pdbox (one that left its group). They
        already had their grace with their group, so they get SIGKILL; returns
        the pids that outlive even that (stuck in the kernel)."""
        from pdbox.strays import started_by

        me = psutil.Process()
        left = [p.pid for p in started_by(me.pid, me.create_time())]
        return runstate.terminate([], left, grace_s=0.0) if left else []

    # ----------------------------------------------------------------- status

    def _managed(self) -> dict[str, Any]:
        if self.fleet is None or self.fleet.supervisor is None:
            return {}
        return self.fleet.supervisor.workers

    def status(self) -> dict[str, Any]:
        assert self.router is not None
        from pdbox.hardware.cpu import hardware_snapshot
        from pdbox.status_view import autoscaler_view, workers_view

        workers = workers_view(self.registry.backends, self._managed())
        router = self.router.snapshot()
        router["history"] = {k: list(v) for k, v in self.history.items()}
        auto = autoscaler_view(self.profile, self.autoscaler.status(), workers,
                               self.autoscaler.pinned,
                               self.profile.autoscaler.enabled and not self.attach)
        if self.fleet is not None and self.profile.is_pd:
            auto["split"] = self.fleet.resplitter.status(time.monotonic())
        mix = router.get("soft_roles", {}).get("role_mix", {})
        for w in workers:
            w["role_mix"] = mix.get(w["id"])
        mps = self.fleet.mps if self.fleet else None
        hw = hardware_snapshot(self.gpu, mps.state() if mps else None, self.cpu) \
            if self.gpu is not None else {}
        hw["dtype"] = self.dtype_choice.to_dict()
        hw["calibration"] = router.get("calibration", {})
        return {
            "version": __version__, "profile": self.profile.name,
            "mode": self.profile.mode.kind, "endpoint": self.endpoint,
            "serving": self.fleet.serving_note() if self.fleet else "",
            "tokenizer": self.router.tokenizer.state(),
            "uptime_s": time.monotonic() - self.started, "policy": self.router.policy,
            "workers": workers, "router": router, "autoscaler": auto, "hardware": hw,
            "events": list(self.events)[-50:],
        }

    async def _history_loop(self) -> None:
        assert self.router is not None
        t0 = time.monotonic()
        while True:
            self.router.learn_transfers()
            snap = self.router.snapshot(window_s=10.0)
            self.history["t"].append(round(time.monotonic() - t0, 1))
            self.history["rps"].append(snap["rps"])
            self.history["tokens_per_s"].append(snap["tokens_per_s"])
            self.history["ttft_p50_s"].append(snap["ttft_p50_s"])
            await asyncio.sleep(1.0)

    # ------------------------------------------------------------------- run

    async def run(self) -> None:
        """Serve until Ctrl-C, SIGTERM, the control API's shutdown, or a fatal error."""
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                loop.add_signal_handler(sig, self.request_shutdown)
            except (NotImplementedError, RuntimeError):
                pass  # not the main thread: the TUI stops us through the control API
        await self._stop.wait()

    async def stop(self) -> None:
        """Stop admitting (503), let in-flight requests finish, then stop every worker."""
        if self._stopping:
            return
        self._stopping = True
        t0 = self._stop_asked or time.monotonic()
        self.event("pdbox", "stopping")
        if self.router is not None:
            self.router.accepting = False
            deadline = time.monotonic() + self.stop_grace_s
            while time.monotonic() < deadline and (
                self.router.admission.inflight or self.router.admission.queued):
                await asyncio.sleep(0.1)
        drained_s = time.monotonic() - t0
        for t in self._tasks:
            t.cancel()
        for t in self._tasks:
            try:
                await t
            except (asyncio.CancelledError, Exception):  # noqa: BLE001
                pass
        if self.fleet is not None:
            await self.fleet.stop()
            left = await asyncio.get_running_loop().run_in_executor(None, self._end_stragglers)
            gone = ("all worker processes gone" if not left else
                    f"{len(left)} worker process(es) still running: {', '.join(map(str, left))}")
            self.stop_summary = f"stopped in {time.monotonic() - t0:.1f} s; {gone}"
        else:
            self.stop_summary = f"stopped in {time.monotonic() - t0:.1f} s"
        if drained_s >= 0.1:  # else the time is the workers' own stop
            self.stop_summary += f" ({drained_s:.1f} s of it for the requests in flight)"
        self.event("pdbox", self.stop_summary)
        if self._runner is not None:
            await self._runner.cleanup()
        if self.router is not None:
            await self.router.close()
        runstate.clear(self.run_dir)
        if self._log_file is not None:
            self._log_file.close()
            self._log_file = None

