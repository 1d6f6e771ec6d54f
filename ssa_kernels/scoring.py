"""Block scoring fused with the GQA head sum, the aggregation into selection blocks and the top-k.

``q [N, Hq, D]``, ``k_cmp [Nc, Hkv, D]``, ``lse [N, Hq]`` (the compression branch's log-sum-exp) ->
``idx [N, Hkv, topk]`` int32: for each query token and kv head, the selection blocks with the highest scores

    score[t, g, b] = sum_{h in group g} sum_{j in b} exp(q[t,h] . k_cmp[j,g] * scale - lse[t,h]),

best first, ``-1`` where the token's batch element has fewer than ``topk`` blocks. Ties go to the lower block id.

One program takes ``BLOCK_T`` tokens and all ``G`` query heads of one kv group (``G >= 16``: one token, the 16-row
matrix product of its heads; the head sum is then a column sum inside one warp) and walks the selection blocks of
its tokens' batch elements in chunks of ``BLOCK_S``; the compressed keys of a chunk are contiguous in layout order
(``sel_cmp_offsets``) and are visited in tiles of ``BLOCK_N``, summed into their selection blocks as differences of
a running sum along the tile (or through a 0/1 membership mask, the ``aggregate`` setting). Each chunk's scores go
into a running top-k kept in registers by threshold insertion: a score enters only if it beats the current k-th
best, replacing it, so after the first chunks most chunks cost one comparison. No ``[N, Nc]`` score tensor ever
exists; memory is O(N * topk).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import (
    LOG2E,
    LOG2E_C,
    MAX_TOPK,
    _batch_ranges,
    _exp2,
    _full_tiles_end,
    block_d,
    dot_precision,
    fma_every,
    head_split,
    tokens_per_tile,
)
from .launch import config
from .layout import BlockLayout

# Launch configuration "scoring.SCORE" (ssa_kernels.launch): query rows (tokens x heads) per matrix product,
# compressed keys per step
# (``block_n``), selection blocks per chunk when a block holds several compressed blocks (``block_s``; with one
# compressed block per selection block the chunk is one step), heads of one group per matrix product.
# ``tokens_per_program``: with one token per matrix product (G >= 16), tokens that share each key tile
# (``tokens_per_program_agg`` when selection blocks hold several compressed blocks).
# ``aggregate``: how a tile's per-compressed-block scores are summed into selection blocks when a selection block
# holds several compressed blocks: ``"prefix"`` (a running sum along the tile's keys and two gathers per
# selection block, as the keys of a selection block are contiguous) or ``"mask"`` (a 0/1 membership mask,
# ``[tokens, keys, blocks]`` summed over the keys).
#: ``FMA_STEP`` of a launch without FMA exponentials: more products than any program runs.
NO_FMA_STEP = 1 << 20
#: Values of the ``aggregate`` setting.
AGGREGATE_MODES = ("prefix", "mask")


@triton.jit
def _tile_scores(Q, KC, LSE, k, sel_j, c_ok, tok0, N, H, qk_scale, g, stride_qt, stride_qh,
                 batch_sel_offsets, token_batch,
                 G: tl.constexpr, HG: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_N: tl.constexpr,
                 D: tl.constexpr, BLOCK_D: tl.constexpr, PRECISION: tl.constexpr, FMA_EXP: tl.constexpr,
                 MASKED: tl.constexpr = True, KEY_ROWS: tl.constexpr = False):
    """Head-summed probabilities ``[BLOCK_T, BLOCK_N]`` of tokens ``tok0 ..`` against one tile of compressed keys
    ``k [BLOCK_N, D]`` (whose selection blocks are ``sel_j``); zero outside each token's batch element.
    ``FMA_EXP``: the exponentials from :func:`ssa_kernels._common.exp2_fma`. Without ``MASKED`` the caller knows
    every key of the tile to be in every token's batch element: no mask is formed (``sel_j``, ``c_ok`` not read).
    ``KEY_ROWS`` (one token, ``BLOCK_T == 1``): :func:`_key_row_scores`."""
    if KEY_ROWS:
        return _key_row_scores(Q, LSE, k, sel_j, c_ok, tok0, N, H, qk_scale, g, stride_qt, stride_qh,
                               batch_sel_offsets, token_batch, G, HG, BLOCK_N, D, BLOCK_D, PRECISION, FMA_EXP,
                               MASKED)
    r = tl.arange(0, BLOCK_T * HG)
    tok = tok0 + r // HG
    row_ok = tok < N
    tok64 = tok.to(tl.int64)
    if MASKED:
        rb = tl.load(token_batch + tok, mask=row_ok, other=0)
        s_lo_r = tl.load(batch_sel_offsets + rb, mask=row_ok, other=0)
        s_hi_r = tl.load(batch_sel_offsets + rb + 1, mask=row_ok, other=0)
        valid = c_ok[None, :] & (sel_j[None, :] >= s_lo_r[:, None]) & (sel_j[None, :] < s_hi_r[:, None])
    d = tl.arange(0, BLOCK_D)
    psum = tl.zeros([BLOCK_T, BLOCK_N], tl.float32)
    for hs in tl.static_range(G // HG):
        head = g * G + hs * HG + r % HG
        q = tl.load(Q + tok64[:, None] * stride_qt + head[:, None] * stride_qh + d[None, :],
                    mask=row_ok[:, None] & (d < D)[None, :], other=0.0)
        lse2 = tl.load(LSE + tok64 * H + head, mask=row_ok, other=0.0) * LOG2E_C
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale
        if MASKED:
            p = tl.where(valid, _exp2(s - lse2[:, None], FMA_EXP), 0.0)
        else:  # p <= 1: lse covers these keys (rows past N: q = 0, lse2 = 0, p = 1, never stored)
            p = _exp2(s - lse2[:, None], FMA_EXP)
        if BLOCK_T == 1:
            psum += tl.sum(p, 0)[None, :]  # GQA head sum: a column sum
        else:
            psum += tl.sum(tl.reshape(p, [BLOCK_T, HG, BLOCK_N]), 1)
    return psum


@triton.jit
def _key_row_scores(Q, LSE, k, sel_j, c_ok, tok, N, H, qk_scale, g, stride_qt, stride_qh, batch_sel_offsets,
                    token_batch, G: tl.constexpr, HG: tl.constexpr, BLOCK_N: tl.constexpr, D: tl.constexpr,
                    BLOCK_D: tl.constexpr, PRECISION: tl.constexpr, FMA_EXP: tl.constexpr, MASKED: tl.constexpr):
    """:func:`_tile_scores` of one token ``tok`` with the keys as the rows of the product: ``S^T = k q^T``
    ``[BLOCK_N, HG]``, so that the head sum runs along a row of the matrix unit's output (each thread holds four
    heads of a key; two shuffle rounds finish it) instead of down a column (two rows per thread, three rounds over
    eight threads), and the batch mask applies once per key after the sum instead of once per score (a key outside
    the token's batch element may sum to inf; ``where`` drops it). ``[1, BLOCK_N]``."""
    ok = tok < N
    tok64 = tok.to(tl.int64)
    hh = tl.arange(0, HG)
    d = tl.arange(0, BLOCK_D)
    psum = tl.zeros([BLOCK_N], tl.float32)
    for hs in tl.static_range(G // HG):
        head = g * G + hs * HG + hh
        q = tl.load(Q + tok64 * stride_qt + head[:, None] * stride_qh + d[None, :], mask=ok & (d < D)[None, :],
                    other=0.0)
        lse2 = tl.load(LSE + tok64 * H + head, mask=ok, other=0.0) * LOG2E_C
        s = tl.dot(k, tl.trans(q), input_precision=PRECISION)  # [BLOCK_N, HG]
        psum += tl.sum(_exp2(s * qk_scale - lse2[None, :], FMA_EXP), 1)
    if MASKED:
        b = tl.load(token_batch + tok, mask=ok, other=0)
        s_lo = tl.load(batch_sel_offsets + b, mask=ok, other=0)
        s_hi = tl.load(batch_sel_offsets + b + 1, mask=ok, other=0)
        psum = tl.where(c_ok & (sel_j >= s_lo) & (sel_j < s_hi), psum, 0.0)
    return psum[None, :]


@triton.jit
def _aggregated_tile(score, Q, KC, LSE, c0, c_hi, a_s, b_s, sb, pid_t, N, H, qk_scale, g,
                     stride_qt, stride_qh, stride_kt, stride_kh, batch_sel_offsets, token_batch, cmp_sel,
                     G: tl.constexpr, HG: tl.constexpr, BLOCK_T: tl.constexpr, TOK_LOOP: tl.constexpr,
                     TT: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_N: tl.constexpr, PREFIX_AGG: tl.constexpr,
                     D: tl.constexpr, BLOCK_D: tl.constexpr, PRECISION: tl.constexpr, FMA_STEP: tl.constexpr,
                     MASKED: tl.constexpr, KEY_ROWS: tl.constexpr):
    """``score [TT, BLOCK_S]`` plus one tile of compressed keys ``c0 ..`` (of the chunk's ``[.., c_hi)``) summed into
    their selection blocks ``sb`` (several compressed keys per selection block; ``a_s, b_s``: each block's key
    range, with ``PREFIX_AGG``). Without ``MASKED``: a whole tile whose keys are in every token's batch element."""
    tt = tl.arange(0, TT)
    d = tl.arange(0, BLOCK_D)
    d_ok = d < D
    cj = c0 + tl.arange(0, BLOCK_N)
    c_ok = cj < c_hi
    if MASKED:
        sel_j = tl.load(cmp_sel + cj, mask=c_ok, other=-1)
        k = tl.load(KC + cj.to(tl.int64)[:, None] * stride_kt + g * stride_kh + d[None, :],
                    mask=c_ok[:, None] & d_ok[None, :], other=0.0)
    else:
        sel_j = tl.load(cmp_sel + cj)
        k = tl.load(KC + cj.to(tl.int64)[:, None] * stride_kt + g * stride_kh + d[None, :], mask=d_ok[None, :],
                    other=0.0)
    if PREFIX_AGG:
        # block s's share of this tile: keys [a, b) of the tile, i.e. run[b - 1] - run[a - 1] with run the
        # inclusive running sum along the tile (run[-1] = 0)
        a = tl.minimum(tl.maximum(a_s - c0, 0), BLOCK_N)
        b = tl.minimum(tl.maximum(b_s - c0, 0), BLOCK_N)
        a_idx = tl.broadcast_to(tl.maximum(a - 1, 0)[None, :], [BLOCK_T, BLOCK_S])
        b_idx = tl.broadcast_to(tl.maximum(b - 1, 0)[None, :], [BLOCK_T, BLOCK_S])
    else:
        member = sel_j[:, None] == sb[None, :]  # compressed -> selection blocks [BLOCK_N, BLOCK_S]
    for ti in tl.static_range(TOK_LOOP):
        psum = _tile_scores(Q, KC, LSE, k, sel_j, c_ok, pid_t * TT + ti * BLOCK_T, N, H, qk_scale, g,
                            stride_qt, stride_qh, batch_sel_offsets, token_batch,
                            G, HG, BLOCK_T, BLOCK_N, D, BLOCK_D, PRECISION, ti % FMA_STEP == FMA_STEP - 1, MASKED,
                            KEY_ROWS)
        if PREFIX_AGG:
            run = tl.cumsum(psum, 1)
            upto_b = tl.where((b > 0)[None, :], tl.gather(run, b_idx, 1), 0.0)
            upto_a = tl.where((a > 0)[None, :], tl.gather(run, a_idx, 1), 0.0)
            agg = upto_b - upto_a  # [BLOCK_T, BLOCK_S]
        else:
            agg = tl.sum(tl.where(member[None, :, :], psum[:, :, None], 0.0), 1)  # [BLOCK_T, BLOCK_S]
        if TOK_LOOP == 1:
            score += agg
        else:
            score += tl.where(tt[:, None] == ti, agg, 0.0)
    return score


@triton.jit
def _chunk_scores(Q, KC, LSE, s0, hi, pid_t, N, H, qk_scale, g, stride_qt, stride_qh, stride_kt, stride_kh,
                  batch_sel_offsets, token_batch, sel_cmp_offsets, cmp_sel,
                  G: tl.constexpr, HG: tl.constexpr, BLOCK_T: tl.constexpr, TOK_LOOP: tl.constexpr,
                  TT: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_N: tl.constexpr, ONE_CMP_PER_SEL: tl.constexpr,
                  PREFIX_AGG: tl.constexpr, D: tl.constexpr, BLOCK_D: tl.constexpr, PRECISION: tl.constexpr,
                  FMA_STEP: tl.constexpr, MASKED: tl.constexpr, KEY_ROWS: tl.constexpr):
    """Scores ``[TT, BLOCK_S]`` of the program's tokens for the selection blocks ``s0 .. s0 + BLOCK_S`` (of the
    batch elements' ``[.., hi)``). Without ``MASKED`` the caller knows all of them to be in every token's batch
    element (``launch`` setting ``whole_tiles``): the keys' tiles run without masks, but for the part-filled last
    tile of compressed keys when selection blocks hold several."""
    tt = tl.arange(0, TT)
    d = tl.arange(0, BLOCK_D)
    d_ok = d < D
    sb = s0 + tl.arange(0, BLOCK_S)
    score = tl.zeros([TT, BLOCK_S], tl.float32)
    if ONE_CMP_PER_SEL:  # compressed key j is selection block j: one tile per chunk
        c_ok = sb < hi
        if MASKED:
            k = tl.load(KC + sb.to(tl.int64)[:, None] * stride_kt + g * stride_kh + d[None, :],
                        mask=c_ok[:, None] & d_ok[None, :], other=0.0)
        else:
            k = tl.load(KC + sb.to(tl.int64)[:, None] * stride_kt + g * stride_kh + d[None, :],
                        mask=d_ok[None, :], other=0.0)
        for ti in tl.static_range(TOK_LOOP):
            psum = _tile_scores(Q, KC, LSE, k, sb, c_ok, pid_t * TT + ti * BLOCK_T, N, H, qk_scale, g,
                                stride_qt, stride_qh, batch_sel_offsets, token_batch,
                                G, HG, BLOCK_T, BLOCK_S, D, BLOCK_D, PRECISION, ti % FMA_STEP == FMA_STEP - 1,
                                MASKED, KEY_ROWS)
            if TOK_LOOP == 1:
                score += psum
            else:
                score += tl.where(tt[:, None] == ti, psum, 0.0)
    else:
        c_lo = tl.load(sel_cmp_offsets + s0)
        c_hi = tl.load(sel_cmp_offsets + tl.minimum(s0 + BLOCK_S, hi))
        sb_ok = sb < hi
        # selection block s owns compressed keys [sel_cmp_offsets[s], sel_cmp_offsets[s + 1])
        a_s = tl.load(sel_cmp_offsets + sb, mask=sb_ok, other=0)
        b_s = tl.load(sel_cmp_offsets + sb + 1, mask=sb_ok, other=0)
        whole_end = c_lo
        if not MASKED:
            whole_end = c_lo + (c_hi - c_lo) // BLOCK_N * BLOCK_N
            for c0 in range(c_lo, whole_end, BLOCK_N):
                score = _aggregated_tile(score, Q, KC, LSE, c0, c_hi, a_s, b_s, sb, pid_t, N, H, qk_scale, g,
                                         stride_qt, stride_qh, stride_kt, stride_kh, batch_sel_offsets,
                                         token_batch, cmp_sel, G, HG, BLOCK_T, TOK_LOOP, TT, BLOCK_S, BLOCK_N,
                                         PREFIX_AGG, D, BLOCK_D, PRECISION, FMA_STEP, False, KEY_ROWS)
        for c0 in range(whole_end, c_hi, BLOCK_N):
            score = _aggregated_tile(score, Q, KC, LSE, c0, c_hi, a_s, b_s, sb, pid_t, N, H, qk_scale, g,
                                     stride_qt, stride_qh, stride_kt, stride_kh, batch_sel_offsets, token_batch,
                                     cmp_sel, G, HG, BLOCK_T, TOK_LOOP, TT, BLOCK_S, BLOCK_N, PREFIX_AGG, D,
                                     BLOCK_D, PRECISION, FMA_STEP, True, KEY_ROWS)
    return score


@triton.jit
def _insert_topk(score, sb, s_lo_t, s_hi_t, top_v, top_i, thr, kcol, TT: tl.constexpr, BLOCK_S: tl.constexpr,
                 K2: tl.constexpr, MASKED: tl.constexpr = True):
    """The running top-k ``(top_v, top_i [TT, K2], thr [TT])`` (``thr``: the K2-th best so far; ``kcol``: the slots
    ``[1, K2]``) updated with the scores ``[TT, BLOCK_S]`` of selection blocks ``sb``, each token's own blocks
    (``[s_lo_t, s_hi_t)``) only; without ``MASKED`` the caller knows every block ``sb`` to be each token's."""
    if MASKED:
        in_batch_t = (sb[None, :] >= s_lo_t[:, None]) & (sb[None, :] < s_hi_t[:, None])
        cand = tl.where(in_batch_t & (score > thr[:, None]), score, float("-inf"))
    else:
        cand = tl.where(score > thr[:, None], score, float("-inf"))
    # threshold insertion: each round, every row moves its best remaining candidate into the slot of its
    # current worst entry, while that candidate beats it
    if tl.max(cand) > float("-inf"):
        cand_i = tl.broadcast_to(sb[None, :], [TT, BLOCK_S])
        while tl.max(cand) > float("-inf"):
            m = tl.max(cand, 1)
            go = m > thr
            mid = tl.min(tl.where(cand == m[:, None], cand_i, 2147483647), 1)
            pos = tl.min(tl.where(top_v == thr[:, None], kcol, K2), 1)
            put = go[:, None] & (kcol == pos[:, None])
            top_v = tl.where(put, m[:, None], top_v)
            top_i = tl.where(put, mid[:, None], top_i)
            thr = tl.min(top_v, 1)
            cand = tl.where(go[:, None] & (cand_i != mid[:, None]) & (cand > thr[:, None]), cand, float("-inf"))
    return top_v, top_i, thr


@triton.jit
def _score_topk_kernel(
    Q, KC, LSE, IDX,
    token_batch, batch_sel_offsets, sel_cmp_offsets, cmp_sel,
    N, H, qk_scale,
    stride_qt, stride_qh, stride_kt, stride_kh,
    G: tl.constexpr, HG: tl.constexpr, BLOCK_T: tl.constexpr, TOK_LOOP: tl.constexpr, TT: tl.constexpr,
    BLOCK_S: tl.constexpr, BLOCK_N: tl.constexpr, ONE_CMP_PER_SEL: tl.constexpr, PREFIX_AGG: tl.constexpr,
    TOPK: tl.constexpr, K2: tl.constexpr,
    D: tl.constexpr, BLOCK_D: tl.constexpr, PRECISION: tl.constexpr, FMA_STEP: tl.constexpr,
    WHOLE_TILES: tl.constexpr = False, KEY_ROWS: tl.constexpr = False,
):
    """A program scores ``TT = TOK_LOOP * BLOCK_T`` tokens: ``TOK_LOOP`` matrix products of ``BLOCK_T`` tokens x ``HG``
    heads (``TOK_LOOP > 1`` only with ``BLOCK_T == 1``) share every tile of compressed keys. Product ``ti`` takes
    its exponentials from :func:`ssa_kernels._common.exp2_fma` when ``ti % FMA_STEP == FMA_STEP - 1`` (the launch
    setting ``fma_exp_every``; a ``FMA_STEP`` above ``TOK_LOOP`` never does). ``WHOLE_TILES`` (launch setting
    ``whole_tiles``): when all the program's tokens are of one batch element, its whole chunks of selection blocks
    run without the per-score batch mask (:func:`_chunk_scores`), in a loop before the one of the masked chunks.
    ``KEY_ROWS`` (launch setting ``key_rows``, one token per product): :func:`_key_row_scores`."""
    pid_t = tl.program_id(0)
    g = tl.program_id(1)
    tt = tl.arange(0, TT)
    t = pid_t * TT + tt
    t_ok = t < N
    s_lo_t, s_hi_t, lo, hi = _batch_ranges(token_batch, batch_sel_offsets, t, t_ok)
    kcol = tl.arange(0, K2)[None, :]
    full_end = lo
    if WHOLE_TILES:
        full_end = _full_tiles_end(s_lo_t, s_hi_t, lo, hi, t_ok, BLOCK_S)

    top_v = tl.full([TT, K2], float("-inf"), tl.float32)
    top_i = tl.full([TT, K2], -1, tl.int32)
    thr = tl.full([TT], float("-inf"), tl.float32)  # the K2-th best so far
    if WHOLE_TILES:  # a loop of its own (not a branch per chunk), so that its loads stay pipelined
        for s0 in range(lo, full_end, BLOCK_S):
            score = _chunk_scores(Q, KC, LSE, s0, hi, pid_t, N, H, qk_scale, g, stride_qt, stride_qh, stride_kt,
                                  stride_kh, batch_sel_offsets, token_batch, sel_cmp_offsets, cmp_sel, G, HG,
                                  BLOCK_T, TOK_LOOP, TT, BLOCK_S, BLOCK_N, ONE_CMP_PER_SEL, PREFIX_AGG, D, BLOCK_D,
                                  PRECISION, FMA_STEP, False, KEY_ROWS)
            top_v, top_i, thr = _insert_topk(score, s0 + tl.arange(0, BLOCK_S), s_lo_t, s_hi_t, top_v, top_i, thr,
                                             kcol, TT, BLOCK_S, K2, False)
    for s0 in range(full_end, hi, BLOCK_S):
        score = _chunk_scores(Q, KC, LSE, s0, hi, pid_t, N, H, qk_scale, g, stride_qt, stride_qh, stride_kt,
                              stride_kh, batch_sel_offsets, token_batch, sel_cmp_offsets, cmp_sel, G, HG,
                              BLOCK_T, TOK_LOOP, TT, BLOCK_S, BLOCK_N, ONE_CMP_PER_SEL, PREFIX_AGG, D, BLOCK_D,
                              PRECISION, FMA_STEP, True, KEY_ROWS)
        top_v, top_i, thr = _insert_topk(score, s0 + tl.arange(0, BLOCK_S), s_lo_t, s_hi_t, top_v, top_i, thr, kcol,
                                         TT, BLOCK_S, K2)
    # write the best TOPK, best first (ties: lower block id first)
    out = IDX + (t.to(tl.int64) * tl.num_programs(1) + g) * TOPK
    for i in tl.static_range(TOPK):
        m = tl.max(top_v, 1)
        mid = tl.min(tl.where(top_v == m[:, None], top_i, 2147483647), 1)
        tl.store(out + i, tl.where(m == float("-inf"), -1, mid), mask=t_ok)
        top_v = tl.where(top_i == mid[:, None], float("-inf"), top_v)
        top_i = tl.where(top_i == mid[:, None], -1, top_i)


def select_blocks_forward(q, k_cmp, lse, layout: BlockLayout, topk: int, scale: float) -> torch.Tensor:
    """Launch the fused scoring + top-k kernel: ``idx [N, Hkv, topk]`` int32."""
    n, hq, dim = q.shape
    hkv = k_cmp.shape[1]
    group = hq // hkv
    if not 1 <= topk <= MAX_TOPK:
        raise ValueError(f"topk must be in [1, {MAX_TOPK}] for the kernels, got {topk}")
    idx = torch.empty(n, hkv, topk, device=q.device, dtype=torch.int32)
    if n == 0:
        return idx
    cfg = config("scoring.SCORE", head_dim=dim, dtype=q.dtype, device=q.device)
    hg = head_split(group, cfg["max_heads"])
    bt = tokens_per_tile(hg, cfg["rows"])
    one = layout.one_cmp_per_sel
    loop = cfg["tokens_per_program" if one else "tokens_per_program_agg"] if bt == 1 else 1
    block_n = cfg["block_n"]
    if cfg["aggregate"] not in AGGREGATE_MODES:
        raise ValueError(f"scoring.SCORE's aggregate must be one of {AGGREGATE_MODES}, got {cfg['aggregate']!r}")
    _score_topk_kernel[(triton.cdiv(n, bt * loop), hkv)](
        q, k_cmp, lse, idx,
        layout.token_batch, layout.batch_sel_offsets, layout.sel_cmp_offsets, layout.cmp_sel,
        n, hq, scale * LOG2E,
        q.stride(0), q.stride(1), k_cmp.stride(0), k_cmp.stride(1),
        G=group, HG=hg, BLOCK_T=bt, TOK_LOOP=loop, TT=bt * loop, BLOCK_S=block_n if one else cfg["block_s"],
        BLOCK_N=block_n, ONE_CMP_PER_SEL=one, PREFIX_AGG=cfg["aggregate"] == "prefix", TOPK=topk,
        K2=triton.next_power_of_2(topk), D=dim, BLOCK_D=block_d(dim), PRECISION=dot_precision(q.dtype),
        FMA_STEP=fma_every(cfg, q.dtype) or NO_FMA_STEP, WHOLE_TILES=bool(cfg["whole_tiles"]),
        KEY_ROWS=bool(cfg["key_rows"]) and bt == 1,
        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
    )
    return idx
