"""Stage 7, record: what each request did, into the live figures and the decision log.

Called by the other stages at the moments that matter (the worker answered,
the first token, the end); nothing here is computed per chunk beyond a few
additions. What each figure means is in docs/ROUTING.md ("Live figures").
"""

from __future__ import annotations

import json
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

from pdbox.router.backends import Backend
from pdbox.router.engine_stats import ENGINE_WINDOW_S
from pdbox.router.match import PrefixMatch
from pdbox.router.metrics import RouterMetrics, answer_figures
from pdbox.router.soft_roles import RoleMix


@dataclass
class Decision:
    request_id: str
    decode: str
    prefill: str | None
    pd: str  # remote | local | aggregated | whole
    reason: str
    prompt_tokens: int
    matched_tokens: int
    ts: float = field(default_factory=time.time)

    def to_dict(self) -> dict[str, Any]:
        return {
            "request_id": self.request_id, "decode": self.decode, "prefill": self.prefill,
            "pd": self.pd, "reason": self.reason, "prompt_tokens": self.prompt_tokens,
            "matched_tokens": self.matched_tokens, "ts": self.ts,
        }


class Recorder:
    def __init__(self, metrics: RouterMetrics, role_mix: RoleMix, match: PrefixMatch) -> None:
        self.metrics = metrics
        self.role_mix = role_mix
        self.match = match
        self.decisions: deque[Decision] = deque(maxlen=50)

    def outcome(self, outcome: str) -> None:
        self.metrics.requests.inc(outcome=outcome)

    def routed(self, decision: Decision, hashes: list[int]) -> None:
        """The decode worker answered: the decision stands, its blocks are there now."""
        self.decisions.append(decision)
        self.role_mix.record(decision.decode, decision.prefill, decision.pd, time.monotonic())
        m = self.metrics
        m.routed.inc(worker=decision.decode, leg="decode")
        m.prompt_tokens.inc(decision.prompt_tokens)
        m.prefix_tokens.inc(decision.matched_tokens)
        self.match.record(decision.decode, hashes)

    def ttft(self, ttft: float, now: float, source: str) -> None:
        self.metrics.ttft.observe(ttft, now)
        self.metrics.ttft_source.inc(source=source)

    def answer(self, decode: Backend, data: bytes, t0: float) -> None:
        """A non-streamed answer feeds the figures a stream feeds: e2e, tokens and TTFT."""
        now = time.monotonic()
        e2e = now - t0
        self.metrics.e2e.observe(e2e, now)
        try:
            answer = json.loads(data)
        except ValueError:
            return
        itl = decode.engine_itl_s(now - ENGINE_WINDOW_S)
        if itl is None:
            itl = self.metrics.itl.percentile(0.5, now - ENGINE_WINDOW_S)
        tokens, ttft, source = answer_figures(answer, e2e, itl)
        self.metrics.add_tokens(tokens, now)
        if ttft is not None and ttft <= 0.0:
            # e2e less the decode steps is two large figures subtracted: a mean ITL a
            # little above this answer's own (stalls of other streams in the window)
            # leaves nothing. The worker's own TTFT over the window is closer then.
            engine = decode.engine_ttft_s(now - ENGINE_WINDOW_S)
            if engine is not None:
                ttft, source = min(engine, e2e), "engine-window"
        if ttft is not None:
            self.ttft(ttft, now, source)

    def stream_done(self, t0: float, counted: int, exact: int) -> None:
        """A stream ended whole; its usage chunk's count is exact, events counted
        one token each may fall short."""
        now = time.monotonic()
        self.metrics.add_tokens(max(0, exact - counted), now)
        self.metrics.e2e.observe(now - t0, now)
        self.outcome("ok")
