"""Time the copy of a large GPU mesh to a host trimesh.Trimesh, the last step of the cascade's mesh extraction.

``python -m model.reports.mesh_transfer --out reports`` (one CUDA GPU; about 15 s) makes a random mesh on the GPU
(``--vertices`` / ``--faces``; the defaults are the size of the cascade's noise mesh at 1024, 28M vertices and 57M
faces) and times each way of bringing it to the host, ``--reps`` times each (the first repetition of a page-locked
variant includes the page-locked allocation; later ones reuse PyTorch's pinned-memory cache): a fresh page-locked
allocation of the mesh's bytes; the Trimesh constructor alone on host arrays with int32 faces (it converts them to
int64); model.pipeline.marching_cubes.mesh_to_numpy alone and with Trimesh (int64 faces, page-locked), and with its
staged copy (a reused page-locked buffer into pageable arrays); the same page-locked copies with int32 faces (what
mesh_to_numpy sent before d9627ea); pageable copies (``.cpu()``). Writes ``OUT/mesh_transfer.json`` and
``OUT/mesh_transfer.md`` with the GPU, the versions and the commit.

Without CUDA it says so and writes nothing.
"""
from __future__ import annotations

import gc
import sys
import time

from model.io import commit_label, provenance
from model.reports.common import write_report

__all__ = ["main", "markdown", "run_report"]


def _timed(fn, reps: int) -> list[float]:
    import torch

    out = []
    for _ in range(reps):
        gc.collect()
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        result = fn()
        torch.cuda.synchronize()
        out.append(time.perf_counter() - t0)
        del result
    return out


def run_report(*, vertices: int, faces: int, reps: int, side: int = 1024, seed: int = 0) -> dict:
    import numpy as np
    import torch
    import trimesh

    from model.pipeline.marching_cubes import mesh_to_numpy

    gen = torch.Generator(device="cuda").manual_seed(seed)
    v = torch.rand(vertices, 3, device="cuda", generator=gen) * side
    f = torch.randint(0, vertices, (faces, 3), device="cuda", generator=gen)

    def pinned(t):
        host = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
        host.copy_(t)
        return host.numpy()

    def unit(t):
        return t.double().add_(0.5).div_(side).sub_(0.5)

    variants = [
        ("fresh page-locked allocation of the int32-face mesh's bytes",
         lambda: torch.empty(vertices * 24 + faces * 12, dtype=torch.uint8, pin_memory=True)),
        ("Trimesh constructor alone, int32 faces (host arrays)",
         lambda: trimesh.Trimesh(np.empty((vertices, 3)), np.empty((faces, 3), np.int32), process=False)),
        ("mesh_to_numpy(staged=False) alone (page-locked arrays)",
         lambda: mesh_to_numpy(v, f, side=side, staged=False)),
        ("mesh_to_numpy(staged=False) + Trimesh",
         lambda: trimesh.Trimesh(*mesh_to_numpy(v, f, side=side, staged=False), process=False)),
        ("mesh_to_numpy(staged=True) + Trimesh (the default: a reused 64 MB page-locked buffer, pageable arrays)",
         lambda: trimesh.Trimesh(*mesh_to_numpy(v, f, side=side, staged=True), process=False)),
        ("page-locked copies with int32 faces + Trimesh",
         lambda: trimesh.Trimesh(pinned(unit(v)), pinned(f.int()), process=False)),
        ("pageable copies (.cpu()), int64 faces + Trimesh",
         lambda: trimesh.Trimesh(unit(v).cpu().numpy(), f.cpu().numpy(), process=False)),
    ]
    rows = [{"variant": name, "seconds": _timed(fn, reps)} for name, fn in variants]
    return dict(provenance(torch.device("cuda")), trimesh=trimesh.__version__, vertices=vertices, faces=faces,
                reps=reps, rows=rows)


def markdown(r: dict) -> str:
    lines = ["# A GPU mesh to a host Trimesh: the extraction's last step", "",
             f"{r['date']}, {r['gpu']}, torch {r['torch']}, trimesh {r['trimesh']}, {commit_label(r)}. "
             "`python -m model.reports.mesh_transfer`.", "",
             f"A random mesh of {r['vertices']:,} vertices and {r['faces']:,} faces on the GPU (vertices mapped to the "
             "unit cube in float64 on the device). Wall seconds per repetition; the first repetition of a page-locked "
             "variant pays the page-locked allocation, later ones reuse PyTorch's pinned-memory cache.", "",
             "| variant | " + " | ".join(f"repetition {i}" for i in range(r["reps"])) + " |",
             "| --- | " + " | ".join("---:" for _ in range(r["reps"])) + " |"]
    lines += [f"| {row['variant']} | " + " | ".join(f"{s:.3f}" for s in row["seconds"]) + " |" for row in r["rows"]]
    return "\n".join(lines) + "\n"


def build_parser():
    from model.cli.args import add_out, add_seed, make_parser, positive_int

    p = make_parser("model.reports.mesh_transfer", __doc__)
    add_out(p, "folder for mesh_transfer.md and mesh_transfer.json", default="reports")
    p.add_argument("--vertices", type=positive_int, default=28_000_000, metavar="N",
                   help="vertices of the random mesh (default %(default)s)")
    p.add_argument("--faces", type=positive_int, default=57_000_000, metavar="N",
                   help="faces of the random mesh (default %(default)s)")
    p.add_argument("--reps", type=positive_int, default=2, metavar="N",
                   help="repetitions per variant (default %(default)s)")
    add_seed(p)
    return p


def main(argv=None) -> int:
    from model.cli.args import run

    return run(build_parser(), _main, argv)


def _main(args) -> int:
    import torch

    from model.cli.args import output_folder

    out = output_folder("--out", args.out)
    if not torch.cuda.is_available():
        print("model.reports.mesh_transfer: no CUDA GPU here; nothing to time (nothing written)")
        return 0
    r = run_report(vertices=args.vertices, faces=args.faces, reps=args.reps, seed=args.seed)
    write_report(out, "mesh_transfer", r, markdown(r))
    return 0


if __name__ == "__main__":
    sys.exit(main())
