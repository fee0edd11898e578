"""The TUI under load: pdbox's own CPU with its TUI running at N requests/s.

Starts two mock OpenAI backends (pdbox.devtools.mock_openai), runs `pdbox up
--attach ...` with its TUI inside a tmux session (a real terminal), sends a
steady stream of chat requests at `rps` for `seconds`, and samples the pdbox
process's CPU with psutil. Responsiveness: during the load it presses `?` in
the TUI (tmux send-keys) and times how long until the help screen is on
screen, then closes it. The mocks stand in for workers so that the figure is
pdbox's alone.
"""

from __future__ import annotations

import asyncio
import json
import os
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import psutil

from pdbox.bench.router_overhead import Procs, wait_http
from pdbox.router.metrics import percentile

MODEL = "smollm2"
HELP_MARK = "pdbox keys"  # a line of the TUI's help screen
KEY_EVERY_S = 5.0


class TuiLoadError(Exception):
    """The TUI benchmark cannot run here; str() is the sentence to show."""


@dataclass(frozen=True)
class Params:
    rps: float = 50.0
    seconds: float = 60.0
    start_timeout_s: float = 60.0


def tmux(*args: str) -> str:
    return subprocess.run(["tmux", *args], capture_output=True, text=True).stdout


def check_tmux() -> None:
    if shutil.which("tmux") is None:
        raise TuiLoadError("the TUI needs a real terminal and this benchmark gives it one "
                           "with tmux, which is not installed here")


async def load(endpoint: str, rps: float, seconds: float) -> dict[str, Any]:
    """Requests at a steady rate, each awaited in the background."""
    sent = ok = 0
    lat: list[float] = []
    body = {"model": MODEL, "stream": True, "max_tokens": 32,
            "messages": [{"role": "user", "content": "hello there"}]}

    async def one(s: aiohttp.ClientSession) -> None:
        nonlocal ok
        t = time.monotonic()
        async with s.post(f"{endpoint}/chat/completions", json=body) as r:
            await r.read()
            if r.status == 200:
                ok += 1
                lat.append(time.monotonic() - t)

    async with aiohttp.ClientSession() as s:
        tasks = []
        t0 = time.monotonic()
        while time.monotonic() - t0 < seconds:
            tasks.append(asyncio.create_task(one(s)))
            sent += 1
            await asyncio.sleep(max(0.0, t0 + sent / rps - time.monotonic()))
        await asyncio.gather(*tasks, return_exceptions=True)
    return {"sent": sent, "ok": ok, "rps_achieved": sent / seconds,
            "latency_p50_s": percentile(lat, 0.5)}


async def _mocks(procs: Procs) -> list[str]:
    urls = []
    for _ in range(2):
        p = procs.start([sys.executable, "-m", "pdbox.devtools.mock_openai", "--port", "0",
                         "--model", MODEL, "--tokens", "32", "--itl-ms", "5"])
        assert p.stdout is not None
        url = p.stdout.readline().decode().strip()
        if not url.startswith("http"):
            raise TuiLoadError("a mock server did not start")
        urls.append(url)
    for u in urls:
        await wait_http(f"{u}/health", 10)
    return urls


async def _drive(session: str, pdbox: psutil.Process, endpoint: str,
                 p: Params) -> dict[str, Any]:
    cpu: list[float] = []
    keys: list[float] = []
    stop = asyncio.Event()

    async def sampler() -> None:
        pdbox.cpu_percent(None)
        while not stop.is_set():
            await asyncio.sleep(1.0)
            cpu.append(pdbox.cpu_percent(None))

    async def presser() -> None:
        await asyncio.sleep(KEY_EVERY_S)
        while not stop.is_set():
            t = time.monotonic()
            tmux("send-keys", "-t", session, "?")
            while time.monotonic() - t < 10:
                if HELP_MARK in tmux("capture-pane", "-t", session, "-p"):
                    keys.append(time.monotonic() - t)
                    break
                await asyncio.sleep(0.02)
            tmux("send-keys", "-t", session, "Escape")
            await asyncio.sleep(KEY_EVERY_S)

    tasks = [asyncio.create_task(sampler()), asyncio.create_task(presser())]
    result = await load(endpoint, p.rps, p.seconds)
    stop.set()
    await asyncio.gather(*tasks)
    result.update({
        "pdbox_cpu_percent_mean": statistics.mean(cpu) if cpu else None,
        "pdbox_cpu_percent_max": max(cpu) if cpu else None,
        "help_key_latency_s": keys,
    })
    return result


def run(p: Params) -> dict[str, Any]:
    check_tmux()
    procs = Procs()
    session = f"pdbox-tui-{os.getpid()}"
    with tempfile.TemporaryDirectory(prefix="pdbox-tui-load-") as tmp:
        home = Path(tmp) / "home"
        try:
            urls = asyncio.run(_mocks(procs))
            cmd = shlex.join([sys.executable, "-m", "pdbox.cli", "up", "--profile",
                              "cpu-aggregated", "--port", "0",
                              *(a for u in urls for a in ("--attach", u))])
            tmux("new-session", "-d", "-s", session, "-x", "160", "-y", "48",
                 f"PDBOX_HOME={shlex.quote(str(home))} {cmd}")
            info = _wait_state(home / "run" / "state.json", p.start_timeout_s)
            time.sleep(3)  # let the TUI draw its first screens before measuring
            result = asyncio.run(_drive(session, psutil.Process(info["pid"]),
                                        info["endpoint"], p))
            result["tui_alive"] = "Workers" in tmux("capture-pane", "-t", session, "-p")
            return result
        finally:
            _quit(session)
            procs.stop_all()


def _wait_state(state: Path, timeout_s: float) -> dict[str, Any]:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            return json.loads(state.read_text())
        except (OSError, ValueError):  # not written yet, or half written
            time.sleep(0.2)
    raise TuiLoadError(f"pdbox up did not record its state within {timeout_s:.0f} s")


def _quit(session: str) -> None:
    """Quit the TUI as a user would (q, then y to stop the box), then end the session."""
    tmux("send-keys", "-t", session, "q")
    time.sleep(1)
    tmux("send-keys", "-t", session, "y")
    time.sleep(3)
    tmux("kill-session", "-t", session)
