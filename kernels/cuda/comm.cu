/*
 * libnanoccl's host side: NCCL's API (nccl.h) over CUDA IPC and the kernels of algorithms.h.
 *
 * A communicator (struct ncclComm) holds:
 *   - its rank, nranks, CUDA device, and the configuration every rank shares (plan.h's Config, from NANOCCL_*);
 *   - its region: one cudaMalloc'd block with this rank's flags, FIFOs and one-shot stage (plan.h's Layout), shared
 *     with every other rank through CUDA IPC: ncclCommInitRank exports a cudaIpcMemHandle_t, the bootstrap
 *     (bootstrap.cc) all-gathers every rank's handle, and each rank opens the others' with cudaIpcOpenMemHandle
 *     (a process cannot open its own handle: for itself it keeps the pointer). `bases` is the table of every rank's
 *     region as this process addresses it; the kernels get a copy in device memory;
 *   - the sequence numbers of its connections (a ring connection per channel each way, a point-to-point connection
 *     per peer each way, the count of one-shot calls): the host numbers every slot a kernel will move, so a kernel
 *     keeps no state between launches and all ranks agree as long as they make the same calls (NCCL's rule too);
 *   - an error record in pinned host memory that a failing kernel fills (a wait that timed out, a mismatched call,
 *     another rank's failure): every later call returns that error (and ncclCommGetAsyncError reports it), with a
 *     message for ncclGetLastError.
 * Collectives are enqueued on the caller's stream and return at once: the host never waits for the device inside a
 * collective. ncclSend/ncclRecv outside a group are a group of one; inside ncclGroupStart/End they are gathered and
 * launched at ncclGroupEnd as one kernel per communicator and stream, one block per (peer, direction).
 */

#include <cuda_runtime.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include <algorithm>
#include <string>
#include <vector>

#include "internal.h"
#include "nanoccl.h"
#include "nccl.h"
#include "plan.h"

#define NANOCCL_API extern "C" __attribute__((visibility("default")))

using namespace nanoccl;

static const u64 kCommMagic = 0x6e616e6f63636c31ull;   // "nanoccl1": a live communicator

struct ncclComm {
  u64 magic;
  int rank, nranks, device;
  bool emulated;      // nanocclEmuCommInitRank: host memory, kernels on CPU threads
  bool test_only;     // nanocclTestCommCreate: no memory, cannot launch
  Config cfg;
  Layout L;
  char* region;                   // this rank's shared region
  std::vector<char*> bases;       // every rank's region in this process (peers: opened with CUDA IPC)
  std::vector<bool> opened;       // bases[p] was opened with cudaIpcOpenMemHandle (close it)
  char** dev_bases;               // bases in device memory: the kernels' table
  ErrorRecord* err;               // the error record (pinned host memory)
  ErrorRecord* err_dev;           // its device address
  std::vector<u64> ring_send, ring_recv;   // per channel: the next sequence number of its ring connections
  std::vector<u64> p2p_send, p2p_recv;     // per peer: the next sequence number of its point-to-point connections
  u64 self_sent, self_received;            // messages this rank sent to itself and received from itself
  u64 oneshot_calls;
  std::string async_message;      // the error record as text, once read
};

// ---------------------------------------------------------------------------------------------------------------
// errors

static thread_local char last_error_text[2048];

ncclResult_t nanoccl::set_error(ncclResult_t code, const char* fmt, ...) {
  va_list args;
  va_start(args, fmt);
  vsnprintf(last_error_text, sizeof last_error_text, fmt, args);
  va_end(args);
  if (getenv("NANOCCL_DEBUG")) fprintf(stderr, "nanoccl WARN %s\n", last_error_text);
  return code;
}

#define NCCL_TRY(call)                          \
  do {                                          \
    ncclResult_t result_ = (call);              \
    if (result_ != ncclSuccess) return result_; \
  } while (0)

static ncclResult_t cuda_error(cudaError_t e, const char* what) {
  return set_error(ncclUnhandledCudaError, "%s: CUDA error %d: %s", what, (int)e, cudaGetErrorString(e));
}

#define CUDA_TRY(call)                                   \
  do {                                                   \
    cudaError_t e_ = (call);                             \
    if (e_ != cudaSuccess) return cuda_error(e_, #call); \
  } while (0)

static const char* type_name(int t) {
  static const char* names[] = {"ncclInt8", "ncclUint8", "ncclInt32", "ncclUint32", "ncclInt64",
                                "ncclUint64", "ncclFloat16", "ncclFloat32", "ncclFloat64", "ncclBfloat16"};
  return t >= 0 && t < kNumTypes ? names[t] : "an unknown type";
}

static const char* op_name(int op) {
  static const char* names[] = {"ncclSum", "ncclProd", "ncclMax", "ncclMin", "ncclAvg"};
  return op >= 0 && op < kNumOps ? names[op] : "an unknown op";
}

// A call's descriptor (plan.h's make_desc) as text.
static std::string describe_call(u64 desc) {
  int kind = desc >> 60, dtype = (desc >> 56) & 15, op = (desc >> 52) & 15, root = (desc >> 40) & 4095;
  unsigned long long count = desc & ((1ull << 40) - 1);
  char text[160];
  switch (kind) {
    case kAllReduce:
      snprintf(text, sizeof text, "ncclAllReduce(count=%llu, %s, %s)", count, type_name(dtype), op_name(op));
      break;
    case kReduceScatter:
      snprintf(text, sizeof text, "ncclReduceScatter(recvcount=%llu, %s, %s)", count, type_name(dtype), op_name(op));
      break;
    case kAllGather: snprintf(text, sizeof text, "ncclAllGather(sendcount=%llu, %s)", count, type_name(dtype)); break;
    case kBroadcast:
      snprintf(text, sizeof text, "ncclBroadcast(count=%llu, %s, root=%d)", count, type_name(dtype), root);
      break;
    case kP2P: snprintf(text, sizeof text, "a message of %llu bytes (ncclSend/ncclRecv)", count); break;
    case 0: snprintf(text, sizeof text, "ncclCommDestroy"); break;
    default: snprintf(text, sizeof text, "an unknown call (descriptor %#llx)", desc);
  }
  return text;
}

// The error record a kernel wrote, as one line.
static std::string describe_error(const ncclComm* c) {
  const ErrorRecord& e = *c->err;
  char text[1024];
  std::string call = describe_call(e.desc);
  switch (e.what) {
    case kMismatch:
      snprintf(text, sizeof text,
               "rank %d in %s received %s from rank %d: the ranks called different collectives (or counts, types, "
               "ops, roots, message sizes)",
               c->rank, call.c_str(), describe_call(e.peer_desc).c_str(), e.peer);
      break;
    case kAborted:
      snprintf(text, sizeof text, "rank %d stopped %s because rank %d failed or called ncclCommAbort (its error "
               "says why)", c->rank, call.c_str(), e.peer);
      break;
    default: {
      static const char* waits[] = {"", "for data from", "for a free slot at", "for the staged input of",
                                    "for the end of the read of its stage by", "in ncclCommDestroy for"};
      snprintf(text, sizeof text,
               "rank %d in %s timed out after %g s (NANOCCL_TIMEOUT_S) waiting %s rank %d (block %d, sequence number "
               "%llu): that rank stalled, died, or called something else",
               c->rank, call.c_str(), c->cfg.timeout_ns * 1e-9, e.what >= 1 && e.what <= kWaitClose ? waits[e.what]
                                                                                                  : "for",
               e.peer, e.channel, (unsigned long long)e.step);
    }
  }
  return text;
}

// The error a kernel of this communicator recorded, if any (NCCL's asynchronous errors).
static ncclResult_t async_error(ncclComm* c) {
  int code = c->err->code;
  if (code == 0) return ncclSuccess;
  if (c->async_message.empty()) c->async_message = describe_error(c);
  return set_error((ncclResult_t)code, "%s", c->async_message.c_str());
}

static ncclResult_t check_comm(ncclComm_t comm, const char* fn) {
  if (!comm) return set_error(ncclInvalidArgument, "%s: comm is NULL", fn);
  if (comm->magic != kCommMagic)
    return set_error(ncclInvalidArgument, "%s: comm is not a live communicator (destroyed, or not made here)", fn);
  return ncclSuccess;
}

static ncclResult_t check_type(int dtype, bool reduction, const char* fn) {
  if (dtype < 0 || dtype >= kNumTypes)
    return set_error(ncclInvalidArgument, "%s: datatype %d is not an ncclDataType_t", fn, dtype);
  if (reduction && dtype != kFloat32 && dtype != kFloat16 && dtype != kBfloat16)
    return set_error(ncclInvalidArgument, "%s: libnanoccl reduces ncclFloat32, ncclFloat16 and ncclBfloat16, not %s",
                     fn, type_name(dtype));
  return ncclSuccess;
}

// ---------------------------------------------------------------------------------------------------------------
// configuration and the plan

static ncclResult_t read_u64(const char* name, u64 lo, u64 hi, u64 multiple, u64* out) {
  const char* s = getenv(name);
  if (!s || !*s) return ncclSuccess;
  char* end = nullptr;
  unsigned long long v = strtoull(s, &end, 10);
  if (*end || v < lo || v > hi || v % multiple)
    return set_error(ncclInvalidArgument, "%s=%s: must be an integer from %llu to %llu%s", name, s,
                     (unsigned long long)lo, (unsigned long long)hi,
                     multiple > 1 ? ", a multiple of 16" : "");
  *out = v;
  return ncclSuccess;
}

// NANOCCL_TIMEOUT_S (300): how long any wait may last. NANOCCL_BOOTSTRAP_TIMEOUT_S (the same by default): how long
// the bootstrap waits for every rank to arrive (ncclGetUniqueId's root, and each rank in ncclCommInitRank).
static ncclResult_t read_seconds(const char* name, double fallback, double* seconds) {
  *seconds = fallback;
  const char* s = getenv(name);
  if (!s || !*s) return ncclSuccess;
  char* end = nullptr;
  double v = strtod(s, &end);
  if (*end || !(v > 0) || v > 1e7)
    return set_error(ncclInvalidArgument, "%s=%s: must be a number of seconds > 0", name, s);
  *seconds = v;
  return ncclSuccess;
}

static ncclResult_t read_timeout(double* seconds) { return read_seconds("NANOCCL_TIMEOUT_S", 300, seconds); }

static ncclResult_t read_bootstrap_timeout(double* seconds) {
  double timeout_s;
  NCCL_TRY(read_timeout(&timeout_s));
  return read_seconds("NANOCCL_BOOTSTRAP_TIMEOUT_S", timeout_s, seconds);
}

static ncclResult_t read_config(Config* c) {
  u64 channels = 4, slots = 8, slot_bytes = 256 << 10, oneshot_bytes = 256 << 10;
  double timeout_s;
  NCCL_TRY(read_u64("NANOCCL_NCHANNELS", 1, kMaxChannels, 1, &channels));
  NCCL_TRY(read_u64("NANOCCL_SLOTS", 2, 64, 1, &slots));   // a ring step needs 2: see step_begin
  NCCL_TRY(read_u64("NANOCCL_SLOT_BYTES", 16, 64ull << 20, 16, &slot_bytes));
  NCCL_TRY(read_u64("NANOCCL_ONESHOT_BYTES", 0, 64ull << 20, 16, &oneshot_bytes));
  NCCL_TRY(read_timeout(&timeout_s));
  c->nchannels = (int)channels;
  c->slots = (int)slots;
  c->slot_bytes = slot_bytes;
  c->oneshot_bytes = oneshot_bytes;
  c->timeout_ns = (u64)(timeout_s * 1e9);
  return ncclSuccess;
}

// Which algorithm a collective takes and, for the ring, its chunk and rounds (every rank computes the same).
static void make_plan(int kind, u64 count, int nranks, int esize, const Config& cfg, int* algorithm, u64* chunk,
                      u64* rounds) {
  *chunk = *rounds = 0;
  if (nranks == 1) {
    *algorithm = kAlgoCopy;
  } else if (kind == kAllReduce && count * esize <= cfg.oneshot_bytes) {
    *algorithm = kAlgoOneShot;
  } else {
    *algorithm = kAlgoRing;
    *chunk = ring_chunk(count, kind == kAllReduce ? nranks : 1, cfg.nchannels, cfg.slot_bytes, esize);
    *rounds = ring_rounds(kind, count, nranks, *chunk);
  }
}

static DevComm view(const ncclComm* c) {
  DevComm d;
  d.rank = c->rank;
  d.nranks = c->nranks;
  d.nchannels = c->cfg.nchannels;
  d.slots = c->cfg.slots;
  d.slot_bytes = c->cfg.slot_bytes;
  d.oneshot_bytes = c->cfg.oneshot_bytes;
  d.timeout_ns = c->cfg.timeout_ns;
  d.bases = c->dev_bases;
  d.L = c->L;
  d.err = c->err_dev;
  return d;
}

// Makes the communicator's device current for the scope, as NCCL does around its launches.
struct DeviceGuard {
  int previous = -1;
  ncclResult_t enter(int device) {
    CUDA_TRY(cudaGetDevice(&previous));
    if (previous != device) CUDA_TRY(cudaSetDevice(device));
    return ncclSuccess;
  }
  ~DeviceGuard() {
    int now;
    if (previous >= 0 && cudaGetDevice(&now) == cudaSuccess && now != previous) cudaSetDevice(previous);
  }
};

// ---------------------------------------------------------------------------------------------------------------
// communicators

struct RankInfo {   // what each rank tells the others through the bootstrap
  u64 host;         // hash of the host name: every rank must be on this host
  int pid, device, emulated, nchannels, slots, pad;
  u64 slot_bytes, oneshot_bytes;
  cudaIpcMemHandle_t handle;   // of the region
  u64 region;       // the region's address in its own process (used when emulated: all ranks in this process)
};

static u64 host_hash() {
  char name[256] = {0};
  gethostname(name, sizeof name - 1);
  u64 h = 1469598103934665603ull;   // FNV-1a
  for (const char* p = name; *p; p++) h = (h ^ (unsigned char)*p) * 1099511628211ull;
  return h;
}

static void release(ncclComm* c) {
  if (!c->emulated && !c->test_only) {
    DeviceGuard guard;
    if (c->device >= 0) guard.enter(c->device);
    for (int p = 0; p < (int)c->opened.size(); p++)
      if (c->opened[p]) cudaIpcCloseMemHandle(c->bases[p]);
    if (c->dev_bases) cudaFree(c->dev_bases);
    if (c->region) cudaFree(c->region);
    if (c->err) cudaFreeHost(c->err);
  } else {
    free(c->region);
    free(c->err);
  }
  c->magic = 0;
  delete c;
}

// Allocate this rank's region, exchange every rank's RankInfo, open the peers' regions.
static ncclResult_t join_ranks(ncclComm* c, const ncclUniqueId& id) {
  const int N = c->nranks;
  RankInfo mine;
  memset(&mine, 0, sizeof mine);
  mine.host = host_hash();
  mine.pid = getpid();
  mine.emulated = c->emulated;
  mine.nchannels = c->cfg.nchannels;
  mine.slots = c->cfg.slots;
  mine.slot_bytes = c->cfg.slot_bytes;
  mine.oneshot_bytes = c->cfg.oneshot_bytes;
  if (c->emulated) {
    c->region = (char*)aligned_alloc(256, c->L.total);
    c->err = (ErrorRecord*)calloc(1, sizeof(ErrorRecord));
    if (!c->region || !c->err) return set_error(ncclSystemError, "ncclCommInitRank: out of host memory");
    memset(c->region, 0, c->L.total);
    c->err_dev = c->err;
    mine.region = (u64)c->region;
    mine.device = -1;
  } else {
    CUDA_TRY(cudaGetDevice(&c->device));
    CUDA_TRY(cudaMalloc((void**)&c->region, c->L.total));
    CUDA_TRY(cudaMemset(c->region, 0, c->L.total));
    CUDA_TRY(cudaDeviceSynchronize());   // zero before any peer can have the handle
    CUDA_TRY(cudaIpcGetMemHandle(&mine.handle, c->region));
    CUDA_TRY(cudaHostAlloc((void**)&c->err, sizeof(ErrorRecord), cudaHostAllocMapped));
    memset((void*)c->err, 0, sizeof(ErrorRecord));
    CUDA_TRY(cudaHostGetDevicePointer((void**)&c->err_dev, c->err, 0));
    mine.device = c->device;
  }
  std::vector<RankInfo> all(N);
  double bootstrap_timeout_s;
  NCCL_TRY(read_bootstrap_timeout(&bootstrap_timeout_s));
  NCCL_TRY(bootstrap_allgather(&id, N, c->rank, &mine, sizeof mine, all.data(), bootstrap_timeout_s));
  for (int p = 0; p < N; p++) {
    const RankInfo& o = all[p];
    if (o.emulated != mine.emulated)
      return set_error(ncclInvalidUsage, "ncclCommInitRank: rank %d is emulated and rank %d is not", o.emulated ? p : c->rank,
                       o.emulated ? c->rank : p);
    if (o.host != mine.host)
      return set_error(ncclInvalidUsage, "ncclCommInitRank: ranks %d and %d are on different hosts: libnanoccl "
                       "shares memory with CUDA IPC, within one host", c->rank, p);
    if (o.nchannels != mine.nchannels || o.slots != mine.slots || o.slot_bytes != mine.slot_bytes ||
        o.oneshot_bytes != mine.oneshot_bytes)
      return set_error(ncclInvalidUsage, "ncclCommInitRank: rank %d has NANOCCL_NCHANNELS=%d NANOCCL_SLOTS=%d "
                       "NANOCCL_SLOT_BYTES=%llu NANOCCL_ONESHOT_BYTES=%llu and rank %d has %d %d %llu %llu: every rank "
                       "needs the same settings", c->rank, mine.nchannels, mine.slots, mine.slot_bytes,
                       mine.oneshot_bytes, p, o.nchannels, o.slots, o.slot_bytes, o.oneshot_bytes);
    if (p != c->rank && !c->emulated && o.pid == mine.pid)
      return set_error(ncclInvalidUsage, "ncclCommInitRank: ranks %d and %d are in one process (pid %d): libnanoccl "
                       "needs a process per rank (CUDA IPC cannot open a handle in the process that made it)",
                       c->rank, p, mine.pid);
    if (c->emulated && o.pid != mine.pid)
      return set_error(ncclInvalidUsage, "nanocclEmuCommInitRank: emulated ranks must be threads of one process");
  }
  c->bases.assign(N, nullptr);
  c->opened.assign(N, false);
  for (int p = 0; p < N; p++) {
    if (p == c->rank) {
      c->bases[p] = c->region;
    } else if (c->emulated) {
      c->bases[p] = (char*)all[p].region;
    } else {
      cudaError_t e = cudaIpcOpenMemHandle((void**)&c->bases[p], all[p].handle, cudaIpcMemLazyEnablePeerAccess);
      if (e != cudaSuccess)
        return set_error(ncclUnhandledCudaError, "ncclCommInitRank: cudaIpcOpenMemHandle of rank %d's memory (device "
                         "%d; rank %d is on device %d): %s (ranks on different GPUs need peer access)",
                         p, all[p].device, c->rank, c->device, cudaGetErrorString(e));
      c->opened[p] = true;
    }
  }
  if (c->emulated) {
    c->dev_bases = c->bases.data();
  } else {
    CUDA_TRY(cudaMalloc((void**)&c->dev_bases, N * sizeof(char*)));
    CUDA_TRY(cudaMemcpy(c->dev_bases, c->bases.data(), N * sizeof(char*), cudaMemcpyHostToDevice));
  }
  return ncclSuccess;
}

static ncclComm* new_comm(int nranks, int rank) {
  ncclComm* c = new ncclComm();
  c->magic = kCommMagic;
  c->rank = rank;
  c->nranks = nranks;
  c->device = -1;
  c->emulated = c->test_only = false;
  c->region = nullptr;
  c->dev_bases = nullptr;
  c->err = c->err_dev = nullptr;
  c->oneshot_calls = c->self_sent = c->self_received = 0;
  return c;
}

static ncclResult_t init_rank(ncclComm_t* out, int nranks, const ncclUniqueId& id, int rank, bool emulated,
                              const char* fn) {
  if (!out) return set_error(ncclInvalidArgument, "%s: comm is NULL", fn);
  *out = nullptr;
  if (nranks < 1 || nranks > kMaxRanks)
    return set_error(ncclInvalidArgument, "%s: nranks=%d is not in 1..%d", fn, nranks, kMaxRanks);
  if (rank < 0 || rank >= nranks)
    return set_error(ncclInvalidArgument, "%s: rank=%d is not in 0..%d", fn, rank, nranks - 1);
  if (!is_nanoccl_id(&id))
    return set_error(ncclInvalidArgument,
                     "%s: the unique id was not made by libnanoccl's ncclGetUniqueId (another library's, or zeros)", fn);
  Config cfg;
  NCCL_TRY(read_config(&cfg));
  ncclComm* c = new_comm(nranks, rank);
  c->emulated = emulated;
  c->cfg = cfg;
  c->L = make_layout(nranks, cfg);
  c->ring_send.assign(cfg.nchannels, 0);
  c->ring_recv.assign(cfg.nchannels, 0);
  c->p2p_send.assign(nranks, 0);
  c->p2p_recv.assign(nranks, 0);
  ncclResult_t result = join_ranks(c, id);
  if (result != ncclSuccess) {
    release(c);
    return result;
  }
  *out = c;
  return ncclSuccess;
}

NANOCCL_API ncclResult_t ncclGetUniqueId(ncclUniqueId* uniqueId) {
  if (!uniqueId) return set_error(ncclInvalidArgument, "ncclGetUniqueId: uniqueId is NULL");
  double timeout_s;
  NCCL_TRY(read_bootstrap_timeout(&timeout_s));
  return bootstrap_root(uniqueId, timeout_s);
}

NANOCCL_API ncclResult_t ncclCommInitRank(ncclComm_t* comm, int nranks, ncclUniqueId commId, int rank) {
  return init_rank(comm, nranks, commId, rank, false, "ncclCommInitRank");
}

NANOCCL_API ncclResult_t nanocclEmuCommInitRank(ncclComm_t* comm, int nranks, ncclUniqueId commId, int rank) {
  return init_rank(comm, nranks, commId, rank, true, "nanocclEmuCommInitRank");
}

NANOCCL_API ncclResult_t nanocclTestCommCreate(int nranks, int rank, ncclComm_t* comm) {
  if (!comm) return set_error(ncclInvalidArgument, "nanocclTestCommCreate: comm is NULL");
  if (nranks < 1 || nranks > kMaxRanks || rank < 0 || rank >= nranks)
    return set_error(ncclInvalidArgument, "nanocclTestCommCreate: rank %d of %d", rank, nranks);
  ncclComm* c = new_comm(nranks, rank);
  c->test_only = true;
  c->err = c->err_dev = (ErrorRecord*)calloc(1, sizeof(ErrorRecord));
  if (read_config(&c->cfg) != ncclSuccess) c->cfg = Config{4, 8, 256 << 10, 256 << 10, 300000000000ull};
  *comm = c;
  return ncclSuccess;
}

// NCCL's ncclCommDestroy: wait for this rank's work, meet every rank in a last barrier (so that no rank frees its
// region while another still writes into it), then release everything.
NANOCCL_API ncclResult_t ncclCommDestroy(ncclComm_t comm) {
  NCCL_TRY(check_comm(comm, "ncclCommDestroy"));
  if (!comm->test_only && comm->nranks > 1 && comm->err->code == 0) {
    CollArgs a;
    memset(&a, 0, sizeof a);
    a.c = view(comm);
    if (comm->emulated) {
      emu::launch_close(a);
    } else {
      DeviceGuard guard;
      cudaStream_t stream;
      if (guard.enter(comm->device) == ncclSuccess && cudaDeviceSynchronize() == cudaSuccess &&
          cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking) == cudaSuccess) {
        dev::launch_close(a, stream);
        cudaStreamSynchronize(stream);
        cudaStreamDestroy(stream);
      }
    }
    if (comm->err->code != 0)
      fprintf(stderr, "nanoccl WARN ncclCommDestroy: %s\n", describe_error(comm).c_str());
  } else if (!comm->test_only && !comm->emulated) {
    DeviceGuard guard;
    if (guard.enter(comm->device) == ncclSuccess) cudaDeviceSynchronize();
  }
  release(comm);
  return ncclSuccess;
}

// NCCL's ncclCommAbort: make every rank's kernels of this communicator give up (their abort words), wait for this
// rank's to end, release everything. No barrier: the others may be gone.
NANOCCL_API ncclResult_t ncclCommAbort(ncclComm_t comm) {
  NCCL_TRY(check_comm(comm, "ncclCommAbort"));
  if (!comm->test_only) {
    const u64 value = comm->rank + 1;
    if (comm->emulated) {
      for (int p = 0; p < comm->nranks; p++) __atomic_store_n((u64*)(comm->bases[p] + comm->L.abort), value,
                                                               __ATOMIC_RELEASE);
    } else {
      DeviceGuard guard;
      cudaStream_t stream;   // non-blocking: not ordered after the kernels it must stop
      if (guard.enter(comm->device) == ncclSuccess &&
          cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking) == cudaSuccess) {
        for (int p = 0; p < comm->nranks; p++)
          cudaMemcpyAsync(comm->bases[p] + comm->L.abort, &value, sizeof value, cudaMemcpyHostToDevice, stream);
        cudaStreamSynchronize(stream);
        cudaStreamDestroy(stream);
        cudaDeviceSynchronize();
      }
    }
  }
  release(comm);
  return ncclSuccess;
}

NANOCCL_API ncclResult_t ncclCommGetAsyncError(ncclComm_t comm, ncclResult_t* asyncError) {
  NCCL_TRY(check_comm(comm, "ncclCommGetAsyncError"));
  if (!asyncError) return set_error(ncclInvalidArgument, "ncclCommGetAsyncError: asyncError is NULL");
  *asyncError = (ncclResult_t)comm->err->code;
  if (*asyncError != ncclSuccess) async_error(comm);   // its message for ncclGetLastError
  return ncclSuccess;
}

NANOCCL_API ncclResult_t ncclCommCount(const ncclComm_t comm, int* count) {
  NCCL_TRY(check_comm(comm, "ncclCommCount"));
  if (!count) return set_error(ncclInvalidArgument, "ncclCommCount: count is NULL");
  *count = comm->nranks;
  return ncclSuccess;
}

NANOCCL_API ncclResult_t ncclCommUserRank(const ncclComm_t comm, int* rank) {
  NCCL_TRY(check_comm(comm, "ncclCommUserRank"));
  if (!rank) return set_error(ncclInvalidArgument, "ncclCommUserRank: rank is NULL");
  *rank = comm->rank;
  return ncclSuccess;
}

// ---------------------------------------------------------------------------------------------------------------
// collectives

// Check a collective's arguments, plan it, number its slots and launch it on `stream`.
static ncclResult_t collective(const char* fn, int kind, const void* src, void* dst, size_t count, int dtype, int op,
                               int root, ncclComm_t comm, cudaStream_t stream) {
  NCCL_TRY(check_comm(comm, fn));
  const bool reduction = kind == kAllReduce || kind == kReduceScatter;
  NCCL_TRY(check_type(dtype, reduction, fn));
  if (reduction && (op < 0 || op >= kNumOps))
    return set_error(ncclInvalidArgument, "%s: op %d is not an ncclRedOp_t (ncclSum..ncclAvg)", fn, op);
  const int N = comm->nranks;
  if (kind == kBroadcast && (root < 0 || root >= N))
    return set_error(ncclInvalidArgument, "%s: root=%d is not in 0..%d", fn, root, N - 1);
  if (count > 0 && !dst) return set_error(ncclInvalidArgument, "%s: recvbuff is NULL", fn);
  if (count > 0 && !src && (kind != kBroadcast || comm->rank == root))
    return set_error(ncclInvalidArgument, "%s: sendbuff is NULL", fn);
  NCCL_TRY(async_error(comm));
  if (count == 0) return ncclSuccess;
  if (comm->test_only)
    return set_error(ncclInvalidUsage, "%s: a test communicator (nanocclTestCommCreate) cannot launch", fn);

  const int esize = dtype_size(dtype);
  CollArgs a;
  memset(&a, 0, sizeof a);
  a.c = view(comm);
  a.kind = kind;
  a.dtype = dtype;
  a.op = op == kAvg ? kSum : op;
  a.avg = op == kAvg;
  a.root = root;
  a.src = src;
  a.dst = dst;
  a.count = count;
  a.desc = make_desc(kind, dtype, reduction ? op : 0, kind == kBroadcast ? root : 0, count);
  make_plan(kind, count, N, esize, comm->cfg, &a.algorithm, &a.chunk, &a.rounds);

  if (a.algorithm == kAlgoCopy) {   // one rank: any reduction of one input is the input
    if (src == dst) return ncclSuccess;
    if (comm->emulated) {
      memcpy(dst, src, count * esize);
      return ncclSuccess;
    }
    DeviceGuard guard;
    NCCL_TRY(guard.enter(comm->device));
    CUDA_TRY(cudaMemcpyAsync(dst, src, count * esize, cudaMemcpyDeviceToDevice, stream));
    return ncclSuccess;
  }
  if (a.algorithm == kAlgoOneShot) {
    a.oneshot_seq = ++comm->oneshot_calls;
  } else {
    u64 sends, recvs;
    ring_steps(kind, N, comm->rank, root, &sends, &recvs);
    for (int ch = 0; ch < comm->cfg.nchannels; ch++) {
      a.send_step[ch] = comm->ring_send[ch];
      a.recv_step[ch] = comm->ring_recv[ch];
      u64 rounds = channel_rounds(a.rounds, ch, comm->cfg.nchannels);
      comm->ring_send[ch] += rounds * sends;
      comm->ring_recv[ch] += rounds * recvs;
    }
  }
  if (comm->emulated) {
    emu::launch_coll(a, comm->cfg.nchannels);
    return async_error(comm);
  }
  DeviceGuard guard;
  NCCL_TRY(guard.enter(comm->device));
  cudaError_t e = (cudaError_t)dev::launch_coll(a, comm->cfg.nchannels, stream);
  if (e != cudaSuccess) return cuda_error(e, fn);
  return ncclSuccess;
}

NANOCCL_API ncclResult_t ncclAllReduce(const void* sendbuff, void* recvbuff, size_t count, ncclDataType_t datatype,
                                       ncclRedOp_t op, ncclComm_t comm, cudaStream_t stream) {
  return collective("ncclAllReduce", kAllReduce, sendbuff, recvbuff, count, datatype, op, 0, comm, stream);
}

NANOCCL_API ncclResult_t ncclReduceScatter(const void* sendbuff, void* recvbuff, size_t recvcount,
                                           ncclDataType_t datatype, ncclRedOp_t op, ncclComm_t comm,
                                           cudaStream_t stream) {
  return collective("ncclReduceScatter", kReduceScatter, sendbuff, recvbuff, recvcount, datatype, op, 0, comm,
                    stream);
}

NANOCCL_API ncclResult_t ncclAllGather(const void* sendbuff, void* recvbuff, size_t sendcount,
                                       ncclDataType_t datatype, ncclComm_t comm, cudaStream_t stream) {
  return collective("ncclAllGather", kAllGather, sendbuff, recvbuff, sendcount, datatype, 0, 0, comm, stream);
}

NANOCCL_API ncclResult_t ncclBroadcast(const void* sendbuff, void* recvbuff, size_t count, ncclDataType_t datatype,
                                       int root, ncclComm_t comm, cudaStream_t stream) {
  return collective("ncclBroadcast", kBroadcast, sendbuff, recvbuff, count, datatype, 0, root, comm, stream);
}

// ---------------------------------------------------------------------------------------------------------------
// point-to-point and groups

struct PendingP2P {
  ncclComm* comm;
  cudaStream_t stream;
  char* buf;
  u64 bytes;
  int peer, is_send, elemsize;
};

static thread_local int group_depth = 0;                   // NCCL's group state is per thread, as here
static thread_local std::vector<PendingP2P> pending;

// Launch the pending sends and receives: one kernel per (communicator, stream), in the order they first appear,
// with one block (lane) per (peer, direction); each operation's slots are numbered on its connection. As in NCCL, a
// send to this rank itself and a receive from itself in one group are one copy (a lane of its own, no FIFO): the
// i-th such send goes to the i-th such receive, unless a message sent to itself earlier is still in its FIFO (then
// they all go through the FIFO, in order).
static ncclResult_t launch_ops(ncclComm* c, cudaStream_t stream, const std::vector<PendingP2P>& group) {
  if (group.size() > (size_t)kMaxP2POps)
    return set_error(ncclInvalidUsage, "ncclGroupEnd: %zu sends and receives on one communicator and stream in one "
                     "group; libnanoccl launches at most %d together", group.size(), kMaxP2POps);
  std::vector<size_t> self_sends, self_recvs;
  for (size_t j = 0; j < group.size(); j++)
    if (group[j].peer == c->rank) (group[j].is_send ? self_sends : self_recvs).push_back(j);
  const size_t pairs = c->self_sent == c->self_received ? std::min(self_sends.size(), self_recvs.size()) : 0;
  std::vector<long> source(group.size(), -1);   // a paired receive: the index of its send
  for (size_t k = 0; k < pairs; k++) {
    const PendingP2P &s = group[self_sends[k]], &r = group[self_recvs[k]];
    if (s.bytes != r.bytes)
      return set_error(ncclInvalidUsage, "ncclGroupEnd: rank %d's send of %llu bytes to itself meets its receive of "
                       "%llu bytes", c->rank, (unsigned long long)s.bytes, (unsigned long long)r.bytes);
    source[self_recvs[k]] = (long)self_sends[k];
    source[self_sends[k]] = -2;   // done by the receive's copy
  }
  c->self_sent += self_sends.size();
  c->self_received += self_recvs.size();
  P2PArgs a;
  memset(&a, 0, sizeof a);
  a.c = view(c);
  std::vector<int> lanes;   // 3 * peer + kind of each lane
  bool moves = false;
  for (size_t j = 0; j < group.size(); j++) {
    const PendingP2P& p = group[j];
    if (source[j] == -2) continue;
    P2POp& op = a.ops[a.nops++];
    op.buf = p.buf;
    op.bytes = p.bytes;
    op.peer = p.peer;
    op.elemsize = p.elemsize;
    if (source[j] >= 0) {
      op.kind = kCopyOp;
      op.src = group[source[j]].buf;
      op.elemsize = std::min(p.elemsize, group[source[j]].elemsize);
    } else {
      op.kind = p.is_send ? kSendOp : kRecvOp;
      u64& step = p.is_send ? c->p2p_send[p.peer] : c->p2p_recv[p.peer];
      op.step = step;
      step += ceil_div(p.bytes, c->cfg.slot_bytes);
    }
    int key = 3 * p.peer + op.kind, lane = 0;
    while (lane < (int)lanes.size() && lanes[lane] != key) lane++;
    if (lane == (int)lanes.size()) lanes.push_back(key);
    op.lane = lane;
    moves |= p.bytes > 0;
  }
  if (!moves) return ncclSuccess;
  if (c->emulated) {
    emu::launch_p2p(a, (int)lanes.size());
    return async_error(c);
  }
  DeviceGuard guard;
  NCCL_TRY(guard.enter(c->device));
  cudaError_t e = (cudaError_t)dev::launch_p2p(a, (int)lanes.size(), stream);
  if (e != cudaSuccess) return cuda_error(e, "ncclGroupEnd (sends and receives)");
  return ncclSuccess;
}

static ncclResult_t launch_pending() {
  std::vector<PendingP2P> ops;
  ops.swap(pending);
  ncclResult_t result = ncclSuccess;
  std::vector<bool> done(ops.size(), false);
  for (size_t i = 0; i < ops.size(); i++) {
    if (done[i]) continue;
    std::vector<PendingP2P> group;
    for (size_t j = i; j < ops.size(); j++)
      if (!done[j] && ops[j].comm == ops[i].comm && ops[j].stream == ops[i].stream) {
        group.push_back(ops[j]);
        done[j] = true;
      }
    ncclResult_t r = launch_ops(ops[i].comm, ops[i].stream, group);
    if (r != ncclSuccess) result = r;
  }
  return result;
}

static ncclResult_t p2p(const char* fn, bool is_send, const void* buf, size_t count, int dtype, int peer,
                        ncclComm_t comm, cudaStream_t stream) {
  NCCL_TRY(check_comm(comm, fn));
  NCCL_TRY(check_type(dtype, false, fn));
  if (peer < 0 || peer >= comm->nranks)
    return set_error(ncclInvalidArgument, "%s: peer=%d is not in 0..%d", fn, peer, comm->nranks - 1);
  if (count > 0 && !buf) return set_error(ncclInvalidArgument, "%s: the buffer is NULL", fn);
  NCCL_TRY(async_error(comm));
  if (comm->test_only)
    return set_error(ncclInvalidUsage, "%s: a test communicator (nanocclTestCommCreate) cannot launch", fn);
  const int esize = dtype_size(dtype);
  pending.push_back(PendingP2P{comm, stream, (char*)buf, (u64)count * esize, peer, is_send, esize});
  return group_depth == 0 ? launch_pending() : ncclSuccess;
}

NANOCCL_API ncclResult_t ncclSend(const void* sendbuff, size_t count, ncclDataType_t datatype, int peer,
                                  ncclComm_t comm, cudaStream_t stream) {
  return p2p("ncclSend", true, sendbuff, count, datatype, peer, comm, stream);
}

NANOCCL_API ncclResult_t ncclRecv(void* recvbuff, size_t count, ncclDataType_t datatype, int peer, ncclComm_t comm,
                                  cudaStream_t stream) {
  return p2p("ncclRecv", false, recvbuff, count, datatype, peer, comm, stream);
}

NANOCCL_API ncclResult_t ncclGroupStart(void) {
  group_depth++;
  return ncclSuccess;
}

NANOCCL_API ncclResult_t ncclGroupEnd(void) {
  if (group_depth == 0) return set_error(ncclInvalidUsage, "ncclGroupEnd: no ncclGroupStart before it");
  if (--group_depth > 0) return ncclSuccess;
  return launch_pending();
}

// ---------------------------------------------------------------------------------------------------------------
// version, errors

NANOCCL_API ncclResult_t ncclGetVersion(int* version) {
  if (!version) return set_error(ncclInvalidArgument, "ncclGetVersion: version is NULL");
  *version = NANOCCL_VERSION_CODE;
  return ncclSuccess;
}

NANOCCL_API const char* ncclGetErrorString(ncclResult_t result) {
  switch (result) {
    case ncclSuccess: return "no error";
    case ncclUnhandledCudaError: return "unhandled cuda error (ncclGetLastError has the details)";
    case ncclSystemError: return "unhandled system error (ncclGetLastError has the details)";
    case ncclInternalError: return "internal error in libnanoccl";
    case ncclInvalidArgument: return "invalid argument (ncclGetLastError has the details)";
    case ncclInvalidUsage: return "invalid usage (ncclGetLastError has the details)";
    case ncclRemoteError: return "remote process exited or there was a network error";
    case ncclInProgress: return "NCCL operation in progress";
    case ncclTimeout: return "timeout";
    default: return "unknown result code";
  }
}

NANOCCL_API const char* ncclGetLastError(ncclComm_t comm) {
  (void)comm;
  return last_error_text;
}

// ---------------------------------------------------------------------------------------------------------------
// for the tests

NANOCCL_API ncclResult_t nanocclBootstrapAllGather(const ncclUniqueId* id, int nranks, int rank, const void* mine,
                                                   size_t bytes, void* all, double timeout_s) {
  return bootstrap_allgather(id, nranks, rank, mine, bytes, all, timeout_s);
}

NANOCCL_API ncclResult_t nanocclRingPlan(int kind, size_t count, int nranks, int elemsize, int nchannels,
                                         size_t slot_bytes, size_t oneshot_bytes, int* algorithm,
                                         unsigned long long* chunk, unsigned long long* rounds) {
  if (kind < kAllReduce || kind > kBroadcast || nranks < 1 || (elemsize != 1 && elemsize != 2 && elemsize != 4 &&
      elemsize != 8) || nchannels < 1 || nchannels > kMaxChannels || slot_bytes < 16 || slot_bytes % 16 || !count)
    return set_error(ncclInvalidArgument, "nanocclRingPlan: bad arguments");
  Config cfg = {nchannels, 2, slot_bytes, oneshot_bytes, 0};
  make_plan(kind, count, nranks, elemsize, cfg, algorithm, chunk, rounds);
  return ncclSuccess;
}

NANOCCL_API void nanocclRingSegment(size_t count, int nranks, unsigned long long chunk, unsigned long long round,
                                    int seg, unsigned long long* offset, unsigned long long* length) {
  ring_segment(count, nranks, chunk, round, seg, offset, length);
}

NANOCCL_API void nanocclRingSteps(int kind, int nranks, int rank, int root, unsigned long long* sends,
                                  unsigned long long* recvs) {
  ring_steps(kind, nranks, rank, root, sends, recvs);
}
