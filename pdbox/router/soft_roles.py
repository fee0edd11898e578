"""Soft roles: a worker's P/D role is a preference, not a wall.

vLLM's `kv_producer` worker only acts as a prefill leg when a request asks it
to (`kv_transfer_params.do_remote_decode`); any other request it serves end to
end, like an aggregated worker. So the router may use the prefill worker's
slice for whole requests while it has no prefill work, and give it back to
prefill when long prompts come. Measured on cpu-tiny (docs/BENCHMARKS.md): with
short prompts only, a fixed split leaves the prefill core idle while one core
decodes every stream; with long prompts, a stream decoding beside a prefill
stalls for the prefill's whole length.

The rules, per request, on top of the picker and the P/D decider:

- **Whole on a prefill worker** (`eligible`): only for a short prompt (fewer
  uncached tokens than the P/D gate: it would be prefilled where it decodes
  anyway), only while the worker is not prefilling (no prefill leg open, none
  in the last `hold_s`: long prompts tend to come in runs, so a worker that
  just prefilled is kept for the next one), and only below its stream cap
  (`cap`: the streams its measured step keeps within the ITL target, never
  more than the worker's own slots).
  An eligible prefill worker then competes with the decode workers in the
  picker on prefix, queue and KV, so short streams spread over both slices.
  With no decode worker ready (starting, restarting, a re-split), every
  request is served whole on a prefill worker: the box stays up aggregated.
- **Remote prefill, seen with soft roles** (`weigh`): the decider weighs the
  decode worker's streams against remote's extra TTFT; a prefill worker still
  finishing whole streams would stall those too, so their stall joins
  remote's side of the scale. On an idle box a long prompt goes to an idle
  prefill worker when remote costs it little, so that streams starting
  during its prefill decode undisturbed.
- **Role mix** (`RoleMix`): what each worker actually did over a window, as
  shares of requests served whole, as prefill leg and as decode leg.

Pure code: the clock and every observation come in as arguments.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol

from pdbox.router.decider import PRIOR_TRANSFER_S, PDDecision
from pdbox.router.policy import Pick


class Load(Protocol):
    """What soft roles read of a worker (policy.WorkerView)."""

    id: str
    role: str
    ready: bool
    running: int
    inflight: int
    slots: int  # requests the worker runs at once, as it reported (0: not known)


# Remote prefill on an idle prefill worker is taken when it costs the request at
# most this share of its local TTFT, or the KV transfer's measured time (the
# decider's estimate): a share of the request's own time and a measured cost,
# so it holds on any machine.
REMOTE_SLACK = 0.25


@dataclass(frozen=True)
class Settings:
    enabled: bool = True
    # Prompts with at least this many uncached tokens are long (the decider's
    # default); None: the decider's gate for that worker, from its measured speed
    # (SoftRoles.gate), as the router sets it for a profile's "auto".
    gate_tokens: int | None = 256
    # After its last prefill leg, a prefill worker counts as prefilling this long.
    hold_s: float = 10.0
    # Whole requests a prefill worker takes at most: as many streams as its
    # calibrated step keeps within the ITL target, or the profile's per-worker
    # cap. 0: not measured yet. Either way never more than the worker's own slots.
    max_streams: int = 0
    # Hybrid P/D: a prefill worker is a whole-request server like any other, for
    # prompts of any length and with no hold; P/D is a per-request choice, in
    # either direction (choose.py), made only when the measured costs say so.
    hybrid: bool = False


def streams(w: Load) -> int:
    """Requests decoding on a worker: the router's own count is fresher than /metrics."""
    return max(w.running, w.inflight)


class SoftRoles:
    def __init__(self, settings: Settings | None = None,
                 transfer_s: Callable[[], float] | None = None,
                 gate: Callable[[str], int] | None = None) -> None:
        self.settings = settings or Settings()
        # The decider's gate for a worker (from its measured speed), when the
        # settings fix none.
        self.gate_of = gate or (lambda _wid: 0)
        # The KV transfer's measured time (the decider's), for the slack of remote.
        self.transfer_s = transfer_s or (lambda: PRIOR_TRANSFER_S)
        self._legs: dict[str, int] = {}  # prefill legs open per worker
        self._last_leg: dict[str, float] = {}  # when a worker's last prefill leg ended
        # Whole requests open on each prefill worker: its own decode streams.
        # (Its in-flight count also holds prefill legs, which are not streams.)
        self._whole: dict[str, int] = {}

    @property
    def enabled(self) -> bool:
        return self.settings.enabled

    # ------------------------------------------------------------ observations

    def leg_started(self, worker_id: str) -> None:
        self._legs[worker_id] = self._legs.get(worker_id, 0) + 1

    def leg_ended(self, worker_id: str, now: float) -> None:
        self._legs[worker_id] = max(0, self._legs.get(worker_id, 0) - 1)
        self._last_leg[worker_id] = now

    def whole_started(self, worker_id: str) -> None:
        self._whole[worker_id] = self._whole.get(worker_id, 0) + 1

    def whole_ended(self, worker_id: str) -> None:
        self._whole[worker_id] = max(0, self._whole.get(worker_id, 0) - 1)

    def whole_streams(self, worker_id: str) -> int:
        return self._whole.get(worker_id, 0)

    def forget_worker(self, worker_id: str) -> None:
        self._legs.pop(worker_id, None)
        self._last_leg.pop(worker_id, None)

    def gate(self, worker_id: str) -> int:
        g = self.settings.gate_tokens
        return g if g is not None else self.gate_of(worker_id)

    def cap(self, w: Load) -> int | None:
        """Whole streams `w` may take: the ITL fit (or the profile's cap) and its own
        slots, whichever is smaller; None where neither is known yet."""
        caps = [c for c in (self.settings.max_streams, w.slots) if c > 0]
        return min(caps) if caps else None

    def _full(self, w: Load) -> bool:
        cap = self.cap(w)
        return cap is not None and self.whole_streams(w.id) >= cap

    def prefilling(self, worker_id: str, now: float) -> str | None:
        """Why the worker counts as prefilling at `now` (None: it does not)."""
        open_legs = self._legs.get(worker_id, 0)
        if open_legs:
            return f"{open_legs} prefill leg(s) open"
        last = self._last_leg.get(worker_id)
        if last is not None and now - last < self.settings.hold_s:
            return f"prefilled {now - last:.1f}s ago (hold {self.settings.hold_s:.0f}s)"
        return None

    # --------------------------------------------------------------- decisions

    def eligible(self, prefills: Sequence[Load], uncached: Mapping[str, int],
                 decoders_ready: int, now: float) -> tuple[list[str], str]:
        """The prefill workers that may serve this request whole, and why (or why not).

        `uncached`: the prompt's uncached tokens on each prefill worker.
        """
        s = self.settings
        ready = [w for w in prefills if w.ready]
        if not s.enabled or not ready:
            return [], ""
        if decoders_ready == 0:
            return [w.id for w in ready], "no decode worker ready: served whole"
        out: list[str] = []
        why: list[str] = []
        for w in ready:
            n = uncached.get(w.id, 0)
            busy = None if s.hybrid else self.prefilling(w.id, now)
            if s.hybrid:
                if self._full(w):
                    why.append(f"{w.id} full: {self.whole_streams(w.id)} whole streams")
                else:
                    out.append(w.id)
                continue
            gate = self.gate(w.id)
            if n >= gate:
                why.append(f"{w.id} not whole: {n} uncached tokens >= {gate}")
            elif busy:
                why.append(f"{w.id} kept for prefill: {busy}")
            elif self._full(w):
                why.append(f"{w.id} full: {self.whole_streams(w.id)} whole streams")
            else:
                out.append(w.id)
        if out:
            why.insert(0, f"{', '.join(out)} may serve whole: " + (
                "hybrid" if s.hybrid else "short prompt, no prefill work"))
        return out, "; ".join(why)

    def prefer_home(self, pick: Pick, roles: Mapping[str, str]) -> Pick:
        """A prefill worker wins only when strictly better: on a tie the request stays
        on a decode worker, so an idle box behaves as the fixed split does."""
        if roles.get(pick.worker_id) != "prefill":
            return pick
        mine = pick.scores.get(pick.worker_id, 0.0)
        home = [w for w, r in roles.items() if r != "prefill" and w in pick.scores]
        if not home:
            return pick
        best = max(home, key=lambda w: pick.scores[w])
        if pick.scores[best] >= mine - 1e-9:
            return Pick(best, pick.scores, f"{pick.reason}; tie with {best}: kept on the "
                        "decode worker", pick.parts)
        return pick

    def weigh(self, dec: PDDecision, prefill: Load, decode: Load,
              prefill_s: float) -> PDDecision:
        """The decider's call for a prompt past the gate, seen with soft roles.

        - Remote, while the prefill worker decodes whole streams: their stall
          joins remote's side of the scale (`weigh_remote`).
        - Local on an idle box, while the prefill worker is idle: remote
          instead when it costs the request little (`REMOTE_SLACK`). The
          decider compares TTFTs when no stream runs, and remote always loses
          the transfer; but a long prompt prefilled on the decode worker
          stalls every stream that starts during it, and long prompts come in
          runs. Keeping long prompts on the prefill worker keeps decoding
          isolated, which is what its slice is for.
        """
        if not self.enabled or dec.predicted_local_s is None or dec.predicted_remote_s is None:
            return dec
        if dec.remote:
            return self.weigh_remote(dec, prefill, decode, prefill_s)
        extra = dec.predicted_remote_s - dec.predicted_local_s
        slack = max(self.transfer_s(), REMOTE_SLACK * dec.predicted_local_s)
        idle = (streams(prefill) if prefill.role != "prefill"
                else self.whole_streams(prefill.id)) == 0
        if (prefill.ready and idle and not self._legs.get(prefill.id) and extra <= slack):
            return PDDecision(True, f"remote (soft role): {prefill.id} idle, remote costs "
                              f"{extra:+.1f}s <= {slack:.1f}s slack and keeps {decode.id} free "
                              f"to decode; was {dec.reason}", dec.predicted_local_s,
                              dec.predicted_remote_s)
        return dec

    def weigh_remote(self, dec: PDDecision, prefill: Load, decode: Load,
                     prefill_s: float) -> PDDecision:
        """Add the stall of the prefill worker's own streams to remote's cost.

        `prefill_s`: the prompt's predicted prefill time on the prefill worker.
        The decider's rule goes remote when the decode worker's streams × its
        local prefill outweigh remote's extra TTFT; streams decoding on the
        prefill worker would stall for the remote prefill just the same. A tie
        (and remote's small extra TTFT, within the slack) goes remote: a remote
        prefill starts the hold that keeps new streams off the prefill worker,
        so its streams drain and the next long prompts stall nothing, where a
        local one stalls the decode worker's streams now and keeps both mixed.
        """
        if not (self.enabled and dec.remote) or dec.predicted_local_s is None \
                or dec.predicted_remote_s is None:
            return dec
        # A decode worker prefilling for a prefill worker (hybrid, the reverse
        # direction) stalls all its streams; a prefill worker, its whole ones.
        on_p = streams(prefill) if prefill.role != "prefill" else self.whole_streams(prefill.id)
        if on_p == 0:
            return dec
        on_d = streams(decode)
        local_stall = on_d * dec.predicted_local_s
        slack = max(self.transfer_s(), REMOTE_SLACK * dec.predicted_local_s)
        extra = dec.predicted_remote_s - dec.predicted_local_s
        remote_cost = on_p * prefill_s + max(0.0, extra - slack)
        if remote_cost <= local_stall:
            return PDDecision(True, f"{dec.reason}; remote still: {on_p} stream(s) on "
                              f"{prefill.id} stall {remote_cost:.1f} stream-s <= "
                              f"{local_stall:.1f} here", dec.predicted_local_s,
                              dec.predicted_remote_s)
        return PDDecision(False, f"local: {on_p} whole stream(s) on {prefill.id} would stall "
                          f"{remote_cost:.1f} stream-s >= {local_stall:.1f} on {decode.id}; "
                          f"was {dec.reason}", dec.predicted_local_s, dec.predicted_remote_s)


# ------------------------------------------------------------------ role mix

KINDS = ("whole", "prefill", "decode")


class RoleMix:
    """What each worker did for the last requests: served whole, prefill leg, decode leg."""

    def __init__(self, window_s: float = 300.0, per_worker: int = 500) -> None:
        self.window_s = window_s
        self._seen: dict[str, deque[tuple[float, str]]] = {}
        self._per_worker = per_worker

    def record(self, decode: str, prefill: str | None, pd: str, now: float) -> None:
        """One request routed: remote = a prefill leg and a decode leg; else whole."""
        if pd == "remote" and prefill:
            self._add(prefill, "prefill", now)
            self._add(decode, "decode", now)
        else:
            self._add(decode, "whole", now)

    def _add(self, wid: str, kind: str, now: float) -> None:
        self._seen.setdefault(wid, deque(maxlen=self._per_worker)).append((now, kind))

    def forget_worker(self, wid: str) -> None:
        self._seen.pop(wid, None)

    def mix(self, now: float, workers: Iterable[str] | None = None) -> dict[str, dict[str, float]]:
        """worker -> {"whole", "prefill", "decode": share 0..1, "requests": count}."""
        out: dict[str, dict[str, float]] = {}
        since = now - self.window_s
        ids = list(workers) if workers is not None else list(self._seen)
        for wid in ids:
            recent = [k for t, k in self._seen.get(wid, ()) if t >= since]
            n = len(recent)
            row: dict[str, float] = {k: (recent.count(k) / n if n else 0.0) for k in KINDS}
            row["requests"] = n
            out[wid] = row
        return out


def split_shares(mix: Mapping[str, Mapping[str, float]]) -> dict[str, float]:
    """The box's effective split: the share of all legs that were prefill, decode or whole."""
    totals = dict.fromkeys(KINDS, 0.0)
    for row in mix.values():
        n = row.get("requests", 0.0)
        for k in KINDS:
            totals[k] += row.get(k, 0.0) * n
    all_legs = sum(totals.values())
    return {k: (v / all_legs if all_legs else 0.0) for k, v in totals.items()}
