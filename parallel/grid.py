"""
The rank grid: one layout of the world's ranks over the parallel dimensions, and every process group cut from it.

Dimensions, outermost first: dp (data), pp (pipeline), cp (context), tp (tensor). TP is innermost, so the ranks of
one TP group are consecutive (one node on a GPU cluster: TP's collectives are the most frequent and the largest,
they need NVLink), then CP (ring attention's K/V passes, also per layer), then PP (one activation per micro-batch
and stage boundary), then DP (one gradient reduction per step), as Megatron-LM lays them out (Narayanan et al.
2021, section 3.3; ../shared/DESIGN.md):

    rank = (((dp_rank * pp + pp_rank) * cp + cp_rank) * tp + tp_rank

This is the row-major layout of a DeviceMesh with dims ("dp", "pp", "cp", "tp"), so every strategy takes its groups
from one `init_device_mesh` (picotron's process-group manager does the same). A 1-D strategy is a grid with one
dimension larger than 1.

    python -c "from parallel.grid import print_grid; print_grid(dp=2, pp=2, tp=2)"
"""

import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh

DIMS = ("dp", "pp", "cp", "tp")


def resolve_sizes(world_size, dp=0, pp=0, cp=0, tp=0):
    """{dim: size} of a grid over world_size ranks: 0 means 1 for pp, cp and tp, and the rest of the world for dp.
    Raises ValueError (one line, before any communication) for a negative size or sizes whose product is not the
    world size."""
    sizes = {"dp": dp, "pp": pp, "cp": cp, "tp": tp}
    for name, size in sizes.items():
        if size < 0:
            raise ValueError(f"{name}_size must be >= 0 (0: the rest of the world for dp, 1 for the others), "
                             f"got {size}")
    inner = (pp or 1) * (cp or 1) * (tp or 1)
    sizes.update(pp=pp or 1, cp=cp or 1, tp=tp or 1, dp=dp or world_size // inner)
    if dp == 0 and world_size % inner:
        raise ValueError(f"world size {world_size} is not divisible by pp_size*cp_size*tp_size = {inner}")
    product = sizes["dp"] * inner
    if product != world_size:
        shown = "*".join(str(sizes[d]) for d in DIMS)
        raise ValueError(f"dp_size*pp_size*cp_size*tp_size = {shown} = {product} must equal the world size "
                         f"{world_size}")
    return sizes


def coords(rank, sizes):
    """{dim: coordinate} of global `rank` on a grid of `sizes` (TP innermost)."""
    out = {}
    for dim in reversed(DIMS):
        rank, out[dim] = divmod(rank, sizes[dim])
    return {dim: out[dim] for dim in DIMS}


def groups(sizes):
    """{dim: [[global ranks of each group of that dim, in group-rank order]]}: the ranks that differ only in dim; and
    "dp_cp", the ranks that differ only in dp and cp (they hold the same weights)."""
    world = 1
    for d in DIMS:
        world *= sizes[d]
    by_rest = {}
    for name in (*DIMS, "dp_cp"):
        members = {}
        for r in range(world):
            c = coords(r, sizes)
            members.setdefault(tuple(c[d] for d in DIMS if d not in name.split("_")), []).append(r)
        by_rest[name] = list(members.values())
    return by_rest


def describe(sizes):
    """The grid as text: each rank's coordinate, then the members of every group of the dimensions larger than 1."""
    shown = " x ".join(f"{d}={sizes[d]}" for d in DIMS)
    lines = [f"rank grid {shown} (TP innermost, then CP, then PP, then DP)"]
    world = len(groups(sizes)["dp"]) * sizes["dp"]
    for r in range(world):
        c = coords(r, sizes)
        lines.append(f"  rank {r}: " + " ".join(f"{d}={c[d]}" for d in DIMS))
    for dim, members in groups(sizes).items():
        if len(members[0]) > 1 and (dim != "dp_cp" or min(sizes["dp"], sizes["cp"]) > 1):
            lines.append(f"  {dim} groups: " + " ".join("[" + ",".join(map(str, g)) + "]" for g in members))
    return "\n".join(lines)


def print_grid(dp=1, pp=1, cp=1, tp=1):
    """Print describe() of that grid."""
    print(describe({"dp": dp, "pp": pp, "cp": cp, "tp": tp}))


class RankGrid:
    """This rank's place on the grid: `sizes` and `coord` ({dim: int}), the DeviceMesh `mesh` over DIMS (a
    collective: every rank builds it, after resolve_sizes has checked the sizes), `group(dim)`, the process group of
    this rank's peers along dim (a sub-mesh's group), and `replicas`, the 1-D mesh "dp_cp" of the ranks that hold the
    same weights: data and context parallelism's, whose gradients are reduced together (Megatron's dp x cp group)."""

    def __init__(self, sizes, device_type="cpu"):
        self.sizes = sizes
        self.rank = dist.get_rank() if dist.is_initialized() else 0
        self.coord = coords(self.rank, sizes)
        self.mesh = init_device_mesh(device_type, tuple(sizes[d] for d in DIMS), mesh_dim_names=DIMS)
        # dp and cp flattened into one dimension (they are not adjacent in the layout: pp lies between). DeviceMesh
        # has no public way to do this in torch 2.13; _flatten is what torchtitan uses, and this the one place here.
        self.replicas = self.mesh["dp", "cp"]._flatten("dp_cp") if sizes["cp"] > 1 else self.mesh["dp"]

    def group(self, dim):
        return self.mesh.get_group(dim)
