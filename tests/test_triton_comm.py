"""
The triton backend (kernels/triton_comm.py) against torch.distributed's and against exact references, and the triton
variant of every strategy against its custom variant. On CPU the kernels run in Triton's interpreter over /dev/shm;
on a GPU machine the same cases run on CUDA symmetric memory (comm.init_distributed's group; on a one-GPU machine the
ranks share it).

    torchrun --standalone --nproc_per_node=2 -m unittest tests/test_triton_comm.py     (or 4; pytest launches both)
"""

import os

import torch
import torch.distributed as dist

from parallel import available, build_strategy
from kernels.comm import TorchCollectives
from tests.distributed import DistributedTestCase, torchrun_launcher
from tests.reference import global_batches, tiny_config, train_checked, train_config

CUDA = torch.cuda.is_available()
# this rank's GPU as comm.cuda_device maps it (its own, or GPU 0 shared by every rank on a one-GPU machine)
DEVICE = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)) % torch.cuda.device_count()) if CUDA else \
    torch.device("cpu")

# The strategy x config cases whose triton (and nccl, cuda) variant must train the single model: overrides of
# train_config, as a function of the world size N (`parallel` is the key unless they say otherwise; "model": overrides
# of the model, tests/reference.py's tiny GPT with 4 heads and n_layer layers; pp: a stage per rank). Add a line for a
# case; strategy_case builds it.
STRATEGIES = {
    "ddp": lambda N: dict(n_layer=2, gradient_accumulation_steps=N, bucket_cap_mb=0.01),
    "zero": lambda N: dict(parallel="ddp", zero_stage=2, n_layer=2, gradient_accumulation_steps=N,
                           bucket_cap_mb=0.01),  # in-place reduce-scatter and all-gather of flat buckets
    "fsdp": lambda N: dict(n_layer=2, gradient_accumulation_steps=N),
    "tp": lambda N: dict(n_layer=max(2, N), gradient_accumulation_steps=1, sequence_parallel=True, loss_parallel=True),
    "pp": lambda N: dict(n_layer=N, gradient_accumulation_steps=4, pp_schedule="1f1b"),
    "cp": lambda N: dict(n_layer=2, gradient_accumulation_steps=2),  # ring attention's async K/V passes
    "ulysses": lambda N: dict(parallel="cp", cp_type="ulysses", n_layer=2,
                              gradient_accumulation_steps=2),  # all-to-alls
    "ep": lambda N: dict(n_layer=2, gradient_accumulation_steps=N, ep_size=N,  # uneven all-to-alls of routed tokens
                         model=dict(n_expert=2 * N, n_expert_per_token=2)),
    # N=2: a pipeline of 2 (DDP wrapper over a group of 1); N=4: dp2 x tp2 with FSDP (TP and DP groups side by side)
    "3d": lambda N: dict(n_layer=2, gradient_accumulation_steps=2, dp_size=N // 2, pp_size=2 if N == 2 else 1,
                         tp_size=1 if N == 2 else 2, dp_type="ddp" if N == 2 else "fsdp"),
}


def strategy_case(name, N):
    """(the train_config overrides, the model config) of STRATEGIES[name] at world size N."""
    cfg = {"parallel": name, **STRATEGIES[name](N)}
    return cfg, tiny_config(n_head=4, n_layer=cfg["n_layer"], **cfg.pop("model", {}))


def test_every_custom_strategy_has_triton_and_nccl_variants():
    """Every (s, "custom") is registered as (s, "triton") and (s, "nccl") too: the same class, not a copy, whose
    collectives() hands the algorithm the backend its variant names."""
    import parallel
    pairs = available()
    customs = [s for s, v in pairs if v == "custom"]
    assert {"ddp", "fsdp", "tp", "pp", "3d"} <= set(customs)
    for s in customs:
        for v in ("triton", "nccl"):
            assert (s, v) in pairs
            cls = parallel._REGISTRY[s, v]
            assert cls is parallel._REGISTRY[s, "custom"] and cls.strategy == s
    assert parallel.backend("triton").__name__ == "TritonCollectives" and parallel.backend("custom") is TorchCollectives


def bf16_round(x):
    """fp32 -> bf16, the reference the kernels' hand rounding must match (torch rounds to nearest even)."""
    return x.to(torch.bfloat16)


class TestTritonCollectives(DistributedTestCase):

    @classmethod
    def setUpClass(cls):
        super().setUpClass()  # on a GPU: comm.init_distributed's group, the ranks sharing GPU 0 (comm.share_gpus)
        from kernels.triton_comm import TritonCollectives
        cls.Backend = TritonCollectives
        # small heap (two halves of 256 bytes), small blocks, 2-slot rings of 64 bytes: chunks, several programs
        # per launch, a tensor not a multiple of the block size, messages wider than a slot and a full ring
        cls.small = TritonCollectives(device=DEVICE, heap_bytes=512, slots=2, slot_bytes=64)
        cls.small.block = 64
        cls.torch = TorchCollectives()

    def inputs(self, n, dtype, seed=0):
        """Every rank's input (the same generator on every rank), on DEVICE: a list of N tensors (n,)."""
        g = torch.Generator().manual_seed(seed)
        return [torch.randn(n, generator=g).to(dtype).to(DEVICE) for _ in range(self.world_size)]

    @staticmethod
    def reference(xs, op):
        """op over ranks in rank order, in fp32, rounded once to the dtype: what both kernels must give exactly."""
        acc = xs[0].float()
        for x in xs[1:]:
            acc = torch.maximum(acc, x.float()) if op == "max" else acc + x.float()
        if op == "avg":
            acc = acc / len(xs)
        return acc.to(xs[0].dtype)

    def test_all_reduce(self):
        """One-shot and two-shot, sum/avg/max, fp32/bf16/fp16, sizes 1, 37 (< one block) and 300 (several blocks,
        and chunks: more than a heap half): bit-exact to the rank-order fp32 reference, and within rounding of
        torch.distributed's result (whose summation order differs from N=3 on)."""
        for algorithm in ("one_shot", "two_shot"):
            self.small.algorithm = algorithm
            for dtype in (torch.float32, torch.bfloat16, torch.float16):
                for n in (1, 37, 300):
                    for op in ("sum", "avg", "max") if dtype != torch.float16 else ("sum",):
                        with self.subTest(algorithm=algorithm, dtype=dtype, n=n, op=op):
                            xs = self.inputs(n, dtype, seed=n)
                            mine = xs[self.rank].clone()
                            self.assertIsNone(self.small.all_reduce(mine, op))
                            self.assertTrue(torch.equal(mine, self.reference(xs, op)))
                            if DEVICE.type == "cpu":
                                theirs = xs[self.rank].clone()
                                self.torch.all_reduce(theirs, op)
                                ulp = 1e-6 if dtype == torch.float32 else 1e-2
                                torch.testing.assert_close(mine.float(), theirs.float(), rtol=ulp, atol=ulp * 4)
        self.small.algorithm = "auto"

    def test_all_gather_reduce_scatter_broadcast(self):
        """all_gather and broadcast (from every rank) move bits exactly; reduce_scatter (sum, avg) equals the
        rank-order reference exactly; fp32 and bf16, sizes not multiples of the block, chunked."""
        N, r = self.world_size, self.rank
        for dtype in (torch.float32, torch.bfloat16):
            for n in (5, 150):
                with self.subTest(dtype=dtype, n=n, op="all_gather"):
                    xs = self.inputs(n, dtype, seed=n)
                    out = torch.empty(N * n, dtype=dtype, device=DEVICE)
                    self.small.all_gather(out, xs[r])
                    self.assertTrue(torch.equal(out, torch.cat(xs)))
                for op in ("sum", "avg"):
                    with self.subTest(dtype=dtype, n=n, op=f"reduce_scatter {op}"):
                        xs = self.inputs(N * n, dtype, seed=n + 1)
                        out = torch.empty(n, dtype=dtype, device=DEVICE)
                        self.small.reduce_scatter(out, xs[r], op)
                        self.assertTrue(torch.equal(out, self.reference(xs, op)[r * n:(r + 1) * n]))
                for src in range(N):
                    with self.subTest(dtype=dtype, n=n, op="broadcast", src=src):
                        xs = self.inputs(n, dtype, seed=src)
                        t = xs[r].clone()
                        self.small.broadcast(t, src)
                        self.assertTrue(torch.equal(t, xs[src]))

    def test_non_contiguous_and_async(self):
        """Non-contiguous tensors (a transposed view) are reduced and gathered in place; async_op=True returns a
        handle that is complete; barrier() returns on every rank."""
        N, r = self.world_size, self.rank
        xs = [x.view(4, 6) for x in self.inputs(24, torch.float32)]
        t = xs[r].clone().t()
        handle = self.small.all_reduce(t, "sum", async_op=True)
        self.assertTrue(handle.is_completed())
        handle.wait()
        self.assertTrue(torch.equal(t, self.reference(xs, "sum").t()))
        out = torch.empty(6, 4 * N, device=DEVICE).t()  # (4N, 6), non-contiguous
        self.small.all_gather(out, xs[r])
        self.assertTrue(torch.equal(out, torch.cat(xs)))
        self.small.barrier()

    def test_point_to_point(self):
        """A ring: every rank sends 6 messages (sizes 1..40 floats, most wider than a 16-float slot, more than the
        2-slot ring holds) asynchronously to the next rank, then receives the previous rank's in order; then every
        pair exchanges at once (async send, then blocking receive, both sides): nothing deadlocks, every byte
        arrives, every handle completes. Also bf16 and a non-contiguous receive buffer."""
        N, r = self.world_size, self.rank
        nxt, prv = (r + 1) % N, (r - 1) % N
        sizes = [1, 16, 17, 40, 3, 33]
        handles = [self.small.send(torch.full((s,), 100.0 * r + i, device=DEVICE), nxt, async_op=True)
                   for i, s in enumerate(sizes)]
        for i, s in enumerate(sizes):
            got = torch.empty(s, device=DEVICE)
            self.small.recv(got, prv)
            self.assertTrue(torch.all(got == 100.0 * prv + i))
        for h in handles:
            h.wait()
            self.assertTrue(h.is_completed())
        peer = r ^ 1
        if peer < N:
            mine = torch.arange(50, dtype=torch.bfloat16, device=DEVICE) + r
            h = self.small.send(mine, peer, async_op=True)
            theirs = torch.empty(10, 5, dtype=torch.bfloat16, device=DEVICE).t()
            self.small.recv(theirs, peer)
            h.wait()
            expected = torch.arange(50, dtype=torch.bfloat16, device=DEVICE) + peer
            self.assertTrue(torch.equal(theirs, expected.view(5, 10)))

    def test_several_groups_each_with_its_own_heap(self):
        """Pairs of ranks (N=4: {0,1}, {2,3}; N=2: a second group over both ranks, as a TP mesh's group is) each get
        their own heap next to the world's: pair all-reduces equal the pair's sum, and a pair's messages, larger than
        its one-slot ring, go through while both ranks are inside a world all-reduce and then a blocking receive."""
        r = self.rank
        pair, _ = dist.new_subgroups(group_size=2)
        comm = self.Backend(pair, device=DEVICE, slots=1, slot_bytes=64)
        self.assertEqual(comm.world_size, 2)
        self.assertNotEqual(comm.heap.buffer_ptrs, self.small.heap.buffer_ptrs)
        xs = self.inputs(10, torch.float32, seed=3)
        base = r - r % 2
        t = xs[r].clone()
        comm.all_reduce(t)
        self.assertTrue(torch.equal(t, xs[base] + xs[base + 1]))
        peer = 1 - comm.rank
        message = torch.arange(100, dtype=torch.float32, device=DEVICE) * (r + 1)
        handle = comm.send(message, peer, async_op=True)   # 7 chunks through a 1-slot ring
        world = xs[r].clone()
        self.small.all_reduce(world)                       # in between, a collective on another group
        self.assertTrue(torch.equal(world, self.reference(xs, "sum")))
        got = torch.empty(100, device=DEVICE)
        comm.recv(got, peer)
        handle.wait()
        partner = base + peer
        self.assertTrue(torch.equal(got, torch.arange(100, dtype=torch.float32, device=DEVICE) * (partner + 1)))
        comm.close()

    def test_bf16_rounding_is_round_to_nearest_even(self):
        """The kernel's hand-written fp32 -> bf16 rounding equals torch's: ties to even, a tie at the largest bf16
        rounding to inf, inf, NaN, and random sums (run locally: a 2-rank sum whose "heaps" are two tensors here)."""
        from kernels.triton_comm import _reduce_kernel
        big = torch.finfo(torch.bfloat16).max
        pairs = [(1.0, 2.0 ** -8), (1.0, 3 * 2.0 ** -8), (1.0, -2.0 ** -8), (big, 2.0 ** 119), (1.0, float("inf")),
                 (1.0, float("nan")), (-0.0, -0.0)]
        g = torch.Generator().manual_seed(self.rank)
        a = torch.cat([torch.tensor([p[0] for p in pairs]), torch.randn(500, generator=g)]).bfloat16().to(DEVICE)
        b = torch.cat([torch.tensor([p[1] for p in pairs]), torch.randn(500, generator=g)]).bfloat16().to(DEVICE)
        out = torch.empty_like(a)
        table = torch.tensor([a.data_ptr(), b.data_ptr()], dtype=torch.int64, device=DEVICE)
        _reduce_kernel[(1,)](table, 0, out.data_ptr(), a.numel(), WORLD=2, OP=0, KIND=1, BLOCK=1024)
        expected = bf16_round(a.float() + b.float())  # the kernel sums in fp32 too: only the rounding can differ
        self.assertTrue(torch.equal(out.isnan(), expected.isnan()))
        self.assertTrue(torch.equal(out[~out.isnan()], expected[~expected.isnan()]))
        self.assertEqual(out[:5].tolist(), [1.0, 1.0 + 2.0 ** -6, 1.0 - 2.0 ** -8, float("inf"), float("inf")])

    def test_bad_input_is_a_clear_error(self):
        """Integer reductions, a send to oneself and mismatched sizes are ValueErrors before any communication."""
        with self.assertRaisesRegex(ValueError, "reduces float32"):
            self.small.all_reduce(torch.ones(3, dtype=torch.int64, device=DEVICE))
        with self.assertRaisesRegex(ValueError, "not another rank"):
            self.small.send(torch.ones(3, device=DEVICE), self.rank)
        with self.assertRaisesRegex(ValueError, "all_gather"):
            self.small.all_gather(torch.empty(3, device=DEVICE), torch.ones(3, device=DEVICE))

    def test_a_missing_peer_is_a_timeout_error(self):
        """A barrier that the other ranks never join raises RuntimeError after timeout_s instead of hanging."""
        backend = self.Backend(device=DEVICE, heap_bytes=1024, timeout_s=0.5)
        if self.rank == 0:
            with self.assertRaisesRegex(RuntimeError, "barrier on ranks .* timed out after"):
                backend.barrier()
        backend.close()
        dist.barrier()

    def test_heap_files_are_removed_and_close_releases(self):
        """Once every rank has its heap, none of its /dev/shm files is left (CPU); close() releases it."""
        from kernels import triton_comm
        backend = self.Backend(device=DEVICE, heap_bytes=1024)
        backend.barrier()  # every rank's constructor returned
        if DEVICE.type == "cpu":
            self.assertEqual([p for p in os.listdir("/dev/shm") if p.startswith(backend.heap.name)], [])
        self.assertIn(backend, triton_comm._OPEN)
        backend.close()
        self.assertNotIn(backend, triton_comm._OPEN)
        self.assertIsNone(backend.heap)

    def test_strategies_triton_equal_single(self):
        """For every strategy of STRATEGIES: 3 steps of the triton variant (and of custom, on the CPU), each equal to
        the single model's from the same state (tests/reference.py's rule), with the same calls and bytes as
        custom's."""
        N = self.world_size
        for name in STRATEGIES:
            with self.subTest(strategy=name):
                cfg, model_config = strategy_case(name, N)
                batches = global_batches(3, cfg["gradient_accumulation_steps"], 2, model_config)
                stats = {}
                for variant, device in (("custom", torch.device("cpu")), ("triton", DEVICE)):
                    strategy = build_strategy(train_config(variant=variant, **cfg), device)
                    run = train_checked(strategy, model_config, batches)
                    stats[variant] = strategy.stats.calls, strategy.stats.payload
                    self.assertLess(run.losses[-1], run.losses[0])  # not vacuous: it learned
                self.assertEqual(stats["custom"], stats["triton"])


test_torchrun = torchrun_launcher(__file__, nprocs=(2,) if CUDA else (2, 4))
