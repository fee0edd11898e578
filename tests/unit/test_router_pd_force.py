"""A client can ask for the P/D path of its request (x-pdbox-pd), e.g. to test the remote path."""

from __future__ import annotations

from tests.unit.test_router_app import LONG, PD, Box, completion, pd_profile, run


def test_the_header_forces_remote_or_local_and_a_bad_value_is_refused() -> None:
    async def check(box: Box) -> None:
        async with box.post("/v1/completions", completion("short"),
                            headers={"x-pdbox-pd": "remote"}) as r:
            assert r.status == 200 and r.headers["x-pdbox-pd"] == "remote"
            assert r.headers["x-pdbox-pd-reason"].startswith("remote: asked by the client")
        assert box.mocks["prefill-0"].stats.prefill_legs == 1
        async with box.post("/v1/completions", completion(LONG),
                            headers={"x-pdbox-pd": "local"}) as r:
            assert r.status == 200 and r.headers["x-pdbox-pd"] == "local"
        assert box.mocks["prefill-0"].stats.prefill_legs == 1
        async with box.post("/v1/completions", completion(LONG),
                            headers={"x-pdbox-pd": "sideways"}) as r:
            assert r.status == 400
            assert "x-pdbox-pd must be" in (await r.json())["error"]["message"]

    run(check, PD, pd_profile(pd_decider="adaptive"))
