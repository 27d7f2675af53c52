/*
 * The bootstrap: how the ranks of a new communicator find each other before they share any memory.
 *
 * As in NCCL (src/bootstrap.cc), ncclGetUniqueId starts a root: a TCP listener (here on 127.0.0.1, since CUDA IPC
 * works within one host anyway) served by a thread, and writes its address and a random magic number into the
 * 128-byte id. The caller hands the id to every rank (kernels/nccl.py broadcasts it over torch.distributed); each
 * rank's ncclCommInitRank connects to the root and sends a hello (magic, nranks, rank) and its blob (what the others
 * need to reach it: its CUDA IPC handle, pid, device, configuration). Once all nranks blobs are in, the root sends
 * every rank all of them in rank order, closes, and its thread ends: an all-gather through the root. NCCL's root
 * builds a ring of sockets instead and the ranks all-gather over it; with a few ranks on one host the star is
 * simpler. Every wait is bounded: the root gives up after its timeout (and tells the ranks that came how many did),
 * a rank after its own.
 */

#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <poll.h>
#include <stdint.h>
#include <string.h>
#include <sys/random.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#include <algorithm>
#include <system_error>
#include <thread>
#include <vector>

#include "internal.h"
#include "plan.h"

namespace nanoccl {

namespace {

const char kTag[8] = {'N', 'A', 'N', 'O', 'C', 'C', 'L', '1'};

struct IdLayout {    // the start of the 128-byte ncclUniqueId (the rest is zero)
  char tag[8];       // "NANOCCL1": an id of this library
  u64 magic;         // random: a connection with another magic is not one of this communicator's ranks
  uint32_t addr;     // the root's IPv4 address and port, network byte order
  uint16_t port;
};

struct Hello {       // rank -> root, followed by `bytes` bytes of the rank's blob
  u64 magic;
  int32_t nranks, rank;
  u64 bytes;
};

struct Reply {       // root -> rank; with status kOk followed by nranks * bytes bytes
  int32_t status, arrived, nranks, pad;
};
enum { kOk = 0, kRootTimeout = 1, kInconsistent = 2 };

double now() {
  timespec t;
  clock_gettime(CLOCK_MONOTONIC, &t);
  return t.tv_sec + 1e-9 * t.tv_nsec;
}

// Wait until fd is ready for `events`, at most until `deadline`; false on timeout or error.
bool wait_fd(int fd, short events, double deadline) {
  for (;;) {
    double left = deadline - now();
    if (left <= 0) return false;
    pollfd p = {fd, events, 0};
    int n = poll(&p, 1, (int)std::min(left * 1000 + 1, 1e9));
    if (n > 0) return true;
    if (n < 0 && errno != EINTR) return false;
  }
}

enum { kIoOk = 0, kIoError = -1, kIoTimeout = -2, kIoClosed = -3 };

int send_all(int fd, const void* data, size_t n, double deadline) {
  const char* p = (const char*)data;
  while (n > 0) {
    ssize_t k = send(fd, p, n, MSG_NOSIGNAL);
    if (k > 0) {
      p += k;
      n -= k;
    } else if (k < 0 && (errno == EAGAIN || errno == EWOULDBLOCK || errno == EINTR)) {
      if (!wait_fd(fd, POLLOUT, deadline)) return kIoTimeout;
    } else {
      return kIoError;
    }
  }
  return kIoOk;
}

int recv_all(int fd, void* data, size_t n, double deadline) {
  char* p = (char*)data;
  while (n > 0) {
    if (!wait_fd(fd, POLLIN, deadline)) return kIoTimeout;
    ssize_t k = recv(fd, p, n, 0);
    if (k > 0) {
      p += k;
      n -= k;
    } else if (k == 0) {
      return kIoClosed;
    } else if (errno != EAGAIN && errno != EWOULDBLOCK && errno != EINTR) {
      return kIoError;
    }
  }
  return kIoOk;
}

void set_nonblocking(int fd) { fcntl(fd, F_SETFL, fcntl(fd, F_GETFL) | O_NONBLOCK); }

// The root's thread: accept ranks until all `nranks` (from the first hello) have sent their blob or the deadline
// passes, then answer every rank that came.
void root_main(int listener, u64 magic, double timeout_s) {
  const double deadline = now() + timeout_s;
  int nranks = -1, arrived = 0;
  u64 bytes = 0;
  std::vector<int> fds;
  std::vector<char> blobs;
  while (nranks < 0 || arrived < nranks) {
    if (!wait_fd(listener, POLLIN, deadline)) break;
    int fd = accept4(listener, nullptr, nullptr, SOCK_NONBLOCK | SOCK_CLOEXEC);
    if (fd < 0) continue;
    const double hello_deadline = std::min(deadline, now() + 10);   // a connection that says nothing is dropped
    Hello h;
    if (recv_all(fd, &h, sizeof h, hello_deadline) != kIoOk || h.magic != magic) {
      close(fd);
      continue;
    }
    if (nranks < 0 && h.nranks >= 1 && h.nranks <= kMaxRanks && h.bytes <= (1u << 20)) {
      nranks = h.nranks;
      bytes = h.bytes;
      fds.assign(nranks, -1);
      blobs.resize((size_t)nranks * bytes);
    }
    if (h.nranks != nranks || h.bytes != bytes || h.rank < 0 || h.rank >= nranks || fds[h.rank] >= 0) {
      Reply r = {kInconsistent, arrived, nranks, 0};
      send_all(fd, &r, sizeof r, hello_deadline);
      close(fd);
      continue;
    }
    if (recv_all(fd, blobs.data() + (size_t)h.rank * bytes, bytes, hello_deadline) != kIoOk) {
      close(fd);
      continue;
    }
    fds[h.rank] = fd;
    arrived++;
  }
  Reply r = {nranks > 0 && arrived == nranks ? kOk : kRootTimeout, arrived, nranks, 0};
  for (int fd : fds) {
    if (fd < 0) continue;
    const double reply_deadline = now() + 10;
    if (send_all(fd, &r, sizeof r, reply_deadline) == kIoOk && r.status == kOk)
      send_all(fd, blobs.data(), blobs.size(), reply_deadline);
    close(fd);
  }
  close(listener);
}

}  // namespace

bool is_nanoccl_id(const ncclUniqueId* id) { return id && memcmp(id->internal, kTag, sizeof kTag) == 0; }

ncclResult_t bootstrap_root(ncclUniqueId* id, double timeout_s) {
  int fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
  if (fd < 0) return set_error(ncclSystemError, "ncclGetUniqueId: socket: %s", strerror(errno));
  sockaddr_in addr;
  memset(&addr, 0, sizeof addr);
  addr.sin_family = AF_INET;
  addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  addr.sin_port = 0;   // any free port
  socklen_t len = sizeof addr;
  if (bind(fd, (sockaddr*)&addr, sizeof addr) != 0 || listen(fd, 256) != 0 ||
      getsockname(fd, (sockaddr*)&addr, &len) != 0) {
    int e = errno;
    close(fd);
    return set_error(ncclSystemError, "ncclGetUniqueId: cannot listen on 127.0.0.1: %s", strerror(e));
  }
  set_nonblocking(fd);
  u64 magic = 0;
  if (getrandom(&magic, sizeof magic, 0) != (ssize_t)sizeof magic)
    magic = ((u64)getpid() << 32) ^ (u64)(now() * 1e9);
  IdLayout l;
  memset(&l, 0, sizeof l);
  memcpy(l.tag, kTag, sizeof kTag);
  l.magic = magic;
  l.addr = addr.sin_addr.s_addr;
  l.port = addr.sin_port;
  memset(id->internal, 0, sizeof id->internal);
  memcpy(id->internal, &l, sizeof l);
  try {
    std::thread(root_main, fd, magic, timeout_s).detach();
  } catch (const std::system_error& e) {
    close(fd);
    return set_error(ncclSystemError, "ncclGetUniqueId: cannot start the root thread: %s", e.what());
  }
  return ncclSuccess;
}

ncclResult_t bootstrap_allgather(const ncclUniqueId* id, int nranks, int rank, const void* mine, size_t bytes,
                                 void* all, double timeout_s) {
  if (!id || (!mine && bytes) || (!all && bytes))
    return set_error(ncclInvalidArgument, "bootstrap: id, mine and all must not be NULL");
  if (nranks < 1 || nranks > kMaxRanks || rank < 0 || rank >= nranks)
    return set_error(ncclInvalidArgument, "bootstrap: rank %d of %d ranks is not in 0..nranks-1 (nranks <= %d)",
                     rank, nranks, kMaxRanks);
  if (!is_nanoccl_id(id))
    return set_error(ncclInvalidArgument,
                     "the unique id was not made by libnanoccl's ncclGetUniqueId (another library's, or zeros)");
  IdLayout l;
  memcpy(&l, id->internal, sizeof l);
  const double deadline = now() + timeout_s;
  sockaddr_in addr;
  memset(&addr, 0, sizeof addr);
  addr.sin_family = AF_INET;
  addr.sin_addr.s_addr = l.addr;
  addr.sin_port = l.port;
  int fd = -1;
  for (int tries = 0;; tries++) {   // the root listens before ncclGetUniqueId returns: a refusal means it is gone
    fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (fd < 0) return set_error(ncclSystemError, "bootstrap: socket: %s", strerror(errno));
    if (connect(fd, (sockaddr*)&addr, sizeof addr) == 0) break;
    int e = errno;
    close(fd);
    if ((e != ECONNREFUSED && e != EINTR && e != EAGAIN) || tries >= 100 || now() > deadline)
      return set_error(ncclRemoteError,
                       "bootstrap: rank %d cannot reach the root at 127.0.0.1:%d (%s): the process that called "
                       "ncclGetUniqueId has exited, or its root stopped waiting (every rank must be on this host)",
                       rank, ntohs(l.port), strerror(e));
    usleep(10000);
  }
  set_nonblocking(fd);
  Hello h = {l.magic, nranks, rank, (u64)bytes};
  Reply r;
  int io = send_all(fd, &h, sizeof h, deadline);
  if (io == kIoOk) io = send_all(fd, mine, bytes, deadline);
  if (io == kIoOk) io = recv_all(fd, &r, sizeof r, deadline);
  if (io == kIoOk && r.status == kOk) io = recv_all(fd, all, (size_t)nranks * bytes, deadline);
  close(fd);
  if (io == kIoTimeout)
    return set_error(ncclTimeout, "bootstrap: rank %d of %d waited %g s (NANOCCL_BOOTSTRAP_TIMEOUT_S, default "
                     "NANOCCL_TIMEOUT_S) for the other ranks",
                     rank, nranks, timeout_s);
  if (io != kIoOk)
    return set_error(ncclRemoteError, "bootstrap: rank %d of %d lost its connection to the root (%s)", rank, nranks,
                     io == kIoClosed ? "closed by the root" : strerror(errno));
  if (r.status == kRootTimeout)
    return set_error(ncclTimeout, "bootstrap: the root stopped waiting after its timeout: %d of %d ranks came",
                     r.arrived, r.nranks);
  if (r.status != kOk)
    return set_error(ncclInvalidUsage,
                     "bootstrap: rank %d of %d ranks (%zu bytes) does not match the ranks already there (%d ranks): "
                     "every rank must pass the same nranks, and each rank must come once",
                     rank, nranks, bytes, r.nranks);
  return ncclSuccess;
}

}  // namespace nanoccl
