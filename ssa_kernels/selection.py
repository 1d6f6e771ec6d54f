"""Branch 2, selection attention: each query attends, with one softmax, over every token of its chosen blocks.

``q [N, Hq, D]``, ``k, v [N, Hkv, D]``, ``idx [N, Hkv, topk]`` int32 (selection block ids, -1 = none) ->
``o [N, Hq, D]``, ``lse [N, Hq]`` float32. A block's tokens are found through the start-index table
``layout.sel_offsets``; blocks hold any number of tokens.

Forward and dQ are query-outer: a program takes ``BLOCK_T`` tokens x ``HG`` heads of one kv group and loops over
the union of its tokens' chosen blocks (rows of tokens that did not choose a block are masked), so every K/V tile
is loaded once for the whole group and shared by the tile's tokens.

dK/dV are key-outer: a program owns a tile of one selection block's keys and loops over the queries that chose
the block, through a block -> queries index (CSR), accumulating every head of the group in float32 registers.
Each key is written by exactly one program: deterministic, no atomics.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import (
    LOG2E,
    LOG2E_C,
    _dkdv_rows,
    _dq_step,
    _load_grad_out,
    _online_softmax_step,
    _row_tokens_heads,
    _softmax_finish,
    block_d,
    dot_precision,
    head_split,
    tokens_per_tile,
)
from .layout import BlockLayout

#: Launch configurations. Forward and dQ: query rows (tokens x heads) per program, keys per step.
#: dK/dV: query rows per step, keys per program.
FWD = dict(rows=16, block_n=16, num_warps=1, num_stages=3)
DQ = dict(rows=16, block_n=16, num_warps=1, num_stages=3)
DKDV = dict(rows=128, block_n=64, num_warps=4, num_stages=2)
#: The block -> queries index: ``method`` ``"sort"`` (a stable radix sort of the bucket ids) or ``"count"`` (a
#: counting sort in two Triton passes over chunks of tokens, :func:`block_query_index`). ``chunk_min``: fewest
#: tokens per chunk; ``hist_factor``: the per-chunk counts may hold at most this many times the index's entries
#: (more tokens per chunk when there are many blocks); ``block_t``: tokens per step of the counting pass.
INDEX = dict(method="sort", chunk_min=32, hist_factor=2, block_t=64)
#: Values of ``INDEX["method"]``.
INDEX_METHODS = ("sort", "count")


@triton.jit
def _sel_fwd_kernel(
    Q, K, V, O, LSE, IDX, sel_offsets,
    N, H, qk_scale,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_ot, stride_oh,
    G: tl.constexpr, HG: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_N: tl.constexpr,
    TOPK: tl.constexpr, K2: tl.constexpr,
    D: tl.constexpr, BLOCK_D: tl.constexpr, PRECISION: tl.constexpr,
):
    pid_t = tl.program_id(0)
    tok, head, row_ok, g = _row_tokens_heads(pid_t, tl.program_id(1), N, G, HG, BLOCK_T)
    hkv = H // G
    tok64 = tok.to(tl.int64)
    kk = tl.arange(0, K2)
    # chosen blocks of each row's token [R, K2]
    sel_r = tl.load(IDX + (tok64[:, None] * hkv + g) * TOPK + kk[None, :], mask=row_ok[:, None] & (kk[None, :] < TOPK),
                    other=-1)
    r_tok = tl.arange(0, BLOCK_T * HG) // HG
    d = tl.arange(0, BLOCK_D)
    d_ok = d < D
    q = tl.load(Q + tok64[:, None] * stride_qt + head[:, None] * stride_qh + d[None, :],
                mask=row_ok[:, None] & d_ok[None, :], other=0.0)
    m = tl.full([BLOCK_T * HG], float("-inf"), tl.float32)
    l = tl.zeros([BLOCK_T * HG], tl.float32)
    acc = tl.zeros([BLOCK_T * HG, BLOCK_D], tl.float32)
    for slot in range(0, BLOCK_T * TOPK):
        ti = slot // TOPK
        t = pid_t * BLOCK_T + ti
        blk = tl.load(IDX + (t.to(tl.int64) * hkv + g) * TOPK + slot % TOPK, mask=t < N, other=-1)
        # visit each block once per tile: skip it if an earlier token of the tile chose it too
        if BLOCK_T == 1:  # one token: its blocks are distinct and every row chose them
            seen = 0
            row_sel = row_ok
        else:
            seen = tl.sum(((sel_r == blk) & (r_tok < ti)[:, None]).to(tl.int32))
            row_sel = tl.max((sel_r == blk).to(tl.int32), 1) > 0
        if (blk >= 0) & (seen == 0):
            start = tl.load(sel_offsets + blk)
            end = tl.load(sel_offsets + blk + 1)
            for ks in range(start, end, BLOCK_N):
                n = ks + tl.arange(0, BLOCK_N)
                n_ok = n < end
                kv_off = n.to(tl.int64)[:, None] * stride_kt + g * stride_kh + d[None, :]
                k = tl.load(K + kv_off, mask=n_ok[:, None] & d_ok[None, :], other=0.0)
                v = tl.load(V + kv_off, mask=n_ok[:, None] & d_ok[None, :], other=0.0)
                m, l, acc = _online_softmax_step(m, l, acc, q, k, v, row_sel[:, None] & n_ok[None, :], qk_scale,
                                                 PRECISION)
    o, lse = _softmax_finish(m, l, acc)
    tl.store(O + tok64[:, None] * stride_ot + head[:, None] * stride_oh + d[None, :], o.to(O.dtype.element_ty),
             mask=row_ok[:, None] & d_ok[None, :])
    tl.store(LSE + tok64 * H + head, lse, mask=row_ok)


@triton.jit
def _sel_bwd_dq_kernel(
    Q, K, V, DO, GATE, LSE, DELTA, DQ, IDX, sel_offsets,
    N, H, qk_scale, scale,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_dt, stride_dh,
    G: tl.constexpr, HG: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_N: tl.constexpr,
    TOPK: tl.constexpr, K2: tl.constexpr,
    D: tl.constexpr, BLOCK_D: tl.constexpr, PRECISION: tl.constexpr,
    HAS_GATE: tl.constexpr, GATE_IDX: tl.constexpr, ACCUMULATE: tl.constexpr,
):
    """dQ of the selection branch into ``DQ [N, Hq, D]`` float32 (added to when ``ACCUMULATE``)."""
    pid_t = tl.program_id(0)
    tok, head, row_ok, g = _row_tokens_heads(pid_t, tl.program_id(1), N, G, HG, BLOCK_T)
    hkv = H // G
    tok64 = tok.to(tl.int64)
    kk = tl.arange(0, K2)
    sel_r = tl.load(IDX + (tok64[:, None] * hkv + g) * TOPK + kk[None, :], mask=row_ok[:, None] & (kk[None, :] < TOPK),
                    other=-1)
    r_tok = tl.arange(0, BLOCK_T * HG) // HG
    d = tl.arange(0, BLOCK_D)
    d_ok = d < D
    rd_mask = row_ok[:, None] & d_ok[None, :]
    q = tl.load(Q + tok64[:, None] * stride_qt + head[:, None] * stride_qh + d[None, :], mask=rd_mask, other=0.0)
    do = _load_grad_out(DO, GATE, tok64, head, d, stride_dt, stride_dh, rd_mask, row_ok, q.dtype, HAS_GATE, GATE_IDX)
    lse2 = tl.load(LSE + tok64 * H + head, mask=row_ok, other=0.0) * LOG2E_C
    delta = tl.load(DELTA + tok64 * H + head, mask=row_ok, other=0.0)
    dq = tl.zeros([BLOCK_T * HG, BLOCK_D], tl.float32)
    for slot in range(0, BLOCK_T * TOPK):
        ti = slot // TOPK
        t = pid_t * BLOCK_T + ti
        blk = tl.load(IDX + (t.to(tl.int64) * hkv + g) * TOPK + slot % TOPK, mask=t < N, other=-1)
        if BLOCK_T == 1:  # one token: its blocks are distinct and every row chose them
            seen = 0
            row_sel = row_ok
        else:
            seen = tl.sum(((sel_r == blk) & (r_tok < ti)[:, None]).to(tl.int32))
            row_sel = tl.max((sel_r == blk).to(tl.int32), 1) > 0
        if (blk >= 0) & (seen == 0):
            start = tl.load(sel_offsets + blk)
            end = tl.load(sel_offsets + blk + 1)
            for ks in range(start, end, BLOCK_N):
                n = ks + tl.arange(0, BLOCK_N)
                n_ok = n < end
                kv_off = n.to(tl.int64)[:, None] * stride_kt + g * stride_kh + d[None, :]
                k = tl.load(K + kv_off, mask=n_ok[:, None] & d_ok[None, :], other=0.0)
                v = tl.load(V + kv_off, mask=n_ok[:, None] & d_ok[None, :], other=0.0)
                dq = _dq_step(dq, q, k, v, do, lse2, delta, row_sel[:, None] & n_ok[None, :], qk_scale, PRECISION)
    dq = dq * scale
    dq_off = tok64[:, None] * (H * D) + head[:, None] * D + d[None, :]
    if ACCUMULATE:
        dq += tl.load(DQ + dq_off, mask=rd_mask, other=0.0)
    tl.store(DQ + dq_off, dq, mask=rd_mask)


@triton.jit
def _sel_bwd_dkdv_kernel(
    Q, K, V, DO, GATE, LSE, DELTA, DK, DV,
    sel_offsets, csr_offsets, csr_tokens,
    S, H, qk_scale, scale,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_dt, stride_dh,
    G: tl.constexpr, HG: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_N: tl.constexpr,
    D: tl.constexpr, BLOCK_D: tl.constexpr, PRECISION: tl.constexpr,
    HAS_GATE: tl.constexpr, GATE_IDX: tl.constexpr, ACCUMULATE: tl.constexpr,
):
    """dK/dV of one key tile of selection block ``program_id(0)`` for kv head ``program_id(2)``.

    ``csr_offsets [Hkv * S + 1]``, ``csr_tokens``: the query tokens that chose block b for kv head g are
    ``csr_tokens[csr_offsets[g*S+b] : csr_offsets[g*S+b+1]]``. ``DK, DV [N, Hkv, D]`` float32.
    """
    blk = tl.program_id(0)
    g = tl.program_id(2)
    hkv = H // G
    start = tl.load(sel_offsets + blk) + tl.program_id(1) * BLOCK_N
    end = tl.load(sel_offsets + blk + 1)
    if start < end:
        n = start + tl.arange(0, BLOCK_N)
        n_ok = n < end
        d = tl.arange(0, BLOCK_D)
        d_ok = d < D
        kv_mask = n_ok[:, None] & d_ok[None, :]
        kv_off = n.to(tl.int64)[:, None] * stride_kt + g * stride_kh + d[None, :]
        k = tl.load(K + kv_off, mask=kv_mask, other=0.0)
        v = tl.load(V + kv_off, mask=kv_mask, other=0.0)
        dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
        dv = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
        q_lo = tl.load(csr_offsets + g * S + blk)
        q_hi = tl.load(csr_offsets + g * S + blk + 1)
        r = tl.arange(0, BLOCK_T * HG)
        for e0 in range(q_lo, q_hi, BLOCK_T):
            e = e0 + r // HG
            row_ok = e < q_hi
            tok64 = tl.load(csr_tokens + e, mask=row_ok, other=0).to(tl.int64)
            rd_mask = row_ok[:, None] & d_ok[None, :]
            valid_t = n_ok[:, None] & row_ok[None, :]
            dk, dv = _dkdv_rows(dk, dv, k, v, Q, DO, GATE, LSE, DELTA, tok64, g, r, d, row_ok, rd_mask, valid_t, H,
                                qk_scale, stride_qt, stride_qh, stride_dt, stride_dh, G, HG, PRECISION, HAS_GATE,
                                GATE_IDX)
        dk = dk * scale
        out = (n.to(tl.int64)[:, None] * hkv + g) * D + d[None, :]
        if ACCUMULATE:
            dk += tl.load(DK + out, mask=kv_mask, other=0.0)
            dv += tl.load(DV + out, mask=kv_mask, other=0.0)
        tl.store(DK + out, dk, mask=kv_mask)
        tl.store(DV + out, dv, mask=kv_mask)


@triton.jit
def _csr_count_kernel(IDX, HIST, N, S, NB, CHUNK,
                      HKV: tl.constexpr, TOPK: tl.constexpr, E: tl.constexpr, BLOCK_T: tl.constexpr):
    """``HIST[c, g*S + b]`` += the tokens of chunk ``c`` that chose block ``b`` for kv head ``g`` (integer atomics:
    the counts do not depend on their order)."""
    c = tl.program_id(0)
    e = tl.arange(0, E)
    e_ok = e < HKV * TOPK
    g = e // TOPK
    t_end = tl.minimum((c + 1) * CHUNK, N)
    row = HIST + c.to(tl.int64) * NB
    for t0 in range(c * CHUNK, t_end, BLOCK_T):
        t = t0 + tl.arange(0, BLOCK_T)
        ok = (t < t_end)[:, None] & e_ok[None, :]
        b = tl.load(IDX + t.to(tl.int64)[:, None] * (HKV * TOPK) + e[None, :], mask=ok, other=-1)
        tl.atomic_add(row + g[None, :] * S + b, 1, mask=ok & (b >= 0))


@triton.jit
def _csr_fill_kernel(IDX, BASE, TOKENS, N, S, NB, CHUNK, HKV: tl.constexpr, TOPK: tl.constexpr, E: tl.constexpr):
    """Place the tokens of chunk ``c`` one after another: ``BASE[c, bucket]`` starts at the bucket's first free
    slot for this chunk and moves on by one per token (a token's entries hit distinct buckets, so they go in
    together; the barrier orders one token's updates before the next token's reads)."""
    c = tl.program_id(0)
    e = tl.arange(0, E)
    e_ok = e < HKV * TOPK
    g = e // TOPK
    row = BASE + c.to(tl.int64) * NB
    t_start = c * CHUNK
    src = IDX + t_start.to(tl.int64) * (HKV * TOPK) + e  # this token's entries
    tok = t_start + tl.zeros([E], tl.int32)
    for _ in range(t_start, tl.minimum(t_start + CHUNK, N)):
        b = tl.load(src, mask=e_ok, other=-1)
        valid = e_ok & (b >= 0)
        slot = row + g * S + b
        pos = tl.load(slot, mask=valid, other=0)
        tl.store(TOKENS + pos, tok, mask=valid)
        tl.store(slot, pos + 1, mask=valid)
        tl.debug_barrier()
        src += HKV * TOPK
        tok += 1


def _count_sort_index(idx: torch.Tensor, num_blocks: int):
    """:func:`block_query_index` by a counting sort: per-chunk bucket counts (``_csr_count_kernel``), their scan
    over buckets and chunks (each chunk's first free slot per bucket), then each chunk places its tokens in order
    (``_csr_fill_kernel``). Same output as the sort, no comparison of keys."""
    n, hkv, topk = idx.shape
    dev = idx.device
    nb = hkv * num_blocks
    entries = n * hkv * topk
    if n == 0:
        return torch.zeros(nb + 1, device=dev, dtype=torch.int32), torch.empty(0, device=dev, dtype=torch.int32)
    max_chunks = max(1, INDEX["hist_factor"] * entries // max(nb, 1))
    chunk = max(INDEX["chunk_min"], triton.cdiv(n, max_chunks))
    chunks = triton.cdiv(n, chunk)
    idx = idx.contiguous()
    e = triton.next_power_of_2(hkv * topk)
    hist = torch.zeros(chunks, nb, device=dev, dtype=torch.int32)
    _csr_count_kernel[(chunks,)](idx, hist, n, num_blocks, nb, chunk, HKV=hkv, TOPK=topk, E=e,
                                 BLOCK_T=INDEX["block_t"], num_warps=4)
    counts = hist.sum(0, dtype=torch.int64)
    offsets = torch.zeros(nb + 1, device=dev, dtype=torch.int64)
    offsets[1:] = torch.cumsum(counts, 0)
    base = (torch.cumsum(hist, 0, dtype=torch.int64) - hist + offsets[:-1]).to(torch.int32)  # [chunks, nb]
    del hist
    tokens = torch.empty(entries, device=dev, dtype=torch.int32)
    _csr_fill_kernel[(chunks,)](idx, base, tokens, n, num_blocks, nb, chunk, HKV=hkv, TOPK=topk, E=e,
                                num_warps=1)
    return offsets.int(), tokens  # entries of -1 take no slot: the index holds offsets[-1] tokens


def block_query_index(idx: torch.Tensor, num_blocks: int):
    """The block -> queries index (CSR) of a top-k choice ``idx [N, Hkv, topk]`` (-1 = none).

    Returns ``(offsets [Hkv * S + 1] int32, tokens [E] int32)``: the tokens that chose block b for kv head g are
    ``tokens[offsets[g*S+b] : offsets[g*S+b+1]]``, in increasing token order (entries past ``offsets[-1]`` are
    unused). ``INDEX["method"]``: ``"sort"``, a stable radix sort of the bucket ids (``torch.sort(stable=True)``,
    linear time on the GPU) and a count + scan for the offsets; ``"count"``, a counting sort
    (:func:`_count_sort_index`). Both deterministic, no host synchronisation.
    """
    if INDEX["method"] not in INDEX_METHODS:
        raise ValueError(f"INDEX['method'] must be one of {INDEX_METHODS}, got {INDEX['method']!r}")
    if INDEX["method"] == "count":
        return _count_sort_index(idx, num_blocks)
    n, hkv, topk = idx.shape
    dev = idx.device
    nbuckets = hkv * num_blocks
    g = torch.arange(hkv, device=dev, dtype=torch.int64).view(1, hkv, 1)
    bucket = g * num_blocks + idx.long()
    key = torch.where(idx >= 0, bucket, torch.full_like(bucket, nbuckets)).reshape(-1)
    counts = torch.zeros(nbuckets + 1, device=dev, dtype=torch.int64)
    counts.index_add_(0, key, torch.ones_like(key))
    offsets = torch.zeros(nbuckets + 2, device=dev, dtype=torch.int64)
    offsets[1:] = torch.cumsum(counts, 0)
    order = torch.sort(key, stable=True).indices
    tokens = torch.div(order, hkv * topk, rounding_mode="floor")
    return offsets[: nbuckets + 1].int(), tokens.int()


def _config(group: int, rows: int, max_heads: int = 16):
    hg = head_split(group, max_heads)
    return hg, tokens_per_tile(hg, rows)


def _launch(cfg):
    return dict(num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])


def selection_forward(q, k, v, idx, layout: BlockLayout, scale: float):
    """``o [N, Hq, D]`` (dtype of q) and ``lse [N, Hq]`` float32 of the selection branch."""
    n, hq, dim = q.shape
    hkv = k.shape[1]
    group = hq // hkv
    topk = idx.shape[2]
    hg, bt = _config(group, FWD["rows"])
    o = torch.empty_like(q)
    lse = torch.empty(n, hq, device=q.device, dtype=torch.float32)
    if n == 0:
        return o, lse
    _sel_fwd_kernel[(triton.cdiv(n, bt), hkv * (group // hg))](
        q, k, v, o, lse, idx, layout.sel_offsets,
        n, hq, scale * LOG2E,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), o.stride(0), o.stride(1),
        G=group, HG=hg, BLOCK_T=bt, BLOCK_N=FWD["block_n"], TOPK=topk, K2=triton.next_power_of_2(topk),
        D=dim, BLOCK_D=block_d(dim), PRECISION=dot_precision(q.dtype), **_launch(FWD),
    )
    return o, lse


def selection_backward(do, q, k, v, idx, lse, delta, layout: BlockLayout, scale: float, *, gate=None, gate_idx=1,
                       dq_acc=None, dk_acc=None, dv_acc=None, accumulate=False, parts=("dq", "dkdv")):
    """Gradients of the selection branch into float32 accumulators (created when not given).

    ``do`` is the gradient of ``gate[:, gate_idx] * o`` when ``gate`` is given, else of ``o``;
    ``delta [N, Hq]`` = rowsum(dO_branch * o_branch). Returns ``(dq_acc, dk_acc, dv_acc)``. ``parts`` runs only
    some of the kernels (for timing them apart).
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
    prec = dot_precision(q.dtype)
    hg, bt = _config(group, DQ["rows"])
    if "dq" in parts:
        _sel_bwd_dq_kernel[(triton.cdiv(n, bt), hkv * (group // hg))](
            q, k, v, do, gate_t, lse, delta, dq_acc, idx, layout.sel_offsets,
            n, hq, scale * LOG2E, scale,
            q.stride(0), q.stride(1), k.stride(0), k.stride(1), do.stride(0), do.stride(1),
            G=group, HG=hg, BLOCK_T=bt, BLOCK_N=DQ["block_n"], TOPK=topk, K2=triton.next_power_of_2(topk),
            D=dim, BLOCK_D=block_d(dim), PRECISION=prec, HAS_GATE=has_gate,
            GATE_IDX=gate_idx,
            ACCUMULATE=accumulate, **_launch(DQ),
        )
    if "dkdv" not in parts:
        return dq_acc, dk_acc, dv_acc
    csr_offsets, csr_tokens = block_query_index(idx, layout.num_sel_blocks)
    hg, bt = _config(group, DKDV["rows"])
    grid = (layout.num_sel_blocks, triton.cdiv(layout.max_sel_block_tokens, DKDV["block_n"]), hkv)
    _sel_bwd_dkdv_kernel[grid](
        q, k, v, do, gate_t, lse, delta, dk_acc, dv_acc,
        layout.sel_offsets, csr_offsets, csr_tokens,
        layout.num_sel_blocks, hq, scale * LOG2E, scale,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), do.stride(0), do.stride(1),
        G=group, HG=hg, BLOCK_T=bt, BLOCK_N=DKDV["block_n"],
        D=dim, BLOCK_D=block_d(dim), PRECISION=prec, HAS_GATE=has_gate,
        GATE_IDX=gate_idx, ACCUMULATE=accumulate,
        **_launch(DKDV),
    )
    return dq_acc, dk_acc, dv_acc
