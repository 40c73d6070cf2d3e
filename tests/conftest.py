"""Shared fixtures: which kernel backends run where in this test session.

- cpu:    the C++ kernels, always (a build without them fails, it does not skip).
- cuda:   the CUDA kernels, on a GPU; skipped without one. With a GPU present an
          extension built without CUDA fails the tests instead of skipping them.
- triton: real Triton on a GPU; on a CPU-only machine Triton's interpreter
          (TRITON_INTERPRET=1, set here before anything imports triton).
"""
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import fastgpt  # noqa: E402  (after TRITON_INTERPRET is set)

HAS_GPU = torch.cuda.is_available()
SHARED_DATA = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data")


def backend_device(backend: str) -> str | None:
    """The device a backend's tests run on in this session (None: not here)."""
    if backend == "cpu":
        return "cpu"
    if backend == "cuda":
        return "cuda" if HAS_GPU else None
    if backend == "triton":
        return "cuda" if HAS_GPU else "cpu"
    return "cuda" if HAS_GPU else "cpu"


def require_backend(backend: str) -> str:
    """Skip when the backend's device is absent; fail when the device is here but the backend is not."""
    device = backend_device(backend)
    if device is None:
        pytest.skip(f"{backend}: no GPU in this session")
    report = fastgpt.info()[backend]
    if device not in report["devices"]:
        pytest.fail(f"backend {backend!r} should run on {device} here but is unavailable: {report['reason']}")
    return device


def skip_unsupported_dtype(backend: str, device: str, dtype: torch.dtype) -> None:
    """Skip the dtypes a backend does not take by design (its error path is tested elsewhere)."""
    if dtype == torch.float64 and backend in ("cuda", "triton"):
        pytest.skip(f"{backend} takes float16/bfloat16/float32, not float64")
    if backend == "triton" and device == "cpu" and dtype == torch.bfloat16:
        pytest.skip("Triton's interpreter has no bfloat16 tl.dot")


@pytest.fixture(params=["cpu", pytest.param("cuda", marks=pytest.mark.cuda),
                        pytest.param("triton", marks=pytest.mark.triton)], ids=lambda b: f"backend={b}")
def kernel(request):
    """(backend, device) for every fused backend that runs in this session (`-m triton` selects them)."""
    return request.param, require_backend(request.param)


@pytest.fixture(params=("naive", "sdpa", "cpu"), ids=lambda b: f"backend={b}")
def backend(request):
    """The backends every CPU session runs the drop-in modules and models on (test_nn, test_patch)."""
    require_backend(request.param)
    return request.param


@pytest.fixture
def shared_data():
    """Path of ../shared/data (offline GPT-2 vocab, the-verdict.txt); skip when absent."""
    if not os.path.isdir(SHARED_DATA):
        pytest.skip("../shared/data is not present")
    return os.path.abspath(SHARED_DATA)
