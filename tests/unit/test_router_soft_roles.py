"""Soft roles through the router's HTTP layer, in front of mock vLLM workers."""

from __future__ import annotations

import asyncio

from pdbox.devtools.mock_openai import MockConfig
from tests.helpers import sse_events
from tests.unit.test_router_app import LONG, PD, Box, completion, pd_profile, run

SLOW = {"prefill-0": "prefill", "decode-0": MockConfig(tokens=20, itl_ms=20)}


async def _stream(box: Box, prompt: str, max_tokens: int = 20) -> dict[str, str]:
    async with box.post("/v1/completions",
                        completion(prompt, stream=True, max_tokens=max_tokens)) as r:
        assert r.status == 200
        ev = sse_events(await r.read())
        assert ev[-1] == "[DONE]"
        return dict(r.headers)


def test_short_prompts_spread_over_the_prefill_worker_while_it_has_no_prefill_work() -> None:
    async def check(box: Box) -> None:
        heads = await asyncio.gather(*(_stream(box, f"hi {i}") for i in range(6)))
        whole = [h for h in heads if h["x-pdbox-pd"] == "whole"]
        assert whole, "no short request was served whole by the prefill worker"
        for h in whole:
            assert h["x-pdbox-decode-worker"] == "prefill-0"
            assert "whole on prefill-0 (soft role)" in h["x-pdbox-pd-reason"]
            assert "x-pdbox-prefill-worker" not in h
        # Served end to end: no kv_transfer_params on what the prefill worker saw.
        assert all("kv_transfer_params" not in s["body"] for s in box.mocks["prefill-0"].seen)
        mix = box.router.snapshot()["soft_roles"]["role_mix"]
        assert mix["prefill-0"]["whole"] == 1.0 and mix["prefill-0"]["requests"] == len(whole)

    run(check, SLOW, pd_profile(hybrid=False))


def test_long_prompts_go_remote_and_short_ones_keep_off_the_prefill_worker_meanwhile() -> None:
    async def check(box: Box) -> None:
        h = await _stream(box, LONG)
        assert h["x-pdbox-pd"] == "remote" and h["x-pdbox-prefill-worker"] == "prefill-0"
        heads = await asyncio.gather(*(_stream(box, f"hi {i}") for i in range(4)))
        for h in heads:
            assert h["x-pdbox-decode-worker"] == "decode-0"
            assert "prefill-0 kept for prefill: prefilled" in h["x-pdbox-pd-reason"]
        snap = box.router.snapshot()["soft_roles"]
        assert snap["role_mix"]["prefill-0"] == {"whole": 0.0, "prefill": 1.0, "decode": 0.0,
                                                 "requests": 1}
        assert snap["prefilling"]["prefill-0"].startswith("prefilled")

    run(check, SLOW, pd_profile(soft_roles_hold_s=60.0, hybrid=False))


def test_hybrid_the_prefill_worker_serves_long_and_short_whole_with_no_hold() -> None:
    async def check(box: Box) -> None:
        await _stream(box, LONG)
        heads = await asyncio.gather(*(_stream(box, f"hi {i}") for i in range(6)))
        heads += await asyncio.gather(*(_stream(box, LONG + f" {i}") for i in range(4)))
        whole = [h for h in heads if h["x-pdbox-pd"] == "whole"]
        assert whole, "hybrid: the prefill worker served nothing whole"
        assert all(h["x-pdbox-decode-worker"] == "prefill-0" for h in whole)
        assert all("(hybrid)" in h["x-pdbox-pd-reason"] for h in whole)
        assert not any("kept for prefill" in h["x-pdbox-pd-reason"] for h in heads)

    run(check, SLOW, pd_profile(soft_roles_hold_s=60.0))


def test_soft_roles_off_is_a_fixed_split() -> None:
    async def check(box: Box) -> None:
        heads = await asyncio.gather(*(_stream(box, f"hi {i}") for i in range(6)))
        assert {h["x-pdbox-decode-worker"] for h in heads} == {"decode-0"}
        assert box.mocks["prefill-0"].stats.requests == 0
        assert box.router.admission.max_inflight == box.router.profile.router.max_inflight_per_worker

    run(check, SLOW, pd_profile(soft_roles=False, max_inflight_per_worker=8))


def test_admission_counts_the_prefill_workers_slots() -> None:
    async def check(box: Box) -> None:
        per = box.router.profile.router.max_inflight_per_worker
        assert box.router.admission.max_inflight == 2 * per

    run(check, PD, pd_profile(max_inflight_per_worker=8))


def test_with_no_decode_worker_ready_the_prefill_worker_serves_everything() -> None:
    async def check(box: Box) -> None:
        dec = box.router.registry.get("decode-0")
        assert dec is not None
        dec.state = "restarting"
        box.router.capacity_changed()
        async with box.client.get(f"{box.url}/health") as r:
            assert r.status == 200
        for prompt in ("short", LONG):
            h = await _stream(box, prompt)
            assert h["x-pdbox-pd"] == "whole" and h["x-pdbox-decode-worker"] == "prefill-0"
            assert "no decode worker ready" in h["x-pdbox-pd-reason"]
        assert box.mocks["decode-0"].stats.requests == 0

    run(check, PD, pd_profile())


def test_a_forced_path_never_goes_whole() -> None:
    async def check(box: Box) -> None:
        for _ in range(3):
            async with box.post("/v1/completions", completion("short"),
                                headers={"x-pdbox-pd": "local"}) as r:
                assert r.status == 200 and r.headers["x-pdbox-pd"] == "local"
        assert box.mocks["prefill-0"].stats.requests == 0

    run(check, PD, pd_profile())
