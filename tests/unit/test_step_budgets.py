"""Step budgets from measured speeds (calibration.step_budget, step_budgets.apply)."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from pdbox import calibration, step_budgets
from pdbox.calibration import Calibration
from pdbox.config import load as load_profile


def cal(tps: float) -> Calibration:
    return Calibration(prefill_tps=tps, overhead_s=0.02, decode_step_s={1: 0.05, 4: 0.06})


def test_budget_follows_the_measured_speed_and_the_role_share() -> None:
    # 1,200 tokens/s, 250 ms target: decode gets half the target, prefill all of it.
    assert calibration.step_budget(cal(1200), 0.25, "decode") == 144
    assert calibration.step_budget(cal(1200), 0.25, "prefill") == 288
    # Four times slower (bf16 emulated on an AVX2 CPU): a quarter of the tokens.
    assert calibration.step_budget(cal(300), 0.25, "decode") == 32
    # A machine ten times faster gets ten times the chunk: no constant of one machine.
    assert calibration.step_budget(cal(12000), 0.25, "decode") == 1488


def test_budget_reaches_at_most_twice_the_longest_prompt_timed() -> None:
    # 3,500 tokens/s fitted between 16 and 96 tokens (inside a 96-token budget): the
    # line says 432 decode tokens fit, but nothing near that size was timed.
    small = dataclasses.replace(cal(3500), prefill_points=((16, 0.08), (96, 0.103)))
    assert calibration.step_budget(small, 0.25, "decode") == 192
    assert calibration.step_budget(small, 0.25, "prefill") == 192
    # Timed at 1,024 tokens: the line holds where it was measured.
    big = dataclasses.replace(cal(1200), prefill_points=((16, 0.06), (1024, 0.9)))
    assert calibration.step_budget(big, 0.25, "prefill") == 288


def test_budget_never_under_the_floor() -> None:
    assert calibration.step_budget(cal(10), 0.25, "decode") == calibration.MIN_STEP_TOKENS


def profile(step_budget: str = "auto"):
    p = load_profile("cpu-tiny")
    return dataclasses.replace(p, engine=dataclasses.replace(p.engine, step_budget=step_budget))


def test_apply_sets_each_role_from_its_own_slice() -> None:
    figures = {"k-prefill": cal(1200), "k-decode": cal(600)}
    p, notes = step_budgets.apply(profile(), figures, lambda role: f"k-{role}")
    assert p.role("prefill").max_num_batched_tokens == 288
    assert p.role("decode").max_num_batched_tokens == 64
    # vLLM needs max_num_batched_tokens >= max_num_seqs.
    assert p.role("decode").max_num_seqs == 64
    assert len(notes) == 2 and "600 tokens/s" in notes[1]


def test_apply_without_speeds_keeps_the_default_and_says_so() -> None:
    p, notes = step_budgets.apply(profile(), {}, lambda role: role)
    assert p.role("decode").max_num_batched_tokens == 0
    assert all("next start" in n for n in notes)


def test_apply_off_or_explicit() -> None:
    p0 = profile("default")
    p, notes = step_budgets.apply(p0, {"prefill": cal(1200), "decode": cal(1200)}, str)
    assert p is p0 and notes == []
    p1 = profile()
    p1 = dataclasses.replace(p1, decode=dataclasses.replace(p1.decode, max_num_batched_tokens=512))
    p, _ = step_budgets.apply(p1, {"prefill": cal(1200), "decode": cal(1200)}, str)
    assert p.role("decode").max_num_batched_tokens == 512


def test_speeds_file_round_trip(tmp_path: Path) -> None:
    path = tmp_path / "sub" / "speeds.json"
    key = calibration.machine_key("Some CPU", ["avx2", "fma"], "cores 0 · bfloat16 · m")
    calibration.save_file(path, {key: [cal(900), cal(700)]})
    assert [c.prefill_tps for c in calibration.load_file(path)[key]] == [900, 700]
    path.write_text("{not json")
    assert calibration.load_file(path) == {}


def test_a_file_of_single_figures_reads_as_histories_of_one(tmp_path: Path) -> None:
    path = tmp_path / "speeds.json"
    path.write_text(json.dumps({"k": cal(1100).to_dict()}))
    assert [c.prefill_tps for c in calibration.load_file(path)["k"]] == [1100]


def test_history_keeps_the_last_few_and_budgets_use_the_slowest() -> None:
    history: list = []
    for tps in (3100, 980, 2000, 2500, 2600, 2700, 2800):
        history = calibration.remember(history, cal(tps))
    assert len(history) == calibration.SPEEDS_KEPT
    # 3,100 has left; 980 is still among the last six, and sizes the budget.
    assert calibration.slowest(history).prefill_tps == 980
    history = calibration.remember(history, cal(2900))
    assert calibration.slowest(history).prefill_tps == 2000
