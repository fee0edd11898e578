"""GPU telemetry over NVML, with one wrapper for every call.

Every NVML failure (library not found, driver not loaded, no device, a query a
device does not support) turns into `NA`: a value that prints "N/A" and acts
like NaN. Callers, the TUI above all, then never branch on "is there a GPU";
they show whatever came back. `Nvml` talks to the real `pynvml` (package
nvidia-ml-py), initialised lazily on first use; `NoGpu` is the answer for a
machine where we already know there is nothing to ask.

This module imports nothing heavier than pynvml, and only when first asked.
"""

from __future__ import annotations

import math
import re
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from types import ModuleType
from typing import Any, Protocol, runtime_checkable

# --------------------------------------------------------------------------- N/A


class NaType(float):
    """The one "not available" value: NaN for arithmetic, "N/A" when shown.

    A float subclass so that sorting, sums and comparisons never raise; every
    comparison is False, as with NaN. It is falsy so that `value or 0` works.
    """

    _instance: NaType | None = None

    def __new__(cls) -> NaType:
        if cls._instance is None:
            cls._instance = super().__new__(cls, math.nan)
        return cls._instance

    def __repr__(self) -> str:
        return "NA"

    def __str__(self) -> str:
        return "N/A"

    def __format__(self, spec: str) -> str:
        # f"{NA:.1f} W" must read "N/A W", not raise or print "nan".
        return format("N/A", _text_spec(spec))

    def __bool__(self) -> bool:
        return False

    def __hash__(self) -> int:
        return hash("N/A")

    # Equality stays float's: NA == NA is False, as for NaN. Test with `is NA`
    # or is_na().

    def __reduce__(self) -> tuple[Any, ...]:
        return (NaType, ())

    def _na(self, *_: object) -> NaType:
        return self

    __add__ = __radd__ = __sub__ = __rsub__ = _na
    __mul__ = __rmul__ = __truediv__ = __rtruediv__ = _na
    __floordiv__ = __rfloordiv__ = __mod__ = __rmod__ = __pow__ = __rpow__ = _na
    __neg__ = __pos__ = __abs__ = _na

    def __round__(self, ndigits: int | None = None) -> NaType:  # type: ignore[override]
        return self


def _text_spec(spec: str) -> str:
    """Keep a format spec's fill, alignment and width; drop numeric parts."""
    m = re.match(r"^(?:(.)?([<>^]))?(\d+)?", spec)
    if not m:
        return ""
    fill, align, width = m.group(1) or "", m.group(2) or "", m.group(3) or ""
    if not align and width:
        align = ">"  # numbers align right; so does their N/A
    return f"{fill}{align}{width}"


NA = NaType()

Number = int | float


def is_na(value: object) -> bool:
    """True for NA, None and NaN alike."""
    if value is None or value is NA:
        return True
    return isinstance(value, float) and math.isnan(value)


def to_json(value: Any) -> Any:
    """NA and NaN become None (JSON null) so the control API says "unknown"."""
    return None if is_na(value) else value


# ---------------------------------------------------------------------- snapshots


@dataclass(frozen=True)
class GpuProcess:
    pid: int
    memory_bytes: Number = NA


@dataclass(frozen=True)
class GpuSnapshot:
    """One device at one moment. Any figure NVML could not give is NA."""

    index: int
    name: str | NaType = NA
    uuid: str | NaType = NA
    util_percent: Number = NA
    memory_used_bytes: Number = NA
    memory_total_bytes: Number = NA
    power_w: Number = NA
    sm_clock_mhz: Number = NA
    processes: tuple[GpuProcess, ...] = field(default_factory=tuple)

    def to_dict(self) -> dict[str, Any]:
        """One `hardware.gpus[]` item of the status snapshot (docs/CONTROL_API.md)."""
        return {
            "index": self.index,
            "name": to_json(self.name),
            "uuid": to_json(self.uuid),
            "util_percent": to_json(self.util_percent),
            "memory_used_bytes": to_json(self.memory_used_bytes),
            "memory_total_bytes": to_json(self.memory_total_bytes),
            "power_w": to_json(self.power_w),
            "sm_clock_mhz": to_json(self.sm_clock_mhz),
            "processes": [
                {"pid": p.pid, "memory_bytes": to_json(p.memory_bytes)} for p in self.processes
            ],
        }


@runtime_checkable
class GpuTelemetry(Protocol):
    """What the rest of pdbox may ask about GPUs."""

    def devices(self) -> list[GpuSnapshot]: ...

    def available(self) -> bool: ...

    def first_gpu_name(self) -> str | None: ...


class NoGpu:
    """The answer on a machine with no GPU (or when NVML is not wanted)."""

    def __init__(self, reason: str = "no GPU"):
        self.reason = reason

    def devices(self) -> list[GpuSnapshot]:
        return []

    def available(self) -> bool:
        return False

    def first_gpu_name(self) -> str | None:
        return None

    def snapshot(self) -> dict[str, Any]:
        return {"available": False, "reason": self.reason, "gpus": []}


# ---------------------------------------------------------------------------- NVML


def _import_pynvml() -> ModuleType:
    import pynvml

    return pynvml


class Nvml:
    """GPU telemetry over pynvml. Safe to construct anywhere: nothing is loaded
    until the first question, and no question ever raises.

    `lib` is the pynvml module; tests pass a fake with the same functions and
    `NVMLError` classes. `loader` imports it lazily otherwise.
    """

    def __init__(
        self,
        lib: ModuleType | None = None,
        loader: Callable[[], ModuleType] = _import_pynvml,
    ):
        self._lib = lib
        self._loader = loader
        self._lock = threading.Lock()
        self._state = "new"  # new | ready | failed
        self.reason: str | None = None

    # -- lifecycle

    def _init(self) -> ModuleType | None:
        """nvmlInit once. A failure is remembered: a missing driver does not
        come back while we run, and retrying would cost every poll."""
        with self._lock:
            if self._state == "ready":
                return self._lib
            if self._state == "failed":
                return None
            try:
                if self._lib is None:
                    self._lib = self._loader()
            except Exception as exc:  # ImportError, or a broken install
                self._fail(f"pynvml is not importable ({exc})")
                return None
            try:
                self._lib.nvmlInit()
            except Exception as exc:
                self._fail(_describe(exc))
                return None
            self._state = "ready"
            return self._lib

    def _fail(self, reason: str) -> None:
        self._state = "failed"
        self.reason = reason

    def shutdown(self) -> None:
        """Release NVML. Later questions initialise it again."""
        with self._lock:
            if self._state == "ready" and self._lib is not None:
                try:
                    self._lib.nvmlShutdown()
                except Exception:
                    pass
            if self._state == "ready":
                self._state = "new"

    # -- the one wrapper

    def call(self, name: str, *args: Any) -> Any:
        """Call pynvml.<name>(*args); NA on any NVML error or missing function.

        NVMLError subclasses (NotSupported for power on some boards, NoPermission,
        GpuIsLost, FunctionNotFound on old drivers) all mean "unknown here".
        """
        lib = self._init()
        if lib is None:
            return NA
        fn = getattr(lib, name, None)
        if fn is None:
            return NA
        error = getattr(lib, "NVMLError", Exception)
        try:
            return fn(*args)
        except error:
            return NA
        except (OSError, ValueError, TypeError, AttributeError):
            return NA

    # -- GpuTelemetry

    def available(self) -> bool:
        count = self.call("nvmlDeviceGetCount")
        return not is_na(count) and int(count) > 0

    def device_count(self) -> int:
        count = self.call("nvmlDeviceGetCount")
        return 0 if is_na(count) else int(count)

    def first_gpu_name(self) -> str | None:
        if self.device_count() == 0:
            return None
        handle = self.call("nvmlDeviceGetHandleByIndex", 0)
        if handle is NA:
            return None
        name = self._text(self.call("nvmlDeviceGetName", handle))
        return None if name is NA else str(name)

    def devices(self) -> list[GpuSnapshot]:
        out: list[GpuSnapshot] = []
        for index in range(self.device_count()):
            handle = self.call("nvmlDeviceGetHandleByIndex", index)
            if handle is NA:
                out.append(GpuSnapshot(index=index))
                continue
            out.append(self._device(index, handle))
        return out

    def snapshot(self) -> dict[str, Any]:
        gpus = self.devices()
        return {
            "available": bool(gpus),
            "reason": None if gpus else (self.reason or "no GPU"),
            "gpus": [g.to_dict() for g in gpus],
        }

    # -- per-device queries

    def _device(self, index: int, handle: Any) -> GpuSnapshot:
        lib = self._lib
        mem = self.call("nvmlDeviceGetMemoryInfo", handle)
        util = self.call("nvmlDeviceGetUtilizationRates", handle)
        power_mw = self.call("nvmlDeviceGetPowerUsage", handle)  # milliwatts
        sm_clock = self.call("nvmlDeviceGetClockInfo", handle, getattr(lib, "NVML_CLOCK_SM", 1))
        return GpuSnapshot(
            index=index,
            name=self._text(self.call("nvmlDeviceGetName", handle)),
            uuid=self._text(self.call("nvmlDeviceGetUUID", handle)),
            util_percent=_attr(util, "gpu"),
            memory_used_bytes=_attr(mem, "used"),
            memory_total_bytes=_attr(mem, "total"),
            power_w=NA if is_na(power_mw) else power_mw / 1000.0,
            sm_clock_mhz=NA if is_na(sm_clock) else int(sm_clock),
            processes=self._processes(handle),
        )

    def _processes(self, handle: Any) -> tuple[GpuProcess, ...]:
        procs = self.call("nvmlDeviceGetComputeRunningProcesses", handle)
        if procs is NA or procs is None:
            return ()
        out = []
        for p in procs:
            pid = getattr(p, "pid", None)
            if pid is None:
                continue
            used = getattr(p, "usedGpuMemory", None)
            # pynvml already maps NVML_VALUE_NOT_AVAILABLE to None.
            out.append(GpuProcess(pid=int(pid), memory_bytes=NA if used is None else int(used)))
        return tuple(out)

    @staticmethod
    def _text(value: Any) -> str | NaType:
        if value is NA or value is None:
            return NA
        if isinstance(value, bytes):  # older pynvml returned bytes
            return value.decode(errors="replace")
        return str(value)


def _attr(obj: Any, name: str) -> Number:
    if obj is NA or obj is None:
        return NA
    value = getattr(obj, name, None)
    return NA if value is None else int(value)


def _describe(exc: BaseException) -> str:
    text = str(exc) or type(exc).__name__
    return f"NVML unavailable: {text}"


def default_telemetry() -> GpuTelemetry:
    """Nvml when a GPU answers, else NoGpu with NVML's reason."""
    nvml = Nvml()
    if nvml.available():
        return nvml
    return NoGpu(nvml.reason or "NVML reports no GPU")
