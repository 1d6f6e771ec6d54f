"""Block scoring fused with the GQA head sum, the aggregation into selection blocks and the top-k.

``q [N, Hq, D]``, ``k_cmp [Nc, Hkv, D]``, ``lse [N, Hq]`` (the compression branch's log-sum-exp) ->
``idx [N, Hkv, topk]`` int32: for each query token and kv head, the selection blocks with the highest scores

    score[t, g, b] = sum_{h in group g} sum_{j in b} exp(q[t,h] . k_cmp[j,g] * scale - lse[t,h]),

best first, ``-1`` where the token's batch element has fewer than ``topk`` blocks. Ties go to the lower block id.

One program takes ``BLOCK_T`` tokens and all ``G`` query heads of one kv group, walks the selection blocks of its
tokens' batch elements in chunks of ``BLOCK_S`` (their compressed keys are contiguous in layout order), sums the
probabilities over heads and over the compressed keys of each selection block, and merges the chunk into a
running top-k kept in registers. No ``[N, Nc]`` score tensor ever exists; memory is O(N * topk).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import LOG2E, MAX_TOPK, block_d, dot_precision, head_split
from .layout import BlockLayout

LOG2E_C = tl.constexpr(LOG2E)
#: Query rows (tokens x heads of the group) per program.
SCORE_ROWS = 128
#: Query heads of one group per matrix product.
SCORE_MAX_HEADS = 16
#: Selection blocks per chunk when each holds one compressed key (m_cmp == m_slc).
SCORE_BLOCK_S = 64
#: Otherwise: selection blocks per chunk and compressed keys per inner step.
SCORE_AGG_BLOCK_S = 16
SCORE_AGG_BLOCK_N = 32


@triton.jit
def _merge_topk(top_v, top_i, cand_v, cand_i, K2: tl.constexpr):
    """Merge candidates ``[T, S]`` into a running top-``K2`` ``[T, K2]`` (both sorted output, best first).

    Values are scores (>= 0) or -inf for nothing; ids are unique within a row. Ties prefer the running list
    (lower block ids, which were visited first), then the lower candidate id.
    """
    col = tl.arange(0, K2)[None, :]
    new_v = tl.full(top_v.shape, float("-inf"), tl.float32)
    new_i = tl.full(top_i.shape, -1, tl.int32)
    for i in tl.static_range(K2):
        mc = tl.max(cand_v, 1)
        mr = tl.max(top_v, 1)
        take_c = mc > mr
        ic = tl.min(tl.where(cand_v == mc[:, None], cand_i, 2147483647), 1)
        ir = tl.min(tl.where(top_v == mr[:, None], top_i, 2147483647), 1)
        best = tl.where(take_c, mc, mr)
        bid = tl.where(take_c, ic, ir)
        bid = tl.where(best == float("-inf"), -1, bid)
        new_v = tl.where(col == i, best[:, None], new_v)
        new_i = tl.where(col == i, bid[:, None], new_i)
        cand_v = tl.where(take_c[:, None] & (cand_i == ic[:, None]), float("-inf"), cand_v)
        top_v = tl.where((~take_c)[:, None] & (top_i == ir[:, None]), float("-inf"), top_v)
    return new_v, new_i


@triton.jit
def _score_topk_kernel(
    Q, KC, LSE, IDX,
    token_batch, batch_sel_offsets, sel_cmp_offsets, cmp_sel,
    N, H, qk_scale,
    stride_qt, stride_qh, stride_kt, stride_kh,
    G: tl.constexpr, HG: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_N: tl.constexpr,
    TOPK: tl.constexpr, K2: tl.constexpr, ONE_CMP_PER_SEL: tl.constexpr,
    D: tl.constexpr, BLOCK_D: tl.constexpr, PRECISION: tl.constexpr,
):
    pid_t = tl.program_id(0)
    g = tl.program_id(1)
    # token-level vectors [BLOCK_T]
    t = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
    t_ok = t < N
    tb = tl.load(token_batch + t, mask=t_ok, other=0)
    s_lo_t = tl.load(batch_sel_offsets + tb, mask=t_ok, other=0)
    s_hi_t = tl.load(batch_sel_offsets + tb + 1, mask=t_ok, other=0)
    lo = tl.min(tl.where(t_ok, s_lo_t, 2147483647))
    hi = tl.max(s_hi_t)
    # row-level vectors [BLOCK_T * HG] for each head sub-group
    r = tl.arange(0, BLOCK_T * HG)
    tok = pid_t * BLOCK_T + r // HG
    row_ok = tok < N
    tok64 = tok.to(tl.int64)
    rb = tl.load(token_batch + tok, mask=row_ok, other=0)
    s_lo_r = tl.load(batch_sel_offsets + rb, mask=row_ok, other=0)
    s_hi_r = tl.load(batch_sel_offsets + rb + 1, mask=row_ok, other=0)
    d = tl.arange(0, BLOCK_D)
    d_ok = d < D

    top_v = tl.full([BLOCK_T, K2], float("-inf"), tl.float32)
    top_i = tl.full([BLOCK_T, K2], -1, tl.int32)
    for s0 in range(lo, hi, BLOCK_S):
        sb = s0 + tl.arange(0, BLOCK_S)
        score = tl.zeros([BLOCK_T, BLOCK_S], tl.float32)
        if ONE_CMP_PER_SEL:
            # compressed key j is selection block j
            k = tl.load(KC + sb.to(tl.int64)[:, None] * stride_kt + g * stride_kh + d[None, :],
                        mask=(sb < hi)[:, None] & d_ok[None, :], other=0.0)
            valid = (sb[None, :] >= s_lo_r[:, None]) & (sb[None, :] < s_hi_r[:, None])
            for hs in tl.static_range(G // HG):
                head = g * G + hs * HG + r % HG
                q = tl.load(Q + tok64[:, None] * stride_qt + head[:, None] * stride_qh + d[None, :],
                            mask=row_ok[:, None] & d_ok[None, :], other=0.0)
                lse2 = tl.load(LSE + tok64 * H + head, mask=row_ok, other=0.0) * LOG2E_C
                s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale
                p = tl.where(valid, tl.exp2(s - lse2[:, None]), 0.0)
                score += tl.sum(tl.reshape(p, [BLOCK_T, HG, BLOCK_S]), 1)
        else:
            s_end = tl.minimum(s0 + BLOCK_S, hi)
            c_lo = tl.load(sel_cmp_offsets + s0)
            c_hi = tl.load(sel_cmp_offsets + s_end)
            for c0 in range(c_lo, c_hi, BLOCK_N):
                cj = c0 + tl.arange(0, BLOCK_N)
                c_ok = cj < c_hi
                sel_j = tl.load(cmp_sel + cj, mask=c_ok, other=-1)
                k = tl.load(KC + cj.to(tl.int64)[:, None] * stride_kt + g * stride_kh + d[None, :],
                            mask=c_ok[:, None] & d_ok[None, :], other=0.0)
                valid = (sel_j[None, :] >= s_lo_r[:, None]) & (sel_j[None, :] < s_hi_r[:, None])
                pt = tl.zeros([BLOCK_T, BLOCK_N], tl.float32)
                for hs in tl.static_range(G // HG):
                    head = g * G + hs * HG + r % HG
                    q = tl.load(Q + tok64[:, None] * stride_qt + head[:, None] * stride_qh + d[None, :],
                                mask=row_ok[:, None] & d_ok[None, :], other=0.0)
                    lse2 = tl.load(LSE + tok64 * H + head, mask=row_ok, other=0.0) * LOG2E_C
                    s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale
                    p = tl.where(valid, tl.exp2(s - lse2[:, None]), 0.0)
                    pt += tl.sum(tl.reshape(p, [BLOCK_T, HG, BLOCK_N]), 1)
                # compressed keys -> selection blocks of this chunk (exact fp32 sum)
                onehot = (sel_j[:, None] == sb[None, :]).to(tl.float32)
                if BLOCK_T >= 16:
                    score += tl.dot(pt, onehot, input_precision="ieee")
                else:
                    score += tl.sum(pt[:, :, None] * onehot[None, :, :], 1)
        in_batch = (sb[None, :] >= s_lo_t[:, None]) & (sb[None, :] < s_hi_t[:, None])
        cand = tl.where(in_batch, score, float("-inf"))
        worst = tl.min(top_v, 1)
        if tl.max((tl.max(cand, 1) > worst).to(tl.int32)) > 0:
            cand_i = tl.broadcast_to(sb[None, :], [BLOCK_T, BLOCK_S])
            top_v, top_i = _merge_topk(top_v, top_i, cand, cand_i, K2)
    kk = tl.arange(0, K2)
    out = IDX + (t.to(tl.int64)[:, None] * tl.num_programs(1) + g) * TOPK + kk[None, :]
    tl.store(out, top_i, mask=t_ok[:, None] & (kk[None, :] < TOPK))


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
    hg = head_split(group, SCORE_MAX_HEADS)
    bt = SCORE_ROWS // hg
    one_per_sel = layout.one_cmp_per_sel
    block_s, block_n = (SCORE_BLOCK_S, SCORE_BLOCK_S) if one_per_sel else (SCORE_AGG_BLOCK_S, SCORE_AGG_BLOCK_N)
    _score_topk_kernel[(triton.cdiv(n, bt), hkv)](
        q, k_cmp, lse, idx,
        layout.token_batch, layout.batch_sel_offsets, layout.sel_cmp_offsets, layout.cmp_sel,
        n, hq, scale * LOG2E,
        q.stride(0), q.stride(1), k_cmp.stride(0), k_cmp.stride(1),
        G=group, HG=hg, BLOCK_T=bt, BLOCK_S=block_s, BLOCK_N=block_n,
        TOPK=topk, K2=triton.next_power_of_2(topk), ONE_CMP_PER_SEL=one_per_sel,
        D=dim, BLOCK_D=block_d(dim), PRECISION=dot_precision(q.dtype),
    )
    return idx
