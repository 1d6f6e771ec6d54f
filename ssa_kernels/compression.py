"""Branch 1, compression attention: every query attends over all compressed keys of its batch element.

``q [N, Hq, D]``, ``k_cmp, v_cmp [Nc, Hkv, D]`` -> ``o [N, Hq, D]``, ``lse [N, Hq]`` (float32, natural log).

Forward: one program per tile of ``BLOCK_T`` tokens x ``HG`` query heads of one kv group (a ``BLOCK_T * HG``-row
matrix product against each key tile, every compressed key loaded once for the whole group). A tile may straddle
two batch elements: it loops over the union of their key ranges and masks per row.

Backward: dQ query-outer like the forward; dK/dV key-outer, each program owning a tile of compressed keys and
one slice of the queries (``num_splits`` slices), writing float32 partial sums that are added in a fixed order:
deterministic, no atomics.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import (
    LOG2E,
    _batch_ranges,
    _dkdv_rows_turn,
    _dq_step,
    _dq_store,
    _dq_turn,
    _full_tiles_end,
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
    head_split,
    tokens_per_tile,
)
from .gate import fold_gate
from .launch import config
from .layout import BlockLayout


# Launch configurations: ssa_kernels.launch ("compression.FWD", "compression.DQ", "compression.DKDV"; programs: the
# target number of dK/dV programs, the queries split into that many slices over the key tiles).


@triton.jit
def _cmp_fwd_kernel(
    Q, KC, VC, O, LSE,
    token_batch, batch_cmp_offsets,
    N, H, qk_scale,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_ot, stride_oh,
    G: tl.constexpr, HG: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_N: tl.constexpr,
    D: tl.constexpr, BLOCK_D: tl.constexpr, PRECISION: tl.constexpr, FMA_EVERY: tl.constexpr,
):
    """Forward of the compression branch; ``FMA_EVERY`` (0: never): every ``FMA_EVERY``-th key tile of a program
    takes its exponentials from :func:`ssa_kernels._common.exp2_fma`."""
    tok, head, row_ok, g = _row_tokens_heads(tl.program_id(0), tl.program_id(1), N, G, HG, BLOCK_T)
    tok64 = tok.to(tl.int64)
    k_lo, k_hi, lo, hi = _batch_ranges(token_batch, batch_cmp_offsets, tok, row_ok)
    d = tl.arange(0, BLOCK_D)
    d_ok = d < D
    rd_mask = row_ok[:, None] & d_ok[None, :]
    q = _load_rows(Q, tok64, head, d, stride_qt, stride_qh, rd_mask)
    m, l, acc = _softmax_start(BLOCK_T * HG, BLOCK_D)
    # whole key tiles of a tile of rows from one batch element need no per-score mask (padding rows are not
    # stored), as in the dQ kernel; the part-filled last tile and tiles of rows from several elements keep it
    full_end = _full_tiles_end(k_lo, k_hi, lo, hi, row_ok, BLOCK_N)
    for start in range(lo, full_end, BLOCK_N):
        n = start + tl.arange(0, BLOCK_N)
        k, v = _load_kv(KC, VC, n.to(tl.int64), g, d, stride_kt, stride_kh, d_ok[None, :])
        m, l, acc = _online_softmax_turn(m, l, acc, q, k, v, d_ok, qk_scale, PRECISION, (start - lo) // BLOCK_N,
                                         FMA_EVERY, False)
    for start in range(full_end, hi, BLOCK_N):
        n = start + tl.arange(0, BLOCK_N)
        n_ok = n < hi
        k, v = _load_kv(KC, VC, n.to(tl.int64), g, d, stride_kt, stride_kh, n_ok[:, None] & d_ok[None, :])
        valid = (n[None, :] >= k_lo[:, None]) & (n[None, :] < k_hi[:, None])
        m, l, acc = _online_softmax_turn(m, l, acc, q, k, v, valid, qk_scale, PRECISION, (start - lo) // BLOCK_N,
                                         FMA_EVERY)
    _softmax_store(O, LSE, m, l, acc, tok64, head, d, H, stride_ot, stride_oh, row_ok, rd_mask)


@triton.jit
def _cmp_bwd_dq_kernel(
    Q, KC, VC, DO, GATE, LSE2, DELTA, DQ,
    token_batch, batch_cmp_offsets,
    N, H, qk_scale, scale,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_dt, stride_dh,
    G: tl.constexpr, HG: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_N: tl.constexpr,
    D: tl.constexpr, BLOCK_D: tl.constexpr, PRECISION: tl.constexpr,
    HAS_GATE: tl.constexpr, GATE_IDX: tl.constexpr, ACCUMULATE: tl.constexpr, FMA_EVERY: tl.constexpr,
):
    """dQ of the compression branch; ``DQ [N, Hq, D]`` float32 (added to when ``ACCUMULATE``). ``FMA_EVERY``: as in
    :func:`_cmp_fwd_kernel`, over the whole key tiles."""
    tok, head, row_ok, g = _row_tokens_heads(tl.program_id(0), tl.program_id(1), N, G, HG, BLOCK_T)
    tok64 = tok.to(tl.int64)
    k_lo, k_hi, lo, hi = _batch_ranges(token_batch, batch_cmp_offsets, tok, row_ok)
    d = tl.arange(0, BLOCK_D)
    d_ok = d < D
    rd_mask = row_ok[:, None] & d_ok[None, :]
    q, do, lse2, delta = _grad_query_rows(Q, DO, LSE2, DELTA, tok64, head, d, H, stride_qt, stride_qh, stride_dt,
                                          stride_dh, row_ok, rd_mask)
    dq = tl.zeros([BLOCK_T * HG, BLOCK_D], tl.float32)
    # when every row is in one batch element, its whole key tiles need no per-score mask (padding rows are not
    # stored); the last, part-filled tile keeps it (a zero padding key has P = exp2(-lse2), which may overflow)
    # and so do tiles of rows from several batch elements
    full_end = _full_tiles_end(k_lo, k_hi, lo, hi, row_ok, BLOCK_N)
    for start in range(lo, full_end, BLOCK_N):
        n = start + tl.arange(0, BLOCK_N)
        k, v = _load_kv(KC, VC, n.to(tl.int64), g, d, stride_kt, stride_kh, d_ok[None, :])
        dq = _dq_turn(dq, q, k, v, do, lse2, delta, d_ok, qk_scale, PRECISION, False, (start - lo) // BLOCK_N,
                      FMA_EVERY)
    for start in range(full_end, hi, BLOCK_N):
        n = start + tl.arange(0, BLOCK_N)
        n_ok = n < hi
        k, v = _load_kv(KC, VC, n.to(tl.int64), g, d, stride_kt, stride_kh, n_ok[:, None] & d_ok[None, :])
        valid = (n[None, :] >= k_lo[:, None]) & (n[None, :] < k_hi[:, None])
        dq = _dq_step(dq, q, k, v, do, lse2, delta, valid, qk_scale, PRECISION, True)
    _dq_store(DQ, GATE, dq, scale, tok64, head, d, H, row_ok, rd_mask, D, HAS_GATE, GATE_IDX, ACCUMULATE)


@triton.jit
def _cmp_bwd_dkdv_kernel(
    Q, KC, VC, DO, GATE, NEG, LSE2, DELTA, DKP, DVP,
    token_batch, cmp_batch, batch_offsets,
    N, NC, H, HKV, qk_scale, scale,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_dt, stride_dh,
    NUM_SPLITS,
    G: tl.constexpr, HG: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_N: tl.constexpr,
    D: tl.constexpr, BLOCK_D: tl.constexpr, PRECISION: tl.constexpr,
    HAS_GATE: tl.constexpr, GATE_IDX: tl.constexpr, SIGNED: tl.constexpr, FMA_EVERY: tl.constexpr,
):
    """Partial dK/dV of one tile of compressed keys over one slice of its batch elements' queries (``FMA_EVERY``:
    every ``FMA_EVERY``-th query tile's exponentials from :func:`ssa_kernels._common.exp2_fma`; 0: none).

    ``DKP, DVP [NUM_SPLITS, Nc, Hkv, D]`` float32; the caller sums over the first axis. Launched once per
    ``SIGNED`` variant (``gate.fold_gate``); the variant that does not apply loops over nothing and
    stores nothing.
    """
    run = _signed_variant_runs(NEG, HAS_GATE, SIGNED)
    pid_n = tl.program_id(0)
    g = tl.program_id(1)
    split = tl.program_id(2)
    n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = n < NC
    kb = tl.load(cmp_batch + n, mask=n_ok, other=0)
    t_lo = tl.min(tl.where(n_ok, tl.load(batch_offsets + kb, mask=n_ok, other=0), 2147483647))
    t_hi = tl.max(tl.load(batch_offsets + kb + 1, mask=n_ok, other=0))
    chunk = tl.cdiv(t_hi - t_lo, NUM_SPLITS)
    t_start = t_lo + split * chunk
    t_end = tl.where(run, tl.minimum(t_start + chunk, t_hi), t_start)
    d = tl.arange(0, BLOCK_D)
    d_ok = d < D
    kv_mask = n_ok[:, None] & d_ok[None, :]
    k, v = _load_kv(KC, VC, n.to(tl.int64), g, d, stride_kt, stride_kh, kv_mask)
    dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    r = tl.arange(0, BLOCK_T * HG)
    for t0 in range(t_start, t_end, BLOCK_T):
        tok = t0 + r // HG
        row_ok = tok < t_end
        tok64 = tok.to(tl.int64)
        tb = tl.load(token_batch + tok, mask=row_ok, other=-1)
        valid_t = (kb[:, None] == tb[None, :]) & n_ok[:, None] & row_ok[None, :]
        rd_mask = row_ok[:, None] & d_ok[None, :]
        dk, dv = _dkdv_rows_turn(dk, dv, k, v, Q, DO, GATE, LSE2, DELTA, tok64, g, r, d, row_ok, rd_mask, valid_t,
                                 H, qk_scale, stride_qt, stride_qh, stride_dt, stride_dh, G, HG, PRECISION, GATE_IDX,
                                 SIGNED, (t0 - t_start) // BLOCK_T, FMA_EVERY)
    part = ((split * NC + n.to(tl.int64)) * HKV + g)[:, None] * D + d[None, :]
    tl.store(DKP + part, dk * scale, mask=kv_mask & run)
    tl.store(DVP + part, dv, mask=kv_mask & run)


def _config(group: int, rows: int):
    hg = head_split(group, 16)
    return hg, tokens_per_tile(hg, rows)


def _launch(cfg):
    return dict(num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])


def compression_forward(q, k_cmp, v_cmp, layout: BlockLayout, scale: float):
    """``o [N, Hq, D]`` (dtype of q) and ``lse [N, Hq]`` float32 of the compression branch."""
    n, hq, dim = q.shape
    hkv = k_cmp.shape[1]
    group = hq // hkv
    fwd = config("compression.FWD", head_dim=dim, dtype=q.dtype, device=q.device)
    hg, bt = _config(group, fwd["rows"])
    o = torch.empty_like(q)
    lse = torch.empty(n, hq, device=q.device, dtype=torch.float32)
    if n == 0:
        return o, lse
    grid = (triton.cdiv(n, bt), hkv * (group // hg))
    _cmp_fwd_kernel[grid](
        q, k_cmp, v_cmp, o, lse, layout.token_batch, layout.batch_cmp_offsets,
        n, hq, scale * LOG2E,
        q.stride(0), q.stride(1), k_cmp.stride(0), k_cmp.stride(1), o.stride(0), o.stride(1),
        G=group, HG=hg, BLOCK_T=bt, BLOCK_N=fwd["block_n"], D=dim, BLOCK_D=block_d(dim),
        PRECISION=dot_precision(q.dtype), FMA_EVERY=fma_every(fwd, q.dtype), **_launch(fwd),
    )
    return o, lse


def compression_backward(do, q, k_cmp, v_cmp, lse, delta, layout: BlockLayout, scale: float, *,
                         gate=None, gate_idx=0, dq_acc=None, accumulate=False, parts=("dq", "dkdv"),
                         fold=None):
    """Gradients of the compression branch.

    ``do [N, Hq, D]`` is the gradient of the (gated, when ``gate`` is given: ``gate[:, gate_idx] * o``) output;
    ``delta [N, Hq]`` float32 = rowsum(do * o_branch), without the gate (it is folded in by the kernels). dQ goes
    into ``dq_acc [N, Hq, D]`` (float32 by default, or any float dtype; overwritten, or added to with
    ``accumulate``). Returns ``(dq_acc, dk_cmp, dv_cmp)``, the last two float32. ``parts`` runs only some of the
    kernels (for timing them apart, or to launch them on different streams); ``fold`` is
    ``gate.fold_gate(lse, gate, gate_idx)`` when the caller has it already (computed here otherwise).
    """
    n, hq, dim = q.shape
    nc, hkv, _ = k_cmp.shape
    group = hq // hkv
    if dq_acc is None:
        dq_acc = torch.empty(n, hq, dim, device=q.device, dtype=torch.float32)
        accumulate = False
    if n == 0 or nc == 0:
        if not accumulate:
            dq_acc.zero_()
        z = torch.zeros(nc, hkv, dim, device=q.device, dtype=torch.float32)
        return dq_acc, z, z.clone()
    do = do.contiguous() if do.stride(-1) != 1 else do
    has_gate = gate is not None
    gate_t = gate if has_gate else lse  # placeholder pointer, never read
    lse2, neg, variants = fold_gate(lse, gate, gate_idx) if fold is None else fold
    common = dict(G=group, D=dim, BLOCK_D=block_d(dim), PRECISION=dot_precision(q.dtype),
                  HAS_GATE=has_gate, GATE_IDX=gate_idx)
    dq_cfg = config("compression.DQ", head_dim=dim, dtype=q.dtype, device=q.device)
    hg, bt = _config(group, dq_cfg["rows"])
    grid = (triton.cdiv(n, bt), hkv * (group // hg))
    if "dq" in parts:
        _cmp_bwd_dq_kernel[grid](
            q, k_cmp, v_cmp, do, gate_t, lse2, delta, dq_acc, layout.token_batch, layout.batch_cmp_offsets,
            n, hq, scale * LOG2E, scale,
            q.stride(0), q.stride(1), k_cmp.stride(0), k_cmp.stride(1), do.stride(0), do.stride(1),
            HG=hg, BLOCK_T=bt, BLOCK_N=dq_cfg["block_n"], ACCUMULATE=accumulate, **common,
            FMA_EVERY=fma_every(dq_cfg, q.dtype), **_launch(dq_cfg),
        )
    if "dkdv" not in parts:
        return dq_acc, None, None
    cfg = config("compression.DKDV", head_dim=dim, dtype=q.dtype, device=q.device)
    hg, bt = _config(group, cfg["rows"])
    key_tiles = triton.cdiv(nc, cfg["block_n"])
    splits = max(1, min(triton.cdiv(cfg["programs"], key_tiles * hkv), triton.cdiv(n, 4 * bt)))
    dkp = torch.empty(splits, nc, hkv, dim, device=q.device, dtype=torch.float32)
    dvp = torch.empty_like(dkp)
    for signed in variants:
        _cmp_bwd_dkdv_kernel[(key_tiles, hkv, splits)](
            q, k_cmp, v_cmp, do, gate_t, neg, lse2, delta, dkp, dvp,
            layout.token_batch, layout.cmp_batch, layout.batch_offsets,
            n, nc, hq, hkv, scale * LOG2E, scale,
            q.stride(0), q.stride(1), k_cmp.stride(0), k_cmp.stride(1), do.stride(0), do.stride(1), splits,
            HG=hg, BLOCK_T=bt, BLOCK_N=cfg["block_n"], SIGNED=signed, **common,
            FMA_EVERY=fma_every(cfg, q.dtype), **_launch(cfg),
        )
    return dq_acc, dkp.sum(0), dvp.sum(0)
