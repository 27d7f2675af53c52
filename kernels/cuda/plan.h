/*
 * What the host code (comm.cu) and the kernels (algorithms.h, on the GPU and in the CPU emulation) share: the layout
 * of a rank's shared memory, the kernels' arguments, and the arithmetic that splits a collective into chunks.
 * The host decides the plan (algorithm, chunk, rounds, where every connection's sequence number starts) and passes
 * it to the kernel; the kernel recomputes nothing but which elements a segment covers, with the functions below.
 */

#ifndef NANOCCL_PLAN_H_
#define NANOCCL_PLAN_H_

#include <stddef.h>
#include <stdint.h>

#ifdef __CUDACC__
#define NANOCCL_HD __host__ __device__
#else
#define NANOCCL_HD
#endif

namespace nanoccl {

typedef unsigned long long u64;

constexpr int kMaxRanks = 256;     // the descriptor keeps a root in 12 bits; a node has far fewer GPUs
constexpr int kMaxChannels = 16;   // blocks of a collective kernel (NCCL: MAXCHANNELS)
constexpr int kMaxP2POps = 64;     // sends and receives of one communicator in one group (kernel argument space)
constexpr int kThreads = 512;      // threads per block on the GPU

// ncclDataType_t and ncclRedOp_t values (nccl.h)
enum { kInt8 = 0, kUint8, kInt32, kUint32, kInt64, kUint64, kFloat16, kFloat32, kFloat64, kBfloat16, kNumTypes };
enum { kSum = 0, kProd, kMax, kMin, kAvg, kNumOps };
// collective kinds (nanoccl.h's enum) and the other things a descriptor can name
enum { kAllReduce = 1, kAllGather = 2, kReduceScatter = 3, kBroadcast = 4, kP2P = 5 };
// algorithms
enum { kAlgoCopy = 0, kAlgoOneShot = 1, kAlgoRing = 2 };

NANOCCL_HD inline int dtype_size(int t) {
  switch (t) {
    case kInt8: case kUint8: return 1;
    case kFloat16: case kBfloat16: return 2;
    case kInt32: case kUint32: case kFloat32: return 4;
    case kInt64: case kUint64: case kFloat64: return 8;
    default: return 0;
  }
}

NANOCCL_HD inline u64 ceil_div(u64 a, u64 b) { return (a + b - 1) / b; }
NANOCCL_HD inline u64 min_u64(u64 a, u64 b) { return a < b ? a : b; }
NANOCCL_HD inline int mod(int a, int n) { return ((a % n) + n) % n; }

// A 64-bit descriptor of a call, sent with every chunk: a receiver compares it with its own call's, so ranks that
// called different collectives (or counts, types, roots) fail with a message instead of exchanging garbage.
// kind 4 bits | dtype 4 | op 4 | root 12 | count 40.
NANOCCL_HD inline u64 make_desc(int kind, int dtype, int op, int root, u64 count) {
  return ((u64)kind << 60) | ((u64)(dtype & 15) << 56) | ((u64)(op & 15) << 52) | ((u64)(root & 4095) << 40) |
         (count & ((1ull << 40) - 1));
}

// The configuration every rank must share (NANOCCL_* environment variables, read at ncclCommInitRank).
struct Config {
  int nchannels;        // blocks per collective, each with its own ring connections   (NANOCCL_NCHANNELS, 4)
  int slots;            // slots per connection FIFO, >= 2 (as NCCL_STEPS)             (NANOCCL_SLOTS, 8)
  u64 slot_bytes;       // bytes per slot, a multiple of 16                            (NANOCCL_SLOT_BYTES, 256 KiB)
  u64 oneshot_bytes;    // all-reduces up to this size take the one-shot path          (NANOCCL_ONESHOT_BYTES, 256 KiB)
  u64 timeout_ns;       // a wait longer than this is an error                         (NANOCCL_TIMEOUT_S, 300)
};

// Byte offsets of everything in one rank's shared region (cudaMalloc'd, shared with CUDA IPC). Flags are 64-bit
// counters that only grow, so they are never reset. C = nchannels, N = nranks, S = slots.
struct Layout {
  u64 abort;       // u64: nonzero (1 + the rank that failed) once any rank failed: every wait gives up
  u64 claim;       // u64: the first failing block of this rank claims the error record
  u64 closing;     // u64[N]: closing[p] = 1 once rank p entered ncclCommDestroy (its last barrier)
  u64 ring_head;   // u64[C]: ring send connection to next: slots next has consumed (written by next)
  u64 ring_tail;   // u64[C]: ring receive connection from prev: slots prev has filled (written by prev)
  u64 ring_desc;   // u64[C*S]: descriptor of the call whose data is in each ring slot (written by prev)
  u64 p2p_head;    // u64[N]: send connection to peer p: slots p has consumed (written by p)
  u64 p2p_tail;    // u64[N]: receive connection from peer p: slots p has filled (written by p)
  u64 p2p_desc;    // u64[N*S]: descriptor of the message in each slot from peer p
  u64 os_ready;    // u64[C*N]: one-shot, block b: rank p's stage holds its input of call k (written by p)
  u64 os_done;     // u64[C*N]: one-shot, block b: rank p has finished reading my stage of call k
  u64 os_desc;     // u64[C*N]: one-shot, block b: descriptor of rank p's staged call
  u64 ring_slots;  // [C][S][slot_bytes]: the ring receive FIFOs (one per channel)
  u64 p2p_slots;   // [N][S][slot_bytes]: the point-to-point receive FIFOs (one per sending peer, self included)
  u64 stage;       // [oneshot_bytes]: this rank's staged input of a one-shot all-reduce
  u64 total;
};

inline Layout make_layout(int nranks, const Config& c) {
  Layout L;
  u64 at = 0;
  auto take = [&at](u64 bytes) { u64 here = at; at = ceil_div(at + bytes, 256) * 256; return here; };
  const u64 C = c.nchannels, N = nranks, S = c.slots;
  L.abort = take(8); L.claim = take(8); L.closing = take(8 * N);
  L.ring_head = take(8 * C); L.ring_tail = take(8 * C); L.ring_desc = take(8 * C * S);
  L.p2p_head = take(8 * N); L.p2p_tail = take(8 * N); L.p2p_desc = take(8 * N * S);
  L.os_ready = take(8 * C * N); L.os_done = take(8 * C * N); L.os_desc = take(8 * C * N);
  L.ring_slots = take(C * S * c.slot_bytes); L.p2p_slots = take(N * S * c.slot_bytes);
  L.stage = take(c.oneshot_bytes > 0 ? c.oneshot_bytes : 16);
  L.total = at;
  return L;
}

// What a failing block writes for the host (pinned host memory, mapped; `code` last).
enum { kWaitData = 1, kWaitSpace, kWaitReady, kWaitDone, kWaitClose, kMismatch, kAborted };
struct ErrorRecord {
  volatile int code;   // ncclResult_t; 0 while none
  int what;            // kWait* / kMismatch / kAborted
  int peer;            // the rank waited for, or the sender of a mismatched message, or the rank that failed first
  int channel;         // the block
  u64 step;            // the sequence number waited for
  u64 desc;            // this rank's call
  u64 peer_desc;       // the mismatched descriptor received
};

// The communicator as a kernel sees it.
struct DevComm {
  int rank, nranks, nchannels, slots;
  u64 slot_bytes, oneshot_bytes, timeout_ns;
  char* const* bases;    // every rank's region, as this rank addresses it (device memory)
  Layout L;
  ErrorRecord* err;      // this rank's error record (device pointer of pinned host memory)
};

// The arguments of one collective kernel (all-reduce, all-gather, reduce-scatter, broadcast, and the close barrier).
struct CollArgs {
  DevComm c;
  int kind, algorithm, dtype, op, root, avg;
  const void* src;
  void* dst;
  u64 count;              // all-reduce, broadcast: count; all-gather: sendcount; reduce-scatter: recvcount
  u64 chunk, rounds;      // ring: elements per chunk, and rounds (channel ch runs rounds ch, ch + C, ...)
  u64 desc;
  u64 oneshot_seq;        // one-shot: this call's number (1, 2, ...) among the communicator's one-shot calls
  u64 send_step[kMaxChannels], recv_step[kMaxChannels];   // ring: each channel's connections' first sequence number
};

// One send, receive or local copy of a group; ops of one lane (a block) run in order, lanes run concurrently.
enum { kRecvOp = 0, kSendOp = 1, kCopyOp = 2 };
struct P2POp {
  char* buf;              // what is sent, or where it is received (or copied to)
  const char* src;        // kCopyOp: what is copied (a send to this rank itself, paired with its receive)
  u64 bytes;
  u64 step;               // the connection's sequence number of this message's first slot
  int peer, kind, lane, elemsize;
};
struct P2PArgs {
  DevComm c;
  int nops, pad;
  P2POp ops[kMaxP2POps];
};

// ---- the plan ----

// Elements per chunk of a ring collective: a slot's worth at most, fewer so that every channel gets rounds when the
// data is small, and a multiple of 16 bytes (NCCL likewise sizes its chunks by the number of channels).
// parts: chunks per round (nranks for all-reduce, whose round is one chunk per rank; 1 for the others).
NANOCCL_HD inline u64 ring_chunk(u64 count, int parts, int nchannels, u64 slot_bytes, int elemsize) {
  u64 align = 16 / elemsize, slot_elems = slot_bytes / elemsize;
  u64 want = ceil_div(ceil_div(count, (u64)parts * nchannels), align) * align;
  return want < slot_elems ? (want > 0 ? want : align) : slot_elems;
}

// Rounds of a ring collective: all-reduce rounds cover nranks * chunk elements, the others' chunk elements of each
// rank's part (count is the per-rank count).
NANOCCL_HD inline u64 ring_rounds(int kind, u64 count, int nranks, u64 chunk) {
  return ceil_div(count, (kind == kAllReduce ? (u64)nranks : 1ull) * chunk);
}

// Channel ch runs rounds ch, ch + C, ch + 2C, ...: how many.
NANOCCL_HD inline u64 channel_rounds(u64 rounds, int ch, int nchannels) {
  return rounds > (u64)ch ? ceil_div(rounds - ch, nchannels) : 0;
}

// All-reduce round `round` is split into nranks segments of at most `chunk` elements (the last round's may be
// shorter, or empty): segment `seg` covers [*offset, *offset + *length).
NANOCCL_HD inline void ring_segment(u64 count, int nranks, u64 chunk, u64 round, int seg, u64* offset, u64* length) {
  u64 base = round * nranks * chunk;
  u64 span = min_u64(count - base, (u64)nranks * chunk);
  u64 size = ceil_div(span, nranks);
  u64 lo = min_u64((u64)seg * size, span), hi = min_u64((u64)(seg + 1) * size, span);
  *offset = base + lo;
  *length = hi - lo;
}

// The other ring collectives' round `round` covers [*offset, *offset + *length) of each rank's part.
NANOCCL_HD inline void ring_piece(u64 count, u64 chunk, u64 round, u64* offset, u64* length) {
  *offset = round * chunk;
  *length = min_u64(count - *offset, chunk);
}

// Slots one rank sends to its ring successor and receives from its predecessor, per round.
NANOCCL_HD inline void ring_steps(int kind, int nranks, int rank, int root, u64* sends, u64* recvs) {
  switch (kind) {
    case kAllReduce: *sends = *recvs = 2 * (u64)(nranks - 1); break;
    case kAllGather: case kReduceScatter: *sends = *recvs = nranks - 1; break;
    default:  // broadcast: the root only sends, the rank before it in the ring only receives
      *sends = mod(rank + 1, nranks) != root ? 1 : 0;
      *recvs = rank != root ? 1 : 0;
  }
}

// One-shot all-reduce: block b of nblocks reduces [*lo, *hi).
NANOCCL_HD inline void oneshot_range(u64 count, int nblocks, int b, u64* lo, u64* hi) {
  u64 per = ceil_div(count, nblocks);
  *lo = min_u64((u64)b * per, count);
  *hi = min_u64(*lo + per, count);
}

// ---- launchers (device.cu: CUDA kernels; emulate.cu: the same bodies on CPU threads) ----
namespace dev {
int launch_coll(const CollArgs& a, int grid, void* stream);   // returns a cudaError_t
int launch_p2p(const P2PArgs& a, int grid, void* stream);
int launch_close(const CollArgs& a, void* stream);
}
namespace emu {
void launch_coll(const CollArgs& a, int grid);
void launch_p2p(const P2PArgs& a, int grid);
void launch_close(const CollArgs& a);
}

}  // namespace nanoccl

#endif
