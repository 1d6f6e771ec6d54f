"""Train the sparse DiT with rectified flow on the latents and views prepared by model.cli.prepare_dit_data;
writes checkpoints/last.safetensors, metrics.jsonl and loss.png into --out.

The command line of ``model.training.dit.train`` (its docstring tells the training in full). Options come from the
defaults, then ``--config FILE`` (JSON or YAML with the option names of ``TrainConfig``), then the flags given.
``--resume`` continues from ``OUT/checkpoints/last.safetensors`` (``--resume-from CKPT``: from another checkpoint);
``--time-limit`` stops cleanly after that many minutes. Without ``--encoder`` the image encoder has random weights
of the width the DiT preset expects (``--encoder-size auto``). The SSA backend defaults to the Triton kernels on
CUDA and to the dense reference on the CPU (``--backend auto``). Runs under ``torchrun`` (DDP).
"""
from __future__ import annotations

import argparse
import os
import sys

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
    resolve_device,
    run,
    unit_interval,
)
from model.flow import TIMESTEP_MODES
from model.training.dit import LATENT_MODES, PRECISIONS, TrainConfig

#: Defaults of TrainConfig, shown in --help.
DEFAULTS = dataclass_defaults(TrainConfig)
#: DiT presets (model.nets.dit.DiTConfig.preset).
MODELS = ("tiny", "released_512", "released_1024", "released_512_v10", "released_1024_v10")
#: Random image encoders (model.nets.conditioning.DinoV2Encoder.build) and ``auto``.
ENCODER_SIZES = ("auto", "vitl14", "tiny")
#: Flags whose TrainConfig field has another name.
FIELDS = {"time_limit": "time_limit_min", "ckpt_every": "save_every"}


def _decay(text: str) -> float:
    value = unit_interval(text)
    if value >= 1:
        raise argparse.ArgumentTypeError(f"expected a number in [0, 1), got {text!r}")
    return value


def build_parser() -> argparse.ArgumentParser:
    def opt(flag, what, *, kind=None, shown=None, **kw):
        name = flag[2:].replace("-", "_")
        text = shown if shown is not None else DEFAULTS[FIELDS.get(name, name)]
        p.add_argument(flag, dest=name, type=kind, help=f"{what} (default {text})", **kw)

    p = make_parser("model.cli.train_dit", __doc__)
    p.add_argument("--config", metavar="FILE",
                   help="JSON or YAML file of TrainConfig options by name; flags override it (default: none)")
    p.add_argument("--data", metavar="DIR",
                   help="folder written by python -m model.cli.prepare_dit_data, with its manifest.json (default: "
                        "the config file's; one of the two is required)")
    add_out(p, "run folder: checkpoints/, metrics.jsonl, loss.png, config.json", default=None, shown=DEFAULTS["out"])
    opt("--model", "DiT preset", choices=MODELS)
    opt("--model-overrides", 'JSON object of DiTConfig fields, e.g. \'{"num_blocks": 4}\'', kind=json_object,
        shown="none", metavar="JSON")
    opt("--backend", "SSA backend: auto is the Triton kernels on CUDA and the dense reference on the CPU",
        choices=("auto", "kernels", "reference"), shown="auto")
    opt("--encoder", "DINOv2-with-registers weights, a local folder or hub id (transformers format)",
        shown="random weights of --encoder-size", metavar="PATH_OR_ID")
    opt("--encoder-size", "random encoder when --encoder is not given: auto picks the width the DiT preset expects "
        "(tiny for --model tiny, vitl14 otherwise)", choices=ENCODER_SIZES, shown="auto")
    opt("--steps", "optimizer steps in total", kind=positive_int, metavar="N")
    opt("--lr", "learning rate (AdamW)", kind=positive_float)
    opt("--weight-decay", "AdamW weight decay", kind=non_negative_float)
    opt("--warmup-steps", "linear warm-up steps", kind=non_negative_int, metavar="N")
    opt("--schedule", "learning-rate schedule after the warm-up", choices=("constant", "cosine"))
    opt("--grad-clip", "gradient norm clip (0: off)", kind=non_negative_float)
    opt("--batch-tokens", "token budget of a batch (per process)", kind=positive_int, metavar="N")
    opt("--max-batch", "largest number of latents in a batch", kind=positive_int, metavar="N")
    opt("--ema-decay", "decay of the weights' moving average", kind=_decay)
    opt("--cond-drop-prob", "probability of dropping the condition (classifier-free guidance)", kind=unit_interval)
    opt("--timestep-mode", "timestep distribution", choices=TIMESTEP_MODES)
    opt("--timestep-shift", "timestep shift", kind=positive_float)
    opt("--latent", "train on the posterior mean or a sample of it", choices=LATENT_MODES)
    p.add_argument("--no-normalize-latents", dest="normalize_latents", action="store_false", default=None,
                   help="train on the raw latents (default: normalised per channel with the data's mean and std)")
    opt("--precision", "fp32, or bf16 autocast on CUDA", choices=PRECISIONS)
    p.add_argument("--checkpointing", dest="use_checkpoint", action="store_true", default=None,
                   help="activation checkpointing per block (default: off)")
    add_seed(p, default=None, shown=DEFAULTS["seed"])
    opt("--log-every", "steps between metric records", kind=positive_int, metavar="N")
    add_ckpt_every(p, shown=DEFAULTS["save_every"])
    opt("--keep-checkpoints", "numbered checkpoints kept besides last.safetensors", kind=non_negative_int,
        metavar="N")
    add_device(p, default=None, shown=DEFAULTS["device"])
    add_time_limit(p, "training", shown="none")
    add_no_progress(p, default=None)
    add_resume(p, "OUT/checkpoints/last.safetensors")
    p.add_argument("--resume-from", metavar="CKPT",
                   help="continue from this checkpoint file (default: none; see --resume)")
    return p


def _auto_encoder_size(options: dict) -> str:
    """The random encoder whose width is the DiT's ``cond_channels``."""
    from model.nets.conditioning import dinov2_vitl14_reg_config, tiny_dinov2_config

    cond = TrainConfig.from_dict({**options, "encoder_size": "vitl14"}).dit_config().cond_channels
    for size, cfg in (("tiny", tiny_dinov2_config()), ("vitl14", dinov2_vitl14_reg_config())):
        if cfg.hidden_size == cond:
            return size
    raise UserError(f"no random image encoder has the DiT's {cond} condition channels; give --encoder weights of "
                    "that width or --encoder-size")


def build_config(args) -> TrainConfig:
    """Defaults <- ``--config`` <- flags, with ``--backend auto`` and ``--encoder-size auto`` resolved;
    :class:`UserError` naming the option for a bad value or path."""
    from model.training.common import load_config_file

    options: dict = {}
    if args.config:
        options.update(load_config_file(existing_file("--config", args.config, "JSON or YAML file")))
    for name, value in vars(args).items():
        field = FIELDS.get(name, name)
        if value is not None and field in DEFAULTS:
            options[field] = value
    if not options.get("data"):
        raise UserError("--data: required; give the --out folder of python -m model.cli.prepare_dit_data")
    data = existing_path("--data", options["data"], "folder written by python -m model.cli.prepare_dit_data")
    if not (data / "manifest.json").is_file():
        raise UserError(f"--data: {data} has no manifest.json; give the --out folder of "
                        "python -m model.cli.prepare_dit_data")
    output_folder("--out", options.get("out", DEFAULTS["out"]))
    device = resolve_device(options.get("device", DEFAULTS["device"]))
    if options.get("backend") in (None, "auto"):
        options["backend"] = "kernels" if device.type == "cuda" else "reference"
    try:
        TrainConfig.from_dict({**options, "encoder_size": "vitl14"}).dit_config()
    except (ValueError, TypeError) as exc:
        raise UserError(f"--model/--model-overrides: {exc}") from None
    try:
        if options.get("encoder_size") in (None, "auto"):
            options["encoder_size"] = "vitl14" if options.get("encoder") else _auto_encoder_size(options)
        return TrainConfig.from_dict(options)
    except (ValueError, TypeError) as exc:
        raise UserError(str(exc)) from None


def _resume(args):
    if args.resume_from:
        if args.resume:
            raise UserError("--resume-from: give --resume (the run's own checkpoint) or --resume-from CKPT, not both")
        return str(existing_file("--resume-from", args.resume_from, "checkpoint file"))
    return "auto" if args.resume else None


def _main(args) -> int:
    from model.training.dit import train

    cfg = build_config(args)
    resume = _resume(args)
    result = train(cfg, resume=resume)
    if result.get("loss") is not None and os.environ.get("RANK", "0") == "0":
        print(f"step {result['step']}: loss {result['loss']:.5f}; checkpoint {result['checkpoint']}")
    return 0


def _outputs(args):
    try:
        return [build_config(args).out]
    except Exception:  # reported by the run itself
        return []


def main(argv=None) -> int:
    return run(build_parser(), _main, argv, outputs=_outputs)


if __name__ == "__main__":
    sys.exit(main())
