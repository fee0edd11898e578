"""`pdbox scale split A/B` through the control route: the split reaches the core, a
bad split is one sentence and a 400 (the core parses it as the fleet does)."""

from __future__ import annotations

import asyncio
from typing import Any

from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from pdbox import config, control_api
from pdbox.resplit import parse_split
from tests.unit.test_control_api import AUTH, TOKEN, FakeCore


class SplitCore(FakeCore):
    async def scale_split(self, spec: str | None) -> dict[str, Any]:
        self.calls.append(("split", spec))
        if spec is None:
            return {"role": "split", "split": "auto"}
        parse_split(config.load("cpu-tiny"), spec)  # raises SplitError (a ValueError)
        return {"role": "split", "split": spec, "moving": True}


def _run(bodies: list[Any]) -> tuple[SplitCore, list[tuple[int, Any]]]:
    core = SplitCore()
    out: list[tuple[int, Any]] = []

    async def main() -> None:
        app = web.Application()
        control_api.add_routes(app, core, TOKEN)
        async with TestClient(TestServer(app, host="127.0.0.1")) as client:
            for body in bodies:
                resp = await client.post("/pdbox/v1/scale", headers=AUTH, json=body)
                out.append((resp.status, await resp.json()))

    asyncio.run(main())
    return core, out


def test_a_split_reaches_the_core_and_auto_unpins() -> None:
    core, out = _run([{"role": "split", "replicas": "1/0"},
                      {"role": "split", "replicas": "auto"}])
    assert [s for s, _ in out] == [200, 200]
    assert out[0][1] == {"role": "split", "split": "1/0", "moving": True}
    assert core.calls == [("split", "1/0"), ("split", None)]


def test_bad_splits_are_one_sentence_400s() -> None:
    core, out = _run([{"role": "split", "replicas": 3},
                      {"role": "split", "replicas": "0/0"},
                      {"role": "split", "replicas": "0/7"}])
    assert [s for s, _ in out] == [400, 400, 400]
    msgs = [b["error"]["message"] for _, b in out]
    assert "PREFILL/DECODE" in msgs[0]
    assert "may not share a core" in msgs[1]
    assert "exactly the cores the roles hold now (0,1)" in msgs[2]
    assert all("Traceback" not in m for m in msgs)
