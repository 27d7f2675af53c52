"""
Published figures the simulator is fitted to and validated against (sim/validate.py), each with its source.
Nothing here is measured by us or recalled: every number was read from the source named beside it.

GEMM_CURVE: one device's bf16 matrix-multiplication FLOP/s over shapes, for the tile model's two constants
(sim/compute.py). TRAINING: end-to-end training throughputs of GPT models with their layouts.
"""

# ----------------------------------------------------------------------------------------------------------
# GEMM curve: H100 (sm_90), bf16 x bf16 -> bf16, batch 1. XLA's default matmul performance table,
# tensorflow/tensorflow third_party/xla/xla/service/gpu/model/matmul_interpolator_data.h (commit 372d578bb861),
# key "sm_90", entries with b: 1 (the first 55 of them in the file's order). {(m, n, k): FLOP/s}
GEMM_CURVE_SOURCE = ("XLA matmul_interpolator_data.h (tensorflow/tensorflow @372d578bb861), sm_90 "
                     "bf16xbf16->bf16, b=1")
GEMM_CURVE = {
    (1024, 2048, 256): 139519467775467, (256, 2048, 256): 41838443890274, (4096, 512, 512): 238821580071174,
    (512, 256, 512): 21788592207792, (256, 2048, 4096): 285873755058572, (4096, 1024, 512): 343707370038412,
    (2048, 2048, 2048): 631984593290170, (256, 512, 4096): 91678775956284, (256, 1024, 256): 22671913513513,
    (4096, 4096, 256): 392162828341855, (2048, 512, 2048): 347714321243523, (4096, 4096, 4096): 783328793548203,
    (512, 4096, 1024): 373345557719054, (512, 256, 4096): 91056803256445, (256, 1024, 4096): 172294901155327,
    (4096, 2048, 512): 447019910074937, (2048, 256, 1024): 135847902834008, (2048, 1024, 2048): 523265996101364,
    (4096, 256, 2048): 304694047673098, (1024, 1024, 2048): 349981037809648, (256, 4096, 2048): 324589426844014,
    (1024, 512, 2048): 220029062295081, (512, 2048, 1024): 232613046793760, (4096, 512, 1024): 370767204419889,
    (1024, 2048, 2048): 524288000000000, (512, 256, 256): 11459846994535, (1024, 256, 1024): 68338965376782,
    (256, 512, 256): 11459846994535, (4096, 1024, 1024): 488064465454545, (1024, 2048, 1024): 373345557719054,
    (4096, 4096, 512): 543116754678806, (256, 512, 1024): 39107729603729, (512, 2048, 2048): 342392163265306,
    (256, 4096, 512): 138084082304526, (256, 1024, 1024): 72471775377969, (2048, 256, 512): 77314359447004,
    (1024, 256, 256): 21959706806282, (2048, 256, 4096): 307486203894616, (512, 1024, 2048): 216480206451612,
    (512, 256, 1024): 39290903981264, (256, 256, 2048): 31126560296846, (4096, 512, 256): 142481664543524,
    (2048, 4096, 1024): 594212409518539, (4096, 4096, 2048): 738736406437117, (512, 512, 2048): 114716006837606,
    (4096, 512, 4096): 649964784503632, (4096, 1024, 256): 216480206451612, (1024, 4096, 1024): 490293070319634,
    (256, 4096, 256): 78033562790697, (256, 4096, 4096): 412026793553338, (4096, 1024, 4096): 738474431911967,
    (1024, 256, 4096): 169681072060682, (256, 2048, 512): 78215459207459, (2048, 256, 256): 43577184415584,
    (4096, 2048, 256): 304003913929784,
}

# Maximum achievable matmul FLOP/s (the largest, best-shaped bf16 products), the tile model's gemm_efficiency:
# stas00/ml-engineering compute/accelerator/README.md (@b9e29720eebd), "Maximum Achievable Matmul FLOPS
# comparison table", BF16: A100 SXM 271.2 of 312 TFLOP/s (86.9%), H100 SXM 794.5 of 989 (80.3%).
MAMF = {"a100": 271.2e12 / 312e12, "h100": 794.5e12 / 989e12}
MAMF_SOURCE = "stas00/ml-engineering compute/accelerator/README.md @b9e29720eebd, MAMF table (BF16)"

# ----------------------------------------------------------------------------------------------------------
# Training throughputs. Each figure: name, source, the published value and its metric ("tflops": achieved
# TFLOP/s per GPU counting recomputation, Narayanan et al. 2021 eq. 3; "mfu": model FLOPs utilization;
# "step_s": seconds per iteration), the model, the layout and the settings of the run.
#
# Megatron-LM runs (A100-SXM4-80GB, DGX A100 nodes of Selene, fp16 mixed precision, vocabulary 51200,
# sequence 2048, GPT-2 blocks with biases and dropout 0.1):
GPT = {"seq_len": 2048, "vocab_size": 51200, "bias": True, "dropout": 0.1}

NARAYANAN_T1 = ("Narayanan et al. 2021 Table 1 = Megatron-LM README (@50a4b5fa02, images/cases_april2021.png); "
                "layouts from examples/academic_paper_scripts/sc21/run_table_1.sh")
NARAYANAN_T2 = ("Narayanan et al. 2021 Table 2, PTD Parallelism rows (copy of the table: cli99/llm-analysis "
                "figures/megatron-lm-2nd-table-2.png, t=8 p=12 / p=35 in its examples/megatron-lm/run_train.sh)")
NARAYANAN_51 = "Narayanan et al. 2021 section 5.1 (training-time estimate: 140 TFLOP/s on 1024 GPUs, batch 1536)"
KORTHIKANTI = ("Korthikanti et al. 2022 Table 5 = Megatron-LM README (@2e90a342f5) MFU table; layouts from the "
               "paper's Table 3 as transcribed in calculon-ai/calculon validation/seqsel/tab5")
KORTHIKANTI_FULL = ("Korthikanti et al. 2022 Table 5, full recomputation, iteration time as transcribed in "
                    "calculon-ai/calculon calculon/llm/validation.py (seqsel_tab5)")


def _megatron(name, source, value, metric, L, h, a, t, p, d, b, gbs, recompute="full", v=1, sp=False,
              ddp_overlap=False, role="fit"):
    """One Megatron-LM figure. ddp_overlap: torch DDP (gradient all-reduce during the last backward, the
    sc21 script's DDP=torch) instead of Megatron's local DDP (after the pipeline flush)."""
    return {"name": name, "source": source, "value": value, "metric": metric, "role": role,
            "cluster": "a100-80gb", "gpus": t * p * d,
            "model": {"n_layer": L, "n_embd": h, "n_head": a, **GPT},
            "parallel": {"tp": t, "pp": p, "dp": d, "v": v, "micro_batch": b, "micro_batches": gbs // (d * b),
                         "recompute": recompute, "sequence_parallel": sp, "flash_attention": False,
                         "overlap_grad_reduce": ddp_overlap, "dtype": "float16", "overlap_p2p": False,
                         "scatter_gather": True,
                         "schedule": "interleaved_1f1b" if v > 1 else "1f1b"}}


# Table 1 (weak scaling): run_table_1.sh gives TP, PP, MBS, GBS, layers, hidden, heads, DDP and
# "--activations-checkpoint-method uniform" (full recomputation) for every row, and
# --num-layers-per-virtual-pipeline-stage for 76B (5 -> v=3), 145B (5 -> v=2), 310B (3 -> v=2), 530B (1 -> v=3).
TRAINING = [
    _megatron("GPT 1.7B, 32 GPUs", NARAYANAN_T1, 137, "tflops", 24, 2304, 24, 1, 1, 32, 16, 512, ddp_overlap=True),
    _megatron("GPT 3.6B, 64 GPUs", NARAYANAN_T1, 138, "tflops", 30, 3072, 32, 2, 1, 32, 16, 512, ddp_overlap=True),
    _megatron("GPT 7.5B, 128 GPUs", NARAYANAN_T1, 142, "tflops", 36, 4096, 32, 4, 1, 32, 16, 512, ddp_overlap=True),
    _megatron("GPT 18B, 256 GPUs", NARAYANAN_T1, 135, "tflops", 40, 6144, 48, 8, 1, 32, 8, 1024, ddp_overlap=True),
    _megatron("GPT 39B, 512 GPUs", NARAYANAN_T1, 138, "tflops", 48, 8192, 64, 8, 2, 32, 4, 1536),
    _megatron("GPT 76B, 1024 GPUs", NARAYANAN_T1, 140, "tflops", 60, 10240, 80, 8, 4, 32, 2, 1792, v=3),
    _megatron("GPT 145B, 1536 GPUs", NARAYANAN_T1, 148, "tflops", 80, 12288, 96, 8, 8, 24, 2, 2304, v=2),
    _megatron("GPT 310B, 1920 GPUs", NARAYANAN_T1, 155, "tflops", 96, 16384, 128, 8, 16, 15, 1, 2160, v=2),
    _megatron("GPT 530B, 2520 GPUs", NARAYANAN_T1, 163, "tflops", 105, 20480, 128, 8, 35, 9, 1, 2520, v=3),
    _megatron("GPT 1T, 3072 GPUs", NARAYANAN_T1, 163, "tflops", 128, 25600, 160, 8, 64, 6, 1, 3072),
    # Table 2 (PTD-P rows): 175B (h 12288, 96 layers, 96 heads) with model-parallel size 96 = t 8 x p 12, batch
    # 1536; 530B (Table 1's shape) with 280 = 8 x 35, batch 2240; microbatch 1. The schedule is not given:
    # 1F1B (the drop 153 -> 141 from 384 to 1536 GPUs is 1F1B's bubble growth at p=12, (1+11/384)/(1+11/96)).
    _megatron("GPT 175B, 384 GPUs", NARAYANAN_T2, 153, "tflops", 96, 12288, 96, 8, 12, 4, 1, 1536),
    _megatron("GPT 175B, 768 GPUs", NARAYANAN_T2, 149, "tflops", 96, 12288, 96, 8, 12, 8, 1, 1536),
    _megatron("GPT 175B, 1536 GPUs", NARAYANAN_T2, 141, "tflops", 96, 12288, 96, 8, 12, 16, 1, 1536),
    _megatron("GPT 530B, 560 GPUs", NARAYANAN_T2, 171, "tflops", 105, 20480, 128, 8, 35, 2, 1, 2240),
    _megatron("GPT 530B, 1120 GPUs", NARAYANAN_T2, 167, "tflops", 105, 20480, 128, 8, 35, 4, 1, 2240),
    _megatron("GPT 530B, 2240 GPUs", NARAYANAN_T2, 159, "tflops", 105, 20480, 128, 8, 35, 8, 1, 2240),
    # Korthikanti et al. 2022: sequence parallelism + selective recomputation, data-parallel size 1. README MFU
    # (Table 5's "present work" rows); Table 3's layouts: 22B t8 p1 batch 4 (micro-batch 4), 175B t8 p8 v3 batch
    # 64, 530B t8 p35 v3 batch 280, 1T t8 p64 batch 512 (micro-batch 1). Check: 72·B·s·L·h²(1 + s/6h + V/16Lh)
    # over Table 5's 1.10 / 13.75 s, the GPUs and 312 TFLOP/s gives the README's 41.5% and 51.4%.
    _megatron("GPT 22B, SP+selective, 8 GPUs", KORTHIKANTI, 0.415, "mfu", 48, 6144, 64, 8, 1, 1, 4, 4,
              recompute="selective", sp=True),
    _megatron("GPT 175B, SP+selective, 64 GPUs", KORTHIKANTI, 0.514, "mfu", 96, 12288, 96, 8, 8, 1, 1, 64,
              recompute="selective", sp=True, v=3),
    _megatron("GPT 530B, SP+selective, 280 GPUs", KORTHIKANTI, 0.560, "mfu", 105, 20480, 128, 8, 35, 1, 1, 280,
              recompute="selective", sp=True, v=3),
    _megatron("GPT 1T, SP+selective, 512 GPUs", KORTHIKANTI, 0.563, "mfu", 128, 25600, 160, 8, 64, 1, 1, 512,
              recompute="selective", sp=True),
    # the same layouts with full recomputation and no sequence parallelism (Table 5's first rows)
    _megatron("GPT 22B, full recompute, 8 GPUs", KORTHIKANTI_FULL, 1.42, "step_s", 48, 6144, 64, 8, 1, 1, 4, 4),
    _megatron("GPT 175B, full recompute, 64 GPUs", KORTHIKANTI_FULL, 18.13, "step_s", 96, 12288, 96, 8, 8, 1, 1, 64,
              v=3),
    _megatron("GPT 530B, full recompute, 280 GPUs", KORTHIKANTI_FULL, 49.05, "step_s", 105, 20480, 128, 8, 35, 1, 1,
              280, v=3),
    _megatron("GPT 1T, full recompute, 512 GPUs", KORTHIKANTI_FULL, 94.42, "step_s", 128, 25600, 160, 8, 64, 1, 1,
              512),
    # Section 5.1's 175B on 1024 GPUs: the layout is not given (1024 is no multiple of Table 2's t·p = 96); we
    # use config/gpt3_175b.py's t8 p8 d16 and keep it out of every fit (a check of the defaults).
    _megatron("GPT 175B, 1024 GPUs (t8 p8 d16 assumed)", NARAYANAN_51, 140, "tflops", 96, 12288, 96, 8, 8, 16, 1,
              1536, role="check"),
]
