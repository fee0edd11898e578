"""One progress line on stderr: which setup, which phase, how long is left.

On a terminal the line is rewritten in place; into a file or pipe a line is
written when the phase changes and at most every `every_s` seconds, so a log
of a long run stays readable.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from typing import TextIO


def clock_text(seconds: float) -> str:
    s = max(0, round(seconds))
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}" if s >= 3600 else f"{s // 60}:{s % 60:02d}"


class Progress:
    def __init__(self, stream: TextIO | None = None, clock: Callable[[], float] = time.monotonic,
                 tty: bool | None = None, every_s: float = 15.0, quiet: bool = False) -> None:
        self.stream = stream if stream is not None else sys.stderr
        self.clock = clock
        self.tty = self.stream.isatty() if tty is None else tty
        self.every_s, self.quiet = every_s, quiet
        self.where = ""
        self._phase = ""
        self._last = -1e18
        self._width = 0

    @property
    def prefix(self) -> str:
        """"bench [2/3 cpu-aggregated]": where a line comes from."""
        return f"bench {self.where}" if self.where else "bench"

    def setup(self, index: int, total: int, label: str) -> None:
        self.where = f"[{index + 1}/{total} {label}]"
        self._phase = ""

    def update(self, phase: str, left_s: float | None = None, detail: str = "") -> None:
        if self.quiet:
            return
        now = self.clock()
        changed = phase != self._phase
        if not self.tty and not changed and now - self._last < self.every_s:
            return
        self._phase, self._last = phase, now
        parts = [f"{self.prefix} {phase}"]
        if left_s is not None:
            parts.append(f"{clock_text(left_s)} left")
        if detail:
            parts.append(detail)
        line = " · ".join(parts)
        if self.tty:
            pad = max(0, self._width - len(line))
            self.stream.write("\r" + line + " " * pad)
            self._width = len(line)
        else:
            self.stream.write(line + "\n")
        self.stream.flush()

    def note(self, text: str) -> None:
        """A line that stays (a setup's summary, a warning)."""
        if self.quiet:
            return
        if self.tty and self._width:
            self.stream.write("\r" + " " * self._width + "\r")
            self._width = 0
        self.stream.write(text + "\n")
        self.stream.flush()
