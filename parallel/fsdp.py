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
with reshard_after_forward=False the backward all-gather is skipped: 1x DDP, for DDP-like memory.
Memory per rank between steps: 16Ψ/N bytes (fp32 params 4, grads 4, Adam 8) instead of 16Ψ.
Sources: Rajbhandari et al. 2020, "ZeRO: Memory Optimizations Toward Training Trillion Parameter Models", section 5
(P_os+g+p); Zhao et al. 2023, "PyTorch FSDP: Experiences on Scaling Fully Sharded Data Parallel", section 3
(units, flat parameters, prefetching); the Ultra-Scale Playbook's ZeRO-3 chapter for the byte counts.

Two variants, top to bottom:
- `pytorch`: FSDP2, `fully_shard` on every block and then on the root, on a 1-D DeviceMesh ("dp"), with
             MixedPrecisionPolicy for bf16/fp16, `set_requires_gradient_sync` for accumulation.
- `custom`:  ZeRO-3 written out with parallel/comm.py: each unit is one padded flat parameter, sharded at init
             from a meta-device build; forward/backward hooks all-gather, prefetch and free; the gradients of a
             unit are reduce-scattered from a hook as soon as they are all ready (overlapping the rest of backward).
Both write sharded (DCP) checkpoints that load on another world size (parallel/checkpoint.py).
"""

import contextlib
import math

import torch
import torch.nn as nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from torch.distributed.fsdp._fully_shard._fsdp_api import AllGather, ReduceScatter  # set_custom_* interfaces
from torch.distributed.tensor import DTensor, Shard, distribute_tensor

from model import GPT, init_parameter_
from parallel import Strategy, register
from comm import all_gather_single, reduce_scatter_single

LOW_PRECISION = {"bfloat16": torch.bfloat16, "float16": torch.float16}


def local_bytes(tensors):
    """Bytes of memory behind `tensors` on this rank (plain tensors, or DTensors: their local shard), each
    storage counted once however many views of it are listed (a flat shard and its parameter views)."""
    storages = {}
    for t in tensors:
        if t is not None:
            t = t.to_local() if isinstance(t, DTensor) else t
            storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
    return sum(storages.values())


class FSDPStrategy(Strategy):
    """What both variants share: sharded checkpoints, and a memory account for tests and benchmarks."""

    checkpoint_name = "ckpt"

    def memory_bytes(self, optimizer):
        """{"params", "grads", "optimizer"}: bytes this rank holds in each between steps (after backward and the
        optimizer step, before zero_grad), plus "gathered": full-unit buffers still allocated (0 when all freed)."""
        params = self.local_parameters()
        return {"params": local_bytes(params), "grads": local_bytes(p.grad for p in params),
                "optimizer": local_bytes(t for s in optimizer.state.values() for t in s.values()
                                         if isinstance(t, torch.Tensor) and t.dim() > 0),
                "gathered": self.gathered_bytes()}


# ----------------------------------------------------------------------------------------------------------
# pytorch variant

class CountingAllGather(AllGather):
    """FSDP2's default all-gather (torch.distributed.all_gather_single), counting bytes into a CommStats.
    Installed with FSDPModule.set_custom_all_gather; the result is identical to FSDP2's own."""

    def __init__(self, stats):
        self.stats = stats

    def allocate(self, size, *, dtype, device):
        return torch.empty(*size, dtype=dtype, device=device)

    def __call__(self, output_tensor, input_tensor, group, async_op=False):
        self.stats.record("all_gather", output_tensor.numel() * output_tensor.element_size(), group.size())
        return all_gather_single(output_tensor, input_tensor, group=group, async_op=async_op)


class CountingReduceScatter(ReduceScatter):
    """FSDP2's default reduce-scatter (torch.distributed.reduce_scatter_single), counting bytes into a CommStats."""

    def __init__(self, stats):
        self.stats = stats

    def allocate(self, size, *, dtype, device):
        return torch.empty(*size, dtype=dtype, device=device)

    def __call__(self, output_tensor, input_tensor, group, op, async_op=False):
        self.stats.record("reduce_scatter", input_tensor.numel() * input_tensor.element_size(), group.size())
        return reduce_scatter_single(output_tensor, input_tensor, op, group=group, async_op=async_op)


@register("fsdp", "pytorch")
class PytorchFSDP(FSDPStrategy):
    """FSDP2 (torch.distributed.fsdp.fully_shard): each block is a unit, the root unit holds the embeddings, the final
    norm and the (tied) head. Parameters are DTensors sharded along dim 0 (Shard(0)) on a 1-D mesh."""

    def build_model(self, model_config):
        cfg = self.cfg
        self.mesh = init_device_mesh(self.device.type, (self.world_size,), mesh_dim_names=("dp",))
        with torch.device("meta"):
            model = GPT(model_config)
        mp = MixedPrecisionPolicy(param_dtype=LOW_PRECISION.get(cfg.dtype), reduce_dtype=torch.float32)
        if cfg.compile:  # per block, before sharding (torchtitan's order); FSDP's hooks stay outside the graphs
            for block in model.transformer.h.values():
                block.compile(backend=cfg.compile_backend)
        units = [*model.transformer.h.values(), model]
        for unit in units:
            fully_shard(unit, mesh=self.mesh, reshard_after_forward=cfg.reshard_after_forward, mp_policy=mp)
            unit.set_custom_all_gather(CountingAllGather(self.stats))
            unit.set_custom_reduce_scatter(CountingReduceScatter(self.stats))
        # materialise only this rank's shards; each one is the slice of the eager model's init
        model.to_empty(device=self.device)
        with torch.no_grad():
            for name, p in model.named_parameters():
                full = torch.empty(p.shape, device=self.device)
                init_parameter_(name, full, model_config)
                p.to_local().copy_(distribute_tensor(full, self.mesh, p.placements, src_data_rank=None).to_local())
        self.model = model
        return model

    def local_parameters(self):
        return list(self.model.parameters())

    def gathered_bytes(self):
        return 0  # FSDP2 frees unsharded parameters itself after backward

    @contextlib.contextmanager
    def no_sync(self):
        self.model.set_requires_gradient_sync(False)
        try:
            yield
        finally:
            self.model.set_requires_gradient_sync(True)

    def clip_grad_norm_(self, max_norm):
        norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), max_norm)
        return norm.full_tensor() if isinstance(norm, DTensor) else norm


# ----------------------------------------------------------------------------------------------------------
# custom variant: ZeRO-3 with flat parameters

class LeafSet(list):
    """The leaf views of one gathered unit handed to one forward, and how many of them have their gradient."""
    ready = 0


class FlatParamUnit:
    """One ZeRO-3 unit: the parameters that `module` owns (not those of other units), flattened into one padded
    flat tensor of which this rank keeps the 1/N shard.

    Layout: the unit's distinct parameters (tied ones once) one after another, those with weight decay (>= 2 dims)
    first, then zero padding up to a multiple of N; rank r keeps elements [r·S, (r+1)·S), S = padded/N, fp32.
    The optimizer sees the shard as at most two Parameters (`opt_params`), views of it split at the decay/no-decay
    boundary, so AdamW's weight-decay groups are those of the single-device model.

    While gathered, `full` (padded,) in the compute dtype holds every rank's shard, and each of the module's
    parameter attributes is a view of it: a leaf tensor whose gradient a hook collects. Meta parameters are
    created by init_fn(name, tensor); real ones are copied. Raises ValueError if `module` has no parameters.
    """

    def __init__(self, name, module, named_params, comm, compute_dtype, init_fn, device):
        self.name, self.module, self.comm, self.compute_dtype = name, module, comm, compute_dtype
        distinct = {}
        for fqn, slot, param in named_params:  # slot: (module, attribute) that holds param
            entry = distinct.setdefault(id(param), (fqn, param, [], []))
            entry[2].append(slot)
            entry[3].append(fqn)
        if not distinct:
            raise ValueError(f"FSDP unit {name!r} has no parameters")
        entries = sorted(distinct.values(), key=lambda e: e[1].dim() < 2)  # stable: decay first, in order
        self.infos, offset = [], 0
        for fqn, param, slots, fqns in entries:
            self.infos.append(dict(name=fqn, fqns=fqns, shape=param.shape, offset=offset, numel=param.numel(),
                                   slots=slots, decay=param.dim() >= 2))
            offset += param.numel()
        self.numel = offset
        N, r = comm.world_size, comm.rank
        self.shard_numel = math.ceil(offset / N)
        padded = self.shard_numel * N
        # the one-unit peak of init: build the full flat unit, keep this rank's shard, drop the rest
        flat = torch.zeros(padded, device=device)
        with torch.no_grad():
            for info, (_, param, _, _) in zip(self.infos, entries):
                view = flat[info["offset"]:info["offset"] + info["numel"]].view(info["shape"])
                if param.is_meta:
                    init_fn(info["name"], view)
                else:
                    view.copy_(param)
        self.shard = flat[r * self.shard_numel:(r + 1) * self.shard_numel].clone()
        del flat
        # the optimizer's view of the shard: [decay part, no-decay part], padding excluded
        n_decay = sum(i["numel"] for i in self.infos if i["decay"])
        start, end = r * self.shard_numel, (r + 1) * self.shard_numel
        self.opt_params = []
        for lo, hi, decay in ((0, n_decay, True), (n_decay, self.numel, False)):
            lo, hi = max(lo, start), min(hi, end)
            if lo < hi:
                p = nn.Parameter(self.shard[lo - start:hi - start])  # shares the shard's memory
                p.decay, p.shard_range = decay, (lo - start, hi - start)
                self.opt_params.append(p)
        # the parameters leave their modules; a gather puts views of `full` in their place
        for info in self.infos:
            for mod, attr in info["slots"]:
                del mod._parameters[attr]
        self.full = torch.empty(padded, dtype=compute_dtype, device=device)
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
    the unit before it prefetched). When all of a unit's gradients are accumulated, a hook adds them into its
    fp32 accumulator, frees the parameters, and (outside no_sync) starts the reduce-scatter; finish_gradient_sync
    waits for all. The same as torch.distributed.fsdp.FullyShardedDataParallel (FSDP1) with FULL_SHARD, flat
    parameters, BackwardPrefetch.BACKWARD_PRE and forward_prefetch.

    module: built on the meta device (init_fn(name, tensor) then initialises each parameter) or real; comm: the
    Collectives of the data-parallel group; compute_dtype: the dtype of gathered parameters (fp32 shards are kept,
    gradients are reduced in fp32). Raises ValueError if a parameter is shared by two units.
    Several micro-batches may be in flight (forwards before backwards, as in a pipeline): each forward gets its
    own leaf views. `pre_reduce_scatter(unit)`, if set, runs on a unit's unsharded fp32 gradient (unit.grad_acc)
    just before its reduce-scatter (3d uses it to sum sequence-parallel gradients over TP).
    """

    def __init__(self, module, units, comm, *, compute_dtype=torch.float32, reshard_after_forward=True,
                 init_fn=None, device=torch.device("cpu")):
        super().__init__()
        self.module, self.comm, self.reshard_after_forward = module, comm, reshard_after_forward
        self.require_sync = True
        self.pre_reduce_scatter = None  # callback(unit) on the fp32 unsharded gradient before its reduce-scatter
        # which unit owns each parameter: the innermost unit module containing it, else the root (last list)
        prefixes = {name: i for i, unit in enumerate(units) for name, m in module.named_modules() if m is unit}
        names = sorted(prefixes, key=prefixes.get)
        owned = [[] for _ in units] + [[]]
        for mod_name, mod in module.named_modules(remove_duplicate=False):
            owner = max((p for p in prefixes if mod_name == p or mod_name.startswith(p + ".")), key=len, default=None)
            for attr, param in mod._parameters.items():
                if param is not None:
                    fqn = f"{mod_name}.{attr}" if mod_name else attr
                    owned[prefixes[owner] if owner is not None else -1].append((fqn, (mod, attr), param))
        where = {}
        for i, params in enumerate(owned):
            for fqn, _, param in params:
                if where.setdefault(id(param), i) != i:
                    raise ValueError(f"parameter {fqn} is shared by two FSDP units; put its users in one unit")
        self.units = [FlatParamUnit(names[i], units[i], owned[i], comm, compute_dtype, init_fn, device)
                      for i in range(len(units))]
        self.root = FlatParamUnit("<root>", module, owned[-1], comm, compute_dtype, init_fn, device) if owned[-1] else None
        self.by_full = {id(u.full): u for u in self.all_units()}
        order = [u for u in [self.root, *self.units] if u is not None]
        self.forward_next = dict(zip(order, order[1:]))  # prefetch in forward
        self.backward_next = {u: p for u, p in zip(self.units[1:], self.units)}  # prefetch in backward
        if self.root is not None and self.units:
            self.backward_next[self.root] = self.units[-1]
        for unit in self.units:
            unit.module.register_forward_pre_hook(lambda m, a, unit=unit: self._pre_forward(unit))
            unit.module.register_forward_hook(lambda m, a, o, unit=unit: self._post_forward(unit))
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

    def _post_forward(self, unit):
        if self.reshard_after_forward or not torch.is_grad_enabled():
            unit.reshard()

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

    def finish_gradient_sync(self):
        """Wait for every unit's reduce-scatter; raise RuntimeError naming the units that got no gradient."""
        missing = [u.name for u in self.all_units() if u.reduce is None]
        if missing:
            raise RuntimeError(f"FSDP units without a complete gradient this step (unused parameters?): {missing}")
        for unit in self.all_units():
            unit.finish_reduce()

    @torch.no_grad()
    def gather_full(self, unit, flat_shard):
        """All-gather a shard-sized fp32 tensor of `unit` (its parameters or optimizer state) -> {name: full tensor}."""
        full = torch.empty(unit.shard_numel * self.comm.world_size, device=flat_shard.device)
        self.comm.all_gather(full, flat_shard.contiguous())
        return {i["name"]: full[i["offset"]:i["offset"] + i["numel"]].view(i["shape"]).clone() for i in unit.infos}

    def shard_of(self, unit, full_by_name):
        """The inverse of gather_full: this rank's shard-sized slice of the unit built from full tensors by name."""
        full = torch.zeros(unit.shard_numel * self.comm.world_size, device=unit.shard.device)
        for i in unit.infos:
            full[i["offset"]:i["offset"] + i["numel"]].copy_(full_by_name[i["name"]].reshape(-1))
        r = self.comm.rank
        return full[r * unit.shard_numel:(r + 1) * unit.shard_numel]


@register("fsdp", "custom")
class CustomFSDP(FSDPStrategy):
    """FullyShardedDataParallel (ZeRO-3 with flat parameters) around a meta-device GPT: units are the blocks and
    the root (embeddings, final norm, tied head). Mixed precision: fp32 shards, bf16/fp16 gathered parameters and
    compute, fp32 gradient reduction."""

    def build_model(self, model_config):
        cfg = self.cfg
        if cfg.compile and self.is_logger:
            print("fsdp/custom runs eagerly: compile=True is ignored (its saved-tensor hooks would break the graphs)")
        with torch.device("meta"):
            model = GPT(model_config)
        self.comm = self.collectives(self.dp_group)
        self.fsdp = FullyShardedDataParallel(
            model, list(model.transformer.h.values()), self.comm,
            compute_dtype=LOW_PRECISION.get(cfg.dtype, torch.float32), reshard_after_forward=cfg.reshard_after_forward,
            init_fn=lambda name, t: init_parameter_(name, t, model_config), device=self.device)
        self.model = model
        self.mesh = None  # made on first checkpoint
        return model

    def local_parameters(self):
        return list(self.fsdp.opt_params)

    def gathered_bytes(self):
        return sum(u.full.untyped_storage().nbytes() + (u.grad_acc.nbytes if u.grad_acc is not None else 0)
                   for u in self.fsdp.all_units())

    def configure_optimizer(self):
        cfg = self.cfg
        params = self.local_parameters()
        groups = [g for g in ({"params": [p for p in params if p.decay], "weight_decay": cfg.weight_decay},
                              {"params": [p for p in params if not p.decay], "weight_decay": 0.0}) if g["params"]]
        return torch.optim.AdamW(groups, lr=cfg.learning_rate, betas=(cfg.beta1, cfg.beta2),
                                 fused=self.device.type == "cuda")

    def forward(self, x, y):
        return self.fsdp(x, y)

    @contextlib.contextmanager
    def no_sync(self):
        self.fsdp.require_sync = False
        try:
            yield
        finally:
            self.fsdp.require_sync = True

    def sync_gradients(self):
        self.fsdp.finish_gradient_sync()

    @torch.no_grad()
    def clip_grad_norm_(self, max_norm):
        """Global L2 norm over all shards: local sum of squares, all-reduced (each element is in one shard once,
        tied weights included); then the same scaling as torch.nn.utils.clip_grad_norm_."""
        grads = [p.grad for p in self.fsdp.opt_params if p.grad is not None]
        sq = torch.zeros((), device=self.device)
        for g in grads:
            sq += g.pow(2).sum()
        self.comm.all_reduce(sq)
        norm = sq.sqrt()
        coef = torch.clamp(max_norm / (norm + 1e-6), max=1.0)
        for g in grads:
            g.mul_(coef)
        return norm

    # --- state: gathered and checkpoints ---

    def full_state_dict(self):
        full = {}
        for unit in self.fsdp.all_units():
            params = self.fsdp.gather_full(unit, unit.shard)
            full.update({fqn: params[i["name"]] for i in unit.infos for fqn in i["fqns"]})  # tied: both names
        return {k: full[k] for k in self._state_keys()}

    def _state_keys(self):
        """The single-device GPT's state_dict keys, in order (the bare model holds no parameters any more)."""
        with torch.device("meta"):
            return list(GPT(self.model.config).state_dict().keys())

    def sharded_state_dict(self, optimizer):
        """Per parameter name, a DTensor Shard(0) over the data-parallel ranks (torch.chunk's split), the layout
        FSDP2 uses, so both variants' checkpoints load into either and on any world size."""
        if self.mesh is None:
            self.mesh = init_device_mesh(self.device.type, (self.world_size,), mesh_dim_names=("dp",))

        def shard(t):
            return distribute_tensor(t, self.mesh, [Shard(0)], src_data_rank=None)

        model_sd, optim_sd = {}, {}
        step = next((s["step"] for s in optimizer.state.values()), torch.tensor(0.0))
        for unit in self.fsdp.all_units():
            params = self.fsdp.gather_full(unit, unit.shard)
            moments = {k: self.fsdp.gather_full(unit, flat_optimizer_state(unit, optimizer, k))
                       for k in ("exp_avg", "exp_avg_sq")}
            for info in unit.infos:
                name = info["name"]
                model_sd.update({fqn: shard(params[name]) for fqn in info["fqns"]})
                optim_sd[name] = {"step": step.clone(), **{k: shard(v[name]) for k, v in moments.items()}}
        return {"model": {k: model_sd[k] for k in self._state_keys()}, "optim": optim_sd}

    @torch.no_grad()
    def load_sharded_state_dict(self, state, optimizer):
        for unit in self.fsdp.all_units():
            names = [i["name"] for i in unit.infos]
            unit.shard.copy_(self.fsdp.shard_of(unit, {n: state["model"][n].full_tensor() for n in names}))
            moments = {k: self.fsdp.shard_of(unit, {n: state["optim"][n][k].full_tensor() for n in names})
                       for k in ("exp_avg", "exp_avg_sq")}
            step = state["optim"][names[0]]["step"]
            for p in unit.opt_params:
                lo, hi = p.shard_range
                optimizer.state[p] = {"step": step.clone(), **{k: v[lo:hi].clone() for k, v in moments.items()}}
