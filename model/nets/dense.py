"""The dense stage of the released cascade: the occupancy VAE (:class:`DenseShapeVAE`) and the dense DiT
(:class:`DenseDiT`), built from RELEASED_MODEL.md E.1/E.2 with the released parameter names and shapes
(``statedict-dense_vae.txt``, ``statedict-dense_dit.txt``), so ``model_dense.ckpt["vae"]`` and ``["dit"]`` load with
strict key matching (:mod:`model.pipeline.pretrained`).

Occupancy VAE (``DenseShapeVAE``; grid axes ``[x, y, z]``, 64^3 <-> 16^3 x 8 for the released sizes):

- Residual block (``norm1``, ``conv1``, ``norm2``, ``conv2``): channel LayerNorm (affine, eps 1e-5, computed in
  float32) + SiLU + Conv3d 3^3, twice, plus the input (widths never change inside a residual block).
- Down block (``conv``): Conv3d kernel 2 stride 2 (changes the width). Up block (``conv``): Conv3d 3^3 to 8x the new
  width, then a 3-D pixel shuffle: input channel ``c * 8 + 4 i + 2 j + k`` goes to offset ``(i, j, k)`` along the
  three spatial axes (:func:`pixel_shuffle_3d`).
- Encoder: ``input_layer`` Conv3d(1 -> C0) 3^3; ``blocks`` = per level ``num_res_blocks`` residual blocks, then a
  down block except after the last level; ``middle_block`` residual blocks; ``out_layer`` = LayerNorm, SiLU,
  Conv3d(C -> 2 L) 3^3 (L means, then L log-variances; the clamp to [-30, 20] is ours, the encoder is unused at
  inference).
- Decoder: ``input_layer`` Conv3d(L -> C0) 3^3; ``middle_block``; ``blocks`` = per level residual blocks, then an up
  block except after the last level; ``out_layer`` = LayerNorm, SiLU, Conv3d(C -> 1) 3^3: occupancy logits.
  The released pipeline marks ``sigmoid(logit) >= 0.1`` as occupied, both sides in float16
  (:meth:`DenseShapeVAE.occupied_voxels`). :meth:`DenseShapeVAE.encode` takes the occupancy grid (0/1) and maps it
  to ``occ * 2 - 1`` itself, as the released ``encode`` does.

Dense DiT (``DenseDiT``; RELEASED_MODEL.md E.1 and D for the shared parts):

- Tokens: the ``[C_in, R, R, R]`` latent flattened x-major (z fastest), ``input_layer`` Linear(C_in -> W), plus the
  persistent buffer ``pos_emb [R^3, W]`` (sin-cos embedding of the integer (x, y, z), no factor; in the checkpoint).
- ``t_embedder``: as the sparse DiT's (:class:`model.nets.dit.TimestepEmbedder`, cosine half first, raw 0..1000 t).
- Blocks as the sparse DiT's (adaLN order shift, scale, gate for attention then MLP; ``norm1``/``norm3`` without
  affine, ``norm2`` affine, eps 1e-6, float32) but with plain multi-head self-attention: ``to_qkv`` (W -> 3W, q|k|v,
  head-major) with bias, q and k each L2-normalised per head (float32) times ``gamma [H, D]`` times ``sqrt(D)``
  (``q_rms_norm``, ``k_rms_norm``), ``to_out`` with bias. Cross-attention ``to_q``, ``to_kv`` (keys then values),
  ``to_out``, no q/k norm. MLP ``mlp.mlp.{0,2}`` GELU(tanh).
- Final parameter-free layer norm (eps 1e-5) and ``out_layer`` Linear(W -> C_out); output ``[B, C_out, R, R, R]``.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from model.nets.dit import BLOCK_NORM_EPS, FINAL_NORM_EPS, Condition, TimestepEmbedder
from model.nets.fused import FUSED_DTYPES, head_rms_norm, norm_modulate
from model.sparse.tensor import SparseTensor
from model.sparse.layers import FeedForward, FP32LayerNorm, sincos_position_embedding

__all__ = [
    "ChannelLayerNorm",
    "DenseDiT",
    "DenseDiTBlock",
    "DenseDiTConfig",
    "DenseShapeVAE",
    "DenseTokenVelocity",
    "DenseVAEConfig",
    "pixel_shuffle_3d",
]

#: Epsilon of the dense VAE's channel layer norms.
DENSE_VAE_NORM_EPS = 1e-5
#: Occupancy threshold of the released pipeline on ``sigmoid(logit)``.
OCCUPANCY_THRESHOLD = 0.1
#: The dtype the released pipeline compares in: its dense VAE runs in float16, so ``sigmoid(logit)`` is a float16
#: value and the threshold becomes float16(0.1) = 0.0999755859375.
OCCUPANCY_DTYPE = torch.float16
#: Pixel-shuffle factor of the VAE's up blocks and stride of its down blocks.
SCALE = 2


def _positive_int(name: str, value) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")


# ---------------------------------------------------------------------------------------------------------------
# occupancy VAE


@dataclass(frozen=True)
class DenseVAEConfig:
    """Sizes of :class:`DenseShapeVAE` (released names in brackets: ``dense_vae`` params in config.yaml).

    ``encoder_channels`` [model_channels_encoder], ``encoder_res_blocks`` [num_res_blocks_encoder],
    ``encoder_middle_blocks`` [num_res_blocks_middle_encoder], likewise for the decoder; ``latent_channels``
    [embed_dim]. ``resolution``: side of the occupancy grid (64; the latent side is ``resolution / 2^(levels-1)``).
    """

    in_channels: int = 1
    out_channels: int = 1
    latent_channels: int = 8
    encoder_channels: tuple[int, ...] = (32, 128, 512)
    encoder_res_blocks: int = 2
    encoder_middle_blocks: int = 2
    decoder_channels: tuple[int, ...] = (512, 128, 64)
    decoder_res_blocks: int = 4
    decoder_middle_blocks: int = 4
    resolution: int = 64
    logvar_min: float = -30.0
    logvar_max: float = 20.0

    def __post_init__(self):
        for name in ("in_channels", "out_channels", "latent_channels", "resolution"):
            _positive_int(name, getattr(self, name))
        for name in ("encoder_res_blocks", "encoder_middle_blocks", "decoder_res_blocks", "decoder_middle_blocks"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise ValueError(f"{name} must be a non-negative int, got {value!r}")
        for name in ("encoder_channels", "decoder_channels"):
            value = getattr(self, name)
            if not isinstance(value, tuple) or not value or not all(isinstance(c, int) and c > 0 for c in value):
                raise ValueError(f"{name} must be a non-empty tuple of positive ints, got {value!r}")
        if len(self.encoder_channels) != len(self.decoder_channels):
            raise ValueError("encoder_channels and decoder_channels must have the same number of levels")
        if self.resolution % self.downsample_factor:
            raise ValueError(f"resolution {self.resolution} is not divisible by {self.downsample_factor}")

    @property
    def downsample_factor(self) -> int:
        return SCALE ** (len(self.encoder_channels) - 1)

    @property
    def latent_resolution(self) -> int:
        return self.resolution // self.downsample_factor

    @classmethod
    def released(cls, **overrides) -> "DenseVAEConfig":
        """The released ``dense_vae`` (RELEASED_MODEL.md A.1): 64^3 occupancy, 8 x 16^3 latent."""
        return cls(**overrides)

    @classmethod
    def tiny(cls, **overrides) -> "DenseVAEConfig":
        """A few-thousand-parameter VAE for tests: 16^3 occupancy, 2 x 4^3 latent."""
        sizes = dict(latent_channels=2, encoder_channels=(4, 8, 8), encoder_res_blocks=1, encoder_middle_blocks=1,
                     decoder_channels=(8, 8, 4), decoder_res_blocks=1, decoder_middle_blocks=1, resolution=16)
        return cls(**{**sizes, **overrides})


class ChannelLayerNorm(nn.LayerNorm):
    """LayerNorm over the channel axis of ``[B, C, *spatial]``, computed in at least float32."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        cdt = torch.promote_types(x.dtype, torch.float32)
        w = None if self.weight is None else self.weight.to(cdt)
        b = None if self.bias is None else self.bias.to(cdt)
        with torch.autocast(device_type=x.device.type, enabled=False):
            h = F.layer_norm(x.to(cdt).movedim(1, -1), self.normalized_shape, w, b, self.eps)
        return h.movedim(-1, 1).to(x.dtype)


def pixel_shuffle_3d(x: torch.Tensor, factor: int = SCALE) -> torch.Tensor:
    """``[B, C f^3, D, H, W] -> [B, C, f D, f H, f W]``; input channel ``c f^3 + i f^2 + j f + k`` goes to offset
    ``(i, j, k)`` of each output cell along the three spatial axes."""
    b, c8, d, h, w = x.shape
    c = c8 // factor**3
    x = x.reshape(b, c, factor, factor, factor, d, h, w)
    return x.permute(0, 1, 5, 2, 6, 3, 7, 4).reshape(b, c, d * factor, h * factor, w * factor)


def _conv3(cin: int, cout: int) -> nn.Conv3d:
    return nn.Conv3d(cin, cout, 3, padding=1)


class DenseResBlock3d(nn.Module):
    """``x + conv2(SiLU(norm2(conv1(SiLU(norm1(x))))))``, width unchanged."""

    def __init__(self, channels: int):
        super().__init__()
        self.norm1 = ChannelLayerNorm(channels, eps=DENSE_VAE_NORM_EPS)
        self.conv1 = _conv3(channels, channels)
        self.norm2 = ChannelLayerNorm(channels, eps=DENSE_VAE_NORM_EPS)
        self.conv2 = _conv3(channels, channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        return x + self.conv2(F.silu(self.norm2(h)))


class DenseDownBlock3d(nn.Module):
    """Conv3d kernel 2 stride 2 (``conv``): ``[B, Cin, D, H, W] -> [B, Cout, D/2, H/2, W/2]``."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.conv = nn.Conv3d(in_channels, out_channels, SCALE, stride=SCALE)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


class DenseUpBlock3d(nn.Module):
    """Conv3d 3^3 to ``8 Cout`` (``conv``) then :func:`pixel_shuffle_3d`: ``[B, Cin, D..] -> [B, Cout, 2D..]``."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.conv = _conv3(in_channels, out_channels * SCALE**3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return pixel_shuffle_3d(self.conv(x))


def _out_layer(channels: int, out_channels: int) -> nn.Sequential:
    return nn.Sequential(ChannelLayerNorm(channels, eps=DENSE_VAE_NORM_EPS), nn.SiLU(), _conv3(channels, out_channels))


class DenseEncoder(nn.Module):
    """Occupancy ``[B, 1, R, R, R]`` -> ``(mean, logvar)``, each ``[B, L, R/f, R/f, R/f]``."""

    def __init__(self, config: DenseVAEConfig):
        super().__init__()
        self.config = config
        ch = config.encoder_channels
        self.input_layer = _conv3(config.in_channels, ch[0])
        blocks: list[nn.Module] = []
        for level, c in enumerate(ch):
            blocks += [DenseResBlock3d(c) for _ in range(config.encoder_res_blocks)]
            if level + 1 < len(ch):
                blocks.append(DenseDownBlock3d(c, ch[level + 1]))
        self.blocks = nn.ModuleList(blocks)
        self.middle_block = nn.ModuleList(DenseResBlock3d(ch[-1]) for _ in range(config.encoder_middle_blocks))
        self.out_layer = _out_layer(ch[-1], 2 * config.latent_channels)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.input_layer(x)
        for block in self.blocks:
            h = block(h)
        for block in self.middle_block:
            h = block(h)
        mean, logvar = self.out_layer(h).chunk(2, dim=1)
        return mean, logvar.clamp(self.config.logvar_min, self.config.logvar_max)


class DenseDecoder(nn.Module):
    """Latent ``[B, L, r, r, r]`` -> occupancy logits ``[B, 1, r f, r f, r f]``."""

    def __init__(self, config: DenseVAEConfig):
        super().__init__()
        ch = config.decoder_channels
        self.input_layer = _conv3(config.latent_channels, ch[0])
        self.middle_block = nn.ModuleList(DenseResBlock3d(ch[0]) for _ in range(config.decoder_middle_blocks))
        blocks: list[nn.Module] = []
        for level, c in enumerate(ch):
            blocks += [DenseResBlock3d(c) for _ in range(config.decoder_res_blocks)]
            if level + 1 < len(ch):
                blocks.append(DenseUpBlock3d(c, ch[level + 1]))
        self.blocks = nn.ModuleList(blocks)
        self.out_layer = _out_layer(ch[-1], config.out_channels)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.input_layer(z)
        for block in self.middle_block:
            h = block(h)
        for block in self.blocks:
            h = block(h)
        return self.out_layer(h)


class DenseShapeVAE(nn.Module):
    """The occupancy VAE of the dense stage (module docstring); parameters ``encoder.*`` and ``decoder.*``."""

    def __init__(self, config: DenseVAEConfig | None = None):
        super().__init__()
        self.config = config = config or DenseVAEConfig()
        self.encoder = DenseEncoder(config)
        self.decoder = DenseDecoder(config)

    def encode(self, occupancy: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Occupancy grid ``[B, in, R, R, R]`` (1 = occupied, 0 = empty; bool or float) -> ``(mean, logvar)``.

        As the released ``encode``, the grid is mapped to ``occupancy * 2 - 1`` (values in {-1, 1}) before the
        encoder, in the encoder's parameter dtype."""
        if not isinstance(occupancy, torch.Tensor):
            raise TypeError(f"occupancy must be a tensor, got {type(occupancy).__name__}")
        if occupancy.dim() != 5 or occupancy.shape[1] != self.config.in_channels:
            raise ValueError(f"occupancy must be [B, {self.config.in_channels}, R, R, R], got {tuple(occupancy.shape)}")
        dtype = self.encoder.input_layer.weight.dtype
        return self.encoder(occupancy.to(dtype) * 2 - 1)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Latent ``[B, L, r, r, r]`` -> logits ``[B, out, R, R, R]``."""
        if z.dim() != 5 or z.shape[1] != self.config.latent_channels:
            raise ValueError(f"z must be [B, {self.config.latent_channels}, r, r, r], got {tuple(z.shape)}")
        return self.decoder(z)

    def forward(self, x: torch.Tensor, *, sample_posterior: bool = False,
                generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(logits, mean, logvar)`` of an occupancy grid ``x`` (0/1, :meth:`encode`); decodes a posterior sample
        or the mean."""
        mean, logvar = self.encode(x)
        z = mean
        if sample_posterior:
            eps = torch.randn(mean.shape, generator=generator, dtype=mean.dtype, device=mean.device)
            z = mean + torch.exp(0.5 * logvar) * eps
        return self.decode(z), mean, logvar

    @staticmethod
    def occupied_voxels(logits: torch.Tensor, threshold: float = OCCUPANCY_THRESHOLD,
                        dtype: torch.dtype = OCCUPANCY_DTYPE) -> torch.Tensor:
        """``[N, 4]`` int32 ``(batch, x, y, z)`` of the voxels with ``sigmoid(logit) >= threshold`` (channel 0),
        in row-major order (z fastest), as the released pipeline lists them.

        The comparison is made as the released pipeline makes it: the sigmoid rounded to ``dtype`` (float16, the
        released VAE's dtype) against ``threshold`` rounded to ``dtype`` (fp16(0.1) = 0.09998), so a logit one
        float16 step below logit(0.1) can still count as occupied. ``dtype=torch.float32`` compares in float32."""
        prob = torch.sigmoid(logits[:, 0].float()).to(dtype)
        return torch.nonzero(prob >= torch.tensor(threshold, dtype=dtype)).to(torch.int32)


# ---------------------------------------------------------------------------------------------------------------
# dense DiT


@dataclass(frozen=True)
class DenseDiTConfig:
    """Sizes of :class:`DenseDiT` (field names as the released ``dense_dit`` params; ``resolution`` is the latent
    side, ``qk_rms_norm`` adds the per-head q/k normalisation of the self-attention)."""

    resolution: int = 16
    in_channels: int = 8
    out_channels: int = 8
    model_channels: int = 1024
    cond_channels: int = 1024
    num_blocks: int = 24
    num_heads: int = 16
    mlp_ratio: float = 4.0
    qk_rms_norm: bool = True
    use_checkpoint: bool = False

    def __post_init__(self):
        for name in ("resolution", "in_channels", "out_channels", "model_channels", "cond_channels", "num_heads"):
            _positive_int(name, getattr(self, name))
        if not isinstance(self.num_blocks, int) or self.num_blocks < 0:
            raise ValueError(f"num_blocks must be a non-negative int, got {self.num_blocks!r}")
        if self.model_channels % self.num_heads:
            raise ValueError(f"num_heads ({self.num_heads}) must divide model_channels ({self.model_channels})")
        if self.mlp_ratio <= 0:
            raise ValueError(f"mlp_ratio must be positive, got {self.mlp_ratio!r}")

    @property
    def head_dim(self) -> int:
        return self.model_channels // self.num_heads

    @property
    def num_tokens(self) -> int:
        return self.resolution**3

    def replace(self, **overrides) -> "DenseDiTConfig":
        return dataclasses.replace(self, **overrides)

    @classmethod
    def released(cls, **overrides) -> "DenseDiTConfig":
        """The released ``dense_dit`` (RELEASED_MODEL.md A.1): 16^3 x 8 latents, width 1024, 24 blocks, 16 heads."""
        return cls(**overrides)

    @classmethod
    def tiny(cls, **overrides) -> "DenseDiTConfig":
        """A small DiT for tests: 4^3 x 2 latents (the tiny dense VAE's), width 32, 2 blocks, 2 heads."""
        sizes = dict(resolution=4, in_channels=2, out_channels=2, model_channels=32, cond_channels=16, num_blocks=2,
                     num_heads=2, mlp_ratio=2.0)
        return cls(**{**sizes, **overrides})


class MultiHeadRMSNorm(nn.Module):
    """Per-head ``normalize(x) * gamma * sqrt(D)`` (float32) on ``[..., H, D]``; parameter ``gamma [H, D]``. On CUDA
    without autograd (fp16/bf16/fp32) one Triton kernel computes it (:func:`model.nets.fused.head_rms_norm`: the
    same float32 formula, one rounding) and returns a contiguous tensor; :attr:`fused` = False keeps the PyTorch
    expression everywhere."""

    #: Use :func:`model.nets.fused.head_rms_norm` on CUDA without autograd (class docstring).
    fused: bool = True

    def __init__(self, num_heads: int, head_dim: int):
        super().__init__()
        self.scale = math.sqrt(head_dim)
        self.gamma = nn.Parameter(torch.ones(num_heads, head_dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if (self.fused and x.is_cuda and x.dtype in FUSED_DTYPES and x.stride(-1) == 1
                and not torch.is_grad_enabled()):
            return head_rms_norm(x, self.gamma, self.scale)
        cdt = torch.promote_types(x.dtype, torch.float32)
        return (F.normalize(x.to(cdt), dim=-1) * self.gamma.to(cdt) * self.scale).to(x.dtype)


class DenseSelfAttention(nn.Module):
    """Multi-head self-attention ``[B, N, C] -> [B, N, C]``: ``to_qkv`` (q|k|v, head-major), optional
    ``q_rms_norm``/``k_rms_norm``, ``to_out``."""

    def __init__(self, channels: int, num_heads: int, qk_rms_norm: bool = True):
        super().__init__()
        self.num_heads, self.head_dim = num_heads, channels // num_heads
        self.to_qkv = nn.Linear(channels, 3 * channels)
        if qk_rms_norm:
            self.q_rms_norm = MultiHeadRMSNorm(num_heads, self.head_dim)
            self.k_rms_norm = MultiHeadRMSNorm(num_heads, self.head_dim)
        self.qk_rms_norm = qk_rms_norm
        self.to_out = nn.Linear(channels, channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        q, k, v = self.to_qkv(x).view(b, n, 3, self.num_heads, self.head_dim).unbind(2)
        if self.qk_rms_norm:
            q, k = self.q_rms_norm(q), self.k_rms_norm(k)
        if q.dtype != v.dtype:
            q, k = q.to(v.dtype), k.to(v.dtype)
        o = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
        return self.to_out(o.transpose(1, 2).reshape(b, n, c))


class DenseCrossAttention(nn.Module):
    """Cross-attention ``[B, N, C]`` to ``context [B, L, Cc]``: ``to_q``, ``to_kv`` (keys then values),
    ``to_out``, all with bias; ``mask [B, L]`` bool (True = real token) or None."""

    def __init__(self, channels: int, cond_channels: int, num_heads: int):
        super().__init__()
        self.num_heads, self.head_dim = num_heads, channels // num_heads
        self.to_q = nn.Linear(channels, channels)
        self.to_kv = nn.Linear(cond_channels, 2 * channels)
        self.to_out = nn.Linear(channels, channels)

    def forward(self, x: torch.Tensor, context: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        b, n, c = x.shape
        length = context.shape[1]
        q = self.to_q(x).view(b, n, self.num_heads, self.head_dim).transpose(1, 2)
        k, v = self.to_kv(context).view(b, length, 2, self.num_heads, self.head_dim).unbind(2)
        attn_mask = None if mask is None else mask[:, None, None, :]
        o = F.scaled_dot_product_attention(q, k.transpose(1, 2).to(q.dtype), v.transpose(1, 2).to(q.dtype),
                                           attn_mask=attn_mask)
        return self.to_out(o.transpose(1, 2).reshape(b, n, c))

    def null_output(self) -> torch.Tensor:
        """``[C]``: the output for an all-zero condition (every key is the key bias: uniform weights, the value
        bias attended), as :meth:`model.nets.dit.CrossAttention.null_output`."""
        return self.to_out(self.to_kv.bias[self.to_q.out_features:])


class DenseDiTBlock(nn.Module):
    """One block: ``norm1``/``norm3`` (no parameters), ``self_attn``, ``norm2``, ``cross_attn``, ``mlp.mlp.{0,2}``,
    ``adaLN_modulation.1``; ``forward(h [B, N, C], t_emb [B, C], context, mask) -> [B, N, C]``."""

    def __init__(self, config: DenseDiTConfig):
        super().__init__()
        c = config.model_channels
        self.norm1 = FP32LayerNorm(c, eps=BLOCK_NORM_EPS, elementwise_affine=False)
        self.self_attn = DenseSelfAttention(c, config.num_heads, config.qk_rms_norm)
        self.norm2 = FP32LayerNorm(c, eps=BLOCK_NORM_EPS, elementwise_affine=True)
        self.cross_attn = DenseCrossAttention(c, config.cond_channels, config.num_heads)
        self.norm3 = FP32LayerNorm(c, eps=BLOCK_NORM_EPS, elementwise_affine=False)
        self.mlp = FeedForward(c, config.mlp_ratio)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(c, 6 * c))

    def forward(self, h: torch.Tensor, t_emb: torch.Tensor, context: torch.Tensor,
                mask: torch.Tensor | None, null_from: int | None = None) -> torch.Tensor:
        """``null_from``: batch elements from this index on have an all-zero condition: they add
        :meth:`DenseCrossAttention.null_output` instead of attending (None: every element attends)."""
        shift_a, scale_a, gate_a, shift_m, scale_m, gate_m = self.adaLN_modulation(t_emb).unsqueeze(1).chunk(6, -1)
        h = torch.addcmul(h, gate_a, self.self_attn(_norm_modulate(self.norm1, h, shift_a, scale_a)))
        if null_from is None:
            h = h + self.cross_attn(_norm_modulate(self.norm2, h), context, mask)
        else:
            head = h[:null_from]
            attended = self.cross_attn(_norm_modulate(self.norm2, head), context[:null_from],
                                       None if mask is None else mask[:null_from])
            h = torch.cat([head + attended, h[null_from:] + self.cross_attn.null_output().to(h.dtype)])
        return torch.addcmul(h, gate_m, self.mlp(_norm_modulate(self.norm3, h, shift_m, scale_m)))


def _norm_modulate(norm: nn.Module, h: torch.Tensor, shift: torch.Tensor | None = None,
                   scale: torch.Tensor | None = None) -> torch.Tensor:
    """:func:`model.nets.fused.norm_modulate` on ``h [B, N, C]`` with per-element ``shift, scale [B, 1, C]``."""
    b, n, c = h.shape
    if shift is None:
        return norm_modulate(norm, h.reshape(b * n, c)).view(b, n, c)
    if b == 1:
        return norm_modulate(norm, h.reshape(n, c), shift.reshape(1, c), scale.reshape(1, c)).view(b, n, c)
    batch_index = torch.arange(b, device=h.device).repeat_interleave(n)
    return norm_modulate(norm, h.reshape(b * n, c), shift.reshape(b, c), scale.reshape(b, c),
                         batch_index).view(b, n, c)


def dense_position_embedding(resolution: int, channels: int, device=None) -> torch.Tensor:
    """``[R^3, channels]`` sin-cos embedding of the integer grid positions in x-major order (z fastest)."""
    r = torch.arange(resolution, device=device)
    grid = torch.stack(torch.meshgrid(r, r, r, indexing="ij"), dim=-1).reshape(-1, 3)
    return sincos_position_embedding(grid, channels)


class DenseDiT(nn.Module):
    """The dense DiT (module docstring). ``forward(x [B, C_in, R, R, R], t, cond) -> [B, C_out, R, R, R]``:
    ``t`` the raw 0..1000 timestep (scalar, ``[1]`` or ``[B]``), ``cond`` image tokens ``[B or 1, L, Cc]`` or a
    :class:`~model.nets.dit.Condition` (its mask is honoured; positions are not used: the dense DiT never uses sparse
    conditions)."""

    def __init__(self, config: DenseDiTConfig | None = None):
        super().__init__()
        self.config = config = config or DenseDiTConfig()
        c = config.model_channels
        self.register_buffer("pos_emb", dense_position_embedding(config.resolution, c), persistent=True)
        self.t_embedder = TimestepEmbedder(c)
        self.input_layer = nn.Linear(config.in_channels, c)
        self.blocks = nn.ModuleList(DenseDiTBlock(config) for _ in range(config.num_blocks))
        self.out_layer = nn.Linear(c, config.out_channels)
        self.initialize_weights()

    def initialize_weights(self) -> None:
        """As :meth:`model.nets.dit.SparseDiT.initialize_weights`: Xavier linears, zero adaLN and output layer."""
        if self.out_layer.weight.device.type == "meta":
            return
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                nn.init.zeros_(module.bias)
        for layer in (self.t_embedder.mlp[0], self.t_embedder.mlp[2]):
            nn.init.normal_(layer.weight, std=0.02)
        for block in self.blocks:
            nn.init.zeros_(block.adaLN_modulation[-1].weight)
            nn.init.zeros_(block.adaLN_modulation[-1].bias)
        nn.init.zeros_(self.out_layer.weight)
        nn.init.zeros_(self.out_layer.bias)

    def forward(self, x: torch.Tensor, t, cond, *, null_from: int | None = None) -> torch.Tensor:
        """``null_from``: batch elements from this index on carry an all-zero condition (their cross-attention is
        the constant :meth:`DenseCrossAttention.null_output`; :meth:`guided_velocity`). A ``Condition`` marked
        ``null`` does the same for every element; both only when no gradient is recorded."""
        cfg = self.config
        r = cfg.resolution
        if x.dim() != 5 or tuple(x.shape[1:]) != (cfg.in_channels, r, r, r):
            raise ValueError(f"x must be [B, {cfg.in_channels}, {r}, {r}, {r}], got {tuple(x.shape)}")
        b = x.shape[0]
        t = torch.as_tensor(t, device=x.device).reshape(-1)
        if t.shape[0] not in (1, b):
            raise ValueError(f"t must be a scalar or have {b} entries, got {tuple(t.shape)}")
        cond = cond if isinstance(cond, Condition) else Condition(cond)
        context, mask = cond.tokens, cond.mask
        if context.shape[-1] != cfg.cond_channels:
            raise ValueError(f"cond has {context.shape[-1]} channels but the DiT expects {cfg.cond_channels}")
        if context.shape[0] not in (1, b):
            raise ValueError(f"cond has batch size {context.shape[0]} but x has {b}")
        context = context.expand(b, -1, -1)
        mask = None if mask is None or bool(mask.all()) else mask.expand(b, -1)
        if torch.is_grad_enabled():
            null_from = None
        elif cond.null:
            null_from = 0
        h = self.input_layer(x.flatten(2).transpose(1, 2))
        h = h + self.pos_emb.to(h.dtype)
        t_emb = self.t_embedder(t.expand(b))
        for block in self.blocks:
            if cfg.use_checkpoint and torch.is_grad_enabled():
                h = checkpoint(block, h, t_emb, context.to(h.dtype), mask,
                                                      use_reentrant=False)
            else:
                h = block(h, t_emb, context.to(h.dtype), mask, null_from)
        cdt = torch.promote_types(h.dtype, torch.float32)
        with torch.autocast(device_type=h.device.type, enabled=False):
            h = F.layer_norm(h.to(cdt), (h.shape[-1],), eps=FINAL_NORM_EPS).to(h.dtype)
        out = self.out_layer(h)  # [B, R^3, C_out]
        return out.transpose(1, 2).reshape(b, cfg.out_channels, r, r, r)

    @torch.no_grad()
    def guided_velocity(self, x: torch.Tensor, t, cond, guidance: float) -> torch.Tensor:
        """Classifier-free guidance ``v_u + guidance * (v_c - v_u)`` against the zeroed condition, as one forward
        over ``[x; x]`` whose second half skips the cross-attention (:meth:`forward`'s ``null_from``). ``x [B, C,
        R, R, R]`` -> float32 ``[B, C, R, R, R]``."""
        cond = cond if isinstance(cond, Condition) else Condition(cond)
        b = x.shape[0]
        tokens = cond.tokens.expand(b, -1, -1)
        mask = None if cond.mask is None else cond.mask.expand(b, -1)
        pair = Condition(torch.cat([tokens, tokens]), None if mask is None else torch.cat([mask, mask]))
        t = torch.as_tensor(t, device=x.device).reshape(-1)
        t = (t.expand(b) if t.shape[0] == 1 else t).repeat(2)
        v = self(torch.cat([x, x]), t, pair, null_from=b).float()
        v_c, v_u = v[:b], v[b:]
        return v_u + guidance * (v_c - v_u)


#: Eager guided steps run before the first CUDA graph capture for new inputs.
GRAPH_WARMUP_STEPS = 2

#: Inputs ``(device, dtype, latent shape, condition shape)`` a dense DiT has already run a guided step on in this
#: process (eager or captured): a CUDA graph capture for them needs no warm-up steps first (Triton kernels compiled,
#: library handles and attention plans made), which saves a warm process (a second image) two eager steps.
_WARM_INPUTS: set[tuple] = set()


def _warm_key(latent: torch.Tensor, cond) -> tuple:
    tokens = cond.tokens if isinstance(cond, Condition) else cond
    return latent.device, latent.dtype, tuple(latent.shape), tuple(tokens.shape), tokens.dtype


class DenseTokenVelocity(nn.Module):
    """The dense DiT seen by :func:`model.flow.euler_sample` (the cascade's dense stage): the ``[C, R, R, R]``
    latent as ``R^3`` tokens in raster order (x-major, z fastest), ``feats [R^3, C]``; guided steps as one batched
    forward, optionally replayed from a CUDA graph (:meth:`guided_velocity`)."""

    def __init__(self, dit: nn.Module, *, cuda_graph: bool = False):
        super().__init__()
        self.dit = dit
        self.cuda_graph = cuda_graph
        self._graph = None

    def forward(self, x: SparseTensor, t, cond) -> SparseTensor:
        r, ch = self.dit.config.resolution, x.num_channels
        v = self.dit(x.feats.t().reshape(1, ch, r, r, r), t, cond)
        return x.replace(v.reshape(ch, -1).t())

    @torch.no_grad()
    def guided_velocity(self, x: SparseTensor, t, cond, guidance: float, *, batched: bool = True) -> SparseTensor:
        """The guided velocity as one batched forward (:meth:`model.nets.dense.DenseDiT.guided_velocity`), replayed
        from a CUDA graph when ``cuda_graph`` (every step has the same shapes: the 4,096-token forward is short
        enough for kernel launches to dominate it otherwise)."""
        r, ch = self.dit.config.resolution, x.num_channels
        latent = x.feats.t().reshape(1, ch, r, r, r)
        if self.cuda_graph and latent.is_cuda:
            v = self._replay(latent, t, cond, guidance)
        else:
            v = self.dit.guided_velocity(latent, t, cond, guidance)
            if latent.is_cuda:
                _WARM_INPUTS.add(_warm_key(latent, cond))
        return x.replace(v.reshape(ch, -1).t())

    def _replay(self, latent: torch.Tensor, t, cond, guidance: float) -> torch.Tensor:
        t = torch.as_tensor(t, device=latent.device, dtype=torch.float32).reshape(-1)
        if self._graph is None:
            static = (latent.clone(), t.clone())
            key = _warm_key(latent, cond)
            if key not in _WARM_INPUTS:
                side = torch.cuda.Stream(latent.device)
                side.wait_stream(torch.cuda.current_stream(latent.device))
                with torch.cuda.stream(side):  # warm-up outside the capture: Triton compilation, library handles
                    for _ in range(GRAPH_WARMUP_STEPS):
                        self.dit.guided_velocity(*static, cond, guidance)
                torch.cuda.current_stream(latent.device).wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                out = self.dit.guided_velocity(*static, cond, guidance)
            self._graph, self._static, self._out = graph, static, out
            _WARM_INPUTS.add(key)
        self._static[0].copy_(latent)
        self._static[1].copy_(t)
        self._graph.replay()
        return self._out.clone()
