"""
The reference every strategy is compared with: the single-device GPT on the whole global batch, checked step by
step from the strategy's own state (Reference, train_checked: the rule every equality test uses, explained below),
plus helpers to run a Strategy on the same data.

Global batch layout (the same as train.py's get_batch): a step has `micro_steps` micro-batches over all
data-parallel ranks together; micro-batch k of data-parallel rank r is global micro-batch k * dp_size + r.
"""

import copy
import json
import os
from collections import namedtuple
from types import SimpleNamespace

import torch
from torch.distributed.tensor import DTensor

from model import GPT, GPTConfig
from train import DEFAULTS

TINY = dict(block_size=16, vocab_size=64, n_layer=2, n_head=2, n_embd=32, dropout=0.0, bias=True)


def tiny_config(**overrides):
    """A GPTConfig small enough for many CPU runs per test (GPT-2 block unless block="llama")."""
    return GPTConfig(**{**TINY, **overrides})


def train_config(**overrides):
    """train.py's defaults for a test: fp32, no compile, a fixed lr of 1e-3 (no schedule), plus overrides."""
    return SimpleNamespace(**{**DEFAULTS, "dtype": "float32", "compile": False, "learning_rate": 1e-3,
                              "timeout_s": 120, **overrides})


def global_batches(steps, micro_steps, batch_size, model_config, seed=0):
    """steps lists of micro_steps (x, y) pairs, each (batch_size, block_size) int64; identical on every rank
    (seeded generator). x is random, y a fixed function of x, so the model can learn it in a few steps."""
    g = torch.Generator().manual_seed(seed)
    V = model_config.vocab_size
    xs = [[torch.randint(0, V, (batch_size, model_config.block_size), generator=g) for _ in range(micro_steps)]
          for _ in range(steps)]
    return [[(x, (3 * x + 1) % V) for x in step] for step in xs]


def rank_batches(step_batches, dp_rank, dp_size):
    """This data-parallel rank's micro-batches of one step's global list."""
    return step_batches[dp_rank::dp_size]


def train_strategy(strategy, model_config, batches, grads=None):
    """Build strategy's model, train over this rank's share of `batches` (as train.py does, without lr schedule),
    unchecked: for comparing two runs whose arithmetic is identical (tests/test_ac.py); a comparison with the single
    model is train_checked's. Returns (per-step logged losses, the strategy's bare model); `grads`, a list, gets each
    step's clipped local gradients {name: tensor} (strategy.named_parameters())."""
    model = strategy.build_model(model_config)
    opt = strategy.configure_optimizer()
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    losses = []
    for step in batches:
        loss = strategy.forward_backward(rank_batches(step, strategy.dp_rank, strategy.dp_size), scaler)
        strategy.clip_grad_norm_(strategy.cfg.grad_clip)
        if grads is not None:
            grads.append({n: p.grad.clone() for n, p in strategy.named_parameters()})
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return losses, model


def param_diffs(model_a, model_b):
    """{name: largest absolute difference} over the same-named tensors of two models' state_dicts (a model or
    a state_dict each: a sharded strategy passes strategy.full_state_dict())."""
    a, b = (m if isinstance(m, dict) else m.state_dict() for m in (model_a, model_b))
    assert a.keys() == b.keys()
    return {k: (a[k].float() - b[k].float()).abs().max().item() for k in a}


def max_param_diff(model_a, model_b):
    """Largest absolute difference between same-named parameters of two models (or state_dicts) with the same keys."""
    return max(param_diffs(model_a, model_b).values())


# -----------------------------------------------------------------------------
# checking a strategy against the single model, one step at a time: the one rule every test uses
#
# What a parallel strategy fixes is each step's loss, clipped gradients and update, given the parameters and
# optimizer state it starts the step from. Comparing two runs that each go their own way for several AdamW steps
# checks something else: AdamW's update lr·m̂/(√v̂ + eps) turns a rounding difference δ in an element's gradient
# into an update difference of up to lr·δ/(√v̂ + eps), ~lr where the gradient is near eps = 1e-8 (an element of a
# dead GELU unit, the attention key bias whose true gradient is 0), and which elements sit there, and how large δ is,
# depends on the CPU's summation order (AVX2 or AVX-512 kernels, thread count). A fixed parameter tolerance after
# AdamW steps therefore holds on one machine and fails on another, and then the differences feed the next steps'
# gradients. So every strategy is checked step by step against the single model started from the strategy's own
# state (teacher forcing): at each step the single model takes the strategy's parameters, computes the loss and the
# clipped gradients on the whole global batch (compared at LOSS_TOL and GRAD_TOL: only the summation order differs),
# and takes its AdamW step from the strategy's gradients (compared at PARAM_RTOL: the same update rule on the same
# inputs differs only by the rounding of its elementwise arithmetic). By induction the strategy trains the single
# model's trajectory, and no tolerance depends on how the CPU sums.

LOSS_TOL = 1e-5  # |loss - single's| per step: summation order moves a loss of ~4 by a few ulps (measured <= 4.8e-7)
GRAD_TOL = 1e-6  # |clipped gradient - single's| per element (gradients clipped to norm <= 1; measured <= 1e-7)
# |parameter - single's| after the step <= PARAM_RTOL·(|p| + lr): each run rounds the decay product and the update's
# sum (two half-ulps of |p| each, 2^-22·|p| together), and m̂, √v̂ and their quotient carry relative errors of a few
# 2^-24 into the update, whose size is at most lr·B (B <= 1.1 for β1 = 0.9, β2 = 0.95 and t <= 10 by Cauchy-Schwarz);
# 2^-20 covers both with room for a fused kernel's different operation order. A wrong decay group (lr·wd·|p| =
# 1e-4·|p|), learning rate or moment is 100x larger.
PARAM_RTOL = 2 ** -20

Checked = namedtuple("Checked", "losses params margins optimizer")
Checked.__doc__ = """What train_checked returns: the strategy's logged loss of each step (floats), its final parameters
{GPT name: full tensor on the CPU} in the single model's state_dict layout, the Reference's margins, and the
strategy's optimizer (to go on training or save a checkpoint)."""


class Reference:
    """The single-device GPT and its AdamW (tests/reference.py's train_single, nanoGPT's configure_optimizers) that a
    strategy is checked against, one step at a time: check_step runs the single model from the strategy's parameters
    on the whole global batch and applies the strategy's gradients with its own AdamW, whose moments therefore follow
    the strategy's gradients. margins: the largest loss and gradient differences seen, and the largest parameter
    difference as a fraction of its tolerance (< 1: passed). Tensors live on the CPU; the strategy's are moved.
    loss_tol, grad_tol: LOSS_TOL and GRAD_TOL for an fp32 strategy; a mixed-precision one passes its own (derived
    where it is used); the update is always checked at PARAM_RTOL, as its inputs are the strategy's own."""

    def __init__(self, model_config, cfg, loss_tol=LOSS_TOL, grad_tol=GRAD_TOL):
        self.cfg, self.loss_tol, self.grad_tol = cfg, loss_tol, grad_tol
        self.model = GPT(model_config)
        self.opt = self.model.configure_optimizers(cfg.weight_decay, cfg.learning_rate, (cfg.beta1, cfg.beta2), "cpu")
        self.margins = {"loss": 0.0, "grad": 0.0, "param": 0.0}

    @torch.no_grad()
    def set_parameters(self, params):
        """Copy {GPT name: full tensor} into the single model (a tied head's value is the embedding's)."""
        for name, p in self.model.named_parameters():
            p.copy_(params[name])

    def load(self, checkpoint):
        """Start from a checkpoint in the single model's layout, as load_checkpoint_file returns it (a DCP checkpoint
        converted): {"model": {name: tensor}, "optimizer": the state_dict of configure_optimizers' AdamW, ...}."""
        self.set_parameters(checkpoint["model"])
        self.opt.load_state_dict(copy.deepcopy(checkpoint["optimizer"]))  # AdamW steps its state in place

    def assert_optimizer_state(self, state):
        """A torch AdamW state ({index: {"step", "exp_avg", "exp_avg_sq"}}, configure_optimizers' order, as a converted
        checkpoint holds it) equals this reference's, which followed the strategy's gradients: the same steps, and
        the moments within PARAM_RTOL of their magnitude (the same elementwise recurrences on the same inputs)."""
        mine = self.opt.state_dict()["state"]
        assert state.keys() == mine.keys(), (sorted(state), sorted(mine))
        for i, st in mine.items():
            assert state[i]["step"].item() == st["step"].item(), (i, state[i]["step"], st["step"])
            for k in ("exp_avg", "exp_avg_sq"):
                bad = (state[i][k].float().cpu() - st[k]).abs() > PARAM_RTOL * st[k].abs()
                assert not bad.any(), f"AdamW state {i} {k} differs from the single model's beyond rounding"

    def assert_initial(self, params):
        """The strategy starts from the single model's initial weights, exactly (each shard a slice of them)."""
        diff = max_param_diff(params, self.model.state_dict())
        assert diff == 0.0, f"initial parameters differ from the single model's by {diff:.2e}"

    def loss(self, params, x, y):
        """The single model's loss (float) at `params` on one batch x, y (B, T): an eval loss to compare with."""
        self.set_parameters(params)
        with torch.no_grad():
            return self.model(x, y)[1].item()

    def check_step(self, batches, before, loss, grads, after):
        """Check one optimizer step of a strategy: from parameters `before` ({name: full tensor}), on the global
        micro-batches `batches` [(x, y), ...], it logged `loss` (float), clipped its gradients to `grads` ({name: full
        tensor}) and stepped to `after`. Raises AssertionError naming the quantity, parameter and difference that
        exceeds loss_tol, grad_tol or PARAM_RTOL·(|p| + lr)."""
        self.set_parameters(before)
        ref_loss = 0.0
        for x, y in batches:
            micro_loss = self.model(x, y)[1]
            (micro_loss / len(batches)).backward()
            ref_loss += micro_loss.item() / len(batches)
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.grad_clip)
        d = abs(loss - ref_loss)
        assert d < self.loss_tol, (f"loss {loss} differs from the single model's {ref_loss} by {d:.2e} >= "
                                   f"{self.loss_tol:.0e}")
        self.margins["loss"] = max(self.margins["loss"], d)
        with torch.no_grad():
            for name, p in self.model.named_parameters():
                d = (grads[name].float().cpu() - p.grad).abs().max().item()
                assert d < self.grad_tol, (f"gradient of {name} differs from the single model's by {d:.2e} >= "
                                           f"{self.grad_tol:.0e}")
                self.margins["grad"] = max(self.margins["grad"], d)
                p.grad.copy_(grads[name])
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        with torch.no_grad():
            for name, p in self.model.state_dict().items():
                tol = PARAM_RTOL * (p.abs() + self.cfg.learning_rate)
                ratio = ((after[name].float().cpu() - p).abs() / tol).max().item()
                assert ratio < 1, (f"{name} after the step differs from the single model's AdamW step by "
                                   f"{ratio:.2f}x its tolerance {PARAM_RTOL:.1e}·(|p| + lr)")
                self.margins["param"] = max(self.margins["param"], ratio)


def full_parameters(strategy):
    """strategy.full_state_dict() on the CPU (collective)."""
    return {k: v.detach().cpu().clone() for k, v in strategy.full_state_dict().items()}


@torch.no_grad()
def full_gradients(strategy):
    """Every parameter's gradient in the single model's layout {GPT name: full tensor on the CPU}, the same on every
    rank; collective. It reuses strategy.full_state_dict(), which knows every layout (DTensors, flat shards,
    pipeline stages): the gradients are copied into the parameters, gathered, and the parameters put back."""
    def local(t):
        return t.to_local() if isinstance(t, DTensor) else t
    params = [p for _, p in strategy.named_parameters()]
    saved = [local(p).clone() for p in params]
    for p in params:
        local(p).copy_(local(p.grad)) if p.grad is not None else local(p).zero_()
    try:
        return full_parameters(strategy)
    finally:
        for p, s in zip(params, saved):
            local(p).copy_(s)


def checked_step(strategy, optimizer, reference, step_batches, scaler=None):
    """One optimizer step of `strategy` as train.py takes it (this rank's share of the global micro-batches
    `step_batches`, forward and backward, clipping, AdamW), checked by `reference` (Reference.check_step) from the
    parameters it started at. Returns the logged loss (float)."""
    device = strategy.device
    scaler = scaler or torch.amp.GradScaler(device.type, enabled=False)
    before = full_parameters(strategy)
    mine = [(x.to(device), y.to(device)) for x, y in rank_batches(step_batches, strategy.dp_rank, strategy.dp_size)]
    loss = strategy.forward_backward(mine, scaler).item()
    strategy.clip_grad_norm_(strategy.cfg.grad_clip)
    grads = full_gradients(strategy)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    reference.check_step(step_batches, before, loss, grads, full_parameters(strategy))
    return loss


def train_checked(strategy, model_config, batches, reference=None):
    """Build `strategy`'s model and train it over `batches` (one list of global micro-batches per step) as train.py
    does without an lr schedule, checking every step against the single model (Reference; a new one unless given):
    the initial parameters exactly, then each step's loss, clipped gradients and update (checked_step). Collective.
    Returns Checked(losses, final parameters, margins, optimizer); raises AssertionError at the first difference."""
    reference = reference or Reference(model_config, strategy.cfg)
    strategy.build_model(model_config)
    optimizer = strategy.configure_optimizer()
    reference.assert_initial(full_parameters(strategy))
    losses = [checked_step(strategy, optimizer, reference, step) for step in batches]
    log_margins(strategy, reference)
    return Checked(losses, full_parameters(strategy), reference.margins, optimizer)


def log_margins(strategy, reference):
    """Append this check's margins and tolerances to $NANOPARALLEL_MARGINS (a JSON-lines file), from rank 0, when it
    is set: how the machine-independence of the rule is measured (the largest margins under other summation orders:
    threads, ATEN_CPU_CAPABILITY)."""
    path = os.environ.get("NANOPARALLEL_MARGINS")
    if path and strategy.rank == 0:
        record = {"strategy": strategy.strategy, "variant": strategy.variant, "world_size": strategy.world_size,
                  "dtype": strategy.cfg.dtype, "threads": torch.get_num_threads(),
                  "isa": torch.backends.cpu.get_cpu_capability(), "loss_tol": reference.loss_tol,
                  "grad_tol": reference.grad_tol, **reference.margins}
        with open(path, "a") as f:
            f.write(json.dumps(record) + "\n")
