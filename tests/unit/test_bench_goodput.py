"""Goodput at the SLOs, and the bisection that finds the load a setup can take."""

from __future__ import annotations

import pytest

from pdbox.bench.goodput import Outcome, SpeedSearch, summarize, tpot


def test_good_needs_ok_and_both_slos() -> None:
    assert Outcome("ok", 1.0, 0.1).good(3.0, 0.25)
    assert Outcome("ok", 3.0, 0.25).good(3.0, 0.25)  # on the line counts
    assert not Outcome("ok", 3.1, 0.1).good(3.0, 0.25)
    assert not Outcome("ok", 1.0, 0.3).good(3.0, 0.25)
    assert Outcome("ok", 1.0, None).good(3.0, 0.25)  # a one-token answer has no TPOT
    assert not Outcome("timeout", 1.0, 0.1).good(3.0, 0.25)
    assert not Outcome("refused").good(3.0, 0.25)


def test_tpot_is_the_mean_gap_after_the_first_token() -> None:
    assert tpot(1.0, 2.0, 11) == pytest.approx(0.1)
    assert tpot(1.0, 1.0, 1) is None
    assert tpot(None, 2.0, 5) is None


def test_summary_counts_goodput_over_the_wall_time() -> None:
    outcomes = [
        Outcome("ok", 0.5, 0.05, 10),
        Outcome("ok", 0.7, 0.10, 10),
        Outcome("ok", 4.0, 0.05, 10),  # TTFT over
        Outcome("ok", 1.0, 0.40, 10),  # TPOT over
        Outcome("refused"),
        Outcome("error", 0.2, None, 3, "reset"),
        Outcome("timeout", 2.0, None, 4),
    ]
    s = summarize(outcomes, wall_s=10.0, ttft_slo_s=3.0, itl_slo_s=0.25)
    assert (s["sent"], s["ok"], s["good"]) == (7, 4, 2)
    assert (s["refused_429"], s["errors"], s["timeouts"]) == (1, 1, 1)
    assert s["goodput_rps"] == pytest.approx(0.2)
    assert s["slo_attainment"] == pytest.approx(2 / 7, abs=1e-4)
    assert s["output_tokens"] == 47  # partial answers count what came
    assert s["output_tokens_per_s"] == pytest.approx(4.7)
    # Percentiles over the answered requests only (nearest rank).
    assert s["ttft_p50_s"] == 0.7 and s["ttft_p99_s"] == 4.0
    assert s["tpot_p50_s"] == 0.05 and s["tpot_p90_s"] == 0.4


def test_summary_of_nothing() -> None:
    s = summarize([], wall_s=0.0, ttft_slo_s=3.0, itl_slo_s=0.25)
    assert s["sent"] == 0 and s["slo_attainment"] is None and s["goodput_rps"] is None
    assert s["ttft_p50_s"] is None


def _search(capacity: float, **kw: float) -> SpeedSearch:
    """Attainment 1 below `capacity`, 0.5 above: the search must close in on it."""
    s = SpeedSearch(0.9, **kw)
    while (speed := s.next()) is not None:
        s.record(speed, 1.0 if speed <= capacity else 0.5)
    return s


def test_search_steps_up_then_bisects() -> None:
    s = _search(3.0, start=1.0, max_probes=8)
    speeds = [p for p, _ in s.probes]
    assert speeds[:3] == [1.0, 2.0, 4.0]  # up by ×2 until it misses
    r = s.result()
    assert r["met"] and 2.0 <= r["speed"] <= 3.0
    assert len(s.probes) <= 8


def test_search_steps_down_when_the_start_misses() -> None:
    s = _search(0.3, start=1.0, max_probes=6)
    assert [p for p, _ in s.probes][:3] == [1.0, 0.5, 0.25]
    assert s.result()["met"] and s.result()["speed"] <= 0.3


def test_search_is_bounded_and_reports_when_nothing_met() -> None:
    s = _search(0.0, start=1.0, max_probes=3)
    assert len(s.probes) == 3
    r = s.result()
    assert not r["met"] and r["speed"] == 0.25


def test_search_stops_when_the_gap_is_small() -> None:
    s = SpeedSearch(0.9, start=1.0, max_probes=20, tolerance=0.1)
    s.record(1.0, 0.95)
    s.record(1.05, 0.5)
    assert s.next() is None


def test_search_rejects_nonsense() -> None:
    with pytest.raises(ValueError):
        SpeedSearch(1.5, start=1.0)
    with pytest.raises(ValueError):
        SpeedSearch(0.9, start=0.0)
