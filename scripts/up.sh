#!/usr/bin/env bash
# Set everything up (first run: about half a minute; later: instant) and start pdbox
# on its embedded default. Extra arguments go to `pdbox up`.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
"$root/scripts/setup.sh"
exec "$root/.venv/bin/pdbox" up "$@"
