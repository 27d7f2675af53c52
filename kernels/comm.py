"""
The Collectives interface that the custom algorithms call, its torch.distributed (c10d) backend, byte counting,
and the process-group start-up and teardown every torchrun entry point uses.

A leaf: it imports nothing of this project. parallel/ (the strategies) and kernels/ (the triton and nccl backends)
both import it; parallel/ picks the backend by variant (parallel.Strategy.collectives).

A strategy's `custom` variant is written once against `Collectives`; the `triton` and `nccl` variants hand the
same algorithm another backend (kernels/triton_comm.py, kernels/nccl.py). A backend subclasses Collectives and
implements the underscored primitives; the public methods count bytes the same way for every backend.

Every collective works on one process group and takes group-local ranks (0..world_size-1) for src/dst.
With async_op=True a call returns a handle whose .wait() blocks until the result is in place
(torch.distributed.Work for this backend); with async_op=False it returns None when the result is ready.

Byte counting follows nccl-tests (doc/PERFORMANCE.md): for a collective over N ranks on S bytes, the payload is S
(for all_gather the gathered output, for reduce_scatter the unreduced input) and the bus bytes, what one rank
sends over its link in a ring algorithm, are S * factor with factor 2(N-1)/N for all-reduce, (N-1)/N for
all-gather and reduce-scatter, 1 for broadcast and point-to-point. For all-to-all the payload is this rank's input
and the bus bytes are what it sends to the other ranks (its own chunk stays): S(N-1)/N for equal chunks, as
nccl-tests' alltoall counts, and the exact sum of the other ranks' chunks for uneven ones.
"""

import gc
import os
import sys
import traceback
from collections import Counter
from datetime import timedelta

import torch
import torch.distributed as dist

# torch 2.13 names all_gather_into_tensor / reduce_scatter_tensor all_gather_single / reduce_scatter_single
# (the old names warn); older torch (e.g. 2.11 on a lent GPU machine) has only the old names.
all_gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
reduce_scatter_single = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor

BUS_FACTOR = {
    "all_reduce": lambda n: 2 * (n - 1) / n,
    "all_gather": lambda n: (n - 1) / n,
    "reduce_scatter": lambda n: (n - 1) / n,
    "all_to_all": lambda n: (n - 1) / n,
    "broadcast": lambda n: 1.0,
    "send": lambda n: 1.0,
    "recv": lambda n: 1.0,
}


class CommStats:
    """What one rank moved, per collective type: `calls`, `payload` bytes and `bus` bytes (Counters keyed by
    the names in BUS_FACTOR). Several Collectives (one per process group) may share one CommStats."""

    def __init__(self):
        self.reset()

    def reset(self):
        self.calls, self.payload, self.bus = Counter(), Counter(), Counter()

    def record(self, op, nbytes, group_size, bus=None):
        """Count one `op` on a payload of `nbytes` bytes over `group_size` ranks; `bus`: the bytes this rank sends,
        where BUS_FACTOR's ring formula does not say (an uneven all-to-all)."""
        self.calls[op] += 1
        self.payload[op] += nbytes
        self.bus[op] += nbytes * BUS_FACTOR[op](group_size) if bus is None else bus

    def as_dict(self):
        """Flat dict for logging: {"comm/all_reduce_calls": ..., "comm/all_reduce_payload_bytes": ..., ...}."""
        out = {}
        for op in self.calls:
            out[f"comm/{op}_calls"] = self.calls[op]
            out[f"comm/{op}_payload_bytes"] = self.payload[op]
            out[f"comm/{op}_bus_bytes"] = self.bus[op]
        return out


class Collectives:
    """The collectives a custom parallel algorithm may call, on one process group, with byte counting.

    Tensors are modified in place (all_reduce, broadcast, recv) or written into `output`:
    - all_reduce(t, op): t <- op over ranks of t; op in {"sum", "avg", "max"}.
    - all_gather(output, input): output (N*n, ...) <- concatenation along dim 0 of every rank's input (n, ...).
    - reduce_scatter(output, input, op): output (n, ...) <- this rank's slice of op over ranks of input (N*n, ...).
    - all_to_all(output, input, output_split_sizes, input_split_sizes): input's rows are split into N chunks along
      dim 0 (input_split_sizes rows each, or equal chunks when None) and chunk j is sent to rank j; output receives
      the chunks every rank sent to this one, in rank order (output_split_sizes rows from each, or equal chunks).
    - broadcast(t, src): t <- src's t.   send(t, dst) / recv(t, src): point-to-point.   barrier().
    Mirrors torch.distributed's all_reduce, all_gather_into_tensor, reduce_scatter_tensor, all_to_all_single,
    broadcast, send, recv.
    """

    def __init__(self, group=None, stats=None):
        self.group = group
        self.rank = dist.get_rank(group)
        self.world_size = dist.get_world_size(group)
        self.stats = stats if stats is not None else CommStats()

    def _count(self, op, tensor):
        self.stats.record(op, tensor.numel() * tensor.element_size(), self.world_size)

    def all_reduce(self, tensor, op="sum", async_op=False):
        self._count("all_reduce", tensor)
        return self._all_reduce(tensor, op, async_op)

    def all_gather(self, output, input, async_op=False):
        if output.numel() != input.numel() * self.world_size:
            raise ValueError(f"all_gather: output has {output.numel()} elements, "
                             f"expected {self.world_size} x {input.numel()}")
        self._count("all_gather", output)
        return self._all_gather(output, input, async_op)

    def reduce_scatter(self, output, input, op="sum", async_op=False):
        if input.numel() != output.numel() * self.world_size:
            raise ValueError(f"reduce_scatter: input has {input.numel()} elements, "
                             f"expected {self.world_size} x {output.numel()}")
        self._count("reduce_scatter", input)
        return self._reduce_scatter(output, input, op, async_op)

    def all_to_all(self, output, input, output_split_sizes=None, input_split_sizes=None, async_op=False):
        n = self.world_size
        for name, t, splits in (("input", input, input_split_sizes), ("output", output, output_split_sizes)):
            rows = t.shape[0] if t.dim() else 0
            if splits is None and rows % n:
                raise ValueError(f"all_to_all: {name} has {rows} rows, not divisible into {n} equal chunks")
            if splits is not None and (len(splits) != n or sum(splits) != rows or min(splits) < 0):
                raise ValueError(f"all_to_all: {name}_split_sizes {list(splits)} must be {n} sizes >= 0 summing to "
                                 f"its {rows} rows")
        row_bytes = input[0].numel() * input.element_size() if input.shape[0] else 0
        mine = input_split_sizes[self.rank] if input_split_sizes is not None else input.shape[0] // n
        self.stats.record("all_to_all", input.numel() * input.element_size(), n,
                          bus=(input.shape[0] - mine) * row_bytes)
        return self._all_to_all(output, input, output_split_sizes, input_split_sizes, async_op)

    def broadcast(self, tensor, src, async_op=False):
        self._count("broadcast", tensor)
        return self._broadcast(tensor, src, async_op)

    def send(self, tensor, dst, async_op=False):
        self._count("send", tensor)
        return self._send(tensor, dst, async_op)

    def recv(self, tensor, src, async_op=False):
        self._count("recv", tensor)
        return self._recv(tensor, src, async_op)

    def barrier(self):
        self._barrier()


class _Done:
    """The handle of an async call whose result is already in place."""

    def wait(self, timeout=None):
        return True

    def is_completed(self):
        return True


class TorchCollectives(Collectives):
    """Collectives through torch.distributed (c10d): gloo on CPU, NCCL on CUDA, whatever the group uses."""

    OPS = {"sum": dist.ReduceOp.SUM, "avg": dist.ReduceOp.AVG, "max": dist.ReduceOp.MAX}

    def __init__(self, group=None, stats=None):
        super().__init__(group, stats)
        self._connected = set()  # peers whose point-to-point channels are connected (_connect)

    def _all_reduce(self, tensor, op, async_op):
        return dist.all_reduce(tensor, self.OPS[op], group=self.group, async_op=async_op)

    def _all_gather(self, output, input, async_op):
        return all_gather_single(output, input, group=self.group, async_op=async_op)

    def _reduce_scatter(self, output, input, op, async_op):
        return reduce_scatter_single(output, input, self.OPS[op], group=self.group, async_op=async_op)

    def _all_to_all(self, output, input, output_split_sizes, input_split_sizes, async_op):
        # gloo's all_to_all_single writes a non-contiguous output as if it were contiguous (torch 2.13): through a
        # contiguous copy, copied back once the exchange is done
        out = output if output.is_contiguous() else torch.empty_like(output, memory_format=torch.contiguous_format)
        work = dist.all_to_all_single(out, input.contiguous(), output_split_sizes, input_split_sizes,
                                      group=self.group, async_op=async_op or out is not output)
        if out is output:
            return work
        work.wait()
        output.copy_(out)
        return _Done() if async_op else None

    def _broadcast(self, tensor, src, async_op):
        return dist.broadcast(tensor, group=self.group, group_src=src, async_op=async_op)

    def _connect(self, peer, device):
        """Connect NCCL's point-to-point channels with `peer` one direction at a time, before the first message to or
        from it. NCCL sets up each direction lazily, when first used; ring attention's isend and irecv, issued at once
        on both ranks, set up both directions concurrently, which failed on the H200 (torch 2.11, NCCL 2.28, two ranks
        sharing the GPU: "ncclSocketInit: connecting to address with family 1"). Here the lower rank sends 4 bytes
        and then receives, the higher one receives and then sends: both sides at their first message to each other,
        which is the same point of their matched message order (not counted: bookkeeping). gloo needs nothing."""
        if device.type == "cpu" or peer in self._connected:
            return
        self._connected.add(peer)
        token = torch.zeros(1, device=device)
        first, second = (dist.send, dist.recv) if self.rank < peer else (dist.recv, dist.send)
        for op in (first, second):
            op(token, group=self.group, **({"group_dst": peer} if op is dist.send else {"group_src": peer}))

    def _send(self, tensor, dst, async_op):
        self._connect(dst, tensor.device)
        if async_op:
            return dist.isend(tensor, group=self.group, group_dst=dst)
        dist.send(tensor, group=self.group, group_dst=dst)

    def _recv(self, tensor, src, async_op):
        self._connect(src, tensor.device)
        if async_op:
            return dist.irecv(tensor, group=self.group, group_src=src)
        dist.recv(tensor, group=self.group, group_src=src)

    def _barrier(self):
        dist.barrier(group=self.group)


# -----------------------------------------------------------------------------
# process group start-up and teardown

SHARE_GPU_ENV = "NANOPARALLEL_SHARE_GPU"


def init_distributed(timeout_s=300):
    """Start the default process group if launched by torchrun (WORLD_SIZE set), else do nothing.

    Backend: on a GPU machine "cpu:gloo,cuda:nccl", torch's NCCL for CUDA tensors and gloo for CPU ones (a DCP
    checkpoint's CPU metadata, objects), one GPU per local rank; gloo otherwise. Returns this rank's torch.device
    (cuda:i, cuda, or cpu). Every collective on CUDA tensors outside a strategy's own Collectives (DTensor
    bookkeeping, full_state_dict, DCP, eval and logging means, the RNG-state gather, the preemption agreement) thus
    goes through torch's NCCL, in every variant; the collectives of the training step are the variant's own
    (comm.TorchCollectives, kernels/triton_comm.py, kernels/nccl.py), counted in CommStats. No CUDA tensor goes
    through gloo (check_backend_serves).

    More ranks on a node than GPUs: a ValueError (one line), unless NANOPARALLEL_SHARE_GPU=1 lets ranks share the
    GPUs (share_gpus: for tests and one-GPU machines, not for speed). timeout_s bounds every collective, so a rank
    that dies makes the others fail instead of hanging forever: every group, mesh dimensions' included
    (set_default_group_timeout). Under a one-node torchrun the store is scoped to the attempt (restart_safe_store),
    so a job restarted by --max-restarts starts cleanly.
    """
    global _timeout_s
    cuda = torch.cuda.is_available()
    if "WORLD_SIZE" not in os.environ:
        return torch.device("cuda" if cuda else "cpu")
    device = torch.device("cpu")
    if cuda:
        device = cuda_device()
        torch.cuda.set_device(device)
    if not dist.is_initialized():  # started already: a test running train.main several times in one process group
        store = restart_safe_store(timedelta(seconds=timeout_s))
        where = {} if store is None else {"store": store, "rank": int(os.environ["RANK"]),
                                          "world_size": int(os.environ["WORLD_SIZE"])}
        dist.init_process_group("cpu:gloo,cuda:nccl" if cuda else "gloo", timeout=timedelta(seconds=timeout_s),
                                **where)
    set_default_group_timeout(timedelta(seconds=timeout_s))
    _timeout_s = timeout_s
    return device


def cuda_device():
    """This rank's GPU under torchrun: cuda:LOCAL_RANK, where the node has a GPU per local rank; with more local ranks
    than GPUs and NANOPARALLEL_SHARE_GPU=1, cuda:(LOCAL_RANK mod GPUs), after share_gpus; else ValueError."""
    local_rank, local_world = int(os.environ["LOCAL_RANK"]), int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    gpus = torch.cuda.device_count()
    if local_world <= gpus:
        return torch.device("cuda", local_rank)
    if os.environ.get(SHARE_GPU_ENV) != "1":
        raise ValueError(f"{local_world} ranks on this node but {gpus} GPU(s): launch at most {gpus} per node, or set "
                         f"{SHARE_GPU_ENV}=1 to let ranks share GPUs (for tests and one-GPU machines; slow)")
    share_gpus(local_world, gpus)
    return torch.device("cuda", local_rank % gpus)


def share_gpus(local_world, gpus):
    """Let several ranks of this node use one GPU: NCCL refuses two ranks on one device unless they believe they are
    on different hosts, so each rank gets its own NCCL_HOSTID (its traffic then takes NCCL's network transport, not
    NVLink); torch's CUDA symmetric memory (the triton backend's heap) refuses overlapping devices unless
    TORCH_SYMM_MEM_ALLOW_OVERLAPPING_DEVICES=1. Set before any communicator exists; rank 0 says so in the log."""
    import socket
    os.environ["NCCL_HOSTID"] = f"{socket.gethostname()}-nanoparallel-rank{os.environ['RANK']}"
    os.environ["TORCH_SYMM_MEM_ALLOW_OVERLAPPING_DEVICES"] = "1"
    if os.environ.get("RANK") == "0":
        print(f"note: {local_world} ranks share {gpus} GPU(s) on this node ({SHARE_GPU_ENV}=1): an NCCL_HOSTID per "
              f"rank, so NCCL moves data over its network transport; for tests, not for speed", flush=True)


def check_backend_serves(device, group=None):
    """Raise ValueError (one line) if `group` (None: the default group) would run collectives on `device`'s tensors
    through gloo while the device is a GPU. gloo's CUDA path is not what a GPU run should use, and DTensor's
    redistributions of CUDA tensors over a gloo-only group crashed (SIGSEGV in wait_tensor on torch 2.11):
    init_distributed's group gives CUDA tensors to NCCL. Strategy.__init__ checks the group its DTensors and
    torch collectives will use, before any collective."""
    if device.type == "cpu" or not dist.is_initialized():
        return
    config = dist.get_backend_config(group)  # e.g. "cpu:gloo,cuda:nccl", or "cpu:gloo,cuda:gloo" for a gloo group
    backends = dict(item.split(":", 1) for item in config.split(",") if ":" in item)
    if backends.get(device.type, config) == "gloo":
        raise ValueError(f"the process group ({config}) runs {device.type} tensors through gloo: start it with "
                         f"comm.init_distributed, which gives {device.type} tensors to NCCL")


_timeout_s = None  # init_distributed's timeout, for describe_comm_error


def restart_safe_store(timeout):
    """The store for init_process_group under a one-node torchrun, scoped to this attempt; None (torch's env://
    default) otherwise.

    torchrun (2.13) hands every attempt of a job the same TCPStore (the agent's; TORCHELASTIC_USE_AGENT_STORE) with
    no per-attempt prefix (pytorch issue 135712), so after a restart a rank could read a dead rank's address from the
    previous attempt's keys and fail to connect: measured here, a restarted 2-rank gloo job failed in init this way.
    One agent restarts all its workers together, so TORCHELASTIC_RESTART_COUNT names the attempt consistently and
    the store is prefixed with it. Several nodes' agents count restarts separately: there, run torchrun with
    TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 (a fresh store per attempt; docs/checkpoints.md's Slurm script does).
    """
    env = os.environ
    if env.get("TORCHELASTIC_USE_AGENT_STORE") != "True":
        return None
    if env.get("GROUP_WORLD_SIZE", "1") != "1":
        if int(env.get("TORCHELASTIC_MAX_RESTARTS", "0")) > 0 and env.get("RANK") == "0":
            print("warning: torchrun --max-restarts on several nodes shares one TCPStore across restarts (pytorch "
                  "issue 135712): set TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 for torchrun", file=sys.stderr)
        return None
    store = dist.TCPStore(env["MASTER_ADDR"], int(env["MASTER_PORT"]), int(env["WORLD_SIZE"]), is_master=False,
                          timeout=timeout)
    return dist.PrefixStore(f"nanoparallel/attempt_{env.get('TORCHELASTIC_RESTART_COUNT', '0')}", store)


def set_default_group_timeout(timeout):
    """Make every process group created from now on (dist.new_group, a DeviceMesh's dimension groups, DCP's
    background group) time out after `timeout` as the default group does.

    torch 2.13's new_group(timeout=None), which init_device_mesh calls, takes c10d's module default (30 minutes
    for gloo), not init_process_group's timeout: a rank stalled in a mesh dimension's collective hung the others
    for 30 minutes. No public API changes that default, so this assigns the module globals that c10d's
    `_get_default_timeout` reads (the one such access, isolated here; NCCL's only where this build has NCCL).
    """
    import torch.distributed.distributed_c10d as c10d
    c10d.default_pg_timeout = timeout
    if isinstance(getattr(c10d, "default_pg_nccl_timeout", None), timedelta):
        c10d.default_pg_nccl_timeout = timeout


TIMEOUT_WORDS = ("timed out", "timeout")
PEER_GONE_WORDS = ("connection closed", "connection reset", "broken pipe", "closed by peer", "communicator was aborted",
                   "socket closed")


def describe_comm_error(error):
    """One line for a collective that failed because a peer stalled or died, or None for any other error.

    error: an exception raised on this rank (gloo raises RuntimeError, NCCL DistBackendError, a subclass). The
    collective is named from the traceback (the innermost torch.distributed function, e.g. all_reduce, recv,
    barrier) with this project's function that called it; the timeout is init_distributed's timeout_s. An error
    raised from such a failure (torch.distributed.pipelining re-raises it as "failed to run forward") counts too.
    """
    seen = []
    while error is not None and error not in seen:  # the error itself, or what it was raised from (pipelining wraps)
        seen.append(error)
        message = str(error).strip()
        lower = message.lower()
        if isinstance(error, RuntimeError) and any(w in lower for w in TIMEOUT_WORDS + PEER_GONE_WORDS):
            break
        error = error.__cause__ or error.__context__
    else:
        return None
    frames = traceback.extract_tb(error.__traceback__)
    in_torch = [f for f in frames if f"{os.sep}torch{os.sep}distributed{os.sep}" in f.filename
                and f.name not in ("wrapper", "inner", "_fn")]
    ours = [f for f in frames if f"{os.sep}site-packages{os.sep}" not in f.filename]
    if not in_torch:
        return None
    op = in_torch[-1].name
    where = f" (called from {os.path.basename(ours[-1].filename)}:{ours[-1].name})" if ours else ""
    detail = message.splitlines()[0]
    detail = detail[detail.rfind("] ") + 2:] if detail.startswith("[") and "] " in detail else detail
    if any(w in lower for w in TIMEOUT_WORDS):
        return (f"collective {op}{where} timed out after timeout_s={_timeout_s} s ({detail}): another rank stalled "
                f"(stopped, hung, or slower than timeout_s) or died")
    return f"collective {op}{where} failed because another rank ended ({detail})"


_TEARDOWN_HOOKS = []


def on_teardown(fn):
    """Register fn() to run in teardown before the process group is destroyed: os._exit skips atexit, so whatever
    must be released at the end (shared memory of kernels/triton_comm.py, NCCL communicators) registers here."""
    _TEARDOWN_HOOKS.append(fn)
    return fn


def teardown(exit_code=0):
    """End the process without the gloo crash at exit: barrier, gc, destroy the process group, flush, os._exit.
    The on_teardown hooks run after the barrier (after all ranks are done communicating).

    From ../shared/notes/cpu-facts.md (upstream pytorch issue 190489): letting the interpreter exit normally
    after destroy_process_group() still aborts one rank in ~17% of gloo runs; this sequence gave 0 in 40.
    Never returns.
    """
    try:
        if dist.is_initialized() and exit_code == 0:
            dist.barrier()
        for fn in reversed(_TEARDOWN_HOOKS):
            try:
                fn()
            except Exception as e:  # report, and go on ending the process
                print(f"teardown: {getattr(fn, '__qualname__', fn)} failed: {type(e).__name__}: {e}", file=sys.stderr)
        if dist.is_initialized():
            gc.collect()
            dist.destroy_process_group()
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(exit_code)
