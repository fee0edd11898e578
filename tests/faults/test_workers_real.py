"""Worker faults on real workers: now tests/e2e/test_chaos.py, on one box.

The tests that ran here on a pdbox of their own (SIGKILL of the decode worker
mid-stream, the prefill worker killed between the two legs, SIGSTOP of the
decode worker, a burst with accounting, and pdbox SIGKILLed then started
again) are covered there or in tests/e2e/test_own_death.py; see
docs/RELIABILITY.md. `stream_events` stays importable from here for the
tests that used it.
"""

from __future__ import annotations

from tests.faults.conftest import stream_events

__all__ = ["stream_events"]
