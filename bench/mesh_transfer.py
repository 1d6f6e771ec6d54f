"""Time the copy of a large GPU mesh to a host ``trimesh.Trimesh``, the last step of the cascade's extraction.

``python -m bench.mesh_transfer [--vertices 28000000 --faces 57000000] [--reps 3]`` (one CUDA GPU) makes a random
mesh of that size on the GPU (the cascade's noise mesh at 1024 has about 28M vertices and 57M faces) and prints the
wall time of each way to bring it to the host, ``--reps`` times each (the first repetition of a page-locked variant
includes the page-locked allocation; later ones reuse PyTorch's pinned-memory cache):

- ``model.pipeline.marching_cubes.mesh_to_numpy`` alone, then with ``trimesh.Trimesh(..., process=False)``;
- the same copies with int32 faces (what ``mesh_to_numpy`` sent before: Trimesh converts them to int64 on the host);
- pageable copies (``.cpu()``);
- the Trimesh constructor alone on host arrays with int32 faces, and one fresh page-locked allocation of the size.
"""
from __future__ import annotations

import argparse
import gc
import sys
import time


def _timed(name: str, fn, reps: int) -> None:
    import torch

    for r in range(reps):
        gc.collect()
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        out = fn()
        torch.cuda.synchronize()
        print(f"{name}, repetition {r}: {time.perf_counter() - t0:.3f} s", flush=True)
        del out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.mesh_transfer", description=__doc__.split("\n\n")[0])
    p.add_argument("--vertices", type=int, default=28_000_000, help="vertices (default %(default)s)")
    p.add_argument("--faces", type=int, default=57_000_000, help="faces (default %(default)s)")
    p.add_argument("--reps", type=int, default=3, help="repetitions per variant (default %(default)s)")
    p.add_argument("--side", type=int, default=1024, help="grid side of the unit-cube map (default %(default)s)")
    args = p.parse_args(argv)
    import numpy as np
    import torch
    import trimesh

    from model.pipeline.marching_cubes import mesh_to_numpy

    if not torch.cuda.is_available():
        print("bench.mesh_transfer: no CUDA GPU here; nothing to time")
        return 0
    n_v, n_f = args.vertices, args.faces
    v = torch.rand(n_v, 3, device="cuda") * args.side
    f = torch.randint(0, n_v, (n_f, 3), device="cuda")

    def pinned(t):
        host = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
        host.copy_(t)
        return host.numpy()

    def unit(t):
        return t.double().add_(0.5).div_(args.side).sub_(0.5)

    variants = [
        ("fresh page-locked allocation of the int32-face mesh's bytes",
         lambda: torch.empty(n_v * 24 + n_f * 12, dtype=torch.uint8, pin_memory=True)),
        ("Trimesh constructor alone, int32 faces (host arrays)",
         lambda: trimesh.Trimesh(np.empty((n_v, 3)), np.empty((n_f, 3), np.int32), process=False)),
        ("mesh_to_numpy alone", lambda: mesh_to_numpy(v, f, side=args.side)),
        ("mesh_to_numpy + Trimesh", lambda: trimesh.Trimesh(*mesh_to_numpy(v, f, side=args.side), process=False)),
        ("page-locked copies with int32 faces + Trimesh",
         lambda: trimesh.Trimesh(pinned(unit(v)), pinned(f.int()), process=False)),
        ("pageable copies (.cpu()), int64 faces + Trimesh",
         lambda: trimesh.Trimesh(unit(v).cpu().numpy(), f.cpu().numpy(), process=False)),
    ]
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, trimesh {trimesh.__version__}: "
          f"{n_v:,} vertices, {n_f:,} faces")
    for name, fn in variants:
        _timed(name, fn, args.reps)
    return 0


if __name__ == "__main__":
    sys.exit(main())
