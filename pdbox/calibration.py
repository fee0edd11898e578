"""A worker's measured speeds: what warm-up calibration found, and the file that keeps it.

At each worker start the fleet times a few requests on the new worker
(pdbox/workers/calibrate.py): a short and a longer prompt, one token each,
and a stream alone and beside a few others. From them come this slice's
prefill speed and decode step, which seed the decider, admission and soft
roles before live traffic teaches them (docs/ROUTING.md, *Calibration*).

Pure: no clock, no I/O but the JSON file named by its caller.
"""

from __future__ import annotations

import json
import os
import statistics
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

FILE = "calibration.json"


@dataclass(frozen=True)
class Calibration:
    # Prompt tokens per second, net of the fixed cost of a request.
    prefill_tps: float
    # Seconds a request costs whatever its length (HTTP, scheduling, one step).
    overhead_s: float
    # Decode step seconds by batch size (streams running together).
    decode_step_s: dict[int, float] = field(default_factory=dict)
    # The points it was fitted from: (prompt tokens, seconds).
    prefill_points: tuple[tuple[int, float], ...] = ()
    took_s: float = 0.0

    def step_at(self, batch: int) -> float | None:
        """The decode step at `batch` streams, on the line through the measured points."""
        pts = sorted(self.decode_step_s.items())
        if not pts:
            return None
        if len(pts) == 1 or batch <= pts[0][0]:
            return pts[0][1]
        (b0, s0), (b1, s1) = pts[0], pts[-1]
        slope = max(0.0, (s1 - s0) / (b1 - b0))
        return s0 + slope * (batch - b0)

    def streams_within(self, itl_s: float, cap: int | None = None) -> int:
        """How many streams one worker runs with each step inside `itl_s`: at least 1,
        at most `cap`, on the line through the measured steps. 0 where the steps do
        not grow with the batch (nothing measured limits it: the worker's own slots do)."""
        pts = sorted(self.decode_step_s.items())
        if not pts or pts[0][1] > itl_s:
            return 1
        (b0, s0), (b1, s1) = pts[0], pts[-1]
        slope = (s1 - s0) / (b1 - b0) if b1 > b0 else 0.0
        if slope <= 0:
            return cap or 0
        n = b0 + int((itl_s - s0) / slope + 1e-9)
        return max(1, min(n, cap) if cap else n)

    def request_s(self, prompt_tokens: int, output_tokens: int, batch: int) -> float:
        """A request's time on a worker: its prefill, then its tokens at `batch`'s step."""
        step = self.step_at(batch) or 0.0
        return self.overhead_s + prompt_tokens / self.prefill_tps + output_tokens * step

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["decode_step_s"] = {str(k): round(v, 5) for k, v in self.decode_step_s.items()}
        d["prefill_tps"] = round(self.prefill_tps, 1)
        d["overhead_s"] = round(self.overhead_s, 4)
        d["prefill_points"] = [[n, round(s, 4)] for n, s in self.prefill_points]
        d["took_s"] = round(self.took_s, 2)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Calibration:
        return cls(prefill_tps=float(d["prefill_tps"]), overhead_s=float(d["overhead_s"]),
                   decode_step_s={int(k): float(v) for k, v in d["decode_step_s"].items()},
                   prefill_points=tuple((int(n), float(s)) for n, s in d["prefill_points"]),
                   took_s=float(d.get("took_s", 0.0)))


def fit_prefill(points: list[tuple[int, float]]) -> tuple[float, float]:
    """(tokens/s, fixed seconds) of the line t = a + n / tps through (n, t) points.

    Two lengths separate the prompt's cost from the request's fixed cost. When
    noise makes the longer prompt no slower, the longest point alone gives a
    speed that is low (it counts the fixed cost too): pessimistic, never absurd.
    """
    pts = sorted(points)
    if not pts or pts[-1][0] <= 0 or pts[-1][1] <= 0:
        raise ValueError("no prefill point to fit")
    (n0, t0), (n1, t1) = pts[0], pts[-1]
    if n1 > n0 and t1 > t0:
        tps = (n1 - n0) / (t1 - t0)
        overhead = max(0.0, t0 - n0 / tps)
        return tps, overhead
    return n1 / t1, 0.0


def decode_step(gaps: list[float]) -> float:
    """The median gap between a stream's tokens: a step's time, robust to the
    odd step that also carried another request's prefill."""
    if not gaps:
        raise ValueError("no token gaps")
    return statistics.median(gaps)


def slice_key(slice_desc: str, dtype: str, model: str) -> str:
    """Speeds hold for one hardware slice, dtype and model; a change of any is a new key."""
    return f"{slice_desc} · {dtype} · {model}"


def load(run_dir: Path) -> dict[str, Calibration]:
    """The last figures per slice key; a missing or damaged file is no figures."""
    try:
        raw = json.loads((run_dir / FILE).read_text())
        return {k: Calibration.from_dict(v) for k, v in raw.items()}
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return {}


def save(run_dir: Path, figures: dict[str, Calibration]) -> None:
    """Written aside and renamed, so a crash leaves the old file or the new one."""
    path = run_dir / FILE
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps({k: v.to_dict() for k, v in figures.items()}, indent=2) + "\n")
    os.replace(tmp, path)


# ------------------------------------------------------- step budget from speeds

# A step budget never goes below this: vLLM needs room for a few sequences, and
# under it a prompt takes so many steps that their fixed cost swamps its prefill.
MIN_STEP_TOKENS = 32
# Whole multiples of this, so that a small change in a measured speed does not
# make a new budget at every start.
STEP_QUANTUM = 16
# The share of the ITL target a prefill chunk may take within one step, by role.
# A decode-heavy worker keeps its streams' gaps near half the target (the rest
# is the decode step itself); a prefill-heavy one takes the whole target per
# chunk, so that it prefills in fewer steps while its streams stay within twice
# the target. Shares of the target, not seconds: they hold on any machine.
CHUNK_SHARE = {"decode": 0.5, "aggregated": 0.5, "prefill": 1.0}
# A budget is at most this many times the longest prompt the figure timed. The
# prompts are timed within one step of the budget the worker had, and the speed
# of a step is not the same at every size: one core of a 2-core VM measured
# 2,000-2,200 tokens/s between 16 and 200-460 tokens, but 950-1,290 at 1,024.
# A line through small steps extrapolated far above them can promise a chunk
# that takes twice the target; bounded, the budget grows towards the size whose
# own step fits the target over a few starts, each timing the size it runs at.
BUDGET_REACH = 2


def step_budget(cal: Calibration, itl_s: float, role: str) -> int:
    """Tokens one engine step may prefill on a worker of `role` (max_num_batched_tokens).

    The tokens this slice prefills, at its measured speed, in its share of the
    ITL target: a step that carries a chunk of a long prompt beside running
    streams then ends within the target (Sarathi-Serve's stall-free batching,
    sized from this machine's speed instead of a constant). At most
    BUDGET_REACH times the longest prompt the speed was measured on.
    """
    share = CHUNK_SHARE.get(role, 0.5)
    tokens = cal.prefill_tps * itl_s * share
    longest = max((n for n, _ in cal.prefill_points), default=0)
    if longest > 0:
        tokens = min(tokens, BUDGET_REACH * longest)
    return max(MIN_STEP_TOKENS, int(tokens) // STEP_QUANTUM * STEP_QUANTUM)


def machine_key(cpu_model: str, simd_flags: list[str], key: str) -> str:
    """A calibration key that also names the CPU: the cache of speeds is per machine kind."""
    return f"{cpu_model} [{' '.join(simd_flags)}] · {key}"


# The speeds file keeps this many of a slice's last calibrations, newest last.
# Step budgets size from the slowest of them: a calibration times one worker for
# a few seconds, often while the machine's other workers sit idle, and under
# load the same slice runs slower (prefill on one 2-core VM measured 980 to
# 3,100 tokens/s from start to start). The slowest recent figure is a speed the
# slice has really shown; a one-off bad one leaves after this many calibrations.
SPEEDS_KEPT = 6


def load_file(path: Path) -> dict[str, list[Calibration]]:
    """Recent figures kept in one file by key, oldest first; a missing or damaged
    file is no figures. A key holding one figure (no history) reads as a list of one."""
    try:
        raw = json.loads(path.read_text())
        return {k: [Calibration.from_dict(x) for x in (v if isinstance(v, list) else [v])]
                for k, v in raw.items()}
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return {}


def save_file(path: Path, figures: dict[str, list[Calibration]]) -> None:
    """Written aside and renamed, so a crash leaves the old file or the new one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    tmp.write_text(json.dumps({k: [c.to_dict() for c in v] for k, v in figures.items()},
                              indent=2) + "\n")
    os.replace(tmp, path)


def remember(history: list[Calibration], cal: Calibration,
             keep: int = SPEEDS_KEPT) -> list[Calibration]:
    """`history` with `cal` added as the newest, at most `keep` long."""
    return [*history, cal][-keep:]


def slowest(history: list[Calibration]) -> Calibration:
    """The figure with the lowest prefill speed: what a step budget is sized from."""
    return min(history, key=lambda c: c.prefill_tps)
