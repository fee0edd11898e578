"""Harnesses for fault, overload and hostile-input tests.

- `LiveBox`: a real `Appliance` in attach mode (router, admission, control
  API, API-key middleware, run folder) on its own event-loop thread, in front
  of in-process mock vLLM servers. Tests talk to it over real sockets from the
  main thread, so fuzzers can send anything, byte for byte.
- `MockProcess` / `start_attached_pdbox`: mock workers and `pdbox up
  --headless --attach` as real processes, for faults that need a process to
  die (SIGKILL, SIGTERM) and for the timed overload run.

Real-worker fixtures come from tests/e2e/conftest.py.
"""

from __future__ import annotations

import asyncio
import dataclasses
import http.client
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any

from pdbox import config

REPO = Path(__file__).resolve().parents[2]


# ------------------------------------------------------------ in-process box


def small_profile(name: str = "cpu-aggregated", **router: Any) -> config.Profile:
    """A built-in profile with a small body limit (so huge inputs hit 413 fast)."""
    p = config.load(name)
    settings: dict[str, Any] = {"kv_events": False, "max_body_bytes": 64 * 1024}
    settings.update(router)
    return dataclasses.replace(p, router=dataclasses.replace(p.router, **settings))


class LiveBox:
    """A real Appliance (attach mode) serving on a background thread's event loop."""

    def __init__(self, run_dir: Path, roles: tuple[str, ...] = ("aggregated",),
                 profile: config.Profile | None = None, api_key: str | None = None,
                 mock_kwargs: dict[str, Any] | None = None) -> None:
        self.run_dir = run_dir
        self.roles = roles
        self.profile = profile or small_profile()
        self.api_key = api_key
        self.mock_kwargs = mock_kwargs or {"tokens": 4}
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.app: Any = None
        self.mocks: list[Any] = []
        self.host = "127.0.0.1"
        self.port = 0

    def call(self, coro: Coroutine[Any, Any, Any], timeout: float = 60) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def start(self) -> LiveBox:
        from pdbox.appliance import Appliance, Attach
        from pdbox.devtools.mock_openai import MockConfig, MockServer

        self.thread.start()

        async def go() -> None:
            attach = []
            for role in self.roles:
                m = MockServer(MockConfig(**self.mock_kwargs))
                await m.start()
                self.mocks.append(m)
                attach.append(Attach(role, m.url))
            self.app = Appliance(self.profile, self.run_dir, host="127.0.0.1", port=0,
                                 attach=attach, api_key=self.api_key)
            await self.app.start()

        self.call(go())
        self.port = self.app.port
        return self

    @property
    def token(self) -> str:
        return str(self.app.token)

    def stop(self) -> None:
        async def go() -> None:
            await self.app.stop()
            for m in self.mocks:
                await m.stop()

        try:
            self.call(go())
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.thread.join(10)

    # ------------------------------------------------------------- clients

    def request(self, method: str, path: str, body: bytes | None = None,
                headers: dict[str, str] | None = None, timeout: float = 30
                ) -> tuple[int, dict[str, str], bytes]:
        conn = http.client.HTTPConnection(self.host, self.port, timeout=timeout)
        try:
            conn.request(method, path, body=body, headers=headers or {})
            r = conn.getresponse()
            return r.status, {k.lower(): v for k, v in r.getheaders()}, r.read()
        finally:
            conn.close()

    def raw(self, data: bytes, timeout: float = 30) -> bytes:
        """Send raw bytes (anything: broken framing, CRLF in headers) and read the answer."""
        return raw_http(self.host, self.port, data, timeout)


def raw_http(host: str, port: int, data: bytes, timeout: float = 30) -> bytes:
    with socket.create_connection((host, port), timeout=timeout) as s:
        # No half-close after sending: aiohttp takes it for a client gone away
        # and cancels the handler. Requests carry "Connection: close" instead.
        try:
            s.sendall(data)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the server refused the rest; read what it answered
        out = b""
        while True:
            try:
                chunk = s.recv(65536)
            except (ConnectionResetError, TimeoutError):
                break
            if not chunk:
                break
            out += chunk
        return out


def status_of(raw: bytes) -> int | None:
    m = re.match(rb"HTTP/1\.[01] (\d{3})", raw)
    return int(m.group(1)) if m else None


# ----------------------------------------------------------- real processes


@dataclasses.dataclass
class MockProcess:
    proc: subprocess.Popen[bytes]
    url: str

    def kill(self, sig: int = signal.SIGKILL) -> None:
        try:
            os.killpg(self.proc.pid, sig)
        except ProcessLookupError:
            pass

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.kill(signal.SIGKILL)
        self.proc.wait(10)


def start_mock_process(*args: str) -> MockProcess:
    """`python -m pdbox.devtools.mock_openai --port 0 ARGS` in its own process group."""
    proc = subprocess.Popen([sys.executable, "-m", "pdbox.devtools.mock_openai", "--port", "0",
                             *args], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                            start_new_session=True, cwd=REPO)
    assert proc.stdout is not None
    line = proc.stdout.readline().decode().strip()
    if not line.startswith("http://"):
        proc.kill()
        raise AssertionError(f"mock server did not start: {line!r}")
    return MockProcess(proc, line)


@dataclasses.dataclass
class AttachedPdbox:
    proc: subprocess.Popen[bytes]
    home: Path
    endpoint: str
    stderr_path: Path

    @property
    def base(self) -> str:
        return self.endpoint.rsplit("/v1", 1)[0]

    @property
    def port(self) -> int:
        return int(self.base.rsplit(":", 1)[1])

    def token(self) -> str:
        return (self.home / "run" / "control.token").read_text().strip()

    def stderr(self) -> str:
        try:
            return self.stderr_path.read_text()
        except OSError:
            return ""

    def stop(self, grace: float = 60) -> int | None:
        from tests.e2e.conftest import stop_group

        stop_group(self.proc, grace)  # type: ignore[arg-type]
        return self.proc.returncode


def pdbox_env(home: Path, **extra: str) -> dict[str, str]:
    from tests.e2e.conftest import models_dir

    return dict(os.environ, PDBOX_HOME=str(home), PDBOX_MODELS_DIR=models_dir(), **extra)


def start_attached_pdbox(tmp: Path, attach: list[str], *args: str, home: Path | None = None,
                         timeout: float = 60) -> AttachedPdbox:
    """`pdbox up --headless --attach ...` as its own process group; waits for the endpoint."""
    home = home or tmp / "home"
    err = tmp / f"pdbox-{time.monotonic_ns()}.stderr"
    argv = [sys.executable, "-m", "pdbox.cli", "up", "--headless", "--port", "0", *args]
    for a in attach:
        argv += ["--attach", a]
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=open(err, "w"),
                            env=pdbox_env(home), start_new_session=True, cwd=REPO)
    assert proc.stdout is not None
    deadline = time.monotonic() + timeout
    line = b""
    os.set_blocking(proc.stdout.fileno(), False)
    while time.monotonic() < deadline:
        try:
            chunk = os.read(proc.stdout.fileno(), 4096)
        except BlockingIOError:
            chunk = b""
        line += chunk
        m = re.search(rb"(http://\S+/v1)\n", line)
        if m:
            return AttachedPdbox(proc, home, m.group(1).decode(), err)
        if proc.poll() is not None:
            raise AssertionError(f"pdbox exited with {proc.returncode}: {err.read_text()[-2000:]}")
        time.sleep(0.1)
    proc.kill()
    raise AssertionError(f"pdbox --attach not ready in {timeout}s")


def run_pdbox(args: list[str], home: Path, timeout: float = 60,
              preexec: Callable[[], None] | None = None) -> subprocess.CompletedProcess[str]:
    """Run a pdbox command to completion (for start-up errors)."""
    return subprocess.run([sys.executable, "-m", "pdbox.cli", *args], env=pdbox_env(home),
                          capture_output=True, text=True, timeout=timeout, cwd=REPO,
                          preexec_fn=preexec, start_new_session=True)


def http_json(url: str, body: Any = None, headers: dict[str, str] | None = None,
              timeout: float = 30) -> tuple[int, Any]:
    import urllib.error
    import urllib.request

    data = None if body is None else json.dumps(body).encode()
    h = {"Content-Type": "application/json", **(headers or {})}
    req = urllib.request.Request(url, data=data, headers=h)
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, json.loads(r.read() or b"null")
    except urllib.error.HTTPError as exc:
        raw = exc.read()
        try:
            return exc.code, json.loads(raw)
        except ValueError:
            return exc.code, raw.decode(errors="replace")


def stream_events(box: Any, body: dict[str, Any], on_first: Callable[[], None] | None = None,
                  timeout: float = 120) -> tuple[list[Any], float]:
    """POST a streamed chat to `box.endpoint`; call on_first() after the third
    event; return the events (parsed, "[DONE]" as is) and the seconds it took."""
    import urllib.request

    req = urllib.request.Request(f"{box.endpoint}/chat/completions",
                                 data=json.dumps({**body, "stream": True}).encode(),
                                 headers={"Content-Type": "application/json"})
    t0 = time.monotonic()
    events: list[Any] = []
    with urllib.request.urlopen(req, timeout=timeout) as r:
        while True:
            line = r.readline()
            if not line:
                break
            if line.startswith(b"data: "):
                data = line[6:].strip()
                events.append("[DONE]" if data == b"[DONE]" else json.loads(data))
                if len(events) == 3 and on_first is not None:
                    on_first()
    return events, time.monotonic() - t0
