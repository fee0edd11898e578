"""Routing replay over small synthetic traces, and the `pdbox replay` command."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
from click.testing import CliRunner

from pdbox.commands.replay import replay as replay_cmd
from pdbox.replay.routing import CostModel, replay
from pdbox.replay.traces import TraceRequest


def groups_trace(n_groups=8, per_group=40, prefix_blocks=20, seed=1) -> list[TraceRequest]:
    """Conversations sharing long per-group prefixes, interleaved in time."""
    rng = random.Random(seed)
    reqs = []
    next_id = 10_000
    for i in range(n_groups * per_group):
        g = rng.randrange(n_groups)
        own = list(range(next_id, next_id + 2))
        next_id += 2
        ids = tuple(range(g * 100, g * 100 + prefix_blocks)) + tuple(own)
        reqs.append(TraceRequest(i * 0.5, len(ids) * 512, 20, ids))
    return reqs


def write_mooncake(path: Path, reqs: list[TraceRequest]) -> None:
    with open(path, "w") as f:
        for r in reqs:
            f.write(json.dumps({"timestamp": int(r.arrival_s * 1000), "input_length":
                                r.input_tokens, "output_length": r.output_tokens,
                                "hash_ids": list(r.hash_ids)}) + "\n")


def test_prefix_beats_round_robin_under_cache_pressure() -> None:
    reqs = groups_trace()
    # Each worker holds 3 of the 8 group prefixes; all 4 together could hold them all.
    kw = dict(workers=4, cache_tokens=3 * 22 * 512)
    rr = replay(reqs, policy="round_robin", **kw)
    px = replay(reqs, policy="prefix", **kw)
    ceiling = replay(reqs, policy="shared_lru", **kw)
    assert px["hit_rate"] > rr["hit_rate"] + 0.2
    assert px["hit_rate"] >= 0.9 * ceiling["hit_rate"]
    assert px["imbalance"] < 1.6
    assert px["ttft_p50_s"] <= rr["ttft_p50_s"]
    for r in (rr, px, ceiling):
        assert 0.0 <= r["hit_rate"] <= 1.0
        assert r["requests"] == len(reqs)
        assert r["total_blocks"] == sum(len(q.hash_ids) for q in reqs)


def test_hit_rate_counts_blocks_exactly() -> None:
    a = TraceRequest(0.0, 1024, 1, (1, 2))
    b = TraceRequest(1.0, 1536, 1, (1, 2, 3))
    r = replay([a, b], workers=1, cache_tokens=10 * 512, policy="prefix")
    assert r["hit_blocks"] == 2 and r["total_blocks"] == 5 and r["hit_rate"] == pytest.approx(0.4)
    # TTFT: first request's 1024 uncached tokens at 1024 tok/s, second only its last block.
    r = replay([a, b], workers=1, cache_tokens=10 * 512, policy="prefix",
               cost=CostModel(prefill_tps=1024, decode_s_per_token=0.0))
    assert r["ttft_p50_s"] == pytest.approx(0.5) and r["ttft_p90_s"] == pytest.approx(1.0)
    assert r["per_worker"]["w0"]["uncached_tokens"] == 1024 + 512


def test_queueing_delays_ttft() -> None:
    reqs = [TraceRequest(0.0, 10_000, 1, (i,)) for i in range(4)]
    r = replay(reqs, workers=1, cache_tokens=512 * 8, policy="round_robin",
               cost=CostModel(prefill_tps=10_000, decode_s_per_token=0.0))
    assert r["ttft_p90_s"] == pytest.approx(4.0)  # the 4th waits for three prefills


def test_azure_like_trace_has_no_hits() -> None:
    reqs = [TraceRequest(i * 0.1, 1000, 10) for i in range(100)]
    r = replay(reqs, workers=2, policy="prefix")
    assert r["hit_rate"] == 0.0 and r["imbalance"] < 1.2


def test_approx_index_bound_costs_hit_rate() -> None:
    reqs = groups_trace()
    kw = dict(workers=4, cache_tokens=3 * 22 * 512, policy="prefix")
    precise = replay(reqs, **kw)
    tiny = replay(reqs, index="approx", index_blocks=4, **kw)
    assert tiny["index"] == "approx" and tiny["index_blocks"] == 4
    assert tiny["hit_rate"] < precise["hit_rate"]


def test_bad_arguments() -> None:
    with pytest.raises(ValueError, match="unknown policy"):
        replay([], policy="random")
    with pytest.raises(ValueError):
        replay([], workers=0)


def test_command_json_and_table(tmp_path: Path) -> None:
    trace = tmp_path / "t.jsonl"
    write_mooncake(trace, groups_trace(per_group=5))
    runner = CliRunner()
    res = runner.invoke(replay_cmd, [str(trace), "--workers", "2", "--cache-tokens", "50000",
                                     "--json"])
    assert res.exit_code == 0, res.output
    out = json.loads(res.output)
    for key in ("hit_rate", "imbalance", "ttft_p50_s", "ttft_p90_s", "requests"):
        assert key in out
    res = runner.invoke(replay_cmd, [str(trace), "--policy", "all"])
    assert res.exit_code == 0 and "shared_lru" in res.output and "round_robin" in res.output
    res = runner.invoke(replay_cmd, [str(trace), "--shared-cache", "--json"])
    assert json.loads(res.output)["policy"] == "shared_lru"


def test_command_user_errors(tmp_path: Path) -> None:
    runner = CliRunner()
    res = runner.invoke(replay_cmd, [str(tmp_path / "missing.jsonl")])
    assert res.exit_code != 0 and "no such trace file" in res.output
    assert "Traceback" not in res.output
    bad = tmp_path / "bad.jsonl"
    bad.write_text("{not json\n")
    res = runner.invoke(replay_cmd, [str(bad)])
    assert res.exit_code != 0 and "bad.jsonl:1" in res.output
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    res = runner.invoke(replay_cmd, [str(empty)])
    assert res.exit_code != 0 and "no requests" in res.output
    trace = tmp_path / "t.jsonl"
    write_mooncake(trace, groups_trace(per_group=2))
    res = runner.invoke(replay_cmd, [str(trace), "--cache-tokens", "10"])
    assert res.exit_code != 0 and "at least one block" in res.output


def test_autoscale_dispatch(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import sys
    import types

    seen = {}

    def run(requests, profile, rate_scale, fixed, plot):
        seen.update(n=len(requests), profile=profile.name, rate_scale=rate_scale,
                    fixed=fixed, plot=plot)
        return {"scale_ups": 1}

    fake = types.ModuleType("pdbox.replay.autoscale")
    fake.run = run
    monkeypatch.setitem(sys.modules, "pdbox.replay.autoscale", fake)
    # A P/D profile also gets the split replay (soft roles and re-split).
    split = types.ModuleType("pdbox.replay.split_sim")
    split.split_report = lambda reqs, profile, rate_scale, fixed_split: {"adaptive": {}}
    monkeypatch.setitem(sys.modules, "pdbox.replay.split_sim", split)
    trace = tmp_path / "t.jsonl"
    write_mooncake(trace, groups_trace(per_group=2))
    res = CliRunner().invoke(replay_cmd, [str(trace), "--autoscale", "--profile", "cpu-tiny",
                                          "--rate-scale", "2", "--fixed", "3", "--plot",
                                          str(tmp_path / "p.png"), "--json"])
    assert res.exit_code == 0, res.output
    assert json.loads(res.output) == {"scale_ups": 1, "split": {"adaptive": {}}}
    assert seen == {"n": 16, "profile": "cpu-tiny", "rate_scale": 2.0, "fixed": 3,
                    "plot": str(tmp_path / "p.png")}


def test_without_cache_pressure_prefix_still_spreads_load() -> None:
    # Two shared prefixes that every cache soon holds, bursts of arrivals:
    # affinity must not pile the bursts onto one worker (FINDINGS: "affinity
    # without load balance loses").
    reqs = []
    for burst in range(20):
        for k in range(8):
            own = (1000 + burst * 8 + k,)
            reqs.append(TraceRequest(burst * 2.0, 5 * 512, 50, (k % 2, 10 + k % 2) + own))
    kw = dict(workers=4, cache_tokens=10_000_000, cost=CostModel(10_000, 0.01))
    px = replay(reqs, policy="prefix", **kw)
    ll = replay(reqs, policy="least_loaded", **kw)
    assert px["hit_rate"] >= ll["hit_rate"]
    assert px["ttft_p90_s"] <= 1.25 * ll["ttft_p90_s"]
    assert px["imbalance"] < 1.3
