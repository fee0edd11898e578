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


def test_pdbox_status_prints_the_split_and_each_workers_role_mix(monkeypatch) -> None:
    import sys
    from pathlib import Path

    from click.testing import CliRunner

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tui"))
    from tui_fakes import busy_snapshot

    from pdbox.commands import status as status_cmd

    snap = busy_snapshot()
    snap["router"]["soft_roles"] = {
        "enabled": True, "window_s": 300.0,
        "role_mix": {"prefill-0": {"whole": 0.4, "prefill": 0.6, "decode": 0.0, "requests": 10}},
        "split": {"whole": 0.4, "prefill": 0.3, "decode": 0.3}}
    snap.setdefault("autoscaler", {})["split"] = {
        "split": "prefill cores 0 / decode cores 1", "pinned": "0/1", "phase": None}

    class Client:
        def sync_status(self) -> dict:
            return snap

    monkeypatch.setattr(status_cmd, "_client", lambda: Client())
    out = CliRunner().invoke(status_cmd.status, [])
    assert out.exit_code == 0, out.output
    assert "split prefill cores 0 / decode cores 1  pinned 0/1" in out.output
    assert "soft roles on  legs: whole 40% prefill 30% decode 30% (last 300s)" in out.output
    assert "prefill-0         10 requests  whole   40%  prefill leg   60%" in out.output
