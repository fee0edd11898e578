"""`pdbox bench startup` and `pdbox bench router`: benchmarks of pdbox itself."""

from __future__ import annotations

from typing import Any

import click

from pdbox.bench import machine
from pdbox.bench import router_overhead as ro
from pdbox.bench import startup as startup_mod
from pdbox.bench.cli_common import finish, parse_setups, user_errors, workspace
from pdbox.bench.progress import Progress
from pdbox.bench.report import write_json
from pdbox.bench.router_report import render


@click.command(name="startup")
@click.option("--profile", default="cpu-tiny", show_default=True, metavar="SETUP",
              help="The profile (or setup) to start; see `pdbox bench --help`.")
@click.option("--runs", type=click.IntRange(min=1), default=2, show_default=True,
              help="Alternating runs of each.")
@click.option("--start-timeout-s", type=click.FloatRange(min=10), default=900.0,
              show_default=True)
@click.option("--json", "json_dest", is_flag=False, flag_value="-", default=None,
              metavar="[FILE]", help="Write the results and the machine record as JSON "
              "(bare --json: stdout).")
@click.pass_context
def startup(ctx: click.Context, profile: str, runs: int, start_timeout_s: float,
            json_dest: str | None) -> None:
    """`pdbox up` to ready against one bare vLLM server with a worker's flags.

    \b
    Alternating, --runs times each: a bare `vllm.entrypoints.openai.api_server`
    timed to its first /health 200, and `pdbox up --headless`, timed to its
    endpoint line (the first worker serves) and to every worker ready; plus the
    peak RSS of the pdbox process itself. The ratio column is pdbox over bare
    (goal: all ready ≤ 1.3×); peak RSS goal ≤ 150 MB.
    """
    with user_errors():
        setups = parse_setups(profile, [], {}, ["cpu-tiny"])
        with workspace(setups, autoscale=True) as (work, mats):
            m = mats[0]
            result = startup_mod.run(m.profile, m.file, runs, work, Progress(),
                                     start_timeout_s)
            rows = startup_mod.rows(result)
            setup = {"label": m.setup.label, "profile": m.setup.profile,
                     "dtype": machine.resolved_dtype(m.profile), "result": result,
                     "leftover_pids": result["leftover_pids"]}
            finish(ctx, "startup", {"runs": runs}, mats, [setup], rows, startup_mod.COLUMNS,
                   json_dest, None, {"goals": {"ratio_ok": result["ratio_ok"],
                                               "rss_ok": result["rss_ok"]}})


@click.command(name="router")
@click.option("--backends", type=click.IntRange(min=1), default=2, show_default=True,
              help="Mock vLLM servers behind the routers.")
@click.option("--tokens", type=click.IntRange(min=1), default=16, show_default=True,
              help="Tokens each mock answer streams.")
@click.option("--itl-ms", type=click.FloatRange(min=0), default=1.0, show_default=True)
@click.option("--concurrency", type=click.IntRange(min=1), default=32, show_default=True)
@click.option("--requests", type=click.IntRange(min=1), default=2000, show_default=True,
              help="Requests of the throughput phase.")
@click.option("--latency-requests", type=click.IntRange(min=1), default=300,
              show_default=True)
@click.option("--warmup", type=click.IntRange(min=1), default=50, show_default=True)
@click.option("--prefixes", type=click.IntRange(min=1), default=8, show_default=True,
              help="Distinct system prompts.")
@click.option("--prefix-chars", type=click.IntRange(min=1), default=1800, show_default=True,
              help="Characters of each system prompt (8000: the prompt-heavy load).")
@click.option("--pdbox-policy", default="prefix", show_default=True)
@click.option("--max-inflight", type=click.IntRange(min=0), default=0, show_default=True,
              help="pdbox's max_inflight_per_worker; 0: what the workers report.")
@click.option("--sglang-python", default=None, metavar="PYTHON",
              help="A Python with sglang-router installed; without it that peer is skipped.")
@click.option("--vllm-router", default=None, metavar="EXE",
              help="The vllm-router executable (pip install vllm-router); without it that "
              "peer is skipped.")
@click.option("--guard", is_flag=True,
              help="Also measure pdbox as prefill + decode with soft roles, KV events and "
              "migration on.")
@click.option("--rounds", type=click.IntRange(min=1), default=3, show_default=True,
              help="Measure every target this many times, interleaved; report medians.")
@click.option("--skip-pdbox", is_flag=True)
@click.option("--pdbox-uvloop", is_flag=True, help="Run pdbox's event loop on uvloop.")
@click.option("--json", "json_dest", is_flag=False, flag_value="-", default=None,
              metavar="[FILE]", help="Write the results and the machine record as JSON "
              "(bare --json: stdout).")
def router(json_dest: str | None, **params: Any) -> None:
    """What pdbox's router adds to a request, against peer routers, over mock workers.

    \b
    Starts mock vLLM servers, then measures: direct (the mocks themselves),
    pdbox (`pdbox up --attach` in front of them) and sglang-router where
    --sglang-python has it. Latency: requests one at a time, TTFT and end-to-end
    p50/p99; "adds" is routed minus direct. Throughput: requests/s at
    --concurrency and the router's CPU per request. Goal: pdbox passes at least
    1.5x the requests/s of the best peer, adds no more p50 latency, no errors.
    """
    with user_errors():
        try:
            results = ro.run(ro.Params(**params))
        except RuntimeError as exc:  # a mock or a router that did not start
            raise click.ClickException(str(exc)) from None
    results["machine"] = machine.record()
    click.echo(render(results), err=json_dest == "-")
    if "goal_met" in results:
        click.echo("goal (req/s ≥ 1.5x the best peer's, p50 added ≤ its, no errors): "
                   + ("met" if results["goal_met"] else "NOT met"), err=json_dest == "-")
    if json_dest:
        write_json(results, json_dest)
