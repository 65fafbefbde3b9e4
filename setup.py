"""Build megaphi's extensions: the C++ data helpers (always) and the CUDA kernels (when nvcc is found).
The package's metadata, dependencies and commands are in pyproject.toml.

megaphi._C    csrc/data/*.cpp, pybind11, no torch headers.
megaphi._cuda csrc/kernels/*.cu + *.cpp, compiled by nvcc and bound with pybind11 over raw
              device pointers, so it does not depend on the torch C++ ABI. Skipped cleanly when
              nvcc is absent, or when MEGAPHI_SKIP_CUDA=1.
Arch list: MEGAPHI_CUDA_ARCHS (default "80;90").
"""

import glob
import os
import shutil
import subprocess
import sys
import sysconfig

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

import pybind11

HERE = os.path.dirname(os.path.abspath(__file__))


def _find_nvcc():
    if os.environ.get("MEGAPHI_SKIP_CUDA") == "1":
        return None
    cuda_home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    if cuda_home and os.path.exists(os.path.join(cuda_home, "bin", "nvcc")):
        return os.path.join(cuda_home, "bin", "nvcc")
    return shutil.which("nvcc")


class CUDAExtension(Extension):
    """Marker: sources are compiled with nvcc by BuildExt."""


class BuildExt(build_ext):
    def build_extension(self, ext):
        if isinstance(ext, CUDAExtension):
            return self._build_cuda(ext)
        return super().build_extension(ext)

    def _build_cuda(self, ext):
        nvcc = _find_nvcc()
        out_path = self.get_ext_fullpath(ext.name)
        os.makedirs(os.path.dirname(out_path), exist_ok=True)
        deps = (
            ext.sources
            + glob.glob(os.path.join(HERE, "csrc", "kernels", "*.h"))
            + glob.glob(os.path.join(HERE, "csrc", "kernels", "*.cuh"))
        )
        # nvcc builds are slow: skip when the module is newer than every source and was built
        # for the same arch list (kept in a stamp file beside it).
        stamp_path = out_path + ".flags"
        archs_spec = os.environ.get("MEGAPHI_CUDA_ARCHS", "80;90")
        old_spec = open(stamp_path).read() if os.path.exists(stamp_path) else None
        if (
            not self.force
            and old_spec == archs_spec
            and os.path.exists(out_path)
            and all(os.path.getmtime(out_path) >= os.path.getmtime(d) for d in deps)
        ):
            return
        if os.path.exists(stamp_path):
            os.remove(stamp_path)  # a build that fails midway must not look up to date
        archs = [
            a.strip() for a in os.environ.get("MEGAPHI_CUDA_ARCHS", "80;90").replace(",", ";").split(";") if a.strip()
        ]
        gencode = []
        for arch in archs:
            gencode += ["-gencode", f"arch=compute_{arch},code=sm_{arch}"]
        if archs:  # PTX of the newest arch too, so the driver can JIT for GPUs newer than the list
            newest = max(archs, key=lambda a: int("".join(ch for ch in a if ch.isdigit()) or 0))
            gencode += ["-gencode", f"arch=compute_{newest},code=compute_{newest}"]
        includes = [pybind11.get_include(), sysconfig.get_paths()["include"], os.path.join(HERE, "csrc", "kernels")]
        build_dir = os.path.join(self.build_temp, "cuda")
        os.makedirs(build_dir, exist_ok=True)
        jobs = int(os.environ.get("MEGAPHI_NVCC_THREADS", "2"))
        objects = []
        for src in ext.sources:
            obj = os.path.join(build_dir, os.path.basename(src) + ".o")
            cmd = [
                nvcc,
                "-c",
                src,
                "-o",
                obj,
                "-O3",
                "-std=c++17",
                "--use_fast_math",
                "-Xcompiler",
                "-fPIC",
                "-Xcompiler",
                "-Wall",
                "-Xcompiler",
                "-fvisibility=hidden",
                f"--threads={jobs}",
            ] + gencode
            cmd += [f"-I{inc}" for inc in includes]
            print(" ".join(cmd), flush=True)
            subprocess.check_call(cmd)
            objects.append(obj)
        link = [nvcc, "-shared", "-o", out_path] + objects + ["-lcudart"]
        print(" ".join(link), flush=True)
        subprocess.check_call(link)
        with open(stamp_path, "w") as f:
            f.write(archs_spec)


def _extensions():
    exts = [
        Extension(
            "megaphi._C",
            sorted(glob.glob("csrc/data/*.cpp")),
            include_dirs=[pybind11.get_include(), "csrc/data"],
            language="c++",
            extra_compile_args=["-O3", "-std=c++17", "-fvisibility=hidden"],
        )
    ]
    cuda_sources = sorted(glob.glob("csrc/kernels/*.cu") + glob.glob("csrc/kernels/*.cpp"))
    if cuda_sources and _find_nvcc():
        exts.append(CUDAExtension("megaphi._cuda", cuda_sources))
    elif cuda_sources:
        print("megaphi: nvcc not found (or MEGAPHI_SKIP_CUDA=1); building without megaphi._cuda", file=sys.stderr)
    return exts


# Everything else about the package (name, version, dependencies, commands) is in pyproject.toml.
setup(ext_modules=_extensions(), cmdclass={"build_ext": BuildExt})
