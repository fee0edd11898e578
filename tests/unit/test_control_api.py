"""The control routes on a real aiohttp server, with a fake core behind them.

The core records what it was asked; the tests check the status codes, the
error bodies of docs/CONTROL_API.md and what reached the core.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from pdbox import control_api

TOKEN = "t0ken-for-tests"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


class FakeCore:
    def __init__(self) -> None:
        self.calls: list[tuple[str, Any]] = []
        self.subscribers: list[asyncio.Queue[dict[str, Any]]] = []
        self.workers = {"prefill-0": ["p line 1", "p line 2", "p line 3"], "decode-0": []}
        self.snapshot: dict[str, Any] = {
            "version": "0.1.0",
            "policy": "prefix",
            "workers": [{"id": "decode-0", "kv_usage": float("nan"), "queue": 0}],
            "router": {"ttft_p50_s": float("inf"), "rps": 0.5,
                       "history": {"ttft_p50_s": [float("nan"), 0.2]}},
            "hardware": {"cpu_percent_per_core": (float("-inf"), 12.0)},
        }

    def status(self) -> dict[str, Any]:
        self.calls.append(("status", None))
        return self.snapshot

    def subscribe(self) -> asyncio.Queue[dict[str, Any]]:
        q: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        self.subscribers.append(q)
        return q

    def unsubscribe(self, q: asyncio.Queue[dict[str, Any]]) -> None:
        self.subscribers.remove(q)

    def publish(self, ev: dict[str, Any]) -> None:
        for q in self.subscribers:
            q.put_nowait(ev)

    def log_tail(self, worker_id: str, lines: int) -> list[str] | None:
        self.calls.append(("log_tail", (worker_id, lines)))
        if worker_id not in self.workers:
            return None
        return self.workers[worker_id][-lines:]

    async def scale(self, role: str, replicas: int | None) -> dict[str, Any]:
        self.calls.append(("scale", (role, replicas)))
        if role not in ("prefill", "decode"):
            raise ValueError(f"this profile has no role {role!r}; roles: prefill, decode")
        return {"role": role, "replicas": "auto" if replicas is None else replicas}

    def set_policy(self, policy: str) -> None:
        self.calls.append(("policy", policy))

    async def restart_worker(self, worker_id: str) -> None:
        if worker_id not in self.workers:
            raise KeyError(worker_id)
        self.calls.append(("restart", worker_id))

    def request_shutdown(self) -> None:
        self.calls.append(("shutdown", None))


Test = Callable[[TestClient, FakeCore], Awaitable[None]]


def run(test: Test, handler_cancellation: bool = True) -> FakeCore:
    """Serve the control routes on a loopback port, as `pdbox up` does, and run `test`."""
    core = FakeCore()

    async def main() -> None:
        app = web.Application()
        control_api.add_routes(app, core, TOKEN)
        server = TestServer(app, host="127.0.0.1", handler_cancellation=handler_cancellation)
        async with TestClient(server) as client:
            await test(client, core)

    asyncio.run(main())
    return core


async def _error(resp: Any, status: int) -> str:
    assert resp.status == status, await resp.text()
    body = await resp.json()
    assert set(body["error"]) >= {"message", "type", "code"}
    assert body["error"]["code"] == status
    return body["error"]["message"]


# ----------------------------------------------------------------------- auth

ROUTES = [
    ("GET", "/pdbox/v1/status"),
    ("GET", "/pdbox/v1/events"),
    ("GET", "/pdbox/v1/logs/prefill-0"),
    ("POST", "/pdbox/v1/scale"),
    ("POST", "/pdbox/v1/policy"),
    ("POST", "/pdbox/v1/workers/prefill-0/restart"),
    ("POST", "/pdbox/v1/shutdown"),
]


@pytest.mark.parametrize("headers", [
    {},
    {"Authorization": "Bearer wrong"},
    {"Authorization": TOKEN},  # no scheme
    {"Authorization": f"Bearer {TOKEN}x"},
    {"Authorization": "Bearer tökén"},
])
def test_every_route_needs_the_token(headers: dict[str, str]) -> None:
    async def test(client: TestClient, core: FakeCore) -> None:
        for method, path in ROUTES:
            resp = await client.request(method, path, headers=headers,
                                        json={"role": "decode", "replicas": 1})
            msg = await _error(resp, 401)
            assert "token" in msg
            assert (await resp.json())["error"]["type"] == "authentication_error"

    core = run(test)
    assert core.calls == [] and core.subscribers == []


# --------------------------------------------------------------------- status


def test_status_turns_unknown_figures_into_null() -> None:
    async def test(client: TestClient, core: FakeCore) -> None:
        resp = await client.get("/pdbox/v1/status", headers=AUTH)
        assert resp.status == 200
        assert resp.content_type == "application/json"
        text = await resp.text()
        assert "NaN" not in text and "Infinity" not in text
        body = json.loads(text)
        assert body["workers"][0]["kv_usage"] is None
        assert body["router"]["ttft_p50_s"] is None
        assert body["router"]["rps"] == 0.5
        assert body["router"]["history"]["ttft_p50_s"] == [None, 0.2]
        assert body["hardware"]["cpu_percent_per_core"] == [None, 12.0]

    run(test)


# ---------------------------------------------------------------------- scale


@pytest.mark.parametrize(("replicas", "expect"), [(2, 2), (0, 0), (64, 64), ("auto", None)])
def test_scale_passes_replicas_to_the_core(replicas: Any, expect: int | None) -> None:
    async def test(client: TestClient, core: FakeCore) -> None:
        resp = await client.post("/pdbox/v1/scale", headers=AUTH,
                                 json={"role": "decode", "replicas": replicas})
        assert resp.status == 200
        assert await resp.json() == {"role": "decode", "replicas": replicas}

    assert run(test).calls == [("scale", ("decode", expect))]


@pytest.mark.parametrize("body", [
    {"role": "decode", "replicas": -1},
    {"role": "decode", "replicas": 65},
    {"role": "decode", "replicas": 1.5},
    {"role": "decode", "replicas": True},
    {"role": "decode", "replicas": "2"},
    {"role": "decode", "replicas": "AUTO"},
    {"role": "decode"},
    {"role": 3, "replicas": 1},
    {"replicas": 1},
])
def test_scale_rejects_bad_bodies(body: dict[str, Any]) -> None:
    async def test(client: TestClient, core: FakeCore) -> None:
        resp = await client.post("/pdbox/v1/scale", headers=AUTH, json=body)
        msg = await _error(resp, 400)
        assert "'replicas'" in msg or "'role'" in msg

    assert run(test).calls == []


def test_scale_reports_the_cores_refusal_as_400() -> None:
    async def test(client: TestClient, core: FakeCore) -> None:
        resp = await client.post("/pdbox/v1/scale", headers=AUTH,
                                 json={"role": "aggregated", "replicas": 1})
        assert "no role 'aggregated'" in await _error(resp, 400)

    run(test)


def test_scale_needs_a_json_object() -> None:
    async def test(client: TestClient, core: FakeCore) -> None:
        resp = await client.post("/pdbox/v1/scale", headers=AUTH, data=b"role=decode")
        await _error(resp, 415)
        resp = await client.post("/pdbox/v1/scale", headers={**AUTH, "Content-Type":
                                                             "application/json"}, data=b"{oops")
        assert "not valid JSON" in await _error(resp, 400)
        resp = await client.post("/pdbox/v1/scale", headers=AUTH, json=[1, 2])
        assert "JSON object" in await _error(resp, 400)

    assert run(test).calls == []


# --------------------------------------------------------------------- policy


@pytest.mark.parametrize("policy", ["prefix", "least_loaded", "round_robin"])
def test_policy_is_set(policy: str) -> None:
    async def test(client: TestClient, core: FakeCore) -> None:
        resp = await client.post("/pdbox/v1/policy", headers=AUTH, json={"policy": policy})
        assert resp.status == 200
        assert await resp.json() == {"policy": policy}

    assert run(test).calls == [("policy", policy)]


@pytest.mark.parametrize("policy", ["random", "", None, ["prefix"], {"p": 1}, 3])
def test_policy_rejects_unknown_names(policy: Any) -> None:
    async def test(client: TestClient, core: FakeCore) -> None:
        resp = await client.post("/pdbox/v1/policy", headers=AUTH, json={"policy": policy})
        msg = await _error(resp, 400)
        assert "prefix, least_loaded, round_robin" in msg

    assert run(test).calls == []


# ----------------------------------------------------------------------- logs


def test_logs_tail_of_a_worker() -> None:
    async def test(client: TestClient, core: FakeCore) -> None:
        resp = await client.get("/pdbox/v1/logs/prefill-0?lines=2", headers=AUTH)
        assert resp.status == 200
        assert await resp.json() == {"worker": "prefill-0", "lines": ["p line 2", "p line 3"]}
        resp = await client.get("/pdbox/v1/logs/prefill-0", headers=AUTH)
        assert (await resp.json())["lines"] == ["p line 1", "p line 2", "p line 3"]
        # Out-of-range counts are clamped, not refused.
        await client.get("/pdbox/v1/logs/prefill-0?lines=0", headers=AUTH)
        await client.get("/pdbox/v1/logs/prefill-0?lines=999999", headers=AUTH)

    core = run(test)
    assert [c[1] for c in core.calls] == [("prefill-0", 2), ("prefill-0", 50),
                                          ("prefill-0", 1), ("prefill-0", 2000)]


def test_logs_of_an_unknown_worker_is_404() -> None:
    async def test(client: TestClient, core: FakeCore) -> None:
        resp = await client.get("/pdbox/v1/logs/decode-7", headers=AUTH)
        assert "There is no worker 'decode-7'." == await _error(resp, 404)
        resp = await client.get("/pdbox/v1/logs/prefill-0?lines=many", headers=AUTH)
        assert "'lines' must be an integer" in await _error(resp, 400)

    run(test)


# ------------------------------------------------------------ restart, shutdown


def test_restart_a_worker() -> None:
    async def test(client: TestClient, core: FakeCore) -> None:
        resp = await client.post("/pdbox/v1/workers/decode-0/restart", headers=AUTH)
        assert resp.status == 200
        assert await resp.json() == {"worker": "decode-0", "restarting": True}
        resp = await client.post("/pdbox/v1/workers/decode-9/restart", headers=AUTH)
        assert "decode-9" in await _error(resp, 404)

    assert run(test).calls == [("restart", "decode-0")]


def test_shutdown_asks_the_core_to_stop() -> None:
    async def test(client: TestClient, core: FakeCore) -> None:
        resp = await client.post("/pdbox/v1/shutdown", headers=AUTH)
        assert resp.status == 200
        assert await resp.json() == {"stopping": True}

    assert run(test).calls == [("shutdown", None)]


def test_wrong_methods_are_refused() -> None:
    async def test(client: TestClient, core: FakeCore) -> None:
        resp = await client.get("/pdbox/v1/shutdown", headers=AUTH)
        assert resp.status == 405
        resp = await client.post("/pdbox/v1/status", headers=AUTH)
        assert resp.status == 405

    assert run(test).calls == []


# --------------------------------------------------------------------- events


@pytest.mark.parametrize("cancel", [True, False])
def test_events_stream_server_sent_events(cancel: bool) -> None:
    async def test(client: TestClient, core: FakeCore) -> None:
        resp = await client.get("/pdbox/v1/events", headers=AUTH)
        assert resp.status == 200
        assert resp.headers["Content-Type"].startswith("text/event-stream")
        for _ in range(100):
            if core.subscribers:
                break
            await asyncio.sleep(0.01)
        core.publish({"ts": 1.0, "kind": "worker", "message": "decode-0 ready",
                      "value": float("nan")})
        line = await asyncio.wait_for(resp.content.readline(), timeout=5)
        assert line.startswith(b"data: ")
        ev = json.loads(line[len(b"data: "):])
        assert ev == {"ts": 1.0, "kind": "worker", "message": "decode-0 ready", "value": None}
        assert await asyncio.wait_for(resp.content.readline(), timeout=5) == b"\n"
        resp.close()
        # The subscription ends with the client: at once when the handler is
        # cancelled, else at the next write that finds the connection gone.
        for _ in range(200):
            if not core.subscribers:
                break
            core.publish({"ts": 2.0, "kind": "worker", "message": "more"})
            await asyncio.sleep(0.01)
        assert core.subscribers == []

    run(test, handler_cancellation=cancel)
