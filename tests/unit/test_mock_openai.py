"""The mock vLLM OpenAI server: stream shape, kv_transfer_params, metrics, faults, CLI."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from collections.abc import Awaitable, Callable

import aiohttp

from pdbox.devtools.mock_openai import Faults, MockConfig, MockServer
from pdbox.router.metrics import parse_vllm_metrics
from tests.helpers import sse_events


def run(fn: Callable[[MockServer, aiohttp.ClientSession], Awaitable[None]],
        config: MockConfig | None = None) -> None:
    async def go() -> None:
        async with MockServer(config or MockConfig(tokens=5)) as m, aiohttp.ClientSession() as s:
            await asyncio.wait_for(fn(m, s), 20)

    asyncio.run(go())


async def metrics(m: MockServer, s: aiohttp.ClientSession) -> dict[str, float]:
    async with s.get(f"{m.url}/metrics") as r:
        return parse_vllm_metrics(await r.text())


def test_health_and_models() -> None:
    async def check(m: MockServer, s: aiohttp.ClientSession) -> None:
        async with s.get(f"{m.url}/health") as r:
            assert r.status == 200
        async with s.get(f"{m.url}/v1/models") as r:
            data = await r.json()
        assert [x["id"] for x in data["data"]] == ["smollm2"]

    run(check)


def test_completion_stream_is_vllm_shaped() -> None:
    async def check(m: MockServer, s: aiohttp.ClientSession) -> None:
        body = {"model": "smollm2", "prompt": "hello", "stream": True,
                "stream_options": {"include_usage": True}}
        async with s.post(f"{m.url}/v1/completions", json=body) as r:
            assert r.status == 200
            assert r.content_type == "text/event-stream"
            ev = sse_events(await r.read())
        assert ev[-1] == "[DONE]"
        tokens = [e for e in ev[:-1] if e["choices"]]
        assert [e["choices"][0]["text"] for e in tokens] == [" t0", " t1", " t2", " t3", " t4"]
        assert tokens[-1]["choices"][0]["finish_reason"] == "length"
        assert all(e["object"] == "text_completion" for e in tokens)
        assert ev[-2]["usage"]["completion_tokens"] == 5
        assert m.stats.completed == 1 and m.stats.generation_tokens == 5

    run(check)


def test_chat_stream_starts_with_role_and_honours_max_tokens() -> None:
    async def check(m: MockServer, s: aiohttp.ClientSession) -> None:
        body = {"model": "smollm2", "messages": [{"role": "user", "content": "hi"}],
                "stream": True, "max_tokens": 2}
        async with s.post(f"{m.url}/v1/chat/completions", json=body) as r:
            ev = sse_events(await r.read())
        assert ev[0]["choices"][0]["delta"]["role"] == "assistant"
        assert [e["choices"][0]["delta"]["content"] for e in ev[1:-1]] == [" t0", " t1"]
        assert ev[-1] == "[DONE]"

    run(check)


def test_non_stream_answer() -> None:
    async def check(m: MockServer, s: aiohttp.ClientSession) -> None:
        body = {"model": "smollm2", "messages": [{"role": "user", "content": "hi"}]}
        async with s.post(f"{m.url}/v1/chat/completions", json=body,
                          headers={"X-Request-Id": "abc"}) as r:
            data = await r.json()
            assert r.headers["x-request-id"] == "abc"
        assert data["id"] == "chatcmpl-abc"
        assert data["choices"][0]["message"]["content"] == " t0 t1 t2 t3 t4"
        assert data["usage"]["completion_tokens"] == 5
        assert data["kv_transfer_params"] is None

    run(check)


def test_unknown_model_is_404() -> None:
    async def check(m: MockServer, s: aiohttp.ClientSession) -> None:
        async with s.post(f"{m.url}/v1/completions", json={"model": "x", "prompt": "a"}) as r:
            assert r.status == 404
            assert (await r.json())["error"]["param"] == "model"

    run(check)


def test_kv_transfer_handshake() -> None:
    async def check(m: MockServer, s: aiohttp.ClientSession) -> None:
        prompt = "x" * 1000  # 250 tokens, 16 per block: 16 blocks
        body = {"model": "smollm2", "prompt": prompt, "max_tokens": 1,
                "kv_transfer_params": {"do_remote_decode": True, "do_remote_prefill": False}}
        async with s.post(f"{m.url}/v1/completions", json=body) as r:
            params = (await r.json())["kv_transfer_params"]
        assert params["do_remote_prefill"] is True
        assert len(params["remote_block_ids"]) == 16
        assert params["remote_engine_id"] == m.config.engine_id
        assert m.stats.prefill_legs == 1
        decode = {"model": "smollm2", "prompt": prompt, "kv_transfer_params": params}
        async with s.post(f"{m.url}/v1/completions", json=decode) as r:
            assert r.status == 200
        bad = {"model": "smollm2", "prompt": prompt,
               "kv_transfer_params": {"do_remote_prefill": True}}
        async with s.post(f"{m.url}/v1/completions", json=bad) as r:
            assert r.status == 200  # vLLM recomputes locally
        got = await metrics(m, s)
        assert got["vllm:nixl_xfer_time_seconds_count"] == 1
        assert got["vllm:nixl_num_failed_transfers_total"] == 1
        # The same prompt three times: the second and third hit the prefix cache.
        assert got["vllm:prefix_cache_hits_total"] > 0

    run(check)


def test_metrics_reflect_inflight() -> None:
    async def check(m: MockServer, s: aiohttp.ClientSession) -> None:
        body = {"model": "smollm2", "prompt": "p", "stream": True}
        async with s.post(f"{m.url}/v1/completions", json=body) as r:
            await r.content.readuntil(b"\n\n")
            during = await metrics(m, s)
            await r.read()
        after = await metrics(m, s)
        assert during["vllm:num_requests_running"] == 1
        assert during["vllm:kv_cache_usage_perc"] > 0
        assert after["vllm:num_requests_running"] == 0
        assert after["vllm:kv_cache_usage_perc"] == 0

    run(check, MockConfig(tokens=50, itl_ms=5))


def test_fault_fail_status_with_count() -> None:
    async def check(m: MockServer, s: aiohttp.ClientSession) -> None:
        async with s.post(f"{m.url}/mock/faults", json={"fail_status": 503, "count": 1}) as r:
            assert r.status == 200
        body = {"model": "smollm2", "prompt": "p"}
        async with s.post(f"{m.url}/v1/completions", json=body) as r:
            assert r.status == 503
        async with s.post(f"{m.url}/v1/completions", json=body) as r:
            assert r.status == 200
        async with s.post(f"{m.url}/mock/faults", json={"fail_status": "x"}) as r:
            assert r.status == 400
        async with s.get(f"{m.url}/mock/state") as r:
            state = await r.json()
        assert state["stats"]["requests"] == 2 and state["stats"]["failed"] == 1
        assert state["seen"][0]["body"] == body

    run(check)


def test_fault_reset_mid_stream() -> None:
    async def check(m: MockServer, s: aiohttp.ClientSession) -> None:
        m.faults = Faults(fail_after_chunks=2)
        body = {"model": "smollm2", "prompt": "p", "stream": True}
        got = b""
        try:
            async with s.post(f"{m.url}/v1/completions", json=body) as r:
                assert r.status == 200
                async for chunk in r.content.iter_any():
                    got += chunk
            raise AssertionError("the stream should have been reset")
        except aiohttp.ClientPayloadError:
            pass
        assert got.count(b"data: ") == 2

    run(check)


def test_fault_hang_counts_the_disconnect() -> None:
    async def check(m: MockServer, s: aiohttp.ClientSession) -> None:
        m.faults = Faults(hang=True)
        body = {"model": "smollm2", "prompt": "p"}
        try:
            async with s.post(f"{m.url}/v1/completions", json=body,
                              timeout=aiohttp.ClientTimeout(total=0.3)):
                raise AssertionError("a hanging worker should not answer")
        except TimeoutError:
            pass
        for _ in range(100):
            if m.stats.disconnects:
                break
            await asyncio.sleep(0.01)
        assert m.stats.disconnects == 1 and m.stats.inflight == 0

    run(check)


def test_cli_prints_url_and_serves() -> None:
    proc = subprocess.Popen(
        [sys.executable, "-m", "pdbox.devtools.mock_openai", "--port", "0", "--tokens", "3",
         "--model", "m1", "--fail-status", "500"],
        stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        url = proc.stdout.readline().strip()
        assert url.startswith("http://127.0.0.1:")

        async def go() -> None:
            async with aiohttp.ClientSession() as s:
                async with s.get(f"{url}/v1/models") as r:
                    assert (await r.json())["data"][0]["id"] == "m1"
                body = {"model": "m1", "prompt": "p"}
                async with s.post(f"{url}/v1/completions", json=body) as r:
                    assert r.status == 500
                async with s.post(f"{url}/mock/faults", json={}) as r:
                    assert r.status == 200
                async with s.post(f"{url}/v1/completions", json=body) as r:
                    assert (await r.json())["choices"][0]["text"] == " t0 t1 t2"

        asyncio.run(go())
    finally:
        proc.terminate()
        proc.wait(10)
