"""
DDP, both variants, against the single-device reference and against each other (CPU, gloo).

    torchrun --standalone --nproc_per_node=2 -m unittest tests/test_ddp.py     (or 4; pytest launches both)
"""

import torch
import torch.nn as nn

from model import GPT
from parallel import build_strategy
from kernels.comm import TorchCollectives
from parallel.ddp import DataParallel
from tests.distributed import DistributedTestCase, torchrun_launcher
from tests.reference import global_batches, max_param_diff, rank_batches, tiny_config, train_checked, train_config

CPU = torch.device("cpu")


class TestDDP(DistributedTestCase):

    def ddp(self, variant, micro_steps_per_rank=1, **overrides):
        """A ddp Strategy whose global batch has micro_steps_per_rank micro-batches per rank."""
        cfg = train_config(parallel="ddp", variant=variant,
                           gradient_accumulation_steps=micro_steps_per_rank * self.world_size, **overrides)
        return build_strategy(cfg, CPU)

    def test_five_steps_with_accumulation_equal_single(self):
        """5 optimizer steps of 3 micro-batches per rank, both variants, GPT-2 and Llama-style blocks: every step's
        loss, clipped gradients and update equal the single model's on the same global batch from the same state
        (tests/reference.py's rule), and the loss falls."""
        for block in ("gpt2", "llama"):
            model_config = tiny_config(block=block)
            batches = global_batches(5, 3 * self.world_size, 4, model_config)
            for variant in ("pytorch", "custom"):
                with self.subTest(block=block, variant=variant):
                    run = train_checked(self.ddp(variant, 3, bucket_cap_mb=0.01), model_config, batches)
                    self.assertLess(run.losses[-1], run.losses[0])  # not vacuous: it learned

    def test_comm_bytes_per_step(self):
        """Per optimizer step (4 micro-batches per rank): all-reduce payload = Ψ·4 bytes, bus = 2(N-1)/N·Ψ·4,
        by nccl-tests' convention, within 1%, for both variants; nothing else is sent during a step."""
        model_config = tiny_config()
        batches = global_batches(2, 4 * self.world_size, 2, model_config)
        N = self.world_size
        for variant in ("pytorch", "custom"):
            with self.subTest(variant=variant):
                strategy = self.ddp(variant, 4, bucket_cap_mb=0.02)
                model = strategy.build_model(model_config)
                psi = sum(p.numel() for p in model.parameters())
                scaler = torch.amp.GradScaler("cpu", enabled=False)
                for step in batches:
                    strategy.stats.reset()
                    strategy.forward_backward(rank_batches(step, strategy.dp_rank, N), scaler)
                    self.assertEqual(set(strategy.stats.calls), {"all_reduce"})
                    self.assertAlmostEqual(strategy.stats.payload["all_reduce"] / (psi * 4), 1.0, delta=0.01)
                    self.assertAlmostEqual(strategy.stats.bus["all_reduce"] / (2 * (N - 1) / N * psi * 4), 1.0,
                                           delta=0.01)
                    model.zero_grad(set_to_none=True)

    def test_one_all_reduce_per_bucket_and_none_inside_no_sync(self):
        """With small buckets: no all-reduce during the no_sync micro-batches, exactly one per bucket on the
        synchronising one (custom); pytorch DDP's hook likewise only fires on the synchronising backward
        (its count may differ on the first step: DDP rebuilds its buckets after the first iteration)."""
        model_config = tiny_config()
        (step,) = global_batches(1, 3, 2, model_config)
        for variant in ("custom", "pytorch"):
            with self.subTest(variant=variant):
                strategy = self.ddp(variant, bucket_cap_mb=0.01)
                strategy.build_model(model_config)
                strategy.stats.reset()
                per_step = []
                for _ in range(3):
                    before = strategy.stats.calls["all_reduce"]
                    for x, y in step[:-1]:
                        with strategy.no_sync():
                            strategy.forward(x, y)[1].backward()
                    self.assertEqual(strategy.stats.calls["all_reduce"], before)
                    strategy.forward(*step[-1])[1].backward()
                    strategy.sync_gradients()
                    per_step.append(strategy.stats.calls["all_reduce"] - before)
                    strategy.model.zero_grad(set_to_none=True)
                self.assertEqual(per_step[1], per_step[2])
                self.assertGreater(per_step[1], 1)
                if variant == "custom":
                    self.assertEqual(per_step, [len(strategy.module.buckets)] * 3)

    def test_custom_all_reduce_overlaps_backward(self):
        """The first bucket's all-reduce is launched while gradients of other parameters are still missing."""
        model_config = tiny_config()
        strategy = self.ddp("custom", bucket_cap_mb=0.01)
        model = strategy.build_model(model_config)
        ddp, ready_at_launch = strategy.module, []
        launch = ddp.comm.all_reduce

        def recording_all_reduce(tensor, **kwargs):
            ready_at_launch.append(sum(len(b.ready) for b in ddp.buckets))
            return launch(tensor, **kwargs)

        ddp.comm.all_reduce = recording_all_reduce
        ((x, y),) = global_batches(1, 1, 2, model_config)[0]
        strategy.forward(x, y)[1].backward()
        strategy.sync_gradients()
        n_params = len(list(model.parameters()))
        self.assertEqual(len(ready_at_launch), len(ddp.buckets))
        self.assertLess(ready_at_launch[0], n_params)
        self.assertEqual(ready_at_launch[-1], n_params)

    def test_custom_broadcasts_rank0_parameters(self):
        """DataParallel overwrites every replica with rank 0's parameters."""
        model_config = tiny_config()
        model = GPT(model_config)
        with torch.no_grad():
            for p in model.parameters():
                p.add_(self.rank)
        DataParallel(model, TorchCollectives())
        self.assertEqual(max_param_diff(model, GPT(model_config)), 0.0)

    def test_custom_names_parameters_without_gradient(self):
        """A parameter that takes no part in the loss is a clear error naming it, on every rank."""
        net = nn.ModuleDict({"used": nn.Linear(4, 4), "unused": nn.Linear(4, 4)})
        dp = DataParallel(net, TorchCollectives())
        net["used"](torch.ones(2, 4)).sum().backward()
        with self.assertRaisesRegex(RuntimeError, r"unused\.weight.*unused\.bias|unused\.bias.*unused\.weight"):
            dp.finish_gradient_sync()


test_torchrun = torchrun_launcher(__file__, nprocs=(2, 4))
