"""model.py: shapes, causality, deterministic init (meta build == eager build), both block types learn."""

import math

import pytest
import torch

from model import GPT, GPTConfig, apply_rope, flops_per_token, init_parameter_
from tests.reference import tiny_config

BLOCKS = ("gpt2", "llama")


@pytest.mark.parametrize("block", BLOCKS)
def test_shapes_and_loss_at_init(block):
    cfg = tiny_config(block=block)
    model = GPT(cfg)
    x, y = torch.randint(0, cfg.vocab_size, (2, 3, cfg.block_size))
    logits, loss = model(x, y)
    assert logits.shape == (3, cfg.block_size, cfg.vocab_size)
    assert abs(loss.item() - math.log(cfg.vocab_size)) < 0.5  # near-uniform predictions at init
    logits, loss = model(x)
    assert logits.shape == (3, 1, cfg.vocab_size) and loss is None
    assert model.generate(x[:, :4], max_new_tokens=5, top_k=10).shape == (3, 9)
    with pytest.raises(ValueError, match="exceeds block_size"):
        model(torch.zeros(1, cfg.block_size + 1, dtype=torch.long))


@pytest.mark.parametrize("block", BLOCKS)
def test_causal(block):
    """Changing token t changes no logit at positions < t, and does change position t's."""
    model = GPT(tiny_config(block=block)).eval()
    x = torch.randint(0, 64, (2, 16))
    y = x.clone()
    y[:, 10] = (y[:, 10] + 1) % 64
    with torch.no_grad():
        a, _ = model(x, x)
        b, _ = model(y, y)
    assert torch.equal(a[:, :10], b[:, :10])
    assert (a[:, 10] - b[:, 10]).abs().max() > 1e-4


@pytest.mark.parametrize("block", BLOCKS)
def test_meta_build_equals_eager_build_bitwise(block):
    cfg = tiny_config(block=block)
    eager = GPT(cfg)
    with torch.device("meta"):
        lazy = GPT(cfg)
    assert all(p.is_meta for p in lazy.parameters())
    lazy.to_empty(device="cpu")
    lazy.init_weights()
    assert eager.state_dict().keys() == lazy.state_dict().keys()
    for k, v in eager.state_dict().items():
        assert torch.equal(v, lazy.state_dict()[k]), k
    assert lazy.lm_head.weight is lazy.transformer.wte.weight  # still tied


def test_init_is_per_name_and_gpt2_scaled():
    """A parameter's init depends only on its name (so a shard or unit can be initialised alone), with the
    residual projections scaled by 1/sqrt(2 n_layer), biases 0, norm weights 1."""
    cfg = tiny_config(n_layer=8, n_embd=128, vocab_size=512)
    model = GPT(cfg)
    name = "transformer.h.3.attn.q_proj.weight"
    alone = torch.empty(cfg.n_embd, cfg.n_embd)
    init_parameter_(name, alone, cfg)
    assert torch.equal(alone, model.get_parameter(name))
    assert not torch.equal(alone, model.get_parameter("transformer.h.4.attn.q_proj.weight"))
    std = {n: p.std().item() for n, p in model.named_parameters()}
    assert abs(std[name] - 0.02) < 0.002
    assert abs(std["transformer.h.3.mlp.down_proj.weight"] - 0.02 / math.sqrt(16)) < 0.0005
    assert abs(std["transformer.h.3.attn.out_proj.weight"] - 0.02 / math.sqrt(16)) < 0.0005
    assert torch.all(model.get_parameter("transformer.h.0.ln_1.weight") == 1)
    assert torch.all(model.get_parameter("transformer.h.0.attn.q_proj.bias") == 0)
    other_seed = GPT(tiny_config(n_layer=8, n_embd=128, vocab_size=512, init_seed=7))
    assert not torch.equal(other_seed.get_parameter(name), model.get_parameter(name))


def test_llama_block_has_no_bias_and_no_learned_positions():
    model = GPT(tiny_config(block="llama", bias=True))
    names = [n for n, _ in model.named_parameters()]
    assert not any(n.endswith(".bias") for n in names)
    assert "transformer.wpe.weight" not in names
    assert "transformer.h.0.mlp.gate_proj.weight" in names
    assert isinstance(model.transformer.ln_f, torch.nn.RMSNorm)


def test_rope_rotates_pairs_by_position():
    """RoPE keeps norms, is the identity at position 0, and makes q·k depend only on the position offset."""
    x = torch.randn(1, 1, 8, 16)
    y = apply_rope(x, 10000.0)
    assert torch.allclose(y.norm(dim=-1), x.norm(dim=-1), atol=1e-5)
    assert torch.allclose(y[..., 0, :], x[..., 0, :])
    q, k = torch.randn(16), torch.randn(16)
    qs = apply_rope(q.expand(1, 1, 8, 16).contiguous(), 10000.0)[0, 0]
    ks = apply_rope(k.expand(1, 1, 8, 16).contiguous(), 10000.0)[0, 0]
    assert torch.allclose(qs[5] @ ks[2], qs[6] @ ks[3], atol=1e-5)


@pytest.mark.parametrize("block", BLOCKS)
def test_learns_a_pattern(block):
    """60 AdamW steps on a deterministic next-token rule bring the loss from ~ln(64) to far below it."""
    torch.manual_seed(0)
    cfg = tiny_config(block=block)
    model = GPT(cfg)
    opt = model.configure_optimizers(0.1, 3e-3, (0.9, 0.95), "cpu")
    x = torch.randint(0, 64, (8, 16))
    y = (x * 5 + 3) % 64
    for _ in range(60):
        _, loss = model(x, y)
        loss.backward()
        opt.step()
        opt.zero_grad()
    assert loss.item() < 1.0


def test_configure_optimizers_decay_groups():
    model = GPT(tiny_config())
    opt = model.configure_optimizers(0.1, 1e-3, (0.9, 0.95), "cpu")
    decay, no_decay = opt.param_groups
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert all(p.dim() >= 2 for p in decay["params"]) and all(p.dim() < 2 for p in no_decay["params"])
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(model.parameters()))


def test_flops_per_token_formula():
    """6 N + 12 L H Q T with N the non-embedding parameters (nanoGPT's estimate_mfu)."""
    cfg = tiny_config()
    n = GPT(cfg).get_num_params()
    assert flops_per_token(cfg) == 6 * n + 12 * cfg.n_layer * cfg.n_head * (cfg.n_embd // cfg.n_head) * cfg.block_size
    # GPT-2 small: ~85M non-embedding parameters plus the 38.6M token embedding (tied head) -> ~124M
    gpt2 = GPTConfig(vocab_size=50257, bias=True)
    with torch.device("meta"):
        assert abs(GPT(gpt2).get_num_params(non_embedding=False) / 1e6 - 124.44) < 0.01


def test_config_errors():
    with pytest.raises(ValueError, match="not divisible"):
        GPTConfig(n_embd=100, n_head=3)
    with pytest.raises(ValueError, match="block must be"):
        GPTConfig(block="mamba")
    assert GPTConfig(n_embd=768, block="llama").ffn_hidden == 2048
