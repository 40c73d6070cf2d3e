#!/usr/bin/env bash
# Builds the fastgpt wheel and checks it works where users get it: installed (not editable)
# into a fresh environment, imported from outside the source tree.
#
#   tools/wheel_check.sh            (PY=path/to/python to use another interpreter; default .venv)
#
# 1. `pip wheel --no-build-isolation --no-deps` against the installed torch, under the build
#    lock `make build` takes: setup.cfg points build_ext at build/temp, so objects that
#    `make build` compiled with the same flags are reused (ninja), not recompiled.
# 2. The wheel must hold the compiled fastgpt/_C*.so and the CPU kernels of every level
#    (fastgpt/_cpu_<level>*.so), and pin the torch release it was built against
#    (Requires-Dist: torch==X.Y.Z): the extension runs under no other.
# 3. A fresh venv that sees the project's torch without reinstalling it: `venv --without-pip`
#    plus a .pth line naming the project venv's site-packages (a path named in a .pth file is
#    added to sys.path, but the .pth files inside it are not run, so the project's editable
#    fastgpt stays invisible). pip (from that path) installs the wheel into the fresh venv.
# 4. From an empty directory: the wheel's fastgpt imports, its C++ backend is available, and
#    attention, layer norm and a GPTModel forward run on it; again with FASTGPT_CPU_CAPABILITY=default
#    (the baseline x86-64 kernels, what a CPU without AVX2 loads).
set -euo pipefail
unset PYTHONPATH  # the wheel alone must provide fastgpt

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PY="${PY:-$ROOT/.venv/bin/python}"
WHEELHOUSE="$ROOT/wheelhouse"
SCRATCH="$(mktemp -d)"
trap 'rm -rf "$SCRATCH"' EXIT
seconds() { date +%s.%N; }
elapsed() { awk -v a="$1" -v b="$(seconds)" 'BEGIN { printf "%.1f", b - a }'; }

cd "$ROOT"
start="$(seconds)"
rm -f "$WHEELHOUSE"/fastgpt-*.whl
mkdir -p build
flock build/.lock "$PY" -m pip wheel --verbose --no-build-isolation --no-deps --no-cache-dir -w "$WHEELHOUSE" . \
    > "$SCRATCH/build.log" 2>&1 || { tail -n 40 "$SCRATCH/build.log"; echo "wheel_check: pip wheel failed"; exit 1; }
WHEEL="$(ls "$WHEELHOUSE"/fastgpt-*.whl)"
echo "wheel_check: built $(basename "$WHEEL") in $(elapsed "$start") s" \
     "(ninja ran $(grep -c -E '^ *\[[0-9]+/[0-9]+\]' "$SCRATCH/build.log" || true) compile steps; 0: all reused)"

"$PY" - "$WHEEL" <<'EOF'
import re, sys, zipfile
import torch
wheel = zipfile.ZipFile(sys.argv[1])
names = wheel.namelist()
extensions = [n for n in names if re.fullmatch(r"fastgpt/_C\.[^/]*\.so", n)]
assert extensions, f"the wheel holds no compiled fastgpt/_C*.so: {names}"
import platform
levels = ("default", "avx2", "avx512") if platform.machine() in ("x86_64", "AMD64") else ("default",)
missing = [lv for lv in levels if not any(re.fullmatch(rf"fastgpt/_cpu_{lv}\.[^/]*\.so", n) for n in names)]
assert not missing, f"the wheel lacks the CPU kernels of the levels {missing}: {names}"
metadata = wheel.read(next(n for n in names if n.endswith(".dist-info/METADATA"))).decode()
release = torch.__version__.split("+")[0]
pins = re.findall(r"^Requires-Dist: torch\b.*$", metadata, re.M)
assert pins == [f"Requires-Dist: torch=={release}"], f"expected the pin torch=={release}, found {pins}"
print(f"wheel_check: holds {extensions[0]}, pins {pins[0][len('Requires-Dist: '):]}")
EOF

"$PY" -m venv --without-pip "$SCRATCH/venv"
VENV_PY="$SCRATCH/venv/bin/python"
PROJECT_SITE="$("$PY" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
VENV_SITE="$("$VENV_PY" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
echo "$PROJECT_SITE" > "$VENV_SITE/_project_site_packages.pth"
"$VENV_PY" -m pip install --quiet --no-deps --no-index --ignore-installed "$WHEEL"

mkdir "$SCRATCH/elsewhere"
cd "$SCRATCH/elsewhere"
cat > "$SCRATCH/smoke.py" <<'EOF'
import os, sys
import torch
import fastgpt
from fastgpt import reference

site = sys.argv[1]
assert fastgpt.__file__.startswith(site), f"imported {fastgpt.__file__}, not the installed wheel under {site}"
cpu = fastgpt.info()["cpu"]
assert cpu["available"], f"the wheel's C++ backend is unavailable: {cpu['reason']}"

torch.manual_seed(0)
q, k, v = (torch.randn(2, 3, 17, 32) for _ in range(3))
out = fastgpt.attention(q, k, v, causal=True, backend="cpu")
want = reference.attention(q.double(), k.double(), v.double(), True)
assert (out.double() - want).abs().max() < 1e-5, "cpu attention differs from the reference"
x, w, b = torch.randn(5, 48), torch.randn(48), torch.randn(48)
y = fastgpt.layer_norm(x, w, b, backend="cpu")
assert (y.double() - reference.layer_norm(x.double(), w.double(), b.double())).abs().max() < 1e-4
cfg = {"vocab_size": 97, "context_length": 32, "emb_dim": 64, "n_heads": 4, "n_layers": 2,
       "drop_rate": 0.0, "qkv_bias": True}
model = fastgpt.GPTModel(cfg, backend="cpu").eval()
with torch.no_grad():
    logits = model(torch.randint(0, 97, (2, 16)))
assert logits.shape == (2, 16, 97) and torch.isfinite(logits).all()
print(f"wheel_check: fastgpt {fastgpt.__version__} from {os.path.dirname(fastgpt.__file__)}: "
      f"cpu backend ({cpu['cpu_capability']} level) available; attention, layer_norm, GPTModel forward OK")
EOF
"$VENV_PY" "$SCRATCH/smoke.py" "$VENV_SITE"
FASTGPT_CPU_CAPABILITY=default "$VENV_PY" "$SCRATCH/smoke.py" "$VENV_SITE"
echo "wheel_check: passed in $(elapsed "$start") s"
