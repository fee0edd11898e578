"""The workers table's state cell: the back-off and a freeze, as the status shows them."""

from __future__ import annotations

from pdbox.tui.workers_table import cells, state_text


def test_a_worker_in_back_off_shows_its_failures_and_next_try() -> None:
    w = {"id": "decode-0", "state": "backoff", "failures": 3, "next_try_in_s": 3.2}
    assert state_text(w) == "backoff ×3 · next 4s"
    assert str(cells(w)[2]) == "backoff ×3 · next 4s"
    assert cells(w)[2].style == "bold red"


def test_a_first_restart_and_a_frozen_worker() -> None:
    assert state_text({"state": "restarting", "failures": 1, "next_try_in_s": 0.4}) == \
        "restarting ×1 · next 1s"
    assert state_text({"state": "unresponsive", "silent_s": 4.6}) == "unresponsive 5s"
    assert state_text({"state": "restarting", "next_try_in_s": None}) == "restarting"
    assert state_text({"state": "ready", "failures": 0}) == "ready"
