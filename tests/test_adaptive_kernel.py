"""The Triton adaptive filter (model.nets.adaptive_kernel) against the refiner's PyTorch one (float64).

The reference is :func:`model.nets.refiner.adaptive_filter` on float64 copies of ``x`` with the logits in float32 (it
normalises them in float32 and cannot narrow float64 logits). Errors are relative norms ``||out - ref|| / ||ref||``.
The logits are signed, with a few all-zero voxels (the ``1e-12`` clamp of the L1 norm: those voxels come out 0).

On the CPU the kernel runs in the Triton interpreter, which spends ~30 ms per program (one program per (b, z, y) row
and x tile, per iteration): the volumes are tiny, with odd sizes so that the z / y borders and the x tile tails are
exercised; ``W = 33``, ``70`` and ``300`` span several x tiles. The CUDA test runs a 64^3 x 8-channel bfloat16 volume.
The interpreter rounds float32 -> bfloat16 by truncation (the GPU rounds to nearest even), so its bfloat16 errors
are about twice the GPU's: ~7e-3 here after 3 iterations.
"""
from __future__ import annotations

import pytest
import torch

from model.nets import adaptive_kernel
from model.nets.adaptive_kernel import _block_w, _run, adaptive_filter_kernel
from model.nets.refiner import adaptive_filter

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py

F32_TOL = 1e-5
F16_TOL = 2e-3
BF16_TOL = 1e-2
TAPS = 27


def _inputs(batch: int, channels: int, size: tuple[int, int, int], dtype: torch.dtype, seed: int = 0,
            logits_dtype: torch.dtype | None = None, device: str = "cpu",
            shift: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """``x [B, C, *size]`` standard normal, ``logits [B, 27, *size]`` normal + ``shift`` with the first two voxels
    along x of every (b, z = 0, y = 0) row and the last voxel of the volume all zero."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, channels, *size, generator=gen)
    logits = torch.randn(batch, TAPS, *size, generator=gen) + shift
    logits[:, :, 0, 0, :2] = 0
    logits[:, :, -1, -1, -1] = 0
    return x.to(device, dtype), logits.to(device, logits_dtype or dtype)


def _reference(x: torch.Tensor, logits: torch.Tensor, iterations: int) -> torch.Tensor:
    return adaptive_filter(x.detach().cpu().double(), logits.detach().cpu().float(), iterations)


def _rel(out: torch.Tensor, ref: torch.Tensor) -> float:
    return float((out.detach().cpu().double() - ref).norm() / ref.norm())


# (batch, channels, (D, H, W), iterations, dtype, tolerance); W = 9 one x tile, 33 three, 70 five (16 wide)
CASES = [
    pytest.param(2, 8, (3, 4, 9), 1, torch.float32, F32_TOL, id="f32-C8-it1"),
    pytest.param(2, 8, (3, 4, 9), 3, torch.float32, F32_TOL, id="f32-C8-it3"),
    pytest.param(2, 3, (3, 3, 33), 3, torch.float32, F32_TOL, id="f32-C3-W33-it3"),
    pytest.param(1, 1, (2, 3, 70), 2, torch.float32, F32_TOL, id="f32-C1-W70-it2"),
    pytest.param(2, 8, (3, 4, 9), 3, torch.float16, F16_TOL, id="f16-C8-it3"),
    pytest.param(1, 3, (3, 3, 33), 1, torch.float16, F16_TOL, id="f16-C3-W33-it1"),
    pytest.param(1, 1, (5, 2, 7), 3, torch.bfloat16, BF16_TOL, id="bf16-C1-it3"),
]


@pytest.mark.parametrize("batch,channels,size,iterations,dtype,tol", CASES)
def test_matches_reference(batch, channels, size, iterations, dtype, tol):
    x, logits = _inputs(batch, channels, size, dtype, seed=channels * 10 + iterations)
    x_before, logits_before = x.clone(), logits.clone()
    out = adaptive_filter_kernel(x, logits, iterations)
    assert out.shape == x.shape and out.dtype == dtype and out.is_contiguous()
    assert torch.equal(x, x_before) and torch.equal(logits, logits_before)  # inputs untouched
    ref = _reference(x, logits, iterations)
    assert _rel(out, ref) < tol
    assert torch.all(out[:, :, 0, 0, :2] == 0)  # all-zero logits: the clamped norm gives 0, not NaN


def test_several_tiles_of_a_wide_row():
    """W = 300 runs in five 64-wide tiles (the last one a tail of 44); D = 1 masks every z-shifted tap row."""
    assert _block_w(300, 2) == 64
    x, logits = _inputs(1, 2, (1, 2, 300), torch.float32, seed=3)
    assert _rel(adaptive_filter_kernel(x, logits, 1), _reference(x, logits, 1)) < F32_TOL


def test_block_widths():
    assert [_block_w(w, 1) for w in (192, 256, 512, 1000, 128, 9)] == [64, 256, 256, 256, 128, 16]
    assert [_block_w(w, 8) for w in (192, 256, 512, 1000, 128, 9)] == [64, 128, 128, 128, 128, 16]
    assert [_block_w(w, 4) for w in (192, 256, 33)] == [64, 256, 16]


def test_int64_offsets():
    """The int64-offset variant (taken for tensors of 2^31 values or more) on a small volume, several tiles."""
    x, logits = _inputs(2, 3, (3, 4, 9), torch.float32, seed=4)
    with torch.no_grad():
        out = _run(x, logits, 2, block_w=8, wide=True)
    assert _rel(out, _reference(x, logits, 2)) < F32_TOL


@pytest.mark.parametrize("dtype,logits_dtype,tol", [
    pytest.param(torch.float32, torch.float64, F32_TOL, id="f32-x-f64-logits"),
    pytest.param(torch.float16, torch.float32, F16_TOL, id="f16-x-f32-logits"),
])
def test_logits_of_another_dtype(dtype, logits_dtype, tol):
    x, logits = _inputs(2, 8, (3, 4, 9), dtype, seed=5, logits_dtype=logits_dtype)
    out = adaptive_filter_kernel(x, logits, 1)
    assert out.dtype == dtype
    assert _rel(out, _reference(x, logits, 1)) < tol


def test_channels_last_input():
    """A channels-last ``x`` is filtered like its contiguous copy; the result is contiguous NCDHW."""
    x, logits = _inputs(2, 8, (3, 4, 9), torch.float32, seed=6)
    out = adaptive_filter_kernel(x.contiguous(memory_format=torch.channels_last_3d), logits, 1)
    assert out.is_contiguous()
    assert _rel(out, _reference(x, logits, 1)) < F32_TOL


def test_empty_volume():
    x, logits = torch.zeros(1, 8, 0, 4, 9), torch.zeros(1, TAPS, 0, 4, 9)
    assert adaptive_filter_kernel(x, logits).shape == (1, 8, 0, 4, 9)


def test_bad_inputs(monkeypatch):
    x, logits = _inputs(1, 2, (2, 2, 3), torch.float32)
    with pytest.raises(TypeError, match="x must be a torch.Tensor"):
        adaptive_filter_kernel(x.numpy(), logits)
    with pytest.raises(TypeError, match="logits must be a torch.Tensor"):
        adaptive_filter_kernel(x, [1.0])
    with pytest.raises(TypeError, match="x must be one of"):
        adaptive_filter_kernel(x.double(), logits)
    with pytest.raises(TypeError, match="x must be one of"):
        adaptive_filter_kernel(x.int(), logits)
    with pytest.raises(TypeError, match="logits must be one of"):
        adaptive_filter_kernel(x, logits.int())
    with pytest.raises(TypeError, match="logits must be one of"):
        adaptive_filter_kernel(x, logits.to(torch.float8_e4m3fn))
    with pytest.raises(ValueError, match="x must be"):
        adaptive_filter_kernel(x[0], logits)
    with pytest.raises(ValueError, match="logits must be"):
        adaptive_filter_kernel(x, logits[0])
    with pytest.raises(ValueError, match="logits must have 27 channels"):
        adaptive_filter_kernel(x, logits[:, :9])
    with pytest.raises(ValueError, match="must match x"):
        adaptive_filter_kernel(x, logits[:, :, :1])
    with pytest.raises(ValueError, match="must match x"):
        adaptive_filter_kernel(x, torch.cat([logits, logits]))
    for bad in (0, -1, 1.5, True, "3"):
        with pytest.raises(ValueError, match="iterations must be a positive int"):
            adaptive_filter_kernel(x, logits, bad)
    with pytest.raises(ValueError, match="logits must be on x's device"):
        adaptive_filter_kernel(x, logits.to("meta"))
    monkeypatch.setattr(adaptive_kernel, "_interpreting", lambda: False)
    with pytest.raises(ValueError, match="x must be a CUDA tensor"):
        adaptive_filter_kernel(x, logits)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_bf16_64_cubed():
    """64^3 x 8 channels in bfloat16 on CUDA, 3 iterations (64-wide rows: one 64 tile each)."""
    x, logits = _inputs(1, 8, (64, 64, 64), torch.bfloat16, seed=7, device="cuda", shift=0.5)
    out = adaptive_filter_kernel(x, logits)
    torch.cuda.synchronize()
    assert out.shape == x.shape and out.dtype == torch.bfloat16 and out.is_cuda
    assert _rel(out, _reference(x, logits, 3)) < BF16_TOL
