"""Mesh extraction from sparse SDFs (model/pipeline/extract.py): brick-wise marching cubes without a dense grid."""
from __future__ import annotations

import time
import tracemalloc

import numpy as np
import pytest
import torch
import trimesh

pytest.importorskip("skimage")

from skimage.measure import marching_cubes  # noqa: E402

from model.pipeline.extract import decoded_to_meshes, sparse_sdf_to_mesh, to_original_frame  # noqa: E402
from model.sparse import SparseTensor  # noqa: E402

#: The 1024^3 sphere: radius (unit cube) and band half-width (voxels).
BIG_RESOLUTION, BIG_RADIUS, BIG_TAU = 1024, 0.2, 1.0
#: Bytes of a dense 1024^3 float32 grid (4.3 GB): the extraction's peak must stay far below it.
DENSE_1024_BYTES = 4 * 1024**3


def sphere_band(resolution: int, radius: float, tau: float):
    """Voxels with ``|sdf| < tau`` (voxels) of a sphere of ``radius`` (unit cube) centred in the grid, built column by
    column (never a dense grid): ``coords [M, 3] int64``, ``sdf / tau [M] float32``."""
    c = resolution / 2 - 0.5  # the cube's centre in voxel-index units (voxel i has its centre at i + 0.5)
    r = radius * resolution
    ij = np.arange(resolution)
    x, y = (a.ravel() for a in np.meshgrid(ij, ij, indexing="ij"))
    rho2 = (x - c) ** 2 + (y - c) ** 2
    outer = np.sqrt(np.maximum((r + tau) ** 2 - rho2, 0.0))
    inner = np.sqrt(np.maximum((r - tau) ** 2 - rho2, 0.0))
    through = inner == 0  # the column misses the inner ball: one run of z; else a run below and a run above it
    runs = [
        (np.ceil(c - outer), np.where(through, np.floor(c + outer), np.floor(c - inner))),
        (np.where(through, 1.0, np.ceil(c + inner)), np.where(through, 0.0, np.floor(c + outer))),
    ]
    parts = []
    for lo, hi in runs:
        lo, hi = lo.astype(np.int64), hi.astype(np.int64)
        n = np.clip(hi - lo + 1, 0, None)
        start = np.repeat(np.cumsum(n) - n, n)
        z = np.repeat(lo, n) + np.arange(int(n.sum())) - start
        parts.append(np.stack([np.repeat(x, n), np.repeat(y, n), z], 1))
    coords = np.concatenate(parts)
    d = np.linalg.norm(coords - c, axis=1) - r
    keep = (np.abs(d) < tau) & (coords >= 0).all(1) & (coords < resolution).all(1)
    return coords[keep], (d[keep] / tau).astype(np.float32)


def closed_components(mesh):
    """``(number of connected components, whether every edge is shared by exactly two faces)``, fast on big meshes."""
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    f = np.asarray(mesh.faces, dtype=np.int64)
    edges = np.sort(np.concatenate([f[:, [0, 1]], f[:, [1, 2]], f[:, [2, 0]]]), axis=1)
    _, counts = np.unique(edges[:, 0] * len(mesh.vertices) + edges[:, 1], return_counts=True)
    n = len(mesh.vertices)
    graph = coo_matrix((np.ones(len(edges)), (edges[:, 0], edges[:, 1])), shape=(n, n))
    return connected_components(graph, directed=False)[0], bool((counts == 2).all())


def signed_volume(mesh):
    v = np.asarray(mesh.vertices)[np.asarray(mesh.faces)]
    return float(np.einsum("ij,ij->i", v[:, 0], np.cross(v[:, 1], v[:, 2])).sum() / 6)


def test_sphere_at_1024_from_band_only():
    """An analytic sphere given only by its 1-voxel band at 1024^3: a closed mesh within a small fraction of a voxel
    of the sphere, extracted with a peak (traced) memory under a tenth of one dense 1024^3 float32 grid."""
    coords, values = sphere_band(BIG_RESOLUTION, BIG_RADIUS, BIG_TAU)
    assert len(coords) < 0.003 * BIG_RESOLUTION**3  # a band, not a volume
    tracemalloc.start()
    t0 = time.perf_counter()
    mesh = sparse_sdf_to_mesh(coords, values, BIG_RESOLUTION)
    seconds = time.perf_counter() - t0
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert peak < DENSE_1024_BYTES / 10, peak
    assert closed_components(mesh) == (1, True)  # welded seams, no inner shell
    voxel = 1.0 / BIG_RESOLUTION
    # mesh -> sphere, exactly; sphere -> mesh, through the nearest vertex (an upper bound)
    pts = trimesh.sample.sample_surface(mesh, 20_000, seed=np.random.default_rng(0))[0]
    to_sphere = np.abs(np.linalg.norm(pts, axis=1) - BIG_RADIUS)
    rng = np.random.default_rng(1)
    dirs = rng.normal(size=(20_000, 3))
    on_sphere = BIG_RADIUS * dirs / np.linalg.norm(dirs, axis=1, keepdims=True)
    from scipy.spatial import cKDTree

    to_mesh = cKDTree(mesh.vertices).query(on_sphere)[0]
    chamfer = (to_sphere.mean() + to_mesh.mean()) / 2
    assert to_sphere.max() < 0.05 * voxel and chamfer < 0.5 * voxel, (to_sphere.max() / voxel, chamfer / voxel)
    assert abs(signed_volume(mesh) / (4 / 3 * np.pi * BIG_RADIUS**3) - 1) < 1e-3
    assert seconds < 60


def _torus_grid(resolution):
    g = (np.arange(resolution) + 0.5) / resolution - 0.5
    x, y, z = np.meshgrid(g, g, g, indexing="ij")
    q = np.sqrt(x**2 + y**2) - 0.25
    return ((np.sqrt(q**2 + z**2) - 0.1) * resolution / 2.0).clip(-1, 1).astype(np.float32)  # tau = 2 voxels


def _vertex_set(mesh):
    return np.unique(np.round(np.asarray(mesh.vertices), 7), axis=0)


def test_bricks_match_dense_marching_cubes():
    """With every voxel present, the brick-wise result equals skimage's marching cubes on the dense, +1-padded grid
    (same vertices, same number of faces), for any brick size, seams welded."""
    res = 40
    grid = _torus_grid(res)
    coords = np.stack(np.nonzero(np.ones_like(grid, bool)), 1)
    values = grid[tuple(coords.T)]
    padded = np.pad(grid, 1, constant_values=1.0)
    v, f, _, _ = marching_cubes(padded, 0.0)
    dense = trimesh.Trimesh((v - 0.5) / res - 0.5, f, process=False)
    dense.merge_vertices()
    ref = _vertex_set(dense)
    for brick in (4, 7, 64):
        mesh = sparse_sdf_to_mesh(coords, values, res, brick=brick)
        assert len(mesh.faces) == len(dense.faces), brick
        np.testing.assert_allclose(_vertex_set(mesh), ref, atol=1e-6)
        assert closed_components(mesh)[1] and signed_volume(mesh) > 0  # closed, outward normals


def test_sign_fill_removes_the_inner_shell_of_a_band():
    """The released rule (empty = +1) turns the band's inner edge into a second surface; the component rule
    (default) does not."""
    res = 64
    coords, values = sphere_band(res, 0.3, 1.5)
    sign = sparse_sdf_to_mesh(coords, values, res)
    plus = sparse_sdf_to_mesh(coords, values, res, fill=1.0)
    assert closed_components(sign) == (1, True) and closed_components(plus) == (2, True)
    radii = np.linalg.norm(sign.vertices, axis=1)
    assert np.abs(radii - 0.3).max() < 0.25 / res


def test_inputs_outputs_and_errors():
    coords, values = sphere_band(32, 0.25, 1.5)
    # torch inputs, [M, 1] values, any row order
    perm = np.random.default_rng(0).permutation(len(coords))
    a = sparse_sdf_to_mesh(torch.from_numpy(coords[perm]), torch.from_numpy(values[perm]).unsqueeze(1), 32)
    b = sparse_sdf_to_mesh(coords, values, 32)
    np.testing.assert_allclose(_vertex_set(a), _vertex_set(b))
    # batches of a decoded SparseTensor
    st = SparseTensor.from_list([torch.from_numpy(coords)] * 2, [torch.from_numpy(values).unsqueeze(1)] * 2,
                                resolution=32)
    meshes = decoded_to_meshes(st)
    assert len(meshes) == 2 and all(len(m.faces) == len(b.faces) for m in meshes)
    # frames
    back = to_original_frame(b, center=[1.0, 2.0, 3.0], scale=0.5)
    np.testing.assert_allclose(back.vertices, b.vertices / 0.5 + [1.0, 2.0, 3.0])
    # nothing to extract
    assert len(sparse_sdf_to_mesh(np.zeros((0, 3), int), np.zeros(0), 32).faces) == 0
    assert len(sparse_sdf_to_mesh(coords, np.abs(values) + 0.1, 32).faces) == 0
    for kwargs, match in [(dict(level=float("nan")), "level"), (dict(fill="zero"), "fill"), (dict(brick=1), "brick"),
                          (dict(fill="sign", level=1.5), "level")]:
        with pytest.raises(ValueError, match=match):
            sparse_sdf_to_mesh(coords, values, 32, **kwargs)
    with pytest.raises(ValueError, match="coords must lie"):
        sparse_sdf_to_mesh(coords, values, 16)
    with pytest.raises(ValueError, match="values must have shape"):
        sparse_sdf_to_mesh(coords, values[:-1], 32)
