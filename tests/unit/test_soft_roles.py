"""Soft roles, pure part: which prefill workers may serve whole, the remote stall, role mix."""

from __future__ import annotations

from pdbox.router.decider import PDDecision
from pdbox.router.policy import WorkerView
from pdbox.router.soft_roles import RoleMix, Settings, SoftRoles, split_shares


def w(wid: str, role: str = "prefill", running: int = 0, ready: bool = True) -> WorkerView:
    return WorkerView(id=wid, role=role, url="", ready=ready, running=running)


def test_short_prompt_on_an_idle_prefill_worker_may_be_served_whole() -> None:
    s = SoftRoles(Settings(gate_tokens=256))
    ok, why = s.eligible([w("prefill-0")], {"prefill-0": 40}, decoders_ready=1, now=0.0)
    assert ok == ["prefill-0"]
    assert "may serve whole" in why


def test_long_prompt_is_never_whole_on_a_prefill_worker_while_a_decoder_is_ready() -> None:
    s = SoftRoles(Settings(gate_tokens=256))
    ok, why = s.eligible([w("prefill-0")], {"prefill-0": 600}, decoders_ready=1, now=0.0)
    assert ok == [] and "600 uncached tokens" in why


def test_a_prefill_worker_is_kept_for_prefill_while_a_leg_is_open_and_for_hold_after() -> None:
    s = SoftRoles(Settings(hold_s=10.0))
    s.leg_started("prefill-0")
    ok, why = s.eligible([w("prefill-0")], {"prefill-0": 10}, 1, now=5.0)
    assert ok == [] and "1 prefill leg(s) open" in why
    s.leg_ended("prefill-0", now=6.0)
    ok, why = s.eligible([w("prefill-0")], {"prefill-0": 10}, 1, now=15.9)
    assert ok == [] and "prefilled 9.9s ago" in why
    ok, _ = s.eligible([w("prefill-0")], {"prefill-0": 10}, 1, now=16.0)
    assert ok == ["prefill-0"]


def test_whole_streams_are_capped() -> None:
    s = SoftRoles(Settings(max_streams=2))
    s.whole_started("prefill-0")
    s.whole_started("prefill-0")
    ok, why = s.eligible([w("prefill-0")], {"prefill-0": 10}, 1, now=0.0)
    assert ok == [] and "full: 2 whole streams" in why
    s.whole_ended("prefill-0")
    assert s.eligible([w("prefill-0")], {"prefill-0": 10}, 1, now=0.0)[0] == ["prefill-0"]


def test_with_no_decoder_ready_prefill_workers_serve_everything_whole() -> None:
    s = SoftRoles()
    s.leg_started("prefill-0")
    ok, why = s.eligible([w("prefill-0"), w("prefill-1", ready=False)], {"prefill-0": 5000},
                         decoders_ready=0, now=0.0)
    assert ok == ["prefill-0"] and "no decode worker ready" in why


def test_disabled_means_a_fixed_split() -> None:
    s = SoftRoles(Settings(enabled=False))
    assert s.eligible([w("prefill-0")], {"prefill-0": 5}, 1, 0.0) == ([], "")
    dec = PDDecision(True, "remote: x", 1.0, 1.2)
    s.whole_started("prefill-0")
    assert s.weigh_remote(dec, w("prefill-0"), w("decode-0", "decode", 4), 1.0) is dec


def test_remote_prefill_counts_the_stall_of_whole_streams_on_the_prefill_worker() -> None:
    s = SoftRoles()
    dec = PDDecision(True, "remote: 600 uncached tokens", 2.0, 2.3)
    pre, decode = w("prefill-0"), w("decode-0", "decode", running=3)
    # Nothing decoding on the prefill worker: the decider's call stands.
    assert s.weigh_remote(dec, pre, decode, 2.0) is dec
    # One whole stream there stalls 2 stream-s + 0.3 s extra < 3 x 2 s here: still remote.
    s.whole_started("prefill-0")
    kept = s.weigh(dec, pre, decode, 2.0)
    assert kept.remote and "remote still" in kept.reason
    # As many there as here: still remote (it drains the prefill worker of streams).
    for _ in range(2):
        s.whole_started("prefill-0")
    assert s.weigh(dec, pre, decode, 2.0).remote
    # Four whole streams there cost more than three here: prefill locally.
    s.whole_started("prefill-0")
    moved = s.weigh(dec, pre, decode, 2.0)
    assert not moved.remote and moved.reason.startswith("local: 4 whole stream(s) on prefill-0")
    # A local decision is never turned remote.
    local = PDDecision(False, "local: short", 0.1, 0.5)
    assert s.weigh_remote(local, pre, decode, 2.0) is local


def test_role_mix_shares_and_split() -> None:
    m = RoleMix(window_s=60.0)
    m.record("prefill-0", None, "whole", now=0.0)
    m.record("decode-0", "prefill-0", "remote", now=1.0)
    m.record("decode-0", None, "local", now=2.0)
    mix = m.mix(now=10.0, workers=["decode-0", "prefill-0", "decode-1"])
    assert mix["prefill-0"] == {"whole": 0.5, "prefill": 0.5, "decode": 0.0, "requests": 2}
    assert mix["decode-0"] == {"whole": 0.5, "prefill": 0.0, "decode": 0.5, "requests": 2}
    assert mix["decode-1"]["requests"] == 0
    assert split_shares(mix) == {"whole": 0.5, "prefill": 0.25, "decode": 0.25}
    # Outside the window, nothing is left.
    assert m.mix(now=100.0)["prefill-0"]["requests"] == 0


def test_on_an_idle_box_a_long_prompt_goes_to_an_idle_prefill_worker_when_cheap() -> None:
    s = SoftRoles()
    pre, decode = w("prefill-0"), w("decode-0", "decode")
    local = PDDecision(False, "local: 600 uncached tokens; predicted TTFT 2.3s remote vs 2.2s "
                       "local", 2.2, 2.3)
    moved = s.weigh(local, pre, decode, 2.2)
    assert moved.remote and moved.reason.startswith("remote (soft role): prefill-0 idle")
    # Not when remote costs the request much more (the prefill worker is queued) ...
    slow = PDDecision(False, "local: queued there", 2.2, 6.0)
    assert s.weigh(slow, pre, decode, 2.2) is slow
    # ... nor while it decodes whole streams or has a leg open.
    s.whole_started("prefill-0")
    assert s.weigh(local, pre, decode, 2.2) is local
    s.whole_ended("prefill-0")
    s.leg_started("prefill-0")
    assert s.weigh(local, pre, decode, 2.2) is local
    # Below the gate the decider predicts nothing, and nothing changes.
    short = PDDecision(False, "local: 40 uncached tokens < 256 threshold")
    assert SoftRoles().weigh(short, pre, decode, 0.1) is short


def test_on_a_tie_the_request_stays_on_the_decode_worker() -> None:
    from pdbox.router.policy import Pick

    s = SoftRoles()
    roles = {"decode-0": "decode", "prefill-0": "prefill"}
    tie = Pick("prefill-0", {"decode-0": 7.0, "prefill-0": 7.0}, "prefix: ...")
    kept = s.prefer_home(tie, roles)
    assert kept.worker_id == "decode-0" and "kept on the decode worker" in kept.reason
    better = Pick("prefill-0", {"decode-0": 5.0, "prefill-0": 7.0}, "prefix: ...")
    assert s.prefer_home(better, roles) is better


def test_hybrid_any_prompt_length_and_no_hold_only_the_stream_cap() -> None:
    s = SoftRoles(Settings(gate_tokens=256, hold_s=10.0, max_streams=2, hybrid=True))
    s.leg_ended("prefill-0", now=5.0)  # prefilled a moment ago: no hold in hybrid
    ok, why = s.eligible([w("prefill-0")], {"prefill-0": 3000}, decoders_ready=1, now=6.0)
    assert ok == ["prefill-0"] and "hybrid" in why
    s.whole_started("prefill-0")
    s.whole_started("prefill-0")
    ok, why = s.eligible([w("prefill-0")], {"prefill-0": 10}, 1, now=6.0)
    assert ok == [] and "full" in why


def test_hybrid_reverse_split_counts_every_stream_of_the_decode_worker_prefilling() -> None:
    """A request at home on the prefill worker, its prompt prefilled on a decode
    worker: that worker's own streams (not soft roles' whole count) stall."""
    s = SoftRoles(Settings(hybrid=True))
    dec = PDDecision(True, "remote: 600 uncached tokens", 2.0, 2.3)
    home = w("prefill-0", "prefill", running=1)
    prefiller = w("decode-0", "decode", running=4)
    # 4 streams x 2 s there against 1 stream x 2 s at home: prefill at home.
    out = s.weigh(dec, prefiller, home, 2.0)
    assert not out.remote and "4 whole stream(s) on decode-0" in out.reason
    # An idle decode worker: remote stands.
    assert s.weigh(dec, w("decode-0", "decode"), home, 2.0) is dec


def test_the_whole_stream_cap_is_the_itl_fit_within_the_workers_own_slots() -> None:
    def pw(slots: int) -> WorkerView:
        return WorkerView(id="prefill-0", role="prefill", url="", slots=slots)

    s = SoftRoles(Settings(hybrid=True, max_streams=0))
    assert s.cap(pw(0)) is None  # nothing known: admission alone bounds it
    assert s.cap(pw(24)) == 24  # its own max_num_seqs
    s.settings = Settings(hybrid=True, max_streams=40)  # the ITL fit from calibration
    assert s.cap(pw(24)) == 24 and s.cap(pw(128)) == 40
    for _ in range(24):
        s.whole_started("prefill-0")
    ok, why = s.eligible([pw(24)], {"prefill-0": 10}, decoders_ready=1, now=0.0)
    assert ok == [] and "full: 24 whole streams" in why
    ok, _ = s.eligible([pw(128)], {"prefill-0": 10}, decoders_ready=1, now=0.0)
    assert ok == ["prefill-0"]


def test_an_auto_gate_asks_the_decider_per_worker() -> None:
    s = SoftRoles(Settings(gate_tokens=None), gate=lambda wid: 300 if wid == "prefill-0" else 50)
    ok, _ = s.eligible([w("prefill-0")], {"prefill-0": 299}, decoders_ready=1, now=0.0)
    assert ok == ["prefill-0"]
    ok, why = s.eligible([w("prefill-0")], {"prefill-0": 300}, decoders_ready=1, now=0.0)
    assert ok == [] and ">= 300" in why
