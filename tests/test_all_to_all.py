"""
Collectives.all_to_all (torch.distributed.all_to_all_single's semantics) in the torch (gloo) and triton backends
against an exact reference: equal and uneven chunks (zero-size ones included, a rank that sends nothing, a rank that
receives nothing), fp32 / bf16 / fp16 / int64 rows of several elements, chunks larger than the triton heap (several
rounds, a different number per rank pair), a non-contiguous output, async handles, and the bytes CommStats counts:
payload = this rank's input, bus = what it sends to the other ranks. The nccl backend's all-to-all is checked on a GPU
(tests/test_nccl.py's TestNCCLOnGPU) and its argument passing against a stub libnccl on CPU (tests/test_nccl.py).
On CPU the triton kernels run in Triton's interpreter over /dev/shm (tests/test_triton_comm.py says how).

    torchrun --standalone --nproc_per_node=2 -m unittest tests/test_all_to_all.py     (or 4; pytest launches both)
"""

import torch

from kernels.comm import CommStats, TorchCollectives
from tests.distributed import DistributedTestCase, torchrun_launcher

DEVICE = torch.device("cpu")
DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.int64)


def split_matrix(N, kind, scale=1):
    """rows[i][j]: the rows rank i sends to rank j. "equal": 2 each; "uneven": 0 to 3, zeros included; "silent":
    uneven, but rank 0 sends nothing and rank N-1 receives nothing; "lopsided": uneven, but rank 0 sends 40 rows to
    rank N-1 (only those two ranks hold a large chunk). Times `scale`."""
    if kind == "equal":
        rows = [[2] * N for _ in range(N)]
    else:
        rows = [[(i + 2 * j + 1) % 4 for j in range(N)] for i in range(N)]
    if kind == "silent":
        rows[0] = [0] * N
        for i in range(N):
            rows[i][N - 1] = 0
    if kind == "lopsided":
        rows[0][N - 1] = 40
    return [[r * scale for r in row] for row in rows]


def inputs(rows, row_shape, dtype, seed):
    """Every rank's input (the same generator on every rank): rank i's has sum_j rows[i][j] rows of row_shape."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for row in rows:
        shape = (sum(row), *row_shape)
        if dtype == torch.int64:
            x = torch.randint(-2**40, 2**40, shape, generator=g)
        else:
            x = torch.randn(shape, generator=g).to(dtype)
        out.append(x.to(DEVICE))
    return out


def expected_output(xs, rows, r):
    """What rank r receives: chunk r of every rank's input, in rank order."""
    pieces = []
    for i, x in enumerate(xs):
        start = sum(rows[i][:r])
        pieces.append(x[start:start + rows[i][r]])
    return torch.cat(pieces)


class TestAllToAll(DistributedTestCase):

    @classmethod
    def setUpClass(cls):
        super().setUpClass()
        from kernels.triton_comm import TritonCollectives
        # a heap of two 512-byte halves: slots of 112 bytes at N=2 and 48 at N=4 (the 16-byte header, then N slots),
        # so the large cases take several rounds; blocks of 64 elements (several programs per launch)
        cls.backends = {"torch": TorchCollectives(stats=CommStats()),
                        "triton": TritonCollectives(device=DEVICE, heap_bytes=1024, stats=CommStats())}
        cls.backends["triton"].block = 64

    def check(self, name, kind, dtype, row_shape=(3,), scale=1, seed=0):
        """One all-to-all of `kind`'s split matrix on backend `name`: the output equals the reference exactly, and
        CommStats counted one call, this rank's input bytes as payload and the bytes of its chunks for the other
        ranks as bus bytes."""
        N, r = self.world_size, self.rank
        comm = self.backends[name]
        rows = split_matrix(N, kind, scale)
        xs = inputs(rows, row_shape, dtype, seed)
        want = expected_output(xs, rows, r)
        out = torch.full_like(want, 7)
        uneven = kind != "equal"
        comm.stats.reset()
        result = comm.all_to_all(out, xs[r], [rows[i][r] for i in range(N)] if uneven else None,
                                 rows[r] if uneven else None)
        self.assertIsNone(result)
        self.assertTrue(torch.equal(out, want))
        row_bytes = xs[r][0].numel() * xs[r].element_size() if xs[r].shape[0] else 0
        self.assertEqual(comm.stats.calls["all_to_all"], 1)
        self.assertEqual(comm.stats.payload["all_to_all"], xs[r].numel() * xs[r].element_size())
        self.assertEqual(comm.stats.bus["all_to_all"], (sum(rows[r]) - rows[r][r]) * row_bytes)
        if kind == "equal":  # nccl-tests' alltoall bus bytes: (N-1)/N of the input
            self.assertEqual(comm.stats.bus["all_to_all"], (N - 1) / N * comm.stats.payload["all_to_all"])

    def test_equal_uneven_and_empty_chunks_every_dtype(self):
        """Both backends, every dtype, equal chunks, uneven chunks with zeros, and a rank that sends nothing and one
        that receives nothing: bit-exact, bytes as counted by the formula."""
        for name in self.backends:
            for dtype in DTYPES:
                for kind in ("equal", "uneven", "silent"):
                    with self.subTest(backend=name, dtype=dtype, kind=kind):
                        self.check(name, kind, dtype, seed=len(kind))

    def test_chunks_larger_than_the_heap(self):
        """Triton: chunks of up to 40 rows of 3 fp32 (480 bytes, more than a heap half) through 48- or 112-byte
        slots, up to 10 rounds: equal, uneven, 2-D rows of bf16, and one large chunk between two ranks while the
        others' would fit in one round (every rank takes the largest number of rounds); torch the same cases."""
        for name in self.backends:
            for kind, dtype, row_shape, scale in (("equal", torch.float32, (3,), 10),
                                                  ("uneven", torch.float32, (3,), 10),
                                                  ("uneven", torch.bfloat16, (2, 5), 10),
                                                  ("lopsided", torch.float32, (3,), 1)):
                with self.subTest(backend=name, kind=kind, dtype=dtype):
                    self.check(name, kind, dtype, row_shape, scale=scale, seed=1)

    def test_non_contiguous_output_and_async(self):
        """A transposed (non-contiguous) output receives the right rows, sync and async (gloo's all_to_all_single
        writes a non-contiguous output as if it were contiguous, measured in torch 2.13: TorchCollectives goes
        through a contiguous copy); async_op=True returns a handle whose wait() leaves the result in place."""
        N, r = self.world_size, self.rank
        rows = split_matrix(N, "equal")
        xs = inputs(rows, (4,), torch.float32, seed=3)
        want = expected_output(xs, rows, r)
        for name, comm in self.backends.items():
            with self.subTest(backend=name):
                for async_op in (False, True):
                    out = torch.empty(4, want.shape[0]).t()
                    self.assertFalse(out.is_contiguous())
                    handle = comm.all_to_all(out, xs[r], async_op=async_op)
                    if async_op:
                        handle.wait()
                    self.assertTrue(torch.equal(out, want))
                out2 = torch.empty_like(want)
                handle = comm.all_to_all(out2, xs[r], async_op=True)
                handle.wait()
                self.assertTrue(torch.equal(out2, want))

    def test_bad_input_is_a_clear_error(self):
        """Before any communication: split sizes that do not sum to the rows, rows not divisible into equal chunks,
        dtypes that differ (triton)."""
        N = self.world_size
        for name, comm in self.backends.items():
            with self.subTest(backend=name):
                with self.assertRaisesRegex(ValueError, "input_split_sizes .* must be"):
                    comm.all_to_all(torch.empty(N), torch.ones(N), [1] * N, [2] * N)
                with self.assertRaisesRegex(ValueError, "not divisible into"):
                    comm.all_to_all(torch.empty(N), torch.ones(N + 1))
        with self.assertRaisesRegex(ValueError, "all_to_all: output is torch.float64"):
            self.backends["triton"].all_to_all(torch.empty(N, dtype=torch.float64), torch.ones(N))


test_torchrun = torchrun_launcher(__file__, nprocs=(2, 4))
