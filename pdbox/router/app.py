"""The router: one OpenAI endpoint in front of the workers.

For each request: validate, admit (priority, bound, 429), tokenize, hash
blocks, match prefixes per worker, score and pick a decode worker, decide
whether remote prefill pays, run the two legs (or one), and stream the
answer back while measuring TTFT and ITL. The routing policy itself lives in
policy.py as pure code; this module is the I/O around it.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import math
import time
import uuid
from collections import deque
from dataclasses import dataclass, field
from typing import Any

import aiohttp
from aiohttp import web

from pdbox.calibration import Calibration
from pdbox.config import Profile, parse_core_set
from pdbox.router import openai_errors as oe
from pdbox.router.admission import Admission, QueueFull
from pdbox.router.backends import Backend, Registry
from pdbox.router.engine_stats import ENGINE_WINDOW_S, engine_snapshot
from pdbox.router.kv_events import render_prometheus
from pdbox.router.metrics import RouterMetrics, answer_figures
from pdbox.router.migration import MigratingStream, Migrator, Settings, stall_timeout_s
from pdbox.router.pd import PrefillFailed, decode_body, prefill_leg
from pdbox.router.policy import NoWorker, PDDecider, Picker
from pdbox.router.prefix_index import ApproxIndex, PreciseIndex, block_hashes
from pdbox.router.soft_roles import RoleMix, SoftRoles, split_shares
from pdbox.router.soft_roles import Settings as SoftSettings
from pdbox.router.sse_meter import SseMeter, wants_usage, with_usage
from pdbox.router.tokenize import template_kwargs

PATHS = {"chat": "/v1/chat/completions", "completions": "/v1/completions"}
CALIBRATION_OUTPUT_TOKENS = 64
UPSTREAM_KEEPALIVE_S = 4.0
BATCH_VLLM_PRIORITY = 10  # vLLM: lower value is served first


@dataclass
class Decision:
    request_id: str
    decode: str
    prefill: str | None
    pd: str  # remote | local | aggregated
    reason: str
    prompt_tokens: int
    matched_tokens: int
    ts: float = field(default_factory=time.time)

    def to_dict(self) -> dict[str, Any]:
        return {
            "request_id": self.request_id, "decode": self.decode, "prefill": self.prefill,
            "pd": self.pd, "reason": self.reason, "prompt_tokens": self.prompt_tokens,
            "matched_tokens": self.matched_tokens, "ts": self.ts,
        }


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
        self.block_size = tokenizer.block_size_for(profile.model.block_size)
        # The character fallback of attach mode counts characters, not tokens.
        self.units = float(getattr(tokenizer, "units_per_token", 1.0)) or 1.0
        self.max_model_len = profile.model.max_model_len
        self.policy = r.policy
        self.picker = Picker(r.weights, r.balance_abs, r.balance_rel)
        self.prefill_picker = Picker(r.weights, r.balance_abs, r.balance_rel)
        self.decider = PDDecider(
            min_uncached_tokens=r.pd_min_uncached_tokens,
            mode=r.pd_decider,
            ttft_slo_s=profile.slo.ttft_s,
            itl_slo_s=profile.slo.itl_s,
        )
        # Soft roles: the prefill worker also serves short requests whole while it
        # has no prefill work, and the whole box while no decode worker is ready.
        self.soft = SoftRoles(SoftSettings(
            enabled=profile.is_pd and r.soft_roles, gate_tokens=r.pd_min_uncached_tokens,
            hold_s=r.soft_roles_hold_s, max_streams=r.max_inflight_per_worker))
        self.role_mix = RoleMix()
        self.approx = ApproxIndex(r.index_blocks_per_worker)
        self.precise = PreciseIndex(self.block_size) if r.kv_events else None
        if self.precise is not None and events is not None:
            # Gaps, replays and dead KV-event streams go to the TUI's Events pane.
            self.precise.on_event = lambda message: events("kv", message)
        # An interactive request expected to wait more than half its TTFT target
        # (the other half is for prefill and the first token) is refused at once
        # rather than queued to miss it.
        self.admission = Admission(queue_bound=r.queue_bound,
                                   max_inflight=r.max_inflight_per_worker,
                                   interactive_wait_s=0.5 * profile.slo.ttft_s)
        self.metrics = RouterMetrics()
        # Streams whose worker dies or stalls continue on another (migration.py).
        self.migrator = Migrator(registry, events,
                                 Settings(stall_s=stall_timeout_s(profile.slo.itl_s)),
                                 roles=self.serving_roles)
        self.decisions: deque[Decision] = deque(maxlen=50)
        # Warm-up calibration per slice key (pdbox/calibration.py): measured
        # speeds that seed the decider, admission and soft roles.
        self.calibration: dict[str, Calibration] = {}
        self._xfer_seen: dict[tuple[str, ...], tuple[float, ...]] = {}
        # worker -> (sum, count) of its engine prefill time when last learnt from
        self._prefill_seen: dict[str, tuple[float, float]] = {}
        # decode worker -> remote (KV-pulling) requests open on it; and the workers that
        # had one since the decider last learnt from their engine figures
        self._kv_pulls: dict[str, int] = {}
        self._kv_pulled: set[str] = set()
        self._pulled_before: dict[str, bool] = {}
        # request id -> (worker, prompt block hashes, sent at): KV events due once prefilled
        self._awaiting_events: dict[str, tuple[str, list[int], float]] = {}
        self.events = events
        self.session: aiohttp.ClientSession | None = None
        self._upstream_timeout = aiohttp.ClientTimeout(total=r.request_timeout_s, sock_connect=5)
        self.accepting = True
        self.started = time.monotonic()

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
        )

    async def close(self) -> None:
        if self.session is not None:
            await self.session.close()

    def capacity_changed(self, coming_ready_at: list[float] | None = None) -> None:
        """Admission capacity follows the number of workers that can serve.

        `coming_ready_at`: when each worker that is starting is expected to be
        ready (monotonic seconds); admission counts it as capacity on its way.
        """
        per = self.profile.router.max_inflight_per_worker
        n = max(1, len(self.registry.of_roles(self.serving_roles())))
        self.admission.max_inflight = n * per
        if coming_ready_at is not None:
            self.admission.capacity_coming([(t, per) for t in coming_ready_at])
        self.admission._dispatch()  # let waiters in if capacity grew

    def serving_roles(self) -> tuple[str, ...]:
        """Roles that may serve a request end to end: soft roles add prefill workers."""
        base = self.registry.decode_roles()
        return (*base, "prefill") if self.soft.enabled else base

    def forget_worker(self, wid: str) -> None:
        self.soft.forget_worker(wid)
        self.approx.remove_worker(wid)
        if self.precise is not None:
            self.precise.remove_worker(wid)
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

    # ------------------------------------------------------------- request

    def _prompts(self, body: dict[str, Any], kind: str) -> list[tuple[Any, int]]:
        """Each prompt of the request as (ids, tokens), as vLLM would see it.

        A completions `prompt` may be a string, a list of strings, a list of
        token ids or a list of such lists; vLLM serves each prompt of a list as
        its own request, so each has the whole context to itself. Token ids
        given by the client are tokens even where the router hashes characters.
        """
        if kind == "chat":
            ids = self.tokenizer.encode_chat(body["messages"], **template_kwargs(body))
            return [(ids, int(len(ids) / self.units))]
        p = body["prompt"]
        items = [p] if isinstance(p, str) or (p and isinstance(p[0], int)) else p
        out: list[tuple[Any, int]] = []
        for item in items:
            if isinstance(item, str):
                ids = self.tokenizer.encode_prompt(item)
                out.append((ids, int(len(ids) / self.units)))
            else:
                out.append((list(item), len(item)))
        return out

    def _priority(self, request: web.Request, body: dict[str, Any]) -> str:
        h = request.headers.get("x-pdbox-priority", "").strip().lower()
        p = body.get("priority")
        if h == "batch" or p == "batch" or (isinstance(p, int) and not isinstance(p, bool) and p > 0):
            return "batch"
        if h not in ("", "interactive", "batch"):
            raise oe.BadRequest(400, "x-pdbox-priority must be 'interactive' or 'batch'.")
        return "interactive"

    async def _serve(self, request: web.Request, kind: str) -> web.StreamResponse:
        t0 = time.monotonic()
        if not self.accepting:
            self.metrics.requests.inc(outcome="unavailable")
            return oe.error_response(503, "pdbox is shutting down.", "service_unavailable",
                                     headers={"Retry-After": "5"})
        try:
            body = await oe.read_json(request, self.profile.router.max_body_bytes)
            max_tokens = oe.validate(body, kind, self.max_model_len)
            if body["model"] not in self.served_names:
                raise oe.BadRequest(404, f"The model `{body['model']}` does not exist; "
                                    f"this server serves {', '.join(self.served_names)}.",
                                    param="model", code="model_not_found")
            priority = self._priority(request, body)
            try:
                prompts = self._prompts(body, kind)
            except Exception as exc:  # a template error is the client's input, not a crash
                raise oe.BadRequest(400, f"Could not tokenize the request: {exc}.") from None
            for i, (_, n_prompt) in enumerate(prompts):
                if n_prompt >= self.max_model_len or \
                        n_prompt + (max_tokens or 0) > self.max_model_len:
                    which = f"prompt {i} has" if len(prompts) > 1 else "prompt has"
                    raise oe.BadRequest(
                        400, f"The {which} {n_prompt} tokens; with max_tokens "
                        f"{max_tokens or 0} it exceeds this model's context of "
                        f"{self.max_model_len}.",
                        param="messages" if kind == "chat" else "prompt")
            # Routing follows the first prompt (a batch usually shares its prefix);
            # admission weighs them all.
            tokens = prompts[0][0]
            est_tokens = sum(len(ids) for ids, _ in prompts)
        except oe.BadRequest as exc:
            self.metrics.requests.inc(outcome="bad_request")
            return oe.from_exc(exc)

        # Our own priority field is not vLLM's; pass vLLM an integer only
        # where the profile turned priority scheduling on.
        if isinstance(body.get("priority"), str):
            body.pop("priority")
        if self.profile.router.priority_scheduling:
            body["priority"] = BATCH_VLLM_PRIORITY if priority == "batch" else 0
        else:
            body.pop("priority", None)

        key = object()  # the autoscaler's mean wait reads the oldest waiter's age
        self.metrics.waiting_since[key] = time.monotonic()
        try:
            ticket = await self.admission.acquire(priority, est_tokens,
                                                  retried=_retried(request))
        except QueueFull as exc:
            self.metrics.rejected.inc()
            self.metrics.requests.inc(outcome="rejected")
            # Both forms: retry-after-ms keeps the spread of return times that
            # admission planned; Retry-After is the standard, in whole seconds.
            return oe.error_response(
                429, "pdbox is saturated; retry later.", "rate_limit_exceeded",
                headers={"Retry-After": str(max(1, math.ceil(exc.retry_after_s))),
                         "retry-after-ms": str(max(1, round(exc.retry_after_s * 1000)))})
        finally:
            self.metrics.waiting_since.pop(key, None)
        self.metrics.admission_wait.observe(ticket.waited_s, time.monotonic())
        try:
            return await self._route(request, body, kind, tokens, t0)
        finally:
            self.admission.release(ticket)

    async def _route(self, request: web.Request, body: dict[str, Any], kind: str,
                     tokens: list[int], t0: float) -> web.StreamResponse:
        request_id = request.headers.get("X-Request-Id") or f"pdbox-{uuid.uuid4().hex}"
        session_key = request.headers.get("x-session-id") or (
            body.get("user") if isinstance(body.get("user"), str) else None)
        hashes = block_hashes(tokens, self.block_size)
        self._size_index()
        excluded: set[str] = set()
        attempt = 0
        while True:
            attempt += 1
            cands = [b for b in self.registry.of_roles(self.serving_roles())
                     if b.id not in excluded]
            matches = self._match([b.id for b in cands], hashes)
            cands, soft_note = self._soft_candidates(cands, matches, len(tokens), request)
            if not cands:
                self.metrics.requests.inc(outcome="unavailable")
                return oe.error_response(503, "No worker is ready to serve this request.",
                                         "service_unavailable", headers={"Retry-After": "5"})
            try:
                pick = self.picker.pick([b.view() for b in cands], matches, len(hashes),
                                        self.policy, session_key)
            except NoWorker as exc:
                return oe.error_response(503, str(exc), "service_unavailable")
            if self.soft.enabled:
                pick = self.soft.prefer_home(pick, {b.id: b.role for b in cands})
            decode = self.registry.get(pick.worker_id)
            assert decode is not None
            matched_tokens = int(min(len(tokens), matches.get(decode.id, 0) * self.block_size)
                                 / self.units)
            pick_reason = pick.reason
            if decode.role == "prefill":
                pick_reason = f"whole on {decode.id} (soft role): {soft_note}; {pick.reason}"
            result = await self._run(request, body, kind, tokens, hashes, decode, matched_tokens,
                                     request_id, pick_reason, t0,
                                     last_try=attempt >= 2 or len(cands) == 1,
                                     soft_note=soft_note)
            if result is not None:
                return result
            # Failed before the first byte: once more on another worker.
            excluded.add(decode.id)
            self.metrics.retries.inc()

    def _soft_candidates(self, cands: list[Backend], matches: dict[str, int],
                         n_tokens: int, request: web.Request) -> tuple[list[Backend], str]:
        """Prefill workers stay candidates only where soft roles let them serve whole
        (always while no decode worker is; never when the client forces a P/D path)."""
        pre = [b for b in cands if b.role == "prefill"]
        if not pre:
            return cands, ""
        n_dec = len(cands) - len(pre)
        if n_dec and request.headers.get("x-pdbox-pd", "").strip().lower() not in ("", "auto"):
            return [b for b in cands if b.role != "prefill"], ""
        prompt = int(n_tokens / self.units)
        uncached = {b.id: prompt - int(min(n_tokens, matches.get(b.id, 0) * self.block_size)
                                       / self.units) for b in pre}
        ok, note = self.soft.eligible([b.view() for b in pre], uncached, n_dec,
                                      time.monotonic())
        return [b for b in cands if b.role != "prefill" or b.id in ok], note

    def seed_calibration(self, role: str, cal: Calibration, key: str = "") -> None:
        """Seed what the router learns about a role's slice from measured speeds."""
        self.calibration[key or self._slice_key(role)] = cal
        self.decider.seed(self._slice_key(role), cal.prefill_tps, cal.step_at(1))
        slots = self.admission.max_inflight
        # A slot is held for a request's prefill and its tokens: a gate-sized
        # prompt and CALIBRATION_OUTPUT_TOKENS at a full worker's step, until
        # released requests teach the mean.
        self.admission.seed_hold(cal.request_s(self.profile.router.pd_min_uncached_tokens,
                                               CALIBRATION_OUTPUT_TOKENS, slots))
        if role == "prefill" and self.soft.settings.enabled:
            # Whole requests on the prefill worker stop where its step would
            # pass the ITL target.
            cap = self.profile.router.max_inflight_per_worker
            self.soft.settings = dataclasses.replace(
                self.soft.settings, max_streams=cal.streams_within(self.profile.slo.itl_s, cap))

    def _slice_key(self, role: str) -> str:
        """Workers of equal hardware slices share one prefill-speed estimate."""
        try:
            rc = self.profile.role(role)
        except KeyError:
            return role
        if self.profile.hardware.device == "cuda":
            return f"sm {rc.sm_percent}%"
        return f"{len(parse_core_set(rc.core_set(0)))} core(s)" if rc.cores else "cpu"

    def _size_index(self) -> None:
        """Bound the approximate index by what a worker's KV cache really holds.

        An index larger than the cache believes in blocks long evicted; one
        smaller forgets blocks still there. Replays put the best bound at the
        cache size itself (docs/ROUTING.md).
        """
        sizes = [b.num_blocks for b in self.registry.backends.values() if b.num_blocks]
        if sizes:
            self.approx.blocks_per_worker = min(sizes)

    def _match(self, ids: list[str], hashes: list[int]) -> dict[str, int]:
        """Leading blocks each worker holds: from its KV events while their feed is
        healthy (they see evictions), else from what the router sent it."""
        m = self.approx.match_all(ids, hashes)
        if self.precise is not None:
            now = time.monotonic()
            for wid in ids:
                if self.precise.trusted(wid, now):
                    m[wid] = self.precise.match(wid, hashes)
        return m

    def _blocks_cached(self, request_id: str) -> None:
        """A request's prefill is done on a worker: if its index lacks the prompt's
        blocks, that worker's KV events about them are due (a silent feed is dead)."""
        sent = self._awaiting_events.pop(request_id, None)
        if sent is None or self.precise is None:
            return
        wid, hashes, since = sent
        feed = self.precise.feeds.get(wid)
        if feed is not None and self.precise.match(wid, hashes) < len(hashes):
            feed.expect(since, time.monotonic())

    async def _run(self, request: web.Request, body: dict[str, Any], kind: str,
                   tokens: list[int], hashes: list[int], decode: Backend, matched_tokens: int,
                   request_id: str, pick_reason: str, t0: float, last_try: bool,
                   soft_note: str = "") -> web.StreamResponse | None:
        assert self.session is not None
        path = PATHS[kind]
        kv_params = None
        prefill: Backend | None = None
        pd = "aggregated"
        reason = pick_reason
        uncached = int(len(tokens) / self.units) - matched_tokens
        batch = _prompt_count(body)
        if decode.role == "prefill":
            # Soft role: the prefill worker serves this request end to end.
            pd, prefill_id = "whole", None
        elif self.profile.is_pd and decode.role == "decode" and batch > 1:
            # kv_transfer_params name one request's blocks; a batch prefills where it decodes.
            pd, reason, prefill_id = "local", f"local: a batch of {batch} prompts", None
        elif self.profile.is_pd and decode.role == "decode":
            force = request.headers.get("x-pdbox-pd", "").strip().lower() or None
            if force not in (None, "auto", "remote", "local"):
                self.metrics.requests.inc(outcome="bad_request")
                return oe.error_response(400, "x-pdbox-pd must be 'remote', 'local' or 'auto'.",
                                         "invalid_request_error")
            prefills = self.registry.of_roles(("prefill",))
            if prefills:
                pm = self._match([b.id for b in prefills], hashes)
                pp = self.prefill_picker.pick([b.view() for b in prefills], pm, len(hashes),
                                              "prefix" if self.policy == "prefix" else self.policy)
                prefill = self.registry.get(pp.worker_id)
            for b in (decode, prefill):
                if b is not None:
                    self.decider.set_slice(b.id, self._slice_key(b.role))
            dec = self.decider.decide(uncached, prefill.view() if prefill else None,
                                      decode.view(), time.monotonic(),
                                      None if force == "auto" else force)
            if prefill is not None and force in (None, "auto"):
                dec = self.soft.weigh(dec, prefill.view(), decode.view(),
                                      uncached / self.decider.prefill_tps(prefill.id))
            reason = dec.reason + (f"; {soft_note}" if soft_note else "")
            pd = "remote" if dec.remote else "local"
            if dec.remote and prefill is not None:
                prefill.inflight += 1
                self.soft.leg_started(prefill.id)
                # The decider times the leg net of the prefills already queued there.
                leg_sent = time.monotonic()
                self.decider.prefill_sent(prefill.id, request_id, uncached, leg_sent)
                leg_ok = False
                try:
                    kv_params = await prefill_leg(self.session, prefill.url, path, body, request_id,
                                                  self.profile.router.prefill_timeout_s)
                    leg_ok = True
                    self.metrics.routed.inc(worker=prefill.id, leg="prefill")
                    self.approx.record(prefill.id, hashes)
                    self._awaiting_events[request_id] = (prefill.id, hashes, leg_sent)
                    self._blocks_cached(request_id)
                except PrefillFailed as exc:
                    self.metrics.fallbacks.inc(cause=_cause(str(exc)))
                    pd = "local"
                    reason = f"local (fallback): {exc}"
                    if self.events:
                        self.events("router", f"{request_id}: prefill on {prefill.id} failed, "
                                    f"decoding locally: {exc}")
                finally:
                    prefill.inflight -= 1
                    self.soft.leg_ended(prefill.id, time.monotonic())
                    self.decider.prefill_done(prefill.id, request_id, time.monotonic(), leg_ok)
            if pd == "local":
                # Its first token ends the prefill on the decode worker (_relay).
                self.decider.prefill_sent(decode.id, request_id, uncached, time.monotonic(),
                                          local=True)
                prefill_id = None
            else:
                prefill_id = prefill.id if prefill else None
        else:
            prefill_id = None
        self.metrics.pd.inc(path=pd)
        decision = Decision(request_id, decode.id, prefill_id, pd, reason,
                            int(len(tokens) / self.units), matched_tokens)
        headers = {
            "x-request-id": request_id,
            "x-pdbox-decode-worker": decode.id,
            "x-pdbox-pd": pd,
            "x-pdbox-pd-reason": _header_safe(reason),
        }
        if prefill_id:
            headers["x-pdbox-prefill-worker"] = prefill_id
        decode.inflight += 1
        decode.routed += 1
        if pd == "whole":
            self.soft.whole_started(decode.id)
        self._awaiting_events[request_id] = (decode.id, hashes, time.monotonic())
        if kv_params is not None:
            self._kv_pulls[decode.id] = self._kv_pulls.get(decode.id, 0) + 1
            self._kv_pulled.add(decode.id)
        try:
            return await self._decode_leg(request, body, kv_params, decode, path, headers,
                                          request_id, decision, hashes, uncached, t0, last_try)
        finally:
            decode.inflight -= 1
            if pd == "whole":
                self.soft.whole_ended(decode.id)
            # No first token seen (failed, client left): end its backlog entry unlearnt.
            self.decider.prefill_done(decode.id, request_id, time.monotonic(), ok=False)
            self._awaiting_events.pop(request_id, None)
            if kv_params is not None:
                self._kv_pulls[decode.id] -= 1

    async def _decode_leg(self, request: web.Request, body: dict[str, Any],
                          kv_params: dict[str, Any] | None, decode: Backend, path: str,
                          headers: dict[str, str], request_id: str, decision: Decision,
                          hashes: list[int], uncached: int, t0: float, last_try: bool
                          ) -> web.StreamResponse | None:
        assert self.session is not None
        stream = bool(body.get("stream"))
        # A stream's usage chunk is its exact token count: ask for it, and drop it
        # again on the way back when the client did not ask (_relay).
        strip_usage = stream and not wants_usage(body)
        sent = with_usage(body) if strip_usage else body
        leg_body = self.migrator.first_leg(sent, path)  # generated ids back for token-id prompts
        # Bytes: a str body costs aiohttp an extra payload wrapper per request.
        data = json.dumps(decode_body(leg_body, kv_params)).encode()
        session = self.session

        async def send() -> aiohttp.ClientResponse:
            return await session.post(
                f"{decode.url}{path}", data=data,
                headers={"Content-Type": "application/json", "X-Request-Id": request_id},
                timeout=self._upstream_timeout)

        try:
            try:
                upstream = await send()
            except aiohttp.ServerDisconnectedError:
                # A pooled connection the worker had just closed: one fresh try.
                upstream = await send()
        except (TimeoutError, aiohttp.ClientError) as exc:
            if not last_try:
                return None
            self.metrics.requests.inc(outcome="error")
            return oe.error_response(502, f"Worker {decode.id} failed: {exc}.", "upstream_error",
                                     headers=headers)
        async with upstream:
            if upstream.status >= 500 and not last_try:
                await upstream.read()
                return None
            self.decisions.append(decision)
            self.role_mix.record(decision.decode, decision.prefill, decision.pd,
                                 time.monotonic())
            self.metrics.routed.inc(worker=decode.id, leg="decode")
            self.metrics.prompt_tokens.inc(decision.prompt_tokens)
            self.metrics.prefix_tokens.inc(decision.matched_tokens)
            self.approx.record(decode.id, hashes)
            if upstream.status != 200 or not stream:
                try:
                    data = await upstream.read()
                except (TimeoutError, aiohttp.ClientError) as exc:
                    self.metrics.requests.inc(outcome="error")
                    return oe.error_response(502, f"Worker {decode.id} failed: {exc}.",
                                             "upstream_error", headers=headers)
                ok = upstream.status == 200
                self.metrics.requests.inc(outcome="ok" if ok else "upstream_error")
                if ok:
                    self._record_answer(decode, data, t0)
                    self._blocks_cached(request_id)
                return web.Response(body=data, status=upstream.status, headers=headers,
                                    content_type=upstream.content_type or "application/json")
            source = self.migrator.stream(self.session, upstream, decode, sent, path,
                                          request_id, decision.prompt_tokens,
                                          self._upstream_timeout)
            try:
                return await self._relay(request, upstream, decode, headers, decision,
                                         uncached, t0, strip_usage, source)
            finally:
                source.close()

    def _record_answer(self, decode: Backend, data: bytes, t0: float) -> None:
        """A non-streamed answer feeds the figures a stream feeds: e2e, tokens and TTFT."""
        now = time.monotonic()
        e2e = now - t0
        self.metrics.e2e.observe(e2e, now)
        try:
            answer = json.loads(data)
        except ValueError:
            return
        itl = decode.engine_itl_s(now - ENGINE_WINDOW_S)
        if itl is None:
            itl = self.metrics.itl.percentile(0.5, now - ENGINE_WINDOW_S)
        tokens, ttft, source = answer_figures(answer, e2e, itl)
        self.metrics.add_tokens(tokens, now)
        if ttft is not None:
            self._observe_ttft(ttft, now, source)

    def _observe_ttft(self, ttft: float, now: float, source: str) -> None:
        self.metrics.ttft.observe(ttft, now)
        self.metrics.ttft_source.inc(source=source)

    async def _relay(self, request: web.Request, upstream: aiohttp.ClientResponse,
                     decode: Backend, headers: dict[str, str], decision: Decision,
                     uncached: int, t0: float, strip_usage: bool = False,
                     source: MigratingStream | None = None) -> web.StreamResponse:
        """Pass an SSE stream through event by event, timing TTFT and ITL on the way.

        Tokens are counted per SSE event (sse_meter.py), never per network
        read; a read's gap since the previous one is spread over the tokens it
        carried. The usage chunk at the end makes the count exact.

        A failure reading the worker ends the stream with an error event (the
        status line went out long ago); a failure writing to the client means
        the client left, which is no worker's fault: the upstream request is
        closed so the worker aborts it, and nothing more is sent.
        """
        resp = web.StreamResponse(status=200, headers=headers)
        resp.content_type = "text/event-stream"
        resp.headers["Cache-Control"] = "no-cache"
        first: float | None = None
        last = 0.0
        meter = SseMeter(strip_usage)
        content = upstream.content if source is None else source
        try:
            await resp.prepare(request)
            while True:
                try:
                    chunk = await content.readany()
                except (TimeoutError, aiohttp.ClientError) as exc:
                    await self._stream_failed(resp, decode, exc)
                    return resp
                if not chunk:
                    break
                now = time.monotonic()
                read = meter.feed(chunk)
                if read.tokens:
                    if first is None:
                        first = now
                        self._observe_ttft(now - t0, now, "stream")
                        self.decider.prefill_done(decode.id, decision.request_id, now)
                        self._blocks_cached(decision.request_id)
                    else:
                        gap = (now - last) / read.tokens
                        self.metrics.itl.observe(gap, now, weight=read.tokens)
                        self.decider.observe_itl(decode.id, gap)
                    last = now
                    self.metrics.add_tokens(read.tokens, now)
                if read.forward:
                    await resp.write(read.forward)
            rest = meter.close()
            if rest:
                await resp.write(rest)
            await resp.write_eof()
        except (ConnectionError, aiohttp.ClientConnectionError):
            self._client_left(upstream)
            return resp
        except asyncio.CancelledError:  # the client went away (handler cancellation)
            self._client_left(upstream)
            raise
        now = time.monotonic()
        # The usage chunk's count is exact; events counted one token each may fall short.
        self.metrics.add_tokens(max(0, meter.total_tokens - meter.tokens), now)
        self.metrics.e2e.observe(now - t0, now)
        self.metrics.requests.inc(outcome="ok")
        return resp

    def _client_left(self, upstream: aiohttp.ClientResponse) -> None:
        upstream.close()  # drops the connection: vLLM aborts the request
        self.metrics.requests.inc(outcome="client_closed")

    async def _stream_failed(self, resp: web.StreamResponse, decode: Backend,
                             exc: BaseException) -> None:
        err = oe.error_body(502, f"Worker {decode.id} failed mid-stream: {exc}.",
                            "upstream_error")
        self.metrics.requests.inc(outcome="error")
        try:
            await resp.write(f"data: {json.dumps(err)}\n\ndata: [DONE]\n\n".encode())
            await resp.write_eof()
        except (ConnectionError, aiohttp.ClientError):
            pass

    # -------------------------------------------------------------- status

    def learn_transfers(self) -> None:
        """Feed the decider what the workers' engines measured since the last call.

        - vLLM counts each KV pull on the decode worker in
          vllm:nixl_xfer_time_seconds (sum and count); the difference since
          the previous call is the mean of the transfers that just happened.
        - vllm:request_prefill_time_seconds (from the engine scheduling a
          request to its first token: no queue, no HTTP) with
          vllm:request_prefill_kv_computed_tokens (prompt tokens computed,
          cache hits excluded) give each worker's own prefill speed, the
          decider's preferred teacher.
        """
        for b in self.registry.backends.values():
            self.decider.set_slice(b.id, self._slice_key(b.role))
            xfer = self._delta(b, "vllm:nixl_xfer_time_seconds_sum",
                               "vllm:nixl_xfer_time_seconds_count")
            if xfer is not None and xfer[1] > 0 and xfer[0] >= 0:
                self.decider.observe_transfer(xfer[0] / xfer[1])
            # A request whose KV was pulled counts as "computed" on the decode worker
            # (vLLM reports the prefill side's cache hits for it), with the pull as its
            # prefill time: a window that holds one is no prefill speed. NIXL's own
            # counters lag a stats tick, hence the previous call's too.
            pulled = bool(xfer and xfer[1] > 0)
            mixed = pulled or b.id in self._kv_pulled or self._pulled_before.get(b.id, False)
            self._pulled_before[b.id] = pulled
            if not self._kv_pulls.get(b.id):
                self._kv_pulled.discard(b.id)
            # Prompt tokens computed and engine prefill time of the requests
            # that finished since the last call (the same requests in both).
            tokens = self._delta(b, "vllm:request_prefill_kv_computed_tokens_sum",
                                 "vllm:request_prefill_kv_computed_tokens_count")
            seconds = b.engine.total("prefill")
            prev = self._prefill_seen.get(b.id)
            if seconds is not None:
                self._prefill_seen[b.id] = (seconds.sum, seconds.count)
            if tokens is not None and seconds is not None and prev is not None \
                    and seconds.count - prev[1] == tokens[1] > 0 and not mixed:
                self.decider.observe_engine_prefill(b.id, tokens[0], seconds.sum - prev[0],
                                                    tokens[1])

    def _delta(self, b: Backend, *names: str) -> tuple[float, ...] | None:
        """How much each named series grew since the previous call (None: first sight).

        A count that fell means the worker restarted: start again from there.
        """
        now = tuple(b.metrics.get(n) for n in names)
        if any(v is None for v in now):
            return None
        cur = tuple(float(v) for v in now if v is not None)
        prev = self._xfer_seen.get((b.id, *names))
        self._xfer_seen[(b.id, *names)] = cur
        if prev is None or any(c < p for c, p in zip(cur, prev, strict=True)):
            return None
        return tuple(c - p for c, p in zip(cur, prev, strict=True))

    def snapshot(self, window_s: float = 60.0) -> dict[str, Any]:
        now = time.monotonic()
        since = now - window_s
        m = self.metrics
        remote, local = m.pd.get(path="remote"), m.pd.get(path="local")
        xfer_ms = mbps = None
        tsum = tcnt = bsum = 0.0
        for b in self.registry.backends.values():
            tsum += b.metrics.get("vllm:nixl_xfer_time_seconds_sum", 0.0)
            tcnt += b.metrics.get("vllm:nixl_xfer_time_seconds_count", 0.0)
            bsum += b.metrics.get("vllm:nixl_bytes_transferred_sum", 0.0)
        if tcnt:
            xfer_ms = 1000 * tsum / tcnt
            mbps = (bsum / 1e6) / tsum if tsum else None
        return {
            **m.live_figures(now, since),
            "pd_remote": int(remote),
            "pd_local": int(local),
            "pd_share": remote / (remote + local) if remote + local else None,
            "fallbacks": int(m.fallbacks.total()),
            "rejected_429": int(m.rejected.total()),
            "queued": self.admission.queued,
            "nixl_xfer_ms": xfer_ms,
            "nixl_mb_per_s": mbps,
            "policy": self.policy,
            "decider": self.decider.estimates(),
            "calibration": {k: c.to_dict() for k, c in self.calibration.items()},
            "soft_roles": self.soft_roles_snapshot(now),
            "kv_events": {wid: f.snapshot() for wid, f in sorted(self.precise.feeds.items())}
            if self.precise is not None else {},
            "last_decisions": [d.to_dict() for d in list(self.decisions)[-10:]],
            "engine": engine_snapshot(self.registry.backends.values(), now),
        }

    def soft_roles_snapshot(self, now: float) -> dict[str, Any]:
        """Each worker's effective role mix over the window, and the box's split of legs."""
        mix = self.role_mix.mix(now, sorted(self.registry.backends))
        return {"enabled": self.soft.enabled, "window_s": self.role_mix.window_s,
                "role_mix": mix, "split": split_shares(mix),
                "prefilling": {b.id: self.soft.prefilling(b.id, now)
                               for b in self.registry.backends.values() if b.role == "prefill"}}


def _prompt_count(body: dict[str, Any]) -> int:
    """How many prompts a request carries (a completions prompt may be a list of them)."""
    p = body.get("prompt")
    if isinstance(p, list) and p and not isinstance(p[0], int):
        return len(p)
    return 1


def _header_safe(text: str) -> str:
    return "".join(c if 32 <= ord(c) < 127 else "?" for c in text)[:300]


def _cause(message: str) -> str:
    if "timed out" in message:
        return "timeout"
    if "unreachable" in message:
        return "unreachable"
    if "answered" in message:
        return "error"
    return "invalid"


def _retried(request: web.Request) -> bool:
    """The client says this is a retry of a request refused before (the openai and
    other Stainless-generated SDKs send their retry count with every attempt)."""
    raw = request.headers.get("x-stainless-retry-count", "").strip()
    return raw.isdigit() and int(raw) > 0
