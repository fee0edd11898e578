"""A window of a public trace, scaled to the box that will serve it. Pure.

The traces (Mooncake, Azure) come from clusters serving prompts of tens of
thousands of tokens at several requests per second; a small box with a 4k
context cannot take them as they are. What we keep is their shape:

- arrivals: the trace's own times, from `start_s` on, divided by `speed`
  (2.0: twice as fast; 0.5: half as fast), for `duration_s` seconds of replay;
- lengths: prompts multiplied by one `input_scale` and cut to what fits the
  context beside the answer; answers capped at `max_output`;
- prefix sharing: each Mooncake block id becomes a fixed run of token ids
  (512 tokens times `input_scale`, at least one), drawn from a RNG seeded by
  the id, so two requests that share blocks share a token prefix and the
  box's prefix cache sees what the trace's cluster saw. The last block is cut
  to the scaled length. Azure requests (no block ids) get a run of their own.

Nothing here reads a clock or a file; `pdbox.replay.traces` reads the trace.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass

from pdbox.replay.traces import MOONCAKE_BLOCK_TOKENS, TraceRequest
from pdbox.router.metrics import percentile

# Token ids below this are left out: most vocabularies keep their special
# tokens (BOS, EOS, chat markers) at the bottom. The default vocabulary size
# fits every common model (Llama 32,000; SmolLM2 49,152; GPT-2 50,257).
FIRST_ID = 100
DEFAULT_VOCAB = 32_000


class TraceWindowError(ValueError):
    """The window or the scaling cannot be used; str() says why."""


@dataclass(frozen=True)
class Scaling:
    """How a trace request's lengths shrink to the box."""

    input_scale: float
    max_output: int
    max_model_len: int
    trace_block_tokens: int = MOONCAKE_BLOCK_TOKENS

    def __post_init__(self) -> None:
        if not self.input_scale > 0:
            raise TraceWindowError("the input scale must be above 0")
        if not 1 <= self.max_output < self.max_model_len:
            raise TraceWindowError(f"the output cap must be between 1 and the context "
                                   f"less one ({self.max_model_len - 1})")

    @property
    def block_tokens(self) -> int:
        """Tokens per trace block after scaling (at least one)."""
        return max(1, round(self.trace_block_tokens * self.input_scale))

    def output(self, tokens: int) -> int:
        return max(1, min(tokens, self.max_output))

    def input(self, tokens: int, output: int) -> int:
        # Prompt and answer must fit the context together, as vLLM checks.
        return max(1, min(round(tokens * self.input_scale), self.max_model_len - output))


def default_input_scale(inputs: Sequence[int], max_model_len: int, fill: float = 0.5) -> float:
    """The scale at which the window's p90 prompt takes `fill` of the context (never > 1)."""
    p90 = percentile([float(x) for x in inputs], 0.9)
    if not p90:
        return 1.0
    return min(1.0, fill * max_model_len / p90)


@dataclass(frozen=True)
class Windowed:
    """A trace request in the window: its index in the trace and replay arrival."""

    index: int
    arrival_s: float
    request: TraceRequest


def select_window(requests: Sequence[TraceRequest], start_s: float, duration_s: float,
                  speed: float) -> list[Windowed]:
    """Requests arriving in [start_s, start_s + duration_s × speed) of trace time,
    with arrivals in replay time (seconds from the window's start, / speed)."""
    if not speed > 0:
        raise TraceWindowError("--speed must be above 0")
    if not duration_s > 0:
        raise TraceWindowError("--duration-s must be above 0")
    if start_s < 0:
        raise TraceWindowError("--start-s must not be negative")
    end = start_s + duration_s * speed
    out = [Windowed(i, (r.arrival_s - start_s) / speed, r)
           for i, r in enumerate(requests) if start_s <= r.arrival_s < end]
    if not out:
        last = requests[-1].arrival_s if requests else 0.0
        raise TraceWindowError(
            f"no request arrives between {start_s:g} s and {end:g} s of the trace "
            f"(it spans 0 to {last:.0f} s); move --start-s or lengthen --duration-s")
    return out


class TokenRuns:
    """Fixed runs of token ids: one per trace block id, and unique ones per request."""

    def __init__(self, vocab_size: int, block_tokens: int, seed: int = 0,
                 first_id: int = FIRST_ID) -> None:
        if vocab_size <= first_id:
            raise TraceWindowError(f"the vocabulary size must be above {first_id}")
        self.vocab_size, self.block_tokens = vocab_size, block_tokens
        self.seed, self.first_id = seed, first_id
        self._blocks: dict[int, list[int]] = {}

    def _run(self, key: str, n: int) -> list[int]:
        # A string seed is hashed with SHA-512 by random.Random: the same on
        # every run and machine, unlike hash().
        rng = random.Random(f"{self.seed}:{key}")
        return [rng.randrange(self.first_id, self.vocab_size) for _ in range(n)]

    def block(self, block_id: int) -> list[int]:
        run = self._blocks.get(block_id)
        if run is None:
            run = self._blocks[block_id] = self._run(f"block:{block_id}", self.block_tokens)
        return run

    def unique(self, index: int, n: int) -> list[int]:
        """Tokens no other request shares (a different key space from blocks)."""
        return self._run(f"request:{index}", n)

    def prompt(self, req: TraceRequest, index: int, tokens: int) -> list[int]:
        """`tokens` ids: the request's blocks in order, cut at `tokens`; a request
        without blocks (Azure), or with too few, is filled with its own run."""
        ids: list[int] = []
        for block_id in req.hash_ids:
            if len(ids) >= tokens:
                break
            ids += self.block(block_id)
        if len(ids) < tokens:
            ids += self.unique(index, tokens - len(ids))
        return ids[:tokens]


@dataclass(frozen=True)
class ScaledRequest:
    index: int  # position in the trace file (stable across setups and windows)
    arrival_s: float  # replay seconds from the window's start
    prompt: tuple[int, ...]
    max_tokens: int
    trace_input_tokens: int
    trace_output_tokens: int


def scale_window(window: Sequence[Windowed], scaling: Scaling, vocab_size: int = DEFAULT_VOCAB,
                 seed: int = 0) -> list[ScaledRequest]:
    runs = TokenRuns(vocab_size, scaling.block_tokens, seed)
    out: list[ScaledRequest] = []
    for w in window:
        r = w.request
        n_out = scaling.output(r.output_tokens)
        n_in = scaling.input(r.input_tokens, n_out)
        out.append(ScaledRequest(w.index, w.arrival_s, tuple(runs.prompt(r, w.index, n_in)),
                                 n_out, r.input_tokens, r.output_tokens))
    return out


def describe(scaled: Sequence[ScaledRequest], scaling: Scaling) -> dict[str, object]:
    """What the scaled window holds, for the result (lengths and rate)."""
    ins = [float(len(s.prompt)) for s in scaled]
    outs = [float(s.max_tokens) for s in scaled]
    span = scaled[-1].arrival_s if scaled else 0.0
    return {
        "requests": len(scaled),
        "input_scale": round(scaling.input_scale, 5),
        "block_tokens": scaling.block_tokens,
        "max_output": scaling.max_output,
        "input_tokens_p50": percentile(ins, 0.5),
        "input_tokens_p90": percentile(ins, 0.9),
        "input_tokens_max": max(ins) if ins else None,
        "output_tokens_p50": percentile(outs, 0.5),
        "output_tokens_p90": percentile(outs, 0.9),
        "arrivals_per_s": round(len(scaled) / span, 3) if span > 0 else None,
    }
