#!/usr/bin/env bash
# Which extra of pdbox this box installs: `gpu` when an NVIDIA GPU is visible,
# else `cpu`. PDBOX_EXTRAS, when set, wins and nothing is probed.
#
# scripts/setup.sh sources this file and calls choose_extras, which sets
# $extras and $extras_why. Run on its own, it prints the line setup.sh prints
# and installs nothing.
#
# The probe is cheap and needs nothing installed; the first sign wins:
#   1. device files /dev/nvidia0, /dev/nvidia1, ... (the driver makes one per GPU);
#   2. `nvidia-smi -L` lists a GPU;
#   3. NVML, the driver's own library, loads and counts a GPU (through Python's
#      ctypes): a container given the library but neither of the above.
# PDBOX_PROBE_DEV and PDBOX_PROBE_NVML replace /dev and the library's name;
# they are for tests only.

_gpus() { if [ "$1" = 1 ]; then echo "1 GPU"; else echo "$1 GPUs"; fi; }

choose_extras() {
  if [ -n "${PDBOX_EXTRAS:-}" ]; then
    extras="$PDBOX_EXTRAS"
    extras_why="set by PDBOX_EXTRAS (no GPU probe)"
    return
  fi
  local dev="${PDBOX_PROBE_DEV:-/dev}" nvml="${PDBOX_PROBE_NVML:-libnvidia-ml.so.1}"
  local files=() line name="" count=0 smi_said nvml_said
  mapfile -t files < <(compgen -G "$dev/nvidia[0-9]*" || true)
  if [ "${#files[@]}" -gt 0 ]; then
    extras=gpu
    extras_why="device files show $(_gpus "${#files[@]}") (${files[*]})"
    return
  fi
  if command -v nvidia-smi >/dev/null 2>&1; then
    local run=(nvidia-smi -L)
    # A driver in trouble can make nvidia-smi hang; setup must not.
    command -v timeout >/dev/null 2>&1 && run=(timeout 20 "${run[@]}")
    while IFS= read -r line || [ -n "$line" ]; do
      case "$line" in
        "GPU "*)
          count=$((count + 1))
          if [ -z "$name" ]; then name="${line#*: }"; name="${name% (UUID*}"; fi
          ;;
      esac
    done < <("${run[@]}" 2>/dev/null || true)
    if [ "$count" -gt 0 ]; then
      extras=gpu
      extras_why="nvidia-smi lists $(_gpus "$count") ($name)"
      return
    fi
    smi_said="nvidia-smi lists none"
  else
    smi_said="nvidia-smi absent"
  fi
  nvml_said="NVML not loadable"
  if command -v python3 >/dev/null 2>&1; then
    count="$(python3 - "$nvml" 2>/dev/null <<'EOF' || echo 0
import ctypes
import sys

try:
    lib = ctypes.CDLL(sys.argv[1])
except OSError:
    print(-1)
    sys.exit()
n = ctypes.c_uint(0)
ok = lib.nvmlInit_v2() == 0 and lib.nvmlDeviceGetCount_v2(ctypes.byref(n)) == 0
print(n.value if ok else 0)
EOF
)"
    if [ "${count:-0}" -gt 0 ] 2>/dev/null; then
      extras=gpu
      extras_why="NVML ($nvml) counts $(_gpus "$count")"
      return
    fi
    [ "$count" = -1 ] || nvml_said="NVML counts none"
  fi
  extras=cpu
  extras_why="no NVIDIA GPU seen (no $dev/nvidia[0-9]*, $smi_said, $nvml_said)"
}

if [ "${BASH_SOURCE[0]}" = "$0" ]; then
  set -euo pipefail
  choose_extras
  printf 'pdbox setup: extra "%s": %s\n' "$extras" "$extras_why"
fi
