"""Builds megaphi's CUDA kernels (csrc/kernels) for the CPU: g++ against HIP-CPU, one shared library.

The .cu files are compiled unchanged as C++ with -DMEGAPHI_HIP_CPU (common.cuh then takes
hip_cpu_compat.h instead of the CUDA headers), next to entry.cpp, the C functions ctypes calls.
Compiling takes about a minute per file, so each object and the library are cached under
~/.cache/megaphi/hip-cpu (MEGAPHI_HIP_CPU_CACHE) by a hash of everything that goes into them: the
compiler's version, the flags, the source and every header of csrc/kernels and HIP-CPU. Reruns and
untouched files cost nothing; a concurrent build of the same key only repeats work.

Two runtimes can run them: megaphi's own HIP runtime on fibers (tests/hipcpu/fiber_runtime), which
implements just what the kernels use and runs threads and blocks in adversarial orders, and HIP-CPU
(a complete checkout: include/, src/include/, external/, as beside the repository). The tests run on
both where both are at hand.

Environment:
  MEGAPHI_CPU_RUNTIME     hip-cpu | fiber: only this one (default: fiber, plus hip-cpu when its checkout
                          is complete)
  MEGAPHI_HIP_CPU_DIR     HIP-CPU checkout (include/, src/include/, external/), default
                          ../shared/third_party/hip-cpu beside the repository
  MEGAPHI_KERNEL_SOURCES  folder with the kernel sources, default csrc/kernels (the mutation script
                          points it at a patched copy)
  CXX                     the C++ compiler, default g++

`python tests/hipcpu/build.py` builds for each runtime and prints the libraries' paths.
"""

import concurrent.futures
import hashlib
import os
import pathlib
import shutil
import subprocess
import sys
import tempfile

REPO_ROOT = pathlib.Path(__file__).resolve().parents[2]
ENTRY_SOURCE = pathlib.Path(__file__).resolve().with_name("entry.cpp")
FIBER_PROBES_SOURCE = pathlib.Path(__file__).resolve().with_name("fiber_probes.cpp")  # fiber runtime only
KERNEL_FILES = ("layer_norm.cu", "rotary.cu")  # runtime_info.cu and bindings.cpp are CUDA/pybind only
LIBRARY_NAME = "libmegaphi_kernels_hipcpu.so"
# The kernels' grid cap (2^20 blocks on a GPU), lowered so that a few hundred rows or tokens already make
# blocks stride: HIP-CPU runs a block's barriers as fiber switches, and 2^20 rows would take minutes.
MAX_GRID_BLOCKS = 13
# -O1: as fast to run as -O2 here and compiles in two thirds of the time. -fno-strict-aliasing: the
# kernels read 16-byte packs through reinterpret_cast, which the GPU compiler allows.
FLAGS = (
    "-x",
    "c++",
    "-std=c++17",
    "-O1",
    "-DNDEBUG",
    "-DMEGAPHI_HIP_CPU",
    f"-DMEGAPHI_MAX_GRID_BLOCKS={MAX_GRID_BLOCKS}",
    "-fPIC",
    "-fno-strict-aliasing",
    "-Wall",
    "-Wextra",
    "-Wno-unknown-pragmas",
)
# Files whose presence says the HIP-CPU checkout is whole: its public headers include the others by
# relative path (src/include, external).
HIP_CPU_REQUIRED = (
    "include/hip/hip_runtime.h",
    "src/include/hip/detail/api.hpp",
    "external/libco/libco.h",
    "external/half/half.hpp",
)


FIBER_RUNTIME_DIR = pathlib.Path(__file__).resolve().with_name("fiber_runtime")


def runtimes():
    """The runtimes to run the kernels on: "fiber" (megaphi's own, always buildable), and "hip-cpu" when a
    complete HIP-CPU checkout is at hand. MEGAPHI_CPU_RUNTIME=hip-cpu|fiber picks one."""
    forced = os.environ.get("MEGAPHI_CPU_RUNTIME")
    if forced in ("hip-cpu", "fiber"):
        return [forced]
    root = hip_cpu_dir()
    return ["fiber"] + (["hip-cpu"] if all((root / name).exists() for name in HIP_CPU_REQUIRED) else [])


def runtime():
    """The first of runtimes(): what build() builds for when not told."""
    return runtimes()[0]


def hip_cpu_dir():
    default = REPO_ROOT.parent / "shared" / "third_party" / "hip-cpu"
    return pathlib.Path(os.environ.get("MEGAPHI_HIP_CPU_DIR", default))


def kernel_source_dir():
    return pathlib.Path(os.environ.get("MEGAPHI_KERNEL_SOURCES", REPO_ROOT / "csrc" / "kernels"))


def cache_dir():
    return pathlib.Path(os.environ.get("MEGAPHI_HIP_CPU_CACHE", pathlib.Path.home() / ".cache" / "megaphi" / "hip-cpu"))


def compiler():
    return os.environ.get("CXX", "g++")


def has_tbb():
    """Whether libstdc++ runs parallel algorithms on Intel TBB here (HIP-CPU then runs blocks on all
    cores); without it they run serially: slower, same results."""
    probe = subprocess.run(
        [compiler(), "-x", "c++", "-std=c++17", "-E", "-"],
        input="#include <tbb/tbb.h>\n",
        capture_output=True,
        text=True,
    )
    return probe.returncode == 0


def missing_prerequisite(runtime_name=None):
    """None when the kernels can be built here, else why not (a sentence for pytest.skip)."""
    if shutil.which(compiler()) is None:
        return f"C++ compiler {compiler()!r} not found (set CXX)"
    root = hip_cpu_dir()
    missing = [name for name in HIP_CPU_REQUIRED if not (root / name).exists()]
    if missing and (runtime_name or runtime()) == "hip-cpu":
        return (
            f"HIP-CPU not found or incomplete at {root} (missing {', '.join(missing)}); "
            "set MEGAPHI_HIP_CPU_DIR to a checkout of https://github.com/ROCm/HIP-CPU"
        )
    return None


def _digest(*parts):
    h = hashlib.sha256()
    for part in parts:
        h.update(part if isinstance(part, bytes) else str(part).encode())
        h.update(b"\0")
    return h.hexdigest()[:24]


def _files_digest(paths):
    return _digest(*[x for p in sorted(paths) for x in (p.name, p.read_bytes())])


def _compile_flags(tbb, runtime_name):
    if runtime_name == "fiber":
        # __shared__ is `static` there: a kernel instantiation that leaves it unused would warn
        return list(FLAGS) + [
            "-DMEGAPHI_FIBER_RUNTIME",
            "-Wno-unused-variable",
            "-I",
            str(FIBER_RUNTIME_DIR),
            "-I",
            str(kernel_source_dir()),
        ]
    root = hip_cpu_dir()
    # -isystem: HIP-CPU's own headers are not ours to keep warning-free.
    flags = list(FLAGS) + ["-isystem", str(root / "include"), "-I", str(kernel_source_dir())]
    if not tbb:
        flags.append("-D_GLIBCXX_USE_TBB_PAR_BACKEND=0")
    return flags


def _atomic_write_from(build_fn, target):
    """Runs build_fn(temporary path) and moves the result to target, so readers never see half a file."""
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=target.parent, suffix=".tmp")
    os.close(fd)
    try:
        build_fn(pathlib.Path(tmp))
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def _run(cmd, log):
    result = subprocess.run(cmd, capture_output=True, text=True)
    output = " ".join(cmd) + "\n" + result.stdout + result.stderr
    log.append(output)
    if result.returncode != 0:
        raise RuntimeError(f"HIP-CPU kernel build failed:\n{output}")


def build(verbose=False, runtime_name=None):
    """Path of the shared library built from the current sources for runtime_name (default runtime()),
    from the cache when unchanged."""
    runtime_name = runtime_name or runtime()
    reason = missing_prerequisite(runtime_name)
    if reason is not None:
        raise RuntimeError(reason)
    sources_dir = kernel_source_dir()
    tbb = runtime_name == "hip-cpu" and has_tbb()
    flags = _compile_flags(tbb, runtime_name)
    version = subprocess.run([compiler(), "--version"], capture_output=True, text=True).stdout
    headers = [p for p in sources_dir.iterdir() if p.suffix in (".h", ".cuh")]
    runtime_roots = (
        [FIBER_RUNTIME_DIR]
        if runtime_name == "fiber"
        else [hip_cpu_dir() / "include", hip_cpu_dir() / "src" / "include"]
    )
    hip_cpu_files = [p for root in runtime_roots for p in root.rglob("*") if p.is_file()]
    common = _digest(version, flags, _files_digest(headers), _files_digest(hip_cpu_files))
    sources = [sources_dir / name for name in KERNEL_FILES] + [ENTRY_SOURCE]
    if runtime_name == "fiber":
        sources.append(FIBER_PROBES_SOURCE)
    objects = {src: cache_dir() / "objects" / f"{src.stem}-{_digest(common, src.read_bytes())}.o" for src in sources}
    library = cache_dir() / _digest(common, *sorted(o.name for o in objects.values()), tbb) / LIBRARY_NAME
    if library.exists():
        return library
    log = []

    def compile_one(src):
        if not objects[src].exists():
            _atomic_write_from(
                lambda tmp: _run([compiler(), *flags, "-c", str(src), "-o", str(tmp)], log), objects[src]
            )

    # One file per core: the two kernel files are most of the time.
    with concurrent.futures.ThreadPoolExecutor(max_workers=max(1, min(len(sources), os.cpu_count() or 1))) as pool:
        list(pool.map(compile_one, sources))
    link = [compiler(), "-shared", *[str(o) for o in objects.values()]] + (["-ltbb"] if tbb else [])
    _atomic_write_from(lambda tmp: _run(link + ["-o", str(tmp)], log), library)
    (library.parent / "build.log").write_text("\n".join(log))
    if verbose:
        print("\n".join(log), file=sys.stderr)
    return library


if __name__ == "__main__":
    for name in runtimes():
        print(build(verbose=True, runtime_name=name))
