"""The router: one OpenAI endpoint in front of the workers.

One request walks these stages, top to bottom, each a module with one job
(llm-d's endpoint picker is the model: a parser, then Filter → Score → Pick,
with hooks before the request and after the answer):

1. parse     parse.py    body → a typed `Call` (validated; priority, request id,
                         session, forced P/D path), or a 4xx
2. prompt    prompt.py   tokenize, check the context, hash the blocks → `Prompt`
3. admit     admit.py    a slot in the fair queue (admission.py), or a 429
4. choose    choose.py   filter the workers, match prefixes (match.py), score and
                         pick (policy.py), choose the path: whole, aggregated, or
                         local / remote prefill (decider.py, soft_roles.py) → `Route`
5. legs      legs.py     the prefill leg, then the decode leg, with their books
6. relay     relay.py    the answer back; a stream through migration (only read
                         when its worker fails) and metering (one parse per event)
7. record    record.py   outcome, decision, TTFT, ITL, tokens

`Router` owns the shared state (indexes, decider, soft roles, admission,
metrics) and wires the stages; status.py builds its snapshot off the request
path. A request that fails before its first byte goes round 4-6 once more
on another worker.
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections import deque
from typing import Any

import aiohttp
from aiohttp import web

from pdbox.calibration import Calibration
from pdbox.config import Profile, parse_core_set
from pdbox.router import openai_errors as oe
from pdbox.router.admission import Admission
from pdbox.router.admit import AdmitStage, Refused
from pdbox.router.backends import Backend, Registry
from pdbox.router.choose import PathChooser, Reply, Route
from pdbox.router.decider import gate_tokens
from pdbox.router.flow import Balancer
from pdbox.router.flowing import FlowView
from pdbox.router.kv_events import render_prometheus
from pdbox.router.legs import Legs
from pdbox.router.match import PrefixMatch
from pdbox.router.metrics import RouterMetrics
from pdbox.router.migration import COMING_STATES, Migrator, Settings
from pdbox.router.parse import Call, RequestParser
from pdbox.router.policy import PDDecider, Picker
from pdbox.router.prefix_index import ApproxIndex, PreciseIndex
from pdbox.router.prompt import Prompt, PromptStage
from pdbox.router.record import Decision, Recorder
from pdbox.router.relay import Relay
from pdbox.router.soft_roles import RoleMix, SoftRoles
from pdbox.router.soft_roles import Settings as SoftSettings
from pdbox.router.stalls import (
    CPU_STEP_TOKENS,
    STALLED,
    UNRESPONSIVE,
    Freezes,
    Frozen,
    stall_bound_s,
)
from pdbox.router.status import RouterStatus
from pdbox.workers.vllm import extra_flag_value, gpu_batch_limits

__all__ = ["Decision", "Router"]

CALIBRATION_OUTPUT_TOKENS = 64
UPSTREAM_KEEPALIVE_S = 4.0
WORKER_WAIT_POLL_S = 0.25  # how often a request with no worker to go to looks again


class Router:
    def __init__(
        self,
        profile: Profile,
        registry: Registry,
        tokenizer: Any,
        served_names: list[str],
        events: Any = None,
    ) -> None:
        r = profile.router
        self.profile = profile
        self.registry = registry
        self.tokenizer = tokenizer
        self.served_names = served_names
        self.events = events
        self.max_model_len = profile.model.max_model_len
        self.picker = Picker(r.weights, r.balance_abs, r.balance_rel)
        self.prefill_picker = Picker(r.weights, r.balance_abs, r.balance_rel)
        self.decider = PDDecider(
            min_uncached_tokens=r.fixed_gate,
            mode=r.pd_decider,
            ttft_slo_s=profile.slo.ttft_s,
            itl_slo_s=profile.slo.itl_s,
        )
        # Soft roles: the prefill worker also serves short requests whole while it
        # has no prefill work, and the whole box while no decode worker is ready.
        self.soft = SoftRoles(SoftSettings(
            enabled=profile.is_pd and r.soft_roles, gate_tokens=r.fixed_gate,
            hold_s=r.soft_roles_hold_s, max_streams=r.max_inflight_per_worker, hybrid=r.hybrid),
            transfer_s=self.decider.transfer_s, gate=self.decider.gate)
        self.role_mix = RoleMix()
        self.prompts = PromptStage(tokenizer, profile.model.block_size, self.max_model_len)
        self.block_size = self.prompts.block_size
        self.units = self.prompts.units
        self.approx = ApproxIndex(r.index_blocks_per_worker)
        self.precise = PreciseIndex(self.block_size) if r.kv_events else None
        if self.precise is not None and events is not None:
            # Gaps, replays and dead KV-event streams go to the TUI's Events pane.
            self.precise.on_event = lambda message: events("kv", message)
        # A request is refused only when its predicted wait would keep it open
        # past the profile's limit; below that it queues, however few workers
        # are up (admission.py).
        self.admission = Admission(queue_bound=r.queue_bound,
                                   max_inflight=max(1, r.max_inflight_per_worker),
                                   wait_limit_s=r.request_timeout_s)
        self.metrics = RouterMetrics()
        # Workers taken for frozen from their streams, and the probe that brings
        # them back (stalls.py).
        self.freezes = Freezes(registry, events, on_change=self.capacity_changed,
                               probe_body={"model": served_names[0] if served_names else "",
                                           "prompt": "hi", "max_tokens": 1})
        # Streams whose worker dies or stalls continue on another (migration.py),
        # waiting for one as long as the request's limit allows.
        self.migrator = Migrator(registry, events, Settings(wait_s=r.request_timeout_s),
                                 roles=self.serving_roles, stall_s=self.stall_bound_s,
                                 freezes=self.freezes)
        # Warm-up calibration per slice key (pdbox/calibration.py): measured
        # speeds that seed the decider, admission and soft roles.
        self.calibration: dict[str, Calibration] = {}
        self._cal_by_role: dict[str, Calibration] = {}  # the same figures, by role
        self.session: aiohttp.ClientSession | None = None
        timeout = aiohttp.ClientTimeout(total=r.request_timeout_s, sock_connect=5)
        self.accepting = True
        self.started = time.monotonic()

        # The stages, in the order a request meets them.
        self.parser = RequestParser(r.max_body_bytes, self.max_model_len, served_names,
                                    r.priority_scheduling)
        self.admit = AdmitStage(self.admission, self.metrics, r.max_inflight_per_worker,
                                lambda: self.registry.of_roles(self.serving_roles()))
        self.match = PrefixMatch(registry, self.approx, self.precise)
        self.chooser = PathChooser(registry, self.match, self.prompts, self.picker,
                                   self.prefill_picker, self.decider, self.soft, profile.is_pd,
                                   self.serving_roles, self._slice_key, r.policy)
        self.legs = Legs(self.match, self.decider, self.soft, self.metrics, self.migrator,
                         r.prefill_timeout_s, timeout, events)
        self.recorder = Recorder(self.metrics, self.role_mix, self.match)
        self.relay = Relay(self.recorder, self.decider, self.match, self.migrator, timeout)
        # Flowing decode (hybrid P/D): streams move by KV to even out the workers.
        self.flow_view = FlowView(registry, self.migrator, self.decider, self._cal_by_role.get,
                                  self.serving_roles, self.max_model_len,
                                  profile.model.block_size, profile.slo.itl_s)
        self.balancer = Balancer(profile.slo.itl_s, self.flow_view.loads, self.flow_view.move,
                                 time.monotonic, self.flow_view.move_s
                                 ) if profile.is_pd and r.hybrid else None
        self._balancer_task: asyncio.Task[None] | None = None
        self.status = RouterStatus(registry, self.metrics, self.admission, self.decider,
                                   self.soft, self.role_mix, self.precise, self.recorder,
                                   self.legs, self.calibration, self._slice_key,
                                   self.migrator)

    # ------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        self.session = aiohttp.ClientSession(
            # vLLM's server (uvicorn) closes a connection idle for 5 s
            # (VLLM_HTTP_TIMEOUT_KEEP_ALIVE); aiohttp keeps one 15 s by default, and
            # a request sent on it just as the server closes it fails with "Server
            # disconnected". Closing ours first removes that race.
            connector=aiohttp.TCPConnector(limit=0, ttl_dns_cache=None,
                                           keepalive_timeout=UPSTREAM_KEEPALIVE_S),
            timeout=aiohttp.ClientTimeout(total=None),
            auto_decompress=False,
            # Workers set no cookies; the default jar would filter its (empty) store
            # for every request.
            cookie_jar=aiohttp.DummyCookieJar(),
        )
        self.legs.session = self.session
        self.freezes.session = self.session
        if self.balancer is not None:
            self._balancer_task = asyncio.create_task(self.balancer.run())

    async def close(self) -> None:
        if self._balancer_task is not None:
            self._balancer_task.cancel()
        self.freezes.close()
        if self.session is not None:
            await self.session.close()

    @property
    def policy(self) -> str:
        return self.chooser.policy

    @policy.setter
    def policy(self, value: str) -> None:
        self.chooser.policy = value

    @property
    def decisions(self) -> deque[Decision]:
        return self.recorder.decisions

    def capacity_changed(self, coming_ready_at: list[float] | None = None) -> None:
        """Admission capacity follows the workers that can serve (admit.py).

        A worker the supervisor's health probe found silent (`unresponsive`), or
        one an attach-mode health probe failed (`failed`), is frozen as one seen
        from its streams: its open legs go elsewhere now rather than wait for its
        restart or their deadline (stalls.py).
        """
        self.admit.resize(coming_ready_at)
        for b in self.registry.backends.values():
            if b.state in (UNRESPONSIVE, "failed") and self.freezes.open_legs(b.id):
                self.freezes.fail_legs(b.id)

    def serving_roles(self) -> tuple[str, ...]:
        """Roles that may serve a request end to end: soft roles add prefill workers."""
        base = self.registry.decode_roles()
        return (*base, "prefill") if self.soft.enabled else base

    def forget_worker(self, wid: str) -> None:
        self.soft.forget_worker(wid)
        self.match.forget_worker(wid)
        self.picker.forget_worker(wid)
        self.prefill_picker.forget_worker(wid)
        self.decider.forget_worker(wid)

    # --------------------------------------------------------------- routes

    def add_routes(self, app: web.Application) -> None:
        app.router.add_post("/v1/chat/completions", self.chat)
        app.router.add_post("/v1/completions", self.completions)
        app.router.add_get("/v1/models", self.models)
        app.router.add_get("/health", self.health)
        app.router.add_get("/metrics", self.prometheus)

    async def health(self, request: web.Request) -> web.Response:
        ok = bool(self.registry.of_roles(self.serving_roles())) and self.accepting
        return web.json_response({"status": "ok" if ok else "unavailable"}, status=200 if ok else 503)

    async def models(self, request: web.Request) -> web.Response:
        now = int(time.time())
        data = [{"id": n, "object": "model", "created": now, "owned_by": "pdbox",
                 "max_model_len": self.max_model_len} for n in self.served_names]
        return web.json_response({"object": "list", "data": data})

    async def prometheus(self, request: web.Request) -> web.Response:
        for b in self.registry.backends.values():
            self.metrics.inflight.set(b.inflight, worker=b.id)
            if "vllm:nixl_num_failed_transfers_total" in b.metrics:
                self.metrics.kv_xfer_failures.set(
                    b.metrics["vllm:nixl_num_failed_transfers_total"], worker=b.id)
        self.metrics.queued.set(self.admission.queued)
        kv = "\n".join(render_prometheus(self.precise.feeds)) + "\n" if self.precise else ""
        return web.Response(text=self.metrics.render() + self.migrator.render() + kv,
                            content_type="text/plain", charset="utf-8",
                            headers={"X-Content-Type-Options": "nosniff"})

    async def chat(self, request: web.Request) -> web.StreamResponse:
        return await self._serve(request, "chat")

    async def completions(self, request: web.Request) -> web.StreamResponse:
        return await self._serve(request, "completions")

    # ------------------------------------------------------- one request

    async def _serve(self, request: web.Request, kind: str) -> web.StreamResponse:
        t0 = time.monotonic()
        if not self.accepting:
            self.recorder.outcome("unavailable")
            return oe.error_response(503, "pdbox is shutting down.", "service_unavailable",
                                     headers={"Retry-After": "5"})
        try:
            call = await self.parser.parse(request, kind, t0)  # 1. parse
            prompt = self.prompts.prepare(call)  # 2. prompt
        except oe.BadRequest as exc:
            self.recorder.outcome("bad_request")
            return oe.from_exc(exc)
        self.parser.to_vllm_priority(call)
        # No request stays open past the profile's limit: every wait and leg
        # below gets what is left of it.
        deadline = call.t0 + self.profile.router.request_timeout_s
        try:
            ticket = await self.admit.acquire(call, prompt, deadline)  # 3. admit
        except Refused as refused:
            return refused.response
        try:
            return await self._route(request, call, prompt, deadline)
        finally:
            self.admit.release(ticket)

    async def _route(self, request: web.Request, call: Call,
                     prompt: Prompt, deadline: float) -> web.StreamResponse:
        self.match.size_index()
        excluded: set[str] = set()
        attempt = 0
        while True:
            attempt += 1
            try:
                route = self.chooser.choose(call, prompt, excluded, attempt)  # 4. choose
            except Reply as reply:
                if reply.outcome == "unavailable" and await self._await_worker(deadline):
                    attempt -= 1  # a worker is back: this is no retry
                    continue
                if reply.outcome:
                    self.recorder.outcome(reply.outcome)
                return reply.response
            if self.balancer is not None:
                await self._clear_first(route)  # 4b. streams leave the prefilling worker
            if route.prefill is not None:
                await self.legs.prefill(call, prompt, route, deadline)  # 5. legs: prefill
            answer = await self._decode(request, call, prompt, route, deadline)
            if answer is not None:
                return answer
            # Failed before the first byte: once more on another worker.
            excluded.add(route.decode.id)
            self.metrics.retries.inc()

    async def _clear_first(self, route: Route) -> None:
        """Flowing decode before a long prefill: the worker that will prefill this
        prompt gives streams to another first, where that pays (flow.clearing)."""
        worker = route.prefill or route.decode
        done = await self.flow_view.clear(worker.id, route.uncached, time.monotonic())
        if done is None or self.balancer is None:
            return
        to, moved, _ = done
        self.balancer.moved(worker.id, to)
        route.reason = f"{route.reason}; first moved {moved} stream(s) from {worker.id} to {to}"

    async def _await_worker(self, deadline: float) -> bool:
        """No worker can serve now: wait for one that is on its way (starting,
        restarting, backing off, unresponsive or frozen), as a moved stream does,
        until the request's deadline. True once one is ready; False at once when
        none is coming, or at the deadline (the caller answers 503), and at once
        when one is ready already (the request was refused by every one of them)."""
        waited = False
        while time.monotonic() < deadline - WORKER_WAIT_POLL_S:
            serving = self.registry.of_roles(self.serving_roles(), routable_only=False)
            if any(b.routable for b in serving):
                return waited
            if not any(b.state in COMING_STATES or b.state == STALLED for b in serving):
                return False
            waited = True
            await asyncio.sleep(WORKER_WAIT_POLL_S)
        return False

    async def _decode(self, request: web.Request, call: Call, prompt: Prompt,
                      route: Route, deadline: float) -> web.StreamResponse | None:
        """5. the decode leg, 6. relay, 7. record; None: try another worker."""
        decision = self.legs.decision(call, prompt, route)
        sent, body, strip_usage = self.legs.upstream_body(call)
        with self.legs.open(call, prompt, route):
            try:
                upstream = await self.legs.send_decode(call, route, body, deadline)
            except (TimeoutError, aiohttp.ClientError) as exc:
                if time.monotonic() >= deadline:
                    self.recorder.outcome("timeout")
                    return oe.error_response(
                        504, f"Worker {route.decode.id} did not answer within the request's "
                        f"time limit ({self.profile.router.request_timeout_s:.0f} s).",
                        "timeout", headers=route.headers)
                if not route.last_try or isinstance(exc, Frozen):
                    return None  # another worker; a frozen one is out of the rotation now
                self.recorder.outcome("error")
                return oe.error_response(502, f"Worker {route.decode.id} failed: {exc}.",
                                         "upstream_error", headers=route.headers)
            async with upstream:
                if upstream.status >= 500 and not route.last_try:
                    await upstream.read()
                    return None
                self.recorder.routed(decision, prompt.hashes)
                if upstream.status != 200 or not call.stream:
                    return await self.relay.answer(upstream, call, route, deadline)
                assert self.session is not None
                return await self.relay.stream(request, self.session, upstream, call, route,
                                               sent, strip_usage, prompt.tokens, deadline)

    # ---------------------------------------------------------- calibration

    def seed_calibration(self, role: str, cal: Calibration, key: str = "") -> None:
        """Seed what the router learns about a role's slice from measured speeds."""
        self.calibration[key or self._slice_key(role)] = cal
        self._cal_by_role[role] = cal
        self.decider.seed(self._slice_key(role), cal.prefill_tps, cal.step_at(1))
        slots = self.admission.max_inflight
        # A slot is held for a request's prefill and its tokens: a gate-sized
        # prompt and CALIBRATION_OUTPUT_TOKENS at a full worker's step, until
        # released requests teach the mean.
        slo = self.profile.slo
        gate = self.profile.router.fixed_gate
        if gate is None:
            gate = gate_tokens(cal.prefill_tps, cal.step_at(1) or 0.0, slo.itl_s)
        self.admission.seed_hold(cal.request_s(gate, CALIBRATION_OUTPUT_TOKENS, slots))
        if role == "prefill" and self.soft.settings.enabled:
            # Whole requests on the prefill worker stop where its step would
            # pass the ITL target (and at the profile's cap, or the worker's slots).
            cap = self.profile.router.max_inflight_per_worker or None
            self.soft.settings = dataclasses.replace(
                self.soft.settings, max_streams=cal.streams_within(slo.itl_s, cap))

    def stall_bound_s(self, b: Backend) -> float:
        """Silence after which `b` is taken for frozen: STEP_MARGIN longest steps
        at its slice's measured prefill speed (stalls.py)."""
        self.decider.set_slice(b.id, self._slice_key(b.role))
        return stall_bound_s(self._step_tokens(b.role), self.decider.prefill_tps(b.id),
                             self.profile.slo.itl_s)

    def _step_tokens(self, role: str) -> int:
        """The most prompt tokens a worker of `role` computes in one engine step."""
        try:
            rc = self.profile.role(role)
        except KeyError:
            return CPU_STEP_TOKENS
        if self.profile.hardware.device == "cuda":
            return gpu_batch_limits(self.profile, rc)[0]
        flag = extra_flag_value(self.profile, "--max-num-batched-tokens")
        if flag and flag.isdigit():
            return int(flag)
        return rc.max_num_batched_tokens or CPU_STEP_TOKENS

    def _slice_key(self, role: str) -> str:
        """Workers of equal hardware slices share one prefill-speed estimate."""
        try:
            rc = self.profile.role(role)
        except KeyError:
            return role
        if self.profile.hardware.device == "cuda":
            return f"sm {rc.sm_percent}%"
        return f"{len(parse_core_set(rc.core_set(0)))} core(s)" if rc.cores else "cpu"

    # --------------------------------------------------------------- status

    def _match(self, ids: list[str], hashes: list[int]) -> dict[str, float]:
        return self.match.match(ids, hashes)

    def learn_transfers(self) -> None:
        self.status.learn_transfers()

    def snapshot(self, window_s: float = 60.0) -> dict[str, Any]:
        return self.status.snapshot(self.policy, window_s)

    def soft_roles_snapshot(self, now: float) -> dict[str, Any]:
        return self.status.soft_roles(now)
