"""The sparse SDF VAE's end-to-end report: prepare data, train for a fixed time, evaluate held-out meshes, measure a
1024^3 reconstruction, write ``vae.md`` + ``vae.json`` with figures.

GPU run (one H100; the machine has no pybullet, so the meshes travel as files)::

    python -m model.data.meshes --export data_cache/meshes --count 150     # once, on a machine with pybullet
    python -m model.reports.vae --meshes data_cache/meshes --out reports/vae

Where one command may run for at most 10 minutes, split it in two calls on the same machine (``OUT`` must
persist between them)::

    python -m model.reports.vae --meshes data_cache/meshes --out runs/vae_report --stage train --time-limit 8
    python -m model.reports.vae --meshes data_cache/meshes --out runs/vae_report --stage evaluate

Needs, besides torch: numpy, scipy, trimesh, libigl, scikit-image (with ``--no-deps`` plus lazy_loader), safetensors,
tqdm; matplotlib for the PNG figures (without it the report has every figure in ``vae.json`` but no pictures). The
report checks these before it starts.

CPU smoke run (tiny model, 32^3, a few steps; what the tests run)::

    python -m model.reports.vae --smoke --meshes SOME_FOLDER --out /tmp/vae-smoke

Steps:

1. The first ``--count`` meshes (path order) become sparse SDF samples at ``--resolution`` (default 256^3, tau 2),
   in ``--workers`` processes; a hash of each name holds out ``--held-out-fraction`` of them.
2. :func:`model.training.vae.train` trains the ``--model`` preset for at most ``--time-limit`` minutes (the cosine learning
   rate follows the elapsed fraction of the time, so the run ends annealed), bf16 autocast on CUDA.
3. Every held-out mesh (at most ``--eval-meshes``) is reconstructed (posterior mean, inference pruning, marching
   cubes at 0) and compared with its input in the unit cube (:func:`model.pipeline.reconstruct.evaluate_mesh`: input faces
   buried inside the shape left out): F-score at 1/128, Chamfer distance, normal consistency, volume IoU, from
   ``--points`` surface points per mesh (200k: with fewer, the F-score at 1/128 of the sampling itself drops below
   0.99 on meshes of pybullet's surface area). The same metrics for the mesh extracted from the *input* band (no
   network) give the ceiling set by the voxelisation and the extraction.
4. Thumbnails of inputs and reconstructions (``reconstructions.png``), the loss curve (``loss.png``).
5. One held-out mesh is voxelised at ``--big-resolution`` (1024^3) and encoded + decoded ``--big-repeats`` times;
   the report gives the model time (synchronised) and the peak GPU memory of each, the extraction time and the
   metrics of the result.
"""
from __future__ import annotations

import dataclasses
import importlib.util
import json
import math
import os
import platform
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from model.io import atomic_write_json, atomic_write_text, commit_label, provenance

__all__ = ["ReportConfig", "main", "run_report"]

#: The issue's bar: mean F-score at 1/128 on held-out meshes.
FSCORE_BAR = 0.9
#: Modules the report needs beyond torch (import name -> what to install); matplotlib only for the PNGs.
REQUIRED_MODULES = {
    "numpy": "numpy", "scipy": "scipy", "trimesh": "trimesh", "igl": "libigl",
    "skimage": "scikit-image (pip install --no-deps scikit-image lazy_loader is enough)",
    "lazy_loader": "lazy_loader", "safetensors": "safetensors", "tqdm": "tqdm",
}
OPTIONAL_MODULES = {"matplotlib": "matplotlib (only for the PNG figures)"}


def missing_modules(names: dict) -> list[str]:
    """The install hints of the modules of ``names`` that cannot be found."""
    return [hint for mod, hint in names.items() if importlib.util.find_spec(mod) is None]


@dataclass
class ReportConfig:
    """Options of :func:`run_report` (the command line sets them by name; ``smoke`` swaps in :data:`SMOKE`).

    Model: the ``base`` preset (8.5M parameters: the released conv widths, transformer width 256, 2 + 2 blocks,
    16 latent channels) rather than the released width 512 (37.9M): ten minutes is a few thousand steps, and the
    convolutional part, which does most of the SDF work, is the released one. AdamW at 1e-3 after 200 warm-up
    steps, cosine to 5% at the time limit, batch 4. On the 2-core CPU machine the smaller ``small`` preset at 64^3
    (34 pybullet meshes, 400 steps of batch 4 at 2e-3) reached F-scores of 0.92-0.99 at a 2-voxel threshold on
    held-out meshes (the threshold 1/128 is 2 voxels at 256^3).
    """

    out: str
    meshes: str | None = None
    count: int = 100
    resolution: int = 256
    tau: float = 2.0
    minutes: float = 10.0
    model: str = "base"
    batch_size: int = 4
    lr: float = 1e-3
    warmup_steps: int = 200
    max_steps: int = 100_000
    held_out_fraction: float = 0.1
    workers: int = 16
    loader_workers: int = 6
    val_every: int = 1000
    eval_meshes: int = 16
    render_meshes: int = 4
    points: int = 200_000
    iou_points: int = 100_000
    big_resolution: int = 1024
    big_repeats: int = 2
    device: str = "auto"
    seed: int = 0
    cache_dir: str = "data_cache/sparse_sdf"
    stage: str = "all"
    smoke: bool = False

    def __post_init__(self):
        for name in ("count", "resolution", "batch_size", "max_steps", "eval_meshes", "points", "big_resolution",
                     "big_repeats"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if not (isinstance(self.minutes, (int, float)) and self.minutes > 0):
            raise ValueError(f"minutes must be a positive number, got {self.minutes!r}")
        if self.stage not in STAGES:
            raise ValueError(f"stage must be one of {STAGES}, got {self.stage!r}")


#: ``--stage``: everything; only data preparation and training (``OUT/train``); only the evaluation and the
#: report, from the run that an earlier ``--stage train`` left in ``OUT/train``.
STAGES = ("all", "train", "evaluate")


#: What ``--smoke`` changes: a CPU run of a minute or so, end to end.
SMOKE = dict(count=6, resolution=32, minutes=2.0, model="tiny", batch_size=2, lr=3e-3, warmup_steps=2, max_steps=8,
             held_out_fraction=0.34, workers=0, loader_workers=0, val_every=0, eval_meshes=2, render_meshes=2,
             points=4000, iou_points=4000, big_resolution=64, big_repeats=1, device="cpu")


def environment(device: torch.device) -> dict:
    """The run's provenance (:func:`model.io.provenance`: commit, versions, GPU, UTC date) with the device as given
    (e.g. ``cuda:0``), the platform and the CPU count."""
    env = provenance(device)
    env.update(device=str(device), platform=platform.platform(), cpus=os.cpu_count())
    return env


def _mean(values) -> float:
    values = [v for v in values if isinstance(v, (int, float)) and math.isfinite(v)]
    return sum(values) / len(values) if values else float("nan")


def _train_config(config: ReportConfig, device: torch.device):
    from model.training.vae import VAETrainConfig

    source = dict(meshes=config.meshes, max_meshes=config.count) if config.meshes else dict(pybullet=config.count)
    return VAETrainConfig(
        **source, resolutions=(config.resolution,), tau=config.tau, cache_dir=config.cache_dir,
        prepare_workers=config.workers, held_out_fraction=config.held_out_fraction, model=config.model,
        batch_size=config.batch_size, steps=config.max_steps, lr=config.lr, warmup_steps=config.warmup_steps,
        schedule="cosine", anneal_to_time_limit=True, time_limit=config.minutes, device=str(device),
        out=str(Path(config.out) / "train"), seed=config.seed, log_every=25 if not config.smoke else 1,
        ckpt_every=max(1000, config.val_every or 1000), val_every=config.val_every, val_meshes=2,
        num_workers=config.loader_workers, progress=True,
    )


#: The training summary that ``--stage train`` leaves for ``--stage evaluate``.
SUMMARY_NAME = "summary.json"


def run_report(config: ReportConfig, *, command: str = "") -> dict:
    """Run the steps of the module docstring that ``config.stage`` selects and (unless the stage is ``train``)
    write ``vae.json``, ``vae.md`` and the PNGs into ``config.out``; returns the JSON document (the training summary
    for ``stage="train"``)."""
    from model.data.sdf import mesh_to_sparse_sdf
    from model.io import resolve_device
    from model.pipeline.extract import sparse_sdf_to_mesh
    from model.pipeline.preview import comparison_figure
    from model.pipeline.reconstruct import evaluate_mesh, load_vae, normalized_mesh, reconstruct_sample
    from model.training.vae import build_datasets, train

    missing = missing_modules(REQUIRED_MODULES)
    if missing:
        raise ModuleNotFoundError("the report needs: " + "; ".join(missing) + " (wheels will do: no internet needed)")
    out = Path(config.out)
    out.mkdir(parents=True, exist_ok=True)
    device = resolve_device(config.device)
    env = environment(device)
    dtype = torch.bfloat16 if device.type == "cuda" else None
    train_cfg = _train_config(config, device)
    t_all = time.perf_counter()
    summary_path = out / "train" / SUMMARY_NAME
    if config.stage in ("all", "train"):
        summary = train(train_cfg)
        atomic_write_json(summary_path, _json_safe(summary), indent=2)
        print(f"trained {summary['steps']} steps in {summary['train_seconds']:.0f} s ({summary['stopped']})",
              flush=True)
        if config.stage == "train":
            return summary
    else:
        if not summary_path.exists():
            raise FileNotFoundError(f"{summary_path} not found: run --stage train with the same --out first")
        summary = json.loads(summary_path.read_text())

    vae, _ = load_vae(summary["checkpoint"], device=device)
    train_ds, held_ds, _ = build_datasets(dataclasses.replace(train_cfg, prepare_workers=0, progress=False))
    eval_ds, split = (held_ds, "held_out") if held_ds is not None else (train_ds, "train")
    rows, renders = [], []
    from tqdm.auto import tqdm

    R = config.resolution
    for i in tqdm(range(min(config.eval_meshes, len(eval_ds))), desc="evaluate"):
        sample = eval_ds.sample(i, R)
        rec = reconstruct_sample(vae, sample, device=device, dtype=dtype)
        gt = normalized_mesh(eval_ds.paths[i], sample)
        m = evaluate_mesh(rec.mesh, gt, num_points=config.points, iou_points=config.iou_points, seed=config.seed)
        band = sparse_sdf_to_mesh(sample.coords, sample.sdf_scaled, R)
        b = evaluate_mesh(band, gt, num_points=config.points, iou_points=0, seed=config.seed)
        rows.append(dict(name=eval_ds.names[i], input_voxels=rec.input_voxels, latent_voxels=rec.latent_voxels,
                         decoded_voxels=int(len(rec.decoded_sdf)), faces=m["faces"], fscore=m["fscore"],
                         precision=m["precision"], recall=m["recall"], chamfer=m["chamfer"],
                         normal_consistency=m["normal_consistency"], iou=m["iou"],
                         fscore_all_faces=m["fscore_all_faces"], gt_outer_fraction=m["gt_outer_fraction"],
                         band_fscore=b["fscore"],
                         band_chamfer=b["chamfer"], seconds_model=rec.seconds["encode"] + rec.seconds["decode"],
                         seconds_extract=rec.seconds["extract"]))
        if len(renders) < config.render_meshes:
            renders.append((eval_ds.names[i], gt, rec.mesh, f"F {m['fscore']:.3f}  CD {m['chamfer']:.4f}"))
    figures = not missing_modules(OPTIONAL_MODULES)
    if not figures:
        print("matplotlib is not installed: no PNG figures (the figures in vae.json are complete)", file=sys.stderr)
    if renders and figures:
        comparison_figure(renders, out / "reconstructions.png",
                          title=f"{split.replace('_', '-')} meshes at {R}^3: input vs VAE reconstruction")

    # one mesh at the big resolution
    big_path = eval_ds.paths[0]
    t0 = time.perf_counter()
    big_sample = mesh_to_sparse_sdf(str(big_path), config.big_resolution, tau=config.tau, compute_sharp=False)
    t_big_sdf = time.perf_counter() - t0
    runs = []
    for r in range(config.big_repeats):
        rec_big = reconstruct_sample(vae, big_sample, device=device, dtype=dtype, extract=r == config.big_repeats - 1)
        runs.append(dict(encode_seconds=rec_big.seconds["encode"], decode_seconds=rec_big.seconds["decode"],
                         peak_memory_bytes=rec_big.peak_memory_bytes, peak_memory_kind=rec_big.peak_memory_kind))
    gt_big = normalized_mesh(big_path, big_sample)
    m_big = evaluate_mesh(rec_big.mesh, gt_big, num_points=config.points, iou_points=0, seed=config.seed)
    if figures:
        comparison_figure([(eval_ds.names[0], gt_big, rec_big.mesh,
                            f"F {m_big['fscore']:.3f}  CD {m_big['chamfer']:.5f}")],
                          out / f"reconstruction_{config.big_resolution}.png", size=512,
                          title=f"{config.big_resolution}^3 reconstruction")
    big = dict(name=eval_ds.names[0], resolution=config.big_resolution, sdf_seconds=t_big_sdf,
               input_voxels=rec_big.input_voxels, latent_voxels=rec_big.latent_voxels,
               decoded_voxels=int(len(rec_big.decoded_sdf)), runs=runs,
               model_seconds=min(r["encode_seconds"] + r["decode_seconds"] for r in runs),
               peak_memory_bytes=max(r["peak_memory_bytes"] for r in runs),
               peak_memory_kind=runs[-1]["peak_memory_kind"],
               extract_seconds=rec_big.seconds["extract"], faces=m_big["faces"], fscore=m_big["fscore"],
               chamfer=m_big["chamfer"], normal_consistency=m_big["normal_consistency"],
               fscore_threshold=m_big["fscore_threshold"])

    loss_png = Path(summary["plot"]) if summary.get("plot") else None
    if loss_png and loss_png.exists():
        shutil.copyfile(loss_png, out / "loss.png")
    mean_f = _mean(r["fscore"] for r in rows)
    doc = dict(
        environment=env, command=command,
        report_config=dataclasses.asdict(config), train_config=dataclasses.asdict(train_cfg),
        training={k: summary[k] for k in ("steps", "stopped", "train_seconds", "seconds_per_step", "skipped_steps",
                                          "last", "validation", "parameters", "train_meshes", "held_out", "data")},
        evaluation=dict(split=split, resolution=R, meshes=rows, fscore_mean=mean_f,
                        fscore_min=min((r["fscore"] for r in rows), default=float("nan")),
                        chamfer_mean=_mean(r["chamfer"] for r in rows),
                        normal_consistency_mean=_mean(r["normal_consistency"] for r in rows),
                        iou_mean=_mean(r["iou"] for r in rows), band_fscore_mean=_mean(r["band_fscore"] for r in rows),
                        fscore_all_faces_mean=_mean(r["fscore_all_faces"] for r in rows),
                        fscore_bar=FSCORE_BAR, bar_met=bool(mean_f >= FSCORE_BAR) if rows else False),
        big=big, figures=figures, total_seconds=time.perf_counter() - t_all,
    )
    atomic_write_json(out / "vae.json", _json_safe(doc), indent=2)
    atomic_write_text(out / "vae.md", _markdown(doc, config))
    return doc


def _json_safe(value):
    if isinstance(value, dict):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def _f(value, fmt: str) -> str:
    return "n/a" if not isinstance(value, (int, float)) or not math.isfinite(value) else format(value, fmt)


def _markdown(doc: dict, config: ReportConfig) -> str:
    env, tr, ev, big = doc["environment"], doc["training"], doc["evaluation"], doc["big"]
    tc = doc["train_config"]
    data = tr["data"]
    gib = 2**30
    lines = [
        "# Sparse SDF VAE: training and reconstruction report",
        "",
        f"- date: {env['date']}; device: {env.get('gpu') or env['device']}"
        + (f" ({env.get('gpu_memory_gib')} GiB)" if env.get("gpu") else "")
        + f"; torch {env['torch']} (CUDA {env['cuda']}); Python {env['python']}; {env['cpus']} CPUs",
        f"- {commit_label(env)}",
        f"- command: `{doc['command'] or 'run_report(...)'}`"
        + (" (smoke run: CPU, a few steps, figures meaningless)" if config.smoke else ""),
        "",
        "## Setup",
        "",
        f"- data: {data.get('meshes')} meshes ({'folder ' + str(config.meshes) if config.meshes else 'pybullet'}), "
        f"sparse SDF at {config.resolution}^3, tau {config.tau:g} voxels; "
        f"prepared in {_f(data.get('seconds'), '.0f')} s "
        f"({data.get('computed', 0)} computed, {data.get('cached', 0)} cached, {len(data.get('failed', {}))} failed); "
        f"{tr['train_meshes']} training meshes, {len(tr['held_out'])} held out by name hash "
        f"(fraction {config.held_out_fraction:g})",
        f"- model: preset `{config.model}`, {tr['parameters']:,} parameters",
        f"- training: {tr['steps']} steps in {_f(tr['train_seconds'], '.0f')} s "
        f"({_f(tr['seconds_per_step'], '.3f')} s/step; "
        f"stopped by {tr['stopped'].replace('_', ' ')}), batch {tc['batch_size']}, AdamW lr {tc['lr']:g}, "
        f"{tc['warmup_steps']} warm-up steps then cosine annealed to the time limit, "
        f"{'bf16 autocast' if env['device'].startswith('cuda') else 'float32'}; "
        f"final loss {_f(tr['last'].get('loss'), '.4g')} (input-voxel SDF MSE {_f(tr['last'].get('sdf_in'), '.3g')})",
        "",
        "![loss curve](loss.png)" if doc["figures"] else "(no figures: matplotlib was not installed)",
        "",
        f"## Reconstruction of {ev['split'].replace('_', '-')} meshes at {ev['resolution']}^3",
        "",
        f"F-score at 1/128 of the unit cube (= {ev['resolution'] / 128:g} voxels here), Chamfer distance (mean of both "
        "directions, unit-cube units), normal consistency and volume IoU against the input mesh, both in the unit "
        f"cube, from {config.points:,} surface points per mesh (the F-score of two samplings of one surface of area "
        f"A is about 1 - exp(-pi t^2 N / A): {1 - math.exp(-math.pi * (1 / 128) ** 2 * config.points / 3):.4f} for "
        "A = 3). Ground-truth points buried inside the shape are left out (`model.pipeline.reconstruct.evaluate_mesh`: "
        "pybullet's objects are unions of overlapping convex parts, whose faces inside the volume no SDF has; "
        "*outer* = the share of ground-truth points kept); *F all faces* keeps them. *Band ceiling*: the F-score of "
        "the mesh extracted from the input band itself (no network): voxelisation and extraction alone.",
        "",
        "| mesh | F-score | precision | recall | Chamfer | normal cons. | IoU | faces | outer | F all faces "
        "| band ceiling F |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in ev["meshes"]:
        lines.append(f"| {r['name']} | {_f(r['fscore'], '.4f')} | {_f(r['precision'], '.3f')} | "
                     f"{_f(r['recall'], '.3f')} | {_f(r['chamfer'], '.5f')} | {_f(r['normal_consistency'], '.4f')} | "
                     f"{_f(r['iou'], '.3f')} | {r['faces']:,} | {_f(r['gt_outer_fraction'], '.2f')} | "
                     f"{_f(r['fscore_all_faces'], '.4f')} | {_f(r['band_fscore'], '.4f')} |")
    lines += [
        f"| **mean** | **{_f(ev['fscore_mean'], '.4f')}** | | | {_f(ev['chamfer_mean'], '.5f')} | "
        f"{_f(ev['normal_consistency_mean'], '.4f')} | {_f(ev['iou_mean'], '.3f')} | | | "
        f"{_f(ev['fscore_all_faces_mean'], '.4f')} | {_f(ev['band_fscore_mean'], '.4f')} |",
        "",
        f"Bar (mean F-score >= {FSCORE_BAR} on held-out meshes): **{'met' if ev['bar_met'] else 'NOT met'}** "
        f"(mean {_f(ev['fscore_mean'], '.4f')}, min {_f(ev['fscore_min'], '.4f')})."
        + (" No mesh fell in the held-out split: these are training meshes." if ev["split"] != "held_out" else ""),
        "",
        "![reconstructions](reconstructions.png)" if doc["figures"] else "",
        "",
        f"## One mesh at {big['resolution']}^3",
        "",
        f"`{big['name']}`: {big['input_voxels']:,} input voxels, {big['latent_voxels']:,} latent voxels, "
        f"{big['decoded_voxels']:,} decoded voxels (SDF preparation {_f(big['sdf_seconds'], '.1f')} s on CPU).",
        "",
        "| run | encode (s) | decode (s) | peak memory |",
        "| --- | ---: | ---: | ---: |",
    ]
    for i, r in enumerate(big["runs"]):
        lines.append(f"| {i + 1} | {_f(r['encode_seconds'], '.3f')} | {_f(r['decode_seconds'], '.3f')} | "
                     f"{r['peak_memory_bytes'] / gib:.2f} GiB ({r['peak_memory_kind']}) |")
    lines += [
        "",
        f"Marching cubes by bricks (CPU): {_f(big['extract_seconds'], '.1f')} s, {big['faces']:,} faces; "
        f"F-score at 1/128 {_f(big['fscore'], '.4f')}, Chamfer {_f(big['chamfer'], '.6f')}, normal consistency "
        f"{_f(big['normal_consistency'], '.4f')} (the model was trained at {config.resolution}^3 only).",
        "",
        f"![{big['resolution']}^3 reconstruction](reconstruction_{big['resolution']}.png)" if doc["figures"] else "",
        "",
        f"Total report time {_f(doc['total_seconds'], '.0f')} s. Figures and per-step records: `vae.json`, "
        "`train/metrics.jsonl`.",
        "",
    ]
    return "\n".join(lines)


#: ``--help`` of the options made from :class:`ReportConfig` fields.
OPTION_HELP = {
    "count": "meshes used (the first N)", "resolution": "SDF grid side of training and evaluation",
    "tau": "SDF band half-width in voxels", "minutes": "wall-clock minutes of training",
    "model": "VAE size preset (model.cli.train_vae --model)", "batch_size": "meshes per batch",
    "lr": "peak learning rate", "warmup_steps": "linear warm-up steps", "max_steps": "step cap of the training",
    "held_out_fraction": "share of the meshes held out for the evaluation",
    "workers": "processes preparing the SDF samples", "loader_workers": "data loader processes",
    "val_every": "steps between validations (0: only at the end)", "eval_meshes": "held-out meshes evaluated",
    "render_meshes": "meshes drawn in the figure", "points": "surface points per mesh of the metrics",
    "iou_points": "points of the volume IoU", "big_resolution": "grid side of the large reconstruction",
    "big_repeats": "timed repetitions of the large reconstruction",
    "device": "auto (CUDA when available, else the CPU), cpu, cuda or cuda:N", "seed": "random seed",
    "cache_dir": "folder of the cached SDF samples",
}
#: Fields whose option has another name than ``--field-name``.
OPTION_FLAGS = {"minutes": "--time-limit"}


def build_parser():
    from model.cli.args import add_config_options, add_out, make_parser

    ap = make_parser("model.reports.vae", __doc__)
    add_out(ap, "report folder: vae.md, vae.json, the PNGs and train/")
    ap.add_argument("--meshes", metavar="DIR",
                    help="folder of meshes (default: the installed pybullet objects, the meshes extra)")
    ap.add_argument("--smoke", action="store_true", help="tiny CPU run for tests (overrides the sizes below)")
    ap.add_argument("--stage", choices=STAGES, default=None,
                    help="all; train: data and training only; evaluate: the rest, from OUT/train (default all)")
    ap.set_defaults(_flags=add_config_options(ap, ReportConfig, skip=("out", "meshes", "smoke", "stage"),
                                              flags=OPTION_FLAGS, helps=OPTION_HELP))
    return ap


def main(argv=None) -> int:
    from model.cli.args import run

    return run(build_parser(), lambda args: _main(args, argv), argv)


def _main(args, argv) -> int:
    from model.cli.args import UserError, option_message, output_folder

    flags = args._flags
    output_folder("--out", args.out)
    args = {k: v for k, v in vars(args).items() if v is not None and k != "_flags"}
    values = dict(SMOKE) if args.get("smoke") else {}
    values.update(args)
    try:
        config = ReportConfig(**values)
    except (TypeError, ValueError) as exc:
        raise UserError(option_message(str(exc), flags)) from None
    try:
        words = sys.argv[1:] if argv is None else list(argv)
        doc = run_report(config, command=" ".join(["python -m model.reports.vae"] + words))
    except (FileNotFoundError, ModuleNotFoundError) as exc:
        raise UserError(str(exc)) from None
    if config.stage == "train":
        print("training done; now run the same command with --stage evaluate")
        return 0
    ev, big = doc["evaluation"], doc["big"]
    print(f"held-out mean F-score {_f(ev['fscore_mean'], '.4f')} (bar {FSCORE_BAR}: "
          f"{'met' if ev['bar_met'] else 'not met'}); {big['resolution']}^3: model "
          f"{_f(big['model_seconds'], '.3f')} s, peak {big['peak_memory_bytes'] / 2**30:.2f} GiB; "
          f"report in {Path(config.out) / 'vae.md'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
