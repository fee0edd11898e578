"""Placement by free slice over scale sequences: workers spread over their role's cores."""

from __future__ import annotations

import pytest

from pdbox.placement import choose_core_set, core_load, place


class Box:
    """Workers as the appliance keeps them: a scale-down drains the highest index."""

    def __init__(self, roles: dict[str, tuple[str, ...]]):
        self.roles = roles
        self.workers: dict[str, tuple[str, int, str]] = {}  # id -> (role, index, cores)

    def scale(self, role: str, n: int) -> None:
        mine = sorted((w for w in self.workers.values() if w[0] == role), key=lambda w: w[1])
        while len(mine) > n:
            gone = mine.pop()
            del self.workers[f"{gone[0]}-{gone[1]}"]
        while len(mine) < n:
            used = {w[1] for w in mine}
            index = next(i for i in range(100) if i not in used)
            cores = choose_core_set(self.roles[role], (w[2] for w in self.workers.values()))
            w = (role, index, cores)
            self.workers[f"{role}-{index}"] = w
            mine.append(w)

    def cores(self, role: str) -> list[str]:
        return sorted(w[2] for w in self.workers.values() if w[0] == role)

    def check_spread(self) -> None:
        """No core carries two workers while a core some role may use is empty."""
        load = core_load(w[2] for w in self.workers.values())
        for role, sets in self.roles.items():
            allowed = {c for s in sets for c in s.split(",")}
            empty = [c for c in allowed if load.get(int(c), 0) == 0]
            shared = [w for w in self.workers.values()
                      if w[0] == role and any(load[int(c)] > 1 for c in w[2].split(","))]
            assert not (empty and shared), (role, empty, shared)


def test_two_one_two_lands_on_the_empty_core() -> None:
    box = Box({"aggregated": ("0", "1")})
    box.scale("aggregated", 2)
    assert box.cores("aggregated") == ["0", "1"]
    box.scale("aggregated", 1)
    assert box.cores("aggregated") == ["0"]
    box.scale("aggregated", 2)
    assert box.cores("aggregated") == ["0", "1"]
    box.check_spread()


def test_after_the_first_worker_leaves_the_new_one_takes_its_core() -> None:
    box = Box({"aggregated": ("0", "1")})
    box.scale("aggregated", 2)
    del box.workers["aggregated-0"]  # core 0 freed, aggregated-1 stays on core 1
    box.scale("aggregated", 2)
    assert box.cores("aggregated") == ["0", "1"]


def test_one_three_one_two() -> None:
    box = Box({"decode": ("0", "1", "2")})
    box.scale("decode", 1)
    box.scale("decode", 3)
    assert box.cores("decode") == ["0", "1", "2"]
    box.check_spread()
    box.scale("decode", 1)
    box.scale("decode", 2)
    assert box.cores("decode") == ["0", "1"]
    box.check_spread()


def test_more_workers_than_cores_share_evenly() -> None:
    box = Box({"decode": ("0", "1")})
    box.scale("decode", 4)
    assert box.cores("decode") == ["0", "0", "1", "1"]


def test_role_pins_keep_each_role_on_its_cores() -> None:
    # prefill pinned to core 0; decode may use 0 and 1 but prefers the empty one.
    box = Box({"prefill": ("0",), "decode": ("0", "1")})
    box.scale("prefill", 1)
    box.scale("decode", 1)
    assert box.cores("decode") == ["1"]
    box.scale("decode", 2)
    assert box.cores("decode") == ["0", "1"]
    box.scale("prefill", 2)  # prefill may only use core 0, however busy
    assert box.cores("prefill") == ["0", "0"]
    box.scale("decode", 1)
    box.scale("decode", 2)  # core 0 carries both prefill workers: core 1 is less loaded
    assert box.cores("decode") == ["1", "1"]


def test_multi_core_sets_count_their_busiest_core() -> None:
    assert choose_core_set(("0,1", "2,3"), ["1"]) == "2,3"
    assert choose_core_set(("0-1", "2-3"), ["0-1", "2"]) == "2-3"  # max 1 vs max 1, sum 2 vs 1


def test_no_cores_is_no_choice() -> None:
    assert choose_core_set((), ["0"]) == ""
    assert core_load(["", "0,1", "1"]) == {0: 1, 1: 2}


@pytest.mark.parametrize("n", [1, 2, 3, 4])
def test_place_matches_one_by_one(n: int) -> None:
    placed = place({"decode": ("0", "1")}, {"decode": n}, occupied=["0"])
    box = Box({"decode": ("0", "1")})
    box.workers["x-0"] = ("x", 0, "0")
    box.scale("decode", n)
    assert sorted(placed["decode"]) == box.cores("decode")
