"""Benchmark setups from the command line, and the table of ratios to the first setup."""

from __future__ import annotations

from pathlib import Path

import pytest

from pdbox.bench.cli_common import legacy_setups
from pdbox.bench.report import Column, Row, table, with_ratios
from pdbox.bench.setups import SetupError, materialize, parse, split_items, unique_labels


def test_parse_profile_flags_keys_and_label() -> None:
    s = parse("fixed:cpu-tiny,router.soft_roles=false,--max-num-batched-tokens=256,"
              "--max-num-seqs 8,router.pd_decider=threshold")
    assert (s.label, s.profile) == ("fixed", "cpu-tiny")
    assert s.overrides == (("router.soft_roles", False), ("router.pd_decider", "threshold"))
    assert s.vllm_args == ("--max-num-batched-tokens=256", "--max-num-seqs", "8")
    assert parse("cpu-aggregated").label == "cpu-aggregated"
    assert parse("profiles/my-box.toml").label == "my-box"


def test_commas_inside_brackets_do_not_split() -> None:
    assert split_items('cpu-tiny,router.weights={prefix=1.0,queue=2.0},'
                       '--compilation-config={"level":0,"x":1}') == [
        "cpu-tiny", "router.weights={prefix=1.0,queue=2.0}",
        '--compilation-config={"level":0,"x":1}']


def test_presets_expand_and_name_the_setup() -> None:
    presets = {"fixed-pd": "cpu-tiny,router.soft_roles=false"}
    s = parse("fixed-pd,--max-num-seqs=4", presets)
    assert (s.label, s.profile, s.overrides, s.vllm_args) == (
        "fixed-pd", "cpu-tiny", (("router.soft_roles", False),), ("--max-num-seqs=4",))


def test_repeated_labels_are_numbered() -> None:
    out = unique_labels([parse("cpu-tiny"), parse("cpu-tiny,router.soft_roles=false")])
    assert [s.label for s in out] == ["cpu-tiny", "cpu-tiny#2"]


def test_materialize_writes_a_checked_profile(tmp_path: Path) -> None:
    m = materialize(parse("agg:cpu-aggregated,--max-num-batched-tokens=256"), tmp_path)
    assert m.profile.name == "agg"
    assert m.profile.autoscaler.enabled is False  # fixed worker counts by default
    assert m.profile.engine.extra_args == ("--max-num-batched-tokens=256",)
    on = materialize(parse("cpu-tiny"), tmp_path, autoscale=True)
    assert on.profile.autoscaler.enabled is True


@pytest.mark.parametrize("spec, words", [
    ("cpu-tny", "no such built-in profile"),
    ("cpu-tiny,router.soft_rolez=true", "unknown key"),
    ("cpu-tiny,--port=9000", "pdbox controls itself"),
    ("cpu-tiny,nonsense", "neither a vLLM flag"),
    ("missing/file.toml", "no such profile file"),
])
def test_bad_setups_say_why_in_one_sentence(tmp_path: Path, spec: str, words: str) -> None:
    with pytest.raises(SetupError, match=words) as exc:
        materialize(parse(spec), tmp_path)
    assert "\n" not in str(exc.value)


def test_legacy_setups_option_maps_to_profile_and_against() -> None:
    assert legacy_setups(["--setups", "aggregated,pd-adaptive", "--json"]) == [
        "--profile", "aggregated", "--against", "pd-adaptive", "--json"]
    assert legacy_setups(["--setups=soft", "--phase-s", "5"]) == [
        "--profile", "soft", "--phase-s", "5"]


COLS = [Column("goodput_rps", "goodput", "higher"), Column("ttft_p50_s", "TTFT", "lower"),
        Column("errors", "errors")]


def test_ratios_are_to_the_first_setup_of_each_group() -> None:
    rows = [Row("a", "pd", {"goodput_rps": 2.0, "ttft_p50_s": 0.5, "errors": 0}),
            Row("a", "agg", {"goodput_rps": 3.0, "ttft_p50_s": 0.25, "errors": 1}),
            Row("b", "pd", {"goodput_rps": 0.0, "ttft_p50_s": None, "errors": 0}),
            Row("b", "agg", {"goodput_rps": 1.0, "ttft_p50_s": 0.2, "errors": 0})]
    d = with_ratios(rows, COLS)
    assert d[1]["ratios"] == {"goodput_rps": 1.5, "ttft_p50_s": 0.5}
    assert d[3]["ratios"] == {"goodput_rps": None, "ttft_p50_s": None}  # no reference value
    assert "errors" not in d[1]["ratios"]
    text = table(rows, COLS)
    assert "(1.50×)" in text and "(0.50×)" in text
    first = text.splitlines()[1]
    assert "×" not in first  # the reference row has no ratio
