"""The Picker's policies (the P/D decider has tests/unit/test_decider.py)."""

from __future__ import annotations

import pytest

from pdbox.config import Weights
from pdbox.router.policy import NoWorker, Picker, WorkerView


def w(id_: str, waiting=0, running=0, inflight=0, kv=0.0, ready=True, role="decode"):
    return WorkerView(id_, role, f"http://{id_}", ready, waiting, running, inflight, kv)


def test_round_robin_cycles_over_ready_workers() -> None:
    p = Picker()
    ws = [w("a"), w("b", ready=False), w("c")]
    got = [p.pick(ws, {}, 0, "round_robin").worker_id for _ in range(4)]
    assert got == ["a", "c", "a", "c"]


def test_least_loaded_counts_waiting_running_and_inflight() -> None:
    p = Picker()
    ws = [w("a", waiting=1, running=1), w("b", inflight=1), w("c", running=3)]
    pick = p.pick(ws, {}, 0, "least_loaded")
    assert pick.worker_id == "b"
    assert "least_loaded" in pick.reason


def test_least_loaded_rotates_among_equals() -> None:
    p = Picker()
    ws = [w("a"), w("b")]
    assert {p.pick(ws, {}, 0, "least_loaded").worker_id for _ in range(4)} == {"a", "b"}


def test_no_ready_worker_raises() -> None:
    with pytest.raises(NoWorker, match="no ready decode worker"):
        Picker().pick([w("a", ready=False)], {}, 0, "prefix")


def test_unknown_policy_raises() -> None:
    with pytest.raises(ValueError, match="unknown policy"):
        Picker().pick([w("a")], {}, 0, "random")


def test_prefix_prefers_the_worker_holding_the_prompt() -> None:
    p = Picker(Weights(3, 2, 2))
    ws = [w("a", running=1), w("b", running=2)]
    pick = p.pick(ws, {"a": 0, "b": 10}, 10, "prefix")
    assert pick.worker_id == "b"
    assert pick.parts["b"]["prefix"] == 1.0
    assert pick.scores["b"] > pick.scores["a"]
    assert "b holds 10/10 blocks" in pick.reason


def test_queue_outweighs_a_small_prefix_share() -> None:
    p = Picker(Weights(3, 2, 2))
    ws = [w("a", running=1), w("b", running=3)]
    assert p.pick(ws, {"b": 2}, 10, "prefix").worker_id == "a"


def test_kv_usage_counts() -> None:
    p = Picker(Weights(3, 2, 2))
    ws = [w("a", kv=0.9), w("b", kv=0.1)]
    assert p.pick(ws, {}, 4, "prefix").worker_id == "b"


def test_load_guard_drops_the_prefix_score_of_an_overloaded_worker() -> None:
    p = Picker(Weights(100, 1, 1), balance_abs=8, balance_rel=1.5)
    # b holds everything but has 20 more requests than a: over both margins.
    ws = [w("a", running=2), w("b", running=22)]
    pick = p.pick(ws, {"b": 10}, 10, "prefix")
    assert pick.worker_id == "a"
    assert pick.parts["b"]["guarded"] == 1.0
    assert "load over balance margin" in pick.reason
    # Over the absolute margin but not the relative one: affinity stays.
    ws = [w("a", running=40), w("b", running=50)]
    assert p.pick(ws, {"b": 10}, 10, "prefix").worker_id == "b"


def test_session_affinity_breaks_ties() -> None:
    p = Picker()
    ws = [w("a"), w("b"), w("c")]
    first = p.pick(ws, {}, 0, "prefix", session_key="s1").worker_id
    again = [p.pick(ws, {}, 0, "prefix", session_key="s1").worker_id for _ in range(5)]
    assert set(again) == {first}
    # Without a session the rotation spreads equal workers.
    assert len({p.pick(ws, {}, 0, "prefix").worker_id for _ in range(3)}) == 3


def test_session_affinity_yields_to_a_clearly_better_score() -> None:
    p = Picker()
    ws = [w("a"), w("b")]
    first = p.pick(ws, {}, 0, "prefix", session_key="s").worker_id
    other = "b" if first == "a" else "a"
    busy = [w(first, running=5), w(other)]
    assert p.pick(busy, {}, 0, "prefix", session_key="s").worker_id == other


def test_session_map_is_bounded() -> None:
    p = Picker(session_capacity=3)
    for i in range(10):
        p.pick([w("a")], {}, 0, "prefix", session_key=f"s{i}")
    assert p.session_worker("s0") is None and p.session_worker("s9") == "a"
    p.forget_worker("a")
    assert p.session_worker("s9") is None
