"""Soft roles and re-split on one GPU P/D box, in simulated time, against every static split.

The trace is a conversation segment then a prefill-heavy one (e.g. Azure's
conversation trace, then Mooncake's long prompts), replayed through the same
split model as `pdbox replay --autoscale` (pdbox/replay/split_sim.py).

Goal: SLO attainment ≥ the best static split chosen in hindsight, and ≥ 1.2×
the profile's default split. Every static split runs with soft roles off, as
`pdbox replay --fixed-split` does (the fixed P/D box).
"""

from __future__ import annotations

from typing import Any

from pdbox import config
from pdbox.replay.split_sim import simulate_split, split_report
from pdbox.replay.traces import TraceRequest, concat
from pdbox.resplit import SplitError, describe_split, parse_split

DEFAULT_GOAL = 1.2  # × the default split's SLO attainment
# Static splits in SM percent, prefill's share; each role keeps at least 10 %.
STATIC_PREFILL_SHARES = tuple(range(10, 100, 10))
ROW_KEYS = ("slo_attainment", "ttft_p50_s", "ttft_p90_s", "itl_p90_s", "paths", "end_split")


def head(reqs: list[TraceRequest], head_s: float) -> list[TraceRequest]:
    return [r for r in reqs if r.arrival_s < head_s]


def static_splits(p: config.Profile) -> list[Any]:
    """Every static split to compare, in SM percent: a CPU box's split is core
    sets, too few on a small box to make a sweep of."""
    if p.is_pd and p.hardware.device == "cpu":
        raise SplitError(f"profile {p.name} splits CPU cores; split-replay sweeps SM "
                         "percentages of one GPU, so give a GPU P/D profile (e.g. gh200-pd)")
    return [parse_split(p, f"{pre}/{100 - pre}") for pre in STATIC_PREFILL_SHARES]


def _row(r: dict[str, Any]) -> dict[str, Any]:
    return {k: r[k] for k in ROW_KEYS} | {
        "resplits": [f"{m['t']:.0f}s → {m['to']}" for m in r["resplits"]]}


def _ratio(a: float, b: float) -> float | None:
    return round(a / b, 3) if b else None


def run(p: config.Profile, first: list[TraceRequest], then: list[TraceRequest],
        then_rate_scale: float) -> dict[str, Any]:
    splits = static_splits(p)  # before any replay: a profile without SM splits fails at once
    reqs = concat(first, then, then_rate_scale)
    runs = split_report(reqs, p, 1.0, None)
    static = {describe_split(s): simulate_split(reqs, p, soft=False, resplit=False, split=s)
              for s in splits}
    best_name, best = max(static.items(), key=lambda kv: kv[1]["slo_attainment"])
    adaptive, default = runs["adaptive"], runs["default_split"]
    out: dict[str, Any] = {
        "profile": p.name, "requests": len(reqs), "first": len(first), "then": len(then),
        "then_rate_scale": then_rate_scale, "model": adaptive["model"],
        "runs": {k: _row(v) for k, v in runs.items()},
        "static": {k: _row(v) for k, v in static.items()},
        "best_static": best_name,
        "adaptive_vs_best_static": _ratio(adaptive["slo_attainment"], best["slo_attainment"]),
        "adaptive_vs_default": _ratio(adaptive["slo_attainment"], default["slo_attainment"]),
    }
    out["goal_best_static_met"] = adaptive["slo_attainment"] >= best["slo_attainment"]
    vs_default = out["adaptive_vs_default"]
    out["goal_1_2x_default_met"] = vs_default is not None and vs_default >= DEFAULT_GOAL
    return out


def _f(v: Any) -> str:
    return "–" if v is None else f"{v:.3g}" if isinstance(v, float) else str(v)


def render(out: dict[str, Any]) -> str:
    lines = [f"{out['profile']}: {out['requests']} requests ({out['first']} then "
             f"{out['then']}, second segment at rate ×{out['then_rate_scale']:g}); "
             f"model: {out['model']}", "",
             f"{'run':<36} {'SLO att.':>8} {'TTFT p50':>8} {'p90':>7} {'ITL p90':>8}  "
             "end split; re-splits"]
    for name, r in [*out["runs"].items(), *out["static"].items()]:
        moves = ", ".join(r["resplits"]) or "none"
        lines.append(f"{name:<36} {_f(r['slo_attainment']):>8} {_f(r['ttft_p50_s']):>8} "
                     f"{_f(r['ttft_p90_s']):>7} {_f(r['itl_p90_s']):>8}  "
                     f"{r['end_split']}; {moves}")
    lines += ["", f"best static split in hindsight: {out['best_static']}",
              f"adaptive ÷ best static: {_f(out['adaptive_vs_best_static'])} (goal ≥ 1: "
              + ("met" if out["goal_best_static_met"] else "missed") + ")",
              f"adaptive ÷ default split: {_f(out['adaptive_vs_default'])} "
              f"(goal ≥ {DEFAULT_GOAL:g}: "
              + ("met" if out["goal_1_2x_default_met"] else "missed") + ")"]
    return "\n".join(lines)
