"""Overload, accounting, worker faults and graceful shutdown: a real `pdbox up
--headless --attach` in front of mock vLLM servers running as processes.

The mocks stand in for the workers only (no model is run), so these tests are
cheap enough for 60 s of 10x overload; everything in front of them is pdbox
itself: admission, routing, retries, the attach health loop, SIGTERM
handling. Each load run goes through scripts/loadtest.py, which records
every request id and asserts it ends exactly once.

Marked e2e: they take minutes, not seconds, and belong to the e2e stage,
though they start no vLLM worker and need no worker lock.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest

from tests.faults.conftest import (
    REPO,
    AttachedPdbox,
    MockProcess,
    http_json,
    start_attached_pdbox,
    start_mock_process,
)

pytestmark = pytest.mark.e2e

# Each mock answer streams TOKENS tokens ITL_MS apart: about 0.8 s per request.
TOKENS, ITL_MS = 16, 50
INFLIGHT_PER_WORKER = 2
QUEUE_BOUND = 32
# Two workers x 2 slots / 0.8 s per request.
SUSTAINABLE_RPS = 2 * INFLIGHT_PER_WORKER / (TOKENS * ITL_MS / 1000)
SLO_TTFT_S = 3.0
REQUEST_TIMEOUT_S = 10.0


def write_profile(tmp: Path) -> Path:
    text = (REPO / "profiles" / "cpu-aggregated.toml").read_text()
    text = text.replace('name = "cpu-aggregated"', 'name = "faults-mock"')
    text = text.replace("kv_events = true", f"""kv_events = false
queue_bound = {QUEUE_BOUND}
max_inflight_per_worker = {INFLIGHT_PER_WORKER}
request_timeout_s = {REQUEST_TIMEOUT_S}""")
    text = text.replace("ttft_s = 3.0", f"ttft_s = {SLO_TTFT_S}")
    path = tmp / "faults-mock.toml"
    path.write_text(text)
    return path


def loadtest(url: str, rate: float, duration: float, *, pid: int | None = None,
             batch_share: float = 0.5, stream_share: float = 0.5,
             timeout: float = 60.0) -> dict[str, Any]:
    argv = [sys.executable, str(REPO / "scripts" / "loadtest.py"), "--url", url,
            "--rate", str(rate), "--duration", str(duration), "--batch-share", str(batch_share),
            "--stream-share", str(stream_share), "--max-tokens", str(TOKENS),
            "--timeout", str(timeout), "--json"]
    if pid:
        argv += ["--pid", str(pid)]
    out = subprocess.run(argv, capture_output=True, text=True, cwd=REPO,
                         timeout=duration + timeout + 60)
    assert out.stdout.strip(), out.stderr[-2000:]
    summary = json.loads(out.stdout)
    print(f"\nloadtest rate={rate} duration={duration}: {json.dumps(summary)}")
    return summary


def status(box: AttachedPdbox) -> dict[str, Any]:
    code, snap = http_json(f"{box.base}/pdbox/v1/status",
                           headers={"Authorization": f"Bearer {box.token()}"})
    assert code == 200, snap
    return snap


@pytest.fixture
def mocks() -> Iterator[list[MockProcess]]:
    started = [start_mock_process("--tokens", str(TOKENS), "--itl-ms", str(ITL_MS))
               for _ in range(2)]
    yield started
    for m in started:
        m.kill(signal.SIGCONT)
        m.stop()


@pytest.fixture
def box(tmp_path: Path, mocks: list[MockProcess]) -> Iterator[AttachedPdbox]:
    prof = write_profile(tmp_path)
    b = start_attached_pdbox(tmp_path, [m.url for m in mocks], "--profile", str(prof))
    yield b
    b.stop()


def test_overload_10x_for_60s(box: AttachedPdbox) -> None:
    """10x the sustainable rate for 60 s: bounded memory, 429 + Retry-After past the
    request limit or the queue bound, interactive ahead of batch, nothing lost,
    recovery without restart."""
    pid = box.proc.pid
    rate = 10 * SUSTAINABLE_RPS
    # 10 % interactive (half the capacity), the rest batch.
    s = loadtest(box.endpoint, rate, 60, pid=pid, batch_share=0.9, timeout=120)
    assert s["lost"] == 0, s
    assert s["duplicated"] == 0, s
    assert s["sent"] == s["completed"] + s["errors"] + s["rejected_429"] + s["refused"]
    assert s["refused"] == 0
    assert s["rejected_429"] > 0 and s["missing_retry_after"] == 0
    assert s["errors"] == 0, s["error_kinds"]
    # Admitted interactive requests overtake the batch queue. Admission queues
    # whatever it predicts to answer within the request limit and refuses only
    # past it, so an admitted request waits less than the limit, not less than
    # the TTFT target (docs/RELIABILITY.md).
    inter, batch = s["ttft"]["interactive"], s["ttft"]["batch"]
    assert inter["n"] > 0 and inter["p99_s"] <= REQUEST_TIMEOUT_S, inter
    assert batch["p50_s"] > inter["p50_s"], (inter, batch)
    # Memory: the queue is bounded, so is the router.
    rss = s["rss_mb"]
    assert rss["max"] - rss["first"] < 150, rss
    # Recovery without a restart: same process, empty queue, every request served.
    assert box.proc.poll() is None
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        snap = status(box)
        if snap["router"]["queued"] == 0 and all(w["inflight"] == 0 for w in snap["workers"]):
            break
        time.sleep(0.5)
    after = loadtest(box.endpoint, SUSTAINABLE_RPS / 2, 5)
    assert after["completed"] == after["sent"] > 0, after
    assert psutil.Process(pid).is_running()


def test_worker_sigkill_and_sigstop_under_load(box: AttachedPdbox,
                                               mocks: list[MockProcess]) -> None:
    """A worker SIGSTOPped (hang) and another SIGKILLed mid-stream, under load:
    every request ends exactly once, within its timeout, completed or with an
    explicit error; requests not yet started go to the other worker."""
    result: dict[str, Any] = {}

    def load() -> None:
        result.update(loadtest(box.endpoint, SUSTAINABLE_RPS * 0.6, 30, stream_share=0.7,
                               timeout=REQUEST_TIMEOUT_S + 20))

    t = threading.Thread(target=load)
    t.start()
    time.sleep(4)
    hung = mocks[0]
    t_stop = time.monotonic()
    hung.kill(signal.SIGSTOP)
    # The attach health loop marks it failed within its 3 s probe timeout.
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        if any(w["url"] == hung.url and w["state"] == "failed" for w in status(box)["workers"]):
            break
        time.sleep(0.2)
    hang_detected_s = time.monotonic() - t_stop
    assert hang_detected_s < 15
    time.sleep(REQUEST_TIMEOUT_S + 1)
    hung.kill(signal.SIGCONT)
    # Back in rotation once /health answers again.
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        if all(w["state"] == "ready" for w in status(box)["workers"]):
            break
        time.sleep(0.2)
    hang_recovered_s = time.monotonic() - t_stop
    time.sleep(1)
    killed = mocks[1]
    t_kill = time.monotonic()
    killed.kill(signal.SIGKILL)
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        if any(w["url"] == killed.url and w["state"] == "failed" for w in status(box)["workers"]):
            break
        time.sleep(0.2)
    kill_detected_s = time.monotonic() - t_kill
    t.join(120)
    s = result
    print(f"\nhang detected in {hang_detected_s:.1f}s, back in {hang_recovered_s:.1f}s; "
          f"kill detected in {kill_detected_s:.1f}s")
    assert s["lost"] == 0, s
    assert s["duplicated"] == 0, s
    assert s["refused"] == 0
    # No request outlived its time limit: every wait and leg shares one deadline.
    assert s["longest_s"] <= REQUEST_TIMEOUT_S + 2, s
    # Most requests were served by the surviving worker.
    assert s["completed"] >= 0.7 * s["sent"], s
    snap = status(box)
    assert snap["router"]["requests_total"] >= s["sent"]


def test_sigterm_under_load_drains_then_exits(box: AttachedPdbox) -> None:
    """SIGTERM: new requests get 503, requests in flight finish, pdbox exits 0."""
    result: dict[str, Any] = {}

    def load() -> None:
        result.update(loadtest(box.endpoint, SUSTAINABLE_RPS * 0.8, 8, stream_share=1.0,
                               timeout=30))

    t = threading.Thread(target=load)
    t.start()
    time.sleep(4)
    t_term = time.monotonic()
    os.killpg(box.proc.pid, signal.SIGTERM)
    # While draining, the endpoint answers 503 with Retry-After.
    seen_503 = False
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and box.proc.poll() is None:
        code, body = http_json(f"{box.endpoint}/chat/completions", {
            "model": "smollm2", "messages": [{"role": "user", "content": "hi"}]}, timeout=5)
        if code == 503:
            seen_503 = True
            break
        time.sleep(0.05)
    code = box.proc.wait(60)
    stopped_s = time.monotonic() - t_term
    t.join(60)
    s = result
    print(f"\nSIGTERM to exit: {stopped_s:.1f}s")
    assert code == 0, box.stderr()[-2000:]
    assert seen_503
    assert s["lost"] == 0 and s["duplicated"] == 0, s
    # Requests admitted before SIGTERM completed; later ones were refused or got 503.
    assert s["completed"] > 0
    assert set(s["error_kinds"]) <= {"503: pdbox is shutting down."}, s["error_kinds"]
    assert not (box.home / "run" / "state.json").exists()
