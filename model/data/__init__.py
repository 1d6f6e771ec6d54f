"""Training data for the sparse SDF VAE: meshes -> sparse SDF samples (:mod:`.sdf`), the cached dataset
(:mod:`.dataset`) and the meshes available offline (:mod:`.meshes`).

Names are loaded lazily, so ``import model.data.sdf`` (numpy, trimesh, libigl) does not import torch; only the
dataset does.
"""
from __future__ import annotations

import importlib

_EXPORTS = {
    "dataset": (
        "DEFAULT_CACHE_DIR", "MultiResolutionBatchSampler", "SparseSDFDataset", "atomic_save_npz",
        "collate_sparse_sdf", "held_out", "split_by_name",
    ),
    "meshes": ("MESH_EXTENSIONS", "available_meshes", "find_meshes", "pybullet_meshes", "pyvista_meshes"),
    "sdf": (
        "DEFAULT_MARGIN", "DEFAULT_SHARP_ANGLE", "DEFAULT_SHARP_RADIUS", "DEFAULT_TAU", "MeshError", "SparseSDF",
        "load_mesh", "mesh_to_sparse_sdf", "normalize_mesh", "resample",
    ),
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
