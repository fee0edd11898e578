"""pdbox's own events beside the tail of the selected worker's log."""

from __future__ import annotations

from collections import deque
from typing import Any

from rich.text import Text
from textual.app import ComposeResult
from textual.containers import Horizontal
from textual.widgets import RichLog

from pdbox.tui import format as fmt

KIND_STYLE = {"error": "bold red", "scale": "cyan", "worker": "green", "policy": "magenta",
              "tui": "blue", "kv": "yellow"}
SEEN_MAX = 2000


class LogPanel(Horizontal):
    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._seen: set[tuple[Any, ...]] = set()
        self._order: deque[tuple[Any, ...]] = deque()
        self.tail_worker: str | None = None
        self._tail: list[str] = []

    def compose(self) -> ComposeResult:
        events = RichLog(id="events", max_lines=1000, wrap=True)
        events.border_title = "Events"
        tail = RichLog(id="tail", max_lines=1000)
        tail.border_title = "Worker log"
        yield events
        yield tail

    def add_events(self, events: list[dict[str, Any]]) -> None:
        """Append the events not shown yet; the snapshot repeats the recent ones each tick."""
        log = self.query_one("#events", RichLog)
        for e in events:
            key = (e.get("ts"), e.get("kind"), e.get("message"))
            if key in self._seen:
                continue
            self._seen.add(key)
            self._order.append(key)
            if len(self._order) > SEEN_MAX:
                self._seen.discard(self._order.popleft())
            kind = str(e.get("kind") or "")
            line = Text(f"{fmt.clock(e.get('ts'))} ", style="dim")
            line.append(f"{kind:<7}", style=KIND_STYLE.get(kind, ""))
            line.append(str(e.get("message") or ""))
            log.write(line)

    def show_tail(self, worker_id: str, lines: list[str]) -> None:
        if worker_id == self.tail_worker and lines == self._tail:
            return
        log = self.query_one("#tail", RichLog)
        log.border_title = f"Worker log · {worker_id}"
        log.clear()
        for line in lines:
            log.write(Text(line))
        self.tail_worker = worker_id
        self._tail = list(lines)
