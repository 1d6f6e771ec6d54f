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
import sys
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


def export_pybullet_meshes(dest, count: int = 150, *, overwrite: bool = False) -> list[Path]:
    """Copy the first ``count`` pybullet objects (``random_urdfs/NNN/NNN.obj``, in order) into the folder ``dest``
    as ``dest/NNN.obj`` (created if missing), so that a machine without pybullet can use them (e.g. with
    ``python -m model.reports.vae --meshes dest``). Files already there are kept unless ``overwrite``. Returns the
    paths in ``dest``."""
    import shutil

    if isinstance(count, bool) or not isinstance(count, int) or count < 1:
        raise ValueError(f"count must be a positive int, got {count!r}")
    sources = [p for p in pybullet_meshes() if p.parent.parent.name == "random_urdfs"][:count]
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    out = []
    for src in sources:
        target = dest / src.name
        if overwrite or not target.exists():
            shutil.copyfile(src, target)
        out.append(target)
    return out


def build_parser():
    import argparse

    ap = argparse.ArgumentParser(prog="python -m model.data.meshes",
                                 description="List the meshes available offline, or copy pybullet's into a folder.")
    ap.add_argument("--export", metavar="DIR", help="copy the first --count pybullet objects into DIR as NNN.obj "
                                                    "(needs pybullet: pip install -e '.[meshes]'; default: list the "
                                                    "meshes available instead)")
    ap.add_argument("--count", type=int, default=150, help="how many pybullet objects to export (default 150)")
    ap.add_argument("--overwrite", action="store_true", help="replace files already in DIR")
    return ap


def main(argv=None) -> int:
    ap = build_parser()
    args = ap.parse_args(argv)
    if args.export:
        try:
            paths = export_pybullet_meshes(args.export, args.count, overwrite=args.overwrite)
        except (ModuleNotFoundError, FileNotFoundError, ValueError) as exc:
            print(f"{ap.prog}: error: --export: {exc}", file=sys.stderr)
            return 2
        size = sum(p.stat().st_size for p in paths)
        print(f"{len(paths)} meshes in {args.export} ({size / 1e6:.1f} MB)")
        return 0
    for path in available_meshes():
        print(path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
