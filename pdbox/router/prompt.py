"""Stage 2, prompt: tokenize, check the context, hash the blocks.

Every prompt of the request is counted as vLLM will count it (a completions
batch is one request per prompt, each with the whole context); routing
follows the first prompt's chained block hashes, admission weighs them all.

The character stand-in of attach mode (`CharBlockTokenizer`) has ids equal
to characters, so its blocks are hashed straight from the text: slices of
the string, never a list of ids. The first rendered message (the system
prompt most requests share) is hashed once and kept in a small LRU, so a
long shared prompt costs a dictionary look-up rather than a pass over its
blocks (docs/ROUTER_BENCH.md has the figures). Its hashes are Python's
salted string hashes: stable within the process, which is all an
approximate index needs (they never match a KV event anyway).

The model's own tokenizer costs far more (2.5 ms for an 8,000-character
prompt on this project's 2-core box), so a chat whose first message is long
is encoded in two parts: up to the first special token after that message
(which the tokenizer splits on before anything else, so each side is encoded
on its own), once per distinct head, and the rest per request. Each head is
checked once against a whole encode before its ids are reused.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from pdbox.router import openai_errors as oe
from pdbox.router.parse import Call
from pdbox.router.prefix_index import block_hashes
from pdbox.router.tokenize import (
    CharBlockTokenizer,
    HubTokenizer,
    PromptTokenizer,
    template_kwargs,
)

HEAD_CACHE_ENTRIES = 256  # distinct shared first messages kept hashed
HEAD_MIN_CHARS = 256  # a shorter first message is not worth a cache entry
_ROOT = 0x5D_B0_C6  # first parent of a text chain (never equal to an id chain's)


@dataclass(slots=True)
class Prompt:
    units: int  # the first prompt's length in tokenizer ids (characters for the stand-in)
    tokens: int  # the same in tokens
    hashes: list[int]  # chained hashes of its full blocks
    est_tokens: int  # ids of every prompt together: admission's cost estimate


class PromptStage:
    def __init__(self, tokenizer: Any, engine_block_size: int, max_model_len: int) -> None:
        self.tokenizer = tokenizer
        self.block_size = tokenizer.block_size_for(engine_block_size)
        # The character fallback of attach mode counts characters, not tokens.
        self.units = float(getattr(tokenizer, "units_per_token", 1.0)) or 1.0
        self.max_model_len = max_model_len
        self.text_blocks = type(tokenizer) is CharBlockTokenizer
        self._heads: OrderedDict[str, tuple[list[int], int, str]] = OrderedDict()
        # rendered head -> (its full blocks' hashes, the last of them, ids after them,
        # its ids), or None where encoding it apart changed the ids
        self._id_heads: OrderedDict[str, tuple[list[int], int | None, list[int], int] | None] \
            = OrderedDict()

    def prepare(self, call: Call) -> Prompt:
        """The request's prompts; raises oe.BadRequest when one does not fit the context."""
        try:
            sizes, hashes = self._count(call)
        except Exception as exc:  # a template error is the client's input, not a crash
            raise oe.BadRequest(400, f"Could not tokenize the request: {exc}.") from None
        mt = call.max_tokens or 0
        for i, (_, n) in enumerate(sizes):
            if n >= self.max_model_len or n + mt > self.max_model_len:
                which = f"prompt {i} has" if len(sizes) > 1 else "prompt has"
                raise oe.BadRequest(
                    400, f"The {which} {n} tokens; with max_tokens {mt} it exceeds this "
                    f"model's context of {self.max_model_len}.",
                    param="messages" if call.kind == "chat" else "prompt")
        units = sizes[0][0]
        return Prompt(units, self.tokens_of(units), hashes, sum(u for u, _ in sizes))

    def tokens_of(self, units: float) -> int:
        return int(units / self.units)

    # ------------------------------------------------------------ counting

    def _count(self, call: Call) -> tuple[list[tuple[int, int]], list[int]]:
        """(ids, tokens) of each prompt, and the first prompt's block hashes."""
        body = call.body
        if call.kind == "chat":
            kwargs = template_kwargs(body)
            if self.text_blocks:
                n, hashes = self._chat_text(body["messages"], kwargs)
            elif (model := self._model_tokenizer()) is not None:
                n, hashes = self._chat_ids(model, body["messages"], kwargs)
            else:
                ids = self.tokenizer.encode_chat(body["messages"], **kwargs)
                n, hashes = len(ids), block_hashes(ids, self.block_size)
            return [(n, self.tokens_of(n))], hashes
        p = body["prompt"]
        items = [p] if isinstance(p, str) or (p and isinstance(p[0], int)) else p
        sizes: list[tuple[int, int]] = []
        hashes: list[int] = []
        for item in items:
            first = not sizes
            if isinstance(item, str) and self.text_blocks:
                n = len(item)
                if first:
                    hashes = text_hashes(item, self.block_size)
            elif isinstance(item, str):
                ids = self.tokenizer.encode_prompt(item)
                n = len(ids)
                if first:
                    hashes = block_hashes(ids, self.block_size)
            else:
                # Token ids given by the client are tokens even where the router
                # hashes characters.
                sizes.append((len(item), len(item)))
                if first:
                    hashes = block_hashes(item, self.block_size)
                continue
            sizes.append((n, self.tokens_of(n)))
        return sizes, hashes

    def _chat_text(self, messages: Sequence[Any], kwargs: dict[str, Any]) -> tuple[int, list[int]]:
        pieces = self.tokenizer.render_pieces(messages, **kwargs)
        head = pieces[0] if pieces else ""
        hit = self._heads.get(head)
        if hit is None:
            hit = _head_chain(head, self.block_size)
            self._heads[head] = hit
            if len(self._heads) > HEAD_CACHE_ENTRIES:
                self._heads.popitem(last=False)
        else:
            self._heads.move_to_end(head)
        head_hashes, parent, tail = hit
        rest = tail + "".join(pieces[1:])
        n = len(head) - len(tail) + len(rest)
        return n, head_hashes + text_hashes(rest, self.block_size, parent)


    def _model_tokenizer(self) -> PromptTokenizer | None:
        tok = self.tokenizer
        if isinstance(tok, HubTokenizer):
            tok = tok._current()
        return tok if isinstance(tok, PromptTokenizer) else None

    def _chat_ids(self, tok: PromptTokenizer, messages: Sequence[Any],
                  kwargs: dict[str, Any]) -> tuple[int, list[int]]:
        """(ids, block hashes) of a chat, its head's encoded once (see the module)."""
        bs = self.block_size
        text = tok.render_chat(messages, **kwargs)
        split = _split_after_first(text, messages, tok.split_tokens())
        head = text[:split] if split is not None else ""
        if head and head not in self._id_heads:
            ids = tok.encode_rendered(text)
            head_ids = tok.encode_rendered(head)
            whole = ids[:len(head_ids)] == head_ids and \
                ids[len(head_ids):] == tok.encode_rendered(text[len(head):])
            full = len(head_ids) // bs * bs
            head_hashes = block_hashes(head_ids[:full], bs)
            self._id_heads[head] = (head_hashes, head_hashes[-1] if head_hashes else None,
                                    head_ids[full:], len(head_ids)) if whole else None
            if len(self._id_heads) > HEAD_CACHE_ENTRIES:
                self._id_heads.popitem(last=False)
            return len(ids), block_hashes(ids, bs)
        hit = self._id_heads.get(head) if head else None
        if hit is None:
            ids = tok.encode_rendered(text)
            return len(ids), block_hashes(ids, bs)
        self._id_heads.move_to_end(head)
        head_hashes, parent, tail, n_head = hit
        rest = tok.encode_rendered(text[len(head):])
        return n_head + len(rest), head_hashes + block_hashes(tail + rest, bs, parent)


def _split_after_first(text: str, messages: Sequence[Any], splits: Sequence[str]) -> int | None:
    """Where the rendered chat may be cut in two: after the first special token
    that follows a long first message; None when there is no such place."""
    first = messages[0].get("content") if messages and isinstance(messages[0], dict) else None
    if not isinstance(first, str) or len(first) < HEAD_MIN_CHARS or not splits:
        return None
    i = text.find(first)
    if i < 0:
        return None
    end = i + len(first)
    best: int | None = None
    for token in splits:
        j = text.find(token, end)
        if j >= 0 and (best is None or j + len(token) < best):
            best = j + len(token)
    return best


def text_hashes(text: str, block: int, parent: int = _ROOT) -> list[int]:
    """Chained hashes of the full `block`-character blocks of `text`."""
    out: list[int] = []
    for start in range(0, len(text) - block + 1, block):
        parent = hash((parent, text[start:start + block]))
        out.append(parent)
    return out


def _head_chain(head: str, block: int) -> tuple[list[int], int, str]:
    """The head's full blocks hashed, the last of them, and the characters left over."""
    hashes = text_hashes(head, block)
    return hashes, hashes[-1] if hashes else _ROOT, head[len(hashes) * block:]
