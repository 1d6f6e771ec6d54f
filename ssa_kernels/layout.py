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

from dataclasses import dataclass, field

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


# ----------------------------------------------------------------------------------------------------------------
# The block layout: every table the kernels need, built once per coordinate set.
# ----------------------------------------------------------------------------------------------------------------

#: Tokens per query tile of the window kernels; window tile tables are cut at this size.
WINDOW_TILE = 16


@dataclass
class WindowPartition:
    """Tokens grouped by (batch, shifted window), for one shift.

    ``perm [N] int32``: token index (layout order) at each window-order position; windows are contiguous runs.
    ``offsets [W+1] int32``: CSR offsets of the windows in window order.
    ``tiles [T, 2] int32``: (start, end) window-order ranges of at most ``WINDOW_TILE`` tokens inside one window.
    ``tile_window [T] int32``: the window of each tile.
    """

    shift: int
    perm: torch.Tensor
    offsets: torch.Tensor
    tiles: torch.Tensor
    tile_window: torch.Tensor
    num_windows: int
    max_window_tokens: int


@dataclass
class BlockLayout:
    """Everything SSA needs that depends only on the coordinates (all tensors on the coordinates' device).

    Tokens are in layout order. ``B`` batch elements (``max batch index + 1``; empty ones allowed), ``Nc``
    compression blocks and ``S`` selection blocks, both numbered in order of first appearance.

    - ``batch_offsets [B+1]``, ``token_batch [N]``: tokens of each batch element (CSR) and each token's batch.
    - ``token_cmp [N]``, ``cmp_offsets [Nc+1]``, ``cmp_coords [Nc, 4]`` (batch, block x, y, z),
      ``cmp_batch [Nc]``, ``cmp_sel [Nc]``, ``batch_cmp_offsets [B+1]``: compression blocks.
    - ``token_sel [N]``, ``sel_offsets [S+1]`` (the start-index table ``C``), ``sel_cmp_offsets [S+1]``
      (compression blocks of each selection block, a contiguous range), ``sel_batch [S]``, ``batch_sel_offsets [B+1]``: selection blocks.
    - ``windows``: a :class:`WindowPartition` for shift 0 and for shift ``window // 2``.

    All index tensors are int32. Python ints (sizes, maxima) are read once here, so using the layout needs no
    host synchronisation.
    """

    coords: torch.Tensor
    compression_block: int
    selection_block: int
    window: int
    num_tokens: int
    batch_size: int
    num_cmp_blocks: int
    num_sel_blocks: int
    max_sel_block_tokens: int
    max_sel_blocks_per_batch: int
    batch_offsets: torch.Tensor
    token_batch: torch.Tensor
    token_cmp: torch.Tensor
    cmp_offsets: torch.Tensor
    cmp_coords: torch.Tensor
    cmp_batch: torch.Tensor
    cmp_sel: torch.Tensor
    batch_cmp_offsets: torch.Tensor
    token_sel: torch.Tensor
    sel_offsets: torch.Tensor
    sel_cmp_offsets: torch.Tensor
    sel_batch: torch.Tensor
    batch_sel_offsets: torch.Tensor
    windows: dict = field(default_factory=dict)

    @property
    def device(self) -> torch.device:
        return self.coords.device

    @property
    def one_cmp_per_sel(self) -> bool:
        """Each selection block holds exactly one compression block (always so when ``m_cmp == m_slc``): the
        compressed keys are then the selection blocks, in the same order."""
        return self.num_cmp_blocks == self.num_sel_blocks

    def window_partition(self, shift: int) -> WindowPartition:
        if shift not in self.windows:
            raise ValueError(
                f"shift must be one of {sorted(self.windows)} (the layout was built with window={self.window}), "
                f"got {shift!r}"
            )
        return self.windows[shift]


def _csr_from_sorted_ids(ids: torch.Tensor, count: int) -> torch.Tensor:
    """CSR offsets ``[count+1]`` of a non-decreasing id vector."""
    counts = torch.bincount(ids, minlength=count)
    off = torch.zeros(count + 1, dtype=torch.long, device=ids.device)
    off[1:] = torch.cumsum(counts, 0)
    return off


def _first_per_run(run: torch.Tensor, num_runs: int) -> torch.Tensor:
    """Index of the first element of each run of a non-decreasing run index ``[num_runs]``."""
    first = torch.zeros(num_runs, dtype=torch.long, device=run.device)
    first.scatter_reduce_(0, run, torch.arange(run.numel(), device=run.device), reduce="amin", include_self=False)
    return first


def _window_partition(coords: torch.Tensor, token_batch: torch.Tensor, window: int, shift: int) -> WindowPartition:
    dev = coords.device
    n = coords.shape[0]
    if n == 0:
        z = torch.zeros(0, dtype=torch.int32, device=dev)
        return WindowPartition(shift, z, torch.zeros(1, dtype=torch.int32, device=dev), z.view(0, 2), z, 0, 0)
    w = torch.div(coords[:, 1:] + shift, window, rounding_mode="floor")
    extent = int(w.max()) + 1
    key = token_batch.long()
    for a in w.unbind(1):
        key = key * extent + a
    key, perm = torch.sort(key, stable=True)
    run = _run_index(key)
    nw = int(run[-1]) + 1
    offsets = _csr_from_sorted_ids(run, nw)
    sizes = offsets[1:] - offsets[:-1]
    tiles_per = -(-sizes // WINDOW_TILE)
    tile_window = torch.repeat_interleave(torch.arange(nw, device=dev), tiles_per)
    tile_first = torch.zeros(nw + 1, dtype=torch.long, device=dev)
    tile_first[1:] = torch.cumsum(tiles_per, 0)
    local = torch.arange(tile_window.numel(), device=dev) - tile_first[tile_window]
    start = offsets[tile_window] + local * WINDOW_TILE
    end = torch.minimum(start + WINDOW_TILE, offsets[tile_window + 1])
    return WindowPartition(
        shift=shift,
        perm=perm.int(),
        offsets=offsets.int(),
        tiles=torch.stack([start, end], 1).int().contiguous(),
        tile_window=tile_window.int(),
        num_windows=nw,
        max_window_tokens=int(sizes.max()),
    )


def build_layout(coords: torch.Tensor, *, compression_block: int, selection_block: int, window: int) -> BlockLayout:
    """Build every coordinate-dependent table of SSA once; reuse it for every layer and sampling step.

    ``coords [N, 4]`` integer (batch, x, y, z) in layout order (see :func:`layout_order`), on the device the
    kernels will run on. Host synchronisations happen here (sizes and maxima are read back), never later.
    """
    if not isinstance(window, int) or isinstance(window, bool) or window < 1:
        raise ValueError(f"window must be a positive int, got {window!r}")
    key = check_layout_order(coords, compression_block=compression_block, selection_block=selection_block)
    dev = coords.device
    c64 = coords.long()
    n = c64.shape[0]
    ms, mc = selection_block, compression_block
    batch = c64[:, 0]
    nb = int(batch.max()) + 1 if n else 0
    token_cmp = _run_index(torch.div(key, mc**3, rounding_mode="floor"))
    token_sel = _run_index(torch.div(key, ms**3, rounding_mode="floor"))
    nc = int(token_cmp[-1]) + 1 if n else 0
    ns = int(token_sel[-1]) + 1 if n else 0
    cmp_first = _first_per_run(token_cmp, nc)
    sel_first = _first_per_run(token_sel, ns)
    cmp_offsets = _csr_from_sorted_ids(token_cmp, nc)
    sel_offsets = _csr_from_sorted_ids(token_sel, ns)
    cmp_batch = batch[cmp_first]
    sel_batch = batch[sel_first]
    cmp_sel = token_sel[cmp_first]
    cmp_coords = torch.cat([cmp_batch[:, None], torch.div(c64[cmp_first, 1:], mc, rounding_mode="floor")], 1)
    sel_sizes = sel_offsets[1:] - sel_offsets[:-1]
    sel_cmp_offsets = _csr_from_sorted_ids(cmp_sel, ns)
    batch_sel_offsets = _csr_from_sorted_ids(sel_batch, nb)
    layout = BlockLayout(
        coords=coords.int().contiguous(),
        compression_block=mc,
        selection_block=ms,
        window=window,
        num_tokens=n,
        batch_size=nb,
        num_cmp_blocks=nc,
        num_sel_blocks=ns,
        max_sel_block_tokens=int(sel_sizes.max()) if ns else 0,
        max_sel_blocks_per_batch=int((batch_sel_offsets[1:] - batch_sel_offsets[:-1]).max()) if nb else 0,
        batch_offsets=_csr_from_sorted_ids(batch, nb).int(),
        token_batch=batch.int(),
        token_cmp=token_cmp.int(),
        cmp_offsets=cmp_offsets.int(),
        cmp_coords=cmp_coords.int(),
        cmp_batch=cmp_batch.int(),
        cmp_sel=cmp_sel.int(),
        batch_cmp_offsets=_csr_from_sorted_ids(cmp_batch, nb).int(),
        token_sel=token_sel.int(),
        sel_offsets=sel_offsets.int(),
        sel_cmp_offsets=sel_cmp_offsets.int(),
        sel_batch=sel_batch.int(),
        batch_sel_offsets=batch_sel_offsets.int(),
    )
    for shift in sorted({0, window // 2}):
        layout.windows[shift] = _window_partition(c64, batch, window, shift)
    return layout
