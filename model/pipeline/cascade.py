"""Image to mesh: the released Direct3D-S2 cascade end to end (RELEASED_MODEL.md A.3, C, E.5, E.6).

:class:`ImageToMesh` holds the eight released parts plus the image encoder and runs, for one image:

1. **condition**: the object mask (alpha of an RGBA image, or the uniform background of an RGB image,
   :func:`load_rgba`), the released preprocessing and the DINOv2 encoder (:mod:`model.nets.conditioning`); one set of
   image tokens serves every DiT (the released dense and sparse encoders are the same network).
2. **dense** (structure): the dense DiT samples the ``[8, 16, 16, 16]`` latent (50 Euler steps, shift 6, guidance
   7), the dense VAE decodes it to ``64^3`` occupancy logits, and ``sigmoid >= 0.1`` gives the occupied voxels: the
   512 stage's latent tokens at ``64^3``.
3. **sparse_512**: the sparse DiT samples 16 channels per token (30 steps, shift 6, guidance 7); **decode_512**:
   the sparse VAE decodes every child of every token (the SDF on the 512^3 grid and the decoder's 32 features);
   **refine_512**: the 512 refiner predicts the whole 512^3 field (:func:`model.nets.refiner.refine_512`) and marching
   cubes at level 0.4 gives the 512 mesh (the output when ``resolution=512``).
4. **revoxelise**: the 512 mesh, normalised (bounding-box centre, largest side 0.95 of the unit cube), gives the
   1024 stage's tokens: the 128^3 cells holding a point of the 1024^3 grid within 4 voxels of the surface
   (:func:`mesh_to_latent_coords`), in the SSA layout order.
5. **sparse_1024** (15 steps, shift 8, guidance 7) and **decode_1024** (in spatial chunks,
   :func:`model.pipeline.pretrained.decode_chunked`; the decoder features are not kept); **refine_1024**: the sign refiner's
   inside/outside grid at 512^3 (:func:`model.nets.refiner.predict_sign`).
6. **extract**: marching cubes at level 0.2 on the decoded sparse SDF whose empty voxels take the sign grid's value
   (the released field ``|SDF| * sign`` with the decoded values kept), brick by brick without a dense 1024^3 array
   (:func:`model.pipeline.extract.sparse_sdf_to_mesh` with a fill grid). Voxels that cannot touch the level set (they and
   their 26 neighbours, or their fill, lie on one side of it) are dropped first on the device
   (:func:`surface_voxels`); this changes no triangle.
7. **simplify** (optional, ``faces=``): quadric decimation to a face budget through trimesh, which needs the
   ``fast_simplification`` package; without it the mesh is kept as is, with a warning.

Every sparse stage puts its tokens in the SSA layout order once (:func:`ssa_kernels.layout_order`), draws its noise in
that order, and samples on one :class:`~model.sparse.tensor.SparseTensor` whose coordinate cache holds the block
layout, so the layout is built once per stage and shared by all steps and both guidance passes. One CPU generator
seeded with ``seed`` draws the noise of the three stages in turn (the released pipeline also draws all noise from the
caller's generator). Each stage's wall time and peak GPU memory (``torch.cuda.max_memory_allocated`` since the
stage began) are recorded (:class:`StageRecord`, ``result.stages``); ``offload=True`` keeps the parts on the CPU and
moves each stage's parts to the GPU only while it runs.

Meshes are in the unit cube ``[-0.5, 0.5]^3`` of :mod:`model.pipeline.extract` (voxel ``i`` at ``(i + 0.5) / R - 0.5``; the
released code maps voxel ``i`` to ``i / R * 2 - 1``, twice as large and half a voxel apart). The 1024 mesh lies in the
frame of the normalised 512 mesh, as released.

Assumptions where RELEASED_MODEL.md leaves a choice open (each one is a constant or option here):

- The distance band that picks the 1024 tokens is measured to dense samples of the 512 mesh (spacing 0.5 voxel of
  the 1024 grid, so every distance is within 0.3 voxel of the exact point-triangle distance the released CUDA
  extension computes) instead of to the triangles.
- ``interior="refiner"`` (default, released ``remove_interior=True``) fills empty voxels from the sign refiner;
  ``"keep"`` (``remove_interior=False``) fills them with +1, which leaves the inner shell; ``"components"`` uses
  our per-brick component rule of :mod:`model.pipeline.extract` instead of the network. Surfaces made only of filled voxels
  (a sign flip of the refiner away from every decoded voxel, which the released dense field would turn into a
  floating surface) are not extracted.
- ``faces=None`` (default) does not simplify; the released ``simplify_ratio`` 0.95 only acts with ``remesh``, which
  is off by default.
- The sparse VAEs decode in spatial chunks (4 per axis at both stages by default; the released 512 VAE decodes in
  one pass): same values, less memory.
"""
from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import time
import warnings
from dataclasses import dataclass, field
from typing import Any, Mapping

import numpy as np
import torch
import trimesh
from torch import nn

from ssa_kernels.layout import layout_order

from model.nets.dense import OCCUPANCY_THRESHOLD, DenseShapeVAE
from model.nets.dit import Condition
from model.flow import RELEASED_SHIFT, euler_sample
from model.sparse.tensor import SparseTensor

__all__ = [
    "BACKGROUND_TOLERANCE",
    "CascadeConfig",
    "CascadeResult",
    "EmptyStageError",
    "ImageToMesh",
    "INTERIOR_MODES",
    "STAGES",
    "StageRecord",
    "dense_field_to_mesh",
    "load_rgba",
    "mesh_to_latent_coords",
    "simplify_mesh",
    "surface_voxels",
    "to_layout_order",
]

#: Released Euler steps per stage (RELEASED_MODEL.md A.3).
RELEASED_STEPS = {"dense": 50, "512": 30, "1024": 15}
#: Released classifier-free guidance scale (every stage).
RELEASED_GUIDANCE = 7.0
#: Iso level of the 512 mesh on the 512 refiner's output (2 x the pipeline's mc_threshold 0.2).
LEVEL_512 = 0.4
#: Iso level of the 1024 mesh on the sign-refined sparse SDF (the pipeline's mc_threshold).
LEVEL_1024 = 0.2
#: Half-width (voxels of the 1024 grid) of the band around the 512 mesh whose 128^3 cells are the 1024 tokens.
TOKEN_BAND = 4.0
#: Largest side of the normalised 512 mesh in the unit cube (released normalize_mesh scale 0.95).
MESH_MARGIN = 0.95
#: Spacing (voxels of the 1024 grid) of the surface samples that measure the token band.
SAMPLE_SPACING = 0.5
#: Spatial chunks per axis of the sparse VAE decoders.
DECODE_CHUNKS = 4
#: Output resolutions.
RESOLUTIONS = (512, 1024)
#: How the empty voxels of the 1024 field are filled (module docstring).
INTERIOR_MODES = ("refiner", "keep", "components")
#: Stage names, in order.
STAGES = ("condition", "dense", "sparse_512", "decode_512", "refine_512", "revoxelise", "sparse_1024",
          "decode_1024", "refine_1024", "extract", "simplify")
#: Largest per-channel difference (0..255) from the border's median colour still counted as background.
BACKGROUND_TOLERANCE = 12
#: Share of border pixels that must be background-coloured for an RGB image to count as "uniform background".
MIN_BORDER_SHARE = 0.9
#: Voxels per chunk of the neighbour tests of :func:`surface_voxels` and surface points per chunk of
#: :func:`mesh_to_latent_coords`.
_VOXEL_CHUNK = 1 << 22
_POINT_CHUNK = 1 << 21
#: The 26 neighbour offsets of a voxel.
_NEIGHBOURS = [(a, b, c) for a in (-1, 0, 1) for b in (-1, 0, 1) for c in (-1, 0, 1) if (a, b, c) != (0, 0, 0)]
#: Value of empty space outside the grid ("empty space is +1", RELEASED_MODEL.md C.6).
_OUTSIDE = 1.0


class EmptyStageError(RuntimeError):
    """A stage produced nothing the next stage can use (no occupied voxel, no surface)."""


# ---------------------------------------------------------------------------------------------------------------
# configuration and results


def _positive_int(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return int(value)


@dataclass(frozen=True)
class CascadeConfig:
    """Sampling and extraction settings of :class:`ImageToMesh` (defaults: the released pipeline's).

    ``steps_*``, ``guidance``, ``shift_*``: Euler steps, guidance scale and timestep shift per stage;
    ``occupancy_threshold``: on the dense VAE's ``sigmoid(logit)``; ``level_512`` / ``level_1024``: iso levels, or
    ``"median"`` for the median of the field they cut (random weights: their fields have no meaningful level, the
    median always gives a surface);
    ``token_band`` (voxels of the 1024-stage grid), ``mesh_margin``, ``sample_spacing``: the revoxelisation
    (:func:`mesh_to_latent_coords`); ``decode_chunks_*``: spatial chunks per axis of the sparse VAE decoders;
    ``interior``: one of :data:`INTERIOR_MODES`.
    """

    steps_dense: int = RELEASED_STEPS["dense"]
    steps_512: int = RELEASED_STEPS["512"]
    steps_1024: int = RELEASED_STEPS["1024"]
    guidance: float = RELEASED_GUIDANCE
    shift_dense: float = RELEASED_SHIFT[64]
    shift_512: float = RELEASED_SHIFT[64]
    shift_1024: float = RELEASED_SHIFT[128]
    occupancy_threshold: float = OCCUPANCY_THRESHOLD
    level_512: float | str = LEVEL_512
    level_1024: float | str = LEVEL_1024
    token_band: float = TOKEN_BAND
    mesh_margin: float = MESH_MARGIN
    sample_spacing: float = SAMPLE_SPACING
    decode_chunks_512: int = DECODE_CHUNKS
    decode_chunks_1024: int = DECODE_CHUNKS
    interior: str = "refiner"

    def __post_init__(self):
        for name in ("steps_dense", "steps_512", "steps_1024", "decode_chunks_512", "decode_chunks_1024"):
            _positive_int(name, getattr(self, name))
        if not (isinstance(self.guidance, (int, float)) and math.isfinite(self.guidance) and self.guidance >= 0):
            raise ValueError(f"guidance must be a finite number >= 0, got {self.guidance!r}")
        for name in ("shift_dense", "shift_512", "shift_1024", "token_band", "sample_spacing"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
                raise ValueError(f"{name} must be a positive number, got {value!r}")
        if not 0.0 < self.occupancy_threshold < 1.0:
            raise ValueError(f"occupancy_threshold must lie in (0, 1), got {self.occupancy_threshold!r}")
        if not 0.0 < self.mesh_margin <= 1.0:
            raise ValueError(f"mesh_margin must lie in (0, 1], got {self.mesh_margin!r}")
        for name in ("level_512", "level_1024"):
            value = getattr(self, name)
            if value != "median" and not (isinstance(value, (int, float)) and -1.0 < value < 1.0):
                raise ValueError(f"{name} must lie in (-1, 1) or be 'median', got {value!r}")
        if self.interior not in INTERIOR_MODES:
            raise ValueError(f"interior must be one of {INTERIOR_MODES}, got {self.interior!r}")

    def replace(self, **overrides) -> "CascadeConfig":
        return dataclasses.replace(self, **overrides)


@dataclass
class StageRecord:
    """One stage of one run: wall ``seconds`` (the device synchronised at both ends), ``peak_bytes`` (largest
    ``torch.cuda.max_memory_allocated`` during the stage; None on the CPU) and ``info`` (token and voxel counts,
    ``step_seconds`` of the sampling stages, ...)."""

    name: str
    seconds: float = 0.0
    peak_bytes: int | None = None
    info: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {"seconds": self.seconds, "peak_bytes": self.peak_bytes, **self.info}


@dataclass
class CascadeResult:
    """What :meth:`ImageToMesh.generate` returns: the final ``mesh``, the 512 stage's mesh ``mesh_512`` (None when
    it was not extracted), the latent ``coords`` of each sparse stage (``{"512": [N, 4], "1024": [M, 4]}`` int32 in
    layout order, on the CPU), the ``stages`` that ran (:class:`StageRecord` by name, in order), the preprocessed
    ``image`` (``rgb [3, S, S]``, ``mask [S, S]``) and the settings used."""

    mesh: trimesh.Trimesh
    mesh_512: trimesh.Trimesh | None
    coords: dict
    stages: dict
    image: Any
    settings: dict

    def stage_table(self) -> dict:
        """``{stage: {"seconds", "peak_bytes", ...}}`` (plain values, JSON-ready)."""
        return {name: rec.to_dict() for name, rec in self.stages.items()}


class _Recorder:
    """Times stages and their peak GPU memory (:class:`StageRecord`)."""

    def __init__(self, device: torch.device):
        self.device = device
        self.records: dict[str, StageRecord] = {}

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    @contextlib.contextmanager
    def stage(self, name: str):
        rec = StageRecord(name)
        self._sync()
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        t0 = time.perf_counter()
        try:
            yield rec
        finally:
            self._sync()
            rec.seconds = time.perf_counter() - t0
            if self.device.type == "cuda":
                rec.peak_bytes = int(torch.cuda.max_memory_allocated(self.device))
            self.records[name] = rec


# ---------------------------------------------------------------------------------------------------------------
# input images


def _open_image(image, name: str):
    from PIL import Image, UnidentifiedImageError

    if isinstance(image, Image.Image):
        return image
    if isinstance(image, np.ndarray):
        if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] not in (3, 4):
            raise ValueError(f"{name}: an array must be uint8 [H, W, 3] (RGB) or [H, W, 4] (RGBA), got "
                             f"{image.dtype} {image.shape}")
        return Image.fromarray(image, "RGBA" if image.shape[2] == 4 else "RGB")
    if isinstance(image, (str, os.PathLike)):
        path = os.fspath(image)
        if not os.path.isfile(path):
            raise ValueError(f"{name}: file {path!r} does not exist")
        try:
            img = Image.open(path)
            img.load()
        except (UnidentifiedImageError, OSError) as exc:
            raise ValueError(f"{name}: {path!r} is not an image PIL can read ({exc})") from exc
        return img
    raise TypeError(f"{name} must be a path, a PIL.Image or a uint8 array [H, W, 3|4], got {type(image).__name__}")


def _mask_from_background(rgb: np.ndarray, tolerance: int, name: str) -> np.ndarray:
    """Alpha ``[H, W]`` uint8 of an RGB image on a uniform background (see :func:`load_rgba`)."""
    from scipy import ndimage

    h, w, _ = rgb.shape
    if h < 3 or w < 3:
        raise ValueError(f"{name}: image of {w}x{h} pixels is too small")
    border = np.concatenate([rgb[0], rgb[-1], rgb[1:-1, 0], rgb[1:-1, -1]]).astype(np.int16)
    background = np.median(border, axis=0)
    close_border = np.abs(border - background).max(1) <= tolerance
    share = float(close_border.mean())
    if share < MIN_BORDER_SHARE:
        colour = tuple(int(c) for c in background)
        raise ValueError(
            f"{name}: RGB image without a uniform background: only {100 * share:.0f}% of its border pixels lie "
            f"within {tolerance} of the border's median colour {colour} (need {100 * MIN_BORDER_SHARE:.0f}%); give "
            "an RGBA image whose alpha is the object mask")
    close = np.abs(rgb.astype(np.int16) - background).max(2) <= tolerance
    labels, _ = ndimage.label(close)  # 4-connected regions of background-coloured pixels
    edge = np.unique(np.concatenate([labels[0], labels[-1], labels[:, 0], labels[:, -1]]))
    background_mask = np.isin(labels, edge[edge > 0])
    if background_mask.all():
        raise ValueError(f"{name}: every pixel has the background colour: there is no object")
    return np.where(background_mask, 0, 255).astype(np.uint8)


def load_rgba(image, *, tolerance: int = BACKGROUND_TOLERANCE, name: str = "image"):
    """An RGBA ``PIL.Image`` whose alpha is the object mask.

    ``image``: a path, a ``PIL.Image`` or a uint8 array ``[H, W, 3|4]``. RGBA (and palette images with
    transparency) keep their alpha, as released. RGB (also RGBA without any transparent pixel, and palette images
    without transparency) must show the object on a uniform background: the background colour is the per-channel
    median of the border pixels (at least :data:`MIN_BORDER_SHARE` of them within ``tolerance`` of it), and the
    background is every pixel within ``tolerance`` of that colour that is 4-connected to the border (a flood fill
    from the border, so object pixels of the background colour stay object). The released pipeline runs the
    BiRefNet background remover on RGB input; no machine here has its weights.

    Raises ``ValueError`` (message starting with ``name``) for a missing or unreadable file, a grayscale or other
    unsupported mode, a non-uniform background or an empty object, ``TypeError`` for other argument types.
    """
    if isinstance(tolerance, bool) or not isinstance(tolerance, int) or not 0 <= tolerance <= 255:
        raise ValueError(f"tolerance must be an int in [0, 255], got {tolerance!r}")
    img = _open_image(image, name)
    mode = img.mode
    if mode == "P":
        img = img.convert("RGBA" if "transparency" in img.info else "RGB")
    elif mode in ("L", "LA", "1", "I", "I;16", "I;16B", "I;16L", "F", "La"):
        raise ValueError(f"{name}: grayscale image (mode {mode}) is not supported: give an RGBA image (alpha = "
                         "object mask) or an RGB image on a uniform background")
    elif mode not in ("RGB", "RGBA"):
        raise ValueError(f"{name}: unsupported image mode {mode!r}: give an RGBA image (alpha = object mask) or an RGB "
                         "image on a uniform background")
    if img.mode == "RGBA":
        alpha = np.asarray(img.getchannel("A"))
        if (alpha < 255).any():
            if not (alpha > 0).any():
                raise ValueError(f"{name}: the alpha channel is 0 everywhere: there is no object")
            return img
        img = img.convert("RGB")
    rgb = np.asarray(img)
    alpha = _mask_from_background(rgb, tolerance, name)
    from PIL import Image

    return Image.fromarray(np.dstack([rgb, alpha]), "RGBA")


# ---------------------------------------------------------------------------------------------------------------
# geometry helpers


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
                          device=None) -> torch.Tensor:
    """The latent cells of a mesh as the released pipeline chooses the 1024 stage's tokens (RELEASED_MODEL.md C.4).

    The mesh is normalised (bounding-box centre at the origin, largest side ``margin``; skip with
    ``normalize=False`` for a mesh already in the unit cube), the ``resolution^3`` grid has its point ``i`` at
    ``i / (resolution - 1) - 0.5`` per axis, and a cell of ``factor^3`` grid points is kept when one of its points
    lies closer than ``band`` grid steps to the surface. Distances are measured to surface samples on a barycentric
    lattice of each triangle with at most ``spacing`` grid steps between neighbours (so within about
    ``0.6 * spacing`` of the exact distance); no dense grid is built, memory follows the surface.

    Returns ``[M, 3]`` int32 cell coordinates in ``[0, resolution / factor)``, unique, in raster order, on
    ``device`` (default: the CPU). Use :func:`to_layout_order` for the SSA layout order.
    """
    resolution = _positive_int("resolution", resolution)
    factor = _positive_int("factor", factor)
    if resolution % factor or resolution < 2:
        raise ValueError(f"factor ({factor}) must divide resolution ({resolution})")
    for name, value in (("band", band), ("spacing", spacing)):
        if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
            raise ValueError(f"{name} must be a positive number, got {value!r}")
    v, f = _mesh_arrays(mesh)
    if f.ndim != 2 or f.shape[1] != 3 or len(f) == 0 or v.ndim != 2 or v.shape[1] != 3:
        raise ValueError("mesh must have vertices [V, 3] and at least one triangle")
    if normalize:
        from model.data.sdf import normalize_mesh

        v = np.asarray(normalize_mesh(trimesh.Trimesh(v, f, process=False), margin)[0].vertices)
    dev = torch.device(device) if device is not None else torch.device("cpu")
    tri = torch.as_tensor((v[f] + 0.5) * (resolution - 1), dtype=torch.float32, device=dev)  # [F, 3, 3] grid units
    longest = torch.stack([(tri[:, 0] - tri[:, 1]).norm(dim=1), (tri[:, 1] - tri[:, 2]).norm(dim=1),
                           (tri[:, 2] - tri[:, 0]).norm(dim=1)], 1).amax(1)
    steps = torch.ceil(longest / spacing).clamp_min(1).long()
    order = torch.argsort(steps)
    steps, tri = steps[order], tri[order]
    values, counts = torch.unique_consecutive(steps, return_counts=True)
    keys, start = [], 0
    for n, count in zip(values.tolist(), counts.tolist()):
        weights = _lattice(n, dev)  # [K, 3]
        per_chunk = max(1, _POINT_CHUNK // weights.shape[0])
        for s in range(start, start + count, per_chunk):
            t = tri[s:min(s + per_chunk, start + count)]
            points = torch.einsum("kj,tjd->tkd", weights, t).reshape(-1, 3)
            keys.append(_band_cell_keys(points, resolution, factor, float(band)))
        start += count
    key = torch.unique(torch.cat(keys))
    cells = resolution // factor
    return torch.stack([key // (cells * cells), (key // cells) % cells, key % cells], dim=1).to(torch.int32)


@torch.no_grad()
def surface_voxels(coords: torch.Tensor, values: torch.Tensor, resolution: int, level: float,
                   fill: float | torch.Tensor = _OUTSIDE) -> torch.Tensor:
    """``[M]`` bool: the voxels that can touch the ``level`` set when the empty voxels take ``fill``.

    ``coords [M, 3]`` (unique), ``values [M]``; ``fill`` a number or a coarse grid ``[G, G, G]`` (``G`` dividing
    ``resolution``; voxel ``v`` reads ``fill[v * G // resolution]``, outside the grid ``+1``), as
    :func:`model.pipeline.extract.sparse_sdf_to_mesh`'s ``fill``. A voxel is kept when its side of the level (value below
    it or not) differs from its own fill's side or from the side of one of its 26 neighbours (the neighbour's value,
    or its fill when empty). Every corner of a marching-cubes cell that crosses the level is kept, and a dropped
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


def dense_field_to_mesh(field: torch.Tensor | np.ndarray, level: float) -> trimesh.Trimesh:
    """Marching cubes (skimage, Lewiner) of a dense ``[R, R, R]`` field at ``level``, vertices in the unit cube
    (voxel ``i`` at ``(i + 0.5) / R - 0.5``), normals towards increasing values. An empty mesh when the level set
    is empty."""
    from skimage.measure import marching_cubes

    vol = field.detach().float().cpu().numpy() if isinstance(field, torch.Tensor) else np.asarray(field, np.float32)
    if vol.ndim != 3 or len(set(vol.shape)) != 1:
        raise ValueError(f"field must be a cube [R, R, R], got {vol.shape}")
    if not float(vol.min()) < level < float(vol.max()):
        return trimesh.Trimesh(np.zeros((0, 3)), np.zeros((0, 3), np.int64), process=False)
    verts, faces, _, _ = marching_cubes(vol, level)
    return trimesh.Trimesh((verts.astype(np.float64) + 0.5) / vol.shape[0] - 0.5, faces.astype(np.int64),
                           process=False)


def simplify_mesh(mesh: trimesh.Trimesh, faces: int) -> trimesh.Trimesh:
    """Quadric decimation to at most ``faces`` faces (trimesh; needs the ``fast_simplification`` package). Without
    that package, or when the mesh is already small enough, the mesh is returned unchanged (with a warning in the
    first case)."""
    faces = _positive_int("faces", faces)
    if len(mesh.faces) <= faces:
        return mesh
    try:
        out = mesh.simplify_quadric_decimation(face_count=faces)
    except (ImportError, ModuleNotFoundError) as exc:
        warnings.warn(f"simplification to {faces} faces skipped: trimesh's quadric decimation needs the "
                      f"fast_simplification package ({exc}); the mesh keeps its {len(mesh.faces)} faces",
                      RuntimeWarning, stacklevel=2)
        return mesh
    return out


# ---------------------------------------------------------------------------------------------------------------
# the cascade


class _DenseVelocity(nn.Module):
    """The dense DiT seen by :func:`model.flow.euler_sample`: the ``[C, R, R, R]`` latent as ``R^3`` tokens in
    raster order (x-major, z fastest), ``feats [R^3, C]``."""

    def __init__(self, dit: nn.Module):
        super().__init__()
        self.dit = dit

    def forward(self, x: SparseTensor, t, cond) -> SparseTensor:
        r, ch = self.dit.config.resolution, x.num_channels
        v = self.dit(x.feats.t().reshape(1, ch, r, r, r), t, cond)
        return x.replace(v.reshape(ch, -1).t())


#: Parts of each output resolution and interior mode.
_PARTS_512 = ("dense_vae", "dense_dit", "sparse_vae_512", "sparse_dit_512", "refiner")
_PARTS_1024 = ("sparse_vae_1024", "sparse_dit_1024")


def _default_device(device) -> torch.device:
    if device is None or device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} asked for but CUDA is not available")
    return dev


def _default_dtype(dtype, device: torch.device) -> torch.dtype:
    if dtype is None:
        return torch.float16 if device.type == "cuda" else torch.float32
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise TypeError(f"dtype must be a floating torch.dtype, got {dtype!r}")
    return dtype


def _level(level, values: torch.Tensor) -> float:
    """A configured iso level: the number, or the median of ``values`` for ``"median"``."""
    if level == "median":
        return float(values.float().median())
    return float(level)


def _randomise(module: nn.Module, generator: torch.Generator, std: float = 0.02) -> None:
    """Give the parameters a DiT initialisation leaves at zero (adaLN, output layers) small random values, so
    random-weight runs do not degenerate (zero velocity, constant outputs)."""
    with torch.no_grad():
        for p in module.parameters():
            if p.numel() and not bool(p.any()):
                noise = torch.randn(p.shape, generator=generator) * std
                p.copy_(noise.to(p.device, p.dtype))


class ImageToMesh:
    """Image -> mesh with the released Direct3D-S2 cascade (module docstring).

    Build with :meth:`from_pretrained` (released weights), :meth:`random` / :meth:`random_tiny` (random weights, for
    timing and smoke tests; the output is noise), or directly from modules: ``encoder``
    (:class:`~model.nets.conditioning.DinoV2Encoder`) and ``parts`` (``{part: module}`` as
    :func:`model.pipeline.pretrained.from_pretrained` returns; the 1024 parts may be missing for ``resolution=512`` only, the
    sign refiner ``refiner_1024`` is needed only for ``interior="refiner"``).

    ``pipe(image, resolution=1024, steps=None, guidance=None, seed=0, faces=None) -> trimesh.Trimesh``;
    :meth:`generate` takes the same arguments (and given latent coordinates) and returns a :class:`CascadeResult`
    with the per-stage time and peak GPU memory, also kept in ``pipe.last_result``.
    """

    def __init__(self, encoder: nn.Module, parts: Mapping[str, nn.Module], *, config: CascadeConfig | None = None,
                 device=None, dtype: torch.dtype | None = None, offload: bool = False, backend: str = "auto",
                 random_weights: bool = False):
        self.device = _default_device(device)
        self.dtype = _default_dtype(dtype, self.device)
        self.config = config or CascadeConfig()
        if not isinstance(self.config, CascadeConfig):
            raise TypeError(f"config must be a CascadeConfig, got {type(self.config).__name__}")
        self.offload = bool(offload) and self.device.type == "cuda"
        self.random_weights = random_weights
        missing = [p for p in _PARTS_512 if p not in parts]
        if missing:
            raise ValueError(f"parts is missing {missing} (needed at every resolution)")
        self.encoder = encoder.eval()
        self.parts = {name: module.eval() for name, module in parts.items()}
        if backend not in ("auto", "kernels", "reference"):
            raise ValueError(f"backend must be 'auto', 'kernels' or 'reference', got {backend!r}")
        self.backend = ("kernels" if self.device.type == "cuda" else "reference") if backend == "auto" else backend
        for name in ("sparse_dit_512", "sparse_dit_1024"):
            if name in self.parts:
                self.parts[name].set_mode(backend=self.backend)
        self._check_sizes()
        home = torch.device("cpu") if self.offload else self.device
        self.encoder.to(home)
        for name, module in self.parts.items():
            module.to(device=home, dtype=self.dtype)
        self.last_result: CascadeResult | None = None

    # ---------------------------------------------------------------------------------------------------------
    # construction

    def _check_sizes(self) -> None:
        p = self.parts
        dvae, ddit, vae5, dit5, ref = (p[n] for n in _PARTS_512)
        cond = int(self.encoder.channels)
        checks = [
            (ddit.config.resolution == dvae.config.latent_resolution,
             f"dense_dit resolution {ddit.config.resolution} != dense_vae latent side {dvae.config.latent_resolution}"),
            (ddit.config.in_channels == dvae.config.latent_channels,
             f"dense_dit in_channels {ddit.config.in_channels} != dense_vae latent channels "
             f"{dvae.config.latent_channels}"),
            (dvae.config.resolution == dit5.config.resolution,
             f"dense_vae occupancy side {dvae.config.resolution} != sparse_dit_512 latent side "
             f"{dit5.config.resolution}"),
            (dit5.config.in_channels == vae5.config.latent_channels,
             f"sparse_dit_512 in_channels {dit5.config.in_channels} != sparse_vae_512 latent channels "
             f"{vae5.config.latent_channels}"),
            (ref.config.resolution == dit5.config.resolution * vae5.config.downsample_factor,
             f"refiner grid {ref.config.resolution} != the 512 stage's SDF side "
             f"{dit5.config.resolution * vae5.config.downsample_factor}"),
            (ref.config.feature_channels == vae5.config.decoder_channels[-1],
             f"refiner reads {ref.config.feature_channels} features but sparse_vae_512 gives "
             f"{vae5.config.decoder_channels[-1]}"),
        ]
        dits = [ddit, dit5]
        if "sparse_dit_1024" in p or "sparse_vae_1024" in p:
            if not all(n in p for n in _PARTS_1024):
                raise ValueError(f"give both {_PARTS_1024} or neither")
            vae1, dit1 = p["sparse_vae_1024"], p["sparse_dit_1024"]
            dits.append(dit1)
            checks.append((dit1.config.in_channels == vae1.config.latent_channels,
                           f"sparse_dit_1024 in_channels {dit1.config.in_channels} != sparse_vae_1024 latent "
                           f"channels {vae1.config.latent_channels}"))
            if "refiner_1024" in p:
                side = dit1.config.resolution * vae1.config.downsample_factor
                checks.append((2 * p["refiner_1024"].config.resolution == side,
                               f"refiner_1024 grid {p['refiner_1024'].config.resolution} is not half the 1024 "
                               f"stage's SDF side {side}"))
        for dit in dits:
            checks.append((dit.config.cond_channels == cond,
                           f"a DiT expects {dit.config.cond_channels} condition channels, the encoder gives {cond}"))
        problems = [msg for ok, msg in checks if not ok]
        if problems:
            raise ValueError("the parts do not fit together: " + "; ".join(problems))

    @classmethod
    def from_pretrained(cls, path_or_id=None, *, device=None, dtype: torch.dtype | None = None,
                        encoder: str | os.PathLike | nn.Module | None = "facebook/dinov2-with-registers-large",
                        resolution: int = 1024, config: CascadeConfig | None = None, offload: bool = False,
                        backend: str = "auto", **hub_kwargs) -> "ImageToMesh":
        """The released weights (:func:`model.pipeline.pretrained.from_pretrained`: a released folder or a model hub id,
        default :data:`model.pipeline.pretrained.DEFAULT_HUB_ID`), cast to ``dtype`` (default float16 on CUDA, as released,
        float32 on the CPU).

        ``encoder``: DINOv2-with-registers ViT-L/14 weights in the ``transformers`` format (folder or hub id; the
        released checkpoints do not hold them), a :class:`~model.nets.conditioning.DinoV2Encoder`, or ``"random"`` for a
        seeded random encoder (loud warning; the output is then noise). ``resolution=512`` loads only the parts
        the 512 output needs; ``config.interior`` other than ``"refiner"`` skips the sign refiner. ``hub_kwargs``
        go to the loader (``subfolder``, ``revision``, ``cache_dir``, ``local_files_only``).
        """
        from model.nets.conditioning import DinoV2Encoder
        from model.pipeline.pretrained import DEFAULT_HUB_ID, from_pretrained

        if resolution not in RESOLUTIONS:
            raise ValueError(f"resolution must be one of {RESOLUTIONS}, got {resolution!r}")
        config = config or CascadeConfig()
        dev = _default_device(device)
        dt = _default_dtype(dtype, dev)
        parts = list(_PARTS_512)
        if resolution == 1024:
            parts += list(_PARTS_1024)
            if config.interior == "refiner":
                parts.append("refiner_1024")
        load_to = "cpu" if offload and dev.type == "cuda" else dev
        released = from_pretrained(path_or_id or DEFAULT_HUB_ID, parts=parts, device=load_to, dtype=dt, **hub_kwargs)
        if encoder is None:
            raise ValueError("encoder: give DINOv2-with-registers weights (folder or hub id) or 'random'")
        if isinstance(encoder, nn.Module):
            enc = encoder
        elif str(encoder) == "random":
            enc = DinoV2Encoder.random()
        else:
            try:
                enc = DinoV2Encoder.from_pretrained(encoder)
            except Exception as exc:  # OSError (offline, unknown id), ValueError (wrong format)
                raise ValueError(f"encoder: cannot load DINOv2-with-registers weights from {os.fspath(encoder)!r} "
                                 f"({type(exc).__name__}: {exc}); pass a local folder in the transformers format, "
                                 "or 'random' for a random encoder (noise output)") from exc
        random_encoder = bool(getattr(enc, "random_weights", False))
        return cls(enc, dict(released), config=config, device=dev, dtype=dt, offload=offload, backend=backend,
                   random_weights=random_encoder)

    @classmethod
    def random(cls, size: str = "tiny", *, seed: int = 0, device=None, dtype: torch.dtype | None = None,
               config: CascadeConfig | None = None, offload: bool = False, backend: str = "auto") -> "ImageToMesh":
        """Every part with random weights (seeded; zero-initialised layers get small random values): ``size``
        ``"tiny"`` (a few hundred thousand parameters: 8^3 / 16^3 latent grids, 32^3 / 64^3 SDF grids, runs the whole
        cascade on a CPU in seconds; its default config extracts at the fields' medians, so every stage has a
        surface) or ``"released"`` (the released sizes and levels, ViT-L/14 encoder included: ~2.5 B parameters, for
        GPU timing). Warns loudly: the output is noise."""
        from model.nets.conditioning import DinoV2Encoder, dinov2_vitl14_reg_config, tiny_dinov2_config
        from model.nets.dense import DenseDiT, DenseDiTConfig, DenseVAEConfig
        from model.nets.dit import DiTConfig, SparseDiT
        from model.nets.refiner import RefinerConfig, SignRefiner, VoxelRefiner
        from model.nets.vae import SparseSDFVAE, VAEConfig

        if size not in ("tiny", "released"):
            raise ValueError(f"size must be 'tiny' or 'released', got {size!r}")
        dev = _default_device(device)
        if size == "tiny":
            tiny_refiner = dict(resolution=32, patch_size=16, patch_stride=8)
            configs = {
                "dense_vae": DenseVAEConfig.tiny(resolution=8, encoder_channels=(4, 8), decoder_channels=(8, 4)),
                "dense_dit": DenseDiTConfig.tiny(resolution=4, cond_channels=32),
                "sparse_vae_512": VAEConfig.tiny(conv_channels=(8, 16, 16), prune="none", resolution=32),
                "sparse_dit_512": DiTConfig.tiny(resolution=8),
                "sparse_vae_1024": VAEConfig.tiny(conv_channels=(8, 16, 16), prune="none", resolution=64),
                "sparse_dit_1024": DiTConfig.tiny(resolution=16, pos_factor=0.5),
                "refiner": RefinerConfig.tiny(**tiny_refiner),
                "refiner_1024": RefinerConfig.tiny(**tiny_refiner),
            }
            enc_config = tiny_dinov2_config()
            # keep the released proportions: the token band is half a latent cell, the chunks cover 8 cells
            config = config or CascadeConfig(token_band=2.0, decode_chunks_512=1, decode_chunks_1024=2,
                                             level_512="median", level_1024="median")
        else:
            configs = {
                "dense_vae": DenseVAEConfig.released(),
                "dense_dit": DenseDiTConfig.released(),
                "sparse_vae_512": VAEConfig.released_512(prune="none"),
                "sparse_dit_512": DiTConfig.released_512(),
                "sparse_vae_1024": VAEConfig.released_1024(prune="none"),
                "sparse_dit_1024": DiTConfig.released_1024(),
                "refiner": RefinerConfig.released_512(),
                "refiner_1024": RefinerConfig.released_1024(),
            }
            enc_config = dinov2_vitl14_reg_config()
        classes = {"dense_vae": DenseShapeVAE, "dense_dit": DenseDiT, "sparse_vae_512": SparseSDFVAE,
                   "sparse_dit_512": SparseDiT, "sparse_vae_1024": SparseSDFVAE, "sparse_dit_1024": SparseDiT,
                   "refiner": VoxelRefiner, "refiner_1024": SignRefiner}
        warnings.warn(f"ImageToMesh.random({size!r}): every part has RANDOM weights; the output is noise (for tests "
                      "and timing only)", UserWarning, stacklevel=2)
        dt = _default_dtype(dtype, dev)
        home = torch.device("cpu") if offload else dev
        parts = {}
        gen = torch.Generator().manual_seed(int(seed))
        with torch.random.fork_rng(devices=[dev] if dev.type == "cuda" else []):
            torch.manual_seed(int(seed))
            if dev.type == "cuda":
                torch.cuda.manual_seed(int(seed))
            for name, cfg in configs.items():
                with dev:  # initialised where it runs (fast on a GPU), then cast and sent home one by one
                    module = classes[name](cfg)
                _randomise(module, gen)
                parts[name] = module.to(device=home, dtype=dt)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # said once above
            encoder = DinoV2Encoder.random(enc_config, seed=int(seed))
        return cls(encoder, parts, config=config, device=dev, dtype=dt, offload=offload, backend=backend,
                   random_weights=True)

    @classmethod
    def random_tiny(cls, **kwargs) -> "ImageToMesh":
        """:meth:`random` with ``size="tiny"``."""
        return cls.random("tiny", **kwargs)

    # ---------------------------------------------------------------------------------------------------------
    # running

    @contextlib.contextmanager
    def _on_device(self, *modules: nn.Module):
        """With ``offload``, the modules sit on the device only inside the block."""
        if not self.offload:
            yield
            return
        for m in modules:
            m.to(self.device)
        try:
            yield
        finally:
            for m in modules:
                m.to("cpu")
            torch.cuda.empty_cache()

    def _steps(self, steps) -> dict[str, int]:
        cfg = self.config
        out = {"dense": cfg.steps_dense, "512": cfg.steps_512, "1024": cfg.steps_1024}
        if steps is None:
            return out
        if isinstance(steps, Mapping):
            unknown = sorted(set(map(str, steps)) - set(out))
            if unknown:
                raise ValueError(f"steps has unknown stages {unknown}; known: {sorted(out)}")
            for k, v in steps.items():
                if v is not None:
                    out[str(k)] = _positive_int(f"steps[{k!r}]", v)
            return out
        n = _positive_int("steps", steps)
        return {k: n for k in out}

    def _sample(self, model: nn.Module, x: SparseTensor, cond, *, steps: int, guidance: float, shift: float,
                generator: torch.Generator, rec: StageRecord, desc: str, progress: bool) -> SparseTensor:
        """Euler sampling on ``x``'s coordinates with noise from ``generator``; per-step times go to ``rec``."""
        noise = torch.randn(x.feats.shape, generator=generator)
        bar = None
        if progress:
            from tqdm.auto import tqdm

            bar = tqdm(total=steps, desc=desc, unit="step", leave=False)
        times: list[float] = []
        t_prev = [time.perf_counter()]

        def callback(step, sigma, latent):
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
            now = time.perf_counter()
            times.append(now - t_prev[0])
            t_prev[0] = now
            if bar is not None:
                bar.update(1)

        try:
            z = euler_sample(model, x, cond, steps=steps, guidance=guidance, shift=shift, noise=noise,
                             callback=callback)
        finally:
            if bar is not None:
                bar.close()
        rec.info.update(steps=steps, step_seconds=times, guidance=guidance, shift=shift)
        return z

    def _sparse_condition(self, dit, tokens: torch.Tensor, mask: torch.Tensor) -> Condition:
        from model.nets.conditioning import sparse_condition

        if dit.config.sparse_conditions:  # v1.0
            cond = sparse_condition(tokens, mask.unsqueeze(0).to(tokens.device),
                                    patch_size=self.encoder.patch_size, num_prefix=self.encoder.num_prefix_tokens)
        else:
            cond = Condition(tokens)
        return cond.to(self.device, self.dtype)

    def _sparse_stage(self, name: str, coords: torch.Tensor, cond_tokens, mask, *, steps, guidance, shift,
                      generator, recorder: _Recorder, progress: bool) -> SparseTensor:
        dit = self.parts[f"sparse_dit_{name}"]
        cfg = dit.config
        with recorder.stage(f"sparse_{name}") as rec, self._on_device(dit):
            c = to_layout_order(coords.to(self.device), compression_block=cfg.compression_block,
                                selection_block=cfg.selection_block)
            if int(c[:, 1:].max()) >= cfg.resolution:
                raise ValueError(f"coords_{name}: coordinates reach {int(c[:, 1:].max())}, outside the "
                                 f"{cfg.resolution}^3 latent grid of sparse_dit_{name}")
            x = SparseTensor(c, torch.zeros(c.shape[0], cfg.in_channels, device=self.device, dtype=self.dtype),
                             resolution=cfg.resolution)
            cond = self._sparse_condition(dit, cond_tokens, mask)
            z = self._sample(dit, x, cond, steps=steps, guidance=guidance, shift=shift, generator=generator,
                             rec=rec, desc=f"sparse {name}", progress=progress)
            rec.info["tokens"] = int(c.shape[0])
        return z

    @torch.no_grad()
    def generate(self, image, *, resolution: int = 1024, steps=None, guidance: float | None = None, seed: int = 0,
                 faces: int | None = None, coords_512: torch.Tensor | None = None,
                 coords_1024: torch.Tensor | None = None, run_dense: bool | None = None,
                 progress: bool = False) -> CascadeResult:
        """Run the cascade on one image (module docstring).

        Args:
            image: a path, ``PIL.Image`` or uint8 array: RGBA, or RGB on a uniform background (:func:`load_rgba`).
            resolution: 1024 (default, the whole cascade) or 512 (stop after the 512 stage).
            steps: Euler steps: one int for every stage, or ``{"dense": n, "512": n, "1024": n}`` (missing stages
                keep the config's, by default the released 50 / 30 / 15).
            guidance: classifier-free guidance scale of every stage (default the config's, released 7).
            seed: seeds the noise of all stages (one CPU generator, drawn stage after stage).
            faces: simplify the final mesh to at most this many faces (:func:`simplify_mesh`).
            coords_512 / coords_1024: latent voxels ``[N, 3]`` (or ``[N, 4]`` with batch 0) to use instead of the
                dense stage's / the revoxelised 512 mesh's (the stages that make them are then skipped; with
                ``run_dense=True`` the dense stage still runs, e.g. to time it, and its voxels are replaced).
            progress: tqdm bars for the sampling stages.

        Returns a :class:`CascadeResult` (also kept in ``self.last_result``). Raises :class:`EmptyStageError` when a
        stage gives nothing to continue from (no occupied voxel; no 512 surface when the 1024 stage needs it).
        """
        if resolution not in RESOLUTIONS:
            raise ValueError(f"resolution must be one of {RESOLUTIONS}, got {resolution!r}")
        if resolution == 1024 and not all(n in self.parts for n in _PARTS_1024):
            raise ValueError("resolution=1024 needs the sparse_vae_1024 and sparse_dit_1024 parts (loaded with "
                             "resolution=512?)")
        if resolution == 1024 and self.config.interior == "refiner" and "refiner_1024" not in self.parts:
            raise ValueError("interior='refiner' needs the refiner_1024 part")
        if faces is not None:
            _positive_int("faces", faces)
        if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)):
            raise ValueError(f"seed must be an int, got {seed!r}")
        step = self._steps(steps)
        cfg = self.config
        guidance = cfg.guidance if guidance is None else guidance
        if not (isinstance(guidance, (int, float)) and math.isfinite(guidance) and guidance >= 0):
            raise ValueError(f"guidance must be a finite number >= 0, got {guidance!r}")
        given = {}
        for name, value in (("coords_512", coords_512), ("coords_1024", coords_1024)):
            if value is not None:
                if not isinstance(value, torch.Tensor) or value.dim() != 2 or value.shape[1] not in (3, 4) \
                        or value.dtype.is_floating_point or value.shape[0] == 0:
                    raise ValueError(f"{name} must be a non-empty integer tensor [N, 3] or [N, 4]")
                given[name] = value[:, -3:]
        run_dense = coords_512 is None if run_dense is None else bool(run_dense)
        if not run_dense and coords_512 is None:
            raise ValueError("run_dense=False needs coords_512 (the 512 stage's latent voxels)")
        recorder = _Recorder(self.device)
        generator = torch.Generator().manual_seed(int(seed))
        p = self.parts

        # 1. condition ----------------------------------------------------------------------------------------
        from model.nets.conditioning import preprocess_image

        rgba = load_rgba(image)
        with recorder.stage("condition") as rec, self._on_device(self.encoder):
            pre = preprocess_image(rgba, size=self.encoder.image_size)
            tokens = self.encoder(pre.rgb.unsqueeze(0).to(self.device))  # [1, T, C] float32
            rec.info["condition_tokens"] = int(tokens.shape[1])

        # 2. dense structure ----------------------------------------------------------------------------------
        if run_dense:
            dvae, ddit = p["dense_vae"], p["dense_dit"]
            with recorder.stage("dense") as rec, self._on_device(dvae, ddit):
                r, ch = ddit.config.resolution, ddit.config.in_channels
                axis = torch.arange(r, device=self.device)
                grid = torch.stack(torch.meshgrid(axis, axis, axis, indexing="ij"), -1).reshape(-1, 3)
                x = SparseTensor(torch.cat([torch.zeros_like(grid[:, :1]), grid], 1),
                                 torch.zeros(r**3, ch, device=self.device, dtype=self.dtype), resolution=r)
                z = self._sample(_DenseVelocity(ddit), x, Condition(tokens.to(self.dtype)), steps=step["dense"],
                                 guidance=guidance, shift=cfg.shift_dense, generator=generator, rec=rec,
                                 desc="dense", progress=progress)
                logits = dvae.decode(z.feats.t().reshape(1, ch, r, r, r).to(self.dtype))
                occupied = DenseShapeVAE.occupied_voxels(logits, cfg.occupancy_threshold)[:, 1:]
                rec.info["occupied_voxels"] = int(occupied.shape[0])
                del logits, z, x
            if "coords_512" in given:
                rec.info["replaced_by_given_coords"] = True
            elif occupied.shape[0] == 0:
                raise EmptyStageError(f"the dense stage found no occupied voxel (sigmoid(logit) >= "
                                      f"{cfg.occupancy_threshold}): nothing to generate")
        coords_a = given.get("coords_512", occupied if run_dense else None)

        # 3. sparse 512 ---------------------------------------------------------------------------------------
        z = self._sparse_stage("512", coords_a, tokens, pre.mask, steps=step["512"], guidance=guidance,
                               shift=cfg.shift_512, generator=generator, recorder=recorder, progress=progress)
        coords_out = {"512": z.coords.cpu()}
        vae5, ref = p["sparse_vae_512"], p["refiner"]
        from model.pipeline.pretrained import decode_chunked
        from model.nets.refiner import predict_sign, refine_512

        with recorder.stage("decode_512") as rec, self._on_device(vae5):
            sdf, feats = decode_chunked(vae5, z.replace(z.feats.to(self.dtype)), cfg.decode_chunks_512)
            rec.info.update(voxels=sdf.num_voxels, chunks=cfg.decode_chunks_512)
        del z
        with recorder.stage("refine_512") as rec, self._on_device(ref):
            field_512 = refine_512(ref, sdf.coords[:, 1:], sdf.feats[:, 0], feats.feats, dtype=self.dtype)
            del sdf, feats
            level_512 = _level(cfg.level_512, field_512)
            mesh_512 = dense_field_to_mesh(field_512, level_512)
            del field_512
            rec.info.update(level=level_512, faces=len(mesh_512.faces), grid=ref.config.resolution)
        needs_512 = resolution == 512 or "coords_1024" not in given
        if len(mesh_512.faces) == 0:
            if needs_512:
                raise EmptyStageError(f"the 512 refiner's field has no surface at level {level_512}")
            warnings.warn(f"the 512 stage has no surface at level {level_512} (given coords_1024 are used)",
                          RuntimeWarning, stacklevel=3)
        mesh = mesh_512

        if resolution == 1024:
            vae1, dit1 = p["sparse_vae_1024"], p["sparse_dit_1024"]
            side = dit1.config.resolution * vae1.config.downsample_factor
            # 4. revoxelise -----------------------------------------------------------------------------------
            if "coords_1024" in given:
                coords_b = given["coords_1024"]
            else:
                with recorder.stage("revoxelise") as rec:
                    coords_b = mesh_to_latent_coords(mesh_512, resolution=side,
                                                     factor=vae1.config.downsample_factor, band=cfg.token_band,
                                                     margin=cfg.mesh_margin, spacing=cfg.sample_spacing,
                                                     device=self.device)
                    rec.info.update(tokens=int(coords_b.shape[0]), mesh_faces=len(mesh_512.faces))
            # 5. sparse 1024 ----------------------------------------------------------------------------------
            z = self._sparse_stage("1024", coords_b, tokens, pre.mask, steps=step["1024"], guidance=guidance,
                                   shift=cfg.shift_1024, generator=generator, recorder=recorder, progress=progress)
            coords_out["1024"] = z.coords.cpu()
            with recorder.stage("decode_1024") as rec, self._on_device(vae1):
                sdf, _ = decode_chunked(vae1, z.replace(z.feats.to(self.dtype)), cfg.decode_chunks_1024,
                                        features=False)
                rec.info.update(voxels=sdf.num_voxels, chunks=cfg.decode_chunks_1024)
            del z
            fine, values = sdf.coords[:, 1:], sdf.feats[:, 0]
            del sdf
            level_1024 = _level(cfg.level_1024, values)
            # 6. interior and extraction ----------------------------------------------------------------------
            fill: Any = _OUTSIDE
            if cfg.interior == "refiner":
                sign_ref = p["refiner_1024"]
                with recorder.stage("refine_1024") as rec, self._on_device(sign_ref):
                    fill = predict_sign(sign_ref, fine, values, side, dtype=self.dtype)
                    rec.info.update(grid=sign_ref.config.resolution, inside_share=float((fill < 0).float().mean()))
            elif cfg.interior == "components":
                fill = "sign"
            with recorder.stage("extract") as rec:
                if isinstance(fill, str):
                    keep_c, keep_v = fine, values
                else:
                    keep = surface_voxels(fine, values.float(), side, level_1024, fill)
                    keep_c, keep_v = fine[keep], values[keep]
                    rec.info["kept_voxels"] = int(keep_c.shape[0])
                del fine, values
                from model.pipeline.extract import sparse_sdf_to_mesh

                fill_arg = fill.cpu().numpy() if isinstance(fill, torch.Tensor) else fill
                mesh = sparse_sdf_to_mesh(keep_c.cpu().numpy(), keep_v.float().cpu().numpy(), side,
                                          level=level_1024, fill=fill_arg, progress=progress)
                rec.info.update(level=level_1024, faces=len(mesh.faces), interior=cfg.interior)
            if len(mesh.faces) == 0:
                warnings.warn(f"the 1024 stage has no surface at level {level_1024}: the mesh is empty",
                              RuntimeWarning, stacklevel=3)

        # 7. simplification -----------------------------------------------------------------------------------
        if faces is not None and len(mesh.faces) > faces:
            with recorder.stage("simplify") as rec:
                before = len(mesh.faces)
                mesh = simplify_mesh(mesh, faces)
                rec.info.update(faces_before=before, faces=len(mesh.faces))
        settings = dict(resolution=resolution, steps=step, guidance=guidance, seed=int(seed), faces=faces,
                        dtype=str(self.dtype).replace("torch.", ""), device=str(self.device), offload=self.offload,
                        backend=self.backend, interior=cfg.interior, random_weights=self.random_weights,
                        given_coords=sorted(given))
        result = CascadeResult(mesh=mesh, mesh_512=mesh_512, coords=coords_out, stages=recorder.records,
                               image=pre, settings=settings)
        self.last_result = result
        return result

    def __call__(self, image, *, resolution: int = 1024, steps=None, guidance: float | None = None, seed: int = 0,
                 faces: int | None = None, **kwargs) -> trimesh.Trimesh:
        """The mesh of :meth:`generate` (same arguments)."""
        return self.generate(image, resolution=resolution, steps=steps, guidance=guidance, seed=seed, faces=faces,
                             **kwargs).mesh
