"""What every `pdbox bench` command shares: setup options, errors, the report."""

from __future__ import annotations

import contextlib
import sys
import tempfile
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, TypeVar

import click

from pdbox.bench import machine
from pdbox.bench.box import BoxError
from pdbox.bench.harness import Harness, Workload, WorkloadError, sigterm_as_interrupt
from pdbox.bench.progress import Progress
from pdbox.bench.report import (
    Column,
    PlotUnavailable,
    Row,
    check_plot,
    columns_json,
    plot,
    table,
    with_ratios,
    write_json,
)
from pdbox.bench.setups import Materialized, Setup, SetupError, materialize, parse, unique_labels
from pdbox.bench.trace import TraceWindowError
from pdbox.replay.traces import TraceError

F = TypeVar("F", bound=Callable[..., Any])

SETUP_HELP = ("[LABEL:]PROFILE[,ITEM...]: a built-in profile or a profile file; each ITEM "
              "is a vLLM flag (--name=value, added to [engine] extra_args) or a profile "
              "key (section.key=value). E.g. 'cpu-aggregated,--max-num-batched-tokens=256' "
              "or 'fixed-pd:cpu-tiny,router.soft_roles=false'.")


def setup_options(plots: bool = True) -> Callable[[F], F]:
    """--profile/--against/--autoscale/--json/--plot, shared by the box workloads."""
    def deco(f: F) -> F:
        opts = [
            click.option("--profile", "profile", default=None, metavar="SETUP",
                         help="The first setup, the one the others are compared with. "
                         + SETUP_HELP),
            click.option("--against", "against", multiple=True, metavar="SETUP",
                         help="Another setup, run after the first on the same cores "
                         "(repeatable)."),
            click.option("--autoscale", is_flag=True,
                         help="Leave each profile's autoscaler on (off by default, so "
                         "the worker counts stay fixed)."),
            click.option("--start-timeout-s", type=click.FloatRange(min=10), default=900.0,
                         show_default=True, help="How long a box may take to start."),
            click.option("--json", "json_dest", is_flag=False, flag_value="-", default=None,
                         metavar="[FILE]", help="Write every figure, the setups and the "
                         "machine record as JSON to FILE (bare --json or '-': stdout, "
                         "and the table goes to stderr)."),
        ]
        if plots:
            opts.append(click.option("--plot", "plot_file", default=None, metavar="FILE.png",
                                     help="Draw latency percentiles and tokens/s per setup "
                                     "(drawn with Pillow)."))
        for opt in reversed(opts):
            f = opt(f)
        return f
    return deco


@contextlib.contextmanager
def user_errors() -> Iterator[None]:
    """Bad input and failed starts end in one sentence and a non-zero exit;
    Ctrl-C and SIGTERM end in 130 once every box is stopped."""
    try:
        with sigterm_as_interrupt():
            yield
    except (SetupError, TraceError, TraceWindowError, PlotUnavailable) as exc:
        raise click.ClickException(str(exc)) from None
    except BoxError as exc:
        raise click.ClickException(f"a box did not start: {exc}") from None
    except WorkloadError as exc:
        raise click.ClickException(str(exc)) from None
    except KeyboardInterrupt:
        click.echo("\nbench: interrupted; the box was stopped and nothing is left running.",
                   err=True)
        sys.exit(130)


def parse_setups(profile: str | None, against: Sequence[str], presets: dict[str, str],
                 defaults: Sequence[str]) -> list[Setup]:
    """--profile and --against; the workload's defaults when neither is given."""
    if profile is None and not against:
        specs = list(defaults)
    else:
        specs = [profile or "cpu-tiny", *against]
    return unique_labels([parse(s, presets) for s in specs])


@contextlib.contextmanager
def workspace(setups: list[Setup], autoscale: bool) -> Iterator[tuple[Path, list[Materialized]]]:
    """A scratch folder holding each setup's profile (checked before anything starts)."""
    with tempfile.TemporaryDirectory(prefix="pdbox-bench-") as tmp:
        work = Path(tmp)
        yield work, [materialize(s, work, autoscale) for s in setups]


def run_setups(mats: list[Materialized], work: Path, workload: Workload,
               start_timeout_s: float, progress: Progress) -> list[dict[str, Any]]:
    harness = Harness(mats, work, progress, start_timeout_s=start_timeout_s)
    return harness.run(workload)


def ordered_rows(rows: list[Row]) -> list[Row]:
    """Rows grouped by phase (in first-seen order), setups in run order within each."""
    order = {g: i for i, g in enumerate(dict.fromkeys(r.group for r in rows))}
    return sorted(rows, key=lambda r: order[r.group])


def finish(ctx: click.Context, workload_name: str, config: dict[str, Any],
           mats: list[Materialized] | None, setups: list[dict[str, Any]], rows: list[Row],
           columns: Sequence[Column], json_dest: str | None, plot_file: str | None,
           extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """Print the table, write the JSON and the plot; returns the whole result."""
    rows = ordered_rows(rows)
    result: dict[str, Any] = {
        "workload": workload_name,
        "command": " ".join(["pdbox", *sys.argv[1:]]) if sys.argv else ctx.command_path,
        "config": config,
        "machine": machine.for_profile(mats[0].profile) if mats else machine.record(),
        "setups": setups,
        "columns": columns_json(columns),
        "table": with_ratios(rows, columns),
        **(extra or {}),
    }
    text = table(rows, columns) + "\n" + machine.describe(result["machine"], setups)
    click.echo(text, err=json_dest == "-")
    left = [p for s in setups for p in s.get("leftover_pids", [])]
    if left:
        click.echo(f"warning: {len(left)} process(es) outlived their box and were killed: "
                   f"{left}", err=True)
    if json_dest:
        write_json(result, json_dest)
    if plot_file:
        plot(rows, columns, plot_file, f"pdbox bench {workload_name}")
        click.echo(f"plot written to {plot_file}", err=True)
    return result


def check_outputs(plot_file: str | None) -> None:
    """Fail before any box starts when --plot cannot be honoured."""
    if plot_file:
        check_plot()


def legacy_setups(argv: list[str]) -> list[str]:
    """The old scripts' `--setups a,b,c` as `--profile a --against b --against c`."""
    out: list[str] = []
    it = iter(argv)
    for arg in it:
        if arg == "--setups" or arg.startswith("--setups="):
            value = arg.split("=", 1)[1] if "=" in arg else next(it, "")
            names = [n.strip() for n in value.split(",") if n.strip()]
            if names:
                out += ["--profile", names[0]]
                for n in names[1:]:
                    out += ["--against", n]
            continue
        out.append(arg)
    return out
