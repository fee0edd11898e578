#!/usr/bin/env bash
# Time a new user's first minutes: a fresh clone of this repository in a
# temporary folder, the README's first command (scripts/up.sh, headless on a
# free port), until the first chat completion succeeds, phase by phase.
#
#   scripts/bench_first_answer.sh [--cold] [--keep]
#
# Warm (default): uv's package cache as it is on this box (run once before, so
# that it holds the packages). --cold: an empty package cache of its own for
# uv and pip, so every package is fetched from its index, mirror or wheel
# folder again; the OS file cache is left alone. Either way the clone starts
# with no .venv and an empty PDBOX_HOME, so the model is converted as on a new
# box. --keep leaves the temporary folder for a look afterwards.
#
# Prints one line per phase with the seconds since the command started, then
# the venv's size. Starts real workers: on a shared box, run it alone.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cold=0 keep=0
for arg in "$@"; do
  case "$arg" in
    --cold) cold=1 ;;
    --keep) keep=1 ;;
    *) echo "usage: scripts/bench_first_answer.sh [--cold] [--keep]" >&2; exit 2 ;;
  esac
done
command -v curl >/dev/null || { echo "bench_first_answer: needs curl" >&2; exit 2; }

tmp="$(mktemp -d "${TMPDIR:-/tmp}/pdbox-first-answer.XXXXXX")"
up_pid=""
cleanup() {
  if [ -n "$up_pid" ] && kill -0 "$up_pid" 2>/dev/null; then
    # up.sh leads its own session: SIGTERM reaches pdbox, which stops its workers.
    kill -TERM -- "-$up_pid" 2>/dev/null || true
    for _ in $(seq 1 60); do kill -0 "$up_pid" 2>/dev/null || break; sleep 1; done
    kill -KILL -- "-$up_pid" 2>/dev/null || true
  fi
  if [ "$keep" = 1 ]; then echo "kept: $tmp" >&2; else rm -rf "$tmp"; fi
}
trap cleanup EXIT

git clone -q "$root" "$tmp/pdbox"
export PDBOX_HOME="$tmp/home"
unset PDBOX_MODELS_DIR
if [ "$cold" = 1 ]; then
  export UV_CACHE_DIR="$tmp/uv-cache" PIP_CACHE_DIR="$tmp/pip-cache"
fi
port="$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')"
log="$tmp/up.log"

t0="${EPOCHREALTIME/./}"
since() { local t="${EPOCHREALTIME/./}"; printf '%d.%d' $(((t - t0) / 1000000)) $((((t - t0) / 100000) % 10)); }
stamp() { while IFS= read -r line; do printf '%s %s\n' "$(since)" "$line"; done; }
cd "$tmp/pdbox"
# In a script, a background job is no group leader, so setsid does not fork:
# $! is up.sh's pid and its process group, which pdbox's workers are not in
# (each leads its own) but which SIGTERM to pdbox stops cleanly.
setsid scripts/up.sh --headless --port "$port" > >(stamp >"$log") 2>&1 </dev/null &
up_pid=$!

body='{"model":"smollm2","max_tokens":16,"temperature":0,"messages":[{"role":"user","content":"What is the capital of France?"}]}'
answer="" deadline=$((SECONDS + 1800))
# Poll from the start: a closed port fails at once, and whatever start-up
# order pdbox uses, the first answer is what a user waits for.
until answer="$(curl -sf --max-time 60 "http://127.0.0.1:$port/v1/chat/completions" \
    -H 'Content-Type: application/json' -d "$body" 2>/dev/null)"; do
  answer=""
  if ! kill -0 "$up_pid" 2>/dev/null; then
    echo "bench_first_answer: scripts/up.sh ended before answering:" >&2
    tail -20 "$log" >&2
    exit 1
  fi
  if [ "$SECONDS" -ge "$deadline" ]; then
    echo "bench_first_answer: no answer in 30 minutes" >&2
    tail -20 "$log" >&2
    exit 1
  fi
  sleep 0.5
done
t_answer="$(since)"

first() { local t; t="$(grep -m1 -E "$1" "$log" | cut -d' ' -f1)"; echo "${t:--}"; }
echo "first answer from a fresh clone ($([ "$cold" = 1 ] && echo cold || echo warm) package cache)"
printf '  %-42s %6s s\n' \
  "packages installed (setup.sh done)" "$(first 'pdbox setup .* done')" \
  "model converted" "$(first 'preparing .*done in')" \
  "first worker ready" "$(first '(prefill|decode|aggregated)-[0-9]+.*ready')" \
  "pdbox ready (endpoint printed)" "$(first 'pdbox: ready. OpenAI endpoint')" \
  "first chat completion answered" "$t_answer"
echo "  answer: $(python3 -c 'import json,sys; print(json.load(sys.stdin)["choices"][0]["message"]["content"].strip()[:60])' <<<"$answer")"
echo "  .venv: $(du -sh "$tmp/pdbox/.venv" | cut -f1)"
grep -E 'pdbox setup|Resolved|Prepared|Installed|Bytecode|preparing .*done|ready|serving' "$log" | sed 's/^/  | /'
