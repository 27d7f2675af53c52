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

Expert parallelism (the fifth dimension, ep) is not a dimension of its own: it borrows the ranks of dp x cp, which
hold the same dense weights, as torchtitan and Megatron-core do. Those dp·cp ranks (numbered d = dp_rank·cp + cp_rank,
CP innermost) are cut into groups of ep consecutive ones: an EP group (ep coordinate d % ep) shards the experts, and
the dp·cp/ep groups (edp coordinate d // ep) are replicas of each other, whose expert gradients are reduced together
(expert data parallelism). So with ep = cp·k an EP group is k DP replicas' whole CP groups, and ep = dp·cp shards the
experts over every rank that holds the dense weights. `expert_mesh` is the DeviceMesh ("pp", "tp", "edp", "ep").

    python -c "from parallel.grid import print_grid; print_grid(dp=2, pp=2, tp=2)"
    python -c "from parallel.grid import print_grid; print_grid(dp=4, pp=2, cp=1, tp=2, ep=2)"
"""

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

DIMS = ("dp", "pp", "cp", "tp")
EXPERT_DIMS = ("pp", "tp", "edp", "ep")


def resolve_sizes(world_size, dp=0, pp=0, cp=0, tp=0, ep=0):
    """{dim: size} of a grid over world_size ranks, and "ep", the expert-parallel size: 0 means 1 for pp, cp, tp and ep,
    and the rest of the world for dp. Raises ValueError (one line, before any communication) for a negative size,
    sizes whose product is not the world size, or an ep that does not divide dp·cp."""
    sizes = {"dp": dp, "pp": pp, "cp": cp, "tp": tp, "ep": ep}
    for name, size in sizes.items():
        if size < 0:
            raise ValueError(f"{name}_size must be >= 0 (0: the rest of the world for dp, 1 for the others), "
                             f"got {size}")
    inner = (pp or 1) * (cp or 1) * (tp or 1)
    sizes.update(pp=pp or 1, cp=cp or 1, tp=tp or 1, dp=dp or world_size // inner, ep=ep or 1)
    if dp == 0 and world_size % inner:
        raise ValueError(f"world size {world_size} is not divisible by pp_size*cp_size*tp_size = {inner}")
    product = sizes["dp"] * inner
    if product != world_size:
        shown = "*".join(str(sizes[d]) for d in DIMS)
        raise ValueError(f"dp_size*pp_size*cp_size*tp_size = {shown} = {product} must equal the world size "
                         f"{world_size}")
    if (sizes["dp"] * sizes["cp"]) % sizes["ep"]:
        raise ValueError(f"ep_size={sizes['ep']} must divide dp_size*cp_size = {sizes['dp']}*{sizes['cp']}: expert "
                         f"parallelism borrows the data- and context-parallel ranks")
    return sizes


def coords(rank, sizes):
    """{dim: coordinate} of global `rank` on a grid of `sizes` (TP innermost)."""
    out = {}
    for dim in reversed(DIMS):
        rank, out[dim] = divmod(rank, sizes[dim])
    return {dim: out[dim] for dim in DIMS}


def expert_coords(rank, sizes):
    """{"ep", "edp"}: global `rank`'s place in expert parallelism (module docstring): its dp x cp index d = dp·cp +
    cp (CP innermost) split as d = edp·ep + ep. With ep = 1 (or no "ep" in sizes) ep is 0 and edp is d."""
    c, ep = coords(rank, sizes), sizes.get("ep", 1)
    d = c["dp"] * sizes["cp"] + c["cp"]
    return {"ep": d % ep, "edp": d // ep}


def expert_layout(sizes):
    """The global ranks as a (pp, tp, edp, ep) int tensor: the rank at each coordinate, for the expert DeviceMesh."""
    ep = sizes["ep"]
    layout = torch.empty(sizes["pp"], sizes["tp"], sizes["dp"] * sizes["cp"] // ep, ep, dtype=torch.int)
    for r in range(layout.numel()):
        c, e = coords(r, sizes), expert_coords(r, sizes)
        layout[c["pp"], c["tp"], e["edp"], e["ep"]] = r
    return layout


def groups(sizes):
    """{dim: [[global ranks of each group of that dim, in group-rank order]]}: the ranks that differ only in dim; and
    "dp_cp", the ranks that differ only in dp and cp (they hold the same weights); with sizes["ep"] > 1 also "ep" (the
    ranks that shard one layer's experts) and "edp" (those holding the same experts)."""
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
    if sizes.get("ep", 1) > 1:
        layout = expert_layout(sizes)
        by_rest["ep"] = layout.reshape(-1, sizes["ep"]).tolist()
        by_rest["edp"] = layout.transpose(2, 3).reshape(-1, layout.shape[2]).tolist()
    return by_rest


def describe(sizes):
    """The grid as text: each rank's coordinate, then the members of every group of the dimensions larger than 1."""
    ep = sizes.get("ep", 1)
    shown = " x ".join(f"{d}={sizes[d]}" for d in DIMS)
    experts = f", ep={ep} (experts over dp x cp)" if ep > 1 else ""
    lines = [f"rank grid {shown}{experts} (TP innermost, then CP, then PP, then DP)"]
    world = len(groups(sizes)["dp"]) * sizes["dp"]
    for r in range(world):
        c = coords(r, sizes) | (expert_coords(r, sizes) if ep > 1 else {})
        lines.append(f"  rank {r}: " + " ".join(f"{d}={v}" for d, v in c.items()))
    for dim, members in groups(sizes).items():
        if len(members[0]) > 1 and (dim != "dp_cp" or min(sizes["dp"], sizes["cp"]) > 1):
            lines.append(f"  {dim} groups: " + " ".join("[" + ",".join(map(str, g)) + "]" for g in members))
    return "\n".join(lines)


def print_grid(dp=1, pp=1, cp=1, tp=1, ep=1):
    """Print describe() of that grid."""
    print(describe({"dp": dp, "pp": pp, "cp": cp, "tp": tp, "ep": ep}))


class RankGrid:
    """This rank's place on the grid: `sizes` and `coord` ({dim: int}, with "ep" and "edp": expert_coords), the
    DeviceMesh `mesh` over DIMS (a collective: every rank builds it, after resolve_sizes has checked the sizes),
    `group(dim)`, the process group of this rank's peers along dim (a sub-mesh's group), `replicas`, the 1-D mesh
    "dp_cp" of the ranks that hold the same weights: data and context parallelism's, whose gradients are reduced
    together (Megatron's dp x cp group); and with sizes["ep"] > 1 `expert_mesh`, the DeviceMesh EXPERT_DIMS whose "ep"
    groups shard the experts and "edp" groups hold the same experts (module docstring), else None."""

    def __init__(self, sizes, device_type="cpu"):
        self.sizes = sizes
        self.rank = dist.get_rank() if dist.is_initialized() else 0
        self.coord = coords(self.rank, sizes) | expert_coords(self.rank, sizes)
        self.mesh = init_device_mesh(device_type, tuple(sizes[d] for d in DIMS), mesh_dim_names=DIMS)
        # dp and cp flattened into one dimension (they are not adjacent in the layout: pp lies between). DeviceMesh
        # has no public way to do this in torch 2.13; _flatten is what torchtitan uses, and this the one place here.
        self.replicas = self.mesh["dp", "cp"]._flatten("dp_cp") if sizes["cp"] > 1 else self.mesh["dp"]
        self.expert_mesh = None
        if sizes.get("ep", 1) > 1:  # the same ranks in another layout: every rank builds it (new groups per dim)
            self.expert_mesh = DeviceMesh(device_type, expert_layout(sizes), mesh_dim_names=EXPERT_DIMS)

    def group(self, dim):
        return self.mesh.get_group(dim)

    def sequence_group(self, with_tp=False):
        """The process group of the ranks that hold the other tokens of this rank's sequences: its CP group, or with
        with_tp (sequence parallelism) its cp x tp block (adjacent dims, flattened: _flatten, as `replicas`)."""
        if not with_tp or self.sizes["tp"] == 1:
            return self.group("cp")
        if self.sizes["cp"] == 1:
            return self.group("tp")
        return self.mesh["cp", "tp"]._flatten("cp_tp").get_group()
