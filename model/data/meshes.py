"""Finding meshes on disk, including the real meshes that installed Python packages ship (no download).

* :func:`find_meshes` walks a folder recursively for every mesh format trimesh reads here
  (:data:`MESH_EXTENSIONS`).
* :func:`pybullet_meshes` returns the ~1,000 procedurally generated, watertight object meshes that the ``pybullet``
  wheel ships under ``pybullet_data/random_urdfs/NNN/NNN.obj`` (plus, on request, the other ``.obj`` models at the
  top of ``pybullet_data``: bunny, duck, teddy, ...). ``pip install pybullet`` installs a prebuilt wheel on
  Linux x86-64 / CPython 3.11 (version 3.2.7, ~100 MB). Only the data folder is located (with
  ``importlib.util.find_spec``): pybullet itself is never imported and the project does not depend on it.
* :func:`pyvista_meshes` returns the example ``.ply`` files of an installed ``pyvista`` (ant, nut, sphere,
  airplane, ...), again without importing it; trimesh reads them.
"""
from __future__ import annotations

import importlib.util
import os
from pathlib import Path

#: File extensions (lower case) recognised as meshes.
MESH_EXTENSIONS = (".obj", ".ply", ".stl", ".glb", ".gltf", ".off")


def find_meshes(root, extensions=MESH_EXTENSIONS) -> list[Path]:
    """All files under ``root`` (recursive, symlinks followed once) whose extension is in ``extensions``
    (case-insensitive), sorted by path. A single mesh file is returned as a one-element list."""
    if not isinstance(root, (str, os.PathLike)):
        raise TypeError(f"root must be a path, got {type(root).__name__}")
    exts = tuple(e.lower() if e.startswith(".") else "." + e.lower() for e in extensions)
    root = Path(root)
    if root.is_file():
        if root.suffix.lower() not in exts:
            raise ValueError(f"root {root} is a file but not a mesh ({', '.join(exts)})")
        return [root]
    if not root.is_dir():
        raise ValueError(f"root {root} is neither a folder nor a mesh file")
    found = []
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        dirnames.sort()
        for name in filenames:
            if os.path.splitext(name)[1].lower() in exts:
                found.append(Path(dirpath) / name)
    return sorted(found)


def _package_dir(package: str, install_hint: str) -> Path:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(f"package {package!r} is not installed: {install_hint}")
    return Path(next(iter(spec.submodule_search_locations)))


def pybullet_data_dir() -> Path:
    """The ``pybullet_data`` folder of an installed pybullet wheel (``ModuleNotFoundError`` with the install
    command if missing)."""
    return _package_dir("pybullet_data", "pip install pybullet (a prebuilt wheel, ~100 MB)")


def pybullet_meshes(include_models: bool = False) -> list[Path]:
    """The object meshes shipped by pybullet: ``random_urdfs/*/*.obj`` (1,000 watertight objects of a few hundred
    faces), plus the top-level ``.obj`` models when ``include_models`` (some of them are open or are scenes)."""
    root = pybullet_data_dir()
    meshes = find_meshes(root / "random_urdfs", extensions=(".obj",)) if (root / "random_urdfs").is_dir() else []
    if include_models:
        meshes += sorted(p for p in root.glob("*.obj"))
    if not meshes:
        raise FileNotFoundError(f"no meshes found under {root} (unexpected pybullet_data layout)")
    return meshes


def pyvista_meshes() -> list[Path]:
    """The example ``.ply`` meshes of an installed ``pyvista`` (``ModuleNotFoundError`` if it is missing,
    ``FileNotFoundError`` if it ships none)."""
    root = _package_dir("pyvista", "pip install pyvista") / "examples"
    meshes = find_meshes(root, extensions=(".ply",)) if root.is_dir() else []
    if not meshes:
        raise FileNotFoundError(f"no .ply example meshes under {root}")
    return meshes


def available_meshes() -> list[Path]:
    """Every real mesh found offline: pybullet's objects and pyvista's examples, whichever is installed
    (possibly none)."""
    out = []
    for fn in (pybullet_meshes, pyvista_meshes):
        try:
            out += fn()
        except (ModuleNotFoundError, FileNotFoundError):
            pass
    return out
