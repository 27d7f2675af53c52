"""
Sharded checkpoints with torch.distributed.checkpoint (DCP), the single-file format, and a run's checkpoints on disk.

Every strategy describes its state as one dict keyed by the bare GPT's parameter names (`parameters_state`, the
one implementation, or its flat-shard twin in parallel/fsdp.py):

    {"model": {fqn: tensor}, "optim": {fqn: {"step": tensor, "exp_avg": tensor, "exp_avg_sq": tensor}}}

where a tensor this rank holds only part of is a DTensor (its placement says which part) and a replicated one is
a plain tensor. DCP writes every rank's part once (replicated tensors deduplicated) into a directory, and on load
reads into whatever layout the loading run asks for: another world size, another strategy, or one device.
The non-tensor state (model_args, iter_num, config, scaler, RNG states) goes beside it as extra.pt.

train.py keeps its checkpoints in out_dir/checkpoints/step_<iter>/ (Checkpointer): ckpt.pt (replicated strategies)
or the DCP directory ckpt (sharded ones), and a COMPLETE marker written last; the newest complete one is what
init_from="resume"/"auto", sample.py and the converter read (find_checkpoint).

    python -m parallel.checkpoint out-x out-x.pt     # an out_dir's newest checkpoint -> single-file checkpoint

The single file is what sample.py samples from (it, and the `single` strategy, also read a DCP directory
directly, through the same conversion in memory).
"""

import json
import os
import shutil
import sys
import tempfile
import time
from concurrent.futures import Future, ThreadPoolExecutor

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import FileSystemReader
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
# one checkpoint: a single file (replicated state) or a DCP directory (sharded state)


def is_sharded(path):
    """True if `path` is a DCP checkpoint directory (as opposed to a single torch.save file)."""
    return os.path.isdir(path)


def save(path, state, extra, rank, asynchronous=False, process_group=None):
    """Write `state` ({"model": ..., "optim": ...}, see above) with DCP, and `extra` (torch.save-able plain values,
    rank 0's) as extra.pt, into the directory `path`. Collective over the default process group.

    Synchronous: every rank returns once everything is on disk. asynchronous: DCP's async_save copies this rank's
    state to CPU memory now and writes it in a background thread, its collectives on `process_group` (a gloo group
    of every rank, not the one training uses); returns a concurrent.futures.Future that is done when every rank's
    part and the .metadata are written (DCP's coordinator writes .metadata only after gathering every rank's
    result). Not atomic by itself: train.py's checkpoints count once their COMPLETE marker exists (Checkpointer).
    """
    no_dist = not dist.is_initialized()
    if rank == 0:
        os.makedirs(path, exist_ok=True)
        torch.save(extra, os.path.join(path, EXTRA))
    if asynchronous:
        return dcp.async_save(state, checkpoint_id=path, process_group=process_group, no_dist=no_dist)
    dcp.save(state, checkpoint_id=path, no_dist=no_dist)
    _barrier()
    return None


def save_file(path, ckpt):
    """Write a single-file checkpoint atomically: a temporary (flushed to disk), then a rename over `path`."""
    with open(f"{path}.tmp", "wb") as f:
        torch.save(ckpt, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(f"{path}.tmp", path)


_writer = None  # the background thread of save_file_async (one: writes are serialized)


def save_file_async(path, ckpt):
    """save_file in a background thread: the tensors of `ckpt` are copied to CPU memory before this returns, so
    training may change the originals. Returns a concurrent.futures.Future, done once the file is in place."""
    global _writer
    if _writer is None:
        _writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="checkpoint-writer")
    return _writer.submit(save_file, path, _cpu_copy(ckpt))


def _cpu_copy(obj):
    """A copy of nested dicts/lists/tuples in which every tensor is a new CPU tensor (the staging of an async save)."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().to("cpu", copy=True)
    if isinstance(obj, dict):
        return type(obj)((k, _cpu_copy(v)) for k, v in obj.items())
    if isinstance(obj, (list, tuple)):
        return type(obj)(_cpu_copy(v) for v in obj)
    return obj


def load(path, state):
    """Read the DCP checkpoint at `path` into `state` in place (each tensor, plain or DTensor, receives its
    part, whatever layout the checkpoint was saved from); return the extra dict saved with it.
    Raises FileNotFoundError or ValueError (one line, naming the directory and what is missing or damaged)."""
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


def load_extra(path):
    """The plain values saved with a checkpoint (model_args, iter_num, config, ...: all but "model" and
    "optimizer"), without reading its tensors (a file is memory-mapped; a DCP directory's extra.pt is read), so
    a caller can check them before loading anything. Raises FileNotFoundError / ValueError like the loaders."""
    if is_sharded(path):
        return _load_extra(_existing(path))
    ckpt = _load_file(path, "cpu", mmap=True)
    return {k: v for k, v in ckpt.items() if k not in ("model", "optimizer")}


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
    if is_sharded(path):
        ckpt = load_full(path)
        return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in ckpt.items()} | {
            "model": {k: v.to(device) for k, v in ckpt["model"].items()}}
    return _load_file(path, device)


def _load_file(path, device, mmap=False):
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no checkpoint at {path}")
    try:
        ckpt = torch.load(path, map_location=device, weights_only=True, mmap=mmap)
    except Exception as e:  # torch raises several types for a damaged file
        raise ValueError(f"checkpoint {path} is corrupt or unreadable ({_first_line(e)})") from None
    if not isinstance(ckpt, dict) or not {"model", "model_args"} <= ckpt.keys():
        raise ValueError(f"checkpoint {path} is not a nanoparallel checkpoint (missing 'model' or 'model_args')")
    return ckpt


def _existing(path):
    """`path` if it is a DCP directory whose .metadata, extra.pt and every data file .metadata names are there
    (each at least as long as the data it holds); else FileNotFoundError / ValueError naming what is missing."""
    if not os.path.isdir(path):
        raise FileNotFoundError(f"no sharded checkpoint at {path}")
    if not os.path.isfile(os.path.join(path, EXTRA)) or not os.path.isfile(os.path.join(path, ".metadata")):
        raise ValueError(f"sharded checkpoint {path} is incomplete (no .metadata or {EXTRA})")
    try:
        metadata = FileSystemReader(path).read_metadata()
        ends = {}  # data file -> bytes it must hold
        for info in metadata.storage_data.values():
            ends[info.relative_path] = max(ends.get(info.relative_path, 0), info.offset + info.length)
    except Exception as e:
        raise ValueError(f"sharded checkpoint {path} is corrupt or unreadable (.metadata: {_first_line(e)})") from None
    missing = sorted(f for f in ends if not os.path.isfile(os.path.join(path, f)))
    short = sorted(f for f in ends if f not in missing and os.path.getsize(os.path.join(path, f)) < ends[f])
    if missing or short:
        what = [f"{f} missing" for f in missing] + [f"{f} truncated" for f in short]
        raise ValueError(f"sharded checkpoint {path} is damaged: {', '.join(what)} (of the {len(ends)} data files "
                         f"its .metadata lists; __R_*.distcp is rank R's part)")
    return path


def _load_extra(path):
    try:
        return torch.load(os.path.join(path, EXTRA), map_location="cpu", weights_only=True)
    except Exception as e:
        raise ValueError(f"sharded checkpoint {path} has a corrupt {EXTRA} ({_first_line(e)})") from None


def _first_line(e):
    return f"{type(e).__name__}: {(str(e).strip().splitlines() or [''])[0]}"


def _barrier(group=None):
    if dist.is_initialized():
        dist.barrier(group=group)


# -----------------------------------------------------------------------------
# a run's checkpoints: out_dir/checkpoints/step_<iter>/, each complete once its marker exists

CHECKPOINTS, COMPLETE = "checkpoints", "COMPLETE"


def step_dir(out_dir, iter_num):
    """The directory of the checkpoint taken after `iter_num` iterations: out_dir/checkpoints/step_<iter_num>."""
    return os.path.join(out_dir, CHECKPOINTS, f"step_{iter_num:08d}")


def checkpoint_in(directory):
    """The checkpoint a step directory (or an out_dir of the layout before step directories) holds: ckpt.pt (a
    replicated strategy's file) or ckpt (a sharded strategy's DCP directory); None if neither is there."""
    for name in ("ckpt.pt", "ckpt"):
        if os.path.exists(os.path.join(directory, name)):
            return os.path.join(directory, name)
    return None


def list_checkpoints(out_dir):
    """[(iter_num, step directory, complete)] of out_dir/checkpoints, oldest first."""
    root, found = os.path.join(out_dir, CHECKPOINTS), []
    for name in os.listdir(root) if os.path.isdir(root) else []:
        if name.startswith("step_") and name[5:].isdigit():
            path = os.path.join(root, name)
            found.append((int(name[5:]), path, os.path.isfile(os.path.join(path, COMPLETE))))
    return sorted(found)


def find_checkpoint(out_dir, warn=None):
    """The path (file or DCP directory) of the newest complete checkpoint in out_dir, or None if there is none.

    Complete: its step directory holds the COMPLETE marker, written last (Checkpointer.save). warn(message) is
    called for each incomplete step directory newer than the one returned (a save that a crash interrupted).
    Without step directories, the layout before them: out_dir/ckpt.pt or out_dir/ckpt.
    """
    steps = list_checkpoints(out_dir)
    complete = [(it, path) for it, path, done in steps if done]
    newest = complete[-1] if complete else None
    for it, path, done in steps:
        if not done and (newest is None or it > newest[0]) and warn is not None:
            fallback = f"using {newest[1]}" if newest else "no complete checkpoint before it"
            warn(f"warning: checkpoint {path} is incomplete (no {COMPLETE} marker: its save was interrupted); "
                 f"{fallback}")
    if newest is not None:
        return checkpoint_in(newest[1])
    return checkpoint_in(out_dir) if not steps else None


def resolve(path):
    """What a user names as a checkpoint (sample.py's out_dir, the converter's SRC) as a checkpoint path: an
    out_dir's newest complete checkpoint, a step directory's checkpoint, or `path` itself (a file or a DCP
    directory). Raises FileNotFoundError if a directory holds none."""
    if os.path.isdir(path) and not os.path.isfile(os.path.join(path, ".metadata")):
        found = find_checkpoint(path, warn=lambda m: print(m, file=sys.stderr))
        if found is None:
            raise FileNotFoundError(f"no complete checkpoint in {path}")
        return found
    return path


def check_out_dir(out_dir, init_from, saves=True):
    """Before any process group: one-line errors for an out_dir that cannot work with init_from. "resume" needs a
    complete checkpoint (FileNotFoundError); "scratch" refuses an out_dir that holds checkpoints already when the
    run saves any (its newer steps would mix with another run's; ValueError): "auto" continues such a run."""
    if init_from == "resume" and find_checkpoint(out_dir) is None:
        raise FileNotFoundError(f"init_from='resume': no complete checkpoint in out_dir {out_dir!r} (init_from='auto' "
                                f"starts from scratch when there is none)")
    found = find_checkpoint(out_dir) if init_from == "scratch" and saves else None
    if found is not None:
        raise ValueError(f"out_dir {out_dir!r} already holds checkpoints (newest: {found}); init_from='scratch' would "
                         f"mix two runs: set init_from='auto' to continue that run, or another out_dir")


class Checkpointer:
    """train.py's checkpoints: out_dir/checkpoints/step_<iter>/ holds ckpt.pt (replicated strategies: rank 0's
    file) or ckpt/ (sharded: a DCP directory with every rank's part) and, written last, COMPLETE.

    A save writes every rank's part, then (once every rank has confirmed its part is on disk) rank 0 writes the
    COMPLETE marker atomically (a temporary, fsync, rename), then removes all but the newest `keep` complete
    checkpoints (0: keep all) and any interrupted one older than the newest. A crash at any point leaves the
    previous complete checkpoints untouched; find_checkpoint skips the interrupted one with a warning. Older
    checkpoints are deleted marker first, so a half-deleted one never looks complete.

    asynchronous: a save copies the state to CPU memory, returns, and writes in the background (DCP's async_save
    on a gloo group of its own for sharded state, a writer thread for rank 0's file); rank 0 writes the marker when
    the write is done. Saves never overlap: a new one, wait() and close() wait for the one in flight and raise if
    it failed. Torchtitan's CheckpointManager does the same with async_mode="async".
    """

    def __init__(self, out_dir, strategy, keep=2, asynchronous=False):
        self.out_dir, self.strategy, self.keep, self.asynchronous = out_dir, strategy, keep, asynchronous
        self.rank = strategy.rank
        self.pending = None  # Future of the save in flight on this rank (rank 0's includes the marker)
        self.last_iter = None  # iteration of the newest checkpoint this run saved or resumed from
        self.group = None
        if asynchronous and dist.is_initialized() and strategy.sharded:
            self.group = dist.new_group(backend="gloo")  # DCP's background collectives, apart from training's

    def resume_path(self, init_from):
        """The checkpoint to resume from for init_from ("resume", "auto": the newest complete one; "scratch":
        None), as rank 0 sees out_dir, so every rank loads the same one; collective."""
        found = None
        if init_from in ("resume", "auto") and self.rank == 0:
            found = find_checkpoint(self.out_dir, warn=print)
        if dist.is_initialized():
            box = [found]
            dist.broadcast_object_list(box, src=0)
            found = box[0]
        if found is None and init_from == "resume":
            raise FileNotFoundError(f"init_from='resume': no complete checkpoint in out_dir {self.out_dir!r}")
        return found

    def save(self, iter_num, optimizer, extra, asynchronous=None, after_write=None):
        """Save the checkpoint of iteration `iter_num` (extra: the plain values saved with it); collective.
        Returns its step directory, or None if this iteration's checkpoint exists already (saved or resumed
        from). asynchronous: None takes the Checkpointer's setting. after_write(): called on every rank once its
        part is written, before the marker (train.py's fault-injection hook for tests)."""
        if iter_num == self.last_iter:
            return None
        asynchronous = self.asynchronous if asynchronous is None else asynchronous
        self.wait()
        step = step_dir(self.out_dir, iter_num)
        done = None
        if self.rank == 0:  # a complete checkpoint of this iteration is kept; an interrupted one is replaced
            done = os.path.isfile(os.path.join(step, COMPLETE))
            if not done and os.path.exists(step):
                shutil.rmtree(step)
            os.makedirs(step, exist_ok=True)
        if dist.is_initialized():
            box = [done]
            dist.broadcast_object_list(box, src=0)  # also: no rank writes before rank 0 has cleared the directory
            done = box[0]
        self.last_iter = iter_num
        if done:
            return None
        path = os.path.join(step, self.strategy.checkpoint_name)
        info = {"iter_num": iter_num, "world_size": self.strategy.world_size, "strategy": self.strategy.strategy,
                "variant": self.strategy.variant, "checkpoint": os.path.basename(path)}
        if asynchronous:
            future = self.strategy.save_checkpoint(path, optimizer, extra, asynchronous=True, process_group=self.group)
            if self.rank == 0:
                future = _then(future, lambda: self._complete(step, info))
            self.pending = future
            return step
        self.strategy.save_checkpoint(path, optimizer, extra)
        if after_write is not None:
            after_write()
        _barrier()  # every rank's part is on disk
        if self.rank == 0:
            self._complete(step, info)
        return step

    def wait(self):
        """Wait for the save in flight on this rank, if any; raise its error if it failed."""
        pending, self.pending = self.pending, None
        if pending is not None:
            pending.result()

    def close(self):
        """End of training: wait for the save in flight (raising its error)."""
        self.wait()

    def _complete(self, step, info):
        """Rank 0, once every rank's part of `step` is written: the marker, then rotation."""
        tmp = os.path.join(step, COMPLETE + ".tmp")
        with open(tmp, "w") as f:
            json.dump({**info, "time": time.time()}, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, os.path.join(step, COMPLETE))
        _fsync_dir(step)
        steps = list_checkpoints(self.out_dir)
        complete = [path for _, path, done in steps if done]
        doomed = complete[:-self.keep] if self.keep else []
        doomed += [path for it, path, done in steps if not done and it < info["iter_num"]]
        for path in doomed:
            marker = os.path.join(path, COMPLETE)
            if os.path.exists(marker):
                os.remove(marker)
            shutil.rmtree(path, ignore_errors=True)


def _then(future, fn):
    """A Future done when `future` is done and then fn() has run (with future's error, or fn's, if either failed).
    `future` None (nothing written on this rank) runs fn now."""
    if future is None:
        fn()
        return None
    chained = Future()

    def finish(f):
        try:
            f.result()
            fn()
            chained.set_result(None)
        except BaseException as e:
            chained.set_exception(e)
    future.add_done_callback(finish)
    return chained


def _fsync_dir(path):
    """Flush a directory entry (a rename in it) to disk, where the OS allows it."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def main(argv):
    """python -m parallel.checkpoint SRC DST: convert the checkpoint SRC (an out_dir: its newest complete
    checkpoint; a step directory; a DCP directory or a single file) to the single-file checkpoint DST, written
    atomically."""
    if len(argv) != 2:
        print("usage: python -m parallel.checkpoint SRC_CHECKPOINT_OR_OUT_DIR DST_FILE", file=sys.stderr)
        return 2
    src, dst = argv
    try:
        src = resolve(src)
        ckpt = load_checkpoint_file(src)
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    os.makedirs(os.path.dirname(os.path.abspath(dst)), exist_ok=True)
    save_file(dst, ckpt)
    n = sum(t.numel() for k, t in ckpt["model"].items() if k != "lm_head.weight")
    print(f"wrote {dst} from {src}: {n:,} parameters, iter_num {ckpt.get('iter_num')}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
