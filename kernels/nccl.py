"""
The NCCL API called directly, through ctypes: the backend of the `nccl` variant of every strategy, and of the `cuda`
variant, which loads libnanoccl (kernels/cuda/: our own implementation of the same API) instead of libnccl.

torch.distributed's NCCL process group wraps these same C functions (ProcessGroupNCCL.cpp); here they are called by
hand, so the lowest level of the project's four is a few lines per collective: a pointer, a count, an NCCL data
type and reduction, the communicator and the current CUDA stream (nccl.h, NCCL 2.x; the API is described in NVIDIA's
"NCCL User Guide", sections "Creating a communicator", "Collective operations", "Point-to-point communication",
"Group calls").

- The library: $NANOPARALLEL_NCCL_LIB if set (a path to libnccl.so.2), else the copy of an `nvidia-nccl-cu12` or
  `-cu13` wheel on sys.path (nvidia/nccl/lib or, from CUDA 13, nvidia/cu13/lib: where torch's CUDA wheels find
  theirs), else a libnccl this process has already loaded (a system NCCL torch was built against), else whatever
  the loader finds (libnccl.so.2). requirements.txt installs nvidia-nccl-cu12 on Linux x86_64, so CI tests the
  binding against the real library (which loads without a GPU); on a CPU machine the nccl variant fails at strategy
  build time with one line.
- A communicator per process group: the group's rank 0 calls ncclGetUniqueId, the 128-byte id is broadcast over the
  group (torch.distributed, i.e. gloo or torch's NCCL), and every rank calls ncclCommInitRank.
- Collectives run on the current CUDA stream, asynchronously with respect to the host (as torch's do); the handle of
  an async call records a CUDA event. A send is not issued when called but queued, and issued inside the
  ncclGroupStart/End of the next receive (or before the next collective, or when waited on): the custom pipeline
  sends to one neighbour and then receives, and two blocking NCCL calls in that order on both sides of a link would
  wait for each other on the GPU; in one group NCCL runs them together. NCCL connects point-to-point channels
  lazily, in the first group that uses them, and the two sides of a link connect together: a group that needs
  both directions with a peer (the pipeline's first sends and receive) while the peer's group needs one would leave
  the other direction half set up. So before the first message to or from a peer, a group of one send and one
  receive with it connects both directions at once, at the same point on both sides (_connect).
- Two ranks on one GPU: NCCL refuses them unless they believe they are on different hosts; set NCCL_HOSTID to a
  different value per rank before the first communicator is made (tests/test_nccl.py does).

- One binding, two libraries: CudaCollectives is NCCLCollectives with library=libnanoccl (built by nvcc at first
  use, kernels/cuda/build.py); every line of Python below runs against both, so the two libraries differ only
  below the C API.

Every NCCL error becomes an NCCLError naming the call, the ncclResult_t, ncclGetErrorString's text and, where the
library has it (NCCL >= 2.13), ncclGetLastError's message (e.g. "Cuda failure 'CUDA driver version is insufficient
for CUDA runtime version'" for ncclCommInitRank on a machine without a GPU).
"""

import ctypes
import ctypes.util
import glob
import os
import sys

import torch
import torch.distributed as dist

from kernels.comm import Collectives, on_teardown

LIBRARY_ENV = "NANOPARALLEL_NCCL_LIB"
NCCL_UNIQUE_ID_BYTES = 128

# ncclResult_t
RESULTS = {0: "ncclSuccess", 1: "ncclUnhandledCudaError", 2: "ncclSystemError", 3: "ncclInternalError",
           4: "ncclInvalidArgument", 5: "ncclInvalidUsage", 6: "ncclRemoteError", 7: "ncclInProgress",
           8: "ncclTimeout"}
# ncclDataType_t (ncclBfloat16 needs NCCL >= 2.10)
DATA_TYPES = {torch.int8: 0, torch.uint8: 1, torch.int32: 2, torch.int64: 4, torch.float16: 6, torch.float32: 7,
              torch.float64: 8, torch.bfloat16: 9}
# ncclRedOp_t (ncclAvg needs NCCL >= 2.10)
REDUCE_OPS = {"sum": 0, "prod": 1, "max": 2, "min": 3, "avg": 4}


class ncclUniqueId(ctypes.Structure):
    """nccl.h's `typedef struct { char internal[NCCL_UNIQUE_ID_BYTES]; } ncclUniqueId;` (passed by value)."""
    _fields_ = [("internal", ctypes.c_byte * NCCL_UNIQUE_ID_BYTES)]


# name -> (argtypes); every function returns ncclResult_t (int). ncclComm_t and cudaStream_t are opaque pointers.
_p, _size, _int = ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int
SIGNATURES = {
    "ncclGetVersion": [ctypes.POINTER(_int)],
    "ncclGetUniqueId": [ctypes.POINTER(ncclUniqueId)],
    "ncclCommInitRank": [ctypes.POINTER(_p), _int, ncclUniqueId, _int],          # comm*, nranks, id (by value), rank
    "ncclCommDestroy": [_p],
    "ncclAllReduce": [_p, _p, _size, _int, _int, _p, _p],                        # send, recv, count, type, op, ...
    "ncclAllGather": [_p, _p, _size, _int, _p, _p],                              # send, recv, sendcount, type, ...
    "ncclReduceScatter": [_p, _p, _size, _int, _int, _p, _p],                    # send, recv, recvcount, type, op, ...
    "ncclBroadcast": [_p, _p, _size, _int, _int, _p, _p],                        # send, recv, count, type, root, ...
    "ncclSend": [_p, _size, _int, _int, _p, _p],                                 # buf, count, type, peer, comm, stream
    "ncclRecv": [_p, _size, _int, _int, _p, _p],
    "ncclGroupStart": [],
    "ncclGroupEnd": [],
    "ncclCommGetAsyncError": [_p, ctypes.POINTER(_int)],                         # comm, ncclResult_t*
}


class NCCLError(RuntimeError):
    """An NCCL call returned something other than ncclSuccess. Attributes: call (the function's name), code (the
    ncclResult_t), name (its enum name)."""

    def __init__(self, call, code, message=""):
        self.call, self.code, self.name = call, code, RESULTS.get(code, "unknown ncclResult_t")
        super().__init__(f"{call} failed: {self.name} ({code})" + (f": {message}" if message else ""))


def decode_version(code):
    """ncclGetVersion's int -> (major, minor, patch): NCCL_VERSION(X,Y,Z) is X*10000+Y*100+Z from 2.9 on, X*1000+
    Y*100+Z before."""
    if code >= 10000:
        return code // 10000, code // 100 % 100, code % 100
    return code // 1000, code // 100 % 10, code % 100


def nccl_dtype(dtype):
    """The ncclDataType_t of a torch dtype; ValueError for one NCCL has no type for."""
    if dtype not in DATA_TYPES:
        raise ValueError(f"NCCL has no data type for {dtype}")
    return DATA_TYPES[dtype]


def loaded_libraries():
    """Paths of the libnccl.so* files mapped into this process (/proc/self/maps; [] where there is none)."""
    try:
        with open("/proc/self/maps") as f:
            paths = {line.split(None, 5)[5].strip() for line in f if len(line.split(None, 5)) == 6}
    except OSError:
        return []
    return sorted(p for p in paths if os.path.basename(p).startswith("libnccl.so"))


def wheel_libraries():
    """libnccl.so.2 of the nvidia-nccl-cu* wheels on sys.path: nvidia/nccl/lib (cu12, cu13) and nvidia/cu*/lib (the
    CUDA 13 layout torch 2.11's torch/__init__.py also searches)."""
    out = []
    for root in sys.path:
        for pattern in ("nvidia/nccl/lib/libnccl.so.2", "nvidia/cu*/lib/libnccl.so.2"):
            out += sorted(glob.glob(os.path.join(root or ".", pattern)))
    return list(dict.fromkeys(out))


def library_candidates():
    """The paths or names load_library tries, in order: $NANOPARALLEL_NCCL_LIB, the nvidia-nccl wheels'
    (wheel_libraries), a libnccl already loaded in this process (e.g. a system NCCL that torch was built against),
    what ctypes.util.find_library("nccl") returns, "libnccl.so.2"."""
    out = []
    if os.environ.get(LIBRARY_ENV):
        out.append(os.environ[LIBRARY_ENV])
    out += wheel_libraries() + loaded_libraries()
    found = ctypes.util.find_library("nccl")
    return list(dict.fromkeys(out + ([found] if found else []) + ["libnccl.so.2"]))


def load_library(path=None):
    """ctypes.CDLL of libnccl: `path`, or the first of library_candidates() that loads (only $NANOPARALLEL_NCCL_LIB
    when it is set: a wrong path there is an error, not a fallback). Raises OSError naming what was tried."""
    tried = [path] if path else library_candidates()
    if not path and os.environ.get(LIBRARY_ENV):
        tried = tried[:1]
    errors = []
    for candidate in tried:
        try:
            return ctypes.CDLL(candidate)
        except OSError as e:
            errors.append(f"{candidate} ({str(e).split(':')[-1].strip()})")
    raise OSError(f"libnccl not found: tried {'; '.join(errors)}. Set {LIBRARY_ENV}=/path/to/libnccl.so.2 (from the "
                  f"nvidia-nccl-cu12 or -cu13 wheel, which torch's CUDA wheels install)")


class NCCLLibrary:
    """libnccl's functions with nccl.h's signatures; `call(name, *args)` raises NCCLError unless ncclSuccess.
    path: as load_library (or an already loaded ctypes.CDLL as `lib`)."""

    def __init__(self, path=None, lib=None):
        self.lib = lib if lib is not None else load_library(path)
        for name, argtypes in SIGNATURES.items():
            fn = getattr(self.lib, name)
            fn.argtypes, fn.restype = argtypes, ctypes.c_int
        self.lib.ncclGetErrorString.argtypes, self.lib.ncclGetErrorString.restype = [ctypes.c_int], ctypes.c_char_p
        self._last_error = getattr(self.lib, "ncclGetLastError", None)  # NCCL >= 2.13
        if self._last_error is not None:
            self._last_error.argtypes, self._last_error.restype = [_p], ctypes.c_char_p

    def error_string(self, code):
        """ncclGetErrorString(code)."""
        text = self.lib.ncclGetErrorString(code)
        return text.decode(errors="replace") if text else ""

    def last_error(self):
        """ncclGetLastError(NULL): the message of this thread's last NCCL error ("" if none or unsupported)."""
        if self._last_error is None:
            return ""
        text = self._last_error(None)
        return text.decode(errors="replace") if text else ""

    def call(self, name, *args):
        """Call libnccl's `name`; raise NCCLError (with the error string and the last error's message) unless it
        returns ncclSuccess."""
        code = getattr(self.lib, name)(*args)
        if code != 0:
            message, detail = self.error_string(code), self.last_error()
            raise NCCLError(name, code, f"{message}; {detail}" if detail and detail not in message else message)

    def version(self):
        """(major, minor, patch) of the loaded library."""
        v = ctypes.c_int()
        self.call("ncclGetVersion", ctypes.byref(v))
        return decode_version(v.value)

    def unique_id(self):
        uid = ncclUniqueId()
        self.call("ncclGetUniqueId", ctypes.byref(uid))
        return uid


# ----------------------------------------------------------------------------------------------------------
# the backend

_OPEN = []  # this process's open NCCLCollectives, destroyed at teardown


def close_all():
    """Destroy every open communicator of this process (parallel.teardown calls it)."""
    for backend in list(_OPEN):
        backend.close()


on_teardown(close_all)


class _Work:
    """The handle of an async call: wait() makes the current stream wait for the call (and first issues it, for a
    queued send); is_completed() asks its CUDA event, False while a send is still queued."""

    def __init__(self, backend, event=None, send=None):
        self.backend, self.event, self.send = backend, event, send

    def wait(self, timeout=None):
        if self.send is not None and self.event is None:
            self.backend._flush()
        if self.event is not None:
            torch.cuda.current_stream(self.backend.device).wait_event(self.event)
        return True

    def is_completed(self):
        return self.event is not None and self.event.query()


class NCCLCollectives(Collectives):
    """Collectives through libnccl called with ctypes, one communicator for `group` (see the module docstring).

    group: a process group (None: the world); stats: a comm.CommStats; device: the CUDA device (default:
    the current one); library: an NCCLLibrary (default: loaded as load_library does). Constructing it is collective
    over the group. Tensors must be on `device`; non-contiguous ones go through a contiguous copy.
    """

    def __init__(self, group=None, stats=None, device=None, library=None):
        super().__init__(group, stats)
        device = torch.device(device) if device is not None else torch.device("cuda", torch.cuda.current_device())
        self.check_available(device)
        self.device, self.nccl = device, library or self.load_library()
        uid = [bytes(bytearray(self.nccl.unique_id().internal)) if self.rank == 0 else None]
        dist.broadcast_object_list(uid, group=group, group_src=0)
        self.comm = ctypes.c_void_p()
        with torch.cuda.device(device):
            self.nccl.call("ncclCommInitRank", ctypes.byref(self.comm), self.world_size,
                           ncclUniqueId.from_buffer_copy(uid[0]), self.rank)
        self._queued = []  # sends not issued yet: (tensor, dst, work)
        self._connected = set()  # peers whose point-to-point channels are connected both ways (_connect)
        _OPEN.append(self)

    @staticmethod
    def load_library():
        """The NCCLLibrary this backend calls when none is given: libnccl (load_library's search)."""
        return NCCLLibrary()

    @staticmethod
    def check_available(device):
        """Raise ValueError (one line) unless `device` is a CUDA device and libnccl loads."""
        device = torch.device(device)
        if device.type != "cuda" or not torch.cuda.is_available():
            raise ValueError("variant 'nccl' calls libnccl on CUDA tensors, and this process has no GPU "
                             f"(device {device}, torch.cuda.is_available()={torch.cuda.is_available()}); "
                             "use variant 'triton' or 'custom' on CPU")
        try:
            load_library()
        except OSError as e:
            raise ValueError(f"variant 'nccl': {e}") from None

    def check(self):
        """Raise NCCLError if an operation of this communicator failed on the device after its call had returned
        (ncclCommGetAsyncError: how NCCL reports a peer's failure or, in libnanoccl, a wait that timed out), with the
        library's message."""
        result = ctypes.c_int()
        self.nccl.call("ncclCommGetAsyncError", self.comm, ctypes.byref(result))
        if result.value != 0:
            detail = self.nccl.last_error()
            raise NCCLError("ncclCommGetAsyncError", result.value,
                            self.nccl.error_string(result.value) + (f"; {detail}" if detail else ""))

    def close(self):
        """Destroy the communicator (after the device finished its work)."""
        if self in _OPEN:
            _OPEN.remove(self)
        if self.comm is not None:
            torch.cuda.synchronize(self.device)
            self.nccl.call("ncclCommDestroy", self.comm)
            self.comm = None

    # --- helpers ---

    def _stream(self):
        return ctypes.c_void_p(torch.cuda.current_stream(self.device).cuda_stream)

    def _work(self, async_op):
        if not async_op:
            return None
        event = torch.cuda.Event()
        event.record(torch.cuda.current_stream(self.device))
        return _Work(self, event)

    @staticmethod
    def _contiguous(tensor):
        return tensor if tensor.is_contiguous() else tensor.contiguous()

    def _connect(self, peers):
        """Connect the point-to-point channels with each of `peers` not yet connected in both directions at once: one
        NCCL group of a 4-byte send and receive with each (see the module docstring). Both sides call it before their
        first message to each other, which is the same point of their matched message order."""
        new = sorted(set(peers) - self._connected - {self.rank})
        if not new:
            return
        self._connected |= set(new)
        token, inbox = torch.zeros(1, device=self.device), torch.empty(len(new), device=self.device)
        self.nccl.call("ncclGroupStart")
        try:
            for i, peer in enumerate(new):
                self.nccl.call("ncclSend", _p(token.data_ptr()), 1, nccl_dtype(token.dtype), peer, self.comm,
                               self._stream())
                self.nccl.call("ncclRecv", _p(inbox[i:].data_ptr()), 1, nccl_dtype(inbox.dtype), peer, self.comm,
                               self._stream())
        finally:
            self.nccl.call("ncclGroupEnd")

    def _flush(self, then=None, peer=None):
        """Issue the queued sends, and then() if given (a receive from `peer`), in one NCCL group."""
        if not self._queued and then is None:
            return
        self._connect([dst for _, dst, _ in self._queued] + ([peer] if peer is not None else []))
        self.nccl.call("ncclGroupStart")
        try:
            for tensor, dst, work in self._queued:
                self.nccl.call("ncclSend", _p(tensor.data_ptr()), tensor.numel(), nccl_dtype(tensor.dtype), dst,
                               self.comm, self._stream())
            if then is not None:
                then()
        finally:
            self.nccl.call("ncclGroupEnd")
        for tensor, dst, work in self._queued:
            if work is not None:
                work.event = torch.cuda.Event()
                work.event.record(torch.cuda.current_stream(self.device))
        self._queued = []

    # --- collectives ---

    def _all_reduce(self, tensor, op, async_op):
        self._flush()
        t = self._contiguous(tensor)
        self.nccl.call("ncclAllReduce", _p(t.data_ptr()), _p(t.data_ptr()), t.numel(), nccl_dtype(t.dtype),
                       REDUCE_OPS[op], self.comm, self._stream())
        if t is not tensor:
            tensor.copy_(t)
        return self._work(async_op)

    def _all_gather(self, output, input, async_op):
        self._flush()
        src, out = self._contiguous(input), self._contiguous(output)
        self.nccl.call("ncclAllGather", _p(src.data_ptr()), _p(out.data_ptr()), src.numel(), nccl_dtype(src.dtype),
                       self.comm, self._stream())
        if out is not output:
            output.copy_(out)
        return self._work(async_op)

    def _reduce_scatter(self, output, input, op, async_op):
        self._flush()
        src, out = self._contiguous(input), self._contiguous(output)
        self.nccl.call("ncclReduceScatter", _p(src.data_ptr()), _p(out.data_ptr()), out.numel(),
                       nccl_dtype(src.dtype), REDUCE_OPS[op], self.comm, self._stream())
        if out is not output:
            output.copy_(out)
        return self._work(async_op)

    def _broadcast(self, tensor, src, async_op):
        self._flush()
        t = self._contiguous(tensor)
        self.nccl.call("ncclBroadcast", _p(t.data_ptr()), _p(t.data_ptr()), t.numel(), nccl_dtype(t.dtype), src,
                       self.comm, self._stream())
        if t is not tensor:
            tensor.copy_(t)
        return self._work(async_op)

    def _all_to_all(self, output, input, output_split_sizes, input_split_sizes, async_op):
        """The NCCL User Guide's all-to-all ("Point-to-point communication"): in one group, an ncclSend of chunk j
        to every rank j and an ncclRecv of chunk j from it, at the split sizes' offsets (zero-size chunks skipped)."""
        self._flush()
        self._connect(range(self.world_size))  # uneven chunks may go one way only: connect both ways first
        src, out = self._contiguous(input), self._contiguous(output)
        dtype, es, N = nccl_dtype(src.dtype), src.element_size(), self.world_size
        chunks = []
        for t, splits in ((src, input_split_sizes), (out, output_split_sizes)):
            rows = splits if splits is not None else [t.shape[0] // N] * N
            width = t[0].numel() if t.shape[0] else 0
            starts = [sum(rows[:j]) for j in range(N)]
            chunks.append([(t.data_ptr() + s * width * es, n * width) for s, n in zip(starts, rows)])
        self.nccl.call("ncclGroupStart")
        try:
            for peer, ((send_at, send_n), (recv_at, recv_n)) in enumerate(zip(*chunks)):
                if send_n:
                    self.nccl.call("ncclSend", _p(send_at), send_n, dtype, peer, self.comm, self._stream())
                if recv_n:
                    self.nccl.call("ncclRecv", _p(recv_at), recv_n, dtype, peer, self.comm, self._stream())
        finally:
            self.nccl.call("ncclGroupEnd")
        if out is not output:
            output.copy_(out)
        return self._work(async_op)

    def _send(self, tensor, dst, async_op):
        work = _Work(self, send=True) if async_op else None
        self._queued.append((self._contiguous(tensor), dst, work))
        if not async_op:
            self._flush()
        return work

    def _recv(self, tensor, src, async_op):
        t = self._contiguous(tensor)
        self._flush(lambda: self.nccl.call("ncclRecv", _p(t.data_ptr()), t.numel(), nccl_dtype(t.dtype), src,
                                           self.comm, self._stream()), peer=src)
        if t is not tensor:
            tensor.copy_(t)
        return self._work(async_op)

    def _barrier(self):
        self._flush()
        one = torch.ones(1, device=self.device)
        self._all_reduce(one, "sum", False)
        torch.cuda.synchronize(self.device)
        self.check()


class CudaCollectives(NCCLCollectives):
    """The `cuda` variant's backend: NCCLCollectives, the same binding line for line, over libnanoccl instead of
    libnccl: our own implementation of the NCCL API it calls (kernels/cuda/; docs/nanoccl.md), compiled with
    nvcc at first use into a cache (kernels/cuda/build.py; $NANOPARALLEL_NANOCCL_LIB names a prebuilt one).

    Arguments as NCCLCollectives (library: an NCCLLibrary of libnanoccl, default: built or found by
    kernels.cuda.build.library_path). The communicator reads its settings from NANOCCL_* environment variables when
    it is made (kernels/cuda/plan.h's Config: channels, FIFO slots and their size, the one-shot all-reduce's
    threshold, NANOCCL_TIMEOUT_S for every wait); every rank needs the same. Ranks may share a GPU (no NCCL_HOSTID
    needed) or sit on different GPUs of one host with peer access.
    """

    @staticmethod
    def load_library():
        from kernels.cuda.build import library_path
        return NCCLLibrary(library_path())

    @staticmethod
    def check_available(device):
        """Raise ValueError (one line) unless `device` is a CUDA device and libnanoccl is built or nvcc can build it."""
        device = torch.device(device)
        if device.type != "cuda" or not torch.cuda.is_available():
            raise ValueError("variant 'cuda' runs libnanoccl's kernels on CUDA tensors, and this process has no GPU "
                             f"(device {device}, torch.cuda.is_available()={torch.cuda.is_available()}); "
                             "use variant 'triton' or 'custom' on CPU")
        from kernels.cuda import build
        try:
            if build.library_path(build_if_missing=False) is None and build.find_nvcc() is None:
                raise build.nvcc_missing()
        except (build.NvccNotFound, FileNotFoundError) as e:
            raise ValueError(f"variant 'cuda': {e}") from None
