"""The record of where every profile key went.

An export is only trustworthy if no key is dropped silently. Each builder
step books the keys it consumed: `mapped` (the value shows up in a manifest),
`warn` (no llm-d or Kubernetes equivalent, or a lossy one) or `ignore` (the key
does not affect serving on this device). Tests then check that the three
books cover every key of the profile.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class Mapped:
    key: str  # dotted profile key, e.g. "decode.max"
    target: str  # where it went, e.g. "HorizontalPodAutoscaler/pdbox-cpu-tiny-decode"
    # Text that appears in the rendered manifests; None when the value maps to
    # an absence (e.g. max_num_seqs = 0 leaves vLLM's default in place).
    value: str | None


@dataclass(frozen=True)
class ExportWarning:
    key: str
    message: str

    def __str__(self) -> str:
        return f"{self.key}: {self.message}"


@dataclass(frozen=True)
class Ignored:
    key: str
    reason: str


@dataclass
class Ledger:
    mapped: list[Mapped] = field(default_factory=list)
    warnings: list[ExportWarning] = field(default_factory=list)
    ignored: list[Ignored] = field(default_factory=list)

    def map(self, key: str, target: str, value: Any) -> None:
        self.mapped.append(Mapped(key, target, None if value is None else str(value)))

    def warn(self, key: str, message: str) -> None:
        self.warnings.append(ExportWarning(key, message))

    def ignore(self, key: str, reason: str) -> None:
        self.ignored.append(Ignored(key, reason))

    def keys(self) -> set[str]:
        return (
            {m.key for m in self.mapped}
            | {w.key for w in self.warnings}
            | {i.key for i in self.ignored}
        )


@dataclass(frozen=True)
class Export:
    """The result: Kubernetes objects in apply order, plus the ledger."""

    profile: str
    objects: list[dict[str, Any]]
    warnings: list[ExportWarning]
    mapped: list[Mapped]
    ignored: list[Ignored]
    # Replica counts taken from a running pdbox, per role (empty: the profile's).
    replicas_from_status: dict[str, int] = field(default_factory=dict)
