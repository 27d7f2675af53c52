"""
ZeRO-1 and ZeRO-2 (parallel/ddp.py's zero_stage, and 3d's dp_type="ddp" with zero_stage) against the single-device
model, the byte and memory formulas, checkpoints across layouts, bad configs, and the simulator's ZeRO model.

    torchrun --standalone --nproc_per_node=2 -m unittest tests/test_zero.py     (or 4; pytest launches both)

Notation: N data-parallel ranks, Ψ the model's parameters, Ψ_pad the elements of the custom variant's flat buffers:
each bucket padded to a multiple of N, Ψ_pad = Σ_buckets N·ceil(Ψ_bucket/N) (N·ceil(Ψ/N) with one bucket, the
default bucket_cap_mb for these tiny models).
"""

import copy
import math
import os
import shutil
import tempfile
from dataclasses import asdict, replace

import pytest
import torch
import torch.distributed as dist

from config import ConfigError, check_train_config
from model import GPT
from parallel import build_strategy, load_checkpoint_file
from sim.cluster import PRESETS
from sim.config import build, load
from sim.cost import Model, Parallel, state_bytes
from sim.planner import fitting
from sim.schedule import simulate
from tests.distributed import DistributedTestCase, torchrun_launcher
from tests.reference import (Reference, checked_step, full_parameters, global_batches, tiny_config, train_checked,
                             train_config)

CPU = torch.device("cpu")
A100 = PRESETS["a100-80gb"]


def psi(model_config):
    """Ψ: the parameters of the single model (the tied head counted once)."""
    return sum(p.numel() for p in GPT(model_config).parameters())


def psi_padded(strategy):
    """Ψ_pad of a custom ZeRO strategy: the elements of its flat buffers, every bucket padded to a multiple of N."""
    return sum(b.flat.numel() for b in strategy.module.buckets)


class TestZero(DistributedTestCase):

    def zero(self, variant, stage, micro_steps_per_rank=2, **overrides):
        """A ddp strategy at ZeRO stage `stage` whose global batch has micro_steps_per_rank micro-batches per rank."""
        cfg = train_config(parallel="ddp", variant=variant, zero_stage=stage,
                           gradient_accumulation_steps=micro_steps_per_rank * self.world_size, **overrides)
        return build_strategy(cfg, CPU)

    def one_step(self, strategy, model_config, batches):
        """Build, then one optimizer step as train.py takes it (stats reset first); returns the optimizer, before
        zero_grad (the gradients still there)."""
        strategy.build_model(model_config)
        opt = strategy.configure_optimizer()
        strategy.stats.reset()
        mine = batches[strategy.dp_rank::strategy.dp_size]
        strategy.forward_backward(mine, torch.amp.GradScaler("cpu", enabled=False))
        strategy.clip_grad_norm_(strategy.cfg.grad_clip)
        opt.step()
        return opt

    def test_every_variant_and_stage_trains_like_single(self):
        """3 steps of 2 micro-batches per rank, every step checked against the single model (tests/reference.py's
        train_checked: loss, clipped gradients, AdamW update): pytorch and custom at stages 1 and 2, GPT-2 and Llama
        blocks; custom also with small buckets (several per model, reduced while backward goes on) and full
        activation checkpointing; at 2 processes also custom with one bucket and the triton variant (its collectives
        in Triton's interpreter) at stage 2; the loss fell."""
        cases = [("pytorch", 1, {}), ("pytorch", 2, {}),
                 ("custom", 1, dict(bucket_cap_mb=0.01, activation_checkpoint="full")),
                 ("custom", 2, dict(bucket_cap_mb=0.01, block="llama"))]
        if self.world_size == 2:
            cases += [("custom", 1, {}), ("custom", 2, {}), ("triton", 2, dict(bucket_cap_mb=0.02))]
        for variant, stage, overrides in cases:
            with self.subTest(variant=variant, stage=stage, **overrides):
                model_config = tiny_config(block=overrides.pop("block", "gpt2"))
                batches = global_batches(3, 2 * self.world_size, 2, model_config)
                checked = train_checked(self.zero(variant, stage, **overrides), model_config, batches)
                self.assertLess(checked.losses[-1], checked.losses[0])

    def test_bytes_per_step_equal_the_formula(self):
        """Custom, per optimizer step of 2 micro-batches per rank (forward, backward, clipping, AdamW): exactly a
        reduce-scatter of Ψ_pad·4 bytes (bus (N-1)/N·Ψ_pad·4) and an all-gather of Ψ_pad·4 (bus (N-1)/N·Ψ_pad·4),
        the 2·(N-1)/N·Ψ_pad·4 of DDP's all-reduce, and the gradient norm's 4-byte all-reduce; nothing else, at stages
        1 and 2, with one bucket and with several. The simulator counts the same bytes for the same model (fp32,
        unpadded: Ψ·4 each)."""
        model_config = tiny_config()
        N = self.world_size
        (step,) = global_batches(1, 2 * N, 2, model_config)
        model = Model(n_layer=model_config.n_layer, n_head=model_config.n_head, n_embd=model_config.n_embd,
                      seq_len=model_config.block_size, vocab_size=model_config.vocab_size, bias=True)
        self.assertEqual(model.params, psi(model_config))
        for stage in (1, 2):
            simulated = simulate(model, Parallel(dp=N, micro_batches=2, zero=stage, dtype="float32"), A100)
            sim_bytes = {op: sum(t.nbytes for t in simulated.tasks if t.kind == op)
                         for op in ("all_reduce", "reduce_scatter", "all_gather")}
            self.assertEqual(sim_bytes, {"all_reduce": 0, "reduce_scatter": 4 * model.params,
                                         "all_gather": 4 * model.params})
            for bucket_cap_mb in (25.0, 0.01):
                with self.subTest(stage=stage, bucket_cap_mb=bucket_cap_mb):
                    strategy = self.zero("custom", stage, bucket_cap_mb=bucket_cap_mb)
                    self.one_step(strategy, model_config, step)
                    padded = psi_padded(strategy)
                    if bucket_cap_mb == 25.0:
                        self.assertEqual(padded, N * math.ceil(psi(model_config) / N))
                    else:
                        self.assertGreater(len(strategy.module.buckets), 2)
                    stats = strategy.stats
                    self.assertEqual(dict(stats.payload), {"reduce_scatter": 4 * padded, "all_gather": 4 * padded,
                                                           "all_reduce": 4})
                    self.assertEqual(stats.bus["reduce_scatter"], (N - 1) / N * padded * 4)
                    self.assertEqual(stats.bus["all_gather"], (N - 1) / N * padded * 4)
                    self.assertEqual(stats.calls["reduce_scatter"], len(strategy.module.buckets))

    def test_memory_per_rank_is_the_papers_split(self):
        """Per rank after a step (before zero_grad), fp32 (params 4, grads 4, Adam 8 bytes per parameter), the paper's
        split: custom exactly, stage 0 (DDP) 4Ψ + 4Ψ + 8Ψ, stage 1 4Ψ_pad + 4Ψ_pad + 8Ψ_r, stage 2 4Ψ_pad +
        4Ψ_pad/N + 8Ψ_r, Ψ_r this rank's shard without padding (Σ_r Ψ_r = Ψ: the moments over all ranks are exactly
        8Ψ), and no full gradient left at stage 2. pytorch stage 1 (ZeroRedundancyOptimizer) keeps whole parameters'
        moments: 8Ψ over all ranks, each rank within 8 x the largest parameter of 8Ψ/N; pytorch stage 2 (FSDP2)
        keeps every state sharded, 1/N of each parameter's dim 0 padded (torch.chunk's split)."""
        model_config = tiny_config(n_layer=4)
        N, P = self.world_size, psi(model_config)
        (step,) = global_batches(1, 2 * N, 2, model_config)
        largest = max(p.numel() for p in GPT(model_config).parameters())

        def over_ranks(n):
            t = torch.tensor(float(n))
            dist.all_reduce(t)
            return t.item()

        for variant, stage in (("custom", 0), ("custom", 1), ("custom", 2), ("pytorch", 1), ("pytorch", 2)):
            with self.subTest(variant=variant, stage=stage):
                strategy = self.zero(variant, stage)
                opt = self.one_step(strategy, model_config, step)
                mem = strategy.memory_bytes(opt)
                if variant == "custom" and stage == 0:
                    self.assertEqual(mem, {"params": 4 * P, "grads": 4 * P, "optimizer": 8 * P, "gathered": 0})
                elif variant == "custom":
                    padded = psi_padded(strategy)
                    mine = sum(p.numel() for _, p in strategy.named_parameters())
                    self.assertEqual(mem, {"params": 4 * padded, "grads": 4 * padded // (N if stage == 2 else 1),
                                           "optimizer": 8 * mine, "gathered": 0})
                    self.assertEqual(over_ranks(mine), P)
                elif stage == 1:
                    self.assertEqual((mem["params"], mem["grads"]), (4 * P, 4 * P))
                    self.assertEqual(over_ranks(mem["optimizer"]), 8 * P)
                    self.assertLessEqual(abs(mem["optimizer"] - 8 * P / N), 8 * largest)
                else:
                    params = list(GPT(model_config).parameters())
                    chunk = sum(math.ceil(p.shape[0] / N) * p[0].numel() for p in params)
                    self.assertEqual((mem["params"], mem["grads"], mem["optimizer"]), (4 * chunk, 4 * chunk, 8 * chunk))
                    self.assertLess(chunk - P / N, sum(p[0].numel() for p in params))  # < a row of padding each

    def test_checkpoint_loads_on_other_layouts_and_continues(self):
        """A DCP checkpoint written by custom ZeRO-1 (ZeRO-2) after one checked step holds what it trained, and loads
        into ZeRO-2 (ZeRO-1), into fsdp (FSDP2's DTensors; our flat shards), into 3d at dp=N/2 x tp=2 (another
        sharding of the same state; ddp converting it to one file): each continues with one step checked against
        the single model started from that checkpoint's parameters and AdamW state (the file `python -m
        parallel.checkpoint` writes). pytorch ZeRO-1's checkpoint (one file, its optimizer state consolidated on
        rank 0) loads into custom DDP and into pytorch ZeRO-1 (each rank keeping its parameters' state) likewise."""
        model_config = tiny_config(n_layer=2)
        N = self.world_size
        batches = global_batches(2, 2 * N, 2, model_config)
        root = [tempfile.mkdtemp(prefix="test_zero_") if self.rank == 0 else None]
        dist.broadcast_object_list(root)
        loaders = {("custom", 1): [("ddp", "custom", dict(zero_stage=2)), ("fsdp", "pytorch", {}),
                                   ("3d", "custom", dict(dp_size=N // 2, tp_size=2, dp_type="ddp", zero_stage=1))],
                   ("custom", 2): [("ddp", "custom", dict(zero_stage=1)), ("fsdp", "custom", {}),
                                   ("ddp", "custom", {})],
                   ("pytorch", 1): [("ddp", "custom", {}), ("ddp", "pytorch", dict(zero_stage=1))]}
        try:
            for (saver, stage), targets in loaders.items():
                strategy = self.zero(saver, stage)
                strategy.build_model(model_config)
                optimizer = strategy.configure_optimizer()
                checked_step(strategy, optimizer, Reference(model_config, strategy.cfg), batches[0])
                trained = full_parameters(strategy)
                path = os.path.join(root[0], f"{saver}{stage}", strategy.checkpoint_name)
                os.makedirs(os.path.dirname(path), exist_ok=True)  # train.py's Checkpointer makes step_N/
                strategy.save_checkpoint(path, optimizer, {"model_args": asdict(model_config),
                                                           "config": vars(strategy.cfg)})
                saved = load_checkpoint_file(path)
                for name, value in trained.items():
                    self.assertTrue(torch.equal(saved["model"][name], value), name)
                for parallel, variant, overrides in targets:
                    with self.subTest(saver=f"{saver} zero{stage}", loader=f"{parallel}/{variant}", **overrides):
                        loader = build_strategy(train_config(parallel=parallel, variant=variant, n_layer=2,
                                                             gradient_accumulation_steps=2 * N, **overrides), CPU)
                        loader.build_model(model_config)
                        optimizer = loader.configure_optimizer()
                        loader.load_checkpoint(path, optimizer)
                        reference = Reference(model_config, loader.cfg)
                        reference.set_parameters(saved["model"])
                        reference.opt.load_state_dict(copy.deepcopy(saved["optimizer"]))  # it steps them in place
                        checked_step(loader, optimizer, reference, batches[1])
        finally:
            dist.barrier()
            if self.rank == 0:
                shutil.rmtree(root[0])

    def test_3d_with_zero(self):
        """4 processes: dp2 x tp2 with ZeRO-1 (custom, sequence parallel: its gradients summed over TP before the
        reduce-scatter) and ZeRO-2 (pytorch, loss parallel), and dp2 x pp2 with ZeRO-2 (custom, the tied embedding and
        head copies in buckets of their own, summed shard by shard): 3 steps of 4 micro-batches, each checked against
        the single model."""
        if self.world_size != 4:
            self.skipTest("a 3d grid of 4")
        model_config = tiny_config(vocab_size=65)  # 65: the vocabulary splits unevenly over tp=2
        batches = global_batches(3, 4, 2, model_config)
        for variant, stage, (dp, pp, tp), extra in [
                ("custom", 1, (2, 1, 2), dict(sequence_parallel=True)),
                ("pytorch", 2, (2, 1, 2), dict(loss_parallel=True)),
                ("custom", 2, (2, 2, 1), dict(pp_schedule="1f1b"))]:
            with self.subTest(variant=variant, stage=stage, dp=dp, pp=pp, tp=tp, **extra):
                cfg = train_config(parallel="3d", variant=variant, dp_size=dp, pp_size=pp, tp_size=tp, dp_type="ddp",
                                   zero_stage=stage, gradient_accumulation_steps=4, n_layer=2, **extra)
                checked = train_checked(build_strategy(cfg, CPU), model_config, batches)
                self.assertLess(checked.losses[-1], checked.losses[0])

    def test_bad_config_is_one_line(self):
        """Before any collective: zero_stage 3 (that is fsdp), an unknown stage, float16 with a custom stage, ZeRO with
        3d's dp_type=fsdp, and ZeRO-1 in 3d/pytorch are one-line ValueErrors naming the fix."""
        for overrides, message in [(dict(parallel="ddp", zero_stage=3), "use parallel=fsdp"),
                                   (dict(parallel="ddp", zero_stage=4), "zero_stage must be 0"),
                                   (dict(parallel="ddp", variant="custom", zero_stage=1, dtype="float16"),
                                    "use bfloat16"),
                                   (dict(parallel="3d", variant="custom", zero_stage=1, dp_type="fsdp"),
                                    "ZeRO-3 already"),
                                   (dict(parallel="3d", variant="pytorch", zero_stage=1, dp_type="ddp", tp_size=2),
                                    "variant=custom")]:
            with self.subTest(**overrides):
                with self.assertRaisesRegex(ValueError, message) as e:
                    build_strategy(train_config(**overrides), CPU)
                self.assertNotIn("\n", str(e.exception))


test_torchrun = torchrun_launcher(__file__, nprocs=(2, 4))


# ----------------------------------------------------------------------------------------------------------
# without a process group: the config check and the simulator's ZeRO model

@pytest.mark.parametrize("overrides, message", [
    (dict(parallel="ddp", zero_stage=3), "zero_stage=3 shards the parameters too: that is ZeRO-3, use parallel=fsdp"),
    (dict(parallel="ddp", zero_stage=-1), "zero_stage must be 0 (DDP), 1 (optimizer states sharded) or 2"),
    (dict(parallel="fsdp", zero_stage=1), "zero_stage=1 applies to parallel=ddp and to 3d with dp_type=ddp"),
    (dict(parallel="3d", dp_type="fsdp", zero_stage=2), "with dp_type='fsdp' (ZeRO-3 already)")])
def test_config_check_is_one_line(overrides, message):
    with pytest.raises(ConfigError, match=None) as e:
        check_train_config(overrides)
    assert message in str(e.value) and "\n" not in str(e.value)
    check_train_config({**overrides, "zero_stage": 0})


@pytest.mark.parametrize("n", [2, 8])
def test_sim_zero_memory_and_bytes(n):
    """The simulator's ZeRO-1/2 per device (mixed precision, K = 12): params + grads + optimizer = 4Ψ + 12Ψ/N
    (ZeRO-1) and 2Ψ + 14Ψ/N (ZeRO-2) with one micro-batch; with 4 micro-batches accumulated locally ZeRO-2's
    gradients peak at 2Ψ, ZeRO-1's figure. Bytes per step: ZeRO-0 one all-reduce of 2Ψ; ZeRO-1 and ZeRO-2 a
    reduce-scatter of 2Ψ (on the last micro-batch only) and an all-gather of 2Ψ after the optimizer, whatever m."""
    model = Model(n_layer=8, n_head=4, n_embd=64, seq_len=64, vocab_size=128)
    P = model.params
    for zero, m, want in [(1, 1, 4 * P + 12 * P / n), (2, 1, 2 * P + 14 * P / n), (1, 4, 4 * P + 12 * P / n),
                          (2, 4, 4 * P + 12 * P / n)]:
        step = simulate(model, Parallel(dp=n, zero=zero, micro_batches=m), A100)
        mem = step.memory[0]
        assert mem["params"] + mem["grads"] + mem["optimizer"] == pytest.approx(want, rel=1e-12)
        sent = {op: sum(t.nbytes for t in step.tasks if t.kind == op)
                for op in ("all_reduce", "reduce_scatter", "all_gather")}
        assert sent == {"all_reduce": 0, "reduce_scatter": 2 * P, "all_gather": 2 * P}
    step = simulate(model, Parallel(dp=n, zero=0, micro_batches=4), A100)
    assert sum(t.nbytes for t in step.tasks if t.kind == "all_reduce") == 2 * P
    assert state_bytes(P, n, 2, mixed=False) == {"params": 4 * P, "grads": 4 * P / n, "optimizer": 8 * P / n}


def test_sim_config_and_planner_use_zero_stages():
    """train.py's zero_stage reaches the simulator (ddp, 3d with dp_type=ddp; fsdp and 3d's dp_type=fsdp are ZeRO-3),
    and the planner picks the lowest stage that fits: a 1.3B model on 8 x 80 GB at one micro-batch needs no ZeRO, on
    8 x 16 GB ZeRO-1 (its 16Ψ = 21 GB of DDP state does not fit, 4Ψ + 12Ψ/8 = 7.3 GB does)."""
    common = ["--cluster=a100-80gb", "--gpus=8", "--gradient_accumulation_steps=8"]
    for argv, zero in [(["--parallel=ddp", "--zero_stage=2"], 2), (["--parallel=ddp"], 0), (["--parallel=fsdp"], 3),
                       (["--parallel=3d", "--dp_type=ddp", "--zero_stage=1"], 1), (["--parallel=3d"], 3)]:
        _, par, _ = build(load([*common, *argv]))
        assert par.zero == zero, argv
    model = Model(n_layer=24, n_head=16, n_embd=2048, seq_len=1024, vocab_size=50304)
    base = Parallel(dp=8, micro_batch=1, micro_batches=1, recompute="full")
    assert [p.zero for p, _ in fitting(model, base, A100.sized(8))][:1] == [0]
    small = replace(A100, hbm_bytes=16e9)
    assert [p.zero for p, _ in fitting(model, base, small.sized(8))][:1] == [1]
