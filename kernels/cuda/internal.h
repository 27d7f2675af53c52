/*
 * What comm.cu and bootstrap.cc share (not part of the API).
 */

#ifndef NANOCCL_INTERNAL_H_
#define NANOCCL_INTERNAL_H_

#include <stddef.h>

#include "nccl.h"

namespace nanoccl {

// Return `code` after recording a message for ncclGetLastError (printed to stderr when NANOCCL_DEBUG is set).
ncclResult_t set_error(ncclResult_t code, const char* fmt, ...) __attribute__((format(printf, 2, 3)));

// ncclGetUniqueId's root: a listener on 127.0.0.1 (a thread that lives until every rank has come, or timeout_s),
// whose address and a random magic number are written into the id.
ncclResult_t bootstrap_root(ncclUniqueId* id, double timeout_s);
bool is_nanoccl_id(const ncclUniqueId* id);

// Every rank sends `bytes` bytes to the root of `id`, which sends back all of them in rank order (`all`: nranks *
// bytes). Bounded by timeout_s; errors are ncclTimeout, ncclRemoteError, ncclSystemError or ncclInvalidUsage.
ncclResult_t bootstrap_allgather(const ncclUniqueId* id, int nranks, int rank, const void* mine, size_t bytes,
                                 void* all, double timeout_s);

}  // namespace nanoccl

#endif
