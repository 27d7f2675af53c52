"""
Throughput benchmark on the CPU recipe (config/train_shakespeare_char_cpu.py): single, DDP and FSDP, both variants.

    python -m bench.throughput               # 2 processes for DDP
    python -m bench.throughput --iters=300 --nproc=4 --repeat=3

Two measurements:
1. train.py itself, run for --iters iterations per strategy (evaluation only at the start and end), the same
   global batch of 12 x 64 tokens for all: data-parallel runs use batch_size 12 / nproc per rank. The figure is
   the median tokens/s over the iterations after the first 10, from out_dir/metrics.jsonl, then the median over
   --repeat runs, taken interleaved (every row once, then every row again). Also printed: the bus bytes per step
   (all collectives) next to the ring formula: DDP 2(N-1)/N * Psi * 4, FSDP 3(N-1)/N * Psi * 4.
2. For DDP and for FSDP, a paired A/B of the two variants inside one torchrun job: both are built on the same
   data and alternate optimizer steps, so a slow spell of a shared machine hits both alike. On a 2-core VM,
   run-to-run noise of (1) is about +-10%, too much to resolve a few percent; (2) is the figure to quote for
   custom / pytorch. It also prints the bytes of parameters + gradients + Adam state that rank 0 holds.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

import torch

from config import load_config
from model import GPT, GPTConfig
from train import DEFAULTS

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = "config/train_shakespeare_char_cpu.py"


def model_config():
    """The CPU recipe's GPTConfig (65 symbols: shakespeare_char's vocabulary)."""
    c = load_config(DEFAULTS, [CONFIG])
    return GPTConfig(block_size=c["block_size"], vocab_size=65, n_layer=c["n_layer"], n_head=c["n_head"],
                     n_embd=c["n_embd"], bias=c["bias"])


def torchrun(nproc, *args):
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", *args]


def train_run(strategy, nproc, iters, data_dir, threads):
    """Run train.py for `iters` iterations; return its per-iteration records from out_dir/metrics.jsonl."""
    parallel, variant = strategy.split("/")
    out_dir = tempfile.mkdtemp(prefix="bench-")
    args = [CONFIG, f"--out_dir={out_dir}", f"--max_iters={iters}", f"--eval_interval={iters}", "--eval_iters=1",
            "--log_interval=1", f"--parallel={parallel}", f"--variant={variant}"]
    if data_dir:
        args.append(f"--data_dir={data_dir}")
    if nproc > 1:
        cmd = torchrun(nproc, "train.py", *args, f"--batch_size={12 // nproc}",
                       f"--gradient_accumulation_steps={nproc}")
    else:
        cmd = [sys.executable, "train.py", *args]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)} if threads else os.environ
    subprocess.run(cmd, cwd=REPO, env=env, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                   timeout=1800)
    with open(os.path.join(out_dir, "metrics.jsonl")) as f:
        return [m for m in map(json.loads, f) if "tokens_per_s" in m]


def held_bytes(strategy, optimizer):
    """Bytes of parameters + gradients + optimizer state this rank holds (FSDP: its shards)."""
    if hasattr(strategy, "memory_bytes"):
        mem = strategy.memory_bytes(optimizer)
        return mem["params"] + mem["grads"] + mem["optimizer"]
    params = list(strategy.model.parameters())
    state = [t for s in optimizer.state.values() for t in s.values() if torch.is_tensor(t) and t.dim() > 0]
    return sum(t.numel() * t.element_size() for t in params + [p.grad for p in params if p.grad is not None] + state)


def paired_worker(steps, parallel):
    """Under torchrun: `parallel`'s pytorch and custom variants on the same batches, alternating optimizer steps;
    rank 0 prints {variant: [median step seconds, bytes held]} as JSON."""
    from types import SimpleNamespace

    from parallel import build_strategy, init_distributed, teardown
    device = init_distributed()
    cfg = {**load_config(DEFAULTS, [CONFIG]), "parallel": parallel}
    world = int(os.environ["WORLD_SIZE"])
    strategies = {}
    for variant in ("pytorch", "custom"):
        s = build_strategy(SimpleNamespace(**{**cfg, "variant": variant, "batch_size": 12 // world,
                                              "gradient_accumulation_steps": world}), device)
        s.build_model(model_config())
        strategies[variant] = (s, s.configure_optimizer())
    g = torch.Generator().manual_seed(0)
    x, y = torch.randint(0, 65, (2, 12 // world, 64), generator=g)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    times, held = {v: [] for v in strategies}, {}
    for step in range(steps):
        for variant, (s, opt) in strategies.items():
            t0 = time.perf_counter()
            s.forward_backward([(x, y)], scaler)
            s.clip_grad_norm_(1.0)
            opt.step()
            held[variant] = held_bytes(s, opt)
            opt.zero_grad(set_to_none=True)
            if step >= 10:
                times[variant].append(time.perf_counter() - t0)
    if int(os.environ["RANK"]) == 0:
        print(json.dumps({v: [statistics.median(t), held[v]] for v, t in times.items()}))
    teardown(0)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    parser.add_argument("--iters", type=int, default=200)
    parser.add_argument("--nproc", type=int, default=2)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--data_dir", default="", help="prepared shakespeare_char (default data/shakespeare_char)")
    parser.add_argument("--strategies", default="ddp,fsdp", help="comma-separated strategies to compare with single")
    parser.add_argument("--paired-worker", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--pair", default="ddp", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.paired_worker:
        return paired_worker(args.paired_worker, args.pair)

    psi = sum(p.numel() for p in GPT(model_config()).parameters())
    strategies = args.strategies.split(",")
    rows = [("single/pytorch", 1, 1), ("single/pytorch", 1, 0),
            *((f"{s}/{v}", args.nproc, 0) for s in strategies for v in ("pytorch", "custom"))]
    runs = {row: [] for row in rows}
    for _ in range(args.repeat):
        for row in rows:
            runs[row].append(train_run(row[0], row[1], args.iters, args.data_dir, row[2])[10:])
    print(f"1. train.py, {args.iters} iterations x {args.repeat} runs")
    print(f"{'strategy':<16} {'procs':>5} {'threads':>7} {'tokens/s':>10} {'ms/iter':>8} {'bus B/step':>12} "
          f"{'formula':>12}")
    ring_passes = {"single": 0, "ddp": 2, "fsdp": 3}  # times (N-1)/N * Psi * 4 bytes
    for (strategy, nproc, threads), records in runs.items():
        tps = statistics.median(statistics.median(r["tokens_per_s"] for r in rs) for rs in records)
        ms = statistics.median(statistics.median(r["ms_per_iter"] for r in rs) for rs in records)
        bus = statistics.median(sum(v for k, v in r.items() if k.endswith("_bus_bytes")) for rs in records for r in rs)
        formula = ring_passes.get(strategy.split("/")[0], float("nan")) * (nproc - 1) / nproc * psi * 4
        print(f"{strategy:<16} {nproc:>5} {threads or 'all':>7} {tps:>10,.0f} {ms:>8.1f} {bus:>12,.0f} "
              f"{formula:>12,.0f}")

    tokens = 12 * 64
    print(f"2. paired A/B in one job, N={args.nproc}, {args.iters - 10} alternating steps each; bytes of params + "
          f"grads + Adam state on rank 0 (single: {16 * psi:,})")
    for parallel in strategies:
        out = subprocess.run(torchrun(args.nproc, "-m", "bench.throughput", f"--paired-worker={args.iters}",
                                      f"--pair={parallel}"),
                             cwd=REPO, check=True, capture_output=True, text=True, timeout=1800).stdout
        median = json.loads(out.strip().splitlines()[-1])
        for variant, (seconds, held) in median.items():
            print(f"{parallel}/{variant:<12} {seconds * 1000:8.1f} ms/step {tokens / seconds:10,.0f} tokens/s "
                  f"{held:12,} bytes held")
        print(f"{parallel} custom / pytorch tokens/s at N={args.nproc}: "
              f"{median['pytorch'][0] / median['custom'][0]:.3f}")


if __name__ == "__main__":
    main()
