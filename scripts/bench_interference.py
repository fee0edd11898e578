#!/usr/bin/env python3
"""Interference benchmark: decode smoothness under long prompts, P/D against aggregated.

Both setups run on the same cores, one after the other in one run of this script, each
behind pdbox's router (`pdbox up --headless --profile X --port 0`, its own PDBOX_HOME, the
shared PDBOX_MODELS_DIR):

  - pd-adaptive:  cpu-tiny (prefill on core 0, decode on core 1, KV over NIXL), adaptive decider
  - pd-threshold: the same with `router.pd_decider = "threshold"` (remote whenever ≥ 256 uncached)
  - aggregated:   cpu-aggregated (two aggregated workers, one per core)

The autoscaler is off in every variant so the worker count stays fixed.

Workload, identical for each setup: S decode streams (short unique prompt, N tokens with
ignore_eos, restarted as they finish) while L long prompts of unique text (~630 tokens, so no
prefix cache hides them) arrive one every `interval` seconds. Measured client-side:

  - ITL of the decode streams: gaps between SSE events as the client reads them;
  - TTFT of the long prompts: send to first SSE event;
  - output tokens/s: SSE events carrying text, all requests, over the measured window;
  - per request the router's x-pdbox-pd / x-pdbox-pd-reason headers.

Goals (P/D against aggregated): ITL p99 ≤ 0.5×, long-prompt TTFT p50 ≤ 1.3×, tokens/s ≥ 0.9×.

Run it under the worker lock, e.g.
    .venv/bin/python scripts/bench_interference.py --json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import re
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from pdbox.bench.pd_legs import unique_prompt  # noqa: E402
from pdbox.router.metrics import percentile as pct  # noqa: E402
from tests.e2e.conftest import Pdbox, start_pdbox, stop_group  # noqa: E402

SETUPS: dict[str, tuple[str, dict[str, str]]] = {
    "pd-adaptive": ("cpu-tiny", {"router.pd_decider": '"adaptive"'}),
    "pd-threshold": ("cpu-tiny", {"router.pd_decider": '"threshold"'}),
    "aggregated": ("cpu-aggregated", {}),
}
NO_AUTOSCALER = {"autoscaler.enabled": "false"}


# ------------------------------------------------------------------ profiles


def write_variant(tmp: Path, base: str, name: str, overrides: dict[str, str]) -> Path:
    """A copy of a built-in profile with `section.key = value` set (replaced or added).

    Unlike the e2e fixture's profile_variant this also adds keys and sections the
    base profile leaves to their defaults (cpu-aggregated has no [autoscaler]).
    """
    lines = (REPO / "profiles" / f"{base}.toml").read_text().splitlines()
    todo = dict(overrides)
    out: list[str] = []
    section = ""

    def flush(sec: str) -> None:
        for key in [k for k in todo if k.rsplit(".", 1)[0] == sec]:
            out.append(f"{key.rsplit('.', 1)[1]} = {todo.pop(key)}")

    for line in lines:
        m = re.match(r"^\[(.+)\]", line.strip())
        if m:
            flush(section)
            section = m.group(1)
        km = re.match(r"^(\w+)\s*=", line)
        full = f"{section}.{km.group(1)}" if km and section else None
        if full and full in todo:
            line = f"{km.group(1)} = {todo.pop(full)}"
        if not section and line.startswith("name ="):
            line = f'name = "{name}"'
        out.append(line)
    flush(section)
    for sec in sorted({k.rsplit(".", 1)[0] for k in todo}):
        out.append(f"\n[{sec}]")
        flush(sec)
    path = tmp / f"{name}.toml"
    path.write_text("\n".join(out) + "\n")
    return path


def start_setup(tmp: Path, base: str, name: str, overrides: dict[str, str]) -> Pdbox:
    prof = write_variant(tmp, base, name, {**NO_AUTOSCALER, **overrides})
    work = tmp / name
    work.mkdir(parents=True, exist_ok=True)
    return start_pdbox(work, ["--profile", str(prof)])


# ------------------------------------------------------------------ client


@dataclass
class Req:
    kind: str  # stream | long | warm
    sent: float
    ttft: float | None = None
    events: list[float] = field(default_factory=list)  # arrival time of each text event
    pd: str = ""
    reason: str = ""
    decode: str = ""
    prefill: str = ""
    prompt_tokens: int = 0
    error: str = ""


async def stream(session: aiohttp.ClientSession, url: str, body: dict[str, Any],
                 kind: str, sink: list[Req] | None = None) -> Req:
    """One streamed completion; every SSE event's arrival time is recorded.

    The Req goes into `sink` at once, so a stream cancelled at the end of the
    window still counts the events it received.
    """
    r = Req(kind, time.monotonic())
    if sink is not None:
        sink.append(r)
    body = dict(body, stream=True, stream_options={"include_usage": True})
    try:
        async with session.post(url, json=body) as resp:
            h = resp.headers
            r.pd, r.reason = h.get("x-pdbox-pd", ""), h.get("x-pdbox-pd-reason", "")
            r.decode, r.prefill = h.get("x-pdbox-decode-worker", ""), h.get(
                "x-pdbox-prefill-worker", "")
            if resp.status != 200:
                r.error = f"{resp.status}: {(await resp.text())[:200]}"
                return r
            async for line in resp.content:
                if not line.startswith(b"data: {"):
                    continue
                now = time.monotonic()
                d = json.loads(line[6:])
                if d.get("usage"):
                    r.prompt_tokens = d["usage"].get("prompt_tokens", 0)
                ch = d.get("choices") or []
                if ch and ch[0].get("text"):
                    if r.ttft is None:
                        r.ttft = now - r.sent
                    r.events.append(now)
    except asyncio.CancelledError:
        r.error = "cancelled"
        raise
    except (aiohttp.ClientError, TimeoutError) as exc:
        r.error = str(exc)
    return r


async def calibrate_words(session: aiohttp.ClientSession, url: str, model: str,
                          rng: random.Random, target_tokens: int) -> int:
    """How many words of unique_prompt text make about target_tokens tokens."""
    body = {"model": model, "prompt": unique_prompt(rng, 200), "max_tokens": 1}
    async with session.post(url, json=body) as resp:
        n = (await resp.json())["usage"]["prompt_tokens"]
    return max(10, round(200 * target_tokens / n))


class Bodies:
    """The workload's two kinds of request, each with a unique prompt: a long
    prompt of about `args.long_tokens` tokens, and a short one that streams."""

    def __init__(self, model: str, words: int, rng: random.Random, args: argparse.Namespace):
        self.model, self.words, self.rng, self.args = model, words, rng, args

    @classmethod
    async def open(cls, session: aiohttp.ClientSession, endpoint: str,
                   args: argparse.Namespace, rng: random.Random) -> Bodies:
        """The served model, and the prompt length that makes `args.long_tokens`."""
        async with session.get(f"{endpoint}/models") as resp:
            model = (await resp.json())["data"][0]["id"]
        words = await calibrate_words(session, f"{endpoint}/completions", model, rng,
                                      args.long_tokens)
        return cls(model, words, rng, args)

    def long(self) -> dict[str, Any]:
        return {"model": self.model, "prompt": unique_prompt(self.rng, self.words),
                "max_tokens": self.args.long_max_tokens, "ignore_eos": True}

    def stream(self) -> dict[str, Any]:
        return {"model": self.model,
                "prompt": unique_prompt(self.rng, 12) + " Tell a long story.",
                "max_tokens": self.args.stream_tokens, "ignore_eos": True, "temperature": 0.0}


async def workload(endpoint: str, args: argparse.Namespace, seed: int) -> dict[str, Any]:
    url = f"{endpoint}/completions"
    rng = random.Random(seed)
    timeout = aiohttp.ClientTimeout(total=600)
    async with aiohttp.ClientSession(timeout=timeout) as session:
        bodies = await Bodies.open(session, endpoint, args, rng)
        long_body, stream_body = bodies.long, bodies.stream

        # Warm-up: every worker computes once, and the decider sees a few legs of
        # each kind (short, long alone, long under streams) before measuring.
        warm: list[Req] = []
        for _ in range(2):
            warm.append(await stream(session, url, dict(stream_body(), max_tokens=16), "warm"))
            warm.append(await stream(session, url, long_body(), "warm"))
        bg = [asyncio.create_task(stream(session, url, dict(stream_body(), max_tokens=48),
                                         "warm")) for _ in range(args.streams)]
        await asyncio.sleep(1.0)
        warm.append(await stream(session, url, long_body(), "warm"))
        warm += await asyncio.gather(*bg)

        # Measured run.
        stop = asyncio.Event()
        streams: list[Req] = []

        async def stream_loop() -> None:
            while not stop.is_set():
                await stream(session, url, stream_body(), "stream", streams)

        t_start = time.monotonic()
        loops = [asyncio.create_task(stream_loop()) for _ in range(args.streams)]
        await asyncio.sleep(args.lead_s)
        longs: list[asyncio.Task[Req]] = []
        for _ in range(args.long_prompts):
            longs.append(asyncio.create_task(stream(session, url, long_body(), "long")))
            await asyncio.sleep(args.interval_s)
        long_reqs = list(await asyncio.gather(*longs))
        t_end = time.monotonic()
        stop.set()
        # Streams still open are measured up to t_end: their partial events count.
        for t in loops:
            t.cancel()
        await asyncio.gather(*loops, return_exceptions=True)
    return summarise(streams, long_reqs, warm, t_start, t_end, args)


def summarise(streams: list[Req], longs: list[Req], warm: list[Req], t0: float, t1: float,
              args: argparse.Namespace) -> dict[str, Any]:
    gaps: list[float] = []
    tokens = 0
    for r in streams:
        ev = [t for t in r.events if t0 <= t <= t1]
        gaps += [b - a for a, b in zip(ev, ev[1:], strict=False)]
        tokens += len(ev)
    for r in longs:
        tokens += sum(1 for t in r.events if t0 <= t <= t1)
    ttfts = [r.ttft for r in longs if r.ttft is not None]
    window = t1 - t0
    remote = [r for r in longs if r.pd == "remote"]
    out = {
        "window_s": round(window, 2),
        "itl_p50_ms": _ms(pct(gaps, 0.5)),
        "itl_p99_ms": _ms(pct(gaps, 0.99)),
        "itl_p999_ms": _ms(pct(gaps, 0.999)),
        "itl_max_ms": _ms(max(gaps) if gaps else None),
        "itl_samples": len(gaps),
        # p99 depends on how many gaps a run has; the share over the SLO does not.
        "itl_over_250ms_share": round(sum(g > 0.25 for g in gaps) / len(gaps), 4) if gaps else None,
        "itl_stall_s": round(sum(g for g in gaps if g > 0.25), 2),
        "long_ttft_p50_s": _r(pct(ttfts, 0.5)),
        "long_ttft_p90_s": _r(pct(ttfts, 0.9)),
        "long_ttft_s": [_r(x) for x in ttfts],
        "long_prompt_tokens": [r.prompt_tokens for r in longs],
        "output_tokens_per_s": round(tokens / window, 2) if window > 0 else None,
        "output_tokens": tokens,
        "streams_completed": len(streams),
        "long_remote_share": (len(remote) / len(longs)) if longs else None,
        "errors": [r.error for r in streams + longs if r.error and r.error != "cancelled"],
        "long_decisions": [{"pd": r.pd, "reason": r.reason, "decode": r.decode,
                            "prefill": r.prefill, "ttft_s": _r(r.ttft)} for r in longs],
        "stream_pd": _count(r.pd for r in streams),
        "warmup_pd": _count(r.pd for r in warm),
    }
    return out


def _count(values: Any) -> dict[str, int]:
    out: dict[str, int] = {}
    for v in values:
        out[v or "?"] = out.get(v or "?", 0) + 1
    return out


def _ms(x: float | None) -> float | None:
    return None if x is None else round(1000 * x, 1)


def _r(x: float | None) -> float | None:
    return None if x is None else round(x, 3)


# ------------------------------------------------------------------ main


def run_setup(tmp: Path, name: str, args: argparse.Namespace, seed: int) -> dict[str, Any]:
    base, overrides = SETUPS[name]
    t = time.monotonic()
    box = start_setup(tmp, base, f"bench-{name}", overrides)
    started = time.monotonic() - t
    try:
        load_before = os.getloadavg()[0]
        res = asyncio.run(workload(box.endpoint, args, seed))
        # The box is shared: the 1-minute load average says how noisy the run was.
        res["loadavg_1m"] = [round(load_before, 1), round(os.getloadavg()[0], 1)]
        st = box.status()
        res["decider"] = st.get("router", {}).get("decider")
        res["router_pd"] = {k: st.get("router", {}).get(k) for k in ("pd_remote", "pd_local",
                                                                    "fallbacks", "nixl_xfer_ms")}
        res["workers"] = [{"id": w["id"], "cores": w.get("cores"), "pid": w.get("pid")}
                          for w in st.get("workers", [])]
    finally:
        stop_group(box.proc)
    res["profile"] = base
    res["start_s"] = round(started, 1)
    return res


def compare(pd: dict[str, Any], agg: dict[str, Any]) -> dict[str, Any]:
    def ratio(a: Any, b: Any) -> float | None:
        return round(a / b, 3) if a is not None and b else None

    itl = ratio(pd["itl_p99_ms"], agg["itl_p99_ms"])
    ttft = ratio(pd["long_ttft_p50_s"], agg["long_ttft_p50_s"])
    tps = ratio(pd["output_tokens_per_s"], agg["output_tokens_per_s"])
    return {
        "itl_p99_ratio": itl, "itl_p99_ok": itl is not None and itl <= 0.5,
        "ttft_p50_ratio": ttft, "ttft_p50_ok": ttft is not None and ttft <= 1.3,
        "tokens_per_s_ratio": tps, "tokens_per_s_ok": tps is not None and tps >= 0.9,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--setups", default="pd-adaptive,pd-threshold,aggregated",
                    help="comma-separated, run in this order: " + ", ".join(SETUPS))
    ap.add_argument("--streams", type=int, default=4, help="concurrent decode streams")
    ap.add_argument("--stream-tokens", type=int, default=200)
    ap.add_argument("--long-prompts", type=int, default=7)
    ap.add_argument("--long-tokens", type=int, default=630, help="tokens per long prompt")
    ap.add_argument("--long-max-tokens", type=int, default=16)
    ap.add_argument("--interval-s", type=float, default=3.0)
    ap.add_argument("--lead-s", type=float, default=3.0,
                    help="seconds the streams run before the first long prompt")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    names = [s.strip() for s in args.setups.split(",") if s.strip()]
    bad = [n for n in names if n not in SETUPS]
    if bad:
        ap.error(f"unknown setup {bad[0]!r}; use {', '.join(SETUPS)}")
    os.environ.setdefault("PDBOX_MODELS_DIR", str(REPO / ".cache" / "models"))
    results: dict[str, Any] = {"command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
                               "setups": {}}
    with tempfile.TemporaryDirectory(prefix="pdbox-bench-") as tmp:
        for i, name in enumerate(names):
            res = run_setup(Path(tmp), name, args, args.seed + 1000 * i)
            results["setups"][name] = res
            print(f"{name:13s} ITL p50/p99/max {res['itl_p50_ms']}/{res['itl_p99_ms']}/"
                  f"{res['itl_max_ms']} ms  long TTFT p50/p90 {res['long_ttft_p50_s']}/"
                  f"{res['long_ttft_p90_s']} s  {res['output_tokens_per_s']} tok/s  "
                  f"remote {res['long_remote_share']}", file=sys.stderr)
    agg = results["setups"].get("aggregated")
    if agg:
        results["vs_aggregated"] = {n: compare(r, agg) for n, r in results["setups"].items()
                                    if n != "aggregated"}
    if args.json:
        print(json.dumps(results, indent=2))
        return
    for n, c in results.get("vs_aggregated", {}).items():
        print(f"{n}: ITL p99 {c['itl_p99_ratio']}× (≤ 0.5 {'ok' if c['itl_p99_ok'] else 'MISS'}), "
              f"TTFT p50 {c['ttft_p50_ratio']}× (≤ 1.3 {'ok' if c['ttft_p50_ok'] else 'MISS'}), "
              f"tok/s {c['tokens_per_s_ratio']}× (≥ 0.9 "
              f"{'ok' if c['tokens_per_s_ok'] else 'MISS'})")


if __name__ == "__main__":
    main()
