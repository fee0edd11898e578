"""Remote or local prefill, per request: the P/D decider.

Pure code: the clock and every observation come in as arguments, so tests
and replays drive it without sleeps or servers.

What it learns, and why this way:

- **One prefill speed per hardware slice.** A prefill worker and a decode
  worker on equal slices (one core each on cpu-tiny) compute a prompt at the
  same speed, so both feed and read one shared estimate. Learning each side
  alone let the side seen first (the remote one, slow because queued) be
  compared with the other side's optimistic prior.
- **Net of queueing, the same way on both sides.** The router tells the
  decider when it sends a prefill to a worker and when it is done (the
  prefill leg's answer; a local request's first token). Each worker is
  treated as one server taking prefills in turn: a request's service began
  when it was sent or when the one before it on that worker finished,
  whichever is later. Tokens and seconds are averaged separately (a ratio
  estimator), so two prompts prefilled side by side do not bias the speed.
- **The engine's own figure beats the router's.** Once a worker's vLLM
  reports its prefill time (`vllm:request_prefill_time_seconds`, which
  starts when the engine schedules the request, so no queue, no HTTP) and
  the tokens it computed, the router's timings of that worker stop teaching.
- **Its clock.** The backlog the router has put on each worker is known
  request by request, so the predicted queue wait at `now` is what remains
  of it, not "requests ahead × this prompt's time".

The rule weighs the two costs of each choice. Prefilling locally stalls
every stream running on the decode worker for about the prefill's length;
prefilling remotely costs the new request the transfer and the prefill
worker's queue. It goes remote when what local costs the running streams
(stall × streams) exceeds what remote costs the new request (its TTFT over
the local one). With nothing running it is a plain TTFT comparison.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol


class WorkerLoad(Protocol):
    """What the decider reads of a worker at decision time (policy.WorkerView)."""

    id: str
    ready: bool
    waiting: int
    running: int
    inflight: int


@dataclass(frozen=True)
class PDDecision:
    remote: bool
    reason: str
    predicted_local_s: float | None = None
    predicted_remote_s: float | None = None


# A KV transfer's time before one was measured: about what a ~600-token prompt's
# KV took on two CPU cores (docs/PD.md); the first remote request replaces it.
PRIOR_TRANSFER_S = 0.1


def gate_tokens(prefill_tps: float, step_s: float, itl_s: float) -> int:
    """The P/D gate from measured speeds: the prompt tokens a worker prefills in what
    the ITL target leaves beside its decode step.

    A prompt under it, prefilled in one step with the running streams, keeps every
    gap within the target: a split cannot buy those streams anything and costs the
    request the KV transfer. A step already past the target leaves no room, and
    every prompt goes to the cost rule. Speeds and a target, so it holds on any
    machine: ~250-450 tokens on one core of a 2-core AMX VM at a 250 ms target,
    ~80 on an AVX2 core in float32, thousands on a GPU slice.
    """
    if prefill_tps <= 0:
        return 0
    return max(0, int(prefill_tps * max(0.0, itl_s - max(0.0, step_s))))


class _Ewma:
    __slots__ = ("alpha", "value")

    def __init__(self, alpha: float):
        self.alpha = alpha
        self.value: float | None = None

    def add(self, x: float) -> None:
        self.value = x if self.value is None else self.value + self.alpha * (x - self.value)

    def get(self, default: float) -> float:
        return default if self.value is None else self.value


class _Speed:
    """Tokens/s as EWMA(tokens) / EWMA(seconds): robust to samples split unevenly."""

    __slots__ = ("seconds", "samples", "tokens")

    def __init__(self, alpha: float):
        self.tokens = _Ewma(alpha)
        self.seconds = _Ewma(alpha)
        self.samples = 0

    def add(self, tokens: float, seconds: float) -> None:
        self.tokens.add(tokens)
        self.seconds.add(seconds)
        self.samples += 1

    def tps(self) -> float | None:
        t, s = self.tokens.value, self.seconds.value
        return t / s if t is not None and s else None


_BATCH = 4


@dataclass
class _Pending:
    sent: float
    tokens: int
    local: bool


class _Backlog:
    """The prefills the router has open on one worker, served one after another.

    Prefills that overlap (queued or batched together) are learnt as one
    sample when the worker's backlog empties, or every `_BATCH` prefills:
    the first of two batched prompts to finish would otherwise be charged
    the time of both.
    """

    __slots__ = ("acc_n", "acc_seconds", "acc_tokens", "last_done", "pending")

    def __init__(self) -> None:
        self.pending: dict[str, _Pending] = {}
        self.last_done = float("-inf")
        self.acc_tokens = 0.0
        self.acc_seconds = 0.0
        self.acc_n = 0

    def take_sample(self) -> tuple[float, float] | None:
        if self.pending and self.acc_n < _BATCH:
            return None
        sample = (self.acc_tokens, self.acc_seconds)
        self.acc_tokens = self.acc_seconds = 0.0
        self.acc_n = 0
        return sample

    def remaining_s(self, now: float, tps: float) -> float:
        end = self.last_done
        for p in sorted(self.pending.values(), key=lambda p: p.sent):
            end = max(end, p.sent) + p.tokens / tps
        return max(0.0, end - now)


class PDDecider:
    """Conditional disaggregation, as in NVIDIA Dynamo (see the module doc).

    "threshold": remote iff at least the gate's tokens are uncached on the
    chosen decode worker and a ready prefill worker exists. "adaptive": the
    same gate, then the cost rule. Until observations arrive it uses the priors.
    The gate is `min_uncached_tokens` where the profile fixes it; None derives it
    from the decode worker's measured speed (`gate_tokens`).
    """

    def __init__(
        self,
        mode: str = "adaptive",
        min_uncached_tokens: int | None = 256,
        ttft_slo_s: float = 3.0,
        itl_slo_s: float = 0.25,
        prior_prefill_tps: float = 1000.0,
        prior_transfer_s: float = PRIOR_TRANSFER_S,
        prior_itl_s: float = 0.05,
        alpha: float = 0.3,
    ):
        if mode not in ("threshold", "adaptive"):
            raise ValueError(f"unknown P/D decider {mode!r}; use threshold or adaptive")
        self.mode = mode
        self.min_uncached_tokens = min_uncached_tokens
        # Reported with the estimates for context; the rule weighs costs, not targets
        # (switching on "remote meets the TTFT target" sent every long prompt local).
        self.ttft_slo_s = ttft_slo_s
        self.itl_slo_s = itl_slo_s
        self.prior_prefill_tps = prior_prefill_tps
        self.prior_itl_s = prior_itl_s
        self.alpha = alpha
        self._slice: dict[str, str] = {}  # worker id -> hardware slice key
        self._speed: dict[str, _Speed] = {}  # slice key -> shared prefill speed
        self._engine_taught: set[str] = set()  # workers whose vLLM reports prefill time
        self._backlog: dict[str, _Backlog] = {}
        self._itl: dict[str, _Ewma] = {}
        self._seeds: dict[str, int] = {}  # slice -> samples that came from calibration
        self._transfer = _Ewma(alpha)
        self._prior_transfer_s = prior_transfer_s

    # ------------------------------------------------------------ workers

    def set_slice(self, worker_id: str, key: str) -> None:
        """Workers given the same key share one prefill-speed estimate."""
        self._slice[worker_id] = key

    def slice_of(self, worker_id: str) -> str:
        return self._slice.get(worker_id, worker_id)

    def seed(self, slice_key: str, prefill_tps: float, itl_s: float | None = None) -> None:
        """A measured speed for a slice (warm-up calibration), in place of the prior.

        It enters as one sample, so live prefills move the estimate from there
        at the usual rate; a slice that live traffic already taught keeps its
        figure. The decode step at one stream becomes the ITL prior.
        """
        if prefill_tps <= 0:
            return
        speed = self._speed.setdefault(slice_key, _Speed(self.alpha))
        if speed.samples == self._seeds.get(slice_key, 0):  # nothing live yet
            speed.add(prefill_tps, 1.0)
            self._seeds[slice_key] = speed.samples
        if itl_s and itl_s > 0:
            self.prior_itl_s = itl_s

    def forget_worker(self, worker_id: str) -> None:
        """A worker left or restarted: its backlog and ITL go; its slice's speed stays."""
        self._backlog.pop(worker_id, None)
        self._itl.pop(worker_id, None)
        self._engine_taught.discard(worker_id)

    def gate(self, worker_id: str) -> int:
        """Uncached tokens from which a prompt prefilled on `worker_id` is long: the
        profile's fixed gate, else the one its measured speed and step give."""
        if self.min_uncached_tokens is not None:
            return self.min_uncached_tokens
        return gate_tokens(self.prefill_tps(worker_id), self.prior_itl_s, self.itl_slo_s)

    def prefill_tps(self, worker_id: str) -> float:
        speed = self._speed.get(self.slice_of(worker_id))
        tps = speed.tps() if speed is not None else None
        return tps if tps else self.prior_prefill_tps

    def queue_s(self, worker_id: str, now: float) -> float:
        """Predicted wait at `now` for the prefills the router has open on the worker."""
        b = self._backlog.get(worker_id)
        return b.remaining_s(now, self.prefill_tps(worker_id)) if b else 0.0

    # ------------------------------------------------------- observations

    def prefill_sent(self, worker_id: str, request_id: str, tokens: int, now: float,
                     local: bool = False) -> None:
        """The router sent a prompt with `tokens` uncached tokens to be prefilled there."""
        self._backlog.setdefault(worker_id, _Backlog()).pending[request_id] = _Pending(
            now, max(0, int(tokens)), local)

    def prefill_done(self, worker_id: str, request_id: str, now: float,
                     ok: bool = True) -> None:
        """The prefill finished (leg answered, or first token); learn its net speed.

        Service began when the request was sent or when the previous prefill
        on that worker ended, whichever came later: the wait for earlier
        prompts is queueing, not this prompt's cost. A local request also
        waited for the decode step in progress, so one step is taken off.
        A sample of fewer tokens than the P/D gate teaches nothing: a short
        prompt's time is mostly that wait.
        """
        b = self._backlog.get(worker_id)
        p = b.pending.pop(request_id, None) if b else None
        if b is None or p is None:
            return
        start = max(p.sent, b.last_done)
        b.last_done = max(b.last_done, now)
        seconds = now - start
        if p.local:
            seconds -= self._itl[worker_id].get(0.0) if worker_id in self._itl else 0.0
        if ok and worker_id not in self._engine_taught:
            b.acc_tokens += p.tokens
            b.acc_seconds += max(0.0, seconds)
            b.acc_n += 1
        sample = b.take_sample()
        if sample and sample[0] >= max(1, self.gate(worker_id)) and sample[1] > 0:
            self._learn(worker_id, *sample)

    def observe_engine_prefill(self, worker_id: str, tokens: float, seconds: float,
                               requests: float) -> None:
        """vLLM's own figures for requests that finished since the last scrape.

        `tokens` is the increase of `vllm:request_prefill_kv_computed_tokens_sum`
        (prompt tokens computed, cache hits excluded), `seconds` that of
        `vllm:request_prefill_time_seconds_sum`, `requests` that of its count.
        A window whose requests computed fewer tokens on average than the P/D
        gate is skipped. The router does not call this for a decode worker's
        window that held a KV pull: vLLM counts the pulled prompt as computed
        there and the pull as its prefill time.
        """
        if requests <= 0 or tokens <= 0 or seconds <= 0:
            return
        self._engine_taught.add(worker_id)
        if tokens / requests >= max(1, self.gate(worker_id)):
            self._learn(worker_id, tokens / requests, seconds / requests)

    def observe_transfer(self, seconds: float) -> None:
        if seconds >= 0:
            self._transfer.add(seconds)

    def observe_itl(self, worker_id: str, seconds: float) -> None:
        if seconds > 0:
            self._itl.setdefault(worker_id, _Ewma(self.alpha)).add(seconds)

    def transfer_s(self) -> float:
        """A KV transfer's time as measured (the prior until one was)."""
        return self._transfer.get(self._prior_transfer_s)

    def itl_of(self, worker_id: str) -> float | None:
        """The worker's measured time between tokens (None: not measured yet)."""
        e = self._itl.get(worker_id)
        return None if e is None else e.value

    def _learn(self, worker_id: str, tokens: float, seconds: float) -> None:
        self._speed.setdefault(self.slice_of(worker_id), _Speed(self.alpha)).add(tokens, seconds)

    def estimates(self) -> dict[str, object]:
        """What the decider has learnt, for the status snapshot."""
        return {
            "prefill_tps_by_slice": {k: v.tps() for k, v in self._speed.items()},
            "slices": dict(self._slice),
            "teacher": {w: "engine" if w in self._engine_taught else "router"
                        for w in self._slice},
            "itl_s": {k: v.value for k, v in self._itl.items()},
            "transfer_s": self._transfer.value,
            "pending": {w: len(b.pending) for w, b in self._backlog.items() if b.pending},
            "targets": {"ttft_s": self.ttft_slo_s, "itl_s": self.itl_slo_s},
            "gate_tokens": {w: self.gate(w) for w in self._slice},
            "gate_from": "profile" if self.min_uncached_tokens is not None else "speeds",
        }

    # ----------------------------------------------------------- decision

    def decide(self, uncached_tokens: int, prefill: WorkerLoad | None, decode: WorkerLoad,
               now: float, force: str | None = None) -> PDDecision:
        """`force` ("remote" or "local", from the client's x-pdbox-pd header) overrides
        the gate and the rule; remote still needs a ready prefill worker."""
        tokens = max(0, int(uncached_tokens))
        if force == "local":
            return PDDecision(False, f"local: asked by the client; {tokens} uncached tokens")
        if prefill is None or not prefill.ready:
            return PDDecision(False, "local: no ready prefill worker")
        if force == "remote":
            return PDDecision(True, f"remote: asked by the client; {tokens} uncached tokens")
        gate = self.gate(decode.id)
        if tokens < gate:
            return PDDecision(False, f"local: {tokens} uncached tokens < {gate} threshold")
        if self.mode == "threshold":
            return PDDecision(True, f"remote: {tokens} uncached tokens ≥ {gate} threshold")
        local_prefill = tokens / self.prefill_tps(decode.id)
        local = self.queue_s(decode.id, now) + local_prefill
        remote = (self.queue_s(prefill.id, now) + tokens / self.prefill_tps(prefill.id)
                  + self._transfer.get(self._prior_transfer_s))
        # Streams on the decode worker that a local prefill would hold up. The
        # router's own count is fresher than the last /metrics scrape.
        streams = max(decode.running, decode.inflight)
        stall = streams * local_prefill
        extra = remote - local  # what remote costs the new request (may be < 0)
        cmp = f"predicted TTFT {remote:.1f}s remote vs {local:.1f}s local"
        if streams == 0:
            verdict = remote < local
            why = cmp
        else:
            verdict = stall > extra
            why = (f"local prefill would stall {streams} stream(s) {local_prefill:.1f}s each "
                   f"({stall:.1f} stream-s) {'>' if verdict else '<='} remote's cost to this "
                   f"request {extra:+.1f}s; {cmp}")
        head = "remote" if verdict else "local"
        return PDDecision(verdict, f"{head}: {tokens} uncached tokens; {why}", local, remote)
