"""Carry pip's configuration over to uv, or say why it cannot be carried.

uv reads none of pip's configuration, yet many boxes only reach packages
through it: a mirror (`index-url`), extra indexes, a local wheel folder
(`find-links`), a constraint file. scripts/setup.sh runs this with the venv's
python before it installs with uv:

    python scripts/pip_to_uv.py

Exit 0: stdout reproduces pip's package sources for uv, one item a line:
`arg<TAB>VALUE` is an argument of `uv pip install`, `env<TAB>NAME=VALUE` a
variable to export (uv reads its HTTP timeout and proxy only from there).
Exit 3: a setting pip would honour has no faithful uv equivalent; the reason is
on stderr and setup.sh installs with pip instead, so a box never gets packages
from somewhere its owner did not intend.

Only the standard library: it runs before anything is installed.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from collections.abc import Iterable, Mapping

# Settings that change only what pip prints or how it behaves as a program,
# never which files get installed: safe to drop.
COSMETIC = frozenset({
    "disable-pip-version-check", "no-color", "progress-bar", "quiet", "verbose", "no-input",
    "yes", "root-user-action", "require-virtualenv", "require-venv", "no-cache-dir",
    "cache-dir", "log", "log-file", "no-python-version-warning", "retries", "exists-action",
    "user-agent", "use-feature", "use-deprecated", "no-warn-script-location",
    "no-warn-conflicts", "python", "isolated", "keyring-provider", "format",
})
# pip's settings that take several values separated by whitespace.
MULTI = frozenset({"extra-index-url", "find-links", "constraint", "trusted-host"})
_LINE = re.compile(r"^(?P<section>[^.]*)\.(?P<key>[A-Za-z0-9_-]+)=(?P<value>.*)$")
_TRUE = {"1", "true", "yes", "on"}


class Uncarried(Exception):
    """A pip setting uv cannot honour the same way. str() is one sentence."""


def parse_config_list(text: str) -> dict[str, str]:
    """`pip config list` output -> effective settings for `pip install`.

    pip lets the environment (`:env:.`) override the `install` section, and that
    the `global` one; later lines of the same section win, as in pip.
    """
    rank = {"global": 0, "install": 1, ":env:": 2}
    best: dict[str, tuple[int, str]] = {}
    for raw in text.splitlines():
        m = _LINE.match(raw.strip())
        if not m or m["section"] not in rank:
            continue  # other commands' sections (download, wheel, ...) do not apply
        value = m["value"]
        if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
            value = value[1:-1]
        key = m["key"].replace("_", "-")
        level = rank[m["section"]]
        if key not in best or level >= best[key][0]:
            best[key] = (level, value)
    return {k: v for k, (_, v) in best.items()}


def _values(value: str) -> list[str]:
    return value.split()


def uv_settings(settings: Mapping[str, str]) -> tuple[list[str], dict[str, str]]:
    """uv `pip install` arguments and environment equivalent to pip's settings;
    Uncarried if one of them has no equivalent."""
    args: list[str] = []
    env: dict[str, str] = {}
    extra_indexes = False
    for key in sorted(settings):
        value = settings[key].strip()
        if key in COSMETIC or not value:
            continue
        if key == "index-url":
            args += ["--index-url", value]
        elif key == "extra-index-url":
            for url in _values(value):
                args += ["--extra-index-url", url]
                extra_indexes = True
        elif key == "find-links":
            for loc in _values(value):
                args += ["--find-links", loc]
        elif key == "constraint":
            for path in _values(value):
                args += ["--constraint", path]
        elif key == "no-index":
            if value.lower() in _TRUE:
                args.append("--no-index")
        elif key == "trusted-host":
            for host in _values(value):
                args += ["--allow-insecure-host", host]
        elif key == "cert":
            args += ["--cert", value]
        elif key in ("timeout", "default-timeout"):
            env["UV_HTTP_TIMEOUT"] = str(max(1, round(float(value))))
        elif key == "pre":
            if value.lower() in _TRUE:
                args += ["--prerelease", "allow"]
        elif key == "only-binary":
            args += ["--only-binary", value]
        elif key == "no-binary":
            args += ["--no-binary", value]
        elif key == "prefer-binary":
            continue  # uv already prefers wheels over source distributions
        elif key == "proxy":
            env["HTTPS_PROXY"] = env["HTTP_PROXY"] = value
        else:
            raise Uncarried(f"pip's setting {key}={value!r} has no uv equivalent here")
    if extra_indexes:
        # pip takes the best version across all its indexes; uv by default stops
        # at the first index that has the package. Keep pip's choice.
        args += ["--index-strategy", "unsafe-best-match"]
    return args, env


def pip_config_list(python: str) -> str:
    out = subprocess.run(
        [python, "-m", "pip", "config", "list"],
        capture_output=True, text=True, check=False,
        env={**os.environ, "PIP_DISABLE_PIP_VERSION_CHECK": "1"},
    )
    if out.returncode != 0:
        raise Uncarried(f"`pip config list` failed: {out.stderr.strip()[:200]}")
    return out.stdout


def main(argv: Iterable[str]) -> int:
    del argv
    try:
        args, env = uv_settings(parse_config_list(pip_config_list(sys.executable)))
    except (Uncarried, ValueError) as exc:
        print(str(exc), file=sys.stderr)
        return 3
    for arg in args:
        print(f"arg\t{arg}")
    for name, value in env.items():
        print(f"env\t{name}={value}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
