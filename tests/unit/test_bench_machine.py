"""The machine record of `pdbox bench` and the benchmark scripts, from fixture CPUs."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

from pdbox.bench import machine

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "cpuinfo"


def _rec(name: str, arch: str, **kw: object) -> dict:
    text = (FIXTURES / name).read_text()
    return machine.record(dtype="bfloat16", cpuinfo=text, arch=arch,
                          getloadavg=lambda: (1.234, 2.0, 3.0), **kw)


def test_intel_amx_record() -> None:
    r = _rec("intel-spr-amx.txt", "x86_64")
    assert r["cpu_model"].startswith("Intel(R) Xeon(R) Platinum 8481C")
    assert {"amx_bf16", "amx_tile", "avx512f", "avx512_bf16", "avx2"} <= set(r["simd_flags"])
    assert r["native_bf16"] is True
    assert r["dtype"] == "bfloat16"
    assert r["loadavg"] == [1.23, 2.0, 3.0]
    json.dumps(r)  # JSON-ready as it is


def test_amd_avx2_only_record() -> None:
    r = _rec("amd-epyc-avx2.txt", "x86_64")
    assert r["cpu_model"] == "AMD EPYC 7B13"
    assert "avx2" in r["simd_flags"]
    assert not any(f.startswith(("avx512", "amx")) for f in r["simd_flags"])
    assert r["native_bf16"] is False


def test_aarch64_record_names_the_part_and_its_vector_flags() -> None:
    r = _rec("arm-graviton3.txt", "aarch64")
    assert "0xd40" in r["cpu_model"]
    assert {"asimd", "sve", "bf16"} <= set(r["simd_flags"])
    assert r["arch"] == "aarch64"


def test_record_has_every_field() -> None:
    r = machine.record(dtype="float32", cpuinfo="", arch="x86_64")
    for key in ("cpu_model", "simd_flags", "cores_usable", "memory_gib", "gpus", "gpu_driver",
                "dtype", "vllm", "pdbox", "python", "loadavg"):
        assert key in r
    assert r["cores_usable"] >= 1


def test_gpus_from_telemetry_with_driver() -> None:
    class Fake:
        def available(self) -> bool:
            return True

        def devices(self) -> list:
            return [SimpleNamespace(name="NVIDIA GH200 480GB")]

        def call(self, name: str) -> bytes:
            assert name == "nvmlSystemGetDriverVersion"
            return b"550.54.15"

    assert machine.gpus(Fake()) == {"gpus": ["NVIDIA GH200 480GB"], "gpu_driver": "550.54.15"}


def test_gpus_when_nvml_has_none_or_fails() -> None:
    class Nothing:
        def available(self) -> bool:
            return False

    class Broken:
        def available(self) -> bool:
            raise RuntimeError("driver gone")

    assert machine.gpus(Nothing()) == {"gpus": [], "gpu_driver": None}
    out = machine.gpus(Broken())
    assert out["gpus"] == [] and "driver gone" in out["gpu_error"]


def test_load_tracker_before_and_during() -> None:
    values = iter([(4.0, 3.0, 2.0), (5.0, 0, 0), (7.0, 0, 0), (6.0, 0, 0)])
    t = machine.LoadTracker(lambda: next(values))
    t.start()
    for _ in range(3):
        t.sample()
    s = t.summary()
    assert s["before"] == [4.0, 3.0, 2.0]
    assert (s["during_1m_min"], s["during_1m_mean"], s["during_1m_max"], s["samples"]) == (
        5.0, 6.0, 7.0, 3)


def test_describe_names_the_machine_in_one_line() -> None:
    from pdbox.bench.machine import describe

    rec = {"cpu_model": "AMD EPYC 7B13", "arch": "x86_64", "cores_usable": 2,
           "simd_flags": ["avx", "avx2", "fma", "sse4_2"], "gpus": [], "dtype": "float32",
           "vllm": "0.32.0", "pdbox": "0.1.0"}
    line = describe(rec, [{"label": "a", "load": {"during_1m_max": 2.5}}])
    assert line.startswith("machine: AMD EPYC 7B13 (x86_64), 2 cores, avx2;")
    assert "dtype float32" in line and "peak 1-min load a 2.5" in line
