"""Live figures through a real `pdbox up --headless --attach` in front of a mock worker
process: tokens/s is counted in tokens (a worker streaming 2,000 tokens/s reads as about
2,000, not the ~410 that counting network reads gave), and answers that are not streamed
feed TTFT and tokens/s as well, as `pdbox status --json` shows them.

Marked e2e (it takes half a minute), but it starts no vLLM worker and needs no lock.
"""

from __future__ import annotations

import json
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.faults.conftest import (
    AttachedPdbox,
    MockProcess,
    http_json,
    run_pdbox,
    start_attached_pdbox,
    start_mock_process,
)
from tests.faults.test_overload_mock import write_profile

pytestmark = pytest.mark.e2e

RATE = 2000  # tokens/s the mock streams: one token every 0.5 ms
STREAM_S = 15.0


@pytest.fixture
def mock() -> Iterator[MockProcess]:
    m = start_mock_process("--tokens", str(int(RATE * STREAM_S)), "--itl-ms", str(1000 / RATE))
    yield m
    m.stop()


def profile(tmp: Path) -> Path:
    """The mock-fault profile, with time for a stream longer than the rate window."""
    path = write_profile(tmp)
    path.write_text(path.read_text().replace("request_timeout_s = 10.0", "request_timeout_s = 120"))
    return path


@pytest.fixture
def box(tmp_path: Path, mock: MockProcess) -> Iterator[AttachedPdbox]:
    b = start_attached_pdbox(tmp_path, [mock.url], "--profile", str(profile(tmp_path)))
    yield b
    b.stop()


def status_json(box: AttachedPdbox) -> dict[str, Any]:
    out = run_pdbox(["status", "--json"], box.home)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


def stream(url: str, seen: dict[str, Any]) -> None:
    # No max_tokens: more than a context's worth, the mock's own length (--tokens) applies.
    body = {"model": "smollm2", "prompt": "go", "stream": True}
    req = urllib.request.Request(f"{url}/completions", data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    tokens = 0
    with urllib.request.urlopen(req, timeout=STREAM_S * 4) as r:
        for line in r:
            if line.startswith(b"data: {"):
                tokens += 1
                seen.setdefault("first", time.monotonic())
    seen["tokens"] = tokens
    seen["end"] = time.monotonic()


def test_a_2000_tokens_per_s_stream_reads_as_2000(box: AttachedPdbox) -> None:
    n = int(RATE * STREAM_S)
    seen: dict[str, Any] = {}
    t = threading.Thread(target=stream, args=(box.endpoint, seen), daemon=True)
    t.start()
    deadline = time.monotonic() + 30
    while "first" not in seen and time.monotonic() < deadline:
        time.sleep(0.05)
    assert "first" in seen, "the stream did not start"
    # The rate is taken over the last 10 s: look once the whole window is stream.
    time.sleep(max(0.0, seen["first"] + 11.0 - time.monotonic()))
    snap = status_json(box)["router"]
    t.join(STREAM_S * 4)
    assert seen.get("tokens") == n
    rate = snap["tokens_per_s"]
    if "end" in seen and seen["end"] - seen["first"] < 11.0:
        pytest.fail(f"the mock streamed too fast to measure: {seen}")
    wall = n / (seen["end"] - seen["first"])  # what the client really got
    print(f"\ntokens/s in pdbox status: {rate:.0f}; the client got {wall:.0f}")
    assert rate == pytest.approx(wall, rel=0.15), (rate, wall)
    assert rate > 1500, rate  # not ~410 (counting reads), not capped
    assert snap["itl_p50_s"] is not None and snap["itl_p50_s"] < 0.002
    assert status_json(box)["router"]["output_tokens_total"] == n


def test_non_streamed_answers_show_ttft_and_tokens_per_s(tmp_path: Path) -> None:
    mock = start_mock_process("--tokens", "12", "--itl-ms", "20", "--ttft-ms", "80")
    box = start_attached_pdbox(tmp_path, [mock.url], "--profile", str(profile(tmp_path)))
    try:
        body = {"model": "smollm2",
                "messages": [{"role": "user", "content": "What is the capital of France?"}]}
        finished: list[tuple[float, int]] = []
        for _ in range(20):
            code, out = http_json(f"{box.endpoint}/chat/completions", body)
            assert code == 200, out
            finished.append((time.monotonic(), out["usage"]["completion_tokens"]))
        before = time.monotonic()
        snap = status_json(box)["router"]
        after = time.monotonic()
        window = snap["rate_window_s"]
        # Answers that ended in the window for certain, and those that may have.
        sure = sum(n for t, n in finished if t >= after - window)
        maybe = sum(n for t, n in finished if t >= before - window - 0.5)
        shown = snap["tokens_per_s"] * window
        print(f"\ntokens in the window: status {shown:.0f}, usage {sure}..{maybe}; "
              f"TTFT p50 {snap['ttft_p50_s']}")
        assert 0.9 * sure <= shown <= 1.1 * maybe, (shown, sure, maybe)
        assert snap["output_tokens_total"] == sum(n for _, n in finished)
        # TTFT is there, and it is the time to the first token, not the whole answer.
        assert snap["ttft_p50_s"] is not None
        assert 0.05 < snap["ttft_p50_s"] < 0.25, snap["ttft_p50_s"]
        assert snap["engine"]["roles"]["aggregated"]["itl_count"] > 0
    finally:
        box.stop()
        mock.stop()
