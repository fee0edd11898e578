"""The plan of a profile on this machine: the model's facts and the card's
size found where they are, then `build_plan`. Shared by `pdbox plan` and the
check `pdbox up` makes before it starts anything."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

from pdbox.config import Profile
from pdbox.hardware.dtype import resolve as resolve_dtype
from pdbox.plan.build import Plan, PlanError, build_plan
from pdbox.plan.model_facts import FactsError, ModelFacts
from pdbox.plan.sources import facts_for_source


def model_arg_for(source: str) -> str:
    """What the worker's --model will be: a folder's absolute path, a hub id
    as is, the embedded model's cache folder."""
    source = source.strip()
    if source.startswith("embedded:"):
        from pdbox.workers.model import cache_folder

        return str(cache_folder(source.split(":", 1)[1]))
    if source.startswith(("/", "./", "../", "~")) or Path(source).is_dir():
        return str(Path(source).expanduser().resolve())
    return source


def same_model(a: str, b: str) -> bool:
    """Whether two model sources name one model (hub ids whatever their case)."""
    a, b = a.strip(), b.strip()
    if a.startswith("embedded:") or b.startswith("embedded:"):
        return a == b
    arg_a, arg_b = model_arg_for(a), model_arg_for(b)
    return arg_a == arg_b or (not arg_a.startswith("/") and arg_a.casefold() == arg_b.casefold())


def derived_served_name(source: str) -> str:
    """The name a model is served as when nobody chose one: a folder's name or
    the last part of a hub id, lowercased. A snapshot folder of the hub cache
    (models--ORG--NAME/snapshots/COMMIT) is named after its repository, not
    its commit."""
    source = source.strip()
    if source.startswith("embedded:"):
        name = source.split(":", 1)[1]
    elif source.startswith(("/", "./", "../", "~")) or Path(source).is_dir():
        folder = Path(source).expanduser().resolve()
        repo = folder.parent.parent.name
        if folder.parent.name == "snapshots" and repo.startswith("models--"):
            # The hub writes ORG/NAME as models--ORG--NAME and allows no "--" in either.
            name = repo.split("--")[-1]
        else:
            name = folder.name
    else:
        name = source.rstrip("/").rsplit("/", 1)[-1]
    # What config.py accepts in model.served_name.
    name = re.sub(r"[^a-z0-9_.:\-]+", "-", name.lower()).strip("-")
    return name or "model"


def served_name_for(profile: Profile, model: str | None) -> str:
    """The profile's served_name while it serves the profile's own model; for
    another one (`--model`), derived from that model: a served_name set for one
    model would be a wrong name for another."""
    if model is None or same_model(model, profile.model.source):
        return profile.model.served_name
    return derived_served_name(model)


def gpu_total_from_nvml(profile: Profile) -> int | None:
    """The card's memory as NVML reports it, or None with no GPU at hand."""
    from pdbox.hardware.nvml import default_telemetry

    gpu = default_telemetry()
    if not gpu.available():
        return None
    try:
        total = gpu.devices()[profile.hardware.gpu_index].memory_total_bytes
    except (IndexError, AttributeError):
        return None
    return int(total) if total == total and total else None  # NA is NaN


def make_plan(
    profile: Profile,
    *,
    model: str | None = None,
    gpu_total_bytes: int | None = None,
    fetch: bool = False,
    ask_nvml: bool = True,
) -> Plan:
    """`model` overrides the profile's source; `gpu_total_bytes` the card's
    size (else NVML, else the card the profile names). Raises PlanError when
    the model's facts cannot be had on a GPU profile, where the memory plan
    is what makes the workers start at all."""
    # The dtype the workers will run in here: "auto" is settled by the CPU's
    # flags (or left to vLLM on a GPU), as `pdbox up` settles it.
    profile, dtype_choice = resolve_dtype(profile)
    source = model or profile.model.source
    served = served_name_for(profile, model)
    if source != profile.model.source or served != profile.model.served_name:
        profile = dataclasses.replace(profile, model=dataclasses.replace(
            profile.model, source=source, served_name=served))
    facts: ModelFacts | None = None
    note = ""
    try:
        facts = facts_for_source(source, dtype=profile.model.dtype, fetch=fetch)
    except FactsError as exc:
        if profile.hardware.device == "cuda":
            raise PlanError(f"{profile.name}: cannot plan GPU memory: {exc}") from None
        note = f"no memory ledger: {exc}"
    origin = "--gpu-memory-gib" if gpu_total_bytes else ""
    if profile.hardware.device == "cuda" and gpu_total_bytes is None and ask_nvml:
        gpu_total_bytes = gpu_total_from_nvml(profile)
        origin = "NVML" if gpu_total_bytes else ""
    from pdbox import paths

    plan = build_plan(profile, facts, model_arg=model_arg_for(source),
                      gpu_total_bytes=gpu_total_bytes, gpu_total_from=origin,
                      run_dir=paths.run_dir())
    if note:
        plan.notes.append(note)
    if facts is not None and facts.facts_from:
        plan.notes.append(f"model facts of {facts.name} from {facts.facts_from}: its "
                          "config.json is not in the local Hugging Face cache")
    plan.notes.append(f"dtype {dtype_choice.dtype}: {dtype_choice.reason}")
    if dtype_choice.warning:
        plan.notes.append(f"warning: {dtype_choice.warning}")
    return plan
