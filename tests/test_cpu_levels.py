"""The CPU kernels at every vector ISA level (fastgpt/_cpu_<level>, chosen at import by
fastgpt/_extension.py): each level this machine runs passes the shared CPU suite, the default
picks the highest, and FASTGPT_CPU_CAPABILITY refuses what the CPU cannot run instead of faulting.

The level this session loaded is tested by the whole suite; the others run the CPU tests of
test_attention, test_layer_norm and test_rms_norm in a subprocess each.
"""
import os
import subprocess
import sys

import pytest

import fastgpt
from fastgpt import _extension

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SUITE = ["tests/test_attention.py", "tests/test_layer_norm.py", "tests/test_rms_norm.py"]


def python(code: str, **env) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120,
                          env={**os.environ, **env})


def test_the_highest_level_built_and_supported_is_loaded():
    if os.environ.get("FASTGPT_CPU_CAPABILITY"):
        pytest.skip("this session chose its level with FASTGPT_CPU_CAPABILITY")
    built, supported = _extension.built_cpu_levels(), _extension.supported_cpu_levels()
    assert supported[0] == "default" and "default" in built
    assert _extension.CPU_CAPABILITY == [lv for lv in supported if lv in built][-1]
    info = fastgpt.info()["cpu"]
    assert info["cpu_capability"] == _extension.CPU_CAPABILITY
    assert f"{_extension.CPU_CAPABILITY} level" in info["description"]


@pytest.mark.parametrize("level", _extension.CPU_LEVELS)
def test_every_level_passes_the_cpu_suite(level):
    if level not in _extension.supported_cpu_levels():
        pytest.skip(f"this CPU does not run {level}")
    if level not in _extension.built_cpu_levels():
        pytest.fail(f"the {level} level runs here but was not built (setup.py builds every level of the platform)")
    if level == _extension.CPU_CAPABILITY:
        pytest.skip("the level of this session: the whole suite tests it")
    probe = python("import fastgpt; print(fastgpt.info()['cpu']['cpu_capability'])", FASTGPT_CPU_CAPABILITY=level)
    assert probe.stdout.strip() == level, probe.stderr
    run = subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", "-k", "cpu", *SUITE],
                         cwd=ROOT, capture_output=True, text=True, timeout=900,
                         env={**os.environ, "FASTGPT_CPU_CAPABILITY": level})
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-2000:]
    assert " passed" in run.stdout and " failed" not in run.stdout


def test_a_level_above_the_cpu_is_refused_with_a_reason():
    """ATEN_CPU_CAPABILITY=default makes torch (and so fastgpt) see a CPU without AVX2."""
    code = ("import fastgpt, torch\n"
            "print(fastgpt.info()['cpu']['reason'])\n"
            "q = torch.randn(1, 1, 4, 16)\n"
            "try:\n    fastgpt.attention(q, q, q, backend='cpu')\n"
            "except RuntimeError as error:\n    print('refused:', error)\n")
    run = python(code, ATEN_CPU_CAPABILITY="default", FASTGPT_CPU_CAPABILITY="avx2")
    assert run.returncode == 0, run.stderr
    assert "FASTGPT_CPU_CAPABILITY=avx2 is above what this CPU runs (at most default)" in run.stdout
    assert "refused:" in run.stdout and "illegal instruction" in run.stdout.split("refused:")[1]
    # Without the override the same CPU gets the default level.
    run = python("import fastgpt; print(fastgpt.info()['cpu']['cpu_capability'])", ATEN_CPU_CAPABILITY="default")
    assert run.stdout.strip() == "default", run.stderr


def test_an_unknown_level_is_refused_naming_the_levels():
    run = python("import fastgpt; print(fastgpt.info()['cpu']['reason'])", FASTGPT_CPU_CAPABILITY="sse9")
    assert "FASTGPT_CPU_CAPABILITY='sse9' is not a level: expected one of default, avx2, avx512" in run.stdout
