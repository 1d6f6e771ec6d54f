"""Reconstruct a mesh through the sparse SDF VAE (mesh -> sparse SDF -> encode -> decode -> marching cubes) and
compare it with the input: writes the mesh to --out and prints Chamfer distance, F-score and normal consistency.

The command line of ``model.pipeline.reconstruct``.
"""
from __future__ import annotations

import argparse
import time

import torch

from model.cli.args import (
    UserError,
    add_device,
    add_out,
    checkpoint_file,
    describe_device,
    existing_file,
    loading,
    make_parser,
    output_file,
    positive_float,
    positive_int,
    resolve_device,
    run,
)
from model.io import atomic_write_json
from model.metrics import DEFAULT_FSCORE_THRESHOLD
from model.pipeline.extract import DEFAULT_LEVEL
from model.pipeline.reconstruct import CLI_POINTS, evaluate_mesh, load_vae, normalized_mesh, reconstruct_sample

#: ``--resolution`` with ``--weights``, and with a checkpoint that does not record its training resolutions.
DEFAULT_RESOLUTION = 256


def _fmt_bytes(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{n} B"
        n /= 1024
    return f"{n:.1f} GiB"


def _resolution(text: str) -> int:
    value = positive_int(text)
    if value < 8:
        raise argparse.ArgumentTypeError(f"expected a grid side >= 8, got {text!r}")
    return value


def build_parser() -> argparse.ArgumentParser:
    ap = make_parser("model.cli.reconstruct", __doc__)
    ap.add_argument("mesh", metavar="MESH", help="input mesh (any format trimesh reads: .obj .ply .stl .glb .off ...)")
    source = ap.add_mutually_exclusive_group(required=True)
    source.add_argument("--vae", metavar="CKPT",
                        help="VAE checkpoint: a file, or the --out folder of python -m model.cli.train_vae")
    source.add_argument("--weights", metavar="PATH_OR_ID",
                        help="released weights instead of --vae: a folder in the released layout (config.yaml and "
                             "the model_sparse_*.ckpt files) or a model hub id such as wushuang98/Direct3D-S2")
    ap.add_argument("--part", choices=("auto", "sparse_vae_512", "sparse_vae_1024"), default="auto",
                    help="released VAE to use with --weights: auto is sparse_vae_1024 above 512, else "
                         "sparse_vae_512 (default %(default)s)")
    ap.add_argument("--subfolder", metavar="NAME",
                    help="folder of the release inside --weights (default direct3d-s2-v-1-1)")
    ap.add_argument("--tau", type=positive_float,
                    help="SDF band half-width and scale in voxels (default: the checkpoint's; with --weights 4, an "
                         "assumption)")
    ap.add_argument("--chunk-size", type=positive_int, metavar="N",
                    help="decode in N^3 spatial chunks (default: the release's, 4 for sparse_vae_1024; 1 otherwise)")
    ap.add_argument("--resolution", type=_resolution, metavar="R",
                    help=f"SDF grid side (default: the checkpoint's first training resolution; {DEFAULT_RESOLUTION} "
                         "with --weights; released: 512, 1024)")
    add_out(ap, "output mesh file (.glb, .obj, .ply, .stl or .off; replaced when it exists)")
    add_device(ap)
    ap.add_argument("--dtype", choices=("auto", "float32", "bfloat16"), default="auto",
                    help="autocast dtype on CUDA: auto is bfloat16; the CPU always runs float32 (default %(default)s)")
    ap.add_argument("--level", type=float,
                    help="iso level (default 0 with --vae: our SDF is sdf/tau; 0.2 with --weights, as released)")
    ap.add_argument("--threshold", type=positive_float, default=DEFAULT_FSCORE_THRESHOLD,
                    help="F-score threshold in unit-cube sides (default %(default)g, i.e. 1/128)")
    ap.add_argument("--points", type=positive_int, default=CLI_POINTS, metavar="N",
                    help="surface points per mesh for the metrics (default %(default)s)")
    ap.add_argument("--original-frame", action="store_true",
                    help="write the mesh in the input's own frame (default: the unit cube of the data)")
    ap.add_argument("--json", metavar="FILE", help="also write the figures to this JSON file (default: none)")
    return ap


def main(argv=None) -> int:
    return run(build_parser(), _main, argv, outputs=lambda a: [a.out, a.json])


def _main(args) -> int:
    from model.data.sdf import load_mesh, mesh_to_sparse_sdf

    existing_file("MESH", args.mesh, "mesh file")
    out = output_file("--out", args.out)
    if args.json:
        output_file("--json", args.json, suffixes=(".json",))
    ckpt = checkpoint_file("--vae", args.vae) if args.vae is not None else None
    device = resolve_device(args.device)
    with loading("MESH", args.mesh):
        mesh = load_mesh(args.mesh)
    chunk_size, level = 1, DEFAULT_LEVEL if args.level is None else args.level
    resolution = args.resolution
    if args.weights is not None:
        from model.pipeline.pretrained import RELEASED_MC_LEVEL, RELEASED_SDF_TAU, from_pretrained

        resolution = resolution or DEFAULT_RESOLUTION
        part = args.part if args.part != "auto" else ("sparse_vae_1024" if resolution > 512 else "sparse_vae_512")
        with loading("--weights", args.weights):
            models = from_pretrained(args.weights, parts=part, device=device, subfolder=args.subfolder)
        vae = models[part]
        chunk_size = int(models.options[part].get("chunk_size", 1))
        tau, margin = RELEASED_SDF_TAU, 0.95
        level = RELEASED_MC_LEVEL if args.level is None else args.level
        print(f"weights    released {part} from {models.root} (input sdf/tau with tau {tau:g} voxels assumed; "
              f"level {level:g})")
    else:
        with loading("--vae", args.vae):
            vae, meta = load_vae(ckpt, device=device)
        data = meta.get("data", {})
        tau, margin = float(data.get("tau", 2.0)), float(data.get("margin", 0.95))
        trained = (meta.get("train_config") or {}).get("resolutions") or [DEFAULT_RESOLUTION]
        resolution = resolution or int(trained[0])
    if args.tau is not None:
        tau = args.tau
    if args.chunk_size is not None:
        chunk_size = args.chunk_size
    t0 = time.perf_counter()
    sample = mesh_to_sparse_sdf(mesh, resolution, tau=tau, margin=margin, compute_sharp=False)
    t_sdf = time.perf_counter() - t0
    if len(sample) == 0:
        raise UserError(f"MESH: {args.mesh}: no voxel of the {resolution}^3 grid lies within the band; give a "
                        "larger --resolution")
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
    out.parent.mkdir(parents=True, exist_ok=True)
    if len(out_mesh.faces):
        out_mesh.export(out)
    R = resolution
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
          f"extract {s['extract']:.2f} s on {describe_device(device)}")
    print(f"memory     {_fmt_bytes(rec.peak_memory_bytes)} ({rec.peak_memory_kind})")
    if args.json:
        doc = dict(mesh=args.mesh, checkpoint=str(ckpt) if ckpt else args.weights, resolution=R, tau=tau, level=level,
                   chunk_size=chunk_size, device=str(device),
                   input_voxels=rec.input_voxels, latent_voxels=rec.latent_voxels,
                   decoded_voxels=int(len(rec.decoded_sdf)), seconds=dict(sdf=t_sdf, **s),
                   peak_memory_bytes=rec.peak_memory_bytes, peak_memory_kind=rec.peak_memory_kind, **metrics)
        atomic_write_json(args.json, doc)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
