"""What the memory plan needs to know about a model, read from its config.json.

Weights bytes come from the model's own safetensors files when the folder has
them (exact), else from a parameter count worked out from config.json for the
dense decoder families pdbox serves (Llama, Qwen2, Mistral and alike). KV bytes
per token come from the layer count, KV heads, head size and KV dtype, the
same product vLLM's full-attention KV cache spec uses.

Only the standard library: `pdbox plan` must work on a machine with no torch.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

DTYPE_BYTES = {
    "float32": 4,
    "float": 4,
    "bfloat16": 2,
    "float16": 2,
    "half": 2,
    "fp8": 1,
    "fp8_e4m3": 1,
    "fp8_e5m2": 1,
    "fp8_inc": 1,
}
# Keys of mixture-of-experts configs: a dense parameter count would be wrong.
_MOE_KEYS = ("num_local_experts", "num_experts", "n_routed_experts", "moe_intermediate_size")


class FactsError(Exception):
    """A config.json the plan cannot read. str() is one sentence for the user."""


@dataclass(frozen=True)
class ModelFacts:
    name: str
    model_type: str
    dtype: str
    num_layers: int
    hidden_size: int
    intermediate_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    tie_word_embeddings: bool
    attention_bias: bool
    weights_bytes: int
    # "safetensors" (summed from the files) or "config.json" (counted).
    weights_from: str
    # The longest sequence the model was trained for; 0: unknown.
    max_position_embeddings: int = 0
    # Where the facts come from when not the model's own config.json ("":
    # its config.json), e.g. pdbox's table of the built-in profiles' models.
    facts_from: str = ""

    @property
    def dtype_bytes(self) -> int:
        return DTYPE_BYTES[self.dtype]

    def kv_bytes_per_token(self, kv_dtype_bytes: int | None = None) -> int:
        """K and V for every layer: 2 x layers x KV heads x head size x bytes."""
        b = kv_dtype_bytes or self.dtype_bytes
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim * b

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["kv_bytes_per_token"] = self.kv_bytes_per_token()
        return d


def parameter_count(cfg: dict[str, Any]) -> int:
    """Parameters of a dense Llama/Qwen2-style decoder, from config.json alone."""
    h = int(cfg["hidden_size"])
    inter = int(cfg["intermediate_size"])
    layers = int(cfg["num_hidden_layers"])
    heads = int(cfg["num_attention_heads"])
    kv_heads = int(cfg.get("num_key_value_heads") or heads)
    head_dim = int(cfg.get("head_dim") or h // heads)
    vocab = int(cfg["vocab_size"])
    q, kv = heads * head_dim, kv_heads * head_dim
    attn = h * q + 2 * h * kv + q * h
    if _attention_bias(cfg):
        attn += q + 2 * kv
    mlp = 3 * h * inter + (2 * inter + h if cfg.get("mlp_bias") else 0)
    per_layer = attn + mlp + 2 * h  # two RMSNorm weights
    embed = vocab * h
    head = 0 if cfg.get("tie_word_embeddings", False) else vocab * h
    return layers * per_layer + embed + head + h  # final norm


def _attention_bias(cfg: dict[str, Any]) -> bool:
    if "attention_bias" in cfg:
        return bool(cfg["attention_bias"])
    # Qwen2 has q/k/v biases without saying so in config.json.
    return cfg.get("model_type") == "qwen2"


def facts_from_config(
    cfg: dict[str, Any], name: str = "", weights_bytes: int | None = None,
    dtype: str | None = None,
) -> ModelFacts:
    """Facts from a parsed config.json. `weights_bytes`, when known from the
    safetensors files, wins over the count; `dtype` is the profile's when it is
    not "auto"."""
    where = f"config.json of {name}" if name else "config.json"
    if "text_config" in cfg and "num_hidden_layers" not in cfg:
        cfg = {**cfg["text_config"], "torch_dtype": cfg.get("torch_dtype")}
    if "kv_lora_rank" in cfg:
        raise FactsError(f"{where}: multi-head latent attention (kv_lora_rank) is not "
                         "planned by pdbox yet; its KV cache is not layers x heads x head size")
    try:
        heads = int(cfg["num_attention_heads"])
        hidden = int(cfg["hidden_size"])
        facts_dtype = dtype if dtype and dtype != "auto" else str(
            cfg.get("torch_dtype") or cfg.get("dtype") or "bfloat16")
        if facts_dtype not in DTYPE_BYTES:
            raise FactsError(f"{where}: dtype {facts_dtype!r} is not one pdbox can size")
        if weights_bytes is None:
            if any(k in cfg for k in _MOE_KEYS):
                raise FactsError(
                    f"{where} describes a mixture-of-experts model, whose weights cannot be "
                    "counted from config.json alone; give the model folder with its "
                    "safetensors files")
            weights_bytes = parameter_count(cfg) * DTYPE_BYTES[facts_dtype]
            source = "config.json"
        else:
            source = "safetensors"
            stored = str(cfg.get("torch_dtype") or cfg.get("dtype") or facts_dtype)
            if stored in DTYPE_BYTES and stored != facts_dtype:
                # vLLM casts at load: a bf16 folder served in float32 takes twice its files.
                weights_bytes = weights_bytes * DTYPE_BYTES[facts_dtype] // DTYPE_BYTES[stored]
                source = f"safetensors, {stored} cast to {facts_dtype}"
        return ModelFacts(
            name=name,
            model_type=str(cfg.get("model_type", "")),
            dtype=facts_dtype,
            num_layers=int(cfg["num_hidden_layers"]),
            hidden_size=hidden,
            intermediate_size=int(cfg.get("intermediate_size") or 4 * hidden),
            num_heads=heads,
            num_kv_heads=int(cfg.get("num_key_value_heads") or heads),
            head_dim=int(cfg.get("head_dim") or hidden // heads),
            vocab_size=int(cfg["vocab_size"]),
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            attention_bias=_attention_bias(cfg),
            weights_bytes=int(weights_bytes),
            weights_from=source,
            max_position_embeddings=int(cfg.get("max_position_embeddings") or 0),
        )
    except KeyError as exc:
        raise FactsError(f"{where} lacks {exc.args[0]!r}; the plan needs it") from None
    except (TypeError, ValueError) as exc:
        raise FactsError(f"{where} holds a value the plan cannot read ({exc})") from None


def safetensors_bytes(folder: Path) -> int | None:
    """Bytes of the weights as stored: the index's total_size, else the files'
    sizes (their JSON headers are a few kB). None when there are none."""
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        try:
            total = json.loads(index.read_text(encoding="utf-8"))["metadata"]["total_size"]
            return int(total)
        except (OSError, ValueError, KeyError, TypeError):
            pass
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        return None
    return sum(f.stat().st_size for f in files)


def load_facts(folder: str | Path, name: str = "", dtype: str | None = None) -> ModelFacts:
    """Facts of a local model folder (or a folder holding only config.json)."""
    folder = Path(folder)
    cfg_path = folder / "config.json"
    try:
        cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise FactsError(f"{cfg_path}: no such file; the plan needs the model's config.json") \
            from None
    except (OSError, ValueError) as exc:
        raise FactsError(f"{cfg_path}: cannot be read as JSON ({exc})") from None
    if not isinstance(cfg, dict):
        raise FactsError(f"{cfg_path}: not a JSON object")
    return facts_from_config(cfg, name or folder.name, safetensors_bytes(folder), dtype)
