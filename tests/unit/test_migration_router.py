"""Streams that survive a dead worker, through the real router in front of mock workers.

The mock answers like greedy decoding: its tokens are numbered from where the
text it continues stops (" t0 t1 ..."), so a spliced answer that reads
" t0 ... t19" with one role chunk and one [DONE] is one uninterrupted answer.
"""

from __future__ import annotations

import asyncio
from typing import Any

import aiohttp
import pytest

from pdbox.devtools.mock_openai import Faults, MockConfig, MockServer
from tests.helpers import sse_events
from tests.unit.test_router_app import Box, chat, completion, pd_profile, profile, run, until

N = 20
TWO = {"aggregated-0": MockConfig(tokens=64), "aggregated-1": MockConfig(tokens=64)}


def tokens_text(n: int, start: int = 0) -> str:
    return "".join(f" t{i}" for i in range(start, start + n))


def split(events: list[Any]) -> tuple[list[dict[str, Any]], list[Any]]:
    """(chunks with choices, everything else)."""
    chunks = [e for e in events if isinstance(e, dict) and e.get("choices")]
    return chunks, [e for e in events if e not in chunks]


def record_events(box: Box) -> list[str]:
    seen: list[str] = []
    box.router.migrator.events = lambda kind, msg: seen.append(msg)
    return seen


@pytest.mark.parametrize("usage", [True, False])
def test_chat_stream_is_spliced_across_a_reset_worker(usage: bool) -> None:
    async def check(box: Box) -> None:
        seen = record_events(box)
        dead, alive = box.mocks["aggregated-0"], box.mocks["aggregated-1"]
        dead.faults = Faults(fail_after_chunks=6, count=1)  # role + 5 tokens, then a reset
        body = chat("count", stream=True, max_tokens=N)
        if usage:
            body["stream_options"] = {"include_usage": True}
        async with box.post("/v1/chat/completions", body) as r:
            assert r.status == 200
            assert r.headers["x-pdbox-decode-worker"] == "aggregated-0"
            events = sse_events(await r.read())
        chunks, rest = split(events)
        assert rest[-1] == "[DONE]" and events.count("[DONE]") == 1
        assert not [e for e in events if isinstance(e, dict) and "error" in e]
        roles = [c for c in chunks if "role" in c["choices"][0]["delta"]]
        assert len(roles) == 1 and chunks[0] is roles[0]
        assert len({(c["id"], c["created"], c["model"]) for c in chunks}) == 1
        text = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks)
        assert text == tokens_text(N)  # greedy: the continuation picks up where it broke
        assert chunks[-1]["choices"][0]["finish_reason"] == "length"
        usage_chunks = [e for e in rest if isinstance(e, dict) and "usage" in e]
        if usage:
            assert usage_chunks[0]["usage"]["completion_tokens"] == N
            assert usage_chunks[0]["id"] == chunks[0]["id"]
        else:
            assert not usage_chunks  # the client did not ask for it
        cont = alive.seen[-1]["body"]
        assert cont["continue_final_message"] is True
        assert cont["add_generation_prompt"] is False
        assert cont["max_tokens"] == N - 5
        assert cont["messages"][-1] == {"role": "assistant", "content": tokens_text(5)}
        assert alive.seen[-1]["headers"]["x-request-id"].endswith("-m1")
        text = await box.metrics()
        assert 'pdbox_migrations_total{outcome="moved"} 1' in text
        assert 'pdbox_requests_total{outcome="ok"} 1' in text
        assert f"pdbox_output_tokens_total {N}" in text
        assert "moved from aggregated-0 to aggregated-1 after 5 tokens" in seen[0]

    run(check, TWO, profile(policy="round_robin"))


@pytest.mark.parametrize(("prompt", "cont_prompt"), [
    ("Count:", "Count:" + tokens_text(4)),
    # Token ids in: the continuation is built from ids (exact), and the client
    # never sees the ids the router asked the worker for.
    ([5, 6, 7], [5, 6, 7, 1000, 1001, 1002, 1003]),
])
def test_completion_prompts_continue(prompt: Any, cont_prompt: Any) -> None:
    async def check(box: Box) -> None:
        dead, alive = box.mocks["aggregated-0"], box.mocks["aggregated-1"]
        dead.faults = Faults(fail_after_chunks=4, count=1)
        async with box.post("/v1/completions", completion(prompt, stream=True,
                                                          max_tokens=N)) as r:
            assert r.headers["x-pdbox-decode-worker"] == "aggregated-0"
            raw = await r.read()
        assert b"token_ids" not in raw
        chunks, _ = split(sse_events(raw))
        assert "".join(c["choices"][0]["text"] for c in chunks) == tokens_text(N)
        cont = alive.seen[-1]["body"]
        assert cont["prompt"] == cont_prompt and cont["max_tokens"] == N - 4

    run(check, TWO, profile(policy="round_robin"))


def test_a_stalled_stream_moves_and_the_stalled_request_is_aborted() -> None:
    async def check(box: Box) -> None:
        box.router.migrator.settings.stall_s = 0.3
        dead = box.mocks["aggregated-0"]
        dead.faults = Faults(stall_after_chunks=4, count=1)
        async with box.post("/v1/chat/completions", chat(stream=True, max_tokens=N)) as r:
            events = sse_events(await r.read())
        chunks, _ = split(events)
        text = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks)
        assert text == tokens_text(N) and events[-1] == "[DONE]"
        await until(lambda: dead.stats.disconnects == 1)

    run(check, TWO, profile(policy="round_robin"))


def test_no_worker_to_take_it_ends_with_an_explicit_error() -> None:
    async def check(box: Box) -> None:
        box.router.migrator.settings.notice_s = 0.2
        box.mocks["aggregated-0"].faults = Faults(fail_after_chunks=4)
        async with box.post("/v1/chat/completions", chat(stream=True, max_tokens=N)) as r:
            events = sse_events(await r.read())
        assert events[-1] == "[DONE]" and events.count("[DONE]") == 1
        err = events[-2]["error"]
        assert "mid-stream" in err["message"] and "no worker could take it over" in err["message"]
        text = await box.metrics()
        assert 'pdbox_migrations_total{outcome="failed"} 1' in text
        assert 'pdbox_requests_total{outcome="error_event"} 1' in text

    run(check, {"aggregated-0": MockConfig(tokens=64)})


def test_n_above_one_is_refused_for_migration() -> None:
    async def check(box: Box) -> None:
        box.mocks["aggregated-0"].faults = Faults(fail_after_chunks=4, count=1)
        async with box.post("/v1/chat/completions", chat(stream=True, max_tokens=N, n=2)) as r:
            events = sse_events(await r.read())
        assert "error" in events[-2] and events[-1] == "[DONE]"
        assert box.mocks["aggregated-1"].stats.requests == 0
        assert 'pdbox_migrations_total{outcome="refused"} 1' in await box.metrics()

    run(check, TWO, profile(policy="round_robin"))


def test_pd_decode_death_is_continued_whole_on_another_decode_worker() -> None:
    async def check(box: Box) -> None:
        box.mocks["decode-0"].faults = Faults(fail_after_chunks=6, count=1)
        body = completion("x " * 600, stream=True, max_tokens=N)
        async with box.post("/v1/completions", body) as r:
            assert r.headers["x-pdbox-pd"] == "remote"
            assert r.headers["x-pdbox-decode-worker"] == "decode-0"
            events = sse_events(await r.read())
        chunks, _ = split(events)
        assert "".join(c["choices"][0]["text"] for c in chunks) == tokens_text(N)
        cont = box.mocks["decode-1"].seen[-1]["body"]
        assert "kv_transfer_params" not in cont  # served whole, no second prefill leg
        assert box.mocks["prefill-0"].stats.prefill_legs == 1

    run(check, {"prefill-0": "prefill", "decode-0": MockConfig(tokens=64),
                "decode-1": MockConfig(tokens=64)}, pd_profile(policy="round_robin"))


def test_pd_only_decode_worker_restarting_is_waited_for() -> None:
    async def check(box: Box) -> None:
        m = box.router.migrator.settings
        m.keepalive_s = 0.1
        decode = box.router.registry.get("decode-0")
        assert decode is not None
        box.mocks["decode-0"].faults = Faults(fail_after_chunks=6, count=1)

        async def supervisor() -> None:  # notices the death, restarts the worker
            await until(lambda: box.mocks["decode-0"].stats.failed == 1)
            decode.state = "restarting"
            await asyncio.sleep(0.6)
            decode.state = "ready"

        sup = asyncio.create_task(supervisor())
        async with box.post("/v1/completions", completion("x " * 600, stream=True,
                                                          max_tokens=N)) as r:
            raw = await r.read()
        await sup
        assert b": pdbox" in raw  # keep-alive comments while it waited
        chunks, _ = split(sse_events(raw))
        assert "".join(c["choices"][0]["text"] for c in chunks) == tokens_text(N)

    # A fixed split: the prefill worker does not serve whole requests.
    run(check, {"prefill-0": "prefill", "decode-0": MockConfig(tokens=64)},
        pd_profile(soft_roles=False))


def test_pd_with_soft_roles_the_prefill_worker_takes_the_stream_whole() -> None:
    async def check(box: Box) -> None:
        box.mocks["decode-0"].faults = Faults(fail_after_chunks=6, count=1)
        async with box.post("/v1/completions", completion("x " * 600, stream=True,
                                                          max_tokens=N)) as r:
            assert r.headers["x-pdbox-decode-worker"] == "decode-0"
            raw = await r.read()
        assert b": pdbox" not in raw  # no wait: the prefill worker was ready
        chunks, _ = split(sse_events(raw))
        assert "".join(c["choices"][0]["text"] for c in chunks) == tokens_text(N)
        cont = box.mocks["prefill-0"].seen[-1]["body"]
        assert "kv_transfer_params" not in cont and cont["stream"] is True

    run(check, {"prefill-0": MockConfig(tokens=64), "decode-0": MockConfig(tokens=64)},
        pd_profile(soft_roles=True))


def test_non_stream_whose_worker_dies_before_answering_is_sent_to_another() -> None:
    async def check(box: Box) -> None:
        got: list[bytes] = []

        async def dies(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            got.append(await reader.read(65536))  # the request arrived; then the worker dies
            writer.transport.abort()

        server = await asyncio.start_server(dies, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        box.router.registry.upsert("aggregated-0", "aggregated", f"http://127.0.0.1:{port}",
                                   "ready")
        async with server:
            async with box.post("/v1/chat/completions", chat(max_tokens=N)) as r:
                assert r.status == 200, await r.text()
                assert r.headers["x-pdbox-decode-worker"] == "aggregated-1"
                answer = await r.json()
        assert got and got[0].startswith(b"POST /v1/chat/completions")
        assert answer["choices"][0]["message"]["content"] == tokens_text(N)
        assert "pdbox_retries_total 1" in await box.metrics()

    run(check, TWO, profile(policy="round_robin"))


def test_mock_stalls_on_request_and_continues_where_the_text_stops() -> None:
    async def go() -> None:
        async with MockServer(MockConfig(tokens=8)) as m, aiohttp.ClientSession() as s:
            async with s.post(f"{m.url}/mock/faults", json={"stall_after_chunks": 2,
                                                            "count": 1}) as r:
                assert r.status == 200
            body = chat("hi", stream=True, max_tokens=4)
            async with s.post(f"{m.url}/v1/chat/completions", json=body) as r:
                got = b""
                with pytest.raises(TimeoutError):
                    while True:
                        got += await asyncio.wait_for(r.content.readany(), 0.3)
            assert len(sse_events(got)) == 2  # role + one token, then nothing
            body = chat("hi", stream=True, max_tokens=3, continue_final_message=True,
                        add_generation_prompt=False)
            body["messages"].append({"role": "assistant", "content": " t0 t1"})
            async with s.post(f"{m.url}/v1/chat/completions", json=body) as r:
                chunks, _ = split(sse_events(await r.read()))
            text = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks)
            assert text == " t2 t3 t4"

    asyncio.run(go())


def test_a_stream_survives_a_crash_per_worker_move_and_more_than_three() -> None:
    """Four crashes in one answer (two per worker): four moves, one whole answer."""
    async def check(box: Box) -> None:
        seen = record_events(box)
        s = box.router.migrator.settings
        s.exclude_s = 0.05  # the mocks never read "not ready": let a failed one back soon
        s.poll_s = 0.02
        box.mocks["aggregated-0"].faults = Faults(fail_after_chunks=4, count=2)
        box.mocks["aggregated-1"].faults = Faults(fail_after_chunks=3, count=2)
        body = chat("count", stream=True, max_tokens=N, stream_options={"include_usage": True})
        async with box.post("/v1/chat/completions", body) as r:
            events = sse_events(await r.read())
        chunks, rest = split(events)
        assert not [e for e in events if isinstance(e, dict) and "error" in e], events[-3:]
        text = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks)
        assert text == tokens_text(N) and events.count("[DONE]") == 1
        assert [e for e in rest if isinstance(e, dict) and "usage" in e][0]["usage"][
            "completion_tokens"] == N
        metrics = await box.metrics()
        assert 'pdbox_migrations_total{outcome="moved"} 4' in metrics
        assert 'pdbox_moved_streams_total{moves="4"} 1' in metrics
        assert [m for m in seen if "(move 4;" in m]
        snap = box.router.snapshot()["migrations"]
        assert snap["moved"] == 4 and snap["most_moves"] == 4

    run(check, TWO, profile(policy="round_robin"))


def test_a_request_that_kills_every_worker_stops_after_two_moves_per_worker() -> None:
    async def check(box: Box) -> None:
        s = box.router.migrator.settings
        s.exclude_s = 0.05
        s.poll_s = 0.02
        for m in box.mocks.values():
            m.faults = Faults(fail_after_chunks=3)
        async with box.post("/v1/chat/completions", chat(stream=True, max_tokens=N)) as r:
            events = sse_events(await r.read())
        assert events[-1] == "[DONE]"
        assert "already moved 4 times" in events[-2]["error"]["message"]
        assert box.router.migrator.move_budget() == 4

    run(check, TWO, profile(policy="round_robin"))


def test_a_frozen_worker_fails_all_its_legs_and_leaves_the_rotation_until_it_answers() -> None:
    """One stream stalls: its worker is taken for frozen; a request still waiting
    for that worker's headers goes elsewhere at once; nothing new is sent there;
    the probe's one-token answer brings it back."""
    async def check(box: Box) -> None:
        seen: list[str] = []
        box.router.freezes.events = lambda kind, msg: seen.append(msg)
        box.router.migrator.settings.stall_s = 0.3
        box.router.migrator._stall_s = None  # the fixed bound above, not the derived one
        box.router.freezes.probe_s = 0.1
        frozen = box.mocks["aggregated-0"]
        reg = box.router.registry
        reg.get("aggregated-1").state = "starting"  # both requests land on aggregated-0
        frozen.faults = Faults(stall_after_chunks=4, count=1)
        first = asyncio.ensure_future(box.client.post(
            f"{box.url}/v1/chat/completions", json=chat("a", stream=True, max_tokens=N)))
        await until(lambda: frozen.stats.requests == 1)
        frozen.faults = Faults(hang=True, count=1)
        second = asyncio.ensure_future(box.client.post(
            f"{box.url}/v1/chat/completions", json=chat("b", stream=True, max_tokens=N)))
        await until(lambda: frozen.stats.requests == 2)
        reg.get("aggregated-1").state = "ready"
        r1 = await first
        t0 = asyncio.get_running_loop().time()
        e1 = sse_events(await r1.read())
        r2 = await asyncio.wait_for(second, 5)
        e2 = sse_events(await r2.read())
        took = asyncio.get_running_loop().time() - t0
        for events in (e1, e2):
            chunks, _ = split(events)
            text = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks)
            assert text == tokens_text(N) and events[-1] == "[DONE]", events[-3:]
        assert r2.headers["x-pdbox-decode-worker"] == "aggregated-1"
        assert took < 3  # not the request's time limit
        assert [m for m in seen if "aggregated-0 taken for frozen" in m]
        # Back in rotation once it answers the probe (its faults are spent).
        await until(lambda: reg.get("aggregated-0").state == "ready")
        assert [m for m in seen if "aggregated-0 answers again" in m]
        assert box.router.snapshot()["migrations"]["frozen"]["seen"] == 1

    run(check, TWO, profile(policy="round_robin"))


def test_a_stream_ends_with_a_timeout_event_at_the_request_limit() -> None:
    async def check(box: Box) -> None:
        box.mocks["aggregated-0"].faults = Faults(stall_after_chunks=4, count=1)
        box.router.migrator.settings.stall_s = 30.0  # the limit comes first
        box.router.migrator._stall_s = None
        t0 = asyncio.get_running_loop().time()
        async with box.post("/v1/chat/completions", chat(stream=True, max_tokens=N)) as r:
            events = sse_events(await r.read())
        took = asyncio.get_running_loop().time() - t0
        assert events[-1] == "[DONE]" and events[-2]["error"]["type"] == "timeout"
        assert 0.9 < took < 2.0
        assert 'pdbox_requests_total{outcome="timeout"} 1' in await box.metrics()

    run(check, {"aggregated-0": MockConfig(tokens=64)}, profile(request_timeout_s=1.0))


def test_a_prefill_leg_past_its_bound_falls_back_and_its_worker_is_taken_for_frozen() -> None:
    """The bound is the prefill's queue and speed, not router.prefill_timeout_s (60 s)."""
    from tests.unit.test_router_app import LONG, PD

    async def check(box: Box) -> None:
        box.router.migrator._stall_s = None
        box.router.migrator.settings.stall_s = 0.3
        box.router.freezes.probe_s = 0.1
        # A measured 20,000 tokens/s: ~675 tokens take 0.03 s, so the bound is ~0.45 s.
        box.router.decider.seed(box.router._slice_key("prefill"), 20000.0)
        box.mocks["prefill-0"].faults = Faults(hang=True, count=1)
        t0 = asyncio.get_running_loop().time()
        async with box.post("/v1/chat/completions", chat(LONG, stream=True)) as r:
            assert r.headers["x-pdbox-pd"] == "local", r.headers["x-pdbox-pd-reason"]
            events = sse_events(await r.read())
        assert events[-1] == "[DONE]" and not any("error" in e for e in events[:-1])
        assert asyncio.get_running_loop().time() - t0 < 1.5
        prefill = box.router.registry.get("prefill-0")
        frozen = box.router.snapshot()["migrations"]["frozen"]
        assert frozen["seen"] == 1 and frozen["last"][0]["worker"] == "prefill-0"
        assert 'pdbox_fallbacks_total{cause="timeout"} 1' in await box.metrics()
        await until(lambda: prefill.state == "ready")  # its probe was answered

    # A fixed gate: at the seeded speed the derived one (4,000 tokens) would keep
    # the prompt local, and the test is of the remote leg's bound.
    run(check, PD, pd_profile(pd_min_uncached_tokens=256))


@pytest.mark.parametrize("state", ["unresponsive", "failed"])
def test_a_worker_the_supervisor_finds_unresponsive_loses_its_legs_at_once(state: str) -> None:
    async def check(box: Box) -> None:
        box.router.migrator._stall_s = None
        box.router.migrator.settings.stall_s = 30.0  # its streams alone would wait long
        frozen = box.mocks["aggregated-0"]
        frozen.faults = Faults(stall_after_chunks=4, count=1)
        t0 = asyncio.get_running_loop().time()
        async with box.post("/v1/chat/completions", chat(stream=True, max_tokens=N)) as r:
            await until(lambda: frozen.stats.requests == 1)
            await asyncio.sleep(0.2)
            box.router.registry.get("aggregated-0").state = state
            box.router.capacity_changed()
            events = sse_events(await r.read())
        chunks, _ = split(events)
        text = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks)
        assert text == tokens_text(N) and events[-1] == "[DONE]"
        assert asyncio.get_running_loop().time() - t0 < 3

    run(check, TWO, profile(policy="round_robin"))


def test_a_request_with_no_worker_ready_waits_for_one_coming_back() -> None:
    async def check(box: Box) -> None:
        w = box.router.registry.get("aggregated-0")
        w.state = "restarting"

        async def back() -> None:
            await asyncio.sleep(0.5)
            w.state = "ready"

        task = asyncio.ensure_future(back())
        async with box.post("/v1/chat/completions", chat(stream=True, max_tokens=N)) as r:
            assert r.status == 200
            events = sse_events(await r.read())
        await task
        assert events[-1] == "[DONE]" and not any("error" in e for e in events[:-1])
        w.state = "failed"  # and none coming: 503 at once
        async with box.post("/v1/chat/completions", chat(max_tokens=N)) as r:
            assert r.status == 503

    run(check, {"aggregated-0": MockConfig(tokens=64)})
