"""Reconstruct a mesh through the sparse SDF VAE: mesh -> sparse SDF -> encode -> decode -> marching cubes.

The command line of :mod:`model.pipeline.reconstruct` (``python -m model.cli.reconstruct --help``).
"""
from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import torch

from model.metrics import DEFAULT_FSCORE_THRESHOLD
from model.pipeline.extract import DEFAULT_LEVEL
from model.pipeline.reconstruct import CLI_POINTS, evaluate_mesh, load_vae, normalized_mesh, reconstruct_sample
from model.training.common import resolve_device


def _fmt_bytes(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{n} B"
        n /= 1024
    return f"{n:.1f} GiB"


def main(argv=None) -> int:
    import argparse

    ap = argparse.ArgumentParser(
        prog="python -m model.cli.reconstruct",
        description="Reconstruct a mesh through the sparse SDF VAE and compare it with the input.")
    ap.add_argument("mesh", help="input mesh (any format trimesh reads: .obj .ply .stl .glb .off ...)")
    source = ap.add_mutually_exclusive_group(required=True)
    source.add_argument("--ckpt", help="VAE checkpoint written by python -m model.cli.train_vae")
    source.add_argument("--weights", help="released weights: a folder in the released layout (config.yaml and the "
                        "model_sparse_*.ckpt files) or a model hub id such as wushuang98/Direct3D-S2")
    ap.add_argument("--part", choices=("auto", "sparse_vae_512", "sparse_vae_1024"), default="auto",
                    help="released VAE to use with --weights (auto: sparse_vae_1024 when R > 512, else 512)")
    ap.add_argument("--subfolder", help="folder of the release inside --weights (default direct3d-s2-v-1-1)")
    ap.add_argument("--tau", type=float,
                    help="SDF band half-width and scale in voxels (default: the checkpoint's; with --weights "
                    "an assumption, 4)")
    ap.add_argument("--chunk-size", type=int,
                    help="decode in CHUNK^3 spatial chunks (default: the release's, 4 for sparse_vae_1024; 1 otherwise)")
    ap.add_argument("--resolution", type=int, default=256, help="SDF grid side R (default 256; released: 512, 1024)")
    ap.add_argument("--out", required=True, help="output mesh (.glb; any extension trimesh writes works)")
    ap.add_argument("--device", default="auto", help="auto (CUDA if present), cpu, cuda, cuda:1 ...")
    ap.add_argument("--dtype", choices=("auto", "float32", "bfloat16"), default="auto",
                    help="autocast dtype on CUDA (auto: bfloat16 on CUDA; CPU always runs float32)")
    ap.add_argument("--level", type=float,
                    help="iso level (default 0 with --ckpt: our SDF is sdf/tau; 0.2 with --weights, as released)")
    ap.add_argument("--threshold", type=float, default=DEFAULT_FSCORE_THRESHOLD,
                    help="F-score threshold in unit-cube sides (default 1/128)")
    ap.add_argument("--points", type=int, default=CLI_POINTS, help="surface points per mesh for the metrics")
    ap.add_argument("--original-frame", action="store_true",
                    help="write the mesh in the input's own frame (default: the unit cube of the data)")
    ap.add_argument("--json", help="also write the figures to this JSON file")
    args = ap.parse_args(argv)

    from model.data.sdf import MeshError, load_mesh, mesh_to_sparse_sdf

    try:
        if not os.path.isfile(args.mesh):
            raise FileNotFoundError(f"mesh file not found: {args.mesh}")
        device = resolve_device(args.device)
        chunk_size, level = 1, DEFAULT_LEVEL if args.level is None else args.level
        if args.weights is not None:
            from model.pipeline.pretrained import (
                RELEASED_MC_LEVEL,
                RELEASED_SDF_TAU,
                from_pretrained,
            )

            part = args.part if args.part != "auto" else ("sparse_vae_1024" if args.resolution > 512
                                                           else "sparse_vae_512")
            models = from_pretrained(args.weights, parts=part, device=device, subfolder=args.subfolder)
            vae = models[part]
            chunk_size = int(models.options[part].get("chunk_size", 1))
            tau, margin = RELEASED_SDF_TAU, 0.95
            level = RELEASED_MC_LEVEL if args.level is None else args.level
            print(f"weights    released {part} from {models.root} (input sdf/tau with tau {tau:g} voxels assumed; "
                  f"level {level:g})")
        else:
            vae, meta = load_vae(args.ckpt, device=device)
            data = meta.get("data", {})
            tau, margin = float(data.get("tau", 2.0)), float(data.get("margin", 0.95))
        if args.tau is not None:
            tau = args.tau
        if args.chunk_size is not None:
            chunk_size = args.chunk_size
        mesh = load_mesh(args.mesh)
        t0 = time.perf_counter()
        sample = mesh_to_sparse_sdf(mesh, args.resolution, tau=tau, margin=margin, compute_sharp=False)
        t_sdf = time.perf_counter() - t0
        if len(sample) == 0:
            raise MeshError(f"{args.mesh}: no voxel of the {args.resolution}^3 grid lies within the band")
    except (FileNotFoundError, MeshError, ValueError, TypeError, RuntimeError, ImportError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    dtype = None
    if device.type == "cuda" and args.dtype in ("auto", "bfloat16"):
        dtype = torch.bfloat16
    rec = reconstruct_sample(vae, sample, device=device, dtype=dtype, level=level, chunk_size=chunk_size)
    gt = normalized_mesh(mesh, sample)
    metrics = evaluate_mesh(rec.mesh, gt, num_points=args.points, threshold=args.threshold)

    out_mesh = rec.mesh
    if args.original_frame:
        from model.pipeline.extract import to_original_frame

        out_mesh = to_original_frame(rec.mesh, sample.center, sample.scale)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    if len(out_mesh.faces):
        out_mesh.export(out)
    R = args.resolution
    print(f"input      {args.mesh}: {len(mesh.faces):,} faces -> {rec.input_voxels:,} voxels at {R}^3 "
          f"(tau {tau:g} voxels)")
    print(f"latent     {rec.latent_voxels:,} voxels at {R // vae.config.downsample_factor}^3; "
          f"decoded {len(rec.decoded_sdf):,} voxels")
    if metrics["empty"]:
        print(f"mesh       EMPTY: the decoded SDF has no surface at level {level:g}; nothing written")
    else:
        print(f"mesh       {len(out_mesh.faces):,} faces, {len(out_mesh.vertices):,} vertices -> {out}")
    print(f"chamfer    {metrics['chamfer']:.6f} (unit cube; pred->gt {metrics['chamfer_pred_to_gt']:.6f}, "
          f"gt->pred {metrics['chamfer_gt_to_pred']:.6f})")
    print(f"f-score    {metrics['fscore']:.4f} at {args.threshold:.6f} (precision {metrics['precision']:.4f}, "
          f"recall {metrics['recall']:.4f}; against all input faces, buried ones too: "
          f"{metrics['fscore_all_faces']:.4f})")
    print(f"normals    {metrics['normal_consistency']:.4f} (normal consistency)")
    s = rec.seconds
    print(f"time       sdf {t_sdf:.2f} s, encode {s['encode']:.3f} s, decode {s['decode']:.3f} s, "
          f"extract {s['extract']:.2f} s on {device}")
    print(f"memory     {_fmt_bytes(rec.peak_memory_bytes)} ({rec.peak_memory_kind})")
    if args.json:
        doc = dict(mesh=args.mesh, checkpoint=args.ckpt or args.weights, resolution=R, tau=tau, level=level,
                   chunk_size=chunk_size, device=str(device),
                   input_voxels=rec.input_voxels, latent_voxels=rec.latent_voxels,
                   decoded_voxels=int(len(rec.decoded_sdf)), seconds=dict(sdf=t_sdf, **s),
                   peak_memory_bytes=rec.peak_memory_bytes, peak_memory_kind=rec.peak_memory_kind, **metrics)
        Path(args.json).write_text(json.dumps(doc, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
