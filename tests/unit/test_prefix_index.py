"""Block hashes and the two prefix indexes."""

from __future__ import annotations

import subprocess
import sys
import time

import pytest

from pdbox.router.prefix_index import ApproxIndex, PreciseIndex, block_hashes, chain_hash


def test_only_full_blocks_are_hashed() -> None:
    assert block_hashes(list(range(10)), 4) == block_hashes(list(range(8)), 4)
    assert len(block_hashes(list(range(10)), 4)) == 2
    assert block_hashes([1, 2, 3], 4) == []


def test_hashes_chain_on_the_prefix() -> None:
    a = block_hashes([1, 2, 3, 4, 5, 6, 7, 8], 4)
    b = block_hashes([9, 9, 9, 9, 5, 6, 7, 8], 4)
    assert a[0] != b[0]
    assert a[1] != b[1], "same block after a different prefix must hash differently"
    assert block_hashes([1, 2, 3, 4, 0, 0, 0, 0], 4)[0] == a[0]
    assert chain_hash(None, [1, 2, 3, 4]) == a[0]
    assert chain_hash(a[0], [5, 6, 7, 8]) == a[1]


def test_hashes_are_stable_across_processes() -> None:
    code = (
        "from pdbox.router.prefix_index import block_hashes;"
        "print(block_hashes(list(range(300)), 128))"
    )
    outs = {
        subprocess.run(
            [sys.executable, "-c", code], capture_output=True, text=True, check=True,
            env={"PYTHONHASHSEED": seed, "PATH": ""},
        ).stdout
        for seed in ("1", "2")
    }
    assert len(outs) == 1
    assert outs.pop().strip() == str(block_hashes(list(range(300)), 128))


def test_block_hashes_is_fast() -> None:
    prompt = list(range(512 * 80))
    start = time.perf_counter()
    for _ in range(200):
        block_hashes(prompt, 512)
    assert time.perf_counter() - start < 2.0


def test_approx_matches_leading_blocks_only() -> None:
    idx = ApproxIndex(100)
    h = block_hashes(list(range(40)), 4)
    idx.record("w0", h[:6])
    assert idx.match("w0", h) == 6
    assert idx.match("w1", h) == 0
    other = block_hashes([7] * 40, 4)
    assert idx.match("w0", other) == 0
    assert idx.match_all(["w0", "w1"], h) == {"w0": 6, "w1": 0}


def test_approx_is_bounded_and_evicts_tails_first() -> None:
    idx = ApproxIndex(8)
    old = block_hashes(list(range(24)), 4)  # 6 blocks
    new = block_hashes(list(range(100, 124)), 4)  # 6 more
    idx.record("w0", old)
    idx.record("w0", new)
    assert idx.size("w0") == 8
    assert idx.match("w0", new) == 6
    # The old prompt lost its tail blocks, not its head: its first 2 still match.
    assert idx.match("w0", old) == 2
    for i in range(50):
        idx.record("w0", block_hashes([i] * 40, 4))
    assert idx.size("w0") == 8
    idx.remove_worker("w0")
    assert idx.size("w0") == 0 and idx.match("w0", new) == 0


def stored(hashes, parent, tokens, size=4):
    return {"type": "BlockStored", "block_hashes": hashes, "parent_block_hash": parent,
            "token_ids": tokens, "block_size": size, "lora_id": None, "medium": "GPU"}


def test_precise_maps_engine_hashes_to_router_hashes() -> None:
    idx = PreciseIndex(block_size=4)
    tokens = list(range(16))
    idx.apply("w0", stored([b"e1", b"e2"], None, tokens[:8]))
    idx.apply("w0", stored([b"e3"], b"e2", tokens[8:12]))
    h = block_hashes(tokens, 4)
    assert idx.match("w0", h) == 3
    assert idx.size("w0") == 3
    idx.apply("w0", {"type": "BlockRemoved", "block_hashes": [b"e2"], "medium": "GPU"})
    assert idx.match("w0", h) == 1
    idx.apply("w0", {"type": "AllBlocksCleared"})
    assert idx.match("w0", h) == 0 and idx.size("w0") == 0


def test_precise_skips_blocks_with_unknown_parent() -> None:
    idx = PreciseIndex(block_size=4)
    idx.apply("w0", stored([11], 999, list(range(4, 8))))
    assert idx.size("w0") == 0 and idx.blocks_skipped == 1


def test_precise_ignores_other_block_sizes_and_groups() -> None:
    idx = PreciseIndex(block_size=4)
    idx.apply("w0", stored([1], None, list(range(8)), size=8))
    ev = stored([2], None, list(range(4)))
    ev["group_idx"] = 1
    idx.apply("w0", ev)
    assert idx.size("w0") == 0


def test_precise_shared_tokens_are_refcounted() -> None:
    # Two engine blocks with equal tokens (e.g. different cache salts) map to one router hash.
    idx = PreciseIndex(block_size=4)
    idx.apply("w0", stored([1], None, [1, 2, 3, 4]))
    idx.apply("w0", stored([2], None, [1, 2, 3, 4]))
    h = block_hashes([1, 2, 3, 4], 4)
    idx.apply("w0", {"type": "BlockRemoved", "block_hashes": [1]})
    assert idx.match("w0", h) == 1
    idx.apply("w0", {"type": "BlockRemoved", "block_hashes": [2]})
    assert idx.match("w0", h) == 0


def test_precise_is_bounded() -> None:
    idx = PreciseIndex(block_size=2, max_blocks_per_worker=5)
    tokens = list(range(40))
    idx.apply("w0", stored(list(range(20)), None, tokens, size=2))
    assert idx.size("w0") == 5


def test_bad_arguments() -> None:
    with pytest.raises(ValueError):
        block_hashes([1], 0)
    with pytest.raises(ValueError):
        ApproxIndex(0)


# ------------------------------------------------------------------ tokenizing

CHAT_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are helpful<|im_end|>\n' }}{% endif %}"
    "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def make_model_dir(tmp_path, template=CHAT_TEMPLATE, config_extra=None):
    import json

    from tokenizers import Tokenizer, models, pre_tokenizers, processors

    words = ["<unk>", "<s>", "<|im_start|>", "<|im_end|>", "system", "user", "assistant",
             "You", "are", "helpful", "hello", "there", "how", "is", "it", "\n"]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.add_special_tokens(["<|im_start|>", "<|im_end|>", "<s>"])
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()])
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    tok.save(str(tmp_path / "tokenizer.json"))
    cfg = {"bos_token": {"content": "<s>"}, "eos_token": "<|im_end|>",
           **({"chat_template": template} if template else {}), **(config_extra or {})}
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(cfg))
    return tmp_path


def test_prompt_tokenizer_renders_the_chat_template(tmp_path) -> None:
    from pdbox.router.tokenize import PromptTokenizer

    pt = PromptTokenizer.from_model_dir(make_model_dir(tmp_path))
    msgs = [{"role": "user", "content": "hello there"}]
    text = pt.render_chat(msgs)
    assert text == ("<|im_start|>system\nYou are helpful<|im_end|>\n"
                    "<|im_start|>user\nhello there<|im_end|>\n<|im_start|>assistant\n")
    ids = pt.encode_chat(msgs)
    assert ids[:2] == [2, 4] and ids[-2:] == [2, 6]  # no BOS: chat adds no special tokens
    # Content parts flatten to text, as vLLM does.
    parts = [{"role": "user", "content": [{"type": "text", "text": "hello there"}]}]
    assert pt.encode_chat(parts) == ids
    assert pt.encode_prompt("hello there") == [1, 10, 11]  # completions: BOS added
    # Conversations sharing a beginning share their leading blocks.
    longer = pt.encode_chat([*msgs, {"role": "assistant", "content": "how is it"},
                             {"role": "user", "content": "hello"}])
    assert block_hashes(longer, 4)[:3] == block_hashes(ids, 4)[:3]


def test_prompt_tokenizer_reads_template_file_and_named_templates(tmp_path) -> None:
    from pdbox.router.tokenize import PromptTokenizer

    d = make_model_dir(tmp_path, template=None)
    (d / "chat_template.jinja").write_text("{{ bos_token }}{{ messages[0]['content'] }}")
    pt = PromptTokenizer.from_model_dir(d)
    assert pt.render_chat([{"role": "user", "content": "hi"}]) == "<s>hi"
    d2 = tmp_path / "named"
    d2.mkdir()
    make_model_dir(d2, template=[{"name": "default", "template": "X{{ messages|length }}"}])
    assert PromptTokenizer.from_model_dir(d2).render_chat([{"role": "user"}]) == "X1"


def test_prompt_tokenizer_errors(tmp_path) -> None:
    from pdbox.router.tokenize import PromptTokenizer, TokenizerError

    with pytest.raises(TokenizerError, match="no fast tokenizer"):
        PromptTokenizer.from_model_dir(tmp_path)
    d = make_model_dir(tmp_path, template="{% if %}")
    with pytest.raises(TokenizerError, match="does not compile"):
        PromptTokenizer.from_model_dir(d).render_chat([])
    d = make_model_dir(tmp_path, template="{{ raise_exception('no system role') }}")
    import jinja2

    with pytest.raises(jinja2.TemplateError, match="no system role"):
        PromptTokenizer.from_model_dir(d).render_chat([])


def test_char_block_fallback() -> None:
    from pdbox.router.tokenize import CharBlockTokenizer

    ct = CharBlockTokenizer(chars_per_token=4)
    assert ct.block_size_for(128) == 512
    a = ct.encode_chat([{"role": "system", "content": "x" * 600}, {"role": "user", "content": "a"}])
    b = ct.encode_chat([{"role": "system", "content": "x" * 600}, {"role": "user", "content": "b"}])
    assert block_hashes(a, 512)[0] == block_hashes(b, 512)[0]
    assert list(ct.encode_prompt("ab")) == [97, 98]


def test_host_tier_blocks_count_less_than_device_blocks() -> None:
    """Offloaded blocks (medium "CPU") are cached, at HOST_TIER_WEIGHT of a device block."""
    from pdbox.router.prefix_index import HOST_TIER_WEIGHT

    idx = PreciseIndex(block_size=4)
    toks = list(range(12))
    idx.apply("w", stored([1, 2, 3], None, toks))
    want = block_hashes(toks, 4)
    assert idx.match("w", want) == 3
    # Block 3 is offloaded, then evicted from the device: it still counts, for less.
    idx.apply("w", {"type": "BlockStored", "block_hashes": [3], "parent_block_hash": 2,
                    "token_ids": toks[8:], "block_size": 4, "medium": "CPU"})
    idx.apply("w", {"type": "BlockRemoved", "block_hashes": [3], "medium": "GPU"})
    assert idx.match("w", want) == 2 + HOST_TIER_WEIGHT
    # Gone from the host tier too: only the device blocks count.
    idx.apply("w", {"type": "BlockRemoved", "block_hashes": [3], "medium": "CPU"})
    assert idx.match("w", want) == 2
    # A host block on a prefix the device never announced cannot be placed.
    assert idx.apply("w", {"type": "BlockStored", "block_hashes": [9], "parent_block_hash": 99,
                           "token_ids": [0, 0, 0, 0], "block_size": 4,
                           "medium": "CPU"}) == "parent block never announced"
    idx.remove_worker("w")
    assert idx.match("w", want) == 0


def test_array_encoded_block_stored_keeps_its_medium() -> None:
    from pdbox.router.kv_events import decode_event

    ev = decode_event(["BlockStored", [1], None, [0, 1, 2, 3], 4, None, "CPU", None])
    assert ev["medium"] == "CPU" and ev["block_size"] == 4
