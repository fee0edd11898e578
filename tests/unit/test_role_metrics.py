"""The live autoscaler reads what replay feeds it: every RoleMetrics field replay fills, the
live side fills too (mean_wait_s included), from the router, the workers' engine histograms
and the clock it is given."""

from __future__ import annotations

import dataclasses
import math
from types import SimpleNamespace
from typing import Any

import pytest

from pdbox import config
from pdbox.autoscaler import RoleMetrics
from pdbox.replay import autoscale as replay
from pdbox.replay.traces import TraceRequest
from pdbox.role_metrics import mean_wait_s, role_metrics
from pdbox.router.backends import Backend
from pdbox.router.metrics import PromHistogram, RouterMetrics

QUEUE = "vllm:request_queue_time_seconds"


def filled(m: RoleMetrics) -> set[str]:
    return {f.name for f in dataclasses.fields(m) if getattr(m, f.name) is not None}


def replay_fields(profile: config.Profile, monkeypatch: pytest.MonkeyPatch) -> dict[str, set[str]]:
    """Each role's fields that replay filled at some tick of a busy trace."""
    seen: dict[str, set[str]] = {}
    original = replay._Sim.metrics

    def spy(self: Any) -> dict[str, RoleMetrics]:
        out = original(self)
        for role, m in out.items():
            seen.setdefault(role, set()).update(filled(m))
        return out

    monkeypatch.setattr(replay._Sim, "metrics", spy)
    reqs = [TraceRequest(i * 0.5, 600, 60) for i in range(200)]
    replay.simulate(reqs, profile)
    return seen


def queue_hist(count: float, total: float) -> dict[str, PromHistogram]:
    return {QUEUE: PromHistogram({1.0: count, math.inf: count}, total, count)}


def busy_box(profile: config.Profile, now: float) -> dict[str, Any]:
    """A live box in the middle of serving: every source a live figure comes from has data."""
    rm = RouterMetrics()
    for i in range(20):
        rm.ttft.observe(0.4 + i / 100, now - 5)
        rm.itl.observe(0.05, now - 5, weight=10)
        rm.admission_wait.observe(0.2, now - 5)
    backends: dict[str, Backend] = {}
    workers = []
    for role in profile.roles():
        b = Backend(id=f"{role}-0", role=role, url="http://x", state="ready",
                    waiting=1, running=2, kv_usage=0.3)
        b.engine.update(now - 20, queue_hist(0, 0.0))
        b.engine.update(now - 4, queue_hist(4, 2.0))  # four requests queued 0.5 s each
        backends[b.id] = b
        workers.append(SimpleNamespace(id=b.id, role=role, state="ready",
                                       spec=SimpleNamespace(cores="0")))
    return {"router_metrics": rm, "admission_queued": 3, "backends": backends,
            "workers": workers, "per_core": [80.0, 60.0]}


@pytest.mark.parametrize("name", ["cpu-tiny", "cpu-aggregated"])
def test_live_fills_every_input_replay_uses(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    profile = config.load(name)
    from_replay = replay_fields(profile, monkeypatch)
    now = 1000.0
    live = role_metrics(profile, now=now, period_s=15.0, **busy_box(profile, now))
    assert set(live) == set(from_replay)
    for role, fields in from_replay.items():
        missing = fields - filled(live[role])
        assert not missing, f"{role}: replay feeds the autoscaler {sorted(missing)}, live does not"
    assert all("mean_wait_s" in f for f in from_replay.values())


def test_mean_wait_adds_the_router_queue_to_the_workers() -> None:
    profile = config.load("cpu-tiny")
    now = 1000.0
    box = busy_box(profile, now)
    live = role_metrics(profile, now=now, period_s=15.0, **box)
    assert live["prefill"].mean_wait_s == pytest.approx(0.5)  # vLLM's queue time only
    assert live["decode"].mean_wait_s == pytest.approx(0.2 + 0.5)  # admission, then vLLM


def test_mean_wait_when_nothing_finished_waiting() -> None:
    rm = RouterMetrics()
    idle = Backend(id="d", role="decode", url="u")
    assert mean_wait_s("decode", rm, [idle], 100.0, 90.0) == 0.0
    rm.waiting_since[object()] = 96.0  # one request has waited 4 s for admission so far
    assert mean_wait_s("decode", rm, [idle], 100.0, 90.0) == pytest.approx(4.0)
    queued = Backend(id="p", role="prefill", url="u", waiting=2)
    assert mean_wait_s("prefill", rm, [queued], 100.0, 90.0) is None  # unknown: "it waits"
    rm.admission_wait.observe(0.1, 80.0)  # before the period: not counted
    assert mean_wait_s("decode", rm, [idle], 100.0, 90.0) == pytest.approx(4.0)


def test_itl_without_streams_comes_from_the_engines() -> None:
    profile = config.load("cpu-aggregated")
    now = 1000.0
    box = busy_box(profile, now)
    box["router_metrics"] = RouterMetrics()  # answers that were not streamed: no gaps seen
    b = box["backends"]["aggregated-0"]
    itl = "vllm:inter_token_latency_seconds"
    b.engine.update(now - 20, {itl: PromHistogram({0.05: 0, math.inf: 0}, 0.0, 0)})
    b.engine.update(now - 3, {itl: PromHistogram({0.05: 90, math.inf: 100}, 4.0, 100)})
    live = role_metrics(profile, now=now, period_s=15.0, **box)
    assert live["aggregated"].itl_p90_s == pytest.approx(0.05)


def test_crash_looping_and_unresponsive_workers_are_failing_not_starting() -> None:
    profile = config.load("cpu-tiny")
    now = 1000.0
    box = busy_box(profile, now)

    def w(wid: str, state: str, looping: bool) -> SimpleNamespace:
        return SimpleNamespace(id=wid, role="decode", state=state, crash_looping=looping,
                               spec=SimpleNamespace(cores="1"))

    box["workers"] += [w("decode-1", "starting", True), w("decode-2", "backoff", True),
                       w("decode-3", "unresponsive", False), w("decode-4", "restarting", False)]
    m = role_metrics(profile, now=now, period_s=15.0, **box)["decode"]
    assert (m.ready, m.starting, m.failing) == (1, 1, 3)
    assert m.members == 5 and m.committed == 2
