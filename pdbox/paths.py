"""Where pdbox keeps things: $PDBOX_HOME (default: the XDG cache folder)."""

from __future__ import annotations

import os
from pathlib import Path


def home() -> Path:
    env = os.environ.get("PDBOX_HOME")
    if env:
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(xdg) / "pdbox"


def models_dir() -> Path:
    """Converted models; PDBOX_MODELS_DIR lets several homes (e.g. tests) share one cache."""
    env = os.environ.get("PDBOX_MODELS_DIR")
    return Path(env).expanduser() if env else home() / "models"


def speeds_file() -> Path:
    """This machine's measured worker speeds (calibration), kept beside the model cache
    so that every home sharing the cache starts with them; PDBOX_SPEEDS_FILE overrides."""
    env = os.environ.get("PDBOX_SPEEDS_FILE")
    return Path(env).expanduser() if env else models_dir().parent / "speeds.json"


def run_dir() -> Path:
    """One running pdbox per PDBOX_HOME keeps its pid, ports and token here."""
    return home() / "run"
