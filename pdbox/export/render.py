"""YAML text of an export: one multi-document stream, or one file per object.

PyYAML is imported here only (it comes with vLLM and kubernetes-validate),
and lazily, so loading a profile never pays for it.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from pdbox.export import targets as T
from pdbox.export.ledger import Export

HEADER_MARK = "# pdbox export llm-d"
_OWN_FILE = re.compile(r"^\d\d-[a-z]+-[a-z0-9-]+\.yaml$")
WARNINGS_FILE = "warnings.txt"


def _dumper() -> type:
    import yaml

    class Dumper(yaml.SafeDumper):
        # Objects share small dicts (scorer weights, probes); write them out
        # in full rather than as YAML anchors, which many tools mishandle.
        def ignore_aliases(self, data: Any) -> bool:
            return True

    def text(dumper: yaml.SafeDumper, data: str) -> yaml.Node:
        # Multi-line strings (the scheduler config) as readable block literals.
        style = "|" if "\n" in data else None
        return dumper.represent_scalar("tag:yaml.org,2002:str", data, style=style)

    Dumper.add_representer(str, text)
    return Dumper


def dump(obj: Any) -> str:
    import yaml

    return yaml.dump(obj, Dumper=_dumper(), sort_keys=False, default_flow_style=False, width=100)


def config_text(cfg: dict[str, Any]) -> str:
    return dump(cfg)


def header(export: Export) -> str:
    lines = [
        f"{HEADER_MARK}: profile {export.profile}",
        f"# for llm-d-inference-scheduler {T.EPP_IMAGE.rsplit(':', 1)[1]}, "
        f"InferencePool {T.INFERENCE_POOL_API_VERSION}, Kubernetes {T.KUBERNETES_VERSION}+",
    ]
    if export.replicas_from_status:
        counts = ", ".join(f"{r} {n}" for r, n in export.replicas_from_status.items())
        lines.append(f"# replicas from the running pdbox: {counts}")
    if export.warnings:
        lines.append(f"# {len(export.warnings)} warning(s); see warnings.txt or stderr")
    return "\n".join(lines) + "\n"


def file_name(index: int, obj: dict[str, Any]) -> str:
    return f"{index:02d}-{obj['kind'].lower()}-{obj['metadata']['name']}.yaml"


def files(export: Export) -> dict[str, str]:
    """File name -> text, in apply order (kubectl applies a folder's files by name)."""
    head = header(export)
    out = {file_name(i, obj): head + dump(obj) for i, obj in enumerate(export.objects)}
    out[WARNINGS_FILE] = warnings_text(export)
    return out


def stream(export: Export) -> str:
    return header(export) + "".join("---\n" + dump(obj) for obj in export.objects)


def warnings_text(export: Export) -> str:
    if not export.warnings:
        return "no warnings\n"
    return "".join(f"warning: {w}\n" for w in export.warnings)


def write(export: Export, folder: Path) -> list[Path]:
    """Write one file per object; remove files a previous export left behind."""
    folder.mkdir(parents=True, exist_ok=True)
    for old in folder.iterdir():
        if _OWN_FILE.match(old.name) and _starts_with_mark(old):
            old.unlink()
    written = []
    for name, text in files(export).items():
        path = folder / name
        path.write_text(text, encoding="utf-8")
        written.append(path)
    return written


def _starts_with_mark(path: Path) -> bool:
    try:
        with path.open(encoding="utf-8") as f:
            return f.readline().startswith(HEADER_MARK)
    except (OSError, UnicodeDecodeError):
        return False
