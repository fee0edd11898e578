"""`pdbox smoke`: end-to-end checks against a running pdbox, or one it starts (--up)."""

from __future__ import annotations

import asyncio
import json
import signal
import sys
import time
from pathlib import Path
from typing import Any

import click

from pdbox import runfolder
from pdbox.control_client import ControlClient
from pdbox.smoke import (
    CheckResult,
    UpFailed,
    UpProcess,
    exit_code,
    normalize_endpoint,
    render_table,
    run_checks,
    to_json,
    write_junit,
)

NOT_RUNNING = "pdbox is not running (start it with: pdbox up, or use --up)"
# Control calls while a worker starts can be slow on a loaded box.
CONTROL_TIMEOUT_S = 30.0


def _say(msg: str) -> None:
    click.echo(f"pdbox smoke: {msg}", err=True)


@click.command()
@click.option("--up", "start_up", is_flag=True,
              help="Start a pdbox (headless, any free port) for the checks and stop it after.")
@click.option("--profile", "profile_name", metavar="NAME|FILE",
              help="Profile for --up (default: as `pdbox up` chooses).")
@click.option("--url", metavar="URL",
              help="OpenAI endpoint to check (default: the running pdbox's). Checks that need "
                   "the control API are skipped unless it is this PDBOX_HOME's pdbox.")
@click.option("--json", "as_json", is_flag=True,
              help='Print {"checks": [{"name", "ok", "detail", ...}]} instead of the table.')
@click.option("--junit", "junit", type=click.Path(dir_okay=False, path_type=Path),
              metavar="FILE", help="Also write the results as JUnit XML to FILE.")
@click.option("--timeout", "timeout_s", type=click.FloatRange(min=1.0), default=600.0,
              show_default=True, metavar="S",
              help="Seconds to wait for --up to be ready, and for a scaled worker to start.")
def smoke(start_up: bool, profile_name: str | None, url: str | None, as_json: bool,
          junit: Path | None, timeout_s: float) -> None:
    """Run end-to-end checks against a running pdbox (or start one with --up).

    Checks: health and /v1/models, a completion, a streamed chat, bad input
    rejected, a prefix-cache hit, the P/D path (NIXL transfer counted), and
    scaling through the control API. Any failed check exits 1.
    """
    if start_up and url:
        raise click.UsageError("--url and --up do not go together: --up checks the pdbox "
                               "it starts")
    if profile_name and not start_up:
        raise click.UsageError("--profile applies to --up only")
    extra: dict[str, Any] = {}
    if start_up:
        results = _with_up(profile_name, timeout_s, extra)
    else:
        endpoint, control = _target(url)
        results = _run(endpoint, control, timeout_s)
    _report(results, extra, as_json, junit)
    sys.exit(exit_code(results))


def _target(url: str | None) -> tuple[str, ControlClient | None]:
    try:
        info = runfolder.read()
    except runfolder.NotRunning:
        if url is None:
            raise click.ClickException(NOT_RUNNING) from None
        return url, None
    control = ControlClient(info.control_url, info.token, endpoint=info.endpoint,
                            timeout_s=CONTROL_TIMEOUT_S)
    if url is not None and normalize_endpoint(url) != normalize_endpoint(info.endpoint):
        return url, None
    return info.endpoint, control


def _run(endpoint: str, control: ControlClient | None, timeout_s: float) -> list[CheckResult]:
    return asyncio.run(run_checks(endpoint, control, scale_timeout_s=timeout_s,
                                  on_start=lambda name: _say(f"{name} …")))


def _with_up(profile: str | None, timeout_s: float, extra: dict[str, Any]) -> list[CheckResult]:
    up = UpProcess(profile, echo=lambda line: click.echo(line, err=True))
    results: list[CheckResult] = []
    # A SIGTERM to `pdbox smoke` must still stop the pdbox it started.
    previous = signal.signal(signal.SIGTERM, _raise_interrupt)
    _say("starting: " + " ".join(up.argv()[1:]))
    try:
        up.start()
        extra["pdbox"] = {"pid": up.pid, "pgid": up.pid, "profile": profile}
        results += _checks_on(up, timeout_s, extra)
    except KeyboardInterrupt:
        _say("interrupted; stopping the pdbox it started")
        _stop(up, results, extra)
        sys.exit(130)
    finally:
        signal.signal(signal.SIGTERM, previous)
    _say("stopping pdbox")
    _stop(up, results, extra)
    return results


def _checks_on(up: UpProcess, timeout_s: float, extra: dict[str, Any]) -> list[CheckResult]:
    t0 = time.monotonic()
    try:
        endpoint = up.wait_ready(timeout_s)
    except UpFailed as exc:
        return [CheckResult("up", False, str(exc), time.monotonic() - t0)]
    ready_s = time.monotonic() - t0
    try:
        info = runfolder.read()
    except runfolder.NotRunning as exc:
        return [CheckResult("up", False, f"{endpoint} serves, but {exc}", ready_s)]
    up.remember_state(info.state)
    extra["pdbox"]["endpoint"] = endpoint
    control = ControlClient(info.control_url, info.token, endpoint=endpoint,
                            timeout_s=CONTROL_TIMEOUT_S)
    # pdbox serves as soon as one worker can; the checks (P/D among them) need all.
    deadline = t0 + timeout_s
    while time.monotonic() < deadline:
        try:
            workers = control.sync_status().get("workers", [])
        except Exception:  # noqa: BLE001 - a slow answer is retried until the deadline
            workers = []
        if workers and all(w.get("state") == "ready" for w in workers):
            break
        time.sleep(1.0)
    else:
        return [CheckResult("up", False, f"{endpoint} serves, but not every worker was ready "
                            f"within {timeout_s:g} s", time.monotonic() - t0)]
    all_s = time.monotonic() - t0
    return [CheckResult("up", True, f"serving at {endpoint} in {ready_s:.1f} s, every worker "
                        f"ready in {all_s:.1f} s", ready_s)] + _run(endpoint, control, timeout_s)


def _stop(up: UpProcess, results: list[CheckResult], extra: dict[str, Any]) -> None:
    r = up.stop()
    if r.code is None and not r.forced:
        detail = "was never started"
    elif r.forced:
        detail = f"did not stop within {up.stop_grace_s:g} s of SIGTERM; killed"
    else:
        detail = f"stopped in {r.seconds:.1f} s with exit code {r.code}"
    if r.left:
        detail += "; killed what it left running: " + ", ".join(r.left)
    results.append(CheckResult("down", r.clean, detail, r.seconds))
    if "pdbox" in extra:
        extra["pdbox"].update({"exit_code": r.code, "left": r.left, "forced": r.forced})


def _raise_interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def _report(results: list[CheckResult], extra: dict[str, Any], as_json: bool,
            junit: Path | None) -> None:
    if junit is not None:
        try:
            write_junit(junit, results)
        except OSError as exc:
            raise click.ClickException(f"cannot write {junit}: {exc.strerror}") from None
    if as_json:
        click.echo(json.dumps(to_json(results, extra), indent=2))
    else:
        click.echo(render_table(results))
