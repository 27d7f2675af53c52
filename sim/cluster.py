"""
Cluster descriptions: what one device computes and holds, and how fast the links between devices are.

A cluster is `nodes` x `gpus_per_node` devices. Each device has a peak dense FLOP/s per dtype, HBM capacity and
bandwidth (the rate of memory-bound work: norms, activations functions, the optimizer). Two links, each with
the alpha-beta model's latency alpha (s per message step) and bandwidth beta (bytes/s one device sends in one
direction): `intra` between devices of a node (NVLink) and `inter` between nodes (InfiniBand; the node's NICs
divided among its devices).

Presets (`PRESETS`; `get(name)`):
- a100-80gb: A100-SXM4-80GB in DGX A100 nodes: 312 TFLOP/s dense bf16/fp16, 156 tf32, 19.5 fp32; 80 GiB HBM2e at
  2.039 TB/s; NVLink 3 600 GB/s total per GPU (300 GB/s each way); 8 x 200 Gb/s HDR InfiniBand per node
  (25 GB/s per GPU each way). NVIDIA A100 datasheet; DGX A100 user guide.
- h100-sxm: H100-SXM5-80GB in DGX H100 nodes: 989 TFLOP/s dense bf16/fp16, 494 tf32, 67 fp32; 80 GiB HBM3 at
  3.35 TB/s; NVLink 4 900 GB/s total (450 GB/s each way); 8 x 400 Gb/s NDR InfiniBand per node (50 GB/s per GPU).
  NVIDIA H100 datasheet; DGX H100 user guide.
- cpu-local: this machine, fitted by `python -m sim.calibrate` from timed train.py runs and gloo collectives
  (sim/cpu_local.json): the achieved fp32 matmul rate of one core (matmul_efficiency 1), memory bandwidth, a
  per-operator framework latency, gloo's alpha and beta for each collective (`op_links`: gloo's reduce-scatter,
  for one, is not a ring and costs about an all-reduce). Its "devices" are processes; when there are more
  processes than cores they share them (`cores`), and since gloo moves data with the same cores that compute,
  communication does not overlap computation (`overlap=False`).

Compute on the GPU presets is the shape model (sim/compute.py): `sms`, `gemm_efficiency` (the maximum achievable
matmul FLOP/s over peak, published: stas00/ml-engineering's MAMF table) and SHAPE_CONSTANTS, fitted to published
figures (sim/published.py, sim/validate.py). `matmul_efficiency` > 0 switches to the flat model instead (every
matmul at that fraction of peak; cpu-local uses it with 1.0 and a fitted per-core rate).

Assumptions, not measured here (change them with dataclasses.replace or a JSON file, `load`):
- link_efficiency 0.8: collectives reach about 80% of the nominal link rate (nccl-tests bus bandwidth on DGX
  systems is typically ~230 of 300 GB/s on A100 NVLink); the latencies alpha are order-of-magnitude figures
  for NCCL's ring steps (a few microseconds on NVLink, ~10 on InfiniBand).
- reserved_bytes 2 GiB per GPU that training cannot use (CUDA context, NCCL buffers, allocator fragmentation).
"""

import json
import os
from dataclasses import asdict, dataclass, field, replace

from sim.published import MAMF

GiB = 2**30
HERE = os.path.dirname(os.path.abspath(__file__))
CPU_LOCAL_JSON = os.path.join(HERE, "cpu_local.json")


@dataclass(frozen=True)
class Link:
    """One device's link: bandwidth (bytes/s sent in one direction) and latency alpha (s per message step)."""
    bandwidth: float
    latency: float


@dataclass(frozen=True)
class Cluster:
    """A homogeneous cluster; see the module docstring for the fields' meaning and units."""
    name: str
    gpus_per_node: int
    peak_flops: dict            # dtype name -> dense FLOP/s of one device
    hbm_bytes: float            # memory capacity of one device
    hbm_bandwidth: float        # bytes/s of memory-bound work
    intra: Link                 # between devices of one node
    inter: Link                 # between nodes, per device
    nodes: int = 1
    matmul_efficiency: float = 0.0  # > 0: the flat model, every matmul at this fraction of peak (sim/compute.py)
    link_efficiency: float = 0.8
    op_latency: float = 0.0     # s of framework overhead per operator (CPU eager PyTorch; ~0 for GPUs)
    cores: int = 0              # > 0: devices on one node share this many cores (CPU processes)
    overlap: bool = True        # communication runs beside computation (its own streams)
    reserved_bytes: float = 0.0
    default_dtype: str = "bfloat16"
    source: str = ""
    op_links: dict = field(default_factory=dict)  # collective -> Link measured for it inside a node (cpu-local)
    # the shape model of compute (sim/compute.py), used when matmul_efficiency is 0
    sms: int = 0                     # streaming multiprocessors
    gemm_efficiency: float = 0.8     # fraction of peak the best-shaped large GEMM reaches (published MAMF)
    tile_k0: float = 0.0             # a GEMM tile's fixed work, in K steps (fitted to the GEMM curve)
    kernel_latency: float = 0.0      # s per kernel on the device (fitted to the GEMM curve)
    gemm_sustained: float = 1.0      # fraction of gemm_efficiency GEMMs sustain in training (fitted to training
    #                                  throughputs: clocks under a full node's power and heat, the library's kernels)
    memory_efficiency: float = 1.0   # fraction of HBM bandwidth memory-bound kernels reach (fitted likewise)

    @property
    def flat(self):
        """True for the flat compute model: matmuls at matmul_efficiency x peak, no per-kernel costs."""
        return self.matmul_efficiency > 0

    @property
    def devices(self):
        return self.nodes * self.gpus_per_node

    def flop_rate(self, dtype, shape_model=False):
        """Achievable matmul FLOP/s of one device in `dtype`: peak x matmul_efficiency (flat model), or with
        shape_model peak x gemm_efficiency (the best GEMM's rate, sim/compute.py). Raises ValueError if the
        cluster has no peak for dtype."""
        if dtype not in self.peak_flops:
            raise ValueError(f"cluster {self.name} has no peak FLOP/s for dtype {dtype!r} "
                             f"(it knows {', '.join(self.peak_flops)})")
        if shape_model:
            return self.peak_flops[dtype] * self.gemm_efficiency * self.gemm_sustained
        return self.peak_flops[dtype] * self.matmul_efficiency

    def sized(self, devices):
        """This cluster with enough nodes for `devices` devices (fewer than a node: one partly used node)."""
        if devices < 1:
            raise ValueError(f"need at least one device, got {devices}")
        if devices <= self.gpus_per_node:
            return replace(self, nodes=1)
        if devices % self.gpus_per_node:
            raise ValueError(f"{devices} devices do not fill whole nodes of {self.gpus_per_node} ({self.name})")
        return replace(self, nodes=devices // self.gpus_per_node)

    def group_link(self, ranks, op=None):
        """The effective Link of collective `op` (all_reduce, all_gather, reduce_scatter, all_to_all, send) over global
        `ranks` (ranks fill nodes in order, gpus_per_node each).

        Inside one node: the intra link, or the link measured for `op` if op_links has one (a backend whose
        collectives are not all rings of the same speed: gloo). Across nodes: the inter link, whose bandwidth
        scales with the group's members per node k (a ring crosses each node boundary once per k members, and the
        node's k NICs carry it in parallel; capped by the intra link), except for all_to_all, whose every rank sends
        its off-node chunks through its own NIC. Bandwidths are scaled by link_efficiency."""
        nodes = {r // self.gpus_per_node for r in ranks}
        if len(nodes) <= 1:
            link = self.op_links.get(op, self.intra)
            return Link(link.bandwidth * self.link_efficiency, link.latency)
        per_node = len(ranks) // len(nodes) if op != "all_to_all" else 1
        bandwidth = min(self.inter.bandwidth * per_node, self.intra.bandwidth)
        return Link(bandwidth * self.link_efficiency, self.inter.latency)


# The shape model's fitted constants (sim/compute.py), the same for every GPU preset: tile_k0 and kernel_latency
# fitted to the H100 GEMM curve (sim/published.py GEMM_CURVE), gemm_sustained and memory_efficiency to the
# published training throughputs (sim/published.py TRAINING); `python -m sim.validate --fit` refits and prints
# them, tests/test_sim.py checks that these are what the fits give.
SHAPE_CONSTANTS = {"tile_k0": 120.0, "kernel_latency": 5.25e-6, "gemm_sustained": 0.8691, "memory_efficiency": 0.6685}

PRESETS = {
    "a100-80gb": Cluster(
        name="a100-80gb", gpus_per_node=8,
        peak_flops={"bfloat16": 312e12, "float16": 312e12, "tf32": 156e12, "float32": 19.5e12},
        hbm_bytes=80 * GiB, hbm_bandwidth=2.039e12,
        intra=Link(bandwidth=300e9, latency=3e-6), inter=Link(bandwidth=25e9, latency=10e-6),
        reserved_bytes=2 * GiB, sms=108, gemm_efficiency=MAMF["a100"], **SHAPE_CONSTANTS,
        source="A100-SXM4-80GB datasheet; DGX A100: NVLink 600 GB/s per GPU, 8x200 Gb/s HDR IB per node"),
    "h100-sxm": Cluster(
        name="h100-sxm", gpus_per_node=8,
        peak_flops={"bfloat16": 989e12, "float16": 989e12, "tf32": 494e12, "float32": 67e12},
        hbm_bytes=80 * GiB, hbm_bandwidth=3.35e12,
        intra=Link(bandwidth=450e9, latency=3e-6), inter=Link(bandwidth=50e9, latency=10e-6),
        reserved_bytes=2 * GiB, sms=132, gemm_efficiency=MAMF["h100"], **SHAPE_CONSTANTS,
        source="H100-SXM5-80GB datasheet; DGX H100: NVLink 900 GB/s per GPU, 8x400 Gb/s NDR IB per node"),
}


def load(path):
    """A Cluster from a JSON file of its fields (links as {"bandwidth", "latency"}), e.g. sim/cpu_local.json.
    Raises FileNotFoundError naming the file (and how to make the CPU one) if it does not exist."""
    if not os.path.isfile(path):
        hint = " (run `python -m sim.calibrate` to measure this machine)" if path == CPU_LOCAL_JSON else ""
        raise FileNotFoundError(f"cluster file {path} not found{hint}")
    with open(path) as f:
        d = json.load(f)
    fields = set(Cluster.__dataclass_fields__)
    d = {k: v for k, v in d.items() if k in fields}
    op_links = {op: Link(**link) for op, link in d.get("op_links", {}).items()}
    return Cluster(**{**d, "intra": Link(**d["intra"]), "inter": Link(**d["inter"]), "op_links": op_links})


def save(cluster, path, **extra):
    """Write `cluster` (and any extra JSON-able facts, e.g. how it was measured) to `path` as JSON."""
    with open(path, "w") as f:
        json.dump({**asdict(cluster), **extra}, f, indent=2)
        f.write("\n")


def get(name):
    """The preset `name` (a100-80gb, h100-sxm, cpu-local) or a cluster JSON file path.
    Raises ValueError listing the presets for an unknown name."""
    if name == "cpu-local":
        return load(CPU_LOCAL_JSON)
    if name in PRESETS:
        return PRESETS[name]
    if name.endswith(".json"):
        return load(name)
    raise ValueError(f"unknown cluster {name!r}; presets: {', '.join([*PRESETS, 'cpu-local'])}, or a .json file")


