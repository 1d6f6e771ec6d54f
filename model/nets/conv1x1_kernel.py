"""Dense 1^3 convolution (a per-voxel channel mix) with few output channels as one Triton kernel, for the refiners'
residual shortcuts, with the residual sum fused: ``out = residual + bias + weight @ x`` per voxel.

Where it runs: the refiners' UNets (:mod:`model.nets.refiner`) change width in every up-block residual block and at
two down blocks, and those blocks add a 1^3 ``conv_shortcut`` of their input to their output. At full resolution
these are 40 -> 8 and 16 -> 8 channels over 192^3 / 256^3 voxels (the input is the concatenation of the running
features and a skip tensor), one level down 160 -> 32, 64 -> 32 and 40 -> 32. cuDNN runs a 1^3 convolution on an
NCDHW tensor as an implicit GEMM in NDHWC: it transposes the whole input (its nchwToNhwc kernel: a read and a write
of 40 channels, 1.3 GB at 256^3 in bf16), runs a GEMM whose tile is mostly empty at 8 output channels, transposes
the output back, then PyTorch adds the bias and the block adds the result to its residual branch (two more passes
over the output). This kernel reads NCDHW directly: per voxel it reads the ``Cin`` inputs and the ``Cout`` residual
values once and writes ``Cout`` values once, which is the least traffic the operation allows. A 40 -> 8 mix is
320 FMA per voxel (5.4 G at 256^3, ~0.2 ms of CUDA-core time on an H100) against ~1.6 GB of HBM traffic
(~0.6 ms), so it runs on the CUDA cores and is bound by memory. ``torch.matmul`` of ``weight [Cout, Cin]`` with
``x`` viewed as ``[Cin, voxels]`` avoids the transposes too but still writes the product before the residual sum
reads it back, and cuBLAS has no tile for M = 8 that fills the tensor cores.

Program ``(tile, b)`` owns ``BLOCK_P`` consecutive voxels of batch element ``b`` for all output channels: an
accumulator ``acc [COUT_P, BLOCK_P]`` (float32; ``COUT_P`` = ``Cout`` rounded up to a power of two, masked at the
store). It loops over the ``Cin`` input channels (a loop, not unrolled), loads one input vector ``[BLOCK_P]`` along
the contiguous voxel axis (coalesced) and one float32 weight column ``[COUT_P]`` (broadcast from the cache), and adds
their outer product; then the bias and the residual, with one rounding to the output dtype. The store may overwrite
the residual in place (``out=residual``): each program reads its own residual values before it writes them, and no
other program reads them.

Forward only (no autograd), float16 / bfloat16 / float32. Under the Triton interpreter (``TRITON_INTERPRET=1``) it
also takes CPU tensors, for the tests (tests/test_conv1x1_kernel.py).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

# the dtypes (accumulation always float32), the int32 offset bound, the interpreter test and the padded float32
# bias: as the 3^3 kernels'
from model.nets.conv3d_kernel import INDEX_32_LIMIT, KERNEL_DTYPES, _interpreting, _padded_bias

__all__ = ["KERNEL_DTYPES", "MAX_COUT", "conv1x1_residual", "supports"]

#: Most output channels: the accumulator holds ``COUT_P x BLOCK_P`` float32 values per program.
MAX_COUT = 32
#: Voxels per program and warps, by output channels (``COUT_P * BLOCK_P / (32 * warps)`` accumulators per thread:
#: 32 at 8 channels, 64 at 32).
BLOCK_P = 1024
NUM_WARPS = 8
BLOCK_P_WIDE = 512
#: Output channels from which :data:`BLOCK_P_WIDE` is used.
WIDE_COUT = 16


@triton.jit
def _conv1x1_residual_kernel(
    X, W, BIAS, RES, OUT, volume,
    CIN: tl.constexpr, COUT: tl.constexpr, COUT_P: tl.constexpr,
    HAS_BIAS: tl.constexpr, HAS_RES: tl.constexpr, INDEX_64: tl.constexpr, BLOCK_P: tl.constexpr,
):
    """Program ``(tile, b)``: ``OUT[b, :, p]`` for ``p`` in ``[tile * BLOCK_P, (tile + 1) * BLOCK_P)``.

    ``X [B, CIN, volume]``, ``RES, OUT [B, COUT, volume]`` contiguous (``RES`` may be ``OUT``); ``W [CIN, COUT_P]``
    float32 (output channels zero-padded); ``BIAS [COUT_P]`` float32 (read only when ``HAS_BIAS``).
    """
    tile = tl.program_id(0)
    b = tl.program_id(1)
    if INDEX_64:
        tile = tile.to(tl.int64)
        b = b.to(tl.int64)
        volume = tl.cast(volume, tl.int64)
    p = tile * BLOCK_P + tl.arange(0, BLOCK_P)
    p_ok = p < volume
    co = tl.arange(0, COUT_P)
    acc = tl.zeros((COUT_P, BLOCK_P), dtype=tl.float32)
    x_batch = X + b * (CIN * volume) + p
    for ci in range(CIN):
        xv = tl.load(x_batch + ci * volume, mask=p_ok, other=0.0).to(tl.float32)
        wv = tl.load(W + ci * COUT_P + co)
        acc += wv[:, None] * xv[None, :]
    if HAS_BIAS:
        acc += tl.load(BIAS + co)[:, None]
    rows = b * (COUT * volume) + co[:, None] * volume + p[None, :]
    keep = (co < COUT)[:, None] & p_ok[None, :]
    if HAS_RES:
        acc += tl.load(RES + rows, mask=keep, other=0.0).to(tl.float32)
    tl.store(OUT + rows, acc.to(OUT.dtype.element_ty), mask=keep)


def _weight_2d(weight: torch.Tensor) -> torch.Tensor | None:
    """``weight`` as ``[Cout, Cin]`` (from ``[Cout, Cin]`` or the ``nn.Conv3d`` layout ``[Cout, Cin, 1, 1, 1]``),
    or None when it is neither."""
    if weight.dim() == 5 and tuple(weight.shape[2:]) == (1, 1, 1):
        return weight.reshape(weight.shape[0], weight.shape[1])
    return weight if weight.dim() == 2 else None


def supports(x: torch.Tensor, weight: torch.Tensor, residual: torch.Tensor | None = None) -> bool:
    """Whether :func:`conv1x1_residual` takes these arguments as they are: ``x [B, Cin, D, H, W]`` contiguous in
    :data:`KERNEL_DTYPES` on a CUDA device (any device under the interpreter), ``weight`` ``[Cout, Cin(, 1, 1, 1)]``
    floating with ``Cout <= MAX_COUT`` on ``x``'s device, ``residual`` (if given) contiguous ``[B, Cout, D, H, W]``
    in ``x``'s dtype, and no gradient to record (the kernel has no backward): :func:`_check` raises nothing."""
    if not (isinstance(x, torch.Tensor) and x.is_contiguous()):
        return False
    try:
        _check(x, weight, None, residual, None)
    except (TypeError, ValueError):
        return False
    return True


def _check(x, weight, bias, residual, out) -> torch.Tensor:
    """Raise TypeError / ValueError naming the argument :func:`conv1x1_residual` cannot take; returns the weight as
    ``[Cout, Cin]``."""
    for name, t in (("x", x), ("weight", weight), ("bias", bias), ("residual", residual), ("out", out)):
        if t is not None and not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if x.dim() != 5:
        raise ValueError(f"x must be [B, Cin, D, H, W] (5 dims), got shape {tuple(x.shape)}")
    w = _weight_2d(weight)
    if w is None:
        raise ValueError(f"weight must be [Cout, Cin] or [Cout, Cin, 1, 1, 1], got shape {tuple(weight.shape)}")
    cout, cin = w.shape
    if x.shape[1] != cin:
        raise ValueError(f"x has {x.shape[1]} channels but weight {tuple(weight.shape)} expects Cin = {cin}")
    if not 1 <= cout <= MAX_COUT:
        raise ValueError(f"conv1x1_residual takes 1 to {MAX_COUT} output channels, got {cout}: use "
                         "torch.nn.functional.conv3d")
    if x.dtype not in KERNEL_DTYPES:
        raise TypeError(f"x must be one of {KERNEL_DTYPES}, got {x.dtype}")
    if not weight.is_floating_point():
        raise TypeError(f"weight must be a floating-point tensor, got {weight.dtype}")
    if not (x.is_cuda or _interpreting()):
        raise ValueError(f"x must be a CUDA tensor (CPU only under TRITON_INTERPRET=1), got device {x.device}")
    want = (x.shape[0], cout, *x.shape[2:])
    for name, t in (("weight", weight), ("bias", bias), ("residual", residual), ("out", out)):
        if t is not None and t.device != x.device:
            raise ValueError(f"{name} is on {t.device}, x on {x.device}")
    if bias is not None:
        if tuple(bias.shape) != (cout,):
            raise ValueError(f"bias must be [Cout] = [{cout}], got shape {tuple(bias.shape)}")
        if not bias.is_floating_point():
            raise TypeError(f"bias must be a floating-point tensor, got {bias.dtype}")
    for name, t in (("residual", residual), ("out", out)):
        if t is None:
            continue
        if tuple(t.shape) != want:
            raise ValueError(f"{name} must be [B, Cout, D, H, W] = {list(want)}, got shape {tuple(t.shape)}")
        if t.dtype != x.dtype:
            raise TypeError(f"{name} must have x's dtype {x.dtype}, got {t.dtype}")
        if not t.is_contiguous():
            raise ValueError(f"{name} must be contiguous (NCDHW)")
    if out is not None and out.numel() and x.numel() and \
            out.untyped_storage().data_ptr() == x.untyped_storage().data_ptr():
        raise ValueError("out must not share memory with x (programs read x's channels after others wrote out)")
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x, weight, bias, residual)):
        raise ValueError("conv1x1_residual has no backward: call it under torch.no_grad() / torch.inference_mode(), "
                         "or use torch.nn.functional.conv3d to train")
    return w


def conv1x1_residual(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
                     residual: torch.Tensor | None = None, *, out: torch.Tensor | None = None) -> torch.Tensor:
    """``residual + F.conv3d(x, weight, bias)`` for a 1^3 kernel, in one pass (module docstring).

    Args:
        x: ``[B, Cin, D, H, W]`` float16/bfloat16/float32, CUDA (CPU under the Triton interpreter); made contiguous
            (NCDHW) if it is not.
        weight: ``[Cout, Cin, 1, 1, 1]`` (the ``nn.Conv3d`` layout) or ``[Cout, Cin]``, any float dtype, used in
            float32; ``Cout <= MAX_COUT``.
        bias: ``[Cout]`` any float dtype, or None.
        residual: ``[B, Cout, D, H, W]`` contiguous in ``x``'s dtype, added before the rounding, or None.
        out: optional contiguous ``[B, Cout, D, H, W]`` in ``x``'s dtype to write into; may be ``residual`` itself
            (in place), not ``x``.

    Returns ``[B, Cout, D, H, W]`` contiguous in ``x``'s dtype: the float32 sum of the ``Cin`` products, the bias
    and the residual, rounded once. Forward only: raises ValueError when autograd would record through it.
    """
    w = _check(x, weight, bias, residual, out)
    cout, cin = w.shape
    batch, _, depth, height, width = x.shape
    x = x.contiguous()
    if out is None:
        out = torch.empty(batch, cout, depth, height, width, device=x.device, dtype=x.dtype)
    volume = depth * height * width
    if batch == 0 or volume == 0:
        return out
    cout_p = triton.next_power_of_2(cout)
    w_t = torch.zeros(cin, cout_p, device=x.device, dtype=torch.float32)
    w_t[:, :cout] = w.detach().t()
    b = _padded_bias(bias, cout_p, w_t)
    block = BLOCK_P if cout_p < WIDE_COUT else BLOCK_P_WIDE
    index_64 = batch * max(cin, cout_p) * volume + block >= INDEX_32_LIMIT
    grid = (triton.cdiv(volume, block), batch)
    _conv1x1_residual_kernel[grid](
        x, w_t, b, residual if residual is not None else out, out, volume,
        CIN=cin, COUT=cout, COUT_P=cout_p, HAS_BIAS=bias is not None, HAS_RES=residual is not None,
        INDEX_64=index_64, BLOCK_P=block, num_warps=NUM_WARPS,
    )
    return out
