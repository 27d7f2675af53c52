"""
Collectives backends below comm.py's torch.distributed one: the two lowest of the four abstraction levels.

- kernels/triton_comm.py: TritonCollectives, every collective a Triton kernel over a symmetric heap (CUDA symmetric
  memory on a GPU; /dev/shm files mapped by every rank and TRITON_INTERPRET=1 on CPU). The `triton` variant.
- kernels/nccl.py: NCCLCollectives, a ctypes binding of libnccl called directly. The `nccl` variant (GPU only).

Every strategy's custom class is registered for the `custom`, `triton` and `nccl` variants alike; its
`collectives(group)` (parallel.Strategy) hands the algorithm the backend the variant names (parallel.backend): one of
these instead of comm.TorchCollectives. These modules import only comm.py, never parallel/.
"""
