"""
Expert parallelism (EP): the experts of every MoE layer (model.MoE) sharded over the ranks of an EP group, each token
sent to the ranks that hold its experts and its results sent back, by all-to-all (GShard, Lepikhin et al. 2021,
section 3.2; Switch Transformer, Fedus et al. 2022, section 2.2; DeepSpeed-MoE, Rajbhandari et al. 2022; Megatron-core's
MoEAlltoAllTokenDispatcher; torchtitan's ExpertParallel).

    torchrun --standalone --nproc_per_node=4 train.py config/train_shakespeare_char_moe_cpu.py

Layout. EP borrows data-parallel ranks, as torchtitan and Megatron-core do: every rank of the EP group reads its own
micro-batches and holds the whole dense model (attention, norms, router, shared expert, embeddings), while each MoE
layer's E experts are cut into ep contiguous shards of L = E/ep experts (expert e on EP rank e // L): the stacked
expert weights (E, out, in) keep rows [r·L, (r+1)·L) on EP rank r, the slice of the full init (parallel.slice_init).
The 1-D strategy here is an EP group of every rank; parallel/3d.py carves EP groups out of dp x cp
(parallel/grid.py: experts sharded over ep, replicated over the edp = dp·cp/ep groups).

One MoE layer, per micro-batch, on each rank of an EP group of P ranks (N tokens here, k experts per token):
1. route: the router (replicated) picks each token's top-k experts; model.MoE sorts the N·k (token, slot) rows by
   expert, so the rows for EP rank j are one contiguous block;
2. counts first: an all-to-all of the per-expert counts (E int64, L to each rank), so each rank learns how many rows
   every rank will send each of its experts (the sizes of the next exchange);
3. dispatch: an all-to-all of the rows with uneven splits (block j to rank j), received in (source rank, local
   expert) order;
4. each local expert runs on its rows: reordered to (local expert, source rank) order for model.GroupedExperts, and
   back;
5. combine: the reverse all-to-all returns every row to the rank that routed it, where model.MoE weights the k rows of
   each token and adds them up (so the router's gradient is local).
Backward mirrors it (`AllToAll`, an autograd Function): the gradient of the combine goes out along the dispatch's
splits and that of the dispatch back along the combine's, through the same reorders. Dropless: no capacity, no token
dropped, so every token computes what it does on one device and EP trains exactly the single model (tests/test_ep.py).

Bytes per MoE layer and micro-batch on one rank (CommStats' all_to_all payload, what it hands the all-to-all;
`all_to_all_bytes`), h = n_embd, e the element size of the rows, R the rows it receives (the tokens of the group
routed to its experts): counts 8·E (forward only), dispatch N·k·h·e, combine R·h·e, and in backward R·h·e + N·k·h·e:
2·(N·k + R)·h·e + 8·E. The bus bytes leave out the rows a rank routes to its own experts. Over the group, Σ R = Σ N·k,
so with balanced routing a rank moves about 4·N·k·h·e per layer and micro-batch, (P-1)/P of it to other ranks.

Gradients. Dense parameters are data-parallel over dp x cp (every rank of the 1-D strategy): DDP, or FSDP in 3d, with
the expert weights left out of the wrapper (ignored_params). An expert's gradient is the sum over the tokens its EP
group sent it of their rank's loss gradient, each rank's loss being its own micro-batch mean; so the expert gradients
are summed over edp (the ranks holding the same experts: an all-reduce, none when ep = dp·cp) and divided by dp·cp,
which makes them the gradient of the mean loss over the global batch (`reduce_expert_grads`). Clipping counts each
expert element on edp coordinate 0 (parallel.is_first_replica of its global form).

Checkpoints: each expert weight in its global form is a DTensor Shard(0) over the expert mesh's "ep" dimension and
Replicate over "edp" (the full (E, out, in) shape), so DCP writes every expert once and loads it into any EP size or
strategy (`expert_global_tensor`).

Two variants, top to bottom:
- `pytorch`: the all-to-alls are torch's differentiable functional all_to_all_single and all_to_all_single (for the
  counts) over the EP group; the dense part under DistributedDataParallel with the experts ignored. torch 2.13 has no
  public ExpertParallel (torchtitan's is torchtitan's own); the public torch.distributed.nn.functional.all_to_all_single
  is deprecated in 2.13 for torch.distributed._functional_collectives.all_to_all_single_autograd, which torchtitan's
  MoE calls: the one private import here, in `TorchExchange`. DDP's ignore list is set through its static
  _set_params_and_buffers_to_ignore_for_model (no public argument), in `apply_ddp_except`. Not counted in stats.
- `custom`: the all-to-alls through Collectives.all_to_all (`CollectivesExchange`; triton, nccl and cuda run it over
  their backends), our DataParallel for the dense part, and the expert gradients reduced by hand.
"""

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.distributed.tensor import Replicate, Shard

from model import GPT, ExpertLinear, MoE
from parallel import Strategy, as_dtensor, full_shapes, materialize, register, slice_init
from parallel.ddp import DataParallel, apply_ddp
from parallel.tp import all_reduce_flat


def check_ep_config(model_config, ep):
    """Raise ValueError (one line, naming the numbers) if the model's experts cannot be sharded over ep ranks."""
    if ep < 1:
        raise ValueError(f"expert parallel: ep_size={ep} must be >= 1")
    if ep == 1:
        return
    if not model_config.n_expert:
        raise ValueError(f"expert parallel: ep_size={ep} needs an MoE model (n_expert > 0), this one is dense")
    if model_config.n_expert % ep:
        raise ValueError(f"expert parallel: n_expert={model_config.n_expert} is not divisible by ep_size={ep}")


def is_expert_param(name):
    """Whether GPT parameter `name` is a stacked expert weight (sharded by EP), e.g.
    transformer.h.0.mlp.experts.up_proj.weight."""
    return ".mlp.experts." in name


def ep_local_slice(ep_rank, ep, local_slice=None):
    """local_slice(name, full) for parallel.slice_init: an expert weight's rows of EP rank ep_rank of ep (dim 0, the
    expert dim), after `local_slice` (tensor parallelism's, which leaves experts whole) if given."""
    def slice_(name, full):
        if local_slice is not None:
            full = local_slice(name, full)
        if is_expert_param(name):
            n = full.shape[0] // ep
            full = full.narrow(0, ep_rank * n, n)
        return full
    return slice_


def expert_global_tensor(t, expert_mesh, shape):
    """An expert weight's local shard `t` (E/ep, ...) as a DTensor of the full `shape` on the expert mesh's
    ("edp", "ep") sub-mesh: Replicate over edp, Shard(0) over ep (no communication)."""
    return as_dtensor(t, expert_mesh["edp", "ep"], [Replicate(), Shard(0)], shape)


# ----------------------------------------------------------------------------------------------------------
# the exchange: an all-to-all of the per-expert counts, then of the rows (differentiable), per variant


class TorchExchange:
    """The pytorch variant's all-to-alls over a process group: torch.distributed.all_to_all_single for the counts,
    the differentiable functional all_to_all_single for the rows (see the module docstring)."""

    def __init__(self, group):
        self.group = group

    def counts(self, send):
        """send (E,) int64, L consecutive counts for each rank -> (E,): the L counts every rank sends this one."""
        recv = torch.empty_like(send)
        dist.all_to_all_single(recv, send.contiguous(), group=self.group)
        return recv

    def rows(self, x, output_splits, input_splits):
        """x (Σ input_splits, C): block j to rank j -> (Σ output_splits, C), the blocks every rank sent, in rank
        order."""
        from torch.distributed._functional_collectives import all_to_all_single_autograd
        return all_to_all_single_autograd(x.contiguous(), output_splits, input_splits, self.group)


def all_to_all(comm, x, output_splits=None, input_splits=None):
    """x (Σ input_splits, ...) exchanged over comm (Collectives.all_to_all): -> (Σ output_splits, ...); without
    splits, equal chunks each way (the output is x's shape)."""
    x = x.contiguous()
    out = x.new_empty((sum(output_splits) if output_splits is not None else x.shape[0], *x.shape[1:]))
    comm.all_to_all(out, x, output_splits, input_splits)
    return out


class AllToAll(torch.autograd.Function):
    """The rows of x (n, C) exchanged over comm with uneven splits (block j of input_splits[j] rows to rank j; the
    output is the blocks received, output_splits[j] rows from rank j, in rank order). Backward: the reverse exchange
    of the gradient, the splits swapped (the gradient of a row goes back to the rank it came from)."""

    @staticmethod
    def forward(ctx, x, comm, output_splits, input_splits):
        ctx.comm, ctx.splits = comm, (output_splits, input_splits)
        return all_to_all(comm, x, output_splits, input_splits)

    @staticmethod
    def backward(ctx, grad):
        output_splits, input_splits = ctx.splits
        return all_to_all(ctx.comm, grad, input_splits, output_splits), None, None, None


class CollectivesExchange:
    """The custom variant's all-to-alls, written over Collectives.all_to_all (kernels/comm.py; triton, nccl)."""

    def __init__(self, comm):
        self.comm = comm

    def counts(self, send):
        return all_to_all(self.comm, send)

    def rows(self, x, output_splits, input_splits):
        return AllToAll.apply(x, self.comm, output_splits, input_splits)


# ----------------------------------------------------------------------------------------------------------
# the dispatcher, one algorithm for both variants


def expert_major(counts):
    """counts (P, L): rows laid out source-major (counts[s, l] rows from source s for local expert l, in (s, l)
    order). Returns the int64 permutation that lists them expert-major (expert 0's rows from every source in source
    order, then expert 1's...): rows[expert_major(counts)] groups them by expert."""
    P, L = counts.shape
    sizes = counts.flatten().tolist()
    starts = [sum(sizes[:i]) for i in range(len(sizes))]
    return torch.cat([torch.arange(starts[s * L + l], starts[s * L + l] + sizes[s * L + l], device=counts.device)
                      for l in range(L) for s in range(P)])


class AllToAllDispatcher(nn.Module):
    """model.MoE's dispatcher under expert parallelism (module docstring, steps 2 to 5): forward(x (N·k, C) rows sorted
    by expert, counts (E,) int64 rows per expert, experts: this rank's model.GroupedExperts of L = E/ep experts) ->
    (N·k, C), each row's expert output, in x's order. ep: the EP group's size; exchange: TorchExchange or
    CollectivesExchange over it. No parameters."""

    def __init__(self, ep, exchange):
        super().__init__()
        self.ep, self.exchange = ep, exchange

    def forward(self, x, counts, experts):
        P = self.ep
        recv = self.exchange.counts(counts).view(P, -1)  # recv[s, l]: rows rank s sends this rank's expert l
        send_rows, recv_rows = counts.view(P, -1).sum(1).tolist(), recv.sum(1).tolist()
        x = self.exchange.rows(x, recv_rows, send_rows)  # dispatch: received in (source, local expert) order
        order = expert_major(recv)
        y = experts(x[order], recv.sum(0).tolist())
        y = y[torch.argsort(order)]  # back to (source, local expert) order
        return self.exchange.rows(y, send_rows, recv_rows)  # combine: each row home


def apply_ep(module, ep, exchange):
    """Expert parallelism on a GPT or a pipeline stage on the meta device: every MoE layer keeps E/ep experts (its
    ExpertLinear weights become meta tensors (E/ep, out, in); parallel.materialize then gives them their slice,
    ep_local_slice) and dispatches through an AllToAllDispatcher(ep, exchange). Parameter names are unchanged.
    Returns the module."""
    for m in module.modules():
        if isinstance(m, ExpertLinear):
            E, out_features, in_features = m.weight.shape
            m.weight = nn.Parameter(torch.empty(E // ep, out_features, in_features, device="meta"))
        if isinstance(m, MoE):
            m.dispatcher = AllToAllDispatcher(ep, exchange)
    return module


def all_reduce_flat_torch(tensors, group):
    """Sum `tensors` (in place) over the process group `group` as one flat buffer: parallel.tp.all_reduce_flat with
    torch.distributed.all_reduce (the pytorch variant)."""
    if not tensors:
        return
    flat = torch.cat([t.reshape(-1) for t in tensors])
    dist.all_reduce(flat, group=group)
    offset = 0
    for t in tensors:
        t.copy_(flat[offset:offset + t.numel()].view_as(t))
        offset += t.numel()


def materialize_experts(module, device, init):
    """Allocate the expert weights of a meta-device `module` on `device` and fill each with init(GPT name, tensor)
    (parallel.slice_init's: this rank's experts), before a wrapper that leaves them alone takes the rest (our FSDP
    materialises its own units). Returns the new parameters."""
    out = []
    for name, p in list(module.named_parameters()):
        if is_expert_param(name):
            owner, attr = name.rsplit(".", 1)
            t = torch.empty(p.shape, device=device)
            with torch.no_grad():
                init(name, t)
            param = nn.Parameter(t)
            setattr(module.get_submodule(owner), attr, param)
            out.append(param)
    return out


def reduce_expert_grads(params, replicas, comm=None, group=None):
    """The expert gradients of `params` (module docstring, Gradients): summed over the ranks holding the same experts
    (custom: `comm`, a Collectives; pytorch: `group`; None or size 1: nothing to sum), then divided by `replicas`, the
    ranks whose losses are averaged (dp·cp)."""
    grads = [p.grad for p in params if p.grad is not None]
    if comm is not None and comm.world_size > 1:
        all_reduce_flat(grads, comm)
    elif group is not None and dist.get_world_size(group) > 1:
        all_reduce_flat_torch(grads, group)
    for g in grads:
        g.div_(replicas)


def all_to_all_bytes(tokens, top_k, received, n_embd, n_expert, element_size=4):
    """The payload bytes one rank hands all_to_all for one MoE layer's forward and backward on one micro-batch (module
    docstring): `tokens` routed here, `received` rows it received for its experts: 2·(tokens·k + received)·h·e + 8·E."""
    return 2 * (tokens * top_k + received) * n_embd * element_size + 8 * n_expert


def apply_ddp_except(module, ignored_names, group, stats, bucket_cap_mb, device):
    """parallel.ddp.apply_ddp (DistributedDataParallel) on `module`, leaving the parameters `ignored_names` alone
    (neither broadcast nor reduced): DDP takes its ignore list through the static
    _set_params_and_buffers_to_ignore_for_model, its only way (torch 2.13)."""
    from torch.nn.parallel import DistributedDataParallel
    DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(module, list(ignored_names))
    return apply_ddp(module, group, stats, bucket_cap_mb, device)


# ----------------------------------------------------------------------------------------------------------
# the 1-D strategy: one EP group of every rank


@register("ep", "pytorch", "custom", "triton", "nccl", "cuda")
class ExpertParallel(Strategy):
    """Expert parallelism over every process: data parallel for the dense part (each rank its own micro-batches),
    each MoE layer's experts sharded over all ranks (ep = world, so there is no expert replica to reduce with), tokens
    dispatched by all-to-all (module docstring). pytorch: TorchExchange and DistributedDataParallel; custom (triton,
    nccl, cuda): CollectivesExchange over this variant's Collectives and our DataParallel."""

    sharded = True

    def __init__(self, cfg, device):
        super().__init__(cfg, device)
        if cfg.ep_size not in (0, self.world_size):
            raise ValueError(f"parallel='ep' shards the experts over every process: ep_size={cfg.ep_size} must be 0 or "
                             f"the world size {self.world_size} (use parallel='3d' to combine)")
        self.use_grid({"dp": self.world_size, "pp": 1, "cp": 1, "tp": 1, "ep": self.world_size})

    def build_model(self, model_config, weights=None):
        ep, ep_rank = self.world_size, self.grid.coord["ep"]
        check_ep_config(model_config, ep)
        with torch.device("meta"):
            model = GPT(model_config)
        if ep > 1:
            group = self.grid.expert_mesh.get_group("ep")
            exchange = (TorchExchange(group) if self.variant == "pytorch" else
                        CollectivesExchange(self.collectives(group)))
            apply_ep(model, ep, exchange)
        self.apply_ac(model)
        materialize(model, self.device, slice_init(model_config, ep_local_slice(ep_rank, ep), weights))
        self.expert_params = [p for n, p in model.named_parameters() if is_expert_param(n)]
        self.full_shapes = full_shapes(model_config)
        if self.variant == "pytorch":
            names = [n for n, _ in model.named_parameters() if is_expert_param(n)] if ep > 1 else []
            self.module = apply_ddp_except(model, names, None, self.stats, self.cfg.bucket_cap_mb, self.device)
        else:
            self.module = DataParallel(model, self.collectives(), self.cfg.bucket_cap_mb,
                                       ignored_params=self.expert_params if ep > 1 else ())
        self.model = model
        if self.cfg.compile:
            model.compile(backend=self.cfg.compile_backend)
        return model

    def sync_gradients(self):
        """After the dense part's all-reduce: the expert gradients divided by the world (each expert is on one rank)."""
        super().sync_gradients()
        if self.world_size > 1:
            reduce_expert_grads(self.expert_params, self.world_size)

    def global_tensor(self, name, t):
        if self.world_size > 1 and is_expert_param(name):
            return expert_global_tensor(t, self.grid.expert_mesh, self.full_shapes[name])
        return t
