"""
ZeRO benchmark: what each rank holds (parameters, gradients, Adam state), the bytes each step moves and ms/step of
DDP, ZeRO-1, ZeRO-2 and FSDP (ZeRO-3) side by side, on the CPU recipe's model and global batch
(config/train_shakespeare_char_cpu.py: 4 layers, 128 dim, block 64, vocabulary 65: Ψ = 0.80M parameters; 12
sequences per step, one micro-batch of 6 per rank), 2 processes (gloo), fp32.

    python -m bench.zero                          # both variants, 2 processes
    python -m bench.zero --variants=custom --steps=50 --nproc=4

One torchrun job builds every strategy (ddp with zero_stage 0, 1, 2, and fsdp; each variant) and runs them in turn,
one step each, round after round, so a slow spell of a shared machine hits all of them alike; ms/step is the median
over --steps rounds after 3 warm-up rounds (forward, backward, clipping, AdamW). Memory: Strategy.memory_bytes after
a step, before zero_grad (params, grads, optimizer: what a rank holds between steps), per rank, against the ZeRO
paper's split for fp32 (params 4Ψ, grads 4Ψ, Adam 8Ψ, each divided by N where the stage shards it; Rajbhandari et
al. 2020, section 5). Bus bytes per step: what the strategy's collectives counted (comm.CommStats); pytorch ZeRO-1's
parameter broadcasts (ZeroRedundancyOptimizer) are not counted, only DDP's all-reduce.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from types import SimpleNamespace

import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = "config/train_shakespeare_char_cpu.py"
STAGES = [("ddp", "ddp", 0), ("zero1", "ddp", 1), ("zero2", "ddp", 2), ("fsdp", "fsdp", 0)]  # (label, parallel, stage)


def formula(label, psi, n):
    """The paper's per-rank bytes (params, grads, optimizer) for fp32 Adam at this stage over n ranks."""
    shards = {"ddp": (1, 1, 1), "zero1": (1, 1, n), "zero2": (1, n, n), "fsdp": (n, n, n)}[label]
    return [b * psi / s for b, s in zip((4, 4, 8), shards)]


def worker(args):
    """Inside torchrun: every (stage, variant); rank 0 prints one JSON line {name: {ms, memory per rank, bus}}."""
    import torch.distributed as dist

    from config import load_config
    from model import GPT, GPTConfig
    from parallel import build_strategy, init_distributed, teardown
    from train import DEFAULTS
    device = init_distributed(300)
    N = dist.get_world_size()
    base = load_config(DEFAULTS, [CONFIG, "--dtype=float32", "--compile=False", f"--gradient_accumulation_steps={N}"])
    model_config = GPTConfig(block_size=base["block_size"], vocab_size=65, n_layer=base["n_layer"],
                             n_head=base["n_head"], n_embd=base["n_embd"], dropout=base["dropout"], bias=base["bias"])
    runs = {}
    for variant in args.variants.split(","):
        for label, parallel, stage in STAGES:
            cfg = SimpleNamespace(**{**base, "parallel": parallel, "variant": variant, "zero_stage": stage,
                                     "batch_size": 12 // N})
            strategy = build_strategy(cfg, device)
            strategy.build_model(model_config)
            runs[f"{label}/{variant}"] = (strategy, strategy.configure_optimizer(), [])
    with torch.device("meta"):
        psi = sum(p.numel() for p in GPT(model_config).parameters())
    first = next(iter(runs.values()))[0]
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 65, (N, 12 // N, base["block_size"]), generator=g)
    batches = [(x[k], (x[k] * 3 + 1) % 65) for k in range(N)][first.dp_rank::first.dp_size]

    def step(strategy, optimizer, zero_grad=True):
        strategy.stats.reset()
        strategy.forward_backward(batches, None)
        strategy.clip_grad_norm_(1.0)
        optimizer.step()
        if zero_grad:
            optimizer.zero_grad(set_to_none=True)

    for i in range(3 + args.steps):
        for strategy, optimizer, times in runs.values():
            t0 = time.perf_counter()
            step(strategy, optimizer)
            if i >= 3:
                times.append(time.perf_counter() - t0)
    result = {"psi": psi, "N": N}
    for name, (strategy, optimizer, times) in runs.items():
        step(strategy, optimizer, zero_grad=False)
        mem = strategy.memory_bytes(optimizer)
        mine = torch.tensor([float(mem[k]) for k in ("params", "grads", "optimizer", "gathered")])
        every = [torch.zeros_like(mine) for _ in range(N)]
        dist.all_gather(every, mine)
        result[name] = {"ms": statistics.median(times) * 1000, "memory": [m.tolist() for m in every],
                        "bus": dict(strategy.stats.bus)}
    if dist.get_rank() == 0:
        print(json.dumps(result))
    teardown(0)


def main():
    parser = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    parser.add_argument("--variants", default="custom,pytorch", help="comma-separated variants")
    parser.add_argument("--steps", type=int, default=20, help="timed rounds")
    parser.add_argument("--nproc", type=int, default=2, help="processes (data-parallel ranks)")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(args)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={args.nproc}",
           "-m", "bench.zero", "--worker", f"--variants={args.variants}", f"--steps={args.steps}"]
    out = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=3600)
    if out.returncode != 0:
        sys.exit(f"failed:\n{out.stdout[-3000:]}{out.stderr[-3000:]}")
    result = json.loads([line for line in out.stdout.splitlines() if line.startswith("{")][-1])
    psi, N = result.pop("psi"), result.pop("N")
    print(f"Ψ = {psi:,} parameters, N = {N} ranks, fp32; per rank (rank 0), KiB: measured (the paper's split)")
    print(f"{'strategy':<15} {'params':>15} {'grads':>15} {'Adam':>15} {'total':>15} {'ranks differ':>12} "
          f"{'bus MB/step':>11} {'ms/step':>8}")
    for name, r in result.items():
        label = name.split("/")[0]
        want = formula(label, psi, N)
        got = r["memory"][0][:3]
        cells = [f"{g / 1024:6.0f} ({w / 1024:6.0f})" for g, w in zip(got + [sum(got)], want + [sum(want)])]
        spread = max(sum(m[:3]) for m in r["memory"]) - min(sum(m[:3]) for m in r["memory"])
        bus = sum(r["bus"].values()) / 1e6
        print(f"{name:<15} {' '.join(f'{c:>15}' for c in cells)} {spread / 1024:9.0f} KiB {bus:11.3f} "
              f"{r['ms']:8.1f}")


if __name__ == "__main__":
    main()
