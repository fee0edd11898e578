"""`pdbox plan --mix`: the split a steady request mix asks for (pure, no GPU)."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from pdbox.cli import main
from pdbox.config import load as load_profile
from pdbox.plan.mix import Mix, MixError, parse_mix, split_for_mix


def test_parse() -> None:
    assert parse_mix("4:2000:200") == Mix(4.0, 2000, 200)
    assert parse_mix("0.5:100:1") == Mix(0.5, 100, 1)
    for bad in ("4:2000", "x:1:1", "0:10:10", "1:0:10", "1:10:-1"):
        with pytest.raises(MixError):
            parse_mix(bad)


def test_each_role_s_need_follows_its_own_load() -> None:
    gh = load_profile("gh200-pd")
    light = split_for_mix(gh, Mix(2, 2000, 100)).need
    more_prompts = split_for_mix(gh, Mix(8, 2000, 100)).need
    longer_answers = split_for_mix(gh, Mix(2, 2000, 2000)).need
    assert more_prompts.prefill_units > light.prefill_units
    assert longer_answers.decode_units > light.decode_units
    assert longer_answers.prefill_units == light.prefill_units


def test_a_mix_that_fits_gets_both_needs_and_half_the_slack_each() -> None:
    s = split_for_mix(load_profile("gh200-pd"), Mix(4, 2000, 200))
    n = s.need
    assert s.fits() and n.prefill_units + n.decode_units <= 100
    assert s.prefill_units >= n.prefill_units and 100 - s.prefill_units >= n.decode_units
    assert s.prefill_units % 5 == 0 and s.unit == "%"
    assert "the profile: 60% / 40%" in "\n".join(s.lines())


def test_an_overloaded_mix_gives_floors_first_and_says_so() -> None:
    s = split_for_mix(load_profile("gh200-pd"), Mix(50, 200, 500))
    n = s.need
    assert not s.fits() and n.prefill_floor + n.decode_floor > 100
    # Not even the floors fit: each role gets its floor's share, neither starves.
    share = 100 * n.prefill_floor / (n.prefill_floor + n.decode_floor)
    assert abs(s.prefill_units - share) <= 2.5 and 0 < s.prefill_units < 100
    assert "does not fit" in s.lines()[0]


def test_cpu_splits_whole_cores() -> None:
    s = split_for_mix(load_profile("cpu-tiny"), Mix(1, 600, 128))
    assert s.unit == " core(s)" and s.prefill_units == 1 and s.need.units == 2


def test_plan_cli_mix_text_json_and_bad_input() -> None:
    r = CliRunner().invoke(main, ["plan", "--profile", "gh200-pd", "--mix", "4:2000:200"])
    assert r.exit_code == 0, r.output
    assert "split for 4 req/s of 2,000-token prompts and 200-token answers: fits" in r.output
    r = CliRunner().invoke(main, ["plan", "--profile", "gh200-pd", "--mix", "4:2000:200",
                                  "--json"])
    mix = json.loads(r.output)["mix"]
    assert mix["unit"] == "%" and mix["fits"] and mix["suggested_prefill"] == 60
    r = CliRunner().invoke(main, ["plan", "--profile", "cpu-aggregated", "--mix", "1:2:3"])
    assert r.exit_code == 2 and "needs a P/D profile" in r.output
    r = CliRunner().invoke(main, ["plan", "--profile", "cpu-tiny", "--mix", "1:2"])
    assert r.exit_code == 2 and "is not RATE:PROMPT:OUTPUT" in r.output
    assert "Traceback" not in r.output
