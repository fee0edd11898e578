"""pdbox smoke: output formats, exit codes, and the checks against servers in this process.

The OpenAI checks run against the mock vLLM server (a worker stand-in, not a
pdbox: it accepts any content type and reports no cached tokens, so those two
checks must fail against it). The P/D and scale checks run against a small
fake of pdbox's router headers and control API that plays a worker starting
and stopping.
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from click.testing import CliRunner

from pdbox import smoke as sm
from pdbox.commands import smoke as cmd
from pdbox.control_client import ControlClient
from pdbox.devtools.mock_openai import MockServer
from tests.helpers import serve_app

RESULTS = [
    sm.CheckResult("health", True, "GET /health 200", 0.01),
    sm.CheckResult("pd_transfer", True, "not a P/D profile", 0.0, skipped=True),
    sm.CheckResult("prefix_hit", False, "cached 0 then 0 <&> \"x\"", 1.5),
]


# ------------------------------------------------------------------ output


def test_table_lists_every_check_with_its_result_and_a_summary() -> None:
    out = sm.render_table(RESULTS)
    lines = out.splitlines()
    assert lines[0].split()[:3] == ["check", "result", "seconds"]
    assert lines[1].split()[:3] == ["health", "ok", "0.01"]
    assert lines[2].split()[:2] == ["pd_transfer", "skip"]
    assert lines[3].split()[:3] == ["prefix_hit", "FAIL", "1.50"]
    assert lines[-1] == "1 passed, 1 failed, 1 skipped"


def test_json_has_the_documented_shape() -> None:
    data = json.loads(json.dumps(sm.to_json(RESULTS, {"pdbox": {"pid": 1}})))
    assert [c["name"] for c in data["checks"]] == ["health", "pd_transfer", "prefix_hit"]
    assert [c["ok"] for c in data["checks"]] == [True, True, False]
    assert all(isinstance(c["detail"], str) for c in data["checks"])
    assert data["checks"][1]["skipped"] is True
    assert data["pdbox"] == {"pid": 1}


def test_junit_has_one_testcase_per_check_and_a_failure_for_failed_ones() -> None:
    root = ET.fromstring(sm.to_junit(RESULTS))
    suite = root.find("testsuite")
    assert suite is not None
    assert (suite.get("tests"), suite.get("failures"), suite.get("skipped")) == ("3", "1", "1")
    cases = suite.findall("testcase")
    assert [c.get("name") for c in cases] == ["health", "pd_transfer", "prefix_hit"]
    assert cases[0].find("failure") is None and cases[0].find("skipped") is None
    assert cases[1].find("skipped") is not None
    failure = cases[2].find("failure")
    assert failure is not None and failure.get("message") == 'cached 0 then 0 <&> "x"'


def test_exit_code() -> None:
    assert sm.exit_code(RESULTS[:2]) == 0
    assert sm.exit_code(RESULTS) == 1
    assert sm.exit_code([]) == 1  # nothing checked is not a pass


def test_nixl_count_adds_labels_and_ignores_longer_names() -> None:
    from pdbox.router.metrics import sum_series

    text = ("# TYPE vllm:nixl_xfer_time_seconds histogram\n"
            'vllm:nixl_xfer_time_seconds_count{engine="0"} 2.0\n'
            'vllm:nixl_xfer_time_seconds_count{engine="1"} 3.0\n'
            "vllm:nixl_xfer_time_seconds_count_other 7.0\n"
            "vllm:nixl_xfer_time_seconds_sum 0.5\n")
    assert sum_series(text, sm.NIXL_COUNT) == 5.0
    assert sum_series("", sm.NIXL_COUNT) == 0.0


def test_unique_text_is_unique_and_about_the_asked_length() -> None:
    a, b = sm.unique_text(100), sm.unique_text(100)
    assert a != b
    assert 100 <= len(a.split()) <= 102


# ------------------------------------------------------------------ command


def _inject(monkeypatch: pytest.MonkeyPatch, results: list[sm.CheckResult]) -> None:
    monkeypatch.setattr(cmd, "_target", lambda url: ("http://127.0.0.1:9/v1", None))
    monkeypatch.setattr(cmd, "_run", lambda endpoint, control, timeout_s: list(results))


def test_command_exits_zero_when_every_check_passes(monkeypatch, tmp_path) -> None:
    _inject(monkeypatch, RESULTS[:2])
    junit = tmp_path / "out" / "smoke.xml"
    r = CliRunner().invoke(cmd.smoke, ["--json", "--junit", str(junit)])
    assert r.exit_code == 0, r.output
    assert [c["ok"] for c in json.loads(r.stdout)["checks"]] == [True, True]
    assert [c.get("name") for c in ET.parse(junit).getroot().iter("testcase")] == [
        "health", "pd_transfer"]


def test_command_exits_one_when_a_check_fails(monkeypatch) -> None:
    _inject(monkeypatch, RESULTS)
    r = CliRunner().invoke(cmd.smoke, [])
    assert r.exit_code == 1
    assert "prefix_hit   FAIL" in r.stdout
    assert r.stdout.rstrip().endswith("1 passed, 1 failed, 1 skipped")


def test_command_without_a_running_pdbox_says_so(monkeypatch, tmp_path) -> None:
    monkeypatch.setenv("PDBOX_HOME", str(tmp_path))
    r = CliRunner().invoke(cmd.smoke, [])
    assert r.exit_code == 1
    assert cmd.NOT_RUNNING in r.output
    assert "Traceback" not in r.output


def test_command_refuses_url_with_up_and_profile_without_up(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("PDBOX_HOME", str(tmp_path))
    r = CliRunner().invoke(cmd.smoke, ["--up", "--url", "http://127.0.0.1:1"])
    assert r.exit_code == 2 and "do not go together" in r.output
    r = CliRunner().invoke(cmd.smoke, ["--profile", "cpu-tiny"])
    assert r.exit_code == 2 and "--up only" in r.output


def test_command_reports_an_unwritable_junit_file(monkeypatch, tmp_path) -> None:
    _inject(monkeypatch, RESULTS[:1])
    blocker = tmp_path / "file"
    blocker.write_text("")
    r = CliRunner().invoke(cmd.smoke, ["--junit", str(blocker / "x.xml")])
    assert r.exit_code == 1 and "cannot write" in r.output


# ------------------------------------------------- checks against the mock worker


def test_checks_against_the_mock_worker() -> None:
    async def go() -> list[sm.CheckResult]:
        async with MockServer() as m:
            return await sm.run_checks(m.url, None)

    got = {r.name: r for r in asyncio.run(go())}
    assert [n for n, _ in sm.CHECKS] == list(got)
    for name in ("health", "models", "completion", "stream_chat"):
        assert got[name].ok and not got[name].skipped, got[name]
    assert "smollm2" in got["models"].detail
    # The mock accepts any content type and reports no cached tokens: both must be caught.
    assert not got["bad_input"].ok
    assert got["bad_input"].detail == "wrong content type: 200, want 415"
    assert not got["prefix_hit"].ok and "cached_tokens is missing" in got["prefix_hit"].detail
    for name in ("pd_transfer", "scale"):
        assert got[name].ok and got[name].skipped


def test_a_dead_endpoint_fails_every_check_without_raising() -> None:
    got = asyncio.run(sm.run_checks("http://127.0.0.1:9", None, request_timeout_s=5))
    assert not got[0].ok and "HTTP failed" in got[0].detail
    assert sm.exit_code(got) == 1


# --------------------------------------------- checks against a fake pdbox


class FakePdbox:
    """pdbox's router headers, one decode worker's /metrics and the control API.

    The P/D decider answers `local` for the first `local_first` long prompts;
    a scaled-up worker is `starting` for `start_polls` status calls.
    """

    def __init__(self, mode: str = "pd", local_first: int = 1, count_moves: bool = True,
                 max_decode: int = 2, start_polls: int = 2) -> None:
        self.mode = mode
        self.local_first = local_first
        self.count_moves = count_moves
        self.max_decode = max_decode
        self.start_polls = start_polls
        self.nixl = 0
        self.long_prompts = 0
        self.scale_calls: list[Any] = []
        self.workers: dict[str, dict[str, Any]] = {}
        self._starting: dict[str, int] = {}
        self.url = ""
        app = web.Application()
        app.router.add_get("/metrics", self.metrics)
        app.router.add_post("/v1/completions", self.completions)
        app.router.add_get("/pdbox/v1/status", self.status)
        app.router.add_post("/pdbox/v1/scale", self.scale)
        self.app = app

    async def __aenter__(self) -> FakePdbox:
        self.runner, self.url = await serve_app(self.app)
        role = "decode" if self.mode == "pd" else "aggregated"
        self.role = role
        self.workers[f"{role}-0"] = {"id": f"{role}-0", "role": role, "state": "ready",
                                     "url": self.url, "slice": "cores 1"}
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.runner.cleanup()

    async def metrics(self, request: web.Request) -> web.Response:
        return web.Response(text=f'vllm:nixl_xfer_time_seconds_count{{engine="0"}} '
                                 f"{float(self.nixl)}\n")

    async def completions(self, request: web.Request) -> web.StreamResponse:
        body = await request.json()
        headers = {"x-pdbox-decode-worker": f"{self.role}-0", "x-pdbox-pd": "aggregated"}
        if len(str(body["prompt"]).split()) > 300:
            self.long_prompts += 1
            remote = self.long_prompts > self.local_first
            headers["x-pdbox-pd"] = "remote" if remote else "local"
            headers["x-pdbox-pd-reason"] = "remote: faster" if remote else "local: no gain"
            if remote:
                headers["x-pdbox-prefill-worker"] = "prefill-0"
                if self.count_moves:
                    self.nixl += 1
        if not body.get("stream"):
            return web.json_response({"choices": [{"text": " ok"}],
                                      "usage": {"completion_tokens": 1}}, headers=headers)
        resp = web.StreamResponse(headers=headers)
        resp.content_type = "text/event-stream"
        await resp.prepare(request)
        await resp.write(b'data: {"choices": [{"text": " ok"}]}\n\ndata: [DONE]\n\n')
        await resp.write_eof()
        return resp

    async def status(self, request: web.Request) -> web.Response:
        for wid, n in list(self._starting.items()):
            if n <= 0:
                self.workers[wid]["state"] = "ready"
                del self._starting[wid]
            else:
                self._starting[wid] = n - 1
        current = sum(1 for w in self.workers.values() if w["state"] not in sm.GONE_STATES)
        return web.json_response({
            "mode": self.mode, "workers": list(self.workers.values()),
            "autoscaler": {"roles": {self.role: {"current": current, "min": 1,
                                                 "max": self.max_decode}}}})

    async def scale(self, request: web.Request) -> web.Response:
        body = await request.json()
        self.scale_calls.append(body["replicas"])
        n = body["replicas"]
        if n == "auto":
            return web.json_response({"role": body["role"], "replicas": "auto"})
        alive = [w for w in self.workers.values() if w["state"] not in sm.GONE_STATES]
        for i in range(len(alive), n):
            wid = f"{self.role}-{i}"
            self.workers[wid] = {"id": wid, "role": self.role, "state": "starting",
                                 "url": self.url, "slice": "cores 1"}
            self._starting[wid] = self.start_polls
        for w in alive[n:]:
            w["state"] = "stopped"
        return web.json_response({"role": body["role"], "replicas": n})


async def _check(fake: FakePdbox, attr: str, **kw: Any) -> str:
    async def no_sleep(_: float) -> None:
        await asyncio.sleep(0)

    control = ControlClient(fake.url, "t")
    async with aiohttp.ClientSession() as s:
        smoke = sm.Smoke(fake.url, control, s, sleep=no_sleep, **kw)
        smoke.model = "smollm2"
        try:
            return await getattr(smoke, attr)()
        finally:
            await control.close()


def _run_check(fake_kwargs: dict[str, Any], attr: str, **kw: Any) -> str:
    async def go() -> str:
        async with FakePdbox(**fake_kwargs) as fake:
            return await _check(fake, attr, **kw)

    return asyncio.run(go())


def test_pd_check_retries_when_the_decider_prefills_locally() -> None:
    detail = _run_check({"local_first": 2}, "check_pd")
    assert detail.startswith("remote on try 3 (prefill-0 → decode-0), NIXL transfers +1")


def test_pd_check_fails_after_three_local_decisions_and_says_why() -> None:
    with pytest.raises(sm.CheckFailed, match="locally every time.*local: no gain"):
        _run_check({"local_first": 5}, "check_pd")


def test_pd_check_fails_when_remote_moved_no_kv() -> None:
    ticks = iter(range(10_000))
    with pytest.raises(sm.CheckFailed, match="remote .* but vllm:nixl_xfer_time_seconds_count"):
        _run_check({"count_moves": False}, "check_pd", clock=lambda: float(next(ticks)))


def test_pd_check_is_skipped_on_an_aggregated_profile() -> None:
    with pytest.raises(sm.CheckSkipped, match="not a P/D profile"):
        _run_check({"mode": "aggregated"}, "check_pd")


def test_scale_check_adds_a_worker_serves_removes_it_and_hands_back_to_auto() -> None:
    async def go() -> tuple[str, list[Any], dict[str, Any]]:
        async with FakePdbox(start_polls=3) as fake:
            detail = await _check(fake, "check_scale", poll_s=0.0)
            return detail, fake.scale_calls, fake.workers

    detail, calls, workers = asyncio.run(go())
    assert calls == [2, 1, "auto"]
    assert "decode 1→2: decode-1 ready in" in detail
    assert "requests served by decode-0, decode-0" in detail
    assert detail.endswith("back to auto")
    assert workers["decode-1"]["state"] == "stopped"


def test_scale_check_times_out_and_still_hands_back_to_auto() -> None:
    ticks = iter(range(0, 10_000, 10))

    async def go() -> list[Any]:
        async with FakePdbox(start_polls=10_000) as fake:
            with pytest.raises(sm.CheckFailed, match="did not finish within 30 s"):
                await _check(fake, "check_scale", poll_s=0.0, scale_timeout_s=30.0,
                             clock=lambda: float(next(ticks)))
            return fake.scale_calls

    assert asyncio.run(go())[-1] == "auto"


def test_scale_check_is_skipped_at_the_maximum() -> None:
    with pytest.raises(sm.CheckSkipped, match="already has 1 of at most 1"):
        _run_check({"max_decode": 1}, "check_scale")


# ------------------------------------------------------------------ --up


def test_up_process_reports_an_early_exit_and_leaves_nothing(tmp_path: Path) -> None:
    env = {"PDBOX_HOME": str(tmp_path), "PATH": "/usr/bin:/bin"}
    up = sm.UpProcess("no-such-profile", env=env, stop_grace_s=10)
    up.start()
    with pytest.raises(sm.UpFailed, match="exited with code 2 before it was ready"):
        up.wait_ready(60)
    r = up.stop()
    assert (r.code, r.left, r.forced, r.clean) == (2, [], False, False)
    assert up.pid is not None and not sm.live_members({up.pid})


class ScriptUp(sm.UpProcess):
    """An UpProcess whose 'pdbox' is a small script: the stop paths without workers."""

    def __init__(self, script: str, **kw: Any) -> None:
        super().__init__(None, **kw)
        self.script = script

    def argv(self) -> list[str]:
        return [sys.executable, "-c", self.script]


STUBBORN = ("import signal, time\n"
            "signal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
            "print('http://127.0.0.1:1/v1', flush=True)\n"
            "time.sleep(600)\n")


def test_up_process_that_ignores_sigterm_is_killed() -> None:
    up = ScriptUp(STUBBORN, stop_grace_s=1.0)
    up.start()
    assert up.wait_ready(30) == "http://127.0.0.1:1/v1"
    r = up.stop()
    assert r.forced and r.code == -9 and not r.clean
    assert not sm.live_members({up.pid})


def test_up_process_child_left_in_its_group_is_found_and_killed() -> None:
    parent = ("import subprocess, sys, time\n"
              f"subprocess.Popen([sys.executable, '-c', {STUBBORN!r}])\n"
              "print('http://127.0.0.1:1/v1', flush=True)\n"
              "time.sleep(600)\n")
    up = ScriptUp(parent, stop_grace_s=10.0, settle_s=0.5)
    up.start()
    up.wait_ready(30)
    time.sleep(0.5)  # the child sets its SIGTERM handler
    r = up.stop()
    assert r.code == -15 and not r.forced
    assert len(r.left) == 1 and "python" in r.left[0]
    assert not r.clean
    deadline = time.monotonic() + 5
    while sm.live_members({up.pid}) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not sm.live_members({up.pid})


POLITE = ("import time\n"
          "print('http://127.0.0.1:1/v1', flush=True)\n"
          "time.sleep(600)\n")


def test_command_up_reports_a_pdbox_without_run_folder_and_stops_it(monkeypatch,
                                                                       tmp_path) -> None:
    monkeypatch.setenv("PDBOX_HOME", str(tmp_path))
    monkeypatch.setattr(sm.UpProcess, "argv", lambda self: [sys.executable, "-c", POLITE])
    r = CliRunner().invoke(cmd.smoke, ["--up", "--json", "--timeout", "30"])
    assert r.exit_code == 1, r.output
    data = json.loads(r.stdout)
    up, down = data["checks"]
    assert up["name"] == "up" and not up["ok"] and "pdbox is not running" in up["detail"]
    assert down["name"] == "down" and not down["ok"]  # killed by SIGTERM: exit code -15
    assert not sm.live_members({data["pdbox"]["pgid"]})


def test_command_up_interrupted_still_stops_the_pdbox(monkeypatch, tmp_path) -> None:
    monkeypatch.setenv("PDBOX_HOME", str(tmp_path))
    monkeypatch.setattr(sm.UpProcess, "argv", lambda self: [sys.executable, "-c", POLITE])
    started: list[sm.UpProcess] = []
    real_start = sm.UpProcess.start

    def start(self: sm.UpProcess) -> None:
        started.append(self)
        real_start(self)

    def interrupted(timeout_s: float) -> str:
        raise KeyboardInterrupt

    monkeypatch.setattr(sm.UpProcess, "start", start)
    monkeypatch.setattr(sm.UpProcess, "wait_ready", lambda self, t: interrupted(t))
    r = CliRunner().invoke(cmd.smoke, ["--up"])
    assert r.exit_code == 130
    assert started and started[0].pid is not None
    assert not sm.live_members({started[0].pid})
