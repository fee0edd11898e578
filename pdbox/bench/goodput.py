"""Goodput at a profile's SLOs, and the search for the load a setup can take. Pure.

Goodput is the rate of requests served whole within both SLOs: status ok,
time to first token ≤ `[slo] ttft_s`, and mean time per output token after
the first (TPOT) ≤ `[slo] itl_s`, divided by the run's wall time (from the
window's start to the last answer). SLO attainment is the same
count over the requests sent. Refused (429), failed and timed-out requests
count as sent and never as good.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from pdbox.router.metrics import percentile

STATUSES = ("ok", "refused", "error", "timeout")


@dataclass(frozen=True)
class Outcome:
    """One request as the client saw it."""

    status: str  # ok | refused (429) | error | timeout
    ttft_s: float | None = None
    tpot_s: float | None = None  # None with fewer than two tokens
    output_tokens: int = 0  # tokens received (a cut-off request counts what came)
    detail: str = ""

    def good(self, ttft_slo_s: float, itl_slo_s: float) -> bool:
        return (self.status == "ok" and self.ttft_s is not None and self.ttft_s <= ttft_slo_s
                and (self.tpot_s is None or self.tpot_s <= itl_slo_s))


def tpot(first_s: float | None, last_s: float | None, tokens: int) -> float | None:
    """Mean inter-token time after the first token."""
    if first_s is None or last_s is None or tokens < 2:
        return None
    return (last_s - first_s) / (tokens - 1)


def _r(x: float | None, nd: int = 4) -> float | None:
    return None if x is None else round(x, nd)


def summarize(outcomes: Sequence[Outcome], wall_s: float, ttft_slo_s: float,
              itl_slo_s: float) -> dict[str, Any]:
    sent = len(outcomes)
    counts = {s: sum(1 for o in outcomes if o.status == s) for s in STATUSES}
    good = sum(1 for o in outcomes if o.good(ttft_slo_s, itl_slo_s))
    ok = [o for o in outcomes if o.status == "ok"]
    ttfts = [o.ttft_s for o in ok if o.ttft_s is not None]
    tpots = [o.tpot_s for o in ok if o.tpot_s is not None]
    tokens = sum(o.output_tokens for o in outcomes)
    rate = (lambda n: round(n / wall_s, 4)) if wall_s > 0 else (lambda n: None)
    out: dict[str, Any] = {
        "sent": sent,
        "ok": counts["ok"],
        "refused_429": counts["refused"],
        "errors": counts["error"],
        "timeouts": counts["timeout"],
        "good": good,
        "slo_ttft_s": ttft_slo_s,
        "slo_itl_s": itl_slo_s,
        "slo_attainment": round(good / sent, 4) if sent else None,
        "goodput_rps": rate(good),
        "wall_s": round(wall_s, 3),
        "output_tokens": tokens,
        "output_tokens_per_s": rate(tokens),
    }
    for name, values, nd in (("ttft", ttfts, 4), ("tpot", tpots, 5)):
        for q in (0.5, 0.9, 0.99):
            out[f"{name}_p{round(q * 100)}_s"] = _r(percentile(values, q), nd)
    return out


class SpeedSearch:
    """Bisection, on a log scale, of the arrival speed factor at which SLO
    attainment falls to `target`: the fastest probed speed that still meets it.

    Attainment falls as arrivals speed up, so: from `start`, step up (×`step`)
    while the target is met and down (÷`step`) while it is missed; once one
    speed meets it and a faster one misses, halve the gap (geometric mean)
    until the two are within `tolerance` or `max_probes` are spent.
    """

    def __init__(self, target: float, start: float, max_probes: int = 6, step: float = 2.0,
                 lo: float = 1 / 256, hi: float = 256.0, tolerance: float = 0.1) -> None:
        if not 0 < target <= 1:
            raise ValueError("the attainment target must be in (0, 1]")
        if not (start > 0 and step > 1 and max_probes >= 1):
            raise ValueError("the search needs a start above 0, a step above 1 and a probe")
        self.target, self.start, self.max_probes, self.step = target, start, max_probes, step
        self.lo, self.hi, self.tolerance = lo, hi, tolerance
        self.probes: list[tuple[float, float]] = []  # (speed, attainment)

    @property
    def meets(self) -> float | None:
        ok = [s for s, a in self.probes if a >= self.target]
        return max(ok) if ok else None

    @property
    def misses(self) -> float | None:
        bad = [s for s, a in self.probes if a < self.target]
        return min(bad) if bad else None

    def next(self) -> float | None:
        """The next speed to probe; None when the search is done."""
        if len(self.probes) >= self.max_probes:
            return None
        if not self.probes:
            return self.start
        good, bad = self.meets, self.misses
        if good is None:
            nxt = bad / self.step  # type: ignore[operator]
            return nxt if nxt >= self.lo else None
        if bad is None:
            nxt = good * self.step
            return nxt if nxt <= self.hi else None
        if bad <= good * (1 + self.tolerance):
            return None
        return math.sqrt(good * bad)

    def record(self, speed: float, attainment: float | None) -> None:
        self.probes.append((speed, attainment if attainment is not None else 0.0))

    def result(self) -> dict[str, Any]:
        good = self.meets
        fallback = min((s for s, _ in self.probes), default=self.start)
        return {
            "target": self.target,
            "speed": good if good is not None else fallback,
            "met": good is not None,
            "probes": [{"speed": round(s, 5), "slo_attainment": a} for s, a in self.probes],
        }
