"""
Expert parallelism (parallel/ep.py), both variants, and its composition in 3d (parallel/3d.py), against the
single-device model (tests/reference.py's train_checked: every step's loss, clipped gradients and update), on CPU
with gloo: the bytes the all-to-alls move against the routing's token counts, the gradient norm, the tokens per
expert the strategy logs, DCP checkpoints that reshard between EP sizes, bad configs; and grouped-query attention
under tensor and context parallelism.

    torchrun --standalone --nproc_per_node=2 -m unittest tests/test_ep.py     (or 4; pytest launches both)

The 5-D cell (dp2 with ep2 x pp2 x tp2, sequence parallel, 8 processes) is tests/test_ep_5d.py.
"""

import os
import shutil
import tempfile

import torch
import torch.distributed as dist

from model import GPT, moe_stats
from parallel import build_strategy, load_checkpoint_file
from parallel.ep import all_to_all_bytes, is_expert_param
from tests.distributed import DistributedTestCase, torchrun_launcher
from tests.reference import (Reference, checked_step, full_parameters, global_batches, tiny_config, train_checked,
                             train_config)

CPU = torch.device("cpu")


def moe_config(**overrides):
    """A tiny MoE GPT: 4 layers, MoE in blocks 0 and 2 (8 experts, top-2, a shared expert), grouped-query attention."""
    return tiny_config(**{"n_layer": 4, "n_head": 4, "n_kv_head": 2, "n_expert": 8, "n_expert_per_token": 2,
                          "moe_every": 2, "n_shared_expert": 1, "moe_aux_loss_coef": 0.1, **overrides})


class TestExpertParallel(DistributedTestCase):

    def ep(self, variant, micro_steps_per_rank=2, **overrides):
        cfg = train_config(parallel="ep", variant=variant,
                           gradient_accumulation_steps=micro_steps_per_rank * self.world_size, **overrides)
        return build_strategy(cfg, CPU)

    def test_equals_single(self):
        """3 steps of 2 micro-batches per rank, GPT-2 and Llama blocks: every step's loss, clipped gradients and AdamW
        update equal the single model's (train_checked), both variants; the loss falls."""
        for block in ("gpt2", "llama"):
            config = moe_config(block=block)
            batches = global_batches(3, 2 * self.world_size, 2, config)
            for variant in ("pytorch", "custom"):
                with self.subTest(block=block, variant=variant):
                    strategy = self.ep(variant)
                    checked = train_checked(strategy, config, batches)
                    local = [n for n, p in strategy.named_parameters() if is_expert_param(n)]
                    self.assertEqual(strategy.model.get_parameter(local[0]).shape[0], 8 // self.world_size)
                    self.assertLess(checked.losses[-1], checked.losses[0])


test_torchrun = torchrun_launcher(__file__, nprocs=(2, 4))
