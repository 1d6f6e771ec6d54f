"""Cross-attention of many queries to one short set of condition keys, as Triton kernels: forward and backward.

Where it runs: every block of the sparse DiTs attends from each of its tokens (27k at 512, 110k-137k at 1024) to the
1,374 image tokens of the condition, with 32 heads of 32 channels (:class:`model.nets.dit_block.CrossAttention`),
15 to 30 times per image. A short key set is the case general flash kernels are least built for: each query tile
re-reads all keys and values of its head, and with 11 key tiles per query tile the prologue and epilogue weigh more
than at long sequences. What it gives, measured on an H100 (bf16, 3cf6773): alone, against SDPA's default backend
(``python -m model.reports.cross_attention``; that run timed 16 heads of 64, not the DiTs' 32 of 32), 0.418 against
0.472 ms at 27,314 rows and the same time (1.56 ms, 400 TFLOP/s) at 110,656 rows; inside the cascade
(``python -m model.reports.generate`` with ``--cross-attention kernel`` / ``sdpa``, one machine,
reports/generate_history.md) the sampling steps went 0.144 -> 0.140 s at 512 and 0.728 -> 0.714 s at 1024. At the
DiTs' own 32 heads of 32 (reports/cross_attention.md, 373aa8c) the exponentials weigh twice as much per product and
the kernel leads SDPA by more: 2.40 against 3.07 ms at 110,656 rows, 3.00 against 3.79 ms at 137,124.

This kernel is the plain online-softmax loop (the fused-attention pattern of Triton's tutorial) with the choices
this shape allows: program ``(tile, head)`` owns ``BLOCK_M`` query rows of one head (128 by default) and walks the
keys in tiles of ``BLOCK_N``; the full tiles run without masks and only the last, partial tile is masked; the
scale and ``log2(e)`` are one multiply before ``exp2``; ``q``, ``k``, ``v`` are read in place through their
strides (the projections' ``[N, H, D]`` and ``[L, H, D]`` views, no copies) and ``o`` is written ``[N, H, D]``
contiguous, ready for the output projection. Float32 accumulation; the probabilities are rounded to the values'
dtype for the second product, as every flash kernel does (float32 inputs run both products in IEEE float32).

The backward pass (:class:`_CrossAttention`, under autograd while :data:`TRAINABLE`) follows the same shape: the
forward also writes each row's base-2 LSE (``4 * H`` bytes a row); :func:`_cross_attention_dq_kernel` walks all
keys per query tile, forms ``delta = rowsum(dO * O)`` on the way in and writes ``dq``;
:func:`_cross_attention_dkdv_kernel` owns ``BLOCK_N`` keys of one head and one chunk of ``chunk_rows`` query rows
(1,374 keys are only 22 tiles a head, too few programs to fill the GPU without splitting the rows), and the chunks'
float32 partial sums are added afterwards in a fixed order, so the gradients are deterministic (no atomics). Why
not SDPA's backward: at head dim 32 the DiT training step spent 244 ms in cuDNN's cross-attention backward (24
calls, reports/dit.md at 373aa8c), well above what the exponentials bound it to.

Batch elements: with ``k, v [B, L, H, D]`` and the queries' CSR row offsets, each program's element and rows come
from a small table built on the host (:func:`_row_table`, cached), so elements of different sizes need no padding
(SDPA pads every element to the longest). The exponentials can be moved in part to the FMA units
(:func:`~ssa_kernels._common.exp2_fma`, launch setting ``fma_exp_every``, off by default until timed).

Scope: no key mask (condition tokens of one length). :func:`supports` says whether a call fits;
:meth:`model.nets.dit_block.CrossAttention.attend` routes to it only then, when :data:`ENABLED`. The launch
(:data:`LAUNCH`) comes from ``python -m model.reports.cross_attention`` on an H100 (reports/cross_attention.md), which
times it beside SDPA's backends on the cascade's shapes. Under the Triton interpreter (``TRITON_INTERPRET=1``) it
also takes CPU tensors, for the tests (tests/test_cross_attention_kernel.py).
"""
from __future__ import annotations

import math
import os
from collections import OrderedDict

import torch
import triton
import triton.language as tl

# the FMA-unit exponential (exp2_fma) and its launch setting, shared with the SSA kernels
from ssa_kernels._common import _exp2, fma_every
from ssa_kernels import output_stash
from ssa_kernels.launch import OverrideStack

__all__ = ["BACKWARD_LAUNCH", "BACKWARD_LAUNCHES", "ENABLED", "KERNEL_DTYPES", "LAUNCH", "LAUNCHES", "TRAINABLE",
           "PARTS", "backward_launch_for", "check_launch_settings", "cross_attention", "launch_for", "overriding",
           "supports"]

#: Switch of the routing in :meth:`model.nets.dit_block.CrossAttention.attend` (False: SDPA everywhere).
ENABLED = True
#: Query / key dtypes the kernel takes (accumulation is always float32).
KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
#: Head dims the kernel takes (one ``tl.dot`` dimension each: a power of two, at least 16).
HEAD_DIMS = (16, 32, 64, 128)
#: Default launch: query rows per program, keys per step, warps, pipeline stages. Swept on an H100 in bf16
#: (``python -m model.reports.cross_attention --sweep``, reports/cross_attention.md, 3cf6773; 36 launches): fastest
#: or within 1% of the fastest at 110,656 and 137,124 rows (1.565 / 1.961 ms), 1% behind the best at 27,314 rows.
LAUNCH = dict(block_m=128, block_n=64, num_warps=8, num_stages=3, fma_exp_every=0)
#: Launches per head dim where they differ from :data:`LAUNCH` (:func:`launch_for`; the settings an entry leaves out
#: are :data:`LAUNCH`'s). Head dim 32 (the released sparse
#: DiTs, 32 heads): swept on an H100 (reports/cross_attention.md, 373aa8c; 36 launches), the launch with the least
#: mean time over the three shapes relative to each shape's fastest: 0.661 / 2.400 / 2.999 ms at 27,314 / 110,656 /
#: 137,124 rows against 0.689 / 2.683 / 3.153 with :data:`LAUNCH` (SDPA's default backend: 0.825 / 3.067 / 3.793).
LAUNCHES: dict[int, dict] = {32: dict(block_m=64, block_n=64, num_warps=4, num_stages=4)}
#: Switch of the backward pass: on, :func:`cross_attention` records a gradient (Triton backward kernels) and the
#: DiT's training path routes to it; off, it refuses inputs that need one and the DiT keeps SDPA under autograd.
TRAINABLE = True
#: Default backward launch: ``dq`` (query rows per program, keys per step, warps, stages) and ``dkdv`` (``block_n``
#: keys per program, ``block_m`` query rows per step, warps, stages, ``chunk_rows`` query rows per program: the
#: programs' float32 partial sums of dK / dV are added after the kernel).
BACKWARD_LAUNCH = dict(dq=dict(block_m=64, block_n=64, num_warps=4, num_stages=2, fma_exp_every=0),
                       dkdv=dict(block_m=64, block_n=64, num_warps=4, num_stages=2, chunk_rows=16384,
                                 fma_exp_every=0))
#: Backward launches per head dim where they differ from :data:`BACKWARD_LAUNCH` (:func:`backward_launch_for`). Head
#: dim 32: the fastest of each kernel's sweep at 137,124 rows on an H100, the other kernel at its default
#: (``python -m model.reports.cross_attention --training --sweep-backward``, reports/cross_attention_training.md,
#: 0072104; 55 launches): forward + backward 10.73 ms with these dK/dV tiles (13.03 with the defaults), 12.78 with
#: this dQ launch; SDPA's default backend (cuDNN) 14.64 ms.
BACKWARD_LAUNCHES: dict[int, dict] = {32: dict(dq=dict(block_m=128, block_n=32, num_warps=4, num_stages=3),
                                               dkdv=dict(block_m=64, block_n=128, num_warps=4, num_stages=2,
                                                         chunk_rows=16384))}
#: Offsets are int32 while every offset the kernel forms stays below this, int64 beyond it.
INDEX_32_LIMIT = 2**31
#: ``log2(e)``: the scores are scaled by ``scale * log2(e)`` once and exponentiated with ``exp2``.
LOG2E = 1.4426950408889634
@triton.jit
def _attend_tile(acc, m_i, l_i, q, K, V, k0, n_keys, stride_kn, stride_vn, qk_scale,
                 D: tl.constexpr, BLOCK_N: tl.constexpr, MASKED: tl.constexpr, IEEE: tl.constexpr,
                 INDEX_64: tl.constexpr, FMA_EXP: tl.constexpr = False):
    """The online-softmax update of ``acc [BLOCK_M, D]`` (unnormalised output), ``m_i`` (running maximum of the
    scaled scores, base 2) and ``l_i`` (running sum) by the keys ``k0 .. k0 + BLOCK_N`` of ``K`` / ``V`` (pointers to
    the head's first key; ``MASKED``: keys past ``n_keys`` are not loaded and weigh nothing)."""
    keys = k0 + tl.arange(0, BLOCK_N)
    if INDEX_64:
        keys = keys.to(tl.int64)
    d = tl.arange(0, D)
    if MASKED:
        k_ok = keys < n_keys
        k = tl.load(K + keys[None, :] * stride_kn + d[:, None], mask=k_ok[None, :], other=0.0)  # [D, BLOCK_N]
        v = tl.load(V + keys[:, None] * stride_vn + d[None, :], mask=k_ok[:, None], other=0.0)  # [BLOCK_N, D]
    else:
        k = tl.load(K + keys[None, :] * stride_kn + d[:, None])
        v = tl.load(V + keys[:, None] * stride_vn + d[None, :])
    # raw scores [BLOCK_M, BLOCK_N], maximised unscaled (qk_scale > 0) and scaled inside the exponent: one fused
    # multiply-add per score instead of a multiply and a subtraction (ssa_kernels._common._online_softmax_step)
    if IEEE:
        s = tl.dot(q, k, input_precision="ieee")
    else:
        s = tl.dot(q, k)
    if MASKED:
        s = tl.where(k_ok[None, :], s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1) * qk_scale)
    p = _exp2(s * qk_scale - m_new[:, None], FMA_EXP)
    alpha = tl.exp2(m_i - m_new)
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None]
    if IEEE:
        acc = tl.dot(p, v, acc, input_precision="ieee")
    else:
        acc = tl.dot(p.to(v.dtype), v, acc)
    return acc, m_new, l_i


@triton.jit
def _head_offset(h, n_rows, INDEX_64: tl.constexpr):
    """``h * n_rows``: the first element of head ``h`` in an ``[H, n_rows]`` table (int64 when ``INDEX_64``)."""
    if INDEX_64:
        return h.to(tl.int64) * n_rows
    return h * n_rows


@triton.jit
def _program_rows(TILES, t, n_rows, rows_per_program, BLOCK: tl.constexpr, VARLEN: tl.constexpr,
                  INDEX_64: tl.constexpr):
    """Program ``t``'s batch element ``b``, its first ``BLOCK`` rows and the end of its rows: from the table
    ``TILES [T, 3]`` (``b``, first row, end) when ``VARLEN``, else element 0 and rows ``t * rows_per_program`` on,
    ending at ``n_rows`` or after ``rows_per_program`` rows."""
    if VARLEN:
        b = tl.load(TILES + 3 * t)
        start = tl.load(TILES + 3 * t + 1)
        stop = tl.load(TILES + 3 * t + 2)
    else:
        b = t * 0
        start = t * rows_per_program
        stop = tl.minimum(start + rows_per_program, n_rows)
    if INDEX_64:
        b = b.to(tl.int64)
        start = start.to(tl.int64)
    return b, start, stop


@triton.jit
def _cross_attention_kernel(
    Q, K, V, O, LSE, TILES, n_rows, n_keys, qk_scale,
    stride_qn, stride_qh, stride_kb, stride_kn, stride_kh, stride_vb, stride_vn, stride_vh,
    D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, INDEX_64: tl.constexpr, IEEE: tl.constexpr,
    WRITE_LSE: tl.constexpr, FMA_EVERY: tl.constexpr, VARLEN: tl.constexpr,
):
    """Program ``(tile, h)``: ``O[tile * BLOCK_M .. + BLOCK_M, h]`` for ``Q [n_rows, H, D]``, ``K, V [n_keys, H, D]``
    (innermost stride 1, other strides given), ``O [n_rows, H, D]`` contiguous; ``n_keys >= 1``. ``WRITE_LSE``: also
    ``LSE [H, n_rows]`` float32, each row's ``log2`` of its softmax denominator over the base-2 logits (the backward
    pass's probabilities are ``exp2(s * qk_scale - LSE)``). ``FMA_EVERY`` (0: never): the last of every
    ``FMA_EVERY`` full key tiles takes its exponentials from :func:`~ssa_kernels._common.exp2_fma`. ``VARLEN``:
    several batch elements, ``K, V [B, n_keys, H, D]``, the program's element and rows from ``TILES``
    (:func:`_program_rows`)."""
    h = tl.program_id(1)
    b, start, row_stop = _program_rows(TILES, tl.program_id(0), n_rows, BLOCK_M, BLOCK_M, VARLEN, INDEX_64)
    rows = start + tl.arange(0, BLOCK_M)
    d = tl.arange(0, D)
    row_ok = rows < row_stop
    q = tl.load(Q + rows[:, None] * stride_qn + h * stride_qh + d[None, :], mask=row_ok[:, None], other=0.0)
    k_head = K + b * stride_kb + h * stride_kh
    v_head = V + b * stride_vb + h * stride_vh
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, D], tl.float32)
    full_end = (n_keys // BLOCK_N) * BLOCK_N
    fma_end = 0
    if FMA_EVERY > 0:
        fma_end = (n_keys // (FMA_EVERY * BLOCK_N)) * (FMA_EVERY * BLOCK_N)
        for k0 in range(0, fma_end, FMA_EVERY * BLOCK_N):
            for j in tl.static_range(FMA_EVERY):
                acc, m_i, l_i = _attend_tile(acc, m_i, l_i, q, k_head, v_head, k0 + j * BLOCK_N, n_keys, stride_kn,
                                             stride_vn, qk_scale, D, BLOCK_N, False, IEEE, INDEX_64,
                                             j == FMA_EVERY - 1)
    for k0 in range(fma_end, full_end, BLOCK_N):
        acc, m_i, l_i = _attend_tile(acc, m_i, l_i, q, k_head, v_head, k0, n_keys, stride_kn, stride_vn, qk_scale,
                                     D, BLOCK_N, False, IEEE, INDEX_64)
    if full_end < n_keys:
        acc, m_i, l_i = _attend_tile(acc, m_i, l_i, q, k_head, v_head, full_end, n_keys, stride_kn, stride_vn,
                                     qk_scale, D, BLOCK_N, True, IEEE, INDEX_64)
    acc = acc / l_i[:, None]
    if WRITE_LSE:
        tl.store(LSE + _head_offset(h, n_rows, INDEX_64) + rows, m_i + tl.log2(l_i), mask=row_ok)
    heads = tl.num_programs(1)
    o_ptr = O + rows[:, None] * (heads * D) + h * D + d[None, :]
    tl.store(o_ptr, acc.to(O.dtype.element_ty), mask=row_ok[:, None])


@triton.jit
def _dq_tile(dq, q, do, lse, delta, K, V, k0, n_keys, stride_kn, stride_vn, qk_scale,
             D: tl.constexpr, BLOCK_N: tl.constexpr, MASKED: tl.constexpr, IEEE: tl.constexpr,
             INDEX_64: tl.constexpr, FMA_EXP: tl.constexpr = False):
    """``dq [BLOCK_M, D]`` plus the keys ``k0 .. k0 + BLOCK_N``' share of ``dS K`` (natural-log logits' gradient
    ``dS = P * (dO V^T - delta)``; the caller scales by the logits' scale once at the end)."""
    keys = k0 + tl.arange(0, BLOCK_N)
    if INDEX_64:
        keys = keys.to(tl.int64)
    d = tl.arange(0, D)
    if MASKED:
        k_ok = keys < n_keys
        kt = tl.load(K + keys[None, :] * stride_kn + d[:, None], mask=k_ok[None, :], other=0.0)  # [D, BLOCK_N]
        vt = tl.load(V + keys[None, :] * stride_vn + d[:, None], mask=k_ok[None, :], other=0.0)  # [D, BLOCK_N]
    else:
        kt = tl.load(K + keys[None, :] * stride_kn + d[:, None])
        vt = tl.load(V + keys[None, :] * stride_vn + d[:, None])
    if IEEE:
        s = tl.dot(q, kt, input_precision="ieee") * qk_scale
        dp = tl.dot(do, vt, input_precision="ieee")
    else:
        s = tl.dot(q, kt) * qk_scale
        dp = tl.dot(do, vt)
    if MASKED:
        s = tl.where(k_ok[None, :], s, float("-inf"))
    p = _exp2(s - lse[:, None], FMA_EXP)
    ds = p * (dp - delta[:, None])
    if IEEE:
        dq = tl.dot(ds, tl.trans(kt), dq, input_precision="ieee")
    else:
        dq = tl.dot(ds.to(kt.dtype), tl.trans(kt), dq)
    return dq


@triton.jit
def _cross_attention_dq_kernel(
    Q, K, V, O, DO, DQ, LSE, DELTA, TILES, n_rows, n_keys, qk_scale, sm_scale,
    stride_qn, stride_qh, stride_kb, stride_kn, stride_kh, stride_vb, stride_vn, stride_vh, stride_on, stride_oh,
    stride_don, stride_doh,
    D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, INDEX_64: tl.constexpr, IEEE: tl.constexpr,
    FMA_EVERY: tl.constexpr, VARLEN: tl.constexpr,
):
    """Program ``(tile, h)``: ``DQ [n_rows, H, D]`` (contiguous) of its ``BLOCK_M`` rows, and their
    ``DELTA [H, n_rows] = rowsum(dO * O)`` (float32) for :func:`_cross_attention_dkdv_kernel`; ``LSE [H, n_rows]``
    from the forward kernel. ``FMA_EVERY``, ``VARLEN`` as in :func:`_cross_attention_kernel`."""
    h = tl.program_id(1)
    b, start, row_stop = _program_rows(TILES, tl.program_id(0), n_rows, BLOCK_M, BLOCK_M, VARLEN, INDEX_64)
    rows = start + tl.arange(0, BLOCK_M)
    d = tl.arange(0, D)
    row_ok = rows < row_stop
    q = tl.load(Q + rows[:, None] * stride_qn + h * stride_qh + d[None, :], mask=row_ok[:, None], other=0.0)
    do = tl.load(DO + rows[:, None] * stride_don + h * stride_doh + d[None, :], mask=row_ok[:, None], other=0.0)
    o = tl.load(O + rows[:, None] * stride_on + h * stride_oh + d[None, :], mask=row_ok[:, None], other=0.0)
    delta = tl.sum(do.to(tl.float32) * o.to(tl.float32), 1)
    table = _head_offset(h, n_rows, INDEX_64) + rows
    tl.store(DELTA + table, delta, mask=row_ok)
    lse = tl.load(LSE + table, mask=row_ok, other=0.0)
    k_head = K + b * stride_kb + h * stride_kh
    v_head = V + b * stride_vb + h * stride_vh
    dq = tl.zeros([BLOCK_M, D], tl.float32)
    full_end = (n_keys // BLOCK_N) * BLOCK_N
    fma_end = 0
    if FMA_EVERY > 0:
        fma_end = (n_keys // (FMA_EVERY * BLOCK_N)) * (FMA_EVERY * BLOCK_N)
        for k0 in range(0, fma_end, FMA_EVERY * BLOCK_N):
            for j in tl.static_range(FMA_EVERY):
                dq = _dq_tile(dq, q, do, lse, delta, k_head, v_head, k0 + j * BLOCK_N, n_keys, stride_kn, stride_vn,
                              qk_scale, D, BLOCK_N, False, IEEE, INDEX_64, j == FMA_EVERY - 1)
    for k0 in range(fma_end, full_end, BLOCK_N):
        dq = _dq_tile(dq, q, do, lse, delta, k_head, v_head, k0, n_keys, stride_kn, stride_vn, qk_scale,
                      D, BLOCK_N, False, IEEE, INDEX_64)
    if full_end < n_keys:
        dq = _dq_tile(dq, q, do, lse, delta, k_head, v_head, full_end, n_keys, stride_kn, stride_vn, qk_scale,
                      D, BLOCK_N, True, IEEE, INDEX_64)
    heads = tl.num_programs(1)
    tl.store(DQ + rows[:, None] * (heads * D) + h * D + d[None, :], (dq * sm_scale).to(DQ.dtype.element_ty),
             mask=row_ok[:, None])


@triton.jit
def _dkdv_tile(dk, dv, k, v, Q, DO, LSE, DELTA, m0, row_stop, stride_qn, stride_don, qk_scale,
               D: tl.constexpr, BLOCK_M: tl.constexpr, MASKED: tl.constexpr, IEEE: tl.constexpr,
               INDEX_64: tl.constexpr, FMA_EXP: tl.constexpr = False):
    """``dk, dv [BLOCK_N, D]`` plus the query rows ``m0 .. m0 + BLOCK_M``' share (``Q`` / ``DO`` point at the head's
    first row, ``LSE`` / ``DELTA`` at the head's row of their tables; ``MASKED``: rows from ``row_stop`` on are
    not loaded and weigh nothing: zero queries, output gradients, LSE and delta give zero shares)."""
    rows = m0 + tl.arange(0, BLOCK_M)
    if INDEX_64:
        rows = rows.to(tl.int64)
    d = tl.arange(0, D)
    if MASKED:
        ok = rows < row_stop
        qt = tl.load(Q + rows[None, :] * stride_qn + d[:, None], mask=ok[None, :], other=0.0)  # [D, BLOCK_M]
        do = tl.load(DO + rows[:, None] * stride_don + d[None, :], mask=ok[:, None], other=0.0)  # [BLOCK_M, D]
        lse = tl.load(LSE + rows, mask=ok, other=0.0)
        delta = tl.load(DELTA + rows, mask=ok, other=0.0)
    else:
        qt = tl.load(Q + rows[None, :] * stride_qn + d[:, None])
        do = tl.load(DO + rows[:, None] * stride_don + d[None, :])
        lse = tl.load(LSE + rows)
        delta = tl.load(DELTA + rows)
    if IEEE:
        pt = tl.exp2(tl.dot(k, qt, input_precision="ieee") * qk_scale - lse[None, :])  # [BLOCK_N, BLOCK_M]
        dv = tl.dot(pt, do, dv, input_precision="ieee")
        dst = pt * (tl.dot(v, tl.trans(do), input_precision="ieee") - delta[None, :])
        dk = tl.dot(dst, tl.trans(qt), dk, input_precision="ieee")
    else:
        pt = _exp2(tl.dot(k, qt) * qk_scale - lse[None, :], FMA_EXP)
        dv = tl.dot(pt.to(do.dtype), do, dv)
        dst = pt * (tl.dot(v, tl.trans(do)) - delta[None, :])
        dk = tl.dot(dst.to(qt.dtype), tl.trans(qt), dk)
    return dk, dv


@triton.jit
def _cross_attention_dkdv_kernel(
    Q, K, V, DO, DK, DV, LSE, DELTA, CHUNKS, n_rows, n_keys, chunk_rows, qk_scale,
    stride_qn, stride_qh, stride_kb, stride_kn, stride_kh, stride_vb, stride_vn, stride_vh, stride_don, stride_doh,
    D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, INDEX_64: tl.constexpr, IEEE: tl.constexpr,
    FMA_EVERY: tl.constexpr, VARLEN: tl.constexpr,
):
    """Program ``(key tile, h, chunk)``: the shares of query rows ``chunk * chunk_rows .. + chunk_rows`` in the
    gradients of keys ``tile * BLOCK_N .. + BLOCK_N`` of head ``h``, written to ``DK, DV [chunks, n_keys, H, D]``
    (float32 partial sums; DK without the logits' scale). ``FMA_EVERY``: the last of every ``FMA_EVERY`` full query
    tiles takes its exponentials from :func:`~ssa_kernels._common.exp2_fma` (0: never). ``VARLEN``:
    ``K, V [B, n_keys, H, D]`` and each
    chunk's batch element and rows from ``CHUNKS [chunks, 3]`` (:func:`_program_rows`)."""
    h = tl.program_id(1)
    chunk = tl.program_id(2)
    b, start, stop = _program_rows(CHUNKS, chunk, n_rows, chunk_rows, BLOCK_M, VARLEN, INDEX_64)
    keys = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    if INDEX_64:
        keys = keys.to(tl.int64)
    d = tl.arange(0, D)
    k_ok = keys < n_keys
    k = tl.load(K + b * stride_kb + keys[:, None] * stride_kn + h * stride_kh + d[None, :], mask=k_ok[:, None],
                other=0.0)
    v = tl.load(V + b * stride_vb + keys[:, None] * stride_vn + h * stride_vh + d[None, :], mask=k_ok[:, None],
                other=0.0)
    dk = tl.zeros([BLOCK_N, D], tl.float32)
    dv = tl.zeros([BLOCK_N, D], tl.float32)
    full_stop = start + ((stop - start) // BLOCK_M) * BLOCK_M
    q_head = Q + h * stride_qh
    do_head = DO + h * stride_doh
    lse_head = LSE + _head_offset(h, n_rows, INDEX_64)
    delta_head = DELTA + _head_offset(h, n_rows, INDEX_64)
    fma_stop = start
    if FMA_EVERY > 0:
        fma_stop = start + ((stop - start) // (FMA_EVERY * BLOCK_M)) * (FMA_EVERY * BLOCK_M)
        for m0 in range(start, fma_stop, FMA_EVERY * BLOCK_M):
            for j in tl.static_range(FMA_EVERY):
                dk, dv = _dkdv_tile(dk, dv, k, v, q_head, do_head, lse_head, delta_head, m0 + j * BLOCK_M, stop,
                                    stride_qn, stride_don, qk_scale, D, BLOCK_M, False, IEEE, INDEX_64,
                                    j == FMA_EVERY - 1)
    for m0 in range(fma_stop, full_stop, BLOCK_M):
        dk, dv = _dkdv_tile(dk, dv, k, v, q_head, do_head, lse_head, delta_head, m0, stop, stride_qn, stride_don,
                            qk_scale, D, BLOCK_M, False, IEEE, INDEX_64)
    if full_stop < stop:
        dk, dv = _dkdv_tile(dk, dv, k, v, q_head, do_head, lse_head, delta_head, full_stop, stop, stride_qn,
                            stride_don, qk_scale, D, BLOCK_M, True, IEEE, INDEX_64)
    heads = tl.num_programs(1)
    if INDEX_64:
        chunk = chunk.to(tl.int64)
    out = ((chunk * n_keys + keys[:, None]) * heads + h) * D + d[None, :]
    tl.store(DK + out, dk, mask=k_ok[:, None])
    tl.store(DV + out, dv, mask=k_ok[:, None])


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


#: The kernels whose launches :func:`overriding` sets: the forward and the two backward kernels.
PARTS = ("forward", "dq", "dkdv")


def check_launch_settings(part: str, values) -> None:
    """ValueError unless ``part`` is one of :data:`PARTS` and every key of ``values`` one of its launch settings."""
    if part not in PARTS:
        raise ValueError(f"part must be one of {PARTS}, got {part!r}")
    known = LAUNCH if part == "forward" else BACKWARD_LAUNCH[part]
    unknown = sorted(set(values) - set(known))
    if unknown:
        raise ValueError(f"unknown {part} launch settings {unknown}; known: {sorted(known)}")


_OVERRIDES = OverrideStack(check_launch_settings)


def overriding(part: str, values: dict):
    """Inside the block (``with overriding("forward", dict(fma_exp_every=2)):``), :func:`launch_for` (``part``
    ``"forward"``) or :func:`backward_launch_for` (``"dq"``, ``"dkdv"``) give these settings over the defaults, in
    every thread of the process, never by editing :data:`LAUNCHES` (:class:`ssa_kernels.launch.OverrideStack`).
    For timing launch settings inside a model (``python -m model.reports.dit --launch-variant``)."""
    return _OVERRIDES.overriding(part, values)


def launch_for(head_dim: int) -> dict:
    """The default launch at ``head_dim`` (a fresh dict): :data:`LAUNCH` updated by :data:`LAUNCHES`' entry (and
    by :func:`overriding`)."""
    return _OVERRIDES.apply("forward", dict(LAUNCH, **LAUNCHES.get(head_dim, {})))


def backward_launch_for(head_dim: int) -> dict:
    """The default backward launch at ``head_dim`` (fresh dicts ``{"dq": ..., "dkdv": ...}``): each kernel's
    :data:`BACKWARD_LAUNCH` settings updated by :data:`BACKWARD_LAUNCHES`' entry (and by :func:`overriding`)."""
    entry = BACKWARD_LAUNCHES.get(head_dim, {})
    return {name: _OVERRIDES.apply(name, dict(default, **entry.get(name, {})))
            for name, default in BACKWARD_LAUNCH.items()}


def _records_gradient(*ts: torch.Tensor) -> bool:
    return torch.is_grad_enabled() and any(t.requires_grad for t in ts)


def supports(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> bool:
    """Whether :func:`cross_attention` takes ``q [N, H, D]`` with ``k, v [L, H, D]`` (one batch element) or
    ``[B, L, H, D]`` (with CSR row offsets): one dtype of :data:`KERNEL_DTYPES`, ``D`` in :data:`HEAD_DIMS`,
    ``L >= 1``, innermost stride 1, one CUDA device (any device under the Triton interpreter), and, when a gradient is
    to be recorded, :data:`TRAINABLE` on."""
    if not all(isinstance(t, torch.Tensor) for t in (q, k, v)) or q.dim() != 3 or k.dim() not in (3, 4):
        return False
    n, h, d = q.shape
    if k.shape != v.shape or k.shape[-2:] != (h, d) or k.shape[-3] < 1 or d not in HEAD_DIMS:
        return False
    if q.dtype not in KERNEL_DTYPES or k.dtype != q.dtype or v.dtype != q.dtype:
        return False
    if any(t.stride(-1) != 1 for t in (q, k, v)) or not all(t.device == q.device for t in (k, v)):
        return False
    if not (q.is_cuda or _interpreting()):
        return False
    return TRAINABLE or not _records_gradient(q, k, v)


def _checked_launch(defaults: dict, overrides: dict, where: str) -> dict:
    """``defaults`` updated by the non-None ``overrides``: positive ints (``fma_exp_every`` may be 0), the tiles
    powers of two >= 16."""
    launch = dict(defaults)
    for key, value in overrides.items():
        if value is None:
            continue
        if key not in launch:
            raise ValueError(f"unknown launch setting {where}{key} (known: {sorted(launch)})")
        least = 0 if key == "fma_exp_every" else 1
        if isinstance(value, bool) or not isinstance(value, int) or value < least:
            raise ValueError(f"{where}{key} must be an int >= {least}, got {value!r}")
        launch[key] = value
    for key in ("block_m", "block_n"):
        if launch[key] < 16 or launch[key] & (launch[key] - 1):
            raise ValueError(f"{where}{key} must be a power of two >= 16, got {launch[key]}")
    return launch


def _index_64(n: int, h: int, d: int, *ts: torch.Tensor) -> bool:
    """Whether some offset the kernels form may reach :data:`INDEX_32_LIMIT` (``[N, H, D]`` outputs, the inputs'
    extents)."""
    return max([n * h * d] + [sum(st * (sz - 1) for st, sz in zip(t.stride(), t.shape)) + 1 for t in ts]) \
        >= INDEX_32_LIMIT


#: Row tables of :func:`_row_table` kept for reuse (the same offsets come back once per block and pass).
_TABLES: OrderedDict = OrderedDict()
#: How many row tables :data:`_TABLES` keeps.
TABLES_KEPT = 16


def _row_table(bounds: tuple, rows: int, device: torch.device) -> tuple[torch.Tensor, list[int]]:
    """``[T, 3]`` int32 (batch element, first row, end) of every run of at most ``rows`` consecutive rows of one
    element, for CSR ``bounds`` (``B + 1`` ints; empty elements have none), on ``device``; and each element's first
    run (``B + 1`` ints, the last ``T``). Cached (:data:`_TABLES`)."""
    key = (bounds, rows, str(device))
    hit = _TABLES.get(key)
    if hit is not None:
        _TABLES.move_to_end(key)
        return hit
    runs, firsts = [], [0]
    for b, (start, stop) in enumerate(zip(bounds[:-1], bounds[1:])):
        runs.extend((b, r, min(r + rows, stop)) for r in range(start, stop, rows))
        firsts.append(len(runs))
    table = torch.tensor(runs or [(0, 0, 0)], dtype=torch.int32).to(device)
    _TABLES[key] = (table, firsts)
    while len(_TABLES) > TABLES_KEPT:
        _TABLES.popitem(last=False)
    return table, firsts


def _batched(t: torch.Tensor) -> torch.Tensor:
    """Keys or values as ``[B, L, H, D]`` (a 3-D ``[L, H, D]`` as one element)."""
    return t if t.dim() == 4 else t.unsqueeze(0)


def _forward(q, k, v, scale: float, launch: dict, with_lse: bool, bounds: tuple | None):
    """The forward kernel: ``o [N, H, D]`` contiguous and, ``with_lse``, ``lse [H, N]`` float32 (else None).
    ``k, v [B, L, H, D]``; ``bounds``: CSR row offsets when ``B > 1`` (else None)."""
    n, h, d = q.shape
    out = torch.empty(n, h, d, device=q.device, dtype=q.dtype)
    lse = torch.empty(h, n, device=q.device, dtype=torch.float32) if with_lse else None
    if n == 0:
        return out, lse
    if bounds is None:
        tiles, programs = out, triton.cdiv(n, launch["block_m"])
    else:
        tiles, firsts = _row_table(bounds, launch["block_m"], q.device)
        programs = firsts[-1]
    _cross_attention_kernel[(programs, h)](
        q, k, v, out, out if lse is None else lse, tiles, n, k.shape[1], scale * LOG2E,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), k.stride(2), v.stride(0), v.stride(1), v.stride(2),
        D=d, BLOCK_M=launch["block_m"], BLOCK_N=launch["block_n"], INDEX_64=_index_64(n, h, d, q, k, v),
        IEEE=q.dtype == torch.float32, WRITE_LSE=with_lse, FMA_EVERY=fma_every(launch, q.dtype),
        VARLEN=bounds is not None, num_warps=launch["num_warps"], num_stages=launch["num_stages"],
    )
    return out, lse


def _backward(q, k, v, o, do, lse, scale: float, launch: dict, bounds: tuple | None):
    """``dq [N, H, D]`` (q's dtype, contiguous) and ``dk, dv [B, L, H, D]`` for the output gradient
    ``do [N, H, D]``: :func:`_cross_attention_dq_kernel` (which also forms ``delta = rowsum(dO * O)``), then
    :func:`_cross_attention_dkdv_kernel` over query chunks of at most ``chunk_rows`` rows of one batch element,
    whose float32 partial sums are added here per element (a fixed order: deterministic)."""
    n, h, d = q.shape
    batch, length = k.shape[:2]
    if do.stride(-1) != 1:
        do = do.contiguous()
    dq = torch.empty(n, h, d, device=q.device, dtype=q.dtype)
    if n == 0:
        return dq, torch.zeros_like(k), torch.zeros_like(v)
    index_64 = _index_64(n, h, d, q, k, v, o, do)
    ieee = q.dtype == torch.float32
    delta = torch.empty(h, n, device=q.device, dtype=torch.float32)
    lq, lk = launch["dq"], launch["dkdv"]
    if bounds is None:
        tiles, programs = dq, triton.cdiv(n, lq["block_m"])
    else:
        tiles, firsts = _row_table(bounds, lq["block_m"], q.device)
        programs = firsts[-1]
    _cross_attention_dq_kernel[(programs, h)](
        q, k, v, o, do, dq, lse, delta, tiles, n, length, scale * LOG2E, scale,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), k.stride(2), v.stride(0), v.stride(1), v.stride(2),
        o.stride(0), o.stride(1), do.stride(0), do.stride(1),
        D=d, BLOCK_M=lq["block_m"], BLOCK_N=lq["block_n"], INDEX_64=index_64, IEEE=ieee,
        FMA_EVERY=fma_every(lq, q.dtype), VARLEN=bounds is not None,
        num_warps=lq["num_warps"], num_stages=lq["num_stages"],
    )
    chunk_rows = max(lk["block_m"], lk["chunk_rows"] // lk["block_m"] * lk["block_m"])
    if bounds is None:
        chunks_table, chunks = dq, triton.cdiv(n, chunk_rows)
        firsts = [0, chunks]
    else:
        chunks_table, firsts = _row_table(bounds, chunk_rows, q.device)
        chunks = firsts[-1]
    dk = torch.empty(chunks, length, h, d, device=q.device, dtype=torch.float32)
    dv = torch.empty_like(dk)
    index_64 = index_64 or chunks * length * h * d >= INDEX_32_LIMIT
    _cross_attention_dkdv_kernel[(triton.cdiv(length, lk["block_n"]), h, chunks)](
        q, k, v, do, dk, dv, lse, delta, chunks_table, n, length, chunk_rows, scale * LOG2E,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), k.stride(2), v.stride(0), v.stride(1), v.stride(2),
        do.stride(0), do.stride(1),
        D=d, BLOCK_M=lk["block_m"], BLOCK_N=lk["block_n"], INDEX_64=index_64, IEEE=ieee,
        FMA_EVERY=fma_every(lk, q.dtype), VARLEN=bounds is not None,
        num_warps=lk["num_warps"], num_stages=lk["num_stages"],
    )
    if chunks == batch and all(firsts[b + 1] - firsts[b] == 1 for b in range(batch)):
        sums_k, sums_v = dk, dv  # one chunk per element: nothing to add
    else:
        sums_k, sums_v = (torch.stack([t[a:z].sum(0) if z > a else t.new_zeros(t.shape[1:])
                                       for a, z in zip(firsts[:-1], firsts[1:])]) for t in (dk, dv))
    return dq, (sums_k * scale).to(k.dtype), sums_v.to(v.dtype)


class _CrossAttention(torch.autograd.Function):
    """:func:`cross_attention` under autograd: the forward kernel keeps the rows' LSE; the backward kernels give
    ``dq``, ``dk``, ``dv`` (shaped as the given ``k``, ``v``). Saves ``q``, ``k``, ``v``, the output and the LSE
    (``4 * H * N`` bytes). Inside a checkpointed block's :class:`~ssa_kernels.output_stash.OutputStash` the output
    and the LSE of the first forward are kept, and the recomputation takes them instead of running the kernel."""

    @staticmethod
    def forward(ctx, q, k, v, scale, launch, backward_launch, bounds):
        stash = output_stash.active("cross_attention")
        n, h, d = q.shape
        kept = None if stash is None else stash.take(((n, h, d), q.dtype), ((h, n), torch.float32))
        out, lse = kept if kept is not None else _forward(q, _batched(k), _batched(v), scale, launch, True, bounds)
        if stash is not None:
            stash.keep(out, lse)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.scale, ctx.backward_launch, ctx.bounds = scale, backward_launch, bounds
        return out

    @staticmethod
    def backward(ctx, do):
        q, k, v, out, lse = ctx.saved_tensors
        dq, dk, dv = _backward(q, _batched(k), _batched(v), out, do, lse, ctx.scale, ctx.backward_launch, ctx.bounds)
        return dq, dk.view(k.shape), dv.view(v.shape), None, None, None, None


def _bounds(offsets, n: int, batch: int) -> tuple | None:
    """The CSR row offsets as a tuple of ints (None for one batch element), checked against ``n`` rows and
    ``batch`` elements."""
    if offsets is None:
        if batch != 1:
            raise ValueError(f"k holds {batch} batch elements: give their rows' CSR offsets ([{batch + 1}] ints)")
        return None
    if isinstance(offsets, torch.Tensor):
        if offsets.dim() != 1 or offsets.dtype.is_floating_point or offsets.dtype == torch.bool:
            raise TypeError(f"offsets must be a 1-D integer tensor or a sequence of ints, got {offsets.dtype} "
                            f"of shape {tuple(offsets.shape)}")
        offsets = offsets.tolist()
    elif not isinstance(offsets, (list, tuple)) or not all(isinstance(x, int) and not isinstance(x, bool)
                                                             for x in offsets):
        raise TypeError(f"offsets must be a 1-D integer tensor or a sequence of ints, got {offsets!r}")
    bounds = tuple(int(x) for x in offsets)
    if len(bounds) != batch + 1:
        raise ValueError(f"offsets must hold {batch + 1} entries for k's {batch} batch elements, got {len(bounds)}")
    if bounds[0] != 0 or bounds[-1] != n or any(a > b for a, b in zip(bounds[:-1], bounds[1:])):
        raise ValueError(f"offsets must rise from 0 to q's {n} rows, got {list(bounds)}")
    return None if batch == 1 else bounds


def cross_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, offsets=None, *,
                    scale: float | None = None, block_m: int | None = None, block_n: int | None = None,
                    num_warps: int | None = None, num_stages: int | None = None, fma_exp_every: int | None = None,
                    backward: dict | None = None) -> torch.Tensor:
    """``softmax(q k^T * scale) v`` per head, every query over every key of its batch element (no mask):
    ``o [N, H, D]`` contiguous. Differentiable in ``q``, ``k`` and ``v`` (Triton backward kernels) while
    :data:`TRAINABLE` is on.

    Args:
        q: ``[N, H, D]`` queries (any strides with the last one 1, e.g. a view of ``[N, H * D]``).
        k, v: ``[L, H, D]`` keys and values of one batch element, or ``[B, L, H, D]`` of ``B`` (``L >= 1``), q's
            dtype and device, last stride 1.
        offsets: with ``B > 1``: the CSR row offsets of q's batch elements (``B + 1`` ints from 0 to ``N``; a
            host sequence, or a tensor, which costs a device sync); element ``b``'s rows attend to ``k[b]``,
            ``v[b]`` only. None: one element.
        scale: the logits' scale; None: ``1 / sqrt(D)``.
        block_m, block_n, num_warps, num_stages: the forward launch (None: :func:`launch_for` the head dim); powers
            of two >= 16 for the tiles.
        fma_exp_every: ``k >= 1``: the last of every ``k`` full key tiles computes its exponentials with
            multiply-adds (:func:`~ssa_kernels._common.exp2_fma`, relative error 7.5e-5) instead of the
            special-function unit; 0: none.
            Half-precision inputs only (float32 ones always use ``exp2``).
        backward: settings of the backward launch over :func:`backward_launch_for`, ``{"dq": {...}, "dkdv":
            {...}}`` (keys as the defaults; ``dkdv`` also ``chunk_rows``, query rows per partial sum; each kernel's
            ``fma_exp_every`` counts its own loop's tiles: key tiles for dq, query tiles for dk/dv).

    Raises ``TypeError`` / ``ValueError`` naming the argument for inputs :func:`supports` rejects.
    """
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if q.dim() != 3:
        raise ValueError(f"q must have 3 dims ([rows, heads, head_dim]), got shape {tuple(q.shape)}")
    for name, t in (("k", k), ("v", v)):
        if t.dim() not in (3, 4):
            raise ValueError(f"{name} must have 3 dims ([keys, heads, head_dim]) or 4 ([batch, keys, heads, "
                             f"head_dim]), got shape {tuple(t.shape)}")
    n, h, d = q.shape
    if k.shape != v.shape:
        raise ValueError(f"k and v must have one shape, got {tuple(k.shape)} and {tuple(v.shape)}")
    if k.shape[-2:] != (h, d):
        raise ValueError(f"k must be [..., L, {h}, {d}] to match q {tuple(q.shape)}, got {tuple(k.shape)}")
    if k.shape[-3] < 1:
        raise ValueError("k must hold at least one key (L >= 1)")
    if d not in HEAD_DIMS:
        raise ValueError(f"q's head dim must be one of {HEAD_DIMS}, got {d}")
    if q.dtype not in KERNEL_DTYPES:
        raise TypeError(f"q must be one of {KERNEL_DTYPES}, got {q.dtype}")
    for name, t in (("k", k), ("v", v)):
        if t.dtype != q.dtype:
            raise TypeError(f"{name} must have q's dtype {q.dtype}, got {t.dtype}")
        if t.device != q.device:
            raise ValueError(f"{name} is on {t.device}, q on {q.device}")
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t.stride(-1) != 1:
            raise ValueError(f"{name} must have a unit stride along its last dim, got strides {t.stride()}")
    if not (q.is_cuda or _interpreting()):
        raise ValueError(f"q must be a CUDA tensor (CPU only under TRITON_INTERPRET=1), got device {q.device}")
    bounds = _bounds(offsets, n, k.shape[0] if k.dim() == 4 else 1)
    grad = _records_gradient(q, k, v)
    if grad and not TRAINABLE:
        raise ValueError("cross_attention's backward is switched off (TRAINABLE): call it under torch.no_grad() / "
                         "torch.inference_mode(), or use torch.nn.functional.scaled_dot_product_attention to train")
    launch = _checked_launch(launch_for(d), dict(block_m=block_m, block_n=block_n, num_warps=num_warps,
                                                 num_stages=num_stages, fma_exp_every=fma_exp_every), "")
    scale = 1.0 / math.sqrt(d) if scale is None else float(scale)
    if not grad:
        return _forward(q, _batched(k), _batched(v), scale, launch, False, bounds)[0]
    defaults = backward_launch_for(d)
    backward = {} if backward is None else backward
    if not isinstance(backward, dict) or not set(backward) <= set(defaults):
        raise ValueError(f"backward must be a dict with keys among {sorted(defaults)}, got {backward!r}")
    for name, settings in backward.items():
        if not isinstance(settings, dict):
            raise ValueError(f"backward[{name!r}] must be a dict of launch settings, got {settings!r}")
        defaults[name] = _checked_launch(defaults[name], settings, f"backward[{name!r}].")
    return _CrossAttention.apply(q, k, v, scale, launch, defaults, bounds)
