"""
The registry of parallel strategies, and the seam between train.py and a strategy.

Each file parallel/<strategy>.py registers one class per variant:

    @register("ddp", "custom")
    class CustomDDP(Strategy): ...

and the config picks one with `parallel = "ddp"` and `variant = "custom"`. Variants, the same strategy at four
levels of abstraction: "pytorch" (PyTorch's native API), "custom" (the algorithm written out with the
Collectives of parallel/comm.py), "triton" and "nccl" (the custom algorithm over the Collectives of
kernels/triton_comm.py and kernels/nccl.py: derived here for every strategy with a custom variant, see BACKENDS).
`python -c "import parallel; print(parallel.available())"` lists what exists.

train.py never branches on the strategy. It asks the Strategy for everything that differs:
building the model (wrapping, sharding), which data-parallel slice of the global batch this rank reads
(dp_rank, dp_size), one optimizer step's forward and backward over the micro-batches, gradient-norm clipping,
the loss averaged for logging, eval, and checkpoint save/load. The base class below is the replicated,
one-model-per-rank behaviour (single and DDP); other strategies override the methods that differ.

Also here: process-group start-up and the teardown that every torchrun entry point must use
(../shared/notes/cpu-facts.md: without it ~17% of gloo runs crash at exit).
"""

import contextlib
import importlib
import os
from pathlib import Path

import torch
import torch.distributed as dist

from torch.distributed.checkpoint.state_dict import (get_model_state_dict, get_optimizer_state_dict,
                                                     set_model_state_dict, set_optimizer_state_dict)
from torch.distributed.tensor import DTensor

from model import GPT
from comm import CommStats, TorchCollectives, init_distributed, on_teardown, teardown  # noqa: F401 (re-exported)
from parallel import checkpoint

_REGISTRY = {}


def register(strategy, variant):
    """Class decorator registering a Strategy subclass as the implementation of (strategy, variant)."""
    def decorate(cls):
        _REGISTRY[(strategy, variant)] = cls
        cls.strategy, cls.variant = strategy, variant
        return cls
    return decorate


def available():
    """All registered (strategy, variant) pairs, sorted. Imports every parallel/*.py (names like "3d" too), then
    derives the backend variants of every custom one (_derive_backend_variants)."""
    for path in sorted(Path(__file__).parent.glob("*.py")):
        if path.stem != "__init__":
            importlib.import_module(f"parallel.{path.stem}")
    _derive_backend_variants()
    return sorted(_REGISTRY)


# variant -> the Collectives class that replaces parallel.comm.TorchCollectives in a strategy's custom algorithm,
# as "module:Class", imported only when that variant is built (triton and libnccl are heavy or absent).
BACKENDS = {"triton": "kernels.triton_comm:TritonCollectives", "nccl": "kernels.nccl:NCCLCollectives"}


def _backend_class(name):
    module, cls = BACKENDS[name].split(":")
    return getattr(importlib.import_module(module), cls)


def _derive_backend_variants():
    """Register (s, v) for every backend v of BACKENDS and every registered (s, "custom") that lacks it: a subclass
    of the custom class that differs only in `collectives(group)`, which returns the backend (one per group,
    counting into self.stats). So each strategy's algorithm is written once. The backend's check_available(device)
    runs first in __init__, so an unusable backend (nccl without a GPU) is a one-line ValueError before any
    process-group work."""
    for (strategy, variant), custom in list(_REGISTRY.items()):
        if variant != "custom":
            continue
        for name in BACKENDS:
            if (strategy, name) in _REGISTRY:
                continue

            def __init__(self, cfg, device, custom=custom, name=name):
                _backend_class(name).check_available(device)
                self._backends = {}
                custom.__init__(self, cfg, device)

            def collectives(self, group=None, name=name):
                if group not in self._backends:
                    self._backends[group] = _backend_class(name)(group, stats=self.stats, device=self.device)
                return self._backends[group]

            doc = f"{custom.__name__} over kernels' {name} Collectives ({BACKENDS[name]})."
            register(strategy, name)(type(f"{custom.__name__}_{name}", (custom,), {
                "__init__": __init__, "collectives": collectives, "__doc__": doc, "__module__": custom.__module__}))


def build_strategy(cfg, device):
    """Construct the Strategy that cfg.parallel and cfg.variant name.

    cfg: the training config (attributes as in train.py's defaults); device: torch.device of this rank.
    Raises ValueError, before any collective, for an unknown pair (listing those that exist) or a
    gradient_accumulation_steps that the data-parallel size does not divide.
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


# -----------------------------------------------------------------------------
# the seam

class Strategy:
    """How one parallel strategy trains the GPT, as train.py sees it. This base class is the replicated case:
    every rank holds the whole model and reads its own slice of the global batch (single, DDP).

    Attributes: rank, world_size; dp_rank, dp_size (this rank's data-parallel coordinate: ranks with the same
    dp_rank read the same data); dp_group (the process group over which gradients and the logged loss are
    averaged; None means the whole world); is_logger (this rank prints, writes wandb and checkpoints);
    model (the bare GPT whose state_dict keys a single-device checkpoint uses); stats (CommStats of the
    collectives this strategy's algorithm issued).
    """

    strategy = variant = None  # set by @register
    checkpoint_name = "ckpt.pt"  # in out_dir; strategies whose state is sharded use a DCP directory, "ckpt"

    def __init__(self, cfg, device):
        self.cfg, self.device = cfg, device
        self.rank = dist.get_rank() if dist.is_initialized() else 0
        self.world_size = dist.get_world_size() if dist.is_initialized() else 1
        self.dp_rank, self.dp_size, self.dp_group = self.rank, self.world_size, None
        self.is_logger = self.rank == 0
        self.model = None
        self.stats = CommStats()
        dtypes = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
        if cfg.dtype not in dtypes:
            raise ValueError(f"dtype must be one of {', '.join(dtypes)}, got {cfg.dtype!r}")
        ptdtype = dtypes[cfg.dtype]
        self.autocast = (contextlib.nullcontext if ptdtype == torch.float32 else
                         lambda: torch.autocast(device_type=device.type, dtype=ptdtype))

    @property
    def grad_accum(self):
        """Micro-batches per rank per optimizer step. gradient_accumulation_steps counts them over the whole
        data-parallel group (nanoGPT), so the global batch is the same whatever the dp size."""
        return self.cfg.gradient_accumulation_steps // self.dp_size

    def collectives(self, group=None):
        """The Collectives a custom algorithm calls, over `group` (None: the world), counting into self.stats.
        The custom variants use torch.distributed; other variants return another backend here."""
        return TorchCollectives(group, stats=self.stats)

    # --- building ---------------------------------------------------------------------------------------

    def build_model(self, model_config):
        """Create this rank's model from a GPTConfig and return the bare GPT (also kept as self.model).
        Identical on every rank: the init is a function of config.init_seed."""
        self.model = GPT(model_config).to(self.device)
        if self.cfg.compile:
            # in place: parameter names and state_dict keys stay those of the bare model
            self.model.compile(backend=self.cfg.compile_backend)
        return self.model

    def configure_optimizer(self):
        """AdamW over the parameters this rank updates (GPT.configure_optimizers' weight-decay groups)."""
        cfg = self.cfg
        return self.model.configure_optimizers(cfg.weight_decay, cfg.learning_rate, (cfg.beta1, cfg.beta2), self.device.type)

    # --- one optimizer step -------------------------------------------------------------------------------

    def forward(self, x, y):
        """Forward of one micro-batch through whatever wraps the model: x, y (B, T) int64 -> (logits, mean loss)."""
        return self.model(x, y)

    def no_sync(self):
        """Context in which backward accumulates gradients locally without communicating."""
        return contextlib.nullcontext()

    def sync_gradients(self):
        """Called once after the last micro-batch's backward: gradients must be final when it returns."""

    def forward_backward(self, batches, scaler):
        """Forward and backward over this rank's micro-batches [(x, y), ...], each (B, T) int64.

        Gradients end up as the mean over all micro-batches of all data-parallel ranks (the same as one
        device on the global batch); only the last micro-batch synchronises them. scaler: a
        torch.amp.GradScaler (disabled unless fp16). Returns the loss (0-dim tensor) averaged over
        micro-batches and the data-parallel group, the same value on every rank.
        """
        total = torch.zeros((), device=self.device)
        for i, (x, y) in enumerate(batches):
            last = i == len(batches) - 1
            with contextlib.nullcontext() if last else self.no_sync():
                with self.autocast():
                    _, loss = self.forward(x, y)
                    loss = loss / len(batches)
                scaler.scale(loss).backward()
            total += loss.detach()
        self.sync_gradients()
        return self.dp_mean(total)

    def clip_grad_norm_(self, max_norm):
        """Scale gradients so their global L2 norm is at most max_norm; return the norm before clipping
        (the same on every rank). max_norm=inf only measures it."""
        return torch.nn.utils.clip_grad_norm_(self.model.parameters(), max_norm)

    def dp_mean(self, tensor):
        """Average a metric over the data-parallel group (for logging and eval; not counted in stats)."""
        if self.dp_size > 1:
            tensor = tensor.clone()
            dist.all_reduce(tensor, op=dist.ReduceOp.AVG, group=self.dp_group)
        return tensor

    @torch.no_grad()
    def eval_loss(self, x, y):
        """Mean loss on one eval micro-batch x, y (B, T), averaged over the data-parallel group."""
        self.model.eval()
        with self.autocast():
            _, loss = self.forward(x, y)
        self.model.train()
        return self.dp_mean(loss)

    def close(self):
        """Stop what the strategy started besides the process group (pp/rpc: the RPC agent). Called on every rank
        once training is over, before teardown; collective where the strategy needs it. Default: nothing."""

    # --- state: gathered, and checkpoints ------------------------------------------------------------

    def full_state_dict(self):
        """The single-device GPT's state_dict ({name: full tensor}), on every rank (collective for sharded
        strategies: call it on all ranks). Tests compare it with the reference; DTensors are gathered."""
        return {k: v.full_tensor() if isinstance(v, DTensor) else v for k, v in self.model.state_dict().items()}

    def sharded_state_dict(self, optimizer):
        """{"model": {fqn: tensor}, "optim": {fqn: {"step", "exp_avg", "exp_avg_sq"}}} of this rank's part, keyed by
        the bare GPT's names, with DTensors for sharded tensors (parallel/checkpoint.py). Used when
        checkpoint_name is a directory. This default is PyTorch's (torch.distributed.checkpoint.state_dict) and
        serves models whose parameters are DTensors (FSDP2, DTensor TP); custom layouts override it and
        load_sharded_state_dict. Before the first step the optimizer state is created (zeros) so that a load has
        somewhere to go."""
        model_sd = get_model_state_dict(self.model)
        optim_sd = get_optimizer_state_dict(self.model, optimizer)
        self._param_groups = optim_sd["param_groups"]
        return {"model": model_sd, "optim": optim_sd["state"]}

    def load_sharded_state_dict(self, state, optimizer):
        """Put a state of sharded_state_dict's form, filled in by a DCP load, back into the model and optimizer."""
        set_model_state_dict(self.model, state["model"])
        set_optimizer_state_dict(self.model, optimizer, {"state": state["optim"], "param_groups": self._param_groups})

    def save_checkpoint(self, path, optimizer, extra):
        """Write {"model", "optimizer", **extra} to `path`, atomically (a temporary, then a rename); every rank
        returns once it is on disk. A replicated model is one file that rank 0 writes; a sharded strategy
        (checkpoint_name "ckpt") writes a DCP directory in which every rank writes its part."""
        if self.checkpoint_name != Strategy.checkpoint_name:
            checkpoint.save(path, self.sharded_state_dict(optimizer), extra, self.rank)
            return
        if self.rank == 0:
            tmp = f"{path}.tmp"
            torch.save({"model": self.model.state_dict(), "optimizer": optimizer.state_dict(), **extra}, tmp)
            os.replace(tmp, path)
        if dist.is_initialized():
            dist.barrier()

    def load_checkpoint(self, path, optimizer):
        """Load what save_checkpoint wrote into self.model and optimizer; return the whole dict (for a sharded
        checkpoint, the extra values). A sharded checkpoint loads on any world size.
        Raises FileNotFoundError or ValueError naming the file if it is missing or damaged."""
        if self.checkpoint_name != Strategy.checkpoint_name:
            state = self.sharded_state_dict(optimizer)
            extra = checkpoint.load(path, state)
            self.load_sharded_state_dict(state, optimizer)
            return extra
        ckpt = load_checkpoint_file(path, self.device)
        self.model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        return ckpt


def load_checkpoint_file(path, device="cpu"):
    """torch.load a single-file checkpoint (tensors and plain Python values only: weights_only=True), or convert
    a sharded (DCP) checkpoint directory to the same dict in memory (parallel/checkpoint.py).
    Raises FileNotFoundError if it is missing, ValueError (one line, naming the file) if it is truncated,
    corrupt or not a checkpoint of this project."""
    if checkpoint.is_sharded(path) or os.path.isdir(f"{path}.old"):
        ckpt = checkpoint.load_full(path)
        return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in ckpt.items()} | {
            "model": {k: v.to(device) for k, v in ckpt["model"].items()}}
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no checkpoint at {path}")
    try:
        ckpt = torch.load(path, map_location=device, weights_only=True)
    except Exception as e:  # torch raises several types for a damaged file
        reason = (str(e).strip().splitlines() or [""])[0]
        raise ValueError(f"checkpoint {path} is corrupt or unreadable ({type(e).__name__}: {reason})") from None
    if not isinstance(ckpt, dict) or not {"model", "model_args"} <= ckpt.keys():
        raise ValueError(f"checkpoint {path} is not a nanoparallel checkpoint (missing 'model' or 'model_args')")
    return ckpt
