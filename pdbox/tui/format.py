"""Plain-text formatting of snapshot figures. No textual here, so it is tested alone.

Every formatter takes a value that may be None (the snapshot's "unknown") and
then answers "N/A"; widgets never branch on whether a figure exists.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from typing import Any

NA = "N/A"
SPARK = "▁▂▃▄▅▆▇█"


def is_num(value: Any) -> bool:
    return (isinstance(value, int | float) and not isinstance(value, bool)
            and math.isfinite(value))


def num(value: Any, fmt: str = ".1f", unit: str = "") -> str:
    return f"{value:{fmt}}{unit}" if is_num(value) else NA


def integer(value: Any) -> str:
    return str(int(value)) if is_num(value) else NA


def pct(fraction: Any) -> str:
    """A 0..1 fraction as a percentage."""
    return f"{fraction * 100:.0f}%" if is_num(fraction) else NA


def seconds(value: Any) -> str:
    """Latency: milliseconds under one second, seconds above."""
    if not is_num(value):
        return NA
    return f"{value * 1000:.0f} ms" if value < 1 else f"{value:.2f} s"


def gib(value: Any) -> str:
    return f"{value / 2**30:.1f}" if is_num(value) else NA


def used_of(used: Any, total: Any) -> str:
    if not is_num(used) and not is_num(total):
        return NA
    return f"{gib(used)}/{gib(total)} GiB"


def duration(value: Any) -> str:
    if not is_num(value):
        return NA
    s = int(value)
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s % 3600 // 60:02d}m"


def clock(ts: Any) -> str:
    return time.strftime("%H:%M:%S", time.localtime(ts)) if is_num(ts) else "--:--:--"


def bar(fraction: Any, width: int = 10) -> str:
    """A horizontal bar; an unknown value is an empty bar of dots."""
    if not is_num(fraction):
        return "·" * width
    filled = round(max(0.0, min(1.0, fraction)) * width)
    return "█" * filled + "░" * (width - filled)


def sparkline(values: Sequence[Any], width: int = 40) -> str:
    """The last `width` values as block characters, scaled between their own min and max
    so that the shape of the load shows even when it varies by a few percent.

    Unknown samples are blanks, so a gap in the data shows as a gap.
    """
    tail = list(values)[-width:]
    known = [v for v in tail if is_num(v)]
    if not known:
        return NA
    lo, hi = min(known), max(known)
    out = []
    for v in tail:
        if not is_num(v):
            out.append(" ")
        elif hi == lo:
            out.append(SPARK[0] if hi == 0 else SPARK[len(SPARK) // 2])
        else:
            out.append(SPARK[round((v - lo) / (hi - lo) * (len(SPARK) - 1))])
    return "".join(out)


def role_mix(w: dict[str, Any]) -> str:
    """The worker's role and, once it served requests, its effective mix (soft roles):
    'prefill w40·p60·d0' = 40 % served whole, 60 % as prefill leg, none as decode leg."""
    role = str(w.get("role") or NA)
    mix = w.get("role_mix")
    if not isinstance(mix, dict) or not mix.get("requests"):
        return role
    parts = [f"{k[0]}{round(100 * (mix.get(k) or 0))}" for k in ("whole", "prefill", "decode")]
    return f"{role} {'·'.join(parts)}"


def worker_slice(w: dict[str, Any]) -> str:
    """What share of the machine a worker has: its cores, or its SM % and memory cap."""
    if isinstance(w.get("slice"), str) and w["slice"]:
        return w["slice"]
    if w.get("cores"):
        return f"cores {w['cores']}"
    parts = []
    if is_num(w.get("sm_percent")):
        parts.append(f"SM {w['sm_percent']:.0f}%")
    if is_num(w.get("memory_fraction")):
        parts.append(f"mem {w['memory_fraction'] * 100:.0f}%")
    return " / ".join(parts) or NA


def engine_view(engine: Any) -> dict[str, Any]:
    """The engine-side figures the router panel shows, from the snapshot's `engine`.

    TTFT is the first-token role's (prefill in P/D: a decode worker's own TTFT is
    only the KV pull), ITL the decoding role's; queue and prefill time are over
    every worker. Unknown figures are None.
    """
    engine = engine if isinstance(engine, dict) else {}
    roles = engine.get("roles") if isinstance(engine.get("roles"), dict) else {}
    every = engine.get("all") if isinstance(engine.get("all"), dict) else {}

    def of(role_order: Sequence[str], key: str) -> Any:
        for role in role_order:
            figures = roles.get(role)
            if isinstance(figures, dict) and figures.get(key) is not None:
                return figures[key]
        return None

    return {"ttft_p50_s": of(("prefill", "aggregated"), "ttft_p50_s"),
            "itl_p50_s": of(("decode", "aggregated"), "itl_p50_s"),
            "queue_mean_s": every.get("queue_mean_s"),
            "prefill_mean_s": every.get("prefill_mean_s")}
