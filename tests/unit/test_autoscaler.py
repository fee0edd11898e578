"""The autoscaler controller under a fake clock and scripted metrics."""

from __future__ import annotations

import dataclasses
import random
import subprocess
import sys

import pytest

from pdbox import config
from pdbox.autoscaler import (
    GIB,
    Autoscaler,
    HardwareBudget,
    RoleMetrics,
    ScaleDecision,
    Split,
    budget_allows,
    propose_split,
)

PERIOD = 5.0


def pd_profile(decode_max: int = 4, decode_min: int = 1, **auto: object) -> config.Profile:
    p = config.load("cpu-tiny")
    decode = dataclasses.replace(
        p.decode, min=decode_min, max=decode_max, replicas=decode_min, cores=("0", "1")
    )
    return dataclasses.replace(
        p, decode=decode, autoscaler=dataclasses.replace(p.autoscaler, **auto)
    )


class Box:
    """The supervisor's side: applies decisions, new workers start for `startup` s."""

    def __init__(self, scaler: Autoscaler, role: str, ready: int, startup: float = 10.0):
        self.scaler, self.role, self.startup = scaler, role, startup
        self.ready = ready
        self.starting: list[float] = []  # ready-at times
        self.draining: list[float] = []  # gone-at times
        self.now = 0.0
        self.decisions: list[ScaleDecision] = []

    def tick(self, **m: float | None) -> list[ScaleDecision]:
        self.now += PERIOD
        done = [t for t in self.starting if t <= self.now]
        self.ready += len(done)
        self.starting = [t for t in self.starting if t > self.now]
        self.draining = [t for t in self.draining if t > self.now]
        metrics = RoleMetrics(
            ready=self.ready, starting=len(self.starting), draining=len(self.draining), **m
        )
        out = self.scaler.step(self.now, {self.role: metrics})
        for d in out:
            delta = d.to - d.from_
            if delta > 0:
                self.starting += [self.now + self.startup] * delta
            for _ in range(-delta):
                self.ready -= 1
                self.draining.append(self.now + 8.0)
        self.decisions += out
        return out

    @property
    def committed(self) -> int:
        return self.ready + len(self.starting)


def test_burst_scales_up_within_two_periods() -> None:
    # Queue 1.5x the target: above tolerance, below panic.
    box = Box(Autoscaler(pd_profile()), "decode", ready=1)
    box.tick(waiting=2.0, itl_p90_s=0.1)
    assert box.decisions == []
    first = box.tick(waiting=6.0, itl_p90_s=0.1)
    second = box.tick(waiting=6.0, itl_p90_s=0.1)
    assert first or second
    d = (first or second)[0]
    assert (d.from_, d.to, d.metric, d.panic) == (1, 2, "queue", False)
    assert d.reason == "decode 1→2: queue 6 per worker > target 4"
    assert d.value == 6.0 and d.target == 4.0 and d.recommendation == 2


def test_scale_up_step_is_limited_and_starting_workers_count() -> None:
    box = Box(
        Autoscaler(pd_profile(decode_max=4, panic_threshold=100.0)), "decode", ready=1, startup=30.0
    )
    box.tick(waiting=15.0)  # recommends 4, step 1
    assert [(d.from_, d.to) for d in box.decisions] == [(1, 2)]
    box.tick(waiting=15.0)
    # The one starting worker is counted: next step goes 2→3, not 1→2 again.
    assert [(d.from_, d.to) for d in box.decisions] == [(1, 2), (2, 3)]


def test_noisy_steady_load_makes_no_scale_event_in_30_minutes() -> None:
    rng = random.Random(7)
    box = Box(Autoscaler(pd_profile()), "decode", ready=2)
    for _ in range(int(30 * 60 / PERIOD)):
        box.tick(
            waiting=2 * 4.0 * (1 + rng.uniform(-0.09, 0.09)),
            itl_p90_s=0.25 * (1 + rng.uniform(-0.09, 0.09)),
            kv_usage=0.5 + rng.uniform(-0.1, 0.1),
            utilization=0.85 * (1 + rng.uniform(-0.09, 0.09)),
            mean_wait_s=rng.uniform(0.0, 0.5),
        )
    assert box.decisions == []
    assert box.committed == 2


def test_drop_scales_down_one_step_only_after_the_window() -> None:
    box = Box(Autoscaler(pd_profile()), "decode", ready=3)
    for _ in range(10):
        box.tick(waiting=12.0, itl_p90_s=0.2)
    assert box.decisions == []
    t_drop = box.now
    while not box.decisions:
        box.tick(waiting=0.0, itl_p90_s=0.05, kv_usage=0.05)
        assert box.now < t_drop + 400
    d = box.decisions[0]
    assert (d.from_, d.to) == (3, 2)
    assert box.now >= t_drop + 300.0
    assert "highest recommendation in the last 300 s" in d.reason
    # One at a time: nothing more while the drained worker is leaving.
    box.tick(waiting=0.0)
    assert len(box.decisions) == 1
    for _ in range(5):
        box.tick(waiting=0.0)
    assert [(d.from_, d.to) for d in box.decisions] == [(3, 2), (2, 1)]
    for _ in range(100):
        box.tick(waiting=0.0)
    assert box.committed == 1  # min


def test_no_scale_down_before_a_full_window_of_history_after_start() -> None:
    """An idle box just started: the short history is not the whole window."""
    box = Box(Autoscaler(pd_profile(decode_min=1)), "decode", ready=2)
    while box.now < 295.0:
        assert box.tick(waiting=0.0, itl_p90_s=0.01, kv_usage=0.01) == []
    hold = box.scaler.status()["roles"]["decode"]["hold"]
    assert hold is not None and "full 300 s of history" in hold
    while not box.decisions:
        box.tick(waiting=0.0, itl_p90_s=0.01, kv_usage=0.01)
    assert (box.decisions[0].from_, box.decisions[0].to) == (2, 1)
    assert box.now >= 5.0 + 300.0  # the first observation was at 5 s


def test_no_scale_down_within_a_window_after_a_scale_up() -> None:
    box = Box(Autoscaler(pd_profile(decode_min=1)), "decode", ready=1, startup=10.0)
    for _ in range(70):  # a long quiet start: the history is full
        box.tick(waiting=0.0, itl_p90_s=0.01)
    assert box.decisions == []
    box.tick(waiting=8.0, itl_p90_s=0.3)
    up = box.decisions[-1]
    assert up.to > up.from_
    t_up = box.now
    while len(box.decisions) == 1:
        box.tick(waiting=0.0, itl_p90_s=0.01)
        assert box.now < t_up + 400
    assert box.decisions[-1].to < box.decisions[-1].from_
    assert box.now >= t_up + 300.0


def test_no_scale_down_within_a_window_after_a_pin_is_released() -> None:
    scaler = Autoscaler(pd_profile(decode_max=4))
    idle = {"decode": RoleMetrics(ready=1, waiting=0.0, itl_p90_s=0.01)}
    for t in range(5, 400, 5):
        scaler.step(float(t), idle)
    scaler.pin("decode", 3)
    scaler.step(400.0, idle)
    three = {"decode": RoleMetrics(ready=3, waiting=0.0, itl_p90_s=0.01)}
    scaler.step(405.0, three)
    scaler.unpin("decode")
    t = 410.0
    while not (out := scaler.step(t, three)):
        t += 5.0
        assert t < 800
    assert (out[0].from_, out[0].to) == (3, 2)
    assert t >= 410.0 + 300.0


def test_bounds_min_and_max() -> None:
    box = Box(Autoscaler(pd_profile(decode_max=3, decode_min=2)), "decode", ready=2)
    for _ in range(200):
        box.tick(waiting=0.0, utilization=0.0)
    assert box.committed == 2 and box.decisions == []
    for _ in range(20):
        box.tick(waiting=100.0, utilization=1.0)
    assert box.committed == 3
    assert max(d.to for d in box.decisions) == 3


def test_below_min_is_raised_to_min() -> None:
    scaler = Autoscaler(pd_profile(decode_min=2))
    out = scaler.step(5.0, {"decode": RoleMetrics(ready=1)})
    assert [(d.from_, d.to, d.metric) for d in out] == [(1, 2, "min")]


def test_memory_budget_caps_scale_up() -> None:
    scaler = Autoscaler(pd_profile(decode_max=4))
    budget = HardwareBudget(free_memory_bytes=int(4.5 * GIB), cpu_count=2)
    counts = {"decode": 1}
    for i in range(30):
        m = RoleMetrics(ready=counts["decode"], waiting=40.0)
        for d in scaler.step(PERIOD * (i + 1), {"decode": m}, budget):
            counts["decode"] = d.to
        budget = HardwareBudget(
            free_memory_bytes=int((4.5 - 4 * (counts["decode"] - 1)) * GIB), cpu_count=2
        )
    assert counts["decode"] == 2  # 4.5 GiB held one more 4 GiB worker
    assert "GiB free" in scaler.status()["roles"]["decode"]["blocked"]


def test_budget_allows_cpu_rules() -> None:
    p = pd_profile(decode_max=4)  # prefill on core 0; decode on the least loaded of 0, 1
    assert budget_allows(p, {"prefill": 1, "decode": 2}, cpu_count=2)
    # Placement spreads: decode on 1, 0, 1 beside prefill on 0 is two a core.
    assert budget_allows(p, {"prefill": 1, "decode": 3}, cpu_count=2)
    # A fourth decode worker makes three on core 0.
    check = budget_allows(p, {"prefill": 1, "decode": 4}, cpu_count=2)
    assert not check and "core 0 would carry 3 workers" in check.reason
    assert budget_allows(p, {"prefill": 1, "decode": 4}, cpu_count=2, max_workers_per_core=3)
    check = budget_allows(
        p,
        {"prefill": 1, "decode": 2},
        free_memory_bytes=3 * GIB,
        current_by_role={"prefill": 1, "decode": 1},
    )
    assert not check and "need 4.0 GiB" in check.reason
    one_core = config.load("cpu-aggregated")
    check = budget_allows(one_core, {"aggregated": 2}, cpu_count=1)
    assert not check and "core 1 does not exist" in check.reason


def test_budget_allows_gpu_memory_fractions() -> None:
    p = config.load("gh200-pd")  # prefill 0.40, decode 0.25
    assert budget_allows(p, {"prefill": 1, "decode": 2})  # 0.90; SM 60+40+40 > 100 is fine
    check = budget_allows(p, {"prefill": 1, "decode": 3})  # 1.15
    assert not check and "sum to 1.15" in check.reason
    p2 = dataclasses.replace(p, decode=dataclasses.replace(p.decode, memory_fraction=0.275))
    assert not budget_allows(p2, {"prefill": 1, "decode": 2})  # 0.95 is not below 0.95


def test_panic_scales_up_at_once_and_holds() -> None:
    box = Box(Autoscaler(pd_profile(decode_max=4)), "decode", ready=1)
    out = box.tick(waiting=16.0)  # 4x the target of one worker
    assert [(d.from_, d.to, d.panic) for d in out] == [(1, 4, True)]
    assert out[0].reason.startswith("decode 1→4: panic, queue 16 per worker")
    t_panic = box.now
    # The load vanishes: no scale-down while in panic (300 s after the last panic level).
    while box.now < t_panic + 300.0 - PERIOD:
        box.tick(waiting=0.0, kv_usage=0.0)
        assert box.scaler.in_panic("decode", box.now)
    assert len(box.decisions) == 1
    for _ in range(3):
        box.tick(waiting=0.0)
    assert not box.scaler.in_panic("decode", box.now)
    assert [(d.from_, d.to) for d in box.decisions] == [(1, 4), (4, 3)]


def test_panic_level_observation_renews_panic() -> None:
    box = Box(Autoscaler(pd_profile(decode_max=2)), "decode", ready=1)
    box.tick(waiting=20.0)
    for _ in range(40):
        box.tick(waiting=0.0)
    # 2 ready, 5x now; averaged with the idle period before: 2.5x, panic again.
    box.tick(waiting=40.0)
    t = box.now
    for _ in range(50):
        box.tick(waiting=0.0)
    assert box.now - t < 300 and box.scaler.in_panic("decode", box.now)
    assert box.committed == 2


def test_pin_and_unpin() -> None:
    scaler = Autoscaler(pd_profile(decode_max=4))
    scaler.pin("decode", 3)
    out = scaler.step(5.0, {"decode": RoleMetrics(ready=1, waiting=0.0)})
    assert [(d.from_, d.to, d.metric) for d in out] == [(1, 3, "pinned")]
    assert out[0].reason == "decode 1→3: pinned by operator"
    # Pinned: heavy load changes nothing.
    assert scaler.step(10.0, {"decode": RoleMetrics(ready=3, waiting=100.0)}) == []
    st = scaler.status()["roles"]["decode"]
    assert st["pinned"] == 3 and st["desired"] == 3
    scaler.unpin("decode")
    out = scaler.step(15.0, {"decode": RoleMetrics(ready=3, waiting=100.0)})
    assert [(d.from_, d.to) for d in out] == [(3, 4)]
    with pytest.raises(ValueError, match=r"within \[1, 4\]"):
        scaler.pin("decode", 9)
    with pytest.raises(ValueError, match="unknown role"):
        scaler.pin("aggregated", 1)


def test_ttft_above_target_with_nothing_waiting_is_no_reason_to_scale() -> None:
    p = dataclasses.replace(pd_profile(), prefill=dataclasses.replace(pd_profile().prefill, max=2))
    scaler = Autoscaler(p)
    idle = RoleMetrics(ready=1, waiting=0.0, mean_wait_s=0.0, ttft_p90_s=9.0)
    assert scaler.step(5.0, {"prefill": idle}) == []
    queued = RoleMetrics(ready=1, waiting=2.0, mean_wait_s=4.0, ttft_p90_s=9.0)
    out = scaler.step(
        10.0, {"prefill": queued}, HardwareBudget(cpu_count=2, max_workers_per_core=4)
    )
    assert [(d.to, d.metric) for d in out] == [(2, "ttft")]


def test_decision_dict_matches_control_api() -> None:
    d = ScaleDecision(1.0, "decode", 1, 2, "queue", 9.1, 4.0, 3, "decode 1→2: …")
    assert {"ts", "role", "from", "to", "metric", "value", "target", "reason"} <= set(d.to_dict())
    st = Autoscaler(pd_profile()).status()
    assert st["roles"]["decode"] == {
        "current": 1,
        "desired": 1,
        "min": 1,
        "max": 4,
        "pinned": None,
        "blocked": None,
        "hold": None,
    }


def test_propose_split_cpu_with_hysteresis() -> None:
    p = pd_profile(resplit=True)
    cur = Split(prefill_cores=(0,), decode_cores=(1,))
    assert propose_split(p, 0.6, 0.4, cur) is None  # 0.6 vs 0.5: within hysteresis
    assert propose_split(p, 0.9, 0.1, cur) is None  # 2 cores: both roles keep one
    four = Split(prefill_cores=(0, 1), decode_cores=(2, 3))
    assert propose_split(p, 3.0, 1.0, four) == Split(prefill_cores=(0, 1, 2), decode_cores=(3,))
    assert propose_split(p, 0.55, 0.45, four) is None
    assert propose_split(pd_profile(resplit=False), 3.0, 1.0, four) is None


def test_propose_split_gpu_mps() -> None:
    p = config.load("gh200-pd")
    p = dataclasses.replace(p, autoscaler=dataclasses.replace(p.autoscaler, resplit=True))
    cur = Split(prefill_sm_percent=60, decode_sm_percent=40)
    assert propose_split(p, 0.65, 0.35, cur) is None
    assert propose_split(p, 0.2, 0.8, cur) == Split(prefill_sm_percent=20, decode_sm_percent=80)
    assert propose_split(p, 0.0, 1.0, cur) == Split(prefill_sm_percent=10, decode_sm_percent=90)


def test_pure_modules_import_no_heavy_packages() -> None:
    code = (
        "import sys, pdbox.autoscaler, pdbox.replay.autoscale\n"
        "bad = [m for m in ('textual', 'torch', 'vllm') if m in sys.modules]\n"
        "assert not bad, bad\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_a_failing_worker_is_not_counted_as_capacity() -> None:
    """decode-0 serves, decode-1 crash-loops: the load that two workers would carry
    asks for a third member, and the decision counts every member."""
    a = Autoscaler(pd_profile(decode_max=4, panic_threshold=100.0))
    target = a.cfg.target_queue_per_worker
    m = RoleMetrics(ready=1, starting=0, failing=1, waiting=2 * target)
    (d,) = a.step(5.0, {"decode": m})
    assert (d.from_, d.to) == (2, 3)
    assert "1 failing worker(s) not counted as capacity" in d.reason


def test_a_failing_worker_alone_holds_the_role_at_its_min() -> None:
    """min 1, its only worker crash-loops with no load: no second worker for the min."""
    a = Autoscaler(pd_profile(decode_max=4, decode_min=1))
    assert a.step(5.0, {"decode": RoleMetrics(ready=0, failing=1, waiting=0.0)}) == []


def test_without_failing_workers_nothing_changes() -> None:
    a, b = (Autoscaler(pd_profile(decode_max=4, panic_threshold=100.0)) for _ in range(2))
    m = RoleMetrics(ready=1, starting=1, waiting=15.0)
    assert [d.to_dict() for d in a.step(5.0, {"decode": m})] == [
        d.to_dict() for d in b.step(5.0, {"decode": dataclasses.replace(m, failing=0)})]
