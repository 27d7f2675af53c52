"""
The planner: the fastest layouts of a model on N devices for a global batch, found by simulating them.

Searched: tp (dividing the devices of a node, n_head and the MLP: no TP across nodes), cp (1, 2, 4, 8) with
cp_type ring and, where tp·cp divides the query and key/value heads, ulysses, pp (dividing n_layer),
dp = N / (tp·cp·pp) dividing the global batch, micro-batch b (1, 2, 4, 8, 16), v (1, or 2-8 virtual stages with
interleaved 1F1B when m is a multiple of pp), ep for an MoE model (1 and the powers of two up to 64 that divide
dp·cp and n_expert: experts over those ranks), and per layout the pairs (recompute, ZeRO stage) that are not
dominated: for each recompute level the lowest ZeRO stage that fits, dropped if a lighter recompute fits with no
higher stage (a higher stage or more recomputation is never faster).
Sequence parallelism is on whenever tp > 1 (same communication volume, less memory and memory-bound work).
Other settings (dtype, flash attention, overlap, schedule for v = 1) are the base layout's.

Pruning: a layout's step takes at least its busiest compute stream's work (`busy_bound`), so layouts are
simulated in order of that bound, and the search stops once the bound exceeds the top-k-th simulated time.
The search simulates coarsely (a few compute tasks per pipeline chunk); the winners are simulated again with one
task per layer for the table.
"""

from dataclasses import replace

from sim.cost import build_costs
from sim.schedule import memory_per_rank, rank_expert_params, rank_params, simulate

MICRO_BATCHES = (1, 2, 4, 8, 16)
CONTEXT = (1, 2, 4, 8)
VIRTUAL = (2, 3, 4, 6, 8)
RECOMPUTE = ("none", "selective", "full")


def divisors(n):
    return [d for d in range(1, n + 1) if n % d == 0]


def context_layouts(model, tp):
    """(cp, cp_type) pairs to search under tp-way TP: cp = 1, and each larger cp of CONTEXT with the ring and, where
    tp·cp divides the query and the key/value heads, Ulysses."""
    out = [(1, "ring")]
    for cp in CONTEXT[1:]:
        out.append((cp, "ring"))
        if model.n_head % (tp * cp) == 0 and model.n_kv_head % (tp * cp) == 0:
            out.append((cp, "ulysses"))
    return out


def expert_layouts(model, replicas):
    """The EP sizes to search with `replicas` = dp·cp ranks: 1, and for an MoE model the powers of two up to 64 that
    divide both replicas and n_expert."""
    return [1] + [ep for ep in (2, 4, 8, 16, 32, 64) if model.n_expert and replicas % ep == 0
                  and model.n_expert % ep == 0]


def layouts(model, base, cluster, global_batch, n):
    """Every (tp, cp, cp_type, pp, dp, b, v) layout of n devices for global_batch sequences, as Parallel copies of
    `base` (recompute and zero still base's)."""
    for tp in divisors(min(cluster.gpus_per_node, n)):
        if model.n_head % tp or model.ffn_hidden % tp:
            continue
        for cp, cp_type in context_layouts(model, tp):
            if model.seq_len % (2 * cp if cp > 1 else 1) or (model.seq_len // cp) % tp:
                continue
            for pp in divisors(model.n_layer):
                if n % (tp * cp * pp):
                    continue
                dp = n // (tp * cp * pp)
                if global_batch % dp:
                    continue
                for b in MICRO_BATCHES:
                    if (global_batch // dp) % b:
                        continue
                    m = global_batch // dp // b
                    vs = [1] + [v for v in VIRTUAL if pp > 1 and m % pp == 0 and model.n_layer % (pp * v) == 0]
                    for v in vs:
                        schedule = "interleaved_1f1b" if v > 1 else (
                            base.schedule if base.schedule != "interleaved_1f1b" else "1f1b")
                        for ep in expert_layouts(model, dp * cp):
                            yield replace(base, dp=dp, tp=tp, pp=pp, cp=cp, cp_type=cp_type, v=v, micro_batch=b,
                                          micro_batches=m, schedule=schedule, sequence_parallel=tp > 1, ep=ep)


def fitting(model, par, cluster):
    """The non-dominated (recompute, zero) variants of layout `par` that fit in memory, with their Costs."""
    out, best_zero = [], 4
    for recompute in RECOMPUTE:
        for zero in range(4):
            if zero >= best_zero:
                break
            candidate = replace(par, recompute=recompute, zero=zero)
            costs = build_costs(model, candidate, cluster)
            if max(m["total"] for m in memory_per_rank(candidate, costs, cluster)) <= cluster.hbm_bytes:
                out.append((candidate, costs))
                best_zero = zero
                break
    return out


def busy_bound(par, costs):
    """Seconds of work on the busiest compute stream: every device must do its own, so no step is shorter."""
    def seconds(segments):
        return sum(d for _, d in segments)
    layer = seconds(costs.layer_forward) + seconds(costs.layer_backward)
    n_stages, most = par.pp * par.v, 0.0
    for r in range(par.pp):
        work = 0.0
        for stage in range(r, n_stages, par.pp):
            lo, hi = costs.split[stage]
            work += (hi - lo) * layer
            if stage == 0:
                work += seconds(costs.embed_forward) + seconds(costs.embed_backward)
            if stage == n_stages - 1:
                work += seconds(costs.head_forward) + seconds(costs.head_backward)
        params = rank_params(par, costs, r) / (costs.dp_shards if par.zero >= 1 else 1) + \
            rank_expert_params(par, costs, r)
        most = max(most, par.micro_batches * work + costs.optimizer_time(params))
    return most


def plan(model, base, cluster, global_batch, devices=None, top=5, max_simulations=300):
    """The `top` fastest layouts (sim.schedule.Step, fastest first; equal to 4 digits: less memory first) that fit, for
    global_batch sequences on `devices` devices (default base.world). Raises ValueError if no layout fits."""
    devices = devices or base.world
    cluster = cluster.sized(devices)
    pool = []
    for par in layouts(model, base, cluster, global_batch, devices):
        for candidate, costs in fitting(model, par, cluster):
            pool.append((busy_bound(candidate, costs), candidate, costs))
    if not pool:
        raise ValueError(f"no layout of {model.params / 1e9:.3g}B parameters fits on {devices} x "
                         f"{cluster.name} for a global batch of {global_batch}")
    pool.sort(key=lambda x: x[0])
    best, simulated = [], 0
    for bound, par, costs in pool:
        if len(best) >= top and bound >= best[top - 1][0]:
            break
        if simulated >= max_simulations:
            break
        per_chunk = max(hi - lo for lo, hi in costs.split)
        step = simulate(model, par, cluster, costs=costs, layers_per_task=max(1, per_chunk // 3))
        simulated += 1
        best = sorted([*best, (step.step_time, par)], key=lambda x: x[0])[:top]
    steps = sorted((simulate(model, par, cluster) for _, par in best),
                   key=lambda s: (float(f"{s.step_time:.4g}"), s.peak_memory))
    for s in steps:
        s.searched = (len(pool), simulated)
    return steps


def table(steps):
    """The planner's result as text: one line per layout, then the best one's breakdown."""
    pool, simulated = steps[0].searched
    lines = [f"{pool} layouts fit; {simulated} simulated (the rest pruned by their compute bound); fastest first:",
             (f"{'#':>2} {'layout':<66} {'step s':>8} {'tok/s':>10} {'MFU':>6} {'TFLOP/s':>8} {'mem GB':>7} "
              f"{'idle':>6} {'comm':>6}")]
    for i, s in enumerate(steps):
        lanes = [s.lanes(r) for r in range(s.par.pp)]
        idle = sum(lane.get("idle", 0.0) for lane in lanes) / len(lanes) / s.step_time
        comm = sum(lane.get("tp", 0.0) + lane.get("cp", 0.0) + lane.get("ep", 0.0) for lane in lanes) / len(lanes) \
            / s.step_time
        lines.append(f"{i + 1:>2} {s.par.describe():<66} {s.step_time:>8.4g} {s.tokens_per_s:>10,.0f} "
                     f"{100 * s.mfu:>5.1f}% {s.tflops_per_device:>8.1f} {s.peak_memory / 1e9:>7.1f} "
                     f"{100 * idle:>5.1f}% {100 * comm:>5.1f}%")
    lines += ["", "best layout:", steps[0].report()]
    return "\n".join(lines)
