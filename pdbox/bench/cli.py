"""`pdbox bench`: does P/D pay for this traffic, on this machine?

Each command starts one box per setup, one after the other on the same
cores, drives the same workload through it, stops it (checking that nothing
is left running) and prints one table. See `pdbox bench --help`.
"""

from __future__ import annotations

import asyncio
from typing import Any

import click

from pdbox.bench import decider as decider_mod
from pdbox.bench import interference as interference_mod
from pdbox.bench import phases as phases_mod
from pdbox.bench import speeds as speeds_mod
from pdbox.bench.cli_common import (
    check_outputs,
    finish,
    parse_setups,
    run_setups,
    setup_options,
    user_errors,
    workspace,
)
from pdbox.bench.cli_live import burst, pd_legs_cmd, prefix_live_cmd, tui_load_cmd
from pdbox.bench.cli_sims import autoscale, hitrate_cmd, split_replay_cmd
from pdbox.bench.cli_tools import router, startup
from pdbox.bench.goodput import SpeedSearch, summarize
from pdbox.bench.harness import Harness
from pdbox.bench.progress import Progress
from pdbox.bench.trace import (
    DEFAULT_VOCAB,
    Scaling,
    default_input_scale,
    describe,
    scale_window,
    select_window,
)
from pdbox.bench.trace_run import TraceWorkload, outcome, replay

BENCH_HELP = """Measure setups side by side on this machine, with the same workload.

\b
Each command starts `pdbox up --headless` for the first setup (--profile,
default cpu-tiny), drives the workload, stops it, then does the same for
each --against setup, on the same cores. Absolute figures on a shared box
swing between runs; read the RATIOS: each figure is followed by "(0.85×)",
that setup's value divided by the first setup's. For latencies (TTFT,
TPOT, ITL) below 1 is better; for goodput and tokens/s above 1 is better.

\b
Goodput (trace): requests served whole within the first setup's SLOs
([slo] ttft_s and itl_s of its profile: time to first token, and mean time
per output token after the first), per second of the run's wall time.
"in SLO" is the same count over the requests sent. 429s, errors and
timeouts count as sent, never as good.

\b
The other commands answer one question each, with a workload of their own:
startup and router time pdbox itself; burst drives a box already running;
prefix-live and pd-legs start real workers; tui-load mock ones; autoscale,
hitrate and split-replay replay a trace in simulated time (no box).

\b
Every result carries the machine record (CPU model and SIMD flags, usable
cores, memory, GPUs, dtype, vLLM and pdbox versions, load average); with
--json it is written with every figure.
"""


@click.group(name="bench", help=BENCH_HELP,
             context_settings={"help_option_names": ["-h", "--help"]})
def bench() -> None:
    pass


# -------------------------------------------------------------------- trace


@bench.command(name="trace")
@click.argument("trace_file", metavar="FILE")
@setup_options()
@click.option("--speed", type=click.FloatRange(min=0, min_open=True), default=1.0,
              show_default=True, help="Arrival speed factor: 2 replays twice as fast, 0.5 "
              "half as fast.")
@click.option("--start-s", type=click.FloatRange(min=0), default=0.0, show_default=True,
              help="Where the window starts, in seconds of the trace.")
@click.option("--duration-s", type=click.FloatRange(min=0, min_open=True), default=120.0,
              show_default=True, help="How long the replay sends requests, in seconds "
              "(covers duration × speed seconds of the trace).")
@click.option("--input-scale", type=click.FloatRange(min=0, min_open=True), default=None,
              help="Multiply prompt lengths (and the 512-token blocks) by this. Default: "
              "the window's p90 prompt fills half the context.")
@click.option("--max-output", type=click.IntRange(min=1), default=64, show_default=True,
              help="Cap on each answer's tokens.")
@click.option("--vocab-size", type=click.IntRange(min=1000), default=DEFAULT_VOCAB,
              show_default=True, help="Token ids are drawn below this (and from 100 up).")
@click.option("--seed", type=int, default=0, show_default=True,
              help="Seed of the token runs that stand for the trace's blocks.")
@click.option("--drain-s", type=click.FloatRange(min=0), default=120.0, show_default=True,
              help="After the last arrival, wait this long for answers; later ones are "
              "timeouts.")
@click.option("--find-load", is_flag=True, help="First search (on the first setup) the "
              "speed at which SLO attainment falls to --target, then compare at it.")
@click.option("--target", type=click.FloatRange(min=0, max=1, min_open=True), default=0.9,
              show_default=True, help="--find-load: the SLO attainment to find.")
@click.option("--probe-s", type=click.FloatRange(min=1), default=60.0, show_default=True,
              help="--find-load: seconds each probe sends for.")
@click.option("--probes", type=click.IntRange(min=1, max=20), default=6, show_default=True,
              help="--find-load: at most this many probes.")
@click.pass_context
def trace(ctx: click.Context, trace_file: str, profile: str | None, against: tuple[str, ...],
          autoscale: bool, start_timeout_s: float, json_dest: str | None,
          plot_file: str | None, speed: float, start_s: float, duration_s: float,
          input_scale: float | None, max_output: int, vocab_size: int, seed: int,
          drain_s: float, find_load: bool, target: float, probe_s: float,
          probes: int) -> None:
    """Replay a window of a Mooncake (.jsonl) or Azure (.csv) trace at its own
    arrival times, with lengths scaled to the box.

    \b
    Prompts are sent as token ids: each Mooncake block id becomes a fixed run of
    ids, so requests that share blocks share a prefix, as in the trace; Azure
    requests get runs of their own. Every setup gets the same requests.
    Per setup: goodput (req/s within the SLOs), "in SLO" (share of requests
    sent), TTFT and TPOT p50/p90/p99 of the answered requests, output tokens/s,
    429s, errors and timeouts; per request in --json. Goodput: requests whole
    within the first setup's SLOs (TTFT ≤ [slo] ttft_s and TPOT, the mean time
    per token after the first, ≤ [slo] itl_s) per second of wall time, from the
    window's start to the last answer.

    Each figure is followed by its ratio to the first setup's, e.g. "(0.85×)":
    below 1 is better for latencies, above 1 for goodput and tokens/s.
    """
    from pdbox.replay.traces import load

    with user_errors():
        setups = parse_setups(profile, against, {}, ["cpu-tiny"])
        check_outputs(plot_file)
        requests = load(trace_file)
        with workspace(setups, autoscale) as (work, mats):
            ref = mats[0].profile
            context = min(m.profile.model.max_model_len for m in mats)
            window = select_window(requests, start_s, duration_s, speed)
            scale = input_scale or default_input_scale(
                [w.request.input_tokens for w in window], context)
            scaling = Scaling(scale, max_output, context)
            progress = Progress()
            cfg: dict[str, Any] = {
                "trace": trace_file, "speed": speed, "start_s": start_s,
                "duration_s": duration_s, "max_model_len": context, "vocab_size": vocab_size,
                "seed": seed, "drain_s": drain_s, "slo": {"ttft_s": ref.slo.ttft_s,
                                                          "itl_s": ref.slo.itl_s}}
            extra: dict[str, Any] = {}
            if find_load:
                found = _find_load(Harness(mats, work, progress, start_timeout_s),
                                   requests, scaling, cfg, target, probe_s, probes)
                extra["find_load"] = found
                speed = cfg["speed"] = found["speed"]
                window = select_window(requests, start_s, duration_s, speed)
            scaled = scale_window(window, scaling, vocab_size, seed)
            cfg["window"] = describe(scaled, scaling)
            workload = TraceWorkload(scaled, ref.slo.ttft_s, ref.slo.itl_s, drain_s)
            results = run_setups(mats, work, workload, start_timeout_s, progress)
            rows = [r for s in results for r in workload.rows(s["label"], s["result"])]
            finish(ctx, "trace", cfg, mats, results, rows, workload.columns, json_dest,
                   plot_file, extra)


def _find_load(harness: Harness, requests: list[Any], scaling: Scaling, cfg: dict[str, Any],
               target: float, probe_s: float, probes: int) -> dict[str, Any]:
    """Probe the first setup at speeds chosen by bisection; one box for every probe."""
    m = harness.setups[0]
    search = SpeedSearch(target, cfg["speed"], max_probes=probes)
    harness.progress.setup(0, 1, f"{m.setup.label}, finding the load")
    with harness.box(m, tag="-probes") as b:
        while (s := search.next()) is not None:
            window = select_window(requests, cfg["start_s"], probe_s, s)
            scaled = scale_window(window, scaling, cfg["vocab_size"], cfg["seed"])
            harness.progress.update(f"probe {len(search.probes) + 1} at speed {s:.3g}")
            reqs, wall = asyncio.run(replay(b.endpoint, scaled, cfg["drain_s"],
                                            harness.progress))
            figs = summarize([outcome(r) for r in reqs], wall, cfg["slo"]["ttft_s"],
                             cfg["slo"]["itl_s"])
            search.record(s, figs["slo_attainment"])
            harness.progress.note(f"bench probe at speed {s:.3g}: {figs['slo_attainment']} in "
                                  f"SLO ({figs['sent']} requests)")
    found = search.result()
    found["probe_s"] = probe_s
    if not found["met"]:
        harness.progress.note(f"bench: no probed speed met {target:.0%} in SLO; comparing at "
                              f"the slowest probed, {found['speed']:.3g}")
    return found


# ------------------------------------------------------------- phases, interference


@bench.command(name="phases")
@setup_options()
@click.option("--streams", type=click.IntRange(min=1), default=12, show_default=True,
              help="Chat streams running throughout.")
@click.option("--stream-tokens", type=click.IntRange(min=1), default=128, show_default=True)
@click.option("--long-tokens", type=click.IntRange(min=16), default=600, show_default=True,
              help="Tokens per long prompt.")
@click.option("--long-max-tokens", type=click.IntRange(min=1), default=16, show_default=True)
@click.option("--phase-s", type=click.FloatRange(min=0.1), default=60.0, show_default=True,
              help="Seconds per phase.")
@click.option("--seed", type=int, default=15, show_default=True)
@click.pass_context
def phases(ctx: click.Context, profile: str | None, against: tuple[str, ...], autoscale: bool,
           start_timeout_s: float, json_dest: str | None, plot_file: str | None,
           streams: int, stream_tokens: int, long_tokens: int, long_max_tokens: int,
           phase_s: float, seed: int) -> None:
    """A mix that changes in phases: chat streams, then long prompts every 1.5 s,
    then every 3 s, then chat again.

    \b
    Per phase and over the whole run: ITL p99 of the streams, TTFT p50/p90 of
    every request (and of the long prompts), output tokens/s and 429s (a
    refused request is retried). The verdict in --json: is the first setup
    within 10 % of the best other on each figure in every phase, and better
    than all of them over the run? Default setups: hybrid (cpu-tiny as
    shipped), aggregated (cpu-aggregated), sarathi-256 and sarathi-512
    (cpu-aggregated with that step token budget) and fixed-pd (cpu-tiny with
    soft roles off); these names, and soft (soft roles without hybrid), also
    work as a SETUP.

    Each figure is followed by its ratio to the first setup's, e.g. "(0.85×)":
    below 1 is better for latencies, above 1 for goodput and tokens/s.
    """
    params = phases_mod.Params(streams, stream_tokens, long_tokens, long_max_tokens, phase_s,
                               seed)
    with user_errors():
        setups = parse_setups(profile, against, phases_mod.PRESETS, phases_mod.DEFAULT_SETUPS)
        check_outputs(plot_file)
        with workspace(setups, autoscale) as (work, mats):
            workload = phases_mod.PhasesWorkload(params)
            results = run_setups(mats, work, workload, start_timeout_s, Progress())
            rows = [r for s in results for r in workload.rows(s["label"], s["result"])]
            finish(ctx, "phases", workload.config(), mats, results, rows, workload.columns,
                   json_dest, plot_file, {"verdict": phases_mod.verdict(results)})


@bench.command(name="interference")
@setup_options()
@click.option("--streams", type=click.IntRange(min=1), default=4, show_default=True,
              help="Concurrent decode streams.")
@click.option("--stream-tokens", type=click.IntRange(min=1), default=200, show_default=True)
@click.option("--long-prompts", type=click.IntRange(min=1), default=7, show_default=True)
@click.option("--long-tokens", type=click.IntRange(min=16), default=630, show_default=True,
              help="Tokens per long prompt.")
@click.option("--long-max-tokens", type=click.IntRange(min=1), default=16, show_default=True)
@click.option("--interval-s", type=click.FloatRange(min=0.1), default=3.0, show_default=True,
              help="Seconds between long prompts.")
@click.option("--lead-s", type=click.FloatRange(min=0), default=3.0, show_default=True,
              help="Seconds the streams run before the first long prompt.")
@click.option("--seed", type=int, default=1, show_default=True)
@click.pass_context
def interference(ctx: click.Context, profile: str | None, against: tuple[str, ...],
                 autoscale: bool, start_timeout_s: float, json_dest: str | None,
                 plot_file: str | None, streams: int, stream_tokens: int, long_prompts: int,
                 long_tokens: int, long_max_tokens: int, interval_s: float, lead_s: float,
                 seed: int) -> None:
    """Decode smoothness under long prompts: streams decode while unique long
    prompts arrive every --interval-s.

    \b
    ITL of the streams (p50, p99, max, share of gaps over 250 ms), TTFT of the
    long prompts, output tokens/s, and the share of long prompts the router sent
    to a prefill worker. Goals in --json for each P/D setup against each
    aggregated one: ITL p99 ≤ 0.5×, long TTFT p50 ≤ 1.3×, tokens/s ≥ 0.9×.
    Default setups: pd-adaptive, pd-threshold (cpu-tiny with that P/D decider)
    and aggregated (cpu-aggregated); these names also work as a SETUP.

    Each figure is followed by its ratio to the first setup's, e.g. "(0.85×)":
    below 1 is better for latencies, above 1 for goodput and tokens/s.
    """
    params = interference_mod.Params(streams, stream_tokens, long_prompts, long_tokens,
                                     long_max_tokens, interval_s, lead_s, seed)
    with user_errors():
        setups = parse_setups(profile, against, interference_mod.PRESETS,
                              interference_mod.DEFAULT_SETUPS)
        check_outputs(plot_file)
        with workspace(setups, autoscale) as (work, mats):
            workload = interference_mod.InterferenceWorkload(params)
            results = run_setups(mats, work, workload, start_timeout_s, Progress())
            rows = [r for s in results for r in workload.rows(s["label"], s["result"])]
            finish(ctx, "interference", workload.config(), mats, results, rows,
                   workload.columns, json_dest, plot_file,
                   {"goals": interference_mod.goals(results)})


@bench.command(name="speeds")
@setup_options()
@click.option("--short-tokens", type=click.IntRange(min=1), default=64, show_default=True)
@click.option("--long-tokens", type=click.IntRange(min=2), default=1024, show_default=True)
@click.option("--repeats", type=click.IntRange(min=1), default=3, show_default=True,
              help="Requests per prompt length; the table shows their median.")
@click.option("--stream-tokens", type=click.IntRange(min=2), default=64, show_default=True)
@click.pass_context
def speeds(ctx: click.Context, profile: str | None, against: tuple[str, ...], autoscale: bool,
           start_timeout_s: float, json_dest: str | None, plot_file: str | None,
           short_tokens: int, long_tokens: int, repeats: int, stream_tokens: int) -> None:
    """One request alone: TTFT at a short and a long prompt, and the decode step.

    
    Compares dtypes, builds or machines free of queueing, e.g.
      pdbox bench speeds --profile 'bf16:cpu-aggregated,model.dtype=bfloat16' \
          --against 'fp32:cpu-aggregated,model.dtype=float32'
    prefill tok/s is (long - short tokens) / (long - short TTFT): net of the
    request's fixed cost. The calibrated columns are what pdbox measured itself
    at each worker's start (docs/ROUTING.md, Calibration).

    Each figure is followed by its ratio to the first setup's, e.g. "(0.20×)":
    below 1 is better for latencies, above 1 for tokens/s.
    """
    if long_tokens <= short_tokens:
        raise click.UsageError("--long-tokens must be more than --short-tokens")
    params = speeds_mod.Params(short_tokens, long_tokens, repeats, stream_tokens)
    with user_errors():
        setups = parse_setups(profile, against, {}, ["cpu-aggregated"])
        check_outputs(plot_file)
        with workspace(setups, autoscale) as (work, mats):
            workload = speeds_mod.SpeedsWorkload(params)
            results = run_setups(mats, work, workload, start_timeout_s, Progress())
            rows = [r for s in results for r in workload.rows(
                s["label"], {**s["result"], "calibration": s["pdbox"].get("calibration")})]
            finish(ctx, "speeds", workload.config(), mats, results, rows, workload.columns,
                   json_dest, plot_file)


@bench.command(name="decider")
@setup_options()
@click.option("--lengths", default="900,2000", show_default=True,
              help="Comma-separated prompt lengths in tokens (unique token ids).")
@click.option("--per-worker", type=click.IntRange(min=1), default=3, show_default=True,
              help="Streams running for each worker while a long prompt comes.")
@click.option("--repeats", type=click.IntRange(min=1), default=2, show_default=True,
              help="Prompts per length and path alone, and rounds under streams.")
@click.option("--stream-tokens", type=click.IntRange(min=16), default=600, show_default=True)
@click.pass_context
def decider(ctx: click.Context, profile: str | None, against: tuple[str, ...], autoscale: bool,
            start_timeout_s: float, json_dest: str | None, plot_file: str | None,
            lengths: str, per_worker: int, repeats: int, stream_tokens: int) -> None:
    """The P/D decider under streams, against each long prompt sent alone.

    \b
    Per length: the prompt alone, forced local and forced remote (x-pdbox-pd);
    then, with --per-worker streams on each worker, on the router's own
    choice. Goals (in --json): the streams' worst gap while it is prefilled
    ≤ 2× the profile's ITL target, and its TTFT ≤ 1.3× the better path alone.
    A P/D profile is needed (default cpu-tiny as shipped), e.g.
      pdbox bench decider --against 'fixed-pd:cpu-tiny,router.hybrid=false'
    """
    try:
        sizes = tuple(int(x) for x in lengths.split(",") if x.strip())
    except ValueError:
        raise click.BadParameter("give whole numbers of tokens, e.g. 900,2000",
                                 param_hint="'--lengths'") from None
    if not sizes or min(sizes) < 16:
        raise click.BadParameter("each length must be at least 16 tokens",
                                 param_hint="'--lengths'")
    params = decider_mod.Params(sizes, per_worker, repeats, stream_tokens)
    with user_errors():
        setups = parse_setups(profile, against, {}, ["cpu-tiny"])
        check_outputs(plot_file)
        with workspace(setups, autoscale) as (work, mats):
            not_pd = [m.setup.label for m in mats if not m.profile.is_pd]
            if not_pd:
                raise click.UsageError(f"{', '.join(not_pd)}: the decider needs a P/D "
                                       "profile (a prefill and a decode role)")
            workload = decider_mod.DeciderWorkload(params)
            results = run_setups(mats, work, workload, start_timeout_s, Progress())
            rows = [r for s in results for r in workload.rows(s["label"], s["result"])]
            finish(ctx, "decider", workload.config(), mats, results, rows, workload.columns,
                   json_dest, plot_file, {"goals": decider_mod.goals(results)})


for _cmd in (startup, router, burst, prefix_live_cmd, pd_legs_cmd, tui_load_cmd, autoscale,
             hitrate_cmd, split_replay_cmd):
    bench.add_command(_cmd)
