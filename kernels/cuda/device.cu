/*
 * The GPU side: algorithms.h's bodies compiled as CUDA kernels, with the primitives they need written for the GPU
 * (PTX acquire/release at system scope, __threadfence_system, %globaltimer, ld.global.cv), and the launchers
 * comm.cu calls. A collective is one kernel of nchannels blocks; a group of sends and receives one kernel of one
 * block per (peer, direction).
 */

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <math.h>

#include "plan.h"

namespace nanoccl {
namespace dev {

#define FN __device__ __forceinline__

struct Block {
  int tid, nthreads;
  __device__ Block() : tid(threadIdx.x), nthreads(blockDim.x) {}
  __device__ void sync() { __syncthreads(); }
  __device__ bool any(bool v) { return __syncthreads_or(v) != 0; }
};

// Flags: acquire/release at system scope, so that they order accesses against other GPUs and processes (PTX ISA,
// "Memory Consistency Model"); generic addresses, so that they work on device and on mapped host memory alike.
FN u64 load_acquire(const u64* p) {
  u64 v;
  asm volatile("ld.acquire.sys.u64 %0, [%1];" : "=l"(v) : "l"(p) : "memory");
  return v;
}
FN void store_release(u64* p, u64 v) { asm volatile("st.release.sys.u64 [%0], %1;" ::"l"(p), "l"(v) : "memory"); }
FN u64 load_relaxed(const u64* p) { return *(const volatile u64*)p; }
FN void store_relaxed(u64* p, u64 v) { *(volatile u64*)p = v; }
FN void fence() { __threadfence_system(); }
FN u64 now_ns() {
  u64 t;
  asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t));
  return t;
}
// Back off while spinning (fewer polls of another GPU's memory); the driver's time-slicing between processes on one
// GPU does not depend on it.
FN void pause(unsigned spins) {
  if (spins > 64) __nanosleep(spins < 4096 ? 100 : 1000);
}
FN bool claim(u64* word) { return atomicCAS((unsigned long long*)word, 0ull, 1ull) == 0ull; }
template <class U>
FN U load_peer(const U* p) {
  return __ldcv(p);
}

struct F32 {
  typedef float Bits;
  FN static float load(float v) { return v; }
  FN static float store(float v) { return v; }
};
struct F16 {
  typedef unsigned short Bits;
  FN static float load(Bits v) { return __half2float(__ushort_as_half(v)); }
  FN static Bits store(float v) { return __half_as_ushort(__float2half_rn(v)); }
};
struct BF16 {
  typedef unsigned short Bits;
  FN static float load(Bits v) { return __bfloat162float(__ushort_as_bfloat16(v)); }
  FN static Bits store(float v) { return __bfloat16_as_ushort(__float2bfloat16_rn(v)); }
};

#include "algorithms.h"

// kThreads threads, one block per SM at least: ptxas may use up to 128 registers (with the default bound it aims at
// two blocks per SM, caps at 64 and spills).
template <class T, int OP>
__global__ void __launch_bounds__(kThreads, 1) reduce_kernel(CollArgs a) {
  Block b;
  reduce_body<T, OP>(b, a, blockIdx.x);
}

template <class U>
__global__ void __launch_bounds__(kThreads, 1) copy_kernel(CollArgs a) {
  Block b;
  copy_body<U>(b, a, blockIdx.x);
}

__global__ void __launch_bounds__(kThreads, 1) p2p_kernel(P2PArgs a) {
  Block b;
  p2p(b, a, blockIdx.x);
}

__global__ void close_kernel(CollArgs a) {
  Block b;
  close_barrier(b, a);
}

typedef void (*CollKernel)(CollArgs);

template <class T>
static CollKernel pick_op(int op) {
  switch (op) {
    case kProd: return reduce_kernel<T, kProd>;
    case kMax: return reduce_kernel<T, kMax>;
    case kMin: return reduce_kernel<T, kMin>;
    default: return reduce_kernel<T, kSum>;   // ncclSum, and ncclAvg (a sum with a.avg set)
  }
}

int launch_coll(const CollArgs& a, int grid, void* stream) {
  CollKernel kernel;
  if (a.kind == kAllReduce || a.kind == kReduceScatter) {
    kernel = a.dtype == kFloat32 ? pick_op<F32>(a.op) : a.dtype == kFloat16 ? pick_op<F16>(a.op) : pick_op<BF16>(a.op);
  } else {
    switch (dtype_size(a.dtype)) {
      case 1: kernel = copy_kernel<unsigned char>; break;
      case 2: kernel = copy_kernel<unsigned short>; break;
      case 4: kernel = copy_kernel<unsigned int>; break;
      default: kernel = copy_kernel<u64>; break;
    }
  }
  kernel<<<grid, kThreads, 0, (cudaStream_t)stream>>>(a);
  return (int)cudaGetLastError();
}

int launch_p2p(const P2PArgs& a, int grid, void* stream) {
  p2p_kernel<<<grid, kThreads, 0, (cudaStream_t)stream>>>(a);
  return (int)cudaGetLastError();
}

int launch_close(const CollArgs& a, void* stream) {
  close_kernel<<<1, 1, 0, (cudaStream_t)stream>>>(a);
  return (int)cudaGetLastError();
}

}  // namespace dev
}  // namespace nanoccl
