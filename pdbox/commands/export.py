"""`pdbox export llm-d`: carry a profile over to llm-d on Kubernetes."""

from __future__ import annotations

import json
import re
import sys
from dataclasses import asdict
from pathlib import Path

import click

from pdbox.config import ProfileError, load


@click.group(name="export")
def export() -> None:
    """Export a profile to a cluster engine (llm-d on Kubernetes)."""


@export.command(name="llm-d")
@click.option(
    "--profile",
    "profile_name",
    required=True,
    metavar="NAME",
    help="Built-in profile name or path to a profile file.",
)
@click.option(
    "--out",
    "out_dir",
    metavar="DIR",
    type=click.Path(file_okay=False, path_type=Path),
    help="Write one manifest per object into DIR (default: one YAML stream on stdout).",
)
@click.option(
    "--replicas-from-status",
    is_flag=True,
    help="Start each role at the replica count the running pdbox's autoscaler chose.",
)
@click.option(
    "--namespace",
    metavar="NS",
    default="default",
    show_default=True,
    help="Kubernetes namespace of every object.",
)
@click.option(
    "--image",
    default=None,
    metavar="IMAGE",
    help="vLLM container image (default: the vLLM release pdbox runs, per device).",
)
@click.option(
    "--validate",
    "check",
    is_flag=True,
    help="Check the manifests offline against the Kubernetes and InferencePool "
    "schemas (needs the kubernetes-validate package).",
)
@click.option(
    "--json", "as_json", is_flag=True, help="Print objects, warnings and the key mapping as JSON."
)
def llm_d(
    profile_name: str,
    out_dir: Path | None,
    replicas_from_status: bool,
    namespace: str,
    image: str | None,
    check: bool,
    as_json: bool,
) -> None:
    """Write prefill/decode vLLM Deployments, the llm-d scheduler (EPP) and its
    config, an InferencePool and one HPA per role, from one profile.

    Every profile key with no llm-d or Kubernetes equivalent gets a warning on
    stderr (and in warnings.txt with --out). docs/EXPORT.md maps every key.
    """
    from pdbox.export import build, render

    if not re.match(r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$", namespace):
        raise click.UsageError(f"--namespace {namespace!r} is not a valid Kubernetes namespace")
    try:
        profile = load(profile_name)
    except ProfileError as exc:
        raise click.ClickException(str(exc)) from None

    replicas: dict[str, int] = {}
    notes: list[str] = []
    if replicas_from_status:
        replicas, notes = _replicas(profile.name, list(profile.roles()))

    result = build(profile, namespace=namespace, replicas=replicas, image=image)

    problems: list[str] = []
    if check:
        from pdbox.export.validate import ValidatorMissing, validate

        try:
            problems = validate(result)
        except ValidatorMissing as exc:
            raise click.ClickException(str(exc)) from None

    written: list[Path] = []
    if out_dir is not None:
        try:
            written = render.write(result, out_dir)
        except OSError as exc:
            raise click.ClickException(
                f"cannot write to {out_dir}: {exc.strerror or exc}"
            ) from None

    if as_json:
        doc = {
            "profile": result.profile,
            "objects": result.objects,
            "warnings": [asdict(w) for w in result.warnings],
            "mapped": [asdict(m) for m in result.mapped],
            "ignored": [asdict(i) for i in result.ignored],
            "replicas_from_status": result.replicas_from_status,
            "notes": notes,
            "files": [str(p) for p in written],
            "validation_errors": problems if check else None,
        }
        click.echo(json.dumps(doc, indent=2))
    else:
        for note in notes:
            click.echo(f"note: {note}", err=True)
        for w in result.warnings:
            click.echo(f"warning: {w}", err=True)
        if out_dir is None:
            click.echo(render.stream(result), nl=False)
        else:
            n = len(written) - 1  # warnings.txt is not a manifest
            click.echo(f"wrote {n} manifests and warnings.txt to {out_dir}", err=True)
            click.echo(f"apply with: kubectl apply -f {out_dir}", err=True)
        if check and not problems:
            click.echo(f"valid: {len(result.objects)} objects", err=True)
    if problems:
        for p in problems:
            click.echo(f"invalid: {p}", err=True)
        sys.exit(1)


def _replicas(profile: str, roles: list[str]) -> tuple[dict[str, int], list[str]]:
    from pdbox.export.status import StatusError, fetch_status, replicas_from_status

    try:
        status = fetch_status()
    except StatusError as exc:
        raise click.ClickException(str(exc)) from None
    counts = replicas_from_status(status, roles)
    notes = []
    running = status.get("profile")
    if running and running != profile:
        notes.append(
            f"the running pdbox serves profile {running!r}, not {profile!r}; "
            "its replica counts were used anyway"
        )
    missing = [r for r in roles if r not in counts]
    if len(missing) == len(roles):
        raise click.ClickException(
            "the running pdbox reports no replica count for "
            f"{', '.join(roles)} (is its autoscaler enabled?)"
        )
    for r in missing:
        notes.append(f"the running pdbox reports no count for {r}; kept the profile's")
    for r, n in counts.items():
        notes.append(f"{r}: {n} replica(s) from the running pdbox")
    return counts, notes
