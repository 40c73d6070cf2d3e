#!/usr/bin/env bash
# Everything a GPU machine should check, in one command that fits one 8-minute run on an H200
# with 16 cores (an H100 / H200: sm_90):
#
#   tools/gpu_check.sh DIR            (make gpu-check DIR=...; make gpu-carry first, elsewhere)
#
# Uses the machine's python3 with its preinstalled torch (no venv, no network, installs nothing
# else) and writes every log and result into DIR:
#   env.txt            GPU, driver, torch, CUDA, triton versions
#   build.log          the extension for sm_90 only (TORCH_CUDA_ARCH_LIST=9.0), ninja on every core
#   gpu.txt            whether a CUDA GPU is visible: without one the run stops here, at once
#   info.txt           fastgpt.info() and the CUDA kernels registered
#   pytest.log         the GPU tests (markers cuda and triton; the CPU-only emulator and compile-for-
#                      Hopper tests run on every machine and are left out), pytest.xml: JUnit
#   oracle_cuda.log, oracle_triton.log, gpu_perf.md
#                      the acceptance scripts (a copy of ../shared/acceptance at .gpu/acceptance)
#   sweep.log, sweep/  a short context sweep of the attention benchmark (fastgpt bench attention)
#   memcheck.log, racecheck.log, synccheck.log
#                      with GPU_CHECK_SANITIZERS=1 only (minutes each): compute-sanitizer over
#                      tools/sanitizer_driver.py
#   summary.md         the table printed at the end: one row per step, ok / FAILED / skipped, seconds
# A failing step is recorded and the next one still runs (the exit status is 1 if any failed), except
# without a GPU. Every step's time limit is also cut to what is left of GPU_CHECK_BUDGET_S (470 s by
# default: the run ends inside 8 minutes even if steps hang).
set -uo pipefail

if [ $# -ne 1 ]; then
  echo "usage: $0 DIR" >&2
  exit 2
fi
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
mkdir -p "$1"
OUT="$(cd "$1" && pwd)"
PY="${PY:-python3}"
BUDGET_S="${GPU_CHECK_BUDGET_S:-470}"
START=$(date +%s)
SUMMARY="$OUT/summary.md"
printf '| step | outcome | seconds | log |\n|---|---|---|---|\n' > "$SUMMARY"
FAILED=0
cd "$ROOT"

finish() {
  echo
  echo "== summary ($SUMMARY, $(( $(date +%s) - START )) s in all)"
  cat "$SUMMARY"
  exit $FAILED
}

# step NAME LIMIT_S LOG COMMAND...: runs COMMAND with its output in LOG within min(LIMIT_S, the budget
# left), records the outcome; returns COMMAND's status.
step() {
  local name="$1" limit="$2" log="$3"
  shift 3
  local left=$(( BUDGET_S - ($(date +%s) - START) ))
  if [ "$left" -lt 10 ]; then
    skip "$name" "out of time (GPU_CHECK_BUDGET_S=$BUDGET_S)"
    FAILED=1
    return 1
  fi
  [ "$limit" -gt "$left" ] && limit=$left
  echo "== $name (at most ${limit}s)" | tee -a "$OUT/steps.log"
  local begin status
  begin=$(date +%s)
  timeout "$limit" "$@" > "$log" 2>&1
  status=$?
  local took=$(( $(date +%s) - begin ))
  if [ $status -eq 0 ]; then
    printf '| %s | ok | %s | %s |\n' "$name" "$took" "$(basename "$log")" >> "$SUMMARY"
  else
    FAILED=1
    [ $status -eq 124 ] && status="timeout"
    printf '| %s | FAILED (%s) | %s | %s |\n' "$name" "$status" "$took" "$(basename "$log")" >> "$SUMMARY"
  fi
  tail -n 3 "$log" | sed 's/^/   /'
  return $status
}
skip() { printf '| %s | skipped: %s | | |\n' "$1" "$2" >> "$SUMMARY"; echo "== $1: skipped ($2)"; }

# -- environment -------------------------------------------------------------------------
{
  nvidia-smi || true
  "$PY" - <<'EOF'
import sys, torch
print("python", sys.version.split()[0], "| torch", torch.__version__, "| CUDA", torch.version.cuda)
if torch.cuda.is_available():
    print("device", torch.cuda.get_device_name(), "| capability", torch.cuda.get_device_capability())
try:
    import triton
    print("triton", triton.__version__)
except ImportError:
    print("triton: not installed")
EOF
  command -v nvcc && nvcc --version
  echo "cores: $(nproc)"
} > "$OUT/env.txt" 2>&1

# -- build: sm_90 only, every core (no GPU needed) ---------------------------------------------
step build 300 "$OUT/build.log" env MAX_JOBS="$(nproc)" FASTGPT_CUDA=1 TORCH_CUDA_ARCH_LIST=9.0 PY="$PY" \
  bash -c '"$PY" -m pip install --no-build-isolation --no-deps -e . ||
    { echo "pip install -e . failed; building in place instead"; "$PY" setup.py build_ext --inplace; }'

# -- the first GPU step: without a visible GPU the rest cannot run; stop now ---------------------
if ! step gpu 30 "$OUT/gpu.txt" "$PY" -c '
import sys, torch
if not torch.cuda.is_available():
    sys.exit("no CUDA GPU is visible (torch.cuda.is_available() is False): the GPU steps cannot run")
capability = torch.cuda.get_device_capability()
print(torch.cuda.get_device_name(), "sm_%d%d" % capability)
if capability != (9, 0):
    sys.exit("the build is for sm_90 (H100 / H200) only, this GPU is sm_%d%d" % capability)'; then
  echo "gpu-check: $(tail -n 1 "$OUT/gpu.txt")" >&2
  finish
fi

step "extension registered" 60 "$OUT/info.txt" "$PY" - <<'EOF'
import json, torch, fastgpt
print(json.dumps(fastgpt.info(), indent=1, default=str))
ops = ("attention_fwd", "attention_bwd", "layer_norm_fwd", "layer_norm_bwd")
missing = [op for op in ops if not torch._C._dispatch_has_kernel_for_dispatch_key(f"fastgpt::{op}", "CUDA")]
assert not missing, f"no CUDA kernels registered for {missing}"
assert fastgpt.info()["cuda"]["available"], fastgpt.info()["cuda"]["reason"]
print("CUDA kernels registered for", ", ".join(ops))
EOF

# -- GPU tests ---------------------------------------------------------------------------------
step "pytest (GPU tests)" 180 "$OUT/pytest.log" "$PY" -m pytest -q -p no:cacheprovider -rfEs \
  --junitxml="$OUT/pytest.xml" -m "cuda or triton" -k "not emulated and not for_hopper" tests

# -- acceptance scripts ------------------------------------------------------------------------
if [ -f .gpu/acceptance/oracle.py ]; then
  step "acceptance oracle cuda" 90 "$OUT/oracle_cuda.log" \
    "$PY" .gpu/acceptance/oracle.py cuda cuda float16,bfloat16,float32
  step "acceptance oracle triton" 90 "$OUT/oracle_triton.log" \
    "$PY" .gpu/acceptance/oracle.py triton cuda float16,bfloat16,float32
  step "acceptance gpu_perf" 90 "$OUT/gpu_perf.md" "$PY" .gpu/acceptance/gpu_perf.py cuda,triton
else
  skip "acceptance scripts" "no copy of ../shared/acceptance at .gpu/acceptance (make gpu-carry)"
fi

# -- a short context sweep -----------------------------------------------------------------------
step "context sweep" 60 "$OUT/sweep.log" "$PY" -m fastgpt bench attention --device cuda --min-t 1024 \
  --max-t 8192 --budget-s 40 --out-dir "$OUT/sweep"

# -- compute-sanitizer (optional: minutes each) --------------------------------------------------
if [ "${GPU_CHECK_SANITIZERS:-0}" = 1 ]; then
  SANITIZER="$(command -v compute-sanitizer || ls /usr/local/cuda*/bin/compute-sanitizer 2>/dev/null | head -n 1)"
  for tool in memcheck racecheck synccheck; do
    # --error-exitcode makes any reported hazard fail the step, not only a crash.
    step "compute-sanitizer $tool" 600 "$OUT/$tool.log" \
      "$SANITIZER" --tool "$tool" --error-exitcode 3 --print-limit 50 "$PY" tools/sanitizer_driver.py
  done
fi

finish
