"""
The simulator reads train.py's configuration: the same config files and --key=value overrides (config/__init__.py,
train.py's defaults), plus the keys below that only the simulator has. So any run train.py can do can be
simulated first, on this machine's calibration or on a cluster preset.

How train.py's keys map to a layout (sim.cost.Parallel), for N devices (--gpus, or --nodes x devices per node):
- tp = tp_size, or N/cp for parallel="tp", else 1; pp = pp_size, or N/cp for parallel="pp", else 1; cp = cp_size
  with cp_type (ring or ulysses);
  dp = dp_size, or N / (tp·pp·cp)  (so ddp and fsdp are pure data parallel, single is N = 1);
- micro_batch = batch_size, micro-batches per pipeline m = gradient_accumulation_steps / dp (train.py's convention:
  the global batch is gradient_accumulation_steps x batch_size sequences for any dp);
- zero = the trainer's ZeRO stage: 3 for parallel="fsdp" and 3d's dp_type="fsdp", else zero_stage (0 DDP, 1, 2;
  parallel/ddp.py), unless the simulator's zero_stage key (-1 by default) sets it; schedule = pp_schedule,
  v = pp_virtual_stages;
  sequence_parallel, loss_parallel, reshard_after_forward, bucket_cap_mb, pp_split as train.py;
- dtype "auto" is the cluster's (bfloat16 on the GPU presets, float32 on cpu-local); n_layer, n_head, n_embd,
  block_size, block, bias, dropout, n_kv_head, ffn_hidden, n_expert, n_expert_per_token, moe_every,
  n_shared_expert: the model; vocab_size train.py's (0: the dataset's meta.pkl as train.py reads it);
- ep = ep_size, or dp·cp for parallel="ep", else 1 (experts sharded over ep of the dp x cp ranks), with the
  simulator's expert_imbalance (the busiest EP rank's tokens over the mean).
"""

import os

from config import load_config
from parallel.fsdp import reshard_after_forward  # the trainer's policy: "default" is off inside pipelines
from sim import cluster as clusters
from sim.cost import Model, Parallel
from train import DEFAULTS as TRAIN_DEFAULTS
from train import read_vocab_size

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

SIM_DEFAULTS = {
    "cluster": "a100-80gb",      # a100-80gb, h100-sxm, cpu-local, or a cluster .json (sim/cluster.py)
    "gpus": 0,                   # devices in all (0: nodes x devices per node; 1 for parallel=single)
    "nodes": 0,
    "cp_size": 1,                # context parallelism (cp_type: ring or ulysses), between pp and tp in the grid
    "zero_stage": -1,            # -1: the trainer's (3 for fsdp and 3d's dp_type=fsdp, else train.py's zero_stage)
    "recompute": "none",         # none, selective (attention core), full (every layer's forward)
    "flash_attention": True,     # False: the softmax is memory-bound work and its output is kept (5as/h term)
    "overlap_grad_reduce": True,  # gradient buckets reduced during backward (False: after it, Megatron-LM 2021)
    "overlap_p2p": True,         # pipeline sends on their own stream (False: they block compute, Megatron-LM 2021)
    "scatter_gather": False,     # Megatron's scatter/gather of pipeline messages over TP (1/t each, all-gathered)
    "matmul_efficiency": 0.0,    # > 0: the flat compute model, every matmul at this fraction of peak; 0: the
    #                              shape model (GEMM tiles and waves, sim/compute.py)
    "algorithm": "auto",         # all-reduce algorithm: ring, tree, auto (the faster per call)
    "layers_per_task": 1,        # layers per simulated compute task (coarser is faster, slightly less exact)
    "expert_imbalance": 1.0,     # MoE: tokens of the busiest expert-parallel rank over the mean (1: balanced)
    "timeline": "",              # write the simulated step's timeline to this PNG
    "plan": False,               # search layouts for the fastest that fits instead of simulating this one
    "global_batch": 0,           # planner: sequences per step (0: gradient_accumulation_steps x batch_size)
    "top": 5,                    # planner: layouts to print
}
DEFAULTS = {**TRAIN_DEFAULTS, "dtype": "auto", **SIM_DEFAULTS}
FLAGS = ("plan",)  # may be given as a bare --plan


def load(argv):
    """The config dict from config files and --key=value overrides (train.py's keys and SIM_DEFAULTS).
    Raises config.ConfigError for an unknown key or a wrong type."""
    argv = [f"{a}=True" if a.lstrip("-") in FLAGS and a.startswith("--") else a for a in argv]
    return load_config(DEFAULTS, argv)


def devices(cfg, cluster):
    """Devices in all: gpus, else nodes x the cluster's devices per node, else 1 for parallel=single.
    Raises ValueError if neither is given for a parallel strategy."""
    if cfg["gpus"]:
        return cfg["gpus"]
    if cfg["nodes"]:
        return cfg["nodes"] * cluster.gpus_per_node
    if cfg["parallel"] == "single":
        return 1
    raise ValueError(f"parallel={cfg['parallel']!r} needs the number of devices: --gpus=N or --nodes=N")


def build(cfg, cluster=None):
    """(Model, Parallel, Cluster sized for the layout) from a config dict; `cluster` (a Cluster) instead of the
    one cfg names. Raises ValueError (one line) for a layout that does not divide the devices, the
    micro-batches or the model."""
    from dataclasses import replace

    cluster = cluster or clusters.get(cfg["cluster"])
    if cfg["matmul_efficiency"]:
        cluster = replace(cluster, matmul_efficiency=cfg["matmul_efficiency"])
    n = devices(cfg, cluster)
    cp = cfg["cp_size"]
    if cp < 1 or n % cp:
        raise ValueError(f"cp_size={cp} must divide the {n} devices")
    tp = cfg["tp_size"] or (n // cp if cfg["parallel"] == "tp" else 1)
    pp = cfg["pp_size"] or (n // cp if cfg["parallel"] == "pp" else 1)
    if n % (tp * pp * cp):
        raise ValueError(f"tp={tp} x pp={pp} x cp={cp} does not divide the {n} devices")
    dp = cfg["dp_size"] or n // (tp * pp * cp)
    if dp * tp * pp * cp != n:
        raise ValueError(f"dp={dp} x tp={tp} x pp={pp} x cp={cp} = {dp * tp * pp * cp}, not the {n} devices")
    gas = cfg["gradient_accumulation_steps"]
    if gas % dp:
        raise ValueError(f"gradient_accumulation_steps={gas} is the global number of micro-batches and must be "
                         f"divisible by the data-parallel size {dp}")
    vocab = cfg["vocab_size"] or read_vocab_size(cfg["data_dir"] or os.path.join(REPO, "data", cfg["dataset"]))
    model = Model(n_layer=cfg["n_layer"], n_head=cfg["n_head"], n_embd=cfg["n_embd"], seq_len=cfg["block_size"],
                  vocab_size=vocab, block=cfg["block"], bias=cfg["bias"], dropout=cfg["dropout"],
                  n_kv_head=cfg["n_kv_head"], ffn_hidden=cfg["ffn_hidden"], n_expert=cfg["n_expert"],
                  n_expert_per_token=cfg["n_expert_per_token"], moe_every=cfg["moe_every"],
                  n_shared_expert=cfg["n_shared_expert"])
    ep = cfg["ep_size"] or (dp * cp if cfg["parallel"] == "ep" else 1)
    fsdp = cfg["parallel"] == "fsdp" or (cfg["parallel"] == "3d" and cfg["dp_type"] == "fsdp")
    zero = cfg["zero_stage"] if cfg["zero_stage"] >= 0 else (3 if fsdp else 0)
    dtype = cluster.default_dtype if cfg["dtype"] == "auto" else cfg["dtype"]
    par = Parallel(dp=dp, tp=tp, pp=pp, cp=cp, cp_type=cfg["cp_type"], v=cfg["pp_virtual_stages"],
                   micro_batch=cfg["batch_size"],
                   micro_batches=gas // dp, zero=zero, sequence_parallel=cfg["sequence_parallel"] and tp > 1,
                   recompute=cfg["recompute"], schedule=cfg["pp_schedule"],
                   reshard_after_forward=reshard_after_forward(cfg["reshard_after_forward"], pipelined=pp > 1),
                   overlap_grad_reduce=cfg["overlap_grad_reduce"],
                   bucket_mb=cfg["bucket_cap_mb"], loss_parallel=cfg["loss_parallel"],
                   flash_attention=cfg["flash_attention"], dtype=dtype, pp_split=cfg["pp_split"],
                   algorithm=cfg["algorithm"], overlap_p2p=cfg["overlap_p2p"], scatter_gather=cfg["scatter_gather"],
                   ep=ep, expert_imbalance=cfg["expert_imbalance"])
    par.check(model)
    return model, par, cluster.sized(n)
