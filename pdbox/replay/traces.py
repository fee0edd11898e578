"""Trace readers: Mooncake JSONL (with prefix block ids) and Azure CSV (arrivals only)."""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

MOONCAKE_BLOCK_TOKENS = 512


class TraceError(Exception):
    """A trace file that cannot be read; str() names the file and the line."""


@dataclass(frozen=True)
class TraceRequest:
    arrival_s: float
    input_tokens: int
    output_tokens: int
    # Mooncake: one id per 512-token block; equal ids mean equal prefix. Empty for Azure.
    hash_ids: tuple[int, ...] = ()


def load(path: str | Path) -> list[TraceRequest]:
    """Pick the reader from the file's extension (.jsonl/.json: Mooncake, .csv: Azure)."""
    p = Path(path)
    if not p.is_file():
        raise TraceError(f"{p}: no such trace file")
    if p.suffix in (".jsonl", ".json"):
        return load_mooncake(p)
    if p.suffix == ".csv":
        return load_azure(p)
    raise TraceError(f"{p}: unknown trace format (expected .jsonl Mooncake or .csv Azure)")


def load_mooncake(path: Path) -> list[TraceRequest]:
    out: list[TraceRequest] = []
    with open(path, encoding="utf-8") as f:
        for no, line in enumerate(f, 1):
            line = line.strip()
            if not line:
                continue
            try:
                d = json.loads(line)
                out.append(
                    TraceRequest(
                        arrival_s=float(d["timestamp"]) / 1000.0,
                        input_tokens=int(d["input_length"]),
                        output_tokens=int(d["output_length"]),
                        hash_ids=tuple(int(h) for h in d.get("hash_ids", ())),
                    )
                )
            except (ValueError, KeyError, TypeError) as exc:
                raise TraceError(f"{path}:{no}: not a Mooncake trace line ({exc})") from None
    out.sort(key=lambda r: r.arrival_s)
    return out


def _parse_ts(text: str) -> float:
    # "2023-11-16 18:15:46.6805900" — 7 fractional digits, more than fromisoformat takes.
    text = text.strip()
    if "." in text:
        head, frac = text.split(".", 1)
        text = f"{head}.{frac[:6]}"
    return datetime.fromisoformat(text).timestamp()


def load_azure(path: Path) -> list[TraceRequest]:
    out: list[TraceRequest] = []
    with open(path, encoding="utf-8", newline="") as f:
        reader = csv.DictReader(f)
        t0: float | None = None
        for no, row in enumerate(reader, 2):
            try:
                ts = _parse_ts(row["TIMESTAMP"])
                t0 = ts if t0 is None else t0
                out.append(
                    TraceRequest(
                        arrival_s=ts - t0,
                        input_tokens=int(row["ContextTokens"]),
                        output_tokens=int(row["GeneratedTokens"]),
                    )
                )
            except (ValueError, KeyError, TypeError) as exc:
                raise TraceError(f"{path}:{no}: not an Azure trace row ({exc})") from None
    out.sort(key=lambda r: r.arrival_s)
    if out:
        base = out[0].arrival_s
        out = [TraceRequest(r.arrival_s - base, r.input_tokens, r.output_tokens) for r in out]
    return out


def concat(first: list[TraceRequest], then: list[TraceRequest],
           then_rate_scale: float = 1.0) -> list[TraceRequest]:
    """`then` after `first` ends (its arrivals divided by `then_rate_scale`)."""
    start = first[-1].arrival_s if first else 0.0
    return first + [TraceRequest(start + r.arrival_s / then_rate_scale, r.input_tokens,
                                 r.output_tokens, r.hash_ids) for r in then]
