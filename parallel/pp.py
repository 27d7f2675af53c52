"""
Pipeline parallelism: the GPT's layers cut into stages, one (or v) per rank, micro-batches flowing through them.

    torchrun --standalone --nproc_per_node=2 train.py config/train_shakespeare_char_pp_custom_cpu.py

Splitting. The blocks are cut into S = p * v contiguous virtual stages (p ranks, v chunks per rank): stage 0 also
holds the token/position embeddings, stage S-1 the final norm, the lm_head and the loss. `pp_split="3,6,9"` gives
the first layer of every stage after the first; "" picks the split minimising the costliest stage, counting a
block as its forward FLOPs per token and the head as n_embd * vocab_size (`balanced_split`). Stage s lives on rank
s % p ("looped" placement, Narayanan et al. 2021), so with v > 1 a rank holds v non-adjacent chunks. Each rank
builds only its own chunks (`build_stages`: the meta device, then the full model's values by name).
The lm_head is tied to the token embedding: the first and last stages each hold a copy, initialised alike, and
after every backward the two gradients are summed (one exchange between those two ranks), so the copies stay equal.

Two variants, top to bottom (a third, `rpc`, is parallel/pp_rpc.py):
- `pytorch`: torch.distributed.pipelining's PipelineStage + ScheduleGPipe / Schedule1F1B /
  ScheduleInterleaved1F1B / ScheduleLoopedBFS / ScheduleInterleavedZeroBubble (cfg.pp_schedule).
- `custom`: the schedules written out with the send/recv of our Collectives. Every schedule is a per-rank list
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
  lists are a valid order of the dependency graph therefore runs without deadlock (checked by sim/pp_timeline.py's
  unit-cost `simulate`). The loss of each micro-batch is backpropagated unscaled and the gradients divided by m at
  the end (as PyTorch's schedules do), so the gradients are those of the mean loss over micro-batches.

Stages may be wrapped in a data-parallel module (parallel/3d.py): PyTorch's schedules drive FSDP2 and DDP modules
themselves; the custom executor runs every backward but a stage's last under the wrapper's no_sync(), so each
stage's gradients are reduced once, overlapping the rest of the pipeline's backward, then waits for it.

Both variants record, per rank, when each forward/backward ran (`Pipeline.timeline`); sim/pp_timeline.py draws it
and compares the measured bubble with the formula (p-1)/(v*m + p-1).

Communication per step (custom, activations A = B*T*n_embd*4 bytes): every stage boundary carries m activations
forward and m gradients backward, i.e. 2*m*(S-1)*A bytes over all ranks, plus the tied-embedding gradient exchange
(V*n_embd*4 each way between the first and last rank), a scalar broadcast of the loss and one scalar all-reduce
for the gradient norm.

The logged loss is the last stage's mean over micro-batches, broadcast to every rank. dp_size is 1: every rank
reads the same micro-batches (only the first stage uses the inputs and the last the targets).
"""

import contextlib
import time

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from model import GPT, AuxLossToBackward, moe_aux_loss
from parallel import Strategy, materialize, register, slice_init
from parallel.checkpoint import HEAD, WTE

PYTORCH_SCHEDULES = ("gpipe", "1f1b", "interleaved_1f1b", "looped_bfs", "interleaved_zero_bubble")
CUSTOM_SCHEDULES = ("gpipe", "1f1b", "interleaved_1f1b")
MULTI_CHUNK = ("interleaved_1f1b", "looped_bfs", "interleaved_zero_bubble")  # need pp_virtual_stages >= 2


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


def check_pipeline(cfg, p, m, variant, min_stages=2):
    """One-line ValueErrors, before any communication, for a pipeline of p ranks running m micro-batches per step
    that cannot run: too few stages, a schedule the variant lacks, fp16, bad virtual stages or micro-batch counts,
    an impossible split."""
    v, name = cfg.pp_virtual_stages, cfg.pp_schedule
    schedules = PYTORCH_SCHEDULES if variant == "pytorch" else CUSTOM_SCHEDULES if variant != "rpc" else ("gpipe",)
    if p < min_stages:
        raise ValueError(f"parallel=pp needs at least 2 processes, got {p}; use parallel=single on one")
    if name not in schedules:
        raise ValueError(f"pp_schedule={name!r} is not a {variant} pipeline schedule; "
                         f"choose from {', '.join(schedules)}")
    if cfg.dtype == "float16":
        raise ValueError("parallel=pp does not support dtype=float16 (no loss scaling across stages); "
                         "use float32 or bfloat16")
    if v < 1:
        raise ValueError(f"pp_virtual_stages must be >= 1, got {v}")
    if name in MULTI_CHUNK and v < 2:
        raise ValueError(f"pp_schedule={name} needs pp_virtual_stages >= 2 (chunks per rank), got {v}")
    if name not in MULTI_CHUNK and v != 1:
        raise ValueError(f"pp_schedule={name} runs one stage per rank; pp_virtual_stages={v} needs "
                         f"an interleaved schedule ({', '.join(s for s in schedules if s in MULTI_CHUNK)})")
    if m < 1:
        raise ValueError(f"gradient_accumulation_steps (the pipeline's micro-batches) must be >= 1, got {m}")
    if name in MULTI_CHUNK and (m < p or m % p):
        raise ValueError(f"pp_schedule={name} needs the micro-batches (gradient_accumulation_steps={m}) to be a "
                         f"multiple of the pipeline size {p}, and at least {p}")
    if variant == "pytorch" and name == "1f1b" and m < p:
        raise ValueError(f"pp_schedule=1f1b (pytorch) needs at least as many micro-batches as stages: "
                         f"gradient_accumulation_steps={m} < {p}")
    split_layers(cfg.n_layer, p * v, cfg.pp_split)  # raises for an impossible split


class StageModule(nn.Module):
    """Virtual stage `stage` of n_stages of the GPT: blocks [lo, hi), plus the embeddings if first, plus ln_f and
    lm_head if last, built on the meta device (parallel.materialize gives it the full model's values). Parameter
    names are the full GPT's (transformer.h.5.attn...). forward: token ids (B, T) (first stage) or activations
    (B, T, n_embd) -> activations, or logits (B, T, vocab) on the last stage. The load-balancing loss of its MoE
    layers joins the stage's backward through its output (model.AuxLossToBackward)."""

    def __init__(self, config, stage, n_stages, lo, hi):
        super().__init__()
        self.config, self.stage, self.lo, self.hi = config, stage, lo, hi
        self.pos = None  # positions of the tokens: None is 0..T-1 (context parallelism sets this rank's, each step)
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

    def forward(self, x):
        tr = self.transformer
        if self.first:
            T = x.shape[1]
            if T > self.config.block_size:
                raise ValueError(f"sequence length {T} exceeds block_size {self.config.block_size}")
            x = tr.wte(x)
            if "wpe" in tr:
                x = x + tr.wpe(self.pos if self.pos is not None else torch.arange(T, device=x.device))
            x = tr.drop(x)
        for block in tr.h.values():
            x = block(x, pos=self.pos)
        aux = moe_aux_loss(self)  # MoE layers' load-balancing loss: into this stage's backward (model.py)
        if aux is not None:
            x = AuxLossToBackward.apply(x, aux)
        if self.last:
            x = self.lm_head(tr.ln_f(x))
        return x


def build_stages(model_config, cfg, p, pp_rank):
    """This rank's virtual stages of a pipeline of p ranks and cfg.pp_virtual_stages chunks per rank, on the meta
    device: ({stage index: StageModule}, the layer bounds [(lo, hi)] of every stage)."""
    n_stages = p * cfg.pp_virtual_stages
    bounds = split_layers(model_config.n_layer, n_stages, cfg.pp_split, stage_costs(model_config))
    stages = {s: StageModule(model_config, s, n_stages, *bounds[s])
              for s in range(n_stages) if stage_rank(s, p) == pp_rank}
    return stages, bounds


def cross_entropy(logits, targets):
    """GPT.forward's loss: mean cross-entropy over all positions, ignore_index=-1."""
    return F.cross_entropy(logits.reshape(-1, logits.size(-1)).float(), targets.reshape(-1), ignore_index=-1)


class LocalStages(nn.Module):
    """This rank's chunks (StageModules, in stage order) as one module: `model` of the pipelined strategies. Its
    parameters are this rank's; `estimate_mfu` is the full GPT's (the config's)."""

    estimate_mfu = GPT.estimate_mfu

    def __init__(self, config, chunks):
        super().__init__()
        self.config = config
        self.chunks = nn.ModuleList(chunks)


# ----------------------------------------------------------------------------------------------------------
# schedules as action lists (their unit-cost simulation, bubble and in-flight bounds: sim/pp_timeline.py)

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


# ----------------------------------------------------------------------------------------------------------
# one rank's part of a pipeline: what both variants share

class Pipeline:
    """Runs the steps and evals of this rank's stages in a pipeline over strategy's "pp" group.

    stages: {stage index: StageModule} of this rank (bare: their parameters carry the GPT's names); modules:
    {stage index: what runs it}, the stage or a data-parallel wrapper of it; parameters(): the tensors the optimizer
    updates (their gradients are divided by m); seq_split: by how much the sequence of an activation sent between
    stages is split (TP's sequence parallelism, context parallelism). After the schedule, the strategy's
    sync_gradients() runs (what its layout needs: sequence-parallel sums, DTensor placements) before the tied
    gradients are summed. tied_param: this rank's copy of the tied embedding/head when the first and last stages live on
    different ranks (a strategy that replaces the stages' parameters sets it), else None."""

    def __init__(self, strategy, stages, modules, parameters, seq_split=1):
        cfg = strategy.cfg
        self.device, self.autocast = strategy.device, strategy.autocast
        self.group = strategy.grid.group("pp")
        self.comm = strategy.collectives(self.group)
        self.pp_rank, self.pp_size = self.comm.rank, self.comm.world_size
        self.v, self.m, self.schedule = cfg.pp_virtual_stages, strategy.grad_accum, cfg.pp_schedule
        self.n_stages = self.pp_size * self.v
        self.stages, self.modules, self.parameters, self.seq_split = stages, modules, parameters, seq_split
        self.my_stages = sorted(stages)
        self.first_rank, self.last_rank = stage_rank(0, self.pp_size), stage_rank(self.n_stages - 1, self.pp_size)
        self.loss_fn = cross_entropy  # the last stage's loss: (logits, targets) -> mean loss
        self.finish_backward, self.micro_batch = strategy.sync_gradients, strategy.micro_batch
        self.holds_tied = self.first_rank != self.last_rank and self.pp_rank in (self.first_rank, self.last_rank)
        self.tied_param = None
        if self.holds_tied:
            first = self.pp_rank == self.first_rank
            tied = stages[0].transformer.wte if first else stages[self.n_stages - 1].lm_head
            self.tied_param = getattr(tied, "weight", None)  # None where a flat-sharding wrapper took it: see above
        self.timeline = []        # this rank's events of the last step: (kind, stage, mb, start, end) seconds
        self.max_in_flight = 0    # most micro-batches with saved activations at once, last step (custom)

    def named_parameters(self):
        """(GPT name, parameter) of this rank's stages, each once (the head's copy on the last stage included)."""
        seen, out = set(), []
        for s in self.my_stages:
            for name, p in self.stages[s].named_parameters():
                if id(p) not in seen:
                    seen.add(id(p))
                    out.append((name, p))
        return out

    def loss(self, logits, targets):
        """loss_fn of the last stage, as a plain 0-dim tensor (a DTensor loss under loss_parallel() gathered)."""
        loss = self.loss_fn(logits, targets)
        return loss.full_tensor() if hasattr(loss, "full_tensor") else loss

    def activation_shape(self, x):
        """Shape of what one stage sends the next for input tokens x (B, T): (B, T / seq_split, n_embd)."""
        B, T = x.shape
        return (B, T // self.seq_split, self.stages[self.my_stages[0]].config.n_embd)

    def step(self, batches):
        """Run the schedule over the m micro-batches; gradients of the mean loss end up on every stage, the tied
        embedding/head gradient summed over its two copies. Returns the mean loss on every rank of the pipeline."""
        if len(batches) != self.m:
            raise ValueError(f"the pipeline was built for {self.m} micro-batches per step, got {len(batches)}")
        if len({x.shape for x, _ in batches}) != 1:
            raise ValueError("all micro-batches of a pipeline step must have the same shape")
        self.comm.barrier()  # timestamps are relative to this moment on every rank, so the timelines line up
        self.timeline, self._t0 = [], time.perf_counter()
        with self.split(batches) as batches:
            losses = self._run(batches)
        self._sum_tied_grads()
        loss = torch.zeros((), device=self.device)
        if losses is not None:
            loss = torch.stack(losses).sum() / len(losses)
        self.comm.broadcast(loss, src=self.last_rank)
        return loss

    @contextlib.contextmanager
    def split(self, batches):
        """The strategy's micro_batch context around a whole step (or eval) of all micro-batches at once: yields them
        as the stages see them (with context parallelism, this rank's share of every sequence, whose positions each
        stage then uses)."""
        x, y = torch.cat([x for x, _ in batches]), torch.cat([y for _, y in batches])
        with self.micro_batch(x, y) as (x, y, kwargs):
            for stage in self.stages.values():
                stage.pos = kwargs.get("pos")
            yield list(zip(x.chunk(len(batches)), y.chunk(len(batches))))

    def _record(self, kind, stage, mb, start):
        self.timeline.append((kind, stage, mb, start - self._t0, time.perf_counter() - self._t0))

    def _sum_tied_grads(self):
        """wte.grad on the first stage's rank and lm_head.grad on the last's <- their sum (the same on both); with
        DTensors (tensor-parallel copies of the same placements) the local shards are summed."""
        p = self.tied_param
        if p is None:
            return
        if p.grad is None:
            p.grad = torch.zeros_like(p)
        grad = p.grad.to_local() if hasattr(p.grad, "to_local") else p.grad
        peer = self.last_rank if self.pp_rank == self.first_rank else self.first_rank
        other = torch.empty_like(grad)
        handle = self.comm.send(grad, peer, async_op=True)
        self.comm.recv(other, peer)
        handle.wait()
        grad.add_(other)

    @torch.no_grad()
    def eval_loss(self, x, y):
        """Forward-only through the pipeline, stage after stage; the loss (last stage) reaches every rank."""
        with self.split([(x, y)]) as ((x, y),):
            return self._eval_loss(x, y)

    def _eval_loss(self, x, y):
        loss, shape, handles = torch.zeros((), device=self.device), self.activation_shape(x), []
        for s in self.my_stages:
            h = x
            if s > 0:
                h = torch.empty(shape, device=self.device)
                self.comm.recv(h, stage_rank(s - 1, self.pp_size))
            with self.autocast():
                out = self.modules[s](h)
            if s == self.n_stages - 1:
                loss = self.loss(out, y).float()
            else:
                out = out.float().contiguous()
                handles.append((self.comm.send(out, stage_rank(s + 1, self.pp_size), async_op=True), out))
        for handle, _ in handles:
            handle.wait()
        self.comm.broadcast(loss, src=self.last_rank)
        return loss

    def gather_stages(self, local):
        """Every rank's {GPT name: tensor} merged over the pipeline group (collective), lm_head.weight the tied
        embedding's: the full model's state_dict from each rank's stages."""
        parts = [None] * self.pp_size
        dist.all_gather_object(parts, {k: v.cpu() for k, v in local.items()}, group=self.group)
        full = {}
        for part in parts:
            full |= part
        full[HEAD] = full[WTE]
        return {k: v.to(self.device) for k, v in full.items()}


# ----------------------------------------------------------------------------------------------------------
# pytorch variant: torch.distributed.pipelining

class PytorchPipeline(Pipeline):
    """A PipelineStage per stage module over the pp group and the schedule class cfg.pp_schedule names
    (torch.distributed.pipelining). The schedule splits the concatenated micro-batches back into m micro-batches,
    drives FSDP2/DDP-wrapped stages' gradient sync, and divides the gradients by m (scale_grads)."""

    def __init__(self, strategy, stages, modules, parameters, seq_split=1):
        super().__init__(strategy, stages, modules, parameters, seq_split)
        from torch.distributed.pipelining import PipelineStage, schedules
        cls = {"gpipe": schedules.ScheduleGPipe, "1f1b": schedules.Schedule1F1B,
               "interleaved_1f1b": schedules.ScheduleInterleaved1F1B, "looped_bfs": schedules.ScheduleLoopedBFS,
               "interleaved_zero_bubble": schedules.ScheduleInterleavedZeroBubble}[self.schedule]
        self.pipeline_stages = [PipelineStage(modules[s], s, self.n_stages, self.device, group=self.group)
                                for s in self.my_stages]
        for stage in self.pipeline_stages:
            self._instrument(stage)
        self.torch_schedule = cls(self.pipeline_stages if self.schedule in MULTI_CHUNK else self.pipeline_stages[0],
                                  self.m, loss_fn=self.loss)

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

    def _run(self, batches):
        x = torch.cat([x for x, _ in batches])
        y = torch.cat([y for _, y in batches])
        first, last = 0 in self.my_stages, self.n_stages - 1 in self.my_stages
        losses = [] if last else None
        with self.autocast():
            self.torch_schedule.step(*((x,) if first else ()), target=y if last else None, losses=losses)
        self.finish_backward()
        return [loss.detach().float() for loss in losses] if last else None


# ----------------------------------------------------------------------------------------------------------
# custom variant: the schedules written out with send/recv

class CustomPipeline(Pipeline):
    """GPipe, 1F1B and interleaved 1F1B over our Collectives' send/recv (see the module docstring)."""

    def orders(self, m):
        """Every rank's action list for m micro-batches (each rank computes all of them: it needs its peers' send
        order to receive in it)."""
        return [schedule_order(self.schedule, self.pp_size, self.v, m, r) for r in range(self.pp_size)]

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

    def _run(self, batches):
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
                    out = self.modules[s](inp)
                    if s == S - 1:
                        out = self.loss(out, y)
                        losses[mb] = out.detach()
                if s < S - 1:
                    self._send(out, stage_rank(s + 1, p))
                saved[s, mb] = (inp, out)
                self.max_in_flight = max(self.max_in_flight, len(saved))
            else:
                inp, out = saved.pop((s, mb))
                grad = None if s == S - 1 else self._recv(stage_rank(s + 1, p), ("B", s + 1, mb), shape)
                start = time.perf_counter()
                with self._no_sync(s, mb):
                    out.backward(None if grad is None else grad.to(out.dtype))
                if s > 0:
                    self._send(inp.grad, stage_rank(s - 1, p))
            self._record(kind, s, mb, start)
        for handle, _ in self._outbox:
            handle.wait()
        self._outbox = []
        for s in self.my_stages:  # a data-parallel wrapper's reductions, started in each stage's last backward
            getattr(self.modules[s], "finish_gradient_sync", lambda: None)()
        self.finish_backward()
        for param in self.parameters():  # mean over micro-batches, as PyTorch's schedules
            if param.grad is not None:
                param.grad.div_(m)
        return losses if S - 1 in self.my_stages else None

    def _no_sync(self, stage, mb):
        """A data-parallel stage reduces its gradients in the backward of the step's last micro-batch only (each
        stage runs its backwards in micro-batch order): the others accumulate under its no_sync()."""
        no_sync = getattr(self.modules[stage], "no_sync", None)
        return no_sync() if no_sync is not None and mb != self.m - 1 else contextlib.nullcontext()


# ----------------------------------------------------------------------------------------------------------
# the strategy: one pipeline over the world

@register("pp", "pytorch", "custom", "triton", "nccl", "cuda")
class PipelineParallel(Strategy):
    """One pipeline over all processes (a grid with only a "pp" dimension): this rank's stages, materialised with
    the full model's values, run by PytorchPipeline (variant pytorch) or CustomPipeline (custom and its backends)."""

    sharded = True
    runner = None  # the Pipeline class; None: by variant

    def __init__(self, cfg, device):
        super().__init__(cfg, device)
        if cfg.pp_size not in (0, self.world_size):
            raise ValueError(f"parallel=pp runs one pipeline over all {self.world_size} processes, but "
                             f"pp_size={cfg.pp_size}; use pp_size=0 (or parallel=3d to combine with dp/tp)")
        self.dp_size = 1  # every rank reads the same micro-batches
        check_pipeline(cfg, self.world_size, self.grad_accum, self.variant)
        self.use_grid({"dp": 1, "pp": self.world_size, "cp": 1, "tp": 1})

    def build_model(self, model_config, weights=None):
        stages, self.bounds = build_stages(model_config, self.cfg, self.world_size, self.grid.coord["pp"])
        for stage in stages.values():
            self.apply_ac(stage)
            materialize(stage, self.device, slice_init(model_config, weights=weights))
            if self.cfg.compile:
                stage.compile(backend=self.cfg.compile_backend)
        self.model = LocalStages(model_config, list(stages.values()))
        runner = self.runner or (PytorchPipeline if self.variant == "pytorch" else CustomPipeline)
        self.pipeline = runner(self, stages, stages, lambda: [p for _, p in self.named_parameters()])
        return self.model
