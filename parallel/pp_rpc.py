"""
Pipeline parallelism over torch.distributed.rpc: the `rpc` variant of parallel/pp.py's strategy. GPipe driven by
rank 0: each rank holds its stages (pp.py's split and meta build) behind RRefs, activations go from owner to owner
(`rpc.remote`, `to_here`), the backward is `dist_autograd.backward`, and each owner copies the gradients of the
distributed-autograd context into .grad, so clipping and the optimizer step are those of the other variants.

    torchrun --standalone --nproc_per_node=2 train.py config/train_shakespeare_char_pp_rpc_cpu.py

Pitfalls met on torch 2.13, and what the code does about them:
- under torchrun, `init_rpc` with a tcp:// address on another port hangs (every rank a client of a store nobody
  hosts): env:// joins torchrun's store (`_rpc_init_method`);
- the RRef proxy's rpc_async() sends from a thread outside the distributed-autograd context, so gradients silently
  never arrive: the driver calls stages through `_call` with rpc.remote / rpc.rpc_async;
- RPC cannot really restart in one process (RRefs fail after shutdown()): one agent per process, shut down by
  the strategy's close() before teardown;
- a stage must not run a micro-batch before its rank reset its timeline: the step starts with a barrier
  (pp.Pipeline.step).
"""

import os
import socket
import threading
import time

import torch
import torch.distributed as dist
import torch.distributed.autograd as dist_autograd
import torch.distributed.rpc as rpc

from parallel import register
from parallel.pp import Pipeline, PipelineParallel, cross_entropy, stage_rank

_RPC = {"state": "off"}  # this process's RPC agent: "off" -> "running" -> "shut down" (it cannot be restarted)
_RPC_STAGES = {}  # stage index -> RemoteStage of this process: what the driver's RRefs point to


def shutdown_rpc(timeout_s):
    """rpc.shutdown(graceful=True) if this process's RPC agent is running: waits (at most timeout_s seconds) for
    every rank's agent, so every rank calls it. No rpc strategy can be built in this process afterwards."""
    if _RPC["state"] == "running":
        rpc.shutdown(graceful=True, timeout=timeout_s)
        _RPC["state"] = "shut down"


def _remote_stage(stage):
    """Run on the stage's owner by rpc.remote: its RemoteStage (the driver gets an RRef to it)."""
    return _RPC_STAGES[stage]


def _call(rref, method, *args):
    """Run on the owner of `rref`: rref.local_value().method(*args). The driver calls the stages through this with
    rpc.remote / rpc.rpc_async rather than the RRef proxies (rref.rpc_async().method): the proxy's rpc_async issues
    the call from a future's callback thread, outside the caller's thread-local distributed-autograd context, so
    nothing is recorded for backward (torch 2.13: the losses came back as leaves and no stage got a gradient)."""
    return getattr(rref.local_value(), method)(*args)


class _OnBackward(torch.autograd.Function):
    """Identity whose backward first calls `fn()`: marks the moment a gradient reaches a tensor."""

    @staticmethod
    def forward(ctx, x, fn):
        ctx.fn = fn
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        ctx.fn()
        return grad, None


class RemoteStage:
    """One virtual stage as the driver sees it through an RRef, living on the rank that owns it (PyTorch tutorial
    "Distributed Pipeline Parallelism Using RPC": a shard whose forward takes an RRef of its input).
    forward(x_rref, mb, y=None): pulls the input from wherever it lives (x_rref.to_here(): token ids (B, T) for the
    first stage, activations (B, T, n_embd) from the previous stage's owner otherwise), runs the stage and returns
    its output, or the micro-batch's mean cross-entropy (0-dim) on the last stage (given targets y (B, T)).
    Called from RPC threads: autocast is re-entered (it is thread-local) and a lock runs one micro-batch at a
    time, as a pipeline stage does. Records F, and B through markers on the output and the input (first stage:
    the embeddings' output), in the strategy's timeline."""

    def __init__(self, pipeline, stage):
        self.pipeline, self.stage, self.module = pipeline, stage, pipeline.modules[stage]
        self.lock = threading.Lock()

    def forward(self, x_rref, mb, y=None):
        x = x_rref.to_here()
        record, times = self.pipeline._record, {}

        def backward_starts():
            times["B"] = time.perf_counter()

        def backward_ends():
            record("B", self.stage, mb, times.pop("B", time.perf_counter()))

        with self.lock:
            start, hook = time.perf_counter(), None
            if x.is_floating_point():
                x = _OnBackward.apply(x, backward_ends)
            else:  # the first stage: mark the embeddings' output (what remains after it is a lookup)
                hook = self.module.transformer.drop.register_forward_hook(
                    lambda module, args, out: _OnBackward.apply(out, backward_ends))
            try:
                with self.pipeline.autocast():
                    out = self.module(x)
                    if y is not None:
                        out = cross_entropy(out, y)
            finally:
                if hook is not None:
                    hook.remove()
            record("F", self.stage, mb, start)
        return _OnBackward.apply(out, backward_starts)

    def take_gradients(self, context_id):
        """Copy this stage's gradients of distributed-autograd context `context_id` into the parameters' .grad
        (so clipping and optimizer.step run as for the other variants)."""
        grads = dist_autograd.get_gradients(context_id)
        for p in self.module.parameters():
            if p in grads:
                p.grad = grads[p].clone() if p.grad is None else p.grad + grads[p]


class RpcPipeline(Pipeline):
    """GPipe over torch.distributed.rpc, the oldest PyTorch way to pipeline. Every rank builds its own stages (the
    split and meta-device build of the other variants) and runs an RPC agent ("pp<rank>"); rank 0, the driver,
    holds an RRef to every RemoteStage. One step, on the driver, inside a distributed-autograd context: for each
    micro-batch, stage s's forward is an rpc to its owner (rpc.remote, the last stage rpc_async), whose result
    stays there as an RRef until the next stage's owner pulls it (to_here), so activations go owner to owner and
    the m micro-batches flow through the stages concurrently; the loss is the mean of the m futures' losses;
    `dist_autograd.backward` runs the backward across ranks (GPipe: all forwards, then all backwards); each stage
    owner then copies the context's gradients into .grad (`take_gradients`). The other ranks' main threads wait
    in the step for rank 0's broadcast of the losses, which says the step is done. Only pp_schedule="gpipe", one
    stage per rank.

    One RPC agent per process, started by the first pipeline built and shut down by the strategy's close() (on every
    rank, before teardown; train.py calls it): torch 2.13 re-initialises RPC after rpc.shutdown(), but RRefs then
    fail ("RPC is no longer running on this node"; cf. pytorch issue 46491), so later strategies of the same process
    reuse it. torch 2.13 still ships torch.distributed.rpc (TensorPipe backend), though PyTorch no longer develops
    it; torch.distributed.pipelining replaced its pipeline (torch.distributed.pipeline.sync.Pipe, removed in 2.4)."""

    def __init__(self, strategy, stages, modules, parameters, seq_split=1):
        super().__init__(strategy, stages, modules, parameters, seq_split)
        _RPC_STAGES.clear()
        _RPC_STAGES.update({s: RemoteStage(self, s) for s in self.my_stages})
        if _RPC["state"] == "off":
            options = rpc.TensorPipeRpcBackendOptions(rpc_timeout=strategy.cfg.timeout_s,
                                                      init_method=_rpc_init_method(strategy.rank))
            rpc.init_rpc(f"pp{strategy.rank}", rank=strategy.rank, world_size=strategy.world_size,
                         rpc_backend_options=options)
            _RPC["state"] = "running"
        self.comm.barrier()  # every rank's stages are registered before the driver asks for them
        ranks = dist.get_process_group_ranks(self.group)
        self.owners = [f"pp{ranks[stage_rank(s, self.pp_size)]}" for s in range(self.n_stages)]
        self.stage_rrefs = None
        if self.pp_rank == 0:
            self.stage_rrefs = [rpc.remote(owner, _remote_stage, args=(s,)) for s, owner in enumerate(self.owners)]

    def _run(self, batches):
        m, S = len(batches), self.n_stages
        losses = torch.zeros(m, device=self.device)
        self.comm.barrier()  # every rank has reset its timeline (Pipeline.step) before the driver's calls arrive
        if self.pp_rank == 0:
            with dist_autograd.context() as context_id:
                futures = []
                for mb, (x, y) in enumerate(batches):
                    ref = rpc.RRef(x)
                    for s in range(S - 1):
                        ref = rpc.remote(self.owners[s], _call, args=(self.stage_rrefs[s], "forward", ref, mb))
                    futures.append(rpc.rpc_async(self.owners[S - 1], _call,
                                                 args=(self.stage_rrefs[S - 1], "forward", ref, mb, y)))
                mb_losses = torch.futures.wait_all(futures)
                dist_autograd.backward(context_id, [torch.stack(mb_losses).mean()])
                torch.futures.wait_all([rpc.rpc_async(owner, _call, args=(rref, "take_gradients", context_id))
                                        for owner, rref in zip(self.owners, self.stage_rrefs)])
            losses.copy_(torch.stack(mb_losses).detach().float())
        self.comm.broadcast(losses, src=0)  # the other ranks wait here while their RPC threads work
        return list(losses) if S - 1 in self.my_stages else None


def _rpc_init_method(rank):
    """Where the RPC agent's rendezvous finds its store. Under torchrun, "env://": torchrun's agent hosts a store on
    MASTER_PORT and every rank joins it as a client (TORCHELASTIC_USE_AGENT_STORE=True). Any other launcher: rank 0
    already hosts the process group's store on MASTER_PORT (env:// would fail there with EADDRINUSE), so it picks a
    free port for a second one and broadcasts it. A tcp:// address under torchrun would hang: every rank connects to
    it as a client and nobody listens."""
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True":
        return "env://"
    port = torch.zeros((), dtype=torch.int64)
    if rank == 0:
        with socket.socket() as s:
            s.bind(("", 0))
            port.fill_(s.getsockname()[1])
    dist.broadcast(port, src=0)
    return f"tcp://{os.environ.get('MASTER_ADDR', 'localhost')}:{int(port)}"


@register("pp", "rpc")
class RpcPipelineParallel(PipelineParallel):
    """pp.py's one pipeline over the world, run by RpcPipeline; close() shuts this process's RPC agent down."""

    def __init__(self, cfg, device):
        if _RPC["state"] == "shut down":
            raise ValueError("parallel=pp variant=rpc: this process's RPC agent was shut down (close()); "
                             "torch.distributed.rpc cannot be restarted in the same process")
        super().__init__(cfg, device)

    runner = RpcPipeline

    def close(self):
        """Shut this process's RPC agent down (shutdown_rpc): on every rank, once no rpc strategy will run again."""
        if self.pipeline is not None:
            self.pipeline.stage_rrefs = None
        shutdown_rpc(self.cfg.timeout_s)
