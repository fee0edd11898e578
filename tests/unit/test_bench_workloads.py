"""`pdbox bench` burst, prefix-live, pd-legs, tui-load, autoscale, hitrate, split-replay.

The simulated ones run for real on small traces. The ones that need real
workers run over mock servers (prefix-live's box is a mock, pd-legs' pairs
are stubbed) or only as far as their arguments; no worker and no `pdbox up`
starts here.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner, Result

from pdbox.bench import client, pd_legs_run, prefix_live, tui_load
from pdbox.cli import main
from pdbox.devtools.mock_openai import MockConfig, MockServer

REPO = Path(__file__).resolve().parents[2]
NEW = ("burst", "prefix-live", "pd-legs", "tui-load", "autoscale", "hitrate", "split-replay")


def _invoke(*args: str) -> Result:
    return CliRunner().invoke(main, ["bench", *args])


def _one_sentence_error(res: Result, words: str, code: int = 1) -> None:
    assert res.exit_code == code, res.output
    assert words in res.output
    assert "Traceback" not in res.output


def _json(res: Result) -> dict[str, Any]:
    return json.loads(res.stdout[res.stdout.index("{"):])


@contextlib.contextmanager
def mock_server(**cfg: Any) -> Iterator[str]:
    """A mock OpenAI server on a loop of its own, for commands that run their own loop."""
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    server = MockServer(MockConfig(**cfg))
    url = asyncio.run_coroutine_threadsafe(server.start(), loop).result(10)
    try:
        yield url
    finally:
        asyncio.run_coroutine_threadsafe(server.stop(), loop).result(10)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(5)


def mooncake(tmp_path: Path, n: int = 60) -> Path:
    """Requests in 6 groups that share their first blocks, as a chat trace does."""
    path = tmp_path / "m.jsonl"
    lines = [json.dumps({"timestamp": i * 500, "input_length": 2048, "output_length": 16,
                         "hash_ids": [1000 * (i % 6) + k for k in range(3)] + [10**6 + i]})
             for i in range(n)]
    path.write_text("\n".join(lines) + "\n")
    return path


def azure(tmp_path: Path, n: int = 60, inp: int = 400) -> Path:
    path = tmp_path / "a.csv"
    rows = [f"2023-11-16 18:{i // 60:02d}:{i % 60:02d}.000000,{inp + 10 * (i % 5)},60"
            for i in range(n)]
    path.write_text("TIMESTAMP,ContextTokens,GeneratedTokens\n" + "\n".join(rows) + "\n")
    return path


# ------------------------------------------------------------------ help


@pytest.mark.parametrize("name", NEW)
def test_help_says_what_it_measures(name: str) -> None:
    res = _invoke(name, "--help")
    assert res.exit_code == 0, res.output
    assert "goal" in res.output.lower() or "TTFT" in res.output or "CPU" in res.output
    assert name in _invoke("--help").output


# ------------------------------------------------------------- bad input


def test_simulations_refuse_bad_input_in_one_sentence(tmp_path: Path) -> None:
    missing = str(tmp_path / "nope.csv")
    _one_sentence_error(_invoke("autoscale", missing), "no such trace file")
    _one_sentence_error(_invoke("hitrate", missing), "no such trace file")
    _one_sentence_error(_invoke("split-replay", "--first", missing), "no such trace file")
    trace = str(azure(tmp_path))
    _one_sentence_error(_invoke("autoscale", trace, "--max", "0"), "Invalid value for '--max'",
                        code=2)
    _one_sentence_error(_invoke("autoscale", trace, "--rate-scale", "0"), "'--rate-scale'",
                        code=2)
    _one_sentence_error(_invoke("autoscale", trace, "--profile", "cpu-tny"),
                        "no such built-in profile")
    _one_sentence_error(_invoke("hitrate", trace, "--workers", "0"), "'--workers'", code=2)
    both = ("--first", trace, "--then", trace)
    _one_sentence_error(_invoke("split-replay", "--profile", "cpu-tiny", *both),
                        "splits CPU cores")
    _one_sentence_error(_invoke("split-replay", "--profile", "cpu-aggregated", *both),
                        "is not P/D")


def test_live_commands_refuse_bad_input_before_starting_anything(monkeypatch) -> None:
    _one_sentence_error(_invoke("burst", "--endpoint", "localhost:8000"),
                        "give the endpoint as a URL", code=2)
    _one_sentence_error(_invoke("burst", "--chats", "0"), "'--chats'", code=2)
    _one_sentence_error(_invoke("prefix-live", "--regimes", "roomy,tight"),
                        "unknown regime 'tight'; use roomy, pressure", code=2)
    _one_sentence_error(_invoke("prefix-live", "--policies", "prefix,random"),
                        "unknown policy 'random'", code=2)
    _one_sentence_error(_invoke("prefix-live", "--turns", "1"), "'--turns'", code=2)
    _one_sentence_error(_invoke("pd-legs", "--variants", "fast"), "unknown variant 'fast'",
                        code=2)
    _one_sentence_error(_invoke("pd-legs", "--py-spy", "--py-spy-bin", "/no/py-spy"),
                        "py-spy not found", code=2)
    _one_sentence_error(_invoke("tui-load", "--rps", "0"), "'--rps'", code=2)
    monkeypatch.setattr(tui_load.shutil, "which", lambda name: None)
    _one_sentence_error(_invoke("tui-load", "--seconds", "1"), "tmux, which is not installed")


# ---------------------------------------------------------- simulations


def test_hitrate_on_a_small_trace(tmp_path: Path) -> None:
    res = _invoke("hitrate", str(mooncake(tmp_path)), "--json")
    assert res.exit_code == 0, res.output
    data = _json(res)
    assert data["trace"] == "m.jsonl" and data["requests"] == 60 and data["workers"] == 4
    policies = {r["run"]: r for r in data["policies"]}
    assert set(policies) == {"shared_lru", "prefix", "round_robin", "least_loaded"}
    assert policies["shared_lru"]["of_ceiling"] == 1.0
    assert policies["prefix"]["hit_rate"] > policies["round_robin"]["hit_rate"]
    assert len(data["indexes"]) == 6 and len(data["sweep"]) == 6
    assert isinstance(data["goal_met"], bool) and data["machine"]["cores_usable"] >= 1

    text = _invoke("hitrate", str(mooncake(tmp_path)), "--workers", "2")
    assert "### Policies" in text.output and "| prefix |" in text.output
    assert "goal (prefix ≥ 95 % of shared_lru" in text.output and "machine:" in text.output
    checked = _invoke("hitrate", str(mooncake(tmp_path)), "--check")
    assert checked.exit_code == (0 if data["goal_met"] else 1)


def test_autoscale_replays_three_ways(tmp_path: Path) -> None:
    res = _invoke("autoscale", str(azure(tmp_path)), "--max", "2", "--json")
    assert res.exit_code == 0, res.output
    data = _json(res)
    assert set(data["runs"]) == {"autoscale", "fixed-max", "fixed-min"}
    assert all("decisions" not in r for r in data["runs"].values())
    s = data["summary"]
    assert s["requests"] == 60 and s["profile"] == "cpu-tiny-max2"
    assert s["worker_seconds_vs_fixed_max"] > 0 and isinstance(s["goal_met"], bool)
    assert data["machine"]["dtype"]

    text = _invoke("autoscale", str(azure(tmp_path)), "--max", "2").output
    assert "fixed-min" in text and "autoscale / fixed-max: SLO attainment" in text


def test_split_replay_against_every_static_split(tmp_path: Path) -> None:
    first = azure(tmp_path, n=40)
    then = mooncake(tmp_path, n=20)
    res = _invoke("split-replay", "--first", str(first), "--then", str(then), "--head-s",
                  "60", "--json")
    assert res.exit_code == 0, res.output
    data = _json(res)
    assert data["profile"] == "gh200-pd" and data["first"] == 40 and data["then"] == 20
    assert set(data["runs"]) == {"adaptive", "soft_roles_only", "default_split"}
    assert len(data["static"]) == 9 and data["best_static"] in data["static"]
    for key in ("goal_best_static_met", "goal_1_2x_default_met"):
        assert isinstance(data[key], bool)
    assert data["adaptive_vs_default"] > 0 and data["machine"]["cpu_model"]

    text = _invoke("split-replay", "--first", str(first), "--then", str(then)).output
    assert "best static split in hindsight" in text and "prefill 90% SM" in text


# ----------------------------------------------------------------- burst


def test_burst_through_the_openai_sdk_against_a_mock() -> None:
    pytest.importorskip("openai")
    with mock_server(tokens=4) as url:
        res = _invoke("burst", "--endpoint", f"{url}/v1", "--chats", "3", "--turns", "2",
                      "--system-tokens", "20", "--max-tokens", "4")
    assert res.exit_code == 0, res.output
    data = json.loads(res.stdout)  # stdout is the JSON object and nothing else
    assert data["turns_answered"] == data["turns_wanted"] == 6 and data["errors"] == 0
    assert data["ttft_p50_s"] is not None and data["machine"]["cores_usable"] >= 1


def test_burst_exits_1_when_turns_fail() -> None:
    pytest.importorskip("openai")
    res = _invoke("burst", "--endpoint", "http://127.0.0.1:1/v1", "--chats", "1",
                  "--turns", "1", "--timeout", "1")
    assert res.exit_code == 1
    data = json.loads(res.stdout)
    assert data["errors"] == 1 and data["turns_answered"] == 0
    assert "APIConnectionError" in data["error_kinds"]


def test_the_burst_script_still_runs_as_the_e2e_test_calls_it() -> None:
    pytest.importorskip("openai")
    with mock_server(tokens=4) as url:
        out = subprocess.run(
            [sys.executable, str(REPO / "scripts" / "bench_burst.py"), "--endpoint",
             f"{url}/v1", "--chats", "2", "--turns", "2", "--system-tokens", "20",
             "--max-tokens", "4"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout)
    assert result["errors"] == 0 and result["turns_answered"] == 4


# ----------------------------------------------------------- prefix-live


def test_stream_keeps_the_answer_text_for_the_next_turn() -> None:
    async def one() -> client.Req:
        async with MockServer(MockConfig(tokens=5)) as m:
            import aiohttp

            async with aiohttp.ClientSession() as s:
                body = {"model": "smollm2", "messages": [{"role": "user", "content": "hi"}],
                        "max_tokens": 5}
                return await client.stream(s, f"{m.url}/v1/chat/completions", body, "chat")

    r = asyncio.run(one())
    assert not r.error and r.text and len(r.pieces) == 5


def test_prefix_live_over_a_mock_box(mock_boxes, monkeypatch) -> None:
    switched: list[str] = []
    # The mock has no control API; the switch itself is pdbox's (tests/unit/test_policy.py).
    monkeypatch.setattr(prefix_live, "set_policy", lambda b, policy: switched.append(policy))
    res = _invoke("prefix-live", "--regimes", "roomy", "--conversations", "3", "--turns", "2",
                  "--groups", "2", "--system-words", "10", "--user-words", "3",
                  "--max-tokens", "4", "--json")
    assert res.exit_code == 0, res.output
    data = _json(res)
    assert data["command"] == ("pdbox bench prefix-live --regimes roomy --conversations 3 "
                               "--turns 2 --groups 2 --system-words 10 --user-words 3 "
                               "--max-tokens 4 --json")
    roomy = data["regimes"]["roomy"]
    assert switched == ["prefix", "round_robin"] and roomy["groups"] == 2
    for policy in switched:
        r = roomy[policy]
        assert r["errors"] == [] and r["followup_ttft_p50_s"] is not None
        assert sum(r["requests_per_worker"].values()) == 6
    assert roomy["prefix_vs_round_robin_p50"] > 0 and "goal_ok" in roomy
    assert data["machine"]["cpu_model"]
    assert len(mock_boxes) == 1 and mock_boxes[0].proc.poll() is not None


def test_prefix_live_summary_counts_follow_ups_only() -> None:
    def req(ttft: float, prompt: int, cached: int | None, error: str = "") -> client.Req:
        return client.Req("chat", 0.0, ttft=ttft, prompt_tokens=prompt, cached_tokens=cached,
                          decode="aggregated-0", error=error)

    rows = [(0, req(2.0, 100, None)), (1, req(0.5, 200, 150)), (1, req(1.5, 200, 50)),
            (1, req(9.0, 0, None, error="429: busy"))]
    s = prefix_live.summarize(rows, 10.0)
    assert s["first_turn_ttft_p50_s"] == 2.0
    assert s["followup_ttft_p50_s"] == 0.5 and s["followup_ttft_p90_s"] == 1.5
    assert s["followup_cached_share"] == 0.5 and s["followup_prompt_tokens_mean"] == 200
    assert s["errors"] == ["429: busy"] and s["requests_per_worker"] == {"aggregated-0": 4}


# ---------------------------------------------------------------- pd-legs


class _FakePair:
    urls = {"prefill": "http://127.0.0.1:1", "decode": "http://127.0.0.1:2"}
    stopped = 0

    def pgid(self, role: str) -> int:
        return 0

    def stop(self) -> None:
        _FakePair.stopped += 1


def _legs(ratio: float) -> dict[str, Any]:
    return {"prompt_tokens": 630, "n": 3, "prefill_leg_p50_s": ratio, "plain_p50_s": 1.0,
            "ratio": ratio, "decode_first_token_p50_s": 0.1, "decode_total_p50_s": 0.3}


def test_pd_legs_reports_each_variant_and_stops_its_pair(monkeypatch) -> None:
    _FakePair.stopped = 0
    monkeypatch.setattr(pd_legs_run, "start_pair", lambda tmp, v, timeout: _FakePair())
    ratios = iter([(0.99, 1.0), (1.3, 1.1)])

    def measure(pair, p, tmp):
        cold, warm = next(ratios)
        return {"idle_cores_used": {"prefill": 0.0, "decode": 0.0}, "thread_affinity": {},
                "cold": _legs(cold), "warm": _legs(warm)}

    monkeypatch.setattr(pd_legs_run, "measure_pair", measure)
    res = _invoke("pd-legs", "--variants", "tuned", "--untuned", "--json")
    assert res.exit_code == 0, res.output
    data = _json(res)
    assert list(data["variants"]) == ["tuned", "untuned"] and _FakePair.stopped == 2
    assert data["variants"]["tuned"]["goal_ok"] and not data["variants"]["untuned"]["goal_ok"]
    assert data["variants"]["tuned"]["start_s"] >= 0 and data["machine"]["dtype"]
    assert "tuned     cold 630 tok: leg 0.99s" in res.stderr


def test_pd_legs_failure_is_one_sentence(monkeypatch) -> None:
    def fail(tmp, v, timeout):
        raise pd_legs_run.LegsError("a bare worker exited with 1")

    monkeypatch.setattr(pd_legs_run, "start_pair", fail)
    _one_sentence_error(_invoke("pd-legs", "--variants", "untuned"),
                        "variant 'untuned' failed (a bare worker exited with 1)")


# --------------------------------------------------------------- tui-load


def test_tui_load_paces_its_requests() -> None:
    async def run() -> dict[str, Any]:
        async with MockServer(MockConfig(tokens=4)) as m:
            return await tui_load.load(f"{m.url}/v1", rps=20, seconds=0.5)

    out = asyncio.run(run())
    # One a 20th of a second for half a second (an early wake-up may fit one more in).
    assert out["sent"] in (10, 11) and out["ok"] == out["sent"]
    assert out["rps_achieved"] == out["sent"] / 0.5 and out["latency_p50_s"] is not None
