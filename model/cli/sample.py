"""Sample a shape from an image with the sparse DiT, decode it with the VAE and extract a mesh.

``python -m model.cli.sample IMAGE [--mask MASK] --dit CKPT --vae CKPT --coords (MESH | COORDS.npy) --out OUT.glb``;
``--dit`` and ``--vae`` take a checkpoint file or the ``--out`` folder of the trainer that wrote it.

1. The image (RGBA, or RGB with ``--mask``) goes through the released preprocessing and the DINOv2 encoder
   (:mod:`model.nets.conditioning`): ``--encoder`` names real weights; without it the encoder the DiT was trained
   with is rebuilt when that was a seeded random one (stored in the checkpoint), else a random ViT-L/14 with a loud
   warning.
2. The latent coordinates come from ``--coords`` (the dense structure stage that predicts them is a later issue): a
   ``.npy`` of ``[M, 3]`` (or ``[M, 4]`` with a batch column) latent voxel indices, or a mesh, voxelised at the SDF
   resolution (the data pipeline's band) and pooled to the latent grid.
3. Euler sampling with classifier-free guidance and the released schedule (:func:`model.flow.euler_sample`; steps
   30 / shift 6 for 64^3 latents and 15 / 8 for 128^3 unless given), seeded.
4. The latents are un-normalised with the training statistics stored in the checkpoint and decoded by the VAE; the
   decoded sparse SDF is saved as ``OUT`` with suffix ``.sdf.npz`` (``coords [K, 3]``, ``sdf [K]``, ``resolution``)
   next to the latents (``.latent.npz``), and the mesh is extracted with
   :func:`model.pipeline.extract.decoded_to_meshes` and written to ``OUT`` (``.glb``, ``.obj``, ``.ply``, ``.stl`` or
   ``.off``). When the extraction module cannot be imported (it needs trimesh and scikit-image) the mesh is skipped
   with a message and the SDF is kept.
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
    checkpoint_file,
    describe_device,
    existing_file,
    loading,
    make_parser,
    non_negative_float,
    output_file,
    positive_float,
    positive_int,
    resolve_device,
    run,
)

__all__ = ["latent_coords_from", "main", "sample_latents"]


def latent_coords_from(source, *, sdf_resolution: int, downsample: int, tau: float | None = None,
                       margin: float | None = None) -> torch.Tensor:
    """Latent voxel coordinates ``[M, 3]`` int32 (raster order) from a ``.npy`` file or a mesh.

    A mesh is voxelised with :func:`model.data.sdf.mesh_to_sparse_sdf` at ``sdf_resolution`` (band ``tau``) and its
    voxels pooled by ``downsample`` (the cells the VAE encoder would produce).
    """
    path = Path(source)
    if not path.is_file():
        raise FileNotFoundError(f"--coords: {path} does not exist")
    if path.suffix.lower() == ".npy":
        arr = np.load(path)
        if arr.ndim != 2 or arr.shape[1] not in (3, 4) or not np.issubdtype(arr.dtype, np.integer):
            raise ValueError(f"{path}: expected an integer array [M, 3] (x, y, z) or [M, 4] (batch, x, y, z), "
                             f"got {arr.dtype} {arr.shape}")
        if arr.shape[1] == 4:
            if (arr[:, 0] != arr[0, 0]).any():
                raise ValueError(f"{path}: holds several batch elements; give one shape")
            arr = arr[:, 1:]
        if len(arr) == 0 or arr.min() < 0:
            raise ValueError(f"{path}: coordinates must be non-empty and non-negative")
        arr = np.unique(arr.astype(np.int64), axis=0)
        return torch.from_numpy(arr.astype(np.int32))
    from model.data.sdf import DEFAULT_MARGIN, DEFAULT_TAU, mesh_to_sparse_sdf

    sample = mesh_to_sparse_sdf(os.fspath(path), sdf_resolution, tau=tau or DEFAULT_TAU,
                                margin=margin or DEFAULT_MARGIN)
    if len(sample) == 0:
        raise ValueError(f"{path}: the mesh gives no voxel at resolution {sdf_resolution}")
    cells = np.unique(sample.coords.astype(np.int64) // downsample, axis=0)
    return torch.from_numpy(cells.astype(np.int32))


@torch.no_grad()
def sample_latents(model, coords: torch.Tensor, cond, *, steps: int, guidance: float, shift: float, seed: int,
                   device, progress: bool = False):
    """Sampled latents (SparseTensor ``[M, C]``, float32) on ``coords [M, 3]`` for one condition."""
    from model.flow import euler_sample
    from model.sparse.tensor import SparseTensor

    c = coords.to(device)
    x = SparseTensor.from_list([c], [torch.zeros(c.shape[0], model.config.in_channels, device=device)])
    return euler_sample(model, x, cond, steps=steps, guidance=guidance, shift=shift, seed=seed, progress=progress)


def _encoder_for(args, meta: dict):
    from model.nets.conditioning import DinoV2Encoder

    if args.encoder:
        return DinoV2Encoder.from_pretrained(args.encoder)
    enc = meta.get("encoder") or {}
    if enc.get("weights"):
        return DinoV2Encoder.from_pretrained(enc["weights"])
    return DinoV2Encoder.build(None, size=enc.get("size", "vitl14"), seed=int(enc.get("seed", 0)))


def build_parser() -> argparse.ArgumentParser:
    p = make_parser("model.cli.sample", __doc__)
    p.add_argument("image", metavar="IMAGE", help="RGBA image, or RGB image with --mask")
    p.add_argument("--mask", metavar="FILE", help="object mask of an RGB image, white = object (default: none)")
    p.add_argument("--dit", required=True, metavar="CKPT",
                   help="DiT checkpoint: a file, or the --out folder of python -m model.cli.train_dit (its "
                        "checkpoints/last.safetensors); released weights with --config")
    p.add_argument("--config", metavar="PRESET",
                   help="DiT preset for checkpoints without a stored configuration, e.g. released_1024 "
                        "(default: the checkpoint's)")
    p.add_argument("--no-ema", dest="ema", action="store_false",
                   help="sample with the raw weights (default: the moving average of the weights, when stored)")
    p.add_argument("--vae", required=True, metavar="CKPT",
                   help="VAE checkpoint: a file, or the --out folder of python -m model.cli.train_vae")
    p.add_argument("--vae-config", metavar="PRESET_OR_JSON",
                   help="VAE configuration preset or JSON file, for checkpoints without one (default: the "
                        "checkpoint's)")
    p.add_argument("--coords", required=True, metavar="MESH_OR_NPY",
                   help="where the shape's latent voxels are: a mesh (voxelised) or a .npy of latent coordinates "
                        "[M, 3]")
    add_out(p, "output mesh file (.glb, .obj, .ply, .stl or .off); OUT.sdf.npz and OUT.latent.npz are written "
               "beside it")
    p.add_argument("--encoder", metavar="PATH_OR_ID",
                   help="DINOv2-with-registers weights, a folder or hub id (default: the random encoder the DiT "
                        "was trained with)")
    p.add_argument("--steps", type=positive_int, metavar="N",
                   help="Euler steps (default 30 at 64^3 latents, 15 at 128^3)")
    p.add_argument("--guidance", type=non_negative_float, default=7.0, metavar="G",
                   help="classifier-free guidance scale (default %(default)g)")
    p.add_argument("--shift", type=positive_float, help="timestep shift (default 6 at 64^3 latents, 8 at 128^3)")
    add_seed(p, what="noise seed")
    p.add_argument("--resolution", type=positive_int, metavar="R",
                   help="SDF grid side for voxelising a --coords mesh (default: the training data's)")
    p.add_argument("--backend", choices=("auto", "kernels", "reference"), default="auto",
                   help="SSA backend: auto is the Triton kernels on CUDA and the dense reference on the CPU "
                        "(default %(default)s)")
    add_device(p)
    p.add_argument("--level", type=float, default=None,
                   help="iso level of the mesh extraction (default: model.pipeline.extract's, 0)")
    add_no_progress(p)
    return p


def _outputs(args):
    out = Path(args.out)
    return [out, out.with_suffix(".latent.npz"), out.with_suffix(".sdf.npz")]


def main(argv=None) -> int:
    return run(build_parser(), _main, argv, outputs=_outputs)


def _main(args) -> int:
    from model.nets.dit import DiTConfig, load_dit
    from model.training.dit_data import data_params, load_vae

    existing_file("IMAGE", args.image, "image file")
    if args.mask:
        existing_file("--mask", args.mask, "mask image")
    existing_file("--coords", args.coords, "mesh or .npy file")
    dit_path = checkpoint_file("--dit", args.dit)
    vae_path = checkpoint_file("--vae", args.vae)
    out = output_file("--out", args.out)
    device = resolve_device(args.device)
    try:
        config = DiTConfig.preset(args.config) if args.config else None
    except ValueError as exc:
        raise UserError(f"--config: {exc}") from None
    with loading("--dit", args.dit):
        model, meta = load_dit(dit_path, config=config, weights="ema" if args.ema else "model", device="cpu",
                               return_meta=True)
    model.set_mode(backend=("kernels" if device.type == "cuda" else "reference") if args.backend == "auto"
                   else args.backend)
    model = model.to(device)
    with loading("--vae", args.vae):
        vae = load_vae(vae_path, config=args.vae_config, device=device)
    latent_res = int(meta.get("latent_resolution") or model.config.resolution)
    sdf_res = args.resolution or latent_res * vae.config.downsample_factor
    steps = args.steps or (30 if latent_res <= 64 else 15)
    shift = args.shift or (6.0 if latent_res <= 64 else 8.0)

    encoder = _encoder_for(args, meta).to(device)
    cond = encoder.encode_images([args.image], [args.mask] if args.mask else None,
                                 sparse=model.config.sparse_conditions)
    tau, margin = data_params(vae)
    coords = latent_coords_from(args.coords, sdf_resolution=sdf_res, downsample=vae.config.downsample_factor,
                                tau=tau, margin=margin)
    print(f"sampling {coords.shape[0]} latent tokens, {steps} steps, guidance {args.guidance:g}, shift {shift:g} "
          f"on {describe_device(device)}")
    z = sample_latents(model, coords, cond, steps=steps, guidance=args.guidance, shift=shift, seed=args.seed,
                       device=device, progress=args.progress)
    stats = meta.get("latent_stats")
    feats = z.feats
    if stats:
        feats = feats * torch.tensor(stats["std"], device=device) + torch.tensor(stats["mean"], device=device)
    from model.io import atomic_save_npz

    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_save_npz(out.with_suffix(".latent.npz"), {"coords": coords.numpy(), "latent": feats.cpu().numpy()})
    with torch.no_grad():
        decoded = vae.decode(z.replace(feats.to(z.dtype)))
    sdf = decoded.sdf
    sdf.resolution = sdf_res
    atomic_save_npz(out.with_suffix(".sdf.npz"), {"coords": sdf.coords[:, 1:].cpu().numpy(),
                                                  "sdf": sdf.feats[:, 0].float().cpu().numpy(),
                                                  "resolution": np.int64(sdf_res)})
    print(f"decoded {sdf.num_voxels} SDF voxels at {sdf_res}^3 -> {out.with_suffix('.sdf.npz')}")
    try:
        from model.pipeline.extract import decoded_to_meshes
    except ImportError as exc:
        print(f"mesh extraction unavailable ({exc}); kept the decoded SDF only", file=sys.stderr)
        return 0
    kwargs = {} if args.level is None else {"level": args.level}
    mesh = decoded_to_meshes(sdf.to(device="cpu"), resolution=sdf_res, **kwargs)[0]
    if len(mesh.faces) == 0:
        warnings.warn("the decoded SDF has no surface at the extraction level: no mesh written", RuntimeWarning)
        return 0
    mesh.export(os.fspath(out))
    print(f"mesh with {len(mesh.vertices)} vertices, {len(mesh.faces)} faces -> {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
