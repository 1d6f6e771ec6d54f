"""Key-outer selection forward and dQ (launch setting ``key_outer`` of ``selection.FWD`` / ``selection.DQ``; the
query-outer kernels and the dK/dV are in :mod:`ssa_kernels.selection`, which calls these).

A program of the key-outer forward takes one selection block and up to ``BLOCK_T`` of the query tokens that chose
it (the block -> queries index, :mod:`ssa_kernels.block_index`), so the block's keys are read once per ``BLOCK_T``
tokens instead of once per token, and every row of the matrix products is a row that chose the block (no masked
work). Each (query, block) pair yields a partial softmax (its output
normalised by its own sum, its running max and sum) at the pair's place in the index; a second kernel merges each
query's ``topk`` partials in slot order (deterministic, no atomics). The partials take
``tokens x Hkv x topk x G x D`` values of q's dtype; queries are taken in chunks so that they stay under the
setting ``scratch_bytes``. dQ has the same key-outer variant (``key_outer`` of ``selection.DQ``): float32 partial
dQ per (query, block) pair, summed per query in slot order. Both pay where a kv group has few query heads (head
dims 64 and 128 of the benchmark: a query-outer tile of 16 rows holds 2-4 tokens there, masked on most blocks);
at 16 heads per kv group the query-outer kernels stay faster (reports/kernels.md).

The work items come from :func:`ssa_kernels.block_index.split_buckets`: one per chunk of ``BLOCK_T`` queries of a
bucket (kv head, selection block). Each item is a few key tiles behind a chain of dependent loads (its bucket, the
chunk's start, the index entries, the tokens, then the queries), so with the launch setting ``ko_persistent``
(k > 0) k programs per multiprocessor loop over the items and load the next item's entries and query rows before
working on the current one, keeping those loads in flight behind its key tiles.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import (
    LOG2E,
    _dq_step,
    _dq_store,
    _grad_query_rows,
    _load_kv,
    _load_rows,
    _online_softmax_step,
    _row_tokens_heads,
    _softmax_start,
    _softmax_store,
    block_d,
    dot_precision,
    group_tiling,
)
from .block_index import block_query_index, split_buckets
from .layout import BlockLayout

__all__ = ["INTERPRETER_MULTIPROCESSORS", "selection_dq_key_outer", "selection_forward_key_outer"]

#: Multiprocessors a CPU run (Triton interpreter) counts for the launch setting ``ko_persistent``: a few, so that
#: the persistent programs of a small test take several work items each.
INTERPRETER_MULTIPROCESSORS = 2


@triton.jit
def _ko_item(item, n_items, item_bucket, item_start, csr_offsets, csr_tokens, sel_offsets, S, NB, t0,
             G: tl.constexpr, HG: tl.constexpr, BLOCK_T: tl.constexpr):
    """Work item ``item`` of the key-outer kernels: ``(e, row_ok, hh, g, start, end, tok64)``, its rows' index
    entries, which of them are its own, their heads within the group (head slice ``program_id(1)``), the kv head,
    the block's keys ``[start, end)`` and the rows' tokens. Work item i is chunk ``i - item_start[bucket]`` of
    bucket ``item_bucket[i]`` (kv head g, selection block b; ``bucket = g * S + b``), the chunk's queries
    ``csr_tokens[e]`` (relative to token ``t0``) for ``e`` in ``csr_offsets[bucket] + chunk * BLOCK_T ..``. An item
    with nothing to do (``item >= n_items``, bucket ``NB``, no queries left) has no rows and no keys."""
    bucket = tl.load(item_bucket + item, mask=item < n_items, other=NB)
    live = bucket < NB
    bucket = tl.where(live, bucket, 0)
    chunk = item - tl.load(item_start + bucket)
    blk = bucket % S
    g = bucket // S
    e_lo = tl.load(csr_offsets + bucket) + chunk * BLOCK_T
    e_hi = tl.minimum(tl.load(csr_offsets + bucket + 1), e_lo + BLOCK_T)
    r = tl.arange(0, BLOCK_T * HG)
    e = e_lo + r // HG
    row_ok = (e < e_hi) & live
    hh = tl.program_id(1) * HG + r % HG
    tok64 = (tl.load(csr_tokens + e, mask=row_ok, other=0) + t0).to(tl.int64)
    start = tl.load(sel_offsets + blk)
    end = tl.where(live & (e_lo < e_hi), tl.load(sel_offsets + blk + 1), start)
    return e, row_ok, hh, g, start, end, tok64


@triton.jit
def _ko_fwd_rows(Q, item, n_items, item_bucket, item_start, csr_offsets, csr_tokens, sel_offsets, S, NB, t0,
                 stride_qt, stride_qh, G: tl.constexpr, HG: tl.constexpr, BLOCK_T: tl.constexpr, D: tl.constexpr,
                 BLOCK_D: tl.constexpr):
    """:func:`_ko_item` and the item's query rows ``q [BLOCK_T * HG, BLOCK_D]`` (in place of the tokens)."""
    e, row_ok, hh, g, start, end, tok64 = _ko_item(item, n_items, item_bucket, item_start, csr_offsets, csr_tokens,
                                                   sel_offsets, S, NB, t0, G, HG, BLOCK_T)
    d = tl.arange(0, BLOCK_D)
    q = _load_rows(Q, tok64, g * G + hh, d, stride_qt, stride_qh, row_ok[:, None] & (d < D)[None, :])
    return e, row_ok, hh, g, start, end, q


@triton.jit
def _ko_fwd_run(K, V, OP, MP, LP, e, row_ok, hh, g, start, end, q, qk_scale, stride_kt, stride_kh,
                G: tl.constexpr, HG: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_N: tl.constexpr, D: tl.constexpr,
                BLOCK_D: tl.constexpr, PRECISION: tl.constexpr):
    """One forward work item: the online softmax of its rows over keys ``[start, end)`` and its partials' store."""
    d = tl.arange(0, BLOCK_D)
    d_ok = d < D
    m, l, acc = _softmax_start(BLOCK_T * HG, BLOCK_D)
    for ks in range(start, end, BLOCK_N):
        n = ks + tl.arange(0, BLOCK_N)
        n_ok = n < end
        k, v = _load_kv(K, V, n.to(tl.int64), g, d, stride_kt, stride_kh, n_ok[:, None] & d_ok[None, :])
        m, l, acc = _online_softmax_step(m, l, acc, q, k, v, row_ok[:, None] & n_ok[None, :], qk_scale, PRECISION)
    prow = e.to(tl.int64) * G + hh
    o = acc / tl.where(l > 0, l, 1.0)[:, None]
    tl.store(OP + prow[:, None] * D + d[None, :], o.to(OP.dtype.element_ty), mask=row_ok[:, None] & d_ok[None, :])
    tl.store(MP + prow, m, mask=row_ok)
    tl.store(LP + prow, l, mask=row_ok)


@triton.jit
def _sel_fwd_ko_kernel(
    Q, K, V, OP, MP, LP, sel_offsets, csr_offsets, csr_tokens, item_bucket, item_start,
    S, NB, n_items, H, t0, qk_scale,
    stride_qt, stride_qh, stride_kt, stride_kh,
    G: tl.constexpr, HG: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_N: tl.constexpr,
    D: tl.constexpr, BLOCK_D: tl.constexpr, PRECISION: tl.constexpr, PERSISTENT: tl.constexpr,
):
    """Key-outer forward, work item ``program_id(0)`` (:func:`_ko_item`): up to ``BLOCK_T`` queries of one bucket
    x ``HG`` heads over all keys of its block. Row ``e * G + h`` (h: head within the group) of the partials
    ``OP [E * G, D]`` (q's dtype), ``MP, LP [E * G]`` float32 receives the pair's output normalised by its own sum,
    its running max (log2 domain) and its sum. ``PERSISTENT``: work items ``program_id(0), + num_programs(0), ..``
    of the ``n_items``, each next one's rows loaded before the current one's keys (module docstring)."""
    pid = tl.program_id(0)
    e, row_ok, hh, g, start, end, q = _ko_fwd_rows(Q, pid, n_items, item_bucket, item_start, csr_offsets, csr_tokens,
                                                   sel_offsets, S, NB, t0, stride_qt, stride_qh, G, HG, BLOCK_T, D,
                                                   BLOCK_D)
    if PERSISTENT:
        step = tl.num_programs(0)
        for item in range(pid, n_items, step):
            e2, row_ok2, hh2, g2, start2, end2, q2 = _ko_fwd_rows(
                Q, item + step, n_items, item_bucket, item_start, csr_offsets, csr_tokens, sel_offsets, S, NB, t0,
                stride_qt, stride_qh, G, HG, BLOCK_T, D, BLOCK_D)
            _ko_fwd_run(K, V, OP, MP, LP, e, row_ok, hh, g, start, end, q, qk_scale, stride_kt, stride_kh, G, HG,
                        BLOCK_T, BLOCK_N, D, BLOCK_D, PRECISION)
            e, row_ok, hh, g, start, end, q = e2, row_ok2, hh2, g2, start2, end2, q2
    else:
        _ko_fwd_run(K, V, OP, MP, LP, e, row_ok, hh, g, start, end, q, qk_scale, stride_kt, stride_kh, G, HG,
                    BLOCK_T, BLOCK_N, D, BLOCK_D, PRECISION)


@triton.jit
def _sel_merge_kernel(
    OP, MP, LP, POS, O, LSE,
    n_chunk, H, t0,
    stride_ot, stride_oh,
    G: tl.constexpr, HG: tl.constexpr, BLOCK_T: tl.constexpr, TOPK: tl.constexpr,
    D: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """Merges the key-outer partials of ``BLOCK_T`` tokens (chunk tokens ``program_id(0) * BLOCK_T ..``, i.e.
    tokens ``t0 + ..``) x ``HG`` heads of one kv group: ``POS [n_chunk, Hkv, TOPK]`` int32 holds the index
    position of each (token, kv head, slot) choice (-1 = none), whose partial is row ``POS * G + h``. The slots
    are merged in order, as one online softmax over their (max, sum, output) triples; then ``o`` and ``lse`` are
    stored as :func:`ssa_kernels.selection._sel_fwd_kernel` stores them."""
    tok, head, row_ok, g = _row_tokens_heads(tl.program_id(0), tl.program_id(1), n_chunk, G, HG, BLOCK_T)
    hkv = H // G
    hh = head - g * G
    d = tl.arange(0, BLOCK_D)
    d_ok = d < D
    m, l, acc = _softmax_start(BLOCK_T * HG, BLOCK_D)
    for slot in range(TOPK):
        pos = tl.load(POS + (tok.to(tl.int64) * hkv + g) * TOPK + slot, mask=row_ok, other=-1)
        ok = pos >= 0
        prow = pos.to(tl.int64) * G + hh
        m_i = tl.load(MP + prow, mask=ok, other=float("-inf"))
        l_i = tl.load(LP + prow, mask=ok, other=0.0)
        o_i = tl.load(OP + prow[:, None] * D + d[None, :], mask=ok[:, None] & d_ok[None, :], other=0.0)
        m_new = tl.maximum(m, m_i)
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp2(m - m_safe)
        w = l_i * tl.exp2(m_i - m_safe)
        l = l * alpha + w
        acc = acc * alpha[:, None] + w[:, None] * o_i.to(tl.float32)
        m = m_new
    tok64 = (tok + t0).to(tl.int64)
    _softmax_store(O, LSE, m, l, acc, tok64, head, d, H, stride_ot, stride_oh, row_ok, row_ok[:, None] & d_ok[None, :])


@triton.jit
def _ko_dq_rows(Q, DO, LSE2, DELTA, item, n_items, item_bucket, item_start, csr_offsets, csr_tokens, sel_offsets, S,
                NB, H, t0, stride_qt, stride_qh, stride_dt, stride_dh, G: tl.constexpr, HG: tl.constexpr,
                BLOCK_T: tl.constexpr, D: tl.constexpr, BLOCK_D: tl.constexpr):
    """:func:`_ko_item` and the item's rows of q, dO ``[BLOCK_T * HG, BLOCK_D]``, lse2 and delta (in place of the
    tokens)."""
    e, row_ok, hh, g, start, end, tok64 = _ko_item(item, n_items, item_bucket, item_start, csr_offsets, csr_tokens,
                                                   sel_offsets, S, NB, t0, G, HG, BLOCK_T)
    d = tl.arange(0, BLOCK_D)
    q, do, lse2, delta = _grad_query_rows(Q, DO, LSE2, DELTA, tok64, g * G + hh, d, H, stride_qt, stride_qh,
                                          stride_dt, stride_dh, row_ok, row_ok[:, None] & (d < D)[None, :])
    return e, row_ok, hh, g, start, end, q, do, lse2, delta


@triton.jit
def _ko_dq_run(K, V, DP, e, row_ok, hh, g, start, end, q, do, lse2, delta, qk_scale, stride_kt, stride_kh,
               G: tl.constexpr, HG: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_N: tl.constexpr, D: tl.constexpr,
               BLOCK_D: tl.constexpr, PRECISION: tl.constexpr):
    """One dQ work item: its rows' unscaled dQ over keys ``[start, end)`` and its partials' store."""
    d = tl.arange(0, BLOCK_D)
    d_ok = d < D
    dq = tl.zeros([BLOCK_T * HG, BLOCK_D], tl.float32)
    for ks in range(start, end, BLOCK_N):
        n = ks + tl.arange(0, BLOCK_N)
        n_ok = n < end
        k, v = _load_kv(K, V, n.to(tl.int64), g, d, stride_kt, stride_kh, n_ok[:, None] & d_ok[None, :])
        dq = _dq_step(dq, q, k, v, do, lse2, delta, row_ok[:, None] & n_ok[None, :], qk_scale, PRECISION, True)
    prow = e.to(tl.int64) * G + hh
    tl.store(DP + prow[:, None] * D + d[None, :], dq, mask=row_ok[:, None] & d_ok[None, :])


@triton.jit
def _sel_bwd_dq_ko_kernel(
    Q, K, V, DO, LSE2, DELTA, DP, sel_offsets, csr_offsets, csr_tokens, item_bucket, item_start,
    S, NB, n_items, H, t0, qk_scale,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_dt, stride_dh,
    G: tl.constexpr, HG: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_N: tl.constexpr,
    D: tl.constexpr, BLOCK_D: tl.constexpr, PRECISION: tl.constexpr, PERSISTENT: tl.constexpr,
):
    """Key-outer dQ, work items as in :func:`_sel_fwd_ko_kernel` (``PERSISTENT`` too): the unscaled dQ of each
    (query, block) pair over all keys of the block into row ``e * G + h`` of the float32 partials ``DP [E * G, D]``
    (the gate's magnitude is in ``LSE2``; its sign and the scale are applied when :func:`_sel_dq_merge_kernel` adds
    the partials)."""
    pid = tl.program_id(0)
    e, row_ok, hh, g, start, end, q, do, lse2, delta = _ko_dq_rows(
        Q, DO, LSE2, DELTA, pid, n_items, item_bucket, item_start, csr_offsets, csr_tokens, sel_offsets, S, NB, H,
        t0, stride_qt, stride_qh, stride_dt, stride_dh, G, HG, BLOCK_T, D, BLOCK_D)
    if PERSISTENT:
        step = tl.num_programs(0)
        for item in range(pid, n_items, step):
            e2, row_ok2, hh2, g2, start2, end2, q2, do2, lse22, delta2 = _ko_dq_rows(
                Q, DO, LSE2, DELTA, item + step, n_items, item_bucket, item_start, csr_offsets, csr_tokens,
                sel_offsets, S, NB, H, t0, stride_qt, stride_qh, stride_dt, stride_dh, G, HG, BLOCK_T, D, BLOCK_D)
            _ko_dq_run(K, V, DP, e, row_ok, hh, g, start, end, q, do, lse2, delta, qk_scale, stride_kt, stride_kh,
                       G, HG, BLOCK_T, BLOCK_N, D, BLOCK_D, PRECISION)
            e, row_ok, hh, g, start, end, q, do, lse2, delta = e2, row_ok2, hh2, g2, start2, end2, q2, do2, lse22, \
                delta2
    else:
        _ko_dq_run(K, V, DP, e, row_ok, hh, g, start, end, q, do, lse2, delta, qk_scale, stride_kt, stride_kh, G, HG,
                   BLOCK_T, BLOCK_N, D, BLOCK_D, PRECISION)


@triton.jit
def _sel_dq_merge_kernel(
    DP, POS, DQ, GATE,
    n_chunk, H, t0, scale,
    G: tl.constexpr, HG: tl.constexpr, BLOCK_T: tl.constexpr, TOPK: tl.constexpr,
    D: tl.constexpr, BLOCK_D: tl.constexpr, HAS_GATE: tl.constexpr, GATE_IDX: tl.constexpr,
    ACCUMULATE: tl.constexpr,
):
    """Sums the key-outer dQ partials of ``BLOCK_T`` chunk tokens x ``HG`` heads in slot order (``POS`` as in
    :func:`_sel_merge_kernel`) and stores them as the query-outer dQ kernel does
    (:func:`ssa_kernels.selection._sel_bwd_dq_kernel`: scale, gate sign, added to ``DQ`` when ``ACCUMULATE``)."""
    tok, head, row_ok, g = _row_tokens_heads(tl.program_id(0), tl.program_id(1), n_chunk, G, HG, BLOCK_T)
    hkv = H // G
    hh = head - g * G
    d = tl.arange(0, BLOCK_D)
    d_ok = d < D
    dq = tl.zeros([BLOCK_T * HG, BLOCK_D], tl.float32)
    for slot in range(TOPK):
        pos = tl.load(POS + (tok.to(tl.int64) * hkv + g) * TOPK + slot, mask=row_ok, other=-1)
        ok = pos >= 0
        prow = pos.to(tl.int64) * G + hh
        dq += tl.load(DP + prow[:, None] * D + d[None, :], mask=ok[:, None] & d_ok[None, :], other=0.0)
    tok64 = (tok + t0).to(tl.int64)
    _dq_store(DQ, GATE, dq, scale, tok64, head, d, H, row_ok, row_ok[:, None] & d_ok[None, :], D, HAS_GATE,
              GATE_IDX, ACCUMULATE)


def _multiprocessors(device: torch.device) -> int:
    """The device's multiprocessors; :data:`INTERPRETER_MULTIPROCESSORS` on a CPU."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return INTERPRETER_MULTIPROCESSORS


def _programs(n_items: int, cfg: dict, device: torch.device) -> tuple[int, bool]:
    """``(programs, persistent)`` of a key-outer launch of ``n_items`` work items: ``ko_persistent`` programs per
    multiprocessor looping over them, or (0, or as many programs as items) one program per item."""
    programs = min(n_items, cfg["ko_persistent"] * _multiprocessors(device)) or n_items
    return programs, programs < n_items


def _key_outer_chunks(q, idx, layout: BlockLayout, group_rows: int, partial_bytes: int, scratch_bytes: int):
    """The chunks of queries of a key-outer kernel: per chunk ``(t0, n, offsets, tokens, pos, item_bucket,
    item_start)``, the chunk's block -> queries index with each choice's position and its work items of
    ``group_rows`` queries; a chunk holds as many queries as keep ``partial_bytes`` per query within
    ``scratch_bytes``."""
    n = q.shape[0]
    chunk = max(1, scratch_bytes // partial_bytes)
    for t0 in range(0, n, chunk):
        sub = idx[t0:t0 + chunk]
        offsets, tokens, pos = block_query_index(sub, layout.num_sel_blocks, positions=True)
        item_bucket, item_start, _ = split_buckets(offsets, group_rows, sub.numel())
        yield t0, sub.shape[0], offsets, tokens, pos, item_bucket, item_start


def selection_forward_key_outer(q, k, v, idx, layout: BlockLayout, scale: float, fwd: dict, o, lse):
    """The key-outer forward into ``o`` and ``lse`` (module docstring) with the launch configuration ``fwd``
    (``selection.FWD``): per chunk of queries, the block -> queries index with each choice's position, the partials
    (:func:`_sel_fwd_ko_kernel`), their merge (:func:`_sel_merge_kernel`). Chunks hold as many queries as keep the
    partial outputs within ``scratch_bytes``."""
    n, hq, dim = q.shape
    hkv = k.shape[1]
    group = hq // hkv
    topk = idx.shape[2]
    s_blocks = layout.num_sel_blocks
    hg, bt = group_tiling(group, fwd["ko_rows"])
    mhg, mbt = group_tiling(group, fwd["merge_rows"])
    bd, prec = block_d(dim), dot_precision(q.dtype)
    for t0, nc, offsets, tokens, pos, item_bucket, item_start in _key_outer_chunks(
            q, idx, layout, bt, hkv * topk * group * dim * q.element_size(), fwd["scratch_bytes"]):
        rows = nc * hkv * topk * group
        op = torch.empty(rows, dim, device=q.device, dtype=q.dtype)
        mp = torch.empty(rows, device=q.device, dtype=torch.float32)
        lp = torch.empty(rows, device=q.device, dtype=torch.float32)
        n_items = item_bucket.numel()
        programs, persistent = _programs(n_items, fwd, q.device)
        _sel_fwd_ko_kernel[(programs, group // hg)](
            q, k, v, op, mp, lp, layout.sel_offsets, offsets, tokens, item_bucket, item_start,
            s_blocks, hkv * s_blocks, n_items, hq, t0, scale * LOG2E,
            q.stride(0), q.stride(1), k.stride(0), k.stride(1),
            G=group, HG=hg, BLOCK_T=bt, BLOCK_N=fwd["ko_block_n"], D=dim, BLOCK_D=bd, PRECISION=prec,
            PERSISTENT=persistent, num_warps=fwd["ko_warps"], num_stages=fwd["ko_stages"],
        )
        _sel_merge_kernel[(triton.cdiv(nc, mbt), hkv * (group // mhg))](
            op, mp, lp, pos, o, lse, nc, hq, t0, o.stride(0), o.stride(1),
            G=group, HG=mhg, BLOCK_T=mbt, TOPK=topk, D=dim, BLOCK_D=bd, num_warps=fwd["merge_warps"],
        )


def selection_dq_key_outer(do, q, k, v, idx, gate_t, lse2, delta, dq_acc, layout: BlockLayout, scale: float,
                           cfg: dict, *, has_gate: bool, gate_idx: int, accumulate: bool):
    """dQ of the selection branch, key-outer (launch setting ``key_outer`` of ``selection.DQ``, configuration
    ``cfg``): per chunk of queries the unscaled float32 dQ of every (query, chosen block) pair
    (:func:`_sel_bwd_dq_ko_kernel`), then each query's pairs summed in slot order into ``dq_acc``
    (:func:`_sel_dq_merge_kernel`). Deterministic."""
    n, hq, dim = q.shape
    hkv = k.shape[1]
    group = hq // hkv
    topk = idx.shape[2]
    hg, bt = group_tiling(group, cfg["ko_rows"])
    mhg, mbt = group_tiling(group, cfg["merge_rows"])
    bd, prec = block_d(dim), dot_precision(q.dtype)
    s_blocks = layout.num_sel_blocks
    for t0, nc, offsets, tokens, pos, item_bucket, item_start in _key_outer_chunks(
            q, idx, layout, bt, hkv * topk * group * dim * torch.float32.itemsize, cfg["scratch_bytes"]):
        dp = torch.empty(nc * hkv * topk * group, dim, device=q.device, dtype=torch.float32)
        n_items = item_bucket.numel()
        programs, persistent = _programs(n_items, cfg, q.device)
        _sel_bwd_dq_ko_kernel[(programs, group // hg)](
            q, k, v, do, lse2, delta, dp, layout.sel_offsets, offsets, tokens, item_bucket, item_start,
            s_blocks, hkv * s_blocks, n_items, hq, t0, scale * LOG2E,
            q.stride(0), q.stride(1), k.stride(0), k.stride(1), do.stride(0), do.stride(1),
            G=group, HG=hg, BLOCK_T=bt, BLOCK_N=cfg["ko_block_n"], D=dim, BLOCK_D=bd, PRECISION=prec,
            PERSISTENT=persistent, num_warps=cfg["ko_warps"], num_stages=cfg["ko_stages"],
        )
        _sel_dq_merge_kernel[(triton.cdiv(nc, mbt), hkv * (group // mhg))](
            dp, pos, dq_acc, gate_t, nc, hq, t0, scale,
            G=group, HG=mhg, BLOCK_T=mbt, TOPK=topk, D=dim, BLOCK_D=bd, HAS_GATE=has_gate, GATE_IDX=gate_idx,
            ACCUMULATE=accumulate, num_warps=cfg["merge_warps"],
        )
