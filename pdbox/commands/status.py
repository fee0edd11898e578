"""Client commands for a running pdbox: status, down, scale, policy."""

from __future__ import annotations

import json
import sys
import time
from typing import Any

import click

from pdbox.control_client import ControlClient, ControlError


def _client() -> ControlClient:
    try:
        return ControlClient.from_run_folder()
    except ControlError as exc:
        raise click.ClickException(str(exc)) from None


def _fmt(v: Any, unit: str = "", scale: float = 1.0, digits: int = 2) -> str:
    if v is None:
        return "N/A"
    if isinstance(v, float):
        return f"{v * scale:.{digits}f}{unit}"
    return f"{v}{unit}"


@click.command()
@click.option("--json", "as_json", is_flag=True, help="Print the full status snapshot as JSON.")
def status(as_json: bool) -> None:
    """Show the running pdbox's workers and figures."""
    try:
        snap = _client().sync_status()
    except ControlError as exc:
        raise click.ClickException(str(exc)) from None
    if as_json:
        click.echo(json.dumps(snap, indent=2))
        return
    r = snap.get("router", {})
    click.echo(f"pdbox {snap.get('version')}  profile {snap.get('profile')}  "
               f"mode {snap.get('mode')}  policy {snap.get('policy')}")
    click.echo(f"endpoint {snap.get('endpoint')}  up {_fmt(snap.get('uptime_s'), 's', digits=0)}")
    click.echo("")
    click.echo(f"{'worker':<14}{'role':<12}{'state':<20}{'pid':>8}{'port':>7}  {'slice':<14}"
               f"{'queue':>6}{'run':>5}{'kv':>7}{'hit':>7}{'restarts':>9}")
    for w in snap.get("workers", []):
        click.echo(f"{w['id']:<14}{w['role']:<12}{_state(w):<20}{_fmt(w.get('pid')):>8}"
                   f"{_fmt(w.get('port')):>7}  {str(w.get('slice') or ''):<14}"
                   f"{_fmt(w.get('queue')):>6}{_fmt(w.get('running')):>5}"
                   f"{_fmt(w.get('kv_usage'), '%', 100, 0):>7}"
                   f"{_fmt(w.get('prefix_hit_rate'), '%', 100, 0):>7}{w.get('restarts', 0):>9}")
    click.echo("")
    click.echo(f"requests {r.get('requests_total')}  rps {_fmt(r.get('rps'))}  "
               f"TTFT p50 {_fmt(r.get('ttft_p50_s'), 's')} p99 {_fmt(r.get('ttft_p99_s'), 's')}  "
               f"ITL p50 {_fmt(r.get('itl_p50_s'), 'ms', 1000, 0)} "
               f"p99 {_fmt(r.get('itl_p99_s'), 'ms', 1000, 0)}")
    click.echo(f"tokens/s {_fmt(r.get('tokens_per_s'), digits=1)} "
               f"(last {_fmt(r.get('rate_window_s'), 's', digits=0)})  "
               f"output tokens {r.get('output_tokens_total')}")
    for role, e in ((r.get("engine") or {}).get("roles") or {}).items():
        click.echo(f"engine {role:<10} TTFT p50 {_fmt(e.get('ttft_p50_s'), 's')}  "
                   f"ITL p50 {_fmt(e.get('itl_p50_s'), 'ms', 1000, 0)}  "
                   f"queue {_fmt(e.get('queue_mean_s'), 's')}  "
                   f"prefill {_fmt(e.get('prefill_mean_s'), 's')}  waiting {e.get('waiting')}")
    click.echo(f"P/D remote {r.get('pd_remote')}  local {r.get('pd_local')}  "
               f"fallbacks {r.get('fallbacks')}  429s {r.get('rejected_429')}  "
               f"NIXL {_fmt(r.get('nixl_xfer_ms'), 'ms', digits=1)}")
    _soft_roles(snap)


def _soft_roles(snap: dict[str, Any]) -> None:
    """Each worker's effective role mix and the split (issue 15), when P/D."""
    soft = (snap.get("router") or {}).get("soft_roles") or {}
    split = (snap.get("autoscaler") or {}).get("split") or {}
    if not soft and not split:
        return
    if split:
        pin = f"  pinned {split['pinned']}" if split.get("pinned") else ""
        now = f"  moving: {split['phase']}" if split.get("phase") else ""
        click.echo(f"split {split.get('split')}{pin}{now}")
    if soft:
        legs = soft.get("split") or {}
        click.echo(f"soft roles {'on' if soft.get('enabled') else 'off'}  legs: whole "
                   f"{_fmt(legs.get('whole'), '%', 100, 0)} prefill "
                   f"{_fmt(legs.get('prefill'), '%', 100, 0)} decode "
                   f"{_fmt(legs.get('decode'), '%', 100, 0)} "
                   f"(last {_fmt(soft.get('window_s'), 's', digits=0)})")
        for wid, m in sorted((soft.get("role_mix") or {}).items()):
            click.echo(f"  {wid:<14}{int(m.get('requests') or 0):>6} requests  whole "
                       f"{_fmt(m.get('whole'), '%', 100, 0):>5}  prefill leg "
                       f"{_fmt(m.get('prefill'), '%', 100, 0):>5}  decode leg "
                       f"{_fmt(m.get('decode'), '%', 100, 0):>5}")


@click.command()
@click.option("--timeout", default=120.0, show_default=True, help="Seconds to wait for exit.")
def down(timeout: float) -> None:
    """Stop the running pdbox and every worker it started."""
    from pdbox.runfolder import NotRunning, pid_alive, read

    try:
        info = read()
    except NotRunning as exc:
        raise click.ClickException(str(exc)) from None
    try:
        ControlClient(info.control_url, info.token).sync_shutdown()
    except ControlError as exc:
        raise click.ClickException(str(exc)) from None
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and pid_alive(info.pid):
        time.sleep(0.2)
    if pid_alive(info.pid):
        raise click.ClickException(f"pdbox (pid {info.pid}) is still stopping after {timeout:.0f}s")
    click.echo("pdbox stopped")


@click.command()
@click.argument("role", type=click.Choice(["prefill", "decode", "aggregated", "split"]))
@click.argument("replicas")
@click.option("--json", "as_json", is_flag=True)
def scale(role: str, replicas: str, as_json: bool) -> None:
    """Pin ROLE at REPLICAS workers, or give it back to the autoscaler with `auto`.

    `pdbox scale split PREFILL/DECODE` pins the split of a P/D box: SM percentages on a
    GPU (60/40), core sets on a CPU (0-2/3, or 1/0 to swap two cores); `auto` unpins it.
    """
    if role == "split":
        try:
            out = _client().sync_scale(role, replicas)
        except ControlError as exc:
            raise click.ClickException(str(exc)) from None
        moving = " (re-splitting)" if out.get("moving") else ""
        click.echo(json.dumps(out) if as_json else f"split: {out.get('split')}{moving}")
        return
    if replicas == "auto":
        n: int | str = "auto"
    else:
        try:
            n = int(replicas)
        except ValueError:
            raise click.BadParameter("REPLICAS must be a whole number or 'auto'") from None
    try:
        out = _client().sync_scale(role, n)
    except ControlError as exc:
        raise click.ClickException(str(exc)) from None
    click.echo(json.dumps(out) if as_json else f"{role}: {out.get('replicas')}")


@click.command()
@click.argument("name", required=False,
                type=click.Choice(["prefix", "least_loaded", "round_robin"]))
def policy(name: str | None) -> None:
    """Show the routing policy, or set it to NAME."""
    c = _client()
    try:
        if name is None:
            click.echo(c.sync_status().get("policy"))
        else:
            c.sync_set_policy(name)
            click.echo(name)
    except ControlError as exc:
        raise click.ClickException(str(exc)) from None
    sys.exit(0)


def _state(w: dict[str, Any]) -> str:
    """The state, with the back-off's countdown or how long a worker has been silent."""
    state = str(w.get("state") or "")
    nxt = w.get("next_try_in_s")
    if state == "backoff" and isinstance(nxt, (int, float)):
        return f"backoff (next {nxt:.0f}s)"
    silent = w.get("silent_s")
    if state == "unresponsive" and isinstance(silent, (int, float)):
        return f"unresponsive {silent:.0f}s"
    return state
