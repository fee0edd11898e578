"""A hub model's snapshot in the local Hugging Face cache, found by reading
the cache's folders: local files only, never the network.

The cache layout (huggingface_hub's file_download.py, and what vLLM's workers
write when they download a model):

    <hub cache>/models--<org>--<name>/refs/<revision>   the commit hash
    <hub cache>/models--<org>--<name>/snapshots/<commit>/<file>   (links into blobs/)

A file appears under snapshots/ only once its blob is complete (downloads go
to blobs/<hash>.incomplete first), so a file found there can be read.
Only the standard library, so the router and `pdbox plan` can use it freely.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path

_HUB_ID = re.compile(r"^[A-Za-z0-9_.\-]+/[A-Za-z0-9_.\-]+$")
_COMMIT = re.compile(r"^[0-9a-f]{40}$")


def is_hub_id(source: str) -> bool:
    return bool(_HUB_ID.match(source)) and not source.startswith((".", "/", "~"))


def hub_cache_dir(env: Mapping[str, str] | None = None) -> Path:
    """Where huggingface_hub keeps models, by its own order of precedence:
    HF_HUB_CACHE, the older HUGGINGFACE_HUB_CACHE, HF_HOME/hub, then
    $XDG_CACHE_HOME/huggingface/hub, then ~/.cache/huggingface/hub."""
    env = os.environ if env is None else env
    for key in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE"):
        if env.get(key):
            return Path(env[key]).expanduser()
    if env.get("HF_HOME"):
        return Path(env["HF_HOME"]).expanduser() / "hub"
    xdg = env.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "huggingface" / "hub"


def repo_folder(repo_id: str, cache_dir: Path | None = None) -> Path:
    return (cache_dir or hub_cache_dir()) / ("models--" + repo_id.replace("/", "--"))


def find_snapshot(
    repo_id: str,
    required: Sequence[str] = ("config.json",),
    *,
    revision: str = "main",
    cache_dir: Path | None = None,
) -> Path | None:
    """The snapshot folder of `repo_id` that holds every `required` file, or None.

    The revision's ref wins; without one (a cache copied from elsewhere, or a
    commit pinned by hash) the newest snapshot holding the files is taken.
    """
    if not is_hub_id(repo_id):
        return None
    repo = repo_folder(repo_id, cache_dir)
    snapshots = repo / "snapshots"
    if not snapshots.is_dir():
        return None
    candidates: list[Path] = []
    commit = revision if _COMMIT.match(revision) else _read_ref(repo / "refs" / revision)
    if commit:
        candidates.append(snapshots / commit)
    try:
        others = sorted((p for p in snapshots.iterdir() if p.is_dir()),
                        key=lambda p: p.stat().st_mtime, reverse=True)
    except OSError:
        others = []
    candidates += [p for p in others if p not in candidates]
    for snap in candidates:
        if all(_readable(snap / name) for name in required):
            return snap
    return None


def _read_ref(path: Path) -> str | None:
    try:
        text = path.read_text(encoding="utf-8").strip()
    except OSError:
        return None
    return text if _COMMIT.match(text) else None


def _readable(path: Path) -> bool:
    # is_file() follows the link into blobs/: a dangling link is not a file.
    try:
        return path.is_file() and os.access(path, os.R_OK)
    except OSError:
        return False
