"""scripts/pip_to_uv.py (pip's package sources carried over to uv) and the
stamp of scripts/setup.sh that makes a second run instant."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "scripts"))

import pip_to_uv  # noqa: E402

# What `pip config list` prints on this project's machines.
THIS_BOX = """\
:env:.cert='/etc/ssl/certs/ca-certificates.crt'
:env:.default-timeout='180'
:env:.disable-pip-version-check='1'
:env:.find-links='/opt/wheels'
global.cert='/etc/ssl/certs/ca-certificates.crt'
global.constraint='/etc/xdg/pip/constraints.txt'
global.extra-index-url='file:///opt/pypi/simple file:///opt/pypi-more/simple'
global.find-links='/opt/wheels'
"""


def test_this_box_carries_over_completely() -> None:
    args, env = pip_to_uv.uv_settings(pip_to_uv.parse_config_list(THIS_BOX))
    assert args == [
        "--cert", "/etc/ssl/certs/ca-certificates.crt",
        "--constraint", "/etc/xdg/pip/constraints.txt",
        "--extra-index-url", "file:///opt/pypi/simple",
        "--extra-index-url", "file:///opt/pypi-more/simple",
        "--find-links", "/opt/wheels",
        # pip picks the best version across indexes; uv must be told to.
        "--index-strategy", "unsafe-best-match",
    ]
    assert env == {"UV_HTTP_TIMEOUT": "180"}


def test_environment_beats_install_section_beats_global() -> None:
    text = (
        "global.index-url='https://global.example/simple'\n"
        "install.index-url='https://install.example/simple'\n"
        "global.find-links='/a'\n"
        ":env:.find-links='/b /c'\n"
        "download.index-url='https://ignored.example/simple'\n"
    )
    settings = pip_to_uv.parse_config_list(text)
    assert settings == {"index-url": "https://install.example/simple", "find-links": "/b /c"}
    args, _ = pip_to_uv.uv_settings(settings)
    assert args == ["--find-links", "/b", "--find-links", "/c",
                    "--index-url", "https://install.example/simple"]


def test_mirror_only_keeps_uv_default_strategy() -> None:
    args, env = pip_to_uv.uv_settings({"index-url": "https://mirror/simple", "no-index": "false",
                                       "trusted-host": "mirror", "quiet": "1"})
    assert args == ["--index-url", "https://mirror/simple", "--allow-insecure-host", "mirror"]
    assert env == {}


def test_unknown_setting_falls_back_to_pip() -> None:
    with pytest.raises(pip_to_uv.Uncarried, match="require-hashes"):
        pip_to_uv.uv_settings({"require-hashes": "true"})


def test_main_prints_tab_separated_items(monkeypatch, capsys) -> None:
    monkeypatch.setattr(pip_to_uv, "pip_config_list", lambda python: THIS_BOX)
    assert pip_to_uv.main([]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert "arg\t--find-links" in lines and "env\tUV_HTTP_TIMEOUT=180" in lines


def test_main_exits_3_with_one_sentence(monkeypatch, capsys) -> None:
    monkeypatch.setattr(pip_to_uv, "pip_config_list", lambda python: "global.client-cert='/k'\n")
    assert pip_to_uv.main([]) == 3
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "client-cert" in err


def _fake_repo(tmp_path: Path) -> Path:
    """The three stamp inputs and a venv that looks installed."""
    repo = tmp_path / "repo"
    (repo / "scripts").mkdir(parents=True)
    for rel in ("pyproject.toml", "scripts/setup.sh", "scripts/pip_to_uv.py"):
        shutil.copy(REPO / rel, repo / rel)
    (repo / ".venv" / "bin").mkdir(parents=True)
    (repo / ".venv" / "bin" / "pdbox").write_text("#!/bin/sh\n")
    (repo / ".venv" / "bin" / "pdbox").chmod(0o755)
    return repo


def _stamp(repo: Path, extras: str) -> None:
    out = subprocess.run(
        "cat pyproject.toml scripts/setup.sh scripts/pip_to_uv.py | sha256sum",
        shell=True, cwd=repo, capture_output=True, text=True, check=True)
    (repo / ".venv" / ".pdbox-stamp").write_text(f"{out.stdout.split()[0]}\n{extras}\n")


@pytest.mark.parametrize(("stamped", "args"), [("cpu", []), ("cpu,dev", []),
                                               ("cpu,dev", ["--dev"])])
def test_stamp_makes_a_second_run_instant(tmp_path: Path, stamped: str, args: list[str]) -> None:
    repo = _fake_repo(tmp_path)
    _stamp(repo, stamped)
    env = {k: v for k, v in os.environ.items() if k != "PDBOX_EXTRAS"}
    # A missing python would make any real install attempt fail loudly.
    env["PYTHON"] = "/nonexistent/python"
    t0 = time.monotonic()
    done = subprocess.run(["bash", "scripts/setup.sh", *args], cwd=repo, env=env,
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert done.stderr == ""
    assert time.monotonic() - t0 < 2


def test_stamp_without_dev_extra_installs_for_test_sh(tmp_path: Path) -> None:
    repo = _fake_repo(tmp_path)
    _stamp(repo, "cpu")
    # A venv python that fails everything: the install must be attempted (and
    # fail) rather than skipped, and nothing real gets installed.
    fake = repo / ".venv" / "bin" / "python"
    fake.write_text("#!/bin/sh\nexit 1\n")
    fake.chmod(0o755)
    env = {k: v for k, v in os.environ.items() if k not in ("PDBOX_EXTRAS", "PDBOX_NO_UV")}
    env["PATH"] = "/usr/bin:/bin"  # no uv on it
    done = subprocess.run(["/bin/bash", "scripts/setup.sh", "--dev"], cwd=repo, env=env,
                          capture_output=True, text=True)
    assert done.returncode != 0
    assert "installing pdbox[cpu,dev]" in done.stderr


def test_bad_argument_is_one_sentence(tmp_path: Path) -> None:
    repo = _fake_repo(tmp_path)
    done = subprocess.run(["bash", "scripts/setup.sh", "--prod"], cwd=repo,
                          capture_output=True, text=True)
    assert done.returncode == 2 and done.stderr.startswith("usage:")
