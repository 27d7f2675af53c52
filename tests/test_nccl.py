"""
kernels/nccl.py, the ctypes binding of libnccl behind the `nccl` variant.

On CPU (CI): the binding's pure-Python parts (enums, the 128-byte ncclUniqueId passed by value, version decoding,
error strings turned into NCCLError, library search and its errors) against a stub libnccl compiled from C here
(argument passing); against the real libnccl, which requirements.txt installs on Linux x86_64 (nvidia-nccl-cu12,
or found where torch's CUDA build put it) and which loads without a GPU: the enums and signatures against the
wheel's nccl.h, the version, every error string, unique ids, and ncclCommInitRank without a usable GPU raising
NCCLError with NCCL's own message instead of crashing; and the nccl variant failing at once, in one line, without a
GPU. Without the library those tests skip and say so.
On a GPU (comm.init_distributed's group; on a one-GPU machine 2 ranks share it, each its own NCCL_HOSTID): every
collective (all-to-all with equal and uneven chunks too) against exact references, and each strategy's nccl variant
training the single model (tests/reference.py's rule).

    pytest tests/test_nccl.py
    torchrun --standalone --nproc_per_node=2 -m unittest tests/test_nccl.py     (the GPU part alone)
"""

import ctypes
import os
import re
import shutil
import subprocess
import unittest

import pytest
import torch

from kernels import nccl
from parallel import build_strategy
from tests.distributed import DistributedTestCase, torchrun_launcher
from tests.reference import global_batches, train_checked, train_config

CUDA = torch.cuda.is_available()

# A stub with libnccl's C signatures: ncclGetVersion says 2.21.5, ncclGetUniqueId writes bytes 0..127,
# ncclCommInitRank checks that the id arrived by value (byte i == i) and that 0 <= rank < nranks, and the
# point-to-point and group calls are recorded (stubCalls hands them over and clears them).
STUB = r"""
#include <stddef.h>
typedef struct { char internal[128]; } ncclUniqueId;
typedef void *ncclComm_t;
int ncclGetVersion(int *v) { *v = 22105; return 0; }
int ncclGetUniqueId(ncclUniqueId *id) { for (int i = 0; i < 128; i++) id->internal[i] = (char)i; return 0; }
int ncclCommInitRank(ncclComm_t *comm, int nranks, ncclUniqueId id, int rank) {
  for (int i = 0; i < 128; i++) if (id.internal[i] != (char)i) return 5;
  if (nranks < 1 || rank < 0 || rank >= nranks) return 4;
  *comm = (void *)0x1; return 0; }
const char *ncclGetErrorString(int code) {
  return code == 4 ? "invalid argument (stub)" : code == 5 ? "invalid usage (stub)" : "stub error"; }
int ncclCommDestroy(ncclComm_t c) { return 0; }
int ncclAllReduce(const void *s, void *r, size_t n, int t, int op, ncclComm_t c, void *st) { return 0; }
int ncclAllGather(const void *s, void *r, size_t n, int t, ncclComm_t c, void *st) { return 0; }
int ncclReduceScatter(const void *s, void *r, size_t n, int t, int op, ncclComm_t c, void *st) { return 0; }
int ncclBroadcast(const void *s, void *r, size_t n, int t, int root, ncclComm_t c, void *st) { return 0; }
static long long calls[64][5]; static int ncalls = 0;  /* p2p and group calls: kind, buffer, count, type, peer */
static int record(long long kind, const void *b, size_t n, int t, int peer) {
  if (ncalls < 64) {
    long long *c = calls[ncalls++]; c[0] = kind; c[1] = (long long)b; c[2] = n; c[3] = t; c[4] = peer; }
  return 0; }
int ncclSend(const void *b, size_t n, int t, int peer, ncclComm_t c, void *st) { return record(1, b, n, t, peer); }
int ncclRecv(void *b, size_t n, int t, int peer, ncclComm_t c, void *st) { return record(2, b, n, t, peer); }
int ncclGroupStart(void) { return record(3, 0, 0, 0, 0); }
int ncclGroupEnd(void) { return record(4, 0, 0, 0, 0); }
int stubCalls(long long *out) {
  for (int i = 0; i < ncalls; i++) for (int k = 0; k < 5; k++) out[5 * i + k] = calls[i][k];
  int n = ncalls; ncalls = 0; return n; }
int ncclCommGetAsyncError(ncclComm_t c, int *e) { *e = 0; return 0; }
"""


@pytest.fixture(scope="module")
def stub_library(tmp_path_factory):
    cc = shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        pytest.skip("no C compiler to build the stub libnccl")
    d = tmp_path_factory.mktemp("stub")
    (d / "stub.c").write_text(STUB)
    subprocess.run([cc, "-shared", "-fPIC", "-o", str(d / "libnccl.so.2"), str(d / "stub.c")], check=True)
    return str(d / "libnccl.so.2")


def test_enums_and_unique_id_layout_match_nccl_h():
    assert ctypes.sizeof(nccl.ncclUniqueId) == nccl.NCCL_UNIQUE_ID_BYTES == 128
    assert nccl.SIGNATURES["ncclCommInitRank"][2] is nccl.ncclUniqueId  # by value, as in nccl.h
    assert [nccl.nccl_dtype(t) for t in (torch.int8, torch.uint8, torch.int32, torch.int64, torch.float16,
                                          torch.float32, torch.float64, torch.bfloat16)] == [0, 1, 2, 4, 6, 7, 8, 9]
    assert nccl.REDUCE_OPS == {"sum": 0, "prod": 1, "max": 2, "min": 3, "avg": 4}
    with pytest.raises(ValueError, match="complex64"):
        nccl.nccl_dtype(torch.complex64)
    assert nccl.decode_version(22105) == (2, 21, 5) and nccl.decode_version(2708) == (2, 7, 8)


def test_error_carries_call_code_and_message():
    e = nccl.NCCLError("ncclAllReduce", 2, "unhandled system error")
    assert (e.call, e.code, e.name) == ("ncclAllReduce", 2, "ncclSystemError")
    assert str(e) == "ncclAllReduce failed: ncclSystemError (2): unhandled system error"


def test_library_search_order_and_errors(monkeypatch, tmp_path):
    monkeypatch.setenv(nccl.LIBRARY_ENV, str(tmp_path / "nope.so"))
    assert nccl.library_candidates()[0] == str(tmp_path / "nope.so")
    with pytest.raises(OSError, match=f"nope.so.*{nccl.LIBRARY_ENV}"):  # a wrong path there is not skipped over
        nccl.load_library()
    monkeypatch.delenv(nccl.LIBRARY_ENV)
    assert nccl.library_candidates()[-1] == "libnccl.so.2"


def test_library_search_finds_the_wheels_layouts(monkeypatch, tmp_path):
    """On sys.path, the nvidia-nccl wheels' nvidia/nccl/lib (cu12, and cu13 as torch 2.11 pins it) and CUDA 13's
    nvidia/cu13/lib come before the loader's own search; $NANOPARALLEL_NCCL_LIB before everything."""
    monkeypatch.delenv(nccl.LIBRARY_ENV, raising=False)
    paths = [tmp_path / "a" / "nvidia" / "nccl" / "lib" / "libnccl.so.2", tmp_path / "b" / "nvidia" / "cu13" / "lib" /
             "libnccl.so.2"]
    for p in paths:
        p.parent.mkdir(parents=True)
        p.write_bytes(b"")
    monkeypatch.setattr("sys.path", [str(tmp_path / "a"), str(tmp_path / "b")])
    assert nccl.wheel_libraries() == [str(p) for p in paths]
    assert nccl.library_candidates()[:2] == [str(p) for p in paths]
    monkeypatch.setenv(nccl.LIBRARY_ENV, "/elsewhere/libnccl.so.2")
    assert nccl.library_candidates()[:3] == ["/elsewhere/libnccl.so.2"] + [str(p) for p in paths]


def test_binding_against_a_stub_library(stub_library, monkeypatch):
    monkeypatch.setenv(nccl.LIBRARY_ENV, stub_library)
    lib = nccl.NCCLLibrary()
    assert lib.version() == (2, 21, 5)
    uid = lib.unique_id()
    assert bytes(bytearray(uid.internal)) == bytes(range(128))
    comm = ctypes.c_void_p()
    lib.call("ncclCommInitRank", ctypes.byref(comm), 2, uid, 1)  # the id went through by value
    assert comm.value == 1
    with pytest.raises(nccl.NCCLError, match=r"ncclCommInitRank failed: ncclInvalidArgument \(4\): invalid argument"):
        lib.call("ncclCommInitRank", ctypes.byref(comm), 2, uid, 2)


def test_all_to_all_through_a_stub_library(stub_library):
    """NCCLCollectives' all-to-all, on rank 1 of 3 with uneven chunks (rows [2, 0, 4] sent, [1, 3, 1] received, rows
    of 2 fp32): one group, and for every peer an ncclSend of its chunk and an ncclRecv into its place, each with the
    chunk's address, element count, ncclFloat32 and the peer, as the stub received them (zero-size chunks skipped).
    Before the first one, a group of one 1-element send and receive with each peer connects both directions (a
    silent direction would otherwise be set up later than its peer's); a second all-to-all has no such group.
    The backend is built without a communicator or a GPU (the stub never touches the buffers)."""
    lib = nccl.NCCLLibrary(stub_library)
    backend = nccl.NCCLCollectives.__new__(nccl.NCCLCollectives)
    backend.nccl, backend.comm, backend.world_size, backend.rank, backend._queued = lib, ctypes.c_void_p(1), 3, 1, []
    backend._stream, backend._connected, backend.device = lambda: ctypes.c_void_p(0), set(), torch.device("cpu")
    lib.lib.stubCalls.argtypes, lib.lib.stubCalls.restype = [ctypes.POINTER(ctypes.c_longlong)], ctypes.c_int
    log = (ctypes.c_longlong * (5 * 64))()
    lib.lib.stubCalls(log)  # clear
    x, out = torch.zeros(6, 2), torch.zeros(5, 2)
    send, recv, f32, row = 1, 2, nccl.DATA_TYPES[torch.float32], 2 * 4
    exchange = [(3, 0, 0, 0, 0),
                (send, x.data_ptr(), 4, f32, 0), (recv, out.data_ptr(), 2, f32, 0),
                (recv, out.data_ptr() + 1 * row, 6, f32, 1),
                (send, x.data_ptr() + 2 * row, 8, f32, 2), (recv, out.data_ptr() + 4 * row, 2, f32, 2),
                (4, 0, 0, 0, 0)]
    for first in (True, False):
        assert backend._all_to_all(out, x, [1, 3, 1], [2, 0, 4], False) is None
        n = lib.lib.stubCalls(log)
        calls = [tuple(log[5 * i:5 * i + 5]) for i in range(n)]
        if first:  # the connecting group: kind, count, type, peer (its 4-byte buffers are the backend's own)
            assert [(c[0], c[2], c[3], c[4]) for c in calls[:6]] == [
                (3, 0, 0, 0), (send, 1, f32, 0), (recv, 1, f32, 0), (send, 1, f32, 2), (recv, 1, f32, 2), (4, 0, 0, 0)]
            calls = calls[6:]
        assert calls == exchange


# ----------------------------------------------------------------------------------------------------------
# the real libnccl (loads without a GPU)

@pytest.fixture(scope="module")
def real_library(tmp_path_factory):
    """The real libnccl as the backend finds it without $NANOPARALLEL_NCCL_LIB (never the stub this file loaded from
    pytest's temporary directory), or skip saying why."""
    saved = os.environ.pop(nccl.LIBRARY_ENV, None)
    try:
        stubs = str(tmp_path_factory.getbasetemp())
        errors = []
        for candidate in nccl.library_candidates():
            if candidate.startswith(stubs):
                continue
            try:
                return nccl.NCCLLibrary(candidate)
            except OSError as e:
                errors.append(str(e)[:100])
        pytest.skip(f"no libnccl on this machine (requirements.txt installs nvidia-nccl-cu12 on Linux x86_64): "
                    f"{'; '.join(errors)}")
    finally:
        if saved is not None:
            os.environ[nccl.LIBRARY_ENV] = saved


def library_path(lib):
    return lib.lib._name


@pytest.fixture(scope="module")
def nccl_h(real_library):
    """The text of the nccl.h shipped next to the loaded library (the nvidia-nccl wheels' include/), or skip."""
    path = os.path.join(os.path.dirname(os.path.dirname(library_path(real_library))), "include", "nccl.h")
    if not os.path.exists(path):
        pytest.skip(f"no nccl.h next to {library_path(real_library)}")
    with open(path) as f:
        return f.read()


def test_real_library_version(real_library, nccl_h):
    """ncclGetVersion of the loaded library = its header's NCCL_VERSION_CODE, and >= 2.10 (bf16, avg)."""
    code = int(re.search(r"#define NCCL_VERSION_CODE (\d+)", nccl_h).group(1))
    assert real_library.version() == nccl.decode_version(code)
    assert real_library.version() >= (2, 10, 0), "bf16 and avg need NCCL >= 2.10"


def test_enums_and_signatures_match_the_real_nccl_h(nccl_h):
    """RESULTS, DATA_TYPES, REDUCE_OPS and every function of SIGNATURES as the library's own header declares them:
    the values of the enums, and for every parameter the ctypes type of its C type (size_t, int or an enum, a
    pointer or opaque handle, ncclUniqueId by value)."""
    enum = {name: int(value) for name, value in re.findall(r"\b(nccl[A-Z]\w*)\s*=\s*(\d+)", nccl_h)}
    block = re.search(r"typedef enum \{([^}]*)\}\s*ncclResult_t;", nccl_h).group(1)
    results = {int(v): n for n, v in re.findall(r"(nccl\w+)\s*=\s*(\d+)", block) if n != "ncclNumResults"}
    assert {c: nccl.RESULTS[c] for c in results} == results  # every result this header has, by the same code
    # a result newer than this header (ncclTimeout: in 2.32.3, not in 2.28.9) comes after all of its own
    assert all(c in results or c >= enum["ncclNumResults"] for c in nccl.RESULTS)
    names = {torch.int8: "ncclInt8", torch.uint8: "ncclUint8", torch.int32: "ncclInt32", torch.int64: "ncclInt64",
             torch.float16: "ncclFloat16", torch.float32: "ncclFloat32", torch.float64: "ncclFloat64",
             torch.bfloat16: "ncclBfloat16"}
    assert nccl.DATA_TYPES == {t: enum[n] for t, n in names.items()}
    assert nccl.REDUCE_OPS == {op: enum[f"nccl{op.capitalize()}"]
                               for op in nccl.REDUCE_OPS}
    for name, argtypes in nccl.SIGNATURES.items():
        m = re.search(rf"ncclResult_t\s+{name}\s*\(([^)]*)\)\s*;", nccl_h)
        assert m, f"{name} is not declared in nccl.h"
        params = [p.strip() for p in m.group(1).split(",") if p.strip() not in ("", "void")]
        assert len(params) == len(argtypes), f"{name}: nccl.h has {params}, the binding {argtypes}"
        for param, argtype in zip(params, argtypes):
            if "*" in param or param.startswith(("ncclComm_t", "cudaStream_t")):
                expected = (ctypes.c_void_p, ctypes._Pointer)
            elif param.startswith("size_t"):
                expected = (ctypes.c_size_t,)
            elif param.startswith("ncclUniqueId"):
                expected = (nccl.ncclUniqueId,)
            else:
                assert param.split()[0] in ("int", "ncclDataType_t", "ncclRedOp_t"), f"{name}: {param}"
                expected = (ctypes.c_int,)
            assert argtype in expected or (isinstance(argtype, type) and issubclass(argtype, expected)), \
                f"{name}: {param!r} bound as {argtype}"


def test_real_library_error_strings(real_library):
    """ncclGetErrorString gives NCCL's text for every ncclResult_t the binding names, and an NCCLError carries it."""
    texts = {code: real_library.error_string(code) for code in nccl.RESULTS}
    assert texts[0] == "no error"
    assert texts[1].startswith("unhandled cuda error") and texts[4].startswith("invalid argument")
    assert len(set(texts.values())) == len(texts), texts  # one text per code
    e = nccl.NCCLError("ncclAllReduce", 4, texts[4])
    assert str(e) == f"ncclAllReduce failed: ncclInvalidArgument (4): {texts[4]}"


def test_real_library_unique_ids(real_library):
    """ncclGetUniqueId fills the 128-byte id (not zeros), differently each call; it needs no GPU."""
    a, b = (bytes(bytearray(real_library.unique_id().internal)) for _ in range(2))
    assert len(a) == 128 and a != bytes(128) and a != b


@pytest.mark.skipif(CUDA, reason="checks what happens without a usable GPU")
def test_real_comm_init_without_gpu_is_an_nccl_error(real_library):
    """ncclCommInitRank on a machine without a usable GPU returns an error code, which the binding raises as NCCLError
    with ncclGetErrorString's text and ncclGetLastError's detail (the CUDA failure), leaving the communicator NULL."""
    comm = ctypes.c_void_p()
    with pytest.raises(nccl.NCCLError) as e:
        real_library.call("ncclCommInitRank", ctypes.byref(comm), 1, real_library.unique_id(), 0)
    err = e.value
    assert err.call == "ncclCommInitRank" and err.code != 0 and err.name == nccl.RESULTS[err.code]
    assert real_library.error_string(err.code) in str(err)
    assert real_library.last_error() and real_library.last_error() in str(err)  # e.g. "Cuda failure '...'"
    assert comm.value is None


@pytest.mark.skipif(CUDA, reason="checks the CPU-only error")
def test_nccl_variant_without_gpu_is_a_one_line_error():
    for strategy in ("ddp", "fsdp", "tp", "pp"):
        with pytest.raises(ValueError, match="no GPU") as e:
            build_strategy(train_config(parallel=strategy, variant="nccl"), torch.device("cpu"))
        assert "\n" not in str(e.value)


# ----------------------------------------------------------------------------------------------------------
# on a GPU, under torchrun with 2 ranks sharing GPU 0

@unittest.skipUnless(CUDA, "needs a GPU (the device tool lends one); on CPU only the binding is tested")
class TestNCCLOnGPU(DistributedTestCase):

    @classmethod
    def setUpClass(cls):
        super().setUpClass()  # comm.init_distributed: on a one-GPU machine the ranks share it (comm.share_gpus)
        cls.device = torch.device("cuda", torch.cuda.current_device())
        cls.comm = nccl.NCCLCollectives(device=cls.device)

    def inputs(self, n, dtype, seed=0):
        g = torch.Generator().manual_seed(seed)
        return [torch.randn(n, generator=g).to(dtype).to(self.device) for _ in range(self.world_size)]

    def test_collectives(self):
        N, r = self.world_size, self.rank
        for dtype in (torch.float32, torch.bfloat16):
            xs = self.inputs(1000, dtype)
            for op in ("sum", "avg", "max"):
                t = xs[r].clone()
                self.comm.all_reduce(t, op)
                stack = torch.stack([x.float() for x in xs])
                ref = stack.amax(0) if op == "max" else stack.sum(0) / (N if op == "avg" else 1)
                torch.testing.assert_close(t.float(), ref, rtol=1e-2 if dtype == torch.bfloat16 else 1e-6, atol=1e-2)
            out = torch.empty(N * 1000, dtype=dtype, device=self.device)
            self.comm.all_gather(out, xs[r])
            self.assertTrue(torch.equal(out, torch.cat(xs)))
            big = self.inputs(N * 100, dtype, seed=1)
            part = torch.empty(100, dtype=dtype, device=self.device)
            self.comm.reduce_scatter(part, big[r])
            ref = torch.stack([b.float() for b in big]).sum(0)[r * 100:(r + 1) * 100]
            torch.testing.assert_close(part.float(), ref, rtol=1e-2, atol=1e-2)
            t = xs[r].clone()
            self.comm.broadcast(t, 1)
            self.assertTrue(torch.equal(t, xs[1]))
        peer = r ^ 1
        mine = torch.full((10,), float(r), device=self.device)
        h = self.comm.send(mine, peer, async_op=True)  # queued, issued with the receive: no GPU-side deadlock
        theirs = torch.empty(10, device=self.device)
        self.comm.recv(theirs, peer)
        h.wait()
        torch.cuda.synchronize()
        self.assertTrue(torch.all(theirs == float(peer)))

    def test_all_to_all(self):
        """Equal and uneven chunks (zero-size ones included), fp32 / bf16 / int64, rows of 3: every rank's output is
        chunk `rank` of every rank's input in rank order, exactly (tests/test_all_to_all.py's reference)."""
        from tests.test_all_to_all import expected_output, inputs, split_matrix
        N, r = self.world_size, self.rank
        for kind in ("equal", "uneven", "silent"):
            for dtype in (torch.float32, torch.bfloat16, torch.int64):
                with self.subTest(kind=kind, dtype=dtype):
                    rows = split_matrix(N, kind)
                    xs = [x.to(self.device) for x in inputs(rows, (3,), dtype, seed=1)]
                    want = expected_output(xs, rows, r)
                    out = torch.full_like(want, 7)
                    uneven = kind != "equal"
                    self.comm.all_to_all(out, xs[r], [rows[i][r] for i in range(N)] if uneven else None,
                                         rows[r] if uneven else None)
                    torch.cuda.synchronize()
                    self.assertTrue(torch.equal(out, want))

    def test_strategies_nccl_equal_single(self):
        """For every strategy of tests/test_triton_comm.py's STRATEGIES: 3 steps of the nccl variant, each equal to
        the single model's from the same state (tests/reference.py's rule)."""
        from tests.test_triton_comm import STRATEGIES, strategy_case
        N = self.world_size
        for name in STRATEGIES:
            with self.subTest(strategy=name):
                cfg, model_config = strategy_case(name, N)
                batches = global_batches(3, cfg["gradient_accumulation_steps"], 2, model_config)
                run = train_checked(build_strategy(train_config(variant="nccl", **cfg), self.device), model_config,
                                    batches)
                self.assertLess(run.losses[-1], run.losses[0])


if CUDA:
    test_torchrun = torchrun_launcher(__file__, nprocs=(2,))
