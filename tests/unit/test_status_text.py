"""`pdbox status` text: a worker's state cell says how long a back-off or silence lasts."""

from __future__ import annotations

from pdbox.commands.status import _state


def test_backoff_and_unresponsive_show_their_time() -> None:
    assert _state({"state": "backoff", "next_try_in_s": 3.6}) == "backoff (next 4s)"
    assert _state({"state": "unresponsive", "silent_s": 5.2}) == "unresponsive 5s"
    assert _state({"state": "ready", "next_try_in_s": None}) == "ready"
    assert len(_state({"state": "backoff", "next_try_in_s": 600})) <= 20
