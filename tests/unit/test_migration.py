"""The pure parts of stream migration: refusal, the continuation request, SSE splicing."""

from __future__ import annotations

import json
from typing import Any

import pytest

from pdbox.router.migration import (
    Splice,
    UpstreamError,
    refusal,
    upstream_body,
)
from pdbox.router.stalls import STEP_MARGIN, stall_bound_s
from tests.helpers import sse_events

CHAT = {"model": "m", "stream": True, "max_tokens": 10,
        "messages": [{"role": "user", "content": "count"}]}


def ev(obj: dict[str, Any]) -> bytes:
    return b"data: " + json.dumps(obj).encode() + b"\n\n"


def chat_chunk(content: str | None, cid: str = "chatcmpl-a", created: int = 1, role: bool = False,
               finish: str | None = None, model: str = "m") -> bytes:
    delta: dict[str, Any] = {"content": content}
    if role:
        delta = {"role": "assistant", "content": ""}
    return ev({"id": cid, "object": "chat.completion.chunk", "created": created, "model": model,
               "choices": [{"index": 0, "delta": delta, "logprobs": None,
                            "finish_reason": finish}]})


def usage_chunk(prompt: int, completion: int, cid: str = "chatcmpl-a") -> bytes:
    return ev({"id": cid, "object": "chat.completion.chunk", "created": 1, "model": "m",
               "choices": [], "usage": {"prompt_tokens": prompt, "completion_tokens": completion,
                                        "total_tokens": prompt + completion}})


def test_stall_bound_is_a_margin_over_the_longest_step_the_worker_takes() -> None:
    # A 2048-token chunk at 2048 tokens/s is a 1 s step, plus the ITL target.
    assert stall_bound_s(2048, 2048.0, 0.25) == pytest.approx(STEP_MARGIN * 1.25)
    # A machine that prefills 5x slower waits 5x longer for the same chunk.
    slow = stall_bound_s(2048, 2048.0 / 5, 0.25)
    assert slow == pytest.approx(STEP_MARGIN * 5.25)
    # No speed learnt: never a division by zero.
    assert stall_bound_s(2048, 0.0, 0.25) > 0


@pytest.mark.parametrize(("body", "kind", "why"), [
    ({**CHAT, "n": 2}, "chat", "n > 1"),
    ({**CHAT, "logprobs": True}, "chat", "logprobs"),
    ({**CHAT, "top_logprobs": 2}, "chat", "logprobs"),
    ({"prompt": "x", "logprobs": 0}, "completions", "logprobs"),
    ({"prompt": "x", "echo": True}, "completions", "echo"),
    ({"prompt": ["a", "b"]}, "completions", "several prompts"),
    ({**CHAT, "response_format": {"type": "json_object"}}, "chat", "structured output"),
    ({**CHAT, "guided_json": {}}, "chat", "structured output"),
    ({"prompt": "x", "use_beam_search": True}, "completions", "best_of / beam search"),
])
def test_refusal(body: dict[str, Any], kind: str, why: str) -> None:
    assert refusal(body, kind) == why


@pytest.mark.parametrize(("body", "kind"), [
    (CHAT, "chat"),
    ({**CHAT, "n": 1, "logprobs": False, "response_format": {"type": "text"}}, "chat"),
    ({"prompt": "x", "logprobs": None}, "completions"),
    ({"prompt": [1, 2, 3]}, "completions"),
    ({"prompt": ["one"]}, "completions"),
])
def test_movable(body: dict[str, Any], kind: str) -> None:
    assert refusal(body, kind) is None


def test_chat_splice_keeps_identity_drops_second_role_and_counts_whole_usage() -> None:
    body = {**CHAT, "stream_options": {"include_usage": True}}
    sp = Splice(body, "chat", prompt_tokens=7)
    out = sp.feed(chat_chunk(None, role=True) + chat_chunk(" a") + chat_chunk(" b")
                  + b'data: {"id":"chatcmpl-a","obj')  # half an event, then the worker dies
    assert len(sse_events(out)) == 3
    assert sp.tokens == 2 and "".join(sp.text) == " a b"
    sp.begin_leg()
    cont = sp.continuation()
    assert cont is not None
    assert cont["messages"][-1] == {"role": "assistant", "content": " a b"}
    assert cont["continue_final_message"] is True and cont["add_generation_prompt"] is False
    assert cont["max_tokens"] == 8
    assert body["messages"] == CHAT["messages"]  # the client's body is left alone
    out2 = sp.feed(chat_chunk(None, cid="chatcmpl-b", created=9, role=True)
                   + chat_chunk(" c", cid="chatcmpl-b", created=9)
                   + chat_chunk(" d", cid="chatcmpl-b", created=9, finish="length")
                   + usage_chunk(20, 2, cid="chatcmpl-b") + b"data: [DONE]\n\n")
    events = sse_events(out2)
    assert [e if isinstance(e, str) else e["id"] for e in events] == \
        ["chatcmpl-a"] * 3 + ["[DONE]"]  # no second role chunk
    assert all(e["created"] == 1 for e in events[:-1])
    assert events[1]["choices"][0]["finish_reason"] == "length"
    # Usage covers the whole answer: the first worker's 2 tokens and the second's 2.
    assert events[2]["usage"] == {"prompt_tokens": 7, "completion_tokens": 4, "total_tokens": 11}
    assert sp.done and sp.tokens == 4


def test_first_leg_bytes_pass_unchanged() -> None:
    sp = Splice(CHAT, "chat", 3)
    raw = chat_chunk(None, role=True) + chat_chunk(" a")
    assert sp.feed(raw[:10]) == b""
    assert sp.feed(raw[10:]) == raw


def test_error_event_is_a_failed_leg() -> None:
    sp = Splice(CHAT, "chat", 3)
    with pytest.raises(UpstreamError, match="EngineDead"):
        sp.feed(ev({"error": {"message": "EngineDeadError", "code": 500}}))


def test_continuation_for_a_client_continuing_its_own_message() -> None:
    body = {**CHAT, "continue_final_message": True, "add_generation_prompt": False,
            "messages": [{"role": "user", "content": "q"},
                         {"role": "assistant", "content": "Once"}]}
    sp = Splice(body, "chat", 3)
    sp.feed(chat_chunk(None, role=True) + chat_chunk(" upon"))
    sp.begin_leg()
    cont = sp.continuation()
    assert cont is not None
    assert cont["messages"] == [{"role": "user", "content": "q"},
                                {"role": "assistant", "content": "Once upon"}]


def test_max_completion_tokens_and_min_tokens_shrink() -> None:
    body = {**CHAT, "max_completion_tokens": 6, "min_tokens": 4}
    del body["max_tokens"]
    sp = Splice(body, "chat", 3)
    sp.feed(chat_chunk(None, role=True) + chat_chunk(" a") + chat_chunk(" b") + chat_chunk(" c"))
    cont = sp.continuation()
    assert cont is not None
    assert cont["max_completion_tokens"] == 3 and cont["min_tokens"] == 1
    assert "max_tokens" not in cont


def test_no_limit_stays_unset() -> None:
    body = {k: v for k, v in CHAT.items() if k != "max_tokens"}
    sp = Splice(body, "chat", 3)
    sp.feed(chat_chunk(" a"))
    assert sp.remaining() is None
    cont = sp.continuation()
    assert cont is not None and "max_tokens" not in cont


def test_died_before_any_token_resends_the_request_as_is() -> None:
    sp = Splice(CHAT, "chat", 3)
    sp.feed(chat_chunk(None, role=True))
    sp.begin_leg()
    assert sp.continuation() == CHAT
    # The continuation's role chunk is not repeated.
    assert sp.feed(chat_chunk(None, cid="b", role=True)) == b""


def test_nothing_owed_closes_with_finish_usage_and_done() -> None:
    body = {**CHAT, "max_tokens": 2, "stream_options": {"include_usage": True}}
    sp = Splice(body, "chat", 5)
    sp.feed(chat_chunk(None, role=True) + chat_chunk(" a") + chat_chunk(" b"))
    assert sp.continuation() is None
    events = sse_events(sp.closing())
    assert events[0]["choices"][0]["finish_reason"] == "length"
    assert events[0]["id"] == "chatcmpl-a"
    assert events[1]["usage"]["completion_tokens"] == 2
    assert events[2] == "[DONE]"


def test_finished_stream_missing_its_tail_gets_only_done() -> None:
    sp = Splice(CHAT, "chat", 5)
    sp.feed(chat_chunk(" a", finish="stop"))
    assert sp.finished
    assert sse_events(sp.closing()) == ["[DONE]"]


def test_completion_text_prompt_continues_with_the_text() -> None:
    body = {"model": "m", "prompt": "Count:", "max_tokens": 5, "stream": True}
    sp = Splice(body, "completions", 2)
    sp.feed(ev({"id": "cmpl-a", "object": "text_completion", "created": 1, "model": "m",
                "choices": [{"index": 0, "text": " one", "finish_reason": None}]}))
    sp.begin_leg()
    cont = sp.continuation()
    assert cont is not None and cont["prompt"] == "Count: one" and cont["max_tokens"] == 4


def test_completion_token_ids_are_exact_and_hidden_from_the_client() -> None:
    body = {"model": "m", "prompt": [5, 6, 7], "max_tokens": 5, "stream": True}
    first = upstream_body(body, "completions")
    assert first["return_token_ids"] is True and "return_token_ids" not in body
    sp = Splice(body, "completions", 3)
    out = sp.feed(ev({"id": "cmpl-a", "object": "text_completion", "created": 1, "model": "m",
                      "choices": [{"index": 0, "text": " x", "token_ids": [42],
                                   "prompt_token_ids": [5, 6, 7], "finish_reason": None}]}))
    assert "token_ids" not in out.decode()
    sp.begin_leg()
    cont = sp.continuation()
    assert cont is not None
    assert cont["prompt"] == [5, 6, 7, 42] and cont["return_token_ids"] is True
    assert sp.why_not() is None


def test_token_id_prompt_without_returned_ids_is_not_moved() -> None:
    body = {"model": "m", "prompt": [5, 6, 7], "max_tokens": 5, "stream": True}
    sp = Splice(body, "completions", 3)
    sp.feed(ev({"id": "c", "choices": [{"index": 0, "text": " x", "finish_reason": None}]}))
    assert sp.why_not() == "the worker did not return the generated token ids"


def test_tool_calls_in_the_stream_are_not_moved() -> None:
    sp = Splice(CHAT, "chat", 3)
    sp.feed(ev({"id": "c", "choices": [{"index": 0, "delta": {"tool_calls": [{"index": 0}]},
                                        "finish_reason": None}]}))
    assert sp.why_not() == "tool calls"


def test_continuous_usage_is_the_exact_count() -> None:
    body = {**CHAT, "stream_options": {"include_usage": True, "continuous_usage_stats": True}}
    sp = Splice(body, "chat", 3)
    chunk = json.loads(chat_chunk(" a")[6:])
    chunk["usage"] = {"prompt_tokens": 9, "completion_tokens": 3, "total_tokens": 12}
    sp.feed(ev(chunk))
    assert sp.tokens == 3 and sp.prompt_tokens == 9
