"""Train the sparse SDF VAE: ``python -m model.cli.train_vae`` over :func:`train`.

Examples::

    python -m model.cli.train_vae --pybullet 100 --resolutions 256 --model base --steps 20000 --out runs/vae
    python -m model.cli.train_vae --config vae.json --time-limit 60 --resume
    torchrun --nproc_per_node 8 -m model.training.vae --meshes data/meshes --resolutions 256 512 --out runs/vae

Data: a folder of meshes (``--meshes``) or the first N pybullet objects (``--pybullet N``) become sparse SDF samples
(:class:`model.data.dataset.SparseSDFDataset`, cached on disk, prepared up front with ``--prepare-workers``
processes), split into training and held-out meshes by a hash of their names
(:func:`model.data.dataset.split_by_name`). Batches share one resolution drawn per batch from ``--resolutions``
(:class:`~model.data.dataset.MultiResolutionBatchSampler`, the paper's multi-resolution training).

Each step: encode, sample the posterior (each sample's noise from its own seed, the seeds drawn from a dedicated,
checkpointed ``torch.Generator``), decode with the training pruning rule (predicted and target voxels),
:func:`model.nets.vae.vae_loss` (input, extra, sharp-edge SDF MSE + KL + pruning BCE), AdamW with linear warm-up and a
cosine (or constant) schedule, gradient clipping (a step whose loss or gradient is not finite is skipped); bf16
autocast on CUDA. Outputs in ``--out``: ``checkpoint.safetensors``
(model + optimizer + step + RNG, written atomically; rank 0), ``metrics.jsonl`` (training records every
``log_every`` steps, validation records with ``kind: "val"``), ``loss.png``, ``config.json``. ``--resume``
continues from ``checkpoint.safetensors`` bit for bit on CPU (same data order, same posterior noise).
``--time-limit MIN`` stops cleanly (checkpoint, plot) after MIN minutes of training (data preparation not counted).
Validation reconstructs ``val_meshes`` held-out meshes (encode the mean, decode with inference pruning, marching
cubes) and logs F-score, Chamfer distance and normal consistency (:func:`model.pipeline.reconstruct.evaluate_mesh`).

Under ``torchrun`` (``WORLD_SIZE > 1``; NCCL on GPUs, gloo on CPU) a step's *global* batch is ``batch_size *
world_size`` samples of the same sequence a single process with that batch size would draw; each rank loads and
trains on its share, cut by :func:`model.training.common.partition_by_tokens` (near-equal voxel counts, from the cached
samples' sizes, before anything is loaded). The model is DDP-wrapped and every loss term is normalised by its
global count (:func:`global_vae_loss`), so a step on N ranks equals a step of one process on the whole global
batch up to float rounding; the posterior noise of each sample is drawn from its own seed, taken from the
checkpointed ``posterior`` generator (the same on every rank) by its position in the global batch, not from a
per-rank stream. Only rank 0 logs (global losses and voxel counts, and the ranks' forward and step times: min, max,
spread), shows progress, validates and writes files. The checkpoint (the bare model, no DDP prefixes) resumes on any
number of ranks; with the same global batch size (1 rank x batch 4 = 2 ranks x batch 2) the run continues exactly
as it would have in the original configuration, otherwise it continues at global batch ``step`` of the new
sequence.
"""
from __future__ import annotations

import dataclasses
import json
import math
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from model.nets.vae import SparseSDFVAE, VAEConfig, VAELossConfig, vae_loss
from model.training.common import (
    Distributed,
    MetricsLog,
    TimeLimit,
    load_checkpoint,
    lr_factor,
    plot_metrics,
    restore_rng,
    save_checkpoint,
    seed_everything,
    unwrap_model,
)

__all__ = ["MODEL_PRESETS", "VAETrainConfig", "global_vae_loss", "model_config", "train", "validate"]

#: File names inside the output folder.
CHECKPOINT_NAME = "checkpoint.safetensors"
METRICS_NAME = "metrics.jsonl"
PLOT_NAME = "loss.png"
CONFIG_NAME = "config.json"
#: Training-record keys drawn in loss.png, and validation keys.
PLOT_LOSS_KEYS = ("loss", "sdf_in", "sdf_extra", "sdf_sharp", "prune")
PLOT_VAL_KEYS = ("fscore", "normal_consistency")


def _preset_small(**o) -> VAEConfig:
    """1.7M parameters: widths 16-32-64-128, transformer width 128 (4 heads of 32), 1 + 1 blocks."""
    return VAEConfig(**{**dict(conv_channels=(16, 32, 64, 128), model_channels=128, latent_channels=16, num_heads=4,
                               encoder_blocks=1, decoder_blocks=1, num_groups=8, resolution=256), **o})


def _preset_base(**o) -> VAEConfig:
    """8.5M parameters: the released conv widths 32-64-128 then 256, transformer width 256 (4 heads of 64), 2 + 2
    blocks, 16 latent channels (the released model: 37.9M, width 512, 4 + 4 blocks)."""
    return VAEConfig(**{**dict(conv_channels=(32, 64, 128, 256), model_channels=256, latent_channels=16, num_heads=4,
                               encoder_blocks=2, decoder_blocks=2, num_groups=32, resolution=256), **o})


#: Model size presets (``--model``): name -> function(**overrides) -> VAEConfig.
MODEL_PRESETS = {
    "tiny": VAEConfig.tiny,
    "small": _preset_small,
    "base": _preset_base,
    "released_512": VAEConfig.released_512,
    "released_1024": VAEConfig.released_1024,
}


def model_config(name: str, overrides: dict | None = None) -> VAEConfig:
    """The :class:`~model.nets.vae.VAEConfig` of preset ``name`` with ``overrides`` (lists become tuples)."""
    if name not in MODEL_PRESETS:
        raise ValueError(f"model must be one of {sorted(MODEL_PRESETS)}, got {name!r}")
    overrides = {k: tuple(v) if isinstance(v, list) else v for k, v in (overrides or {}).items()}
    known = {f.name for f in dataclasses.fields(VAEConfig)}
    unknown = sorted(set(overrides) - known)
    if unknown:
        raise ValueError(f"model_overrides has unknown VAEConfig fields {unknown}")
    return MODEL_PRESETS[name](**overrides)


@dataclass
class VAETrainConfig:
    """Everything :func:`train` needs; the command line and config files set these fields by name.

    Data: ``meshes`` (folder, file) or ``pybullet`` (first N pybullet objects), ``max_meshes`` (keep the first N
    meshes of the folder, in path order); ``resolutions`` served (one drawn
    per batch); ``tau`` band half-width in voxels; ``cache_dir`` for the samples; ``prepare_workers`` processes
    for the up-front SDF preparation; ``held_out_fraction`` and ``split_seed`` of the name-hash split.
    Model: ``model`` preset (:data:`MODEL_PRESETS`) and ``model_overrides`` (VAEConfig fields).
    Optimisation: ``batch_size`` (per process: the global batch is ``batch_size * world_size``), ``steps`` (total
    optimizer steps), ``lr``, ``weight_decay``, ``warmup_steps``, ``schedule`` (``cosine``/``constant``),
    ``min_lr_ratio`` (end of the cosine), ``anneal_to_time_limit`` (the cosine follows the elapsed fraction of
    ``time_limit`` when that is further along than ``step / steps``), ``grad_clip`` (0 = off), the loss weights
    (:class:`~model.nets.vae.VAELossConfig`).
    Run: ``time_limit`` minutes (None = no limit), ``device``, ``bf16`` (autocast on CUDA), ``out``, ``resume``,
    ``seed``, ``log_every``, ``ckpt_every``, ``val_every`` (0 = only at the end), ``val_meshes``, ``val_resolution``
    (default: the first of ``resolutions``), ``val_points`` (surface points per mesh), ``num_workers`` (data
    loader processes), ``progress`` (tqdm).
    """

    meshes: str | None = None
    pybullet: int | None = None
    max_meshes: int | None = None
    resolutions: tuple[int, ...] = (256,)
    tau: float = 2.0
    cache_dir: str = "data_cache/sparse_sdf"
    prepare_workers: int = 0
    held_out_fraction: float = 0.05
    split_seed: int = 0
    model: str = "small"
    model_overrides: dict = field(default_factory=dict)
    batch_size: int = 4
    steps: int = 2000
    lr: float = 1e-3
    weight_decay: float = 0.0
    warmup_steps: int = 100
    schedule: str = "cosine"
    min_lr_ratio: float = 0.05
    anneal_to_time_limit: bool = False
    grad_clip: float = 1.0
    weight_in: float = 1.0
    weight_extra: float = 1.0
    weight_sharp: float = 1.0
    weight_kl: float = 1e-6
    weight_prune: float = 1.0
    time_limit: float | None = None
    device: str = "auto"
    bf16: bool = True
    out: str = "runs/vae"
    resume: bool = False
    seed: int = 0
    log_every: int = 10
    ckpt_every: int = 500
    val_every: int = 500
    val_meshes: int = 2
    val_resolution: int | None = None
    val_points: int = 100_000
    num_workers: int = 0
    progress: bool = True

    def __post_init__(self):
        if isinstance(self.resolutions, int):
            self.resolutions = (self.resolutions,)
        self.resolutions = tuple(int(r) for r in self.resolutions)
        if not self.resolutions or any(r < 8 for r in self.resolutions):
            raise ValueError(f"resolutions must be ints >= 8, got {self.resolutions!r}")
        if (self.meshes is None) == (self.pybullet is None):
            raise ValueError("give exactly one of meshes (a folder or file) and pybullet (a count)")
        for name in ("pybullet", "max_meshes"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        for name in ("batch_size", "steps", "log_every", "ckpt_every", "val_meshes", "val_points"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < (0 if name == "val_meshes" else 1):
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        for name in ("warmup_steps", "val_every", "num_workers", "prepare_workers", "seed", "split_seed"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"{name} must be a non-negative int, got {value!r}")
        if not (isinstance(self.lr, (int, float)) and self.lr > 0):
            raise ValueError(f"lr must be a positive number, got {self.lr!r}")
        if self.schedule not in ("cosine", "constant"):
            raise ValueError(f"schedule must be 'cosine' or 'constant', got {self.schedule!r}")
        if not 0 <= self.min_lr_ratio <= 1:
            raise ValueError(f"min_lr_ratio must be in [0, 1], got {self.min_lr_ratio!r}")
        if not 0 <= self.held_out_fraction < 1:
            raise ValueError(f"held_out_fraction must be in [0, 1), got {self.held_out_fraction!r}")
        if self.time_limit is not None and not (isinstance(self.time_limit, (int, float)) and self.time_limit > 0):
            raise ValueError(f"time_limit must be a positive number of minutes, got {self.time_limit!r}")
        if self.val_resolution is not None and self.val_resolution < 8:
            raise ValueError(f"val_resolution must be an int >= 8, got {self.val_resolution!r}")
        self.loss_config()  # validates the weights
        model_config(self.model, self.model_overrides)  # validates the preset and overrides

    def loss_config(self) -> VAELossConfig:
        return VAELossConfig(weight_in=self.weight_in, weight_extra=self.weight_extra, weight_sharp=self.weight_sharp,
                             weight_kl=self.weight_kl, weight_prune=self.weight_prune)

    @property
    def eval_resolution(self) -> int:
        return self.val_resolution or self.resolutions[0]

    @classmethod
    def from_dict(cls, values: dict) -> "VAETrainConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown training options {unknown}; known: {sorted(known)}")
        return cls(**values)


# ---------------------------------------------------------------------------------------------------------------
# data


def _mesh_source(config: VAETrainConfig):
    """A folder or file (all of it), or a list of mesh paths (``max_meshes`` of a folder; pybullet objects)."""
    if config.meshes is not None:
        if config.max_meshes is None:
            return config.meshes
        from model.data.meshes import find_meshes

        paths = find_meshes(config.meshes)
        if not paths:
            raise ValueError(f"meshes: no mesh files found in {config.meshes}")
        return paths[: config.max_meshes]
    from model.data.meshes import pybullet_meshes

    return pybullet_meshes()[: config.pybullet]


def build_datasets(config: VAETrainConfig, dist: Distributed | None = None):
    """``(train, held_out or None, report)``: the prepared, split datasets. Rank 0 prepares the cache (with
    ``prepare_workers`` processes), the others then read it."""
    from model.data.dataset import SparseSDFDataset

    is_main = dist is None or dist.is_main
    resolutions = tuple(dict.fromkeys(config.resolutions + (config.eval_resolution,)))
    ds = SparseSDFDataset(_mesh_source(config), resolutions, tau=config.tau, cache_dir=config.cache_dir,
                          seed=config.seed)
    t0 = time.perf_counter()
    report: dict[str, Any] = {}
    if is_main:
        report = ds.prepare_all(num_workers=config.prepare_workers, progress=config.progress)
    if dist is not None:
        dist.barrier()
    if not is_main:
        report = ds.prepare_all(num_workers=0, progress=False)
    report = dict(report, seconds=time.perf_counter() - t0, meshes=len(ds))
    if len(ds) == 0:
        raise ValueError("no usable mesh: every mesh failed to become a sample")
    train_ds, held = ds.split(config.held_out_fraction, seed=config.split_seed)
    if train_ds is None:
        raise ValueError(f"all {len(ds)} meshes fell in the held-out split; lower held_out_fraction")
    return train_ds, held, report


def _voxel_count(dataset, index: int, resolution: int, cache: dict) -> int:
    """Voxels of sample ``index`` at ``resolution``, read from the ``.npy`` header of its cached ``.npz`` (nothing
    is decompressed); the whole sample is loaded only when the cache entry cannot be read that way."""
    key = (int(index), int(resolution))
    if key not in cache:
        import zipfile

        import numpy as np

        try:
            with zipfile.ZipFile(dataset.cache_path(index, resolution)) as zf, zf.open("coords.npy") as fh:
                version = np.lib.format.read_magic(fh)
                read = np.lib.format.read_array_header_1_0 if version == (1, 0) else \
                    np.lib.format.read_array_header_2_0
                cache[key] = int(read(fh)[0][0])
        except (OSError, KeyError, ValueError, zipfile.BadZipFile):
            cache[key] = int(dataset[index, resolution]["coords"].shape[0])
    return cache[key]


class _ShardedBatches(torch.utils.data.Sampler):
    """This rank's share of the endless global batch sequence (epoch after epoch of the multi-resolution sampler,
    whose batch size is the global one), from global batch ``start`` on: one list of ``(index, resolution,
    position, global_size)`` per step, the share :func:`~model.training.common.partition_by_tokens` gives this rank from
    the global batch's voxel counts (a global batch holds at least ``world_size`` samples, so no share is empty)."""

    def __init__(self, sampler, dataset, start: int, world_size: int, rank: int):
        self.sampler, self.dataset, self.start = sampler, dataset, int(start)
        self.world, self.rank = int(world_size), int(rank)
        self.counts: dict = {}

    def __iter__(self):
        from model.training.common import partition_by_tokens

        per_epoch = len(self.sampler)
        epoch = self.start // per_epoch
        while True:
            self.sampler.set_epoch(epoch)
            for pos, batch in enumerate(self.sampler):
                if epoch * per_epoch + pos < self.start:
                    continue
                tokens = [_voxel_count(self.dataset, i, r, self.counts) for i, r in batch]
                mine = partition_by_tokens(tokens, self.world)[self.rank]
                yield [(batch[p][0], batch[p][1], p, len(batch)) for p in mine]
            epoch += 1


class _Positioned(torch.utils.data.Dataset):
    """``dataset[index, resolution]`` plus the sample's position in its global batch and that batch's size."""

    def __init__(self, dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, item):
        index, resolution, position, size = item
        return dict(self.dataset[index, resolution], position=int(position), global_size=int(size))


def _collate(items):
    from model.data.dataset import collate_sparse_sdf

    batch = collate_sparse_sdf(items)
    batch["positions"] = torch.tensor([it["position"] for it in items], dtype=torch.int64)
    batch["global_size"] = int(items[0]["global_size"])
    return batch


def _loader(train_ds, config: VAETrainConfig, start_step: int, dist: Distributed):
    from model.data.dataset import MultiResolutionBatchSampler

    global_size = config.batch_size * dist.world_size
    if len(train_ds) < dist.world_size:
        raise ValueError(f"{len(train_ds)} training meshes for {dist.world_size} ranks: every rank needs a sample")
    sampler = MultiResolutionBatchSampler(len(train_ds), global_size, config.resolutions,
                                          drop_last=len(train_ds) >= global_size, seed=config.seed)
    batches = _ShardedBatches(sampler, train_ds, start_step, dist.world_size, dist.rank)
    return torch.utils.data.DataLoader(_Positioned(train_ds), batch_sampler=batches, collate_fn=_collate,
                                       num_workers=config.num_workers, pin_memory=dist.device.type == "cuda")


def _to_sparse(batch: dict, device: torch.device):
    from model.sparse.tensor import SparseTensor

    res = int(batch["resolution"][0])
    x = SparseTensor(batch["coords"].to(device, non_blocking=True), batch["sdf"].to(device, non_blocking=True),
                     batch_size=len(batch["name"]), resolution=res)
    return x, batch["sharp"].to(device, non_blocking=True)


# ---------------------------------------------------------------------------------------------------------------
# validation


def validate(vae: SparseSDFVAE, dataset, *, count: int, resolution: int, device: torch.device,
             dtype: torch.dtype | None = None, num_points: int = 100_000, seed: int = 0) -> dict:
    """Reconstruct the first ``count`` meshes of ``dataset`` at ``resolution`` (posterior mean, inference pruning,
    marching cubes at 0) and compare each with its input mesh in the unit cube.

    Returns ``{"fscore", "chamfer", "normal_consistency"}`` (means; Chamfer over non-empty reconstructions) and
    ``"meshes"``: per mesh ``{name, fscore, chamfer, normal_consistency, faces}``.
    """
    from model.pipeline.reconstruct import (
        evaluate_mesh,
        normalized_mesh,
        reconstruct_sample,
    )

    per = []
    for i in range(min(count, len(dataset))):
        sample = dataset.sample(i, resolution)
        rec = reconstruct_sample(vae, sample, device=device, dtype=dtype)
        gt = normalized_mesh(dataset.paths[i], sample)
        m = evaluate_mesh(rec.mesh, gt, num_points=num_points, seed=seed)
        per.append(dict(name=dataset.names[i], fscore=m["fscore"], chamfer=m["chamfer"],
                        normal_consistency=m["normal_consistency"], faces=m["faces"]))
    if not per:
        return {"fscore": float("nan"), "chamfer": float("nan"), "normal_consistency": float("nan"), "meshes": []}
    finite = [p["chamfer"] for p in per if math.isfinite(p["chamfer"])]
    return dict(fscore=sum(p["fscore"] for p in per) / len(per),
                chamfer=sum(finite) / len(finite) if finite else float("nan"),
                normal_consistency=sum(p["normal_consistency"] for p in per) / len(per), meshes=per)


# ---------------------------------------------------------------------------------------------------------------
# training


class _TrainForward(torch.nn.Module):
    """The VAE's training forward (encode, sample the posterior, decode keeping the target voxels) with the noise of
    each batch element drawn from its own seed, so that a sample gets the same noise whichever rank holds it and
    whatever else is in its batch. This is the module DDP wraps; checkpoints store the bare ``vae``."""

    def __init__(self, vae: SparseSDFVAE):
        super().__init__()
        self.vae = vae

    def forward(self, x, seeds: torch.Tensor):
        from model.nets.vae import VAEOutput

        posterior = self.vae.encode(x)
        mean = posterior.mean
        eps = _posterior_noise(mean, seeds)
        z = mean.replace(mean.feats + torch.exp(0.5 * posterior.logvar) * eps)
        return VAEOutput(posterior, z, self.vae.decode(z, target=x, keep_target=True))


def _posterior_noise(latent, seeds: torch.Tensor) -> torch.Tensor:
    """Standard normal noise shaped like ``latent.feats``: batch element ``b``'s rows (in their order) from a CPU
    generator seeded with ``seeds[b]``."""
    counts = latent.batch_counts.tolist()
    if len(counts) != len(seeds):
        raise ValueError(f"{len(seeds)} seeds for {len(counts)} batch elements")
    channels = latent.num_channels
    parts = [torch.randn(n, channels, generator=torch.Generator().manual_seed(int(s)))
             for n, s in zip(counts, seeds.tolist())]
    # a SparseTensor keeps its batch elements contiguous and in ascending order, so the parts simply follow
    return torch.cat(parts).to(latent.device, latent.dtype, non_blocking=True)


#: Loss terms of :func:`model.nets.vae.vae_loss`, in the order of :func:`global_vae_loss`'s counts.
LOSS_TERMS = ("sdf_in", "sdf_extra", "sdf_sharp", "kl")


def global_vae_loss(output, x, sharp: torch.Tensor, losses: dict, config, dist: Distributed):
    """This rank's loss scaled so that DDP's gradient mean over the ranks is the gradient of the loss of the whole
    global batch (as one process would compute it on all the ranks' samples at once); returns ``(loss to backward,
    {term: this rank's share of the global value})`` (the shares of all ranks add up to the global values).

    Every term of :func:`model.nets.vae.vae_loss` is a mean over some set of elements: decoded voxels that are input
    voxels (``sdf_in``), the other decoded voxels (``sdf_extra``), input voxels near sharp edges (``sdf_sharp``),
    latent voxels (``kl``), and per decoder level the pruning candidates (``prune``: the mean over levels of the
    per-level means). Rank ``r`` holds ``n_r`` of a term's ``N = sum_r n_r`` elements and its local mean ``m_r``, so
    the global mean is ``sum_r m_r * n_r / N``: rank ``r``'s share. The ``n_r`` are counted here and summed over the
    ranks with one all-reduce (they depend on the forward pass: pruning decides which voxels are decoded), and the
    weighted sum of the shares is multiplied by ``world_size``, because DDP divides the summed gradients by the
    number of ranks. Normalising by the local counts instead would weight a rank's elements by ``1 / n_r``: ranks
    with fewer voxels would count for more and the step would not be the one-process step. The only difference left
    is float rounding (other summation orders), which the distributed test bounds.
    """
    import torch.nn.functional as F

    decoded = output.decoded.sdf
    row = x.coord_index().lookup(decoded.coords)
    in_rows = row[row >= 0]
    logits, member = output.decoded.prune_logits, output.decoded.prune_targets
    levels = list(zip(logits, member)) if logits and member is not None else []
    counts = torch.zeros(len(LOSS_TERMS) + len(levels), dtype=torch.float64, device=decoded.device)
    counts[0] = in_rows.numel()
    counts[1] = decoded.num_voxels - in_rows.numel()
    counts[2] = sharp.index_select(0, in_rows).sum()
    counts[3] = output.posterior.mean.num_voxels
    for i, (lg, _) in enumerate(levels):
        counts[len(LOSS_TERMS) + i] = lg.numel()
    total = dist.sum(counts)
    frac = (counts / total.clamp_min(1)).to(losses["loss"].dtype)
    shares = {k: losses[k] * frac[i] for i, k in enumerate(LOSS_TERMS)}
    prune = losses["prune"].new_zeros(())
    for i, (lg, m) in enumerate(levels):
        if lg.numel():
            cdt = torch.promote_types(lg.dtype, torch.float32)
            prune = prune + F.binary_cross_entropy_with_logits(lg.to(cdt), m.to(cdt)) * frac[len(LOSS_TERMS) + i]
    if levels:
        prune = prune / (total[len(LOSS_TERMS):] > 0).sum().clamp_min(1).to(prune.dtype)
    shares["prune"] = prune
    shares["loss"] = (config.weight_in * shares["sdf_in"] + config.weight_extra * shares["sdf_extra"]
                      + config.weight_sharp * shares["sdf_sharp"] + config.weight_kl * shares["kl"]
                      + config.weight_prune * shares["prune"])
    return shares["loss"] * dist.world_size, shares


def train(config: VAETrainConfig) -> dict:
    """Train (or resume) the VAE described by ``config``; returns a summary:

    ``steps`` (optimizer steps done in total), ``start_step``, ``stopped`` (``"steps"`` or ``"time_limit"``),
    ``train_seconds`` (this run), ``seconds_per_step``, ``last`` (the last training record), ``validation`` (the
    last validation result or None), ``checkpoint``, ``metrics``, ``plot``, ``out``, ``train_meshes``,
    ``held_out`` (names), ``validated_on`` (``"held_out"`` or ``"train"`` when no mesh was held out), ``data``
    (preparation report), ``parameters``, ``world_size``.
    """
    if not isinstance(config, VAETrainConfig):
        raise TypeError(f"config must be a VAETrainConfig, got {type(config).__name__}")
    dist = Distributed(config.device)
    try:
        return _train(config, dist)
    finally:
        dist.close()


def _train(config: VAETrainConfig, dist: Distributed) -> dict:
    device = dist.device
    out = Path(config.out)
    if dist.is_main:
        out.mkdir(parents=True, exist_ok=True)
    seed_everything(config.seed)
    train_ds, held_ds, data_report = build_datasets(config, dist)
    val_ds, validated_on = (held_ds, "held_out") if held_ds is not None else (train_ds, "train")

    vae_cfg = model_config(config.model, config.model_overrides)
    seed_everything(config.seed)
    vae = SparseSDFVAE(vae_cfg).to(device)
    optimizer = torch.optim.AdamW(vae.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    # the same stream on every rank: it draws one noise seed per sample of each global batch (_TrainForward)
    generator = torch.Generator().manual_seed(config.seed)
    global_size = config.batch_size * dist.world_size

    ckpt_path = out / CHECKPOINT_NAME
    start_step = 0
    if config.resume and ckpt_path.exists():
        ckpt = load_checkpoint(ckpt_path, map_location="cpu")
        if ckpt.meta.get("vae_config") != json.loads(json.dumps(dataclasses.asdict(vae_cfg))):
            raise ValueError(f"resume: {ckpt_path} was trained with another model configuration "
                             f"({ckpt.meta.get('vae_config')}); use a new --out or the same --model")
        vae.load_state_dict(ckpt.model)
        optimizer.load_state_dict(ckpt.optimizer)
        try:
            restore_rng(ckpt, {"posterior": generator})
        except (RuntimeError, ValueError) as exc:  # e.g. a checkpoint whose posterior generator lived on a GPU
            if dist.is_main:
                warnings.warn(f"resume: posterior noise generator not restored ({exc}); reseeded", RuntimeWarning,
                              stacklevel=2)
        start_step = ckpt.step
        saved_size = ckpt.meta.get("global_batch_size")
        if dist.is_main and saved_size is not None and saved_size != global_size:
            print(f"resume: global batch size {global_size} (batch_size {config.batch_size} x {dist.world_size} "
                  f"ranks) instead of {saved_size}: the data continues at global batch {start_step} of the new "
                  "sequence", file=sys.stderr)
    elif config.resume and dist.is_main:
        print(f"resume: no checkpoint in {out}, starting from scratch", file=sys.stderr)
    if dist.is_main:
        (out / CONFIG_NAME).write_text(json.dumps(
            dict(train=dataclasses.asdict(config), vae=dataclasses.asdict(vae_cfg)), indent=2, default=str))
    model = dist.wrap(_TrainForward(vae))
    log = MetricsLog(out / METRICS_NAME, resume_step=start_step if start_step else None, enabled=dist.is_main)
    loss_cfg = config.loss_config()
    use_bf16 = config.bf16 and device.type == "cuda"
    eval_dtype = torch.bfloat16 if use_bf16 else None
    params = [p for p in vae.parameters() if p.requires_grad]

    def meta() -> dict:
        from model.pipeline.reconstruct import vae_checkpoint_meta

        return dict(vae_checkpoint_meta(vae_cfg, tau=config.tau, margin=train_ds.params["margin"],
                                        train_config=dataclasses.asdict(config)),
                    world_size=dist.world_size, global_batch_size=global_size)

    def checkpoint(step: int) -> None:
        if dist.is_main:
            save_checkpoint(ckpt_path, model=vae, optimizer=optimizer, step=step, meta=meta(),
                            generators={"posterior": generator})

    last_val = None

    def run_validation(step: int) -> None:
        nonlocal last_val
        if dist.is_main and config.val_meshes > 0:
            result = validate(vae, val_ds, count=config.val_meshes, resolution=config.eval_resolution, device=device,
                              dtype=eval_dtype, num_points=config.val_points, seed=config.seed)
            last_val = dict(result, step=step, split=validated_on)
            log.log(dict(kind="val", step=step, split=validated_on, fscore=result["fscore"],
                         chamfer=result["chamfer"], normal_consistency=result["normal_consistency"],
                         meshes=result["meshes"]))
            vae.train()
        dist.barrier()

    def plot() -> Path | None:
        if not dist.is_main:
            return None
        return plot_metrics(log.records(), out / PLOT_NAME, loss_keys=PLOT_LOSS_KEYS, val_keys=PLOT_VAL_KEYS,
                            title=f"sparse SDF VAE ({config.model}), {len(train_ds)} training meshes, "
                                  f"R = {'/'.join(map(str, config.resolutions))}")

    from tqdm.auto import tqdm

    bar = tqdm(total=config.steps, initial=start_step, desc="train VAE", disable=not (dist.is_main and config.progress),
               dynamic_ncols=True)
    limit = TimeLimit(config.time_limit)
    step, stopped = start_step, "steps"
    acc: dict[str, float] = {}
    acc_n, skipped, interval_t0 = 0, 0, time.perf_counter()
    last_record: dict = {}
    model.train()
    batches = iter(_loader(train_ds, config, start_step, dist))
    limit.start()

    def record(now: float) -> dict:
        # every rank takes part in this (the rank statistics were gathered step by step; nothing more to reduce)
        return dict(kind="train", step=step, lr=lr, resolution=x.resolution,
                    seconds_per_step=(now - interval_t0) / acc_n, elapsed=limit.elapsed, world_size=dist.world_size,
                    **{k: v / acc_n for k, v in acc.items()})

    while step < config.steps:
        if dist.any(limit.expired()):
            stopped = "time_limit"
            break
        t_fetch = time.perf_counter()
        batch = next(batches)
        t0 = time.perf_counter()
        x, sharp = _to_sparse(batch, device)
        # one seed per sample of the global batch, drawn on every rank (the generators stay equal); ours by position
        seeds = torch.randint(0, 2**63 - 1, (batch["global_size"],), generator=generator)[batch["positions"]]
        progress = limit.fraction if config.anneal_to_time_limit else None
        if progress is not None:
            progress = max(progress, (step - config.warmup_steps) / max(1, config.steps - config.warmup_steps))
        lr = config.lr * lr_factor(step, total_steps=config.steps, warmup_steps=config.warmup_steps,
                                   schedule=config.schedule, min_ratio=config.min_lr_ratio, progress=progress)
        for group in optimizer.param_groups:
            group["lr"] = lr
        with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=use_bf16):
            output = model(x, seeds)
            losses = vae_loss(output, x, loss_cfg, sharp_mask=sharp)
            if dist.enabled:
                loss, shares = global_vae_loss(output, x, sharp, losses, loss_cfg, dist)
            else:
                loss, shares = losses["loss"], losses
        if dist.enabled:
            dist.synchronize()
        fwd_s = time.perf_counter() - t0
        optimizer.zero_grad(set_to_none=True)
        loss.backward()  # always (DDP expects a backward after every forward)
        grad_norm = torch.nn.utils.clip_grad_norm_(params, config.grad_clip if config.grad_clip > 0 else math.inf)
        step += 1
        bar.update(1)
        if dist.any(not (bool(torch.isfinite(loss.detach())) and bool(torch.isfinite(grad_norm)))):
            skipped += 1  # every rank skips the update together
            if dist.is_main:
                warnings.warn(f"step {step}: non-finite loss or gradient, update skipped", RuntimeWarning,
                              stacklevel=2)
            continue
        optimizer.step()
        keys = sorted(shares)
        summed = dist.sum(torch.stack([shares[k].detach().double() for k in keys]
                                      + [torch.tensor(float(x.num_voxels), dtype=torch.float64, device=device),
                                         torch.tensor(float(output.decoded.sdf.num_voxels), dtype=torch.float64,
                                                      device=device)])).tolist()
        values = dict(zip(keys, summed))  # global losses (the shares add up to them) and voxel counts
        values["voxels"], values["decoded_voxels"] = summed[-2], summed[-1]
        values["grad_norm"] = float(grad_norm)
        if dist.enabled:
            values.update(dist.rank_stats(dict(step_s=time.perf_counter() - t0, fwd_s=fwd_s,
                                               wait_s=t0 - t_fetch, voxels=float(x.num_voxels))))
        for k, v in values.items():
            acc[k] = acc.get(k, 0.0) + v
        acc_n += 1
        if step % config.log_every == 0 or step == config.steps:
            now = time.perf_counter()
            last_record = record(now)
            log.log(last_record)
            if dist.is_main and config.progress:
                bar.set_postfix(loss=f"{last_record['loss']:.4g}", sdf=f"{last_record['sdf_in']:.3g}")
            acc, acc_n, interval_t0 = {}, 0, now
        if config.val_every and step % config.val_every == 0 and step < config.steps:
            run_validation(step)
        if step % config.ckpt_every == 0 and step < config.steps:
            checkpoint(step)
            plot()
    bar.close()
    del batches  # stops data loader workers
    train_seconds = limit.elapsed
    if acc_n:  # the records since the last log
        last_record = record(time.perf_counter())
        log.log(last_record)
    checkpoint(step)
    run_validation(step)
    plot_path = plot()
    done = step - start_step
    return dict(
        steps=step, start_step=start_step, stopped=stopped, train_seconds=train_seconds,
        seconds_per_step=train_seconds / done if done else float("nan"), skipped_steps=skipped, last=last_record,
        validation=last_val, validated_on=validated_on, checkpoint=str(ckpt_path), metrics=str(out / METRICS_NAME),
        plot=str(plot_path) if plot_path else None, out=str(out), train_meshes=len(train_ds),
        held_out=list(held_ds.names) if held_ds is not None else [], data=data_report,
        parameters=sum(p.numel() for p in unwrap_model(model).parameters()), world_size=dist.world_size,
        device=str(device),
    )
