"""Image to mesh from the command line, with the released Direct3D-S2 cascade (:class:`model.pipeline.cascade.ImageToMesh`).

``python -m model.cli.generate IMAGE [IMAGE ...] --weights PATH_OR_ID --out DIR [--resolution 512|1024]
[--steps-dense N --steps-512 N --steps-1024 N] [--guidance G] [--seed S] [--faces F] [--device D]``

For each image, writes ``DIR/<name>.glb`` (the mesh, in the unit cube) and ``DIR/<name>.png`` (the image the encoder
saw beside a render of the mesh), shows a progress bar per sampling stage and prints the time and peak GPU memory of
every stage at the end.

- Images: RGBA (alpha = object mask), or RGB with the object on a uniform background: the background colour is the
  median of the border pixels, and every pixel within ``--tolerance`` (default 12 of 255, per channel) of it that is
  connected to the border is background (:func:`model.pipeline.cascade.load_rgba`). Grayscale images, other modes, missing or
  unreadable files and non-uniform backgrounds are errors naming the image; all images are checked before any
  weights are loaded.
- ``--weights``: a released folder or a model hub id (:func:`model.pipeline.pretrained.from_pretrained`), with the DINOv2
  encoder from ``--encoder`` (default the hub's ``facebook/dinov2-with-registers-large``; ``random`` for random
  weights). ``random:tiny`` runs the whole cascade with random weights of a tiny configuration (for smoke tests,
  with 4 / 3 / 2 steps unless ``--steps-*`` say otherwise: under a minute on a CPU) and ``random:released``
  with random weights of the released sizes (GPU timing); both say on stderr that the output is noise.
- Sampling defaults are the released ones (50 / 30 / 15 steps, guidance 7); ``--faces`` simplifies the mesh to a
  face budget when trimesh's quadric decimation is available (it needs the ``fast_simplification`` package; without
  it the mesh is kept, with a warning).
"""
from __future__ import annotations

import argparse
import math
import os
import sys
import warnings
from pathlib import Path

import numpy as np
import torch

__all__ = ["DEFAULT_ENCODER", "RANDOM_WEIGHTS", "format_stages", "main", "save_preview"]

#: transformers checkpoint of DINOv2 ViT-L/14 with registers (the released image encoder's weights).
DEFAULT_ENCODER = "facebook/dinov2-with-registers-large"
#: ``--weights`` values that build random weights instead of loading them.
RANDOM_WEIGHTS = {"random:tiny": "tiny", "random:released": "released"}
#: Steps per stage of ``--weights random:tiny`` where ``--steps-*`` are not given (its output is noise anyway).
SMOKE_STEPS = {"dense": 4, "512": 3, "1024": 2}
#: ``--dtype`` names.
DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}
#: Side of the mesh render in the preview.
PREVIEW_SIZE = 384


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def _guidance(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number >= 0, got {text!r}") from None
    if not math.isfinite(value) or value < 0:
        raise argparse.ArgumentTypeError(f"expected a finite number >= 0, got {text!r}")
    return value


def _tolerance(text: str) -> int:
    value = _positive_int(text) if text != "0" else 0
    if value > 255:
        raise argparse.ArgumentTypeError(f"expected an integer in [0, 255], got {value}")
    return value


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
    from model.pipeline.cascade import (
        BACKGROUND_TOLERANCE,
        INTERIOR_MODES,
        RELEASED_GUIDANCE,
        RELEASED_STEPS,
    )

    p = argparse.ArgumentParser(prog="python -m model.cli.generate", description=__doc__.split("\n\n")[0])
    p.add_argument("images", nargs="+", metavar="IMAGE", help="RGBA image, or RGB image on a uniform background")
    p.add_argument("--weights", required=True,
                   help="released folder or model hub id; random:tiny / random:released for random weights")
    p.add_argument("--out", required=True, help="output folder (one .glb and one .png per image)")
    p.add_argument("--resolution", type=int, choices=(512, 1024), default=1024, help="output grid (default 1024)")
    p.add_argument("--steps-dense", type=_positive_int, help=f"dense stage steps (default {RELEASED_STEPS['dense']})")
    p.add_argument("--steps-512", type=_positive_int, help=f"512 stage steps (default {RELEASED_STEPS['512']})")
    p.add_argument("--steps-1024", type=_positive_int, help=f"1024 stage steps (default {RELEASED_STEPS['1024']})")
    p.add_argument("--guidance", type=_guidance, help=f"guidance scale of every stage (default {RELEASED_GUIDANCE})")
    p.add_argument("--seed", type=int, default=0, help="noise seed (default 0)")
    p.add_argument("--faces", type=_positive_int, help="simplify each mesh to at most this many faces")
    p.add_argument("--device", default="auto", help="auto (default: cuda when available), cpu, cuda, cuda:1, ...")
    p.add_argument("--dtype", choices=sorted(DTYPES), help="weights dtype (default float16 on CUDA, float32 on CPU)")
    p.add_argument("--encoder", default=DEFAULT_ENCODER,
                   help=f"DINOv2-with-registers weights, folder or hub id (default {DEFAULT_ENCODER}); 'random' for "
                        "random weights")
    p.add_argument("--interior", choices=INTERIOR_MODES, default="refiner",
                   help="fill of the 1024 field's empty voxels: the sign refiner (released, default), +1 ('keep': "
                        "leaves the inner shell) or our per-brick component rule")
    p.add_argument("--offload", action="store_true", help="keep the parts on the CPU, each on the GPU only for its "
                                                          "stage (less GPU memory)")
    p.add_argument("--tolerance", type=_tolerance, default=BACKGROUND_TOLERANCE,
                   help=f"background colour tolerance for RGB images, 0..255 (default {BACKGROUND_TOLERANCE})")
    p.add_argument("--subfolder", help="folder inside the released repository (default direct3d-s2-v-1-1)")
    p.add_argument("--local-files-only", action="store_true", help="do not download, use the hub cache only")
    p.add_argument("--no-preview", action="store_true", help="do not write the preview PNGs")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    return p


def _build_pipe(args, device, dtype, config):
    from model.pipeline.cascade import ImageToMesh

    if args.weights in RANDOM_WEIGHTS:
        size = RANDOM_WEIGHTS[args.weights]
        print(f"WARNING: --weights {args.weights}: every part has RANDOM weights ({size} sizes); the meshes are "
              "NOISE, for smoke tests and timing only", file=sys.stderr)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # said above
            cfg = config if size == "released" else None
            pipe = ImageToMesh.random(size, seed=args.seed, device=device, dtype=dtype, offload=args.offload,
                                      config=cfg)
        if args.interior != "refiner":
            pipe.config = pipe.config.replace(interior=args.interior)
        return pipe
    hub = {k: v for k, v in (("subfolder", args.subfolder), ("local_files_only", args.local_files_only)) if v}
    if args.encoder == "random":
        print("WARNING: --encoder random: the image encoder has RANDOM weights; the meshes do not follow the "
              "images", file=sys.stderr)
    return ImageToMesh.from_pretrained(args.weights, device=device, dtype=dtype, encoder=args.encoder,
                                       resolution=args.resolution, config=config, offload=args.offload, **hub)


def main(argv=None) -> int:
    from model.pipeline.cascade import CascadeConfig, EmptyStageError, load_rgba

    parser = build_parser()
    args = parser.parse_args(argv)
    images = []
    for path in args.images:
        try:
            images.append(load_rgba(path, tolerance=args.tolerance, name=f"IMAGE {path!r}"))
        except (ValueError, TypeError) as exc:
            parser.error(str(exc))
    try:
        from model.pipeline.cascade import _default_device

        device = _default_device(args.device)
    except (ValueError, RuntimeError) as exc:
        parser.error(f"--device: {exc}")
    dtype = DTYPES[args.dtype] if args.dtype else None
    config = CascadeConfig(interior=args.interior)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    try:
        pipe = _build_pipe(args, device, dtype, config)
    except (ValueError, TypeError, RuntimeError, OSError) as exc:
        print(f"{parser.prog}: error: --weights {args.weights}: {exc}", file=sys.stderr)
        return 2
    steps = {"dense": args.steps_dense, "512": args.steps_512, "1024": args.steps_1024}
    if args.weights == "random:tiny":  # a smoke test: few steps unless asked otherwise (noise either way)
        steps = {k: v if v is not None else SMOKE_STEPS[k] for k, v in steps.items()}
    failed = 0
    summaries = []
    for path, rgba, name in zip(args.images, images, _output_names(args.images)):
        print(f"{path}: generating at {args.resolution} on {pipe.device} ({str(pipe.dtype).replace('torch.', '')})",
              file=sys.stderr)
        try:
            result = pipe.generate(rgba, resolution=args.resolution, steps=steps, guidance=args.guidance,
                                   seed=args.seed, faces=args.faces, progress=not args.no_progress)
        except EmptyStageError as exc:
            print(f"{path}: FAILED: {exc}", file=sys.stderr)
            failed += 1
            continue
        mesh = result.mesh
        lines = [f"{path}:"]
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
