"""`pdbox smoke`'s P/D correctness check against a fake router, control API and prefill worker.

The real thing runs in tests/e2e/test_pd.py on cpu-tiny's workers.
"""

from __future__ import annotations

import asyncio
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from pdbox import smoke as sm
from pdbox.control_client import ControlClient
from tests.helpers import serve_app


class FakeBox:
    """The router answers `local` for the first `local_first` prompts, then remote."""

    def __init__(self, remote_text: str = " a b c", alone_text: str = " a b c",
                 local_first: int = 0, busy_polls: int = 0, tokens: int = sm.GREEDY_TOKENS):
        self.remote_text, self.alone_text = remote_text, alone_text
        self.local_first, self.busy_polls, self.tokens = local_first, busy_polls, tokens
        self.routed = 0
        self.alone_bodies: list[dict[str, Any]] = []
        self.router_bodies: list[dict[str, Any]] = []
        app = web.Application()
        app.router.add_post("/v1/completions", self.router)
        app.router.add_post("/prefill/v1/completions", self.alone)
        app.router.add_get("/pdbox/v1/status", self.status)
        self.app = app
        self.url = ""

    async def __aenter__(self) -> FakeBox:
        self.runner, self.url = await serve_app(self.app)
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.runner.cleanup()

    def _answer(self, text: str) -> dict[str, Any]:
        return {"choices": [{"text": text}], "usage": {"completion_tokens": self.tokens}}

    async def router(self, request: web.Request) -> web.Response:
        self.router_bodies.append(await request.json())
        self.routed += 1
        remote = self.routed > self.local_first
        headers = {"x-pdbox-pd": "remote" if remote else "local",
                   "x-pdbox-pd-reason": "remote: streams" if remote else "local: idle",
                   "x-pdbox-decode-worker": "decode-0"}
        if remote:
            headers["x-pdbox-prefill-worker"] = "prefill-0"
        return web.json_response(self._answer(self.remote_text), headers=headers)

    async def alone(self, request: web.Request) -> web.Response:
        self.alone_bodies.append(await request.json())
        return web.json_response(self._answer(self.alone_text))

    async def status(self, request: web.Request) -> web.Response:
        running = 1 if self.busy_polls > 0 else 0
        self.busy_polls -= 1
        return web.json_response({"mode": "pd", "workers": [
            {"id": "prefill-0", "role": "prefill", "state": "ready",
             "url": f"{self.url}/prefill", "running": 0, "queue": 0, "inflight": 0},
            {"id": "decode-0", "role": "decode", "state": "ready", "url": f"{self.url}/decode",
             "running": running, "queue": 0, "inflight": 0}]})


def check(**kw: Any) -> tuple[str, FakeBox]:
    async def go() -> tuple[str, FakeBox]:
        async def no_sleep(_: float) -> None:
            await asyncio.sleep(0)

        async with FakeBox(**kw) as box:
            control = ControlClient(box.url, "t")
            async with aiohttp.ClientSession() as s:
                smoke = sm.Smoke(box.url, control, s, sleep=no_sleep)
                smoke.model = "smollm2"
                try:
                    return await smoke.check_pd_greedy(), box
                finally:
                    await control.close()

    return asyncio.run(go())


def test_equal_greedy_answers_pass_and_the_same_request_goes_to_the_prefill_worker() -> None:
    detail, box = check(local_first=1, busy_polls=2)
    assert detail.startswith("remote on try 2 (prefill-0 → decode-0) and prefill-0 alone agree "
                             "on 16 greedy tokens")
    assert box.alone_bodies == [box.router_bodies[-1]]
    sent = box.alone_bodies[0]
    assert (sent["temperature"], sent["max_tokens"], sent["ignore_eos"]) == (0, 16, True)


def test_a_garbled_transfer_fails_and_says_where_the_answers_part() -> None:
    with pytest.raises(sm.CheckFailed, match="part at character 3"):
        check(remote_text=" a x c")


def test_a_short_answer_fails() -> None:
    with pytest.raises(sm.CheckFailed, match="only 3 tokens came back"):
        check(tokens=3)


def test_always_local_fails_with_the_reasons() -> None:
    with pytest.raises(sm.CheckFailed, match="locally every time.*local: idle"):
        check(local_first=5)


def test_it_is_a_listed_smoke_check() -> None:
    assert ("pd_greedy", "check_pd_greedy") in sm.CHECKS
