#!/usr/bin/env python3
"""Start-up benchmark: `pdbox up` to ready on cpu-tiny against one bare vLLM server.

In one run, alternating, N times each:
  - bare: `python -m vllm.entrypoints.openai.api_server` with the same flags pdbox gives its
    decode worker, timed from spawn to the first 200 on /health;
  - pdbox: `pdbox up --headless --profile cpu-tiny`, timed from spawn to the endpoint line
    (both workers answer /health and served a 1-token warm-up completion).
Also reports the peak RSS (VmHWM) of the pdbox process itself, workers excluded.
Goals: pdbox/bare ≤ 1.3; pdbox peak RSS ≤ 150 MB. The model is prepared first, untimed.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from pdbox import config  # noqa: E402
from pdbox.ports import PortAllocator  # noqa: E402
from pdbox.workers import vllm as vllm_spec  # noqa: E402
from pdbox.workers.model import resolve_model  # noqa: E402


def kill_group(p: subprocess.Popen, grace: float = 30) -> None:
    if p.poll() is None:
        os.killpg(p.pid, signal.SIGTERM)
        try:
            p.wait(grace)
        except subprocess.TimeoutExpired:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait()
    try:
        os.killpg(p.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def bare(model: str, log: Path) -> float:
    p = config.load("cpu-tiny")
    alloc = PortAllocator()
    spec = vllm_spec.build(p, "decode", 0, vllm_spec.WorkerPorts(alloc.take(), alloc.take(), 0),
                           model, online_cores=[0, 1])
    argv = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", *spec.argv[3:]]
    env = {k: v for k, v in spec.env.items() if k != "PDBOX_WORKER_TUNING"}
    env["PYTHONPATH"] = str(REPO)
    t0 = time.monotonic()
    proc = subprocess.Popen(argv, env=env, stdout=open(log, "wb"), stderr=subprocess.STDOUT,
                            start_new_session=True)
    try:
        while True:
            if proc.poll() is not None:
                raise SystemExit(f"bare vLLM exited; see {log}")
            try:
                with urllib.request.urlopen(f"{spec.url}/health", timeout=1) as r:
                    if r.status == 200:
                        return time.monotonic() - t0
            except OSError:
                time.sleep(0.2)
    finally:
        kill_group(proc)


def pdbox_up(home: Path, models: str) -> tuple[float, float]:
    env = dict(os.environ, PDBOX_HOME=str(home), PDBOX_MODELS_DIR=models)
    t0 = time.monotonic()
    proc = subprocess.Popen([str(REPO / ".venv" / "bin" / "pdbox"), "up", "--headless",
                             "--profile", "cpu-tiny", "--port", "0"], env=env,
                            stdout=subprocess.PIPE, stderr=open(home / "stderr.log", "wb"),
                            start_new_session=True)
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline().decode()
        ready = time.monotonic() - t0
        if not re.match(r"http://", line):
            raise SystemExit(f"pdbox did not start; see {home / 'stderr.log'}")
        hwm = 0.0
        for row in Path(f"/proc/{proc.pid}/status").read_text().splitlines():
            if row.startswith("VmHWM:"):
                hwm = int(row.split()[1]) / 1024.0
        return ready, hwm
    finally:
        kill_group(proc, grace=60)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=2)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    models = os.environ.get("PDBOX_MODELS_DIR") or str(REPO / ".cache" / "models")
    os.environ["PDBOX_MODELS_DIR"] = models
    model = resolve_model("embedded:smollm2-135m-instruct").model_arg
    bares, ups, rss = [], [], []
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(args.runs):
            bares.append(bare(model, Path(tmp) / f"bare-{i}.log"))
            home = Path(tmp) / f"home-{i}"
            home.mkdir()
            r, h = pdbox_up(home, models)
            ups.append(r)
            rss.append(h)
            print(f"run {i + 1}: bare /health {bares[-1]:.1f}s, pdbox ready {r:.1f}s, "
                  f"pdbox peak RSS {h:.0f} MB", file=sys.stderr)
    out = {
        "bare_health_s": bares, "pdbox_ready_s": ups, "pdbox_peak_rss_mb": rss,
        "ratio_median": statistics.median(ups) / statistics.median(bares),
        "goal_ratio": 1.3, "goal_rss_mb": 150,
    }
    out["ratio_ok"] = out["ratio_median"] <= 1.3
    out["rss_ok"] = max(rss) <= 150
    print(json.dumps(out, indent=2) if args.json else
          f"bare {statistics.median(bares):.1f}s  pdbox {statistics.median(ups):.1f}s  "
          f"ratio {out['ratio_median']:.2f} (goal ≤ 1.3)  peak RSS {max(rss):.0f} MB (≤ 150)")


if __name__ == "__main__":
    main()
