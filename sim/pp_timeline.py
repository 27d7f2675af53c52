"""
The pipeline schedules of parallel/pp.py analysed: their unit-cost simulation, bubble and in-flight bounds, and
timeline pictures, measured or simulated. Pictures: ranks as rows, one box per forward (F, solid) and
backward (B, hatched; W, the weight half of a zero-bubble backward, dotted) coloured by micro-batch, as in the
GPipe (Huang et al. 2019, fig. 2) and Megatron-LM (Narayanan et al. 2021, figs. 3-4) papers. Prints the bubble
fraction measured from the boxes next to the formula (p-1)/(v*m+p-1).

Measured: run a schedule for a few steps on a small GPT under torchrun and draw the last step:
    torchrun --standalone --nproc_per_node=4 -m sim.pp_timeline --schedule 1f1b --microbatches 8 \\
        --out docs/pp_timeline_1f1b_p4_m8.png
Ideal: the same action lists with unit costs (forward 1, backward 2, free communication), no processes:
    python -m sim.pp_timeline --unit-costs --pp 4 --schedule interleaved_1f1b --virtual-stages 2 \\
        --microbatches 8 --out docs/pp_unit_interleaved_1f1b_p4_m8.png

Measured timings of processes that share few cores include the operating system's scheduling; the unit-cost
picture is the schedule itself.
"""

import argparse
import os
import sys

from parallel.pp import CUSTOM_SCHEDULES, PYTORCH_SCHEDULES, interleaved_warmup, schedule_order


def in_flight_bound(name, p, v, m, rank):
    """Most micro-batches whose activations `rank` holds at once (forward done, backward not yet), per schedule."""
    if name == "gpipe":
        return m
    if name == "1f1b":
        return min(p - rank, m)
    return min(interleaved_warmup(p, v, m, rank) + 1, v * m)


def formula_bubble(p, m, v=1):
    """Pipeline bubble fraction of (interleaved) 1F1B and GPipe: (p-1) / (v*m + p-1) (Narayanan et al. 2021)."""
    return (p - 1) / (v * m + p - 1)


def dependencies(kind, stage, mb, n_stages):
    """The actions that must finish before (kind, stage, mb) can start."""
    if kind == "F":
        return [("F", stage - 1, mb)] if stage > 0 else []
    return [("F", stage, mb)] + ([("B", stage + 1, mb)] if stage < n_stages - 1 else [])


def simulate(orders, n_stages, cost={"F": 1.0, "B": 2.0}):
    """Run per-rank action lists with fixed costs and free communication, each action as early as its rank and its
    dependencies allow. Returns per-rank events [(kind, stage, mb, start, end)]. Raises RuntimeError if the
    lists deadlock (an action waits for one that a rank can never reach)."""
    done, events = {}, [[] for _ in orders]
    ptr, clock = [0] * len(orders), [0.0] * len(orders)
    total = sum(map(len, orders))
    while len(done) < total:
        progress = False
        for r, order in enumerate(orders):
            while ptr[r] < len(order):
                action = order[ptr[r]]
                deps = dependencies(*action, n_stages)
                if any(d not in done for d in deps):
                    break
                start = max([clock[r]] + [done[d] for d in deps])
                clock[r] = done[action] = start + cost[action[0]]
                events[r].append((*action, start, clock[r]))
                ptr[r] += 1
                progress = True
        if not progress:
            stuck = {r: order[ptr[r]] for r, order in enumerate(orders) if ptr[r] < len(order)}
            raise RuntimeError(f"pipeline schedule deadlocks; next actions per rank: {stuck}")
    return events


def bubble_fraction(events):
    """Idle fraction of the pipeline: 1 - busy time / (ranks * makespan), from per-rank events
    [(kind, stage, mb, start, end)] (recorded or simulated)."""
    start = min(e[3] for rank in events for e in rank)
    end = max(e[4] for rank in events for e in rank)
    busy = sum(e[4] - e[3] for rank in events for e in rank)
    return 1.0 - busy / (len(events) * (end - start))


def draw(events, path, title, xlabel="time (s)"):
    """Write a PNG timeline of per-rank events [(kind, stage, mb, start, end)] to `path` (matplotlib)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    p = len(events)
    mbs = sorted({e[2] for rank in events for e in rank})
    colors = matplotlib.colormaps["tab20" if len(mbs) > 10 else "tab10"]
    t0 = min(e[3] for rank in events for e in rank)
    end = max(e[4] for rank in events for e in rank) - t0
    fig, ax = plt.subplots(figsize=(14, 0.7 * p + 1.6))
    hatch = {"F": None, "B": "///", "W": ".."}
    for r, rank in enumerate(events):
        for kind, stage, mb, start, stop in rank:
            ax.barh(r, stop - start, left=start - t0, height=0.8, color=colors(mbs.index(mb) % colors.N),
                    edgecolor="black", linewidth=0.5, hatch=hatch.get(kind))
            if (stop - start) / end > 0.012:
                label = f"{mb}" if len({e[1] for e in rank}) == 1 else f"{mb}.{stage // p}"
                ax.text((start + stop) / 2 - t0, r, label, ha="center", va="center", fontsize=7)
    ax.set_yticks(range(p), [f"rank {r}" for r in range(p)])
    ax.invert_yaxis()
    ax.set_xlim(0, end)
    ax.set_xlabel(xlabel)
    ax.set_title(title, fontsize=10)
    kinds = sorted({e[0] for rank in events for e in rank}, key="FBW".index)
    ax.legend(handles=[Patch(facecolor="white", edgecolor="black", hatch=hatch[k], label=k) for k in kinds],
              loc="lower right", bbox_to_anchor=(1.0, 1.0), fontsize=8, ncol=len(kinds), frameon=False)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def describe(schedule, p, v, m, events):
    """One line: schedule, sizes, measured bubble and the formula's."""
    return (f"{schedule} p={p} v={v} m={m}: bubble measured {bubble_fraction(events):.3f}, "
            f"formula (p-1)/(v*m+p-1) = {formula_bubble(p, m, v):.3f}")


def parse(argv):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--schedule", default="1f1b", help=f"custom: {CUSTOM_SCHEDULES}; pytorch: {PYTORCH_SCHEDULES}")
    ap.add_argument("--variant", default="custom", choices=("custom", "pytorch"))
    ap.add_argument("--microbatches", type=int, default=8)
    ap.add_argument("--virtual-stages", type=int, default=None, help="default: 2 for interleaved schedules, else 1")
    ap.add_argument("--unit-costs", action="store_true", help="simulate with F=1, B=2 instead of running")
    ap.add_argument("--pp", type=int, default=4, help="pipeline size for --unit-costs (torchrun's otherwise)")
    ap.add_argument("--n-layer", type=int, default=8)
    ap.add_argument("--n-embd", type=int, default=256)
    ap.add_argument("--block-size", type=int, default=128)
    ap.add_argument("--batch-size", type=int, default=4, help="sequences per micro-batch")
    ap.add_argument("--steps", type=int, default=3, help="steps to run; the last is drawn")
    ap.add_argument("--out", default=None, help="PNG path (default: docs/pp_timeline_<schedule>_p<p>_m<m>.png)")
    args = ap.parse_args(argv)
    if args.virtual_stages is None:
        args.virtual_stages = 2 if args.schedule.startswith(("interleaved", "looped")) else 1
    return args


def main(argv):
    args = parse(argv)
    v, m = args.virtual_stages, args.microbatches
    if args.unit_costs:
        p = args.pp
        events = simulate([schedule_order(args.schedule, p, v, m, r) for r in range(p)], p * v)
        out = args.out or f"docs/pp_unit_{args.schedule}_p{p}_m{m}.png"
        line = describe(args.schedule, p, v, m, events)
        draw(events, out, f"unit costs: {line}", xlabel="time (forward = 1, backward = 2, communication free)")
        print(f"{line}\nwrote {out}")
        return 0
    return run_measured(args)


def run_measured(args):
    """Under torchrun: train a small GPT through the pipeline for args.steps steps on random tokens, gather the
    last step's timeline on rank 0, draw it."""
    import torch
    import torch.distributed as dist

    from model import GPTConfig
    from parallel import build_strategy, init_distributed, teardown
    from train import DEFAULTS
    from types import SimpleNamespace

    if "WORLD_SIZE" not in os.environ:
        print("run under torchrun (or pass --unit-costs)", file=sys.stderr)
        return 2
    code = 1
    try:
        device = init_distributed()
        torch.set_num_threads(1)
        v, m = args.virtual_stages, args.microbatches
        cfg = SimpleNamespace(**{**DEFAULTS, "parallel": "pp", "variant": args.variant, "pp_schedule": args.schedule,
                                 "pp_virtual_stages": v, "gradient_accumulation_steps": m, "n_layer": args.n_layer,
                                 "compile": False, "dtype": "float32", "learning_rate": 1e-3})
        strategy = build_strategy(cfg, device)
        p = strategy.world_size
        model_config = GPTConfig(block_size=args.block_size, vocab_size=256, n_layer=args.n_layer, n_head=4,
                                 n_embd=args.n_embd, dropout=0.0, bias=False)
        strategy.build_model(model_config)
        opt = strategy.configure_optimizer()
        g = torch.Generator().manual_seed(0)
        batches = [(x, (x + 1) % 256) for x in (torch.randint(0, 256, (args.batch_size, args.block_size), generator=g)
                                                 for _ in range(m))]
        for _ in range(args.steps):
            strategy.forward_backward([(x.to(device), y.to(device)) for x, y in batches], None)
            strategy.clip_grad_norm_(1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)
        events = [None] * p
        dist.all_gather_object(events, strategy.pipeline.timeline, group=strategy.pipeline.group)
        if strategy.rank == 0:
            out = args.out or f"docs/pp_timeline_{args.schedule}_p{p}_m{m}.png"
            line = describe(args.schedule, p, v, m, events)
            draw(events, out, f"{args.variant}, measured on {p} CPU processes: {line}")
            print(f"{args.variant} {line}\nwrote {out}", flush=True)
        code = 0
    finally:
        teardown(code)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
