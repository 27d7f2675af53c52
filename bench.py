"""
Throughput benchmark: tokens/s of each strategy/variant on one config, measured by train.py itself.

    python bench.py                                  # CPU recipe, single vs DDP pytorch vs DDP custom on 2 procs
    python bench.py --iters=300 --nproc=4 --runs=ddp/pytorch,ddp/custom --repeat=3

Each run is `train.py config/train_shakespeare_char_cpu.py` (the same global batch of 12 x 64 tokens for all) for
--iters iterations with evaluation only at the start and end; the figure is the median tokens/s over the
iterations after the first 10 (warm-up), from out_dir/metrics.jsonl, and the median over --repeat runs
(run interleaved: every row once, then every row again, ...).
Data-parallel runs use batch_size / nproc per rank and gradient_accumulation_steps = nproc (one micro-batch per rank).
Also printed: the all-reduce bus bytes per step against the ring formula 2(N-1)/N * Psi * 4.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile

from config import load_config
from model import GPT, GPTConfig
from train import DEFAULTS

REPO = os.path.dirname(os.path.abspath(__file__))
CONFIG = "config/train_shakespeare_char_cpu.py"


def run(strategy, nproc, iters, data_dir, threads):
    """Train for `iters` iterations; return the records of out_dir/metrics.jsonl."""
    parallel, variant = strategy.split("/")
    out_dir = tempfile.mkdtemp(prefix="bench-")
    args = [CONFIG, f"--out_dir={out_dir}", f"--max_iters={iters}",
            f"--eval_interval={iters}", "--eval_iters=1", "--log_interval=1", f"--parallel={parallel}",
            f"--variant={variant}"]
    if data_dir:
        args.append(f"--data_dir={data_dir}")
    if nproc > 1:
        args += [f"--batch_size={12 // nproc}", f"--gradient_accumulation_steps={nproc}"]
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", "train.py", *args]
    else:
        cmd = [sys.executable, "train.py", *args]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)} if threads else os.environ
    subprocess.run(cmd, cwd=REPO, env=env, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=1800)
    with open(os.path.join(out_dir, "metrics.jsonl")) as f:
        return [m for m in map(json.loads, f) if "tokens_per_s" in m]


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    parser.add_argument("--iters", type=int, default=200)
    parser.add_argument("--nproc", type=int, default=2)
    parser.add_argument("--repeat", type=int, default=1)
    parser.add_argument("--runs", default="single/pytorch,ddp/pytorch,ddp/custom")
    parser.add_argument("--data_dir", default="", help="prepared shakespeare_char (default data/shakespeare_char)")
    args = parser.parse_args()

    c = load_config(DEFAULTS, [CONFIG])
    model_config = GPTConfig(block_size=c["block_size"], vocab_size=65, n_layer=c["n_layer"], n_head=c["n_head"],
                             n_embd=c["n_embd"], bias=c["bias"])  # 65: shakespeare_char's vocabulary
    psi = sum(p.numel() for p in GPT(model_config).parameters())
    results = {}
    rows = [(s, 1, 1) for s in args.runs.split(",") if s.startswith("single")]  # one thread, like a rank
    rows += [(s, 1, 0) for s in args.runs.split(",") if s.startswith("single")]  # all cores (torch's default)
    rows += [(s, args.nproc, 0) for s in args.runs.split(",") if not s.startswith("single")]
    records = {row: [] for row in rows}
    for _ in range(args.repeat):  # interleaved, so that a slow spell of the machine hits every row alike
        for row in rows:
            strategy, nproc, threads = row
            records[row].append(run(strategy, nproc, args.iters, args.data_dir, threads)[10:])
    print(f"{'strategy':<16} {'procs':>5} {'threads':>7} {'tokens/s':>10} {'ms/iter':>8} {'all-reduce bus B/step':>22} {'formula':>10}")
    for row, runs in records.items():
        strategy, nproc, threads = row
        tps = statistics.median(statistics.median(r["tokens_per_s"] for r in rs) for rs in runs)
        ms = statistics.median(statistics.median(r["ms_per_iter"] for r in rs) for rs in runs)
        bus = statistics.median(r.get("comm/all_reduce_bus_bytes", 0) for rs in runs for r in rs)
        results[row] = tps
        formula = 2 * (nproc - 1) / nproc * psi * 4
        print(f"{strategy:<16} {nproc:>5} {threads or 'all':>7} {tps:>10,.0f} {ms:>8.1f} {bus:>22,.0f} {formula:>10,.0f}")
    pt, cu = results.get(("ddp/pytorch", args.nproc, 0)), results.get(("ddp/custom", args.nproc, 0))
    if pt and cu:
        print(f"ddp custom / pytorch tokens/s at N={args.nproc}: {cu / pt:.3f}")


if __name__ == "__main__":
    main()
