"""The refiners' adaptive 3^3 filter as one Triton kernel per iteration (inference): a fast path for
:func:`model.nets.refiner.adaptive_filter`.

Semantics (the refiner's adaptive blocks): ``logits [B, 27, D, H, W]`` are L1-normalised over the 27 taps per voxel,
``w = logits / max(sum_taps |logits|, 1e-12)`` (float32), and form a spatially varying 3^3 filter shared by all
channels of ``x [B, C, D, H, W]``; tap ``9 a + 3 b + c`` reads the zero-padded input at offset ``(a - 1, b - 1,
c - 1)`` along ``(D, H, W)``. The filter runs ``iterations`` times, each on the previous output, same weights.

Why it beats the PyTorch path (27 ``addcmul_`` passes per iteration over a zero-bordered copy):

- **one pass per iteration instead of 27**: each ``addcmul_`` streams the whole volume (a weight plane, C shifted
  input planes, C output planes read and written), so one iteration moves ``27 * (1 + 3 C)`` values per voxel from
  DRAM, plus the copy into the padded buffer. Here a program reads the 27 neighbours of its voxels from the cache
  (neighbouring programs and taps share them), keeps one float32 accumulator per channel in registers and writes
  the output once: about ``27 + 2 C`` values per voxel per iteration (86 bytes at C = 8 in 16-bit dtypes, against
  ~1350 for the addcmul passes).
- **no weights tensor**: the L1 norm is recomputed on the fly from the raw logits each iteration (27 ``abs`` + add
  per voxel, free next to the memory traffic): ``out = (sum_tap logit * x_tap) / max(sum_tap |logit|, 1e-12)``,
  the same number as the normalised weights up to float32 rounding. The logits are read once per iteration in
  their own dtype (the refiner produces them in ``x``'s dtype), where storing normalised weights would cost an
  extra write and read of 27 planes (0.9 GB at 256^3 in 16-bit dtypes) and 27 planes of memory.
- **no padded copy**: zero padding comes from load masks; the ``z`` / ``y`` validity of a tap row is a scalar per
  program, the ``x`` validity a vector.

Launch: a 2-D grid, program ``(row, tile)`` with ``row`` enumerating ``(b, z, y)`` (recovered with scalar integer
math once per program) and ``tile`` covering :func:`_block_w` consecutive ``x`` (power of two, chosen to waste few
masked lanes on the patch widths 192 / 256); every vector load and store runs along the contiguous ``x`` axis. The
channels are a ``tl.constexpr`` dimension of the tile ``[C_P, BLOCK_W]`` (``C_P`` = next power of two of C,
masked), with one float32 accumulator per value: each logit is read from DRAM once per iteration and used for every
channel (the channel rows of a tile load it in the x tile's own layout, from the cache, which compiles without any
layout conversion or shared memory; checked with the sm_90 compiler for C = 1 / 3 / 8, 16- and 32-bit dtypes).
Offsets are int32 unless a tensor is too large (then int64). Iterations ping-pong between two output buffers (never
read and write one buffer in a launch).

Memory: the output plus, for ``iterations >= 2``, one more buffer of ``x``'s size (and contiguous copies of inputs
that are not contiguous NCDHW, e.g. a channels-last ``x``); nothing else. Accumulation is in
float32 with one rounding to ``x``'s dtype per iteration. No autograd (the result is not attached to any graph).
Under the Triton interpreter (``TRITON_INTERPRET=1``) the kernel also takes CPU tensors, for the tests.
"""
from __future__ import annotations

import contextlib
import os

import torch
import triton
import triton.language as tl

__all__ = ["KERNEL_DTYPES", "LOGITS_DTYPES", "adaptive_filter_kernel"]

#: Dtypes of ``x`` the kernel takes.
KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
#: Dtypes of the logits (any of them with any ``x`` dtype; they are normalised in float32).
LOGITS_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
#: Taps along each spatial axis and in all of the 3^3 filter.
TAPS_PER_AXIS = 3
TAPS = TAPS_PER_AXIS ** 3
#: Times the filter is applied by default (``model.nets.refiner.ADAPTIVE_ITERATIONS``).
DEFAULT_ITERATIONS = 3
#: Floor of a voxel's L1 norm over the 27 logits (the clamp of :func:`model.nets.refiner.adaptive_filter`).
NORM_EPS = 1e-12
#: Bounds of the width of an x tile (powers of two).
MAX_BLOCK_W = 256
MIN_BLOCK_W = 16
#: Largest ``[C_P, BLOCK_W]`` tile (caps the width at 128 for 8 channels): at 8 warps it leaves 4 values per thread
#: (<= 80 registers, no spills, on sm_90 per ptxas); 8 values per thread took 142: one 8-warp program per SM.
MAX_TILE_VALUES = 1024
#: Share of masked (past-the-row) lanes a tile width may waste before a narrower one is preferred.
MAX_TILE_WASTE = 0.125
#: Values of the ``[C_P, BLOCK_W]`` tile per thread that set the warp count, and its bounds (at least 2: an SM
#: holds at most 32 programs, so 1-warp programs would cap its occupancy at half).
VALUES_PER_THREAD = 4
THREADS_PER_WARP = 32
MIN_WARPS = 2
MAX_WARPS = 8
#: Largest offset int32 arithmetic may reach; bigger tensors switch the kernel to int64 offsets.
INT32_MAX = 2 ** 31 - 1
#: CUDA's limit on the second grid dimension (x tiles per row).
MAX_GRID_Y = 65535


@triton.jit
def _adaptive_filter_kernel(
    X, LOGITS, OUT,
    depth, height, width, plane, volume,
    C: tl.constexpr, C_P: tl.constexpr, TAPS: tl.constexpr, AXIS_TAPS: tl.constexpr, EPS: tl.constexpr,
    BLOCK_W: tl.constexpr, WIDE: tl.constexpr,
):
    """One iteration for the voxels ``x in [tile * BLOCK_W, (tile + 1) * BLOCK_W)`` of row ``(b, z, y)`` (program
    ``(row, tile)``), all ``C`` channels: ``OUT[b, :, z, y, x] = sum_tap LOGITS[b, tap, z, y, x] * X[b, :, z + a - 1,
    y + b' - 1, x + c' - 1] / max(sum_tap |LOGITS[b, tap, z, y, x]|, EPS)`` with ``tap = 9 a + 3 b' + c'``, zero
    outside the volume. ``X``, ``OUT``: ``[B, C, D, H, W]``, ``LOGITS``: ``[B, TAPS, D, H, W]``, contiguous;
    ``plane = H * W``, ``volume = D * H * W``. ``WIDE``: int64 offsets (some tensor holds 2^31 values or more)."""
    row = tl.program_id(0)
    tile = tl.program_id(1)
    chans = tl.arange(0, C_P)
    if WIDE:
        row = row.to(tl.int64)
        chans = chans.to(tl.int64)
    y = row % height
    bz = row // height
    z = bz % depth
    b = bz // depth
    xs = tile * BLOCK_W + tl.arange(0, BLOCK_W)  # [BLOCK_W]
    in_row = xs < width
    chan_ok = chans < C
    spatial = z * plane + y * width
    row_start = b * C * volume + spatial  # channel 0 of this row in X and OUT
    tile_offs = (chans * volume)[:, None] + xs[None, :]  # [C_P, BLOCK_W] from row_start
    x_tile = X + row_start + tile_offs
    # x validity of the three tap columns (x - 1, x, x + 1), channel padding folded in: [C_P, BLOCK_W] each
    left_ok = chan_ok[:, None] & ((xs >= 1) & (xs <= width))[None, :]
    centre_ok = chan_ok[:, None] & in_row[None, :]
    right_ok = chan_ok[:, None] & (xs + 1 < width)[None, :]
    # the logits are loaded as [C_P, BLOCK_W] tiles whose rows are all the same x row, so they come in the layout of
    # the x tile (a [BLOCK_W] vector broadcast over the channels costs a shared-memory layout conversion per tap
    # when the channel rows sit in different warps); padded channel rows load nothing.
    tap_ptr = LOGITS + (b * TAPS * volume + spatial) + tl.broadcast_to(xs[None, :], (C_P, BLOCK_W))  # tap 0

    acc = tl.zeros((C_P, BLOCK_W), dtype=tl.float32)
    l1 = tl.zeros((C_P, BLOCK_W), dtype=tl.float32)
    for ta in tl.static_range(AXIS_TAPS):
        zz = z + (ta - 1)
        z_ok = (zz >= 0) & (zz < depth)
        for tb in tl.static_range(AXIS_TAPS):
            yy = y + (tb - 1)
            row_ok = z_ok & (yy >= 0) & (yy < height)  # scalar: this tap row lies inside the volume
            row_shift = (ta - 1) * plane + (tb - 1) * width
            for tc in tl.static_range(AXIS_TAPS):
                logit = tl.load(tap_ptr, mask=centre_ok, other=0.0).to(tl.float32)  # [C_P, BLOCK_W]
                tap_ptr += volume  # next tap plane
                l1 += tl.abs(logit)
                if tc == 0:
                    col_ok = left_ok
                elif tc == 1:
                    col_ok = centre_ok
                else:
                    col_ok = right_ok
                vals = tl.load(x_tile + (row_shift + (tc - 1)), mask=col_ok & row_ok, other=0.0)  # [C_P, BLOCK_W]
                acc += logit * vals.to(tl.float32)
    inv = 1.0 / tl.maximum(l1, EPS)
    tl.store(OUT + row_start + tile_offs, (acc * inv).to(OUT.dtype.element_ty), mask=centre_ok)


def _block_w(width: int, c_p: int) -> int:
    """The widest power-of-two x tile in ``[MIN_BLOCK_W, min(MAX_BLOCK_W, MAX_TILE_VALUES / c_p)]`` that masks at
    most ``MAX_TILE_WASTE`` of the padded row (8 channels: 192 -> 64, 256 -> 128; 1 channel: 256 -> 256, 1000 ->
    256); failing that, the one with the fewest masked lanes."""
    candidates = []
    block = max(MIN_BLOCK_W, min(MAX_BLOCK_W, MAX_TILE_VALUES // c_p))
    while block >= MIN_BLOCK_W:
        candidates.append(block)
        block //= 2
    for block in candidates:
        if triton.cdiv(width, block) * block <= width * (1 + MAX_TILE_WASTE):
            return block
    return min(candidates, key=lambda blk: (triton.cdiv(width, blk) * blk, -blk))


def _num_warps(tile_values: int) -> int:
    """Warps for a ``[C_P, BLOCK_W]`` tile of ``tile_values`` values (``VALUES_PER_THREAD`` each, bounded)."""
    return max(MIN_WARPS, min(MAX_WARPS, tile_values // (THREADS_PER_WARP * VALUES_PER_THREAD)))


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def _check(x: torch.Tensor, logits: torch.Tensor, iterations: int) -> None:
    """Raise ``TypeError`` / ``ValueError`` (naming the argument) for inputs :func:`adaptive_filter_kernel` rejects."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    if not isinstance(logits, torch.Tensor):
        raise TypeError(f"logits must be a torch.Tensor, got {type(logits).__name__}")
    if x.dtype not in KERNEL_DTYPES:
        raise TypeError(f"x must be one of {KERNEL_DTYPES}, got {x.dtype}")
    if logits.dtype not in LOGITS_DTYPES:
        raise TypeError(f"logits must be one of {LOGITS_DTYPES}, got {logits.dtype}")
    if isinstance(iterations, bool) or not isinstance(iterations, int) or iterations < 1:
        raise ValueError(f"iterations must be a positive int, got {iterations!r}")
    if x.dim() != 5:
        raise ValueError(f"x must be [B, C, D, H, W], got shape {tuple(x.shape)}")
    if logits.dim() != 5:
        raise ValueError(f"logits must be [B, {TAPS}, D, H, W], got shape {tuple(logits.shape)}")
    if logits.shape[1] != TAPS:
        raise ValueError(f"logits must have {TAPS} channels (one per tap), got shape {tuple(logits.shape)}")
    if logits.shape[0] != x.shape[0] or logits.shape[2:] != x.shape[2:]:
        raise ValueError(f"logits {tuple(logits.shape)} must match x {tuple(x.shape)} in batch and spatial sizes")
    if logits.device != x.device:
        raise ValueError(f"logits must be on x's device {x.device}, got {logits.device}")
    if not (x.is_cuda or _interpreting()):
        raise ValueError(f"x must be a CUDA tensor (CPU only under TRITON_INTERPRET=1), got device {x.device}")


def _run(x: torch.Tensor, logits: torch.Tensor, iterations: int, *, block_w: int | None = None,
         wide: bool | None = None) -> torch.Tensor:
    """Launch the iterations on checked, contiguous inputs; ``block_w`` / ``wide`` override the tile width and the
    int64-offset switch (tests)."""
    b, c, d, h, wd = x.shape
    out = torch.empty_like(x, memory_format=torch.contiguous_format)
    if x.numel() == 0:
        return out
    plane, volume = h * wd, d * h * wd
    if wide is None:  # the furthest offset a program forms, masked or not, must fit in int32
        wide = max(x.numel(), logits.numel()) + plane + wd + 1 > INT32_MAX
    c_p = triton.next_power_of_2(c)
    block_w = _block_w(wd, c_p) if block_w is None else block_w
    grid = (b * d * h, triton.cdiv(wd, block_w))
    if grid[0] > INT32_MAX or grid[1] > MAX_GRID_Y:
        raise ValueError(f"x {tuple(x.shape)} is too large for the launch grid {grid}")
    spare = torch.empty_like(out) if iterations > 1 else None
    # ping-pong: the last iteration writes `out`, so count back from it
    targets = [out if (iterations - 1 - i) % 2 == 0 else spare for i in range(iterations)]
    src = x
    for dst in targets:
        _adaptive_filter_kernel[grid](
            src, logits, dst,
            d, h, wd, plane, volume,
            C=c, C_P=c_p, TAPS=TAPS, AXIS_TAPS=TAPS_PER_AXIS, EPS=NORM_EPS,
            BLOCK_W=block_w, WIDE=wide, num_warps=_num_warps(c_p * block_w),
        )
        src = dst
    return out


def adaptive_filter_kernel(x: torch.Tensor, logits: torch.Tensor, iterations: int = DEFAULT_ITERATIONS) -> torch.Tensor:
    """:func:`model.nets.refiner.adaptive_filter` as Triton kernels (module docstring), without autograd.

    Args:
        x: ``[B, C, D, H, W]`` float16 / bfloat16 / float32, on CUDA (CPU under the Triton interpreter); a
            non-contiguous tensor is copied to contiguous NCDHW first.
        logits: ``[B, 27, D, H, W]`` filter logits (float16 / bfloat16 / float32 / float64, independent of ``x``'s
            dtype) on ``x``'s device, L1-normalised over the 27 taps per voxel in float32 (``max(sum |logits|,
            1e-12)``).
        iterations: times the filter is applied (positive int; the refiner's default is 3).

    Returns:
        ``[B, C, D, H, W]`` in ``x.dtype``, contiguous NCDHW, a new tensor (the inputs are not modified).

    Raises:
        TypeError: ``x`` or ``logits`` not a tensor, ``x`` not float16 / bfloat16 / float32, ``logits`` not one of
            those or float64.
        ValueError: wrong ranks, ``logits`` without 27 channels, batch / spatial sizes that differ, different
            devices, ``iterations`` not a positive int, a non-CUDA device outside the interpreter.
    """
    _check(x, logits, iterations)
    device = torch.cuda.device(x.device) if x.is_cuda else contextlib.nullcontext()  # launch on x's GPU
    with torch.no_grad(), device:
        return _run(x.contiguous(), logits.contiguous(), iterations)
