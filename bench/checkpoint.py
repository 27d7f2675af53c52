"""
What a checkpoint costs the training loop, synchronous vs asynchronous (async_checkpoint=True), and how long a
crashed job takes to come back under torchrun --max-restarts, measured on train.py itself.

    python -m bench.checkpoint                                     # single, ddp, fsdp; then the restart
    python -m bench.checkpoint --strategies=fsdp --iters=40 --interval=10 --repeat=5 --n_layer=6 --n_embd=384

config/train_shakespeare_char.py with 4 layers, 256 wide (3.2M parameters: a 38 MB checkpoint with AdamW's
moments), micro-batches of 2 x 64 tokens unless overridden (its own 6 x 384 model takes seconds per step on these
CPUs), on character-level Shakespeare (data/shakespeare_char, or --data_dir).
Stall per checkpoint = the time a save held the loop (metrics.jsonl's checkpoint_s; an async save: the copy to
CPU memory) + what the --after steps following it took beyond the steps after those, in the same run (what a
background write costs the steps it overlaps; a same-run baseline, since the load of a shared VM drifts between
runs). Medians over every save of --repeat runs of each mode, run in turn; one thread per process (torchrun's
default). Restart: ddp on 2 processes with rank 1 SIGKILLed (train.py's NANOPARALLEL_FAULT test hook) at
--kill_iter: seconds from the kill to the restarted job's resume line and to its first step, and the checkpoint's
load time.
"""

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STRATEGIES = {"single": (0, ["--parallel=single"]),
              "ddp": (2, ["--parallel=ddp", "--variant=pytorch", "--gradient_accumulation_steps=2"]),
              "fsdp": (2, ["--parallel=fsdp", "--variant=pytorch", "--gradient_accumulation_steps=2"])}
MODES = {"sync": [], "async": ["--async_checkpoint=True"]}


def command(nproc, args, restarts=0):
    """python train.py ... (nproc 0) or torchrun with nproc processes on a free port."""
    if nproc == 0:
        return [sys.executable, "train.py", *args]
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
            f"--max-restarts={restarts}", "train.py", *args]


def records(out_dir):
    with open(os.path.join(out_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def stalls(out_dir, interval, after, iters):
    """[(time the save held the loop, time the `after` steps following it took beyond the same run's baseline)] per
    save of a run, in seconds; the baseline being the median of the steps `after`..interval-1 after that save (the
    same run, the same minutes of the VM's load). The save after the last step is not counted."""
    recs = records(out_dir)
    step = {r["iter"]: r["ms_per_iter"] / 1000 for r in recs if "ms_per_iter" in r}
    out = []
    for r in recs:
        if "checkpoint_s" in r and r["iter"] + interval <= iters:
            s = r["iter"]
            base = statistics.median(step[s + j] for j in range(after, interval))
            out.append((r["checkpoint_s"], sum(step[s + j] - base for j in range(after)), base))
    return out


def run(nproc, args, timeout_s):
    out_dir = tempfile.mkdtemp(prefix="bench-ckpt-")
    try:
        proc = subprocess.run(command(nproc, [*args, f"--out_dir={out_dir}"]), cwd=REPO, capture_output=True,
                              text=True, timeout=timeout_s, env={**os.environ, "OMP_NUM_THREADS": "1"})
        if proc.returncode:
            sys.exit(f"train.py failed:\n{(proc.stdout + proc.stderr)[-4000:]}")
        sizes = [os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(os.path.join(out_dir, "checkpoints"))
                 for f in fs]
        return out_dir, sum(sizes)
    except BaseException:
        shutil.rmtree(out_dir, ignore_errors=True)
        raise


def stall(args, base):
    """Per strategy and mode: the median time a save held the loop, and the stall per checkpoint = that + what the
    `after` steps following it took beyond the steps after them (a background write slowing the steps shows
    there); medians over every save of the --repeat runs."""
    print(f"{args.iters} iterations, a checkpoint every {args.interval} (from {args.interval}), {args.repeat} runs of "
          f"each mode in turn; per save: its time in the loop + the excess of the {args.after} steps after it over "
          f"steps {args.after}..{args.interval - 1} after it; medians over saves")
    print("| strategy | checkpoint | step | sync: held the loop | sync: stall per checkpoint | async: held the loop | "
          "async: stall per checkpoint |")
    print("|---|---|---|---|---|---|---|")
    for name in args.strategies.split(","):
        nproc, strategy_args = STRATEGIES[name]
        found = {m: [] for m in MODES}
        for _ in range(args.repeat):
            for mode, mode_args in MODES.items():
                out_dir, nbytes = run(nproc, [*base, *strategy_args, *mode_args], args.timeout_s)
                found[mode] += stalls(out_dir, args.interval, args.after, args.iters)
                shutil.rmtree(out_dir, ignore_errors=True)
                if mode == "sync":
                    size = nbytes / args.keep
        cells = []
        for mode in MODES:
            held = statistics.median(h for h, _, _ in found[mode])
            total = statistics.median(h + e for h, e, _ in found[mode])
            cells += [f"{1000 * held:.0f} ms", f"{1000 * total:.0f} ms"]
        step = statistics.median(b for m in MODES for _, _, b in found[m])
        print(f"| {name} | {size / 1e6:.0f} MB | {1000 * step:.0f} ms | {' | '.join(cells)} |", flush=True)


def restart(args, base):
    """Kill rank 1 of a 2-process ddp job at kill_iter; time the way back from the output's arrival times."""
    out_dir = tempfile.mkdtemp(prefix="bench-restart-")
    nproc, strategy_args = STRATEGIES["ddp"]
    cmd = command(nproc, [*base, *strategy_args, "--init_from=auto", f"--out_dir={out_dir}"], restarts=1)
    env = {**os.environ, "NANOPARALLEL_FAULT": f"kill:1:{args.kill_iter}"}
    lines = []
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)

    def read():
        for line in proc.stdout:
            lines.append((time.monotonic(), line.rstrip("\n")))
    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    code = proc.wait(timeout=args.timeout_s)
    reader.join(10)
    shutil.rmtree(out_dir, ignore_errors=True)
    if code:
        sys.exit("the restarted job failed:\n" + "\n".join(line for _, line in lines)[-4000:])
    kill = next(t for t, line in lines if line.startswith("fault:"))
    resume_t, resume = next((t, line) for t, line in lines if line.startswith("resuming from"))
    resumed_iter = int(resume.split(" at iteration ")[1].split()[0])
    first = next(t for t, line in lines if t > resume_t and line.startswith(f"iter {resumed_iter}:"))
    print(f"restart (ddp, 2 processes, rank 1 SIGKILLed at iteration {args.kill_iter}, resumed at {resumed_iter}): "
          f"{resume_t - kill:.1f} s from the kill to the resume line (failure detected, workers stopped, new "
          f"processes started, process group formed), {first - kill:.1f} s to the first step; the checkpoint "
          f"loaded in {resume.split('(loaded in ')[1].rstrip(')')}")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--strategies", default="single,ddp,fsdp")
    ap.add_argument("--iters", type=int, default=50)
    ap.add_argument("--interval", type=int, default=10)
    ap.add_argument("--after", type=int, default=4, help="steps after a save that may pay for it")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--keep", type=int, default=2)
    ap.add_argument("--kill_iter", type=int, default=12)
    ap.add_argument("--n_layer", type=int, default=4)
    ap.add_argument("--n_embd", type=int, default=256)
    ap.add_argument("--n_head", type=int, default=4)
    ap.add_argument("--batch_size", type=int, default=2)
    ap.add_argument("--block_size", type=int, default=64)
    ap.add_argument("--data_dir", default=os.path.join(REPO, "data", "shakespeare_char"))
    ap.add_argument("--timeout_s", type=int, default=900)
    ap.add_argument("--parts", default="stall,restart")
    args = ap.parse_args(argv)
    base = ["config/train_shakespeare_char.py", f"--data_dir={args.data_dir}", f"--max_iters={args.iters}",
            f"--checkpoint_interval={args.interval}", f"--eval_interval={10 * args.iters}", "--eval_iters=1",
            "--log_interval=1", "--compile=False", "--dtype=float32", f"--n_layer={args.n_layer}",
            f"--n_embd={args.n_embd}", f"--n_head={args.n_head}", f"--batch_size={args.batch_size}",
            f"--block_size={args.block_size}",
            f"--keep_checkpoints={args.keep}", "--always_save_checkpoint=False"]
    if "stall" in args.parts:
        stall(args, base)
    if "restart" in args.parts:
        restart(args, base)


if __name__ == "__main__":
    main()
