"""Re-splitting the machine between prefill and decode (behind `autoscaler.resplit`).

The controller (`pdbox.autoscaler.propose_split`) says when the prefill/decode
load ratio has moved far enough to move a core (CPU) or SM share (GPU with MPS)
from one role to the other. This module turns the current profile into that
Split and back: `current_split` reads it, `apply_split` gives the profile the
new workers of each role are started with. The fleet then restarts one
role at a time, break before make: the role's old workers stop before its
new ones start, so the card never holds both (`memory_sequence` checks every
step against it), while the other role serves every request aggregated
(soft roles, pdbox/router/soft_roles.py). `SplitController` says when to
move (hysteresis, a minimum dwell, the operator's pin); `size_decode_batch`
sizes the decode batch applied at the same restarts. Pure functions; no
processes here.
"""

from __future__ import annotations

import dataclasses
from collections import deque
from typing import Any

from pdbox.autoscaler import Split
from pdbox.config import Profile, parse_core_set


def current_split(profile: Profile) -> Split:
    if not profile.is_pd or profile.prefill is None or profile.decode is None:
        return Split()
    if profile.hardware.device == "cpu":
        pre = sorted({c for cs in profile.prefill.cores for c in parse_core_set(cs)})
        dec = sorted({c for cs in profile.decode.cores for c in parse_core_set(cs)})
        return Split(prefill_cores=tuple(pre), decode_cores=tuple(dec))
    return Split(prefill_sm_percent=profile.prefill.sm_percent,
                 decode_sm_percent=profile.decode.sm_percent)


def _core_list(cores: tuple[int, ...]) -> tuple[str, ...]:
    # Every worker of the role computes on the role's whole core set.
    return (",".join(str(c) for c in cores),)


def apply_split(profile: Profile, split: Split) -> Profile:
    """The profile with the roles' cores (CPU) or SM percentages (GPU) replaced."""
    assert profile.prefill is not None and profile.decode is not None
    if profile.hardware.device == "cpu":
        pre = dataclasses.replace(profile.prefill, cores=_core_list(split.prefill_cores))
        dec = dataclasses.replace(profile.decode, cores=_core_list(split.decode_cores))
    else:
        pre = dataclasses.replace(profile.prefill, sm_percent=split.prefill_sm_percent)
        dec = dataclasses.replace(profile.decode, sm_percent=split.decode_sm_percent)
    return dataclasses.replace(profile, prefill=pre, decode=dec)


def demands(prefill_load: float, decode_load: float) -> tuple[float, float]:
    """Role demands from their loads (waiting + running per role, plus in-flight legs).

    A floor keeps an idle role from reading as zero demand, which would
    propose giving the whole box to the other role after one quiet period.
    """
    return max(prefill_load, 0.5), max(decode_load, 0.5)


def describe(old: Split, new: Split) -> str:
    if new.prefill_cores or new.decode_cores:
        return (f"prefill cores {_fmt(old.prefill_cores)}→{_fmt(new.prefill_cores)}, "
                f"decode cores {_fmt(old.decode_cores)}→{_fmt(new.decode_cores)}")
    return (f"prefill SM {old.prefill_sm_percent}%→{new.prefill_sm_percent}%, "
            f"decode SM {old.decode_sm_percent}%→{new.decode_sm_percent}%")


def _fmt(cores: tuple[int, ...]) -> str:
    return ",".join(str(c) for c in cores) or "-"


# ------------------------------------------------------------- operator's split


class SplitError(ValueError):
    """A split the operator asked for cannot be applied; str() is one sentence."""


def parse_split(profile: Profile, text: str) -> Split:
    """`pdbox scale split A/B`: A for prefill, B for decode.

    CPU: core sets (`0-2/3`, or `1/0` to swap the roles of a two-core box);
    together they must be the cores the box's P/D roles hold now, each role
    at least one, none shared. GPU with MPS: SM percentages summing to 100,
    each at least 10.
    """
    if not profile.is_pd or profile.prefill is None or profile.decode is None:
        raise SplitError(f"profile {profile.name} is not P/D: there is no split to pin")
    parts = text.strip().split("/")
    if len(parts) != 2 or not all(parts):
        raise SplitError(f"a split reads PREFILL/DECODE (e.g. 60/40, or 1/0 for cores), "
                         f"not {text!r}")
    now = current_split(profile)
    if profile.hardware.device == "cpu":
        try:
            pre, dec = (tuple(parse_core_set(p)) for p in parts)
        except ValueError:
            raise SplitError(f"on a CPU a split names core sets, e.g. 0/1 or 0-2/3, "
                             f"not {text!r}") from None
        if set(pre) & set(dec):
            raise SplitError(f"prefill and decode may not share a core ({text})")
        have = set(now.prefill_cores) | set(now.decode_cores)
        if set(pre) | set(dec) != have:
            raise SplitError(f"the split must use exactly the cores the roles hold now "
                             f"({_fmt(tuple(sorted(have)))}), not {text}")
        return Split(prefill_cores=pre, decode_cores=dec)
    if profile.hardware.sharing != "mps":
        raise SplitError("only a CPU box or one GPU shared through MPS can be re-split")
    try:
        pre_sm, dec_sm = (int(p) for p in parts)
    except ValueError:
        raise SplitError(f"on a GPU a split names SM percentages, e.g. 60/40, "
                         f"not {text!r}") from None
    if pre_sm + dec_sm != 100 or min(pre_sm, dec_sm) < SM_FLOOR:
        raise SplitError(f"SM percentages must sum to 100 with each at least {SM_FLOOR} "
                         f"(got {pre_sm}/{dec_sm})")
    return Split(prefill_sm_percent=pre_sm, decode_sm_percent=dec_sm)


SM_FLOOR = 10


# --------------------------------------------------- break before make, in order


@dataclasses.dataclass(frozen=True)
class Step:
    """One move of a re-split: stop the role's old workers, or start its new ones.

    `fractions` are the memory fractions of every worker alive once the step
    is done (GPU; empty on a CPU): what the card must hold at that moment.
    """

    action: str  # stop | start
    role: str
    count: int
    fractions: tuple[float, ...] = ()

    def describe(self) -> str:
        what = f"{self.action} {self.count} {self.role} worker(s)"
        if self.fractions:
            what += f" (card: {sum(self.fractions):.2f} of memory in use after)"
        return what


def order_roles(old: Profile, new: Profile) -> tuple[str, ...]:
    """The role whose memory shrinks goes first (its memory frees before the other
    grows); on a CPU, or when neither changes, prefill first: its requests are the
    ones the decode worker serves best alone (as local prefills)."""
    if old.hardware.device == "cuda" and old.prefill and new.prefill and old.decode \
            and new.decode:
        d_pre = new.prefill.memory_fraction - old.prefill.memory_fraction
        d_dec = new.decode.memory_fraction - old.decode.memory_fraction
        if d_dec < d_pre:
            return ("decode", "prefill")
    return ("prefill", "decode")


def memory_sequence(old: Profile, new: Profile, counts: dict[str, int],
                    others: tuple[float, ...] = (), *, facts: Any = None,
                    card_bytes: int | None = None) -> list[Step]:
    """The steps of a break-before-make re-split, each checked against the card.

    `counts`: workers per role now. `others`: memory fractions of workers no
    re-split touches. One role at a time: its old workers stop (the other role
    serves every request meanwhile), then its new ones start. Raises SplitError,
    naming the step, when the card could not hold what is alive after a step,
    or (given the model's `facts` and the card's bytes) when a new worker's
    memory ledger (pdbox/plan) leaves it no room for weights, headroom and one
    sequence's KV.
    """
    from pdbox.hardware.mps import check_memory_fractions

    cuda = old.hardware.device == "cuda"
    frac = {r: old.role(r).memory_fraction for r in ("prefill", "decode")}
    alive = dict(counts)
    steps: list[Step] = []
    for role in order_roles(old, new):
        n = counts.get(role, 0)
        if n == 0:
            continue
        for action in ("stop", "start"):
            if action == "stop":
                alive[role] = 0
            else:
                alive[role] = n
                frac[role] = new.role(role).memory_fraction
                if cuda and facts is not None and card_bytes:
                    _check_ledger(new, role, facts, card_bytes)
            fr = tuple(f for r in ("prefill", "decode") for f in [frac[r]] * alive[r]) + others \
                if cuda else ()
            if cuda and fr:
                try:
                    check_memory_fractions(list(fr))
                except ValueError as exc:
                    raise SplitError(f"re-split step '{action} {role}' would not fit: "
                                     f"{exc}") from None
            steps.append(Step(action, role, n, fr))
    return steps


def _check_ledger(profile: Profile, role: str, facts: Any, card_bytes: int) -> None:
    from pdbox.plan.memory import cap_bytes
    from pdbox.workers.vllm import worker_ledger

    fraction = profile.role(role).memory_fraction
    ledger = worker_ledger(profile, role, cap_bytes(fraction, card_bytes), facts)
    problem = ledger.problem(f"the new {role} worker", f"MPS cap {fraction:g}", role)
    if problem:
        raise SplitError(f"re-split step 'start {role}' would not fit: {problem}")


def make_before_break_peak(old: Profile, counts: dict[str, int]) -> float:
    """The card's memory at the worst moment of the old rolling restart (a role's
    replacement started before its worker stops): shown to say why that was refused."""
    total = sum(old.role(r).memory_fraction * counts.get(r, 0) for r in ("prefill", "decode"))
    return max(total + old.role(r).memory_fraction * counts.get(r, 0)
               for r in ("prefill", "decode"))


# ------------------------------------------------------------------ the slow loop


class SplitController:
    """When to move the split: the load ratio's hysteresis (`propose_split`), a
    minimum dwell after each move (each costs a worker restart: a minute of
    model loading on a GPU), and the operator's pin. Pure: the clock is an argument.
    """

    def __init__(self, dwell_s: float) -> None:
        self.dwell_s = dwell_s
        self.pinned: str | None = None  # the operator's split text, while pinned
        self.last_move_at = float("-inf")
        self.last_reason = ""
        self.phase = ""  # what a re-split in progress is doing now
        self.held = ""  # why the last look moved nothing
        self.short_since: float | None = None  # since when a role lacks its need

    def _held(self, now: float) -> bool:
        """Whether the operator's pin or the dwell after the last move holds the split
        (and `held` says which)."""
        if self.pinned is not None:
            self.held = f"pinned to {self.pinned} by the operator"
            return True
        left = self.dwell_s - (now - self.last_move_at)
        if left > 0:
            self.held = f"dwell: {left:.0f}s until the split may move again"
            return True
        return False

    def propose(self, profile: Profile, prefill_load: float, decode_load: float,
                now: float) -> Split | None:
        from pdbox.autoscaler import propose_split

        if self._held(now):
            return None
        new = propose_split(profile, *demands(prefill_load, decode_load), current_split(profile))
        self.held = "" if new else "load ratio within the hysteresis band"
        return new

    def propose_needs(self, profile: Profile, need: SplitNeed, now: float,
                      move_cost_s: float = 0.0, hysteresis: float = 0.15) -> Split | None:
        """The damped move toward the split both roles' needs ask for (`SplitNeed`).

        Nothing moves while the pin or the dwell holds, while every role has its
        need under the current split (a move costs two restarts and gains nothing
        then), until a role has been short for `move_cost_s` in a row (the time the
        move itself takes: each role down for its start-up), or while the target
        is within the hysteresis of the current share. Waiting as long as the move
        costs is the ski-rental rule: a shortage that ends sooner (a burst, a phase
        that passes) costs less than moving would have, and one that lasts is paid
        at most twice. A move goes at most MAX_STEP_SHARE of the box.
        """
        if self._held(now):
            return None
        cur = current_split(profile)
        n = float(need.units)
        cur_pre = cur.prefill_share() * n
        if not need.short(cur_pre):
            self.short_since = None
            self.held = "each role has its need under the current split"
            return None
        # Overloaded (no split meets both needs): a move cannot bring both within
        # their SLOs, while its restarts send every request to the other worker,
        # behind the backlog, for two start-ups. Only a role under its floor (its
        # queue or ITL would grow without bound) is worth that, and only as far as
        # its floor.
        if need.overloaded() and not need.below_floor(cur_pre):
            self.short_since = None
            self.held = "overloaded: no split meets both needs, and each role has its floor"
            return None
        if need.prefill_floor + need.decode_floor > n:
            # Not even both floors fit: some queue grows whatever the split, and a move
            # would only shift the starvation onto the other role, for two restarts.
            self.short_since = None
            self.held = "overloaded: no split gives both roles their floors"
            return None
        want = need.nearest_floors(cur_pre) if need.overloaded() else need.target_prefill()
        if need.strands_backlog(cur_pre):
            self.held = (f"{need.backlog_tokens:.0f} prompt tokens waiting: a move now "
                         "would strand the requests its restarts send to the other worker")
            return None
        if self.short_since is None:
            self.short_since = now
        if now - self.short_since < move_cost_s:
            self.held = (f"a role is short for {now - self.short_since:.0f}s of the "
                         f"{move_cost_s:.0f}s a move costs")
            return None
        step = MAX_STEP_SHARE * n
        if profile.hardware.device == "cpu":
            step = max(1.0, float(round(step)))
        want = min(cur_pre + step, max(cur_pre - step, want))
        from pdbox.autoscaler import propose_split

        new = propose_split(profile, want, n - want, cur, hysteresis=hysteresis)
        self.held = "" if new else "the needs are within the hysteresis of the current split"
        return new

    def moved(self, now: float, reason: str) -> None:
        self.last_move_at = now
        self.short_since = None
        self.last_reason = reason

    def status(self, profile: Profile, now: float) -> dict[str, object]:
        split = current_split(profile)
        return {
            "split": describe_split(split),
            "prefill_share": split.prefill_share(),
            "pinned": self.pinned,
            "last_reason": self.last_reason or None,
            "last_move_s_ago": None if self.last_move_at == float("-inf")
            else now - self.last_move_at,
            "phase": self.phase or None,
            "held": self.held or None,
            "dwell_s": self.dwell_s,
        }


def describe_split(split: Split) -> str:
    """'prefill cores 0 / decode cores 1', or 'prefill 60% SM / decode 40% SM'."""
    if split.prefill_cores or split.decode_cores:
        return f"prefill cores {_fmt(split.prefill_cores)} / decode cores {_fmt(split.decode_cores)}"
    return f"prefill {split.prefill_sm_percent}% SM / decode {split.decode_sm_percent}% SM"


# ------------------------------------------------------------------ batch sizing

# Bounds of the decode batch the loop may set (vLLM's default is 256 sequences).
MIN_SEQS = 4
MAX_SEQS = 256


def size_decode_batch(current: int, running: float, waiting: float, itl_p90_s: float | None,
                      itl_slo_s: float) -> int:
    """max_num_seqs for the decode role's next workers, from its queue and ITL.

    The seed's "adjust batch size based on queue length": ITL over target with
    nothing waiting means the batch is larger than the role can step in time,
    so it is cut to what kept ITL at target (running x target / ITL); requests
    waiting while ITL has room means the batch cap holds them back, so it
    doubles. `current` 0 is vLLM's default (256). Applied only at a re-split's
    restarts: changing it needs a worker restart.
    """
    cur = current or MAX_SEQS
    if itl_p90_s is None or itl_slo_s <= 0:
        return current
    if itl_p90_s > itl_slo_s and waiting <= 0 and running > 0:
        want = int(running * itl_slo_s / itl_p90_s)
        return max(MIN_SEQS, min(cur, want))
    if waiting > 0 and itl_p90_s < 0.5 * itl_slo_s:
        return min(MAX_SEQS, cur * 2)
    return current


# Bounds of the step token budget the loop may set, and what 0 (the default) stands for.
MIN_BATCHED_TOKENS = 512
MAX_BATCHED_TOKENS = 16384
DEFAULT_BATCHED_TOKENS = 8192


def size_batched_tokens(role: str, current: int, *, prefill_tps: float | None,
                        itl_slo_s: float, ttft_p90_s: float | None, ttft_slo_s: float,
                        waiting: float) -> int:
    """max_num_batched_tokens for a role's next workers (0 keeps the default).

    The seed's "dynamic batching", for the step's token budget. Decode: a step
    that carries a prefill chunk beside running streams must fit the ITL
    target, so the budget shrinks to what the worker prefills within it
    (prefill speed x ITL target, in whole 256s, at least MIN_BATCHED_TOKENS);
    it only ever shrinks. Prefill: no stream waits on its steps, so when
    requests queue and TTFT is over target the budget doubles (bigger chunks
    prefill faster), up to MAX_BATCHED_TOKENS. Unknown figures change nothing.
    Applied only at a re-split's restarts.
    """
    cur = current or DEFAULT_BATCHED_TOKENS
    if role == "decode":
        if not prefill_tps or itl_slo_s <= 0:
            return current
        want = max(MIN_BATCHED_TOKENS, int(prefill_tps * itl_slo_s) // 256 * 256)
        return want if want < cur else current
    if role == "prefill":
        if ttft_p90_s is None or waiting <= 0 or ttft_p90_s <= ttft_slo_s:
            return current
        return min(MAX_BATCHED_TOKENS, cur * 2) if cur < MAX_BATCHED_TOKENS else current
    return current


# ------------------------------------------------------- what decode needs (one rule)


class BatchWindow:
    """Both roles' load over the last `window_s`, sampled once per period: the decode
    batch (running sequences and their KV tokens), and the prefill work (prompt tokens
    routed so far, a counter, and prompt tokens waiting to be prefilled). The same
    object feeds the live loop and the replay."""

    def __init__(self, window_s: float = 60.0) -> None:
        self.window_s = window_s
        self._samples: deque[tuple[float, float, float]] = deque()
        # (time, prompt tokens routed, waiting; the same two for the decode role's own
        # local prefills, which its steps carry beside the batch)
        self._prompts: deque[tuple[float, float, float, float, float]] = deque()
        self._first: float | None = None

    def add(self, now: float, running: float, context: float,
            prompt_tokens: float | None = None, backlog_tokens: float = 0.0,
            decode_prompt_tokens: float = 0.0, decode_backlog_tokens: float = 0.0) -> None:
        """`prompt_tokens`: the count of prompt tokens routed since start (a counter);
        `backlog_tokens`: prompt tokens routed but not yet prefilled. Without them
        only the decode side is known (prefill's need reads as unknown).
        `decode_*`: the part of both routed to the decode role to prefill locally
        (where known; 0 counts it all as the prefill role's)."""
        self._first = now if self._first is None else self._first
        self._samples.append((now, running, context))
        if prompt_tokens is not None:
            self._prompts.append((now, prompt_tokens, max(0.0, backlog_tokens),
                                  decode_prompt_tokens, max(0.0, decode_backlog_tokens)))
        for q in (self._samples, self._prompts):
            while q and q[0][0] < now - self.window_s:
                q.popleft()

    def full(self, now: float) -> bool:
        """A whole window has been seen (nothing moves on less)."""
        return self._first is not None and now - self._first >= self.window_s

    def p90(self) -> tuple[float, float]:
        """(batch p90, the KV tokens such a batch holds at the window's mean per sequence)."""
        if not self._samples:
            return 0.0, 0.0
        batches = sorted(b for _, b, _ in self._samples)
        b = batches[int(0.9 * (len(batches) - 1))]
        per_seq = sum(c for _, _, c in self._samples) / max(1.0, sum(batches))
        return b, b * per_seq

    def prompt_rate(self, role: str = "all") -> float | None:
        """Prompt tokens routed per second over the window (None: not measured);
        `role` "decode": those the decode role prefills itself."""
        if len(self._prompts) < 2:
            return None
        i = 3 if role == "decode" else 1
        first, last = self._prompts[0], self._prompts[-1]
        dt = last[0] - first[0]
        return max(0.0, last[i] - first[i]) / dt if dt > 0 else None

    def backlog(self, role: str = "all") -> float:
        """Prompt tokens waiting to be prefilled, the window's mean: one long prompt
        arriving just before a look does not read as a standing queue."""
        if not self._prompts:
            return 0.0
        i = 4 if role == "decode" else 2
        return sum(s[i] for s in self._prompts) / len(self._prompts)


@dataclasses.dataclass(frozen=True)
class SplitNeed:
    """What each role needs of the box, in its units (SM percent or cores).

    `*_units`: what serves the role within its SLO (prefill: keep up with the
    prompts arriving; not the waiting ones, which a move cannot clear sooner: break
    before make, the prefill worker drains them at its old speed first; decode: a step
    at its batch p90 within half the ITL target, the other half for prefill chunks
    beside it). `*_floor`: the least it must never go below (prefill: keep up with
    arrivals alone, else its queue only grows; decode: a step within the whole ITL
    target). Both come from the role's own demand, not from a machine's constant.
    """

    prefill_units: float
    decode_units: float
    prefill_floor: float
    decode_floor: float
    units: int
    why: str
    # Prompt tokens waiting, the prefill speed one unit gives (prefill is
    # compute-bound: linear in the share, on a GPU and on cores alike), and a
    # worker's start-up: what a move's restarts strand (propose_needs).
    backlog_tokens: float = 0.0
    tps_per_unit: float = 0.0
    startup_s: float = 0.0

    def strands_backlog(self, prefill_units: float) -> bool:
        """A move now would leave requests behind a backlog: the waiting prompts take
        longer than a start-up to prefill on the current split (`prefill_units`; break
        before make, the prefill worker drains them at its old speed before it
        restarts), and every request that arrives meanwhile and while each role
        restarts is served by the other worker alone, beside long prompts' chunks."""
        tps = self.tps_per_unit * prefill_units
        return tps > 0 and self.backlog_tokens / tps > self.startup_s

    def target_prefill(self) -> float:
        """Prefill's units in the split both needs ask for.

        Both fit: each gets its need and the slack is split evenly, so that either
        role's need can grow by as much before the next move (giving all of it to
        one role is what made the old loop swing). They do not fit: each first gets its
        floor, then what is left goes in proportion to what each still lacks, so
        the role with the larger backlog gains, but neither starves.
        """
        pu, du, n = self.prefill_units, self.decode_units, float(self.units)
        if pu + du <= n:
            return pu + (n - pu - du) / 2
        pf, df = min(self.prefill_floor, pu), min(self.decode_floor, du)
        if pf + df >= n:
            return n * pf / max(pf + df, 1e-9)
        lack_p, lack_d = pu - pf, du - df
        return pf + (n - pf - df) * lack_p / max(lack_p + lack_d, 1e-9)

    def overloaded(self) -> bool:
        """No split gives both roles their needs."""
        return self.prefill_units + self.decode_units > self.units

    def below_floor(self, prefill_units: float) -> bool:
        """Some role holds less than its floor under a split giving prefill these units."""
        return prefill_units < self.prefill_floor or \
            self.units - prefill_units < self.decode_floor

    def nearest_floors(self, prefill_units: float) -> float:
        """The split nearest `prefill_units` that gives each role its floor (in
        proportion to the floors when they do not both fit)."""
        pf, df, n = self.prefill_floor, self.decode_floor, float(self.units)
        if pf + df >= n:
            return n * pf / max(pf + df, 1e-9)
        return min(n - df, max(pf, prefill_units))

    def short(self, prefill_units: float) -> bool:
        """Some role holds less than its need under a split giving prefill these units:
        only then is a move (two restarts) worth anything."""
        return prefill_units < self.prefill_units or \
            self.units - prefill_units < self.decode_units


def split_needs(model: Any, window: BatchWindow, itl_slo_s: float,
                decode_units_now: float | None = None) -> SplitNeed:
    """Each role's need from its own backlog: decode from its batch and ITL, prefill
    from its prompt arrivals and waiting prompts (`model`: a split_sim.BoxModel).

    Waiting prompts do not raise prefill's need (a move drains them at the old speed
    before it restarts the role); they make a move cost more (`move_cost_s`) and hold
    it while it would strand requests behind them (`SplitNeed.strands_backlog`).
    With no prompt figures (an older caller), prefill needs whatever decode leaves,
    as before.
    """
    b, ctx = window.p90()
    rate = window.prompt_rate()
    if rate is None:
        dec = model.decode_units_for(b, ctx, 0.5 * itl_slo_s)
        dec_floor = model.decode_units_for(b, ctx, itl_slo_s)
        return SplitNeed(model.units - dec, dec, 0.0, dec_floor, model.units,
                         f"decode batch p90 {b:.0f} needs {dec:.0f} of {model.units} units")
    # The decode role's own prefills (short prompts served whole there) need compute
    # too: its units must carry them as well as its batch.
    d_rate = window.prompt_rate("decode") or 0.0
    rate, backlog = max(0.0, rate - d_rate), window.backlog()
    # Keeping up with arrivals is both prefill's need and its floor: less, and its
    # queue grows without bound.
    pre = pre_floor = model.prefill_units_for(rate)
    # Decode at the batch it would have on fewer units, with its own prefills.
    dec = model.decode_units_for(b, ctx, 0.5 * itl_slo_s, d_rate, decode_units_now)
    dec_floor = model.decode_units_for(b, ctx, itl_slo_s, d_rate, decode_units_now)
    why = (f"prefill {rate:.0f} prompt tokens/s need {pre:.0f} of {model.units} units; "
           f"decode batch p90 {b:.0f} and {d_rate:.0f} local prompt tokens/s need "
           f"{dec:.0f} (floor {dec_floor:.0f}); {backlog:.0f} prompt tokens waiting")
    return SplitNeed(pre, dec, pre_floor, dec_floor, model.units, why, backlog,
                     model.prefill_tps(model.units) / model.units, model.startup_s)


def move_cost_s(model: Any, window: BatchWindow, prefill_units: float) -> float:
    """How long a move takes, the time a shortage must last before one pays (ski
    rental): each role down for a start-up, and before that the prefill role
    draining the prompts waiting on it at its current speed (break before make:
    its queued requests finish first, while every new one goes to the other
    worker)."""
    tps = model.prefill_tps(prefill_units)
    drain = window.backlog() / tps if tps > 0 else 0.0
    return 2 * model.startup_s + drain


# A move goes at most this share of the box toward its target: a need measured under
# one split is biased by it (a starved role's queue and batch grow), so the loop
# walks and looks again rather than jumping to the far end. A share, not units, so
# it holds on any box; on a small CPU box it is one core.
MAX_STEP_SHARE = 0.25


def itl_demands(model: Any, window: BatchWindow, itl_slo_s: float) -> tuple[float, float, str]:
    """(prefill demand, decode demand, why) for `SplitController.propose`.

    Decode gets the fewest units whose step at its recent batch (p90) stays within
    half the ITL target (the other half for prefills beside it); prefill gets the
    rest, which soft roles use for whole requests when there is little to prefill.
    `model` is a `pdbox.replay.split_sim.BoxModel`. Scaled by 100 so that the
    controller's floor of 0.5 (meant for request counts) never binds.
    """
    b, ctx = window.p90()
    dec = model.decode_units_for(b, ctx, 0.5 * itl_slo_s)
    why = (f"decode batch p90 {b:.0f} needs {dec:.0f} of {model.units} units for a "
           f"{0.5 * itl_slo_s * 1000:.0f} ms step")
    return 100.0 * (model.units - dec), 100.0 * dec, why
