"""
Collectives backends below comm.py's torch.distributed one: the two lowest of the four abstraction levels.

- kernels/triton_comm.py: TritonCollectives, every collective a Triton kernel over a symmetric heap (CUDA symmetric
  memory on a GPU; /dev/shm files mapped by every rank and TRITON_INTERPRET=1 on CPU). The `triton` variant.
- kernels/nccl.py: NCCLCollectives, a ctypes binding of libnccl called directly. The `nccl` variant (GPU only).

parallel/__init__.py derives the `triton` and `nccl` variant of every strategy that has a `custom` one: the same
class, whose `collectives(group)` returns one of these backends instead of comm.TorchCollectives.
"""
