"""`pdbox profiles`: list, show and validate profiles, offline.

An invalid profile prints one line (file:line: dotted.key: what is wrong, and
"did you mean" for a misspelt key) and exits with 2, the usage-error code, so
scripts can tell a bad profile from a failed command.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

import click

from pdbox import config


class ProfileInvalid(click.ClickException):
    exit_code = 2


def _load(name_or_file: str) -> config.Profile:
    try:
        return config.load(name_or_file)
    except config.ProfileError as exc:
        raise ProfileInvalid(str(exc)) from None


def _default_name() -> str:
    """The profile `pdbox up` picks on this machine (by the GPU NVML names)."""
    try:
        from pdbox.hardware.nvml import default_telemetry

        gpu = default_telemetry().first_gpu_name()
    except Exception:  # no NVML, no driver: the no-GPU default applies
        gpu = None
    return config.default_profile_name(gpu)


@click.group()
def profiles() -> None:
    """List, show and validate profiles."""


@profiles.command("list")
@click.option("--json", "as_json", is_flag=True, help="Print the list as JSON.")
def list_(as_json: bool) -> None:
    """List the built-in profiles; the one `pdbox up` would pick is marked *."""
    default = _default_name()
    rows: list[dict[str, Any]] = []
    for name in config.builtin_names():
        row: dict[str, Any] = {"name": name, "default": name == default}
        try:
            p = config.load(name)
        except config.ProfileError as exc:
            row.update(valid=False, error=str(exc))
        else:
            row.update(
                valid=True,
                description=p.description,
                device=p.hardware.device,
                mode=p.mode.kind,
                model=p.model.source,
                file=p.source_file,
            )
        rows.append(row)
    if as_json:
        click.echo(json.dumps(rows, indent=2))
        return
    width = max((len(r["name"]) for r in rows), default=0)
    for r in rows:
        mark = "*" if r["default"] else " "
        if r["valid"]:
            what = f"{r['device']:<4} {r['mode']:<10} {r['description']}"
        else:
            what = f"INVALID: {r['error']}"
        click.echo(f"{mark} {r['name']:<{width}}  {what}")


@profiles.command()
@click.argument("name_or_file", metavar="NAME|FILE")
@click.option("--json", "as_json", is_flag=True, help="Print the resolved profile as JSON.")
def show(name_or_file: str, as_json: bool) -> None:
    """Print a profile with every default filled in."""
    p = _load(name_or_file)
    data = p.to_dict()
    if as_json:
        click.echo(json.dumps(data, indent=2))
        return
    click.echo(f"# {p.source_file}")
    click.echo(_as_toml(data))


@profiles.command()
@click.argument("file", metavar="FILE")
def validate(file: str) -> None:
    """Check a profile file; exit 2 with the first problem found."""
    p = _load(file)
    roles = ", ".join(f"{n} x{rc.replicas} (max {rc.max})" for n, rc in p.roles().items())
    click.echo(f"{p.source_file}: ok: {p.name}, {p.hardware.device}, {p.mode.kind}: {roles}")


# ------------------------------------------------------------------ rendering


def _as_toml(data: Mapping[str, Any]) -> str:
    """The resolved profile in the same TOML shape as the files, so that a
    shown profile can be saved and edited. Tables nest as dotted headers."""
    lines: list[str] = []
    scalars = {k: v for k, v in data.items() if not isinstance(v, Mapping)}
    for k, v in scalars.items():
        lines.append(f"{k} = {_value(v)}")
    _tables(data, "", lines)
    return "\n".join(lines)


def _tables(data: Mapping[str, Any], prefix: str, lines: list[str]) -> None:
    for key, value in data.items():
        if not isinstance(value, Mapping):
            continue
        header = f"{prefix}{key}"
        lines.append("")
        lines.append(f"[{header}]")
        for k, v in value.items():
            if not isinstance(v, Mapping):
                lines.append(f"{k} = {_value(v)}")
        _tables(value, f"{header}.", lines)


def _value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_value(x) for x in v) + "]"
    return json.dumps(str(v))
