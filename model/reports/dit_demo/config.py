"""The DiT demonstration's options (:class:`DemoConfig`, :data:`SMOKE`), its constants and the small helpers every
stage shares (device, mesh list, folder names, JSON). The stages are in :mod:`.stages`, :mod:`.sample` and
:mod:`.report`; the package docstring (:mod:`model.reports.dit_demo`) describes the whole run.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from model.io import resolve_device

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


def _json_safe(value):
    """``value`` with numpy scalars as Python numbers, paths as strings and non-finite floats as None (JSON)."""
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
    """Append ``record`` as one JSON line to ``path`` (a log: appended, not rewritten)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as fh:
        fh.write(json.dumps(_json_safe(record)) + "\n")


