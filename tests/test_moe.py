"""
model.py's mixture-of-experts feed-forward and grouped-query attention on one device: the MoE layer against a loop
over tokens and their experts, the load-balancing loss against its formula, the dense model bitwise unchanged, the
routing statistics counted once, and the Llama 3 configuration (toy scale through train.py, full size in the
simulator).
"""

import hashlib
import json
import os
import sys

import pytest
import torch
import torch.nn.functional as F

from model import GPT, GPTConfig, MoE, apply_rope, flops_per_token, moe_stats, n_moe_layers
from parallel import apply_ac
from tests.distributed import run_command
from tests.reference import TINY, tiny_config

BLOCKS = ("gpt2", "llama")


def moe_config(**overrides):
    """A tiny GPT whose even blocks are MoE (4 experts, top-2, a shared expert) with grouped-query attention."""
    return tiny_config(**{"n_layer": 4, "n_head": 4, "n_kv_head": 2, "n_expert": 4, "n_expert_per_token": 2,
                          "moe_every": 2, "n_shared_expert": 1, **overrides})


# ----------------------------------------------------------------------------------------------------------
# with n_expert = 0 and n_kv_head = n_head the model is today's, bitwise

# sha256 over (name, shape, bytes) of every initial parameter of tiny_config(block=...), computed with model.py before
# MoE and grouped-query attention were added (CPU normal_ draws are the same on every machine)
TODAYS_INIT = {"gpt2": "843dcf9647f5bf90485ab080dc97e84c5109f62650813ec1e5fb9389a6c89116",
               "llama": "95f4d18ad3c6b76a70f17c4495843b66f568ee69ef5763b2358950a895ebb25c"}


def init_fingerprint(model):
    h = hashlib.sha256()
    for name, p in model.state_dict().items():
        h.update(name.encode())
        h.update(str(tuple(p.shape)).encode())
        h.update(p.detach().numpy().tobytes())
    return h.hexdigest()


def plain_forward(model, x, y):
    """The dense GPT's forward as model.py computed it before MoE and GQA, from torch primitives in the same order."""
    tr, c = model.transformer, model.config
    B, T = x.shape
    pos = torch.arange(T)
    h = tr.wte(x)
    if "wpe" in tr:
        h = h + tr.wpe(pos)
    for block in tr.h.values():
        a, attn = block.ln_1(h), block.attn
        q, k, v = (F.linear(a, p.weight, p.bias).view(B, T, -1, attn.head_dim).transpose(1, 2)
                   for p in (attn.q_proj, attn.k_proj, attn.v_proj))
        if c.block == "llama":
            q, k = apply_rope(q, c.rope_theta, pos), apply_rope(k, c.rope_theta, pos)
        o = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(B, T, -1)
        h = h + F.linear(o, attn.out_proj.weight, attn.out_proj.bias)
        m, mlp = block.ln_2(h), block.mlp
        if c.block == "llama":
            h = h + F.linear(F.silu(F.linear(m, mlp.gate_proj.weight)) * F.linear(m, mlp.up_proj.weight),
                             mlp.down_proj.weight)
        else:
            h = h + F.linear(F.gelu(F.linear(m, mlp.up_proj.weight, mlp.up_proj.bias)), mlp.down_proj.weight,
                             mlp.down_proj.bias)
    logits = F.linear(tr.ln_f(h), model.lm_head.weight)
    return logits, F.cross_entropy(logits.view(-1, logits.size(-1)), y.reshape(-1), ignore_index=-1)


@pytest.mark.parametrize("block", BLOCKS)
def test_dense_model_is_bitwise_todays(block):
    """n_expert=0, n_kv_head=n_head (the defaults, or given explicitly): the same parameter names, the same initial
    values bitwise as before MoE and GQA existed, and the same logits and loss as the plain forward, bitwise."""
    for config in (tiny_config(block=block), tiny_config(block=block, n_expert=0, n_kv_head=TINY["n_head"])):
        model = GPT(config)
        assert init_fingerprint(model) == TODAYS_INIT[block]
        assert not any(isinstance(m, MoE) for m in model.modules())
        x = torch.randint(0, config.vocab_size, (3, config.block_size))
        y = torch.randint(0, config.vocab_size, (3, config.block_size))
        logits, loss = model(x, y)
        ref_logits, ref_loss = plain_forward(model, x, y)
        assert torch.equal(logits, ref_logits) and torch.equal(loss, ref_loss)
        assert flops_per_token(config) == 6 * model.get_num_params() + 12 * config.n_layer * config.n_embd * \
            config.block_size


# ----------------------------------------------------------------------------------------------------------
# the MoE layer against a loop over tokens and experts


def expert_loop(layer, x):
    """The MoE layer written as a loop (fp64): every token through each of its top-k experts, one at a time, weighted
    by its renormalised router probability, plus the shared expert; and Switch Transformer's loss from its formula.
    Returns (y (N, C), load-balancing loss)."""
    E, k = layer.n_expert, layer.top_k
    probs = torch.softmax(x @ layer.router.weight.t(), dim=-1)
    top_p, top_e = probs.topk(k, dim=-1)
    ex = layer.experts
    rows = []
    for t in range(x.shape[0]):
        out = torch.zeros(x.shape[1], dtype=x.dtype)
        for j in range(k):
            e, w = top_e[t, j].item(), top_p[t, j] / top_p[t].sum()
            if ex.swiglu:
                hidden = F.silu(ex.gate_proj.weight[e] @ x[t]) * (ex.up_proj.weight[e] @ x[t])
            else:
                hidden = F.gelu(ex.up_proj.weight[e] @ x[t])
            out = out + w * (ex.down_proj.weight[e] @ hidden)
        rows.append(out)
    y = torch.stack(rows)
    if layer.shared_expert is not None:
        y = y + layer.shared_expert(x)
    f = torch.stack([(top_e == i).sum() for i in range(E)]).to(x.dtype) / (x.shape[0] * k)  # share of the N·k slots
    P = probs.mean(dim=0)  # mean router probability
    return y, E * (f * P).sum()


@pytest.mark.parametrize("block", BLOCKS)
@pytest.mark.parametrize("top_k", (1, 2))
def test_moe_layer_equals_the_loop_over_experts(block, top_k):
    """Output, the load-balancing loss and the gradients (input, router, every expert, shared expert) of the MoE layer
    equal those of expert_loop in fp64 (1e-12)."""
    torch.manual_seed(0)
    config = moe_config(block=block, n_expert_per_token=top_k)
    layer = GPT(config).transformer.h["0"].mlp.double()
    assert isinstance(layer, MoE)
    x = torch.randn(40, config.n_embd, dtype=torch.float64, requires_grad=True)
    g = torch.randn(40, config.n_embd, dtype=torch.float64)
    results = []
    for run in (lambda x: (layer(x), layer.aux_loss), lambda x: expert_loop(layer, x)):
        layer.zero_grad(set_to_none=True)
        x.grad = None
        y, aux = run(x)
        ((y * g).sum() + 0.3 * aux).backward()
        results.append((y.detach(), aux.detach(), x.grad.clone(),
                        {n: p.grad.clone() for n, p in layer.named_parameters()}))
    (y, aux, dx, grads), (ref_y, ref_aux, ref_dx, ref_grads) = results
    assert (y - ref_y).abs().max() < 1e-12 and abs(aux - ref_aux) < 1e-12 and (dx - ref_dx).abs().max() < 1e-12
    assert grads.keys() == ref_grads.keys() and len(grads) == 7  # router, 2 or 3 expert weights, shared expert
    for name in grads:
        assert (grads[name] - ref_grads[name]).abs().max() < 1e-12, name
    assert ref_grads["router.weight"].abs().max() > 1e-3  # not vacuous: the router learns
    assert moe_stats([layer])[0].sum() == 40 * top_k  # one backward through the layer: 40 tokens x k slots


def test_load_balancing_loss_formula():
    """Switch Transformer's eq. 4 with k=1 (alpha·N·Σ f_i·P_i, f_i the share of tokens whose argmax is expert i, P_i
    the mean probability; alpha left out), Megatron-core's top-k form for k=2; exactly 1 under uniform
    probabilities, and E·p when every token goes to one expert with probability p."""
    torch.manual_seed(0)
    for k in (1, 2):
        layer = MoE(moe_config(n_expert_per_token=k)).double()
        torch.nn.init.normal_(layer.router.weight)
        for p in layer.experts.parameters():
            torch.nn.init.normal_(p, std=0.02)
        x = torch.randn(64, layer.router.in_features, dtype=torch.float64)
        layer(x)
        probs = torch.softmax(x @ layer.router.weight.t(), dim=-1)
        top = probs.topk(k, dim=-1).indices
        f = torch.stack([(top == i).float().sum() / (64 * k) for i in range(4)]).double()
        assert abs(layer.aux_loss.item() - 4 * (f * probs.mean(0)).sum().item()) < 1e-12
    with torch.no_grad():
        layer.router.weight.zero_()
    layer(x)
    assert abs(layer.aux_loss.item() - 1.0) < 1e-12
    with torch.no_grad():
        layer.router.weight[0] = 1.0  # x·(1,...,1) > 0 for positive x: expert 0 takes every token's top slot
    layer.top_k = 1
    x = torch.rand(64, layer.router.in_features, dtype=torch.float64) + 0.5
    layer(x)
    p0 = torch.softmax(x @ layer.router.weight.t(), dim=-1)[:, 0]
    assert abs(layer.aux_loss.item() - 4 * p0.mean().item()) < 1e-12 and layer.aux_loss.item() > 3.9


def test_aux_loss_is_in_the_gradient_not_in_the_value():
    """The loss the GPT returns is the cross-entropy exactly; its gradient is the cross-entropy's plus
    moe_aux_loss_coef times that of the mean over MoE layers of their load-balancing losses."""
    torch.manual_seed(0)
    coef = 0.5
    x = torch.randint(0, 64, (4, 16))
    y = (3 * x + 1) % 64
    model = GPT(moe_config(moe_aux_loss_coef=coef))
    logits, loss = model(x, y)
    assert torch.equal(loss, F.cross_entropy(logits.view(-1, 64), y.view(-1)))
    loss.backward()
    # the same model without the coefficient, the balancing losses added by hand
    plain = GPT(moe_config(moe_aux_loss_coef=0.0))
    captured = []
    for block in plain.transformer.h.values():
        if isinstance(block.mlp, MoE):
            block.mlp.register_forward_hook(lambda m, a, o: captured.append(m.aux_loss))
    logits, ce = plain(x, y)
    assert len(captured) == n_moe_layers(plain.config) == 2
    (ce + coef / 2 * sum(captured)).backward()
    grads = {n: p.grad for n, p in plain.named_parameters()}
    for name, p in model.named_parameters():
        assert (p.grad - grads[name]).abs().max() < 1e-6, name
    router = "transformer.h.0.mlp.router.weight"
    without = GPT(moe_config(moe_aux_loss_coef=0.0))
    without(x, y)[1].backward()
    assert (without.get_parameter(router).grad - grads[router]).abs().max() > 1e-4  # the balancing term counts


def test_routing_statistics_count_each_backward_once():
    """Tokens per expert and the balancing loss are recorded when backward reaches an MoE layer: once per micro-batch
    with full activation checkpointing (whose recomputed forward does not count), never in an eval forward; the
    gradients with checkpointing equal those without (1e-6)."""
    torch.manual_seed(0)
    config = moe_config()
    x = torch.randint(0, 64, (2, 4, 16))
    grads = []
    for ac in ("none", "full"):
        model = apply_ac(GPT(config), ac)
        for xb in x:
            model(xb, xb)[1].backward()
        with torch.no_grad():
            model(x[0], x[0])
        tokens, aux, calls = moe_stats([model])
        assert tokens.sum() == 2 * 4 * 16 * 2 * 2 and calls == 2 * 2  # micro-batches x tokens x k x MoE layers
        assert 1.0 <= aux / calls < 4.0
        assert moe_stats([model]) is None  # read once
        grads.append({n: p.grad for n, p in model.named_parameters()})
    for name in grads[0]:
        assert (grads[0][name] - grads[1][name]).abs().max() < 1e-6, name


# ----------------------------------------------------------------------------------------------------------
# grouped-query attention, config checks, FLOPs


def test_grouped_query_attention_repeats_each_kv_head_for_its_query_group():
    """n_kv_head < n_head: k_proj/v_proj hold n_kv_head heads, and query head i attends with key/value head
    i // (n_head / n_kv_head), which is multi-head attention with the kv projections' rows repeated."""
    torch.manual_seed(0)
    gqa = GPT(tiny_config(block="llama", n_head=4, n_kv_head=2))
    assert gqa.transformer.h["0"].attn.k_proj.weight.shape == (16, 32)
    mha = GPT(tiny_config(block="llama", n_head=4))
    state = gqa.state_dict()
    for name, t in list(state.items()):
        if name.endswith(("k_proj.weight", "v_proj.weight")):  # (2 heads x 8, 32) -> (4 heads x 8, 32)
            state[name] = t.view(2, 8, 32).repeat_interleave(2, dim=0).reshape(32, 32)
    mha.load_state_dict(state)
    x = torch.randint(0, 64, (2, 16))
    assert (gqa(x, x)[0] - mha(x, x)[0]).abs().max() < 1e-6


def test_ring_attention_blocks_take_fewer_kv_heads():
    """Ring attention's block functions (parallel/cp.py) with 2 key/value heads for 6 query heads: the output and the
    log-sum-exp equal plain attention over the repeated heads, and the key/value gradients are the repeated heads'
    summed over each group (fp64, 1e-12)."""
    from model import repeat_kv
    from parallel.cp import block_attention, block_attention_backward
    torch.manual_seed(0)
    q, dout = torch.randn(2, 6, 8, 4, dtype=torch.float64), torch.randn(2, 6, 8, 4, dtype=torch.float64)
    k, v = torch.randn(2, 2, 8, 4, dtype=torch.float64), torch.randn(2, 2, 8, 4, dtype=torch.float64)
    out, lse = block_attention(q, k, v, 0.5, causal=True)
    qr, kr, vr = (t.clone().requires_grad_() for t in (q, repeat_kv(k, 3), repeat_kv(v, 3)))
    scores = (qr @ kr.transpose(-2, -1) * 0.5).masked_fill(torch.ones(8, 8, dtype=torch.bool).triu(1), float("-inf"))
    ref = torch.softmax(scores, dim=-1) @ vr
    ref.backward(dout)
    assert (out - ref).abs().max() < 1e-12 and (lse - torch.logsumexp(scores, -1)).abs().max() < 1e-12
    dq, dk, dv = block_attention_backward(q, k, v, dout, lse, (dout * out).sum(-1), 0.5, causal=True)
    assert dk.shape == k.shape and dv.shape == v.shape
    dk_want, dv_want = (t.grad.view(2, 2, 3, 8, 4).sum(2) for t in (kr, vr))
    for got, want in ((dq, qr.grad), (dk, dk_want), (dv, dv_want)):
        assert (got - want).abs().max() < 1e-12


def test_config_errors_are_one_line():
    for kwargs, message in ((dict(n_head=4, n_kv_head=3), "multiple of n_kv_head"),
                            (dict(n_expert=4, n_expert_per_token=5), "n_expert_per_token=5 must be in 1..n_expert=4"),
                            (dict(n_expert=4, moe_every=0), "moe_every=0"),
                            (dict(n_expert=-1), "must be >= 0")):
        with pytest.raises(ValueError, match=message) as e:
            tiny_config(**kwargs)
        assert "\n" not in str(e.value)
    from config import ConfigError, check_train_config
    from train import DEFAULTS
    for key, value in (("n_kv_head", 5), ("n_expert_per_token", 3)):
        with pytest.raises(ConfigError, match=key):
            check_train_config({**DEFAULTS, "n_expert": 2, key: value})


def test_flops_count_the_active_experts():
    """6·N per token with N the parameters a token uses: k of the E experts of each MoE layer."""
    config = moe_config()
    model = GPT(config)
    experts = sum(p.numel() for n, p in model.named_parameters() if ".experts." in n)
    active = model.get_num_params() - experts + experts * config.n_expert_per_token // config.n_expert
    L, H, Q, T = config.n_layer, config.n_head, config.n_embd // config.n_head, config.block_size
    assert flops_per_token(config) == 6 * active + 12 * L * H * Q * T


# ----------------------------------------------------------------------------------------------------------
# Llama 3 8B's configuration


def test_llama3_8b_config_at_full_size_and_toy_scale(tmp_path, shakespeare_char_dir, capsys):
    """config/llama3_8b.py is Llama 3 8B's shape (7.50B parameters with the tied head: Meta's 8.03B less the separate
    128256 x 4096 output matrix); trained at toy scale through train.py (2 layers, 64 wide, 4 heads over 2 kv heads)
    its loss falls; and sim/__main__.py plans it."""
    from config import load_config
    from train import DEFAULTS
    cfg = load_config(DEFAULTS, ["config/llama3_8b.py"])
    config = GPTConfig(**{k: cfg[k] for k in ("n_layer", "n_head", "n_kv_head", "n_embd", "ffn_hidden", "vocab_size",
                                              "block", "rope_theta", "block_size")}, bias=False)
    with torch.device("meta"):
        assert abs(GPT(config).get_num_params(non_embedding=False) - (8.030e9 - 128256 * 4096)) < 0.01e9
    out = str(tmp_path / "out")
    toy = ["--parallel=single", "--n_layer=2", "--n_embd=64", "--n_head=4", "--n_kv_head=2", "--ffn_hidden=128",
           "--vocab_size=0",
           "--block_size=32", "--batch_size=4", "--gradient_accumulation_steps=1", "--max_iters=20",
           "--eval_interval=1000", "--eval_iters=1", "--warmup_iters=0", "--learning_rate=3e-3", "--decay_lr=False",
           "--compile=False", "--dtype=float32", f"--data_dir={shakespeare_char_dir}", f"--out_dir={out}"]
    code, text = run_command([sys.executable, "train.py", "config/llama3_8b.py", *toy], 300)
    assert code == 0, text[-3000:]
    with open(os.path.join(out, "metrics.jsonl")) as f:
        losses = [m["train/loss"] for m in map(json.loads, f) if "train/loss" in m]
    assert len(losses) == 20 and sum(losses[-5:]) / 5 < losses[0] - 0.5, losses
    import sim.__main__ as simulate
    assert simulate.main(["config/llama3_8b.py", "--gpus=64"]) == 0
    assert "7.5B parameters" in capsys.readouterr().out


# ----------------------------------------------------------------------------------------------------------
# Hugging Face Llama weights (grouped-query attention), offline


def test_hf_llama_with_grouped_query_attention_converts_both_ways(tmp_path):
    """A random LlamaForCausalLM (4 heads over 2 key/value heads, RoPE base 500000, tied head) loaded through
    hf.load_pretrained gives transformers' logits (1e-5); exported back, every tensor is transformers' bitwise and the
    exported directory's logits are the same; what model.py lacks is a one-line error."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from tools import hf
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(0)
    options = dict(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                   num_key_value_heads=2, max_position_embeddings=32, rms_norm_eps=1e-5, rope_theta=500000.0,
                   tie_word_embeddings=True)
    ref = LlamaForCausalLM(LlamaConfig(**options)).eval()
    with torch.no_grad():
        for p in ref.parameters():
            p.add_(torch.randn_like(p) * 0.05)  # norms not 1
    ref.save_pretrained(tmp_path / "llama")
    config, weights = hf.load_pretrained(str(tmp_path / "llama"), block_size=16)
    assert (config.block, config.n_head, config.n_kv_head, config.rope_theta) == ("llama", 4, 2, 500000.0)
    model = GPT(config)
    model.load_state_dict(weights)
    x = torch.randint(0, 97, (3, 16))
    with torch.no_grad():
        expected = ref(x).logits
        assert (model.eval()(x, x)[0] - expected).abs().max() < 1e-5
    back = hf.to_hf(model.state_dict(), config)
    assert all(torch.equal(back[k], v) for k, v in ref.state_dict().items())
    hf.save_hf(model.state_dict(), config, str(tmp_path / "exported"))
    with torch.no_grad():
        again = LlamaForCausalLM.from_pretrained(tmp_path / "exported").eval()(x).logits
    assert (again - expected).abs().max() < 1e-5
    for option, value in (("tie_word_embeddings", False), ("rms_norm_eps", 1e-6), ("attention_bias", True)):
        with pytest.raises(ValueError, match=option) as e:
            hf.config_from_hf(LlamaConfig(**{**options, option: value}))
        assert "\n" not in str(e.value)
    with pytest.raises(ValueError, match="MoE models"):
        hf.hf_config_from(moe_config())


# ----------------------------------------------------------------------------------------------------------
# the simulator's MoE and expert parallelism (sim/cost.py)


@pytest.mark.parametrize("overrides", [dict(block="gpt2", bias=True, n_shared_expert=1, moe_every=2),
                                       dict(block="llama", n_expert_per_token=1, moe_every=3),
                                       dict(block="gpt2", bias=True, n_expert=0)])
def test_sim_parameters_and_flops_are_model_py(overrides):
    """The simulator's Model counts model.py's parameters exactly (MoE blocks, grouped-query attention, biases), and
    its FLOPs per token are model.flops_per_token's (6 x the parameters a token uses: k of the E experts, + attention)
    without the norms and biases, which it leaves out of the matmul FLOPs."""
    from sim.cost import Model, Parallel, step_flops
    config = moe_config(n_layer=5, n_embd=64, vocab_size=100, **overrides)
    sim = Model(n_layer=5, n_head=4, n_embd=64, seq_len=16, vocab_size=100, block=config.block, bias=config.bias,
                n_kv_head=2, n_expert=config.n_expert, n_expert_per_token=config.n_expert_per_token,
                moe_every=config.moe_every, n_shared_expert=config.n_shared_expert)
    with torch.device("meta"):
        model = GPT(config)
        assert sim.params == model.get_num_params(non_embedding=False)
        vectors = sum(p.numel() for p in model.parameters() if p.dim() == 1)
    per_token = step_flops(sim, Parallel())["model"] / 16
    assert abs(per_token / (flops_per_token(config) - 6 * vectors) - 1) < 1e-12


def test_sim_expert_parallel_all_to_alls_and_imbalance():
    """One MoE layer's cost in the simulator (flat compute model): per micro-batch, forward an all-to-all of the E
    counts plus dispatch and combine of S = k·T·h·B·imbalance bytes each, backward two more, over the EP group's link
    (the first ep of the dp x cp ranks); the expert compute grows with expert_imbalance by exactly its FLOPs; the
    expert gradients are all-reduced over edp; memory holds the E/ep experts' full states."""
    from dataclasses import replace
    from sim import cluster as clusters
    from sim.cost import Model, Parallel, build_costs, collective_time
    from sim.schedule import memory_per_rank, simulate
    model = Model(n_layer=4, n_head=8, n_embd=512, seq_len=256, vocab_size=1000, block="llama", n_expert=8,
                  n_expert_per_token=2, moe_every=2)
    cluster = replace(clusters.get("a100-80gb"), matmul_efficiency=0.5).sized(16)
    par = Parallel(dp=4, tp=2, pp=1, cp=2, micro_batch=2, micro_batches=4, sequence_parallel=True, ep=4,
                   dtype="bfloat16")
    costs = build_costs(model, par, cluster)
    groups = par.groups()
    assert groups["ep"] == [0, 2, 4, 6] and groups["edp"] == [0, 8]  # CP innermost, ep 4 of the 8 dp x cp ranks
    tokens = 2 * 256 / 2 / 2  # b·s/c, over t (SP)
    S = 2 * tokens * 512 * 2

    def a2a(nbytes):
        return collective_time("all_to_all", nbytes, 4, cluster.group_link(groups["ep"], "all_to_all"))
    ep_f = sum(d for k, d in costs.layer_forward if k == "ep")
    ep_b = sum(d for k, d in costs.layer_backward if k == "ep")
    assert abs(ep_f - 0.5 * (a2a(8 * 8) + 2 * a2a(S))) < 1e-12 and abs(ep_b - 0.5 * 2 * a2a(S)) < 1e-12
    heavy = build_costs(model, replace(par, expert_imbalance=1.5), cluster)
    extra = sum(d for k, d in heavy.layer_forward if k == "forward") - sum(
        d for k, d in costs.layer_forward if k == "forward")
    flops = 0.5 * 2 * tokens * 2 * 0.5 * model.mlp_params  # phi x 2·T·k·(1.5 - 1)·expert parameters
    assert abs(extra / (flops / cluster.flop_rate("bfloat16")) - 1) < 1e-9
    assert costs.expert_params == 0.5 * 8 * model.mlp_params / 4
    step = simulate(model, par, cluster)
    assert any(t.recipe == [("edp", 4 * costs.expert_params * 2)] for t in step.tasks)  # 4 layers' averages, bf16
    dense = memory_per_rank(replace(par, ep=1), build_costs(model, replace(par, ep=1), cluster), cluster)[0]
    sharded = memory_per_rank(par, costs, cluster)[0]
    assert abs((dense["params"] - sharded["params"]) - 2 * 4 * 0.5 * 8 * model.mlp_params * 3 / 4) < 1
    with pytest.raises(ValueError, match="ep=3 must divide"):
        replace(par, ep=3).check(model)


def test_simulate_py_plans_moe_configs(capsys):
    """sim/__main__.py takes config/mixtral_8x7b.py (experts over 8 ranks) and reports the all-to-alls' share."""
    import sim.__main__ as simulate
    assert simulate.main(["config/mixtral_8x7b.py", "--gpus=128"]) == 0
    text = capsys.readouterr().out
    assert "46.6B parameters" in text and "ep=8" in text and " ep " in text, text
