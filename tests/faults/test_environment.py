"""Environment faults at start-up: each gets one clear sentence, a non-zero exit,
no traceback, and nothing half-done left behind (no state file, no token, no
process). Also: a stale run folder of a pdbox killed with SIGKILL is cleaned
by the next start, ending exactly the recorded process groups.

No vLLM worker is started: these run `pdbox up --headless` in attach mode (or
fail before any worker would start), in seconds.
"""

from __future__ import annotations

import json
import os
import resource
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import psutil

from pdbox.workers.model import MANIFEST, build_manifest
from pdbox.workers.supervisor import group_running
from tests.faults.conftest import REPO, run_pdbox, start_attached_pdbox, start_mock_process


def assert_clean_failure(out: subprocess.CompletedProcess[str], home: Path, *needles: str) -> None:
    assert out.returncode != 0, out.stdout
    assert "Traceback" not in out.stderr, out.stderr
    err = out.stderr.lower()
    for n in needles:
        assert n.lower() in err, out.stderr
    run = home / "run"
    assert not (run / "state.json").exists()
    assert not (run / "control.token").exists()


def test_run_folder_cannot_be_created(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    home = blocker / "home"  # a folder under a file: ENOTDIR, whoever we are
    out = run_pdbox(["up", "--headless", "--port", "0", "--attach", "http://127.0.0.1:9"], home)
    assert out.returncode != 0
    assert "Traceback" not in out.stderr, out.stderr
    assert "cannot create the run folder" in out.stderr and "PDBOX_HOME" in out.stderr


def _full_disk() -> None:
    # Files may not grow past 1 KiB: writes fail with EFBIG, as on a full disk.
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (1024, 1024))


def test_full_disk(tmp_path: Path) -> None:
    home = tmp_path / "home"
    mock = start_mock_process()
    try:
        out = run_pdbox(["up", "--headless", "--port", "0", "--attach", mock.url], home,
                        preexec=_full_disk)
    finally:
        mock.stop()
    assert_clean_failure(out, home, "cannot write to the run folder", "disk space")


def test_port_already_taken(tmp_path: Path) -> None:
    home = tmp_path / "home"
    mock = start_mock_process()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        try:
            out = run_pdbox(["up", "--headless", "--port", str(port), "--attach", mock.url], home)
        finally:
            mock.stop()
    assert_clean_failure(out, home, f"port {port}", "already in use", "--port")


def _model_profile(tmp: Path, folder: Path) -> Path:
    text = (REPO / "profiles" / "cpu-tiny.toml").read_text()
    text = text.replace('source = "embedded:smollm2-135m-instruct"', f'source = "{folder}"')
    text = text.replace('name = "cpu-tiny"', 'name = "broken-model"')
    path = tmp / "broken-model.toml"
    path.write_text(text)
    return path


def test_half_copied_model_folder(tmp_path: Path) -> None:
    """A model folder whose weights are shorter than its manifest says."""
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "llama"}))
    (folder / "model.safetensors").write_bytes(b"\0" * 4096)
    manifest = build_manifest(folder, name="broken", gguf=None, versions={})
    (folder / MANIFEST).write_text(json.dumps(manifest))
    with open(folder / "model.safetensors", "r+b") as f:
        f.truncate(1000)
    home = tmp_path / "home"
    before = {p.pid for p in psutil.process_iter()}
    out = run_pdbox(["up", "--headless", "--port", "0", "--profile",
                     str(_model_profile(tmp_path, folder))], home)
    assert_clean_failure(out, home, "model.safetensors", "copy the folder again")
    # No worker was started.
    new = [p for p in psutil.process_iter(["cmdline"]) if p.pid not in before
           and "vllm" in " ".join(p.info["cmdline"] or [])]
    assert not new


def test_folder_without_config_is_refused_by_the_profile(tmp_path: Path) -> None:
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "model.safetensors").write_bytes(b"\0" * 100)
    home = tmp_path / "home"
    out = run_pdbox(["up", "--headless", "--port", "0", "--profile",
                     str(_model_profile(tmp_path, folder))], home)
    assert out.returncode == 2
    assert "Traceback" not in out.stderr
    assert "config.json" in out.stderr and "model.source" in out.stderr
    assert not (home / "run").exists()


def _sleeper() -> subprocess.Popen[bytes]:
    """A process group like a worker's: a leader and a child, in their own session."""
    return subprocess.Popen([sys.executable, "-c",
                             "import subprocess, sys, time; "
                             "subprocess.Popen([sys.executable, '-c', 'import time; "
                             "time.sleep(600)']); time.sleep(600)"],
                            start_new_session=True)


def test_stale_run_folder_leftovers_are_ended(tmp_path: Path) -> None:
    """state.json of a pdbox that died: its recorded worker groups are ended, and
    a group whose pid was reused (another create_time) is left alone."""
    home = tmp_path / "home"
    run = home / "run"
    run.mkdir(parents=True)
    leftover, stranger = _sleeper(), _sleeper()
    time.sleep(0.5)
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    state = {
        "pid": dead.pid, "create_time": 1.0, "endpoint": "http://127.0.0.1:1/v1",
        "workers": [
            {"id": "decode-0", "pgid": leftover.pid,
             "create_time": psutil.Process(leftover.pid).create_time()},
            {"id": "prefill-0", "pgid": stranger.pid, "create_time": 12345.0},
        ],
    }
    (run / "state.json").write_text(json.dumps(state))
    (run / "control.token").write_text("old")
    mock = start_mock_process()
    try:
        t0 = time.monotonic()
        box = start_attached_pdbox(tmp_path, [mock.url], home=home)
        took = time.monotonic() - t0
        try:
            assert not group_running(leftover.pid)
            assert group_running(stranger.pid), "a reused pid must not be killed"
            assert box.token() != "old"
            log = (run / "logs" / "pdbox.log").read_text()
            assert "ended 1 leftover worker group" in log
            print(f"\nstale run folder cleaned and serving in {took:.1f}s")
        finally:
            assert box.stop() == 0
    finally:
        mock.stop()
        os.killpg(stranger.pid, signal.SIGKILL)
        leftover.wait(5)
        stranger.wait(5)


def test_second_up_while_one_runs_is_refused(tmp_path: Path) -> None:
    mock = start_mock_process()
    try:
        box = start_attached_pdbox(tmp_path, [mock.url])
        try:
            out = run_pdbox(["up", "--headless", "--port", "0", "--attach", mock.url], box.home)
            assert out.returncode != 0
            assert "Traceback" not in out.stderr
            assert "already running" in out.stderr and "pdbox down" in out.stderr
            assert box.proc.poll() is None
            assert (box.home / "run" / "state.json").exists()
        finally:
            box.stop()
    finally:
        mock.stop()
