"""
Pipeline parallelism (parallel/pp.py), both variants, against the single-device reference (CPU, gloo).

    torchrun --standalone --nproc_per_node=2 -m unittest tests/test_pp.py     (or 4; pytest launches both)

The schedule tests at the top need no process group: unit-cost simulations of the custom schedules' action lists
give exactly the formula's bubble, never deadlock and respect the in-flight bounds; the splitting rules.
"""

import os
import shutil
import sys
import tempfile
from dataclasses import asdict

import pytest
import torch
import torch.distributed as dist

from model import GPT
from parallel import build_strategy, load_checkpoint_file
from parallel.checkpoint import find_checkpoint
from parallel.pp import balanced_split, schedule_order, split_layers, stage_costs
from sim.pp_timeline import bubble_fraction, formula_bubble, in_flight_bound, simulate
from tests.distributed import DistributedTestCase, run_command, torchrun_launcher
from tests.reference import (LOSS_TOL, Reference, global_batches, max_param_diff, tiny_config, train_checked,
                             train_config)
from tests.test_train import TINY, metrics, train

CPU = torch.device("cpu")
MODEL = tiny_config(n_layer=8)  # 8 layers: p=4 with 2 virtual stages has 8 stages
CASES = {  # variant -> [(schedule, virtual stages)]
    "custom": [("gpipe", 1), ("1f1b", 1), ("interleaved_1f1b", 2)],
    "pytorch": [("gpipe", 1), ("1f1b", 1), ("interleaved_1f1b", 2), ("looped_bfs", 2), ("interleaved_zero_bubble", 2)],
}
MICRO_BATCHES = (1, 4, 8)


def orders(name, p, v, m):
    return [schedule_order(name, p, v, m, r) for r in range(p)]


def max_in_flight(order):
    """Most micro-batches of one rank with a forward done and the backward not yet (simple count along the order)."""
    held, most = set(), 0
    for kind, s, mb in order:
        (held.add if kind == "F" else held.discard)((s, mb))
        most = max(most, len(held))
    return most


# ----------------------------------------------------------------------------------------------------------
# without a process group


@pytest.mark.parametrize("name, v, p, m", [
    (name, v, p, m) for name, v in [("gpipe", 1), ("1f1b", 1), ("interleaved_1f1b", 2), ("interleaved_1f1b", 3)]
    for p in (2, 3, 4, 8) for m in (1, 2, 4, 8, 16) if v == 1 or m % p == 0])  # interleaved: m a multiple of p
def test_unit_cost_bubble_equals_formula(name, v, p, m):
    """Forward 1, backward 2, free communication: every custom schedule's bubble is exactly (p-1)/(v*m+p-1),
    every action of every stage and micro-batch runs once, and each rank holds at most the promised number of
    micro-batches' activations."""
    o = orders(name, p, v, m)
    events = simulate(o, p * v)
    assert bubble_fraction(events) == pytest.approx(formula_bubble(p, m, v), abs=1e-12)
    for r in range(p):
        mine = {(k, s, mb) for k, s, mb in o[r]}
        assert len(mine) == len(o[r]) == 2 * v * m
        assert {s for _, s, _ in mine} == {c * p + r for c in range(v)}
        assert max_in_flight(o[r]) <= in_flight_bound(name, p, v, m, r)
    if name == "1f1b":  # and the bound is reached: 1F1B holds p - rank on a long enough pipeline
        assert [max_in_flight(o[r]) for r in range(p)] == [min(p - r, m) for r in range(p)]


def test_simulate_reports_deadlock():
    """An order that waits for an action no rank can reach (rank 1 backward before its forward) is reported."""
    with pytest.raises(RuntimeError, match="deadlock"):
        simulate([[("F", 0, 0), ("B", 0, 0)], [("B", 1, 0), ("F", 1, 0)]], 2)


def test_split_layers():
    """Explicit split points, the balanced default (the head's cost moves layers off the last stage), and
    one-line errors for impossible splits."""
    assert split_layers(8, 4, "2,5,7") == [(0, 2), (2, 5), (5, 7), (7, 8)]
    assert split_layers(8, 2) == [(0, 4), (4, 8)]
    gpt2 = stage_costs(tiny_config(n_layer=12, n_embd=768, vocab_size=50304, block_size=1024))
    bounds = balanced_split(12, 4, gpt2)
    assert bounds[0] == 0 and bounds[-1] == 12 and bounds[-1] - bounds[-2] < 3  # last stage: fewer layers
    for bad in ("2,5", "5,2,7", "0,3,6", "2,5,8", "a,b,c"):
        with pytest.raises(ValueError, match="pp_split"):
            split_layers(8, 4, bad)
    with pytest.raises(ValueError, match="8 stages .* 4 layers"):
        split_layers(4, 8)


def test_timeline_png(tmp_path):
    """The drawing tool writes a PNG of a schedule (needs matplotlib; the bubble tests above do not)."""
    pytest.importorskip("matplotlib")
    from sim.pp_timeline import main
    out = tmp_path / "t.png"
    assert main(["--unit-costs", "--pp", "4", "--schedule", "interleaved_1f1b", "--microbatches", "8",
                 "--out", str(out)]) == 0
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("args", [["--variant=custom", "--pp_schedule=interleaved_1f1b", "--pp_virtual_stages=2"],
                                  ["--variant=pytorch", "--pp_schedule=1f1b"]])
def test_train_py_equals_single(tmp_path, shakespeare_char_dir, args):
    """train.py end to end on 2 processes: 10 iterations of a 4-layer model with 4 micro-batches log the single
    run's losses (same micro-batching) and the same val loss; the DCP checkpoint converts and samples."""
    common = [f"--data_dir={shakespeare_char_dir}", *TINY, "--n_layer=4", "--max_iters=10", "--eval_interval=10",
              "--gradient_accumulation_steps=4", "--always_save_checkpoint=True"]
    single, pp = str(tmp_path / "single"), str(tmp_path / "pp")
    code, out = train(0, [*common, f"--out_dir={single}"])
    assert code == 0, out[-3000:]
    code, out = train(2, [*common, f"--out_dir={pp}", "--parallel=pp", *args])
    assert code == 0, out[-5000:]
    a, b = metrics(single, "train/loss"), metrics(pp, "train/loss")
    assert sorted(a) == sorted(b) == list(range(10))
    assert max(abs(a[i] - b[i]) for i in a) < 1e-5
    assert abs(metrics(single, "val/loss")[10] - metrics(pp, "val/loss")[10]) < 1e-5
    assert os.path.isdir(find_checkpoint(pp)) and find_checkpoint(pp).endswith("ckpt")  # a DCP directory
    code, out = run_command([sys.executable, "sample.py", f"--out_dir={pp}", "--num_samples=1", "--max_new_tokens=10",
                             "--start=ROMEO:"], 120)
    assert code == 0 and out.startswith("ROMEO:"), out


# ----------------------------------------------------------------------------------------------------------
# under torchrun


class TestPipeline(DistributedTestCase):

    def pp(self, variant, schedule="1f1b", m=4, v=1, **overrides):
        cfg = train_config(parallel="pp", variant=variant, pp_schedule=schedule, pp_virtual_stages=v,
                           gradient_accumulation_steps=m, n_layer=MODEL.n_layer, **overrides)
        return build_strategy(cfg, CPU)

    def valid(self, variant, schedule, m):
        p = self.world_size
        if schedule in ("interleaved_1f1b", "looped_bfs", "interleaved_zero_bubble"):
            return m >= p and m % p == 0
        return not (variant == "pytorch" and schedule == "1f1b" and m < p)

    def test_every_schedule_equals_single(self):
        """Every schedule of both variants, m in {1, 4, 8}: 5 steps, each equal to the single model's from the same
        state (tests/reference.py's rule), and an eval loss (invalid combinations are one-line errors instead).
        Custom schedules: in-flight activations within the schedule's bound, and the recorded order of the last step,
        replayed with unit costs, gives exactly the formula's bubble."""
        for m in MICRO_BATCHES:
            batches = global_batches(5, m, 2, MODEL, seed=m)
            x, y = batches[0][0]
            for variant, cases in CASES.items():
                for schedule, v in cases:
                    with self.subTest(variant=variant, schedule=schedule, m=m):
                        if not self.valid(variant, schedule, m):
                            with self.assertRaises(ValueError):
                                self.pp(variant, schedule, m, v)
                            continue
                        strategy = self.pp(variant, schedule, m, v)
                        reference = Reference(MODEL, strategy.cfg)
                        run = train_checked(strategy, MODEL, batches, reference)
                        self.assertLess(run.losses[-1], run.losses[0])  # not vacuous: the loss fell
                        self.assertLess(abs(strategy.eval_loss(x, y).item() - reference.loss(run.params, x, y)),
                                        LOSS_TOL)
                        self.assertEqual({e[2] for e in strategy.pipeline.timeline}, set(range(m)))
                        if variant == "custom":
                            self.check_custom_schedule(strategy, schedule, m, v)

    def check_custom_schedule(self, strategy, schedule, m, v):
        p, r = self.world_size, self.rank
        self.assertLessEqual(strategy.pipeline.max_in_flight, in_flight_bound(schedule, p, v, m, r))
        order = [(kind, s, mb) for kind, s, mb, _, _ in strategy.pipeline.timeline]
        everyone = [None] * p
        dist.all_gather_object(everyone, order)
        self.assertEqual(everyone[r], schedule_order(schedule, p, v, m, r))
        self.assertAlmostEqual(bubble_fraction(simulate(everyone, p * v)), formula_bubble(p, m, v), delta=1e-12)

    def test_logged_loss_and_grad_norm_reach_every_rank(self):
        """forward_backward's loss and clip_grad_norm_'s norm are the same on every rank, and equal the single
        model's gradient norm (the tied embedding/head counted once)."""
        batches = global_batches(1, 4, 2, MODEL)[0]
        single = GPT(MODEL)
        for x, y in batches:
            (single(x, y)[1] / len(batches)).backward()
        ref_norm = torch.nn.utils.clip_grad_norm_(single.parameters(), float("inf")).item()
        for variant in ("custom", "pytorch"):
            with self.subTest(variant=variant):
                strategy = self.pp(variant, "gpipe", 4)
                strategy.build_model(MODEL)
                loss = strategy.forward_backward(batches, torch.amp.GradScaler("cpu", enabled=False))
                norm = strategy.clip_grad_norm_(float("inf"))
                values = [None] * self.world_size
                dist.all_gather_object(values, (loss.item(), norm.item()))
                self.assertEqual(len(set(values)), 1)
                self.assertAlmostEqual(norm.item(), ref_norm, delta=1e-5)

    def test_bad_configs_are_one_line_errors(self):
        """Each is a ValueError with a one-line message, raised while building the strategy (before any
        send/recv), or a wrong number of micro-batches at forward_backward."""
        p = self.world_size
        bad = [
            (dict(variant="custom", schedule="interleaved_1f1b", m=p // 2 or 1, v=2), "multiple of the pipeline"),
            (dict(variant="pytorch", schedule="interleaved_1f1b", m=p + 1, v=2), "multiple of the pipeline"),
            (dict(variant="custom", schedule="1f1b", m=4, v=2), "one stage per rank"),
            (dict(variant="custom", schedule="interleaved_1f1b", m=p, v=1), "pp_virtual_stages >= 2"),
            (dict(variant="custom", schedule="zigzag"), "not a custom pipeline schedule"),
            (dict(variant="custom", schedule="gpipe", n_layer=p - 1), "stages .* layers"),
            (dict(variant="custom", schedule="interleaved_1f1b", m=p, v=8), "stages .* layers"),
            (dict(variant="custom", schedule="gpipe", pp_split="0"), "pp_split"),
            (dict(variant="custom", schedule="gpipe", dtype="float16"), "float16"),
            (dict(variant="pytorch", schedule="gpipe", pp_size=p + 1), "pp_size"),
            (dict(variant="pytorch", schedule="1f1b", m=1), "at least as many micro-batches"),
        ]
        for kwargs, pattern in bad:
            with self.subTest(**{k: str(v) for k, v in kwargs.items()}):
                variant, schedule = kwargs.pop("variant"), kwargs.pop("schedule")
                m, v = kwargs.pop("m", 4), kwargs.pop("v", 1)
                with self.assertRaisesRegex(ValueError, pattern) as err:
                    cfg = train_config(parallel="pp", variant=variant, pp_schedule=schedule, pp_virtual_stages=v,
                                       gradient_accumulation_steps=m, **{"n_layer": MODEL.n_layer, **kwargs})
                    build_strategy(cfg, CPU)
                self.assertNotIn("\n", str(err.exception))
        strategy = self.pp("custom", "gpipe", 4)
        strategy.build_model(MODEL)
        with self.assertRaisesRegex(ValueError, "built for 4 micro-batches"):
            strategy.forward_backward(global_batches(1, 3, 2, MODEL)[0], None)

    def test_checkpoint_save_convert_and_load(self):
        """A DCP checkpoint after 2 steps: each rank writes only its stages; converted to a single file it holds the
        pipeline's parameters exactly and the single model's AdamW state (tests/reference.py's rule); a fresh
        pipeline (other variant and schedule) loads it exactly."""
        batches = global_batches(2, 4, 2, MODEL)
        path = [tempfile.mkdtemp(prefix="pp-ckpt-") if self.rank == 0 else None]
        dist.broadcast_object_list(path)
        path = os.path.join(path[0], "ckpt")
        try:
            strategy = self.pp("custom", "1f1b", 4)
            reference = Reference(MODEL, strategy.cfg)
            opt = train_checked(strategy, MODEL, batches, reference).optimizer
            strategy.save_checkpoint(path, opt, {"model_args": asdict(MODEL), "iter_num": 2,
                                                 "config": vars(strategy.cfg)})
            full = load_checkpoint_file(path)
            self.assertEqual(max_param_diff(full["model"], strategy.full_state_dict()), 0.0)
            reference.assert_optimizer_state(full["optimizer"]["state"])
            fresh = self.pp("pytorch", "gpipe", 4)
            fresh.build_model(MODEL)
            fresh_opt = fresh.configure_optimizer()
            extra = fresh.load_checkpoint(path, fresh_opt)
            self.assertEqual(extra["iter_num"], 2)
            self.assertEqual(max_param_diff(fresh.full_state_dict(), strategy.full_state_dict()), 0.0)
            for (_, a), (_, b) in zip(fresh.named_parameters(), strategy.named_parameters()):
                self.assertTrue(torch.equal(fresh_opt.state[a]["exp_avg_sq"], opt.state[b]["exp_avg_sq"]))
        finally:
            dist.barrier()
            if self.rank == 0:
                shutil.rmtree(os.path.dirname(path), ignore_errors=True)


test_torchrun = torchrun_launcher(__file__, nprocs=(2, 4))
