"""A small, fast stand-in for a vLLM OpenAI server, for router tests and benchmarks.

It speaks enough of vLLM's API for pdbox's router to treat it as a worker:

- ``GET /health``, ``GET /v1/models``, ``GET /metrics`` (vLLM's gauge and
  counter names: requests running/waiting from its own in-flight count, KV
  use, prompt/generation tokens, prefix-cache queries/hits, NIXL transfers;
  and vLLM's latency histograms, TTFT, inter-token latency, queue, prefill
  and end-to-end time, from what it really did);
- ``POST /v1/completions`` and ``POST /v1/chat/completions``, streamed as
  vLLM streams them (one SSE chunk per token, a final chunk with
  ``finish_reason``, optional usage chunk, ``data: [DONE]``) or not, after a
  configurable time to first token and inter-token delay (kept on an
  absolute schedule, so a 0.5 ms delay really gives 2,000 tokens/s);
- the NixlConnector's ``kv_transfer_params`` handshake: a request with
  ``do_remote_decode`` is answered with ``remote_block_ids``,
  ``remote_engine_id``, host and port, as a prefill worker does; a request
  with ``do_remote_prefill`` counts one transfer in
  ``vllm:nixl_xfer_time_seconds_count``, as a decode worker pulling KV does.

Faults are switched by CLI flags or ``POST /mock/faults`` with a JSON object
(``{"fail_status": 500}``, ``{"fail_after_chunks": 3}``, ``{"hang": true}``,
``{"stall_after_chunks": 3}`` (send nothing more, keep the connection open),
optionally ``"count": N`` to apply to the next N requests only; ``{}``
clears), so tests can make a worker fail before the first byte, reset
mid-stream or hang. ``GET /mock/state`` returns what it saw (counters, the
last request bodies and headers, disconnects); ``POST /mock/reset`` clears it.

    python -m pdbox.devtools.mock_openai --port 8101 --model smollm2 --tokens 32 --itl-ms 5

The first line printed is the URL it serves on (useful with ``--port 0``).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import re
import sys
import time
import uuid
from collections import OrderedDict, deque
from dataclasses import asdict, dataclass, field
from typing import Any

from aiohttp import web

from pdbox.router.engine_stats import ENGINE_HISTOGRAMS
from pdbox.router.metrics import Histogram

COMPLETION_PATHS = ("/v1/completions", "/v1/chat/completions")
CHARS_PER_TOKEN = 4  # prompt tokens are estimated from characters, as pdbox's fallback does
STALL_AFTER = web.RequestKey("stall_after", int)  # this request's stall fault, for _stream


@dataclass
class MockConfig:
    model: str = "smollm2"
    tokens: int = 16  # tokens generated when the request does not ask for fewer
    itl_ms: float = 0.0
    ttft_ms: float = 0.0
    max_model_len: int = 4096
    block_size: int = 16  # tokens per KV block (for remote_block_ids and prefix-cache figures)
    max_num_seqs: int = 256  # in-flight requests beyond this count as waiting
    kv_blocks: int = 4096  # KV blocks in the "cache", for vllm:kv_cache_usage_perc
    engine_id: str = field(default_factory=lambda: str(uuid.uuid4()))
    per_request_metrics: bool = False  # answer `metrics` as vLLM's --enable-per-request-metrics
    side_channel_port: int = 5600


@dataclass
class Faults:
    fail_status: int | None = None  # answer this status before the first byte
    fail_after_chunks: int | None = None  # reset the connection after this many chunks
    hang: bool = False  # accept the request and never answer
    stall_after_chunks: int | None = None  # after this many chunks, send nothing more
    count: int | None = None  # apply to the next `count` requests only; None: until cleared

    @property
    def active(self) -> bool:
        return (self.fail_status is not None or self.fail_after_chunks is not None
                or self.hang or self.stall_after_chunks is not None) and (self.count is None or self.count > 0)

    @classmethod
    def from_json(cls, data: Any) -> Faults:
        if not isinstance(data, dict):
            raise ValueError("faults must be a JSON object")
        unknown = set(data) - {"fail_status", "fail_after_chunks", "hang", "count",
                               "stall_after_chunks"}
        if unknown:
            raise ValueError(f"unknown fault keys: {', '.join(sorted(unknown))}")
        f = cls(fail_status=data.get("fail_status"), fail_after_chunks=data.get("fail_after_chunks"),
                hang=bool(data.get("hang", False)), count=data.get("count"),
                stall_after_chunks=data.get("stall_after_chunks"))
        for name in ("fail_status", "fail_after_chunks", "count", "stall_after_chunks"):
            v = getattr(f, name)
            if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 0):
                raise ValueError(f"{name} must be a non-negative integer or null")
        if f.fail_status is not None and not 400 <= f.fail_status <= 599:
            raise ValueError("fail_status must be an HTTP error status (400..599)")
        return f


@dataclass
class MockStats:
    requests: int = 0  # completion requests received (any outcome)
    completed: int = 0  # completion requests answered in full
    failed: int = 0  # answered with an injected fault
    disconnects: int = 0  # clients that went away before the answer ended
    inflight: int = 0
    prefill_legs: int = 0  # requests with do_remote_decode (we played the prefill worker)
    transfers: int = 0  # requests with do_remote_prefill (we "pulled" KV)
    failed_transfers: int = 0  # do_remote_prefill without usable params
    xfer_seconds: float = 0.0
    xfer_bytes: float = 0.0
    prompt_tokens: int = 0
    generation_tokens: int = 0
    prefix_queries: int = 0
    prefix_hits: int = 0
    by_path: dict[str, int] = field(default_factory=dict)


def _engine_histograms() -> dict[str, Histogram]:
    return {key: Histogram(name, "mock") for key, name in ENGINE_HISTOGRAMS.items()}


class MockServer:
    """One mock worker. Use in-process (`async with MockServer(cfg) as m: m.url`) or via the CLI."""

    def __init__(self, config: MockConfig | None = None, faults: Faults | None = None,
                 keep_requests: int = 256) -> None:
        self.config = config or MockConfig()
        self.faults = faults or Faults()
        self.stats = MockStats()
        self.engine = _engine_histograms()  # what vLLM's engine would have observed
        self.seen: deque[dict[str, Any]] = deque(maxlen=keep_requests)
        self._blocks: OrderedDict[int, None] = OrderedDict()  # the "prefix cache"
        self._next_block = 0
        self._active_blocks = 0  # KV blocks held by requests in flight
        self._runner: web.AppRunner | None = None
        self.url = ""
        self.port = 0

    # ------------------------------------------------------------- lifecycle

    def app(self) -> web.Application:
        app = web.Application(client_max_size=64 * 1024 * 1024)
        app.router.add_get("/health", self.health)
        app.router.add_get("/v1/models", self.models)
        app.router.add_get("/metrics", self.metrics)
        for path in COMPLETION_PATHS:
            app.router.add_post(path, self.complete)
        app.router.add_post("/mock/faults", self.set_faults)
        app.router.add_get("/mock/faults", self.get_faults)
        app.router.add_get("/mock/state", self.state)
        app.router.add_post("/mock/reset", self.reset)
        return app

    async def start(self, host: str = "127.0.0.1", port: int = 0) -> str:
        # handler_cancellation: a client that goes away cancels its handler, as in
        # vLLM, where a closed connection aborts the request in the engine.
        self._runner = web.AppRunner(self.app(), handler_cancellation=True, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, host, port, reuse_address=True)
        await site.start()
        server = site._server
        sockets = server.sockets if server is not None else []  # type: ignore[union-attr]
        self.port = sockets[0].getsockname()[1] if sockets else port
        self.url = f"http://{host}:{self.port}"
        return self.url

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def __aenter__(self) -> MockServer:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    # ---------------------------------------------------------------- routes

    async def health(self, request: web.Request) -> web.Response:
        return web.Response(status=200)

    async def models(self, request: web.Request) -> web.Response:
        return web.json_response({"object": "list", "data": [{
            "id": self.config.model, "object": "model", "created": int(time.time()),
            "owned_by": "vllm", "root": self.config.model, "parent": None,
            "max_model_len": self.config.max_model_len}]})

    async def metrics(self, request: web.Request) -> web.Response:
        c, s = self.config, self.stats
        running = min(s.inflight, c.max_num_seqs)
        waiting = s.inflight - running
        lbl = f'{{engine="0",model_name="{c.model}"}}'
        series = [
            ("vllm:num_requests_running", "gauge", running),
            ("vllm:num_requests_waiting", "gauge", waiting),
            ("vllm:kv_cache_usage_perc", "gauge", min(1.0, max(0, self._active_blocks) / c.kv_blocks)),
            ("vllm:prompt_tokens_total", "counter", s.prompt_tokens),
            ("vllm:generation_tokens_total", "counter", s.generation_tokens),
            ("vllm:prefix_cache_queries_total", "counter", s.prefix_queries),
            ("vllm:prefix_cache_hits_total", "counter", s.prefix_hits),
            ("vllm:nixl_num_failed_transfers_total", "counter", s.failed_transfers),
        ]
        lines: list[str] = []
        for name, kind, value in series:
            lines += [f"# HELP {name} mock", f"# TYPE {name} {kind}", f"{name}{lbl} {float(value)}"]
        for name, total, count in (("vllm:nixl_xfer_time_seconds", s.xfer_seconds, s.transfers),
                                   ("vllm:nixl_bytes_transferred", s.xfer_bytes, s.transfers)):
            lines += [f"# HELP {name} mock", f"# TYPE {name} histogram",
                      f'{name}_bucket{{engine="0",le="+Inf",model_name="{c.model}"}} {float(count)}',
                      f"{name}_count{lbl} {float(count)}", f"{name}_sum{lbl} {float(total)}"]
        for h in self.engine.values():
            lines += h.render()
        return web.Response(text="\n".join(lines) + "\n", content_type="text/plain")

    async def set_faults(self, request: web.Request) -> web.Response:
        try:
            self.faults = Faults.from_json(await request.json())
        except ValueError as exc:
            return _error(400, str(exc))
        return web.json_response(asdict(self.faults))

    async def get_faults(self, request: web.Request) -> web.Response:
        return web.json_response(asdict(self.faults))

    async def state(self, request: web.Request) -> web.Response:
        return web.json_response({"stats": asdict(self.stats), "faults": asdict(self.faults),
                                  "seen": list(self.seen)})

    async def reset(self, request: web.Request) -> web.Response:
        self.stats = MockStats()
        self.engine = _engine_histograms()
        self.faults = Faults()
        self.seen.clear()
        self._blocks.clear()
        self._active_blocks = 0
        return web.json_response({"ok": True})

    # ------------------------------------------------------------ completions

    async def complete(self, request: web.Request) -> web.StreamResponse:
        s = self.stats
        s.requests += 1
        s.by_path[request.path] = s.by_path.get(request.path, 0) + 1
        raw = await request.read()
        try:
            body = json.loads(raw)
        except ValueError:
            body = None
        self.seen.append({"path": request.path, "body": body, "t": time.monotonic(),
                          "headers": {k.lower(): v for k, v in request.headers.items()}})
        if not isinstance(body, dict):
            return _error(400, "Request body is not a JSON object.")
        if body.get("model") != self.config.model:
            return _error(404, f"The model `{body.get('model')}` does not exist.", "NotFoundError",
                          param="model")

        faults = self._take_faults()
        if faults is not None and faults.fail_status is not None:
            s.failed += 1
            return _error(faults.fail_status, "Injected failure.", "InternalServerError")
        s.inflight += 1
        held = [0]  # KV blocks this request holds, for the KV-use gauge
        try:
            if faults is not None and faults.hang:
                s.failed += 1
                await asyncio.Event().wait()  # until the client goes away
            return await self._answer(request, body, faults, held)
        except asyncio.CancelledError:
            s.disconnects += 1
            raise
        finally:
            s.inflight -= 1
            self._active_blocks -= held[0]

    def _take_faults(self) -> Faults | None:
        f = self.faults
        if not f.active:
            return None
        if f.count is not None:
            f.count -= 1
        return f

    async def _answer(self, request: web.Request, body: dict[str, Any],
                      faults: Faults | None, held: list[int]) -> web.StreamResponse:
        c, s = self.config, self.stats
        started = time.monotonic()
        chat = request.path.endswith("/chat/completions")
        prompt = _prompt_text(body, chat)
        n_prompt = max(1, math.ceil(len(prompt) / CHARS_PER_TOKEN))
        limit = body.get("max_completion_tokens") if chat else None
        limit = limit if isinstance(limit, int) else body.get("max_tokens")
        n_out = c.tokens if not isinstance(limit, int) or limit <= 0 else min(c.tokens, limit)
        s.prompt_tokens += n_prompt
        s.prefix_queries += n_prompt
        n_blocks = self._cache(prompt)
        held[0] = n_blocks + math.ceil(n_out / c.block_size)
        self._active_blocks += held[0]
        kv_in = body.get("kv_transfer_params")
        kv_out: dict[str, Any] | None = None
        if isinstance(kv_in, dict) and kv_in.get("do_remote_decode"):
            s.prefill_legs += 1
            kv_out = {
                "do_remote_prefill": True, "do_remote_decode": False,
                "remote_block_ids": list(range(self._next_block, self._next_block + n_blocks)),
                "remote_engine_id": c.engine_id, "remote_host": "127.0.0.1",
                "remote_port": c.side_channel_port, "tp_size": 1,
            }
            self._next_block += n_blocks
        elif isinstance(kv_in, dict) and kv_in.get("do_remote_prefill"):
            ids = kv_in.get("remote_block_ids")
            if isinstance(ids, list) and ids and kv_in.get("remote_engine_id"):
                s.transfers += 1
                s.xfer_seconds += 0.0005 * len(ids)
                s.xfer_bytes += 32768.0 * len(ids)
            else:
                s.failed_transfers += 1  # vLLM then recomputes the prompt locally

        rid = request.headers.get("X-Request-Id") or uuid.uuid4().hex
        rid = ("chatcmpl-" if chat else "cmpl-") + rid
        created = int(time.time())
        headers = {"x-request-id": request.headers.get("X-Request-Id", rid)}
        if c.ttft_ms > 0:
            await asyncio.sleep(c.ttft_ms / 1000)
        first = time.monotonic()
        reset_after = faults.fail_after_chunks if faults is not None else None
        request[STALL_AFTER] = faults.stall_after_chunks if faults is not None else None
        if body.get("stream") is True:
            resp = await self._stream(request, body, chat, rid, created, n_prompt, n_out,
                                      headers, reset_after)
            self._observe(started, first, time.monotonic(), n_out)
            return resp
        if c.itl_ms > 0 and n_out > 1:
            await asyncio.sleep(c.itl_ms * (n_out - 1) / 1000)
        end = time.monotonic()
        self._observe(started, first, end, n_out)
        start = _continued_from(body, chat)
        text = "".join(_token(start + i) for i in range(n_out))
        usage = {"prompt_tokens": n_prompt, "total_tokens": n_prompt + n_out,
                 "completion_tokens": n_out, "prompt_tokens_details": None}
        if chat:
            choice: dict[str, Any] = {
                "index": 0, "message": {"role": "assistant", "content": text,
                                        "reasoning_content": None, "tool_calls": []},
                "logprobs": None, "finish_reason": "length", "stop_reason": None}
            obj = "chat.completion"
        else:
            choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": "length",
                      "stop_reason": None, "prompt_logprobs": None}
            obj = "text_completion"
        answer: dict[str, Any] = {"id": rid, "object": obj, "created": created, "model": c.model,
                                  "choices": [choice], "usage": usage, "kv_transfer_params": kv_out}
        if c.per_request_metrics:
            answer["metrics"] = {
                "time_to_first_token_ms": (first - started) * 1000, "queue_time_ms": 0.0,
                "generation_time_ms": (end - first) * 1000,
                "mean_itl_ms": (end - first) * 1000 / (n_out - 1) if n_out > 1 else None,
                "tokens_per_second": n_out / (end - started) if end > started else None}
        payload = json.dumps(answer).encode()
        s.generation_tokens += n_out
        if reset_after is not None:
            # Headers and part of the body, then a reset: a worker dying mid-answer.
            s.failed += 1
            resp = web.StreamResponse(status=200, headers=headers)
            resp.content_type = "application/json"
            resp.content_length = len(payload)
            await resp.prepare(request)
            await resp.write(payload[: len(payload) // 2])
            _reset(request)
            return resp
        s.completed += 1
        return web.Response(body=payload, headers=headers, content_type="application/json")

    async def _stream(self, request: web.Request, body: dict[str, Any], chat: bool, rid: str,
                      created: int, n_prompt: int, n_out: int, headers: dict[str, str],
                      reset_after: int | None) -> web.StreamResponse:
        c, s = self.config, self.stats
        obj = "chat.completion.chunk" if chat else "text_completion"
        head = (f'data: {{"id":"{rid}","object":"{obj}","created":{created},'
                f'"model":{json.dumps(c.model)},"choices":[{{"index":0,')
        resp = web.StreamResponse(status=200, headers=headers)
        resp.content_type = "text/event-stream"
        resp.headers["Cache-Control"] = "no-cache"
        await resp.prepare(request)
        chunks: list[str] = []
        if chat:
            chunks.append(head + '"delta":{"role":"assistant","content":""},"logprobs":null,'
                          '"finish_reason":null}]}\n\n')
        # Like greedy decoding, the answer is a function of the text it continues.
        start = _continued_from(body, chat)
        ids = '"token_ids":[{}],' if body.get("return_token_ids") else ""
        for i in range(n_out):
            last = i == n_out - 1
            finish = '"length"' if last else "null"
            if ids:
                head_i = head + ids.format(TOKEN_ID0 + start + i)
            else:
                head_i = head
            if chat:
                chunks.append(f'{head_i}"delta":{{"content":{json.dumps(_token(start + i))}}},'
                              f'"logprobs":null,"finish_reason":{finish}}}]}}\n\n')
            else:
                chunks.append(f'{head_i}"text":{json.dumps(_token(start + i))},"logprobs":null,'
                              f'"finish_reason":{finish},"stop_reason":null}}]}}\n\n')
        opts = body.get("stream_options")
        if isinstance(opts, dict) and opts.get("include_usage"):
            usage = {"prompt_tokens": n_prompt, "total_tokens": n_prompt + n_out,
                     "completion_tokens": n_out}
            chunks.append(f'data: {{"id":"{rid}","object":"{obj}","created":{created},'
                          f'"model":{json.dumps(c.model)},"choices":[],'
                          f'"usage":{json.dumps(usage)}}}\n\n')
        chunks.append("data: [DONE]\n\n")
        delay = c.itl_ms / 1000
        first_token = 1 if chat else 0  # the role chunk goes out with the first token
        t_first = time.monotonic()
        for i, chunk in enumerate(chunks):
            if reset_after is not None and i >= reset_after:
                s.failed += 1
                _reset(request)
                return resp
            if request.get(STALL_AFTER) is not None and i >= request[STALL_AFTER]:
                s.failed += 1
                await asyncio.Event().wait()  # a stalled worker: until the client goes away
            k = i - first_token  # which token this chunk carries
            if delay > 0 and 0 < k < n_out:
                # An absolute schedule: a late wake-up is caught up, not added up,
                # so the rate holds even below the event loop's timer resolution.
                wait = t_first + k * delay - time.monotonic()
                if wait > 0:
                    await asyncio.sleep(wait)
            await resp.write(chunk.encode())
            if i >= first_token and i < first_token + n_out:
                s.generation_tokens += 1
        await resp.write_eof()
        s.completed += 1
        return resp

    def _observe(self, started: float, first: float, end: float, n_out: int) -> None:
        """Feed the engine histograms as vLLM would: no queue here, prefill is the TTFT."""
        e = self.engine
        e["queue"].observe(0.0)
        e["prefill"].observe(first - started)
        e["ttft"].observe(first - started)
        if n_out > 1:
            e["itl"].observe((end - first) / (n_out - 1), weight=n_out - 1)
        e["e2e"].observe(end - started)

    def _cache(self, prompt: str) -> int:
        """Record the prompt's blocks like vLLM's prefix cache; count hits. Returns the blocks."""
        chars = self.config.block_size * CHARS_PER_TOKEN
        n_full = len(prompt) // chars
        h = 0
        hits = 0
        for i in range(n_full):
            h = hash((h, prompt[i * chars:(i + 1) * chars]))
            if h in self._blocks:
                self._blocks.move_to_end(h)
                hits += 1
            else:
                self._blocks[h] = None
        while len(self._blocks) > self.config.kv_blocks:
            self._blocks.popitem(last=False)
        self.stats.prefix_hits += hits * self.config.block_size
        return max(1, math.ceil(len(prompt) / chars))


def _token(i: int) -> str:
    return f" t{i}"


TOKEN_ID0 = 1000  # token i's id, for return_token_ids
_LAST_TOKEN = re.compile(r" t(\d+)$")


def _continued_from(body: dict[str, Any], chat: bool) -> int:
    """Where an answer that continues earlier output picks up: after its last
    mock token (a final assistant message with continue_final_message, or a
    prompt that ends in mock text or mock token ids)."""
    if chat:
        msgs = body.get("messages")
        if not body.get("continue_final_message") or not isinstance(msgs, list) or not msgs:
            return 0
        last = msgs[-1]
        text = last.get("content") if isinstance(last, dict) else None
    else:
        text = body.get("prompt")
        if isinstance(text, list) and text and isinstance(text[-1], int):
            return text[-1] - TOKEN_ID0 + 1 if text[-1] >= TOKEN_ID0 else 0
    m = _LAST_TOKEN.search(text) if isinstance(text, str) else None
    return int(m.group(1)) + 1 if m else 0


def _prompt_text(body: dict[str, Any], chat: bool) -> str:
    if chat:
        msgs = body.get("messages")
        parts: list[str] = []
        if isinstance(msgs, list):
            for m in msgs:
                content = m.get("content") if isinstance(m, dict) else None
                if isinstance(content, str):
                    parts.append(content)
                elif isinstance(content, list):
                    parts += [p["text"] for p in content
                              if isinstance(p, dict) and isinstance(p.get("text"), str)]
        return "\n".join(parts)
    p = body.get("prompt")
    if isinstance(p, str):
        return p
    if isinstance(p, list):
        return "".join(x if isinstance(x, str) else "xxxx" for x in p)
    return ""


def _reset(request: web.Request) -> None:
    transport = request.transport
    if transport is not None:
        transport.abort()


def _error(status: int, message: str, type_: str = "BadRequestError",
           param: str | None = None) -> web.Response:
    # vLLM's error shape.
    return web.json_response({"error": {"message": message, "type": type_, "param": param,
                                        "code": status}}, status=status)


# --------------------------------------------------------------------------- CLI


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m pdbox.devtools.mock_openai",
                                 description="A mock vLLM OpenAI server for router tests.")
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=0, help="0 picks a free port (printed)")
    ap.add_argument("--model", default="smollm2", help="served model name")
    ap.add_argument("--tokens", type=int, default=16, help="tokens per answer (at most)")
    ap.add_argument("--itl-ms", type=float, default=0.0, help="delay between tokens")
    ap.add_argument("--ttft-ms", type=float, default=0.0, help="delay before the first token")
    ap.add_argument("--max-model-len", type=int, default=4096)
    ap.add_argument("--fail-status", type=int, default=None,
                    help="answer every completion with this HTTP status")
    ap.add_argument("--fail-after-chunks", type=int, default=None,
                    help="reset the connection after this many streamed chunks")
    ap.add_argument("--hang", action="store_true", help="accept requests and never answer")
    ap.add_argument("--stall-after-chunks", type=int, default=None,
                    help="stop sending after this many streamed chunks (a stalled worker)")
    ap.add_argument("--uvloop", action="store_true", help="run on uvloop if installed")
    return ap.parse_args(argv)


async def _serve(args: argparse.Namespace) -> None:
    cfg = MockConfig(model=args.model, tokens=args.tokens, itl_ms=args.itl_ms,
                     ttft_ms=args.ttft_ms, max_model_len=args.max_model_len)
    faults = Faults(fail_status=args.fail_status, fail_after_chunks=args.fail_after_chunks,
                    hang=args.hang, stall_after_chunks=args.stall_after_chunks)
    server = MockServer(cfg, faults)
    url = await server.start(args.host, args.port)
    print(url, flush=True)
    try:
        await asyncio.Event().wait()
    finally:
        await server.stop()


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    run = asyncio.run
    if args.uvloop:
        with contextlib.suppress(ImportError):
            import uvloop

            run = uvloop.run
    with contextlib.suppress(KeyboardInterrupt):
        run(_serve(args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
