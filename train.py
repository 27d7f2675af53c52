"""
Train a GPT with any parallel strategy of parallel/. nanoGPT's train.py, with the parallelism in a plugin.

One process:
    python train.py config/train_shakespeare_char_cpu.py
Data parallel on 2 CPU processes (gloo) or on the GPUs of one node (NCCL):
    torchrun --standalone --nproc_per_node=2 train.py config/train_shakespeare_char_ddp_custom_cpu.py
Any default below can be overridden by a config file and then by --key=value (config/__init__.py).

This file never looks at the strategy's name: `build_strategy(cfg, device)` returns a Strategy that builds the
model, says which slice of the global batch this rank reads, runs one step's forward+backward, clips, averages
the logged loss, evaluates and checkpoints (parallel/__init__.py).
"""

import json
import math
import os
import pickle
import signal
import sys
import time
from dataclasses import asdict
from types import SimpleNamespace

import numpy as np
import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor

from kernels.comm import describe_comm_error
from config import ConfigError, check_train_config, load_config
from tools.hf import is_hf_source, load_pretrained
from model import GPTConfig, flops_per_token
from parallel import build_strategy, init_distributed, teardown
from parallel.checkpoint import Checkpointer, check_out_dir, load_extra
from tools.profiling import TrainingProfiler, check_profiling_config, peak_flops, peak_memory_per_rank

# -----------------------------------------------------------------------------
# default config values: GPT-2 (124M) on OpenWebText, as in nanoGPT
# I/O
out_dir = "out"
eval_interval = 2000
log_interval = 1
eval_iters = 200
eval_only = False  # if True, evaluate once and exit
always_save_checkpoint = True  # if False, save only when the val loss improves
init_from = "scratch"  # "scratch", "resume" (the newest complete checkpoint in out_dir), or "auto": resume if there
# is one, else scratch (for torchrun --max-restarts: a restarted job continues from its last checkpoint); or GPT-2
# weights (tools/hf.py): "gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl" or a local Hugging Face model directory (GPT-2
# or Llama), which the model then takes its sizes and vocabulary from (the model keys are not used); a run
# started from them resumes its own newest checkpoint when out_dir has one (torchtitan's initial_load_path)
checkpoint_interval = 0  # also save every this many iterations, whatever eval does (0: only at eval, as nanoGPT)
keep_checkpoints = 2  # keep the newest k complete checkpoints in out_dir/checkpoints (0: all)
async_checkpoint = False  # copy the state to CPU memory and write it in the background while training goes on
# wandb logging (WANDB_MODE=offline works without a network)
wandb_log = False
wandb_project = "nanoparallel"
wandb_run_name = "gpt2"
# data
dataset = "openwebtext"
data_dir = ""  # default: data/<dataset>
gradient_accumulation_steps = 5 * 8  # micro-batches per optimizer step over ALL data-parallel ranks together
batch_size = 12  # micro-batch size (sequences) per rank
eval_batch_size = 0  # sequences per rank of each eval batch (0: batch_size); e.g. a pipeline's global batch
block_size = 1024
# model
n_layer = 12
n_head = 12
n_kv_head = 0  # key/value heads: fewer than n_head is grouped-query attention (Llama 3: 8 of 32); 0: n_head
n_embd = 768
ffn_hidden = 0  # MLP hidden size (and each expert's); 0: 4 x n_embd (gpt2), 8/3 x n_embd rounded up to 64 (llama)
vocab_size = 0  # 0: the dataset's (data_dir/meta.pkl; GPT-2's 50304 without one)
dropout = 0.0
bias = False
block = "gpt2"  # "gpt2", or "llama" (RMSNorm, RoPE, SwiGLU, no biases)
rope_theta = 10000.0  # llama block: RoPE's base (Llama 3: 500000)
# mixture of experts (model.py's MoE: dropless top-k routing, Switch Transformer's load-balancing loss)
n_expert = 0  # routed experts in each MoE block; 0: a dense model
n_expert_per_token = 2  # top-k: the experts each token goes to
moe_every = 1  # block i is an MoE block iff i % moe_every == 0 (2: every other block, as Switch Transformer)
n_shared_expert = 0  # always-on experts beside the routed ones (DeepSeekMoE), an MLP of n_shared_expert x ffn_hidden
moe_aux_loss_coef = 0.01  # weight of the load-balancing loss in the gradient (logged apart from the loss)
# AdamW
learning_rate = 6e-4
max_iters = 600000
weight_decay = 1e-1
beta1 = 0.9
beta2 = 0.95
grad_clip = 1.0  # clip gradients at this global norm; 0 disables clipping
# learning rate schedule: linear warmup, then cosine decay to min_lr (Chinchilla)
decay_lr = True
warmup_iters = 2000
lr_decay_iters = 600000
min_lr = 6e-5
# parallelism (see parallel/__init__.py; python -c "import parallel; print(parallel.available())")
parallel = "single"  # strategy: single, ddp, ...
variant = "pytorch"  # pytorch (the native API) or custom (the algorithm written out)
bucket_cap_mb = 25.0  # ddp: gradient bucket size in MiB
zero_stage = 0  # ddp and 3d (dp_type="ddp"): ZeRO stage, 0 DDP, 1 optimizer states sharded, 2 and gradients (3: fsdp)
reshard_after_forward = "default"  # fsdp: "always" free a unit's gathered parameters after its forward, "never" keep
# them to backward (1x DDP traffic), "default": always, but never inside a pipeline (torchtitan's policy)
sequence_parallel = False  # tp: shard activations outside attention/MLP along the sequence (Korthikanti et al. 2022)
loss_parallel = False  # tp: cross-entropy on vocab-sharded logits, never gathering the full vocabulary
pp_schedule = "1f1b"  # pp: gpipe, 1f1b, interleaved_1f1b (+ what torch ships); micro-batches =
# gradient_accumulation_steps / dp
pp_virtual_stages = 1  # pp: model chunks per rank (virtual stages) for interleaved schedules
pp_split = ""  # pp: comma-separated first layer of each stage after the first, e.g. "3,6,9"; "" = balanced
dp_size = 0  # 3d: data-parallel size (0: world_size / (pp_size * tp_size))
pp_size = 0  # 3d: pipeline-parallel size (0: the whole world for pp, 1 for 3d)
tp_size = 0  # 3d: tensor-parallel size (0: the whole world for tp, 1 for 3d)
cp_size = 0  # 3d: context-parallel size (0: the whole world for cp, 1 for 3d); block_size divisible by 2 * cp_size
cp_type = "ring"  # cp, 3d: "ring" (ring attention, any head count) or "ulysses" (all-to-all; heads divisible by tp*cp)
ep_size = 0  # ep, 3d: expert-parallel size, ranks of dp x cp over which each MoE layer's experts are sharded (0: the
# whole world for ep, 1 for 3d); n_expert divisible by ep_size
dp_type = "fsdp"  # 3d: data parallelism over the dp dimension: "fsdp" (ZeRO-3) or "ddp"
timeout_s = 300  # a collective that waits longer than this fails instead of hanging
# system
dtype = "bfloat16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "float32"  # or float16
compile = True  # torch.compile the model (slow to start on CPU: the CPU configs turn it off)
compile_backend = "inductor"
seed = 1337
# memory and profiling (parallel.apply_ac, tools/profiling.py)
activation_checkpoint = "none"  # "none", "full" (every block recomputed in backward), "selective" (see next)
selective_ac_option = "op"  # selective: "op" (torchtitan's op-level policy on every block) or "N" (every N-th block)
profile = False  # write a torch.profiler Chrome trace per rank to out_dir/profile/ (open at ui.perfetto.dev)
profile_start = 5  # first profiled iteration
profile_steps = 3  # profiled iterations
memory_snapshot = False  # CUDA: record the allocator's history, dump out_dir/memory_snapshot/rank{r}.pickle
memory_snapshot_step = 5  # ... once this iteration is done (open at pytorch.org/memory_viz)
# -----------------------------------------------------------------------------
DEFAULTS = {k: v for k, v in globals().items() if not k.startswith("_") and isinstance(v, (int, float, bool, str))}


def main(argv):
    cfg = SimpleNamespace(**check_train_config(load_config(DEFAULTS, argv)))  # every bad value: one line, before
    check_out_dir(cfg.out_dir, cfg.init_from, saves=not cfg.eval_only)  # any process group can hang
    device = init_distributed(cfg.timeout_s)
    check_profiling_config(cfg, device)
    preemption = Preemption()
    strategy = build_strategy(cfg, device)
    master = strategy.is_logger
    torch.manual_seed(cfg.seed + strategy.rank)  # dropout masks differ per rank; the init does not (init_seed)
    os.makedirs(cfg.out_dir, exist_ok=True)

    # data: uint16 token files written by data/<dataset>/prepare.py, read through np.memmap
    data_dir = cfg.data_dir or os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", cfg.dataset)
    vocab_size = cfg.vocab_size or read_vocab_size(data_dir)
    weights = None
    # GPT-2 or Llama weights (tools/hf.py): their sizes and vocabulary (GPT-2's tanh GELU)
    if is_hf_source(cfg.init_from):
        pretrained_config, weights = load_pretrained(cfg.init_from, cfg.block_size, cfg.dropout, cfg.seed)
        vocab_size = check_data_vocab(data_dir, pretrained_config.vocab_size)
    tokens = {split: open_tokens(data_dir, split, cfg.dataset, cfg.block_size, vocab_size)
              for split in ("train", "val")}

    def get_batch(split, step, micro_step, micro_steps, eval=False):
        """This rank's micro-batch `micro_step` of global batch `step`: x, y (batch_size, block_size) int64
        (eval batches: eval_batch_size rows, if set).

        A global batch is micro_steps x dp_size x batch_size sequences at offsets drawn from a generator seeded by
        (seed, split, eval, step): the same on every rank and for any dp size, so every strategy sees the single
        run's data, and a resumed run needs no data state beyond the step. Micro-batch k of data-parallel rank r
        is rows (k * dp_size + r) * batch_size onwards.
        """
        data, B, T = tokens[split], (eval and cfg.eval_batch_size) or cfg.batch_size, cfg.block_size
        rng = np.random.default_rng([cfg.seed, ("train", "val").index(split), int(eval), step])
        offsets = rng.integers(0, len(data) - T, size=micro_steps * strategy.dp_size * B)
        start = (micro_step * strategy.dp_size + strategy.dp_rank) * B
        rows = torch.from_numpy(np.stack([data[i:i + T + 1] for i in offsets[start:start + B]]).astype(np.int64))
        x, y = rows[:, :-1].contiguous(), rows[:, 1:].contiguous()
        if device.type == "cuda":
            return x.pin_memory().to(device, non_blocking=True), y.pin_memory().to(device, non_blocking=True)
        return x, y

    # model, optimizer, and the state a checkpoint restores
    model_config = GPTConfig(block_size=cfg.block_size, vocab_size=vocab_size, n_layer=cfg.n_layer, n_head=cfg.n_head,
                             n_embd=cfg.n_embd, dropout=cfg.dropout, bias=cfg.bias, block=cfg.block, init_seed=cfg.seed,
                             n_kv_head=cfg.n_kv_head, ffn_hidden=cfg.ffn_hidden, rope_theta=cfg.rope_theta,
                             n_expert=cfg.n_expert, n_expert_per_token=cfg.n_expert_per_token, moe_every=cfg.moe_every,
                             n_shared_expert=cfg.n_shared_expert, moe_aux_loss_coef=cfg.moe_aux_loss_coef)
    if weights is not None:
        model_config = pretrained_config
    checkpoints = Checkpointer(cfg.out_dir, strategy, keep=cfg.keep_checkpoints, asynchronous=cfg.async_checkpoint)
    # None: from scratch (or GPT-2's weights); a run started from GPT-2's weights resumes its own newest checkpoint
    resume_path = checkpoints.resume_path("auto" if weights is not None else cfg.init_from)
    if resume_path is not None:  # a checkpoint of another model is refused before anything is built or loaded
        saved = asdict(GPTConfig(**load_extra(resume_path)["model_args"]))  # keys newer than the checkpoint: defaults
        diff = [f"{k} {saved.get(k)!r} (checkpoint) vs {v!r} (config)" for k, v in asdict(model_config).items()
                if saved.get(k) != v]
        if diff:
            raise ValueError(f"checkpoint {resume_path} holds another model: {', '.join(diff)}")
        weights = None  # the checkpoint holds the weights
    elif weights is not None and master:
        print(f"initialising from {cfg.init_from}: block={model_config.block}, n_layer={model_config.n_layer}, "
              f"n_head={model_config.n_head}, n_kv_head={model_config.n_kv_head}, n_embd={model_config.n_embd}, "
              f"vocab_size={model_config.vocab_size}, bias={model_config.bias}")
    strategy.build_model(model_config, weights)
    del weights
    optimizer = strategy.configure_optimizer()
    scaler = torch.amp.GradScaler(device.type, enabled=cfg.dtype == "float16")
    iter_num, best_val_loss = 0, 1e9
    if resume_path is not None:
        t_load = time.time()
        ckpt = strategy.load_checkpoint(resume_path, optimizer)
        iter_num, best_val_loss = ckpt["iter_num"], ckpt["best_val_loss"]
        scaler.load_state_dict(ckpt["scaler"])
        set_rng_state(ckpt["rng"], strategy)
        checkpoints.last_iter = iter_num
        if master:
            print(f"resuming from {resume_path} at iteration {iter_num} (loaded in {time.time() - t_load:.2f} s)")

    tokens_per_iter = cfg.gradient_accumulation_steps * cfg.batch_size * cfg.block_size
    flops_per_iter = flops_per_token(model_config) * tokens_per_iter
    if master:
        local = [p.to_local() if isinstance(p, DTensor) else p for g in optimizer.param_groups for p in g["params"]]
        n_params = sum(p.numel() for p in local)
        print(f"{strategy.strategy}/{strategy.variant} on {strategy.world_size} process(es), data-parallel size "
              f"{strategy.dp_size}, {strategy.grad_accum} micro-batch(es) of {cfg.batch_size} per rank per step; "
              f"{n_params / 1e6:.2f}M parameters on this rank; {tokens_per_iter:,} tokens per iteration")
    device_name, peak = peak_flops(device, cfg.dtype)
    if master and device.type == "cuda":
        print(f"MFU against {device_name}'s dense {cfg.dtype} peak, {peak / 1e12:.1f} TFLOP/s" if peak else
              f"no MFU: no peak FLOP/s known for {device_name} (profiling.PEAK_FLOPS)")

    def get_lr(it):
        """Linear warmup for warmup_iters, cosine decay to min_lr at lr_decay_iters, then min_lr (nanoGPT)."""
        if it < cfg.warmup_iters:
            return cfg.learning_rate * (it + 1) / (cfg.warmup_iters + 1)
        if it > cfg.lr_decay_iters:
            return cfg.min_lr
        ratio = (it - cfg.warmup_iters) / (cfg.lr_decay_iters - cfg.warmup_iters)
        return cfg.min_lr + 0.5 * (1.0 + math.cos(math.pi * ratio)) * (cfg.learning_rate - cfg.min_lr)

    @torch.no_grad()
    def estimate_loss():
        """Mean loss over eval_iters fixed batches of each split; every rank takes part (and gets the result)."""
        return {split: torch.stack([strategy.eval_loss(*get_batch(split, k, 0, 1, eval=True))
                                    for k in range(cfg.eval_iters)]).mean().item() for split in ("train", "val")}

    run = None
    if cfg.wandb_log and master:
        import wandb
        run = wandb.init(project=cfg.wandb_project, name=cfg.wandb_run_name, config=vars(cfg), dir=cfg.out_dir)

    def log(metrics):
        """One metrics record: to wandb when enabled, and appended to out_dir/metrics.jsonl, with time_s, the wall
        seconds since this process entered the training loop (what plot.py draws the curves against)."""
        metrics["time_s"] = round(time.time() - t_start, 3)
        if run is not None:
            run.log(metrics, step=metrics["iter"])
        with open(os.path.join(cfg.out_dir, "metrics.jsonl"), "a") as f:
            f.write(json.dumps(metrics) + "\n")

    def save_checkpoint(asynchronous=None, after_write=None):
        """Save this iteration's checkpoint (every rank takes part; nothing if it exists already) and log how long
        it held up the loop (an async save: the copy to CPU memory)."""
        t_save = time.time()
        step = checkpoints.save(iter_num, optimizer, {
            "model_args": asdict(model_config), "iter_num": iter_num, "best_val_loss": best_val_loss,
            "config": vars(cfg), "scaler": scaler.state_dict(), "rng": gather_rng_state(strategy)},
            asynchronous=asynchronous, after_write=after_write)
        if master and step is not None:
            background = checkpoints.pending is not None
            print(f"{'writing' if background else 'saved'} checkpoint {step} "
                  f"({time.time() - t_save:.3f} s in the loop)")
            log({"iter": iter_num, "checkpoint_s": time.time() - t_save, "checkpoint_async": background})

    # training loop
    t0 = t_start = time.time()
    profiler = TrainingProfiler(cfg, device, strategy.rank, iter_num)
    while True:
        lr = get_lr(iter_num) if cfg.decay_lr else cfg.learning_rate
        for group in optimizer.param_groups:
            group["lr"] = lr

        if iter_num % cfg.eval_interval == 0 or iter_num == cfg.max_iters or cfg.eval_only:
            losses = estimate_loss()
            if master:
                print(f"step {iter_num}: train loss {losses['train']:.4f}, val loss {losses['val']:.4f}")
                log({"iter": iter_num, "train/loss_eval": losses["train"], "val/loss": losses["val"], "lr": lr})
            if iter_num > 0 and (losses["val"] < best_val_loss or cfg.always_save_checkpoint):
                best_val_loss = min(best_val_loss, losses["val"])
                save_checkpoint(after_write=lambda: fault_hook("save", iter_num, strategy.rank))
            t0 = time.time()
        if cfg.checkpoint_interval and iter_num % cfg.checkpoint_interval == 0 and 0 < iter_num and not cfg.eval_only:
            save_checkpoint(after_write=lambda: fault_hook("save", iter_num, strategy.rank))
            t0 = time.time()
        if iter_num >= cfg.max_iters or cfg.eval_only:
            break
        if preemption.agreed(strategy):  # a step boundary: every rank saves this iteration's checkpoint, exits 0
            if master:
                print(f"{preemption.agreed_name}: saving a checkpoint at iteration {iter_num} and exiting")
            if iter_num > 0:
                save_checkpoint(asynchronous=False)
            break
        fault_hook("step", iter_num, strategy.rank)

        # one optimizer step over gradient_accumulation_steps micro-batches, split over data-parallel ranks
        batches = [get_batch("train", iter_num, k, strategy.grad_accum) for k in range(strategy.grad_accum)]
        strategy.stats.reset()  # count this step's communication
        loss = strategy.forward_backward(batches, scaler)
        scaler.unscale_(optimizer)
        grad_norm = strategy.clip_grad_norm_(cfg.grad_clip if cfg.grad_clip > 0 else math.inf)
        model_metrics = strategy.model_metrics()  # what the model recorded this step (MoE routing); {} if nothing
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)

        t1 = time.time()
        dt, t0 = t1 - t0, t1
        if iter_num % cfg.log_interval == 0:
            lossf, grad_normf = loss.item(), float(grad_norm)
            peak_mib = peak_memory_per_rank(device)  # every rank takes part
            tflops = flops_per_iter / dt / strategy.world_size / 1e12  # achieved, per process
            if master:
                mfu = f", mfu {100 * tflops * 1e12 / peak:.1f}%" if peak else ""
                extra = "".join(f", {k} {v:.4g}" for k, v in model_metrics.items() if isinstance(v, float))
                print(f"iter {iter_num}: loss {lossf:.4f}, lr {lr:.2e}, {dt * 1000:.1f}ms, "
                      f"{tokens_per_iter / dt:,.0f} tok/s, {tflops:.3f} TFLOP/s per process{mfu}, "
                      f"peak mem {'/'.join(f'{m:.0f}' for m in peak_mib)} MiB{extra}")
                log({"iter": iter_num, "train/loss": lossf, "lr": lr, "grad_norm": grad_normf, "ms_per_iter": dt * 1000,
                     "tokens_per_s": tokens_per_iter / dt, "tflops_per_process": tflops, "peak_mem_mib": peak_mib,
                     **model_metrics, **strategy.stats.as_dict()})
        profiler.step(iter_num)
        iter_num += 1

    profiler.close()
    checkpoints.close()  # the save in flight, if any, is written (its error raised) before the job ends
    if run is not None:
        run.finish()
    strategy.close()
    return 0


# -----------------------------------------------------------------------------
# data files and RNG state

def read_vocab_size(data_dir):
    """vocab_size from data_dir/meta.pkl written by the prepare script; GPT-2's 50304 (50257 padded) without one."""
    meta_path = os.path.join(data_dir, "meta.pkl")
    if not os.path.isfile(meta_path):
        return 50304
    with open(meta_path, "rb") as f:
        vocab = pickle.load(f)["vocab_size"]
    return 50304 if vocab == 50257 else vocab


def check_data_vocab(data_dir, model_vocab):
    """The vocab_size for pretrained weights of `model_vocab` tokens on data_dir's tokens: model_vocab, if data_dir's
    meta.pkl (if any) names the same vocabulary (or one that model_vocab pads to a multiple of 64); ValueError else."""
    meta_path = os.path.join(data_dir, "meta.pkl")
    if os.path.isfile(meta_path):
        with open(meta_path, "rb") as f:
            data_vocab = pickle.load(f)["vocab_size"]
        if data_vocab != model_vocab and not (data_vocab < model_vocab and model_vocab == -(-data_vocab // 64) * 64):
            raise ValueError(f"the pretrained model has {model_vocab} tokens but {meta_path} describes {data_vocab}: "
                             f"prepare the data with the model's tokenizer (GPT-2 BPE: data/shakespeare/prepare.py)")
    return model_vocab


def open_tokens(data_dir, split, dataset, block_size, vocab_size):
    """np.memmap over data_dir/<split>.bin (uint16 tokens). Raises FileNotFoundError or ValueError, naming the
    file and the prepare command, if it is missing, not whole uint16 tokens, too short for one block, or holds
    ids >= vocab_size (checked on its first million tokens)."""
    path = os.path.join(data_dir, f"{split}.bin")
    fix = f"run `python data/{dataset}/prepare.py` (or set data_dir)"
    if not os.path.isfile(path):
        raise FileNotFoundError(f"data file {path} not found: {fix}")
    size = os.path.getsize(path)
    if size % 2 or size // 2 <= block_size:
        raise ValueError(f"data file {path} is malformed ({size} bytes: not whole uint16 tokens or fewer than "
                         f"block_size+1={block_size + 1}): {fix}")
    data = np.memmap(path, dtype=np.uint16, mode="r")
    top = int(data[:2**20].max())
    if top >= vocab_size:
        raise ValueError(f"data file {path} holds token id {top} >= vocab_size {vocab_size} (meta.pkl of another "
                         f"tokenizer?): {fix}")
    return data


def gather_rng_state(strategy):
    """Every rank's torch RNG states (CPU, and CUDA if used), as a list indexed by rank; all ranks take part."""
    state = {"cpu": torch.get_rng_state()}
    if strategy.device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(strategy.device)
    if strategy.world_size == 1:
        return [state]
    states = [None] * strategy.world_size
    dist.all_gather_object(states, state)
    return [{k: v.cpu() for k, v in s.items()} for s in states]


def set_rng_state(states, strategy):
    """Restore this rank's RNG state saved by gather_rng_state (only if the world size is unchanged)."""
    if len(states) != strategy.world_size:
        if strategy.is_logger:
            print(f"warning: checkpoint has RNG states for {len(states)} ranks, "
                  f"not {strategy.world_size}; not restored")
        return
    # both setters take CPU ByteTensors only; a one-file checkpoint is loaded onto the device (load_checkpoint_file)
    state = {k: v.cpu() for k, v in states[strategy.rank].items()}
    torch.set_rng_state(state["cpu"])
    if "cuda" in state and strategy.device.type == "cuda":
        torch.cuda.set_rng_state(state["cuda"], strategy.device)


# -----------------------------------------------------------------------------
# preemption, and the tests' fault injection

class Preemption:
    """SIGTERM or SIGUSR1 (what Slurm sends before it kills a job; torchrun passes SIGTERM on to its workers) asks
    for a checkpoint and a clean exit. The handler only records the signal; at each step boundary agreed()
    all-reduces it (MAX over ranks: one 4-byte collective per step), so every rank stops at the same iteration and
    they save together, whichever ranks received it: no rank saves alone."""

    SIGNALS = (signal.SIGTERM, signal.SIGUSR1)

    def __init__(self):
        self.received, self.agreed_name = 0, None
        for s in self.SIGNALS:
            signal.signal(s, self._handler)

    def _handler(self, signum, frame):
        self.received = signum  # os.write, not print: a print interrupted by a handler that prints raises
        os.write(2, f"rank {os.environ.get('RANK', 0)}: {signal.Signals(signum).name}: checkpoint at the next step "
                    f"boundary, then exit\n".encode())

    def agreed(self, strategy):
        """Whether any rank received one of SIGNALS (the same answer on every rank); collective."""
        flag = torch.tensor([self.received], dtype=torch.int32, device=strategy.device)
        if strategy.world_size > 1:
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        if flag.item():
            self.agreed_name = signal.Signals(int(flag.item())).name
        return bool(flag.item())


FAULTS = {"kill": signal.SIGKILL, "stop": signal.SIGSTOP, "term": signal.SIGTERM, "save-kill": signal.SIGKILL}


def fault_hook(point, iter_num, rank):
    """Test hook (tests/test_fault.py), inert unless NANOPARALLEL_FAULT="ACTION:RANK:ITER" is set: rank RANK signals
    itself at iteration ITER of a job's first attempt only (torchrun's TORCHELASTIC_RESTART_COUNT 0), so a
    restarted job runs clean. At the start of step ITER, after the step boundary's preemption check (point "step"):
    kill (SIGKILL), stop (SIGSTOP), term (SIGTERM: the checkpoint is that of ITER + 1); while saving the checkpoint
    of ITER, once this rank's part is written (point "save"): save-kill (SIGKILL)."""
    spec = os.environ.get("NANOPARALLEL_FAULT")
    if not spec or os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") != "0":
        return
    action, fault_rank, fault_iter = spec.split(":")
    if (int(fault_rank), int(fault_iter), action == "save-kill") != (rank, iter_num, point == "save"):
        return
    print(f"fault: rank {rank} (pid {os.getpid()}) sends itself {FAULTS[action].name} at iteration {iter_num} "
          f"({point})", flush=True)
    signal.raise_signal(FAULTS[action])


if __name__ == "__main__":
    exit_code = 1
    try:
        exit_code = main(sys.argv[1:])
    except (ConfigError, ValueError, OSError) as e:  # bad input, a missing file, a full disk: one line
        print(f"error: {e}", file=sys.stderr)
    except BaseException as e:
        line = describe_comm_error(e)  # a collective that timed out or lost its peer: one line naming it
        if line is not None:
            print(f"error: rank {os.environ.get('RANK', 0)}: {line}", file=sys.stderr)
        else:
            import traceback
            traceback.print_exc()
    finally:
        for sig in Preemption.SIGNALS:  # training is over: a signal now ends the process as usual
            signal.signal(sig, signal.SIG_DFL)
        teardown(exit_code)
