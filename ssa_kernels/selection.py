"""Branch 2, selection attention: each query attends, with one softmax, over every token of its chosen blocks.

``q [N, Hq, D]``, ``k, v [N, Hkv, D]``, ``idx [N, Hkv, topk]`` int32 (selection block ids, -1 = none) ->
``o [N, Hq, D]``, ``lse [N, Hq]`` float32. A block's tokens are found through the start-index table
``layout.sel_offsets``; blocks hold any number of tokens.

Forward and dQ are query-outer: a program takes ``BLOCK_T`` tokens x ``HG`` heads of one kv group and loops over
the union of its tokens' chosen blocks (rows of tokens that did not choose a block are masked), so every K/V tile
is loaded once for the whole group and shared by the tile's tokens.

A program of one token (``BLOCK_T`` 1: the 16 query heads of a kv group at head dim 32) can walk its chosen blocks'
keys as one stream (launch setting ``merged`` of ``selection.FWD`` / ``selection.DQ``): positions ``0 .. total``
over the blocks in choice order, each tile of ``BLOCK_N`` positions gathered across block boundaries. Block by
block, every block ends in a part-filled tile (a block of 137 keys takes five 32-key tiles, the last 9 keys
full); as one stream the token's 8 blocks take ``ceil(total / BLOCK_N)`` tiles, one part-filled in all. The
softmax sees the same keys in the same order, so only the float rounding of the tile boundaries differs.

The forward and dQ have key-outer variants too (launch setting ``key_outer``:
:mod:`ssa_kernels.selection_key_outer`): a program takes one selection block and the queries that chose it.

dK/dV are key-outer: a program owns a tile of one selection block's keys and loops over the queries that chose
the block, through a block -> queries index (CSR), accumulating every head of the group in float32 registers.
A model's queries do not spread evenly: some blocks are chosen by most of them, and such a block would be one
program that runs long after the others. With the launch setting ``max_queries`` a block's queries are cut into
chunks of at most that many (:func:`split_buckets`), one program each; the first chunk stores into dK/dV, the
others write partial sums that a second kernel adds in chunk order. Either way each key's gradient is summed in a
fixed order: deterministic, no atomics.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import (
    LOG2E,
    _dkdv_rows,
    _dkdv_store,
    _dq_store,
    _dq_turn,
    _grad_query_rows,
    _load_kv,
    _load_rows,
    _online_softmax_turn,
    _signed_variant_runs,
    _row_tokens_heads,
    _softmax_start,
    _softmax_store,
    block_d,
    dot_precision,
    fma_every,
    group_tiling,
)
from .block_index import block_query_index, split_buckets
from .gate import fold_gate
from .launch import config
from .layout import BlockLayout
from .selection_key_outer import selection_dq_key_outer, selection_forward_key_outer

# Launch configurations: ssa_kernels.launch ("selection.FWD", "selection.DQ": query rows (tokens x heads) per
# program, keys per step; "selection.DKDV": query rows per step, keys per program, query tokens per program).

#: Most memory the partial sums of a split selection dK/dV may take (bytes); beyond it the chunks grow.
SPLIT_SCRATCH_BYTES = 128 * 2**20


@triton.jit
def _tile_choices(IDX, tok64, row_ok, g, hkv, TOPK: tl.constexpr, K2: tl.constexpr, BLOCK_T: tl.constexpr,
                  HG: tl.constexpr):
    """The chosen blocks ``sel_r [R, K2]`` of each row's token (-1 = none) and each row's token within the tile."""
    kk = tl.arange(0, K2)
    sel_r = tl.load(IDX + (tok64[:, None] * hkv + g) * TOPK + kk[None, :], mask=row_ok[:, None] & (kk[None, :] < TOPK),
                    other=-1)
    r_tok = tl.arange(0, BLOCK_T * HG) // HG
    return sel_r, r_tok


@triton.jit
def _slot_block(IDX, sel_r, r_tok, row_ok, slot, pid_t, N, hkv, g, TOPK: tl.constexpr, BLOCK_T: tl.constexpr):
    """Choice ``slot`` of the tile's (token, choice) list: ``(blk, visit, row_sel)``, the chosen block, whether to
    visit it (a block is visited once per tile: not when an earlier token of the tile chose it too) and the rows
    that chose it."""
    ti = slot // TOPK
    t = pid_t * BLOCK_T + ti
    blk = tl.load(IDX + (t.to(tl.int64) * hkv + g) * TOPK + slot % TOPK, mask=t < N, other=-1)
    if BLOCK_T == 1:  # one token: its blocks are distinct and every row chose them
        seen = 0
        row_sel = row_ok
    else:
        seen = tl.sum(((sel_r == blk) & (r_tok < ti)[:, None]).to(tl.int32))
        row_sel = tl.max((sel_r == blk).to(tl.int32), 1) > 0
    return blk, (blk >= 0) & (seen == 0), row_sel


@triton.jit
def _token_segments(IDX, sel_offsets, t, N, hkv, g, TOPK: tl.constexpr, K2: tl.constexpr):
    """The keys of token ``t``'s chosen blocks (kv head ``g``) as one stream of ``total`` positions: block ``j``
    holds positions ``[cum_start[j], cum_start[j] + length)``, its keys from ``starts[j]`` on (``[K2]`` each;
    unused choices have length 0)."""
    kk = tl.arange(0, K2)
    blocks = tl.load(IDX + (t.to(tl.int64) * hkv + g) * TOPK + kk, mask=(kk < TOPK) & (t < N), other=-1)
    chosen = blocks >= 0
    starts = tl.load(sel_offsets + blocks, mask=chosen, other=0)
    lengths = tl.load(sel_offsets + blocks + 1, mask=chosen, other=0) - starts
    cum_end = tl.cumsum(lengths, 0)
    return starts, cum_end - lengths, cum_end, tl.sum(lengths, 0)


@triton.jit
def _stream_keys(starts, cum_start, cum_end, total, p0, BLOCK_N: tl.constexpr):
    """Key indices ``n [BLOCK_N]`` of stream positions ``p0 ..`` (:func:`_token_segments`) and which are in it."""
    p = p0 + tl.arange(0, BLOCK_N)
    inside = (p[:, None] >= cum_start[None, :]) & (p[:, None] < cum_end[None, :])
    n = tl.sum(tl.where(inside, starts[None, :] + p[:, None] - cum_start[None, :], 0), 1)
    return n, p < total


@triton.jit
def _sel_fwd_kernel(
    Q, K, V, O, LSE, IDX, sel_offsets,
    N, H, qk_scale,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_ot, stride_oh,
    G: tl.constexpr, HG: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_N: tl.constexpr,
    TOPK: tl.constexpr, K2: tl.constexpr,
    D: tl.constexpr, BLOCK_D: tl.constexpr, PRECISION: tl.constexpr, MERGED: tl.constexpr, FMA_EVERY: tl.constexpr,
    WHOLE_TILES: tl.constexpr,
):
    """Query-outer forward; ``FMA_EVERY`` (0: never): every ``FMA_EVERY``-th key tile the program visits takes its
    exponentials from :func:`ssa_kernels._common.exp2_fma`. ``WHOLE_TILES`` (one token per program only): a block's
    whole key tiles without the per-score mask."""
    pid_t = tl.program_id(0)
    tok, head, row_ok, g = _row_tokens_heads(pid_t, tl.program_id(1), N, G, HG, BLOCK_T)
    hkv = H // G
    tok64 = tok.to(tl.int64)
    d = tl.arange(0, BLOCK_D)
    d_ok = d < D
    rd_mask = row_ok[:, None] & d_ok[None, :]
    q = _load_rows(Q, tok64, head, d, stride_qt, stride_qh, rd_mask)
    m, l, acc = _softmax_start(BLOCK_T * HG, BLOCK_D)
    if MERGED:  # one token: its blocks' keys as one stream of full tiles (module docstring)
        starts, cum_start, cum_end, total = _token_segments(IDX, sel_offsets, pid_t, N, hkv, g, TOPK, K2)
        for p0 in range(0, total, BLOCK_N):
            n, n_ok = _stream_keys(starts, cum_start, cum_end, total, p0, BLOCK_N)
            k, v = _load_kv(K, V, n.to(tl.int64), g, d, stride_kt, stride_kh, n_ok[:, None] & d_ok[None, :])
            m, l, acc = _online_softmax_turn(m, l, acc, q, k, v, row_ok[:, None] & n_ok[None, :], qk_scale,
                                             PRECISION, p0 // BLOCK_N, FMA_EVERY)
    else:
        sel_r, r_tok = _tile_choices(IDX, tok64, row_ok, g, hkv, TOPK, K2, BLOCK_T, HG)
        step = 0  # key tiles visited so far (counted only with FMA_EVERY: no loop-carried value otherwise)
        for slot in range(0, BLOCK_T * TOPK):
            blk, visit, row_sel = _slot_block(IDX, sel_r, r_tok, row_ok, slot, pid_t, N, hkv, g, TOPK, BLOCK_T)
            if visit:
                start = tl.load(sel_offsets + blk)
                end = tl.load(sel_offsets + blk + 1)
                full_end = start
                if WHOLE_TILES:  # every row chose the block: its whole key tiles without the per-score mask
                    full_end = start + (end - start) // BLOCK_N * BLOCK_N
                    for ks in range(start, full_end, BLOCK_N):
                        k, v = _load_kv(K, V, (ks + tl.arange(0, BLOCK_N)).to(tl.int64), g, d, stride_kt,
                                        stride_kh, d_ok[None, :])
                        m, l, acc = _online_softmax_turn(m, l, acc, q, k, v, d_ok, qk_scale, PRECISION, step,
                                                         FMA_EVERY, False)
                        if FMA_EVERY > 0:
                            step += 1
                for ks in range(full_end, end, BLOCK_N):
                    n = ks + tl.arange(0, BLOCK_N)
                    n_ok = n < end
                    k, v = _load_kv(K, V, n.to(tl.int64), g, d, stride_kt, stride_kh,
                                    n_ok[:, None] & d_ok[None, :])
                    m, l, acc = _online_softmax_turn(m, l, acc, q, k, v, row_sel[:, None] & n_ok[None, :],
                                                     qk_scale, PRECISION, step, FMA_EVERY)
                    if FMA_EVERY > 0:
                        step += 1
    _softmax_store(O, LSE, m, l, acc, tok64, head, d, H, stride_ot, stride_oh, row_ok, rd_mask)


@triton.jit
def _sel_bwd_dq_kernel(
    Q, K, V, DO, GATE, LSE2, DELTA, DQ, IDX, sel_offsets,
    N, H, qk_scale, scale,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_dt, stride_dh,
    G: tl.constexpr, HG: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_N: tl.constexpr,
    TOPK: tl.constexpr, K2: tl.constexpr,
    D: tl.constexpr, BLOCK_D: tl.constexpr, PRECISION: tl.constexpr,
    HAS_GATE: tl.constexpr, GATE_IDX: tl.constexpr, ACCUMULATE: tl.constexpr, MERGED: tl.constexpr,
    FMA_EVERY: tl.constexpr, WHOLE_TILES: tl.constexpr,
):
    """dQ of the selection branch into ``DQ [N, Hq, D]`` float32 (added to when ``ACCUMULATE``); ``FMA_EVERY`` and
    ``WHOLE_TILES`` as in :func:`_sel_fwd_kernel`."""
    pid_t = tl.program_id(0)
    tok, head, row_ok, g = _row_tokens_heads(pid_t, tl.program_id(1), N, G, HG, BLOCK_T)
    hkv = H // G
    tok64 = tok.to(tl.int64)
    d = tl.arange(0, BLOCK_D)
    d_ok = d < D
    rd_mask = row_ok[:, None] & d_ok[None, :]
    q, do, lse2, delta = _grad_query_rows(Q, DO, LSE2, DELTA, tok64, head, d, H, stride_qt, stride_qh, stride_dt,
                                          stride_dh, row_ok, rd_mask)
    dq = tl.zeros([BLOCK_T * HG, BLOCK_D], tl.float32)
    if MERGED:  # one token: its blocks' keys as one stream of full tiles (module docstring)
        starts, cum_start, cum_end, total = _token_segments(IDX, sel_offsets, pid_t, N, hkv, g, TOPK, K2)
        for p0 in range(0, total, BLOCK_N):
            n, n_ok = _stream_keys(starts, cum_start, cum_end, total, p0, BLOCK_N)
            k, v = _load_kv(K, V, n.to(tl.int64), g, d, stride_kt, stride_kh, n_ok[:, None] & d_ok[None, :])
            dq = _dq_turn(dq, q, k, v, do, lse2, delta, row_ok[:, None] & n_ok[None, :], qk_scale, PRECISION,
                          True, p0 // BLOCK_N, FMA_EVERY)
    else:
        sel_r, r_tok = _tile_choices(IDX, tok64, row_ok, g, hkv, TOPK, K2, BLOCK_T, HG)
        step = 0
        for slot in range(0, BLOCK_T * TOPK):
            blk, visit, row_sel = _slot_block(IDX, sel_r, r_tok, row_ok, slot, pid_t, N, hkv, g, TOPK, BLOCK_T)
            if visit:
                start = tl.load(sel_offsets + blk)
                end = tl.load(sel_offsets + blk + 1)
                full_end = start
                if WHOLE_TILES:  # every row chose the block: its whole key tiles without the per-score mask
                    full_end = start + (end - start) // BLOCK_N * BLOCK_N
                    for ks in range(start, full_end, BLOCK_N):
                        k, v = _load_kv(K, V, (ks + tl.arange(0, BLOCK_N)).to(tl.int64), g, d, stride_kt,
                                        stride_kh, d_ok[None, :])
                        dq = _dq_turn(dq, q, k, v, do, lse2, delta, d_ok, qk_scale, PRECISION, False, step,
                                      FMA_EVERY)
                        if FMA_EVERY > 0:
                            step += 1
                for ks in range(full_end, end, BLOCK_N):
                    n = ks + tl.arange(0, BLOCK_N)
                    n_ok = n < end
                    k, v = _load_kv(K, V, n.to(tl.int64), g, d, stride_kt, stride_kh,
                                    n_ok[:, None] & d_ok[None, :])
                    dq = _dq_turn(dq, q, k, v, do, lse2, delta, row_sel[:, None] & n_ok[None, :], qk_scale,
                                  PRECISION, True, step, FMA_EVERY)
                    if FMA_EVERY > 0:
                        step += 1
    _dq_store(DQ, GATE, dq, scale, tok64, head, d, H, row_ok, rd_mask, D, HAS_GATE, GATE_IDX, ACCUMULATE)


@triton.jit
def _sel_dkdv_tile(Q, K, V, DO, GATE, LSE2, DELTA, DK, DV, PART, csr_offsets, csr_tokens, item, bucket, chunk, tile,
                   start, end, max_queries, g, hkv, H, qk_scale, scale, part_stride,
                   stride_qt, stride_qh, stride_kt, stride_kh, stride_dt, stride_dh,
                   G: tl.constexpr, HG: tl.constexpr, BLOCK_T: tl.constexpr, BN: tl.constexpr, SLOT_N: tl.constexpr,
                   D: tl.constexpr, BLOCK_D: tl.constexpr, PRECISION: tl.constexpr, GATE_IDX: tl.constexpr,
                   ACCUMULATE: tl.constexpr, SIGNED: tl.constexpr, SPLIT: tl.constexpr):
    """The work of one program of :func:`_sel_bwd_dkdv_kernel` on ``BN`` keys from ``start`` (``SLOT_N``: the rows
    of a partial-sum slot, the launch's ``BLOCK_N``; a half tile fills the first ``BN`` of them)."""
    n = start + tl.arange(0, BN)
    n_ok = n < end
    d = tl.arange(0, BLOCK_D)
    d_ok = d < D
    kv_mask = n_ok[:, None] & d_ok[None, :]
    k, v = _load_kv(K, V, n.to(tl.int64), g, d, stride_kt, stride_kh, kv_mask)
    dk = tl.zeros([BN, BLOCK_D], tl.float32)
    dv = tl.zeros([BN, BLOCK_D], tl.float32)
    q_lo = tl.load(csr_offsets + bucket)
    q_hi = tl.load(csr_offsets + bucket + 1)
    if SPLIT:
        q_lo = q_lo + chunk * max_queries
        q_hi = tl.minimum(q_hi, q_lo + max_queries)
    r = tl.arange(0, BLOCK_T * HG)
    for e0 in range(q_lo, q_hi, BLOCK_T):
        e = e0 + r // HG
        row_ok = e < q_hi
        tok64 = tl.load(csr_tokens + e, mask=row_ok, other=0).to(tl.int64)
        rd_mask = row_ok[:, None] & d_ok[None, :]
        valid_t = n_ok[:, None] & row_ok[None, :]
        dk, dv = _dkdv_rows(dk, dv, k, v, Q, DO, GATE, LSE2, DELTA, tok64, g, r, d, row_ok, rd_mask, valid_t, H,
                            qk_scale, stride_qt, stride_qh, stride_dt, stride_dh, G, HG, PRECISION,
                            GATE_IDX, SIGNED)
    if chunk == 0:
        _dkdv_store(DK, DV, dk, dv, scale, n.to(tl.int64), g, hkv, d, kv_mask, D, ACCUMULATE)
    else:
        tiles = tl.num_programs(1)
        part = ((item - bucket - 1).to(tl.int64) * tiles + tile) * (SLOT_N * BLOCK_D)
        rows = tl.arange(0, BN)[:, None] * BLOCK_D + d[None, :]
        tl.store(PART + part + rows, dk)
        tl.store(PART + part_stride + part + rows, dv)


@triton.jit
def _sel_bwd_dkdv_kernel(
    Q, K, V, DO, GATE, NEG, LSE2, DELTA, DK, DV, PART,
    sel_offsets, csr_offsets, csr_tokens, item_bucket, item_start,
    S, NB, H, qk_scale, scale, max_queries, part_stride,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_dt, stride_dh,
    G: tl.constexpr, HG: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_N: tl.constexpr,
    D: tl.constexpr, BLOCK_D: tl.constexpr, PRECISION: tl.constexpr,
    HAS_GATE: tl.constexpr, GATE_IDX: tl.constexpr, ACCUMULATE: tl.constexpr, SIGNED: tl.constexpr,
    SPLIT: tl.constexpr, TAIL: tl.constexpr,
):
    """dK/dV of key tile ``program_id(1)`` of one work item ``program_id(0)``; launched once per ``SIGNED``
    variant (``gate.fold_gate``), the one that does not apply does nothing.

    A bucket is one (kv head g, selection block b), ``bucket = g * S + b``; the query tokens that chose block b for
    kv head g are ``csr_tokens[csr_offsets[bucket] : csr_offsets[bucket + 1]]``. Without ``SPLIT`` work item i is
    bucket i. With ``SPLIT`` a bucket's queries are cut into chunks of ``max_queries``: work item i is chunk
    ``i - item_start[bucket]`` of bucket ``item_bucket[i]`` (``NB`` past the last item). Chunk 0 stores into
    ``DK, DV [N, Hkv, D]`` float32 (added to when ``ACCUMULATE``); chunk c > 0 writes its unscaled partial sums
    into slot ``i - bucket - 1`` of ``PART [2, slots, tiles, BLOCK_N, BLOCK_D]`` (``part_stride`` = the size of
    one of the two halves), which :func:`_sel_dkdv_reduce_kernel` adds in chunk order. ``TAIL``: a tile with at
    most ``BLOCK_N / 2`` keys left (a block's last) runs as a half tile, every product and exponential on half the
    keys (the reduction reads the other half of its slot only for keys it does not store).
    """
    item = tl.program_id(0)
    tile = tl.program_id(1)
    if SPLIT:
        bucket = tl.load(item_bucket + item)
        chunk = item - tl.load(item_start + bucket)
    else:
        bucket = item
        chunk = 0
    blk = bucket % S
    g = bucket // S
    hkv = H // G
    start = tl.load(sel_offsets + blk) + tile * BLOCK_N
    end = tl.load(sel_offsets + blk + 1)
    if (bucket < NB) & (start < end) & _signed_variant_runs(NEG, HAS_GATE, SIGNED):
        args = (Q, K, V, DO, GATE, LSE2, DELTA, DK, DV, PART, csr_offsets, csr_tokens, item, bucket, chunk, tile,
                start, end, max_queries, g, hkv, H, qk_scale, scale, part_stride,
                stride_qt, stride_qh, stride_kt, stride_kh, stride_dt, stride_dh)
        if TAIL:
            if end - start <= BLOCK_N // 2:
                _sel_dkdv_tile(*args, G, HG, BLOCK_T, BLOCK_N // 2, BLOCK_N, D, BLOCK_D, PRECISION, GATE_IDX,
                               ACCUMULATE, SIGNED, SPLIT)
            else:
                _sel_dkdv_tile(*args, G, HG, BLOCK_T, BLOCK_N, BLOCK_N, D, BLOCK_D, PRECISION, GATE_IDX,
                               ACCUMULATE, SIGNED, SPLIT)
        else:
            _sel_dkdv_tile(*args, G, HG, BLOCK_T, BLOCK_N, BLOCK_N, D, BLOCK_D, PRECISION, GATE_IDX, ACCUMULATE,
                           SIGNED, SPLIT)


@triton.jit
def _sel_dkdv_reduce_kernel(
    DK, DV, PART, sel_offsets, item_start,
    S, H, scale, part_stride,
    G: tl.constexpr, BLOCK_N: tl.constexpr, D: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """Adds the partial sums of chunks 1, 2, ... of bucket ``program_id(0)`` (key tile ``program_id(1)``), in
    that order, into ``DK, DV`` (:func:`_sel_bwd_dkdv_kernel` with ``SPLIT``; chunk 0 stored there already).
    The order is fixed, so the result does not depend on which program ran first."""
    bucket = tl.program_id(0)
    tile = tl.program_id(1)
    first = tl.load(item_start + bucket)
    chunks = tl.load(item_start + bucket + 1) - first
    blk = bucket % S
    g = bucket // S
    start = tl.load(sel_offsets + blk) + tile * BLOCK_N
    end = tl.load(sel_offsets + blk + 1)
    if (chunks > 1) & (start < end):
        tiles = tl.num_programs(1)
        n = start + tl.arange(0, BLOCK_N)
        d = tl.arange(0, BLOCK_D)
        kv_mask = (n < end)[:, None] & (d < D)[None, :]
        rows = tl.arange(0, BLOCK_N)[:, None] * BLOCK_D + d[None, :]
        dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
        dv = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
        for c in range(1, chunks):
            part = ((first + c - bucket - 1).to(tl.int64) * tiles + tile) * (BLOCK_N * BLOCK_D)
            dk += tl.load(PART + part + rows)
            dv += tl.load(PART + part_stride + part + rows)
        _dkdv_store(DK, DV, dk, dv, scale, n.to(tl.int64), g, H // G, d, kv_mask, D, True)


def _launch(cfg):
    return dict(num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])


def selection_forward(q, k, v, idx, layout: BlockLayout, scale: float):
    """``o [N, Hq, D]`` (dtype of q) and ``lse [N, Hq]`` float32 of the selection branch (query-outer, or key-outer
    with the launch setting ``key_outer``: module docstring)."""
    n, hq, dim = q.shape
    hkv = k.shape[1]
    group = hq // hkv
    topk = idx.shape[2]
    fwd = config("selection.FWD", head_dim=dim, dtype=q.dtype, device=q.device)
    hg, bt = group_tiling(group, fwd["rows"])
    o = torch.empty_like(q)
    lse = torch.empty(n, hq, device=q.device, dtype=torch.float32)
    if n == 0:
        return o, lse
    if fwd["key_outer"]:
        selection_forward_key_outer(q, k, v, idx, layout, scale, fwd, o, lse)
        return o, lse
    _sel_fwd_kernel[(triton.cdiv(n, bt), hkv * (group // hg))](
        q, k, v, o, lse, idx, layout.sel_offsets,
        n, hq, scale * LOG2E,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), o.stride(0), o.stride(1),
        G=group, HG=hg, BLOCK_T=bt, BLOCK_N=fwd["block_n"], TOPK=topk, K2=triton.next_power_of_2(topk),
        D=dim, BLOCK_D=block_d(dim), PRECISION=dot_precision(q.dtype), MERGED=bool(fwd["merged"]) and bt == 1,
        FMA_EVERY=fma_every(fwd, q.dtype), WHOLE_TILES=bool(fwd["whole_tiles"]) and bt == 1, **_launch(fwd),
    )
    return o, lse


def selection_backward(do, q, k, v, idx, lse, delta, layout: BlockLayout, scale: float, *, gate=None, gate_idx=1,
                       dq_acc=None, dk_acc=None, dv_acc=None, accumulate=False, parts=("dq", "dkdv"),
                       fold=None, index=None):
    """Gradients of the selection branch into float32 accumulators (created when not given).

    ``do`` is the gradient of ``gate[:, gate_idx] * o`` when ``gate`` is given, else of ``o``;
    ``delta [N, Hq]`` float32 = rowsum(do * o), without the gate (it is folded in by the kernels). Returns
    ``(dq_acc, dk_acc, dv_acc)``. ``parts`` runs only some of the kernels (for timing them apart, or to launch
    them on different streams); ``fold`` is ``gate.fold_gate(lse, gate, gate_idx)`` and ``index``
    :func:`block_query_index` of ``idx`` when the caller has them already (computed here otherwise).
    """
    n, hq, dim = q.shape
    hkv = k.shape[1]
    group = hq // hkv
    topk = idx.shape[2]
    f32 = dict(device=q.device, dtype=torch.float32)
    if dq_acc is None:
        dq_acc, dk_acc, dv_acc = torch.empty(n, hq, dim, **f32), torch.empty(n, hkv, dim, **f32), torch.empty(
            n, hkv, dim, **f32)
        accumulate = False
    if n == 0:
        return dq_acc, dk_acc, dv_acc
    has_gate = gate is not None
    gate_t = gate if has_gate else lse
    lse2, neg, variants = fold_gate(lse, gate, gate_idx) if fold is None else fold
    prec = dot_precision(q.dtype)
    dq_cfg = config("selection.DQ", head_dim=dim, dtype=q.dtype, device=q.device)
    hg, bt = group_tiling(group, dq_cfg["rows"])
    if "dq" in parts and dq_cfg["key_outer"]:
        selection_dq_key_outer(do, q, k, v, idx, gate_t, lse2, delta, dq_acc, layout, scale, dq_cfg,
                                has_gate=has_gate, gate_idx=gate_idx, accumulate=accumulate)
    elif "dq" in parts:
        _sel_bwd_dq_kernel[(triton.cdiv(n, bt), hkv * (group // hg))](
            q, k, v, do, gate_t, lse2, delta, dq_acc, idx, layout.sel_offsets,
            n, hq, scale * LOG2E, scale,
            q.stride(0), q.stride(1), k.stride(0), k.stride(1), do.stride(0), do.stride(1),
            G=group, HG=hg, BLOCK_T=bt, BLOCK_N=dq_cfg["block_n"], TOPK=topk, K2=triton.next_power_of_2(topk),
            D=dim, BLOCK_D=block_d(dim), PRECISION=prec, HAS_GATE=has_gate,
            GATE_IDX=gate_idx, ACCUMULATE=accumulate, MERGED=bool(dq_cfg["merged"]) and bt == 1,
            FMA_EVERY=fma_every(dq_cfg, q.dtype), WHOLE_TILES=bool(dq_cfg["whole_tiles"]) and bt == 1,
            **_launch(dq_cfg),
        )
    if "dkdv" not in parts:
        return dq_acc, dk_acc, dv_acc
    csr_offsets, csr_tokens = block_query_index(idx, layout.num_sel_blocks) if index is None else index
    dkdv = config("selection.DKDV", head_dim=dim, dtype=q.dtype, device=q.device)
    hg, bt = group_tiling(group, dkdv["rows"])
    block_n, bd = dkdv["block_n"], block_d(dim)
    tiles = triton.cdiv(layout.max_sel_block_tokens, block_n)
    nb = hkv * layout.num_sel_blocks
    split = dkdv["max_queries"] > 0
    if split:
        # chunks other than a bucket's first keep [tiles, BLOCK_N, BLOCK_D] float32 partial sums of dK and of dV;
        # longer chunks where the bound on their number would make that exceed SPLIT_SCRATCH_BYTES
        slot_bytes = 2 * tiles * block_n * bd * 4
        max_queries = max(dkdv["max_queries"], triton.cdiv(csr_tokens.numel() * slot_bytes, SPLIT_SCRATCH_BYTES))
        item_bucket, item_start, slots = split_buckets(csr_offsets, max_queries, csr_tokens.numel())
        part = torch.empty(2, max(slots, 1), tiles, block_n, bd, **f32)
    else:
        item_bucket = item_start = part = csr_offsets  # not read
    items = item_bucket.numel() if split else nb
    for signed in variants:
        _sel_bwd_dkdv_kernel[(items, tiles)](
            q, k, v, do, gate_t, neg, lse2, delta, dk_acc, dv_acc, part,
            layout.sel_offsets, csr_offsets, csr_tokens, item_bucket, item_start,
            layout.num_sel_blocks, nb, hq, scale * LOG2E, scale, max_queries if split else 1,
            part[0].numel() if split else 0,
            q.stride(0), q.stride(1), k.stride(0), k.stride(1), do.stride(0), do.stride(1),
            G=group, HG=hg, BLOCK_T=bt, BLOCK_N=block_n,
            D=dim, BLOCK_D=bd, PRECISION=prec, HAS_GATE=has_gate,
            GATE_IDX=gate_idx, ACCUMULATE=accumulate, SIGNED=signed, SPLIT=split,
            TAIL=bool(dkdv["tail"]) and block_n >= 32, **_launch(dkdv),
        )
    if split:  # after both variants: the one that ran wrote the partial sums
        _sel_dkdv_reduce_kernel[(nb, tiles)](
            dk_acc, dv_acc, part, layout.sel_offsets, item_start,
            layout.num_sel_blocks, hq, scale, part[0].numel(),
            G=group, BLOCK_N=block_n, D=dim, BLOCK_D=bd,
        )
    return dq_acc, dk_acc, dv_acc
