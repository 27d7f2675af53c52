"""
The communication layer: the Collectives interface every custom algorithm is written against, and its backends,
one per level of abstraction below PyTorch's native API.

- kernels/comm.py: the Collectives interface (all_reduce, all_gather, reduce_scatter, all_to_all, broadcast,
  send/recv, barrier; byte counting by nccl-tests' convention), TorchCollectives over torch.distributed (the
  `custom` variant), and the process-group start-up and teardown every torchrun entry point uses. A leaf.
- kernels/triton_comm.py: TritonCollectives, every collective a Triton kernel over a symmetric heap (CUDA symmetric
  memory on a GPU; /dev/shm files mapped by every rank and TRITON_INTERPRET=1 on CPU). The `triton` variant.
- kernels/nccl.py: NCCLCollectives, a ctypes binding of libnccl called directly (the `nccl` variant, GPU only), and
  CudaCollectives, the same binding over libnanoccl, our own implementation of NCCL's API in CUDA C++ (kernels/cuda/;
  the `cuda` variant, GPU only).

Every strategy's custom class is registered for the `custom`, `triton`, `nccl` and `cuda` variants alike; its
`collectives(group)` (parallel.Strategy) hands the algorithm the backend the variant names (parallel.backend). The
modules here import nothing of parallel/ (kernels/ is below it), and kernels/comm.py nothing of this project.
"""
