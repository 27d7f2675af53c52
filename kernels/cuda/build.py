"""
Build libnanoccl (the CUDA C++ sources next to this file) with nvcc, once per version of the sources, into a cache.

    python -m kernels.cuda.build                          # build it if needed; print its path
    python -m kernels.cuda.build --arch 80,90 --out DIR   # build into DIR/libnanoccl.so (no cache)

`library_path()` is what the `cuda` variant calls (kernels/nccl.py's CudaCollectives): $NANOPARALLEL_NANOCCL_LIB if
set (a prebuilt libnanoccl.so), else <cache>/nanoccl-<key>/libnanoccl.so, compiled at first use. <cache> is
$NANOPARALLEL_CACHE or ~/.cache/nanoparallel; <key> hashes the sources, the nvcc flags and the GPU architectures
(sm_80 and sm_90, plus this machine's GPU's if it has another), not nvcc's version: a library built here on a CPU
machine is found on a GPU machine that gets the same cache directory. Ranks start together and may all ask for it at
once: one builds under a lock file while the others wait, and the build goes to a temporary directory renamed into
place when complete, so nobody ever loads a half-written library.

nvcc is $NANOPARALLEL_NVCC, else `nvcc` on PATH, else /usr/local/cuda/bin/nvcc, else the nvcc of an nvidia-cuda-nvcc
wheel on sys.path. The CUDA runtime is linked statically (--cudart static) and the library exports only NCCL's API and
its nanoccl* test functions (exports.map), so it loads anywhere and its CUDA calls bind to its own runtime, not to
torch's libcudart; it depends only on libc, libstdc++ and, once a GPU is used, the driver's libcuda.
"""

import argparse
import fcntl
import glob
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
LIBRARY_ENV = "NANOPARALLEL_NANOCCL_LIB"
CACHE_ENV = "NANOPARALLEL_CACHE"
NVCC_ENV = "NANOPARALLEL_NVCC"
ARCHS = (80, 90)             # A100, H100/H200
LIBRARY = "libnanoccl.so"
FLAGS = ["-O3", "-std=c++17", "-shared", "-Xcompiler", "-fPIC,-fvisibility=hidden", "--cudart", "static",
         "-Xlinker", "-Bsymbolic", "-lpthread", "--threads", "0"]   # --threads 0: the architectures in parallel


class NvccNotFound(RuntimeError):
    """No nvcc to build libnanoccl with (one line, saying what to install)."""


def sources():
    """The library's source files: every .cu, .cc and .h here, and the linker's export list (sorted paths)."""
    return sorted(p for p in HERE.iterdir() if p.suffix in (".cu", ".cc", ".h", ".map"))


def compiled_sources():
    return [p for p in sources() if p.suffix in (".cu", ".cc")]


def find_nvcc():
    """The nvcc to use: $NANOPARALLEL_NVCC, `nvcc` on PATH, /usr/local/cuda/bin/nvcc, an nvidia-cuda-nvcc wheel's
    (nvidia/cuda_nvcc/bin for CUDA 12, nvidia/cu*/bin for 13); None if there is none. A $NANOPARALLEL_NVCC that is
    not an executable raises NvccNotFound (a wrong path there is an error, not a fallback)."""
    if os.environ.get(NVCC_ENV):
        path = os.environ[NVCC_ENV]
        if not (os.path.isfile(path) and os.access(path, os.X_OK)):
            raise NvccNotFound(f"{NVCC_ENV}={path} is not an executable nvcc")
        return path
    candidates = [shutil.which("nvcc"), "/usr/local/cuda/bin/nvcc"]
    for root in sys.path:
        for pattern in ("nvidia/cuda_nvcc/bin/nvcc", "nvidia/cu*/bin/nvcc"):
            candidates += sorted(glob.glob(os.path.join(root or ".", pattern)))
    return next((c for c in candidates if c and os.path.isfile(c) and os.access(c, os.X_OK)), None)


def nvcc_missing():
    return NvccNotFound(
        f"variant 'cuda' compiles libnanoccl with nvcc, and none was found (${NVCC_ENV}, nvcc on PATH, "
        f"/usr/local/cuda/bin/nvcc, an nvidia-cuda-nvcc wheel): install the CUDA toolkit (or `pip install "
        f"nvidia-cuda-nvcc`), or set {LIBRARY_ENV} to a libnanoccl.so built elsewhere (python -m kernels.cuda.build)")


def default_archs():
    """sm_80 and sm_90, plus this machine's GPU's architecture (torch.cuda.get_device_capability) if it has another."""
    archs = set(ARCHS)
    try:
        import torch
        if torch.cuda.is_available():
            major, minor = torch.cuda.get_device_capability()
            archs.add(10 * major + minor)
    except Exception:  # no torch, or a broken CUDA: the default architectures are enough to build
        pass
    return tuple(sorted(archs))


def gencode_flags(archs):
    """-gencode for each architecture's machine code, and PTX of the newest for GPUs newer than all of them."""
    flags = []
    for a in archs:
        flags += ["-gencode", f"arch=compute_{a},code=sm_{a}"]
    return flags + ["-gencode", f"arch=compute_{max(archs)},code=compute_{max(archs)}"]


def wheel_flags(nvcc):
    """For an nvcc from a wheel (<site>/nvidia/<pkg>/bin/nvcc): the include and lib directories of the nvidia wheels
    next to it (cuda_runtime.h and libcudart_static.a come in another wheel)."""
    parts = Path(nvcc).resolve().parts
    if "nvidia" not in parts:
        return []
    nvidia = Path(*parts[:len(parts) - 1 - parts[::-1].index("nvidia")])
    flags = []
    for d in sorted(nvidia.glob("*/include")):
        flags.append(f"-I{d}")
    for d in sorted(nvidia.glob("*/lib")):
        flags.append(f"-L{d}")
    return flags


def command(nvcc, out, archs):
    """The nvcc command line that builds `out` for `archs` (list)."""
    return ([nvcc, *FLAGS, "-Xlinker", f"--version-script={HERE / 'exports.map'}", *gencode_flags(archs),
             *wheel_flags(nvcc), *map(str, compiled_sources()), "-o", str(out)])


def source_key(archs):
    """16 hex digits: a hash of the sources' contents, the flags and the architectures."""
    h = hashlib.sha256()
    for p in sources():
        h.update(p.name.encode() + b"\0" + p.read_bytes() + b"\0")
    h.update(repr((FLAGS, gencode_flags(archs))).encode())
    return h.hexdigest()[:16]


def cache_dir():
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "nanoparallel")


def build(out_dir, archs=None, nvcc=None, timeout_s=900):
    """Compile libnanoccl into out_dir/libnanoccl.so (and the command into out_dir/build.txt); return its path.
    Raises NvccNotFound, or RuntimeError with nvcc's output if it fails or runs longer than timeout_s."""
    archs = tuple(archs or default_archs())
    nvcc = nvcc or find_nvcc()
    if nvcc is None:
        raise nvcc_missing()
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    out = Path(out_dir) / LIBRARY
    cmd = command(nvcc, out, archs)
    start = time.time()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s)
    except subprocess.TimeoutExpired:
        raise RuntimeError(f"building libnanoccl took more than {timeout_s} s: {' '.join(cmd)}") from None
    if proc.returncode != 0 or not out.exists():
        raise RuntimeError(f"building libnanoccl failed (exit code {proc.returncode}): {' '.join(cmd)}\n"
                           f"{(proc.stdout + proc.stderr)[-6000:]}")
    (Path(out_dir) / "build.txt").write_text(f"{' '.join(cmd)}\n{time.time() - start:.1f} s\n")
    return str(out)


def _locked(path, timeout_s):
    """An exclusive lock on `path` (flock), waited for at most timeout_s; returns the open file (close to release)."""
    f = open(path, "w")
    deadline = time.time() + timeout_s
    while True:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return f
        except BlockingIOError:
            if time.time() > deadline:
                f.close()
                raise RuntimeError(f"waited {timeout_s} s for another process building libnanoccl ({path})") from None
            time.sleep(0.2)


def library_path(build_if_missing=True, archs=None, timeout_s=900):
    """The path of libnanoccl.so: $NANOPARALLEL_NANOCCL_LIB, else the cached build for these sources and `archs`
    (default_archs()), compiled now if it is missing (None instead if build_if_missing is False). Raises
    FileNotFoundError for a $NANOPARALLEL_NANOCCL_LIB that does not exist, NvccNotFound, RuntimeError (build)."""
    if os.environ.get(LIBRARY_ENV):
        path = os.environ[LIBRARY_ENV]
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{LIBRARY_ENV}={path} does not exist")
        return path
    archs = tuple(archs or default_archs())
    key = source_key(archs)
    root = cache_dir()
    final = root / f"nanoccl-{key}" / LIBRARY
    if final.exists() or not build_if_missing:
        return str(final) if final.exists() else None
    nvcc = find_nvcc()
    if nvcc is None:
        raise nvcc_missing()
    root.mkdir(parents=True, exist_ok=True)
    lock = _locked(root / f"nanoccl-{key}.lock", timeout_s)
    try:
        if not final.exists():  # nobody built it while we waited for the lock
            tmp = Path(tempfile.mkdtemp(prefix=f"nanoccl-{key}.", suffix=".tmp", dir=root))
            try:
                build(tmp, archs, nvcc, timeout_s)
                os.rename(tmp, final.parent)  # atomic: the directory appears complete
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
    finally:
        lock.close()
    return str(final)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--arch", default=None, help="comma-separated compute capabilities, e.g. 80,90 (default: "
                                                "80, 90 and this machine's GPU's)")
    p.add_argument("--out", default=None, help="build into this directory instead of the cache")
    args = p.parse_args(argv)
    archs = tuple(int(a) for a in args.arch.split(",")) if args.arch else None
    try:
        path = build(args.out, archs) if args.out else library_path(archs=archs)
    except (NvccNotFound, RuntimeError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
