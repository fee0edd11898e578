"""How soft roles and the split read in the TUI (workers table, autoscaler panel)."""

from __future__ import annotations

from pdbox.tui import format as fmt
from pdbox.tui.autoscaler_panel import render_split


def test_role_cell_shows_the_effective_mix_once_the_worker_served() -> None:
    assert fmt.role_mix({"role": "prefill"}) == "prefill"
    assert fmt.role_mix({"role": "prefill", "role_mix": {"requests": 0}}) == "prefill"
    row = {"role": "prefill",
           "role_mix": {"whole": 0.4, "prefill": 0.6, "decode": 0.0, "requests": 10}}
    assert fmt.role_mix(row) == "prefill w40·p60·d0"


def test_split_line_says_pin_phase_and_why_it_moved() -> None:
    assert render_split(None) is None
    text = render_split({"split": "prefill cores 1 / decode cores 0", "pinned": "1/0",
                         "phase": "decode: starting decode-1", "held": None,
                         "last_reason": "re-split: prefill cores 0→1 (pinned to 1/0)"})
    assert text is not None
    plain = text.plain
    assert "split prefill cores 1 / decode cores 0 · pinned 1/0" in plain
    assert "moving: decode: starting decode-1" in plain
    assert "last: re-split: prefill cores 0→1" in plain
