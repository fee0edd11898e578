"""CPU telemetry, core bookkeeping and the combined hardware snapshot."""

from __future__ import annotations

import json
import time
import types
from collections import namedtuple

from pdbox.config import Profile, RoleConfig
from pdbox.hardware.cpu import (
    CpuTelemetry,
    free_cores,
    hardware_snapshot,
    profile_cores,
    usable_cores,
)
from pdbox.hardware.nvml import GpuSnapshot, GpuTelemetry, NoGpu, Nvml

Times = namedtuple(
    "Times",
    "user nice system idle iowait irq softirq steal guest guest_nice",
)


def t(user: float, idle: float, iowait: float = 0.0, guest: float = 0.0) -> Times:
    return Times(user, 0.0, 0.0, idle, iowait, 0.0, 0.0, 0.0, guest, 0.0)


class FakePs:
    """psutil's two calls used here, fed from a script of samples."""

    def __init__(self, samples: list[list[Times]]):
        self.samples = samples
        self.i = 0

    def cpu_times(self, percpu: bool = False) -> list[Times]:
        assert percpu
        s = self.samples[min(self.i, len(self.samples) - 1)]
        self.i += 1
        return s

    def virtual_memory(self):
        return types.SimpleNamespace(total=24 * 1024**3, available=20 * 1024**3)


def test_per_core_uses_deltas_since_the_previous_sample():
    ps = FakePs(
        [
            [t(10, 90), t(50, 50)],
            [t(15, 95), t(50, 60)],  # core 0: 5 busy of 10; core 1: idle
            [t(15, 95, iowait=10), t(60, 60)],  # iowait counts as idle
        ]
    )
    cpu = CpuTelemetry(ps)
    assert cpu.per_core() == [50.0, 0.0]
    assert cpu.per_core() == [0.0, 100.0]


def test_no_elapsed_time_is_unknown_not_zero():
    ps = FakePs([[t(10, 90)], [t(10, 90)]])
    assert CpuTelemetry(ps).per_core() == [None]


def test_guest_time_is_not_counted_twice():
    ps = FakePs([[t(0, 0)], [t(10, 10, guest=10)]])  # guest already inside user
    assert CpuTelemetry(ps).per_core() == [50.0]


def test_two_readers_keep_their_own_interval():
    ps = FakePs([[t(0, 0)], [t(0, 0)], [t(10, 0)], [t(10, 10)]])
    a, b = CpuTelemetry(ps), CpuTelemetry(ps)
    assert a.per_core() == [100.0]  # from sample 0 to 2
    assert b.per_core() == [50.0]  # from sample 1 to 3


def test_snapshot_shape_and_memory():
    cpu = CpuTelemetry(FakePs([[t(0, 0)], [t(1, 1)]]))
    snap = cpu.snapshot()
    assert snap == {
        "kind": "cpu",
        "cpu_percent_per_core": [50.0],
        "memory_used_bytes": 4 * 1024**3,
        "memory_total_bytes": 24 * 1024**3,
    }


def test_real_psutil_never_blocks():
    cpu = CpuTelemetry()
    t0 = time.monotonic()
    for _ in range(20):
        snap = cpu.snapshot()
    assert time.monotonic() - t0 < 1.0
    assert len(snap["cpu_percent_per_core"]) >= 1
    assert 0 < snap["memory_used_bytes"] < snap["memory_total_bytes"]
    for v in snap["cpu_percent_per_core"]:
        assert v is None or 0.0 <= v <= 100.0


def _profile(**roles: RoleConfig) -> Profile:
    return Profile(name="t", **roles)


def test_free_cores():
    p = _profile(prefill=RoleConfig(cores=("0",)), decode=RoleConfig(cores=("1", "2-3")))
    assert profile_cores(p) == [0, 1, 2, 3]
    assert free_cores(p, ["0", "1"], available=[0, 1, 2, 3]) == [2, 3]
    assert free_cores(p, ["0", "2-3"], available=[0, 1]) == [1]  # only cores that exist
    assert free_cores(p, [], available=[0, 1, 2, 3, 4, 5]) == [0, 1, 2, 3]
    assert free_cores(p, ["0-3"], available=range(8)) == []


def test_free_cores_when_the_profile_names_none():
    p = _profile(aggregated=RoleConfig(sm_percent=100))
    assert free_cores(p, ["1", ""], available=[0, 1, 2]) == [0, 2]
    assert set(free_cores(p, [])) == set(usable_cores())


def test_hardware_snapshot_without_gpu_is_cpu_kind():
    cpu = CpuTelemetry(FakePs([[t(0, 0)], [t(1, 1)]]))
    hw = hardware_snapshot(NoGpu(), None, cpu)
    assert hw["kind"] == "cpu"
    assert hw["gpus"] == []
    assert hw["mps"] == {"enabled": False, "running": False, "pipe_dir": None}
    assert hw["cpu_percent_per_core"] == [50.0]
    json.dumps(hw)


def test_hardware_snapshot_with_gpu_and_mps():
    class OneGpu:
        """Any GpuTelemetry will do; power unknown, as NVML's NotSupported gives."""

        def devices(self) -> list[GpuSnapshot]:
            return [GpuSnapshot(index=0, name="NVIDIA GH200 480GB", util_percent=50)]

        def available(self) -> bool:
            return True

        def first_gpu_name(self) -> str | None:
            return "NVIDIA GH200 480GB"

    gpu = OneGpu()
    assert isinstance(gpu, GpuTelemetry)
    mps = {"enabled": True, "running": True, "pipe_dir": "/x/mps/pipe"}
    hw = hardware_snapshot(gpu, mps, CpuTelemetry(FakePs([[t(0, 0)]])))
    assert hw["kind"] == "cuda"
    assert hw["gpus"][0]["name"] == "NVIDIA GH200 480GB"
    assert hw["gpus"][0]["power_w"] is None
    assert hw["mps"] == mps
    assert hw["cpu_percent_per_core"] == [None]
    json.dumps(hw)


def test_hardware_snapshot_real_machine():
    hw = hardware_snapshot(Nvml(), None)
    assert hw["kind"] in ("cpu", "cuda")
    assert hw["memory_total_bytes"] > 0
    json.dumps(hw)
