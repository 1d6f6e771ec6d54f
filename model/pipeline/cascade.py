"""Image to mesh: the released Direct3D-S2 cascade end to end (RELEASED_MODEL.md A.3, C, E.5, E.6).

:class:`ImageToMesh` holds the eight released parts plus the image encoder and runs, for one image:

1. **condition**: the object mask (alpha of an RGBA image, or the uniform background of an RGB image,
   :func:`model.pipeline.images.load_rgba`), the released preprocessing and the DINOv2 encoder
   (:mod:`model.nets.conditioning`); one set of image tokens serves every DiT (the released dense and sparse encoders
   are the same network).
2. **dense** (structure): the dense DiT samples the ``[8, 16, 16, 16]`` latent (50 Euler steps, shift 6, guidance
   7), the dense VAE decodes it to ``64^3`` occupancy logits, and ``sigmoid >= 0.1`` gives the occupied voxels: the
   512 stage's latent tokens at ``64^3``.
3. **sparse_512**: the sparse DiT samples 16 channels per token (30 steps, shift 6, guidance 7); **decode_512**:
   the sparse VAE decodes every child of every token (the SDF on the 512^3 grid and the decoder's 32 features);
   **refine_512**: the 512 refiner predicts the whole 512^3 field (:func:`model.nets.refiner.refine_512`) and marching
   cubes at level 0.4 gives the 512 mesh (the output when ``resolution=512``).
4. **revoxelise**: the 512 mesh, normalised (bounding-box centre, largest side 0.95 of the unit cube), gives the
   1024 stage's tokens: the 128^3 cells holding a point of the 1024^3 grid within 4 voxels of the surface
   (:func:`model.pipeline.geometry.mesh_to_latent_coords`), in the SSA layout order.
5. **sparse_1024** (15 steps, shift 8, guidance 7) and **decode_1024** (in spatial chunks,
   :func:`model.pipeline.pretrained.decode_chunked`; the decoder features are not kept); **refine_1024**: the sign
   refiner's inside/outside grid at 512^3 (:func:`model.nets.refiner.predict_sign`).
6. **extract**: marching cubes at level 0.2 on the decoded sparse SDF whose empty voxels take the sign grid's value
   (the released field ``|SDF| * sign`` with the decoded values kept), brick by brick without a dense 1024^3 array
   (:func:`model.pipeline.extract.sparse_sdf_to_mesh` with a fill grid; on the CPU without the voxels that cannot
   touch the level set, :func:`model.pipeline.geometry.surface_voxels`, which changes no triangle).
7. **simplify** (optional): quadric decimation (``fast-simplification``) to a face budget (``faces=``) or by a
   share of the faces (``simplify_ratio=``; the released ``remesh`` post-processing removes 95%).

Every sparse stage puts its tokens in the SSA layout order once (:func:`ssa_kernels.layout_order`), draws its noise in
that order, and samples on one :class:`~model.sparse.tensor.SparseTensor` whose coordinate cache holds the block
layout (built once per stage, shared by all steps and both guidance passes). One CPU generator seeded with ``seed``
draws the noise of the three stages in turn (as released, from the caller's generator). Each stage's wall time and
peak GPU memory (``torch.cuda.max_memory_allocated`` since the stage began) are recorded (``result.stages``);
``offload=True`` keeps the parts on the CPU and lends each stage's to the GPU while it runs.

Meshes are in the unit cube ``[-0.5, 0.5]^3`` (voxel ``i`` at ``(i + 0.5) / R - 0.5``; released: ``i / R * 2 - 1``,
twice as large, half a voxel apart); the 1024 mesh in the frame of the normalised 512 mesh, as released.
Assumptions where RELEASED_MODEL.md leaves a choice open (each one is a constant or option here):

- The distance band that picks the 1024 tokens is measured to dense samples of the 512 mesh (spacing 0.5 voxel of
  the 1024 grid, so every distance is within 0.3 voxel of the exact point-triangle distance the released CUDA
  extension computes) instead of to the triangles.
- ``interior="refiner"`` (default, released ``remove_interior=True``) fills empty voxels from the sign refiner;
  ``"keep"`` (``remove_interior=False``) fills them with +1, which leaves the inner shell; ``"components"`` uses
  our per-brick component rule of :mod:`model.pipeline.extract` instead of the network. Surfaces made only of filled
  voxels (a sign flip of the refiner away from every decoded voxel, which the released dense field would turn into
  a floating surface) are not extracted.
- ``faces=None`` and ``simplify_ratio=None`` (default) do not simplify, as released (its ``simplify_ratio`` 0.95
  acts only with ``remesh``, off by default).
- The sparse VAEs decode in spatial chunks (as many per axis as keep each under a token budget; the released 512
  VAE decodes in one pass): same values, less memory.

Module map: images in :mod:`model.pipeline.images`, the mesh <-> voxel geometry in :mod:`model.pipeline.geometry`,
random weights in :mod:`model.pipeline.random_weights`, stage timings in :mod:`model.pipeline.records`; here the
cascade (its settings, its result, one method per stage).
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

from model.flow import RELEASED_SHIFT, euler_sample
from model.nets.dense import OCCUPANCY_THRESHOLD, DenseShapeVAE, DenseTokenVelocity
from model.nets.dit import Condition
from model.pipeline.checks import default_device, default_dtype, nonnegative_number, part_dtype, positive_int
from model.pipeline.geometry import (
    MESH_MARGIN,
    OUTSIDE,
    SAMPLE_SPACING,
    TOKEN_BAND,
    dense_field_to_mesh,
    mesh_to_latent_coords,
    simplify_mesh,
    surface_voxels,
    to_layout_order,
)
from model.pipeline.images import load_rgba
from model.pipeline.random_weights import RANDOM_CONFIG, RANDOM_SIZES, random_parts, random_size
from model.pipeline.records import StageRecord, StageRecorder
from model.sparse.tensor import SparseTensor

__all__ = [
    "CascadeConfig",
    "CascadeResult",
    "DEFAULT_ENCODER",
    "EmptyStageError",
    "ImageToMesh",
    "INTERIOR_MODES",
    "RELEASED_GUIDANCE",
    "RELEASED_STEPS",
    "RESOLUTIONS",
    "STAGES",
]

#: Released Euler steps per stage (RELEASED_MODEL.md A.3).
RELEASED_STEPS = {"dense": 50, "512": 30, "1024": 15}
#: Released classifier-free guidance scale (every stage).
RELEASED_GUIDANCE = 7.0
#: Iso level of the 512 mesh on the 512 refiner's output (2 x the pipeline's mc_threshold 0.2).
LEVEL_512 = 0.4
#: Iso level of the 1024 mesh on the sign-refined sparse SDF (the pipeline's mc_threshold).
LEVEL_1024 = 0.2
#: Spatial chunks per axis of the sparse VAE decoders, or "auto": the fewest whose largest holds at most
#: :data:`model.pipeline.pretrained.DECODE_CHUNK_TOKENS` tokens (fewer chunks synchronise with the host less often).
DECODE_CHUNKS = "auto"
#: Output resolutions.
RESOLUTIONS = (512, 1024)
#: How the empty voxels of the 1024 field are filled (module docstring).
INTERIOR_MODES = ("refiner", "keep", "components")
#: Stage names, in order.
STAGES = ("condition", "dense", "sparse_512", "decode_512", "refine_512", "revoxelise", "sparse_1024",
          "decode_1024", "refine_1024", "extract", "simplify")
#: transformers checkpoint of DINOv2 ViT-L/14 with registers (the released image encoder's weights).
DEFAULT_ENCODER = "facebook/dinov2-with-registers-large"
#: Frames between a stage method's ``warnings.warn`` and the caller of :meth:`ImageToMesh.generate` (the stage
#: method, ``generate``, ``torch.no_grad``'s wrapper).
_WARN_CALLER = 4


class EmptyStageError(RuntimeError):
    """A stage produced nothing the next stage can use (no occupied voxel, no surface)."""


# ---------------------------------------------------------------------------------------------------------------
# configuration and results


@dataclass(frozen=True)
class CascadeConfig:
    """Sampling and extraction settings of :class:`ImageToMesh` (defaults: the released pipeline's).

    ``steps_*``, ``guidance``, ``shift_*``: Euler steps, guidance scale and timestep shift per stage;
    ``occupancy_threshold``: on the dense VAE's ``sigmoid(logit)``; ``level_512`` / ``level_1024``: iso levels, or
    ``"median"`` for the median of the field they cut (random weights: their fields have no meaningful level, the
    median always gives a surface);
    ``token_band`` (voxels of the 1024-stage grid), ``mesh_margin``, ``sample_spacing``: the revoxelisation
    (:func:`model.pipeline.geometry.mesh_to_latent_coords`); ``decode_chunks_*``: spatial chunks per axis of the
    sparse VAE decoders, a positive int or ``"auto"`` (:data:`DECODE_CHUNKS`); ``interior``: one of
    :data:`INTERIOR_MODES`.
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
    decode_chunks_512: int | str = DECODE_CHUNKS
    decode_chunks_1024: int | str = DECODE_CHUNKS
    interior: str = "refiner"

    def __post_init__(self):
        for name in ("steps_dense", "steps_512", "steps_1024"):
            positive_int(name, getattr(self, name))
        for name in ("decode_chunks_512", "decode_chunks_1024"):
            value = getattr(self, name)
            if value != "auto" and not (isinstance(value, int) and not isinstance(value, bool) and value >= 1):
                raise ValueError(f"{name} must be a positive int or 'auto', got {value!r}")
        nonnegative_number("guidance", self.guidance)
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


def _cascade_config(config, default: CascadeConfig) -> CascadeConfig:
    """``config`` as a :class:`CascadeConfig`: None gives ``default``, a mapping gives ``default`` with those fields
    replaced (e.g. ``{"interior": "keep"}``), a :class:`CascadeConfig` is used as is."""
    if config is None:
        return default
    if isinstance(config, CascadeConfig):
        return config
    if isinstance(config, Mapping):
        known = [f.name for f in dataclasses.fields(CascadeConfig)]
        unknown = sorted(set(map(str, config)) - set(known))
        if unknown:
            raise ValueError(f"config has unknown fields {unknown}; CascadeConfig fields: {known}")
        return default.replace(**config)
    raise TypeError(f"config must be a CascadeConfig or a mapping of its fields, got {type(config).__name__}")


@dataclass
class CascadeResult:
    """What :meth:`ImageToMesh.generate` returns: the final ``mesh``, the 512 stage's mesh ``mesh_512`` (None when
    it was not extracted), the latent ``coords`` of each sparse stage (``{"512": [N, 4], "1024": [M, 4]}`` int32 in
    layout order, on the CPU), the ``stages`` that ran (:class:`~model.pipeline.records.StageRecord` by name, in
    order), the preprocessed
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


@dataclass
class _Run:
    """What the stages of one :meth:`ImageToMesh.generate` call share: the stage ``recorder``, the noise
    ``generator`` (one, drawn stage after stage), the Euler ``steps`` per stage, the ``guidance`` scale, the
    ``given`` latent voxels (``{"coords_512" | "coords_1024": [N, 3]}``), whether to show tqdm bars, what the
    condition stage gives (the image ``tokens [1, T, C]`` and the preprocessed ``image``) and the latent ``coords``
    of each sparse stage (``{"512": [N, 4]}``, on the CPU)."""

    recorder: StageRecorder
    generator: torch.Generator
    steps: dict[str, int]
    guidance: float
    given: dict[str, torch.Tensor]
    progress: bool
    tokens: torch.Tensor | None = None
    image: Any = None
    coords: dict[str, torch.Tensor] = field(default_factory=dict)


# ---------------------------------------------------------------------------------------------------------------
# the cascade


#: Fewest dense steps for which the dense stage replays its guided step from a CUDA graph (capturing costs about
#: three steps).
DENSE_GRAPH_MIN_STEPS = 8

#: Parts of each output resolution and interior mode.
_PARTS_512 = ("dense_vae", "dense_dit", "sparse_vae_512", "sparse_dit_512", "refiner")
_PARTS_1024 = ("sparse_vae_1024", "sparse_dit_1024")


def _level(level, values: torch.Tensor) -> float:
    """A configured iso level: the number, or the median of ``values`` for ``"median"``."""
    if level == "median":
        return float(values.float().median())
    return float(level)


class ImageToMesh:
    """Image -> mesh with the released Direct3D-S2 cascade (module docstring).

    Build with :meth:`from_pretrained` (released weights, or ``"random:tiny"`` / ``"random:released"`` for random
    ones), :meth:`random` / :meth:`random_tiny` (random weights, for timing and smoke tests; the output is noise), or
    directly from modules: ``encoder`` (:class:`~model.nets.conditioning.DinoV2Encoder`) and ``parts``
    (``{part: module}`` as :func:`model.pipeline.pretrained.from_pretrained` returns; the 1024 parts may be missing
    for ``resolution=512`` only, the sign refiner ``refiner_1024`` is needed only for ``interior="refiner"``).
    ``config``: a :class:`CascadeConfig`, or a mapping of some of its fields (the rest keep their defaults).

    ``pipe(image, resolution=1024, steps=None, guidance=None, seed=0, faces=None) -> trimesh.Trimesh``;
    :meth:`generate` takes the same arguments (and given latent coordinates) and returns a :class:`CascadeResult`
    with the per-stage time and peak GPU memory, also kept in ``pipe.last_result``.
    """

    def __init__(self, encoder: nn.Module, parts: Mapping[str, nn.Module], *,
                 config: CascadeConfig | Mapping | None = None, device=None, dtype: torch.dtype | None = None,
                 offload: bool = False, backend: str = "auto", random_weights: bool = False):
        self.device = default_device(device)
        self.dtype = default_dtype(dtype, self.device)
        self.config = _cascade_config(config, CascadeConfig())
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
            module.to(device=home, dtype=part_dtype(name, self.dtype, self.device))
        if self.offload:
            from model.pipeline.offload import Offloader

            self._offloader = Offloader(self.device, [self.encoder, *self.parts.values()])
        self.last_result: CascadeResult | None = None
        self.profile_stages: set[str] = set()  # stages run under torch.profiler (model.pipeline.records)

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
                        encoder: str | os.PathLike | nn.Module | None = DEFAULT_ENCODER, resolution: int = 1024,
                        config: CascadeConfig | Mapping | None = None, offload: bool = False, backend: str = "auto",
                        seed: int = 0, **hub_kwargs) -> "ImageToMesh":
        """The released weights (:func:`model.pipeline.pretrained.from_pretrained`: a released folder or a model hub
        id, default :data:`model.pipeline.pretrained.DEFAULT_HUB_ID`), cast to ``dtype`` (default float16 on CUDA, as
        released, float32 on the CPU); or random weights for ``"random:tiny"`` / ``"random:released"``
        (:meth:`random` with that size and ``seed``; the output is noise).

        ``encoder``: DINOv2-with-registers ViT-L/14 weights in the ``transformers`` format (folder or hub id; the
        released checkpoints do not hold them), a :class:`~model.nets.conditioning.DinoV2Encoder`, or ``"random"``
        for a seeded random encoder (loud warning; the output is then noise). ``resolution=512`` loads only the parts
        the 512 output needs; ``config.interior`` other than ``"refiner"`` skips the sign refiner. ``hub_kwargs``
        go to the loader (``subfolder``, ``revision``, ``cache_dir``, ``local_files_only``). Random weights use
        neither ``encoder`` (theirs is random too) nor ``hub_kwargs`` (nothing is fetched), and build every part.

        Raises ``ValueError`` for ``"random:<size>"`` with an unknown size (naming the valid choices).
        """
        size = random_size(path_or_id)
        if size is not None:
            return cls.random(size, seed=seed, device=device, dtype=dtype, config=config, offload=offload,
                              backend=backend)
        from model.nets.conditioning import DinoV2Encoder
        from model.pipeline.pretrained import DEFAULT_HUB_ID, from_pretrained

        if resolution not in RESOLUTIONS:
            raise ValueError(f"resolution must be one of {RESOLUTIONS}, got {resolution!r}")
        config = _cascade_config(config, CascadeConfig())
        dev = default_device(device)
        dt = default_dtype(dtype, dev)
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
               config: CascadeConfig | Mapping | None = None, offload: bool = False,
               backend: str = "auto") -> "ImageToMesh":
        """Every part and the encoder with random weights (:func:`model.pipeline.random_weights.random_parts`,
        seeded with ``seed``; zero-initialised layers get small random values). Warns loudly: the output is noise.

        ``size``: ``"tiny"`` (a few hundred thousand parameters: 8^3 / 16^3 latent grids, 32^3 / 64^3 SDF grids, runs
        the whole cascade on a CPU in seconds; its default config extracts at the fields' medians, so every stage has
        a surface) or ``"released"`` (the released sizes and levels, ViT-L/14 encoder included: ~2.5 B parameters,
        for GPU timing). ``config``: a :class:`CascadeConfig`, or a mapping of fields that replace those of the
        size's default config (:data:`model.pipeline.random_weights.RANDOM_CONFIG`). The same pipeline comes from
        ``ImageToMesh.from_pretrained("random:<size>")``.
        """
        if size not in RANDOM_SIZES:
            raise ValueError(f"size must be one of {RANDOM_SIZES}, got {size!r}")
        dev = default_device(device)
        config = _cascade_config(config, CascadeConfig(**RANDOM_CONFIG[size]))
        warnings.warn(f"ImageToMesh.random({size!r}): every part has RANDOM weights; the output is noise (for tests "
                      "and timing only)", UserWarning, stacklevel=2)
        dt = default_dtype(dtype, dev)
        home = torch.device("cpu") if offload else dev
        encoder, parts = random_parts(size, seed=seed, device=dev, dtype=dt, home=home)
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
        with self._offloader.lend(*modules):  # pinned CPU weights, no copy back (model.pipeline.offload)
            yield

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
                    out[str(k)] = positive_int(f"steps[{k!r}]", v)
            return out
        n = positive_int("steps", steps)
        return {k: n for k in out}

    def _sample(self, model: nn.Module, x: SparseTensor, cond, *, steps: int, guidance: float, shift: float,
                generator: torch.Generator, rec: StageRecord, desc: str, progress: bool):
        """:func:`model.flow.euler_sample` with noise from ``generator``; per-step times go to ``rec``."""
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

    def _sparse_stage(self, name: str, coords: torch.Tensor, run: _Run) -> SparseTensor:
        """Stage **sparse_512** / **sparse_1024**: the tokens ``coords [N, 3]`` in the SSA layout order, sampled by
        the sparse DiT of the stage; returns the latent (``[N, C]`` features) and keeps its coordinates (CPU) in
        ``run.coords[name]``."""
        dit = self.parts[f"sparse_dit_{name}"]
        cfg = dit.config
        with run.recorder.stage(f"sparse_{name}") as rec, self._on_device(dit):
            c = to_layout_order(coords.to(self.device), compression_block=cfg.compression_block,
                                selection_block=cfg.selection_block)
            if int(c[:, 1:].max()) >= cfg.resolution:
                raise ValueError(f"coords_{name}: coordinates reach {int(c[:, 1:].max())}, outside the "
                                 f"{cfg.resolution}^3 latent grid of sparse_dit_{name}")
            x = SparseTensor(c, torch.zeros(c.shape[0], cfg.in_channels, device=self.device, dtype=self.dtype),
                             resolution=cfg.resolution)
            cond = self._sparse_condition(dit, run.tokens, run.image.mask)
            z = self._sample(dit, x, cond, steps=run.steps[name], guidance=run.guidance,
                             shift=getattr(self.config, f"shift_{name}"), generator=run.generator, rec=rec,
                             desc=f"sparse {name}", progress=run.progress)
            rec.info["tokens"] = int(c.shape[0])
        run.coords[name] = z.coords.cpu()
        return z

    def _condition(self, image, run: _Run):
        """Stage **condition**: the object mask (:func:`model.pipeline.images.load_rgba`), the released
        preprocessing and the encoder. Returns ``(preprocessed image, tokens [1, T, C] float32)``."""
        from model.nets.conditioning import preprocess_image

        rgba = load_rgba(image)
        with run.recorder.stage("condition") as rec, self._on_device(self.encoder):
            pre = preprocess_image(rgba, size=self.encoder.image_size)
            tokens = self.encoder(pre.rgb.unsqueeze(0).to(self.device))
            rec.info["condition_tokens"] = int(tokens.shape[1])
        return pre, tokens

    def _dense(self, run: _Run) -> torch.Tensor:
        """Stage **dense**: the dense DiT samples the ``[C, R, R, R]`` latent, the dense VAE decodes it to occupancy
        logits; returns the occupied voxels ``[N, 3]`` (the 512 stage's tokens). Raises :class:`EmptyStageError`
        when there is none, unless ``coords_512`` were given (they replace the dense stage's voxels)."""
        dvae, ddit = self.parts["dense_vae"], self.parts["dense_dit"]
        cfg = self.config
        with run.recorder.stage("dense") as rec, self._on_device(dvae, ddit):
            r, ch = ddit.config.resolution, ddit.config.in_channels
            axis = torch.arange(r, device=self.device)
            grid = torch.stack(torch.meshgrid(axis, axis, axis, indexing="ij"), -1).reshape(-1, 3)
            x = SparseTensor(torch.cat([torch.zeros_like(grid[:, :1]), grid], 1),
                             torch.zeros(r**3, ch, device=self.device, dtype=self.dtype), resolution=r)
            velocity = DenseTokenVelocity(ddit, cuda_graph=self.device.type == "cuda" and
                                      run.steps["dense"] >= DENSE_GRAPH_MIN_STEPS)
            z = self._sample(velocity, x, Condition(run.tokens.to(self.dtype)), steps=run.steps["dense"],
                             guidance=run.guidance, shift=cfg.shift_dense, generator=run.generator, rec=rec,
                             desc="dense", progress=run.progress)
            logits = dvae.decode(z.feats.t().reshape(1, ch, r, r, r).to(self.dtype))
            occupied = DenseShapeVAE.occupied_voxels(logits, cfg.occupancy_threshold)[:, 1:]
            rec.info["occupied_voxels"] = int(occupied.shape[0])
            del logits, z, x
        if "coords_512" in run.given:
            rec.info["replaced_by_given_coords"] = True
        elif occupied.shape[0] == 0:
            raise EmptyStageError(f"the dense stage found no occupied voxel (sigmoid(logit) >= "
                                  f"{cfg.occupancy_threshold}): nothing to generate")
        return occupied

    def _decode(self, name: str, z: SparseTensor, run: _Run, *, features: bool = True):
        """Stage **decode_512** / **decode_1024**: the sparse VAE of the stage decodes every child of every token
        in spatial chunks (:func:`model.pipeline.pretrained.decode_chunked`); returns ``(sdf [M, 1], decoder
        features [M, C0] or None)``."""
        from model.pipeline.pretrained import decode_chunk_count, decode_chunked

        vae = self.parts[f"sparse_vae_{name}"]
        chunks = getattr(self.config, f"decode_chunks_{name}")
        with run.recorder.stage(f"decode_{name}") as rec, self._on_device(vae):
            if chunks == "auto":
                chunks = decode_chunk_count(z.coords, z.resolution)
            sdf, feats = decode_chunked(vae, z.replace(z.feats.to(self.dtype)), chunks, features=features,
                                        progress=run.progress, desc=f"decode {name}")
            rec.info.update(voxels=sdf.num_voxels, chunks=chunks)
        return sdf, feats

    def _stage_512(self, coords: torch.Tensor, resolution: int, run: _Run) -> trimesh.Trimesh:
        """Stages **sparse_512**, **decode_512** and **refine_512** on the tokens ``coords [N, 3]``: the 512
        refiner's whole field and its marching-cubes mesh. Raises :class:`EmptyStageError` when the mesh is empty
        and needed (the output, or the revoxelisation); warns when given ``coords_1024`` make it unneeded."""
        from model.nets.refiner import refine_512

        z = self._sparse_stage("512", coords, run)
        sdf, feats = self._decode("512", z, run)
        del z
        ref = self.parts["refiner"]
        with run.recorder.stage("refine_512") as rec, self._on_device(ref):
            field_512 = refine_512(ref, sdf.coords[:, 1:], sdf.feats[:, 0], feats.feats,  # its weights' dtype
                                   progress=run.progress)
            del sdf, feats  # freed before marching cubes
            level = _level(self.config.level_512, field_512)
            mesh = dense_field_to_mesh(field_512, level, progress=run.progress)
            del field_512
            rec.info.update(level=level, faces=len(mesh.faces), grid=ref.config.resolution)
        if len(mesh.faces) == 0:
            if resolution == 512 or "coords_1024" not in run.given:
                raise EmptyStageError(f"the 512 refiner's field has no surface at level {level}")
            warnings.warn(f"the 512 stage has no surface at level {level} (given coords_1024 are used)",
                          RuntimeWarning, stacklevel=_WARN_CALLER)
        return mesh

    def _revoxelise(self, mesh_512: trimesh.Trimesh, side: int, run: _Run) -> torch.Tensor:
        """Stage **revoxelise**: the 1024 stage's tokens ``[M, 3]``, the latent cells within the token band of the
        normalised 512 mesh on the ``side^3`` grid (:func:`model.pipeline.geometry.mesh_to_latent_coords`)."""
        cfg = self.config
        factor = self.parts["sparse_vae_1024"].config.downsample_factor
        with run.recorder.stage("revoxelise") as rec:
            coords = mesh_to_latent_coords(mesh_512, resolution=side, factor=factor, band=cfg.token_band,
                                           margin=cfg.mesh_margin, spacing=cfg.sample_spacing, device=self.device,
                                           progress=run.progress)
            rec.info.update(tokens=int(coords.shape[0]), mesh_faces=len(mesh_512.faces))
        return coords

    def _interior_fill(self, fine: torch.Tensor, values: torch.Tensor, side: int, run: _Run):
        """What the empty voxels of the 1024 field take (``config.interior``): stage **refine_1024**, the sign
        refiner's grid ``[G, G, G]`` (``"refiner"``); ``+1`` (``"keep"``); ``"sign"``, our component rule of
        :mod:`model.pipeline.extract` (``"components"``)."""
        if self.config.interior == "components":
            return "sign"
        if self.config.interior != "refiner":
            return OUTSIDE
        from model.nets.refiner import predict_sign
        from model.pipeline.extract import DEFAULT_BRICK

        sign_ref, stats = self.parts["refiner_1024"], {}
        # _extract reads the grid around decoded voxels only (+-1 voxel on the GPU, its bricks on the CPU), so the
        # patches with the last word on none of those values are not run: the same mesh
        near = 1 if fine.is_cuda else DEFAULT_BRICK // 2 + 1
        with run.recorder.stage("refine_1024") as rec, self._on_device(sign_ref):
            fill = predict_sign(sign_ref, fine, values, side, progress=run.progress, near=near, stats=stats)
            rec.info.update(grid=sign_ref.config.resolution, patches_skipped=stats["skipped"])
        return fill

    def _extract(self, fine: torch.Tensor, values: torch.Tensor, side: int, level: float, fill,
                 run: _Run) -> trimesh.Trimesh:
        """Stage **extract**: marching cubes at ``level`` on the decoded voxels ``fine [M, 3]`` / ``values [M]`` of
        the ``side^3`` grid, empty voxels taking ``fill``, brick by brick
        (:func:`model.pipeline.extract.sparse_sdf_to_mesh`): on the GPU with its torch backend, on the CPU with
        scikit-image after dropping the voxels that cannot touch the level
        (:func:`model.pipeline.geometry.surface_voxels`; not with the component rule)."""
        from model.pipeline.extract import sparse_sdf_to_mesh

        with run.recorder.stage("extract") as rec:
            if fine.is_cuda and not isinstance(fill, str):
                # GPU marching cubes reads the decoded voxels where they are; pruning would not change a triangle
                mesh = sparse_sdf_to_mesh(fine, values.float(), side, level=level, fill=fill, progress=run.progress,
                                          backend="torch")
                rec.info["backend"] = "torch"
            else:
                if isinstance(fill, str):
                    keep_c, keep_v = fine, values
                else:
                    keep = surface_voxels(fine, values.float(), side, level, fill)
                    keep_c, keep_v = fine[keep], values[keep]
                    rec.info["kept_voxels"] = int(keep_c.shape[0])
                fill_arg = fill.cpu().numpy() if isinstance(fill, torch.Tensor) else fill
                mesh = sparse_sdf_to_mesh(keep_c.cpu().numpy(), keep_v.float().cpu().numpy(), side, level=level,
                                          fill=fill_arg, progress=run.progress, backend="skimage")
                rec.info["backend"] = "skimage"
            rec.info.update(level=level, faces=len(mesh.faces), interior=self.config.interior)
        return mesh

    def _stage_1024(self, mesh_512: trimesh.Trimesh, run: _Run) -> trimesh.Trimesh:
        """Stages **revoxelise** (unless ``coords_1024`` were given), **sparse_1024**, **decode_1024**,
        **refine_1024** and **extract**: the 1024 mesh (warns when it is empty)."""
        vae, dit = self.parts["sparse_vae_1024"], self.parts["sparse_dit_1024"]
        side = dit.config.resolution * vae.config.downsample_factor
        if "coords_1024" in run.given:
            coords = run.given["coords_1024"]
        else:
            coords = self._revoxelise(mesh_512, side, run)
        z = self._sparse_stage("1024", coords, run)
        sdf, _ = self._decode("1024", z, run, features=False)
        del z
        fine, values = sdf.coords[:, 1:], sdf.feats[:, 0]
        del sdf
        level = _level(self.config.level_1024, values)
        fill = self._interior_fill(fine, values, side, run)
        mesh = self._extract(fine, values, side, level, fill, run)
        if len(mesh.faces) == 0:
            warnings.warn(f"the 1024 stage has no surface at level {level}: the mesh is empty", RuntimeWarning,
                          stacklevel=_WARN_CALLER)
        return mesh

    def _simplify(self, mesh: trimesh.Trimesh, faces: int | None, ratio: float | None, run: _Run) -> trimesh.Trimesh:
        """Stage **simplify**: quadric decimation to at most ``faces`` faces or by the share ``ratio``
        (:func:`model.pipeline.geometry.simplify_mesh`)."""
        with run.recorder.stage("simplify") as rec:
            before = len(mesh.faces)
            mesh = simplify_mesh(mesh, faces, ratio=ratio)
            rec.info.update(faces_before=before, faces=len(mesh.faces))
        return mesh

    def _new_run(self, *, resolution, steps, guidance, seed, faces, simplify_ratio, coords_512, coords_1024,
                 progress) -> _Run:
        """The checked arguments of :meth:`generate` as a :class:`_Run` (``ValueError`` naming the argument)."""
        if resolution not in RESOLUTIONS:
            raise ValueError(f"resolution must be one of {RESOLUTIONS}, got {resolution!r}")
        if resolution == 1024 and not all(n in self.parts for n in _PARTS_1024):
            raise ValueError("resolution=1024 needs the sparse_vae_1024 and sparse_dit_1024 parts (loaded with "
                             "resolution=512?)")
        if resolution == 1024 and self.config.interior == "refiner" and "refiner_1024" not in self.parts:
            raise ValueError("interior='refiner' needs the refiner_1024 part")
        if faces is not None:
            positive_int("faces", faces)
            if simplify_ratio is not None:
                raise ValueError("give one of faces and simplify_ratio, not both")
        if simplify_ratio is not None and (isinstance(simplify_ratio, bool) or not isinstance(
                simplify_ratio, (int, float)) or not 0.0 <= simplify_ratio < 1.0):
            raise ValueError(f"simplify_ratio must be a number in [0, 1), got {simplify_ratio!r}")
        if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)):
            raise ValueError(f"seed must be an int, got {seed!r}")
        step = self._steps(steps)
        guidance = nonnegative_number("guidance", self.config.guidance if guidance is None else guidance)
        given = {}
        for name, value in (("coords_512", coords_512), ("coords_1024", coords_1024)):
            if value is not None:
                if not isinstance(value, torch.Tensor) or value.dim() != 2 or value.shape[1] not in (3, 4) \
                        or value.dtype.is_floating_point or value.shape[0] == 0:
                    raise ValueError(f"{name} must be a non-empty integer tensor [N, 3] or [N, 4]")
                given[name] = value[:, -3:]
        return _Run(recorder=StageRecorder(self.device, self.profile_stages),
                    generator=torch.Generator().manual_seed(int(seed)), steps=step, guidance=guidance, given=given,
                    progress=progress)

    @torch.no_grad()
    def generate(self, image, *, resolution: int = 1024, steps=None, guidance: float | None = None, seed: int = 0,
                 faces: int | None = None, simplify_ratio: float | None = None,
                 coords_512: torch.Tensor | None = None, coords_1024: torch.Tensor | None = None,
                 run_dense: bool | None = None, progress: bool = False) -> CascadeResult:
        """Run the cascade on one image (module docstring), one method per stage.

        Args:
            image: a path, ``PIL.Image`` or uint8 array: RGBA, or RGB on a uniform background
                (:func:`model.pipeline.images.load_rgba`).
            resolution: 1024 (default, the whole cascade) or 512 (stop after the 512 stage).
            steps: Euler steps: one int for every stage, or ``{"dense": n, "512": n, "1024": n}`` (missing stages
                keep the config's, by default the released 50 / 30 / 15).
            guidance: classifier-free guidance scale of every stage (default the config's, released 7).
            seed: seeds the noise of all stages (one CPU generator, drawn stage after stage).
            faces: simplify the final mesh to at most this many faces
                (:func:`model.pipeline.geometry.simplify_mesh`); or ``simplify_ratio``: remove this share of its faces
                (the released post-processing: 0.95).
            coords_512 / coords_1024: latent voxels ``[N, 3]`` (or ``[N, 4]`` with batch 0) to use instead of the
                dense stage's / the revoxelised 512 mesh's (the stages that make them are then skipped; with
                ``run_dense=True`` the dense stage still runs, e.g. to time it, and its voxels are replaced).
            progress: tqdm bars for every stage that loops (sampling, revoxelisation, decoding, refining,
                extraction).

        Returns a :class:`CascadeResult` (also kept in ``self.last_result``). Raises :class:`EmptyStageError` when a
        stage gives nothing to continue from (no occupied voxel; no 512 surface when the 1024 stage needs it).
        """
        run = self._new_run(resolution=resolution, steps=steps, guidance=guidance, seed=seed, faces=faces,
                            simplify_ratio=simplify_ratio, coords_512=coords_512, coords_1024=coords_1024,
                            progress=progress)
        run_dense = coords_512 is None if run_dense is None else bool(run_dense)
        if not run_dense and coords_512 is None:
            raise ValueError("run_dense=False needs coords_512 (the 512 stage's latent voxels)")
        run.image, run.tokens = self._condition(image, run)
        occupied = self._dense(run) if run_dense else None
        mesh_512 = self._stage_512(run.given.get("coords_512", occupied), resolution, run)
        mesh = self._stage_1024(mesh_512, run) if resolution == 1024 else mesh_512
        if (faces is not None and len(mesh.faces) > faces) or simplify_ratio:
            mesh = self._simplify(mesh, faces, simplify_ratio, run)
        settings = dict(resolution=resolution, steps=run.steps, guidance=run.guidance, simplify_ratio=simplify_ratio,
                        dtype=str(self.dtype).removeprefix("torch."), seed=int(seed), faces=faces, offload=self.offload,
                        refiner_dtype=str(part_dtype("refiner", self.dtype, self.device)).removeprefix("torch."),
                        device=str(self.device), backend=self.backend, interior=self.config.interior,
                        random_weights=self.random_weights, given_coords=sorted(run.given))
        result = CascadeResult(mesh=mesh, mesh_512=mesh_512, coords=run.coords, stages=run.recorder.records,
                               image=run.image, settings=settings)
        self.last_result = result
        return result

    def __call__(self, image, *, resolution: int = 1024, steps=None, guidance: float | None = None, seed: int = 0,
                 faces: int | None = None, **kwargs) -> trimesh.Trimesh:
        """The mesh of :meth:`generate` (same arguments)."""
        return self.generate(image, resolution=resolution, steps=steps, guidance=guidance, seed=seed, faces=faces,
                             **kwargs).mesh
