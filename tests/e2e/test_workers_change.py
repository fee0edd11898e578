"""Real workers under change, on cpu-aggregated (two workers, one per core).

One pdbox serves three checks in turn, so the suite pays for one start:
- a burst of 40 concurrent two-turn chats with ~1,500-token system prompts
  through the official openai SDK (default retries, which honour Retry-After)
  gets every turn answered;
- the autoscaler does not scale down within its first stabilization window,
  however idle the box looks;
- after 2→1→2 the workers sit on cores {0} and {1}, not both on core 0.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
import urllib.request

import pytest

from tests.e2e.conftest import REPO, profile_variant, slowness

pytestmark = pytest.mark.e2e


def control(box, path: str, body: dict) -> dict:
    req = urllib.request.Request(f"{box.base}/pdbox/v1{path}", data=json.dumps(body).encode(),
                                 headers={"Authorization": f"Bearer {box.token()}",
                                          "Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=30) as r:
        return json.load(r)


def cores_of(snap: dict) -> list[str]:
    return sorted(w["cores"] for w in snap["workers"]
                  if w["role"] == "aggregated" and w["state"] not in ("draining", "stopped"))


def test_burst_grace_and_placement(pdbox_factory, tmp_path):
    # The grace window must outlast the burst, which takes longer where
    # prefill is slower: both scale with what earlier boxes measured.
    window = 300.0 * slowness()  # cpu-aggregated's scale_down_window_s, stretched
    prof = profile_variant(tmp_path, "cpu-aggregated", "cpu-aggregated",
                           **{"autoscaler.scale_down_window_s": f"{window:.1f}"})
    t_start = time.monotonic()
    box = pdbox_factory(["--profile", str(prof)])
    snap = box.status()
    assert cores_of(snap) == ["0", "1"]

    # 1. The burst, through the openai SDK with its default retries.
    out = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "bench_burst.py"), "--endpoint", box.endpoint,
         "--chats", "40", "--turns", "2", "--system-tokens", "1500", "--max-tokens", "16"],
        capture_output=True, text=True, timeout=900 * slowness())
    result = json.loads(out.stdout)
    print("burst:", json.dumps(result))
    assert result["errors"] == 0, result
    assert result["turns_answered"] == 80

    # 2. Grace: an idle box keeps both workers for a whole window after start.
    snap = box.status()
    assert time.monotonic() - t_start < window, "the burst took longer than the window"
    downs = [d for d in snap["autoscaler"]["decisions"] if d["to"] < d["from"]]
    assert downs == [], downs
    assert cores_of(snap) == ["0", "1"]

    # 3. Placement: 2→1→2 puts the new worker on the core that was freed.
    control(box, "/scale", {"role": "aggregated", "replicas": 1})
    snap = box.wait_worker(lambda s: len(cores_of(s)) == 1 and not any(
        w["state"] == "draining" for w in s["workers"]), timeout=120)
    kept = cores_of(snap)
    control(box, "/scale", {"role": "aggregated", "replicas": 2})
    snap = box.wait_worker(lambda s: len(cores_of(s)) == 2 and all(
        w["state"] == "ready" for w in s["workers"]), timeout=300)
    assert cores_of(snap) == ["0", "1"], (kept, snap["workers"])
    events = [e["message"] for e in snap["events"]]
    assert any("starting aggregated-" in m and "cores" in m for m in events), events
