"""Dense, obviously-correct Spatial Sparse Attention in plain PyTorch: the oracle of every kernel test.

Every branch builds explicit masks from the coordinates and runs a masked softmax over all tokens of
one batch element at a time. Nothing here is fast; run it in float64 for tests.

Shapes: ``q [N, Hq, D]``, ``k, v [N, Hkv, D]``, ``k_cmp, v_cmp [Nc, Hkv, D]``, ``gate [N, 3]``,
``coords [N, 4]`` integer (batch, x, y, z) in layout order (see :mod:`reference.layout`).
Query head ``h`` uses kv head ``h // (Hq // Hkv)``.
"""
from __future__ import annotations

import torch

from .checks import check_args, check_inputs, resolve_scale
from .layout import check_layout_order

__all__ = [
    "block_ids",
    "compression_attention",
    "block_scores",
    "select_blocks",
    "selection_attention",
    "window_attention",
    "spatial_sparse_attention",
]


def block_ids(coords: torch.Tensor, block: int, shift: int = 0) -> torch.Tensor:
    """Id ``[N] int64`` of each token's block ``(batch, (xyz + shift) // block)``, numbered in order of first appearance."""
    coords = coords.long()
    key = torch.cat([coords[:, :1], torch.div(coords[:, 1:] + shift, block, rounding_mode="floor")], dim=1)
    uniq, inverse = torch.unique(key, dim=0, return_inverse=True)
    n = coords.shape[0]
    first = torch.full((uniq.shape[0],), n, dtype=torch.long, device=coords.device)
    first.scatter_reduce_(0, inverse, torch.arange(n, device=coords.device), reduce="amin")
    rank = torch.empty_like(first)
    rank[torch.argsort(first)] = torch.arange(first.numel(), device=coords.device)
    return rank[inverse]


def _expand_kv(x: torch.Tensor, hq: int) -> torch.Tensor:
    """``[M, Hkv, D] -> [M, Hq, D]``: kv head g serves query heads g*G .. g*G+G-1."""
    return x.repeat_interleave(hq // x.shape[1], dim=1)


def _masked_attention(q, k, v, allowed, scale):
    """``q [T, H, D]``, ``k, v [S, H, D]``, ``allowed [T, H, S]`` bool -> ``(o [T, H, D], lse [T, H])``.

    Rows with no allowed key give a zero output and ``lse = -inf``.
    """
    s = torch.einsum("thd,shd->ths", q, k) * scale
    s = s.masked_fill(~allowed, float("-inf"))
    lse = torch.logsumexp(s, dim=-1)
    p = torch.exp(s - lse.unsqueeze(-1).masked_fill(torch.isinf(lse).unsqueeze(-1), 0.0))
    p = p.masked_fill(~allowed, 0.0)
    return torch.einsum("ths,shd->thd", p, v), lse


#: Queries per chunk in the selection and window branches: the masks are [chunk, Hq, tokens of the batch element].
QUERY_CHUNK = 512


def _chunked_masked_attention(q, k, v, allowed_fn, scale):
    """:func:`_masked_attention` over query chunks (``allowed_fn(rows) -> [len(rows), H, S]``), recomputing each
    chunk in the backward pass, so that 10^4-10^5 tokens fit in memory in float64."""
    from torch.utils.checkpoint import checkpoint

    outs, lses = [], []
    for c0 in range(0, q.shape[0], QUERY_CHUNK):
        rows = torch.arange(c0, min(c0 + QUERY_CHUNK, q.shape[0]), device=q.device)

        def run(qc, k_, v_, rows=rows):
            return _masked_attention(qc, k_, v_, allowed_fn(rows), scale)

        if torch.is_grad_enabled() and q.shape[0] > QUERY_CHUNK:
            o, lse = checkpoint(run, q[rows], k, v, use_reentrant=False)
        else:
            o, lse = run(q[rows], k, v)
        outs.append(o)
        lses.append(lse)
    return torch.cat(outs), torch.cat(lses)


def _batches(coords):
    """(batch value, token indices) for each non-empty batch element."""
    b = coords[:, 0].long()
    for bb in torch.unique(b).tolist():
        yield bb, torch.nonzero(b == bb).squeeze(1)


def _cmp_rows(coords, compression_block):
    """Compression-block id of every token, and the batch value of every compression block."""
    cid = block_ids(coords, compression_block)
    nc = int(cid.max()) + 1 if cid.numel() else 0
    cmp_batch = torch.empty(nc, dtype=torch.long, device=coords.device)
    cmp_batch[cid] = coords[:, 0].long()
    return cid, cmp_batch


def compression_attention(q, k_cmp, v_cmp, coords, *, compression_block, scale=None):
    """Branch 1: each query attends over all compressed keys of its batch element.

    Returns ``(o_cmp [N, Hq, D], lse [N, Hq])`` (natural-log log-sum-exp of the scaled scores).
    """
    n, hq, d = q.shape
    scale = resolve_scale(scale, d)
    cid, cmp_batch = _cmp_rows(coords, compression_block)
    if k_cmp.shape[0] != cmp_batch.numel():
        raise ValueError(f"k_cmp has {k_cmp.shape[0]} rows but the coordinates have {cmp_batch.numel()} compression blocks")
    o = q.new_zeros(n, hq, d)
    lse = q.new_full((n, hq), float("-inf"))
    for bb, tok in _batches(coords):
        rows = torch.nonzero(cmp_batch == bb).squeeze(1)
        kc, vc = _expand_kv(k_cmp[rows], hq), _expand_kv(v_cmp[rows], hq)
        allowed = torch.ones(tok.numel(), hq, rows.numel(), dtype=torch.bool, device=q.device)
        o[tok], lse[tok] = _masked_attention(q[tok], kc, vc, allowed, scale)
    return o, lse


@torch.no_grad()
def block_scores(q, k_cmp, lse, coords, *, compression_block, selection_block, num_kv_heads=None, scale=None):
    """Selection scores ``[N, Hkv, S]`` of every selection block (first-appearance numbering, ``S`` blocks in all).

    ``score[t, g, b] = sum_{h in group g} sum_{j in b} exp(q[t,h] . k_cmp[j,g] * scale - lse[t,h])``;
    blocks of other batch elements score ``-inf``. No gradient flows through the scores.
    """
    n, hq, d = q.shape
    hkv = k_cmp.shape[1] if num_kv_heads is None else num_kv_heads
    scale = resolve_scale(scale, d)
    cid, cmp_batch = _cmp_rows(coords, compression_block)
    sid = block_ids(coords, selection_block)
    ns = int(sid.max()) + 1 if sid.numel() else 0
    cmp_sel = torch.empty(cmp_batch.numel(), dtype=torch.long, device=q.device)
    cmp_sel[cid] = sid
    sel_batch = torch.empty(ns, dtype=torch.long, device=q.device)
    sel_batch[sid] = coords[:, 0].long()
    scores = q.new_full((n, hkv, ns), float("-inf"))
    for bb, tok in _batches(coords):
        rows = torch.nonzero(cmp_batch == bb).squeeze(1)
        s = torch.einsum("thd,jhd->thj", q[tok], _expand_kv(k_cmp[rows], hq)) * scale
        p = torch.exp(s - lse[tok].unsqueeze(-1))  # [T, Hq, nc]
        p = p.reshape(tok.numel(), hkv, hq // hkv, rows.numel()).sum(2)  # GQA head sum -> [T, Hkv, nc]
        sel = torch.zeros(tok.numel(), hkv, ns, dtype=q.dtype, device=q.device)
        sel.index_add_(2, cmp_sel[rows], p)  # compression blocks -> selection blocks
        in_batch = sel_batch == bb
        scores[tok] = torch.where(in_batch, sel, torch.full_like(sel, float("-inf")))
    return scores


@torch.no_grad()
def select_blocks(scores, topk):
    """Indices ``[N, Hkv, topk]`` of the ``topk`` best-scoring blocks of each query's batch element, best first;
    ``-1`` where the batch element has fewer than ``topk`` blocks."""
    n, hkv, ns = scores.shape
    k = min(topk, ns)
    val, idx = torch.topk(scores, k, dim=-1) if k > 0 else (scores[..., :0], scores[..., :0].long())
    idx = torch.where(torch.isinf(val) & (val < 0), torch.full_like(idx, -1), idx)
    out = torch.full((n, hkv, topk), -1, dtype=torch.long, device=scores.device)
    out[..., :k] = idx
    return out


def selection_attention(q, k, v, block_idx, coords, *, selection_block, scale=None, return_lse=False):
    """Branch 2 given the choice: query ``t`` head ``h`` attends, with one softmax, over every token of the
    selection blocks ``block_idx[t, h // G]`` (first-appearance numbering; ``-1`` entries are ignored).

    ``block_idx [N, Hkv, topk]`` -> ``o_sel [N, Hq, D]`` (and ``lse [N, Hq]`` with ``return_lse``).
    """
    n, hq, d = q.shape
    hkv = k.shape[1]
    scale = resolve_scale(scale, d)
    sid = block_ids(coords, selection_block)
    o = q.new_zeros(n, hq, d)
    lse = q.new_full((n, hq), float("-inf"))
    for _, tok in _batches(coords):
        chosen = block_idx[tok].long()  # [T, Hkv, topk]
        key_block = sid[tok]

        def allowed(rows, chosen=chosen, key_block=key_block):
            c = chosen[rows].unsqueeze(-1)  # [R, Hkv, topk, 1]
            member = ((key_block.view(1, 1, 1, -1) == c) & (c >= 0)).any(2)  # [R, Hkv, S]
            return member.repeat_interleave(hq // hkv, dim=1)  # [R, Hq, S]

        o[tok], lse[tok] = _chunked_masked_attention(q[tok], _expand_kv(k[tok], hq), _expand_kv(v[tok], hq), allowed,
                                                     scale)
    return (o, lse) if return_lse else o


def window_attention(q, k, v, coords, *, window, shift, scale=None):
    """Branch 3: query ``t`` attends over every token of its window ``(batch, (xyz + shift) // window)``."""
    n, hq, d = q.shape
    scale = resolve_scale(scale, d)
    wid = block_ids(coords, window, shift)
    o = q.new_zeros(n, hq, d)
    for _, tok in _batches(coords):
        w = wid[tok]

        def allowed(rows, w=w):
            return (w[rows].view(-1, 1) == w.view(1, -1)).unsqueeze(1).expand(-1, hq, -1)

        o[tok], _ = _chunked_masked_attention(q[tok], _expand_kv(k[tok], hq), _expand_kv(v[tok], hq), allowed, scale)
    return o


def spatial_sparse_attention(
    q,
    k,
    v,
    k_cmp,
    v_cmp,
    gate,
    coords,
    *,
    compression_block,
    selection_block,
    topk,
    window,
    shift,
    scale=None,
    return_branches=False,
    block_idx=None,
):
    """The whole SSA operation (docs/ssa.md): ``o = gate0 * o_cmp + gate1 * o_sel + gate2 * o_win``.

    Returns ``o [N, Hq, D]``, or ``(o, (o_cmp, o_sel, o_win))`` with ``return_branches=True``.
    Gradients flow to q, k, v, k_cmp, v_cmp and gate; not through the block scores or the choice.
    ``block_idx [N, Hkv, topk]``, when given, replaces the computed choice (to test kernels whose low-precision
    scores may order near-tied blocks differently).
    """
    if not isinstance(coords, torch.Tensor):
        raise TypeError(f"coords must be a torch.Tensor, got {type(coords).__name__}")
    check_layout_order(coords, compression_block=compression_block, selection_block=selection_block)
    check_inputs(q, k, v, k_cmp, v_cmp, gate, num_tokens=coords.shape[0])
    if coords.device != q.device:
        raise ValueError(f"coords is on {coords.device} but q is on {q.device}")
    check_args(topk, window, shift)
    scale = resolve_scale(scale, q.shape[2])

    o_cmp, lse = compression_attention(q, k_cmp, v_cmp, coords, compression_block=compression_block, scale=scale)
    scores = block_scores(
        q, k_cmp, lse, coords, compression_block=compression_block, selection_block=selection_block, scale=scale
    )
    chosen = select_blocks(scores, topk) if block_idx is None else block_idx.long()
    o_sel = selection_attention(q, k, v, chosen, coords, selection_block=selection_block, scale=scale)
    o_win = window_attention(q, k, v, coords, window=window, shift=shift, scale=scale)
    g = gate.unsqueeze(-1)
    o = g[:, 0:1] * o_cmp + g[:, 1:2] * o_sel + g[:, 2:3] * o_win
    return (o, (o_cmp, o_sel, o_win)) if return_branches else o
