"""The control API (/pdbox/v1/...): status, events, logs and operator actions.

Every route needs the bearer token that `pdbox up` wrote (mode 0600) into its
run folder. The contract is docs/CONTROL_API.md.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import math
from typing import Any, Protocol

from aiohttp import web

from pdbox.config import POLICIES
from pdbox.router.openai_errors import BadRequest, error_response, from_exc, read_json


class Core(Protocol):
    def status(self) -> dict[str, Any]: ...
    def subscribe(self) -> asyncio.Queue[dict[str, Any]]: ...
    def unsubscribe(self, q: asyncio.Queue[dict[str, Any]]) -> None: ...
    def log_tail(self, worker_id: str, lines: int) -> list[str] | None: ...
    async def scale(self, role: str, replicas: int | None) -> dict[str, Any]: ...
    async def scale_split(self, spec: str | None) -> dict[str, Any]: ...
    def set_policy(self, policy: str) -> None: ...
    def move_stream(self, request_id: str, to: str) -> dict[str, Any]: ...
    async def restart_worker(self, worker_id: str) -> None: ...
    def request_shutdown(self) -> None: ...


def add_routes(app: web.Application, core: Core, token: str) -> None:
    def authorized(request: web.Request) -> bool:
        got = request.headers.get("Authorization", "")
        # Header bytes that are not UTF-8 arrive surrogate-escaped; encode them
        # back as they came instead of failing (a 500) on a hostile header.
        return hmac.compare_digest(got.encode("utf-8", "surrogateescape"),
                                   f"Bearer {token}".encode())

    def guard(handler: Any) -> Any:
        async def wrapped(request: web.Request) -> web.StreamResponse:
            if not authorized(request):
                return error_response(401, "The control API needs the token from the run "
                                      "folder (Authorization: Bearer …).", "authentication_error")
            try:
                return await handler(request)
            except BadRequest as exc:
                return from_exc(exc)

        return wrapped

    async def status(request: web.Request) -> web.Response:
        return web.json_response(core.status(), dumps=_dumps)

    async def events(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream",
                                           "Cache-Control": "no-cache"})
        await resp.prepare(request)
        q = core.subscribe()
        try:
            while True:
                try:
                    ev = await asyncio.wait_for(q.get(), timeout=15)
                    await resp.write(f"data: {_dumps(ev)}\n\n".encode())
                except TimeoutError:
                    await resp.write(b": keep-alive\n\n")
        except ConnectionResetError:
            pass  # the client went away between two events
        # CancelledError (the client went away while we waited, or pdbox is
        # stopping) is left to propagate: swallowing it would hide the cancel
        # from whoever asked for it.
        finally:
            core.unsubscribe(q)
        return resp

    async def logs(request: web.Request) -> web.Response:
        wid = request.match_info["worker_id"]
        try:
            n = int(request.query.get("lines", "50"))
        except ValueError:
            raise BadRequest(400, "'lines' must be an integer.") from None
        n = max(1, min(n, 2000))
        lines = core.log_tail(wid, n)
        if lines is None:
            raise BadRequest(404, f"There is no worker {wid!r}.")
        return web.json_response({"worker": wid, "lines": lines})

    async def scale(request: web.Request) -> web.Response:
        body = await read_json(request, 64 * 1024)
        role = body.get("role")
        replicas = body.get("replicas")
        if not isinstance(role, str):
            raise BadRequest(400, "'role' must be a string.")
        if role == "split":
            if not isinstance(replicas, str) or not 0 < len(replicas) <= 64:
                raise BadRequest(400, "'replicas' of the split must be PREFILL/DECODE "
                                 "(e.g. \"60/40\" or \"1/0\") or \"auto\".")
            try:
                result = await core.scale_split(None if replicas == "auto" else replicas)
            except ValueError as exc:
                raise BadRequest(400, str(exc)) from None
            return web.json_response(result)
        if replicas == "auto":
            n = None
        elif isinstance(replicas, int) and not isinstance(replicas, bool) and 0 <= replicas <= 64:
            n = replicas
        else:
            raise BadRequest(400, "'replicas' must be an integer 0..64 or \"auto\".")
        try:
            result = await core.scale(role, n)
        except ValueError as exc:
            raise BadRequest(400, str(exc)) from None
        return web.json_response(result)

    async def policy(request: web.Request) -> web.Response:
        body = await read_json(request, 64 * 1024)
        p = body.get("policy")
        if p not in POLICIES:
            raise BadRequest(400, f"'policy' must be one of {', '.join(POLICIES)}.")
        core.set_policy(p)
        return web.json_response({"policy": p})

    async def restart(request: web.Request) -> web.Response:
        wid = request.match_info["worker_id"]
        try:
            await core.restart_worker(wid)
        except KeyError:
            raise BadRequest(404, f"There is no worker {wid!r}.") from None
        return web.json_response({"worker": wid, "restarting": True})

    async def move(request: web.Request) -> web.Response:
        rid = request.match_info["request_id"]
        body = await read_json(request, 64 * 1024)
        to = body.get("to")
        if not isinstance(to, str) or not to:
            raise BadRequest(400, "'to' must name a worker.")
        try:
            result = core.move_stream(rid, to)
        except KeyError as exc:
            raise BadRequest(404, str(exc.args[0])) from None
        except ValueError as exc:
            raise BadRequest(409, str(exc)) from None
        return web.json_response(result)

    async def shutdown(request: web.Request) -> web.Response:
        core.request_shutdown()
        return web.json_response({"stopping": True})

    r = app.router
    r.add_get("/pdbox/v1/status", guard(status))
    r.add_get("/pdbox/v1/events", guard(events))
    r.add_get("/pdbox/v1/logs/{worker_id}", guard(logs))
    r.add_post("/pdbox/v1/scale", guard(scale))
    r.add_post("/pdbox/v1/policy", guard(policy))
    r.add_post("/pdbox/v1/workers/{worker_id}/restart", guard(restart))
    r.add_post("/pdbox/v1/streams/{request_id}/move", guard(move))
    r.add_post("/pdbox/v1/shutdown", guard(shutdown))


def _clean(obj: Any) -> Any:
    """NaN and infinities are not JSON; the contract says unknown is null."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {str(k): _clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_clean(v) for v in obj]
    return obj


def _dumps(obj: Any) -> str:
    return json.dumps(_clean(obj), default=str)
