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
- pytorch: the DTensor TP plan on the "tp" sub-mesh (parallel/tp.py's pytorch_tp_plan), FSDP2 (fully_shard) or,
  for dp_type="ddp", replicate (FSDP2's machinery without sharding) over "dp", and torch.distributed.pipelining's
  PipelineStage + schedule over "pp" (parallel/pp.py's PytorchPipeline) -- torchtitan's order of application.

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

import contextlib

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor, Shard, distribute_tensor
from torch.distributed.tensor.parallel import loss_parallel, parallelize_module

from model import init_parameter_
from parallel import register
from comm import TorchCollectives
from parallel.ddp import DataParallel
from parallel.fsdp import (
    LOW_PRECISION,
    CountingAllGather,
    CountingReduceScatter,
    FullyShardedDataParallel,
    flat_optimizer_state,
)
from parallel.pp import (
    HEAD,
    WTE,
    CustomPipeline,
    LocalStages,
    PytorchPipeline,
    StageModule,
    cross_entropy,
    split_layers,
    stage_costs,
)
from parallel.tp import (
    _gather,
    check_tp_config,
    chunk_bounds,
    full_shapes,
    is_sequence_parallel_param,
    pytorch_tp_plan,
    shard_dim,
    tensor_parallelize,
    tp_slice_init,
)


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


# ----------------------------------------------------------------------------------------------------------
# what both variants share: the grid, built before the pipeline so that the pipeline's group is the grid's

class Parallel3D:
    """Mixin in front of a parallel/pp.py Pipeline class: the RankGrid from cfg.dp_size/pp_size/tp_size (validated
    before any collective), the data-parallel coordinate and group (dp), the pipeline over the pp group."""

    min_stages = 1  # pp=1 is a valid cut (dp x tp)

    def __init__(self, cfg, device):
        world_size = dist.get_world_size() if dist.is_initialized() else 1
        dp, pp, tp = RankGrid.check(world_size, cfg.dp_size, cfg.pp_size, cfg.tp_size)
        if cfg.dp_type not in ("ddp", "fsdp"):
            raise ValueError(f"dp_type must be 'ddp' or 'fsdp', got {cfg.dp_type!r}")
        if cfg.sequence_parallel and cfg.block_size % tp:
            raise ValueError(f"sequence parallel: block_size={cfg.block_size} is not divisible by tp_size={tp}")
        self.grid = RankGrid(dp, pp, tp, device.type)
        super().__init__(cfg, device)
        self.tp_size = tp

    def data_parallel(self):
        return self.grid.dp_rank, self.grid.dp, self.grid.dp_group

    def pp_process_group(self):
        return self.grid.pp_group

    def activation_shape(self, x):
        """(B, T, n_embd); with sequence parallelism the stages exchange their sequence shard (B, T/tp, n_embd)."""
        B, T = x.shape
        return (B, T // self.tp_size if self.cfg.sequence_parallel else T, self.model.config.n_embd)


# ----------------------------------------------------------------------------------------------------------
# pytorch variant, torchtitan's order of application (Liang et al. 2024, "TorchTitan", section 3.1):
# 1. pipeline split: this rank builds only its virtual stages (parallel/pp.py's StageModule), on the meta device;
# 2. tensor parallel: each stage gets the DTensor plan of parallel/tp.py (`pytorch_tp_plan`, `parallelize_module`)
#    on the "tp" sub-mesh, with sequence parallelism (residual stream Shard(1)) and loss parallelism (vocab-sharded
#    logits, `loss_parallel()`) when configured;
# 3. data parallel over the "dp" sub-mesh: FSDP2 (`fully_shard` per block, then per stage, dp_type="fsdp"), or DDP
#    (dp_type="ddp") as torch.distributed._composable.replicate_with_fsdp's `replicate`: FSDP2's machinery without
#    sharding (gradients all-reduced), which takes DTensor TP parameters and which the pipelining schedules drive
#    exactly like FSDP2 (DistributedDataParallel would need the TP parameters converted to local tensors first);
# 4. materialise: every DTensor gets its slice of the full model's init (model.init_parameter_ on the full tensor,
#    then `distribute_tensor(..., src_data_rank=None)`: no communication), so every grid starts from the single
#    model's weights;
# 5. pipeline schedule: torch.distributed.pipelining's PipelineStage per stage over the "pp" group, and the schedule
#    class of cfg.pp_schedule (parallel/pp.py's PytorchPipeline). The schedule knows FSDP2 modules: gradients are
#    not reduced before the last micro-batch's backward, then reduce-scattered over dp once per step, and divided
#    by the number of micro-batches.
# A dimension of size 1 is skipped (no TP plan at tp=1, no FSDP at dp=1); pp=1 is a one-stage pipeline.
# Communication counted in strategy.stats (tests/test_3d_pytorch.py checks it per step): FSDP2's all-gathers and
# reduce-scatters on dp (parallel/fsdp.py's counting hooks): with reshard_after_forward=False the 1-D formula of this
# rank's TP-local stage parameters Ψ, one all-gather and one reduce-scatter of Ψ per step, since the schedule keeps
# the units gathered from the first forward to the last backward (with reshard_after_forward=True each micro-batch's
# forward gathers again: (m+1)Ψ all-gathered, measured); the pipeline group's tied-gradient exchange (this rank's
# shard, both ways) and loss broadcast (4 bytes, parallel/pp.py); clipping's one-scalar all-reduce. Not counted: the
# collectives inside DTensor (TP), the pipelining schedules' activation send/recv, and replicate's all-reduce (it has
# no counting hook).

def slice_init(model_config):
    """init(name, tensor) for StageModule.materialize: fill a plain or DTensor parameter with its part of the full
    GPT's initial value (init_parameter_ on the full tensor; a DTensor keeps the slice its placements select, as
    distribute_tensor with src_data_rank=None computes locally, without communication)."""
    shapes = full_shapes(model_config)

    def init(name, p):
        full = torch.empty(shapes[name])
        init_parameter_(name, full, model_config)
        with torch.no_grad():
            if isinstance(p, DTensor):
                full = distribute_tensor(full.to(p.device), p.device_mesh, p.placements, src_data_rank=None).to_local()
                p = p.to_local()
            p.copy_(full)
    return init


@register("3d", "pytorch")
class Pytorch3D(Parallel3D, PytorchPipeline):
    """DTensor TP on grid.mesh["tp"], torch.distributed.pipelining over grid.pp_group, FSDP2 (or replicate) on
    grid.mesh["dp"] (module docstring). Config: dp_size, pp_size, tp_size (0: dp takes the rest, pp and tp 1),
    dp_type, sequence_parallel, loss_parallel, pp_schedule, pp_virtual_stages, gradient_accumulation_steps (global
    micro-batches: each pipeline runs gradient_accumulation_steps / dp of them), batch_size (the micro-batch).
    Raises ValueError (one line) for a grid that is not the world size, an unknown dp_type, a model TP cannot split
    (build_model), or any configuration the pipeline rejects (parallel/pp.py)."""

    def __init__(self, cfg, device):
        super().__init__(cfg, device)
        self.sequence_parallel = cfg.sequence_parallel and self.tp_size > 1
        self.loss_parallel = cfg.loss_parallel and self.tp_size > 1
        if self.loss_parallel:
            self.loss_fn = self._loss_parallel_cross_entropy

    @staticmethod
    def _loss_parallel_cross_entropy(logits, targets):
        """cross_entropy on logits sharded over the vocabulary (a DTensor, under loss_parallel()), as a plain
        0-dim tensor: the schedule and the logged loss see a tensor like the 1-D pipeline's."""
        loss = cross_entropy(logits, targets)
        return loss.full_tensor() if isinstance(loss, DTensor) else loss

    # --- building: split, TP, DP, materialise, schedule ----------------------------------------------------

    def build_model(self, model_config):
        cfg, grid = self.cfg, self.grid
        check_tp_config(model_config, grid.tp, self.sequence_parallel)  # before any collective
        # the same RNG on every TP rank (dropout masks of replicated activations agree), another per pipeline/replica
        torch.manual_seed(cfg.seed + self.rank // grid.tp)
        self.bounds = split_layers(model_config.n_layer, self.n_stages, cfg.pp_split, stage_costs(model_config))
        chunks = [StageModule(model_config, s, self.n_stages, *self.bounds[s]) for s in self.my_stages]  # meta
        for chunk in chunks:
            if grid.tp > 1:
                parallelize_module(chunk, grid.mesh["tp"],
                                   pytorch_tp_plan(chunk, self.sequence_parallel, self.loss_parallel))
                if chunk.first and chunk.last:  # the plan distributed wte and lm_head separately: tie them again
                    chunk.lm_head.weight = chunk.transformer.wte.weight
            if cfg.compile:  # per block, before FSDP (torchtitan's order)
                for block in chunk.transformer.h.values():
                    block.compile(backend=cfg.compile_backend)
            if grid.dp > 1:
                self._data_parallelize(chunk)
        init = slice_init(model_config)
        for chunk in chunks:
            chunk.materialize(self.device, init)
        self.chunk_of = dict(zip(self.my_stages, chunks))
        self.model = LocalStages(model_config, chunks)
        self.tied_param = self._tied_param()
        self.build_schedule()
        return self.model

    def _data_parallelize(self, chunk):
        """FSDP2 (or replicate) over the dp sub-mesh: each block a unit, then the stage (its embeddings, final norm
        and head). The PipelineStage wraps this FSDP module and drives its gradient sync."""
        from torch.distributed._composable.replicate_with_fsdp import replicate
        mp = MixedPrecisionPolicy(param_dtype=LOW_PRECISION.get(self.cfg.dtype), reduce_dtype=torch.float32)
        mesh = self.grid.mesh["dp"]
        for unit in [*chunk.transformer.h.values(), chunk]:
            if self.cfg.dp_type == "fsdp":
                fully_shard(unit, mesh=mesh, reshard_after_forward=self.cfg.reshard_after_forward, mp_policy=mp)
                unit.set_custom_all_gather(CountingAllGather(self.stats))  # count FSDP's bytes (parallel/fsdp.py)
                unit.set_custom_reduce_scatter(CountingReduceScatter(self.stats))
            else:  # replicate's gradient all-reduce has no counting hook: not in self.stats
                replicate(unit, mesh=mesh, mp_policy=mp)

    def configure_optimizer(self):
        # DTensors on different meshes (dp, tp, dp x tp) and plain tensors: the per-parameter AdamW loop
        opt = super().configure_optimizer()
        for group in opt.param_groups:
            group["foreach"] = False
        return opt

    # --- one step ------------------------------------------------------------------------------------------

    def _loss_context(self):
        return loss_parallel() if self.loss_parallel else contextlib.nullcontext()

    def forward_backward(self, batches, scaler):
        if self.sequence_parallel and batches and batches[0][0].shape[1] % self.tp_size:
            raise ValueError(f"sequence parallel: sequence length {batches[0][0].shape[1]} is not divisible by "
                             f"tp_size={self.tp_size}")
        with self._loss_context():
            return super().forward_backward(batches, scaler)

    def eval_loss(self, x, y):
        with self._loss_context():
            return super().eval_loss(x, y)

    def _step(self, batches):
        losses = super()._step(batches)
        self._match_grad_placements()
        return losses

    def _match_grad_placements(self):
        """Without FSDP, DTensor TP leaves some gradients in another layout than their parameter's: Partial(sum)
        for the norms that sequence parallelism feeds only this rank's positions (all-reduced over tp here, as
        Megatron does once per step), Replicate for the vocab-sharded embedding (each rank keeps its rows).
        Redistribute them to the parameter's placements. (FSDP2 does this itself before its reduce-scatter.)"""
        for _, p in self.model.named_stage_parameters():
            if isinstance(p.grad, DTensor) and p.grad.placements != p.placements:
                p.grad = p.grad.redistribute(p.device_mesh, p.placements)

    def _sum_tied_grads(self):
        """The embedding's and the head's gradient summed over the first and last stage: both DTensor copies have
        the same placements, so the local shards are summed (parallel/pp.py does it on plain tensors)."""
        p = self.tied_param
        if p is None:
            return
        if p.grad is None:
            p.grad = torch.zeros_like(p)
        grad = p.grad.to_local() if isinstance(p.grad, DTensor) else p.grad
        peer = self.last_rank if self.pp_rank == self.first_rank else self.first_rank
        other = torch.empty_like(grad)
        handle = self.comm.send(grad, peer, async_op=True)
        self.comm.recv(other, peer)
        handle.wait()
        grad.add_(other)

    def clip_grad_norm_(self, max_norm):
        """Clip to the global L2 norm of the single model's gradient: every element counted once. Each rank adds
        the squares of its local gradient shards, each divided by the number of ranks holding the same elements
        (the product of the sizes of the mesh dims the DTensor is replicated over; a plain tensor is replicated
        over dp and tp); the tied weight counts on the first stage only. One all-reduce over the world sums it.
        (torch.nn.utils.clip_grad_norm_ refuses DTensors on different meshes.)"""
        g = self.grid
        params = [p for _, p in self.model.named_stage_parameters() if p.grad is not None]
        sq = torch.zeros((), dtype=torch.float64, device=self.device)
        for p in params:
            if p is self.tied_param and self.pp_rank != self.first_rank:
                continue
            grad = p.grad
            copies = g.dp * g.tp
            if isinstance(grad, DTensor):
                for size, placement in zip(grad.device_mesh.shape, grad.placements):
                    if not placement.is_replicate():  # Shard, or FSDP's _StridedShard over TP's Shard
                        copies //= size
                grad = grad.to_local()
            sq += grad.detach().double().pow(2).sum() / copies
        dist.all_reduce(sq)
        self.stats.record("all_reduce", sq.numel() * sq.element_size(), self.world_size)
        total = sq.sqrt().float()
        coef = torch.clamp(max_norm / (total + 1e-6), max=1.0)
        for p in params:
            grad = p.grad.to_local() if isinstance(p.grad, DTensor) else p.grad
            grad.detach().mul_(coef.to(grad.dtype))
        return total

    # --- state ---------------------------------------------------------------------------------------------

    def full_state_dict(self):
        """The full GPT's state_dict on every rank (collective): DTensors gathered over dp and tp (full_tensor),
        then every stage gathered over pp; lm_head.weight is the tied embedding."""
        local = {}
        for chunk in self.model.chunks:
            for k, v in chunk.state_dict().items():
                local[k] = (v.full_tensor() if isinstance(v, DTensor) else v).detach().cpu()
        parts = [None] * self.pp_size
        dist.all_gather_object(parts, local, group=self.pp_group)
        full = {}
        for part in parts:
            full |= part
        full[HEAD] = full[WTE]
        return {k: v.to(self.device) for k, v in full.items()}

    def sharded_state_dict(self, optimizer):
        """parallel/pp.py's layout (DTensors here: each rank's dp x tp shard of its stages' tensors, keyed by the full
        GPT's names), with lm_head.weight also present when one stage holds both the embedding and the head (pp=1):
        the single model's state_dict has both names."""
        state = super().sharded_state_dict(optimizer)
        if WTE in state["model"] and HEAD not in state["model"] and self.n_stages == 1:
            state["model"][HEAD] = state["model"][WTE]
        return state


# ----------------------------------------------------------------------------------------------------------
# custom variant: parallel/pp.py's schedules over stages made of parallel/tp.py's layers, each stage wrapped in
# parallel/ddp.py's DataParallel or parallel/fsdp.py's FullyShardedDataParallel

@register("3d", "custom")
class Custom3D(Parallel3D, CustomPipeline):
    """Custom TP layers on the TP group, custom pipeline schedules on the PP group, custom DDP or FSDP
    (cfg.dp_type) on the DP group: each 1-D plugin's own code, handed its group (module docstring)."""

    def build_model(self, model_config):
        cfg, grid = self.cfg, self.grid
        check_tp_config(model_config, grid.tp, cfg.sequence_parallel)
        torch.manual_seed(cfg.seed + grid.dp_rank)  # TP peers alike: their dropout masks must agree
        self.tp_comm, self.dp_comm = self.collectives(grid.tp_group), self.collectives(grid.dp_group)
        self.fsdp = cfg.dp_type == "fsdp"
        self.bounds = split_layers(model_config.n_layer, self.n_stages, cfg.pp_split, stage_costs(model_config))
        init = tp_slice_init(model_config, self.tp_comm)
        chunks, self.wrappers = [], []
        for s in self.my_stages:
            chunk = StageModule(model_config, s, self.n_stages, *self.bounds[s])  # meta: nothing allocated yet
            loss_fn = tensor_parallelize(chunk, self.tp_comm, cfg.sequence_parallel, cfg.loss_parallel)
            self.loss_fn = loss_fn or self.loss_fn
            if self.fsdp:
                if chunk.first and chunk.last:
                    chunk.lm_head.weight = chunk.transformer.wte.weight
                # the tied embedding and head are units of their own on the first and last stage: the two copies
                # then have the same flat layout, so their sharded gradients can be summed shard by shard
                units = ([chunk.transformer.wte] if chunk.first and not chunk.last else []) + \
                    list(chunk.transformer.h.values()) + ([chunk.lm_head] if chunk.last and not chunk.first else [])
                wrapper = FullyShardedDataParallel(
                    chunk, units, self.dp_comm, compute_dtype=LOW_PRECISION.get(cfg.dtype, torch.float32),
                    reshard_after_forward=cfg.reshard_after_forward, device=self.device,
                    init_fn=lambda name, t: init(WTE if name == HEAD else name, t))
                wrapper.pre_reduce_scatter = self._sum_sequence_parallel_grads
            else:
                chunk.materialize(self.device, init)
                wrapper = DataParallel(chunk, self.dp_comm, cfg.bucket_cap_mb)
            chunks.append(chunk)
            self.wrappers.append(wrapper)
        self.chunk_of = dict(zip(self.my_stages, self.wrappers))  # the schedule runs each stage's wrapper
        self.model = LocalStages(model_config, chunks)
        self.sp_names = {n for n in full_shapes(model_config)
                         if cfg.sequence_parallel and grid.tp > 1 and is_sequence_parallel_param(n)}
        self.tied_param = self._tied_param()
        return self.model

    def _tied_param(self):
        """The first stage's embedding and the last stage's head copy (their gradients are summed): the parameters,
        or with FSDP the shard of the unit each forms (at most one optimizer view: a 2-D weight, decayed)."""
        if self.first_rank == self.last_rank or self.pp_rank not in (self.first_rank, self.last_rank):
            return None
        first = self.pp_rank == self.first_rank
        wrapper = self.chunk_of[0 if first else self.n_stages - 1]
        if self.fsdp:
            unit = wrapper.units[0 if first else -1]
            return unit.opt_params[0] if unit.opt_params else None
        return wrapper.module.transformer.wte.weight if first else wrapper.module.lm_head.weight

    def configure_optimizer(self):
        if not self.fsdp:
            return super().configure_optimizer()
        cfg = self.cfg
        params = self.grad_parameters()
        groups = [g for g in ({"params": [p for p in params if p.decay], "weight_decay": cfg.weight_decay},
                              {"params": [p for p in params if not p.decay], "weight_decay": 0.0}) if g["params"]]
        return torch.optim.AdamW(groups, lr=cfg.learning_rate, betas=(cfg.beta1, cfg.beta2),
                                 fused=self.device.type == "cuda")

    def grad_parameters(self):
        if self.fsdp:
            return [p for w in self.wrappers for p in w.opt_params]
        return super().grad_parameters()

    # --- one step: the pipeline's hooks -------------------------------------------------------------------

    @contextlib.contextmanager
    def backward_context(self, stage, mb):
        """Gradients are reduced over DP by the last micro-batch's backward of each stage only (it overlaps the
        rest of the pipeline's backward); the earlier ones accumulate locally (no_sync)."""
        wrapper = self.chunk_of[stage]
        wrapper.require_sync = mb == self.m - 1
        try:
            yield
        finally:
            wrapper.require_sync = True

    def finish_backward(self):
        for wrapper in self.wrappers:
            wrapper.finish_gradient_sync()
        if self.sp_names and not self.fsdp:  # DDP: the DP-averaged SP gradients, summed over TP
            grads = [p.grad for n, p in self.model.named_stage_parameters() if n in self.sp_names and p.grad is not None]
            self._all_reduce_tp(grads)

    def _sum_sequence_parallel_grads(self, unit):
        """FSDP's pre-reduce-scatter hook: sum over TP the unsharded gradients of the SP parameters of `unit`."""
        if self.sp_names:
            self._all_reduce_tp([unit.grad_acc[i["offset"]:i["offset"] + i["numel"]]
                                 for i in unit.infos if i["name"] in self.sp_names])

    def _all_reduce_tp(self, tensors):
        """Sum tensors (in place) over the TP group, as one flat buffer."""
        if not tensors:
            return
        flat = torch.cat([t.reshape(-1) for t in tensors])
        self.tp_comm.all_reduce(flat)
        offset = 0
        for t in tensors:
            t.copy_(flat[offset:offset + t.numel()].view_as(t))
            offset += t.numel()

    # --- gradient norm and state ---------------------------------------------------------------------------

    def _named_pieces(self, values="grad"):
        """(GPT name, tensor) for every piece of a parameter this rank holds: the parameter (values="param") or its
        gradient ("grad"); with FSDP the part of each parameter inside this rank's shard."""
        if not self.fsdp:
            for name, p in self.model.named_stage_parameters():
                t = p.grad if values == "grad" else p.detach()
                if t is not None:
                    yield name, t
            return
        for wrapper in self.wrappers:
            for unit in wrapper.all_units():
                base = self.dp_comm.rank * unit.shard_numel
                for p in unit.opt_params:
                    t = p.grad if values == "grad" else p.detach()
                    if t is None:
                        continue
                    lo, hi = base + p.shard_range[0], base + p.shard_range[1]
                    for info in unit.infos:
                        a, b = max(lo, info["offset"]), min(hi, info["offset"] + info["numel"])
                        if a < b:
                            yield info["name"], t[a - lo:b - lo]

    @torch.no_grad()
    def clip_grad_norm_(self, max_norm):
        """Global L2 norm, every element of the unsharded model once: TP-sharded parameters summed over TP and
        TP-replicated ones counted on tp rank 0; each stage's on its pp rank, the tied head copy not at all; with
        FSDP every DP shard, with DDP the replica of dp rank 0. One all-reduce of a scalar over the world."""
        sq = torch.zeros((), device=self.device)
        for name, g in self._named_pieces("grad"):
            replicated_over_tp = shard_dim(name) is None and self.grid.tp_rank != 0
            replicated_over_dp = not self.fsdp and self.grid.dp_rank != 0
            if name != HEAD and not replicated_over_tp and not replicated_over_dp:
                sq += g.float().pow(2).sum()
        self.collectives(None).all_reduce(sq)
        norm = sq.sqrt()
        coef = torch.clamp(max_norm / (norm + 1e-6), max=1.0)
        for p in self.grad_parameters():
            if p.grad is not None:
                p.grad.mul_(coef)
        return norm

    def _local_state(self):
        """{GPT name: this rank's TP piece of the parameter} for this rank's stages (FSDP: gathered over DP)."""
        local = {}
        for chunk, wrapper in zip(self.model.chunks, self.wrappers):
            if not self.fsdp:
                local |= {k: v.detach() for k, v in chunk.state_dict().items()}
                continue
            for unit in wrapper.all_units():
                params = wrapper.gather_full(unit, unit.shard)
                local |= {fqn: params[i["name"]] for i in unit.infos for fqn in i["fqns"]}
        return local

    def full_state_dict(self):
        """The single GPT's parameters on every rank: gathered over DP (FSDP), TP and PP (collective: every rank)."""
        local, shapes = self._local_state(), full_shapes(self.model.config)
        tp_comm = TorchCollectives(self.grid.tp_group)  # not counted: not part of training
        full = {}
        for name in sorted(local):  # the same order on every TP peer
            dim = shard_dim(name)
            if dim is None or self.grid.tp == 1:
                full[name] = local[name].cpu()
                continue
            sizes = [e - s for s, e in (chunk_bounds(shapes[name][dim], self.grid.tp, r) for r in range(self.grid.tp))]
            full[name] = _gather(tp_comm, local[name].contiguous(), dim, sizes).cpu()
        parts = [None] * self.pp_size
        dist.all_gather_object(parts, full, group=self.pp_group)
        merged = {}
        for part in parts:
            merged |= part
        merged[HEAD] = merged[WTE]
        return {k: v.to(self.device) for k, v in merged.items()}

    # --- sharded checkpoint: per parameter name, this TP rank's piece as a DTensor on the "tp" sub-mesh -------

    def _tp_placed(self, name, t):
        """t (this rank's TP piece of `name`) as a DTensor Shard(dim) on the tp sub-mesh, or as is if replicated."""
        dim = shard_dim(name)
        if dim is None:
            return t
        shape = full_shapes(self.model.config)[name]
        return DTensor.from_local(t, self.grid.mesh["tp"], [Shard(dim)], run_check=False, shape=shape,
                                  stride=torch.empty(shape, device="meta").stride())

    def sharded_state_dict(self, optimizer):
        """{"model", "optim"} keyed by the GPT's names (parallel/checkpoint.py): TP-sharded tensors as DTensors on the
        tp sub-mesh, the others plain; with FSDP each unit is gathered over DP first (one unit at a time), so DP
        replicas write the same pieces and DCP keeps one. The tied head's copy is saved as lm_head.weight and its
        AdamW state under the embedding's name (the single model's layout), as parallel/pp.py does."""
        model_sd, optim_sd = {}, {}
        for chunk, wrapper in zip(self.model.chunks, self.wrappers):
            if not self.fsdp:
                for name, p in chunk.named_parameters():
                    state = optimizer.state[p]
                    if not state:  # before the first step: AdamW's state, so that a load has somewhere to go
                        state.update(step=torch.tensor(0.0), exp_avg=torch.zeros_like(p), exp_avg_sq=torch.zeros_like(p))
                    model_sd[name] = p.detach()
                    optim_sd[WTE if name == HEAD else name] = dict(state)
                continue
            for unit in wrapper.all_units():
                params = wrapper.gather_full(unit, unit.shard)
                moments = {k: wrapper.gather_full(unit, flat_optimizer_state(unit, optimizer, k))
                           for k in ("exp_avg", "exp_avg_sq")}
                step = next((optimizer.state[p]["step"] for p in unit.opt_params if p in optimizer.state),
                            torch.tensor(0.0))
                for info in unit.infos:
                    name = info["name"]
                    model_sd |= {fqn: params[name] for fqn in info["fqns"]}
                    optim_sd[WTE if name == HEAD else name] = {"step": step.clone(),
                                                              **{k: v[name] for k, v in moments.items()}}
        if WTE in model_sd and HEAD not in model_sd and self.first_rank == self.last_rank:
            model_sd[HEAD] = model_sd[WTE]
        return {"model": {n: self._tp_placed(n, t) for n, t in model_sd.items()},
                "optim": {n: {k: t if k == "step" else self._tp_placed(n, t) for k, t in s.items()}
                          for n, s in optim_sd.items()}}

    @torch.no_grad()
    def load_sharded_state_dict(self, state, optimizer):
        """Copy the loaded pieces into the parameters and AdamW state (FSDP: this rank's shard of each unit)."""
        def local(t):
            return t.to_local() if isinstance(t, DTensor) else t

        model_sd, optim_sd = state["model"], state["optim"]
        for chunk, wrapper in zip(self.model.chunks, self.wrappers):
            if not self.fsdp:
                for name, p in chunk.named_parameters():
                    p.copy_(local(model_sd[name]))
                    for k, t in optim_sd[WTE if name == HEAD else name].items():
                        optimizer.state[p][k].copy_(local(t))
                continue
            for unit in wrapper.all_units():
                names = [i["name"] for i in unit.infos]
                unit.shard.copy_(wrapper.shard_of(unit, {n: local(model_sd[n]) for n in names}))
                opt_names = [WTE if n == HEAD else n for n in names]
                moments = {k: wrapper.shard_of(unit, {n: local(optim_sd[o][k]) for n, o in zip(names, opt_names)})
                           for k in ("exp_avg", "exp_avg_sq")}
                step = optim_sd[opt_names[0]]["step"]
                for p in unit.opt_params:
                    lo, hi = p.shard_range
                    optimizer.state[p] = {"step": step.clone(), **{k: v[lo:hi].clone() for k, v in moments.items()}}
