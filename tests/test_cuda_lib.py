"""
libnanoccl (kernels/cuda/), our own implementation of NCCL's API behind kernels/nccl.py's binding: the `cuda` variant.

On CPU (CI), with nvcc (these tests skip, saying why, without one): the sources compile for sm_80 and sm_90, once per
session into a temporary directory (~40 s of CPU); the library exports NCCL's API and nothing of the CUDA runtime it
carries, and its nccl.h declares what the binding binds; argument checks, error codes and strings, the version; the
bootstrap's all-gather between threads and between processes, and its errors; the chunking plan; the build cache
(one build for racing processes, atomic rename) with a stand-in nvcc. And the algorithms themselves: every
collective and grouped send/receive pattern on 1 to 4 emulated ranks (threads of this process, host memory, the
kernels' bodies compiled for the CPU: kernels/cuda/emulate.cu), bit-exact against references computed in the
kernels' order of reduction, with tiny FIFOs so that every path runs (one-shot; ring with many rounds and channels,
chunks not multiples of anything); the errors a kernel detects (a rank that never comes, mismatched calls) reaching
every rank as ncclTimeout / ncclInvalidUsage / ncclRemoteError with a message. Also the `cuda` variant failing at
strategy build time, in one line, without a GPU.
On a GPU (TestCudaLibOnGPU, comm.init_distributed's group; on a one-GPU machine 2 ranks share it): every collective
bit-exact against the same references (one-shot and ring, fp32/bf16/fp16, sizes not multiples of the chunk),
send/receive both ways, a grouped all-to-all, and each strategy's cuda variant training the single model
(tests/reference.py's rule).

    pytest tests/test_cuda_lib.py
    torchrun --standalone --nproc_per_node=2 -m unittest tests/test_cuda_lib.py     (the GPU part alone)
"""

import contextlib
import ctypes
import os
import struct
import subprocess
import sys
import textwrap
import threading
import time
import unittest
from ctypes import POINTER, byref, c_double, c_int, c_size_t, c_ulonglong, c_void_p

import pytest
import torch

from kernels import nccl
from kernels.cuda import build
from parallel import available, build_strategy
from tests.distributed import REPO, DistributedTestCase, run_command, torchrun_launcher
from tests.reference import global_batches, train_checked, train_config

CUDA = torch.cuda.is_available()
KIND = {"all_reduce": 1, "all_gather": 2, "reduce_scatter": 3, "broadcast": 4}
ONE_SHOT, RING = 1, 2
DTYPE = nccl.DATA_TYPES
OP = nccl.REDUCE_OPS


class Nanoccl(nccl.NCCLLibrary):
    """The binding's NCCLLibrary over libnanoccl, plus the test functions of kernels/cuda/nanoccl.h."""

    def __init__(self, path=None, lib=None):
        super().__init__(path, lib)
        f = self.lib
        f.nanocclEmuCommInitRank.argtypes = [POINTER(c_void_p), c_int, nccl.ncclUniqueId, c_int]
        f.nanocclTestCommCreate.argtypes = [c_int, c_int, POINTER(c_void_p)]
        f.nanocclBootstrapAllGather.argtypes = [POINTER(nccl.ncclUniqueId), c_int, c_int, c_void_p, c_size_t, c_void_p,
                                                c_double]
        f.nanocclRingPlan.argtypes = [c_int, c_size_t, c_int, c_int, c_int, c_size_t, c_size_t, POINTER(c_int),
                                      POINTER(c_ulonglong), POINTER(c_ulonglong)]
        f.nanocclRingSegment.argtypes = [c_size_t, c_int, c_ulonglong, c_ulonglong, c_int, POINTER(c_ulonglong),
                                         POINTER(c_ulonglong)]
        f.nanocclRingSteps.argtypes = [c_int, c_int, c_int, c_int, POINTER(c_ulonglong), POINTER(c_ulonglong)]
        for name in ("nanocclEmuCommInitRank", "nanocclTestCommCreate", "nanocclBootstrapAllGather",
                     "nanocclRingPlan"):
            getattr(f, name).restype = c_int
        f.nanocclRingSegment.restype = f.nanocclRingSteps.restype = None

    def plan(self, kind, count, nranks, elemsize, cfg):
        """(algorithm, chunk, rounds) of a collective (kernels/cuda/plan.h); cfg: dict(channels, slot_bytes,
        oneshot_bytes) of the communicator."""
        algorithm, chunk, rounds = c_int(), c_ulonglong(), c_ulonglong()
        self.call("nanocclRingPlan", KIND[kind], count, nranks, elemsize, cfg["channels"], cfg["slot_bytes"],
                  cfg["oneshot_bytes"], byref(algorithm), byref(chunk), byref(rounds))
        return algorithm.value, chunk.value, rounds.value

    def segment(self, count, nranks, chunk, round, seg):
        offset, length = c_ulonglong(), c_ulonglong()
        self.lib.nanocclRingSegment(count, nranks, chunk, round, seg, byref(offset), byref(length))
        return offset.value, length.value

    def steps(self, kind, nranks, rank, root=0):
        sends, recvs = c_ulonglong(), c_ulonglong()
        self.lib.nanocclRingSteps(KIND[kind], nranks, rank, root, byref(sends), byref(recvs))
        return sends.value, recvs.value


# ----------------------------------------------------------------------------------------------------------
# the references: the kernels' orders of reduction (kernels/cuda/algorithms.h), computed here in float32

def combine(a, b, op):
    """One reduction of two float32 tensors (the kernels' reduce<OP>; avg is a sum here)."""
    return torch.maximum(a, b) if op == "max" else torch.minimum(a, b) if op == "min" else a * b if op == "prod" \
        else a + b


def finish(acc, op, nranks, dtype):
    """The final value: divided by nranks for avg (in float32), rounded once to dtype."""
    return (acc / nranks if op == "avg" else acc).to(dtype)


def ring_order(xs, owner_of, op):
    """Ring reduction of segment k (elements where owner_of == k): starts at rank k+1, each partial sum travels
    rounded to the dtype, and ends at rank k (the kernels' reduce-scatter phase)."""
    N, dtype = len(xs), xs[0].dtype
    out = torch.empty_like(xs[0])
    for k in range(N):
        m = owner_of == k
        acc = xs[(k + 1) % N][m].float()
        for i in range(2, N):
            acc = combine(acc, xs[(k + i) % N][m].float(), op).to(dtype).float()
        out[m] = finish(combine(acc, xs[k][m].float(), op), op, N, dtype)
    return out


def all_reduce_reference(lib, xs, op, cfg):
    """What the all-reduce of the CPU tensors xs (one per rank) gives on every rank: rank order for the one-shot
    path, the ring's order (segment by segment, as the plan cuts them) for the ring."""
    N, n, dtype = len(xs), xs[0].numel(), xs[0].dtype
    algorithm, chunk, rounds = lib.plan("all_reduce", n, N, xs[0].element_size(), cfg)
    if N == 1:
        return xs[0].clone()
    if algorithm == ONE_SHOT:
        acc = xs[0].float()
        for x in xs[1:]:
            acc = combine(acc, x.float(), op)
        return finish(acc, op, N, dtype)
    owner = torch.empty(n, dtype=torch.int64)
    for round in range(rounds):
        for seg in range(N):
            offset, length = lib.segment(n, N, chunk, round, seg)
            owner[offset:offset + length] = seg
    return ring_order(xs, owner, op)


def reduce_scatter_reference(xs, op, rank):
    """Rank `rank`'s output of a reduce-scatter of xs (N parts each): its part, reduced in the ring's order."""
    N = len(xs)
    n = xs[0].numel() // N
    parts = [x[rank * n:(rank + 1) * n] for x in xs]
    return ring_order(parts, torch.full((n,), rank), op)


def test_references_match_plain_sums_at_two_ranks():
    """With 2 ranks every order is the same order: the ring reference = (x0 + x1) rounded once."""
    g = torch.Generator().manual_seed(0)
    xs = [torch.randn(100, generator=g).bfloat16() for _ in range(2)]
    owner = torch.arange(100) % 2
    assert torch.equal(ring_order(xs, owner, "sum"), (xs[0].float() + xs[1].float()).bfloat16())
    assert torch.equal(ring_order(xs, owner, "avg"), ((xs[0].float() + xs[1].float()) / 2).bfloat16())


# ----------------------------------------------------------------------------------------------------------
# building

@pytest.fixture(scope="session")
def built(tmp_path_factory):
    """libnanoccl compiled for sm_80 and sm_90 into a temporary directory, once per session, or skip: no nvcc.
    ($NANOPARALLEL_NANOCCL_LIB, if set, is tested instead: a library already built from these sources.)"""
    if os.environ.get(build.LIBRARY_ENV):
        return build.library_path()
    nvcc = build.find_nvcc()
    if nvcc is None:
        pytest.skip(f"no nvcc on this machine: {build.nvcc_missing()}")
    return build.build(tmp_path_factory.mktemp("nanoccl"), archs=(80, 90), nvcc=nvcc)


@pytest.fixture(scope="session")
def lib(built):
    return Nanoccl(built)


def fatbin_entries(path):
    """(kind, arch) of every image in the CUDA fat binaries embedded in a shared library: kind 1 is PTX, 2 an ELF
    cubin (the fatbin layout cuobjdump reads: a 16-byte header with magic 0xBA55ED50, then entries whose header
    holds kind at byte 0, header size at 4, image size at 8, architecture at 28)."""
    data, magic, entries = open(path, "rb").read(), struct.pack("<I", 0xBA55ED50), set()
    at = data.find(magic)
    while at >= 0:
        _, header, size = struct.unpack_from("<HHQ", data, at + 4)
        p, end = at + header, at + header + size
        while p < end:
            kind, _, entry_header, image = struct.unpack_from("<HHIQ", data, p)
            entries.add((kind, struct.unpack_from("<I", data, p + 28)[0]))
            p += entry_header + image
        at = data.find(magic, end)
    return entries


def test_sources_compile_for_sm80_and_sm90(built):
    """nvcc built the kernels for sm_80 and sm_90 (cubins) plus compute_90 PTX for newer GPUs."""
    assert {(2, 80), (2, 90), (1, 90)} <= fatbin_entries(built)
    print(open(os.path.join(os.path.dirname(built), "build.txt")).read().splitlines()[-1])


def test_exports_only_the_api(built):
    """The library exports NCCL's functions and its nanoccl* test functions, none of the static CUDA runtime's
    (whose calls must bind to the library's own copy, not to torch's libcudart)."""
    out = subprocess.run(["nm", "-D", "--defined-only", built], capture_output=True, text=True, timeout=60)
    if out.returncode != 0:
        pytest.skip(f"nm failed: {out.stderr.strip()}")
    names = {line.split()[-1] for line in out.stdout.splitlines() if line.strip()}
    assert set(nccl.SIGNATURES) | {"ncclGetErrorString", "ncclGetLastError", "ncclCommAbort"} <= names
    assert all(n.startswith(("nccl", "nanoccl")) for n in names), sorted(names)


def test_header_declares_what_the_binding_binds():
    """kernels/cuda/nccl.h against the binding, with the same checks as the real nccl.h (tests/test_nccl.py): enum
    values, and every bound function's parameters."""
    from tests.test_nccl import test_enums_and_signatures_match_the_real_nccl_h as check
    with open(os.path.join(REPO, "kernels", "cuda", "nccl.h")) as f:
        check(f.read())


def test_version_and_error_strings(lib):
    assert lib.version() == (0, 1, 0)
    texts = {code: lib.error_string(code) for code in nccl.RESULTS}
    assert texts[0] == "no error" and texts[8] == "timeout" and texts[4].startswith("invalid argument")
    assert len(set(texts.values())) == len(texts)
    assert lib.error_string(99) == "unknown result code"


# ----------------------------------------------------------------------------------------------------------
# argument checks: before any launch, on a communicator that owns nothing (nanocclTestCommCreate)

def test_bad_arguments_are_nccl_errors_with_a_message(lib):
    comm = c_void_p()
    lib.call("nanocclTestCommCreate", 2, 0, byref(comm))
    buf, bad = c_void_p(16), nccl.NCCLError
    cases = [
        (("ncclAllReduce", buf, buf, 10, DTYPE[torch.int64], 0, comm, None), 4, "reduces ncclFloat32.*not ncclInt64"),
        (("ncclAllReduce", buf, buf, 10, 7, 9, comm, None), 4, "op 9 is not an ncclRedOp_t"),
        (("ncclAllReduce", buf, buf, 10, 42, 0, comm, None), 4, "datatype 42"),
        (("ncclAllReduce", buf, None, 10, 7, 0, comm, None), 4, "recvbuff is NULL"),
        (("ncclAllReduce", buf, buf, 10, 7, 0, None, None), 4, "comm is NULL"),
        (("ncclReduceScatter", buf, buf, 10, DTYPE[torch.float64], 0, comm, None), 4, "not ncclFloat64"),
        (("ncclBroadcast", buf, buf, 10, 7, 2, comm, None), 4, r"root=2 is not in 0\.\.1"),
        (("ncclSend", buf, 10, 7, 2, comm, None), 4, r"peer=2 is not in 0\.\.1"),
        (("ncclRecv", None, 10, 7, 1, comm, None), 4, "buffer is NULL"),
        (("ncclAllGather", buf, buf, 10, 7, comm, None), 5, "test communicator .* cannot launch"),
        (("ncclGroupEnd",), 5, "no ncclGroupStart"),
        (("ncclGetVersion", None), 4, "version is NULL"),
    ]
    for args, code, message in cases:
        with pytest.raises(bad, match=message) as e:
            lib.call(*args)
        assert e.value.code == code, (args, str(e.value))
    lib.call("ncclAllReduce", buf, buf, 0, 7, 0, comm, None)  # nothing to do: ncclSuccess, as NCCL
    count = c_int()
    lib.lib.ncclCommCount.argtypes = [c_void_p, POINTER(c_int)]
    assert lib.lib.ncclCommCount(comm, byref(count)) == 0 and count.value == 2
    lib.call("ncclCommDestroy", comm)
    with pytest.raises(bad, match="comm is NULL"):
        lib.call("ncclCommDestroy", None)


def test_comm_init_rejects_bad_ids_ranks_and_settings(lib, monkeypatch):
    comm = c_void_p()
    with pytest.raises(nccl.NCCLError, match="not made by libnanoccl") as e:
        lib.call("ncclCommInitRank", byref(comm), 2, nccl.ncclUniqueId(), 0)  # zeros: another library's id
    assert e.value.code == 4
    with pytest.raises(nccl.NCCLError, match=r"rank=2 is not in 0\.\.1"):
        lib.call("ncclCommInitRank", byref(comm), 2, lib.unique_id(), 2)
    monkeypatch.setenv("NANOCCL_SLOT_BYTES", "100")
    with pytest.raises(nccl.NCCLError, match="NANOCCL_SLOT_BYTES=100: must be .* a multiple of 16"):
        lib.call("ncclCommInitRank", byref(comm), 1, lib.unique_id(), 0)
    assert comm.value is None


@pytest.mark.skipif(CUDA, reason="checks what happens without a usable GPU")
def test_comm_init_without_gpu_is_a_cuda_error(lib):
    """ncclCommInitRank on a machine without a GPU: ncclUnhandledCudaError naming the CUDA call and CUDA's message."""
    comm = c_void_p()
    with pytest.raises(nccl.NCCLError, match="ncclUnhandledCudaError.*cudaGetDevice.*CUDA error") as e:
        lib.call("ncclCommInitRank", byref(comm), 1, lib.unique_id(), 0)
    assert "\n" not in str(e.value) and comm.value is None


@pytest.mark.skipif(CUDA, reason="checks the CPU-only error")
def test_cuda_variant_without_gpu_is_a_one_line_error():
    for strategy in ("ddp", "fsdp", "tp", "pp", "cp", "3d"):
        with pytest.raises(ValueError, match="variant 'cuda' .* no GPU") as e:
            build_strategy(train_config(parallel=strategy, variant="cuda"), torch.device("cpu"))
        assert "\n" not in str(e.value)


def test_every_custom_strategy_has_a_cuda_variant():
    """Every (s, "custom") is registered as (s, "cuda") too, the same class; parallel.backend("cuda") is the binding's
    CudaCollectives, a subclass of NCCLCollectives (one binding, two libraries)."""
    import parallel
    pairs = available()
    customs = [s for s, v in pairs if v == "custom"]
    assert {"ddp", "fsdp", "tp", "pp", "cp", "3d"} <= set(customs)
    for s in customs:
        assert parallel._REGISTRY[s, "cuda"] is parallel._REGISTRY[s, "custom"]
    assert parallel.backend("cuda") is nccl.CudaCollectives and issubclass(nccl.CudaCollectives, nccl.NCCLCollectives)


# ----------------------------------------------------------------------------------------------------------
# the bootstrap

def run_threads(n, fn, timeout_s=120):
    """fn(i) on n threads at once; the first exception (with its index) is raised here. ctypes releases the GIL."""
    errors = [None] * n

    def work(i):
        try:
            fn(i)
        except BaseException as e:  # noqa: BLE001 (re-raised below)
            errors[i] = e

    threads = [threading.Thread(target=work, args=(i,), daemon=True) for i in range(n)]
    for t in threads:
        t.start()
    deadline = time.time() + timeout_s
    for t in threads:
        t.join(max(0.0, deadline - time.time()))
    assert not any(t.is_alive() for t in threads), f"threads still running after {timeout_s} s"
    for i, e in enumerate(errors):
        if e is not None:
            raise AssertionError(f"thread {i}: {type(e).__name__}: {e}") from e


def all_gather(lib, uid, nranks, rank, blob, timeout_s=30.0):
    out = ctypes.create_string_buffer(nranks * len(blob))
    lib.call("nanocclBootstrapAllGather", byref(uid), nranks, rank, blob, len(blob), out, timeout_s)
    return out.raw


def test_bootstrap_all_gathers_between_threads(lib):
    """4 ranks (threads) exchange 24-byte blobs through the root that ncclGetUniqueId started: each gets all, in rank
    order."""
    uid = lib.unique_id()
    blobs = [bytes([r]) * 24 for r in range(4)]
    got = [None] * 4
    run_threads(4, lambda r: got.__setitem__(r, all_gather(lib, uid, 4, r, blobs[r])))
    assert got == [b"".join(blobs)] * 4


def test_bootstrap_all_gathers_between_processes(lib, built):
    """3 processes, each loading the library, exchange their pids' bytes through a root started in this process."""
    uid = lib.unique_id()
    script = textwrap.dedent(f"""
        import ctypes, os, sys
        lib = ctypes.CDLL({built!r})
        uid = ctypes.create_string_buffer(bytes.fromhex(sys.argv[1]), 128)
        rank, mine = int(sys.argv[2]), f"rank{{sys.argv[2]}}".encode()
        out = ctypes.create_string_buffer(3 * len(mine))
        lib.nanocclBootstrapAllGather.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_int, ctypes.c_char_p,
                                                  ctypes.c_size_t, ctypes.c_void_p, ctypes.c_double]
        code = lib.nanocclBootstrapAllGather(uid, 3, rank, mine, len(mine), out, 60.0)
        print(code, out.raw.decode())
    """)
    procs = [subprocess.Popen([sys.executable, "-c", script, bytes(bytearray(uid.internal)).hex(), str(r)],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for r in range(3)]
    outs = []
    for p in procs:
        try:
            outs.append(p.communicate(timeout=120)[0].strip())
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            pytest.fail("a bootstrap process did not finish in 120 s")
    assert outs == ["0 rank0rank1rank2"] * 3


def test_bootstrap_errors(lib, monkeypatch):
    """A root whose ranks do not all come gives up after its timeout and says how many came; ranks that disagree on
    nranks are an invalid usage (one of them) and a timeout (the other); a foreign id is an invalid argument."""
    monkeypatch.setenv("NANOCCL_BOOTSTRAP_TIMEOUT_S", "2")
    uid = lib.unique_id()
    with pytest.raises(nccl.NCCLError, match="ncclTimeout.*root stopped waiting.*1 of 2 ranks came"):
        all_gather(lib, uid, 2, 0, b"x")
    uid = lib.unique_id()
    codes = [None, None]

    def rank(i):
        time.sleep(0.1 * i)
        try:
            all_gather(lib, uid, 2 + i, i, b"y")
        except nccl.NCCLError as e:
            codes[i] = (e.code, str(e))
    run_threads(2, rank)
    assert sorted(c for c, _ in codes) == [5, 8], codes  # ncclInvalidUsage, ncclTimeout
    assert any("every rank must pass the same nranks" in text for _, text in codes)
    with pytest.raises(nccl.NCCLError, match="ncclInvalidArgument.*not made by libnanoccl"):
        all_gather(lib, nccl.ncclUniqueId(), 2, 0, b"z")


# ----------------------------------------------------------------------------------------------------------
# the plan

@pytest.mark.parametrize("nranks", [2, 3, 4, 8])
def test_ring_plan_covers_every_element_once(lib, nranks):
    """For all-reduce, the rounds' segments tile [0, count) in order, each at most a chunk, a chunk at most a slot and
    a multiple of 16 bytes; the other collectives' rounds cover their count; one-shot exactly up to its threshold;
    on every ring connection what one rank sends per round is what the next receives (broadcast from every root)."""
    for esize in (1, 2, 4, 8):
        for channels, slot in ((1, 16), (2, 64), (4, 4096)):
            cfg = dict(channels=channels, slot_bytes=slot, oneshot_bytes=64)
            for count in (1, 3, 16, 17, 100, 1001, 65537):
                algorithm, chunk, rounds = lib.plan("all_reduce", count, nranks, esize, cfg)
                assert algorithm == (ONE_SHOT if count * esize <= 64 else RING)
                algorithm, chunk, rounds = lib.plan("all_reduce", count, nranks, esize, dict(cfg, oneshot_bytes=0))
                assert algorithm == RING and 0 < chunk <= slot // esize and (chunk * esize) % 16 == 0
                covered = 0
                for round in range(rounds):
                    for seg in range(nranks):
                        offset, length = lib.segment(count, nranks, chunk, round, seg)
                        assert offset == covered and length <= chunk
                        covered += length
                assert covered == count and rounds == -(-count // (nranks * chunk))
                for kind in ("all_gather", "reduce_scatter", "broadcast"):
                    algorithm, chunk, rounds = lib.plan(kind, count, nranks, esize, cfg)
                    assert algorithm == RING and 0 < chunk <= slot // esize and (rounds - 1) * chunk < count <= \
                        rounds * chunk
    for kind in ("all_reduce", "all_gather", "reduce_scatter"):
        assert {lib.steps(kind, nranks, r) for r in range(nranks)} == {(2 * (nranks - 1),) * 2 if kind == "all_reduce"
                                                                       else (nranks - 1,) * 2}
    for root in range(nranks):
        steps = [lib.steps("broadcast", nranks, r, root) for r in range(nranks)]
        assert all(steps[r][0] == steps[(r + 1) % nranks][1] for r in range(nranks))
        assert steps[root] == (1, 0) and steps[(root - 1) % nranks] == (0, 1)


# ----------------------------------------------------------------------------------------------------------
# the build cache

FAKE_NVCC = """#!/bin/sh
# a stand-in nvcc: counts its runs, takes a while, writes the -o file
echo run >> "$(dirname "$0")/runs"
sleep 1
while [ "$#" -gt 0 ]; do if [ "$1" = "-o" ]; then echo fake > "$2"; fi; shift; done
"""


def test_build_cache_builds_once_for_racing_processes(tmp_path):
    """Three processes asking for the library at once: one nvcc run (a lock), one cache directory complete (the build
    went to a temporary directory renamed into place), the same path for all; asked again, no build."""
    nvcc = tmp_path / "bin" / "nvcc"
    nvcc.parent.mkdir()
    nvcc.write_text(FAKE_NVCC)
    nvcc.chmod(0o755)
    env = {**os.environ, "NANOPARALLEL_NVCC": str(nvcc), "NANOPARALLEL_CACHE": str(tmp_path / "cache")}
    env.pop(build.LIBRARY_ENV, None)
    cmd = [sys.executable, "-c", "from kernels.cuda.build import library_path; print(library_path(archs=(80, 90)))"]
    procs = [subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for _ in range(3)]
    outs = [p.communicate(timeout=120)[0].strip() for p in procs]
    assert len(set(outs)) == 1 and outs[0].endswith("/libnanoccl.so"), outs
    assert (tmp_path / "bin" / "runs").read_text().count("run") == 1
    entries = sorted(p.name for p in (tmp_path / "cache").iterdir())
    assert [e for e in entries if not e.endswith(".lock")] == [os.path.basename(os.path.dirname(outs[0]))]
    assert open(outs[0]).read() == "fake\n"
    code, again = run_command(cmd, 120, env=env)
    assert code == 0 and again.strip() == outs[0]
    assert (tmp_path / "bin" / "runs").read_text().count("run") == 1


def test_build_finds_nvcc_or_says_what_to_install(monkeypatch, tmp_path):
    monkeypatch.delenv(build.LIBRARY_ENV, raising=False)
    monkeypatch.setenv(build.NVCC_ENV, str(tmp_path / "nope"))
    with pytest.raises(build.NvccNotFound, match="NANOPARALLEL_NVCC=.*nope is not an executable"):
        build.find_nvcc()
    monkeypatch.delenv(build.NVCC_ENV)
    monkeypatch.setattr(build, "find_nvcc", lambda: None)
    monkeypatch.setenv(build.CACHE_ENV, str(tmp_path / "empty"))
    with pytest.raises(build.NvccNotFound, match="install the CUDA toolkit") as e:
        build.library_path()
    assert "\n" not in str(e.value)
    monkeypatch.setenv(build.LIBRARY_ENV, str(tmp_path / "missing.so"))
    with pytest.raises(FileNotFoundError, match="missing.so does not exist"):
        build.library_path()


# ----------------------------------------------------------------------------------------------------------
# the algorithms, emulated: N ranks as threads of this process, the kernels' bodies on CPU threads

TINY = dict(NANOCCL_NCHANNELS="2", NANOCCL_SLOTS="2", NANOCCL_SLOT_BYTES="64", NANOCCL_ONESHOT_BYTES="64",
            NANOCCL_TIMEOUT_S="60", NANOCCL_BOOTSTRAP_TIMEOUT_S="60")


def config_of(env):
    return dict(channels=int(env["NANOCCL_NCHANNELS"]), slot_bytes=int(env["NANOCCL_SLOT_BYTES"]),
                oneshot_bytes=int(env["NANOCCL_ONESHOT_BYTES"]))


class EmulatedRanks:
    """N communicators made by nanocclEmuCommInitRank on N threads (with the NANOCCL_* settings of the environment),
    run(fn) calls fn(rank) on N threads at once, close() destroys them (together: ncclCommDestroy is a barrier)."""

    def __init__(self, lib, nranks):
        self.lib, self.N = lib, nranks
        self.comms = [c_void_p() for _ in range(nranks)]
        uid = lib.unique_id()
        self.run(lambda r: lib.call("nanocclEmuCommInitRank", byref(self.comms[r]), nranks, uid, r))

    def run(self, fn):
        run_threads(self.N, fn)

    def call(self, name, *args):
        """lib.call(name, *args) with the pointers of tensors passed as such."""
        self.lib.call(name, *[c_void_p(a.data_ptr()) if isinstance(a, torch.Tensor) else a for a in args])

    def close(self):
        self.run(lambda r: self.lib.call("ncclCommDestroy", self.comms[r]))


@pytest.fixture
def emulated(lib, monkeypatch):
    """A function making EmulatedRanks with TINY settings (64-byte slots: chunks of 16 floats) and overrides."""
    made = []

    def make(nranks, **env):
        for k, v in {**TINY, **env}.items():
            monkeypatch.setenv(k, v)
        ranks = EmulatedRanks(lib, nranks)
        ranks.cfg = config_of({**TINY, **env})
        made.append(ranks)
        return ranks
    yield make
    for ranks in made:
        if not getattr(ranks, "failed", False):
            ranks.close()


def inputs(n, dtype, nranks, seed):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(n, generator=g).to(dtype) for _ in range(nranks)]


@pytest.mark.parametrize("nranks", [1, 2, 3, 4])
def test_emulated_all_reduce_is_bit_exact(emulated, lib, nranks):
    """One-shot (up to 64 bytes) and ring (beyond: 2 channels of 2-slot FIFOs, chunks of at most 64 bytes, so a
    1001-float all-reduce takes 16 rounds), sum/avg/max/min/prod, fp32/bf16/fp16, in place and out of place, one call
    after another on the same communicators: every rank's result equals the reference in the kernels' order."""
    ranks = emulated(nranks)
    seen = set()
    for dtype, ops in ((torch.float32, ("sum", "avg", "max", "min", "prod")), (torch.bfloat16, ("sum", "avg", "max")),
                       (torch.float16, ("sum", "avg"))):
        for n in (1, 7, 16, 17, 33, 100, 1001):
            for op in ops:
                xs = inputs(n, dtype, nranks, seed=n)
                in_place = n % 2 == 1
                ys = [x.clone() for x in xs] if in_place else [torch.full_like(x, float("nan")) for x in xs]
                ranks.run(lambda r: ranks.call("ncclAllReduce", ys[r] if in_place else xs[r], ys[r], n, DTYPE[dtype],
                                               OP[op], ranks.comms[r], None))
                ref = all_reduce_reference(lib, xs, op, ranks.cfg)
                for r in range(nranks):
                    assert torch.equal(ys[r], ref), (dtype, n, op, r, (ys[r].float() - ref.float()).abs().max())
                seen.add(lib.plan("all_reduce", n, nranks, xs[0].element_size(), ranks.cfg)[0])
    assert seen == ({0} if nranks == 1 else {ONE_SHOT, RING})


@pytest.mark.parametrize("nranks", [2, 3, 4])
def test_emulated_all_gather_reduce_scatter_broadcast(emulated, nranks):
    """all-gather and broadcast (from every root, in place at the root or not) move bits exactly, for elements of 1,
    2, 4 and 8 bytes; reduce-scatter (sum, avg, max) equals the ring's order; sizes below a chunk and many chunks."""
    ranks = emulated(nranks, NANOCCL_EMU_THREADS="3")
    N = nranks
    for dtype in (torch.float32, torch.bfloat16, torch.int8, torch.int64):
        for n in (1, 5, 40, 333):
            xs = [torch.arange(n, dtype=torch.int64).mul(7).add(1000 * r).to(dtype) for r in range(N)]
            outs = [torch.zeros(N * n, dtype=dtype) for _ in range(N)]
            ranks.run(lambda r: ranks.call("ncclAllGather", xs[r], outs[r], n, DTYPE[dtype], ranks.comms[r], None))
            assert all(torch.equal(o, torch.cat(xs)) for o in outs), (dtype, n)
            in_place = n % 2 == 0
            for root in range(N):
                ts = [x.clone() if r == root and in_place else torch.zeros_like(x) for r, x in enumerate(xs)]
                ranks.run(lambda r: ranks.call("ncclBroadcast", ts[r] if in_place else xs[r], ts[r], n, DTYPE[dtype],
                                               root, ranks.comms[r], None))
                assert all(torch.equal(t, xs[root]) for t in ts), (dtype, n, root)
            if dtype not in (torch.float32, torch.bfloat16):
                continue
            for op in ("sum", "avg", "max"):
                xs = inputs(N * n, dtype, N, seed=n)
                outs = [torch.zeros(n, dtype=dtype) for _ in range(N)]
                ranks.run(lambda r: ranks.call("ncclReduceScatter", xs[r], outs[r], n, DTYPE[dtype], OP[op],
                                               ranks.comms[r], None))
                for r in range(N):
                    assert torch.equal(outs[r], reduce_scatter_reference(xs, op, r)), (dtype, n, op, r)


def message(src, dst, i):
    """The i-th test message from rank src to rank dst: its own length (some wider than the 128-byte FIFO) and
    values."""
    n = [3, 40, 1, 0, 77][(src * 3 + dst + i) % 5]
    return torch.arange(n, dtype=torch.float32) + 1000 * src + 100 * dst + 10 * i


@pytest.mark.parametrize("nranks", [2, 3, 4])
def test_emulated_point_to_point(emulated, nranks):
    """(1) outside a group: every rank sends to the next, then receives from the previous (messages that fit in the
    FIFO complete before their receive starts, as NCCL's small sends do); (2) a grouped all-to-all, self included,
    two messages to every peer, several wider than the FIFO, one of zero bytes, in a different order of sends and
    receives on every rank: the lanes progress together, every message arrives in order (the messages to itself as
    local copies); (3) bf16 through the same connections afterwards; (4) messages to itself through its FIFO."""
    ranks, N = emulated(nranks), nranks
    got = [None] * N

    def ring(r):
        out = torch.arange(20, dtype=torch.float32) + r
        ranks.call("ncclSend", out, 20, 7, (r + 1) % N, ranks.comms[r], None)
        got[r] = torch.zeros(20)
        ranks.call("ncclRecv", got[r], 20, 7, (r - 1) % N, ranks.comms[r], None)
    ranks.run(ring)
    assert all(torch.equal(got[r], torch.arange(20, dtype=torch.float32) + (r - 1) % N) for r in range(N))

    received = [{} for _ in range(N)]

    def all_to_all(r):
        peers = list(range(N))[r:] + list(range(N))[:r]  # this rank first, then the others in ring order
        sends = [("send", p, i) for i in range(2) for p in peers]
        recvs = [("recv", p, i) for i in range(2) for p in reversed(peers)]
        ops = sends + recvs if r % 2 == 0 else recvs + sends  # every peer's two messages in order, either way
        keep = []
        ranks.lib.call("ncclGroupStart")
        for kind, p, i in ops:
            if kind == "send":
                t = message(r, p, i)
                keep.append(t)
                ranks.call("ncclSend", t, t.numel(), 7, p, ranks.comms[r], None)
            else:
                t = torch.full((message(p, r, i).numel(),), -1.0)
                received[r][p, i] = t
                ranks.call("ncclRecv", t, t.numel(), 7, p, ranks.comms[r], None)
        ranks.lib.call("ncclGroupEnd")
    ranks.run(all_to_all)
    for r in range(N):
        for (p, i), t in received[r].items():
            assert torch.equal(t, message(p, r, i)), (r, p, i)

    bf = [torch.randn(50).bfloat16() for _ in range(N)]
    back = [torch.zeros(50, dtype=torch.bfloat16) for _ in range(N)]

    def exchange(r):
        ranks.lib.call("ncclGroupStart")
        ranks.call("ncclRecv", back[r], 50, DTYPE[torch.bfloat16], (r + 1) % N, ranks.comms[r], None)
        ranks.call("ncclSend", bf[r], 50, DTYPE[torch.bfloat16], (r - 1) % N, ranks.comms[r], None)
        ranks.lib.call("ncclGroupEnd")
    ranks.run(exchange)
    assert all(torch.equal(back[r], bf[(r + 1) % N]) for r in range(N))

    def to_itself(r):
        """A send to itself outside a group (into its FIFO), then a group with another send to itself and two
        receives: the first receive gets the older message (no pairing while the FIFO holds one). Then a group whose
        send to itself and receive differ in size: ncclInvalidUsage at ncclGroupEnd, nothing launched."""
        first, second = torch.arange(5.0) + r, torch.arange(7.0) + 10 * r
        ranks.call("ncclSend", first, 5, 7, r, ranks.comms[r], None)
        a, b = torch.zeros(5), torch.zeros(7)
        ranks.lib.call("ncclGroupStart")
        ranks.call("ncclSend", second, 7, 7, r, ranks.comms[r], None)
        ranks.call("ncclRecv", a, 5, 7, r, ranks.comms[r], None)
        ranks.call("ncclRecv", b, 7, 7, r, ranks.comms[r], None)
        ranks.lib.call("ncclGroupEnd")
        assert torch.equal(a, first) and torch.equal(b, second)
        ranks.lib.call("ncclGroupStart")
        ranks.call("ncclSend", first, 4, 7, r, ranks.comms[r], None)
        ranks.call("ncclRecv", a, 3, 7, r, ranks.comms[r], None)
        with pytest.raises(nccl.NCCLError, match="send of 16 bytes to itself meets its receive of 12 bytes"):
            ranks.lib.call("ncclGroupEnd")
    ranks.run(to_itself)


def expect_errors(ranks, fns):
    """Run fns[r](r) on every rank; return {rank: NCCLError or None}."""
    errors = {}

    def run(r):
        try:
            fns[r](r)
            errors[r] = None
        except nccl.NCCLError as e:
            errors[r] = e
    ranks.run(run)
    return errors


def test_emulated_mismatched_calls_fail_on_every_rank(emulated):
    """A receive of 20 floats where 10 were sent: the receiver fails with ncclInvalidUsage naming both sizes, and the
    sender's next call fails with ncclRemoteError naming the rank that failed; afterwards every call fails at once."""
    ranks = emulated(2)
    a, b = torch.ones(10), torch.zeros(20)
    errors = expect_errors(ranks, [lambda r: ranks.call("ncclSend", a, 10, 7, 1, ranks.comms[0], None),
                                   lambda r: ranks.call("ncclRecv", b, 20, 7, 0, ranks.comms[1], None)])
    assert errors[0] is None
    assert errors[1].code == 5 and "received a message of 40 bytes (ncclSend/ncclRecv) from rank 0" in str(errors[1])
    assert "rank 1 in a message of 80 bytes" in str(errors[1])
    with pytest.raises(nccl.NCCLError, match="ncclRemoteError.*rank 0 stopped .* because rank 1 failed"):
        ranks.call("ncclAllReduce", a, a, 10, 7, 0, ranks.comms[0], None)
    result = c_int()
    ranks.lib.call("ncclCommGetAsyncError", ranks.comms[1], byref(result))
    assert result.value == 5
    ranks.failed = True  # their kernels are over; destroy each without the closing barrier
    for comm in ranks.comms:
        ranks.lib.call("ncclCommDestroy", comm)


def test_emulated_missing_rank_is_a_timeout_on_every_rank(emulated):
    """Rank 1 never joins rank 0's all-reduce: rank 0 fails after NANOCCL_TIMEOUT_S with ncclTimeout naming rank 1 and
    the call; rank 1's next call fails at once with ncclRemoteError naming rank 0 (its abort word was set)."""
    ranks = emulated(2, NANOCCL_TIMEOUT_S="1", NANOCCL_BOOTSTRAP_TIMEOUT_S="60")
    x = torch.ones(1000)
    start = time.time()
    with pytest.raises(nccl.NCCLError, match=r"ncclTimeout \(8\).*rank 0 in ncclAllReduce\(count=1000, ncclFloat32, "
                                             r"ncclSum\) timed out after 1 s .* waiting for data from rank 1"):
        ranks.call("ncclAllReduce", x, x, 1000, 7, 0, ranks.comms[0], None)
    assert 1 <= time.time() - start < 30
    with pytest.raises(nccl.NCCLError, match="ncclRemoteError.*rank 1 stopped .* because rank 0 failed"):
        ranks.call("ncclBroadcast", x, x, 1000, 7, 0, ranks.comms[1], None)
    ranks.failed = True
    for comm in ranks.comms:
        ranks.lib.call("ncclCommDestroy", comm)


def test_emulated_abort_stops_the_other_ranks(emulated):
    """ncclCommAbort on rank 0 releases its communicator at once; rank 1's next call (a ring all-reduce, whose first
    step waits for nothing) stops before touching rank 0's memory, with ncclRemoteError naming rank 0."""
    ranks = emulated(2)
    x = torch.ones(1000)
    ranks.lib.call("ncclCommAbort", ranks.comms[0])
    with pytest.raises(nccl.NCCLError, match=r"ncclRemoteError.*rank 1 stopped ncclAllReduce\(count=1000, ncclFloat32, "
                                             r"ncclSum\) because rank 0 failed or called ncclCommAbort"):
        ranks.call("ncclAllReduce", x, x, 1000, 7, 0, ranks.comms[1], None)
    ranks.failed = True
    ranks.lib.call("ncclCommDestroy", ranks.comms[1])


# ----------------------------------------------------------------------------------------------------------
# on a GPU, under torchrun with 2 ranks sharing GPU 0

SMALL = dict(NANOCCL_NCHANNELS="2", NANOCCL_SLOTS="2", NANOCCL_SLOT_BYTES="4096", NANOCCL_ONESHOT_BYTES="1024")
DEFAULT = dict(NANOCCL_NCHANNELS="4", NANOCCL_SLOTS="8", NANOCCL_SLOT_BYTES=str(256 << 10),
               NANOCCL_ONESHOT_BYTES=str(256 << 10))


@contextlib.contextmanager
def environment(**values):
    saved = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@unittest.skipUnless(CUDA, "needs a GPU (the device tool lends one); on CPU the library runs emulated (above)")
class TestCudaLibOnGPU(DistributedTestCase):

    @classmethod
    def setUpClass(cls):
        os.environ.setdefault("NANOCCL_TIMEOUT_S", "60")  # a hang becomes an error well within gpu_check's budget
        super().setUpClass()  # comm.init_distributed: on a one-GPU machine the ranks share it (comm.share_gpus)
        cls.device = torch.device("cuda", torch.cuda.current_device())
        with environment(**DEFAULT):   # 4 channels, 8 slots of 256 KiB, one-shot up to 256 KiB (the defaults)
            cls.comm = nccl.CudaCollectives(device=cls.device)
        with environment(**SMALL):     # 2 channels, 2 slots of 4 KiB, one-shot up to 1 KiB: many chunks
            cls.small = nccl.CudaCollectives(device=cls.device)
        cls.configs = {id(cls.comm): config_of(DEFAULT), id(cls.small): config_of(SMALL)}
        cls.lib = Nanoccl(lib=cls.comm.nccl.lib)

    def inputs(self, n, dtype, seed=0):
        """Every rank's input (the same generator on every rank), on the CPU: a list of N tensors (n,)."""
        return inputs(n, dtype, self.world_size, seed)

    def done(self, comm):
        torch.cuda.synchronize()
        comm.check()

    def test_all_reduce(self):
        """sum/avg/max, fp32/bf16/fp16, sizes through both paths of both communicators (one-shot up to 1 KiB and 256
        KiB; ring chunks of at most 4 KiB and 256 KiB, sizes not multiples of them), in place through the binding and
        once out of place through the C API: bit-exact to the reference in the kernels' order."""
        r = self.rank
        for comm, sizes in ((self.small, (1, 37, 256, 257, 1000, 4099, 65537)), (self.comm, (1000, 65539, 1048581))):
            cfg = self.configs[id(comm)]
            seen = set()
            for dtype in (torch.float32, torch.bfloat16, torch.float16):
                for n in sizes:
                    for op in ("sum", "avg", "max"):
                        with self.subTest(cfg=cfg["slot_bytes"], dtype=dtype, n=n, op=op):
                            xs = self.inputs(n, dtype, seed=n)
                            t = xs[r].to(self.device)
                            comm.all_reduce(t, op)
                            self.done(comm)
                            ref = all_reduce_reference(self.lib, xs, op, cfg)
                            self.assertTrue(torch.equal(t.cpu(), ref), (t.cpu().float() - ref.float()).abs().max())
                            seen.add(self.lib.plan("all_reduce", n, self.world_size, t.element_size(), cfg)[0])
            self.assertEqual(seen, {ONE_SHOT, RING})
        xs = self.inputs(5000, torch.float32, seed=1)
        src, dst = xs[r].to(self.device), torch.full((5000,), float("nan"), device=self.device)
        stream = c_void_p(torch.cuda.current_stream().cuda_stream)
        self.small.nccl.call("ncclAllReduce", c_void_p(src.data_ptr()), c_void_p(dst.data_ptr()), 5000, 7, 0,
                             self.small.comm, stream)
        self.done(self.small)
        self.assertTrue(torch.equal(dst.cpu(), all_reduce_reference(self.lib, xs, "sum", self.configs[id(self.small)])))
        self.assertTrue(torch.equal(src.cpu(), xs[r]))

    def test_all_gather_reduce_scatter_broadcast(self):
        """all_gather and broadcast (from every rank) move bits exactly (fp32, bf16, int64); reduce_scatter (sum,
        avg) equals the ring's order; one chunk and many."""
        N, r = self.world_size, self.rank
        for comm in (self.small, self.comm):
            for dtype in (torch.float32, torch.bfloat16, torch.int64):
                for n in (5, 1000, 70001):
                    with self.subTest(comm=id(comm), dtype=dtype, n=n, op="all_gather"):
                        xs = [(torch.arange(n) * 3 + 100000 * i).to(dtype) for i in range(N)]
                        out = torch.empty(N * n, dtype=dtype, device=self.device)
                        comm.all_gather(out, xs[r].to(self.device))
                        self.done(comm)
                        self.assertTrue(torch.equal(out.cpu(), torch.cat(xs)))
                    for src in range(N):
                        with self.subTest(comm=id(comm), dtype=dtype, n=n, op="broadcast", src=src):
                            xs = [(torch.arange(n) + 7 * i).to(dtype) for i in range(N)]
                            t = xs[r].to(self.device)
                            comm.broadcast(t, src)
                            self.done(comm)
                            self.assertTrue(torch.equal(t.cpu(), xs[src]))
                    if dtype == torch.int64:
                        continue
                    for op in ("sum", "avg"):
                        with self.subTest(comm=id(comm), dtype=dtype, n=n, op=f"reduce_scatter {op}"):
                            xs = self.inputs(N * n, dtype, seed=n + 1)
                            out = torch.empty(n, dtype=dtype, device=self.device)
                            comm.reduce_scatter(out, xs[r].to(self.device), op)
                            self.done(comm)
                            self.assertTrue(torch.equal(out.cpu(), reduce_scatter_reference(xs, op, r)))

    def test_point_to_point(self):
        """Both directions at once (each rank an async send, then a blocking receive: the binding issues them in one
        group), messages smaller than a slot and many times the FIFO (2 x 4 KiB), fp32 and bf16."""
        r, peer = self.rank, self.rank ^ 1
        for comm in (self.small, self.comm):
            for dtype in (torch.float32, torch.bfloat16):
                for n in (10, 5000, 300001):
                    with self.subTest(comm=id(comm), dtype=dtype, n=n):
                        mine = (torch.arange(n) % 1000 + 1000 * r).to(dtype).to(self.device)
                        theirs = torch.empty(n, dtype=dtype, device=self.device)
                        handle = comm.send(mine, peer, async_op=True)
                        comm.recv(theirs, peer)
                        handle.wait()
                        self.done(comm)
                        self.assertTrue(torch.equal(theirs.cpu(), (torch.arange(n) % 1000 + 1000 * peer).to(dtype)))

    def test_grouped_all_to_all(self):
        """ncclGroupStart; a send to and a receive from every rank (this one included), twice, of sizes that differ
        per pair and exceed the small communicator's FIFO; ncclGroupEnd: every message arrives, in order."""
        N, r = self.world_size, self.rank
        lib, comm = self.small.nccl, self.small
        stream = c_void_p(torch.cuda.current_stream().cuda_stream)

        def payload(src, dst, i):
            return torch.arange(1000 * (1 + src + 2 * dst) + 17 * i, dtype=torch.float32) + 1e6 * src + 1e4 * dst + i

        sends = {(p, i): payload(r, p, i).to(self.device) for p in range(N) for i in range(2)}
        recvs = {(p, i): torch.full((payload(p, r, i).numel(),), -1.0, device=self.device)
                 for p in range(N) for i in range(2)}
        lib.call("ncclGroupStart")
        for i in range(2):
            for p in range(N):
                lib.call("ncclSend", c_void_p(sends[p, i].data_ptr()), sends[p, i].numel(), 7, p, comm.comm, stream)
                lib.call("ncclRecv", c_void_p(recvs[p, i].data_ptr()), recvs[p, i].numel(), 7, p, comm.comm, stream)
        lib.call("ncclGroupEnd")
        self.done(comm)
        for (p, i), t in recvs.items():
            self.assertTrue(torch.equal(t.cpu(), payload(p, r, i)), (p, i))

    def test_strategies_cuda_equal_single(self):
        """For every strategy of tests/test_triton_comm.py's STRATEGIES: 3 steps of the cuda variant (2 ranks), each
        equal to the single model's from the same state (tests/reference.py's rule); no communicator reports an
        error."""
        from tests.test_triton_comm import STRATEGIES, strategy_case
        N = self.world_size
        for name in STRATEGIES:
            with self.subTest(strategy=name):
                cfg, model_config = strategy_case(name, N)
                batches = global_batches(3, cfg["gradient_accumulation_steps"], 2, model_config)
                mine = build_strategy(train_config(variant="cuda", **cfg), self.device)
                run = train_checked(mine, model_config, batches)
                self.assertLess(run.losses[-1], run.losses[0])
                for comm in mine._comms.values():
                    comm.check()


if CUDA:
    test_torchrun = torchrun_launcher(__file__, nprocs=(2,))
