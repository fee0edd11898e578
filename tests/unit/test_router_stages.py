"""Each stage of the router's request path on its own (pdbox/router/app.py lists them)."""

from __future__ import annotations

import asyncio
import dataclasses
import json
from typing import Any

import pytest

from pdbox.router import openai_errors as oe
from pdbox.router.admission import Admission
from pdbox.router.admit import UNREPORTED_SLOTS, AdmitStage, Refused, worker_slots
from pdbox.router.backends import Registry
from pdbox.router.choose import PathChooser, Reply
from pdbox.router.match import PrefixMatch
from pdbox.router.metrics import RouterMetrics
from pdbox.router.migration import Splice
from pdbox.router.parse import Call, RequestParser, priority_of
from pdbox.router.policy import PDDecider, Picker
from pdbox.router.prefix_index import ApproxIndex, block_hashes
from pdbox.router.prompt import PromptStage, text_hashes
from pdbox.router.soft_roles import Settings, SoftRoles
from pdbox.router.sse_meter import SseMeter
from pdbox.router.tokenize import CharBlockTokenizer

# ------------------------------------------------------------------- parse


class FakeContent:
    def __init__(self, data: bytes) -> None:
        self.data = data

    async def read(self, n: int) -> bytes:
        return self.data[:n]


class FakeRequest:
    def __init__(self, body: Any, **headers: str) -> None:
        self.data = json.dumps(body).encode()
        self.headers = {"Content-Type": "application/json", **headers}
        self.content_length = len(self.data)
        self.content = FakeContent(self.data)


def parse(body: Any, kind: str = "chat", **headers: str) -> Call:
    parser = RequestParser(64 * 1024, 4096, ["smollm2"], priority_scheduling=False)
    return asyncio.run(parser.parse(FakeRequest(body, **headers), kind, t0=1.0))  # type: ignore[arg-type]


CHAT = {"model": "smollm2", "messages": [{"role": "user", "content": "hi"}]}


def test_parse_reads_every_field_the_stages_need_once() -> None:
    call = parse({**CHAT, "user": "u1", "stream": True}, **{
        "x-pdbox-priority": "batch", "X-Request-Id": "r-1", "x-pdbox-pd": " Remote ",
        "x-stainless-retry-count": "2"})
    assert (call.kind, call.path, call.priority, call.request_id) == (
        "chat", "/v1/chat/completions", "batch", "r-1")
    assert call.session_key == "u1" and call.stream and call.retried
    assert call.force == "remote" and call.forced and call.t0 == 1.0
    fresh = parse(CHAT, "chat")
    assert fresh.request_id.startswith("pdbox-") and not fresh.forced and not fresh.retried


def test_parse_refuses_an_unknown_model_and_a_bad_priority() -> None:
    with pytest.raises(oe.BadRequest) as e:
        parse({**CHAT, "model": "other"})
    assert e.value.status == 404
    with pytest.raises(oe.BadRequest) as e:
        parse(CHAT, **{"x-pdbox-priority": "urgent"})
    assert e.value.status == 400
    assert priority_of("", {"priority": 3}) == "batch"
    assert priority_of("", {}) == "interactive"


# ------------------------------------------------------------------ prompt


def call_for(body: dict[str, Any], kind: str = "chat") -> Call:
    return Call(kind, body, body.get("max_tokens"), "interactive", "r", None, "", False, 0.0)


def test_text_blocks_share_the_system_prompt_and_equal_a_full_pass() -> None:
    tok = CharBlockTokenizer()
    stage = PromptStage(tok, 16, 100_000)
    system = {"role": "system", "content": "You are terse. " * 50}
    bodies = [{"model": "m", "messages": [system, {"role": "user", "content": f"q{i}" * 40}]}
              for i in range(3)]
    prompts = [stage.prepare(call_for(b)) for b in bodies]
    for b, p in zip(bodies, prompts, strict=True):
        text = tok.render_chat(b["messages"])
        assert p.units == len(text) and p.tokens == len(text) // 4
        assert p.hashes == text_hashes(text, stage.block_size)  # the cache changes nothing
    shared = len(tok.render_pieces([system])[0]) // stage.block_size
    assert prompts[0].hashes[:shared] == prompts[1].hashes[:shared]
    assert prompts[0].hashes[shared + 1:] != prompts[1].hashes[shared + 1:]
    assert len(stage._heads) == 1  # one system prompt, hashed once


def test_prompt_counts_every_prompt_of_a_batch_and_checks_each_context() -> None:
    stage = PromptStage(CharBlockTokenizer(), 16, 100)
    p = stage.prepare(call_for({"prompt": ["a" * 64, "b" * 200]}, "completions"))
    assert p.units == 64 and p.est_tokens == 264 and len(p.hashes) == 1
    ids = stage.prepare(call_for({"prompt": list(range(70))}, "completions"))
    assert ids.tokens == 70 // 4 and ids.hashes == block_hashes(list(range(70)), 64)
    with pytest.raises(oe.BadRequest, match="prompt 1 has 100 tokens"):
        stage.prepare(call_for({"prompt": ["a", "b" * 400]}, "completions"))


# ------------------------------------------------------------------- admit


def test_a_worker_takes_what_it_reports() -> None:
    reg = Registry()
    a = reg.upsert("aggregated-0", "aggregated", "http://a", "ready")
    b = reg.upsert("aggregated-1", "aggregated", "http://b", "ready")
    adm = Admission(queue_bound=4, max_inflight=1)
    stage = AdmitStage(adm, RouterMetrics(), 0, lambda: reg.of_roles(("aggregated",)))
    assert worker_slots(a) == UNREPORTED_SLOTS  # never seen full: vLLM's default
    stage.resize()
    assert adm.max_inflight == 2 * UNREPORTED_SLOTS
    a.max_running = 24  # seen with a waiting queue while running 24
    stage.resize()
    assert adm.max_inflight == 24 + UNREPORTED_SLOTS
    fixed = AdmitStage(adm, RouterMetrics(), 8, lambda: [a, b])
    fixed.resize()
    assert adm.max_inflight == 16  # a profile's cap is a cap


def test_admit_answers_429_with_both_retry_headers() -> None:
    async def go() -> None:
        adm = Admission(queue_bound=0, max_inflight=1)
        stage = AdmitStage(adm, RouterMetrics(), 1, lambda: [])
        c = call_for(CHAT)
        from pdbox.router.prompt import Prompt

        p = Prompt(10, 2, [], 10)
        t = await stage.acquire(c, p)
        with pytest.raises(Refused) as e:
            await stage.acquire(c, p)
        assert e.value.response.status == 429
        assert {"Retry-After", "retry-after-ms"} <= set(e.value.response.headers)
        stage.release(t)
        assert adm.inflight == 0 and not stage.metrics.waiting_since

    asyncio.run(go())


# ------------------------------------------------------------------ choose


def chooser(workers: dict[str, str], pd: bool = False) -> tuple[PathChooser, Registry]:
    reg = Registry()
    for wid, role in workers.items():
        reg.upsert(wid, role, f"http://{wid}", "ready")
    prompts = PromptStage(CharBlockTokenizer(), 16, 4096)
    match = PrefixMatch(reg, ApproxIndex(1000), None)
    soft = SoftRoles(Settings(enabled=False, gate_tokens=256, hold_s=10, max_streams=8))
    roles = ("decode", "aggregated")
    return PathChooser(reg, match, prompts, Picker(), Picker(), PDDecider(min_uncached_tokens=256, mode="threshold"),
                       soft, pd, lambda: roles, lambda role: role, "prefix"), reg


def test_choose_filters_scores_and_picks_the_worker_holding_the_prefix() -> None:
    ch, reg = chooser({"aggregated-0": "aggregated", "aggregated-1": "aggregated"})
    body = {"messages": [{"role": "user", "content": "x" * 300}]}
    prompt = ch.prompts.prepare(call_for(body))
    ch.match.record("aggregated-1", prompt.hashes)
    route = ch.choose(call_for(body), prompt, set(), 1)
    assert route.decode.id == "aggregated-1" and route.pd == "aggregated"
    assert route.matched_tokens == prompt.tokens - route.uncached > 0
    assert "holds" in route.reason and not route.last_try
    other = ch.choose(call_for(body), prompt, {"aggregated-1"}, 2)
    assert other.decode.id == "aggregated-0" and other.last_try
    with pytest.raises(Reply) as e:
        ch.choose(call_for(body), prompt, {"aggregated-0", "aggregated-1"}, 3)
    assert e.value.response.status == 503 and e.value.outcome == "unavailable"


def test_choose_sends_a_long_prompt_to_the_prefill_worker_and_checks_a_forced_path() -> None:
    ch, _ = chooser({"prefill-0": "prefill", "decode-0": "decode"}, pd=True)
    body = {"messages": [{"role": "user", "content": "y" * 4000}]}
    prompt = ch.prompts.prepare(call_for(body))
    route = ch.choose(call_for(body), prompt, set(), 1)
    assert route.pd == "remote" and route.prefill is not None and route.prefill.id == "prefill-0"
    bad = dataclasses.replace(call_for(body), force="sideways")
    with pytest.raises(Reply) as e:
        ch.choose(bad, prompt, set(), 1)
    assert e.value.response.status == 400 and e.value.outcome == "bad_request"


# ------------------------------------------------------------------- relay


def sse(obj: Any) -> bytes:
    return b"data: " + json.dumps(obj, separators=(",", ":")).encode() + b"\n\n"


ROLE = sse({"id": "c", "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}}]})
TOK = sse({"id": "c", "choices": [{"index": 0, "delta": {"content": "a"}}]})
USAGE = sse({"id": "c", "choices": [], "usage": {"completion_tokens": 2, "prompt_tokens": 1}})


def test_meter_forwards_whole_reads_as_they_came() -> None:
    m = SseMeter(strip_usage=True)
    read = ROLE + TOK + TOK
    out = m.feed(read)
    assert out.forward is read or out.forward == read  # no rebuild when nothing is dropped
    assert out.tokens == 2
    assert m.feed(USAGE + b"data: [DONE]\n\n").forward == b"data: [DONE]\n\n"
    assert m.total_tokens == 2


def test_a_first_leg_is_read_only_when_asked() -> None:
    sp = Splice({"model": "m", "messages": [{"role": "user", "content": "q"}], "stream": True,
                 "max_tokens": 5}, "chat", 3)
    assert sp.feed(ROLE + TOK + TOK) == ROLE + TOK + TOK
    assert b"".join(sp._unread) == ROLE + TOK + TOK  # kept as the bytes that came
    assert sp.started and b"".join(sp._unread) == TOK  # read as far as the first token
    sp.feed(TOK)
    assert sp.started and b"".join(sp._unread) == TOK + TOK
    sp.begin_leg()  # the worker failed: everything is read, in order
    assert sp.tokens == 3 and "".join(sp.text) == "aaa"
    assert sp.continuation()["max_tokens"] == 2


def test_a_scrape_that_shows_a_queue_teaches_the_workers_limit() -> None:
    import aiohttp

    from pdbox.devtools.mock_openai import Faults, MockConfig, MockServer
    from pdbox.router.backends import scrape_once

    async def go() -> None:
        m = MockServer(MockConfig(max_num_seqs=1))
        await m.start()
        m.faults = Faults(hang=True)
        try:
            async with aiohttp.ClientSession() as s:
                b = Registry().upsert("aggregated-0", "aggregated", m.url, "ready")
                await scrape_once(s, b)
                assert b.max_running == 0 and worker_slots(b) == UNREPORTED_SLOTS
                b = Registry().upsert("aggregated-0", "aggregated", m.url, "ready",
                                      max_num_seqs=1)  # as the fleet knows it
                assert worker_slots(b) == 1
                held = [asyncio.create_task(s.post(f"{m.url}/v1/completions",
                                                   json={"model": "smollm2", "prompt": "x"}))
                        for _ in range(2)]
                while m.stats.inflight < 2:
                    await asyncio.sleep(0.01)
                await scrape_once(s, b)
                assert (b.running, b.waiting, b.max_running) == (1, 1, 1)
                assert worker_slots(b) == 1
                for t in held:
                    t.cancel()
                await asyncio.gather(*held, return_exceptions=True)
        finally:
            await m.stop()

    asyncio.run(go())


# -------------------------------------------------------------------- legs


def test_the_decode_leg_sends_the_clients_bytes_with_the_routers_keys_appended() -> None:
    from pdbox.router.legs import body_bytes
    from pdbox.router.sse_meter import with_usage

    raw = b'{"model": "smollm2", "stream": true, "messages": [{"role": "user", "content": "hi"}]} '
    body = json.loads(raw)
    call = dataclasses.replace(call_for(body), raw=raw)
    sent = with_usage(body)
    out = body_bytes(call, sent)
    assert out.startswith(raw.rstrip()[:-1]) and json.loads(out) == sent
    assert body_bytes(call, body) is raw  # unchanged: the very bytes
    changed = {**body, "stream": False}
    assert json.loads(body_bytes(call, changed)) == changed
    dropped = {k: v for k, v in body.items() if k != "stream"}
    assert json.loads(body_bytes(call, dropped)) == dropped
    assert json.loads(body_bytes(dataclasses.replace(call, raw=b""), sent)) == sent


def test_the_models_tokenizer_encodes_a_long_shared_head_once(tmp_path: Any) -> None:
    from pdbox.router.tokenize import PromptTokenizer
    from tests.unit.test_prefix_index import make_model_dir

    pt = PromptTokenizer.from_model_dir(make_model_dir(tmp_path))
    stage = PromptStage(pt, 4, 100_000)
    system = {"role": "system", "content": "You are helpful " * 40}
    calls = 0
    encode = pt.encode_rendered

    def counted(text: str) -> list[int]:
        nonlocal calls
        calls += 1
        return encode(text)

    pt.encode_rendered = counted  # type: ignore[method-assign]
    for i, q in enumerate(["hello there", "how is it", "hello"]):
        msgs = [system, {"role": "user", "content": q}]
        p = stage.prepare(call_for({"messages": msgs}))
        ids = encode(pt.render_chat(msgs))
        assert p.units == len(ids) and p.hashes == block_hashes(ids, 4)
        assert calls == (3 if i == 0 else 3 + i)  # checked once, then only the rest
    short = [{"role": "user", "content": "hello"}]
    assert stage.prepare(call_for({"messages": short})).units == len(encode(pt.render_chat(short)))


# ------------------------------------------------------------------ record


def test_record_keeps_the_decision_and_feeds_the_figures() -> None:
    import time

    from pdbox.router.record import Decision, Recorder
    from pdbox.router.soft_roles import RoleMix

    metrics = RouterMetrics()
    match = PrefixMatch(Registry(), ApproxIndex(100), None)
    rec = Recorder(metrics, RoleMix(), match)
    rec.routed(Decision("r-1", "aggregated-0", None, "aggregated", "prefix: ...", 40, 16), [7, 8])
    assert rec.decisions[-1].request_id == "r-1"
    assert match.match(["aggregated-0"], [7, 8]) == {"aggregated-0": 2}  # its blocks are there
    assert metrics.prompt_tokens.total() == 40 and metrics.prefix_tokens.total() == 16
    rec.ttft(0.05, time.monotonic(), "stream")
    rec.stream_done(time.monotonic() - 0.2, counted=3, exact=5)
    assert metrics.output_tokens.total() == 2  # the usage chunk's count tops the events up
    assert metrics.requests.get(outcome="ok") == 1 and metrics.e2e.n == 1
    assert metrics.ttft_source.get(source="stream") == 1


def test_a_non_streamed_ttft_the_subtraction_loses_comes_from_the_engine() -> None:
    """e2e less (tokens - 1) x a mean ITL inflated by other streams' stalls is <= 0:
    the worker's own TTFT over the window stands in."""
    import json as _json
    import time as _time

    from pdbox.router.backends import Backend
    from pdbox.router.metrics import RouterMetrics
    from pdbox.router.record import Recorder

    class Worker(Backend):
        def engine_itl_s(self, since: float) -> float | None:
            return 0.07

        def engine_ttft_s(self, since: float) -> float | None:
            return 0.09

    m = RouterMetrics()
    rec = Recorder(m, None, None)  # type: ignore[arg-type]  (answer() reads neither)
    w = Worker(id="decode-0", role="decode", url="http://127.0.0.1:1")
    body = _json.dumps({"usage": {"completion_tokens": 48}, "choices": [{}]}).encode()
    rec.answer(w, body, _time.monotonic() - 3.0)  # 47 x 0.07 = 3.29 s > 3.0 s
    assert m.ttft.percentile(0.5) == pytest.approx(0.09)
    assert m.ttft_source.get(source="engine-window") == 1


def _seen(b, running: int, waiting: int, kv: float) -> int:
    from pdbox.router.backends import learn_limit

    b.running, b.waiting, b.kv_usage = running, waiting, kv
    learn_limit(b)
    return b.max_running


def test_a_queue_behind_a_prompt_chunk_teaches_no_limit() -> None:
    """With chunked prefill a request waits while another's chunk fills the step's
    token budget: 1 running, 1 waiting, cache nearly empty. Taking 1 as the
    worker's limit would hold admission at one request for good."""
    b = Registry().upsert("hybrid-0", "decode", "http://w", "ready", max_num_seqs=128)
    assert _seen(b, 1, 1, 0.02) == 0 and worker_slots(b) == 128
    assert _seen(b, 128, 3, 0.3) == 128  # at its max_num_seqs: a real limit
    b2 = Registry().upsert("hybrid-1", "decode", "http://w", "ready")  # max_num_seqs unknown
    assert _seen(b2, 2, 1, 0.1) == 0 and worker_slots(b2) == UNREPORTED_SLOTS


def test_a_full_kv_cache_teaches_a_limit_that_is_dropped_once_room_returns() -> None:
    b = Registry().upsert("decode-0", "decode", "http://w", "ready", max_num_seqs=128)
    assert _seen(b, 12, 4, 0.97) == 12 and worker_slots(b) == 12  # long prompts fill it
    assert _seen(b, 10, 0, 0.5) == 12  # below the limit: nothing new learnt
    assert _seen(b, 12, 0, 0.4) == 0 and worker_slots(b) == 128  # at it, no queue, room
