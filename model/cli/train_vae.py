"""Train the sparse SDF VAE: ``python -m model.cli.train_vae`` over :func:`train`.

The command line of :mod:`model.training.vae` (``python -m model.cli.train_vae --help``).
"""
from __future__ import annotations

import json
import sys
from typing import Sequence

from model.training.common import load_config_file
from model.training.vae import MODEL_PRESETS, VAETrainConfig, train


def _parser():
    import argparse

    ap = argparse.ArgumentParser(prog="python -m model.cli.train_vae", description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    S = argparse.SUPPRESS  # unset flags do not override the config file or the dataclass defaults
    ap.add_argument("--config", default=S, help="JSON or YAML file of VAETrainConfig fields (flags override it)")
    src = ap.add_argument_group("data")
    src.add_argument("--meshes", default=S, help="folder (searched recursively) or file of meshes")
    src.add_argument("--pybullet", type=int, default=S, help="use the first N pybullet objects")
    src.add_argument("--max-meshes", dest="max_meshes", type=int, default=S, help="first N meshes of --meshes")
    src.add_argument("--resolutions", type=int, nargs="+", default=S, help="SDF resolutions (one per batch)")
    src.add_argument("--tau", type=float, default=S, help="band half-width in voxels")
    src.add_argument("--cache-dir", dest="cache_dir", default=S)
    src.add_argument("--prepare-workers", dest="prepare_workers", type=int, default=S)
    src.add_argument("--held-out-fraction", dest="held_out_fraction", type=float, default=S)
    src.add_argument("--split-seed", dest="split_seed", type=int, default=S, help="seed of the name-hash split")
    mdl = ap.add_argument_group("model and optimisation")
    mdl.add_argument("--model", choices=sorted(MODEL_PRESETS), default=S, help="VAE size preset")
    mdl.add_argument("--model-overrides", dest="model_overrides", type=json.loads, default=S,
                     help='JSON object of VAEConfig fields, e.g. \'{"latent_channels": 8}\'')
    mdl.add_argument("--batch-size", dest="batch_size", type=int, default=S)
    mdl.add_argument("--steps", type=int, default=S)
    mdl.add_argument("--lr", type=float, default=S)
    mdl.add_argument("--weight-decay", dest="weight_decay", type=float, default=S)
    mdl.add_argument("--warmup-steps", dest="warmup_steps", type=int, default=S)
    mdl.add_argument("--schedule", choices=("cosine", "constant"), default=S)
    mdl.add_argument("--min-lr-ratio", dest="min_lr_ratio", type=float, default=S, help="end of the cosine, x lr")
    mdl.add_argument("--anneal-to-time-limit", dest="anneal_to_time_limit", action="store_true", default=S,
                     help="the cosine follows the elapsed fraction of --time-limit when that is further along")
    mdl.add_argument("--grad-clip", dest="grad_clip", type=float, default=S)
    for name in ("in", "extra", "sharp", "kl", "prune"):
        mdl.add_argument(f"--weight-{name}", dest=f"weight_{name}", type=float, default=S)
    run = ap.add_argument_group("run")
    run.add_argument("--time-limit", dest="time_limit", type=float, default=S,
                     help="minutes of training, then checkpoint and stop")
    run.add_argument("--device", default=S, help="auto, cpu, cuda, cuda:N")
    run.add_argument("--no-bf16", dest="bf16", action="store_false", default=S, help="float32 on CUDA")
    run.add_argument("--out", default=S, help="output folder")
    run.add_argument("--resume", action="store_true", default=S, help="continue from OUT/checkpoint.safetensors")
    run.add_argument("--seed", type=int, default=S)
    run.add_argument("--log-every", dest="log_every", type=int, default=S)
    run.add_argument("--ckpt-every", dest="ckpt_every", type=int, default=S)
    run.add_argument("--val-every", dest="val_every", type=int, default=S)
    run.add_argument("--val-meshes", dest="val_meshes", type=int, default=S)
    run.add_argument("--val-resolution", dest="val_resolution", type=int, default=S)
    run.add_argument("--val-points", dest="val_points", type=int, default=S, help="surface points per mesh")
    run.add_argument("--num-workers", dest="num_workers", type=int, default=S, help="data loader processes")
    run.add_argument("--no-progress", dest="progress", action="store_false", default=S)
    return ap


def config_from_args(argv: Sequence[str] | None = None) -> VAETrainConfig:
    """Dataclass defaults <- config file (``--config``) <- flags given on the command line."""
    args = vars(_parser().parse_args(argv))
    values: dict = {}
    if "config" in args:
        values.update(load_config_file(args.pop("config")))
    if "meshes" in args or "pybullet" in args:  # a flag picks the data source over the file's
        values.pop("meshes", None)
        values.pop("pybullet", None)
    values.update(args)
    return VAETrainConfig.from_dict(values)


def main(argv: Sequence[str] | None = None) -> int:
    try:
        config = config_from_args(argv)
    except (ValueError, TypeError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    summary = train(config)
    if int(__import__("os").environ.get("RANK", "0")) == 0:
        val = summary["validation"] or {}
        print(f"{summary['steps']} steps ({summary['stopped']}), {summary['train_seconds']:.0f} s, "
              f"last loss {summary['last'].get('loss', float('nan')):.4g}; "
              f"validation ({summary['validated_on']}) F-score {val.get('fscore', float('nan')):.3f}, "
              f"Chamfer {val.get('chamfer', float('nan')):.5f}; checkpoint {summary['checkpoint']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
