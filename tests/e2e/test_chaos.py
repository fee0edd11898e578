"""Chaos on real workers: any worker, any time, and every request still ends whole.

One cpu-tiny pdbox (as shipped but for the request limit) serves closed-loop
streaming chats from CLIENTS clients while the test

1. kills the prefill worker between the two legs of a P/D request (the decode
   worker, held with SIGSTOP until the prefill leg answered, finds it gone at
   its NIXL pull and recomputes the prompt; the failed pull shows in /metrics),
   so the load starts with a worker restarting;
2. SIGKILLs a worker's main process while it restarts (starts or warms up),
   then SIGSTOPs a ready worker's whole process group for 20 s, then SIGKILLs
   random workers' main processes (`chaos_schedule`).

Then it checks what issue 21 asks: at least 99 % of requests answered whole
(a 429 counts as not whole even when the client's retry after Retry-After is
answered), none open past the profile's limit, every worker ready within 60 s
of the end, and no process of the box left once pdbox has exited on SIGTERM.

The figures are printed (`-s`) for docs/RELIABILITY.md. Wall time on 2 cores:
about 4 minutes, start-up included.
"""

from __future__ import annotations

import http.client
import json
import os
import random
import signal
import threading
import time
import urllib.request
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlparse

import pytest

from pdbox import strays
from pdbox.router.metrics import percentile, sum_series
from pdbox.workers.pgroup import running as group_running
from tests.e2e.conftest import Pdbox, profile_variant, slowness, start_pdbox, stop_group

pytestmark = pytest.mark.e2e

CLIENTS = 10
LOAD_S = 120.0  # closed-loop load, faults included
LIMIT_S = 60.0  # router.request_timeout_s: no request may stay open longer
# The limit this run uses: LIMIT_S stretched by how much slower than the reference
# this machine measured itself (conftest.slowness): the same ten clients are a
# heavier load on a slower CPU, and recovery from each fault takes longer there.
_limit = {"s": LIMIT_S}


def limit_s() -> float:
    return _limit["s"]
MAX_TOKENS = 32
STOP_S = 20.0
KILL_AFTER_CONT_S = 10.0  # the next SIGKILL, this long after the frozen worker resumed
LAST_KILL_BEFORE_END_S = 25.0  # one more SIGKILL if the load has this long left
READY_WITHIN_S = 60.0
WORDS = ("alpha beta gamma delta river mountain cloud stone paper light shadow garden music "
         "copper violet window harbor meadow lantern orbit canyon").split()


@dataclass
class Result:
    client: int
    started: float
    took: float
    kind: str  # whole | 429 | error_event | http_<code> | short | exception
    detail: str = ""
    tokens: int = 0


@dataclass
class Chaos:
    log: list[tuple[float, str]] = field(default_factory=list)
    groups: set[int] = field(default_factory=set)  # every worker process group seen


def workers(box: Pdbox) -> list[dict[str, Any]]:
    return box.status()["workers"]


def metrics_text(box: Pdbox) -> str:
    with urllib.request.urlopen(f"{box.base}/metrics", timeout=10) as r:
        return r.read().decode()


def prompt(rng: random.Random) -> str:
    # Mostly short chats (served whole on either worker); one in four long
    # enough (~300 tokens) for a remote prefill leg, so prefill deaths hit legs.
    n = 300 if rng.random() < 0.25 else rng.randint(4, 20)
    return " ".join(rng.choice(WORDS) for _ in range(n))


def one_request(base: str, body: dict[str, Any], timeout: float) -> tuple[str, str, int, float]:
    """(kind, detail, tokens, Retry-After seconds) of one streamed chat."""
    u = urlparse(base)
    conn = http.client.HTTPConnection(u.hostname, u.port, timeout=timeout)
    try:
        conn.request("POST", "/v1/chat/completions", body=json.dumps(body),
                     headers={"Content-Type": "application/json"})
        r = conn.getresponse()
        if r.status == 429:
            r.read()
            return "429", "", 0, float(r.headers.get("Retry-After") or 1)
        if r.status != 200:
            return f"http_{r.status}", r.read()[:200].decode(errors="replace"), 0, 0.0
        done = 0
        usage: int | None = None
        finish = None
        tokens = 0
        error = ""
        for raw in r:
            line = raw.strip()
            if not line.startswith(b"data:"):
                continue
            data = line[5:].strip()
            if data == b"[DONE]":
                done += 1
                continue
            ev = json.loads(data)
            if "error" in ev:
                error = str(ev["error"].get("message"))[:200]
                continue
            if ev.get("usage"):
                usage = ev["usage"].get("completion_tokens")
            for c in ev.get("choices") or []:
                if c.get("delta", {}).get("content"):
                    tokens += 1
                if c.get("finish_reason"):
                    finish = c["finish_reason"]
        if error:
            return "error_event", error, tokens, 0.0
        if done != 1 or finish is None or usage != MAX_TOKENS:
            return "short", f"done={done} finish={finish} usage={usage}", tokens, 0.0
        return "whole", "", tokens, 0.0
    finally:
        conn.close()


def client(box: Pdbox, i: int, stop: threading.Event, out: list[Result],
           lock: threading.Lock) -> None:
    rng = random.Random(1000 + i)
    while not stop.is_set():
        body = {"model": "smollm2", "stream": True, "max_tokens": MAX_TOKENS,
                "ignore_eos": True, "stream_options": {"include_usage": True},
                "messages": [{"role": "user", "content": prompt(rng)}]}
        t0 = time.monotonic()
        try:
            kind, detail, tokens, retry_after = one_request(box.base, body, limit_s() + 60)
        except (OSError, http.client.HTTPException, ValueError) as exc:
            kind, detail, tokens, retry_after = "exception", repr(exc)[:200], 0, 0.0
        with lock:
            out.append(Result(i, t0, time.monotonic() - t0, kind, detail, tokens))
        if kind == "429":
            stop.wait(retry_after)  # the client honours Retry-After; the request counts as lost
        elif kind != "whole":
            stop.wait(1.0)


def note_groups(box: Pdbox, chaos: Chaos) -> None:
    try:
        chaos.groups.update(w["pgid"] for w in box.state().get("workers", []) if w.get("pgid"))
    except (OSError, ValueError):
        pass


def chaos_schedule(box: Pdbox, t_load: float, stop: threading.Event, chaos: Chaos) -> None:
    """The faults, each when the box is in the state it needs, on workers picked at
    random:

    1. SIGKILL of a worker on its way back (starting or warming: the prefill
       worker killed between the legs, or whichever restarts first);
    2. SIGSTOP for STOP_S of the ready worker with the most requests in flight
       (its streams must move), once two serving workers are ready (a freeze
       beside capacity, not a box with none), or after 40 s whatever is ready;
    3. SIGKILL of the busiest ready worker KILL_AFTER_CONT_S after the freeze
       ends, and of a random one while the load has LAST_KILL_BEFORE_END_S left.
    """
    rng = random.Random(21)

    def log(what: str) -> None:
        chaos.log.append((time.monotonic() - t_load, what))

    def wait_for(pred: Any, timeout: float) -> list[dict[str, Any]] | None:
        deadline = time.monotonic() + timeout
        while not stop.is_set():
            note_groups(box, chaos)
            ws = [w for w in workers(box) if w.get("pid")]
            if pred(ws) or time.monotonic() >= deadline:
                return ws
            stop.wait(0.5)
        return None

    def busiest(ws: list[dict[str, Any]]) -> dict[str, Any]:
        ready = [w for w in ws if w["state"] == "ready"] or ws
        top = max(w.get("inflight") or 0 for w in ready)
        return rng.choice([w for w in ready if (w.get("inflight") or 0) == top])

    def kill(ws: list[dict[str, Any]], pick: dict[str, Any] | None = None) -> None:
        pick = pick or rng.choice(ws)
        try:
            os.kill(pick["pid"], signal.SIGKILL)
            log(f"SIGKILL {pick['id']} ({pick['state']}) pid {pick['pid']}")
        except ProcessLookupError:
            log(f"SIGKILL {pick['id']}: already gone")

    ws = wait_for(lambda ws: any(w["state"] in ("starting", "warming") for w in ws), 15)
    if ws is None:
        return
    kill([w for w in ws if w["state"] in ("starting", "warming")] or ws)
    ws = wait_for(lambda ws: sum(w["state"] == "ready" for w in ws) >= 2, 40)
    if ws is None:
        return
    pick = busiest(ws)
    pgid = os.getpgid(pick["pid"])
    os.killpg(pgid, signal.SIGSTOP)
    log(f"SIGSTOP {pick['id']} for {STOP_S:.0f} s ({pick.get('inflight')} in flight; "
        f"{sum(w['state'] == 'ready' for w in ws)} ready)")
    stop.wait(STOP_S)
    try:
        os.killpg(pgid, signal.SIGCONT)
    except ProcessLookupError:
        pass  # restarted meanwhile (frozen past the supervisor's limit)
    log(f"SIGCONT {pick['id']}")
    if stop.wait(KILL_AFTER_CONT_S):
        return
    ws = wait_for(lambda ws: True, 0)
    if ws:
        kill(ws, busiest(ws))
    while not stop.wait(1.0):
        if LOAD_S - (time.monotonic() - t_load) <= LAST_KILL_BEFORE_END_S:
            if LOAD_S - (time.monotonic() - t_load) > LAST_KILL_BEFORE_END_S - 5:
                ws = wait_for(lambda ws: True, 0)
                if ws:
                    kill(ws)
            return


@pytest.fixture(scope="module")
def box(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Pdbox]:
    tmp = tmp_path_factory.mktemp("chaos")
    _limit["s"] = round(LIMIT_S * slowness())
    prof = profile_variant(tmp, "cpu-tiny", "cpu-tiny-chaos",
                           **{"router.request_timeout_s": str(limit_s())})
    b = start_pdbox(tmp, ["--profile", str(prof)])
    yield b
    stop_group(b.proc)
    for w in _state(b).get("workers", []):
        if w.get("pgid") and group_running(w["pgid"]):
            os.killpg(w["pgid"], signal.SIGKILL)


def _state(b: Pdbox) -> dict[str, Any]:
    try:
        return b.state()
    except (OSError, ValueError):
        return {}


def kill_prefill_between_legs(box: Pdbox) -> float:
    """The prefill worker SIGKILLed after its leg answered, before the decode
    worker's NIXL pull; returns the seconds from the kill to the answer."""
    ws = {w["role"]: w for w in workers(box)}
    prefill, decode = ws["prefill"], ws["decode"]
    rng = random.Random(7)
    text = " ".join(rng.choice(WORDS) for _ in range(500))
    # One remote request first, so the NIXL handshake is done and the fault hits the pull.
    req = urllib.request.Request(f"{box.endpoint}/completions", data=json.dumps({
        "model": "smollm2", "prompt": text, "max_tokens": 2}).encode(),
        headers={"Content-Type": "application/json", "x-pdbox-pd": "remote"})
    with urllib.request.urlopen(req, timeout=120) as r:
        assert r.headers.get("x-pdbox-pd") == "remote", dict(r.headers)
    legs = sum_series(metrics_text(box), "pdbox_routed_total", worker=prefill["id"], leg="prefill")
    result: dict[str, Any] = {}

    def send() -> None:
        body = {"model": "smollm2", "prompt": text[::-1], "max_tokens": 8, "temperature": 0}
        r = urllib.request.Request(f"{box.endpoint}/completions", data=json.dumps(body).encode(),
                                   headers={"Content-Type": "application/json",
                                            "x-pdbox-pd": "remote"})
        try:
            with urllib.request.urlopen(r, timeout=120) as resp:
                result["answer"] = (resp.status, json.load(resp))
        except OSError as exc:
            result["answer"] = (0, repr(exc))

    decode_group = os.getpgid(decode["pid"])
    os.killpg(decode_group, signal.SIGSTOP)  # no pull before the prefill worker is gone
    t = threading.Thread(target=send)
    t.start()
    try:
        deadline = time.monotonic() + 30 * slowness()
        while time.monotonic() < deadline:
            if sum_series(metrics_text(box), "pdbox_routed_total", worker=prefill["id"],
                          leg="prefill") > legs:
                break
            time.sleep(0.05)
        else:
            pytest.fail("the prefill leg did not finish in time")
        # The whole group: the KV and the NIXL agent live in the engine core, which
        # outlives a SIGKILL of the main process alone until the supervisor ends it.
        os.killpg(os.getpgid(prefill["pid"]), signal.SIGKILL)
        t_kill = time.monotonic()
    finally:
        os.killpg(decode_group, signal.SIGCONT)
    t.join(120)
    code, body = result["answer"]
    assert code == 200 and body["choices"][0]["text"] is not None, (code, body)
    took = time.monotonic() - t_kill
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        if sum_series(metrics_text(box), "pdbox_worker_nixl_failed_transfers",
                      worker=decode["id"]) >= 1:
            break
        time.sleep(1)
    else:
        pytest.fail("the failed NIXL pull is not in pdbox's /metrics")
    return took


def test_chaos(box: Pdbox) -> None:
    figures: dict[str, Any] = {"limit_s": limit_s()}
    chaos = Chaos()
    note_groups(box, chaos)
    figures["prefill_killed_between_legs_answered_s"] = round(kill_prefill_between_legs(box), 1)
    chaos.log.append((0.0, "SIGKILL prefill between the legs of a P/D request (before the load)"))

    results: list[Result] = []
    lock = threading.Lock()
    stop = threading.Event()
    t_load = time.monotonic()
    threads = [threading.Thread(target=client, args=(box, i, stop, results, lock), daemon=True)
               for i in range(CLIENTS)]
    for t in threads:
        t.start()
    faults = threading.Thread(target=chaos_schedule, args=(box, t_load, stop, chaos), daemon=True)
    faults.start()
    time.sleep(LOAD_S)
    stop.set()
    faults.join(STOP_S + 60)
    for t in threads:
        t.join(limit_s() + 90)
    t_end = time.monotonic()
    assert not any(t.is_alive() for t in threads), "a client never got its request ended"

    # Every worker ready again, and the box serving, within READY_WITHIN_S of the end.
    snap = box.wait_worker(lambda s: s["workers"] and all(
        w["state"] == "ready" for w in s["workers"]), timeout=READY_WITHIN_S)
    ready_after = time.monotonic() - t_end
    code = one_request(box.base, {"model": "smollm2", "stream": True, "max_tokens": MAX_TOKENS,
                                  "ignore_eos": True, "stream_options": {"include_usage": True},
                                  "messages": [{"role": "user", "content": "hi"}]}, 60)[0]
    assert code == "whole", code
    note_groups(box, chaos)
    text = metrics_text(box)
    router = box.status()["router"]

    kinds = Counter(r.kind for r in results)
    n = len(results)
    whole = kinds["whole"]
    past = [r for r in results if r.took > limit_s() + 1.0]
    took = [r.took for r in results]
    ends = {k.split('outcome="')[1].split('"')[0]: v for k, v in (
        (line.split(" ")[0], float(line.split(" ")[1])) for line in text.splitlines()
        if line.startswith("pdbox_requests_total{"))}
    figures.update({
        "requests": n, "whole": whole, "whole_pct": round(100 * whole / max(1, n), 2),
        "kinds": dict(kinds), "open_past_limit": len(past),
        "longest_s": round(max(took), 1) if took else None,
        "p50_s": round(percentile(took, 0.5) or 0, 2),
        "p99_s": round(percentile(took, 0.99) or 0, 2),
        "moves": sum_series(text, "pdbox_migrations_total", outcome="moved"),
        "moves_failed": sum_series(text, "pdbox_migrations_total", outcome="failed"),
        "fallbacks": sum_series(text, "pdbox_fallbacks_total"),
        "router_ends": ends,
        "rejected_by": router.get("rejected_by"),
        "frozen": (router.get("migrations") or {}).get("frozen"),
        "most_moves_one_stream": (router.get("migrations") or {}).get("most_moves"),
        "workers_ready_after_end_s": round(ready_after, 1),
        "workers": [(w["id"], w["state"], w.get("restarts")) for w in snap["workers"]],
        "faults": [f"{t:.0f}s {what}" for t, what in chaos.log],
    })
    not_whole = [(r.kind, r.detail) for r in results if r.kind != "whole"][:10]

    # pdbox down (SIGTERM): once it returns, no process of the box is left.
    t_term = time.monotonic()
    stop_group(box.proc)
    figures["sigterm_exit_s"] = round(time.monotonic() - t_term, 1)
    left = [g for g in chaos.groups if group_running(g)]
    named = strays.started_by(box.proc.pid, None)
    figures["left_after_exit"] = len(left) + len(named)
    print(f"\nchaos figures: {json.dumps(figures)}\nnot whole (first 10): {not_whole}")

    assert box.proc.returncode == 0, box.stderr()[-2000:]
    assert not left and not named, (left, [(p.pid, p.name) for p in named])
    assert not past, [(r.kind, round(r.took, 1)) for r in past]
    assert n >= 5 * CLIENTS, figures
    assert whole >= 0.99 * n, (figures, not_whole)
    assert ready_after <= READY_WITHIN_S
