"""The key help (`?`)."""

from __future__ import annotations

from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Vertical
from textual.screen import ModalScreen
from textual.widgets import Static

KEYS = """\
[b]+[/b] / [b]-[/b]   add / remove a worker of the selected worker's role (pins the role)
[b]p[/b]       cycle the routing policy: prefix → least_loaded → round_robin
[b]r[/b]       restart the selected worker
[b]c[/b]       chat with the endpoint (Esc returns to the workers)
[b]l[/b]       show the events and the selected worker's log
[b]↑[/b] / [b]↓[/b]   select a worker
[b]?[/b]       this help
[b]q[/b]       quit (asks first)"""


class HelpScreen(ModalScreen[None]):
    BINDINGS = [Binding("escape,question_mark,q", "close", "close")]

    def compose(self) -> ComposeResult:
        with Vertical(id="dialog"):
            yield Static("[b]pdbox keys[/b]\n\n" + KEYS, id="help-text")

    def action_close(self) -> None:
        self.dismiss(None)
