"""
Activation checkpointing (parallel.apply_ac): every strategy and variant trained with activation_checkpoint="full"
and "selective" (torchtitan's op-level policy, and every second block) takes the same steps as with "none".

    torchrun --standalone --nproc_per_node=2 -m unittest tests/test_ac.py      (or 4; pytest launches both)

At 2 processes the 1-D strategies (ddp, fsdp, tp with sequence and loss parallelism, pp 1F1B; pytorch and custom:
triton and nccl run custom's algorithm), at 4 the 3d grids dp2·pp2 (FSDP inside a pipeline) and pp2·tp2 (each
variant; dp x tp is the 1-D cases composed without a pipeline). Dropout is on, so the recomputed forward must
also reproduce the dropout masks (checkpoint restores the RNG state). A checkpointed run computes the same
operations on the same inputs as the plain one (the recomputation repeats them), so the two agree exactly (measured:
0.0 in every case) and AdamW has no rounding difference to amplify: the fixed TOLERANCE holds on any CPU, unlike a
comparison of two differently-summed runs (tests/reference.py). What needs no process group: the names and
state_dict keys are unchanged, `pos` reaches the blocks, and bad modes are one-line errors.
"""

import pytest
import torch

from model import GPT
from parallel import apply_ac, build_strategy
from tests.distributed import DistributedTestCase, torchrun_launcher
from tests.reference import global_batches, max_param_diff, tiny_config, train_config, train_strategy

CPU = torch.device("cpu")
MODEL = tiny_config(n_layer=4, vocab_size=65, dropout=0.1)  # 65: TP's uneven vocabulary split
MODES = [("full", "op"), ("selective", "op"), ("selective", "2")]
TOLERANCE = 1e-6
CASES = {  # world size -> [(name, config overrides, the modes tested)]; "every second block" is "full" on half of
    # the blocks: tested where it differs from full, in FSDP (an unwrapped unit next to a recomputed one) and pp
    2: [(f"{s}/{v}", dict(parallel=s, variant=v, **extra),
         MODES if v == "custom" and s in ("fsdp", "pp") else MODES[:2])
        for s, extra in (("ddp", {}), ("fsdp", {}), ("tp", dict(sequence_parallel=True, loss_parallel=True)),
                         ("pp", {}))
        for v in ("pytorch", "custom")],
    4: [(f"3d/{v} dp{dp}·pp{pp}·tp{tp}", dict(parallel="3d", variant=v, dp_size=dp, pp_size=pp, tp_size=tp,
                                               sequence_parallel=tp > 1, loss_parallel=tp > 1), MODES[:2])
        for v in ("pytorch", "custom") for dp, pp, tp in ((2, 2, 1), (1, 2, 2))],
}


# ----------------------------------------------------------------------------------------------------------
# without a process group

def test_names_and_pos_unchanged():
    """apply_ac keeps every parameter name and state_dict key, passes `pos` through (context parallelism's positions)
    and computes the same loss and gradients as the plain model, in each mode."""
    config = tiny_config(n_layer=4)
    x = torch.randint(0, config.vocab_size, (2, config.block_size // 2))
    pos = torch.arange(5, 5 + config.block_size // 2)  # not 0..T-1: a block that dropped pos would change the loss
    ref = GPT(config)
    loss = ref(x, x, pos=pos)[1]
    loss.backward()
    for mode, option in [("none", "op"), *MODES]:
        model = apply_ac(GPT(config), mode, option)
        assert list(model.state_dict()) == list(ref.state_dict())
        assert [n for n, _ in model.named_parameters()] == [n for n, _ in ref.named_parameters()]
        checkpointed = [getattr(b, "recomputes_in_backward", False) for b in model.transformer.h.values()]
        assert checkpointed == {"none": [False] * 4, "full": [True] * 4, "selective": [True] * 4 if option == "op"
                                else [False, True, False, True]}[mode]
        got = model(x, x, pos=pos)[1]
        got.backward()
        assert got.item() == loss.item()
        for (name, p), (_, q) in zip(model.named_parameters(), ref.named_parameters()):
            assert torch.allclose(p.grad, q.grad, rtol=0, atol=1e-7), name


@pytest.mark.parametrize("mode, option", [("some", "op"), ("selective", "0"), ("selective", "every")])
def test_bad_modes_are_one_line_errors(mode, option):
    with pytest.raises(ValueError) as e:
        build_strategy(train_config(activation_checkpoint=mode, selective_ac_option=option), CPU)
    assert "\n" not in str(e.value)


# ----------------------------------------------------------------------------------------------------------
# under torchrun

class TestActivationCheckpointing(DistributedTestCase):

    def train(self, mode, option, overrides):
        """3 steps of 4 micro-batches of 2 sequences with this AC mode: (logged losses, gathered parameters)."""
        torch.manual_seed(1000 + self.rank)  # the same dropout masks in every mode
        cfg = train_config(activation_checkpoint=mode, selective_ac_option=option, gradient_accumulation_steps=4,
                           batch_size=2, n_layer=MODEL.n_layer, **overrides)
        strategy = build_strategy(cfg, CPU)
        losses, _ = train_strategy(strategy, MODEL, global_batches(3, 4, 2, MODEL))
        return losses, strategy.full_state_dict()

    def test_every_mode_equals_none(self):
        """Losses and parameters after 3 steps within 1e-6 of activation_checkpoint="none", for every strategy and
        variant at this world size, in every mode."""
        cases = CASES.get(self.world_size, [])
        self.assertTrue(cases)
        for name, overrides, modes in cases:
            ref_losses, ref_params = self.train("none", "op", overrides)
            self.assertLess(ref_losses[-1], ref_losses[0])  # not vacuous: it learned
            for mode, option in modes:
                with self.subTest(case=name, mode=mode, option=option):
                    losses, params = self.train(mode, option, overrides)
                    loss_diff = max(abs(a - b) for a, b in zip(losses, ref_losses))
                    param_diff = max_param_diff(params, ref_params)
                    if self.rank == 0:
                        print(f"{name} {mode}/{option}: losses within {loss_diff:.1e}, parameters {param_diff:.1e}")
                    self.assertLess(loss_diff, TOLERANCE, (losses, ref_losses))
                    self.assertLess(param_diff, TOLERANCE)

    def test_rpc_pipeline_equals_none(self):
        """pp's rpc variant (stages driven over torch.distributed.rpc, distributed autograd) at 2 processes: full and
        selective equal none within 1e-6. Without dropout: its stages run on RPC threads that share the RNG in no
        fixed order, so with dropout even two runs of "none" differ (by ~1e-2 after 3 steps)."""
        if self.world_size != 2:
            self.skipTest("one pipeline of 2 stages")
        overrides = dict(parallel="pp", variant="rpc", pp_schedule="gpipe")
        model = tiny_config(n_layer=4, vocab_size=65)
        runs = {}
        for mode in ("none", "full", "selective"):
            torch.manual_seed(1000 + self.rank)
            cfg = train_config(activation_checkpoint=mode, gradient_accumulation_steps=4, batch_size=2,
                               n_layer=model.n_layer, **overrides)
            strategy = build_strategy(cfg, CPU)
            losses, _ = train_strategy(strategy, model, global_batches(3, 4, 2, model))
            runs[mode] = (losses, strategy.full_state_dict())
        strategy.close()  # the process's one RPC agent: every rpc strategy of this process is done
        for mode in ("full", "selective"):
            with self.subTest(mode=mode):
                self.assertLess(max(abs(a - b) for a, b in zip(runs[mode][0], runs["none"][0])), TOLERANCE)
                self.assertLess(max_param_diff(runs[mode][1], runs["none"][1]), TOLERANCE)

    def test_context_parallel_equals_none(self):
        """cp (ring attention; torch's context_parallel) with full and selective checkpointing equals none within 1e-6,
        both variants, on this world's CP group: the recomputed forward runs the ring again. Without dropout (CP
        rejects it)."""
        model = tiny_config(n_layer=4, vocab_size=65)
        for variant in ("pytorch", "custom"):
            runs = {}
            for mode in ("none", "full", "selective"):
                cfg = train_config(parallel="cp", variant=variant, activation_checkpoint=mode,
                                   gradient_accumulation_steps=2, n_layer=model.n_layer)
                losses, trained = train_strategy(build_strategy(cfg, CPU), model, global_batches(3, 2, 2, model))
                runs[mode] = (losses, trained.state_dict())
            for mode in ("full", "selective"):
                with self.subTest(variant=variant, mode=mode):
                    self.assertLess(max(abs(a - b) for a, b in zip(runs[mode][0], runs["none"][0])), TOLERANCE)
                    self.assertLess(max_param_diff(runs[mode][1], runs["none"][1]), TOLERANCE)


test_torchrun = torchrun_launcher(__file__, nprocs=(2, 4), timeout_s=400)
