"""Flowing decode: running streams move between live workers to even out their load.

When a phase changes (a burst of chat ends on one worker, long prompts stop
coming to the other), streams pile up on one worker while another has room.
Each move goes by KV (kv_move.py): the stream's blocks are pulled from the
worker it leaves, so a move costs about one block of prefill, not its prompt.

The rule (pure, `plan`): the worker running the most streams gives one to
the worker running the fewest when they differ by at least `min_gap`, and
neither took part in a move within `dwell_s`. A gap of 2 is the smallest one a
move narrows (a gap of 1 would only swap the two counts). The dwell, in ITL
targets, damps the loop: counts are read again only after the moved stream
has made a few tokens on its new worker.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Mapping
from dataclasses import dataclass

MIN_GAP = 2
# The dwell and the period, in ITL targets: relative to the SLO, so they hold on
# any machine (a slow box has a looser target and moves no more often per token).
DWELL_ITL = 8.0
PERIOD_ITL = 2.0


@dataclass(frozen=True)
class Load:
    id: str
    streams: int  # requests decoding there (the router's count)
    movable: int  # of them, those a move may take now


def plan(loads: list[Load], last_move: Mapping[str, float], now: float,
         dwell_s: float, min_gap: int = MIN_GAP) -> tuple[str, str] | None:
    """(from, to) for one move, or None."""
    calm = [w for w in loads if now - last_move.get(w.id, -1e18) >= dwell_s]
    if len(calm) < 2:
        return None
    hi = max(calm, key=lambda w: (w.streams, w.id))
    lo = min(calm, key=lambda w: (w.streams, w.id))
    if hi.id == lo.id or hi.streams - lo.streams < min_gap or hi.movable < 1:
        return None
    return hi.id, lo.id


class Balancer:
    """Runs `plan` every period and asks the migrator for the move."""

    def __init__(self, itl_s: float, loads: Callable[[], list[Load]],
                 move: Callable[[str, str], bool], clock: Callable[[], float]) -> None:
        self.dwell_s = DWELL_ITL * itl_s
        self.period_s = PERIOD_ITL * itl_s
        self.loads = loads
        self.move = move
        self.clock = clock
        self.last_move: dict[str, float] = {}
        self.moves = 0

    def step(self) -> tuple[str, str] | None:
        now = self.clock()
        pick = plan(self.loads(), self.last_move, now, self.dwell_s)
        if pick is None or not self.move(*pick):
            return None
        self.last_move[pick[0]] = self.last_move[pick[1]] = now
        self.moves += 1
        return pick

    async def run(self) -> None:
        while True:
            await asyncio.sleep(self.period_s)
            self.step()
