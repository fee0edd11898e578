"""The autoscaler end to end on cpu-tiny with decode max 2 (issue: local autoscaler).

A burst starts a second decode worker, which takes traffic only after its
warm-up; when the load stops, that worker is drained and stopped after the
(shortened) window; every request completes.
"""

from __future__ import annotations

import json
import threading
import time
import urllib.request

import pytest

from tests.e2e.conftest import profile_variant

pytestmark = pytest.mark.e2e


def chat(endpoint: str, text: str, max_tokens: int, results: list, lock: threading.Lock) -> None:
    body = {"model": "smollm2", "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True,
            "messages": [{"role": "user", "content": text}]}
    req = urllib.request.Request(f"{endpoint}/chat/completions", data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    t = time.monotonic()
    try:
        with urllib.request.urlopen(req, timeout=600) as r:
            out = json.load(r)
            worker = r.headers.get("x-pdbox-decode-worker")
        n = out["usage"]["completion_tokens"]
        rec = {"ok": n == max_tokens, "worker": worker, "tokens": n, "t": t}
    except Exception as exc:  # noqa: BLE001 - recorded and asserted on below
        rec = {"ok": False, "error": repr(exc), "t": t}
    with lock:
        results.append(rec)


def test_burst_scales_decode_up_then_drains_back(pdbox_factory, tmp_path):
    prof = profile_variant(
        tmp_path, "cpu-tiny", "cpu-tiny-autoscale",
        **{"decode.max_num_seqs": "2", "autoscaler.period_s": "2.0",
           "autoscaler.scale_down_window_s": "20.0", "autoscaler.target_queue_per_worker": "1.0",
           "router.pd_decider": '"threshold"',
           # The burst is for decode: with soft roles the idle prefill worker may take
           # enough of it whole that decode's queue never reaches the target.
           "router.soft_roles": "false"})
    box = pdbox_factory(["--profile", str(prof)])
    results: list = []
    lock = threading.Lock()
    stop = threading.Event()

    def load() -> None:
        i = 0
        threads = []
        while not stop.is_set():
            # Keep about six requests open: three times what one worker runs at once.
            threads = [t for t in threads if t.is_alive()]
            while len(threads) < 6:
                t = threading.Thread(target=chat, args=(box.endpoint, f"Count to ten, {i}.", 48,
                                                        results, lock))
                t.start()
                threads.append(t)
                i += 1
            time.sleep(0.2)
        for t in threads:
            t.join(600)

    loader = threading.Thread(target=load)
    loader.start()
    try:
        # 1. The burst starts decode-1; it must warm up before taking traffic.
        snap = box.wait_worker(lambda s: any(w["id"] == "decode-1" for w in s["workers"]),
                               timeout=120)
        events = [e["message"] for e in snap["events"]]
        assert any("decode 1→2" in m for m in events), events
        # While it starts and warms up, the router sends it nothing.
        seen: list[tuple[str, int]] = []

        def new_worker_ready(s: dict) -> bool:
            w = next((w for w in s["workers"] if w["id"] == "decode-1"), None)
            if w is None:
                return False
            seen.append((w["state"], w.get("routed") or 0))
            return w["state"] == "ready"

        box.wait_worker(new_worker_ready, timeout=600)
        assert all(routed == 0 for state, routed in seen if state != "ready"), seen
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            with lock:
                if any(r.get("worker") == "decode-1" for r in results):
                    break
            time.sleep(1)
    finally:
        stop.set()
        loader.join(900)
    with lock:
        served_new = [r for r in results if r.get("worker") == "decode-1"]
        assert served_new, "decode-1 never took traffic"

    # 2. Load stopped: after the window decode-1 is drained and stopped.
    box.wait_worker(lambda s: [w["id"] for w in s["workers"] if w["role"] == "decode"]
                    == ["decode-0"], timeout=180)
    snap = box.status()
    msgs = [e["message"] for e in snap["events"]]
    assert any("decode-1 draining" in m for m in msgs), msgs

    # 3. Every request completed in full.
    failed = [r for r in results if not r["ok"]]
    assert not failed, failed[:5]
    assert len(results) >= 6
