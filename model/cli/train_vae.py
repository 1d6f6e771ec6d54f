"""Train the sparse SDF VAE on a folder of meshes (or pybullet's objects); writes checkpoint.safetensors,
metrics.jsonl and loss.png into --out.

The command line of ``model.training.vae.train`` (its docstring tells the training in full). Options come from the
defaults, then ``--config FILE`` (JSON or YAML with the option names, e.g. ``{"steps": 500}``), then the flags given.
``--resume`` continues from ``OUT/checkpoint.safetensors``; ``--time-limit`` stops cleanly after that many minutes
of training. Runs under ``torchrun`` (DDP).
"""
from __future__ import annotations

import argparse
import importlib.util
import os
import re
import sys
from typing import Sequence

from model.cli.args import (
    UserError,
    add_ckpt_every,
    add_device,
    add_no_progress,
    add_out,
    add_resume,
    add_seed,
    add_time_limit,
    dataclass_defaults,
    existing_file,
    existing_path,
    json_object,
    make_parser,
    non_negative_float,
    non_negative_int,
    output_folder,
    positive_float,
    positive_int,
    run,
    unit_interval,
)
from model.training.vae import MODEL_PRESETS, VAETrainConfig, model_config

#: Defaults of VAETrainConfig, shown in --help.
DEFAULTS = dataclass_defaults(VAETrainConfig)
#: The install hint of --pybullet.
PYBULLET_HINT = "the meshes extra: pip install -e '.[meshes]'"


def _resolution(text: str) -> int:
    value = positive_int(text)
    if value < 8:
        raise argparse.ArgumentTypeError(f"expected a grid side >= 8, got {text!r}")
    return value


def _fraction(text: str) -> float:
    value = unit_interval(text)
    if value >= 1:
        raise argparse.ArgumentTypeError(f"expected a number in [0, 1), got {text!r}")
    return value


def build_parser() -> argparse.ArgumentParser:
    S = argparse.SUPPRESS  # unset flags do not override the config file or the defaults

    def opt(group, flag, what, *, kind=None, shown=None, **kw):
        name = flag[2:].replace("-", "_")
        text = shown if shown is not None else DEFAULTS[name]
        if isinstance(text, (tuple, list)):
            text = " ".join(str(v) for v in text)
        group.add_argument(flag, dest=name, type=kind, default=S, help=f"{what} (default {text})", **kw)

    ap = make_parser("model.cli.train_vae", __doc__)
    ap.add_argument("--config", default=S, metavar="FILE",
                    help="JSON or YAML file of options by name (e.g. {\"steps\": 500}); flags override it "
                         "(default: none)")
    src = ap.add_argument_group("data (give --meshes or --pybullet)")
    src.add_argument("--meshes", default=S, metavar="DIR",
                     help="folder of meshes (searched recursively) or one mesh file (default: none)")
    src.add_argument("--pybullet", type=positive_int, default=S, metavar="N",
                     help=f"the first N of pybullet's ~1,000 objects; needs {PYBULLET_HINT} (default: none)")
    opt(src, "--max-meshes", "use only the first N meshes of --meshes", kind=positive_int, shown="all",
        metavar="N")
    opt(src, "--resolutions", "SDF grid sides; each batch draws one", kind=_resolution, nargs="+", metavar="R")
    opt(src, "--tau", "SDF band half-width in voxels", kind=positive_float)
    opt(src, "--cache-dir", "folder of the cached SDF samples", metavar="DIR")
    opt(src, "--prepare-workers", "processes preparing the SDF samples up front (0: this process)",
        kind=non_negative_int, metavar="N")
    opt(src, "--held-out-fraction", "share of the meshes held out for validation", kind=_fraction)
    opt(src, "--split-seed", "seed of the held-out split (a hash of the mesh names)", kind=non_negative_int,
        metavar="N")
    mdl = ap.add_argument_group("model and optimisation")
    opt(mdl, "--model", "VAE size preset", choices=sorted(MODEL_PRESETS))
    opt(mdl, "--model-overrides", 'JSON object of VAEConfig fields, e.g. \'{"latent_channels": 8}\'',
        kind=json_object, shown="none", metavar="JSON")
    opt(mdl, "--batch-size", "meshes per batch and process", kind=positive_int, metavar="N")
    opt(mdl, "--steps", "optimizer steps in total", kind=positive_int, metavar="N")
    opt(mdl, "--lr", "peak learning rate (AdamW)", kind=positive_float)
    opt(mdl, "--weight-decay", "AdamW weight decay", kind=non_negative_float)
    opt(mdl, "--warmup-steps", "linear warm-up steps", kind=non_negative_int, metavar="N")
    opt(mdl, "--schedule", "learning-rate schedule after the warm-up", choices=("cosine", "constant"))
    opt(mdl, "--min-lr-ratio", "end of the cosine, times --lr", kind=unit_interval)
    mdl.add_argument("--anneal-to-time-limit", dest="anneal_to_time_limit", action="store_true", default=S,
                     help="the cosine follows the elapsed share of --time-limit when that is further along")
    opt(mdl, "--grad-clip", "gradient norm clip (0: off)", kind=non_negative_float)
    for name, what in (("in", "the input voxels' SDF"), ("extra", "the extra voxels' SDF"),
                       ("sharp", "the sharp-edge voxels' SDF"), ("kl", "the KL term"), ("prune", "the pruning BCE")):
        opt(mdl, f"--weight-{name}", f"loss weight of {what}", kind=non_negative_float)
    r = ap.add_argument_group("run")
    add_time_limit(r, "training (data preparation not counted)", default=S, shown="none")
    add_device(r, default=S, shown=DEFAULTS["device"])
    r.add_argument("--no-bf16", dest="bf16", action="store_false", default=S,
                   help="train in float32 on CUDA (default: bfloat16 autocast on CUDA)")
    add_out(r, "run folder: checkpoint.safetensors, metrics.jsonl, loss.png, config.json", default=S,
            shown=DEFAULTS["out"])
    add_resume(r, "OUT/checkpoint.safetensors", default=S)
    add_seed(r, default=S, shown=DEFAULTS["seed"])
    opt(r, "--log-every", "steps between training records", kind=positive_int, metavar="N")
    add_ckpt_every(r, default=S, shown=DEFAULTS["ckpt_every"])
    opt(r, "--val-every", "steps between validations (0: only at the end)", kind=non_negative_int, metavar="N")
    opt(r, "--val-meshes", "held-out meshes reconstructed per validation (0: no validation)",
        kind=non_negative_int, metavar="N")
    opt(r, "--val-resolution", "SDF grid side of the validation", kind=_resolution, shown="the first of --resolutions",
        metavar="R")
    opt(r, "--val-points", "surface points per mesh of the validation metrics", kind=positive_int, metavar="N")
    opt(r, "--num-workers", "data loader processes", kind=non_negative_int, metavar="N")
    add_no_progress(r, default=S)
    return ap


def _option_message(text: str) -> str:
    """A library message about a config field (``steps must be ...``) in terms of its flag."""
    m = re.match(r"^(\w+)( must| has|:)", text)
    if m and m.group(1) in DEFAULTS:
        return f"--{m.group(1).replace('_', '-')}{text[len(m.group(1)):]}"
    return text


def config_from_args(argv: Sequence[str] | None = None, *, args=None) -> VAETrainConfig:
    """Dataclass defaults <- config file (``--config``) <- flags given on the command line; :class:`UserError`
    naming the option for a bad value."""
    from model.training.common import load_config_file

    given = vars(build_parser().parse_args(argv) if args is None else args).copy()
    values: dict = {}
    if "config" in given:
        values.update(load_config_file(existing_file("--config", given.pop("config"), "JSON or YAML file")))
    if "meshes" in given or "pybullet" in given:  # a flag picks the data source over the file's
        values.pop("meshes", None)
        values.pop("pybullet", None)
    values.update(given)
    if values.get("meshes") is None and values.get("pybullet") is None:
        raise UserError("no training meshes: give --meshes DIR (a folder of meshes, e.g. tests/data/meshes) or "
                        f"--pybullet N (needs {PYBULLET_HINT})")
    if values.get("meshes") is not None and values.get("pybullet") is not None:
        raise UserError("give one of --meshes and --pybullet, not both")
    try:
        return VAETrainConfig.from_dict(values)
    except (ValueError, TypeError) as exc:
        raise UserError(_option_message(str(exc))) from None


def _check_inputs(config: VAETrainConfig) -> None:
    if config.meshes is not None:
        from model.data.meshes import MESH_EXTENSIONS, find_meshes

        existing_path("--meshes", config.meshes, "folder of meshes or mesh file")
        try:
            found = find_meshes(config.meshes)
        except ValueError as exc:
            raise UserError(f"--meshes: {exc}") from None
        if not found:
            raise UserError(f"--meshes: no mesh files ({' '.join(MESH_EXTENSIONS)}) under {config.meshes}")
    elif importlib.util.find_spec("pybullet_data") is None:
        raise UserError(f"--pybullet: pybullet is not installed; install {PYBULLET_HINT}, or give --meshes DIR")
    output_folder("--out", config.out)
    try:
        model_config(config.model, config.model_overrides)
    except (ValueError, TypeError) as exc:
        raise UserError(f"--model-overrides: {exc}") from None


def build_config(args) -> VAETrainConfig:
    config = config_from_args(args=args)
    _check_inputs(config)
    return config


def _main(args) -> int:
    from model.training.vae import train

    config = build_config(args)
    summary = train(config)
    if int(os.environ.get("RANK", "0")) == 0:
        val = summary["validation"] or {}
        print(f"{summary['steps']} steps ({summary['stopped']}), {summary['train_seconds']:.0f} s, "
              f"last loss {summary['last'].get('loss', float('nan')):.4g}; "
              f"validation ({summary['validated_on']}) F-score {val.get('fscore', float('nan')):.3f}, "
              f"Chamfer {val.get('chamfer', float('nan')):.5f}; checkpoint {summary['checkpoint']}")
    return 0


def _outputs(args):
    """The run folder (a failed run that created it removes it): the flag's, else the config file's."""
    try:
        return [config_from_args(args=args).out]
    except Exception:  # reported by the run itself
        return []


def main(argv: Sequence[str] | None = None) -> int:
    return run(build_parser(), _main, argv, outputs=_outputs)


if __name__ == "__main__":
    sys.exit(main())
