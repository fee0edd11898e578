"""A hub model's tokenizer from a local snapshot folder laid out like the
Hugging Face cache (refs/main, snapshots/<commit>/ links into blobs/), with
character routing and an event until it exists. No network anywhere."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from pdbox import config
from pdbox.router.backends import Registry
from pdbox.router.tokenize import ApproxTokenizer, HubTokenizer, tokenizer_for_model
from pdbox.workers.hub_cache import find_snapshot, hub_cache_dir, repo_folder

REPO = "Qwen/Qwen2.5-7B-Instruct"
COMMIT = "a" * 40
TEMPLATE = "{% for m in messages %}{{ m['role'] }} {{ m['content'] }} {% endfor %}"


class Clock:
    def __init__(self) -> None:
        self.t = 100.0

    def __call__(self) -> float:
        return self.t


def _tokenizer_json() -> str:
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"[UNK]": 0, "hello": 1, "world": 2, "user": 3, "assistant": 4}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return tok.to_str()


def lay_out_snapshot(cache: Path, repo: str = REPO, commit: str = COMMIT,
                     files: dict[str, str] | None = None) -> Path:
    """A snapshot as huggingface_hub writes it: content in blobs/, links in
    snapshots/<commit>/, the commit in refs/main."""
    files = files if files is not None else {
        "tokenizer.json": _tokenizer_json(),
        "tokenizer_config.json": json.dumps({"chat_template": TEMPLATE, "eos_token": "world"}),
        "config.json": (Path(__file__).parents[1] / "fixtures" / "models"
                        / "qwen2.5-7b-instruct" / "config.json").read_text(),
    }
    root = repo_folder(repo, cache)
    snap = root / "snapshots" / commit
    (root / "blobs").mkdir(parents=True, exist_ok=True)
    snap.mkdir(parents=True, exist_ok=True)
    (root / "refs").mkdir(exist_ok=True)
    (root / "refs" / "main").write_text(commit)
    for i, (name, text) in enumerate(files.items()):
        blob = root / "blobs" / f"{i:040x}"
        blob.write_text(text)
        os.symlink(os.path.relpath(blob, snap), snap / name)
    return snap


@pytest.fixture()
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    hub = tmp_path / "hub"
    hub.mkdir()
    monkeypatch.setenv("HF_HUB_CACHE", str(hub))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return hub


# ---------------------------------------------------------------- the cache


def test_cache_dir_follows_huggingface_hub_precedence(tmp_path: Path) -> None:
    assert hub_cache_dir({"HF_HUB_CACHE": "/a", "HF_HOME": "/b"}) == Path("/a")
    assert hub_cache_dir({"HUGGINGFACE_HUB_CACHE": "/c", "HF_HOME": "/b"}) == Path("/c")
    assert hub_cache_dir({"HF_HOME": "/b", "XDG_CACHE_HOME": "/x"}) == Path("/b/hub")
    assert hub_cache_dir({"XDG_CACHE_HOME": "/x"}) == Path("/x/huggingface/hub")
    assert hub_cache_dir({}) == Path.home() / ".cache" / "huggingface" / "hub"


def test_snapshot_found_by_ref_and_only_with_its_files(cache: Path) -> None:
    assert find_snapshot(REPO) is None
    snap = lay_out_snapshot(cache)
    assert find_snapshot(REPO, ("tokenizer.json",)) == snap
    assert find_snapshot(REPO, ("tokenizer.json", "model.safetensors")) is None
    assert find_snapshot("Other/model") is None
    assert find_snapshot("../../etc") is None


def test_a_link_whose_blob_is_still_downloading_is_not_found(cache: Path) -> None:
    snap = lay_out_snapshot(cache, files={"config.json": "{}"})
    os.symlink("../../blobs/missing", snap / "tokenizer.json")  # the .incomplete stage
    assert find_snapshot(REPO, ("tokenizer.json",)) is None


def test_a_snapshot_without_ref_is_still_found(cache: Path) -> None:
    snap = lay_out_snapshot(cache)
    (repo_folder(REPO, cache) / "refs" / "main").unlink()
    assert find_snapshot(REPO, ("tokenizer.json",)) == snap


def test_resolve_model_hands_the_router_the_snapshot(cache: Path) -> None:
    from pdbox.workers.model import resolve_model

    assert resolve_model(REPO, progress=False).tokenizer_dir is None
    snap = lay_out_snapshot(cache)
    resolved = resolve_model(REPO, progress=False)
    assert resolved.tokenizer_dir == snap and resolved.model_arg == REPO


# ------------------------------------------------------- the hub tokenizer


def test_characters_until_the_snapshot_then_the_real_tokenizer(cache: Path) -> None:
    events: list[str] = []
    clock = Clock()
    tok = HubTokenizer(REPO, on_event=events.append, clock=clock, recheck_s=5.0)
    assert tok.source == "characters"
    assert len(events) == 1 and events[0].startswith("routing by characters: the tokenizer of "
                                                     f"{REPO} is not in the local")
    # About a token per id, so the router's block size stays vLLM's.
    assert tok.units_per_token == 1.0 and tok.block_size_for(16) == 16
    assert len(tok.encode_prompt("hello world!")) == 3  # 12 characters / 4
    assert tok.has_chat_template is False

    lay_out_snapshot(cache)
    clock.t += 1.0  # before the recheck: still characters, and no stat storm
    assert tok.source == "characters" and len(tok.encode_prompt("hello world")) == 3
    clock.t += 5.0
    assert list(tok.encode_prompt("hello world")) == [1, 2]
    assert tok.source == "model" and tok.has_chat_template
    assert list(tok.encode_chat([{"role": "user", "content": "hello"}])) == [3, 1]
    assert len(events) == 2 and "loaded from the local Hugging Face cache" in events[1]
    assert tok.state()["source"] == "model"


def test_snapshot_already_there_loads_at_once(cache: Path) -> None:
    lay_out_snapshot(cache)
    events: list[str] = []
    tok = HubTokenizer(REPO, on_event=events.append)
    assert tok.source == "model" and list(tok.encode_prompt("world")) == [2]
    assert len(events) == 1 and "loaded" in events[0]


def test_a_broken_tokenizer_is_reported_once_and_routing_goes_on(cache: Path) -> None:
    lay_out_snapshot(cache, files={"tokenizer.json": "{ not a tokenizer"})
    events: list[str] = []
    clock = Clock()
    tok = HubTokenizer(REPO, on_event=events.append, clock=clock, recheck_s=1.0)
    for _ in range(3):
        clock.t += 2.0
        assert len(tok.encode_prompt("hello world")) == 3
    cannot = [e for e in events if "cannot be loaded" in e]
    assert len(cannot) == 1 and "still routing by characters" in cannot[0]
    assert tok.source == "characters"


def test_tokenizer_for_model_picks_by_source(cache: Path, tmp_path: Path) -> None:
    events: list[str] = []
    assert isinstance(tokenizer_for_model(REPO, None, on_event=events.append), HubTokenizer)
    assert events and "routing by characters" in events[0]
    bad = tmp_path / "bad"
    bad.mkdir()
    events.clear()
    got = tokenizer_for_model(str(bad), bad, on_event=events.append)
    assert isinstance(got, ApproxTokenizer) and "tokenizer unavailable" in events[0]
    assert got.units_per_token == 1.0 and got.block_size_for(16) == 16
    snap = lay_out_snapshot(cache)
    assert tokenizer_for_model(REPO, snap).encode_prompt("hello") == [1]


def test_router_block_size_is_vllms_and_kv_events_apply(cache: Path) -> None:
    """With a hub model on a GPU profile the router hashes 16-token blocks,
    as vLLM's KV events do, before and after the real tokenizer arrives."""
    from pdbox.router.app import Router

    p = config.load("gh200-pd")
    clock = Clock()
    tok = HubTokenizer(REPO, clock=clock)
    router = Router(p, Registry(), tok, [p.model.served_name])
    assert router.block_size == p.model.block_size == 16
    assert router.units == 1.0
    assert router.precise is not None and router.precise.block_size == 16
    router.precise.apply("decode-0", {
        "type": "BlockStored", "block_hashes": [7], "parent_block_hash": None,
        "token_ids": list(range(16)), "block_size": 16})
    assert router.precise.size("decode-0") == 1
    lay_out_snapshot(cache)
    clock.t += 10
    tok.encode_prompt("hello")
    assert tok.source == "model" and router.block_size == 16


def test_pdbox_up_uses_the_hub_tokenizer_and_says_so(cache: Path, tmp_path: Path) -> None:
    """The appliance's own path: a profile naming a hub model routes by characters with an
    event (and says so in status) until the snapshot exists, then by the model's tokens."""
    import asyncio
    import dataclasses

    from pdbox import config
    from pdbox.appliance import Appliance

    base = config.load("gh200-pd")
    profile = dataclasses.replace(base, model=dataclasses.replace(base.model, source=REPO))
    app = Appliance(profile, tmp_path / "run")
    tok = asyncio.run(app._prepare_model())
    assert app.model_path == REPO
    assert any(e["kind"] == "router" and "routing by characters" in e["message"]
               for e in app.events)
    assert tok.state()["source"] == "characters"
    lay_out_snapshot(cache)
    tok.refresh()
    assert tok.state() == {"source": "model", "model": REPO,
                                     "detail": tok.detail}
    assert list(tok.encode_prompt("hello world")) == [1, 2]
