"""Image to mesh with the released Direct3D-S2 cascade: one .glb mesh and one .png preview per image.

``python -m model.cli.generate IMAGE [IMAGE ...] --weights PATH_OR_ID --out DIR [--resolution 512|1024]
[--steps-dense N --steps-512 N --steps-1024 N] [--guidance G] [--seed S] [--faces F] [--device D]``

For each image, writes ``DIR/<name>.glb`` (the mesh, in the unit cube) and ``DIR/<name>.png`` (the image the encoder
saw beside a render of the mesh), shows a progress bar for every stage that takes a while (``--no-progress``: none)
and prints the device (with the number of CPU threads on a CPU) and the time and peak GPU memory of every stage at
the end.

- Images: RGBA (alpha = object mask), or RGB with the object on a uniform background: the background colour is the
  median of the border pixels, and every pixel within ``--tolerance`` (default 12 of 255, per channel) of it that is
  connected to the border is background (:func:`model.pipeline.images.load_rgba`). Grayscale images, other modes,
  missing or unreadable files and non-uniform backgrounds are errors naming the image; all images are checked before
  any weights are loaded.
- ``--weights``: a released folder or a model hub id (:func:`model.pipeline.pretrained.from_pretrained`), with the
  DINOv2 encoder from ``--encoder`` (default the hub's ``facebook/dinov2-with-registers-large``; ``random`` for random
  weights). ``random:tiny`` runs the whole cascade with random weights of a tiny configuration (for smoke tests,
  with 4 / 3 / 2 steps unless ``--steps-*`` say otherwise: under a minute on a CPU) and ``random:released``
  with random weights of the released sizes (GPU timing), both built by
  :meth:`model.pipeline.cascade.ImageToMesh.from_pretrained`; both say on stderr that the output is noise.
- Sampling defaults are the released ones (50 / 30 / 15 steps, guidance 7); ``--faces`` simplifies the mesh to a
  face budget, ``--simplify-ratio`` removes a share of its faces (the released post-processing: 0.95), both by
  quadric decimation (``fast-simplification``).
"""
from __future__ import annotations

import argparse
import os
import sys
import warnings
from pathlib import Path

import numpy as np
import torch

from model.cli.args import (
    UserError,
    add_device,
    add_no_progress,
    add_out,
    add_seed,
    describe_device,
    make_parser,
    non_negative_float,
    non_negative_int,
    output_folder,
    positive_int,
    resolve_device,
    run,
    share_below_one,
)

__all__ = ["format_stages", "main", "save_preview"]

#: Steps per stage of ``--weights random:tiny`` where ``--steps-*`` are not given (its output is noise anyway).
SMOKE_STEPS = {"dense": 4, "512": 3, "1024": 2}
#: ``--dtype`` names.
DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}
#: Side of the mesh render in the preview.
PREVIEW_SIZE = 384


def _guidance(text: str) -> float:
    try:
        return non_negative_float(text)
    except argparse.ArgumentTypeError:
        raise argparse.ArgumentTypeError(f"expected a finite number >= 0, got {text!r}") from None


def _tolerance(text: str) -> int:
    value = non_negative_int(text)
    if value > 255:
        raise argparse.ArgumentTypeError(f"expected an integer in [0, 255], got {value}")
    return value


#: Kept for model.reports.generate.
_positive_int = positive_int


def _gb(nbytes) -> str:
    return "n/a" if nbytes is None else f"{nbytes / 1e9:.2f} GB"


#: Stage facts shown in the notes column of :func:`format_stages`.
_NOTE_KEYS = ("tokens", "occupied_voxels", "voxels", "kept_voxels", "faces", "level")


def _note(key: str, value) -> str:
    text = f"{value:.3g}" if isinstance(value, float) else f"{value:,}" if isinstance(value, int) else str(value)
    return f"{key.replace('_', ' ')} {text}"


def format_stages(stages: dict, title: str = "") -> str:
    """A fixed-width table of ``{stage: StageRecord}``: seconds and peak GPU memory per stage, and the total."""
    lines = [title] if title else []
    lines.append(f"  {'stage':<12} {'seconds':>9} {'peak GPU memory':>16}  notes")
    total = 0.0
    for name, rec in stages.items():
        total += rec.seconds
        notes = ", ".join(_note(k, rec.info[k]) for k in _NOTE_KEYS if rec.info.get(k) is not None)
        lines.append(f"  {name:<12} {rec.seconds:>9.2f} {_gb(rec.peak_bytes):>16}  {notes}")
    peaks = [r.peak_bytes for r in stages.values() if r.peak_bytes is not None]
    lines.append(f"  {'total':<12} {total:>9.2f} {_gb(max(peaks) if peaks else None):>16}")
    return "\n".join(lines)


def _y_up_to_z_up(mesh):
    """The preview renderer looks at a z-up scene; our meshes (and glTF) are y-up."""
    import trimesh

    v = np.asarray(mesh.vertices)
    return trimesh.Trimesh(np.stack([v[:, 0], -v[:, 2], v[:, 1]], 1), mesh.faces, process=False)


def save_preview(path, image, mesh, *, caption: str = "", size: int = PREVIEW_SIZE) -> Path:
    """A PNG with ``image`` (``[3, S, S]`` float tensor in [0, 1], or an ``[H, W, 3|4]`` uint8 array) beside a
    render of ``mesh`` (:func:`model.pipeline.preview.render_mesh`, headless numpy point splatting)."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    from model.pipeline.preview import framing_extent, render_mesh, save_figure

    if isinstance(image, torch.Tensor):
        image = image.detach().float().clamp(0, 1).permute(1, 2, 0).cpu().numpy()
    up = _y_up_to_z_up(mesh)
    render = render_mesh(up, size=size, extent=max(framing_extent(up), 1e-3))
    fig, axes = plt.subplots(1, 2, figsize=(8, 4.3))
    axes[0].imshow(image)
    axes[0].set_title("input (preprocessed)", fontsize=9)
    axes[1].imshow(render, cmap="gray", vmin=0, vmax=1)
    axes[1].set_title(f"mesh: {len(mesh.faces):,} faces", fontsize=9)
    for ax in axes:
        ax.set_xticks([])
        ax.set_yticks([])
    if caption:
        fig.suptitle(caption, fontsize=9)
    fig.tight_layout()
    return save_figure(fig, path)


def _output_names(images: list[str]) -> list[str]:
    """File stems for the outputs, made unique (``name``, ``name-2``, ...)."""
    seen: dict[str, int] = {}
    out = []
    for image in images:
        stem = Path(image).stem or "image"
        seen[stem] = seen.get(stem, 0) + 1
        out.append(stem if seen[stem] == 1 else f"{stem}-{seen[stem]}")
    return out


def build_parser() -> argparse.ArgumentParser:
    from model.pipeline.cascade import DEFAULT_ENCODER, INTERIOR_MODES, RELEASED_GUIDANCE, RELEASED_STEPS
    from model.pipeline.images import BACKGROUND_TOLERANCE

    p = make_parser("model.cli.generate", __doc__)
    p.add_argument("images", nargs="+", metavar="IMAGE", help="RGBA image, or RGB image on a uniform background")
    p.add_argument("--weights", required=True, metavar="PATH_OR_ID",
                   help="released folder or model hub id; random:tiny (a CPU smoke test) or random:released for "
                        "random weights")
    add_out(p, "output folder: one NAME.glb and one NAME.png per image (created when missing)")
    p.add_argument("--resolution", type=int, choices=(512, 1024), default=1024,
                   help="output grid side (default %(default)s)")
    for stage in ("dense", "512", "1024"):
        p.add_argument(f"--steps-{stage}", type=positive_int, metavar="N",
                       help=f"sampling steps of the {stage} stage (default {RELEASED_STEPS[stage]}; "
                            f"{SMOKE_STEPS[stage]} with random:tiny)")
    p.add_argument("--guidance", type=_guidance, metavar="G",
                   help=f"classifier-free guidance scale of every stage (default {RELEASED_GUIDANCE:g})")
    add_seed(p, what="noise seed")
    p.add_argument("--faces", type=positive_int, metavar="N",
                   help="simplify each mesh to at most N faces (default: keep every face)")
    p.add_argument("--simplify-ratio", type=share_below_one, metavar="R",
                   help="simplify each mesh by removing this share of its faces, in [0, 1) (the released "
                        "post-processing uses 0.95; default: keep every face; not with --faces)")
    add_device(p)
    p.add_argument("--dtype", choices=sorted(DTYPES),
                   help="weights dtype (default float16 on CUDA, float32 on the CPU)")
    p.add_argument("--encoder", default=DEFAULT_ENCODER, metavar="PATH_OR_ID",
                   help="DINOv2-with-registers weights, a folder or hub id, or 'random' for random weights "
                        "(default %(default)s)")
    p.add_argument("--interior", choices=INTERIOR_MODES, default="refiner",
                   help="fill of the 1024 field's empty voxels: the sign refiner (refiner, as released), +1 (keep: "
                        "leaves the inner shell) or our per-brick component rule (components) (default %(default)s)")
    p.add_argument("--offload", action="store_true",
                   help="keep the parts on the CPU, each on the GPU only for its stage (less GPU memory)")
    p.add_argument("--tolerance", type=_tolerance, default=BACKGROUND_TOLERANCE, metavar="T",
                   help="background colour tolerance of RGB images, 0..255 per channel (default %(default)s)")
    p.add_argument("--subfolder", metavar="NAME",
                   help="folder inside the released repository (default direct3d-s2-v-1-1)")
    p.add_argument("--local-files-only", action="store_true", help="do not download, use the hub cache only")
    p.add_argument("--no-preview", action="store_true", help="do not write the preview PNGs")
    add_no_progress(p)
    return p


def _build_pipe(args, device, dtype, config):
    from model.pipeline.cascade import ImageToMesh
    from model.pipeline.random_weights import random_size

    size = random_size(args.weights)  # None for released weights; ValueError for an unknown random:<size>
    if size is not None:
        print(f"WARNING: --weights {args.weights}: every part has RANDOM weights ({size} sizes); the meshes are "
              "NOISE, for smoke tests and timing only", file=sys.stderr)
    elif args.encoder == "random":
        print("WARNING: --encoder random: the image encoder has RANDOM weights; the meshes do not follow the "
              "images", file=sys.stderr)
    hub = {k: v for k, v in (("subfolder", args.subfolder), ("local_files_only", args.local_files_only)) if v}
    with warnings.catch_warnings():
        if size is not None:
            warnings.simplefilter("ignore", UserWarning)  # said above
        return ImageToMesh.from_pretrained(args.weights, device=device, dtype=dtype, encoder=args.encoder,
                                           resolution=args.resolution, config=config, offload=args.offload,
                                           seed=args.seed, **hub)


def main(argv=None) -> int:
    parser = build_parser()
    return run(parser, lambda args: _main(parser, args), argv)


def _main(parser, args) -> int:
    from model.pipeline.cascade import EmptyStageError
    from model.pipeline.images import load_rgba

    if args.faces is not None and args.simplify_ratio is not None:
        parser.error("give one of --faces and --simplify-ratio, not both")
    out = output_folder("--out", args.out)
    images = []
    for path in args.images:
        try:
            images.append(load_rgba(path, tolerance=args.tolerance, name=f"IMAGE {path!r}"))
        except (ValueError, TypeError) as exc:
            parser.error(str(exc))
    device = resolve_device(args.device)
    dtype = DTYPES[args.dtype] if args.dtype else None
    config = {"interior": args.interior}  # over the default settings of the weights (random:tiny has its own)
    try:
        pipe = _build_pipe(args, device, dtype, config)
    except (ValueError, TypeError, RuntimeError, OSError) as exc:
        raise UserError(f"--weights {args.weights}: {exc}") from exc
    steps = {"dense": args.steps_dense, "512": args.steps_512, "1024": args.steps_1024}
    if args.weights == "random:tiny":  # a smoke test: few steps unless asked otherwise (noise either way)
        steps = {k: v if v is not None else SMOKE_STEPS[k] for k, v in steps.items()}
    out.mkdir(parents=True, exist_ok=True)
    failed = 0
    summaries = []
    where = f"{describe_device(pipe.device)}, {str(pipe.dtype).replace('torch.', '')}"
    for path, rgba, name in zip(args.images, images, _output_names(args.images)):
        print(f"{path}: generating at {args.resolution} on {where}", file=sys.stderr)
        try:
            result = pipe.generate(rgba, resolution=args.resolution, steps=steps, guidance=args.guidance,
                                   seed=args.seed, faces=args.faces, simplify_ratio=args.simplify_ratio,
                                   progress=args.progress)
        except EmptyStageError as exc:
            print(f"{path}: FAILED: {exc}", file=sys.stderr)
            failed += 1
            continue
        mesh = result.mesh
        lines = [f"{path}: on {where}"]
        if len(mesh.faces) == 0:
            lines.append("  EMPTY mesh: nothing written")
            failed += 1
        else:
            glb = out / f"{name}.glb"
            mesh.export(os.fspath(glb))
            lines.append(f"  mesh {len(mesh.vertices):,} vertices, {len(mesh.faces):,} faces -> {glb}")
            if not args.no_preview:
                caption = f"{Path(path).name}: seed {args.seed}, {args.resolution}^3"
                if pipe.random_weights:
                    caption += ", RANDOM WEIGHTS (noise)"
                png = save_preview(out / f"{name}.png", result.image.rgb, mesh, caption=caption)
                lines.append(f"  preview -> {png}")
        lines.append(format_stages(result.stages))
        summaries.append("\n".join(lines))
    print("\n\n".join(summaries))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
