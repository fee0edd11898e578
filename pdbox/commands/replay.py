"""`pdbox replay TRACE`: a public trace through the routing policy or the autoscaler.

Offline and in simulated time: no workers, no GPU. Routing mode replays the
trace through the router's own Picker over simulated workers with LRU prefix
caches (see pdbox/replay/routing.py for the cost model); `--autoscale` hands
the trace to the autoscaler's replay, and on a P/D profile also replays soft
roles and re-split on one box (pdbox/replay/split_sim.py) under `split`.
"""

from __future__ import annotations

import importlib
import json
from typing import Any

import click

_ROUTING_POLICIES = ("prefix", "least_loaded", "round_robin", "shared_lru", "all")


def _fmt(v: Any) -> str:
    if v is None:
        return "N/A"
    if isinstance(v, float):
        return f"{v:.3f}"
    return str(v)


def _print_table(results: list[dict[str, Any]]) -> None:
    cols = ("policy", "index", "hit_rate", "imbalance", "ttft_p50_s", "ttft_p90_s", "requests")
    rows = [[_fmt(r.get(c)) for c in cols] for r in results]
    widths = [max(len(c), *(len(row[i]) for row in rows)) for i, c in enumerate(cols)]
    click.echo("  ".join(c.ljust(w) for c, w in zip(cols, widths, strict=True)))
    for row in rows:
        click.echo("  ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)))


@click.command(name="replay")
@click.argument("trace", type=click.Path(dir_okay=False))
@click.option("--workers", type=click.IntRange(1, 1024), default=4, show_default=True,
              help="Simulated workers (routing mode).")
@click.option("--cache-tokens", type=click.IntRange(1), default=1_000_000, show_default=True,
              help="Prefix cache per worker, in tokens.")
@click.option("--policy", type=click.Choice(_ROUTING_POLICIES), default="prefix",
              show_default=True,
              help="Routing policy; shared_lru is the ceiling (one LRU of workers × cache); "
              "all runs every one.")
@click.option("--shared-cache", is_flag=True, help="Same as --policy shared_lru.")
@click.option("--index", type=click.Choice(["precise", "approx"]), default="precise",
              show_default=True,
              help="What the prefix policy sees: the true caches (KV events) or the "
              "router's own LRU record.")
@click.option("--index-blocks", type=click.IntRange(1), default=None,
              help="Approximate index bound per worker, in trace blocks (default: the cache).")
@click.option("--prefill-tps", type=click.FloatRange(min=1.0), default=10_000.0,
              show_default=True, help="Cost model: uncached prompt tokens per second per worker.")
@click.option("--decode-ms-per-token", type=click.FloatRange(min=0.0), default=30.0,
              show_default=True, help="Cost model: milliseconds per output token of a stream.")
@click.option("--autoscale", is_flag=True, help="Replay through the autoscaler instead.")
@click.option("--profile", "profile_name", default=None,
              help="Profile whose router weights (routing) or autoscaler settings to use.")
@click.option("--rate-scale", type=click.FloatRange(min=0.0, min_open=True), default=1.0,
              show_default=True, help="Speed the trace's arrivals up (>1) or slow them down.")
@click.option("--fixed", type=click.IntRange(1), default=None,
              help="Autoscale mode: also replay with this fixed replica count, for comparison.")
@click.option("--plot", type=click.Path(dir_okay=False), default=None,
              help="Autoscale mode: write a PNG of replicas and load over time.")
@click.option("--fixed-split", default=None, metavar="PREFILL/DECODE",
              help="Autoscale mode, P/D profile: also replay this static split (SM percent on "
              "a GPU profile, e.g. 60/40; core sets on a CPU one, e.g. 0/1) with soft roles off.")
@click.option("--then", "then_trace", type=click.Path(dir_okay=False), multiple=True,
              help="Append this trace after the first one ends (a mix that changes); "
              "repeat it for more phases, e.g. conversation, long prompts, conversation.")
@click.option("--then-rate-scale", type=click.FloatRange(min=0.0, min_open=True), default=1.0,
              show_default=True, help="--rate-scale of the appended trace, relative to the first.")
@click.option("--head-s", type=click.FloatRange(min=0.0, min_open=True), default=None,
              help="Keep only the first SECONDS of each trace (before --rate-scale).")
@click.option("--json", "as_json", is_flag=True, help="Print JSON for scripts.")
def replay(
    trace: str,
    workers: int,
    cache_tokens: int,
    policy: str,
    shared_cache: bool,
    index: str,
    index_blocks: int | None,
    prefill_tps: float,
    decode_ms_per_token: float,
    autoscale: bool,
    profile_name: str | None,
    rate_scale: float,
    fixed: int | None,
    plot: str | None,
    fixed_split: str | None,
    then_trace: tuple[str, ...],
    then_rate_scale: float,
    head_s: float | None,
    as_json: bool,
) -> None:
    """Replay a public trace (Mooncake .jsonl or Azure .csv) in simulated time."""
    from pdbox.replay.traces import TraceError, concat, load

    try:
        requests = load(trace)
        if head_s is not None:
            requests = [r for r in requests if r.arrival_s < head_s]
        for path in then_trace:
            more = load(path)
            if head_s is not None:
                more = [r for r in more if r.arrival_s < head_s]
            requests = concat(requests, more, then_rate_scale)
    except TraceError as exc:
        raise click.ClickException(str(exc)) from None
    if not requests:
        raise click.ClickException(f"{trace}: the trace holds no requests")
    profile = _load_profile(profile_name)
    if fixed_split is not None and not autoscale:
        raise click.ClickException("--fixed-split is for --autoscale")

    if autoscale:
        result = _autoscale(requests, profile, rate_scale, fixed, plot)
        result["split"] = _split(requests, profile or _load_profile("cpu-tiny"), rate_scale,
                                 fixed_split)
        _emit(result, as_json)
        return

    from pdbox.replay.routing import CostModel
    from pdbox.replay.routing import replay as run_routing

    if shared_cache:
        policy = "shared_lru"
    names = ["shared_lru", "round_robin", "least_loaded", "prefix"] if policy == "all" else [policy]
    router = profile.router if profile is not None else None
    cost = CostModel(prefill_tps=prefill_tps, decode_s_per_token=decode_ms_per_token / 1000.0)
    results = []
    try:
        for name in names:
            results.append(
                run_routing(
                    requests,
                    workers=workers,
                    cache_tokens=cache_tokens,
                    policy=name,
                    weights=router.weights if router else None,
                    balance_abs=router.balance_abs if router else 8,
                    balance_rel=router.balance_rel if router else 1.5,
                    index=index,
                    index_blocks=index_blocks,
                    cost=cost,
                    rate_scale=rate_scale,
                )
            )
    except ValueError as exc:
        raise click.ClickException(str(exc)) from None
    if as_json:
        click.echo(json.dumps(results[0] if len(results) == 1 else {"results": results}, indent=2))
        return
    click.echo(
        f"{trace}: {len(requests)} requests, {workers} workers × {cache_tokens:,} cached tokens"
    )
    _print_table(results)


def _load_profile(name: str | None) -> Any:
    if name is None:
        return None
    from pdbox.config import ProfileError, load

    try:
        return load(name)
    except ProfileError as exc:
        raise click.ClickException(str(exc)) from None


def _autoscale(requests: list[Any], profile: Any, rate_scale: float, fixed: int | None,
               plot: str | None) -> dict[str, Any]:
    try:
        module = importlib.import_module("pdbox.replay.autoscale")
    except ImportError as exc:
        raise click.ClickException(
            f"autoscaler replay is not available in this build ({exc})"
        ) from None
    if profile is None:
        profile = _load_profile("cpu-tiny")
    try:
        return module.run(requests, profile, rate_scale, fixed, plot)
    except ValueError as exc:
        raise click.ClickException(str(exc)) from None


def _split(requests: list[Any], profile: Any, rate_scale: float,
           fixed_split: str | None) -> dict[str, Any] | None:
    """Soft roles and re-split on one box (P/D profiles); None for an aggregated one."""
    from pdbox.replay.split_sim import split_report
    from pdbox.resplit import SplitError, parse_split

    if not profile.is_pd:
        if fixed_split is not None:
            raise click.ClickException(f"--fixed-split needs a P/D profile; {profile.name} is "
                                       "aggregated")
        return None
    try:
        split = parse_split(profile, fixed_split) if fixed_split is not None else None
    except SplitError as exc:
        raise click.ClickException(f"--fixed-split: {exc}") from None
    return split_report(requests, profile, rate_scale, split)


def _emit(result: dict[str, Any], as_json: bool) -> None:
    if as_json:
        click.echo(json.dumps(result, indent=2, default=str))
        return
    for key, value in result.items():
        if isinstance(value, (dict, list)):
            continue
        click.echo(f"{key}: {_fmt(value)}")
    for name, run in (result.get("split") or {}).items():
        moves = "; ".join(f"{m['t']:.0f}s → {m['to']}" for m in run["resplits"]) or "none"
        click.echo(f"split {name}: SLO attainment {_fmt(run['slo_attainment'])}, "
                   f"TTFT p90 {_fmt(run['ttft_p90_s'])} s, ITL p90 {_fmt(run['itl_p90_s'])} s, "
                   f"{run['start_split']} → {run['end_split']}, re-splits: {moves}")
