"""A client for the control API of a running pdbox (docs/CONTROL_API.md).

Every command other than `up` is a client of this API, as every ollama command
other than `serve` is. The client is async (the TUI polls it from its event
loop); CLI commands use `ControlClient.call()`, which runs one coroutine on a
fresh loop and closes the HTTP session afterwards.

Every failure a user can meet becomes a `ControlError` whose str() is one
sentence: "pdbox is not running" when nothing listens, the server's own error
message when it refuses a request.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar

import aiohttp

from pdbox import runfolder

NOT_RUNNING = "pdbox is not running (start it with: pdbox up)"
PREFIX = "/pdbox/v1"
# Control calls are small and local; a pdbox that takes longer than this is stuck,
# and the operator is better told so than left waiting.
DEFAULT_TIMEOUT_S = 10.0

T = TypeVar("T")


class ControlError(Exception):
    """A control call that failed. str() is one sentence meant for the user."""

    def __init__(self, message: str, status: int | None = None):
        super().__init__(message)
        self.status = status


class ControlClient:
    """Talks to one pdbox's control API. Satisfies the TUI's `StatusSource`."""

    def __init__(self, base_url: str, token: str, *, timeout_s: float = DEFAULT_TIMEOUT_S,
                 endpoint: str | None = None):
        self.base_url = base_url.rstrip("/")
        self.token = token
        self.timeout_s = timeout_s
        # The OpenAI endpoint, known from the run folder before the first status call.
        self.chat_url: str | None = endpoint
        self.model: str | None = None
        self._session: aiohttp.ClientSession | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    @classmethod
    def from_run_folder(cls, **kwargs: Any) -> ControlClient:
        """The client of the live pdbox for this PDBOX_HOME, or ControlError."""
        try:
            info = runfolder.read()
        except runfolder.NotRunning as exc:
            raise ControlError(str(exc)) from None
        return cls(info.control_url, info.token, endpoint=info.endpoint, **kwargs)

    # ------------------------------------------------------------------ plumbing

    def _http(self) -> aiohttp.ClientSession:
        # A session belongs to the loop it was made on; `call()` runs each CLI call
        # on a new loop, so make a new session whenever the loop changed.
        loop = asyncio.get_running_loop()
        if self._session is None or self._session.closed or self._loop is not loop:
            self._session = aiohttp.ClientSession(
                headers={"Authorization": f"Bearer {self.token}"},
                timeout=aiohttp.ClientTimeout(total=self.timeout_s),
            )
            self._loop = loop
        return self._session

    async def close(self) -> None:
        if self._session is not None and not self._session.closed:
            await self._session.close()
        self._session = None

    async def _request(self, method: str, path: str, body: dict[str, Any] | None = None,
                       params: dict[str, str] | None = None) -> dict[str, Any]:
        url = self.base_url + PREFIX + path
        try:
            async with self._http().request(method, url, json=body, params=params) as resp:
                text = await resp.text()
                if resp.status >= 400:
                    raise ControlError(error_message(text, resp.status), resp.status)
                if not text:
                    return {}
                try:
                    data = json.loads(text)
                except ValueError:
                    raise ControlError(
                        f"pdbox answered {method} {path} with something that is not JSON."
                    ) from None
                return data if isinstance(data, dict) else {"value": data}
        except aiohttp.ClientConnectorError:
            raise ControlError(NOT_RUNNING) from None
        except TimeoutError:
            raise ControlError(
                f"pdbox did not answer {method} {path} within {self.timeout_s:g} s."
            ) from None
        except aiohttp.ClientError as exc:
            raise ControlError(f"the control API failed: {exc}.") from None

    # ------------------------------------------------------------------ routes

    async def status(self) -> dict[str, Any]:
        snap = await self._request("GET", "/status")
        # Keep the endpoint current: it is where the chat pane sends its requests.
        if isinstance(snap.get("endpoint"), str):
            self.chat_url = snap["endpoint"]
        return snap

    async def scale(self, role: str, replicas: int | str) -> dict[str, Any]:
        """Pin `role` to `replicas` workers, or hand it back to the autoscaler ("auto")."""
        return await self._request("POST", "/scale", {"role": role, "replicas": replicas})

    async def set_policy(self, policy: str) -> dict[str, Any]:
        return await self._request("POST", "/policy", {"policy": policy})

    async def restart(self, worker_id: str) -> dict[str, Any]:
        return await self._request("POST", f"/workers/{worker_id}/restart")

    async def logs(self, worker_id: str, lines: int = 200) -> list[str]:
        data = await self._request("GET", f"/logs/{worker_id}", params={"lines": str(lines)})
        got = data.get("lines", [])
        return [str(line) for line in got] if isinstance(got, list) else []

    async def shutdown(self) -> dict[str, Any]:
        return await self._request("POST", "/shutdown")

    async def events(self) -> AsyncIterator[dict[str, Any]]:
        """The SSE event stream, one decoded `data:` payload at a time, until pdbox stops."""
        url = self.base_url + PREFIX + "/events"
        # No total timeout: the stream is meant to stay open. Connecting is bounded.
        timeout = aiohttp.ClientTimeout(total=None, sock_connect=self.timeout_s)
        try:
            async with self._http().get(url, timeout=timeout) as resp:
                if resp.status >= 400:
                    raise ControlError(error_message(await resp.text(), resp.status),
                                       resp.status)
                async for payload in sse_data(resp.content):
                    try:
                        event = json.loads(payload)
                    except ValueError:
                        continue
                    if isinstance(event, dict):
                        yield event
        except aiohttp.ClientConnectorError:
            raise ControlError(NOT_RUNNING) from None
        except aiohttp.ClientError as exc:
            raise ControlError(f"the control API's event stream failed: {exc}.") from None

    # ------------------------------------------------------------------ sync facade

    def call(self, fn: Callable[[ControlClient], Awaitable[T]]) -> T:
        """Run `fn(self)` to completion from synchronous code (CLI commands)."""

        async def once() -> T:
            try:
                return await fn(self)
            finally:
                await self.close()

        return asyncio.run(once())

    def sync_status(self) -> dict[str, Any]:
        return self.call(lambda c: c.status())

    def sync_scale(self, role: str, replicas: int | str) -> dict[str, Any]:
        return self.call(lambda c: c.scale(role, replicas))

    def sync_set_policy(self, policy: str) -> dict[str, Any]:
        return self.call(lambda c: c.set_policy(policy))

    def sync_restart(self, worker_id: str) -> dict[str, Any]:
        return self.call(lambda c: c.restart(worker_id))

    def sync_logs(self, worker_id: str, lines: int = 200) -> list[str]:
        return self.call(lambda c: c.logs(worker_id, lines))

    def sync_shutdown(self) -> dict[str, Any]:
        return self.call(lambda c: c.shutdown())


def error_message(body: str, status: int) -> str:
    """The one sentence in an OpenAI-shaped error body, or a plain one for anything else."""
    try:
        data = json.loads(body)
    except ValueError:
        data = None
    if isinstance(data, dict):
        err = data.get("error")
        if isinstance(err, dict) and isinstance(err.get("message"), str):
            return err["message"]
        if isinstance(err, str):
            return err
        if isinstance(data.get("message"), str):
            return data["message"]
    if status == 401:
        return "the control API refused the token (is this the token of the running pdbox?)."
    return f"the control API answered HTTP {status}."


async def sse_data(stream: aiohttp.StreamReader) -> AsyncIterator[str]:
    """The `data:` payloads of an SSE stream; multi-line data is joined with newlines.

    Shared by the control events and the OpenAI chat stream, which use the same framing.
    """
    lines: list[str] = []
    async for raw in stream:
        line = raw.decode("utf-8", errors="replace").rstrip("\r\n")
        if not line:
            if lines:
                yield "\n".join(lines)
                lines = []
            continue
        if line.startswith(":"):
            continue  # comment / keep-alive
        if line.startswith("data:"):
            value = line[5:]
            lines.append(value[1:] if value.startswith(" ") else value)
    if lines:
        yield "\n".join(lines)
