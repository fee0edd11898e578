"""Re-splitting the box between prefill and decode: the pure part."""

from __future__ import annotations

import dataclasses

from pdbox import config
from pdbox.autoscaler import Split, propose_split
from pdbox.resplit import apply_split, current_split, demands, describe
from pdbox.workers import vllm as vllm_spec


def four_core_profile(resplit: bool = True) -> config.Profile:
    p = config.load("cpu-tiny")
    assert p.prefill is not None and p.decode is not None
    return dataclasses.replace(
        p,
        prefill=dataclasses.replace(p.prefill, cores=("0", "1")),
        decode=dataclasses.replace(p.decode, cores=("2", "3")),
        autoscaler=dataclasses.replace(p.autoscaler, resplit=resplit),
    )


def test_current_split_reads_the_roles_cores() -> None:
    s = current_split(four_core_profile())
    assert s.prefill_cores == (0, 1) and s.decode_cores == (2, 3)


def test_a_prefill_heavy_load_moves_a_core_to_prefill_and_workers_follow() -> None:
    p = four_core_profile()
    pre, dec = demands(9.0, 1.0)
    new = propose_split(p, pre, dec, current_split(p))
    assert new is not None and new.prefill_cores == (0, 1, 2) and new.decode_cores == (3,)
    q = apply_split(p, new)
    assert current_split(q) == new
    spec = vllm_spec.build(q, "prefill", 0, vllm_spec.WorkerPorts(1, 2, 0), "/m",
                           online_cores=[0, 1, 2, 3], base_env={})
    assert spec.env["VLLM_CPU_OMP_THREADS_BIND"] == "0,1,2"
    assert "prefill cores 0,1→0,1,2" in describe(current_split(p), new)


def test_balanced_load_or_switch_off_proposes_nothing() -> None:
    p = four_core_profile()
    assert propose_split(p, *demands(5.0, 5.0), current_split(p)) is None
    off = four_core_profile(resplit=False)
    assert propose_split(off, *demands(9.0, 1.0), current_split(off)) is None


def test_idle_role_keeps_a_floor_of_demand() -> None:
    assert demands(0.0, 0.0) == (0.5, 0.5)


def test_mps_split_moves_sm_percentages() -> None:
    p = config.load("gh200-pd")
    p = dataclasses.replace(p, autoscaler=dataclasses.replace(p.autoscaler, resplit=True))
    old = current_split(p)
    assert (old.prefill_sm_percent, old.decode_sm_percent) == (60, 40)
    new = propose_split(p, 1.0, 9.0, old)
    assert new is not None and new.decode_sm_percent > 40
    q = apply_split(p, new)
    assert q.decode is not None and q.decode.sm_percent == new.decode_sm_percent
    assert isinstance(new, Split)


# ------------------------------------------------- issue 15: the slow loop, pure part

import pytest  # noqa: E402

from pdbox.plan.memory import KNOWN_GPU_MEMORY  # noqa: E402
from pdbox.plan.model_facts import load_facts  # noqa: E402
from pdbox.resplit import (  # noqa: E402
    SplitController,
    SplitError,
    make_before_break_peak,
    memory_sequence,
    parse_split,
    size_decode_batch,
)

GPU_PD = ("gh200-pd", "h100-pd")
FIXTURES = __import__("pathlib").Path(__file__).resolve().parents[1] / "fixtures" / "models"


def facts_for(p: config.Profile):  # the published config.json of the profile's model
    return load_facts(FIXTURES / p.model.source.split("/")[-1].lower())


def test_parse_split_on_a_cpu_names_core_sets() -> None:
    p = config.load("cpu-tiny")
    swap = parse_split(p, "1/0")
    assert swap.prefill_cores == (1,) and swap.decode_cores == (0,)
    for bad, why in (("0/0", "may not share"), ("0-1/1", "may not share"),
                     ("0/2", "exactly the cores"), ("0", "PREFILL/DECODE"),
                     ("a/b", "core sets")):
        with pytest.raises(SplitError, match=why):
            parse_split(p, bad)


def test_parse_split_on_a_gpu_names_sm_percentages() -> None:
    p = config.load("gh200-pd")
    s = parse_split(p, "70/30")
    assert (s.prefill_sm_percent, s.decode_sm_percent) == (70, 30)
    for bad in ("70/40", "95/5", "x/y"):
        with pytest.raises(SplitError):
            parse_split(p, bad)
    with pytest.raises(SplitError, match="not P/D"):
        parse_split(config.load("gpu-aggregated"), "50/50")


def _with_fractions(p: config.Profile, pre: float, dec: float) -> config.Profile:
    assert p.prefill is not None and p.decode is not None
    return dataclasses.replace(
        p, prefill=dataclasses.replace(p.prefill, memory_fraction=pre),
        decode=dataclasses.replace(p.decode, memory_fraction=dec))


@pytest.mark.parametrize("name", GPU_PD)
def test_memory_sequence_is_break_before_make_and_fits_the_card(name: str) -> None:
    """Every GPU P/D profile: every step of a re-split stays under the card's budget,
    where starting a replacement first (the old rolling restart) would not."""
    from pdbox.hardware.mps import MEMORY_BUDGET

    p = config.load(name)
    assert p.prefill is not None and p.decode is not None
    facts = facts_for(p)
    card = KNOWN_GPU_MEMORY[p.hardware.gpu_match]
    counts = {"prefill": p.prefill.replicas, "decode": p.decode.max}
    new = apply_split(p, parse_split(p, "50/50"))
    steps = memory_sequence(p, new, counts)
    assert [(s.action, s.role) for s in steps] == [
        ("stop", "prefill"), ("start", "prefill"), ("stop", "decode"), ("start", "decode")]
    assert all(sum(s.fractions) < MEMORY_BUDGET for s in steps)
    # The old way needed the card to hold a role twice over.
    assert make_before_break_peak(p, counts) >= MEMORY_BUDGET
    # Memory moving toward decode: prefill shrinks first, so its memory frees
    # before decode grows; the peak is the final split; every new worker's ledger fits.
    moved = _with_fractions(new, p.prefill.memory_fraction - 0.05,
                            p.decode.memory_fraction + 0.02)
    steps = memory_sequence(p, moved, counts, facts=facts, card_bytes=card)
    assert steps[0] == steps[0].__class__("stop", "prefill", counts["prefill"],
                                          steps[0].fractions)
    assert max(sum(s.fractions) for s in steps) == pytest.approx(sum(steps[-1].fractions))
    # Decode shrinking goes first instead.
    back = _with_fractions(new, p.prefill.memory_fraction + 0.02,
                           p.decode.memory_fraction - 0.05)
    assert memory_sequence(p, back, counts)[0].role == "decode"
    # A split whose end state cannot fit is refused, naming the step.
    greedy = _with_fractions(new, 0.60, 0.25)
    with pytest.raises(SplitError, match="start"):
        memory_sequence(p, greedy, counts)


def test_memory_sequence_checks_each_new_workers_ledger() -> None:
    p = config.load("gh200-pd")
    facts = facts_for(p)
    card = KNOWN_GPU_MEMORY["GH200"]
    starved = _with_fractions(p, 0.05, p.decode.memory_fraction if p.decode else 0.25)
    with pytest.raises(SplitError, match="new prefill worker"):
        memory_sequence(p, starved, {"prefill": 1, "decode": 1}, facts=facts, card_bytes=card)


def test_split_controller_has_a_dwell_and_a_pin() -> None:
    p = four_core_profile()
    ctl = SplitController(dwell_s=120.0)
    new = ctl.propose(p, 9.0, 1.0, now=1000.0)
    assert new is not None
    ctl.moved(1000.0, "re-split: test")
    assert ctl.propose(p, 9.0, 1.0, now=1100.0) is None and ctl.held.startswith("dwell")
    assert ctl.propose(p, 9.0, 1.0, now=1121.0) is not None
    ctl.pinned = "0/1-3"
    assert ctl.propose(p, 9.0, 1.0, now=5000.0) is None and "pinned" in ctl.held
    st = ctl.status(p, now=1130.0)
    assert st["split"] == "prefill cores 0,1 / decode cores 2,3"
    assert st["last_reason"] == "re-split: test" and st["pinned"] == "0/1-3"


def test_decode_batch_follows_queue_and_itl() -> None:
    # ITL over target with nothing waiting: cut to what kept ITL at target.
    assert size_decode_batch(0, running=40, waiting=0, itl_p90_s=0.1, itl_slo_s=0.05) == 20
    # Waiting with ITL to spare: double, up to vLLM's default.
    assert size_decode_batch(32, running=32, waiting=5, itl_p90_s=0.01, itl_slo_s=0.05) == 64
    assert size_decode_batch(256, running=256, waiting=5, itl_p90_s=0.01,
                             itl_slo_s=0.05) == 256
    # Nothing measured, or in band: unchanged.
    assert size_decode_batch(0, running=3, waiting=0, itl_p90_s=None, itl_slo_s=0.05) == 0
    assert size_decode_batch(16, running=8, waiting=0, itl_p90_s=0.04, itl_slo_s=0.05) == 16
    # Never below the floor.
    assert size_decode_batch(0, running=2, waiting=0, itl_p90_s=1.0, itl_slo_s=0.05) == 4


def test_decode_gets_the_fewest_units_that_keep_its_step_within_half_the_itl_target() -> None:
    from pdbox.replay.split_sim import BoxModel
    from pdbox.resplit import BatchWindow, itl_demands

    p = config.load("gh200-pd")
    model = BoxModel.for_profile(p)
    w = BatchWindow(60.0)
    for t in range(0, 61, 5):
        w.add(float(t), 8, 8 * 2000)
    assert w.full(60.0) and not BatchWindow(60.0).full(0.0)
    pre, dec, why = itl_demands(model, w, p.slo.itl_s)
    assert pre + dec == pytest.approx(100 * 100)
    units = dec / 100
    assert model.step_s(units, 8, 16000, 0) <= 0.5 * p.slo.itl_s
    assert units == 10 or model.step_s(units - 5, 8, 16000, 0) > 0.5 * p.slo.itl_s
    assert "decode batch p90 8" in why
    # A far larger batch needs more of the card.
    big = BatchWindow(60.0)
    for t in range(0, 61, 5):
        big.add(float(t), 400, 400 * 4000)
    assert itl_demands(model, big, p.slo.itl_s)[1] > dec


def test_step_budget_follows_prefill_speed_itl_and_ttft() -> None:
    from pdbox.resplit import MAX_BATCHED_TOKENS, MIN_BATCHED_TOKENS, size_batched_tokens

    kw = dict(itl_slo_s=0.05, ttft_p90_s=None, ttft_slo_s=1.0, waiting=0.0)
    # Decode on a GPU prefilling 20k tokens/s: a step within the 50 ms ITL target
    # holds 1,000 prefill tokens, in whole 256s.
    assert size_batched_tokens("decode", 0, prefill_tps=20_000.0, **kw) == 768
    # A slow prefill (a CPU core): the floor.
    assert size_batched_tokens("decode", 0, prefill_tps=260.0, **kw) == MIN_BATCHED_TOKENS
    # It only shrinks, and unknown speed changes nothing.
    assert size_batched_tokens("decode", 512, prefill_tps=1e6, **kw) == 512
    assert size_batched_tokens("decode", 0, prefill_tps=None, **kw) == 0
    # Prefill: queued with TTFT over target doubles, up to the cap; otherwise unchanged.
    slow = dict(itl_slo_s=0.05, ttft_slo_s=1.0)
    assert size_batched_tokens("prefill", 0, prefill_tps=None, ttft_p90_s=3.0, waiting=4,
                               **slow) == 16384
    assert size_batched_tokens("prefill", MAX_BATCHED_TOKENS, prefill_tps=None, ttft_p90_s=3.0,
                               waiting=4, **slow) == MAX_BATCHED_TOKENS
    assert size_batched_tokens("prefill", 0, prefill_tps=None, ttft_p90_s=3.0, waiting=0,
                               **slow) == 0
    assert size_batched_tokens("prefill", 0, prefill_tps=None, ttft_p90_s=0.5, waiting=4,
                               **slow) == 0


def test_a_step_budget_below_the_batch_is_refused_by_the_profile() -> None:
    text = (config.BUILTIN_DIR / "cpu-tiny.toml").read_text().replace(
        "[decode]\n", "[decode]\nmax_num_seqs = 64\nmax_num_batched_tokens = 32\n")
    with pytest.raises(config.ProfileError, match="max_num_batched_tokens"):
        config.load_text(text, "tight.toml")


# ------------------------------------------------- both roles' needs, damped moves


def _window(batch: float, ctx_per_seq: float, prompt_tps: float, backlog: float,
            decode_tps: float = 0.0, until: int = 60):
    from pdbox.resplit import BatchWindow

    w = BatchWindow(60.0)
    for t in range(0, until + 1, 5):
        w.add(float(t), batch, batch * ctx_per_seq, prompt_tps * t, backlog,
              decode_tps * t, 0.0)
    return w


def _gpu_resplit_profile():
    p = config.load("gh200-pd")
    return dataclasses.replace(p, autoscaler=dataclasses.replace(p.autoscaler, resplit=True))


def test_needs_weigh_prefill_arrivals_as_well_as_the_decode_batch() -> None:
    from pdbox.replay.split_sim import BoxModel
    from pdbox.resplit import split_needs

    p = config.load("gh200-pd")
    model = BoxModel.for_profile(p)
    calm = split_needs(model, _window(8, 2000, 1000, 0), p.slo.itl_s)
    busy = split_needs(model, _window(8, 2000, 40_000, 2_000_000), p.slo.itl_s)
    assert busy.prefill_units > calm.prefill_units
    assert busy.decode_units == calm.decode_units  # same batch, same decode need
    # Keeping up with arrivals is the need and the floor; the waiting prompts are
    # what a move would strand and must first drain.
    assert busy.prefill_floor == busy.prefill_units
    assert model.prefill_tps(busy.prefill_floor) >= 40_000 or busy.prefill_floor == 90
    assert busy.backlog_tokens == 2_000_000 and busy.tps_per_unit > 0
    # The decode role's own prefills need compute too.
    local = split_needs(model, _window(8, 2000, 40_000, 0, decode_tps=30_000), p.slo.itl_s)
    assert local.decode_units > calm.decode_units


def test_target_shares_slack_evenly_and_never_starves_a_role() -> None:
    from pdbox.resplit import SplitNeed

    # Both fit: each its need, the slack split evenly (not all to one role).
    assert SplitNeed(70, 10, 60, 10, 100, "").target_prefill() == 80
    # Overloaded: floors first, then the rest by what each still lacks.
    t = SplitNeed(90, 90, 30, 20, 100, "").target_prefill()
    assert 30 <= t <= 80 and t == pytest.approx(30 + 50 * 60 / 130)
    # Floors alone do not fit: in proportion to them.
    assert SplitNeed(90, 90, 75, 50, 100, "").target_prefill() == pytest.approx(60)


def test_no_move_while_each_role_has_its_need() -> None:
    from pdbox.resplit import SplitNeed

    p = _gpu_resplit_profile()  # 60/40
    ctl = SplitController(dwell_s=0.0)
    # Decode needs 10, prefill 20: the old loop gave prefill the rest (90/10).
    assert ctl.propose_needs(p, SplitNeed(20, 10, 10, 10, 100, ""), now=100.0) is None
    assert "has its need" in ctl.held


def test_a_move_waits_as_long_as_it_costs_and_is_bounded() -> None:
    from pdbox.resplit import MAX_STEP_SHARE, SplitNeed

    p = _gpu_resplit_profile()  # 60/40
    ctl = SplitController(dwell_s=300.0)
    need = SplitNeed(10, 90, 10, 80, 100, "decode short")
    assert ctl.propose_needs(p, need, now=100.0, move_cost_s=120.0) is None
    assert ctl.propose_needs(p, need, now=200.0, move_cost_s=120.0) is None
    assert "short for 100s" in ctl.held
    new = ctl.propose_needs(p, need, now=220.0, move_cost_s=120.0)
    assert new is not None
    # Wanted 10/90; a move goes at most MAX_STEP_SHARE of the card.
    assert new.prefill_sm_percent == 60 - int(100 * MAX_STEP_SHARE)
    # A shortage that ends resets the count.
    ctl2 = SplitController(dwell_s=0.0)
    assert ctl2.propose_needs(p, need, now=0.0, move_cost_s=120.0) is None
    ctl2.propose_needs(p, SplitNeed(40, 40, 10, 10, 100, ""), now=60.0, move_cost_s=120.0)
    assert ctl2.propose_needs(p, need, now=130.0, move_cost_s=120.0) is None


def test_a_cpu_move_is_one_core_at_a_time() -> None:
    from pdbox.resplit import SplitNeed

    p = four_core_profile()  # prefill 0,1 / decode 2,3
    ctl = SplitController(dwell_s=0.0)
    new = ctl.propose_needs(p, SplitNeed(1, 3, 1, 3, 4, ""), now=0.0)
    assert new is not None and len(new.decode_cores) == 3


def test_overloaded_moves_only_to_lift_a_role_to_its_floor() -> None:
    from pdbox.resplit import SplitNeed

    p = _gpu_resplit_profile()  # 60/40
    ctl = SplitController(dwell_s=0.0)
    # No split meets both needs, each has its floor: a move only costs.
    assert ctl.propose_needs(p, SplitNeed(90, 60, 50, 30, 100, ""), now=0.0) is None
    assert "overloaded" in ctl.held
    # Decode under its floor (holds 40, must have 60): only as far as the floor.
    new = ctl.propose_needs(p, SplitNeed(90, 80, 30, 60, 100, ""), now=0.0)
    assert new is not None and new.decode_sm_percent == 60


def test_a_move_that_would_strand_a_backlog_waits() -> None:
    from pdbox.resplit import SplitNeed

    p = _gpu_resplit_profile()  # 60/40
    ctl = SplitController(dwell_s=0.0)
    # 1M tokens waiting at 100 tokens/s per unit: over a minute on the current 60 %.
    big = SplitNeed(70, 10, 60, 10, 100, "", backlog_tokens=1e6, tps_per_unit=100.0,
                    startup_s=60.0)
    assert ctl.propose_needs(p, big, now=0.0) is None and "strand" in ctl.held
    small = dataclasses.replace(big, backlog_tokens=1e5)
    new = ctl.propose_needs(p, small, now=0.0)
    assert new is not None and new.prefill_sm_percent == 80


def test_live_loop_feeds_both_roles_load_and_holds_while_each_has_its_need(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The live loop (pdbox/fleet_resplit.py) samples prompt tokens from the router's
    counter and the workers' waiting requests, and moves nothing on a calm box (the old
    rule moved it to 90/10 after a minute: decode needed 10, prefill got the rest)."""
    from types import SimpleNamespace

    from pdbox import fleet_resplit
    from pdbox.router.metrics import RouterMetrics

    p = _gpu_resplit_profile()
    metrics = RouterMetrics()
    backends = {"d": SimpleNamespace(role="decode", running=4, waiting=0, kv_usage=0.01,
                                     num_blocks=10_000),
                "p": SimpleNamespace(role="prefill", running=0, waiting=1, kv_usage=0.0,
                                     num_blocks=10_000)}
    events: list[str] = []
    fleet = SimpleNamespace(profile=p, live_profile=p, drains=[],
                            registry=SimpleNamespace(backends=backends),
                            router=SimpleNamespace(metrics=metrics),
                            event=lambda kind, text: events.append(text))
    clock = [1000.0]
    monkeypatch.setattr(fleet_resplit.time, "monotonic", lambda: clock[0])
    rs = fleet_resplit.Resplitter(fleet)  # type: ignore[arg-type]
    moved: list[object] = []
    monkeypatch.setattr(rs, "resplit_to", lambda new, why, itl=None: moved.append(new))
    for _ in range(40):  # 200 s at 2 requests of 1000 prompt tokens per second
        metrics.requests.inc(10)
        metrics.prompt_tokens.inc(10_000)
        rs.maybe_resplit()
        clock[0] += 5.0
    assert rs.batch.prompt_rate() == pytest.approx(2000.0)
    assert rs.batch.backlog() == pytest.approx(1000.0)  # one waiting, mean prompt 1000
    assert not moved and "has its need" in rs.ctl.held


def test_no_move_when_not_even_both_floors_fit() -> None:
    from pdbox.resplit import SplitNeed

    p = _gpu_resplit_profile()  # 60/40
    ctl = SplitController(dwell_s=0.0)
    # Prefill under its floor, but giving it 90 would leave decode under its 20.
    assert ctl.propose_needs(p, SplitNeed(90, 25, 90, 20, 100, ""), now=0.0) is None
    assert "floors" in ctl.held


def test_decode_need_counts_the_batch_it_would_have_on_fewer_units() -> None:
    from pdbox.replay.split_sim import BoxModel

    model = BoxModel.for_profile(config.load("gh200-pd"))
    ctx = 30 * 1500
    here = model.decode_units_for(30, ctx, 0.025)
    # Measured on 40 %: on fewer units each stream stays longer, so the batch grows.
    assert model.decode_units_for(30, ctx, 0.025, units_now=40) >= here
    # Its own prefills take a share of its time.
    assert model.decode_units_for(30, ctx, 0.025, local_prompt_tps=5000) > here
