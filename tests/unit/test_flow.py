"""Flowing decode: the balancing rule (pure) and a move by KV through the real router."""

from __future__ import annotations

from pdbox.devtools.mock_openai import MockConfig
from pdbox.router.flow import Balancer, Load, plan
from tests.helpers import sse_events
from tests.unit.test_migration_router import split, tokens_text
from tests.unit.test_router_app import Box, chat, pd_profile, run, until


def test_the_busiest_worker_gives_one_stream_to_the_idlest() -> None:
    loads = [Load("a", 5, 5), Load("b", 1, 1)]
    assert plan(loads, {}, now=0.0, dwell_s=2.0) == ("a", "b")
    # A gap of one is no imbalance a move would narrow.
    assert plan([Load("a", 3, 3), Load("b", 2, 2)], {}, 0.0, 2.0) is None
    # Nothing movable (streams not started, being placed): no move.
    assert plan([Load("a", 5, 0), Load("b", 0, 0)], {}, 0.0, 2.0) is None


def test_a_worker_that_just_moved_a_stream_dwells() -> None:
    loads = [Load("a", 6, 6), Load("b", 0, 0), Load("c", 1, 1)]
    assert plan(loads, {"b": 9.0}, now=10.0, dwell_s=2.0) == ("a", "c")
    assert plan(loads, {"b": 9.0, "c": 9.5}, now=10.0, dwell_s=2.0) is None
    assert plan(loads, {"b": 9.0, "c": 9.5}, now=11.6, dwell_s=2.0) == ("a", "b")


def test_balancer_counts_moves_and_damps_them() -> None:
    t = [0.0]
    moved: list[tuple[str, str]] = []
    b = Balancer(0.25, lambda: [Load("a", 4, 4), Load("b", 0, 0)],
                 lambda f, to: moved.append((f, to)) is None, lambda: t[0])
    assert b.step() == ("a", "b")
    t[0] = 1.0
    assert b.step() is None  # within the dwell (8 ITL targets = 2 s)
    t[0] = 2.1
    assert b.step() == ("a", "b") and b.moves == 2


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
        await until(lambda: "flow-1" not in box.router.migrator.live)
        assert 'pdbox_stream_flows_total{how="kv"} 1' in await box.metrics()

    run(check, SLOW, pd_profile())
