"""
The 5-D cells: expert parallelism carved out of the data-parallel ranks, composed with pipeline, tensor and context
parallelism, both variants, against the single model step by step (tests/reference.py's train_checked):

- 8 processes: dp=2 (ep=2: each MoE layer's 8 experts split over the two data-parallel replicas of every (pp, tp)
  coordinate) x pp=2 (1F1B) x tp=2 (sequence and loss parallel; kv heads split), FSDP for the dense weights;
- 16 processes, all five dimensions: dp=2 x pp=2 x cp=2 (ring attention over the kv heads) x tp=2, with ep=4 over
  the 4 dp x cp ranks that hold the same dense weights (config/train_shakespeare_char_5d_custom_cpu.py's grid).

    torchrun --standalone --nproc_per_node=8 -m unittest tests/test_ep_5d.py     (pytest launches it at 8 and 16)
"""

import torch

from parallel import build_strategy
from tests.distributed import DistributedTestCase, torchrun_launcher
from tests.reference import global_batches, train_checked, train_config
from tests.test_ep import moe_config

# world size -> the grid (EP inside dp x cp: ranks d = dp_rank·cp + cp_rank, ep consecutive ones per EP group)
GRIDS = {8: dict(dp_size=2, pp_size=2, tp_size=2, ep_size=2),
         16: dict(dp_size=2, pp_size=2, cp_size=2, tp_size=2, ep_size=4)}


class TestFiveD(DistributedTestCase):

    def test_dp_ep_pp_cp_tp_equals_single(self):
        """2 steps of 2 micro-batches per pipeline: loss, clipped gradients and update equal the single model's."""
        config = moe_config()
        batches = global_batches(2, 4, 2, config)
        grid = GRIDS[self.world_size]
        for variant in ("custom", "pytorch"):
            with self.subTest(variant=variant):
                cfg = train_config(parallel="3d", variant=variant, dp_type="fsdp", sequence_parallel=True,
                                   loss_parallel=True, pp_schedule="1f1b", gradient_accumulation_steps=4,
                                   n_layer=config.n_layer, **grid)
                strategy = build_strategy(cfg, torch.device("cpu"))
                coord = strategy.grid.coord
                cp = grid.get("cp_size", 1)
                self.assertEqual(coord["ep"], (coord["dp"] * cp + coord["cp"]) % grid["ep_size"])  # EP in dp x cp
                checked = train_checked(strategy, config, batches)
                self.assertLess(checked.losses[-1], checked.losses[0])


test_torchrun = torchrun_launcher(__file__, nprocs=(8, 16))
