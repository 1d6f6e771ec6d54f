"""Mesh -> sparse SDF (model/data/sdf.py), the cached dataset (model/data/dataset.py) and mesh discovery."""
from __future__ import annotations

import math
import os
import resource
import tracemalloc
import warnings

import numpy as np
import pytest
import torch
import trimesh

pytest.importorskip("igl")

from model.data import dataset as D  # noqa: E402
from model.data import sdf as S  # noqa: E402
from model.data.meshes import find_meshes, pybullet_meshes  # noqa: E402


# ---------------------------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------------------------


def dense_centers(resolution):
    g = np.arange(resolution)
    c = np.stack(np.meshgrid(g, g, g, indexing="ij"), -1).reshape(-1, 3)
    return c, S.voxel_centers(c, resolution)


def sphere_setup(subdivisions=5):
    """A unit icosphere, its sample's normalisation, and the analytic sphere it approximates after normalisation:
    (mesh, centre, radius, tessellation error delta = radius - smallest distance from the centre to a face)."""
    mesh = trimesh.creation.icosphere(subdivisions, radius=1.0)
    norm, center, scale = S.normalize_mesh(mesh)
    c0 = -center * scale
    radius = scale
    n = norm.face_normals
    plane = np.abs(np.einsum("ij,ij->i", norm.triangles_center - c0, n))
    return mesh, c0, radius, radius - plane.min()


def box_sdf(p, half):
    q = np.abs(p) - half
    return np.linalg.norm(np.maximum(q, 0), axis=1) + np.minimum(q.max(1), 0)


def box_edges(half):
    """The 12 edges of the box [-half, half] as [12, 2, 3]."""
    hx, hy, hz = half
    corners = np.array([[x, y, z] for x in (-hx, hx) for y in (-hy, hy) for z in (-hz, hz)])
    edges = []
    for i in range(8):
        for j in range(i + 1, 8):
            if np.sum(corners[i] != corners[j]) == 1:
                edges.append((corners[i], corners[j]))
    return np.array(edges)


def seg_dist(p, segs):
    a, b = segs[:, 0][None], segs[:, 1][None]
    ab = b - a
    t = np.clip(np.einsum("pek,pek->pe", p[:, None] - a, ab) / np.einsum("pek,pek->pe", ab, ab), 0, 1)
    return np.linalg.norm(p[:, None] - (a + ab * t[..., None]), axis=2)


BOX_EXTENTS = (0.95, 0.6, 0.4)  # already normalised: largest side = margin 0.95


# ---------------------------------------------------------------------------------------------------------------
# distances, band, sign
# ---------------------------------------------------------------------------------------------------------------


def test_point_triangle_distance_against_dense_sampling():
    rng = np.random.default_rng(0)
    tri = rng.normal(size=(200, 3, 3))
    tri[:20, 2] = tri[:20, 1]  # degenerate: two equal vertices
    tri[20:40, 2] = 2 * tri[20:40, 1] - tri[20:40, 0]  # degenerate: collinear
    p = rng.normal(size=(200, 3)) * 2
    d = S.point_triangle_distance(p, tri)
    u, v = np.meshgrid(np.linspace(0, 1, 81), np.linspace(0, 1, 81))
    keep = u + v <= 1
    u, v = u[keep], v[keep]
    pts = tri[:, :1] + u[None, :, None] * (tri[:, 1:2] - tri[:, :1]) + v[None, :, None] * (tri[:, 2:3] - tri[:, :1])
    ref = np.linalg.norm(pts - p[:, None], axis=2).min(1)
    edge = np.linalg.norm(tri - np.roll(tri, 1, axis=1), axis=2).max(1)
    assert np.all(d <= ref + 1e-12)  # exact distance never exceeds the distance to any sample
    assert np.all(ref - d <= edge / 80 + 1e-12)  # and the samples are that dense


@pytest.mark.parametrize("resolution", [32, 64, 128])
def test_sphere_sdf_matches_analytic(resolution):
    tau = 2.0
    mesh, c0, radius, delta = sphere_setup(5)
    s = S.mesh_to_sparse_sdf(mesh, resolution, tau=tau)
    assert s.coords.dtype == np.int32 and s.sdf.dtype == np.float32 and s.sharp.dtype == bool
    assert s.coords.shape == (len(s), 3) and s.sdf.shape == s.sharp.shape == (len(s),)
    keys = S.raster_keys(s.coords, resolution)
    assert np.all(np.diff(keys) > 0)  # raster order, no duplicates
    analytic = (np.linalg.norm(s.points() - c0, axis=1) - radius) * resolution
    tol = delta * resolution + 1e-4  # the tessellation moves the surface by at most delta (both signs checked)
    assert np.abs(s.sdf - analytic).max() <= tol
    assert np.all(np.abs(s.sdf) < tau)
    assert np.allclose(s.sdf_scaled, s.sdf / tau) and np.abs(s.sdf_scaled).max() < 1
    decided = np.abs(analytic) > tol
    assert np.all(np.sign(s.sdf[decided]) == np.sign(analytic[decided]))
    # no voxel of the band is missing: every voxel whose centre is safely inside the analytic band is there
    c, p = dense_centers(resolution)
    a = (np.linalg.norm(p - c0, axis=1) - radius) * resolution
    must = S.raster_keys(c[np.abs(a) < tau - tol], resolution)
    assert np.isin(must, keys).all()


@pytest.mark.parametrize("resolution", [32, 64])
def test_box_sdf_exact(resolution):
    tau = 2.5
    half = np.array(BOX_EXTENTS) / 2
    s = S.mesh_to_sparse_sdf(trimesh.creation.box(BOX_EXTENTS), resolution, tau=tau)
    assert s.scale == pytest.approx(1.0) and np.allclose(s.center, 0)
    analytic = box_sdf(s.points(), half) * resolution
    assert np.abs(s.sdf - analytic).max() < 1e-4
    c, p = dense_centers(resolution)
    a = box_sdf(p, half) * resolution
    clear = np.abs(np.abs(a) - tau) > 1e-6  # leave out exact ties with the band edge
    want = set(S.raster_keys(c[(np.abs(a) < tau) & clear], resolution).tolist())
    got = S.raster_keys(s.coords, resolution)
    got_clear = set(got[np.abs(np.abs(box_sdf(s.points(), half) * resolution) - tau) > 1e-6].tolist())
    assert got_clear == want


def test_band_and_sign_match_dense_brute_force():
    """A genus-1 mesh at R = 24: the octree band equals the band of a dense brute-force distance (every triangle at
    every voxel), and the propagated sign equals the exact winding number at every voxel."""
    import igl

    resolution, tau = 24, 2.0
    torus = trimesh.creation.torus(major_radius=1.0, minor_radius=0.35, major_sections=16, minor_sections=8)
    mesh, _, _ = S.prepare_mesh(torus)
    s = S.mesh_to_sparse_sdf(mesh, resolution, tau=tau, normalize=False)
    c, p = dense_centers(resolution)
    d = S.brute_force_distance(p, mesh.vertices, mesh.faces) * resolution
    band = np.abs(d) < tau
    assert np.array_equal(S.raster_keys(c[band], resolution), S.raster_keys(s.coords, resolution))
    assert np.abs(np.abs(s.sdf) - d[band]).max() < 1e-4
    w = igl.winding_number(np.asarray(mesh.vertices), np.asarray(mesh.faces), p[band])
    assert np.array_equal(s.sdf < 0, w > 0.5)
    assert (s.sdf < 0).any() and (s.sdf > 0).any()


def test_sign_with_small_hole():
    """8 faces (of 5120) cut out of a sphere: the winding number still gives the analytic sign at >= 99% of the
    band voxels (measured: all of them)."""
    resolution = 64
    mesh, c0, radius, delta = sphere_setup(4)
    top = np.argsort(-mesh.triangles_center[:, 2])[:8]
    holed = mesh.copy()
    holed.update_faces(~np.isin(np.arange(len(mesh.faces)), top))
    assert not holed.is_watertight
    s = S.mesh_to_sparse_sdf(holed, resolution)
    analytic = (np.linalg.norm(s.points() - c0, axis=1) - radius) * resolution
    decided = np.abs(analytic) > delta * resolution + 1e-4
    agree = np.mean(np.sign(s.sdf[decided]) == np.sign(analytic[decided]))
    assert agree >= 0.99, agree
    s_full = S.mesh_to_sparse_sdf(holed, resolution, propagate_sign=False, compute_sharp=False)
    assert np.array_equal(np.sign(s_full.sdf), np.sign(s.sdf))


def test_inverted_and_inconsistent_winding_give_the_same_sample():
    resolution = 32
    sphere = trimesh.creation.icosphere(3)
    ref = S.mesh_to_sparse_sdf(sphere, resolution)
    inverted = trimesh.Trimesh(sphere.vertices, sphere.faces[:, ::-1], process=False)
    faces = sphere.faces.copy()
    flip = np.random.default_rng(0).random(len(faces)) < 0.3
    faces[flip] = faces[flip][:, ::-1]
    mixed = trimesh.Trimesh(sphere.vertices, faces, process=False)
    for mesh in (inverted, mixed):
        s = S.mesh_to_sparse_sdf(mesh, resolution)
        assert np.array_equal(s.coords, ref.coords)
        assert np.abs(s.sdf - ref.sdf).max() < 1e-5 and not s.sharp.any()


def test_consistent_winding_per_patch():
    rng = np.random.default_rng(1)
    box = trimesh.creation.box()
    ball = trimesh.creation.icosphere(2).apply_translation([3, 0, 0])
    both = trimesh.util.concatenate([box, ball])
    faces = both.faces.copy()
    flip = rng.random(len(faces)) < 0.5
    faces[flip] = faces[flip][:, ::-1]
    messy = trimesh.Trimesh(both.vertices, faces, process=False)
    assert not messy.is_winding_consistent
    fixed = trimesh.Trimesh(both.vertices, S.consistent_winding(messy.faces, messy), process=False)
    assert fixed.is_winding_consistent
    assert sorted(map(tuple, np.sort(fixed.faces, axis=1))) == sorted(map(tuple, np.sort(both.faces, axis=1)))
    volumes = sorted(abs(part.volume) for part in fixed.split(only_watertight=False))
    assert np.allclose(volumes, sorted([ball.volume, box.volume]))  # each patch wound one way throughout


def _rss_bytes():
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def test_resolution_1024_never_allocates_a_dense_grid():
    resolution, radius = 1024, 0.06
    sphere = trimesh.creation.icosphere(3, radius=radius)
    rss0 = _rss_bytes() if os.path.exists("/proc/self/statm") else 0
    max0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    tracemalloc.start()
    try:
        s = S.mesh_to_sparse_sdf(sphere, resolution, tau=1.0, normalize=False)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    dense_bytes = resolution**3  # one byte per voxel: the smallest dense grid
    assert peak < dense_bytes / 16, peak  # measured ~20 MB
    max1 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    assert max1 <= max(max0, rss0 + dense_bytes // 4)  # no new peak (max1 == max0) passes too
    shell = 4 * math.pi * radius**2 * resolution**2 * 2  # surface area x band thickness (2 voxels), in voxels
    assert 0.8 * shell < len(s) < 1.2 * shell
    assert np.abs(s.sdf).max() < 1.0 and s.coords.min() >= 0 and s.coords.max() < resolution


def test_sharp_voxels_box_edges_and_none_on_sphere():
    resolution = 64
    half = np.array(BOX_EXTENTS) / 2
    s = S.mesh_to_sparse_sdf(trimesh.creation.box(BOX_EXTENTS), resolution)
    edges = box_edges(half)
    d_edge = seg_dist(s.points(), edges) * resolution  # [M, 12] voxels
    nearest = d_edge.min(1)
    assert s.sharp.any()
    assert nearest[s.sharp].max() <= s.sharp_radius + 1e-6  # sharp voxels lie along the edges...
    assert s.sharp[nearest <= s.sharp_radius - 0.15].all()  # ...and all voxels close to them are sharp
    for e in range(12):  # every one of the 12 edges has its sharp voxels
        assert (s.sharp & (d_edge[:, e] <= 0.9)).sum() >= 10
    sphere = S.mesh_to_sparse_sdf(trimesh.creation.icosphere(4), resolution)
    assert not sphere.sharp.any()
    # a higher threshold than the box's 90 degree edges finds nothing either
    assert not S.mesh_to_sparse_sdf(trimesh.creation.box(BOX_EXTENTS), 32, sharp_angle=95.0).sharp.any()


def test_resample_recomputes_at_the_new_resolution():
    box = trimesh.creation.box(BOX_EXTENTS)
    s32 = S.mesh_to_sparse_sdf(box, 32, tau=1.5)
    s48 = S.resample(s32, box, 48)
    ref = S.mesh_to_sparse_sdf(box, 48, tau=1.5)
    assert s48.resolution == 48 and s48.tau == 1.5
    assert np.array_equal(s48.coords, ref.coords) and np.array_equal(s48.sdf, ref.sdf)
    assert np.array_equal(s48.sharp, ref.sharp)


def test_file_formats_and_scenes(tmp_path):
    box = trimesh.creation.box(BOX_EXTENTS)
    ref = S.mesh_to_sparse_sdf(box, 24)
    for ext in ("obj", "ply", "stl", "off", "glb"):
        path = tmp_path / f"box.{ext}"
        box.export(path)
        s = S.mesh_to_sparse_sdf(path, 24)
        assert np.array_equal(s.coords, ref.coords), ext
        assert np.abs(s.sdf - ref.sdf).max() < 1e-3, ext
    scene = trimesh.Scene()
    scene.add_geometry(trimesh.creation.box((0.2, 0.2, 0.2)), transform=trimesh.transformations.translation_matrix((-1, 0, 0)))
    scene.add_geometry(trimesh.creation.box((0.2, 0.2, 0.2)), transform=trimesh.transformations.translation_matrix((1, 0, 0)))
    scene.export(tmp_path / "two.glb")
    m = S.load_mesh(tmp_path / "two.glb")
    assert len(m.faces) == 24 and m.bounds[0][0] == pytest.approx(-1.1) and m.bounds[1][0] == pytest.approx(1.1)


def test_bad_inputs(tmp_path):
    box = trimesh.creation.box()
    with pytest.raises(ValueError, match="resolution"):
        S.mesh_to_sparse_sdf(box, 1)
    with pytest.raises(TypeError, match="resolution"):
        S.mesh_to_sparse_sdf(box, "64")
    with pytest.raises(ValueError, match="tau"):
        S.mesh_to_sparse_sdf(box, 16, tau=-1)
    with pytest.raises(ValueError, match="margin"):
        S.mesh_to_sparse_sdf(box, 16, margin=2.0)
    with pytest.raises(TypeError, match="source"):
        S.mesh_to_sparse_sdf(42, 16)
    (tmp_path / "empty.obj").write_text("# nothing\n")
    with pytest.raises(S.MeshError, match="empty.obj"):
        S.mesh_to_sparse_sdf(tmp_path / "empty.obj", 16)
    with pytest.raises(S.MeshError, match="not found"):
        S.load_mesh(tmp_path / "missing.obj")


# ---------------------------------------------------------------------------------------------------------------
# dataset
# ---------------------------------------------------------------------------------------------------------------


@pytest.fixture
def mesh_dir(tmp_path):
    root = tmp_path / "meshes"
    (root / "sub").mkdir(parents=True)
    trimesh.creation.box(BOX_EXTENTS).export(root / "box.obj")
    trimesh.creation.icosphere(3).export(root / "sub" / "ball.PLY")
    (root / "broken.obj").write_text("v 0 0\nf 1 2 3 4 x\nthis is not a mesh\n")
    (root / "sub" / "empty.stl").write_bytes(b"")
    (root / "notes.txt").write_text("not a mesh")
    return root


def test_find_meshes(mesh_dir):
    found = [p.relative_to(mesh_dir).as_posix() for p in find_meshes(mesh_dir)]
    assert found == ["box.obj", "broken.obj", "sub/ball.PLY", "sub/empty.stl"]
    assert find_meshes(mesh_dir / "box.obj") == [mesh_dir / "box.obj"]
    with pytest.raises(ValueError, match="root"):
        find_meshes(mesh_dir / "notes.txt")


def test_dataset_cache_skip_and_collate(mesh_dir, tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    ds = D.SparseSDFDataset(mesh_dir, resolutions=(24,), cache_dir=cache)
    assert len(ds) == 4 and ds.names == ["box", "broken", "sub/ball", "sub/empty"]
    calls = []
    real = S.mesh_to_sparse_sdf
    monkeypatch.setattr(S, "mesh_to_sparse_sdf", lambda *a, **k: calls.append(a) or real(*a, **k))
    replaced = []
    real_replace = os.replace
    monkeypatch.setattr(os, "replace", lambda a, b: replaced.append((a, b)) or real_replace(a, b))

    first = ds[0]
    assert len(calls) == 1 and first["name"] == "box" and first["resolution"] == 24
    assert first["coords"].dtype == torch.int32 and first["sdf"].dtype == torch.float32
    assert first["sharp"].dtype == torch.bool and first["sdf"].abs().max() < 1  # sdf / tau by default
    entry = ds.cache_path(0, 24)
    assert entry.exists() and replaced == [(replaced[0][0], entry)]
    assert os.path.dirname(replaced[0][0]) == str(cache)  # temp file in the same folder, then os.replace
    again = ds[0]
    assert len(calls) == 1  # read from the cache
    assert torch.equal(again["coords"], first["coords"]) and torch.equal(again["sdf"], first["sdf"])
    assert not list(cache.glob("*.tmp"))

    # a broken mesh is skipped with a warning naming it; the next mesh is served instead
    with pytest.warns(RuntimeWarning, match="broken.obj"):
        item = ds[1]
    assert item["name"] == "sub/ball"
    assert list(cache.glob("broken-*.failed"))
    # a new dataset on the same cache knows the failure without recomputing it
    ds2 = D.SparseSDFDataset(mesh_dir, resolutions=(24,), cache_dir=cache)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        report = ds2.prepare_all(num_workers=0, progress=False)
    messages = " ".join(str(w.message) for w in caught if issubclass(w.category, RuntimeWarning))
    assert "broken.obj" in messages and "empty.stl" in messages
    assert set(report["failed"]) == {"broken", "sub/empty"} and report["cached"] == 2 and report["computed"] == 0
    # box, broken (while serving ds[1]), ball (served instead) and empty: each mesh was computed at most once
    assert ds2.names == ["box", "sub/ball"] and [os.path.basename(c[0]) for c in calls] == [
        "box.obj", "broken.obj", "ball.PLY", "empty.stl"]

    batch = D.collate_sparse_sdf([ds2[1], ds2[0]])
    n1, n0 = len(ds2[1]["sdf"]), len(ds2[0]["sdf"])
    assert batch["coords"].shape == (n1 + n0, 4) and batch["coords"].dtype == torch.int32
    assert batch["sdf"].shape == (n1 + n0, 1) and batch["sharp"].shape == (n1 + n0,)
    b = batch["coords"][:, 0]
    assert torch.all(b[1:] >= b[:-1]) and int((b == 0).sum()) == n1
    assert batch["offsets"].tolist() == [0, n1, n1 + n0] and batch["name"] == ["sub/ball", "box"]
    assert torch.equal(batch["coords"][n1:, 1:], ds2[0]["coords"])


def test_cache_write_is_atomic(tmp_path, monkeypatch):
    target = tmp_path / "x.npz"
    D.atomic_save_npz(target, dict(a=np.arange(5)))

    def boom(fh, **arrays):
        fh.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(np, "savez_compressed", boom)
    with pytest.raises(OSError, match="disk full"):
        D.atomic_save_npz(target, dict(a=np.arange(7)))
    with np.load(target) as z:
        assert z["a"].tolist() == list(range(5))  # the old entry is intact
    assert [p.name for p in tmp_path.iterdir()] == ["x.npz"]  # and no temporary file is left


def test_cache_key_follows_file_and_parameters(mesh_dir, tmp_path):
    cache = tmp_path / "cache"
    ds = D.SparseSDFDataset(mesh_dir / "box.obj", resolutions=(16, 24), cache_dir=cache)
    k = ds.cache_path(0, 16)
    assert k != ds.cache_path(0, 24)
    assert k != D.SparseSDFDataset(mesh_dir / "box.obj", (16,), cache_dir=cache, tau=3.0).cache_path(0, 16)
    assert k == D.SparseSDFDataset(mesh_dir / "box.obj", (16,), cache_dir=cache).cache_path(0, 16)
    st = os.stat(mesh_dir / "box.obj")
    os.utime(mesh_dir / "box.obj", ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    assert ds.cache_path(0, 16) != k


def test_resolution_choice_is_seeded_and_batches_share_one(mesh_dir, tmp_path):
    paths = [mesh_dir / "box.obj", mesh_dir / "sub" / "ball.PLY"]
    ds = D.SparseSDFDataset(paths, resolutions=(16, 24), cache_dir=tmp_path / "c", seed=3)
    picks = [ds.pick_resolution(i) for i in range(2)]
    assert picks == [D.SparseSDFDataset(paths, (16, 24), cache_dir=tmp_path / "c", seed=3).pick_resolution(i)
                     for i in range(2)]
    seen = set()
    for epoch in range(12):
        ds.set_epoch(epoch)
        seen |= {ds.pick_resolution(0), ds.pick_resolution(1)}
    assert seen == {16, 24}
    sampler = D.MultiResolutionBatchSampler(len(ds), 2, ds.resolutions, seed=1)
    loader = torch.utils.data.DataLoader(ds, batch_sampler=sampler, collate_fn=D.collate_sparse_sdf)
    for batch in loader:
        assert len(set(batch["resolution"].tolist())) == 1
        assert int(batch["coords"][:, 1:].max()) < int(batch["resolution"][0])


def test_prepare_all_with_worker_processes(mesh_dir, tmp_path):
    ds = D.SparseSDFDataset([mesh_dir / "box.obj", mesh_dir / "sub" / "ball.PLY", mesh_dir / "broken.obj"],
                            resolutions=(16,), cache_dir=tmp_path / "c")
    with pytest.warns(RuntimeWarning, match="broken.obj"):
        report = ds.prepare_all(num_workers=2, progress=False)
    assert report["computed"] == 2 and set(report["failed"]) == {"broken"} and len(ds) == 2
    assert all(ds.cache_path(i, 16).exists() for i in range(2))


def test_split_by_name_is_deterministic():
    names = [f"obj{i:04d}" for i in range(2000)]
    train, held = D.split_by_name(names, 0.1, seed=0)
    assert sorted(train + held) == names and not set(train) & set(held)
    assert 0.08 < len(held) / len(names) < 0.12
    assert D.split_by_name(names, 0.1, seed=0) == (train, held)
    assert D.split_by_name(names[::-1], 0.1, seed=0)[1] == held[::-1]  # per name, not per position
    assert D.split_by_name(names, 0.1, seed=1)[1] != held
    with pytest.raises(ValueError, match="fraction"):
        D.split_by_name(names, 1.5)


def test_dataset_bad_arguments(mesh_dir, tmp_path):
    (tmp_path / "nothing").mkdir()
    with pytest.raises(ValueError, match="meshes"):
        D.SparseSDFDataset(tmp_path / "nothing", cache_dir=tmp_path / "c")
    with pytest.raises(ValueError, match="resolutions"):
        D.SparseSDFDataset(mesh_dir, resolutions=(), cache_dir=tmp_path / "c")
    with pytest.raises(ValueError, match="sdf_units"):
        D.SparseSDFDataset(mesh_dir, sdf_units="metres", cache_dir=tmp_path / "c")
    with pytest.raises(TypeError, match="meshes"):
        D.SparseSDFDataset(42, cache_dir=tmp_path / "c")
    with pytest.raises(ValueError, match="samples"):
        D.collate_sparse_sdf([])


def test_pybullet_meshes_are_real_and_usable():
    try:
        paths = pybullet_meshes()
    except ModuleNotFoundError:
        pytest.skip("pybullet is not installed (pip install pybullet)")
    assert len(paths) >= 900 and all(p.suffix == ".obj" for p in paths)
    s = S.mesh_to_sparse_sdf(paths[0], 32)
    assert len(s) > 100 and (s.sdf < 0).any() and (s.sdf > 0).any()


def test_dataset_split_shares_parameters_and_cache(mesh_dir, tmp_path):
    ds = D.SparseSDFDataset(mesh_dir, resolutions=(16, 24), cache_dir=tmp_path / "c", tau=1.5)
    train, held = ds.split(0.5, seed=0)
    parts = [p for p in (train, held) if p is not None]
    assert sorted(n for p in parts for n in p.names) == sorted(ds.names)
    want_held = D.split_by_name(ds.names, 0.5, seed=0)[1]
    assert (held.names if held is not None else []) == want_held
    for p in parts:
        assert p.params == ds.params and p.resolutions == ds.resolutions and p.cache_dir == ds.cache_dir
        i = p.names.index(p.names[0])
        assert p.cache_path(i, 16) == ds.cache_path(ds.names.index(p.names[0]), 16)


def test_normalize_mesh_bounds_only_the_vertices_faces_name():
    """The bounding box ignores vertices no face names (a far-away stray one here); the result is centred with
    largest side ``margin``, and every vertex, named or not, moves by the same map."""
    box = trimesh.creation.box(extents=(2.0, 1.0, 0.5))
    box.apply_translation((3.0, -1.0, 2.0))
    stray = np.array([[100.0, 100.0, 100.0]])
    mesh = trimesh.Trimesh(np.vstack([box.vertices, stray]), box.faces, process=False)
    norm, center, scale = S.normalize_mesh(mesh, 0.9)
    np.testing.assert_allclose(center, [3.0, -1.0, 2.0])
    assert scale == pytest.approx(0.45)
    named = np.asarray(norm.vertices)[: len(box.vertices)]
    np.testing.assert_allclose(named.max(0) - named.min(0), [0.9, 0.45, 0.225])
    np.testing.assert_allclose(norm.vertices[-1], (stray[0] - center) * scale)
    with pytest.raises(S.MeshError, match="outside"):  # a face naming no vertex
        S.normalize_mesh(trimesh.Trimesh(box.vertices, np.array([[0, 1, len(box.vertices)]]), process=False))
