"""Mesh extraction at 1024^3 on real SDFs: the GPU marching cubes against scikit-image, and the released
simplification.

``python -m model.reports.extract --out reports [--mesh MESH ...] [--resolution 1024]`` (one CUDA GPU) writes
``reports/extract.md`` and ``.json``. For each mesh (default: the generate report's shell surface,
:func:`model.reports.generate.shell_mesh`, and ``tests/data/meshes/capsule.obj``):

1. the data pipeline's sparse SDF at the resolution (:func:`model.data.sdf.mesh_to_sparse_sdf`, the band of
   ``|sdf| < tau``; not timed), values ``sdf / tau``;
2. the fill grid at half the resolution that the cascade's sign refiner would give for a perfect prediction: a
   coarse cell holding band voxels takes their sign, an empty one ``+1`` when its 6-connected empty component
   touches the grid's border, else ``-1`` (an empty voxel is at least ``tau`` from the surface, so its coarse cell
   is on its side: the field is the mesh's, with no inner shell);
3. the extraction at level 0 on the GPU (:func:`model.pipeline.marching_cubes.sparse_marching_cubes`, timed after a
   warm-up, median of 3) and with scikit-image on the CPU (the brick loop of :func:`model.pipeline.extract
   .sparse_sdf_to_mesh`, timed once); faces, vertices, watertightness, and their agreement (symmetric mean
   vertex-to-nearest-vertex distance in voxels, relative area difference);
4. quadric decimation removing 95% of the faces (the released ``simplify_ratio``,
   :func:`model.pipeline.geometry.simplify_mesh`), timed.

Without CUDA it prints that there is no GPU and, with ``--dry-run``, runs everything on the CPU at resolution 64
(labelled DRY RUN), which the tests use.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

from model.io import atomic_write_json, atomic_write_text, commit_label, provenance

__all__ = ["main", "markdown", "run_report", "sign_grid"]

#: Meshes measured by default (``shell``: the generate report's mesh).
DEFAULT_MESHES = ("shell", "tests/data/meshes/capsule.obj")
#: Iso level of the data pipeline's SDF.
LEVEL = 0.0
#: Repetitions of the GPU extraction.
REPEATS = 3


def sign_grid(coords: np.ndarray, sdf: np.ndarray, resolution: int) -> np.ndarray:
    """The ``[R / 2]^3`` float32 fill grid of the module docstring (step 2) for band voxels ``coords [M, 3]`` with
    values ``sdf [M]`` on the ``R^3`` grid."""
    from scipy import ndimage

    g = resolution // 2
    cell = coords // 2
    occupied = np.zeros((g, g, g), bool)
    occupied[cell[:, 0], cell[:, 1], cell[:, 2]] = True
    flat = (cell[:, 0] * g + cell[:, 1]) * g + cell[:, 2]
    total = np.bincount(flat, weights=sdf, minlength=g**3).reshape(g, g, g)
    label, _ = ndimage.label(~occupied)
    border = np.unique(np.concatenate([label[[0, -1]].ravel(), label[:, [0, -1]].ravel(),
                                       label[:, :, [0, -1]].ravel()]))
    outside = np.isin(label, border[border > 0])
    grid = np.where(occupied, np.where(total < 0, -1.0, 1.0), np.where(outside, 1.0, -1.0))
    return grid.astype(np.float32)


def _agreement(a, b, resolution: int) -> dict:
    """Symmetric mean distance from each vertex to the other mesh's nearest vertex (voxels) and the relative area
    difference of meshes ``a`` and ``b``."""
    from scipy.spatial import cKDTree

    pa, pb = np.asarray(a.vertices), np.asarray(b.vertices)
    if len(pa) == 0 or len(pb) == 0:
        return {"mean_distance_voxels": None, "relative_area_difference": None}
    d = (cKDTree(pb).query(pa, workers=-1)[0].mean() + cKDTree(pa).query(pb, workers=-1)[0].mean()) / 2
    return {"mean_distance_voxels": float(d) * resolution,
            "relative_area_difference": float(abs(a.area - b.area) / b.area)}


def _sync(dev):
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def measure_mesh(name: str, resolution: int, dev: torch.device, *, cpu_reference: bool = True) -> dict:
    """One mesh of the report (module docstring, steps 1-4)."""
    import trimesh

    from model.data.sdf import load_mesh, mesh_to_sparse_sdf
    from model.pipeline.extract import sparse_sdf_to_mesh
    from model.pipeline.geometry import RELEASED_SIMPLIFY_RATIO, simplify_mesh
    from model.pipeline.marching_cubes import sparse_marching_cubes
    from model.reports.generate import shell_mesh

    mesh = shell_mesh() if name == "shell" else load_mesh(name)
    t0 = time.perf_counter()
    sample = mesh_to_sparse_sdf(mesh, resolution, compute_sharp=False)
    sdf_seconds = time.perf_counter() - t0
    values = sample.sdf_scaled.astype(np.float32)
    grid = sign_grid(sample.coords, values, resolution)
    coords_t = torch.from_numpy(sample.coords.astype(np.int64)).to(dev)
    values_t = torch.from_numpy(values).to(dev)
    grid_t = torch.from_numpy(grid).to(dev)
    times = []
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    for _ in range(REPEATS + 1):  # the first run warms the allocator up
        _sync(dev)
        t0 = time.perf_counter()
        verts, faces = sparse_marching_cubes(coords_t, values_t, resolution, level=LEVEL, fill=grid_t)
        _sync(dev)
        times.append(time.perf_counter() - t0)
    t0 = time.perf_counter()
    gpu = trimesh.Trimesh((verts.double().cpu().numpy() + 0.5) / resolution - 0.5, faces.cpu().numpy(),
                          process=False)
    to_host = time.perf_counter() - t0
    out = {
        "mesh": name, "mesh_faces": int(len(mesh.faces)), "resolution": resolution, "band_voxels": int(len(values)),
        "sdf_seconds": sdf_seconds,
        "gpu": {"seconds": statistics.median(times[1:]), "to_host_seconds": to_host, "faces": int(len(gpu.faces)),
                "vertices": int(len(gpu.vertices)), "watertight": bool(gpu.is_watertight),
                "peak_bytes": int(torch.cuda.max_memory_allocated(dev)) if dev.type == "cuda" else None},
    }
    if cpu_reference:
        t0 = time.perf_counter()
        cpu = sparse_sdf_to_mesh(sample.coords, values, resolution, level=LEVEL, fill=grid, backend="skimage")
        out["cpu"] = {"seconds": time.perf_counter() - t0, "faces": int(len(cpu.faces)),
                      "vertices": int(len(cpu.vertices)), "watertight": bool(cpu.is_watertight)}
        out["agreement"] = _agreement(gpu, cpu, resolution)
    t0 = time.perf_counter()
    simple = simplify_mesh(gpu, ratio=RELEASED_SIMPLIFY_RATIO)
    out["simplify"] = {"ratio": RELEASED_SIMPLIFY_RATIO, "seconds": time.perf_counter() - t0,
                       "faces": int(len(simple.faces))}
    return out


def run_report(meshes=DEFAULT_MESHES, *, resolution: int = 1024, device=None, dry_run: bool = False) -> dict:
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    prov = provenance(dev)
    rows = [measure_mesh(m, resolution, dev) for m in meshes]
    return {"dry_run": dry_run, "gpu": prov["gpu"] or "CPU", "date": prov["date"], "commit": prov["commit"],
            "versions": {k: prov[k] for k in ("torch", "python", "triton", "cuda")}, "resolution": resolution,
            "level": LEVEL, "meshes": rows}


def markdown(r: dict) -> str:
    label = "DRY RUN on the CPU, NOT a measurement. " if r["dry_run"] else ""
    v = r["versions"]
    lines = [
        f"# Mesh extraction at {r['resolution']}^3: GPU marching cubes against scikit-image",
        "",
        f"{label}{r['date']}, {r['gpu']}, torch {v['torch']}, {commit_label(r)}. `python -m model.reports.extract`.",
        "",
        "Sparse SDF of each mesh from the data pipeline (band |sdf| < tau, values sdf / tau), empty voxels filled from "
        "a perfect sign grid at half the resolution (what the sign refiner predicts for a right answer), level 0. "
        "GPU: `sparse_marching_cubes`, median of 3 after a warm-up (copy to a host mesh apart). CPU: scikit-image "
        "per brick, one run, one process. Simplification: quadric decimation removing 95% of the faces (the released "
        "ratio) on the CPU (`fast-simplification`).",
        "",
        "| mesh | band voxels | GPU s | GPU to host s | CPU s | faces GPU / CPU | watertight GPU / CPU "
        "| mean distance, voxels | area difference | simplify s | faces after |",
        "| --- | ---: | ---: | ---: | ---: | ---: | --- | ---: | ---: | ---: | ---: |",
    ]
    for m in r["meshes"]:
        g, c, a, s = m["gpu"], m.get("cpu", {}), m.get("agreement", {}), m["simplify"]
        dist = a.get("mean_distance_voxels")
        area = a.get("relative_area_difference")
        lines.append(
            f"| {m['mesh']} | {m['band_voxels']:,} | {g['seconds']:.2f} | {g['to_host_seconds']:.2f} | "
            f"{c.get('seconds', float('nan')):.1f} | {g['faces']:,} / {c.get('faces', 0):,} | "
            f"{g['watertight']} / {c.get('watertight')} | {'n/a' if dist is None else f'{dist:.4f}'} | "
            f"{'n/a' if area is None else f'{100 * area:.3f}%'} | {s['seconds']:.1f} | {s['faces']:,} |")
    peaks = [m["gpu"]["peak_bytes"] for m in r["meshes"] if m["gpu"]["peak_bytes"]]
    if peaks:
        lines += ["", f"Peak GPU memory of the extraction: {max(peaks) / 1e9:.2f} GB (inputs included)."]
    return "\n".join(lines) + "\n"


def build_parser() -> argparse.ArgumentParser:
    from model.cli.args import add_device, add_out, make_parser

    p = make_parser("model.reports.extract", __doc__)
    add_out(p, "folder for extract.md and extract.json")
    p.add_argument("--mesh", action="append", default=None, metavar="MESH",
                   help=f"a mesh file or 'shell' (repeatable; default {' and '.join(DEFAULT_MESHES)})")
    p.add_argument("--resolution", type=int, default=None,
                   help="grid side (default 1024; 64 with --dry-run)")
    add_device(p, default=None, shown="cuda; cpu with --dry-run")
    p.add_argument("--dry-run", action="store_true", help="on the CPU at resolution 64 (tests), labelled DRY RUN")
    return p


def main(argv=None) -> int:
    from model.cli.args import run

    return run(build_parser(), _main, argv)


def _main(args) -> int:
    from model.cli.args import UserError, output_folder, resolve_device

    output_folder("--out", args.out)
    if not args.dry_run and not torch.cuda.is_available():
        print("extract report: no CUDA device here; the report needs one GPU (nothing written). Run with --dry-run "
              "for the CPU version at resolution 64.")
        return 0
    resolution = args.resolution or (64 if args.dry_run else 1024)
    if resolution < 8 or resolution % 2:
        raise UserError(f"--resolution: expected an even grid side >= 8, got {resolution}")
    device = resolve_device(args.device) if args.device not in (None, "auto") else (
        "cpu" if args.dry_run else "cuda")
    meshes = args.mesh or list(DEFAULT_MESHES)
    for m in meshes:
        if m != "shell" and not Path(m).is_file():
            raise UserError(f"--mesh: file {m!r} does not exist")
    r = run_report(meshes, resolution=resolution, device=device, dry_run=args.dry_run)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out / "extract.json", r, default=str)
    atomic_write_text(out / "extract.md", markdown(r))
    print(markdown(r))
    return 0


if __name__ == "__main__":
    sys.exit(main())
