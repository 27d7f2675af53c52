"""
The simulated step as a picture: one band per pipeline rank (each stands for its dp x cp x tp identical devices),
a compute lane and under it one lane per communication stream it used (ag: parameter all-gathers, rs: gradient
reduce-scatters / all-reduces, p2p: pipeline sends and the tied-embedding exchange). On the compute lane,
forward, backward and recomputation are coloured apart, and the TP/CP collectives that block it are drawn in
their own colours where they happen; each forward/backward of a micro-batch is outlined and numbered
(micro-batch, or micro-batch.chunk with virtual stages), as in sim/pp_timeline.py.

    python -m sim config/x.py --gpus=8 --timeline=docs/sim_timeline.png
"""

import os
from collections import defaultdict

COLORS = {
    "forward": "#4C72B0", "backward": "#55A868", "recompute": "#A6C8E8", "optimizer": "#7F7F7F",
    "tp": "#C44E52", "cp": "#E08A2C", "ep": "#8C564B", "norm": "#000000",
    "all_gather": "#DD8452", "reduce_scatter": "#8172B2", "all_reduce": "#937860", "send": "#64B5CD",
    "tied": "#CCB974",
}
LABELS = {"tp": "TP collective", "cp": "CP ring (exposed) or all-to-all", "ep": "EP all-to-all",
          "norm": "grad-norm all-reduce",
          "all_gather": "all-gather", "reduce_scatter": "reduce-scatter", "all_reduce": "all-reduce",
          "send": "p2p send", "tied": "tied-embedding all-reduce"}
STREAMS = ("ag", "rs", "p2p")


def draw(step, path, title=None):
    """Write a PNG of `step` (sim.schedule.Step) to `path`. Returns path."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    par = step.par
    used = [s for s in STREAMS if any(t.stream == s for t in step.tasks)]
    rows, y = {}, 0.0
    for r in range(par.pp):
        rows[r, "compute"] = (y, 0.9)
        y += 1.0
        for s in used:
            rows[r, s] = (y, 0.4)
            y += 0.5
        y += 0.3
    bars = defaultdict(list)  # (row, colour kind) -> [(start, width)]
    actions = defaultdict(lambda: [float("inf"), 0.0])
    for t in step.tasks:
        if t.stream == "compute":
            at = t.start
            for kind, d in t.segments:
                bars[(t.rank, "compute"), kind].append((at, d))
                at += d
            if t.action is not None:
                span = actions[t.rank, t.action]
                span[0], span[1] = min(span[0], t.start), max(span[1], t.end)
        else:
            kind = "tied" if t.kind == "tied" else t.segments[0][0]
            bars[(t.rank, t.stream), kind].append((t.start, t.duration))
    end = step.step_time
    fig, ax = plt.subplots(figsize=(15, 0.9 + 0.55 * y))
    for (row, kind), spans in bars.items():
        y0, height = rows[row]
        ax.broken_barh(spans, (y0, height), facecolors=COLORS.get(kind, "#999999"), linewidth=0)
    for (r, (kind, stage, mb)), (start, stop) in actions.items():
        y0, height = rows[r, "compute"]
        ax.add_patch(plt.Rectangle((start, y0), stop - start, height, fill=False, edgecolor="black", linewidth=0.4))
        if (stop - start) / end > 0.012:
            label = f"{mb}" if par.v == 1 else f"{mb}.{stage // par.pp}"
            ax.text((start + stop) / 2, y0 + height / 2, label, ha="center", va="center", fontsize=6, color="white")
    ticks = sorted(rows.items(), key=lambda kv: kv[1][0])
    ax.set_yticks([y0 + h / 2 for _, (y0, h) in ticks],
                  [f"pp {r} compute" if lane == "compute" else lane for (r, lane), _ in ticks], fontsize=7)
    ax.set_ylim(y, -0.2)
    ax.set_xlim(0, end)
    ax.set_xlabel("time (s)")
    kinds = [k for k in COLORS if any(kk == k for (_, kk) in bars)]
    ax.legend(handles=[Patch(facecolor=COLORS[k], label=LABELS.get(k, k)) for k in kinds], loc="lower left",
              bbox_to_anchor=(0.0, 1.0), fontsize=7, ncol=min(len(kinds), 7), frameon=False)
    if title is None:
        title = (f"{par.describe()} on {par.world} x {step.cluster.name}: step {step.step_time:.4g} s, "
                 f"MFU {100 * step.mfu:.1f}%, compute idle {100 * step.bubble():.1f}%")
    ax.set_title(title, fontsize=9, pad=28)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
