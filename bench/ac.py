"""
Activation checkpointing benchmark: peak memory per rank and step time of each mode (none, full, selective with
the op-level policy, selective every 2nd block) for each strategy, on the CPU recipe's model and global batch
(config/train_shakespeare_char_*_cpu.py: 4 layers, 128 dim, block 64, 12 sequences per step).

    python -m bench.ac                                         # single + every strategy's custom variant
    python -m bench.ac --strategies=fsdp/pytorch,pp/custom --steps=30

Each strategy runs in one torchrun job (its config's process count: 1, 2, or 8 for 3d; one thread each) that builds
the model once per mode and alternates the modes step by step, so a slow spell of a shared machine hits all of them
alike; ms/step is the median over --steps steps after 3 warm-up steps. Memory: the forward and backward of one more
step per mode (not the optimizer's step; a whole step before it is profiled too) recorded by torch.profiler with
profile_memory=True, whose Chrome trace has one event per allocation and free with the CPU allocator's running
total: the peak of that total over the step minus its value at the start is the memory allocated during the step and
alive at its peak (activations, gradients, temporaries; the parameters and Adam state allocated before it are not
counted). On a GPU: torch.cuda.max_memory_allocated over the step minus memory_allocated before it. The gradients
are the same in every mode, so the difference to "none" is what the mode saves of activations, minus what its
recomputation allocates at the peak. On CPU the collectives' gloo buffers are allocated and freed on gloo's own
threads, at moments that vary from step to step around the peak (up to ~5 MiB on tp here): the figure is the least
of 5 measured steps.
"""

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from types import SimpleNamespace

import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODES = [("none", "op"), ("full", "op"), ("selective", "op"), ("selective", "2")]
CONFIGS = {  # strategy -> (config file, processes); variant given separately
    "single": ("config/train_shakespeare_char_cpu.py", 1),
    "ddp": ("config/train_shakespeare_char_ddp_{variant}_cpu.py", 2),
    "fsdp": ("config/train_shakespeare_char_fsdp_{variant}_cpu.py", 2),
    "tp": ("config/train_shakespeare_char_tp_{variant}_cpu.py", 2),
    "pp": ("config/train_shakespeare_char_pp_{variant}_cpu.py", 2),
    "3d": ("config/train_shakespeare_char_3d_{variant}_cpu.py", 8),
}


def step_peak_bytes(warmup, measured, device):
    """Run warmup() then measured(); return the bytes allocated during measured() that are alive at its peak (see
    the module docstring). warmup, a whole step, runs under the profiler too, so that the tensors it leaves to
    measured() (and measured() frees) have known sizes."""
    if device.type == "cuda":
        warmup()
        torch.cuda.synchronize(device)
        start = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        measured()
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) - start
    from torch.profiler import ProfilerActivity, profile, record_function
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        warmup()
        with record_function("measured"):
            measured()
    with tempfile.TemporaryDirectory() as d:
        prof.export_chrome_trace(os.path.join(d, "trace.json"))
        with open(os.path.join(d, "trace.json")) as f:
            trace = json.load(f)["traceEvents"]
    window = next(e for e in trace if e.get("name") == "measured" and e.get("ph") == "X")
    lo, hi = window["ts"], window["ts"] + window["dur"]
    events = sorted((e for e in trace if e.get("name") == "[memory]" and lo <= e["ts"] <= hi),
                    key=lambda e: (e["ts"], e["args"].get("Ev Idx", 0)))
    if not events:
        return 0
    # one event per allocation or free, with the CPU allocator's running total of what it allocated while profiled
    # ("Total Allocated", after the event) and its size ("Bytes", negative for a free), in time order
    start = events[0]["args"]["Total Allocated"] - events[0]["args"]["Bytes"]
    return max(e["args"]["Total Allocated"] for e in events) - start


def worker(args):
    """Inside torchrun: one strategy, every mode; rank 0 prints one JSON line {mode: [ms, [peak bytes per rank]]}."""
    import torch.distributed as dist

    from config import load_config
    from model import GPTConfig
    from parallel import build_strategy, init_distributed, teardown
    from train import DEFAULTS
    device = init_distributed(120)
    base = load_config(DEFAULTS, [args.config, f"--variant={args.variant}", "--dtype=float32", "--compile=False"])
    model_config = GPTConfig(block_size=base["block_size"], vocab_size=65, n_layer=base["n_layer"],
                             n_head=base["n_head"], n_embd=base["n_embd"], dropout=base["dropout"], bias=base["bias"])
    runs = {}
    for mode, option in MODES:
        torch.manual_seed(0)
        strategy = build_strategy(SimpleNamespace(**{**base, "activation_checkpoint": mode,
                                                     "selective_ac_option": option}), device)
        strategy.build_model(model_config)
        runs[(mode, option)] = (strategy, strategy.configure_optimizer(), [])
    first = next(iter(runs.values()))[0]
    g = torch.Generator().manual_seed(0)
    n_micro = first.grad_accum * first.dp_size
    x = torch.randint(0, 65, (n_micro, base["batch_size"], base["block_size"]), generator=g)
    batches = [(x[k], (x[k] * 3 + 1) % 65) for k in range(n_micro)][first.dp_rank::first.dp_size]
    batches = [(a.to(device), b.to(device)) for a, b in batches]

    def step(strategy, optimizer, forward_backward=True):
        if forward_backward:
            strategy.forward_backward(batches, None)
        strategy.clip_grad_norm_(1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    for i in range(3 + args.steps):
        for strategy, optimizer, times in runs.values():
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            t0 = time.perf_counter()
            step(strategy, optimizer)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            if i >= 3:
                times.append(time.perf_counter() - t0)
    result = {}
    for (mode, option), (strategy, optimizer, times) in runs.items():
        peak = math.inf
        for _ in range(5):  # the least of 5: see the module docstring
            peak = min(peak, step_peak_bytes(lambda: step(strategy, optimizer),
                                             lambda: strategy.forward_backward(batches, None), device))
            step(strategy, optimizer, forward_backward=False)
        peak = torch.tensor([float(peak)], device=device)
        peaks = [torch.zeros_like(peak) for _ in range(dist.get_world_size())] if dist.is_initialized() else [peak]
        if dist.is_initialized():
            dist.all_gather(peaks, peak)
        result[f"{mode}/{option}"] = [statistics.median(times) * 1000, [int(p.item()) for p in peaks]]
    if not dist.is_initialized() or dist.get_rank() == 0:
        print(json.dumps(result))
    teardown(0)


def main():
    parser = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    parser.add_argument("--strategies", default="single/pytorch,ddp/custom,fsdp/custom,tp/custom,pp/custom,3d/custom",
                        help="comma-separated strategy/variant pairs")
    parser.add_argument("--steps", type=int, default=20, help="timed steps per mode")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--config", help=argparse.SUPPRESS)
    parser.add_argument("--variant", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(args)
    print(f"{'strategy':<16} {'mode':<14} {'ms/step':>8} {'vs none':>8}  peak step memory per rank, MiB "
          f"(vs none)")
    for pair in args.strategies.split(","):
        parallel, variant = pair.split("/")
        config, nproc = CONFIGS[parallel]
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
               "-m", "bench.ac", "--worker", f"--config={config.format(variant=variant)}", f"--variant={variant}",
               f"--steps={args.steps}"]
        env = {**os.environ, "OMP_NUM_THREADS": "1"}  # what torchrun sets for 2+ processes; single alike
        out = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=3600, env=env)
        if out.returncode != 0:
            print(f"{pair}: failed\n{out.stdout[-3000:]}{out.stderr[-3000:]}")
            continue
        result = json.loads([line for line in out.stdout.splitlines() if line.startswith("{")][-1])
        ms0, peaks0 = result["none/op"]
        for mode, (ms, peaks) in result.items():
            name = mode.replace("/op", "") if not mode.startswith("selective") else mode.replace("/", " ")
            mem = " ".join(f"{p / 2**20:6.2f}" for p in peaks)
            saved = sum(peaks) / sum(peaks0) - 1
            print(f"{pair:<16} {name:<14} {ms:8.1f} {ms / ms0 - 1:+8.1%}  {mem}  ({saved:+.0%})")


if __name__ == "__main__":
    main()
