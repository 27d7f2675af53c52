"""
The simulator (sim/, sim/__main__.py) against the cases it must reproduce exactly: the pipeline bubble of GPipe, 1F1B
and interleaved 1F1B with free communication (Narayanan et al. 2021), the alpha-beta ring all-reduce, the ZeRO
memory formulas (../shared/notes/formulas.md), Korthikanti et al.'s activation memory, MFU of pure compute, and
Megatron-LM's FLOP count; plus the config mapping, the planner and the timeline. No process group, no wall clock:

    .venv/bin/python -m pytest -q tests/test_sim.py

(The simulator's predictions of measured CPU runs are `python -m sim.calibrate`'s table, not a test.)
"""

import math
from dataclasses import replace

import pytest
import torch

from model import GPT, GPTConfig
from sim.pp_timeline import formula_bubble
from sim.cluster import PRESETS, Cluster, Link
from sim.config import build, load
from sim.cost import (
    Costs,
    Model,
    Parallel,
    collective_time,
    layer_activation_bytes,
    state_bytes,
    step_flops,
)
from sim.planner import plan
from sim.schedule import Task, run, simulate

A100 = PRESETS["a100-80gb"]
TINY = Model(n_layer=8, n_head=4, n_embd=64, seq_len=64, vocab_size=128)
GPT3 = Model(n_layer=96, n_head=96, n_embd=12288, seq_len=2048, vocab_size=51200, bias=True, dropout=0.1)


def free_cluster(**changes):
    """A cluster on which only matmuls cost time: infinite memory bandwidth and links, no latencies, and the flat
    compute model (every matmul at matmul_efficiency x peak, default 0.8; sim/compute.py)."""
    return replace(A100, hbm_bandwidth=math.inf, intra=Link(math.inf, 0.0), inter=Link(math.inf, 0.0),
                   reserved_bytes=0, **{"matmul_efficiency": 0.8, **changes})


# ----------------------------------------------------------------------------------------------------------
# pipeline bubble: exactly the formulas with free communication

@pytest.mark.parametrize("schedule", ["gpipe", "1f1b"])
@pytest.mark.parametrize("p, m", [(2, 1), (2, 4), (4, 4), (4, 8), (8, 16), (8, 3)])
def test_bubble_gpipe_1f1b(schedule, p, m):
    """Forward 1, backward 2 per stage: bubble (p-1)/(m+p-1) of the step, (p-1)/m of the ideal time."""
    par = Parallel(pp=p, micro_batches=m, schedule=schedule)
    step = simulate(TINY, par, A100, costs=Costs.uniform(TINY.n_layer, p, forward=1 / (8 // p), backward=2 / (8 // p)))
    assert step.bubble() == pytest.approx((p - 1) / (m + p - 1), abs=1e-12)
    ideal = 3.0 * m
    assert (step.step_time - ideal) / ideal == pytest.approx((p - 1) / m, abs=1e-12)


@pytest.mark.parametrize("p, v, m", [(2, 2, 4), (4, 2, 8), (4, 2, 4), (2, 4, 2), (4, 2, 16)])
def test_bubble_interleaved(p, v, m):
    """v chunks per rank, each 1/v of a stage's work: the bubble is (p-1)/(v·m) of the ideal time."""
    par = Parallel(pp=p, v=v, micro_batches=m, schedule="interleaved_1f1b")
    per_chunk = TINY.n_layer // (p * v)
    step = simulate(TINY, par, A100, costs=Costs.uniform(TINY.n_layer, p * v, forward=1 / (v * per_chunk),
                                                         backward=2 / (v * per_chunk)))
    ideal = 3.0 * m
    assert (step.step_time - ideal) / ideal == pytest.approx((p - 1) / (v * m), abs=1e-12)
    assert step.bubble() == pytest.approx(formula_bubble(p, m, v), abs=1e-12)


def test_run_detects_deadlock():
    a = Task(0, "compute", "F", [("forward", 1.0)])
    b = Task(1, "compute", "F", [("forward", 1.0)], deps=[a])
    a.deps.append(b)
    with pytest.raises(RuntimeError, match="deadlocks"):
        run([a, b])


# ----------------------------------------------------------------------------------------------------------
# collectives and data-parallel overlap

@pytest.mark.parametrize("n", [2, 4, 8, 64])
def test_ring_all_reduce_alpha_beta(n):
    S, B, alpha = 123e6, 200e9, 7e-6
    assert collective_time("all_reduce", S, n, Link(B, alpha), "ring") == pytest.approx(
        2 * (n - 1) / n * S / B + 2 * (n - 1) * alpha, rel=1e-12)
    assert collective_time("all_gather", S, n, Link(B, alpha)) == pytest.approx((n - 1) / n * S / B + (n - 1) * alpha)
    tree = collective_time("all_reduce", S, n, Link(B, alpha), "tree")
    assert collective_time("all_reduce", S, n, Link(B, alpha), "auto") == min(tree, collective_time(
        "all_reduce", S, n, Link(B, alpha), "ring"))


def test_ddp_step_without_compute_is_one_ring_all_reduce():
    """Pure DP, one bucket, nothing else costs time: the step is the gradients' ring all-reduce (+ the gradient
    norm's 4-byte one), on the intra-node link inside a node, on the inter-node link with a device per node."""
    for n, link, per_node in [(8, "intra", 8), (16, "inter", 1)]:
        cluster = replace(free_cluster(), peak_flops={"bfloat16": math.inf}, link_efficiency=1.0,
                          gpus_per_node=per_node, **{link: Link(100e9, 5e-6)})
        par = Parallel(dp=n, bucket_mb=1e6, algorithm="ring")
        step = simulate(TINY, par, cluster)
        grads, norm = TINY.params * 2, 4
        ring = [2 * (n - 1) / n * S / 100e9 + 2 * (n - 1) * 5e-6 for S in (grads, norm)]
        assert step.step_time == pytest.approx(sum(ring), rel=1e-12)


def test_gradient_all_reduce_overlaps_backward():
    """With buckets reduced during backward the step is shorter than compute + communication; reduced after
    backward (overlap_grad_reduce=False) it is exactly their sum on the compute stream's critical path."""
    model = Model(n_layer=8, n_head=8, n_embd=1024, seq_len=1024, vocab_size=1024)
    par = Parallel(dp=16, micro_batch=4, bucket_mb=10.0)
    overlapped = simulate(model, par, A100)
    serial = simulate(model, replace(par, overlap_grad_reduce=False), A100)
    lanes = serial.lanes(0)
    comm = serial.comm_busy(0)["rs"]
    assert serial.step_time == pytest.approx(sum(v for k, v in lanes.items() if k != "idle") + comm, rel=1e-9)
    assert overlapped.step_time < serial.step_time - 0.5 * comm


# ----------------------------------------------------------------------------------------------------------
# memory

@pytest.mark.parametrize("n", [2, 8])
def test_zero_memory_formulas(n):
    """params + grads + optimizer per device = formulas.md: DDP 16Ψ, ZeRO-1 4Ψ + 12Ψ/N, ZeRO-2 2Ψ + 14Ψ/N,
    ZeRO-3 16Ψ/N (mixed precision); fp32 16Ψ for DDP."""
    psi = TINY.params
    expected = {0: 16 * psi, 1: 4 * psi + 12 * psi / n, 2: 2 * psi + 14 * psi / n, 3: 16 * psi / n}
    for zero, want in expected.items():
        mem = simulate(TINY, Parallel(dp=n, zero=zero), A100).memory[0]
        assert mem["params"] + mem["grads"] + mem["optimizer"] == pytest.approx(want, rel=1e-12)
    assert sum(state_bytes(psi, n, 0, mixed=False).values()) == 16 * psi


def test_korthikanti_activations():
    """Per layer and micro-batch (Korthikanti et al. 2022, table 2), 16-bit activations with dropout."""
    s, b, h, a, t = GPT3.seq_len, 1, GPT3.n_embd, GPT3.n_head, 8
    sbh = s * b * h
    naive = {"dtype": "bfloat16", "flash_attention": False}
    cases = [
        (Parallel(**naive), sbh * (34 + 5 * a * s / h)),
        (Parallel(tp=t, **naive), sbh * (10 + 24 / t + 5 * a * s / (h * t))),
        (Parallel(tp=t, sequence_parallel=True, **naive), sbh / t * (34 + 5 * a * s / h)),
        (Parallel(tp=t, recompute="selective", **naive), sbh * (10 + 24 / t)),
        (Parallel(tp=t, sequence_parallel=True, recompute="selective", **naive), sbh * 34 / t),
        (Parallel(tp=t, recompute="full", **naive), 2 * sbh),
    ]
    for par, want in cases:
        assert layer_activation_bytes(GPT3, par) == pytest.approx(want, rel=1e-12), par.describe()


def test_1f1b_holds_p_micro_batches_of_activations():
    """The first stage of 1F1B keeps p micro-batches in flight, GPipe all m: L/p layers x per-layer bytes x that."""
    model = replace(GPT3, dropout=0.0)
    par = Parallel(dp=16, tp=8, pp=8, micro_batches=32, recompute="full")
    per_layer = layer_activation_bytes(model, par)
    act = {s: simulate(model, replace(par, schedule=s), A100, layers_per_task=12).memory[0]["activations"]
           for s in ("1f1b", "gpipe")}
    extra = layer_activation_bytes(model, par, recompute="none")  # the layer being recomputed
    assert act["1f1b"] == pytest.approx(12 * per_layer * 8 + extra, rel=1e-12)
    assert act["gpipe"] == pytest.approx(12 * per_layer * 32 + extra, rel=1e-12)


def test_does_not_fit_is_reported():
    step = simulate(GPT3, Parallel(dp=8), A100)
    assert not step.fits and "DOES NOT FIT" in step.report()


# ----------------------------------------------------------------------------------------------------------
# FLOPs and MFU

@pytest.mark.parametrize("config", [GPTConfig(n_layer=2, n_head=4, n_embd=64, block_size=32, vocab_size=100, bias=b,
                                              block=blk) for b in (True, False) for blk in ("gpt2", "llama")])
def test_parameter_count_is_model_py(config):
    with torch.device("meta"):
        n = sum(p.numel() for p in GPT(config).parameters())
    assert Model(n_layer=2, n_head=4, n_embd=64, seq_len=32, vocab_size=100, bias=config.bias,
                 block=config.block).params == n


def test_megatron_flops_formula():
    """Narayanan et al. 2021 eq. 3: 96·B·s·L·h²·(1 + s/6h + V/16Lh) per step with full recomputation."""
    par = Parallel(dp=16, tp=8, pp=8, micro_batches=96, recompute="full")
    B, s, L, h, V = par.global_batch, GPT3.seq_len, GPT3.n_layer, GPT3.n_embd, GPT3.vocab_size
    megatron = 96 * B * s * L * h * h * (1 + s / (6 * h) + V / (16 * L * h))
    flops = step_flops(GPT3, par)
    assert flops["hardware"] == pytest.approx(megatron, rel=2e-3)  # biases and norms are not in the formula
    assert flops["model"] == pytest.approx(megatron * 3 / 4, rel=2e-2)


@pytest.mark.parametrize("eff", [0.5, 0.8])
def test_mfu_of_pure_compute_equals_matmul_efficiency(eff):
    cluster = free_cluster(matmul_efficiency=eff)
    for par in (Parallel(micro_batch=4, micro_batches=3), Parallel(micro_batch=2, dtype="float32")):
        step = simulate(TINY, par, cluster)
        assert step.mfu == pytest.approx(eff, rel=1e-12)


# ----------------------------------------------------------------------------------------------------------
# config, planner, timeline, CLI

def test_config_maps_train_keys():
    a100 = ["--cluster=a100-80gb", "--gpus=2"]
    _, par, _ = build(load(["config/train_shakespeare_char_pp_interleaved_cpu.py", *a100]))
    assert (par.pp, par.v, par.micro_batches, par.micro_batch, par.schedule) == (2, 2, 4, 3, "interleaved_1f1b")
    _, par, _ = build(load(["config/train_shakespeare_char_fsdp_custom_cpu.py", *a100]))
    assert (par.dp, par.zero, par.micro_batches, par.micro_batch) == (2, 3, 1, 6)
    model, par, cluster = build(load(["config/gpt3_175b.py", "--gpus=1024", "--vocab_size=51200"]))
    assert (par.dp, par.tp, par.pp, par.micro_batches, cluster.nodes, model.params // 10**9) == (16, 8, 8, 96, 128, 174)
    for argv, message in [(["config/train_shakespeare_char_ddp_custom_cpu.py"], "needs the number of devices"),
                          (["config/train_shakespeare_char_ddp_custom_cpu.py", "--gpus=4"], "divisible by"),
                          (["config/gpt3_175b.py", "--gpus=1000"], "does not divide"),
                          (["--parallel=tp", "--gpus=8", "--n_head=12"], "must divide n_head")]:
        with pytest.raises(ValueError, match=message):
            build(load(argv))


def test_planner_finds_layouts_no_worse_than_pure_dp():
    model = Model(n_layer=8, n_head=16, n_embd=2048, seq_len=1024, vocab_size=32000)
    cluster = A100.sized(16)
    steps = plan(model, Parallel(), cluster, global_batch=64, devices=16, top=3)
    assert [s.step_time for s in steps] == sorted(s.step_time for s in steps) and all(s.fits for s in steps)
    assert steps[0].step_time <= simulate(model, Parallel(dp=16, micro_batch=4, micro_batches=1), cluster).step_time
    assert all(s.par.global_batch == 64 and s.par.world == 16 for s in steps)


def test_timeline_png(tmp_path):
    from sim.timeline import draw
    step = simulate(TINY, Parallel(dp=2, tp=2, pp=2, micro_batches=4, zero=1, sequence_parallel=True), A100.sized(8))
    path = draw(step, str(tmp_path / "t.png"))
    with open(path, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"


def test_cli_one_line_errors(capsys):
    import sim.__main__ as simulate
    with pytest.raises(ValueError, match="does not fit"):
        simulate.main(["config/gpt3_175b.py", "--gpus=1024", "--tp_size=1", "--pp_size=1", "--dp_size=1024",
                       "--gradient_accumulation_steps=1024"])
    assert simulate.main(["config/train_shakespeare_char_cpu.py", "--cluster=h100-sxm"]) == 0
    assert "MFU" in capsys.readouterr().out


def test_cluster_group_links():
    cluster = A100.sized(32)
    assert cluster.group_link(range(8)).bandwidth == pytest.approx(300e9 * 0.8)
    assert cluster.group_link([0, 8, 16, 24]).bandwidth == pytest.approx(25e9 * 0.8)
    assert cluster.group_link(range(16)).bandwidth == pytest.approx(min(8 * 25e9, 300e9) * 0.8)
    with pytest.raises(ValueError, match="whole nodes"):
        A100.sized(12)
    assert isinstance(A100, Cluster)


# ----------------------------------------------------------------------------------------------------------
# the shape model against published figures (sim/compute.py, sim/published.py, sim/validate.py)

def test_gemm_waves_and_curve_fit():
    """One tile more than the SMs hold costs a second wave; the tile model's two constants are what the
    published H100 GEMM curve gives (sim/published.py), and it fits the curve within 10% rms."""
    from sim.cluster import SHAPE_CONSTANTS
    from sim.compute import fit_gemm_curve, gemm, gemm_seconds
    from sim.published import GEMM_CURVE
    h100 = PRESETS["h100-sxm"]
    # [4096, 8448] fills 8, 16 or 32 whole waves of 132 SMs with 128x256, 128x128 or 64x128 tiles; 64 more rows
    # (1.6% more FLOPs) need a 33rd wave of the 64x128 tiles, the best shape then: 1/32 more time
    full, more = (gemm_seconds(gemm(m, 8448, 8192), h100, "bfloat16") for m in (4096, 4096 + 64))
    assert more / full == pytest.approx(33 / 32, rel=1e-12)
    skinny = gemm(8192, 8, 8192)  # a matrix-vector-like product: its bytes at HBM bandwidth (the roofline)
    assert gemm_seconds(skinny, h100, "bfloat16") == pytest.approx(
        (8192 * 8192 + 8192 * 8 + 8192 * 8) * 2 / h100.hbm_bandwidth, rel=1e-12)
    k0, latency, rms, _ = fit_gemm_curve(GEMM_CURVE, h100)
    assert (k0, latency) == (SHAPE_CONSTANTS["tile_k0"], SHAPE_CONSTANTS["kernel_latency"])
    assert rms < 0.10


def test_published_throughputs_leave_one_out():
    """Every published training figure predicted within 10% with its constants refitted without it (check
    figures: never fitted), the presets' constants are the fit on all of them, and the predicted TFLOP/s
    rise with model size as Megatron-LM's Table 1 does (1.7B-18B below 530B-1T)."""
    from sim.cluster import SHAPE_CONSTANTS
    from sim.published import TRAINING
    from sim.validate import FITTED, leave_one_out, linearize_all, solve
    lins = linearize_all()
    rows = leave_one_out(simulate_held_out=False, lins=lins)
    bad = [(r["fig"]["name"], round(r["error"], 3)) for r in rows if abs(r["error"]) > 0.10]
    assert not bad
    refit = solve([lins[f["name"]] for f in TRAINING if f["role"] == "fit"], SHAPE_CONSTANTS)
    for name in FITTED:
        assert refit[name] == pytest.approx(SHAPE_CONSTANTS[name], rel=0.01)
    table1 = {r["fig"]["name"]: r["fig"]["value"] * r["published"] / r["predicted"] for r in rows
              if "Table 1" in r["fig"]["source"]}
    small = [table1[f"GPT {s}"] for s in ("1.7B, 32 GPUs", "3.6B, 64 GPUs", "7.5B, 128 GPUs", "18B, 256 GPUs")]
    large = [table1[f"GPT {s}"] for s in ("530B, 2520 GPUs", "1T, 3072 GPUs")]
    assert max(small) < min(large)


def test_gpt3_175b_1024_gpus_default_settings():
    """docs/simulator.md's command (Megatron-LM 2021's settings: full recomputation, no flash attention, V=51200), no
    --matmul_efficiency: within 10% of Narayanan et al. 2021's 140 TFLOP/s per GPU (section 5.1)."""
    model, par, cluster = build(load(["config/gpt3_175b.py", "--gpus=1024", "--vocab_size=51200",
                                      "--recompute=full", "--flash_attention=False"]))
    step = simulate(model, par, cluster, layers_per_task=12)
    assert step.tflops_per_device == pytest.approx(140, rel=0.10)
