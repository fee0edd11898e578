"""Requests in every form vLLM accepts: completions prompts as strings, lists of strings,
token ids or lists of token ids (context counted per prompt); chat rendered with `tools`
and `chat_template_kwargs` as vLLM renders them."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from pdbox.router import openai_errors as oe
from pdbox.router.tokenize import PromptTokenizer, template_kwargs
from tests.unit.test_prefix_index import make_model_dir
from tests.unit.test_router_app import Box, completion, profile, run

ONE = {"aggregated-0": None}


@pytest.mark.parametrize("prompt", ["x", ["a", "b"], [1, 2, 3], [[1, 2], [3]]])
def test_every_prompt_form_vllm_accepts_is_valid(prompt: Any) -> None:
    oe.validate({"model": "m", "prompt": prompt}, "completions", 100)


@pytest.mark.parametrize("prompt", [None, [], [[]], [[1], "a"], [True], [[1, -2]], 5])
def test_other_prompts_are_refused_in_one_sentence(prompt: Any) -> None:
    with pytest.raises(oe.BadRequest, match="'prompt' is required"):
        oe.validate({"model": "m", "prompt": prompt}, "completions", 100)


def test_a_batch_of_prompts_is_counted_per_prompt() -> None:
    # cpu-aggregated's context is 4,096 tokens; the router counts 4 characters a token.
    near_full = "y" * (3000 * 4)

    async def check(box: Box) -> None:
        async with box.post("/v1/completions",
                            completion([near_full, near_full], max_tokens=8)) as r:
            assert r.status == 200, await r.text()  # each fits; together they would not
        async with box.post("/v1/completions", completion([[7] * 3000, [8] * 3000],
                                                          max_tokens=8)) as r:
            assert r.status == 200, await r.text()
            assert r.headers["x-pdbox-pd"] == "aggregated"
        async with box.post("/v1/completions", completion(["a", "z" * (5000 * 4)])) as r:
            assert r.status == 400
            assert "prompt 1 has 5000 tokens" in (await r.json())["error"]["message"]
        async with box.post("/v1/completions", completion([[1] * 5000])) as r:
            assert r.status == 400  # token ids are tokens, whatever the router hashes
        seen = box.mocks["aggregated-0"].seen[-1]["body"]
        assert seen["prompt"] == [[7] * 3000, [8] * 3000]  # passed on as given

    run(check, ONE)


def test_a_batch_is_prefilled_where_it_decodes_under_pd() -> None:
    async def check(box: Box) -> None:
        async with box.post("/v1/completions", completion(["a b c", "d e f"])) as r:
            assert r.status == 200
            assert r.headers["x-pdbox-pd"] == "local"
            assert "batch of 2 prompts" in r.headers["x-pdbox-pd-reason"]
        assert box.mocks["prefill-0"].stats.requests == 0

    run(check, {"decode-0": "decode", "prefill-0": "prefill"}, prof=profile("cpu-tiny"))


# ---------------------------------------------------------------- chat templates

TOOLS = [{"type": "function", "function": {"name": "weather", "parameters": {"type": "object"}}},
         {"type": "function", "function": {"name": "time", "description": "Now.",
                                           "strict": True}}]
BODIES: list[dict[str, Any]] = [
    {"messages": [{"role": "user", "content": "hi"}]},
    {"messages": [{"role": "user", "content": "hi"}], "tools": TOOLS,
     "chat_template_kwargs": {"enable_thinking": False, "add_generation_prompt": False}},
    {"messages": [{"role": "user", "content": "hi"}], "reasoning_effort": "low",
     "add_generation_prompt": False, "documents": [{"title": "t", "text": "x"}]},
    {"messages": [{"role": "user", "content": "hi"}], "tools": [],
     "chat_template_kwargs": {"custom": "auto", "other": 3}, "continue_final_message": True},
]


def test_template_kwargs_are_vllms() -> None:
    """The variables match what vLLM 0.32's own request handling builds (vLLM imported here)."""
    protocol = pytest.importorskip("vllm.entrypoints.openai.chat_completion.protocol")
    from vllm.renderers.params import merge_kwargs

    for body in BODIES:
        if body.get("tools") == []:
            continue  # vLLM refuses an empty tools list; the router renders it as none
        req = protocol.ChatCompletionRequest.model_validate({"model": "m", **body})
        tools = [t.model_dump() for t in req.tools] if req.tools is not None else None
        theirs = req.build_chat_params(None, "auto").with_defaults(
            merge_kwargs(None, {"tools": tools})).chat_template_kwargs
        assert template_kwargs(body) == theirs, body


TOOL_TEMPLATE = (
    "{% if tools %}TOOLS {{ tools | tojson }}\n{% endif %}"
    "{% for m in messages %}<{{ m.role }}>{{ m.content }}"
    "{% for c in m.tool_calls or [] %}[{{ c.function.name }} {{ c.function.arguments.city }}]"
    "{% endfor %}</{{ m.role }}>{% endfor %}"
    "{% if add_generation_prompt %}<assistant>{% endif %}"
    "{% if enable_thinking is defined and not enable_thinking %}/no_think{% endif %}")


def tokenizer(tmp_path: Path) -> PromptTokenizer:
    return PromptTokenizer.from_model_dir(make_model_dir(tmp_path, template=TOOL_TEMPLATE))


def test_chat_tokens_include_tools_and_template_kwargs(tmp_path: Path) -> None:
    pt = tokenizer(tmp_path)
    msgs = [{"role": "user", "content": "weather?"},
            {"role": "assistant", "content": "",
             "tool_calls": [{"id": "1", "type": "function",
                             "function": {"name": "weather", "arguments": '{"city": "Oslo"}'}}]},
            {"role": "tool", "tool_call_id": "1", "content": "sunny"}]
    body = {"messages": msgs, "tools": TOOLS, "chat_template_kwargs": {"enable_thinking": False}}
    text = pt.render_chat(msgs, **template_kwargs(body))
    dumped = json.dumps(template_kwargs(body)["tools"], ensure_ascii=False)
    assert text == (f"TOOLS {dumped}\n<user>weather?</user>"
                    "<assistant>[weather Oslo]</assistant><tool>sunny</tool><assistant>/no_think")
    assert '"description": null' in dumped and '"strict": true' in dumped  # vLLM's dump
    plain = pt.encode_chat(msgs, **template_kwargs({"messages": msgs}))
    assert pt.encode_chat(msgs, **template_kwargs(body)) != plain


def test_continue_final_message_leaves_the_last_message_open(tmp_path: Path) -> None:
    pt = tokenizer(tmp_path)
    msgs = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "Hello, I"}]
    body = {"messages": msgs, "continue_final_message": True, "add_generation_prompt": False}
    assert pt.render_chat(msgs, **template_kwargs(body)) == "<user>hi</user><assistant>Hello, I"


def test_the_character_fallback_counts_tools_too() -> None:
    from pdbox.router.tokenize import CharBlockTokenizer

    ct = CharBlockTokenizer()
    msgs = [{"role": "user", "content": "hi"}]
    assert len(ct.encode_chat(msgs, **template_kwargs({"tools": TOOLS}))) > \
        len(ct.encode_chat(msgs)) + 100
