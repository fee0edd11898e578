"""ControlClient against a real aiohttp server in this process that speaks the contract."""

from __future__ import annotations

import asyncio
import json
import os
import socket
import threading
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web

from pdbox import runfolder
from pdbox.control_client import NOT_RUNNING, ControlClient, ControlError, error_message
from tests.helpers import serve_app

TOKEN = "s3cret"


def snapshot() -> dict[str, Any]:
    return {"version": "0.1.0", "endpoint": "http://127.0.0.1:9/v1", "policy": "prefix",
            "workers": [], "router": {}, "autoscaler": {}, "hardware": {}, "events": []}


class FakeControl:
    """The control routes, recording what they were asked."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, Any]] = []
        app = web.Application(middlewares=[self.auth])
        app.router.add_get("/pdbox/v1/status", self.status)
        app.router.add_get("/pdbox/v1/events", self.events)
        app.router.add_get("/pdbox/v1/logs/{wid}", self.logs)
        app.router.add_post("/pdbox/v1/scale", self.scale)
        app.router.add_post("/pdbox/v1/policy", self.policy)
        app.router.add_post("/pdbox/v1/workers/{wid}/restart", self.restart)
        app.router.add_post("/pdbox/v1/shutdown", self.shutdown)
        self.app = app

    @web.middleware
    async def auth(self, request: web.Request, handler: Any) -> web.StreamResponse:
        if request.headers.get("Authorization") != f"Bearer {TOKEN}":
            return web.json_response(
                {"error": {"message": "missing or wrong control token.", "type": "auth",
                           "code": 401}}, status=401)
        return await handler(request)

    async def status(self, request: web.Request) -> web.Response:
        self.calls.append(("status", None))
        return web.json_response(snapshot())

    async def events(self, request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        await resp.write(b": keep-alive\n\n")
        for i in range(3):
            body = json.dumps({"ts": float(i), "kind": "worker", "message": f"e{i}"})
            await resp.write(f"data: {body}\n\n".encode())
        await resp.write_eof()
        return resp

    async def logs(self, request: web.Request) -> web.Response:
        self.calls.append(("logs", (request.match_info["wid"], request.query["lines"])))
        return web.json_response({"worker": request.match_info["wid"], "lines": ["a", "b"]})

    async def scale(self, request: web.Request) -> web.Response:
        body = await request.json()
        self.calls.append(("scale", body))
        if body["replicas"] == 99:
            return web.json_response(
                {"error": {"message": "decode can have at most 3 workers (asked for 99).",
                           "type": "invalid_request_error", "code": 400}}, status=400)
        return web.json_response({"ok": True})

    async def policy(self, request: web.Request) -> web.Response:
        self.calls.append(("policy", await request.json()))
        return web.json_response({"ok": True})

    async def restart(self, request: web.Request) -> web.Response:
        self.calls.append(("restart", request.match_info["wid"]))
        return web.json_response({"ok": True})

    async def shutdown(self, request: web.Request) -> web.Response:
        self.calls.append(("shutdown", None))
        return web.json_response({"ok": True})


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.anyio
async def test_routes_send_the_contract_bodies() -> None:
    fake = FakeControl()
    runner, url = await serve_app(fake.app)
    client = ControlClient(url, TOKEN)
    try:
        snap = await client.status()
        assert snap["policy"] == "prefix"
        assert client.chat_url == "http://127.0.0.1:9/v1"
        await client.scale("decode", 2)
        await client.scale("decode", "auto")
        await client.set_policy("round_robin")
        await client.restart("decode-0")
        assert await client.logs("decode-0", 50) == ["a", "b"]
        await client.shutdown()
    finally:
        await client.close()
        await runner.cleanup()
    assert fake.calls == [
        ("status", None),
        ("scale", {"role": "decode", "replicas": 2}),
        ("scale", {"role": "decode", "replicas": "auto"}),
        ("policy", {"policy": "round_robin"}),
        ("restart", "decode-0"),
        ("logs", ("decode-0", "50")),
        ("shutdown", None),
    ]


@pytest.mark.anyio
async def test_server_error_message_is_passed_through() -> None:
    runner, url = await serve_app(FakeControl().app)
    client = ControlClient(url, TOKEN)
    try:
        with pytest.raises(ControlError) as err:
            await client.scale("decode", 99)
        assert str(err.value) == "decode can have at most 3 workers (asked for 99)."
        assert err.value.status == 400
        bad = ControlClient(url, "wrong")
        with pytest.raises(ControlError, match="wrong control token"):
            await bad.status()
        await bad.close()
    finally:
        await client.close()
        await runner.cleanup()


@pytest.mark.anyio
async def test_events_stream_decodes_sse() -> None:
    runner, url = await serve_app(FakeControl().app)
    client = ControlClient(url, TOKEN)
    try:
        got = [e["message"] async for e in client.events()]
    finally:
        await client.close()
        await runner.cleanup()
    assert got == ["e0", "e1", "e2"]


def test_connection_refused_says_not_running() -> None:
    client = ControlClient(f"http://127.0.0.1:{free_port()}", TOKEN)
    with pytest.raises(ControlError) as err:
        client.sync_status()
    assert str(err.value) == NOT_RUNNING


def test_sync_facade_runs_on_fresh_loops() -> None:
    """Each sync call gets its own loop and session; the client stays usable between them."""

    async def start() -> tuple[web.AppRunner, str]:
        return await serve_app(FakeControl().app)

    loop = asyncio.new_event_loop()
    runner, url = loop.run_until_complete(start())
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    try:
        client = ControlClient(url, TOKEN)
        assert client.sync_status()["version"] == "0.1.0"
        assert client.sync_logs("prefill-0", 5) == ["a", "b"]
        assert client.sync_set_policy("prefix") == {"ok": True}
    finally:
        asyncio.run_coroutine_threadsafe(runner.cleanup(), loop).result(5)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(5)


def test_from_run_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PDBOX_HOME", str(tmp_path))
    with pytest.raises(ControlError, match="pdbox is not running"):
        ControlClient.from_run_folder()
    run = tmp_path / "run"
    run.mkdir()
    (run / runfolder.STATE).write_text(json.dumps(
        {"pid": os.getpid(), "control_url": "http://127.0.0.1:8000",
         "endpoint": "http://127.0.0.1:8000/v1"}))
    (run / runfolder.TOKEN).write_text("tok\n")
    client = ControlClient.from_run_folder()
    assert client.base_url == "http://127.0.0.1:8000"
    assert client.token == "tok"
    assert client.chat_url == "http://127.0.0.1:8000/v1"


def test_error_message_shapes() -> None:
    assert error_message('{"error": {"message": "nope."}}', 400) == "nope."
    assert error_message("<html>", 502) == "the control API answered HTTP 502."
    assert "token" in error_message("", 401)
