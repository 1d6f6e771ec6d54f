"""The tensor marching cubes (model.pipeline.marching_cubes) against scikit-image and against itself: the derived case
table, closed and consistently oriented meshes, independence of bricks, chunks and voxel order, fill grids, the dense
variant, and the backend switch of sparse_sdf_to_mesh."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import trimesh
from scipy.spatial import cKDTree

from model.pipeline.extract import sparse_sdf_to_mesh
from model.pipeline.geometry import dense_field_to_mesh
from model.pipeline.marching_cubes import (
    CASE_TRIANGLES,
    CORNERS,
    EDGES,
    dense_marching_cubes,
    sparse_marching_cubes,
)
from model.pipeline.marching_cubes import CASE_COUNTS

RES = 40


def _grid(res: int) -> torch.Tensor:
    return torch.stack(torch.meshgrid(*[torch.arange(res)] * 3, indexing="ij"), -1).reshape(-1, 3)


def _smooth_field(res: int, seed: int) -> torch.Tensor:
    """A smooth random SDF-like field on ``res^3`` (a few blobs), in units of ~3 voxels, ``[res^3]``."""
    gen = torch.Generator().manual_seed(seed)
    x = (_grid(res).double() + 0.5) / res - 0.5
    centres = (torch.rand(4, 3, generator=gen, dtype=torch.float64) - 0.5) * 0.5
    radii = 0.1 + 0.1 * torch.rand(4, generator=gen, dtype=torch.float64)
    d = ((x[:, None, :] - centres[None]).norm(dim=-1) - radii[None]).min(dim=1).values
    return (d * res / 3).float()


def _band(res: int, seed: int):
    field = _smooth_field(res, seed)
    keep = field.abs() < 1.5
    return _grid(res)[keep], field[keep].clamp(-1, 1)


def _mesh(verts: torch.Tensor, faces: torch.Tensor, res: int) -> trimesh.Trimesh:
    return trimesh.Trimesh((verts.double().numpy() + 0.5) / res - 0.5, faces.numpy(), process=False)


def _chamfer(a: trimesh.Trimesh, b: trimesh.Trimesh) -> float:
    pa, pb = np.asarray(a.vertices), np.asarray(b.vertices)
    return float(cKDTree(pb).query(pa)[0].mean() + cKDTree(pa).query(pb)[0].mean()) / 2


def _canonical(verts: torch.Tensor, faces: torch.Tensor) -> list:
    """The mesh as a sorted list of oriented triangles of vertex positions (independent of vertex and face order and
    of where each triangle starts)."""
    pos = [tuple(p) for p in verts.double().numpy().tolist()]
    tris = []
    for f in faces.numpy().tolist():
        t = [pos[i] for i in f]
        k = t.index(min(t))
        tris.append(tuple(t[k:] + t[:k]))
    return sorted(tris)


# ---------------------------------------------------------------------------------------------------------------
# the case table


def test_every_case_uses_exactly_its_crossing_edges_and_closes_into_loops():
    assert CASE_COUNTS[0] == CASE_COUNTS[255] == 0
    for case in range(256):
        inside = [(case >> c) & 1 for c in range(8)]
        crossing = {e for e, (a, b, _) in enumerate(EDGES) if inside[a] != inside[b]}
        tris = CASE_TRIANGLES[case, : CASE_COUNTS[case]]
        assert set(tris.reshape(-1).tolist()) == crossing, case
        # the loops' boundary edges (edges of the triangles used once) each join two crossing edges of one face
        count: dict = {}
        for t in tris.tolist():
            for a, b in ((t[0], t[1]), (t[1], t[2]), (t[2], t[0])):
                count[(a, b)] = count.get((a, b), 0) + 1
        for (a, b), n in count.items():
            assert n == 1 and count.get((b, a), 0) <= 1, case  # no edge twice in the same direction
            if (b, a) not in count:  # a boundary segment lies on a cube face: both edges share an axis side
                ca, cb = CORNERS[EDGES[a, :2]], CORNERS[EDGES[b, :2]]
                shared = [(ax, s) for ax in range(3) for s in (0, 1)
                          if (ca[:, ax] == s).all() and (cb[:, ax] == s).all()]
                assert shared, (case, a, b)


def test_single_corner_triangle_points_away_from_the_inside_corner():
    tri = CASE_TRIANGLES[1, 0]  # corner 0 inside
    mid = (CORNERS[EDGES[tri, 0]] + CORNERS[EDGES[tri, 1]]) / 2
    normal = np.cross(mid[1] - mid[0], mid[2] - mid[0])
    assert normal @ (mid.mean(0) - CORNERS[0]) > 0


# ---------------------------------------------------------------------------------------------------------------
# against scikit-image


def test_sphere_matches_scikit_image_and_is_closed():
    x = (_grid(RES).float() + 0.5) / RES - 0.5
    sdf = (x.norm(dim=1) - 0.3) * RES / 3
    keep = sdf.abs() < 1
    coords, values = _grid(RES)[keep], sdf[keep]
    grid = torch.where(x.norm(dim=1) < 0.3, -1.0, 1.0).view(RES, RES, RES)  # inside fill: no inner shell
    verts, faces = sparse_marching_cubes(coords, values, RES, fill=grid)
    ours = _mesh(verts, faces, RES)
    ref = sparse_sdf_to_mesh(coords.numpy(), values.numpy(), RES, fill=grid.numpy(), backend="skimage")
    assert ours.is_watertight and ours.is_winding_consistent
    assert len(ours.faces) == len(ref.faces) and len(ours.vertices) == len(ref.vertices)
    np.testing.assert_allclose(np.sort(ours.vertices, 0), np.sort(ref.vertices, 0), atol=1e-6)
    assert ours.volume == pytest.approx(ref.volume, rel=1e-4)  # same vertices, other diagonals in some quads
    assert ours.volume == pytest.approx(4 / 3 * np.pi * 0.3 ** 3, rel=0.02)  # outward normals: positive volume


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_smooth_fields_agree_with_scikit_image(seed):
    coords, values = _band(RES, seed)
    ours = _mesh(*sparse_marching_cubes(coords, values, RES), RES)
    ref = sparse_sdf_to_mesh(coords.numpy(), values.numpy(), RES, fill=1.0, backend="skimage")
    assert ours.is_watertight and ours.is_winding_consistent
    assert len(ours.faces) > 500
    assert _chamfer(ours, ref) < 0.01 / RES  # vertices on the same edges at the same points
    assert ours.area == pytest.approx(ref.area, rel=1e-3)
    assert ours.volume == pytest.approx(ref.volume, rel=1e-3)


def test_noise_fields_give_closed_oriented_meshes():
    gen = torch.Generator().manual_seed(3)
    coords = torch.randint(0, 24, (6000, 3), generator=gen).unique(dim=0)
    values = torch.randn(coords.shape[0], generator=gen)
    verts, faces = sparse_marching_cubes(coords, values, 24)
    mesh = _mesh(verts, faces, 24)
    assert len(mesh.faces) > 1000
    assert mesh.is_watertight and mesh.is_winding_consistent
    assert np.unique(mesh.faces.reshape(-1)).size == len(mesh.vertices)  # no unused vertex


# ---------------------------------------------------------------------------------------------------------------
# independence of the bricks, the chunks and the order


def test_bricks_chunks_and_voxel_order_do_not_change_the_mesh():
    coords, values = _band(RES, 4)
    base = _canonical(*sparse_marching_cubes(coords, values, RES))
    perm = torch.randperm(coords.shape[0], generator=torch.Generator().manual_seed(0))
    for kwargs, c, v in (({"brick": 4}, coords, values), ({"brick": 5, "chunk_bricks": 3}, coords, values),
                         ({"chunk_bricks": 1}, coords, values), ({}, coords[perm], values[perm].unsqueeze(1))):
        assert _canonical(*sparse_marching_cubes(c, v, RES, **kwargs)) == base, kwargs


def test_surface_on_the_grid_border_is_closed_by_the_padding():
    coords = _grid(6)
    values = torch.full((coords.shape[0],), -1.0)  # a solid block touching the border at 0
    mesh = _mesh(*sparse_marching_cubes(coords, values, 6), 6)
    assert mesh.is_watertight and mesh.volume > 0
    assert np.asarray(mesh.vertices).min() == pytest.approx(-0.5)  # the padding cells hold the lower faces


def test_fill_grid_fills_empty_voxels_and_padding():
    # one decoded voxel at +1 inside a coarse grid that says "inside" everywhere: a small closed bubble
    coords = torch.tensor([[5, 5, 5]])
    grid = -torch.ones(4, 4, 4)
    verts, faces = sparse_marching_cubes(coords, torch.tensor([1.0]), 16, fill=grid)
    mesh = _mesh(verts, faces, 16)
    assert mesh.is_watertight and mesh.volume < 0  # normals point into the bubble (towards +)
    # the same voxel with the constant fill +1: no crossing
    assert sparse_marching_cubes(coords, torch.tensor([1.0]), 16, fill=1.0)[1].shape == (0, 3)


# ---------------------------------------------------------------------------------------------------------------
# the dense variant, the backend switch and bad input


def test_dense_marching_cubes_matches_scikit_image():
    field = _smooth_field(RES, 5).view(RES, RES, RES)
    verts, faces = dense_marching_cubes(field, 0.0, slab=7)
    ref = dense_field_to_mesh(field.numpy(), 0.0)
    ours = _mesh(verts, faces, RES)
    # Lewiner's tables resolve a few ambiguous cells with an extra vertex; everything else is the same
    assert abs(len(ours.faces) - len(ref.faces)) <= 0.002 * len(ref.faces)
    assert _chamfer(ours, ref) < 0.01 / RES
    assert ours.is_watertight is ref.is_watertight
    assert ours.is_winding_consistent and ours.volume == pytest.approx(ref.volume, rel=1e-3)


def test_backend_switch_and_errors():
    coords, values = _band(16, 6)
    a = sparse_sdf_to_mesh(coords, values, 16, fill=1.0, backend="torch")
    b = sparse_sdf_to_mesh(coords.numpy(), values.numpy(), 16, fill=1.0, backend="torch")
    np.testing.assert_array_equal(a.vertices, b.vertices)
    c = sparse_sdf_to_mesh(coords, values, 16, fill=1.0)  # auto on CPU tensors: scikit-image
    assert len(c.faces) == len(a.faces) and abs(c.area - a.area) < 1e-3 * a.area
    with pytest.raises(ValueError, match="fill='sign'"):
        sparse_sdf_to_mesh(coords, values, 16, backend="torch")
    with pytest.raises(ValueError, match="backend"):
        sparse_sdf_to_mesh(coords, values, 16, backend="cuda")
    with pytest.raises(ValueError, match="coords must lie"):
        sparse_marching_cubes(coords + 1, values, 16)
    with pytest.raises(ValueError, match="values must have shape"):
        sparse_marching_cubes(coords, values[:-1], 16)
    with pytest.raises(ValueError, match="fill grid"):
        sparse_marching_cubes(coords, values, 16, fill=torch.ones(3, 3, 3))
    with pytest.raises(ValueError, match="chunk_bricks"):
        sparse_marching_cubes(coords, values, 16, chunk_bricks=0)
    with pytest.raises(ValueError, match="values must be finite"):
        sparse_sdf_to_mesh(coords, values * float("nan"), 16, fill=1.0, backend="torch")
    with pytest.raises(ValueError, match="field must be"):
        dense_marching_cubes(torch.zeros(4, 4), 0.0)
    empty = sparse_marching_cubes(torch.zeros(0, 3, dtype=torch.long), torch.zeros(0), 16)
    assert empty[0].shape == (0, 3) and empty[1].shape == (0, 3)


def test_extract_report_dry_run(tmp_path, capsys):
    import json

    from model.reports.extract import main, sign_grid

    # the fill grid: band voxels give their sign, empty cells inside the closed band are -1, outside +1
    coords, values = _band(16, 7)
    grid = sign_grid(coords.numpy(), values.numpy(), 16)
    x = (_grid(8).double() * 2 + 1) / 16 - 0.5  # coarse cell centres
    field = _smooth_field(16, 7).view(16, 16, 16)
    coarse = field.view(8, 2, 8, 2, 8, 2).mean(dim=(1, 3, 5)).reshape(-1)
    assert x.shape[0] == grid.size
    far = coarse.abs() > 1.0  # clearly inside or outside
    assert np.array_equal(grid.reshape(-1)[far.numpy()] < 0, (coarse[far] < 0).numpy())
    assert main(["--dry-run", "--out", str(tmp_path), "--resolution", "32"]) == 0
    r = json.loads((tmp_path / "extract.json").read_text())
    assert r["dry_run"] and len(r["meshes"]) == 2
    for m in r["meshes"]:
        assert m["gpu"]["faces"] == m["cpu"]["faces"] > 100
        assert m["gpu"]["watertight"] and m["cpu"]["watertight"]
        assert m["agreement"]["mean_distance_voxels"] < 0.01
        assert 0 < m["simplify"]["faces"] <= 0.06 * m["gpu"]["faces"] + 4
    assert "DRY RUN" in (tmp_path / "extract.md").read_text()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.gpu
def test_gpu_matches_cpu():
    coords, values = _band(RES, 8)
    grid = torch.where(_smooth_field(RES // 2, 8).view(RES // 2, RES // 2, RES // 2) < 0, -1.0, 1.0)
    for fill in (1.0, grid):
        cpu = sparse_marching_cubes(coords, values, RES, fill=fill)
        gpu = sparse_marching_cubes(coords.cuda(), values.cuda(), RES,
                                    fill=fill.cuda() if isinstance(fill, torch.Tensor) else fill)
        assert torch.equal(gpu[1].cpu(), cpu[1])  # same faces (ids follow the sorted edge keys)
        torch.testing.assert_close(gpu[0].cpu(), cpu[0], rtol=0, atol=1e-5)  # FMA may round the last bit apart
    field = _smooth_field(RES, 9).view(RES, RES, RES)
    a, b = dense_marching_cubes(field, 0.0), dense_marching_cubes(field.cuda(), 0.0)
    assert torch.equal(b[1].cpu(), a[1])
    torch.testing.assert_close(b[0].cpu(), a[0], rtol=0, atol=1e-5)


def test_mesh_to_numpy_keeps_float64_vertices_and_the_unit_cube_map_is_the_host_one():
    """float64 vertices stay float64 (the extraction maps them to the unit cube on the device), float32 ones stay
    float32; the device map ``(v + 0.5) / R - 0.5`` in float64 gives the host's values bit for bit."""
    from model.pipeline.marching_cubes import mesh_to_numpy

    gen = torch.Generator().manual_seed(0)
    v32 = torch.rand(50, 3, generator=gen) * 255
    faces = torch.randint(0, 50, (30, 3), generator=gen)
    v, f = mesh_to_numpy(v32, faces)
    assert v.dtype == np.float32 and np.array_equal(v, v32.numpy()) and np.array_equal(f, faces.numpy())
    v64, _ = mesh_to_numpy((v32.double() + 0.5) / 256 - 0.5, faces)
    assert v64.dtype == np.float64
    assert np.array_equal(v64, (v32.numpy().astype(np.float64) + 0.5) / 256 - 0.5)


def test_mesh_transfer_report_without_a_gpu_and_its_table(tmp_path, capsys):
    """``python -m model.reports.mesh_transfer`` says so and writes nothing without CUDA; its table lists every
    variant with one column per repetition."""
    from model.reports.mesh_transfer import main, markdown

    if not torch.cuda.is_available():
        assert main(["--out", str(tmp_path / "r")]) == 0
        assert "no CUDA GPU" in capsys.readouterr().out and not (tmp_path / "r").exists()
    doc = {"date": "d", "gpu": "G", "torch": "t", "trimesh": "m", "commit": "abc", "vertices": 5, "faces": 7,
           "reps": 2, "rows": [{"variant": "a", "seconds": [0.5, 0.25]}, {"variant": "b", "seconds": [1.0, 2.0]}]}
    md = markdown(doc)
    assert "| a | 0.500 | 0.250 |" in md and "| b | 1.000 | 2.000 |" in md and "repetition 1" in md


@pytest.mark.parametrize("staging", [64, 100, 1 << 20])
def test_staged_copy_is_exact_through_a_small_buffer(monkeypatch, staging):
    """``mesh_to_numpy(staged=True)``'s copy through the reused staging buffer (two alternating halves) gives the
    same bytes as a direct copy, for buffers much smaller than the array, sizes that do not divide it, and a buffer
    larger than it; the result owns its memory (pageable)."""
    import model.pipeline.marching_cubes as mc

    monkeypatch.setattr(mc, "STAGING_BYTES", staging)
    monkeypatch.setattr(mc, "_STAGING", {})
    gen = torch.Generator().manual_seed(3)
    for t in (torch.rand(101, 3, generator=gen, dtype=torch.float64), torch.randint(0, 99, (77, 3), generator=gen),
              torch.zeros(0, 3)):
        got = mc._staged_copy(t)
        assert got.dtype == t.numpy().dtype and got.shape == tuple(t.shape)
        assert np.array_equal(got, t.numpy()) and not np.shares_memory(got, t.numpy())


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_staged_mesh_to_numpy_equals_the_page_locked_path(monkeypatch):
    """On CUDA the staged copy (a small buffer, many alternating chunks) gives the page-locked path's arrays."""
    import model.pipeline.marching_cubes as mc

    monkeypatch.setattr(mc, "STAGING_BYTES", 1 << 16)
    monkeypatch.setattr(mc, "_STAGING", {})
    v = torch.rand(50_000, 3, device="cuda") * 255
    f = torch.randint(0, 50_000, (90_000, 3), device="cuda")
    a = mc.mesh_to_numpy(v, f, side=256, staged=False)
    b = mc.mesh_to_numpy(v, f, side=256, staged=True)
    assert all(np.array_equal(x, y) and x.dtype == y.dtype for x, y in zip(a, b))
