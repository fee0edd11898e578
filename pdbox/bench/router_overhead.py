"""What pdbox's router adds to a request, against peer routers, over mock workers.

Starts `backends` mock vLLM servers (pdbox.devtools.mock_openai, streaming
`tokens` tokens `itl_ms` apart), then for each target:

- direct: the mocks themselves (the client spreads requests over them);
- pdbox: `pdbox up --headless --attach URL ...` as a real process, with
  PDBOX_HOME in a temporary folder and a profile without KV events;
- pdbox-features (with `guard`): the same, attached as one prefill and one
  decode worker, with soft roles, KV events and stream migration on: the
  fast path may not get its speed by turning features off;
- sglang: `python -m sglang_router.launch_router --policy cache_aware`, run
  by `sglang_python` (skipped when not given or not importable there);
- vllm-router: `vllm-router --policy cache_aware`, the executable
  `vllm_router` (skipped when not given or not runnable);

measures, with one aiohttp client process:

1. latency: `latency_requests` streamed chat requests one at a time; TTFT and
   end-to-end p50/p99; "added" is routed minus direct;
2. throughput: `requests` requests at `concurrency`; requests/s, latency under
   load, and the CPU seconds the router process (and its children) used.

Prompts share a few long prefixes (system prompts) with a unique question
each, so the routers tokenize, hash and match real-sized prompts.

Goal (docs/ROUTER_BENCH.md): pdbox passes at least 1.5x the requests/s of
the best peer and adds no more p50 latency than it, with no errors.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import psutil

from pdbox.bench.router_report import added, median_summary
from pdbox.router.metrics import percentile


@dataclass(frozen=True)
class Params:
    backends: int = 2
    tokens: int = 16
    itl_ms: float = 1.0
    concurrency: int = 32
    requests: int = 2000  # throughput phase
    latency_requests: int = 300
    warmup: int = 50
    prefixes: int = 8  # distinct system prompts
    prefix_chars: int = 1800
    pdbox_policy: str = "prefix"
    # pdbox's max_inflight_per_worker; 0: what the workers report (their max_num_seqs)
    max_inflight: int = 0
    sglang_python: str | None = None
    vllm_router: str | None = None  # the vllm-router executable
    guard: bool = False  # also measure pdbox with soft roles, KV events and migration on
    rounds: int = 3  # every target measured this many times, interleaved; medians reported
    skip_pdbox: bool = False
    pdbox_uvloop: bool = False


MODEL = "smollm2"

PROFILE = """\
# Attach-mode profile for the router-overhead benchmark: no KV events (no
# workers publish them); admission takes its limits from the workers.
name = "bench-router"
description = "router overhead benchmark"

[model]
source = "embedded:smollm2-135m-instruct"
served_name = "{model}"
max_model_len = 4096
block_size = 16

[hardware]
device = "cpu"
sharing = "cores"

{mode}

[router]
policy = "{policy}"
kv_events = {kv_events}
soft_roles = true
queue_bound = 1024
max_inflight_per_worker = {max_inflight}

[autoscaler]
enabled = false
"""


AGGREGATED = """[mode]
kind = "aggregated"

[aggregated]
replicas = {n}
min = 1
max = {n}
cores = {cores}
kv_cache_gib = 1.0"""

PD = """[mode]
kind = "pd"

[prefill]
replicas = 1
min = 1
max = 1
cores = ["0"]
kv_cache_gib = 1.0

[decode]
replicas = {n}
min = 1
max = {n}
cores = {cores}
kv_cache_gib = 1.0"""


@dataclass
class Sample:
    ttft: float
    e2e: float


@dataclass
class Phase:
    samples: list[Sample] = field(default_factory=list)
    errors: int = 0
    wall_s: float = 0.0
    cpu_s: dict[str, float] = field(default_factory=dict)

    def pct(self, attr: str, q: float) -> float | None:
        return percentile([getattr(s, attr) for s in self.samples], q)

    def summary(self) -> dict[str, Any]:
        n = len(self.samples)
        return {
            "requests": n, "errors": self.errors, "wall_s": round(self.wall_s, 3),
            "rps": round(n / self.wall_s, 1) if self.wall_s else None,
            "ttft_p50_ms": _ms(self.pct("ttft", 0.5)), "ttft_p99_ms": _ms(self.pct("ttft", 0.99)),
            "e2e_p50_ms": _ms(self.pct("e2e", 0.5)), "e2e_p99_ms": _ms(self.pct("e2e", 0.99)),
            "e2e_mean_ms": _ms(statistics.fmean(s.e2e for s in self.samples) if n else None),
            "cpu_s": {k: round(v, 2) for k, v in self.cpu_s.items()},
        }


def _ms(v: float | None) -> float | None:
    return None if v is None else round(v * 1000, 2)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ------------------------------------------------------------------ processes


class Procs:
    def __init__(self) -> None:
        self.procs: list[subprocess.Popen[Any]] = []

    def start(self, cmd: list[str], env: dict[str, str] | None = None,
              log: Path | None = None) -> subprocess.Popen[Any]:
        err = open(log, "wb") if log else subprocess.DEVNULL  # noqa: SIM115 - kept for the child
        p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=err, env=env,
                             start_new_session=True)
        self.procs.append(p)
        return p

    def stop(self, p: subprocess.Popen[Any]) -> None:
        """End the process's whole group (each was started in a session of its own)."""
        if p.poll() is None:
            _killpg(p.pid, signal.SIGTERM)
            try:
                p.wait(20)
            except subprocess.TimeoutExpired:
                _killpg(p.pid, signal.SIGKILL)
                p.wait(5)
        _killpg(p.pid, signal.SIGKILL)  # children that outlived the leader

    def stop_all(self) -> None:
        for p in reversed(self.procs):
            self.stop(p)


def _killpg(pgid: int, sig: int) -> None:
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def cpu_seconds(pid: int) -> float:
    """CPU time of a process and its live children (user + system)."""
    try:
        proc = psutil.Process(pid)
        total = sum(proc.cpu_times()[:2])
        for c in proc.children(recursive=True):
            try:
                total += sum(c.cpu_times()[:2])
            except psutil.Error:
                pass
        return total
    except psutil.Error:
        return 0.0


async def wait_http(url: str, timeout: float, proc: subprocess.Popen[Any] | None = None,
                    body: dict[str, Any] | None = None) -> None:
    deadline = time.monotonic() + timeout
    async with aiohttp.ClientSession() as s:
        while time.monotonic() < deadline:
            if proc is not None and proc.poll() is not None:
                raise RuntimeError(f"{url}: the process exited with {proc.returncode}")
            try:
                if body is None:
                    async with s.get(url, timeout=aiohttp.ClientTimeout(total=2)) as r:
                        if r.status == 200:
                            return
                else:
                    async with s.post(url, json=body, timeout=aiohttp.ClientTimeout(total=5)) as r:
                        await r.read()
                        if r.status == 200:
                            return
            except (aiohttp.ClientError, TimeoutError, OSError):
                pass
            await asyncio.sleep(0.2)
    raise RuntimeError(f"{url} did not answer within {timeout:.0f}s")


# -------------------------------------------------------------------- load


def make_payloads(n: int, prefixes: int, prefix_chars: int) -> list[bytes]:
    systems = []
    for k in range(prefixes):
        line = f"System prompt {k}: you are assistant number {k}. "
        systems.append((line * (prefix_chars // len(line) + 1))[:prefix_chars])
    out = []
    for i in range(n):
        body = {"model": MODEL, "stream": True, "max_tokens": 64,
                "messages": [{"role": "system", "content": systems[i % prefixes]},
                             {"role": "user", "content": f"Question {i}: what is {i} squared?"}]}
        out.append(json.dumps(body).encode())
    return out


async def one(session: aiohttp.ClientSession, url: str, payload: bytes) -> Sample | None:
    t0 = time.perf_counter()
    ttft = None
    tail = b""
    async with session.post(url, data=payload,
                            headers={"Content-Type": "application/json"}) as r:
        if r.status != 200:
            await r.read()
            return None
        async for chunk in r.content.iter_any():
            if ttft is None:
                ttft = time.perf_counter() - t0
            tail = (tail + chunk)[-32:]
    if ttft is None or b"[DONE]" not in tail:
        return None
    return Sample(ttft, time.perf_counter() - t0)


async def load(urls: list[str], payloads: list[bytes], concurrency: int,
               watch: dict[str, int]) -> Phase:
    phase = Phase()
    conn = aiohttp.TCPConnector(limit=0, force_close=False)
    async with aiohttp.ClientSession(connector=conn,
                                     timeout=aiohttp.ClientTimeout(total=60)) as s:
        nxt = 0

        async def worker() -> None:
            nonlocal nxt
            while nxt < len(payloads):
                i = nxt
                nxt += 1
                try:
                    sample = await one(s, urls[i % len(urls)], payloads[i])
                except (aiohttp.ClientError, TimeoutError):
                    sample = None
                if sample is None:
                    phase.errors += 1
                else:
                    phase.samples.append(sample)

        before = {k: cpu_seconds(pid) for k, pid in watch.items()}
        t0 = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        phase.wall_s = time.perf_counter() - t0
        phase.cpu_s = {k: cpu_seconds(pid) - before[k] for k, pid in watch.items()}
    return phase


async def measure(name: str, urls: list[str], args: Params,
                  watch: dict[str, int]) -> dict[str, Any]:
    payloads = make_payloads(max(args.requests, args.latency_requests) + args.warmup,
                             args.prefixes, args.prefix_chars)
    warm = await load(urls, payloads[: args.warmup], min(args.concurrency, 8), watch)
    if warm.errors:
        raise RuntimeError(f"{name}: {warm.errors} of {args.warmup} warm-up requests failed")
    lat = await load(urls, payloads[args.warmup: args.warmup + args.latency_requests], 1, watch)
    thr = await load(urls, payloads[args.warmup: args.warmup + args.requests], args.concurrency,
                     watch)
    res = {"latency": lat.summary(), "throughput": thr.summary()}
    _progress(f"{name}: latency e2e p50 {res['latency']['e2e_p50_ms']} ms, "
              f"throughput {res['throughput']['rps']} req/s, cpu {res['throughput']['cpu_s']}")
    return res


def _progress(msg: str) -> None:
    print(f"bench: {msg}", file=sys.stderr, flush=True)


# ------------------------------------------------------------------ targets


async def start_mocks(procs: Procs, args: Params) -> list[tuple[str, int]]:
    out = []
    for _ in range(args.backends):
        p = procs.start([sys.executable, "-m", "pdbox.devtools.mock_openai", "--port", "0",
                         "--model", MODEL, "--tokens", str(args.tokens),
                         "--itl-ms", str(args.itl_ms), "--uvloop"])
        assert p.stdout is not None
        url = p.stdout.readline().decode().strip()
        if not url.startswith("http"):
            raise RuntimeError("a mock server did not start")
        out.append((url, p.pid))
    for url, _ in out:
        await wait_http(f"{url}/health", 10)
    return out


async def start_pdbox(procs: Procs, args: Params, mocks: list[str], tmp: Path,
                      features: bool = False) -> tuple[str, subprocess.Popen[Any]]:
    """pdbox attached to the mocks; with `features`, the first mock is a prefill
    worker and the rest decode workers, with soft roles, KV events and migration on."""
    name = "bench-router-features" if features else "bench-router"
    prof = tmp / f"{name}.toml"
    n = len(mocks) - 1 if features else len(mocks)
    mode = (PD if features else AGGREGATED).format(n=n, cores=json.dumps(["0"] * n))
    prof.write_text(PROFILE.format(model=MODEL, mode=mode, policy=args.pdbox_policy,
                                   max_inflight=args.max_inflight,
                                   kv_events=str(features).lower()))
    env = dict(os.environ, PDBOX_HOME=str(tmp / f"{name}-home"))
    port = free_port()
    cmd = [sys.executable, "-m", "pdbox.cli"]
    if args.pdbox_uvloop:  # what running `pdbox up` on uvloop would give
        cmd = [sys.executable, "-c", "import sys, uvloop; uvloop.install(); "
               "from pdbox.cli import main; sys.argv[0] = 'pdbox'; main()"]
    cmd += ["up", "--headless", "--profile", str(prof), "--port", str(port)]
    for i, u in enumerate(mocks):
        cmd += ["--attach", (("prefill=" if i == 0 else "decode=") if features else "") + u]
    _progress("starting " + " ".join(cmd))
    log = tmp / f"{name}.log"
    p = procs.start(cmd, env=env, log=log)
    base = f"http://127.0.0.1:{port}"
    try:
        await wait_http(f"{base}/health", 60, p)
    except RuntimeError:
        _progress("pdbox log:\n" + log.read_text(errors="replace")[-2000:])
        raise
    return base, p


async def start_sglang(procs: Procs, args: Params, mocks: list[str],
                       tmp: Path) -> tuple[str, subprocess.Popen[Any]]:
    port = free_port()
    cmd = [args.sglang_python, "-m", "sglang_router.launch_router", "--host", "127.0.0.1",
           "--port", str(port), "--worker-urls", *mocks, "--policy", "cache_aware",
           "--log-level", "warn"]
    _progress("starting " + " ".join(cmd))
    p = procs.start(cmd, log=tmp / "sglang.log")
    base = f"http://127.0.0.1:{port}"
    probe = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 1}
    await wait_http(f"{base}/v1/chat/completions", 90, p, body=probe)
    return base, p


async def start_vllm_router(procs: Procs, args: Params, mocks: list[str],
                            tmp: Path) -> tuple[str, subprocess.Popen[Any]]:
    assert args.vllm_router is not None
    port = free_port()
    # Its Prometheus exporter defaults to the port sglang-router's takes: one of its own.
    cmd = [args.vllm_router, "--host", "127.0.0.1", "--port", str(port), "--worker-urls",
           *mocks, "--policy", "cache_aware", "--log-level", "warning",
           "--prometheus-host", "127.0.0.1", "--prometheus-port", str(free_port())]
    _progress("starting " + " ".join(cmd))
    p = procs.start(cmd, log=tmp / "vllm-router.log")
    base = f"http://127.0.0.1:{port}"
    probe = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 1}
    await wait_http(f"{base}/v1/chat/completions", 90, p, body=probe)
    return base, p


def vllm_router_usable(exe: str | None) -> str | None:
    """None if usable, else why not."""
    if not exe:
        return "no --vllm-router given"
    try:
        subprocess.run([exe, "--help"], check=True, capture_output=True, timeout=60)
    except (OSError, subprocess.SubprocessError):
        return f"{exe} does not run (pip install vllm-router in a virtualenv; give its bin/vllm-router)"
    return None


def sglang_usable(python: str | None) -> str | None:
    """None if usable, else why not."""
    if not python:
        return "no --sglang-python given"
    try:
        subprocess.run([python, "-c", "import sglang_router"], check=True,
                       capture_output=True, timeout=60)
    except (OSError, subprocess.SubprocessError):
        return f"{python} cannot import sglang_router (pip install sglang-router there)"
    return None


async def main_async(args: Params) -> dict[str, Any]:
    """Start everything once, then measure the targets in turn, ROUNDS times.

    Interleaving rounds spreads the noise of a shared machine over all
    targets alike; each figure reported is the median over the rounds.
    """
    procs = Procs()
    tmp = Path(tempfile.mkdtemp(prefix="pdbox-bench-"))
    results: dict[str, Any] = {"config": asdict(args)}
    try:
        mocks = await start_mocks(procs, args)
        urls = [u for u, _ in mocks]
        watch = {f"mock{i}": pid for i, (_, pid) in enumerate(mocks)}
        watch["client"] = os.getpid()
        path = "/v1/chat/completions"
        targets: dict[str, tuple[list[str], dict[str, int]]] = {
            "direct": ([u + path for u in urls], watch)}
        if not args.skip_pdbox:
            base, p = await start_pdbox(procs, args, urls, tmp)
            targets["pdbox"] = ([base + path], {"router": p.pid, **watch})
            if args.guard and len(urls) > 1:
                base, p = await start_pdbox(procs, args, urls, tmp, features=True)
                targets["pdbox-features"] = ([base + path], {"router": p.pid, **watch})
        why = sglang_usable(args.sglang_python)
        if why is None:
            base, p = await start_sglang(procs, args, urls, tmp)
            targets["sglang"] = ([base + path], {"router": p.pid, **watch})
        else:
            results["sglang_skipped"] = why
            _progress(f"sglang-router skipped: {why}")
        why = vllm_router_usable(args.vllm_router)
        if why is None:
            base, p = await start_vllm_router(procs, args, urls, tmp)
            targets["vllm-router"] = ([base + path], {"router": p.pid, **watch})
        else:
            results["vllm_router_skipped"] = why
            _progress(f"vllm-router skipped: {why}")
        rounds: dict[str, list[dict[str, Any]]] = {name: [] for name in targets}
        for i in range(args.rounds):
            for name, (turls, twatch) in targets.items():
                rounds[name].append(await measure(f"{name} (round {i + 1})", turls, args,
                                                  twatch))
        for name, runs in rounds.items():
            results[name] = {phase: median_summary([r[phase] for r in runs])
                             for phase in ("latency", "throughput")}
        results["rounds"] = rounds
    finally:
        procs.stop_all()
        shutil.rmtree(tmp, ignore_errors=True)
    return results


def run(params: Params) -> dict[str, Any]:
    """Every target measured; with `added` (routed minus direct) and the goal."""
    try:
        import uvloop

        results = uvloop.run(main_async(params))
    except ImportError:
        results = asyncio.run(main_async(params))
    results["added"] = {n: added(results, n) for n in ROUTERS if n in results}
    results.update(goals(results))
    return results


ROUTERS = ("pdbox", "pdbox-features", "sglang", "vllm-router")
PEERS = ("sglang", "vllm-router")
RPS_GOAL = 1.5  # pdbox's requests/s over the best peer's


def goals(results: dict[str, Any]) -> dict[str, Any]:
    """Each pdbox target against the best peer: requests/s ratio, p50 added, errors."""
    added_ = results["added"]
    peers = [added_[n] | {"name": n} for n in PEERS if added_.get(n)]
    if not peers:
        return {}
    best = max(peers, key=lambda a: a["rps"] or 0)
    out: dict[str, Any] = {"best_peer": best["name"]}
    for name in ("pdbox", "pdbox-features"):
        a = added_.get(name)
        if not a:
            continue
        ratio = round(a["rps"] / best["rps"], 2) if a["rps"] and best["rps"] else None
        p50_ok = a["latency_e2e_p50_ms"] <= min(p["latency_e2e_p50_ms"] for p in peers) + 0.05
        errors = sum(results[name][ph]["errors"] for ph in ("latency", "throughput"))
        out[f"{name}_goal"] = {"rps_ratio": ratio, "p50_added_ms": a["latency_e2e_p50_ms"],
                     "best_peer_p50_added_ms": min(p["latency_e2e_p50_ms"] for p in peers),
                     "errors": errors,
                     "met": bool(ratio is not None and ratio >= RPS_GOAL and p50_ok
                                 and errors == 0)}
    if "pdbox_goal" in out:
        out["goal_met"] = out["pdbox_goal"]["met"]
    return out


# ------------------------------------------------------------ stage costs


def stage_costs(prefix_chars: int, tokens: int, n: int = 2000) -> dict[str, float]:
    """Microseconds of pdbox's own code per request, stage by stage (app.py lists them),
    measured in this process on the benchmark's request: everything but the sockets.

    The relay is timed over the worker's answer as it arrives under load (four
    events a read) and one event a read; the rest of the router's CPU per request
    is aiohttp's client and server and the event loop (the benchmark's figure
    less these).
    """
    return asyncio.run(_stage_costs(prefix_chars, tokens, n))


async def _stage_costs(prefix_chars: int, tokens: int, n: int) -> dict[str, float]:
    import dataclasses as dc

    from pdbox import config
    from pdbox.router.app import Router
    from pdbox.router.backends import Registry
    from pdbox.router.migration import Migrator, Splice
    from pdbox.router.sse_meter import SseMeter, with_usage
    from pdbox.router.tokenize import CharBlockTokenizer

    prof = config.load("cpu-aggregated")
    prof = dc.replace(prof, router=dc.replace(prof.router, kv_events=False,
                                              max_inflight_per_worker=0, policy="prefix"))
    reg = Registry()
    for i in range(2):
        reg.upsert(f"aggregated-{i}", "aggregated", f"http://127.0.0.1:{9 + i}", "ready")
    r = Router(prof, reg, CharBlockTokenizer(), [MODEL])
    r.capacity_changed()
    payloads = make_payloads(n, 8, prefix_chars)

    class Req:  # what the parser reads of an aiohttp request
        def __init__(self, raw: bytes) -> None:
            self.headers = {"Content-Type": "application/json"}
            self.content_length = len(raw)
            self.raw = raw
            self.content = self

        async def read(self, limit: int) -> bytes:
            return self.raw[:limit]

    events = _answer_events(tokens)
    out: dict[str, float] = {}

    def took(name: str, t0: float) -> None:
        out[name] = out.get(name, 0.0) + (time.perf_counter() - t0)

    for raw in payloads:
        t0 = time.perf_counter()
        call = await r.parser.parse(Req(raw), "chat")  # type: ignore[arg-type]
        r.parser.to_vllm_priority(call)
        took("parse", t0)
        t0 = time.perf_counter()
        prompt = r.prompts.prepare(call)
        took("prompt", t0)
        t0 = time.perf_counter()
        ticket = await r.admit.acquire(call, prompt)
        r.admit.release(ticket)
        took("admit", t0)
        t0 = time.perf_counter()
        route = r.chooser.choose(call, prompt, set(), 1)
        took("choose", t0)
        t0 = time.perf_counter()
        decision = r.legs.decision(call, prompt, route)
        sent, body, _ = r.legs.upstream_body(call)
        from pdbox.router.legs import body_bytes
        from pdbox.router.pd import decode_body

        body_bytes(call, decode_body(body, route.kv_params))
        with r.legs.open(call, prompt, route):
            pass
        took("legs (books, body)", t0)
        t0 = time.perf_counter()
        r.recorder.routed(decision, prompt.hashes)
        r.recorder.ttft(0.01, time.monotonic(), "stream")
        r.recorder.stream_done(call.t0, tokens, tokens)
        took("record", t0)
        for per_read, name in ((4, "relay, 4 events a read"), (1, "relay, 1 event a read")):
            t0 = time.perf_counter()
            meter = SseMeter(strip_usage=True, one_choice=True)
            splice = Splice(with_usage(sent), "chat", 10)
            for i in range(0, len(events), per_read):
                chunk = b"".join(events[i:i + per_read])
                meter.feed(splice.feed(chunk))
                _ = splice.started
            took(name, t0)
    _ = Migrator  # the relay's wrapper around the worker's body; its cost is the Splice's
    return {k: round(v / n * 1e6, 1) for k, v in out.items()}


def _answer_events(tokens: int) -> list[bytes]:
    """A streamed chat answer as vLLM frames it: role, tokens, finish, usage, [DONE]."""
    head = '{"id":"chatcmpl-0123456789abcdef","object":"chat.completion.chunk",' \
           '"created":1700000000,"model":"smollm2","choices":[{"index":0,"delta":'
    out = [f'data: {head}{{"role":"assistant","content":""}},"logprobs":null,'
           '"finish_reason":null}]}\n\n']
    out += [f'data: {head}{{"content":" tok{i}"}},"logprobs":null,"finish_reason":null}}]}}\n\n'
            for i in range(tokens - 1)]
    out.append(f'data: {head}{{"content":" end"}},"logprobs":null,"finish_reason":"length"}}]}}'
               '\n\n')
    out.append('data: {"id":"chatcmpl-0123456789abcdef","object":"chat.completion.chunk",'
               '"created":1700000000,"model":"smollm2","choices":[],"usage":{"prompt_tokens":'
               f'500,"total_tokens":{500 + tokens},"completion_tokens":{tokens}}}}}\n\n')
    out.append("data: [DONE]\n\n")
    return [e.encode() for e in out]
