#!/usr/bin/env bash
# Compile-checks the CPU kernels (csrc/cpu/*.cpp) for aarch64 with a cross compiler, against the
# torch headers of the venv: at::vec takes its NEON path there (__aarch64__), so this catches x86-only
# code (intrinsics, ISA macros) in the kernels. It compiles objects only: linking needs an aarch64
# libtorch, which this machine does not have, so nothing here runs on ARM.
#
#   tools/aarch64_check.sh [CXX]      (default: aarch64-linux-gnu-g++; Debian: apt install g++-aarch64-linux-gnu)
set -euo pipefail
CXX="${1:-aarch64-linux-gnu-g++}"
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PY="${PY:-$ROOT/.venv/bin/python}"
if ! command -v "$CXX" > /dev/null; then
  echo "aarch64-check: $CXX not found (Debian/Ubuntu: apt install g++-aarch64-linux-gnu); nothing checked" >&2
  exit 2
fi
TORCH_INCLUDE="$("$PY" -c 'import os, torch; print(os.path.join(os.path.dirname(torch.__file__), "include"))')"
OUT="$ROOT/build/aarch64"
mkdir -p "$OUT"
pids=()
for source in "$ROOT"/csrc/cpu/*.cpp; do
  object="$OUT/$(basename "${source%.cpp}").o"
  "$CXX" -std=c++20 -O2 -fopenmp -fPIC -Wno-psabi -DCPU_CAPABILITY=DEFAULT -DFASTGPT_TORCH_VERSION='"aarch64-check"' \
    -I "$ROOT/csrc" -isystem "$TORCH_INCLUDE" -isystem "$TORCH_INCLUDE/torch/csrc/api/include" \
    -c "$source" -o "$object" &
  pids+=($!)
done
status=0
for pid in "${pids[@]}"; do wait "$pid" || status=1; done
[ $status -eq 0 ] || { echo "aarch64-check: FAILED" >&2; exit 1; }
for object in "$OUT"/*.o; do file "$object" | grep -q "ARM aarch64" || { echo "aarch64-check: $object is not aarch64" >&2; exit 1; }; done
echo "aarch64-check: every csrc/cpu/*.cpp compiles for aarch64 ($("$CXX" --version | head -1))"
