"""Fused element-wise work on the GPU: layer norm + adaLN modulation in one pass (the DiT blocks) and the dense DiT's
per-head q/k normalisation (the refiners' group norm: :mod:`model.nets.group_norm_kernel`).

A DiT block normalises its residual stream three times per layer (RELEASED_MODEL.md D): ``LN(h) * (1 + scale) +
shift`` before the SSA and the MLP, and an affine ``LN(h)`` before the cross-attention. Written as PyTorch ops
(normalise in float32, cast back, scale, shift) each of these reads and writes the ``[N, C]`` stream four to six
times; at 137k tokens x 1024 channels that is ~1.5 ms of memory traffic per norm and about 0.1 s per forward of the
24-block model. :func:`layer_norm_modulate` reads the row once and writes it once, with every intermediate in
float32 (one rounding at the end, where the unfused path rounds after each op).

Sampling runs the forward kernel alone. Training (autograd) runs :class:`_NormModulateFunction`: the same kernel
also stores each row's float32 mean and rstd, and only ``x``, those two ``[N]`` vectors and the small parameters are
saved (no float32 copy of the stream, no output); the backward kernel recomputes ``x_hat`` per row and writes ``dx``
in one pass, each program summing the parameter gradients of a tile of :data:`ROWS_PER_PROGRAM` rows into float32
partial sums that a few small PyTorch ops add up (``dweight``/``dbias`` per tile; ``dshift``/``dscale`` per tile
and batch element, deterministic for a non-decreasing ``batch_index``: :func:`_backward`). ``dtype=`` picks the
output dtype (bfloat16 from a float32 stream under autocast, rounded once). Under the Triton interpreter
(``TRITON_INTERPRET=1``) :func:`layer_norm_modulate` also takes CPU tensors, for the tests. :func:`norm_modulate`
dispatches: the fused path for CUDA tensors (:func:`use_fused`; CPU tensors too under the interpreter with
:data:`INTERPRET_ON_CPU`), the plain PyTorch ops otherwise (CPU, float64), so callers need not care.
``torch.nn.functional.layer_norm`` alone cannot fold in the per-batch-element modulation, which is why this is a
kernel of ours.

:func:`head_rms_norm` is the dense DiT's per-head q/k normalisation (``F.normalize(x) * gamma * sqrt(D)`` in float32,
:class:`model.nets.dense.MultiHeadRMSNorm`) on the strided q or k columns of the merged projection: one read of
the bf16 rows and one write, where the PyTorch expression runs seven kernels (a float32 copy of the strided view,
the norm, the clamp and division, two products, the cast back) that took about 9 of the 29 ms of a guided dense
step (reports/generate_history.md).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from torch.autograd.function import once_differentiable

__all__ = ["head_rms_norm", "layer_norm_modulate", "norm_modulate", "use_fused"]

#: Warps per program of the row kernel (one row of up to a few thousand channels per program).
NUM_WARPS = 4
#: Dtypes the fused kernel takes (float32 inputs run it too; float64 stays on the PyTorch path).
FUSED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
#: Rows per program of the backward kernel (a tile: its ``dweight``/``dbias`` partial sums are one row of a
#: ``[programs, C]`` float32 buffer).
ROWS_PER_PROGRAM = 64
#: Warps per program of the backward kernel.
BWD_WARPS = 8


@triton.jit
def _layer_norm_modulate_kernel(
    X, OUT, W, B, SHIFT, SCALE, BIDX, ADD, MEAN, RSTD,
    stride_x, stride_out, stride_mod,
    num_channels, eps,
    HAS_AFFINE: tl.constexpr, HAS_MOD: tl.constexpr, HAS_BIDX: tl.constexpr, HAS_ADD: tl.constexpr,
    STORE_STATS: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """One row: with ``HAS_ADD`` first ``x = round(x + add)``, stored back into ``X`` (the row is read whole before
    it is written); then ``y = (x - mean) / sqrt(var + eps)``, ``y * w + b`` (affine),
    ``y * (1 + scale) + shift`` with the modulation row of the token's batch element (row 0 when ``HAS_BIDX`` is
    off). With ``STORE_STATS`` also ``MEAN[row]`` and ``RSTD[row] = 1 / sqrt(var + eps)`` (float32, for the
    backward)."""
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK_C)
    valid = cols < num_channels
    x = tl.load(X + row * stride_x + cols, mask=valid, other=0.0)
    if HAS_ADD:
        a = tl.load(ADD + cols, mask=valid, other=0.0).to(tl.float32)
        x = (x.to(tl.float32) + a).to(X.dtype.element_ty)  # the residual stream as stored
        tl.store(X + row * stride_x + cols, x, mask=valid)
    x = x.to(tl.float32)
    mean = tl.sum(x, axis=0) / num_channels
    centred = tl.where(valid, x - mean, 0.0)
    var = tl.sum(centred * centred, axis=0) / num_channels
    rstd = tl.rsqrt(var + eps)
    if STORE_STATS:
        tl.store(MEAN + row, mean)
        tl.store(RSTD + row, rstd)
    y = centred * rstd
    if HAS_AFFINE:
        w = tl.load(W + cols, mask=valid, other=0.0).to(tl.float32)
        b = tl.load(B + cols, mask=valid, other=0.0).to(tl.float32)
        y = y * w + b
    if HAS_MOD:
        if HAS_BIDX:
            m = tl.load(BIDX + row).to(tl.int64)
        else:
            m = 0
        shift = tl.load(SHIFT + m * stride_mod + cols, mask=valid, other=0.0).to(tl.float32)
        scale = tl.load(SCALE + m * stride_mod + cols, mask=valid, other=0.0).to(tl.float32)
        y = y * (1.0 + scale) + shift
    tl.store(OUT + row * stride_out + cols, y.to(OUT.dtype.element_ty), mask=valid)


@triton.jit
def _flush_modulation_grads(SHIFT_PART, SCALE_PART, SHIFT_ANY, SCALE_ANY, slot, element, num_channels, cols, valid,
                            acc_shift, acc_scale, ordered):
    """Write the sums of one run of rows (one batch element within one tile). ``ordered`` (non-decreasing
    ``batch_index``): a plain store into pair row ``slot = program + element``, a row no other (tile, element) pair
    writes; otherwise float32 atomic adds into the element's row of the ``[B, C]`` buffers."""
    part = slot * num_channels + cols
    tl.store(SHIFT_PART + part, acc_shift, mask=valid & ordered)
    tl.store(SCALE_PART + part, acc_scale, mask=valid & ordered)
    elem = element * num_channels + cols
    tl.atomic_add(SHIFT_ANY + elem, acc_shift, mask=valid & (ordered == 0), sem="relaxed")
    tl.atomic_add(SCALE_ANY + elem, acc_scale, mask=valid & (ordered == 0), sem="relaxed")


@triton.jit
def _layer_norm_modulate_bwd_kernel(
    X, DZ, DX, MEAN, RSTD, W, B, SCALE, BIDX, ORDERED,
    W_PART, B_PART, SHIFT_PART, SCALE_PART, SHIFT_ANY, SCALE_ANY, DSKIP,
    stride_x, stride_dz, stride_dx, stride_mod, stride_skip, num_rows, num_channels,
    HAS_AFFINE: tl.constexpr, HAS_MOD: tl.constexpr, HAS_BIDX: tl.constexpr,
    NEED_DX: tl.constexpr, NEED_AFFINE: tl.constexpr, NEED_MOD: tl.constexpr, HAS_SKIP: tl.constexpr,
    ROWS: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """Backward of :func:`_layer_norm_modulate_kernel` over the ``ROWS`` rows ``[program * ROWS, ...)``.

    Per row, in float32: ``x_hat = (x - mean) * rstd``, ``y = x_hat * w + b`` (or ``x_hat``), ``dy = dz * (1 +
    scale)``, ``dx_hat = dy * w`` (or ``dy``) and ``dx = rstd * (dx_hat - mean(dx_hat) - x_hat * mean(dx_hat *
    x_hat))`` (``NEED_DX``; plus the row of ``DSKIP`` with ``HAS_SKIP``, stored in DX's dtype). Summed over the
    tile: ``dy * x_hat`` and ``dy`` into row ``program`` of ``W_PART``/``B_PART`` (``NEED_AFFINE``); ``dz`` and ``dz *
    y`` per run of rows of one batch element, written by :func:`_flush_modulation_grads` when the element changes and
    at the end (``NEED_MOD``)."""
    pid = tl.program_id(0)
    first = pid * ROWS
    last = tl.minimum(first + ROWS, num_rows)
    cols = tl.arange(0, BLOCK_C)
    valid = cols < num_channels
    if HAS_AFFINE:
        w = tl.load(W + cols, mask=valid, other=0.0).to(tl.float32)
        b = tl.load(B + cols, mask=valid, other=0.0).to(tl.float32)
    acc_w = tl.zeros([BLOCK_C], dtype=tl.float32)
    acc_b = tl.zeros([BLOCK_C], dtype=tl.float32)
    acc_shift = tl.zeros([BLOCK_C], dtype=tl.float32)
    acc_scale = tl.zeros([BLOCK_C], dtype=tl.float32)
    if HAS_BIDX:
        cur = tl.load(BIDX + first).to(tl.int64)  # the batch element of the current run of rows
        ordered = tl.load(ORDERED) != 0
    else:
        cur = pid.to(tl.int64) * 0
        ordered = pid >= 0
    for i in range(0, last - first):
        r = first.to(tl.int64) + i
        rstd = tl.load(RSTD + r)
        x = tl.load(X + r * stride_x + cols, mask=valid, other=0.0).to(tl.float32)
        x_hat = tl.where(valid, (x - tl.load(MEAN + r)) * rstd, 0.0)
        dz = tl.load(DZ + r * stride_dz + cols, mask=valid, other=0.0).to(tl.float32)
        dy = dz
        if HAS_MOD:
            if HAS_BIDX:
                m = tl.load(BIDX + r).to(tl.int64)
                if NEED_MOD:
                    if m != cur:  # a new batch element starts inside the tile: write the finished run
                        _flush_modulation_grads(SHIFT_PART, SCALE_PART, SHIFT_ANY, SCALE_ANY, pid + cur, cur,
                                                num_channels, cols, valid, acc_shift, acc_scale, ordered)
                        acc_shift = tl.zeros([BLOCK_C], dtype=tl.float32)
                        acc_scale = tl.zeros([BLOCK_C], dtype=tl.float32)
                        cur = m
            else:
                m = 0
            scale = tl.load(SCALE + m * stride_mod + cols, mask=valid, other=0.0).to(tl.float32)
            dy = dz * (1.0 + scale)
            if NEED_MOD:
                if HAS_AFFINE:
                    y = x_hat * w + b
                else:
                    y = x_hat
                acc_shift += dz
                acc_scale += dz * y
        if HAS_AFFINE:
            if NEED_AFFINE:
                acc_w += dy * x_hat
                acc_b += dy
            dx_hat = dy * w
        else:
            dx_hat = dy
        if NEED_DX:
            mean_dxh = tl.sum(dx_hat, axis=0) / num_channels
            mean_dxh_xh = tl.sum(dx_hat * x_hat, axis=0) / num_channels
            dx = (dx_hat - mean_dxh - x_hat * mean_dxh_xh) * rstd
            if HAS_SKIP:  # the gradient reaching x past the norm (the residual stream), added before the rounding
                dx += tl.load(DSKIP + r * stride_skip + cols, mask=valid, other=0.0).to(tl.float32)
            tl.store(DX + r * stride_dx + cols, dx.to(DX.dtype.element_ty), mask=valid)
    if NEED_AFFINE:
        tl.store(W_PART + pid.to(tl.int64) * num_channels + cols, acc_w, mask=valid)
        tl.store(B_PART + pid.to(tl.int64) * num_channels + cols, acc_b, mask=valid)
    if NEED_MOD:
        _flush_modulation_grads(SHIFT_PART, SCALE_PART, SHIFT_ANY, SCALE_ANY, pid + cur, cur, num_channels, cols,
                                valid, acc_shift, acc_scale, ordered)


#: Rows (token, head) per program of the head RMS norm kernel.
HEAD_NORM_ROWS = 64
#: ``F.normalize``'s default ``eps``: a row's norm is clamped to at least this before the division.
NORMALIZE_EPS = 1e-12


@triton.jit
def _head_rms_norm_kernel(X, GAMMA, OUT, rows, heads, stride_t, stride_h, scale, eps,
                          D: tl.constexpr, BLOCK_D: tl.constexpr, ROWS: tl.constexpr):
    """Rows ``r = token * heads + head`` of ``X`` (``[T, H, D]``, strides ``stride_t``, ``stride_h``, 1) into the
    contiguous ``OUT [T, H, D]``: ``x / max(|x|, eps) * gamma[head] * scale`` in float32, one rounding."""
    r = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)
    d = tl.arange(0, BLOCK_D)
    ok = r < rows
    h = r % heads
    mask = ok[:, None] & (d < D)[None, :]
    x = tl.load(X + ((r // heads) * stride_t + h * stride_h)[:, None] + d[None, :], mask=mask, other=0.0)
    x = x.to(tl.float32)
    norm = tl.sqrt(tl.sum(x * x, axis=1))
    gamma = tl.load(GAMMA + h[:, None] * D + d[None, :], mask=mask, other=0.0).to(tl.float32)
    y = x / tl.maximum(norm, eps)[:, None] * gamma * scale
    tl.store(OUT + r[:, None] * D + d[None, :], y.to(OUT.dtype.element_ty), mask=mask)


def head_rms_norm(x: torch.Tensor, gamma: torch.Tensor, scale: float, eps: float = NORMALIZE_EPS) -> torch.Tensor:
    """``(F.normalize(x.float(), dim=-1) * gamma.float() * scale).to(x.dtype)`` for ``x [..., H, D]`` (any strides
    with a contiguous last dim, e.g. the q columns of a merged q/k/v projection) and ``gamma [H, D]``, in one
    Triton kernel (CUDA, or the CPU under the interpreter; no autograd). Returns a contiguous tensor of ``x``'s
    shape and dtype."""
    if x.dim() < 2 or tuple(gamma.shape) != tuple(x.shape[-2:]):
        raise ValueError(f"x must be [..., H, D] and gamma [H, D], got {tuple(x.shape)} and {tuple(gamma.shape)}")
    if x.dtype not in FUSED_DTYPES:
        raise TypeError(f"x must be one of {FUSED_DTYPES}, got {x.dtype}")
    if not (x.is_cuda or _interpreting()) or gamma.device != x.device:
        raise ValueError(f"x and gamma must be on one CUDA device, got {x.device} and {gamma.device}")
    heads, dim = x.shape[-2:]
    flat = x.reshape(-1, heads, dim) if x.dim() != 3 else x  # a view wherever the leading dims merge
    if flat.stride(-1) != 1:
        flat = flat.contiguous()
    out = torch.empty(flat.shape, device=x.device, dtype=x.dtype)
    rows = flat.shape[0] * heads
    if rows:
        _head_rms_norm_kernel[(triton.cdiv(rows, HEAD_NORM_ROWS),)](
            flat, gamma.contiguous(), out, rows, heads, flat.stride(0), flat.stride(1), float(scale), float(eps),
            D=dim, BLOCK_D=triton.next_power_of_2(dim), ROWS=HEAD_NORM_ROWS, num_warps=NUM_WARPS)
    return out.view(x.shape)


def layer_norm_modulate(x: torch.Tensor, eps: float, *, weight: torch.Tensor | None = None,
                        bias: torch.Tensor | None = None, shift: torch.Tensor | None = None,
                        scale: torch.Tensor | None = None, batch_index: torch.Tensor | None = None,
                        add: torch.Tensor | None = None, out: torch.Tensor | None = None,
                        dtype: torch.dtype | None = None,
                        project: tuple[torch.Tensor, torch.Tensor | None] | None = None, pass_input: bool = False):
    """Fused ``LN(x) [* weight + bias] [* (1 + scale) + shift]`` on a CUDA tensor, autograd-capable.

    Args:
        x: ``[N, C]`` float16/bfloat16/float32 (rows contiguous, else copied).
        eps: the layer norm's epsilon.
        weight, bias: ``[C]`` affine parameters, both or neither.
        shift, scale: ``[B, C]`` modulation rows, both or neither; row ``batch_index[i]`` modulates token ``i``
            (``batch_index [N]`` int, or None when ``B == 1``). Indices are not range-checked. The backward wants
            ``batch_index`` non-decreasing (rows of one batch element contiguous, as the sparse tensors sort them):
            its ``dshift``/``dscale`` sums are then deterministic; any other order is detected on the device (no
            synchronisation) and summed with float32 atomics instead (correct, not bitwise reproducible).
        add: ``[C]``: first add this vector to every row **of x in place** (``x += add``, rounded to x's dtype:
            a residual stream's pending constant) and normalise the sum. Inference only: refused while a gradient
            is recorded for any input.
        out: ``[N, C]`` tensor of dtype ``dtype`` to write into (rows contiguous; default a new one).
        dtype: the result's dtype (float16/bfloat16/float32; default ``x.dtype``): e.g. bfloat16 from a float32
            stream under autocast, rounded once.
        project: ``(w [M, C], b [M] or None)``: return ``F.linear(result, w, b)`` (``[N, M]`` in ``dtype``, the
            weights cast to it) instead; under autograd the normalised rows are not kept for the backward pass but
            recomputed by the forward kernel (:class:`_NormLinearFunction`): the ``[N, C]`` input of a projection
            that follows a norm is the largest thing autograd would keep for it. Not with ``add`` or ``out``.
        pass_input: return ``(result, x)``, x through the same autograd function: under autograd the gradient that
            reaches this second output (x's other uses: the residual stream that the norm reads) is added to the
            norm's ``dx`` inside the backward kernel, where autograd would add the two ``[N, C]`` gradients with
            one more pass over them. Use the returned x in place of x afterwards.

    When a gradient is recorded (grad mode on and any of x, weight, bias, shift, scale requiring it) this runs
    :class:`_NormModulateFunction` (the kernel also stores each row's mean and rstd; the backward kernel gives every
    gradient), else the forward kernel alone. Returns ``[N, C]`` in ``dtype`` (``out`` when given).
    """
    if not isinstance(x, torch.Tensor) or x.dim() != 2 or not (x.is_cuda or _interpreting()):
        raise ValueError(f"x must be a [N, C] CUDA tensor, got {_describe(x)}")
    if x.dtype not in FUSED_DTYPES:
        raise TypeError(f"x must be one of {FUSED_DTYPES}, got {x.dtype}")
    dtype = x.dtype if dtype is None else dtype
    if dtype not in FUSED_DTYPES:
        raise TypeError(f"dtype must be one of {FUSED_DTYPES}, got {dtype}")
    if (weight is None) != (bias is None):
        raise ValueError("weight and bias must be given together")
    if (shift is None) != (scale is None):
        raise ValueError("shift and scale must be given together")
    n, c = x.shape
    for name, t in (("weight", weight), ("bias", bias)):
        if t is not None:
            _check_param(name, t, x)
            if t.numel() != c:
                raise ValueError(f"{name} must have {c} values, got shape {tuple(t.shape)}")
    has_mod = shift is not None
    if has_mod:
        for name, t in (("shift", shift), ("scale", scale)):
            _check_param(name, t, x)
            if t.dim() not in (1, 2) or t.shape[-1] != c:
                raise ValueError(f"{name} must be [B, {c}], got shape {tuple(t.shape)}")
        if shift.shape != scale.shape:
            raise ValueError(f"shift {tuple(shift.shape)} and scale {tuple(scale.shape)} differ")
        rows = shift.numel() // c
        if batch_index is None and rows != 1:
            raise ValueError(f"{rows} modulation rows need batch_index")
        if batch_index is not None:
            if not isinstance(batch_index, torch.Tensor) or batch_index.shape != (n,):
                raise ValueError(f"batch_index must be [{n}], got {_describe(batch_index)}")
            if batch_index.dtype not in (torch.int32, torch.int64):
                raise TypeError(f"batch_index must be int32 or int64, got {batch_index.dtype}")
            if batch_index.device != x.device:
                raise ValueError(f"batch_index is on {batch_index.device}, x on {x.device}")
            batch_index = batch_index.contiguous()
    else:
        batch_index = None  # nothing to pick
    if out is not None and (out.shape != x.shape or out.dtype != dtype or out.stride(1) != 1):
        raise ValueError(f"out must be a [N, C] {dtype} tensor with contiguous rows, got {tuple(out.shape)} "
                         f"{out.dtype}")
    if add is not None:
        if x.stride(1) != 1:
            raise ValueError("add= updates x in place: x's rows must be contiguous")
        if add.numel() != c:
            raise ValueError(f"add must have {c} values, got shape {tuple(add.shape)}")
        add = add.reshape(c).contiguous()
    x = x if x.stride(1) == 1 else x.contiguous()
    if project is not None:
        if add is not None or out is not None:
            raise ValueError("project= takes neither add= nor out=")
        pw, pb = _check_project(project, x)
        if torch.is_grad_enabled() and any(t is not None and t.requires_grad
                                           for t in (x, weight, bias, shift, scale, pw, pb)):
            return _NormLinearFunction.apply(x, weight, bias, shift, scale, batch_index, float(eps), dtype, pw, pb,
                                             bool(pass_input))
        with torch.no_grad():
            u = layer_norm_modulate(x, eps, weight=weight, bias=bias, shift=shift, scale=scale,
                                    batch_index=batch_index, dtype=dtype)
            y = F.linear(u, pw.to(dtype), None if pb is None else pb.to(dtype))
        return (y, x) if pass_input else y
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x, weight, bias, shift, scale)):
        if add is not None:
            raise ValueError("add= updates x in place and is for inference (no autograd)")
        y = _NormModulateFunction.apply(x, weight, bias, shift, scale, batch_index, float(eps), dtype,
                                        bool(pass_input))
        y, x = y if pass_input else (y, x)
        y = y if out is None else out.copy_(y)
        return (y, x) if pass_input else y
    if has_mod:
        shift, scale = shift.reshape(-1, c).contiguous(), scale.reshape(-1, c).contiguous()
    y = _forward(x, eps, weight, bias, shift, scale, batch_index, add, out, dtype, stats=False)[0]
    return (y, x) if pass_input else y


def _check_project(project, x: torch.Tensor):
    """``project = (w [M, C], b [M] or None)`` checked against ``x [N, C]``; returns ``(w, b)``."""
    if not isinstance(project, (tuple, list)) or len(project) != 2:
        raise TypeError(f"project must be a (weight, bias) pair, got {type(project).__name__}")
    w, b = project
    _check_param("project weight", w, x)
    if w.dim() != 2 or w.shape[1] != x.shape[1]:
        raise ValueError(f"project weight must be [M, {x.shape[1]}], got shape {tuple(w.shape)}")
    if b is not None:
        _check_param("project bias", b, x)
        if b.shape != (w.shape[0],):
            raise ValueError(f"project bias must be [{w.shape[0]}], got shape {tuple(b.shape)}")
    return w, b


def _describe(t) -> str:
    return f"shape {tuple(t.shape)} on {t.device}" if isinstance(t, torch.Tensor) else type(t).__name__


def _check_param(name: str, t, x: torch.Tensor) -> None:
    """``t`` is a floating tensor on ``x``'s device (else ValueError/TypeError naming it)."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a tensor, got {type(t).__name__}")
    if not t.is_floating_point():
        raise TypeError(f"{name} must be a floating tensor, got {t.dtype}")
    if t.device != x.device:
        raise ValueError(f"{name} is on {t.device}, x on {x.device}")


def _forward(x, eps, weight, bias, shift, scale, batch_index, add, out, dtype, *, stats: bool):
    """Launch the forward kernel on checked inputs (``shift``/``scale`` contiguous ``[B, C]``). Returns ``(out,
    mean, rstd)``, the statistics float32 ``[N]`` with ``stats``, else None."""
    n, c = x.shape
    if out is None:
        out = torch.empty(n, c, device=x.device, dtype=dtype)
    mean = rstd = None
    if stats:
        mean = torch.empty(n, device=x.device, dtype=torch.float32)
        rstd = torch.empty_like(mean)
    if n == 0:
        return out, mean, rstd
    has_mod = shift is not None
    dummy = x  # never read: the constexpr flags switch the loads off
    _layer_norm_modulate_kernel[(n,)](
        x, out,
        weight if weight is not None else dummy, bias if bias is not None else dummy,
        shift if has_mod else dummy, scale if has_mod else dummy,
        batch_index if batch_index is not None else dummy,
        add if add is not None else dummy,
        mean if stats else dummy, rstd if stats else dummy,
        x.stride(0), out.stride(0), shift.stride(0) if has_mod else 0,
        c, float(eps),
        HAS_AFFINE=weight is not None, HAS_MOD=has_mod, HAS_BIDX=has_mod and batch_index is not None,
        HAS_ADD=add is not None, STORE_STATS=stats, BLOCK_C=triton.next_power_of_2(c), num_warps=NUM_WARPS,
    )
    return out, mean, rstd


class _NormModulateFunction(torch.autograd.Function):
    """Autograd form of :func:`layer_norm_modulate` (inputs checked there; no ``add``/``out``). Saves ``x``, the
    float32 row statistics ``mean``/``rstd`` ``[N]`` and the small parameters: neither the output nor a float32
    copy of ``x``. The backward is :func:`_backward`; inputs without ``requires_grad`` get None.
    With ``pass_input`` it returns ``(out, x)``: the gradient reaching the second output (x's other uses, such as a
    residual stream) is added to ``dx`` inside the backward kernel instead of by autograd's accumulation."""

    @staticmethod
    def forward(ctx, x, weight, bias, shift, scale, batch_index, eps, dtype, pass_input=False):
        out, mean, rstd, _, scale2 = _norm_forward(ctx, x, weight, bias, shift, scale, batch_index, eps, dtype)
        ctx.save_for_backward(x, mean, rstd, weight, bias, scale2, batch_index)
        return (out, x) if pass_input else out

    @staticmethod
    @once_differentiable
    def backward(ctx, dz, dskip=None):
        x, mean, rstd, weight, bias, scale, batch_index = ctx.saved_tensors
        return (*_norm_grads(ctx, dz, x, mean, rstd, weight, bias, scale, batch_index, dskip), None, None, None,
                None)


class _NormLinearFunction(torch.autograd.Function):
    """``F.linear(layer_norm_modulate(x, ...), w, b)`` (:func:`layer_norm_modulate` with ``project=``) that keeps
    what :class:`_NormModulateFunction` keeps (x, the row statistics, the small parameters) plus the projection's
    weights, not the normalised rows ``u [N, C]``: the backward recomputes them with the forward kernel (one read
    of x and one write of u, ~0.3 ms at 137k x 1024 on an H100), forms ``dw = dout^T u``, ``db``, ``du = dout w``
    and runs :func:`_backward` on ``du``. In a DiT block this drops the norms' outputs (281 MB each at 137k tokens
    in bf16) from what the block keeps for its backward pass. ``pass_input``: as :class:`_NormModulateFunction`'s."""

    @staticmethod
    def forward(ctx, x, weight, bias, shift, scale, batch_index, eps, dtype, pw, pb, pass_input=False):
        u, mean, rstd, shift2, scale2 = _norm_forward(ctx, x, weight, bias, shift, scale, batch_index, eps, dtype)
        ctx.save_for_backward(x, mean, rstd, weight, bias, shift2, scale2, batch_index, pw, pb)
        ctx.eps, ctx.dtype = eps, dtype
        with torch.autocast(device_type=x.device.type, enabled=False):
            out = F.linear(u, pw.to(dtype), None if pb is None else pb.to(dtype))
        return (out, x) if pass_input else out

    @staticmethod
    @once_differentiable
    def backward(ctx, dout, dskip=None):
        x, mean, rstd, weight, bias, shift, scale, batch_index, pw, pb = ctx.saved_tensors
        dtype = ctx.dtype
        need_pw, need_pb = ctx.needs_input_grad[8:10]
        u = _forward(x, ctx.eps, weight, bias, shift, scale, batch_index, None, None, dtype, stats=False)[0]
        dout = dout.to(dtype)
        dpw = dout.t().mm(u).to(pw.dtype) if need_pw else None
        dpb = dout.sum(0, dtype=torch.promote_types(dtype, torch.float32)).to(pb.dtype) if need_pb else None
        del u
        grads = (None,) * 5
        if any(ctx.needs_input_grad[:5]):
            grads = _norm_grads(ctx, dout.mm(pw.to(dtype)), x, mean, rstd, weight, bias, scale, batch_index, dskip)
        return (*grads, None, None, None, dpw, dpb, None)


def _norm_forward(ctx, x, weight, bias, shift, scale, batch_index, eps, dtype):
    """The forward kernel with the row statistics for the autograd functions; records the modulation rows' shapes
    and dtypes on ``ctx`` for :func:`_norm_grads`. Returns ``(out, mean, rstd, shift2, scale2)``, the modulation
    rows as contiguous ``[B, C]`` (None without modulation)."""
    c = x.shape[1]
    has_mod = shift is not None
    shift2 = shift.reshape(-1, c).contiguous() if has_mod else None
    scale2 = scale.reshape(-1, c).contiguous() if has_mod else None
    out, mean, rstd = _forward(x, eps, weight, bias, shift2, scale2, batch_index, None, None, dtype, stats=True)
    ctx.mod = (shift.shape, shift.dtype, scale.shape, scale.dtype) if has_mod else None
    return out, mean, rstd, shift2, scale2


def _norm_grads(ctx, dz, x, mean, rstd, weight, bias, scale, batch_index, dskip=None):
    """``(dx, dweight, dbias, dshift, dscale)`` of the norm from ``dz`` (:func:`_backward`; ``dskip`` added to
    ``dx``), each in its input's shape and dtype, None for the inputs (the first five of the function) that need no
    gradient."""
    need_x, need_w, need_b, need_shift, need_scale = ctx.needs_input_grad[:5]
    dx, dw, db, dshift, dscale = _backward(dz, x, mean, rstd, weight, bias, scale, batch_index, need_dx=need_x,
                                           need_affine=need_w or need_b, need_mod=need_shift or need_scale,
                                           skip=dskip)
    if ctx.mod is not None and dshift is not None:
        shift_shape, shift_dtype, scale_shape, scale_dtype = ctx.mod
        dshift = dshift.reshape(shift_shape).to(shift_dtype)
        dscale = dscale.reshape(scale_shape).to(scale_dtype)
    return (dx, dw.to(weight.dtype) if need_w else None, db.to(bias.dtype) if need_b else None,
            dshift if need_shift else None, dscale if need_scale else None)


def _backward(dz, x, mean, rstd, weight, bias, scale, batch_index, *, need_dx: bool, need_affine: bool,
              need_mod: bool, skip: torch.Tensor | None = None):
    """Gradients of :func:`layer_norm_modulate` from ``dz = dL/dout [N, C]``: ``(dx, dweight, dbias, dshift,
    dscale)``, ``dx`` in ``x.dtype`` and the others float32 (``[C]`` and ``[B, C]``), None where not asked for.
    ``skip [N, C]``: a gradient of x from elsewhere, added to ``dx`` in float32 before its one rounding.

    :func:`_layer_norm_modulate_bwd_kernel` runs one program per :data:`ROWS_PER_PROGRAM` rows. ``dweight`` and
    ``dbias`` are its per-program partial sums ``[programs, C]`` summed afterwards. ``dshift``/``dscale``: a tile
    of a non-decreasing ``batch_index`` holds the batch elements ``first(p) .. last(p)`` with ``last(p) <=
    first(p + 1)``, so the slot ``p + m`` of the pair (tile p, element m) is distinct for distinct pairs and the
    slots of one element form the run ``first_tile(m) + m .. last_tile(m) + m``: the kernel stores each pair's sum
    in its slot of a zeroed ``[programs + B - 1, C]`` buffer and the runs are summed by :func:`_element_sums`
    (deterministic, no host synchronisation). A ``batch_index`` out of order (checked on the device, also without
    synchronisation) leaves that buffer zero and the kernel adds into ``[B, C]`` with float32 atomics instead."""
    n, c = x.shape
    dz = dz if dz.stride(1) == 1 else dz.contiguous()
    has_skip = need_dx and skip is not None
    if has_skip and skip.stride(1) != 1:
        skip = skip.contiguous()
    has_affine, has_mod = weight is not None, scale is not None
    has_bidx = has_mod and batch_index is not None
    need_affine, need_mod = need_affine and has_affine, need_mod and has_mod
    f32 = dict(device=x.device, dtype=torch.float32)
    dx = torch.empty_like(x) if need_dx else None
    programs = triton.cdiv(n, ROWS_PER_PROGRAM)
    elements = scale.shape[0] if has_mod else 1
    if not (need_dx or need_affine or need_mod):
        return dx, None, None, None, None
    if n == 0:
        z = torch.zeros(c, **f32) if need_affine else None
        m = torch.zeros(elements, c, **f32) if need_mod else None
        return dx, z, z, m, m
    wb_part = torch.empty(2, programs, c, **f32) if need_affine else None
    slots = programs + elements - 1 if has_bidx else programs
    mod_part = torch.zeros(2, slots, c, **f32) if need_mod else None
    mod_any = torch.zeros(2, elements, c, **f32) if need_mod and has_bidx else None
    if has_bidx:
        ordered = (batch_index[1:] >= batch_index[:-1]).all().to(torch.int32).reshape(1)
    dummy = rstd  # never touched: the constexpr flags switch those accesses off
    _layer_norm_modulate_bwd_kernel[(programs,)](
        x, dz, dx if need_dx else dummy, mean, rstd,
        weight if has_affine else dummy, bias if has_affine else dummy, scale if has_mod else dummy,
        batch_index if has_bidx else dummy, ordered if has_bidx else dummy,
        wb_part[0] if need_affine else dummy, wb_part[1] if need_affine else dummy,
        mod_part[0] if need_mod else dummy, mod_part[1] if need_mod else dummy,
        mod_any[0] if need_mod and has_bidx else dummy, mod_any[1] if need_mod and has_bidx else dummy,
        skip if has_skip else dummy,
        x.stride(0), dz.stride(0), dx.stride(0) if need_dx else 0, scale.stride(0) if has_mod else 0,
        skip.stride(0) if has_skip else 0, n, c,
        HAS_AFFINE=has_affine, HAS_MOD=has_mod, HAS_BIDX=has_bidx,
        NEED_DX=need_dx, NEED_AFFINE=need_affine, NEED_MOD=need_mod, HAS_SKIP=has_skip,
        ROWS=ROWS_PER_PROGRAM, BLOCK_C=triton.next_power_of_2(c), num_warps=BWD_WARPS,
    )
    dw = db = dshift = dscale = None
    if need_affine:
        dw, db = wb_part.sum(1).unbind(0)
    if need_mod:
        if has_bidx:
            sums = _element_sums(mod_part, batch_index, elements) + mod_any
        else:
            sums = mod_part.sum(1, keepdim=True)
        dshift, dscale = sums.unbind(0)
    return dx, dw, db, dshift, dscale


def _element_sums(part: torch.Tensor, batch_index: torch.Tensor, elements: int) -> torch.Tensor:
    """``[2, B, C]`` float32 sums of the pair slots ``part [2, programs + B - 1, C]`` of each batch element
    (:func:`_backward`): the slots ``first_tile(m) + m .. last_tile(m) + m`` of a non-empty element, none of an
    empty one, as one float64 product ``[B, slots] @ [2, slots, C]`` with a 0/1 matrix (exact selection, parallel
    and deterministic; a scan along the slots would be sequential per column). For a ``batch_index`` out of order
    the bounds are meaningless but ``part`` is zero: zero sums."""
    slots = part.shape[1]
    element = torch.arange(elements + 1, device=part.device, dtype=batch_index.dtype)
    bounds = torch.searchsorted(batch_index, element)  # rows of element m: bounds[m] .. bounds[m + 1] - 1
    start, end = bounds[:-1, None], bounds[1:, None]
    element = element[:-1, None].long()
    slot = torch.arange(slots, device=part.device)[None]
    pick = ((slot >= start // ROWS_PER_PROGRAM + element) & (slot <= (end - 1) // ROWS_PER_PROGRAM + element)
            & (end > start))
    return torch.matmul(pick.double(), part.double()).float()


#: Switch for the fused path (benchmarks time the unfused ops by turning it off).
ENABLED = True
#: Under the Triton interpreter, let :func:`norm_modulate` run the kernels on CPU tensors too (the tests switch it
#: on; off by default so that CPU model tests keep the PyTorch ops instead of interpreting every norm).
INTERPRET_ON_CPU = False


def _interpreting() -> bool:
    import os

    return os.environ.get("TRITON_INTERPRET") == "1"


def use_fused(x: torch.Tensor) -> bool:
    """Whether :func:`norm_modulate` takes the fused path for ``x``: :data:`ENABLED`, a ``[N, C]`` tensor of a
    supported dtype on CUDA (or on the CPU under the interpreter with :data:`INTERPRET_ON_CPU`). Without a recorded
    gradient that is the forward kernel alone, with one the autograd function (forward + backward kernels)."""
    return (ENABLED and x.dim() == 2 and x.dtype in FUSED_DTYPES
            and (x.is_cuda or (INTERPRET_ON_CPU and _interpreting())))


def norm_modulate(norm: torch.nn.LayerNorm, x: torch.Tensor, shift: torch.Tensor | None = None,
                  scale: torch.Tensor | None = None, batch_index: torch.Tensor | None = None, *,
                  add: torch.Tensor | None = None, out: torch.Tensor | None = None,
                  dtype: torch.dtype | None = None,
                  project: tuple[torch.Tensor, torch.Tensor | None] | None = None, pass_input: bool = False):
    """``norm(x) * (1 + scale) + shift`` (or ``norm(x)`` without modulation), ``x [N, C]``; with ``project=(w,
    b)`` that result through ``F.linear(., w, b)`` (under autograd on the fused path without keeping the
    normalised rows: :func:`layer_norm_modulate`).

    ``norm`` is a ``LayerNorm`` over the last dimension (affine or not), computed in at least float32. ``shift`` and
    ``scale`` are ``[1, C]`` (one batch element) or ``[B, C]`` with ``batch_index [N]`` (non-decreasing for the
    deterministic backward: :func:`layer_norm_modulate`). The result has ``dtype`` (default ``x``'s dtype; e.g.
    bfloat16 for a float32 stream under autocast). Fused where :func:`use_fused` allows: the forward kernel without
    a recorded gradient, :class:`_NormModulateFunction` (fused backward too) with one; otherwise the PyTorch ops.

    ``add [C]`` (no autograd: ValueError while grad mode is on): first ``x += add`` in place (rounded to x's dtype),
    then normalise: a residual stream's pending constant folded into the norm that reads it. ``out``: where to write
    the result. ``pass_input``: return ``(result, x)`` (:func:`layer_norm_modulate`'s; on the PyTorch path x itself,
    and autograd adds its gradients as usual).
    """
    affine = norm.weight is not None
    fused = (use_fused(x) and tuple(norm.normalized_shape) == (x.shape[-1],)
             and (norm.bias is not None) == affine and (dtype is None or dtype in FUSED_DTYPES))
    if add is not None:
        if torch.is_grad_enabled():
            raise ValueError("add= updates x in place and is for inference (no autograd)")
        if not fused:
            cdt = torch.promote_types(x.dtype, torch.float32)
            x.copy_(x.to(cdt) + add.to(cdt))  # one rounding, as the kernel
            add = None
    if fused:
        return layer_norm_modulate(x, norm.eps, weight=norm.weight if affine else None,
                                   bias=norm.bias if affine else None, shift=shift, scale=scale,
                                   batch_index=batch_index, add=add, out=out, dtype=dtype, project=project,
                                   pass_input=pass_input)
    y = _plain_norm_modulate(norm, x, shift, scale, batch_index, out, dtype, project)
    return (y, x) if pass_input else y


def _plain_norm_modulate(norm, x, shift, scale, batch_index, out, dtype, project):
    """:func:`norm_modulate` in PyTorch ops (``add`` already applied)."""
    if project is not None and out is not None:
        raise ValueError("project= takes neither add= nor out=")
    y = norm(x)
    if shift is not None:
        if batch_index is not None:
            shift, scale = shift.index_select(0, batch_index), scale.index_select(0, batch_index)
        y = y * (1 + scale) + shift
    if dtype is not None:
        y = y.to(dtype)
    if project is not None:
        w, b = _check_project(project, x)
        return F.linear(y, w.to(y.dtype), None if b is None else b.to(y.dtype))
    if out is not None:
        return out.copy_(y)
    return y


def _reference(x, eps, weight=None, bias=None, shift=None, scale=None, batch_index=None) -> torch.Tensor:
    """Float32 PyTorch form of :func:`layer_norm_modulate` (tests)."""
    y = F.layer_norm(x.float(), (x.shape[-1],), None if weight is None else weight.float(),
                     None if bias is None else bias.float(), eps)
    if shift is not None:
        if batch_index is not None:
            shift, scale = shift[batch_index.long()], scale[batch_index.long()]
        y = y * (1 + scale.float()) + shift.float()
    return y.to(x.dtype)
