"""Dense 3^3 convolution with few channels (zero padding 1, stride 1) as one Triton kernel, for the refiners.

The two dense refiners (:mod:`model.nets.refiner`) run UNets on patches of 192^3 and 256^3 voxels whose
full-resolution layers are 3^3 convolutions with 1 to 27 channels (1 -> 8, 8 -> 8, 16 -> 8, 8 -> 27, 8 -> 1) in
NCDHW layout. cuDNN runs them as implicit GEMMs in NDHWC: it transposes every input and output (its nchwToNhwc /
nhwcToNchw kernels), and with 8 output channels most of its GEMM tile is empty (the 256x32x32 tile it picks has
N = 32). In the profile of one 256^3 sign-refiner patch on an H100 (reports/refiner.md) that GEMM kernel took
51 ms in 13 calls (~3.9 ms each for 8 -> 8) and the layout transposes 30 ms, while one 8 -> 8 convolution at 256^3
reads and writes ~0.5 GB (~0.2 ms of HBM traffic) and needs 1,728 FMA per voxel (~1 ms on the CUDA cores).

:func:`conv3d_small` reads NCDHW directly and writes NCDHW directly, with no transposes and no padded copy. Program
``(row, tile)`` owns one output row ``(b, z, y)`` (recovered from ``row`` with scalar integer math once per
program) and ``BLOCK_W`` consecutive ``x``, for all output channels: an accumulator ``acc [COUT_P, BLOCK_W]``
(float32; ``COUT_P`` = ``Cout`` rounded up to a power of two, masked at the store). For each of the 27 taps and
each input channel it loads one input vector ``[BLOCK_W]`` along contiguous ``x`` (coalesced; neighbouring taps
read the same lines again, from L1/L2) and one weight column ``[COUT_P]`` (float32), and adds their outer product.
``Cin`` and ``Cout`` are compile-time constants; the 27 taps unroll inside a loop over the ``Cin`` input channels
(unrolling the channels too made the Triton 3.6 layout passes take ~35 s to compile one 8 -> 8 kernel for sm_90,
against ~1 s). Zero padding is masks: the ``z``/``y`` validity of a tap row is one scalar, the ``x`` validity one
of three vectors computed once per program; no division per element. Bias and ReLU are fused before the single
rounding to the output dtype. This runs on the CUDA cores (the default, and the tested path).

Compiled ahead of time for sm_90 (no GPU here), Triton puts lanes and warps along ``x``, so each thread holds all
``COUT_P`` channels of :data:`X_PER_THREAD` = 2 output ``x``; per tap and input channel a thread issues 2 input
loads, ``COUT_P`` uniform weight loads (L1 broadcasts) and ``2 x COUT_P`` FMA. ptxas (bf16, the default tiles
for W = 64 and 256) reported 123-125 registers per thread for 8 -> 8 and 16 -> 8 (the scheduler hoists the 27 taps'
loads), 158-168 for 8 -> 27, 40-64 for 1 -> 8, 87 for 8 -> 1, and no spills. :data:`X_PER_THREAD`, ``block_w``
and ``num_warps`` are the knobs for the timing run.

A tensor-core variant (``use_dot=True``, or module-level :data:`USE_DOT`) computes the same sum as an implicit
GEMM: per program ``[BLOCK_W, 27 x Cin] @ [27 x Cin, Cout]``, the first operand gathered in chunks of
:data:`DOT_BLOCK_K` (tap, channel) columns straight from NCDHW (per-column offsets from a small host table), the
channels padded to 16. ``tl.dot`` takes both operands in one dtype, so this variant rounds the weights to ``x``'s
dtype (float16/bfloat16; float32 runs with IEEE products), as cuDNN does; the FMA kernel keeps them in float32.

The kernel was designed for the refiners' shapes (batch 1, 192^3 / 256^3, fp16/bf16, inference) and is timed
against cuDNN by ``python -m model.reports.refiner``; whether it wins for a given shape is that report's call, not
this docstring's. Forward only (no autograd). Under the Triton interpreter (``TRITON_INTERPRET=1``) it also takes
CPU tensors, for the tests (tests/test_conv3d_kernel.py).
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

__all__ = ["KERNEL_DTYPES", "MAX_CHANNELS", "USE_DOT", "conv3d_small", "supports"]

#: Input / output dtypes the kernel takes (accumulation is always float32).
KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
#: Largest input and output channel counts the kernels take (the refiners route only some of them here:
#: ``model.nets.refiner.SMALL_CONV_MAX_CIN``); wider convolutions belong to ``torch.nn.functional.conv3d``.
MAX_CHANNELS = 64
#: Kernel taps (3^3).
TAPS = 27
#: Bounds of the ``x`` tile per program (powers of two): the tile is the widest within them that pads ``W`` least
#: (256 -> 256, 192 -> 64 in 3 tiles).
MIN_BLOCK_W = 32
MAX_BLOCK_W = 256
#: Output ``x`` per thread of the FMA kernel: ``BLOCK_W / (32 x X_PER_THREAD)`` warps (1 to :data:`MAX_WARPS`).
#: Triton lays ``acc [COUT_P, BLOCK_W]`` out with lanes and warps along ``x`` (3.6, sm_90), so a thread holds all
#: ``COUT_P`` channels of its ``x``: per tap and input channel it loads ``X_PER_THREAD`` inputs and ``COUT_P``
#: weights for ``COUT_P x X_PER_THREAD`` FMA.
X_PER_THREAD = 2
MAX_WARPS = 4
#: Warps per program of the tensor-core variant.
DOT_WARPS = 4
#: Offsets are int32 while every offset the kernels form stays below this, int64 beyond it.
INDEX_32_LIMIT = 2**31
#: Tensor-core variant: (tap, channel) columns per ``tl.dot`` step and the smallest ``tl.dot`` dimension.
DOT_BLOCK_K = 32
MIN_DOT = 16
#: Default of ``use_dot``: False runs the FMA (CUDA-core) kernel. The tensor-core variant does not pay for the
#: refiners' 27-output filter convolutions either (``--sweep-conv``, H100, bf16, 6bda8a8: 8 -> 27 at 192^3 2.02
#: against 2.15 ms at the FMA default launch, at 256^3 3.85 against 3.78 ms).
USE_DOT = False
#: Default launch of the FMA kernel for at most :data:`MULTI_ROW_MAX_COUT` output channels: ``(block_w, num_warps,
#: rows)``, rows > 1 running :func:`_conv3_fma_rows_kernel`, which loads each input row once for the output rows it
#: is a tap of. Measured on an H100 in bf16 (``python -m model.reports.refiner --sweep-conv``, reports/refiner.md,
#: cfa8e49): 8 -> 8 at 192^3 1.59 -> 1.13 ms, 8 -> 8 at 256^3 3.56 -> 2.49 ms, 16 -> 8 at 256^3 7.52 -> 5.16 ms
#: against the one-row launch that was the default; with 27 output channels the multi-row tiles spill registers
#: (8 -> 27 at 192^3: 3.84 ms one row, 4.48 with 2 rows, 201 with 4), so wider outputs keep one row per program.
MULTI_ROW_LAUNCH = (64, 1, 4)
MULTI_ROW_MAX_COUT = 8
#: Values ``rows`` takes.
FMA_ROW_CHOICES = (1, 2, 4)


@triton.jit
def _program_row(depth, height, width, per_plane, INDEX_64: tl.constexpr):
    """The output rows of program ``(row, tile)``: ``(b, z, i)`` from ``row = (b * D + z) * per_plane + i`` (one
    row per program: ``per_plane = H`` and ``i = y``; ``ROWS`` rows: ``per_plane`` row tiles, ``i`` the tile), with
    the width, plane and volume sizes in the offsets' integer type (int64 when ``INDEX_64``)."""
    row = tl.program_id(0)
    if INDEX_64:
        row = row.to(tl.int64)
        depth = tl.cast(depth, tl.int64)
        height = tl.cast(height, tl.int64)
        width = tl.cast(width, tl.int64)
    i = row % per_plane
    bz = row // per_plane
    plane = height * width
    return bz // depth, bz % depth, i, width, plane, depth * plane


@triton.jit
def _conv3_fma_kernel(
    X, W, BIAS, OUT,
    depth, height, width,
    CIN: tl.constexpr, COUT: tl.constexpr, COUT_P: tl.constexpr,
    HAS_BIAS: tl.constexpr, RELU: tl.constexpr, INDEX_64: tl.constexpr, BLOCK_W: tl.constexpr,
):
    """Program ``(row, tile)``: ``OUT[b, :, z, y, x0:x0 + BLOCK_W]`` for ``row = (b * D + z) * H + y``.

    ``X [B, CIN, D, H, W]``, ``OUT [B, COUT, D, H, W]`` contiguous; ``W [CIN, 27, COUT_P]`` float32 (tap
    ``(dz * 3 + dy) * 3 + dx``, output channels zero-padded to ``COUT_P``); ``BIAS [COUT_P]`` float32 (zero-padded;
    read only when ``HAS_BIAS``). Offsets are int32 unless ``INDEX_64``.
    """
    b, z, y, width, plane, volume = _program_row(depth, height, width, height, INDEX_64)
    xs = tl.program_id(1) * BLOCK_W + tl.arange(0, BLOCK_W)  # [BLOCK_W] output x
    co = tl.arange(0, COUT_P)
    xl = xs - 1  # input x of the taps dx = 0 (left) and dx = 2 (right)
    xr = xs + 1
    ok_l = (xl >= 0) & (xl < width)  # [BLOCK_W]: zero padding along x, and the tile's tail
    ok_c = xs < width
    ok_r = xr < width
    acc = tl.zeros((COUT_P, BLOCK_W), dtype=tl.float32)
    x_batch = X + b * (CIN * volume)
    for ci in range(CIN):  # a loop, not unrolled: 27 taps per iteration keep the compile short
        x_chan = x_batch + ci * volume
        w_chan = W + ci * (27 * COUT_P) + co  # [COUT_P] pointers to tap 0 of input channel ci
        for dz in tl.static_range(3):
            zi = z + (dz - 1)
            z_ok = (zi >= 0) & (zi < depth)
            for dy in tl.static_range(3):
                yi = y + (dy - 1)
                row_ok = z_ok & (yi >= 0) & (yi < height)  # scalar: the whole tap row lies in the volume
                x_row = x_chan + zi * plane + yi * width
                for dx in tl.static_range(3):
                    if dx == 0:
                        xv = tl.load(x_row + xl, mask=row_ok & ok_l, other=0.0)
                    elif dx == 1:
                        xv = tl.load(x_row + xs, mask=row_ok & ok_c, other=0.0)
                    else:
                        xv = tl.load(x_row + xr, mask=row_ok & ok_r, other=0.0)
                    wv = tl.load(w_chan + ((dz * 3 + dy) * 3 + dx) * COUT_P)
                    acc += wv[:, None] * xv.to(tl.float32)[None, :]
    if HAS_BIAS:
        acc += tl.load(BIAS + co)[:, None]
    if RELU:
        acc = tl.maximum(acc, 0.0)
    out_ptr = OUT + (b * COUT * volume + z * plane + y * width) + co[:, None] * volume + xs[None, :]
    tl.store(out_ptr, acc.to(OUT.dtype.element_ty), mask=(co < COUT)[:, None] & (xs < width)[None, :])


@triton.jit
def _fma_row(acc, w_chan, xl, xs, xr, dz: tl.constexpr, dy: tl.constexpr, COUT_P: tl.constexpr):
    """``acc [COUT_P, BLOCK_W]`` plus the three ``dx`` taps ``(dz, dy, dx)`` of one input row, whose values at
    ``x - 1``, ``x``, ``x + 1`` (float32, zero outside the volume) the caller loaded: ``xl``, ``xs``, ``xr``."""
    for dx in tl.static_range(3):
        wv = tl.load(w_chan + ((dz * 3 + dy) * 3 + dx) * COUT_P)
        if dx == 0:
            acc += wv[:, None] * xl[None, :]
        elif dx == 1:
            acc += wv[:, None] * xs[None, :]
        else:
            acc += wv[:, None] * xr[None, :]
    return acc


@triton.jit
def _conv3_fma_rows_kernel(
    X, W, BIAS, OUT,
    depth, height, width, row_tiles,
    CIN: tl.constexpr, COUT: tl.constexpr, COUT_P: tl.constexpr, ROWS: tl.constexpr,
    HAS_BIAS: tl.constexpr, RELU: tl.constexpr, INDEX_64: tl.constexpr, BLOCK_W: tl.constexpr,
):
    """:func:`_conv3_fma_kernel` for ``ROWS`` (2 or 4) consecutive output rows ``y0 .. y0 + ROWS - 1`` of one plane
    per program: each of the ``ROWS + 2`` input rows they read is loaded once per (input channel, ``dz``) and added
    into every output row it is a tap of (``dy = j - r``), where the one-row kernel loads each input row three times.
    Program ``(tile, x-tile)`` with ``tile = (b * D + z) * row_tiles + y0 / ROWS``; same layouts and arguments."""
    b, z, tile, width, plane, volume = _program_row(depth, height, width, row_tiles, INDEX_64)
    y0 = tile * ROWS
    xs = tl.program_id(1) * BLOCK_W + tl.arange(0, BLOCK_W)
    co = tl.arange(0, COUT_P)
    ok_l = (xs - 1 >= 0) & (xs - 1 < width)
    ok_c = xs < width
    ok_r = xs + 1 < width
    acc0 = tl.zeros((COUT_P, BLOCK_W), dtype=tl.float32)
    acc1 = tl.zeros((COUT_P, BLOCK_W), dtype=tl.float32)
    if ROWS == 4:
        acc2 = tl.zeros((COUT_P, BLOCK_W), dtype=tl.float32)
        acc3 = tl.zeros((COUT_P, BLOCK_W), dtype=tl.float32)
    x_batch = X + b * (CIN * volume)
    for ci in range(CIN):
        x_chan = x_batch + ci * volume
        w_chan = W + ci * (27 * COUT_P) + co
        for dz in tl.static_range(3):
            zi = z + (dz - 1)
            z_ok = (zi >= 0) & (zi < depth)
            for j in tl.static_range(ROWS + 2):  # input row y0 + j - 1
                yi = y0 + (j - 1)
                row_ok = z_ok & (yi >= 0) & (yi < height)
                x_row = x_chan + zi * plane + yi * width
                xl = tl.load(x_row + xs - 1, mask=row_ok & ok_l, other=0.0).to(tl.float32)
                xc = tl.load(x_row + xs, mask=row_ok & ok_c, other=0.0).to(tl.float32)
                xr = tl.load(x_row + xs + 1, mask=row_ok & ok_r, other=0.0).to(tl.float32)
                # output row r takes this input row as its tap dy = j - r (0 <= dy <= 2)
                if j <= 2:
                    acc0 = _fma_row(acc0, w_chan, xl, xc, xr, dz, j, COUT_P)
                if j >= 1:
                    if j <= 3:
                        acc1 = _fma_row(acc1, w_chan, xl, xc, xr, dz, j - 1, COUT_P)
                if ROWS == 4:
                    if j >= 2:
                        if j <= 4:
                            acc2 = _fma_row(acc2, w_chan, xl, xc, xr, dz, j - 2, COUT_P)
                    if j >= 3:
                        acc3 = _fma_row(acc3, w_chan, xl, xc, xr, dz, j - 3, COUT_P)
    out_base = OUT + b * COUT * volume + z * plane + co[:, None] * volume + xs[None, :]
    keep = (co < COUT)[:, None] & (xs < width)[None, :]
    _store_row(out_base, acc0, BIAS, co, y0, height, width, keep, HAS_BIAS, RELU)
    _store_row(out_base, acc1, BIAS, co, y0 + 1, height, width, keep, HAS_BIAS, RELU)
    if ROWS == 4:
        _store_row(out_base, acc2, BIAS, co, y0 + 2, height, width, keep, HAS_BIAS, RELU)
        _store_row(out_base, acc3, BIAS, co, y0 + 3, height, width, keep, HAS_BIAS, RELU)


@triton.jit
def _store_row(out_base, acc, BIAS, co, y, height, width, keep, HAS_BIAS: tl.constexpr, RELU: tl.constexpr):
    """Bias, ReLU and the one rounding of output row ``y`` (nothing stored past the last row)."""
    if HAS_BIAS:
        acc += tl.load(BIAS + co)[:, None]
    if RELU:
        acc = tl.maximum(acc, 0.0)
    tl.store(out_base + y * width, acc.to(out_base.dtype.element_ty), mask=keep & (y < height))


@triton.jit
def _conv3_dot_kernel(
    X, W, BIAS, OUT, COL_OFF, COL_D,
    depth, height, width,
    CIN: tl.constexpr, COUT: tl.constexpr, K_PAD: tl.constexpr, N_PAD: tl.constexpr,
    HAS_BIAS: tl.constexpr, RELU: tl.constexpr, IEEE: tl.constexpr, INDEX_64: tl.constexpr,
    BLOCK_W: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """Program ``(row, tile)`` as in :func:`_conv3_fma_kernel`, as ``acc [BLOCK_W, N_PAD] += A @ W[k0:k0 + BLOCK_K]``.

    Column ``k`` of ``A`` is tap ``k // CIN``, input channel ``k % CIN``: ``COL_OFF [K_PAD]`` (int32, int64 when
    ``INDEX_64``) holds its offset from the output voxel (``ci * D * H * W + (dz - 1) * H * W + (dy - 1) * W + dx -
    1``), ``COL_D [3, K_PAD]`` int32 its ``dz - 1``, ``dy - 1``, ``dx - 1`` (``depth`` as ``dz - 1`` in the padding
    columns, which are never in the volume). ``W [K_PAD, N_PAD]`` in ``X``'s dtype, zero-padded; ``BIAS [N_PAD]``
    float32.
    """
    b, z, y, width, plane, volume = _program_row(depth, height, width, height, INDEX_64)
    xs = tl.program_id(1) * BLOCK_W + tl.arange(0, BLOCK_W)  # [BLOCK_W] output x
    cols = tl.arange(0, N_PAD)
    centre = X + (b * CIN * volume + z * plane + y * width)  # input voxel (b, 0, z, y, 0)
    acc = tl.zeros((BLOCK_W, N_PAD), dtype=tl.float32)
    for k0 in range(0, K_PAD, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        off = tl.load(COL_OFF + ks)
        zi = z + tl.load(COL_D + ks)
        yi = y + tl.load(COL_D + K_PAD + ks)
        xi = xs[:, None] + tl.load(COL_D + 2 * K_PAD + ks)[None, :]
        col_ok = (zi >= 0) & (zi < depth) & (yi >= 0) & (yi < height)
        ok = col_ok[None, :] & (xi >= 0) & (xi < width)
        a = tl.load(centre + off[None, :] + xs[:, None], mask=ok, other=0.0)
        w = tl.load(W + ks[:, None] * N_PAD + cols[None, :])
        if IEEE:
            acc += tl.dot(a, w, input_precision="ieee")
        else:
            acc += tl.dot(a, w)
    if HAS_BIAS:
        acc += tl.load(BIAS + cols)[None, :]
    if RELU:
        acc = tl.maximum(acc, 0.0)
    out_ptr = OUT + (b * COUT * volume + z * plane + y * width) + cols[None, :] * volume + xs[:, None]
    tl.store(out_ptr, acc.to(OUT.dtype.element_ty), mask=(xs < width)[:, None] & (cols < COUT)[None, :])


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def _device_ok(t: torch.Tensor) -> bool:
    return t.is_cuda or _interpreting()


def supports(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether :func:`conv3d_small` takes ``conv3d(x, weight, padding=1)``: ``x [B, Cin, D, H, W]`` in
    :data:`KERNEL_DTYPES`, ``weight [Cout, Cin, 3, 3, 3]`` floating, ``1 <= Cin, Cout <= MAX_CHANNELS``, both on one
    CUDA device (any device under the Triton interpreter), and no gradient to record (the kernel has no backward)."""
    if not (isinstance(x, torch.Tensor) and isinstance(weight, torch.Tensor)):
        return False
    if x.dim() != 5 or weight.dim() != 5 or tuple(weight.shape[2:]) != (3, 3, 3):
        return False
    cout, cin = weight.shape[:2]
    if x.shape[1] != cin or not (1 <= cin <= MAX_CHANNELS and 1 <= cout <= MAX_CHANNELS):
        return False
    if x.dtype not in KERNEL_DTYPES or not weight.is_floating_point():
        return False
    if not _device_ok(x) or weight.device != x.device:
        return False
    return not (torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad))


def _check(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, out: torch.Tensor | None) -> None:
    """Raise TypeError / ValueError naming the argument :func:`conv3d_small` cannot take."""
    for name, t in (("x", x), ("weight", weight), ("bias", bias), ("out", out)):
        if t is not None and not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if x.dim() != 5:
        raise ValueError(f"x must be [B, Cin, D, H, W] (5 dims), got shape {tuple(x.shape)}")
    if weight.dim() != 5:
        raise ValueError(f"weight must be [Cout, Cin, 3, 3, 3] (5 dims), got shape {tuple(weight.shape)}")
    if tuple(weight.shape[2:]) != (3, 3, 3):
        raise ValueError(f"weight must have kernel size 3 ([Cout, Cin, 3, 3, 3]), got shape {tuple(weight.shape)}")
    cout, cin = weight.shape[:2]
    if x.shape[1] != cin:
        raise ValueError(f"x has {x.shape[1]} channels but weight {tuple(weight.shape)} expects Cin = {cin}")
    if not (1 <= cin <= MAX_CHANNELS and 1 <= cout <= MAX_CHANNELS):
        raise ValueError(f"conv3d_small takes 1 to {MAX_CHANNELS} input and output channels, got Cin = {cin}, "
                         f"Cout = {cout}: use torch.nn.functional.conv3d")
    if x.dtype not in KERNEL_DTYPES:
        raise TypeError(f"x must be one of {KERNEL_DTYPES}, got {x.dtype}")
    if not weight.is_floating_point():
        raise TypeError(f"weight must be a floating-point tensor, got {weight.dtype}")
    if not _device_ok(x):
        raise ValueError(f"x must be a CUDA tensor (CPU only under TRITON_INTERPRET=1), got device {x.device}")
    if weight.device != x.device:
        raise ValueError(f"weight is on {weight.device}, x on {x.device}")
    if bias is not None:
        if tuple(bias.shape) != (cout,):
            raise ValueError(f"bias must be [Cout] = [{cout}], got shape {tuple(bias.shape)}")
        if not bias.is_floating_point():
            raise TypeError(f"bias must be a floating-point tensor, got {bias.dtype}")
        if bias.device != x.device:
            raise ValueError(f"bias is on {bias.device}, x on {x.device}")
    if out is not None:
        want = (x.shape[0], cout, *x.shape[2:])
        if tuple(out.shape) != want:
            raise ValueError(f"out must be [B, Cout, D, H, W] = {list(want)}, got shape {tuple(out.shape)}")
        if out.dtype != x.dtype:
            raise TypeError(f"out must have x's dtype {x.dtype}, got {out.dtype}")
        if out.device != x.device:
            raise ValueError(f"out is on {out.device}, x on {x.device}")
        if not out.is_contiguous():
            raise ValueError("out must be contiguous (NCDHW)")
        if out.numel() and x.numel() and out.untyped_storage().data_ptr() == x.untyped_storage().data_ptr():
            raise ValueError("out must not share memory with x (the kernel reads x's neighbours after writing)")
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x, weight, bias)):
        raise ValueError("conv3d_small has no backward: call it under torch.no_grad() / torch.inference_mode(), "
                         "or use torch.nn.functional.conv3d to train")


def _block_w(width: int) -> int:
    """``BLOCK_W`` for rows of ``width`` voxels: of the powers of two in [MIN_BLOCK_W, MAX_BLOCK_W], the widest of
    those whose tiles pad ``width`` least (256 -> 256, 192 -> 64, 37 -> 64, 70 -> 32)."""
    best, best_padded = MIN_BLOCK_W, None
    block = MIN_BLOCK_W
    while block <= MAX_BLOCK_W:
        padded = triton.cdiv(width, block) * block
        if best_padded is None or padded <= best_padded:
            best, best_padded = block, padded
        block *= 2
    return best


def _fma_warps(block_w: int) -> int:
    """Warps per program of the FMA kernel: :data:`X_PER_THREAD` output ``x`` per thread, 1 to :data:`MAX_WARPS`."""
    return max(1, min(MAX_WARPS, block_w // (32 * X_PER_THREAD)))


def _fma_launch(cout: int, width: int) -> tuple[int, int, int]:
    """The default ``(block_w, num_warps, rows)`` of the FMA kernel for ``cout`` output channels and rows of
    ``width`` voxels: :data:`MULTI_ROW_LAUNCH` up to :data:`MULTI_ROW_MAX_COUT` channels, else one row per
    program with :func:`_block_w` and :func:`_fma_warps`."""
    if cout <= MULTI_ROW_MAX_COUT:
        return MULTI_ROW_LAUNCH
    bw = _block_w(width)
    return bw, _fma_warps(bw), 1


def conv3d_small(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, *, relu: bool = False,
                 out: torch.Tensor | None = None, use_dot: bool | None = None, block_w: int | None = None,
                 num_warps: int | None = None, rows: int | None = None) -> torch.Tensor:
    """``F.conv3d(x, weight, bias, padding=1)`` (then ReLU when ``relu``), for few channels (module docstring).

    Args:
        x: ``[B, Cin, D, H, W]`` float16/bfloat16/float32, CUDA (CPU under the Triton interpreter); made
            contiguous (NCDHW) if it is not.
        weight: ``[Cout, Cin, 3, 3, 3]`` (the ``nn.Conv3d`` layout), any float dtype, used in float32;
            ``1 <= Cin, Cout <= MAX_CHANNELS``.
        bias: ``[Cout]`` any float dtype, or None.
        relu: apply ReLU before the store (fused).
        out: optional contiguous ``[B, Cout, D, H, W]`` in ``x.dtype`` to write into (not overlapping ``x``).
        use_dot: the tensor-core variant (weights rounded to ``x.dtype``); None takes :data:`USE_DOT`.
        block_w: ``x`` tile per program (a power of two >= 16); None: the FMA kernel's default launch
            (:func:`_fma_launch`), or :func:`_block_w` of ``W`` for the tensor-core variant.
        num_warps: warps per program; None: the FMA kernel's default launch, :data:`DOT_WARPS` (tensor cores).
        rows: output rows per program of the FMA kernel (1, 2 or 4); None: the default launch (:func:`_fma_launch`:
            4 for at most :data:`MULTI_ROW_MAX_COUT` output channels, else 1).

    Returns ``[B, Cout, D, H, W]`` contiguous in ``x.dtype``: float32 sums of the 27 x Cin products plus the bias,
    rounded once. Forward only: raises ValueError when autograd would record through it.
    """
    _check(x, weight, bias, out)
    use_dot = USE_DOT if use_dot is None else bool(use_dot)
    cout, cin = weight.shape[:2]
    batch, _, depth, height, width = x.shape
    x = x.contiguous()
    if block_w is not None and (block_w < MIN_DOT or block_w & (block_w - 1)):
        raise ValueError(f"block_w must be a power of two >= {MIN_DOT}, got {block_w}")
    if num_warps is not None and num_warps not in (1, 2, 4, 8, 16):
        raise ValueError(f"num_warps must be 1, 2, 4, 8 or 16, got {num_warps}")
    if rows is not None and rows not in FMA_ROW_CHOICES:
        raise ValueError(f"rows must be one of {FMA_ROW_CHOICES}, got {rows!r}")
    if out is None:
        out = torch.empty(batch, cout, depth, height, width, device=x.device, dtype=x.dtype)
    if x.numel() == 0:
        return out
    volume = depth * height * width
    taps = weight.detach().permute(2, 3, 4, 1, 0).reshape(TAPS * cin, cout)  # row tap * Cin + ci, tap (dz, dy, dx)
    if use_dot:
        n_pad = max(MIN_DOT, triton.next_power_of_2(cout))
        k_pad = triton.cdiv(TAPS * cin, DOT_BLOCK_K) * DOT_BLOCK_K
        index_64 = (batch * max(cin, n_pad) + 1) * volume >= INDEX_32_LIMIT
        w = torch.zeros(k_pad, n_pad, device=x.device, dtype=x.dtype)
        w[:TAPS * cin, :cout] = taps.to(x.dtype)
        col_off, col_d = _dot_columns(cin, depth, height, width, k_pad, index_64, x.device)
        b = _padded_bias(bias, n_pad, w)
        bw = block_w or _block_w(width)
        grid = (batch * depth * height, triton.cdiv(width, bw))
        _conv3_dot_kernel[grid](
            x, w, b, out, col_off, col_d, depth, height, width,
            CIN=cin, COUT=cout, K_PAD=k_pad, N_PAD=n_pad, HAS_BIAS=bias is not None, RELU=bool(relu),
            IEEE=x.dtype == torch.float32, INDEX_64=index_64, BLOCK_W=bw, BLOCK_K=DOT_BLOCK_K,
            num_warps=num_warps or DOT_WARPS,
        )
        return out
    cout_p = triton.next_power_of_2(cout)
    index_64 = (batch * max(cin, cout_p) + 1) * volume >= INDEX_32_LIMIT
    w = torch.zeros(cin, TAPS, cout_p, device=x.device, dtype=torch.float32)
    w[:, :, :cout] = taps.to(device=x.device, dtype=torch.float32).view(TAPS, cin, cout).transpose(0, 1)
    b = _padded_bias(bias, cout_p, w)
    if block_w is None and num_warps is None and rows is None:
        bw, num_warps, rows = _fma_launch(cout, width)
    else:  # a launch given in part: the rest as for one row per program
        bw = block_w or _block_w(width)
        num_warps = num_warps or _fma_warps(bw)
        rows = rows or 1
    if rows > 1:
        row_tiles = triton.cdiv(height, rows)
        _conv3_fma_rows_kernel[(batch * depth * row_tiles, triton.cdiv(width, bw))](
            x, w, b, out, depth, height, width, row_tiles,
            CIN=cin, COUT=cout, COUT_P=cout_p, ROWS=rows, HAS_BIAS=bias is not None, RELU=bool(relu),
            INDEX_64=index_64, BLOCK_W=bw, num_warps=num_warps,
        )
        return out
    grid = (batch * depth * height, triton.cdiv(width, bw))
    _conv3_fma_kernel[grid](
        x, w, b, out, depth, height, width,
        CIN=cin, COUT=cout, COUT_P=cout_p, HAS_BIAS=bias is not None, RELU=bool(relu), INDEX_64=index_64,
        BLOCK_W=bw, num_warps=num_warps,
    )
    return out


def _padded_bias(bias: torch.Tensor | None, size: int, dummy: torch.Tensor) -> torch.Tensor:
    """``bias`` in float32 zero-padded to ``[size]``, or ``dummy`` (never read: ``HAS_BIAS`` is off) when None."""
    if bias is None:
        return dummy
    b = torch.zeros(size, device=dummy.device, dtype=torch.float32)
    b[:bias.shape[0]] = bias.detach()
    return b


def _dot_columns(cin: int, depth: int, height: int, width: int, k_pad: int, index_64: bool,
                 device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """The tensor-core variant's column table: ``COL_OFF [K_PAD]`` (offset of column ``k = tap * Cin + ci`` from
    the output voxel, int32 or int64) and ``COL_D [3, K_PAD]`` int32 (``dz - 1, dy - 1, dx - 1``; the padding
    columns get ``dz - 1 = depth``, outside the volume, and offset 0). Built on ``device`` (no host copy, no
    synchronisation)."""
    k = torch.arange(k_pad, device=device, dtype=torch.int64)
    tap, ci = k // cin, k % cin
    d = torch.stack([tap // 9, tap // 3 % 3, tap % 3]) - 1  # [3, K_PAD]: dz - 1, dy - 1, dx - 1
    pad = k >= TAPS * cin
    d[0] = torch.where(pad, depth, d[0])
    d[1:, pad] = 0
    plane = height * width
    off = torch.where(pad, 0, ci * (depth * plane) + d[0] * plane + d[1] * width + d[2])
    return off.to(torch.int64 if index_64 else torch.int32), d.to(torch.int32)
