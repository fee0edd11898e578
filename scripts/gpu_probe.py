#!/usr/bin/env python3
"""Probe one NVIDIA GPU for what pdbox's GPU path assumes, and print JSON.

For a GPU machine where vLLM is not installed and nothing can be downloaded:
it needs only torch, nvidia-ml-py and pdbox's own `pdbox/hardware/` code
(and the gh200-pd profile's split). Run from the repository root:

    python scripts/gpu_probe.py [--profile gh200-pd] [--out probe.json]

It starts a private MPS control daemon through pdbox.hardware.mps (or says
why MPS is unavailable), starts two torch clients with the per-worker
environment pdbox gives the profile's prefill and decode workers, and
reports each client's torch.cuda.mem_get_info() under its pinned limit,
whether an allocation past the limit fails, bf16 matmul TFLOP/s of each
client alone and both together, whether a CUDA tensor shared by IPC between
the two clients can be read, NVML readings through pdbox/hardware/nvml.py,
and that the daemon stopped. The `verdict` answers docs/GPU.md's open
question: which total a client sees under MPS, and whether vLLM's start-up
check passes with pdbox's flags. Every wait is bounded; the whole run takes
well under 5 minutes. Exit status 0 when JSON was written (`status` says
"probed", "no_gpu" or "error"), 2 for bad arguments.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

MIB = 1024**2
GIB = 1024**3
STEP_TIMEOUT_S = 90.0
# The clients' whole conversation, so the probe ends in under 5 minutes.
CLIENTS_DEADLINE_S = 240.0
ALLOC_CHUNK = 256 * MIB
# `past_limit`: allocate this far past the cap before calling it "not enforced".
GPU_SETTINGS = {"device": "cuda", "matmul_n": 8192, "matmul_s": 5.0, "past_limit": 2 * GIB}
# --self-test-cpu: the same clients, queues and steps on the CPU with small
# sizes, so the orchestration is tested on machines with no GPU.
CPU_SETTINGS = {"device": "cpu", "matmul_n": 256, "matmul_s": 0.3, "past_limit": 16 * MIB}
SELF_TEST_CARD = 256 * MIB


# ------------------------------------------------------------------- clients


def client_main(name: str, cmd_q: Any, out_q: Any, barrier: Any, ipc_q: Any,
                settings: dict[str, Any]) -> None:
    """One torch client: answers commands from the parent, one JSON-able dict each.

    Runs in a spawned process whose environment the parent set before spawning:
    CUDA reads the MPS variables when it initialises, so nothing here may touch
    CUDA before that environment is in place (it is, at import)."""
    import torch

    dev = settings["device"]
    held: list[Any] = []
    shared: Any = None
    while True:
        cmd, arg = cmd_q.get(timeout=STEP_TIMEOUT_S * 3)
        try:
            if cmd == "quit":
                out_q.put((name, cmd, {"ok": True}))
                return
            if cmd == "meminfo":
                result = _meminfo(torch, dev)
            elif cmd == "alloc":
                result = _alloc_until(torch, dev, int(arg), held)
                held.clear()
                if dev == "cuda":
                    torch.cuda.empty_cache()
            elif cmd == "matmul":
                result = _matmul(torch, dev, settings, barrier if arg == "together" else None)
            elif cmd == "ipc_send":
                shared = torch.arange(1 << 20, dtype=torch.float32, device=dev)
                ipc_q.put(shared)
                result = {"sent_elements": shared.numel()}
            elif cmd == "ipc_recv":
                t = ipc_q.get(timeout=STEP_TIMEOUT_S)
                expect = float((1 << 20) * ((1 << 20) - 1) / 2)
                got = float(t.double().sum().item())
                result = {"read": got == expect, "sum": got, "expected": expect,
                          "is_cuda": bool(t.is_cuda)}
                del t
            elif cmd == "ipc_release":
                shared = None
                result = {"released": True}
            else:
                result = {"error": f"unknown command {cmd}"}
        except Exception as exc:  # noqa: BLE001 - reported to the parent, never raised
            result = {"error": f"{type(exc).__name__}: {exc}"}
        out_q.put((name, cmd, result))


def _meminfo(torch: Any, dev: str) -> dict[str, Any]:
    env = {k: v for k, v in os.environ.items() if k.startswith("CUDA_")}
    if dev != "cuda":
        return {"device": dev, "env": env}
    torch.cuda.init()
    free, total = torch.cuda.mem_get_info()
    props = torch.cuda.get_device_properties(0)
    return {"mem_get_info_free": free, "mem_get_info_total": total,
            "device_total_memory": props.total_memory, "device_name": props.name,
            "sm_count": props.multi_processor_count, "env": env}


def _alloc_until(torch: Any, dev: str, stop_after: int, held: list[Any]) -> dict[str, Any]:
    """Allocate in chunks until the device refuses or `stop_after` bytes are held."""
    total = 0
    error = None
    chunk = min(ALLOC_CHUNK, max(MIB, stop_after // 16))
    while total < stop_after:
        try:
            held.append(torch.empty(chunk, dtype=torch.uint8, device=dev))
            total += chunk
        except RuntimeError as exc:  # torch.cuda.OutOfMemoryError is a RuntimeError
            error = str(exc).splitlines()[0][:300]
            break
    return {"allocated_bytes": total, "refused": error is not None, "error": error}


def _matmul(torch: Any, dev: str, settings: dict[str, Any], barrier: Any) -> dict[str, Any]:
    n, seconds = settings["matmul_n"], settings["matmul_s"]
    a = torch.randn(n, n, dtype=torch.bfloat16, device=dev)
    b = torch.randn(n, n, dtype=torch.bfloat16, device=dev)

    def sync() -> None:
        if dev == "cuda":
            torch.cuda.synchronize()

    for _ in range(3):
        a @ b
    sync()
    if barrier is not None:
        barrier.wait(timeout=STEP_TIMEOUT_S)
    iters = 0
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        for _ in range(10):
            a @ b
        sync()
        iters += 10
    dt = time.perf_counter() - t0
    return {"tflops": 2 * n**3 * iters / dt / 1e12, "seconds": dt, "iterations": iters,
            "n": n}


# -------------------------------------------------------------------- parent


def nvml_readings() -> dict[str, Any]:
    from pdbox.hardware.nvml import default_telemetry

    gpu = default_telemetry()
    if not gpu.available():
        return {"available": False, "reason": getattr(gpu, "reason", "no GPU"), "gpus": []}
    return {"available": True, "gpus": [d.to_dict() for d in gpu.devices()]}


def start_mps(run_dir: Path, gpu_uuid: str | None) -> tuple[Any, dict[str, Any]]:
    """pdbox's own daemon control; (daemon or None, report)."""
    from pdbox.hardware.mps import MpsDaemon, MpsError

    daemon = MpsDaemon(run_dir, gpu_uuid=gpu_uuid)
    try:
        daemon.start()
    except MpsError as exc:
        return None, {"available": False, "reason": str(exc)}
    return daemon, {"available": True, "pipe_dir": str(daemon.pipe_dir),
                    "daemon_pid": daemon.pid(), "servers_at_start": daemon.server_list()}


def stop_mps(daemon: Any, report: dict[str, Any]) -> None:
    if daemon is None:
        return
    try:
        report["servers_before_stop"] = daemon.server_list()
    except Exception as exc:  # noqa: BLE001 - a report, not a failure
        report["servers_before_stop"] = f"error: {exc}"
    daemon.stop()
    report["daemon_stopped"] = not daemon.running()


def client_envs(profile: Any, daemon: Any, total: int) -> dict[str, dict[str, str]]:
    """Each role's MPS client environment, exactly as pdbox builds a worker's."""
    from pdbox.hardware.mps import client_env, mem_limit_for

    idx = profile.hardware.gpu_index
    out = {}
    for role, rc in profile.roles().items():
        if daemon is None:
            out[role] = {"CUDA_VISIBLE_DEVICES": str(idx)}
            continue
        limit = mem_limit_for(rc.memory_fraction, total, idx)
        out[role] = client_env(daemon.env(), rc.sm_percent, limit, idx)
    return out


def verdict(roles: dict[str, dict[str, Any]], card_total: int) -> dict[str, Any]:
    """What the measurements say about docs/GPU.md's open questions.

    `roles[r]` holds the role's `fraction`, `cap_bytes` (None without MPS) and
    the client's `meminfo` and `alloc` answers."""
    out: dict[str, Any] = {}
    for role, r in roles.items():
        info, alloc, cap = r.get("meminfo") or {}, r.get("alloc") or {}, r.get("cap_bytes")
        total = info.get("mem_get_info_total")
        free = info.get("mem_get_info_free")
        v: dict[str, Any] = {}
        if total:
            v["total_seen"] = ("cap" if cap and _near(total, cap)
                               else "card" if _near(total, card_total) else "other")
            # vLLM's start-up check (vllm/v1/worker/utils.py request_memory) with
            # the utilization pdbox passes: the role's own fraction.
            v["vllm_startup_check_passes"] = bool(free is not None
                                                  and free >= total * r["fraction"])
        if cap and alloc:
            v["limit_enforced"] = bool(alloc.get("refused")
                                       and alloc["allocated_bytes"] <= cap + ALLOC_CHUNK)
            v["allocated_before_refusal_bytes"] = alloc.get("allocated_bytes")
        out[role] = v
    return out


def _near(x: int, y: int) -> bool:
    return abs(x - y) <= 0.05 * y


def probe(args: argparse.Namespace) -> dict[str, Any]:
    report: dict[str, Any] = {
        "probe": "pdbox scripts/gpu_probe.py",
        "host": {"machine": platform.machine(), "python": platform.python_version()},
        "started_unix": time.time(),
    }
    try:
        import torch

        report["torch"] = {"version": torch.__version__, "cuda": torch.version.cuda}
    except ImportError as exc:
        report["torch"] = {"error": str(exc)}
    if args.self_test_cpu:
        from pdbox import config

        report.update(run_clients(config.load(args.profile), None, SELF_TEST_CARD,
                                  CPU_SETTINGS))
        report.pop("_nvml_during", None)
        report["status"] = "self_test"
        return report
    before = nvml_readings()
    report["nvml_before"] = before
    if not before["available"] or not before["gpus"]:
        report["status"] = "no_gpu"
        report["reason"] = before.get("reason") or "NVML lists no GPU"
        report["mps"] = {"available": False, "reason": "no GPU: nothing to share"}
        return report
    if "error" in report["torch"]:
        report["status"] = "error"
        report["reason"] = f"torch is not importable: {report['torch']['error']}"
        return report
    from pdbox import config

    profile = config.load(args.profile)
    if not profile.is_pd:
        raise ValueError(f"{args.profile} is not a P/D profile: the probe needs two roles")
    gpu = before["gpus"][profile.hardware.gpu_index]
    card_total = int(gpu["memory_total_bytes"])
    run_dir = Path(tempfile.mkdtemp(prefix="pdbox-probe-"))
    daemon, mps = start_mps(run_dir, gpu.get("uuid"))
    report["mps"] = mps
    try:
        report.update(run_clients(profile, daemon, card_total))
        report["nvml_during"] = report.pop("_nvml_during", None)
    finally:
        stop_mps(daemon, mps)
    report["nvml_after"] = nvml_readings()
    report["status"] = "probed"
    report["seconds"] = time.time() - report["started_unix"]
    return report


def run_clients(profile: Any, daemon: Any, card_total: int,
                settings: dict[str, Any] | None = None) -> dict[str, Any]:
    import multiprocessing as mp

    import torch.multiprocessing as tmp  # CUDA tensors through queues (IPC handles)

    from pdbox.plan.memory import cap_bytes

    settings = settings or GPU_SETTINGS
    ctx = tmp.get_context("spawn")
    envs = client_envs(profile, daemon, card_total)
    out_q = ctx.Queue()
    ipc_q = ctx.Queue()
    barrier = ctx.Barrier(2)
    clients: dict[str, tuple[Any, Any]] = {}
    saved = dict(os.environ)
    try:
        for role, env in envs.items():
            # spawn copies os.environ when the child starts: set, start, restore.
            os.environ.clear()
            os.environ.update({k: v for k, v in saved.items()
                               if not k.startswith("CUDA_MPS_")})
            os.environ.update(env)
            cmd_q = ctx.Queue()
            proc = ctx.Process(target=client_main,
                               args=(role, cmd_q, out_q, barrier, ipc_q, settings), daemon=True)
            proc.start()
            clients[role] = (proc, cmd_q)
    finally:
        os.environ.clear()
        os.environ.update(saved)

    def ask(role: str, cmd: str, arg: Any = None) -> dict[str, Any]:
        clients[role][1].put((cmd, arg))
        return wait_for({role}, cmd)[role]

    def wait_for(roles: set[str], cmd: str) -> dict[str, dict[str, Any]]:
        got: dict[str, dict[str, Any]] = {}
        deadline = min(time.monotonic() + STEP_TIMEOUT_S, overall)
        while set(got) != roles:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"clients {sorted(roles - set(got))} did not answer {cmd}")
            name, c, result = out_q.get(timeout=left)
            if c == cmd:
                got[name] = result
        return got

    overall = time.monotonic() + CLIENTS_DEADLINE_S
    results: dict[str, dict[str, Any]] = {
        role: {"env": {k: v for k, v in env.items() if k.startswith("CUDA_")},
               "fraction": profile.role(role).memory_fraction,
               "sm_percent": profile.role(role).sm_percent,
               "cap_bytes": cap_bytes(profile.role(role).memory_fraction, card_total)
               if daemon is not None else None}
        for role, env in envs.items()}
    nvml_during = None
    errors: list[str] = []
    try:
        for role in clients:
            results[role]["meminfo"] = ask(role, "meminfo")
        nvml_during = nvml_readings()
        for role in clients:
            target = results[role]["cap_bytes"] or int(
                results[role]["fraction"] * card_total)
            results[role]["alloc"] = ask(role, "alloc", target + settings["past_limit"])
        for role in clients:
            results[role]["matmul_alone"] = ask(role, "matmul", "alone")
        for _, q in clients.values():
            q.put(("matmul", "together"))
        for role, r in wait_for(set(clients), "matmul").items():
            results[role]["matmul_together"] = r
        sender, receiver = list(clients)
        clients[sender][1].put(("ipc_send", None))
        ipc = {"sender": sender, "receiver": receiver,
               "send": wait_for({sender}, "ipc_send")[sender],
               "recv": ask(receiver, "ipc_recv")}
        ipc["release"] = ask(sender, "ipc_release")
    except Exception as exc:  # noqa: BLE001 - reported, and the clients still stopped
        errors.append(f"{type(exc).__name__}: {exc}")
        ipc = {}
    finally:
        for _, q in clients.values():
            q.put(("quit", None))
        for proc, _ in clients.values():
            proc.join(timeout=30)
            if proc.is_alive():
                proc.kill()
                proc.join(timeout=5)
    mp.active_children()
    return {"clients": results, "ipc": ipc, "errors": errors,
            "verdict": verdict(results, card_total), "_nvml_during": nvml_during}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--profile", default="gh200-pd", help="a P/D MPS profile (gh200-pd)")
    ap.add_argument("--out", type=Path, help="also write the JSON to this file")
    ap.add_argument("--self-test-cpu", action="store_true",
                    help="run the clients on the CPU (no MPS, no GPU): tests the probe itself")
    args = ap.parse_args(argv)
    try:
        report = probe(args)
    except Exception as exc:  # noqa: BLE001 - the JSON must come out whatever happened
        report = {"status": "error", "reason": f"{type(exc).__name__}: {exc}",
                  "traceback": traceback.format_exc()}
    text = json.dumps(report, indent=2, default=str)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
