"""
Context parallelism (CP): the sequence of every micro-batch is split over the cp ranks of a CP group, and attention
sees the whole sequence by passing key/value blocks around a ring (cp_type="ring", ring attention: Liu, Zaharia &
Abbeel 2023, "Ring Attention with Blockwise Transformers for Near-Infinite Context", section 3) or by resharding
q, k, v from the sequence to the heads with all-to-alls (cp_type="ulysses", DeepSpeed-Ulysses: Jacobs et al. 2023,
"DeepSpeed Ulysses: System Optimizations for Enabling Training of Extreme Long Sequence Transformer Models", section
3; see "Ulysses" below). Everything else in a transformer block
(norms, projections, MLP, the loss) is per token and runs on the rank's own tokens unchanged. Positions stay global:
each rank feeds the model its tokens' positions in the full sequence (`GPT.forward(idx, targets, pos)`), so learned
position embeddings and RoPE see what they would on one device. CP ranks hold the same weights: their gradients are
reduced together with data parallelism's (Megatron-LM's dp x cp group), see "Gradients" below.

Layout (zigzag, for causal load balance). The s tokens are cut into 2·cp chunks of c = s/(2·cp); rank r holds
chunk r and chunk 2·cp-1-r, in that order (`zigzag_indices`). With a plain split, the last rank's queries would
see every key and the first rank's almost none; with the zigzag every rank has one early and one late chunk and
the same amount of unmasked attention. Used by Megatron-LM's CP and Llama 3 (Dubey et al. 2024, "The Llama 3 Herd of
Models", section 3.3.2: "the i-th CP rank received both the i-th and the (2 x CP - 1 - i)-th chunks"), and by
torch's context_parallel (its head-tail load balancer gives the same indices).

Forward of one attention (`RingAttention`), per rank r, with its queries q = [q_r; q_{2cp-1-r}] and its block
[K; V] (b, H, s/cp, D each). Step i = 0..cp-1 works on the block of rank src = (r - i) mod cp; before computing,
the rank posts an async send of the block in hand to rank r+1 and an async receive of the next one from rank r-1
(cp-1 rounds), so the transfer overlaps the compute. Which (query chunk, key chunk) pairs a step computes, from
causality on global chunk indices (chunk j attends to chunk i iff i <= j; only i == j needs the mask):
- src == r (step 0): the local queries against the local keys with a causal mask on local indices (the local order
  is ascending in global position, so that mask is the global one restricted to these tokens);
- src < r: every local query against the block's first chunk (chunk src < r), no mask; its second chunk
  (2cp-1-src > 2cp-1-r) comes after both query chunks: skipped;
- src > r: only the second query chunk (2cp-1-r) against both key chunks, no mask; the first query chunk
  (r < src <= 2cp-1-src) comes before both: skipped.
So fully masked pairs are never computed, the mask is used only on the diagonal, and every rank computes about
2c^2 score entries at every step (step 0: half of a 2c x 2c block; later steps: c x 2c or 2c x c), the balance the
zigzag buys: with a plain split, rank r would compute r+1 blocks and the last rank would set the pace.

Merging partial results (the log-sum-exp rule, as FlashAttention merges tiles: Dao et al. 2022, section 3.1; Milakov
& Gimelshein 2018, "Online normalizer calculation for softmax"). A block returns o_i = softmax(S_i) V_i over its keys
and lse_i = log sum_j exp(S_ij). Over the union of two disjoint key sets: lse = log(e^lse1 + e^lse2) and
o = e^(lse1-lse)·o1 + e^(lse2-lse)·o2, which is formulas.md's o = (e^(m1-m)·l1·o1 + e^(m2-m)·l2·o2)/l with
lse = m + log l. Accumulated in fp32 (`merge_partials`).

Backward (FlashAttention-2's, Dao 2023, algorithm 2, at block granularity). Saved: q, k, v, the output o and lse
(fp32). With dO given, D = rowsum(dO ∘ o) once; for each block pair the probabilities are recomputed from the saved
lse, P = exp(S - lse), and dV = Pᵀ dO, dP = dO Vᵀ, dS = P ∘ (dP - D), dQ = dS K·scale, dK = dSᵀ Q·scale. The K/V
blocks go around the ring again (cp-1 sends, overlapped), and each block's dK/dV accumulator travels behind it: it
starts on the owner's successor (step 1), every rank holding the block adds its part and passes it on, and the
rank before the owner (step cp-1) sends it home, where the owner adds its own part (computed at step 0): cp-1
sends of dK/dV per rank. (torch's template sends its accumulator cp times: it starts at the owner.) Gradients are
exact: the same sums as attention over the gathered sequence, in another order.

Communication per layer per micro-batch, per rank (counted by comm.CommStats for the custom variant;
`ring_send_bytes` is the formula, tests/test_cp.py checks it): b sequences of s tokens, h = n_embd (the K/V width;
under tensor parallelism h/t), e the element size of K/V (4 in fp32, 2 in bf16), dK/dV accumulated in fp32 (fp64
for fp64 inputs), e_acc = max(e, 4):
- forward: cp-1 sends of [K; V], each 2·b·(s/cp)·h elements: (cp-1)·2·b·(s/cp)·h·e bytes;
- backward: cp-1 sends of [K; V] again, plus cp-1 sends of [dK; dV]: (cp-1)·2·b·(s/cp)·h·(e + e_acc) bytes;
and as many bytes received. Derivation: every rank's queries must meet every other rank's K/V block once (cp-1
hops around the ring), in forward and again in backward (they are not kept: keeping them would cost cp times the
K/V memory, which CP exists to avoid); every block's dK/dV is a sum over all cp ranks' queries, accumulated along
the same ring back to its owner (cp-1 hops). Per rank and layer that is 3·(cp-1)·2·b·(s/cp)·h elements, about
6·b·s·h for large cp, independent of cp, and each transfer overlaps one block's attention compute.

Activation memory: a rank saves q, k, v, o of its s/cp tokens and lse, as single's attention (F.sdpa, flash)
saves them for all s tokens: 1/cp of it (measured: `python -m parallel.cp`, see main). The score block of a step
(b·H·2c·2c at most, fp32) is transient and recomputed in backward, as in FlashAttention; this reference computes a
block with plain matmuls, so that transient is materialised (a production ring calls a flash kernel per block, as
torch's template does, and never holds more than a tile).

Gradients. The loss on a rank is the mean over its s/cp tokens; the global mean is the mean of the cp local means
(equal token counts; targets ignored with -1 would weigh the ranks unequally). So each rank backpropagates its local
loss, and the parameter gradients are averaged over the CP group (with DP: over the dp x cp group), exactly the
single device's gradient of the mean loss.

Dropout: rejected (`check_cp_config`). The attention-probability dropout mask of a (query chunk, key chunk) block
would have to be regenerated identically in the ring backward (FlashAttention keeps the Philox seed and offset per
tile), and it would not be the mask a single device draws for the same step, so "= single" could not be tested.

Two variants, top to bottom:
- `pytorch`: `torch.distributed.tensor.experimental.context_parallel` (prototype API since PyTorch 2.7): it shards
  the inputs, targets and positions with its head-tail load balancer (= our zigzag) and patches
  F.scaled_dot_product_attention (the model's default core) to run its ring template on DTensors (in 2.13 the K/V
  blocks are all-gathered once by default, set_rotate_method("alltoall") makes it a ring; dK/dV go around by
  all-to-all). It registers only the CUDA kernels (flash, efficient, cuDNN); on CPU the op is
  aten._scaled_dot_product_flash_attention_for_cpu and the API raises NotImplementedError. The CPU kernel returns
  the same (out, lse) pair and its backward takes the same arguments, so `register_cpu_attention_for_context_
  parallel` hands it to torch's own ring template (private modules, isolated in that one function): the native API
  then runs on CPU unchanged, and custom is compared with it there.
- `custom`: ring attention written out (`RingAttention`, an autograd Function over our Collectives, swapped in as
  each attention's core by `apply_ring_attention`), so the triton and nccl variants run the same algorithm over
  their backends.

Ulysses (cp_type="ulysses"; `UlyssesAttentionCore`, around the model's own core). The same zigzag split of the
sequence, but attention itself is not distributed: an all-to-all over the CP group turns each of q, k, v from
sequence-sharded (rank r: its s/cp tokens of all H heads) into head-sharded (rank r: all s tokens of heads
r·H/cp..(r+1)·H/cp-1), the model's core (causal F.scaled_dot_product_attention, flash on a GPU) runs on whole
sequences for H/cp heads, and a fourth all-to-all turns its output back (`sequence_to_heads`, `heads_to_sequence`).
An all-to-all concatenates the ranks' tokens in rank order, i.e. in the zigzag order (rank 0's chunks 0 and 2cp-1,
then rank 1's, ...), so the gathered sequence is permuted into sequence order before the causal core and back after
(`gathered_positions`); no load balancing is needed inside the core, every rank computes all of it for its heads.
Backward is the adjoint of each step: the reverse all-to-all of each gradient (and the inverse permutations): the
output's gradient to head-sharded, then dq, dk, dv back to sequence-sharded. The heads are split: n_head and n_kv_head
(grouped-query attention; k and v travel at their own width h_kv = n_kv_head·head_dim) must be divisible by cp, by
tp·cp under tensor parallelism (TP splits the heads first); dropout is rejected as for the ring.
Communication per layer per micro-batch, per rank (counted by CommStats for the custom variant, `ulysses_send_bytes`
the formula, tests/test_ulysses.py checks it): an all-to-all of a rank's b·(s/cp)·w elements keeps the 1/cp that is
its own head group and sends the rest, b·s·w·(cp-1)/cp². Forward: q, k, v and the output, 4·b·s·h·(cp-1)/cp²
elements ((2h + 2h_kv)·b·s·(cp-1)/cp² with grouped-query attention); backward the same four (dO; dq, dk, dv);
as many received. That is ≈ 8·b·s·h/cp per rank and layer, falling as 1/cp (constant when s and cp grow together:
the paper's point), where the ring's ≈ 6·b·s·h·(cp-1)/cp does not fall; but an all-to-all reaches every rank of the
group at once (it needs full bisection bandwidth, NVLink inside a node) and sits on the critical path, while the
ring only talks to neighbours and hides each transfer behind a block's attention. Activation memory: the core saves
q, k, v, o, lse of s tokens for H/cp heads, exactly what the ring saves (1/cp of single's, measured by
tests/test_ulysses.py); the all-to-all buffers are transient, but the output of the second all-to-all is a new
tensor that the out-projection saves (one b·(s/cp)·h more per layer than the ring, whose output is the tensor its
core saves). Two variants: `pytorch`, torch.distributed.all_to_all_single in an autograd Function (`TorchAllToAll`,
DeepSpeed's _SeqAllToAll; torch's own autograd-aware all_to_all_single is deprecated for a private module in 2.13);
`custom`, `SequenceToHeads` / `HeadsToSequence` over our Collectives.all_to_all, so the triton and nccl variants
run their all-to-all kernels. Ring or Ulysses: ring for any head count, slow or neighbour-only links, or cp larger
than the heads; Ulysses when the heads divide tp·cp and the CP group has all-to-all bandwidth (inside a node), where
its falling volume wins at large cp, and its core is the unchanged single-device kernel. (The two compose as xDiT's
Unified Sequence Parallelism, Fang & Zhao 2024: Ulysses inside a node, ring across; not implemented here.)

The functions here are the pieces a strategy composes (config check, the attention swap, the per-micro-batch split,
`cp_micro_batch`); the CP group comes from the rank grid: a Collectives over it (custom) or its 1-D DeviceMesh
(pytorch). The 1-D strategy (`ContextParallel`, at the end) is the whole model on every rank, the sequence split over
all of them; parallel/3d.py composes the same pieces with dp, pp and tp.
"""

import argparse
import contextlib
import math

import torch
import torch.distributed as dist
import torch.nn as nn

from model import CausalSelfAttention, repeat_kv
from parallel import Strategy, register
from parallel.ddp import DataParallel, apply_ddp


CP_TYPES = ("ring", "ulysses")


def check_cp_config(model_config, cp, cp_type="ring", tp=1):
    """Raise ValueError (one line, naming the numbers) if the model cannot run with context parallelism of `cp_type`
    ("ring" or "ulysses") over cp ranks, inside tp-way tensor parallelism: block_size must be divisible by 2·cp (the
    zigzag's 2·cp chunks), dropout must be 0 (module docstring), and for Ulysses the query heads and the key/value
    heads (n_kv_head, grouped-query attention; n_head without it) divisible by tp·cp (TP splits the heads first, then
    each CP rank takes 1/cp of a TP rank's). Call it before any collective."""
    c = model_config
    if cp_type not in CP_TYPES:
        raise ValueError(f"cp_type must be one of {', '.join(CP_TYPES)}, got {cp_type!r}")
    if cp < 1:
        raise ValueError(f"context parallel: cp_size={cp} must be >= 1")
    if cp == 1:  # nothing is split
        return
    kv_heads = getattr(c, "n_kv_head", None) or c.n_head
    for name, heads in (("n_head", c.n_head), ("n_kv_head", kv_heads)):
        if cp_type == "ulysses" and heads % (tp * cp):
            split = f"tp_size={tp} x cp_size={cp} = {tp * cp}" if tp > 1 else f"cp_size={cp}"
            raise ValueError(f"Ulysses context parallel: {name}={heads} is not divisible by {split} (each rank "
                             f"attends over the whole sequence with 1/{tp * cp} of the heads); use cp_type='ring'")
    if c.block_size % (2 * cp):
        raise ValueError(f"context parallel: block_size={c.block_size} is not divisible by 2 x cp_size = {2 * cp} "
                         f"(each rank holds 2 of the sequence's {2 * cp} chunks)")
    if c.dropout:
        raise ValueError(f"context parallel: dropout={c.dropout} is not supported (the attention dropout mask of each "
                         f"ring block would differ from the single device's and must be replayed in backward); "
                         f"use dropout=0.0")


# ----------------------------------------------------------------------------------------------------------
# the zigzag split


def zigzag_indices(seq_len, cp, rank, device=None):
    """The positions of rank `rank`'s tokens: chunk `rank` and chunk 2·cp-1-rank of the sequence cut into 2·cp
    chunks, ascending. Returns an int64 tensor of shape (seq_len/cp,). ValueError if 2·cp does not divide seq_len.
    (Megatron-LM / Llama 3's CP layout; torch's context_parallel head-tail load balancer.)"""
    if seq_len % (2 * cp):
        raise ValueError(f"context parallel: sequence length {seq_len} is not divisible by 2 x cp_size = {2 * cp}")
    c = seq_len // (2 * cp)
    first, second = rank * c, (2 * cp - 1 - rank) * c
    return torch.cat([torch.arange(first, first + c, device=device), torch.arange(second, second + c, device=device)])


def split_sequence(cp, rank, *tensors):
    """This rank's share of (B, T) tensors (token ids, targets) along the sequence, and their positions.
    Returns (*local tensors (B, T/cp), pos (T/cp,) int64) for `GPT.forward(x, y, pos=pos)`."""
    pos = zigzag_indices(tensors[0].shape[1], cp, rank, tensors[0].device)
    return (*(t[:, pos] for t in tensors), pos)


# ----------------------------------------------------------------------------------------------------------
# blockwise attention, the log-sum-exp merge, and its backward (fp32)


def accumulation_dtype(dtype):
    """The dtype ring attention computes and accumulates in: fp32, or the input's if wider (fp64)."""
    return torch.promote_types(dtype, torch.float32)


def block_attention(q, k, v, scale, causal):
    """Attention of queries q (B, H, Tq, D) over one block of keys/values k, v (B, Hkv, Tk, D), in fp32 (fp64 for fp64
    inputs); Hkv divides H (grouped-query attention: query head i reads key/value head i // (H/Hkv), model.repeat_kv).
    causal: Tq == Tk and query i attends to keys 0..i only. Returns (out (B, H, Tq, D), lse (B, H, Tq)):
    out = softmax(q kᵀ·scale) v and lse = log sum_j exp(q k_jᵀ·scale), the normaliser `merge_partials` needs."""
    acc_dtype = accumulation_dtype(q.dtype)
    n_rep = q.shape[1] // k.shape[1]
    q, k, v = q.to(acc_dtype), repeat_kv(k.to(acc_dtype), n_rep), repeat_kv(v.to(acc_dtype), n_rep)
    s = torch.matmul(q, k.transpose(-2, -1)) * scale
    if causal:
        s = s.masked_fill(torch.ones(s.shape[-2:], dtype=torch.bool, device=s.device).triu(1), float("-inf"))
    lse = torch.logsumexp(s, dim=-1)
    return torch.matmul(torch.exp(s - lse.unsqueeze(-1)), v), lse


def merge_partials(out, lse, block_out, block_lse):
    """Merge two partial attentions of the same queries over disjoint key sets (FlashAttention's rescaling):
    lse = log(e^lse1 + e^lse2), out = e^(lse1-lse)·out1 + e^(lse2-lse)·out2. out: (..., T, D), lse: (..., T), in the
    accumulation dtype. Returns the merged (out, lse)."""
    new_lse = torch.logaddexp(lse, block_lse)
    new_out = torch.exp(lse - new_lse).unsqueeze(-1) * out + torch.exp(block_lse - new_lse).unsqueeze(-1) * block_out
    return new_out, new_lse


def block_attention_backward(q, k, v, dout, lse, delta, scale, causal):
    """Gradients of one block's share of attention (FlashAttention-2's backward): q, dout (B, H, Tq, D); k, v
    (B, Hkv, Tk, D); lse, delta (B, H, Tq): the merged output's log-sum-exp and rowsum(dout ∘ out). Recomputes
    P = exp(q kᵀ·scale - lse) and returns (dq (B, H, Tq, D), dk, dv (B, Hkv, Tk, D)), this block's parts, in fp32
    (fp64 for fp64 inputs); with grouped-query attention a key/value head's gradient sums its query heads'."""
    acc_dtype = accumulation_dtype(q.dtype)
    B, Hkv, Tk, D = k.shape
    n_rep = q.shape[1] // Hkv
    q, dout = q.to(acc_dtype), dout.to(acc_dtype)
    k, v = repeat_kv(k.to(acc_dtype), n_rep), repeat_kv(v.to(acc_dtype), n_rep)
    s = torch.matmul(q, k.transpose(-2, -1)) * scale
    if causal:
        s = s.masked_fill(torch.ones(s.shape[-2:], dtype=torch.bool, device=s.device).triu(1), float("-inf"))
    p = torch.exp(s - lse.unsqueeze(-1))
    dv = torch.matmul(p.transpose(-2, -1), dout)
    ds = p * (torch.matmul(dout, v.transpose(-2, -1)) - delta.unsqueeze(-1))
    dk = torch.matmul(ds.transpose(-2, -1), q) * scale
    if n_rep > 1:
        dk, dv = dk.view(B, Hkv, n_rep, Tk, D).sum(2), dv.view(B, Hkv, n_rep, Tk, D).sum(2)
    return torch.matmul(ds, k) * scale, dk, dv


def _pairs(rank, src, c):
    """Which part of the local queries meets which part of src's K/V block (module docstring): (query slice,
    key slice, causal), for the zigzag layout with chunks of c tokens."""
    if src == rank:
        return slice(None), slice(None), True
    if src < rank:
        return slice(None), slice(0, c), False
    return slice(c, None), slice(None), False


# ----------------------------------------------------------------------------------------------------------
# custom variant: ring attention over our Collectives


def _ring_forward(q, k, v, comm, scale):
    """RingAttention's forward: (out in q's dtype, lse in the accumulation dtype)."""
    cp, r = comm.world_size, comm.rank
    nxt_rank, prev_rank = (r + 1) % cp, (r - 1) % cp
    c = q.shape[2] // 2
    kv = torch.stack([k, v])  # (2, B, H, T/cp, D): the block passed around, one message per round
    acc_dtype = accumulation_dtype(q.dtype)
    B, H, T, D = q.shape
    # out is (B, H, T, D) stored as (B, T, H, D), as the CPU flash kernel stores its output: the model's
    # transpose(1, 2).reshape(B, T, H·D) is then a view, and out_proj saves no copy of it for backward
    out = torch.zeros((B, T, H, D), dtype=acc_dtype, device=q.device).transpose(1, 2)
    lse = torch.full((B, H, T), float("-inf"), dtype=acc_dtype, device=q.device)
    for step in range(cp):
        if step < cp - 1:  # post the transfer of the next block, then compute on the one in hand
            incoming = torch.empty_like(kv)
            transfers = [comm.send(kv, nxt_rank, async_op=True), comm.recv(incoming, prev_rank, async_op=True)]
        qs, ks, causal = _pairs(r, (r - step) % cp, c)
        block_out, block_lse = block_attention(q[:, :, qs], kv[0][:, :, ks], kv[1][:, :, ks], scale, causal)
        out[:, :, qs], lse[:, :, qs] = merge_partials(out[:, :, qs], lse[:, :, qs], block_out, block_lse)
        if step < cp - 1:
            for t in transfers:
                t.wait()
            kv = incoming
    return out.to(q.dtype), lse


def _ring_backward(q, k, v, out, lse, dout, comm, scale):
    """RingAttention's backward: (dq, dk, dv) in the dtypes of q, k, v."""
    cp, r = comm.world_size, comm.rank
    nxt_rank, prev_rank = (r + 1) % cp, (r - 1) % cp
    c = q.shape[2] // 2
    dout = dout.contiguous()
    acc_dtype = accumulation_dtype(q.dtype)
    delta = (dout.to(acc_dtype) * out.to(acc_dtype)).sum(-1)  # (B, H, T/cp)
    dq = torch.zeros(q.shape, dtype=acc_dtype, device=q.device)
    kv = torch.stack([k, v])
    own = None  # this rank's part of its own block's [dK; dV], computed at step 0
    sends = []  # dK/dV sends still in flight (their buffers stay alive here)
    for step in range(cp):
        # Receives from rank r-1 are posted in the order r-1 sends: its step-(step-1) dK/dV, then its next K/V.
        if step >= 2:
            acc_in = torch.empty((2, *k.shape), dtype=acc_dtype, device=k.device)
            acc_recv = comm.recv(acc_in, prev_rank, async_op=True)
        if step < cp - 1:
            incoming = torch.empty_like(kv)
            transfers = [comm.send(kv, nxt_rank, async_op=True), comm.recv(incoming, prev_rank, async_op=True)]
        qs, ks, causal = _pairs(r, (r - step) % cp, c)
        dq_part, dk_part, dv_part = block_attention_backward(q[:, :, qs], kv[0][:, :, ks], kv[1][:, :, ks],
                                                             dout[:, :, qs], lse[:, :, qs], delta[:, :, qs],
                                                             scale, causal)
        dq[:, :, qs] += dq_part
        acc = torch.zeros((2, *k.shape), dtype=acc_dtype, device=k.device)
        acc[0][:, :, ks], acc[1][:, :, ks] = dk_part, dv_part
        if step == 0:
            own = acc
        else:
            if step >= 2:  # the accumulator of this block from the ranks before this one
                acc_recv.wait()
                acc += acc_in
            sends.append((acc, comm.send(acc, nxt_rank, async_op=True)))  # at step cp-1: to the owner
        if step < cp - 1:
            for t in transfers:
                t.wait()
            kv = incoming
    if cp > 1:  # our block's accumulator, home from rank r-1 after its last step
        acc_in = torch.empty_like(own)
        comm.recv(acc_in, prev_rank)
        own += acc_in
    for _, work in sends:
        work.wait()
    return dq.to(q.dtype), own[0].to(k.dtype), own[1].to(v.dtype)


class RingAttention(torch.autograd.Function):
    """Causal ring attention over the CP group of `comm` (module docstring: forward, merge, backward, bytes).

    q (B, H, T/cp, D), k, v (B, Hkv, T/cp, D): this rank's tokens in the zigzag layout (chunk r, then chunk 2cp-1-r),
    Hkv dividing H (grouped-query attention: the ring carries the Hkv key/value heads, H/Hkv times fewer bytes than
    multi-head attention's, and each rank repeats them for its query heads); comm: a
    Collectives over the CP group (its rank is the CP rank); scale: the softmax scale (1/sqrt(D) for SDPA's).
    Returns (B, H, T/cp, D) in q's dtype: this rank's rows of causal attention over the full sequence.
    Every rank of the group must call it with the same shapes (it sends and receives cp-1 blocks each way).
    Autocast is off inside, so the fp32 accumulation stays fp32 under bf16 autocast."""

    @staticmethod
    def forward(ctx, q, k, v, comm, scale):
        with torch.autocast(q.device.type, enabled=False):
            out, lse = _ring_forward(q, k, v, comm, scale)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.comm, ctx.scale = comm, scale
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k, v, out, lse = ctx.saved_tensors
        with torch.autocast(q.device.type, enabled=False):
            dq, dk, dv = _ring_backward(q, k, v, out, lse, dout, ctx.comm, ctx.scale)
        return dq, dk, dv, None, None


def ring_attention(q, k, v, comm, scale=None):
    """RingAttention.apply with SDPA's default scale 1/sqrt(D). q, k, v: (B, H, T/cp, D) -> (B, H, T/cp, D)."""
    return RingAttention.apply(q, k, v, comm, 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale)


class RingAttentionCore(nn.Module):
    """An attention core (model.CausalSelfAttention.core) computing causal ring attention over the CP group of
    `comm`: (q, k, v) (B, H, T/cp, D) of this rank's zigzag tokens -> (B, H, T/cp, D). No parameters."""

    def __init__(self, comm):
        super().__init__()
        self.comm = comm

    def forward(self, q, k, v):
        return ring_attention(q, k, v, self.comm)


def apply_ring_attention(model, comm):
    """Replace the core of every CausalSelfAttention in `model` (a GPT, a pipeline stage, a TP-sharded model: its
    local heads) by RingAttentionCore(comm), the custom variant. The model must then be fed this rank's tokens and
    positions (`split_sequence`). Returns the model. Parameters and state_dict keys are unchanged.
    ValueError if an attention core has dropout (check_cp_config says why)."""
    for module in model.modules():
        if isinstance(module, CausalSelfAttention):
            if getattr(module.core, "dropout", 0.0):
                raise ValueError(f"context parallel: attention dropout={module.core.dropout} is not supported; "
                                 f"use dropout=0.0")
            module.core = RingAttentionCore(comm)
    return model


def ring_send_bytes(batch_size, seq_len, kv_width, cp, element_size=4):
    """The ring's communication per layer per micro-batch per rank (module docstring), in bytes sent (as many are
    received): {"forward": (cp-1)·2·b·(s/cp)·h·e, "backward": (cp-1)·2·b·(s/cp)·h·(e + max(e, 4))} with
    h = kv_width (the K/V features of the local heads), e = element_size of K/V; dK/dV travel in the accumulation
    dtype (fp32, or fp64 for fp64 inputs)."""
    block = 2 * batch_size * (seq_len // cp) * kv_width
    return {"forward": (cp - 1) * block * element_size,
            "backward": (cp - 1) * block * (element_size + max(element_size, 4))}


# ----------------------------------------------------------------------------------------------------------
# Ulysses: an all-to-all from sequence to head sharding around the attention core (both variants)


def gathered_positions(seq_len, cp, device=None):
    """The global positions of the s tokens a Ulysses all-to-all gathers, in the order it gathers them: CP rank 0's
    zigzag tokens, then rank 1's, ... Returns int64 (seq_len,); its argsort puts them in sequence order."""
    return torch.cat([zigzag_indices(seq_len, cp, r, device) for r in range(cp)])


def sequence_to_heads(x, cp, exchange, order):
    """Ulysses' first all-to-all: x (B, H, s/cp, D), this rank's tokens (zigzag) of all H heads -> (B, H/cp, s, D),
    all s tokens, in sequence order, of head group `rank` (heads rank·H/cp to (rank+1)·H/cp - 1).
    exchange(send) -> recv: the all-to-all along dim 0 in cp equal chunks over the CP group (send chunk j goes to
    rank j, recv chunk i came from rank i); order: argsort(gathered_positions(s, cp))."""
    B, H, t, D = x.shape
    send = x.reshape(B, cp, H // cp, t, D).transpose(0, 1).contiguous()  # chunk j: head group j, for rank j
    recv = exchange(send)                                                # chunk i: rank i's tokens, my heads
    gathered = recv.permute(1, 2, 0, 3, 4).reshape(B, H // cp, cp * t, D)  # rank 0's tokens, rank 1's, ...
    return gathered.index_select(2, order)


def heads_to_sequence(y, cp, exchange, positions):
    """Ulysses' second all-to-all, the inverse of sequence_to_heads: y (B, H/cp, s, D), head group `rank` in sequence
    order -> (B, H, s/cp, D), this rank's tokens of all H heads, stored as (B, s/cp, H, D) (so that the model's
    transpose(1, 2).reshape(B, s/cp, H·D) is a view). positions: gathered_positions(s, cp)."""
    B, Hc, s, D = y.shape
    t = s // cp
    gathered = y.index_select(2, positions)                               # rank 0's tokens, rank 1's, ...
    send = gathered.reshape(B, Hc, cp, t, D).permute(2, 0, 1, 3, 4).contiguous()  # chunk j: rank j's tokens
    recv = exchange(send)                                                 # chunk i: head group i, my tokens
    return recv.permute(1, 3, 0, 2, 4).reshape(B, t, cp * Hc, D).transpose(1, 2)


def collectives_exchange(comm):
    """The all-to-all of sequence_to_heads / heads_to_sequence over our Collectives (custom, triton, nccl)."""
    def exchange(send):
        recv = torch.empty_like(send)
        comm.all_to_all(recv, send)
        return recv
    return exchange


class TorchAllToAll(torch.autograd.Function):
    """torch.distributed.all_to_all_single of x in equal chunks along dim 0 over `group`, differentiable: the adjoint
    of an equal-chunk all-to-all is the same all-to-all of the gradient (chunk j came from rank j and goes back to
    it). DeepSpeed-Ulysses' _SeqAllToAll; torch's own autograd-aware form, torch.distributed.nn.functional's, is
    deprecated in 2.13 in favour of a private module's."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return TorchAllToAll.exchange(x, group)

    @staticmethod
    def backward(ctx, grad):
        return TorchAllToAll.exchange(grad, ctx.group), None

    @staticmethod
    def exchange(x, group):
        """The all-to-all into a new contiguous tensor (gloo writes a non-contiguous output as if it were contiguous,
        and a gradient may arrive as a permuted view, which empty_like would copy the strides of)."""
        x = x.contiguous()
        out = torch.empty_like(x)
        dist.all_to_all_single(out, x, group=group)
        return out


def torch_exchange(group):
    """The same over torch.distributed.all_to_all_single (TorchAllToAll), under autograd: the pytorch variant."""
    return lambda send: TorchAllToAll.apply(send, group)


class SequenceToHeads(torch.autograd.Function):
    """sequence_to_heads over `comm`, differentiable: the backward is heads_to_sequence of the gradient (an
    all-to-all and index permutations, whose adjoint is their inverse). Saves nothing for backward but the
    index tensors' references. x: (B, H, s/cp, D) -> (B, H/cp, s, D)."""

    @staticmethod
    def forward(ctx, x, comm, positions, order):
        ctx.comm, ctx.positions, ctx.order = comm, positions, order
        return sequence_to_heads(x, comm.world_size, collectives_exchange(comm), order)

    @staticmethod
    def backward(ctx, grad):
        dx = heads_to_sequence(grad, ctx.comm.world_size, collectives_exchange(ctx.comm), ctx.positions)
        return dx, None, None, None


class HeadsToSequence(torch.autograd.Function):
    """heads_to_sequence over `comm`, differentiable: the backward is sequence_to_heads of the gradient.
    y: (B, H/cp, s, D) -> (B, H, s/cp, D)."""

    @staticmethod
    def forward(ctx, y, comm, positions, order):
        ctx.comm, ctx.positions, ctx.order = comm, positions, order
        return heads_to_sequence(y, comm.world_size, collectives_exchange(comm), positions)

    @staticmethod
    def backward(ctx, grad):
        dy = sequence_to_heads(grad, ctx.comm.world_size, collectives_exchange(ctx.comm), ctx.order)
        return dy, None, None, None


class UlyssesAttentionCore(nn.Module):
    """An attention core (model.CausalSelfAttention.core) running the model's own core (`inner`, e.g. causal
    F.scaled_dot_product_attention, with whatever it does for grouped-query attention) on whole sequences for 1/cp
    of the heads, between two all-to-alls over the CP group (DeepSpeed-Ulysses, module docstring).

    (q (B, H, s/cp, D), k, v (B, H_kv, s/cp, D)) of this rank's zigzag tokens -> (B, H, s/cp, D). custom: comm, a
    Collectives over the CP group (custom, triton, nccl variants; SequenceToHeads / HeadsToSequence); pytorch:
    group, the CP process group (torch.distributed.all_to_all_single under autograd: TorchAllToAll). ValueError (one
    line, before the all-to-all; every rank has the same shapes) if H or H_kv is not divisible by cp."""

    def __init__(self, inner, comm=None, group=None):
        super().__init__()
        self.inner, self.comm, self.group = inner, comm, group
        self.cp = comm.world_size if comm is not None else dist.get_world_size(group)
        self._layout = {}

    def layout(self, seq_len, device):
        """(positions, order) of the gathered sequence: gathered_positions and its argsort, cached."""
        key = (seq_len, device)
        if key not in self._layout:
            positions = gathered_positions(seq_len, self.cp, device)
            self._layout[key] = positions, torch.argsort(positions)
        return self._layout[key]

    def forward(self, q, k, v):
        for name, x in (("query heads", q), ("key/value heads", k)):
            if x.shape[1] % self.cp:
                raise ValueError(f"Ulysses context parallel: {x.shape[1]} {name} on this rank are not divisible by "
                                 f"cp_size={self.cp}")
        positions, order = self.layout(q.shape[2] * self.cp, q.device)
        if self.comm is not None:
            q, k, v = (SequenceToHeads.apply(x, self.comm, positions, order) for x in (q, k, v))
            return HeadsToSequence.apply(self.inner(q, k, v), self.comm, positions, order)
        exchange = torch_exchange(self.group)
        q, k, v = (sequence_to_heads(x, self.cp, exchange, order) for x in (q, k, v))
        return heads_to_sequence(self.inner(q, k, v), self.cp, exchange, positions)


def apply_ulysses_attention(model, comm=None, group=None):
    """Wrap the core of every CausalSelfAttention in `model` (a GPT, a pipeline stage, a TP-sharded model: its local
    heads) in UlyssesAttentionCore: over the Collectives `comm` (custom, triton, nccl), or over the process group
    `group` with torch's autograd-aware all-to-all (pytorch). The model must then be fed this rank's tokens and
    positions (`split_sequence`). Returns the model; parameters and state_dict keys are unchanged.
    ValueError if an attention core has dropout (check_cp_config says why)."""
    for module in model.modules():
        if isinstance(module, CausalSelfAttention):
            if getattr(module.core, "dropout", 0.0):
                raise ValueError(f"context parallel: attention dropout={module.core.dropout} is not supported; "
                                 f"use dropout=0.0")
            module.core = UlyssesAttentionCore(module.core, comm, group)
    return model


def apply_cp_attention(model, comm, cp_type):
    """The custom variants' attention for context parallelism of `cp_type` over the Collectives `comm`:
    apply_ring_attention or apply_ulysses_attention. Returns the model."""
    if cp_type == "ulysses":
        return apply_ulysses_attention(model, comm)
    return apply_ring_attention(model, comm)


def ulysses_send_bytes(batch_size, seq_len, width, kv_width, cp, element_size=4):
    """Ulysses' communication per layer per micro-batch per rank (module docstring), in bytes sent to the other
    ranks (as many are received): {"forward": (cp-1)·b·(s/cp)·(2·width + 2·kv_width)/cp·e, "backward": the same}.
    width: the query (and output) features of the local heads (n_embd, or n_embd/t under TP), kv_width the key/value
    features (n_kv_head·head_dim, /t); e: the element size of the activations (their gradients have the same)."""
    tokens = batch_size * (seq_len // cp)
    per_layer = (cp - 1) * tokens * (2 * width + 2 * kv_width) // cp * element_size
    return {"forward": per_layer, "backward": per_layer}


# ----------------------------------------------------------------------------------------------------------
# pytorch variant: torch.distributed.tensor.experimental.context_parallel


def register_cpu_attention_for_context_parallel():
    """Let torch's context_parallel run on CPU: route aten._scaled_dot_product_flash_attention_for_cpu (the kernel
    F.scaled_dot_product_attention picks on CPU) and its backward through torch's own ring template, as it routes the
    CUDA flash / efficient / cuDNN kernels. Idempotent.

    Uses private torch modules, the one place in this file: DTensor's CP op table
    (torch.distributed.tensor.experimental._context_parallel._attention.custom_ops, which context_parallel() installs
    on entry) and its _templated_ring_attention(_backward). No public API registers an attention kernel with CP. The
    CPU kernel returns (out, logsumexp (B, H, T)) like the CUDA flash kernel and its backward takes (grad_out, query,
    key, value, out, logsumexp, dropout_p, is_causal, scale), the arguments the template passes, so the template
    (load balancing, LSE merge, K/V rotation) runs unchanged."""
    from torch.distributed.tensor import DTensor, Shard
    from torch.distributed.tensor.experimental._context_parallel import _attention as torch_cp
    aten = torch.ops.aten
    forward_op = aten._scaled_dot_product_flash_attention_for_cpu.default
    backward_op = aten._scaled_dot_product_flash_attention_for_cpu_backward.default

    def local(a):
        return a.to_local() if isinstance(a, DTensor) else a

    def sharded(mesh, tensors):
        return tuple(DTensor.from_local(t, mesh, [Shard(2)], run_check=False) for t in tensors)

    def forward_handler(op_call, args, kwargs):
        # query, key, value, dropout_p=0.0, is_causal=False, *, attn_mask=None, scale=None
        q, k, v = args[:3]
        kw = {**dict(zip(("dropout_p", "is_causal"), args[3:])), **kwargs}
        if kw.get("attn_mask") is not None:
            raise NotImplementedError("context parallel on CPU: attn_mask is not supported")
        return sharded(q.device_mesh, torch_cp._templated_ring_attention(
            q.device_mesh.get_group(), 2, forward_op, local(q), local(k), local(v), **kw))

    def backward_handler(op_call, args, kwargs):
        names = ("grad_out", "query", "key", "value", "out", "logsumexp", "dropout_p", "is_causal")
        kw = {**dict(zip(names, args)), **kwargs}
        mesh = kw["query"].device_mesh
        grads = torch_cp._templated_ring_attention_backward(mesh.get_group(), 2, backward_op, grad_out_name="grad_out",
                                                            **{n: local(a) for n, a in kw.items()})
        return sharded(mesh, grads[:3])

    torch_cp.custom_ops[forward_op] = forward_handler
    torch_cp.custom_ops[backward_op] = backward_handler


@contextlib.contextmanager
def pytorch_context_parallel(mesh, *tensors):
    """torch's context_parallel over the 1-D CP DeviceMesh `mesh` for one micro-batch: yields (*local tensors,
    pos), this rank's share (zigzag, by torch's head-tail load balancer) of the (B, T, ...) tensors (token ids,
    targets; copies, the originals are untouched) along dim 1, and the positions of its tokens (T/cp,). Inside,
    the model's F.scaled_dot_product_attention runs torch's ring attention; run the forward AND the backward inside.
    On CPU it first registers the CPU attention kernel (register_cpu_attention_for_context_parallel)."""
    from torch.distributed.tensor.experimental import context_parallel
    if mesh.device_type == "cpu":
        register_cpu_attention_for_context_parallel()
    buffers = [t.clone(memory_format=torch.contiguous_format) for t in tensors]
    buffers.append(torch.arange(tensors[0].shape[1], device=tensors[0].device))
    with context_parallel(mesh, buffers=buffers, buffer_seq_dims=[1] * len(tensors) + [0],
                          no_restore_buffers=set(buffers)):
        yield tuple(buffers)


def cp_micro_batch(variant, mesh, comm, cp_type="ring"):
    """A strategy's micro_batch context (parallel.Strategy.micro_batch) for context parallelism over the "cp" mesh
    dimension `mesh` (pytorch) or the Collectives `comm` over it (custom and its backends): it yields this rank's
    share of x and y (B, T/cp) and {"pos": its tokens' positions (T/cp,)}, the zigzag of both variants (torch's
    head-tail load balancer gives the same indices). pytorch ring: the forward and backward run inside
    context_parallel(); otherwise the attention cores already are RingAttentionCore or UlyssesAttentionCore
    (apply_ring_attention, apply_ulysses_attention) and the batch is split here."""
    if variant == "pytorch" and cp_type == "ring":
        @contextlib.contextmanager
        def micro_batch(x, y):
            with pytorch_context_parallel(mesh, x, y) as (x, y, pos):
                yield x, y, {"pos": pos}
        return micro_batch

    def micro_batch(x, y):
        x, y, pos = split_sequence(comm.world_size, comm.rank, x, y)
        return contextlib.nullcontext((x, y, {"pos": pos}))
    return micro_batch


@register("cp", "pytorch", "custom", "triton", "nccl", "cuda")
class ContextParallel(Strategy):
    """Context parallelism over every process (a grid with only a "cp" dimension): the whole model on every rank,
    every micro-batch's sequence split over the ranks (zigzag), attention by ring (cfg.cp_type="ring": torch's
    context_parallel, or our RingAttention over this variant's Collectives) or by Ulysses' all-to-alls
    (cp_type="ulysses": torch.distributed.all_to_all_single in an autograd Function, or our Collectives.all_to_all);
    the ranks hold the same weights, so their gradients are averaged as data parallelism's: DistributedDataParallel
    (pytorch) or our DataParallel (custom) over the cp group. Every rank reads the same rows of the global batch; the
    logged loss is the mean of the ranks' means."""

    def __init__(self, cfg, device):
        super().__init__(cfg, device)
        if cfg.cp_size not in (0, self.world_size):
            raise ValueError(f"parallel='cp' uses every process for context parallelism: cp_size={cfg.cp_size} must be "
                             f"0 or the world size {self.world_size} (use parallel='3d' to combine)")
        self.use_grid({"dp": 1, "pp": 1, "cp": self.world_size, "tp": 1})

    def build_model(self, model_config, weights=None):
        cp_type = self.cfg.cp_type
        check_cp_config(model_config, self.world_size, cp_type)
        model = super().build_model(model_config, weights)
        comm = self.collectives(self.grid.group("cp"))
        if self.variant == "pytorch":
            if cp_type == "ulysses":
                apply_ulysses_attention(model, group=self.grid.group("cp"))
            self.module = apply_ddp(model, self.grid.group("cp"), self.stats, self.cfg.bucket_cap_mb, self.device)
        else:
            self.module = DataParallel(apply_cp_attention(model, comm, cp_type), comm, self.cfg.bucket_cap_mb)
        self.micro_batch = cp_micro_batch(self.variant, self.grid.mesh["cp"], comm, cp_type)
        return model


# ----------------------------------------------------------------------------------------------------------
# measurement: attention activation memory per rank


def measure_saved_bytes(model, x, y, pos):
    """Forward one micro-batch and return the activation bytes autograd saves for backward (torch.autograd.graph.
    saved_tensors_hooks; each storage counted once, parameters not counted: what stays alive until backward)
    {"core": inside the attention cores, "attention": inside the CausalSelfAttention modules (projections, RoPE,
    core), "model": the whole forward}; then run the backward (so the ring's transfers complete on every rank)."""
    active = {"core": 0, "attention": 0, "model": 1}
    saved = {name: {} for name in active}
    parameters = {p.untyped_storage().data_ptr() for p in model.parameters()}

    def pack(t):
        storage = t.untyped_storage()
        if storage.data_ptr() in parameters:
            return t
        for name, depth in active.items():
            if depth:
                saved[name][storage.data_ptr()] = storage.nbytes()
        return t

    def enter(name):
        def hook(module, args):
            active[name] += 1
        return hook

    def leave(name):
        def hook(module, args, output):
            active[name] -= 1
        return hook

    handles = []
    for module in model.modules():
        if isinstance(module, CausalSelfAttention):
            for sub, name in ((module, "attention"), (module.core, "core")):
                handles += [sub.register_forward_pre_hook(enter(name)), sub.register_forward_hook(leave(name))]
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        _, loss = model(x, y, pos=pos)
    for h in handles:
        h.remove()
    loss.backward()
    return {name: sum(storages.values()) for name, storages in saved.items()}


def main():
    """Print the attention activation memory per rank at cp = 1 (single, F.sdpa) and, with the ring and with Ulysses
    (where cp divides the heads), at every cp that divides the world size, for one micro-batch of a small GPT with a
    long block. Run under torchrun, e.g.
        torchrun --standalone --nproc_per_node=4 -m parallel.cp --block_size 1024
    (cp=2 runs as two groups of 2 ranks, cp=4 as the world; each rank measures its own share)."""
    from kernels.comm import TorchCollectives, init_distributed, teardown
    from model import GPT, GPTConfig
    parser = argparse.ArgumentParser(description=main.__doc__.split("\n")[0])
    parser.add_argument("--block_size", type=int, default=1024)
    parser.add_argument("--batch_size", type=int, default=2)
    parser.add_argument("--n_layer", type=int, default=2)
    parser.add_argument("--n_head", type=int, default=4)
    parser.add_argument("--n_embd", type=int, default=64)
    parser.add_argument("--block", default="llama")
    args = parser.parse_args()
    init_distributed()
    world, rank = dist.get_world_size(), dist.get_rank()
    config = GPTConfig(block_size=args.block_size, vocab_size=64, n_layer=args.n_layer, n_head=args.n_head,
                       n_embd=args.n_embd, block=args.block)
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, config.vocab_size, (args.batch_size, args.block_size), generator=g)
    y = torch.randint(0, config.vocab_size, (args.batch_size, args.block_size), generator=g)
    rows = []
    for cp in [n for n in (1, 2, 4, 8) if world % n == 0]:
        groups = [dist.new_group(list(range(s, s + cp))) for s in range(0, world, cp)] if cp > 1 else None
        for cp_type in ("ring", "ulysses") if cp > 1 else ("single",):
            if cp_type == "ulysses" and config.n_head % cp:
                continue
            check_cp_config(config, cp, "ring" if cp_type == "single" else cp_type)
            model = GPT(config)
            if cp > 1:
                comm = TorchCollectives(groups[rank // cp])
                apply_cp_attention(model, comm, cp_type)
                xl, yl, pos = split_sequence(cp, comm.rank, x, y)
            else:
                xl, yl, pos = x, y, None
            saved = measure_saved_bytes(model, xl, yl, pos)
            worst = torch.tensor([saved["core"], saved["attention"], saved["model"]], dtype=torch.float64)
            dist.all_reduce(worst, op=dist.ReduceOp.MAX)
            rows.append((cp, cp_type, *worst.tolist()))
    if rank == 0:
        print(f"saved for backward per rank (max over ranks), one micro-batch: B={args.batch_size}, "
              f"T={args.block_size}, {args.n_layer} {args.block} layers, n_embd={args.n_embd}, n_head={args.n_head}")
        print(f"{'cp':>3} {'type':>8} {'attention core':>16} {'x single':>9} {'attention module':>17} {'x single':>9} "
              f"{'whole model':>13} {'x single':>9}")
        base = rows[0]
        for cp, cp_type, core, attn, whole in rows:
            print(f"{cp:>3} {cp_type:>8} {core / 2**20:>13.3f} MiB {core / base[2]:>9.4f} {attn / 2**20:>14.3f} MiB "
                  f"{attn / base[3]:>9.4f} {whole / 2**20:>10.3f} MiB {whole / base[4]:>9.4f}")
    teardown()


if __name__ == "__main__":
    main()
