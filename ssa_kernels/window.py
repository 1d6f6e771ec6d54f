"""Branch 3, window attention: each query attends over every token of its (shifted) window.

``q [N, Hq, D]``, ``k, v [N, Hkv, D]`` -> ``o [N, Hq, D]``, ``lse [N, Hq]`` float32. The layout's
:class:`~ssa_kernels.layout.WindowPartition` lists the tokens of each window contiguously (``perm``, ``offsets``)
and cuts them into tiles of at most ``WINDOW_TILE`` tokens (``tiles``); tokens are gathered through ``perm``.

Forward and dQ: one program per (query tile, head sub-group) loops over its window's keys. dK/dV: one program per
(key tile, kv head) loops over its window's queries and every head of the group, accumulating in float32;
each key is written by one program: deterministic, no atomics.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import (
    LOG2E,
    _dkdv_rows,
    _dkdv_store,
    _dq_step,
    _dq_store,
    _grad_query_rows,
    _load_kv,
    _load_rows,
    _online_softmax_step,
    _signed_variant_runs,
    _softmax_start,
    _softmax_store,
    block_d,
    dot_precision,
    head_split,
)
from .gate import fold_gate
from .launch import config
from .layout import WINDOW_TILE, BlockLayout

# Launch configurations: ssa_kernels.launch ("window.FWD", "window.DQ": heads of one kv group per program (rows =
# WINDOW_TILE tokens x heads), keys per step; "window.DKDV": query rows (tokens x heads) per step, its keys per
# program one tile).


def _launch(cfg):
    return dict(num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])


@triton.jit
def _window_query_rows(perm, offsets, tiles, tile_window, G: tl.constexpr, HG: tl.constexpr, BLOCK_T: tl.constexpr):
    """Rows of query tile ``program_id(0)`` (row r = its token r // HG) x the ``HG`` heads ``program_id(1)`` of one
    kv group: ``(tok64, head, row_ok, g, w_lo, w_hi)``, ``[w_lo, w_hi)`` the window's range of ``perm``."""
    tile = tl.program_id(0)
    pid_h = tl.program_id(1)
    n_sub = G // HG
    g = pid_h // n_sub
    r = tl.arange(0, BLOCK_T * HG)
    head = g * G + (pid_h % n_sub) * HG + r % HG
    t_start = tl.load(tiles + 2 * tile)
    t_end = tl.load(tiles + 2 * tile + 1)
    w = tl.load(tile_window + tile)
    w_lo = tl.load(offsets + w)
    w_hi = tl.load(offsets + w + 1)
    pos = t_start + r // HG
    row_ok = pos < t_end
    tok64 = tl.load(perm + pos, mask=row_ok, other=0).to(tl.int64)
    return tok64, head, row_ok, g, w_lo, w_hi


@triton.jit
def _window_keys(K, V, perm, ks, w_hi, g, d, d_ok, stride_kt, stride_kh, BLOCK_N: tl.constexpr):
    """The key tile of the window at ``perm[ks : ks + BLOCK_N]`` (up to ``w_hi``): ``(k, v, n_ok)``."""
    kp = ks + tl.arange(0, BLOCK_N)
    n_ok = kp < w_hi
    ktok = tl.load(perm + kp, mask=n_ok, other=0).to(tl.int64)
    k, v = _load_kv(K, V, ktok, g, d, stride_kt, stride_kh, n_ok[:, None] & d_ok[None, :])
    return k, v, n_ok


@triton.jit
def _whole_window_keys(K, V, perm, ks, g, d, d_ok, stride_kt, stride_kh, BLOCK_N: tl.constexpr):
    """A whole key tile of a window (all ``BLOCK_N`` positions inside it): ``(k, v)``, loaded without masks."""
    ktok = tl.load(perm + ks + tl.arange(0, BLOCK_N)).to(tl.int64)
    return _load_kv(K, V, ktok, g, d, stride_kt, stride_kh, d_ok[None, :])


@triton.jit
def _win_fwd_kernel(
    Q, K, V, O, LSE, perm, offsets, tiles, tile_window,
    OC, OS, GATE, OUT,
    H, qk_scale,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_ot, stride_oh,
    G: tl.constexpr, HG: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_N: tl.constexpr,
    D: tl.constexpr, BLOCK_D: tl.constexpr, PRECISION: tl.constexpr, FUSE_GATE: tl.constexpr,
):
    """Window attention of one query tile; with ``FUSE_GATE`` also the gate mix
    ``OUT = gate0 * OC + gate1 * OS + gate2 * O`` (``OC, OS, OUT`` laid out like ``O``)."""
    tok64, head, row_ok, g, w_lo, w_hi = _window_query_rows(perm, offsets, tiles, tile_window, G, HG, BLOCK_T)
    d = tl.arange(0, BLOCK_D)
    d_ok = d < D
    rd_mask = row_ok[:, None] & d_ok[None, :]
    q = _load_rows(Q, tok64, head, d, stride_qt, stride_qh, rd_mask)
    m, l, acc = _softmax_start(BLOCK_T * HG, BLOCK_D)
    # the rows of a tile are one window's (padding rows are zero and not stored): the whole key tiles need no
    # per-score mask, the part-filled last one masks its padding keys (the same split in the dQ kernel measured
    # slower, reports/kernels.md)
    full_end = w_lo + (w_hi - w_lo) // BLOCK_N * BLOCK_N
    for ks in range(w_lo, full_end, BLOCK_N):
        k, v = _whole_window_keys(K, V, perm, ks, g, d, d_ok, stride_kt, stride_kh, BLOCK_N)
        m, l, acc = _online_softmax_step(m, l, acc, q, k, v, d_ok, qk_scale, PRECISION, False, False)
    for ks in range(full_end, w_hi, BLOCK_N):
        k, v, n_ok = _window_keys(K, V, perm, ks, w_hi, g, d, d_ok, stride_kt, stride_kh, BLOCK_N)
        m, l, acc = _online_softmax_step(m, l, acc, q, k, v, row_ok[:, None] & n_ok[None, :], qk_scale, PRECISION)
    o = _softmax_store(O, LSE, m, l, acc, tok64, head, d, H, stride_ot, stride_oh, row_ok, rd_mask)
    if FUSE_GATE:
        o_off = tok64[:, None] * stride_ot + head[:, None] * stride_oh + d[None, :]
        g0 = tl.load(GATE + tok64 * 3, mask=row_ok, other=0.0).to(tl.float32)
        g1 = tl.load(GATE + tok64 * 3 + 1, mask=row_ok, other=0.0).to(tl.float32)
        g2 = tl.load(GATE + tok64 * 3 + 2, mask=row_ok, other=0.0).to(tl.float32)
        oc = tl.load(OC + o_off, mask=rd_mask, other=0.0).to(tl.float32)
        os_ = tl.load(OS + o_off, mask=rd_mask, other=0.0).to(tl.float32)
        mix = g0[:, None] * oc + g1[:, None] * os_ + g2[:, None] * o.to(tl.float32)
        tl.store(OUT + o_off, mix.to(OUT.dtype.element_ty), mask=rd_mask)


@triton.jit
def _win_bwd_dq_kernel(
    Q, K, V, DO, GATE, LSE2, DELTA, DQ, perm, offsets, tiles, tile_window,
    H, qk_scale, scale,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_dt, stride_dh,
    G: tl.constexpr, HG: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_N: tl.constexpr,
    D: tl.constexpr, BLOCK_D: tl.constexpr, PRECISION: tl.constexpr,
    HAS_GATE: tl.constexpr, GATE_IDX: tl.constexpr, ACCUMULATE: tl.constexpr,
):
    """dQ of the window branch into ``DQ [N, Hq, D]`` float32 (added to when ``ACCUMULATE``)."""
    tok64, head, row_ok, g, w_lo, w_hi = _window_query_rows(perm, offsets, tiles, tile_window, G, HG, BLOCK_T)
    d = tl.arange(0, BLOCK_D)
    d_ok = d < D
    rd_mask = row_ok[:, None] & d_ok[None, :]
    q, do, lse2, delta = _grad_query_rows(Q, DO, LSE2, DELTA, tok64, head, d, H, stride_qt, stride_qh, stride_dt,
                                          stride_dh, row_ok, rd_mask)
    dq = tl.zeros([BLOCK_T * HG, BLOCK_D], tl.float32)
    for ks in range(w_lo, w_hi, BLOCK_N):
        k, v, n_ok = _window_keys(K, V, perm, ks, w_hi, g, d, d_ok, stride_kt, stride_kh, BLOCK_N)
        dq = _dq_step(dq, q, k, v, do, lse2, delta, row_ok[:, None] & n_ok[None, :], qk_scale, PRECISION,
                      True)
    _dq_store(DQ, GATE, dq, scale, tok64, head, d, H, row_ok, rd_mask, D, HAS_GATE, GATE_IDX, ACCUMULATE)


@triton.jit
def _win_bwd_dkdv_kernel(
    Q, K, V, DO, GATE, NEG, LSE2, DELTA, DK, DV, perm, offsets, tiles, tile_window,
    H, qk_scale, scale,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_dt, stride_dh,
    G: tl.constexpr, HG: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_N: tl.constexpr,
    D: tl.constexpr, BLOCK_D: tl.constexpr, PRECISION: tl.constexpr,
    HAS_GATE: tl.constexpr, GATE_IDX: tl.constexpr, ACCUMULATE: tl.constexpr, SIGNED: tl.constexpr,
):
    """dK/dV of one key tile (``BLOCK_N`` = the tile size) for kv head ``program_id(1)``; ``DK, DV [N, Hkv, D]``.
    Launched once per ``SIGNED`` variant (``gate.fold_gate``), the one that does not apply does nothing."""
    if _signed_variant_runs(NEG, HAS_GATE, SIGNED):
        tile = tl.program_id(0)
        g = tl.program_id(1)
        hkv = H // G
        t_start = tl.load(tiles + 2 * tile)
        t_end = tl.load(tiles + 2 * tile + 1)
        w = tl.load(tile_window + tile)
        w_lo = tl.load(offsets + w)
        w_hi = tl.load(offsets + w + 1)
        kp = t_start + tl.arange(0, BLOCK_N)
        n_ok = kp < t_end
        ktok = tl.load(perm + kp, mask=n_ok, other=0).to(tl.int64)
        d = tl.arange(0, BLOCK_D)
        d_ok = d < D
        kv_mask = n_ok[:, None] & d_ok[None, :]
        k, v = _load_kv(K, V, ktok, g, d, stride_kt, stride_kh, kv_mask)
        dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
        dv = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
        r = tl.arange(0, BLOCK_Q * HG)
        for q0 in range(w_lo, w_hi, BLOCK_Q):
            pos = q0 + r // HG
            row_ok = pos < w_hi
            tok64 = tl.load(perm + pos, mask=row_ok, other=0).to(tl.int64)
            rd_mask = row_ok[:, None] & d_ok[None, :]
            valid_t = n_ok[:, None] & row_ok[None, :]
            dk, dv = _dkdv_rows(dk, dv, k, v, Q, DO, GATE, LSE2, DELTA, tok64, g, r, d, row_ok, rd_mask, valid_t, H,
                                qk_scale, stride_qt, stride_qh, stride_dt, stride_dh, G, HG, PRECISION,
                                GATE_IDX, SIGNED)
        _dkdv_store(DK, DV, dk, dv, scale, ktok, g, hkv, d, kv_mask, D, ACCUMULATE)


def _launch_args(q, k, layout: BlockLayout, shift: int):
    part = layout.window_partition(shift)
    n, hq, dim = q.shape
    group = hq // k.shape[1]
    return part, n, hq, dim, group


def window_forward(q, k, v, layout: BlockLayout, shift: int, scale: float, *, mix=None):
    """``o [N, Hq, D]`` (dtype of q) and ``lse [N, Hq]`` float32 of the window branch.

    With ``mix = (o_cmp, o_sel, gate)`` also returns the gated output: ``(o_win, lse, o)``.
    """
    part, n, hq, dim, group = _launch_args(q, k, layout, shift)
    hkv = k.shape[1]
    o = torch.empty_like(q)
    lse = torch.empty(n, hq, device=q.device, dtype=torch.float32)
    out = torch.empty_like(q) if mix is not None else None
    n_tiles = part.tiles.shape[0]
    if n_tiles:
        oc, os_, gate = mix if mix is not None else (o, o, lse)
        fwd = config("window.FWD", head_dim=dim, dtype=q.dtype, device=q.device)
        hg = head_split(group, fwd["max_heads"])
        _win_fwd_kernel[(n_tiles, hkv * (group // hg))](
            q, k, v, o, lse, part.perm, part.offsets, part.tiles, part.tile_window,
            oc, os_, gate, out if mix is not None else o,
            hq, scale * LOG2E,
            q.stride(0), q.stride(1), k.stride(0), k.stride(1), o.stride(0), o.stride(1),
            G=group, HG=hg, BLOCK_T=WINDOW_TILE, BLOCK_N=fwd["block_n"], D=dim, BLOCK_D=block_d(dim),
            PRECISION=dot_precision(q.dtype), FUSE_GATE=mix is not None, **_launch(fwd),
        )
    return (o, lse) if mix is None else (o, lse, out)


def window_backward(do, q, k, v, lse, delta, layout: BlockLayout, shift: int, scale: float, *, gate=None,
                    gate_idx=2, dq_acc=None, dk_acc=None, dv_acc=None, accumulate=False, parts=("dq", "dkdv"),
                    fold=None):
    """Gradients of the window branch into float32 accumulators (created when not given); see
    :func:`ssa_kernels.selection.selection_backward` for the arguments. Returns ``(dq_acc, dk_acc, dv_acc)``."""
    part, n, hq, dim, group = _launch_args(q, k, layout, shift)
    hkv = k.shape[1]
    f32 = dict(device=q.device, dtype=torch.float32)
    if dq_acc is None:
        dq_acc, dk_acc, dv_acc = torch.empty(n, hq, dim, **f32), torch.empty(n, hkv, dim, **f32), torch.empty(
            n, hkv, dim, **f32)
        accumulate = False
    n_tiles = part.tiles.shape[0]
    if n_tiles == 0:
        return dq_acc, dk_acc, dv_acc
    has_gate = gate is not None
    gate_t = gate if has_gate else lse
    lse2, neg, variants = fold_gate(lse, gate, gate_idx) if fold is None else fold
    prec = dot_precision(q.dtype)
    dq_cfg = config("window.DQ", head_dim=dim, dtype=q.dtype, device=q.device)
    hg = head_split(group, dq_cfg["max_heads"])
    common = dict(G=group, D=dim, BLOCK_D=block_d(dim), PRECISION=prec,
                  HAS_GATE=has_gate,
                  GATE_IDX=gate_idx, ACCUMULATE=accumulate)
    strides = (q.stride(0), q.stride(1), k.stride(0), k.stride(1), do.stride(0), do.stride(1))
    if "dq" in parts:
        _win_bwd_dq_kernel[(n_tiles, hkv * (group // hg))](
            q, k, v, do, gate_t, lse2, delta, dq_acc, part.perm, part.offsets, part.tiles, part.tile_window,
            hq, scale * LOG2E, scale, *strides, HG=hg, BLOCK_T=WINDOW_TILE, BLOCK_N=dq_cfg["block_n"], **common,
            **_launch(dq_cfg),
        )
    if "dkdv" not in parts:
        return dq_acc, dk_acc, dv_acc
    dkdv = config("window.DKDV", head_dim=dim, dtype=q.dtype, device=q.device)
    hg = head_split(group, dkdv["max_heads"])
    for signed in variants:
        _win_bwd_dkdv_kernel[(n_tiles, hkv)](
            q, k, v, do, gate_t, neg, lse2, delta, dk_acc, dv_acc,
            part.perm, part.offsets, part.tiles, part.tile_window,
            hq, scale * LOG2E, scale, *strides, HG=hg, BLOCK_Q=max(1, dkdv["rows"] // hg), BLOCK_N=WINDOW_TILE,
            SIGNED=signed, **common, **_launch(dkdv),
        )
    return dq_acc, dk_acc, dv_acc
