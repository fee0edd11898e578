"""The top line: which pdbox this is, its policy and endpoint, or why it can't be reached."""

from __future__ import annotations

from typing import Any

from rich.text import Text
from textual.widgets import Static

from pdbox.tui import format as fmt


def render_summary(snap: dict[str, Any], *, attached: bool, error: str | None) -> Text:
    line = Text()
    line.append(f" pdbox {snap.get('version') or ''} ", style="bold reverse")
    line.append(f" {snap.get('profile') or fmt.NA} · {snap.get('mode') or fmt.NA} · ")
    line.append("policy ")
    line.append(str(snap.get("policy") or fmt.NA), style="bold magenta")
    line.append(f" · {snap.get('endpoint') or fmt.NA} · up {fmt.duration(snap.get('uptime_s'))}")
    if attached:
        line.append(" · attached", style="dim")
    if snap.get("serving"):
        # e.g. "aggregated until prefill-0 is ready": pdbox serves before every worker is.
        line.append(f" · serving ({snap['serving']})", style="bold yellow")
    if error:
        line.append(f"  ✖ {error}", style="bold red")
    return line


class SummaryBar(Static):
    def __init__(self, *, attached: bool, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.attached = attached
        self._last: Any = None

    def apply(self, snap: dict[str, Any], error: str | None = None) -> None:
        key = (snap.get("version"), snap.get("profile"), snap.get("mode"), snap.get("policy"),
               snap.get("endpoint"), fmt.duration(snap.get("uptime_s")), snap.get("serving"),
               error)
        if key == self._last:
            return
        self._last = key
        self.update(render_summary(snap, attached=self.attached, error=error))
