"""Router figures: rates, latencies, P/D share, NIXL transfers, sparklines, decisions."""

from __future__ import annotations

from typing import Any

from rich.console import Group
from rich.table import Table
from rich.text import Text
from textual.widgets import Static

from pdbox.tui import format as fmt

SPARK_WIDTH = 36
DECISIONS_SHOWN = 4


def render_router(r: dict[str, Any]) -> Group:
    figures = Table.grid(padding=(0, 2))
    figures.add_column(style="bold")
    figures.add_column()
    figures.add_column(style="bold")
    figures.add_column()
    remote, local = r.get("pd_remote"), r.get("pd_local")
    figures.add_row("req/s", fmt.num(r.get("rps")),
                    "tokens/s", fmt.num(r.get("tokens_per_s")))
    figures.add_row("TTFT p50", fmt.seconds(r.get("ttft_p50_s")),
                    "p99", fmt.seconds(r.get("ttft_p99_s")))
    figures.add_row("ITL p50", fmt.seconds(r.get("itl_p50_s")),
                    "p99", fmt.seconds(r.get("itl_p99_s")))
    # vLLM's own view of the same requests (its histograms, per scrape): where the
    # router's TTFT went, into the engine's queue or its prefill.
    eng = fmt.engine_view(r.get("engine"))
    figures.add_row("engine TTFT", fmt.seconds(eng["ttft_p50_s"]),
                    "ITL", fmt.seconds(eng["itl_p50_s"]))
    figures.add_row("engine queue", fmt.seconds(eng["queue_mean_s"]),
                    "prefill", fmt.seconds(eng["prefill_mean_s"]))
    figures.add_row("P/D", f"{fmt.pct(r.get('pd_share'))} "
                    f"({fmt.integer(remote)} P/D · {fmt.integer(local)} local)",
                    "fallbacks", fmt.integer(r.get("fallbacks")))
    figures.add_row("NIXL", f"{fmt.num(r.get('nixl_xfer_ms'), '.1f', ' ms')} · "
                    f"{fmt.num(r.get('nixl_mb_per_s'), '.0f', ' MB/s')}",
                    "429s", fmt.integer(r.get("rejected_429")))
    # Streams moved between workers: by KV off a live worker (flowing decode), and
    # by recompute after a worker died or froze.
    mig = r.get("migrations") or {}
    flows = mig.get("flows") or {}
    figures.add_row("requests", fmt.integer(r.get("requests_total")),
                    "moves", f"{fmt.integer(flows.get('kv'))} by KV · "
                    f"{fmt.integer(mig.get('moved'))} after faults")

    history = r.get("history") or {}
    sparks = Table.grid(padding=(0, 1))
    sparks.add_column(style="dim")
    sparks.add_column(style="cyan")
    for label, key in (("req/s", "rps"), ("tok/s", "tokens_per_s"), ("TTFT", "ttft_p50_s")):
        sparks.add_row(label, fmt.sparkline(history.get(key) or [], SPARK_WIDTH))

    decisions = Text()
    for d in (r.get("last_decisions") or [])[-DECISIONS_SHOWN:]:
        pd = str(d.get("pd") or fmt.NA)
        where = str(d.get("decode") or fmt.NA)
        if pd == "remote" and d.get("prefill"):
            where = f"{d['prefill']}→{where}"
        decisions.append(f"{pd:<6} ", style="magenta" if pd == "remote" else "green")
        decisions.append(f"{where}  ")
        decisions.append(f"{d.get('reason') or ''}\n", style="dim")
    if not decisions:
        decisions.append("no requests yet\n", style="dim")
    decisions.rstrip()
    return Group(figures, Text(""), sparks, Text("last P/D decisions", style="bold"), decisions)


class RouterPanel(Static):
    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._last: Any = None

    def on_mount(self) -> None:
        self.border_title = "Router"

    def apply(self, router: dict[str, Any] | None) -> None:
        router = router or {}
        if router == self._last:
            return
        self._last = router
        self.update(render_router(router))
