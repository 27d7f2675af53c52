"""
kernels/comm.py: every collective of the torch backend gives the right values, sync and async, and counts
payload and bus bytes by nccl-tests' convention.

    torchrun --standalone --nproc_per_node=2 -m unittest tests/test_comm.py     (or 4; pytest launches both)
"""

import torch

from kernels.comm import CommStats, TorchCollectives, check_backend_serves
from parallel import build_strategy
from tests.distributed import DistributedTestCase, torchrun_launcher
from tests.reference import train_config


class TestTorchCollectives(DistributedTestCase):

    def setUp(self):
        self.comm = TorchCollectives()
        self.N, self.r = self.comm.world_size, self.comm.rank

    def test_all_reduce(self):
        for op, expected in (("sum", sum(range(1, self.N + 1))), ("avg", (self.N + 1) / 2), ("max", self.N)):
            for async_op in (False, True):
                t = torch.full((5,), float(self.r + 1))
                handle = self.comm.all_reduce(t, op=op, async_op=async_op)
                if async_op:
                    handle.wait()
                self.assertTrue(torch.equal(t, torch.full((5,), float(expected))), (op, async_op, t))

    def test_all_gather_and_reduce_scatter(self):
        out = torch.empty(self.N * 3)
        self.comm.all_gather(out, torch.arange(3.0) + 10 * self.r)
        self.assertTrue(torch.equal(out, torch.cat([torch.arange(3.0) + 10 * i for i in range(self.N)])))
        inp = torch.arange(self.N * 3, dtype=torch.float32) * (self.r + 1)
        shard = torch.empty(3)
        self.comm.reduce_scatter(shard, inp, async_op=True).wait()
        total = sum(range(1, self.N + 1))
        self.assertTrue(torch.equal(shard, torch.arange(3.0 * self.r, 3.0 * self.r + 3) * total))
        with self.assertRaises(ValueError):
            self.comm.all_gather(torch.empty(5), torch.empty(3))

    def test_broadcast_send_recv_barrier(self):
        t = torch.full((4,), float(self.r))
        self.comm.broadcast(t, src=self.N - 1)
        self.assertTrue(torch.equal(t, torch.full((4,), float(self.N - 1))))
        # a ring: send to the next rank, receive from the previous one (async, so the order cannot deadlock)
        out, inc = torch.full((2,), float(self.r)), torch.empty(2)
        handles = [self.comm.send(out, (self.r + 1) % self.N, async_op=True),
                   self.comm.recv(inc, (self.r - 1) % self.N, async_op=True)]
        for h in handles:
            h.wait()
        self.assertTrue(torch.equal(inc, torch.full((2,), float((self.r - 1) % self.N))))
        self.comm.barrier()

    def test_byte_counts(self):
        """Payload and bus bytes per nccl-tests (doc/PERFORMANCE.md), for fp32 and bf16."""
        N = self.N
        for dtype, size in ((torch.float32, 4), (torch.bfloat16, 2)):
            stats = CommStats()
            comm = TorchCollectives(stats=stats)
            comm.all_reduce(torch.ones(1000, dtype=dtype))
            comm.all_gather(torch.empty(N * 100, dtype=dtype), torch.ones(100, dtype=dtype))
            comm.reduce_scatter(torch.empty(100, dtype=dtype), torch.ones(N * 100, dtype=dtype))
            comm.broadcast(torch.ones(10, dtype=dtype), src=0)
            self.assertEqual(dict(stats.payload), {"all_reduce": 1000 * size, "all_gather": N * 100 * size,
                                                   "reduce_scatter": N * 100 * size, "broadcast": 10 * size})
            self.assertAlmostEqual(stats.bus["all_reduce"], 2 * (N - 1) / N * 1000 * size)
            self.assertAlmostEqual(stats.bus["all_gather"], (N - 1) / N * N * 100 * size)
            self.assertAlmostEqual(stats.bus["reduce_scatter"], (N - 1) / N * N * 100 * size)
            self.assertEqual(stats.bus["broadcast"], 10 * size)
            self.assertEqual(stats.as_dict()["comm/all_reduce_calls"], 1)

    def test_no_cuda_tensor_through_gloo(self):
        """The guard against the first GPU run's crash (DTensor bookkeeping of CUDA tensors over a gloo-only group,
        SIGSEGV in wait_tensor), caught without a GPU: this gloo group would run CUDA tensors through gloo, so asking
        for a CUDA device is a one-line ValueError, and so is building any strategy, of every variant, for a CUDA
        device on it, before any collective; a CPU device passes."""
        check_backend_serves(torch.device("cpu"))
        with self.assertRaisesRegex(ValueError, r"runs cuda tensors through gloo") as e:
            check_backend_serves(torch.device("cuda", 0))
        self.assertNotIn("\n", str(e.exception))
        for parallel in ("ddp", "fsdp", "tp", "pp", "cp", "3d"):
            for variant in ("pytorch", "custom", "triton", "nccl"):
                with self.subTest(parallel=parallel, variant=variant):
                    with self.assertRaisesRegex(ValueError, "through gloo"):
                        build_strategy(train_config(parallel=parallel, variant=variant, n_layer=4,
                                                    gradient_accumulation_steps=4), torch.device("cuda", 0))


test_torchrun = torchrun_launcher(__file__, nprocs=(2, 4))
