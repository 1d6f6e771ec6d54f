"""Train the sparse DiT with rectified flow on prepared latents and views (``model.training.dit_data``).

The command line of :mod:`model.training.dit` (``python -m model.cli.train_dit --help``).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys

from model.flow import TIMESTEP_MODES
from model.training.dit import LATENT_MODES, PRECISIONS, TrainConfig, train


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m model.cli.train_dit", description=__doc__.split("\n\n")[0])
    p.add_argument("--config", help="JSON or YAML file of TrainConfig options (flags override it)")
    p.add_argument("--data", help="folder prepared by python -m model.cli.prepare_dit_data")
    p.add_argument("--out", help="run folder (metrics, plots, checkpoints)")
    p.add_argument("--model", help="DiT preset: tiny, released_512, released_1024, released_512_v10, released_1024_v10")
    p.add_argument("--model-overrides", type=json.loads, help='JSON of DiTConfig fields, e.g. \'{"num_blocks": 4}\'')
    p.add_argument("--backend", choices=("kernels", "reference"), help="SSA backend (default: the preset's)")
    p.add_argument("--encoder", help="DINOv2-with-registers weights: a local folder or hub id (transformers format)")
    p.add_argument("--encoder-size", choices=("vitl14", "tiny"), help="random encoder size when --encoder is unset")
    p.add_argument("--steps", type=int)
    p.add_argument("--lr", type=float)
    p.add_argument("--weight-decay", type=float)
    p.add_argument("--warmup-steps", type=int)
    p.add_argument("--schedule", choices=("constant", "cosine"))
    p.add_argument("--grad-clip", type=float)
    p.add_argument("--batch-tokens", type=int, help="token budget of a batch")
    p.add_argument("--max-batch", type=int, help="largest number of latents in a batch")
    p.add_argument("--ema-decay", type=float)
    p.add_argument("--cond-drop-prob", type=float)
    p.add_argument("--timestep-mode", choices=TIMESTEP_MODES)
    p.add_argument("--timestep-shift", type=float)
    p.add_argument("--latent", choices=LATENT_MODES)
    p.add_argument("--no-normalize-latents", dest="normalize_latents", action="store_false", default=None)
    p.add_argument("--precision", choices=PRECISIONS)
    p.add_argument("--checkpointing", dest="use_checkpoint", action="store_true", default=None,
                   help="activation checkpointing per block")
    p.add_argument("--seed", type=int)
    p.add_argument("--log-every", type=int)
    p.add_argument("--save-every", type=int)
    p.add_argument("--keep-checkpoints", type=int)
    p.add_argument("--device")
    p.add_argument("--time-limit-min", type=float)
    p.add_argument("--no-progress", dest="progress", action="store_false", default=None)
    p.add_argument("--resume", nargs="?", const="auto", default=None,
                   help="resume from a checkpoint (no value or 'auto': RUN/checkpoints/last.safetensors)")
    return p


def main(argv=None) -> int:
    args = _parser().parse_args(argv)
    options: dict = {}
    if args.config:
        from model.training.common import load_config_file

        options.update(load_config_file(args.config))
    for f in dataclasses.fields(TrainConfig):
        value = getattr(args, f.name, None)
        if value is not None:
            options[f.name] = value
    cfg = TrainConfig.from_dict(options)
    result = train(cfg, resume=args.resume)
    if result.get("loss") is not None and os.environ.get("RANK", "0") == "0":
        print(f"step {result['step']}: loss {result['loss']:.5f}; checkpoint {result['checkpoint']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
