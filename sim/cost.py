"""
The cost model: from the model's shapes and a parallel layout to FLOPs, bytes, seconds and memory per device.

Notation (../shared/notes/formulas.md): L layers, h hidden, a heads, f MLP hidden, s sequence, V vocabulary,
b micro-batch, m micro-batches per step, t TP, p PP, c CP, d DP, v virtual stages, B bytes per element.

FLOPs (Narayanan et al. 2021, "Efficient Large-Scale Language Model Training on GPU Clusters Using Megatron-LM",
section 5.1 / appendix; PaLM appendix B): per token and layer, forward, 2·(4h² + 2hf) for the projections and the
MLP (3hf for SwiGLU) plus 4·s·h for attention (QKᵀ and the attention-weighted values, counted without the causal
mask's saving, as both papers do); the head 2hV. Backward is 2x forward. Recomputation adds a forward of every
layer ("full") or of the attention core QKᵀ/softmax/AV ("selective", Korthikanti et al. 2022). With GPT-2's
f = 4h and full recomputation this is Megatron's 96·B·s·L·h²·(1 + s/6h + V/16Lh) per step.

Time of a piece of work on one device, in the shape model (the GPU presets): the sum of its kernels' times
(`block_kernels` lists them, sim/compute.py costs them: GEMMs by tiles and waves, memory-bound kernels at HBM
bandwidth, a latency per kernel). In the flat model (cluster.matmul_efficiency > 0: cpu-local, the analytic
tests, --matmul_efficiency): FLOPs / (peak · matmul_efficiency) + bytes of memory-bound work / HBM bandwidth +
operators · op_latency (the framework's per-operator overhead), with backward 2x forward. The flat model's
memory-bound bytes count what the norms, residual adds, activation function, softmax (unless flash attention),
RoPE, embedding and cross-entropy read and write: per token and layer 10h (two norms and two residual adds,
replicated over TP unless sequence parallel) + 2f (GeLU; 3f SwiGLU) + 3·a·s (softmax, without flash attention).

Collectives (alpha-beta model; Thakur, Rabenseifner & Gropp 2005; Patarasuk & Yuan 2009 for the ring; Sanders,
Speck & Träff 2009 for the pipelined double binary tree NCCL uses): over n ranks on a link of latency alpha and
bandwidth beta, with S the full buffer (all-gather output, reduce-scatter input):
    ring all-reduce      2(n-1)·alpha + 2(n-1)/n · S/beta
    tree all-reduce      2·ceil(log2 n)·alpha + 2 · S/beta
    ring all-gather / reduce-scatter   (n-1)·alpha + (n-1)/n · S/beta
    all-to-all           (n-1)·alpha + (n-1)/n · S/beta   (S: one rank's input; n-1 messages of S/n, pairwise)
    point-to-point       alpha + S/beta
The link a group uses is the slowest its ranks span (sim/cluster.py: TP inside a node, DP/PP across nodes when
the rank grid puts them there). Rank layout, the trainer's (../shared/DESIGN.md): TP innermost, then CP, then
PP, then DP, rank = ((dp_rank·p + pp_rank)·c + cp_rank)·t + tp_rank.

Communication per micro-batch (formulas.md): TP 2 all-reduces of b·s·h in forward and 2 in backward per layer
(with sequence parallelism all-gather + reduce-scatter, the same volume; Shoeybi et al. 2019, Korthikanti et al.
2022); PP b·s·h per stage boundary each way (divided by t with sequence parallelism: Megatron's scatter/gather
optimisation); CP (cp_type "ring": ring attention, Liu et al. 2023) c-1 passes of the local K and V blocks,
overlapped with the blockwise attention (gradients of K and V also travel in backward); CP (cp_type "ulysses":
DeepSpeed-Ulysses, Jacobs et al. 2023) four all-to-alls per layer in forward, q, k, v from sequence- to head-sharded
and the output back, and four in backward (the output's gradient, then q's, k's, v's), each of the rank's
b·(s/c)·w/t elements (w = h for q and the output, h_kv for k and v), on the critical path (not overlapped); the
core then runs on whole sequences for a/(t·c) heads, the same FLOPs as the ring's; DP per step, the gradients
reduced in buckets during the last micro-batch's backward (the others accumulate locally): one all-reduce (ZeRO-0,
2(n-1)/n·Ψ·B bytes sent), or a reduce-scatter ((n-1)/n·Ψ·B) and, after the optimizer step on the 1/n shard, an
all-gather of the updated parameters ((n-1)/n·Ψ·B) for ZeRO-1 and ZeRO-2 (parallel/ddp.py's zero_stage: the same
bytes as ZeRO-0's all-reduce, Rajbhandari et al. 2020 section 7.2.1); for ZeRO-3 an all-gather of every layer's
parameters in forward and again in backward plus a reduce-scatter of its gradients, every micro-batch.

Mixture of experts and expert parallelism (model.py's MoE, parallel/ep.py): a fraction moe_fraction of the blocks
have, instead of the MLP, a router (h x E, replicated), E experts of the MLP's shape of which each token uses k (and
n_shared_expert always-on ones, split by TP like the MLP); the blocks are costed as their average. The experts are
sharded over ep ranks of dp x cp (unsplit by TP: expert tensor parallelism 1) and replicated over edp = dp·c/ep. Per
MoE layer and micro-batch, a device routes T_moe tokens (T/t with sequence parallelism, else all T on every TP rank)
and its experts run k·T_moe·imbalance rows: `expert_imbalance`, the busiest rank's share over the mean (1: perfectly
balanced), scales the expert compute and the all-to-alls, since the step waits for the busiest rank. Communication:
an all-to-all of the E counts, then dispatch and combine, all-to-alls of S = k·T_moe·h·B·imbalance bytes each, in
forward and the same two in backward, on the critical path ("ep" segments); the expert gradients are all-reduced
over edp once per step (the dense ones over dp x cp, as without EP). FLOPs count the k active experts. Memory: the
experts' weights, gradients and AdamW states on each device (not ZeRO-sharded: parallel/ep.py leaves them out of
FSDP), and their activations (the dispatched rows, the experts' hidden tensors, the router's probabilities).

Memory per device: parameters, gradients, optimizer states per ZeRO stage (formulas.md: mixed precision 2Ψ +
2Ψ + 12Ψ, ZeRO-1 4Ψ + 12Ψ/N, ZeRO-2 2Ψ + 14Ψ/N, ZeRO-3 16Ψ/N; fp32 4 + 4 + 8), plus activations per layer and
micro-batch from Korthikanti et al. 2022 ("Reducing Activation Recomputation in Large Transformer Models",
section 4, table 2): sbh(34 + 5as/h) without parallelism, sbh(10 + 24/t + 5as/ht) with TP, sbh/t·(34 + 5as/h) with
TP and SP, the 5as/h term gone with selective recomputation (or flash attention), 2sbh (per t with SP) with full
recomputation; times the micro-batches in flight that the pipeline schedule holds (sim/schedule.py).
"""

import functools
import math
from dataclasses import dataclass, field
from types import SimpleNamespace

from sim.cluster import Link

BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
CP_TYPES = ("ring", "ulysses")
RECOMPUTE = ("none", "selective", "full")
SCHEDULES = ("gpipe", "1f1b", "interleaved_1f1b")
ALGORITHMS = ("ring", "tree", "auto")

# framework operators per layer and micro-batch (forward; backward counts twice): with op_latency, the per-operator
# overhead of eager PyTorch that dominates tiny models on a CPU. Rough counts of ATen calls in model.py's blocks.
OPS = {"attention": 12, "core": 4, "mlp": 6, "embedding": 4, "head": 6, "optimizer": 30}
OPTIMIZER_BYTES_PER_PARAM = 40  # AdamW step + gradient clipping: read/write params, m, v, read grads (twice)


# ----------------------------------------------------------------------------------------------------------
# the model's shapes

@dataclass(frozen=True)
class Model:
    """A GPT's shapes (model.py's GPTConfig with the sequence length named seq_len). Raises ValueError for shapes
    model.py would reject."""
    n_layer: int
    n_head: int
    n_embd: int
    seq_len: int
    vocab_size: int
    ffn_hidden: int = 0  # 0: 4h (gpt2) or 8h/3 rounded up to 64 (llama), as model.py
    block: str = "gpt2"
    bias: bool = False
    dropout: float = 0.0
    n_kv_head: int = 0   # key/value heads (grouped-query attention, Llama 3); 0: n_head (model.py's blocks)
    n_expert: int = 0    # routed experts of an MoE block (model.py's MoE); 0: every block dense
    n_expert_per_token: int = 2  # top-k
    moe_every: int = 1   # block i is an MoE block iff i % moe_every == 0
    n_shared_expert: int = 0  # always-on experts (one MLP of n_shared_expert x ffn_hidden)

    def __post_init__(self):
        if self.block not in ("gpt2", "llama"):
            raise ValueError(f"block must be 'gpt2' or 'llama', got {self.block!r}")
        if min(self.n_layer, self.n_head, self.n_embd, self.seq_len, self.vocab_size) < 1:
            raise ValueError(f"model sizes must be positive: {self}")
        if self.n_embd % self.n_head:
            raise ValueError(f"n_embd={self.n_embd} is not divisible by n_head={self.n_head}")
        if self.n_kv_head == 0:
            object.__setattr__(self, "n_kv_head", self.n_head)
        if self.n_head % self.n_kv_head:
            raise ValueError(f"n_head={self.n_head} is not a multiple of n_kv_head={self.n_kv_head}")
        if self.ffn_hidden == 0:
            f = 4 * self.n_embd if self.block == "gpt2" else 64 * math.ceil(8 * self.n_embd / 3 / 64)
            object.__setattr__(self, "ffn_hidden", f)
        if self.n_expert and not (1 <= self.n_expert_per_token <= self.n_expert and self.moe_every >= 1):
            raise ValueError(f"n_expert_per_token={self.n_expert_per_token} must be in 1..n_expert={self.n_expert} "
                             f"and moe_every={self.moe_every} >= 1")

    @property
    def mlp_matrices(self):
        return 3 if self.block == "llama" else 2

    @property
    def mlp_params(self):
        """Weights of one MLP (and of one expert, which has the MLP's shape)."""
        return self.mlp_matrices * self.n_embd * self.ffn_hidden

    @property
    def moe_layers(self):
        """How many blocks are MoE blocks (block i iff i % moe_every == 0, model.is_moe_layer)."""
        return len(range(0, self.n_layer, self.moe_every)) if self.n_expert else 0

    @property
    def moe_fraction(self):
        return self.moe_layers / self.n_layer

    @property
    def attention_matrix_params(self):
        h = self.n_embd
        return 2 * h * h + 2 * h * (h // self.n_head) * self.n_kv_head

    @property
    def layer_matrix_params(self):
        """Weights split by TP of one block, averaged over the blocks: the q/k/v/out projections, and the MLP (a
        dense block's) or the shared expert (an MoE block's)."""
        phi = self.moe_fraction
        return self.attention_matrix_params + (1 - phi) * self.mlp_params + phi * self.n_shared_expert * self.mlp_params

    @property
    def layer_router_params(self):
        """The router's weights, replicated by TP, averaged over the blocks."""
        return self.moe_fraction * self.n_embd * self.n_expert

    @property
    def layer_expert_params(self):
        """The routed experts' weights (sharded by EP, unsplit by TP), averaged over the blocks."""
        return self.moe_fraction * self.n_expert * self.mlp_params

    @property
    def layer_active_matrix_params(self):
        """The weights one token multiplies in a block, averaged: the routed experts count k of E."""
        phi, k = self.moe_fraction, self.n_expert_per_token
        return self.layer_matrix_params + self.layer_router_params + phi * k * self.mlp_params

    def _vectors(self, moe):
        h, f = self.n_embd, self.ffn_hidden
        if self.block == "llama":
            return 2 * h
        norms = 2 * h * (2 if self.bias else 1)
        if not self.bias:
            return norms
        attention = 2 * h + 2 * (h // self.n_head) * self.n_kv_head  # q, out: h; k, v: the kv heads'
        if moe:  # the experts have no biases; a shared expert has the MLP's
            return norms + attention + ((self.n_shared_expert * f + h) if self.n_shared_expert else 0)
        return norms + attention + f + h

    @property
    def layer_vector_params(self):
        """Norm weights and biases of one block (kept whole by TP in this model), averaged over the blocks."""
        phi = self.moe_fraction
        return (1 - phi) * self._vectors(False) + phi * self._vectors(True)

    @property
    def layer_params(self):
        return self.layer_matrix_params + self.layer_vector_params + self.layer_router_params + \
            self.layer_expert_params

    @property
    def embedding_params(self):
        """Token embedding (tied to the head) and, for gpt2, learned positions."""
        return self.vocab_size * self.n_embd + (self.seq_len * self.n_embd if self.block == "gpt2" else 0)

    @property
    def final_norm_params(self):
        return self.n_embd * (2 if self.block == "gpt2" and self.bias else 1)

    @property
    def params(self):
        """All parameters, the head tied to the embedding (= sum of model.GPT's parameters), an integer."""
        L, Lm, E = self.n_layer, self.moe_layers, self.n_expert
        blocks = L * self.attention_matrix_params + (L - Lm) * (self.mlp_params + self._vectors(False)) + Lm * (
            self.n_embd * E + (E + self.n_shared_expert) * self.mlp_params + self._vectors(True))
        return blocks + self.embedding_params + self.final_norm_params

    def layer_forward_flops(self, tokens, kv_len=None):
        """Forward FLOPs of one block (averaged over the blocks: k active experts in an MoE block) over `tokens` query
        tokens attending to kv_len keys (default seq_len)."""
        h, kv = self.n_embd, self.seq_len if kv_len is None else kv_len
        return 2 * tokens * self.layer_active_matrix_params + 4 * tokens * kv * h

    def head_forward_flops(self, tokens):
        return 2 * tokens * self.n_embd * self.vocab_size


def step_flops(model, par):
    """{"model", "hardware"}: FLOPs of one optimizer step over the global batch. "model" counts forward and
    backward (3x forward), what MFU is measured against; "hardware" adds the recomputed forward work, the count
    Megatron-LM reports as achieved TFLOP/s (Narayanan et al. 2021, eq. 3)."""
    tokens = par.global_batch * model.seq_len
    layer = model.layer_forward_flops(tokens)
    forward = model.n_layer * layer + model.head_forward_flops(tokens)
    extra = {"none": 0, "full": model.n_layer * layer,
             "selective": model.n_layer * 4 * tokens * model.seq_len * model.n_embd}[par.recompute]
    return {"model": 3 * forward, "hardware": 3 * forward + extra}


# ----------------------------------------------------------------------------------------------------------
# the parallel layout

@dataclass(frozen=True)
class Parallel:
    """A parallel layout and the training settings that change costs.

    dp, tp, pp, cp: sizes of the four dimensions; cp_type: "ring" (ring attention) or "ulysses" (all-to-alls);
    v: virtual stages (model chunks) per pipeline rank;
    micro_batch: b sequences; micro_batches: m per pipeline and step (train.py's gradient_accumulation_steps / dp);
    zero: 0 (DDP), 1, 2, 3 (FSDP), sharded over the dp x cp ranks holding the same parameters;
    recompute: none / selective / full; schedule: gpipe / 1f1b / interleaved_1f1b; algorithm: all-reduce algorithm
    ring / tree / auto (the faster); bucket_mb: gradient bucket size (MiB) for ZeRO 0-2; dtype: float32 or a
    16-bit type (mixed precision: 16-bit parameters, gradients and activations, fp32 master weights and Adam);
    overlap_p2p, scatter_gather: how pipeline messages travel (see the fields)."""
    dp: int = 1
    tp: int = 1
    pp: int = 1
    cp: int = 1
    cp_type: str = "ring"
    v: int = 1
    micro_batch: int = 1
    micro_batches: int = 1
    zero: int = 0
    sequence_parallel: bool = False
    recompute: str = "none"
    schedule: str = "1f1b"
    reshard_after_forward: bool = True
    overlap_grad_reduce: bool = True
    bucket_mb: float = 25.0
    loss_parallel: bool = True
    flash_attention: bool = True
    dtype: str = "bfloat16"
    pp_split: str = ""
    algorithm: str = "auto"
    overlap_p2p: bool = True       # pipeline sends on their own stream (False: they block the compute stream, as
    #                                Megatron-LM's 2021 schedules' batched send/recv + wait did)
    scatter_gather: bool = False   # Megatron's scatter/gather: each TP rank sends 1/t of the activation between
    #                                stages, all-gathered over TP after (Narayanan et al. 2021 section 4.1)
    ep: int = 1                    # expert parallelism: each MoE layer's experts sharded over ep ranks of dp x cp
    expert_imbalance: float = 1.0  # tokens of the busiest EP rank's experts over the mean (1: perfectly balanced)

    @property
    def world(self):
        return self.dp * self.tp * self.pp * self.cp

    @property
    def global_batch(self):
        """Sequences per optimizer step."""
        return self.dp * self.micro_batch * self.micro_batches

    @property
    def mixed(self):
        return self.dtype != "float32"

    def rank(self, dp_rank=0, cp_rank=0, pp_rank=0, tp_rank=0):
        """Global rank of a grid coordinate, the trainer's layout (../shared/DESIGN.md): TP innermost, then CP,
        then PP, then DP, rank = ((dp_rank·p + pp_rank)·c + cp_rank)·t + tp_rank. So a CP group spans t·c
        consecutive ranks (inside a node when t·c <= its GPUs) and PP neighbours are t·c ranks apart."""
        return ((dp_rank * self.pp + pp_rank) * self.cp + cp_rank) * self.tp + tp_rank

    def groups(self):
        """Rank 0's groups: {"tp", "cp", "dp" (the dp x cp ranks that share parameters), "ep" (the first ep of those,
        CP innermost: parallel/grid.py's EP group), "edp" (those holding the same experts, ep apart), "world"}."""
        dp_cp = [self.rank(d, c) for d in range(self.dp) for c in range(self.cp)]
        return {"tp": [self.rank(tp_rank=i) for i in range(self.tp)],
                "cp": [self.rank(cp_rank=i) for i in range(self.cp)],
                "dp": dp_cp, "ep": dp_cp[:self.ep], "edp": dp_cp[::self.ep],
                "world": list(range(self.world))}

    def describe(self):
        s = (f"dp={self.dp} tp={self.tp} pp={self.pp} cp={self.cp} v={self.v} b={self.micro_batch} "
             f"m={self.micro_batches} zero={self.zero} recompute={self.recompute}")
        if self.tp > 1:
            s += " sp" if self.sequence_parallel else " no-sp"
        if self.pp > 1:
            s += f" {self.schedule}"
        if self.cp > 1:
            s += f" {self.cp_type}"
        if self.ep > 1:
            s += f" ep={self.ep}"
        return s

    def check(self, model):
        """Raise ValueError (one line) if this layout cannot run `model`."""
        for name in ("dp", "tp", "pp", "cp", "v", "micro_batch", "micro_batches"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ValueError(f"{name} must be a positive integer, got {getattr(self, name)!r}")
        if self.zero not in (0, 1, 2, 3):
            raise ValueError(f"zero stage must be 0, 1, 2 or 3, got {self.zero!r}")
        if self.recompute not in RECOMPUTE:
            raise ValueError(f"recompute must be one of {', '.join(RECOMPUTE)}, got {self.recompute!r}")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"the simulator knows the pipeline schedules {', '.join(SCHEDULES)}, "
                             f"not {self.schedule!r}")
        if self.dtype not in BYTES:
            raise ValueError(f"dtype must be one of {', '.join(BYTES)}, got {self.dtype!r}")
        if self.algorithm not in ALGORITHMS:
            raise ValueError(f"algorithm must be one of {', '.join(ALGORITHMS)}, got {self.algorithm!r}")
        if model.n_head % self.tp or model.ffn_hidden % self.tp:
            raise ValueError(f"tp={self.tp} must divide n_head={model.n_head} and ffn_hidden={model.ffn_hidden}")
        if self.cp_type not in CP_TYPES:
            raise ValueError(f"cp_type must be one of {', '.join(CP_TYPES)}, got {self.cp_type!r}")
        if self.cp > 1 and model.seq_len % (2 * self.cp):
            raise ValueError(f"cp={self.cp} needs seq_len={model.seq_len} divisible by 2*cp (causal load balance)")
        if self.cp > 1 and self.cp_type == "ulysses" and (model.n_head % (self.tp * self.cp) or
                                                          model.n_kv_head % (self.tp * self.cp)):
            raise ValueError(f"Ulysses needs n_head={model.n_head} and n_kv_head={model.n_kv_head} divisible by "
                             f"tp x cp = {self.tp * self.cp}")
        if self.sequence_parallel and self.tp > 1 and (model.seq_len // self.cp) % self.tp:
            raise ValueError(f"sequence parallelism needs the sequence per CP rank ({model.seq_len // self.cp}) "
                             f"divisible by tp={self.tp}")
        if not isinstance(self.ep, int) or self.ep < 1 or (self.dp * self.cp) % self.ep:
            raise ValueError(f"ep={self.ep} must divide dp x cp = {self.dp * self.cp} (experts borrow those ranks)")
        if self.ep > 1 and (not model.n_expert or model.n_expert % self.ep):
            raise ValueError(f"ep={self.ep} needs an MoE model whose n_expert={model.n_expert} it divides")
        if self.expert_imbalance < 1:
            raise ValueError(f"expert_imbalance={self.expert_imbalance} must be >= 1 (the busiest rank over the mean)")
        if self.pp * self.v > model.n_layer:
            raise ValueError(f"pipeline has {self.pp * self.v} stages (pp x v) but the model only {model.n_layer} "
                             f"layers")
        if self.schedule == "interleaved_1f1b":
            if self.pp > 1 and self.v < 2:
                raise ValueError("interleaved_1f1b needs v (pp_virtual_stages) >= 2")
            if self.pp > 1 and self.micro_batches % self.pp:
                raise ValueError(f"interleaved_1f1b needs micro-batches per pipeline ({self.micro_batches}) "
                                 f"divisible by pp={self.pp}")
        elif self.v != 1:
            raise ValueError(f"v={self.v} virtual stages need schedule interleaved_1f1b, not {self.schedule}")


# ----------------------------------------------------------------------------------------------------------
# collectives

def collective_time(op, nbytes, n, link, algorithm="ring"):
    """Seconds for collective `op` over n ranks on `link` (sim.cluster.Link), alpha-beta model.

    op: all_reduce, all_gather, reduce_scatter, all_to_all, broadcast, send; nbytes: S, the full buffer (all-gather
    output, reduce-scatter input, one rank's all-to-all input, the message for send); algorithm for all_reduce: ring,
    tree or auto (the faster).
    Returns 0 for n == 1 (except send). Raises ValueError for an unknown op or algorithm."""
    alpha, beta = link.latency, link.bandwidth
    if op == "send":
        return alpha + nbytes / beta
    if n == 1:
        return 0.0
    if op == "all_reduce":
        ring = 2 * (n - 1) * alpha + 2 * (n - 1) / n * nbytes / beta
        tree = 2 * math.ceil(math.log2(n)) * alpha + 2 * nbytes / beta
        if algorithm not in ALGORITHMS:
            raise ValueError(f"unknown all-reduce algorithm {algorithm!r}")
        return {"ring": ring, "tree": tree, "auto": min(ring, tree)}[algorithm]
    if op in ("all_gather", "reduce_scatter", "all_to_all"):
        return (n - 1) * alpha + (n - 1) / n * nbytes / beta
    if op == "broadcast":
        return (n - 1) * alpha + nbytes / beta
    raise ValueError(f"unknown collective {op!r}")


# ----------------------------------------------------------------------------------------------------------
# memory

def cp_send_bytes(model, par):
    """Context parallelism's bytes sent per rank, per layer and micro-batch, {"forward", "backward"}.
    h_kv = n_kv_head·head_dim, split over t by TP (as h is).
    Ring (parallel/cp.py's ring_send_bytes, which tests/test_cp.py checks against what the trainer's Collectives
    count): forward (c-1) sends of the local K and V blocks, 2·b·(s/c)·h_kv/t elements of B bytes; backward the K/V
    blocks again plus the dK/dV accumulators, which travel in fp32 (max(B, 4) bytes).
    Ulysses (parallel/cp.py's ulysses_send_bytes, checked by tests/test_ulysses.py): each all-to-all of a rank's
    b·(s/c)·w/t elements sends the (c-1)/c of them that belong to the other ranks' heads; forward q, k, v and the
    output, (2h + 2h_kv)/t·b·s·(c-1)/c² elements of B bytes; backward as many (the output's gradient, then dq, dk,
    dv)."""
    c, t, B = par.cp, par.tp, BYTES[par.dtype]
    h_kv = model.n_kv_head * (model.n_embd // model.n_head)
    if par.cp_type == "ulysses":
        elements = (c - 1) * par.micro_batch * (model.seq_len // c) * (2 * model.n_embd + 2 * h_kv) // t // c
        return {"forward": elements * B, "backward": elements * B}
    block = 2 * par.micro_batch * (model.seq_len // c) * h_kv // t
    return {"forward": (c - 1) * block * B, "backward": (c - 1) * block * (B + max(B, 4))}


def ulysses_all_to_all_bytes(model, par):
    """The inputs S (bytes) of Ulysses' all-to-alls per layer and micro-batch on one rank, in each direction: two of
    b·(s/c)·h/t elements (q and the output; their gradients) and two of b·(s/c)·h_kv/t (k and v)."""
    tokens, B = par.micro_batch * model.seq_len // par.cp, BYTES[par.dtype]
    h_kv = model.n_kv_head * (model.n_embd // model.n_head)
    return [tokens * w // par.tp * B for w in (model.n_embd, h_kv, h_kv, model.n_embd)]


def layer_activation_bytes(model, par, recompute=None):
    """Bytes of activations one block keeps for backward, per micro-batch, on one device (Korthikanti et al. 2022,
    section 4.1 and table 2), generalised to f != 4h, SwiGLU (3 MLP tensors of f), dtype B bytes (the paper's
    constants are for B = 2), 1-byte dropout masks only when dropout > 0, and c-way context parallelism (the
    sequence divided by c; ring attention keeps no score matrix, Ulysses keeps F.sdpa's: a/(t·c) heads of s x s,
    the same per token). The all-to-alls' buffers are transient. recompute: default par.recompute.

    Per token: replicated over TP unless sequence parallel: two norm inputs, the QKV and MLP inputs (4h·B) and
    two dropout masks (2h); split over TP: Q, K, V, the out-projection input (4h·B) and the MLP's hidden
    tensors (2f·B, SwiGLU 3f·B); attention scores, split over TP: softmax output a·s·B, plus its dropout mask
    and output a·s·(1 + B) with dropout; none with selective recompute or flash attention. Full recompute keeps
    only the block's input h·B (split with SP)."""
    recompute = par.recompute if recompute is None else recompute
    h, a, s, t, B = model.n_embd, model.n_head, model.seq_len, par.tp, BYTES[par.dtype]
    tokens = par.micro_batch * s / par.cp
    mask = 1 if model.dropout > 0 else 0
    sp = t if par.sequence_parallel else 1
    if recompute == "full":
        return tokens * h * B / sp
    replicated = 4 * h * B + 2 * h * mask
    hidden = (3 if model.block == "llama" else 2) * model.ffn_hidden * B  # an MLP's hidden tensors per token
    phi = model.moe_fraction
    # an MoE block (per token of T_moe = T/t with SP, else T): the router's probabilities (E fp32), the k dispatched
    # rows and their outputs (2·k·h), each row's hidden tensors in its expert (k·hidden), on the busiest rank;
    # its shared expert's hidden tensors are split by TP like the MLP's
    moe = (4 * model.n_expert + par.expert_imbalance * model.n_expert_per_token * (2 * h * B + hidden)) / sp
    split = 4 * h * B + (1 - phi + phi * model.n_shared_expert) * hidden
    ring = par.cp > 1 and par.cp_type == "ring"
    scores = 0 if (recompute == "selective" or par.flash_attention or ring) else a * s * (B + mask * (1 + B))
    return tokens * (replicated / sp + (split + scores) / t + phi * moe)


def embedding_activation_bytes(model, par):
    """The first stage's extra per micro-batch: the embedding dropout mask (Korthikanti et al. 2022, section 4.3)."""
    sp = par.tp if par.sequence_parallel else 1
    return par.micro_batch * model.seq_len / par.cp * model.n_embd * (1 if model.dropout > 0 else 0) / sp


def output_activation_bytes(model, par):
    """The last stage's transient for one micro-batch: final norm and head inputs and the fp32 logits for the
    cross-entropy, 4sbh/t + 4sbV/t (Korthikanti et al. 2022, section 4.3), scaled to dtype B."""
    tokens = par.micro_batch * model.seq_len / par.cp
    sp = par.tp if par.sequence_parallel else 1
    return tokens * (2 * model.n_embd * BYTES[par.dtype] / sp + 4 * model.vocab_size / par.tp)


def state_bytes(params, shards, zero, mixed=True, accumulating=False):
    """{"params", "grads", "optimizer"} bytes for `params` parameters Ψ held on a device, ZeRO stage `zero` over
    N = `shards` ranks (Rajbhandari et al. 2020, section 5). Mixed precision (formulas.md): 16-bit params 2, 16-bit
    grads 2, fp32 master + Adam m, v K = 12; fp32: 4, 4, 8. ZeRO-1 (P_os) shards the optimizer, 2Ψ + 2Ψ + KΨ/N;
    ZeRO-2 (P_os+g) also the gradients, 2Ψ + (2 + K)Ψ/N; ZeRO-3 (P_os+g+p) also the parameters, (4 + K)Ψ/N.
    accumulating: several micro-batches per step, whose gradients the trainer accumulates locally before the last
    one's reduce-scatter (parallel/ddp.py), so ZeRO-2's gradients peak at the full 2Ψ, ZeRO-1's."""
    p, g, o = (2, 2, 12) if mixed else (4, 4, 8)
    return {"params": p * params / (shards if zero >= 3 else 1),
            "grads": g * params / (shards if zero >= 3 or (zero == 2 and not accumulating) else 1),
            "optimizer": o * params / (shards if zero >= 1 else 1)}


# ----------------------------------------------------------------------------------------------------------
# per-device durations

@dataclass
class Costs:
    """Durations (seconds) of the pieces of one step on one device, which sim/schedule.py strings together.

    Compute pieces are lists of segments [(kind, seconds)] run back to back on the compute stream: kinds
    forward, backward, recompute, and the collectives that block it (tp, cp). Collectives the schedule runs on
    their own streams are functions of bytes. `split`: the [first, end) layers of each virtual stage."""
    split: list
    layer_forward: list
    layer_backward: list
    embed_forward: list = field(default_factory=list)
    embed_backward: list = field(default_factory=list)
    head_forward: list = field(default_factory=list)
    head_backward: list = field(default_factory=list)
    layer_params: float = 0.0        # parameters of one block on this device (after TP)
    embed_params: float = 0.0        # token (+ position) embedding on the first stage
    head_params: float = 0.0         # the head's copy on the last stage (pp > 1), plus the final norm
    param_bytes: int = 2
    grad_bytes: int = 2
    p2p_seconds: list = field(default_factory=list)  # per stage boundary (stage s -> s+1's rank), one message
    p2p_stream: str = "p2p"          # the stream sends run on ("compute": they block it)
    p2p_shared: list = field(default_factory=list)  # p2p_seconds while gradient collectives share the NICs
    dp_shards: int = 1
    dp_time: object = None           # (op, nbytes) -> seconds over the dp x cp group
    expert_params: float = 0.0       # routed experts' parameters per block on this device (EP-sharded, not ZeRO)
    edp_time: object = None          # nbytes -> seconds of an all-reduce over the edp group (the expert gradients)
    tied_seconds: float = 0.0        # embedding/head gradient all-reduce between the first and last stage
    norm_seconds: float = 0.0        # the gradient norm's scalar all-reduce over the world
    optimizer_time: object = None    # params updated on this device -> seconds
    layer_activation: float = 0.0    # bytes kept per layer and micro-batch
    layer_activation_full: float = 0.0  # ... without recomputation (the working set of a recomputed layer)
    embed_activation: float = 0.0
    output_activation: float = 0.0

    @classmethod
    def uniform(cls, n_layer, n_stages, forward=1.0, backward=2.0):
        """Unit costs for analytic checks: every layer takes `forward` and `backward`, nothing else costs
        anything, communication is free; n_layer layers split evenly over n_stages stages."""
        per = n_layer // n_stages
        return cls(split=[(i * per, (i + 1) * per) for i in range(n_stages)],
                   layer_forward=[("forward", forward)], layer_backward=[("backward", backward)],
                   p2p_seconds=[0.0] * n_stages, dp_time=lambda op, nbytes: 0.0, optimizer_time=lambda n: 0.0)


def block_kernels(model, par):
    """The kernels of one block, its embedding and its head on one device for one micro-batch, for the shape
    model (sim/compute.py): {"proj", "core", "mlp", "embed", "head"} -> (forward kernels, backward kernels).

    Per device, T = b·s/c tokens, t-way TP (heads, MLP columns and vocabulary split; norms, residuals and
    dropouts on T/t tokens with sequence parallelism, else replicated), B bytes per element:
    proj: norm (reads and writes T·h), the QKV GEMM [T, (a + 2·kv)·d/t, h], RoPE (llama), the out-projection
    [T, h, h/t], the residual add with dropout (x, residual in, out, 1-byte mask: Megatron's fused
    bias-dropout-add); core: QKᵀ and AV as batched GEMMs over b·a/t heads [s, s, d] and [s, d, s] with the
    softmax (s² read and written) and its dropout in between, or with flash attention (or ring CP) one fused kernel
    whose time is its two GEMMs on the causal half of the tiles; ring CP: queries of s/c tokens; Ulysses: the
    whole sequence for b·a/(t·c) heads; mlp: norm, FC1 [T, f/t (2f/t SwiGLU), h],
    GeLU (or SiLU·gate), FC2 [T, h, f/t], residual; with n_expert, "moe": an MoE block's (see the code). Backward:
    each GEMM's input- and weight-gradient GEMMs (flash attention: the recomputed scores and four more products, Dao
    2023), each memory-bound kernel 1.5x its forward bytes (it reads the saved input and the output gradient, writes
    the input gradient)."""
    from sim.compute import backward_gemms, gemm, memory
    h, a, s, f, V = model.n_embd, model.n_head, model.seq_len, model.ffn_hidden, model.vocab_size
    t, c, B, b = par.tp, par.cp, BYTES[par.dtype], par.micro_batch
    tokens = b * s // c
    sp = t if par.sequence_parallel else 1
    d, kv = h // a, model.n_kv_head
    mask = 1 if model.dropout > 0 else 0
    llama = model.block == "llama"

    def residual():
        return memory(tokens / sp * h * (3 * B + mask))

    def norm():
        return memory(2 * tokens / sp * h * B)

    def backward(kernels):
        out = []
        for k in kernels:
            out += backward_gemms(k) if k.m else [memory(1.5 * k.nbytes)]
        return out

    qkv = gemm(tokens, (a + 2 * kv) * d / t, h)
    proj_f = [norm(), qkv] + ([memory(2 * tokens * (a + kv) * d / t * B)] if llama else []) + [
        gemm(tokens, h, h / t), residual()]
    ring = c > 1 and par.cp_type == "ring"
    heads = b * a // t if ring else b * a // (t * c)
    if par.flash_attention or ring:
        sq = s // c if ring else s
        scores, values = gemm(sq, s, d, heads, 0.5), gemm(sq, d, s, heads, 0.5)
        core_f = [scores, values]
        core_b = [scores, gemm(s, d, sq, heads, 0.5), gemm(sq, s, d, heads, 0.5), values, gemm(s, d, sq, heads, 0.5)]
    else:
        core_f = [gemm(s, s, d, heads), memory(2 * heads * s * s * B)]
        if mask:
            core_f.append(memory(heads * s * s * (2 * B + 1)))
        core_f.append(gemm(s, d, s, heads))
        core_b = backward(core_f)
    mlp_f = [norm(), gemm(tokens, f / t * (2 if llama else 1), h), memory((3 if llama else 2) * tokens * f / t * B),
             gemm(tokens, h, f / t), residual()]
    embed_f = [memory(tokens / sp * h * (3 * B + mask))]
    logits = tokens * V / t
    head_f = [norm(), gemm(tokens, V / t, h), memory(logits * 12)]
    head_b = [memory(logits * 8)] + backward_gemms(head_f[1]) + [memory(1.5 * head_f[0].nbytes)]
    out = {"proj": (proj_f, backward(proj_f)), "core": (core_f, core_b), "mlp": (mlp_f, backward(mlp_f)),
           "embed": (embed_f, backward(embed_f)), "head": (head_f, head_b)}
    if model.n_expert:
        # an MoE block: norm, the router [T_moe, E, h] and its softmax/top-k (E fp32 per token), the k rows gathered
        # in expert order and the results scattered back (2·k·h each way), the E/ep local experts as one batched
        # GEMM of rows = k·T_moe·imbalance/(E/ep) each, the shared expert (split by TP like the MLP), residual
        E, k, rows_t = model.n_expert, model.n_expert_per_token, tokens / sp
        L = E // par.ep
        rows = k * rows_t * par.expert_imbalance / L
        shared = model.n_shared_expert * f / t
        moe_f = [norm(), gemm(rows_t, E, h), memory(3 * rows_t * E * 4), memory(4 * k * rows_t * h * B),
                 gemm(rows, f * (2 if llama else 1), h, L), memory((3 if llama else 2) * rows * L * f * B),
                 gemm(rows, h, f, L), memory(4 * k * rows_t * h * B), residual()]
        if shared:
            moe_f += [gemm(tokens, shared * (2 if llama else 1), h), memory((3 if llama else 2) * tokens * shared * B),
                      gemm(tokens, h, shared)]
        out["moe"] = (moe_f, backward(moe_f))
    return out


def build_costs(model, par, cluster):
    """Costs of `par` training `model` on `cluster` (already sized for par.world devices)."""
    par.check(model)
    h, a, s, f, V = model.n_embd, model.n_head, model.seq_len, model.ffn_hidden, model.vocab_size
    t, c, B = par.tp, par.cp, BYTES[par.dtype]
    tokens = par.micro_batch * s / c  # per device and micro-batch
    sp = t if par.sequence_parallel else 1
    share = max(1.0, min(par.world, cluster.gpus_per_node) / cluster.cores) if cluster.cores else 1.0
    groups = par.groups()

    def coll(op, nbytes, group):
        return collective_time(op, nbytes, len(groups[group]), cluster.group_link(groups[group], op), par.algorithm)

    flash = par.flash_attention or (c > 1 and par.cp_type == "ring")
    if cluster.flat:
        rate = cluster.flop_rate(par.dtype)

        def compute(flops, nbytes, ops):
            return share * (flops / rate + nbytes / cluster.hbm_bandwidth + ops * cluster.op_latency)

        # one block, forward: attention (projections, norm, residual; the core QK^T-softmax-AV), then the MLP;
        # backward 2x forward
        proj = compute(2 * tokens * 4 * h * h / t,
                       tokens * B * (5 * h / sp + (4 * h / t if model.block == "llama" else 0)), OPS["attention"])
        core = compute(4 * tokens * s * h / t, 0 if flash else tokens * B * 3 * a * s / t, OPS["core"])
        mlp = compute(2 * tokens * h * f * model.mlp_matrices / t,
                      tokens * B * (5 * h / sp + (3 if model.block == "llama" else 2) * f / t), OPS["mlp"])
        proj_b, core_b, mlp_b = 2 * proj, 2 * core, 2 * mlp
        moe = moe_b = 0.0
        if model.n_expert:  # router, k experts per routed token (the busiest rank's share), the shared expert
            routed, E, k = tokens / sp, model.n_expert, model.n_expert_per_token
            moe = compute(2 * routed * h * E + 2 * routed * k * par.expert_imbalance * model.mlp_params +
                          2 * tokens * model.n_shared_expert * model.mlp_params / t,
                          routed * (5 * h * B + 12 * E + 8 * k * h * B), OPS["mlp"] + 3 * E // par.ep)
            moe_b = 2 * moe
        embed = (compute(0, tokens * h * B * 3, OPS["embedding"]), compute(0, tokens * h * B * 3, 2 * OPS["embedding"]))
        logits = tokens * V / t
        head = (compute(model.head_forward_flops(tokens) / t, tokens * h * B * 2 / sp + logits * 12, OPS["head"]),
                compute(2 * model.head_forward_flops(tokens) / t, tokens * h * B * 4 / sp + logits * 8,
                        2 * OPS["head"]))

        def optimizer_time(params):
            return compute(0, params * OPTIMIZER_BYTES_PER_PARAM, OPS["optimizer"])
    else:
        from sim.compute import memory, seconds
        kernels = block_kernels(model, par)
        times = {name: (seconds(fw, cluster, par.dtype), seconds(bw, cluster, par.dtype))
                 for name, (fw, bw) in kernels.items()}
        (proj, proj_b), (core, core_b), (mlp, mlp_b) = times["proj"], times["core"], times["mlp"]
        moe, moe_b = times.get("moe", (0.0, 0.0))
        embed, head = times["embed"], times["head"]

        def optimizer_time(params):
            return seconds([memory(params * OPTIMIZER_BYTES_PER_PARAM)], cluster, par.dtype)

    act = tokens * h * B  # b·s·h on this CP rank: the TP collectives' buffer
    tp_block = coll("all_reduce", act, "tp") if not par.sequence_parallel else (
        coll("all_gather", act, "tp") + coll("reduce_scatter", act, "tp"))
    # backward with SP: reduce-scatter + all-gather per half block, and the input all-gathered again for the
    # weight gradient (Korthikanti et al. 2022 section 4.2.2, Megatron keeps only the 1/t shard)
    tp_block_b = tp_block + (coll("all_gather", act, "tp") if par.sequence_parallel else 0.0)
    if par.cp_type == "ulysses":  # four all-to-alls each way per layer, not overlapped
        cp_fwd = cp_bwd = sum(coll("all_to_all", S, "cp") for S in ulysses_all_to_all_bytes(model, par))
    else:
        ring = cp_send_bytes(model, par)  # per layer and micro-batch: (c-1) K/V messages forward, K/V + dK/dV back

        def ring_round(nbytes):  # one round's send on the CP link, hidden behind one block's compute
            return (collective_time("send", nbytes / (c - 1), 2, cluster.group_link(groups["cp"], "send"))
                    if c > 1 else 0.0)
        cp_fwd = (c - 1) * max(0.0, ring_round(ring["forward"]) - core / c)
        cp_bwd = (c - 1) * max(0.0, ring_round(ring["backward"]) - 2 * core / c)

    def clean(segments):
        return [(k, d) for k, d in segments if d > 0]

    # the average block: a fraction phi are MoE blocks (no TP collective around the routed experts, one around a
    # shared expert), with the all-to-alls of expert parallelism; the rest dense
    phi = model.moe_fraction
    ep_fwd = ep_bwd = 0.0
    if phi and par.ep > 1:
        S = model.n_expert_per_token * tokens / sp * h * B * par.expert_imbalance  # one dispatch's (or combine's) input
        ep_fwd = phi * (coll("all_to_all", 8 * model.n_expert, "ep") + 2 * coll("all_to_all", S, "ep"))
        ep_bwd = phi * 2 * coll("all_to_all", S, "ep")
    mlp_tp = (1 - phi + phi * (model.n_shared_expert > 0))
    forward = [("forward", proj + core), ("cp", cp_fwd), ("tp", tp_block), ("forward", (1 - phi) * mlp + phi * moe),
               ("ep", ep_fwd), ("tp", mlp_tp * tp_block)]
    backward = [("ep", ep_bwd), ("backward", (1 - phi) * mlp_b + phi * moe_b), ("tp", mlp_tp * tp_block_b),
                ("backward", proj_b + core_b), ("cp", cp_bwd), ("tp", tp_block_b)]
    if par.recompute == "full":
        backward = [("recompute" if k == "forward" else k, d) for k, d in forward] + backward
    elif par.recompute == "selective":
        backward = [("recompute", core)] + backward

    # embedding (vocab-parallel: all-reduce over TP) and head + cross-entropy (vocab-parallel, loss parallel)
    embed_fwd = [("forward", embed[0]), ("tp", coll("all_reduce", act, "tp"))]
    embed_bwd = [("backward", embed[1]),
                 ("tp", coll("all_gather", act, "tp") if par.sequence_parallel else 0.0)]
    logits = tokens * V / t
    loss_comm = (coll("all_reduce", tokens * 4, "tp") + coll("all_reduce", tokens * 8, "tp") if par.loss_parallel
                 else coll("all_gather", logits * t * B, "tp"))
    head_fwd = [("tp", coll("all_gather", act, "tp") if par.sequence_parallel else 0.0),
                ("forward", head[0]),
                ("tp", loss_comm)]
    head_bwd = [("backward", head[1]),
                ("tp", coll("reduce_scatter" if par.sequence_parallel else "all_reduce", act, "tp"))]

    # pipeline messages: stage s on rank s % p sends to stage s+1 on rank (s+1) % p
    n_stages = par.pp * par.v
    message = tokens * h * B / (t if par.scatter_gather else sp)
    regather = coll("all_gather", tokens * h * B, "tp") if par.scatter_gather and not par.sequence_parallel else 0.0

    def boundary(stage, share=1):
        src, dst = par.rank(pp_rank=stage % par.pp), par.rank(pp_rank=(stage + 1) % par.pp)
        link = cluster.group_link([src, dst], "send")
        return collective_time("send", message, 2, Link(link.bandwidth / share, link.latency)) + regather
    p2p = [boundary(st) if par.pp > 1 else 0.0 for st in range(n_stages)]
    # a send while this rank's gradient collectives are in flight over the same NICs (both groups span nodes)
    # gets half the bandwidth (NCCL interleaves the two communicators' chunks)
    dp_nodes = {r // cluster.gpus_per_node for r in groups["dp"]}
    pp_nodes = {par.rank(pp_rank=r) // cluster.gpus_per_node for r in range(par.pp)}
    shared = par.overlap_p2p and len(dp_nodes) > 1 and len(pp_nodes) > 1
    p2p_shared = [boundary(st, 2) if par.pp > 1 and shared else d for st, d in enumerate(p2p)]

    layer_params = model.layer_matrix_params / t + model.layer_vector_params + model.layer_router_params
    expert_params = model.layer_expert_params / par.ep
    head_params = (V * h / t if par.pp > 1 else 0.0) + model.final_norm_params
    tied_link = cluster.group_link([0, par.rank(pp_rank=par.pp - 1)], "all_reduce")
    params_b, grads_b = (2, 2) if par.mixed else (4, 4)

    def dp_time(op, nbytes):
        return coll(op, nbytes, "dp")

    def edp_time(nbytes):
        return coll("all_reduce", nbytes, "edp")

    return Costs(
        split=list(pipeline_split(model.n_layer, n_stages, par.pp_split, h, s, V)),
        layer_forward=clean(forward), layer_backward=clean(backward),
        embed_forward=clean(embed_fwd), embed_backward=clean(embed_bwd),
        head_forward=clean(head_fwd), head_backward=clean(head_bwd),
        layer_params=layer_params, embed_params=V * h / t + (s * h if model.block == "gpt2" else 0),
        head_params=head_params, param_bytes=params_b, grad_bytes=grads_b, p2p_seconds=p2p,
        p2p_stream="p2p" if par.overlap_p2p else "compute", p2p_shared=p2p_shared,
        dp_shards=par.dp * par.cp, dp_time=dp_time, expert_params=expert_params, edp_time=edp_time,
        tied_seconds=(collective_time("all_reduce", V * h / t * grads_b, 2, tied_link, par.algorithm)
                      if par.pp > 1 else 0.0),
        norm_seconds=coll("all_reduce", 4, "world"), optimizer_time=optimizer_time,
        layer_activation=layer_activation_bytes(model, par),
        layer_activation_full=layer_activation_bytes(model, par, recompute="none") if par.recompute != "none" else 0.0,
        embed_activation=embedding_activation_bytes(model, par),
        output_activation=output_activation_bytes(model, par))


@functools.lru_cache(maxsize=512)
def pipeline_split(n_layer, n_stages, pp_split, n_embd, seq_len, vocab_size):
    """The [first, end) layers of each virtual stage: parallel/pp.py's split (train.py's pipeline uses it),
    balanced by forward cost with the embedding on the first and the head on the last stage."""
    from parallel.pp import split_layers, stage_costs

    shapes = SimpleNamespace(n_embd=n_embd, block_size=seq_len, vocab_size=vocab_size)
    return tuple(split_layers(n_layer, n_stages, pp_split, stage_costs(shapes)))
