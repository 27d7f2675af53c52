"""
3-D parallelism, `pytorch` variant: PyTorch's native APIs composed on parallel/3d.py's rank grid, in torchtitan's
order of application (torchtitan, Liang et al. 2024, "TorchTitan: One-stop PyTorch native solution for production
ready LLM pre-training", section 3.1; its parallelize_llama / pipeline_llama):

    torchrun --standalone --nproc_per_node=8 train.py config/train_shakespeare_char_3d_pytorch_cpu.py

1. pipeline split: this rank builds only its virtual stages (parallel/pp.py's StageModule), on the meta device;
2. tensor parallel: each stage gets the DTensor plan of parallel/tp.py (`pytorch_tp_plan`, `parallelize_module`)
   on the "tp" sub-mesh, with sequence parallelism (residual stream Shard(1)) and loss parallelism (vocab-sharded
   logits, `loss_parallel()`) when configured;
3. data parallel over the "dp" sub-mesh: FSDP2 (`fully_shard` per block, then per stage, dp_type="fsdp"), or DDP
   (dp_type="ddp") as torch.distributed._composable.replicate_with_fsdp's `replicate`: FSDP2's machinery without
   sharding (gradients all-reduced), which takes DTensor TP parameters and which the pipelining schedules drive
   exactly like FSDP2 (DistributedDataParallel would need the TP parameters converted to local tensors first);
4. materialise: every DTensor gets its slice of the full model's init (model.init_parameter_ on the full tensor,
   then `distribute_tensor(..., src_data_rank=None)`: no communication), so every grid starts from the single
   model's weights;
5. pipeline schedule: torch.distributed.pipelining's PipelineStage per stage over the "pp" group, and the schedule
   class of cfg.pp_schedule (parallel/pp.py's PytorchPipeline). The schedule knows FSDP2 modules: gradients are
   not reduced before the last micro-batch's backward, then reduce-scattered over dp once per step, and divided
   by the number of micro-batches.

A dimension of size 1 is skipped (no TP plan at tp=1, no FSDP at dp=1); pp=1 is a one-stage pipeline.

Across dimensions (as in parallel/3d.py's docstring): TP peers read the same micro-batches, DP ranks different ones
(global batch = batch_size x micro-batches per pipeline x dp); gradients are averaged over dp by FSDP's
reduce-scatter (or replicate's all-reduce) and divided by the micro-batches by the schedule; the tied
embedding/head gradient is summed over the first and last stage (DTensor grads of identical placements: their
local shards); the gradient norm counts every element once (below); the logged loss is the last stage's mean over
micro-batches, broadcast over pp and averaged over dp.

Communication counted in strategy.stats (tests/test_3d_pytorch.py checks it per step): FSDP2's all-gathers and
reduce-scatters on dp (parallel/fsdp.py's counting hooks): with reshard_after_forward=False the 1-D formula of this
rank's TP-local stage parameters Ψ, one all-gather and one reduce-scatter of Ψ per step, since the schedule keeps
the units gathered from the first forward to the last backward (with reshard_after_forward=True each micro-batch's
forward gathers again: (m+1)Ψ all-gathered, measured); the pipeline group's tied-gradient exchange (this rank's
shard, both ways) and loss broadcast (4 bytes, parallel/pp.py); clipping's one-scalar all-reduce. Not counted: the
collectives inside DTensor (TP), the pipelining schedules' activation send/recv, and replicate's all-reduce (it has
no counting hook).
"""

import contextlib
import importlib

import torch
import torch.distributed as dist
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor, distribute_tensor
from torch.distributed.tensor.parallel import loss_parallel, parallelize_module

from model import init_parameter_
from parallel import register
from parallel.fsdp import LOW_PRECISION, CountingAllGather, CountingReduceScatter
from parallel.pp import HEAD, WTE, LocalStages, PytorchPipeline, StageModule, cross_entropy, split_layers, stage_costs
from parallel.tp import check_tp_config, full_shapes, pytorch_tp_plan

RankGrid = importlib.import_module("parallel.3d").RankGrid
DP_TYPES = ("fsdp", "ddp")


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
class Pytorch3D(PytorchPipeline):
    """DTensor TP on grid.mesh["tp"], torch.distributed.pipelining over grid.pp_group, FSDP2 (or replicate) on
    grid.mesh["dp"] (module docstring). Config: dp_size, pp_size, tp_size (0: dp takes the rest, pp and tp 1),
    dp_type, sequence_parallel, loss_parallel, pp_schedule, pp_virtual_stages, gradient_accumulation_steps (global
    micro-batches: each pipeline runs gradient_accumulation_steps / dp of them), batch_size (the micro-batch).
    Raises ValueError (one line) for a grid that is not the world size, an unknown dp_type, a model TP cannot split
    (build_model), or any configuration the pipeline rejects (parallel/pp.py)."""

    min_stages = 1  # pp=1 is a one-stage pipeline

    def __init__(self, cfg, device):
        world = dist.get_world_size() if dist.is_initialized() else 1
        dp, pp, tp = RankGrid.check(world, cfg.dp_size, cfg.pp_size, cfg.tp_size)  # before any communication
        if cfg.dp_type not in DP_TYPES:
            raise ValueError(f"dp_type must be one of {', '.join(DP_TYPES)}, got {cfg.dp_type!r}")
        if cfg.sequence_parallel and cfg.block_size % tp:
            raise ValueError(f"sequence parallel: block_size={cfg.block_size} is not divisible by tp_size={tp}")
        self.grid = RankGrid(dp, pp, tp, device.type)
        super().__init__(cfg, device)
        self.tp_size = tp
        self.sequence_parallel = cfg.sequence_parallel and tp > 1
        self.loss_parallel = cfg.loss_parallel and tp > 1
        if self.loss_parallel:
            self.loss_fn = self._loss_parallel_cross_entropy

    def data_parallel(self):
        return self.grid.dp_rank, self.grid.dp, self.grid.dp_group

    def pp_process_group(self):
        return self.grid.pp_group

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

    def activation_shape(self, x):
        """(B, T, n_embd), or with sequence parallelism this rank's piece of the sequence (B, T/tp, n_embd)."""
        B, T = x.shape
        return B, T // self.tp_size if self.sequence_parallel else T, self.model.config.n_embd

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
