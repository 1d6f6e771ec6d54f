"""Train the sparse DiT with rectified flow on prepared latents and views (``model.training.dit_data``).

``python -m model.cli.train_dit --data DIR --out RUN [--config FILE] [--model tiny] [--steps N] [--resume]``

One step: a batch of latents chosen by :class:`TokenBatchSampler` (batches packed up to ``batch_tokens`` tokens,
so batch elements of different sizes balance by token count, across ranks too), one random conditioning view per
element, encoded by the frozen DINOv2 encoder (:mod:`model.nets.conditioning`; random weights only when no ``encoder``
is given, with a loud warning), condition dropout for classifier-free guidance, logit-normal timesteps and the
rectified-flow loss (:func:`model.flow.flow_loss`), AdamW, gradient clipping, EMA of the weights.

Determinism and resuming: everything random about a batch element in step ``s`` (the view choice, latent sampling,
its timestep, noise and condition dropout) comes from a generator seeded by ``(seed, s, p)``, ``p`` its position in
the step's global batch (:func:`item_generator`), and the batch order from ``(seed, epoch)``; so a run resumed from a
checkpoint (model, EMA, optimizer state and step; :mod:`model.training.common` format, written atomically) continues
exactly as the uninterrupted run would have, on any number of ranks.

Outputs in ``RUN``: ``metrics.jsonl`` (one line per step: loss, lr, grad norm, tokens, batch size, seconds),
``loss.png``, ``checkpoints/step_XXXXXXX.safetensors`` and ``checkpoints/last.safetensors``, ``config.json``.
Latents are normalised per channel with the training set's mean and std (stored in the checkpoint, undone by
``model.cli.sample``) unless ``normalize_latents`` is false.

torchrun: with ``WORLD_SIZE > 1`` the model is wrapped in DDP (NCCL on GPUs, gloo on CPU). Step ``s`` has one
*global* batch, packed with ``world_size`` times the token and element budgets, and every rank trains on its share
(:func:`model.training.common.partition_by_tokens`: near-equal token counts); the loss is the mean over the global batch's
tokens (:func:`sharded_flow_loss`), so N ranks with ``batch_tokens`` T take the steps one process with ``N * T``
(and ``N * max_batch``) takes, up to float rounding, and a checkpoint resumes on any number of ranks (the same
sequence of global batches when ``world_size * batch_tokens`` stays the same). Rank 0 logs (global loss and token
counts, the ranks' forward and step times: min, max, spread) and saves.
CPU runs at tiny size: ``--model tiny --backend reference`` (dense reference SSA) or ``--backend kernels`` (Triton
through its interpreter, slow). ``--precision bf16`` uses bf16 autocast on CUDA.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from model.flow import TIMESTEP_MODES, flow_loss
from model.nets.dit import DiTConfig, SparseDiT
from model.sparse.tensor import SparseTensor

__all__ = ["EMA", "LatentDataset", "TokenBatchSampler", "TrainConfig", "item_generator", "sharded_flow_loss",
           "train"]

PRECISIONS = ("fp32", "bf16")
LATENT_MODES = ("mean", "sample")


# ---------------------------------------------------------------------------------------------------------------
# configuration


@dataclass
class TrainConfig:
    """Options of :func:`train` (also the keys of a ``--config`` JSON/YAML file; flags override the file).

    ``model``: a :class:`~model.nets.dit.DiTConfig` preset; ``model_overrides``: fields of it to change (e.g.
    ``{"num_blocks": 4}``); ``backend``: ``"kernels"``/``"reference"`` (None: the preset's). ``encoder``: DINOv2
    weights (a folder or hub id in the transformers format); None gives a seeded random encoder of ``encoder_size``
    (``"vitl14"`` or ``"tiny"``; tests and demonstrations only). ``batch_tokens``/``max_batch``: the token budget and
    the largest number of elements of a batch. ``latent``: train on the posterior ``"mean"`` or a ``"sample"``.
    """

    data: str = ""
    out: str = "runs/dit"
    model: str = "tiny"
    model_overrides: dict = field(default_factory=dict)
    backend: str | None = None
    encoder: str | None = None
    encoder_size: str = "vitl14"
    encoder_seed: int = 0
    steps: int = 1000
    lr: float = 1e-4
    weight_decay: float = 0.0
    beta1: float = 0.9
    beta2: float = 0.999
    warmup_steps: int = 0
    schedule: str = "constant"
    grad_clip: float = 1.0
    batch_tokens: int = 8192
    max_batch: int = 8
    ema_decay: float = 0.9999
    cond_drop_prob: float = 0.1
    timestep_mode: str = "logit_normal"
    timestep_shift: float = 1.0
    latent: str = "mean"
    normalize_latents: bool = True
    precision: str = "fp32"
    use_checkpoint: bool = False
    seed: int = 0
    log_every: int = 1
    save_every: int = 500
    keep_checkpoints: int = 3
    device: str = "auto"
    time_limit_min: float | None = None
    progress: bool = True

    def __post_init__(self):
        if self.timestep_mode not in TIMESTEP_MODES:
            raise ValueError(f"timestep_mode must be one of {TIMESTEP_MODES}, got {self.timestep_mode!r}")
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS}, got {self.precision!r}")
        if self.latent not in LATENT_MODES:
            raise ValueError(f"latent must be one of {LATENT_MODES}, got {self.latent!r}")
        for name in ("steps", "batch_tokens", "max_batch", "log_every", "save_every"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ValueError(f"{name} must be a positive int, got {v!r}")
        if not 0.0 <= self.ema_decay < 1.0:
            raise ValueError(f"ema_decay must be in [0, 1), got {self.ema_decay!r}")
        if not 0.0 <= self.cond_drop_prob <= 1.0:
            raise ValueError(f"cond_drop_prob must be in [0, 1], got {self.cond_drop_prob!r}")
        if not isinstance(self.model_overrides, dict):
            raise TypeError("model_overrides must be a dict of DiTConfig fields")

    def dit_config(self) -> DiTConfig:
        overrides = dict(self.model_overrides)
        if self.backend is not None:
            overrides["backend"] = self.backend
        overrides["use_checkpoint"] = self.use_checkpoint
        return DiTConfig.preset(self.model, **overrides)

    @classmethod
    def from_dict(cls, data: dict) -> "TrainConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown training options: {unknown}")
        return cls(**data)


# ---------------------------------------------------------------------------------------------------------------
# data


class LatentDataset:
    """The items of a prepared folder (``manifest.json`` of :mod:`model.training.dit_data`).

    ``tokens[i]``: latent token count of item ``i``; :meth:`latent` -> ``(coords [M, 3] int32, mean, logvar
    [M, L] float32)`` (cached in memory); :meth:`view_path` -> the PNG of a view.
    """

    def __init__(self, root):
        from model.training.dit_data import MANIFEST_FORMAT, MANIFEST_NAME

        self.root = Path(root)
        path = self.root / MANIFEST_NAME
        if not path.is_file():
            raise FileNotFoundError(f"{path} not found: prepare the data with python -m model.cli.prepare_dit_data")
        self.manifest = json.loads(path.read_text())
        if self.manifest.get("format") != MANIFEST_FORMAT:
            raise ValueError(f"{path}: format {self.manifest.get('format')!r}, expected {MANIFEST_FORMAT!r}")
        self.items = self.manifest["items"]
        if not self.items:
            raise ValueError(f"{path} lists no items")
        self.tokens = [int(it["tokens"]) for it in self.items]
        self.latent_channels = int(self.manifest["latent_channels"])
        self.latent_resolution = int(self.manifest["latent_resolution"])
        self._cache: dict[int, tuple] = {}

    def __len__(self) -> int:
        return len(self.items)

    def latent(self, i: int):
        if i not in self._cache:
            with np.load(self.root / self.items[i]["latent"]) as z:
                self._cache[i] = (z["coords"].astype(np.int32), z["mean"].astype(np.float32),
                                  z["logvar"].astype(np.float32))
        return self._cache[i]

    def num_views(self, i: int) -> int:
        return len(self.items[i]["views"])

    def view_path(self, i: int, v: int) -> Path:
        return self.root / self.items[i]["views"][v]

    def latent_stats(self) -> dict:
        """Per-channel mean and std of the posterior means over every token of the set."""
        total = np.zeros(self.latent_channels, np.float64)
        sq = np.zeros(self.latent_channels, np.float64)
        n = 0
        for i in range(len(self)):
            m = self.latent(i)[1].astype(np.float64)
            total += m.sum(0)
            sq += (m * m).sum(0)
            n += m.shape[0]
        mean = total / max(n, 1)
        std = np.sqrt(np.maximum(sq / max(n, 1) - mean**2, 1e-12))
        return {"mean": mean.tolist(), "std": std.tolist()}


class TokenBatchSampler:
    """Deterministic batches packed by token count, one global batch per step, shared out among the ranks.

    Per epoch (seeded by ``(seed, epoch)``): shuffle the items, cut them into chunks of ``chunk`` items, sort each
    chunk by decreasing token count and pack it first-fit into global batches of at most ``world_size *
    max_tokens`` tokens and ``world_size * max_batch`` elements (an item larger than the budget forms a batch
    alone), then shuffle the batches. With several ranks a global batch needs one element per rank: one with fewer
    is merged into the next (the last one into the one before), and an epoch with fewer items than ranks repeats
    them. Step ``s`` is the epoch's global batch ``s``; rank ``r`` takes part ``r`` of
    :func:`model.training.common.partition_by_tokens` of it (near-equal token counts; a part may exceed ``max_tokens`` by
    less than one item). The global batches depend on ``world_size * max_tokens`` and ``world_size * max_batch``
    only: one rank with budget ``2 T`` draws what two ranks with ``T`` share.
    """

    def __init__(self, tokens, max_tokens: int, max_batch: int, *, seed: int = 0, world_size: int = 1,
                 rank: int = 0, chunk: int = 256):
        self.tokens = [int(t) for t in tokens]
        if not self.tokens:
            raise ValueError("tokens must not be empty")
        self.max_tokens, self.max_batch, self.seed = int(max_tokens), int(max_batch), int(seed)
        self.world_size, self.rank, self.chunk = int(world_size), int(rank), int(chunk)
        self._epochs: dict[int, list[list[int]]] = {}

    def epoch_batches(self, epoch: int) -> list[list[int]]:
        """The epoch's global batches (sorted item indices)."""
        if epoch in self._epochs:
            return self._epochs[epoch]
        rng = np.random.default_rng([self.seed, epoch, 0x5D17])
        order = rng.permutation(len(self.tokens)).tolist()
        budget, most = self.max_tokens * self.world_size, self.max_batch * self.world_size
        batches: list[list[int]] = []
        for c0 in range(0, len(order), self.chunk):
            part = sorted(order[c0:c0 + self.chunk], key=lambda i: -self.tokens[i])
            open_batches: list[tuple[int, list[int]]] = []
            for i in part:
                for j, (load, members) in enumerate(open_batches):
                    if load + self.tokens[i] <= budget and len(members) < most:
                        members.append(i)
                        open_batches[j] = (load + self.tokens[i], members)
                        break
                else:
                    open_batches.append((self.tokens[i], [i]))
            batches += [sorted(m) for _, m in open_batches]
        perm = rng.permutation(len(batches))
        batches = [batches[k] for k in perm]
        if self.world_size > 1:
            batches = self._at_least_one_per_rank(batches)
        self._epochs = {epoch: batches}  # keep one epoch
        return batches

    def _at_least_one_per_rank(self, batches: list[list[int]]) -> list[list[int]]:
        merged: list[list[int]] = []
        carry: list[int] = []
        for b in batches:
            carry += b
            if len(carry) >= self.world_size:
                merged.append(sorted(carry))
                carry = []
        if carry and merged:
            merged[-1] = sorted(merged[-1] + carry)
        elif carry:  # fewer items than ranks in the whole epoch
            merged = [sorted((carry * self.world_size)[: self.world_size])]
        return merged

    def steps_per_epoch(self, epoch: int) -> int:
        return len(self.epoch_batches(epoch))

    def global_batch(self, step: int) -> tuple[int, list[int]]:
        """``(epoch, item indices)`` of the global batch of step ``step``."""
        epoch = 0
        while True:
            n = self.steps_per_epoch(epoch)
            if step < n:
                return epoch, self.epoch_batches(epoch)[step]
            step -= n
            epoch += 1

    def shard(self, step: int) -> tuple[list[int], list[int], list[int]]:
        """``(global item indices, this rank's positions in them, this rank's item indices)`` of step ``step``."""
        from model.training.common import partition_by_tokens

        _, items = self.global_batch(step)
        positions = partition_by_tokens([self.tokens[i] for i in items], self.world_size)[self.rank]
        return items, positions, [items[p] for p in positions]

    def batch(self, step: int) -> tuple[int, list[int]]:
        """``(epoch, item indices)`` of this rank's share of global step ``step``."""
        epoch, _ = self.global_batch(step)
        return epoch, self.shard(step)[2]


def item_generator(seed: int, step: int, position: int) -> torch.Generator:
    """The CPU generator of the batch element at ``position`` of step ``step``'s global batch (seeded by ``(seed,
    step, position)``): its randomness does not depend on which rank trains it."""
    digest = hashlib.sha256(f"{seed}/{step}/item{position}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & ((1 << 63) - 1))


class EMA:
    """Exponential moving average of a model's floating-point state (float32 shadow copies).

    ``decay_at(step) = min(decay, (1 + step) / (10 + step))`` (fast start).
    """

    def __init__(self, model: torch.nn.Module, decay: float):
        self.decay = decay
        self.shadow = {k: v.detach().float().clone() for k, v in model.state_dict().items()
                       if v.dtype.is_floating_point}

    def decay_at(self, step: int) -> float:
        return min(self.decay, (1 + step) / (10 + step))

    @torch.no_grad()
    def update(self, model: torch.nn.Module, step: int) -> None:
        d = self.decay_at(step)
        for k, v in model.state_dict().items():
            if k in self.shadow:
                self.shadow[k].lerp_(v.detach().float(), 1.0 - d)

    def state_dict(self) -> dict:
        return {f"ema.{k}": v for k, v in self.shadow.items()}

    def load(self, state: dict) -> None:
        for k in self.shadow:
            if f"ema.{k}" in state:
                self.shadow[k].copy_(state[f"ema.{k}"])


def _load_view(dataset: LatentDataset, i: int, v: int, image_size: int, cache: dict):
    from model.nets.conditioning import preprocess_image

    key = (i, v, image_size)
    if key not in cache:
        cache[key] = preprocess_image(dataset.view_path(i, v), size=image_size)
        if len(cache) > 4096:  # bounded memory for large sets
            cache.pop(next(iter(cache)))
    return cache[key]


def make_batch(dataset: LatentDataset, indices, *, generator, encoder, latent_mode: str,
               stats: dict | None, sparse_conditions: bool, device, image_cache: dict):
    """``(x0: SparseTensor [N, L] on device, cond: Condition)`` for the items ``indices``; ``generator``: one
    ``torch.Generator`` for all of them or one per item (:func:`item_generator`)."""
    from model.nets.conditioning import dense_condition, sparse_condition

    gens = list(generator) if isinstance(generator, (list, tuple)) else [generator] * len(indices)
    if len(gens) != len(indices):
        raise ValueError(f"{len(gens)} generators for {len(indices)} items")
    coords, feats, rgbs, masks = [], [], [], []
    for i, generator in zip(indices, gens):
        c, mean, logvar = dataset.latent(i)
        z = torch.from_numpy(mean)
        if latent_mode == "sample":
            eps = torch.randn(z.shape, generator=generator)
            z = z + torch.exp(0.5 * torch.from_numpy(logvar)) * eps
        if stats is not None:
            z = (z - torch.tensor(stats["mean"], dtype=torch.float32)) / torch.tensor(stats["std"], dtype=torch.float32)
        coords.append(torch.from_numpy(c))
        feats.append(z.float())
        v = int(torch.randint(dataset.num_views(i), (1,), generator=generator))
        pre = _load_view(dataset, i, v, encoder.image_size, image_cache)
        rgbs.append(pre.rgb)
        masks.append(pre.mask)
    x0 = SparseTensor.from_list([c.to(device) for c in coords], [f.to(device) for f in feats],
                                resolution=dataset.latent_resolution)
    tokens = encoder(torch.stack(rgbs).to(device))
    if sparse_conditions:
        cond = sparse_condition(tokens, torch.stack(masks).to(device), patch_size=encoder.patch_size,
                                num_prefix=encoder.num_prefix_tokens)
    else:
        cond = dense_condition(tokens)
    return x0, cond


def sharded_flow_loss(model, x0: SparseTensor, cond, generators, *, total_tokens: int, world_size: int,
                      timestep_mode: str = "logit_normal", timestep_shift: float = 1.0,
                      cond_drop_prob: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """The rectified-flow loss (:func:`model.flow.flow_loss`) of this rank's part of a global batch, drawn per batch
    element and scaled for DDP; returns ``(loss to backward, this part's share of the global loss)``.

    Element ``b`` draws, from ``generators[b]`` (:func:`item_generator`, after whatever :func:`make_batch` drew),
    its timestep, its noise and whether its condition is dropped; so an element gets the same draws on any rank and
    in any company. The global loss is the mean squared error over all ``total_tokens`` tokens of the global batch:
    this part's share is ``local mean * n / total_tokens`` (``n`` its tokens), and the loss to backward is
    ``world_size`` times that, because DDP divides the summed gradients by the number of ranks. (Each rank's local
    token mean instead would weight a token by ``1 / n_r``: ranks holding fewer tokens would count for more.) With
    gradient accumulation over several parts on one rank, pass the rank count, not the part count: the gradients of
    the parts add up. The shares of all parts add up to the global loss.
    """
    from model.flow import sample_timesteps
    from model.nets.dit import Condition

    counts = x0.batch_counts.tolist()
    if len(generators) != len(counts):
        raise ValueError(f"{len(generators)} generators for {len(counts)} batch elements")
    t, noise, keep = [], [], []
    for n, g in zip(counts, generators):
        t.append(sample_timesteps(1, mode=timestep_mode, shift=timestep_shift, generator=g))
        noise.append(torch.randn(n, x0.num_channels, generator=g))
        keep.append(torch.rand(1, generator=g) >= cond_drop_prob)
    keep_t = torch.cat(keep)
    if not bool(keep_t.all()):
        if isinstance(cond, Condition):
            cond = cond.drop(keep_t)
        else:
            cond = cond * keep_t.to(cond.device, cond.dtype).view(-1, 1, 1)
    res = flow_loss(model, x0, cond, t=torch.cat(t), noise=torch.cat(noise).to(x0.device, x0.dtype))
    share = res["loss"] * (x0.num_voxels / max(int(total_tokens), 1))
    return share * world_size, share.detach()


# ---------------------------------------------------------------------------------------------------------------
# training


def _checkpoint_dir(out: Path) -> Path:
    return out / "checkpoints"


def _resolve_resume(resume, out: Path) -> Path | None:
    if resume in (None, False, ""):
        return None
    if resume in (True, "auto"):
        last = _checkpoint_dir(out) / "last.safetensors"
        return last if last.is_file() else None
    path = Path(resume)
    if not path.is_file():
        raise FileNotFoundError(f"--resume: checkpoint {path} not found")
    return path


def train(cfg: TrainConfig, *, resume=None) -> dict:
    """Run training (module docstring); returns ``{"step", "loss", "checkpoint", "metrics"}`` of the last step."""
    from model.nets.conditioning import DinoV2Encoder
    from model.training.common import (
        Distributed,
        MetricsLog,
        TimeLimit,
        load_checkpoint,
        lr_factor,
        plot_metrics,
        save_checkpoint,
    )

    if not cfg.data:
        raise ValueError("data must name a folder prepared by python -m model.cli.prepare_dit_data")
    dist = Distributed(cfg.device)
    device = dist.device
    out = Path(cfg.out)
    dataset = LatentDataset(cfg.data)
    dit_cfg = cfg.dit_config()
    if dit_cfg.in_channels != dataset.latent_channels:
        raise ValueError(f"the data has {dataset.latent_channels} latent channels but the DiT expects "
                         f"{dit_cfg.in_channels} (set model_overrides in_channels/out_channels)")
    encoder = DinoV2Encoder.build(cfg.encoder, size=cfg.encoder_size, seed=cfg.encoder_seed).to(device)
    if encoder.channels != dit_cfg.cond_channels:
        raise ValueError(f"the image encoder gives {encoder.channels} channels but the DiT's cond_channels is "
                         f"{dit_cfg.cond_channels}")

    torch.manual_seed(cfg.seed)
    model = SparseDiT(dit_cfg).to(device)
    # fused: one kernel over all parameters on CUDA, without the foreach path's temporary copies of the state
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, betas=(cfg.beta1, cfg.beta2),
                            weight_decay=cfg.weight_decay, fused=device.type == "cuda")
    ema = EMA(model, cfg.ema_decay)
    start = 0
    stats = dataset.latent_stats() if cfg.normalize_latents else None
    ck_path = _resolve_resume(resume, out)
    if ck_path is not None:
        ck = load_checkpoint(ck_path, map_location="cpu")
        model.load_state_dict({k: v for k, v in ck.model.items() if not k.startswith("ema.")})
        ema.load(ck.model)
        if ck.optimizer is not None:
            opt.load_state_dict(ck.optimizer)
        start = ck.step
        stats = ck.meta.get("latent_stats", stats)
        if dist.is_main:
            print(f"resumed from {ck_path} at step {start}")
    ddp_model = dist.wrap(model)
    sampler = TokenBatchSampler(dataset.tokens, cfg.batch_tokens, cfg.max_batch, seed=cfg.seed,
                                world_size=dist.world_size, rank=dist.rank)
    meta_size = {"world_size": dist.world_size, "global_batch_tokens": cfg.batch_tokens * dist.world_size}
    metrics = MetricsLog(out / "metrics.jsonl", resume_step=start if ck_path is not None else None,
                         enabled=dist.is_main)
    if dist.is_main:
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.json").write_text(json.dumps({"train": dataclasses.asdict(cfg),
                                                     "dit": dit_cfg.to_dict()}, indent=1))
    meta = {"kind": "sparse_dit", "dit_config": dit_cfg.to_dict(), "train_config": dataclasses.asdict(cfg),
            "latent_stats": stats, "latent_resolution": dataset.latent_resolution,
            "encoder": {"weights": cfg.encoder, "size": cfg.encoder_size, "seed": cfg.encoder_seed,
                        "random": encoder.random_weights, "image_size": encoder.image_size},
            "vae_config": dataset.manifest.get("vae_config"), **meta_size}
    use_bf16 = cfg.precision == "bf16" and device.type == "cuda"
    limit = TimeLimit(cfg.time_limit_min)
    image_cache: dict = {}
    last = {"step": start, "loss": None, "checkpoint": None}
    ckdir = _checkpoint_dir(out)

    def save(step: int) -> Path | None:
        if not dist.is_main:
            return None
        state = {**model.state_dict(), **ema.state_dict()}
        path = save_checkpoint(ckdir / f"step_{step:07d}.safetensors", model=state, optimizer=opt, step=step,
                               meta=meta)
        save_checkpoint(ckdir / "last.safetensors", model=state, optimizer=opt, step=step, meta=meta)
        old = sorted(ckdir.glob("step_*.safetensors"))[:-cfg.keep_checkpoints] if cfg.keep_checkpoints > 0 else []
        for p in old:
            p.unlink(missing_ok=True)
        plot_metrics(metrics.records(), out / "loss.png", title=f"sparse DiT ({cfg.model})")
        return path

    bar = None
    if cfg.progress and dist.is_main:
        from tqdm.auto import tqdm

        bar = tqdm(total=cfg.steps, initial=start, desc="train_dit", unit="step")
    model.train()
    step = start
    try:
        for step in range(start, cfg.steps):
            t0 = time.perf_counter()
            items, positions, idx = sampler.shard(step)
            total_tokens = sum(dataset.tokens[i] for i in items)
            gens = [item_generator(cfg.seed, step, p) for p in positions]
            x0, cond = make_batch(dataset, idx, generator=gens, encoder=encoder, latent_mode=cfg.latent,
                                  stats=stats, sparse_conditions=dit_cfg.sparse_conditions, device=device,
                                  image_cache=image_cache)
            lr = cfg.lr * lr_factor(step, total_steps=cfg.steps, warmup_steps=cfg.warmup_steps,
                                    schedule=cfg.schedule)
            for g in opt.param_groups:
                g["lr"] = lr
            with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=use_bf16):
                loss, share = sharded_flow_loss(ddp_model, x0, cond, gens, total_tokens=total_tokens,
                                                world_size=dist.world_size, timestep_mode=cfg.timestep_mode,
                                                timestep_shift=cfg.timestep_shift, cond_drop_prob=cfg.cond_drop_prob)
            if dist.enabled:
                dist.synchronize()
            fwd_s = time.perf_counter() - t0
            opt.zero_grad(set_to_none=True)
            loss.backward()
            gnorm = torch.nn.utils.clip_grad_norm_(model.parameters(),
                                                   cfg.grad_clip if cfg.grad_clip > 0 else float("inf"))
            opt.step()
            ema.update(model, step)
            loss_f = float(dist.sum(share.double()))  # the global loss: the shares add up to it
            if not math.isfinite(loss_f):
                raise FloatingPointError(f"non-finite loss {loss_f} at step {step + 1}")
            ranks = dist.rank_stats(dict(step_s=time.perf_counter() - t0, fwd_s=fwd_s,
                                         tokens=float(x0.num_voxels))) if dist.enabled else {}
            done = step + 1
            last.update(step=done, loss=loss_f)
            if done % cfg.log_every == 0 or done == cfg.steps:
                metrics.log({"step": done, "loss": loss_f, "lr": lr, "grad_norm": float(gnorm),
                             "tokens": total_tokens, "batch": len(items), "sec": time.perf_counter() - t0,
                             "world_size": dist.world_size, **ranks})
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{loss_f:.4f}")
            stop = dist.any(limit.expired())
            if done % cfg.save_every == 0 or done == cfg.steps or stop:
                last["checkpoint"] = save(done)
                dist.barrier()
            if stop:
                break
    finally:
        if bar is not None:
            bar.close()
        ddp_model = None  # noqa: F841  (the DDP wrapper goes before its process group)
        dist.close()
    if last["checkpoint"] is None and dist.is_main and last["step"] > start:
        last["checkpoint"] = save(last["step"])
    last["metrics"] = str(out / "metrics.jsonl")
    return last
