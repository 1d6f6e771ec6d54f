"""The Direct3D-S2 model: sparse tensors and layers (:mod:`model.sparse`), the networks (:mod:`model.nets`), data
(mesh -> sparse SDF), the image-to-mesh cascade (:mod:`model.pipeline`), training and metrics.

Kept light on purpose: ``import model`` imports nothing else. The public API below is loaded on first use
(``from model import ImageToMesh`` imports the cascade then), or import the submodule you need
(``from model.nets.vae import SparseSDFVAE``):

- :class:`ImageToMesh` (``ImageToMesh.from_pretrained(folder_or_hub_id)``, or ``"random:tiny"`` /
  ``"random:released"`` for random weights), :class:`CascadeConfig`, :class:`CascadeResult`, :func:`load_rgba`;
- :func:`from_pretrained` / :func:`save_released`: the released parts as ``{part: module}`` (not the pipeline);
- :class:`SparseTensor`; the networks :class:`SparseDiT`, :class:`SparseSDFVAE`, :class:`DenseDiT`,
  :class:`DenseShapeVAE`, :class:`VoxelRefiner`, :class:`SignRefiner` and their configs :class:`DiTConfig`,
  :class:`VAEConfig`, :class:`DenseDiTConfig`, :class:`DenseVAEConfig`, :class:`RefinerConfig`.
"""
from __future__ import annotations

import importlib

#: ``{submodule of model: names}`` of the lazily loaded public API.
_EXPORTS = {
    "pipeline.cascade": ("CascadeConfig", "CascadeResult", "ImageToMesh"),
    "pipeline.images": ("load_rgba",),
    "pipeline.pretrained": ("from_pretrained", "save_released"),
    "sparse.tensor": ("SparseTensor",),
    "nets.dit": ("DiTConfig", "SparseDiT"),
    "nets.vae": ("SparseSDFVAE", "VAEConfig"),
    "nets.dense": ("DenseDiT", "DenseDiTConfig", "DenseShapeVAE", "DenseVAEConfig"),
    "nets.refiner": ("RefinerConfig", "SignRefiner", "VoxelRefiner"),
}
_WHERE = {name: module for module, names in _EXPORTS.items() for name in names}
__all__ = sorted(_WHERE)


def __getattr__(name: str):
    module = _WHERE.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(__all__))
