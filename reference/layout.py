"""The layout order of docs/ssa.md, written plainly: the oracle's own, independent of :mod:`ssa_kernels.layout`.

Tokens are sorted by batch, then selection block (x-major raster of block coordinates), then compression
sub-block inside the selection block (raster), then voxel inside the compression block (raster). Each token
gets the ten sort digits of that sentence; the order is the lexicographic order of the digit rows.
"""
from __future__ import annotations

import torch

__all__ = ["layout_digits", "layout_order", "check_layout_order"]


def _check_block_sizes(compression_block, selection_block) -> None:
    for name, m in (("compression_block", compression_block), ("selection_block", selection_block)):
        if not isinstance(m, int) or isinstance(m, bool) or m < 1:
            raise ValueError(f"{name} must be a positive int, got {m!r}")
    if selection_block % compression_block != 0:
        raise ValueError(f"compression_block ({compression_block}) must divide selection_block ({selection_block})")


def _check_coords(coords) -> torch.Tensor:
    if not isinstance(coords, torch.Tensor):
        raise TypeError(f"coords must be a torch.Tensor, got {type(coords).__name__}")
    if coords.dtype.is_floating_point or coords.dtype.is_complex or coords.dtype == torch.bool:
        raise ValueError(f"coords must have an integer dtype, got {coords.dtype}")
    if coords.dim() != 2 or coords.shape[1] != 4:
        raise ValueError(f"coords must have shape [N, 4] (batch, x, y, z), got {tuple(coords.shape)}")
    if coords.numel() and int(coords.min()) < 0:
        raise ValueError("coords must be non-negative (batch index and voxel coordinates)")
    return coords.long()


def layout_digits(coords: torch.Tensor, *, compression_block: int, selection_block: int) -> torch.Tensor:
    """The sort digits ``[N, 10]`` of each token, most significant first:

    ``(batch, sx, sy, sz, cx, cy, cz, vx, vy, vz)`` with ``s = xyz // selection_block`` (the selection block),
    ``c = (xyz % selection_block) // compression_block`` (the compression sub-block inside it) and
    ``v = xyz % compression_block`` (the voxel inside that).
    """
    _check_block_sizes(compression_block, selection_block)
    coords = _check_coords(coords)
    batch, xyz = coords[:, :1], coords[:, 1:]
    sel = xyz // selection_block
    sub = (xyz % selection_block) // compression_block
    vox = xyz % compression_block
    return torch.cat([batch, sel, sub, vox], dim=1)


def layout_order(coords: torch.Tensor, *, compression_block: int, selection_block: int) -> torch.Tensor:
    """Permutation ``perm [N]`` that puts ``coords`` into layout order (``coords[perm]`` is sorted): one stable
    sort per digit, least significant digit first, so ties keep their input order."""
    digits = layout_digits(coords, compression_block=compression_block, selection_block=selection_block)
    perm = torch.arange(digits.shape[0], device=digits.device)
    for col in reversed(range(digits.shape[1])):
        perm = perm[torch.sort(digits[perm, col], stable=True).indices]
    return perm


def check_layout_order(coords: torch.Tensor, *, compression_block: int, selection_block: int) -> None:
    """Raise ``ValueError`` unless consecutive tokens are in strictly increasing layout order (so no voxel twice)."""
    digits = layout_digits(coords, compression_block=compression_block, selection_block=selection_block)
    if digits.shape[0] < 2:
        return
    diff = digits[1:] - digits[:-1]  # [N-1, 10]; the first non-zero digit difference decides each pair
    nonzero = diff != 0
    first = nonzero.long().argmax(1)  # the first differing digit (0 where the rows are equal)
    if bool((diff.gather(1, first[:, None]) < 0).any()):
        raise ValueError(
            "coords are not in layout order (batch, selection block, compression sub-block, voxel); "
            "reorder the tokens with reference.layout_order(coords, ...) first"
        )
    if bool((~nonzero.any(1)).any()):
        raise ValueError("coords contain duplicate voxels")
