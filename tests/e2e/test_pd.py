"""P/D tuning on cpu-tiny, measured on real workers: idle CPU and the prefill leg."""

from __future__ import annotations

import os
import time

import pytest

from pdbox.bench.pd_legs import measure
from pdbox.bench.procs import group_cpu
from tests.e2e.conftest import profile_variant

pytestmark = pytest.mark.e2e

# The machines are shared and noisy; a single timing can be off by a few tenths
# of a second. The goal is 1.2x; the test allows 1.2x plus this much.
NOISE_S = 0.35


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from tests.e2e.conftest import start_pdbox, stop_group

    tmp = tmp_path_factory.mktemp("pd")
    # A fixed split: these tests measure the P/D legs and the decider. With soft roles
    # (tests/e2e/test_soft_roles.py) streams started on an idle box may decode on the
    # prefill worker, and the first long prompt then stalls them once.
    prof = profile_variant(tmp, "cpu-tiny", "cpu-tiny-pd", **{"autoscaler.enabled": "false",
                                                              "router.soft_roles": "false"})
    box = start_pdbox(tmp, ["--profile", str(prof)])
    yield box
    stop_group(box.proc)


def test_idle_pd_workers_use_under_a_tenth_of_a_core(tiny):
    time.sleep(5)  # let the warm-up settle
    for w in tiny.status()["workers"]:
        used = group_cpu(w["pid"], 10.0)
        assert used < 0.10, f"{w['id']} used {used:.2f} of a core while idle"


def test_prefill_leg_close_to_plain_request(tiny):
    ws = {w["role"]: w for w in tiny.status()["workers"]}
    pre = f"http://127.0.0.1:{ws['prefill']['port']}"
    dec = f"http://127.0.0.1:{ws['decode']['port']}"
    cold = measure(pre, dec, "smollm2", words=600, rounds=3).summary()
    warm = measure(pre, dec, "smollm2", words=600, rounds=3, warm=True, seed=1).summary()
    for name, s in (("cold", cold), ("warm", warm)):
        limit = 1.2 * s["plain_p50_s"] + NOISE_S
        assert s["prefill_leg_p50_s"] <= limit, f"{name}: {s}"


def test_chat_message_against_real_pdbox(tiny):
    import json
    import subprocess
    import sys

    env = dict(os.environ, PDBOX_HOME=str(tiny.home))
    out = subprocess.run(
        [sys.executable, "-m", "pdbox.cli", "chat", "--message",
         "What is the capital of France?", "--json", "--temperature", "0", "--max-tokens", "24"],
        env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    data = json.loads(out.stdout)
    assert data["decode_worker"] == "decode-0"
    assert data["pd"] in ("local", "remote")
    question = {"model": "smollm2", "max_tokens": 24, "temperature": 0,
                "messages": [{"role": "user", "content": "What is the capital of France?"}]}
    assert data["answer"] == tiny.own_answer("decode-0", question), data


# ------------------------------------------- the decider and P/D correctness


def test_pd_greedy_answer_equals_the_prefill_workers_own(tiny):
    """Issue 11 item 6: a garbled KV transfer must fail a test (also `pdbox smoke`)."""
    import asyncio

    from pdbox.control_client import ControlClient
    from pdbox.smoke import run_checks

    results = asyncio.run(run_checks(tiny.endpoint, ControlClient(tiny.base, tiny.token()),
                                     names=["pd_greedy"]))
    assert len(results) == 1 and results[0].ok and not results[0].skipped, results[0].detail
    print(f"\npd_greedy: {results[0].detail}")


def _stream_gaps(endpoint: str, prompt: str, max_tokens: int, out: list, started) -> None:
    """Stream a completion; append (arrival time of each token event) to `out`."""
    import json
    import urllib.request

    req = urllib.request.Request(
        f"{endpoint}/completions",
        data=json.dumps({"model": "smollm2", "prompt": prompt, "max_tokens": max_tokens,
                         "temperature": 0, "ignore_eos": True, "stream": True}).encode(),
        headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=300) as r:
        for line in r:
            if line.startswith(b"data: ") and b"[DONE]" not in line:
                out.append(time.monotonic())
                started.set()


def test_long_prompts_beside_running_streams_do_not_stall_them(tiny):
    """Issue 11 item 3: ~900 then ~2,000 tokens with three streams running.

    Before, the 2,000-token prompt was prefilled on the decode worker and froze
    the three streams for 6.2 s. Now no stream may stall past twice the ITL
    target while the long prompts are served.
    """
    import json
    import threading
    import urllib.request

    from pdbox.smoke import unique_text

    itl_target = 0.25  # cpu-tiny's slo.itl_s
    streams: list[list[float]] = [[] for _ in range(3)]
    threads = []
    for i in range(3):
        started = threading.Event()
        t = threading.Thread(target=_stream_gaps, daemon=True,
                             args=(tiny.endpoint, f"Story {i}: once upon a time", 500,
                                   streams[i], started))
        t.start()
        threads.append(t)
        assert started.wait(120), "a decode stream did not start"
    time.sleep(2)  # let the three streams settle into steady decoding
    decisions = []
    t_from = time.monotonic()
    for words in (850, 1900):  # about 900 and 2,000 tokens (~1.06 tokens a word)
        body = {"model": "smollm2", "prompt": unique_text(words), "max_tokens": 8,
                "temperature": 0}
        req = urllib.request.Request(f"{tiny.endpoint}/completions",
                                     data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
        t0 = time.monotonic()
        with urllib.request.urlopen(req, timeout=300) as r:
            data = json.loads(r.read())
            decisions.append((data["usage"]["prompt_tokens"], r.headers.get("x-pdbox-pd"),
                              r.headers.get("x-pdbox-pd-reason"), round(time.monotonic() - t0, 2)))
    t_to = time.monotonic()
    running = [s for s in streams if s and s[-1] >= t_to - 0.5]
    for t in threads:
        t.join(300)
    assert len(running) == 3, f"the streams ended before the long prompts did: {decisions}"
    worst = 0.0
    for s in streams:
        inside = [t for t in s if t_from <= t <= t_to + 1.0]
        gaps = [b - a for a, b in zip(inside, inside[1:], strict=False)]
        worst = max([worst, *gaps])
    est = tiny.status()["router"]["decider"]
    print(f"\nlong prompts: {decisions}; worst stream gap {worst:.2f}s; decider: {est}")
    # The prefill worker's own engine figures teach the decider (not router wall time).
    assert est["teacher"].get("prefill-0") == "engine", est
    assert decisions[0][0] > 850 and decisions[1][0] > 1900, decisions
    assert worst <= 2 * itl_target, f"a stream stalled {worst:.2f}s; decisions: {decisions}"


# ------------------------------------------------------------------ live figures


def test_readme_curl_shows_ttft_and_tokens_per_s(tiny):
    """Issue 11 items 1-2: the README's curl (not streamed) sent 20 times shows TTFT and
    tokens/s in `pdbox status --json`; tokens/s agrees with the answers' usage within 10 %."""
    import json
    import subprocess
    import sys

    from pdbox.router.metrics import percentile
    from tests.faults.conftest import http_json

    def status() -> dict:
        env = dict(os.environ, PDBOX_HOME=str(tiny.home))
        out = subprocess.run([sys.executable, "-m", "pdbox.cli", "status", "--json"], env=env,
                             capture_output=True, text=True, timeout=60)
        assert out.returncode == 0, out.stderr
        return json.loads(out.stdout)["router"]

    deadline = time.monotonic() + 30  # earlier tests' tokens leave the rate window first
    while status()["tokens_per_s"] and time.monotonic() < deadline:
        time.sleep(1)
    # The README's body, greedy and bounded: a sampled answer can ramble on for minutes here.
    body = {"model": "smollm2", "temperature": 0, "max_tokens": 48,
            "messages": [{"role": "user", "content": "What is the capital of France?"}]}
    finished = []
    for _ in range(20):
        code, out = http_json(f"{tiny.endpoint}/chat/completions", body, timeout=120)
        assert code == 200, out
        finished.append((time.monotonic(), out["usage"]["completion_tokens"]))
    before = time.monotonic()
    r = status()
    after = time.monotonic()
    window = r["rate_window_s"]
    sure = sum(n for t, n in finished if t >= after - window)
    maybe = sum(n for t, n in finished if t >= before - window - 0.5)
    shown = r["tokens_per_s"] * window
    e2e = [t - s for (t, _), (s, _) in zip(finished[1:], finished[:-1], strict=True)]
    answer_p50 = percentile(e2e, 0.5)
    assert answer_p50 is not None
    print(f"\nREADME curl x20: tokens in the last {window:.0f}s: status {shown:.0f}, "
          f"usage {sure}..{maybe}; TTFT p50 {r['ttft_p50_s']}; answer p50 "
          f"{answer_p50:.2f}s; engine {r['engine']['roles']}")
    assert r["tokens_per_s"] > 0 and 0.9 * sure <= shown <= 1.1 * maybe, (shown, sure, maybe)
    assert r["ttft_p50_s"] is not None and 0 < r["ttft_p50_s"] < answer_p50
    assert r["engine"]["roles"]["decode"]["itl_count"] > 0
