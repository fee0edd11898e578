#!/usr/bin/env python3
"""Moved to `pdbox bench burst` (pdbox/bench/burst.py); this script passes its arguments on.

Kept because tests/e2e/test_workers_change.py runs it and reads its JSON from
stdout. See `pdbox bench burst --help`.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pdbox.bench.cli import bench  # noqa: E402

if __name__ == "__main__":
    bench.main(["burst", *sys.argv[1:]], prog_name="pdbox bench")
