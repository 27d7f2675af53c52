"""
The registry of parallel strategies, and the seam between train.py and a strategy.

Each file parallel/<strategy>.py first exports the functions that apply its parallelism to a model (or a pipeline
stage) on a process group or DeviceMesh dimension, the PyTorch-native way and then written out by hand, and then
registers a thin Strategy for its 1-D use:

    @register("ddp", "custom", "triton", "nccl", "cuda")
    class CustomDDP(Strategy): ...

parallel/3d.py composes the same functions on one rank grid (parallel/grid.py). The config picks a strategy with
`parallel = "ddp"` and `variant = "custom"`. Variants, the same strategy at four levels of abstraction: "pytorch"
(PyTorch's native API), "custom" (the algorithm written out over the Collectives of kernels/comm.py), "triton" and
"nccl" (the same custom algorithm over the Collectives of kernels/triton_comm.py and kernels/nccl.py: one class is
registered for all three, and `Strategy.collectives` hands it the backend its variant names).
`python -c "import parallel; print(parallel.available())"` lists what exists.

train.py never branches on the strategy. It asks the Strategy for everything that differs: building the model,
which data-parallel slice of the global batch this rank reads (dp_rank, dp_size), one optimizer step's forward and
backward over the micro-batches, gradient-norm clipping, the loss averaged for logging, eval, and checkpoints.
What is the same for every strategy lives here, once: the micro-batch loop (or the pipeline's schedule), clipping
(each strategy only says which gradients count on which rank), the logged-loss reduction, eval, and the model and
optimizer state behind checkpoints (parallel/checkpoint.py).
"""

import contextlib
import functools
import importlib
import os
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor

from kernels.comm import CommStats, TorchCollectives, check_backend_serves  # noqa: F401
from kernels.comm import init_distributed, teardown  # noqa: F401 (re-exported for entry points)
from model import GPT, init_parameter_, moe_stats
from parallel import checkpoint
from parallel.checkpoint import HEAD, WTE, load_checkpoint_file  # noqa: F401 (re-exported)
from parallel.grid import RankGrid

_REGISTRY = {}


def register(strategy, *variants):
    """Decorator: the Strategy subclass implements `strategy` in each of `variants` (or a function (cfg, device) ->
    Strategy does, choosing the class from the config: ddp's zero_stage, parallel/ddp.py)."""
    def decorate(cls):
        for variant in variants:
            _REGISTRY[(strategy, variant)] = cls
        cls.strategy = strategy
        return cls
    return decorate


def available():
    """All registered (strategy, variant) pairs, sorted; imports every parallel/*.py (names like "3d" too)."""
    for path in sorted(Path(__file__).parent.glob("*.py")):
        if path.stem != "__init__":
            importlib.import_module(f"parallel.{path.stem}")
    return sorted(_REGISTRY)


def build_strategy(cfg, device):
    """Construct the Strategy that cfg.parallel and cfg.variant name.

    cfg: the training config (attributes as in train.py's defaults); device: torch.device of this rank.
    Raises ValueError, before any collective, for an unknown pair (listing those that exist), an unusable backend
    (nccl without a GPU), or a gradient_accumulation_steps that the data-parallel size does not divide.
    """
    pairs = available()
    key = (cfg.parallel, cfg.variant)
    if key not in _REGISTRY:
        listing = ", ".join(f"{s}/{v}" for s, v in pairs)
        raise ValueError(f"no strategy parallel={cfg.parallel!r} variant={cfg.variant!r}; available: {listing}")
    strategy = _REGISTRY[key](cfg, device)
    if cfg.gradient_accumulation_steps % strategy.dp_size:
        raise ValueError(f"gradient_accumulation_steps={cfg.gradient_accumulation_steps} is the global number of "
                         f"micro-batches and must be divisible by the data-parallel size {strategy.dp_size}")
    return strategy


def backend(variant):
    """The Collectives class of a variant: comm.TorchCollectives for "custom", kernels/triton_comm.py's for "triton",
    kernels/nccl.py's for "nccl" (libnccl) and "cuda" (the same binding over libnanoccl, our own NCCL in
    kernels/cuda/); imported only when asked for: triton, libnccl and nvcc are heavy or absent."""
    if variant == "triton":
        from kernels.triton_comm import TritonCollectives
        return TritonCollectives
    if variant == "nccl":
        from kernels.nccl import NCCLCollectives
        return NCCLCollectives
    if variant == "cuda":
        from kernels.nccl import CudaCollectives
        return CudaCollectives
    return TorchCollectives


# -----------------------------------------------------------------------------
# what every strategy shares

@torch.no_grad()
def clip_grad_norm_(grads, max_norm, counted=None, comm=None, device=None):
    """Scale gradients so that the L2 norm of the whole model's gradient is at most max_norm; return that norm (0-dim,
    the same on every rank), as torch.nn.utils.clip_grad_norm_ (get_total_norm, then clip_grads_with_norm_'s
    coefficient) does on one device, and torchtitan's dist_utils.clip_grad_norm_ across parallelisms.

    grads: this rank's local gradient tensors (plain tensors: DTensors' local shards), every one of which is scaled;
    counted: those whose elements this rank counts in the norm (default: all), chosen by the strategy so that every
    element of the full gradient is counted on exactly one rank; comm: Collectives over which the ranks' squared
    norms are summed (None: this rank holds the whole gradient, as in single and DDP). max_norm=inf only measures.
    """
    counted = grads if counted is None else counted
    norm = torch.nn.utils.get_total_norm(counted) if counted else torch.zeros(())
    if comm is not None:
        square = norm.float().pow(2)
        comm.all_reduce(square)
        norm = square.sqrt()
    coef = torch.clamp(max_norm / (norm + 1e-6), max=1.0)
    for g in grads:
        g.mul_(coef.to(g.device, g.dtype))
    return norm


def is_first_replica(tensor, grid):
    """Whether this rank counts `tensor` (a DTensor, or a plain tensor) once in a sum over all ranks of a grid: it is
    split over the mesh dims where its placement is not Replicate, and replicated over every other dim of the grid
    but pp (a plain tensor: over all of them), so it counts on coordinate 0 of those. The pipeline dimension holds
    different stages, not copies. A tensor split over "ep" (an expert weight, parallel/ep.py) is split over dp x cp's
    EP groups and replicated over the rest of dp x cp ("edp")."""
    split = set()
    if isinstance(tensor, DTensor):  # a flattened mesh dim ("dp_cp") splits over each of its dims
        for name, placement in zip(tensor.device_mesh.mesh_dim_names, tensor.placements):
            split |= set() if placement.is_replicate() else set(name.split("_"))
    if "ep" in split:
        return all(grid.coord[dim] == 0 for dim in ("edp", "tp") if dim not in split)
    return all(grid.coord[dim] == 0 for dim in ("dp", "cp", "tp") if dim not in split)


@contextlib.contextmanager
def skipping_sync(wrapper):
    """Clear wrapper.require_sync for the backwards run inside: our data-parallel wrappers' no_sync() (gradients
    accumulate locally, no communication)."""
    wrapper.require_sync = False
    try:
        yield
    finally:
        wrapper.require_sync = True


def local_bytes(tensors):
    """Bytes of memory behind `tensors` on this rank (plain tensors, or DTensors: their local shard), each storage
    counted once however many views of it are listed (a flat shard and its parameter views)."""
    storages = {}
    for t in tensors:
        if t is not None:
            t = t.to_local() if isinstance(t, DTensor) else t
            storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
    return sum(storages.values())


def as_dtensor(local, mesh, placements, shape):
    """A DTensor of global `shape` (contiguous) whose piece on this rank is `local`, laid out by `placements` on
    `mesh`: how a custom variant presents its shards to DCP and to clip_grad_norm_ (no communication)."""
    return DTensor.from_local(local, mesh, placements, run_check=False, shape=shape,
                              stride=torch.empty(shape, device="meta").stride())


def materialize(module, device, init):
    """Allocate the parameters of a GPT-like module built on the meta device on `device` and give each its initial
    value: init(GPT name, tensor) fills it (with a DTensor, its local shard; see slice_init). A head tied to the
    embedding stays tied (to_empty unties shared parameters)."""
    tied = hasattr(module, "lm_head") and "wte" in module.transformer and (
        module.lm_head.weight is module.transformer.wte.weight)
    module.to_empty(device=device)
    if tied and module.lm_head.weight is not module.transformer.wte.weight:
        module.lm_head.weight = module.transformer.wte.weight
    with torch.no_grad():
        for name, p in module.named_parameters():
            init(name, p)


def local_part(full, dtensor):
    """The part of the full tensor `full` that `dtensor` holds on this rank: each mesh dim that shards it, innermost
    first, keeps its torch.chunk (DTensor's split rule). Innermost first is how FSDP2 shards a tensor-parallel
    parameter (its dim-0 chunk of the TP-local tensor, DTensor's _StridedShard); distribute_tensor(src_data_rank=None)
    computes the same locally for even splits but not for uneven ones (the 65-row vocabulary over tp=2, then dp=4)."""
    coordinate = dtensor.device_mesh.get_coordinate()
    for i in reversed(range(dtensor.device_mesh.ndim)):
        dim = getattr(dtensor.placements[i], "dim", None)  # Shard and _StridedShard have one, Replicate does not
        if dim is not None:
            chunks = torch.chunk(full, dtensor.device_mesh.size(i), dim=dim)
            full = chunks[coordinate[i]] if coordinate[i] < len(chunks) else full.narrow(dim, 0, 0)
    return full


def full_shapes(model_config):
    """{name: shape} of every parameter of the unsharded GPT, lm_head.weight included (the tied embedding's)."""
    with torch.device("meta"):
        shapes = {name: p.shape for name, p in GPT(model_config).named_parameters()}
    shapes[HEAD] = shapes[WTE]
    return shapes


def slice_init(model_config, local_slice=None, weights=None):
    """init(name, tensor) for materialize: the tensor receives its part of the full GPT's initial value, so every
    layout starts from the single model's weights. The full value is weights[name] if a source of full tensors is
    given ({GPT name: tensor}, e.g. GPT-2's converted by tools/hf.py; the head reads the tied embedding's), else
    model.init_parameter_'s. A DTensor keeps the slice its placements select (local_part: no communication); a
    plain tensor the slice local_slice(name, full) picks (custom tensor parallelism), else all of it. The head's copy
    in a pipeline gets the tied embedding's value. Raises KeyError naming a parameter that `weights` lacks,
    ValueError for one of another shape."""
    shapes = full_shapes(model_config)

    def init(name, tensor):
        source = WTE if name == HEAD else name
        if weights is None:
            full = torch.empty(shapes[name])
            init_parameter_(source, full, model_config)
        else:
            if source not in weights:
                raise KeyError(f"the initial weights have no tensor {source!r}")
            full = weights[source].detach().to("cpu", torch.float32)
            if full.shape != shapes[name]:
                raise ValueError(f"initial weight {source} has shape {tuple(full.shape)}, the model's is "
                                 f"{tuple(shapes[name])}")
        if isinstance(tensor, DTensor):
            full, tensor = local_part(full.to(tensor.device), tensor), tensor.to_local()
        elif local_slice is not None:
            full = local_slice(name, full)
        tensor.copy_(full)
    return init


AC_MODES = ("none", "full", "selective")

# torchtitan's op-level selective checkpointing policy (torchtitan/models/llama3/parallelize.py, _op_sac_save_list):
# the outputs of these ops are kept for backward, everything else (norms, GELU, adds, softmax's pieces) is recomputed.
# Matmuls are aten.mm, or aten.addmm when the linear has a bias; the CPU attention kernel is the flash one for CPU.
_SAC_SAVE = {torch.ops.aten.mm.default, torch.ops.aten.addmm.default,
             torch.ops.aten._scaled_dot_product_efficient_attention.default,
             torch.ops.aten._scaled_dot_product_flash_attention.default,
             torch.ops.aten._scaled_dot_product_flash_attention_for_cpu.default,
             torch.ops.aten._scaled_dot_product_cudnn_attention.default,
             torch.ops._c10d_functional.reduce_scatter_tensor.default,
             torch.ops.aten.max.default}
_MATMULS = (torch.ops.aten.mm.default, torch.ops.aten.addmm.default)


def _op_sac_context():
    """context_fn of torch.utils.checkpoint for one checkpointed call: torchtitan's op policy, which saves the outputs
    of _SAC_SAVE except every second matmul (recomputing half of them halves what the matmuls keep)."""
    from torch.utils.checkpoint import CheckpointPolicy, create_selective_checkpoint_contexts
    counts = {"forward": 0, "recompute": 0}

    def policy(ctx, func, *args, **kwargs):
        mode = "recompute" if ctx.is_recompute else "forward"
        if func in _MATMULS:
            counts[mode] += 1
        save = func in _SAC_SAVE and not (func in _MATMULS and counts[mode] % 2 == 0)
        return CheckpointPolicy.MUST_SAVE if save else CheckpointPolicy.PREFER_RECOMPUTE
    return create_selective_checkpoint_contexts(policy)


def check_ac(mode, selective_option="op"):
    """Raise ValueError (one line) unless mode is one of AC_MODES and selective_option "op" or a positive integer."""
    if mode not in AC_MODES:
        raise ValueError(f"activation_checkpoint must be one of {', '.join(AC_MODES)}, got {mode!r}")
    if selective_option != "op" and not (selective_option.isdigit() and int(selective_option) > 0):
        raise ValueError(f"selective_ac_option must be 'op' or a positive integer N (every N-th block), "
                         f"got {selective_option!r}")


def apply_ac(module, mode, selective_option="op"):
    """Activation checkpointing (Chen et al. 2016, "Training Deep Nets with Sublinear Memory Cost"; torchtitan's
    apply_ac) on the transformer blocks of `module`, a GPT or a pipeline stage (module.transformer.h, keyed by the
    GPT's layer index). A checkpointed block keeps only its inputs in forward and is run again in backward
    (torch.utils.checkpoint, non-reentrant, RNG state preserved: the same dropout masks).
    mode "none": nothing; "full": every block; "selective": with selective_option "op", every block under
    torchtitan's op-level policy (torch.utils.checkpoint's selective checkpointing: the matmul and attention outputs
    are saved, the rest recomputed), with an integer N every N-th block of the GPT (layers N-1, 2N-1, ... whatever
    the pipeline split), fully. Applied after tensor parallelism and before data-parallel wrappers (torchtitan's
    order). The block's forward is replaced in place (an instance attribute calling the original through
    checkpoint, keyword arguments such as `pos` passed through), so no wrapper module appears and parameter names
    and state_dict keys are unchanged; its forward hooks (FSDP's gather, TP's input hooks) stay outside the
    recomputed part; the block gets `recomputes_in_backward = True` (our FSDP then gathers it before its backward).
    Raises ValueError (one line) for an unknown mode or option."""
    check_ac(mode, selective_option)
    if mode == "none":
        return module
    from torch.utils.checkpoint import checkpoint
    for name, block in module.transformer.h.items():
        if getattr(block, "recomputes_in_backward", False):
            continue
        options = dict(use_reentrant=False)
        if mode == "selective" and selective_option == "op":
            options["context_fn"] = _op_sac_context
        elif mode == "selective" and (int(name) + 1) % int(selective_option):
            continue
        block.forward = functools.partial(checkpoint, block.forward, **options)
        block.recomputes_in_backward = True
    return module


# -----------------------------------------------------------------------------
# the seam

class Strategy:
    """How one parallel strategy trains the GPT, as train.py sees it. This base class is the replicated case (every
    rank holds the whole model and reads its own slice of the global batch) and everything strategies share.

    A subclass sets, in __init__, the rank grid (`self.grid`, parallel/grid.py) when it has one, and builds in
    build_model: `self.model`, the bare module whose parameters carry the GPT's names (a GPT, or this rank's pipeline
    stages); `self.module`, what a forward calls (a data-parallel wrapper around the model, or the model); and for a
    pipeline `self.pipeline` (parallel/pp.py), which then runs every step and eval.

    Attributes: rank, world_size; dp_rank, dp_size (this rank's data-parallel coordinate: ranks with the same dp_rank
    read the same data); dp_group (over which the logged loss is averaged; None: the world); is_logger (this rank
    prints, writes wandb and metrics); stats (CommStats of the collectives this strategy's algorithm issued).
    """

    strategy = None  # set by @register
    sharded = False  # True: no rank holds the whole model's state (DCP checkpoints; the norm is all-reduced)

    @property
    def checkpoint_name(self):
        """The checkpoint in out_dir: one file (replicated state) or a DCP directory (sharded state)."""
        return "ckpt" if self.sharded else "ckpt.pt"

    def __init__(self, cfg, device):
        self.cfg, self.device, self.variant = cfg, device, cfg.variant
        check_backend_serves(device)  # no CUDA tensor through gloo (DTensor bookkeeping, torch collectives)
        if self.variant in ("triton", "nccl", "cuda"):
            backend(self.variant).check_available(device)  # one line (nccl, cuda without a GPU), before any collective
        self.rank = dist.get_rank() if dist.is_initialized() else 0
        self.world_size = dist.get_world_size() if dist.is_initialized() else 1
        self.dp_rank, self.dp_size, self.dp_group = self.rank, self.world_size, None
        self.is_logger = self.rank == 0
        self.grid = self.model = self.module = self.pipeline = None
        self.stats = CommStats()
        self._comms = {}
        dtypes = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
        if cfg.dtype not in dtypes:
            raise ValueError(f"dtype must be one of {', '.join(dtypes)}, got {cfg.dtype!r}")
        ptdtype = dtypes[cfg.dtype]
        self.autocast = (contextlib.nullcontext if ptdtype == torch.float32 else
                         lambda: torch.autocast(device_type=device.type, dtype=ptdtype))
        check_ac(cfg.activation_checkpoint, cfg.selective_ac_option)

    def use_grid(self, sizes):
        """Build the rank grid of `sizes` (validated by parallel.grid.resolve_sizes, before any collective) and take
        the data-parallel coordinate from it: dp_rank, dp_size say which rows of the global batch this rank reads
        (context-parallel peers read the same rows), dp_group is dp x cp, the ranks whose gradients and losses are
        averaged."""
        self.grid = RankGrid(sizes, self.device.type)
        self.dp_rank, self.dp_size = self.grid.coord["dp"], sizes["dp"]
        self.dp_group = self.grid.replicas.get_group()

    @property
    def grad_accum(self):
        """Micro-batches per rank per optimizer step. gradient_accumulation_steps counts them over the whole
        data-parallel group (nanoGPT), so the global batch is the same whatever the dp size."""
        return self.cfg.gradient_accumulation_steps // self.dp_size

    def collectives(self, group=None):
        """The Collectives a custom algorithm calls over `group` (None: the world), counting into self.stats: one per
        group, of the backend this strategy's variant names (`backend`)."""
        if group is not None and dist.get_world_size(group) == self.world_size:
            group = None  # a group of every rank (a 1-D grid's) is the world: one backend for both
        if group not in self._comms:
            cls = backend(self.variant)
            self._comms[group] = (cls(group, stats=self.stats) if cls is TorchCollectives else
                                  cls(group, stats=self.stats, device=self.device))
        return self._comms[group]

    # --- building ---------------------------------------------------------------------------------------

    def build_model(self, model_config, weights=None):
        """Create this rank's model from a GPTConfig and return the bare module (also self.model). Here: the whole
        GPT on this device, identical on every rank: built on the meta device and materialised with slice_init's
        values (the init, a function of config.init_seed, or `weights`: {GPT name: full tensor}, e.g. GPT-2's),
        then activation checkpointing (apply_ac) and compile. Every strategy takes `weights` the same way."""
        with torch.device("meta"):
            model = GPT(model_config)
        materialize(model, self.device, slice_init(model_config, weights=weights))
        self.apply_ac(model)
        self.model = self.module = model
        if self.cfg.compile:  # in place: parameter names and state_dict keys stay those of the bare model
            self.model.compile(backend=self.cfg.compile_backend)
        return self.model

    def apply_ac(self, module):
        """apply_ac on `module` (a GPT or a stage) with the config's activation_checkpoint and selective_ac_option:
        what every strategy's build_model calls after tensor parallelism and before data-parallel wrappers."""
        return apply_ac(module, self.cfg.activation_checkpoint, self.cfg.selective_ac_option)

    def named_parameters(self):
        """(GPT name, tensor) of every tensor the optimizer updates on this rank, each once (the tied head shares the
        embedding's tensor, so it is not listed; a pipeline's separate head copy is)."""
        if self.pipeline is not None:
            return self.pipeline.named_parameters()
        return list(self.model.named_parameters())

    def configure_optimizer(self):
        """AdamW over named_parameters(), weight decay on the matrices (nanoGPT's groups; a flat shard says which it
        is in `.decay`), fused on CUDA; per-parameter loops when plain and DTensor parameters mix."""
        cfg, params = self.cfg, [p for _, p in self.named_parameters()]
        decay = [getattr(p, "decay", p.dim() >= 2) for p in params]
        groups = [{"params": [p for p, d in zip(params, decay) if d], "weight_decay": cfg.weight_decay},
                  {"params": [p for p, d in zip(params, decay) if not d], "weight_decay": 0.0}]
        kinds = {getattr(p, "device_mesh", None) for p in params}
        return torch.optim.AdamW([g for g in groups if g["params"]], lr=cfg.learning_rate, betas=(cfg.beta1, cfg.beta2),
                                 fused=self.device.type == "cuda", foreach=False if len(kinds) > 1 else None)

    # --- one optimizer step -------------------------------------------------------------------------------

    def loss_context(self):
        """Context around forward and backward (DTensor's loss_parallel() when the logits stay vocab-sharded)."""
        return contextlib.nullcontext()

    def micro_batch(self, x, y):
        """Context around one micro-batch's forward and backward, yielding what the model is called with:
        (x, y, keyword arguments). Here (x, y, {}); context parallelism yields this rank's share of the sequence and
        its positions (parallel/cp.py)."""
        return contextlib.nullcontext((x, y, {}))

    def forward(self, x, y, **kwargs):
        """One micro-batch through self.module: x, y (B, T) int64 -> (logits, mean loss as a plain tensor)."""
        logits, loss = self.module(x, y, **kwargs)
        return logits, loss.full_tensor() if isinstance(loss, DTensor) else loss

    def no_sync(self):
        """Context in which backward accumulates gradients locally without communicating: the module's own no_sync()
        (DistributedDataParallel, and our DataParallel and FullyShardedDataParallel) if it has one."""
        return getattr(self.module, "no_sync", contextlib.nullcontext)()

    def sync_gradients(self):
        """After the last micro-batch's backward: gradients must be final when it returns. Waits for our data-parallel
        wrapper's reductions if it has any in flight; strategies add what else their layout needs."""
        getattr(self.module, "finish_gradient_sync", lambda: None)()

    def forward_backward(self, batches, scaler):
        """Forward and backward over this rank's micro-batches [(x, y), ...], each (B, T) int64.

        Gradients end up as the mean over all micro-batches of all data-parallel ranks (the same as one device on the
        global batch); only the last micro-batch synchronises them (or the pipeline's schedule does). scaler: a
        torch.amp.GradScaler (disabled unless fp16), or None. Returns the loss (0-dim tensor) averaged over
        micro-batches and the data-parallel group, the same value on every rank.
        """
        with self.loss_context():
            if self.pipeline is not None:  # the schedule calls sync_gradients after its last backward
                return self.dp_mean(self.pipeline.step(batches))
            loss = torch.zeros((), device=self.device)
            for i, batch in enumerate(batches):
                with contextlib.nullcontext() if i == len(batches) - 1 else self.no_sync():
                    with self.micro_batch(*batch) as (x, y, kwargs):
                        with self.autocast():
                            micro_loss = self.forward(x, y, **kwargs)[1] / len(batches)
                        (micro_loss if scaler is None else scaler.scale(micro_loss)).backward()
                loss += micro_loss.detach()
            self.sync_gradients()
        return self.dp_mean(loss)

    def gradients(self):
        """(local gradient, counted) for every gradient this rank holds: clip_grad_norm_'s input. A replicated
        strategy counts everything (each rank holds the whole gradient). A sharded one counts every element of the
        full model once: on its first replica (is_first_replica of its global form, global_tensor), and a
        pipeline's separate head copy never (the embedding it mirrors does)."""
        out = []
        for name, p in self.named_parameters():
            if p.grad is not None:
                grad = p.grad.to_local() if isinstance(p.grad, DTensor) else p.grad
                counted = not self.sharded or (
                    name != HEAD and is_first_replica(self.global_tensor(name, p), self.grid))
                out.append((grad, counted))
        return out

    def clip_grad_norm_(self, max_norm):
        """Scale gradients so their global L2 norm is at most max_norm; return the norm before clipping (the same on
        every rank). max_norm=inf only measures it. One implementation for every strategy (clip_grad_norm_ above):
        a sharded strategy sums the squared norms of what each rank counts over the world in one all-reduce."""
        pieces = self.gradients()
        comm = self.collectives(None) if self.sharded else None
        return clip_grad_norm_([g for g, _ in pieces], max_norm, [g for g, c in pieces if c], comm, self.device)

    def model_metrics(self):
        """What the model recorded in this step's backwards, summed over the ranks, for train.py's log; {} for a dense
        model (no communication). With MoE layers (model.moe_stats): {"moe/aux_loss": the load-balancing loss, mean
        over micro-batches and MoE layers; "moe/load_imbalance": the most tokens an expert got over the mean;
        "moe/tokens_per_expert": [tokens routed to each expert, summed over the MoE layers]}, the same on every rank;
        collective (every rank calls it once per step), and it starts the next step's count."""
        config = self.model.config
        if not config.n_expert:
            return {}
        stats = moe_stats([self.model])
        local = torch.zeros(config.n_expert + 2, dtype=torch.float64, device=self.device)
        if stats is not None:
            local[:-2], local[-2], local[-1] = stats
        if self.world_size > 1:
            dist.all_reduce(local)
        tokens, aux, calls = local[:-2], local[-2].item(), local[-1].item()
        return {"moe/aux_loss": aux / calls if calls else 0.0,
                "moe/load_imbalance": (tokens.max() / tokens.mean()).item() if tokens.sum() else 0.0,
                "moe/tokens_per_expert": [round(t) for t in tokens.tolist()]}

    def memory_bytes(self, optimizer):
        """{"params", "grads", "optimizer"}: bytes this rank holds in each between steps (after backward and the
        optimizer step, before zero_grad), plus "gathered": unsharded buffers still allocated (0 when all freed)."""
        params = [p for _, p in self.named_parameters()]
        moments = [t for s in optimizer.state.values() for t in s.values() if isinstance(t, torch.Tensor) and t.dim()]
        return {"params": local_bytes(params), "grads": local_bytes(p.grad for p in params),
                "optimizer": local_bytes(moments), "gathered": getattr(self.module, "gathered_bytes", lambda: 0)()}

    def dp_mean(self, tensor):
        """Average a metric over the data-parallel group (for logging and eval; not counted in stats)."""
        if (self.dp_size if self.dp_group is None else dist.get_world_size(self.dp_group)) > 1:
            tensor = tensor.clone()
            dist.all_reduce(tensor, op=dist.ReduceOp.AVG, group=self.dp_group)
        return tensor

    @torch.no_grad()
    def eval_loss(self, x, y):
        """Mean loss on one eval micro-batch x, y (B, T), averaged over the data-parallel group."""
        self.model.eval()
        with self.loss_context(), self.autocast():
            if self.pipeline is not None:
                loss = self.pipeline.eval_loss(x, y)
            else:
                with self.micro_batch(x, y) as (x, y, kwargs):
                    loss = self.forward(x, y, **kwargs)[1]
        self.model.train()
        return self.dp_mean(loss.float())

    def close(self):
        """Stop what the strategy started besides the process group (pp/rpc: the RPC agent). Called on every rank
        once training is over, before teardown; collective where the strategy needs it. Default: nothing."""

    # --- state: checkpoints and the gathered model -------------------------------------------------------

    def global_tensor(self, name, t):
        """This rank's tensor `t` of parameter `name` (or its AdamW moment) in its global form: a DTensor whose
        placements say which part of the full tensor this rank holds, or `t` itself if it is the whole tensor.
        Here `t` as is (replicated, DTensor-parallel and pipeline layouts); custom layouts override it."""
        return t

    def state_dict(self, optimizer):
        """{"model": {GPT name: tensor}, "optim": {GPT name: {"step", "exp_avg", "exp_avg_sq"}}} of this rank's part,
        every tensor in its global form (global_tensor): what a DCP checkpoint holds (parallel/checkpoint.py)."""
        return checkpoint.parameters_state(self.named_parameters(), optimizer, self.global_tensor,
                                           tied_head=self.pipeline is None)

    def load_state_dict(self, state, optimizer):
        """Put a state of state_dict's form, filled in by a DCP load, back into the parameters and AdamW's state."""
        checkpoint.load_parameters_state(self.named_parameters(), state, optimizer)

    def full_state_dict(self):
        """The single-device GPT's state_dict ({name: full tensor}), on every rank; collective (every rank calls it):
        DTensors gathered, pipeline stages gathered over the pp group. Tests compare it with the reference."""
        local = {k: (v.full_tensor() if isinstance(v, DTensor) else v).detach()
                 for k, v in self.state_dict(None)["model"].items()}
        if self.pipeline is not None:
            local = self.pipeline.gather_stages(local)
        return {name: local[name] for name in full_shapes(self.model.config)}  # in the GPT's state_dict order

    def save_checkpoint(self, path, optimizer, extra, asynchronous=False, process_group=None):
        """Write {"model", "optimizer", **extra} to `path`; collective. A replicated model is one file that rank 0
        writes atomically (a temporary, then a rename); a sharded strategy (checkpoint_name "ckpt") a DCP directory
        in which every rank writes its part (parallel/checkpoint.py). Synchronous: every rank returns once it is on
        disk. asynchronous: the state is copied to CPU memory now and written in the background (sharded: DCP's
        collectives on `process_group`, a gloo group of every rank); returns a concurrent.futures.Future done once
        this rank's writes are (a sharded save's: every rank's), or None where this rank writes nothing.
        train.py saves through parallel.checkpoint.Checkpointer, which marks a checkpoint complete."""
        if self.sharded:
            return checkpoint.save(path, self.state_dict(optimizer), extra, self.rank, asynchronous, process_group)
        future = None
        if self.rank == 0:
            ckpt = {"model": self.model.state_dict(), "optimizer": optimizer.state_dict(), **extra}
            if asynchronous:
                future = checkpoint.save_file_async(path, ckpt)
            else:
                checkpoint.save_file(path, ckpt)
        if dist.is_initialized() and not asynchronous:
            dist.barrier()
        return future

    def load_checkpoint(self, path, optimizer):
        """Load what save_checkpoint wrote into the model and optimizer; return the whole dict (for a sharded
        checkpoint, the extra values). A sharded checkpoint loads on any world size and any strategy (a replicated
        one through its conversion to one file); a single file only into a replicated strategy. Raises
        FileNotFoundError or ValueError naming the file if it is missing, damaged, or of the wrong kind."""
        if self.sharded:
            if os.path.isfile(path):
                raise ValueError(f"checkpoint {path} is a single file (a replicated strategy's); parallel="
                                 f"{self.strategy!r} resumes from sharded (DCP) checkpoints only")
            state = self.state_dict(optimizer)
            extra = checkpoint.load(path, state)
            self.load_state_dict(state, optimizer)
            return extra
        ckpt = load_checkpoint_file(path, self.device)
        self.model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        return ckpt
