"""
kernels/nccl.py, the ctypes binding of libnccl behind the `nccl` variant.

On CPU (CI): the binding's pure-Python parts (enums as nccl.h defines them, the 128-byte ncclUniqueId passed by value,
version decoding, error strings turned into NCCLError, library search and its errors), exercised against a stub
libnccl compiled from C here when a C compiler exists, and against the real libnccl's ncclGetVersion when one can be
loaded; and the nccl variant failing at once, in one line, without a GPU.
On a GPU (2 ranks on GPU 0, a different NCCL_HOSTID per rank, gloo for torch's own group): every collective against
exact references, and each strategy's nccl variant equal to its custom variant (on CPU) within 1e-5.

    pytest tests/test_nccl.py
    torchrun --standalone --nproc_per_node=2 -m unittest tests/test_nccl.py     (the GPU part alone)
"""

import atexit
import ctypes
import os
import shutil
import subprocess
import unittest

import pytest
import torch
import torch.distributed as dist

from kernels import nccl
from parallel import build_strategy
from tests.distributed import DistributedTestCase, _exit_through_teardown, torchrun_launcher
from tests.reference import global_batches, max_param_diff, tiny_config, train_config

CUDA = torch.cuda.is_available()

# A stub with libnccl's C signatures: ncclGetVersion says 2.21.5, ncclGetUniqueId writes bytes 0..127, and
# ncclCommInitRank checks that the id arrived by value (byte i == i) and that 0 <= rank < nranks.
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
int ncclSend(const void *b, size_t n, int t, int peer, ncclComm_t c, void *st) { return 0; }
int ncclRecv(void *b, size_t n, int t, int peer, ncclComm_t c, void *st) { return 0; }
int ncclGroupStart(void) { return 0; }
int ncclGroupEnd(void) { return 0; }
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


def test_real_library_version():
    try:
        lib = nccl.NCCLLibrary()
    except OSError as e:
        pytest.skip(f"no libnccl on this machine: {str(e)[:120]}")
    major, minor, _ = lib.version()
    assert (major, minor) >= (2, 10), "bf16 and avg need NCCL >= 2.10"


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
        os.environ["NCCL_HOSTID"] = f"nanoparallel-rank{os.environ.get('RANK', '0')}"  # two ranks, one GPU
        if not dist.is_initialized():
            torch.cuda.set_device(0)
            dist.init_process_group("gloo")
            atexit.register(_exit_through_teardown)
        super().setUpClass()
        cls.device = torch.device("cuda", 0)
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

    def test_strategies_nccl_equals_custom(self):
        from tests.test_triton_comm import STRATEGIES, train
        N = self.world_size
        for name, overrides in STRATEGIES.items():
            with self.subTest(strategy=name):
                cfg = dict(parallel=name, **overrides(N))
                model_config = tiny_config(n_head=4, n_layer=cfg["n_layer"])
                batches = global_batches(3, cfg["gradient_accumulation_steps"], 2, model_config)
                custom = build_strategy(train_config(variant="custom", **cfg), torch.device("cpu"))
                lc = train(custom, model_config, batches)
                mine = build_strategy(train_config(variant="nccl", **cfg), self.device)
                ln = train(mine, model_config, batches)
                self.assertLess(max(abs(a - b) for a, b in zip(lc, ln)), 1e-5)
                self.assertLess(max_param_diff(custom.full_state_dict(),
                                               {k: v.cpu() for k, v in mine.full_state_dict().items()}), 1e-5)


if CUDA:
    test_torchrun = torchrun_launcher(__file__, nprocs=(2,))
