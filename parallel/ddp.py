"""
Distributed data parallel: every rank holds the whole model, reads its own slice of the global batch, and the
gradients are averaged over ranks before the optimizer step, so every rank takes the same step a single device
would take on the whole global batch.

Communication per optimizer step: one all-reduce of all Ψ gradients, i.e. 2·(N-1)/N · Ψ · 4 bytes sent per
rank in fp32 with a ring algorithm; none inside `no_sync` (gradient accumulation). PyTorch DDP paper:
Li et al. 2020, "PyTorch Distributed: Experiences on Accelerating Data Parallel Training" (VLDB), sections 3.2
(gradient bucketing, overlap with backward) and 3.2.4 (no_sync).

Two variants, top to bottom:
- `pytorch`: torch.nn.parallel.DistributedDataParallel, accumulation under `no_sync` (`apply_ddp`); for tensor-parallel
             (DTensor) parameters, FSDP2's replicate (`apply_replicate`, what parallel/3d.py composes).
- `custom`:  the same algorithm written out: broadcast the initial parameters from rank 0, gradient buckets filled
             in reverse registration order, an async all-reduce launched from post-accumulate-grad hooks as soon
             as a bucket is full (communication overlaps the rest of backward), wait at the end, average.
"""

import functools

import torch
import torch.nn as nn
from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook
from torch.nn.parallel import DistributedDataParallel as DDP

from parallel import Strategy, register, skipping_sync

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


@register("ddp", "pytorch")
class PytorchDDP(Strategy):
    """DistributedDataParallel around the GPT (apply_ddp)."""

    def build_model(self, model_config, weights=None):
        model = super().build_model(model_config, weights)
        self.module = apply_ddp(model, None, self.stats, self.cfg.bucket_cap_mb, self.device)
        return model


# ----------------------------------------------------------------------------------------------------------
# custom variant


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
    is divided by the world size and its all-reduce (a sum, hence the average) is launched asynchronously, strictly in bucket order so every rank
    issues the same sequence of collectives, while backward goes on computing the next gradients.
    finish_gradient_sync() waits for them and points each parameter's .grad at the averaged result.
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
        self.buckets, current, size = [], [], 0
        for p in reversed(params):
            current.append(p)
            size += p.numel() * p.element_size()
            if size >= bucket_cap_mb * 2**20:
                self.buckets.append(Bucket(current))
                current, size = [], 0
        if current:
            self.buckets.append(Bucket(current))
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


@register("ddp", "custom", "triton", "nccl")
class CustomDDP(Strategy):
    """Our DataParallel around the GPT, over the Collectives of this variant (comm.py, kernels/)."""

    def build_model(self, model_config, weights=None):
        model = super().build_model(model_config, weights)
        self.module = DataParallel(model, self.collectives(), self.cfg.bucket_cap_mb)
        return model
