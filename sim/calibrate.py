"""
Calibrate the simulator on this machine, then test it on runs it was not fitted on.

    python -m sim.calibrate              # measure (a few minutes), fit, write sim/cpu_local.json, print the table
    python -m sim.calibrate --report     # refit and print the table from the saved measurements

What is measured (every process single-threaded, OMP_NUM_THREADS=1, as torchrun sets it):
1. memory bandwidth: a 64 MiB tensor copy in one process (bytes read + written per second);
2. gloo all-reduce, all-gather, reduce-scatter and send times for 1 KiB - 16 MiB on 2 and 4 processes
   (torchrun; median of 10 after warm-up);
3. train.py's median ms/iter (iterations 5..K of a K-iteration run, from out_dir/metrics.jsonl) for several
   strategies and sizes of the CPU Shakespeare recipe: single at 4 sizes (the fit set), and held out: another
   single size and the custom DDP, FSDP, TP (+SP) and PP (1F1B, interleaved) runs on 2 processes, DDP on 4.

What is fitted, once, and written to sim/cpu_local.json (the `cpu-local` cluster):
- from (2): gloo's alpha and beta per collective, least squares (relative) of its ring formula, e.g. for the
  all-reduce t = 2(N-1)·alpha + 2(N-1)/N·S/beta, both N together;
- from (3)'s fit set, with (1) fixed: the fp32 matmul rate R of one core and the per-operator latency o, least
  squares (relative) of the simulated single-process step, which is linear in 1/R and o.
Then every run of (3) is simulated on cpu-local and the table prints predicted vs measured ms/iter and the error.
The runs share 2 cores with whatever else runs on the machine: everything is measured --repeat times round-robin
and the fastest repetition kept; the load average is recorded with every run.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from functools import partial

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RUNS_JSON = os.path.join(REPO, "sim", "calibration_runs.json")
BASE = "config/train_shakespeare_char_cpu.py"
ITERS = 30
SKIP = 5

# (name, processes, config file, overrides, role)
RUNS = [
    ("single L2 h64", 1, BASE, ["--n_layer=2", "--n_embd=64"], "fit"),
    ("single L4 h128", 1, BASE, [], "fit"),
    ("single L4 h256", 1, BASE, ["--n_embd=256"], "fit"),
    ("single L2 h256 b24", 1, BASE, ["--n_layer=2", "--n_embd=256", "--batch_size=24"], "fit"),
    ("single L6 h192", 1, BASE, ["--n_layer=6", "--n_embd=192"], "held out"),
    ("ddp custom N=2", 2, "config/train_shakespeare_char_ddp_custom_cpu.py", [], "held out"),
    ("ddp custom N=4", 4, "config/train_shakespeare_char_ddp_custom_cpu.py",
     ["--batch_size=3", "--gradient_accumulation_steps=4"], "held out"),
    ("fsdp custom N=2", 2, "config/train_shakespeare_char_fsdp_custom_cpu.py", [], "held out"),
    ("tp custom N=2 (sp)", 2, "config/train_shakespeare_char_tp_custom_cpu.py", [], "held out"),
    ("pp custom N=2 1f1b", 2, "config/train_shakespeare_char_pp_custom_cpu.py", [], "held out"),
    ("pp custom N=2 interleaved", 2, "config/train_shakespeare_char_pp_interleaved_cpu.py", [], "held out"),
    ("ddp custom N=2 L6 h192", 2, "config/train_shakespeare_char_ddp_custom_cpu.py",
     ["--n_layer=6", "--n_embd=192"], "held out"),
]
COLLECTIVE_BYTES = [2**k for k in range(10, 25, 2)]


def loadavg():
    return os.getloadavg()[0]


# ----------------------------------------------------------------------------------------------------------
# measuring

def memory_bandwidth():
    """Bytes/s of a 64 MiB fp32 copy (read + write) in this process, one thread; the best of 10."""
    import torch
    torch.set_num_threads(1)
    a, b = torch.ones(2**24), torch.empty(2**24)
    best = float("inf")
    for _ in range(10):
        t0 = time.perf_counter()
        b.copy_(a)
        best = min(best, time.perf_counter() - t0)
    return 2 * a.numel() * 4 / best


def collectives_worker():
    """Under torchrun: time gloo's all_reduce, all_gather, reduce_scatter (S = COLLECTIVE_BYTES, the full buffer)
    and a send from rank 0 to rank 1; rank 0 prints {"N", "times": {op: {bytes: s}}}."""
    import torch
    import torch.distributed as dist

    from kernels.comm import all_gather_single, init_distributed, reduce_scatter_single, teardown
    code = 1
    try:
        init_distributed(timeout_s=120)
        torch.set_num_threads(1)
        rank, n = dist.get_rank(), dist.get_world_size()
        times = {}
        for nbytes in COLLECTIVE_BYTES:
            full, shard = torch.ones(nbytes // 4), torch.ones(nbytes // 4 // n)
            ops = {"all_reduce": partial(dist.all_reduce, full),
                   "all_gather": partial(all_gather_single, full, shard),
                   "reduce_scatter": partial(reduce_scatter_single, shard, full),
                   "send": (partial(dist.send, full, 1) if rank == 0 else partial(dist.recv, full, 0) if rank == 1
                            else (lambda: None))}
            for op, call in ops.items():
                samples = []
                for i in range(13):
                    dist.barrier()
                    t0 = time.perf_counter()
                    call()
                    if i >= 3:
                        samples.append(time.perf_counter() - t0)
                times.setdefault(op, {})[nbytes] = statistics.median(samples)
        if rank == 0:
            print(json.dumps({"N": n, "times": times}), flush=True)
        code = 0
    finally:
        teardown(code)


def torchrun(nproc, *args):
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", *args]


def train_args(config, overrides, out_dir, iters):
    return [config, *overrides, f"--out_dir={out_dir}", f"--max_iters={iters}", f"--eval_interval={iters}",
            "--eval_iters=1", "--log_interval=1", "--always_save_checkpoint=False"]


def time_train(nproc, config, overrides, iters=ITERS):
    """Median ms/iter of train.py over iterations SKIP..iters-1 (and the load average before and after)."""
    out_dir = tempfile.mkdtemp(prefix="calibrate-")
    args = train_args(config, overrides, out_dir, iters)
    cmd = torchrun(nproc, "train.py", *args) if nproc > 1 else [sys.executable, "train.py", *args]
    before = loadavg()
    subprocess.run(cmd, cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": "1"}, check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, timeout=900)
    with open(os.path.join(out_dir, "metrics.jsonl")) as f:
        ms = [r["ms_per_iter"] for r in map(json.loads, f) if "ms_per_iter" in r]
    return {"ms": statistics.median(ms[SKIP:]), "load": [before, loadavg()]}


def measure(iters=ITERS, only=(), repeat=1):
    """Run every measurement (or only the named train.py runs) `repeat` times, round-robin, and keep each one's
    fastest repetition (a shared machine only ever slows a run down); returns the dict saved as
    sim/calibration_runs.json."""
    out = {"date": time.strftime("%Y-%m-%d %H:%M"), "cores": os.cpu_count(), "iters": iters, "repeat": repeat,
           "memory_bandwidth": memory_bandwidth(), "collectives": [], "runs": {}}
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for n in (2, 4):
        best = None
        for _ in range(repeat):
            res = subprocess.run(torchrun(n, "-m", "sim.calibrate", "--collectives-worker"), cwd=REPO, check=True,
                                 env=env, capture_output=True, text=True, timeout=600)
            times = json.loads(res.stdout.strip().splitlines()[-1])["times"]
            best = times if best is None else {op: {k: min(v, best[op][k]) for k, v in t.items()}
                                               for op, t in times.items()}
        out["collectives"].append({"N": n, "times": best, "load": loadavg()})
        print(f"gloo collectives N={n}: measured (load {loadavg():.1f})", flush=True)
    for _ in range(repeat):
        for name, nproc, config, overrides, role in RUNS:
            if only and name not in only:
                continue
            run = time_train(nproc, config, overrides, iters)
            print(f"{name}: {run['ms']:.1f} ms/iter (load {run['load'][0]:.1f})", flush=True)
            if name not in out["runs"] or run["ms"] < out["runs"][name]["ms"]:
                out["runs"][name] = run
    return out


# ----------------------------------------------------------------------------------------------------------
# fitting and predicting

def lstsq_nonneg(rows, targets):
    """argmin_x sum((row·x - target)/target)^2 with x >= 0 (few unknowns: drop negative ones and refit)."""
    import numpy as np
    active = list(range(len(rows[0])))
    while True:
        A = np.array([[r[j] / t for j in active] for r, t in zip(rows, targets)])
        sol = np.linalg.lstsq(A, np.ones(len(targets)), rcond=None)[0]
        if (sol >= 0).all() or len(active) == 1:
            x = [0.0] * len(rows[0])
            for j, v in zip(active, sol):
                x[j] = max(float(v), 0.0)
            return x
        active = [j for j, v in zip(active, sol) if v > 0] or active[:1]


VOCAB = 65  # shakespeare_char's vocabulary: fixed, so that --report does not depend on data/*/meta.pkl existing


def sim_config(nproc, config, overrides):
    from sim.config import load
    return load([config, *overrides, f"--gpus={nproc}", "--cluster=cpu-local", f"--vocab_size={VOCAB}"])


def base_cluster(measured):
    """The cpu-local Cluster with placeholders for what the fit determines."""
    from sim.cluster import Cluster, Link
    with open("/proc/meminfo") as f:
        mem = int(f.readline().split()[1]) * 1024
    return Cluster(name="cpu-local", gpus_per_node=64, peak_flops={"float32": 1e11}, hbm_bytes=mem,
                   hbm_bandwidth=measured["memory_bandwidth"], intra=Link(1e9, 1e-4), inter=Link(1e9, 1e-4),
                   matmul_efficiency=1.0, link_efficiency=1.0, op_latency=0.0, cores=measured["cores"],
                   overlap=False, default_dtype="float32",
                   source=f"fitted by python -m sim.calibrate on {measured['date']}")


def step_time(cfg, cluster):
    from sim.config import build
    from sim.schedule import simulate
    model, par, sized = build(cfg, cluster)
    return simulate(model, par, sized).step_time


def fit(measured):
    """The cpu-local Cluster fitted to `measured`, and a dict of fit diagnostics."""
    from sim.cluster import Link
    base = base_cluster(measured)
    # gloo, per collective: alpha and beta of its ring formula (sim.cost.collective_time), both N together
    terms = {"all_reduce": lambda n, S: [2 * (n - 1), 2 * (n - 1) / n * S],
             "all_gather": lambda n, S: [n - 1, (n - 1) / n * S],
             "reduce_scatter": lambda n, S: [n - 1, (n - 1) / n * S],
             "send": lambda n, S: [1, S]}
    op_links, residuals = {}, {}
    for op, term in terms.items():
        rows, targets = [], []
        for entry in measured["collectives"]:
            for nbytes, seconds in entry["times"][op].items():
                if op != "send" or entry["N"] == 2:  # a send is between two ranks: once is enough
                    rows.append(term(entry["N"], int(nbytes)))
                    targets.append(seconds)
        alpha, inv_beta = lstsq_nonneg(rows, targets)
        op_links[op] = Link(bandwidth=1 / max(inv_beta, 1e-15), latency=alpha)
        residuals[op] = max(abs(r[0] * alpha + r[1] * inv_beta - t) / t for r, t in zip(rows, targets))
    # compute: the single-process step is linear in 1/R and o (memory bandwidth fixed, measured)
    rows, targets = [], []
    for name, nproc, config, overrides, role in RUNS:
        if role != "fit":
            continue
        cfg = sim_config(nproc, config, overrides)
        no_memory = replace(base, hbm_bandwidth=float("inf"))
        t_flops = step_time(cfg, replace(no_memory, peak_flops={"float32": 1.0}))
        t_ops = step_time(cfg, replace(no_memory, peak_flops={"float32": float("inf")}, op_latency=1.0))
        t_mem = step_time(cfg, replace(base, peak_flops={"float32": float("inf")}))
        rows.append([t_flops, t_ops])
        targets.append(measured["runs"][name]["ms"] / 1000 - t_mem)
    inv_rate, op_latency = lstsq_nonneg(rows, targets)
    link = op_links["all_reduce"]
    cluster = replace(base, peak_flops={"float32": 1 / inv_rate}, op_latency=op_latency, intra=link, inter=link,
                      op_links=op_links)
    return cluster, {"gloo_max_rel_residual": residuals}


def report(measured, cluster, diagnostics):
    """The calibration and prediction table as text."""
    lines = [f"measured {measured['date']} on {measured['cores']} cores, {measured['iters']} iterations per run",
             (f"fitted: matmul {cluster.peak_flops['float32'] / 1e9:.1f} GFLOP/s per core, memory "
              f"{cluster.hbm_bandwidth / 1e9:.2f} GB/s, {cluster.op_latency * 1e6:.1f} us per operator"),
             "gloo (alpha, beta; worst relative residual of the fit over 1 KiB-16 MiB on 2 and 4 processes): " +
             ", ".join(f"{op} {link.latency * 1e6:.0f} us, {link.bandwidth / 1e9:.2f} GB/s "
                       f"({100 * diagnostics['gloo_max_rel_residual'][op]:.0f}%)"
                       for op, link in cluster.op_links.items()),
             "", "| run | processes | role | measured ms/iter | predicted | error | load avg |",
             "|---|---|---|---|---|---|---|"]
    errors = []
    for name, nproc, config, overrides, role in RUNS:
        run = measured["runs"].get(name)
        if run is None:
            continue
        predicted = step_time(sim_config(nproc, config, overrides), cluster) * 1000
        err = predicted / run["ms"] - 1
        if role != "fit":
            errors.append(abs(err))
        lines.append(f"| {name} | {nproc} | {role} | {run['ms']:.1f} | {predicted:.1f} | {100 * err:+.0f}% | "
                     f"{run['load'][0]:.1f} |")
    if errors:
        lines.append(f"\nheld out: mean |error| {100 * statistics.mean(errors):.0f}%, max {100 * max(errors):.0f}%, "
                     f"{sum(e <= 0.25 for e in errors)}/{len(errors)} within 25%")
    return "\n".join(lines)


def main(argv):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--report", action="store_true", help="refit and report from sim/calibration_runs.json")
    ap.add_argument("--iters", type=int, default=ITERS, help="iterations per train.py run")
    ap.add_argument("--only", default="", help="comma-separated run names to measure (default: all)")
    ap.add_argument("--repeat", type=int, default=2, help="measure everything this many times, keep the fastest")
    ap.add_argument("--collectives-worker", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.collectives_worker:
        return collectives_worker()
    from sim.cluster import CPU_LOCAL_JSON, save
    if args.report:
        with open(RUNS_JSON) as f:
            measured = json.load(f)
    else:
        measured = measure(args.iters, [n for n in args.only.split(",") if n], args.repeat)
        with open(RUNS_JSON, "w") as f:
            json.dump(measured, f, indent=1)
            f.write("\n")
    cluster, diagnostics = fit(measured)
    save(cluster, CPU_LOCAL_JSON, fit=diagnostics, measured=RUNS_JSON.replace(REPO + os.sep, ""))
    print(report(measured, cluster, diagnostics))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
