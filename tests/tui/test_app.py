"""The TUI under Textual's pilot against a fake status source: it renders, each key sends
the right control call, missing figures read N/A, and ticks coalesce."""

from __future__ import annotations

import io
import json
from typing import Any

import pytest
from aiohttp import web
from rich.console import Console
from textual.widgets import ContentSwitcher, Input
from tui_fakes import FakeSource, busy_snapshot, gpu_snapshot_with_gaps

from pdbox.tui.app import PdboxApp
from pdbox.tui.chat_pane import ChatPane
from pdbox.tui.confirm_quit import ConfirmQuit
from pdbox.tui.hardware_panel import HardwarePanel, render_hardware
from pdbox.tui.help_screen import HelpScreen
from pdbox.tui.log_panel import LogPanel
from pdbox.tui.messages import StatusFailed, StatusUpdated
from pdbox.tui.router_panel import RouterPanel
from pdbox.tui.summary_bar import SummaryBar
from pdbox.tui.workers_table import WorkersTable

SIZE = (160, 50)


def text_of(renderable: Any, width: int = 120) -> str:
    console = Console(width=width, record=True, file=io.StringIO(), color_system=None)
    console.print(renderable)
    return console.export_text()


async def started(app: PdboxApp, pilot: Any) -> None:
    """Wait for the first snapshot to be on screen."""
    for _ in range(100):
        if app.ticks >= 1:
            break
        await pilot.pause(0.02)
    await pilot.pause()


async def settle(app: PdboxApp, pilot: Any) -> None:
    await pilot.pause()
    pending = [w for w in app.workers if w.group == "control"]
    if pending:  # an empty list would mean "every worker", the endless poll included
        await app.workers.wait_for_complete(pending)
    await pilot.pause()


async def select(app: PdboxApp, pilot: Any, worker_id: str) -> None:
    table = app.query_one(WorkersTable)
    table.move_cursor(row=table.get_row_index(worker_id))
    await pilot.pause()
    assert table.selected == worker_id


@pytest.mark.anyio
async def test_renders_every_panel() -> None:
    app = PdboxApp(FakeSource(), owns_server=True, poll_s=0.05)
    async with app.run_test(size=SIZE) as pilot:
        await started(app, pilot)
        table = app.query_one(WorkersTable)
        assert table.row_count == 3
        assert [str(c) for c in table.get_row("decode-0")][:3] == ["decode-0", "decode", "ready"]
        router = text_of(app.query_one(RouterPanel).content)
        assert "req/s" in router and "612 uncached tokens >= 256" in router
        assert "18.1 ms" in router and "311 MB/s" in router
        hardware = text_of(app.query_one(HardwarePanel).content)
        assert "cpu1" in hardware and "94%" in hardware and "9.6/24.0 GiB" in hardware
        summary = text_of(app.query_one(SummaryBar).content)
        assert "cpu-tiny" in summary and "policy prefix" in summary
        # The selected worker's log tail is fetched through the source.
        for _ in range(50):
            if app.query_one(LogPanel).tail_worker:
                break
            await pilot.pause(0.02)
        assert app.query_one(LogPanel).tail_worker == "prefill-0"


@pytest.mark.anyio
async def test_keys_send_the_right_control_calls() -> None:
    source = FakeSource()
    app = PdboxApp(source, owns_server=True, poll_s=0.05)
    async with app.run_test(size=SIZE) as pilot:
        await started(app, pilot)
        await select(app, pilot, "decode-0")
        await pilot.press("plus")
        await settle(app, pilot)
        await pilot.press("plus")  # stacks on the pending ask, before any snapshot shows it
        await settle(app, pilot)
        await pilot.press("minus")
        await settle(app, pilot)
        await pilot.press("p")
        await settle(app, pilot)
        await pilot.press("p")
        await settle(app, pilot)
        await pilot.press("r")
        await settle(app, pilot)
        await select(app, pilot, "prefill-0")
        await pilot.press("minus")
        await settle(app, pilot)
        assert source.calls == [
            ("scale", "decode", 2),
            ("scale", "decode", 3),
            ("scale", "decode", 2),
            ("set_policy", "least_loaded"),
            ("set_policy", "round_robin"),
            ("restart", "decode-0"),
            ("scale", "prefill", 0),
        ]
        # q asks first; "n" keeps everything running.
        await pilot.press("q")
        await pilot.pause()
        assert isinstance(app.screen, ConfirmQuit)
        await pilot.press("n")
        await pilot.pause()
        assert not isinstance(app.screen, ConfirmQuit)
        assert ("shutdown",) not in source.calls
        # "y" stops pdbox, because this TUI owns it, then exits.
        await pilot.press("q")
        await pilot.pause()
        await pilot.press("y")
        await settle(app, pilot)
        for _ in range(50):
            if not app.is_running:
                break
            await pilot.pause(0.02)
    assert source.calls[-1] == ("shutdown",)
    assert not app.is_running


@pytest.mark.anyio
async def test_quit_when_attached_only_detaches() -> None:
    source = FakeSource()
    app = PdboxApp(source, owns_server=False, poll_s=0.05)
    async with app.run_test(size=SIZE) as pilot:
        await started(app, pilot)
        assert "attached" in text_of(app.query_one(SummaryBar).content)
        await pilot.press("q")
        await pilot.pause()
        await pilot.press("y")
        await pilot.pause()
    assert source.calls == []


@pytest.mark.anyio
async def test_help_chat_and_logs_keys() -> None:
    app = PdboxApp(FakeSource(), owns_server=True, poll_s=0.05)
    async with app.run_test(size=SIZE) as pilot:
        await started(app, pilot)
        await pilot.press("question_mark")
        await pilot.pause()
        assert isinstance(app.screen, HelpScreen)
        await pilot.press("escape")
        await pilot.pause()
        await pilot.press("c")
        await pilot.pause()
        assert app.query_one(ContentSwitcher).current == "chat"
        assert isinstance(app.focused, Input)
        # Typing in the chat input must not trigger the app's keys.
        await pilot.press("q", "p", "plus")
        await pilot.pause()
        assert not isinstance(app.screen, ConfirmQuit)
        assert app.query_one("#chat-input", Input).value == "qp+"
        await pilot.press("escape")
        await pilot.pause()
        assert isinstance(app.focused, WorkersTable)
        await pilot.press("l")
        await pilot.pause()
        assert app.query_one(ContentSwitcher).current == "logs"


@pytest.mark.anyio
async def test_missing_gpu_values_show_na() -> None:
    app = PdboxApp(FakeSource(gpu_snapshot_with_gaps()), owns_server=True, poll_s=0.05)
    async with app.run_test(size=SIZE) as pilot:
        await started(app, pilot)
        hardware = " ".join(text_of(app.query_one(HardwarePanel).content).split())
    assert "NVIDIA GH200 480GB" in hardware
    assert "util ················ N/A" in hardware
    assert "N/A/96.0 GiB" in hardware
    assert "N/A · SM N/A" in hardware
    assert "MPS not running · N/A" in hardware
    assert "CPU N/A" in hardware


def test_hardware_never_crashes_on_partial_data() -> None:
    for hw in ({}, {"gpus": None}, {"gpus": [{}]}, {"gpus": [{"processes": [{}]}]},
               {"cpu_percent_per_core": [None, "x", 50]}, {"mps": {"enabled": True}},
               {"memory_used_bytes": 5, "memory_total_bytes": 0}):
        text = text_of(render_hardware(hw))
        assert "N/A" in text


@pytest.mark.anyio
async def test_failed_poll_shows_the_reason_and_keeps_polling() -> None:
    source = FakeSource()
    source.fail = "pdbox is not running (start it with: pdbox up)"
    app = PdboxApp(source, owns_server=False, poll_s=0.02)
    async with app.run_test(size=SIZE) as pilot:
        for _ in range(50):
            if source.status_calls >= 3:
                break
            await pilot.pause(0.02)
        assert "pdbox is not running" in text_of(app.query_one(SummaryBar).content, 200)
        source.fail = None
        await started(app, pilot)
        assert app.query_one(WorkersTable).row_count == 3
        assert "not running" not in text_of(app.query_one(SummaryBar).content, 200)


def test_ticks_coalesce() -> None:
    older, newer = StatusUpdated({"n": 1}), StatusUpdated({"n": 2})
    assert older.can_replace(newer)
    assert StatusFailed("x").can_replace(newer)
    assert not older.can_replace(StatusFailed("x"))


@pytest.mark.anyio
async def test_table_updates_cells_in_place() -> None:
    source = FakeSource()
    app = PdboxApp(source, owns_server=True, poll_s=0.02)
    async with app.run_test(size=SIZE) as pilot:
        await started(app, pilot)
        table = app.query_one(WorkersTable)
        await select(app, pilot, "decode-1")
        added: list[Any] = []
        original = table.add_row
        table.add_row = lambda *a, **k: added.append(a) or original(*a, **k)  # type: ignore
        source.snapshot["workers"][2]["state"] = "ready"
        source.snapshot["workers"][2]["queue"] = 5
        del source.snapshot["workers"][0]
        ticks = app.ticks
        for _ in range(50):
            if app.ticks >= ticks + 2:
                break
            await pilot.pause(0.02)
        assert added == []
        assert table.row_count == 2
        assert str(table.get_cell("decode-1", "state")) == "ready"
        assert table.get_cell("decode-1", "queue") == "5"
        assert table.selected == "decode-1"  # the cursor stays on its worker


@pytest.mark.anyio
async def test_chat_pane_streams_from_the_endpoint() -> None:
    requests: list[dict[str, Any]] = []

    async def models(request: web.Request) -> web.Response:
        return web.json_response({"data": [{"id": "smollm2"}]})

    async def complete(request: web.Request) -> web.StreamResponse:
        requests.append(await request.json())
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream",
                                           "x-pdbox-decode-worker": "decode-0",
                                           "x-pdbox-pd": "local"})
        await resp.prepare(request)
        for piece in ("Hello", " there"):
            chunk = {"choices": [{"index": 0, "delta": {"content": piece}}]}
            await resp.write(f"data: {json.dumps(chunk)}\n\n".encode())
        await resp.write(b"data: [DONE]\n\n")
        return resp

    web_app = web.Application()
    web_app.router.add_get("/v1/models", models)
    web_app.router.add_post("/v1/chat/completions", complete)
    runner = web.AppRunner(web_app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    snap = busy_snapshot()
    snap["endpoint"] = f"http://127.0.0.1:{port}/v1"
    try:
        app = PdboxApp(FakeSource(snap), owns_server=True, poll_s=0.05)
        async with app.run_test(size=SIZE) as pilot:
            await started(app, pilot)
            await pilot.press("c")
            await pilot.press(*"hi", "enter")
            pane = app.query_one(ChatPane)
            for _ in range(100):
                await pilot.pause(0.02)
                if not pane.busy and pane.conversation.turns:
                    break
            transcript = pane.transcript.plain
    finally:
        await runner.cleanup()
    assert requests[0]["model"] == "smollm2"
    assert requests[0]["messages"] == [{"role": "user", "content": "hi"}]
    assert "Hello there" in transcript and "decode decode-0 · P/D local" in transcript


def test_top_without_pdbox_says_so(tmp_path: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    from click.testing import CliRunner

    from pdbox.commands.top import top

    monkeypatch.setenv("PDBOX_HOME", str(tmp_path))
    result = CliRunner().invoke(top, [])
    assert result.exit_code == 1
    assert "pdbox is not running (start it with: pdbox up)" in result.output


def test_summary_says_while_it_serves_before_every_worker_is_ready() -> None:
    from pdbox.tui.summary_bar import render_summary

    snap = {"version": "0.1.0", "profile": "cpu-tiny", "mode": "pd", "policy": "prefix",
            "endpoint": "http://127.0.0.1:8000/v1", "uptime_s": 12.0,
            "serving": "aggregated until prefill-0 is ready"}
    assert "serving (aggregated until prefill-0 is ready)" in text_of(
        render_summary(snap, attached=False, error=None), width=200)
    snap["serving"] = ""
    assert "serving" not in text_of(render_summary(snap, attached=False, error=None))
