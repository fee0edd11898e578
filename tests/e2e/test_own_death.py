"""pdbox's own death, on real workers (cpu-tiny: prefill and decode).

1. pdbox SIGKILLed under load (a few streams in flight): every process of its
   workers (the API servers, vLLM's engine cores and model workers, and any
   process whose environment names this pdbox) is gone within 10 s.
2. `pdbox up` again with the same PDBOX_HOME serves a completion with no
   manual step, and says in one line what it found of the dead pdbox.
3. SIGTERM under load: pdbox exits 0 only once every process it started is
   gone, and prints how long that took.

Times are printed (`-s`) for docs/RELIABILITY.md.
"""

from __future__ import annotations

import os
import re
import signal
import threading
import time
from pathlib import Path
from typing import Any

import psutil
import pytest

from pdbox.strays import started_by
from pdbox.workers import pgroup
from tests.e2e.conftest import Pdbox, start_pdbox, stop_group
from tests.faults.conftest import http_json, stream_events

pytestmark = pytest.mark.e2e

GONE_WITHIN_S = 10.0
STREAMS = 4


def worker_processes(box: Pdbox, state: dict[str, Any]) -> dict[int, str]:
    """pid -> name of every live process of this pdbox's workers: the members of
    the groups in its state.json, and whatever names this pdbox in its environment."""
    out: dict[int, str] = {}
    pids = [p for w in state["workers"] for p in pgroup.live_pids(w["pgid"])]
    pids += [p.pid for p in started_by(box.proc.pid, state["create_time"])]
    for pid in pids:
        try:
            p = psutil.Process(pid)
            if p.status() != psutil.STATUS_ZOMBIE:
                out[pid] = p.name()
        except psutil.Error:
            pass
    return out


def load(box: Pdbox, n: int, tokens: int) -> None:
    """Start n streamed chats; return once every one has its first tokens."""
    started = threading.Barrier(n + 1)
    body = {"model": "smollm2", "max_tokens": tokens, "temperature": 0, "ignore_eos": True,
            "messages": [{"role": "user", "content": "Tell me a long story about a river."}]}

    def one() -> None:
        try:
            stream_events(box, body, on_first=lambda: started.wait(120), timeout=120)
        except (OSError, ValueError, threading.BrokenBarrierError):
            pass  # cut when pdbox goes: that is the test

    for _ in range(n):
        threading.Thread(target=one, daemon=True).start()
    started.wait(180)


def test_pdbox_death_and_stop_leave_no_worker_process(tmp_path: Path) -> None:
    box = start_pdbox(tmp_path, ["--profile", "cpu-tiny"])
    boxes = [box]
    groups: list[int] = []
    try:
        state = box.state()
        groups += [w["pgid"] for w in state["workers"]]
        procs = worker_processes(box, state)
        # The whole tree is watched, not only the API servers pdbox started.
        names = sorted(procs.values())
        assert names.count("VLLM::EngineCore") == 2 and names.count("VLLM::Worker") == 2, names

        # 1. SIGKILL of pdbox alone (its workers lead their own groups) under load.
        load(box, STREAMS, 400)
        t0 = time.monotonic()
        box.proc.kill()
        box.proc.wait(10)
        left = worker_processes(box, state)
        while left and time.monotonic() - t0 < GONE_WITHIN_S:
            time.sleep(0.05)
            left = worker_processes(box, state)
        gone_s = time.monotonic() - t0
        assert not left, f"still running {GONE_WITHIN_S:.0f} s after pdbox died: {left}"
        dead = box.proc.pid

        # 2. The next `pdbox up` on the same home starts clean and serves.
        t1 = time.monotonic()
        box = start_pdbox(tmp_path, ["--profile", "cpu-tiny"])
        boxes.append(box)
        up_s = time.monotonic() - t1
        state = box.state()
        groups += [w["pgid"] for w in state["workers"]]
        assert re.search(rf"pdbox: (pdbox {dead} died without stopping; none of its worker "
                         rf"processes was left running|ended \d+ leftover worker group)",
                         box.stderr()), box.stderr()[-2000:]
        code, out = http_json(f"{box.endpoint}/chat/completions", {
            "model": "smollm2", "max_tokens": 8,
            "messages": [{"role": "user", "content": "Say hello."}]}, timeout=120)
        assert code == 200 and out["choices"][0]["message"]["content"].strip(), out

        # 3. SIGTERM under load: the streams finish (pdbox drains them), then pdbox
        # exits once nothing of its workers is left.
        load(box, STREAMS, 48)
        t2 = time.monotonic()
        box.proc.send_signal(signal.SIGTERM)
        assert box.proc.wait(120) == 0, box.stderr()[-2000:]
        exit_s = time.monotonic() - t2
        assert worker_processes(box, state) == {}
        m = re.search(r"pdbox: stopped in (\d+\.\d) s; all worker processes gone"
                      r"(?: \((\d+\.\d) s of it for the requests in flight\))?\n", box.stderr())
        assert m, box.stderr()[-2000:]
        assert not (box.home / "run" / "state.json").exists()
        print(f"\nown death: {len(procs)} worker processes gone {gone_s:.1f} s after SIGKILL "
              f"of pdbox under {STREAMS} streams; next up serving in {up_s:.0f} s; "
              f"SIGTERM under {STREAMS} streams: stopped in {m.group(1)} s, "
              f"{m.group(2) or '0.0'} s of it draining (exit after {exit_s:.1f} s)")
    finally:
        for b in boxes:
            stop_group(b.proc)
        for g in groups:
            try:
                os.killpg(g, signal.SIGKILL)
            except ProcessLookupError:
                pass
