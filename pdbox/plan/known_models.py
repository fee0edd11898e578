"""Facts of the models the built-in GPU profiles serve, kept in pdbox itself.

`pdbox plan --profile gh200-pd` is how one sizes a box before having it: no
Hugging Face cache, maybe no network. So the few config.json keys the plan
reads, and the weights' size, ship here for each built-in profile's default
model. A real config.json (a model folder, or the local hub cache) always
wins over these; the plan says when it used them.

Where each figure comes from: the config.json keys are copied from the
model's config.json on the hub; `weights_bytes` is `metadata.total_size` of
its model.safetensors.index.json. For a dense model, parameter_count() of the
config times the dtype's bytes gives the same number (test_plan.py checks it),
so the two sources agree with each other.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass

from pdbox.plan.model_facts import ModelFacts, facts_from_config


@dataclass(frozen=True)
class KnownModel:
    config: Mapping[str, object]  # the config.json keys the plan reads
    weights_bytes: int  # total_size of the safetensors index
    source: str  # where the figures were read


KNOWN_MODELS: dict[str, KnownModel] = {
    # The default model of gh200-pd, h100-pd and gpu-aggregated. 7,615,616,512
    # parameters in bfloat16.
    "Qwen/Qwen2.5-7B-Instruct": KnownModel(
        config={
            "model_type": "qwen2",
            "hidden_size": 3584,
            "intermediate_size": 18944,
            "num_hidden_layers": 28,
            "num_attention_heads": 28,
            "num_key_value_heads": 4,
            "vocab_size": 152064,
            "max_position_embeddings": 32768,
            "tie_word_embeddings": False,
            "torch_dtype": "bfloat16",
        },
        weights_bytes=15_231_233_024,
        source="config.json and model.safetensors.index.json of "
               "huggingface.co/Qwen/Qwen2.5-7B-Instruct",
    ),
}


def known_model(hub_id: str) -> tuple[str, KnownModel] | None:
    """The table's entry for `hub_id` and its id as the hub spells it; the hub
    itself resolves ids whatever their case."""
    wanted = hub_id.strip().casefold()
    return next(((k, v) for k, v in KNOWN_MODELS.items() if k.casefold() == wanted), None)


def known_facts(hub_id: str, dtype: str | None = None) -> ModelFacts | None:
    """The plan's facts of `hub_id` from the table, or None when it has none."""
    entry = known_model(hub_id)
    if entry is None:
        return None
    name, model = entry
    facts = facts_from_config(dict(model.config), name, model.weights_bytes, dtype)
    return dataclasses.replace(facts, facts_from=f"pdbox's built-in table ({model.source})")
