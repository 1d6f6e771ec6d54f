"""The DiT demonstration's driver: :func:`run` runs the stages ``cfg.stage`` names, in order; :func:`main` is the
command line (``python -m model.reports.dit_demo``, one option per :class:`DemoConfig` field)."""
from __future__ import annotations

import argparse
import time

from model.reports.dit_demo.config import SMOKE, DemoConfig, _append_jsonl, _resolve
from model.reports.dit_demo.report import stage_report
from model.reports.dit_demo.sample import stage_sample
from model.reports.dit_demo.stages import stage_data, stage_dit, stage_render, stage_vae


def run(cfg: DemoConfig) -> dict:
    """Run the stages of ``cfg.stage``; returns ``{stage: result}``."""
    device, _, _ = _resolve(cfg)
    results = {}
    for stage in cfg.stages():
        t0 = time.perf_counter()
        if stage == "render":
            results[stage] = stage_render(cfg)
        else:
            cfg.root.mkdir(parents=True, exist_ok=True)
            fn = {"data": stage_data, "vae": stage_vae, "dit": stage_dit, "sample": stage_sample,
                  "report": stage_report}[stage]
            results[stage] = fn(cfg, device)
            _append_jsonl(cfg.root / "stages.jsonl", dict(stage=stage, seconds=time.perf_counter() - t0,
                                                          date=time.strftime("%Y-%m-%d %H:%M:%S")))
        print(f"[{stage}] {time.perf_counter() - t0:.0f} s", flush=True)
    return results


#: ``--help`` of the options (one per :class:`DemoConfig` field).
OPTION_HELP = {
    "out": "run folder (every stage reads what the earlier ones left in it)",
    "meshes": "folder of meshes (default: the installed pybullet objects, the meshes extra)",
    "count": "meshes used (the first N)", "views_dir": "folder of the rendered views (the render stage's output)",
    "views": "rendered views per mesh", "train_views": "views per mesh that condition the training",
    "view_size": "side of the rendered views in pixels", "render_backend": "view renderer: pyrender or numpy",
    "resolution": "SDF grid side", "tau": "SDF band half-width in voxels",
    "held_out_fraction": "share of the meshes held out (from the VAE and the DiT)",
    "split_seed": "seed of the held-out split", "workers": "processes preparing the SDF samples",
    "cache_dir": "folder of the cached SDF samples (default OUT/sdf_cache)",
    "vae": "a trained VAE checkpoint to reuse (default: train one into OUT/vae)",
    "vae_model": "VAE size preset", "vae_minutes": "wall-clock minutes of VAE training",
    "vae_max_steps": "step cap of the VAE training", "vae_batch": "VAE batch size",
    "vae_lr": "VAE peak learning rate", "vae_warmup": "VAE warm-up steps", "loader_workers": "data loader processes",
    "dit_width": "DiT width", "dit_blocks": "DiT blocks", "dit_heads": "DiT query heads",
    "dit_kv_heads": "DiT key/value heads", "compression_block": "SSA compression block side",
    "selection_block": "SSA selection block side", "topk": "SSA selected blocks per query",
    "window": "SSA window side", "mlp_ratio": "DiT MLP width / width",
    "encoder_size": "random image encoder size: vitl14 or tiny", "encoder_seed": "seed of the random image encoder",
    "backend": "SSA backend: auto, kernels or reference", "precision": "auto, fp32 or bf16",
    "dit_lr": "DiT learning rate", "dit_warmup": "DiT warm-up steps", "batch_tokens": "token budget of a DiT batch",
    "max_batch": "largest number of shapes in a DiT batch", "ema_decay": "decay of the DiT weights' moving average",
    "cond_drop_prob": "probability of dropping the condition",
    "dit_minutes": "wall-clock minutes of DiT training per call",
    "dit_budget": "wall-clock minutes of DiT training over all calls", "dit_max_steps": "step cap of the DiT training",
    "dit_call_steps": "steps per call of the dit stage (0: until the time limit)",
    "save_every": "steps between DiT checkpoints", "sample_steps": "Euler steps of the sampling",
    "guidance": "classifier-free guidance scale", "shift": "timestep shift of the sampling",
    "sweep": "comma list of guidance scales of the ablation", "sweep_count": "meshes of the guidance sweep",
    "ablation_count": "meshes of the no-image ablation", "unseen_count": "meshes never seen, sampled (0: none)",
    "sample_batch": "shapes sampled together", "weights": "sample with the ema or the raw (model) weights",
    "points": "surface points per mesh of the metrics", "eval_workers": "processes of the evaluation",
    "figure_rows": "rows of the training-image figure", "heldout_rows": "rows of the held-out figure",
    "seed": "random seed", "device": "auto (CUDA when available, else the CPU), cpu, cuda or cuda:N",
    "stage": "stage or comma list of render, data, vae, dit, sample, report; or all",
}
#: Fields whose option has another name than ``--field-name``: every time limit is ``...time-limit`` in minutes.
OPTION_FLAGS = {"vae_minutes": "--vae-time-limit", "dit_minutes": "--dit-time-limit",
                "dit_budget": "--dit-total-time-limit", "save_every": "--ckpt-every"}


def build_parser() -> argparse.ArgumentParser:
    """One ``--option`` per :class:`DemoConfig` field (None when not given, so ``--smoke`` values stay)."""
    from model.cli.args import add_config_options, make_parser
    from model.reports import dit_demo

    ap = make_parser("model.reports.dit_demo", dit_demo.__doc__)
    ap.add_argument("--smoke", action="store_true", help="toy CPU run of the whole loop (tests)")
    ap.set_defaults(_flags=add_config_options(ap, DemoConfig, skip=("smoke",), flags=OPTION_FLAGS,
                                              helps=OPTION_HELP))
    return ap


def main(argv=None) -> int:
    """The command line (``--help``); 0 on success, 2 on a bad option or a missing input of the stage."""
    from model.cli.args import run

    return run(build_parser(), _main, argv)


def _main(args) -> int:
    from model.cli.args import UserError, option_message

    flags = args._flags
    args = {k: v for k, v in vars(args).items() if v is not None and k != "_flags"}
    values = dict(SMOKE) if args.get("smoke") else {}
    values.update(args)
    try:
        cfg = DemoConfig(**values)
    except (TypeError, ValueError) as exc:
        raise UserError(option_message(str(exc), flags)) from None
    run(cfg)
    return 0
