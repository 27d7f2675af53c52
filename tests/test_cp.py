"""
Context parallelism (parallel/cp.py), both variants, against full attention, the single-device model and each other
(CPU, gloo): ring attention forward and backward, the zigzag split, whole-model training with the attention core
swapped and the gradients averaged over CP, the bytes the ring moves, the activation memory it saves, bad configs.

    torchrun --standalone --nproc_per_node=2 -m unittest tests/test_cp.py     (or 4; pytest launches both)

Time: about 15 s per launch at 2 processes and 30 s at 4 on this 2-core VM, plus ~2 s of plain tests.
"""

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.distributed.device_mesh import init_device_mesh

from kernels.comm import CommStats, TorchCollectives
from model import GPT
from parallel import build_strategy
from parallel.cp import (_pairs, block_attention, block_attention_backward, check_cp_config,
                         measure_saved_bytes, merge_partials, pytorch_context_parallel, ring_attention,
                         ring_send_bytes, split_sequence, zigzag_indices)
from sim.cost import Model as SimModel, Parallel as SimParallel, cp_send_bytes
from tests.distributed import DistributedTestCase, torchrun_launcher
from tests.reference import LOSS_TOL, Reference, global_batches, tiny_config, train_checked, train_config

CPU = torch.device("cpu")
VARIANTS = ("custom", "pytorch")


def causal_attention(q, k, v, dout):
    """Plain causal attention over the whole sequence and its gradients by autograd: (out, dq, dk, dv)."""
    q, k, v = (t.detach().clone().requires_grad_() for t in (q, k, v))
    out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    out.backward(dout)
    return out.detach(), q.grad, k.grad, v.grad


# ----------------------------------------------------------------------------------------------------------
# plain tests (no process group)


def test_zigzag_indices_partition_the_sequence():
    """Rank r holds chunks r and 2cp-1-r of 2cp, ascending; the ranks' indices partition 0..T-1."""
    for cp in (1, 2, 3, 4):
        T = 4 * cp * 3
        c = T // (2 * cp)
        pieces = [zigzag_indices(T, cp, r) for r in range(cp)]
        assert torch.equal(torch.cat(pieces).sort().values, torch.arange(T))
        for r, idx in enumerate(pieces):
            assert idx.tolist() == list(range(r * c, (r + 1) * c)) + list(range((2 * cp - 1 - r) * c, (2 * cp - r) * c))
    assert zigzag_indices(8, 2, 1).tolist() == [2, 3, 4, 5]
    x = torch.arange(24).view(2, 12)
    xl, yl, pos = split_sequence(3, 1, x, x + 100)
    assert pos.tolist() == [2, 3, 8, 9] and torch.equal(xl, x[:, pos]) and torch.equal(yl, x[:, pos] + 100)
    with pytest.raises(ValueError, match="not divisible by 2 x cp_size = 8"):
        zigzag_indices(12, 4, 0)


def test_ring_schedule_covers_the_causal_mask_once_and_balances_work():
    """Over the cp steps of the ring, each rank computes every (query, key) pair of the causal mask among its queries
    exactly once and no masked pair outside the diagonal blocks, which alone get a mask; every rank computes the
    same number of score entries."""
    for cp in (1, 2, 3, 4, 5):
        T, c = 2 * cp * 3, 3
        work = []
        for r in range(cp):
            q_pos = zigzag_indices(T, cp, r)
            hits = torch.zeros(T, T, dtype=torch.int64)
            entries = 0
            for step in range(cp):
                src = (r - step) % cp
                qs, ks, causal = _pairs(r, src, c)
                qp, kp = q_pos[qs], zigzag_indices(T, cp, src)[ks]
                allowed = kp.view(1, -1) <= qp.view(-1, 1)
                assert causal == (src == r)
                if not causal:  # an unmasked block must be entirely visible
                    assert bool(allowed.all()), (cp, r, step)
                hits[qp.view(-1, 1), kp.view(1, -1)] += allowed.long()
                entries += qp.numel() * kp.numel() - (qp.numel() * (qp.numel() - 1) // 2 if causal else 0)
            expected = torch.zeros(T, T, dtype=torch.int64)
            expected[q_pos] = torch.ones(T, T, dtype=torch.int64).tril()[q_pos]
            assert torch.equal(hits, expected), (cp, r)
            work.append(entries)
        assert len(set(work)) == 1, (cp, work)


def test_block_attention_merge_and_backward_equal_full_attention():
    """Attention over two key blocks merged by the log-sum-exp rule equals attention over all keys, and the blockwise
    backward (recomputed P from the merged lse) equals autograd's; fp64, within 1e-12."""
    g = torch.Generator().manual_seed(0)
    q, k, v, dout = (torch.randn(2, 3, 6, 8, generator=g, dtype=torch.float64) for _ in range(4))
    kn, vn = (torch.randn(2, 3, 5, 8, generator=g, dtype=torch.float64) for _ in range(2))  # keys before q's
    scale = 8 ** -0.5
    out_a, lse_a = block_attention(q, kn, vn, scale, causal=False)
    out_b, lse_b = block_attention(q, k, v, scale, causal=True)
    out, lse = merge_partials(out_a, lse_a, out_b, lse_b)
    kk, vv = torch.cat([kn, k], 2), torch.cat([vn, v], 2)
    mask = torch.ones(6, 11, dtype=torch.bool).tril(5)
    ref_q, ref_k, ref_v = (t.clone().requires_grad_() for t in (q, kk, vv))
    ref = F.scaled_dot_product_attention(ref_q, ref_k, ref_v, attn_mask=mask)
    ref.backward(dout)
    assert (out - ref).abs().max() < 1e-12
    delta = (dout * out).sum(-1)
    dq_a, dk_a, dv_a = block_attention_backward(q, kn, vn, dout, lse, delta, scale, causal=False)
    dq_b, dk_b, dv_b = block_attention_backward(q, k, v, dout, lse, delta, scale, causal=True)
    assert (dq_a + dq_b - ref_q.grad).abs().max() < 1e-12
    assert (torch.cat([dk_a, dk_b], 2) - ref_k.grad).abs().max() < 1e-12
    assert (torch.cat([dv_a, dv_b], 2) - ref_v.grad).abs().max() < 1e-12


def test_check_cp_config_errors():
    check_cp_config(tiny_config(), 4)  # block 16 = 2 x 4 x 2
    check_cp_config(tiny_config(block_size=15, dropout=0.1), 1)  # cp=1 splits nothing: 3d's default
    for config, cp, message in ((tiny_config(), 3, "block_size=16 is not divisible by 2 x cp_size = 6"),
                                (tiny_config(block_size=12), 4, "block_size=12 is not divisible by 2 x cp_size = 8"),
                                (tiny_config(dropout=0.1), 2, "dropout=0.1 is not supported"),
                                (tiny_config(), 0, "cp_size=0 must be >= 1")):
        with pytest.raises(ValueError, match=message) as e:
            check_cp_config(config, cp)
        assert "\n" not in str(e.value)


def test_positions_default_and_explicit():
    """GPT.forward's pos defaults to 0..T-1 (bitwise); a prefix fed with its positions gives the full run's logits
    of those tokens, and other positions (a different distance, for RoPE) give other logits."""
    for block in ("gpt2", "llama"):
        model = GPT(tiny_config(block=block))
        x = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(0))
        full = model(x, x)[0]
        assert torch.equal(full, model(x, x, pos=torch.arange(16))[0])
        prefix = model(x[:, :2], x[:, :2], pos=torch.tensor([0, 1]))[0]
        assert (prefix - full[:, :2]).abs().max() < 1e-6
        moved = model(x[:, :2], x[:, :2], pos=torch.tensor([3, 9]))[0]
        assert (moved[:, 1] - full[:, 1]).abs().max() > 1e-5  # rounding is ~1e-7


# ----------------------------------------------------------------------------------------------------------
# distributed tests


class TestRingAttention(DistributedTestCase):

    def setUp(self):
        if self.world_size not in (2, 4):
            self.skipTest("ring attention at 2 and 4 processes")
        self.comm = TorchCollectives(stats=CommStats())
        self.mesh = init_device_mesh("cpu", (self.world_size,), mesh_dim_names=("cp",))

    def inputs(self, T, seed=0, B=2, H=3, D=8):
        """q, k, v, dout (B, H, T, D) fp64, the same on every rank."""
        g = torch.Generator().manual_seed(seed)
        return [torch.randn(B, H, T, D, generator=g, dtype=torch.float64) for _ in range(4)]

    def ring(self, q, k, v, dout, idx):
        ql, kl, vl = (t[:, :, idx].clone().requires_grad_() for t in (q, k, v))
        out = ring_attention(ql, kl, vl, self.comm)
        out.backward(dout[:, :, idx])
        return out.detach(), ql.grad, kl.grad, vl.grad

    def native(self, q, k, v, dout):
        """torch's context_parallel on F.scaled_dot_product_attention; the (B, H, T, D) tensors are sharded by
        context_parallel itself (its head-tail load balancer), as (B, T, H, D) buffers. Returns (pos, (out, dq, dk,
        dv)) of this rank's tokens."""
        with pytorch_context_parallel(self.mesh, *(t.transpose(1, 2) for t in (q, k, v, dout))) as shards:
            ql, kl, vl, dl = (t.transpose(1, 2) for t in shards[:4])
            ql, kl, vl = (t.clone().requires_grad_() for t in (ql, kl, vl))
            out = F.scaled_dot_product_attention(ql, kl, vl, is_causal=True)
            out.backward(dl)
        return shards[4], (out.detach(), ql.grad, kl.grad, vl.grad)

    def test_forward_backward_equal_full_attention(self):
        """out, dq, dk, dv of this rank's tokens equal plain causal attention over the gathered sequence: in fp64
        within 1e-12 (the algorithm is exact), in fp32 within 1e-6 of the fp64 result (fp32 F.sdpa itself is
        ~5e-7 away from it, so two fp32 results may differ by twice that), in bf16 rounded once."""
        for T in (2 * self.world_size, 16 * self.world_size):
            with self.subTest(T=T):
                q, k, v, dout = self.inputs(T)
                ref = causal_attention(q, k, v, dout)
                idx = zigzag_indices(T, self.world_size, self.rank)
                for dtype, tol in ((torch.float64, 1e-12), (torch.float32, 1e-6)):
                    got = self.ring(*(t.to(dtype) for t in (q, k, v, dout)), idx)
                    for name, a, b in zip(("out", "dq", "dk", "dv"), got, ref):
                        self.assertEqual(a.dtype, dtype)
                        self.assertLess((a.double() - b[:, :, idx]).abs().max().item(), tol, (dtype, name))
                # bf16 inputs, computed in fp32: out is the exact result (from the bf16-rounded inputs) rounded once,
                # within half a bf16 ulp (2^-8 relative, +1e-6 for the fp32 sums); the gradients use that rounded out
                # (in D = rowsum(dO∘O), as FlashAttention does): within 2^-6 of their largest value (F.sdpa's own bf16
                # gradients are as far from the fp64 result: measured dv 1.03e-2 for both, largest value 4.1)
                q16, k16, v16, d16 = (t.bfloat16() for t in (q, k, v, dout))
                ref16 = [t[:, :, idx] for t in causal_attention(*(t.double() for t in (q16, k16, v16, d16)))]
                got16 = self.ring(q16, k16, v16, d16, idx)
                self.assertEqual({t.dtype for t in got16}, {torch.bfloat16})
                self.assertTrue(bool(((got16[0].double() - ref16[0]).abs() <= 2 ** -8 * ref16[0].abs() + 1e-6).all()))
                for name, a, b in zip(("dq", "dk", "dv"), got16[1:], ref16[1:]):
                    self.assertLess((a.double() - b).abs().max().item(), 2 ** -6 * b.abs().max().item(), name)

    def test_bytes_equal_the_ring_formula(self):
        """Sends and receives counted by CommStats for one attention equal ring_send_bytes exactly: forward cp-1
        sends of [K; V] (2·b·(s/cp)·h elements each), backward cp-1 of [K; V] and cp-1 of [dK; dV] (fp32 for fp32 and
        bf16 inputs, fp64 for fp64)."""
        cp = self.world_size
        for dtype in (torch.float32, torch.float64, torch.bfloat16):
            B, H, T, D = 2, 3, 8 * cp, 4
            q, k, v, dout = (t.to(dtype) for t in self.inputs(T, B=B, H=H, D=D))
            idx = zigzag_indices(T, cp, self.rank)
            ql, kl, vl = (t[:, :, idx].clone().requires_grad_() for t in (q, k, v))
            expected = ring_send_bytes(B, T, H * D, cp, element_size=q.element_size())
            self.comm.stats.reset()
            out = ring_attention(ql, kl, vl, self.comm)
            stats = self.comm.stats
            self.assertEqual((stats.calls["send"], stats.calls["recv"]), (cp - 1, cp - 1))
            self.assertEqual(stats.payload["send"], expected["forward"])
            self.assertEqual(stats.payload["recv"], expected["forward"])
            self.comm.stats.reset()
            out.backward(dout[:, :, idx])
            self.assertEqual((stats.calls["send"], stats.calls["recv"]), (2 * (cp - 1), 2 * (cp - 1)))
            self.assertEqual(stats.payload["send"], expected["backward"])
            self.assertEqual(stats.payload["recv"], expected["backward"])
            self.assertEqual(set(stats.calls), {"send", "recv"} if cp > 1 else set())
        # the formula itself, by hand at b=2, s=32, h=12, cp=4, fp32: (4-1)·2·2·8·12 elements = 1152
        self.assertEqual(ring_send_bytes(2, 32, 12, 4), {"forward": 1152 * 4, "backward": 1152 * 8})

    def test_pytorch_native_on_cpu_equals_full_attention_and_custom(self):
        """torch's context_parallel on CPU (its ring template over the CPU flash kernel), fp32: its shards are our
        zigzag; its out and gradients are within 1e-6 of full attention (computed in fp64) and of ours. (Not
        compared in fp64: the template merges blocks in fp32 whatever the input dtype, _cp_options.convert_to_f32.)"""
        for seed in range(3):
            T = 8 * self.world_size
            q, k, v, dout = self.inputs(T, seed=seed)
            ref = causal_attention(q, k, v, dout)
            idx = zigzag_indices(T, self.world_size, self.rank)
            pos, native = self.native(*(t.float() for t in (q, k, v, dout)))
            self.assertTrue(torch.equal(pos, idx))
            custom = self.ring(*(t.float() for t in (q, k, v, dout)), idx)
            for name, a, b, c in zip(("out", "dq", "dk", "dv"), native, ref, custom):
                self.assertEqual(a.dtype, torch.float32)
                self.assertLess((a.double() - b[:, :, idx]).abs().max().item(), 1e-6, (seed, name, "vs full"))
                self.assertLess((a - c).abs().max().item(), 1e-6, (seed, name, "vs custom"))


class TestCPStrategy(DistributedTestCase):
    """parallel=cp (the whole world one CP group) through the Strategy train.py uses, both variants, against the
    single-device run on the same global batch."""

    def setUp(self):
        if self.world_size not in (2, 4):
            self.skipTest("1-D context parallelism at 2 and 4 processes")

    def strategy(self, variant, **overrides):
        return build_strategy(train_config(parallel="cp", variant=variant, gradient_accumulation_steps=2, **overrides),
                              CPU)

    def test_five_steps_equal_single(self):
        """5 AdamW steps of 2 micro-batches (clipping at 1.0 active), GPT-2 and Llama, both variants: every step's
        loss, clipped gradients and update equal the single model's on the global batch from the same state
        (tests/reference.py's rule), and the loss falls."""
        for block in ("gpt2", "llama"):
            model_config = tiny_config(block=block)
            batches = global_batches(5, 2, 4, model_config)
            for variant in VARIANTS:
                with self.subTest(block=block, variant=variant):
                    run = train_checked(self.strategy(variant), model_config, batches)
                    self.assertLess(run.losses[-1], run.losses[0])

    def test_comm_bytes_per_step(self):
        """custom, one step of m micro-batches of b sequences: the ring's sends are m x n_layer x the formula of
        parallel/cp.py (forward + backward: (cp-1)·2·b·(s/cp)·h·(2e + 4) bytes), exactly, and the simulator's CP cost
        is computed from the same bytes; the gradients' all-reduce over the cp group (data parallelism's) is one of
        Psi."""
        for block in ("gpt2", "llama"):
            with self.subTest(block=block):
                model_config = tiny_config(block=block)
                strategy = self.strategy("custom", bucket_cap_mb=1000.0)
                model = strategy.build_model(model_config)
                (step,) = global_batches(1, 2, 4, model_config)
                strategy.stats.reset()
                strategy.forward_backward(step, None)
                ring = ring_send_bytes(4, model_config.block_size, model_config.n_embd, self.world_size)
                psi = sum(p.numel() for p in model.parameters())
                self.assertEqual(strategy.stats.payload["send"], 2 * model_config.n_layer * sum(ring.values()))
                # the simulator's cost of the ring (sim/cost.py) is these bytes
                c = model_config
                simulated = cp_send_bytes(SimModel(c.n_layer, c.n_head, c.n_embd, c.block_size, c.vocab_size,
                                                   block=block), SimParallel(cp=self.world_size, micro_batch=4,
                                                                             dtype="float32"))
                self.assertEqual(simulated, ring)
                self.assertEqual(strategy.stats.payload["recv"], strategy.stats.payload["send"])
                self.assertEqual(strategy.stats.payload["all_reduce"], psi * 4)

    def test_bad_configs_are_one_line_errors(self):
        """Before any collective of the model: block_size not divisible by 2 x cp_size, dropout, a cp_size that is
        not the world."""
        N = self.world_size
        for overrides, pattern in ((dict(block_size=2 * N + 2), "divisible by 2 x cp_size"),
                                   (dict(dropout=0.1), "dropout")):
            for variant in VARIANTS:
                with self.subTest(variant=variant, **overrides):
                    with self.assertRaisesRegex(ValueError, pattern) as cm:
                        self.strategy(variant).build_model(tiny_config(**overrides))
                    self.assertNotIn("\n", str(cm.exception))
        with self.assertRaisesRegex(ValueError, f"cp_size={N + 1} must be 0 or the world size {N}"):
            self.strategy("custom", cp_size=N + 1)
        dist.barrier()

    def test_attention_memory_is_one_cp_th(self):
        """Activation bytes saved for backward per rank: in the attention cores exactly 1/cp of single's (F.sdpa
        saves q, k, v, out, lse of the whole sequence, the ring the same of its tokens); in the attention modules
        and the whole model at most 1/cp of single's, up to a few 0-dim scalars (every other activation is per
        token; single may save one more (B, T, n_embd) copy: the CPU flash kernel lays its output out as
        (B, T, H, D) for some shapes only, the ring always, so the output projection's input is then a view).
        GPT-2 and Llama blocks, the model the custom strategy builds."""
        cp = self.world_size
        for block in ("gpt2", "llama"):
            with self.subTest(block=block):
                model_config = tiny_config(block=block, block_size=64)
                x, y = global_batches(1, 1, 2, model_config)[0][0]
                single = measure_saved_bytes(GPT(model_config), x, y, None)
                strategy = self.strategy("custom")
                ring_model = strategy.build_model(model_config)
                with strategy.micro_batch(x, y) as (xl, yl, kwargs):
                    ring = measure_saved_bytes(ring_model, xl, yl, kwargs["pos"])
                self.assertGreater(single["core"], 0)
                self.assertEqual(ring["core"] * cp, single["core"])
                for scope in ("attention", "model"):
                    self.assertLessEqual(ring[scope] * cp, single[scope] + 16 * cp, scope)


class TestCP3D(DistributedTestCase):
    """Context parallelism as 3d's fourth dimension (dp x pp x cp x tp on one grid), both variants, against single:
    at 4 processes the 2-D cuts cp x dp, cp x tp and cp x pp, at 16 the full dp2 x pp2 x cp2 x tp2."""

    CASES = {  # world size -> [(dp, pp, cp, tp, overrides)]
        4: [(2, 1, 2, 1, dict(dp_type="fsdp")), (2, 1, 2, 1, dict(dp_type="ddp")),
            (1, 1, 2, 2, dict(sequence_parallel=True, loss_parallel=True)), (1, 2, 2, 1, dict(pp_schedule="1f1b"))],
        16: [(2, 2, 2, 2, dict(dp_type="fsdp", sequence_parallel=True, loss_parallel=True))],
    }

    def test_grids_equal_single(self):
        """3 steps on the same global batch, both variants: every step equals the single model's from the same state
        (tests/reference.py's rule; Llama blocks: RoPE at the global positions), and so does an eval loss."""
        model_config = tiny_config(block="llama", n_layer=2, n_head=4, vocab_size=65)
        for dp, pp, cp, tp, overrides in self.CASES.get(self.world_size, []):
            m = 2 * dp
            batches = global_batches(3, m, 2, model_config, seed=dp + pp)
            x, y = batches[0][0]
            for variant in VARIANTS:
                with self.subTest(variant=variant, dp=dp, pp=pp, cp=cp, tp=tp, **overrides):
                    cfg = train_config(parallel="3d", variant=variant, dp_size=dp, pp_size=pp, cp_size=cp, tp_size=tp,
                                       n_layer=model_config.n_layer, gradient_accumulation_steps=m, **overrides)
                    strategy = build_strategy(cfg, CPU)
                    reference = Reference(model_config, cfg)
                    run = train_checked(strategy, model_config, batches, reference)
                    self.assertLess(abs(strategy.eval_loss(x, y).item() - reference.loss(run.params, x, y)), LOSS_TOL)


test_torchrun = torchrun_launcher(__file__, nprocs=(2, 4, 16), timeout_s=600)
