"""The sparse SDF VAE of Direct3D-S2 (paper section 3; RELEASED_MODEL.md E.3), with decoder pruning.

Module structure and parameter names mirror the released ``SparseSDFVAE`` (``statedict-sparse_vae_512.txt``), so
``vae.encoder`` and ``vae.decoder`` load released weights with strict key matching:

- Encoder (``encoder.*``): ``input_layer1`` Linear(1 -> C0) on the SDF value; ``downsample.{i}`` residual blocks
  (GroupNorm + SiLU [``act_layers``], mean pool by 2, 3^3 conv, GroupNorm, SiLU, 3^3 conv [``out_layers.{0,1,3}``],
  plus ``skip_connection`` = 1^3 conv of the mean-pooled raw input): C0 -> C1 -> C2 -> C3 at R -> R/8;
  ``input_layer`` Linear(C3 -> W) + sin-cos position embedding; ``blocks.{i}`` shifted-window transformer blocks
  (shift 0 on even, window/2 on odd blocks); parameter-free LayerNorm (eps 1e-5); ``out_layer`` Linear(W -> 2 L):
  L means then L log-variances (clamped to [-30, 20]).
- Decoder (``decoder.*``): ``input_layer`` Linear(L -> W) + position embedding; ``blocks.{i}``; ``upsample.{i}``
  subdivide blocks W -> C2 -> C1 -> C0, each 3^3 conv + SiLU (``act_layers``), subdivide (each voxel -> its 8
  children), 3^3 conv + SiLU (``out_layers``), no norms and no skip (as released); ``out_layer`` Linear(C0 -> 1);
  tanh.

Pruning (ours; the released decoder has none and emits all 8^3 fine voxels of every latent cell, E.3):
after each subdivide block a head (``pruning.heads.{i}``, Linear(C_i -> 1), a separate top-level submodule so it
never clashes with released keys) predicts per voxel the logit of "this voxel is in the target voxel set at this
resolution" (the input voxels, pooled to that level), trained with BCE. Voxels predicted occupied
(``sigmoid(logit) > prune_threshold``) go on to the next block; during training (``keep_target``) the union of
predicted and target voxels is kept, so every target voxel survives to the output and the predicted extra voxels
are decoded and supervised too; at inference only predicted voxels are kept. With ``prune="none"`` every child is
kept (the released rule); released weights load into ``encoder``/``decoder`` either way, and with
``prune="head"`` the heads stay at their initialisation until trained.
"""
from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from model.sparse.attention import SparseTransformerBlock
from model.sparse.conv import BACKENDS, SparseConv3d
from model.sparse.layers import (
    AbsolutePositionEmbedder,
    FP32LayerNorm,
    SparseDownsample,
    SparseGroupNorm,
    SparseLinear,
    SparseSiLU,
    SparseSubdivide,
    check_pool_mode,
    pool_coords,
)
from model.sparse.tensor import CoordIndex, SparseTensor

__all__ = [
    "DecoderOutput",
    "LatentDistribution",
    "PruningHeads",
    "SparseDownBlock3d",
    "SparseSDFDecoder",
    "SparseSDFEncoder",
    "SparseSDFVAE",
    "SparseSubdivideBlock3d",
    "VAEConfig",
    "VAELossConfig",
    "VAEOutput",
    "vae_loss",
]

#: Accepted values of ``VAEConfig.prune``.
PRUNE_MODES = ("head", "none")
#: Epsilon of the encoder's final parameter-free layer norm (RELEASED_MODEL.md E.3).
ENCODER_OUT_NORM_EPS = 1e-5
#: Pooling / subdivision factor of one resolution level.
LEVEL_FACTOR = 2


@dataclass(frozen=True)
class VAEConfig:
    """Sizes and options of :class:`SparseSDFVAE`.

    ``conv_channels = (C0, C1, C2, C3)``: encoder widths from the input linear through the down blocks (one level
    per step: 3 levels, R -> R/8); the decoder's subdivide blocks go ``model_channels -> C2 -> C1 -> C0``.
    ``resolution`` is the SDF grid side the configuration is meant for (inputs at other resolutions work: the
    paper trains over {256, 384, 512, 1024}^3); ``pos_emb_factor`` scales the latent coordinates before the sin-cos
    embedding (1.0 in both released VAEs). ``prune``: ``"head"`` (learned pruning, module docstring) or
    ``"none"`` (keep all children, the released decoder). ``conv_backend``: see :mod:`model.sparse.conv`.
    ``pool_mode``: the encoder's pooling by 2 over a parent's ``n`` children, ``"released"`` (``sum / (n + 1)``, as
    the published SparseDownsample computes it: the ``released_*`` presets and :mod:`model.pipeline.pretrained` loading) or
    ``"mean"`` (``sum / n``, the default for models trained here; :func:`model.sparse.layers.pool_features`).
    """

    in_channels: int = 1
    out_channels: int = 1
    conv_channels: tuple[int, ...] = (32, 64, 128, 512)
    model_channels: int = 512
    latent_channels: int = 16
    num_heads: int = 8
    encoder_blocks: int = 4
    decoder_blocks: int = 4
    mlp_ratio: float = 4.0
    window: int = 8
    num_groups: int = 32
    resolution: int = 512
    pos_emb_factor: float = 1.0
    logvar_min: float = -30.0
    logvar_max: float = 20.0
    prune: str = "head"
    prune_threshold: float = 0.5
    conv_backend: str = "auto"
    pool_mode: str = "mean"
    use_checkpoint: bool = False

    def __post_init__(self):
        for name in ("in_channels", "out_channels", "model_channels", "latent_channels", "num_heads", "window",
                     "num_groups", "resolution"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        for name in ("encoder_blocks", "decoder_blocks"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise ValueError(f"{name} must be a non-negative int, got {value!r}")
        if not isinstance(self.conv_channels, tuple) or len(self.conv_channels) < 2:
            raise ValueError(f"conv_channels must be a tuple of at least 2 widths, got {self.conv_channels!r}")
        for c in self.conv_channels:
            if not isinstance(c, int) or c < 1 or c % self.num_groups:
                raise ValueError(f"conv_channels must be positive ints divisible by num_groups ({self.num_groups}), "
                                 f"got {self.conv_channels!r}")
        if self.model_channels % self.num_heads:
            raise ValueError(f"num_heads ({self.num_heads}) must divide model_channels ({self.model_channels})")
        if self.window % 2:
            raise ValueError(f"window must be even (shifted blocks use window // 2), got {self.window}")
        if self.prune not in PRUNE_MODES:
            raise ValueError(f"prune must be one of {PRUNE_MODES}, got {self.prune!r}")
        if not 0.0 < self.prune_threshold < 1.0:
            raise ValueError(f"prune_threshold must be in (0, 1), got {self.prune_threshold!r}")
        if self.conv_backend not in BACKENDS:
            raise ValueError(f"conv_backend must be one of {BACKENDS}, got {self.conv_backend!r}")
        check_pool_mode(self.pool_mode)
        if self.logvar_min >= self.logvar_max:
            raise ValueError(f"logvar_min ({self.logvar_min}) must be below logvar_max ({self.logvar_max})")

    @property
    def num_levels(self) -> int:
        """Pooling levels of the encoder (= subdivide blocks of the decoder)."""
        return len(self.conv_channels) - 1

    @property
    def downsample_factor(self) -> int:
        """SDF resolution / latent resolution (8 for the released model)."""
        return LEVEL_FACTOR**self.num_levels

    @property
    def latent_resolution(self) -> int:
        return self.resolution // self.downsample_factor

    @property
    def decoder_channels(self) -> tuple[int, ...]:
        """Widths through the decoder's subdivide blocks: ``(model_channels, C2, C1, C0)`` for 3 levels."""
        return (self.model_channels,) + tuple(reversed(self.conv_channels[:-1]))

    @classmethod
    def released_512(cls, **overrides) -> "VAEConfig":
        """The released ``sparse_vae_512`` sizes (512^3 SDF, 64^3 latent; RELEASED_MODEL.md A.1)."""
        return cls(**{"resolution": 512, "pool_mode": "released", **overrides})

    @classmethod
    def released_1024(cls, **overrides) -> "VAEConfig":
        """The released ``sparse_vae_1024`` sizes (same network, 1024^3 SDF, 128^3 latent, factor 1.0)."""
        return cls(**{"resolution": 1024, "pool_mode": "released", **overrides})

    @classmethod
    def tiny(cls, **overrides) -> "VAEConfig":
        """A few-thousand-parameter VAE for tests and CPU runs (32^3 SDF, 4^3 latent)."""
        sizes = dict(conv_channels=(8, 16, 16, 16), model_channels=16, latent_channels=4, num_heads=2,
                     encoder_blocks=1, decoder_blocks=1, num_groups=4, resolution=32)
        return cls(**{**sizes, **overrides})


# ---------------------------------------------------------------------------------------------------------------
# building blocks


class SparseDownBlock3d(nn.Module):
    """Residual down block: ``act_layers`` (GroupNorm, SiLU) -> pool by 2 -> ``out_layers`` (3^3 conv,
    GroupNorm, SiLU, 3^3 conv), plus ``skip_connection`` (1^3 conv) of the pooled input (``pool_mode``: mean or
    the released ``sum / (n + 1)``, :class:`VAEConfig`).

    ``forward(x: SparseTensor [N, Cin] at R) -> SparseTensor [M, Cout] at R/2`` (parents in raster order).
    """

    def __init__(self, in_channels: int, out_channels: int, num_groups: int, conv_backend: str = "auto",
                 pool_mode: str = "mean"):
        super().__init__()
        self.act_layers = nn.Sequential(SparseGroupNorm(num_groups, in_channels), SparseSiLU())
        self.down = SparseDownsample(LEVEL_FACTOR, pool_mode)
        self.out_layers = nn.Sequential(
            SparseConv3d(in_channels, out_channels, 3, backend=conv_backend),
            SparseGroupNorm(num_groups, out_channels),
            SparseSiLU(),
            SparseConv3d(out_channels, out_channels, 3, backend=conv_backend),
        )
        self.skip_connection = SparseConv3d(in_channels, out_channels, 1, backend=conv_backend)

    def forward(self, x: SparseTensor) -> SparseTensor:
        h = self.out_layers(self.down(self.act_layers(x)))
        skip = self.skip_connection(self.down(x))
        return h.replace(h.feats + skip.feats)


class SparseSubdivideBlock3d(nn.Module):
    """Up block: ``act_layers`` (3^3 conv Cin -> Cout, SiLU) -> subdivide -> ``out_layers`` (3^3 conv, SiLU).

    ``forward(x: SparseTensor [N, Cin] at R) -> SparseTensor [8 N, Cout] at 2 R`` (children parent-major).
    """

    def __init__(self, in_channels: int, out_channels: int, conv_backend: str = "auto"):
        super().__init__()
        self.act_layers = nn.Sequential(SparseConv3d(in_channels, out_channels, 3, backend=conv_backend), SparseSiLU())
        self.sub = SparseSubdivide()
        self.out_layers = nn.Sequential(SparseConv3d(out_channels, out_channels, 3, backend=conv_backend),
                                        SparseSiLU())

    def forward(self, x: SparseTensor) -> SparseTensor:
        return self.out_layers(self.sub(self.act_layers(x)))


def _transformer_blocks(config: VAEConfig, count: int) -> nn.ModuleList:
    return nn.ModuleList(
        SparseTransformerBlock(config.model_channels, config.num_heads, config.window,
                               shift=0 if i % 2 == 0 else config.window // 2, mlp_ratio=config.mlp_ratio,
                               use_checkpoint=config.use_checkpoint)
        for i in range(count)
    )


@dataclass
class LatentDistribution:
    """Diagonal Gaussian posterior: ``mean`` (SparseTensor ``[M, L]`` at the latent voxels), ``logvar [M, L]``."""

    mean: SparseTensor
    logvar: torch.Tensor

    def sample(self, generator: torch.Generator | None = None) -> SparseTensor:
        """``mean + exp(logvar / 2) * eps``, ``eps ~ N(0, I)`` (reparameterised)."""
        m = self.mean.feats
        eps = torch.randn(m.shape, generator=generator, dtype=m.dtype, device=m.device)
        return self.mean.replace(m + torch.exp(0.5 * self.logvar) * eps)

    def mode(self) -> SparseTensor:
        return self.mean

    def kl(self) -> torch.Tensor:
        """KL to N(0, I): sum over channels, mean over latent voxels (scalar, at least float32)."""
        m = self.mean.feats.to(torch.promote_types(self.mean.dtype, torch.float32))
        lv = self.logvar.to(m.dtype)
        if m.shape[0] == 0:
            return m.sum()
        return (0.5 * (m.square() + lv.exp() - 1.0 - lv).sum(1)).mean()


@dataclass
class DecoderOutput:
    """What the decoder returns.

    ``sdf``: SparseTensor ``[M, out_channels]`` (tanh) at the decoded voxels (full resolution);
    ``features``: SparseTensor ``[M, C0]``, the last features before ``out_layer`` (the released pipeline hands
    these to its refiner); ``prune_logits``: per subdivide block the logits ``[N_i]`` of every candidate voxel
    (before pruning; empty with ``prune="none"``); ``prune_targets``: per block ``[N_i]`` bool "candidate is in the
    target set", or None when no target was given.
    """

    sdf: SparseTensor
    features: SparseTensor
    prune_logits: list[torch.Tensor] = field(default_factory=list)
    prune_targets: list[torch.Tensor] | None = None


@dataclass
class VAEOutput:
    """``posterior`` (the encoder's distribution), ``latent`` (the decoded sample or mean) and ``decoded``."""

    posterior: LatentDistribution
    latent: SparseTensor
    decoded: DecoderOutput


# ---------------------------------------------------------------------------------------------------------------
# encoder, decoder, pruning heads


class SparseSDFEncoder(nn.Module):
    """SDF voxels ``x [N, in_channels]`` at R -> posterior at R / 8 (:class:`LatentDistribution`)."""

    def __init__(self, config: VAEConfig):
        super().__init__()
        self.config = config
        cc = config.conv_channels
        self.input_layer1 = SparseLinear(config.in_channels, cc[0])
        self.downsample = nn.ModuleList(
            SparseDownBlock3d(cc[i], cc[i + 1], config.num_groups, config.conv_backend, config.pool_mode)
            for i in range(len(cc) - 1)
        )
        self.input_layer = SparseLinear(cc[-1], config.model_channels)
        self.pos_embedder = AbsolutePositionEmbedder(config.model_channels, config.pos_emb_factor)
        self.blocks = _transformer_blocks(config, config.encoder_blocks)
        self.out_norm = FP32LayerNorm(config.model_channels, eps=ENCODER_OUT_NORM_EPS, elementwise_affine=False)
        self.out_layer = nn.Linear(config.model_channels, 2 * config.latent_channels)

    def forward(self, x: SparseTensor) -> LatentDistribution:
        if not isinstance(x, SparseTensor):
            raise TypeError(f"x must be a SparseTensor, got {type(x).__name__}")
        if x.num_channels != self.config.in_channels:
            raise ValueError(f"x has {x.num_channels} channels, the encoder expects {self.config.in_channels}")
        h = self.input_layer1(x)
        for block in self.downsample:
            h = block(h)
        h = self.input_layer(h)
        h = h.replace(h.feats + self.pos_embedder(h))
        for block in self.blocks:
            h = block(h)
        out = self.out_layer(self.out_norm(h.feats))
        mean, logvar = out.chunk(2, dim=1)
        logvar = logvar.clamp(self.config.logvar_min, self.config.logvar_max)
        return LatentDistribution(h.replace(mean), logvar)


class PruningHeads(nn.Module):
    """Our pruning heads (not in the released checkpoint): ``heads.{i}`` = Linear(C_i -> 1), one per subdivide
    block, giving the logit that a voxel belongs to the target voxel set at that block's resolution."""

    def __init__(self, channels: Sequence[int]):
        super().__init__()
        self.heads = nn.ModuleList(nn.Linear(c, 1) for c in channels)

    def forward(self, level: int, feats: torch.Tensor) -> torch.Tensor:
        """``feats [N, C_level] -> logits [N]``."""
        return self.heads[level](feats).squeeze(1)


class SparseSDFDecoder(nn.Module):
    """Latent ``z [M, L]`` at R/8 -> SDF at R (:class:`DecoderOutput`); pruning rule in the module docstring."""

    def __init__(self, config: VAEConfig):
        super().__init__()
        self.config = config
        widths = config.decoder_channels
        self.input_layer = SparseLinear(config.latent_channels, config.model_channels)
        self.pos_embedder = AbsolutePositionEmbedder(config.model_channels, config.pos_emb_factor)
        self.blocks = _transformer_blocks(config, config.decoder_blocks)
        self.upsample = nn.ModuleList(
            SparseSubdivideBlock3d(widths[i], widths[i + 1], config.conv_backend) for i in range(len(widths) - 1)
        )
        self.out_layer = SparseLinear(widths[-1], config.out_channels)

    def forward(
        self,
        z: SparseTensor,
        *,
        pruning: PruningHeads | None = None,
        targets: Sequence[CoordIndex] | None = None,
        keep_targets: bool = False,
    ) -> DecoderOutput:
        """Decode ``z``. ``targets``: per subdivide block the coordinate hash of the target voxels at its output
        resolution (coarse to fine); with ``pruning`` and ``keep_targets`` the union of predicted and target voxels
        is kept, else the predicted ones."""
        if not isinstance(z, SparseTensor):
            raise TypeError(f"z must be a SparseTensor, got {type(z).__name__}")
        if z.num_channels != self.config.latent_channels:
            raise ValueError(f"z has {z.num_channels} channels, the decoder expects {self.config.latent_channels}")
        if targets is not None and len(targets) != len(self.upsample):
            raise ValueError(f"targets must hold {len(self.upsample)} levels, got {len(targets)}")
        if keep_targets and targets is None:
            raise ValueError("keep_targets needs targets")
        h = self.input_layer(z)
        h = h.replace(h.feats + self.pos_embedder(h))
        for block in self.blocks:
            h = block(h)
        logits: list[torch.Tensor] = []
        in_target: list[torch.Tensor] | None = [] if targets is not None else None
        for level, block in enumerate(self.upsample):
            h = block(h)
            if pruning is None:
                continue
            logit = pruning(level, h.feats)
            keep = torch.sigmoid(logit.detach()) > self.config.prune_threshold
            if targets is not None:
                member = targets[level].contains(h.coords)
                in_target.append(member)
                if keep_targets:
                    keep = keep | member
            logits.append(logit)
            h = h.subset(keep)
        sdf = self.out_layer(h)
        return DecoderOutput(sdf.replace(torch.tanh(sdf.feats)), h, logits, in_target)


# ---------------------------------------------------------------------------------------------------------------
# the VAE


class SparseSDFVAE(nn.Module):
    """Sparse SDF VAE: ``encoder``, ``decoder`` (released names) and, with ``prune="head"``, ``pruning``.

    Input: SparseTensor ``[N, 1]`` of SDF values at the voxels where ``|sdf| < tau`` (coordinates on the R^3 grid).
    Runs in float32/float64 on CPU and under bf16/fp16 autocast on GPU.
    """

    def __init__(self, config: VAEConfig | None = None):
        super().__init__()
        self.config = config = config or VAEConfig()
        self.encoder = SparseSDFEncoder(config)
        self.decoder = SparseSDFDecoder(config)
        self.pruning = PruningHeads(config.decoder_channels[1:]) if config.prune == "head" else None

    def target_levels(self, x: SparseTensor) -> list[CoordIndex]:
        """Coordinate hashes of ``x``'s voxels pooled to each subdivide block's resolution, coarse to fine
        (R/4, R/2, R for 3 levels); pooling maps are shared with the encoder through ``x.cache``."""
        levels = [x]
        for _ in range(self.config.num_levels - 1):
            levels.append(pool_coords(levels[-1], LEVEL_FACTOR))
        return [t.coord_index() for t in reversed(levels)]

    def encode(self, x: SparseTensor) -> LatentDistribution:
        return self.encoder(x)

    def decode(self, z: SparseTensor, *, target: SparseTensor | None = None,
               keep_target: bool = False) -> DecoderOutput:
        """Decode latents ``z [M, L]``. ``target`` (the input voxels) gives the pruning targets; ``keep_target``
        keeps them in the output (training rule)."""
        targets = self.target_levels(target) if target is not None and self.pruning is not None else None
        return self.decoder(z, pruning=self.pruning, targets=targets, keep_targets=keep_target and targets is not None)

    def forward(self, x: SparseTensor, *, sample_posterior: bool | None = None, keep_target: bool | None = None,
                generator: torch.Generator | None = None) -> VAEOutput:
        """Encode ``x``, sample (default in training mode) or take the mean, decode with ``x`` as pruning target;
        ``keep_target`` defaults to ``self.training`` (union of predicted and target voxels)."""
        sample_posterior = self.training if sample_posterior is None else sample_posterior
        keep_target = self.training if keep_target is None else keep_target
        posterior = self.encode(x)
        z = posterior.sample(generator) if sample_posterior else posterior.mode()
        return VAEOutput(posterior, z, self.decode(z, target=x, keep_target=keep_target))


# ---------------------------------------------------------------------------------------------------------------
# losses (paper 3.2)


@dataclass(frozen=True)
class VAELossConfig:
    """Weights of the VAE loss terms and the target of extra voxels.

    ``extra_truncation``: target magnitude of decoded voxels outside the input band when no true SDF is given
    (``tau`` in the data's normalised SDF units; the released pipeline fills empty space with +1, so 1.0 fits data
    normalised by ``tau``).
    """

    weight_in: float = 1.0
    weight_extra: float = 1.0
    weight_sharp: float = 1.0
    weight_kl: float = 1e-6
    weight_prune: float = 1.0
    extra_truncation: float = 1.0

    def __post_init__(self):
        for f in fields(self):
            value = getattr(self, f.name)
            if not isinstance(value, (int, float)) or isinstance(value, bool) or value < 0:
                raise ValueError(f"{f.name} must be a non-negative number, got {value!r}")


def _mse(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    if pred.numel() == 0:
        return pred.sum()  # zero, keeps the graph and dtype
    return F.mse_loss(pred, target.to(pred.dtype))


def vae_loss(
    output: VAEOutput,
    target: SparseTensor,
    config: VAELossConfig = VAELossConfig(),
    *,
    sharp_mask: torch.Tensor | None = None,
    extra_sdf: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> dict[str, torch.Tensor]:
    """Losses of paper 3.2 plus the pruning BCE; returns ``{"loss", "sdf_in", "sdf_extra", "sdf_sharp", "kl",
    "prune"}`` (scalars, at least float32; ``loss`` is the weighted sum).

    Args:
        output: :meth:`SparseSDFVAE.forward`'s output for ``target``.
        target: the input SparseTensor ``[N, 1]`` (true SDF at the input voxels).
        sharp_mask: ``[N]`` bool, input voxels near sharp edges (from the data); ``sdf_sharp`` is the MSE over the
            decoded voxels among them (0 when None).
        extra_sdf: target SDF of decoded voxels that are not input voxels: a callable ``coords [M, 4] int32 ->
            sdf [M]`` (e.g. a lookup into the data's dense or wider-band SDF), or None for
            ``extra_truncation * sign(prediction)`` (the truncated value on the predicted side).
    """
    if not isinstance(target, SparseTensor):
        raise TypeError(f"target must be a SparseTensor, got {type(target).__name__}")
    decoded = output.decoded.sdf
    cdt = torch.promote_types(decoded.dtype, torch.float32)
    pred = decoded.feats[:, 0].to(cdt)
    row = target.coord_index().lookup(decoded.coords)  # [M] target row of each decoded voxel, -1 if extra
    is_in = row >= 0
    in_rows = row[is_in]
    true_sdf = target.feats[:, 0].to(cdt)
    losses = {"sdf_in": _mse(pred[is_in], true_sdf.index_select(0, in_rows))}

    extra = ~is_in
    pred_extra = pred[extra]
    if extra_sdf is None:
        tau = config.extra_truncation
        extra_target = torch.where(pred_extra.detach() >= 0, tau, -tau)
    else:
        extra_target = extra_sdf(decoded.coords[extra])
        if not isinstance(extra_target, torch.Tensor) or extra_target.shape != pred_extra.shape:
            raise ValueError(f"extra_sdf must return a tensor of shape {tuple(pred_extra.shape)}")
    losses["sdf_extra"] = _mse(pred_extra, extra_target)

    if sharp_mask is None:
        losses["sdf_sharp"] = pred.new_zeros(())
    else:
        if not isinstance(sharp_mask, torch.Tensor) or sharp_mask.dtype != torch.bool or \
                sharp_mask.shape != (target.num_voxels,):
            raise ValueError(f"sharp_mask must be a [{target.num_voxels}] bool tensor aligned with target's rows")
        sharp = sharp_mask.index_select(0, in_rows)
        losses["sdf_sharp"] = _mse(pred[is_in][sharp], true_sdf.index_select(0, in_rows[sharp]))

    losses["kl"] = output.posterior.kl().to(cdt)

    logits, member = output.decoded.prune_logits, output.decoded.prune_targets
    if logits and member is not None:
        per_level = [F.binary_cross_entropy_with_logits(lg.to(cdt), m.to(cdt)) for lg, m in zip(logits, member)
                     if lg.numel()]
        losses["prune"] = torch.stack(per_level).mean() if per_level else pred.new_zeros(())
    else:
        losses["prune"] = pred.new_zeros(())

    losses["loss"] = (config.weight_in * losses["sdf_in"] + config.weight_extra * losses["sdf_extra"]
                      + config.weight_sharp * losses["sdf_sharp"] + config.weight_kl * losses["kl"]
                      + config.weight_prune * losses["prune"])
    return losses
