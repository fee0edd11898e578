"""The main screen as an SVG snapshot (Textual is pinned in pyproject, so the rendering is
stable). Update with: pytest tests/tui/test_snapshot.py --snapshot-update"""

from __future__ import annotations

import time
from typing import Any

import pytest
from tui_fakes import FakeSource, busy_snapshot

from pdbox.tui.app import PdboxApp


@pytest.fixture(autouse=True)
def utc(monkeypatch: pytest.MonkeyPatch) -> None:
    # Event times are shown in local time; pin the zone so the snapshot is the same anywhere.
    monkeypatch.setenv("TZ", "UTC")
    time.tzset()


async def first_tick(pilot: Any) -> None:
    app = pilot.app
    for _ in range(200):
        if app.ticks >= 1 and app.log_panel.tail_worker:
            break
        await pilot.pause(0.02)
    await pilot.pause()


def test_main_screen(snap_compare: Any) -> None:
    app = PdboxApp(FakeSource(busy_snapshot()), owns_server=True, poll_s=0.05)
    assert snap_compare(app, terminal_size=(160, 48), run_before=first_tick)


def test_quit_dialog(snap_compare: Any) -> None:
    app = PdboxApp(FakeSource(busy_snapshot()), owns_server=False, poll_s=0.05)

    async def ask_to_quit(pilot: Any) -> None:
        await first_tick(pilot)
        await pilot.press("q")
        await pilot.pause()

    assert snap_compare(app, terminal_size=(160, 48), run_before=ask_to_quit)
