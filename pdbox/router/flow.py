"""Flowing decode: running streams move between live workers when a move pays.

When a phase changes (a burst of chat ends on one worker, long prompts stop
coming to the other), streams pile up on one worker while another has room.
And a worker about to prefill a long prompt would hold up every stream on it
for the whole prefill: `clearing` moves them off first, where that pays.
Each move goes by KV (kv_move.py): the stream's blocks are pulled from the
worker it leaves, so a move costs about one block of prefill, not its prompt.

The rule (pure, `plan`): the worker running the most streams may give one to
the worker running the fewest when they differ by at least `min_gap`, neither
took part in a move within `dwell_s`, and the move pays (`pays`): the stream
time it saves, from the workers' measured steps, is more than the move costs,
or the busy worker's step has passed the ITL target while the other's would
not. On a CPU whose decode step hardly grows with the batch, a move saves
almost nothing and is not made; where steps grow with the batch (a GPU, a
larger model) or one worker is slowed by a prefill, it is. A gap of 2 is the
smallest one a move narrows (a gap of 1 would only swap the two counts). The
dwell, in ITL targets, damps the loop: counts are read again only after the
moved stream has made a few tokens on its new worker.
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
    # Its decode step now, in seconds (measured; None: not measured yet), and how
    # much a step grows with each stream more (its slice's calibration).
    step_s: float | None = None
    slope_s: float = 0.0
    # Tokens still owed by the stream a move would take from it.
    left: int = 0
    # What one KV block's prefill adds to its step: a move puts that into one step
    # of each side (the one-token leg here, the pulled continuation there).
    block_s: float = 0.0


def pays(hi: Load, lo: Load, itl_s: float, move_s: float) -> tuple[bool, str]:
    """Whether moving one stream from `hi` to `lo` pays, and why (stream-seconds).

    Saved over the moved stream's `left` tokens: its own step difference, one
    stream's share of the step for each stream left on `hi`, less the same for
    each stream on `lo`. Cost: the moved stream's pause, `move_s` (the KV leg on
    `hi`, from measured moves) and its first step on `lo`; and one block's prefill
    in a step of every other stream on either side.
    """
    if hi.step_s is None or lo.step_s is None:
        return False, "no measured steps yet"
    lo_after = lo.step_s + lo.slope_s
    cost = move_s + lo_after + (hi.streams - 1) * hi.block_s + lo.streams * lo.block_s
    if hi.step_s > itl_s >= lo_after:
        return True, (f"{hi.id}'s step {1000 * hi.step_s:.0f} ms is past the "
                      f"{1000 * itl_s:.0f} ms ITL target; {lo.id}'s would be "
                      f"{1000 * lo_after:.0f} ms")
    per_token = (hi.step_s - lo_after) + (hi.streams - 1) * hi.slope_s - lo.streams * lo.slope_s
    saved = hi.left * per_token
    verdict = "saves" if saved > cost else "would save only"
    return saved > cost, (f"{verdict} {saved:.2f} stream-s over {hi.left} tokens "
                          f"against a move's {cost:.2f} s")


def plan(loads: list[Load], last_move: Mapping[str, float], now: float,
         dwell_s: float, itl_s: float, move_s: float,
         min_gap: int = MIN_GAP) -> tuple[str, str, str] | None:
    """(from, to, why) for one move, or None."""
    calm = [w for w in loads if now - last_move.get(w.id, -1e18) >= dwell_s]
    if len(calm) < 2:
        return None
    hi = max(calm, key=lambda w: (w.streams, w.id))
    lo = min(calm, key=lambda w: (w.streams, w.id))
    if hi.id == lo.id or hi.streams - lo.streams < min_gap or hi.movable < 1:
        return None
    ok, why = pays(hi, lo, itl_s, move_s)
    if not ok:
        return None
    return hi.id, lo.id, f"rebalance: {hi.id} ran {hi.streams} streams, {lo.id} {lo.streams}; {why}"


def clearing(src: Load, dests: list[Load], prefill_s: float, chunk_s: float, itl_s: float,
             move_s: float) -> tuple[str, int, str] | None:
    """(to, how many, why): streams to move off `src` before it prefills a prompt
    for `prefill_s` seconds, or None.

    A stream left there waits for the whole prefill, however it is chunked: each
    step carries a chunk beside its token. Moved first, it pauses for one move
    (`move_s`) instead, and runs on the least loaded other worker, which takes at
    most as many as keep its step within the ITL target. The prompt waits for the
    moves' one-token legs, which go ahead of it on `src` (a leg behind a prefill
    in progress would wait for all of it): at most a move per stream moved. So
    the moves are made when the stream-seconds they save, net of the growth of
    the destination's step for the streams already there, pass what they cost
    the prompt; and only when the move's pause (`move_s` and a first step
    there) is no longer than the longest gap the prefill would make on `src`
    (its step beside one chunk, `chunk_s`), with the legs of several moves
    sharing a step there (a partial block each): a worker with a small step
    budget already keeps every gap short, and a move would make one longer gap.
    """
    if src.movable < 1 or prefill_s <= move_s:
        return None
    ok = [d for d in dests if d.id != src.id and d.step_s is not None]
    if not ok:
        return None
    lo = min(ok, key=lambda d: (d.streams, d.id))
    assert lo.step_s is not None
    gap = (src.step_s if src.step_s is not None else lo.step_s) + chunk_s

    def fits(n: int) -> bool:
        # The legs of n moves share a step on `src`, each with its last partial block.
        there = lo.step_s + n * lo.slope_s
        return there <= itl_s and move_s + (n - 1) * src.block_s + there <= gap

    room = src.movable
    while room and not fits(room):
        room -= 1
    if room < 1:
        return None
    # The destination's streams run `room` slopes slower for the prefill's span.
    tokens_there = prefill_s / max(lo.step_s + room * lo.slope_s, 1e-3)
    saved = room * (prefill_s - move_s) - lo.streams * room * lo.slope_s * tokens_there
    # The legs may take a step each on `src` before the prompt's first chunk.
    cost = room * move_s
    if saved <= cost:
        return None
    return lo.id, room, (f"clear before a {prefill_s:.2f} s prefill on {src.id}: "
                         f"{room} stream(s) to {lo.id} save {saved:.2f} stream-s against "
                         f"{cost:.2f} s for the prompt")


class Balancer:
    """Runs `plan` every period and asks the migrator for the move."""

    def __init__(self, itl_s: float, loads: Callable[[], list[Load]],
                 move: Callable[[str, str, str], bool], clock: Callable[[], float],
                 move_s: Callable[[], float]) -> None:
        self.itl_s = itl_s
        self.dwell_s = DWELL_ITL * itl_s
        self.period_s = PERIOD_ITL * itl_s
        self.loads = loads
        self.move = move
        self.clock = clock
        self.move_s = move_s
        self.last_move: dict[str, float] = {}
        self.moves = 0

    def moved(self, frm: str, to: str) -> None:
        """A move made outside `step` (a worker cleared before a prefill): the dwell
        holds both workers, so the balancer does not undo it at once."""
        now = self.clock()
        self.last_move[frm] = self.last_move[to] = now
        self.moves += 1

    def step(self) -> tuple[str, str] | None:
        now = self.clock()
        pick = plan(self.loads(), self.last_move, now, self.dwell_s, self.itl_s, self.move_s())
        if pick is None or not self.move(*pick):
            return None
        self.last_move[pick[0]] = self.last_move[pick[1]] = now
        self.moves += 1
        return pick[0], pick[1]

    async def run(self) -> None:
        while True:
            await asyncio.sleep(self.period_s)
            self.step()
