"""Shape metrics (model/metrics.py): identical, scaled and shifted spheres against closed-form values."""
from __future__ import annotations

import math

import numpy as np
import pytest
import trimesh

pytest.importorskip("igl")

from model import metrics as M  # noqa: E402

N = 50_000  # surface points per mesh in these tests
RADIUS = 0.4


@pytest.fixture(scope="module")
def sphere():
    return trimesh.creation.icosphere(4, radius=RADIUS)


def noise_floor(mesh, n=N):
    """Mean nearest-neighbour distance between two independent uniform samplings: 0.5 / sqrt(n / area)."""
    return 0.5 / math.sqrt(n / mesh.area)


def test_identical_meshes(sphere):
    m = M.mesh_metrics(sphere, sphere.copy(), num_points=N, iou_points=20_000)
    assert set(m) >= {"chamfer", "chamfer_pred_to_gt", "chamfer_gt_to_pred", "fscore", "precision", "recall",
                      "normal_consistency", "iou"}
    assert m["chamfer"] < 1.3 * noise_floor(sphere)  # only the sampling noise (~3e-3 here)
    # a sample point misses the other sampling within t with probability exp(-density * pi t^2) (Poisson): ~0.8 %
    missed = math.exp(-N / sphere.area * math.pi * M.DEFAULT_FSCORE_THRESHOLD**2)
    assert m["fscore"] > 1 - 2 * missed and m["normal_consistency"] > 0.999
    assert m["iou"] == 1.0
    # the same point set against itself is exactly zero / one
    p, n = M.sample_surface(sphere, 2000, seed=1)
    pm = M.point_metrics(p, p, n, n)
    assert pm["chamfer"] == 0 and pm["fscore"] == 1 and pm["normal_consistency"] == pytest.approx(1)


def test_seeded(sphere):
    a = M.mesh_metrics(sphere, sphere, num_points=5000, iou_points=5000, seed=7)
    b = M.mesh_metrics(sphere, sphere, num_points=5000, iou_points=5000, seed=7)
    assert a == b


def test_scaled_copy(sphere):
    s = 1.1
    big = sphere.copy().apply_scale(s)
    m = M.mesh_metrics(big, sphere, num_points=N, iou_points=40_000)
    # every point of one sphere is (s - 1) r from the other (up to the tessellation, < 0.1 % of r here)
    assert m["chamfer"] == pytest.approx((s - 1) * RADIUS, rel=0.05)
    assert m["fscore"] < 0.01  # 0.04 apart, threshold 1/128
    assert M.mesh_metrics(big, sphere, num_points=N, iou_points=0, threshold=0.06)["fscore"] > 0.99
    assert m["normal_consistency"] > 0.99  # concentric: same normals
    assert m["iou"] == pytest.approx(1 / s**3, abs=0.015)  # 3 sigma of 40k samples ~ 0.007


def test_shifted_copy(sphere):
    d = 0.05
    moved = sphere.copy().apply_translation([d, 0, 0])
    m = M.mesh_metrics(moved, sphere, num_points=N, iou_points=40_000)
    # a point with normal n is |d n_x| from the shifted sphere, to first order; the mean over the sphere is d / 2
    assert m["chamfer"] == pytest.approx(d / 2, rel=0.08)
    assert 0.1 < m["fscore"] < 0.3
    lens = math.pi * (4 * RADIUS + d) * (2 * RADIUS - d) ** 2 / 12  # intersection of two balls, centres d apart
    ball = 4 / 3 * math.pi * RADIUS**3
    assert m["iou"] == pytest.approx(lens / (2 * ball - lens), abs=0.015)


def test_normal_consistency_detects_different_shapes(sphere):
    box = trimesh.creation.box((0.7, 0.7, 0.7))
    m = M.mesh_metrics(box, sphere, num_points=20_000, iou_points=20_000)
    assert m["normal_consistency"] < 0.95 and m["fscore"] < 0.5 and m["iou"] < 1


def test_normalize_makes_metrics_scale_free(sphere):
    d = 0.05
    big = sphere.copy().apply_scale(10.0)
    moved = big.copy().apply_translation([10 * d, 0, 0])
    raw = M.mesh_metrics(moved, big, num_points=20_000, iou_points=0)
    norm = M.mesh_metrics(moved, big, num_points=20_000, iou_points=0, normalize=True)
    scale = 0.95 / big.extents.max()
    assert norm["chamfer"] == pytest.approx(raw["chamfer"] * scale, rel=1e-6)


def test_bad_inputs(sphere):
    with pytest.raises(TypeError, match="pred"):
        M.mesh_metrics("mesh.obj", sphere)
    with pytest.raises(ValueError, match="threshold"):
        M.mesh_metrics(sphere, sphere, threshold=0)
    with pytest.raises(ValueError, match="num_points"):
        M.sample_surface(sphere, 0)
    with pytest.raises(ValueError, match="pred_points"):
        M.point_metrics(np.zeros((4, 2)), np.zeros((4, 3)))
    with pytest.raises(ValueError, match="gt has no faces"):
        M.mesh_metrics(sphere, trimesh.Trimesh())
