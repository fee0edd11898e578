"""`pdbox profiles list | show | validate` through click's runner."""

from __future__ import annotations

import json
import tomllib
from pathlib import Path

import pytest
from click.testing import CliRunner

from pdbox import config
from pdbox.cli import main
from pdbox.commands import profiles as cmd


@pytest.fixture(autouse=True)
def no_gpu(monkeypatch: pytest.MonkeyPatch) -> None:
    """The default profile depends on the GPU; these tests pin "none"."""
    monkeypatch.setattr(cmd, "_default_name", lambda: config.default_profile_name(None))


def run(*args: str):
    return CliRunner().invoke(main, ["profiles", *args])


def test_list_marks_the_default() -> None:
    res = run("list")
    assert res.exit_code == 0, res.output
    lines = res.stdout.splitlines()
    assert len(lines) == len(config.builtin_names())
    assert any(ln.startswith("* cpu-tiny ") for ln in lines)
    assert all(ln.startswith("  ") for ln in lines if "cpu-tiny" not in ln)


def test_list_json() -> None:
    res = run("list", "--json")
    rows = json.loads(res.stdout)
    assert [r["name"] for r in rows] == config.builtin_names()
    by_name = {r["name"]: r for r in rows}
    assert by_name["cpu-tiny"]["default"] is True and by_name["cpu-tiny"]["mode"] == "pd"
    assert by_name["h100-pd"]["device"] == "cuda"
    assert all(r["valid"] for r in rows)


def test_show_json_has_tables_as_objects() -> None:
    res = run("show", "cpu-tiny", "--json")
    assert res.exit_code == 0
    d = json.loads(res.stdout)
    assert d["name"] == "cpu-tiny"
    assert d["decode"]["max"] == 2 and d["decode"]["cores"] == ["1"]
    assert d["router"]["weights"]["prefix"] == 3.0
    assert d["model"]["source"] == "embedded:smollm2-135m-instruct"


def test_show_text_is_a_loadable_profile(tmp_path: Path) -> None:
    res = run("show", "gh200-pd")
    assert res.exit_code == 0
    assert tomllib.loads(res.stdout)["prefill"]["sm_percent"] == 60
    saved = tmp_path / "copy.toml"
    saved.write_text(res.stdout)
    again = config.load(str(saved))
    assert again.to_dict() == config.load("gh200-pd").to_dict()


def test_show_a_file(tmp_path: Path) -> None:
    f = tmp_path / "mine.toml"
    f.write_text((config.BUILTIN_DIR / "cpu-aggregated.toml").read_text())
    res = run("show", str(f), "--json")
    assert res.exit_code == 0 and json.loads(res.stdout)["mode"]["kind"] == "aggregated"


def test_show_unknown_name_exits_2() -> None:
    res = run("show", "cpu-tinny")
    assert res.exit_code == 2
    assert "did you mean 'cpu-tiny'?" in res.output and "Traceback" not in res.output


def test_validate_ok() -> None:
    res = run("validate", str(config.BUILTIN_DIR / "cpu-tiny.toml"))
    assert res.exit_code == 0
    assert "ok: cpu-tiny, cpu, pd" in res.stdout


def test_validate_bad_file_is_one_line_and_exit_2(tmp_path: Path) -> None:
    f = tmp_path / "bad.toml"
    text = (config.BUILTIN_DIR / "cpu-tiny.toml").read_text().replace("max = 2", "maxx = 2")
    f.write_text(text)
    line = next(i for i, ln in enumerate(text.splitlines(), 1) if "maxx" in ln)
    res = run("validate", str(f))
    assert res.exit_code == 2
    assert res.output == f"Error: {f}:{line}: decode.maxx: unknown key (did you mean 'max'?)\n"


def test_validate_bad_toml(tmp_path: Path) -> None:
    f = tmp_path / "broken.toml"
    f.write_text("[model\nsource = 1\n")
    res = run("validate", str(f))
    assert res.exit_code == 2 and f"{f}:1: not valid TOML" in res.output
    assert res.output.count("\n") == 1


def test_validate_missing_file(tmp_path: Path) -> None:
    res = run("validate", str(tmp_path / "nope.toml"))
    assert res.exit_code == 2 and "no such profile file" in res.output


def test_default_name_survives_a_broken_nvml(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.undo()
    import pdbox.hardware.nvml as nvml

    def boom():
        raise RuntimeError("driver exploded")

    monkeypatch.setattr(nvml, "default_telemetry", boom)
    assert cmd._default_name() == "cpu-tiny"
