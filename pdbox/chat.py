"""`pdbox chat`: a chat REPL against the router (or any OpenAI-compatible server).

The conversation is resent in full each turn, so follow-ups share a prefix with
the previous turn and the router can send them to the worker that caches it;
`/stats` shows whether it did (served by which worker, P/D or local, cached
tokens). The streaming code is shared with the TUI's chat pane, so it takes a
callback for each piece of text and never prints by itself.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, TextIO
from urllib.parse import urlsplit

import aiohttp

from pdbox.control_client import sse_data

# Headers the router sets on every answer, read by /stats.
H_DECODE = "x-pdbox-decode-worker"
H_PREFILL = "x-pdbox-prefill-worker"
H_PD = "x-pdbox-pd"
H_PD_REASON = "x-pdbox-pd-reason"

# A long prompt on a busy CPU worker can take minutes before its first token; the
# read timeout bounds the gap between two chunks, not the whole answer.
DEFAULT_TIMEOUT_S = 600.0

HELP = """\
/system TEXT   set the system prompt (starts a new conversation)
/reset         forget the conversation
/save FILE     save the conversation as JSON
/load FILE     load a conversation saved with /save
/stats         figures of the last answer: TTFT, tokens/s, workers, P/D, cached tokens
/model [NAME]  show the models, or switch to NAME
/help          this text
/quit          leave (Ctrl-D works too; Ctrl-C cancels an answer)"""


class ChatError(Exception):
    """A chat request that failed. str() is one sentence meant for the user."""


@dataclass
class TurnStats:
    model: str
    ttft_s: float | None = None
    total_s: float | None = None
    tokens_per_s: float | None = None
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    cached_tokens: int | None = None
    decode_worker: str | None = None
    prefill_worker: str | None = None
    pd: str | None = None
    pd_reason: str | None = None


@dataclass
class Turn:
    answer: str
    stats: TurnStats

    def as_json(self) -> dict[str, Any]:
        """The `--json` shape of `pdbox chat --message`."""
        s = self.stats
        return {
            "answer": self.answer,
            "ttft_s": s.ttft_s,
            "tokens_per_s": s.tokens_per_s,
            "decode_worker": s.decode_worker,
            "prefill_worker": s.prefill_worker,
            "pd": s.pd,
            "pd_reason": s.pd_reason,
            "cached_tokens": s.cached_tokens,
            "prompt_tokens": s.prompt_tokens,
            "completion_tokens": s.completion_tokens,
            "model": s.model,
        }


def normalize_base_url(url: str) -> str:
    """`http://host:port` and `http://host:port/v1/` both mean `http://host:port/v1`."""
    url = url.strip().rstrip("/")
    if "://" not in url:
        url = "http://" + url
    if urlsplit(url).path in ("", "/"):
        url += "/v1"
    return url


def not_running(base_url: str) -> str:
    return f"nothing answers at {base_url}: pdbox is not running (start it with: pdbox up)."


def _error_sentence(body: str, status: int) -> str:
    try:
        data = json.loads(body)
    except ValueError:
        data = None
    if isinstance(data, dict):
        err = data.get("error", data)
        msg = err.get("message") if isinstance(err, dict) else err
        if isinstance(msg, str) and msg:
            return f"the server refused the request (HTTP {status}): {msg}"
    return f"the server answered HTTP {status}."


def _headers(api_key: str | None) -> dict[str, str]:
    return {"Authorization": f"Bearer {api_key}"} if api_key else {}


def _timeout(timeout_s: float) -> aiohttp.ClientTimeout:
    return aiohttp.ClientTimeout(total=None, sock_connect=10.0, sock_read=timeout_s)


async def list_models(base_url: str, *, api_key: str | None = None,
                      timeout_s: float = 30.0) -> list[str]:
    """The ids from `/v1/models`, in the server's order."""
    try:
        async with aiohttp.ClientSession(timeout=_timeout(timeout_s)) as http:
            async with http.get(base_url + "/models", headers=_headers(api_key)) as resp:
                body = await resp.text()
                if resp.status >= 400:
                    raise ChatError(_error_sentence(body, resp.status))
    except aiohttp.ClientConnectorError:
        raise ChatError(not_running(base_url)) from None
    except TimeoutError:
        raise ChatError(f"{base_url}/models did not answer within {timeout_s:g} s.") from None
    except aiohttp.ClientError as exc:
        raise ChatError(f"cannot list the models at {base_url}: {exc}.") from None
    try:
        data = json.loads(body)
        return [str(m["id"]) for m in data.get("data", [])]
    except (ValueError, KeyError, TypeError, AttributeError):
        raise ChatError(f"{base_url}/models did not answer with a model list.") from None


async def stream_chat(
    base_url: str,
    model: str,
    messages: list[dict[str, str]],
    *,
    on_delta: Callable[[str], None] | None = None,
    api_key: str | None = None,
    max_tokens: int | None = None,
    temperature: float | None = None,
    timeout_s: float = DEFAULT_TIMEOUT_S,
    clock: Callable[[], float] = time.monotonic,
) -> Turn:
    """Send one chat request with streaming on; call `on_delta` for each piece of text."""
    body: dict[str, Any] = {
        "model": model,
        "messages": messages,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    if max_tokens is not None:
        body["max_tokens"] = max_tokens
    if temperature is not None:
        body["temperature"] = temperature
    stats = TurnStats(model=model)
    pieces: list[str] = []
    chunks = 0
    start = clock()
    first: float | None = None
    try:
        async with aiohttp.ClientSession(timeout=_timeout(timeout_s)) as http:
            async with http.post(base_url + "/chat/completions", json=body,
                                 headers=_headers(api_key)) as resp:
                if resp.status >= 400:
                    raise ChatError(_error_sentence(await resp.text(), resp.status))
                h = resp.headers
                stats.decode_worker = h.get(H_DECODE)
                stats.prefill_worker = h.get(H_PREFILL)
                stats.pd = h.get(H_PD)
                stats.pd_reason = h.get(H_PD_REASON)
                async for payload in sse_data(resp.content):
                    if payload.strip() == "[DONE]":
                        break
                    try:
                        chunk = json.loads(payload)
                    except ValueError:
                        continue
                    if not isinstance(chunk, dict):
                        continue
                    if "error" in chunk:
                        err = chunk["error"]
                        msg = err.get("message") if isinstance(err, dict) else err
                        raise ChatError(f"the server stopped the answer: {msg}")
                    for choice in chunk.get("choices") or []:
                        text = (choice.get("delta") or {}).get("content")
                        if text:
                            if first is None:
                                first = clock()
                            chunks += 1
                            pieces.append(text)
                            if on_delta is not None:
                                on_delta(text)
                    if chunk.get("usage"):
                        _read_usage(stats, chunk["usage"])
    except aiohttp.ClientConnectorError:
        raise ChatError(not_running(base_url)) from None
    except TimeoutError:
        raise ChatError(f"the server sent nothing for {timeout_s:g} s.") from None
    except aiohttp.ClientError as exc:
        raise ChatError(f"the chat request to {base_url} failed: {exc}.") from None
    end = clock()
    stats.total_s = end - start
    if first is not None:
        stats.ttft_s = first - start
        produced = stats.completion_tokens or chunks
        # The first token's time is TTFT; the rate is over the tokens after it.
        if produced > 1 and end > first:
            stats.tokens_per_s = (produced - 1) / (end - first)
    return Turn(answer="".join(pieces), stats=stats)


def _read_usage(stats: TurnStats, usage: dict[str, Any]) -> None:
    stats.prompt_tokens = usage.get("prompt_tokens")
    stats.completion_tokens = usage.get("completion_tokens")
    details = usage.get("prompt_tokens_details") or {}
    if isinstance(details, dict) and details.get("cached_tokens") is not None:
        stats.cached_tokens = int(details["cached_tokens"])


def format_stats(stats: TurnStats) -> str:
    def num(v: float | None, fmt: str, unit: str) -> str:
        return "N/A" if v is None else f"{v:{fmt}}{unit}"

    pd = stats.pd or "N/A"
    if stats.pd_reason:
        pd += f" ({stats.pd_reason})"
    cached = "N/A" if stats.cached_tokens is None else str(stats.cached_tokens)
    if stats.cached_tokens is not None and stats.prompt_tokens:
        cached += f" of {stats.prompt_tokens} prompt tokens"
    return "\n".join([
        f"model          {stats.model}",
        f"TTFT           {num(stats.ttft_s, '.3f', ' s')}",
        f"tokens/s       {num(stats.tokens_per_s, '.1f', '')}",
        f"tokens         {num(stats.completion_tokens, 'd', '')}",
        f"decode worker  {stats.decode_worker or 'N/A'}",
        f"prefill worker {stats.prefill_worker or 'N/A'}",
        f"P/D            {pd}",
        f"cached tokens  {cached}",
    ])


@dataclass
class Conversation:
    """The history sent with every turn."""

    system: str | None = None
    turns: list[dict[str, str]] = field(default_factory=list)

    def messages(self, user_text: str | None = None) -> list[dict[str, str]]:
        out: list[dict[str, str]] = []
        if self.system:
            out.append({"role": "system", "content": self.system})
        out.extend(self.turns)
        if user_text is not None:
            out.append({"role": "user", "content": user_text})
        return out

    def add(self, user_text: str, answer: str) -> None:
        self.turns.append({"role": "user", "content": user_text})
        self.turns.append({"role": "assistant", "content": answer})

    def reset(self) -> None:
        self.turns.clear()

    def save(self, path: Path, model: str | None) -> None:
        data = {"model": model, **asdict(self)}
        path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n")

    @classmethod
    def load(cls, path: Path) -> tuple[Conversation, str | None]:
        try:
            data = json.loads(path.read_text())
        except OSError as exc:
            raise ChatError(f"cannot read {path}: {exc.strerror}.") from None
        except ValueError:
            raise ChatError(f"{path} is not a conversation saved by /save.") from None
        turns = data.get("turns") if isinstance(data, dict) else None
        if not isinstance(turns, list) or not all(
            isinstance(t, dict) and t.get("role") in ("user", "assistant")
            and isinstance(t.get("content"), str) for t in turns
        ):
            raise ChatError(f"{path} is not a conversation saved by /save.")
        system = data.get("system")
        model = data.get("model")
        return (cls(system=system if isinstance(system, str) else None, turns=turns),
                model if isinstance(model, str) else None)


class Repl:
    """The interactive loop. Input and output are injected so tests can script it."""

    def __init__(self, base_url: str, model: str, *, api_key: str | None = None,
                 system: str | None = None, max_tokens: int | None = None,
                 temperature: float | None = None, timeout_s: float = DEFAULT_TIMEOUT_S,
                 read_line: Callable[[str], str] = input, out: TextIO | None = None):
        import sys

        self.base_url = base_url
        self.model = model
        self.api_key = api_key
        self.max_tokens = max_tokens
        self.temperature = temperature
        self.timeout_s = timeout_s
        self.conversation = Conversation(system=system)
        self.last: TurnStats | None = None
        self.read_line = read_line
        self.out = out or sys.stdout

    def write(self, text: str) -> None:
        self.out.write(text)
        self.out.flush()

    def run(self) -> None:
        self.write(f"pdbox chat · {self.model} at {self.base_url} · /help for commands\n")
        interrupted = False
        with asyncio.Runner() as runner:
            while True:
                try:
                    line = self.read_line("> ")
                except EOFError:
                    self.write("\n")
                    return
                except KeyboardInterrupt:
                    if interrupted:
                        self.write("\n")
                        return
                    interrupted = True
                    self.write("\n(Ctrl-C again or Ctrl-D to leave)\n")
                    continue
                interrupted = False
                line = line.strip()
                if not line:
                    continue
                if line.startswith("/"):
                    if self.command(line, runner) == "quit":
                        return
                    continue
                self.ask(line, runner)

    def ask(self, text: str, runner: asyncio.Runner) -> None:
        coro = stream_chat(self.base_url, self.model, self.conversation.messages(text),
                           on_delta=self.write, api_key=self.api_key,
                           max_tokens=self.max_tokens, temperature=self.temperature,
                           timeout_s=self.timeout_s)
        try:
            # asyncio.Runner turns Ctrl-C into a cancellation of this one request
            # and leaves the loop usable, so the REPL goes on.
            turn = runner.run(coro)
        except KeyboardInterrupt:
            self.write("\n(cancelled)\n")
            return
        except ChatError as exc:
            self.write(f"\nerror: {exc}\n")
            return
        self.write("\n")
        self.conversation.add(text, turn.answer)
        self.last = turn.stats

    def command(self, line: str, runner: asyncio.Runner) -> str | None:
        name, _, arg = line.partition(" ")
        arg = arg.strip()
        if name in ("/quit", "/exit", "/q"):
            return "quit"
        if name == "/help":
            self.write(HELP + "\n")
        elif name == "/reset":
            self.conversation.reset()
            self.write("(conversation cleared)\n")
        elif name == "/system":
            if not arg:
                self.write(f"system prompt: {self.conversation.system or '(none)'}\n")
            else:
                self.conversation = Conversation(system=arg)
                self.write("(system prompt set; conversation cleared)\n")
        elif name == "/save":
            if not arg:
                self.write("usage: /save FILE\n")
            else:
                try:
                    self.conversation.save(Path(arg).expanduser(), self.model)
                    self.write(f"(saved {len(self.conversation.turns) // 2} turns to {arg})\n")
                except OSError as exc:
                    self.write(f"error: cannot write {arg}: {exc.strerror}.\n")
        elif name == "/load":
            if not arg:
                self.write("usage: /load FILE\n")
            else:
                try:
                    self.conversation, _ = Conversation.load(Path(arg).expanduser())
                    self.write(f"(loaded {len(self.conversation.turns) // 2} turns)\n")
                except ChatError as exc:
                    self.write(f"error: {exc}\n")
        elif name == "/stats":
            self.write((format_stats(self.last) if self.last else "(no answer yet)") + "\n")
        elif name == "/model":
            if arg:
                self.model = arg
                self.write(f"(model: {arg})\n")
            else:
                try:
                    models = runner.run(list_models(self.base_url, api_key=self.api_key))
                except (ChatError, KeyboardInterrupt) as exc:
                    self.write(f"error: {exc}\n" if isinstance(exc, ChatError) else "\n")
                    models = []
                for m in models:
                    self.write(f"{'*' if m == self.model else ' '} {m}\n")
                if not models:
                    self.write(f"* {self.model}\n")
        else:
            self.write(f"unknown command {name}; /help lists them.\n")
        return None
