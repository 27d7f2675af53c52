"""
Tensor parallelism (Megatron-LM, Shoeybi et al. 2019), with sequence parallelism (Korthikanti et al. 2022,
"Reducing Activation Recomputation in Large Transformer Models") and loss parallelism (vocab-parallel
cross-entropy). Every rank of the TP group holds a slice of every matmul weight and reads the same batch.

The split of one block (t = TP size, h = n_embd, f = ffn_hidden):
- q/k/v and the MLP up (and gate) projections are column-parallel: each rank holds n_head/t heads and f/t hidden
  units (rows of the weight, slices of the bias), so attention runs on the local heads unchanged (model.py infers
  the number of heads from q_proj's output size) and the MLP's nonlinearity is elementwise on local units.
- attn.out_proj and mlp.down_proj are row-parallel: each rank holds the matching h/t or f/t input columns and
  produces a partial sum; the partial sums are all-reduced (or reduce-scattered with SP) and the bias is added
  after the reduction. So a block costs, per micro-batch, 2 all-reduces of b·s·h in forward (after the two
  row-parallel layers) and 2 in backward (the gradient w.r.t. the input of attention and of the MLP).
- The token embedding is vocab-parallel (rows [v0, v1) per rank; ids outside the shard give 0, all-reduce), and the
  tied head is column-parallel over the vocabulary with the same weight shard. Without loss parallelism its logits
  are all-gathered over the vocabulary and F.cross_entropy runs as usual; with it, the cross-entropy is computed
  from the vocab-sharded logits: the max and the sum of exponentials are all-reduced and the target's logit comes
  from the rank that owns it (one all-reduce of b·s max values and one of 2·b·s [sum-exp, target-logit]), so
  the (b, s, V) logits never exist on one rank. Its backward (softmax - one-hot) is local.
- With sequence parallelism the activations between the row-parallel output and the next column-parallel input
  (residual stream, norms, dropout) are sharded along the sequence: each all-reduce becomes a reduce-scatter
  (after the row-parallel layer) and the matching copy an all-gather (before the column-parallel layers), the
  same bus volume ((t-1)/t·S each, 2(t-1)/t·S for the all-reduce). The norm weights and the row-parallel biases,
  replicated but now fed only this rank's positions, get their gradients all-reduced over TP once per step.
  The embedding is all-reduced as without SP (GPT-2 adds the replicated position embedding to it), then split
  along the sequence before the first block (Megatron does the same when there are learned position
  embeddings); the final norm's output is all-gathered before the head.

Communication per micro-batch of b sequences of s tokens (custom variant, counted in strategy.stats; the
figures tests/test_tp.py checks), with L layers, h = n_embd, V = vocab:
- blocks: 4·L tensors of b·s·h: all-reduces (2 forward, 2 backward per layer), or with SP 4·L all-gathers and
  4·L reduce-scatters of b·s·h (2 + 2 of each per layer, forward and backward);
- embedding: 1 all-reduce of b·s·h forward (with SP, plus 1 all-gather of b·s·h in backward, the split's grad);
- head: without SP 1 all-reduce of b·s·h in backward (the copy into the TP region); with SP an all-gather of b·s·h
  forward and a reduce-scatter of b·s·h backward;
- loss: with loss parallelism 1 all-reduce of b·s (max) and 1 of 2·b·s (sum-exp, target logit), forward only;
  without it 1 all-gather of the b·s·V logits forward (nothing backward);
- per optimizer step, with SP: 1 all-reduce of the norm and row-bias gradients; in clipping, 1 all-reduce of
  one scalar (the sharded parameters' squared gradient norm).

Two variants, top to bottom, each a function that applies TP to a GPT or a pipeline stage on a "tp" mesh or group
(parallel/3d.py composes them) and a thin 1-D strategy:
- `pytorch`: `apply_tp`, `parallelize_module` with a declarative plan (`pytorch_tp_plan`) on a "tp" DeviceMesh
  (DTensor), and `loss_parallel()`. Its collectives happen inside DTensor and are not counted in strategy.stats.
- `custom`: `apply_custom_tp`, the same algorithm written out, Megatron-style, with autograd Functions over the
  Collectives of kernels/comm.py (so the triton and nccl variants can swap the backend): copy-to / reduce-from the TP
  region, gather / scatter along the last dimension, their sequence-parallel twins, ColumnParallelLinear,
  RowParallelLinear, VocabParallelEmbedding, and vocab-parallel cross-entropy.

Grouped-query attention: k_proj and v_proj are column-parallel like q_proj, each rank holding n_kv_head/t key/value
heads, those its n_head/t query heads read (n_kv_head must be divisible by t; Megatron replicates kv heads when t is
larger, not done here).

Mixture of experts (model.MoE): the router and the experts are not split by TP (expert tensor parallelism 1, as
torchtitan's default; Megatron-core's ETP = TP is the alternative). Without sequence parallelism every TP rank
routes and computes the same (replicated) tokens, as it does the norms, so its MoE gradients agree on every rank.
With it, the custom layers run the MoE on each rank's own part of the sequence (the MoE is per token), sum the router
and expert gradients over TP like the norms', and the balancing statistics over the TP group (`moe_token_group`);
the DTensor plan gathers the sequence for the MoE and keeps its part of the output (PrepareModuleInputOutput), so
the MoE runs replicated there, as without SP (its plain-tensor gradients need no sum over TP, which FSDP2 could not
do before its reduce-scatter). A shared expert is split like the dense MLP. Expert parallelism (parallel/ep.py)
shards the experts over dp x cp.

Both variants: every shard is the slice of the full model's init (model.init_parameter_ on the full tensor), so
TP=1 and TP=t start from identical weights; the embedding and the head stay tied; clipping measures each
parameter once (sharded ones' squares summed over TP, replicated ones counted once). The vocabulary may be split
unevenly, by torch.chunk's rule (DTensor's): ceil(V/t) rows per rank, fewer on the last (Megatron pads instead),
so the 65-character Shakespeare vocabulary splits over 2 ranks. n_head, ffn_hidden and (with SP) block_size must
be divisible by t; a config that is not is rejected before any collective, naming the numbers.

Dropout: every TP rank of a group seeds its RNG alike, so the masks of replicated activations agree across TP
ranks (Megatron keeps a separate model-parallel RNG for the attention dropout of local heads; here those masks
are the same pattern on every rank's heads).

The TP group is the "tp" dimension of the strategy's rank grid (parallel/grid.py): the whole world for the 1-D
strategy, a sub-mesh in 3d. Checkpoints: each rank's piece as a DTensor Shard(d) on that mesh (`tp_placement`).
"""

import contextlib

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.distributed.tensor import DTensor, Replicate, Shard

from model import GPT, MoE
from parallel import Strategy, as_dtensor, full_shapes, materialize, register, slice_init

COLUMN = ("attn.q_proj", "attn.k_proj", "attn.v_proj", "mlp.up_proj", "mlp.gate_proj", "mlp.shared_expert.up_proj",
          "mlp.shared_expert.gate_proj")
ROW = ("attn.out_proj", "mlp.down_proj", "mlp.shared_expert.down_proj")
VOCAB = ("transformer.wte", "lm_head")


def shard_dim(name):
    """The dimension along which TP shards the parameter `name` of GPT, or None if it is replicated:
    column-parallel weights and biases and the (tied) embedding along 0, row-parallel weights along 1."""
    module, leaf = name.rsplit(".", 1)
    if module.endswith(COLUMN) or module in VOCAB:
        return 0
    if module.endswith(ROW) and leaf == "weight":
        return 1
    return None


def chunk_bounds(size, n, rank):
    """[start, end) of `rank`'s piece when `size` is split in n by torch.chunk's (and DTensor Shard's) rule."""
    step = -(-size // n)
    return min(rank * step, size), min((rank + 1) * step, size)


def check_tp_config(model_config, tp, sequence_parallel):
    """Raise ValueError (one line, naming the numbers) if the model cannot be split over tp ranks."""
    c = model_config
    if c.n_head % tp:
        raise ValueError(f"tensor parallel: n_head={c.n_head} is not divisible by the TP size {tp}")
    if c.n_kv_head % tp:
        raise ValueError(f"tensor parallel: n_kv_head={c.n_kv_head} (key/value heads) is not divisible by the TP size "
                         f"{tp}")
    if c.n_shared_expert and c.n_shared_expert * c.ffn_hidden % tp:
        raise ValueError(f"tensor parallel: the shared expert's hidden size {c.n_shared_expert * c.ffn_hidden} is not "
                         f"divisible by the TP size {tp}")
    if c.ffn_hidden % tp:
        raise ValueError(f"tensor parallel: the MLP hidden size ffn_hidden={c.ffn_hidden} is not divisible by the "
                         f"TP size {tp}")
    if chunk_bounds(c.vocab_size, tp, tp - 1)[0] >= c.vocab_size:
        raise ValueError(f"tensor parallel: vocab_size={c.vocab_size} cannot be split in {tp} non-empty shards "
                         f"(ceil(vocab/{tp}) rows per rank)")
    if sequence_parallel and c.block_size % tp:
        raise ValueError(f"sequence parallel: block_size={c.block_size} is not divisible by the TP size {tp}")


# ----------------------------------------------------------------------------------------------------------
# pytorch variant


def pytorch_tp_plan(module, sequence_parallel, loss_parallel):
    """The parallelize_module plan (torchtitan's, as a dict {submodule name: ParallelStyle}) of the module
    docstring for `module`: the GPT, or a pipeline stage of it (parallel/pp.py's StageModule) that holds only some
    of transformer.wte, the blocks transformer.h.<i>, transformer.ln_f and lm_head, under the GPT's names.

    The residual stream between blocks is replicated, or with sequence_parallel sharded along the sequence
    (Shard(1)): a stage then takes and returns its local (B, T/t, n_embd) piece. With loss_parallel the head's
    logits stay a DTensor sharded over the vocabulary (Shard(-1)) for loss_parallel()'s cross-entropy."""
    from torch.distributed.tensor.parallel import (ColwiseParallel, PrepareModuleInput, PrepareModuleInputOutput,
                                                   RowwiseParallel, SequenceParallel)
    sp, lp = sequence_parallel, loss_parallel
    residual = Shard(1) if sp else Replicate()  # layout of the residual stream between blocks
    modules = dict(module.named_modules())
    blocks = sorted(int(n.split(".")[2]) for n in modules if n.count(".") == 2 and n.startswith("transformer.h."))
    plan = {}
    if "transformer.wte" in modules:
        plan["transformer.wte"] = RowwiseParallel(input_layouts=Replicate(), output_layouts=Replicate())
        if sp:  # the embedding's output is replicated: the first block takes its sequence piece
            plan[f"transformer.h.{blocks[0]}"] = PrepareModuleInput(input_layouts=(Replicate(),),
                                                                   desired_input_layouts=(Shard(1),),
                                                                   use_local_output=True)
    if "lm_head" in modules:
        plan["lm_head"] = ColwiseParallel(input_layouts=residual, output_layouts=Shard(-1) if lp else Replicate(),
                                          use_local_output=not lp)
    if sp and "transformer.ln_f" in modules:
        plan["transformer.ln_f"] = SequenceParallel()
    for i in blocks:
        p = f"transformer.h.{i}"
        moe = isinstance(modules[f"{p}.mlp"], MoE)
        for name in COLUMN + ROW:
            if f"{p}.{name}" not in modules:  # mlp.gate_proj only in the Llama block, shared_expert only in MoE ones
                continue
            # an MoE's shared expert is split as the dense MLP; its output joins the MoE's, which is replicated
            output = Replicate() if "shared_expert" in name else residual
            plan[f"{p}.{name}"] = ColwiseParallel() if name in COLUMN else RowwiseParallel(output_layouts=output)
        if sp:
            plan[f"{p}.ln_1"] = SequenceParallel()
            plan[f"{p}.ln_2"] = SequenceParallel()
            plan[f"{p}.attn"] = PrepareModuleInput(input_layouts=(Shard(1),), desired_input_layouts=(Replicate(),))
            if moe:  # the MoE on the gathered sequence (plain tensors, replicated), this rank's part of its output
                plan[f"{p}.mlp"] = PrepareModuleInputOutput(
                    input_layouts=(Shard(1),), desired_input_layouts=(Replicate(),), use_local_input=True,
                    output_layouts=(Replicate(),), desired_output_layouts=(Shard(1),), use_local_output=True)
            else:
                plan[f"{p}.mlp"] = PrepareModuleInput(input_layouts=(Shard(1),), desired_input_layouts=(Replicate(),))
    return plan


def apply_tp(module, mesh, sequence_parallel=False, loss_parallel=False):
    """Tensor parallelism on a GPT or a pipeline stage (on the meta device, or materialised): parallelize_module with
    pytorch_tp_plan on `mesh`, the 1-D "tp" DeviceMesh (or sub-mesh), then the head tied to the embedding again (the
    plan distributes wte and lm_head separately) where the module holds both."""
    from torch.distributed.tensor.parallel import parallelize_module
    parallelize_module(module, mesh, pytorch_tp_plan(module, sequence_parallel, loss_parallel))
    if "wte" in module.transformer and hasattr(module, "lm_head"):
        module.lm_head.weight = module.transformer.wte.weight
    if loss_parallel and isinstance(module, GPT):  # the replicated DTensor loss as a plain tensor, to which GPT.forward
        module.loss = lambda logits, targets, loss=module.loss: loss(logits, targets).full_tensor()  # adds MoE terms
    for m in module.modules():
        if isinstance(m, MoE):  # every TP rank routes the same tokens (with SP too: the plan gathers them)
            m.replicas = mesh.size()


def moe_token_group(module, comm, sequence_parallel):
    """Tell the MoE layers of `module` how the custom TP over `comm` shares their tokens: with sequence parallelism each
    rank holds its part of the sequence (the balancing statistics are summed over `comm`); without it every rank
    routes the same tokens (the statistics count them once: `replicas`). See model.MoE."""
    for m in module.modules():
        if isinstance(m, MoE):
            if sequence_parallel:
                m.token_group = comm
            else:
                m.replicas = comm.world_size


def match_grad_placements(params):
    """Bring every DTensor gradient to its parameter's placements. DTensor TP leaves some in another layout:
    Partial(sum) for the norms that sequence parallelism feeds only this rank's positions (so this is Megatron's SP
    gradient all-reduce over TP, once per step), Replicate for the vocab-sharded embedding (each rank keeps its
    rows). FSDP2 does the same itself before its reduce-scatter."""
    for p in params:
        if isinstance(p.grad, DTensor) and p.grad.placements != p.placements:
            p.grad = p.grad.redistribute(p.device_mesh, p.placements)


def loss_parallel_context(enabled):
    """DTensor's loss_parallel() (cross-entropy on vocab-sharded logits) if enabled, else nothing."""
    from torch.distributed.tensor.parallel import loss_parallel
    return loss_parallel() if enabled else contextlib.nullcontext()


class TensorParallel(Strategy):
    """What both 1-D variants share: every process is one TP rank of a grid with only a "tp" dimension (every rank
    reads the same batch), and the model config is checked before any collective."""

    sharded = True

    def __init__(self, cfg, device):
        super().__init__(cfg, device)
        if cfg.tp_size not in (0, self.world_size):
            raise ValueError(f"parallel='tp' uses every process for tensor parallelism: tp_size={cfg.tp_size} must "
                             f"be 0 or the world size {self.world_size} (use parallel='3d' to combine)")
        self.sequence_parallel, self.loss_parallel = cfg.sequence_parallel, cfg.loss_parallel
        self.use_grid({"dp": 1, "pp": 1, "cp": 1, "tp": self.world_size})

    def build_model(self, model_config, weights=None):
        check_tp_config(model_config, self.world_size, self.sequence_parallel)
        torch.manual_seed(self.cfg.seed)  # TP peers alike: dropout masks of replicated activations must agree
        with torch.device("meta"):
            self.model = self.module = GPT(model_config)
        return self.model


@register("tp", "pytorch")
class PytorchTP(TensorParallel):
    """parallelize_module with the plan of the module docstring (apply_tp) on a 1-D "tp" DeviceMesh; loss_parallel()."""

    def build_model(self, model_config, weights=None):
        model = super().build_model(model_config)
        apply_tp(model, self.grid.mesh["tp"], self.sequence_parallel, self.loss_parallel)
        self.apply_ac(model)
        materialize(model, self.device, slice_init(model_config, weights=weights))
        return model

    def loss_context(self):
        return loss_parallel_context(self.loss_parallel)

    def sync_gradients(self):
        match_grad_placements(self.model.parameters())


# ----------------------------------------------------------------------------------------------------------
# custom variant: the autograd Functions (Megatron's mappings), then the layers, then the strategy


def _gather(comm, x, dim, sizes=None):
    """Concatenate every rank's x along `dim` (the pieces may differ in size along dim: `sizes`, all ranks')."""
    n = comm.world_size
    sizes = sizes or [x.shape[dim]] * n
    m = max(sizes)
    local = x.movedim(dim, 0)
    if local.shape[0] < m:
        local = torch.cat([local, local.new_zeros(m - local.shape[0], *local.shape[1:])])
    local = local.contiguous()
    out = local.new_empty(n * m, *local.shape[1:])
    comm.all_gather(out, local)
    pieces = [out[r * m:r * m + sizes[r]] for r in range(n)]
    return torch.cat(pieces).movedim(0, dim)


def _split(comm, x, dim, sizes=None):
    """This rank's piece of x along `dim` (torch.chunk's rule, or the given sizes)."""
    sizes = sizes or [x.shape[dim] // comm.world_size] * comm.world_size
    start = sum(sizes[:comm.rank])
    return x.narrow(dim, start, sizes[comm.rank]).contiguous()


def _reduce_scatter(comm, x, dim):
    """Sum over ranks of x, of which this rank keeps its 1/N piece along `dim`."""
    full = x.movedim(dim, 0).contiguous()
    out = full.new_empty(full.shape[0] // comm.world_size, *full.shape[1:])
    comm.reduce_scatter(out, full)
    return out.movedim(0, dim)


def _all_reduce(comm, x):
    x = x.contiguous().clone()
    comm.all_reduce(x)
    return x


class CopyToTPRegion(torch.autograd.Function):
    """Identity forward; all-reduce of the gradient backward (Megatron's f, the entry to a column-parallel layer)."""

    @staticmethod
    def forward(ctx, x, comm):
        ctx.comm = comm
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return _all_reduce(ctx.comm, grad), None


class ReduceFromTPRegion(torch.autograd.Function):
    """All-reduce forward; identity backward (Megatron's g, the exit of a row-parallel layer)."""

    @staticmethod
    def forward(ctx, x, comm):
        return _all_reduce(comm, x)

    @staticmethod
    def backward(ctx, grad):
        return grad, None


class GatherFromTPRegion(torch.autograd.Function):
    """All-gather along the last dim forward (pieces of `sizes`); keep this rank's piece backward."""

    @staticmethod
    def forward(ctx, x, comm, sizes):
        ctx.comm, ctx.sizes = comm, sizes
        return _gather(comm, x, -1, sizes)

    @staticmethod
    def backward(ctx, grad):
        return _split(ctx.comm, grad, -1, ctx.sizes), None, None


class ScatterToTPRegion(torch.autograd.Function):
    """Keep this rank's piece along the last dim forward; all-gather backward."""

    @staticmethod
    def forward(ctx, x, comm, sizes):
        ctx.comm, ctx.sizes = comm, sizes
        return _split(comm, x, -1, sizes)

    @staticmethod
    def backward(ctx, grad):
        return _gather(ctx.comm, grad, -1, ctx.sizes), None, None


class GatherFromSequenceParallelRegion(torch.autograd.Function):
    """All-gather along the sequence (dim 1) forward; reduce-scatter backward (the consumer is column-parallel,
    whose input gradients are partial sums)."""

    @staticmethod
    def forward(ctx, x, comm):
        ctx.comm = comm
        return _gather(comm, x, 1)

    @staticmethod
    def backward(ctx, grad):
        return _reduce_scatter(ctx.comm, grad, 1), None


class ReduceScatterToSequenceParallelRegion(torch.autograd.Function):
    """Reduce-scatter along the sequence (dim 1) forward; all-gather backward (exit of a row-parallel layer)."""

    @staticmethod
    def forward(ctx, x, comm):
        ctx.comm = comm
        return _reduce_scatter(comm, x, 1)

    @staticmethod
    def backward(ctx, grad):
        return _gather(ctx.comm, grad, 1), None


class ScatterToSequenceParallelRegion(torch.autograd.Function):
    """Keep this rank's piece of the sequence (dim 1) forward; all-gather backward."""

    @staticmethod
    def forward(ctx, x, comm):
        ctx.comm = comm
        return _split(comm, x, 1)

    @staticmethod
    def backward(ctx, grad):
        return _gather(ctx.comm, grad, 1), None


def enter_tp_region(x, comm, sequence_parallel):
    """The input of a column-parallel layer: replicated x as is (grad all-reduced), or the sequence all-gathered."""
    if sequence_parallel:
        return GatherFromSequenceParallelRegion.apply(x, comm)
    return CopyToTPRegion.apply(x, comm)


class VocabParallelCrossEntropy(torch.autograd.Function):
    """Mean cross-entropy (ignore_index=-1) from logits sharded over the vocabulary, never gathering them.

    forward(logits (n, V_local) of vocabulary ids [vocab_start, vocab_start + V_local), target (n,) global ids):
    m = max over all ranks (all-reduce max); sum-exp of logits - m and the target's logit - m (0 on the ranks that
    do not own it) are summed over ranks in one all-reduce; loss = log(sum-exp) - target logit. The gradient,
    softmax - one-hot, is local to the shard."""

    @staticmethod
    def forward(ctx, logits, target, vocab_start, comm, ignore_index=-1):
        logits = logits.float()
        n, v = logits.shape
        m = logits.max(dim=-1).values
        comm.all_reduce(m, op="max")
        shifted = logits - m.unsqueeze(1)
        local = target - vocab_start
        outside = (local < 0) | (local >= v)
        local = local.masked_fill(outside, 0)
        exp = shifted.exp()
        sums = torch.stack([exp.sum(dim=-1),
                            shifted.gather(1, local.unsqueeze(1)).squeeze(1).masked_fill(outside, 0.0)])
        comm.all_reduce(sums)
        sum_exp, target_logit = sums
        valid = target != ignore_index
        count = valid.sum()
        loss = ((sum_exp.log() - target_logit) * valid).sum() / count
        ctx.save_for_backward(exp.div_(sum_exp.unsqueeze(1)), local, outside, valid, count)
        return loss

    @staticmethod
    def backward(ctx, grad):
        softmax, local, outside, valid, count = ctx.saved_tensors
        g = softmax.clone()
        rows = torch.arange(g.shape[0], device=g.device)
        g[rows, local] -= (~outside).to(g.dtype)
        g *= (valid.to(g.dtype) * (grad / count)).unsqueeze(1)
        return g, None, None, None, None


def vocab_parallel_cross_entropy(logits, target, vocab_start, comm, ignore_index=-1):
    """Mean cross-entropy of vocab-sharded logits (..., V_local) against global target ids (...)."""
    return VocabParallelCrossEntropy.apply(logits.reshape(-1, logits.shape[-1]), target.reshape(-1), vocab_start,
                                           comm, ignore_index)


class ColumnParallelLinear(nn.Module):
    """y = x A^T + b with A split by rows (output features): this rank computes out_features[start:end].

    comm: Collectives over the TP group. prepare_input: enter the TP region here (copy, or all-gather the
    sequence with sequence_parallel); False when the caller did it once for several layers sharing an input
    (q/k/v). gather_output: all-gather the output features (else each rank returns its slice).
    The weight is (local out, in), the bias (local out,)."""

    def __init__(self, in_features, out_features, comm, bias=True, sequence_parallel=False, prepare_input=True,
                 gather_output=False, device=None, dtype=None):
        super().__init__()
        self.comm, self.sequence_parallel = comm, sequence_parallel
        self.prepare_input, self.gather_output = prepare_input, gather_output
        self.in_features, self.out_features = in_features, out_features
        self.sizes = [e - s for s, e in (chunk_bounds(out_features, comm.world_size, r)
                                         for r in range(comm.world_size))]
        self.start, self.end = chunk_bounds(out_features, comm.world_size, comm.rank)
        self.weight = nn.Parameter(torch.empty(self.end - self.start, in_features, device=device, dtype=dtype))
        self.bias = nn.Parameter(torch.empty(self.end - self.start, device=device, dtype=dtype)) if bias else None

    def forward(self, x):
        if self.prepare_input:
            x = enter_tp_region(x, self.comm, self.sequence_parallel)
        y = F.linear(x, self.weight, self.bias)
        return GatherFromTPRegion.apply(y, self.comm, self.sizes) if self.gather_output else y


class RowParallelLinear(nn.Module):
    """y = x A^T + b with A split by columns (input features): x is this rank's slice of the input features
    (the column-parallel layer's output), the partial products are all-reduced (reduce-scattered along the
    sequence with sequence_parallel), then the full bias is added once."""

    def __init__(self, in_features, out_features, comm, bias=True, sequence_parallel=False, device=None, dtype=None):
        super().__init__()
        if in_features % comm.world_size:
            raise ValueError(f"RowParallelLinear: in_features={in_features} not divisible by {comm.world_size}")
        self.comm, self.sequence_parallel = comm, sequence_parallel
        self.in_features, self.out_features = in_features, out_features
        self.weight = nn.Parameter(torch.empty(out_features, in_features // comm.world_size, device=device,
                                               dtype=dtype))
        self.bias = nn.Parameter(torch.empty(out_features, device=device, dtype=dtype)) if bias else None

    def forward(self, x):
        y = F.linear(x, self.weight)
        if self.sequence_parallel:
            y = ReduceScatterToSequenceParallelRegion.apply(y, self.comm)
        else:
            y = ReduceFromTPRegion.apply(y, self.comm)
        return y + self.bias if self.bias is not None else y


class VocabParallelEmbedding(nn.Module):
    """nn.Embedding with rows [start, end) of the vocabulary on this rank: ids outside give zeros, the partial
    embeddings are all-reduced (each id has exactly one owner)."""

    def __init__(self, num_embeddings, embedding_dim, comm, device=None, dtype=None):
        super().__init__()
        self.comm = comm
        self.num_embeddings, self.embedding_dim = num_embeddings, embedding_dim
        self.start, self.end = chunk_bounds(num_embeddings, comm.world_size, comm.rank)
        self.weight = nn.Parameter(torch.empty(self.end - self.start, embedding_dim, device=device, dtype=dtype))

    def forward(self, idx):
        local = idx - self.start
        outside = (local < 0) | (local >= self.end - self.start)
        y = F.embedding(local.masked_fill(outside, 0), self.weight)
        return ReduceFromTPRegion.apply(y.masked_fill(outside.unsqueeze(-1), 0.0), self.comm)


def tp_placement(name):
    """The DTensor placement of this TP rank's piece of parameter `name` on the "tp" mesh: Shard(d) along the dim TP
    splits it on (torch.chunk's split, DTensor's), Replicate if TP replicates it."""
    dim = shard_dim(name)
    return Shard(dim) if dim is not None else Replicate()


def tp_local_slice(comm):
    """local_slice(name, full) for parallel.slice_init: this TP rank's chunk of a full parameter (all of it if TP
    replicates it)."""
    def local_slice(name, full):
        dim = shard_dim(name)
        if dim is None:
            return full
        s, e = chunk_bounds(full.shape[dim], comm.world_size, comm.rank)
        return full.narrow(dim, s, e - s)
    return local_slice


def apply_custom_tp(model, comm, sequence_parallel=False, loss_parallel=False):
    """Swap, in place, the linears and the token embedding of a GPT-like module on the meta device for the layers
    above over `comm` (the TP group): q/k/v/up/gate column-parallel, out/down row-parallel, wte vocab-parallel, the
    tied lm_head column-parallel over the vocabulary (gathering its output unless loss_parallel). `model` is a GPT or
    a pipeline stage (parallel/pp.py's StageModule): it has `config` and `transformer.h` (blocks), and wte / lm_head
    only if it holds them. Parameter names stay the GPT's. Hooks enter the TP region once per attention and MLP
    input, and with sequence_parallel the residual stream is split along the sequence before block 0.
    Returns the loss function of the module's logits: vocab-parallel cross-entropy with loss_parallel, else None."""
    c, sp, tr = model.config, sequence_parallel, model.transformer
    with torch.device("meta"):
        if "wte" in tr:
            tr.wte = VocabParallelEmbedding(c.vocab_size, c.n_embd, comm)
        if hasattr(model, "lm_head"):
            model.lm_head = ColumnParallelLinear(c.n_embd, c.vocab_size, comm, bias=False, sequence_parallel=sp,
                                                 gather_output=not loss_parallel)
        for block in tr.h.values():
            mlp = block.mlp.shared_expert if isinstance(block.mlp, MoE) else block.mlp  # None: an MoE without one
            for parent in (block.attn, mlp) if mlp is not None else (block.attn,):
                for name, child in list(parent.named_children()):
                    if not isinstance(child, nn.Linear):
                        continue
                    if f"{type(parent).__name__}.{name}" in ("CausalSelfAttention.out_proj", "MLP.down_proj",
                                                             "SwiGLU.down_proj"):
                        layer = RowParallelLinear(child.in_features, child.out_features, comm,
                                                  bias=child.bias is not None, sequence_parallel=sp)
                    else:
                        layer = ColumnParallelLinear(child.in_features, child.out_features, comm,
                                                     bias=child.bias is not None, sequence_parallel=sp,
                                                     prepare_input=False)
                    setattr(parent, name, layer)
                parent.register_forward_pre_hook(lambda m, args: (enter_tp_region(args[0], comm, sp),))
    moe_token_group(model, comm, sp)
    if sp and "0" in tr.h:  # the residual stream is sequence-sharded from the first block to the head
        tr.h["0"].register_forward_pre_hook(lambda m, args: (ScatterToSequenceParallelRegion.apply(args[0], comm),))
    if "wte" in tr and hasattr(model, "lm_head"):  # the two new layers share the embedding's weight again
        model.lm_head.weight = tr.wte.weight
    if loss_parallel and hasattr(model, "lm_head"):
        head = model.lm_head
        return lambda logits, targets: vocab_parallel_cross_entropy(logits, targets, head.start, comm)
    return None


def is_sequence_parallel_param(name):
    """With SP: whether parameter `name` is replicated but fed only this rank's positions (norms, row-parallel
    biases), so its gradient must be summed over TP; the position embedding is used before the split: excluded."""
    return shard_dim(name) is None and not name.startswith("transformer.wpe")


def all_reduce_flat(tensors, comm):
    """Sum `tensors` (in place) over comm's group, as one flat buffer: one collective for many small tensors."""
    if not tensors:
        return
    flat = torch.cat([t.reshape(-1) for t in tensors])
    comm.all_reduce(flat)
    offset = 0
    for t in tensors:
        t.copy_(flat[offset:offset + t.numel()].view_as(t))
        offset += t.numel()


@register("tp", "custom", "triton", "nccl", "cuda")
class CustomTP(TensorParallel):
    """Megatron-style TP written out: the GPT's linears and embedding swapped for the layers above (apply_custom_tp;
    same names, so state_dict keys are the single model's), hooks that enter the TP region once per attention and
    MLP. With SP, the gradients of the norms and row-parallel biases are summed over TP once per step."""

    def build_model(self, model_config, weights=None):
        model = super().build_model(model_config)
        self.comm = self.collectives(self.grid.group("tp"))
        loss = apply_custom_tp(model, self.comm, self.sequence_parallel, self.loss_parallel)
        if loss is not None:
            model.loss = loss
        self.apply_ac(model)
        materialize(model, self.device, slice_init(model_config, tp_local_slice(self.comm), weights))
        self.full_shapes = full_shapes(model_config)
        self.sp_params = [p for n, p in model.named_parameters()
                          if self.sequence_parallel and is_sequence_parallel_param(n)]
        return model

    def sync_gradients(self):
        all_reduce_flat([p.grad for p in self.sp_params if p.grad is not None], self.comm)

    def global_tensor(self, name, t):
        return as_dtensor(t, self.grid.mesh["tp"], [tp_placement(name)], self.full_shapes[name])
