"""Benchmark setups: a profile plus changes, written as a profile file of its own.

A setup is given on the command line as

    [LABEL:]PROFILE[,ITEM,...]

PROFILE is a built-in profile name or a profile file. Each ITEM is either

- a vLLM flag, `--name[=value]` or `--name value` (added to the profile's
  `[engine] extra_args`, checked by the same rules as a profile's own), or
- a profile key, `section.key=value` (a TOML value; a bare word is a string).

Commas inside brackets, braces or quotes do not split. LABEL names the setup
in the results (default: the profile's name, numbered if it repeats). E.g.

    cpu-aggregated,--max-num-batched-tokens=256
    fixed-pd:cpu-tiny,router.soft_roles=false

`profiles/*.toml` are never edited: each setup is written as a new file.
"""

from __future__ import annotations

import re
import shlex
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pdbox import config
from pdbox.commands.profiles import _as_toml  # the profile files' own TOML shape

_LABEL = re.compile(r"^([A-Za-z0-9_.+-]+):(?!//)(.+)$")
_KEY = re.compile(r"^([a-z_][a-z0-9_]*(?:\.[a-z_][a-z0-9_]*)+)=(.*)$", re.S)


class SetupError(ValueError):
    """A setup that cannot be used; str() is the one sentence shown."""


@dataclass(frozen=True)
class Setup:
    label: str
    profile: str  # built-in name or file
    overrides: tuple[tuple[str, Any], ...] = ()  # (section.key, value)
    vllm_args: tuple[str, ...] = ()
    spec: str = ""  # as given


@dataclass
class Materialized:
    setup: Setup
    file: Path
    profile: config.Profile
    notes: list[str] = field(default_factory=list)


def split_items(text: str) -> list[str]:
    """Split on commas outside (), [], {} and quotes."""
    items, cur, depth, quote = [], "", 0, ""
    for ch in text:
        if quote:
            quote = "" if ch == quote else quote
        elif ch in "\"'":
            quote = ch
        elif ch in "([{":
            depth += 1
        elif ch in ")]}":
            depth = max(0, depth - 1)
        elif ch == "," and depth == 0:
            items.append(cur.strip())
            cur = ""
            continue
        cur += ch
    items.append(cur.strip())
    return [i for i in items if i]


def toml_value(text: str) -> Any:
    """A TOML literal ("false", "256", '"x"', "[1, 2]"); anything else is a string."""
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text.strip()


def parse(spec: str, presets: Mapping[str, str] | None = None) -> Setup:
    """One setup from its command-line text. A PROFILE that names a preset
    (a workload's named setups, e.g. `aggregated`) stands for the preset's text."""
    text = spec.strip()
    if not text:
        raise SetupError("a setup is empty; give a profile name or file")
    label = ""
    m = _LABEL.match(text)
    if m and not Path(text).exists():
        label, text = m.group(1), m.group(2)
    items = split_items(text)
    if not items:
        raise SetupError(f"setup {spec!r} names no profile")
    head, rest = items[0], items[1:]
    presets = presets or {}
    if head in presets and head not in config.builtin_names():
        label = label or head
        pre = split_items(presets[head])
        head, rest = pre[0], pre[1:] + rest
    overrides: list[tuple[str, Any]] = []
    vllm: list[str] = []
    for item in rest:
        if item.startswith("-"):
            try:
                vllm += shlex.split(item)
            except ValueError as exc:
                raise SetupError(f"setup {spec!r}: cannot read {item!r} ({exc})") from None
            continue
        km = _KEY.match(item)
        if not km:
            raise SetupError(f"setup {spec!r}: {item!r} is neither a vLLM flag (--name[=value]) "
                             "nor a profile key (section.key=value)")
        overrides.append((km.group(1), toml_value(km.group(2))))
    return Setup(label or Path(head).stem, head, tuple(overrides), tuple(vllm), spec)


def unique_labels(setups: list[Setup]) -> list[Setup]:
    """Number repeated labels (cpu-tiny, cpu-tiny#2): results are keyed by label."""
    seen: dict[str, int] = {}
    out = []
    for s in setups:
        n = seen[s.label] = seen.get(s.label, 0) + 1
        out.append(s if n == 1 else Setup(f"{s.label}#{n}", s.profile, s.overrides,
                                          s.vllm_args, s.spec))
    return out


def apply(data: dict[str, Any], key: str, value: Any) -> None:
    """Set `section.key` (or a deeper dotted key) in a profile's TOML data."""
    parts = key.split(".")
    node = data
    for p in parts[:-1]:
        nxt = node.setdefault(p, {})
        if not isinstance(nxt, dict):
            raise SetupError(f"{key}: {p} is a value, not a table")
        node = nxt
    node[parts[-1]] = value


def variant_text(base_file: Path, name: str, overrides: list[tuple[str, Any]],
                 vllm_args: tuple[str, ...] = ()) -> str:
    data = tomllib.loads(base_file.read_text(encoding="utf-8"))
    data["name"] = name
    data.setdefault("description", f"benchmark variant of {base_file.stem}")
    for key, value in overrides:
        apply(data, key, value)
    if vllm_args:
        engine = data.setdefault("engine", {})
        engine["extra_args"] = [*engine.get("extra_args", []), *vllm_args]
    # Top-level keys first, as TOML requires before any table.
    ordered = {k: v for k, v in data.items() if not isinstance(v, dict)}
    ordered.update({k: v for k, v in data.items() if isinstance(v, dict)})
    return _as_toml(ordered) + "\n"


def materialize(setup: Setup, folder: Path, autoscale: bool = False) -> Materialized:
    """Write the setup's profile into `folder` and load it (which checks it)."""
    try:
        base = config.load(setup.profile)
    except config.ProfileError as exc:
        raise SetupError(f"setup {setup.label!r}: {exc}") from None
    overrides: list[tuple[str, Any]] = []
    if not autoscale:
        # A fixed worker count: the setups compare splits, not the autoscaler.
        overrides.append(("autoscaler.enabled", False))
    overrides += list(setup.overrides)
    safe = re.sub(r"[^A-Za-z0-9_.-]", "_", setup.label)
    path = folder / f"{safe}.toml"
    path.write_text(variant_text(Path(base.source_file), setup.label, overrides,
                                 setup.vllm_args))
    try:
        prof = config.load_file(path)
    except config.ProfileError as exc:
        where = f"{exc.key}: " if exc.key else ""
        raise SetupError(f"setup {setup.label!r}: {where}{exc.message}") from None
    return Materialized(setup, path, prof)


def write_variant(tmp: Path, base: str, name: str, overrides: dict[str, str]) -> Path:
    """A copy of a built-in profile with `section.key = value` set (TOML literals),
    keys and sections added where the base leaves them to their defaults."""
    path = tmp / f"{name}.toml"
    path.write_text(variant_text(config.BUILTIN_DIR / f"{base}.toml", name,
                                 [(k, toml_value(v)) for k, v in overrides.items()]))
    return path


NO_AUTOSCALER = {"autoscaler.enabled": "false"}
