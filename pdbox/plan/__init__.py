"""The plan of a profile: what `pdbox up` would start, and whether it fits.

- `model_facts`: weights and KV bytes from a model's config.json;
- `memory`: one GPU worker's memory ledger (pure arithmetic);
- `sources`: where a model source's config.json is found;
- `build`: the plan itself, shared by `pdbox plan` and `pdbox up`.

Kept free of imports here: `pdbox.workers.vllm` uses `memory`, and `build`
uses `pdbox.workers.vllm`.
"""
