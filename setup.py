"""Builds fastgpt._C: the operator schemas (csrc/ops.cpp), the C++ CPU kernels
(csrc/cpu/*.cpp) and, when a CUDA toolkit and a CUDA build of torch are both
present, the CUDA kernels (csrc/cuda/*.cu).

Environment:
  FASTGPT_CUDA=0|1       force the CUDA part off / on (default: toolkit and CUDA torch present)
  TORCH_CUDA_ARCH_LIST   GPU architectures (default "8.0;9.0": A100 and H100/H200)
  MAX_JOBS               parallel compile jobs (ninja)
  FASTGPT_CPU_ARCH_FLAGS compiler flags selecting the CPU vector ISA
                         (default on x86-64: AVX2 + FMA + F16C, i.e. x86-64-v3)
  FASTGPT_NO_EXTENSION=1 install the Python package alone; `make build` then compiles
                         the extension in place (setup.py build_ext --inplace), incrementally
"""
import glob
import os
import platform
import shutil

import torch
from setuptools import find_packages, setup


def _locate_cuda_home() -> None:
    """torch finds the toolkit from CUDA_HOME, else from `which nvcc`; a wrapper script on
    PATH (here /usr/local/bin/nvcc) would point it at /usr/local. Use a real toolkit root."""
    if "CUDA_HOME" in os.environ or "CUDA_PATH" in os.environ or shutil.which("nvcc") is None:
        return
    nvcc_root = os.path.dirname(os.path.dirname(os.path.realpath(shutil.which("nvcc"))))
    for root in (nvcc_root, "/usr/local/cuda"):
        if os.path.exists(os.path.join(root, "include", "cuda_runtime.h")):
            os.environ["CUDA_HOME"] = root
            return


_locate_cuda_home()
from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension

ROOT = os.path.dirname(os.path.abspath(__file__))
TORCH_RELEASE = torch.__version__.split("+", 1)[0]


def cuda_wanted() -> bool:
    flag = os.environ.get("FASTGPT_CUDA")
    can = CUDA_HOME is not None and torch.version.cuda is not None
    if flag == "1" and not can:
        raise RuntimeError(
            "FASTGPT_CUDA=1 but the CUDA part cannot be built: "
            + ("no CUDA toolkit found (set CUDA_HOME or put nvcc on PATH)" if CUDA_HOME is None
               else f"torch {torch.__version__} is a CPU build (install a CUDA build of torch)"))
    # Decided from the toolkit and torch's build, never torch.cuda.is_available():
    # build machines often have no GPU.
    return can if flag is None else flag == "1"


def cpu_arch_flags() -> list[str]:
    if "FASTGPT_CPU_ARCH_FLAGS" in os.environ:
        return os.environ["FASTGPT_CPU_ARCH_FLAGS"].split()
    if platform.machine() in ("x86_64", "AMD64"):
        return ["-mavx2", "-mfma", "-mf16c", "-DCPU_CAPABILITY=AVX2", "-DCPU_CAPABILITY_AVX2"]
    return []


def extension():
    with_cuda = cuda_wanted()
    sources = ["csrc/ops.cpp"] + sorted(glob.glob("csrc/cpu/*.cpp"))
    defines = [f'-DFASTGPT_TORCH_VERSION="{torch.__version__}"']
    cxx = ["-O3", "-fopenmp", *cpu_arch_flags(), *defines]
    args = dict(name="fastgpt._C", sources=sources, include_dirs=[os.path.join(ROOT, "csrc")],
                extra_link_args=["-fopenmp"], py_limited_api=False)
    if not with_cuda:
        return CppExtension(**args, extra_compile_args={"cxx": cxx})
    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0")
    args["sources"] += sorted(glob.glob("csrc/cuda/*.cu"))
    nvcc = ["-O3", "-std=c++20", "--use_fast_math", "-lineinfo", "--expt-relaxed-constexpr",
            *defines]
    return CUDAExtension(**args, extra_compile_args={"cxx": cxx, "nvcc": nvcc})


setup(
    name="fastgpt",
    version="0.1.0",
    packages=find_packages(include=["fastgpt", "fastgpt.*"]),
    ext_modules=[] if os.environ.get("FASTGPT_NO_EXTENSION") == "1" else [extension()],
    cmdclass={"build_ext": BuildExtension},
    # The compiled extension only runs under the torch release it was built against.
    install_requires=[f"torch=={TORCH_RELEASE}", "tiktoken", "tqdm"],
)
