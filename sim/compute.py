"""
The time of one GPU kernel from its shape: matrix multiplications by tiles and waves over the streaming
multiprocessors, memory-bound kernels at HBM bandwidth, and a fixed cost per kernel.

A GEMM C[M, N] = A[M, K] · B[K, N] (batch of them: `batch`) runs as output tiles of tm x tn, one per SM at a
time, each looping over K; the tiles run in waves of `sms` (tile and wave quantization: a 2049-row product costs
as much as a 2176-row one, and 133 tiles on 132 SMs take two waves). One tile's time is its 2·tm·tn·(K + k0)
FLOPs at the SM's share of the peak times `gemm_efficiency`, the fraction of peak the largest, best-shaped
products reach (the maximum achievable matmul FLOP/s, MAMF), times `gemm_sustained`, the fraction of that a
training run sustains (fitted to training throughputs: clocks under a whole node's power and heat, the
library version and its kernel choices), where k0 stands for the tile's fixed work (prologue,
epilogue: loading the pipeline, writing C), as if K were k0 longer. As cuBLAS does, the tile shape is the best of
64x128, 128x128 and 128x256, and a product with fewer tiles than SMs may split K (split-K, partial sums in fp32
reduced through HBM). A roofline bounds it below by its bytes at HBM bandwidth (skinny products), and every
kernel adds `kernel_latency` (launch, ramp-up and drain). k0 and kernel_latency are fitted to a published GEMM
curve (sim/published.py GEMM_CURVE: XLA's table of bf16 matmul FLOP/s on an H100; `fit_gemm_curve`).

A memory-bound kernel (norm, softmax, dropout, activation, residual add, optimizer) moves its bytes at
`memory_efficiency` x HBM bandwidth (fitted to training throughputs, sim/validate.py), plus kernel_latency.

`Kernel` lists are built by sim/cost.py from the model's shapes; `seconds(kernels, cluster, dtype)` sums them.
The "flat" model (cluster.matmul_efficiency > 0: every matmul at that fraction of peak, no per-kernel costs) is
sim/cost.py's older, exact-formula mode, kept for the analytic tests and for cpu-local.
"""

import math
from dataclasses import dataclass

TILES = ((64, 128), (128, 128), (128, 256))
SPLIT_K = (1, 2, 4, 8)


@dataclass(frozen=True)
class Kernel:
    """One kernel: a GEMM (m, n, k, batch; `fraction` of its tiles computed: 0.5 for a causal flash-attention
    product, which skips the masked half) or a memory-bound kernel of `nbytes` (m = n = k = 0)."""
    m: int = 0
    n: int = 0
    k: int = 0
    batch: int = 1
    nbytes: float = 0.0
    fraction: float = 1.0

    @property
    def flops(self):
        return 2.0 * self.m * self.n * self.k * self.batch * self.fraction


def gemm(m, n, k, batch=1, fraction=1.0):
    return Kernel(m=int(math.ceil(m)), n=int(math.ceil(n)), k=int(math.ceil(k)), batch=int(batch), fraction=fraction)


def memory(nbytes):
    return Kernel(nbytes=float(nbytes))


def backward_gemms(kern):
    """The two GEMMs of a linear layer's backward: the input gradient dX[M, K] = dY[M, N] · Wᵀ and the weight
    gradient dW[K, N] = Xᵀ · dY, the reduction over the M tokens."""
    return [gemm(kern.m, kern.k, kern.n, kern.batch, kern.fraction), gemm(kern.k, kern.n, kern.m, kern.batch,
                                                                          kern.fraction)]


def gemm_seconds(kern, cluster, dtype):
    """Seconds of GEMM `kern` on one device of `cluster` (the tile and wave model above, without the
    per-kernel costs). Raises ValueError if the cluster has no peak for dtype."""
    peak = cluster.flop_rate(dtype, shape_model=True)
    nbytes = {"float32": 4}.get(dtype, 2)
    per_sm = peak / cluster.sms
    best = math.inf
    for tm, tn in TILES:
        tiles = math.ceil(kern.m / tm) * math.ceil(kern.n / tn) * kern.batch
        for split in SPLIT_K:
            if split > 1 and (tiles >= cluster.sms or kern.k % (split * 64)):
                continue
            waves = math.ceil(math.ceil(tiles * kern.fraction) * split / cluster.sms)
            t = waves * 2.0 * tm * tn * (kern.k / split + cluster.tile_k0) / per_sm
            if split > 1:  # fp32 partial sums written and read back
                t += 2 * split * kern.m * kern.n * kern.batch * 4 / cluster.hbm_bandwidth
            best = min(best, t)
    roofline = kern.batch * (kern.m * kern.k + kern.k * kern.n + kern.m * kern.n) * nbytes / cluster.hbm_bandwidth
    return max(best, roofline)


def kernel_seconds(kern, cluster, dtype):
    """Seconds of one kernel, its fixed cost kernel_latency included."""
    if kern.m:
        return gemm_seconds(kern, cluster, dtype) + cluster.kernel_latency
    return kern.nbytes / (cluster.hbm_bandwidth * cluster.memory_efficiency) + cluster.kernel_latency


def seconds(kernels, cluster, dtype):
    """Seconds of a list of kernels run back to back on one device."""
    return sum(kernel_seconds(k, cluster, dtype) for k in kernels)


def fit_gemm_curve(curve, cluster, dtype="bfloat16"):
    """(tile_k0, kernel_latency, rms, worst): the two constants of the tile model that fit `curve`
    ({(m, n, k): FLOP/s} of one device, sim/published.py GEMM_CURVE) best in relative least squares, on a grid
    (k0 in 0..200 K-steps by 5, latency in 0..10 us by 0.25: deterministic), and the fit's relative errors."""
    from dataclasses import replace
    best = None
    for k0 in range(0, 201, 5):
        for lat_q in range(0, 41):
            c = replace(cluster, tile_k0=float(k0), kernel_latency=lat_q * 0.25e-6, gemm_sustained=1.0)
            errs = []
            for (m, n, k), flops in curve.items():
                t = gemm_seconds(gemm(m, n, k), c, dtype) + c.kernel_latency
                errs.append(t / (2.0 * m * n * k / flops) - 1)
            rms = math.sqrt(sum(e * e for e in errs) / len(errs))
            if best is None or rms < best[2]:
                best = (float(k0), lat_q * 0.25e-6, rms, max(errs, key=abs))
    return best
