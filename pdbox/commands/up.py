"""`pdbox up`: the one long-running command."""

from __future__ import annotations

import asyncio
import os
import sys
import threading
from pathlib import Path

import click

from pdbox import config, paths

ROLES_ATTACH = ("prefill", "decode", "aggregated")


def choose_profile(name: str | None) -> config.Profile:
    """--profile wins; else a GPU seen through NVML picks its profile; else cpu-tiny."""
    if name is None:
        from pdbox.hardware.nvml import default_telemetry

        gpu = default_telemetry()
        name = config.default_profile_name(gpu.first_gpu_name() if gpu.available() else None)
    return config.load(name)


def parse_attach(values: tuple[str, ...], profile: config.Profile) -> list:
    from pdbox.appliance import Attach

    out = []
    for v in values:
        role = "aggregated"
        url = v
        if "=" in v.split("://")[0]:
            role, url = v.split("=", 1)
        if role not in ROLES_ATTACH:
            raise click.UsageError(f"--attach {v}: role must be one of {', '.join(ROLES_ATTACH)}")
        if not url.startswith(("http://", "https://")):
            raise click.UsageError(f"--attach {v}: give a URL like http://127.0.0.1:8001")
        if role == "aggregated" and profile.is_pd and any("=" in x for x in values):
            raise click.UsageError("--attach: give every URL a role (prefill=… decode=…) "
                                   "or none")
        out.append(Attach(role, url))
    roles = {a.role for a in out}
    if "prefill" in roles and "decode" not in roles:
        raise click.UsageError("--attach: a prefill server needs at least one decode server")
    return out


@click.command()
@click.option("--profile", "profile_name", metavar="NAME|FILE",
              help="Built-in profile name or a profile file (default: the GPU's profile, "
                   "else cpu-tiny).")
@click.option("--port", type=click.IntRange(0, 65535), default=None,
              help="Port of the OpenAI endpoint (default: the profile's, 8000).")
@click.option("--host", default=None,
              help="Address to bind (default 127.0.0.1). Anything else needs an API key.")
@click.option("--headless", is_flag=True, help="No TUI: print the endpoint and serve until "
              "Ctrl-C or SIGTERM.")
@click.option("--attach", "attach", multiple=True, metavar="[ROLE=]URL",
              help="Route to OpenAI servers already running instead of starting workers "
                   "(repeatable; ROLE is prefill, decode or aggregated).")
@click.option("--api-key-env", default=None, metavar="VAR",
              help="Environment variable holding the API key the OpenAI routes require "
                   "(default: the profile's, PDBOX_API_KEY).")
def up(profile_name: str | None, port: int | None, host: str | None, headless: bool,
       attach: tuple[str, ...], api_key_env: str | None) -> None:
    """Start the workers, the router and the TUI on this machine."""
    try:
        profile = choose_profile(profile_name)
    except config.ProfileError as exc:
        click.echo(f"pdbox: {exc}", err=True)
        sys.exit(2)
    attached = parse_attach(attach, profile)
    if not attached:
        # The same plan as `pdbox plan`: a profile that cannot fit is refused
        # before any worker (or MPS daemon) starts.
        refusal = plan_refusal(profile)
        if refusal:
            click.echo(f"pdbox: {refusal}", err=True)
            sys.exit(1)
    env_name = api_key_env or profile.router.api_key_env
    api_key = os.environ.get(env_name) or None
    bind = host or profile.router.host
    if bind not in ("127.0.0.1", "localhost", "::1") and not api_key:
        raise click.UsageError(
            f"--host {bind} exposes pdbox beyond this machine; set an API key in ${env_name} "
            "first (clients then send it as a Bearer token)")
    show_tui = not headless and sys.stdout.isatty() and sys.stdin.isatty()
    run_dir = paths.run_dir()
    if show_tui:
        code = _run_with_tui(profile, run_dir, bind, port, attached, api_key)
    else:
        code = asyncio.run(_run_headless(profile, run_dir, bind, port, attached, api_key))
    sys.exit(code)


def plan_refusal(profile: config.Profile) -> str | None:
    """One sentence when the profile's plan does not fit, else None. A hub
    model's config.json is fetched alone if needed: its workers would
    download the whole model next."""
    from pdbox.plan.build import PlanError
    from pdbox.plan.make import make_plan

    try:
        return make_plan(profile, fetch=True).refusal()
    except PlanError as exc:
        return str(exc)


def _progress(msg: str) -> None:
    click.echo(f"pdbox: {msg}", err=True)


async def _run_headless(profile, run_dir: Path, host, port, attached, api_key) -> int:
    from pdbox.appliance import Appliance, StartError

    app = Appliance(profile, run_dir, host=host, port=port, attach=attached, api_key=api_key,
                    on_progress=_progress, echo_events=True)
    start = asyncio.create_task(app.start())
    stop_wait = asyncio.create_task(app.run())
    try:
        done, _ = await asyncio.wait({start, stop_wait}, return_when=asyncio.FIRST_COMPLETED)
        if start in done:
            start.result()
            note = app.fleet.serving_note() if app.fleet else ""
            click.echo(f"pdbox: ready. OpenAI endpoint: {app.endpoint}"
                       + (f" (serving {note})" if note else ""), err=True)
            try:
                # The endpoint alone on stdout, for scripts.
                sys.stdout.write(app.endpoint + "\n")
                sys.stdout.flush()
            except (BrokenPipeError, OSError):
                pass
            await stop_wait
        else:
            start.cancel()
            try:
                await start
            except (asyncio.CancelledError, Exception):  # noqa: BLE001 - we are stopping anyway
                pass
            _progress("interrupted while starting")
    except StartError as exc:
        click.echo(f"pdbox: {exc}", err=True)
        return 1
    finally:
        stop_wait.cancel()
        # Whatever happened, nothing pdbox started may outlive it.
        await app.stop()
    _progress(app.stop_summary or "stopped")
    fatal = getattr(app, "fatal", None)
    if fatal:
        click.echo(f"pdbox: {fatal}", err=True)
        return 1
    return 0


def _run_with_tui(profile, run_dir: Path, host, port, attached, api_key) -> int:
    """Serve on a background thread's loop; the TUI is a control-API client on the main thread."""
    from pdbox.appliance import Appliance, StartError

    result: dict[str, object] = {}
    ready = threading.Event()
    loop = asyncio.new_event_loop()
    app = Appliance(profile, run_dir, host=host, port=port, attach=attached, api_key=api_key,
                    on_progress=_progress)

    async def serve() -> None:
        try:
            await app.start()
        except StartError as exc:
            result["error"] = str(exc)
            ready.set()
            await app.stop()
            return
        except BaseException:
            ready.set()
            await app.stop()
            raise
        ready.set()
        await app.run()
        await app.stop()

    thread = threading.Thread(target=lambda: loop.run_until_complete(serve()), daemon=True)
    thread.start()
    try:
        while not ready.wait(0.2):
            pass
    except KeyboardInterrupt:
        loop.call_soon_threadsafe(app.request_shutdown)
        thread.join(timeout=60)
        _progress("interrupted while starting")
        return 130
    if "error" in result:
        thread.join(timeout=60)
        click.echo(f"pdbox: {result['error']}", err=True)
        return 1
    try:
        from pdbox.control_client import ControlClient
        from pdbox.tui.app import run_tui

        run_tui(ControlClient(app.control_url, app.token), owns_server=True)
    finally:
        loop.call_soon_threadsafe(app.request_shutdown)
        thread.join(timeout=120)
    if app.stop_summary:
        _progress(app.stop_summary)
    fatal = getattr(app, "fatal", None)
    if fatal:
        click.echo(f"pdbox: {fatal}", err=True)
        return 1
    return 0
