"""
Profiler traces, CUDA memory snapshots and peak memory per rank for train.py (torchtitan's profiling and
memory_snapshot options, nanoGPT-sized).

    python train.py config/train_shakespeare_char_cpu.py --profile=True --max_iters=20
    torchrun --standalone --nproc_per_node=2 train.py config/train_shakespeare_char_fsdp_custom_cpu.py --profile=True

- `profile=True`: torch.profiler records iterations [profile_start, profile_start + profile_steps) on every rank
  (one warm-up iteration before, discarded) and writes one Chrome trace per rank, out_dir/profile/rank{r}.json:
  open it at https://ui.perfetto.dev (or chrome://tracing). CPU activity always, CUDA kernels on a GPU, tensor
  shapes and allocations (profile_memory).
- `memory_snapshot=True` (CUDA only): the caching allocator records every allocation and free with its Python stack
  from the first iteration, and out_dir/memory_snapshot/rank{r}.pickle is written once iteration
  memory_snapshot_step is done: drag it onto https://pytorch.org/memory_viz. PyTorch's API for it is
  torch.cuda.memory._record_memory_history / _dump_snapshot (underscored, but the documented way: "Understanding
  CUDA Memory Usage" in the PyTorch docs); this module is the one place that calls them.
- every log line shows each rank's peak memory: the CUDA caching allocator's peak allocated bytes
  (torch.cuda.max_memory_allocated), or on CPU the process's peak resident set size (getrusage's ru_maxrss), which
  includes the Python interpreter and libraries (~0.3-0.5 GB here), not only tensors.
"""

import os
import resource

import torch
import torch.distributed as dist


# Dense peak FLOP/s by GPU, the MFU denominator (NVIDIA's data sheets, without sparsity): (a substring of
# torch.cuda.get_device_name, bf16/fp16 tensor cores, fp32 without TF32 as torch multiplies fp32 by default). The
# first match wins: "H100 PCIe" before the SXM "H100".
PEAK_FLOPS = (("H200", 989.4e12, 66.9e12), ("H100 PCIe", 756.0e12, 51.2e12), ("H100", 989.4e12, 66.9e12),
              ("A100", 312.0e12, 19.5e12))


def peak_flops(device, dtype="bfloat16"):
    """(device name, dense peak FLOP/s of `device` for `dtype`, "bfloat16"/"float16"/"float32"): the peak is None
    where PEAK_FLOPS does not list the GPU, and on a CPU; then no MFU is printed."""
    if device.type != "cuda":
        return "CPU", None
    name = torch.cuda.get_device_name(device)
    for key, half, fp32 in PEAK_FLOPS:
        if key in name:
            return name, fp32 if dtype == "float32" else half
    return name, None


def check_profiling_config(cfg, device):
    """Raise ValueError (one line) for a memory snapshot without CUDA or an empty profiling window."""
    if cfg.memory_snapshot and device.type != "cuda":
        raise ValueError("memory_snapshot=True records the CUDA caching allocator and needs a GPU; on CPU use "
                         "profile=True (its trace has the allocations) and the log line's peak RSS")
    if cfg.profile and (cfg.profile_start < 0 or cfg.profile_steps < 1):
        raise ValueError(f"profile_start must be >= 0 and profile_steps >= 1, got {cfg.profile_start}, "
                         f"{cfg.profile_steps}")


def peak_memory_bytes(device):
    """This process's peak memory in bytes: CUDA allocator's peak allocated on `device`, or peak RSS on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def peak_memory_per_rank(device):
    """[peak memory of rank r in MiB for r in range(world_size)], on every rank (one all-gather of one number)."""
    mine = torch.tensor([peak_memory_bytes(device) / 2**20], dtype=torch.float64, device=device)
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return [round(mine.item(), 1)]
    out = [torch.zeros_like(mine) for _ in range(dist.get_world_size())]
    dist.all_gather(out, mine)
    return [round(t.item(), 1) for t in out]


class TrainingProfiler:
    """The profiler trace and the memory snapshot of one training run. Call step(iter_num) after each optimizer step
    (iter_num: the step just done) and close() after the loop (it writes a window cut short by the end of training).

    cfg: train.py's config (profile, profile_start, profile_steps, memory_snapshot, memory_snapshot_step, out_dir);
    first_iter: the iteration the loop starts at (0, or a resumed run's); rank: this process's global rank."""

    def __init__(self, cfg, device, rank, first_iter=0):
        self.cfg, self.rank, self.prof, self.snapshot = cfg, rank, None, False
        if cfg.profile and cfg.profile_start + cfg.profile_steps > first_iter:
            wait = max(cfg.profile_start - first_iter - 1, 0)
            warmup = 1 if cfg.profile_start > first_iter else 0
            active = cfg.profile_steps - max(first_iter - cfg.profile_start, 0)
            activities = [torch.profiler.ProfilerActivity.CPU]
            if device.type == "cuda":
                activities.append(torch.profiler.ProfilerActivity.CUDA)
            self.trace_path = os.path.join(cfg.out_dir, "profile", f"rank{rank}.json")
            os.makedirs(os.path.dirname(self.trace_path), exist_ok=True)
            self.prof = torch.profiler.profile(
                activities=activities, record_shapes=True, profile_memory=True,
                schedule=torch.profiler.schedule(wait=wait, warmup=warmup, active=active, repeat=1),
                on_trace_ready=self._write_trace)
            self.prof.start()
        if cfg.memory_snapshot and cfg.memory_snapshot_step >= first_iter:
            torch.cuda.memory._record_memory_history(max_entries=200_000)
            self.snapshot = True

    def _write_trace(self, prof):
        prof.export_chrome_trace(self.trace_path)
        if self.rank == 0:
            print(f"wrote profiler trace {self.trace_path} (one per rank): open it at https://ui.perfetto.dev")

    def step(self, iter_num):
        """Iteration iter_num is done: advance the profiler's schedule; dump the memory snapshot if it is time."""
        if self.prof is not None:
            self.prof.step()
        if self.snapshot and iter_num >= self.cfg.memory_snapshot_step:
            path = os.path.join(self.cfg.out_dir, "memory_snapshot", f"rank{self.rank}.pickle")
            os.makedirs(os.path.dirname(path), exist_ok=True)
            torch.cuda.memory._dump_snapshot(path)
            torch.cuda.memory._record_memory_history(enabled=None)
            self.snapshot = False
            if self.rank == 0:
                print(f"wrote memory snapshot {path} (one per rank): drag it onto https://pytorch.org/memory_viz")

    def close(self):
        """Stop recording (a trace still being recorded is written)."""
        if self.prof is not None:
            self.prof.stop()
            self.prof = None
        if self.snapshot:
            torch.cuda.memory._record_memory_history(enabled=None)
            self.snapshot = False
