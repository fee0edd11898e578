"""Where the plan finds a model's config.json, for every kind of model source.

- a local folder: its own config.json (and safetensors, for exact weights);
- a hub id: the snapshot in the local Hugging Face cache; `fetch=True` (what
  `pdbox up` does, as its workers are about to download the model anyway)
  downloads config.json alone when it is not there yet; failing both, the
  facts pdbox ships for the built-in profiles' models (`known_models`);
- the embedded model: its converted folder once it exists, else the facts
  pdbox ships for it (the model is fixed, so they cannot drift).
"""

from __future__ import annotations

import os
from pathlib import Path

from pdbox.plan.known_models import known_facts
from pdbox.plan.model_facts import FactsError, ModelFacts, facts_from_config, load_facts
from pdbox.workers import hub_cache

# config.json facts of the embedded model (HuggingFaceTB/SmolLM2-135M-Instruct),
# so the plan is complete before its first conversion.
EMBEDDED_CONFIGS: dict[str, dict[str, object]] = {
    "smollm2-135m-instruct": {
        "model_type": "llama", "hidden_size": 576, "intermediate_size": 1536,
        "num_hidden_layers": 30, "num_attention_heads": 9, "num_key_value_heads": 3,
        "vocab_size": 49152, "tie_word_embeddings": True, "attention_bias": False,
        "torch_dtype": "bfloat16",
    },
}


def facts_for_source(source: str, *, dtype: str | None = None, fetch: bool = False,
                     cache_dir: Path | None = None) -> ModelFacts:
    """The facts of a profile's `model.source` (or `--model DIR|ID`)."""
    source = source.strip()
    if source.startswith("embedded:"):
        name = source.split(":", 1)[1]
        from pdbox.workers.model import cache_folder  # no torch: paths only

        folder = cache_folder(name)
        if (folder / "config.json").is_file():
            return load_facts(folder, name, dtype)
        if name not in EMBEDDED_CONFIGS:
            raise FactsError(f"no facts for embedded model {name!r}")
        return facts_from_config(dict(EMBEDDED_CONFIGS[name]), name, None, dtype)
    if source.startswith(("/", "./", "../", "~")) or Path(source).is_dir():
        return load_facts(Path(source).expanduser(), dtype=dtype)
    if hub_cache.is_hub_id(source):
        snap = hub_cache.find_snapshot(source, ("config.json",), cache_dir=cache_dir)
        if snap is None and fetch:
            snap = _fetch_config(source, cache_dir)
        if snap is not None:
            return load_facts(snap, source, dtype)
        known = known_facts(source, dtype)
        if known is not None:
            return known
        raise FactsError(
            f"config.json of {source} is not in the local Hugging Face cache "
            f"({hub_cache.hub_cache_dir()}) and pdbox has no built-in facts for it; download "
            f"it with `hf download {source} config.json`, or give a model folder with --model")
    raise FactsError(f"{source!r} is neither embedded:NAME, a folder nor a hub id like org/name")


def _fetch_config(repo_id: str, cache_dir: Path | None) -> Path | None:
    """Download config.json alone into the hub cache; None when offline or failing."""
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes"):
        return None
    try:
        from huggingface_hub import hf_hub_download
    except ImportError:
        return None
    try:
        path = hf_hub_download(repo_id, "config.json",
                               cache_dir=str(cache_dir) if cache_dir else None)
    except Exception:  # noqa: BLE001 - any hub failure means "not available"
        return None
    return Path(path).parent
