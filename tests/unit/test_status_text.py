"""`pdbox status` prints the live figures, engine-side ones included; the TUI picks the
engine figures it shows from the same snapshot."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tui"))
from tui_fakes import busy_snapshot  # noqa: E402

from pdbox.commands import status as status_cmd  # noqa: E402
from pdbox.tui import format as fmt  # noqa: E402


class FakeClient:
    def __init__(self, snap: dict[str, Any]) -> None:
        self.snap = snap

    def sync_status(self) -> dict[str, Any]:
        return self.snap


def test_status_prints_tokens_and_engine_figures(monkeypatch: pytest.MonkeyPatch) -> None:
    snap = busy_snapshot()
    snap["router"].update(rate_window_s=10.0, output_tokens_total=4242)
    monkeypatch.setattr(status_cmd, "_client", lambda: FakeClient(snap))
    out = CliRunner().invoke(status_cmd.status, [])
    assert out.exit_code == 0, out.output
    assert "tokens/s 128.3 (last 10s)  output tokens 4242" in out.output
    assert "engine prefill    TTFT p50 0.14s" in out.output
    assert "engine decode     TTFT p50 0.03s  ITL p50 41ms" in out.output


def test_engine_view_takes_ttft_from_the_first_token_role() -> None:
    snap = busy_snapshot()["router"]["engine"]
    assert fmt.engine_view(snap) == {"ttft_p50_s": 0.142, "itl_p50_s": 0.041,
                                     "queue_mean_s": 0.012, "prefill_mean_s": 0.118}
    aggregated = {"roles": {"aggregated": {"ttft_p50_s": 0.2, "itl_p50_s": 0.05}}}
    assert fmt.engine_view(aggregated)["ttft_p50_s"] == 0.2
    assert fmt.engine_view(None) == dict.fromkeys(
        ("ttft_p50_s", "itl_p50_s", "queue_mean_s", "prefill_mean_s"))
