"""
The rpc pipeline variant (parallel/pp.py, RpcPipeline: torch.distributed.rpc, RRefs, distributed autograd) against
the single-device reference (CPU, gloo + TensorPipe).

    torchrun --standalone --nproc_per_node=2 -m unittest tests/test_pp_rpc.py     (or 4; pytest launches both)

The strategies of one launch share the process's RPC agent (torch.distributed.rpc cannot be restarted in a
process); the test class shuts it down at its end.
"""

import torch
import torch.distributed as dist

from parallel import build_strategy
from parallel.pp_rpc import shutdown_rpc
from tests.distributed import DistributedTestCase, torchrun_launcher
from tests.reference import LOSS_TOL, Reference, global_batches, tiny_config, train_checked, train_config
from tests.test_train import TINY, metrics, train

CPU = torch.device("cpu")
MODEL = tiny_config(n_layer=4)


def pp(variant, m, **overrides):
    cfg = train_config(parallel="pp", variant=variant, pp_schedule="gpipe", gradient_accumulation_steps=m,
                       n_layer=MODEL.n_layer, **overrides)
    return build_strategy(cfg, CPU)


def test_train_py_equals_single(tmp_path, shakespeare_char_dir):
    """train.py end to end on 2 processes with the rpc variant: 6 iterations of a 4-layer model with 4
    micro-batches log the single run's losses and val loss, and the run ends cleanly (close, then teardown)."""
    common = [f"--data_dir={shakespeare_char_dir}", *TINY, "--n_layer=4", "--max_iters=6", "--eval_interval=6",
              "--gradient_accumulation_steps=4"]
    single, rpc = str(tmp_path / "single"), str(tmp_path / "rpc")
    code, out = train(0, [*common, f"--out_dir={single}"])
    assert code == 0, out[-3000:]
    code, out = train(2, [*common, f"--out_dir={rpc}", "--parallel=pp", "--variant=rpc", "--pp_schedule=gpipe"])
    assert code == 0, out[-5000:]
    a, b = metrics(single, "train/loss"), metrics(rpc, "train/loss")
    assert sorted(a) == sorted(b) == list(range(6))
    assert max(abs(a[i] - b[i]) for i in a) < 1e-5
    assert abs(metrics(single, "val/loss")[6] - metrics(rpc, "val/loss")[6]) < 1e-5


class TestRpcPipeline(DistributedTestCase):

    @classmethod
    def tearDownClass(cls):
        shutdown_rpc(timeout_s=120)
        super().tearDownClass()

    def test_equals_single(self):
        """m in {1, 4}: 5 steps, each equal to the single model's from the same state (tests/reference.py's rule,
        which the custom GPipe follows too), and an eval loss; the logged loss is the same on every rank; every
        rank's timeline has a forward and a backward of every micro-batch."""
        for m in (1, 4):
            batches = global_batches(5, m, 2, MODEL, seed=m)
            x, y = batches[0][0]
            with self.subTest(m=m):
                strategy = pp("rpc", m)
                reference = Reference(MODEL, strategy.cfg)
                run = train_checked(strategy, MODEL, batches, reference)
                self.assertLess(abs(strategy.eval_loss(x, y).item() - reference.loss(run.params, x, y)), LOSS_TOL)
                everyone = [None] * self.world_size
                dist.all_gather_object(everyone, run.losses)
                self.assertTrue(all(other == run.losses for other in everyone))
                self.assertEqual(sorted((kind, mb) for kind, _, mb, _, _ in strategy.pipeline.timeline),
                                 sorted((kind, mb) for kind in "BF" for mb in range(m)))
                self.assertLess(run.losses[-1], run.losses[0])  # not vacuous: the loss fell

    def test_bad_configs_are_one_line_errors(self):
        """Schedules other than GPipe and virtual stages are one-line ValueErrors while building the strategy."""
        for kwargs, pattern in [(dict(pp_schedule="1f1b"), "not a rpc pipeline schedule"),
                                (dict(pp_virtual_stages=2), "one stage per rank")]:
            with self.subTest(**kwargs):
                with self.assertRaisesRegex(ValueError, pattern) as err:
                    build_strategy(train_config(**{"parallel": "pp", "variant": "rpc", "pp_schedule": "gpipe",
                                                   "gradient_accumulation_steps": 4, "n_layer": MODEL.n_layer,
                                                   **kwargs}), CPU)
                self.assertNotIn("\n", str(err.exception))


test_torchrun = torchrun_launcher(__file__, nprocs=(2, 4))
