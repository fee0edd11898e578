"""Fuzzing the OpenAI routes of a real pdbox router (attach mode, mock workers).

Whatever arrives — malformed or deeply nested JSON, huge strings, invalid
UTF-8, wrong types, hostile headers, broken HTTP framing — the answer is a
4xx (or a 200 when the input happens to be valid): never a 5xx, never a
crash. Examples are bounded and derandomized, so the run takes seconds and
finds the same cases every time. The figures printed at the end go into
docs/RELIABILITY.md.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterator
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.faults.conftest import LiveBox, status_of

EXAMPLES = 150
FUZZ = settings(max_examples=EXAMPLES, derandomize=True, deadline=None, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
ROUTES = ("/v1/chat/completions", "/v1/completions")
TALLY: Counter[str] = Counter()


@pytest.fixture(scope="module")
def box(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveBox]:
    b = LiveBox(tmp_path_factory.mktemp("fuzz-router") / "run").start()
    yield b
    b.stop()
    print(f"\nrouter fuzz tally: {dict(sorted(TALLY.items()))}")


def check(box: LiveBox, route: str, status: int, headers: dict[str, str], body: bytes,
          label: str) -> None:
    TALLY[f"{label}:cases"] += 1
    if status >= 500 and passed_through_worker_crash(headers, body):
        # The router did its job (validated, routed, passed the worker's answer
        # on); the mock worker crashed on input real vLLM answers with a 400.
        TALLY[f"{label}:mock-worker-5xx"] += 1
        return
    TALLY[f"{label}:{status // 100}xx"] += 1
    assert status < 500, f"{route} answered {status}: {body[:300]!r}"
    if status >= 400 and headers.get("content-type", "").startswith("application/json"):
        err = json.loads(body)["error"]
        assert isinstance(err["message"], str) and err["message"]


def passed_through_worker_crash(headers: dict[str, str], body: bytes) -> bool:
    return "x-pdbox-decode-worker" in headers and body.startswith(b"500 Internal Server Error")


def post(box: LiveBox, route: str, raw: bytes, label: str,
         headers: dict[str, str] | None = None) -> int:
    h = {"Content-Type": "application/json", **(headers or {})}
    status, rh, body = box.request("POST", route, raw, h)
    check(box, route, status, rh, body, label)
    return status


# ------------------------------------------------------------------ strategies

json_scalar = st.one_of(
    st.none(), st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=40),
)
json_value = st.recursive(
    json_scalar,
    lambda inner: st.one_of(st.lists(inner, max_size=5),
                            st.dictionaries(st.text(max_size=10), inner, max_size=5)),
    max_leaves=20,
)
FIELDS = ("model", "messages", "prompt", "max_tokens", "max_completion_tokens", "stream", "n",
          "priority", "user", "temperature", "stream_options", "kv_transfer_params", "logprobs",
          "stop", "seed", "tools", "response_format")


def valid_body(route: str) -> dict[str, Any]:
    if route.endswith("chat/completions"):
        return {"model": "smollm2", "messages": [{"role": "user", "content": "hi"}],
                "max_tokens": 4}
    return {"model": "smollm2", "prompt": "hi", "max_tokens": 4}


@st.composite
def mutated_body(draw: st.DrawFn) -> tuple[str, Any]:
    """A valid request with fields replaced by values of any type, or extra keys."""
    route = draw(st.sampled_from(ROUTES))
    body = valid_body(route)
    for key in draw(st.lists(st.sampled_from(FIELDS), max_size=4, unique=True)):
        body[key] = draw(json_value)
    if draw(st.booleans()):
        body.update(draw(st.dictionaries(st.text(max_size=12), json_value, max_size=3)))
    return route, body


@st.composite
def message_lists(draw: st.DrawFn) -> tuple[str, Any]:
    msg = st.one_of(
        json_value,
        st.fixed_dictionaries({"role": st.one_of(st.text(max_size=12), json_value),
                               "content": json_value}),
        st.fixed_dictionaries({"role": st.sampled_from(["user", "system", "assistant", "tool"]),
                               "content": st.one_of(
                                   st.text(max_size=200),
                                   st.lists(st.fixed_dictionaries(
                                       {"type": st.text(max_size=8), "text": json_value}),
                                       max_size=3))}),
    )
    return "/v1/chat/completions", {"model": "smollm2", "max_tokens": 2,
                                    "messages": draw(st.lists(msg, max_size=4)),
                                    "stream": draw(st.booleans())}


# ----------------------------------------------------------------------- tests


@settings(FUZZ, max_examples=300)
@given(case=mutated_body())
def test_wrong_types_and_unknown_fields(box: LiveBox, case: tuple[str, Any]) -> None:
    route, body = case
    post(box, route, json.dumps(body).encode(), "types")


@settings(FUZZ, max_examples=300)
@given(case=message_lists())
def test_messages_of_any_shape(box: LiveBox, case: tuple[str, Any]) -> None:
    route, body = case
    post(box, route, json.dumps(body).encode(), "messages")


@FUZZ
@given(route=st.sampled_from(ROUTES), data=st.binary(max_size=2048))
def test_arbitrary_bytes(box: LiveBox, route: str, data: bytes) -> None:
    post(box, route, data, "bytes")


@FUZZ
@given(route=st.sampled_from(ROUTES), cut=st.integers(min_value=0, max_value=200),
       junk=st.binary(min_size=1, max_size=8))
def test_truncated_json_and_invalid_utf8(box: LiveBox, route: str, cut: int, junk: bytes) -> None:
    raw = json.dumps(valid_body(route)).encode()
    cut = min(cut, len(raw))
    bad = raw[:cut] + junk + raw[cut:]
    post(box, route, raw[:cut], "truncated")
    post(box, route, bad, "invalid-utf8")
    # Invalid UTF-8 inside a string value.
    post(box, route, raw.replace(b'"hi"', b'"h' + b"\xff\xfe" + junk + b'i"'), "invalid-utf8")


@FUZZ
@given(route=st.sampled_from(ROUTES), depth=st.integers(min_value=1, max_value=60_000),
       kind=st.sampled_from(["list", "dict", "in-field"]))
def test_deep_nesting(box: LiveBox, route: str, depth: int, kind: str) -> None:
    if kind == "list":
        raw = b"[" * depth + b"]" * depth
    elif kind == "dict":
        raw = b'{"a":' * depth + b"1" + b"}" * depth
    else:
        body = json.dumps(valid_body(route)).encode()
        raw = body[:-1] + b', "stop": ' + b"[" * depth + b"]" * depth + b"}"
    post(box, route, raw, "nesting")


@FUZZ
@given(route=st.sampled_from(ROUTES), size=st.integers(min_value=0, max_value=140_000),
       ch=st.sampled_from(["x", "é", "\u4e2d", "\U0001f600", "\\u0000", "\x00"]))
def test_huge_strings(box: LiveBox, route: str, size: int, ch: str) -> None:
    body = valid_body(route)
    key = "messages" if "chat" in route else "prompt"
    if key == "messages":
        body["messages"][0]["content"] = ch * size
    else:
        body["prompt"] = ch * size
    post(box, route, json.dumps(body).encode(), "huge")


HEADER_NAMES = ("X-Request-Id", "x-session-id", "x-pdbox-priority", "Authorization",
                "Content-Type", "Accept", "X-Forwarded-For", "Cookie")


@FUZZ
@given(route=st.sampled_from(ROUTES), name=st.sampled_from(HEADER_NAMES),
       value=st.binary(max_size=300), stream=st.booleans())
def test_hostile_header_values(box: LiveBox, route: str, name: str, value: bytes,
                               stream: bool) -> None:
    """Any bytes in a header value (CR, LF, NUL, non-ASCII), sent over a raw socket."""
    body = json.dumps({**valid_body(route), "stream": stream}).encode()
    ctype = b"" if name == "Content-Type" else b"Content-Type: application/json\r\n"
    req = (f"POST {route} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n".encode()
           + ctype + name.encode() + b": " + value + b"\r\n"
           + f"Content-Length: {len(body)}\r\n\r\n".encode() + body)
    answer = box.raw(req)
    status = status_of(answer)
    TALLY["headers:cases"] += 1
    # An injected CR/LF splits the header: aiohttp's parser answers 400 or, for
    # a bare LF, reads it as a new header line. Either way: an answer, never a 5xx.
    assert status is not None, f"no HTTP answer to {value!r}: {answer[:200]!r}"
    TALLY[f"headers:{status // 100}xx"] += 1
    assert status < 500, answer[:500]
    # The answer must not echo an injected header line.
    head = answer.split(b"\r\n\r\n", 1)[0]
    assert b"\r\ninjected:" not in head.lower()


@FUZZ
@given(route=st.sampled_from(ROUTES), rid=st.text(max_size=200), sid=st.text(max_size=200),
       prio=st.text(max_size=20))
def test_header_text_passed_to_workers(box: LiveBox, route: str, rid: str, sid: str,
                                       prio: str) -> None:
    """Printable-but-odd header text reaches the worker leg and the answer's headers."""
    def clean(s: str) -> str:
        return "".join(c for c in s if c not in "\r\n\x00")

    body = json.dumps(valid_body(route)).encode()
    head = (f"POST {route} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
            "Content-Type: application/json\r\n").encode()
    for name, v in (("X-Request-Id", rid), ("x-session-id", sid), ("x-pdbox-priority", prio)):
        if v:
            head += name.encode() + b": " + clean(v).encode("utf-8") + b"\r\n"
    answer = box.raw(head + f"Content-Length: {len(body)}\r\n\r\n".encode() + body)
    status = status_of(answer)
    TALLY["header-text:cases"] += 1
    assert status is not None and status < 500, answer[:500]
    TALLY[f"header-text:{status // 100}xx"] += 1


@FUZZ
@given(method=st.sampled_from(["GET", "PUT", "DELETE", "PATCH", "OPTIONS", "HEAD", "TRACE"]),
       path=st.sampled_from([*ROUTES, "/v1/models", "/health", "/metrics", "/v1/embeddings",
                             "/v1/../pdbox/v1/status", "/%2e%2e/etc/passwd", "//v1/models"]))
def test_other_methods_and_paths(box: LiveBox, method: str, path: str) -> None:
    status, headers, body = box.request(method, path)
    check(box, path, status, headers, body, "methods")


def test_framing_garbage(box: LiveBox) -> None:
    """HTTP that is not HTTP: each gets an answer (400) or a closed socket, never a crash."""
    cases = [
        b"\x00\x01\x02\r\n\r\n",
        b"POST /v1/completions HTTP/1.1\r\nContent-Length: -5\r\n\r\n",
        b"POST /v1/completions HTTP/1.1\r\nContent-Length: 99999999999999999999\r\n\r\n{}",
        b"POST /v1/completions HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
        b"POST /v1/completions HTTP/1.1\r\nContent-Length: 2\r\nContent-Length: 3\r\n\r\n{}",
        b"POST /v1/completions HTTP/9.9\r\n\r\n",
        b"POST " + b"/v1" * 20000 + b" HTTP/1.1\r\n\r\n",
        b"POST /v1/completions HTTP/1.1\r\n" + b"X-A: b\r\n" * 500 + b"\r\n",
        b"POST /v1/completions HTTP/1.1\r\nX-Big: " + b"a" * 100_000 + b"\r\n\r\n",
    ]
    for raw in cases:
        # Where the request line parses, ask the server to close after answering.
        raw = raw.replace(b"HTTP/1.1\r\n", b"HTTP/1.1\r\nConnection: close\r\n", 1)
        status = status_of(box.raw(raw, timeout=10))
        TALLY["framing:cases"] += 1
        assert status is None or status < 500, raw[:80]
    # The box is still fine afterwards.
    status, _, _ = box.request("GET", "/health")
    assert status == 200
    status, _, body = box.request("POST", "/v1/completions",
                                  json.dumps(valid_body("/v1/completions")).encode(),
                                  {"Content-Type": "application/json"})
    assert status == 200, body
