/*
 * libnanoccl's functions beyond NCCL's API: what the CPU tests (tests/test_cuda_lib.py) call through ctypes.
 *
 * - nanocclEmuCommInitRank: a communicator whose ranks are threads of this process, whose "device memory" is host
 *   memory and whose kernels run on CPU threads: the same host code (plans, sequence numbers, groups) and the same
 *   kernel bodies (algorithms.h, compiled a second time for the host), so the algorithms are tested without a GPU.
 *   Buffers are host pointers; the stream argument is ignored; every call returns when its "kernel" has finished.
 * - nanocclTestCommCreate: a communicator of nranks with this rank that owns no memory and cannot launch: for the
 *   argument checks that come before any launch.
 * - nanocclBootstrapAllGather: the bootstrap's all-gather through ncclGetUniqueId's root (bootstrap.cc).
 * - nanocclRingPlan / nanocclRingSegment / nanocclRingSteps: the chunking plan of the ring algorithms (plan.h),
 *   the same arithmetic the kernels run.
 */

#ifndef NANOCCL_H_
#define NANOCCL_H_

#include "nccl.h"

#ifdef __cplusplus
extern "C" {
#endif

/* collective kinds of the plan functions */
enum { nanocclAllReduce = 1, nanocclAllGather = 2, nanocclReduceScatter = 3, nanocclBroadcast = 4 };

ncclResult_t nanocclEmuCommInitRank(ncclComm_t* comm, int nranks, ncclUniqueId commId, int rank);
ncclResult_t nanocclTestCommCreate(int nranks, int rank, ncclComm_t* comm);
ncclResult_t nanocclBootstrapAllGather(const ncclUniqueId* id, int nranks, int rank, const void* mine, size_t bytes,
                                       void* all, double timeout_s);

/* The algorithm a collective of `count` elements of `elemsize` bytes takes on nranks with this configuration
 * (algorithm: 0 local copy, 1 one-shot, 2 ring) and, for the ring, its elements per chunk and its rounds. */
ncclResult_t nanocclRingPlan(int kind, size_t count, int nranks, int elemsize, int nchannels, size_t slot_bytes,
                             size_t oneshot_bytes, int* algorithm, unsigned long long* chunk,
                             unsigned long long* rounds);
/* all-reduce: the elements [*offset, *offset + *length) that segment `seg` of ring round `round` covers */
void nanocclRingSegment(size_t count, int nranks, unsigned long long chunk, unsigned long long round, int seg,
                        unsigned long long* offset, unsigned long long* length);
/* the slots one rank sends to its ring successor and receives from its predecessor in one round */
void nanocclRingSteps(int kind, int nranks, int rank, int root, unsigned long long* sends, unsigned long long* recvs);

#ifdef __cplusplus
}
#endif

#endif
