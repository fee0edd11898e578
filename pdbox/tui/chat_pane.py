"""A chat pane inside the TUI: the same streaming code as `pdbox chat`, so an operator
can send a request and watch the panels react to it."""

from __future__ import annotations

import os
from typing import Any

from rich.text import Text
from textual import work
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Vertical, VerticalScroll
from textual.widgets import Input, Static

from pdbox.chat import ChatError, Conversation, TurnStats, list_models, stream_chat
from pdbox.tui import format as fmt


def stats_line(s: TurnStats) -> str:
    pd = s.pd or fmt.NA
    return (f"TTFT {fmt.seconds(s.ttft_s)} · {fmt.num(s.tokens_per_s)} tok/s · "
            f"decode {s.decode_worker or fmt.NA} · P/D {pd} · "
            f"cached {fmt.integer(s.cached_tokens)}")


class ChatPane(Vertical):
    BINDINGS = [Binding("escape", "leave", "back", show=True)]

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.endpoint: str | None = None
        self.model: str | None = None
        self.conversation = Conversation()
        self.transcript = Text()
        self.busy = False

    def compose(self) -> ComposeResult:
        with VerticalScroll(id="chat-scroll"):
            yield Static(Text("Type a message and press Enter. Esc goes back.", style="dim"),
                         id="chat-text")
        yield Input(placeholder="message (/reset clears the conversation)", id="chat-input")

    def on_mount(self) -> None:
        self.border_title = "Chat"

    def focus_input(self) -> None:
        self.query_one("#chat-input", Input).focus()

    def action_leave(self) -> None:
        self.app.action_focus_workers()  # type: ignore[attr-defined]

    def _show(self) -> None:
        self.query_one("#chat-text", Static).update(self.transcript)
        self.query_one("#chat-scroll", VerticalScroll).scroll_end(animate=False)

    def on_input_submitted(self, event: Input.Submitted) -> None:
        text = event.value.strip()
        event.input.value = ""
        if not text:
            return
        if text == "/reset":
            self.conversation.reset()
            self.transcript = Text("(conversation cleared)\n", style="dim")
            self._show()
            return
        if self.busy:
            self.app.notify("wait for the current answer to finish", severity="warning")
            return
        if not self.endpoint:
            self.app.notify("the endpoint is not known yet", severity="warning")
            return
        self.ask(text)

    @work(exclusive=True, group="chat")
    async def ask(self, text: str) -> None:
        self.busy = True
        self.transcript.append(f"\nyou: {text}\n", style="bold")
        self._show()
        api_key = os.environ.get("PDBOX_API_KEY")

        def on_delta(piece: str) -> None:
            self.transcript.append(piece)
            self._show()

        try:
            assert self.endpoint is not None
            if not self.model:
                models = await list_models(self.endpoint, api_key=api_key)
                if not models:
                    raise ChatError("the endpoint lists no model.")
                self.model = models[0]
            turn = await stream_chat(self.endpoint, self.model,
                                     self.conversation.messages(text), on_delta=on_delta,
                                     api_key=api_key)
        except ChatError as exc:
            self.transcript.append(f"\nerror: {exc}\n", style="red")
        else:
            self.conversation.add(text, turn.answer)
            self.transcript.append(f"\n{stats_line(turn.stats)}\n", style="dim")
        finally:
            self.busy = False
            self._show()
