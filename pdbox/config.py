"""Profiles: TOML files read into frozen dataclasses.

A profile is the whole description of one box: the model, how the hardware is
split between roles, the router's policy and the autoscaler's targets. It is
validated once, here, so that every other layer can trust it. Errors name the
file, the dotted key, the line where we can find it, and a "did you mean" for
unknown keys. This module imports nothing heavier than tomli.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import re
import tomllib as _toml
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# Built-in profiles live at the repository root (profiles/), beside the package.
BUILTIN_DIR = Path(__file__).resolve().parent.parent / "profiles"
ROLES = ("prefill", "decode", "aggregated")
POLICIES = ("prefix", "least_loaded", "round_robin")


class ProfileError(Exception):
    """A profile that cannot be used. str() is the one sentence shown to the user."""

    def __init__(self, file: str, key: str, message: str, line: int | None = None):
        self.file = file
        self.key = key
        self.line = line
        self.message = message
        where = f"{file}"
        if line is not None:
            where += f":{line}"
        super().__init__(f"{where}: {key}: {message}" if key else f"{where}: {message}")


# --------------------------------------------------------------------------- schema


@dataclass(frozen=True)
class ModelConfig:
    source: str = "embedded:smollm2-135m-instruct"
    served_name: str = "smollm2"
    max_model_len: int = 4096
    # KV block size of the engine. The CPU backend uses 128; CUDA vLLM uses 16.
    block_size: int = 128
    # "auto": bf16 where the CPU does it in hardware, else float32; on a GPU,
    # vLLM's choice (pdbox/hardware/dtype.py). An explicit dtype wins.
    dtype: str = "auto"


@dataclass(frozen=True)
class HardwareConfig:
    device: str = "cpu"  # cpu | cuda
    sharing: str = "cores"  # cores | mps | timeslice
    # Substring of the NVML device name this profile is meant for ("GH200", "H100").
    gpu_match: str = ""
    gpu_index: int = 0
    # Resident memory one CPU worker needs, for the autoscaler's budget.
    worker_memory_gib: float = 4.0


@dataclass(frozen=True)
class RoleConfig:
    """One role's workers. On a CPU each worker takes the next core set of
    `cores` in turn; on a GPU each takes `sm_percent` and `memory_fraction`."""

    replicas: int = 1
    min: int = 1
    max: int = 1
    cores: tuple[str, ...] = ()
    kv_cache_gib: float = 1.0
    sm_percent: int = 100
    memory_fraction: float = 0.0
    max_num_seqs: int = 0  # 0: vLLM's default
    # Tokens one engine step may schedule (prefill chunks + decodes); 0: the default
    # (vLLM's on a CPU, 8192 on a GPU). Smaller bounds a step that carries a prefill
    # chunk beside running streams; larger prefills faster.
    max_num_batched_tokens: int = 0

    def core_set(self, index: int) -> str:
        return self.cores[index % len(self.cores)] if self.cores else ""


@dataclass(frozen=True)
class ModeConfig:
    kind: str = "pd"  # pd | aggregated


@dataclass(frozen=True)
class NixlConfig:
    backend: str = "UCX"
    ucx_tls: str = "tcp,sm,self"
    # Polling delay of NIXL's progress thread. The Python API creates agents with
    # 0 us, which spins a whole core per worker; 500 us keeps idle use near 5 %
    # (cpu-tiny takes 5,000: its workers share their core with the poll).
    progress_delay_us: int = 500
    buffer_device: str = "cpu"
    # What the decode worker does when a KV pull fails.
    kv_load_failure_policy: str = "recompute"


@dataclass(frozen=True)
class KvConfig:
    # Host memory per GPU worker for a second KV tier (vLLM's OffloadingConnector
    # after NIXL in a MultiConnector). 0: none. GPU profiles only.
    offload_gib: float = 0.0


@dataclass(frozen=True)
class Weights:
    prefix: float = 3.0
    queue: float = 2.0
    kv: float = 2.0


@dataclass(frozen=True)
class RouterConfig:
    host: str = "127.0.0.1"
    port: int = 8000
    policy: str = "prefix"
    weights: Weights = field(default_factory=Weights)
    # The P/D gate: remote prefill only when at least this many prompt tokens
    # are uncached on the chosen decode worker. "auto": the tokens that worker
    # prefills, at its measured speed, in what the ITL target leaves beside its
    # decode step (decider.gate_tokens): a shorter prompt cannot push a stream's
    # gap past the target, so splitting it never pays. An integer fixes it.
    pd_min_uncached_tokens: int | str = "auto"
    # "threshold" uses only the rule above; "adaptive" also predicts TTFT from
    # live prefill speed, transfer time and queueing.
    pd_decider: str = "adaptive"
    # Soft roles (P/D only): the prefill worker also serves short requests whole
    # while it has no prefill work (router/soft_roles.py). Off: a fixed split.
    soft_roles: bool = True
    # Hybrid P/D (with soft roles): every worker serves whole requests of any
    # length, and a request is split into prefill and decode legs, in either
    # direction, only when the measured costs say so (docs/PD.md).
    hybrid: bool = False
    # After a prefill leg, the prefill worker is kept for prefill this long.
    soft_roles_hold_s: float = 10.0
    kv_events: bool = True
    # Approximate index bound, in blocks per worker.
    index_blocks_per_worker: int = 4096
    queue_bound: int = 64
    # 0: as many as each worker reports it runs (pdbox/router/admit.py); N: a fixed cap
    max_inflight_per_worker: int = 0
    max_body_bytes: int = 8 * 1024 * 1024
    request_timeout_s: float = 300.0
    prefill_timeout_s: float = 60.0
    priority_scheduling: bool = False
    # A worker whose load exceeds the least-loaded one by both margins loses
    # its prefix advantage (sglang-router's balance thresholds).
    balance_abs: int = 8
    balance_rel: float = 1.5
    api_key_env: str = "PDBOX_API_KEY"

    @property
    def fixed_gate(self) -> int | None:
        """The P/D gate the profile fixes, or None where it is derived ("auto")."""
        g = self.pd_min_uncached_tokens
        return g if isinstance(g, int) else None


@dataclass(frozen=True)
class SloConfig:
    ttft_s: float = 3.0
    itl_s: float = 0.25


@dataclass(frozen=True)
class AutoscalerConfig:
    enabled: bool = True
    period_s: float = 5.0
    tolerance: float = 0.1
    scale_down_window_s: float = 300.0
    max_scale_up_step: int = 1
    panic_window_s: float = 10.0
    panic_threshold: float = 2.0
    drain_timeout_s: float = 60.0
    target_queue_per_worker: float = 4.0
    target_kv_usage: float = 0.8
    target_utilization: float = 0.85
    resplit: bool = False
    # After a re-split, the split stays at least this long (each move restarts workers).
    resplit_dwell_s: float = 300.0


@dataclass(frozen=True)
class EngineConfig:
    optimization_level: int = 0
    extra_args: tuple[str, ...] = ()
    allow_trust_remote_code: bool = False
    enforce_eager: bool = False
    start_timeout_s: float = 600.0
    max_start_failures: int = 3
    # A ready worker whose /health fails this long is taken for hung and restarted.
    health_timeout_s: float = 15.0
    # Time each new worker's prefill and decode (a few seconds) before it is ready,
    # to seed the router with this machine's speeds (pdbox/calibration.py).
    calibrate: bool = True
    # "auto": each CPU worker's step token budget (max_num_batched_tokens) comes
    # from this machine's measured prefill speed and the ITL target
    # (calibration.step_budget), once its speeds are known; a role's explicit
    # max_num_batched_tokens wins. "default": vLLM's own (2048 on a CPU).
    step_budget: str = "default"


@dataclass(frozen=True)
class Profile:
    name: str
    description: str = ""
    source_file: str = ""
    model: ModelConfig = field(default_factory=ModelConfig)
    hardware: HardwareConfig = field(default_factory=HardwareConfig)
    mode: ModeConfig = field(default_factory=ModeConfig)
    prefill: RoleConfig | None = None
    decode: RoleConfig | None = None
    aggregated: RoleConfig | None = None
    nixl: NixlConfig = field(default_factory=NixlConfig)
    kv: KvConfig = field(default_factory=KvConfig)
    router: RouterConfig = field(default_factory=RouterConfig)
    slo: SloConfig = field(default_factory=SloConfig)
    autoscaler: AutoscalerConfig = field(default_factory=AutoscalerConfig)
    engine: EngineConfig = field(default_factory=EngineConfig)

    @property
    def is_pd(self) -> bool:
        return self.mode.kind == "pd"

    def roles(self) -> dict[str, RoleConfig]:
        """The roles this profile runs, in start order (prefill before decode)."""
        out: dict[str, RoleConfig] = {}
        for name in ROLES:
            rc = getattr(self, name)
            if rc is not None:
                out[name] = rc
        return out

    def role(self, name: str) -> RoleConfig:
        rc = getattr(self, name, None) if name in ROLES else None
        if rc is None:
            raise KeyError(name)
        return rc

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        return {k: v for k, v in d.items() if v is not None and k != "source_file"}


# ----------------------------------------------------------------------- choices

_CHOICES: dict[str, tuple[str, ...]] = {
    "hardware.device": ("cpu", "cuda"),
    "hardware.sharing": ("cores", "mps", "timeslice"),
    "mode.kind": ("pd", "aggregated"),
    "router.policy": POLICIES,
    "router.pd_decider": ("threshold", "adaptive"),
    "engine.step_budget": ("default", "auto"),
    "nixl.backend": ("UCX",),
    "nixl.buffer_device": ("cpu", "cuda"),
    "nixl.kv_load_failure_policy": ("recompute", "fail"),
    "model.dtype": ("bfloat16", "float16", "float32", "auto"),
}

# Keys that take an integer or "auto" (derived from measured speeds).
_INT_OR_AUTO = frozenset({"router.pd_min_uncached_tokens"})

_SECTIONS: dict[str, type] = {
    "model": ModelConfig,
    "hardware": HardwareConfig,
    "mode": ModeConfig,
    "prefill": RoleConfig,
    "decode": RoleConfig,
    "aggregated": RoleConfig,
    "nixl": NixlConfig,
    "kv": KvConfig,
    "router": RouterConfig,
    "slo": SloConfig,
    "autoscaler": AutoscalerConfig,
    "engine": EngineConfig,
}
_NESTED: dict[tuple[type, str], type] = {(RouterConfig, "weights"): Weights}

_CORESET = re.compile(r"^\d+(-\d+)?(,\d+(-\d+)?)*$")
# Flags a profile may never pass to vLLM through extra_args: they are either
# set by pdbox itself (ports, connectors, model) or unsafe.
DENIED_FLAGS = (
    "--host",
    "--port",
    "--model",
    "--served-model-name",
    "--kv-transfer-config",
    "--kv-events-config",
    "--api-key",
    "--ssl-keyfile",
    "--ssl-certfile",
    "--root-path",
    "--allowed-origins",
    "--middleware",
    "--chat-template",
    "--download-dir",
    "--load-format",
    "--tokenizer",
    "--uds",
    # Reads further arguments from a YAML file, where any of the above could hide.
    "--config",
)
_TRUST_FLAG = "--trust-remote-code"
_ARG_OK = re.compile(r"^[A-Za-z0-9_./:=,+\-{}\"\[\] ]*$")


def parse_core_set(spec: str) -> list[int]:
    """'0-2,5' -> [0, 1, 2, 5]."""
    cores: list[int] = []
    for part in spec.split(","):
        if "-" in part:
            a, b = part.split("-")
            cores.extend(range(int(a), int(b) + 1))
        else:
            cores.append(int(part))
    return sorted(set(cores))


class _Loader:
    def __init__(self, file: str, text: str):
        self.file = file
        self.text = text
        self.lines = text.splitlines()

    # Line lookup: tomllib does not report positions, so find the key inside its
    # table by scanning the text. Good enough for hand-written profiles.
    def line_of(self, dotted: str) -> int | None:
        parts = dotted.split(".")
        table, key = ".".join(parts[:-1]), parts[-1]
        current = ""
        for no, raw in enumerate(self.lines, 1):
            line = raw.strip()
            m = re.match(r"^\[\s*([A-Za-z0-9_.\-]+)\s*\]", line)
            if m:
                current = m.group(1)
                if current == dotted:
                    return no
                continue
            if current == table and re.match(rf"^{re.escape(key)}\s*=", line):
                return no
            # inline table, e.g. weights = { prefix = 3 }
            if len(parts) >= 2 and current == ".".join(parts[:-2]):
                if re.match(rf"^{re.escape(parts[-2])}\s*=.*\b{re.escape(key)}\s*=", line):
                    return no
        if table == "" and key:
            for no, raw in enumerate(self.lines, 1):
                if re.match(rf"^\s*{re.escape(key)}\s*=", raw):
                    return no
        # A key left at its default is not in the file: point at its table.
        if table:
            return self.line_of(table) if "." in table else self._header_line(table)
        return None

    def _header_line(self, table: str) -> int | None:
        for no, raw in enumerate(self.lines, 1):
            m = re.match(r"^\[\s*([A-Za-z0-9_.\-]+)\s*\]", raw.strip())
            if m and m.group(1) == table:
                return no
        return None

    def fail(self, key: str, message: str) -> ProfileError:
        return ProfileError(self.file, key, message, self.line_of(key) if key else None)

    def build(self, cls: type, data: Any, prefix: str) -> Any:
        if not isinstance(data, Mapping):
            raise self.fail(prefix, f"must be a table, not {_tname(data)}")
        fields = {f.name: f for f in dataclasses.fields(cls)}
        kwargs: dict[str, Any] = {}
        for key, value in data.items():
            dotted = f"{prefix}.{key}"
            if key not in fields:
                raise self.fail(dotted, "unknown key" + _did_you_mean(key, list(fields)))
            nested = _NESTED.get((cls, key))
            if nested is not None:
                kwargs[key] = self.build(nested, value, dotted)
                continue
            kwargs[key] = self.coerce(dotted, fields[key], value)
        return cls(**kwargs)

    def coerce(self, dotted: str, f: dataclasses.Field, value: Any) -> Any:
        if dotted in _INT_OR_AUTO:
            if value == "auto" or (isinstance(value, int) and not isinstance(value, bool)):
                return value
            raise self.fail(dotted, f"must be \"auto\" or an integer, not {_tname(value)}"
                            + (f" {value!r}" if isinstance(value, str) else ""))
        default = f.default if f.default is not dataclasses.MISSING else None
        if f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
            default = f.default_factory()  # type: ignore[misc]
        if isinstance(default, bool):
            if not isinstance(value, bool):
                raise self.fail(dotted, f"must be true or false, not {_tname(value)}")
            return value
        if isinstance(default, int):
            if isinstance(value, bool) or not isinstance(value, int):
                raise self.fail(dotted, f"must be an integer, not {_tname(value)}")
            return value
        if isinstance(default, float):
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise self.fail(dotted, f"must be a number, not {_tname(value)}")
            # TOML allows nan and inf; every range check below would let nan through.
            if not math.isfinite(value):
                raise self.fail(dotted, f"must be a finite number, not {value}")
            return float(value)
        if isinstance(default, str):
            if not isinstance(value, str):
                raise self.fail(dotted, f"must be a string, not {_tname(value)}")
            choices = _CHOICES.get(_generic(dotted))
            if choices and value not in choices:
                raise self.fail(
                    dotted,
                    f"must be one of {', '.join(choices)}, not {value!r}"
                    + _did_you_mean(value, list(choices)),
                )
            return value
        if isinstance(default, tuple):
            if isinstance(value, str) and f.name == "cores":
                value = [value]
            if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
                raise self.fail(dotted, f"must be a list of strings, not {_tname(value)}")
            return tuple(value)
        raise self.fail(dotted, "unsupported key")  # pragma: no cover


def _generic(dotted: str) -> str:
    return dotted


def _tname(v: Any) -> str:
    return {
        bool: "a boolean",
        int: "an integer",
        float: "a number",
        str: "a string",
        list: "a list",
        dict: "a table",
    }.get(type(v), type(v).__name__)


def _did_you_mean(word: str, options: list[str]) -> str:
    close = difflib.get_close_matches(word, options, n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""


_TOP_KEYS = ("name", "description")


def load_text(text: str, file: str = "<profile>", default_name: str = "") -> Profile:
    try:
        data = _toml.loads(text)
    except _toml.TOMLDecodeError as exc:
        m = re.search(r"line (\d+)", str(exc))
        raise ProfileError(
            file, "", f"not valid TOML: {exc}", int(m.group(1)) if m else None
        ) from None
    ld = _Loader(file, text)
    kwargs: dict[str, Any] = {"source_file": file}
    for key, value in data.items():
        if key in _TOP_KEYS:
            if not isinstance(value, str):
                raise ld.fail(key, f"must be a string, not {_tname(value)}")
            kwargs[key] = value
        elif key in _SECTIONS:
            kwargs[key] = ld.build(_SECTIONS[key], value, key)
        else:
            raise ld.fail(key, "unknown key" + _did_you_mean(key, [*_TOP_KEYS, *_SECTIONS]))
    kwargs.setdefault("name", default_name or Path(file).stem)
    profile = Profile(**kwargs)
    validate(profile, ld)
    return profile


def validate(p: Profile, ld: _Loader | None = None) -> None:
    """Cross-field rules; raises ProfileError on the first one broken."""
    ld = ld or _Loader(p.source_file or p.name, "")
    fail = ld.fail
    if p.is_pd:
        if p.prefill is None or p.decode is None:
            raise fail("mode.kind", 'is "pd" but the profile lacks a [prefill] or [decode] table')
        if p.aggregated is not None:
            raise fail("aggregated", 'is not used when mode.kind is "pd"; remove it')
    else:
        if p.aggregated is None:
            raise fail("mode.kind", 'is "aggregated" but the profile has no [aggregated] table')
        for r in ("prefill", "decode"):
            if getattr(p, r) is not None:
                raise fail(r, 'is only used when mode.kind is "pd"; remove it')
    if p.hardware.device == "cpu" and p.hardware.sharing != "cores":
        raise fail("hardware.sharing", 'must be "cores" on a CPU')
    if p.hardware.device == "cuda" and p.hardware.sharing == "cores":
        raise fail("hardware.sharing", 'must be "mps" or "timeslice" on a GPU')
    if p.model.max_model_len < 16:
        raise fail("model.max_model_len", "must be at least 16")
    if p.model.block_size not in (1, 8, 16, 32, 64, 128, 256):
        raise fail("model.block_size", "must be a power of two between 1 and 256")
    if not p.model.served_name or not re.match(r"^[A-Za-z0-9_.:\-/]+$", p.model.served_name):
        raise fail("model.served_name", "must be a non-empty name of letters, digits and ._:-/")
    _check_model_source(p, fail)

    total_mem = 0.0
    for name, rc in p.roles().items():
        k = name
        if rc.min < 0:
            raise fail(f"{k}.min", "must not be negative")
        if rc.max < 1:
            raise fail(f"{k}.max", "must be at least 1")
        if rc.min > rc.max:
            raise fail(f"{k}.min", f"({rc.min}) is above {k}.max ({rc.max})")
        if not rc.min <= rc.replicas <= rc.max:
            raise fail(f"{k}.replicas", f"({rc.replicas}) must lie within [{rc.min}, {rc.max}]")
        if rc.replicas < 1:
            raise fail(f"{k}.replicas", "must be at least 1")
        if rc.max_num_batched_tokens and rc.max_num_batched_tokens < max(rc.max_num_seqs, 1):
            raise fail(f"{k}.max_num_batched_tokens",
                       f"({rc.max_num_batched_tokens}) must be 0 (the default) or at least "
                       f"{k}.max_num_seqs ({rc.max_num_seqs}), as vLLM requires")
        if p.hardware.device == "cpu":
            if not rc.cores:
                raise fail(f"{k}.cores", 'is required on a CPU, e.g. cores = ["0"]')
            for cs in rc.cores:
                if not _CORESET.match(cs):
                    raise fail(f"{k}.cores", f'{cs!r} is not a core list like "0" or "0-3,6"')
            if rc.kv_cache_gib <= 0 or rc.kv_cache_gib > 512:
                raise fail(f"{k}.kv_cache_gib", "must be above 0 and at most 512")
            if not float(rc.kv_cache_gib).is_integer():
                # vLLM reads VLLM_CPU_KVCACHE_SPACE as an integer; a smaller cache
                # is set in blocks with engine.extra_args = ["--num-gpu-blocks-override=N"].
                raise fail(f"{k}.kv_cache_gib", "must be a whole number of GiB on a CPU "
                           "(for a smaller cache use --num-gpu-blocks-override in "
                           "engine.extra_args)")
        else:
            if not 1 <= rc.sm_percent <= 100:
                raise fail(f"{k}.sm_percent", f"({rc.sm_percent}) must lie within 1..100")
            if not 0 < rc.memory_fraction <= 1:
                raise fail(f"{k}.memory_fraction", f"({rc.memory_fraction}) must lie in (0, 1]")
            # The autoscaler may start up to `max` workers of each role, and
            # each vLLM instance takes its own fraction of the GPU's memory.
            total_mem += rc.memory_fraction * rc.max
    if p.hardware.device == "cuda" and total_mem >= 0.95:
        key = "prefill.memory_fraction" if p.is_pd else "aggregated.memory_fraction"
        raise fail(
            key,
            f"memory fractions of all workers at their max replicas sum to {total_mem:.2f}; "
            "they must stay below 0.95",
        )
    if not 0 <= p.kv.offload_gib <= 4096:
        raise fail("kv.offload_gib", "must lie within 0..4096")
    if p.kv.offload_gib and p.hardware.device == "cpu":
        raise fail("kv.offload_gib", "is for GPU profiles only: vllm-cpu has no offloading "
                   "connector, and its KV cache already lives in host memory (size it with "
                   "kv_cache_gib of each role)")
    r = p.router
    if not 0 <= r.port <= 65535:
        raise fail("router.port", "must lie within 0..65535")
    # Its type ("auto" or an integer) was checked as it was read (_INT_OR_AUTO).
    if r.fixed_gate is not None and r.fixed_gate < 0:
        raise fail("router.pd_min_uncached_tokens",
                   f"must be \"auto\" or a token count of 0 or more, not {r.fixed_gate}")
    if p.autoscaler.resplit_dwell_s < 0:
        raise fail("autoscaler.resplit_dwell_s", "must not be negative")
    if r.soft_roles_hold_s < 0:
        raise fail("router.soft_roles_hold_s", "must not be negative")
    if r.queue_bound < 1:
        raise fail("router.queue_bound", "must be at least 1")
    if r.max_inflight_per_worker < 0:
        raise fail("router.max_inflight_per_worker",
                   "must not be negative (0: as many as each worker reports it runs)")
    if r.max_body_bytes < 1024:
        raise fail("router.max_body_bytes", "must be at least 1024")
    for wk in ("prefix", "queue", "kv"):
        if getattr(r.weights, wk) < 0:
            raise fail(f"router.weights.{wk}", "must not be negative")
    if p.nixl.progress_delay_us < 0 or p.nixl.progress_delay_us > 1_000_000:
        raise fail("nixl.progress_delay_us", "must lie within 0..1000000")
    if not re.match(r"^[a-z_]+(,[a-z_]+)*$", p.nixl.ucx_tls):
        raise fail("nixl.ucx_tls", "must be a comma-separated list of UCX transports")
    a = p.autoscaler
    if a.period_s <= 0:
        raise fail("autoscaler.period_s", "must be above 0")
    if not 0 <= a.tolerance < 1:
        raise fail("autoscaler.tolerance", "must lie within [0, 1)")
    if a.max_scale_up_step < 1:
        raise fail("autoscaler.max_scale_up_step", "must be at least 1")
    if a.panic_threshold <= 1:
        raise fail("autoscaler.panic_threshold", "must be above 1")
    if p.slo.ttft_s <= 0 or p.slo.itl_s <= 0:
        raise fail("slo", "targets must be above 0")
    check_extra_args(p, fail)


def _check_model_source(p: Profile, fail: Any) -> None:
    src = p.model.source
    if src.startswith("embedded:"):
        from pdbox.workers.embedded import EMBEDDED_MODELS  # light: no torch

        name = src.split(":", 1)[1]
        if name not in EMBEDDED_MODELS:
            raise fail(
                "model.source",
                f"unknown embedded model {name!r}"
                + _did_you_mean(name, list(EMBEDDED_MODELS))
                + f"; known: {', '.join(EMBEDDED_MODELS)}",
            )
        return
    if src.startswith(("/", "./", "../", "~")):
        path = Path(src).expanduser()
        if not path.is_dir():
            raise fail("model.source", f"model folder {src} does not exist")
        if not (path / "config.json").is_file():
            raise fail("model.source", f"{src} has no config.json; it is not a model folder")
        return
    if not re.match(r"^[A-Za-z0-9_.\-]+/[A-Za-z0-9_.\-]+$", src):
        raise fail(
            "model.source",
            f"{src!r} is neither embedded:NAME, a folder path, nor a hub id like org/name",
        )


def check_extra_args(p: Profile, fail: Any) -> None:
    for i, arg in enumerate(p.engine.extra_args):
        key = f"engine.extra_args[{i}]"
        if not _ARG_OK.match(arg) or "\n" in arg:
            raise fail("engine.extra_args", f"item {i} ({arg!r}) holds characters not allowed")
        flag = _flag_of(arg)
        if flag == _TRUST_FLAG and not p.engine.allow_trust_remote_code:
            raise fail(
                "engine.extra_args",
                f"{key} is --trust-remote-code; set engine.allow_trust_remote_code = true to allow it",
            )
        if flag in DENIED_FLAGS:
            raise fail("engine.extra_args", f"{key} sets {flag}, which pdbox controls itself")
        # argparse accepts any unambiguous prefix of a long flag ("--kv-transfer").
        abbreviated = [d for d in (*DENIED_FLAGS, _TRUST_FLAG) if d.startswith(flag)]
        if flag.startswith("--") and len(flag) > 3 and abbreviated and flag not in DENIED_FLAGS:
            full = abbreviated[0]
            if full != _TRUST_FLAG or not p.engine.allow_trust_remote_code:
                raise fail(
                    "engine.extra_args",
                    f"{key} ({flag}) abbreviates {full}, which pdbox controls itself",
                )


def _flag_of(arg: str) -> str:
    """The flag an extra_args item sets, as vLLM's parser reads it: the part
    before "=", a space or a "." (vLLM's --some-config.field=value form), with
    underscores read as dashes."""
    flag = re.split(r"[=\s.]", arg.strip(), maxsplit=1)[0]
    return "--" + flag[2:].replace("_", "-") if flag.startswith("--") else flag


# --------------------------------------------------------------------- discovery


def builtin_names() -> list[str]:
    return sorted(p.stem for p in BUILTIN_DIR.glob("*.toml"))


def load_file(path: str | Path) -> Profile:
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ProfileError(str(path), "", "no such profile file") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ProfileError(str(path), "", f"cannot be read: {exc}") from None
    return load_text(text, str(path), default_name=path.stem)


def load(name_or_file: str) -> Profile:
    """A built-in profile by name, or a profile file by path."""
    if name_or_file.endswith(".toml") or "/" in name_or_file:
        return load_file(name_or_file)
    candidate = BUILTIN_DIR / f"{name_or_file}.toml"
    if not candidate.is_file():
        raise ProfileError(
            name_or_file,
            "",
            "no such built-in profile"
            + _did_you_mean(name_or_file, builtin_names())
            + f"; built-in: {', '.join(builtin_names())}",
        )
    return load_file(candidate)


def default_profile_name(gpu_name: str | None) -> str:
    """A GPU seen through NVML picks the profile made for it; otherwise cpu-tiny."""
    if gpu_name:
        upper = gpu_name.upper()
        if "GH200" in upper:
            return "gh200-pd"
        if "H100" in upper:
            return "h100-pd"
        return "gpu-aggregated"
    return "cpu-tiny"
