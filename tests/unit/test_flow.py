"""Flowing decode: the balancing rule (pure) and a move by KV through the real router."""

from __future__ import annotations

import asyncio

import pytest

from pdbox.devtools.mock_openai import MockConfig
from pdbox.router.flow import Balancer, Load, clearing, pays, plan
from tests.helpers import sse_events
from tests.unit.test_migration_router import split, tokens_text
from tests.unit.test_router_app import Box, chat, pd_profile, run, until

ITL = 0.25
MOVE = 0.15  # a KV leg's measured pause


def load(wid: str, streams: int, movable: int | None = None, step: float | None = 0.06,
         slope: float = 0.01, left: int = 100, block_s: float = 0.016) -> Load:
    return Load(wid, streams, streams if movable is None else movable, step, slope, left,
                block_s)


def test_the_busiest_worker_gives_one_stream_to_the_idlest_when_it_pays() -> None:
    # Steps grow 10 ms a stream: moving one of 5 to a worker with 1 saves
    # 100 x (0.10 - 0.07 + 4 x 0.01 - 1 x 0.01) = 6 stream-s, more than the move's
    # 0.15 + 0.07 + 5 blocks x 0.016 = 0.30.
    pick = plan([load("a", 5, step=0.10), load("b", 1)], {}, 0.0, 2.0, ITL, MOVE)
    assert pick is not None and pick[:2] == ("a", "b") and "saves 6.00 stream-s" in pick[2]
    # A gap of one is no imbalance a move would narrow.
    assert plan([load("a", 3), load("b", 2)], {}, 0.0, 2.0, ITL, MOVE) is None
    # Nothing movable (streams not started, being placed): no move.
    assert plan([load("a", 5, 0), load("b", 0)], {}, 0.0, 2.0, ITL, MOVE) is None


def test_a_flat_step_curve_makes_no_move_pay() -> None:
    """A CPU whose decode step hardly grows with the batch (57 ms at 1, 62 at 4 here)."""
    flat = dict(slope=0.0017)
    hi, lo = load("a", 7, step=0.066, **flat, left=60), load("b", 4, step=0.062, **flat)
    ok, why = pays(hi, lo, ITL, MOVE)
    assert not ok and "would save only" in why
    assert plan([hi, lo], {}, 0.0, 2.0, ITL, MOVE) is None
    # The same gap with a long answer still to come does pay.
    assert pays(load("a", 7, step=0.066, **flat, left=1000), lo, ITL, MOVE)[0]


def test_a_step_past_the_itl_target_moves_whatever_the_saving() -> None:
    ok, why = pays(load("a", 6, step=0.31, slope=0.0, left=5), load("b", 2, step=0.06),
                   ITL, MOVE)
    assert ok and "past the 250 ms ITL target" in why
    # Unless the other worker would be past it too.
    assert not pays(load("a", 6, step=0.31, slope=0.0, left=5),
                    load("b", 2, step=0.26, slope=0.0), ITL, MOVE)[0]


def test_no_measured_step_no_move() -> None:
    assert plan([load("a", 6, step=None), load("b", 0)], {}, 0.0, 2.0, ITL, MOVE) is None


def test_a_worker_that_just_moved_a_stream_dwells() -> None:
    loads = [load("a", 6, step=0.2), load("b", 0), load("c", 1)]
    assert plan(loads, {"b": 9.0}, 10.0, 2.0, ITL, MOVE)[:2] == ("a", "c")
    assert plan(loads, {"b": 9.0, "c": 9.5}, 10.0, 2.0, ITL, MOVE) is None
    assert plan(loads, {"b": 9.0, "c": 9.5}, 11.6, 2.0, ITL, MOVE)[:2] == ("a", "b")


def test_balancer_counts_moves_and_damps_them() -> None:
    t = [0.0]
    moved: list[tuple[str, str]] = []
    b = Balancer(ITL, lambda: [load("a", 4, step=0.2), load("b", 0)],
                 lambda f, to, why: moved.append((f, to)) is None, lambda: t[0], lambda: MOVE)
    assert b.step() == ("a", "b")
    t[0] = 1.0
    assert b.step() is None  # within the dwell (8 ITL targets = 2 s)
    t[0] = 2.1
    assert b.step() == ("a", "b") and b.moves == 2


def test_streams_leave_a_worker_before_a_long_prefill_when_it_pays() -> None:
    src = load("a", 3, step=0.06, slope=0.003)
    # A 0.6 s prefill would hold each of a's 3 streams 0.6 s; moved, each pauses
    # 0.15 s. b's step stays within the target with all 3, and b's one stream runs
    # 3 slopes slower for the prefill's span: 3 x 0.45 - 3 x 0.003 x 0.6 / 0.069.
    # A step budget that takes the whole prompt in one step (chunk = prefill).
    pick = clearing(src, [load("b", 1, step=0.06, slope=0.003)], 0.6, 0.6, ITL, MOVE)
    assert pick is not None and pick[:2] == ("b", 3)
    assert "save 1.27 stream-s against 0.45 s for the prompt" in pick[2]
    # The least loaded destination, and only as many as keep its step in the target.
    pick = clearing(src, [load("b", 6, step=0.24, slope=0.004), load("c", 4, step=0.24,
                                                                    slope=0.004)],
                    2.0, 1.0, ITL, MOVE)
    assert pick is not None and pick[:2] == ("c", 2)
    # The legs of several moves share a step on the source, a partial block each:
    # with 150 ms blocks, three would pause longer than a 0.46 s step there, two not.
    heavy = load("a", 3, step=0.06, slope=0.003, block_s=0.15)
    pick = clearing(heavy, [load("b", 1, step=0.06, slope=0.003)], 1.0, 0.4, ITL, MOVE)
    assert pick is not None and pick[:2] == ("b", 2)
    # A small step budget keeps each gap shorter than a move's pause: no move.
    assert clearing(src, [load("b", 1, step=0.06, slope=0.003)], 0.6, 0.07, ITL, MOVE) is None


def test_no_clearing_for_a_short_prefill_a_full_destination_or_nothing_movable() -> None:
    dest = [load("b", 1)]
    assert clearing(load("a", 3), dest, MOVE, MOVE, ITL, MOVE) is None  # no longer than a move
    assert clearing(load("a", 3), dest, 0.25, 0.25, ITL, MOVE) is None  # 3 x 0.10 <= 3 x 0.15
    assert clearing(load("a", 3, movable=0), dest, 2.0, 2.0, ITL, MOVE) is None
    assert clearing(load("a", 3), [load("b", 1, step=0.26)], 2.0, 2.0, ITL, MOVE) is None
    assert clearing(load("a", 3), [load("b", 1, step=None)], 2.0, 2.0, ITL, MOVE) is None
    assert clearing(load("a", 3), [], 2.0, 2.0, ITL, MOVE) is None


def test_a_clearing_move_holds_both_workers_for_the_dwell() -> None:
    t = [0.0]
    b = Balancer(ITL, lambda: [load("a", 0), load("b", 4, step=0.2)],
                 lambda f, to, why: True, lambda: t[0], lambda: MOVE)
    b.moved("a", "b")
    t[0] = 1.0
    assert b.step() is None and b.moves == 1  # b would give one back, but dwells
    t[0] = 2.1
    assert b.step() == ("b", "a")


N = 30
SLOW = {"prefill-0": MockConfig(tokens=N, itl_ms=30), "decode-0": MockConfig(tokens=N, itl_ms=30)}


def test_a_stream_moves_by_kv_and_arrives_whole() -> None:
    async def check(box: Box) -> None:
        body = chat("count", stream=True, max_tokens=N)
        async with box.post("/v1/chat/completions", body,
                            headers={"X-Request-Id": "flow-1"}) as r:
            assert r.status == 200
            home = r.headers["x-pdbox-decode-worker"]
            other = "prefill-0" if home == "decode-0" else "decode-0"
            raw = b""
            while raw.count(b"data:") < 6:
                raw += await r.content.readany()
            target = box.router.registry.get(other)
            assert target is not None
            assert box.router.migrator.move("flow-1", target, "test")
            raw += await r.read()
        chunks, rest = split(sse_events(raw))
        assert rest[-1] == "[DONE]" and not [e for e in rest if isinstance(e, dict)
                                            and "error" in e]
        text = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks)
        assert text == tokens_text(N)
        src, dst = box.mocks[home], box.mocks[other]
        leg = src.seen[-1]["body"]
        assert leg["kv_transfer_params"]["do_remote_decode"] is True and leg["max_tokens"] == 1
        cont = dst.seen[-1]["body"]
        assert cont["kv_transfer_params"]["remote_block_ids"]
        assert cont["continue_final_message"] is True
        snap = box.router.migrator.snapshot()["flows"]
        assert snap["kv"] == 1 and snap["recent"][0]["from"] == home
        # The pause the client saw: the leg, then the new worker's first token.
        rec = snap["recent"][0]
        assert rec["pause_ms"] > rec["leg_ms"] > 0
        assert box.router.flow_view.move_s() == pytest.approx(rec["pause_ms"] / 1000)
        await until(lambda: "flow-1" not in box.router.migrator.live)
        assert 'pdbox_stream_flows_total{how="kv"} 1' in await box.metrics()

    run(check, SLOW, pd_profile())


def test_the_live_view_reads_streams_steps_and_what_is_left() -> None:
    """FlowView on a real router: counts, the live ITL, tokens left, a move's cost."""
    from pdbox.calibration import Calibration

    async def check(box: Box) -> None:
        view = box.router.flow_view
        # Before any calibration or move: a move costs one ITL target.
        assert view.move_s() == box.router.profile.slo.itl_s
        responses = []
        for i in range(3):
            r = await box.post("/v1/chat/completions", chat(f"s{i}", stream=True, max_tokens=N),
                               headers={"X-Request-Id": f"view-{i}"}).__aenter__()
            responses.append(r)
            await r.content.readany()
        await until(lambda: sum(x.movable for x in view.loads()) == 3)
        await asyncio.sleep(0.2)
        loads = {x.id: x for x in view.loads()}
        assert sum(x.streams for x in loads.values()) == 3
        busy = [x for x in loads.values() if x.streams]
        assert all(x.step_s is not None and 0.01 < x.step_s < 0.2 for x in busy)
        assert all(0 < x.left < N for x in busy)
        cal = Calibration(prefill_tps=1000.0, overhead_s=0.05, decode_step_s={1: 0.06, 4: 0.09})
        box.router.seed_calibration("decode", cal)
        box.router.seed_calibration("prefill", cal)
        assert view.move_s() == pytest.approx(0.22)  # two one-token requests in turn
        idle = [x for x in view.loads() if not x.streams]
        assert all(x.step_s == 0.06 and x.slope_s == pytest.approx(0.01) for x in idle)
        assert all(x.block_s == pytest.approx(box.router.profile.model.block_size / 1000.0)
                   for x in view.loads())
        for r in responses:
            await r.read()
            r.release()

    run(check, SLOW, pd_profile())


def test_a_worker_is_cleared_before_it_prefills_and_the_legs_go_first() -> None:
    """FlowView.clear on a live router: the stream moves by KV, and clear returns
    only once its one-token leg was answered by the worker that will prefill."""
    from pdbox.calibration import Calibration

    async def check(box: Box) -> None:
        view = box.router.flow_view
        cal = Calibration(prefill_tps=1000.0, overhead_s=0.05, decode_step_s={1: 0.06, 4: 0.07})
        box.router.seed_calibration("decode", cal)
        box.router.seed_calibration("prefill", cal)
        body = chat("count", stream=True, max_tokens=N)
        async with box.post("/v1/chat/completions", body,
                            headers={"X-Request-Id": "clear-1"}) as r:
            home = r.headers["x-pdbox-decode-worker"]
            other = "prefill-0" if home == "decode-0" else "decode-0"
            raw = b""
            while raw.count(b"data:") < 4:
                raw += await r.content.readany()
            await until(lambda: any(x.movable for x in view.loads() if x.id == home))
            # 1,000 uncached tokens: a 1 s prefill at the seeded speed.
            done = await view.clear(home, 1000, 0.0)
            assert done is not None and done[:2] == (other, 1), done
            assert "clear before a 1.00 s prefill" in done[2]
            leg = box.mocks[home].seen[-1]["body"]
            assert leg["kv_transfer_params"]["do_remote_decode"] is True
            # A short prompt clears nothing.
            assert await view.clear(other, 50, 0.0) is None
            raw += await r.read()
        chunks, rest = split(sse_events(raw))
        text = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks)
        assert text == tokens_text(N) and rest[-1] == "[DONE]"
        assert box.router.migrator.snapshot()["flows"]["kv"] == 1

    run(check, SLOW, pd_profile())
