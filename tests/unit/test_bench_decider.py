"""`pdbox bench decider`: its table, its goals and its bad input (no box started)."""

from __future__ import annotations

import pytest
from click.testing import CliRunner

from pdbox.bench import decider
from pdbox.cli import main


def result(gap: float, ttft: float) -> dict:
    rounds = [{"ttft_s": ttft, "path": "remote", "decode": "decode-0", "prefill": "prefill-0",
               "reason": "", "worst_gap_s": gap, "homes": []},
              {"ttft_s": ttft + 0.2, "path": "local", "decode": "decode-0", "prefill": "",
               "reason": "", "worst_gap_s": gap / 2, "homes": []}]
    return {"itl_target_s": 0.25, "lengths": {"900": {
        "alone_local_s": [0.6, 0.7, 0.65], "alone_remote_s": [0.8, 0.9],
        "under_streams": rounds}}}


def test_rows_compare_with_the_better_path_alone() -> None:
    w = decider.DeciderWorkload(decider.Params())
    (row,) = w.rows("hybrid", result(0.3, 0.8))
    f = row.figures
    assert row.group == "900 tokens"
    assert f["ttft_local_s"] == 0.65 and f["ttft_remote_s"] == pytest.approx(0.85)
    assert f["ttft_streams_s"] == 0.9 and abs(f["ttft_ratio"] - 0.9 / 0.65) < 1e-9
    assert f["worst_gap_s"] == 0.3
    assert f["paths"] == "remote:prefill-0>decode-0 local:->decode-0"


def test_goals_are_the_issue_s() -> None:
    ok = decider.goals([{"label": "a", "result": result(0.3, 0.7)}])[0]
    assert ok["gap_met"] and ok["ttft_met"] and ok["gap_goal_s"] == 0.5
    bad = decider.goals([{"label": "a", "result": result(0.6, 1.5)}])[0]
    assert not bad["gap_met"] and not bad["ttft_met"] and bad["ttft_ratio"] == 2.46  # median 1.6 s / 0.65 s


def test_bad_input_is_one_sentence() -> None:
    r = CliRunner().invoke(main, ["bench", "decider", "--lengths", "900,x"])
    assert r.exit_code == 2 and "whole numbers of tokens" in r.output
    r = CliRunner().invoke(main, ["bench", "decider", "--profile", "cpu-aggregated"])
    assert r.exit_code == 2 and "needs a P/D profile" in r.output
    assert "Traceback" not in r.output
