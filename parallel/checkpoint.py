"""
Sharded checkpoints with torch.distributed.checkpoint (DCP), and conversion to the single-file format.

Every strategy describes its state as one dict keyed by the bare GPT's parameter names (`parameters_state`, the
one implementation, or its flat-shard twin in parallel/fsdp.py):

    {"model": {fqn: tensor}, "optim": {fqn: {"step": tensor, "exp_avg": tensor, "exp_avg_sq": tensor}}}

where a tensor this rank holds only part of is a DTensor (its placement says which part) and a replicated one is
a plain tensor. DCP writes every rank's part once (replicated tensors deduplicated) into a directory, and on load
reads into whatever layout the loading run asks for: another world size, another strategy, or one device.
The non-tensor state (model_args, iter_num, config, scaler, RNG states) goes beside it as extra.pt.

    python -m parallel.checkpoint out-x/ckpt out-x/ckpt.pt     # DCP directory -> single-file checkpoint

The single file is what the `single` strategy resumes from and sample.py samples from (both also read a DCP
directory directly, through the same conversion in memory).
"""

import os
import shutil
import sys
import tempfile

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.format_utils import dcp_to_torch_save
from torch.distributed.tensor import DTensor

EXTRA = "extra.pt"
WTE, HEAD = "transformer.wte.weight", "lm_head.weight"  # the tied embedding and head


# -----------------------------------------------------------------------------
# the model and optimizer state of any strategy

def adamw_state(optimizer, param):
    """AdamW's state of `param`, {"step", "exp_avg", "exp_avg_sq"}, created as AdamW's first step would create it
    (zeros, step 0) if the optimizer has not stepped yet, so that a checkpoint load has tensors to read into."""
    state = optimizer.state[param]
    if not state:
        group = next(g for g in optimizer.param_groups if any(q is param for q in g["params"]))
        on_device = group.get("fused") or group.get("capturable")
        state["step"] = torch.zeros((), dtype=torch.float32, device=param.device if on_device else "cpu")
        state["exp_avg"] = torch.zeros_like(param, memory_format=torch.preserve_format)
        state["exp_avg_sq"] = torch.zeros_like(param, memory_format=torch.preserve_format)
    return state


def parameters_state(named_params, optimizer, global_tensor, tied_head=True):
    """The state (module docstring) of parameters that the optimizer updates whole: (GPT name, tensor) pairs, plain
    or DTensor, each turned into its global form by global_tensor(name, t) (a DTensor saying which part this rank
    holds; the identity for whole or DTensor parameters). The head's copy in a pipeline keeps its weight under
    lm_head.weight and its AdamW state under the embedding's name (both copies are equal; DCP keeps one); with
    tied_head, lm_head.weight is also listed as the embedding's tensor, as in the single model's state_dict.
    optimizer None: the "model" part only."""
    model, optim = {}, {}
    for name, p in named_params:
        model[name] = global_tensor(name, p.detach())
        if optimizer is not None:
            state = adamw_state(optimizer, p)
            optim[WTE if name == HEAD else name] = {k: state[k] if k == "step" else global_tensor(name, state[k])
                                                    for k in ("step", "exp_avg", "exp_avg_sq")}
    if tied_head and WTE in model:
        model[HEAD] = model[WTE]
    return {"model": model, "optim": optim}


def local(t):
    """The part of a (possibly DTensor) tensor this rank holds."""
    return t.to_local() if isinstance(t, DTensor) else t


@torch.no_grad()
def load_parameters_state(named_params, state, optimizer):
    """Copy a state of parameters_state's form, filled in by a DCP load, into the parameters and AdamW's state."""
    for name, p in named_params:
        local(p).copy_(local(state["model"][name]))
        for k, t in state["optim"][WTE if name == HEAD else name].items():
            local(optimizer.state[p][k]).copy_(local(t))


# -----------------------------------------------------------------------------
# files and directories


def is_sharded(path):
    """True if `path` is a DCP checkpoint directory (as opposed to a single torch.save file)."""
    return os.path.isdir(path)


def save(path, state, extra, rank):
    """Write `state` ({"model": ..., "optim": ...}, see above) with DCP, and `extra` (torch.save-able plain values),
    to the directory `path`, atomically: everything goes to `path`.tmp first, then rank 0 swaps it in (the old
    checkpoint is renamed to `path`.old and removed only after the new one is in place, so a crash at any point
    leaves a complete checkpoint at `path` or `path`.old). Collective over the default process group."""
    tmp, old = f"{path}.tmp", f"{path}.old"
    if rank == 0 and os.path.exists(tmp):
        shutil.rmtree(tmp)
    _barrier()
    dcp.save(state, checkpoint_id=tmp, no_dist=not dist.is_initialized())
    if rank == 0:
        torch.save(extra, os.path.join(tmp, EXTRA))
        if os.path.exists(path):
            os.replace(path, old)
        os.replace(tmp, path)
        shutil.rmtree(old, ignore_errors=True)
    _barrier()


def save_file(path, ckpt):
    """Write a single-file checkpoint atomically: a temporary, then a rename over `path`."""
    torch.save(ckpt, f"{path}.tmp")
    os.replace(f"{path}.tmp", path)


def load(path, state):
    """Read the DCP checkpoint at `path` into `state` in place (each tensor, plain or DTensor, receives its
    part, whatever layout the checkpoint was saved from); return the extra dict saved with it.
    Raises FileNotFoundError or ValueError (one line, naming the directory) if it is missing or damaged."""
    path = _existing(path)
    try:
        dcp.load(state, checkpoint_id=path, no_dist=not dist.is_initialized())
    except Exception as e:
        raise ValueError(f"sharded checkpoint {path} cannot be loaded into this model ({_first_line(e)})") from None
    return _load_extra(path)


def load_full(path):
    """A DCP checkpoint directory as one single-file checkpoint dict (model state_dict of full tensors, optimizer
    state_dict as AdamW over GPT.configure_optimizers' groups, and the extra values), on the CPU, without a
    process group. Raises FileNotFoundError / ValueError like `load`."""
    path = _existing(path)
    extra = _load_extra(path)
    with tempfile.TemporaryDirectory() as d:
        try:
            dcp_to_torch_save(path, os.path.join(d, "full.pt"))
            full = torch.load(os.path.join(d, "full.pt"), map_location="cpu", weights_only=True)
        except Exception as e:
            raise ValueError(f"sharded checkpoint {path} is corrupt or unreadable ({_first_line(e)})") from None
    model, optim = full["model"], full["optim"]
    return {"model": model, "optimizer": single_optimizer_state(extra, optim), **extra}


def single_optimizer_state(extra, optim_by_name):
    """Turn {fqn: {"step", "exp_avg", "exp_avg_sq"}} into the state_dict of the AdamW that the single-device GPT's
    configure_optimizers builds from the saved config (states keyed by position in its parameter groups)."""
    from model import GPT, GPTConfig  # here, not at the top: model imports nothing of parallel, keep it so
    with torch.device("meta"):
        model = GPT(GPTConfig(**extra["model_args"]))
    cfg = extra["config"]
    opt = model.configure_optimizers(cfg["weight_decay"], cfg["learning_rate"], (cfg["beta1"], cfg["beta2"]), "cpu")
    names = {id(p): n for n, p in model.named_parameters()}
    sd = opt.state_dict()
    order = [names[id(p)] for group in opt.param_groups for p in group["params"]]
    sd["state"] = {i: optim_by_name[n] for i, n in enumerate(order) if n in optim_by_name}
    return sd


def load_checkpoint_file(path, device="cpu"):
    """torch.load a single-file checkpoint (tensors and plain Python values only: weights_only=True), or convert
    a sharded (DCP) checkpoint directory to the same dict in memory (load_full).
    Raises FileNotFoundError if it is missing, ValueError (one line, naming the file) if it is truncated,
    corrupt or not a checkpoint of this project."""
    if is_sharded(path) or os.path.isdir(f"{path}.old"):
        ckpt = load_full(path)
        return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in ckpt.items()} | {
            "model": {k: v.to(device) for k, v in ckpt["model"].items()}}
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no checkpoint at {path}")
    try:
        ckpt = torch.load(path, map_location=device, weights_only=True)
    except Exception as e:  # torch raises several types for a damaged file
        raise ValueError(f"checkpoint {path} is corrupt or unreadable ({_first_line(e)})") from None
    if not isinstance(ckpt, dict) or not {"model", "model_args"} <= ckpt.keys():
        raise ValueError(f"checkpoint {path} is not a nanoparallel checkpoint (missing 'model' or 'model_args')")
    return ckpt


def _existing(path):
    if not os.path.isdir(path):
        if os.path.isdir(f"{path}.old"):  # a save was interrupted between the two renames
            return f"{path}.old"
        raise FileNotFoundError(f"no sharded checkpoint at {path}")
    if not os.path.isfile(os.path.join(path, EXTRA)) or not os.path.isfile(os.path.join(path, ".metadata")):
        raise ValueError(f"sharded checkpoint {path} is incomplete (no .metadata or {EXTRA})")
    return path


def _load_extra(path):
    try:
        return torch.load(os.path.join(path, EXTRA), map_location="cpu", weights_only=True)
    except Exception as e:
        raise ValueError(f"sharded checkpoint {path} has a corrupt {EXTRA} ({_first_line(e)})") from None


def _first_line(e):
    return f"{type(e).__name__}: {(str(e).strip().splitlines() or [''])[0]}"


def _barrier():
    if dist.is_initialized():
        dist.barrier()


def main(argv):
    """python -m parallel.checkpoint SRC DST: convert the checkpoint SRC (DCP directory or single file) to the
    single-file checkpoint DST, written atomically."""
    if len(argv) != 2:
        print("usage: python -m parallel.checkpoint SRC_CHECKPOINT DST_FILE", file=sys.stderr)
        return 2
    src, dst = argv
    try:
        ckpt = load_checkpoint_file(src)
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    save_file(dst, ckpt)
    n = sum(t.numel() for k, t in ckpt["model"].items() if k != "lm_head.weight")
    print(f"wrote {dst}: {n:,} parameters, iter_num {ckpt.get('iter_num')}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
