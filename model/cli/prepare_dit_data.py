"""Prepare the sparse DiT's training data: sparse latents from the VAE and rendered conditioning views, per mesh.

The command line of :mod:`model.training.dit_data` (``python -m model.cli.prepare_dit_data --help``).
"""
from __future__ import annotations

import argparse
import sys

from model.training.dit_data import _file_key, load_vae, prepare_dataset


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m model.cli.prepare_dit_data", description=__doc__.split("\n\n")[0])
    p.add_argument("mesh_dir", help="folder of meshes (searched recursively) or one mesh file")
    p.add_argument("--vae", required=True, help="VAE checkpoint (model.training.common safetensors, or .pt)")
    p.add_argument("--vae-config", default=None, help="VAE config preset (tiny, released_512, released_1024) or JSON")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--views", type=int, default=4, help="rendered conditioning views per mesh (default 4)")
    p.add_argument("--image-size", type=int, default=518, help="render side in pixels (default 518)")
    p.add_argument("--elevation", type=float, default=20.0, help="camera elevation in degrees (default 20)")
    p.add_argument("--resolution", type=int, default=None, help="SDF resolution (default: the VAE's)")
    p.add_argument("--tau", type=float, default=None,
                   help="SDF band half-width in voxels (default: the VAE checkpoint's, else the data default)")
    p.add_argument("--render-backend", default="auto", choices=("auto", "pyrender", "numpy"))
    p.add_argument("--device", default="auto", help="auto, cpu or cuda[:i]")
    p.add_argument("--overwrite", action="store_true", help="recompute everything")
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    from model.training.common import resolve_device

    device = resolve_device(args.device)
    vae = load_vae(args.vae, config=args.vae_config, device=device)
    manifest = prepare_dataset(args.mesh_dir, vae, args.out, vae_key=_file_key(args.vae), views=args.views,
                               image_size=args.image_size, resolution=args.resolution, tau=args.tau,
                               elevation=args.elevation, render_backend=args.render_backend,
                               overwrite=args.overwrite, device=device, progress=not args.no_progress)
    print(f"prepared {len(manifest['items'])} meshes ({len(manifest['failed'])} failed) in {args.out}")
    return 0 if manifest["items"] else 1


if __name__ == "__main__":
    sys.exit(main())
