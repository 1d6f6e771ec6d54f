"""Shape metrics between a predicted and a ground-truth mesh, all in one place.

Both meshes are compared in the same frame; the defaults assume the unit cube ``[-0.5, 0.5]^3`` of
:mod:`model.data.sdf` (pass ``normalize=True`` to :func:`mesh_metrics` to map both meshes with the transform that
normalises the ground truth into it).

Surface metrics use ``N`` points sampled uniformly by area on each surface (``trimesh.sample.sample_surface``,
seeded; the two meshes draw from two independent streams of the seed), each with the normal of the face it lies on,
and nearest neighbours from ``scipy.spatial.cKDTree``:

* **Chamfer distance** ``CD = (mean_p min_g |p - g| + mean_g min_p |g - p|) / 2``: the mean of the two directions of
  the (not squared) Euclidean nearest-neighbour distance, in the units of the meshes (unit-cube sides). Both
  directions are returned too. Its floor for identical surfaces is the sampling noise, the mean distance between
  two independent uniform samplings, about ``0.5 / sqrt(N / area)`` (2.2e-3 for 100k points on a sphere of radius
  0.4, area 2).
* **F-score** at threshold ``t`` (default :data:`DEFAULT_FSCORE_THRESHOLD` = 1/128 of the cube side, 2 voxels at
  256^3): precision = fraction of predicted points within ``t`` of the ground-truth points, recall = fraction of
  ground-truth points within ``t`` of the predicted points, ``F = 2 P R / (P + R)``. For identical surfaces it is
  about ``1 - exp(-pi t^2 N / area)`` because of the sampling (0.9999 for 100k points on area 2).
* **Normal consistency**: the mean of ``|cos|`` between the normal at a point and the normal at its nearest
  neighbour on the other surface, averaged over both directions (orientation-free; 1 for identical surfaces).

Volume metric:

* **Volume IoU** on ``M`` points drawn uniformly (seeded) in the bounding box that holds both meshes: a point is
  inside a mesh where its generalized winding number exceeds 0.5 (``igl.fast_winding_number``; correct for closed
  meshes, sensible for slightly open ones), and ``IoU = |inside both| / |inside either|``.
"""
from __future__ import annotations

import math

import numpy as np
import trimesh
from scipy.spatial import cKDTree

#: Surface points sampled per mesh.
DEFAULT_NUM_POINTS = 100_000
#: F-score threshold, in unit-cube sides (2 voxels at 256^3).
DEFAULT_FSCORE_THRESHOLD = 1.0 / 128
#: Points drawn in the bounding box for the volume IoU.
DEFAULT_IOU_POINTS = 100_000


def _check_mesh(mesh, name: str) -> trimesh.Trimesh:
    if not isinstance(mesh, trimesh.Trimesh):
        raise TypeError(f"{name} must be a trimesh.Trimesh, got {type(mesh).__name__}")
    if len(mesh.faces) == 0:
        raise ValueError(f"{name} has no faces")
    return mesh


def _check_points(points, name: str) -> np.ndarray:
    p = np.asarray(points, dtype=np.float64)
    if p.ndim != 2 or p.shape[1] != 3:
        raise ValueError(f"{name} must have shape [N, 3], got {p.shape}")
    if len(p) == 0:
        raise ValueError(f"{name} is empty")
    return p


def _check_count(n, name: str) -> int:
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 1:
        raise ValueError(f"{name} must be a positive int, got {n!r}")
    return int(n)


def sample_surface(mesh: trimesh.Trimesh, num_points: int = DEFAULT_NUM_POINTS, seed=0):
    """``(points [N, 3] float64, normals [N, 3] float64)``: ``N`` points uniform by area on ``mesh``'s surface and
    the unit normal of the face each lies on. ``seed``: int, sequence of ints or ``np.random.Generator``."""
    mesh = _check_mesh(mesh, "mesh")
    num_points = _check_count(num_points, "num_points")
    points, face = trimesh.sample.sample_surface(mesh, num_points, seed=np.random.default_rng(seed))
    normals = np.asarray(mesh.face_normals, dtype=np.float64)[face]
    return np.asarray(points, dtype=np.float64), normals


def nearest(a, b):
    """For each point of ``a [N, 3]``: the distance to, and index of, its nearest point in ``b [M, 3]``."""
    a, b = _check_points(a, "a"), _check_points(b, "b")
    d, i = cKDTree(b).query(a, k=1, workers=-1)
    return d, i


def chamfer_distance(pred_points, gt_points) -> float:
    """``(mean_p min_g |p-g| + mean_g min_p |g-p|) / 2`` between two point sets ``[N, 3]``, ``[M, 3]``."""
    d_pg, _ = nearest(pred_points, gt_points)
    d_gp, _ = nearest(gt_points, pred_points)
    return float((d_pg.mean() + d_gp.mean()) / 2)


def fscore(pred_points, gt_points, threshold: float = DEFAULT_FSCORE_THRESHOLD):
    """``(F, precision, recall)`` at ``threshold`` between two point sets (see the module docstring)."""
    _check_threshold(threshold)
    d_pg, _ = nearest(pred_points, gt_points)
    d_gp, _ = nearest(gt_points, pred_points)
    return _fscore(d_pg, d_gp, threshold)


def _check_threshold(threshold) -> None:
    if not (isinstance(threshold, (int, float)) and threshold > 0 and math.isfinite(threshold)):
        raise ValueError(f"threshold must be a positive number, got {threshold!r}")


def _fscore(d_pg: np.ndarray, d_gp: np.ndarray, threshold: float):
    precision = float((d_pg <= threshold).mean())
    recall = float((d_gp <= threshold).mean())
    f = 0.0 if precision + recall == 0 else 2 * precision * recall / (precision + recall)
    return f, precision, recall


def point_metrics(pred_points, gt_points, pred_normals=None, gt_normals=None, *,
                  threshold: float = DEFAULT_FSCORE_THRESHOLD) -> dict:
    """Chamfer distance (both directions and their mean), F-score, precision, recall and, when both normal arrays
    are given, normal consistency, between two point sets ``[N, 3]`` and ``[M, 3]``."""
    _check_threshold(threshold)
    pred_points = _check_points(pred_points, "pred_points")
    gt_points = _check_points(gt_points, "gt_points")
    d_pg, i_pg = nearest(pred_points, gt_points)
    d_gp, i_gp = nearest(gt_points, pred_points)
    f, p, r = _fscore(d_pg, d_gp, threshold)
    out = dict(
        chamfer=float((d_pg.mean() + d_gp.mean()) / 2),
        chamfer_pred_to_gt=float(d_pg.mean()),
        chamfer_gt_to_pred=float(d_gp.mean()),
        fscore=f, precision=p, recall=r, fscore_threshold=float(threshold),
    )
    if pred_normals is not None and gt_normals is not None:
        npred = _unit(_check_points(pred_normals, "pred_normals"))
        ngt = _unit(_check_points(gt_normals, "gt_normals"))
        if len(npred) != len(pred_points) or len(ngt) != len(gt_points):
            raise ValueError("pred_normals / gt_normals must have one row per point")
        c_pg = np.abs(np.einsum("ij,ij->i", npred, ngt[i_pg])).mean()
        c_gp = np.abs(np.einsum("ij,ij->i", ngt, npred[i_gp])).mean()
        out["normal_consistency"] = float((c_pg + c_gp) / 2)
    return out


def _unit(v: np.ndarray) -> np.ndarray:
    n = np.linalg.norm(v, axis=1, keepdims=True)
    return v / np.where(n > 0, n, 1.0)


def inside(mesh: trimesh.Trimesh, points) -> np.ndarray:
    """``[P] bool``: generalized winding number of ``mesh`` at ``points [P, 3]`` above 0.5."""
    from model.data.sdf import winding_number

    mesh = _check_mesh(mesh, "mesh")
    return winding_number(mesh.vertices, mesh.faces, _check_points(points, "points")) > 0.5


def volume_iou(pred: trimesh.Trimesh, gt: trimesh.Trimesh, num_points: int = DEFAULT_IOU_POINTS, seed=0) -> float:
    """Volume IoU of two meshes from ``num_points`` uniform samples in the bounding box of both (seeded).
    Returns ``nan`` when neither mesh encloses any sample."""
    pred, gt = _check_mesh(pred, "pred"), _check_mesh(gt, "gt")
    num_points = _check_count(num_points, "num_points")
    lo = np.minimum(pred.bounds[0], gt.bounds[0])
    hi = np.maximum(pred.bounds[1], gt.bounds[1])
    rng = np.random.default_rng(seed)
    pts = lo + rng.random((num_points, 3)) * (hi - lo)
    a, b = inside(pred, pts), inside(gt, pts)
    union = int((a | b).sum())
    return float("nan") if union == 0 else float((a & b).sum() / union)


def mesh_metrics(
    pred: trimesh.Trimesh,
    gt: trimesh.Trimesh,
    *,
    num_points: int = DEFAULT_NUM_POINTS,
    threshold: float = DEFAULT_FSCORE_THRESHOLD,
    iou_points: int = DEFAULT_IOU_POINTS,
    seed: int = 0,
    normalize: bool = False,
) -> dict:
    """All metrics between ``pred`` and ``gt``: ``dict(chamfer, chamfer_pred_to_gt, chamfer_gt_to_pred, fscore,
    precision, recall, fscore_threshold, normal_consistency, iou, num_points)``.

    ``normalize=True`` first maps both meshes by the transform that puts ``gt`` in the unit cube (its bounding box
    centred, largest side :data:`model.data.sdf.DEFAULT_MARGIN`), so the threshold means the same for every shape.
    ``iou_points=0`` skips the volume IoU (``iou`` is then ``nan``).
    """
    pred, gt = _check_mesh(pred, "pred"), _check_mesh(gt, "gt")
    num_points = _check_count(num_points, "num_points")
    _check_threshold(threshold)
    if normalize:
        from model.data.sdf import normalize_mesh

        gt, center, scale = normalize_mesh(gt)
        pred = trimesh.Trimesh((np.asarray(pred.vertices) - center) * scale, pred.faces, process=False)
    seq = np.random.SeedSequence(seed)
    s_pred, s_gt, s_vol = seq.spawn(3)
    pp, pn = sample_surface(pred, num_points, np.random.default_rng(s_pred))
    gp, gn = sample_surface(gt, num_points, np.random.default_rng(s_gt))
    out = point_metrics(pp, gp, pn, gn, threshold=threshold)
    out["iou"] = volume_iou(pred, gt, iou_points, np.random.default_rng(s_vol)) if iou_points else float("nan")
    out["num_points"] = num_points
    return out
