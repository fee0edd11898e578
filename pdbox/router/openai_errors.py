"""OpenAI-shaped errors and request validation, before any worker is contacted."""

from __future__ import annotations

import json
from typing import Any

from aiohttp import web


class BadRequest(Exception):
    def __init__(self, status: int, message: str, type_: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None,
                 headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type_
        self.param = param
        self.code = code
        self.headers = headers or {}


def error_body(status: int, message: str, type_: str = "invalid_request_error",
               param: str | None = None, code: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": type_, "param": param,
                      "code": code if code is not None else status}}


def error_response(status: int, message: str, type_: str = "invalid_request_error",
                   param: str | None = None, code: str | None = None,
                   headers: dict[str, str] | None = None) -> web.Response:
    return web.json_response(error_body(status, message, type_, param, code), status=status,
                             headers=headers)


def from_exc(exc: BadRequest) -> web.Response:
    return error_response(exc.status, exc.message, exc.type, exc.param, exc.code, exc.headers)


async def read_json(request: web.Request, limit: int) -> dict[str, Any]:
    return (await read_body(request, limit))[0]


async def read_body(request: web.Request, limit: int) -> tuple[dict[str, Any], bytes]:
    """The request's JSON object, and the bytes it came as."""
    ctype = request.headers.get("Content-Type", "")
    if ctype.split(";")[0].strip().lower() != "application/json":
        raise BadRequest(415, "Content-Type must be application/json.")
    if request.content_length is not None and request.content_length > limit:
        raise BadRequest(413, f"Request body is larger than the limit of {limit} bytes.")
    raw = await request.content.read(limit + 1)
    if len(raw) > limit:
        raise BadRequest(413, f"Request body is larger than the limit of {limit} bytes.")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise BadRequest(400, "Request body is not valid UTF-8.") from None
    try:
        body = json.loads(text)
    except RecursionError:
        raise BadRequest(400, "Request body is nested too deeply.") from None
    except ValueError as exc:
        raise BadRequest(400, f"Request body is not valid JSON: {exc}.") from None
    if not isinstance(body, dict):
        raise BadRequest(400, "Request body must be a JSON object.")
    return body, raw


def _int_field(body: dict[str, Any], key: str, lo: int, hi: int) -> int | None:
    v = body.get(key)
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, int):
        raise BadRequest(400, f"'{key}' must be an integer.", param=key)
    if not lo <= v <= hi:
        raise BadRequest(400, f"'{key}' must lie within {lo}..{hi}, not {v}.", param=key)
    return v


def _check_parts(parts: list[Any], i: int) -> None:
    """Content parts are objects with a string `type`; a text part carries a string.

    Caught here so that garbage never reaches a worker, whose answer to it
    (a 4xx from vLLM, a 5xx from a less careful server) is not ours to vouch for.
    """
    for j, part in enumerate(parts):
        if not isinstance(part, dict) or not isinstance(part.get("type"), str):
            raise BadRequest(400, f"messages[{i}].content[{j}] must be an object with a "
                             "string 'type'.", param="messages")
        if part["type"] == "text" and not isinstance(part.get("text"), str):
            raise BadRequest(400, f"messages[{i}].content[{j}].text must be a string.",
                             param="messages")


def _token_ids(p: Any) -> bool:
    return isinstance(p, list) and bool(p) and all(
        isinstance(x, int) and not isinstance(x, bool) and x >= 0 for x in p)


def _is_prompt(p: Any) -> bool:
    """What vLLM's completions endpoint takes: a string, a list of strings, a list of
    token ids, or a list of token-id lists (each list one prompt of a batch)."""
    if isinstance(p, str):
        return True
    if not isinstance(p, list) or not p:
        return False
    return (_token_ids(p) or all(isinstance(x, str) for x in p)
            or all(_token_ids(x) for x in p))


def validate(body: dict[str, Any], kind: str, max_model_len: int) -> int | None:
    """Check the fields the router relies on; return the requested max tokens."""
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise BadRequest(400, "'model' is required and must be a string.", param="model")
    if kind == "chat":
        msgs = body.get("messages")
        if not isinstance(msgs, list) or not msgs:
            raise BadRequest(400, "'messages' is required and must be a non-empty list.",
                             param="messages")
        for i, m in enumerate(msgs):
            if not isinstance(m, dict) or not isinstance(m.get("role"), str):
                raise BadRequest(400, f"messages[{i}] must be an object with a string 'role'.",
                                 param="messages")
            c = m.get("content")
            if c is not None and not isinstance(c, (str, list)):
                raise BadRequest(400, f"messages[{i}].content must be a string or a list.",
                                 param="messages")
            if isinstance(c, list):
                _check_parts(c, i)
    elif not _is_prompt(body.get("prompt")):
        raise BadRequest(400, "'prompt' is required: a string, a list of strings, a list of "
                         "token ids or a list of token-id lists, none of them empty.",
                         param="prompt")
    if "stream" in body and not isinstance(body["stream"], bool):
        raise BadRequest(400, "'stream' must be true or false.", param="stream")
    mt = _int_field(body, "max_tokens", 1, max_model_len)
    mct = _int_field(body, "max_completion_tokens", 1, max_model_len)
    _int_field(body, "n", 1, 16)
    return mct if mct is not None else mt
