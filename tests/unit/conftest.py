"""Fixtures shared by the unit tests of `pdbox bench`."""

from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path

import pytest

from pdbox.bench import box as boxes


@pytest.fixture
def mock_boxes(monkeypatch):
    """boxes.start -> a mock OpenAI server, in its own process group."""
    started: list[boxes.Box] = []

    def start(work: Path, profile_file: Path, extra=None, timeout_s: float = 900.0,
              all_ready: bool = True, clock=None) -> boxes.Box:
        proc = subprocess.Popen(
            [sys.executable, "-m", "pdbox.devtools.mock_openai", "--port", "0", "--tokens",
             "16", "--ttft-ms", "20", "--itl-ms", "5"],
            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, start_new_session=True)
        assert proc.stdout is not None
        url = proc.stdout.readline().decode().strip()
        (work / "home").mkdir(parents=True, exist_ok=True)
        b = boxes.Box(proc, work / "home", work / "log", endpoint=f"{url}/v1",
                      endpoint_s=0.1, ready_s=0.2)
        started.append(b)
        return b

    monkeypatch.setattr(boxes, "start", start)
    yield started
    for b in started:  # a failed test leaves nothing running
        if b.proc.poll() is None:
            b.proc.send_signal(signal.SIGKILL)
            b.proc.wait(5)
