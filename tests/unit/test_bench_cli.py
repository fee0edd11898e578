"""`pdbox bench`: argument errors in one sentence, and a whole run over mock "boxes".

No real box starts here: `pdbox.bench.box.start` is replaced by a mock OpenAI
server in a process group of its own, so the harness's start, drive, stop and
leftover check run for real around it.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from pdbox.bench import box as boxes
from pdbox.bench import trace_run
from pdbox.cli import main


def _trace(tmp_path: Path, n: int = 6, gap_s: float = 0.25) -> Path:
    path = tmp_path / "t.jsonl"
    lines = [json.dumps({"timestamp": int(i * gap_s * 1000), "input_length": 3000 + 100 * i,
                         "output_length": 20, "hash_ids": [0, 1, 2 + i, 3 + i, 4 + i, 5 + i]})
             for i in range(n)]
    path.write_text("\n".join(lines) + "\n")
    return path


def _invoke(*args: str):
    return CliRunner().invoke(main, ["bench", *args])


def _one_sentence_error(res, words: str, code: int = 1) -> None:
    assert res.exit_code == code, res.output
    assert words in res.output
    assert "Traceback" not in res.output


def test_bench_is_a_pdbox_command_and_its_help_says_how_to_read_results() -> None:
    assert "bench" in CliRunner().invoke(main, ["--help"]).output
    out = _invoke("--help").output
    assert "Goodput" in out and "divided by the first setup's" in out
    for sub in ("trace", "phases", "interference"):
        text = _invoke(sub, "--help").output
        assert "ratio to the first setup" in text, sub
    assert "TPOT" in _invoke("trace", "--help").output


def test_missing_trace_file(tmp_path: Path) -> None:
    _one_sentence_error(_invoke("trace", str(tmp_path / "nope.jsonl")), "no such trace file")


def test_unknown_profile(tmp_path: Path) -> None:
    res = _invoke("trace", str(_trace(tmp_path)), "--profile", "cpu-tny")
    _one_sentence_error(res, "no such built-in profile (did you mean 'cpu-tiny'?)")
    res = _invoke("phases", "--against", "nonsense-profile")
    _one_sentence_error(res, "no such built-in profile")


@pytest.mark.parametrize("value", ["0", "-1", "fast"])
def test_bad_speed(tmp_path: Path, value: str) -> None:
    _one_sentence_error(_invoke("trace", str(_trace(tmp_path)), "--speed", value),
                        "Invalid value for '--speed'", code=2)


def test_empty_window_and_bad_caps(tmp_path: Path) -> None:
    trace = str(_trace(tmp_path))
    _one_sentence_error(_invoke("trace", trace, "--start-s", "5000"), "no request arrives")
    _one_sentence_error(_invoke("trace", trace, "--max-output", "5000"), "output cap")
    _one_sentence_error(_invoke("trace", trace, "--against", "cpu-tiny,oops"),
                        "neither a vLLM flag")


def test_plot_without_pillow_fails_before_anything_starts(tmp_path: Path,
                                                         monkeypatch) -> None:
    def boom(*a, **k):
        raise AssertionError("a box was started")

    monkeypatch.setattr(boxes, "start", boom)
    monkeypatch.setitem(sys.modules, "PIL", None)  # as if not installed
    res = _invoke("trace", str(_trace(tmp_path)), "--plot", str(tmp_path / "p.png"))
    _one_sentence_error(res, "--plot needs Pillow")


def test_plot_draws_a_png_of_every_setup_and_phase(tmp_path: Path) -> None:
    from PIL import Image

    from pdbox.bench.report import Column, Row, plot

    cols = [Column("ttft_p50_s", "TTFT p50", "lower", "latency s"),
            Column("itl_p99_s", "ITL p99", "lower", "latency s"),
            Column("tokens_per_s", "tokens/s", "higher", "tokens/s")]
    rows = [Row(phase, label, {"ttft_p50_s": t, "itl_p99_s": None, "tokens_per_s": 100.0 * t})
            for phase in ("chat", "long") for label, t in (("soft", 0.4), ("aggregated", 0.6))]
    out = tmp_path / "p.png"
    plot(rows, cols, str(out), "phases")
    with Image.open(out) as img:
        assert img.format == "PNG"
        assert img.size[0] >= 2 * 500 and img.size[1] >= 2 * 250  # 2 kinds x 2 phases


def test_trace_run_over_two_setups_writes_everything(tmp_path: Path, mock_boxes) -> None:
    out = tmp_path / "r.json"
    res = _invoke("trace", str(_trace(tmp_path)), "--against", "cpu-aggregated",
                  "--duration-s", "2", "--drain-s", "5", "--max-output", "8", "--json", str(out))
    assert res.exit_code == 0, res.output
    assert "goodput" in res.output and "×)" in res.output  # the table, with ratios
    data = json.loads(out.read_text())
    assert [s["label"] for s in data["setups"]] == ["cpu-tiny", "cpu-aggregated"]
    assert data["machine"]["cpu_model"] and "simd_flags" in data["machine"]
    for s in data["setups"]:
        r = s["result"]
        assert r["sent"] == 6 and r["ok"] == 6
        for key in ("goodput_rps", "ttft_p50_s", "tpot_p50_s", "output_tokens_per_s"):
            assert r[key] and r[key] > 0, key
        assert s["leftover_pids"] == [] and s["load"]["samples"] >= 1
        assert len(r["requests"]) == 6 and r["requests"][0]["status"] == "ok"
    assert data["table"][1]["ratios"]["goodput_rps"] is not None
    assert data["config"]["window"]["block_tokens"] >= 1
    assert len(mock_boxes) == 2 and all(b.proc.poll() is not None for b in mock_boxes)


def test_find_load_probes_then_compares(tmp_path: Path, mock_boxes) -> None:
    res = _invoke("trace", str(_trace(tmp_path, n=8, gap_s=0.5)), "--find-load",
                  "--probe-s", "1", "--probes", "2", "--duration-s", "1", "--drain-s", "3",
                  "--max-output", "4", "--json")
    assert res.exit_code == 0, res.output
    data = json.loads(res.stdout[res.stdout.index("{"):])
    found = data["find_load"]
    assert [p["speed"] for p in found["probes"]] == [1.0, 2.0]  # met at 1: stepped up
    assert found["met"] and data["config"]["speed"] == 2.0
    assert len(mock_boxes) == 2  # one box for the probes, one for the run


def test_ctrl_c_stops_the_box_and_exits_130(tmp_path: Path, mock_boxes, monkeypatch) -> None:
    async def interrupted(self, endpoint, profile, progress):
        raise KeyboardInterrupt

    monkeypatch.setattr(trace_run.TraceWorkload, "run", interrupted)
    res = _invoke("trace", str(_trace(tmp_path)), "--duration-s", "1")
    assert res.exit_code == 130
    assert "nothing is left running" in res.output
    assert mock_boxes and all(b.proc.poll() is not None for b in mock_boxes)


def test_phases_and_interference_run_over_mock_boxes(tmp_path: Path, mock_boxes) -> None:
    out = tmp_path / "p.json"
    res = _invoke("phases", "--profile", "soft", "--against", "fixed-pd", "--phase-s", "0.3",
                  "--streams", "2", "--stream-tokens", "8", "--long-tokens", "64",
                  "--json", str(out))
    assert res.exit_code == 0, res.output
    data = json.loads(out.read_text())
    assert [s["label"] for s in data["setups"]] == ["soft", "fixed-pd"]
    assert set(data["setups"][0]["result"]["phases"]) == {"chat", "long-1.5s", "long-3s",
                                                          "chat-again"}
    assert data["setups"][1]["overrides"] == {"router.soft_roles": False, "router.hybrid": False,
                                              "engine.step_budget": "default"}
    assert "whole_run" in data["verdict"] and data["machine"]["cpu_model"]
    assert {r["group"] for r in data["table"]} >= {"chat", "whole run"}

    res = _invoke("interference", "--profile", "aggregated", "--against", "pd-adaptive",
                  "--streams", "2", "--stream-tokens", "20", "--long-prompts", "2",
                  "--interval-s", "0.3", "--lead-s", "0.2", "--long-tokens", "64", "--json")
    assert res.exit_code == 0, res.output
    data = json.loads(res.stdout[res.stdout.index("{"):])
    agg, pd = (s["result"] for s in data["setups"])
    assert agg["itl_p50_ms"] and pd["output_tokens_per_s"] > 0
    assert len(agg["long_ttft_s"]) == 2
    assert "pd-adaptive vs aggregated" in data["goals"]
    assert all(b.proc.poll() is not None for b in mock_boxes)


def test_a_failed_workload_names_its_setup_and_stops_the_box(tmp_path: Path, mock_boxes,
                                                             monkeypatch) -> None:
    import aiohttp

    async def broken(self, endpoint, profile, progress):
        raise aiohttp.ClientConnectionError("connection reset")

    monkeypatch.setattr(trace_run.TraceWorkload, "run", broken)
    res = _invoke("trace", str(_trace(tmp_path)), "--duration-s", "1")
    _one_sentence_error(res, "setup 'cpu-tiny': the trace workload failed (connection reset)")
    assert all(b.proc.poll() is not None for b in mock_boxes)


def test_speeds_over_two_dtype_setups(tmp_path: Path, mock_boxes) -> None:
    out = tmp_path / "s.json"
    res = _invoke("speeds", "--profile", "bf16:cpu-aggregated,model.dtype=bfloat16",
                  "--against", "fp32:cpu-aggregated,model.dtype=float32", "--short-tokens", "8",
                  "--long-tokens", "64", "--repeats", "2", "--stream-tokens", "8",
                  "--json", str(out))
    assert res.exit_code == 0, res.output
    data = json.loads(out.read_text())
    assert [s["dtype"] for s in data["setups"]] == ["bfloat16", "float32"]
    for s in data["setups"]:
        r = s["result"]
        assert r["ttft_short_s"] > 0 and len(r["ttft_long_all_s"]) == 2
        assert r["decode_step_s"] == pytest.approx(0.005, abs=0.02)
    assert data["table"][1]["ratios"]["ttft_long_s"] is not None
    assert _invoke("speeds", "--short-tokens", "64", "--long-tokens", "8").exit_code == 2
