"""
The 5-D cell: data x pipeline x tensor parallel with expert parallelism carved out of data parallelism, on 8
processes: dp=2 (ep=2: each MoE layer's 8 experts split over the two data-parallel replicas of every (pp, tp)
coordinate) x pp=2 (1F1B) x tp=2 (sequence and loss parallel; kv heads split), FSDP for the dense weights, both
variants, against the single model step by step (tests/reference.py's train_checked). The fifth dimension, cp, is
left out: 16 processes (dp2·ep2 x pp2 x cp2 x tp2) take several minutes on a 2-core machine; the CP+EP composition is
checked at 2 and 4 processes in tests/test_ep.py (ring attention with EP across the CP ranks).

    torchrun --standalone --nproc_per_node=8 -m unittest tests/test_ep_5d.py     (pytest launches it)
"""

import torch

from parallel import build_strategy
from tests.distributed import DistributedTestCase, torchrun_launcher
from tests.reference import global_batches, train_checked, train_config
from tests.test_ep import moe_config


class TestFiveD(DistributedTestCase):

    def test_dp_ep_pp_tp_equals_single(self):
        """2 steps of 2 micro-batches per pipeline: loss, clipped gradients and update equal the single model's."""
        config = moe_config()
        batches = global_batches(2, 4, 2, config)
        for variant in ("custom", "pytorch"):
            with self.subTest(variant=variant):
                cfg = train_config(parallel="3d", variant=variant, dp_size=2, pp_size=2, tp_size=2, ep_size=2,
                                   dp_type="fsdp", sequence_parallel=True, loss_parallel=True, pp_schedule="1f1b",
                                   gradient_accumulation_steps=4, n_layer=config.n_layer)
                strategy = build_strategy(cfg, torch.device("cpu"))
                self.assertEqual(strategy.grid.coord["ep"], strategy.grid.coord["dp"])  # ep = the dp pair
                checked = train_checked(strategy, config, batches)
                self.assertLess(checked.losses[-1], checked.losses[0])


test_torchrun = torchrun_launcher(__file__, nprocs=(8,))
