"""The local autoscaler: metrics in, desired replicas per role out.

It is the Kubernetes HPA of one box, with Knative's panic mode:

- every period each metric recommends `ceil(current * value / target)` workers and the
  role takes the highest recommendation; a ratio within +-tolerance of 1 recommends no
  change;
- scale-up is immediate but limited to `max_scale_up_step` workers a period;
- scale-down goes only to the highest recommendation seen in the last
  `scale_down_window_s`, one worker at a time, and only once a full window of
  observations exists since start, since the last scale-up and since a pin was
  released (a short history is not read as the whole window);
- panic: when the load metrics averaged over `panic_window_s` reach `panic_threshold`
  times what the ready workers are sized for, scale up at once to the recommendation and
  never scale down until `scale_down_window_s` has passed since the last panic-level
  observation;
- every change is a `ScaleDecision` that says which metric decided it and why.

Pure logic: the clock and every measurement are arguments, nothing is read from the
machine, nothing sleeps. The supervisor executes the decisions (start, warm up, drain)
and reports workers that are starting or draining so that they are not scaled twice.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from pdbox.config import Profile, RoleConfig
from pdbox.placement import core_load, place

GIB = 1024**3
# On a GPU the memory fractions of all workers must stay below this (vLLM's
# gpu_memory_utilization is per instance; the rest is CUDA context and MPS overhead).
GPU_MEMORY_CAP = 0.95
# A TTFT above target is only a reason to add workers when requests actually wait:
# with an empty queue TTFT is prefill compute, which more workers do not shorten.
TTFT_MIN_WAIT_SHARE = 0.5


# ------------------------------------------------------------------------- inputs


@dataclass(frozen=True)
class RoleMetrics:
    """One role's measurements over the last period. None means "not measured"."""

    ready: int
    starting: int = 0  # starting or warming: capacity already on its way
    draining: int = 0  # leaving: no longer capacity
    # On the box but no capacity to count on: crash-looping (failed again before it
    # served a stable period, even while it starts again) or unresponsive.
    failing: int = 0
    waiting: float | None = None  # requests waiting for this role (router + workers)
    mean_wait_s: float | None = None
    ttft_p90_s: float | None = None
    itl_p90_s: float | None = None
    kv_usage: float | None = None  # mean over ready workers, 0..1
    utilization: float | None = None  # mean over ready workers, 0..1 (psutil or NVML)

    @property
    def committed(self) -> int:
        """Workers serving or about to serve."""
        return self.ready + self.starting

    @property
    def members(self) -> int:
        """The role's workers that are not leaving: the count a decision moves from
        (what the fleet counts), failing ones included."""
        return self.committed + self.failing


@dataclass(frozen=True)
class HardwareBudget:
    """What the box has left, measured by the caller (psutil, NVML)."""

    free_memory_bytes: int | None = None  # CPU: free RAM; ignored on a GPU
    cpu_count: int | None = None  # CPU: logical cores that exist
    max_workers_per_core: int = 2  # CPU: workers that may share one core


# ------------------------------------------------------------------------ outputs


@dataclass(frozen=True)
class ScaleDecision:
    ts: float
    role: str
    from_: int
    to: int
    metric: str  # queue, wait, ttft, itl, kv, utilization, min, max, pinned
    value: float | None
    target: float | None
    recommendation: int
    reason: str
    panic: bool = False

    def to_dict(self) -> dict[str, Any]:
        """The `autoscaler.decisions[]` item of the control API's status snapshot."""
        return {
            "ts": self.ts,
            "role": self.role,
            "from": self.from_,
            "to": self.to,
            "metric": self.metric,
            "value": self.value,
            "target": self.target,
            "recommendation": self.recommendation,
            "panic": self.panic,
            "reason": self.reason,
        }


@dataclass(frozen=True)
class BudgetCheck:
    ok: bool
    reason: str = ""

    def __bool__(self) -> bool:
        return self.ok


# ------------------------------------------------------------------------- budget


def budget_allows(
    profile: Profile,
    counts_by_role: Mapping[str, int],
    free_memory_bytes: int | None = None,
    current_by_role: Mapping[str, int] | None = None,
    cpu_count: int | None = None,
    max_workers_per_core: int = 2,
) -> BudgetCheck:
    """Would the box hold `counts_by_role` workers at once?

    GPU (MPS or time-slicing): the memory fractions of all workers must sum below 0.95.
    SM percentages are caps, not reservations: under MPS each client's active-thread
    percentage only limits that client, so the sum may exceed 100 (the workers then share
    the excess in time). Each one must lie within 1..100, which the profile guarantees.

    CPU: every added worker needs `hardware.worker_memory_gib` of free RAM, and workers
    take their role's least-loaded core sets (`pdbox.placement`); no core may carry more
    than `max_workers_per_core` workers, nor lie beyond `cpu_count`.
    """
    roles = profile.roles()
    if profile.hardware.device == "cuda":
        total = sum(roles[r].memory_fraction * n for r, n in counts_by_role.items() if r in roles)
        if total >= GPU_MEMORY_CAP:
            return BudgetCheck(
                False, f"GPU memory fractions would sum to {total:.2f} (must stay below 0.95)"
            )
        return BudgetCheck(True)

    if free_memory_bytes is not None:
        current = current_by_role or {}
        added = sum(max(0, n - current.get(r, 0)) for r, n in counts_by_role.items())
        need = added * profile.hardware.worker_memory_gib * GIB
        if need > free_memory_bytes:
            return BudgetCheck(
                False,
                f"{added} more worker(s) need {need / GIB:.1f} GiB, "
                f"{free_memory_bytes / GIB:.1f} GiB free",
            )
    # Workers are placed on their role's least-loaded core set (pdbox.placement).
    placed = place({r: roles[r].cores for r in counts_by_role if r in roles},
                   {r: n for r, n in counts_by_role.items() if r in roles})
    load = core_load(spec for sets in placed.values() for spec in sets)
    for core, n in sorted(load.items()):
        if cpu_count is not None and core >= cpu_count:
            return BudgetCheck(False, f"core {core} does not exist ({cpu_count} cores)")
        if n > max_workers_per_core:
            return BudgetCheck(
                False, f"core {core} would carry {n} workers (at most {max_workers_per_core})"
            )
    return BudgetCheck(True)


# --------------------------------------------------------------------- controller


@dataclass
class _RoleState:
    recs: deque[tuple[float, int]] = field(default_factory=deque)  # (ts, recommendation)
    load: deque[tuple[float, float]] = field(default_factory=deque)  # (ts, load ratio)
    last_panic: float | None = None
    pinned: int | None = None
    current: int = 0
    desired: int = 0
    blocked: str = ""
    # Start of the history a scale-down may rely on: the first observation, the
    # last scale-up, or the release of a pin. None: the next step starts it.
    history_from: float | None = None
    hold: str = ""


@dataclass(frozen=True)
class _Rec:
    n: int
    metric: str
    value: float | None
    target: float | None
    text: str


class Autoscaler:
    """One controller for all roles of a profile. Call `step` once a period."""

    def __init__(self, profile: Profile, max_decisions: int = 50):
        self.profile = profile
        self.cfg = profile.autoscaler
        self.roles: dict[str, RoleConfig] = profile.roles()
        self._state = {r: _RoleState() for r in self.roles}
        for r, rc in self.roles.items():
            self._state[r].current = self._state[r].desired = rc.replicas
        self.decisions: deque[ScaleDecision] = deque(maxlen=max_decisions)

    # -------------------------------------------------------------- operator

    def pin(self, role: str, n: int) -> None:
        """Hold `role` at `n` workers; the controller proposes only that count."""
        rc = self._role(role)
        if not rc.min <= n <= rc.max:
            raise ValueError(f"{role} replicas must lie within [{rc.min}, {rc.max}], not {n}")
        self._state[role].pinned = n

    def unpin(self, role: str) -> None:
        self._role(role)
        st = self._state[role]
        if st.pinned is not None:
            st.pinned = None
            st.history_from = None
            st.recs.clear()

    def pinned(self, role: str) -> int | None:
        self._role(role)
        return self._state[role].pinned

    def in_panic(self, role: str, now: float) -> bool:
        st = self._state[role]
        return st.last_panic is not None and now - st.last_panic < self.cfg.scale_down_window_s

    def _role(self, role: str) -> RoleConfig:
        if role not in self.roles:
            raise ValueError(f"unknown role {role!r}; this profile has {', '.join(self.roles)}")
        return self.roles[role]

    # ------------------------------------------------------------------ step

    def step(
        self,
        now: float,
        metrics: Mapping[str, RoleMetrics],
        budget: HardwareBudget | None = None,
    ) -> list[ScaleDecision]:
        """Decide each role's worker count for the next period.

        Returns the changes only; the supervisor starts or drains workers to reach
        `decision.to`. Roles missing from `metrics` are left alone.
        """
        out: list[ScaleDecision] = []
        committed = {r: m.members for r, m in metrics.items() if r in self.roles}
        counts = dict(committed)
        for role, m in metrics.items():
            if role not in self.roles:
                continue
            d = self._step_role(now, role, m, counts, committed, budget)
            if d is not None:
                counts[role] = d.to
                self.decisions.append(d)
                out.append(d)
        return out

    def _step_role(
        self,
        now: float,
        role: str,
        m: RoleMetrics,
        counts: dict[str, int],
        committed: dict[str, int],
        budget: HardwareBudget | None,
    ) -> ScaleDecision | None:
        rc, st, cfg = self.roles[role], self._state[role], self.cfg
        # Decisions count every worker the fleet has; recommendations count
        # capacity, so failing workers are added on top of what the load asks.
        cur = m.members
        st.current = cur
        st.blocked = ""
        st.hold = ""

        def decide(to: int, rec: _Rec, panic: bool = False) -> ScaleDecision | None:
            st.desired = to
            if to == cur:
                return None
            text = f"{role} {cur}→{to}: {rec.text}"
            return ScaleDecision(
                now, role, cur, to, rec.metric, rec.value, rec.target, rec.n, text, panic
            )

        if st.pinned is not None:
            return decide(st.pinned, _Rec(st.pinned, "pinned", None, None, "pinned by operator"))
        if st.history_from is None:
            st.history_from = now

        rec = self._recommend(role, m, m.committed)
        if m.failing:
            rec = _Rec(rec.n + m.failing, rec.metric, rec.value, rec.target,
                       f"{rec.text}; {m.failing} failing worker(s) not counted as capacity")
        # Panic: the short window's load against what the ready workers are sized for.
        while st.load and st.load[0][0] <= now - cfg.panic_window_s:
            st.load.popleft()
        st.load.append((now, _load_ratio(m, cfg)))
        panic_load = sum(x for _, x in st.load) / len(st.load)
        if panic_load >= cfg.panic_threshold:
            st.last_panic = now
        panic = self.in_panic(role, now)

        # Stabilization window for scale-down: remember every recommendation.
        while st.recs and st.recs[0][0] <= now - cfg.scale_down_window_s:
            st.recs.popleft()
        st.recs.append((now, rec.n))

        if cur < rc.min:
            return decide(
                rc.min, _Rec(rc.min, "min", float(cur), float(rc.min), f"below min {rc.min}")
            )
        if cur > rc.max:
            return decide(
                cur - 1, _Rec(rc.max, "max", float(cur), float(rc.max), f"above max {rc.max}")
            )

        want = max(rc.min, min(rc.max, rec.n))
        if want > cur:
            to = want if panic else min(want, cur + cfg.max_scale_up_step)
            to = self._fit(role, to, cur, counts, committed, budget)
            if to <= cur:
                st.desired = cur
                return None
            if panic:
                rec = _Rec(rec.n, rec.metric, rec.value, rec.target, f"panic, {rec.text}")
            # The history before a scale-up says nothing about the new size.
            st.history_from = now
            st.recs.clear()
            st.recs.append((now, rec.n))
            return decide(to, rec, panic)
        if panic or m.starting or m.draining:
            # No scale-down in panic, nor while the last change is still in flight.
            st.desired = cur
            return None
        stable = max(n for _, n in st.recs)
        stable = max(rc.min, min(rc.max, stable))
        seen = now - st.history_from
        if stable < cur and seen < cfg.scale_down_window_s:
            # HPA's stabilization window needs a full window of history.
            st.hold = (f"scale-down to {stable} waits for a full {cfg.scale_down_window_s:g} s "
                       f"of history ({seen:.0f} s so far)")
            st.desired = cur
            return None
        if stable < cur:
            window = f"{cfg.scale_down_window_s:g} s"
            text = f"highest recommendation in the last {window} is {stable}; {rec.text}"
            return decide(cur - 1, _Rec(stable, rec.metric, rec.value, rec.target, text))
        st.desired = cur
        return None

    def _fit(
        self,
        role: str,
        to: int,
        cur: int,
        counts: dict[str, int],
        committed: dict[str, int],
        budget: HardwareBudget | None,
    ) -> int:
        """The largest count in (cur, to] that the hardware budget holds."""
        st = self._state[role]
        b = budget or HardwareBudget()
        while to > cur:
            check = budget_allows(
                self.profile,
                {**counts, role: to},
                free_memory_bytes=b.free_memory_bytes,
                current_by_role=committed,
                cpu_count=b.cpu_count,
                max_workers_per_core=b.max_workers_per_core,
            )
            if check:
                return to
            st.blocked = check.reason
            to -= 1
        return cur

    def _recommend(self, role: str, m: RoleMetrics, cur: int) -> _Rec:
        """HPA: each metric recommends ceil(ready * value / target); the highest wins."""
        cfg, slo = self.cfg, self.profile.slo
        base = m.ready if m.ready > 0 else cur
        recs: list[_Rec] = []

        def ratio_rec(metric: str, value: float | None, target: float, label: str) -> None:
            if value is None or target <= 0:
                return
            ratio = value / target
            if abs(ratio - 1.0) <= cfg.tolerance:
                n = cur
            else:
                n = math.ceil(base * ratio - 1e-9)
            rel = ">" if value > target else "≤"
            recs.append(
                _Rec(n, metric, value, target, f"{label} {_num(value)} {rel} target {_num(target)}")
            )

        if m.waiting is not None:
            per = m.waiting / max(m.ready, 1)
            ratio = per / cfg.target_queue_per_worker
            if abs(ratio - 1.0) <= cfg.tolerance:
                n = cur
            else:
                # ceil(ready * per / target) = ceil(waiting / target), which also works
                # with no ready worker (scale from zero).
                n = math.ceil(m.waiting / cfg.target_queue_per_worker - 1e-9)
            rel = ">" if per > cfg.target_queue_per_worker else "≤"
            recs.append(
                _Rec(
                    n,
                    "queue",
                    per,
                    cfg.target_queue_per_worker,
                    f"queue {_num(per)} per worker {rel} target {_num(cfg.target_queue_per_worker)}",
                )
            )
        if role in ("prefill", "aggregated"):
            waits = m.mean_wait_s is None or m.mean_wait_s >= TTFT_MIN_WAIT_SHARE * slo.ttft_s
            if waits or (m.ttft_p90_s or 0.0) <= slo.ttft_s:
                ratio_rec("ttft", m.ttft_p90_s, slo.ttft_s, "TTFT p90")
        if role in ("decode", "aggregated"):
            ratio_rec("itl", m.itl_p90_s, slo.itl_s, "ITL p90")
        ratio_rec("kv", m.kv_usage, cfg.target_kv_usage, "KV use")
        ratio_rec("utilization", m.utilization, cfg.target_utilization, "utilization")

        if not recs:
            return _Rec(cur, "none", None, None, "no metrics")
        return max(recs, key=lambda r: r.n)

    # ---------------------------------------------------------------- status

    def status(self) -> dict[str, Any]:
        """The `autoscaler` object of the control API's status snapshot."""
        roles = {}
        for r, rc in self.roles.items():
            st = self._state[r]
            roles[r] = {
                "current": st.current,
                "desired": st.pinned if st.pinned is not None else st.desired,
                "min": rc.min,
                "max": rc.max,
                "pinned": st.pinned,
                "blocked": st.blocked or None,
                "hold": st.hold or None,
            }
        return {
            "enabled": self.cfg.enabled,
            "roles": roles,
            "decisions": [d.to_dict() for d in self.decisions],
        }


def _load_ratio(m: RoleMetrics, cfg: Any) -> float:
    """Demand over what the ready workers are sized for, from the load metrics only
    (queue, KV, utilization); latency is a symptom, not a load."""
    ratios = [0.0]
    if m.waiting is not None:
        ratios.append(m.waiting / (max(m.ready, 1) * cfg.target_queue_per_worker))
        if m.ready == 0 and m.waiting > 0:
            ratios.append(math.inf)
    if m.kv_usage is not None:
        ratios.append(m.kv_usage / cfg.target_kv_usage)
    if m.utilization is not None:
        ratios.append(m.utilization / cfg.target_utilization)
    return max(ratios)


def _num(x: float) -> str:
    return f"{x:.3g}" if abs(x) < 1000 else f"{x:.0f}"


# ------------------------------------------------------------------------ resplit


@dataclass(frozen=True)
class Split:
    """How the box is divided between prefill and decode. CPU: core ids per role;
    GPU with MPS: SM percentage per worker of each role."""

    prefill_cores: tuple[int, ...] = ()
    decode_cores: tuple[int, ...] = ()
    prefill_sm_percent: int = 0
    decode_sm_percent: int = 0

    def prefill_share(self) -> float:
        if self.prefill_cores or self.decode_cores:
            return len(self.prefill_cores) / (len(self.prefill_cores) + len(self.decode_cores))
        total = self.prefill_sm_percent + self.decode_sm_percent
        return self.prefill_sm_percent / total if total else 0.5


def propose_split(
    profile: Profile,
    prefill_demand: float,
    decode_demand: float,
    current: Split,
    hysteresis: float = 0.15,
    sm_step: int = 5,
    sm_floor: int = 10,
) -> Split | None:
    """A new prefill/decode split when the load ratio has moved far from the current one.

    Demands are in any common unit (e.g. utilization times the share each role holds);
    only their ratio matters. Returns None unless `autoscaler.resplit` is on, the profile
    is P/D, and the wanted prefill share differs from the current one by more than
    `hysteresis` (so a ratio hovering near a boundary does not flap). CPU: cores move
    whole, each role keeps at least one. GPU with MPS: SM percentages in steps of
    `sm_step`, each role keeps at least `sm_floor`, the two sum to 100.
    """
    if not profile.autoscaler.resplit or not profile.is_pd:
        return None
    total = prefill_demand + decode_demand
    if total <= 0:
        return None
    want = prefill_demand / total
    if abs(want - current.prefill_share()) <= hysteresis:
        return None
    if profile.hardware.device == "cpu":
        cores = sorted(set(current.prefill_cores) | set(current.decode_cores))
        if len(cores) < 2:
            return None
        n_pre = min(len(cores) - 1, max(1, round(want * len(cores))))
        if n_pre == len(current.prefill_cores):
            return None
        return Split(prefill_cores=tuple(cores[:n_pre]), decode_cores=tuple(cores[n_pre:]))
    if profile.hardware.sharing != "mps":
        return None
    pre = int(round(want * 100 / sm_step) * sm_step)
    pre = max(sm_floor, min(100 - sm_floor, pre))
    if pre == current.prefill_sm_percent:
        return None
    return Split(prefill_sm_percent=pre, decode_sm_percent=100 - pre)
