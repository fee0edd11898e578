"""Trace windows scaled to a small box: lengths, arrivals, shared prefixes as shared token runs."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from pdbox.bench.trace import (
    FIRST_ID,
    Scaling,
    TokenRuns,
    TraceWindowError,
    default_input_scale,
    describe,
    scale_window,
    select_window,
)
from pdbox.replay.traces import TraceRequest


def mooncake() -> list[TraceRequest]:
    # Requests 0 and 2 share blocks 1, 2; request 1 shares block 1 only.
    return [
        TraceRequest(0.0, 1300, 10, (1, 2, 3)),  # 2 full blocks + 276 tokens
        TraceRequest(2.0, 600, 500, (1, 9)),
        TraceRequest(4.0, 1024, 40, (1, 2)),
        TraceRequest(10.0, 100, 5, (7,)),
    ]


def test_window_arrivals_follow_start_speed_and_duration() -> None:
    reqs = mooncake()
    w = select_window(reqs, start_s=2.0, duration_s=2.0, speed=2.0)  # trace 2..6 s
    assert [x.index for x in w] == [1, 2]
    assert [x.arrival_s for x in w] == [0.0, 1.0]  # (4 - 2) / 2
    slow = select_window(reqs, start_s=0.0, duration_s=100.0, speed=0.5)
    assert [x.arrival_s for x in slow] == [0.0, 4.0, 8.0, 20.0]


def test_empty_window_and_bad_factors_say_why() -> None:
    with pytest.raises(TraceWindowError, match="no request arrives between 20 s and 30 s"):
        select_window(mooncake(), 20.0, 10.0, 1.0)
    with pytest.raises(TraceWindowError, match="--speed"):
        select_window(mooncake(), 0.0, 10.0, 0.0)
    with pytest.raises(TraceWindowError, match="output cap"):
        Scaling(0.1, 4096, 4096)


def test_lengths_scale_and_fit_the_context() -> None:
    s = Scaling(input_scale=0.1, max_output=64, max_model_len=512)
    assert s.block_tokens == 51  # 512 × 0.1, rounded
    assert s.output(500) == 64 and s.output(10) == 10 and s.output(0) == 1
    assert s.input(1300, 10) == 130
    assert s.input(100_000, 64) == 512 - 64  # prompt and answer fit together
    assert s.input(1, 10) == 1
    assert Scaling(0.0001, 1, 16).block_tokens == 1  # never an empty block


def test_default_scale_puts_the_p90_prompt_at_half_the_context() -> None:
    assert default_input_scale([1000] * 9 + [8192], 4096) == 1.0  # p90 is 1,000: fits
    assert default_input_scale([1000] * 8 + [8192] * 2, 4096) == pytest.approx(0.25)
    assert default_input_scale([100] * 10, 4096) == 1.0  # never scaled up
    assert default_input_scale([], 4096) == 1.0


def test_shared_blocks_become_shared_token_prefixes() -> None:
    scaling = Scaling(input_scale=0.02, max_output=16, max_model_len=4096)
    bt = scaling.block_tokens  # round(512 × 0.02) = 10
    assert bt == 10
    out = scale_window(select_window(mooncake(), 0.0, 100.0, 1.0), scaling, vocab_size=50_000)
    a, b, c, d = (list(x.prompt) for x in out)
    assert len(a) == 26 and len(b) == 12 and len(c) == 20  # 1300, 600, 1024 × 0.02
    assert a[:2 * bt] == c[:2 * bt]  # blocks 1, 2 shared
    assert a[:bt] == b[:bt] and a[bt:2 * bt] != b[bt:2 * bt]  # block 1 only
    # The last partial block is cut to the scaled length: block 3's first 6 tokens.
    runs = TokenRuns(50_000, bt)
    assert a[2 * bt:] == runs.block(3)[:6]
    assert all(FIRST_ID <= t < 50_000 for t in a + b + c + d)
    assert [x.max_tokens for x in out] == [10, 16, 16, 5]


def test_token_runs_are_deterministic_and_seeded() -> None:
    r1, r2 = TokenRuns(32_000, 8, seed=0), TokenRuns(32_000, 8, seed=0)
    assert r1.block(42) == r2.block(42)
    assert r1.block(42) != TokenRuns(32_000, 8, seed=1).block(42)
    assert r1.block(42) != r1.block(43)
    # In a fresh process too: the runs do not depend on hash randomisation.
    code = ("from pdbox.bench.trace import TokenRuns; import json; "
            "print(json.dumps(TokenRuns(32000, 8).block(42)))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True)
    assert json.loads(out.stdout) == r1.block(42)


def test_azure_requests_get_unique_runs() -> None:
    azure = [TraceRequest(0.0, 400, 20), TraceRequest(1.0, 400, 20), TraceRequest(2.0, 50, 5)]
    out = scale_window(select_window(azure, 0.0, 10.0, 1.0),
                       Scaling(0.5, 32, 4096), vocab_size=32_000)
    p0, p1, p2 = (x.prompt for x in out)
    assert len(p0) == len(p1) == 200 and len(p2) == 25
    assert p0[:8] != p1[:8] and p0[:8] != p2[:8]
    # The same request gets the same tokens in every setup.
    again = scale_window(select_window(azure, 0.0, 10.0, 1.0), Scaling(0.5, 32, 4096))
    assert again[0].prompt == p0


def test_a_request_longer_than_its_blocks_is_filled_with_its_own_run() -> None:
    reqs = [TraceRequest(0.0, 2048, 8, (5,)), TraceRequest(0.5, 2048, 8, (5,))]
    out = scale_window(select_window(reqs, 0.0, 10.0, 1.0), Scaling(0.01, 8, 4096))
    a, b = out[0].prompt, out[1].prompt
    bt = Scaling(0.01, 8, 4096).block_tokens
    assert len(a) == 20 and a[:bt] == b[:bt] and a[bt:] != b[bt:]


def test_describe_the_scaled_window() -> None:
    scaling = Scaling(0.02, 16, 4096)
    out = scale_window(select_window(mooncake(), 0.0, 100.0, 1.0), scaling)
    d = describe(out, scaling)
    assert d["requests"] == 4 and d["block_tokens"] == 10
    assert d["input_tokens_max"] == 26
    assert d["arrivals_per_s"] == pytest.approx(0.4)


def test_pure_bench_modules_import_nothing_heavy() -> None:
    code = ("import sys, json; import pdbox.bench.trace, pdbox.bench.goodput, "
            "pdbox.bench.machine, pdbox.bench.setups, pdbox.bench.report; "
            "print(json.dumps([m for m in ('textual', 'torch', 'vllm') if m in sys.modules]))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True)
    assert json.loads(out.stdout) == []
