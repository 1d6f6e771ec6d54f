"""Mesh extraction from a sparse SDF: marching cubes brick by brick, never on a dense ``R^3`` grid.

A sparse SDF holds values only at some voxels of an ``R^3`` grid (the band ``|sdf| < tau`` of the data, or the voxels
the VAE decoder kept). :func:`sparse_sdf_to_mesh` turns it into a triangle mesh:

1. **Padding.** The grid is padded by one empty voxel on every side, so a band that touches the grid's border still
   gives a closed surface.
2. **Bricks.** The padded grid is cut into bricks of ``brick^3`` marching-cubes cells (default 32). Cell ``q`` (the
   cube whose lower corner is voxel centre ``q``) belongs to brick ``q // brick``; a brick needs the voxel values at
   ``[b * brick, (b + 1) * brick]`` per axis, i.e. its own voxels plus a one-voxel halo on the high side. Only
   bricks with a voxel in them or in their halo are visited, so memory and time follow the surface, not the volume
   (a ``(brick + 1)^3`` float32 array per brick, 140 kB at 32).
3. **Empty voxels.** Voxels without a value are filled. ``fill="sign"`` (default) fills each 6-connected component of
   empty voxels inside the brick with ``-1`` or ``+1``: the majority side (value below or above ``level``) of the
   present voxels face-adjacent to it, ``+1`` when it touches none. ``fill=<number>`` fills every empty voxel with
   that number; ``fill=1.0`` is the released Direct3D-S2 rule ("empty space is +1", RELEASED_MODEL.md C.6), which
   adds a spurious inner shell where the band's inner edge (values near ``-1``) meets the ``+1`` fill (the released
   pipeline removes it with a sign-refiner network; the component rule removes it for free). The component rule
   only decides from inside the brick, so where the two sides of a band meet through a hole, two neighbouring bricks
   may decide differently and leave a crack on their shared face. ``fill=<array [G, G, G]>`` (``G`` dividing ``R``)
   is a coarse fill grid: an empty voxel ``v`` takes ``grid[v * G // R]``, the padding takes ``+1``; with the sign
   refiner's ``+-1`` grid this is the released 1024 field (``|SDF| * sign``, decoded values kept) without a dense
   ``R^3`` array (:mod:`model.pipeline.cascade`).
4. **Marching cubes** (``skimage.measure.marching_cubes``, Lewiner) at ``level`` on each brick that crosses it, the
   vertices shifted by the brick's origin. Normals point to increasing values (outwards for a negative-inside SDF).
5. **Welding.** Cells on the two sides of a brick face compute the vertices on that face from the same two values,
   so they get bit-identical positions; all vertices are welded by position (quantised to ``2^-k`` voxel, ``k >= 7``),
   then faces that collapsed are dropped.

Coordinates: voxel ``(i, j, l)`` has its centre at ``((i, j, l) + 0.5) / R - 0.5`` in the unit cube ``[-0.5, 0.5]^3``
of :mod:`model.data.sdf`, and so do the returned vertices. :func:`to_original_frame` maps a mesh back to the frame of
the mesh a sample was made from (``original = unit / scale + center``).

Backends: ``backend="skimage"`` is the brick loop above on the CPU; ``backend="torch"`` is
:func:`model.pipeline.marching_cubes.sparse_marching_cubes`, batched tensor operations on the device of the inputs
(the GPU path: a fill number or a fill grid, not ``fill="sign"``; it extracts only cells with a decoded corner, and
resolves a face with four crossings by keeping the outside connected, where Lewiner's tables may add a tunnel).
``"auto"`` (default) takes ``"torch"`` when ``coords`` is a CUDA tensor and ``fill`` is not ``"sign"``, else
``"skimage"``.

Which ``level``: our VAE is trained on ``sdf / tau`` (:attr:`model.data.sdf.SparseSDF.sdf_scaled`), whose surface is
exactly at 0, so :data:`DEFAULT_LEVEL` is 0. The released pipeline extracts at 0.2 (0.4 after its 512 refiner) on its
own, unpublished normalisation of the training SDF; 0.2 on ours would move the surface outwards by ``0.2 * tau``
voxels.
"""
from __future__ import annotations

import math
from typing import Sequence

import numpy as np
import trimesh

__all__ = ["BACKENDS", "DEFAULT_BRICK", "DEFAULT_LEVEL", "decoded_to_meshes", "sparse_sdf_to_mesh", "to_original_frame"]

#: Iso level of our VAE's output (``sdf / tau``: the surface is at 0).
DEFAULT_LEVEL = 0.0
#: Values of ``sparse_sdf_to_mesh(backend=...)``.
BACKENDS = ("auto", "skimage", "torch")
#: Marching-cubes cells per brick side.
DEFAULT_BRICK = 32
#: Largest grid side accepted (keys stay well inside int64).
MAX_RESOLUTION = 1 << 16
#: Finest weld quantum is 2^-_MAX_WELD_BITS voxel (coarser when the grid is large, never coarser than 2^-7).
_MAX_WELD_BITS = 16
_MIN_WELD_BITS = 7
#: The 8 offsets of {0, 1}^3, first one (0, 0, 0).
_CORNERS = np.array([[a, b, c] for a in (0, 1) for b in (0, 1) for c in (0, 1)], dtype=np.int64)


def _as_numpy(array, dtype) -> np.ndarray:
    if hasattr(array, "detach"):  # torch tensor, without importing torch here
        array = array.detach().float().cpu().numpy() if array.dtype.is_floating_point else array.detach().cpu().numpy()
    return np.asarray(array, dtype=dtype)


def _check_inputs(coords, values, resolution, level, brick, fill):
    if isinstance(resolution, bool) or not isinstance(resolution, (int, np.integer)) or resolution < 2:
        raise ValueError(f"resolution must be an int >= 2, got {resolution!r}")
    if resolution > MAX_RESOLUTION:
        raise ValueError(f"resolution must be at most {MAX_RESOLUTION}, got {resolution}")
    if isinstance(brick, bool) or not isinstance(brick, (int, np.integer)) or brick < 2:
        raise ValueError(f"brick must be an int >= 2, got {brick!r}")
    if not (isinstance(level, (int, float, np.floating)) and math.isfinite(level)):
        raise ValueError(f"level must be a finite number, got {level!r}")
    if isinstance(fill, str):
        if fill != "sign":
            raise ValueError(f"fill must be 'sign', a number or a fill grid, got {fill!r}")
        if not -1.0 < level < 1.0:
            raise ValueError(f"fill='sign' fills with -1 / +1, so level must lie in (-1, 1), got {level}")
    elif hasattr(fill, "shape"):
        fill = _as_numpy(fill, np.float32)
        g = fill.shape[0] if fill.ndim == 3 else 0
        if fill.ndim != 3 or fill.shape != (g, g, g) or g < 1 or resolution % g:
            raise ValueError(f"a fill grid must be [G, G, G] with G dividing resolution {resolution}, "
                             f"got shape {fill.shape}")
        if not np.isfinite(fill).all():
            raise ValueError("the fill grid must be finite")
    elif not (isinstance(fill, (int, float, np.floating)) and math.isfinite(fill)):
        raise ValueError(f"fill must be 'sign', a finite number or a fill grid, got {fill!r}")
    c = _as_numpy(coords, np.int64)
    v = _as_numpy(values, np.float32)
    if c.ndim != 2 or c.shape[1] != 3:
        raise ValueError(f"coords must have shape [M, 3], got {c.shape}")
    if v.ndim == 2 and v.shape[1] == 1:
        v = v[:, 0]
    if v.shape != (len(c),):
        raise ValueError(f"values must have shape [{len(c)}] (one per voxel), got {v.shape}")
    if len(c) and (c.min() < 0 or c.max() >= resolution):
        raise ValueError(f"coords must lie in [0, {resolution}), got range [{c.min()}, {c.max()}]")
    if not np.isfinite(v).all():
        raise ValueError("values must be finite")
    return c, v, fill


#: Value of the padding voxels around the grid when a fill grid is given ("empty space is +1").
_OUTSIDE = 1.0


def _grid_fill(grid: np.ndarray, origin: np.ndarray, side: int, resolution: int) -> np.ndarray:
    """``[side]^3`` float32 fill values of a brick whose padded-grid origin is ``origin``: each voxel takes the
    coarse grid cell it lies in, padding voxels (outside ``[0, R)``) take :data:`_OUTSIDE`."""
    factor = resolution // grid.shape[0]
    axes = []
    for a in range(3):
        idx = origin[a] - 1 + np.arange(side)  # voxel index (padded index - 1)
        axes.append((np.clip(idx, 0, resolution - 1) // factor, (idx < 0) | (idx >= resolution)))
    vol = grid[np.ix_(axes[0][0], axes[1][0], axes[2][0])].astype(np.float32, copy=True)
    outside = axes[0][1][:, None, None] | axes[1][1][None, :, None] | axes[2][1][None, None, :]
    vol[outside] = _OUTSIDE
    return vol


def _brick_assignment(g: np.ndarray, brick: int, nb: int):
    """Pairs (voxel row, brick key) for every brick that needs each voxel: its own brick, and, for voxels on the
    low face of their brick along some axes, the lower neighbours whose halo they are. ``g`` padded coords."""
    own = g // brick
    on_low = g % brick == 0  # [M, 3]
    rows, keys = [], []
    for d in _CORNERS:
        if d.any():
            sel = np.nonzero(on_low[:, d.astype(bool)].all(1))[0]
            b = own[sel] - d
        else:
            sel = np.arange(len(g))
            b = own
        ok = (b >= 0).all(1)
        rows.append(sel[ok])
        b = b[ok]
        keys.append((b[:, 0] * nb + b[:, 1]) * nb + b[:, 2])
    return np.concatenate(rows), np.concatenate(keys)


def _fill_by_components(vol: np.ndarray, present: np.ndarray, level: float) -> None:
    """Fill the empty voxels of ``vol`` in place with -1 / +1 per 6-connected empty component (module docstring)."""
    from scipy import ndimage

    empty = ~present
    label, n = ndimage.label(empty)
    if n == 0:
        return
    side = np.where(present, np.where(vol < level, -1.0, 1.0), 0.0)
    votes = np.zeros(n + 1)
    for axis in range(3):
        lo = [slice(None)] * 3
        hi = [slice(None)] * 3
        lo[axis], hi[axis] = slice(None, -1), slice(1, None)
        lo, hi = tuple(lo), tuple(hi)
        for a, b in ((lo, hi), (hi, lo)):  # empty at a, present neighbour at b
            sel = empty[a] & present[b]
            votes += np.bincount(label[a][sel], weights=side[b][sel], minlength=n + 1)
    fill = np.where(votes < 0, -1.0, 1.0).astype(vol.dtype)
    vol[empty] = fill[label[empty]]


def sparse_sdf_to_mesh(
    coords,
    values,
    resolution: int,
    *,
    level: float = DEFAULT_LEVEL,
    brick: int = DEFAULT_BRICK,
    fill="sign",
    progress: bool = False,
    backend: str = "auto",
) -> trimesh.Trimesh:
    """Triangle mesh of the ``level`` set of a sparse SDF, in the unit cube (see the module docstring).

    Args:
        coords: ``[M, 3]`` int voxel indices in ``[0, R)`` (numpy or torch; unique; any order).
        values: ``[M]`` or ``[M, 1]`` SDF values at those voxels (e.g. the VAE's tanh output, ``sdf / tau``).
        resolution: the grid side ``R``.
        level: iso value (:data:`DEFAULT_LEVEL` = 0 for our VAE).
        brick: marching-cubes cells per brick side.
        fill: ``"sign"`` (empty components take the side of their present neighbours), a number for every empty
            voxel (``1.0``: the released rule), or a coarse fill grid ``[G, G, G]`` (numpy or torch, ``G`` dividing
            ``R``; the padding takes ``+1``).
        progress: a tqdm bar over the bricks.
        backend: ``"auto"``, ``"skimage"`` (CPU) or ``"torch"`` (the inputs' device; module docstring).

    Returns:
        ``trimesh.Trimesh`` (``process=False``; vertices ``[V, 3]`` float64 in ``[-0.5, 0.5]^3``, faces ``[F, 3]``,
        outward normals for a negative-inside SDF), with no faces when the level set is empty.
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    on_cuda = getattr(coords, "is_cuda", False)
    if backend == "torch" or (backend == "auto" and on_cuda and not isinstance(fill, str)):
        return _torch_mesh(coords, values, resolution, level, fill, progress)
    from skimage.measure import marching_cubes

    c, v, fill = _check_inputs(coords, values, resolution, level, brick, fill)
    grid = fill if isinstance(fill, np.ndarray) else None
    if len(c) == 0:
        return trimesh.Trimesh(np.zeros((0, 3)), np.zeros((0, 3), np.int64), process=False)
    padded = resolution + 2
    nb = -(-(padded - 1) // brick)  # bricks per side (cells have lower corners 0 .. padded - 2)
    g = c + 1
    rows, keys = _brick_assignment(g, brick, nb)
    order = np.argsort(keys, kind="stable")
    rows, keys = rows[order], keys[order]
    starts = np.flatnonzero(np.r_[True, keys[1:] != keys[:-1]])
    ends = np.r_[starts[1:], len(keys)]

    side = brick + 1
    verts_out, faces_out, n_verts = [], [], 0
    bricks = range(len(starts))
    if progress:
        from tqdm.auto import tqdm

        bricks = tqdm(bricks, desc="marching cubes", unit="brick", leave=False)
    for k in bricks:
        key = int(keys[starts[k]])
        origin = np.array([key // (nb * nb), (key // nb) % nb, key % nb], dtype=np.int64) * brick
        sel = rows[starts[k] : ends[k]]
        local = g[sel] - origin
        vals = v[sel]
        if grid is None and not ((vals < level).any() or (not isinstance(fill, str) and fill < level)):
            continue  # every value (and the fill) above the level: nothing to extract here
        vol = np.empty((side, side, side), np.float32)
        present = np.zeros((side, side, side), bool)
        present[local[:, 0], local[:, 1], local[:, 2]] = True
        if grid is not None:
            vol = _grid_fill(grid, origin, side, resolution)
            vol[local[:, 0], local[:, 1], local[:, 2]] = vals
        elif isinstance(fill, str):
            vol[local[:, 0], local[:, 1], local[:, 2]] = vals
            _fill_by_components(vol, present, level)
        else:
            vol.fill(float(fill))
            vol[local[:, 0], local[:, 1], local[:, 2]] = vals
        if not float(vol.min()) < level < float(vol.max()):
            continue
        verts, faces, _, _ = marching_cubes(vol, level)
        verts_out.append(verts + origin.astype(np.float32))  # exact: integer origin, same float32 local positions
        faces_out.append(faces.astype(np.int64) + n_verts)  # int64: offsets may pass 2^31 at 4096^3
        n_verts += len(verts)
    if not faces_out:
        return trimesh.Trimesh(np.zeros((0, 3)), np.zeros((0, 3), np.int64), process=False)
    verts = np.concatenate(verts_out)
    del verts_out
    faces = np.concatenate(faces_out)
    del faces_out
    verts, faces = _weld(verts, faces, padded)
    unit = (verts.astype(np.float64) - 0.5) / resolution - 0.5  # padded index - 1 = voxel index; centre at +0.5
    return trimesh.Trimesh(unit, faces, process=False)


def _torch_mesh(coords, values, resolution, level, fill, progress) -> trimesh.Trimesh:
    """``backend="torch"``: :func:`model.pipeline.marching_cubes.sparse_marching_cubes` on the inputs' device (numpy
    inputs run on the CPU), returned in the unit cube like the CPU path."""
    import torch

    from model.pipeline.marching_cubes import mesh_to_numpy, sparse_marching_cubes

    if isinstance(fill, str):
        raise ValueError("backend='torch' takes a fill number or a fill grid, not fill='sign' (use backend='skimage')")
    coords = coords if isinstance(coords, torch.Tensor) else torch.from_numpy(np.asarray(coords, dtype=np.int64))
    values = values if isinstance(values, torch.Tensor) else torch.from_numpy(np.asarray(values, dtype=np.float32))
    if not isinstance(fill, (int, float, np.floating)):
        fill = fill if isinstance(fill, torch.Tensor) else torch.from_numpy(np.asarray(fill, dtype=np.float32))
    else:
        fill = float(fill)
    values = values.to(coords.device)
    if not bool(torch.isfinite(values).all()):
        raise ValueError("values must be finite")
    if isinstance(fill, torch.Tensor) and not bool(torch.isfinite(fill).all()):
        raise ValueError("the fill grid must be finite")
    if isinstance(resolution, np.integer):
        resolution = int(resolution)
    verts, faces = sparse_marching_cubes(coords, values, resolution, level=float(level), fill=fill,
                                         progress=progress)
    verts, faces = mesh_to_numpy(verts, faces, side=resolution)  # in the unit cube, mapped on the device
    return trimesh.Trimesh(verts, faces, process=False)


def _weld(verts: np.ndarray, faces: np.ndarray, padded: int):
    """Merge vertices at the same position (padded voxel units, quantised), drop collapsed faces and unused
    vertices. ``verts [V, 3]``, ``faces [F, 3]`` -> welded ``(verts [V', 3], faces [F', 3] int64)``."""
    axis_bits = max(1, int(math.ceil(math.log2(padded))))
    frac_bits = min(_MAX_WELD_BITS, 62 // 3 - axis_bits)
    if frac_bits < _MIN_WELD_BITS:
        raise ValueError(f"grid of side {padded} too large to weld vertices")
    bits = axis_bits + frac_bits
    key = np.zeros(len(verts), np.int64)
    for axis in range(3):
        key <<= bits
        key |= np.rint(verts[:, axis].astype(np.float64) * (1 << frac_bits)).astype(np.int64)
    _, first, inverse = np.unique(key, return_index=True, return_inverse=True)
    del key
    faces = inverse.reshape(-1)[faces]
    ok = (faces[:, 0] != faces[:, 1]) & (faces[:, 1] != faces[:, 2]) & (faces[:, 0] != faces[:, 2])
    if not ok.all():
        faces = faces[ok]
    used = np.zeros(len(first), bool)
    used[faces.reshape(-1)] = True
    remap = np.cumsum(used) - 1
    return verts[first[used]], remap[faces]


def decoded_to_meshes(sdf, *, resolution: int | None = None, **kwargs) -> list[trimesh.Trimesh]:
    """One mesh per batch element of a decoded :class:`~model.sparse.tensor.SparseTensor` ``[N, 1]`` (e.g.
    ``vae.decode(z).sdf``); ``resolution`` defaults to the tensor's. Keywords go to :func:`sparse_sdf_to_mesh`."""
    from model.sparse.tensor import SparseTensor

    if not isinstance(sdf, SparseTensor):
        raise TypeError(f"sdf must be a SparseTensor, got {type(sdf).__name__}")
    if sdf.num_channels != 1:
        raise ValueError(f"sdf must have one channel, got {sdf.num_channels}")
    res = resolution or sdf.resolution
    if res is None:
        raise ValueError("resolution is unknown: pass resolution= (the SparseTensor has none)")
    return [sparse_sdf_to_mesh(c, f[:, 0], res, **kwargs) for c, f in sdf.unbind()]


def to_original_frame(mesh: trimesh.Trimesh, center: Sequence[float], scale: float) -> trimesh.Trimesh:
    """Map a unit-cube mesh back to the frame of the mesh a sample was made from: ``v / scale + center`` (inverse of
    :func:`model.data.sdf.normalize_mesh`)."""
    if not isinstance(mesh, trimesh.Trimesh):
        raise TypeError(f"mesh must be a trimesh.Trimesh, got {type(mesh).__name__}")
    if not (isinstance(scale, (int, float, np.floating)) and scale > 0):
        raise ValueError(f"scale must be a positive number, got {scale!r}")
    center = np.asarray(center, dtype=np.float64).reshape(3)
    return trimesh.Trimesh(np.asarray(mesh.vertices) / float(scale) + center, mesh.faces, process=False)
