"""Contract tests for the MPS daemon control, against tests/fakes/nvidia-cuda-mps-control.

The fake is put first on PATH and records every invocation and command in a
JSON-lines log, so each test checks what pdbox asked of the tool: the argv,
the private pipe/log folders, the commands on stdin. Real processes start
(the fake daemonizes as the real one does); each test checks none is left.
"""

from __future__ import annotations

import inspect
import json
import os
import re
import stat
from pathlib import Path

import psutil
import pytest

from pdbox.hardware.mps import (
    GIB,
    MpsDaemon,
    MpsError,
    check_memory_fractions,
    client_env,
    mem_limit_for,
)

FAKES = Path(__file__).resolve().parent.parent / "fakes"
FAKE = FAKES / "nvidia-cuda-mps-control"


def _fake_processes(tmp_path: Path) -> list[psutil.Process]:
    found = []
    for p in psutil.process_iter(["cmdline", "status"]):
        try:
            cmd = p.info["cmdline"] or []
            if not any(str(FAKE) in c for c in cmd):
                continue
            if p.info["status"] == psutil.STATUS_ZOMBIE:
                continue
            if str(tmp_path) in p.environ().get("CUDA_MPS_PIPE_DIRECTORY", ""):
                found.append(p)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return found


@pytest.fixture
def fake_env(tmp_path, monkeypatch):
    log = tmp_path / "fake-mps.jsonl"
    monkeypatch.setenv("PATH", f"{FAKES}{os.pathsep}{os.environ.get('PATH', '')}")
    monkeypatch.setenv("PDBOX_FAKE_MPS_LOG", str(log))
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    yield log
    leftovers = _fake_processes(tmp_path)
    for p in leftovers:
        p.kill()
    assert not leftovers, f"fake MPS processes left behind: {leftovers}"


def _gone(pid: int, timeout_s: float = 3.0) -> bool:
    """Exited (a zombie waiting for init to reap it counts as exited)."""
    try:
        proc = psutil.Process(pid)
        proc.wait(timeout=timeout_s)
    except psutil.NoSuchProcess:
        return True
    except psutil.TimeoutExpired:
        try:
            return proc.status() == psutil.STATUS_ZOMBIE
        except psutil.NoSuchProcess:
            return True
    return True


def _log(path: Path) -> list[dict]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_fake_is_executable():
    assert os.access(FAKE, os.X_OK)


def test_start_uses_private_dirs_and_stop_sends_quit(tmp_path, fake_env):
    run = tmp_path / "run"
    d = MpsDaemon(run)
    d.start(default_active_thread_percentage=100)
    try:
        assert d.running()
        pid = d.pid()
        assert pid and psutil.pid_exists(pid)
        for folder in (d.pipe_dir, d.log_dir):
            assert folder.is_dir() and folder.is_relative_to(run)
            assert stat.S_IMODE(folder.stat().st_mode) == 0o700
        assert d.state() == {"enabled": True, "running": True, "pipe_dir": str(d.pipe_dir)}
        assert d.server_list() == []
        assert d.command("get_default_active_thread_percentage") == "100.0"
    finally:
        d.stop()
    assert not d.running() and _gone(pid)

    entries = _log(fake_env)
    starts = [e for e in entries if e.get("argv", [None])[1:] == ["-d"]]
    assert len(starts) == 1
    assert starts[0]["env"]["CUDA_MPS_PIPE_DIRECTORY"] == str(d.pipe_dir)
    assert starts[0]["env"]["CUDA_MPS_LOG_DIRECTORY"] == str(d.log_dir)
    assert "CUDA_VISIBLE_DEVICES" not in starts[0]["env"]
    commands = [e["command"] for e in entries if "command" in e]
    assert commands[0] == "get_server_list"  # the readiness probe
    assert "set_default_active_thread_percentage 100" in commands
    assert commands[-1] == "quit"
    assert any(e.get("event") == "daemon_exited" and e["why"] == "quit" for e in entries)
    # every client invocation shared the daemon's folders
    for e in entries:
        if "argv" in e:
            assert e["env"]["CUDA_MPS_PIPE_DIRECTORY"] == str(d.pipe_dir)


def test_stop_is_idempotent(tmp_path, fake_env):
    d = MpsDaemon(tmp_path / "run")
    d.stop()  # never started: nothing to do, no error
    d.start()
    d.stop()
    d.stop()
    quits = [e for e in _log(fake_env) if e.get("command") == "quit"]
    assert len(quits) == 1


def test_context_manager(tmp_path, fake_env):
    with MpsDaemon(tmp_path / "run") as d:
        assert d.running()
    assert not d.running()


def test_gpu_uuid_is_shared_by_daemon_and_clients(tmp_path, fake_env, monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3")  # from the shell: must not leak in
    uuid = "GPU-8932f937-d72c-4106-c12f-20bd9faed9f6"
    with MpsDaemon(tmp_path / "run", gpu_uuid=uuid) as d:
        env = client_env(d.env(), 40, "0=20G", gpu_index=1)
    assert env["CUDA_VISIBLE_DEVICES"] == uuid
    start = next(e for e in _log(fake_env) if e.get("argv", [None])[1:] == ["-d"])
    assert start["env"]["CUDA_VISIBLE_DEVICES"] == uuid


def test_missing_binary_is_one_sentence(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))  # nothing on it
    d = MpsDaemon(tmp_path / "run")
    with pytest.raises(MpsError) as err:
        d.start()
    msg = str(err.value)
    assert "nvidia-cuda-mps-control was not found" in msg and "\n" not in msg
    d.stop()  # still fine


def test_failing_daemon_start_is_reported(tmp_path, fake_env):
    # A daemon already answering in the same folders: the fake refuses a second.
    first = MpsDaemon(tmp_path / "run")
    first.start()
    try:
        bad = tmp_path / "bin"
        bad.mkdir()
        script = bad / "nvidia-cuda-mps-control"
        script.write_text("#!/bin/sh\necho 'Failed to start: no CUDA-capable device' >&2\nexit 1\n")
        script.chmod(0o755)
        d = MpsDaemon(tmp_path / "other", binary=str(script))
        with pytest.raises(
            MpsError, match=r"exit code 1 \(Failed to start: no CUDA-capable device\)"
        ):
            d.start()
    finally:
        first.stop()


def test_daemon_that_never_answers_times_out(tmp_path, fake_env):
    script = tmp_path / "nvidia-cuda-mps-control"
    script.write_text("#!/bin/sh\nexit 0\n")  # returns at once, starts nothing
    script.chmod(0o755)
    d = MpsDaemon(tmp_path / "run", binary=str(script), start_timeout_s=0.5)
    with pytest.raises(MpsError, match="did not answer within 0.5 s"):
        d.start()


def test_stale_daemon_from_an_earlier_run_is_replaced(tmp_path, fake_env):
    a = MpsDaemon(tmp_path / "run")
    a.start()
    old = a.pid()
    b = MpsDaemon(tmp_path / "run")
    b.start()
    try:
        assert b.pid() != old and _gone(old)
    finally:
        b.stop()


def test_command_without_daemon_raises(tmp_path, fake_env):
    d = MpsDaemon(tmp_path / "run")
    d.pipe_dir.mkdir(parents=True)
    d.log_dir.mkdir(parents=True)
    with pytest.raises(MpsError, match="Cannot find MPS control daemon"):
        d.command("get_server_list")


# --------------------------------------------------------------- per-client env


def test_client_env_per_worker(tmp_path):
    d = MpsDaemon(tmp_path / "run")
    total = 96 * GIB
    prefill = client_env(d.env(), 60, mem_limit_for(0.40, total), gpu_index=0)
    decode = client_env(d.env(), 40, mem_limit_for(0.25, total), gpu_index=0)
    assert prefill["CUDA_MPS_ACTIVE_THREAD_PERCENTAGE"] == "60"
    assert decode["CUDA_MPS_ACTIVE_THREAD_PERCENTAGE"] == "40"
    assert decode["CUDA_MPS_PINNED_DEVICE_MEM_LIMIT"] == "0=24G"
    assert prefill["CUDA_MPS_PINNED_DEVICE_MEM_LIMIT"] == "0=39321M"  # 38.4 GiB, floored
    for env in (prefill, decode):
        assert env["CUDA_MPS_PIPE_DIRECTORY"] == str(d.pipe_dir)
        assert env["CUDA_MPS_LOG_DIRECTORY"] == str(d.log_dir)
        assert env["CUDA_VISIBLE_DEVICES"] == "0"


def test_client_env_on_a_second_gpu(tmp_path):
    """The limit names the machine's GPU 1; inside the worker that GPU is 0."""
    limit = mem_limit_for(0.25, 80 * GIB, gpu_index=1)
    assert limit == "1=20G"
    env = client_env(MpsDaemon(tmp_path).env(), 50, limit, gpu_index=1)
    assert env["CUDA_VISIBLE_DEVICES"] == "1"
    assert env["CUDA_MPS_PINNED_DEVICE_MEM_LIMIT"] == "0=20G"
    # already in the worker's numbering: kept
    env = client_env(MpsDaemon(tmp_path).env(), 50, "0=20G", gpu_index=1)
    assert env["CUDA_MPS_PINNED_DEVICE_MEM_LIMIT"] == "0=20G"


def test_client_env_without_memory_cap(tmp_path):
    env = client_env(MpsDaemon(tmp_path).env(), 100, None, gpu_index=0)
    assert "CUDA_MPS_PINNED_DEVICE_MEM_LIMIT" not in env


@pytest.mark.parametrize("pct", [0, 101, -5, 50.5, True])
def test_client_env_rejects_bad_percentages(tmp_path, pct):
    with pytest.raises(ValueError):
        client_env(MpsDaemon(tmp_path).env(), pct, None, 0)


@pytest.mark.parametrize("limit", ["20G", "0=", "0=20X", "2=20G", "0=1G,1=2G"])
def test_client_env_rejects_bad_limits(tmp_path, limit):
    with pytest.raises(ValueError):
        client_env(MpsDaemon(tmp_path).env(), 50, limit, 0)


def test_client_env_needs_the_daemon_folders():
    with pytest.raises(ValueError, match="CUDA_MPS_PIPE_DIRECTORY"):
        client_env({}, 50, None, 0)


def test_mem_limit_for():
    assert mem_limit_for(0.25, 80 * GIB) == "0=20G"
    assert mem_limit_for(0.5, 1000 * 1024**2) == "0=500M"
    assert mem_limit_for(1.0, 96 * GIB, gpu_index=2) == "2=96G"
    for bad in (0, -0.1, 1.5):
        with pytest.raises(ValueError):
            mem_limit_for(bad, 80 * GIB)
    with pytest.raises(ValueError):
        mem_limit_for(0.5, 0)


def test_check_memory_fractions():
    check_memory_fractions([0.40, 0.25, 0.25])
    check_memory_fractions([])
    with pytest.raises(ValueError, match="add up to 0.95"):
        check_memory_fractions([0.45, 0.25, 0.25])
    with pytest.raises(ValueError):
        check_memory_fractions([0.5, 0.0])


# ------------------------------------------------- NVIDIA's documented interface
# These check pdbox's output against what NVIDIA's MPS documentation states,
# not against the fake: "Appendix: Environment Variables" and "Appendix: Tools
# and Interface Reference" of https://docs.nvidia.com/deploy/mps/ (the same
# text as nvidia-cuda-mps-control(1)). What the docs leave open (what
# cudaMemGetInfo reports under a pinned limit) is for scripts/gpu_probe.py.

# The documented example of the pinned limit: device ordinal = size, with K/M/G
# (optionally followed by B), comma-separated.
NVIDIA_LIMIT = r"^\d+=\d+[KMG]B?(,\d+=\d+[KMG]B?)*$"


def _visible(physical: list[str], spec: str | None) -> list[str]:
    """CUDA_VISIBLE_DEVICES as documented: indices or UUIDs (or UUID prefixes
    with GPU-) select and order the devices; indices count from 0 in the list
    they are applied to."""
    if spec is None:
        return list(physical)
    out = []
    for item in spec.split(","):
        if item.startswith("GPU-"):
            out += [d for d in physical if d.startswith(item)][:1]
        else:
            out.append(physical[int(item)])
    return out


@pytest.mark.parametrize("gpu_index", [0, 1, 3])
@pytest.mark.parametrize("with_uuid", [False, True])
def test_each_client_sees_exactly_its_gpu_as_documented(tmp_path, gpu_index, with_uuid):
    """"When CUDA_VISIBLE_DEVICES is set before launching the control daemon,
    the devices will be remapped by the MPS server", and a client that then
    sets the same indices names the wrong devices. pdbox gives the daemon
    nothing or a UUID; the client's own setting must pick the profile's GPU."""
    physical = [f"GPU-{i:08d}-uuid" for i in range(4)]
    uuid = physical[gpu_index] if with_uuid else None
    daemon = MpsDaemon(tmp_path, gpu_uuid=uuid, base_env={"CUDA_VISIBLE_DEVICES": "2"})
    daemon_devices = _visible(physical, daemon._process_env().get("CUDA_VISIBLE_DEVICES"))
    env = client_env(daemon.env(), 60, mem_limit_for(0.25, 96 * GIB, gpu_index), gpu_index)
    client_devices = _visible(daemon_devices, env["CUDA_VISIBLE_DEVICES"])
    assert client_devices == [physical[gpu_index]]
    # The limit names ordinal 0: the client's own numbering, where its GPU is 0.
    assert re.match(NVIDIA_LIMIT, env["CUDA_MPS_PINNED_DEVICE_MEM_LIMIT"])
    assert env["CUDA_MPS_PINNED_DEVICE_MEM_LIMIT"].startswith("0=")


def test_limits_read_as_nvidia_writes_them():
    from pdbox.hardware.mps import mem_limit_bytes

    # The documentation's own example, and FINDINGS' "0=20G".
    assert mem_limit_bytes("0=1G,1=512MB") == GIB
    assert mem_limit_bytes("0=1G,1=512MB", 1) == 512 * 1024**2
    assert mem_limit_bytes("0=20G") == 20 * GIB
    assert mem_limit_bytes("1=20G") is None
    for fraction in (0.05, 0.22, 0.25, 0.29, 0.35, 0.4, 0.9):
        for total in (81559 * 1024**2, 97871 * 1024**2):
            limit = mem_limit_for(fraction, total)
            # Never above the budget it was computed from, and within 1 MiB of it.
            assert 0 <= fraction * total - mem_limit_bytes(limit) < 1024**2


def test_daemon_and_clients_share_the_documented_folders(tmp_path):
    """CUDA_MPS_PIPE_DIRECTORY and CUDA_MPS_LOG_DIRECTORY must be the same for
    the control daemon, the server and every client."""
    daemon = MpsDaemon(tmp_path, base_env={})
    env = client_env(daemon.env(), 40, None, 0)
    proc = daemon._process_env()
    for key in ("CUDA_MPS_PIPE_DIRECTORY", "CUDA_MPS_LOG_DIRECTORY"):
        assert env[key] == proc[key] == daemon.env()[key]
    assert env["CUDA_MPS_ACTIVE_THREAD_PERCENTAGE"] == "40"


def test_control_commands_are_the_documented_ones():
    """The interactive commands pdbox sends exist in NVIDIA's list: `quit`,
    `get_server_list`, `set_default_active_thread_percentage <percentage>`;
    the daemon starts with `-d`."""
    from pdbox.hardware import mps

    src = inspect.getsource(mps.MpsDaemon)
    documented = {"quit", "get_server_list", "set_default_active_thread_percentage"}
    sent = set(re.findall(r'command\(f?"([a-z_]+)', src))
    assert sent and sent <= documented, sent - documented
    assert '[binary, "-d"]' in src
