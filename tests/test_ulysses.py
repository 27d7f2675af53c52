"""
Ulysses sequence parallelism (parallel/cp.py, cp_type="ulysses"; DeepSpeed-Ulysses, Jacobs et al. 2023): the
attention core between two all-to-alls against full causal attention (fp64, grouped-query attention too), the bytes
its all-to-alls move against the formula, training through the strategy checked step by step against the single model
(tests/reference.py's train_checked) for the pytorch, custom and triton variants, GPT-2 and Llama blocks, a 4-D cell of
3d (cp x tp, cp x pp), the attention-core memory per rank against ring and single, one-line errors; and the
simulator's Ulysses cost (sim/cost.py) against its formulas.

    torchrun --standalone --nproc_per_node=2 -m unittest tests/test_ulysses.py     (or 4; pytest launches both)
"""

import dataclasses

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

from kernels.comm import CommStats, TorchCollectives
from model import GPT, GPTConfig
from parallel import build_strategy
from parallel.cp import (UlyssesAttentionCore, check_cp_config, gathered_positions, heads_to_sequence,
                         measure_saved_bytes, ring_send_bytes, sequence_to_heads, ulysses_send_bytes, zigzag_indices)
from tests.distributed import DistributedTestCase, torchrun_launcher
from tests.reference import global_batches, tiny_config, train_checked, train_config

CPU = torch.device("cpu")
GQA = "n_kv_head" in {f.name for f in dataclasses.fields(GPTConfig)}  # model.py's grouped-query attention


def causal_core(q, k, v):
    """The model's attention core: causal F.scaled_dot_product_attention, grouped-query when k, v have fewer heads."""
    return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=k.shape[1] != q.shape[1])


def full_attention(q, k, v, dout):
    """causal_core over the whole sequence and its gradients by autograd: (out, dq, dk, dv)."""
    q, k, v = (t.detach().clone().requires_grad_() for t in (q, k, v))
    out = causal_core(q, k, v)
    out.backward(dout)
    return out.detach(), q.grad, k.grad, v.grad


# ----------------------------------------------------------------------------------------------------------
# plain tests (no process group)


def all_to_all_by_hand(fn, inputs, arg, cp):
    """fn(x, cp, exchange, arg) on each of cp simulated ranks (inputs[r] is rank r's x), the all-to-all done by hand:
    a first pass records every rank's send, a second hands rank r chunk r of every send, in rank order."""
    sends = []
    for x in inputs:
        fn(x, cp, lambda send: sends.append(send) or torch.zeros_like(send), arg)
    return [fn(x, cp, lambda send, r=r: torch.stack([s[r] for s in sends]), arg) for r, x in enumerate(inputs)]


def test_the_two_all_to_alls_are_inverse_layouts():
    """sequence_to_heads gives rank r every token, in sequence order, of head group r; heads_to_sequence brings
    the result back to every rank's zigzag tokens of all heads (cp = 4 simulated ranks in one process)."""
    cp, B, H, D, T = 4, 2, 8, 3, 16
    full = torch.randn(B, H, T, D, dtype=torch.float64)
    mine = [full[:, :, zigzag_indices(T, cp, r)] for r in range(cp)]
    positions = gathered_positions(T, cp)
    heads = all_to_all_by_hand(sequence_to_heads, mine, torch.argsort(positions), cp)
    for r in range(cp):
        assert torch.equal(heads[r], full[:, r * H // cp:(r + 1) * H // cp])
    back = all_to_all_by_hand(heads_to_sequence, heads, positions, cp)
    for r in range(cp):
        assert torch.equal(back[r], mine[r])


def test_check_cp_config_ulysses_errors():
    """Ulysses needs the heads divisible by tp·cp (the heads of a TP rank divided among its CP ranks), and a known
    cp_type; ring does not."""
    check_cp_config(tiny_config(n_head=4), 4, "ulysses")
    check_cp_config(tiny_config(n_head=2), 4, "ring")
    check_cp_config(tiny_config(n_head=4), 2, "ulysses", tp=2)
    for config, cp, tp, message in (
            (tiny_config(n_head=2), 4, 1, "n_head=2 is not divisible by cp_size=4"),
            (tiny_config(n_head=4), 4, 2, "n_head=4 is not divisible by tp_size=2 x cp_size=4 = 8")):
        with pytest.raises(ValueError, match=message) as e:
            check_cp_config(config, cp, "ulysses", tp)
        assert "\n" not in str(e.value) and "cp_type='ring'" in str(e.value)
    with pytest.raises(ValueError, match="cp_type must be one of ring, ulysses, got 'star'"):
        check_cp_config(tiny_config(), 2, "star")
    if GQA:
        with pytest.raises(ValueError, match="n_kv_head=2 is not divisible by cp_size=4"):
            check_cp_config(tiny_config(n_head=4, n_kv_head=2), 4, "ulysses")


def test_ulysses_bytes_formula():
    """By hand at b=2, s=32, h=12 (h_kv=12 and 6), cp=4: each all-to-all of a (b, s/cp, w) tensor sends (cp-1)/cp
    of it, (4-1)·2·8·w/4 elements: q, k, v and the output 3·2·8·(12+12+12+12)/4 = 576 elements (fp32), as many in
    backward; with h_kv=6 3·2·8·36/4 = 432 (bf16)."""
    assert ulysses_send_bytes(2, 32, 12, 12, 4) == {"forward": 576 * 4, "backward": 576 * 4}
    assert ulysses_send_bytes(2, 32, 12, 6, 4, element_size=2) == {"forward": 432 * 2, "backward": 432 * 2}
    assert ulysses_send_bytes(2, 32, 12, 12, 1) == {"forward": 0, "backward": 0}
    # 4·b·s·h·(cp-1)/cp² per direction, against the ring's 2·b·s·h·(cp-1)/cp forward
    b, s, h, cp = 2, 64, 16, 8
    assert ulysses_send_bytes(b, s, h, h, cp)["forward"] == 4 * 4 * b * s * h * (cp - 1) // cp ** 2
    assert ring_send_bytes(b, s, h, cp)["forward"] == 4 * 2 * b * s * h * (cp - 1) // cp


# ----------------------------------------------------------------------------------------------------------
# the simulator (sim/cost.py, sim/planner.py, sim/__main__.py)


def sim_cluster(**changes):
    """The A100 preset with round numbers on the links: intra-node 100 GB/s and 5 us, no efficiency factor."""
    from sim.cluster import PRESETS, Link
    return dataclasses.replace(PRESETS["a100-80gb"], intra=Link(100e9, 5e-6), inter=Link(10e9, 20e-6),
                               link_efficiency=1.0, **changes)


def test_sim_all_to_all_alpha_beta():
    """An all-to-all over n ranks of one rank's S bytes: n-1 messages of S/n, (n-1)·alpha + (n-1)/n·S/beta; across
    nodes each rank's NIC carries its own off-node chunks (the inter link, not multiplied by members per node)."""
    from sim.cluster import Link
    from sim.cost import collective_time
    for n in (2, 4, 8):
        S, beta, alpha = 3e6, 50e9, 4e-6
        assert collective_time("all_to_all", S, n, Link(beta, alpha)) == pytest.approx(
            (n - 1) * alpha + (n - 1) / n * S / beta, rel=1e-12)
    cluster = sim_cluster().sized(16)
    assert cluster.group_link(range(16), "all_to_all").bandwidth == 10e9
    assert cluster.group_link(range(16), "all_gather").bandwidth == 80e9  # a ring: 8 NICs per node


@pytest.mark.parametrize("tp, cp, n_kv_head", [(1, 2, 0), (1, 4, 0), (2, 2, 0), (2, 4, 8), (1, 8, 8)])
def test_sim_ulysses_formulas(tp, cp, n_kv_head):
    """The simulator's Ulysses: the bytes per layer are the trainer's ulysses_send_bytes (per TP rank: h/t, h_kv/t);
    a layer's exposed CP time is four all-to-alls each way, S = b·(s/c)·w/t·B bytes each (w = h twice, h_kv twice);
    attention activations equal the ring's with flash attention and add F.sdpa's scores (a/(t·c) heads of s x s per
    micro-batch, a·s·B/t per token) without it; the core's FLOPs equal the ring's."""
    from sim.cost import Model, Parallel, build_costs, collective_time, cp_send_bytes, layer_activation_bytes
    model = Model(n_layer=4, n_head=16, n_embd=1024, seq_len=4096, vocab_size=32000, block="llama",
                  n_kv_head=n_kv_head)
    cluster = sim_cluster().sized(tp * cp)
    par = Parallel(tp=tp, cp=cp, cp_type="ulysses", micro_batch=2, sequence_parallel=tp > 1)
    ring = dataclasses.replace(par, cp_type="ring")
    h, h_kv, b, s, B = model.n_embd, model.n_kv_head * 64, 2, model.seq_len, 2
    assert cp_send_bytes(model, par) == ulysses_send_bytes(b, s, h // tp, h_kv // tp, cp, B)
    link = cluster.group_link(par.groups()["cp"], "all_to_all")
    sizes = [b * s // cp * w // tp * B for w in (h, h_kv, h_kv, h)]
    four = sum(collective_time("all_to_all", S, cp, link) for S in sizes)
    assert four == pytest.approx(sum((cp - 1) * 5e-6 + (cp - 1) / cp * S / 100e9 for S in sizes), rel=1e-12)
    costs = build_costs(model, par, cluster)
    assert dict(costs.layer_forward)["cp"] == pytest.approx(four, rel=1e-12)
    assert dict(costs.layer_backward)["cp"] == pytest.approx(four, rel=1e-12)
    assert layer_activation_bytes(model, par) == layer_activation_bytes(model, ring)
    naive = dataclasses.replace(par, flash_attention=False)
    tokens = b * s / cp
    assert layer_activation_bytes(model, naive) == pytest.approx(
        layer_activation_bytes(model, ring) + tokens * model.n_head * s * B / tp, rel=1e-12)
    flat = dataclasses.replace(cluster, matmul_efficiency=0.5)  # the flat model: FLOPs are FLOPs
    core = {p.cp_type: build_costs(model, p, flat) for p in (par, ring)}
    assert dict(core["ulysses"].layer_forward)["forward"] == pytest.approx(
        dict(core["ring"].layer_forward)["forward"], rel=1e-12)


def test_sim_ulysses_checks_and_planner():
    """A layout whose heads tp·cp does not divide is a one-line error; the planner searches Ulysses beside the
    ring where the query and key/value heads allow it, and sim/__main__.py takes cp_type from train.py's keys."""
    import sim.__main__ as simulate
    from sim.cost import Model, Parallel
    from sim.planner import context_layouts
    model = Model(n_layer=4, n_head=12, n_embd=768, seq_len=1024, vocab_size=1000, n_kv_head=4)
    with pytest.raises(ValueError, match="n_head=12 and n_kv_head=4 divisible by tp x cp = 8"):
        Parallel(cp=8, cp_type="ulysses").check(model)
    with pytest.raises(ValueError, match="cp_type must be one of ring, ulysses"):
        Parallel(cp=2, cp_type="star").check(model)
    assert context_layouts(model, 1) == [(1, "ring"), (2, "ring"), (2, "ulysses"), (4, "ring"), (4, "ulysses"),
                                         (8, "ring")]
    assert context_layouts(model, 2) == [(1, "ring"), (2, "ring"), (2, "ulysses"), (4, "ring"), (8, "ring")]
    assert simulate.main(["config/train_shakespeare_char_cpu.py", "--cluster=h100-sxm", "--gpus=2", "--cp_size=2",
                          "--cp_type=ulysses", "--gradient_accumulation_steps=1"]) == 0


# ----------------------------------------------------------------------------------------------------------
# distributed tests


class TestUlyssesCore(DistributedTestCase):
    """UlyssesAttentionCore on this rank's zigzag tokens, over our Collectives (custom) and over torch's autograd-aware
    all_to_all_single (pytorch), against causal attention over the whole sequence."""

    @classmethod
    def setUpClass(cls):
        super().setUpClass()
        cls.comm = TorchCollectives(stats=CommStats())

    def inputs(self, T, H, H_kv, B=2, D=4, dtype=torch.float64, seed=0):
        """q, dout (B, H, T, D) and k, v (B, H_kv, T, D), the same on every rank."""
        g = torch.Generator().manual_seed(seed)
        q, dout = (torch.randn(B, H, T, D, generator=g, dtype=dtype) for _ in range(2))
        k, v = (torch.randn(B, H_kv, T, D, generator=g, dtype=dtype) for _ in range(2))
        return q, k, v, dout

    def run_core(self, core, q, k, v, dout):
        """core on this rank's tokens of q, k, v; (out, dq, dk, dv) of those tokens."""
        idx = zigzag_indices(q.shape[2], self.world_size, self.rank)
        ql, kl, vl = (t[:, :, idx].clone().requires_grad_() for t in (q, k, v))
        out = core(ql, kl, vl)
        out.backward(dout[:, :, idx])
        return out.detach(), ql.grad, kl.grad, vl.grad

    def test_equals_full_attention(self):
        """out, dq, dk, dv of this rank's tokens equal causal attention over the whole sequence within 1e-12 (fp64;
        each head's attention is the same computation on every rank's tokens, in another layout), both variants,
        multi-head (H = H_kv = 2·cp) and grouped-query (H = 2·cp, H_kv = cp) attention, two sequence lengths."""
        cp = self.world_size
        cores = {"custom": UlyssesAttentionCore(causal_core, comm=self.comm),
                 "pytorch": UlyssesAttentionCore(causal_core, group=dist.group.WORLD)}
        for variant, core in cores.items():
            for H_kv in (2 * cp, cp):
                for T in (2 * cp, 8 * cp):
                    with self.subTest(variant=variant, H_kv=H_kv, T=T):
                        q, k, v, dout = self.inputs(T, 2 * cp, H_kv, seed=T + H_kv)
                        ref = full_attention(q, k, v, dout)
                        got = self.run_core(core, q, k, v, dout)
                        idx = zigzag_indices(T, cp, self.rank)
                        for name, a, b in zip(("out", "dq", "dk", "dv"), got, ref):
                            self.assertEqual(a.shape, b[:, :, idx].shape)
                            self.assertLess((a - b[:, :, idx]).abs().max().item(), 1e-12, name)

    def test_bytes_equal_the_formula(self):
        """The custom core's all-to-alls counted by CommStats: 4 in forward (q, k, v, the output) and 4 in backward
        (the output's gradient, then q's, k's, v's), each sending (cp-1)/cp of its b·(s/cp)·w elements: the bus bytes
        of each direction are ulysses_send_bytes, exactly: 4·b·s·h·(cp-1)/cp² elements for multi-head attention,
        (2·h + 2·h_kv)·b·s·(cp-1)/cp² for grouped-query. fp32 and bf16."""
        cp, B, T, D = self.world_size, 2, 8 * self.world_size, 4
        core = UlyssesAttentionCore(causal_core, comm=self.comm)
        stats = self.comm.stats
        for dtype in (torch.float32, torch.bfloat16):
            for H, H_kv in ((2 * cp, 2 * cp), (2 * cp, cp)):
                with self.subTest(dtype=dtype, H=H, H_kv=H_kv):
                    q, k, v, dout = self.inputs(T, H, H_kv, B=B, D=D, dtype=dtype)
                    idx = zigzag_indices(T, cp, self.rank)
                    ql, kl, vl = (t[:, :, idx].clone().requires_grad_() for t in (q, k, v))
                    expected = ulysses_send_bytes(B, T, H * D, H_kv * D, cp, element_size=q.element_size())
                    stats.reset()
                    out = core(ql, kl, vl)
                    self.assertEqual(stats.calls["all_to_all"], 4)
                    self.assertEqual(stats.bus["all_to_all"], expected["forward"])
                    self.assertEqual(stats.payload["all_to_all"], (2 * H + 2 * H_kv) * D * B * (T // cp) *
                                     q.element_size())
                    stats.reset()
                    out.backward(dout[:, :, idx])
                    self.assertEqual(stats.calls["all_to_all"], 4)
                    self.assertEqual(stats.bus["all_to_all"], expected["backward"])
                    self.assertEqual(set(stats.calls), {"all_to_all"})
                    elements = (2 * H * D + 2 * H_kv * D) * B * T * (cp - 1) // cp ** 2
                    self.assertEqual(expected["forward"], elements * q.element_size())

    def test_head_count_not_divisible_is_a_one_line_error(self):
        """A core called with heads that cp does not divide raises before its all-to-all, on every rank."""
        cp = self.world_size
        core = UlyssesAttentionCore(causal_core, comm=self.comm)
        q = torch.zeros(1, cp + 1, 2 * cp, 4)
        with self.assertRaisesRegex(ValueError, f"{cp + 1} query heads on this rank are not divisible by "
                                                f"cp_size={cp}") as e:
            core(q, q, q)
        self.assertNotIn("\n", str(e.exception))


class TestUlyssesStrategy(DistributedTestCase):
    """parallel=cp with cp_type=ulysses (the whole world one CP group) through the Strategy train.py uses."""

    def strategy(self, variant, **overrides):
        return build_strategy(train_config(parallel="cp", cp_type="ulysses", variant=variant,
                                           gradient_accumulation_steps=2, **overrides), CPU)

    def test_training_equals_single(self):
        """3 AdamW steps of 2 micro-batches (clipping active), every step's loss, clipped gradients and update checked
        against the single model (train_checked), pytorch and custom, GPT-2 and Llama blocks with 4 heads; triton 2
        steps on the Llama block at 2 processes (at 4 the interpreter takes 16 s; tests/test_all_to_all.py runs its
        all-to-all at 4); once model.py has grouped-query attention, custom with 8 query heads and cp key/value
        heads. The loss falls."""
        cases = [(v, block, 3, dict(n_head=4)) for v in ("pytorch", "custom") for block in ("gpt2", "llama")]
        if self.world_size == 2:
            cases.append(("triton", "llama", 2, dict(n_head=4)))
        if GQA:
            cases.append(("custom", "llama", 3, dict(n_head=8, n_kv_head=self.world_size)))
        for variant, block, steps, heads in cases:
            with self.subTest(variant=variant, block=block, **heads):
                model_config = tiny_config(block=block, **heads)
                batches = global_batches(steps, 2, 2, model_config, seed=steps)
                checked = train_checked(self.strategy(variant), model_config, batches)
                self.assertLess(checked.losses[-1], checked.losses[0])

    def test_comm_bytes_per_step(self):
        """custom, one step of m micro-batches: the all-to-alls' bus bytes are m x n_layer x (forward + backward) of
        ulysses_send_bytes, exactly, 8 calls per layer and micro-batch, and the simulator's CP bytes
        (sim/cost.py's cp_send_bytes with cp_type="ulysses") are the same formula."""
        from sim.cost import Model as SimModel, Parallel as SimParallel, cp_send_bytes
        model_config = tiny_config(block="llama", n_head=4)
        strategy = self.strategy("custom")
        strategy.build_model(model_config)
        (step,) = global_batches(1, 2, 2, model_config)
        strategy.stats.reset()
        strategy.forward_backward(step, None)
        c, cp = model_config, self.world_size
        formula = ulysses_send_bytes(2, c.block_size, c.n_embd, c.n_embd, cp)
        self.assertEqual(strategy.stats.bus["all_to_all"], 2 * c.n_layer * sum(formula.values()))
        self.assertEqual(strategy.stats.calls["all_to_all"], 2 * c.n_layer * 8)
        simulated = cp_send_bytes(SimModel(c.n_layer, c.n_head, c.n_embd, c.block_size, c.vocab_size, block="llama"),
                                  SimParallel(cp=cp, cp_type="ulysses", micro_batch=2, dtype="float32"))
        self.assertEqual(simulated, formula)

    def test_attention_core_memory_is_one_cp_th_as_ring(self):
        """Activation bytes saved for backward per rank inside the attention cores: Ulysses (custom) saves exactly
        what the ring saves, 1/cp of single's (F.sdpa's q, k, v, out, lse of s tokens for 1/cp of the heads, against
        the ring's of s/cp tokens for all heads); the pytorch variant the same plus the two index tensors per layer
        that autograd keeps for its reorderings (2·s int64). In the attention modules Ulysses keeps one more
        b·(s/cp)·h tensor per layer than the ring: the output of the second all-to-all, the out-projection's saved
        input (the ring's output is the tensor its core saves, laid out so that the projection's input is a view)."""
        cp = self.world_size
        model_config = tiny_config(block="llama", n_head=4, block_size=64)
        x, y = global_batches(1, 1, 2, model_config)[0][0]
        single = measure_saved_bytes(GPT(model_config), x, y, None)["core"]
        saved, attention = {}, {}
        for name, cp_type, variant in (("ring", "ring", "custom"), ("ulysses", "ulysses", "custom"),
                                       ("ulysses pytorch", "ulysses", "pytorch")):
            strategy = build_strategy(train_config(parallel="cp", cp_type=cp_type, variant=variant), CPU)
            model = strategy.build_model(model_config)
            with strategy.micro_batch(x, y) as (xl, yl, kwargs):
                measured = measure_saved_bytes(model, xl, yl, kwargs["pos"])
            saved[name], attention[name] = measured["core"], measured["attention"]
        self.assertGreater(single, 0)
        self.assertEqual(saved["ulysses"] * cp, single)
        self.assertEqual(saved["ulysses"], saved["ring"])
        L, s, b, h = model_config.n_layer, model_config.block_size, 2, model_config.n_embd
        self.assertEqual(saved["ulysses pytorch"], saved["ulysses"] + L * 2 * s * 8)
        self.assertEqual(attention["ulysses"], attention["ring"] + L * b * (s // cp) * h * 4)

    def test_bad_configs_are_one_line_errors(self):
        """Before any collective of the model: heads not divisible by cp (4-rank: 2 heads; 2-rank: 3 heads), an
        unknown cp_type."""
        N = self.world_size
        config = tiny_config(n_head=2) if N == 4 else tiny_config(n_head=3, n_embd=24)
        for variant in ("custom", "pytorch"):
            with self.subTest(variant=variant):
                with self.assertRaisesRegex(ValueError, f"n_head={config.n_head} is not divisible by cp_size={N}") as e:
                    self.strategy(variant).build_model(config)
                self.assertNotIn("\n", str(e.exception))
        with self.assertRaisesRegex(ValueError, "cp_type must be one of ring, ulysses"):
            build_strategy(train_config(parallel="cp", cp_type="star"), CPU).build_model(tiny_config())
        dist.barrier()


class TestUlysses3D(DistributedTestCase):
    """Ulysses as 3d's fourth dimension at 4 processes, both variants, checked step by step against single: cp2 x tp2
    (the heads split by TP, then by CP: 4 heads, one per rank; sequence parallel and loss parallel) and pp2 x cp2."""

    CASES = [(1, 1, 2, 2, dict(sequence_parallel=True, loss_parallel=True)), (1, 2, 2, 1, dict(pp_schedule="1f1b"))]

    def setUp(self):
        if self.world_size != 4:
            self.skipTest("the 4-D cells at 4 processes")

    def test_grids_equal_single(self):
        model_config = tiny_config(block="llama", n_layer=2, n_head=4, vocab_size=65)
        for dp, pp, cp, tp, overrides in self.CASES:
            for variant in ("custom", "pytorch"):
                with self.subTest(variant=variant, dp=dp, pp=pp, cp=cp, tp=tp):
                    batches = global_batches(2, 2, 2, model_config, seed=pp)
                    cfg = train_config(parallel="3d", variant=variant, cp_type="ulysses", dp_size=dp, pp_size=pp,
                                       cp_size=cp, tp_size=tp, n_layer=model_config.n_layer,
                                       gradient_accumulation_steps=2, **overrides)
                    checked = train_checked(build_strategy(cfg, CPU), model_config, batches)
                    self.assertLess(checked.losses[-1], checked.losses[0])

    def test_heads_not_divisible_by_tp_cp(self):
        """2 heads over tp2 x cp2: one line naming both sizes, before any collective."""
        cfg = train_config(parallel="3d", variant="custom", cp_type="ulysses", cp_size=2, tp_size=2,
                           gradient_accumulation_steps=1)
        with self.assertRaisesRegex(ValueError, "n_head=2 is not divisible by tp_size=2 x cp_size=2 = 4") as e:
            build_strategy(cfg, CPU).build_model(tiny_config(n_head=2))
        self.assertNotIn("\n", str(e.exception))
        dist.barrier()


test_torchrun = torchrun_launcher(__file__, nprocs=(2, 4))
