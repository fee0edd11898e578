#!/usr/bin/env python3
"""The TUI under load: pdbox's own CPU with the TUI running at 50 requests/s.

Starts two mock OpenAI backends (pdbox.devtools.mock_openai), runs `pdbox up
--attach ...` with its TUI inside a tmux session (a real terminal), sends a
steady stream of chat requests at --rps for --seconds, and samples the pdbox
process's CPU with psutil. Responsiveness: during the load it presses `?` in the
TUI (tmux send-keys) and times how long until the help screen is on screen, then
closes it. The mocks stand in for workers so that the figure is pdbox's alone.

    .venv/bin/python scripts/bench_tui_load.py --rps 50 --seconds 60 [--json]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

import aiohttp
import psutil

from pdbox.bench.machine import record as machine_record

REPO = Path(__file__).resolve().parents[1]
PY = str(REPO / ".venv" / "bin" / "python")


def start_mock(port_file: Path) -> subprocess.Popen:
    p = subprocess.Popen([PY, "-m", "pdbox.devtools.mock_openai", "--port", "0", "--model",
                          "smollm2", "--tokens", "32", "--itl-ms", "5"],
                         stdout=subprocess.PIPE, text=True, start_new_session=True)
    return p


def tmux(*args: str) -> str:
    return subprocess.run(["tmux", *args], capture_output=True, text=True).stdout


async def load(endpoint: str, rps: float, seconds: float) -> dict:
    sent = ok = 0
    lat: list[float] = []
    body = {"model": "smollm2", "stream": True, "max_tokens": 32,
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
            "latency_p50_s": statistics.median(lat) if lat else None}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rps", type=float, default=50)
    ap.add_argument("--seconds", type=float, default=60)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    mocks = [start_mock(Path()) for _ in range(2)]
    urls = [m.stdout.readline().strip() for m in mocks]  # type: ignore[union-attr]
    home = Path(tempfile.mkdtemp(prefix="pdbox-tui-load-"))
    session = f"pdbox-tui-{os.getpid()}"
    cmd = (f"PDBOX_HOME={home} {REPO}/.venv/bin/pdbox up --profile cpu-aggregated --port 0 "
           + " ".join(f"--attach {u}" for u in urls))
    tmux("new-session", "-d", "-s", session, "-x", "160", "-y", "48", cmd)
    try:
        state = home / "run" / "state.json"
        deadline = time.monotonic() + 60
        while not state.exists() and time.monotonic() < deadline:
            time.sleep(0.2)
        info = json.loads(state.read_text())
        pdbox = psutil.Process(info["pid"])
        time.sleep(3)
        cpu_samples: list[float] = []
        key_latency: list[float] = []

        async def sampler(stop: asyncio.Event) -> None:
            pdbox.cpu_percent(None)
            while not stop.is_set():
                await asyncio.sleep(1.0)
                cpu_samples.append(pdbox.cpu_percent(None))

        async def presser(stop: asyncio.Event) -> None:
            await asyncio.sleep(5)
            while not stop.is_set():
                t = time.monotonic()
                tmux("send-keys", "-t", session, "?")
                while time.monotonic() - t < 10:
                    if "pdbox keys" in tmux("capture-pane", "-t", session, "-p"):
                        key_latency.append(time.monotonic() - t)
                        break
                    await asyncio.sleep(0.02)
                tmux("send-keys", "-t", session, "Escape")
                await asyncio.sleep(5)

        async def run() -> dict:
            stop = asyncio.Event()
            tasks = [asyncio.create_task(sampler(stop)), asyncio.create_task(presser(stop))]
            result = await load(info["endpoint"], args.rps, args.seconds)
            stop.set()
            await asyncio.gather(*tasks)
            return result

        result = asyncio.run(run())
        screen = tmux("capture-pane", "-t", session, "-p")
        result.update({
            "pdbox_cpu_percent_mean": statistics.mean(cpu_samples) if cpu_samples else None,
            "pdbox_cpu_percent_max": max(cpu_samples) if cpu_samples else None,
            "help_key_latency_s": key_latency,
            "tui_alive": "Workers" in screen,
        })
    finally:
        tmux("send-keys", "-t", session, "q")
        time.sleep(1)
        tmux("send-keys", "-t", session, "y")
        time.sleep(3)
        tmux("kill-session", "-t", session)
        for m in mocks:
            m.terminate()
            m.wait(10)
    result["machine"] = machine_record()
    print(json.dumps(result, indent=2) if args.json else result)


if __name__ == "__main__":
    main()
