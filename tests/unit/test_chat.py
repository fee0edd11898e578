"""`pdbox chat` against a fake OpenAI server: a real aiohttp server in this process that
streams SSE chunks and sets the router's headers."""

from __future__ import annotations

import asyncio
import io
import json
import signal
import socket
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from click.testing import CliRunner

from pdbox.chat import (
    ChatError,
    Conversation,
    Repl,
    format_stats,
    normalize_base_url,
    stream_chat,
)
from pdbox.commands.chat import chat


class FakeOpenAI:
    """Answers every chat request with the words of `reply`, one chunk each."""

    def __init__(self, reply: str = "Paris is the capital.", models: list[str] | None = None):
        self.reply = reply
        self.models = ["smollm2", "other"] if models is None else models
        self.requests: list[dict[str, Any]] = []
        self.status = 200
        self.chunk_delay = 0.0
        app = web.Application()
        app.router.add_get("/v1/models", self.list_models)
        app.router.add_post("/v1/chat/completions", self.complete)
        self.app = app

    async def list_models(self, request: web.Request) -> web.Response:
        return web.json_response({"object": "list",
                                  "data": [{"id": m, "object": "model"} for m in self.models]})

    async def complete(self, request: web.Request) -> web.StreamResponse:
        body = await request.json()
        self.requests.append(body)
        if self.status != 200:
            return web.json_response(
                {"error": {"message": "too many requests in the queue, retry later.",
                           "type": "rate_limit", "code": self.status}}, status=self.status)
        resp = web.StreamResponse(headers={
            "Content-Type": "text/event-stream",
            "x-pdbox-decode-worker": "decode-1",
            "x-pdbox-prefill-worker": "prefill-0",
            "x-pdbox-pd": "remote",
            "x-pdbox-pd-reason": "412 uncached tokens >= 256",
        })
        await resp.prepare(request)
        words = self.reply.split(" ")
        for i, word in enumerate(words):
            piece = word if i == 0 else " " + word
            chunk = {"id": "c1", "object": "chat.completion.chunk", "model": body["model"],
                     "choices": [{"index": 0, "delta": {"content": piece},
                                  "finish_reason": None}]}
            await resp.write(f"data: {json.dumps(chunk)}\n\n".encode())
            if self.chunk_delay:
                await asyncio.sleep(self.chunk_delay)
        prompt = sum(len(m["content"].split()) for m in body["messages"])
        usage = {"id": "c1", "choices": [], "usage": {
            "prompt_tokens": prompt, "completion_tokens": len(words),
            "total_tokens": prompt + len(words),
            "prompt_tokens_details": {"cached_tokens": 128}}}
        await resp.write(f"data: {json.dumps(usage)}\n\n".encode())
        await resp.write(b"data: [DONE]\n\n")
        await resp.write_eof()
        return resp


@pytest.fixture
def server() -> Iterator[tuple[FakeOpenAI, str]]:
    """The fake on its own thread, so sync code (the CLI, the REPL) can call it."""
    fake = FakeOpenAI()
    loop = asyncio.new_event_loop()
    runner = web.AppRunner(fake.app)
    loop.run_until_complete(runner.setup())
    site = web.TCPSite(runner, "127.0.0.1", 0)
    loop.run_until_complete(site.start())
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    yield fake, f"http://127.0.0.1:{port}/v1"
    asyncio.run_coroutine_threadsafe(runner.cleanup(), loop).result(5)
    loop.call_soon_threadsafe(loop.stop)
    thread.join(5)
    loop.close()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_stream_chat_streams_and_reads_router_figures(server: tuple[FakeOpenAI, str]) -> None:
    fake, url = server
    pieces: list[str] = []
    turn = asyncio.run(stream_chat(url, "smollm2", [{"role": "user", "content": "hi"}],
                                   on_delta=pieces.append))
    assert pieces == ["Paris", " is", " the", " capital."]
    assert turn.answer == "Paris is the capital."
    s = turn.stats
    assert (s.decode_worker, s.prefill_worker, s.pd) == ("decode-1", "prefill-0", "remote")
    assert s.pd_reason == "412 uncached tokens >= 256"
    assert s.cached_tokens == 128 and s.completion_tokens == 4
    assert s.ttft_s is not None and s.ttft_s >= 0
    assert fake.requests[0]["stream"] is True
    assert fake.requests[0]["stream_options"] == {"include_usage": True}
    text = format_stats(s)
    assert "decode-1" in text and "remote (412 uncached tokens >= 256)" in text


def test_tokens_per_s_uses_injected_clock(server: tuple[FakeOpenAI, str]) -> None:
    _, url = server
    ticks = iter([0.0, 0.5, 10.0])  # start, first token, end
    turn = asyncio.run(stream_chat(url, "smollm2", [{"role": "user", "content": "x"}],
                                   clock=lambda: next(ticks)))
    assert turn.stats.ttft_s == 0.5
    assert turn.stats.tokens_per_s == pytest.approx(3 / 9.5)


def test_repl_keeps_history_and_commands(server: tuple[FakeOpenAI, str], tmp_path: Path) -> None:
    fake, url = server
    saved = tmp_path / "conv.json"
    lines = iter(["What is the capital of France?", "And of Italy?", "/stats",
                  f"/save {saved}", "/reset", f"/load {saved}", "/model", "/model other",
                  "/system Be brief.", "third", "/bogus", "/help", "/quit"])
    out = io.StringIO()
    repl = Repl(url, "smollm2", read_line=lambda _p: next(lines), out=out)
    repl.run()
    text = out.getvalue()
    first, second, third = fake.requests
    assert first["messages"] == [{"role": "user", "content": "What is the capital of France?"}]
    # The follow-up resends the whole conversation, so it shares the first turn's prefix.
    assert second["messages"] == [
        {"role": "user", "content": "What is the capital of France?"},
        {"role": "assistant", "content": "Paris is the capital."},
        {"role": "user", "content": "And of Italy?"},
    ]
    assert third["model"] == "other"
    assert third["messages"] == [{"role": "system", "content": "Be brief."},
                                 {"role": "user", "content": "third"}]
    assert "decode worker  decode-1" in text and "cached tokens  128" in text
    assert "(loaded 2 turns)" in text
    assert "* smollm2" in text and "  other" in text
    assert "unknown command /bogus" in text and "/system TEXT" in text
    assert json.loads(saved.read_text())["turns"][1]["content"] == "Paris is the capital."


@pytest.fixture
def terminal_sigint() -> Iterator[None]:
    """Python's own Ctrl-C handler, as in a terminal: a suite started in the
    background by a non-interactive shell inherits SIGINT ignored."""
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, previous)


@pytest.mark.usefixtures("terminal_sigint")
def test_repl_ctrl_c_cancels_the_answer_not_the_repl(server: tuple[FakeOpenAI, str]) -> None:
    fake, url = server
    fake.reply = " ".join(["word"] * 50)
    # Slow enough that the answer is still coming when Ctrl-C lands, however late a
    # loaded machine runs the client: a request already whole has nothing to cancel.
    fake.chunk_delay = 0.2
    lines = iter(["tell me a long story", "/quit"])
    out = io.StringIO()
    repl = Repl(url, "smollm2", read_line=lambda _p: next(lines), out=out)
    sent = []

    def write(text: str) -> None:
        out.write(text)
        # Under load one write may carry several words: any of them will do.
        if "word" in text.split() and not sent:
            sent.append(True)
            signal.raise_signal(signal.SIGINT)  # what Ctrl-C does mid-answer

    repl.write = write  # type: ignore[method-assign]
    repl.run()
    assert "(cancelled)" in out.getvalue()
    assert repl.conversation.turns == []


def test_repl_ctrl_c_twice_or_ctrl_d_leaves() -> None:
    def interrupts(_p: str) -> str:
        raise KeyboardInterrupt

    out = io.StringIO()
    Repl("http://127.0.0.1:9/v1", "m", read_line=interrupts, out=out).run()
    assert "Ctrl-C again" in out.getvalue()

    def eof(_p: str) -> str:
        raise EOFError

    Repl("http://127.0.0.1:9/v1", "m", read_line=eof, out=io.StringIO()).run()


def test_cli_message_json(server: tuple[FakeOpenAI, str]) -> None:
    fake, url = server
    result = CliRunner().invoke(chat, ["--url", url.removesuffix("/v1"), "--message", "hi",
                                       "--json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.output)
    assert data["answer"] == "Paris is the capital."
    assert data["decode_worker"] == "decode-1" and data["pd"] == "remote"
    assert data["cached_tokens"] == 128
    assert {"ttft_s", "tokens_per_s"} <= set(data)
    assert fake.requests[0]["model"] == "smollm2"  # the first of /v1/models


def test_cli_message_plain_streams(server: tuple[FakeOpenAI, str]) -> None:
    _, url = server
    result = CliRunner().invoke(chat, ["--url", url, "--model", "x", "-m", "hi"])
    assert result.exit_code == 0
    assert result.output == "Paris is the capital.\n"


def test_cli_not_running(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PDBOX_HOME", str(tmp_path))
    result = CliRunner().invoke(chat, ["--message", "hi"])
    assert result.exit_code == 1
    assert "pdbox is not running (start it with: pdbox up)" in result.output
    assert "Traceback" not in result.output
    result = CliRunner().invoke(chat, ["--url", f"http://127.0.0.1:{free_port()}",
                                       "--model", "m", "--message", "hi"])
    assert result.exit_code == 1
    assert "pdbox is not running (start it with: pdbox up)" in result.output


def test_cli_server_error_is_one_sentence(server: tuple[FakeOpenAI, str]) -> None:
    fake, url = server
    fake.status = 429
    result = CliRunner().invoke(chat, ["--url", url, "--message", "hi"])
    assert result.exit_code == 1
    assert "HTTP 429" in result.output and "retry later" in result.output


def test_cli_json_needs_message() -> None:
    result = CliRunner().invoke(chat, ["--url", "http://127.0.0.1:9", "--json"])
    assert result.exit_code == 2


def test_normalize_and_load_errors(tmp_path: Path) -> None:
    assert normalize_base_url("http://h:1") == "http://h:1/v1"
    assert normalize_base_url("http://h:1/v1/") == "http://h:1/v1"
    assert normalize_base_url("h:1") == "http://h:1/v1"
    bad = tmp_path / "bad.json"
    bad.write_text('{"turns": [{"role": "robot"}]}')
    with pytest.raises(ChatError, match="not a conversation"):
        Conversation.load(bad)
    with pytest.raises(ChatError, match="cannot read"):
        Conversation.load(tmp_path / "missing.json")


def test_clients_do_not_import_textual() -> None:
    """`pdbox chat` and the control client stay fast to start: no TUI behind them."""
    import subprocess
    import sys

    code = ("import sys, pdbox.chat, pdbox.control_client, pdbox.commands.chat, pdbox.tui.format\n"
            "print('textual' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True)
    assert out.stdout.strip() == "False"
