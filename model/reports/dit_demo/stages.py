"""The stages of the DiT demonstration that make its inputs and train it (package docstring, steps 1-4):
``render`` (:func:`stage_render`), ``data`` (:func:`stage_data`), ``vae`` (:func:`stage_vae`) and ``dit``
(:func:`prepare_latents`, then :func:`stage_dit`)."""
from __future__ import annotations

import dataclasses
import hashlib
import json
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import torch

from model.io import atomic_save_npz, atomic_write_json, read_checkpoint_metadata
from model.reports.dit_demo.config import (
    ITEMS_FORMAT,
    VIEWS_FORMAT,
    DemoConfig,
    _append_jsonl,
    _folder,
    _json_safe,
    _mesh_list,
    _resolve,
)
from model.reports.dit_demo.encoder import CachedEncoder, _trainer_uses

# ---------------------------------------------------------------------------------------------------------------
# stage 1: views (CPU machine)


def stage_render(cfg: DemoConfig) -> dict:
    """Render the conditioning views (package docstring, step 1); returns the ``views.json`` document."""
    from model.data.render import render_views, save_rgba

    paths, names = _mesh_list(cfg)
    root = Path(cfg.views_dir)
    root.mkdir(parents=True, exist_ok=True)
    items, failed = {}, {}
    t0 = time.perf_counter()
    for path, name in zip(paths, names):
        folder = root / _folder(name)
        files = [folder / f"view_{v:02d}.png" for v in range(cfg.views)]
        try:
            if not all(f.is_file() for f in files):
                folder.mkdir(exist_ok=True)
                for f, rgba in zip(files, render_views(str(path), num_views=cfg.views, size=cfg.view_size,
                                                       backend=cfg.render_backend)):
                    save_rgba(f, rgba)
            items[name] = [f"{_folder(name)}/{f.name}" for f in files]
        except Exception as exc:  # one mesh must not stop the others
            failed[name] = f"{type(exc).__name__}: {exc}"
            print(f"render: skipping {path}: {failed[name]}", file=sys.stderr)
    doc = dict(format=VIEWS_FORMAT, views=cfg.views, size=cfg.view_size, elevation=20.0, azimuth_offset=30.0,
               backend=cfg.render_backend, meshes=str(cfg.meshes), items=items, failed=failed,
               bytes=sum(p.stat().st_size for p in root.rglob("*.png")), seconds=time.perf_counter() - t0)
    atomic_write_json(root / "views.json", _json_safe(doc))
    print(f"{len(items)} meshes x {cfg.views} views ({cfg.view_size} px) in {root}: "
          f"{doc['bytes'] / 2**20:.1f} MiB ({len(failed)} failed)")
    return doc


def _views(cfg: DemoConfig) -> dict:
    path = Path(cfg.views_dir) / "views.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: run --stage render (on a machine with pyrender) and carry "
                                f"{cfg.views_dir}")
    doc = json.loads(path.read_text())
    if doc.get("format") != VIEWS_FORMAT or doc.get("views") != cfg.views:
        raise ValueError(f"{path}: format {doc.get('format')!r} with {doc.get('views')} views; expected "
                         f"{VIEWS_FORMAT!r} with --views {cfg.views}")
    return doc


# ---------------------------------------------------------------------------------------------------------------
# stages 2-3: data and VAE


def _vae_train_config(cfg: DemoConfig, device: torch.device):
    """The :class:`model.training.vae.VAETrainConfig` of the demo (also what the data and split come from)."""
    from model.training.vae import VAETrainConfig

    tau = cfg.tau
    if cfg.vae:  # a reused VAE: its band
        meta = json.loads(read_checkpoint_metadata(cfg.vae).get("meta", "{}"))
        tau = float((meta.get("data") or {}).get("tau", tau))
    return VAETrainConfig(
        meshes=cfg.meshes, max_meshes=cfg.count, resolutions=(cfg.resolution,), tau=tau,
        cache_dir=str(cfg.sdf_cache), prepare_workers=cfg.workers, held_out_fraction=cfg.held_out_fraction,
        split_seed=cfg.split_seed, model=cfg.vae_model, batch_size=cfg.vae_batch, steps=cfg.vae_max_steps,
        lr=cfg.vae_lr, warmup_steps=cfg.vae_warmup, schedule="cosine", anneal_to_time_limit=True,
        time_limit=cfg.vae_minutes, device=str(device), out=str(cfg.root / "vae"), seed=cfg.seed,
        log_every=1 if cfg.smoke else 25, ckpt_every=1000, val_every=0, val_meshes=1 if cfg.smoke else 2,
        val_points=cfg.points, num_workers=cfg.loader_workers, progress=not cfg.smoke)


def _datasets(cfg: DemoConfig, device: torch.device, *, prepare: bool = False):
    from model.training.vae import build_datasets

    vcfg = _vae_train_config(cfg, device)
    if not prepare:
        vcfg = dataclasses.replace(vcfg, prepare_workers=0, progress=False)
    return build_datasets(vcfg)


def stage_data(cfg: DemoConfig, device: torch.device) -> dict:
    """The sparse SDF cache and the split (package docstring, step 2)."""
    views = _views(cfg)
    train_ds, held_ds, report = _datasets(cfg, device, prepare=True)
    missing = [n for n in list(train_ds.names) + list(held_ds.names if held_ds else []) if n not in views["items"]]
    if missing:
        raise ValueError(f"{len(missing)} meshes have no views in {cfg.views_dir} (e.g. {missing[:3]}): render "
                         "them with --stage render and the same --meshes/--count")
    doc = dict(report, train=list(train_ds.names), held_out=list(held_ds.names) if held_ds else [],
               resolution=cfg.resolution, tau=train_ds.params["tau"], margin=train_ds.params["margin"])
    atomic_write_json(cfg.root / "data.json", _json_safe(doc))
    print(f"data: {len(train_ds)} training and {len(doc['held_out'])} held-out meshes at {cfg.resolution}^3 "
          f"({report.get('computed', 0)} computed, {len(report.get('failed', {}))} failed) in "
          f"{report['seconds']:.0f} s")
    return doc


def stage_vae(cfg: DemoConfig, device: torch.device) -> dict | None:
    """Train the VAE (package docstring, step 3) unless ``--vae`` names one or it was trained already."""
    from model.training.vae import train

    if cfg.vae:
        print(f"vae: reusing {cfg.vae}")
        return None
    summary_path = cfg.root / "vae" / "summary.json"
    if summary_path.is_file():
        print(f"vae: already trained ({summary_path})")
        return json.loads(summary_path.read_text())
    summary = train(_vae_train_config(cfg, device))
    atomic_write_json(summary_path, _json_safe(summary))
    val = summary.get("validation") or {}
    print(f"vae: {summary['steps']} steps in {summary['train_seconds']:.0f} s; held-out F-score "
          f"{val.get('fscore', float('nan')):.3f}")
    return summary


# ---------------------------------------------------------------------------------------------------------------
# stage 4: latents and DiT training


def _file_key(path: Path) -> str:
    """A short hash of the file's resolved path, size and modification time (which VAE made the latents)."""
    st = path.stat()
    return hashlib.sha1(f"{path.resolve()}|{st.st_size}|{st.st_mtime_ns}".encode()).hexdigest()[:16]


def _items(cfg: DemoConfig) -> dict:
    path = cfg.data_dir / "items.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: run --stage dit first")
    return json.loads(path.read_text())


def prepare_latents(cfg: DemoConfig, device: torch.device) -> dict:
    """Encode every mesh (training and held-out) and write ``DIR/dit_data``: per mesh ``latent.npz`` (the fields
    of :func:`model.training.dit_data.encode_mesh`) and its views; ``manifest.json`` (training meshes with their
    training views, for :class:`model.training.dit.LatentDataset`) and ``items.json`` (every mesh, its split and all
    its views). Skipped when ``items.json`` was made by the same VAE checkpoint."""
    from model.pipeline.reconstruct import load_vae
    from model.sparse.tensor import SparseTensor
    from model.training.dit_data import LATENT_NAME, MANIFEST_FORMAT, MANIFEST_NAME

    ckpt = cfg.vae_checkpoint
    if not ckpt.is_file():
        raise FileNotFoundError(f"VAE checkpoint {ckpt} not found: run --stage vae first (or pass --vae CKPT)")
    key = _file_key(ckpt)
    items_path = cfg.data_dir / "items.json"
    if items_path.is_file():
        doc = json.loads(items_path.read_text())
        if doc.get("vae_key") == key and doc.get("format") == ITEMS_FORMAT:
            return doc
    t0 = time.perf_counter()
    views = _views(cfg)
    vae, _ = load_vae(ckpt, device=device)
    train_ds, held_ds, _ = _datasets(cfg, device)
    out = cfg.data_dir
    out.mkdir(parents=True, exist_ok=True)
    items, manifest_items = [], []
    for split, ds in (("train", train_ds), ("held_out", held_ds)):
        if ds is None:
            continue
        for i, name in enumerate(ds.names):
            sample = ds.sample(i, cfg.resolution)
            x = SparseTensor.from_list([torch.from_numpy(sample.coords.astype(np.int32)).to(device)],
                                       [torch.from_numpy(sample.sdf_scaled).unsqueeze(1).to(device)],
                                       resolution=cfg.resolution)
            with torch.no_grad():
                post = vae.encode(x)
            folder = out / _folder(name)
            folder.mkdir(exist_ok=True)
            coords = post.mean.coords[:, 1:].cpu().numpy().astype(np.int32)
            atomic_save_npz(folder / LATENT_NAME, dict(
                coords=coords, mean=post.mean.feats.float().cpu().numpy(), logvar=post.logvar.float().cpu().numpy(),
                resolution=np.int64(cfg.resolution // vae.config.downsample_factor),
                sdf_resolution=np.int64(cfg.resolution), center=np.asarray(sample.center, np.float64),
                scale=np.float64(sample.scale), sdf_voxels=np.int64(len(sample)), tau=np.float64(sample.tau),
                margin=np.float64(sample.margin), vae_key=np.str_(key), source=np.str_(str(ds.paths[i]))))
            files = []
            for rel in views["items"][name]:
                target = folder / Path(rel).name
                shutil.copyfile(Path(cfg.views_dir) / rel, target)
                files.append(f"{_folder(name)}/{target.name}")
            entry = dict(name=name, split=split, latent=f"{_folder(name)}/{LATENT_NAME}", views=files,
                         tokens=int(coords.shape[0]), source=str(ds.paths[i]))
            items.append(entry)
            if split == "train":
                manifest_items.append(dict(name=name, latent=entry["latent"], views=files[: cfg.train_views],
                                           tokens=entry["tokens"], source=entry["source"]))
    latent_res = cfg.resolution // vae.config.downsample_factor
    manifest = dict(format=MANIFEST_FORMAT, created=time.strftime("%Y-%m-%d %H:%M:%S"),
                    sdf_resolution=cfg.resolution, latent_resolution=latent_res,
                    latent_channels=int(vae.config.latent_channels), views=cfg.train_views,
                    image_size=cfg.view_size, vae_key=key, vae_config=dataclasses.asdict(vae.config),
                    tau=float(train_ds.params["tau"]), margin=float(train_ds.params["margin"]),
                    items=manifest_items, failed=[])
    atomic_write_json(out / MANIFEST_NAME, _json_safe(manifest))
    doc = dict(format=ITEMS_FORMAT, vae_key=key, vae=str(ckpt), latent_resolution=latent_res,
               latent_channels=int(vae.config.latent_channels), downsample=int(vae.config.downsample_factor),
               train_views=cfg.train_views, items=items, seconds=time.perf_counter() - t0)
    atomic_write_json(items_path, _json_safe(doc))
    tokens = [it["tokens"] for it in items]
    print(f"latents: {len(items)} meshes ({len(manifest_items)} for training), {min(tokens)}-{max(tokens)} tokens "
          f"(mean {np.mean(tokens):.0f}) at {latent_res}^3 in {doc['seconds']:.0f} s")
    return doc


def dit_train_config(cfg: DemoConfig, items: dict, *, backend: str, precision: str, steps: int,
                     minutes: float | None, device: torch.device):
    """The :class:`model.training.dit.TrainConfig` of the demo's DiT (package docstring and :data:`DIT_CHOICES`)."""
    from model.nets.conditioning import dinov2_vitl14_reg_config, tiny_dinov2_config
    from model.training.dit import TrainConfig

    enc_cfg = dinov2_vitl14_reg_config() if cfg.encoder_size == "vitl14" else tiny_dinov2_config()
    latent_res = int(items["latent_resolution"])
    overrides = dict(resolution=latent_res, pos_factor=64.0 / latent_res, in_channels=int(items["latent_channels"]),
                     out_channels=int(items["latent_channels"]), model_channels=cfg.dit_width,
                     cond_channels=int(enc_cfg.hidden_size), num_blocks=cfg.dit_blocks, num_heads=cfg.dit_heads,
                     num_kv_heads=cfg.dit_kv_heads, compression_block=cfg.compression_block,
                     selection_block=cfg.selection_block, topk=cfg.topk, window=cfg.window,
                     compression_version="v1", mlp_ratio=cfg.mlp_ratio)
    return TrainConfig(data=str(cfg.data_dir), out=str(cfg.dit_dir), model="released_512", model_overrides=overrides,
                       backend=backend, encoder=None, encoder_size=cfg.encoder_size, encoder_seed=cfg.encoder_seed,
                       steps=steps, lr=cfg.dit_lr, warmup_steps=cfg.dit_warmup, schedule="constant", grad_clip=1.0,
                       batch_tokens=cfg.batch_tokens, max_batch=cfg.max_batch, ema_decay=cfg.ema_decay,
                       cond_drop_prob=cfg.cond_drop_prob, latent="mean", normalize_latents=True,
                       precision=precision, seed=cfg.seed, log_every=1 if cfg.smoke else 10,
                       save_every=cfg.save_every, keep_checkpoints=1, device=str(device), time_limit_min=minutes,
                       progress=not cfg.smoke)


def _dit_calls(cfg: DemoConfig) -> list[dict]:
    from model.training.common import read_jsonl

    return read_jsonl(cfg.dit_dir / "calls.jsonl")


def _dit_checkpoint(cfg: DemoConfig) -> Path:
    return cfg.dit_dir / "checkpoints" / "last.safetensors"


def stage_dit(cfg: DemoConfig, device: torch.device) -> dict | None:
    """Latents (first call), then DiT training for ``--dit-time-limit`` minutes from the last checkpoint, within
    ``--dit-total-time-limit`` minutes over all calls (package docstring, step 4)."""
    from model.training.dit import train

    items = prepare_latents(cfg, device)
    spent = sum(c.get("seconds", 0.0) for c in _dit_calls(cfg)) / 60.0
    start = 0
    ck = _dit_checkpoint(cfg)
    if ck.is_file():
        start = int(read_checkpoint_metadata(ck).get("step", 0))
    remaining = cfg.dit_budget - spent
    if remaining < 0.1 or start >= cfg.dit_max_steps:
        print(f"dit: budget spent ({spent:.1f} of {cfg.dit_budget:g} min, step {start}); nothing to do")
        return None
    steps = cfg.dit_max_steps if cfg.dit_call_steps <= 0 else min(cfg.dit_max_steps, start + cfg.dit_call_steps)
    minutes = min(cfg.dit_minutes, remaining)
    _, backend, precision = _resolve(cfg)
    tcfg = dit_train_config(cfg, items, backend=backend, precision=precision, steps=steps, minutes=minutes,
                            device=device)
    t0 = time.perf_counter()
    cached = CachedEncoder.build(size=cfg.encoder_size, seed=cfg.encoder_seed, device=device)
    data_dir = cfg.data_dir
    paths = [data_dir / v for it in items["items"] if it["split"] == "train" for v in it["views"][: cfg.train_views]]
    cached.precompute(paths)
    cached.hits = cached.misses = 0  # from here on: lookups by the trainer (all should hit)
    t_features = time.perf_counter() - t0
    print(f"dit: features of {len(paths)} training views in {t_features:.0f} s; training from step {start} for up "
          f"to {minutes:.1f} min ({spent:.1f} of {cfg.dit_budget:g} min spent)", flush=True)
    t1 = time.perf_counter()
    with _trainer_uses(cached):
        result = train(tcfg, resume="auto")
    seconds = time.perf_counter() - t1
    record = dict(start_step=start, end_step=result["step"], seconds=seconds, feature_seconds=t_features,
                  loss=result["loss"], minutes_limit=minutes, encoder_cache_hits=cached.hits,
                  encoder_cache_misses=cached.misses, date=time.strftime("%Y-%m-%d %H:%M:%S"))
    _append_jsonl(cfg.dit_dir / "calls.jsonl", record)
    print(f"dit: steps {start} -> {result['step']} in {seconds:.0f} s, loss {result['loss']}; encoder lookups "
          f"{cached.hits} hits, {cached.misses} misses")
    return record


