"""The back-off, crash-loop, fatal and freeze rules, as pure functions."""

from __future__ import annotations

import pytest

from pdbox.workers.restart_policy import (
    DEFAULT_START_S,
    Backoff,
    Freeze,
    crash_looping,
    ended_on_its_own,
)


def test_the_ceiling_is_the_measured_start_up_within_bounds() -> None:
    b = Backoff()
    assert b.ceiling(None) == DEFAULT_START_S
    assert b.ceiling(42.0) == 42.0
    assert b.ceiling(2.0) == b.min_cap_s  # a fast start still waits a little
    assert b.ceiling(3600.0) == b.max_cap_s
    assert Backoff(cap_s=30.0).ceiling(600.0) == 30.0  # a fixed ceiling wins


def test_the_delay_doubles_from_one_second_to_the_ceiling() -> None:
    b = Backoff()
    assert [b.delay(n, 40.0) for n in range(1, 9)] == [1, 2, 4, 8, 16, 32, 40, 40]


def test_a_stable_period_forgives() -> None:
    b = Backoff(stable_s=60.0)
    assert not b.forgiven(None, 100.0)
    assert not b.forgiven(50.0, 109.9)
    assert b.forgiven(50.0, 110.0)


def test_only_a_configuration_error_is_fatal() -> None:
    b = Backoff(max_start_failures=3)
    assert b.fatal(ever_ready=False, role_ever_ready=False, own_failures=3)
    assert not b.fatal(ever_ready=False, role_ever_ready=False, own_failures=2)
    assert not b.fatal(ever_ready=True, role_ever_ready=True, own_failures=3)
    assert not b.fatal(ever_ready=False, role_ever_ready=True, own_failures=9)


def test_crash_loop_and_how_it_ended() -> None:
    assert not crash_looping(1) and crash_looping(2)
    assert ended_on_its_own(1, False) and ended_on_its_own(0, False)
    assert not ended_on_its_own(-9, False)  # SIGKILL from outside: chaos, the OOM killer
    assert ended_on_its_own(-9, True)  # our own start-timeout kill


def test_the_probe_timeout_and_the_detection_bound() -> None:
    f = Freeze(itl_s=0.25, multiple=4.0, floor_s=1.0, misses=2)
    assert f.probe_timeout_s(0.062) == pytest.approx(1.248)
    assert f.probe_timeout_s(None) == 1.0
    assert Freeze(itl_s=0.05).probe_timeout_s(0.02) == 1.0  # floor on a fast GPU slice
    # up to one interval (the timeout) before the first probe, two timeouts, a tick
    assert f.detect_bound_s(0.062, interval_s=2.0, tick_s=0.5) == pytest.approx(
        3 * 1.248 + 0.5)
