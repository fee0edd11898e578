"""The pdbox TUI: one status snapshot a second, rendered into five panels, and keys that
send control calls through a `StatusSource`.

Updates stay cheap under load: a single exclusive worker polls and posts
`StatusUpdated`, which coalesces in the message queue; each panel compares its part
of the snapshot with the last one and redraws only when it changed; the workers
table updates single cells.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Any

from rich.text import Text
from textual import on, work
from textual.app import App, ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal
from textual.widgets import ContentSwitcher, DataTable, Footer

from pdbox.config import POLICIES
from pdbox.tui.autoscaler_panel import AutoscalerPanel
from pdbox.tui.chat_pane import ChatPane
from pdbox.tui.confirm_quit import ConfirmQuit
from pdbox.tui.hardware_panel import HardwarePanel
from pdbox.tui.help_screen import HelpScreen
from pdbox.tui.log_panel import LogPanel
from pdbox.tui.messages import ActionDone, LogTail, StatusFailed, StatusUpdated
from pdbox.tui.router_panel import RouterPanel
from pdbox.tui.source import StatusSource
from pdbox.tui.summary_bar import SummaryBar
from pdbox.tui.workers_table import WorkersTable

LOG_LINES = 200


class PdboxApp(App[None]):
    CSS_PATH = "pdbox.tcss"
    TITLE = "pdbox"
    BINDINGS = [
        Binding("plus,equals_sign", "scale(1)", "+1 worker", key_display="+"),
        Binding("minus", "scale(-1)", "-1 worker", key_display="-"),
        Binding("p", "cycle_policy", "policy"),
        Binding("r", "restart", "restart"),
        Binding("c", "chat", "chat"),
        Binding("l", "logs", "logs"),
        Binding("question_mark", "help", "help", key_display="?"),
        Binding("q", "quit_pdbox", "quit"),
        Binding("ctrl+q", "quit_pdbox", "quit", show=False, priority=True),
    ]

    def __init__(self, source: StatusSource, *, owns_server: bool, poll_s: float = 1.0,
                 tail_every_s: float = 2.0, clock: Callable[[], float] = time.monotonic):
        super().__init__()
        self.source = source
        self.owns_server = owns_server
        self.poll_s = poll_s
        self.tail_every_s = tail_every_s
        self.clock = clock
        self.snapshot: dict[str, Any] = {}
        self.error: str | None = None
        self.ticks = 0  # snapshots handled, for tests and for the load measurement
        self._next_tail = 0.0
        # Replica counts asked for but not yet in a snapshot, so that `+ + +` adds three.
        self._asked: dict[str, int] = {}

    # ------------------------------------------------------------------ layout

    def compose(self) -> ComposeResult:
        yield SummaryBar(attached=not self.owns_server, id="summary")
        yield WorkersTable(id="workers")
        with Horizontal(id="panels"):
            yield RouterPanel(id="router")
            yield HardwarePanel(id="hardware")
            yield AutoscalerPanel(id="autoscaler")
        with ContentSwitcher(initial="logs", id="bottom"):
            yield LogPanel(id="logs")
            yield ChatPane(id="chat")
        yield Footer()

    def on_mount(self) -> None:
        # Hold the panels: query_one looks at the active screen, which is a modal while
        # the help or the quit question is shown, and ticks go on behind it.
        self.summary = self.query_one(SummaryBar)
        self.table = self.query_one(WorkersTable)
        self.router_panel = self.query_one(RouterPanel)
        self.hardware_panel = self.query_one(HardwarePanel)
        self.autoscaler_panel = self.query_one(AutoscalerPanel)
        self.log_panel = self.query_one(LogPanel)
        self.chat_pane = self.query_one(ChatPane)
        self.bottom = self.query_one(ContentSwitcher)
        chat = self.chat_pane
        chat.endpoint = getattr(self.source, "chat_url", None)
        chat.model = getattr(self.source, "model", None)
        self.summary.apply({}, "connecting…")
        self.table.focus()
        self.poll()

    async def on_unmount(self) -> None:
        close = getattr(self.source, "close", None)
        if close is not None:
            try:
                await close()
            except Exception:  # closing a dead connection must not hide the real exit
                pass

    # ------------------------------------------------------------------ polling

    @work(exclusive=True, group="poll")
    async def poll(self) -> None:
        """The only place that asks for status. One request at a time: a slow pdbox
        slows the ticks down instead of piling requests onto it."""
        while True:
            try:
                snap = await self.source.status()
            except Exception as exc:  # every source error is a one-sentence message
                self.post_message(StatusFailed(str(exc) or type(exc).__name__))
            else:
                self.post_message(StatusUpdated(snap))
            await asyncio.sleep(self.poll_s)

    def on_status_updated(self, message: StatusUpdated) -> None:
        if not self.table.is_attached:  # a tick that arrives while the app closes
            return
        snap = message.snapshot
        self.snapshot = snap
        self.error = None
        self.ticks += 1
        self.summary.apply(snap)
        table = self.table
        table.apply(snap.get("workers") or [])
        self.router_panel.apply(snap.get("router"))
        self.hardware_panel.apply(snap.get("hardware"))
        self.autoscaler_panel.apply(snap.get("autoscaler"),
                                    (snap.get("router") or {}).get("kv_events"))
        self.log_panel.add_events(snap.get("events") or [])
        chat = self.chat_pane
        if isinstance(snap.get("endpoint"), str):
            chat.endpoint = snap["endpoint"]
        self._forget_reached_asks()
        now = self.clock()
        if now >= self._next_tail and table.selected:
            self._next_tail = now + self.tail_every_s
            self.fetch_tail(table.selected)

    def on_status_failed(self, message: StatusFailed) -> None:
        if not self.summary.is_attached:
            return
        self.error = message.error
        self.summary.apply(self.snapshot, message.error)

    @work(exclusive=True, group="tail")
    async def fetch_tail(self, worker_id: str) -> None:
        try:
            lines = await self.source.logs(worker_id, LOG_LINES)
        except Exception as exc:
            lines = [f"(cannot read the log of {worker_id}: {exc})"]
        self.post_message(LogTail(worker_id, lines))

    def on_log_tail(self, message: LogTail) -> None:
        if message.worker_id == self.table.selected:
            self.log_panel.show_tail(message.worker_id, message.lines)

    @on(DataTable.RowHighlighted, "#workers")
    def _selected(self, event: DataTable.RowHighlighted) -> None:
        if event.row_key is not None and event.row_key.value:
            self._next_tail = self.clock() + self.tail_every_s
            self.fetch_tail(str(event.row_key.value))

    # ------------------------------------------------------------------ control calls

    def control(self, what: str, call: Callable[[], Awaitable[Any]],
                then: Callable[[], None] | None = None) -> None:
        """Run one control call off the UI path and report how it went."""

        async def run() -> None:
            try:
                await call()
            except Exception as exc:
                self.post_message(ActionDone(f"{what} failed: {exc}", ok=False))
            else:
                if then is not None:
                    then()
                self.post_message(ActionDone(what, ok=True))

        self.run_worker(run(), group="control")

    def on_action_done(self, message: ActionDone) -> None:
        self.notify(message.text, severity="information" if message.ok else "error",
                    timeout=4 if message.ok else 8)
        self.log_panel.add_events(
            [{"ts": time.time(), "kind": "tui" if message.ok else "error",
              "message": message.text}])

    def _role_count(self, role: str) -> int:
        """What `+`/`-` count from: a pending ask, else the role's pin, else its current."""
        if role in self._asked:
            return self._asked[role]
        info = ((self.snapshot.get("autoscaler") or {}).get("roles") or {}).get(role) or {}
        if isinstance(info.get("pinned"), int):
            return info["pinned"]
        if isinstance(info.get("current"), int):
            return info["current"]
        return sum(1 for w in self.snapshot.get("workers") or [] if w.get("role") == role)

    def _forget_reached_asks(self) -> None:
        roles = (self.snapshot.get("autoscaler") or {}).get("roles") or {}
        for role, asked in list(self._asked.items()):
            info = roles.get(role) or {}
            if info.get("pinned") == asked:
                del self._asked[role]

    def action_scale(self, delta: int) -> None:
        table = self.table
        role = table.roles.get(table.selected or "")
        if not role:
            self.notify("select a worker first: + and - scale its role", severity="warning")
            return
        target = self._role_count(role) + delta
        if target < 0:
            self.notify(f"{role} has no worker to remove", severity="warning")
            return

        def remember() -> None:
            self._asked[role] = target

        self.control(f"scale {role} to {target}", lambda: self.source.scale(role, target),
                     remember)

    def action_cycle_policy(self) -> None:
        current = self.snapshot.get("policy")
        nxt = POLICIES[(POLICIES.index(current) + 1) % len(POLICIES)] \
            if current in POLICIES else POLICIES[0]

        def remember() -> None:
            self.snapshot["policy"] = nxt
            self.summary.apply(self.snapshot)

        self.control(f"policy {nxt}", lambda: self.source.set_policy(nxt), remember)

    def action_restart(self) -> None:
        wid = self.table.selected
        if not wid:
            self.notify("select a worker first", severity="warning")
            return
        self.control(f"restart {wid}", lambda: self.source.restart(wid))

    def action_chat(self) -> None:
        self.bottom.current = "chat"
        self.chat_pane.focus_input()

    def action_logs(self) -> None:
        self.bottom.current = "logs"
        self.action_focus_workers()

    def action_focus_workers(self) -> None:
        self.table.focus()

    def action_help(self) -> None:
        self.push_screen(HelpScreen())

    def action_quit_pdbox(self) -> None:
        if isinstance(self.screen, ConfirmQuit):
            return
        question = ("Stop pdbox and every worker it started?" if self.owns_server
                    else "Detach from pdbox? It keeps running.")
        self.push_screen(ConfirmQuit(question), self._quit_answered)

    def _quit_answered(self, yes: bool | None) -> None:
        if not yes:
            return
        if not self.owns_server:
            self.exit()
            return
        self.summary.update(Text(" stopping pdbox…", style="bold yellow"))
        self.run_worker(self._shutdown_and_exit(), group="control")

    async def _shutdown_and_exit(self) -> None:
        try:
            await self.source.shutdown()
        except Exception as exc:
            self.notify(f"shutdown failed: {exc}", severity="error")
            await asyncio.sleep(2)
        self.exit()


def run_tui(source: StatusSource, *, owns_server: bool) -> None:
    """Show the TUI until the operator quits. With `owns_server`, quitting stops pdbox
    (through `source.shutdown()`); without it, quitting only detaches."""
    PdboxApp(source, owns_server=owns_server).run()
