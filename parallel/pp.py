"""
Pipeline parallelism: the GPT's layers cut into stages, one (or v) per rank, micro-batches flowing through them.

    torchrun --standalone --nproc_per_node=2 train.py config/train_shakespeare_char_pp_custom_cpu.py

Splitting. The blocks are cut into S = p * v contiguous virtual stages (p ranks, v chunks per rank): stage 0 also
holds the token/position embeddings, stage S-1 the final norm, the lm_head and the loss. `pp_split="3,6,9"` gives
the first layer of every stage after the first; "" picks the split minimising the costliest stage, counting a
block as its forward FLOPs per token and the head as n_embd * vocab_size (`balanced_split`). Stage s lives on rank
s % p ("looped" placement, Narayanan et al. 2021), so with v > 1 a rank holds v non-adjacent chunks. Each rank
builds only its own chunks (meta device, then `init_parameter_` by name: bitwise the full model's values).
The lm_head is tied to the token embedding: the first and last stages each hold a copy, initialised alike, and
after every backward the two gradients are summed (one exchange between those two ranks), so the copies stay equal.

Two variants:
- `pytorch`: torch.distributed.pipelining's PipelineStage + ScheduleGPipe / Schedule1F1B /
  ScheduleInterleaved1F1B / ScheduleLoopedBFS / ScheduleInterleavedZeroBubble (cfg.pp_schedule).
- `custom`: the schedules written out with the send/recv of parallel/comm.py. Every schedule is a per-rank list
  of actions ("F"|"B", stage, micro-batch) (`schedule_order`); one executor runs any of them:
    GPipe (Huang et al. 2019):       all m forwards, then all m backwards.             in flight <= m
    1F1B (PipeDream-flush, Narayanan et al. 2019; Megatron): p-rank-1 warm-up forwards, then one forward /
                                     one backward, then the cool-down backwards.       in flight <= p - rank
    interleaved 1F1B (Narayanan et al. 2021, "Efficient large-scale language model training on GPU clusters",
                                     section 2.2): v chunks per rank, forwards in rounds of p micro-batches per
                                     chunk, warm-up (p-rank-1)*2 + (v-1)*p.             in flight <= warm-up + 1
  Shapes are known in advance: every activation and gradient is (micro-batch, T, n_embd) float32, so a message is
  one tensor, no shape handshake. Sends are asynchronous (isend) and receives blocking, and each rank receives from
  a given peer in exactly the order that peer sends (every rank can compute every rank's action list, so the
  expected sequence is known; a message needed later is received early and buffered). Any schedule whose action
  lists are a valid order of the dependency graph therefore runs without deadlock (checked by `simulate`).
  The loss of each micro-batch is backpropagated unscaled and the gradients divided by m at the end (as PyTorch's
  schedules do), so the gradients are those of the mean loss over micro-batches, the non-pipelined gradients.

Both variants record, per rank, when each forward/backward ran (`strategy.timeline`); parallel/pp_timeline.py draws
it and compares the measured bubble with the formula (p-1)/(v*m + p-1) (`formula_bubble`).

Communication per step (custom, activations A = B*T*n_embd*4 bytes): every stage boundary carries m activations
forward and m gradients backward, i.e. 2*m*(S-1)*A bytes over all ranks, plus the tied-embedding gradient exchange
(V*n_embd*4 each way between the first and last rank), a scalar broadcast of the loss and one scalar all-reduce
for the gradient norm.

The logged loss is the last stage's mean over micro-batches, broadcast to every rank. dp_size is 1: every rank
reads the same micro-batches (only the first stage uses the inputs and the last the targets).

A third variant, `rpc` (at the end of this file): GPipe driven by rank 0 through torch.distributed.rpc, remote stage
modules held by their ranks, RRefs, distributed autograd (`RpcPipeline`; needs `strategy.close()` before teardown).
"""

import contextlib
import os
import socket
import threading
import time

import torch
import torch.distributed as dist
import torch.distributed.autograd as dist_autograd
import torch.distributed.rpc as rpc
import torch.nn as nn
import torch.nn.functional as F

from model import GPT, init_parameter_
from parallel import Strategy, register

CUSTOM_SCHEDULES = ("gpipe", "1f1b", "interleaved_1f1b")
PYTORCH_SCHEDULES = ("gpipe", "1f1b", "interleaved_1f1b", "looped_bfs", "interleaved_zero_bubble")
MULTI_CHUNK = ("interleaved_1f1b", "looped_bfs", "interleaved_zero_bubble")  # need pp_virtual_stages >= 2
WTE, HEAD = "transformer.wte.weight", "lm_head.weight"


# ----------------------------------------------------------------------------------------------------------
# splitting

def stage_costs(model_config):
    """(block, embedding, head) relative forward costs per token: a block's matmul FLOPs (12 C^2) plus attention
    (2 T C), the embedding lookup ~C, the head's matmul C*V (the loss is small beside it)."""
    C, T, V = model_config.n_embd, model_config.block_size, model_config.vocab_size
    return 12 * C * C + 2 * T * C, C, C * V


def balanced_split(n_layer, n_stages, costs):
    """Boundaries [0, b1, ..., n_layer] of n_stages contiguous non-empty layer ranges minimising the costliest
    stage, where stage 0 also pays the embedding and the last stage the head (costs = (block, embed, head))."""
    block, embed, head = costs
    best = {}  # (stage, first layer) -> (max cost of stages stage.. given they start at first, next boundary)

    def cost(s, lo, hi):
        return (hi - lo) * block + (embed if s == 0 else 0) + (head if s == n_stages - 1 else 0)

    for s in reversed(range(n_stages)):
        for lo in range(s, n_layer - (n_stages - s) + 1):
            if s == n_stages - 1:
                best[s, lo] = (cost(s, lo, n_layer), n_layer)
                continue
            best[s, lo] = min((max(cost(s, lo, hi), best[s + 1, hi][0]), hi)
                              for hi in range(lo + 1, n_layer - (n_stages - s - 1) + 1))
    bounds, lo = [0], 0
    for s in range(n_stages):
        lo = best[s, lo][1]
        bounds.append(lo)
    return bounds


def split_layers(n_layer, n_stages, pp_split="", costs=(1, 0, 0)):
    """[(first, end)] layer range of each of n_stages stages. pp_split: comma-separated first layer of each stage
    after the first ("" = balanced_split). Raises ValueError (one line) for an impossible split."""
    if n_stages > n_layer:
        raise ValueError(f"pipeline has {n_stages} stages (pp_size x pp_virtual_stages) but the model only "
                         f"{n_layer} layers: every stage needs at least one layer")
    if pp_split.strip():
        try:
            firsts = [int(s) for s in pp_split.split(",")]
        except ValueError:
            raise ValueError(f"pp_split={pp_split!r} must be comma-separated integers (first layer of each stage "
                             f"after the first)") from None
        bounds = [0, *firsts, n_layer]
        if len(firsts) != n_stages - 1 or any(a >= b for a, b in zip(bounds, bounds[1:])):
            raise ValueError(f"pp_split={pp_split!r} must give {n_stages - 1} strictly increasing layer indices "
                             f"in 1..{n_layer - 1} (one per stage after the first)")
    else:
        bounds = balanced_split(n_layer, n_stages, costs)
    return list(zip(bounds, bounds[1:]))


class StageModule(nn.Module):
    """Virtual stage `stage` of n_stages of the GPT: blocks [lo, hi), plus the embeddings if first, plus ln_f and
    lm_head if last. Parameter names are the full GPT's (transformer.h.5.attn...). forward: token ids (B, T)
    (first stage) or activations (B, T, n_embd) -> activations, or logits (B, T, vocab) on the last stage.
    Built on the meta device and, if `device` is given, materialised there with the full model's initial values."""

    def __init__(self, config, stage, n_stages, lo, hi, device=None):
        super().__init__()
        self.config, self.stage, self.lo, self.hi = config, stage, lo, hi
        self.first, self.last = stage == 0, stage == n_stages - 1
        with torch.device("meta"):
            gpt = GPT(config)
        parts = {"h": nn.ModuleDict({str(i): gpt.transformer.h[str(i)] for i in range(lo, hi)})}
        if self.first:
            parts |= {k: gpt.transformer[k] for k in ("wte", "wpe", "drop") if k in gpt.transformer}
        if self.last:
            parts["ln_f"] = gpt.transformer.ln_f
        self.transformer = nn.ModuleDict(parts)
        if self.last:
            self.lm_head = gpt.lm_head
        if device is not None:
            self.materialize(device)

    def materialize(self, device, init=None):
        """Allocate the (meta) parameters on `device` and give each its initial value: init(full GPT name, tensor),
        by default model.init_parameter_ (the head's copy gets the embedding's values). The 3d strategy passes an
        init that keeps a tensor-parallel slice of the full init."""
        init = init or (lambda name, t: init_parameter_(name, t, self.config))
        self.to_empty(device=device)
        if self.first and self.last:
            self.lm_head.weight = self.transformer.wte.weight
        for name, p in self.named_parameters():
            init(WTE if name == HEAD else name, p)

    def forward(self, x):
        tr = self.transformer
        if self.first:
            T = x.shape[1]
            if T > self.config.block_size:
                raise ValueError(f"sequence length {T} exceeds block_size {self.config.block_size}")
            x = tr.wte(x)
            if "wpe" in tr:
                x = x + tr.wpe(torch.arange(T, device=x.device))
            x = tr.drop(x)
        for block in tr.h.values():
            x = block(x)
        if self.last:
            x = self.lm_head(tr.ln_f(x))
        return x


def cross_entropy(logits, targets):
    """GPT.forward's loss: mean cross-entropy over all positions, ignore_index=-1."""
    return F.cross_entropy(logits.reshape(-1, logits.size(-1)).float(), targets.reshape(-1), ignore_index=-1)


class LocalStages(nn.Module):
    """This rank's chunks (StageModules, in stage order) as one module; `model` of the pp strategies. Its
    parameters are this rank's; `estimate_mfu` is the full GPT's (the config's)."""

    estimate_mfu = GPT.estimate_mfu

    def __init__(self, config, chunks):
        super().__init__()
        self.config = config
        self.chunks = nn.ModuleList(chunks)

    def named_stage_parameters(self):
        """(full GPT name, parameter) of every parameter this rank holds, each once."""
        seen, out = set(), []
        for chunk in self.chunks:
            for name, p in chunk.named_parameters():
                if id(p) not in seen:
                    seen.add(id(p))
                    out.append((name, p))
        return out


# ----------------------------------------------------------------------------------------------------------
# schedules as action lists, their dependency graph, and the unit-cost bubble

def stage_rank(stage, p):
    """The rank holding virtual stage `stage` (looped placement)."""
    return stage % p


def schedule_order(name, p, v, m, rank):
    """The actions of `rank` for one step, in order: [("F" | "B", stage, micro-batch)], for the custom schedules
    gpipe, 1f1b (v = 1) and interleaved_1f1b (v >= 2, m a multiple of p)."""
    if name == "gpipe":
        return [("F", rank, k) for k in range(m)] + [("B", rank, k) for k in range(m)]
    if name == "1f1b":
        warmup = min(p - rank - 1, m)
        order = [("F", rank, k) for k in range(warmup)]
        for i in range(m - warmup):
            order += [("F", rank, warmup + i), ("B", rank, i)]
        return order + [("B", rank, k) for k in range(m - warmup, m)]
    if name == "interleaved_1f1b":
        total, warmup = v * m, interleaved_warmup(p, v, m, rank)

        def action(kind, k):  # the k-th forward (backward) runs micro-batch mb of local chunk c
            c = (k // p) % v
            mb = (k // (p * v)) * p + k % p
            return kind, (c if kind == "F" else v - 1 - c) * p + rank, mb

        order = [action("F", k) for k in range(warmup)]
        for i in range(total - warmup):
            order += [action("F", warmup + i), action("B", i)]
        return order + [action("B", k) for k in range(total - warmup, total)]
    raise ValueError(f"no custom pipeline schedule {name!r}; custom schedules: {', '.join(CUSTOM_SCHEDULES)}")


def interleaved_warmup(p, v, m, rank):
    """Forwards before the first backward on `rank` in interleaved 1F1B (Megatron-LM's count)."""
    return min((p - rank - 1) * 2 + (v - 1) * p, v * m)


def in_flight_bound(name, p, v, m, rank):
    """Most micro-batches whose activations `rank` holds at once (forward done, backward not yet), per schedule."""
    if name == "gpipe":
        return m
    if name == "1f1b":
        return min(p - rank, m)
    return min(interleaved_warmup(p, v, m, rank) + 1, v * m)


def formula_bubble(p, m, v=1):
    """Pipeline bubble fraction of (interleaved) 1F1B and GPipe: (p-1) / (v*m + p-1) (Narayanan et al. 2021)."""
    return (p - 1) / (v * m + p - 1)


def dependencies(kind, stage, mb, n_stages):
    """The actions that must finish before (kind, stage, mb) can start."""
    if kind == "F":
        return [("F", stage - 1, mb)] if stage > 0 else []
    return [("F", stage, mb)] + ([("B", stage + 1, mb)] if stage < n_stages - 1 else [])


def simulate(orders, n_stages, cost={"F": 1.0, "B": 2.0}):
    """Run per-rank action lists with fixed costs and free communication, each action as early as its rank and its
    dependencies allow. Returns per-rank events [(kind, stage, mb, start, end)]. Raises RuntimeError if the
    lists deadlock (an action waits for one that a rank can never reach)."""
    done, events = {}, [[] for _ in orders]
    ptr, clock = [0] * len(orders), [0.0] * len(orders)
    total = sum(map(len, orders))
    while len(done) < total:
        progress = False
        for r, order in enumerate(orders):
            while ptr[r] < len(order):
                action = order[ptr[r]]
                deps = dependencies(*action, n_stages)
                if any(d not in done for d in deps):
                    break
                start = max([clock[r]] + [done[d] for d in deps])
                clock[r] = done[action] = start + cost[action[0]]
                events[r].append((*action, start, clock[r]))
                ptr[r] += 1
                progress = True
        if not progress:
            stuck = {r: order[ptr[r]] for r, order in enumerate(orders) if ptr[r] < len(order)}
            raise RuntimeError(f"pipeline schedule deadlocks; next actions per rank: {stuck}")
    return events


def bubble_fraction(events):
    """Idle fraction of the pipeline: 1 - busy time / (ranks * makespan), from per-rank events
    [(kind, stage, mb, start, end)] (recorded or simulated)."""
    start = min(e[3] for rank in events for e in rank)
    end = max(e[4] for rank in events for e in rank)
    busy = sum(e[4] - e[3] for rank in events for e in rank)
    return 1.0 - busy / (len(events) * (end - start))


# ----------------------------------------------------------------------------------------------------------
# the strategy: splitting, checks, everything but the schedule's execution

class Pipeline(Strategy):
    """Pipeline parallel over one process group: the world here; parallel/3d.py hands in its PP group (and a data-
    parallel coordinate) by overriding `pp_process_group` and `data_parallel`. Subclasses implement `_step(batches)`
    (forward+backward of one optimizer step, returning the last stage's per-micro-batch losses there and None
    elsewhere)."""

    checkpoint_name = "ckpt"
    schedules = ()
    min_stages = 2  # a 1-D pipeline needs 2 ranks; 3d allows pp=1

    def __init__(self, cfg, device):
        super().__init__(cfg, device)
        self.dp_rank, self.dp_size, self.dp_group = self.data_parallel()
        self.pp_group = self.pp_process_group()
        self.comm = self.collectives(self.pp_group)
        self.pp_rank, self.pp_size = self.comm.rank, self.comm.world_size
        self.group_ranks = (dist.get_process_group_ranks(self.pp_group) if self.pp_group is not None
                            else list(range(self.world_size)))
        self.m = self.grad_accum  # micro-batches per step through this rank's pipeline
        self.v = cfg.pp_virtual_stages
        self.n_stages = self.pp_size * self.v
        self.check_config(cfg)
        self.my_stages = [s for s in range(self.n_stages) if stage_rank(s, self.pp_size) == self.pp_rank]
        self.first_rank, self.last_rank = stage_rank(0, self.pp_size), stage_rank(self.n_stages - 1, self.pp_size)
        self.loss_fn = cross_entropy  # the last stage's loss: (logits, targets) -> mean loss
        self.timeline = []        # this rank's events of the last step: (kind, stage, mb, start, end) seconds
        self.max_in_flight = 0    # most micro-batches with saved activations at once, last step (custom)

    def data_parallel(self):
        """(dp_rank, dp_size, dp_group): one pipeline, every rank reads the same micro-batches."""
        return 0, 1, None

    def pp_process_group(self):
        """The process group of the pipeline: the world (None) for the 1-D strategy."""
        if self.cfg.pp_size not in (0, self.world_size):
            raise ValueError(f"parallel=pp runs one pipeline over all {self.world_size} processes, but "
                             f"pp_size={self.cfg.pp_size}; use pp_size=0 (or parallel=3d to combine with dp/tp)")
        return None

    def check_config(self, cfg):
        """One-line ValueErrors, before any communication, for configurations the pipeline cannot run."""
        p, v, m, name = self.pp_size, self.v, self.m, cfg.pp_schedule
        if p < self.min_stages:
            raise ValueError(f"parallel=pp needs at least 2 processes, got {p}; use parallel=single on one")
        if name not in self.schedules:
            raise ValueError(f"pp_schedule={name!r} is not a {self.variant} pipeline schedule; "
                             f"choose from {', '.join(self.schedules)}")
        if cfg.dtype == "float16":
            raise ValueError("parallel=pp does not support dtype=float16 (no loss scaling across stages); "
                             "use float32 or bfloat16")
        if v < 1:
            raise ValueError(f"pp_virtual_stages must be >= 1, got {v}")
        if name in MULTI_CHUNK and v < 2:
            raise ValueError(f"pp_schedule={name} needs pp_virtual_stages >= 2 (chunks per rank), got {v}")
        if name not in MULTI_CHUNK and v != 1:
            raise ValueError(f"pp_schedule={name} runs one stage per rank; pp_virtual_stages={v} needs "
                             f"an interleaved schedule ({', '.join(s for s in self.schedules if s in MULTI_CHUNK)})")
        if m < 1:
            raise ValueError(f"gradient_accumulation_steps (the pipeline's micro-batches) must be >= 1, got {m}")
        if name in MULTI_CHUNK and (m < p or m % p):
            raise ValueError(f"pp_schedule={name} needs the micro-batches (gradient_accumulation_steps={m}) to be a "
                             f"multiple of the pipeline size {p}, and at least {p}")
        split_layers(cfg.n_layer, self.n_stages, cfg.pp_split)  # raises for an impossible split

    # --- building ---------------------------------------------------------------------------------------

    def build_model(self, model_config):
        """Build this rank's stages only; returns (and keeps as self.model) a LocalStages over them."""
        bounds = split_layers(model_config.n_layer, self.n_stages, self.cfg.pp_split, stage_costs(model_config))
        self.bounds = bounds
        chunks = [StageModule(model_config, s, self.n_stages, *bounds[s], self.device) for s in self.my_stages]
        self.chunk_of = {s: c for s, c in zip(self.my_stages, chunks)}
        self.model = LocalStages(model_config, chunks)
        self.tied_param = self._tied_param()
        if self.cfg.compile:
            for chunk in chunks:
                chunk.compile(backend=self.cfg.compile_backend)
        return self.model

    def _tied_param(self):
        """This rank's copy of the embedding/head weight when the first and last stages live on different ranks
        (their gradients are summed after backward), else None."""
        if self.first_rank == self.last_rank:
            return None
        if self.pp_rank == self.first_rank:
            return self.chunk_of[0].transformer.wte.weight
        if self.pp_rank == self.last_rank:
            return self.chunk_of[self.n_stages - 1].lm_head.weight
        return None

    def configure_optimizer(self):
        cfg = self.cfg
        return GPT.configure_optimizers(self.model, cfg.weight_decay, cfg.learning_rate, (cfg.beta1, cfg.beta2),
                                        self.device.type, params=self.model.named_stage_parameters())

    # --- one step -----------------------------------------------------------------------------------------

    def forward_backward(self, batches, scaler):
        """Run the schedule over the m micro-batches; gradients of the mean loss end up on every stage, the tied
        embedding/head gradient summed over its two copies. Returns the mean loss on every rank."""
        if len(batches) != self.m:
            raise ValueError(f"the pipeline was built for {self.m} micro-batches per step, got {len(batches)}")
        if len({x.shape for x, _ in batches}) != 1:
            raise ValueError("all micro-batches of a pipeline step must have the same shape")
        self.timeline, self._t0 = [], self._aligned_clock()
        losses = self._step(batches)
        self._sum_tied_grads()
        loss = torch.zeros((), device=self.device)
        if losses is not None:
            loss = torch.stack(losses).sum() / len(losses)
        self.comm.broadcast(loss, src=self.last_rank)
        return self.dp_mean(loss)

    def activation_shape(self, x):
        """Shape of what one stage sends the next for input tokens x (B, T): (B, T, n_embd)."""
        return (*x.shape, self.model.config.n_embd)

    def backward_context(self, stage, mb):
        """Context of the backward of micro-batch mb on `stage` (3d: no gradient sync before the last one)."""
        return contextlib.nullcontext()

    def finish_backward(self):
        """Called after the schedule's last backward, before the gradients are divided by m (3d: DP sync)."""

    def grad_parameters(self):
        """The tensors whose .grad the optimizer reads (this rank's stage parameters)."""
        return [p for _, p in self.model.named_stage_parameters()]

    def _aligned_clock(self):
        """A barrier, then this rank's clock: timestamps are recorded relative to it, so ranks' timelines line up."""
        self.comm.barrier()
        return time.perf_counter()

    def _record(self, kind, stage, mb, start):
        self.timeline.append((kind, stage, mb, start - self._t0, time.perf_counter() - self._t0))

    def _sum_tied_grads(self):
        """wte.grad on the first stage's rank and lm_head.grad on the last's <- their sum (the same on both)."""
        p = self.tied_param
        if p is None:
            return
        peer = self.last_rank if self.pp_rank == self.first_rank else self.first_rank
        if p.grad is None:
            p.grad = torch.zeros_like(p)
        other = torch.empty_like(p.grad)
        handle = self.comm.send(p.grad, peer, async_op=True)
        self.comm.recv(other, peer)
        handle.wait()
        p.grad.add_(other)

    def clip_grad_norm_(self, max_norm):
        """Global L2 norm over every stage (squares summed over the pipeline group, the tied weight once)."""
        params = [p for _, p in self.model.named_stage_parameters()]
        counted = [p for p in params if p.grad is not None and not (p is self.tied_param and
                                                                     self.pp_rank != self.first_rank)]
        sq = torch.zeros((), dtype=torch.float32, device=self.device)
        for p in counted:
            sq += p.grad.detach().float().pow(2).sum()
        self.comm.all_reduce(sq, "sum")
        total = sq.sqrt()
        coef = torch.clamp(max_norm / (total + 1e-6), max=1.0)
        for p in params:
            if p.grad is not None:
                p.grad.detach().mul_(coef.to(p.grad.dtype))
        return total

    @torch.no_grad()
    def eval_loss(self, x, y):
        """Forward-only through the pipeline, stage after stage; the loss (last stage) reaches every rank."""
        self.model.eval()
        loss, shape, handles = torch.zeros((), device=self.device), self.activation_shape(x), []
        for s in self.my_stages:
            h = x
            if s > 0:
                h = torch.empty(shape, device=self.device)
                self.comm.recv(h, stage_rank(s - 1, self.pp_size))
            with self.autocast():
                out = self.chunk_of[s](h)
            if s == self.n_stages - 1:
                loss = self.loss_fn(out, y).float()
            else:
                out = out.float().contiguous()
                handles.append((self.comm.send(out, stage_rank(s + 1, self.pp_size), async_op=True), out))
        for handle, _ in handles:
            handle.wait()
        self.model.train()
        self.comm.broadcast(loss, src=self.last_rank)
        return self.dp_mean(loss)

    # --- state -------------------------------------------------------------------------------------------

    def full_state_dict(self):
        """The full GPT's state_dict on every rank (collective over the pipeline group): each rank's stages,
        gathered; lm_head.weight is the tied embedding."""
        local = {}
        for chunk in self.model.chunks:
            local |= {k: v.detach().cpu() for k, v in chunk.state_dict().items()}
        parts = [None] * self.pp_size
        dist.all_gather_object(parts, local, group=self.pp_group)
        full = {}
        for part in parts:
            full |= part
        full[HEAD] = full[WTE]
        return {k: v.to(self.device) for k, v in full.items()}

    def sharded_state_dict(self, optimizer):
        """This rank's parameters and AdamW state as plain tensors keyed by the full GPT's names (every name held
        by one rank, except the optimizer state of the tied weight: both copies are equal and DCP keeps one).
        The head's copy saves its weight as lm_head.weight and its optimizer state under the embedding's name,
        the single model's layout. Missing AdamW state is created (zeros, step 0) so a load has a target."""
        model_sd, optim_sd = {}, {}
        for name, p in self.model.named_stage_parameters():
            model_sd[name] = p.detach()
            state = optimizer.state[p]
            if not state:
                group = next(g for g in optimizer.param_groups if any(q is p for q in g["params"]))
                on_device = group.get("fused") or group.get("capturable")
                state["step"] = (torch.zeros((), dtype=torch.float32, device=p.device) if on_device
                                 else torch.tensor(0.0, dtype=torch.float32))
                state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            optim_sd[WTE if name == HEAD else name] = {k: state[k] for k in ("step", "exp_avg", "exp_avg_sq")}
        return {"model": model_sd, "optim": optim_sd}

    def load_sharded_state_dict(self, state, optimizer):
        """Nothing to do: the DCP load wrote into the live parameters and optimizer state."""


# ----------------------------------------------------------------------------------------------------------
# custom variant: the schedules written out with send/recv

@register("pp", "custom")
class CustomPipeline(Pipeline):
    """GPipe, 1F1B and interleaved 1F1B over parallel/comm.py's send/recv (see the module docstring)."""

    schedules = CUSTOM_SCHEDULES

    def orders(self, m):
        """Every rank's action list for m micro-batches (each rank computes all of them: it needs its peers' send
        order to receive in it)."""
        return [schedule_order(self.cfg.pp_schedule, self.pp_size, self.v, m, r) for r in range(self.pp_size)]

    def _expected_messages(self, orders):
        """{peer: [message keys this rank receives from peer, in the order peer sends them]}. Message keys:
        ("F", s, mb) the output of stage s (to stage s+1), ("B", s, mb) the input gradient of stage s (to s-1)."""
        p, expected = self.pp_size, {}
        for peer, order in enumerate(orders):
            for kind, s, mb in order:
                dst = (stage_rank(s + 1, p) if s < self.n_stages - 1 else None) if kind == "F" else \
                      (stage_rank(s - 1, p) if s > 0 else None)
                if dst == self.pp_rank:
                    expected.setdefault(peer, []).append((kind, s, mb))
        return {peer: iter(keys) for peer, keys in expected.items()}

    def _recv(self, peer, key, shape):
        """The message `key` from `peer`, receiving (and buffering) those the peer sent before it."""
        while key not in self._inbox:
            k = next(self._expected[peer])
            buf = torch.empty(shape, dtype=torch.float32, device=self.device)
            self.comm.recv(buf, peer)
            self._inbox[k] = buf
        return self._inbox.pop(key)

    def _send(self, tensor, peer):
        tensor = tensor.detach().float().contiguous()
        self._outbox.append((self.comm.send(tensor, peer, async_op=True), tensor))
        self._outbox = [(h, t) for h, t in self._outbox if not h.is_completed()]

    def _step(self, batches):
        p, S, m = self.pp_size, self.n_stages, len(batches)
        orders = self.orders(m)
        self._expected, self._inbox, self._outbox = self._expected_messages(orders), {}, []
        shape = self.activation_shape(batches[0][0])
        saved, losses = {}, [None] * m  # (stage, mb) -> (input, output or loss) kept for backward
        self.max_in_flight = 0
        for kind, s, mb in orders[self.pp_rank]:
            if kind == "F":
                x, y = batches[mb]
                inp = x if s == 0 else self._recv(stage_rank(s - 1, p), ("F", s - 1, mb), shape).requires_grad_()
                start = time.perf_counter()  # the timeline shows compute: waiting for the input is bubble
                with self.autocast():
                    out = self.chunk_of[s](inp)
                    if s == S - 1:
                        out = self.loss_fn(out, y)
                        losses[mb] = out.detach()
                if s < S - 1:
                    self._send(out, stage_rank(s + 1, p))
                saved[s, mb] = (inp, out)
                self.max_in_flight = max(self.max_in_flight, len(saved))
            else:
                inp, out = saved.pop((s, mb))
                grad = None if s == S - 1 else self._recv(stage_rank(s + 1, p), ("B", s + 1, mb), shape)
                start = time.perf_counter()
                with self.backward_context(s, mb):
                    out.backward(None if grad is None else grad.to(out.dtype))
                if s > 0:
                    self._send(inp.grad, stage_rank(s - 1, p))
            self._record(kind, s, mb, start)
        for handle, _ in self._outbox:
            handle.wait()
        self._outbox = []
        self.finish_backward()
        for param in self.grad_parameters():  # mean over micro-batches, as PyTorch's schedules
            if param.grad is not None:
                param.grad.div_(m)
        return losses if S - 1 in self.my_stages else None


# ----------------------------------------------------------------------------------------------------------
# pytorch variant: torch.distributed.pipelining

@register("pp", "pytorch")
class PytorchPipeline(Pipeline):
    """PipelineStage per chunk and the schedule class cfg.pp_schedule names (torch.distributed.pipelining).
    The schedule splits the concatenated micro-batches back into m micro-batches and divides the gradients by m
    (scale_grads), so the gradients are those of the mean loss."""

    schedules = PYTORCH_SCHEDULES

    def check_config(self, cfg):
        super().check_config(cfg)
        if cfg.pp_schedule == "1f1b" and self.m < self.pp_size:
            raise ValueError(f"pp_schedule=1f1b (pytorch) needs at least as many micro-batches as stages: "
                             f"gradient_accumulation_steps={self.m} < {self.pp_size}")

    def build_model(self, model_config):
        model = super().build_model(model_config)
        self.build_schedule()
        return model

    def build_schedule(self):
        """A PipelineStage for each of this rank's chunks (self.chunk_of) over the PP group, and the schedule that
        runs them with self.loss_fn (3d calls this on chunks it has tensor- and data-parallelised)."""
        from torch.distributed.pipelining import PipelineStage, schedules
        cls = {"gpipe": schedules.ScheduleGPipe, "1f1b": schedules.Schedule1F1B,
               "interleaved_1f1b": schedules.ScheduleInterleaved1F1B, "looped_bfs": schedules.ScheduleLoopedBFS,
               "interleaved_zero_bubble": schedules.ScheduleInterleavedZeroBubble}[self.cfg.pp_schedule]
        self.stages = [PipelineStage(self.chunk_of[s], s, self.n_stages, self.device, group=self.pp_group)
                       for s in self.my_stages]
        for stage in self.stages:
            self._instrument(stage)
        self.schedule = cls(self.stages if self.cfg.pp_schedule in MULTI_CHUNK else self.stages[0], self.m,
                            loss_fn=self.loss_fn)

    def _instrument(self, stage):
        """Record the time of every forward / backward (B: input+weight or input only; W: weight) of `stage`."""
        def timed(kind, fn):
            def run(chunk_id, *args, **kwargs):
                start = time.perf_counter()
                out = fn(chunk_id, *args, **kwargs)
                self._record(kind, stage.stage_index, chunk_id, start)
                return out
            return run
        stage.forward_one_chunk = timed("F", stage.forward_one_chunk)
        stage.backward_one_chunk = timed("B", stage.backward_one_chunk)
        stage.backward_weight_one_chunk = timed("W", stage.backward_weight_one_chunk)

    def _step(self, batches):
        x = torch.cat([x for x, _ in batches])
        y = torch.cat([y for _, y in batches])
        first, last = 0 in self.my_stages, self.n_stages - 1 in self.my_stages
        losses = [] if last else None
        with self.autocast():
            self.schedule.step(*((x,) if first else ()), target=y if last else None, losses=losses)
        return [loss.detach().float() for loss in losses] if last else None


# ----------------------------------------------------------------------------------------------------------
# rpc variant: torch.distributed.rpc (remote stage modules, RRefs, distributed autograd)

_RPC = {"state": "off"}  # this process's RPC agent: "off" -> "running" -> "shut down" (it cannot be restarted)
_RPC_STAGES = {}  # stage index -> RemoteStage of this process: what the driver's RRefs point to


def shutdown_rpc(timeout_s):
    """rpc.shutdown(graceful=True) if this process's RPC agent is running: waits (at most timeout_s seconds) for
    every rank's agent, so every rank calls it. No rpc strategy can be built in this process afterwards."""
    if _RPC["state"] == "running":
        rpc.shutdown(graceful=True, timeout=timeout_s)
        _RPC["state"] = "shut down"


def _remote_stage(stage):
    """Run on the stage's owner by rpc.remote: its RemoteStage (the driver gets an RRef to it)."""
    return _RPC_STAGES[stage]


def _call(rref, method, *args):
    """Run on the owner of `rref`: rref.local_value().method(*args). The driver calls the stages through this with
    rpc.remote / rpc.rpc_async rather than the RRef proxies (rref.rpc_async().method): the proxy's rpc_async issues
    the call from a future's callback thread, outside the caller's thread-local distributed-autograd context, so
    nothing is recorded for backward (torch 2.13: the losses came back as leaves and no stage got a gradient)."""
    return getattr(rref.local_value(), method)(*args)


class _OnBackward(torch.autograd.Function):
    """Identity whose backward first calls `fn()`: marks the moment a gradient reaches a tensor."""

    @staticmethod
    def forward(ctx, x, fn):
        ctx.fn = fn
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        ctx.fn()
        return grad, None


class RemoteStage:
    """One virtual stage as the driver sees it through an RRef, living on the rank that owns it (PyTorch tutorial
    "Distributed Pipeline Parallelism Using RPC": a shard whose forward takes an RRef of its input).
    forward(x_rref, mb, y=None): pulls the input from wherever it lives (x_rref.to_here(): token ids (B, T) for the
    first stage, activations (B, T, n_embd) from the previous stage's owner otherwise), runs the stage and returns
    its output, or the micro-batch's mean cross-entropy (0-dim) on the last stage (given targets y (B, T)).
    Called from RPC threads: autocast is re-entered (it is thread-local) and a lock runs one micro-batch at a
    time, as a pipeline stage does. Records F, and B through markers on the output and the input (first stage:
    the embeddings' output), in the strategy's timeline."""

    def __init__(self, strategy, stage):
        self.strategy, self.stage, self.module = strategy, stage, strategy.chunk_of[stage]
        self.lock = threading.Lock()

    def forward(self, x_rref, mb, y=None):
        x = x_rref.to_here()
        record, times = self.strategy._record, {}

        def backward_starts():
            times["B"] = time.perf_counter()

        def backward_ends():
            record("B", self.stage, mb, times.pop("B", time.perf_counter()))

        with self.lock:
            start, hook = time.perf_counter(), None
            if x.is_floating_point():
                x = _OnBackward.apply(x, backward_ends)
            else:  # the first stage: mark the embeddings' output (what remains after it is a lookup)
                hook = self.module.transformer.drop.register_forward_hook(
                    lambda module, args, out: _OnBackward.apply(out, backward_ends))
            try:
                with self.strategy.autocast():
                    out = self.module(x)
                    if y is not None:
                        out = cross_entropy(out, y)
            finally:
                if hook is not None:
                    hook.remove()
            record("F", self.stage, mb, start)
        return _OnBackward.apply(out, backward_starts)

    def take_gradients(self, context_id):
        """Copy this stage's gradients of distributed-autograd context `context_id` into the parameters' .grad
        (so clipping and optimizer.step run as for the other variants)."""
        grads = dist_autograd.get_gradients(context_id)
        for p in self.module.parameters():
            if p in grads:
                p.grad = grads[p].clone() if p.grad is None else p.grad + grads[p]


@register("pp", "rpc")
class RpcPipeline(Pipeline):
    """GPipe over torch.distributed.rpc, the oldest PyTorch way to pipeline. Every rank builds its own stages (the
    split and meta-device build of the other variants) and runs an RPC agent ("pp<rank>"); rank 0, the driver,
    holds an RRef to every RemoteStage. One step, on the driver, inside a distributed-autograd context: for each
    micro-batch, stage s's forward is an rpc to its owner (rpc.remote, the last stage rpc_async), whose result
    stays there as an RRef until the next stage's owner pulls it (to_here), so activations go owner to owner and
    the m micro-batches flow through the stages concurrently; the loss is the mean of the m futures' losses;
    `dist_autograd.backward` runs the backward across ranks (GPipe: all forwards, then all backwards); each stage
    owner then copies the context's gradients into .grad (`take_gradients`). The other ranks' main threads wait
    in forward_backward for rank 0's broadcast of the losses, which says the step is done. Only
    pp_schedule="gpipe", one stage per rank.

    One RPC agent per process, started by the first build_model and shut down by close() (on every rank, before
    teardown; train.py calls it): torch 2.13 re-initialises RPC after rpc.shutdown(), but RRefs then fail ("RPC
    is no longer running on this node"; cf. pytorch issue 46491), so later strategies of the same process reuse it.
    torch 2.13 still ships torch.distributed.rpc (TensorPipe backend), though PyTorch no longer develops it;
    torch.distributed.pipelining replaced its pipeline (torch.distributed.pipeline.sync.Pipe, removed in 2.4)."""

    schedules = ("gpipe",)

    def check_config(self, cfg):
        super().check_config(cfg)
        if _RPC["state"] == "shut down":
            raise ValueError("parallel=pp variant=rpc: this process's RPC agent was shut down (close()); "
                             "torch.distributed.rpc cannot be restarted in the same process")

    def build_model(self, model_config):
        """The stages as in the other variants, the RPC agent (collective, once per process), the driver's RRefs."""
        model = super().build_model(model_config)
        _RPC_STAGES.clear()
        _RPC_STAGES.update({s: RemoteStage(self, s) for s in self.my_stages})
        if _RPC["state"] == "off":
            options = rpc.TensorPipeRpcBackendOptions(rpc_timeout=self.cfg.timeout_s,
                                                      init_method=self._rpc_init_method())
            rpc.init_rpc(f"pp{self.rank}", rank=self.rank, world_size=self.world_size, rpc_backend_options=options)
            _RPC["state"] = "running"
        self.comm.barrier()  # every rank's stages are registered before the driver asks for them
        self.owners = [f"pp{self.group_ranks[stage_rank(s, self.pp_size)]}" for s in range(self.n_stages)]
        self.stage_rrefs = None
        if self.pp_rank == 0:
            self.stage_rrefs = [rpc.remote(owner, _remote_stage, args=(s,)) for s, owner in enumerate(self.owners)]
        return model

    def _rpc_init_method(self):
        """Where the RPC agent's rendezvous finds its store. Under torchrun, "env://": torchrun's agent hosts a store
        on MASTER_PORT and every rank joins it as a client (TORCHELASTIC_USE_AGENT_STORE=True). Any other launcher:
        rank 0 already hosts the process group's store on MASTER_PORT (env:// would fail there with EADDRINUSE), so
        it picks a free port for a second one and broadcasts it. A tcp:// address under torchrun would hang: every
        rank connects to it as a client and nobody listens."""
        if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True":
            return "env://"
        port = torch.zeros((), dtype=torch.int64)
        if self.rank == 0:
            with socket.socket() as s:
                s.bind(("", 0))
                port.fill_(s.getsockname()[1])
        dist.broadcast(port, src=0)
        return f"tcp://{os.environ.get('MASTER_ADDR', 'localhost')}:{int(port)}"

    def close(self):
        """Shut this process's RPC agent down (shutdown_rpc): on every rank, once no rpc strategy will run again."""
        self.stage_rrefs = None
        shutdown_rpc(self.cfg.timeout_s)

    def _step(self, batches):
        m, S = len(batches), self.n_stages
        losses = torch.zeros(m, device=self.device)
        self.comm.barrier()  # every rank has reset its timeline (forward_backward) before the driver's calls arrive
        if self.pp_rank == 0:
            with dist_autograd.context() as context_id:
                futures = []
                for mb, (x, y) in enumerate(batches):
                    ref = rpc.RRef(x)
                    for s in range(S - 1):
                        ref = rpc.remote(self.owners[s], _call, args=(self.stage_rrefs[s], "forward", ref, mb))
                    futures.append(rpc.rpc_async(self.owners[S - 1], _call,
                                                 args=(self.stage_rrefs[S - 1], "forward", ref, mb, y)))
                mb_losses = torch.futures.wait_all(futures)
                dist_autograd.backward(context_id, [torch.stack(mb_losses).mean()])
                torch.futures.wait_all([rpc.rpc_async(owner, _call, args=(rref, "take_gradients", context_id))
                                        for owner, rref in zip(self.owners, self.stage_rrefs)])
            losses.copy_(torch.stack(mb_losses).detach().float())
        self.comm.broadcast(losses, src=0)  # the other ranks wait here while their RPC threads work
        return list(losses) if S - 1 in self.my_stages else None
