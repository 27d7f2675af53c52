"""
Fully sharded data parallel (ZeRO stage 3): like DDP every rank reads its own slice of the global batch and takes
the step one device would take on all of it, but no rank holds the whole model. Parameters, gradients and
optimizer state are split into N shards, one per rank; a unit's (a transformer block's) full parameters exist
only while it computes.

Per optimizer step of one micro-batch, with the model split into units of Ψ parameters in total, fp32:
- forward: all-gather each unit's parameters before it runs, free them after it ran;
- backward: all-gather them again, compute the unit's gradients, reduce-scatter them (averaged over ranks) so that
  each rank receives the gradient of its own shard, free the full copy;
- optimizer: AdamW on the shard only (its state is sharded too).
Bus bytes per rank: all-gather 2·(N-1)/N·Ψ·4 + reduce-scatter (N-1)/N·Ψ·4 = 1.5x DDP's all-reduce 2·(N-1)/N·Ψ·4;
with reshard_after_forward="never" the backward all-gather is skipped: 1x DDP, for DDP-like memory (the default inside
a pipeline, as torchtitan's).
Memory per rank between steps: 16Ψ/N bytes (fp32 params 4, grads 4, Adam 8) instead of 16Ψ.
Sources: Rajbhandari et al. 2020, "ZeRO: Memory Optimizations Toward Training Trillion Parameter Models", section 5
(P_os+g+p); Zhao et al. 2023, "PyTorch FSDP: Experiences on Scaling Fully Sharded Data Parallel", section 3
(units, flat parameters, prefetching); the Ultra-Scale Playbook's ZeRO-3 chapter for the byte counts.

Two variants, top to bottom, each applicable to a GPT or a pipeline stage on a "dp" mesh or group (parallel/3d.py
composes them), then a thin 1-D strategy:
- `pytorch`: `apply_fsdp`, FSDP2's `fully_shard` on every block and then on the root, with MixedPrecisionPolicy for
             bf16/fp16; accumulation under `fsdp2_no_sync` (set_requires_gradient_sync and friends).
- `custom`:  `FullyShardedDataParallel`, ZeRO-3 written out with kernels/comm.py: each unit is one padded flat
             parameter, sharded at init from a meta-device build; forward/backward hooks all-gather, prefetch and free;
             the gradients of a unit are reduce-scattered from a hook as soon as they are all ready (overlapping the
             rest of backward).
Both write sharded (DCP) checkpoints that load on another world size (parallel/checkpoint.py).
"""

import contextlib
import math

import torch
import torch.nn as nn
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor, Shard, distribute_tensor

from kernels.comm import all_gather_single, reduce_scatter_single
from model import GPT
from parallel import Strategy, materialize, register, skipping_sync, slice_init
from parallel.checkpoint import HEAD, WTE

LOW_PRECISION = {"bfloat16": torch.bfloat16, "float16": torch.float16}


def mixed_precision(dtype):
    """FSDP2's MixedPrecisionPolicy for a config dtype: parameters gathered in bf16/fp16 (fp32 stays fp32),
    gradients reduced in fp32."""
    return MixedPrecisionPolicy(param_dtype=LOW_PRECISION.get(dtype), reduce_dtype=torch.float32)


def reshard_after_forward(setting, pipelined=False):
    """The cfg.reshard_after_forward policy (torchtitan's fsdp_reshard_after_forward) as a bool: "always" frees each
    unit's gathered parameters after its forward (gathered again for backward: ZeRO-3's 1.5x DDP traffic), "never"
    keeps them to backward (1x DDP traffic, more memory), "default" is always, but never inside a pipeline, whose m
    micro-batches would otherwise gather every unit m+1 times per step. Raises ValueError (one line) otherwise."""
    if setting not in ("default", "always", "never"):
        raise ValueError(f"reshard_after_forward must be 'default', 'always' or 'never', got {setting!r}")
    return setting == "always" or (setting == "default" and not pipelined)


# ----------------------------------------------------------------------------------------------------------
# pytorch variant

class CountingAllGather:
    """FSDP2's default all-gather (torch.distributed.all_gather_single), counting bytes into a CommStats. Installed
    with the public FSDPModule.set_custom_all_gather, which takes any object with FSDP2's AllGather interface
    (allocate, __call__); the result is identical to FSDP2's own."""

    def __init__(self, stats):
        self.stats = stats

    def allocate(self, size, *, dtype, device):
        return torch.empty(*size, dtype=dtype, device=device)

    def __call__(self, output_tensor, input_tensor, group, async_op=False):
        self.stats.record("all_gather", output_tensor.numel() * output_tensor.element_size(), group.size())
        return all_gather_single(output_tensor, input_tensor, group=group, async_op=async_op)


class CountingReduceScatter:
    """FSDP2's default reduce-scatter (torch.distributed.reduce_scatter_single), counting bytes into a CommStats
    (FSDPModule.set_custom_reduce_scatter, FSDP2's ReduceScatter interface)."""

    def __init__(self, stats):
        self.stats = stats

    def allocate(self, size, *, dtype, device):
        return torch.empty(*size, dtype=dtype, device=device)

    def __call__(self, output_tensor, input_tensor, group, op, async_op=False):
        self.stats.record("reduce_scatter", input_tensor.numel() * input_tensor.element_size(), group.size())
        return reduce_scatter_single(output_tensor, input_tensor, op, group=group, async_op=async_op)


def apply_fsdp(module, mesh, stats, dtype="float32", reshard_after_forward=True, ignored_params=None):
    """FSDP2 (torch.distributed.fsdp.fully_shard) on a GPT or a pipeline stage, torchtitan's way: every transformer
    block is a unit, then the module itself (embeddings, final norm, tied head). mesh: the 1-D "dp" DeviceMesh (or
    sub-mesh). Parameters become DTensors sharded along dim 0 (Shard(0)); the collectives count into `stats`.
    ignored_params: a set of parameters FSDP2 leaves alone (expert parallelism's, reduced by parallel/ep.py)."""
    for unit in [*module.transformer.h.values(), module]:
        fully_shard(unit, mesh=mesh, reshard_after_forward=reshard_after_forward, mp_policy=mixed_precision(dtype),
                    ignored_params=ignored_params)
        unit.set_custom_all_gather(CountingAllGather(stats))
        unit.set_custom_reduce_scatter(CountingReduceScatter(stats))


def reshard_fsdp2(module):
    """Free the parameters FSDP2 holds gathered in `module` and register its sharded ones again (FSDPModule.reshard
    on every unit): an eval forward with reshard_after_forward off leaves the units gathered, while the optimizer and
    the checkpoints address the sharded parameters."""
    for unit in module.modules():
        if isinstance(unit, FSDPModule):
            unit.reshard()


@contextlib.contextmanager
def fsdp2_no_sync(module):
    """Accumulate gradients without reduce-scatter in the backwards run inside, and keep the units unsharded after
    them so that the next micro-batch does not gather again: what torch.distributed.pipelining's PipelineStage does
    with FSDP2 stages (set_requires_gradient_sync, set_reshard_after_backward, set_is_last_backward)."""
    for setting in (module.set_requires_gradient_sync, module.set_reshard_after_backward, module.set_is_last_backward):
        setting(False)
    try:
        yield
    finally:
        for setting in (module.set_requires_gradient_sync, module.set_reshard_after_backward,
                        module.set_is_last_backward):
            setting(True)


class FullySharded(Strategy):
    """What both 1-D variants share: a grid with only a "dp" dimension, whose state is sharded."""

    sharded = True

    def __init__(self, cfg, device):
        super().__init__(cfg, device)
        self.reshard_after_forward = reshard_after_forward(cfg.reshard_after_forward)
        self.use_grid({"dp": self.world_size, "pp": 1, "cp": 1, "tp": 1})


@register("fsdp", "pytorch")
class PytorchFSDP(FullySharded):
    """FSDP2 on the GPT (apply_fsdp) on a 1-D "dp" mesh; built on the meta device, each shard then filled with its
    slice of the full init. With compile=True each block is compiled before sharding (torchtitan's order)."""

    def build_model(self, model_config, weights=None):
        cfg = self.cfg
        with torch.device("meta"):
            model = GPT(model_config)
        self.apply_ac(model)
        if cfg.compile:  # FSDP's hooks stay outside the compiled graphs
            for block in model.transformer.h.values():
                block.compile(backend=cfg.compile_backend)
        apply_fsdp(model, self.grid.mesh["dp"], self.stats, cfg.dtype, self.reshard_after_forward)
        materialize(model, self.device, slice_init(model_config, weights=weights))
        self.model = self.module = model
        return model

    def no_sync(self):
        return fsdp2_no_sync(self.model)

    def eval_loss(self, x, y):
        loss = super().eval_loss(x, y)
        reshard_fsdp2(self.model)
        return loss


# ----------------------------------------------------------------------------------------------------------
# flat buffers: ZeRO's partitioning, shared by FSDP's units here and ZeRO-1/2's buckets (parallel/ddp.py)

def flat_layout(named_params):
    """Where each parameter of a group lies in one flat buffer: [(GPT name, tensor)], a tied tensor listed under each
    of its names -> (infos, tensors, numel). Each distinct tensor once, those with weight decay (>= 2 dims) first, then
    the others, each kind in the given order; infos[i] = {"name": its first name, "fqns": all its names, "shape",
    "offset", "numel", "decay"} of tensors[i]; numel: the elements of all of them. Padded up to a multiple of N ranks,
    rank r owns the elements [r·S, (r+1)·S), S = ceil(numel / N) (Rajbhandari et al. 2020, section 5)."""
    distinct = {}
    for fqn, param in named_params:
        distinct.setdefault(id(param), (param, []))[1].append(fqn)
    entries = sorted(distinct.values(), key=lambda e: e[0].dim() < 2)  # stable: decay first, in order
    infos, offset = [], 0
    for param, fqns in entries:
        infos.append(dict(name=fqns[0], fqns=fqns, shape=param.shape, offset=offset, numel=param.numel(),
                          decay=param.dim() >= 2))
        offset += param.numel()
    return infos, [param for param, _ in entries], offset


def flat_view(flat, info):
    """The parameter of flat_layout's `info` as a view of the flat buffer `flat`, in its shape."""
    return flat[info["offset"]:info["offset"] + info["numel"]].view(info["shape"])


def shard_parameters(shard, infos, numel, rank):
    """The optimizer's view of rank `rank`'s shard (S elements of a flat buffer of flat_layout's `infos`): at most two
    nn.Parameters sharing the shard's memory, split at the decay/no-decay boundary, padding excluded, so AdamW's
    weight-decay groups are those of the single-device model. Each has .decay (its group) and .shard_range, its
    (lo, hi) within the shard. A shard of padding only has none."""
    S = shard.numel()
    n_decay = sum(i["numel"] for i in infos if i["decay"])
    start, end = rank * S, (rank + 1) * S
    out = []
    for lo, hi, decay in ((0, n_decay, True), (n_decay, numel, False)):
        lo, hi = max(lo, start), min(hi, end)
        if lo < hi:
            p = nn.Parameter(shard[lo - start:hi - start])  # shares the shard's memory
            p.decay, p.shard_range = decay, (lo - start, hi - start)
            out.append(p)
    return out


@torch.no_grad()
def gather_flat(unit, flat_shard, comm):
    """All-gather a shard-sized fp32 tensor of a flat unit or bucket (its parameters or an optimizer moment) over the
    data-parallel Collectives `comm` -> {name: full tensor}."""
    full = torch.empty(unit.shard_numel * comm.world_size, device=flat_shard.device)
    comm.all_gather(full, flat_shard.contiguous())
    return {i["name"]: flat_view(full, i).clone() for i in unit.infos}


def scatter_flat(unit, full_by_name, rank, world_size):
    """The inverse of gather_flat, without communication: rank's shard-sized slice of the unit's flat buffer built
    from full tensors by name."""
    full = torch.zeros(unit.shard_numel * world_size, device=unit.shard.device)
    for i in unit.infos:
        flat_view(full, i).copy_(full_by_name[i["name"]].reshape(i["shape"]))
    return full[rank * unit.shard_numel:(rank + 1) * unit.shard_numel]


def flat_gradient_pieces(units, rank):
    """(parameter name, the part of its gradient inside this rank's shard) for every parameter of every flat unit:
    a view of the shard's gradient, so scaling it scales the gradient the optimizer reads."""
    for unit in units:
        base = rank * unit.shard_numel
        for p in unit.opt_params:
            if p.grad is None:
                continue
            lo, hi = base + p.shard_range[0], base + p.shard_range[1]
            for info in unit.infos:
                a, b = max(lo, info["offset"]), min(hi, info["offset"] + info["numel"])
                if a < b:
                    yield info["name"], p.grad[a - lo:b - lo]


# ----------------------------------------------------------------------------------------------------------
# custom variant: ZeRO-3 with flat parameters

class LeafSet(list):
    """The leaf views of one gathered unit handed to one forward, and how many of them have their gradient."""
    ready = 0


class FlatParamUnit:
    """One ZeRO-3 unit: the parameters that `module` owns (not those of other units), flattened into one padded
    flat tensor of which this rank keeps the 1/N shard.

    Layout (flat_layout): the unit's distinct parameters (tied ones once) one after another, those with weight decay
    (>= 2 dims) first, then zero padding up to a multiple of N; rank r keeps elements [r·S, (r+1)·S), S = padded/N,
    fp32. The optimizer sees the shard as at most two Parameters (`opt_params`, shard_parameters), views of it split
    at the decay/no-decay boundary, so AdamW's weight-decay groups are those of the single-device model.

    While gathered, `full` (padded,) in the compute dtype holds every rank's shard, and each of the module's
    parameter attributes is a view of it: a leaf tensor whose gradient a hook collects. Meta parameters are
    created by init_fn(name, tensor); real ones are copied. Raises ValueError if `module` has no parameters.
    """

    def __init__(self, name, module, named_params, comm, compute_dtype, init_fn, device):
        self.name, self.module, self.comm, self.compute_dtype = name, module, comm, compute_dtype
        if not named_params:
            raise ValueError(f"FSDP unit {name!r} has no parameters")
        self.infos, params, self.numel = flat_layout([(fqn, param) for fqn, _, param in named_params])
        slots = {}
        for fqn, slot, param in named_params:  # slot: (module, attribute) that holds param
            slots.setdefault(id(param), []).append(slot)
        for info, param in zip(self.infos, params):
            info["slots"] = slots[id(param)]
        N, r = comm.world_size, comm.rank
        self.shard_numel = math.ceil(self.numel / N)
        # the one-unit peak of init: build the full flat unit, keep this rank's shard, drop the rest
        flat = torch.zeros(self.shard_numel * N, device=device)
        with torch.no_grad():
            for info, param in zip(self.infos, params):
                view = flat_view(flat, info)
                if param.is_meta:
                    init_fn(info["name"], view)
                else:
                    view.copy_(param)
        self.shard = flat[r * self.shard_numel:(r + 1) * self.shard_numel].clone()
        del flat
        self.opt_params = shard_parameters(self.shard, self.infos, self.numel, r)
        # the parameters leave their modules; a gather puts views of `full` in their place
        for info in self.infos:
            for mod, attr in info["slots"]:
                del mod._parameters[attr]
        self.full = torch.empty(self.shard_numel * N, dtype=compute_dtype, device=device)
        self.full.untyped_storage().resize_(0)
        self.gathered, self.handle = False, None
        self.grad_acc, self.reduce = None, None
        self.pending = 0  # leaf sets handed to forwards whose gradients are not all in yet

    # --- parameters: gather, views, free ---

    def unshard(self, async_op=False):
        """All-gather the full parameters into `full` (async: start it, and `wait` later). No-op if gathered."""
        if not self.gathered and self.handle is None:
            self.full.untyped_storage().resize_(self.full.numel() * self.full.element_size())
            self._send = self.shard.to(self.compute_dtype)  # a copy only in mixed precision
            self.handle = self.comm.all_gather(self.full, self._send, async_op=True)
        if not async_op:
            self.wait()

    def wait(self):
        if self.handle is not None:
            self.handle.wait()
            self.handle, self._send, self.gathered = None, None, True

    def reshard(self):
        """Free the full parameters (their views keep shapes, not memory)."""
        self.wait()
        self.full.untyped_storage().resize_(0)
        self.gathered = False

    def set_views(self, on_grad):
        """Point the module's parameter attributes at fresh leaf views of `full` (one set per forward: a pipeline
        runs several micro-batches' forwards before their backwards); on_grad(self, leaves) runs once all leaves of
        a set have their gradient (post-accumulate-grad hooks)."""
        leaves = LeafSet()
        self.pending += torch.is_grad_enabled()
        for info in self.infos:
            leaf = self.full[info["offset"]:info["offset"] + info["numel"]].view(info["shape"])
            if torch.is_grad_enabled():
                leaf.requires_grad_(True)
                leaf.register_post_accumulate_grad_hook(lambda _, leaves=leaves: on_grad(self, leaves))
            for mod, attr in info["slots"]:
                setattr(mod, attr, leaf)
            leaves.append(leaf)

    # --- gradients ---

    def accumulate_grads(self, leaves):
        """Add the leaves' gradients (compute dtype) into the unsharded fp32 accumulator `grad_acc` (padded,)."""
        if self.grad_acc is None:
            self.grad_acc = torch.zeros(self.full.numel(), dtype=torch.float32, device=self.shard.device)
        for info, leaf in zip(self.infos, leaves):
            self.grad_acc[info["offset"]:info["offset"] + info["numel"]].add_(leaf.grad.view(-1))
            leaf.grad = None

    def reduce_scatter_grads(self):
        """Start the reduce-scatter (average over ranks) of grad_acc into this rank's shard gradient."""
        out = torch.empty(self.shard_numel, dtype=torch.float32, device=self.shard.device)
        self.reduce = (out, self.comm.reduce_scatter(out, self.grad_acc, "avg", async_op=True))

    def finish_reduce(self):
        """Wait for the reduce-scatter and hand each optimizer parameter its slice as .grad (added if present)."""
        out, handle = self.reduce
        handle.wait()
        for p in self.opt_params:
            g = out[p.shard_range[0]:p.shard_range[1]]
            p.grad = g if p.grad is None else p.grad.add_(g)
        self.reduce, self.grad_acc = None, None


def flat_optimizer_state(unit, optimizer, key):
    """AdamW's `key` state ("exp_avg" or "exp_avg_sq") of a unit's optimizer views as one shard-sized fp32 tensor
    (zeros where there is none yet, and in the padding)."""
    flat = torch.zeros(unit.shard_numel, device=unit.shard.device)
    for p in unit.opt_params:
        if p in optimizer.state:
            flat[p.shard_range[0]:p.shard_range[1]] = optimizer.state[p][key]
    return flat


class FullyShardedDataParallel(nn.Module):
    """ZeRO-3 around `module`: each module of `units` (e.g. the transformer blocks) is one FlatParamUnit, and the
    parameters of `module` outside them form a root unit. Works for any nn.Module made of repeated blocks.

    forward(*args): the root is gathered for the whole forward; each unit is gathered in a forward-pre-hook (the
    next unit's all-gather is started at once, to overlap this one's compute) and freed in a forward hook if
    reshard_after_forward (always when grad is disabled). Tensors that autograd saves from the parameters are
    stored as references (saved_tensors_hooks) and their unit is gathered again when backward unpacks them (and
    the unit before it prefetched); a unit recomputed in backward (activation checkpointing, parallel.apply_ac)
    saves nothing through them and is gathered by a hook on its output instead (_pre_backward). When all of a
    unit's gradients are accumulated, a hook adds them into its
    fp32 accumulator, frees the parameters, and (outside no_sync) starts the reduce-scatter; finish_gradient_sync
    waits for all. The same as torch.distributed.fsdp.FullyShardedDataParallel (FSDP1) with FULL_SHARD, flat
    parameters, BackwardPrefetch.BACKWARD_PRE and forward_prefetch.

    module: built on the meta device (init_fn(name, tensor) then initialises each parameter) or real; comm: the
    Collectives of the data-parallel group; compute_dtype: the dtype of gathered parameters (fp32 shards are kept,
    gradients are reduced in fp32); ignored_params: parameters left in their modules, unsharded and unreduced
    (expert parallelism's; the caller materialises them). Raises ValueError if a parameter is shared by two units.
    Several micro-batches may be in flight (forwards before backwards, as in a pipeline): each forward gets its
    own leaf views. `pre_reduce_scatter(unit)`, if set, runs on a unit's unsharded fp32 gradient (unit.grad_acc)
    just before its reduce-scatter (3d uses it to sum sequence-parallel gradients over TP).
    """

    def __init__(self, module, units, comm, *, compute_dtype=torch.float32, reshard_after_forward=True,
                 init_fn=None, device=torch.device("cpu"), ignored_params=()):
        super().__init__()
        self.module, self.comm, self.reshard_after_forward = module, comm, reshard_after_forward
        self.require_sync = True
        self.pre_reduce_scatter = None  # callback(unit) on the fp32 unsharded gradient before its reduce-scatter
        # which unit owns each parameter: the innermost unit module containing it, else the root (last list)
        prefixes = {name: i for i, unit in enumerate(units) for name, m in module.named_modules() if m is unit}
        names = sorted(prefixes, key=prefixes.get)
        owned = [[] for _ in units] + [[]]
        ignored = {id(p) for p in ignored_params}
        for mod_name, mod in module.named_modules(remove_duplicate=False):
            owner = max((p for p in prefixes if mod_name == p or mod_name.startswith(p + ".")), key=len, default=None)
            for attr, param in mod._parameters.items():
                if param is not None and id(param) not in ignored:
                    fqn = f"{mod_name}.{attr}" if mod_name else attr
                    owned[prefixes[owner] if owner is not None else -1].append((fqn, (mod, attr), param))
        where = {}
        for i, params in enumerate(owned):
            for fqn, _, param in params:
                if where.setdefault(id(param), i) != i:
                    raise ValueError(f"parameter {fqn} is shared by two FSDP units; put its users in one unit")
        self.units = [FlatParamUnit(names[i], units[i], owned[i], comm, compute_dtype, init_fn, device)
                      for i in range(len(units))]
        self.root = (FlatParamUnit("<root>", module, owned[-1], comm, compute_dtype, init_fn, device)
                     if owned[-1] else None)
        self.by_full = {id(u.full): u for u in self.all_units()}
        order = [u for u in [self.root, *self.units] if u is not None]
        self.forward_next = dict(zip(order, order[1:]))  # prefetch in forward
        self.backward_next = {u: p for u, p in zip(self.units[1:], self.units)}  # prefetch in backward
        if self.root is not None and self.units:
            self.backward_next[self.root] = self.units[-1]
        for unit in self.units:
            unit.module.register_forward_pre_hook(lambda m, a, unit=unit: self._pre_forward(unit))
            unit.module.register_forward_hook(lambda m, a, o, unit=unit: self._post_forward(unit, o))
        self.opt_params = nn.ParameterList([p for u in self.all_units() for p in u.opt_params])

    def all_units(self):
        return [u for u in [*self.units, self.root] if u is not None]

    def forward(self, *args, **kwargs):
        with torch.autograd.graph.saved_tensors_hooks(self._pack, self._unpack):
            if self.root is not None:
                self._pre_forward(self.root)
            out = self.module(*args, **kwargs)
            if self.root is not None:
                self._post_forward(self.root)
        return out

    def _pre_forward(self, unit):
        unit.unshard()
        unit.set_views(self._on_unit_grads)
        if unit in self.forward_next:
            self.forward_next[unit].unshard(async_op=True)

    def _post_forward(self, unit, output=None):
        if self.reshard_after_forward or not torch.is_grad_enabled():
            unit.reshard()
        if getattr(unit.module, "recomputes_in_backward", False) and isinstance(output, torch.Tensor) \
                and output.requires_grad:  # activation checkpointing: gather before the recomputation
            output.register_hook(lambda grad, unit=unit: self._pre_backward(unit))

    def _pre_backward(self, unit):
        """When the gradient reaches the output of a unit whose forward is recomputed in backward (parallel.apply_ac):
        gather it (and prefetch the unit before it), since the recomputation reads the parameters directly and
        saves nothing through _pack, so _unpack would never gather it. The recomputed forward runs without the
        unit's hooks; it computes with the unit's current leaf views, while the gradients still reach the leaves of
        the forward that built the graph (non-reentrant checkpointing recomputes only the saved tensors)."""
        unit.unshard()
        nxt = self.backward_next.get(unit)
        if nxt is not None and not nxt.gathered and nxt.pending:
            nxt.unshard(async_op=True)

    def _pack(self, tensor):
        unit = self.by_full.get(id(tensor._base)) if tensor._base is not None else None
        if unit is None:
            return tensor
        return unit, tensor.size(), tensor.stride(), tensor.storage_offset()

    def _unpack(self, packed):
        if isinstance(packed, torch.Tensor):
            return packed
        unit, size, stride, offset = packed
        unit.unshard()
        nxt = self.backward_next.get(unit)
        if nxt is not None and not nxt.gathered and nxt.pending:  # only a unit whose backward is still to come
            nxt.unshard(async_op=True)
        return unit.full.as_strided(size, stride, offset)

    def _on_unit_grads(self, unit, leaves):
        leaves.ready += 1
        if leaves.ready < len(unit.infos):
            return
        unit.pending -= 1
        unit.accumulate_grads(leaves)
        unit.reshard()
        if self.require_sync:
            if self.pre_reduce_scatter is not None:
                self.pre_reduce_scatter(unit)
            unit.reduce_scatter_grads()

    def no_sync(self):
        """Accumulate gradients in each unit's fp32 accumulator, without reduce-scatter, in the backwards run inside."""
        return skipping_sync(self)

    def gathered_bytes(self):
        """Bytes of unsharded buffers still allocated: gathered parameters and gradient accumulators (0 between steps
        when every unit was freed)."""
        return sum(u.full.untyped_storage().nbytes() + (u.grad_acc.nbytes if u.grad_acc is not None else 0)
                   for u in self.all_units())

    def finish_gradient_sync(self):
        """Wait for every unit's reduce-scatter; raise RuntimeError naming the units that got no gradient."""
        missing = [u.name for u in self.all_units() if u.reduce is None]
        if missing:
            raise RuntimeError(f"FSDP units without a complete gradient this step (unused parameters?): {missing}")
        for unit in self.all_units():
            unit.finish_reduce()

    def gradient_pieces(self):
        """(parameter name, the part of its gradient inside this rank's shard): flat_gradient_pieces of every unit."""
        return flat_gradient_pieces(self.all_units(), self.comm.rank)

    def gather_full(self, unit, flat_shard):
        """All-gather a shard-sized fp32 tensor of `unit` (its parameters or optimizer state) -> {name: full tensor}."""
        return gather_flat(unit, flat_shard, self.comm)

    def shard_of(self, unit, full_by_name):
        """The inverse of gather_full: this rank's shard-sized slice of the unit built from full tensors by name."""
        return scatter_flat(unit, full_by_name, self.comm.rank, self.comm.world_size)


def flat_state(fsdp, optimizer, global_tensor):
    """The checkpoint state (parallel/checkpoint.py's form) of the flat shards of `fsdp`, a FullyShardedDataParallel
    or parallel/ddp.py's ZeroDataParallel (all_units(), gather_full, shard_of): one unit (or bucket) at a
    time, its parameters and AdamW's moments are all-gathered over the data-parallel group, and each tensor, keyed by
    its GPT name (tied ones under both), is handed to global_tensor(name, full) for the layout it is saved in.
    optimizer None: the "model" part only."""
    model, optim = {}, {}
    for unit in fsdp.all_units():
        params = fsdp.gather_full(unit, unit.shard)
        for info in unit.infos:
            model |= {fqn: global_tensor(fqn, params[info["name"]]) for fqn in info["fqns"]}
        if optimizer is None:
            continue
        moments = {k: fsdp.gather_full(unit, flat_optimizer_state(unit, optimizer, k))
                   for k in ("exp_avg", "exp_avg_sq")}
        step = next((optimizer.state[p]["step"] for p in unit.opt_params if p in optimizer.state), torch.tensor(0.0))
        for info in unit.infos:
            name = info["name"]
            optim[WTE if name == HEAD else name] = {"step": step.clone(),
                                                    **{k: global_tensor(name, v[name]) for k, v in moments.items()}}
    return {"model": model, "optim": optim}


@torch.no_grad()
def load_flat_state(fsdp, state, optimizer, full_tensor):
    """The inverse of flat_state: full_tensor(t) turns each loaded tensor back into the unit's unsharded one, of which
    this rank keeps its shard (parameters and AdamW's moments)."""
    for unit in fsdp.all_units():
        names = [i["name"] for i in unit.infos]
        keys = [WTE if n == HEAD else n for n in names]
        unit.shard.copy_(fsdp.shard_of(unit, {n: full_tensor(state["model"][n]) for n in names}))
        moments = {k: fsdp.shard_of(unit, {n: full_tensor(state["optim"][o][k]) for n, o in zip(names, keys)})
                   for k in ("exp_avg", "exp_avg_sq")}
        step = state["optim"][keys[0]]["step"]
        for p in unit.opt_params:
            lo, hi = p.shard_range
            optimizer.state[p] = {"step": step.clone(), **{k: v[lo:hi].clone() for k, v in moments.items()}}


@register("fsdp", "custom", "triton", "nccl", "cuda")
class CustomFSDP(FullySharded):
    """FullyShardedDataParallel (ZeRO-3 with flat parameters) around a meta-device GPT: units are the blocks and
    the root (embeddings, final norm, tied head). Mixed precision: fp32 shards, bf16/fp16 gathered parameters and
    compute, fp32 gradient reduction. Checkpoints: each parameter a DTensor Shard(0) over the data-parallel ranks
    (torch.chunk's split), FSDP2's layout, so both variants' checkpoints load into either, on any world size."""

    def build_model(self, model_config, weights=None):
        cfg = self.cfg
        if cfg.compile and self.is_logger:
            print("fsdp/custom runs eagerly: compile=True is ignored (its saved-tensor hooks would break the graphs)")
        with torch.device("meta"):
            model = GPT(model_config)
        self.apply_ac(model)
        self.module = FullyShardedDataParallel(
            model, list(model.transformer.h.values()), self.collectives(self.dp_group),
            compute_dtype=LOW_PRECISION.get(cfg.dtype, torch.float32), reshard_after_forward=self.reshard_after_forward,
            init_fn=slice_init(model_config, weights=weights), device=self.device)
        self.model = model
        return model

    def named_parameters(self):
        return [(unit.name, p) for unit in self.module.all_units() for p in unit.opt_params]

    def gradients(self):
        return [(p.grad, True) for _, p in self.named_parameters() if p.grad is not None]  # each element in one shard

    def global_tensor(self, name, full):
        return distribute_tensor(full, self.grid.mesh["dp"], [Shard(0)], src_data_rank=None)

    def state_dict(self, optimizer):
        return flat_state(self.module, optimizer, self.global_tensor)

    def load_state_dict(self, state, optimizer):
        load_flat_state(self.module, state, optimizer, DTensor.full_tensor)
