"""The router-overhead benchmark's results: medians over rounds, what each router adds,
and the text table (pdbox/bench/router_overhead.py measures)."""

from __future__ import annotations

import statistics
from typing import Any

TARGETS = ("direct", "pdbox", "pdbox-features", "sglang", "vllm-router")


def median_summary(runs: list[dict[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in runs[0].items():
        if k == "cpu_s":
            out[k] = {n: round(statistics.median(r[k][n] for r in runs), 2) for n in v}
        elif k == "errors":
            out[k] = sum(r[k] for r in runs)
        elif isinstance(v, (int, float)):
            out[k] = round(statistics.median(r[k] for r in runs if r[k] is not None), 2)
        else:
            out[k] = v
    return out


def added(results: dict[str, Any], name: str) -> dict[str, Any] | None:
    if name not in results:
        return None
    d, r = results["direct"], results[name]
    out: dict[str, Any] = {}
    for phase in ("latency", "throughput"):
        for k in ("ttft_p50_ms", "ttft_p99_ms", "e2e_p50_ms", "e2e_p99_ms"):
            a, b = r[phase][k], d[phase][k]
            out[f"{phase}_{k}"] = None if a is None or b is None else round(a - b, 2)
    rps, req = r["throughput"]["rps"], r["throughput"]["requests"]
    cpu = r["throughput"]["cpu_s"].get("router")
    out["router_cpu_ms_per_request"] = round(1000 * cpu / req, 3) if cpu and req else None
    out["router_cores_used"] = round(cpu / r["throughput"]["wall_s"], 2) if cpu else None
    out["rps"] = rps
    return out


def render(results: dict[str, Any]) -> str:
    lines = []
    cfg = results["config"]
    lines.append(f"medians of {cfg['rounds']} interleaved rounds; {cfg['backends']} mock backends, {cfg['tokens']} tokens at {cfg['itl_ms']} ms "
                 f"ITL; latency: {cfg['latency_requests']} sequential requests; throughput: "
                 f"{cfg['requests']} requests at concurrency {cfg['concurrency']}")
    hdr = (f"{'target':14} {'TTFT p50':>9} {'p99':>8} {'e2e p50':>9} {'p99':>8} | "
           f"{'req/s':>7} {'e2e p50':>9} {'p99':>8} {'err':>4} {'router CPU':>11}")
    lines += [hdr, "-" * len(hdr)]
    for name in TARGETS:
        if name not in results:
            continue
        la, th = results[name]["latency"], results[name]["throughput"]
        cpu = th["cpu_s"].get("router")
        cpu_s = f"{cpu:.1f}s" if cpu is not None else "-"
        lines.append(f"{name:14} {la['ttft_p50_ms']:>9} {la['ttft_p99_ms']:>8} "
                     f"{la['e2e_p50_ms']:>9} {la['e2e_p99_ms']:>8} | {th['rps']:>7} "
                     f"{th['e2e_p50_ms']:>9} {th['e2e_p99_ms']:>8} "
                     f"{la['errors'] + th['errors']:>4} {cpu_s:>11}")
    lines.append("(ms; left: one request at a time; right: under load)")
    for name in TARGETS[1:]:
        a = added(results, name)
        if a:
            lines.append(
                f"{name} adds: TTFT p50 {a['latency_ttft_p50_ms']} ms, p99 "
                f"{a['latency_ttft_p99_ms']} ms; e2e p50 {a['latency_e2e_p50_ms']} ms, p99 "
                f"{a['latency_e2e_p99_ms']} ms; under load e2e p50 "
                f"{a['throughput_e2e_p50_ms']} ms; router CPU "
                f"{a['router_cpu_ms_per_request']} ms/request ({a['router_cores_used']} cores)")
    for key, peer in (("sglang_skipped", "sglang-router"), ("vllm_router_skipped", "vllm-router")):
        if key in results:
            lines.append(f"{peer} skipped: {results[key]}")
    for name in ("pdbox", "pdbox-features"):
        g = results.get(name) and results.get("best_peer") and results.get(name + "_goal")
        if g:
            lines.append(f"{name}: {g['rps_ratio']}x the req/s of {results['best_peer']}; "
                         f"e2e p50 adds {g['p50_added_ms']} ms against its best "
                         f"{g['best_peer_p50_added_ms']} ms; {g['errors']} errors")
    return "\n".join(lines)
