"""
Sharded checkpoints with torch.distributed.checkpoint (DCP), and conversion to the single-file format.

A sharded strategy (fsdp, tp, pp, 3d) describes its state as one dict keyed by the bare GPT's parameter names:

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

EXTRA = "extra.pt"


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
    from parallel import load_checkpoint_file
    src, dst = argv
    try:
        ckpt = load_checkpoint_file(src)
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    torch.save(ckpt, f"{dst}.tmp")
    os.replace(f"{dst}.tmp", dst)
    n = sum(t.numel() for k, t in ckpt["model"].items() if k != "lm_head.weight")
    print(f"wrote {dst}: {n:,} parameters, iter_num {ckpt.get('iter_num')}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
