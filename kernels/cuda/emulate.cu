/*
 * The CPU emulation: algorithms.h's bodies compiled for the host, with CPU primitives (C++ atomics for the flags, a
 * pthread barrier for __syncthreads), run by the communicators of nanocclEmuCommInitRank. An emulated launch runs
 * every block of the kernel as `threads` CPU threads (NANOCCL_EMU_THREADS, 2: enough to exercise the strided loops
 * and the block barriers) and returns when all are done; the ranks are threads of one process, each calling the
 * API on its own communicator, so their kernels run at the same time and meet through the same flags and FIFOs as
 * on the GPU. What this cannot show: the GPU's memory model and caches, warps, time-slicing, CUDA IPC and streams.
 */

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <math.h>
#include <pthread.h>
#include <sched.h>
#include <stdlib.h>
#include <time.h>

#include <thread>
#include <vector>

#include "plan.h"

namespace nanoccl {
namespace emu {

#define FN inline

struct BlockShared {
  pthread_barrier_t barrier;
  int any[3];   // Block::any's flags, used in turn (see there)
};

struct Block {
  int tid, nthreads;
  BlockShared* shared;
  int calls;   // Block::any calls so far
  void sync() { pthread_barrier_wait(&shared->barrier); }
  // __syncthreads_or: call c ORs into flag c % 3, syncs, reads it; thread 0 then clears flag (c + 2) % 3, the one
  // call c - 1 used (everyone has read it: they reached this barrier) and call c + 2 will use (no one sets it before
  // passing call c + 1's barrier, which thread 0 reaches only after clearing it).
  bool any(bool v) {
    int slot = calls++ % 3;
    if (v) __atomic_fetch_or(&shared->any[slot], 1, __ATOMIC_SEQ_CST);
    sync();
    bool result = __atomic_load_n(&shared->any[slot], __ATOMIC_SEQ_CST) != 0;
    if (tid == 0) __atomic_store_n(&shared->any[(slot + 2) % 3], 0, __ATOMIC_SEQ_CST);
    return result;
  }
};

FN u64 load_acquire(const u64* p) { return __atomic_load_n(p, __ATOMIC_ACQUIRE); }
FN void store_release(u64* p, u64 v) { __atomic_store_n(p, v, __ATOMIC_RELEASE); }
FN u64 load_relaxed(const u64* p) { return __atomic_load_n(p, __ATOMIC_RELAXED); }
FN void store_relaxed(u64* p, u64 v) { __atomic_store_n(p, v, __ATOMIC_RELAXED); }
FN void fence() { __atomic_thread_fence(__ATOMIC_SEQ_CST); }
FN u64 now_ns() {
  timespec t;
  clock_gettime(CLOCK_MONOTONIC, &t);
  return (u64)t.tv_sec * 1000000000ull + t.tv_nsec;
}
FN void pause(unsigned spins) {   // many threads share a few cores: yield, then sleep
  if (spins < 64) {
    sched_yield();
  } else {
    timespec t = {0, 20000};
    nanosleep(&t, nullptr);
  }
}
FN bool claim(u64* word) {
  u64 expected = 0;
  return __atomic_compare_exchange_n(word, &expected, 1ull, false, __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST);
}
template <class U>
FN U load_peer(const U* p) {
  return *(const volatile U*)p;
}

// The same conversions as on the GPU: cuda_fp16.h and cuda_bf16.h's host versions round to nearest even.
struct F32 {
  typedef float Bits;
  static float load(float v) { return v; }
  static float store(float v) { return v; }
};
struct F16 {
  typedef unsigned short Bits;
  static float load(Bits v) { return __half2float(__ushort_as_half(v)); }
  static Bits store(float v) { return __half_as_ushort(__float2half_rn(v)); }
};
struct BF16 {
  typedef unsigned short Bits;
  static float load(Bits v) { return __bfloat162float(__ushort_as_bfloat16(v)); }
  static Bits store(float v) { return __bfloat16_as_ushort(__float2bfloat16_rn(v)); }
};

#include "algorithms.h"

static int threads_per_block() {
  const char* s = getenv("NANOCCL_EMU_THREADS");
  int n = s ? atoi(s) : 2;
  return n >= 1 && n <= 64 ? n : 2;
}

// Run `grid` blocks of `threads` threads each, body(block, block index), and wait for all of them.
template <class Body>
static void run_blocks(int grid, int threads, Body body) {
  std::vector<BlockShared> shared(grid);
  for (BlockShared& s : shared) {
    pthread_barrier_init(&s.barrier, nullptr, threads);
    s.any[0] = s.any[1] = s.any[2] = 0;
  }
  std::vector<std::thread> pool;
  for (int blk = 0; blk < grid; blk++)
    for (int t = 0; t < threads; t++)
      pool.emplace_back([&shared, &body, blk, t, threads] {
        Block b{t, threads, &shared[blk], 0};
        body(b, blk);
      });
  for (std::thread& t : pool) t.join();
  for (BlockShared& s : shared) pthread_barrier_destroy(&s.barrier);
}

typedef void (*Body)(Block&, const CollArgs&, int);

template <class T>
static Body pick_op(int op) {
  switch (op) {
    case kProd: return reduce_body<T, kProd>;
    case kMax: return reduce_body<T, kMax>;
    case kMin: return reduce_body<T, kMin>;
    default: return reduce_body<T, kSum>;
  }
}

void launch_coll(const CollArgs& a, int grid) {
  Body body;
  if (a.kind == kAllReduce || a.kind == kReduceScatter) {
    body = a.dtype == kFloat32 ? pick_op<F32>(a.op) : a.dtype == kFloat16 ? pick_op<F16>(a.op) : pick_op<BF16>(a.op);
  } else {
    switch (dtype_size(a.dtype)) {
      case 1: body = copy_body<unsigned char>; break;
      case 2: body = copy_body<unsigned short>; break;
      case 4: body = copy_body<unsigned int>; break;
      default: body = copy_body<u64>; break;
    }
  }
  run_blocks(grid, threads_per_block(), [&a, body](Block& b, int blk) { body(b, a, blk); });
}

void launch_p2p(const P2PArgs& a, int grid) {
  run_blocks(grid, threads_per_block(), [&a](Block& b, int lane) { p2p(b, a, lane); });
}

void launch_close(const CollArgs& a) {
  run_blocks(1, 1, [&a](Block& b, int) { close_barrier(b, a); });
}

}  // namespace emu
}  // namespace nanoccl
