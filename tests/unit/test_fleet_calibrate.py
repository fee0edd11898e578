"""What the fleet keeps of a worker's calibration: every figure seeds the running
router, but only one timed on a quiet box goes to the files later starts size their
step budgets from. Fake processes, no vLLM; the calibrator itself is tested against
a real HTTP server in test_calibration.py."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest

from pdbox import calibration, paths
from pdbox.calibration import Calibration
from tests.unit.test_fleet_ports import FakeRouter, _fleet

FIGURE = Calibration(prefill_tps=700.0, overhead_s=0.05, decode_step_s={1: 0.05, 4: 0.06},
                     prefill_points=((16, 0.07), (224, 0.37)))


class SeedingRouter(FakeRouter):
    def __init__(self) -> None:
        self.seeded: list[tuple[str, float]] = []

    def seed_calibration(self, role: str, cal: Calibration, key: str) -> None:
        self.seeded.append((role, cal.prefill_tps))

    def _slice_key(self, role: str) -> str:
        return "1 core(s)"


@pytest.fixture()
def fixed_calibrator(monkeypatch: pytest.MonkeyPatch) -> None:
    class Fixed:
        def __init__(self, *a: Any, **k: Any) -> None:
            pass

        async def run(self, url: str) -> Calibration:
            return FIGURE

    monkeypatch.setattr("pdbox.workers.calibrate.Calibrator", Fixed)


@pytest.mark.parametrize("busy", [False, True])
def test_a_figure_timed_beside_live_load_seeds_this_run_but_is_not_kept(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fixed_calibrator: None,
        busy: bool) -> None:
    monkeypatch.setenv("PDBOX_SPEEDS_FILE", str(tmp_path / "speeds.json"))
    fleet, _launcher, events = _fleet(tmp_path)
    router = SeedingRouter()
    fleet.router = router  # type: ignore[assignment]
    other = fleet.registry.upsert("prefill-0", "prefill", "http://127.0.0.1:9", "ready")
    other.inflight = 3 if busy else 0
    fleet._seed_saved_calibration()  # as a start does: nothing saved yet

    async def main() -> None:
        w = fleet.add_worker("decode")
        await fleet._calibrate(w.spec, None)  # type: ignore[arg-type]

    asyncio.run(main())
    assert router.seeded == [("decode", 700.0)]
    kept = calibration.load_file(paths.speeds_file())
    if busy:
        assert kept == {} and not (fleet.run_dir / calibration.FILE).exists()
        assert any("not kept for later starts" in e for e in events), events
    else:
        assert [c.prefill_tps for v in kept.values() for c in v] == [700.0]
