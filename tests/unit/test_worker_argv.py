"""argv and environment of one vLLM worker, for CPU and CUDA profiles.

Built from the shipped profiles, with a fixed base environment so nothing of
the machine running the tests leaks in. The CUDA cases use the real MPS
client_env on a daemon environment that is never started.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import pytest

from pdbox import config
from pdbox.hardware.mps import MpsDaemon, client_env, mem_limit_for
from pdbox.workers import vllm
from pdbox.workers.tuning import CHECKED_VERSIONS, Tuning
from pdbox.workers.vllm import WorkerPorts, build, helper_cores

BASE_ENV = {"PATH": "/usr/bin:/bin", "HOME": "/home/nobody"}
MODEL = "/models/smollm2"


def _build(profile: config.Profile, role: str, index: int = 0, **kw: object) -> vllm.WorkerSpec:
    ports = kw.pop("ports", None) or WorkerPorts(http=9100 + index, side_channel=9200 + index,
                                                 kv_events=9300 + index)
    kw.setdefault("base_env", dict(BASE_ENV))
    kw.setdefault("python", "/venv/bin/python")
    return build(profile, role, index, ports, MODEL, **kw)  # type: ignore[arg-type]


def _flag(argv: list[str], flag: str) -> str:
    assert argv.count(flag) == 1, f"{flag} appears {argv.count(flag)} times in {argv}"
    return argv[argv.index(flag) + 1]


def _tuning(spec: vllm.WorkerSpec) -> Tuning:
    return Tuning.from_env(spec.env["PDBOX_WORKER_TUNING"])


@pytest.fixture(scope="module")
def cpu_tiny() -> config.Profile:
    return config.load("cpu-tiny")


# ------------------------------------------------------------------------- CPU P/D


@pytest.mark.parametrize(("role", "kv_role"), [("prefill", "kv_producer"),
                                                ("decode", "kv_consumer")])
def test_cpu_pd_kv_transfer_config(cpu_tiny: config.Profile, role: str, kv_role: str) -> None:
    spec = _build(cpu_tiny, role)
    kv = json.loads(_flag(spec.argv, "--kv-transfer-config"))
    assert kv == {
        "kv_connector": "NixlConnector",
        "kv_role": kv_role,
        "kv_buffer_device": "cpu",
        "kv_load_failure_policy": "recompute",
    }


def test_cpu_argv_is_a_plain_list_running_the_launcher(cpu_tiny: config.Profile) -> None:
    spec = _build(cpu_tiny, "prefill")
    assert isinstance(spec.argv, list)
    assert all(isinstance(a, str) for a in spec.argv)
    assert spec.argv[:3] == ["/venv/bin/python", "-m", "pdbox.workers.launch"]
    assert _flag(spec.argv, "--model") == MODEL
    assert _flag(spec.argv, "--served-model-name") == "smollm2"
    assert _flag(spec.argv, "--host") == "127.0.0.1"
    assert _flag(spec.argv, "--port") == "9100"
    assert _flag(spec.argv, "--max-model-len") == "4096"
    assert _flag(spec.argv, "--block-size") == "128"
    assert "-O0" in spec.argv
    assert "--enable-prefix-caching" in spec.argv
    assert "--gpu-memory-utilization" not in spec.argv
    assert spec.url == "http://127.0.0.1:9100"
    assert spec.id == "prefill-0"
    # The worker ends itself when this process dies (see launch.die_with_parent).
    assert spec.env["PDBOX_PARENT_PID"] == str(os.getpid())


def test_cpu_kv_events_config_names_the_worker(cpu_tiny: config.Profile) -> None:
    spec = _build(cpu_tiny, "decode", 1)
    ev = json.loads(_flag(spec.argv, "--kv-events-config"))
    assert ev["endpoint"] == "tcp://127.0.0.1:9301"
    assert ev["topic"] == "kv@decode-1"
    assert ev["enable_kv_cache_events"] is True
    no_events = _build(cpu_tiny, "decode", ports=WorkerPorts(http=9100, side_channel=9200))
    assert "--kv-events-config" not in no_events.argv


def test_cpu_env_binds_each_worker_to_its_core_set(cpu_tiny: config.Profile) -> None:
    p = _build(cpu_tiny, "prefill")
    d = _build(cpu_tiny, "decode")
    assert p.env["VLLM_CPU_OMP_THREADS_BIND"] == "0"
    assert d.env["VLLM_CPU_OMP_THREADS_BIND"] == "1"
    assert p.cores == "0" and p.slice == "cores 0"
    assert p.env["VLLM_CPU_KVCACHE_SPACE"] == "1"
    assert "CUDA_VISIBLE_DEVICES" not in p.env


def test_cpu_kvcache_space_keeps_fractions() -> None:
    base = config.load("cpu-tiny")
    half = dataclasses.replace(base, prefill=dataclasses.replace(base.prefill, kv_cache_gib=0.5))
    assert _build(half, "prefill").env["VLLM_CPU_KVCACHE_SPACE"] == "0.5"


def test_cpu_side_channel_ports_are_distinct(cpu_tiny: config.Profile) -> None:
    p = _build(cpu_tiny, "prefill", 0)
    d = _build(cpu_tiny, "decode", 1)
    assert p.env["VLLM_NIXL_SIDE_CHANNEL_PORT"] == "9200"
    assert d.env["VLLM_NIXL_SIDE_CHANNEL_PORT"] == "9201"
    assert p.env["VLLM_NIXL_SIDE_CHANNEL_HOST"] == "127.0.0.1"
    assert p.env["UCX_TLS"] == "tcp,sm,self"


def test_cpu_pythonpath_puts_the_site_dir_first(cpu_tiny: config.Profile) -> None:
    spec = _build(cpu_tiny, "prefill", base_env={**BASE_ENV, "PYTHONPATH": "/elsewhere"})
    parts = spec.env["PYTHONPATH"].split(os.pathsep)
    assert parts[0] == str(vllm.SITE_DIR)
    assert (Path(parts[0]) / "sitecustomize.py").is_file()
    assert (Path(parts[1]) / "pdbox" / "__init__.py").is_file()
    assert parts[-1] == "/elsewhere"
    no_pp = _build(cpu_tiny, "prefill")
    assert "" not in no_pp.env["PYTHONPATH"].split(os.pathsep)


def test_cpu_tuning_carries_delay_cores_and_versions(cpu_tiny: config.Profile) -> None:
    t = _tuning(_build(cpu_tiny, "decode", online_cores=[0, 1]))
    assert t.nixl_delay_us == cpu_tiny.nixl.progress_delay_us == 5000
    assert t.kv_cores == (1,)
    # Two cores and both computing: no helper cores, the worker keeps its own.
    assert t.process_cores == (1,)
    assert t.expect == dict(CHECKED_VERSIONS)


def test_base_env_is_not_mutated(cpu_tiny: config.Profile) -> None:
    base = dict(BASE_ENV)
    _build(cpu_tiny, "prefill", base_env=base)
    assert base == BASE_ENV


def test_extra_args_are_separate_argv_items(cpu_tiny: config.Profile) -> None:
    extra = ("--max-num-batched-tokens", "2048", "--disable-log-stats")
    p = dataclasses.replace(cpu_tiny, engine=dataclasses.replace(cpu_tiny.engine,
                                                                 extra_args=extra))
    argv = _build(p, "prefill").argv
    assert argv[-3:] == list(extra)
    assert not any(" " in a and a.startswith("--max-num") for a in argv)


def test_loaded_extra_args_reach_argv_verbatim(tmp_path: Path) -> None:
    text = config.BUILTIN_DIR.joinpath("cpu-tiny.toml").read_text()
    text = text.replace("extra_args = []", 'extra_args = ["--max-num-batched-tokens=2048"]')
    f = tmp_path / "mine.toml"
    f.write_text(text)
    argv = _build(config.load_file(f), "decode").argv
    assert argv[-1] == "--max-num-batched-tokens=2048"


def test_max_num_seqs_and_eager(cpu_tiny: config.Profile) -> None:
    p = dataclasses.replace(
        cpu_tiny,
        decode=dataclasses.replace(cpu_tiny.decode, max_num_seqs=16),
        engine=dataclasses.replace(cpu_tiny.engine, enforce_eager=True),
    )
    argv = _build(p, "decode").argv
    assert _flag(argv, "--max-num-seqs") == "16"
    assert "--enforce-eager" in argv
    assert "--max-num-seqs" not in _build(cpu_tiny, "decode").argv


# ------------------------------------------------------------------ CPU aggregated


def test_cpu_aggregated_has_no_kv_transfer() -> None:
    p = config.load("cpu-aggregated")
    specs = [_build(p, "aggregated", i) for i in range(2)]
    for s in specs:
        assert "--kv-transfer-config" not in s.argv
        assert "VLLM_NIXL_SIDE_CHANNEL_PORT" not in s.env
        assert "UCX_TLS" not in s.env
        t = _tuning(s)
        assert t.nixl_delay_us is None
    assert [s.env["VLLM_CPU_OMP_THREADS_BIND"] for s in specs] == ["0", "1"]
    assert [_tuning(s).kv_cores for s in specs] == [(0,), (1,)]


def test_replicas_beyond_the_core_list_wrap_around(cpu_tiny: config.Profile) -> None:
    # decode has one core set; a second replica shares it rather than failing.
    assert _build(cpu_tiny, "decode", 1).env["VLLM_CPU_OMP_THREADS_BIND"] == "1"


# -------------------------------------------------------------------- helper cores


def test_helper_cores_are_the_cores_no_role_computes_on(cpu_tiny: config.Profile) -> None:
    assert helper_cores(cpu_tiny, [0, 1, 2, 3]) == [2, 3]
    assert helper_cores(cpu_tiny, [0, 1]) == []
    assert helper_cores(config.load("cpu-aggregated"), [0, 1, 2, 3]) == [2, 3]


def test_process_cores_add_helper_cores_to_compute(cpu_tiny: config.Profile) -> None:
    t = _tuning(_build(cpu_tiny, "prefill", online_cores=[0, 1, 2, 3]))
    assert t.kv_cores == (0,)
    assert t.process_cores == (0, 2, 3)
    # The OpenMP binding stays on the compute cores only.
    spec = _build(cpu_tiny, "prefill", online_cores=[0, 1, 2, 3])
    assert spec.env["VLLM_CPU_OMP_THREADS_BIND"] == "0"


# ---------------------------------------------------------------------------- CUDA


@pytest.mark.parametrize("name", ["gh200-pd", "h100-pd"])
def test_cuda_pd_workers(name: str, tmp_path: Path) -> None:
    p = config.load(name)
    daemon_env = MpsDaemon(tmp_path, base_env={}).env()
    total = 96 * 1024**3
    specs = {}
    for role in ("prefill", "decode"):
        rc = p.role(role)
        mps_env = client_env(daemon_env, rc.sm_percent,
                             mem_limit_for(rc.memory_fraction, total, 0), 0)
        index = len(specs)
        ports = WorkerPorts(http=9100 + index, side_channel=9200 + index)
        specs[role] = _build(p, role, ports=ports, mps_env=mps_env)
    for role, spec in specs.items():
        rc = p.role(role)
        argv, env = spec.argv, spec.env
        assert _flag(argv, "--gpu-memory-utilization") == f"{rc.memory_fraction:.3f}"
        kv = json.loads(_flag(argv, "--kv-transfer-config"))
        assert kv["kv_buffer_device"] == "cuda"
        assert kv["kv_role"] == vllm.KV_ROLE[role]
        assert f"-O{p.engine.optimization_level}" in argv
        assert _flag(argv, "--scheduling-policy") == "priority"
        assert env["CUDA_VISIBLE_DEVICES"] == "0"
        assert env["CUDA_MPS_PIPE_DIRECTORY"] == daemon_env["CUDA_MPS_PIPE_DIRECTORY"]
        assert env["CUDA_MPS_LOG_DIRECTORY"] == daemon_env["CUDA_MPS_LOG_DIRECTORY"]
        assert env["CUDA_MPS_ACTIVE_THREAD_PERCENTAGE"] == str(rc.sm_percent)
        assert env["CUDA_MPS_PINNED_DEVICE_MEM_LIMIT"].startswith("0=")
        assert not [k for k in env if k.startswith("VLLM_CPU_")]
        assert "cuda_ipc" in env["UCX_TLS"].split(",")
        assert spec.cores == ""
        assert spec.sm_percent == rc.sm_percent
        assert spec.slice == f"SM {rc.sm_percent}% mem {rc.memory_fraction:.2f}"
        t = _tuning(spec)
        assert t.nixl_delay_us == p.nixl.progress_delay_us
        assert t.kv_cores == () and t.process_cores == ()
    assert (specs["prefill"].env["VLLM_NIXL_SIDE_CHANNEL_PORT"]
            != specs["decode"].env["VLLM_NIXL_SIDE_CHANNEL_PORT"])


def test_cuda_gpu_uuid_from_the_daemon_wins(tmp_path: Path) -> None:
    p = config.load("gh200-pd")
    uuid = "GPU-12345678-aaaa-bbbb-cccc-1234567890ab"
    daemon_env = MpsDaemon(tmp_path, gpu_uuid=uuid, base_env={}).env()
    spec = _build(p, "decode", mps_env=client_env(daemon_env, 40, None, 0),
                  base_env={**BASE_ENV, "CUDA_VISIBLE_DEVICES": "3"})
    assert spec.env["CUDA_VISIBLE_DEVICES"] == uuid
    assert "CUDA_MPS_PINNED_DEVICE_MEM_LIMIT" not in spec.env


def test_cuda_without_mps_sees_the_profile_gpu() -> None:
    p = config.load("gpu-aggregated")
    spec = _build(p, "aggregated")
    assert spec.env["CUDA_VISIBLE_DEVICES"] == str(p.hardware.gpu_index)
    assert not [k for k in spec.env if k.startswith("CUDA_MPS_")]
    assert "--kv-transfer-config" not in spec.argv
