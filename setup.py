"""Builds the two pybind11 modules of steppo_fast.

* ``steppo_fast._C``      C++ CPU kernels, parallel over cores with OpenMP.
* ``steppo_fast._C_cuda`` CUDA kernels, compiled by nvcc with the CUDA runtime
  linked statically, so the module imports on machines without a GPU or driver.

Neither includes torch headers: Python passes raw pointers, sizes and a stream
handle. Environment:

* ``STEPPO_FAST_CUDA=0|1|auto`` (default auto): build ``_C_cuda`` never, always
  (failing if nvcc is missing) or when nvcc is found.
* ``STEPPO_FAST_CUDA_ARCHS`` (default ``80;90``): compute capabilities to build for.
* ``STEPPO_FAST_OPENMP=0`` builds ``_C`` single-threaded.
"""

import os
import shutil
import subprocess
import sys
import sysconfig

from pybind11.setup_helpers import Pybind11Extension
from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

HERE = os.path.dirname(os.path.abspath(__file__))
CSRC = os.path.join("csrc")


def _sources(suffix):
    return sorted(os.path.join(CSRC, f) for f in os.listdir(os.path.join(HERE, CSRC)) if f.endswith(suffix))


class CUDAExtension(Extension):
    """An extension whose sources nvcc compiles and links (see BuildExt)."""


def _find_nvcc():
    cuda_home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    if cuda_home and os.path.exists(os.path.join(cuda_home, "bin", "nvcc")):
        return os.path.join(cuda_home, "bin", "nvcc")
    return shutil.which("nvcc")


class BuildExt(build_ext):
    def build_extension(self, ext):
        if isinstance(ext, CUDAExtension):
            self._build_cuda(ext)
        else:
            super().build_extension(ext)

    def _build_cuda(self, ext):
        import pybind11

        nvcc = _find_nvcc()
        archs = [a.strip() for a in os.environ.get("STEPPO_FAST_CUDA_ARCHS", "80;90").replace(",", ";").split(";") if a.strip()]
        gencode = []
        for arch in archs:
            gencode += [f"-gencode=arch=compute_{arch},code=sm_{arch}"]
        # PTX of the newest arch as well, so newer GPUs can JIT it.
        gencode += [f"-gencode=arch=compute_{archs[-1]},code=compute_{archs[-1]}"]
        includes = [pybind11.get_include(), sysconfig.get_paths()["include"], os.path.join(HERE, CSRC)]
        out = self.get_ext_fullpath(ext.name)
        os.makedirs(os.path.dirname(out), exist_ok=True)
        tmp = os.path.join(self.build_temp, "cuda")
        os.makedirs(tmp, exist_ok=True)
        objects = []
        for src in ext.sources:
            obj = os.path.join(tmp, os.path.basename(src) + ".o")
            cmd = [nvcc, "-c", src, "-o", obj, "-O3", "-std=c++17", "--expt-relaxed-constexpr",
                   "-Xcompiler", "-fPIC,-fvisibility=hidden", "-DNDEBUG"] + gencode
            cmd += [f"-I{p}" for p in includes]
            print(" ".join(cmd))
            subprocess.check_call(cmd)
            objects.append(obj)
        link = [nvcc, "-shared", "-cudart=static", "-o", out] + objects + gencode + ["-lrt", "-ldl", "-lpthread"]
        print(" ".join(link))
        subprocess.check_call(link)


def extensions():
    openmp = os.environ.get("STEPPO_FAST_OPENMP", "1") != "0"
    # No FP traps or errno are relied on: this lets the compiler if-convert and vectorise the
    # select-heavy loops of the kernels (csrc/logprob.cpp). Still IEEE: no -ffast-math.
    flags = ["-O3", "-std=c++17", "-fno-trapping-math", "-fno-math-errno"] + (["-fopenmp"] if openmp else [])
    exts = [
        Pybind11Extension(
            "steppo_fast._C",
            _sources(".cpp"),
            include_dirs=[CSRC],
            extra_compile_args=flags,
            extra_link_args=["-fopenmp"] if openmp else [],
        )
    ]
    mode = os.environ.get("STEPPO_FAST_CUDA", "auto").lower()
    if mode not in ("0", "1", "auto"):
        sys.exit(f"STEPPO_FAST_CUDA must be 0, 1 or auto, got {mode!r}")
    nvcc = _find_nvcc()
    if mode == "1" and nvcc is None:
        sys.exit("STEPPO_FAST_CUDA=1 but nvcc was not found (set CUDA_HOME or put nvcc on the PATH)")
    if mode == "1" or (mode == "auto" and nvcc is not None):
        exts.append(CUDAExtension("steppo_fast._C_cuda", _sources(".cu")))
    return exts


setup(ext_modules=extensions(), cmdclass={"build_ext": BuildExt})
