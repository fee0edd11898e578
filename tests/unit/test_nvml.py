"""Contract tests for the NVML wrapper.

The fake below is a module object with the functions pdbox calls, following the
signatures of the installed nvidia-ml-py, and it raises errors exactly as the
real library does: `pynvml.NVMLError(code)`, which the real class maps to its
subclass (NVMLError_NotSupported, NVMLError_LibraryNotFound, ...). The error
classes are the real ones, so an `except` that works here works on a GPU host.
"""

from __future__ import annotations

import json
import math
import time
import types

import pynvml
import pytest

from pdbox.hardware.nvml import (
    NA,
    GpuSnapshot,
    GpuTelemetry,
    NoGpu,
    Nvml,
    default_telemetry,
    is_na,
    to_json,
)

GIB = 1024**3


class _Mem:
    def __init__(self, total: int, used: int):
        self.total, self.used, self.free = total, used, total - used


class _Util:
    def __init__(self, gpu: int, memory: int):
        self.gpu, self.memory = gpu, memory


class _Proc:
    def __init__(self, pid: int, used: int | None):
        self.pid, self.usedGpuMemory = pid, used


def fake_pynvml(
    *,
    devices: list[dict] | None = None,
    init_error: int | None = None,
) -> types.ModuleType:
    """A pynvml stand-in. Each device dict may name an NVML error code per query
    in `errors` (e.g. {"power": NVML_ERROR_NOT_SUPPORTED})."""
    devices = devices or []
    m = types.ModuleType("pynvml")
    m.NVMLError = pynvml.NVMLError
    m.NVML_CLOCK_SM = pynvml.NVML_CLOCK_SM
    m.calls = []
    state = {"init": False}

    def check_init() -> None:
        if not state["init"]:
            raise pynvml.NVMLError(pynvml.NVML_ERROR_UNINITIALIZED)

    def query(handle: int, what: str):
        check_init()
        code = devices[handle].get("errors", {}).get(what)
        if code is not None:
            raise pynvml.NVMLError(code)
        return devices[handle]

    def nvmlInit() -> None:
        m.calls.append("nvmlInit")
        if init_error is not None:
            raise pynvml.NVMLError(init_error)
        state["init"] = True

    def nvmlShutdown() -> None:
        check_init()
        m.calls.append("nvmlShutdown")
        state["init"] = False

    def nvmlDeviceGetCount() -> int:
        check_init()
        return len(devices)

    def nvmlDeviceGetHandleByIndex(index: int) -> int:
        check_init()
        if not 0 <= index < len(devices):
            raise pynvml.NVMLError(pynvml.NVML_ERROR_INVALID_ARGUMENT)
        if devices[index].get("lost"):
            raise pynvml.NVMLError(pynvml.NVML_ERROR_GPU_IS_LOST)
        return index

    def nvmlDeviceGetName(handle: int) -> str:
        return query(handle, "name")["name"]

    def nvmlDeviceGetUUID(handle: int) -> str:
        return query(handle, "uuid")["uuid"]

    def nvmlDeviceGetMemoryInfo(handle: int, version=None) -> _Mem:
        d = query(handle, "memory")
        return _Mem(d["total"], d["used"])

    def nvmlDeviceGetUtilizationRates(handle: int) -> _Util:
        return _Util(query(handle, "util")["util"], 0)

    def nvmlDeviceGetPowerUsage(handle: int) -> int:
        return query(handle, "power")["power_mw"]

    def nvmlDeviceGetClockInfo(handle: int, type: int) -> int:
        assert type == pynvml.NVML_CLOCK_SM
        return query(handle, "clock")["sm_mhz"]

    def nvmlDeviceGetComputeRunningProcesses(handle: int) -> list[_Proc]:
        return [_Proc(pid, used) for pid, used in query(handle, "procs")["procs"]]

    for fn in (
        nvmlInit,
        nvmlShutdown,
        nvmlDeviceGetCount,
        nvmlDeviceGetHandleByIndex,
        nvmlDeviceGetName,
        nvmlDeviceGetUUID,
        nvmlDeviceGetMemoryInfo,
        nvmlDeviceGetUtilizationRates,
        nvmlDeviceGetPowerUsage,
        nvmlDeviceGetClockInfo,
        nvmlDeviceGetComputeRunningProcesses,
    ):
        setattr(m, fn.__name__, fn)
    return m


def gh200(**over) -> dict:
    d = {
        "name": "NVIDIA GH200 480GB",
        "uuid": "GPU-8932f937-d72c-4106-c12f-20bd9faed9f6",
        "total": 96 * GIB,
        "used": 30 * GIB,
        "util": 57,
        "power_mw": 312_500,
        "sm_mhz": 1980,
        "procs": [(4242, 20 * GIB), (4343, None)],
    }
    d.update(over)
    return d


def test_fake_follows_the_real_signatures():
    import inspect

    fake = fake_pynvml()
    for name in (
        "nvmlDeviceGetHandleByIndex",
        "nvmlDeviceGetName",
        "nvmlDeviceGetMemoryInfo",
        "nvmlDeviceGetPowerUsage",
        "nvmlDeviceGetClockInfo",
        "nvmlDeviceGetComputeRunningProcesses",
    ):
        real = list(inspect.signature(getattr(pynvml, name)).parameters)
        ours = list(inspect.signature(getattr(fake, name)).parameters)
        assert ours == real, name


def test_real_error_classes_map_codes_to_subclasses():
    exc = pynvml.NVMLError(pynvml.NVML_ERROR_NOT_SUPPORTED)
    assert isinstance(exc, pynvml.NVMLError_NotSupported)
    assert isinstance(pynvml.NVMLError(12), pynvml.NVMLError_LibraryNotFound)


def test_full_device_snapshot():
    nv = Nvml(lib=fake_pynvml(devices=[gh200()]))
    assert nv.available() and isinstance(nv, GpuTelemetry)
    assert nv.first_gpu_name() == "NVIDIA GH200 480GB"
    (dev,) = nv.devices()
    assert dev.util_percent == 57
    assert dev.memory_total_bytes == 96 * GIB
    assert dev.power_w == pytest.approx(312.5)  # NVML reports milliwatts
    assert dev.sm_clock_mhz == 1980
    d = dev.to_dict()
    assert d["processes"] == [
        {"pid": 4242, "memory_bytes": 20 * GIB},
        {"pid": 4343, "memory_bytes": None},
    ]
    keys = {
        "index",
        "name",
        "util_percent",
        "memory_used_bytes",
        "memory_total_bytes",
        "power_w",
        "sm_clock_mhz",
        "processes",
    }
    assert keys <= set(d)
    json.dumps(nv.snapshot())


def test_not_supported_power_is_na_not_an_error():
    dev = gh200(errors={"power": pynvml.NVML_ERROR_NOT_SUPPORTED})
    nv = Nvml(lib=fake_pynvml(devices=[dev]))
    (snap,) = nv.devices()
    assert snap.power_w is NA
    assert f"{snap.power_w:.1f} W" == "N/A W"
    assert snap.to_dict()["power_w"] is None
    assert snap.util_percent == 57  # the other figures still arrive


def test_each_query_failing_alone():
    codes = {
        "name": pynvml.NVML_ERROR_NO_PERMISSION,
        "uuid": pynvml.NVML_ERROR_NOT_SUPPORTED,
        "memory": pynvml.NVML_ERROR_UNKNOWN,
        "util": pynvml.NVML_ERROR_NOT_SUPPORTED,
        "clock": pynvml.NVML_ERROR_NOT_SUPPORTED,
        "procs": pynvml.NVML_ERROR_NO_PERMISSION,
    }
    nv = Nvml(lib=fake_pynvml(devices=[gh200(errors=codes)]))
    d = nv.devices()[0].to_dict()
    assert d["name"] is d["util_percent"] is d["memory_total_bytes"] is d["sm_clock_mhz"] is None
    assert d["processes"] == []
    assert d["power_w"] == pytest.approx(312.5)
    assert nv.first_gpu_name() is None


def test_lost_gpu_gives_an_empty_snapshot_for_that_index():
    nv = Nvml(lib=fake_pynvml(devices=[gh200(), gh200(lost=True)]))
    a, b = nv.devices()
    assert a.name == "NVIDIA GH200 480GB"
    assert b.index == 1 and b.name is NA and b.to_dict()["memory_used_bytes"] is None


@pytest.mark.parametrize(
    "code",
    [
        pynvml.NVML_ERROR_LIBRARY_NOT_FOUND,
        pynvml.NVML_ERROR_DRIVER_NOT_LOADED,
        pynvml.NVML_ERROR_NO_PERMISSION,
    ],
)
def test_init_failure_means_no_gpu_and_is_remembered(code):
    lib = fake_pynvml(devices=[gh200()], init_error=code)
    nv = Nvml(lib=lib)
    assert not nv.available()
    assert nv.devices() == []
    assert nv.first_gpu_name() is None
    assert nv.reason and str(pynvml.NVMLError(code)) in nv.reason
    assert lib.calls.count("nvmlInit") == 1  # not retried on every poll
    assert nv.snapshot() == {"available": False, "reason": nv.reason, "gpus": []}


def test_pynvml_not_importable():
    def boom():
        raise ImportError("No module named 'pynvml'")

    nv = Nvml(loader=boom)
    assert not nv.available() and nv.devices() == []
    assert "pynvml" in (nv.reason or "")


def test_missing_function_on_an_old_driver_is_na():
    lib = fake_pynvml(devices=[gh200()])
    del lib.nvmlDeviceGetComputeRunningProcesses
    (dev,) = Nvml(lib=lib).devices()
    assert dev.processes == ()


def test_shutdown_then_reinit():
    lib = fake_pynvml(devices=[gh200()])
    nv = Nvml(lib=lib)
    assert nv.available()
    nv.shutdown()
    assert nv.available()
    assert lib.calls == ["nvmlInit", "nvmlShutdown", "nvmlInit"]


def test_bytes_names_from_old_pynvml():
    lib = fake_pynvml(devices=[gh200(name=b"NVIDIA H100 80GB HBM3")])
    assert Nvml(lib=lib).first_gpu_name() == "NVIDIA H100 80GB HBM3"


def test_na_behaves_like_nan():
    assert str(NA) == "N/A" and f"{NA:>5}" == "  N/A" and f"{NA:.2f}" == "N/A"
    assert math.isnan(NA) and not NA
    assert (NA + 1) is NA and (2 * NA) is NA and (NA / 3) is NA and -NA is NA
    assert not NA < 1 and not NA > 1 and NA != 0 and not NA == NA  # noqa: PLR0124
    assert is_na(NA) and is_na(None) and is_na(float("nan")) and not is_na(0)
    assert to_json(NA) is None and to_json(3) == 3
    assert GpuSnapshot(index=0).to_dict()["power_w"] is None


def test_no_gpu_answer():
    ng = NoGpu("NVML unavailable: NVML Shared Library Not Found")
    assert isinstance(ng, GpuTelemetry)
    assert ng.devices() == [] and not ng.available() and ng.first_gpu_name() is None


def test_real_nvml_on_this_machine_answers_quickly():
    """Unmocked: on a machine with no GPU this must say "no GPU" fast, not crash."""
    t0 = time.monotonic()
    nv = Nvml()
    devices = nv.devices()
    available = nv.available()
    tel = default_telemetry()
    elapsed = time.monotonic() - t0
    assert elapsed < 5.0
    assert available == bool(devices) == tel.available()
    if not available:
        assert isinstance(tel, NoGpu) and tel.reason
        assert nv.first_gpu_name() is None
    else:  # pragma: no cover - only on a GPU host
        assert devices[0].name is not NA
