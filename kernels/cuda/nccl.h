/*
 * libnanoccl's public header: the subset of NCCL's C API (nccl.h, NCCL 2.x) that kernels/nccl.py binds, with NCCL's
 * exact types, enum values and signatures, so code written against NCCL compiles against this library unchanged.
 *
 * What is implemented, and how, is described in kernels/cuda/comm.cu (the host side) and kernels/cuda/algorithms.h
 * (the kernels). Differences from NCCL: one process per rank and every rank on one host (peer memory is shared with
 * CUDA IPC); reductions in float32, float16 and bfloat16 only; collectives called inside ncclGroupStart/End are
 * launched at once (only sends and receives are gathered into one launch at ncclGroupEnd).
 */

#ifndef NCCL_H_
#define NCCL_H_

#include <cuda_runtime.h>
#include <stddef.h>

#define NANOCCL_MAJOR 0
#define NANOCCL_MINOR 1
#define NANOCCL_PATCH 0
/* NCCL's own encoding (X*1000+Y*100+Z below 2.9), so that a caller's decoding of ncclGetVersion reads 0.1.0 */
#define NCCL_VERSION(X,Y,Z) (((X) <= 2 && (Y) <= 8) ? (X) * 1000 + (Y) * 100 + (Z) : (X) * 10000 + (Y) * 100 + (Z))
#define NANOCCL_VERSION_CODE NCCL_VERSION(NANOCCL_MAJOR, NANOCCL_MINOR, NANOCCL_PATCH)

#ifdef __cplusplus
extern "C" {
#endif

typedef struct ncclComm* ncclComm_t;
#define NCCL_COMM_NULL NULL

#define NCCL_UNIQUE_ID_BYTES 128
typedef struct { char internal[NCCL_UNIQUE_ID_BYTES]; } ncclUniqueId;

typedef enum { ncclSuccess                 =  0,
               ncclUnhandledCudaError      =  1,
               ncclSystemError             =  2,
               ncclInternalError           =  3,
               ncclInvalidArgument         =  4,
               ncclInvalidUsage            =  5,
               ncclRemoteError             =  6,
               ncclInProgress              =  7,
               ncclTimeout                 =  8,
               ncclNumResults              =  9 } ncclResult_t;

typedef enum { ncclSum        = 0,
               ncclProd       = 1,
               ncclMax        = 2,
               ncclMin        = 3,
               ncclAvg        = 4,
               ncclNumOps     = 5 } ncclRedOp_t;

typedef enum { ncclInt8       = 0, ncclChar       = 0,
               ncclUint8      = 1,
               ncclInt32      = 2, ncclInt        = 2,
               ncclUint32     = 3,
               ncclInt64      = 4,
               ncclUint64     = 5,
               ncclFloat16    = 6, ncclHalf       = 6,
               ncclFloat32    = 7, ncclFloat      = 7,
               ncclFloat64    = 8, ncclDouble     = 8,
               ncclBfloat16   = 9,
               ncclNumTypes   = 10 } ncclDataType_t;

/* Version, errors */
ncclResult_t  ncclGetVersion(int *version);
const char*  ncclGetErrorString(ncclResult_t result);
const char*  ncclGetLastError(ncclComm_t comm);

/* Communicators */
ncclResult_t  ncclGetUniqueId(ncclUniqueId* uniqueId);
ncclResult_t  ncclCommInitRank(ncclComm_t* comm, int nranks, ncclUniqueId commId, int rank);
ncclResult_t  ncclCommDestroy(ncclComm_t comm);
ncclResult_t  ncclCommAbort(ncclComm_t comm);
ncclResult_t  ncclCommGetAsyncError(ncclComm_t comm, ncclResult_t *asyncError);
ncclResult_t  ncclCommCount(const ncclComm_t comm, int* count);
ncclResult_t  ncclCommUserRank(const ncclComm_t comm, int* rank);

/* Collectives: enqueued on `stream`; they return before the data has moved */
ncclResult_t  ncclAllReduce(const void* sendbuff, void* recvbuff, size_t count, ncclDataType_t datatype, ncclRedOp_t op, ncclComm_t comm, cudaStream_t stream);
ncclResult_t  ncclAllGather(const void* sendbuff, void* recvbuff, size_t sendcount, ncclDataType_t datatype, ncclComm_t comm, cudaStream_t stream);
ncclResult_t  ncclReduceScatter(const void* sendbuff, void* recvbuff, size_t recvcount, ncclDataType_t datatype, ncclRedOp_t op, ncclComm_t comm, cudaStream_t stream);
ncclResult_t  ncclBroadcast(const void* sendbuff, void* recvbuff, size_t count, ncclDataType_t datatype, int root, ncclComm_t comm, cudaStream_t stream);

/* Point-to-point */
ncclResult_t  ncclSend(const void* sendbuff, size_t count, ncclDataType_t datatype, int peer, ncclComm_t comm, cudaStream_t stream);
ncclResult_t  ncclRecv(void* recvbuff, size_t count, ncclDataType_t datatype, int peer, ncclComm_t comm, cudaStream_t stream);

/* Groups */
ncclResult_t  ncclGroupStart(void);
ncclResult_t  ncclGroupEnd(void);

#ifdef __cplusplus
}
#endif

#endif
