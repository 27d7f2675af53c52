"""
Overlay the loss curves of several runs: train and val loss from each out_dir's metrics.jsonl, against iteration and
against wall time, in one PNG (2 x 2 panels); and a table of each run's last val loss and its largest distance from
the first run's curves.

    python -m tools.plot_loss out-single out-ddp out-fsdp --labels single,ddp,fsdp --out docs/loss_curves.png

metrics.jsonl (train.py appends to it): "train/loss" every log_interval, "val/loss" at every eval, "time_s" the
wall seconds since the process entered its training loop. A run resumed in the same out_dir continues the curve
(its clock is added to the time before it, the records it repeats replace the old ones); a run started again from
iteration 0 in it replaces the earlier one. Records without time_s (older runs) are drawn against iteration only.
`--smooth A` draws the train loss as an exponential moving average (weight A on the past; 0: raw).
"""

import argparse
import json
import os
import sys


def read_metrics(out_dir):
    """{"train": [(iter, time_s, loss)], "val": [(iter, time_s, loss)]} of out_dir/metrics.jsonl, one record per
    iteration (see the module docstring for resumed and restarted runs); time_s None where not logged.
    Raises FileNotFoundError naming the file if it is missing."""
    path = os.path.join(out_dir, "metrics.jsonl")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no {path}: is {out_dir} a train.py out_dir?")
    with open(path) as f:
        records = [json.loads(line) for line in f if line.strip()]
    series = {"train": {}, "val": {}}
    offset, last_time, last_iter = 0.0, None, -1
    for r in records:
        t = r.get("time_s")
        if t is not None and last_time is not None and t < last_time - offset:  # a new process
            if r["iter"] == 0:  # started again: forget the earlier run
                series, offset = {"train": {}, "val": {}}, 0.0
            else:  # resumed: continue the clock, drop what it repeats
                offset = last_time
                for s in series.values():
                    for it in [it for it in s if it >= r["iter"]]:
                        del s[it]
        elif t is None and r["iter"] < last_iter and r["iter"] == 0:
            series = {"train": {}, "val": {}}
        time = None if t is None else t + offset
        last_time = time if time is not None else last_time
        last_iter = r["iter"]
        if "train/loss" in r:
            series["train"][r["iter"]] = (r["iter"], time, r["train/loss"])
        if "val/loss" in r:
            series["val"][r["iter"]] = (r["iter"], time, r["val/loss"])
    return {k: [v[i] for i in sorted(v)] for k, v in series.items()}


def ema(values, alpha):
    """Exponential moving average with weight alpha on the past (alpha=0: the values themselves)."""
    out, acc = [], None
    for v in values:
        acc = v if acc is None else alpha * acc + (1 - alpha) * v
        out.append(acc)
    return out


def distance(a, b):
    """Largest |loss difference| over the iterations two series share, and how many they share."""
    other = {it: loss for it, _, loss in b}
    diffs = [abs(loss - other[it]) for it, _, loss in a if it in other]
    return (max(diffs) if diffs else float("nan")), len(diffs)


def plot(runs, labels, out, smooth=0.0, title=""):
    """Draw runs ({"train", "val"} series of read_metrics, in order) into `out` (PNG): rows train / val loss, columns
    against iteration / wall time; the first run drawn widest so that curves lying on it stay visible."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(13, 8.5), sharey="row")
    n = len(runs)
    for k, (run, label) in enumerate(zip(runs, labels)):
        width = 3.2 - 2.4 * k / max(n - 1, 1)
        for row, split in enumerate(("train", "val")):
            points = run[split]
            if not points:
                continue
            its, times, losses = zip(*points)
            if split == "train":
                losses = ema(losses, smooth)
            style = dict(label=label, linewidth=width, alpha=0.9)
            if split == "val":
                style["marker"] = "o"
                style["markersize"] = 2 + 4 * (1 - k / max(n - 1, 1))
            axes[row][0].plot(its, losses, **style)
            if all(t is not None for t in times):
                axes[row][1].plot(times, losses, **style)
    for row, split in enumerate(("train", "val")):
        name = f"train loss{f' (EMA {smooth})' if split == 'train' and smooth else ''}" if split == "train" else \
            "val loss"
        axes[row][0].set_ylabel(name)
        axes[row][0].set_xlabel("iteration")
        axes[row][1].set_xlabel("wall time (s)")
        for ax in axes[row]:
            ax.grid(alpha=0.3)
            ax.legend(fontsize=8)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    parser.add_argument("out_dirs", nargs="+", help="train.py out_dirs (each with a metrics.jsonl)")
    parser.add_argument("--labels", default="", help="comma-separated names (default: the out_dirs' names)")
    parser.add_argument("--out", default="loss_curves.png", help="the PNG to write")
    parser.add_argument("--smooth", type=float, default=0.0, help="EMA weight for the train loss (0: raw)")
    parser.add_argument("--title", default="")
    args = parser.parse_args(argv)
    labels = args.labels.split(",") if args.labels else [os.path.basename(os.path.normpath(d)) for d in args.out_dirs]
    if len(labels) != len(args.out_dirs):
        sys.exit(f"error: {len(labels)} labels for {len(args.out_dirs)} out_dirs")
    if not 0 <= args.smooth < 1:
        sys.exit(f"error: --smooth must be in [0, 1), got {args.smooth}")
    try:
        runs = [read_metrics(d) for d in args.out_dirs]
    except (FileNotFoundError, ValueError, KeyError) as e:
        sys.exit(f"error: {e}")
    plot(runs, labels, args.out, args.smooth, args.title)
    print(f"wrote {args.out}")
    w = max(len(label) for label in labels)
    print(f"{'run':<{w}} {'iters':>6} {'wall s':>7} {'last val':>9}  "
          f"max |Δ val loss| and |Δ train loss| vs {labels[0]}")
    for run, label in zip(runs, labels):
        last_val = run["val"][-1][2] if run["val"] else float("nan")
        last_iter = max([p[0] for p in run["train"] + run["val"]], default=0)
        wall = max([p[1] for p in run["train"] + run["val"] if p[1] is not None], default=float("nan"))
        dv, nv = distance(run["val"], runs[0]["val"])
        dt, nt = distance(run["train"], runs[0]["train"])
        print(f"{label:<{w}} {last_iter:>6} {wall:>7.0f} {last_val:>9.4f}  {dv:.2e} ({nv} evals), {dt:.2e} ({nt} its)")


if __name__ == "__main__":
    main()
