"""
Collectives written as Triton kernels over a symmetric heap: the backend of the `triton` variant of every strategy.

The idea is PyTorch's symmetric memory (torch.distributed._symmetric_memory; NVSHMEM's symmetric heap): every rank
of a process group allocates a buffer of the same size, its heap, and every rank can load from and store to every
peer's heap directly. A collective is then plain loads and stores in a kernel, plus signals: each rank copies its
input into its own heap, the ranks meet at a barrier, and a kernel reads what it needs from the peers' heaps. The
collective region of the heap has two halves used in turn, so no second barrier is needed to keep a rank from
overwriting data a peer still reads: before a rank writes a half again, it passed the next collective's barrier,
which every peer enters only after its reads of that half.

- CUDA: the heap is PyTorch's symmetric memory (`empty` + `rendezvous`), the tables of peer addresses its
  `buffer_ptrs` and `signal_pad_ptrs`.
- CPU: emulated. Each rank creates a file in /dev/shm and maps every rank's file (`torch.from_file(..., shared=True)`),
  so the processes share that memory; the table of peer addresses is a tensor of the addresses at which *this*
  process mapped them. The files are unlinked as soon as every rank has mapped them, and on any error, so nothing is
  left in /dev/shm. The kernels run in Triton's interpreter: this module sets TRITON_INTERPRET=1 when there is no
  CUDA, before importing triton (the same kernel source runs compiled on a GPU).

Kernels (math in fp32; bf16 is converted bit-exactly by hand, rounding to nearest even, because the interpreter's
own bf16 conversion rounds wrongly):
- _barrier_kernel: every rank raises a flag in every peer's signal pad (atomic CAS 0->1, release) and consumes the
  flags raised in its own pad (CAS 1->0, acquire): symmetric memory's put_signal / wait_signal, one lane per peer.
- _reduce_kernel: out = op over ranks r of heap_r[offset:offset+n] (one-shot all-reduce, reduce-scatter, the first
  half of a two-shot all-reduce).
- _gather_kernel: out[j] = heap_{peer j}[...] (all-gather, broadcast, the second half of a two-shot all-reduce).
- _all_to_all_kernel: out[offset_j:offset_j+n_j] = heap_{peer j}[...] for every peer j, n_j and offset_j read from
  a table (all-to-all: every rank pulls its chunk out of every peer's heap; chunks of any size, zero included).
- _mailbox_kernel: point-to-point through mailboxes, a ring of `slots` slots per (src, dst) pair in the
  receiver's heap, each slot with a full/empty flag in the receiver's signal pad. A send writes into the next free
  slot of the receiver's ring and raises its flag (a "put"); it waits for the receiver only when the ring is full.

All-reduce, the two algorithms of NVIDIA's and PyTorch's symmetric-memory all-reduce: one-shot, every rank reads
all N inputs and reduces them (N·S bytes read per rank, 1 barrier; small messages); two-shot, a reduce-scatter
through the heap (rank r reduces piece r of every input into its own heap), a barrier, then an all-gather of the
reduced pieces (2·S bytes read per rank, 2 barriers; large messages). Both reduce in rank order and agree bit for bit.

All-to-all (torch.distributed.all_to_all_single's semantics, equal or uneven chunks), the pull form of symmetric
memory's all-to-all: a heap half is cut into N slots, slot j holding what this rank sends to rank j; every rank
copies its chunks into its slots, the ranks meet at a barrier, and one kernel pulls slot `rank` of every peer's heap
into the output at that peer's offset. One barrier, and each byte crosses a link once. Chunks larger than a slot go in
rounds, a slot's worth of every chunk per round; with uneven chunks no rank knows the others' sizes, so in the first
round each rank also writes the rounds it needs into its heap, and all take the largest (no extra barrier).

Asynchrony: collectives run when called; async_op=True returns a handle whose wait() has nothing left to do.
Sends and receives are queued per peer and make progress whenever this process enters any TritonCollectives
(a call, wait(), is_completed(), every retry of a barrier of any group), so e.g. an async send followed by a
blocking receive, in both directions at once, does not deadlock. Tensors larger than the heap go in heap-sized
chunks, messages larger than a slot in slot-sized ones.

Waiting: a kernel spins on a flag a bounded number of times and reports; the host relaunches it (sleeping a little
between tries on CPU, where several ranks share 2 cores) until it succeeds or `timeout_s` passes (RuntimeError).

What is launched: launch_space (constexprs) and ARGUMENTS (how Triton specializes each runtime argument) describe
every launch the backend can make; every launch is checked against them (always under the interpreter), and
kernels/compile_check.py compiles exactly that description for sm_80 and sm_90, so the CPU tests prove the kernels
compile for a GPU in every variant that runs. Two ranks on one GPU: set TORCH_SYMM_MEM_ALLOW_OVERLAPPING_DEVICES=1,
without which torch's CUDA symmetric memory refuses the rendezvous.
"""

import atexit
import collections
import os
import secrets
import time

import torch
import torch.distributed as dist

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # must precede @triton.jit: the kernels then run on CPU tensors

import triton  # noqa: E402
import triton.language as tl  # noqa: E402

from kernels.comm import Collectives, on_teardown  # noqa: E402

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
REDUCE_KIND = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}  # the dtypes the kernels reduce
OPS = {"sum": 0, "avg": 1, "max": 2}
MOVE_TYPE = {1: tl.int8, 2: tl.int16, 4: tl.int32, 8: tl.int64}  # data movement only needs the element size


# ----------------------------------------------------------------------------------------------------------
# kernels. Addresses are int64 scalars (or tables of them) turned into typed pointers in the kernel: the heaps are
# not tensors of this process, and on CPU the interpreter copies every tensor argument's storage onto itself after a
# launch, which would race with a peer writing into the same memory. The kernels use triton.language's builtins only,
# not its @jit library functions (tl.zeros, tl.min, ...): those stay compiled-mode functions that fail in the
# interpreter if anything imported triton before TRITON_INTERPRET was set (torch does, lazily). And they call no
# @jit helper of their own: the interpreter re-patches triton.language on every such call, which costs milliseconds.

@triton.jit
def _minimum(a, b):
    """The combine function of a min reduction (tl.reduce calls it)."""
    return tl.minimum(a, b)


@triton.jit
def _barrier_kernel(signals, rank, state, WORLD: tl.constexpr, LANES: tl.constexpr, SPINS: tl.constexpr):
    """Try to pass a barrier over WORLD ranks, one lane per peer (LANES: WORLD rounded up to a power of 2).

    signals: int64 (WORLD,) addresses of every rank's signal pad, whose int32 flag p means "rank p arrived", and
    flag WORLD is a word that always holds -1 (lanes with nothing to do aim their CAS at it: tl.atomic_cas has no
    mask). state: int32 (WORLD,), this rank's progress with each peer: 0 -> 1 once our flag is raised in the peer's
    pad (CAS 0->1, release: what we wrote before is visible to the peer once it sees the flag; it fails while the
    peer has not consumed our previous flag yet), 1 -> 2 once we consumed the peer's flag in our pad (CAS 1->0,
    acquire). Up to SPINS rounds; the host relaunches until every state is 2 (state[rank] starts at 2)."""
    lanes = tl.arange(0, LANES)
    valid = lanes < WORLD
    s = tl.load(state + lanes, mask=valid, other=2)
    own = tl.load(signals + rank)
    dummy = own + 4 * WORLD
    peers = tl.load(signals + lanes, mask=valid, other=0)
    zeros, ones = tl.full([LANES], 0, dtype=tl.int32), tl.full([LANES], 1, dtype=tl.int32)  # (the interpreter's
    i = 0                                                                                   # CAS wants vectors)
    while (tl.reduce(s, 0, _minimum) < 2) & (i < SPINS):
        target = tl.where(s == 0, peers + 4 * rank, dummy).to(tl.pointer_type(tl.int32))
        old = tl.atomic_cas(target, zeros, ones, sem="release", scope="sys")
        s = tl.where((s == 0) & (old == 0), 1, s)
        target = tl.where(s == 1, own + 4 * lanes, dummy).to(tl.pointer_type(tl.int32))
        old = tl.atomic_cas(target, ones, zeros, sem="acquire", scope="sys")
        s = tl.where((s == 1) & (old == 1), 2, s)
        i += 1
    tl.store(state + lanes, s, mask=valid)


@triton.jit
def _reduce_kernel(heaps, in_offset, out_addr, n, WORLD: tl.constexpr, OP: tl.constexpr, KIND: tl.constexpr,
                   BLOCK: tl.constexpr):
    """out[i] = OP over ranks r = 0..WORLD-1, in that order, of heap_r[in_offset bytes + i], for i < n, in fp32.

    heaps: int64 (WORLD,) heap addresses; out_addr: byte address of the output (any rank's memory). OP: 0 sum,
    1 avg (the sum divided by WORLD), 2 max. KIND, the dtype: 0 fp32, 1 bf16, 2 fp16. A bf16's 16 bits are the upper
    half of the fp32 of the same value; the result is rounded to nearest even by hand (the interpreter's own
    conversion rounds ties up and can carry into the exponent). Grid: cdiv(n, BLOCK)."""
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    acc = tl.full([BLOCK], float("-inf") if OP == 2 else 0.0, dtype=tl.float32)
    for r in tl.static_range(WORLD):
        addr = tl.load(heaps + r) + in_offset
        if KIND == 1:
            bits = tl.load(addr.to(tl.pointer_type(tl.uint16)) + offs, mask=mask, other=0)
            x = (bits.to(tl.uint32) << 16).to(tl.float32, bitcast=True)
        elif KIND == 2:
            x = tl.load(addr.to(tl.pointer_type(tl.float16)) + offs, mask=mask, other=0.0).to(tl.float32)
        else:
            x = tl.load(addr.to(tl.pointer_type(tl.float32)) + offs, mask=mask, other=0.0)
        if OP == 2:
            acc = tl.maximum(acc, x)
        else:
            acc = acc + x
    if OP == 1:
        acc = acc / WORLD
    if KIND == 1:
        bits = acc.to(tl.uint32, bitcast=True)
        rounded = (bits + (0x7FFF + ((bits >> 16) & 1))) >> 16
        out = tl.where(acc != acc, (bits >> 16) | 0x40, rounded).to(tl.uint16)  # a NaN stays a (quiet) NaN
        tl.store(out_addr.to(tl.pointer_type(tl.uint16)) + offs, out, mask=mask)
    elif KIND == 2:
        tl.store(out_addr.to(tl.pointer_type(tl.float16)) + offs, acc.to(tl.float16), mask=mask)
    else:
        tl.store(out_addr.to(tl.pointer_type(tl.float32)) + offs, acc, mask=mask)


@triton.jit
def _gather_kernel(heaps, first_peer, peers, in_offset, in_stride, out_addr, out_stride, n, limit, DT: tl.constexpr,
                   LANES: tl.constexpr, BLOCK: tl.constexpr):
    """For j < peers (one row of the tile per peer, LANES >= peers a power of 2): copy block b (the program) of n
    elements of type DT from heap_{first_peer + j} at byte in_offset + j·in_stride to out_addr + j·out_stride,
    leaving out element j·n + i alone when it is >= limit. Grid: cdiv(n, BLOCK)."""
    j = tl.arange(0, LANES).to(tl.int64)[:, None]
    offs = (tl.program_id(0) * BLOCK + tl.arange(0, BLOCK))[None, :]
    mask = (j < peers) & (offs < n) & (j * n + offs < limit)
    base = tl.load(heaps + first_peer + j, mask=j < peers, other=0)
    src = (base + in_offset + j * in_stride).to(tl.pointer_type(DT))
    dst = (out_addr + j * out_stride).to(tl.pointer_type(DT))
    tl.store(dst + offs, tl.load(src + offs, mask=mask), mask=mask)


@triton.jit
def _all_to_all_kernel(heaps, in_offset, table, peers, DT: tl.constexpr, LANES: tl.constexpr, BLOCK: tl.constexpr):
    """For every peer j < peers (one row of the tile per peer, LANES >= peers a power of 2): copy block b (the program)
    of the table[j] elements of type DT at byte in_offset of heap_j to the address table[peers + j].
    table: int64 (2·peers,), the element counts, then the destination byte addresses. Grid: cdiv(max count, BLOCK)."""
    j = tl.arange(0, LANES)[:, None]
    valid = j < peers
    n = tl.load(table + j, mask=valid, other=0)
    dst = tl.load(table + peers + j, mask=valid, other=0).to(tl.pointer_type(DT))
    src = (tl.load(heaps + j, mask=valid, other=0) + in_offset).to(tl.pointer_type(DT))
    offs = (tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)).to(tl.int64)[None, :]
    mask = offs < n
    tl.store(dst + offs, tl.load(src + offs, mask=mask), mask=mask)


@triton.jit
def _mailbox_kernel(flag_addr, src_addr, dst_addr, n, status, SEND: tl.constexpr, DT: tl.constexpr,
                    BLOCK: tl.constexpr):
    """Move one message chunk through a mailbox slot, whose int32 flag at flag_addr (in the receiver's pad) is 1
    while the slot holds a message. SEND: if the flag is 0 (acquire: the receiver is done reading the slot), copy
    n elements (type DT) from src_addr to the slot at dst_addr (in the receiver's heap) and raise the flag
    (release). Receive: if the flag is 1 (acquire), copy n elements out of the slot at src_addr to dst_addr and
    lower the flag (release). status[0] <- 1 if the chunk moved, 0 if the slot was not ready. Grid: 1."""
    flag = flag_addr.to(tl.pointer_type(tl.int32))
    if SEND:
        ready = tl.atomic_cas(flag, 0, 0, sem="acquire", scope="sys") == 0
    else:
        ready = tl.atomic_cas(flag, 1, 1, sem="acquire", scope="sys") == 1
    if ready:
        src, dst = src_addr.to(tl.pointer_type(DT)), dst_addr.to(tl.pointer_type(DT))
        for start in range(0, n, BLOCK):
            offs = start + tl.arange(0, BLOCK)
            tl.store(dst + offs, tl.load(src + offs, mask=offs < n), mask=offs < n)
        tl.debug_barrier()
        if SEND:
            tl.atomic_xchg(flag, 1, sem="release", scope="sys")
        else:
            tl.atomic_xchg(flag, 0, sem="release", scope="sys")
    tl.store(status, ready.to(tl.int32))


# ----------------------------------------------------------------------------------------------------------
# What the backend launches. Every launch goes through TritonCollectives._launch, which checks it against this
# description (always under the interpreter, so the CPU tests check every launch they make; on CUDA when
# NANOPARALLEL_TRITON_CHECK_LAUNCHES=1, as tools/gpu_check.py sets). kernels/compile_check.py compiles exactly this
# description for sm_80 and sm_90 (tests/test_kernels_compile.py), so a launch it does not cover fails here, on CPU,
# rather than as a kernel that does not compile on the first GPU.

# Elements per program, CAS attempts per kernel before the host retries, seconds slept between retries at most.
# The interpreter runs a program as Python, so on CPU wide blocks and short spins with a pause are what is fast.
TUNING = {"cuda": dict(block=1024, spins=1 << 16, max_pause=0.0),
          "cpu": dict(block=1 << 16, spins=8, max_pause=1e-3)}
NUM_WARPS = {"_barrier_kernel": 1, "_reduce_kernel": 4, "_gather_kernel": 4, "_all_to_all_kernel": 4,
             "_mailbox_kernel": 4}
MAX_HEAP_BYTES = 2**31 - 1  # the kernels take byte offsets into a heap as int32

# How Triton specializes a runtime argument at launch (triton.runtime.jit; kernels/compile_check.py checks this
# mirror against Triton's own function): a tensor is a pointer "*<dtype>", with "D" when its address is a multiple
# of 16; an int is "i32", or "i64" past the int32 range, with "D" when it is a multiple of 16; the int 1 becomes
# the constant 1. Each kernel's argument compiles to one variant per distinct specialization, so every one a
# launch can produce is listed here.
POINTER_I64 = (("*i64", "D"),)                        # a table of addresses, allocated by torch: 16-byte aligned
POINTER_I32 = (("*i32", "D"),)
ADDRESS = (("i64", "D"), ("i64", ""))                 # a byte address in this process's or a peer's memory
COUNT = (("i32", "D"), ("i32", ""), ("constexpr", 1))  # a rank, or a count or byte offset bounded by the heap
SIZE = COUNT + (("i64", "D"), ("i64", ""))            # a count or byte stride of a whole tensor: may pass 2**31
ARGUMENTS = {
    "_barrier_kernel": dict(signals=POINTER_I64, rank=COUNT, state=POINTER_I32),
    "_reduce_kernel": dict(heaps=POINTER_I64, in_offset=COUNT, out_addr=ADDRESS, n=COUNT),
    "_gather_kernel": dict(heaps=POINTER_I64, first_peer=COUNT, peers=COUNT, in_offset=COUNT, in_stride=COUNT,
                           out_addr=ADDRESS, out_stride=SIZE, n=COUNT, limit=SIZE),
    "_all_to_all_kernel": dict(heaps=POINTER_I64, in_offset=COUNT, table=POINTER_I64, peers=COUNT),
    "_mailbox_kernel": dict(flag_addr=ADDRESS, src_addr=ADDRESS, dst_addr=ADDRESS, n=COUNT, status=POINTER_I32),
}
KERNELS = {k.__name__: k for k in (_barrier_kernel, _reduce_kernel, _gather_kernel, _all_to_all_kernel,
                                    _mailbox_kernel)}
_TORCH_TYPES = {torch.int64: "i64", torch.int32: "i32", torch.int16: "i16", torch.int8: "i8", torch.uint8: "u8",
                torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}


def specialization(value):
    """(type, attribute) that Triton's JIT gives a runtime argument `value` (a tensor or an int), as above."""
    if isinstance(value, torch.Tensor):
        return "*" + _TORCH_TYPES[value.dtype], "D" if value.data_ptr() % 16 == 0 else ""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"the kernels take tensors and ints, got {type(value).__name__}")
    if value == 1:
        return "constexpr", 1
    kind = "i32" if -2**31 <= value < 2**31 else "i64" if -2**63 <= value < 2**63 else "u64"
    return kind, "D" if value % 16 == 0 else ""


def launch_space(world_size, block, spins):
    """{kernel name: [constexprs, ...]}: every combination of constexpr values the backend can launch each kernel
    with in a group of world_size ranks, with `block` elements per program and `spins` CAS attempts (TUNING).
    The barrier, the all-to-all and the mailboxes are never launched in a group of one (nothing to wait for, no
    peer: an all-to-all over one rank is a copy)."""
    N, lanes = world_size, triton.next_power_of_2(world_size)
    return {
        "_barrier_kernel": [dict(WORLD=N, LANES=lanes, SPINS=spins)] if N > 1 else [],
        "_reduce_kernel": [dict(WORLD=N, OP=op, KIND=kind, BLOCK=block)
                           for op in OPS.values() for kind in REDUCE_KIND.values()],
        # LANES: one row per peer read; 1 for a broadcast, all N for all-gather and two-shot all-reduce
        "_gather_kernel": [dict(DT=dt, LANES=rows, BLOCK=block) for dt in MOVE_TYPE.values()
                           for rows in sorted({1, lanes})],
        "_all_to_all_kernel": [dict(DT=dt, LANES=lanes, BLOCK=block) for dt in MOVE_TYPE.values()] if N > 1 else [],
        "_mailbox_kernel": [dict(SEND=send, DT=dt, BLOCK=block) for send in (True, False)
                            for dt in MOVE_TYPE.values()] if N > 1 else [],
    }


def constexpr_key(constexprs):
    """A hashable, printable form of a constexprs dict (triton dtypes by name)."""
    return tuple(sorted((k, str(v)) for k, v in constexprs.items()))


def check_launch(name, args, constexprs, world_size, block, spins):
    """Raise RuntimeError unless launching kernel `name` with runtime `args` (in order) and `constexprs` is covered
    by ARGUMENTS and launch_space(world_size, block, spins), naming the kernel and what is not covered."""
    params = [p for p in KERNELS[name].arg_names if p not in constexprs]
    declared = ARGUMENTS[name]
    if params != list(declared) or len(args) != len(params):
        raise RuntimeError(f"{name}: launched with arguments {params[:len(args)]}, ARGUMENTS declares "
                           f"{list(declared)}: update ARGUMENTS in kernels/triton_comm.py")
    for param, value in zip(params, args):
        spec = specialization(value)
        if spec not in declared[param]:
            raise RuntimeError(f"{name}: argument {param}={value} specializes as {spec}, which ARGUMENTS does not "
                               f"list ({declared[param]}), so no compile test covers it: add it in "
                               f"kernels/triton_comm.py")
    space = [constexpr_key(c) for c in launch_space(world_size, block, spins)[name]]
    if constexpr_key(constexprs) not in space:
        raise RuntimeError(f"{name}: constexprs {dict(constexpr_key(constexprs))} are not in launch_space("
                           f"{world_size}, {block}, {spins}), so no compile test covers them: update launch_space "
                           f"in kernels/triton_comm.py")


# ----------------------------------------------------------------------------------------------------------
# the symmetric heap

def _group_ranks(group):
    """The global ranks of `group` (None: the world)."""
    return dist.get_process_group_ranks(group if group is not None else dist.group.WORLD)


class SymmetricHeap:
    """A buffer of `nbytes` bytes and a signal pad of `signal_ints` int32 flags (zeroed) on every rank of `group`,
    each addressable by every rank. Collective: every rank of the group constructs it, in the same order.

    Attributes: rank, world_size (in the group); local (uint8 (nbytes,) tensor, this rank's buffer); buffer_ptrs,
    signal_ptrs (every rank's buffer and pad address, as ints usable in this process); buffers, signals (the same
    as int64 tensors on `device`: the tables the kernels read).
    CUDA: torch.distributed._symmetric_memory.empty + rendezvous; raises ValueError if its signal pad is smaller
    than signal_ints flags. CPU: one /dev/shm file per rank, "nanoparallel-<token>-<global ranks>-<rank>" (a random
    token broadcast by the group's rank 0), holding the pad (rounded up to 4 KiB) then the buffer; each is unlinked
    once every rank has mapped it, or when construction fails.
    """

    def __init__(self, group, nbytes, signal_ints, device):
        self.group, self.device, self.name = group, device, None
        self.rank, self.world_size = dist.get_rank(group), dist.get_world_size(group)
        self.nbytes = nbytes
        if device.type == "cuda":
            self._init_cuda(signal_ints)
        else:
            self._init_cpu(signal_ints)
        self.buffers = torch.tensor(self.buffer_ptrs, dtype=torch.int64, device=device)
        self.signals = torch.tensor(self.signal_ptrs, dtype=torch.int64, device=device)

    def _init_cuda(self, signal_ints):
        import torch.distributed._symmetric_memory as symm_mem
        group = self.group if self.group is not None else dist.group.WORLD
        self.local = symm_mem.empty(self.nbytes, dtype=torch.uint8, device=self.device)
        self.handle = symm_mem.rendezvous(self.local, group)
        if self.handle.signal_pad_size < 4 * signal_ints:
            raise ValueError(f"symmetric memory signal pad holds {self.handle.signal_pad_size} bytes, "
                             f"{4 * signal_ints} needed: use fewer mailbox slots")
        self.handle.get_signal_pad(self.rank, [signal_ints], dtype=torch.int32).zero_()
        torch.cuda.synchronize(self.device)
        dist.barrier(group)
        self.buffer_ptrs = list(self.handle.buffer_ptrs)
        self.signal_ptrs = list(self.handle.signal_pad_ptrs)

    def _init_cpu(self, signal_ints):
        token = [secrets.token_hex(6) if self.rank == 0 else None]
        dist.broadcast_object_list(token, group=self.group, group_src=0)
        name = self.name = f"nanoparallel-{token[0]}-{'_'.join(map(str, _group_ranks(self.group)))}"
        paths = [f"/dev/shm/{name}-{r}" for r in range(self.world_size)]
        pad_bytes = -(-4 * signal_ints // 4096) * 4096
        size = pad_bytes + self.nbytes
        mine = paths[self.rank]
        _CREATED.add(mine)
        try:
            self._maps = [torch.from_file(mine, shared=True, size=size, dtype=torch.uint8)]  # a new, zero-filled file
            dist.barrier(self.group)
            self._maps = [self._maps[0] if r == self.rank else
                          torch.from_file(p, shared=True, size=size, dtype=torch.uint8) for r, p in enumerate(paths)]
            dist.barrier(self.group)  # every rank mapped every file: the names can go
        finally:
            _unlink(mine)
        self.local = self._maps[self.rank][pad_bytes:]
        self.buffer_ptrs = [m.data_ptr() + pad_bytes for m in self._maps]
        self.signal_ptrs = [m.data_ptr() for m in self._maps]

    def signal_pad(self, start, count):
        """int32 flags start..start+count of this rank's signal pad, as a tensor."""
        if self.device.type == "cuda":
            return self.handle.get_signal_pad(self.rank, [count], dtype=torch.int32, storage_offset=start)
        return self._maps[self.rank][4 * start:4 * (start + count)].view(torch.int32)

    def close(self):
        """Drop this process's mappings (CPU) or handle (CUDA). The heap must not be used afterwards."""
        self.local = self._maps = self.handle = None
        self.buffers = self.signals = None


_CREATED = set()  # /dev/shm paths this process created and has not unlinked yet


def _unlink(path):
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
    _CREATED.discard(path)


# ----------------------------------------------------------------------------------------------------------
# the backend

_OPEN = []  # this process's open TritonCollectives: all make progress while any waits; closed at teardown


def _progress_all():
    for backend in list(_OPEN):
        backend._progress()


def close_all():
    """Close every open TritonCollectives of this process (parallel.teardown calls it; also at exit)."""
    for backend in list(_OPEN):
        backend.close()
    for path in list(_CREATED):
        _unlink(path)


on_teardown(close_all)
atexit.register(close_all)


def _chunks(tensor, split_sizes, world_size):
    """[(first element, elements)] of each of the world_size chunks of `tensor` along dim 0: split_sizes rows each,
    or equal chunks when None (all_to_all_single's split)."""
    rows = tensor.shape[0]
    sizes = split_sizes if split_sizes is not None else [rows // world_size] * world_size
    width = tensor[0].numel() if rows else 0
    out, at = [], 0
    for size in sizes:
        out.append((at * width, size * width))
        at += size
    return out


class _Op:
    """A queued send or receive: `flat`, the contiguous 1-D data, moves in chunks of `per` elements; a receive into
    a non-contiguous tensor lands in `flat` and is copied into `target` at the end."""

    def __init__(self, flat, per, target=None):
        self.flat, self.per, self.target = flat, per, target
        self.chunks = -(-flat.numel() // per)
        self.next = 0  # chunks moved so far

    @property
    def done(self):
        return self.next >= self.chunks


class _Work:
    """The handle of an async call (torch.distributed.Work's wait and is_completed)."""

    def __init__(self, backend=None, op=None):
        self.backend, self.op = backend, op

    def wait(self, timeout=None):
        if self.op is not None and not self.op.done:
            self.backend._wait(self.op)
        return True

    def is_completed(self):
        if self.op is not None and not self.op.done:
            self.backend._progress()
        return self.op is None or self.op.done


class TritonCollectives(Collectives):
    """Collectives as Triton kernels over a SymmetricHeap of `group` (see the module docstring).

    group: a process group (None: the world); stats: a comm.CommStats; device: where the tensors live
    (default: the current CUDA device if there is one, else CPU). heap_bytes: the collective region of each rank's
    heap (default 16 MiB on CPU, 256 MiB on CUDA, or NANOPARALLEL_TRITON_HEAP_MB), two halves used in turn; a
    tensor larger than a half goes in chunks.
    slots, slot_bytes: each (src, dst) mailbox ring. algorithm: all-reduce algorithm, "one_shot", "two_shot" or
    "auto" (two-shot above one_shot_max_bytes when the group has more than 2 ranks). timeout_s: how long any wait
    may take before RuntimeError (default 300, or NANOPARALLEL_TRITON_TIMEOUT_S).
    Reductions take float32, bfloat16 and float16 tensors (ValueError otherwise); data movement any dtype.
    Constructing it is collective over the group (the heap's rendezvous).
    """

    def __init__(self, group=None, stats=None, device=None, *, heap_bytes=None, slots=8, slot_bytes=2**20,
                 algorithm="auto", one_shot_max_bytes=2**18, timeout_s=None):
        super().__init__(group, stats)
        device = torch.device(device) if device is not None else torch.device(
            "cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
        self.check_available(device)
        if algorithm not in ("auto", "one_shot", "two_shot"):
            raise ValueError(f"algorithm must be 'auto', 'one_shot' or 'two_shot', got {algorithm!r}")
        cuda = device.type == "cuda"
        if heap_bytes is None:
            heap_bytes = int(float(os.environ.get("NANOPARALLEL_TRITON_HEAP_MB", "256" if cuda else "16")) * 2**20)
        self.device, self.algorithm, self.one_shot_max_bytes = device, algorithm, one_shot_max_bytes
        self.data_bytes = heap_bytes // 32 * 32
        self.half_bytes = self.data_bytes // 2  # one collective (one chunk of it) uses one half
        self._half = 0
        self.slots, self.slot_bytes = slots, slot_bytes // 16 * 16
        if self.half_bytes < 16 * self.world_size or self.slot_bytes < 16 or slots < 1:
            raise ValueError(f"heap of {heap_bytes} bytes, {slots} slots of {slot_bytes} bytes: too small")
        if timeout_s is None:
            timeout_s = os.environ.get("NANOPARALLEL_TRITON_TIMEOUT_S", "300")
        self.timeout_s = float(timeout_s)
        tuning = TUNING["cuda" if cuda else "cpu"]
        self.block, self.spins, self.max_pause = tuning["block"], tuning["spins"], tuning["max_pause"]
        self.check_launches = INTERPRET or os.environ.get("NANOPARALLEL_TRITON_CHECK_LAUNCHES") == "1"
        self._checked = set()  # launches check_launch accepted: (kernel, specializations, constexprs, tuning)
        N = self.world_size
        if self.data_bytes + N * slots * self.slot_bytes > MAX_HEAP_BYTES:
            raise ValueError(f"heap of {heap_bytes} bytes plus {N}x{slots} slots of {slot_bytes} bytes: the kernels "
                             f"address a heap with int32 byte offsets, so it must stay under 2 GiB")
        # signal pad: N barrier flags, the word the barrier's idle lanes aim at (-1), N*slots mailbox flags
        self.heap = SymmetricHeap(group, self.data_bytes + N * slots * self.slot_bytes, N + 1 + N * slots, device)
        self.heap.signal_pad(N, 1).fill_(-1)  # only this rank's barrier kernel reads it
        self._state = torch.zeros(N, dtype=torch.int32, device=device)
        self._status = torch.zeros(1, dtype=torch.int32, device=device)
        self._sends = collections.defaultdict(collections.deque)  # dst -> queued _Ops
        self._recvs = collections.defaultdict(collections.deque)  # src -> queued _Ops
        self._sent = collections.Counter()       # dst -> chunks put into its ring so far
        self._received = collections.Counter()   # src -> chunks taken from our ring so far
        _OPEN.append(self)

    @staticmethod
    def check_available(device):
        """Raise ValueError (one line) if this backend cannot run on `device` in this process."""
        device = torch.device(device)
        if device.type == "cuda":
            return
        if device.type != "cpu":
            raise ValueError(f"the triton backend runs on CUDA or CPU tensors, not {device.type}")
        if torch.cuda.is_available():
            raise ValueError("the triton backend on a CUDA machine compiles its kernels for the GPU: use CUDA tensors")
        if not INTERPRET:
            raise ValueError("the triton backend on CPU runs Triton's interpreter: TRITON_INTERPRET must be 1 "
                             f"(it is {os.environ.get('TRITON_INTERPRET')!r}) when kernels/triton_comm.py is imported")
        if not os.path.isdir("/dev/shm"):
            raise ValueError("the triton backend on CPU maps shared-memory files in /dev/shm, which is missing here")

    def close(self):
        """Release the heap. Collective use of a closed backend is an error."""
        if self in _OPEN:
            _OPEN.remove(self)
        if self.heap is not None:
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)  # no kernel of ours may still read or write the heap
            self.heap.close()
            self.heap = None

    # --- helpers ---

    def _view(self, dtype, offset, numel):
        """numel elements of `dtype` at byte `offset` of this rank's heap."""
        size = torch.empty((), dtype=dtype).element_size()
        return self.heap.local[offset:offset + numel * size].view(dtype)

    def _region(self):
        """The byte offset of the half of the collective region that the next collective (chunk) uses."""
        self._half ^= 1
        return self._half * self.half_bytes

    def _until(self, attempt, what):
        """Call attempt() until it returns True; between tries, move every open backend's queued sends and receives
        and back off. Raises RuntimeError after timeout_s."""
        if attempt():
            return
        deadline, pause = time.monotonic() + self.timeout_s, 0.0
        while True:
            _progress_all()
            if attempt():
                return
            if time.monotonic() > deadline:
                raise RuntimeError(f"triton backend: {what} on ranks {_group_ranks(self.group)} timed out after "
                                   f"{self.timeout_s:.0f}s (a peer died, or the ranks called different collectives)")
            time.sleep(pause)
            pause = min(2 * pause + 1e-5, self.max_pause)

    def _launch(self, kernel, grid, *args, **constexprs):
        """kernel[grid](*args, **constexprs) with the kernel's NUM_WARPS, after check_launch when check_launches
        (each distinct launch is checked once)."""
        name = kernel.__name__
        if self.check_launches:
            key = (name, tuple(specialization(a) for a in args), constexpr_key(constexprs), self.block, self.spins)
            if key not in self._checked:
                check_launch(name, args, constexprs, self.world_size, self.block, self.spins)
                self._checked.add(key)
        kernel[grid](*args, num_warps=NUM_WARPS[name], **constexprs)

    def _barrier(self):
        if self.world_size == 1:
            return
        self._state.zero_()
        self._state[self.rank] = 2

        def attempt():
            self._launch(_barrier_kernel, (1,), self.heap.signals, self.rank, self._state, WORLD=self.world_size,
                         LANES=triton.next_power_of_2(self.world_size), SPINS=self.spins)
            return bool((self._state == 2).all())

        self._until(attempt, "barrier")

    def _reduce(self, in_offset, out_addr, n, op, kind):
        if n > 0:
            self._launch(_reduce_kernel, (triton.cdiv(n, self.block),), self.heap.buffers, in_offset, out_addr, n,
                         WORLD=self.world_size, OP=OPS[op], KIND=kind, BLOCK=self.block)

    def _gather(self, first_peer, peers, in_offset, in_stride, out_addr, out_stride, n, limit, element_size):
        if n > 0:
            self._launch(_gather_kernel, (triton.cdiv(n, self.block),),
                         self.heap.buffers, first_peer, peers, in_offset, in_stride, out_addr, out_stride, n, limit,
                         DT=MOVE_TYPE[element_size], LANES=triton.next_power_of_2(peers), BLOCK=self.block)

    @staticmethod
    def _flat(tensor):
        """A contiguous 1-D view of tensor, or a contiguous copy (then the result must be copied back)."""
        if tensor.is_contiguous():
            return tensor.view(-1), False
        return tensor.contiguous().view(-1), True

    @staticmethod
    def _kind(tensor):
        if tensor.dtype not in REDUCE_KIND:
            raise ValueError(f"the triton backend reduces float32, bfloat16 and float16 tensors, got {tensor.dtype}")
        return REDUCE_KIND[tensor.dtype]

    @staticmethod
    def _done(async_op):
        return _Work() if async_op else None

    # --- collectives ---

    def _all_reduce(self, tensor, op, async_op):
        kind = self._kind(tensor)
        flat, copy_back = self._flat(tensor)
        es, N, r = flat.element_size(), self.world_size, self.rank
        two_shot = self.algorithm == "two_shot" or (
            self.algorithm == "auto" and N > 2 and flat.numel() * es > self.one_shot_max_bytes)
        cap = self.half_bytes // es
        for start in range(0, flat.numel(), cap):
            piece, base = flat[start:start + cap], self._region()
            m, out = piece.numel(), piece.data_ptr()
            self._view(flat.dtype, base, m).copy_(piece)
            self._barrier()
            if not two_shot:
                self._reduce(base, out, m, op, kind)
            else:
                q = -(-m // N)  # piece p of the chunk: elements [p*q, min((p+1)*q, m))
                mine = base + r * q * es
                self._reduce(mine, self.heap.buffer_ptrs[r] + mine, min(q, m - r * q), op, kind)
                self._barrier()
                self._gather(0, N, base, q * es, out, q * es, q, m, es)
        if copy_back:
            tensor.copy_(flat.view_as(tensor))
        return self._done(async_op)

    def _all_gather(self, output, input, async_op):
        if output.dtype != input.dtype:
            raise ValueError(f"all_gather: output is {output.dtype}, input {input.dtype}")
        src, _ = self._flat(input)
        out, copy_back = self._flat(output)
        n, es, N = src.numel(), src.element_size(), self.world_size
        cap = self.half_bytes // es
        for start in range(0, n, cap):
            c, base = min(cap, n - start), self._region()
            self._view(src.dtype, base, c).copy_(src[start:start + c])
            self._barrier()
            self._gather(0, N, base, 0, out.data_ptr() + start * es, n * es, c, N * n, es)
        if copy_back:
            output.copy_(out.view_as(output))
        return self._done(async_op)

    def _reduce_scatter(self, output, input, op, async_op):
        if output.dtype != input.dtype:
            raise ValueError(f"reduce_scatter: output is {output.dtype}, input {input.dtype}")
        kind = self._kind(input)
        src, _ = self._flat(input)
        out, copy_back = self._flat(output)
        n, es, N = out.numel(), out.element_size(), self.world_size
        cap = self.half_bytes // (es * N)
        rows = src.view(N, n)
        for start in range(0, n, cap):
            c, base = min(cap, n - start), self._region()
            self._view(src.dtype, base, N * c).view(N, c).copy_(rows[:, start:start + c])
            self._barrier()
            self._reduce(base + self.rank * c * es, out.data_ptr() + start * es, c, op, kind)
        if copy_back:
            output.copy_(out.view_as(output))
        return self._done(async_op)

    def _broadcast(self, tensor, src, async_op):
        flat, copy_back = self._flat(tensor)
        n, es = flat.numel(), flat.element_size()
        cap = self.half_bytes // es
        for start in range(0, n, cap):
            c, base = min(cap, n - start), self._region()
            if self.rank == src:
                self._view(flat.dtype, base, c).copy_(flat[start:start + c])
            self._barrier()
            if self.rank != src:
                self._gather(src, 1, base, 0, flat.data_ptr() + start * es, 0, c, c, es)
        if copy_back:
            tensor.copy_(flat.view_as(tensor))
        return self._done(async_op)

    def _all_to_all(self, output, input, output_split_sizes, input_split_sizes, async_op):
        """Rounds of: copy a slot's worth of every outgoing chunk into this rank's heap slots, barrier, pull slot
        `rank` of every peer's heap into the output (module docstring). A heap half: a 16-byte header (the rounds this
        rank needs, read in the first round when the chunks are uneven), then N slots of `cap` bytes."""
        if output.dtype != input.dtype:
            raise ValueError(f"all_to_all: output is {output.dtype}, input {input.dtype}")
        src, _ = self._flat(input)
        out, copy_back = self._flat(output)
        N, es = self.world_size, src.element_size()
        if N == 1:
            out.copy_(src)
        else:
            sends, recvs = _chunks(input, input_split_sizes, N), _chunks(output, output_split_sizes, N)
            cap = (self.half_bytes - 16) // N // 16 * 16  # a multiple of every element size
            if cap == 0:
                raise ValueError(f"all_to_all over {N} ranks needs a heap half of more than {16 * (N + 1)} bytes, "
                                 f"this one has {self.half_bytes}")
            rounds = max(-(-n * es // cap) for _, n in sends + recvs)
            uneven = input_split_sizes is not None or output_split_sizes is not None
            if uneven:  # every rank takes part in the first round, where the number of rounds is agreed on
                rounds = max(rounds, 1)
            data, heap = src.view(torch.uint8), self.heap.local
            k = 0
            while k < rounds:
                base = self._region()
                if uneven and k == 0:
                    self._view(torch.int64, base, 1).fill_(rounds)
                for j, (at, n) in enumerate(sends):  # this round's bytes [lo, hi) of the chunk for rank j
                    lo, hi = min(k * cap, n * es), min((k + 1) * cap, n * es)
                    slot = base + 16 + j * cap
                    heap[slot:slot + hi - lo].copy_(data[at * es + lo:at * es + hi])
                self._barrier()
                if uneven and k == 0:
                    peer_rounds = torch.empty(N, dtype=torch.int64, device=self.device)
                    self._gather(0, N, base, 0, peer_rounds.data_ptr(), 8, 1, N, 8)
                    rounds = int(peer_rounds.max())
                counts = [max(0, min(cap, n * es - k * cap)) // es for _, n in recvs]
                if max(counts) > 0:
                    addresses = [out.data_ptr() + at * es + k * cap for at, _ in recvs]
                    table = torch.tensor(counts + addresses, dtype=torch.int64, device=self.device)
                    self._launch(_all_to_all_kernel, (triton.cdiv(max(counts), self.block),), self.heap.buffers,
                                 base + 16 + self.rank * cap, table, N, DT=MOVE_TYPE[es],
                                 LANES=triton.next_power_of_2(N), BLOCK=self.block)
                k += 1
        if copy_back:
            output.copy_(out.view_as(output))
        return self._done(async_op)

    # --- point-to-point ---

    def _mailbox(self, src, slot):
        """(byte offset in the receiver's heap, flag index in its pad) of slot `slot` of src's ring."""
        ring = src * self.slots + slot
        return self.data_bytes + ring * self.slot_bytes, self.world_size + 1 + ring

    def _post(self, queues, tensor, peer, send):
        if not 0 <= peer < self.world_size or peer == self.rank:
            raise ValueError(f"{'send to' if send else 'recv from'} rank {peer}: not another rank of this group "
                             f"of {self.world_size} (this is rank {self.rank})")
        tensor = tensor.detach()
        flat, copy_back = self._flat(tensor)
        op = _Op(flat, max(1, self.slot_bytes // flat.element_size()), tensor if copy_back and not send else None)
        queues[peer].append(op)
        self._progress()
        return op

    def _send(self, tensor, dst, async_op):
        op = self._post(self._sends, tensor, dst, send=True)
        return _Work(self, op) if async_op else self._wait(op)

    def _recv(self, tensor, src, async_op):
        op = self._post(self._recvs, tensor, src, send=False)
        return _Work(self, op) if async_op else self._wait(op)

    def _wait(self, op):
        def attempt():
            self._progress()
            return op.done
        self._until(attempt, "send/recv")

    def _progress(self):
        """Move queued sends into free mailbox slots and queued receives out of full ones, in order, without waiting."""
        if self.heap is None:
            return
        for queues, send in ((self._sends, True), (self._recvs, False)):
            for peer, queue in queues.items():
                while queue and self._advance(queue[0], peer, send):
                    queue.popleft()

    def _advance(self, op, peer, send):
        """Move op's next chunks while the ring allows; True once all of op has moved."""
        es = op.flat.element_size()
        while not op.done:
            lo = op.next * op.per
            n = min(op.per, op.flat.numel() - lo)
            counter = self._sent if send else self._received
            data = op.flat.data_ptr() + lo * es
            if send:  # into our ring in the peer's heap
                offset, flag = self._mailbox(self.rank, counter[peer] % self.slots)
                owner, src, dst = peer, data, self.heap.buffer_ptrs[peer] + offset
            else:     # out of the peer's ring in our heap
                offset, flag = self._mailbox(peer, counter[peer] % self.slots)
                owner, src, dst = self.rank, self.heap.buffer_ptrs[self.rank] + offset, data
            self._launch(_mailbox_kernel, (1,), self.heap.signal_ptrs[owner] + 4 * flag, src, dst, n, self._status,
                         SEND=send, DT=MOVE_TYPE[es], BLOCK=self.block)
            if not self._status.item():
                return False
            counter[peer] += 1
            op.next += 1
        if op.target is not None:
            op.target.copy_(op.flat.view_as(op.target))
            op.target = None
        return True
