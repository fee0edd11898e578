"""CUDA MPS: a private control daemon per pdbox run, and each worker's share.

MPS lets several processes share one GPU at once, each capped to a share of
the SMs (`CUDA_MPS_ACTIVE_THREAD_PERCENTAGE`) and of device memory
(`CUDA_MPS_PINNED_DEVICE_MEM_LIMIT`). The daemon and its clients find each
other through `CUDA_MPS_PIPE_DIRECTORY`; pdbox gives every run its own pipe
and log folders under the run folder, so it never meets (or stops) another
user's or another run's daemon in the machine-wide /tmp/nvidia-mps.

Interface used, as documented by NVIDIA (nvidia-cuda-mps-control(1)):
  `nvidia-cuda-mps-control -d` starts the daemon in the background and returns;
  the daemon writes `nvidia-cuda-mps-control.pid` and its `control` pipe into
  the pipe folder; commands (`get_server_list`, `quit`,
  `set_default_active_thread_percentage N`) go to `nvidia-cuda-mps-control`
  on stdin, one per line.
"""

from __future__ import annotations

import math
import os
import re
import shutil
import signal
import subprocess
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

PID_FILE = "nvidia-cuda-mps-control.pid"
CONTROL_PIPE = "control"
BINARY = "nvidia-cuda-mps-control"
MIB = 1024**2
GIB = 1024**3
# vLLM's gpu_memory_utilization is per instance; what all of them take must stay
# below the card, with room for the CUDA contexts and the MPS server itself.
MEMORY_BUDGET = 0.95


class MpsError(Exception):
    """The MPS daemon could not be used. str() is one sentence for the user."""


class MpsDaemon:
    """One MPS control daemon, private to a run folder.

    `gpu_uuid`, when given, goes into CUDA_VISIBLE_DEVICES for the daemon and
    every client alike. NVIDIA recommends UUIDs there: an index given to the
    daemon is renumbered from 0 for its clients, and the same index given to a
    client would then name the wrong device or none.
    """

    def __init__(
        self,
        run_dir: Path,
        binary: str = BINARY,
        *,
        gpu_uuid: str | None = None,
        start_timeout_s: float = 15.0,
        command_timeout_s: float = 10.0,
        stop_timeout_s: float = 10.0,
        base_env: Mapping[str, str] | None = None,
    ):
        self.root = Path(run_dir) / "mps"
        self.pipe_dir = self.root / "pipe"
        self.log_dir = self.root / "log"
        self.binary = binary
        self.gpu_uuid = gpu_uuid
        self.start_timeout_s = start_timeout_s
        self.command_timeout_s = command_timeout_s
        self.stop_timeout_s = stop_timeout_s
        self._base_env = dict(os.environ if base_env is None else base_env)
        self._started = False

    # -- environment

    def env(self) -> dict[str, str]:
        """The variables the daemon and all of its clients must share."""
        env = {
            "CUDA_MPS_PIPE_DIRECTORY": str(self.pipe_dir),
            "CUDA_MPS_LOG_DIRECTORY": str(self.log_dir),
        }
        if self.gpu_uuid:
            env["CUDA_VISIBLE_DEVICES"] = self.gpu_uuid
        return env

    def _process_env(self) -> dict[str, str]:
        env = dict(self._base_env)
        # A CUDA_VISIBLE_DEVICES inherited from the shell would renumber devices
        # under the daemon; only ours (a UUID) may reach it.
        env.pop("CUDA_VISIBLE_DEVICES", None)
        env.update(self.env())
        return env

    def _resolve(self) -> str:
        path = shutil.which(self.binary, path=self._base_env.get("PATH"))
        if path is None:
            raise MpsError(
                f"{self.binary} was not found on PATH: install the CUDA MPS tools "
                'that come with the NVIDIA driver, or use a profile with sharing = "timeslice".'
            )
        return path

    # -- lifecycle

    def start(self, default_active_thread_percentage: int | None = None) -> None:
        """Start the daemon and wait (bounded) until it answers a command."""
        binary = self._resolve()
        if self.pid() is not None:
            # Left over from a run that did not stop cleanly: its clients are gone.
            self.stop()
        for d in (self.root, self.pipe_dir, self.log_dir):
            d.mkdir(parents=True, exist_ok=True)
            os.chmod(d, 0o700)
        # The daemon keeps whatever stdout/stderr it inherits; a pipe here would
        # keep run() waiting for it. A file in the log folder does not.
        out_path = self.log_dir / "pdbox-start.out"
        with open(out_path, "wb") as out:
            try:
                proc = subprocess.run(
                    [binary, "-d"],
                    env=self._process_env(),
                    stdin=subprocess.DEVNULL,
                    stdout=out,
                    stderr=subprocess.STDOUT,
                    timeout=self.start_timeout_s,
                    start_new_session=True,
                    check=False,
                )
            except subprocess.TimeoutExpired:
                raise MpsError(
                    f"{self.binary} -d did not return within {self.start_timeout_s:g} s; "
                    f"see {out_path}."
                ) from None
            except OSError as exc:
                raise MpsError(f"{self.binary} could not be started: {exc}.") from None
        if proc.returncode != 0:
            detail = _last_line(out_path.read_text(errors="replace")) or "no message"
            raise MpsError(f"{self.binary} -d failed with exit code {proc.returncode} ({detail}).")
        self._started = True
        self._wait_ready()
        if default_active_thread_percentage is not None:
            pct = _check_percent(default_active_thread_percentage)
            self.command(f"set_default_active_thread_percentage {pct}")

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + self.start_timeout_s
        last = "the control pipe did not appear"
        while time.monotonic() < deadline:
            if (self.pipe_dir / CONTROL_PIPE).exists() and self.pid() is not None:
                try:
                    self.command("get_server_list")
                    return
                except MpsError as exc:
                    last = str(exc)
            time.sleep(0.05)
        self.stop()
        raise MpsError(
            f"the MPS daemon did not answer within {self.start_timeout_s:g} s ({last}); "
            f"see {self.log_dir / 'control.log'}."
        )

    def command(self, text: str) -> str:
        """Send control commands (one per line) and return the daemon's answer."""
        binary = self._resolve()
        try:
            proc = subprocess.run(
                [binary],
                input=text.rstrip("\n") + "\n",
                env=self._process_env(),
                capture_output=True,
                text=True,
                timeout=self.command_timeout_s,
                check=False,
            )
        except subprocess.TimeoutExpired:
            raise MpsError(
                f"the MPS daemon did not answer {text.split()[0]!r} "
                f"within {self.command_timeout_s:g} s."
            ) from None
        except OSError as exc:
            raise MpsError(f"{self.binary} could not be run: {exc}.") from None
        if proc.returncode != 0:
            detail = _last_line(proc.stderr) or _last_line(proc.stdout) or "no message"
            raise MpsError(f"MPS command {text.split()[0]!r} failed: {detail}.")
        return proc.stdout.strip()

    def server_list(self) -> list[int]:
        """PIDs of the MPS servers the daemon has spawned (one per user)."""
        return [int(tok) for tok in self.command("get_server_list").split() if tok.isdigit()]

    def pid(self) -> int | None:
        """The daemon's pid from its pid file, if that process is alive."""
        try:
            pid = int((self.pipe_dir / PID_FILE).read_text().strip())
        except (OSError, ValueError):
            return None
        return pid if _alive(pid) else None

    def running(self) -> bool:
        return self.pid() is not None

    def stop(self) -> None:
        """Send `quit` and wait (bounded) for the daemon to go. Safe to repeat.

        If it does not go in time it is sent SIGTERM, then SIGKILL: it is our own
        daemon (its pid file sits in our private folder), so nothing else is hit.
        """
        pid = self.pid()
        if pid is None:
            self._started = False
            return
        try:
            self.command("quit")
        except MpsError:
            pass
        if not _wait_gone(pid, self.stop_timeout_s):
            for sig in (signal.SIGTERM, signal.SIGKILL):
                try:
                    os.kill(pid, sig)
                except ProcessLookupError:
                    break
                if _wait_gone(pid, 2.0):
                    break
        self._started = False

    def state(self) -> dict[str, Any]:
        """The `hardware.mps` object of the status snapshot."""
        return {"enabled": True, "running": self.running(), "pipe_dir": str(self.pipe_dir)}

    def __enter__(self) -> MpsDaemon:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


# ----------------------------------------------------------------- per-client env

_MEM_LIMIT = re.compile(r"^\d+=\d+(?:[KMGT]B?)?(?:,\d+=\d+(?:[KMGT]B?)?)*$")


def mem_limit_for(fraction: float, total_bytes: int, gpu_index: int = 0) -> str:
    """`CUDA_MPS_PINNED_DEVICE_MEM_LIMIT` for a worker allowed `fraction` of a GPU.

    `gpu_index` is the GPU's index on the machine. `client_env` makes that GPU
    the only one the worker sees, and rewrites the limit to the worker's own
    numbering (ordinal 0). Rounded down to whole MiB: a cap must never end up
    above the budget it was computed from.
    """
    if not 0 < fraction <= 1:
        raise ValueError(f"memory fraction must be in (0, 1], not {fraction}")
    if total_bytes <= 0:
        raise ValueError("the device's total memory is unknown")
    mib = math.floor(fraction * total_bytes / MIB)
    if mib < 1:
        raise ValueError(f"a memory fraction of {fraction} leaves less than 1 MiB")
    value = f"{mib // 1024}G" if mib % 1024 == 0 else f"{mib}M"
    return f"{gpu_index}={value}"


_UNITS = {"": 1, "K": 1024, "M": MIB, "G": GIB, "T": 1024 * GIB}


def mem_limit_bytes(limit: str, ordinal: int = 0) -> int | None:
    """The cap in bytes that a `CUDA_MPS_PINNED_DEVICE_MEM_LIMIT` value gives
    device `ordinal`, or None when it names other devices only.

    NVIDIA's format is a comma-separated list of `<device>=<size>` with the
    size in K, M, G or T (a trailing B allowed: "0=1G,1=512MB"); a size without
    a unit is read as bytes here.
    """
    if not _MEM_LIMIT.match(limit):
        raise ValueError(f"not an MPS memory limit: {limit!r} (expected e.g. '0=20G')")
    for part in limit.split(","):
        dev, size = part.split("=")
        if int(dev) != ordinal:
            continue
        m = re.match(r"^(\d+)([KMGT]?)B?$", size)
        assert m is not None  # the pattern above admits nothing else
        return int(m.group(1)) * _UNITS[m.group(2)]
    return None


def client_env(
    daemon_env: Mapping[str, str],
    sm_percent: int,
    mem_limit: str | None,
    gpu_index: int,
) -> dict[str, str]:
    """The environment one worker needs to be an MPS client with its share.

    The pipe and log folders come from the daemon (they must match). The GPU
    is the daemon's UUID if it has one, else `gpu_index`, so that exactly one
    device is visible. That device is ordinal 0 inside the worker, so a limit
    written for the machine's `gpu_index` (as `mem_limit_for` writes it) is
    renumbered to 0; a limit naming any other GPU is an error.
    """
    env = {
        k: v
        for k, v in daemon_env.items()
        if k in ("CUDA_MPS_PIPE_DIRECTORY", "CUDA_MPS_LOG_DIRECTORY", "CUDA_VISIBLE_DEVICES")
    }
    missing = {"CUDA_MPS_PIPE_DIRECTORY", "CUDA_MPS_LOG_DIRECTORY"} - set(env)
    if missing:
        raise ValueError(f"daemon_env lacks {', '.join(sorted(missing))}")
    env.setdefault("CUDA_VISIBLE_DEVICES", str(gpu_index))
    env["CUDA_MPS_ACTIVE_THREAD_PERCENTAGE"] = str(_check_percent(sm_percent))
    if mem_limit:
        if not _MEM_LIMIT.match(mem_limit):
            raise ValueError(f"not an MPS memory limit: {mem_limit!r} (expected e.g. '0=20G')")
        parts = mem_limit.split(",")
        ordinal, value = parts[0].split("=")
        if len(parts) != 1 or int(ordinal) not in (0, gpu_index):
            raise ValueError(
                f"memory limit {mem_limit!r} must name GPU {gpu_index} alone: "
                "the worker sees that one GPU only"
            )
        env["CUDA_MPS_PINNED_DEVICE_MEM_LIMIT"] = f"0={value}"
    return env


def check_memory_fractions(fractions: list[float]) -> None:
    """Raise ValueError unless the workers' memory fractions fit on one GPU.

    The profile loader checks the configured replicas; this is the runtime
    check before one more worker starts (the autoscaler adding a replica).
    """
    bad = [f for f in fractions if not 0 < f <= 1]
    if bad:
        raise ValueError(f"memory fractions must be in (0, 1], not {bad[0]}")
    total = sum(fractions)
    if total >= MEMORY_BUDGET:
        raise ValueError(
            f"the workers' memory fractions add up to {total:.2f}, which must stay below "
            f"{MEMORY_BUDGET}: lower memory_fraction or the replica count."
        )


# ---------------------------------------------------------------------- internals


def _check_percent(value: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 100:
        raise ValueError(f"an SM percentage must be an integer from 1 to 100, not {value!r}")
    return value


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return not _zombie(pid)


def _zombie(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] == "Z"
    except (OSError, IndexError):
        return False


def _wait_gone(pid: int, timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if not _alive(pid):
            return True
        time.sleep(0.02)
    return not _alive(pid)


def _last_line(text: str) -> str:
    lines = [ln.strip() for ln in text.strip().splitlines() if ln.strip()]
    return lines[-1].rstrip(".") if lines else ""
