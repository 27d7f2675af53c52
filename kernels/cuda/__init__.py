"""
libnanoccl: our own implementation of the part of NCCL's C API that kernels/nccl.py binds, in CUDA C++ (the `cuda`
variant: kernels/nccl.py's CudaCollectives loads it through the same binding as libnccl).

- nccl.h: the API (NCCL's signatures and enums); nanoccl.h: the extra functions the CPU tests call.
- comm.cu: communicators (CUDA IPC of every rank's region), the plan and sequence numbers of each call, groups,
  errors. bootstrap.cc: ncclGetUniqueId's root and the all-gather through it (TCP on 127.0.0.1).
- plan.h: the shared-memory layout, the kernels' arguments, the chunking arithmetic (host and device).
- algorithms.h: the kernels' bodies (ring all-reduce, all-gather, reduce-scatter, broadcast; one-shot all-reduce;
  point-to-point; the close barrier), compiled for the GPU by device.cu and for CPU threads by emulate.cu.
- build.py: nvcc at first use into a cache keyed by the sources (`python -m kernels.cuda.build`).
"""
