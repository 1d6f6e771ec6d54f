"""Sample a shape from an image with the sparse DiT, decode it with the VAE and extract a mesh.

``python -m model.cli.sample IMAGE [--mask MASK] --dit CKPT --vae CKPT --coords (MESH | COORDS.npy) --out OUT.glb``

1. The image (RGBA, or RGB with ``--mask``) goes through the released preprocessing and the DINOv2 encoder
   (:mod:`model.nets.conditioning`): ``--encoder`` names real weights; without it the encoder the DiT was trained with is
   rebuilt when that was a seeded random one (stored in the checkpoint), else a random ViT-L/14 with a loud warning.
2. The latent coordinates come from ``--coords`` (the dense structure stage that predicts them is a later issue): a
   ``.npy`` of ``[M, 3]`` (or ``[M, 4]`` with a batch column) latent voxel indices, or a mesh, voxelised at the SDF
   resolution (the data pipeline's band) and pooled to the latent grid.
3. Euler sampling with classifier-free guidance and the released schedule (:func:`model.flow.euler_sample`; steps
   30 / shift 6 for 64^3 latents and 15 / 8 for 128^3 unless given), seeded.
4. The latents are un-normalised with the training statistics stored in the checkpoint and decoded by the VAE; the
   decoded sparse SDF is saved as ``OUT`` with suffix ``.sdf.npz`` (``coords [K, 3]``, ``sdf [K]``, ``resolution``)
   next to the latents (``.latent.npz``), and the mesh is extracted with :func:`model.pipeline.extract.decoded_to_meshes`
   and written to ``OUT`` (any format trimesh writes: ``.glb``, ``.obj``, ``.ply``). When the extraction module
   cannot be imported (it needs trimesh and scikit-image) the mesh is skipped with a message and the SDF is kept.
"""
from __future__ import annotations

import argparse
import os
import sys
import warnings
from pathlib import Path

import numpy as np
import torch

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

    sample = mesh_to_sparse_sdf(os.fspath(path), sdf_resolution, tau=tau or DEFAULT_TAU, margin=margin or DEFAULT_MARGIN)
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


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m model.cli.sample", description=__doc__.split("\n\n")[0])
    p.add_argument("image", help="RGBA image, or RGB image with --mask")
    p.add_argument("--mask", help="object mask for an RGB image (white = object)")
    p.add_argument("--dit", required=True, help="DiT checkpoint (model.training.dit, or released weights with --config)")
    p.add_argument("--config", help="DiT preset for checkpoints without a stored config (e.g. released_1024)")
    p.add_argument("--weights", default="ema", choices=("ema", "model"), help="EMA (default) or raw weights")
    p.add_argument("--vae", required=True, help="VAE checkpoint")
    p.add_argument("--vae-config", help="VAE config preset or JSON (when the checkpoint has none)")
    p.add_argument("--coords", required=True, help="mesh file or .npy of latent coordinates [M, 3]")
    p.add_argument("--out", required=True, help="output mesh (.glb/.obj/.ply)")
    p.add_argument("--encoder", help="DINOv2-with-registers weights (folder or hub id, transformers format)")
    p.add_argument("--steps", type=int, help="Euler steps (default 30 at 64^3 latents, 15 at 128^3)")
    p.add_argument("--guidance", type=float, default=7.0, help="classifier-free guidance scale (default 7)")
    p.add_argument("--shift", type=float, help="timestep shift (default 6 at 64^3 latents, 8 at 128^3)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--resolution", type=int, help="SDF resolution for voxelising a --coords mesh "
                                                   "(default: the training data's)")
    p.add_argument("--backend", choices=("kernels", "reference"), help="SSA backend (default: the checkpoint's)")
    p.add_argument("--device", default="auto")
    p.add_argument("--level", type=float, default=None, help="iso level of the extraction (default: extract's)")
    args = p.parse_args(argv)

    from model.nets.dit import DiTConfig, load_dit
    from model.training.common import resolve_device
    from model.training.dit_data import data_params, load_vae

    device = resolve_device(args.device)
    config = DiTConfig.preset(args.config) if args.config else None
    model, meta = load_dit(args.dit, config=config, weights=args.weights, device="cpu", return_meta=True)
    if args.backend:
        model.set_mode(backend=args.backend)
    model = model.to(device)
    vae = load_vae(args.vae, config=args.vae_config, device=device)
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
    print(f"sampling {coords.shape[0]} latent tokens, {steps} steps, guidance {args.guidance}, shift {shift}")
    z = sample_latents(model, coords, cond, steps=steps, guidance=args.guidance, shift=shift, seed=args.seed,
                       device=device, progress=True)
    stats = meta.get("latent_stats")
    feats = z.feats
    if stats:
        feats = feats * torch.tensor(stats["std"], device=device) + torch.tensor(stats["mean"], device=device)
    from model.data.dataset import atomic_save_npz

    out = Path(args.out)
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
