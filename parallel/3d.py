"""
3-D (4-D, 5-D) parallelism: data x pipeline x context x tensor parallel on one rank grid (Megatron-LM, Narayanan et
al. 2021, "Efficient Large-Scale Language Model Training on GPU Clusters Using Megatron-LM", section 3; context
parallelism as Megatron-core and Llama 3 add it; torchtitan's parallelize_llama; picotron's train.py), and expert
parallelism carved out of data x context parallel for MoE models (torchtitan, Megatron-core). The key stays `3d`,
the name users know; cp_size=1 and ep_size=1 by default.

    torchrun --standalone --nproc_per_node=8 train.py config/train_shakespeare_char_3d_custom_cpu.py
    torchrun --standalone --nproc_per_node=16 train.py config/train_shakespeare_char_4d_custom_cpu.py
    torchrun --standalone --nproc_per_node=16 train.py config/train_shakespeare_char_5d_custom_cpu.py

The grid (parallel/grid.py): world_size = dp * pp * cp * tp ranks, TP innermost, then CP, then PP, then DP,
rank = (((dp_rank * pp + pp_rank) * cp + cp_rank) * tp + tp_rank, so a TP group is consecutive ranks (one node on a
GPU cluster), a CP ring tp ranks apart (TP and CP, the two per-layer collectives, inside a node when cp * tp <= 8),
the stages of a pipeline cp * tp apart and the DP replicas pp * cp * tp apart. This is ../shared/DESIGN.md's order;
Megatron-core's default puts DP inside PP (tp-cp-dp-pp), which makes dp x cp one contiguous block, but would change
the existing 3-D layout, so the dp x cp group is a flattened sub-mesh here (RankGrid.replicas).
`print_grid(dp=2, pp=2, cp=2, tp=2)` shows it.

The composition: the 1-D strategies' own functions, applied in torchtitan's order on the grid's dimensions, each
skipped where its size is 1:
1. pipeline split (parallel/pp.py's build_stages): this rank's stages, on the meta device; at pp=1 the whole GPT;
2. tensor parallel on each over "tp" (parallel/tp.py): pytorch `apply_tp` (the DTensor plan, with sequence and loss
   parallelism), custom `apply_custom_tp` (Megatron's layers);
3. context parallel over "cp" (parallel/cp.py), cp_type "ring": custom `apply_ring_attention` (every attention core
   a ring), pytorch torch's context_parallel around each step (`cp_micro_batch`, which also splits every sequence);
   cp_type "ulysses": `apply_ulysses_attention` in both variants (every core between two all-to-alls over "cp",
   our Collectives' or torch's autograd-aware one), on the heads TP left this rank (n_head divisible by tp·cp);
   MoE layers then sum their balancing statistics over the ranks holding the rest of each sequence (`apply_moe`);
3b. expert parallel over "ep" (parallel/ep.py, ep_size > 1): each MoE layer keeps E/ep experts and dispatches its
   tokens by all-to-all over the grid's EP group, ep consecutive ranks of dp x cp (parallel/grid.py);
4. data parallel on each over "dp" x "cp" (the ranks holding the same weights): pytorch `apply_fsdp` (FSDP2,
   dp_type="fsdp") or `apply_replicate` (dp_type="ddp"); custom `FullyShardedDataParallel` or `DataParallel`;
   with dp_type="ddp", zero_stage 1 or 2 (parallel/ddp.py) shards the optimizer state (and the gradients): custom
   `ZeroDataParallel`, pytorch FSDP2 without resharding after forward for stage 2 (no stage 1: PyTorch's
   ZeroRedundancyOptimizer takes no DTensor parameters); each leaves expert-parallel experts alone (ignored_params):
   their gradients are summed over edp and divided by dp·cp in sync_gradients (parallel/ep.py's
   reduce_expert_grads), their checkpoints Shard(0) over "ep" (ZeRO-1/2 with ep > 1: a one-line error);
5. materialise: every parameter gets its slice of the full model's init, so every grid starts from single's weights;
6. pipeline schedule over "pp" (pp > 1): parallel/pp.py's PytorchPipeline or CustomPipeline, which drives the
   data-parallel wrappers' gradient sync (once per step, in each stage's last backward).

Across dimensions:
- data: TP and CP peers (and the stages of one pipeline) read the same micro-batches, DP ranks different ones; the
  global batch is batch_size (micro-batch) x micro-batches per pipeline x dp. CP ranks take their zigzag share of
  every sequence, at its global positions.
- gradients are reduced over dp x cp, and divided by the number of micro-batches, so they are the single device's on
  the global batch. The tied embedding/head gradient is summed over the first and last stage. With sequence
  parallelism the gradients of the norms and row-parallel biases are also summed over TP.
- the gradient norm counts every element once (parallel.clip_grad_norm_ over the world): each parameter's global
  form (a DTensor) says on which ranks it is replicated, and it counts on the first replica.
- the logged loss is the mean over micro-batches (last stage) and dp x cp, on every rank.
Communication per step = the sum of the 1-D formulas on each group (tests/test_3d.py checks it exactly for 3-D).
"""

import torch
from torch.distributed.tensor import Replicate

from kernels.comm import TorchCollectives
from model import GPT, MoE
from parallel import Strategy, as_dtensor, full_shapes, is_first_replica, materialize, register, slice_init
from parallel.checkpoint import HEAD, load_parameters_state, parameters_state
from parallel.cp import apply_cp_attention, apply_ulysses_attention, check_cp_config, cp_micro_batch
from parallel.ddp import DataParallel, ZeroDataParallel, apply_replicate, check_zero_stage, gather_after_step
from parallel.ep import (CollectivesExchange, TorchExchange, apply_ep, check_ep_config, ep_local_slice,
                         expert_global_tensor, is_expert_param, materialize_experts, reduce_expert_grads)
from parallel.fsdp import (LOW_PRECISION, FullyShardedDataParallel, apply_fsdp, flat_state, fsdp2_no_sync,
                           load_flat_state, mixed_precision, reshard_after_forward, reshard_fsdp2)
from parallel.grid import print_grid, resolve_sizes  # noqa: F401 (print_grid: for the command line)
from parallel.pp import CustomPipeline, LocalStages, PytorchPipeline, build_stages, check_pipeline
from parallel.tp import (all_reduce_flat, apply_custom_tp, apply_tp, check_tp_config,
                         is_sequence_parallel_param, loss_parallel_context, match_grad_placements, shard_dim,
                         tp_local_slice, tp_placement)


class Parallel3D(Strategy):
    """What both variants share: the grid's sizes from cfg.dp_size / pp_size / cp_size / tp_size (0: dp takes the
    rest, the others are 1), checked with dp_type and zero_stage, sequence and context parallelism and the pipeline
    config before any collective (one-line ValueErrors), then the grid; the stages (or the GPT) this rank builds.
    Data parallelism's wrapper runs over the dp x cp ranks (`replicas`: they hold the same weights). `zero`: the ZeRO
    stage of dp_type="ddp" (0, 1, 2); with dp_type="fsdp" it is 0 and the wrapper ZeRO-3."""

    sharded = True

    def __init__(self, cfg, device):
        super().__init__(cfg, device)
        self.sizes = resolve_sizes(self.world_size, cfg.dp_size, cfg.pp_size, cfg.cp_size, cfg.tp_size, cfg.ep_size)
        dp, pp, cp, tp = (self.sizes[d] for d in ("dp", "pp", "cp", "tp"))
        self.replicas, self.ep = dp * cp, self.sizes["ep"]
        if cfg.dp_type not in ("ddp", "fsdp"):
            raise ValueError(f"dp_type must be 'ddp' or 'fsdp', got {cfg.dp_type!r}")
        if cfg.dp_type == "fsdp" and cfg.zero_stage:
            raise ValueError(f"zero_stage={cfg.zero_stage} applies to dp_type='ddp'; dp_type='fsdp' is ZeRO-3 already")
        self.zero = check_zero_stage(cfg, custom=self.variant != "pytorch") if cfg.dp_type == "ddp" else 0
        if self.zero and self.ep > 1:
            raise ValueError(f"zero_stage={self.zero} with ep_size={self.ep} is not supported: ZeRO-1/2 would shard "
                             f"the expert-parallel experts too; use dp_type='fsdp' (the experts stay whole) or "
                             f"zero_stage=0")
        self.sp, self.lp = cfg.sequence_parallel and tp > 1, cfg.loss_parallel and tp > 1
        if self.sp and cfg.block_size % (tp * cp):
            split = f" x cp_size={cp} (each rank's share of the sequence is split over tp)" if cp > 1 else ""
            raise ValueError(f"sequence parallel: block_size={cfg.block_size} is not divisible by tp_size={tp}{split}")
        self.reshard_after_forward = reshard_after_forward(cfg.reshard_after_forward, pipelined=pp > 1)
        self.dp_size = dp
        if pp > 1:
            check_pipeline(cfg, pp, self.grad_accum, self.variant, min_stages=1)
        self.use_grid(self.sizes)

    def build_modules(self, model_config):
        """Check the model against the TP and CP sizes, seed the RNG alike on TP peers (their dropout masks must
        agree), and return this rank's {stage: StageModule} on the meta device ({0: GPT} at pp=1)."""
        check_tp_config(model_config, self.sizes["tp"], self.sp)
        check_cp_config(model_config, self.sizes["cp"], self.cfg.cp_type, self.sizes["tp"])
        check_ep_config(model_config, self.ep)
        if self.sizes["cp"] > 1:  # this rank's share of every sequence, and its positions (pp.Pipeline uses it too)
            cp_comm = self.collectives(self.grid.group("cp"))
            self.micro_batch = cp_micro_batch(self.variant, self.grid.mesh["cp"], cp_comm, self.cfg.cp_type)
        # MoE: the Collectives over the ranks holding the rest of each sequence, and expert parallelism's exchange;
        # made here, once on every rank, since making a group (or a triton heap) is collective
        self.moe_group = self.ep_exchange = None
        if model_config.n_expert and self.sizes["cp"] > 1:
            group = self.grid.sequence_group(with_tp=self.sp and self.variant != "pytorch")
            self.moe_group = TorchCollectives(group) if self.variant == "pytorch" else self.collectives(group)
        if self.ep > 1:
            group = self.grid.expert_mesh.get_group("ep")
            self.ep_exchange = (TorchExchange(group) if self.variant == "pytorch" else
                                CollectivesExchange(self.collectives(group)))
        torch.manual_seed(self.cfg.seed + self.rank // self.sizes["tp"])
        if self.sizes["pp"] == 1:
            with torch.device("meta"):
                return {0: GPT(model_config)}
        stages, self.bounds = build_stages(model_config, self.cfg, self.sizes["pp"], self.grid.coord["pp"])
        return stages

    def apply_moe(self, module):
        """The MoE layers of `module` on the grid: under context parallelism their balancing statistics are summed over
        the ranks holding the other tokens of each sequence (with custom SP the cp x tp block) and their loss share
        counts cp times (model.MoE); with ep > 1 expert parallelism over the grid's EP group (apply_ep: this rank's
        experts, all-to-all dispatch)."""
        if self.moe_group is not None:
            for m in module.modules():
                if isinstance(m, MoE):
                    m.token_group, m.loss_average = self.moe_group, self.sizes["cp"]
        if self.ep_exchange is not None:
            apply_ep(module, self.ep, self.ep_exchange)

    def expert_named_parameters(self):
        """(GPT name, tensor) of this rank's expert weights when they are expert-parallel (ep > 1), else []."""
        if self.ep == 1:
            return []
        return [(n, p) for m in self.stage_modules for n, p in m.named_parameters() if is_expert_param(n)]

    def global_tensor(self, name, t):
        if self.ep > 1 and is_expert_param(name):
            return expert_global_tensor(t, self.grid.expert_mesh, self.shapes[name])
        return t

    def run(self, model_config, stages, modules, runner):
        """self.model, and the module a step calls (pp=1) or the pipeline that runs the steps (pp > 1)."""
        self.stage_modules = list(stages.values())
        if self.sizes["pp"] == 1:
            self.model, self.module = stages[0], modules[0]
            return
        self.model = LocalStages(model_config, list(stages.values()))
        self.pipeline = runner(self, stages, modules, lambda: [p for _, p in self.named_parameters()],
                               seq_split=self.sizes["tp"] if self.sp else 1)


# ----------------------------------------------------------------------------------------------------------
# pytorch variant: DTensor TP on mesh["tp"], FSDP2 or replicate on mesh["dp"], torch.distributed.pipelining over "pp"

@register("3d", "pytorch")
class Pytorch3D(Parallel3D):
    """The composition of the module docstring with PyTorch's APIs. Not counted in stats: the collectives inside
    DTensor (TP), the pipelining schedules' send/recv, and replicate's all-reduce (no counting hook). ZeRO-2
    (dp_type="ddp", zero_stage=2) is FSDP2 with reshard_after_forward=False, as ddp/pytorch's (PytorchZero2); a
    one-line ValueError for ZeRO-1."""

    def __init__(self, cfg, device):
        super().__init__(cfg, device)
        if self.zero == 1:
            raise ValueError("3d/pytorch has no zero_stage=1: torch's ZeroRedundancyOptimizer takes no DTensor "
                             "(tensor-parallel) parameters; use variant=custom, or zero_stage=2 (FSDP2)")

    def build_model(self, model_config, weights=None):
        cfg = self.cfg
        stages = self.build_modules(model_config)
        mesh = self.grid.mesh
        self.shapes = full_shapes(model_config)
        init = slice_init(model_config, ep_local_slice(self.grid.coord["ep"], self.ep) if self.ep > 1 else None,
                          weights)
        for module in stages.values():
            if self.sizes["tp"] > 1:
                apply_tp(module, mesh["tp"], self.sp, self.lp)
            if self.sizes["cp"] > 1 and cfg.cp_type == "ulysses":  # (ring: context_parallel around each step)
                apply_ulysses_attention(module, group=self.grid.group("cp"))
            self.apply_moe(module)
            self.apply_ac(module)
            if cfg.compile:  # per block, before FSDP (torchtitan's order)
                for block in module.transformer.h.values():
                    block.compile(backend=cfg.compile_backend)
            experts = {p for n, p in module.named_parameters() if is_expert_param(n)} if self.ep > 1 else None
            if self.replicas > 1 and (cfg.dp_type == "fsdp" or self.zero == 2):  # ZeRO-2: gathered to backward
                reshard = self.reshard_after_forward and cfg.dp_type == "fsdp"
                apply_fsdp(module, self.grid.replicas, self.stats, cfg.dtype, reshard, experts)
            elif self.replicas > 1:
                for unit in [*module.transformer.h.values(), module]:
                    apply_replicate(unit, self.grid.replicas, mixed_precision(cfg.dtype), experts)
            materialize(module, self.device, init)
        self.run(model_config, stages, stages, PytorchPipeline)
        return self.model

    def loss_context(self):
        return loss_parallel_context(self.lp)

    def no_sync(self):
        return fsdp2_no_sync(self.model) if self.replicas > 1 else super().no_sync()

    def eval_loss(self, x, y):
        loss = super().eval_loss(x, y)
        reshard_fsdp2(self.model)  # inside a pipeline FSDP2 does not reshard after forward
        return loss

    def sync_gradients(self):
        match_grad_placements(p for _, p in self.named_parameters())
        if self.ep > 1:  # the experts, left out of FSDP2 / replicate: summed over edp, over dp x cp's mean
            reduce_expert_grads([p for _, p in self.expert_named_parameters()], self.replicas,
                                group=self.grid.expert_mesh.get_group("edp") if self.replicas > self.ep else None)


# ----------------------------------------------------------------------------------------------------------
# custom variant: parallel/tp.py's layers, parallel/ddp.py's or parallel/fsdp.py's wrapper, parallel/pp.py's schedules

@register("3d", "custom", "triton", "nccl", "cuda")
class Custom3D(Parallel3D):
    """The composition of the module docstring written out, over this variant's Collectives. With FSDP (or ZeRO-1/2)
    the tied embedding and head are units (buckets) of their own on the first and last stage, so the two copies have
    the same flat layout and their sharded gradients are summed shard by shard. `flat`: the DP wrapper keeps flat
    shards (FullyShardedDataParallel or ZeroDataParallel), whose optimizer views, norm pieces and checkpoint state
    the strategy exposes."""

    def build_model(self, model_config, weights=None):
        cfg, tp = self.cfg, self.sizes["tp"]
        stages = self.build_modules(model_config)
        self.tp_comm, self.dp_comm = self.collectives(self.grid.group("tp")), self.collectives(self.dp_group)
        self.fsdp = cfg.dp_type == "fsdp" and self.replicas > 1
        self.flat = (self.fsdp or self.zero > 0) and self.replicas > 1
        self.shapes = full_shapes(model_config)
        # sequence-parallel gradients summed over TP (expert-parallel experts: with the expert reduction instead)
        self.sp_names = {n for n in self.shapes if self.sp and is_sequence_parallel_param(n)
                         and not (self.ep > 1 and is_expert_param(n))}
        local_slice = tp_local_slice(self.tp_comm) if tp > 1 else None
        init = slice_init(model_config, ep_local_slice(self.grid.coord["ep"], self.ep, local_slice)
                          if self.ep > 1 else local_slice, weights)
        modules, head_loss = {}, None
        for s, module in stages.items():
            loss = apply_custom_tp(module, self.tp_comm, self.sp, self.lp) if tp > 1 else None
            if loss is not None:  # vocab-parallel cross-entropy: the GPT's (pp=1), or the last stage's (below)
                module.loss = head_loss = loss
            if self.sizes["cp"] > 1:
                apply_cp_attention(module, self.collectives(self.grid.group("cp")), cfg.cp_type)
            self.apply_moe(module)
            self.apply_ac(module)
            if self.fsdp:
                experts = materialize_experts(module, self.device, init) if self.ep > 1 else []
                first, last = "wte" in module.transformer, hasattr(module, "lm_head")
                units = ([module.transformer.wte] if first and not last else []) + list(module.transformer.h.values()) \
                    + ([module.lm_head] if last and not first else [])
                modules[s] = FullyShardedDataParallel(
                    module, units, self.dp_comm, compute_dtype=LOW_PRECISION.get(cfg.dtype, torch.float32),
                    reshard_after_forward=self.reshard_after_forward, init_fn=init, device=self.device,
                    ignored_params=experts)
                modules[s].pre_reduce_scatter = self._sum_sequence_parallel_grads
            elif self.flat:  # ZeRO-1/2: a pipeline's tied embedding / head copy in a bucket of its own
                materialize(module, self.device, init)
                tied = [m.weight for m in (getattr(module.transformer, "wte", None), getattr(module, "lm_head", None))
                        if m is not None and self.sizes["pp"] > 1]
                modules[s] = ZeroDataParallel(module, self.dp_comm, self.zero, cfg.bucket_cap_mb, alone=tied)
                modules[s].pre_reduce_scatter = self._sum_sequence_parallel_grads
            else:
                materialize(module, self.device, init)
                experts = [p for n, p in module.named_parameters() if is_expert_param(n)] if self.ep > 1 else []
                modules[s] = DataParallel(module, self.dp_comm, cfg.bucket_cap_mb, ignored_params=experts) \
                    if self.replicas > 1 else module
        self.wrappers = list(modules.values())
        self.run(model_config, stages, modules, CustomPipeline)
        if self.pipeline is not None:
            self.pipeline.loss_fn = head_loss or self.pipeline.loss_fn
            if self.flat and self.pipeline.holds_tied:  # the unit (bucket) of the embedding / head copy
                first = self.pipeline.pp_rank == self.pipeline.first_rank
                wrapper = modules[min(stages)] if first else modules[max(stages)]
                unit = ((wrapper.units[0] if first else wrapper.units[-1]) if self.fsdp
                        else wrapper.bucket_of(self.pipeline.tied_param))
                self.pipeline.tied_param = unit.opt_params[0] if unit.opt_params else None
        return self.model

    def named_parameters(self):
        if self.flat:  # the flat shards, and the expert-parallel experts FSDP leaves alone
            return [(unit.name, p) for w in self.wrappers for unit in w.all_units() for p in unit.opt_params] + \
                self.expert_named_parameters()
        return super().named_parameters()

    def configure_optimizer(self):
        optimizer = super().configure_optimizer()
        return gather_after_step(optimizer, self.wrappers) if self.flat and not self.fsdp else optimizer

    # --- one step: sequence-parallel gradients, summed over TP ------------------------------------------------

    def sync_gradients(self):
        """After the DP wrapper's reductions: DDP (or no DP), the gradients of the SP parameters, DP-averaged, summed
        over TP in one all-reduce (FSDP and ZeRO sum them before their reduce-scatter: _sum_sequence_parallel_grads);
        then the expert-parallel experts' (parallel/ep.py): with SP summed over TP (each TP rank routed its part of
        the sequence), summed over edp, divided by dp·cp."""
        super().sync_gradients()
        if self.sp_names and not self.flat:
            all_reduce_flat([p.grad for n, p in self.named_parameters() if n in self.sp_names and p.grad is not None],
                            self.tp_comm)
        if self.ep > 1:
            experts = [p for _, p in self.expert_named_parameters()]
            if self.sp:
                all_reduce_flat([p.grad for p in experts if p.grad is not None], self.tp_comm)
            edp = self.collectives(self.grid.expert_mesh.get_group("edp")) if self.replicas > self.ep else None
            reduce_expert_grads(experts, self.replicas, comm=edp)

    def _sum_sequence_parallel_grads(self, unit):
        """FSDP's (ZeRO's) pre-reduce-scatter hook: sum over TP the unsharded gradients of the SP parameters of `unit`
        (a bucket)."""
        all_reduce_flat([unit.grad_acc[i["offset"]:i["offset"] + i["numel"]]
                         for i in unit.infos if i["name"] in self.sp_names], self.tp_comm)

    # --- the norm's pieces and the state: each parameter's global form on the dp x tp sub-mesh ----------------

    def global_tensor(self, name, t):
        """t (this rank's TP piece of `name`) as a DTensor on the dp x tp sub-mesh: Replicate over dp (DDP replicas, or
        an FSDP unit gathered for a checkpoint), Shard(d) or Replicate over tp; an expert-parallel expert weight on the
        expert mesh (parallel/ep.py)."""
        if self.ep > 1 and is_expert_param(name):
            return super().global_tensor(name, t)
        return as_dtensor(t, self.grid.mesh["dp", "tp"], [Replicate(), tp_placement(name)], self.shapes[name])

    def gradients(self):
        if not self.flat:
            return super().gradients()
        tp_rank = self.grid.coord["tp"]
        return [(g, name != HEAD and (shard_dim(name) is not None or tp_rank == 0))  # every DP shard counts
                for w in self.wrappers for name, g in w.gradient_pieces()] + \
            [(p.grad, is_first_replica(self.global_tensor(n, p), self.grid))
             for n, p in self.expert_named_parameters() if p.grad is not None]

    def state_dict(self, optimizer):
        if not self.flat:
            return super().state_dict(optimizer)
        state = parameters_state(self.expert_named_parameters(), optimizer, self.global_tensor, tied_head=False)
        for w in self.wrappers:
            part = flat_state(w, optimizer, self.global_tensor)
            state["model"] |= part["model"]
            state["optim"] |= part["optim"]
        return state

    def load_state_dict(self, state, optimizer):
        if not self.flat:
            return super().load_state_dict(state, optimizer)
        load_parameters_state(self.expert_named_parameters(), state, optimizer)
        for w in self.wrappers:
            load_flat_state(w, state, optimizer, lambda t: t.to_local())
            if not self.fsdp:
                w.all_gather_params()
