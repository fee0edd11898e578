"""The dtype rule: bf16 where the CPU does it in hardware, float32 elsewhere, vLLM's on a GPU."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from pdbox import config
from pdbox.hardware.cpuinfo import CPUINFO, parse_cpuinfo, this_cpu
from pdbox.hardware.dtype import choose_dtype, resolve

FIX = Path(__file__).resolve().parents[1] / "fixtures" / "cpuinfo"


def cpu(name: str, arch: str = "x86_64"):
    return parse_cpuinfo((FIX / name).read_text(), arch=arch)


def test_cpuinfo_reads_model_and_flags_of_the_first_processor() -> None:
    amd = cpu("amd-epyc-avx2.txt")
    assert amd.model == "AMD EPYC 7B13"
    assert "avx2" in amd.flags and "sse4a" in amd.flags
    assert amd.simd_flags == ["avx", "avx2", "f16c", "fma", "sse4_2"]
    spr = cpu("intel-spr-amx.txt")
    assert {"amx_bf16", "avx512_bf16", "avx512f"} <= set(spr.simd_flags)
    # smep is a security flag, not SIMD, however it starts.
    assert "smep" not in spr.simd_flags


def test_aarch64_features_and_a_model_from_the_part_number() -> None:
    g3 = cpu("arm-graviton3.txt", "aarch64")
    assert g3.model == "arm implementer 0x41 part 0xd40"
    assert {"bf16", "sve", "asimd", "i8mm"} <= set(g3.simd_flags)
    assert g3.native_bf16
    assert not cpu("arm-graviton2.txt", "aarch64").native_bf16


@pytest.mark.parametrize(("fixture", "arch", "want"), [
    ("amd-epyc-avx2.txt", "x86_64", "float32"),
    ("intel-icelake-avx512.txt", "x86_64", "float32"),  # AVX-512 without its bf16 part
    ("intel-spr-amx.txt", "x86_64", "bfloat16"),
    ("arm-graviton3.txt", "aarch64", "bfloat16"),
    ("arm-graviton2.txt", "aarch64", "float32"),
])
def test_auto_on_a_cpu_follows_native_bf16(fixture: str, arch: str, want: str) -> None:
    c = choose_dtype("auto", "cpu", cpu(fixture, arch))
    assert c.dtype == want
    assert c.requested == "auto" and not c.warning
    assert ("no native bf16" in c.reason) == (want == "float32")


def test_an_explicit_dtype_wins_and_bf16_without_hardware_warns_once() -> None:
    amd = cpu("amd-epyc-avx2.txt")
    c = choose_dtype("bfloat16", "cpu", amd)
    assert c.dtype == "bfloat16" and c.reason == "set by the profile"
    assert "emulated" in c.warning and "avx512_bf16 or amx_bf16" in c.warning
    assert not choose_dtype("bfloat16", "cpu", cpu("intel-spr-amx.txt")).warning
    assert choose_dtype("float32", "cpu", cpu("intel-spr-amx.txt")).dtype == "float32"
    assert not choose_dtype("float32", "cpu", amd).warning


def test_on_a_gpu_auto_is_left_to_vllm() -> None:
    c = choose_dtype("auto", "cuda", cpu("amd-epyc-avx2.txt"))
    assert c.dtype == "auto" and "vLLM" in c.reason
    assert choose_dtype("float16", "cuda", cpu("amd-epyc-avx2.txt")).dtype == "float16"


def test_the_shipped_profiles_say_auto_and_resolve_to_a_concrete_cpu_dtype() -> None:
    for name in config.builtin_names():
        assert config.load(name).model.dtype == "auto", name
    tiny = config.load("cpu-tiny")
    resolved, choice = resolve(tiny, cpu("amd-epyc-avx2.txt"))
    assert resolved.model.dtype == "float32" and choice.requested == "auto"
    assert dataclasses.replace(resolved, model=tiny.model) == tiny
    same, _ = resolve(resolved, cpu("amd-epyc-avx2.txt"))
    assert same is resolved


@pytest.mark.skipif(not CPUINFO.exists(), reason="no /proc/cpuinfo on this machine")
def test_the_default_profile_on_this_machine_follows_the_flags_it_reads() -> None:
    """The rule against this machine's own CPU flags, read independently here."""
    text = CPUINFO.read_text()
    flags: set[str] = set()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip().lower() in ("flags", "features"):
            flags = set(value.split())
            break
    import platform

    if platform.machine() in ("aarch64", "arm64"):
        native = "bf16" in flags
    else:
        native = bool({"avx512_bf16", "amx_bf16"} & flags)
    profile = config.load(config.default_profile_name(None))
    resolved, choice = resolve(profile, this_cpu())
    assert resolved.model.dtype == ("bfloat16" if native else "float32"), choice
