"""The router's HTTP layer over real sockets, in front of mock vLLM workers.

Each test starts mock workers on free ports and a `Router` on an aiohttp
server in the same event loop, then talks to it with an aiohttp client.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import socket
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import aiohttp
from aiohttp import web

from pdbox import config
from pdbox.devtools.mock_openai import Faults, MockConfig, MockServer
from pdbox.router.app import Router
from pdbox.router.backends import Registry
from pdbox.router.tokenize import CharBlockTokenizer
from tests.helpers import sse_events

MAX_BODY = 64 * 1024
LONG = "The quick brown fox jumps over the lazy dog. " * 60  # ~2700 chars, ~675 tokens


@dataclass
class Box:
    router: Router
    url: str
    mocks: dict[str, MockServer]  # worker id -> mock
    client: aiohttp.ClientSession

    def post(self, path: str, body: Any, **kw: Any) -> Any:
        return self.client.post(f"{self.url}{path}", json=body, **kw)

    async def metrics(self) -> str:
        async with self.client.get(f"{self.url}/metrics") as r:
            assert r.status == 200
            return await r.text()

    def requests_seen(self) -> int:
        return sum(m.stats.requests for m in self.mocks.values())


def profile(name: str = "cpu-aggregated", **router: Any) -> config.Profile:
    p = config.load(name)
    settings: dict[str, Any] = {"kv_events": False, "max_body_bytes": MAX_BODY,
                                "pd_decider": "threshold"}
    settings.update(router)
    return dataclasses.replace(p, router=dataclasses.replace(p.router, **settings))


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(fn: Callable[[Box], Awaitable[None]], workers: dict[str, str | MockConfig | None],
        prof: config.Profile | None = None, timeout: float = 30.0) -> None:
    """Start one mock per worker id (value: role, or a MockConfig for an aggregated worker,
    or "role:down" for a URL nobody listens on), a router in front, and run `fn`."""

    async def go() -> None:
        p = prof or profile()
        registry = Registry()
        mocks: dict[str, MockServer] = {}
        for wid, spec in workers.items():
            role = wid.rsplit("-", 1)[0]
            if isinstance(spec, str) and spec.endswith(":down"):
                registry.upsert(wid, role, f"http://127.0.0.1:{closed_port()}", "ready")
                continue
            m = MockServer(spec if isinstance(spec, MockConfig) else MockConfig(tokens=4))
            await m.start()
            mocks[wid] = m
            registry.upsert(wid, role, m.url, "ready")
        router = Router(p, registry, CharBlockTokenizer(), [p.model.served_name])
        router.capacity_changed()
        await router.start()
        app = web.Application(client_max_size=p.router.max_body_bytes + 1)
        router.add_routes(app)
        runner = web.AppRunner(app, handler_cancellation=True, access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        try:
            async with aiohttp.ClientSession() as client:
                box = Box(router, f"http://127.0.0.1:{port}", mocks, client)
                await asyncio.wait_for(fn(box), timeout)
        finally:
            await runner.cleanup()
            await router.close()
            for m in mocks.values():
                await m.stop()

    asyncio.run(go())


async def until(cond: Callable[[], bool], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.01)


def chat(content: str = "hello", **extra: Any) -> dict[str, Any]:
    return {"model": "smollm2", "messages": [{"role": "user", "content": content}], **extra}


def completion(prompt: str = "hello", **extra: Any) -> dict[str, Any]:
    return {"model": "smollm2", "prompt": prompt, **extra}


ONE = {"aggregated-0": None}
TWO = {"aggregated-0": None, "aggregated-1": None}

# ------------------------------------------------------------------ bad input


async def _expect_error(box: Box, status: int, path: str = "/v1/chat/completions", *,
                        body: Any = None, data: bytes | None = None,
                        headers: dict[str, str] | None = None) -> dict[str, Any]:
    kw: dict[str, Any] = {"headers": {"Content-Type": "application/json", **(headers or {})}}
    kw["data"] = data if data is not None else json.dumps(body).encode()
    async with box.client.post(f"{box.url}{path}", **kw) as r:
        assert r.status == status, await r.text()
        err = (await r.json())["error"]
    assert isinstance(err["message"], str) and err["message"]
    assert {"type", "param", "code"} <= set(err)
    return err


def test_bad_input_is_4xx_in_openai_shape_and_reaches_no_worker() -> None:
    async def check(box: Box) -> None:
        await _expect_error(box, 400, data=b'{"model": "smollm2", "messages": [')
        err = await _expect_error(box, 400, body={"messages": [{"role": "user", "content": "x"}]})
        assert err["param"] == "model"
        err = await _expect_error(box, 400, body={"model": "smollm2"})
        assert err["param"] == "messages"
        await _expect_error(box, 400, body={"model": "smollm2", "messages": []})
        await _expect_error(box, 400, "/v1/completions", body={"model": "smollm2"})
        await _expect_error(box, 400, body=[1, 2])
        err = await _expect_error(box, 404, body=chat(model="gpt-4"))
        assert err["code"] == "model_not_found"
        err = await _expect_error(box, 400, body=chat("word " * 4000))  # ~5000 tokens > 4096
        assert err["param"] == "messages"
        await _expect_error(box, 400, "/v1/completions", body=completion("x" * 20000))
        for mt in (-1, 0, 10**12, "12", 1.5, True):
            err = await _expect_error(box, 400, body=chat(max_tokens=mt))
            assert err["param"] == "max_tokens"
        # Prompt fits but prompt + max_tokens does not.
        await _expect_error(box, 400, body=chat("word " * 2000, max_tokens=4000))
        await _expect_error(box, 400, body=chat(stream="yes"))
        await _expect_error(box, 400, body=chat(n=100))
        await _expect_error(box, 415, data=json.dumps(chat()).encode(),
                            headers={"Content-Type": "text/plain"})
        await _expect_error(box, 413, data=json.dumps(chat("x" * MAX_BODY)).encode())
        await _expect_error(box, 400, data=b'{"model": "smollm2\xff\xfe", "messages": []}')
        await _expect_error(box, 400, data=b"[" * 20_000 + b"]" * 20_000)
        await _expect_error(box, 400, data=b'{"a":' * 8_000 + b"1" + b"}" * 8_000)
        await _expect_error(box, 400, body=chat(), headers={"x-pdbox-priority": "urgent"})
        await _expect_error(box, 400, body={"model": "smollm2", "messages": ["hi"]})
        assert box.requests_seen() == 0
        text = await box.metrics()
        assert 'pdbox_requests_total{outcome="bad_request"}' in text

    run(check, ONE)


def test_body_over_limit_without_content_length() -> None:
    async def check(box: Box) -> None:
        async def chunks() -> Any:
            payload = json.dumps(chat("y" * (2 * MAX_BODY))).encode()
            for i in range(0, len(payload), 8192):
                yield payload[i:i + 8192]

        async with box.client.post(f"{box.url}/v1/chat/completions", data=chunks(),
                                   headers={"Content-Type": "application/json"}) as r:
            assert r.status == 413
            assert "limit" in (await r.json())["error"]["message"]
        assert box.requests_seen() == 0

    run(check, ONE)


# --------------------------------------------------------------- pass-through


def test_non_stream_passes_every_field_through() -> None:
    async def check(box: Box) -> None:
        body = chat(max_tokens=3, top_k=7, logit_bias={"42": -100}, temperature=0.3,
                    seed=11, repetition_penalty=1.1, stop=["\n"], user="u1")
        async with box.post("/v1/chat/completions", body,
                            headers={"X-Request-Id": "req-1"}) as r:
            assert r.status == 200
            assert r.headers["x-request-id"] == "req-1"
            assert r.headers["x-pdbox-pd"] == "aggregated"
            assert r.headers["x-pdbox-decode-worker"] == "aggregated-0"
            data = await r.json()
        assert data["id"] == "chatcmpl-req-1"
        assert data["choices"][0]["message"]["content"] == " t0 t1 t2"
        seen = box.mocks["aggregated-0"].seen[-1]
        assert seen["body"] == body
        assert seen["headers"]["x-request-id"] == "req-1"

    run(check, ONE)


def test_stream_passes_through_chunk_by_chunk() -> None:
    async def check(box: Box) -> None:
        body = completion(stream=True, stream_options={"include_usage": True}, top_k=3,
                          logit_bias={"7": 5})
        async with box.post("/v1/completions", body) as r:
            assert r.status == 200
            assert r.content_type == "text/event-stream"
            assert r.headers["x-pdbox-pd"] == "aggregated"
            ev = sse_events(await r.read())
        assert ev[-1] == "[DONE]"
        texts = [e["choices"][0]["text"] for e in ev[:-1] if e["choices"]]
        assert texts == [f" t{i}" for i in range(8)]
        assert ev[-2]["usage"]["completion_tokens"] == 8
        assert box.mocks["aggregated-0"].seen[-1]["body"] == body
        text = await box.metrics()
        assert 'pdbox_requests_total{outcome="ok"} 1' in text
        assert "pdbox_ttft_seconds_count 1" in text
        assert "pdbox_itl_seconds_count 7" in text  # 8 token chunks, then usage and [DONE]

    run(check, {"aggregated-0": MockConfig(tokens=8, itl_ms=20)})


def test_upstream_4xx_is_passed_through() -> None:
    async def check(box: Box) -> None:
        box.mocks["aggregated-0"].faults = Faults(fail_status=400)
        async with box.post("/v1/chat/completions", chat()) as r:
            assert r.status == 400
            assert (await r.json())["error"]["message"] == "Injected failure."
        assert box.mocks["aggregated-0"].stats.requests == 1  # 4xx is not retried

    run(check, TWO)


# ------------------------------------------------------- models, health, metrics


def test_models_health_metrics() -> None:
    async def check(box: Box) -> None:
        async with box.client.get(f"{box.url}/v1/models") as r:
            data = await r.json()
        assert [m["id"] for m in data["data"]] == ["smollm2"]
        assert data["data"][0]["max_model_len"] == 4096
        async with box.client.get(f"{box.url}/health") as r:
            assert r.status == 200 and (await r.json())["status"] == "ok"
        async with box.post("/v1/chat/completions", chat(stream=True)) as r:
            await r.read()
        text = await box.metrics()
        for family in ("pdbox_requests_total", "pdbox_ttft_seconds", "pdbox_itl_seconds",
                       "pdbox_e2e_seconds", "pdbox_routed_total", "pdbox_prefix_match_tokens_total",
                       "pdbox_pd_total", "pdbox_fallbacks_total", "pdbox_rejected_total",
                       "pdbox_retries_total", "pdbox_inflight", "pdbox_queued"):
            assert f"# TYPE {family} " in text, family
        assert 'pdbox_routed_total{leg="decode",worker="aggregated-0"} 1' in text
        assert 'pdbox_pd_total{path="aggregated"} 1' in text
        assert 'pdbox_e2e_seconds_bucket{le="+Inf"} 1' in text
        box.router.accepting = False
        async with box.client.get(f"{box.url}/health") as r:
            assert r.status == 503
        # A request waits for a worker on its way (test_migration_router.py); with
        # none coming it is answered 503 at once.
        box.router.registry.backends["aggregated-0"].state = "failed"
        async with box.post("/v1/chat/completions", chat()) as r:
            assert r.status == 503 and r.headers["Retry-After"]

    run(check, ONE)


def test_health_is_503_without_workers() -> None:
    async def check(box: Box) -> None:
        box.router.registry.backends["aggregated-0"].state = "starting"
        async with box.client.get(f"{box.url}/health") as r:
            assert r.status == 503
        # A request waits for a worker on its way (test_migration_router.py); with
        # none coming it is answered 503 at once.
        box.router.registry.backends["aggregated-0"].state = "failed"
        async with box.post("/v1/chat/completions", chat()) as r:
            assert r.status == 503
            assert (await r.json())["error"]["type"] == "service_unavailable"

    run(check, ONE)


# ------------------------------------------------------------------------ P/D

PD = {"prefill-0": "prefill", "decode-0": "decode"}


def pd_profile(**router: Any) -> config.Profile:
    return profile("cpu-tiny", **router)


def test_pd_two_legs_share_the_request_id() -> None:
    async def check(box: Box) -> None:
        body = completion(LONG, stream=True, max_tokens=4, top_k=5)
        async with box.post("/v1/completions", body, headers={"X-Request-Id": "pd-1"}) as r:
            assert r.status == 200
            assert r.headers["x-pdbox-pd"] == "remote"
            assert r.headers["x-pdbox-prefill-worker"] == "prefill-0"
            assert r.headers["x-pdbox-decode-worker"] == "decode-0"
            ev = sse_events(await r.read())
        assert ev[-1] == "[DONE]"
        pre, dec = box.mocks["prefill-0"], box.mocks["decode-0"]
        p_seen, d_seen = pre.seen[-1], dec.seen[-1]
        assert p_seen["t"] < d_seen["t"]
        assert p_seen["body"]["max_tokens"] == 1 and p_seen["body"]["stream"] is False
        assert p_seen["body"]["kv_transfer_params"]["do_remote_decode"] is True
        assert p_seen["body"]["top_k"] == 5
        kv = d_seen["body"]["kv_transfer_params"]
        assert kv["do_remote_prefill"] is True and kv["remote_block_ids"]
        assert kv["remote_engine_id"] == pre.config.engine_id
        assert d_seen["body"]["stream"] is True and d_seen["body"]["max_tokens"] == 4
        assert p_seen["headers"]["x-request-id"] == d_seen["headers"]["x-request-id"] == "pd-1"
        assert dec.stats.transfers == 1 and pre.stats.prefill_legs == 1
        text = await box.metrics()
        assert 'pdbox_pd_total{path="remote"} 1' in text
        assert 'pdbox_routed_total{leg="prefill",worker="prefill-0"} 1' in text

    run(check, PD, pd_profile())


def test_pd_short_prompt_prefills_locally() -> None:
    async def check(box: Box) -> None:
        async with box.post("/v1/completions", completion("short")) as r:
            assert r.status == 200 and r.headers["x-pdbox-pd"] == "local"
        assert box.mocks["prefill-0"].stats.requests == 0
        assert "kv_transfer_params" not in box.mocks["decode-0"].seen[-1]["body"]

    run(check, PD, pd_profile())


def _fallback_check(cause: str, setup: Callable[[Box], None] | None = None
                    ) -> Callable[[Box], Awaitable[None]]:
    async def check(box: Box) -> None:
        if setup:
            setup(box)
        t0 = time.monotonic()
        async with box.post("/v1/chat/completions", chat(LONG, stream=True)) as r:
            assert r.status == 200
            assert r.headers["x-pdbox-pd"] == "local"
            assert "fallback" in r.headers["x-pdbox-pd-reason"]
            ev = sse_events(await r.read())
        assert ev[-1] == "[DONE]" and not any("error" in e for e in ev[:-1])
        assert time.monotonic() - t0 < 5
        assert "kv_transfer_params" not in box.mocks["decode-0"].seen[-1]["body"]
        assert box.mocks["decode-0"].stats.transfers == 0
        text = await box.metrics()
        assert f'pdbox_fallbacks_total{{cause="{cause}"}} 1' in text
        assert 'pdbox_pd_total{path="local"} 1' in text

    return check


def test_pd_prefill_500_falls_back_to_local() -> None:
    def fail(box: Box) -> None:
        box.mocks["prefill-0"].faults = Faults(fail_status=500)

    run(_fallback_check("error", fail), PD, pd_profile())


def test_pd_prefill_down_falls_back_to_local() -> None:
    run(_fallback_check("unreachable"), {"prefill-0": "prefill:down", "decode-0": "decode"},
        pd_profile())


def test_pd_prefill_hang_times_out_and_falls_back() -> None:
    def hang(box: Box) -> None:
        box.mocks["prefill-0"].faults = Faults(hang=True)

    async def check(box: Box) -> None:
        await _fallback_check("timeout", hang)(box)
        await until(lambda: box.mocks["prefill-0"].stats.disconnects == 1)

    run(check, PD, pd_profile(prefill_timeout_s=0.5))


# ------------------------------------------------------------------ failures


def test_5xx_before_first_byte_is_retried_on_the_other_worker() -> None:
    async def check(box: Box) -> None:
        bad, good = box.mocks["aggregated-0"], box.mocks["aggregated-1"]
        bad.faults = Faults(fail_status=500)
        for stream in (False, True):
            async with box.post("/v1/chat/completions", chat(stream=stream)) as r:
                assert r.status == 200
                assert r.headers["x-pdbox-decode-worker"] == "aggregated-1"
                await r.read()
        assert bad.stats.requests >= 1
        assert good.stats.completed == 2
        text = await box.metrics()
        assert f"pdbox_retries_total {bad.stats.requests}" in text

    run(check, TWO, profile(policy="round_robin"))


def test_worker_down_is_retried_on_the_other_worker() -> None:
    async def check(box: Box) -> None:
        for _ in range(3):
            async with box.post("/v1/completions", completion()) as r:
                assert r.status == 200
                assert r.headers["x-pdbox-decode-worker"] == "aggregated-1"

    run(check, {"aggregated-0": "aggregated:down", "aggregated-1": None},
        profile(policy="round_robin"))


def test_every_worker_failing_answers_5xx_once_retried() -> None:
    async def check(box: Box) -> None:
        for m in box.mocks.values():
            m.faults = Faults(fail_status=503)
        async with box.post("/v1/chat/completions", chat()) as r:
            assert r.status == 503
            assert "error" in await r.json()
        assert box.requests_seen() == 2  # the first try and one retry

    run(check, TWO)


def test_reset_after_first_byte_ends_stream_with_error_event() -> None:
    async def check(box: Box) -> None:
        # Migration off: the bare failure path (tests/unit/test_migration_router.py moves it).
        box.router.migrator.settings.max_moves = 0
        box.mocks["aggregated-0"].faults = Faults(fail_after_chunks=3)
        async with box.post("/v1/chat/completions", chat(stream=True)) as r:
            assert r.status == 200
            ev = sse_events(await r.read())
        assert ev[-1] == "[DONE]"
        assert "error" in ev[-2] and ev[-2]["error"]["type"] == "upstream_error"
        assert len(ev) == 5  # role + 2 tokens, the error, [DONE]
        assert box.requests_seen() == 1  # no retry once bytes went out
        text = await box.metrics()
        assert 'pdbox_requests_total{outcome="error_event"} 1' in text

    run(check, TWO, profile(policy="round_robin"))


# ------------------------------------------------------------------ admission


def test_queue_bound_answers_429_with_retry_after() -> None:
    async def check(box: Box) -> None:
        # This test is about the queue bound, not the TTFT-target refusal.
        box.router.admission.interactive_wait_s = None
        m = box.mocks["aggregated-0"]
        m.faults = Faults(hang=True)

        async def slow() -> int:
            async with box.post("/v1/chat/completions", chat()) as r:
                return r.status

        held = [asyncio.create_task(slow()) for _ in range(2)]
        await until(lambda: m.stats.inflight == 1 and box.router.admission.queued == 1)
        async with box.post("/v1/chat/completions", chat()) as r:
            assert r.status == 429
            assert int(r.headers["Retry-After"]) >= 1
            assert (await r.json())["error"]["type"] == "rate_limit_exceeded"
        text = await box.metrics()
        assert "pdbox_rejected_total 1" in text
        assert 'pdbox_requests_total{outcome="rejected"} 1' in text
        m.faults = Faults()
        for t in held:
            t.cancel()
        await asyncio.gather(*held, return_exceptions=True)

    run(check, ONE, profile(queue_bound=1, max_inflight_per_worker=1))


def test_priority_header_and_field() -> None:
    async def check(box: Box) -> None:
        m = box.mocks["aggregated-0"]
        async with box.post("/v1/chat/completions", chat(),
                            headers={"x-pdbox-priority": "batch"}) as r:
            assert r.status == 200
        assert m.seen[-1]["body"]["priority"] == 10
        async with box.post("/v1/chat/completions", chat(priority="interactive")) as r:
            assert r.status == 200
        assert m.seen[-1]["body"]["priority"] == 0

    run(check, ONE, profile(priority_scheduling=True))


def test_priority_is_not_passed_without_priority_scheduling() -> None:
    async def check(box: Box) -> None:
        async with box.post("/v1/chat/completions", chat(priority="batch"),
                            headers={"x-pdbox-priority": "batch"}) as r:
            assert r.status == 200
        assert "priority" not in box.mocks["aggregated-0"].seen[-1]["body"]

    run(check, ONE)


def test_client_disconnect_aborts_the_upstream_request() -> None:
    async def check(box: Box) -> None:
        m = box.mocks["aggregated-0"]
        r = await box.client.post(f"{box.url}/v1/chat/completions", json=chat(stream=True))
        assert r.status == 200
        await r.content.readuntil(b"\n\n")
        r.close()  # drops the connection
        await until(lambda: m.stats.disconnects == 1)
        assert m.stats.completed == 0
        await until(lambda: box.router.admission.inflight == 0)
        assert box.router.registry.backends["aggregated-0"].inflight == 0
        text = await box.metrics()
        assert 'outcome="error"' not in text  # the client left; the worker did not fail

    run(check, {"aggregated-0": MockConfig(tokens=2000, itl_ms=5)})


def test_client_disconnect_while_queued_frees_the_slot() -> None:
    async def check(box: Box) -> None:
        box.router.admission.interactive_wait_s = None  # queue, do not refuse
        m = box.mocks["aggregated-0"]
        first = await box.client.post(f"{box.url}/v1/chat/completions", json=chat(stream=True))
        await first.content.readuntil(b"\n\n")
        waiting = asyncio.create_task(box.client.post(f"{box.url}/v1/chat/completions",
                                                      json=chat()))
        await until(lambda: box.router.admission.queued == 1)
        waiting.cancel()
        await asyncio.gather(waiting, return_exceptions=True)
        await until(lambda: box.router.admission.queued == 0)
        first.close()
        await until(lambda: box.router.admission.inflight == 0)
        async with box.post("/v1/chat/completions", chat(max_tokens=2)) as r:
            assert r.status == 200
        assert m.stats.requests == 2  # the cancelled one never reached the worker

    run(check, {"aggregated-0": MockConfig(tokens=2000, itl_ms=5)},
        profile(max_inflight_per_worker=1))


# ------------------------------------------------------------------- policies


async def _workers_for(box: Box, bodies: list[dict[str, Any]],
                       headers: dict[str, str] | None = None) -> list[str]:
    out = []
    for b in bodies:
        async with box.post("/v1/chat/completions", b, headers=headers or {}) as r:
            assert r.status == 200
            out.append(r.headers["x-pdbox-decode-worker"])
            await r.read()
    return out


def test_round_robin_alternates() -> None:
    async def check(box: Box) -> None:
        got = await _workers_for(box, [chat(LONG)] * 4)
        assert got[0] != got[1] and got[0] == got[2] and got[1] == got[3]

    run(check, TWO, profile(policy="round_robin"))


def test_prefix_policy_keeps_a_repeated_prompt_on_one_worker() -> None:
    async def check(box: Box) -> None:
        got = await _workers_for(box, [chat(LONG)] * 5)
        assert len(set(got)) == 1
        text = await box.metrics()
        line = next(x for x in text.splitlines() if x.startswith("pdbox_prefix_match_tokens"))
        assert float(line.split()[-1]) > 4 * 500  # the last four matched most of the prompt
        other = await _workers_for(box, [chat("Another long document. " * 120)] * 2)
        assert other[0] == other[1]

    run(check, TWO)


def test_session_affinity_via_header() -> None:
    async def check(box: Box) -> None:
        # Without a session an idle box rotates short prompts over both workers...
        free = await _workers_for(box, [chat(f"p{i}") for i in range(4)])
        assert len(set(free)) == 2
        # ...with one, each session stays where it started, even interleaved.
        a: list[str] = []
        b: list[str] = []
        for i in range(4):
            a += await _workers_for(box, [chat(f"q{i}")], {"x-session-id": "alice"})
            b += await _workers_for(box, [chat(f"r{i}")], {"x-session-id": "bob"})
        assert len(set(a)) == 1 and len(set(b)) == 1

    run(check, TWO)


def test_a_connection_the_worker_closed_is_tried_once_more() -> None:
    """The one worker drops the first request's connection without answering, as
    uvicorn does when its keep-alive ends just as a request is sent on it."""

    async def go() -> None:
        seen = 0

        async def completions(request: web.Request) -> web.StreamResponse:
            nonlocal seen
            seen += 1
            await request.read()
            if seen == 1:
                assert request.transport is not None
                request.transport.close()
                return web.Response()
            return web.json_response({"choices": [{"text": "ok", "index": 0}],
                                      "usage": {"prompt_tokens": 1, "completion_tokens": 1}})

        worker = web.Application()
        worker.router.add_post("/v1/completions", completions)
        wrunner = web.AppRunner(worker, access_log=None)
        await wrunner.setup()
        wsite = web.TCPSite(wrunner, "127.0.0.1", 0)
        await wsite.start()
        wport = wsite._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        p = profile()
        registry = Registry()
        registry.upsert("aggregated-0", "aggregated", f"http://127.0.0.1:{wport}", "ready")
        router = Router(p, registry, CharBlockTokenizer(), [p.model.served_name])
        router.capacity_changed()
        await router.start()
        app = web.Application()
        router.add_routes(app)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        try:
            async with aiohttp.ClientSession() as client, client.post(
                    f"http://127.0.0.1:{port}/v1/completions", json=completion()) as r:
                assert r.status == 200, await r.text()
                assert (await r.json())["choices"][0]["text"] == "ok"
            assert seen == 2
        finally:
            await runner.cleanup()
            await router.close()
            await wrunner.cleanup()

    asyncio.run(go())
