"""Prepare the sparse DiT's training data: per mesh, sparse latents from the VAE and rendered conditioning views;
writes NAME/latent.npz, NAME/view_XX.png and manifest.json into --out.

The command line of ``model.training.dit_data.prepare_dataset``. Views are rendered with pyrender when it is
installed (the ``render`` extra: ``pip install -e '.[render]'``), else with the numpy rasteriser.
"""
from __future__ import annotations

import argparse
import sys

from model.cli.args import (
    UserError,
    add_device,
    add_no_progress,
    add_out,
    checkpoint_file,
    existing_path,
    finite_float,
    loading,
    make_parser,
    output_folder,
    positive_float,
    positive_int,
    resolve_device,
    run,
)


def _image_size(text: str) -> int:
    value = positive_int(text)
    if value < 16:
        raise argparse.ArgumentTypeError(f"expected at least 16 pixels, got {text!r}")
    return value


def build_parser() -> argparse.ArgumentParser:
    p = make_parser("model.cli.prepare_dit_data", __doc__)
    p.add_argument("mesh_dir", metavar="MESHES", help="folder of meshes (searched recursively) or one mesh file")
    p.add_argument("--vae", required=True, metavar="CKPT",
                   help="VAE checkpoint: a file, or the --out folder of python -m model.cli.train_vae")
    p.add_argument("--vae-config", metavar="PRESET_OR_JSON",
                   help="VAE configuration preset (tiny, released_512, released_1024) or JSON file, for checkpoints "
                        "without one (default: the checkpoint's)")
    add_out(p, "output folder (created when missing; meshes already prepared in it are kept)")
    p.add_argument("--views", type=positive_int, default=4, metavar="N",
                   help="rendered conditioning views per mesh (default %(default)s)")
    p.add_argument("--image-size", type=_image_size, default=518, metavar="PX",
                   help="side of the rendered views in pixels (default %(default)s)")
    p.add_argument("--elevation", type=finite_float, default=20.0, metavar="DEGREES",
                   help="camera elevation in degrees (default %(default)g)")
    p.add_argument("--resolution", type=positive_int, metavar="R",
                   help="SDF grid side (default: the VAE's training resolution)")
    p.add_argument("--tau", type=positive_float,
                   help="SDF band half-width in voxels (default: the VAE checkpoint's, else 2)")
    p.add_argument("--render-backend", default="auto", choices=("auto", "pyrender", "numpy"),
                   help="view renderer: auto is pyrender when installed, else numpy (default %(default)s)")
    add_device(p)
    p.add_argument("--overwrite", action="store_true", help="recompute meshes already prepared in --out")
    add_no_progress(p)
    return p


def _main(args) -> int:
    from model.data.meshes import MESH_EXTENSIONS, find_meshes
    from model.training.dit_data import _file_key, load_vae, prepare_dataset

    existing_path("MESHES", args.mesh_dir, "folder of meshes or mesh file")
    try:
        if not find_meshes(args.mesh_dir):
            raise UserError(f"MESHES: no mesh files ({' '.join(MESH_EXTENSIONS)}) under {args.mesh_dir}")
    except ValueError as exc:
        raise UserError(f"MESHES: {exc}") from None
    vae_path = checkpoint_file("--vae", args.vae)
    output_folder("--out", args.out)
    device = resolve_device(args.device)
    if args.render_backend == "pyrender":
        import importlib.util

        if importlib.util.find_spec("pyrender") is None:
            raise UserError("--render-backend pyrender: pyrender is not installed: pip install -e '.[render]', or "
                            "use --render-backend auto")
    with loading("--vae", args.vae):
        vae = load_vae(vae_path, config=args.vae_config, device=device)
    manifest = prepare_dataset(args.mesh_dir, vae, args.out, vae_key=_file_key(vae_path), views=args.views,
                               image_size=args.image_size, resolution=args.resolution, tau=args.tau,
                               elevation=args.elevation, render_backend=args.render_backend,
                               overwrite=args.overwrite, device=device, progress=args.progress)
    print(f"prepared {len(manifest['items'])} meshes ({len(manifest['failed'])} failed) in {args.out}")
    return 0 if manifest["items"] else 1


def main(argv=None) -> int:
    return run(build_parser(), _main, argv)


if __name__ == "__main__":
    sys.exit(main())
