"""Prepare the sparse DiT's training data: sparse latents from the VAE and rendered conditioning views, per mesh.

``python -m model.cli.prepare_dit_data MESH_DIR --vae CKPT --out DIR [--views 4] [--image-size 518]``

For each mesh under ``MESH_DIR`` (recursively, every format :mod:`model.data.meshes` reads):

1. the sparse SDF at the VAE's resolution (:func:`model.data.sdf.mesh_to_sparse_sdf`, values ``sdf / tau``), with
   the band ``tau`` and normalisation ``margin`` the VAE was trained with (recorded in its checkpoint's ``data``
   entry; ``--tau`` overrides, the data defaults otherwise);
2. the VAE posterior of it (:meth:`model.nets.vae.SparseSDFVAE.encode`): ``DIR/<name>/latent.npz`` with ``coords [M, 3]``
   int32 latent voxels (raster order), ``mean [M, L]`` and ``logvar [M, L]`` float32, ``resolution`` (latent grid
   side), ``sdf_resolution``, ``tau``, ``margin``, ``center``/``scale`` (the mesh normalisation) and ``vae_key``
   (which VAE checkpoint made it);
3. ``--views`` RGBA renders (:func:`model.data.render.render_views`, alpha = object mask, the same normalisation as the
   SDF): ``DIR/<name>/view_00.png`` ...;
4. ``DIR/manifest.json``: the items (name, files, token count) and the meshes that failed (with the reason).

Every file is written atomically (temporary file + rename). A mesh whose files exist (latent made by the same VAE,
all views present) is skipped unless ``--overwrite``, so an interrupted run resumes where it stopped.

VAE checkpoints (:func:`load_vae`): a checkpoint of :mod:`model.training.common` (``save_checkpoint``; the VAE config in
its metadata document under ``vae_config``, ``config`` (or ``config["vae"]``/``config["model"]``)), or a ``.pt``
file ``{"config": {...}, "state_dict": {...}}``. ``--vae-config`` (a preset name of :class:`model.nets.vae.VAEConfig`
or a JSON file) overrides or supplies the configuration.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

from model.io import atomic_save_npz, atomic_write_json, load_checkpoint

__all__ = ["MANIFEST_FORMAT", "data_params", "encode_mesh", "load_vae", "mesh_names", "prepare_dataset", "vae_config_from"]

#: ``format`` entry of the manifest.
MANIFEST_FORMAT = "ssa-dit-data/1"
MANIFEST_NAME = "manifest.json"
LATENT_NAME = "latent.npz"


# ---------------------------------------------------------------------------------------------------------------
# the VAE


def vae_config_from(spec):
    """A :class:`model.nets.vae.VAEConfig` from a preset name (``tiny``, ``released_512``, ``released_1024``), a JSON
    file, or a dict of its fields (unknown keys are ignored; lists become tuples)."""
    from model.nets.vae import VAEConfig

    if isinstance(spec, VAEConfig):
        return spec
    if isinstance(spec, (str, os.PathLike)):
        s = os.fspath(spec)
        if s in ("tiny", "released_512", "released_1024"):
            return getattr(VAEConfig, s)()
        if not os.path.isfile(s):
            raise ValueError(f"vae config {s!r} is neither a preset (tiny, released_512, released_1024) nor a file")
        spec = json.loads(Path(s).read_text())
    if not isinstance(spec, dict):
        raise TypeError(f"vae config must be a preset name, a JSON file or a dict, got {type(spec).__name__}")
    names = {f.name for f in dataclasses.fields(VAEConfig)}
    kwargs = {k: tuple(v) if isinstance(v, list) else v for k, v in spec.items() if k in names}
    return VAEConfig(**kwargs)


def _find_vae_config(meta: dict):
    """The VAE config dict inside a checkpoint's metadata document, or None."""
    candidates = [meta.get("vae_config"), meta.get("config")]
    cfg = meta.get("config")
    if isinstance(cfg, dict):
        candidates += [cfg.get("vae"), cfg.get("model"), cfg.get("vae_config")]
    for c in candidates:
        if isinstance(c, dict) and "latent_channels" in c:
            return c
    return None


def load_vae(path, *, config=None, device="cpu", weights: str = "ema"):
    """A :class:`model.nets.vae.SparseSDFVAE` in eval mode from ``path`` (module docstring for the formats).

    ``config`` (preset name, JSON file, dict or VAEConfig) overrides the stored configuration; ``weights`` prefers
    EMA weights (keys ``ema.*``) when the checkpoint has them. The data normalisation the VAE was trained with
    (``{"tau": ..., "margin": ...}`` of the checkpoint's ``data`` entry, empty when not recorded) is kept as
    ``vae.data_params``; the data and sampling scripts use it as their default band and margin.
    """
    from model.nets.vae import SparseSDFVAE

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"VAE checkpoint not found: {path}")
    stored, recorded = None, {}
    if path.suffix == ".safetensors":
        ck = load_checkpoint(path)
        state, stored = ck.model, _find_vae_config(ck.meta)
        recorded = ck.meta.get("data") if isinstance(ck.meta.get("data"), dict) else {}
    else:
        blob = torch.load(path, map_location="cpu", weights_only=True)
        if not isinstance(blob, dict):
            raise ValueError(f"{path}: expected a dict with 'state_dict' (or a state dict)")
        state = blob.get("state_dict", blob.get("model", blob.get("vae", blob)))
        stored = blob.get("config") if isinstance(blob.get("config"), dict) else None
    if weights == "ema" and any(k.startswith("ema.") for k in state):
        state = {k[4:]: v for k, v in state.items() if k.startswith("ema.")}
    else:
        state = {k: v for k, v in state.items() if not k.startswith("ema.")}
    state = {k[7:] if k.startswith("module.") else k: v for k, v in state.items()}
    cfg = config if config is not None else stored
    if cfg is None:
        raise ValueError(f"{path} carries no VAE configuration: pass --vae-config (a preset or a JSON file)")
    vae = SparseSDFVAE(vae_config_from(cfg))
    vae.load_state_dict(state, strict=True)
    vae.data_params = dict(recorded)  # the VAE's training data normalisation (tau, margin) when recorded
    return vae.to(device).eval()


def data_params(vae, tau: float | None = None, margin: float | None = None) -> tuple[float, float]:
    """``(tau, margin)``: the given values, else the VAE checkpoint's recorded ones, else the data defaults."""
    from model.data.sdf import DEFAULT_MARGIN, DEFAULT_TAU

    rec = getattr(vae, "data_params", {}) or {}
    return (float(tau or rec.get("tau") or DEFAULT_TAU), float(margin or rec.get("margin") or DEFAULT_MARGIN))


def _file_key(path) -> str:
    st = os.stat(path)
    return hashlib.sha1(f"{os.path.realpath(path)}|{st.st_size}|{st.st_mtime_ns}".encode()).hexdigest()[:16]


@torch.no_grad()
def encode_mesh(vae, mesh, *, resolution: int | None = None, tau: float | None = None, margin: float | None = None,
                device="cpu") -> dict:
    """Sparse latent of ``mesh`` (path or trimesh): ``{"coords": int32 [M, 3], "mean", "logvar": float32 [M, L],
    "resolution": latent side, "sdf_resolution", "center", "scale", "sdf_voxels"}``."""
    from model.data.sdf import mesh_to_sparse_sdf
    from model.sparse.tensor import SparseTensor

    res = resolution or vae.config.resolution
    tau, margin = data_params(vae, tau, margin)
    sample = mesh_to_sparse_sdf(mesh, res, tau=tau, margin=margin)
    if len(sample) == 0:
        raise ValueError("the mesh gives no voxel in the SDF band")
    coords = torch.from_numpy(sample.coords.astype(np.int32))
    x = SparseTensor.from_list([coords.to(device)], [torch.from_numpy(sample.sdf_scaled).unsqueeze(1).to(device)],
                               resolution=res)
    post = vae.encode(x)
    return {
        "coords": post.mean.coords[:, 1:].cpu().numpy().astype(np.int32),
        "mean": post.mean.feats.float().cpu().numpy(),
        "logvar": post.logvar.float().cpu().numpy(),
        "resolution": np.int64(res // vae.config.downsample_factor),
        "sdf_resolution": np.int64(res),
        "center": np.asarray(sample.center, np.float64),
        "scale": np.float64(sample.scale),
        "sdf_voxels": np.int64(len(sample)),
        "tau": np.float64(tau),
        "margin": np.float64(margin),
    }


# ---------------------------------------------------------------------------------------------------------------
# the dataset


def mesh_names(paths, root) -> list[str]:
    """Unique item names: the path relative to ``root`` without extension, folders joined with ``__``."""
    root = Path(root)
    names, seen = [], {}
    for p in paths:
        try:
            rel = Path(p).relative_to(root) if root.is_dir() else Path(Path(p).name)
        except ValueError:
            rel = Path(Path(p).name)
        base = "__".join(rel.with_suffix("").parts) or "mesh"
        base = "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in base)
        n = seen.get(base, 0)
        seen[base] = n + 1
        names.append(base if n == 0 else f"{base}_{n}")
    return names


def prepare_dataset(mesh_dir, vae, out, *, vae_key: str = "", views: int = 4, image_size: int = 518,
                    resolution: int | None = None, tau: float | None = None, elevation: float = 20.0,
                    render_backend: str = "auto", overwrite: bool = False, device="cpu",
                    progress: bool = True) -> dict:
    """Latents and views of every mesh under ``mesh_dir`` into ``out`` (module docstring); returns the manifest."""
    from model.data.meshes import find_meshes
    from model.data.render import render_views, save_rgba
    from model.data.sdf import load_mesh

    if not isinstance(views, int) or views < 1:
        raise ValueError(f"views must be a positive int, got {views!r}")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    tau, margin = data_params(vae, tau)
    paths = find_meshes(mesh_dir)
    if not paths:
        raise ValueError(f"no meshes found under {mesh_dir}")
    names = mesh_names(paths, mesh_dir)
    items, failed = [], []
    it = zip(paths, names)
    if progress:
        from tqdm.auto import tqdm

        it = tqdm(list(it), desc="meshes", unit="mesh")
    for path, name in it:
        folder = out / name
        folder.mkdir(exist_ok=True)
        latent_path = folder / LATENT_NAME
        view_paths = [folder / f"view_{i:02d}.png" for i in range(views)]
        try:
            fresh = overwrite or not latent_path.is_file()
            if not fresh:
                with np.load(latent_path) as z:
                    fresh = (str(z["vae_key"]) != vae_key
                             or int(z["sdf_resolution"]) != int(resolution or vae.config.resolution)
                             or "tau" not in z or float(z["tau"]) != tau or float(z["margin"]) != margin)
            if fresh:
                lat = encode_mesh(vae, os.fspath(path), resolution=resolution, tau=tau, margin=margin, device=device)
                atomic_save_npz(latent_path, {**lat, "vae_key": np.str_(vae_key), "source": np.str_(os.fspath(path))})
            with np.load(latent_path) as z:
                tokens = int(z["coords"].shape[0])
            if overwrite or not all(p.is_file() for p in view_paths):
                mesh = load_mesh(os.fspath(path))
                for p, rgba in zip(view_paths, render_views(mesh, num_views=views, size=image_size, margin=margin,
                                                            elevation=elevation, backend=render_backend)):
                    save_rgba(p, rgba)
            items.append({"name": name, "latent": f"{name}/{LATENT_NAME}",
                          "views": [f"{name}/{p.name}" for p in view_paths], "tokens": tokens,
                          "source": os.fspath(path)})
        except Exception as exc:  # one bad mesh must not stop the run
            failed.append({"name": name, "source": os.fspath(path), "error": f"{type(exc).__name__}: {exc}"})
            print(f"prepare_dit_data: skipping {path}: {type(exc).__name__}: {exc}", file=sys.stderr)
    manifest = {
        "format": MANIFEST_FORMAT,
        "created": time.strftime("%Y-%m-%d %H:%M:%S"),
        "sdf_resolution": int(resolution or vae.config.resolution),
        "latent_resolution": int((resolution or vae.config.resolution) // vae.config.downsample_factor),
        "latent_channels": int(vae.config.latent_channels),
        "views": views,
        "image_size": image_size,
        "vae_key": vae_key,
        "vae_config": dataclasses.asdict(vae.config),
        "tau": tau,
        "margin": margin,
        "items": items,
        "failed": failed,
    }
    atomic_write_json(out / MANIFEST_NAME, manifest)
    return manifest
