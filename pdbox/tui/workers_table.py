"""One row per worker. Each tick updates only the cells that changed: rebuilding the
table would reset the cursor and cost a full relayout every second."""

from __future__ import annotations

import math
from typing import Any

from rich.text import Text
from textual.coordinate import Coordinate
from textual.widgets import DataTable

from pdbox.tui import format as fmt

COLUMNS = (
    ("id", "worker"), ("role", "role"), ("state", "state"), ("pid", "pid"),
    ("port", "port"), ("slice", "slice"), ("queue", "queue"), ("running", "run"),
    ("kv", "KV use"), ("prefix", "prefix hit"), ("restarts", "restarts"),
)
STATE_STYLE = {
    "ready": "bold green", "starting": "yellow", "warming": "yellow",
    "unresponsive": "bold yellow", "draining": "magenta", "restarting": "magenta",
    "backoff": "bold red", "failed": "bold red", "stopped": "dim",
}


def state_text(w: dict[str, Any]) -> str:
    """The state, with the back-off (failures in a row, next try in N s) while a
    worker waits to start again, and how long an unresponsive one has been silent."""
    state = str(w.get("state") or fmt.NA)
    nxt = w.get("next_try_in_s")
    if state in ("restarting", "backoff") and isinstance(nxt, int | float):
        return f"{state} ×{w.get('failures') or 1} · next {math.ceil(nxt)}s"
    silent = w.get("silent_s")
    if state == "unresponsive" and isinstance(silent, int | float):
        return f"{state} {silent:.0f}s"
    return state


def cells(w: dict[str, Any]) -> tuple[Any, ...]:
    state = str(w.get("state") or fmt.NA)
    return (
        str(w.get("id", "?")),
        fmt.role_mix(w),
        Text(state_text(w), style=STATE_STYLE.get(state, ""), justify="left"),
        fmt.integer(w.get("pid")),
        fmt.integer(w.get("port")),
        fmt.worker_slice(w),
        fmt.integer(w.get("queue")),
        fmt.integer(w.get("running")),
        fmt.pct(w.get("kv_usage")),
        fmt.pct(w.get("prefix_hit_rate")),
        fmt.integer(w.get("restarts")),
    )


class WorkersTable(DataTable):
    def __init__(self, **kwargs: Any) -> None:
        super().__init__(cursor_type="row", zebra_stripes=True, **kwargs)
        self._shown: dict[str, tuple[Any, ...]] = {}
        self.roles: dict[str, str] = {}

    def on_mount(self) -> None:
        for key, label in COLUMNS:
            self.add_column(label, key=key)
        self.border_title = "Workers"

    def apply(self, workers: list[dict[str, Any]]) -> None:
        seen = set()
        for w in workers:
            row = cells(w)
            wid = row[0]
            seen.add(wid)
            self.roles[wid] = str(w.get("role") or "")
            old = self._shown.get(wid)
            if old is None:
                self.add_row(*row, key=wid)
            else:
                for (col, _), before, now in zip(COLUMNS, old, row, strict=True):
                    if before != now:
                        self.update_cell(wid, col, now, update_width=True)
            self._shown[wid] = row
        for wid in list(self._shown):
            if wid not in seen:
                self.remove_row(wid)
                del self._shown[wid]
                self.roles.pop(wid, None)

    @property
    def selected(self) -> str | None:
        """The id of the worker under the cursor."""
        if self.row_count == 0:
            return None
        row = min(self.cursor_row, self.row_count - 1)
        key = self.coordinate_to_cell_key(Coordinate(row, 0)).row_key.value
        return str(key) if key is not None else None
