"""Small helpers shared by several test modules."""

from __future__ import annotations

import json
import time
from typing import Any

import psutil
from aiohttp import web


def process_gone(pid: int, timeout: float = 3.0) -> bool:
    """True once `pid` has exited (a zombie waiting to be reaped counts as gone)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if psutil.Process(pid).status() == psutil.STATUS_ZOMBIE:
                return True
        except psutil.NoSuchProcess:
            return True
        time.sleep(0.02)
    return False


def sse_events(raw: bytes) -> list[Any]:
    """The `data:` payloads of an SSE body: JSON objects, and "[DONE]" as a string."""
    out: list[Any] = []
    for block in raw.decode().split("\n\n"):
        if block.startswith("data: "):
            data = block[len("data: "):]
            out.append(data if data == "[DONE]" else json.loads(data))
    return out


async def serve_app(app: web.Application) -> tuple[web.AppRunner, str]:
    """Serve `app` on a free loopback port: (runner to clean up, base URL)."""
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    return runner, f"http://127.0.0.1:{port}"
