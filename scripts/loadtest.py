#!/usr/bin/env python3
"""Accounting load test: every request id is recorded and must end exactly once.

Open-loop arrivals at --rate per second for --duration seconds against a
pdbox OpenAI endpoint. Each request carries its own X-Request-Id and ends in
exactly one of:

- completed: a full answer (non-stream: choices with a finish_reason; stream:
  one finish_reason, one `data: [DONE]`, no error event);
- error: an explicit error (an HTTP 4xx/5xx with an OpenAI error body, or an
  error event inside a stream that had started); 429s are counted apart and
  must carry Retry-After;
- lost: anything else (a connection dropped without an error, a stream cut
  without [DONE], a client timeout, an answer for another id).

A request that ends twice (a second [DONE] or finish_reason, as a retry after
the first byte would produce) counts as duplicated. Lost and duplicated must
both be 0: the exit code is 1 otherwise.

    python scripts/loadtest.py --url http://127.0.0.1:8000/v1 --rate 20 --duration 60 \\
        --batch-share 0.8 --stream-share 0.5 --pid $(pgrep -f 'pdbox up' | head -1) --json

--pid samples that process's resident memory once a second (the router's
memory must stay bounded under overload).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import sys
import time
import uuid
from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import Any

import aiohttp

from pdbox.bench.machine import record as machine_record
from pdbox.router.metrics import percentile


@dataclass
class Record:
    id: str
    priority: str
    stream: bool
    sent: float
    ended: float | None = None
    outcome: str = ""  # completed | error | rejected | lost | refused
    status: int | None = None
    detail: str = ""
    ttft_s: float | None = None
    ends: int = 0  # how many terminal events were seen for this id


@dataclass
class Summary:
    sent: int = 0
    completed: int = 0
    errors: int = 0
    rejected_429: int = 0
    refused: int = 0  # connection refused before the request was sent (pdbox not listening)
    lost: int = 0
    duplicated: int = 0
    missing_retry_after: int = 0
    statuses: dict[str, int] = field(default_factory=dict)
    error_kinds: dict[str, int] = field(default_factory=dict)
    by_priority: dict[str, dict[str, int]] = field(default_factory=dict)
    ttft: dict[str, dict[str, float | None]] = field(default_factory=dict)
    longest_s: float = 0.0
    rss_mb: dict[str, float | None] = field(default_factory=dict)
    duration_s: float = 0.0
    lost_ids: list[str] = field(default_factory=list)
    duplicated_ids: list[str] = field(default_factory=list)


def classify_stream(raw: bytes) -> tuple[str, int, str]:
    """(outcome, terminal events seen, detail) of a streamed 200 answer."""
    done = finishes = errors = 0
    detail = ""
    for block in raw.split(b"\n\n"):
        block = block.strip()
        if not block.startswith(b"data: "):
            continue
        data = block[len(b"data: "):]
        if data == b"[DONE]":
            done += 1
            continue
        try:
            ev = json.loads(data)
        except ValueError:
            return "lost", 0, "unparsable event"
        if isinstance(ev, dict) and "error" in ev:
            errors += 1
            detail = str(ev["error"].get("message", ""))[:200] if isinstance(
                ev["error"], dict) else str(ev["error"])[:200]
            continue
        for ch in ev.get("choices") or []:
            if ch.get("finish_reason"):
                finishes += 1
    if errors:
        return "error", errors + finishes, detail or "error event"
    if done == 1 and finishes == 1:
        return "completed", 1, ""
    if done > 1 or finishes > 1:
        return "completed", max(done, finishes), "ended more than once"
    return "lost", 0, f"stream ended without a full answer ({done} [DONE], {finishes} finish)"


class LoadTest:
    def __init__(self, url: str, model: str, max_tokens: int, timeout: float,
                 api_key: str | None = None, seed: int = 1) -> None:
        self.url = url.rstrip("/")
        self.model = model
        self.max_tokens = max_tokens
        self.timeout = timeout
        self.api_key = api_key
        self.rng = random.Random(seed)
        self.ledger: dict[str, Record] = {}
        self.tasks: set[asyncio.Task[None]] = set()

    def _end(self, rec: Record, outcome: str, status: int | None = None, detail: str = "",
             ends: int = 1) -> None:
        rec.ends += ends
        if rec.ended is not None:
            return  # already ended: counted as duplicated through `ends`
        rec.ended = time.monotonic()
        rec.outcome = outcome
        rec.status = status
        rec.detail = detail

    async def one(self, session: aiohttp.ClientSession, n: int, priority: str,
                  stream: bool) -> None:
        rid = f"lt-{n:06d}-{uuid.uuid4().hex[:8]}"
        rec = Record(rid, priority, stream, time.monotonic())
        self.ledger[rid] = rec
        words = " ".join(self.rng.choice(WORDS) for _ in range(self.rng.randint(4, 40)))
        body: dict[str, Any] = {"model": self.model, "max_tokens": self.max_tokens,
                                "stream": stream, "temperature": 0,
                                "messages": [{"role": "user", "content": f"{n}: {words}"}]}
        headers = {"X-Request-Id": rid, "x-pdbox-priority": priority}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        try:
            async with session.post(f"{self.url}/chat/completions", json=body, headers=headers,
                                    timeout=aiohttp.ClientTimeout(total=self.timeout)) as r:
                echoed = r.headers.get("x-request-id")
                if r.status == 200 and echoed not in (None, rid):
                    await r.read()
                    self._end(rec, "lost", r.status, f"answer for another id {echoed}")
                    return
                if r.status != 200:
                    raw = await r.read()
                    try:
                        msg = json.loads(raw)["error"]["message"]
                    except (ValueError, KeyError, TypeError):
                        self._end(rec, "lost", r.status, f"{r.status} without an error body")
                        return
                    if r.status == 429:
                        if not r.headers.get("Retry-After"):
                            rec.detail = "no Retry-After"
                        self._end(rec, "rejected", 429, rec.detail or msg[:100])
                    else:
                        self._end(rec, "error", r.status, msg[:200])
                    return
                if not stream:
                    data = await r.json(content_type=None)
                    rec.ttft_s = time.monotonic() - rec.sent
                    choices = data.get("choices") or []
                    if choices and choices[0].get("finish_reason"):
                        self._end(rec, "completed", 200)
                    else:
                        self._end(rec, "lost", 200, "answer without a finish_reason")
                    return
                raw = b""
                async for chunk in r.content.iter_any():
                    if rec.ttft_s is None and b"data: " in chunk:
                        rec.ttft_s = time.monotonic() - rec.sent
                    raw += chunk
                outcome, ends, detail = classify_stream(raw)
                self._end(rec, outcome, 200, detail, ends=max(1, ends))
        except aiohttp.ClientConnectorError as exc:
            self._end(rec, "refused", None, str(exc)[:200])
        except (TimeoutError, aiohttp.ClientError, ValueError) as exc:
            self._end(rec, "lost", None, f"{type(exc).__name__}: {exc}"[:200])

    async def run(self, rate: float, duration: float, batch_share: float, stream_share: float,
                  pid: int | None = None) -> Summary:
        rss: list[float] = []
        sampler = asyncio.create_task(_sample_rss(pid, rss)) if pid else None
        t0 = time.monotonic()
        connector = aiohttp.TCPConnector(limit=0)
        async with aiohttp.ClientSession(connector=connector) as session:
            n = 0
            while True:
                due = t0 + n / rate
                now = time.monotonic()
                if due - t0 >= duration:
                    break
                if due > now:
                    await asyncio.sleep(due - now)
                prio = "batch" if self.rng.random() < batch_share else "interactive"
                stream = self.rng.random() < stream_share
                t = asyncio.create_task(self.one(session, n, prio, stream))
                self.tasks.add(t)
                t.add_done_callback(self.tasks.discard)
                n += 1
            if self.tasks:
                await asyncio.wait(set(self.tasks), timeout=self.timeout + 10)
            for t in list(self.tasks):
                t.cancel()
        if sampler:
            sampler.cancel()
        for rec in self.ledger.values():
            if rec.ended is None:
                self._end(rec, "lost", None, "never ended")
        return self.summary(time.monotonic() - t0, rss)

    def summary(self, elapsed: float, rss: list[float]) -> Summary:
        s = Summary(sent=len(self.ledger), duration_s=round(elapsed, 1))
        statuses: Counter[str] = Counter()
        kinds: Counter[str] = Counter()
        by_prio: dict[str, Counter[str]] = {"interactive": Counter(), "batch": Counter()}
        for rec in self.ledger.values():
            statuses[str(rec.status)] += 1
            by_prio[rec.priority][rec.outcome] += 1
            if rec.ends > 1:
                s.duplicated += 1
                s.duplicated_ids.append(rec.id)
            if rec.outcome == "completed":
                s.completed += 1
            elif rec.outcome == "error":
                s.errors += 1
                kinds[f"{rec.status}: {_kind(rec.detail)}"] += 1
            elif rec.outcome == "rejected":
                s.rejected_429 += 1
                if rec.detail == "no Retry-After":
                    s.missing_retry_after += 1
            elif rec.outcome == "refused":
                s.refused += 1
            else:
                s.lost += 1
                s.lost_ids.append(rec.id)
                kinds[f"lost: {_kind(rec.detail)}"] += 1
            if rec.ended is not None:
                s.longest_s = max(s.longest_s, round(rec.ended - rec.sent, 2))
        s.statuses = dict(statuses)
        s.error_kinds = dict(kinds)
        s.by_priority = {k: dict(v) for k, v in by_prio.items()}
        for prio in ("interactive", "batch"):
            v = [r.ttft_s for r in self.ledger.values()
                 if r.priority == prio and r.outcome == "completed" and r.ttft_s is not None]
            s.ttft[prio] = {"n": len(v), "p50_s": _r(percentile(v, 0.5)),
                            "p99_s": _r(percentile(v, 0.99)), "max_s": _r(max(v) if v else None)}
        s.rss_mb = {"first": _r(rss[0]) if rss else None, "max": _r(max(rss)) if rss else None,
                    "last": _r(rss[-1]) if rss else None}
        s.lost_ids = s.lost_ids[:20]
        s.duplicated_ids = s.duplicated_ids[:20]
        return s


def _kind(detail: str) -> str:
    return detail.split(":")[0][:60] if detail else "?"


def _r(v: float | None) -> float | None:
    return None if v is None else round(v, 3)


async def _sample_rss(pid: int, out: list[float]) -> None:
    import psutil

    try:
        proc = psutil.Process(pid)
        while True:
            out.append(proc.memory_info().rss / 1e6)
            await asyncio.sleep(1.0)
    except psutil.Error:
        return


WORDS = ("alpha beta gamma delta river mountain cloud stone paper light shadow garden music "
         "copper violet window harbor meadow lantern orbit canyon").split()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--url", required=True, help="the OpenAI endpoint, e.g. http://127.0.0.1:8000/v1")
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--rate", type=float, required=True, help="requests per second")
    ap.add_argument("--duration", type=float, default=60.0, help="seconds of arrivals")
    ap.add_argument("--batch-share", type=float, default=0.5)
    ap.add_argument("--stream-share", type=float, default=0.5)
    ap.add_argument("--max-tokens", type=int, default=16)
    ap.add_argument("--timeout", type=float, default=120.0, help="client timeout per request")
    ap.add_argument("--api-key", default=None)
    ap.add_argument("--pid", type=int, default=None, help="sample this process's memory")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--json", action="store_true", help="print the summary as JSON")
    a = ap.parse_args(argv)
    lt = LoadTest(a.url, a.model, a.max_tokens, a.timeout, a.api_key, a.seed)
    s = asyncio.run(lt.run(a.rate, a.duration, a.batch_share, a.stream_share, a.pid))
    if a.json:
        print(json.dumps({**asdict(s), "machine": machine_record()}, indent=2))
    else:
        print(f"sent {s.sent}  completed {s.completed}  errors {s.errors}  429 {s.rejected_429}  "
              f"refused {s.refused}  lost {s.lost}  duplicated {s.duplicated}")
        for prio, t in s.ttft.items():
            print(f"  {prio}: n={t['n']} TTFT p50 {t['p50_s']} s, p99 {t['p99_s']} s")
        if s.rss_mb.get("max") is not None:
            print(f"  memory of pid {a.pid}: {s.rss_mb['first']} -> max {s.rss_mb['max']} MB")
        for k, v in sorted(s.error_kinds.items()):
            print(f"  {v:6d}  {k}")
    return 0 if s.lost == 0 and s.duplicated == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
