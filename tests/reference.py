"""
The reference every strategy is compared with: a tiny GPT trained on one device over the whole global batch,
written as a plain loop (what `single` does), plus helpers to run a Strategy on the same data.

Global batch layout (the same as train.py's get_batch): a step has `micro_steps` micro-batches over all
data-parallel ranks together; micro-batch k of data-parallel rank r is global micro-batch k * dp_size + r.
"""

import torch
from types import SimpleNamespace

from model import GPT, GPTConfig
from train import DEFAULTS

TINY = dict(block_size=16, vocab_size=64, n_layer=2, n_head=2, n_embd=32, dropout=0.0, bias=True)


def tiny_config(**overrides):
    """A GPTConfig small enough for many CPU runs per test (GPT-2 block unless block="llama")."""
    return GPTConfig(**{**TINY, **overrides})


def train_config(**overrides):
    """train.py's defaults for a test: fp32, no compile, a fixed lr of 1e-3 (no schedule), plus overrides.
    (Adam turns rounding noise in near-zero gradients into updates of up to ~lr, so a much higher lr would
    make fp32 runs that differ only in summation order drift apart by more than 1e-5.)"""
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


def train_single(model_config, batches, cfg, grads=None):
    """Train GPT(model_config) on one device over `batches` (one list of micro-batches per step): each step
    averages the micro-batch losses, backward, clips at cfg.grad_clip, takes an AdamW step.
    Returns (per-step losses as a list of floats, the trained model); `grads`, a list, gets each step's clipped
    gradients {name: tensor}."""
    model = GPT(model_config)
    opt = model.configure_optimizers(cfg.weight_decay, cfg.learning_rate, (cfg.beta1, cfg.beta2), "cpu")
    losses = []
    for step in batches:
        total = 0.0
        for x, y in step:
            _, loss = model(x, y)
            (loss / len(step)).backward()
            total += loss.item() / len(step)
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        if grads is not None:
            grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(total)
    return losses, model


def train_strategy(strategy, model_config, batches, grads=None):
    """Build strategy's model, train over this rank's share of `batches` (as train.py does, without lr schedule).
    Returns (per-step logged losses, the strategy's bare model); `grads`, a list, gets each step's clipped local
    gradients {name: tensor} (strategy.named_parameters())."""
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


# GPT-2's attention key bias cannot change the output: it adds q·b to every score of a query's row, and softmax is
# invariant to that. Its true gradient is 0, so what it receives is rounding noise, which Adam scales up to updates
# of ~1e-6 (noise / eps · lr). Runs that differ only in summation order agree on it to ~1e-6, not to 1e-8 like
# every other parameter; comparisons tighter than 1e-5 leave it out, and say so.
ZERO_GRADIENT_PARAMS = ("attn.k_proj.bias",)


def max_param_diff_but_zero_gradient(model_a, model_b):
    """max_param_diff (models or state_dicts) over the parameters that can change the model's output (all but
    ZERO_GRADIENT_PARAMS)."""
    return max(d for k, d in param_diffs(model_a, model_b).items() if not k.endswith(ZERO_GRADIENT_PARAMS))
