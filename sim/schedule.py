"""
A discrete-event simulation of one optimizer step: per device, in-order streams of tasks with dependencies.

Every device runs a compute stream and, beside it, streams for communication (CUDA streams, or NCCL's): "ag"
(parameter all-gathers), "rs" (gradient reduce-scatters / all-reduces) and "p2p" (pipeline sends). A task starts
when the task before it on its stream has finished and every task it depends on has finished (possibly on
another device), and lasts its duration; that is all. So overlap is whatever the dependencies allow: a gradient
bucket's all-reduce runs on "rs" while the compute stream goes on with earlier layers' backward; a ZeRO-3
all-gather is issued one unit ahead (at most two units gathered); a pipeline stage waits for its input's send,
and the bubble is the time the compute stream has nothing it may run. TP and CP collectives block the compute
stream (segments of the compute task). On a cluster without overlap (CPU processes, whose collectives use the
same cores), every stream of a device is its compute stream.

Devices that differ only in their DP, CP or TP coordinate do the same work at the same times, so one device per
pipeline rank is simulated (p "representative" devices) and their DP/TP/CP collectives need no partner; the
pipeline's sends, the tied-embedding exchange and the gradient-norm all-reduce link the representatives.

The order of each pipeline rank's forwards and backwards is parallel/pp.py's `schedule_order` (GPipe, 1F1B,
interleaved 1F1B), the same action lists the custom pipeline runs; each action expands into one compute task
per layer (or per `layers_per_task` layers, coarser and faster for the planner).
"""

import gc
from collections import defaultdict, deque
from dataclasses import dataclass, field

from parallel.pp import schedule_order
from sim.cost import build_costs, state_bytes, step_flops

COMM_KINDS = ("tp", "cp", "ep", "norm")  # segments of compute-stream tasks that are communication


class Task:
    """One piece of work on one stream of one (representative) device. deps: Tasks, or keys resolved later;
    via (after `run`): the dependency that ended last, so the task started when it ended (None: at time 0)."""
    __slots__ = ("action", "deps", "duration", "end", "kind", "nbytes", "rank", "recipe", "segments", "start",
                 "stream", "via")

    def __init__(self, rank, stream, kind, segments, deps=(), action=None, nbytes=0, duration=None, recipe=()):
        self.rank, self.stream, self.kind, self.segments, self.recipe = rank, stream, kind, segments, list(recipe)
        self.duration = sum(d for _, d in segments) if duration is None else duration
        self.deps, self.action, self.nbytes = list(deps), action, nbytes
        self.start = self.end = self.via = None

    def __repr__(self):
        return f"Task(rank={self.rank}, {self.stream}, {self.kind}, {self.action}, {self.start}..{self.end})"


def run(tasks):
    """Give every task its start and end: in order on its (rank, stream), after all its deps. Topological order
    (Kahn), each task as early as allowed. Raises RuntimeError naming stuck tasks if the dependencies and the
    stream orders form a cycle (a schedule that would deadlock)."""
    last = {}
    for t in tasks:
        key = (t.rank, t.stream)
        if key in last:
            t.deps.append(last[key])
        last[key] = t
    index = {id(t): i for i, t in enumerate(tasks)}
    children = [[] for _ in tasks]
    indeg = [0] * len(tasks)
    for i, t in enumerate(tasks):
        for d in t.deps:
            children[index[id(d)]].append(i)
            indeg[i] += 1
    ready = deque(i for i, n in enumerate(indeg) if n == 0)
    done = 0
    while ready:
        i = ready.popleft()
        t = tasks[i]
        t.start, t.via = 0.0, None
        for d in t.deps:
            if d.end > t.start:
                t.start, t.via = d.end, d
        t.end = t.start + t.duration
        done += 1
        for c in children[i]:
            indeg[c] -= 1
            if indeg[c] == 0:
                ready.append(c)
    if done < len(tasks):
        stuck = [t for t in tasks if t.start is None][:4]
        raise RuntimeError(f"the step deadlocks: {len(tasks) - done} tasks can never start, e.g. {stuck}")
    return tasks


# ----------------------------------------------------------------------------------------------------------
# building one step's tasks

def recipe_seconds(recipe, costs):
    """A task's duration under other Costs of the same layout: its recipe's terms ("costs", list, count):
    count x the seconds of a Costs segment list; ("p2p", list, i): a send; ("dp", op, bytes): a gradient or
    parameter collective; ("tied",), ("norm",), ("optimizer", params)) evaluated on `costs`."""
    total = 0.0
    for term in recipe:
        kind = term[0]
        if kind == "costs":
            total += term[2] * sum(d for _, d in getattr(costs, term[1])) if term[2] else 0.0
        elif kind == "p2p":
            total += getattr(costs, term[1])[term[2]]
        elif kind == "dp":
            total += costs.dp_time(term[1], term[2])
        elif kind == "edp":
            total += costs.edp_time(term[1])
        elif kind == "tied":
            total += costs.tied_seconds
        elif kind == "norm":
            total += costs.norm_seconds
        elif kind == "optimizer":
            total += costs.optimizer_time(term[1])
    return total


def critical_path(tasks):
    """Indices into `tasks` (after `run`) of the chain that sets the step time: from the task that ends last,
    back through each task's `via`. The step time is the sum of their durations (plus 0-time starts)."""
    index = {id(t): i for i, t in enumerate(tasks)}
    t = max(tasks, key=lambda x: x.end)
    path = []
    while t is not None:
        path.append(index[id(t)])
        t = t.via
    return path[::-1]


def build_tasks(par, costs, overlap=True, layers_per_task=1):
    """The tasks of one optimizer step on the pp representative devices (see the module docstring), in issue
    order, their dependencies resolved to Tasks; `run` gives them times."""
    builder = StepBuilder(par, costs, overlap, layers_per_task)
    for r in range(par.pp):
        builder.pipeline_rank(r)
    return builder.finish()


class StepBuilder:
    """Issues one step's tasks, pipeline rank by pipeline rank, in the order the device would issue them.
    Dependencies on other ranks' tasks are keys (("send", kind, stage, mb), ("last", rank)) until `finish`."""

    def __init__(self, par, costs, overlap, layers_per_task):
        self.par, self.costs, self.overlap, self.layers_per_task = par, costs, overlap, layers_per_task
        self.n_stages = par.pp * par.v
        self.tasks, self.keyed = [], {}
        self.seconds = {name: sum(d for _, d in getattr(costs, name)) for name in (
            "layer_forward", "layer_backward", "embed_forward", "embed_backward", "head_forward", "head_backward")}

    def add(self, rank, stream, kind, segments, deps=(), action=None, nbytes=0, duration=None, recipe=()):
        if stream == "p2p":
            stream = self.costs.p2p_stream
        t = Task(rank, stream if self.overlap else "compute", kind, segments, deps, action, nbytes, duration, recipe)
        self.tasks.append(t)
        return t

    def units(self, stage):
        """[(first, end)] layers of each compute task of a stage (layers_per_task at a time)."""
        lo, hi = self.costs.split[stage]
        return [(u, min(u + self.layers_per_task, hi)) for u in range(lo, hi, self.layers_per_task)]

    def unit_params(self, stage, i, n_units, lo, hi):
        """Parameters of unit i of a stage: its layers, plus the embedding (first unit of stage 0) and the head's
        copy and final norm (last unit of the last stage): a ZeRO-3 unit, and what its backward makes grads for."""
        params = (hi - lo) * self.costs.layer_params
        if stage == 0 and i == 0:
            params += self.costs.embed_params
        if stage == self.n_stages - 1 and i == n_units - 1:
            params += self.costs.head_params
        return params

    # --- one pipeline rank -------------------------------------------------------------------------------

    def pipeline_rank(self, r):
        """Issue rank r's forwards and backwards in parallel/pp.py's schedule order, then its deferred
        gradient collectives."""
        par = self.par
        self.rank, self.last_compute = r, None
        self.gathered_users = []   # compute tasks that used an all-gathered unit, in order (ZeRO-3's window)
        self.bucket = [0.0, None]  # gradient parameters waiting in the open bucket, the task that made the last
        self.deferred = []         # (op, bytes, action) of gradient collectives to run after the last backward
        for kind, stage, mb in schedule_order(par.schedule, par.pp, par.v, par.micro_batches, r):
            (self.forward if kind == "F" else self.backward)(stage, mb)
        for op, nbytes, action in self.deferred:
            self.add(r, "rs", op, [(op, self.costs.dp_time(op, nbytes))], [self.last_compute], action, nbytes,
                     recipe=[("dp", op, nbytes)])
        experts = rank_expert_params(par, self.costs, r) * self.costs.grad_bytes
        if experts and len(par.groups()["edp"]) > 1:  # the expert gradients, over the ranks holding the same experts
            self.add(r, "rs", "all_reduce", [("all_reduce", self.costs.edp_time(experts))], [self.last_compute],
                     None, experts, recipe=[("edp", experts)])
        self.keyed[("last", r)] = self.last_compute

    def forward(self, stage, mb):
        """Forward of micro-batch mb through a stage: after the previous stage's send, one task per unit (each
        after its ZeRO-3 all-gather), then the send of the activations to the next stage."""
        costs, action, r = self.costs, ("F", stage, mb), self.rank
        first, last, us = stage == 0, stage == self.n_stages - 1, self.units(stage)
        recv = ("send", "F", stage - 1, mb) if not first else None
        for i, (lo, hi) in enumerate(us):
            embed, head = first and i == 0, last and i == len(us) - 1
            segments = ((costs.embed_forward if embed else []) + costs.layer_forward * (hi - lo) +
                        (costs.head_forward if head else []))
            seconds = (self.seconds["embed_forward"] * embed + self.seconds["layer_forward"] * (hi - lo) +
                       self.seconds["head_forward"] * head)
            deps = [recv] if recv and i == 0 else []
            if self.par.zero == 3:
                deps.append(self.gather(self.unit_params(stage, i, len(us), lo, hi), action))
            self.last_compute = self.add(r, "compute", "F", segments, deps, action, duration=seconds, recipe=[
                ("costs", "embed_forward", embed), ("costs", "layer_forward", hi - lo),
                ("costs", "head_forward", head)])
            if self.par.zero == 3:
                self.gathered_users.append(self.last_compute)
        if not last:
            self.keyed[("send", "F", stage, mb)] = self.send("p2p_seconds", stage, action)

    def backward(self, stage, mb):
        """Backward of micro-batch mb through a stage, last unit first: after the next stage's gradient send,
        each unit's task (ZeRO-3: after its all-gather, then its reduce-scatter; ZeRO 0-2: its gradients join
        a bucket, reduced when full, on the last micro-batch only: the others accumulate locally, as the trainer's
        no_sync), then the send to the previous stage."""
        costs, par, action, r = self.costs, self.par, ("B", stage, mb), self.rank
        first, last, us = stage == 0, stage == self.n_stages - 1, self.units(stage)
        recv = ("send", "B", stage + 1, mb) if not last else None
        for i, (lo, hi) in reversed(list(enumerate(us))):
            embed, head = first and i == 0, last and i == len(us) - 1
            segments = ((costs.head_backward if head else []) + costs.layer_backward * (hi - lo) +
                        (costs.embed_backward if embed else []))
            seconds = (self.seconds["head_backward"] * head + self.seconds["layer_backward"] * (hi - lo) +
                       self.seconds["embed_backward"] * embed)
            deps = [recv] if recv and i == len(us) - 1 else []
            params = self.unit_params(stage, i, len(us), lo, hi)
            if par.zero == 3 and par.reshard_after_forward:
                deps.append(self.gather(params, action))
            self.last_compute = self.add(r, "compute", "B", segments, deps, action, duration=seconds, recipe=[
                ("costs", "head_backward", head), ("costs", "layer_backward", hi - lo),
                ("costs", "embed_backward", embed)])
            if par.zero == 3:
                self.gathered_users.append(self.last_compute)
                self.reduce_grads("reduce_scatter", params, action)
            elif mb == par.micro_batches - 1:
                self.bucket = [self.bucket[0] + params, self.last_compute]
                if self.bucket[0] * costs.grad_bytes >= par.bucket_mb * 2**20:
                    self.flush(action)
        if par.zero < 3:
            self.flush(action)
        if not first:
            # gradient collectives of this micro-batch in flight: the send shares the NICs with them
            reducing = (costs.p2p_shared and (par.zero == 3 or mb == par.micro_batches - 1)
                        and par.overlap_grad_reduce)
            self.keyed[("send", "B", stage, mb)] = self.send("p2p_shared" if reducing else "p2p_seconds", stage - 1,
                                                             action)

    def send(self, times, boundary, action):
        """The pipeline send after the last compute task: a task on the p2p stream, or, when sends block the
        compute stream (Parallel.overlap_p2p False), a last segment of that compute task (the same times, fewer
        tasks). `times`: the Costs list of send seconds to use, `boundary`: its index. Returns the task the
        receiver waits for."""
        seconds = getattr(self.costs, times)[boundary]
        if self.costs.p2p_stream == "compute":
            self.last_compute.segments = [*self.last_compute.segments, ("send", seconds)]
            self.last_compute.duration += seconds
            self.last_compute.recipe.append(("p2p", times, boundary))
            return self.last_compute
        return self.add(self.rank, "p2p", "send", [("send", seconds)], [self.last_compute], action,
                        recipe=[("p2p", times, boundary)])

    def gather(self, params, action):
        """A ZeRO-3 all-gather of a unit, issued one unit ahead: it may start once the unit two before it is
        done (at most two units gathered at a time)."""
        nbytes = params * self.costs.param_bytes
        deps = [self.gathered_users[-2]] if len(self.gathered_users) >= 2 else []
        return self.add(self.rank, "ag", "all_gather", [("all_gather", self.costs.dp_time("all_gather", nbytes))],
                        deps, action, nbytes, recipe=[("dp", "all_gather", nbytes)])

    def reduce_grads(self, op, params, action):
        """The gradients of `params` parameters reduced over dp x cp, after the last compute task: at once on the
        rs stream, or after the last backward when overlap_grad_reduce is off."""
        nbytes = params * self.costs.grad_bytes
        if self.par.overlap_grad_reduce:
            self.add(self.rank, "rs", op, [(op, self.costs.dp_time(op, nbytes))], [self.last_compute], action, nbytes,
                     recipe=[("dp", op, nbytes)])
        else:
            self.deferred.append((op, nbytes, action))

    def flush(self, action):
        """Reduce the open gradient bucket: all-reduce for ZeRO-0, reduce-scatter for ZeRO-1/2 (each rank receives
        the average of its shard; Rajbhandari et al. 2020, section 7.2.1)."""
        if self.bucket[0] > 0:
            self.reduce_grads("all_reduce" if self.par.zero == 0 else "reduce_scatter", self.bucket[0], action)
        self.bucket = [0.0, None]

    # --- end of step -----------------------------------------------------------------------------------

    def finish(self):
        """The end of the step: the tied embedding/head gradients summed between the first and last stage's
        ranks, the gradient norm's all-reduce over everyone (after every rank's last task of every stream),
        AdamW, and for ZeRO-1/2 the all-gather of the updated parameter shards. Resolves keys; returns tasks."""
        par, costs, p = self.par, self.costs, self.par.pp
        if p > 1:
            ends = sorted({0, (self.n_stages - 1) % p})
            for r in ends:
                self.add(r, "p2p", "tied", [("all_reduce", costs.tied_seconds)], [("last", e) for e in ends],
                         recipe=[("tied",)])
        norm_deps = list({(t.rank, t.stream): t for t in self.tasks}.values())
        for r in range(p):
            params = rank_params(par, costs, r)
            norm = self.add(r, "compute", "norm", [("norm", costs.norm_seconds)], norm_deps, recipe=[("norm",)])
            shard = params / (costs.dp_shards if par.zero >= 1 else 1) + rank_expert_params(par, costs, r)
            opt = self.add(r, "compute", "optimizer", [("optimizer", costs.optimizer_time(shard))], [norm],
                           recipe=[("optimizer", shard)])
            if par.zero in (1, 2):
                nbytes = params * costs.param_bytes
                self.add(r, "ag", "all_gather", [("all_gather", costs.dp_time("all_gather", nbytes))], [opt], None,
                         nbytes, recipe=[("dp", "all_gather", nbytes)])
        for t in self.tasks:
            t.deps = [self.keyed[d] if isinstance(d, tuple) else d for d in t.deps]
        return self.tasks


def activation_peak(par, costs, rank):
    """Most activation bytes pipeline rank `rank` holds at once in the schedule: walking its action list, a
    forward of stage s adds s's layers x the per-layer bytes (and the embedding's on stage 0), its backward frees
    them; plus the transients, a recomputed layer's full activations and the last stage's logits."""
    n_stages, held, peak = par.pp * par.v, 0.0, 0.0
    for kind, stage, mb in schedule_order(par.schedule, par.pp, par.v, par.micro_batches, rank):
        lo, hi = costs.split[stage]
        size = (hi - lo) * costs.layer_activation + (costs.embed_activation if stage == 0 else 0.0)
        held += size if kind == "F" else -size
        peak = max(peak, held)
    holds_last = (n_stages - 1) % par.pp == rank
    return peak + costs.layer_activation_full + (costs.output_activation if holds_last else 0.0)


def rank_expert_params(par, costs, r):
    """Routed-expert parameters pipeline rank r holds (its stages' blocks x Costs.expert_params: E/ep experts of each
    MoE layer, unsharded by TP and ZeRO)."""
    n_stages = par.pp * par.v
    return sum((hi - lo) for lo, hi in (costs.split[s] for s in range(r, n_stages, par.pp))) * costs.expert_params


def rank_params(par, costs, r):
    """Parameters pipeline rank r holds (after TP, before ZeRO sharding): its stages' layers, the embedding if it
    holds stage 0, the head's copy and final norm if it holds the last stage."""
    n_stages = par.pp * par.v
    params = 0.0
    for stage in range(r, n_stages, par.pp):
        lo, hi = costs.split[stage]
        params += (hi - lo) * costs.layer_params
        params += costs.embed_params if stage == 0 else 0.0
        params += costs.head_params if stage == n_stages - 1 else 0.0
    return params


# ----------------------------------------------------------------------------------------------------------
# the result

@dataclass
class Step:
    """A simulated optimizer step: its tasks (with start/end), time, and the derived figures."""
    model: object
    par: object
    cluster: object
    costs: object
    tasks: list
    step_time: float = 0.0
    memory: list = field(default_factory=list)

    @property
    def tokens(self):
        return self.par.global_batch * self.model.seq_len

    @property
    def tokens_per_s(self):
        return self.tokens / self.step_time

    @property
    def flops(self):
        return step_flops(self.model, self.par)

    @property
    def mfu(self):
        """Model FLOPs (no recomputation) per second per device over the device's peak."""
        return self.flops["model"] / self.step_time / self.par.world / self.cluster.peak_flops[self.par.dtype]

    @property
    def tflops_per_device(self):
        """Achieved TFLOP/s per device counting recomputation (Megatron-LM's figure)."""
        return self.flops["hardware"] / self.step_time / self.par.world / 1e12

    def lanes(self, rank):
        """{kind: seconds} of the compute stream's segments of `rank`, and "idle"."""
        out = defaultdict(float)
        for t in self.tasks:
            if t.rank == rank and t.stream == "compute":
                for kind, d in t.segments:
                    out[kind] += d
        out["idle"] = self.step_time - sum(out.values())
        return dict(out)

    def comm_busy(self, rank):
        """{stream: seconds busy} of `rank`'s communication streams (overlapped or not)."""
        out = defaultdict(float)
        for t in self.tasks:
            if t.rank == rank and t.stream != "compute":
                out[t.stream] += t.duration
        return dict(out)

    def bubble(self):
        """Idle fraction of the compute streams over all representative devices (pipeline bubble and waits)."""
        busy = sum(t.duration for t in self.tasks if t.stream == "compute")
        return 1.0 - busy / (self.par.pp * self.step_time)

    @property
    def peak_memory(self):
        return max(m["total"] for m in self.memory)

    @property
    def fits(self):
        return self.peak_memory <= self.cluster.hbm_bytes

    def report(self):
        """Several lines: time, throughput, MFU, memory per pipeline rank, and where the time goes."""
        par, GB = self.par, 1e9
        lines = [f"{par.describe()}  on {par.world} x {self.cluster.name}",
                 (f"step {self.step_time:.4g} s, {self.tokens_per_s:,.0f} tokens/s, MFU {100 * self.mfu:.1f}%, "
                  f"{self.tflops_per_device:.4g} TFLOP/s per device incl. recompute "
                  f"({self.flops['model'] / self.step_time / par.world / 1e12:.4g} model)")]
        worst = max(range(par.pp), key=lambda r: self.memory[r]["total"])
        mem = self.memory[worst]
        lines.append(f"memory per device (pp rank {worst}, the fullest): " + ", ".join(
            f"{k} {mem[k] / GB:.2f}" for k in ("params", "grads", "optimizer", "gathered", "activations",
                                                "reserved", "total")) +
            f" GB of {self.cluster.hbm_bytes / GB:.1f}" + ("" if self.fits else "  -> DOES NOT FIT"))
        for r in sorted({0, par.pp - 1}):
            lane = self.lanes(r)
            parts = ", ".join(f"{k} {v / self.step_time:.1%}" for k, v in sorted(lane.items(), key=lambda kv: -kv[1])
                              if v > 1e-4 * self.step_time)
            comm = ", ".join(f"{k} {v:.3g} s" for k, v in self.comm_busy(r).items())
            lines.append(f"pp rank {r} compute stream: {parts}" +
                         (f"; overlapped streams busy: {comm}" if comm else ""))
        return "\n".join(lines)


def simulate(model, par, cluster, costs=None, layers_per_task=1):
    """Simulate one optimizer step of `model` under layout `par` on `cluster` (sized to par.world devices here).
    costs: a sim.cost.Costs to use instead of the cluster's (analytic tests). Returns a Step.
    Raises ValueError for an impossible layout (sim.cost.Parallel.check) or cluster size."""
    par.check(model)
    cluster = cluster.sized(par.world)
    costs = costs if costs is not None else build_costs(model, par, cluster)
    collecting = gc.isenabled()
    gc.disable()  # tens of thousands of small objects: the cyclic collector would double the time
    try:
        tasks = run(build_tasks(par, costs, overlap=cluster.overlap, layers_per_task=layers_per_task))
    finally:
        if collecting:
            gc.enable()
    return Step(model, par, cluster, costs, tasks, step_time=max(t.end for t in tasks),
                memory=memory_per_rank(par, costs, cluster))


def memory_per_rank(par, costs, cluster):
    """[memory(...)] of every pipeline rank."""
    return [memory(par, costs, cluster, r, activation_peak(par, costs, r)) for r in range(par.pp)]


def memory(par, costs, cluster, rank, activations):
    """{"params", "grads", "optimizer", "gathered", "activations", "reserved", "total"} bytes on pipeline rank
    `rank`: states per ZeRO stage (sim.cost.state_bytes; ZeRO-2's gradients at their peak, full while m > 1
    micro-batches accumulate), ZeRO-3's gathered units (two in flight, or all of
    the rank's units when parameters stay gathered from forward to backward), the activation peak."""
    params = rank_params(par, costs, rank)
    out = state_bytes(params, costs.dp_shards, par.zero, par.mixed, accumulating=par.micro_batches > 1)
    for k, v in state_bytes(rank_expert_params(par, costs, rank), 1, 0, par.mixed,
                            accumulating=par.micro_batches > 1).items():  # experts: not ZeRO-sharded
        out[k] += v
    gathered = 0.0
    if par.zero == 3 and costs.dp_shards > 1:
        unit = costs.layer_params * costs.param_bytes
        gathered = params * costs.param_bytes if not par.reshard_after_forward else 2 * unit
    out.update(gathered=gathered, activations=activations, reserved=cluster.reserved_bytes)
    out["total"] = sum(out.values())
    return out
