"""A fake status source: a realistic snapshot of a busy cpu-tiny pdbox, and a record of
every control call the TUI makes. Also used by scripts/tui_screenshot.py."""

from __future__ import annotations

import copy
import math
from typing import Any

T0 = 1_700_000_000.0


def busy_snapshot() -> dict[str, Any]:
    """Three workers on two cores under steady chat traffic, deterministic."""
    n = 120
    t = [float(i) for i in range(n)]
    rps = [round(4 + 3 * math.sin(i / 9) + (i % 7) / 3, 2) for i in range(n)]
    tps = [round(r * 22.0, 1) for r in rps]
    ttft = [round(0.18 + 0.12 * math.sin(i / 13) ** 2, 3) for i in range(n)]
    ttft[40:43] = [None, None, None]  # a gap while the router restarted its scrape
    workers = [
        {"id": "prefill-0", "role": "prefill", "state": "ready", "pid": 41207, "port": 8101,
         "slice": "cores 0", "cores": "0", "sm_percent": None, "memory_fraction": None,
         "queue": 1, "running": 1, "inflight": 2, "kv_usage": 0.31, "prefix_hit_rate": 0.12,
         "restarts": 0, "log": "/tmp/pdbox/run/logs/prefill-0.log"},
        {"id": "decode-0", "role": "decode", "state": "ready", "pid": 41233, "port": 8201,
         "slice": "cores 1", "cores": "1", "sm_percent": None, "memory_fraction": None,
         "queue": 3, "running": 8, "inflight": 11, "kv_usage": 0.64, "prefix_hit_rate": 0.71,
         "restarts": 0, "log": "/tmp/pdbox/run/logs/decode-0.log"},
        {"id": "decode-1", "role": "decode", "state": "warming", "pid": 41502, "port": 8202,
         "slice": "cores 1", "cores": "1", "sm_percent": None, "memory_fraction": None,
         "queue": 0, "running": 0, "inflight": 0, "kv_usage": None, "prefix_hit_rate": None,
         "restarts": 1, "log": "/tmp/pdbox/run/logs/decode-1.log"},
    ]
    return {
        "version": "0.1.0", "profile": "cpu-tiny", "mode": "pd",
        "endpoint": "http://127.0.0.1:8000/v1", "uptime_s": 754.2, "policy": "prefix",
        "workers": workers,
        "router": {
            "requests_total": 5311, "rps": rps[-1], "tokens_per_s": tps[-1],
            "ttft_p50_s": 0.21, "ttft_p99_s": 0.94, "itl_p50_s": 0.043, "itl_p99_s": 0.087,
            "pd_remote": 1204, "pd_local": 4107, "pd_share": 0.227, "fallbacks": 2,
            "rejected_429": 0, "nixl_xfer_ms": 18.1, "nixl_mb_per_s": 311.0,
            "last_decisions": [
                {"request_id": "r-5308", "decode": "decode-0", "prefill": None, "pd": "local",
                 "reason": "prefix cached on decode-0 (896 of 940 tokens)"},
                {"request_id": "r-5309", "decode": "decode-0", "prefill": "prefill-0",
                 "pd": "remote", "reason": "612 uncached tokens >= 256"},
                {"request_id": "r-5310", "decode": "decode-0", "prefill": None, "pd": "local",
                 "reason": "41 uncached tokens < 256"},
                {"request_id": "r-5311", "decode": "decode-0", "prefill": None, "pd": "local",
                 "reason": "prefill-0 busy (queue 3), prefill locally"},
            ],
            "history": {"t": t, "rps": rps, "tokens_per_s": tps, "ttft_p50_s": ttft},
            "engine": {
                "window_s": 60.0,
                "all": {"queue_mean_s": 0.012, "prefill_mean_s": 0.118, "waiting": 3},
                "roles": {"prefill": {"ttft_p50_s": 0.142, "itl_p50_s": None},
                          "decode": {"ttft_p50_s": 0.031, "itl_p50_s": 0.041}},
            },
        },
        "autoscaler": {
            "enabled": True,
            "roles": {
                "prefill": {"current": 1, "desired": 1, "min": 1, "max": 2, "pinned": None},
                "decode": {"current": 1, "desired": 2, "min": 1, "max": 3, "pinned": None},
            },
            "decisions": [
                {"ts": T0 + 700, "role": "decode", "from": 1, "to": 2, "metric": "queue",
                 "value": 9.1, "target": 4.0,
                 "reason": "decode 1→2: queue 9.1 per worker > target 4"},
            ],
        },
        "hardware": {
            "kind": "cpu", "cpu_percent_per_core": [87.0, 93.5],
            "memory_used_bytes": 9.6 * 2**30, "memory_total_bytes": 24.0 * 2**30,
            "gpus": [], "mps": {"enabled": False, "running": False, "pipe_dir": None},
            "dtype": {"dtype": "bfloat16", "requested": "auto",
                      "reason": "this CPU does bf16 in hardware (amx_bf16, avx512_bf16)",
                      "warning": ""},
            "calibration": {"1 core(s) · bfloat16 · smollm2": {
                "prefill_tps": 2021.9, "overhead_s": 0.061,
                "decode_step_s": {"1": 0.0508, "4": 0.0541},
                "prefill_points": [[16, 0.069], [1024, 0.56]], "took_s": 2.0}},
        },
        "events": [
            {"ts": T0 + 2, "kind": "worker", "message": "prefill-0 ready (35.2 s)"},
            {"ts": T0 + 3, "kind": "worker", "message": "decode-0 ready (36.0 s)"},
            {"ts": T0 + 700, "kind": "scale",
             "message": "decode 1→2: queue 9.1 per worker > target 4"},
            {"ts": T0 + 701, "kind": "worker", "message": "decode-1 starting on cores 1"},
        ],
    }


def gpu_snapshot_with_gaps() -> dict[str, Any]:
    """A GPU box whose NVML answers only some questions."""
    snap = busy_snapshot()
    snap["hardware"] = {
        "kind": "cuda", "cpu_percent_per_core": None,
        "memory_used_bytes": None, "memory_total_bytes": None,
        "gpus": [{"index": 0, "name": "NVIDIA GH200 480GB", "util_percent": None,
                  "memory_used_bytes": None, "memory_total_bytes": 96 * 2**30,
                  "power_w": None, "sm_clock_mhz": None, "processes": []}],
        "mps": {"enabled": True, "running": False, "pipe_dir": None},
    }
    return snap


class FakeSource:
    """Answers status with a snapshot and records every other call."""

    def __init__(self, snapshot: dict[str, Any] | None = None,
                 logs: dict[str, list[str]] | None = None):
        self.snapshot = snapshot if snapshot is not None else busy_snapshot()
        self.calls: list[tuple[Any, ...]] = []
        self.status_calls = 0
        self.fail: str | None = None
        self.chat_url: str | None = None
        self.model: str | None = None
        self._logs = logs or {
            "prefill-0": ["INFO: Started server process [41207]",
                          "INFO: 127.0.0.1 - \"POST /v1/completions HTTP/1.1\" 200"],
            "decode-0": ["INFO: Started server process [41233]",
                         "INFO: KV Transfer metrics: Num successful transfers=1, "
                         "Avg xfer time (ms)=18.074, Avg MB per transfer=5.625",
                         "INFO: 127.0.0.1 - \"POST /v1/chat/completions HTTP/1.1\" 200"],
        }

    async def status(self) -> dict[str, Any]:
        self.status_calls += 1
        if self.fail:
            raise RuntimeError(self.fail)
        return copy.deepcopy(self.snapshot)

    async def scale(self, role: str, replicas: int | str) -> dict[str, Any]:
        self.calls.append(("scale", role, replicas))
        # As pdbox does: a number pins the role, "auto" hands it back.
        info = self.snapshot["autoscaler"]["roles"].setdefault(role, {})
        info["pinned"] = None if replicas == "auto" else replicas
        return {"ok": True}

    async def set_policy(self, policy: str) -> dict[str, Any]:
        self.calls.append(("set_policy", policy))
        self.snapshot["policy"] = policy
        return {"ok": True}

    async def restart(self, worker_id: str) -> dict[str, Any]:
        self.calls.append(("restart", worker_id))
        return {"ok": True}

    async def logs(self, worker_id: str, lines: int = 200) -> list[str]:
        return self._logs.get(worker_id, [f"(no log lines yet for {worker_id})"])[-lines:]

    async def shutdown(self) -> dict[str, Any]:
        self.calls.append(("shutdown",))
        return {"ok": True}
