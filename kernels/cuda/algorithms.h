/*
 * The kernels' bodies, written once: what one block of a collective or point-to-point kernel does.
 *
 * Included twice: by device.cu inside namespace nanoccl::dev, with GPU primitives (a block is a CUDA block of
 * kThreads threads), and by emulate.cu inside namespace nanoccl::emu, with CPU primitives (a block is a few CPU
 * threads with a barrier), so the CPU tests run exactly this code. The including file defines:
 *
 *   FN                                   the functions' qualifier (__device__ __forceinline__, or inline)
 *   struct Block { int tid, nthreads; void sync(); bool any(bool); }
 *                                        this thread and the block's size; __syncthreads; __syncthreads_or (every
 *                                        thread learns whether any thread passed true)
 *   u64 load_acquire(const u64*); void store_release(u64*, u64);   flags, at system scope (other processes, GPUs)
 *   u64 load_relaxed(const u64*); void store_relaxed(u64*, u64);   (volatile accesses)
 *   void fence();                        __threadfence_system
 *   u64 now_ns(); void pause(unsigned spins);
 *   bool claim(u64* word);               atomically 0 -> 1; true for the one caller that did it
 *   template <class U> U load_peer(const U*);   a load of data another rank wrote (on the GPU: ld.global.cv, which
 *                                        bypasses the L1 cache, whose lines are not coherent with other writers)
 *   struct F32, F16, BF16 { typedef ... Bits; static float load(Bits); static Bits store(float); }
 *                                        element types: arithmetic in float, stored rounded to nearest even
 *
 * Synchronisation. Every flag is a 64-bit counter in some rank's shared region (plan.h's Layout) that only grows, so
 * nothing is ever reset and a flag from an earlier call can never be mistaken for this one's. The host numbers every
 * connection's slots (comm.cu keeps the counters and passes each kernel its starting sequence numbers), so a kernel
 * keeps no state between launches. A producer writes data, fences (every thread), syncs the block, and thread 0
 * publishes with a release store; a consumer's thread 0 spins with acquire loads, then the block syncs and reads.
 * Every spin is bounded (wait_geq): it gives up after the configured timeout, or as soon as any rank has failed, and
 * records why for the host (plan.h's ErrorRecord; the host turns it into an ncclResult_t and a message).
 *
 * No block ever waits for another block of its own kernel, only for the same block of another rank's kernel: on one
 * GPU time-sliced between two processes, a waiting kernel spins until the driver switches to the other process,
 * whose kernel then finds what it waits for, so both progress without running at the same time.
 */

// The largest error codes a kernel records (ncclResult_t, nccl.h)
constexpr int kErrInvalidUsage = 5, kErrRemote = 6, kErrTimeout = 8;

// ---- flags and errors ----

FN u64* flag(const DevComm& c, int rank, u64 offset) { return (u64*)(c.bases[rank] + offset); }

// Record this rank's first error for the host (the record's `code` last) and, unless the error is another rank's
// abort, set every rank's abort word, so that every wait of every rank gives up at once instead of timing out.
FN void fail(const DevComm& c, int code, int what, int peer, int channel, u64 step, u64 desc, u64 peer_desc) {
  if (claim(flag(c, c.rank, c.L.claim))) {
    ErrorRecord* e = c.err;
    e->what = what;
    e->peer = peer;
    e->channel = channel;
    e->step = step;
    e->desc = desc;
    e->peer_desc = peer_desc;
    fence();
    e->code = code;
    fence();
  }
  if (what != kAborted)
    for (int p = 0; p < c.nranks; p++) store_release(flag(c, p, c.L.abort), (u64)c.rank + 1);
}

// Thread 0 of a block waits until *f >= target (NCCL's spin on a connection's head or tail), bounded: it gives up
// when a rank failed (this rank's abort word: checked first, so that after a failure every call reports it rather
// than what the failure left behind, such as a half-sent message) or after the timeout, recording why. False when
// it gave up.
FN bool wait_geq(const DevComm& c, const u64* f, u64 target, int what, int peer, int channel, u64 desc) {
  const u64* aborted = flag(c, c.rank, c.L.abort);
  const u64 start = now_ns();
  for (unsigned spins = 0;; spins++) {
    u64 failed = load_relaxed(aborted);
    if (failed) {
      fail(c, kErrRemote, kAborted, (int)failed - 1, channel, target, desc, 0);
      return false;
    }
    if (load_acquire(f) >= target) return true;
    if (now_ns() - start > c.timeout_ns) {
      fail(c, kErrTimeout, what, peer, channel, target, desc, 0);
      return false;
    }
    pause(spins);
  }
}

// ---- connections: NCCL's "simple" protocol (src/device/prims_simple.h) ----
//
// A connection from a sender to a receiver is a FIFO of `slots` buffers of slot_bytes in the receiver's region, a
// tail counter next to it (slots the sender has filled, written by the sender) and a head counter in the sender's
// region (slots the receiver has consumed, written by the receiver). Slot s of the FIFO holds the data of sequence
// numbers s, s + slots, s + 2 slots, ...; the sender may fill sequence number t once head >= t + 1 - slots, the
// receiver may read it once tail >= t + 1. Both sides poll only their own region's counter, and write the other's.
// A descriptor of the call travels with each slot (make_desc), so mismatched calls fail instead of mixing data.

struct Conn {
  char* slots;     // the FIFO (in the receiver's region)
  u64* tail;       // in the receiver's region: slots the sender has filled
  u64* desc;       // in the receiver's region: the descriptor of each slot's data
  u64* head;       // in the sender's region: slots the receiver has consumed
  u64 step;        // the sequence number of this side's next slot
  int peer;
};

FN char* slot_of(const DevComm& c, const Conn& k) { return k.slots + (k.step % c.slots) * c.slot_bytes; }

// The ring connections of channel ch: to next = rank + 1, from prev = rank - 1.
FN Conn ring_send(const DevComm& c, int ch, u64 step) {
  const int next = mod(c.rank + 1, c.nranks);
  Conn k;
  k.slots = c.bases[next] + c.L.ring_slots + (u64)ch * c.slots * c.slot_bytes;
  k.tail = flag(c, next, c.L.ring_tail) + ch;
  k.desc = flag(c, next, c.L.ring_desc) + (u64)ch * c.slots;
  k.head = flag(c, c.rank, c.L.ring_head) + ch;
  k.step = step;
  k.peer = next;
  return k;
}

FN Conn ring_recv(const DevComm& c, int ch, u64 step) {
  const int prev = mod(c.rank - 1, c.nranks);
  Conn k;
  k.slots = c.bases[c.rank] + c.L.ring_slots + (u64)ch * c.slots * c.slot_bytes;
  k.tail = flag(c, c.rank, c.L.ring_tail) + ch;
  k.desc = flag(c, c.rank, c.L.ring_desc) + (u64)ch * c.slots;
  k.head = flag(c, prev, c.L.ring_head) + ch;
  k.step = step;
  k.peer = prev;
  return k;
}

// The point-to-point connections to and from `peer` (possibly this rank itself).
FN Conn p2p_send(const DevComm& c, int peer, u64 step) {
  Conn k;
  k.slots = c.bases[peer] + c.L.p2p_slots + (u64)c.rank * c.slots * c.slot_bytes;
  k.tail = flag(c, peer, c.L.p2p_tail) + c.rank;
  k.desc = flag(c, peer, c.L.p2p_desc) + (u64)c.rank * c.slots;
  k.head = flag(c, c.rank, c.L.p2p_head) + peer;
  k.step = step;
  k.peer = peer;
  return k;
}

FN Conn p2p_recv(const DevComm& c, int peer, u64 step) {
  Conn k;
  k.slots = c.bases[c.rank] + c.L.p2p_slots + (u64)peer * c.slots * c.slot_bytes;
  k.tail = flag(c, c.rank, c.L.p2p_tail) + peer;
  k.desc = flag(c, c.rank, c.L.p2p_desc) + (u64)peer * c.slots;
  k.head = flag(c, peer, c.L.p2p_head) + c.rank;
  k.step = step;
  k.peer = peer;
  return k;
}

// Before a step: thread 0 waits until the receive connection's slot is full and holds this call's data, and until
// the send connection's slot is free (its previous use, `slots` sequence numbers ago, consumed). Every thread
// learns whether the step can run.
FN bool step_begin(Block& b, const DevComm& c, const Conn* recv, const Conn* send, u64 desc, int ch) {
  bool bad = false;
  if (b.tid == 0) {
    u64 failed = load_relaxed(flag(c, c.rank, c.L.abort));   // even a step that waits for nothing: after an
    if (failed) {                                              // ncclCommAbort a peer's region may be gone
      fail(c, kErrRemote, kAborted, (int)failed - 1, ch, recv ? recv->step : send->step, desc, 0);
      bad = true;
    }
    if (!bad && recv) {
      bad = !wait_geq(c, recv->tail, recv->step + 1, kWaitData, recv->peer, ch, desc);
      if (!bad) {
        u64 got = load_relaxed(recv->desc + recv->step % c.slots);
        if (got != desc) {
          fail(c, kErrInvalidUsage, kMismatch, recv->peer, ch, recv->step, desc, got);
          bad = true;
        }
      }
    }
    if (!bad && send && send->step + 1 > (u64)c.slots)
      bad = !wait_geq(c, send->head, send->step + 1 - c.slots, kWaitSpace, send->peer, ch, desc);
  }
  return !b.any(bad);
}

// After a step: every thread's stores into the send slot and loads from the receive slot are done (fence, block
// barrier); thread 0 publishes the send slot (descriptor, then tail with release) and frees the receive slot (head).
FN void step_end(Block& b, const DevComm& c, Conn* recv, Conn* send, u64 desc) {
  fence();
  b.sync();
  if (b.tid == 0) {
    if (send) {
      store_relaxed(send->desc + send->step % c.slots, desc);
      store_release(send->tail, send->step + 1);
    }
    if (recv) store_release(recv->head, recv->step + 1);
  }
  if (send) send->step++;
  if (recv) recv->step++;
}

// One step that moves n elements bit for bit: from the receive slot (or from `src` when there is no receive) into
// `dst` (if any) and into the send slot (if any). NCCL's send, copySend, recvCopySend and recv.
template <class U>
FN bool copy_step(Block& b, const DevComm& c, Conn* recv, Conn* send, u64 desc, int ch, const U* src, U* dst, u64 n) {
  if (!step_begin(b, c, recv, send, desc, ch)) return false;
  const U* in = recv ? (const U*)slot_of(c, *recv) : src;
  U* out = send ? (U*)slot_of(c, *send) : nullptr;
  for (u64 i = b.tid; i < n; i += b.nthreads) {
    U v = recv ? load_peer(in + i) : in[i];
    if (dst) dst[i] = v;
    if (out) out[i] = v;
  }
  step_end(b, c, recv, send, desc);
  return true;
}

// The reduction of two values, in float (NCCL's FuncSum, FuncProd, FuncMax, FuncMin; max and min as fmaxf/fminf).
template <int OP>
FN float reduce(float a, float b) {
  return OP == kSum ? a + b : OP == kProd ? a * b : OP == kMax ? fmaxf(a, b) : fminf(a, b);
}

// One step that reduces n elements of the receive slot with this rank's `x`, in float, into the send slot (a partial
// result, rounded to T: NCCL's recvReduceSend) and/or into `y` (the final result, first divided by nranks for
// ncclAvg: recvReduceCopySend, recvReduceCopy). The slot and y get the same rounded value.
template <class T, int OP>
FN bool reduce_step(Block& b, const DevComm& c, Conn* recv, Conn* send, u64 desc, int ch, const typename T::Bits* x,
                    typename T::Bits* y, u64 n, bool avg) {
  typedef typename T::Bits Bits;
  if (!step_begin(b, c, recv, send, desc, ch)) return false;
  const Bits* in = (const Bits*)slot_of(c, *recv);
  Bits* out = send ? (Bits*)slot_of(c, *send) : nullptr;
  for (u64 i = b.tid; i < n; i += b.nthreads) {
    float v = reduce<OP>(T::load(load_peer(in + i)), T::load(x[i]));
    if (avg) v = v / (float)c.nranks;
    Bits r = T::store(v);
    if (y) y[i] = r;
    if (out) out[i] = r;
  }
  step_end(b, c, recv, send, desc);
  return true;
}

// ---- the ring algorithms (NCCL's src/device/all_reduce.h, all_gather.h, reduce_scatter.h, broadcast.h: runRing) ----
//
// Ranks form the ring rank -> rank + 1. The data is cut into rounds (plan.h: ring_chunk, ring_rounds); channel ch
// (block ch) runs rounds ch, ch + C, ch + 2C, ... over its own connections, and every round moves through the ring
// in steps of one slot each, so a message of any size goes through FIFOs of fixed size.

// All-reduce = reduce-scatter, then all-gather (Patarasuk & Yuan 2009; NCCL's ring): every rank sends 2(N-1)
// chunks per round, 2(N-1)/N of the data in all (nccl-tests' bus bandwidth factor). Round `round` is cut into N
// segments. Segment j's reduction starts at rank j + 1 and ends, complete, at rank j: rank r sends its segment r - 1;
// for j = 2 .. N-1 it receives segment r - j, reduces its own into it and sends it on; it receives segment r, reduces
// its own into it (the result: divided by N for ncclAvg, stored, sent on); then it passes finished segments on
// (N - 2 receive-copy-sends) and receives the last one. Partial sums travel rounded to T; a segment's order of
// reduction is x[j+1], x[j+2], ..., x[j]: what the tests' reference reproduces.
template <class T, int OP>
FN void ring_all_reduce(Block& b, const CollArgs& a, int ch) {
  typedef typename T::Bits Bits;
  const DevComm& c = a.c;
  const int N = c.nranks, r = c.rank;
  const Bits* x = (const Bits*)a.src;
  Bits* y = (Bits*)a.dst;
  Conn send = ring_send(c, ch, a.send_step[ch]), recv = ring_recv(c, ch, a.recv_step[ch]);
  u64 off, len;
  for (u64 round = ch; round < a.rounds; round += c.nchannels) {
    ring_segment(a.count, N, a.chunk, round, mod(r - 1, N), &off, &len);
    if (!copy_step<Bits>(b, c, nullptr, &send, a.desc, ch, x + off, nullptr, len)) return;
    for (int j = 2; j < N; j++) {
      ring_segment(a.count, N, a.chunk, round, mod(r - j, N), &off, &len);
      if (!reduce_step<T, OP>(b, c, &recv, &send, a.desc, ch, x + off, nullptr, len, false)) return;
    }
    ring_segment(a.count, N, a.chunk, round, r, &off, &len);
    if (!reduce_step<T, OP>(b, c, &recv, &send, a.desc, ch, x + off, y + off, len, a.avg != 0)) return;
    for (int j = 1; j < N - 1; j++) {
      ring_segment(a.count, N, a.chunk, round, mod(r - j, N), &off, &len);
      if (!copy_step<Bits>(b, c, &recv, &send, a.desc, ch, nullptr, y + off, len)) return;
    }
    ring_segment(a.count, N, a.chunk, round, mod(r + 1, N), &off, &len);
    if (!copy_step<Bits>(b, c, &recv, nullptr, a.desc, ch, nullptr, y + off, len)) return;
  }
}

// Reduce-scatter: the all-reduce's first half over the N parts of the input (part j is rank j's output; count is
// the per-rank count): part j's reduction starts at rank j + 1 and ends at rank j, which stores it.
template <class T, int OP>
FN void ring_reduce_scatter(Block& b, const CollArgs& a, int ch) {
  typedef typename T::Bits Bits;
  const DevComm& c = a.c;
  const int N = c.nranks, r = c.rank;
  const Bits* x = (const Bits*)a.src;
  Bits* y = (Bits*)a.dst;
  Conn send = ring_send(c, ch, a.send_step[ch]), recv = ring_recv(c, ch, a.recv_step[ch]);
  u64 off, len;
  for (u64 round = ch; round < a.rounds; round += c.nchannels) {
    ring_piece(a.count, a.chunk, round, &off, &len);
    if (!copy_step<Bits>(b, c, nullptr, &send, a.desc, ch, x + (u64)mod(r - 1, N) * a.count + off, nullptr, len))
      return;
    for (int j = 2; j < N; j++)
      if (!reduce_step<T, OP>(b, c, &recv, &send, a.desc, ch, x + (u64)mod(r - j, N) * a.count + off, nullptr, len,
                              false))
        return;
    if (!reduce_step<T, OP>(b, c, &recv, nullptr, a.desc, ch, x + (u64)r * a.count + off, y + off, len, a.avg != 0))
      return;
  }
}

// All-gather: rank r's part goes around the ring; every rank stores each part as it passes and sends it on, except
// the rank before its owner (N - 1 sends and receives per round).
template <class U>
FN void ring_all_gather(Block& b, const CollArgs& a, int ch) {
  const DevComm& c = a.c;
  const int N = c.nranks, r = c.rank;
  const U* x = (const U*)a.src;
  U* y = (U*)a.dst;
  Conn send = ring_send(c, ch, a.send_step[ch]), recv = ring_recv(c, ch, a.recv_step[ch]);
  u64 off, len;
  for (u64 round = ch; round < a.rounds; round += c.nchannels) {
    ring_piece(a.count, a.chunk, round, &off, &len);
    if (!copy_step<U>(b, c, nullptr, &send, a.desc, ch, x + off, y + (u64)r * a.count + off, len)) return;
    for (int j = 1; j < N - 1; j++)
      if (!copy_step<U>(b, c, &recv, &send, a.desc, ch, nullptr, y + (u64)mod(r - j, N) * a.count + off, len)) return;
    if (!copy_step<U>(b, c, &recv, nullptr, a.desc, ch, nullptr, y + (u64)mod(r + 1, N) * a.count + off, len)) return;
  }
}

// Broadcast: the root's data goes around the ring once (a pipeline of chunks); each rank stores and forwards it,
// the rank before the root only stores it.
template <class U>
FN void ring_broadcast(Block& b, const CollArgs& a, int ch) {
  const DevComm& c = a.c;
  const int N = c.nranks, r = c.rank, next = mod(r + 1, N);
  const U* x = (const U*)a.src;
  U* y = (U*)a.dst;
  Conn send = ring_send(c, ch, a.send_step[ch]), recv = ring_recv(c, ch, a.recv_step[ch]);
  u64 off, len;
  for (u64 round = ch; round < a.rounds; round += c.nchannels) {
    ring_piece(a.count, a.chunk, round, &off, &len);
    bool ok;
    if (r == a.root)
      ok = copy_step<U>(b, c, nullptr, &send, a.desc, ch, x + off, x == y ? nullptr : y + off, len);
    else if (next == a.root)
      ok = copy_step<U>(b, c, &recv, nullptr, a.desc, ch, nullptr, y + off, len);
    else
      ok = copy_step<U>(b, c, &recv, &send, a.desc, ch, nullptr, y + off, len);
    if (!ok) return;
  }
}

// ---- one-shot all-reduce ----
//
// For small messages (TensorRT-LLM's oneShotAllReduceKernel; PyTorch symmetric memory's one_shot_all_reduce): each
// rank copies its input into its own stage and tells every peer (os_ready = the call's number k); once all stages
// hold call k, every rank reads all N of them and reduces them in rank order 0, 1, ..., N-1 (in float, rounded once;
// ncclAvg divides the sum by N first), then tells every peer it has finished reading theirs (os_done = k). A stage is
// overwritten by call k + 1 only after every peer's os_done reached k. One exchange of flags instead of the ring's
// 2(N-1) steps; N - 1 times the reads. Block b handles its slice of the elements with its own flags, against block b
// of every rank; every block takes part in every call, even with an empty slice, so its flags stay in step.
template <class T, int OP>
FN void one_shot_all_reduce(Block& b, const CollArgs& a, int blk) {
  typedef typename T::Bits Bits;
  const DevComm& c = a.c;
  const int N = c.nranks, r = c.rank;
  const u64 k = a.oneshot_seq, mine = (u64)blk * N;   // this block's flags: [mine + p] for rank p
  u64 lo, hi;
  oneshot_range(a.count, c.nchannels, blk, &lo, &hi);
  bool bad = false;
  if (b.tid == 0)   // 1. my stage is free once every peer has read call k - 1 from it
    for (int p = 0; p < N && !bad; p++)
      if (p != r) bad = !wait_geq(c, flag(c, r, c.L.os_done) + mine + p, k - 1, kWaitDone, p, blk, a.desc);
  if (b.any(bad)) return;
  const Bits* x = (const Bits*)a.src;
  Bits* stage = (Bits*)(c.bases[r] + c.L.stage);
  for (u64 i = lo + b.tid; i < hi; i += b.nthreads) stage[i] = x[i];   // 2. stage my slice
  fence();
  b.sync();
  if (b.tid == 0) {   // 3. publish it to every peer, then wait until every peer's stage holds call k
    for (int p = 0; p < N; p++)
      if (p != r) {
        store_relaxed(flag(c, p, c.L.os_desc) + mine + r, a.desc);
        store_release(flag(c, p, c.L.os_ready) + mine + r, k);
      }
    for (int p = 0; p < N && !bad; p++) {
      if (p == r) continue;
      bad = !wait_geq(c, flag(c, r, c.L.os_ready) + mine + p, k, kWaitReady, p, blk, a.desc);
      u64 got = bad ? a.desc : load_relaxed(flag(c, r, c.L.os_desc) + mine + p);
      if (got != a.desc) {
        fail(c, kErrInvalidUsage, kMismatch, p, blk, k, a.desc, got);
        bad = true;
      }
    }
  }
  if (b.any(bad)) return;
  Bits* y = (Bits*)a.dst;
  for (u64 i = lo + b.tid; i < hi; i += b.nthreads) {   // 4. reduce all stages in rank order
    float v = T::load(load_peer((const Bits*)(c.bases[0] + c.L.stage) + i));
    for (int p = 1; p < N; p++) v = reduce<OP>(v, T::load(load_peer((const Bits*)(c.bases[p] + c.L.stage) + i)));
    if (a.avg) v = v / (float)N;
    y[i] = T::store(v);
  }
  fence();
  b.sync();
  if (b.tid == 0)   // 5. done reading every peer's stage
    for (int p = 0; p < N; p++)
      if (p != r) store_release(flag(c, p, c.L.os_done) + mine + r, k);
}

// ---- point-to-point ----
//
// NCCL's p2p over the simple protocol: a message of B bytes goes through the (sender, receiver) connection in
// ceil(B / slot_bytes) slots; a send waits only for free slots, so a send whose message fits in the FIFO completes
// before its receive starts. Block `lane` runs, in order, the group's operations with one (peer, direction); the
// lanes of a group run at the same time, so the sends and receives of a group (an all-to-all: one of each with every
// peer) progress together and cannot deadlock. A send to this rank itself and its receive in the same group are one
// local copy (as in NCCL; the host pairs them), so no block waits for another block of its own kernel.
template <class U>
FN bool p2p_step(Block& b, const DevComm& c, Conn& k, bool is_send, u64 desc, int lane, char* buf, u64 bytes) {
  U* p = (U*)buf;
  const u64 n = bytes / sizeof(U);
  return is_send ? copy_step<U>(b, c, nullptr, &k, desc, lane, p, nullptr, n)
                 : copy_step<U>(b, c, &k, nullptr, desc, lane, nullptr, p, n);
}

template <class U>
FN void local_copy(Block& b, char* dst, const char* src, u64 bytes) {
  for (u64 i = b.tid; i < bytes / sizeof(U); i += b.nthreads) ((U*)dst)[i] = ((const U*)src)[i];
  b.sync();
}

FN void p2p(Block& b, const P2PArgs& a, int lane) {
  const DevComm& c = a.c;
  for (int i = 0; i < a.nops; i++) {
    const P2POp& op = a.ops[i];
    if (op.lane != lane) continue;
    if (op.kind == kCopyOp) {
      switch (op.elemsize) {
        case 1: local_copy<unsigned char>(b, op.buf, op.src, op.bytes); break;
        case 2: local_copy<unsigned short>(b, op.buf, op.src, op.bytes); break;
        case 4: local_copy<unsigned int>(b, op.buf, op.src, op.bytes); break;
        default: local_copy<u64>(b, op.buf, op.src, op.bytes); break;
      }
      continue;
    }
    const bool is_send = op.kind == kSendOp;
    Conn k = is_send ? p2p_send(c, op.peer, op.step) : p2p_recv(c, op.peer, op.step);
    const u64 desc = make_desc(kP2P, 0, 0, 0, op.bytes);
    for (u64 off = 0; off < op.bytes; off += c.slot_bytes) {
      const u64 n = min_u64(op.bytes - off, c.slot_bytes);
      bool ok;
      switch (op.elemsize) {   // copy in units of the element (buffers are aligned to their element size)
        case 1: ok = p2p_step<unsigned char>(b, c, k, is_send, desc, lane, op.buf + off, n); break;
        case 2: ok = p2p_step<unsigned short>(b, c, k, is_send, desc, lane, op.buf + off, n); break;
        case 4: ok = p2p_step<unsigned int>(b, c, k, is_send, desc, lane, op.buf + off, n); break;
        default: ok = p2p_step<u64>(b, c, k, is_send, desc, lane, op.buf + off, n); break;
      }
      if (!ok) return;
    }
  }
}

// ---- ncclCommDestroy's barrier ----
//
// Every rank tells every rank it is closing, then waits for all of them: a rank that passes it knows every peer has
// finished the kernels that write into its region (the host synchronised its device first), so it may free it.
FN void close_barrier(Block& b, const CollArgs& a) {
  const DevComm& c = a.c;
  if (b.tid != 0) return;
  for (int p = 0; p < c.nranks; p++) store_release(flag(c, p, c.L.closing) + c.rank, 1);
  for (int p = 0; p < c.nranks; p++)
    if (!wait_geq(c, flag(c, c.rank, c.L.closing) + p, 1, kWaitClose, p, 0, 0)) return;
}

// ---- what one block of each kernel runs ----

template <class T, int OP>
FN void reduce_body(Block& b, const CollArgs& a, int blk) {
  if (a.kind == kReduceScatter)
    ring_reduce_scatter<T, OP>(b, a, blk);
  else if (a.algorithm == kAlgoOneShot)
    one_shot_all_reduce<T, OP>(b, a, blk);
  else
    ring_all_reduce<T, OP>(b, a, blk);
}

template <class U>
FN void copy_body(Block& b, const CollArgs& a, int blk) {
  if (a.kind == kAllGather)
    ring_all_gather<U>(b, a, blk);
  else
    ring_broadcast<U>(b, a, blk);
}
