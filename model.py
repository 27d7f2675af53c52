"""
A GPT language model on one device: GPT-2 style, or Llama-style blocks by a config flag.

No distributed code lives here. Parallel strategies (parallel/*.py) reshape this model from the outside:
they swap modules, shard parameters or split layers, relying on three properties of this file:

- Every parameter's initial value is a pure function of (config.init_seed, its fully qualified name), see
  `init_parameter_`. A model built on the `meta` device and materialised with `to_empty()` + `init_weights()`
  equals an eager build bitwise, and a strategy can initialise one unit, or one slice, on its own.
- Attention infers its number of heads from the projection's output size, so column-sharded q/k/v projections
  (tensor parallelism) run on their local heads unchanged.
- Blocks live in a ModuleDict keyed "0".."n_layer-1": removing some (pipeline stages) keeps the others' names.
- Positions are an explicit input (`GPT.forward(idx, targets, pos)`, default 0..T-1), and the attention core
  (`CausalSelfAttention.core`, a module without parameters) can be replaced: context parallelism feeds each rank
  its tokens with their positions in the full sequence and swaps the core for ring attention.
- An MoE layer's experts are stacked along a leading expert dimension and run from their weights' first dimension,
  and the way tokens reach them (`MoE.dispatcher`, a module without parameters) can be replaced: expert parallelism
  keeps only its experts and swaps the dispatcher for an all-to-all (parallel/ep.py).

Options beyond GPT-2: grouped-query attention (n_kv_head < n_head: Ainslie et al. 2023, "GQA"; Llama 2 70B, Llama 3),
and mixture-of-experts feed-forward blocks (n_expert > 0, see MoE: Shazeer et al. 2017, Fedus et al. 2022 "Switch
Transformers", Jiang et al. 2024 "Mixtral of Experts", Dai et al. 2024 "DeepSeekMoE"). With their defaults
(n_kv_head = n_head, n_expert = 0) the model is the plain one, bitwise: the same parameters, init and outputs.

References: GPT-2 (Radford et al. 2019) and nanoGPT's model.py; Llama (Touvron et al. 2023): RMSNorm
(Zhang & Sennrich 2019), rotary position embeddings (Su et al. 2021, RoFormer), SwiGLU (Shazeer 2020).
"""

import math
import zlib
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F


@dataclass
class GPTConfig:
    block_size: int = 1024      # maximum sequence length T
    vocab_size: int = 50304     # GPT-2's 50257 padded up to a multiple of 64
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768
    dropout: float = 0.0
    bias: bool = True           # biases in Linear and LayerNorm (GPT-2); the Llama block never has them
    block: str = "gpt2"         # "gpt2": LayerNorm, learned positions, GELU MLP; "llama": RMSNorm, RoPE, SwiGLU
    ffn_hidden: int = 0         # MLP hidden size; 0 means 4*n_embd (gpt2) or 8/3*n_embd rounded up to 64 (llama)
    rope_theta: float = 10000.0
    gelu_approximate: str = "none"  # gpt2 MLP: F.gelu's `approximate`, "none" (erf) or "tanh" (GPT-2's own "gelu_new")
    init_std: float = 0.02
    init_seed: int = 1337       # every parameter's init is drawn from (init_seed, its name)
    n_kv_head: int = 0          # key/value heads (grouped-query attention); 0 means n_head (multi-head attention)
    n_expert: int = 0           # routed experts of each MoE feed-forward; 0: every block has the dense MLP
    n_expert_per_token: int = 2  # top-k: the experts each token is sent to (Mixtral: 2 of 8)
    moe_every: int = 1          # block i is an MoE block iff i % moe_every == 0 (Megatron-core's moe_layer_freq)
    n_shared_expert: int = 0    # always-on experts beside the routed ones (DeepSeekMoE): one MLP of n x ffn_hidden
    moe_aux_loss_coef: float = 0.01  # weight of the load-balancing loss in the gradient (Switch Transformer's alpha)

    def __post_init__(self):
        if self.block not in ("gpt2", "llama"):
            raise ValueError(f"block must be 'gpt2' or 'llama', got {self.block!r}")
        if self.gelu_approximate not in ("none", "tanh"):
            raise ValueError(f"gelu_approximate must be 'none' or 'tanh', got {self.gelu_approximate!r}")
        if self.n_embd % self.n_head:
            raise ValueError(f"n_embd={self.n_embd} is not divisible by n_head={self.n_head}")
        if self.block == "llama" and (self.n_embd // self.n_head) % 2:
            raise ValueError(f"RoPE needs an even head size, got n_embd/n_head={self.n_embd // self.n_head}")
        if self.ffn_hidden == 0:
            self.ffn_hidden = 4 * self.n_embd if self.block == "gpt2" else 64 * math.ceil(8 * self.n_embd / 3 / 64)
        if self.n_kv_head == 0:
            self.n_kv_head = self.n_head
        if self.n_kv_head < 0 or self.n_head % self.n_kv_head:
            raise ValueError(f"n_head={self.n_head} must be a multiple of n_kv_head={self.n_kv_head} (each key/value "
                             f"head serves n_head/n_kv_head query heads)")
        if self.n_expert < 0 or self.n_shared_expert < 0 or self.moe_aux_loss_coef < 0:
            raise ValueError(f"n_expert={self.n_expert}, n_shared_expert={self.n_shared_expert} and "
                             f"moe_aux_loss_coef={self.moe_aux_loss_coef} must be >= 0")
        if self.n_expert and not 1 <= self.n_expert_per_token <= self.n_expert:
            raise ValueError(f"n_expert_per_token={self.n_expert_per_token} must be in 1..n_expert={self.n_expert}")
        if self.n_expert and self.moe_every < 1:
            raise ValueError(f"moe_every={self.moe_every} must be >= 1 (1: every block is an MoE block)")


# -----------------------------------------------------------------------------
# layers

def apply_rope(x, theta, pos=None):
    """Rotary position embedding (RoFormer, Su et al. 2021, eq. 34; the "rotate half" layout of Llama/HF).

    x: (B, H, T, head_dim) with even head_dim; returns the same shape and dtype. pos: (T,) int64, the position of
    each of the T tokens (default 0..T-1; context parallelism passes a rank's positions in the full sequence).
    The angles are computed on the fly in fp32 (cheap next to the matmuls, and no buffer for meta-device builds
    to materialise).
    """
    T, hd = x.shape[-2], x.shape[-1]
    if pos is None:
        pos = torch.arange(T, device=x.device)
    inv_freq = theta ** (-torch.arange(0, hd, 2, device=x.device, dtype=torch.float32) / hd)
    angles = torch.outer(pos.to(torch.float32), inv_freq)  # (T, hd/2)
    cos, sin = angles.cos(), angles.sin()
    x1, x2 = x.float().chunk(2, dim=-1)
    return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1).type_as(x)


def repeat_kv(x, n_rep):
    """Grouped-query attention's key or value heads for the query heads: (B, Hkv, T, D) -> (B, Hkv·n_rep, T, D), each
    head repeated for the n_rep consecutive query heads that share it (query head i reads key/value head i // n_rep,
    as Hugging Face's repeat_kv and Meta's Llama). x itself when n_rep == 1."""
    return x if n_rep == 1 else x.repeat_interleave(n_rep, dim=1)


class CausalSDPA(nn.Module):
    """The default attention core: causal F.scaled_dot_product_attention with attention dropout in training.

    q (B, H, T, head_dim), k and v (B, Hkv, T, head_dim) with H a multiple of Hkv (grouped-query attention: repeat_kv)
    -> (B, H, T, head_dim). No parameters. F.scaled_dot_product_attention is looked up at each call, so torch's
    context_parallel(), which patches it, takes effect here.
    """

    def __init__(self, dropout=0.0):
        super().__init__()
        self.dropout = dropout

    def forward(self, q, k, v):
        n_rep = q.shape[1] // k.shape[1]
        k, v = repeat_kv(k, n_rep), repeat_kv(v, n_rep)
        return F.scaled_dot_product_attention(q, k, v, dropout_p=self.dropout if self.training else 0.0, is_causal=True)


class CausalSelfAttention(nn.Module):
    """Multi-head causal self-attention: q/k/v projections, RoPE (llama block), the core, the output projection.

    (B, T, n_embd) -> (B, T, n_embd); pos: (T,) int64 positions of the T tokens (default 0..T-1), used by RoPE.
    The number of heads is q_proj's output size / head_dim, and of key/value heads k_proj's (n_kv_head of them:
    grouped-query attention when fewer than n_head), so q/k/v projections holding only some heads (column-parallel)
    compute attention on those heads. `core` (default CausalSDPA, no parameters) maps q (B, H, T, head_dim), k and v
    (B, Hkv, T, head_dim) to (B, H, T, head_dim); a strategy may replace it (ring attention).
    """

    def __init__(self, config):
        super().__init__()
        bias = config.bias and config.block == "gpt2"
        self.head_dim = config.n_embd // config.n_head
        kv_dim = config.n_kv_head * self.head_dim
        self.q_proj = nn.Linear(config.n_embd, config.n_embd, bias=bias)
        self.k_proj = nn.Linear(config.n_embd, kv_dim, bias=bias)
        self.v_proj = nn.Linear(config.n_embd, kv_dim, bias=bias)
        self.out_proj = nn.Linear(config.n_embd, config.n_embd, bias=bias)
        self.resid_dropout = nn.Dropout(config.dropout)
        self.rope_theta = config.rope_theta if config.block == "llama" else None
        self.core = CausalSDPA(config.dropout)

    def forward(self, x, pos=None):
        B, T, _ = x.shape
        q, k, v = (proj(x).view(B, T, -1, self.head_dim).transpose(1, 2)
                   for proj in (self.q_proj, self.k_proj, self.v_proj))
        if self.rope_theta is not None:
            q, k = apply_rope(q, self.rope_theta, pos), apply_rope(k, self.rope_theta, pos)
        y = self.core(q, k, v)
        y = y.transpose(1, 2).reshape(B, T, -1)
        return self.resid_dropout(self.out_proj(y))


class MLP(nn.Module):
    """GPT-2 MLP: down_proj(gelu(up_proj(x))). (B, T, n_embd) -> (B, T, n_embd). The GELU is exact (erf, nanoGPT's)
    or its tanh approximation (config.gelu_approximate="tanh"), which GPT-2 was trained with (Hendrycks & Gimpel
    2016, section 2; Hugging Face's "gelu_new"): tools/hf.py sets it for pretrained GPT-2 weights."""

    def __init__(self, config, hidden=None):
        super().__init__()
        hidden = hidden or config.ffn_hidden
        self.gelu_approximate = config.gelu_approximate
        self.up_proj = nn.Linear(config.n_embd, hidden, bias=config.bias)
        self.down_proj = nn.Linear(hidden, config.n_embd, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x):
        return self.dropout(self.down_proj(F.gelu(self.up_proj(x), approximate=self.gelu_approximate)))


class SwiGLU(nn.Module):
    """Llama MLP (Shazeer 2020): down_proj(silu(gate_proj(x)) * up_proj(x)), no biases. (B, T, C) -> (B, T, C).
    hidden: its hidden size (default config.ffn_hidden; MLP takes it too)."""

    def __init__(self, config, hidden=None):
        super().__init__()
        hidden = hidden or config.ffn_hidden
        self.gate_proj = nn.Linear(config.n_embd, hidden, bias=False)
        self.up_proj = nn.Linear(config.n_embd, hidden, bias=False)
        self.down_proj = nn.Linear(hidden, config.n_embd, bias=False)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x):
        return self.dropout(self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x)))


# -----------------------------------------------------------------------------
# mixture of experts

def is_moe_layer(config, layer):
    """Whether block `layer` has an MoE feed-forward: n_expert > 0 and layer % moe_every == 0 (Megatron-core's
    moe_layer_freq; moe_every=2 alternates MoE and dense blocks as GShard and Switch Transformer do)."""
    return config.n_expert > 0 and layer % config.moe_every == 0


def n_moe_layers(config):
    return sum(is_moe_layer(config, i) for i in range(config.n_layer))


class ExpertLinear(nn.Module):
    """E linear layers without bias, stacked: weight (E, out_features, in_features), nn.Linear's layout one dimension
    up (so init and the strategies treat it by name as the dense layer's). forward(x (n, in), e) -> (n, out), expert
    e's x Wₑᵀ. E is the weight's first dimension: a strategy that keeps some experts (expert parallelism) slices it."""

    def __init__(self, n_expert, in_features, out_features):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(n_expert, out_features, in_features))

    def forward(self, x, e):
        return F.linear(x, self.weight[e])


class GroupedExperts(nn.Module):
    """The routed experts of an MoE layer: E copies of the block's MLP (SwiGLU for llama, GELU for gpt2; no biases, as
    in Switch Transformer, Mixtral and torchtitan), weights stacked along the expert dimension (ExpertLinear).

    forward(x (N, C), counts (list of E ints, summing to N)): expert e runs on the next counts[e] rows of x (the rows
    are grouped by expert); returns (N, C). A loop over experts, the reference form of a grouped GEMM
    (torch.nn.functional.grouped_mm on CUDA). Every expert runs, on zero rows if it got no token, so every weight
    gets a gradient (zeros), as data-parallel wrappers expect."""

    def __init__(self, config):
        super().__init__()
        E, C, f = config.n_expert, config.n_embd, config.ffn_hidden
        self.swiglu, self.gelu_approximate = config.block == "llama", config.gelu_approximate
        if self.swiglu:
            self.gate_proj = ExpertLinear(E, C, f)
        self.up_proj = ExpertLinear(E, C, f)
        self.down_proj = ExpertLinear(E, f, C)

    def expert(self, e, x):
        if self.swiglu:
            return self.down_proj(F.silu(self.gate_proj(x, e)) * self.up_proj(x, e), e)
        return self.down_proj(F.gelu(self.up_proj(x, e), approximate=self.gelu_approximate), e)

    def forward(self, x, counts):
        return torch.cat([self.expert(e, rows) for e, rows in enumerate(x.split(counts))])


class MoE(nn.Module):
    """Mixture-of-experts feed-forward, dropless top-k routing: (B, T, C) -> (B, T, C).

    Router (Mixtral, Jiang et al. 2024, section 2.1): logits = x Wᵣᵀ (E per token, no bias), probabilities p = softmax
    in fp32; each token goes to its k most probable experts, weighted by their probabilities renormalised to sum to 1
    (softmax over the top-k logits); y = Σ_k w_k · expert_k(x) (+ shared_expert(x), DeepSeekMoE's always-on expert,
    when n_shared_expert > 0). Dropless: every token reaches all k experts, whatever their load (no capacity
    factor, no token dropped, as Megatron-core's dropless MoE and MegaBlocks): what a token computes does not depend
    on the other tokens of the batch, so any split of the batch over ranks computes exactly what one device does.

    The (token, slot) pairs are sorted by expert (a stable argsort), their rows gathered, each expert runs on its
    contiguous rows (GroupedExperts), and the weighted results are added back per token (index_add).
    `dispatcher` decides how the sorted rows reach the experts: None runs this module's experts here; expert
    parallelism installs one that sends them to the ranks holding their experts and back (parallel/ep.py), called as
    dispatcher(x_sorted (N·k, C), counts (E,) int64 tensor, experts) -> (N·k, C).

    Load-balancing loss (`load_balancing_loss`, recorded as `aux_loss` in every forward under autograd): Switch
    Transformer's auxiliary loss; GPT.forward (or a pipeline stage) adds it to the gradient with the weight
    moe_aux_loss_coef, not to the loss's value (moe_aux_loss). Statistics for logging (tokens per expert, the loss's
    value) are recorded when the backward reaches this layer's output, so a forward recomputed by activation
    checkpointing or an eval forward does not count (`stats`, read by moe_stats).

    Set by strategies (defaults: one device): token_group, a Collectives over the ranks that hold the other tokens of
    the same micro-batch (context parallelism; tensor parallelism with sequence parallelism), over which the
    balancing statistics are summed; loss_average, how many of them average their losses (context parallelism: the
    gradient is averaged over cp, so this rank's share of the balancing loss counts cp times); replicas, how many ranks
    route these same tokens (tensor-parallel peers without sequence parallelism), which the statistics divide by.
    """

    def __init__(self, config):
        super().__init__()
        self.n_expert, self.top_k = config.n_expert, config.n_expert_per_token
        self.router = nn.Linear(config.n_embd, config.n_expert, bias=False)
        self.experts = GroupedExperts(config)
        self.shared_expert = None
        if config.n_shared_expert:
            hidden = config.n_shared_expert * config.ffn_hidden
            self.shared_expert = SwiGLU(config, hidden) if config.block == "llama" else MLP(config, hidden)
        self.dropout = nn.Dropout(config.dropout)
        self.dispatcher = None
        self.token_group, self.loss_average, self.replicas = None, 1, 1
        self.aux_loss = None  # this forward's load-balancing loss (0-dim, in the graph); moe_aux_loss takes it
        self.stats = None     # {"tokens": (E,), "aux": 0-dim, "calls": float} since moe_stats last read them

    def route(self, x):
        """x (N, C) -> (probabilities (N, E) in fp32 (fp64 for fp64 x), top-k weights (N, k) summing to 1, top-k
        experts (N, k) int64)."""
        logits = self.router(x)
        probs = F.softmax(logits, dim=-1, dtype=torch.promote_types(logits.dtype, torch.float32))
        weights, experts = probs.topk(self.top_k, dim=-1)
        return probs, weights / weights.sum(dim=-1, keepdim=True), experts

    def forward(self, x):
        tokens = x.reshape(-1, x.shape[-1])  # (N, C): every token of the micro-batch
        probs, weights, experts = self.route(tokens)
        counts = torch.bincount(experts.flatten(), minlength=self.n_expert)  # (E,) tokens per expert
        order = experts.flatten().argsort(stable=True)  # the N·k (token, slot) pairs grouped by expert
        token = order // self.top_k
        if self.dispatcher is None:
            routed = self.experts(tokens[token], counts.tolist())
        else:
            routed = self.dispatcher(tokens[token], counts, self.experts)
        weighted = routed * weights.flatten()[order].unsqueeze(1)
        y = self.dropout(weighted.new_zeros(tokens.shape).index_add(0, token, weighted)).view(x.shape)
        if self.shared_expert is not None:
            y = y + self.shared_expert(x)
        self.aux_loss = None
        if torch.is_grad_enabled():
            self.aux_loss = self.load_balancing_loss(probs, counts)
            if y.requires_grad:
                y.register_hook(self._recorder(counts, self.aux_loss.detach()))
        return y

    def load_balancing_loss(self, probs, counts):
        """Switch Transformer's auxiliary loss (Fedus et al. 2022, section 2.2, eq. 4), E · Σᵢ fᵢ·Pᵢ, for top-k as
        Megatron-core's switch_load_balancing_loss_func: fᵢ = (token slots routed to expert i) / (N·k), Pᵢ = mean
        router probability of expert i over the N tokens; 1 when routing is uniform, up to E when it all goes to one
        expert. probs (N, E) of this rank's tokens; counts (E,) their top-k assignments. With a token_group the
        micro-batch's N and counts are the group's (an all-reduce, no gradient) and this rank returns its share,
        E/(N²k) · Σᵢ countsᵢ · Σ_(its tokens) pᵢ: the shares sum to the micro-batch's loss over the group, and each
        share's gradient is the micro-batch loss's gradient with respect to this rank's probabilities."""
        n, counts = probs.shape[0], counts.to(probs.dtype)
        if self.token_group is not None:
            self.token_group.all_reduce(counts)
            n *= self.token_group.world_size
        return self.n_expert / (n * n * self.top_k) * (counts * probs.sum(dim=0)).sum()

    def _recorder(self, counts, aux):
        """A hook for the output's gradient that adds this forward's routing to `stats` (once per backward)."""
        group = self.token_group.world_size if self.token_group is not None else 1

        def record(grad):
            if self.stats is None:
                self.stats = {"tokens": torch.zeros(self.n_expert, dtype=torch.float64, device=counts.device),
                              "aux": torch.zeros((), dtype=torch.float64, device=counts.device), "calls": 0.0}
            self.stats["tokens"] += counts / self.replicas
            self.stats["aux"] += aux / self.replicas
            self.stats["calls"] += 1.0 / (group * self.replicas)
        return record


class AuxLossToBackward(torch.autograd.Function):
    """A copy of x (any shape); in backward also the gradient 1 for `aux` (0-dim): an auxiliary loss computed
    inside a pipeline stage reaches the parameters in that stage's backward as if added to the micro-batch's loss,
    which pipelines backpropagate unscaled (parallel/pp.py). Megatron-core's MoEAuxLossAutoScaler. A copy, not a
    view: a stage's output may be hooked by a data-parallel wrapper (FSDP2), which a view could bypass."""

    @staticmethod
    def forward(ctx, x, aux):
        ctx.aux_dtype, ctx.aux_device = aux.dtype, aux.device
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        return grad, torch.ones((), dtype=ctx.aux_dtype, device=ctx.aux_device)


def moe_aux_loss(module):
    """moe_aux_loss_coef x the mean over the model's MoE layers of the load-balancing losses that the MoE layers in
    `module` (a GPT, or a pipeline stage holding some of them: it has `config`) recorded in this forward, each share
    times its layer's loss_average; taken once (each layer's is cleared). 0-dim, or None when no layer recorded one
    (a dense model, no autograd). GPT.forward adds it to the loss's gradient, a stage with AuxLossToBackward."""
    if not module.config.n_expert:
        return None
    losses = []
    for m in module.modules():
        if isinstance(m, MoE) and m.aux_loss is not None:
            losses.append(m.aux_loss * m.loss_average)
            m.aux_loss = None
    if not losses:
        return None
    return module.config.moe_aux_loss_coef / n_moe_layers(module.config) * torch.stack(losses).sum()


def moe_stats(modules):
    """(tokens per expert (E,) float64 summed over the MoE layers of `modules`, sum of their load-balancing losses,
    number of (micro-batch, layer) calls they stand for) recorded since the last call, then cleared; None if no MoE
    layer recorded anything. A strategy sums the three over its ranks (each layer divided them by its replicas and
    token group): tokens per expert of the step, and the mean load-balancing loss = sum / calls."""
    layers = [m for module in modules for m in module.modules() if isinstance(m, MoE) and m.stats is not None]
    if not layers:
        return None
    tokens = sum(m.stats["tokens"] for m in layers)
    aux = sum(m.stats["aux"] for m in layers)
    calls = sum(m.stats["calls"] for m in layers)
    for m in layers:
        m.stats = None
    return tokens, aux, calls


def make_norm(config):
    """LayerNorm (gpt2 block) or RMSNorm (llama block) over the last dim of size n_embd."""
    if config.block == "llama":
        return nn.RMSNorm(config.n_embd, eps=1e-5)
    return nn.LayerNorm(config.n_embd, bias=config.bias)


class Block(nn.Module):
    """Pre-LN transformer block: x + attn(ln_1(x)), then + mlp(ln_2(x)). (B, T, n_embd) -> (B, T, n_embd);
    pos: (T,) int64 token positions for the attention (default 0..T-1). `layer`: its index in the GPT, which says
    whether its feed-forward `mlp` is an MoE layer (is_moe_layer) or the dense MLP / SwiGLU."""

    def __init__(self, config, layer=0):
        super().__init__()
        self.ln_1 = make_norm(config)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = make_norm(config)
        if is_moe_layer(config, layer):
            self.mlp = MoE(config)
        else:
            self.mlp = SwiGLU(config) if config.block == "llama" else MLP(config)

    def forward(self, x, pos=None):
        x = x + self.attn(self.ln_1(x), pos=pos)  # by keyword: forward pre-hooks that rewrite args keep it
        return x + self.mlp(self.ln_2(x))


# -----------------------------------------------------------------------------
# initialisation

def init_parameter_(name, param, config):
    """Fill `param` in place with its GPT-2 initial value, a pure function of (config.init_seed, name).

    name: the parameter's fully qualified name in GPT (e.g. "transformer.h.3.attn.out_proj.weight").
    Biases are 0, norm weights 1, every other weight N(0, init_std), except the residual projections
    (attn.out_proj and every down_proj: the MLP's, the experts', the shared expert's) which get
    init_std / sqrt(2 * n_layer) (GPT-2 paper, section 2.3). Stacked expert weights are drawn as one tensor.
    The values are drawn on the CPU from a generator seeded by the name, so they do not depend on the
    order of initialisation, on the device, or on which other parameters exist: a strategy may initialise
    one unit or one pipeline stage alone and get exactly the values the full eager model would have.
    A tensor-parallel shard should initialise the full tensor with this function and keep its slice.
    """
    with torch.no_grad():
        if name.endswith(".bias"):
            param.zero_()
        elif name.rsplit(".", 2)[-2].startswith("ln_"):
            param.fill_(1.0)
        else:
            std = config.init_std
            if name.endswith(("attn.out_proj.weight", "down_proj.weight")):
                std /= math.sqrt(2 * config.n_layer)
            gen = torch.Generator().manual_seed(config.init_seed * 1_000_003 + zlib.crc32(name.encode()))
            param.copy_(torch.empty(param.shape).normal_(0.0, std, generator=gen))


class GPT(nn.Module):
    """GPT language model. forward: idx (B, T) int64 token ids -> (logits, loss).

    Build eagerly with `GPT(config)` (initialised at once), or on the meta device and materialise later:
        with torch.device("meta"): model = GPT(config)
        model.to_empty(device="cpu"); model.init_weights()     # bitwise equal to GPT(config)
    The lm_head shares its weight with the token embedding (weight tying, Press & Wolf 2017).
    """

    def __init__(self, config):
        super().__init__()
        self.config = config
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(config.vocab_size, config.n_embd),
            drop=nn.Dropout(config.dropout),
            h=nn.ModuleDict({str(i): Block(config, i) for i in range(config.n_layer)}),
            ln_f=make_norm(config),
        ))
        if config.block == "gpt2":
            self.transformer["wpe"] = nn.Embedding(config.block_size, config.n_embd)
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.tie_weights()
        if self.lm_head.weight.device.type != "meta":
            self.init_weights()

    def tie_weights(self):
        """Make lm_head use the token embedding's weight (again: `to_empty` may untie them)."""
        self.lm_head.weight = self.transformer.wte.weight

    def init_weights(self):
        """Initialise every parameter with `init_parameter_` (deterministic, order-independent)."""
        self.tie_weights()
        for name, p in self.named_parameters():
            init_parameter_(name, p, self.config)

    def get_num_params(self, non_embedding=True):
        """Number of parameters; the position embedding is subtracted by default, as in nanoGPT
        (the token embedding is counted, because it is also the lm_head)."""
        n = sum(p.numel() for p in self.parameters())
        if non_embedding and "wpe" in self.transformer:
            n -= self.transformer.wpe.weight.numel()
        return n

    def forward(self, idx, targets=None, pos=None):
        """idx, targets: (B, T) int64 with T <= block_size. pos: (T,) int64, the position of each token of idx in
        the full sequence (default 0..T-1; context parallelism passes a rank's share of the positions), used by
        the position embedding (gpt2) or RoPE (llama). Returns (logits, loss): with targets, logits
        (B, T, vocab_size) and the mean cross-entropy (ignore_index=-1); without, the last token's logits
        (B, 1, vocab_size) and None. With MoE layers under autograd the loss's gradient also carries the
        load-balancing loss (moe_aux_loss), its value does not: loss + (aux - aux.detach()) is the cross-entropy
        exactly, what is logged and evaluated; the balancing loss is logged on its own (moe_stats)."""
        B, T = idx.shape
        if T > self.config.block_size:
            raise ValueError(f"sequence length {T} exceeds block_size {self.config.block_size}")
        if pos is None:
            pos = torch.arange(T, device=idx.device)
        x = self.transformer.wte(idx)
        if "wpe" in self.transformer:
            x = x + self.transformer.wpe(pos)
        x = self.transformer.drop(x)
        for block in self.transformer.h.values():
            x = block(x, pos=pos)
        x = self.transformer.ln_f(x)
        if targets is None:
            return self.lm_head(x[:, [-1], :]), None
        logits = self.lm_head(x)
        loss = self.loss(logits, targets)
        aux = moe_aux_loss(self)
        if aux is not None:
            loss = loss + (aux - aux.detach())
        return logits, loss

    def loss(self, logits, targets):
        """Mean cross-entropy of logits (B, T, V) against targets (B, T), ignore_index=-1. A separate method so
        that a strategy whose logits are sharded over the vocabulary (tensor parallel) can replace it."""
        return F.cross_entropy(logits.view(-1, logits.size(-1)), targets.reshape(-1), ignore_index=-1)

    def configure_optimizers(self, weight_decay, learning_rate, betas, device_type, params=None):
        """AdamW with weight decay on every parameter of 2 or more dims (matmul weights, embeddings) and none
        on biases and norm weights (nanoGPT). params: (name, parameter) pairs to optimise, default all of
        this model's; a strategy that holds other tensors (shards) passes its own. Fused kernel on CUDA."""
        params = [(n, p) for n, p in (params if params is not None else self.named_parameters()) if p.requires_grad]
        groups = [
            {"params": [p for _, p in params if p.dim() >= 2], "weight_decay": weight_decay},
            {"params": [p for _, p in params if p.dim() < 2], "weight_decay": 0.0},
        ]
        return torch.optim.AdamW(groups, lr=learning_rate, betas=betas, fused=device_type == "cuda")

    def estimate_mfu(self, fwdbwd_per_iter, dt, peak_flops=312e12):
        """Model FLOPs utilisation: achieved FLOP/s over `peak_flops` (default A100 bf16, 312e12).

        fwdbwd_per_iter: sequences of length block_size processed per iteration; dt: seconds per iteration.
        FLOPs per token as in the PaLM paper, appendix B: 6*N + 12*L*H*Q*T.
        """
        return flops_per_token(self.config) * self.config.block_size * fwdbwd_per_iter / dt / peak_flops

    @torch.no_grad()
    def generate(self, idx, max_new_tokens, temperature=1.0, top_k=None):
        """Sample max_new_tokens tokens after idx (B, T) int64; returns (B, T + max_new_tokens).
        The context is cropped to the last block_size tokens; top_k keeps only the k most likely tokens."""
        for _ in range(max_new_tokens):
            idx_cond = idx[:, -self.config.block_size:]
            logits, _ = self(idx_cond)
            logits = logits[:, -1, :] / temperature
            if top_k is not None:
                v, _ = torch.topk(logits, min(top_k, logits.size(-1)))
                logits[logits < v[:, [-1]]] = -float("inf")
            idx_next = torch.multinomial(F.softmax(logits, dim=-1), num_samples=1)
            idx = torch.cat((idx, idx_next), dim=1)
        return idx


def flops_per_token(config):
    """Training FLOPs per token, 6*N + 12*L*H*Q*T (PaLM appendix B; nanoGPT's estimate_mfu), where N is the
    non-embedding parameter count, counted on a meta-device build (no memory), so the figure is the full
    model's whatever shards a strategy holds. With MoE layers N counts the parameters a token uses: k of the E
    routed experts (the router and shared expert whole)."""
    with torch.device("meta"):
        model = GPT(config)
        n = model.get_num_params()
        if config.n_expert:
            idle = config.n_expert - config.n_expert_per_token
            n -= sum(idle * p.numel() // config.n_expert
                     for m in model.modules() if isinstance(m, GroupedExperts) for p in m.parameters())
    L, H, Q, T = config.n_layer, config.n_head, config.n_embd // config.n_head, config.block_size
    return 6 * n + 12 * L * H * Q * T
