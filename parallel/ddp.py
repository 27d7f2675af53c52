"""
Distributed data parallel: every rank holds the whole model, reads its own slice of the global batch, and the
gradients are averaged over ranks before the optimizer step, so every rank takes the same step a single device
would take on the whole global batch.

Communication per optimizer step: one all-reduce of all Ψ gradients, i.e. 2·(N-1)/N · Ψ · 4 bytes sent per
rank in fp32 with a ring algorithm; none inside `no_sync` (gradient accumulation). PyTorch DDP paper:
Li et al. 2020, "PyTorch Distributed: Experiences on Accelerating Data Parallel Training" (VLDB), sections 3.2
(gradient bucketing, overlap with backward) and 3.2.4 (no_sync).

The ZeRO stage (cfg.zero_stage; Rajbhandari et al. 2020, "ZeRO: Memory Optimizations Toward Training Trillion
Parameter Models", section 5) says how much of the training state each rank keeps whole. With Adam in fp32 a rank
holds params 4Ψ + grads 4Ψ + Adam's two moments 8Ψ bytes; over N ranks:
- 0, DDP: nothing sharded, 16Ψ;
- 1, optimizer-state partitioning (P_os): rank r updates only its 1/N of the parameters, so it keeps Adam's moments
  of that shard only: 4Ψ + 4Ψ + 8Ψ/N. After its optimizer step the updated shards are all-gathered, so every rank
  computes the next forward with the whole model. What Megatron-LM calls the distributed optimizer;
- 2, gradient partitioning too (P_os+g): each rank needs the averaged gradient of its shard only, so the gradients
  are reduce-scattered and the full gradient is freed after the reduction: 4Ψ + 4Ψ/N + 8Ψ/N;
- 3, parameters too (P_os+g+p): parallel/fsdp.py.
The paper's figures are for mixed precision, (2 + 2 + K)Ψ with K = 12 (fp32 master weights and moments): 4Ψ + KΨ/N
and 2Ψ + (2 + K)Ψ/N. Communication (section 7.2.1): stages 1 and 2 reduce-scatter the gradients (each rank
receives the average of its shard) and all-gather the updated parameters, (N-1)/N·Ψ·4 bytes each, together the
2·(N-1)/N·Ψ·4 of DDP's all-reduce, which is itself a reduce-scatter followed by an all-gather.

Variants, top to bottom:
- `pytorch`: torch.nn.parallel.DistributedDataParallel, accumulation under `no_sync` (`apply_ddp`); for tensor-parallel
             (DTensor) parameters, FSDP2's replicate (`apply_replicate`, what parallel/3d.py composes).
             ZeRO-1: DistributedDataParallel with torch.distributed.optim.ZeroRedundancyOptimizer (`PytorchZero1`);
             ZeRO-2: FSDP2 that keeps parameters gathered from forward to backward (`PytorchZero2`). Both differ from
             the paper's form: see their docstrings.
- `custom`:  the same algorithm written out: broadcast the initial parameters from rank 0, gradient buckets filled
             in reverse registration order, an async all-reduce launched from post-accumulate-grad hooks as soon
             as a bucket is full (communication overlaps the rest of backward), wait at the end, average.
             ZeRO-1/2 (`ZeroDataParallel`): the same buckets as flat buffers padded to a multiple of N
             (parallel/fsdp.py's flat layout), reduce-scattered instead of all-reduced; AdamW on this rank's shard;
             all-gather from the optimizer's step post-hook.
"""

import functools
import math

import torch
import torch.nn as nn
from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook
from torch.distributed.optim import ZeroRedundancyOptimizer
from torch.distributed.tensor import DTensor, Shard, distribute_tensor
from torch.nn.parallel import DistributedDataParallel as DDP

from parallel import Strategy, register, skipping_sync
from parallel.fsdp import (PytorchFSDP, flat_gradient_pieces, flat_layout, flat_state, flat_view, gather_flat,
                           load_flat_state, scatter_flat, shard_parameters)

ZERO_STAGES = {0: "DDP", 1: "optimizer states sharded", 2: "optimizer states and gradients sharded"}


def check_zero_stage(cfg, custom=False):
    """cfg.zero_stage, the ZeRO stage of data parallelism that keeps the parameters whole on every rank: 0, 1 or 2.
    Raises ValueError (one line, before any collective) for any other value (3: that is fsdp), and for dtype=float16
    with a custom ZeRO stage (custom: GradScaler would look for inf in each rank's gradient shard alone, so ranks could
    disagree on skipping a step and the parameter all-gather would hang)."""
    stage = cfg.zero_stage
    if stage == 3:
        raise ValueError("zero_stage=3 shards the parameters too: that is ZeRO-3, use parallel=fsdp "
                         "(in 3d: dp_type=fsdp)")
    if stage not in ZERO_STAGES:
        raise ValueError(f"zero_stage must be 0 (DDP), 1 (optimizer states sharded) or 2 (and gradients), "
                         f"got {stage!r}")
    if stage and custom and cfg.dtype == "float16":
        raise ValueError("zero_stage 1 and 2 (custom) do not support dtype=float16: loss scaling would check each "
                         "rank's gradient shard for inf separately; use bfloat16")
    return stage


# ----------------------------------------------------------------------------------------------------------
# pytorch variant

def apply_ddp(module, group, stats, bucket_cap_mb=25.0, device=None):
    """torch.nn.parallel.DistributedDataParallel around `module` over `group` (None: the world). Its gradient buckets
    go through DDP's default all-reduce hook wrapped to count bytes in `stats` (the result is identical to
    registering no hook). Returns the DDP module (call it for forward; its no_sync() accumulates)."""
    ddp = DDP(module, device_ids=[device] if device is not None and device.type == "cuda" else None,
              process_group=group, bucket_cap_mb=bucket_cap_mb)
    size = ddp.process_group.size()

    def counting_allreduce_hook(stats, bucket):
        buffer = bucket.buffer()
        stats.record("all_reduce", buffer.numel() * buffer.element_size(), size)
        return allreduce_hook(ddp.process_group, bucket)  # divide by world size, all-reduce, async

    ddp.register_comm_hook(stats, counting_allreduce_hook)
    return ddp


def apply_replicate(module, mesh, mp_policy, ignored_params=None):
    """DDP for a module whose parameters are DTensors (tensor-parallel ones), which DistributedDataParallel cannot
    take: FSDP2's machinery without sharding (gradients all-reduced over `mesh`, a 1-D DeviceMesh), which the
    pipelining schedules drive like FSDP2. PyTorch has no public API for it yet: this is the one place that imports
    the private torch.distributed._composable.replicate_with_fsdp. Its all-reduce has no counting hook.
    ignored_params: a set of parameters it leaves alone (expert parallelism's)."""
    from torch.distributed._composable.replicate_with_fsdp import replicate
    replicate(module, mesh=mesh, mp_policy=mp_policy, ignored_params=ignored_params)


class PytorchDDP(Strategy):
    """DistributedDataParallel around the GPT (apply_ddp)."""

    strategy = "ddp"

    def build_model(self, model_config, weights=None):
        model = super().build_model(model_config, weights)
        self.module = apply_ddp(model, None, self.stats, self.cfg.bucket_cap_mb, self.device)
        return model


class PytorchZero1(PytorchDDP):
    """ZeRO-1 with PyTorch's API: DistributedDataParallel (apply_ddp) and
    torch.distributed.optim.ZeroRedundancyOptimizer over the same AdamW groups as every strategy
    (Strategy.configure_optimizer).

    ZeroRedundancyOptimizer assigns whole parameters to ranks (greedily, largest first, balancing the elements), and
    each rank's AdamW updates and keeps the moments of its own parameters only: about 8Ψ/N bytes, not exactly (no
    parameter is split). After its step each rank broadcasts its updated parameters to the others. So compared with
    the paper's P_os (the custom variant): the gradients are all-reduced by DDP (2·(N-1)/N·Ψ·4 bytes), of which each
    rank then uses 1/N, and each rank broadcasts its own updated parameters (N broadcasts of Ψ·4 bytes in all: about
    Ψ·4 bus bytes per rank by nccl-tests' count, against the all-gather's (N-1)/N·Ψ·4); these broadcasts are not
    counted in stats (only DDP's all-reduce is). Checkpoints are one file, as DDP's: the
    optimizer state is first gathered on rank 0 (consolidate_state_dict, collective), whose optimizer.state_dict() is
    then the single-device AdamW's, loadable by single, ddp and ZeRO-1 at any world size."""

    def configure_optimizer(self):
        adamw = super().configure_optimizer()  # its groups and hyper-parameters; it holds no state yet
        groups = [{"params": g["params"], "weight_decay": g["weight_decay"]} for g in adamw.param_groups]
        return ZeroRedundancyOptimizer(groups, optimizer_class=torch.optim.AdamW, lr=self.cfg.learning_rate,
                                       betas=(self.cfg.beta1, self.cfg.beta2), fused=adamw.defaults["fused"])

    def memory_bytes(self, optimizer):
        return super().memory_bytes(optimizer.optim)  # the moments live in this rank's local AdamW

    def save_checkpoint(self, path, optimizer, extra, asynchronous=False, process_group=None):
        optimizer.consolidate_state_dict(to=0)  # every rank sends its parameters' Adam state to rank 0
        return super().save_checkpoint(path, optimizer, extra, asynchronous, process_group)


class PytorchZero2(PytorchFSDP):
    """ZeRO-2 in its closest PyTorch-native form: FSDP2 (parallel/fsdp.py's apply_fsdp, the same units) with
    reshard_after_forward=False, what FSDP1 calls ShardingStrategy.SHARD_GRAD_OP: gradients are reduce-scattered
    ((N-1)/N·Ψ·4 bytes) and the optimizer state is sharded, as in DeepSpeed's stage 2, and the parameters gathered
    by the forward's all-gather ((N-1)/N·Ψ·4 bytes) stay to the end of backward, so there is no second all-gather.

    How it differs from DeepSpeed's stage 2 (and from the custom variant): after backward FSDP2 frees the gathered
    parameters again, so between steps each rank holds its 1/N of the parameters (4Ψ/N instead of 4Ψ; the optimizer
    then updates DTensor shards), and the all-gather happens in the next step's first forward instead of right after
    the optimizer step; the units are gathered one at a time (prefetching the next), and the reduce-scatter too runs
    per unit during backward. Same bytes, less memory between steps, the peak of the forward-to-backward window as
    ZeRO-2's. Checkpoints are FSDP's (DCP)."""

    strategy = "ddp"

    def __init__(self, cfg, device):
        super().__init__(cfg, device)
        self.reshard_after_forward = False


# ----------------------------------------------------------------------------------------------------------
# custom variant


def bucket_groups(params, bucket_cap_mb, alone=()):
    """Split `params` into gradient buckets, DDP's rule: in reverse order (the order in which backward produces their
    gradients), a bucket closed once it holds at least bucket_cap_mb MiB; a parameter in `alone` gets a bucket of its
    own. Returns a list of lists of parameters."""
    alone = {id(p) for p in alone}
    groups, current, size = [], [], 0
    for p in reversed(params):
        if id(p) in alone:
            groups += [current, [p]] if current else [[p]]
            current, size = [], 0
            continue
        current.append(p)
        size += p.numel() * p.element_size()
        if size >= bucket_cap_mb * 2**20:
            groups.append(current)
            current, size = [], 0
    return groups + [current] if current else groups


class Bucket:
    """Parameters whose gradients are all-reduced together, as one flat buffer (1-D, their dtype).

    grads[i] is a view of `buffer` shaped like params[i]; after the all-reduce it becomes params[i].grad.
    """

    def __init__(self, params):
        self.params = params
        self.buffer = torch.zeros(sum(p.numel() for p in params), dtype=params[0].dtype, device=params[0].device)
        self.grads, offset = [], 0
        for p in params:
            self.grads.append(self.buffer[offset:offset + p.numel()].view_as(p))
            offset += p.numel()
        self.ready = set()    # indices of the parameters whose gradient is in the buffer this step
        self.handle = None    # the async all-reduce, once launched


class DataParallel(nn.Module):
    """Data parallelism written out with Collectives (the custom twin of torch's DistributedDataParallel).

    module: the model, identical in structure on every rank; its parameters and buffers are overwritten with
    rank 0's (broadcast) so every replica starts equal. comm: comm.Collectives over the data-parallel
    group. bucket_cap_mb: a bucket is closed once it holds at least this many MiB of gradients (DDP's rule).
    ignored_params: parameters left alone, neither broadcast nor reduced (expert parallelism's experts, which differ
    per rank: DistributedDataParallel's params_and_buffers_to_ignore).

    Buckets take the parameters in reverse registration order, the order in which backward produces their
    gradients. A post-accumulate-grad hook copies each final gradient into its bucket; when a bucket is full it
    is divided by the world size and its all-reduce (a sum, hence the average) is launched asynchronously, strictly in
    bucket order so every rank issues the same sequence of collectives, while backward goes on computing the next
    gradients. finish_gradient_sync() waits for them and points each parameter's .grad at the averaged result.
    Inside no_sync() the hooks do nothing and gradients simply accumulate in .grad.
    Every parameter that requires grad must receive a gradient on the synchronising backward, or
    finish_gradient_sync() raises RuntimeError naming those that did not.
    """

    def __init__(self, module, comm, bucket_cap_mb=25.0, ignored_params=()):
        super().__init__()
        self.module, self.comm = module, comm
        ignored = {id(p) for p in ignored_params}
        with torch.no_grad():
            for t in [*module.parameters(), *module.buffers()]:
                if id(t) not in ignored:
                    comm.broadcast(t, src=0)

        params = [p for p in module.parameters() if p.requires_grad and id(p) not in ignored]
        self.buckets = [Bucket(group) for group in bucket_groups(params, bucket_cap_mb)]
        self.names = {p: name for name, p in module.named_parameters()}

        self.require_sync = True
        self.next_bucket = 0   # the next bucket to launch; buckets launch in order
        for bucket in self.buckets:
            for i, p in enumerate(bucket.params):
                p.register_post_accumulate_grad_hook(functools.partial(self._on_grad_ready, bucket, i))

    def forward(self, *args, **kwargs):
        return self.module(*args, **kwargs)

    def no_sync(self):
        """Accumulate gradients locally (no communication) for backward passes run inside this context."""
        return skipping_sync(self)

    def _on_grad_ready(self, bucket, i, param):
        """Post-accumulate-grad hook of bucket.params[i]: its gradient is final for this backward."""
        if not self.require_sync:
            return
        bucket.grads[i].copy_(param.grad)
        bucket.ready.add(i)
        while self.next_bucket < len(self.buckets) and self._is_full(self.buckets[self.next_bucket]):
            bucket = self.buckets[self.next_bucket]
            bucket.buffer.div_(self.comm.world_size)  # sum of grad / N over ranks = the average
            bucket.handle = self.comm.all_reduce(bucket.buffer, async_op=True)
            self.next_bucket += 1

    @staticmethod
    def _is_full(bucket):
        return len(bucket.ready) == len(bucket.params)

    def finish_gradient_sync(self):
        """Wait for every bucket's all-reduce and set each parameter's .grad to its averaged gradient."""
        if self.next_bucket < len(self.buckets):
            missing = [self.names[p] for b in self.buckets for i, p in enumerate(b.params) if i not in b.ready]
            raise RuntimeError(f"DataParallel: parameters got no gradient in this backward: {missing}. "
                               f"Every parameter with requires_grad must take part in the loss.")
        for bucket in self.buckets:
            bucket.handle.wait()
            for p, grad in zip(bucket.params, bucket.grads):
                p.grad = grad
            bucket.ready, bucket.handle = set(), None
        self.next_bucket = 0


class CustomDDP(Strategy):
    """Our DataParallel around the GPT, over the Collectives of this variant (kernels/comm.py, kernels/)."""

    strategy = "ddp"

    def build_model(self, model_config, weights=None):
        model = super().build_model(model_config, weights)
        self.module = DataParallel(model, self.collectives(), self.cfg.bucket_cap_mb)
        return model


# ----------------------------------------------------------------------------------------------------------
# custom variant, ZeRO-1 and ZeRO-2: buckets as flat buffers, sharded optimizer, reduce-scatter, all-gather

class ZeroBucket:
    """Parameters whose gradients are reduce-scattered together, laid out in one flat buffer padded to a multiple of the
    N ranks (parallel/fsdp.py's flat_layout: weight-decay tensors first, a tied tensor once), of which rank r owns the
    shard [r·S, (r+1)·S), S = padded/N: the optimizer updates that part of the parameters only (P_os), from that part
    of the averaged gradient.

    flat (padded,): each parameter's .data is a view of it, so the model computes with the buffer and an all-gather
    into it updates the model; shard: rank r's slice of it; opt_params: what the optimizer updates, views of the
    shard split at the weight-decay boundary (fsdp.shard_parameters), each with .decay and .shard_range.
    grad_acc (padded,): the unsharded gradient, the reduce-scatter's input. Stage 1 keeps it for good: each
    parameter's .grad is a view of it, so backward accumulates into it directly (DDP's gradient_as_bucket_view,
    Megatron's grad buffer), and the reduce-scatter writes the averaged shard in place into its slice (grad_shard).
    Stage 2 builds it only in the synchronising backward, from the parameters' own gradients (freed as they are
    copied), reduce-scatters it into a new shard-sized grad_shard and frees it (P_g).
    Raises ValueError if the parameters do not share one dtype and device.
    """

    def __init__(self, name, named_params, comm, stage):
        self.name, self.stage = name, stage
        self.infos, self.params, self.numel = flat_layout(named_params)
        if len({(p.dtype, p.device) for p in self.params}) > 1:
            raise ValueError(f"ZeRO bucket {name}: its parameters have several dtypes or devices")
        N, r = comm.world_size, comm.rank
        self.shard_numel = math.ceil(self.numel / N)
        self.flat = torch.zeros(self.shard_numel * N, dtype=self.params[0].dtype, device=self.params[0].device)
        with torch.no_grad():
            for info, p in zip(self.infos, self.params):
                view = flat_view(self.flat, info)
                view.copy_(p)
                p.data = view  # the module's parameter now lives in the buffer
        self.shard = self.flat[r * self.shard_numel:(r + 1) * self.shard_numel]
        self.opt_params = shard_parameters(self.shard, self.infos, self.numel, r)
        self.grad_acc = torch.zeros_like(self.flat) if stage == 1 else None
        self.grad_shard, self.handle, self.ready = None, None, set()

    def start_accumulation(self):
        """Stage 1, before a step's first backward: zero the gradient buffer and point every .grad at its view."""
        if self.stage == 1:
            self.grad_acc.zero_()
            for info, p in zip(self.infos, self.params):
                p.grad = flat_view(self.grad_acc, info)

    def collect(self, i):
        """Stage 2, in the synchronising backward: move params[i]'s final gradient into the buffer (allocated by the
        bucket's first) and free it."""
        if self.stage == 2:
            if self.grad_acc is None:
                self.grad_acc = torch.zeros_like(self.flat)
            p = self.params[i]
            flat_view(self.grad_acc, self.infos[i]).copy_(p.grad)
            p.grad = None

    def reduce_scatter(self, comm):
        """Start the reduce-scatter (average over ranks) of grad_acc into this rank's grad_shard: stage 1 in place (the
        output is grad_acc's own slice, as NCCL allows), stage 2 into a new tensor."""
        r, S = comm.rank, self.shard_numel
        self.grad_shard = self.grad_acc[r * S:(r + 1) * S] if self.stage == 1 else torch.empty_like(self.shard)
        self.handle = comm.reduce_scatter(self.grad_shard, self.grad_acc, "avg", async_op=True)

    def finish(self):
        """Wait for the reduce-scatter and hand each optimizer view its part of grad_shard as .grad; stage 2 frees the
        unsharded gradient."""
        self.handle.wait()
        for p in self.opt_params:
            p.grad = self.grad_shard[p.shard_range[0]:p.shard_range[1]]
        if self.stage == 2:
            self.grad_acc = None
        self.grad_shard, self.handle, self.ready = None, None, set()


class ZeroDataParallel(nn.Module):
    """ZeRO stage 1 (optimizer-state partitioning, P_os) or 2 (and gradient partitioning, P_os+g) around `module`
    (Rajbhandari et al. 2020, section 5; the same as Megatron-LM's DistributedDataParallel with its distributed
    optimizer for stage 1, DeepSpeed's ZeRO stage 1/2 optimizer). Works for any nn.Module.

    module: identical in structure on every rank; its parameters move into the buckets' flat buffers (ZeroBucket),
    which are broadcast from rank 0, with its buffers, so every replica starts equal. comm: comm.Collectives over the
    data-parallel group. Buckets as DDP's (bucket_groups: reverse registration order, bucket_cap_mb), each padded to a
    multiple of N; `alone`: parameters that get a bucket of their own (a pipeline's tied embedding and head copies,
    whose shards are then laid out alike and summed shard by shard).

    One optimizer step:
    - forward/backward: micro-batches run inside no_sync() accumulate their gradients locally (stage 1: in the
      buffer); in the last one a post-accumulate-grad hook marks each gradient ready, and once all of a bucket's are,
      its reduce-scatter (average) is launched asynchronously, strictly in bucket order so every rank issues the same
      sequence, while backward goes on; `pre_reduce_scatter(bucket)`, if set, runs on bucket.grad_acc just before;
    - finish_gradient_sync(): waits for them; each optimizer view's .grad is then its part of the averaged shard;
    - the optimizer (e.g. AdamW over opt_params) updates this rank's shard of the parameters, in place in `flat`;
    - all_gather_params(): every bucket's shards are all-gathered in place into `flat`: every rank computes the next
      forward with the whole updated model. Call it after every optimizer step (gather_after_step does).
    Bytes per step, Ψ the elements of the padded buffers: reduce-scatter (N-1)/N·Ψ·4 and all-gather (N-1)/N·Ψ·4
    (fp32), as DDP's all-reduce together. Every parameter that requires grad must receive a gradient in the
    synchronising backward, or finish_gradient_sync() raises RuntimeError naming those that did not.
    """

    def __init__(self, module, comm, stage, bucket_cap_mb=25.0, alone=()):
        super().__init__()
        if stage not in (1, 2):
            raise ValueError(f"ZeroDataParallel: stage must be 1 or 2, got {stage!r}")
        self.module, self.comm, self.stage = module, comm, stage
        names = {}
        for name, p in module.named_parameters(remove_duplicate=False):
            names.setdefault(p, []).append(name)
        params = [p for p in module.parameters() if p.requires_grad]
        self.buckets = [ZeroBucket(f"bucket{i}", [(n, p) for p in group for n in names[p]], comm, stage)
                        for i, group in enumerate(bucket_groups(params, bucket_cap_mb, alone))]
        with torch.no_grad():
            for t in [*(b.flat for b in self.buckets), *module.buffers()]:
                comm.broadcast(t, src=0)
        self.require_sync = True
        self.pre_reduce_scatter = None  # callback(bucket) on its unsharded gradient before its reduce-scatter
        self.next_bucket = 0            # the next bucket to reduce; buckets go in order
        self.new_step = True            # the next forward with grad starts a step's accumulation
        for bucket in self.buckets:
            for i, p in enumerate(bucket.params):
                p.register_post_accumulate_grad_hook(functools.partial(self._on_grad_ready, bucket, i))
        self.opt_params = nn.ParameterList([p for b in self.buckets for p in b.opt_params])

    def forward(self, *args, **kwargs):
        if self.new_step and torch.is_grad_enabled():
            for bucket in self.buckets:
                bucket.start_accumulation()
            self.new_step = False
        return self.module(*args, **kwargs)

    def no_sync(self):
        """Accumulate gradients locally (no communication) for backward passes run inside this context."""
        return skipping_sync(self)

    def _on_grad_ready(self, bucket, i, param):
        """Post-accumulate-grad hook of bucket.params[i]: its gradient is final for this backward."""
        if not self.require_sync:
            return
        bucket.collect(i)
        bucket.ready.add(i)
        while self.next_bucket < len(self.buckets) and \
                len(self.buckets[self.next_bucket].ready) == len(self.buckets[self.next_bucket].params):
            bucket = self.buckets[self.next_bucket]
            if self.pre_reduce_scatter is not None:
                self.pre_reduce_scatter(bucket)
            bucket.reduce_scatter(self.comm)
            self.next_bucket += 1

    def finish_gradient_sync(self):
        """Wait for every bucket's reduce-scatter and give each optimizer view its averaged gradient shard."""
        if self.next_bucket < len(self.buckets):
            missing = [name for b in self.buckets for i, info in enumerate(b.infos) if i not in b.ready
                       for name in info["fqns"]]
            raise RuntimeError(f"ZeroDataParallel: parameters got no gradient in this backward: {missing}. "
                               f"Every parameter with requires_grad must take part in the loss.")
        for bucket in self.buckets:
            bucket.finish()
        self.next_bucket, self.new_step = 0, True

    @torch.no_grad()
    def all_gather_params(self):
        """After the optimizer step: all-gather every bucket's updated shard in place into its flat buffer (the
        parameters), all buckets in flight at once."""
        for handle in [self.comm.all_gather(b.flat, b.shard, async_op=True) for b in self.buckets]:
            handle.wait()

    def gathered_bytes(self):
        """Bytes of unsharded gradient buffers still allocated besides the shards' (stage 2; 0 between steps)."""
        return sum(b.grad_acc.nbytes for b in self.buckets if self.stage == 2 and b.grad_acc is not None)

    # the flat-shard interface of parallel/fsdp.py's FullyShardedDataParallel: checkpoints and the gradient norm

    def all_units(self):
        return self.buckets

    def bucket_of(self, param):
        """The bucket that holds `param` (a parameter of the module)."""
        return next(b for b in self.buckets if any(p is param for p in b.params))

    def gradient_pieces(self):
        """(parameter name, the part of its gradient inside this rank's shard) of every bucket."""
        return flat_gradient_pieces(self.buckets, self.comm.rank)

    def gather_full(self, bucket, flat_shard):
        return gather_flat(bucket, flat_shard, self.comm)

    def shard_of(self, bucket, full_by_name):
        return scatter_flat(bucket, full_by_name, self.comm.rank, self.comm.world_size)


def gather_after_step(optimizer, wrappers):
    """Complete ZeRO's optimizer step inside optimizer.step(), which is what train.py calls: a step post-hook
    (torch.optim.Optimizer.register_step_post_hook) all-gathers the updated parameters of every ZeroDataParallel in
    `wrappers`. A step that GradScaler skips runs no hook, and has nothing to gather. Returns `optimizer`."""
    def all_gather(opt, args, kwargs):
        for wrapper in wrappers:
            wrapper.all_gather_params()
    optimizer.register_step_post_hook(all_gather)
    return optimizer


class CustomZero(Strategy):
    """ZeRO-1 or ZeRO-2 (cfg.zero_stage): our ZeroDataParallel around the GPT, AdamW over this rank's shard of every
    bucket, the parameter all-gather in the optimizer's step post-hook (gather_after_step). The gradient norm sums
    each rank's shard (every element counted once). Checkpoints: DCP, each parameter and moment a DTensor Shard(0)
    over the ranks (FSDP's layout, parallel/fsdp.py's flat_state), so they load on any world size and into any
    strategy (fsdp, 3d, ddp and single through the one-file conversion)."""

    strategy = "ddp"
    sharded = True

    def __init__(self, cfg, device):
        super().__init__(cfg, device)
        self.zero_stage = check_zero_stage(cfg, custom=True)
        self.use_grid({"dp": self.world_size, "pp": 1, "cp": 1, "tp": 1})

    def build_model(self, model_config, weights=None):
        model = super().build_model(model_config, weights)
        self.module = ZeroDataParallel(model, self.collectives(), self.zero_stage, self.cfg.bucket_cap_mb)
        return model

    def named_parameters(self):
        return [(bucket.name, p) for bucket in self.module.buckets for p in bucket.opt_params]

    def configure_optimizer(self):
        return gather_after_step(super().configure_optimizer(), [self.module])

    def gradients(self):
        return [(p.grad, True) for _, p in self.named_parameters() if p.grad is not None]  # each element in one shard

    def global_tensor(self, name, full):
        return distribute_tensor(full, self.grid.mesh["dp"], [Shard(0)], src_data_rank=None)

    def state_dict(self, optimizer):
        return flat_state(self.module, optimizer, self.global_tensor)

    def load_state_dict(self, state, optimizer):
        load_flat_state(self.module, state, optimizer, DTensor.full_tensor)
        self.module.all_gather_params()


# ----------------------------------------------------------------------------------------------------------
# the ddp strategy: for each variant, the class of the ZeRO stage

@register("ddp", "pytorch")
def pytorch_ddp(cfg, device):
    """ddp/pytorch at cfg.zero_stage: 0 PytorchDDP, 1 PytorchZero1, 2 PytorchZero2."""
    return (PytorchDDP, PytorchZero1, PytorchZero2)[check_zero_stage(cfg)](cfg, device)


@register("ddp", "custom", "triton", "nccl", "cuda")
def custom_ddp(cfg, device):
    """ddp/custom (and triton, nccl, cuda) at cfg.zero_stage: 0 CustomDDP, 1 and 2 CustomZero."""
    return (CustomDDP, CustomZero, CustomZero)[check_zero_stage(cfg, custom=True)](cfg, device)
