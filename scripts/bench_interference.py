#!/usr/bin/env python3
"""Moved to `pdbox bench interference` (pdbox/bench/); this script passes its arguments on.

The old `--setups a,b,c` reads as `--profile a --against b --against c`. See
`pdbox bench interference --help`.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pdbox.bench.cli import bench  # noqa: E402
from pdbox.bench.cli_common import legacy_setups  # noqa: E402

if __name__ == "__main__":
    bench.main(["interference", *legacy_setups(sys.argv[1:])], prog_name="pdbox bench")
