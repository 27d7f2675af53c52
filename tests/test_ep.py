"""
Expert parallelism (parallel/ep.py), its variants, and its composition in 3d (parallel/3d.py), against the
single-device model (tests/reference.py's train_checked: every step's loss, clipped gradients and update), on CPU with
gloo: the bytes of the all-to-alls against the routing's token counts, the gradient norm, the tokens per expert the
strategy logs, DCP checkpoints that reshard between EP sizes, bad configs. The models use grouped-query attention
(4 query heads over 2 key/value heads), so the 3d cells also check it under tensor parallelism (kv heads split) and
ring attention (the ring carries the kv heads); and train.py's log of the routing (config/train_shakespeare_char_moe_
cpu.py).

    torchrun --standalone --nproc_per_node=2 -m unittest tests/test_ep.py     (or 4; pytest launches both)

The 5-D cells (dp2 with ep2 x pp2 x tp2 at 8 processes; dp2 x pp2 x cp2 x tp2 with ep4 at 16) are tests/test_ep_5d.py.
"""

import json
import os
import shutil
import tempfile
from dataclasses import asdict

import torch
import torch.distributed as dist

from model import GPT, moe_stats
from parallel import build_strategy, load_checkpoint_file
from parallel.ep import all_to_all_bytes, is_expert_param
from tests.distributed import DistributedTestCase, run_command, torchrun_cmd, torchrun_launcher
from tests.reference import (Reference, checked_step, full_parameters, global_batches, tiny_config, train_checked,
                             train_config)

CPU = torch.device("cpu")
SCALER = torch.amp.GradScaler("cpu", enabled=False)


def moe_config(**overrides):
    """A tiny MoE GPT: 4 layers, MoE in blocks 0 and 2 (8 experts, top-2, a shared expert), 4 query heads over 2
    key/value heads, a load-balancing coefficient large enough to matter in the gradients."""
    return tiny_config(**{"n_layer": 4, "n_head": 4, "n_kv_head": 2, "n_expert": 8, "n_expert_per_token": 2,
                          "moe_every": 2, "n_shared_expert": 1, "moe_aux_loss_coef": 0.1, **overrides})


# 3d cells (world size -> [(variant, overrides)]): EP carved out of dp x cp, with TP (kv heads split, sequence and loss
# parallel), PP, CP (ring attention over kv heads, or Ulysses; EP across the CP ranks), FSDP or DDP for the dense
# weights
GRIDS = {
    2: [("custom", dict(dp_size=1, cp_size=2, ep_size=2, dp_type="ddp")),
        ("pytorch", dict(dp_size=1, cp_size=2, cp_type="ulysses", ep_size=2, dp_type="fsdp", block="llama"))],
    4: [("custom", dict(dp_size=2, tp_size=2, ep_size=2, dp_type="fsdp", sequence_parallel=True, loss_parallel=True)),
        ("pytorch", dict(dp_size=1, pp_size=2, cp_size=2, ep_size=2, dp_type="ddp", moe_every=4)),  # stage 1: no MoE
        ("custom", dict(dp_size=2, cp_size=2, ep_size=4, dp_type="fsdp", block="llama")),
        ("pytorch", dict(dp_size=4, ep_size=2, dp_type="fsdp", sequence_parallel=True))],  # ep 2 of 4: edp = 2
}


class TestExpertParallel(DistributedTestCase):

    def strategy(self, parallel, variant, micro_steps_per_rank=2, dp=None, **overrides):
        dp = dp or self.world_size
        cfg = train_config(parallel=parallel, variant=variant, gradient_accumulation_steps=micro_steps_per_rank * dp,
                           n_layer=4, pp_schedule="1f1b", **overrides)
        return build_strategy(cfg, CPU)

    def test_equals_single(self):
        """2 steps of 2 micro-batches per rank: every step's loss, clipped gradients and AdamW update equal the single
        model's (train_checked), for pytorch (GPT-2 block), custom (Llama block) and triton (2 processes: Triton's
        interpreter is slow); each rank holds 8/world experts per MoE layer; the loss falls."""
        cases = [("pytorch", "gpt2"), ("custom", "llama")] + ([("triton", "gpt2")] if self.world_size == 2 else [])
        for variant, block in cases:
            with self.subTest(variant=variant, block=block):
                config = moe_config(block=block)
                strategy = self.strategy("ep", variant)
                checked = train_checked(strategy, config, global_batches(2, 2 * self.world_size, 2, config))
                experts = [p for n, p in strategy.named_parameters() if is_expert_param(n)]
                self.assertEqual({p.shape[0] for p in experts}, {8 // self.world_size})
                self.assertLess(checked.losses[-1], checked.losses[0])

    def test_grids_equal_single(self):
        """The 3d cells of GRIDS, 2 steps each, equal the single model step by step (train_checked)."""
        for variant, overrides in GRIDS[self.world_size]:
            overrides = dict(overrides)
            config = moe_config(block=overrides.pop("block", "gpt2"), moe_every=overrides.pop("moe_every", 2))
            with self.subTest(variant=variant, **overrides):
                strategy = self.strategy("3d", variant, micro_steps_per_rank=2, dp=overrides["dp_size"], **overrides)
                self.assertEqual(strategy.grid.sizes["ep"], overrides["ep_size"])
                checked = train_checked(strategy, config, global_batches(2, 2 * overrides["dp_size"], 2, config))
                self.assertLess(checked.losses[-1], checked.losses[0])

    def test_all_to_all_bytes_equal_the_routing(self):
        """One step (custom, 2 micro-batches per rank, 2 MoE layers): the all-to-all payload this rank counts is, per
        layer and micro-batch, 8·E bytes of counts plus (N·k + R)·h·4 forward and again backward, N·k its routed rows
        and R the rows its experts received (from every rank's routing: an all-reduce of the tokens per expert); the
        bus bytes leave out the rows it routed to its own experts and its own counts; 5 all-to-alls per layer and
        micro-batch (counts, dispatch, combine, and the two backward)."""
        config = moe_config()
        strategy = self.strategy("ep", "custom")
        strategy.build_model(config)
        batches = global_batches(1, 2 * self.world_size, 2, config)[0][strategy.dp_rank::self.world_size]
        strategy.stats.reset()
        strategy.forward_backward(batches, SCALER)
        tokens, _, calls = moe_stats([strategy.model])  # this rank's routing, summed over layers and micro-batches
        everyone = tokens.clone()
        dist.all_reduce(everyone)
        E, k, h, L = config.n_expert, config.n_expert_per_token, config.n_embd, config.n_expert // self.world_size
        mine = slice(self.rank * L, (self.rank + 1) * L)
        routed, received, own = tokens.sum().item(), everyone[mine].sum().item(), tokens[mine].sum().item()
        N = 2 * config.block_size  # tokens of a micro-batch
        self.assertEqual((calls, routed), (4, 4 * N * k))
        self.assertEqual(strategy.stats.calls["all_to_all"], 5 * calls)
        self.assertEqual(strategy.stats.payload["all_to_all"], 2 * (routed + received) * h * 4 + 8 * E * calls)
        self.assertEqual(strategy.stats.bus["all_to_all"], 2 * (routed + received - 2 * own) * h * 4 +
                         8 * (E - L) * calls)
        self.assertEqual(all_to_all_bytes(N, k, 100, h, E), 2 * (N * k + 100) * h * 4 + 8 * E)
        self.assertEqual(set(strategy.stats.calls), {"all_to_all", "all_reduce"})  # + DDP's dense all-reduce

    def test_grad_norm_and_logged_routing_equal_single(self):
        """After one forward and backward (pytorch and custom): the gradient norm (clip_grad_norm_ at inf, each expert
        counted once) is the single model's; model_metrics() gives, on every rank, the single model's tokens per
        expert (summed over both MoE layers) and mean load-balancing loss."""
        config = moe_config()
        batches = global_batches(1, 2 * self.world_size, 2, config)[0]
        single = GPT(config)
        for x, y in batches:
            (single(x, y)[1] / len(batches)).backward()
        norm = torch.nn.utils.clip_grad_norm_(single.parameters(), float("inf")).item()
        tokens, aux, calls = moe_stats([single])
        for variant in ("pytorch", "custom"):
            with self.subTest(variant=variant):
                strategy = self.strategy("ep", variant)
                strategy.build_model(config)
                strategy.forward_backward(batches[strategy.dp_rank::self.world_size], SCALER)
                self.assertAlmostEqual(strategy.clip_grad_norm_(float("inf")).item(), norm, delta=1e-5 * norm)
                metrics = strategy.model_metrics()
                self.assertEqual(metrics["moe/tokens_per_expert"], [round(t) for t in tokens.tolist()])
                self.assertAlmostEqual(metrics["moe/aux_loss"], (aux / calls).item(), delta=1e-6)
                self.assertAlmostEqual(metrics["moe/load_imbalance"], (tokens.max() / tokens.mean()).item(),
                                       delta=1e-9)
                everyone = [None] * self.world_size
                dist.all_gather_object(everyone, metrics)
                self.assertTrue(all(m == metrics for m in everyone))

    def test_checkpoint_reshards_between_ep_sizes(self):
        """A DCP checkpoint of the ep strategy (custom, experts sharded over every rank) after one step holds the run's
        parameters (converted to one file, exactly); loaded into 3d with ep = world/2 (FSDP for the dense weights,
        pytorch) it gives the same parameters, and the next step equals the single model's from that checkpoint."""
        config = moe_config()
        batches = global_batches(2, 2 * self.world_size, 2, config)
        path = [tempfile.mkdtemp(prefix="ep-ckpt-") if self.rank == 0 else None]
        dist.broadcast_object_list(path)
        path = os.path.join(path[0], "ckpt")
        try:
            strategy = self.strategy("ep", "custom")
            optimizer = train_checked(strategy, config, batches[:1]).optimizer
            saved = full_parameters(strategy)
            strategy.save_checkpoint(path, optimizer, {"model_args": asdict(config), "iter_num": 1,
                                                       "config": vars(strategy.cfg)})
            ckpt = load_checkpoint_file(path)
            self.assertTrue(all(torch.equal(ckpt["model"][n], t) for n, t in saved.items() if n != "lm_head.weight"))
            fresh = self.strategy("3d", "pytorch", dp_size=self.world_size, ep_size=self.world_size // 2,
                                  dp_type="fsdp")
            fresh.build_model(config)
            fresh_opt = fresh.configure_optimizer()
            self.assertEqual(fresh.load_checkpoint(path, fresh_opt)["iter_num"], 1)
            loaded = full_parameters(fresh)
            self.assertTrue(all(torch.equal(loaded[n], t) for n, t in saved.items()))
            reference = Reference(config, fresh.cfg)
            reference.load(ckpt)
            checked_step(fresh, fresh_opt, reference, batches[1])
        finally:
            dist.barrier()
            if self.rank == 0:
                shutil.rmtree(os.path.dirname(path), ignore_errors=True)

    def test_bad_configs_are_one_line_errors(self):
        """Raised before any collective: ep_size not the world for parallel=ep, experts that do not divide, a dense
        model, an ep that does not divide dp x cp, kv heads that TP cannot split."""
        W = self.world_size
        cases = [("ep", dict(ep_size=W + 1), moe_config()),
                 ("ep", {}, moe_config(n_expert=W + 1, n_expert_per_token=1)),
                 ("ep", {}, tiny_config()),
                 ("3d", dict(dp_size=W, ep_size=3), moe_config()),
                 ("3d", dict(dp_size=W // 2, tp_size=2), moe_config(n_kv_head=1))]
        for parallel, overrides, config in cases:
            with self.subTest(parallel=parallel, **overrides):
                with self.assertRaises(ValueError) as e:
                    self.strategy(parallel, "custom", dp=overrides.get("dp_size"), **overrides).build_model(config)
                self.assertNotIn("\n", str(e.exception))


def test_train_py_logs_tokens_per_expert(tmp_path, shakespeare_char_dir):
    """config/train_shakespeare_char_moe_cpu.py (ep over 2 processes, custom) for 3 iterations through train.py: each
    step's metrics.jsonl record has the tokens per expert (8 experts, summed over the 4 MoE layers: 12 sequences x 64
    tokens x top-2 x 4 layers in all) and the load-balancing loss, which the log line prints."""
    out = str(tmp_path / "out")
    code, text = run_command(torchrun_cmd(2, "train.py", "config/train_shakespeare_char_moe_cpu.py", "--max_iters=3",
                                          "--eval_iters=1", f"--data_dir={shakespeare_char_dir}", f"--out_dir={out}"),
                             300)
    assert code == 0, text[-3000:]
    with open(os.path.join(out, "metrics.jsonl")) as f:
        steps = [m for m in map(json.loads, f) if "moe/tokens_per_expert" in m]
    assert [m["iter"] for m in steps] == [0, 1, 2]
    for m in steps:
        assert len(m["moe/tokens_per_expert"]) == 8 and sum(m["moe/tokens_per_expert"]) == 12 * 64 * 2 * 4
        assert 1.0 <= m["moe/aux_loss"] < 8.0 and m["moe/load_imbalance"] >= 1.0
    assert "moe/aux_loss" in text and "moe/load_imbalance" in text


test_torchrun = torchrun_launcher(__file__, nprocs=(2, 4))
