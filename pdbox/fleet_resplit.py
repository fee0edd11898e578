"""The slow loop's hands: re-split a running box between prefill and decode.

`pdbox.resplit` is the pure part (which split, the memory sequence, the
dwell, the batch size); this moves workers: one role at a time, break before
make while soft roles let the other role serve every request (the card never
holds a role's old and new workers at once), make before break otherwise.
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
from typing import TYPE_CHECKING, Any

from pdbox import resplit
from pdbox.config import Profile
from pdbox.hardware.mps import MEMORY_BUDGET

if TYPE_CHECKING:
    from pdbox.fleet import Fleet
    from pdbox.workers.supervisor import Worker


class Resplitter:
    def __init__(self, fleet: Fleet) -> None:
        self.fleet = fleet
        self.ctl = resplit.SplitController(fleet.profile.autoscaler.resplit_dwell_s)
        self.batch = resplit.BatchWindow()
        self._model: Any = None
        self.busy = False

    def status(self, now: float) -> dict[str, Any]:
        return {**self.ctl.status(self.fleet.live_profile, now), "moving": self.busy}

    def maybe_resplit(self, decode_itl_p90_s: float | None = None) -> None:
        """Move a core (CPU) or SM share (MPS) between the roles: the rule replay judges.

        Both roles' needs over the last minute (`resplit.split_needs`, with the
        device model of pdbox/replay/split_sim.py): decode from its batch p90 and
        the ITL target, prefill from the prompt tokens routed and waiting.
        `SplitController.propose_needs` moves only when a role is short of its
        need for as long as a move costs, by a bounded step, past the hysteresis
        and the dwell, and holds the operator's pin; a split the card cannot hold step by step is not tried
        (it would fail, revert and be retried every period).
        """
        p = self.fleet.profile
        if not (p.autoscaler.resplit and p.is_pd):
            return
        now = time.monotonic()
        running, context = self._decoding()
        prompts, backlog = self._prompts()
        self.batch.add(now, running, context, prompts, backlog)
        if self.busy or self.fleet.drains or not self.batch.full(now):
            return
        if self._model is None:
            from pdbox.replay.split_sim import BoxModel

            self._model = BoxModel.for_profile(p)
        dec_units = (1 - resplit.current_split(self.fleet.live_profile).prefill_share()) * \
            self._model.units
        need = resplit.split_needs(self._model, self.batch, p.slo.itl_s, dec_units)
        pre_units = resplit.current_split(self.fleet.live_profile).prefill_share() * \
            self._model.units
        new = self.ctl.propose_needs(self.fleet.live_profile, need, now,
                                     move_cost_s=resplit.move_cost_s(self._model, self.batch,
                                                                     pre_units))
        if new is None:
            return
        why = need.why
        try:
            self.resplit_to(new, why, decode_itl_p90_s)
        except resplit.SplitError as exc:
            if self.ctl.held != str(exc):
                self.fleet.event("scale", f"re-split held: {exc}")
            self.ctl.held = str(exc)

    def _decoding(self) -> tuple[float, float]:
        """Sequences decoding on the box and the KV tokens they hold (from KV use)."""
        running = context = 0.0
        for b in self.fleet.registry.backends.values():
            running += b.running
            context += b.kv_usage * b.num_blocks * self.fleet.profile.model.block_size
        return running, context

    def _prompts(self) -> tuple[float, float]:
        """Prompt tokens the router has routed so far (its counter), and an estimate of
        those waiting to be prefilled: the workers' waiting requests at the mean prompt
        length routed so far (vLLM reports waiting requests, not their tokens)."""
        m = self.fleet.router.metrics
        total, count = m.prompt_tokens.total(), m.requests.total()
        waiting = sum(b.waiting for b in self.fleet.registry.backends.values())
        return total, waiting * (total / count if count else 0.0)

    def pin_split(self, text: str | None) -> dict[str, Any]:
        """The operator's split (`pdbox scale split A/B`), or `None` to hand it back."""
        if text is None:
            self.ctl.pinned = None
            self.fleet.event("scale", "split: back to the autoscaler")
            return {"role": "split", "split": "auto"}
        new = resplit.parse_split(self.fleet.live_profile, text)
        if self.busy:
            raise resplit.SplitError("a re-split is in progress; pin again once it is done")
        self.ctl.pinned = text
        if new == resplit.current_split(self.fleet.live_profile):
            self.fleet.event("scale", f"split: pinned to {text} by the operator (already there)")
            return {"role": "split", "split": text, "moving": False}
        self.resplit_to(new, f"pinned to {text} by the operator")
        return {"role": "split", "split": text, "moving": True}

    def resplit_to(self, new: Any, why: str, decode_itl_p90_s: float | None = None) -> None:
        """Start a re-split to `new` (raises SplitError, one sentence, when it cannot be)."""
        previous = self.fleet.live_profile
        target = resplit.apply_split(previous, new)
        target = self._sized(target, decode_itl_p90_s)
        counts = {r: len(self.fleet.role_workers(r)) for r in ("prefill", "decode")}
        break_first = self.fleet.router.soft.enabled
        if break_first:
            steps = resplit.memory_sequence(previous, target, counts, facts=self._facts(),
                                            card_bytes=self.fleet._gpu_total_bytes())
            order = tuple(dict.fromkeys(s.role for s in steps))
        else:
            # With a fixed split no prefill worker serves whole requests, so the
            # decode role may never be down: the replacement starts first, which
            # needs the card to hold both.
            if previous.hardware.device == "cuda":
                peak = resplit.make_before_break_peak(previous, counts)
                if peak >= MEMORY_BUDGET:
                    raise resplit.SplitError(
                        f"with router.soft_roles off a re-split starts each replacement "
                        f"before its worker stops, which needs {peak:.2f} of the card's "
                        f"memory (limit {MEMORY_BUDGET}): turn soft roles on")
            order = ("prefill", "decode")
        old = resplit.current_split(previous)
        reason = f"re-split: {resplit.describe(old, new)} ({why})"
        self.ctl.moved(time.monotonic(), reason)
        self.fleet.event("scale", reason)
        self.busy = True
        self.fleet.live_profile = target
        self.fleet._tasks.append(asyncio.create_task(
            self._rolling_restart(order, previous, break_first)))

    def _facts(self) -> Any:
        """The served model's facts (config.json) for the memory ledger; None off a GPU."""
        if self.fleet.profile.hardware.device != "cuda":
            return None
        from pdbox.plan.model_facts import FactsError
        from pdbox.plan.sources import facts_for_source

        try:
            return facts_for_source(self.fleet.model_path,
                                    dtype=self.fleet.profile.model.dtype)
        except (FactsError, OSError, ValueError):
            return None

    def _sized(self, target: Profile, decode_itl_p90_s: float | None) -> Profile:
        """The decode batch for the new workers, from the role's queue and ITL."""
        if target.decode is None:
            return target
        bs = [b for b in self.fleet.registry.backends.values() if b.role == "decode"]
        seqs = resplit.size_decode_batch(
            target.decode.max_num_seqs, running=sum(b.running for b in bs),
            waiting=sum(b.waiting for b in bs), itl_p90_s=decode_itl_p90_s,
            itl_slo_s=self.fleet.profile.slo.itl_s)
        if seqs != target.decode.max_num_seqs:
            self.fleet.event("scale", f"re-split: decode max_num_seqs "
                             f"{target.decode.max_num_seqs or 'default'} → {seqs} "
                             "(queue and ITL)")
            target = dataclasses.replace(target, decode=dataclasses.replace(
                target.decode, max_num_seqs=seqs))
        return self._sized_tokens(target, decode_itl_p90_s)

    def _sized_tokens(self, target: Profile, decode_itl_p90_s: float | None) -> Profile:
        """Each role's step token budget for its new workers (resplit.size_batched_tokens).

        Only with measured figures: a split forced with no ITL measured keeps the budgets.
        """
        if decode_itl_p90_s is None or target.prefill is None or target.decode is None:
            return target
        router = self.fleet.router
        slo = self.fleet.profile.slo
        ttft = router.metrics.ttft.percentile(0.9, time.monotonic() - 60.0)
        for role in ("decode", "prefill"):
            rc = target.role(role)
            bs = [b for b in self.fleet.registry.backends.values() if b.role == role]
            tps = [router.decider.prefill_tps(b.id) for b in bs]
            tokens = resplit.size_batched_tokens(
                role, rc.max_num_batched_tokens, prefill_tps=min(tps) if tps else None,
                itl_slo_s=slo.itl_s, ttft_p90_s=ttft, ttft_slo_s=slo.ttft_s,
                waiting=sum(b.waiting for b in bs))
            if tokens == rc.max_num_batched_tokens or tokens < max(rc.max_num_seqs, 1):
                continue
            self.fleet.event("scale", f"re-split: {role} max_num_batched_tokens "
                             f"{rc.max_num_batched_tokens or 'default'} → {tokens} "
                             "(prefill speed, ITL and TTFT)")
            target = dataclasses.replace(target, **{role: dataclasses.replace(
                rc, max_num_batched_tokens=tokens)})
        return target

    async def _wait_ready(self, new: list[Worker]) -> bool:
        deadline = time.monotonic() + self.fleet.profile.engine.start_timeout_s
        while time.monotonic() < deadline and not all(w.state == "ready" for w in new):
            if any(w.state == "failed" for w in new):
                break
            await asyncio.sleep(1.0)
        return all(w.state == "ready" for w in new)

    async def _rolling_restart(self, roles: tuple[str, ...], previous: Profile,
                               break_first: bool = True) -> None:
        """Replace each role's workers with ones on the new split, one role at a time.

        Break before make (soft roles on): the role's old workers drain and stop,
        then its new ones start, so the card never holds both; meanwhile the
        other role serves every request (aggregated). Make before break (soft
        roles off): each replacement starts before the worker it replaces
        drains. A role whose new workers fail to start goes back to its old
        slice.
        """
        try:
            for role in roles:
                if not await self._restart_role(role, previous, break_first):
                    return
            done = resplit.describe_split(resplit.current_split(self.fleet.live_profile))
            self.fleet.event("scale", f"re-split done: {done}")
        finally:
            self.busy = False
            self.ctl.phase = ""

    async def _restart_role(self, role: str, previous: Profile, break_first: bool) -> bool:
        """One role onto the new split; False when it went back to its old slice."""
        f = self.fleet
        old = f.role_workers(role)
        if not old:
            return True
        other = "decode" if role == "prefill" else "prefill"
        if break_first:
            if not any(w.state == "ready" for w in f.role_workers(other)):
                f.event("error", f"re-split stopped before {role}: no ready {other} worker "
                        "would serve meanwhile")
                f.live_profile = dataclasses.replace(f.live_profile,
                                                     **{role: previous.role(role)})
                return False
            self.ctl.phase = (f"{role}: stopping {', '.join(w.id for w in old)}; "
                              f"{other} serves every request meanwhile")
            f.event("scale", f"re-split: {self.ctl.phase}")
            for w in old:
                f.drain(w)
            while any(w.id in f.drains for w in old):
                await asyncio.sleep(0.5)
            new = [f.add_worker(role) for _ in old]
            self.ctl.phase = f"{role}: starting {', '.join(w.id for w in new)}"
            f.event("scale", f"re-split: {self.ctl.phase} on {new[0].spec.slice or 'the GPU'}")
        else:
            new = [f.add_worker(role) for _ in old]
            self.ctl.phase = f"{role}: starting {', '.join(w.id for w in new)} first"
        if not await self._wait_ready(new):
            f.event("error", f"re-split: new {role} workers did not become ready; {role} goes "
                    "back to its old slice")
            f.live_profile = dataclasses.replace(f.live_profile, **{role: previous.role(role)})
            for w in new:
                f.drain(w)
            if break_first:
                await self._wait_ready([f.add_worker(role) for _ in old])
            return False
        if not break_first:
            for w in old:
                f.drain(w)
            while any(w.id in f.drains for w in old):
                await asyncio.sleep(0.5)
        return True
