"""Reconstruct a mesh through the sparse SDF VAE: mesh -> sparse SDF -> encode -> decode -> marching cubes.

Command line::

    python -m model.cli.reconstruct MESH --vae CKPT --resolution R --out OUT.glb
    python -m model.cli.reconstruct MESH --weights PATH_OR_ID --resolution 512|1024 --out OUT.glb

loads ``MESH``, makes its sparse SDF at ``R^3`` (:func:`model.data.sdf.mesh_to_sparse_sdf`, with the ``tau`` the
checkpoint was trained with), encodes it (posterior mean), decodes it with inference pruning (only the voxels the
pruning heads predict), extracts the mesh at the iso level 0 (:mod:`model.pipeline.extract`), writes it as GLB and prints
Chamfer distance, F-score (threshold 1/128 of the unit cube) and normal consistency against the input, both in the
unit cube of the data (the input normalised by the sample's own centre and scale; input faces buried inside the
shape left out, see :func:`evaluate_mesh`), plus time and peak memory.

With ``--weights`` (instead of ``--vae``) the released sparse VAE is used (:func:`model.pipeline.pretrained.from_pretrained`:
a released folder or a model hub id): ``sparse_vae_1024`` for ``R > 512``, else ``sparse_vae_512`` (``--part``
chooses). As released, the decoder keeps every child of every latent voxel (no pruning; ``sparse_vae_1024`` in
spatial chunks, :func:`model.pipeline.pretrained.decode_chunked`) and the surface is extracted at the released level 0.2.
The released VAE's input normalisation is not published: we feed ``sdf / tau`` at the voxels with ``|sdf| < tau``
with ``tau`` = :data:`model.pipeline.pretrained.RELEASED_SDF_TAU` voxels (an assumption; ``--tau`` changes it). The mesh is
normalised as released (largest extent 0.95 of the unit cube); our voxel centres sit at ``(i + 0.5) / R`` where the
released 1024 pipeline uses ``i / (R - 1)``. Empty voxels are filled by our per-brick sign rule (:mod:`model.pipeline.extract`),
not the released +1, which adds an inner shell that the released pipeline removes with its refiners.

Library: :func:`load_vae` (checkpoint -> model, with clear errors for files that are not VAE checkpoints),
:func:`reconstruct_sample` (a :class:`~model.data.sdf.SparseSDF` -> :class:`Reconstruction`), :func:`evaluate_mesh`
(metrics that also accept an empty reconstruction) and :func:`normalized_mesh`.
"""
from __future__ import annotations

import dataclasses
import resource
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import trimesh

from model.io import load_checkpoint, resolve_device
from model.metrics import DEFAULT_FSCORE_THRESHOLD
from model.nets.vae import SparseSDFVAE, VAEConfig
from model.pipeline.extract import DEFAULT_BRICK, DEFAULT_LEVEL, sparse_sdf_to_mesh
from model.sparse.tensor import SparseTensor

__all__ = [
    "MODEL_CLASS",
    "Reconstruction",
    "evaluate_mesh",
    "load_vae",
    "normalized_mesh",
    "reconstruct_sample",
    "vae_checkpoint_meta",
    "vae_config_from_dict",
]

#: ``model_class`` entry of a VAE checkpoint's metadata.
MODEL_CLASS = "SparseSDFVAE"
#: Surface points per mesh for the metrics of the command line.
CLI_POINTS = 100_000


# ---------------------------------------------------------------------------------------------------------------
# checkpoints


def vae_checkpoint_meta(config: VAEConfig, *, tau: float, margin: float, **extra) -> dict:
    """The metadata that makes a checkpoint loadable by :func:`load_vae`: the model class, its config and the data
    normalisation (``tau`` in voxels, SDF given as ``sdf / tau``, ``margin``); ``extra`` entries are added."""
    return {"model_class": MODEL_CLASS, "vae_config": dataclasses.asdict(config),
            "data": {"tau": float(tau), "sdf_units": "tau", "margin": float(margin)}, **extra}


def vae_config_from_dict(values: dict) -> VAEConfig:
    """:class:`~model.nets.vae.VAEConfig` from its ``asdict`` form (lists back to tuples); ``ValueError`` on unknown keys."""
    if not isinstance(values, dict):
        raise ValueError(f"vae_config must be a mapping, got {type(values).__name__}")
    known = {f.name for f in dataclasses.fields(VAEConfig)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ValueError(f"vae_config has unknown fields {unknown}")
    return VAEConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in values.items()})


def load_vae(path, *, device: str | torch.device = "cpu") -> tuple[SparseSDFVAE, dict]:
    """``(vae in eval mode on device, checkpoint metadata)`` from a checkpoint written by the VAE trainer.

    Raises ``FileNotFoundError`` for a missing file and ``ValueError`` naming the file for one that is not a
    safetensors checkpoint of this project, holds another model class, or whose weights do not fit the architecture
    recorded in it.
    """
    path = Path(path)
    ckpt = load_checkpoint(path, map_location="cpu")
    cls = ckpt.meta.get("model_class")
    if cls != MODEL_CLASS:
        raise ValueError(f"{path} holds a {cls or 'unlabelled'} checkpoint, not a {MODEL_CLASS} (sparse SDF VAE)")
    if "vae_config" not in ckpt.meta:
        raise ValueError(f"{path}: checkpoint metadata has no vae_config")
    config = vae_config_from_dict(ckpt.meta["vae_config"])
    vae = SparseSDFVAE(config)
    ours = vae.state_dict()
    missing = sorted(set(ours) - set(ckpt.model))
    unexpected = sorted(set(ckpt.model) - set(ours))
    wrong = sorted(k for k in set(ours) & set(ckpt.model) if tuple(ours[k].shape) != tuple(ckpt.model[k].shape))
    if missing or unexpected or wrong:
        def few(names):
            return ", ".join(names[:4]) + (f" (+{len(names) - 4} more)" if len(names) > 4 else "")

        parts = [f"{len(missing)} missing ({few(missing)})" if missing else "",
                 f"{len(unexpected)} unexpected ({few(unexpected)})" if unexpected else "",
                 f"{len(wrong)} of another shape ({few(wrong)})" if wrong else ""]
        raise ValueError(f"{path}: the weights do not fit the architecture recorded in the checkpoint: "
                         + "; ".join(p for p in parts if p))
    vae.load_state_dict(ckpt.model)
    return vae.to(resolve_device(device)).eval(), ckpt.meta


# ---------------------------------------------------------------------------------------------------------------
# reconstruction


@dataclass
class Reconstruction:
    """Result of :func:`reconstruct_sample`.

    ``mesh``: the extracted mesh in the unit cube (may have no faces); ``decoded_coords [M, 3]`` int32 and
    ``decoded_sdf [M]`` float32 (numpy): the decoded sparse SDF; ``input_voxels``, ``latent_voxels``;
    ``seconds``: ``encode``, ``decode`` (model, synchronised on CUDA) and ``extract``; ``peak_memory_bytes`` and
    ``peak_memory_kind`` (``"cuda max allocated"`` during encode + decode, or ``"process peak RSS"`` on CPU).
    """

    mesh: trimesh.Trimesh
    decoded_coords: np.ndarray
    decoded_sdf: np.ndarray
    input_voxels: int
    latent_voxels: int
    seconds: dict = field(default_factory=dict)
    peak_memory_bytes: int = 0
    peak_memory_kind: str = ""


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def process_peak_rss() -> int:
    """Peak resident set size of this process so far, in bytes (Linux reports KiB)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak) * (1 if sys.platform == "darwin" else 1024)


@torch.no_grad()
def reconstruct_sample(
    vae: SparseSDFVAE,
    sample,
    *,
    device: str | torch.device | None = None,
    dtype: torch.dtype | None = None,
    level: float = DEFAULT_LEVEL,
    brick: int = DEFAULT_BRICK,
    extract: bool = True,
    progress: bool = False,
    chunk_size: int = 1,
) -> Reconstruction:
    """Encode (posterior mean) and decode (inference pruning) one :class:`~model.data.sdf.SparseSDF`, then extract
    the mesh at ``level``.

    The VAE reads ``sample.sdf_scaled`` (``sdf / tau``, the units it is trained on). ``device`` defaults to the
    VAE's; ``dtype``: autocast dtype on CUDA (e.g. ``torch.bfloat16``), None for float32. The VAE is left in the
    mode it was in. ``chunk_size > 1`` (VAEs without pruning heads, e.g. the released ones) decodes in spatial
    chunks (:func:`model.pipeline.pretrained.decode_chunked`).
    """
    if not isinstance(vae, SparseSDFVAE):
        raise TypeError(f"vae must be a SparseSDFVAE, got {type(vae).__name__}")
    dev = next(vae.parameters()).device if device is None else torch.device(device)
    coords = torch.from_numpy(np.ascontiguousarray(sample.coords, dtype=np.int32))
    feats = torch.from_numpy(np.ascontiguousarray(sample.sdf_scaled, dtype=np.float32)).unsqueeze(1)
    x = SparseTensor.from_list([coords.to(dev)], [feats.to(dev)], resolution=int(sample.resolution))
    was_training = vae.training
    vae.eval()
    use_autocast = dtype is not None and dev.type == "cuda"
    if dev.type == "cuda":
        _sync(dev)
        torch.cuda.reset_peak_memory_stats(dev)
    try:
        with torch.autocast(device_type=dev.type, dtype=dtype or torch.bfloat16, enabled=use_autocast):
            t0 = time.perf_counter()
            z = vae.encode(x).mode()
            _sync(dev)
            t1 = time.perf_counter()
            if chunk_size > 1:
                from model.pipeline.pretrained import decode_chunked

                decoded = decode_chunked(vae, z, chunk_size)[0]
            else:
                decoded = vae.decode(z).sdf
            _sync(dev)
            t2 = time.perf_counter()
    finally:
        vae.train(was_training)
    if dev.type == "cuda":
        peak, kind = int(torch.cuda.max_memory_allocated(dev)), "cuda max allocated"
    else:
        peak, kind = process_peak_rss(), "process peak RSS"
    dc = decoded.coords[:, 1:].cpu().numpy().astype(np.int32)
    dv = decoded.feats[:, 0].float().cpu().numpy()
    del decoded
    t3 = time.perf_counter()
    if extract:
        mesh = sparse_sdf_to_mesh(dc, dv, int(sample.resolution), level=level, brick=brick, progress=progress)
    else:
        mesh = trimesh.Trimesh(np.zeros((0, 3)), np.zeros((0, 3), np.int64), process=False)
    t4 = time.perf_counter()
    return Reconstruction(mesh=mesh, decoded_coords=dc, decoded_sdf=dv, input_voxels=x.num_voxels,
                          latent_voxels=z.num_voxels, seconds={"encode": t1 - t0, "decode": t2 - t1,
                                                               "extract": t4 - t3},
                          peak_memory_bytes=peak, peak_memory_kind=kind)


def normalized_mesh(mesh, sample) -> trimesh.Trimesh:
    """The mesh (path or ``trimesh``) in the unit cube of ``sample``: ``(v - sample.center) * sample.scale``, the
    transform :func:`model.data.sdf.mesh_to_sparse_sdf` applied before voxelising it."""
    from model.data.sdf import load_mesh

    m = load_mesh(mesh)
    v = (np.asarray(m.vertices, dtype=np.float64) - np.asarray(sample.center, np.float64)) * float(sample.scale)
    return trimesh.Trimesh(v, np.asarray(m.faces), process=False)


#: Metrics reported for a reconstruction that produced no surface.
EMPTY_METRICS = dict(chamfer=float("nan"), chamfer_pred_to_gt=float("nan"), chamfer_gt_to_pred=float("nan"),
                     fscore=0.0, precision=0.0, recall=0.0, normal_consistency=0.0, iou=float("nan"),
                     fscore_all_faces=0.0, chamfer_all_faces=float("nan"))
#: Offset (unit-cube units, 0.03 voxels at 256^3) of the two probes on either side of a ground-truth surface point.
SURFACE_PROBE = 1e-4


def outer_surface_mask(mesh: trimesh.Trimesh, points: np.ndarray, normals: np.ndarray) -> np.ndarray:
    """``[P] bool``: which of ``points [P, 3]`` (sampled on ``mesh``, with their face ``normals``) lie on its outer
    surface rather than buried inside its volume.

    A point is outer when one of the two probes ``point +- SURFACE_PROBE * normal`` is outside every part of the
    mesh: generalized winding number below 0.5 in magnitude (0 outside whatever the parts' orientation; about 1
    inside a part). Probing off the surface avoids the winding number's undefined value on the surface itself.
    All points are outer for a single closed or open surface.
    """
    from model.data.sdf import winding_number

    v, f = mesh.vertices, mesh.faces
    offset = SURFACE_PROBE * np.asarray(normals, dtype=np.float64)
    w_plus = np.abs(winding_number(v, f, points + offset))
    w_minus = np.abs(winding_number(v, f, points - offset))
    return np.minimum(w_plus, w_minus) < 0.5


def evaluate_mesh(pred: trimesh.Trimesh, gt: trimesh.Trimesh, *, num_points: int = CLI_POINTS,
                  threshold: float = DEFAULT_FSCORE_THRESHOLD, iou_points: int = 0, seed: int = 0) -> dict:
    """Metrics of ``pred`` against ``gt`` (same frame): :func:`model.metrics.point_metrics` (Chamfer, F-score,
    precision, recall, normal consistency) and :func:`model.metrics.volume_iou` (``iou_points = 0``: NaN).

    Ground-truth points buried inside the shape (:func:`outer_surface_mask`) are left out: meshes made of
    overlapping parts (pybullet's objects are unions of overlapping convex pieces) have faces inside their volume
    that no signed distance, and so no reconstruction, has (about 8% of the area of pybullet's objects, which caps
    their F-score near 0.92 even for a perfect surface). ``fscore_all_faces`` / ``chamfer_all_faces`` keep them
    (= :func:`model.metrics.mesh_metrics`); ``gt_outer_fraction`` is the share of ground-truth points kept. Also
    ``faces`` (of ``pred``), ``num_points``, ``empty`` (an empty ``pred`` gets F-score 0 and NaN distances).
    """
    from model.metrics import point_metrics, sample_surface, volume_iou

    if len(pred.faces) == 0:
        return {**EMPTY_METRICS, "fscore_threshold": float(threshold), "num_points": int(num_points), "faces": 0,
                "gt_outer_fraction": float("nan"), "empty": True}
    s_pred, s_gt, s_vol = np.random.SeedSequence(seed).spawn(3)  # the streams of model.metrics.mesh_metrics
    pp, pn = sample_surface(pred, num_points, np.random.default_rng(s_pred))
    gp, gn = sample_surface(gt, num_points, np.random.default_rng(s_gt))
    outer = outer_surface_mask(gt, gp, gn)
    every = point_metrics(pp, gp, pn, gn, threshold=threshold)
    out = point_metrics(pp, gp[outer], pn, gn[outer], threshold=threshold) if outer.any() else dict(every)
    out.update(fscore_all_faces=every["fscore"], chamfer_all_faces=every["chamfer"],
               gt_outer_fraction=float(outer.mean()), num_points=int(num_points), faces=int(len(pred.faces)),
               empty=False)
    out["iou"] = volume_iou(pred, gt, iou_points, np.random.default_rng(s_vol)) if iou_points else float("nan")
    return out
