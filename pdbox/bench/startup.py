"""Start-up: `pdbox up` to ready against one bare vLLM server with the same flags.

In one run, alternating, N times each:

- bare: `python -m vllm.entrypoints.openai.api_server` with the flags pdbox gives
  its decode (or first aggregated) worker, timed from spawn to the first 200 on
  /health;
- pdbox: `pdbox up --headless`, timed from spawn to its endpoint line (the first
  worker serves) and to every worker ready.

Also the peak RSS (VmHWM) of the pdbox process itself, workers excluded.
Goals: pdbox (every worker ready) / bare ≤ 1.3; pdbox peak RSS ≤ 150 MB.
The model is prepared first, untimed.
"""

from __future__ import annotations

import os
import signal
import statistics
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pdbox import config
from pdbox.bench import box as boxes
from pdbox.bench.progress import Progress
from pdbox.bench.report import Column, Row

GOAL_RATIO = 1.3
GOAL_RSS_MB = 150.0
COLUMNS = [
    Column("health_or_endpoint_s", "first serve s", "lower", "seconds"),
    Column("ready_s", "all ready s", "lower", "seconds"),
    Column("peak_rss_mb", "own peak RSS MB", "lower"),
]


def _end_group(p: subprocess.Popen[bytes], grace: float = 30) -> None:
    if p.poll() is None:
        try:
            os.killpg(p.pid, signal.SIGTERM)
            p.wait(grace)
        except subprocess.TimeoutExpired:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait(10)
        except ProcessLookupError:
            pass
    try:  # children that outlived the leader
        os.killpg(p.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def bare(profile: config.Profile, log: Path, timeout_s: float = 900.0) -> float:
    """Seconds from spawn to /health of one vLLM server with a pdbox worker's flags."""
    from pdbox.ports import PortAllocator
    from pdbox.workers import vllm as vllm_spec
    from pdbox.workers.model import resolve_model

    role = "decode" if profile.is_pd else "aggregated"
    model = resolve_model(profile.model.source, progress=False).model_arg
    alloc = PortAllocator()
    spec = vllm_spec.build(profile, role, 0, vllm_spec.WorkerPorts(alloc.take(), alloc.take(), 0),
                           model, online_cores=sorted(os.sched_getaffinity(0)))
    # spec.argv is [python, -m, <pdbox's worker wrapper>, vLLM's own arguments...].
    argv = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", *spec.argv[3:]]
    env = {k: v for k, v in spec.env.items() if k != "PDBOX_WORKER_TUNING"}
    # Without pdbox's worker site hooks: a bare server, as a user would start it.
    env["PYTHONPATH"] = str(Path(__file__).resolve().parents[2])
    t0 = time.monotonic()
    with open(log, "wb") as out:
        proc = subprocess.Popen(argv, env=env, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)
    try:
        while time.monotonic() - t0 < timeout_s:
            if proc.poll() is not None:
                raise boxes.BoxError(f"the bare vLLM server exited with {proc.returncode}; "
                                     f"see {log}")
            try:
                with urllib.request.urlopen(f"{spec.url}/health", timeout=1) as r:
                    if r.status == 200:
                        return time.monotonic() - t0
            except OSError:
                time.sleep(0.2)
        raise boxes.BoxError(f"the bare vLLM server did not answer /health in {timeout_s:.0f} s")
    finally:
        _end_group(proc)


def peak_rss_mb(pid: int) -> float | None:
    try:
        for row in Path(f"/proc/{pid}/status").read_text().splitlines():
            if row.startswith("VmHWM:"):
                return int(row.split()[1]) / 1024.0
    except OSError:
        pass
    return None


def pdbox_up(work: Path, profile_file: Path, timeout_s: float) -> dict[str, Any]:
    b = boxes.start(work, profile_file, timeout_s=timeout_s)
    try:
        rss = peak_rss_mb(b.proc.pid)
    finally:
        left = b.stop()
    return {"endpoint_s": b.endpoint_s, "ready_s": b.ready_s, "peak_rss_mb": rss,
            "leftover_pids": left}


def run(profile: config.Profile, profile_file: Path, runs: int, work: Path,
        progress: Progress, timeout_s: float = 900.0,
        bare_fn: Callable[..., float] = bare) -> dict[str, Any]:
    from pdbox.workers.model import resolve_model

    progress.setup(0, 1, profile.name)
    progress.update("preparing the model (untimed)")
    resolve_model(profile.model.source, progress=False)
    bares: list[float] = []
    ups: list[dict[str, Any]] = []
    for i in range(runs):
        progress.update(f"run {i + 1}/{runs}: bare vLLM")
        bares.append(bare_fn(profile, work / f"bare-{i}.log", timeout_s))
        progress.update(f"run {i + 1}/{runs}: pdbox up")
        (work / f"up-{i}").mkdir(parents=True, exist_ok=True)
        ups.append(pdbox_up(work / f"up-{i}", profile_file, timeout_s))
        progress.note(f"bench run {i + 1}: bare /health {bares[-1]:.1f} s, pdbox serving "
                      f"{ups[-1]['endpoint_s']:.1f} s, all ready {ups[-1]['ready_s']:.1f} s, "
                      f"peak RSS {ups[-1]['peak_rss_mb'] or 0:.0f} MB")
    return summary(bares, ups)


def summary(bares: list[float], ups: list[dict[str, Any]]) -> dict[str, Any]:
    ready = [u["ready_s"] for u in ups if u["ready_s"] is not None]
    rss = [u["peak_rss_mb"] for u in ups if u["peak_rss_mb"] is not None]
    ratio = statistics.median(ready) / statistics.median(bares) if ready and bares else None
    return {
        "bare_health_s": [round(x, 2) for x in bares],
        "pdbox_endpoint_s": [round(u["endpoint_s"], 2) for u in ups if u["endpoint_s"]],
        "pdbox_ready_s": [round(x, 2) for x in ready],
        "pdbox_peak_rss_mb": [round(x, 1) for x in rss],
        "ratio_median": None if ratio is None else round(ratio, 3),
        "goal_ratio": GOAL_RATIO, "goal_rss_mb": GOAL_RSS_MB,
        "ratio_ok": ratio is not None and ratio <= GOAL_RATIO,
        "rss_ok": bool(rss) and max(rss) <= GOAL_RSS_MB,
        "leftover_pids": sorted({p for u in ups for p in u.get("leftover_pids", [])}),
    }


def rows(result: dict[str, Any]) -> list[Row]:
    def med(xs: list[float]) -> float | None:
        return round(statistics.median(xs), 2) if xs else None

    return [
        Row("", "bare vLLM", {"health_or_endpoint_s": med(result["bare_health_s"]),
                              "ready_s": med(result["bare_health_s"])}),
        Row("", "pdbox up", {"health_or_endpoint_s": med(result["pdbox_endpoint_s"]),
                             "ready_s": med(result["pdbox_ready_s"]),
                             "peak_rss_mb": max(result["pdbox_peak_rss_mb"], default=None)}),
    ]
