"""Messages the app's workers post. Workers never touch widgets; handlers do."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from textual.message import Message


@dataclass
class StatusUpdated(Message):
    """A fresh snapshot. Ticks coalesce: a newer one waiting in the queue replaces an
    older one not yet handled, so a slow frame never builds a backlog."""

    snapshot: dict[str, Any]

    def can_replace(self, message: Message) -> bool:
        return isinstance(message, StatusUpdated)


@dataclass
class StatusFailed(Message):
    """The last poll failed; `error` is one sentence."""

    error: str

    def can_replace(self, message: Message) -> bool:
        return isinstance(message, StatusFailed | StatusUpdated)


@dataclass
class LogTail(Message):
    """The tail of one worker's log."""

    worker_id: str
    lines: list[str]

    def can_replace(self, message: Message) -> bool:
        return isinstance(message, LogTail)


@dataclass
class ActionDone(Message):
    """A control call finished; `text` says what happened."""

    text: str
    ok: bool

