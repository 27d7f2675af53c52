"""
All-reduce latency and bus bandwidth of the Collectives backends, by nccl-tests' definitions (doc/PERFORMANCE.md):
for S bytes all-reduced in t seconds over N ranks, algbw = S / t and busbw = algbw · 2(N-1)/N.

    torchrun --standalone --nproc_per_node=2 -m bench.comm                              # CPU: gloo vs triton
    torchrun --standalone --nproc_per_node=2 -m bench.comm --sizes=1M,16M,256M,1G --backends=triton,nccl,cuda

Backends: torch (comm.TorchCollectives over the process group: gloo), triton (kernels/triton_comm.py:
the Triton interpreter over /dev/shm on CPU, CUDA symmetric memory on a GPU), nccl (kernels/nccl.py over libnccl, GPU
only), cuda (the same binding over libnanoccl, kernels/cuda/: our own NCCL, GPU only; built with nvcc at first use;
its one-shot/ring threshold and FIFO sizes come from NANOCCL_* variables, kernels/cuda/plan.h).
The process group is gloo everywhere; on a GPU every rank uses GPU 0 (one GPU is what the device tool lends) with its
own NCCL_HOSTID, so NCCL accepts several ranks on it, and TORCH_SYMM_MEM_ALLOW_OVERLAPPING_DEVICES=1, without which
torch's symmetric memory refuses two ranks' allocations on one device ("detected allocations from overlapping
devices"). tools/gpu_check.py measures torch's NCCL too (a process group with NCCL for CUDA tensors).
Each size: `warmup` calls, then `iters` timed calls (a CUDA synchronize before and after); the time is the slowest
rank's mean per call, and one call first checks the result. Prints one row per (backend, size).
"""

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

from kernels.comm import TorchCollectives, teardown  # noqa: E402

UNITS = {"": 1, "K": 2**10, "M": 2**20, "G": 2**30}


def parse_size(text):
    """"4", "64K", "1M", "1G" -> bytes."""
    text = text.strip().upper().removesuffix("B")
    unit = text[-1] if text[-1] in "KMG" else ""
    return int(float(text[:len(text) - len(unit)]) * UNITS[unit])


def human(nbytes):
    for unit in ("G", "M", "K"):
        if nbytes >= UNITS[unit]:
            return f"{nbytes / UNITS[unit]:g}{unit}B"
    return f"{nbytes}B"


def make_backend(name, device, algorithm):
    if name == "torch":
        return TorchCollectives()
    if name == "triton":
        from kernels.triton_comm import TritonCollectives
        return TritonCollectives(device=device, algorithm=algorithm)
    if name == "nccl":
        from kernels.nccl import NCCLCollectives
        return NCCLCollectives(device=device)
    if name == "cuda":
        from kernels.nccl import CudaCollectives
        return CudaCollectives(device=device)
    raise ValueError(f"unknown backend {name!r}: torch, triton, nccl or cuda")


def time_all_reduce(comm, tensor, warmup, iters):
    """Seconds per all_reduce (sum) of `tensor` on the slowest rank."""
    cuda = tensor.is_cuda
    for _ in range(warmup):
        comm.all_reduce(tensor)
    if cuda:
        torch.cuda.synchronize()
    dist.barrier()
    start = time.perf_counter()
    for _ in range(iters):
        comm.all_reduce(tensor)
    if cuda:
        torch.cuda.synchronize()
    elapsed = torch.tensor([(time.perf_counter() - start) / iters], dtype=torch.float64)
    dist.all_reduce(elapsed, op=dist.ReduceOp.MAX)
    return elapsed.item()


def all_reduce_is_correct(comm, numel, dtype, device):
    """One all_reduce (sum) of rank+1 everywhere gives N(N+1)/2 everywhere, on every rank (checked by all)."""
    rank, N = dist.get_rank(), dist.get_world_size()
    t = torch.full((numel,), float(rank + 1), dtype=dtype, device=device)
    comm.all_reduce(t)
    ok = torch.tensor([int(bool((t == N * (N + 1) // 2).all()))])
    dist.all_reduce(ok, op=dist.ReduceOp.MIN)
    return bool(ok.item())


def bus_bandwidth(comm, sizes, dtype, device, warmup, iters):
    """All-reduce (sum) of each size in bytes: rows of dict(bytes, seconds, algbw, busbw (GB/s), correct), the time
    the slowest rank's mean over `iters` calls after `warmup` (nccl-tests' busbw = algbw * 2(N-1)/N)."""
    N, rows = dist.get_world_size(), []
    for size in sizes:
        numel = max(1, size // torch.empty((), dtype=dtype).element_size())
        correct = all_reduce_is_correct(comm, numel, dtype, device)
        tensor = torch.ones(numel, dtype=dtype, device=device)
        t = time_all_reduce(comm, tensor, warmup, iters)
        if hasattr(comm, "check"):  # nccl, cuda: an error the device reported after the calls returned
            comm.check()
        del tensor
        nbytes = numel * torch.empty((), dtype=dtype).element_size()
        algbw = nbytes / t / 1e9
        rows.append(dict(bytes=nbytes, seconds=t, algbw=algbw, busbw=algbw * 2 * (N - 1) / N, correct=correct))
    return rows


def main(argv):
    cuda = torch.cuda.is_available()
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--backends", default="triton,nccl,cuda" if cuda else "torch,triton")
    p.add_argument("--sizes", default="1M,4M,16M,64M,256M,1G" if cuda else "4,1K,64K,1M,4M")
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    p.add_argument("--algorithm", default="auto", help="triton all-reduce: auto, one_shot or two_shot")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--iters", type=int, default=10 if cuda else 5)
    args = p.parse_args(argv)

    if cuda:  # every rank on GPU 0: NCCL and symmetric memory must be told that this is deliberate
        os.environ["NCCL_HOSTID"] = f"nanoparallel-rank{os.environ['RANK']}"
        os.environ.setdefault("TORCH_SYMM_MEM_ALLOW_OVERLAPPING_DEVICES", "1")
        torch.cuda.set_device(0)
    dist.init_process_group("gloo")
    rank, N = dist.get_rank(), dist.get_world_size()
    device = torch.device("cuda", 0) if cuda else torch.device("cpu")
    dtype = getattr(torch, args.dtype)
    if rank == 0:
        print(f"all-reduce (sum, {args.dtype}) over {N} ranks on {torch.cuda.get_device_name(0) if cuda else 'CPU'}; "
              f"busbw = S/t * 2(N-1)/N")
        print(f"{'backend':<8} {'size':>7} {'time':>11} {'algbw GB/s':>11} {'busbw GB/s':>11}")
    for name in args.backends.split(","):
        comm = make_backend(name, device, args.algorithm)
        for row in bus_bandwidth(comm, [parse_size(x) for x in args.sizes.split(",")], dtype, device, args.warmup,
                                 args.iters):
            if rank == 0:
                print(f"{name:<8} {human(row['bytes']):>7} {row['seconds'] * 1e3:>8.3f} ms {row['algbw']:>11.4f} "
                      f"{row['busbw']:>11.4f}" + ("" if row["correct"] else "  WRONG RESULT"), flush=True)
    return 0


if __name__ == "__main__":
    code = 1
    try:
        code = main(sys.argv[1:])
    finally:
        teardown(code)
