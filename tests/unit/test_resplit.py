"""Re-splitting the box between prefill and decode: the pure part."""

from __future__ import annotations

import dataclasses

from pdbox import config
from pdbox.autoscaler import Split, propose_split
from pdbox.resplit import apply_split, current_split, demands, describe
from pdbox.workers import vllm as vllm_spec


def four_core_profile(resplit: bool = True) -> config.Profile:
    p = config.load("cpu-tiny")
    assert p.prefill is not None and p.decode is not None
    return dataclasses.replace(
        p,
        prefill=dataclasses.replace(p.prefill, cores=("0", "1")),
        decode=dataclasses.replace(p.decode, cores=("2", "3")),
        autoscaler=dataclasses.replace(p.autoscaler, resplit=resplit),
    )


def test_current_split_reads_the_roles_cores() -> None:
    s = current_split(four_core_profile())
    assert s.prefill_cores == (0, 1) and s.decode_cores == (2, 3)


def test_a_prefill_heavy_load_moves_a_core_to_prefill_and_workers_follow() -> None:
    p = four_core_profile()
    pre, dec = demands(9.0, 1.0)
    new = propose_split(p, pre, dec, current_split(p))
    assert new is not None and new.prefill_cores == (0, 1, 2) and new.decode_cores == (3,)
    q = apply_split(p, new)
    assert current_split(q) == new
    spec = vllm_spec.build(q, "prefill", 0, vllm_spec.WorkerPorts(1, 2, 0), "/m",
                           online_cores=[0, 1, 2, 3], base_env={})
    assert spec.env["VLLM_CPU_OMP_THREADS_BIND"] == "0,1,2"
    assert "prefill cores 0,1→0,1,2" in describe(current_split(p), new)


def test_balanced_load_or_switch_off_proposes_nothing() -> None:
    p = four_core_profile()
    assert propose_split(p, *demands(5.0, 5.0), current_split(p)) is None
    off = four_core_profile(resplit=False)
    assert propose_split(off, *demands(9.0, 1.0), current_split(off)) is None


def test_idle_role_keeps_a_floor_of_demand() -> None:
    assert demands(0.0, 0.0) == (0.5, 0.5)


def test_mps_split_moves_sm_percentages() -> None:
    p = config.load("gh200-pd")
    p = dataclasses.replace(p, autoscaler=dataclasses.replace(p.autoscaler, resplit=True))
    old = current_split(p)
    assert (old.prefill_sm_percent, old.decode_sm_percent) == (60, 40)
    new = propose_split(p, 1.0, 9.0, old)
    assert new is not None and new.decode_sm_percent > 40
    q = apply_split(p, new)
    assert q.decode is not None and q.decode.sm_percent == new.decode_sm_percent
    assert isinstance(new, Split)
