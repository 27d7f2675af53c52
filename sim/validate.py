"""
The simulator against published training throughputs (sim/published.py), with leave-one-out errors.

    python -m sim.validate          # the table: figure, source, predicted (leave-one-out), published, error
    python -m sim.validate --fit    # refit every constant from the published figures and print them

Constants (sim/cluster.py SHAPE_CONSTANTS, the same for every GPU preset), all fitted on published figures:
- tile_k0, kernel_latency: the GEMM tile model (sim/compute.py) fitted to the H100 bf16 GEMM curve
  (sim/published.py GEMM_CURVE, grid search in relative least squares);
- gemm_sustained (the fraction of the maximum achievable matmul rate GEMMs sustain in training) and
  memory_efficiency (the fraction of HBM bandwidth memory-bound kernels reach): fitted to the training figures
  whose role is "fit", in relative least squares of the step time. Figures with role "check" are never fitted.

How the training fit works, and why it is fast and deterministic: a simulated step's time is the sum of the
durations along its critical path (sim/schedule.py `critical_path`), and every duration is affine in
u = (1/gemm_sustained, 1/memory_efficiency) (GEMM seconds scale with the first unless at the memory roofline,
memory-bound seconds with the second, latencies and communication not at all). So around the constants u0 a
figure's step time is T(u) = T(u0) + g·(u - u0), with g read exactly from the path (its tasks' durations at
u0 + e_j: each task on the path keeps a recipe of what its duration is made of, sim/schedule.py
`recipe_seconds`). Fitting is linear least squares in the relative error of T against the published step time,
iterated from the presets' constants (Gauss-Newton: re-simulate, re-linearize) until it moves < 1e-4.

Leave-one-out: for each "fit" figure, the constants are refitted on the other fit figures (from their
linearizations at the presets' constants) and the held-out figure is simulated with them (`--linear`: its
linearization is evaluated instead, the test's fast path). Published values in TFLOP/s per GPU (Megatron's
count with recomputation), MFU or seconds per step are all compared as step times, and shown in their unit.
"""

import argparse
import math
import sys
from dataclasses import replace

from sim.cluster import PRESETS, SHAPE_CONSTANTS
from sim.cost import Model, Parallel, build_costs, step_flops
from sim.published import GEMM_CURVE, GEMM_CURVE_SOURCE, TRAINING
from sim.schedule import critical_path, recipe_seconds, simulate

FITTED = ("gemm_sustained", "memory_efficiency")  # fitted on TRAINING, as u = 1/value
LAYERS_PER_TASK = 1000  # one compute task per pipeline chunk: the same step time, fewer tasks


def setup(fig, constants=None):
    """(Model, Parallel, Cluster sized for it) of a figure, the cluster's shape constants replaced by
    `constants` (a dict) if given."""
    model, par = Model(**fig["model"]), Parallel(**fig["parallel"])
    cluster = replace(PRESETS[fig["cluster"]], **fig.get("cluster_changes", {}), **(constants or {}))
    return model, par, cluster.sized(par.world)


def published_seconds(fig, model, par, cluster):
    """The published figure as a step time: TFLOP/s per GPU (counting recomputation) and MFU are converted
    with the step's FLOPs (sim.cost.step_flops), seconds per step taken as they are."""
    flops = step_flops(model, par)
    if fig["metric"] == "tflops":
        return flops["hardware"] / (fig["value"] * 1e12 * par.world)
    if fig["metric"] == "mfu":
        return flops["model"] / (fig["value"] * par.world * cluster.peak_flops[par.dtype])
    if fig["metric"] == "step_s":
        return fig["value"]
    raise ValueError(f"unknown metric {fig['metric']!r} in figure {fig['name']!r}")


def in_unit(fig, model, par, cluster, seconds):
    """A step time in the figure's unit (TFLOP/s per GPU, MFU or s)."""
    flops = step_flops(model, par)
    return {"tflops": flops["hardware"] / seconds / par.world / 1e12,
            "mfu": flops["model"] / seconds / par.world / cluster.peak_flops[par.dtype],
            "step_s": seconds}[fig["metric"]]


def linearize(fig, constants):
    """(T0, grads, published): the simulated step time at `constants`, its derivatives by u_j = 1/constant_j
    along the critical path (exact: durations are affine in u), and the published step time."""
    model, par, cluster = setup(fig, constants)
    step = simulate(model, par, cluster, layers_per_task=LAYERS_PER_TASK)
    path = [step.tasks[i] for i in critical_path(step.tasks)]
    base = sum(recipe_seconds(t.recipe, step.costs) for t in path)
    if not math.isclose(base, step.step_time, rel_tol=1e-9):
        raise RuntimeError(f"{fig['name']}: the critical path's recipes give {base} s, the simulation "
                           f"{step.step_time} s")
    grads = []
    for name in FITTED:
        du = 0.01
        moved = build_costs(model, par, replace(cluster, **{name: 1 / (1 / getattr(cluster, name) + du)}))
        grads.append((sum(recipe_seconds(t.recipe, moved) for t in path) - base) / du)
    return step.step_time, grads, published_seconds(fig, model, par, cluster)


def solve(lins, constants):
    """The constants minimising sum((T(u)/P - 1)^2) over linearizations `lins` [(T0, grads, P)] taken at
    `constants`, as a dict. Raises ValueError if they are not determined (fewer figures than constants)."""
    import numpy as np
    if len(lins) < len(FITTED):
        raise ValueError(f"{len(lins)} figures cannot determine {len(FITTED)} constants")
    a = np.array([[g / p for g in grads] for _, grads, p in lins])
    y = np.array([1 - t0 / p for t0, _, p in lins])
    du = np.linalg.lstsq(a, y, rcond=None)[0]
    u0 = [1 / constants[name] for name in FITTED]
    return {name: float(1 / (u + d)) for name, u, d in zip(FITTED, u0, du)}


def linear_seconds(lin, at, constants):
    """A linearization (taken at constants `at`) evaluated at `constants`."""
    t0, grads, _ = lin
    return t0 + sum(g * (1 / constants[n] - 1 / at[n]) for g, n in zip(grads, FITTED))


def fit_training(figures, start, tol=1e-4, iterations=8):
    """The FITTED constants fitted to `figures` (Gauss-Newton from `start`, a dict of every shape constant)."""
    constants = dict(start)
    for _ in range(iterations):
        new = solve([linearize(f, constants) for f in figures], constants)
        moved = max(abs(new[n] / constants[n] - 1) for n in FITTED)
        constants.update(new)
        if moved < tol:
            break
    return constants


def linearize_all(figures=TRAINING, constants=None):
    """{figure name: linearize(figure, constants)} (default: the presets' constants)."""
    return {f["name"]: linearize(f, dict(constants or SHAPE_CONSTANTS)) for f in figures}


def leave_one_out(figures=TRAINING, constants=None, simulate_held_out=True, lins=None):
    """[{fig, predicted, published, error, constants}] for every figure: "fit" figures predicted with the
    constants refitted without them, "check" figures with `constants` (default: the presets'). Predictions
    are step times; error = published step time / predicted - 1, i.e. the relative error of the throughput.
    lins: linearize_all(figures, constants) if already computed."""
    constants = dict(constants or SHAPE_CONSTANTS)
    lins = lins or linearize_all(figures, constants)
    fit = [f for f in figures if f["role"] == "fit"]
    rows = []
    for fig in figures:
        if fig["role"] == "fit":
            fold = {**constants, **solve([lins[f["name"]] for f in fit if f is not fig], constants)}
        else:
            fold = constants
        if simulate_held_out:
            model, par, cluster = setup(fig, fold)
            seconds = simulate(model, par, cluster, layers_per_task=LAYERS_PER_TASK).step_time
        else:
            seconds = linear_seconds(lins[fig["name"]], constants, fold)
        published = lins[fig["name"]][2]
        rows.append({"fig": fig, "predicted": seconds, "published": published, "error": published / seconds - 1,
                     "constants": fold})
    return rows


def table(rows):
    """The leave-one-out table as Markdown: figure, source, predicted, published, error."""
    lines = ["| figure | source | role | predicted | published | error |", "|---|---|---|---|---|---|"]
    unit = {"tflops": "TFLOP/s", "mfu": "MFU", "step_s": "s"}
    for r in rows:
        fig = r["fig"]
        model, par, cluster = setup(fig)
        pred = in_unit(fig, model, par, cluster, r["predicted"])
        fmt = "{:.1%}" if fig["metric"] == "mfu" else "{:.1f}" if fig["metric"] == "tflops" else "{:.2f} s"
        source = fig["source"].split(" (")[0].split(" =")[0].split(",")[0]
        lines.append(f"| {fig['name']} | {source} | {fig['role']} | {fmt.format(pred)} | "
                     f"{fmt.format(fig['value'])} ({unit[fig['metric']]}) | {100 * r['error']:+.1f}% |")
    errors = [abs(r["error"]) for r in rows]
    lines.append(f"\nmax |error| {100 * max(errors):.1f}%, mean {100 * sum(errors) / len(errors):.1f}% over "
                 f"{len(rows)} figures (fit figures leave-one-out, check figures never fitted)")
    return "\n".join(lines)


def main(argv):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--fit", action="store_true", help="refit every constant on the published figures")
    ap.add_argument("--linear", action="store_true", help="held-out figures from their linearization (fast)")
    args = ap.parse_args(argv)
    if args.fit:
        from sim.compute import fit_gemm_curve
        k0, latency, rms, worst = fit_gemm_curve(GEMM_CURVE, PRESETS["h100-sxm"])
        print(f"GEMM curve ({GEMM_CURVE_SOURCE}, {len(GEMM_CURVE)} shapes): tile_k0 {k0:g}, kernel_latency "
              f"{latency * 1e6:g} us; relative error rms {100 * rms:.1f}%, worst {100 * worst:+.1f}%")
        start = {**SHAPE_CONSTANTS, "tile_k0": k0, "kernel_latency": latency}
        fitted = fit_training([f for f in TRAINING if f["role"] == "fit"], start)
        print("fitted on the training figures: " + ", ".join(f"{n} {fitted[n]:.4f}" for n in FITTED))
        print(f"SHAPE_CONSTANTS = {{{', '.join(f'{chr(34)}{n}{chr(34)}: {v!r}' for n, v in fitted.items())}}}")
        return 0
    print(table(leave_one_out(simulate_held_out=not args.linear)))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
