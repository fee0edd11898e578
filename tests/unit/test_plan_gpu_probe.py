"""scripts/gpu_probe.py, on a machine with no GPU: it answers "no_gpu" as JSON,
its client orchestration runs on the CPU (--self-test-cpu), its MPS phase
drives pdbox's own daemon control (the fake binary here), and its verdict
reads both views of memory under MPS the way docs/GPU.md needs."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from pdbox import config
from pdbox.plan.memory import GIB, MIB, cap_bytes

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "scripts" / "gpu_probe.py"
FAKES = ROOT / "tests" / "fakes"


def _load_probe():
    spec = importlib.util.spec_from_file_location("gpu_probe", SCRIPT)
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _run(*args: str) -> dict:
    out = subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True,
                         timeout=240, cwd=ROOT, check=False)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


def test_no_gpu_is_a_clean_json_answer(tmp_path: Path) -> None:
    report = _run("--out", str(tmp_path / "probe.json"))
    assert report["status"] == "no_gpu"
    assert report["reason"]
    assert report["mps"] == {"available": False, "reason": "no GPU: nothing to share"}
    assert report["nvml_before"]["available"] is False
    assert json.loads((tmp_path / "probe.json").read_text()) == report


def test_client_orchestration_on_the_cpu() -> None:
    report = _run("--self-test-cpu")
    assert report["status"] == "self_test" and report["errors"] == []
    clients = report["clients"]
    assert set(clients) == {"prefill", "decode"}
    for c in clients.values():
        assert c["matmul_alone"]["tflops"] > 0 and c["matmul_together"]["tflops"] > 0
        assert c["alloc"]["allocated_bytes"] > 0
    assert report["ipc"]["recv"]["read"] is True


def test_mps_phase_uses_pdbox_daemon_control(tmp_path: Path,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    probe = _load_probe()
    monkeypatch.setenv("PATH", f"{FAKES}{os.pathsep}{os.environ.get('PATH', '')}")
    monkeypatch.setenv("PDBOX_FAKE_MPS_LOG", str(tmp_path / "fake.jsonl"))
    daemon, report = probe.start_mps(tmp_path, "GPU-1234")
    try:
        assert report["available"] is True and report["daemon_pid"]
        profile = config.load("gh200-pd")
        total = 97871 * MIB
        envs = probe.client_envs(profile, daemon, total)
        # The clients get exactly the MPS environment a pdbox worker gets.
        from pdbox.hardware.mps import client_env, mem_limit_for

        for role, rc in profile.roles().items():
            assert envs[role] == client_env(daemon.env(), rc.sm_percent,
                                            mem_limit_for(rc.memory_fraction, total, 0), 0)
            assert envs[role]["CUDA_VISIBLE_DEVICES"] == "GPU-1234"
    finally:
        probe.stop_mps(daemon, report)
    assert report["daemon_stopped"] is True


def test_mps_unavailable_says_why(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    probe = _load_probe()
    monkeypatch.setenv("PATH", str(tmp_path))  # no nvidia-cuda-mps-control anywhere
    daemon, report = probe.start_mps(tmp_path, None)
    assert daemon is None and report["available"] is False
    assert "nvidia-cuda-mps-control was not found" in report["reason"]


@pytest.mark.parametrize("view", ["cap", "card"])
def test_verdict_reads_which_total_a_client_sees(view: str) -> None:
    probe = _load_probe()
    total = 97871 * MIB
    roles = {}
    for role, fraction in (("prefill", 0.40), ("decode", 0.25)):
        cap = cap_bytes(fraction, total)
        seen_total = cap if view == "cap" else total
        roles[role] = {
            "fraction": fraction, "cap_bytes": cap,
            "meminfo": {"mem_get_info_total": seen_total,
                        "mem_get_info_free": seen_total - GIB},
            "alloc": {"allocated_bytes": cap - 128 * MIB, "refused": True},
        }
    got = probe.verdict(roles, total)
    for v in got.values():
        assert v["total_seen"] == view
        assert v["vllm_startup_check_passes"] is True
        assert v["limit_enforced"] is True
    roles["decode"]["alloc"] = {"allocated_bytes": cap_bytes(0.25, total) + 2 * GIB,
                                "refused": False}
    assert probe.verdict(roles, total)["decode"]["limit_enforced"] is False
