"""Stage ``sample`` of the DiT demonstration (package docstring, step 5): generate every shape of :func:`_jobs` with
the trained DiT, decode it with the VAE, extract and evaluate the meshes (worker processes), then write the report
(:func:`model.reports.dit_demo.report._report`)."""
from __future__ import annotations

import os
import time

import numpy as np
import torch

from model.reports.dit_demo.config import BAR, DemoConfig
from model.reports.dit_demo.encoder import CachedEncoder
from model.reports.dit_demo.report import _report
from model.reports.dit_demo.stages import _dit_checkpoint, _items


def _init_worker() -> None:
    """Initializer of the evaluation workers: one thread each."""
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)


def _evaluate_job(job: dict) -> tuple[str, dict]:
    """Extract the mesh of a decoded sparse SDF and compare it with the ground truth (runs in worker processes):
    ``(key, metrics [+ thumbnails]])``."""
    from types import SimpleNamespace

    from model.pipeline.extract import sparse_sdf_to_mesh
    from model.pipeline.preview import framing_extent, render_mesh
    from model.pipeline.reconstruct import evaluate_mesh, normalized_mesh

    t0 = time.perf_counter()
    mesh = sparse_sdf_to_mesh(job["coords"], job["sdf"], job["resolution"])
    gt = normalized_mesh(job["source"], SimpleNamespace(center=job["center"], scale=job["scale"]))
    m = evaluate_mesh(mesh, gt, num_points=job["points"], seed=job["seed"])
    out = {k: m[k] for k in ("fscore", "precision", "recall", "chamfer", "normal_consistency", "faces",
                             "fscore_all_faces", "gt_outer_fraction", "empty")}
    out["decoded_voxels"] = int(len(job["sdf"]))
    if job.get("thumbs"):
        extent = framing_extent(gt)
        size = job["thumb_size"]
        out["thumb"] = (render_mesh(mesh, size=size, extent=extent) * 255).astype(np.uint8)
        out["gt_thumb"] = (render_mesh(gt, size=size, extent=extent) * 255).astype(np.uint8)
    out["seconds"] = time.perf_counter() - t0
    return job["key"], out


@torch.no_grad()
def _decode(vae, coords: torch.Tensor, feats: torch.Tensor, latent_res: int, device: torch.device):
    """Decoded sparse SDF ``(coords [K, 3] int32, values [K] float32)`` of one shape's latents (inference pruning,
    bf16 autocast on CUDA as :func:`model.pipeline.reconstruct.reconstruct_sample`)."""
    from model.sparse.tensor import SparseTensor

    z = SparseTensor.from_list([coords.to(device)], [feats.to(device).float()], resolution=latent_res)
    with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
        sdf = vae.decode(z).sdf
    return sdf.coords[:, 1:].cpu().numpy().astype(np.int32), sdf.feats[:, 0].float().cpu().numpy()


def _noise(seed: int, index: int, shape) -> torch.Tensor:
    """The initial noise of shape ``index`` (the same for every ablation of that shape)."""
    return torch.randn(shape, generator=torch.Generator().manual_seed(int(seed) * 100_003 + int(index)))


def _jobs(cfg: DemoConfig, items: list[dict]) -> list[dict]:
    """What stage ``sample`` generates and evaluates (package docstring, step 5)."""
    train = [i for i, it in enumerate(items) if it["split"] == "train"]
    held = [i for i, it in enumerate(items) if it["split"] == "held_out"]
    unseen_views = list(range(cfg.train_views, cfg.views))
    fig_train, fig_held = set(train[: cfg.figure_rows]), set(held[: cfg.heldout_rows])
    g = cfg.guidance
    jobs = []

    def add(kind, i, *, view=None, guidance=None, latent="dit", thumbs=False):
        key = f"{kind}|{items[i]['name']}|{view}|{guidance}"
        jobs.append(dict(key=key, kind=kind, item=i, view=view, guidance=guidance, latent=latent, thumbs=thumbs))

    for i in train:  # the bar: every training mesh from its first training view
        add("train_image", i, view=0, guidance=g, thumbs=i in fig_train)
    unseen = train if cfg.unseen_count <= 0 else train[: cfg.unseen_count]
    for i in unseen:
        for v in unseen_views:
            add("train_shape_unseen_view", i, view=v, guidance=g)
    for i in held:
        for v in range(cfg.views):
            add("held_out_shape", i, view=v, guidance=g, thumbs=v == 0 and i in fig_held)
    for i in train[: cfg.ablation_count]:
        add("train_no_image", i, view=None, guidance=0.0)
    for s in cfg.sweep_scales():
        if s != g:
            for i in train[: cfg.sweep_count]:
                add(f"train_image_guidance_{s:g}", i, view=0, guidance=s)
    for i in train[: cfg.ablation_count] + held:
        add("coords_only", i, latent="mean")
    for i in train + held:
        add("vae_reconstruction", i, latent="posterior", thumbs=i in fig_train or i in fig_held)
    return jobs


def stage_sample(cfg: DemoConfig, device: torch.device) -> dict:
    """Generate, decode, extract, evaluate, report (package docstring, step 5); returns the JSON document."""
    from model.flow import euler_sample
    from model.nets.dit import Condition, load_dit
    from model.pipeline.reconstruct import load_vae
    from model.sparse.tensor import SparseTensor

    t_all = time.perf_counter()
    doc_items = _items(cfg)
    items = doc_items["items"]
    ck = _dit_checkpoint(cfg)
    if not ck.is_file():
        raise FileNotFoundError(f"{ck} not found: run --stage dit first")
    vae, vae_meta = load_vae(cfg.vae_checkpoint, device=device)
    dit, meta = load_dit(ck, weights=cfg.weights, device="cpu", return_meta=True)
    dit = dit.to(device).eval()
    latent_res = int(doc_items["latent_resolution"])
    stats = meta.get("latent_stats")
    mean = torch.tensor(stats["mean"], dtype=torch.float32, device=device) if stats else None
    std = torch.tensor(stats["std"], dtype=torch.float32, device=device) if stats else None
    enc = meta.get("encoder") or {}
    cached = CachedEncoder.build(size=enc.get("size", cfg.encoder_size), seed=int(enc.get("seed", cfg.encoder_seed)),
                                 device=device)
    latents = {}
    for i, it in enumerate(items):
        with np.load(cfg.data_dir / it["latent"]) as z:
            latents[i] = dict(coords=torch.from_numpy(z["coords"].astype(np.int32)),
                              mean=torch.from_numpy(z["mean"].astype(np.float32)),
                              center=np.asarray(z["center"], np.float64), scale=float(z["scale"]))
    jobs = _jobs(cfg, items)
    needed = sorted({(j["item"], j["view"]) for j in jobs if j["latent"] == "dit" and j["view"] is not None})
    t0 = time.perf_counter()
    feats = dict(zip(needed, cached.precompute([cfg.data_dir / items[i]["views"][v] for i, v in needed])))
    t_features = time.perf_counter() - t0

    pool = None
    if cfg.eval_workers > 0:
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor

        # spawned workers import this module (never __main__) to find the job and the initializer
        pool = ProcessPoolExecutor(max_workers=cfg.eval_workers, mp_context=multiprocessing.get_context("spawn"),
                                   initializer=_init_worker)
    evaluate = _evaluate_job
    pending, results, latent_error = [], {}, {}

    def submit(job, coords, values):
        lat = latents[job["item"]]
        task = dict(key=job["key"], coords=coords, sdf=values, resolution=cfg.resolution,
                    source=items[job["item"]]["source"], center=lat["center"], scale=lat["scale"],
                    points=cfg.points, seed=cfg.seed, thumbs=job["thumbs"], thumb_size=128 if cfg.smoke else 256)
        if pool is None:
            key, res = evaluate(task)
            results[key] = res
        else:
            pending.append(pool.submit(evaluate, task))

    autocast = torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")
    t_sampling = 0.0
    try:
        dit_jobs = [j for j in jobs if j["latent"] == "dit"]
        groups: dict[tuple, list[dict]] = {}
        for j in dit_jobs:
            groups.setdefault((j["guidance"], j["view"] is None), []).append(j)
        for (guidance, no_image), group in groups.items():
            for s in range(0, len(group), cfg.sample_batch):
                chunk = group[s:s + cfg.sample_batch]
                coords = [latents[j["item"]]["coords"] for j in chunk]
                shape_noise = torch.cat([_noise(cfg.seed, j["item"], (c.shape[0], dit.config.in_channels))
                                         for j, c in zip(chunk, coords)])
                x = SparseTensor.from_list([c.to(device) for c in coords],
                                           [torch.zeros(c.shape[0], dit.config.in_channels, device=device)
                                            for c in coords], resolution=latent_res)
                if no_image:
                    cond = Condition(torch.zeros(len(chunk), cached.encoder.num_tokens, cached.channels,
                                                 device=device))
                else:
                    cond = Condition(torch.stack([feats[(j["item"], j["view"])] for j in chunk]))
                t0 = time.perf_counter()
                with autocast:
                    z = euler_sample(dit, x, cond, steps=cfg.sample_steps, guidance=guidance if guidance > 1 else 0.0,
                                     shift=cfg.shift, noise=shape_noise)
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                t_sampling += time.perf_counter() - t0
                out = z.feats.float()
                if mean is not None:
                    out = out * std + mean
                for j, (c, f) in zip(chunk, z.replace(out).unbind()):
                    target = latents[j["item"]]["mean"].to(device)
                    scale = std if std is not None else torch.ones_like(target[0])
                    shift_ = mean if mean is not None else torch.zeros_like(target[0])
                    t_n = (target - shift_) / scale  # in the DiT's (normalised) units
                    latent_error[j["key"]] = float((((f - shift_) / scale) - t_n).norm() / t_n.norm().clamp_min(1e-12))
                    submit(j, *_decode(vae, c, f, latent_res, device))
        for j in jobs:
            if j["latent"] == "dit":
                continue
            lat = latents[j["item"]]
            f = lat["mean"] if j["latent"] == "posterior" else (
                mean.cpu().expand(lat["coords"].shape[0], -1) if mean is not None
                else torch.zeros(lat["coords"].shape[0], lat["mean"].shape[1]))
            submit(j, *_decode(vae, lat["coords"], f, latent_res, device))
        for fut in pending:
            key, res = fut.result()
            results[key] = res
    finally:
        if pool is not None:
            pool.shutdown(cancel_futures=True)
    t_generation = time.perf_counter() - t_all
    for key, err in latent_error.items():
        results[key]["latent_error"] = err
    doc = _report(cfg, device, items, jobs, results, dit=dit, meta=meta, vae=vae, vae_meta=vae_meta,
                  timings=dict(features=t_features, sampling=t_sampling, total_until_metrics=t_generation))
    print(f"training images: mean F-score {doc['summary']['train_image']['fscore_mean']:.3f} (bar {BAR}: "
          f"{'met' if doc['bar_met'] else 'NOT met'}); report in {cfg.report_dir / 'dit_demo.md'}")
    return doc


