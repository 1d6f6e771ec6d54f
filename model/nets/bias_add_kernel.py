"""A convolution's bias (and a residual) added to its output in one pass, in place: the refiners' cuDNN
convolutions.

``out[b, c, ...] += bias[c] (+ residual[b, c, ...])`` for a 5-D ``out [B, C, D, H, W]`` laid out NCDHW
(contiguous) or channels-last (NDHWC), in float32 with one rounding to ``out``'s dtype.

Why a kernel: cuDNN's convolution takes no bias, so PyTorch adds it afterwards with a broadcast ``add_`` of a
``[1, C, 1, 1, 1]`` view, which runs PyTorch's generic (not vectorised) element-wise kernel. In the sign refiner's
profile (reports/generate_history.md, run 30) those adds took 212 ms of refine_1024's 2,686 ms of kernels: 54 a
256^3 patch, one after every cuDNN convolution of the UNet's wider levels and its resamplers, about 5 GB of outputs
a patch read and written at some 40% of the memory bandwidth. Here the channel of each value comes from its flat
offset (``(offset // spatial) % C``, or ``offset % C`` channels-last), so the pass is a plain contiguous stream; and
where the block adds its residual right after (``conv2(h) + x``), that sum comes in the same pass instead of a
second one.

Forward only (no autograd), float16 / bfloat16 / float32. Under the Triton interpreter (``TRITON_INTERPRET=1``) it
also takes CPU tensors, for the tests (tests/test_refiner_fast.py).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from model.nets.conv3d_kernel import KERNEL_DTYPES, _interpreting

__all__ = ["bias_add_", "supports"]

#: Values per program, and warps.
BLOCK = 4096
NUM_WARPS = 8


@triton.jit
def _bias_add_kernel(OUT, BIAS, RES, total, spatial, channels,
                     CHANNELS_LAST: tl.constexpr, HAS_RES: tl.constexpr, BLOCK: tl.constexpr):
    """``OUT[i] += BIAS[channel of i] (+ RES[i])`` for ``BLOCK`` consecutive flat offsets ``i``."""
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    valid = offs < total
    if CHANNELS_LAST:
        c = offs % channels
    else:
        c = (offs // spatial) % channels
    y = tl.load(OUT + offs, mask=valid, other=0.0).to(tl.float32)
    y += tl.load(BIAS + c, mask=valid, other=0.0).to(tl.float32)
    if HAS_RES:
        y += tl.load(RES + offs, mask=valid, other=0.0).to(tl.float32)
    tl.store(OUT + offs, y.to(OUT.dtype.element_ty), mask=valid)


def _layout(t: torch.Tensor) -> str | None:
    """``"contiguous"``, ``"channels_last"`` or None (anything else)."""
    if t.is_contiguous():
        return "contiguous"
    if t.is_contiguous(memory_format=torch.channels_last_3d):
        return "channels_last"
    return None


def supports(out: torch.Tensor, residual: torch.Tensor | None = None) -> bool:
    """Whether :func:`bias_add_` takes ``out`` (and ``residual``): a 5-D CUDA tensor (any device under the
    interpreter) of a kernel dtype, NCDHW or NDHWC, and a residual of the same shape, dtype and strides."""
    if out.dim() != 5 or out.dtype not in KERNEL_DTYPES or _layout(out) is None:
        return False
    if not (out.is_cuda or _interpreting()):
        return False
    if residual is not None and (residual.shape != out.shape or residual.dtype != out.dtype
                                 or residual.stride() != out.stride() or residual.device != out.device):
        return False
    return True


def bias_add_(out: torch.Tensor, bias: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
    """``out [B, C, D, H, W] += bias [C] (+ residual)`` in place (float32 sum, one rounding); returns ``out``.

    ``out`` and ``residual`` as :func:`supports` says (else a ``ValueError``); ``bias`` a ``[C]`` tensor on their
    device. No autograd."""
    if not isinstance(out, torch.Tensor) or not supports(out, residual):
        raise ValueError("out must be a 5-D float16/bfloat16/float32 CUDA tensor, NCDHW or channels-last, and "
                         "residual (if given) alike in shape, dtype and strides")
    if not isinstance(bias, torch.Tensor) or bias.shape != (out.shape[1],) or bias.device != out.device:
        raise ValueError(f"bias must be a [{out.shape[1]}] tensor on {out.device}, got "
                         f"{tuple(bias.shape) if isinstance(bias, torch.Tensor) else type(bias).__name__}")
    if out.numel() == 0:
        return out
    spatial = out[0, 0].numel()
    res = residual if residual is not None else out  # placeholder pointer, never read
    _bias_add_kernel[(triton.cdiv(out.numel(), BLOCK),)](
        out, bias.contiguous(), res, out.numel(), spatial, out.shape[1],
        CHANNELS_LAST=_layout(out) == "channels_last", HAS_RES=residual is not None, BLOCK=BLOCK,
        num_warps=NUM_WARPS)
    return out
