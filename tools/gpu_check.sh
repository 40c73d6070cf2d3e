#!/usr/bin/env bash
# Everything a GPU machine should check, in one command, from a fresh checkout:
#
#   tools/gpu_check.sh DIR
#
# Uses the machine's python3 with its preinstalled torch (no venv, no network, installs
# nothing else) and writes every log and result into DIR:
#   env.txt           GPU, driver, torch, CUDA, triton versions
#   build.log         the extension built for this GPU's architecture only (fast)
#   info.txt          fastgpt.info() and the CUDA kernels registered
#   pytest.log        the whole test suite (pytest.xml: JUnit)
#   memcheck.log, racecheck.log, synccheck.log
#                     compute-sanitizer over tools/sanitizer_driver.py (small attention and
#                     layer-norm runs, forward and backward, every dtype and head dim)
#   oracle_cuda.log, oracle_triton.log, gpu_perf.md
#                     the acceptance scripts, when a copy of ../shared/acceptance is at .gpu/acceptance
#   bench_*.log, bench/   fastgpt's benchmarks (skipped if the CLI lacks them)
#   summary.txt       one line per step: ok / FAILED (exit status) / skipped, and its time
# A failing step is recorded and the next one still runs; the exit status is 1 if any failed.
set -uo pipefail

if [ $# -ne 1 ]; then
  echo "usage: $0 DIR" >&2
  exit 2
fi
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
mkdir -p "$1"
OUT="$(cd "$1" && pwd)"
PY="${PY:-python3}"
SUMMARY="$OUT/summary.txt"
: > "$SUMMARY"
FAILED=0
cd "$ROOT"

# step NAME TIMEOUT_S LOG COMMAND...: runs COMMAND with its output in LOG, records the outcome.
step() {
  local name="$1" limit="$2" log="$3"
  shift 3
  echo "== $name" | tee -a "$OUT/steps.log"
  local start status
  start=$(date +%s)
  timeout "$limit" "$@" > "$log" 2>&1
  status=$?
  local took=$(( $(date +%s) - start ))
  if [ $status -eq 0 ]; then
    printf '%-28s ok        %5ss  %s\n' "$name" "$took" "$(basename "$log")" >> "$SUMMARY"
  else
    FAILED=1
    [ $status -eq 124 ] && status="timeout"
    printf '%-28s FAILED(%s) %5ss  %s\n' "$name" "$status" "$took" "$(basename "$log")" >> "$SUMMARY"
  fi
  tail -n 3 "$log" | sed 's/^/   /'
}
skip() { printf '%-28s skipped   %s\n' "$1" "$2" >> "$SUMMARY"; echo "== $1: skipped ($2)"; }

# -- environment -------------------------------------------------------------------------
{
  nvidia-smi || true
  "$PY" - <<'EOF'
import sys, torch
print("python", sys.version.split()[0], "| torch", torch.__version__, "| CUDA", torch.version.cuda)
print("device", torch.cuda.get_device_name(), "| capability", torch.cuda.get_device_capability())
try:
    import triton
    print("triton", triton.__version__)
except ImportError:
    print("triton: not installed")
EOF
  command -v nvcc && nvcc --version
} > "$OUT/env.txt" 2>&1
ARCH="$("$PY" -c 'import torch; print("%d.%d" % torch.cuda.get_device_capability())' 2>/dev/null)"
echo "GPU architecture: ${ARCH:-unknown}" | tee -a "$OUT/env.txt"

# -- build (this GPU's architecture only; the CUDA part is required) ---------------------------
step build 1800 "$OUT/build.log" env MAX_JOBS="${MAX_JOBS:-16}" FASTGPT_CUDA=1 TORCH_CUDA_ARCH_LIST="${ARCH:-9.0}" \
  PY="$PY" bash -c '"$PY" -m pip install --no-build-isolation --no-deps -e . ||
    { echo "pip install -e . failed; building in place instead"; "$PY" setup.py build_ext --inplace; }'

step "extension registered" 120 "$OUT/info.txt" "$PY" - <<'EOF'
import json, torch, fastgpt
print(json.dumps(fastgpt.info(), indent=1, default=str))
ops = ("attention_fwd", "attention_bwd", "layer_norm_fwd", "layer_norm_bwd")
missing = [op for op in ops if not torch._C._dispatch_has_kernel_for_dispatch_key(f"fastgpt::{op}", "CUDA")]
assert not missing, f"no CUDA kernels registered for {missing}"
assert fastgpt.info()["cuda"]["available"], fastgpt.info()["cuda"]["reason"]
print("CUDA kernels registered for", ", ".join(ops))
EOF

# -- tests -----------------------------------------------------------------------------------
step pytest 3600 "$OUT/pytest.log" "$PY" -m pytest -q -p no:cacheprovider -rfEs --junitxml="$OUT/pytest.xml" tests

# -- compute-sanitizer -----------------------------------------------------------------------
SANITIZER="$(command -v compute-sanitizer || ls /usr/local/cuda*/bin/compute-sanitizer 2>/dev/null | head -n 1)"
if [ -n "$SANITIZER" ]; then
  for tool in memcheck racecheck synccheck; do
    # --error-exitcode makes any reported hazard fail the step, not only a crash.
    step "compute-sanitizer $tool" 1800 "$OUT/$tool.log" \
      "$SANITIZER" --tool "$tool" --error-exitcode 3 --print-limit 50 "$PY" tools/sanitizer_driver.py
  done
else
  skip "compute-sanitizer" "not found on PATH or in /usr/local/cuda*/bin"
fi

# -- acceptance scripts ------------------------------------------------------------------------
if [ -f .gpu/acceptance/oracle.py ]; then
  step "acceptance oracle cuda" 1800 "$OUT/oracle_cuda.log" \
    "$PY" .gpu/acceptance/oracle.py cuda cuda float16,bfloat16,float32
  step "acceptance oracle triton" 1800 "$OUT/oracle_triton.log" \
    "$PY" .gpu/acceptance/oracle.py triton cuda float16,bfloat16,float32
  step "acceptance gpu_perf" 1800 "$OUT/gpu_perf.md" "$PY" .gpu/acceptance/gpu_perf.py cuda,triton
else
  skip "acceptance scripts" "no copy of ../shared/acceptance at .gpu/acceptance"
fi

# -- benchmarks ------------------------------------------------------------------------------
mkdir -p "$OUT/bench"
for which in attention layernorm gpt; do
  if "$PY" -m fastgpt.cli bench "$which" --help > /dev/null 2>&1; then
    step "bench $which" 1800 "$OUT/bench_$which.log" \
      "$PY" -m fastgpt.cli bench "$which" --device cuda --out-dir "$OUT/bench"
  else
    skip "bench $which" "python3 -m fastgpt.cli bench $which is not available"
  fi
done

echo
echo "== summary ($SUMMARY)"
cat "$SUMMARY"
exit $FAILED
