"""What the flow balancer (flow.py) reads of the live router, and the move it asks for.

Kept apart from the pure rule: this reads the registry, the migrator's live
streams, the decider's measured ITL and the slices' calibrations, and turns
them into `flow.Load`s; `move` starts a move by KV.
"""

from __future__ import annotations

import asyncio
import statistics
from collections.abc import Callable

from pdbox.calibration import Calibration
from pdbox.router.backends import Backend, Registry
from pdbox.router.decider import PDDecider
from pdbox.router.flow import Load, clearing
from pdbox.router.migration import MigratingStream, Migrator

# How many of the last moves set a move's cost (the median of their KV legs).
RECENT_MOVES = 5
# A worker one of whose streams has waited this many ITL targets for its next token
# takes no part in a move, as source or as destination: it may be frozen before its
# probes say so, and a KV leg to it, or a pull from it, would hang the moved stream.
QUIET_ITL = 4.0


class FlowView:
    def __init__(self, registry: Registry, migrator: Migrator, decider: PDDecider,
                 calibration_of: Callable[[str], Calibration | None],
                 serving_roles: Callable[[], tuple[str, ...]], max_model_len: int,
                 block_size: int, itl_s: float) -> None:
        self.registry = registry
        self.migrator = migrator
        self.decider = decider
        self.calibration_of = calibration_of  # role -> its slice's calibration
        self.serving_roles = serving_roles
        self.max_model_len = max_model_len
        self.block_size = block_size
        self.itl_s = itl_s

    def loads(self) -> list[Load]:
        out = []
        quiet_s = QUIET_ITL * self.itl_s
        silent = {st.worker.id for st in list(self.migrator.live.values())
                  if st.silent_s() > quiet_s}
        for b in self.registry.of_roles(self.serving_roles()):
            if b.id in silent:
                continue
            n = max(b.running, b.inflight)
            streams = self.migrator.movable(b.id)
            cal = self.calibration_of(b.role)
            step, slope = self._step(b, n, cal)
            block_s = self.block_size / cal.prefill_tps if cal and cal.prefill_tps > 0 else 0.0
            out.append(Load(b.id, n, len(streams), step, slope,
                            self._left(streams[-1]) if streams else 0, block_s))
        return out

    def _step(self, b: Backend, n: int, cal: Calibration | None) -> tuple[float | None, float]:
        """(its step now, growth per stream): the live ITL while it runs streams (a
        prefill beside them shows there), else its calibration at this batch."""
        at = cal.step_at if cal else (lambda _n: None)
        now, nxt = at(max(1, n)), at(max(1, n) + 1)
        slope = max(0.0, nxt - now) if now is not None and nxt is not None else 0.0
        live = self.decider.itl_of(b.id) if n else None
        return (live if live is not None else now), slope

    def _left(self, st: MigratingStream) -> int:
        """Tokens the stream still owes: its limit, else what the context leaves."""
        rem = st.splice.remaining()
        if rem is not None:
            return rem
        return max(0, self.max_model_len - st.splice.prompt_tokens - st.splice.tokens)

    def move_s(self) -> float:
        """A move's pause to its stream: the median gap the clients of the last moves
        saw across them (`pause_ms`: the KV leg, the pull and the first step on the
        new worker; several legs at once take longer each), else the median KV leg,
        else a one-token request's time from calibration (its fixed cost and one
        step, twice). The rules add the destination's step to it, which counts that step
        twice once pauses are measured: an error toward not moving."""
        recent = [m for m in self.migrator.flow_recent[-RECENT_MOVES:] if m.get("ok")]
        pauses = [m["pause_ms"] / 1000 for m in recent if m.get("pause_ms")]
        if pauses:
            return statistics.median(pauses)
        legs = [m["leg_ms"] / 1000 for m in recent if m.get("leg_ms")]
        if legs:
            return statistics.median(legs)
        # Before any move: two one-token requests in turn, the leg on the old
        # worker and the continuation's first token on the new, from calibration.
        cals = [c for c in (self.calibration_of(r) for r in self.serving_roles()) if c]
        if cals:
            return 2 * max(c.overhead_s + (c.step_at(1) or 0.0) for c in cals)
        return self.itl_s

    async def clear(self, worker_id: str, tokens: int, now: float) -> tuple[str, int, str] | None:
        """Before `worker_id` prefills `tokens` uncached tokens: move streams off it
        where `clearing` says it pays, and wait until their one-token legs were
        answered there, so that they go ahead of the prompt. (to, moved, why) or None.

        The wait is bounded by one move per stream moved and one more: a leg that
        takes longer costs the prompt no more than the rule allowed for.
        """
        move_s = self.move_s()
        prefill_s = tokens / self.decider.prefill_tps(worker_id)
        if prefill_s <= move_s:  # most requests: no clearing pays, so no loads to read
            return None
        loads = self.loads()
        src = next((ld for ld in loads if ld.id == worker_id), None)
        if src is None or src.movable < 1:
            return None
        # A worker prefilling already is no place to move a stream to.
        dests = [ld for ld in loads if ld.id != worker_id and self.decider.queue_s(ld.id, now) <= 0]
        b = self.registry.get(worker_id)
        chunk = min(tokens, b.step_tokens or tokens) if b is not None else tokens
        pick = clearing(src, dests, prefill_s, prefill_s * chunk / tokens, self.itl_s, move_s)
        target = self.registry.get(pick[0]) if pick else None
        if pick is None or target is None:
            return None
        to, room, why = pick
        moved = [st for st in self.migrator.movable(worker_id)[-room:] if st.move(target, why)]
        waits = [st.handed.wait() for st in moved if st.handed is not None]
        if waits:
            try:
                await asyncio.wait_for(asyncio.gather(*waits), (len(moved) + 1) * move_s)
            except TimeoutError:
                pass
        return (to, len(moved), why) if moved else None

    def move(self, frm: str, to: str, why: str) -> bool:
        """Move the youngest movable stream of `frm` to `to` (it has the most to go)."""
        target = self.registry.get(to)
        streams = self.migrator.movable(frm)
        if target is None or not streams:
            return False
        return streams[-1].move(target, why)

