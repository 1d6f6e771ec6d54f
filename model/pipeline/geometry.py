"""Mesh <-> voxel geometry of the cascade: token coordinates in the SSA layout order (:func:`to_layout_order`), the
revoxelisation of the 512 mesh into the 1024 stage's latent cells (:func:`mesh_to_latent_coords`), the voxels that can
touch a level set (:func:`surface_voxels`), marching cubes of a dense field (:func:`dense_field_to_mesh`) and quadric
simplification (:func:`simplify_mesh`).

Meshes are in the unit cube ``[-0.5, 0.5]^3`` of :mod:`model.pipeline.extract` (voxel ``i`` of an ``R^3`` field at
``(i + 0.5) / R - 0.5``).
"""
from __future__ import annotations

import math

import numpy as np
import torch
import trimesh

from model.pipeline.checks import positive_int
from ssa_kernels.layout import layout_order

__all__ = [
    "MESH_MARGIN",
    "OUTSIDE",
    "SAMPLE_SPACING",
    "TOKEN_BAND",
    "dense_field_to_mesh",
    "mesh_to_latent_coords",
    "simplify_mesh",
    "surface_voxels",
    "to_layout_order",
]

#: Half-width (voxels of the 1024 grid) of the band around the 512 mesh whose 128^3 cells are the 1024 tokens.
TOKEN_BAND = 4.0
#: Largest side of the normalised 512 mesh in the unit cube (released normalize_mesh scale 0.95).
MESH_MARGIN = 0.95
#: Spacing (voxels of the 1024 grid) of the surface samples that measure the token band.
SAMPLE_SPACING = 0.5
#: Value of empty space outside the grid ("empty space is +1", RELEASED_MODEL.md C.6).
OUTSIDE = 1.0
#: Voxels per chunk of the neighbour tests of :func:`surface_voxels` and surface points per chunk of
#: :func:`mesh_to_latent_coords`.
_VOXEL_CHUNK = 1 << 22
_POINT_CHUNK = 1 << 21
#: The 26 neighbour offsets of a voxel.
_NEIGHBOURS = [(a, b, c) for a in (-1, 0, 1) for b in (-1, 0, 1) for c in (-1, 0, 1) if (a, b, c) != (0, 0, 0)]


def to_layout_order(coords: torch.Tensor, *, compression_block: int, selection_block: int) -> torch.Tensor:
    """``coords [N, 3]`` (x, y, z) or ``[N, 4]`` (batch, x, y, z) -> ``[N, 4]`` int32 rows in the SSA layout order
    (:func:`ssa_kernels.layout.layout_order`; with equal block sizes the released ``sort_block`` order)."""
    if not isinstance(coords, torch.Tensor) or coords.dim() != 2 or coords.shape[1] not in (3, 4):
        raise ValueError(f"coords must be a [N, 3] or [N, 4] integer tensor, got {getattr(coords, 'shape', coords)}")
    if coords.dtype.is_floating_point:
        raise ValueError(f"coords must have an integer dtype, got {coords.dtype}")
    c = coords.to(torch.int32)
    if c.shape[1] == 3:
        c = torch.cat([torch.zeros_like(c[:, :1]), c], dim=1)
    perm = layout_order(c, compression_block=compression_block, selection_block=selection_block)
    return c.index_select(0, perm).contiguous()


def _lattice(n: int, device) -> torch.Tensor:
    """Barycentric weights ``[K, 3]`` of the points ``(i, j) / n``, ``i + j <= n`` of a triangle (K = (n+1)(n+2)/2)."""
    r = torch.arange(n + 1, device=device)
    i, j = torch.meshgrid(r, r, indexing="ij")
    keep = (i + j) <= n
    i, j = i[keep].float() / n, j[keep].float() / n
    return torch.stack([i, j, 1.0 - i - j], dim=1)


def _band_cell_keys(points: torch.Tensor, resolution: int, factor: int, band: float) -> torch.Tensor:
    """Unique keys ``(cx * C + cy) * C + cz`` (``C = resolution / factor``) of the cells holding a grid point within
    ``band`` of some of ``points [P, 3]`` (grid index units; grid points are the integers 0 .. resolution - 1)."""
    cells = resolution // factor
    lo_cell = torch.floor((points - band).clamp_min(0) / factor).long()
    rounded = torch.round(points)
    per_axis = int(math.floor(2 * band / factor)) + 2
    keys = []
    for a in range(per_axis):
        for b in range(per_axis):
            for c in range(per_axis):
                cell = lo_cell + torch.tensor([a, b, c], device=points.device)
                first = cell * factor
                last = torch.clamp(first + factor - 1, max=resolution - 1)
                nearest = torch.minimum(torch.maximum(rounded, first.float()), last.float())
                d2 = (nearest - points).square().sum(1)
                ok = (d2 < band * band) & (cell < cells).all(1)
                cell = cell[ok]
                keys.append((cell[:, 0] * cells + cell[:, 1]) * cells + cell[:, 2])
    return torch.unique(torch.cat(keys))


def _mesh_arrays(mesh) -> tuple[np.ndarray, np.ndarray]:
    if isinstance(mesh, trimesh.Trimesh):
        return np.asarray(mesh.vertices, dtype=np.float64), np.asarray(mesh.faces, dtype=np.int64)
    if isinstance(mesh, tuple) and len(mesh) == 2:
        return np.asarray(mesh[0], dtype=np.float64), np.asarray(mesh[1], dtype=np.int64)
    raise TypeError(f"mesh must be a trimesh.Trimesh or (vertices, faces), got {type(mesh).__name__}")


@torch.no_grad()
def mesh_to_latent_coords(mesh, *, resolution: int = 1024, factor: int = 8, band: float = TOKEN_BAND,
                          margin: float = MESH_MARGIN, spacing: float = SAMPLE_SPACING, normalize: bool = True,
                          device=None, progress: bool = False) -> torch.Tensor:
    """The latent cells of a mesh as the released pipeline chooses the 1024 stage's tokens (RELEASED_MODEL.md C.4).

    The mesh is normalised (bounding-box centre at the origin, largest side ``margin``; skip with
    ``normalize=False`` for a mesh already in the unit cube), the ``resolution^3`` grid has its point ``i`` at
    ``i / (resolution - 1) - 0.5`` per axis, and a cell of ``factor^3`` grid points is kept when one of its points
    lies closer than ``band`` grid steps to the surface. Distances are measured to surface samples on a barycentric
    lattice of each triangle with at most ``spacing`` grid steps between neighbours (so within about
    ``0.6 * spacing`` of the exact distance); no dense grid is built, memory follows the surface.

    Returns ``[M, 3]`` int32 cell coordinates in ``[0, resolution / factor)``, unique, in raster order, on
    ``device`` (default: the CPU). Use :func:`to_layout_order` for the SSA layout order. ``progress``: a tqdm bar
    over the triangles.
    """
    resolution = positive_int("resolution", resolution)
    factor = positive_int("factor", factor)
    if resolution % factor or resolution < 2:
        raise ValueError(f"factor ({factor}) must divide resolution ({resolution})")
    for name, value in (("band", band), ("spacing", spacing)):
        if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
            raise ValueError(f"{name} must be a positive number, got {value!r}")
    v, f = _mesh_arrays(mesh)
    if f.ndim != 2 or f.shape[1] != 3 or len(f) == 0 or v.ndim != 2 or v.shape[1] != 3:
        raise ValueError("mesh must have vertices [V, 3] and at least one triangle")
    if f.min() < 0 or f.max() >= len(v):
        raise ValueError(f"mesh faces index vertices outside [0, {len(v)})")
    if normalize:
        from model.data.sdf import normalize_mesh

        v = np.asarray(normalize_mesh(trimesh.Trimesh(v, f, process=False), margin)[0].vertices)
    dev = torch.device(device) if device is not None else torch.device("cpu")
    # [F, 3, 3] in grid units, gathered on the device: the vertices and faces travel instead of 9 floats per face,
    # and the host does no per-face work (float64 as before, then rounded once: the same values)
    vt = torch.as_tensor(v, dtype=torch.float64, device=dev)
    tri = ((vt[torch.as_tensor(f, device=dev)] + 0.5) * (resolution - 1)).to(torch.float32)
    del vt
    longest = torch.stack([(tri[:, 0] - tri[:, 1]).norm(dim=1), (tri[:, 1] - tri[:, 2]).norm(dim=1),
                           (tri[:, 2] - tri[:, 0]).norm(dim=1)], 1).amax(1)
    steps = torch.ceil(longest / spacing).clamp_min(1).long()
    order = torch.argsort(steps)
    steps, tri = steps[order], tri[order]
    values, counts = torch.unique_consecutive(steps, return_counts=True)
    keys, start = [], 0
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=int(tri.shape[0]), desc="revoxelise", unit="tri", unit_scale=True, leave=False)
    for n, count in zip(values.tolist(), counts.tolist()):
        weights = _lattice(n, dev)  # [K, 3]
        per_chunk = max(1, _POINT_CHUNK // weights.shape[0])
        for s in range(start, start + count, per_chunk):
            t = tri[s:min(s + per_chunk, start + count)]
            points = torch.einsum("kj,tjd->tkd", weights, t).reshape(-1, 3)
            keys.append(_band_cell_keys(points, resolution, factor, float(band)))
            if bar is not None:
                bar.update(int(t.shape[0]))
        start += count
    if bar is not None:
        bar.close()
    key = torch.unique(torch.cat(keys))
    cells = resolution // factor
    return torch.stack([key // (cells * cells), (key // cells) % cells, key % cells], dim=1).to(torch.int32)


@torch.no_grad()
def surface_voxels(coords: torch.Tensor, values: torch.Tensor, resolution: int, level: float,
                   fill: float | torch.Tensor = OUTSIDE) -> torch.Tensor:
    """``[M]`` bool: the voxels that can touch the ``level`` set when the empty voxels take ``fill``.

    ``coords [M, 3]`` (unique), ``values [M]``; ``fill`` a number or a coarse grid ``[G, G, G]`` (``G`` dividing
    ``resolution``; voxel ``v`` reads ``fill[v * G // resolution]``, outside the grid ``+1``), as
    :func:`model.pipeline.extract.sparse_sdf_to_mesh`'s ``fill``. A voxel is kept when its side of the level (value
    below it or not) differs from its own fill's side or from the side of one of its 26 neighbours (the neighbour's
    value, or its fill when empty). Every corner of a marching-cubes cell that crosses the level is kept, and a dropped
    voxel's fill lies on its side, so extracting from the kept voxels gives the same triangles. Runs on the
    tensors' device in chunks (26 sorted-key lookups per voxel).
    """
    r = int(resolution)
    m = coords.shape[0]
    if m == 0:
        return torch.zeros(0, dtype=torch.bool, device=coords.device)
    c = coords.long()
    key = (c[:, 0] * r + c[:, 1]) * r + c[:, 2]
    if m > 1 and not bool((key[1:] > key[:-1]).all()):
        key, order = torch.sort(key)
    else:
        order = None
    side = values.reshape(-1) < level
    side_sorted = side if order is None else side[order]
    grid = None
    if isinstance(fill, torch.Tensor):
        grid = fill.to(coords.device) < level
        if grid.dim() != 3 or r % grid.shape[0]:
            raise ValueError(f"fill grid must be [G, G, G] with G dividing {r}, got {tuple(fill.shape)}")
        gf = r // grid.shape[0]
    else:
        const_side = float(fill) < level

    def fill_side(p: torch.Tensor) -> torch.Tensor:  # p [k, 3] int64 voxel coords, possibly outside the grid
        inside = ((p >= 0) & (p < r)).all(1)
        if grid is None:
            return torch.full_like(inside, const_side)
        q = p.clamp(0, r - 1) // gf
        return torch.where(inside, grid[q[:, 0], q[:, 1], q[:, 2]], torch.zeros_like(inside))

    keep = torch.zeros(m, dtype=torch.bool, device=coords.device)
    offsets = torch.tensor(_NEIGHBOURS, device=coords.device)
    for s in range(0, m, _VOXEL_CHUNK):
        p = c[s:s + _VOXEL_CHUNK]
        sd = side[s:s + _VOXEL_CHUNK]
        k = sd != fill_side(p)
        for d in offsets:
            q = p + d
            inside = ((q >= 0) & (q < r)).all(1)
            qk = (q[:, 0] * r + q[:, 1]) * r + q[:, 2]
            pos = torch.searchsorted(key, qk).clamp_max(m - 1)
            hit = inside & (key[pos] == qk)
            k |= torch.where(hit, side_sorted[pos], fill_side(q)) != sd
        keep[s:s + _VOXEL_CHUNK] = k
    return keep


def dense_field_to_mesh(field: torch.Tensor | np.ndarray, level: float, *, progress: bool = False) -> trimesh.Trimesh:
    """Marching cubes of a dense ``[R, R, R]`` field at ``level``, vertices in the unit cube (voxel ``i`` at ``(i +
    0.5) / R - 0.5``), normals towards increasing values. A CUDA tensor is extracted on the GPU
    (:func:`model.pipeline.marching_cubes.dense_marching_cubes`), anything else by scikit-image (Lewiner) on the CPU.
    An empty mesh when the level set is empty."""
    from model.pipeline.marching_cubes import dense_marching_cubes, mesh_to_numpy

    shape = tuple(field.shape) if hasattr(field, "shape") else np.shape(field)
    if len(shape) != 3 or len(set(shape)) != 1:
        raise ValueError(f"field must be a cube [R, R, R], got {shape}")
    if isinstance(field, torch.Tensor) and field.is_cuda:
        verts, faces = mesh_to_numpy(*dense_marching_cubes(field, float(level), progress=progress), side=shape[0])
        return trimesh.Trimesh(verts, faces, process=False)
    from skimage.measure import marching_cubes

    vol = field.detach().float().cpu().numpy() if isinstance(field, torch.Tensor) else np.asarray(field, np.float32)
    if not float(vol.min()) < level < float(vol.max()):
        return trimesh.Trimesh(np.zeros((0, 3)), np.zeros((0, 3), np.int64), process=False)
    verts, faces, _, _ = marching_cubes(vol, level)
    return trimesh.Trimesh((verts.astype(np.float64) + 0.5) / vol.shape[0] - 0.5, faces.astype(np.int64),
                           process=False)


#: The released post-processing's decimation (``simplify_ratio``: the share of the faces removed).
RELEASED_SIMPLIFY_RATIO = 0.95


def simplify_mesh(mesh: trimesh.Trimesh, faces: int | None = None, *, ratio: float | None = None) -> trimesh.Trimesh:
    """Quadric edge-collapse decimation (the ``fast-simplification`` package) to at most ``faces`` faces, or removing
    the share ``ratio`` of the faces (the released ``remesh`` post-processing removes
    :data:`RELEASED_SIMPLIFY_RATIO` = 95%); one of the two. A mesh already within the budget is returned as is."""
    import fast_simplification

    if (faces is None) == (ratio is None):
        raise ValueError("give one of faces and ratio")
    if faces is not None:
        target = positive_int("faces", faces)
    else:
        if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not 0.0 <= ratio < 1.0:
            raise ValueError(f"ratio must be a number in [0, 1), got {ratio!r}")
        target = max(1, int(round(len(mesh.faces) * (1.0 - ratio))))
    if len(mesh.faces) <= target:
        return mesh
    verts, tris = fast_simplification.simplify(np.asarray(mesh.vertices, np.float64),
                                               np.asarray(mesh.faces, np.int32), target_count=target)
    return trimesh.Trimesh(verts, tris, process=False)
