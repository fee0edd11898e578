"""P/D tuning on cpu-tiny, measured on real workers: idle CPU and the prefill leg."""

from __future__ import annotations

import os
import time

import pytest

from pdbox.bench.pd_legs import measure
from pdbox.bench.procs import group_cpu
from tests.e2e.conftest import profile_variant

pytestmark = pytest.mark.e2e

# The machines are shared and noisy; a single timing can be off by a few tenths
# of a second. The goal is 1.2x; the test allows 1.2x plus this much.
NOISE_S = 0.35


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from tests.e2e.conftest import start_pdbox, stop_group

    tmp = tmp_path_factory.mktemp("pd")
    prof = profile_variant(tmp, "cpu-tiny", "cpu-tiny-pd", **{"autoscaler.enabled": "false"})
    box = start_pdbox(tmp, ["--profile", str(prof)])
    yield box
    stop_group(box.proc)


def test_idle_pd_workers_use_under_a_tenth_of_a_core(tiny):
    time.sleep(5)  # let the warm-up settle
    for w in tiny.status()["workers"]:
        used = group_cpu(w["pid"], 10.0)
        assert used < 0.10, f"{w['id']} used {used:.2f} of a core while idle"


def test_prefill_leg_close_to_plain_request(tiny):
    ws = {w["role"]: w for w in tiny.status()["workers"]}
    pre = f"http://127.0.0.1:{ws['prefill']['port']}"
    dec = f"http://127.0.0.1:{ws['decode']['port']}"
    cold = measure(pre, dec, "smollm2", words=600, rounds=3).summary()
    warm = measure(pre, dec, "smollm2", words=600, rounds=3, warm=True, seed=1).summary()
    for name, s in (("cold", cold), ("warm", warm)):
        limit = 1.2 * s["plain_p50_s"] + NOISE_S
        assert s["prefill_leg_p50_s"] <= limit, f"{name}: {s}"


def test_chat_message_against_real_pdbox(tiny):
    import json
    import subprocess
    import sys

    env = dict(os.environ, PDBOX_HOME=str(tiny.home))
    out = subprocess.run(
        [sys.executable, "-m", "pdbox.cli", "chat", "--message",
         "What is the capital of France?", "--json", "--temperature", "0", "--max-tokens", "24"],
        env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    data = json.loads(out.stdout)
    assert "paris" in data["answer"].lower(), data
    assert data["decode_worker"] == "decode-0"
    assert data["pd"] in ("local", "remote")
