"""
3-D parallelism: data x pipeline x tensor parallel on one rank grid (Megatron-LM, Narayanan et al. 2021,
"Efficient Large-Scale Language Model Training on GPU Clusters Using Megatron-LM", section 3; torchtitan).

    torchrun --standalone --nproc_per_node=8 train.py config/train_shakespeare_char_3d_custom_cpu.py

The grid. world_size = dp * pp * tp ranks, TP innermost, then PP, then DP:

    rank = (dp_rank * pp + pp_rank) * tp + tp_rank

so the tp ranks of one TP group are consecutive (one node on a GPU cluster: TP's all-reduces are the most
frequent and the largest per step, they need NVLink), the stages of a pipeline are tp ranks apart, and the DP
replicas are pp * tp apart. This is the row-major layout of a DeviceMesh ("dp", "pp", "tp"), so both variants
use the groups of one `init_device_mesh` (`RankGrid`; `python -c ...print_grid` shows it).

Composition: 3d reuses the 1-D strategies' code, each handed its group.
- custom: every rank builds only its pipeline stages (parallel/pp.py's StageModule, on the meta device), swaps
  their linears and embedding for the custom TP layers over the TP group (parallel/tp.py), wraps each stage in the
  custom DDP (parallel/ddp.py's DataParallel) or FSDP (parallel/fsdp.py's FullyShardedDataParallel) over the DP
  group, and runs parallel/pp.py's schedules over the PP group.
- pytorch: the DTensor TP plan on the "tp" sub-mesh, torch.distributed.pipelining's PipelineStage over "pp", and
  FSDP2 (fully_shard) over "dp" -- torchtitan's order of application.

Across dimensions:
- data: TP peers (and the stages of one pipeline) read the same micro-batches, DP ranks different ones; the global
  batch is batch_size (micro-batch) x micro-batches per pipeline x dp.
- gradients are reduced over DP only, on the last micro-batch's backward of each stage (overlapping the rest of the
  pipeline's backward), and divided by the number of micro-batches, so they are the single device's on the global
  batch. The tied embedding/head gradient is summed over the first and last stage (same (dp, tp) coordinate).
- the gradient norm counts every element once: TP-sharded parameters summed over TP, TP-replicated ones once,
  each stage's once (the tied weight on the first stage only), and with FSDP each DP shard once.
- the logged loss is the mean over micro-batches (last stage) and DP, on every rank.
"""

import importlib

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh


class RankGrid:
    """The (dp, pp, tp) grid of ranks: sizes, this rank's coordinate, and the DeviceMesh whose sub-meshes give each
    dimension's process group (Megatron's layout: TP innermost, then PP, then DP).

    RankGrid.check(world_size, dp, pp, tp) -> (dp, pp, tp) resolves 0 (dp: the rest of the world; pp, tp: 1) and raises ValueError (one line)
    unless dp * pp * tp == world_size; it does no communication. RankGrid(dp, pp, tp, device_type) then builds the
    mesh (a collective over the world: every rank must call it).
    """

    DIMS = ("dp", "pp", "tp")

    @staticmethod
    def check(world_size, dp=0, pp=0, tp=0):
        sizes = {"dp": dp, "pp": pp, "tp": tp}
        for name, size in sizes.items():
            if size < 0:
                raise ValueError(f"{name}_size must be >= 0 (0 = the rest of the world), got {size}")
        sizes["pp"], sizes["tp"] = pp or 1, tp or 1
        if dp == 0:  # data parallel takes the rest of the world
            if world_size % (sizes["pp"] * sizes["tp"]):
                raise ValueError(f"world size {world_size} is not divisible by pp_size*tp_size = "
                                 f"{sizes['pp']}*{sizes['tp']}")
            sizes["dp"] = world_size // (sizes["pp"] * sizes["tp"])
        if sizes["dp"] * sizes["pp"] * sizes["tp"] != world_size:
            raise ValueError(f"dp_size*pp_size*tp_size = {sizes['dp']}*{sizes['pp']}*{sizes['tp']} = "
                             f"{sizes['dp'] * sizes['pp'] * sizes['tp']} must equal the world size {world_size}")
        return sizes["dp"], sizes["pp"], sizes["tp"]

    @staticmethod
    def coords(rank, dp, pp, tp):
        """(dp_rank, pp_rank, tp_rank) of global `rank` (TP innermost)."""
        return rank // (pp * tp), rank // tp % pp, rank % tp

    @staticmethod
    def groups(dp, pp, tp):
        """{"dp": [[ranks of each DP group]], "pp": [...], "tp": [...]}: the members of every group of each dimension
        (ranks that differ only in that coordinate), as global ranks in group-rank order."""
        def rank(d, p, t):
            return (d * pp + p) * tp + t
        return {"dp": [[rank(d, p, t) for d in range(dp)] for p in range(pp) for t in range(tp)],
                "pp": [[rank(d, p, t) for p in range(pp)] for d in range(dp) for t in range(tp)],
                "tp": [[rank(d, p, t) for t in range(tp)] for d in range(dp) for p in range(pp)]}

    @classmethod
    def describe(cls, dp, pp, tp):
        """The grid as text: each global rank's (dp, pp, tp) coordinate, then every group's members."""
        lines = [f"rank grid dp={dp} x pp={pp} x tp={tp} (TP innermost, then PP, then DP)"]
        for r in range(dp * pp * tp):
            d, p, t = cls.coords(r, dp, pp, tp)
            lines.append(f"  rank {r}: dp={d} pp={p} tp={t}")
        for name, members in cls.groups(dp, pp, tp).items():
            lines.append(f"  {name} groups: " + " ".join("[" + ",".join(map(str, g)) + "]" for g in members))
        return "\n".join(lines)

    def __init__(self, dp, pp, tp, device_type="cpu"):
        self.dp, self.pp, self.tp = dp, pp, tp
        self.rank = dist.get_rank()
        self.dp_rank, self.pp_rank, self.tp_rank = self.coords(self.rank, dp, pp, tp)
        self.mesh = init_device_mesh(device_type, (dp, pp, tp), mesh_dim_names=self.DIMS)
        self.dp_group, self.pp_group, self.tp_group = (self.mesh.get_group(d) for d in self.DIMS)


def print_grid(dp, pp, tp):
    """Print RankGrid.describe(dp, pp, tp): `python -c "import importlib; importlib.import_module('parallel.3d')
    .print_grid(2, 2, 2)"`."""
    print(RankGrid.describe(dp, pp, tp))
