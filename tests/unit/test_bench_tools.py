"""`pdbox bench router` over mock workers only, and the start-up benchmark's arithmetic."""

from __future__ import annotations

import json

from click.testing import CliRunner

from pdbox.bench import startup
from pdbox.cli import main


def test_router_bench_direct_only_writes_figures_and_the_machine() -> None:
    # --skip-pdbox and no --sglang-python: only the mocks start, for well under a second.
    res = CliRunner().invoke(main, [
        "bench", "router", "--skip-pdbox", "--backends", "1", "--tokens", "4",
        "--requests", "20", "--latency-requests", "5", "--warmup", "2", "--rounds", "1",
        "--json"])
    assert res.exit_code == 0, res.output
    data = json.loads(res.stdout[res.stdout.index("{"):])
    assert data["direct"]["throughput"]["requests"] == 20
    assert data["direct"]["latency"]["ttft_p50_ms"] is not None
    assert "no --sglang-python" in data["sglang_skipped"]
    assert data["machine"]["cores_usable"] >= 1


def test_startup_summary_ratio_and_goals() -> None:
    ups = [{"endpoint_s": 20.0, "ready_s": 40.0, "peak_rss_mb": 90.0, "leftover_pids": []},
           {"endpoint_s": 22.0, "ready_s": 44.0, "peak_rss_mb": 95.0, "leftover_pids": []}]
    s = startup.summary([35.0, 37.0], ups)
    assert s["ratio_median"] == round(42.0 / 36.0, 3)
    assert s["ratio_ok"] and s["rss_ok"] and s["leftover_pids"] == []
    rows = startup.rows(s)
    assert [r.label for r in rows] == ["bare vLLM", "pdbox up"]
    assert rows[1].figures["ready_s"] == 42.0 and rows[1].figures["peak_rss_mb"] == 95.0
