"""Prompt → token ids, as the served model's vLLM would tokenize it.

Prefix matching is only as good as the tokens: the router must produce the
same ids vLLM will, or no block hash will ever match a KV event. So this
renders the model's own chat template (from `tokenizer_config.json`, or the
`chat_template.jinja` file newer `transformers` write) with jinja2 in the
sandbox `transformers` uses, then encodes with `tokenizers` and no added
special tokens, as vLLM's chat endpoint does. Plain completions are encoded
with the tokenizer's post-processor (special tokens added), as vLLM does.

When no tokenizer is available (attach mode in front of a remote or mock
server) `CharBlockTokenizer` stands in: it maps characters to ids and the
router hashes blocks of characters, as sglang-router's radix tree does. Its
hashes only ever match its own, so it pairs with the approximate index.
"""

from __future__ import annotations

import array
import json
from collections.abc import Mapping, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

Message = Mapping[str, Any]


class TokenizerError(Exception):
    """The model folder has no usable tokenizer; str() names the file."""


def _text_of(content: Any) -> Any:
    # OpenAI content parts -> one string, as vLLM does for string-format templates.
    if isinstance(content, list):
        texts = [p.get("text", "") for p in content if isinstance(p, Mapping)
                 and p.get("type") in ("text", "input_text")]
        return "\n".join(texts)
    return content


def _message(m: Message) -> dict[str, Any]:
    """A message as vLLM hands it to the template: text parts joined, and an
    assistant's tool-call arguments parsed from their JSON string into a dict
    (what tool-use templates expect; vLLM's chat_utils does the same)."""
    out = {**m, "content": _text_of(m.get("content"))}
    calls = m.get("tool_calls")
    if m.get("role") == "assistant" and isinstance(calls, list):
        if not calls:
            out.pop("tool_calls")
            return out
        fixed = []
        for call in calls:
            fn = call.get("function") if isinstance(call, Mapping) else None
            if isinstance(fn, Mapping) and isinstance(fn.get("arguments"), str | type(None)):
                try:
                    args = json.loads(fn["arguments"]) if fn.get("arguments") else {}
                except ValueError:
                    args = {}
                call = {**call, "function": {**fn, "arguments": args
                                             if isinstance(args, dict) else {}}}
            fixed.append(call)
        out["tool_calls"] = fixed
    return out


def _tool(tool: Any) -> Any:
    """A tool as vLLM dumps it for the template: type, then the function's name,
    description and parameters (None when absent), strict only when given."""
    if not isinstance(tool, Mapping) or not isinstance(tool.get("function"), Mapping):
        return tool
    fn = tool["function"]
    out_fn = {"name": fn.get("name"), "description": fn.get("description"),
              "parameters": fn.get("parameters")}
    for key in ("strict", "defer_loading"):
        if fn.get(key) is not None:
            out_fn[key] = fn[key]
        elif tool.get(key) is not None and key == "defer_loading":
            out_fn[key] = tool[key]
    out = {"type": tool.get("type", "function"), "function": out_fn}
    if tool.get("defer_loading") is not None:
        out["defer_loading"] = tool["defer_loading"]
    return out


def template_kwargs(body: Mapping[str, Any]) -> dict[str, Any]:
    """The template variables vLLM (0.32) renders a chat request with, beyond the messages.

    As vLLM's `preprocess_chat` and `build_chat_params` do: `tools` (unless the
    request has none), under the client's `chat_template_kwargs`, under the
    request's own `add_generation_prompt`, `continue_final_message`,
    `documents` and `reasoning_effort`; None and "auto" mean unset.
    """
    out: dict[str, Any] = {}
    tools = body.get("tools")
    if isinstance(tools, list) and tools:
        out["tools"] = [_tool(t) for t in tools]
    user = body.get("chat_template_kwargs")
    if isinstance(user, Mapping):
        out.update({k: v for k, v in user.items() if v is not None and v != "auto"})
    request = {"add_generation_prompt": body.get("add_generation_prompt", True),
               "continue_final_message": body.get("continue_final_message", False),
               "documents": body.get("documents"),
               "reasoning_effort": body.get("reasoning_effort")}
    if body.get("reasoning_effort") is not None and not (
            isinstance(user, Mapping) and "enable_thinking" in user):
        request["enable_thinking"] = body["reasoning_effort"] != "none"
    out.update({k: v for k, v in request.items() if v is not None and v != "auto"})
    return out


def _continue_final(template: Any, msgs: list[dict[str, Any]], kwargs: dict[str, Any]) -> str:
    """Render so that the last message stays open, as transformers' apply_chat_template does."""
    tag = "CONTINUE_FINAL_MESSAGE_TAG "
    final = msgs[-1].get("content")
    if not isinstance(final, str):
        raise TokenizerError("continue_final_message is set but the final message has no text")
    msgs = [*msgs[:-1], {**msgs[-1], "content": final + tag}]
    rendered = template.render(messages=msgs, **kwargs)
    loc = rendered.rfind(tag.strip())
    if loc < 0:
        raise TokenizerError("continue_final_message is set but the template drops the "
                             "final message")
    if rendered[loc:loc + len(tag)] == tag:
        return rendered[:loc]
    return rendered[:loc].rstrip()


def _token_text(value: Any) -> str | None:
    if isinstance(value, Mapping):  # a serialised AddedToken
        return value.get("content")
    return value if isinstance(value, str) else None


class PromptTokenizer:
    """The served model's tokenizer and chat template."""

    units_per_token = 1.0  # ids are real tokens

    def state(self) -> dict[str, Any]:
        """What the router counts tokens with (`status.tokenizer`)."""
        return {"source": "model"}

    def __init__(self, tokenizer: Any, chat_template: str | None, special: dict[str, str]):
        self._tok = tokenizer
        self._template_src = chat_template
        self._template: Any = None
        self.special = special
        self._splits: tuple[str, ...] | None = None

    @classmethod
    def from_model_dir(cls, path: str | Path) -> PromptTokenizer:
        from tokenizers import Tokenizer

        folder = Path(path)
        tj = folder / "tokenizer.json"
        if not tj.is_file():
            raise TokenizerError(f"{tj}: no such file; the model folder has no fast tokenizer")
        try:
            tok = Tokenizer.from_file(str(tj))
        except Exception as exc:
            raise TokenizerError(f"{tj}: cannot be loaded ({exc})") from None
        config: dict[str, Any] = {}
        tc = folder / "tokenizer_config.json"
        if tc.is_file():
            try:
                config = json.loads(tc.read_text(encoding="utf-8"))
            except (OSError, ValueError) as exc:
                raise TokenizerError(f"{tc}: not valid JSON ({exc})") from None
        template = config.get("chat_template")
        if isinstance(template, list):  # named templates: take "default"
            named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
            template = named.get("default") or next(iter(named.values()), None)
        jinja_file = folder / "chat_template.jinja"
        if not template and jinja_file.is_file():
            template = jinja_file.read_text(encoding="utf-8")
        special: dict[str, str] = {}
        for key in ("bos_token", "eos_token", "unk_token", "pad_token"):
            text = _token_text(config.get(key))
            if text is not None:
                special[key] = text
        return cls(tok, template or None, special)

    @property
    def has_chat_template(self) -> bool:
        return self._template_src is not None

    def render_chat(self, messages: Sequence[Message], **extra: Any) -> str:
        if self._template_src is None:
            raise TokenizerError("the model has no chat template")
        if self._template is None:
            self._template = _compile(self._template_src)
        msgs = [_message(m) for m in messages]
        kwargs: dict[str, Any] = {"add_generation_prompt": True, **self.special, **extra}
        kwargs.pop("chat_template", None)
        kwargs.pop("tokenize", None)
        if kwargs.pop("continue_final_message", False) and msgs:
            return _continue_final(self._template, msgs, kwargs)
        return self._template.render(messages=msgs, **kwargs)

    def encode_chat(self, messages: Sequence[Message], **extra: Any) -> list[int]:
        return self.encode_rendered(self.render_chat(messages, **extra))

    def encode_rendered(self, text: str) -> list[int]:
        """A rendered chat's ids (no special tokens added: the template has them)."""
        return self._tok.encode(text, add_special_tokens=False).ids

    def split_tokens(self) -> tuple[str, ...]:
        """Added tokens the tokenizer splits its input on before anything else, and
        that take no whitespace from their neighbours: text on either side of one
        is encoded on its own, so a prompt can be encoded in two parts there."""
        if self._splits is None:
            self._splits = tuple(
                t.content for t in self._tok.get_added_tokens_decoder().values()
                if not (t.lstrip or t.rstrip or t.single_word or t.normalized) and t.content)
        return self._splits

    def encode_prompt(self, prompt: str) -> list[int]:
        return self._tok.encode(prompt, add_special_tokens=True).ids

    def block_size_for(self, engine_block_size: int) -> int:
        return engine_block_size


def _compile(source: str) -> Any:
    """Compile a chat template the way transformers does (sandboxed, trimmed)."""
    import jinja2
    import jinja2.ext
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message: str) -> None:
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x: Any, ensure_ascii: bool = False, indent: Any = None,
               separators: Any = None, sort_keys: bool = False) -> str:
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent,
                          separators=separators, sort_keys=sort_keys)

    def strftime_now(fmt: str) -> str:
        return datetime.now().strftime(fmt)

    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols]
    )
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = strftime_now
    try:
        return env.from_string(source)
    except jinja2.exceptions.TemplateSyntaxError as exc:
        raise TokenizerError(f"the model's chat template does not compile: {exc}") from None


class CharBlockTokenizer:
    """Characters as ids, for routing when the model's tokenizer is unknown.

    About `chars_per_token` characters make a token, so a block of the
    engine's size is hashed as that many times more characters.
    """

    def __init__(self, chars_per_token: int = 4):
        if chars_per_token < 1:
            raise ValueError("chars_per_token must be at least 1")
        self.units_per_token = float(chars_per_token)
        self._chars_per_token = chars_per_token

    @property
    def has_chat_template(self) -> bool:
        return False

    def state(self) -> dict[str, Any]:
        """What the router counts tokens with (`status.tokenizer`)."""
        return {"source": "characters"}

    def render_chat(self, messages: Sequence[Message], **extra: Any) -> str:
        return "".join(self.render_pieces(messages, **extra))

    def render_pieces(self, messages: Sequence[Message], **extra: Any) -> list[str]:
        """The rendered chat, one piece per message, the tools with the first.

        The pieces concatenate to `render_chat`; the router hashes the first
        piece (usually a shared system prompt) once and reuses it.
        """
        # Tools are part of the real prompt, so they are part of this stand-in too.
        tools = extra.get("tools")
        head = f"<|tools|>{json.dumps(tools, sort_keys=True)}\n" if tools else ""
        out = [f"<|{m.get('role', '')}|>{_text_of(m.get('content')) or ''}\n" for m in messages]
        if out:
            out[0] = head + out[0]
        elif head:
            out.append(head)
        return out

    def encode_chat(self, messages: Sequence[Message], **extra: Any) -> list[int]:
        return self.encode_prompt(self.render_chat(messages, **extra))

    def encode_prompt(self, prompt: str) -> Sequence[int]:
        # Code points as ids; UTF-32 decoding into an array is C-speed, about
        # half the cost of a Python list of ord() on a long prompt.
        return array.array("I", prompt.encode("utf-32-le"))

    def block_size_for(self, engine_block_size: int) -> int:
        return engine_block_size * self._chars_per_token


# ------------------------------------------------------------ hub models


class ApproxTokenizer(CharBlockTokenizer):
    """Groups of `chars_per_token` characters as one id: about a token each.

    The stand-in while a hub model's tokenizer is not on this machine. Unlike
    CharBlockTokenizer its ids count (roughly) tokens, so the router's block
    size stays the engine's and the P/D gate counts about tokens; swapping in
    the real tokenizer later changes neither. Its ids never equal real token
    ids, so KV events (which carry real ones) only match once it is swapped.
    """

    def __init__(self, chars_per_token: int = 4):
        super().__init__(chars_per_token)
        self.units_per_token = 1.0  # ids are (about) tokens, not characters

    def encode_prompt(self, prompt: str) -> Sequence[int]:
        data = prompt.encode("utf-32-le")
        step = 4 * self._chars_per_token
        return [int.from_bytes(data[i:i + step], "little") for i in range(0, len(data), step)]

    def block_size_for(self, engine_block_size: int) -> int:
        return engine_block_size


class HubTokenizer:
    """A hub model's tokenizer, loaded from the local Hugging Face cache (local
    files only) as soon as a worker has downloaded the model's snapshot.

    Until then it routes by `ApproxTokenizer` and says so through `on_event`;
    it looks for the snapshot again at most every `recheck_s` on use (or at
    once on `refresh()`), and says when the real tokenizer takes over or why
    it cannot. Block size and units per token never change, so the router
    built around it stays right across the swap.
    """

    units_per_token = 1.0

    def __init__(
        self,
        repo_id: str,
        *,
        on_event: Any = None,
        clock: Any = None,
        recheck_s: float = 5.0,
        cache_dir: Path | None = None,
    ) -> None:
        import time

        self.repo_id = repo_id
        self._on_event = on_event
        self._clock = clock or time.monotonic
        self._recheck_s = recheck_s
        self._cache_dir = cache_dir
        self._fallback = ApproxTokenizer()
        self._real: PromptTokenizer | None = None
        self._failed: set[Path] = set()
        self._next_check = 0.0
        self.source = "characters"  # "model" once the real tokenizer is loaded
        self.detail = ""
        if not self.refresh():
            self._say(f"routing by characters: the tokenizer of {repo_id} is not in the local "
                      "Hugging Face cache yet; it is loaded once a worker has downloaded the "
                      "model (prefix matching with KV events starts then)")

    def _say(self, msg: str) -> None:
        self.detail = msg
        if self._on_event is not None:
            self._on_event(msg)

    def refresh(self) -> bool:
        """Look for the snapshot now; True once the real tokenizer is in use."""
        if self._real is not None:
            return True
        from pdbox.workers.hub_cache import find_snapshot

        self._next_check = self._clock() + self._recheck_s
        snap = find_snapshot(self.repo_id, ("tokenizer.json",), cache_dir=self._cache_dir)
        if snap is None or snap in self._failed:
            return False
        try:
            self._real = PromptTokenizer.from_model_dir(snap)
        except TokenizerError as exc:
            self._failed.add(snap)
            self._say(f"tokenizer of {self.repo_id} in {snap} cannot be loaded ({exc}); "
                      "still routing by characters")
            return False
        self.source = "model"
        self._say(f"tokenizer of {self.repo_id} loaded from the local Hugging Face cache "
                  f"({snap}); routing by the model's tokens")
        return True

    def _current(self) -> PromptTokenizer | ApproxTokenizer:
        if self._real is None and self._clock() >= self._next_check:
            self.refresh()
        return self._real if self._real is not None else self._fallback

    @property
    def has_chat_template(self) -> bool:
        return self._current().has_chat_template

    def render_chat(self, messages: Sequence[Message], **extra: Any) -> str:
        return self._current().render_chat(messages, **extra)

    def encode_chat(self, messages: Sequence[Message], **extra: Any) -> Sequence[int]:
        return self._current().encode_chat(messages, **extra)

    def encode_prompt(self, prompt: str) -> Sequence[int]:
        return self._current().encode_prompt(prompt)

    def block_size_for(self, engine_block_size: int) -> int:
        return engine_block_size

    def state(self) -> dict[str, Any]:
        return {"source": self.source, "model": self.repo_id, "detail": self.detail}


def tokenizer_for_model(source: str, tokenizer_dir: Path | None, *, on_event: Any = None,
                        **hub_kwargs: Any) -> Any:
    """The router's tokenizer for a resolved model: the folder's own, a hub
    model's from the local cache (now or once downloaded), or, when a folder's
    tokenizer cannot load, characters with an event that says why."""
    from pdbox.workers.hub_cache import is_hub_id

    if tokenizer_dir is not None:
        try:
            return PromptTokenizer.from_model_dir(tokenizer_dir)
        except TokenizerError as exc:
            if on_event is not None:
                on_event(f"tokenizer unavailable ({exc}); routing by characters")
            return ApproxTokenizer()
    if is_hub_id(source):
        return HubTokenizer(source, on_event=on_event, **hub_kwargs)
    return ApproxTokenizer()
