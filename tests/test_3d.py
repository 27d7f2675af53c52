"""
3-D parallelism (parallel/3d.py): data x pipeline x tensor parallel on one rank grid, against the single-device
reference on the same global batch (CPU, gloo).

    torchrun --standalone --nproc_per_node=8 -m unittest tests/test_3d.py     (or 4; pytest launches both)

At 8 processes the full grid dp=2 x pp=2 x tp=2, at 4 the 2-D cuts dp x tp, dp x pp and pp x tp; DP as DDP and as
FSDP. The grid layout and its checks need no process group.
"""

import os
import shutil
import tempfile
from dataclasses import asdict

import pytest
import torch
import torch.distributed as dist

from model import GPT
from parallel import build_strategy, load_checkpoint_file
from parallel.grid import coords, describe, groups, resolve_sizes
from tests.distributed import DistributedTestCase, torchrun_launcher
from tests.reference import (LOSS_TOL, Reference, checked_step, global_batches, max_param_diff, tiny_config,
                             train_checked, train_config)

CPU = torch.device("cpu")
MODEL = tiny_config(n_layer=4, vocab_size=65)  # 4 layers: pp=2 with 2 virtual stages; 65: an uneven vocab split
B = 2  # micro-batch
CASES = {  # world size -> [(dp, pp, tp, overrides)]
    8: [(2, 2, 2, dict(dp_type="ddp")),
        (2, 2, 2, dict(dp_type="fsdp")),
        (2, 2, 2, dict(dp_type="fsdp", sequence_parallel=True, loss_parallel=True, pp_schedule="interleaved_1f1b",
                       pp_virtual_stages=2, gradient_accumulation_steps=8))],
    4: [(2, 1, 2, dict(dp_type="ddp", sequence_parallel=True)),
        (2, 1, 2, dict(dp_type="fsdp", loss_parallel=True)),
        (2, 2, 1, dict(dp_type="ddp", pp_schedule="gpipe")),
        (2, 2, 1, dict(dp_type="fsdp")),
        (1, 2, 2, dict(dp_type="fsdp", sequence_parallel=True, loss_parallel=True)),
        (1, 2, 2, dict(dp_type="ddp", pp_schedule="interleaved_1f1b", pp_virtual_stages=2))],
}


# ----------------------------------------------------------------------------------------------------------
# without a process group

def grid(dp, pp, tp):
    return {"dp": dp, "pp": pp, "cp": 1, "tp": tp}


def test_rank_grid_for_8_ranks():
    """Megatron's layout: TP innermost (consecutive ranks), then PP, then DP."""
    assert [tuple(coords(r, grid(2, 2, 2))[d] for d in ("dp", "pp", "tp")) for r in range(8)] == [
        (0, 0, 0), (0, 0, 1), (0, 1, 0), (0, 1, 1), (1, 0, 0), (1, 0, 1), (1, 1, 0), (1, 1, 1)]
    assert {d: g for d, g in groups(grid(2, 2, 2)).items() if d not in ("cp", "dp_cp")} == {
        "dp": [[0, 4], [1, 5], [2, 6], [3, 7]], "pp": [[0, 2], [1, 3], [4, 6], [5, 7]],
        "tp": [[0, 1], [2, 3], [4, 5], [6, 7]]}
    assert groups(grid(1, 2, 4))["tp"] == [[0, 1, 2, 3], [4, 5, 6, 7]]
    assert groups(grid(4, 1, 2))["dp"] == [[0, 2, 4, 6], [1, 3, 5, 7]]
    text = describe(grid(2, 2, 2))
    assert "rank 5: dp=1 pp=0 cp=0 tp=1" in text and "tp groups: [0,1] [2,3] [4,5] [6,7]" in text


def test_rank_grid_with_cp_for_16_ranks():
    """The fourth dimension between TP and PP: rank = (((dp·pp + pp_rank)·cp + cp_rank)·tp + tp_rank; a CP ring is tp
    ranks apart, the dp x cp ranks that hold the same weights are the ranks sharing (pp, tp)."""
    sizes = {"dp": 2, "pp": 2, "cp": 2, "tp": 2}
    assert [tuple(coords(r, sizes).values()) for r in (0, 1, 2, 5, 9, 15)] == [
        (0, 0, 0, 0), (0, 0, 0, 1), (0, 0, 1, 0), (0, 1, 0, 1), (1, 0, 0, 1), (1, 1, 1, 1)]
    g = groups(sizes)
    assert g["cp"][:2] == [[0, 2], [1, 3]] and g["tp"][:2] == [[0, 1], [2, 3]] and g["pp"][0] == [0, 4]
    assert g["dp"][0] == [0, 8] and g["dp_cp"][0] == [0, 2, 8, 10]
    assert "dp_cp groups: [0,2,8,10]" in describe(sizes)


@pytest.mark.parametrize("world, dp, pp, tp, expected", [
    (8, 0, 2, 2, (2, 2, 2)), (8, 0, 0, 0, (8, 1, 1)), (8, 0, 4, 0, (2, 4, 1)), (8, 1, 2, 4, (1, 2, 4))])
def test_rank_grid_sizes(world, dp, pp, tp, expected):
    """0 means: dp takes the rest of the world, pp and tp are 1."""
    sizes = resolve_sizes(world, dp, pp, 0, tp)
    assert (sizes["dp"], sizes["pp"], sizes["tp"]) == expected


@pytest.mark.parametrize("world, dp, pp, tp", [(8, 3, 2, 2), (8, 0, 3, 1), (8, 2, 2, 1), (6, 0, 4, 1), (8, -1, 2, 2)])
def test_invalid_grids_are_one_line_errors(world, dp, pp, tp):
    with pytest.raises(ValueError) as e:
        resolve_sizes(world, dp, pp, 0, tp)
    assert "\n" not in str(e.value)


# ----------------------------------------------------------------------------------------------------------
# under torchrun


class Test3D(DistributedTestCase):

    def strategy(self, variant, dp, pp, tp, **overrides):
        overrides = {"pp_schedule": "1f1b", "gradient_accumulation_steps": 4, **overrides}
        cfg = train_config(parallel="3d", variant=variant, dp_size=dp, pp_size=pp, tp_size=tp, n_layer=MODEL.n_layer,
                           **overrides)
        return build_strategy(cfg, CPU)

    def test_every_grid_equals_single(self):
        """3 steps on the same global batch (micro-batch x micro-batches per pipeline x dp sequences): every step equals
        the single model's from the same state (tests/reference.py's rule), the logged losses are on every rank, and
        an eval loss equals the single model's."""
        for dp, pp, tp, overrides in CASES.get(self.world_size, []):
            m = overrides.get("gradient_accumulation_steps", 4)
            batches = global_batches(3, m, B, MODEL, seed=m)
            x, y = batches[0][0]
            with self.subTest(dp=dp, pp=pp, tp=tp, **overrides):
                strategy = self.strategy("custom", dp, pp, tp, **overrides)
                self.assertEqual((strategy.dp_size, strategy.sizes["pp"]), (dp, pp))
                reference = Reference(MODEL, strategy.cfg)
                run = train_checked(strategy, MODEL, batches, reference)
                self.assertLess(abs(strategy.eval_loss(x, y).item() - reference.loss(run.params, x, y)), LOSS_TOL)
                self.assertLess(run.losses[-1], run.losses[0])  # not vacuous: it learned

    def test_grad_norm_counts_every_element_once(self):
        """clip_grad_norm_(inf) equals the single model's gradient norm on every rank (TP-replicated parameters,
        DDP replicas and the tied embedding/head copy counted once)."""
        for dp, pp, tp, overrides in CASES.get(self.world_size, [])[:2]:
            batches = global_batches(1, 4, B, MODEL)[0]
            single = GPT(MODEL)
            for x, y in batches:
                (single(x, y)[1] / len(batches)).backward()
            ref = torch.nn.utils.clip_grad_norm_(single.parameters(), float("inf")).item()
            with self.subTest(dp=dp, pp=pp, tp=tp, **overrides):
                strategy = self.strategy("custom", dp, pp, tp, **overrides)
                strategy.build_model(MODEL)
                strategy.forward_backward(batches[strategy.dp_rank::strategy.dp_size],
                                          torch.amp.GradScaler("cpu", enabled=False))
                norm = strategy.clip_grad_norm_(float("inf")).item()
                self.assertAlmostEqual(norm, ref, delta=1e-5 * ref)
                everyone = [None] * self.world_size
                dist.all_gather_object(everyone, norm)
                self.assertEqual(len(set(everyone)), 1)

    def test_comm_per_step_is_the_sum_of_the_1d_formulas(self):
        """dp x pp x tp, DP as DDP, no SP: the payload bytes of one step (m micro-batches of b x s tokens, h = n_embd,
        this rank's L blocks and Psi parameters, 4-byte fp32) are exactly those of the three 1-D algorithms on their
        groups: DP one all-reduce of Psi; TP per micro-batch 4 all-reduces of b*s*h per block, + 1 for the embedding
        (first stage) and 1 for the head's input gradient (last stage), and the all-gather of the b*s*V logits
        (last stage); PP per micro-batch one b*s*h activation sent forward (not from the last stage) and one gradient
        backward (not from the first), the tied embedding gradient both ways, the loss broadcast; 1 scalar for clip."""
        dp, pp, tp = {8: (2, 2, 2), 4: (1, 2, 2)}[self.world_size]
        m = 2
        strategy = self.strategy("custom", dp, pp, tp, dp_type="ddp", gradient_accumulation_steps=m * dp)
        strategy.build_model(MODEL)
        batches = global_batches(1, m * dp, B, MODEL)[0][strategy.dp_rank::dp]
        strategy.stats.reset()
        strategy.forward_backward(batches, torch.amp.GradScaler("cpu", enabled=False))
        strategy.clip_grad_norm_(1.0)
        pipeline = strategy.pipeline
        first, last = pipeline.pp_rank == 0, pipeline.pp_rank == pp - 1
        L = sum(hi - lo for lo, hi in (strategy.bounds[s] for s in pipeline.my_stages))
        psi = sum(p.numel() for _, p in strategy.named_parameters())
        act, V = B * MODEL.block_size * MODEL.n_embd * 4, MODEL.vocab_size
        v_local = pipeline.tied_param.numel() if pipeline.tied_param is not None else 0
        expected = {
            "all_reduce": psi * 4 * (dp > 1) + m * (4 * L + first + last) * act + 4,  # dp=1: no DP wrapper
            "all_gather": m * B * MODEL.block_size * -(-V // tp) * tp * 4 if last else 0,
            "send": m * act * ((not last) + (not first)) + v_local * 4,
            "recv": m * act * ((not last) + (not first)) + v_local * 4,
            "broadcast": 4,
        }
        self.assertEqual({k: v for k, v in strategy.stats.payload.items() if v},
                         {k: v for k, v in expected.items() if v})

    def test_invalid_configs_are_one_line_errors(self):
        """Raised on every rank before any collective: a grid that is not the world, a TP size that does not
        divide the heads, an unknown dp_type."""
        for kwargs in (dict(dp=3, pp=2, tp=2), dict(dp=self.world_size // 4, pp=1, tp=4, n_head=2),
                       dict(dp=0, pp=1, tp=2, dp_type="zero")):
            dp, pp, tp = kwargs.pop("dp"), kwargs.pop("pp"), kwargs.pop("tp")
            with self.subTest(dp=dp, pp=pp, tp=tp, **kwargs):
                with self.assertRaises(ValueError) as e:
                    strategy = self.strategy("custom", dp, pp, tp, **kwargs)
                    strategy.build_model(tiny_config(n_layer=4, n_head=kwargs.get("n_head", 2)))
                self.assertNotIn("\n", str(e.exception))

    def test_checkpoint_save_convert_load_and_resume(self):
        """A DCP checkpoint after 2 steps on one grid (FSDP): converted to one file it holds the run's model exactly
        and the single model's AdamW state; loaded on another grid (and DP as DDP) it resumes exactly, and its next
        step equals the single model's from the checkpoint (tests/reference.py's rule)."""
        save_grid, load_grid = {8: ((2, 2, 2), (4, 1, 2)), 4: ((2, 2, 1), (1, 2, 2))}[self.world_size]
        batches = global_batches(3, 4, B, MODEL)
        path = [tempfile.mkdtemp(prefix="3d-ckpt-") if self.rank == 0 else None]
        dist.broadcast_object_list(path)
        path = os.path.join(path[0], "ckpt")
        try:
            strategy = self.strategy("custom", *save_grid, dp_type="fsdp")
            reference = Reference(MODEL, strategy.cfg)
            opt = train_checked(strategy, MODEL, batches[:2], reference).optimizer
            strategy.save_checkpoint(path, opt, {"model_args": asdict(MODEL), "iter_num": 2,
                                                 "config": vars(strategy.cfg)})
            converted = load_checkpoint_file(path)
            self.assertEqual(max_param_diff(converted["model"], strategy.full_state_dict()), 0.0)
            reference.assert_optimizer_state(converted["optimizer"]["state"])
            fresh = self.strategy("custom", *load_grid, dp_type="ddp")
            fresh.build_model(MODEL)
            fresh_opt = fresh.configure_optimizer()
            self.assertEqual(fresh.load_checkpoint(path, fresh_opt)["iter_num"], 2)
            self.assertEqual(max_param_diff(fresh.full_state_dict(), converted["model"]), 0.0)
            resumed = Reference(MODEL, fresh.cfg)
            resumed.load(converted)
            checked_step(fresh, fresh_opt, resumed, batches[2])
        finally:
            dist.barrier()
            if self.rank == 0:
                shutil.rmtree(os.path.dirname(path), ignore_errors=True)


test_torchrun = torchrun_launcher(__file__, nprocs=(4, 8))
