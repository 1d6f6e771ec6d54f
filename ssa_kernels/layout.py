"""Token layout order and block bookkeeping for Spatial Sparse Attention.

Everything here depends only on the voxel coordinates. The *layout order* sorts tokens by

    batch, selection block (x-major raster of block coordinates),
    compression sub-block inside the selection block (raster),
    voxel inside the compression block (raster),

so every compression block and every selection block is a contiguous run of tokens. With
``compression_block == selection_block`` this is the released model's order.

``coords [N, 4]`` is integer (batch, x, y, z), non-negative.
"""
from __future__ import annotations

import torch

#: Largest key value we allow; keys are int64 and we keep a bit of headroom.
_MAX_KEY = 2**62


def _as_int64_coords(coords: torch.Tensor, name: str = "coords") -> torch.Tensor:
    if not isinstance(coords, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(coords).__name__}")
    if coords.dtype.is_floating_point or coords.dtype.is_complex or coords.dtype == torch.bool:
        raise ValueError(f"{name} must have an integer dtype, got {coords.dtype}")
    if coords.dim() != 2 or coords.shape[1] != 4:
        raise ValueError(f"{name} must have shape [N, 4] (batch, x, y, z), got {tuple(coords.shape)}")
    coords = coords.long()
    if coords.numel() and int(coords.min()) < 0:
        raise ValueError(f"{name} must be non-negative (batch index and voxel coordinates)")
    return coords


def check_block_sizes(compression_block: int, selection_block: int) -> None:
    """Raise ``ValueError`` unless the block sizes are positive and the compression block divides the selection block."""
    for name, m in (("compression_block", compression_block), ("selection_block", selection_block)):
        if not isinstance(m, int) or isinstance(m, bool) or m < 1:
            raise ValueError(f"{name} must be a positive int, got {m!r}")
    if selection_block % compression_block != 0:
        raise ValueError(
            f"compression_block ({compression_block}) must divide selection_block ({selection_block})"
        )


def layout_keys(coords: torch.Tensor, *, compression_block: int, selection_block: int) -> torch.Tensor:
    """Integer sort key of each token in layout order: ``key [N] int64``.

    The key is a mixed-radix number with digits (batch, sx, sy, sz, cx, cy, cz, vx, vy, vz) where
    ``s = coord // selection_block``, ``c = (coord % selection_block) // compression_block`` and
    ``v = coord % compression_block``. Hence ``key // compression_block**3`` identifies the
    compression block and ``key // selection_block**3`` the selection block of a token.
    """
    check_block_sizes(compression_block, selection_block)
    coords = _as_int64_coords(coords)
    ms, mc = selection_block, compression_block
    if coords.shape[0] == 0:
        return torch.zeros(0, dtype=torch.long, device=coords.device)
    extent = int(coords[:, 1:].max()) + 1
    n_sel = -(-extent // ms)  # ceil
    n_batch = int(coords[:, 0].max()) + 1
    if n_batch * (n_sel * ms) ** 3 >= _MAX_KEY:
        raise ValueError("coords too large: batch * grid^3 does not fit a 62-bit key")
    b, x, y, z = coords.unbind(1)
    key = b.clone()
    for a in (x, y, z):
        key = key * n_sel + torch.div(a, ms, rounding_mode="floor")
    for a in (x, y, z):
        key = key * (ms // mc) + torch.div(a % ms, mc, rounding_mode="floor")
    for a in (x, y, z):
        key = key * mc + a % mc
    return key


def layout_order(coords: torch.Tensor, *, compression_block: int, selection_block: int) -> torch.Tensor:
    """Permutation ``perm [N]`` that puts arbitrary coordinates into layout order: ``coords[perm]`` is sorted."""
    key = layout_keys(coords, compression_block=compression_block, selection_block=selection_block)
    return torch.sort(key, stable=True).indices


def check_layout_order(coords: torch.Tensor, *, compression_block: int, selection_block: int) -> torch.Tensor:
    """Raise ``ValueError`` unless ``coords`` are in layout order without duplicates; return their keys."""
    key = layout_keys(coords, compression_block=compression_block, selection_block=selection_block)
    if key.numel() > 1:
        d = key[1:] - key[:-1]
        if bool((d < 0).any()):
            raise ValueError(
                "coords are not in layout order (batch, selection block, compression sub-block, voxel); "
                "reorder the tokens with ssa_kernels.layout_order(coords, ...) first"
            )
        if bool((d == 0).any()):
            raise ValueError("coords contain duplicate voxels")
    return key


def _run_index(block_key: torch.Tensor) -> torch.Tensor:
    """Index of the run of equal consecutive values each element belongs to (0, 0, 1, 1, 1, 2, ...)."""
    if block_key.numel() == 0:
        return torch.zeros(0, dtype=torch.long, device=block_key.device)
    new = torch.ones_like(block_key, dtype=torch.long)
    new[1:] = (block_key[1:] != block_key[:-1]).long()
    return torch.cumsum(new, 0) - 1


def compression_block_index(coords: torch.Tensor, *, compression_block: int, selection_block: int) -> torch.Tensor:
    """Each token's compression-block index ``[N] int64`` for coordinates in layout order.

    Compression blocks are numbered in the order they first appear in the token order, which is the
    row order of ``k_cmp`` / ``v_cmp``.
    """
    key = check_layout_order(coords, compression_block=compression_block, selection_block=selection_block)
    return _run_index(torch.div(key, compression_block**3, rounding_mode="floor"))


def selection_block_index(coords: torch.Tensor, *, compression_block: int, selection_block: int) -> torch.Tensor:
    """Each token's selection-block index ``[N] int64`` (first-appearance order) for coordinates in layout order."""
    key = check_layout_order(coords, compression_block=compression_block, selection_block=selection_block)
    return _run_index(torch.div(key, selection_block**3, rounding_mode="floor"))


def num_compression_blocks(coords: torch.Tensor, *, compression_block: int, selection_block: int) -> int:
    """Number of non-empty compression blocks (rows of ``k_cmp``)."""
    idx = compression_block_index(coords, compression_block=compression_block, selection_block=selection_block)
    return int(idx[-1]) + 1 if idx.numel() else 0
