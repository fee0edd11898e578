"""Fuzzing the control API (/pdbox/v1/...) of a real attach-mode pdbox.

Without the token every route answers 401, whatever else arrives. With it,
scale and policy bodies of any shape, any worker id and any `lines` value
get a 4xx or a 200: never a 5xx. The figures printed at the end go into
docs/RELIABILITY.md.
"""

from __future__ import annotations

import json
import urllib.parse
from collections import Counter
from collections.abc import Iterator
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.faults.conftest import LiveBox, status_of

FUZZ = settings(max_examples=150, derandomize=True, deadline=None, database=None,
                suppress_health_check=[HealthCheck.too_slow])
TALLY: Counter[str] = Counter()
GUARDED = [("GET", "/pdbox/v1/status"), ("GET", "/pdbox/v1/logs/pdbox"),
           ("POST", "/pdbox/v1/scale"), ("POST", "/pdbox/v1/policy"),
           ("POST", "/pdbox/v1/workers/aggregated-0/restart"), ("POST", "/pdbox/v1/shutdown"),
           ("GET", "/pdbox/v1/events")]


@pytest.fixture(scope="module")
def box(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveBox]:
    b = LiveBox(tmp_path_factory.mktemp("fuzz-control") / "run").start()
    yield b
    b.stop()
    print(f"\ncontrol fuzz tally: {dict(sorted(TALLY.items()))}")


json_value = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(min_value=-(2**70), max_value=2**70),
              st.floats(), st.text(max_size=30)),
    lambda inner: st.one_of(st.lists(inner, max_size=4),
                            st.dictionaries(st.text(max_size=8), inner, max_size=4)),
    max_leaves=12,
)


def record(label: str, status: int | None, answer: Any = b"") -> None:
    TALLY[f"{label}:cases"] += 1
    assert status is not None, f"no HTTP answer: {answer!r:.300}"
    TALLY[f"{label}:{status // 100}xx"] += 1
    assert status < 500, f"{label}: {status} {answer!r:.300}"


@FUZZ
@given(route=st.sampled_from(GUARDED), auth=st.binary(max_size=120))
def test_any_authorization_header_but_the_token_is_401(box: LiveBox, route: tuple[str, str],
                                                       auth: bytes) -> None:
    method, path = route
    token = box.token.encode()
    if token in auth:
        auth = auth.replace(token, b"x")
    body = b'{"role": "aggregated", "replicas": 1}'
    req = (f"{method} {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
           "Content-Type: application/json\r\n").encode()
    req += b"Authorization: " + auth + b"\r\n" + f"Content-Length: {len(body)}\r\n\r\n".encode()
    answer = box.raw(req + body, timeout=10)
    status = status_of(answer)
    record("auth", status, answer[:300])
    # A value with CR/LF is refused by the HTTP parser (400) before any route runs.
    assert status in (400, 401), answer[:300]


def test_near_miss_tokens_are_401(box: LiveBox) -> None:
    # Whitespace around a header value is not part of it (HTTP), so no such case here.
    for form in ("", "Bearer", "Bearer ", "bearer {t}", "{t}", "Basic {t}", "Bearer {t}x",
                 "Bearer  {t}", "Bearer {t}{t}"):
        value = form.format(t=box.token)
        status, _, body = box.request("POST", "/pdbox/v1/policy", b'{"policy": "round_robin"}',
                                      {"Authorization": value,
                                       "Content-Type": "application/json"})
        record("near-miss", status, body)
        assert status == 401, (form, body)
    truncated = f"Bearer {box.token[:-1]}"
    status, _, body = box.request("POST", "/pdbox/v1/policy", b'{"policy": "round_robin"}',
                                  {"Authorization": truncated, "Content-Type": "application/json"})
    record("near-miss", status, body)
    assert status == 401


def authed(box: LiveBox) -> dict[str, str]:
    return {"Authorization": f"Bearer {box.token}", "Content-Type": "application/json"}


@FUZZ
@given(body=st.one_of(json_value, st.fixed_dictionaries({"role": json_value,
                                                          "replicas": json_value})))
def test_scale_bodies(box: LiveBox, body: Any) -> None:
    status, _, raw = box.request("POST", "/pdbox/v1/scale", json.dumps(body).encode(),
                                 authed(box))
    record("scale", status, raw)
    # Attached workers are not pdbox's to scale: nothing here may succeed.
    assert 400 <= status < 500, raw


@FUZZ
@given(body=st.one_of(json_value, st.fixed_dictionaries({"policy": json_value}),
                      st.binary(max_size=200)))
def test_policy_bodies(box: LiveBox, body: Any) -> None:
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    status, _, answer = box.request("POST", "/pdbox/v1/policy", raw, authed(box))
    record("policy", status, answer)


@FUZZ
@given(wid=st.text(min_size=1, max_size=80), lines=st.text(max_size=30))
def test_logs_and_restart_with_any_worker_id(box: LiveBox, wid: str, lines: str) -> None:
    q = urllib.parse.quote(wid, safe="")
    path = f"/pdbox/v1/logs/{q}?lines={urllib.parse.quote(lines, safe='')}"
    status, _, raw = box.request("GET", path, None, authed(box))
    record("logs", status, raw)
    status, _, raw = box.request("POST", f"/pdbox/v1/workers/{q}/restart", b"", authed(box))
    record("restart", status, raw)


def test_control_api_still_serves_after_fuzzing(box: LiveBox) -> None:
    status, _, raw = box.request("GET", "/pdbox/v1/status", None, authed(box))
    assert status == 200
    snap = json.loads(raw)
    assert [w["id"] for w in snap["workers"]] == ["aggregated-0"]
    status, _, _ = box.request("POST", "/pdbox/v1/policy", b'{"policy": "prefix"}', authed(box))
    assert status == 200
