"""status --json workers: the supervisor's view of failures, back-off and freezes."""

from __future__ import annotations

from pathlib import Path

from pdbox.status_view import workers_view
from pdbox.workers.supervisor import Worker
from pdbox.workers.vllm import WorkerPorts, WorkerSpec


def _worker(tmp_path: Path) -> Worker:
    spec = WorkerSpec(id="decode-0", role="decode", index=0, argv=["true"], env={},
                      ports=WorkerPorts(http=9000), cores="1")
    return Worker(spec=spec, log_path=tmp_path / "decode-0.log")


def test_a_worker_in_back_off(tmp_path: Path) -> None:
    w = _worker(tmp_path)
    w.state, w.failures, w.backoff_s, w.next_start_at = "backoff", 3, 4.0, 104.0
    (row,) = workers_view({}, {"decode-0": w}, now=101.0)
    assert row["state"] == "backoff" and row["failures"] == 3 and row["crash_looping"]
    assert row["backoff_s"] == 4.0 and row["next_try_in_s"] == 3.0
    assert row["silent_s"] is None


def test_an_unresponsive_worker(tmp_path: Path) -> None:
    w = _worker(tmp_path)
    w.state, w.unhealthy_since, w.missed_probes = "unresponsive", 95.0, 2
    (row,) = workers_view({}, {"decode-0": w}, now=101.0)
    assert row["silent_s"] == 6.0 and row["missed_probes"] == 2
    assert row["next_try_in_s"] is None and not row["crash_looping"]
