"""`pdbox plan`: what `pdbox up` would start, without starting it."""

from __future__ import annotations

import json
import shlex
import sys

import click

from pdbox import config
from pdbox.plan.build import Plan, PlanError, WorkerPlan
from pdbox.plan.memory import GIB, gib


@click.command()
@click.option("--profile", "profile_name", metavar="NAME|FILE",
              help="Built-in profile name or a profile file (default: as `pdbox up` picks).")
@click.option("--model", "model", metavar="DIR|ID",
              help="Plan for this model folder or hub id instead of the profile's. It is "
                   "served as the folder's name or the last part of the hub id, lowercased "
                   "(a hub-cache snapshot folder: its repository's name); the profile's "
                   "served_name stays only when DIR|ID is the profile's own model.")
@click.option("--gpu-memory-gib", type=click.FloatRange(min=1, max=4096), default=None,
              help="The GPU's memory, when planning for a card that is not here "
                   "(default: NVML, else the card the profile names).")
@click.option("--mix", "mix_text", metavar="RATE:PROMPT:OUTPUT",
              help="Also show the prefill/decode split this steady mix asks for (SM shares "
                   "on a GPU, cores on a CPU): requests per second, prompt tokens and answer "
                   "tokens, e.g. 4:2000:200. A P/D profile only.")
@click.option("--json", "as_json", is_flag=True, help="Print the plan as JSON.")
def plan(profile_name: str | None, model: str | None, gpu_memory_gib: float | None,
         mix_text: str | None, as_json: bool) -> None:
    """Show each worker's slice, vLLM argv and env, and its memory ledger.

    Exits 1, with one sentence, when the profile cannot fit; `pdbox up`
    refuses the same way. With no config.json of a built-in GPU profile's
    model at hand (no Hugging Face cache, no network), the plan uses the facts
    pdbox ships for it, and says so. --mix adds the split a steady request mix
    asks for, from the same needs the re-split loop weighs (docs/PD.md).
    """
    from pdbox.commands.up import choose_profile
    from pdbox.plan.make import make_plan

    try:
        profile = choose_profile(profile_name)
    except config.ProfileError as exc:
        click.echo(f"pdbox: {exc}", err=True)
        sys.exit(2)
    split = None
    if mix_text:
        from pdbox.plan.mix import MixError, parse_mix, split_for_mix

        try:
            split = split_for_mix(profile, parse_mix(mix_text))
        except MixError as exc:
            click.echo(f"pdbox: {exc}", err=True)
            sys.exit(2)
    total = int(gpu_memory_gib * GIB) if gpu_memory_gib else None
    try:
        result = make_plan(profile, model=model, gpu_total_bytes=total)
    except PlanError as exc:
        click.echo(f"pdbox: {exc}", err=True)
        sys.exit(1)
    if as_json:
        out = result.to_dict()
        if split is not None:
            out["mix"] = split.to_dict()
        click.echo(json.dumps(out, indent=2))
    else:
        click.echo(render(result))
        if split is not None:
            click.echo("\n" + "\n".join(split.lines()))
    refusal = result.refusal()
    if refusal:
        click.echo(f"pdbox: {refusal}", err=True)
        sys.exit(1)


def render(p: Plan) -> str:
    lines = [f"profile {p.profile}: {p.device}, {p.sharing}; model {p.model}"
             + (f", served as {p.served_name}" if p.served_name else "")]
    if p.facts:
        f = p.facts
        lines.append(
            f"  {f.name}: {f.num_layers} layers, {f.num_kv_heads} KV heads x {f.head_dim}, "
            f"{f.dtype}; weights {gib(f.weights_bytes)} (from {f.weights_from}"
            f"{', built-in table' if f.facts_from else ''}), "
            f"KV {f.kv_bytes_per_token()} bytes/token")
    if p.gpu_total_bytes:
        lines.append(f"  GPU memory {gib(p.gpu_total_bytes)} ({p.gpu_total_from})")
    for w in p.workers:
        lines += ["", *_worker_lines(w)]
    for n in p.notes:
        lines.append(f"note: {n}")
    lines.append("")
    lines.append("fits" if not p.problems else f"does not fit ({len(p.problems)} problem(s))")
    return "\n".join(lines)


def _worker_lines(w: WorkerPlan) -> list[str]:
    out = [f"{w.id} ({w.role}): {w.slice}"]
    if w.mps_memory_limit:
        out.append(f"  CUDA_MPS_PINNED_DEVICE_MEM_LIMIT={w.mps_memory_limit}")
    led = w.ledger
    if led is not None:
        out.append(f"  budget {gib(led.budget)}  [{w.budget_text}]")
        rows = [("weights", led.weights), ("activations", led.activations),
                ("CUDA graphs", led.cuda_graphs), ("runtime reserve", led.runtime_reserve),
                ("KV cache", led.kv_cache_bytes), ("unused", led.unused)]
        out += [f"    {name:<16}{gib(v):>12}" for name, v in rows if v or name == "KV cache"]
        out.append(f"    KV tokens {led.kv_tokens} ({led.kv_tokens // led.block_size} blocks of "
                   f"{led.block_size}); max_model_len {led.max_model_len}")
    out.append("  env: " + " ".join(f"{k}={shlex.quote(v)}" for k, v in w.env.items()
                                    if k != "PDBOX_WORKER_TUNING"))
    out.append("  argv: " + shlex.join(w.argv))
    return out
