"""Desired against current replicas per role, pins, the last decisions with reasons,
and the health of each worker's KV-event feed (what the prefix scorer believes)."""

from __future__ import annotations

from typing import Any

from rich.console import Group
from rich.table import Table
from rich.text import Text
from textual.widgets import Static

from pdbox.tui import format as fmt

DECISIONS_SHOWN = 4


def render_autoscaler(a: dict[str, Any]) -> Group:
    enabled = a.get("enabled")
    head = Text("autoscaler ")
    head.append("on" if enabled else "off" if enabled is False else fmt.NA,
                style="bold green" if enabled else "bold yellow")
    roles = Table(box=None, padding=(0, 1), show_edge=False, pad_edge=False)
    roles.add_column("role", style="bold", no_wrap=True)
    for name in ("now", "want", "min", "max", "pin"):
        roles.add_column(name, justify="right", no_wrap=True)
    for role, r in (a.get("roles") or {}).items():
        current, desired = r.get("current"), r.get("desired")
        style = "yellow" if fmt.is_num(current) and fmt.is_num(desired) \
            and current != desired else ""
        pinned = r.get("pinned")
        roles.add_row(role, fmt.integer(current), Text(fmt.integer(desired), style=style),
                      fmt.integer(r.get("min")), fmt.integer(r.get("max")),
                      "auto" if pinned is None else str(pinned))
    decisions = Text()
    for d in (a.get("decisions") or [])[-DECISIONS_SHOWN:]:
        decisions.append(f"{fmt.clock(d.get('ts'))} ", style="dim")
        decisions.append(f"{d.get('reason') or ''}\n")
    if not decisions:
        decisions.append("no decisions yet\n", style="dim")
    decisions.rstrip()
    split = render_split(a.get("split"))
    parts = (head, roles, *((split,) if split else ()))
    return Group(*parts, Text(""), Text("last decisions", style="bold"), decisions)


def render_split(s: Any) -> Text | None:
    """The P/D split now, its pin, what a re-split is doing and why the last one moved."""
    if not isinstance(s, dict):
        return None
    out = Text("split ", style="bold")
    out.append(str(s.get("split") or fmt.NA))
    if s.get("pinned"):
        out.append(f" · pinned {s['pinned']}", style="yellow")
    if s.get("phase"):
        out.append(f"\nmoving: {s['phase']}", style="bold magenta")
    elif s.get("held"):
        out.append(f"\nheld: {s['held']}", style="dim")
    if s.get("last_reason"):
        out.append(f"\nlast: {s['last_reason']}", style="dim")
    return out


FEED_STYLE = {"ok": "green", "connecting": "yellow", "silent": "bold yellow",
              "bind error": "bold red"}


def render_kv_feeds(feeds: dict[str, Any]) -> Text:
    """One line per worker: state, last seq, gaps (replayed / cleared), blocks, unapplied."""
    out = Text("kv events", style="bold")
    for wid, f in sorted(feeds.items()):
        state = str(f.get("state") or fmt.NA)
        out.append(f"\n{wid} ")
        out.append(state, style=FEED_STYLE.get(state, ""))
        out.append(f" seq {fmt.integer(f.get('last_seq'))}"
                   f" · {fmt.integer(f.get('blocks'))} blocks", style="dim")
        gaps = f.get("gaps") or 0
        if gaps:
            out.append(f" · gaps {gaps} ({f.get('replays') or 0} replayed, "
                       f"{f.get('clears') or 0} cleared)", style="yellow")
        if f.get("restarts"):
            out.append(f" · restarts {f['restarts']}", style="dim")
        if f.get("unapplied"):
            out.append(f" · {f['unapplied']} unapplied", style="yellow")
    return out


class AutoscalerPanel(Static):
    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._last: Any = None

    def on_mount(self) -> None:
        self.border_title = "Autoscaler"

    def apply(self, autoscaler: dict[str, Any] | None,
              kv_feeds: dict[str, Any] | None = None) -> None:
        autoscaler = autoscaler or {}
        state = (autoscaler, kv_feeds)
        if state == self._last:
            return
        self._last = state
        body = render_autoscaler(autoscaler)
        if kv_feeds:
            body = Group(body, Text(""), render_kv_feeds(kv_feeds))
        self.update(body)
