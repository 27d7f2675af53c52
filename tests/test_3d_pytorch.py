"""
3-D parallelism, `pytorch` variant (parallel/3d.py's Pytorch3D: DTensor TP x torch.distributed.pipelining x FSDP2 or
replicate), against the single-device reference (CPU, gloo).

    torchrun --standalone --nproc_per_node=8 -m unittest tests/test_3d_pytorch.py    (dp=2 x pp=2 x tp=2)
    torchrun --standalone --nproc_per_node=4 -m unittest tests/test_3d_pytorch.py    (the 2-D cuts)

pytest launches both. 8 processes on 2 cores are slow: few cases there, the 2-D cuts at 4.
"""

import math
import os
import shutil
import tempfile
from dataclasses import asdict

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor

from model import GPT
from parallel import available, build_strategy, load_checkpoint_file
from parallel.tp import chunk_bounds
from tests.distributed import DistributedTestCase, torchrun_launcher
from tests.reference import (LOSS_TOL, Reference, checked_step, global_batches, max_param_diff, rank_batches,
                             tiny_config, train_checked, train_config)

CPU = torch.device("cpu")
MODEL = tiny_config(n_layer=4, n_head=4, vocab_size=65)  # 2 stages x 2 virtual stages; 65 = 33 + 32 rows over tp=2
MICRO_BATCHES = 4  # global, per step: 2 per pipeline at dp=2
GRID = "dp pp tp dp_type sp_lp schedule".split()
CASES = {  # world size -> grids (dp, pp, tp, dp_type, sequence+loss parallel, schedule) trained against single
    8: [(2, 2, 2, "fsdp", True, "1f1b"), (2, 2, 2, "fsdp", False, "interleaved_1f1b"),
        (2, 2, 2, "ddp", True, "interleaved_1f1b")],
    4: [(2, 1, 2, "fsdp", True, "1f1b"), (2, 1, 2, "ddp", False, "gpipe"),          # dp x tp
        (2, 2, 1, "fsdp", False, "1f1b"), (2, 2, 1, "ddp", False, "interleaved_1f1b"),  # dp x pp
        (1, 2, 2, "fsdp", True, "interleaved_1f1b"), (1, 2, 2, "fsdp", False, "1f1b")],  # pp x tp
}
COMM_GRIDS = {8: [(2, 2, 2, "fsdp", True, "1f1b"), (2, 2, 2, "ddp", True, "interleaved_1f1b")],
              4: [(2, 1, 2, "fsdp", True, "1f1b"), (2, 2, 1, "fsdp", False, "interleaved_1f1b")]}
CHECKPOINT_GRIDS = {  # world size -> (grid that saves, another grid that loads)
    8: ((2, 2, 2, "fsdp", True, "1f1b"), (4, 1, 2, "ddp", False, "gpipe")),
    4: ((2, 1, 2, "fsdp", True, "1f1b"), (1, 2, 2, "fsdp", False, "interleaved_1f1b")),
}


def grid_config(dp, pp, tp, dp_type="fsdp", sp_lp=False, schedule="1f1b", **overrides):
    """train_config for parallel=3d variant=pytorch on that grid (interleaved schedules: 2 virtual stages)."""
    return train_config(**{"parallel": "3d", "variant": "pytorch", "dp_size": dp, "pp_size": pp, "tp_size": tp,
                           "dp_type": dp_type, "sequence_parallel": sp_lp, "loss_parallel": sp_lp,
                           "pp_schedule": schedule, "pp_virtual_stages": 2 if schedule.startswith("interleaved") else 1,
                           "gradient_accumulation_steps": MICRO_BATCHES, "n_layer": MODEL.n_layer, **overrides})


def train_step(strategy, optimizer, step_batches):
    loss = strategy.forward_backward(rank_batches(step_batches, strategy.dp_rank, strategy.dp_size), None)
    strategy.clip_grad_norm_(strategy.cfg.grad_clip)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss


class Test3DPytorch(DistributedTestCase):

    def build(self, *grid, **overrides):
        return build_strategy(grid_config(*grid, **overrides), CPU)

    def test_equals_single(self):
        """3 steps on every grid of CASES, and the custom variant (parallel/3d.py) on the first: every step equals the
        single model's on the same global batch from the same state (tests/reference.py's rule), and so does an eval
        loss; the loss falls."""
        batches = global_batches(3, MICRO_BATCHES, 2, MODEL, seed=1)
        x, y = batches[0][0]
        grids = [(grid, "pytorch") for grid in CASES.get(self.world_size, [])]
        if grids and ("3d", "custom") in available():
            grids.append((grids[0][0], "custom"))
        for grid, variant in grids:
            with self.subTest(variant=variant, **dict(zip(GRID, grid))):
                strategy = self.build(*grid, variant=variant)
                reference = Reference(MODEL, strategy.cfg)
                run = train_checked(strategy, MODEL, batches, reference)
                self.assertLess(abs(strategy.eval_loss(x, y).item() - reference.loss(run.params, x, y)), LOSS_TOL)
                self.assertLess(run.losses[-1], run.losses[0])

    def test_grid_groups_and_bad_configs(self):
        """The strategy's coordinates and dp/pp/tp groups are Megatron's layout (rank = (dp*pp + pp_rank)*tp + tp_rank);
        bad grids and configs are one-line ValueErrors raised before any collective (grid sizes, dp_type, sequence
        length) or before the model is built (what TP cannot split, pipeline rules)."""
        n = self.world_size
        dp, pp, tp = (2, 2, 2) if n == 8 else (1, 2, 2)
        strategy = self.build(dp, pp, tp)
        d, p, t = self.rank // (pp * tp), self.rank // tp % pp, self.rank % tp
        self.assertEqual((strategy.dp_rank, strategy.dp_size, strategy.grid.coord["pp"], strategy.sizes["pp"]),
                         (d, dp, p, pp))
        members = {"dp": [(i * pp + p) * tp + t for i in range(dp)], "pp": [(d * pp + i) * tp + t for i in range(pp)],
                   "tp": [(d * pp + p) * tp + i for i in range(tp)]}
        for name in ("dp", "pp", "tp"):
            group = strategy.grid.group(name)
            self.assertEqual(dist.get_process_group_ranks(group), members[name])
        bad = [(dict(dp=n, pp=2, tp=1), "must equal the world size"),
               (dict(dp=0, pp=3, tp=1), "not divisible"),
               (dict(dp=1, pp=n, tp=2), "must equal the world size"),
               (dict(dp=n // 2, pp=1, tp=2, dp_type="zero3"), "dp_type"),
               (dict(dp=n // 2, pp=1, tp=2, sp_lp=True, block_size=15), "block_size=15"),
               (dict(dp=n // 2, pp=1, tp=2, gradient_accumulation_steps=n // 2 + 1), "divisible by the data-parallel")]
        if n == 4:  # these build a mesh first (the pipeline's own checks run on the pipeline group)
            bad += [(dict(dp=1, pp=2, tp=2, schedule="interleaved_1f1b", pp_virtual_stages=1), "pp_virtual_stages"),
                    (dict(dp=1, pp=2, tp=2, schedule="zigzag"), "not a pytorch pipeline schedule")]
        for kwargs, pattern in bad:
            with self.subTest(**{k: str(v) for k, v in kwargs.items()}):
                with self.assertRaisesRegex(ValueError, pattern) as err:
                    self.build(kwargs.pop("dp"), kwargs.pop("pp"), kwargs.pop("tp"), **kwargs)
                self.assertNotIn("\n", str(err.exception))
        with self.subTest(n_head=3):  # TP cannot split 3 heads over 2 ranks: at build_model, before any collective
            with self.assertRaisesRegex(ValueError, "n_head=3") as err:
                self.build(dp, pp, tp).build_model(tiny_config(n_layer=4, n_head=3, n_embd=48, vocab_size=65))
            self.assertNotIn("\n", str(err.exception))

    def test_grad_norm_loss_and_comm_bytes(self):
        """One step on each grid: the logged loss and the gradient norm are the same on every rank and the norm is the
        single model's (every element counted once over dp, pp and tp, the tied weight once). With
        reshard_after_forward=False the bytes counted in a step (the second: the first also infers shapes) are the
        1-D formulas on each group: FSDP on dp moves this rank's TP-local stage parameters Ψ (each padded to a
        multiple of dp rows) once as all-gather and once as reduce-scatter (the pipeline keeps the units gathered
        from the first forward to the last backward), the pipeline group exchanges the tied embedding/head gradient
        (its TP-local rows, both ways) and broadcasts the loss (4 bytes), clipping all-reduces one float64."""
        batches = global_batches(2, MICRO_BATCHES, 2, MODEL, seed=3)
        single = GPT(MODEL)
        for x, y in batches[0]:
            (single(x, y)[1] / MICRO_BATCHES).backward()
        ref_norm = torch.nn.utils.clip_grad_norm_(single.parameters(), float("inf")).item()
        for grid in COMM_GRIDS.get(self.world_size, []):
            with self.subTest(**dict(zip(GRID, grid))):
                strategy = self.build(*grid, reshard_after_forward="never")
                strategy.build_model(MODEL)
                opt = strategy.configure_optimizer()
                loss = strategy.forward_backward(rank_batches(batches[0], strategy.dp_rank, strategy.dp_size), None)
                norm = strategy.clip_grad_norm_(float("inf"))
                values = [None] * self.world_size
                dist.all_gather_object(values, (loss.item(), norm.item()))
                self.assertEqual(len(set(values)), 1)
                self.assertAlmostEqual(norm.item(), ref_norm, delta=1e-5 * ref_norm)
                opt.step()
                opt.zero_grad(set_to_none=True)
                strategy.stats.reset()
                train_step(strategy, opt, batches[1])
                self.assertEqual(dict(strategy.stats.payload), self.expected_bytes(strategy))

    @staticmethod
    def expected_bytes(strategy):
        # clipping's scalar all-reduce (fp32: parallel.clip_grad_norm_, the one implementation), and with a pipeline
        # (pp > 1; at pp=1 no one-stage pipeline runs any more) the loss broadcast
        sizes, coord, pipeline = strategy.sizes, strategy.grid.coord, strategy.pipeline
        expected = {"all_reduce": 4} | ({"broadcast": 4} if pipeline is not None else {})
        if sizes["dp"] > 1 and strategy.cfg.dp_type == "fsdp":
            psi = 0
            for _, p in strategy.named_parameters():
                shape = list(p.shape)
                names = p.device_mesh.mesh_dim_names
                if "tp" in names and p.placements[names.index("tp")].is_shard():
                    dim = p.placements[names.index("tp")].dim
                    lo, hi = chunk_bounds(shape[dim], sizes["tp"], coord["tp"])
                    shape[dim] = hi - lo
                shape[0] = math.ceil(shape[0] / sizes["dp"]) * sizes["dp"]  # FSDP2 pads dim 0 to a multiple of dp
                psi += math.prod(shape) * 4
            expected |= {"all_gather": psi, "reduce_scatter": psi}
        if pipeline is not None and pipeline.tied_param is not None:  # first and last stage: the tied gradient shard
            tied = pipeline.tied_param
            nbytes = (tied.to_local() if isinstance(tied, DTensor) else tied).numel() * 4
            expected |= {"send": nbytes, "recv": nbytes}
        return expected

    def test_checkpoint_save_convert_resume_and_regrid(self):
        """A DCP checkpoint after 2 steps: converted to one file it holds the run's parameters exactly and the single
        model's AdamW state (tests/reference.py's rule); the same grid resumes it and its 3rd step equals the
        uninterrupted run's exactly; another grid on the same world loads it exactly and its 3rd step equals the
        single model's from the checkpoint."""
        if self.world_size not in CHECKPOINT_GRIDS:
            self.skipTest("grids for 4 and 8 processes")
        saver, loader = CHECKPOINT_GRIDS[self.world_size]
        batches = global_batches(3, MICRO_BATCHES, 2, MODEL, seed=2)
        path = [tempfile.mkdtemp(prefix="3d-pytorch-ckpt-") if self.rank == 0 else None]
        dist.broadcast_object_list(path)
        path = os.path.join(path[0], "ckpt")
        try:
            strategy = self.build(*saver)
            reference = Reference(MODEL, strategy.cfg)
            opt = train_checked(strategy, MODEL, batches[:2], reference).optimizer
            strategy.eval_loss(*batches[0][0])  # as train.py evaluates before it saves (FSDP2 units must reshard)
            strategy.save_checkpoint(path, opt, {"model_args": asdict(MODEL), "iter_num": 2,
                                                 "config": vars(strategy.cfg)})
            full = load_checkpoint_file(path)
            saved_state = strategy.full_state_dict()
            self.assertEqual(max_param_diff(full["model"], saved_state), 0.0)
            reference.assert_optimizer_state(full["optimizer"]["state"])
            train_step(strategy, opt, batches[2])
            for grid in (saver, loader):
                with self.subTest(load_on=dict(zip(GRID, grid))):
                    fresh = self.build(*grid)
                    fresh.build_model(MODEL)
                    fresh_opt = fresh.configure_optimizer()
                    self.assertEqual(fresh.load_checkpoint(path, fresh_opt)["iter_num"], 2)
                    self.assertEqual(max_param_diff(fresh.full_state_dict(), saved_state), 0.0)
                    if grid == saver:
                        train_step(fresh, fresh_opt, batches[2])
                        self.assertEqual(max_param_diff(fresh.full_state_dict(), strategy.full_state_dict()), 0.0)
                    else:
                        resumed = Reference(MODEL, fresh.cfg)
                        resumed.load(full)
                        checked_step(fresh, fresh_opt, resumed, batches[2])
        finally:
            dist.barrier()
            if self.rank == 0:
                shutil.rmtree(os.path.dirname(path), ignore_errors=True)


test_torchrun = torchrun_launcher(__file__, nprocs=(4, 8))
