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

Two variants, top to bottom:
- `pytorch`: `parallelize_module` with a declarative plan on a 1-D "tp" DeviceMesh (DTensor), and `loss_parallel()`.
  Its collectives happen inside DTensor and are not counted in strategy.stats.
- `custom`: the same algorithm written out, Megatron-style, with autograd Functions over the Collectives of
  parallel/comm.py (so the triton and nccl variants can swap the backend): copy-to / reduce-from the TP region,
  gather / scatter along the last dimension, their sequence-parallel twins, ColumnParallelLinear,
  RowParallelLinear, VocabParallelEmbedding, and vocab-parallel cross-entropy.

Both variants: every shard is the slice of the full model's init (model.init_parameter_ on the full tensor), so
TP=1 and TP=t start from identical weights; the embedding and the head stay tied; clipping measures each
parameter once (sharded ones' squares summed over TP, replicated ones counted once). The vocabulary may be split
unevenly, by torch.chunk's rule (DTensor's): ceil(V/t) rows per rank, fewer on the last (Megatron pads instead),
so the 65-character Shakespeare vocabulary splits over 2 ranks. n_head, ffn_hidden and (with SP) block_size must
be divisible by t; a config that is not is rejected before any collective, naming the numbers.

Dropout: every TP rank of a group seeds its RNG alike, so the masks of replicated activations agree across TP
ranks (Megatron keeps a separate model-parallel RNG for the attention dropout of local heads; here those masks
are the same pattern on every rank's heads).

The TP group: the strategy builds it in one place (`_build_mesh`); the custom layers take a Collectives over it,
the pytorch plan takes the mesh. The 3-D strategy can hand in a sub-mesh instead of the world.
"""


import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import DTensor, Replicate, Shard

from model import GPT, init_parameter_
from parallel import Strategy, register
from comm import TorchCollectives

COLUMN = ("attn.q_proj", "attn.k_proj", "attn.v_proj", "mlp.up_proj", "mlp.gate_proj")
ROW = ("attn.out_proj", "mlp.down_proj")
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
    if c.ffn_hidden % tp:
        raise ValueError(f"tensor parallel: the MLP hidden size ffn_hidden={c.ffn_hidden} is not divisible by the "
                         f"TP size {tp}")
    if chunk_bounds(c.vocab_size, tp, tp - 1)[0] >= c.vocab_size:
        raise ValueError(f"tensor parallel: vocab_size={c.vocab_size} cannot be split in {tp} non-empty shards "
                         f"(ceil(vocab/{tp}) rows per rank)")
    if sequence_parallel and c.block_size % tp:
        raise ValueError(f"sequence parallel: block_size={c.block_size} is not divisible by the TP size {tp}")


def clip_grad_norm(named_params, is_sharded, max_norm, all_reduce):
    """Clip gradients to global L2 norm max_norm, as torch.nn.utils.clip_grad_norm_ on the unsharded model.

    named_params: (name, parameter) pairs of this rank, each parameter once; is_sharded(name, param): whether
    this rank holds only a slice (its squares are summed over TP by all_reduce, a function summing a 0-dim fp32
    tensor in place over the TP group); replicated ones are counted once. Returns the norm before clipping."""
    sharded = torch.zeros((), dtype=torch.float32)
    replicated = torch.zeros((), dtype=torch.float32)
    grads = []
    for name, p in named_params:
        if p.grad is None:
            continue
        g = p.grad.to_local() if isinstance(p.grad, DTensor) else p.grad
        grads.append(g)
        sq = g.detach().float().pow(2).sum().cpu()
        if is_sharded(name, p):
            sharded += sq
        else:
            replicated += sq
    if grads:
        sharded = sharded.to(grads[0].device)
    all_reduce(sharded)
    total = (sharded.cpu() + replicated).sqrt()
    coef = torch.clamp(max_norm / (total + 1e-6), max=1.0)
    for g in grads:
        g.detach().mul_(coef.to(g.device, g.dtype))
    return total


class TensorParallel(Strategy):
    """What both variants share: the 1-D TP layout (every rank reads the same batch), config checks, clipping."""

    checkpoint_name = "ckpt"

    def __init__(self, cfg, device):
        super().__init__(cfg, device)
        if cfg.tp_size not in (0, self.world_size):
            raise ValueError(f"parallel='tp' uses every process for tensor parallelism: tp_size={cfg.tp_size} must "
                             f"be 0 or the world size {self.world_size} (use parallel='3d' to combine)")
        self.tp_size = self.world_size
        self.dp_rank, self.dp_size = 0, 1  # every rank reads the same (whole) batch
        self.sequence_parallel, self.loss_parallel = cfg.sequence_parallel, cfg.loss_parallel
        self.mesh = None

    def _build_mesh(self):
        """The 1-D "tp" DeviceMesh over the world, and the Collectives over its group (the one place the TP group
        is chosen). Called after the config checks, so a bad config fails before any collective."""
        self.mesh = init_device_mesh(self.device.type, (self.tp_size,), mesh_dim_names=("tp",))
        self.tp_group = self.mesh.get_group()
        self.comm = self.collectives(self.tp_group)

    def _check(self, model_config):
        check_tp_config(model_config, self.tp_size, self.sequence_parallel)
        # the same RNG on every TP rank: dropout masks of replicated activations must agree (module docstring)
        torch.manual_seed(self.cfg.seed + self.dp_rank)

    def _sequence_check(self, x):
        if self.sequence_parallel and x.shape[1] % self.tp_size:
            raise ValueError(f"sequence parallel: sequence length {x.shape[1]} is not divisible by the TP size "
                             f"{self.tp_size}")

    def clip_grad_norm_(self, max_norm):
        def all_reduce(t):
            self.comm.all_reduce(t)
        return clip_grad_norm(self.model.named_parameters(), self._is_sharded, max_norm, all_reduce)


# ----------------------------------------------------------------------------------------------------------
# pytorch variant


def pytorch_tp_plan(module, sequence_parallel, loss_parallel):
    """The parallelize_module plan (torchtitan's, as a dict {submodule name: ParallelStyle}) of the module
    docstring for `module`: the GPT, or a pipeline stage of it (parallel/pp.py's StageModule) that holds only some
    of transformer.wte, the blocks transformer.h.<i>, transformer.ln_f and lm_head, under the GPT's names.

    The residual stream between blocks is replicated, or with sequence_parallel sharded along the sequence
    (Shard(1)): a stage then takes and returns its local (B, T/t, n_embd) piece. With loss_parallel the head's
    logits stay a DTensor sharded over the vocabulary (Shard(-1)) for loss_parallel()'s cross-entropy."""
    from torch.distributed.tensor.parallel import (ColwiseParallel, PrepareModuleInput, RowwiseParallel,
                                                   SequenceParallel)
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
        for name in COLUMN:
            if f"{p}.{name}" in modules:  # mlp.gate_proj only in the Llama block
                plan[f"{p}.{name}"] = ColwiseParallel()
        for name in ROW:
            plan[f"{p}.{name}"] = RowwiseParallel(output_layouts=residual)
        if sp:
            plan[f"{p}.ln_1"] = SequenceParallel()
            plan[f"{p}.ln_2"] = SequenceParallel()
            for name in ("attn", "mlp"):
                plan[f"{p}.{name}"] = PrepareModuleInput(input_layouts=(Shard(1),), desired_input_layouts=(Replicate(),))
    return plan


@register("tp", "pytorch")
class PytorchTP(TensorParallel):
    """parallelize_module with the plan of the module docstring (pytorch_tp_plan) on a 1-D "tp" DeviceMesh;
    loss_parallel()."""

    def build_model(self, model_config):
        from torch.distributed.tensor.parallel import parallelize_module
        self._check(model_config)
        self._build_mesh()
        model = GPT(model_config).to(self.device)  # the full init on every rank; the plan keeps each rank's slice
        parallelize_module(model, self.mesh, pytorch_tp_plan(model, self.sequence_parallel, self.loss_parallel))
        model.tie_weights()  # the plan distributed wte and lm_head separately: share wte's DTensor again
        self.model = model
        return model

    def configure_optimizer(self):
        # plain and DTensor parameters mixed: the per-parameter AdamW loop (foreach would mix the two types)
        opt = super().configure_optimizer()
        for group in opt.param_groups:
            group["foreach"] = False
        return opt

    def _is_sharded(self, name, p):
        return isinstance(p, DTensor) and any(pl.is_shard() for pl in p.placements)

    def sync_gradients(self):
        """With SP, DTensor leaves the gradients of the norms (fed only this rank's positions) Partial(sum): bring
        every gradient to its parameter's placements, which all-reduces those over TP once per step (Megatron's SP
        gradient all-reduce), so that clipping measures final gradients."""
        for p in self.model.parameters():
            if isinstance(p.grad, DTensor) and p.grad.placements != p.placements:
                p.grad = p.grad.redistribute(p.device_mesh, p.placements)

    def _loss_context(self):
        import contextlib
        from torch.distributed.tensor.parallel import loss_parallel
        return loss_parallel() if self.loss_parallel else contextlib.nullcontext()

    def forward(self, x, y):
        self._sequence_check(x)
        logits, loss = self.model(x, y)
        if isinstance(loss, DTensor):
            loss = loss.full_tensor()
        return logits, loss

    def forward_backward(self, batches, scaler):
        with self._loss_context():
            return super().forward_backward(batches, scaler)

    def eval_loss(self, x, y):
        with self._loss_context():
            return super().eval_loss(x, y)


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
        sums = torch.stack([exp.sum(dim=-1), shifted.gather(1, local.unsqueeze(1)).squeeze(1).masked_fill(outside, 0.0)])
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
        self.sizes = [e - s for s, e in (chunk_bounds(out_features, comm.world_size, r) for r in range(comm.world_size))]
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
        self.weight = nn.Parameter(torch.empty(out_features, in_features // comm.world_size, device=device, dtype=dtype))
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


def _load_slice(module_param, full, dim, comm):
    """Copy this rank's chunk of `full` along `dim` (None: all of it) into module_param."""
    if dim is not None:
        s, e = chunk_bounds(full.shape[dim], comm.world_size, comm.rank)
        full = full.narrow(dim, s, e - s)
    with torch.no_grad():
        module_param.copy_(full)


def full_shapes(model_config):
    """{name: shape} of every parameter of the unsharded GPT (lm_head.weight: the tied embedding's)."""
    with torch.device("meta"):
        shapes = {n: p.shape for n, p in GPT(model_config).named_parameters()}
    shapes["lm_head.weight"] = shapes["transformer.wte.weight"]
    return shapes


def tensor_parallelize(model, comm, sequence_parallel=False, loss_parallel=False):
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
            for parent in (block.attn, block.mlp):
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
    if sp and "0" in tr.h:  # the residual stream is sequence-sharded from the first block to the head
        tr.h["0"].register_forward_pre_hook(lambda m, args: (ScatterToSequenceParallelRegion.apply(args[0], comm),))
    if loss_parallel and hasattr(model, "lm_head"):
        head = model.lm_head
        return lambda logits, targets: vocab_parallel_cross_entropy(logits, targets, head.start, comm)
    return None


def tp_slice_init(model_config, comm):
    """init(name, tensor): fill a TP-sharded (or replicated) parameter with its slice of the full GPT's init, so TP=1
    and TP=t start from identical weights (model.init_parameter_ on the full tensor, then this rank's chunk)."""
    shapes = full_shapes(model_config)

    def init(name, tensor):
        full = torch.empty(shapes[name])
        init_parameter_(name, full, model_config)
        _load_slice(tensor, full, shard_dim(name), comm)
    return init


def is_sequence_parallel_param(name):
    """With SP: whether parameter `name` is replicated but fed only this rank's positions (norms, row-parallel
    biases), so its gradient must be summed over TP; the position embedding is used before the split: excluded."""
    return shard_dim(name) is None and not name.startswith("transformer.wpe")


@register("tp", "custom")
class CustomTP(TensorParallel):
    """Megatron-style TP written out: the GPT's linears and embedding swapped for the layers above (same names,
    so state_dict keys are the single model's), hooks that enter the TP region once per attention and MLP."""

    def build_model(self, model_config):
        self._check(model_config)
        self._build_mesh()
        with torch.device("meta"):
            model = GPT(model_config)
        self.full_shapes = full_shapes(model_config)
        loss = tensor_parallelize(model, self.comm, self.sequence_parallel, self.loss_parallel)
        if loss is not None:
            model.loss = loss
        model.to_empty(device=self.device)
        model.tie_weights()
        init = tp_slice_init(model_config, self.comm)
        for name, p in model.named_parameters():
            init(name, p)
        self.sp_params = [p for n, p in model.named_parameters() if self.sequence_parallel and is_sequence_parallel_param(n)]
        self.model = model
        return model

    def _is_sharded(self, name, p):
        return shard_dim(name) is not None

    def forward(self, x, y):
        self._sequence_check(x)
        return self.model(x, y)

    def sync_gradients(self):
        """With SP: all-reduce (sum) the gradients of the norms and row-parallel biases, one flat buffer."""
        grads = [p.grad for p in self.sp_params if p.grad is not None]
        if not grads:
            return
        flat = torch.cat([g.reshape(-1) for g in grads])
        self.comm.all_reduce(flat)
        offset = 0
        for g in grads:
            g.copy_(flat[offset:offset + g.numel()].view_as(g))
            offset += g.numel()

    # --- state -------------------------------------------------------------------------------------------

    def _gather_full(self, name, t, comm):
        dim = shard_dim(name)
        if dim is None:
            return t.detach().clone()
        n = self.full_shapes[name][dim]
        sizes = [e - s for s, e in (chunk_bounds(n, comm.world_size, r) for r in range(comm.world_size))]
        return _gather(comm, t.detach(), dim, sizes)

    def full_state_dict(self):
        comm = TorchCollectives(self.tp_group)  # not counted: not part of training
        out = {}
        for name, t in self.model.state_dict().items():
            out[name] = out["transformer.wte.weight"] if name == "lm_head.weight" else self._gather_full(name, t, comm)
        return out

    def _as_dtensor(self, name, t):
        dim = shard_dim(name)
        if dim is None:
            return t
        shape = self.full_shapes[name]
        return DTensor.from_local(t, self.mesh, [Shard(dim)], run_check=False, shape=shape,
                                  stride=torch.empty(shape, device="meta").stride())

    def sharded_state_dict(self, optimizer):
        params = dict(self.model.named_parameters())
        model_sd = {n: self._as_dtensor(n, p.detach()) for n, p in params.items()}
        model_sd["lm_head.weight"] = model_sd["transformer.wte.weight"]
        optim_sd = {}
        for n, p in params.items():
            state = optimizer.state[p]
            if not state:  # before the first step: create Adam's state so a load has somewhere to go
                state.update(step=torch.tensor(0.0), exp_avg=torch.zeros_like(p), exp_avg_sq=torch.zeros_like(p))
            optim_sd[n] = {k: self._as_dtensor(n, v) if k != "step" else v for k, v in state.items()}
        return {"model": model_sd, "optim": optim_sd}

    def load_sharded_state_dict(self, state, optimizer):
        params = dict(self.model.named_parameters())
        with torch.no_grad():
            for n, p in params.items():
                v = state["model"][n]
                p.copy_(v.to_local() if isinstance(v, DTensor) else v)
                for k, t in state["optim"][n].items():
                    dst = optimizer.state[p][k]
                    dst.copy_(t.to_local() if isinstance(t, DTensor) else t)
