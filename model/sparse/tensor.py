"""Sparse voxel tensors: integer voxel coordinates plus one feature row per voxel.

A :class:`SparseTensor` holds

- ``coords [N, 4]`` int32, rows (batch, x, y, z), non-negative, unique, batch elements contiguous and in
  ascending order (the order *inside* a batch element is free: every layer keeps the row order it is given,
  except the ones that build a new coordinate set, which document theirs);
- ``feats [N, C]`` floating point, row ``i`` belongs to voxel ``coords[i]``;
- ``batch_size`` (may exceed the largest batch index: trailing empty batch elements are legal);
- ``offsets [B + 1]`` int64, the CSR start of each batch element (computed on first use);
- ``resolution``, the grid side at this level when known (optional, only checked);
- ``cache``, a dict for everything that depends only on the coordinates (the coordinate hash, neighbour maps of
  the convolution, pooling and subdivision maps, window partitions, position embeddings, later the SSA block
  layout). Tensors made with :meth:`SparseTensor.replace` share the dict, so such things are computed once per
  coordinate set and reused by every layer.

:class:`CoordIndex` is the coordinate hash: a sort of integer keys plus ``searchsorted``, used to find the row of
a voxel from its coordinates (convolution neighbours, membership tests of the pruning targets, loss lookups).
"""
from __future__ import annotations

import functools
from typing import Sequence

import torch

__all__ = ["COORD_COLUMNS", "NEIGHBOUR_ROWS_KEY", "NEIGHBOUR_ROWS_SOURCE_KEY", "CoordIndex", "SparseTensor",
           "linear_keys", "subset_neighbour_rows"]

#: Columns of ``coords``: batch index, then x, y, z.
COORD_COLUMNS = 4
#: Number of spatial dimensions.
SPATIAL_DIMS = 3
#: Largest key value allowed for the int64 coordinate keys (headroom below 2**63).
_MAX_KEY = 2**62
#: Cache key of the coordinate hash.
_INDEX_CACHE_KEY = "coord_index"
#: Cache key of the 3^3 convolution's neighbour table ``[N, 27]`` int32 (:func:`model.sparse.conv.neighbour_rows`),
#: and of a function that derives it from an earlier coordinate set's table without a hash lookup (set by
#: :meth:`SparseTensor.subset` and :func:`model.sparse.layers.sparse_subdivide` when that table exists).
NEIGHBOUR_ROWS_KEY = "conv3_neighbour_rows"
NEIGHBOUR_ROWS_SOURCE_KEY = "conv3_neighbour_rows_source"


def _check_int_coords(coords, name: str = "coords") -> torch.Tensor:
    """Type and shape checks shared by every coordinate argument; returns the tensor unchanged."""
    if not isinstance(coords, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(coords).__name__}")
    if coords.dtype.is_floating_point or coords.dtype.is_complex or coords.dtype == torch.bool:
        raise TypeError(f"{name} must have an integer dtype, got {coords.dtype}")
    if coords.dim() != 2 or coords.shape[1] != COORD_COLUMNS:
        raise ValueError(f"{name} must have shape [N, 4] (batch, x, y, z), got {tuple(coords.shape)}")
    return coords


def linear_keys(coords: torch.Tensor, radix: int) -> torch.Tensor:
    """Key ``[N] int64`` = ((batch * radix + x) * radix + y) * radix + z of ``coords [N, 4]``.

    Keys sort like (batch, x, y, z) with z fastest, provided every spatial coordinate lies in ``[0, radix)``.
    """
    c = coords.long()
    key = c[:, 0]
    for axis in range(1, COORD_COLUMNS):
        key = key * radix + c[:, axis]
    return key


class CoordIndex:
    """Hash of one coordinate set: maps voxel coordinates to row numbers.

    Built from ``coords [N, 4]`` (integer, non-negative, unique) by sorting their :func:`linear_keys`;
    :meth:`lookup` answers with ``searchsorted``. Works on any device; building it syncs with the host once
    (for the key radix).
    """

    def __init__(self, coords: torch.Tensor):
        coords = _check_int_coords(coords).long()
        n = coords.shape[0]
        self.num_voxels = n
        self.radix = int(coords[:, 1:].max()) + 1 if n else 1
        self.num_batches = int(coords[:, 0].max()) + 1 if n else 0
        if n and (int(coords.min()) < 0):
            raise ValueError("coords must be non-negative (batch index and voxel coordinates)")
        if self.num_batches * self.radix**SPATIAL_DIMS >= _MAX_KEY:
            raise ValueError("coords too large: batch * grid^3 does not fit a 62-bit key")
        self.sorted_keys, self.order = torch.sort(linear_keys(coords, self.radix))
        if n > 1 and bool((self.sorted_keys[1:] == self.sorted_keys[:-1]).any()):
            raise ValueError("coords contain duplicate voxels (the same (batch, x, y, z) twice)")

    def lookup(self, query: torch.Tensor) -> torch.Tensor:
        """Row ``[M] int64`` of each voxel of ``query [M, 4]`` in the indexed set, ``-1`` where absent.

        Query coordinates may lie outside the grid (negative, beyond the largest coordinate): they are absent.
        """
        q = _check_int_coords(query, "query").long()
        if q.shape[0] == 0 or self.num_voxels == 0:
            return torch.full((q.shape[0],), -1, dtype=torch.long, device=q.device)
        xyz = q[:, 1:]
        inside = (xyz >= 0).all(1) & (xyz < self.radix).all(1) & (q[:, 0] >= 0) & (q[:, 0] < self.num_batches)
        key = linear_keys(torch.where(inside.unsqueeze(1), q, torch.zeros_like(q)), self.radix)
        pos = torch.searchsorted(self.sorted_keys, key).clamp_max(self.num_voxels - 1)
        hit = inside & (self.sorted_keys[pos] == key)
        return torch.where(hit, self.order[pos], torch.full_like(pos, -1))

    def contains(self, query: torch.Tensor) -> torch.Tensor:
        """``[M]`` bool: whether each voxel of ``query [M, 4]`` is in the indexed set."""
        return self.lookup(query) >= 0


def subset_neighbour_rows(table: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """The neighbour table ``[M, 27]`` int32 of the voxels ``rows [M]`` (increasing) of a coordinate set whose table
    is ``table [N, 27]`` (-1 where a neighbour is absent): a neighbour of a kept voxel is in the subset exactly when
    it is kept, at its new row. The same table as a lookup in the subset's coordinate hash, from two gathers."""
    n = table.shape[0]
    # new row of every old row; slot n stays -1, and an absent neighbour (-1) indexes it from the end
    new_row = torch.full((n + 1,), -1, dtype=torch.int32, device=table.device)
    new_row[rows] = torch.arange(rows.numel(), dtype=torch.int32, device=table.device)
    return new_row[table.index_select(0, rows)]


class SparseTensor:
    """Sparse voxels of several batch elements packed one after another: ``coords [N, 4]``, ``feats [N, C]``.

    Args:
        coords: ``[N, 4]`` integer (batch, x, y, z); stored as int32. Batch indices must not decrease along the
            rows; voxels must be unique (checked when ``validate``).
        feats: ``[N, C]`` floating point, on the device of ``coords``.
        batch_size: number of batch elements; default largest batch index + 1 (0 when ``N == 0``).
        resolution: grid side at this level, if known; every spatial coordinate must be below it.
        cache: a coordinate cache to share (only pass one built for exactly these coordinates).
        validate: run the checks that need a host sync (order, uniqueness, bounds). Layers building new coordinate
            sets that are correct by construction pass ``False``; shapes and dtypes are always checked.
    """

    def __init__(
        self,
        coords: torch.Tensor,
        feats: torch.Tensor,
        *,
        batch_size: int | None = None,
        resolution: int | None = None,
        cache: dict | None = None,
        validate: bool = True,
    ):
        coords = _check_int_coords(coords)
        n = coords.shape[0]
        _check_feats(feats, n, coords.device)
        if coords.dtype != torch.int32:
            if validate and n and int(coords.abs().max()) > torch.iinfo(torch.int32).max:
                raise ValueError("coords do not fit int32")
            coords = coords.to(torch.int32)
        if resolution is not None and (not isinstance(resolution, int) or isinstance(resolution, bool)
                                       or resolution < 1):
            raise ValueError(f"resolution must be a positive int or None, got {resolution!r}")
        if batch_size is not None and (not isinstance(batch_size, int) or isinstance(batch_size, bool)
                                       or batch_size < 0):
            raise ValueError(f"batch_size must be a non-negative int or None, got {batch_size!r}")
        if batch_size is None or validate:
            max_batch = int(coords[:, 0].max()) if n else -1
            if batch_size is None:
                batch_size = max_batch + 1
            elif batch_size <= max_batch:
                raise ValueError(f"batch_size ({batch_size}) must exceed the largest batch index ({max_batch})")
        self.coords = coords.contiguous()
        self.feats = feats
        self.batch_size = batch_size
        self.resolution = resolution
        self.cache = {} if cache is None else cache
        if validate:
            self._validate()

    def _validate(self) -> None:
        c = self.coords
        if c.shape[0] == 0:
            return
        if int(c.min()) < 0:
            raise ValueError("coords must be non-negative (batch index and voxel coordinates)")
        b = c[:, 0]
        if c.shape[0] > 1 and bool((b[1:] < b[:-1]).any()):
            raise ValueError(
                "coords must keep batch elements contiguous and in ascending batch order "
                "(sort the rows by coords[:, 0], e.g. with a stable sort)"
            )
        if self.resolution is not None and int(c[:, 1:].max()) >= self.resolution:
            raise ValueError(f"coords reach {int(c[:, 1:].max())}, outside a grid of resolution {self.resolution}")
        # building the hash checks uniqueness; keep it, the convolution needs it anyway
        self.cache.setdefault(_INDEX_CACHE_KEY, CoordIndex(c))

    # ----------------------------------------------------------------------------------------------------------
    # constructors

    @classmethod
    def from_list(
        cls,
        coords: Sequence[torch.Tensor],
        feats: Sequence[torch.Tensor],
        *,
        resolution: int | None = None,
    ) -> "SparseTensor":
        """Pack per-sample ``coords[b] [n_b, 3]`` (x, y, z) and ``feats[b] [n_b, C]`` into one tensor (batch b)."""
        if not isinstance(coords, (list, tuple)) or not isinstance(feats, (list, tuple)):
            raise TypeError("coords and feats must be lists (or tuples) of tensors, one per batch element")
        if len(coords) != len(feats):
            raise ValueError(f"coords has {len(coords)} batch elements but feats has {len(feats)}")
        if not coords:
            raise ValueError("coords must hold at least one batch element")
        rows, cols = [], []
        for b, (c, f) in enumerate(zip(coords, feats)):
            if not isinstance(c, torch.Tensor):
                raise TypeError(f"coords[{b}] must be a torch.Tensor, got {type(c).__name__}")
            if c.dtype.is_floating_point or c.dtype.is_complex or c.dtype == torch.bool:
                raise TypeError(f"coords[{b}] must have an integer dtype, got {c.dtype}")
            if c.dim() != 2 or c.shape[1] != SPATIAL_DIMS:
                raise ValueError(f"coords[{b}] must have shape [n, 3] (x, y, z), got {tuple(c.shape)}")
            _check_feats(f, c.shape[0], c.device, name=f"feats[{b}]")
            batch = torch.full((c.shape[0], 1), b, dtype=torch.int32, device=c.device)
            rows.append(torch.cat([batch, c.to(torch.int32)], dim=1))
            cols.append(f)
        channels = {f.shape[1] for f in cols}
        if len(channels) != 1:
            raise ValueError(f"feats of all batch elements must have the same number of channels, got {channels}")
        return cls(torch.cat(rows), torch.cat(cols), batch_size=len(coords), resolution=resolution)

    def replace(self, feats: torch.Tensor) -> "SparseTensor":
        """Same coordinates (and the same ``cache`` object) with new ``feats [N, C']``."""
        _check_feats(feats, self.num_voxels, self.device)
        return SparseTensor(self.coords, feats, batch_size=self.batch_size, resolution=self.resolution,
                            cache=self.cache, validate=False)

    def subset(self, rows: torch.Tensor) -> "SparseTensor":
        """The voxels selected by ``rows``: a ``[N]`` bool mask or increasing int64 row numbers.

        Row order is kept, so batch elements stay contiguous. The result is a new coordinate set (fresh cache); when
        this one holds the convolution's neighbour table, the subset's is derived from it on first use
        (:func:`subset_neighbour_rows`) instead of looked up again.
        """
        if not isinstance(rows, torch.Tensor):
            raise TypeError(f"rows must be a torch.Tensor, got {type(rows).__name__}")
        if rows.dtype == torch.bool:
            if rows.shape != (self.num_voxels,):
                raise ValueError(f"a boolean rows mask must have shape [{self.num_voxels}], got {tuple(rows.shape)}")
            rows = torch.nonzero(rows).squeeze(1)
        elif rows.dtype.is_floating_point or rows.dim() != 1:
            raise ValueError("rows must be a [N] bool mask or a 1-D integer tensor of increasing row numbers")
        elif rows.numel() > 1 and bool((rows[1:] <= rows[:-1]).any()):
            raise ValueError("integer rows must be strictly increasing (keeps batch order and uniqueness)")
        cache = {}
        table = self.cache.get(NEIGHBOUR_ROWS_KEY)
        if table is not None:
            cache[NEIGHBOUR_ROWS_SOURCE_KEY] = functools.partial(subset_neighbour_rows, table, rows)
        return SparseTensor(self.coords.index_select(0, rows), self.feats.index_select(0, rows),
                            batch_size=self.batch_size, resolution=self.resolution, cache=cache, validate=False)

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> "SparseTensor":
        """Move to ``device`` (fresh cache) and/or cast ``feats`` to ``dtype`` (cache shared)."""
        if device is not None and torch.device(device) != self.device:
            return SparseTensor(self.coords.to(device), self.feats.to(device=device, dtype=dtype),
                                batch_size=self.batch_size, resolution=self.resolution, validate=False)
        return self.replace(self.feats if dtype is None else self.feats.to(dtype))

    # ----------------------------------------------------------------------------------------------------------
    # properties and coordinate-derived data (cached)

    @property
    def num_voxels(self) -> int:
        return self.coords.shape[0]

    @property
    def num_channels(self) -> int:
        return self.feats.shape[1]

    @property
    def shape(self) -> torch.Size:
        """``(N, C)`` of ``feats``."""
        return self.feats.shape

    @property
    def dtype(self) -> torch.dtype:
        return self.feats.dtype

    @property
    def device(self) -> torch.device:
        return self.coords.device

    @property
    def batch_index(self) -> torch.Tensor:
        """``[N] int64`` batch element of each row (cached)."""
        if "batch_index" not in self.cache:
            self.cache["batch_index"] = self.coords[:, 0].long()
        return self.cache["batch_index"]

    @property
    def batch_counts(self) -> torch.Tensor:
        """``[B] int64`` number of voxels of each batch element (cached)."""
        if "batch_counts" not in self.cache:
            self.cache["batch_counts"] = torch.bincount(self.batch_index, minlength=self.batch_size)
        return self.cache["batch_counts"]

    @property
    def offsets(self) -> torch.Tensor:
        """``[B + 1] int64`` CSR offsets: batch element b is rows ``offsets[b] : offsets[b + 1]`` (cached)."""
        if "offsets" not in self.cache:
            counts = self.batch_counts
            self.cache["offsets"] = torch.cat([counts.new_zeros(1), torch.cumsum(counts, 0)])
        return self.cache["offsets"]

    def coord_index(self) -> CoordIndex:
        """The coordinate hash of this coordinate set (cached)."""
        if _INDEX_CACHE_KEY not in self.cache:
            self.cache[_INDEX_CACHE_KEY] = CoordIndex(self.coords)
        return self.cache[_INDEX_CACHE_KEY]

    def unbind(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Per batch element ``(coords [n_b, 3] int32, feats [n_b, C])``, the inverse of :meth:`from_list`."""
        bounds = self.offsets.tolist()
        return [(self.coords[s:e, 1:], self.feats[s:e]) for s, e in zip(bounds[:-1], bounds[1:])]

    def dense(self, resolution: int | None = None, fill_value: float = 0.0) -> torch.Tensor:
        """Dense grid ``[B, C, R, R, R]`` indexed [b, c, x, y, z]; voxels not present get ``fill_value``."""
        res = resolution or self.resolution
        if res is None:
            res = int(self.coords[:, 1:].max()) + 1 if self.num_voxels else 1
        grid = self.feats.new_full((self.batch_size, res, res, res, self.num_channels), fill_value)
        c = self.coords.long()
        grid = grid.index_put((c[:, 0], c[:, 1], c[:, 2], c[:, 3]), self.feats)
        return grid.permute(0, 4, 1, 2, 3)

    def __repr__(self) -> str:
        return (f"SparseTensor(voxels={self.num_voxels}, channels={self.num_channels}, batch_size={self.batch_size}, "
                f"resolution={self.resolution}, dtype={self.dtype}, device={self.device})")


def _check_feats(feats, n: int, device: torch.device, name: str = "feats") -> None:
    if not isinstance(feats, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(feats).__name__}")
    if not feats.dtype.is_floating_point:
        raise TypeError(f"{name} must be a floating-point tensor, got {feats.dtype}")
    if feats.dim() != 2:
        raise ValueError(f"{name} must have shape [N, C], got {tuple(feats.shape)}")
    if feats.shape[0] != n:
        raise ValueError(f"{name} has {feats.shape[0]} rows but the coordinates describe {n} voxels")
    if feats.device != device:
        raise ValueError(f"{name} is on {feats.device} but the coordinates are on {device}")
