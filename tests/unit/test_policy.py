"""The Picker's policies and the P/D decider."""

from __future__ import annotations

import pytest

from pdbox.config import Weights
from pdbox.router.policy import NoWorker, PDDecider, Picker, WorkerView


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


# ----------------------------------------------------------------------- P/D


def test_threshold_mode() -> None:
    d = PDDecider(mode="threshold", min_uncached_tokens=256)
    pre, dec = w("p", role="prefill"), w("d")
    assert d.decide(300, pre, dec, 0.0).remote
    small = d.decide(100, pre, dec, 0.0)
    assert not small.remote and "100 uncached tokens < 256 threshold" in small.reason
    none = d.decide(5000, None, dec, 0.0)
    assert not none.remote and "no ready prefill worker" in none.reason
    assert not d.decide(5000, w("p", role="prefill", ready=False), dec, 0.0).remote


def test_adaptive_goes_remote_when_faster() -> None:
    d = PDDecider(min_uncached_tokens=256, prior_transfer_s=0.1)
    d.observe_prefill("p", 2000, 1.0)  # 2000 tok/s
    d.observe_local_prefill("d", 500, 1.0)  # 500 tok/s: decode is slow at prefill
    dec = d.decide(1000, w("p", role="prefill"), w("d"), 0.0)
    assert dec.remote
    assert dec.predicted_remote_s == pytest.approx(0.6)
    assert dec.predicted_local_s == pytest.approx(2.0)
    assert dec.reason == "remote: 1000 uncached tokens; predicted TTFT 0.6s remote vs 2.0s local"


def test_adaptive_stays_local_when_prefill_worker_is_queued() -> None:
    d = PDDecider(min_uncached_tokens=256)
    d.observe_prefill("p", 1000, 1.0)
    d.observe_local_prefill("d", 1000, 1.0)
    d.observe_transfer(0.2)
    dec = d.decide(1000, w("p", role="prefill", waiting=3), w("d"), 0.0)
    assert not dec.remote
    assert dec.reason.startswith("local: 1000 uncached tokens; predicted TTFT 4.2s remote")


def test_adaptive_offloads_to_protect_running_streams() -> None:
    d = PDDecider(min_uncached_tokens=256, ttft_slo_s=3.0, itl_slo_s=0.25)
    d.observe_prefill("p", 1000, 1.0)
    d.observe_local_prefill("d", 1000, 1.0)
    d.observe_transfer(0.3)
    d.observe_itl("d", 0.05)
    # Equal speeds: remote is slower by the transfer, but local would stall 4 streams.
    dec = d.decide(1000, w("p", role="prefill"), w("d", running=4), 0.0)
    assert dec.remote
    assert "stall 4 running streams" in dec.reason
    # Nobody to stall: stay local.
    assert not d.decide(1000, w("p", role="prefill"), w("d"), 0.0).remote
    # Remote would miss the TTFT target: stay local even if streams stall.
    busy = w("p", role="prefill", waiting=5)
    assert not d.decide(1000, busy, w("d", running=4), 0.0).remote


def test_adaptive_learns_with_ewma() -> None:
    d = PDDecider(alpha=0.5)
    d.observe_prefill("p", 1000, 1.0)
    d.observe_prefill("p", 3000, 1.0)
    assert d.estimates()["prefill_tps"] == {"p": 2000.0}
    d.observe_prefill("p", 0, 1.0)  # ignored
    assert d.estimates()["prefill_tps"] == {"p": 2000.0}
    d.forget_worker("p")
    assert d.estimates()["prefill_tps"] == {}


def test_unknown_decider_mode() -> None:
    with pytest.raises(ValueError):
        PDDecider(mode="always")


def test_local_prefill_speed_learnt_only_from_prompts_past_the_gate() -> None:
    d = PDDecider(mode="adaptive", min_uncached_tokens=256)
    d.observe_itl("decode-0", 0.05)
    # A short prompt's TTFT is the wait for the decode step in progress: ignored.
    d.observe_local_prefill("decode-0", 20, 0.2)
    assert d.estimates()["local_prefill_tps"] == {}
    # A long one counts, less one decode step: 500 tokens in 1.05 s - 0.05 s.
    d.observe_local_prefill("decode-0", 500, 1.05)
    assert abs(d.estimates()["local_prefill_tps"]["decode-0"] - 500.0) < 1e-6
