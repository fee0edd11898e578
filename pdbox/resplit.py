"""Re-splitting the machine between prefill and decode (behind `autoscaler.resplit`).

The controller (`pdbox.autoscaler.propose_split`) says when the prefill/decode
load ratio has moved far enough to move a core (CPU) or SM share (GPU with MPS)
from one role to the other. This module turns the current profile into that
Split and back: `current_split` reads it, `apply_split` gives the profile the
new workers of each role are started with. The appliance then restarts one
role at a time, starting each replacement before draining the worker it
replaces, so the role never drops to zero. Pure functions; no processes here.
"""

from __future__ import annotations

import dataclasses

from pdbox.autoscaler import Split
from pdbox.config import Profile, parse_core_set


def current_split(profile: Profile) -> Split:
    if not profile.is_pd or profile.prefill is None or profile.decode is None:
        return Split()
    if profile.hardware.device == "cpu":
        pre = sorted({c for cs in profile.prefill.cores for c in parse_core_set(cs)})
        dec = sorted({c for cs in profile.decode.cores for c in parse_core_set(cs)})
        return Split(prefill_cores=tuple(pre), decode_cores=tuple(dec))
    return Split(prefill_sm_percent=profile.prefill.sm_percent,
                 decode_sm_percent=profile.decode.sm_percent)


def _core_list(cores: tuple[int, ...]) -> tuple[str, ...]:
    # Every worker of the role computes on the role's whole core set.
    return (",".join(str(c) for c in cores),)


def apply_split(profile: Profile, split: Split) -> Profile:
    """The profile with the roles' cores (CPU) or SM percentages (GPU) replaced."""
    assert profile.prefill is not None and profile.decode is not None
    if profile.hardware.device == "cpu":
        pre = dataclasses.replace(profile.prefill, cores=_core_list(split.prefill_cores))
        dec = dataclasses.replace(profile.decode, cores=_core_list(split.decode_cores))
    else:
        pre = dataclasses.replace(profile.prefill, sm_percent=split.prefill_sm_percent)
        dec = dataclasses.replace(profile.decode, sm_percent=split.decode_sm_percent)
    return dataclasses.replace(profile, prefill=pre, decode=dec)


def demands(prefill_load: float, decode_load: float) -> tuple[float, float]:
    """Role demands from their loads (waiting + running per role, plus in-flight legs).

    A floor keeps an idle role from reading as zero demand, which would
    propose giving the whole box to the other role after one quiet period.
    """
    return max(prefill_load, 0.5), max(decode_load, 0.5)


def describe(old: Split, new: Split) -> str:
    if new.prefill_cores or new.decode_cores:
        return (f"prefill cores {_fmt(old.prefill_cores)}→{_fmt(new.prefill_cores)}, "
                f"decode cores {_fmt(old.decode_cores)}→{_fmt(new.decode_cores)}")
    return (f"prefill SM {old.prefill_sm_percent}%→{new.prefill_sm_percent}%, "
            f"decode SM {old.decode_sm_percent}%→{new.decode_sm_percent}%")


def _fmt(cores: tuple[int, ...]) -> str:
    return ",".join(str(c) for c in cores) or "-"
