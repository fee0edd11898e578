"""Pure logic must not pull in the TUI, torch or vLLM."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys

REQUIRED = (
    "pdbox.config",
    "pdbox.router.policy",
    "pdbox.router.prefix_index",
    "pdbox.router.admission",
    "pdbox.replay.routing",
)
OPTIONAL = ("pdbox.autoscaler", "pdbox.replay.autoscale")
FORBIDDEN = ("textual", "torch", "vllm")


def _present(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except ModuleNotFoundError:
        return False


def test_pure_modules_import_nothing_heavy() -> None:
    modules = [*REQUIRED, *(m for m in OPTIONAL if _present(m))]
    code = (
        "import importlib, json, sys\n"
        f"for m in {modules!r}:\n"
        "    importlib.import_module(m)\n"
        f"print(json.dumps(sorted(n for n in {FORBIDDEN!r} if n in sys.modules)))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True)
    assert json.loads(out.stdout) == []
