"""The sparse DiT's learning demonstration: a VAE and a small image-conditioned DiT trained on ~100 real meshes
(pybullet's objects) with rendered views; shapes generated from the training images must come back (memorisation
proves that the whole loop works: data, VAE latents, image conditioning, SSA training, sampling, decoding,
extraction), and held-out images are reported without a bar.

``python -m model.reports.dit_demo --stage STAGES --out DIR [options]``; ``STAGES`` is one stage or a comma list of
``render``, ``data``, ``vae``, ``dit``, ``sample`` (run in that order), or ``all``. Every stage reads what the
earlier ones left in ``DIR``, so a machine that allows 10 minutes per command runs them as consecutive calls:

1. ``render`` (the CPU machine, pyrender through EGL; the GPU machine has no pyrender): ``--views`` RGBA views per
   mesh (:func:`model.data.render.render_views`, ``--view-size`` px, elevation 20 degrees, azimuths 30 + k 360 / views)
   of the first ``--count`` meshes of ``--meshes`` into ``--views-dir`` (``NAME/view_XX.png`` + ``views.json``).
   Views ``0 .. --train-views - 1`` condition the training; the others are held out.
2. ``data``: the sparse SDF of every mesh at ``--resolution`` (band ``--tau``), ``--workers`` processes, cached
   in ``DIR/sdf_cache``; the name-hash split of :mod:`model.data.dataset` holds out ``--held-out-fraction``
   (the same split for the VAE and the DiT: held-out meshes are unseen by both).
3. ``vae``: :func:`model.training.vae.train` for ``--vae-minutes`` (the setup of ``model.reports.vae``: preset
   ``base``, batch 4, AdamW 1e-3, 200 warm-up steps, cosine annealed to the time limit, bf16), into ``DIR/vae``.
   ``--vae CKPT`` reuses a trained VAE instead (then this stage does nothing).
4. ``dit``: the first call encodes every mesh with the VAE (posterior mean and log-variance on the latent voxels,
   ``DIR/dit_data/NAME/latent.npz``) and writes the training manifest of :mod:`model.training.dit_data` (training
   meshes, training views); then :func:`model.training.dit.train` runs for ``--dit-minutes``, resuming from the last
   checkpoint. Call it again to continue, until ``--dit-budget`` minutes of DiT training are spent (a call after
   that does nothing). The frozen image encoder's features of every conditioning view are computed once per call
   and looked up during training (:class:`CachedEncoder`: exact, keyed by the image's pixels; the DiT trainer's
   encoder is swapped for it while it runs), instead of a ViT-L forward pass on every training step.
5. ``sample``: for every training mesh, a shape generated from one of its training views, and for held-out
   images (views of training meshes never used in training; every view of the held-out meshes) with the **real
   latent coordinates of the target mesh** (the dense structure stage that predicts them does not exist yet):
   Euler sampling (``--sample-steps``, ``--shift``, ``--guidance``), VAE decoding, brick-wise marching cubes,
   F-score at 1/128 and Chamfer distance against the ground-truth mesh with the outer-surface evaluation of
   :func:`model.pipeline.reconstruct.evaluate_mesh` (``--eval-workers`` processes). References on the same coordinates:
   the VAE's own reconstruction (the posterior mean decoded: a perfect DiT's result) and the latents set to the
   training mean ("coordinates only": what the given coordinates alone yield). Ablations on some training meshes:
   no image (the zeroed condition) and other guidance scales. Writes ``DIR/report/dit_demo.md``,
   ``dit_demo.json``, side-by-side renders (conditioning view, ground truth, generated, VAE reconstruction;
   thumbnails of :func:`model.pipeline.preview.render_mesh`) and the loss curves.
6. ``report``: rewrites ``DIR/report/dit_demo.md`` from ``dit_demo.json`` (no model is loaded; ``sample`` already
   wrote it, this is for a report whose text changed after the run).

The bar (the issue's): mean F-score >= 0.7 on the shapes generated from the training images.

The image encoder is DINOv2 ViT-L/14 with registers built from its configuration with **random weights** (seeded,
frozen: a fixed function of the image, not DINOv2 features): no machine here can download DINOv2 weights
(``--encoder-size``/``--encoder-seed``; the report says so).

The DiT (``--dit-*``; reasons in :data:`DIT_CHOICES`): width 512, 8 blocks, 16 query heads of 32 and 2 kv heads
(the released head size and kv count), MLP ratio 4, SSA with 4^3 compression blocks (v1.1 compression), 8^3
selection blocks top-8 and 8^3 windows (shifted on odd blocks), through the Triton kernels on the GPU; about 47M
parameters. AdamW 3e-4 after 200 warm-up steps, constant, EMA 0.999, batches of 40,960 tokens (at most 16 shapes),
condition dropout 0.1, logit-normal timesteps, posterior means normalised per channel, bf16 autocast.

GPU sequence (one H100, each call under 10 minutes, the machine kept warm between them; ``DIR`` outside the
repository, e.g. ``/root/runs/dit_demo``)::

    python -m model.reports.dit_demo --stage render --meshes data_cache/meshes --count 100      # CPU machine, once
    python -m model.reports.dit_demo --stage data,vae --meshes data_cache/meshes --out DIR      # ~0.5 + 7 min
    python -m model.reports.dit_demo --stage dit --meshes data_cache/meshes --out DIR           # ~1 + 7.5 min
    python -m model.reports.dit_demo --stage dit --meshes data_cache/meshes --out DIR           # ~0.5 + 7.5 min
    python -m model.reports.dit_demo --stage sample --meshes data_cache/meshes --out DIR        # ~3 min

``--smoke``: the whole loop on the CPU at toy size (32^3, tiny models, a few steps, the numpy rasteriser), for the
tests; its figures mean nothing.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import hashlib
import json
import math
import os
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

__all__ = ["BAR", "CachedEncoder", "DemoConfig", "STAGES", "main", "run"]

#: The issue's bar: mean F-score (at 1/128) of the shapes generated from the training images.
BAR = 0.7
#: Stages in the order they run.
STAGES = ("render", "data", "vae", "dit", "sample", "report")
#: Formats of the files this module writes.
VIEWS_FORMAT = "ssa-dit-demo-views/1"
ITEMS_FORMAT = "ssa-dit-demo-items/1"
#: Why the DiT and its training look the way they do (also printed in the report).
DIT_CHOICES = (
    "At 256^3 the VAE's latent grid is 32^3 (downsampling 8) and a pybullet object occupies 1.5k-3.3k latent voxels "
    "(about 2.6k on average), so 90 training shapes are about 230k tokens of 16 channels. Width 512 with 8 blocks "
    "(16 query heads of 32 and 2 kv heads, the released head size and kv count; about 47M parameters, a fifth of "
    "them in the cross-attention to the 1024-wide image tokens) holds far more than those 3.7M numbers, and at "
    "~40k tokens per step its matrix products take a few milliseconds on an H100, so a step costs about as much "
    "as the kernel launches, the SSA kernels and the cross-attention to 1,374 image tokens: the batch is made as "
    "large as that overhead allows (40,960 tokens, about 15 shapes) rather than the model smaller. SSA blocks fit "
    "the 32^3 grid: a shape spans ~40 selection blocks of 8^3, each query reads its top-8 of them (~500 tokens), "
    "its 8^3 window (shifted by 4 on odd blocks) and the ~250 compressed 4^3 blocks. Memorisation wants many "
    "optimizer steps: AdamW 3e-4 (constant after 200 warm-up steps) with an EMA of horizon ~1,000 steps; at the "
    "~4.5 steps/s measured on an H100, 14 minutes are ~3.5k steps of ~13 shapes, i.e. each training image pair is "
    "seen ~250 times. Targets "
    "are posterior means (normalised per channel) so every training image has one exact answer."
)


# ---------------------------------------------------------------------------------------------------------------
# configuration


@dataclass
class DemoConfig:
    """Options of :func:`run` (the command line sets them by name; ``--smoke`` swaps in :data:`SMOKE`)."""

    out: str = "runs/dit_demo"
    meshes: str | None = None
    count: int = 100
    views_dir: str = "data_cache/dit_views"
    views: int = 3
    train_views: int = 2
    view_size: int = 256
    render_backend: str = "pyrender"
    resolution: int = 256
    tau: float = 2.0
    held_out_fraction: float = 0.1
    split_seed: int = 0
    workers: int = 16
    cache_dir: str | None = None
    vae: str | None = None
    vae_model: str = "base"
    vae_minutes: float = 7.0
    vae_max_steps: int = 100_000
    vae_batch: int = 4
    vae_lr: float = 1e-3
    vae_warmup: int = 200
    loader_workers: int = 6
    dit_width: int = 512
    dit_blocks: int = 8
    dit_heads: int = 16
    dit_kv_heads: int = 2
    compression_block: int = 4
    selection_block: int = 8
    topk: int = 8
    window: int = 8
    mlp_ratio: float = 4.0
    encoder_size: str = "vitl14"
    encoder_seed: int = 0
    backend: str = "auto"
    precision: str = "auto"
    dit_lr: float = 3e-4
    dit_warmup: int = 200
    batch_tokens: int = 40_960
    max_batch: int = 16
    ema_decay: float = 0.999
    cond_drop_prob: float = 0.1
    dit_minutes: float = 7.5
    dit_budget: float = 15.0
    dit_max_steps: int = 1_000_000
    dit_call_steps: int = 0
    save_every: int = 1500
    sample_steps: int = 30
    guidance: float = 1.0
    shift: float = 3.0
    sweep: str = "3,7"
    sweep_count: int = 12
    ablation_count: int = 30
    unseen_count: int = 0
    sample_batch: int = 16
    weights: str = "ema"
    points: int = 100_000
    eval_workers: int = 15
    figure_rows: int = 6
    heldout_rows: int = 4
    seed: int = 0
    device: str = "auto"
    stage: str = "all"
    smoke: bool = False

    def __post_init__(self):
        for name in ("count", "views", "train_views", "view_size", "resolution", "vae_max_steps", "vae_batch",
                     "dit_width", "dit_blocks", "dit_heads", "dit_kv_heads", "batch_tokens", "max_batch",
                     "dit_max_steps", "save_every", "sample_steps", "sample_batch", "points"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if self.train_views > self.views:
            raise ValueError(f"train_views ({self.train_views}) must not exceed views ({self.views})")
        for name in ("vae_minutes", "dit_minutes", "dit_budget"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and value > 0):
                raise ValueError(f"{name} must be a positive number of minutes, got {value!r}")
        if self.weights not in ("ema", "model"):
            raise ValueError(f"weights must be 'ema' or 'model', got {self.weights!r}")
        if self.backend not in ("auto", "kernels", "reference"):
            raise ValueError(f"backend must be auto, kernels or reference, got {self.backend!r}")
        if self.precision not in ("auto", "fp32", "bf16"):
            raise ValueError(f"precision must be auto, fp32 or bf16, got {self.precision!r}")
        self.stages()  # validates the stage list
        self.sweep_scales()

    def stages(self) -> list[str]:
        """The stages of ``stage`` (a name, a comma list, or ``all``), in running order."""
        asked = [s.strip() for s in self.stage.split(",") if s.strip()]
        if asked == ["all"]:
            return list(STAGES)
        unknown = sorted(set(asked) - set(STAGES))
        if unknown or not asked:
            raise ValueError(f"stage must be 'all' or a comma list of {STAGES}, got {self.stage!r}")
        return [s for s in STAGES if s in asked]

    def sweep_scales(self) -> list[float]:
        try:
            return [float(s) for s in self.sweep.split(",") if s.strip()]
        except ValueError as exc:
            raise ValueError(f"sweep must be a comma list of guidance scales, got {self.sweep!r}") from exc

    # the run folder -----------------------------------------------------------------------------------------

    @property
    def root(self) -> Path:
        return Path(self.out)

    @property
    def sdf_cache(self) -> Path:
        return Path(self.cache_dir) if self.cache_dir else self.root / "sdf_cache"

    @property
    def vae_checkpoint(self) -> Path:
        return Path(self.vae) if self.vae else self.root / "vae" / "checkpoint.safetensors"

    @property
    def data_dir(self) -> Path:
        return self.root / "dit_data"

    @property
    def dit_dir(self) -> Path:
        return self.root / "dit"

    @property
    def report_dir(self) -> Path:
        return self.root / "report"


#: What ``--smoke`` changes: the whole loop on the CPU in well under a minute.
SMOKE = dict(count=8, view_size=64, render_backend="numpy", resolution=32, held_out_fraction=0.3, workers=0,
             vae_model="tiny", vae_minutes=1.0, vae_max_steps=6, vae_batch=2, vae_lr=3e-3, vae_warmup=2,
             loader_workers=0, dit_width=64, dit_blocks=2, dit_heads=4, dit_kv_heads=2, compression_block=2,
             selection_block=4, topk=2, window=4, mlp_ratio=2.0, encoder_size="tiny", batch_tokens=4096,
             max_batch=4, dit_lr=1e-3, dit_warmup=0, dit_minutes=1.0, dit_budget=2.0, dit_max_steps=4,
             dit_call_steps=2, save_every=2, sample_steps=2, sweep="3", sweep_count=2, ablation_count=2,
             sample_batch=4, points=3000, eval_workers=0, figure_rows=2, heldout_rows=1, device="cpu")


def _resolve(cfg: DemoConfig) -> tuple[torch.device, str, str]:
    """``(device, SSA backend, precision)`` of this run."""
    from model.training.common import resolve_device

    device = resolve_device(cfg.device)
    backend = cfg.backend if cfg.backend != "auto" else ("kernels" if device.type == "cuda" else "reference")
    precision = cfg.precision if cfg.precision != "auto" else ("bf16" if device.type == "cuda" else "fp32")
    return device, backend, precision


def _folder(name: str) -> str:
    """A mesh name as one folder name."""
    return "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in name.replace("/", "__"))


def _mesh_list(cfg: DemoConfig):
    """``(paths, names)`` of the first ``count`` meshes of ``--meshes`` (the names of
    :class:`model.data.dataset.SparseSDFDataset`)."""
    from model.data.dataset import _default_names
    from model.data.meshes import find_meshes

    if not cfg.meshes:
        raise ValueError("--meshes is required (e.g. data_cache/meshes, made by python -m model.data.meshes)")
    paths = find_meshes(cfg.meshes)[: cfg.count]
    if not paths:
        raise ValueError(f"no meshes found in {cfg.meshes}")
    return paths, _default_names(paths, paths)  # a list, as model.training.vae hands it to the dataset


def _atomic_json(path: Path, doc) -> None:
    from model.data.sdf import _atomic_write

    path.parent.mkdir(parents=True, exist_ok=True)
    _atomic_write(path, lambda fh: fh.write(json.dumps(_json_safe(doc), indent=1)), "w")


def _json_safe(value):
    if isinstance(value, dict):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    if isinstance(value, (np.integer,)):
        return int(value)
    if isinstance(value, (np.floating, float)):
        value = float(value)
        return value if math.isfinite(value) else None
    if isinstance(value, Path):
        return str(value)
    return value


def _append_jsonl(path: Path, record: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as fh:
        fh.write(json.dumps(_json_safe(record)) + "\n")


# ---------------------------------------------------------------------------------------------------------------
# stage 1: views (CPU machine)


def stage_render(cfg: DemoConfig) -> dict:
    """Render the conditioning views (module docstring, step 1); returns the ``views.json`` document."""
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
    _atomic_json(root / "views.json", doc)
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
        from model.training.common import read_checkpoint_metadata

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
    """The sparse SDF cache and the split (module docstring, step 2)."""
    views = _views(cfg)
    train_ds, held_ds, report = _datasets(cfg, device, prepare=True)
    missing = [n for n in list(train_ds.names) + list(held_ds.names if held_ds else []) if n not in views["items"]]
    if missing:
        raise ValueError(f"{len(missing)} meshes have no views in {cfg.views_dir} (e.g. {missing[:3]}): render "
                         "them with --stage render and the same --meshes/--count")
    doc = dict(report, train=list(train_ds.names), held_out=list(held_ds.names) if held_ds else [],
               resolution=cfg.resolution, tau=train_ds.params["tau"], margin=train_ds.params["margin"])
    _atomic_json(cfg.root / "data.json", doc)
    print(f"data: {len(train_ds)} training and {len(doc['held_out'])} held-out meshes at {cfg.resolution}^3 "
          f"({report.get('computed', 0)} computed, {len(report.get('failed', {}))} failed) in "
          f"{report['seconds']:.0f} s")
    return doc


def stage_vae(cfg: DemoConfig, device: torch.device) -> dict | None:
    """Train the VAE (module docstring, step 3) unless ``--vae`` names one or it was trained already."""
    from model.training.vae import train

    if cfg.vae:
        print(f"vae: reusing {cfg.vae}")
        return None
    summary_path = cfg.root / "vae" / "summary.json"
    if summary_path.is_file():
        print(f"vae: already trained ({summary_path})")
        return json.loads(summary_path.read_text())
    summary = train(_vae_train_config(cfg, device))
    _atomic_json(summary_path, summary)
    val = summary.get("validation") or {}
    print(f"vae: {summary['steps']} steps in {summary['train_seconds']:.0f} s; held-out F-score "
          f"{val.get('fscore', float('nan')):.3f}")
    return summary


# ---------------------------------------------------------------------------------------------------------------
# the image encoder with remembered features


class CachedEncoder(torch.nn.Module):
    """A frozen :class:`model.nets.conditioning.DinoV2Encoder` whose outputs are remembered per image.

    ``forward(rgb [B, 3, S, S])`` returns exactly what the wrapped encoder returns: images seen before (keyed by an
    exact integer fingerprint of their 8-bit pixels, computed where the tensor lies) come from the store, the others
    go through the encoder and are stored. :meth:`precompute` fills the store from image files (the preprocessing
    of :func:`model.nets.conditioning.preprocess_image`, as the DiT trainer and the sampler apply it). It exposes the
    attributes the DiT trainer reads (``image_size``, ``patch_size``, ``num_prefix_tokens``, ``channels``,
    ``random_weights``).
    """

    def __init__(self, encoder, *, size: str, seed: int):
        super().__init__()
        self.encoder = encoder
        self.size, self.seed = size, seed
        for name in ("image_size", "patch_size", "num_prefix_tokens", "channels", "random_weights"):
            setattr(self, name, getattr(encoder, name))
        self.store: dict[tuple[int, int], torch.Tensor] = {}
        self._weights: torch.Tensor | None = None
        self.hits = self.misses = 0

    @classmethod
    def build(cls, *, size: str, seed: int, device) -> "CachedEncoder":
        from model.nets.conditioning import DinoV2Encoder

        return cls(DinoV2Encoder.build(None, size=size, seed=seed), size=size, seed=seed).to(device)

    def fingerprint(self, rgb: torch.Tensor) -> list[tuple[int, int]]:
        """Two integer checksums per image of its 8-bit pixel values (exact, order-independent integer sums)."""
        px = (rgb.detach().float() * 255.0).round().to(torch.int64).flatten(1)
        if self._weights is None or self._weights.shape[1] != px.shape[1] or self._weights.device != px.device:
            gen = torch.Generator().manual_seed(0x5EED)
            self._weights = torch.randint(1, 1 << 20, (2, px.shape[1]), generator=gen).to(px.device)
        sums = torch.stack([(px * self._weights[0]).sum(1), (px * self._weights[1]).sum(1)], dim=1)
        return [tuple(row) for row in sums.tolist()]

    @torch.no_grad()
    def forward(self, rgb: torch.Tensor) -> torch.Tensor:
        keys = self.fingerprint(rgb)
        todo = [i for i, k in enumerate(keys) if k not in self.store]
        if todo:
            feats = self.encoder(rgb[todo])
            for i, f in zip(todo, feats):
                self.store[keys[i]] = f
        self.hits += len(keys) - len(todo)
        self.misses += len(todo)
        return torch.stack([self.store[k] for k in keys])

    @torch.no_grad()
    def precompute(self, paths, *, batch: int = 16) -> list[torch.Tensor]:
        """Features ``[T, C]`` of each image file (stored for later lookups)."""
        from model.nets.conditioning import preprocess_image

        out = []
        device = next(self.encoder.parameters()).device
        for s in range(0, len(paths), batch):
            rgb = torch.stack([preprocess_image(p, size=self.image_size).rgb for p in paths[s:s + batch]])
            out.extend(self(rgb.to(device)))
        return out


@contextlib.contextmanager
def _trainer_uses(cached: CachedEncoder):
    """While inside, ``DinoV2Encoder.build`` returns ``cached`` for the random encoder it wraps (any other request
    builds as usual), so :func:`model.training.dit.train` looks features up instead of recomputing them."""
    from model.nets import conditioning

    original = conditioning.DinoV2Encoder.__dict__["build"]

    def build(cls, weights=None, *, size="vitl14", seed=0):
        if not weights and size == cached.size and int(seed) == cached.seed:
            return cached
        return original.__func__(cls, weights, size=size, seed=seed)

    conditioning.DinoV2Encoder.build = classmethod(build)
    try:
        yield
    finally:
        conditioning.DinoV2Encoder.build = original


# ---------------------------------------------------------------------------------------------------------------
# stage 4: latents and DiT training


def _file_key(path: Path) -> str:
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
    from model.data.dataset import atomic_save_npz
    from model.training.dit_data import LATENT_NAME, MANIFEST_FORMAT, MANIFEST_NAME
    from model.pipeline.reconstruct import load_vae
    from model.sparse.tensor import SparseTensor

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
    _atomic_json(out / MANIFEST_NAME, manifest)
    doc = dict(format=ITEMS_FORMAT, vae_key=key, vae=str(ckpt), latent_resolution=latent_res,
               latent_channels=int(vae.config.latent_channels), downsample=int(vae.config.downsample_factor),
               train_views=cfg.train_views, items=items, seconds=time.perf_counter() - t0)
    _atomic_json(items_path, doc)
    tokens = [it["tokens"] for it in items]
    print(f"latents: {len(items)} meshes ({len(manifest_items)} for training), {min(tokens)}-{max(tokens)} tokens "
          f"(mean {np.mean(tokens):.0f}) at {latent_res}^3 in {doc['seconds']:.0f} s")
    return doc


def dit_train_config(cfg: DemoConfig, items: dict, *, backend: str, precision: str, steps: int,
                     minutes: float | None, device: torch.device):
    """The :class:`model.training.dit.TrainConfig` of the demo's DiT (module docstring and :data:`DIT_CHOICES`)."""
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
    """Latents (first call), then DiT training for ``--dit-minutes`` from the last checkpoint, within
    ``--dit-budget`` minutes over all calls (module docstring, step 4)."""
    from model.training.dit import train
    from model.training.common import read_checkpoint_metadata

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


# ---------------------------------------------------------------------------------------------------------------
# stage 5: sampling, evaluation, report


def _init_worker() -> None:
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
    """What stage ``sample`` generates and evaluates (module docstring, step 5)."""
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
    """Generate, decode, extract, evaluate, report (module docstring, step 5); returns the JSON document."""
    from model.nets.dit import Condition, load_dit
    from model.flow import euler_sample
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

        from model.reports.dit_demo import _evaluate_job as evaluate, _init_worker as init  # importable by the workers
        pool = ProcessPoolExecutor(max_workers=cfg.eval_workers, mp_context=multiprocessing.get_context("spawn"),
                                   initializer=init)
    else:
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


def _summary(rows: list[dict]) -> dict:
    f = np.array([r["fscore"] for r in rows], dtype=np.float64)
    cd = np.array([r["chamfer"] for r in rows if r["chamfer"] is not None and math.isfinite(r["chamfer"])])
    nc = np.array([r["normal_consistency"] for r in rows], dtype=np.float64)
    if len(f) == 0:
        return dict(count=0)
    le = [r["latent_error"] for r in rows if isinstance(r.get("latent_error"), float)]
    return dict(count=len(f), latent_error_mean=float(np.mean(le)) if le else float("nan"),
                fscore_mean=float(f.mean()), fscore_median=float(np.median(f)),
                fscore_min=float(f.min()), fscore_max=float(f.max()), share_at_bar=float((f >= BAR).mean()),
                chamfer_mean=float(cd.mean()) if len(cd) else float("nan"), normal_consistency_mean=float(nc.mean()),
                empty=int(sum(bool(r["empty"]) for r in rows)))


#: The kinds of stage ``sample`` in the report's order, with their descriptions.
KINDS = {
    "train_image": "training meshes, generated from a training view (the bar)",
    "train_shape_unseen_view": "training meshes, generated from a view never used in training",
    "held_out_shape": "held-out meshes (unseen by the VAE and the DiT), every view",
    "train_no_image": "training meshes, generated without an image (zeroed condition: the unconditional model)",
    "coords_only": "no DiT: the latents set to the training mean on the true coordinates (training + held-out)",
    "vae_reconstruction": "no DiT: the VAE's posterior mean decoded (a perfect DiT's result; training + held-out)",
}


def _report(cfg, device, items, jobs, results, *, dit, meta, vae, vae_meta, timings) -> dict:
    from model.training.common import read_jsonl
    from model.reports.vae import environment

    out = cfg.report_dir
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for j in jobs:
        r = {k: v for k, v in results[j["key"]].items() if k not in ("thumb", "gt_thumb")}
        rows.append(dict(kind=j["kind"], name=items[j["item"]]["name"], split=items[j["item"]]["split"],
                         view=j["view"], guidance=j["guidance"], tokens=items[j["item"]]["tokens"], **r))
    kinds = list(KINDS) + sorted({j["kind"] for j in jobs} - set(KINDS))
    summary = {k: _summary([r for r in rows if r["kind"] == k]) for k in kinds}
    summary = {k: v for k, v in summary.items() if v.get("count")}
    records = read_jsonl(cfg.dit_dir / "metrics.jsonl")
    train_recs = [r for r in records if "loss" in r]
    calls = _dit_calls(cfg)
    secs = [r["sec"] for r in train_recs if isinstance(r.get("sec"), (int, float))]
    last = [r["loss"] for r in train_recs[-50:]]
    vae_summary_path = cfg.root / "vae" / "summary.json"
    vae_summary = json.loads(vae_summary_path.read_text()) if vae_summary_path.is_file() else None
    data = json.loads((cfg.root / "data.json").read_text()) if (cfg.root / "data.json").is_file() else {}
    views = json.loads((Path(cfg.views_dir) / "views.json").read_text()) if (
        Path(cfg.views_dir) / "views.json").is_file() else {}
    training = dict(
        steps=train_recs[-1]["step"] if train_recs else 0, calls=calls,
        train_seconds=sum(c.get("seconds", 0.0) for c in calls),
        seconds_per_step_median=float(np.median(secs)) if secs else float("nan"),
        tokens_per_step_mean=float(np.mean([r["tokens"] for r in train_recs])) if train_recs else float("nan"),
        shapes_per_step_mean=float(np.mean([r["batch"] for r in train_recs])) if train_recs else float("nan"),
        final_loss=float(np.mean(last)) if last else float("nan"),
        first_loss=float(np.mean([r["loss"] for r in train_recs[:50]])) if train_recs else float("nan"),
        parameters=sum(p.numel() for p in dit.parameters()), dit_config=meta.get("dit_config"),
        train_config=meta.get("train_config"), encoder=meta.get("encoder"))
    for src, name in ((cfg.dit_dir / "loss.png", "dit_loss.png"), (cfg.root / "vae" / "loss.png", "vae_loss.png")):
        if src.is_file():
            shutil.copyfile(src, out / name)
    figures = []
    fig_train = [j for j in jobs if j["kind"] == "train_image" and j["thumbs"]]
    fig_held = [j for j in jobs if j["kind"] == "held_out_shape" and j["thumbs"]]
    for name, chosen, title in (("dit_demo_train.png", fig_train, "training meshes, from a training view"),
                                ("dit_demo_held_out.png", fig_held, "held-out meshes (no bar)")):
        if chosen:
            _figure(cfg, items, chosen, jobs, results, out / name, title)
            figures.append(name)
    bar_f = summary.get("train_image", {}).get("fscore_mean", float("nan"))
    doc = dict(
        environment=environment(device), config=dataclasses.asdict(cfg), smoke=cfg.smoke, bar=BAR,
        bar_met=bool(bar_f >= BAR), summary=summary, kinds=KINDS, rows=rows, training=training,
        vae=dict(checkpoint=str(cfg.vae_checkpoint), config=vae_meta.get("vae_config"), data=vae_meta.get("data"),
                 summary={k: vae_summary[k] for k in ("steps", "train_seconds", "seconds_per_step", "validation",
                                                      "parameters", "train_meshes", "stopped") if k in vae_summary}
                 if vae_summary else None),
        data=dict(meshes=len(items), train=sum(it["split"] == "train" for it in items),
                  held_out=sum(it["split"] == "held_out" for it in items),
                  tokens_mean=float(np.mean([it["tokens"] for it in items])),
                  tokens_min=int(min(it["tokens"] for it in items)), tokens_max=int(max(it["tokens"] for it in items)),
                  sdf_seconds=data.get("seconds"), views=dict((k, views.get(k)) for k in
                                                               ("views", "size", "backend", "elevation", "bytes"))),
        timings=timings, figures=figures, dit_choices=DIT_CHOICES)
    _atomic_json(out / "dit_demo.json", doc)
    (out / "dit_demo.md").write_text(_markdown(doc, cfg))
    return doc


def stage_report(cfg: DemoConfig, device: torch.device) -> str:
    """Rewrite ``dit_demo.md`` from ``dit_demo.json`` (module docstring, step 6); returns the markdown."""
    path = cfg.report_dir / "dit_demo.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: run --stage sample first")
    md = _markdown(json.loads(path.read_text()), cfg)
    (cfg.report_dir / "dit_demo.md").write_text(md)
    print(f"report: rewrote {cfg.report_dir / 'dit_demo.md'}")
    return md


def _figure(cfg, items, chosen, jobs, results, path: Path, title: str) -> None:
    """Rows of (conditioning view, ground truth, generated, VAE reconstruction)."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt
    from PIL import Image

    vae_by_item = {j["item"]: results[j["key"]] for j in jobs if j["kind"] == "vae_reconstruction"}
    cols = ("conditioning view", "ground truth", "generated (DiT)", "VAE reconstruction")
    fig, axes = plt.subplots(len(chosen), 4, figsize=(10.0, 2.5 * len(chosen) + 0.5), squeeze=False)
    for r, j in enumerate(chosen):
        res, it = results[j["key"]], items[j["item"]]
        rgba = np.asarray(Image.open(cfg.data_dir / it["views"][j["view"]]).convert("RGBA"), dtype=np.float64) / 255
        view = rgba[..., :3] * rgba[..., 3:] + (1 - rgba[..., 3:])
        vae_res = vae_by_item.get(j["item"], {})
        panels = [(view, f"view {j['view']}"), (res["gt_thumb"], f"{it['tokens']} latent tokens"),
                  (res["thumb"], f"F {res['fscore']:.3f}  CD {_num(res['chamfer'], '.4f')}"),
                  (vae_res.get("thumb"), f"F {vae_res.get('fscore', float('nan')):.3f}")]
        for c, (img, caption) in enumerate(panels):
            ax = axes[r, c]
            if img is not None:
                ax.imshow(img, cmap="gray", vmin=0, vmax=255 if img.dtype == np.uint8 else 1)
            ax.set_xticks([])
            ax.set_yticks([])
            ax.set_xlabel(caption, fontsize=7)
            if r == 0:
                ax.set_title(cols[c], fontsize=9)
        axes[r, 0].set_ylabel(it["name"], fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def _num(value, fmt: str) -> str:
    return "n/a" if not isinstance(value, (int, float)) or not math.isfinite(value) else format(value, fmt)


def _reading(s: dict) -> list[str]:
    """What the summary rows say together (the part of the report a reader would otherwise have to work out)."""
    def mean(kind):
        return (s.get(kind) or {}).get("fscore_mean", float("nan"))

    train, no_image, coords = mean("train_image"), mean("train_no_image"), mean("coords_only")
    out = [f"Reading the rows: with no DiT, the true coordinates alone give a mean F-score of {_num(coords, '.3f')}, "
           f"so the shapes come from the latents the DiT generates ({_num(train, '.3f')} from a training view)."]
    if math.isfinite(no_image) and math.isfinite(train):
        if no_image >= train - 0.05:
            out.append(f"Without the image the DiT does as well ({_num(no_image, '.3f')}): on its true latent "
                       "coordinates a training shape is identified by those coordinates, so this run shows that the "
                       "loop works (VAE latents, SSA training, sampling, decoding, extraction), not that the image "
                       "condition is used. Telling shapes apart by the image needs coordinates that do not give the "
                       "shape away: the dense structure stage's, or several shapes on the same coordinates.")
        else:
            out.append(f"Without the image the DiT drops to {_num(no_image, '.3f')}: the image condition carries "
                       "part of the shape.")
    return out


def _markdown(doc: dict, cfg: DemoConfig) -> str:
    env, s, tr, d = doc["environment"], doc["summary"], doc["training"], doc["data"]
    dc, tc = tr.get("dit_config") or {}, tr.get("train_config") or {}
    vs = (doc["vae"].get("summary") or {})
    val = vs.get("validation") or {}
    bar = s.get("train_image", {})
    lines = [
        "# Sparse DiT: learning demonstration",
        "",
        f"- date: {env['date']}; device: {env.get('gpu') or env['device']}; torch {env['torch']} (CUDA {env['cuda']})",
        f"- commit: {env.get('git_commit')}" + (" (uncommitted changes)" if env.get("git_dirty") else ""),
        "- command sequence: `python -m model.reports.dit_demo --stage render|data,vae|dit|dit|sample` (module docstring)"
        + (" — **SMOKE RUN** (CPU, toy sizes, a few steps: the numbers mean nothing)" if doc["smoke"] else ""),
        "",
        f"**Bar** (mean F-score at 1/128 >= {BAR} on the shapes generated from the training images): "
        f"**{'met' if doc['bar_met'] else 'NOT met'}** — mean {_num(bar.get('fscore_mean'), '.3f')}, median "
        f"{_num(bar.get('fscore_median'), '.3f')}, min {_num(bar.get('fscore_min'), '.3f')}, "
        f"{_num(100 * bar.get('share_at_bar', float('nan')), '.0f')}% of the {bar.get('count', 0)} training meshes "
        f"at >= {BAR}.",
        "",
        "What this is and is not:",
        "",
        "- The image encoder is DINOv2 ViT-L/14 with registers **with random weights** (seeded "
        f"{_num((tr.get('encoder') or {}).get('seed'), 'd')}, frozen): a fixed function of the image, not DINOv2 "
        "features. No machine here can download DINOv2 weights.",
        "- Every shape is generated on the **real latent coordinates of its target mesh**: the dense structure stage "
        "that predicts them does not exist yet. The coordinates alone fix the occupied 8^3-voxel cells; the "
        "*coordinates only* row shows what they yield with no DiT, the *no image* row what the DiT makes of them "
        "without the image.",
        "- Memorisation (training images) is the bar; held-out images are reported without one.",
        "",
        "## Results",
        "",
        f"F-score at 1/128 of the unit cube ({cfg.resolution / 128:g} voxels at {cfg.resolution}^3), Chamfer distance "
        "(unit-cube units) and normal consistency against the ground-truth mesh, from "
        f"{cfg.points:,} surface points per mesh, ground-truth points buried inside the shape left out "
        "(`model.pipeline.reconstruct.evaluate_mesh`). Sampling: "
        f"{cfg.sample_steps} Euler steps, shift {cfg.shift:g}, "
        + (f"classifier-free guidance {cfg.guidance:g}" if cfg.guidance > 1 else "no classifier-free guidance "
           "(the conditional velocity)") + f", {cfg.weights.upper()} weights, one seeded noise per shape.",
        "",
        "| set | meshes | mean F | median F | min F | share >= 0.7 | mean Chamfer | normal cons. | latent error |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for kind, v in s.items():
        label = doc["kinds"].get(kind) or (f"training meshes from a training view, guidance {kind.rsplit('_', 1)[-1]} "
                                           "(ablation)" if kind.startswith("train_image_guidance_") else kind)
        lines.append(f"| {label} | {v['count']} | "
                     f"{_num(v['fscore_mean'], '.3f')} | {_num(v['fscore_median'], '.3f')} | "
                     f"{_num(v['fscore_min'], '.3f')} | {_num(100 * v['share_at_bar'], '.0f')}% | "
                     f"{_num(v['chamfer_mean'], '.4f')} | {_num(v['normal_consistency_mean'], '.3f')} | "
                     f"{_num(v.get('latent_error_mean'), '.3f')} |")
    lines += ["", "*Latent error*: the generated latents' distance to the target's posterior mean, relative to the "
              "target's norm, both in the DiT's normalised units (the training mean gives 1).", "", *_reading(s), ""]
    for name in doc["figures"]:
        lines += [f"![{name}]({name})", ""]
    lines += [
        "## Setup",
        "",
        f"- data: {d['meshes']} meshes of `{cfg.meshes}` ({d['train']} training, {d['held_out']} held out by name hash, the "
        f"same split for the VAE and the DiT); sparse SDF at {cfg.resolution}^3 (tau {cfg.tau:g} voxels); "
        f"{d['tokens_min']:,}-{d['tokens_max']:,} latent tokens per shape (mean {d['tokens_mean']:,.0f}); views: "
        f"{(d.get('views') or {}).get('views')} per mesh, {(d.get('views') or {}).get('size')} px RGBA "
        f"({(d.get('views') or {}).get('backend')}), views 0-{cfg.train_views - 1} for training, the others held out",
        f"- VAE: `{cfg.vae or 'trained here'}`; "
        + (f"{vs.get('parameters', 0):,} parameters, {vs.get('steps')} steps in {_num(vs.get('train_seconds'), '.0f')} "
           f"s, held-out F-score {_num(val.get('fscore'), '.3f')} on {len(val.get('meshes') or [])} meshes at the end "
           "of training" if vs else "reused checkpoint"),
        f"- DiT: {tr['parameters']:,} parameters; width {dc.get('model_channels')}, {dc.get('num_blocks')} blocks, "
        f"{dc.get('num_heads')} query heads, {dc.get('num_kv_heads')} kv heads, MLP ratio {dc.get('mlp_ratio')}; SSA "
        f"({dc.get('backend')}): compression {dc.get('compression_version')} on {dc.get('compression_block')}^3, "
        f"selection {dc.get('selection_block')}^3 top-{dc.get('topk')}, window {dc.get('window')}^3; latent grid "
        f"{dc.get('resolution')}^3, position factor {dc.get('pos_factor')}",
        f"- DiT training: {tr['steps']:,} steps in {_num(tr['train_seconds'] / 60, '.1f')} min over "
        f"{len(tr['calls'])} calls (median {_num(tr['seconds_per_step_median'], '.3f')} s/step, "
        f"{_num(tr['tokens_per_step_mean'], ',.0f')} tokens and {_num(tr['shapes_per_step_mean'], '.1f')} shapes per "
        f"step); AdamW {tc.get('lr')} ({tc.get('warmup_steps')} warm-up steps, {tc.get('schedule')}), EMA "
        f"{tc.get('ema_decay')}, condition dropout {tc.get('cond_drop_prob')}, {tc.get('precision')}; flow loss "
        f"{_num(tr['first_loss'], '.3f')} (first 50 steps) -> {_num(tr['final_loss'], '.4f')} (last 50)",
        "",
        "Why this DiT: " + doc["dit_choices"],
        "",
        "![DiT loss](dit_loss.png)",
        "",
        "![VAE loss](vae_loss.png)",
        "",
        "## Per mesh",
        "",
        "| mesh | split | tokens | F train view | F unseen view | F no image | F coords only | F VAE |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    by = {}
    for r in doc["rows"]:
        by.setdefault(r["name"], {}).setdefault(r["kind"], []).append(r["fscore"])
    split = {r["name"]: (r["split"], r["tokens"]) for r in doc["rows"]}

    def cell(name, *kinds):
        vals = [f for k in kinds for f in by[name].get(k, [])]
        return _num(float(np.mean(vals)), ".3f") if vals else ""

    for name in sorted(by, key=lambda n: (split[n][0] != "train", n)):
        lines.append(f"| {name} | {split[name][0].replace('_', '-')} | {split[name][1]:,} | "
                     f"{cell(name, 'train_image')} | {cell(name, 'train_shape_unseen_view', 'held_out_shape')} | "
                     f"{cell(name, 'train_no_image')} | {cell(name, 'coords_only')} | "
                     f"{cell(name, 'vae_reconstruction')} |")
    t = doc["timings"]
    lines += ["", "(held-out meshes: *F unseen view* is the mean over all their views.)", "",
              f"Stage `sample`: image features {_num(t['features'], '.0f')} s, DiT sampling {_num(t['sampling'], '.0f')} "
              f"s, everything until the metrics {_num(t['total_until_metrics'], '.0f')} s. Every figure: "
              "`dit_demo.json`.", ""]
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------------------
# driver


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


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m model.reports.dit_demo", description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    defaults = DemoConfig()
    ap.add_argument("--smoke", action="store_true", help="toy CPU run of the whole loop (tests)")
    for f in dataclasses.fields(DemoConfig):
        if f.name == "smoke":
            continue
        value = getattr(defaults, f.name)
        kind = type(value) if value is not None else str
        ap.add_argument("--" + f.name.replace("_", "-"), dest=f.name, type=kind, default=None,
                        help=f"default {value!r}")
    return ap


def main(argv=None) -> int:
    args = {k: v for k, v in vars(_parser().parse_args(argv)).items() if v is not None}
    values = dict(SMOKE) if args.get("smoke") else {}
    values.update(args)
    try:
        cfg = DemoConfig(**values)
    except (TypeError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    try:
        run(cfg)
    except (FileNotFoundError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
