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


class CausalSDPA(nn.Module):
    """The default attention core: causal F.scaled_dot_product_attention with attention dropout in training.

    (q, k, v) each (B, H, T, head_dim) -> (B, H, T, head_dim). No parameters. F.scaled_dot_product_attention is
    looked up at each call, so torch's context_parallel(), which patches it, takes effect here.
    """

    def __init__(self, dropout=0.0):
        super().__init__()
        self.dropout = dropout

    def forward(self, q, k, v):
        return F.scaled_dot_product_attention(q, k, v, dropout_p=self.dropout if self.training else 0.0, is_causal=True)


class CausalSelfAttention(nn.Module):
    """Multi-head causal self-attention: q/k/v projections, RoPE (llama block), the core, the output projection.

    (B, T, n_embd) -> (B, T, n_embd); pos: (T,) int64 positions of the T tokens (default 0..T-1), used by RoPE.
    The number of heads is q_proj's output size / head_dim, so a q/k/v projection holding only some heads
    (column-parallel) computes attention on those heads. `core` (default CausalSDPA, no parameters) maps
    (q, k, v) (B, H, T, head_dim) to (B, H, T, head_dim); a strategy may replace it (ring attention).
    """

    def __init__(self, config):
        super().__init__()
        bias = config.bias and config.block == "gpt2"
        self.head_dim = config.n_embd // config.n_head
        self.q_proj = nn.Linear(config.n_embd, config.n_embd, bias=bias)
        self.k_proj = nn.Linear(config.n_embd, config.n_embd, bias=bias)
        self.v_proj = nn.Linear(config.n_embd, config.n_embd, bias=bias)
        self.out_proj = nn.Linear(config.n_embd, config.n_embd, bias=bias)
        self.resid_dropout = nn.Dropout(config.dropout)
        self.rope_theta = config.rope_theta if config.block == "llama" else None
        self.core = CausalSDPA(config.dropout)

    def forward(self, x, pos=None):
        B, T, _ = x.shape
        q, k, v = (proj(x).view(B, T, -1, self.head_dim).transpose(1, 2) for proj in (self.q_proj, self.k_proj, self.v_proj))
        if self.rope_theta is not None:
            q, k = apply_rope(q, self.rope_theta, pos), apply_rope(k, self.rope_theta, pos)
        y = self.core(q, k, v)
        y = y.transpose(1, 2).reshape(B, T, -1)
        return self.resid_dropout(self.out_proj(y))


class MLP(nn.Module):
    """GPT-2 MLP: down_proj(gelu(up_proj(x))). (B, T, n_embd) -> (B, T, n_embd). The GELU is exact (erf, nanoGPT's)
    or its tanh approximation (config.gelu_approximate="tanh"), which GPT-2 was trained with (Hendrycks & Gimpel
    2016, section 2; Hugging Face's "gelu_new"): hf.py sets it for pretrained GPT-2 weights."""

    def __init__(self, config):
        super().__init__()
        self.gelu_approximate = config.gelu_approximate
        self.up_proj = nn.Linear(config.n_embd, config.ffn_hidden, bias=config.bias)
        self.down_proj = nn.Linear(config.ffn_hidden, config.n_embd, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x):
        return self.dropout(self.down_proj(F.gelu(self.up_proj(x), approximate=self.gelu_approximate)))


class SwiGLU(nn.Module):
    """Llama MLP (Shazeer 2020): down_proj(silu(gate_proj(x)) * up_proj(x)), no biases. (B, T, C) -> (B, T, C)."""

    def __init__(self, config):
        super().__init__()
        self.gate_proj = nn.Linear(config.n_embd, config.ffn_hidden, bias=False)
        self.up_proj = nn.Linear(config.n_embd, config.ffn_hidden, bias=False)
        self.down_proj = nn.Linear(config.ffn_hidden, config.n_embd, bias=False)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x):
        return self.dropout(self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x)))


def make_norm(config):
    """LayerNorm (gpt2 block) or RMSNorm (llama block) over the last dim of size n_embd."""
    if config.block == "llama":
        return nn.RMSNorm(config.n_embd, eps=1e-5)
    return nn.LayerNorm(config.n_embd, bias=config.bias)


class Block(nn.Module):
    """Pre-LN transformer block: x + attn(ln_1(x)), then + mlp(ln_2(x)). (B, T, n_embd) -> (B, T, n_embd);
    pos: (T,) int64 token positions for the attention (default 0..T-1)."""

    def __init__(self, config):
        super().__init__()
        self.ln_1 = make_norm(config)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = make_norm(config)
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
    (attn.out_proj, mlp.down_proj) which get init_std / sqrt(2 * n_layer) (GPT-2 paper, section 2.3).
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
            if name.endswith(("attn.out_proj.weight", "mlp.down_proj.weight")):
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
            h=nn.ModuleDict({str(i): Block(config) for i in range(config.n_layer)}),
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
        (B, 1, vocab_size) and None."""
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
        return logits, self.loss(logits, targets)

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
    model's whatever shards a strategy holds."""
    with torch.device("meta"):
        n = GPT(config).get_num_params()
    L, H, Q, T = config.n_layer, config.n_head, config.n_embd // config.n_head, config.block_size
    return 6 * n + 12 * L * H * Q * T
