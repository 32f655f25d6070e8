"""Build slimkern._C from csrc/ with torch.utils.cpp_extension and ninja.

Sources are globbed, so a new op needs no edit here:
  csrc/**/*.cpp  always (CPU kernels, schemas, solvers)
  csrc/**/*.cu   when torch is a CUDA build and nvcc is found, or FORCE_CUDA=1.
With FORCE_CUDA=1 a CUDA build that cannot happen is an error, never a silent
CPU-only build.
"""
import glob
import json
import os
import shutil
import sys

import torch
from setuptools import find_packages, setup
from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension

ROOT = os.path.dirname(os.path.abspath(__file__))
# The plain-C++ solver unit tests build with CMake only (cmake/), never into _C.
EXCLUDE = ("csrc/solvers/tests/",)


def _sources(pattern):
    found = sorted(glob.glob(os.path.join("csrc", "**", pattern), recursive=True))
    return [s for s in found if not s.replace(os.sep, "/").startswith(EXCLUDE)]


def _want_cuda():
    # FORCE_CUDA unset: auto; "1": CUDA required; "0": CPU only (quick local builds).
    setting = os.environ.get("FORCE_CUDA", "")
    if setting == "0":
        return False
    force = setting == "1"
    nvcc = os.path.join(CUDA_HOME, "bin", "nvcc") if CUDA_HOME else None
    have_nvcc = nvcc is not None and os.path.exists(nvcc)
    if force:
        problems = []
        if torch.version.cuda is None:
            problems.append(f"torch {torch.__version__} is a CPU-only build")
        if not have_nvcc:
            problems.append(f"nvcc not found (CUDA_HOME={CUDA_HOME!r}; set CUDA_HOME to the toolkit root)")
        if not os.environ.get("TORCH_CUDA_ARCH_LIST") and not torch.cuda.is_available():
            problems.append("TORCH_CUDA_ARCH_LIST is not set and no GPU is present to detect it")
        if problems:
            sys.exit("FORCE_CUDA=1 but the CUDA sources cannot be built: " + "; ".join(problems))
        return True
    return torch.version.cuda is not None and have_nvcc


def _cuda_lib_includes():
    # cuBLAS/cuSPARSE headers ship inside the torch wheel (nvidia/cu*/include), not in the toolkit.
    dirs = []
    for site in sys.path:
        dirs += sorted(glob.glob(os.path.join(site, "nvidia", "cu*", "include")))
    return dirs[:1]


# SLIMKERN_SANITIZE=1: AddressSanitizer + UndefinedBehaviorSanitizer, CPU only (`make
# test-sanitize` builds this into build/sanitize/ and runs the C++-op tests against it).
SANITIZE = ["-fsanitize=address,undefined", "-fno-sanitize-recover=undefined", "-fno-omit-frame-pointer", "-g"]


def _extension():
    sanitize = os.environ.get("SLIMKERN_SANITIZE", "") == "1"
    with_cuda = _want_cuda() and not sanitize
    sources = _sources("*.cpp") + (_sources("*.cu") if with_cuda else [])
    cxx = ["-O1" if sanitize else "-O3", "-std=c++20", "-fopenmp"] + (SANITIZE if sanitize else [])
    build = {
        "torch": torch.__version__,
        "cuda": torch.version.cuda if with_cuda else None,
        "with_cuda": with_cuda,
        "arch_list": os.environ.get("TORCH_CUDA_ARCH_LIST") if with_cuda else None,
        "sanitize": sanitize,
    }
    define_macros = [("SLIMKERN_BUILD_INFO", json.dumps(json.dumps(build)))]
    include_dirs = [os.path.join(ROOT, "csrc", "include")]
    kwargs = dict(sources=sources, include_dirs=include_dirs,
                  extra_link_args=["-fopenmp"] + (SANITIZE if sanitize else []))
    if with_cuda:
        define_macros.append(("WITH_CUDA", None))
        include_dirs += _cuda_lib_includes()
        nvcc = ["-O3", "-std=c++20", "--expt-relaxed-constexpr", "-lineinfo"]
        ext = CUDAExtension("slimkern._C", define_macros=define_macros,
                            extra_compile_args={"cxx": cxx, "nvcc": nvcc}, **kwargs)
    else:
        ext = CppExtension("slimkern._C", define_macros=define_macros,
                           extra_compile_args={"cxx": cxx}, **kwargs)
    print("slimkern build configuration:")
    for key, value in build.items():
        print(f"  {key:10s} {value}")
    print(f"  CUDA_HOME  {CUDA_HOME}")
    print(f"  MAX_JOBS   {os.environ.get('MAX_JOBS')}")
    print(f"  sources    {len(sources)} ({sum(s.endswith('.cu') for s in sources)} CUDA)")
    return ext


setup(
    packages=find_packages(include=["slimkern", "slimkern.*"]),
    ext_modules=[_extension()],
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=shutil.which("ninja") is not None)},
)
