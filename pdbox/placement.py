"""Where a new worker computes: the free slice of the box that its role may use.

A CPU role lists the core sets its workers may take (`RoleConfig.cores`). A new
worker takes the listed set whose cores carry the fewest live workers now, so
after any scale-down and scale-up the workers spread over the role's cores
again instead of following an ever-growing worker index. Ties go to the
profile's order. On a GPU every worker of a role takes the same SM share and
memory cap, so there is nothing to choose.

Pure functions: the occupied core sets are arguments.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

from pdbox.config import parse_core_set


def core_load(occupied: Iterable[str]) -> dict[int, int]:
    """How many workers compute on each core, from their core sets ('' counts nothing)."""
    load: dict[int, int] = {}
    for spec in occupied:
        if not spec:
            continue
        for c in parse_core_set(spec):
            load[c] = load.get(c, 0) + 1
    return load


def choose_core_set(candidates: Sequence[str], occupied: Iterable[str]) -> str:
    """The candidate whose busiest core carries the fewest workers (then the fewest in all).

    `occupied` holds the core sets of the workers that stay (starting, ready,
    restarting: not those draining away). Returns '' when the role lists no cores.
    """
    if not candidates:
        return ""
    load = core_load(occupied)

    def cost(spec: str) -> tuple[int, int]:
        cores = parse_core_set(spec)
        return max(load.get(c, 0) for c in cores), sum(load.get(c, 0) for c in cores)

    return min(candidates, key=cost)  # min() keeps the first of equals: profile order


def place(roles: Mapping[str, Sequence[str]], counts: Mapping[str, int],
          occupied: Iterable[str] = ()) -> dict[str, list[str]]:
    """The core sets of `counts[role]` new workers per role, placed one after another."""
    taken = list(occupied)
    out: dict[str, list[str]] = {}
    for role, n in counts.items():
        sets = out.setdefault(role, [])
        for _ in range(n):
            spec = choose_core_set(roles.get(role, ()), taken)
            sets.append(spec)
            taken.append(spec)
    return out
