"""Small helpers shared by several test modules."""

from __future__ import annotations

import json
import time
from typing import Any

import psutil


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
