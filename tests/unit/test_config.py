"""Profiles: every way a profile can be wrong gets one sentence naming the
file, the dotted key and (where the text shows it) the line."""

from __future__ import annotations

import dataclasses
import re
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pdbox import config
from pdbox.config import ProfileError, load_text

CPU = """\
name = "t-cpu"
description = "test"

[model]
source = "embedded:smollm2-135m-instruct"
served_name = "smollm2"

[hardware]
device = "cpu"
sharing = "cores"

[mode]
kind = "pd"

[prefill]
replicas = 1
min = 1
max = 1
cores = ["0"]

[decode]
replicas = 1
min = 1
max = 2
cores = ["1"]

[router]
port = 8000
weights = { prefix = 3.0, queue = 2.0, kv = 2.0 }

[engine]
extra_args = []
"""

GPU = """\
name = "t-gpu"

[model]
source = "Qwen/Qwen2.5-7B-Instruct"

[hardware]
device = "cuda"
sharing = "mps"

[mode]
kind = "pd"

[prefill]
sm_percent = 60
memory_fraction = 0.40

[decode]
max = 2
sm_percent = 40
memory_fraction = 0.25
"""


def edit(text: str, old: str, new: str) -> str:
    assert old in text, old
    return text.replace(old, new, 1)


def error(text: str) -> ProfileError:
    with pytest.raises(ProfileError) as info:
        load_text(text, "my.toml")
    return info.value


def line_of(text: str, needle: str) -> int:
    return next(i for i, ln in enumerate(text.splitlines(), 1) if needle in ln)


# ------------------------------------------------------------------ happy paths


def test_minimal_cpu_and_gpu_profiles_load() -> None:
    p = load_text(CPU, "my.toml")
    assert p.name == "t-cpu" and p.is_pd and list(p.roles()) == ["prefill", "decode"]
    assert p.decode is not None and p.decode.max == 2 and p.decode.cores == ("1",)
    assert p.router.weights.prefix == 3.0
    g = load_text(GPU, "g.toml")
    assert g.prefill is not None and g.prefill.memory_fraction == 0.40


@pytest.mark.parametrize("name", config.builtin_names())
def test_every_builtin_profile_loads(name: str) -> None:
    p = config.load(name)
    assert p.name == name and p.description
    assert p.source_file.endswith(f"{name}.toml")


def test_builtins_include_the_defaults() -> None:
    names = set(config.builtin_names())
    for gpu in (None, "NVIDIA GH200 480GB", "NVIDIA H100 80GB HBM3", "NVIDIA A10G"):
        assert config.default_profile_name(gpu) in names


@pytest.mark.parametrize(
    ("gpu", "want"),
    [
        (None, "cpu-tiny"),
        ("", "cpu-tiny"),
        ("NVIDIA GH200 480GB", "gh200-pd"),
        ("nvidia gh200", "gh200-pd"),
        ("NVIDIA H100 80GB HBM3", "h100-pd"),
        ("NVIDIA H100 NVL", "h100-pd"),
        ("NVIDIA A100-SXM4-40GB", "gpu-aggregated"),
    ],
)
def test_default_profile_name(gpu: str | None, want: str) -> None:
    assert config.default_profile_name(gpu) == want


def test_name_defaults_to_the_file_stem(tmp_path: Path) -> None:
    f = tmp_path / "mine.toml"
    f.write_text(CPU.replace('name = "t-cpu"\n', ""))
    assert config.load(str(f)).name == "mine"


def test_cores_may_be_one_string() -> None:
    p = load_text(edit(CPU, 'cores = ["0"]', 'cores = "0-1"'))
    assert p.prefill is not None and p.prefill.cores == ("0-1",)
    assert config.parse_core_set("0-2,5,1") == [0, 1, 2, 5]


def test_to_dict_is_tables_of_values() -> None:
    d = load_text(CPU).to_dict()
    assert d["decode"]["max"] == 2
    assert d["router"]["weights"]["kv"] == 2.0
    assert "aggregated" not in d and "source_file" not in d


def test_config_imports_nothing_heavy() -> None:
    code = (
        "import sys, pdbox.config as c; c.load('cpu-tiny');"
        "bad = [m for m in ('torch', 'vllm', 'textual', 'transformers') if m in sys.modules];"
        "sys.exit(1 if bad else 0)"
    )
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0


# ------------------------------------------------------------------ error shape


def test_error_names_file_line_key_and_suggests() -> None:
    text = edit(CPU, "max = 2", "maxx = 2")
    e = error(text)
    assert (e.file, e.key, e.line) == ("my.toml", "decode.maxx", line_of(text, "maxx"))
    assert str(e) == f"my.toml:{e.line}: decode.maxx: unknown key (did you mean 'max'?)"


def test_bad_toml_names_its_line() -> None:
    text = edit(CPU, "port = 8000", "port 8000")
    e = error(text)
    assert e.line == line_of(text, "port 8000")
    assert str(e).startswith(f"my.toml:{e.line}: not valid TOML:")


def test_duplicate_key_is_bad_toml() -> None:
    e = error(edit(CPU, "port = 8000", "port = 8000\nport = 8001"))
    assert "not valid TOML" in str(e)


def test_unknown_section_suggests() -> None:
    text = edit(CPU, "[router]", "[routr]")
    e = error(text)
    assert e.key == "routr" and e.line == line_of(text, "[routr]")
    assert "did you mean 'router'?" in str(e)


def test_unknown_top_key() -> None:
    text = "nmae = 'x'\n" + CPU
    e = error(text)
    assert (e.key, e.line) == ("nmae", 1) and "did you mean 'name'?" in str(e)


def test_unknown_key_in_inline_table() -> None:
    text = edit(CPU, "kv = 2.0 }", "kvv = 2.0 }")
    e = error(text)
    assert e.key == "router.weights.kvv" and e.line == line_of(text, "kvv")
    assert "did you mean 'kv'?" in str(e)


def test_unknown_choice_suggests() -> None:
    text = edit(CPU, 'kind = "pd"', 'kind = "aggregate"')
    e = error(text)
    assert e.key == "mode.kind" and e.line == line_of(text, "aggregate")
    assert "must be one of pd, aggregated" in str(e) and "did you mean 'aggregated'?" in str(e)


@pytest.mark.parametrize(
    ("old", "new", "key", "says"),
    [
        ("port = 8000", 'port = "8000"', "router.port", "must be an integer, not a string"),
        ("port = 8000", "port = 8000.5", "router.port", "must be an integer, not a number"),
        ("port = 8000", "port = true", "router.port", "must be an integer, not a boolean"),
        ("prefix = 3.0", 'prefix = "high"', "router.weights.prefix", "must be a number"),
        ('served_name = "smollm2"', "served_name = 3", "model.served_name", "must be a string"),
        ('cores = ["1"]', "cores = [1]", "decode.cores", "must be a list of strings"),
        ("extra_args = []", 'extra_args = "--x"', "engine.extra_args", "list of strings"),
        ('name = "t-cpu"', "name = 1", "name", "must be a string"),
        ("[router]", "[router]\nkv_events = 1", "router.kv_events", "must be true or false"),
        ("weights = {", "weights = 3 #", "router.weights", "must be a table"),
        ('kind = "pd"', "kind = { a = 1 }", "mode.kind", "must be a string"),
    ],
)
def test_wrong_types(old: str, new: str, key: str, says: str) -> None:
    text = edit(CPU, old, new)
    e = error(text)
    assert e.key == key and says in str(e)
    assert e.line is not None


def test_array_of_tables_is_not_a_table() -> None:
    e = error(edit(CPU, "[engine]\nextra_args = []", "[[engine]]\nextra_args = []"))
    assert e.key == "engine" and "must be a table, not a list" in str(e)


@pytest.mark.parametrize("bad", ["nan", "inf", "-inf"])
def test_non_finite_numbers_are_refused(bad: str) -> None:
    e = error(edit(CPU, "[router]", f"[slo]\nttft_s = {bad}\n\n[router]"))
    assert e.key == "slo.ttft_s" and "finite" in str(e)


@pytest.mark.parametrize("value", ['"auto"', "0", "300"])
def test_the_pd_gate_is_auto_or_a_count(value: str) -> None:
    p = load_text(edit(CPU, "[router]", f"[router]\npd_min_uncached_tokens = {value}"), "my.toml")
    assert p.router.fixed_gate == (None if value == '"auto"' else int(value))


@pytest.mark.parametrize("value", ['"fast"', "-1", "true", "2.5"])
def test_a_bad_pd_gate_is_one_sentence(value: str) -> None:
    e = error(edit(CPU, "[router]", f"[router]\npd_min_uncached_tokens = {value}"))
    assert e.key == "router.pd_min_uncached_tokens" and '"auto"' in str(e)
    assert e.line is not None


# ------------------------------------------------------------------ cross-field rules


def test_memory_fraction_over_one() -> None:
    text = edit(GPU, "memory_fraction = 0.40", "memory_fraction = 1.2")
    e = error(text)
    assert e.key == "prefill.memory_fraction" and "(1.2) must lie in (0, 1]" in str(e)
    assert e.line == line_of(text, "1.2")


def test_memory_fraction_missing_on_gpu_points_at_the_table() -> None:
    text = edit(GPU, "memory_fraction = 0.40\n", "")
    e = error(text)
    assert e.key == "prefill.memory_fraction" and e.line == line_of(text, "[prefill]")


def test_memory_sum_counts_every_worker_at_max() -> None:
    # 0.40 + 2 x 0.28 = 0.96: fine at start (0.68), too much once decode scales to 2.
    e = error(edit(GPU, "memory_fraction = 0.25", "memory_fraction = 0.28"))
    assert "sum to 0.96" in str(e) and "below 0.95" in str(e)
    load_text(edit(GPU, "memory_fraction = 0.25", "memory_fraction = 0.27"))


def test_sm_percent_range() -> None:
    e = error(edit(GPU, "sm_percent = 60", "sm_percent = 0"))
    assert e.key == "prefill.sm_percent" and "1..100" in str(e)


@pytest.mark.parametrize("cores", ['"a"', '"0-"', '"0,,1"', '""', '"0 1"', '"-1"'])
def test_malformed_cores(cores: str) -> None:
    text = edit(CPU, 'cores = ["1"]', f"cores = [{cores}]")
    e = error(text)
    assert e.key == "decode.cores" and "is not a core list" in str(e)
    assert e.line == line_of(text, f"cores = [{cores}]")


def test_cores_required_on_cpu() -> None:
    text = edit(CPU, 'cores = ["1"]\n', "")
    e = error(text)
    assert e.key == "decode.cores" and "is required on a CPU" in str(e)
    assert e.line == line_of(text, "[decode]")


@pytest.mark.parametrize(
    ("old", "new", "key", "says"),
    [
        ("replicas = 1\nmin = 1\nmax = 2", "replicas = 3\nmin = 1\nmax = 2", "decode.replicas",
         "(3) must lie within [1, 2]"),
        ("replicas = 1\nmin = 1\nmax = 2", "replicas = 1\nmin = 2\nmax = 2", "decode.replicas",
         "(1) must lie within [2, 2]"),
        ("replicas = 1\nmin = 1\nmax = 2", "replicas = 1\nmin = 3\nmax = 2", "decode.min",
         "(3) is above decode.max (2)"),
        ("replicas = 1\nmin = 1\nmax = 2", "replicas = 1\nmin = -1\nmax = 2", "decode.min",
         "must not be negative"),
        ("replicas = 1\nmin = 1\nmax = 2", "replicas = 0\nmin = 0\nmax = 2", "decode.replicas",
         "must be at least 1"),
        ("replicas = 1\nmin = 1\nmax = 2", "replicas = 1\nmin = 0\nmax = 0", "decode.max",
         "must be at least 1"),
    ],
)  # fmt: skip
def test_replicas_bounds(old: str, new: str, key: str, says: str) -> None:
    e = error(edit(CPU, old, new))
    assert e.key == key and says in str(e)


def test_mode_needs_its_tables() -> None:
    e = error(edit(CPU, 'kind = "pd"', 'kind = "aggregated"'))
    assert e.key == "mode.kind" and "no [aggregated] table" in str(e)
    no_decode = CPU[: CPU.index("[decode]")] + CPU[CPU.index("[router]") :]
    e = error(no_decode)
    assert e.key == "mode.kind" and "lacks a [prefill] or [decode]" in str(e)


def test_sharing_must_fit_the_device() -> None:
    e = error(edit(CPU, 'sharing = "cores"', 'sharing = "mps"'))
    assert e.key == "hardware.sharing" and 'must be "cores" on a CPU' in str(e)
    e = error(edit(GPU, 'sharing = "mps"', 'sharing = "cores"'))
    assert 'must be "mps" or "timeslice"' in str(e)


@pytest.mark.parametrize(
    ("old", "new", "key"),
    [
        ("port = 8000", "port = 70000", "router.port"),
        ("[router]", "[router]\nqueue_bound = 0", "router.queue_bound"),
        ("prefix = 3.0", "prefix = -1.0", "router.weights.prefix"),
        ("[router]", "[nixl]\nucx_tls = 'tcp;rm'\n\n[router]", "nixl.ucx_tls"),
        ("[router]", "[autoscaler]\ntolerance = 1.0\n\n[router]", "autoscaler.tolerance"),
        ("[router]", "[autoscaler]\npanic_threshold = 1.0\n\n[router]", "autoscaler.panic_threshold"),
        ('served_name = "smollm2"', 'served_name = "a b"', "model.served_name"),
        ("[model]", "[model]\nblock_size = 100", "model.block_size"),
        ("[model]", "[model]\nmax_model_len = 8", "model.max_model_len"),
    ],
)  # fmt: skip
def test_other_ranges(old: str, new: str, key: str) -> None:
    assert error(edit(CPU, old, new)).key == key


# ------------------------------------------------------------------ model source


def test_missing_model_folder(tmp_path: Path) -> None:
    text = edit(CPU, '"embedded:smollm2-135m-instruct"', f'"{tmp_path}/nope"')
    e = error(text)
    assert e.key == "model.source" and "does not exist" in str(e)
    assert e.line == line_of(text, "nope")


def test_model_folder_without_config(tmp_path: Path) -> None:
    e = error(edit(CPU, '"embedded:smollm2-135m-instruct"', f'"{tmp_path}"'))
    assert "has no config.json" in str(e)
    (tmp_path / "config.json").write_text("{}")
    assert load_text(edit(CPU, '"embedded:smollm2-135m-instruct"', f'"{tmp_path}"'))


def test_unknown_embedded_model() -> None:
    e = error(edit(CPU, "smollm2-135m-instruct", "smollm2-135m-instrct"))
    assert "unknown embedded model 'smollm2-135m-instrct'" in str(e)
    assert "did you mean 'smollm2-135m-instruct'?" in str(e)


def test_nonsense_model_source() -> None:
    e = error(edit(CPU, '"embedded:smollm2-135m-instruct"', '"just words"'))
    assert "neither embedded:NAME" in str(e)


# ------------------------------------------------------------------ extra_args


def with_args(*args: str, trust: bool = False) -> str:
    quoted = ", ".join(f"'{a}'" for a in args)
    text = edit(CPU, "extra_args = []", f"extra_args = [{quoted}]")
    return text + ("allow_trust_remote_code = true\n" if trust else "")


def test_ordinary_extra_args_pass() -> None:
    p = load_text(with_args("--max-num-batched-tokens=2048", "--seed", "7", "-O0"))
    assert p.engine.extra_args[1] == "--seed"


def test_trust_remote_code_needs_opt_in() -> None:
    text = with_args("--trust-remote-code")
    e = error(text)
    assert e.key == "engine.extra_args" and "allow_trust_remote_code = true" in str(e)
    assert e.line == line_of(text, "extra_args")
    assert load_text(with_args("--trust-remote-code", trust=True)).engine.allow_trust_remote_code
    assert error(with_args("--trust_remote_code")).key == "engine.extra_args"


@pytest.mark.parametrize("flag", config.DENIED_FLAGS)
def test_every_denied_flag(flag: str) -> None:
    e = error(with_args(f"{flag}=x"))
    assert f"sets {flag}, which pdbox controls itself" in str(e)


@pytest.mark.parametrize(
    "arg",
    [
        "--port 9000",  # flag and value in one item
        "--served_model_name=x",  # vLLM reads underscores as dashes
        "--kv-transfer",  # argparse takes unambiguous prefixes
        "--kv-transfer-config.kv_role=kv_both",  # vLLM's dotted form
        "--config=/tmp/args.yaml",  # more arguments from a file
        "--trust-remote",
    ],
)
def test_denied_flag_spellings(arg: str) -> None:
    assert error(with_args(arg)).key == "engine.extra_args"


@pytest.mark.parametrize(
    "arg", ["--seed=1;rm -rf /", "$(reboot)", "`id`", "--x|y", "--a&b", "--a>b", "--a\\nb", "a'b"]
)
def test_shell_metacharacters_are_refused(arg: str) -> None:
    text = edit(CPU, "extra_args = []", f"extra_args = [{_toml_str(arg)}]")
    e = error(text)
    assert e.key == "engine.extra_args" and "characters not allowed" in str(e)


def _toml_str(s: str) -> str:
    return '"' + s.replace("\\", "\\\\").replace('"', '\\"') + '"'


# ------------------------------------------------------------------ loading files


def test_missing_file_and_unknown_builtin(tmp_path: Path) -> None:
    e = error_of(lambda: config.load(str(tmp_path / "none.toml")))
    assert "no such profile file" in str(e)
    e = error_of(lambda: config.load("cpu-tin"))
    assert "no such built-in profile (did you mean 'cpu-tiny'?)" in str(e)


def test_unreadable_file(tmp_path: Path) -> None:
    (tmp_path / "d.toml").mkdir()
    assert "cannot be read" in str(error_of(lambda: config.load(str(tmp_path / "d.toml"))))
    (tmp_path / "bin.toml").write_bytes(b"\xff\xfe\x00")
    assert "cannot be read" in str(error_of(lambda: config.load_file(tmp_path / "bin.toml")))


def error_of(fn) -> ProfileError:
    with pytest.raises(ProfileError) as info:
        fn()
    return info.value


# ------------------------------------------------------------------ fuzz


_VALUES = st.one_of(
    st.integers(-(2**40), 2**40),
    st.floats(allow_nan=True, allow_infinity=True),
    st.booleans(),
    st.text(max_size=8),
    st.lists(st.text(max_size=4), max_size=3),
)


def _toml_value(v: object) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, float):
        return (
            "nan"
            if v != v
            else ("inf" if v == float("inf") else "-inf" if v == -float("inf") else repr(v))
        )
    if isinstance(v, int):
        return str(v)
    if isinstance(v, str):
        return _toml_str(v)
    return "[" + ", ".join(_toml_value(x) for x in v) + "]"  # type: ignore[attr-defined]


_LINES = [ln for ln in CPU.splitlines() if re.match(r"^\w+ = ", ln)]


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(line=st.sampled_from(_LINES), value=_VALUES)
def test_any_value_loads_or_fails_cleanly(line: str, value: object) -> None:
    key = line.split(" = ")[0]
    text = CPU.replace(line, f"{key} = {_toml_value(value)}", 1)
    try:
        p = load_text(text, "fuzz.toml")
    except ProfileError as e:
        assert str(e).startswith("fuzz.toml")
        assert "\n" not in e.message
    else:
        assert dataclasses.is_dataclass(p)
