"""
Tensor parallel, both variants, against the single-device reference and against each other (CPU, gloo): the custom
layers against nn.Linear / nn.Embedding / F.cross_entropy, whole-model training with and without sequence and
loss parallelism, the bytes each micro-batch moves, bad configs, and DCP checkpoints.

    torchrun --standalone --nproc_per_node=2 -m unittest tests/test_tp.py     (or 4; pytest launches both)
"""

import os
import tempfile

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from model import GPT
from parallel import build_strategy, load_checkpoint_file
from parallel import checkpoint as ckpt_module
from kernels.comm import TorchCollectives
from parallel.tp import (ColumnParallelLinear, RowParallelLinear, VocabParallelEmbedding, chunk_bounds,
                         enter_tp_region, vocab_parallel_cross_entropy)
from tests.distributed import DistributedTestCase, torchrun_launcher
from tests.reference import (Reference, checked_step, global_batches, max_param_diff, tiny_config, train_checked,
                             train_config)

CPU = torch.device("cpu")
VARIANTS = ("custom", "pytorch")
LAYOUTS = [(sp, lp) for sp in (False, True) for lp in (False, True)]


def tp_tiny(**overrides):
    """tests/reference.py's tiny GPT with 4 heads (TP=4 needs them)."""
    return tiny_config(**{"n_head": 4, **overrides})


def chunk(t, dim, comm):
    s, e = chunk_bounds(t.shape[dim], comm.world_size, comm.rank)
    return t.narrow(dim, s, e - s)


class TestTPLayers(DistributedTestCase):
    """Each custom layer, with weights sliced from a reference module, matches it (1e-6) in outputs, input
    gradients and weight gradients, with and without sequence parallelism."""

    def setUp(self):
        self.comm = TorchCollectives()
        torch.manual_seed(0)  # the reference modules' init: the same on every rank
        self.g = torch.Generator().manual_seed(0)
        self.B, self.T = 2, 4 * self.world_size

    def randn(self, *shape):
        return torch.randn(*shape, generator=self.g)

    def seq(self, t, sp):
        """What this rank holds of a (B, T, ...) activation: all of it, or its sequence chunk with SP."""
        return chunk(t, 1, self.comm) if sp else t

    def test_column_then_row_parallel_linear(self):
        """Column-parallel (gathered or not) feeding row-parallel equals nn.Linear -> GELU -> nn.Linear."""
        h, f = 8, 12 * self.world_size
        for sp in (False, True):
            with self.subTest(sp=sp):
                ref1, ref2 = nn.Linear(h, f), nn.Linear(f, h)
                col = ColumnParallelLinear(h, f, self.comm, sequence_parallel=sp)
                row = RowParallelLinear(f, h, self.comm, sequence_parallel=sp)
                with torch.no_grad():
                    col.weight.copy_(chunk(ref1.weight, 0, self.comm))
                    col.bias.copy_(chunk(ref1.bias, 0, self.comm))
                    row.weight.copy_(chunk(ref2.weight, 1, self.comm))
                    row.bias.copy_(ref2.bias)
                x = self.randn(self.B, self.T, h).requires_grad_()
                dy = self.randn(self.B, self.T, h)
                y_ref = ref2(F.gelu(ref1(x)))
                y_ref.backward(dy)
                x_local = self.seq(x.detach(), sp).requires_grad_()
                y = row(F.gelu(col(x_local)))
                y.backward(self.seq(dy, sp))
                self.assertLess((y - self.seq(y_ref, sp)).abs().max().item(), 1e-6)
                self.assertLess((x_local.grad - self.seq(x.grad, sp)).abs().max().item(), 1e-6)
                for mine, ref, dim in ((col.weight, ref1.weight, 0), (col.bias, ref1.bias, 0),
                                       (row.weight, ref2.weight, 1)):
                    self.assertLess((mine.grad - chunk(ref.grad, dim, self.comm)).abs().max().item(), 1e-6)
                bias_grad = row.bias.grad.clone()
                if sp:  # the bias saw only this rank's positions: the strategy sums these over TP
                    dist.all_reduce(bias_grad)
                self.assertLess((bias_grad - ref2.bias.grad).abs().max().item(), 1e-6)

    def test_column_parallel_gather_output_uneven(self):
        """gather_output on an output size the TP size does not divide (torch.chunk's split)."""
        h, v = 8, 5 * self.world_size + 1
        ref = nn.Linear(h, v, bias=False)
        col = ColumnParallelLinear(h, v, self.comm, bias=False, gather_output=True)
        with torch.no_grad():
            col.weight.copy_(chunk(ref.weight, 0, self.comm))
        x = self.randn(self.B, self.T, h).requires_grad_()
        dy = self.randn(self.B, self.T, v)
        ref(x).backward(dy)
        x2 = x.detach().clone().requires_grad_()
        y = col(x2)
        y.backward(dy)
        self.assertLess((y - ref(x)).abs().max().item(), 1e-6)
        self.assertLess((x2.grad - x.grad).abs().max().item(), 1e-6)
        self.assertLess((col.weight.grad - chunk(ref.weight.grad, 0, self.comm)).abs().max().item(), 1e-6)

    def test_vocab_parallel_embedding(self):
        for v in (16 * self.world_size, 16 * self.world_size + 1):
            with self.subTest(vocab=v):
                ref = nn.Embedding(v, 8)
                emb = VocabParallelEmbedding(v, 8, self.comm)
                with torch.no_grad():
                    emb.weight.copy_(chunk(ref.weight, 0, self.comm))
                idx = torch.randint(0, v, (self.B, self.T), generator=self.g)
                dy = self.randn(self.B, self.T, 8)
                y_ref = ref(idx)
                y_ref.backward(dy)
                y = emb(idx)
                y.backward(dy)
                self.assertLess((y - y_ref).abs().max().item(), 1e-6)
                self.assertLess((emb.weight.grad - chunk(ref.weight.grad, 0, self.comm)).abs().max().item(), 1e-6)

    def test_vocab_parallel_cross_entropy(self):
        """Loss and logit gradients equal F.cross_entropy's on the full logits, with ignored targets (-1) and an
        uneven vocabulary split."""
        for v in (16 * self.world_size, 16 * self.world_size + 3):
            with self.subTest(vocab=v):
                logits = (3 * self.randn(self.B, self.T, v)).requires_grad_()
                target = torch.randint(0, v, (self.B, self.T), generator=self.g)
                target[0, :3] = -1
                loss_ref = F.cross_entropy(logits.view(-1, v), target.view(-1), ignore_index=-1)
                loss_ref.backward()
                start = chunk_bounds(v, self.world_size, self.rank)[0]
                local = chunk(logits.detach(), -1, self.comm).clone().requires_grad_()
                loss = vocab_parallel_cross_entropy(local, target, start, self.comm)
                (2 * loss).backward()
                self.assertLess(abs(loss.item() - loss_ref.item()), 1e-6)
                self.assertLess((local.grad - 2 * chunk(logits.grad, -1, self.comm)).abs().max().item(), 1e-6)

    def test_copy_to_tp_region_all_reduces_gradient(self):
        x = torch.ones(2, 3, requires_grad=True)
        enter_tp_region(x, self.comm, False).sum().backward()
        self.assertTrue(torch.equal(x.grad, torch.full((2, 3), float(self.world_size))))


class TestTPModel(DistributedTestCase):

    def tp(self, variant, sp=False, lp=False, **overrides):
        cfg = train_config(parallel="tp", variant=variant, sequence_parallel=sp, loss_parallel=lp,
                           gradient_accumulation_steps=2, **overrides)
        return build_strategy(cfg, CPU)

    def test_five_steps_equal_single(self):
        """5 steps of 2 micro-batches (grad clipping at 1.0 active), both variants with and without SP and loss
        parallel, GPT-2 and Llama-style blocks: the shards are slices of the single model's init, and every step's
        loss, clipped gradients and update equal the single model's from the same state (tests/reference.py)."""
        for block in ("gpt2", "llama"):
            model_config = tp_tiny(block=block)
            batches = global_batches(5, 2, 4, model_config)
            for sp, lp in LAYOUTS:
                for variant in VARIANTS:
                    with self.subTest(block=block, variant=variant, sp=sp, lp=lp):
                        run = train_checked(self.tp(variant, sp, lp), model_config, batches)
                        self.assertLess(run.losses[-1], run.losses[0])

    def test_uneven_vocab(self):
        """A vocabulary the TP size does not divide (65 characters, as Shakespeare's) splits by torch.chunk's
        rule; every step equals the single model's (tests/reference.py's rule)."""
        model_config = tp_tiny(vocab_size=65)
        batches = global_batches(5, 2, 4, model_config)
        for variant in VARIANTS:
            for sp, lp in ((False, False), (True, True)):
                with self.subTest(variant=variant, sp=sp, lp=lp):
                    train_checked(self.tp(variant, sp, lp), model_config, batches)

    def test_tied_and_sharded(self):
        """The head stays tied to the embedding, and each rank holds 1/N of every matmul weight."""
        model_config = tp_tiny()
        for variant in VARIANTS:
            with self.subTest(variant=variant):
                model = self.tp(variant).build_model(model_config)
                self.assertIs(model.lm_head.weight, model.transformer.wte.weight)
                w = model.transformer.h["0"].attn.q_proj.weight
                w = w.to_local() if hasattr(w, "to_local") else w
                self.assertEqual(tuple(w.shape), (32 // self.world_size, 32))

    def test_comm_bytes_per_micro_batch(self):
        """custom: one micro-batch's forward+backward moves exactly the module docstring's bytes (within 1%):
        per layer 2 all-reduces of b·s·h forward and 2 backward, or with SP 4 all-gathers + 4 reduce-scatters of
        b·s·h (the same bus volume), plus the embedding, the head and the loss."""
        for block in ("gpt2", "llama"):
            model_config = tp_tiny(block=block)
            ((x, y),) = global_batches(1, 1, 3, model_config)[0]
            b, s, h, V, L = (3, model_config.block_size, model_config.n_embd, model_config.vocab_size,
                             model_config.n_layer)
            bsh = b * s * h * 4  # bytes, fp32
            for sp, lp in LAYOUTS:
                with self.subTest(block=block, sp=sp, lp=lp):
                    strategy = self.tp("custom", sp, lp)
                    model = strategy.build_model(model_config)
                    strategy.stats.reset()
                    strategy.forward_backward([(x, y)], torch.amp.GradScaler("cpu", enabled=False))
                    expect = {"all_reduce": bsh}  # embedding, forward
                    if sp:
                        expect["all_gather"] = 4 * L * bsh + bsh + bsh  # blocks; split's grad; head input
                        expect["reduce_scatter"] = 4 * L * bsh + bsh  # blocks; head input's grad
                        sp_params = sum(p.numel() for p in strategy.sp_params) * 4
                        expect["all_reduce"] += sp_params
                    else:
                        expect["all_reduce"] += 4 * L * bsh + bsh  # blocks; head input's grad
                    if lp:
                        expect["all_reduce"] += 3 * b * s * 4  # max, [sum-exp, target logit]
                    else:
                        expect["all_gather"] = expect.get("all_gather", 0) + b * s * V * 4  # the logits
                    self.assertEqual(set(strategy.stats.payload), set(expect))
                    for op, nbytes in expect.items():
                        self.assertAlmostEqual(strategy.stats.payload[op] / nbytes, 1.0, delta=0.01, msg=op)
                    # the blocks' share alone is the Megatron figure: 4·L tensors of b·s·h, as all-reduce bus bytes
                    N = self.world_size
                    bus = sum(strategy.stats.bus.values())
                    block_bus = 4 * L * bsh * 2 * (N - 1) / N
                    self.assertGreater(bus, block_bus)
                    model.zero_grad(set_to_none=True)

    def test_bad_configs_are_one_line_errors(self):
        """Each unsplittable config is a ValueError naming the numbers, raised on every rank before any
        collective (the barrier after each proves no rank is left waiting)."""
        N = self.world_size
        cases = [
            ("n_head", dict(n_head=N + 1, n_embd=8 * (N + 1)), {}, rf"n_head={N + 1} .* TP size {N}"),
            ("ffn_hidden", dict(ffn_hidden=4 * N + 1), {}, rf"ffn_hidden={4 * N + 1} .* TP size {N}"),
            ("vocab", dict(vocab_size=N - 1), {}, rf"vocab_size={N - 1} cannot be split in {N}"),
            ("sequence", dict(block_size=4 * N + 1), dict(sp=True), rf"block_size={4 * N + 1} .* TP size {N}"),
        ]
        for variant in VARIANTS:
            for what, model_overrides, kw, pattern in cases:
                with self.subTest(variant=variant, what=what):
                    with self.assertRaisesRegex(ValueError, pattern) as cm:
                        self.tp(variant, **kw).build_model(tp_tiny(**model_overrides))
                    self.assertNotIn("\n", str(cm.exception))
                    dist.barrier()
            with self.subTest(variant=variant, what="tp_size"):
                with self.assertRaisesRegex(ValueError, rf"tp_size={N + 1} must be 0 or the world size {N}"):
                    self.tp(variant, tp_size=N + 1)
                dist.barrier()

    def test_checkpoint_save_convert_load(self):
        """A DCP checkpoint of either variant: converts to a single-file checkpoint equal to full_state_dict that
        GPT (single, sample.py) loads; loads into the other variant (and SP layout), which then trains on exactly as
        the saving run does."""
        model_config = tp_tiny(block="llama")
        batches = global_batches(4, 2, 4, model_config)
        shared = [tempfile.mkdtemp() if self.rank == 0 else None]
        dist.broadcast_object_list(shared)
        for saver, loader in (("custom", "pytorch"), ("pytorch", "custom")):
            with self.subTest(saver=saver, loader=loader):
                path = os.path.join(shared[0], f"ckpt-{saver}")
                a = self.tp(saver)
                opt_a = train_checked(a, model_config, batches[:2]).optimizer
                extra = {"model_args": vars(model_config), "iter_num": 2, "config": vars(a.cfg)}
                a.save_checkpoint(path, opt_a, extra)
                full = a.full_state_dict()
                ckpt = load_checkpoint_file(path)
                self.assertEqual(ckpt["iter_num"], 2)
                self.assertEqual(max_param_diff(ckpt["model"], full), 0.0)
                single = GPT(model_config)
                single.load_state_dict(ckpt["model"])
                if self.rank == 0:  # the command-line converter
                    self.assertEqual(ckpt_module.main([path, path + ".pt"]), 0)
                    self.assertEqual(max_param_diff(torch.load(path + ".pt", weights_only=True)["model"], full), 0.0)
                dist.barrier()
                b = self.tp(loader, sp=True, lp=True)
                b.build_model(model_config)
                opt_b = b.configure_optimizer()
                b.load_checkpoint(path, opt_b)
                self.assertEqual(max_param_diff(b.full_state_dict(), full), 0.0)
                # b continues 2 steps from the checkpoint's state (the optimizer state came along), each equal to
                # the single model's step from the same state
                reference = Reference(model_config, b.cfg)
                reference.load(ckpt)
                for step in batches[2:]:
                    checked_step(b, opt_b, reference, step)


test_torchrun = torchrun_launcher(__file__, nprocs=(2, 4))
