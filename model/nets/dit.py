"""The image-conditioned sparse DiT of Direct3D-S2 on Spatial Sparse Attention (DESIGN.md 4, RELEASED_MODEL.md D).

Module structure and parameter names mirror the released ``SparseDiT`` one to one (``statedict-sparse_dit_1024.txt``,
``statedict-v1.0-sparse_dit_1024.txt``), so released weights load with strict key matching:

- ``t_embedder.mlp.{0,2}``: timestep embedding. ``t`` is the raw 0..1000 timestep (``sigma * 1000``, as the released
  sampler feeds it); 128 frequencies ``exp(-ln(10000) i / 128)``; ``[cos(t f), sin(t f)]`` (cosine half first);
  Linear(256, C), SiLU, Linear(C, C).
- ``input_layer``: Linear(in, C), plus the parameter-free sin-cos embedding of the latent coordinates times
  ``pos_factor`` (1.0 at 64^3, 0.5 at 128^3; C // 6 frequencies per axis, zero-padded).
- ``cond_proj`` (sparse conditioning, v1.0 only): Linear(Cc, Cc) on the image tokens, plus the sin-cos embedding
  (width Cc, no factor) of their positions (class/register tokens (0, 0, 1), patch tokens (column, row, 0)).
- ``blocks.{i}`` (:class:`SparseDiTBlock`):
  ``x += gate_a * self_attn(norm1(x) * (1 + scale_a) + shift_a)``; ``x += cross_attn(norm2(x), context)``;
  ``x += gate_m * mlp(norm3(x) * (1 + scale_m) + shift_m)``, with ``(shift_a, scale_a, gate_a, shift_m, scale_m,
  gate_m) = adaLN_modulation(t_emb)`` (SiLU + Linear(C, 6C)). ``norm1``/``norm3`` have no parameters (eps 1e-6),
  ``norm2`` is affine (eps 1e-6), all computed in float32. ``self_attn`` is
  :class:`~model.nets.ssa_layer.SpatialSparseAttention` with window shift 0 on even and ``window // 2`` on odd blocks
  (the first block unshifted); ``cross_attn`` has ``to_q``, ``to_kv`` (keys then values) and ``to_out``, with bias.
- final parameter-free layer norm (eps 1e-5) and ``out_layer`` Linear(C, out).

Token order: :meth:`SparseDiT.forward` accepts its tokens in **any** order. It puts them in the SSA layout order once
per coordinate set (the permutation and the sorted tensor's coordinate cache, which holds the block layout, are cached
in ``x.cache``), runs every block there, and returns the output in the caller's row order. Inputs already in layout
order (``ssa_kernels.layout_order``) skip the permutation.

Batches: several latents of different sizes are packed in one :class:`SparseTensor` (batch index in ``coords[:, 0]``).
Nothing crosses batch elements: SSA is per batch element, the modulation is per element's timestep, the
cross-attention pads the elements with a key-padding mask.

Activation checkpointing per block (``use_checkpoint``), bf16/fp16 autocast friendly (layer norms in float32,
residual stream in the input dtype or wider).
"""
from __future__ import annotations

import contextlib
import dataclasses
import math
import os
from dataclasses import dataclass, field, fields

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from ssa_kernels.layout import layout_order
from ssa_kernels.output_stash import OutputStash

from model.nets.dit_block import BLOCK_NORM_EPS, CrossAttention, CrossPlan, SparseDiTBlock, recomputing
from model.sparse.layers import AbsolutePositionEmbedder, check_pool_mode, sincos_position_embedding
from model.sparse.tensor import SparseTensor
from model.nets.ssa_layer import ATTENTION_MODES, BACKENDS, COMPRESSION_VERSIONS

__all__ = [
    "BLOCK_NORM_EPS",
    "Condition",
    "CrossAttention",
    "DiTConfig",
    "SparseDiT",
    "SparseDiTBlock",
    "TimestepEmbedder",
    "condition_positions",
    "load_dit",
    "timestep_embedding",
]

#: Epsilon of the final parameter-free layer norm (the functional default in the released code).
FINAL_NORM_EPS = 1e-5
#: Width of the sinusoidal timestep features.
TIMESTEP_FREQ_CHANNELS = 256
#: Base period of the timestep sinusoid.
TIMESTEP_MAX_PERIOD = 10000.0
#: Class + register tokens in front of the DINOv2 patch tokens.
NUM_PREFIX_TOKENS = 5


# ---------------------------------------------------------------------------------------------------------------
# configuration


@dataclass(frozen=True)
class DiTConfig:
    """Sizes and options of :class:`SparseDiT` (field names follow the released constructor where one exists).

    ``resolution``: latent grid side (64 for the 512^3 model, 128 for 1024^3); ``pos_factor``: scale of the latent
    coordinates in the position embedding (released ``factor``); ``sparse_conditions``: v1.0's sparse image
    conditioning (adds ``cond_proj``); ``use_shift``: alternate the window shift by block; ``pool_mode``: the SSA
    compression's pooling over a block's ``n`` tokens, ``"released"`` (``sum / (n + 1)``, as the published model
    computes it: every ``released_*`` preset and :mod:`model.pipeline.pretrained` loading) or ``"mean"`` (``sum / n``,
    the default for models trained here; :func:`model.sparse.layers.pool_features`).
    Runtime switches (no parameters): ``backend`` (``"kernels"``/``"reference"``), ``attention`` (``"ssa"``/
    ``"full"``, the latter a benchmark baseline), ``use_checkpoint`` (activation checkpointing per block),
    ``half_stream``: under autocast the residual stream enters the blocks in the autocast dtype and stays in it, as
    the released model's fp16 blocks carry it (RELEASED_MODEL.md D); off: float32 between the blocks. With
    checkpointing each block keeps its input for the backward pass: at 137k tokens x 1024 channels that is 281 MB
    per block in bf16 against 562 MB in float32 (6.7 GB of a 24-block training step).
    """

    resolution: int = 64
    in_channels: int = 16
    out_channels: int = 16
    model_channels: int = 1024
    cond_channels: int = 1024
    num_blocks: int = 24
    num_heads: int = 32
    num_kv_heads: int = 2
    compression_block: int = 8
    selection_block: int = 8
    topk: int = 8
    window: int = 8
    compression_version: str = "v1"
    compression_groups: int = 32
    pos_factor: float = 1.0
    sparse_conditions: bool = False
    use_shift: bool = True
    mlp_ratio: float = 4.0
    pool_mode: str = "mean"
    backend: str = "kernels"
    attention: str = "ssa"
    use_checkpoint: bool = False
    half_stream: bool = True

    def __post_init__(self):
        for name in ("resolution", "in_channels", "out_channels", "model_channels", "cond_channels", "num_heads",
                     "num_kv_heads", "compression_block", "selection_block", "topk", "window", "compression_groups"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if not isinstance(self.num_blocks, int) or self.num_blocks < 0:
            raise ValueError(f"num_blocks must be a non-negative int, got {self.num_blocks!r}")
        if self.model_channels % self.num_heads:
            raise ValueError(f"num_heads ({self.num_heads}) must divide model_channels ({self.model_channels})")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_kv_heads ({self.num_kv_heads}) must divide num_heads ({self.num_heads})")
        if self.selection_block % self.compression_block:
            raise ValueError(f"compression_block ({self.compression_block}) must divide selection_block "
                             f"({self.selection_block})")
        if self.use_shift and self.window % 2:
            raise ValueError(f"window must be even when use_shift (odd blocks shift by window // 2), got {self.window}")
        if self.compression_version not in COMPRESSION_VERSIONS:
            raise ValueError(f"compression_version must be one of {COMPRESSION_VERSIONS}, "
                             f"got {self.compression_version!r}")
        if self.backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {self.backend!r}")
        if self.attention not in ATTENTION_MODES:
            raise ValueError(f"attention must be one of {ATTENTION_MODES}, got {self.attention!r}")
        if self.mlp_ratio <= 0:
            raise ValueError(f"mlp_ratio must be positive, got {self.mlp_ratio!r}")
        check_pool_mode(self.pool_mode)

    @property
    def head_dim(self) -> int:
        return self.model_channels // self.num_heads

    def shift(self, block: int) -> int:
        """Window shift of block ``block``: 0 on even blocks, ``window // 2`` on odd ones (when ``use_shift``)."""
        return self.window // 2 if self.use_shift and block % 2 else 0

    def replace(self, **overrides) -> "DiTConfig":
        return dataclasses.replace(self, **overrides)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "DiTConfig":
        """Inverse of :meth:`to_dict`; unknown keys raise ``ValueError``."""
        if not isinstance(data, dict):
            raise TypeError(f"config must be a dict, got {type(data).__name__}")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown DiTConfig keys: {unknown}")
        return cls(**data)

    # presets ------------------------------------------------------------------------------------------------

    @classmethod
    def released_512(cls, **overrides) -> "DiTConfig":
        """v1.1 ``sparse_dit_512`` (64^3 latents, factor 1.0; RELEASED_MODEL.md A.1)."""
        return cls(**{"resolution": 64, "pos_factor": 1.0, "pool_mode": "released", **overrides})

    @classmethod
    def released_1024(cls, **overrides) -> "DiTConfig":
        """v1.1 ``sparse_dit_1024`` (128^3 latents, factor 0.5)."""
        return cls(**{"resolution": 128, "pos_factor": 0.5, "pool_mode": "released", **overrides})

    @classmethod
    def released_512_v10(cls, **overrides) -> "DiTConfig":
        """v1.0 ``sparse_dit_512``: compression v2 on 4^3 blocks, topk 32, sparse conditioning (A.2)."""
        return cls(**{"resolution": 64, "pos_factor": 1.0, "compression_block": 4, "compression_version": "v2",
                      "topk": 32, "sparse_conditions": True, "pool_mode": "released", **overrides})

    @classmethod
    def released_1024_v10(cls, **overrides) -> "DiTConfig":
        """v1.0 ``sparse_dit_1024``: compression v2 on 4^3 blocks, topk 8, sparse conditioning, factor 0.5."""
        return cls(**{"resolution": 128, "pos_factor": 0.5, "compression_block": 4, "compression_version": "v2",
                      "topk": 8, "sparse_conditions": True, "pool_mode": "released", **overrides})

    @classmethod
    def tiny(cls, **overrides) -> "DiTConfig":
        """A ~0.2M-parameter DiT for tests and CPU runs: width 64, 2 blocks, 4 query heads of 16, 2 kv heads,
        blocks 2/4, window 4, topk 2, 4 latent channels (the tiny VAE's), 32-wide condition, 16^3 latents."""
        sizes = dict(resolution=16, in_channels=4, out_channels=4, model_channels=64, cond_channels=32, num_blocks=2,
                     num_heads=4, num_kv_heads=2, compression_block=2, selection_block=4, topk=2, window=4,
                     compression_groups=8, mlp_ratio=2.0)
        return cls(**{**sizes, **overrides})

    @classmethod
    def preset(cls, name: str, **overrides) -> "DiTConfig":
        """A preset by name: ``released_512``, ``released_1024``, ``released_512_v10``, ``released_1024_v10``,
        ``tiny``."""
        presets = ("released_512", "released_1024", "released_512_v10", "released_1024_v10", "tiny")
        if name not in presets:
            raise ValueError(f"unknown DiT preset {name!r}; known: {presets}")
        return getattr(cls, name)(**overrides)


# ---------------------------------------------------------------------------------------------------------------
# the condition


@dataclass
class Condition:
    """Image tokens for cross-attention.

    ``tokens [B, L, Cc]``; ``mask [B, L]`` bool (True = real token) or None (all real); ``positions [B, L, 3]``
    (sparse conditioning: class/register tokens at (0, 0, 1), patch tokens at (column, row, 0)) or None.
    The unconditional input of classifier-free guidance is :meth:`zeros_like` (zeroed tokens, same mask and
    positions: the released sampler passes an all-zero tensor of the condition's shape). It is marked ``null``:
    with zero tokens every cross-attention key is the projection's bias, so the softmax is uniform and the
    attention output is the value bias whatever the query; :class:`SparseDiT` then adds that constant instead of
    attending (the same result up to rounding, without the ``N x L`` scores).

    ``cache``: per-condition storage the DiT fills during sampling (the condition tokens' key/value projections of
    every block, computed once per sampling run instead of once per step); never saved, not compared.
    """

    tokens: torch.Tensor
    mask: torch.Tensor | None = None
    positions: torch.Tensor | None = None
    null: bool = False
    cache: dict = field(default_factory=dict, repr=False, compare=False)

    def __post_init__(self):
        if not isinstance(self.tokens, torch.Tensor) or self.tokens.dim() != 3:
            raise ValueError("Condition.tokens must be a [B, L, C] tensor")
        b, n = self.tokens.shape[:2]
        if self.mask is not None and (not isinstance(self.mask, torch.Tensor) or self.mask.shape != (b, n)
                                      or self.mask.dtype != torch.bool):
            raise ValueError(f"Condition.mask must be a [{b}, {n}] bool tensor or None")
        if self.positions is not None and (not isinstance(self.positions, torch.Tensor)
                                           or self.positions.shape != (b, n, 3)):
            raise ValueError(f"Condition.positions must be a [{b}, {n}, 3] tensor or None")

    @property
    def batch_size(self) -> int:
        return self.tokens.shape[0]

    def zeros_like(self) -> "Condition":
        return Condition(torch.zeros_like(self.tokens), self.mask, self.positions, null=True)

    def drop(self, keep: torch.Tensor) -> "Condition":
        """Zero the tokens of the batch elements where ``keep [B]`` is False (condition dropout for CFG)."""
        keep = keep.to(device=self.tokens.device).view(-1, 1, 1)
        return Condition(self.tokens * keep.to(self.tokens.dtype), self.mask, self.positions)

    def to(self, device=None, dtype=None) -> "Condition":
        return Condition(self.tokens.to(device=device, dtype=dtype),
                         None if self.mask is None else self.mask.to(device),
                         None if self.positions is None else self.positions.to(device), null=self.null)

    def select(self, index) -> "Condition":
        """The batch elements ``index`` (int, slice, or index tensor)."""
        if isinstance(index, int):
            index = slice(index, index + 1)
        return Condition(self.tokens[index], None if self.mask is None else self.mask[index],
                         None if self.positions is None else self.positions[index], null=self.null)

    @staticmethod
    def cat(conditions) -> "Condition":
        """Concatenate along the batch, padding to the longest (the padding is masked out)."""
        conditions = list(conditions)
        if not conditions:
            raise ValueError("conditions must not be empty")
        length = max(c.tokens.shape[1] for c in conditions)
        toks, masks, poss = [], [], []
        any_mask = any(c.mask is not None for c in conditions) or len({c.tokens.shape[1] for c in conditions}) > 1
        any_pos = any(c.positions is not None for c in conditions)
        if any_pos and not all(c.positions is not None for c in conditions):
            raise ValueError("either every condition has positions or none has")
        for c in conditions:
            b, n, _ = c.tokens.shape
            pad = length - n
            toks.append(F.pad(c.tokens, (0, 0, 0, pad)))
            m = c.mask if c.mask is not None else torch.ones(b, n, dtype=torch.bool, device=c.tokens.device)
            masks.append(F.pad(m, (0, pad), value=False))
            if any_pos:
                poss.append(F.pad(c.positions, (0, 0, 0, pad)))
        return Condition(torch.cat(toks), torch.cat(masks) if any_mask else None,
                         torch.cat(poss) if any_pos else None)


def condition_positions(num_tokens: int, num_prefix: int = NUM_PREFIX_TOKENS, device=None) -> torch.Tensor:
    """Positions ``[num_tokens, 3]`` of a full DINOv2 token sequence (``num_prefix`` class/register tokens, then a
    square grid of patches in raster order): prefix (0, 0, 1), patch at row r, column c -> (c, r, 0)."""
    grid = math.isqrt(num_tokens - num_prefix)
    if grid * grid != num_tokens - num_prefix:
        raise ValueError(f"{num_tokens} tokens are not {num_prefix} prefix tokens plus a square patch grid")
    pos = torch.zeros(num_tokens, 3, dtype=torch.long, device=device)
    pos[:num_prefix, 2] = 1
    idx = torch.arange(grid * grid, device=device)
    pos[num_prefix:, 0] = idx % grid
    pos[num_prefix:, 1] = idx // grid
    return pos


# ---------------------------------------------------------------------------------------------------------------
# modules


def timestep_embedding(t: torch.Tensor, channels: int = TIMESTEP_FREQ_CHANNELS,
                       max_period: float = TIMESTEP_MAX_PERIOD) -> torch.Tensor:
    """Sinusoidal features ``[B, channels]`` of timesteps ``t [B]`` (raw 0..1000 values), float32:
    ``[cos(t f_0 .. t f_{h-1}), sin(...)]`` with ``h = channels // 2``, ``f_i = exp(-ln(max_period) i / h)``."""
    half = channels // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t.float().unsqueeze(1) * freqs.unsqueeze(0)
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=1)
    return F.pad(emb, (0, channels - 2 * half))


class TimestepEmbedder(nn.Module):
    """``t [B] -> [B, C]``: :func:`timestep_embedding` then ``mlp`` = Linear(256, C), SiLU, Linear(C, C)."""

    def __init__(self, channels: int, freq_channels: int = TIMESTEP_FREQ_CHANNELS):
        super().__init__()
        self.freq_channels = freq_channels
        self.mlp = nn.Sequential(nn.Linear(freq_channels, channels), nn.SiLU(), nn.Linear(channels, channels))

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        emb = timestep_embedding(t, self.freq_channels)
        return self.mlp(emb.to(self.mlp[0].weight.dtype) if not torch.is_autocast_enabled() else emb)


#: Switch for :meth:`SparseDiTBlock.forward_inference` (tests and reports compare it with the plain blocks).
INFERENCE_PATH = True
#: With activation checkpointing and the kernel backend, the recomputed forward of a block reuses the top-k choice of
#: its first forward (:func:`ssa_kernels.reusing_selection`: one scoring pass less per block and training step, for
#: ``N x Hkv x topk`` int32 kept per block until its backward).
REUSE_SELECTION = True
#: With activation checkpointing, the recomputed forward of a block records its MLP branch without computing it
#: (:func:`model.nets.dit_block.recomputing`).
LEAN_RECOMPUTE = True
#: With activation checkpointing, the cross-attention kernel's output and LSE of a block's first forward are kept in
#: pinned host memory and copied back for the recomputed forward instead of computed again
#: (:class:`ssa_kernels.output_stash.OutputStash`: 298 MB per block at 137k tokens in bf16, 5.6 ms each way at the
#: 55 GB/s of an H100's host link, beside the kernels). Measured on an H100 in one process: the released-size
#: training step 2,056 -> 1,986 ms at the same 17.9 GB peak (reports/dit_history.md). Off: computed twice.
STASH_CROSS_ATTENTION = True
#: With activation checkpointing and the kernel backend, the SSA op's selection-branch output and LSE are kept the
#: same way (the same stash, copied back on entry too; the selection kernel, 5.3 ms per block, runs once instead of
#: twice). Off until timed: the recomputation needs them a few milliseconds after it starts, about when their copy
#: arrives (``ssa_kernels.output_stash``).
STASH_SELECTION = False


@contextlib.contextmanager
def _entered_together(*managers):
    """One context manager entering ``managers`` in order (and leaving them in reverse)."""
    with contextlib.ExitStack() as stack:
        for m in managers:
            stack.enter_context(m)
        yield


class SparseDiT(nn.Module):
    """The sparse DiT (module docstring).

    ``forward(x, t, cond) -> SparseTensor``:

    - ``x``: SparseTensor ``[N, in_channels]`` of noisy latents (any row order; several batch elements packed);
    - ``t``: timesteps ``[B]`` (or a scalar / one-element tensor for all) in 0..1000 (``sigma * 1000``);
    - ``cond``: image tokens ``[B, L, cond_channels]`` or a :class:`Condition` (``B`` may be 1 for all).

    Returns the predicted velocity ``[N, out_channels]`` on ``x``'s coordinates, in ``x``'s row order.
    """

    def __init__(self, config: DiTConfig | None = None):
        super().__init__()
        self.config = config = config or DiTConfig()
        c = config.model_channels
        self.t_embedder = TimestepEmbedder(c)
        if config.sparse_conditions:
            self.cond_proj = nn.Linear(config.cond_channels, config.cond_channels)
        self.input_layer = nn.Linear(config.in_channels, c)
        self.pos_embedder = AbsolutePositionEmbedder(c, config.pos_factor)
        self.blocks = nn.ModuleList(SparseDiTBlock(config, i) for i in range(config.num_blocks))
        self.out_layer = nn.Linear(c, config.out_channels)
        self.initialize_weights()

    # ---------------------------------------------------------------------------------------------------------
    # setup

    def initialize_weights(self) -> None:
        """DiT initialisation: Xavier-uniform linears with zero bias, timestep MLP N(0, 0.02), zero adaLN
        modulation (every block starts as the identity on its gated branches) and a zero output layer."""
        for module in self.modules():
            if isinstance(module, nn.Linear) and module.weight.device.type != "meta":
                nn.init.xavier_uniform_(module.weight)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
        if self.out_layer.weight.device.type == "meta":
            return
        for layer in (self.t_embedder.mlp[0], self.t_embedder.mlp[2]):
            nn.init.normal_(layer.weight, std=0.02)
        for block in self.blocks:
            nn.init.zeros_(block.adaLN_modulation[-1].weight)
            nn.init.zeros_(block.adaLN_modulation[-1].bias)
        nn.init.zeros_(self.out_layer.weight)
        nn.init.zeros_(self.out_layer.bias)

    def set_mode(self, *, backend: str | None = None, attention: str | None = None,
                 use_checkpoint: bool | None = None) -> "SparseDiT":
        """Switch the SSA backend, the attention mode (``"full"``: benchmark baseline) or checkpointing in place."""
        for block in self.blocks:
            block.self_attn.set_mode(backend=backend, attention=attention)
        overrides = {k: v for k, v in (("backend", backend), ("attention", attention),
                                       ("use_checkpoint", use_checkpoint)) if v is not None}
        self.config = self.config.replace(**overrides)
        return self

    # ---------------------------------------------------------------------------------------------------------
    # forward

    def to_layout_order(self, x: SparseTensor) -> tuple[SparseTensor, torch.Tensor | None]:
        """``(x in layout order, perm or None)``: ``sorted.feats = x.feats[perm]``; None when already ordered.

        The permutation and the sorted tensor's coordinate cache are cached in ``x.cache`` (once per coordinate
        set, so every sampling step reuses the block layout).
        """
        cfg = self.config
        key = ("dit_layout_order", cfg.compression_block, cfg.selection_block)
        entry = x.cache.get(key)
        if entry is None:
            perm = layout_order(x.coords, compression_block=cfg.compression_block,
                                selection_block=cfg.selection_block)
            identity = bool((perm == torch.arange(perm.numel(), device=perm.device)).all())
            if identity:
                entry = (None, None, None)
            else:
                coords = x.coords.index_select(0, perm)
                entry = (perm, coords, {})
            x.cache[key] = entry
        perm, coords, cache = entry
        if perm is None:
            return x, None
        return SparseTensor(coords, x.feats.index_select(0, perm), batch_size=x.batch_size,
                            resolution=x.resolution, cache=cache, validate=False), perm

    def _context(self, cond, batch_size: int, device) -> tuple[torch.Tensor, torch.Tensor | None]:
        if isinstance(cond, torch.Tensor):
            cond = Condition(cond)
        if not isinstance(cond, Condition):
            raise TypeError(f"cond must be a [B, L, C] tensor or a Condition, got {type(cond).__name__}")
        tokens, mask = cond.tokens, cond.mask
        if tokens.shape[-1] != self.config.cond_channels:
            raise ValueError(f"cond has {tokens.shape[-1]} channels but the DiT expects {self.config.cond_channels}")
        if tokens.device != device:
            raise ValueError(f"cond is on {tokens.device} but x is on {device}")
        if tokens.shape[0] not in (1, batch_size):
            raise ValueError(f"cond has batch size {tokens.shape[0]} but x has {batch_size} batch elements")
        if self.config.sparse_conditions:
            pos = cond.positions
            if pos is None:
                pos = condition_positions(tokens.shape[1], device=device).unsqueeze(0).expand(tokens.shape[0], -1, -1)
            pe = sincos_position_embedding(pos.reshape(-1, 3), self.config.cond_channels)
            tokens = self.cond_proj(tokens)
            tokens = tokens + pe.view(*tokens.shape[:2], -1).to(tokens.dtype)
        if tokens.shape[0] != batch_size:
            tokens = tokens.expand(batch_size, -1, -1)
            mask = None if mask is None else mask.expand(batch_size, -1)
        if mask is not None and bool(mask.all()):
            mask = None
        return tokens, mask

    def forward(self, x: SparseTensor, t, cond, *, shared: dict | None = None) -> SparseTensor:
        """``shared``: a dict handed to both passes of one guided step (same ``x`` and ``t``) by
        :meth:`guided_velocity`: the first block's self-attention reads only ``x`` and ``t``, so the second pass
        takes the first one's output from it instead of computing it again (inference blocks only)."""
        if not isinstance(x, SparseTensor):
            raise TypeError(f"x must be a SparseTensor, got {type(x).__name__}")
        if x.num_channels != self.config.in_channels:
            raise ValueError(f"x has {x.num_channels} channels but the DiT expects {self.config.in_channels}")
        batch = x.batch_size
        t = torch.as_tensor(t, device=x.device)
        if t.dim() == 0:
            t = t.view(1)
        if t.dim() != 1 or t.shape[0] not in (1, batch):
            raise ValueError(f"t must be a scalar or have shape [{batch}], got {tuple(t.shape)}")
        # one timestep for all elements stays one row: one modulation row for every token (no batch gathers)
        xs, perm = self.to_layout_order(x)
        context, mask = self._context(cond, batch, x.device)
        cross = self._cross_plan(xs, cond)
        h = self._blocks(xs, t, context, mask, cross, shared)
        return x.replace(self._output(h, perm))

    def _blocks(self, xs: SparseTensor, t: torch.Tensor, context: torch.Tensor, mask, cross,
                shared: dict | None = None) -> torch.Tensor:
        """Input layer, position embedding and the blocks: the residual stream ``[N, C]`` in layout order."""
        h = self.input_layer(xs.feats)
        h = h + self.pos_embedder(xs)
        if self.config.half_stream and torch.is_autocast_enabled(h.device.type):
            h = h.to(torch.get_autocast_dtype(h.device.type))
        t_emb = self.t_embedder(t)
        if self._inference_path(h, t_emb):
            pending = None
            for i, block in enumerate(self.blocks):
                h, pending = block.forward_inference(xs, h, pending, t_emb, context, mask, cross,
                                                     shared=shared if i == 0 else None)
            return h if pending is None else h.add_(pending)
        for block in self.blocks:
            if self.config.use_checkpoint and torch.is_grad_enabled():
                h = checkpoint(block, xs, h, t_emb, context, mask, cross, use_reentrant=False,
                               context_fn=self._checkpoint_contexts)
            else:
                h = block(xs, h, t_emb, context, mask, cross)
        return h

    def _checkpoint_contexts(self):
        """``(forward context, recomputation context)`` of one checkpointed block: with :data:`REUSE_SELECTION`
        the recomputation reuses the forward's top-k choice (:func:`ssa_kernels.reusing_selection`); with
        :data:`LEAN_RECOMPUTE` it skips the block's last branch, whose output nobody reads
        (:func:`model.nets.dit_block.recomputing`); with :data:`STASH_CROSS_ATTENTION` it takes the cross-attention
        kernel's output from the first forward (:class:`ssa_kernels.output_stash.OutputStash`), and with
        :data:`STASH_SELECTION` the SSA op's selection-branch output."""
        forward, recompute = contextlib.nullcontext(), contextlib.nullcontext()
        if REUSE_SELECTION and self.config.backend == "kernels" and self.config.attention == "ssa":
            from ssa_kernels import reusing_selection

            forward, recompute = reusing_selection()
        if LEAN_RECOMPUTE:
            recompute = _entered_together(recompute, recomputing())
        kinds = [kind for kind, on in (("selection", STASH_SELECTION and self.config.backend == "kernels"),
                                       ("cross_attention", STASH_CROSS_ATTENTION)) if on]
        if kinds:
            keep, take = OutputStash(kinds).contexts()
            forward, recompute = _entered_together(forward, keep), _entered_together(recompute, take)
        return forward, recompute

    def _inference_path(self, h: torch.Tensor, t_emb: torch.Tensor) -> bool:
        """Whether the blocks run :meth:`SparseDiTBlock.forward_inference`: :data:`INFERENCE_PATH` on, no autograd,
        no autocast (weights and stream in one dtype), one modulation row (one timestep for every element)."""
        return (INFERENCE_PATH and not torch.is_grad_enabled() and not torch.is_autocast_enabled()
                and t_emb.shape[0] == 1 and h.dtype == self.input_layer.weight.dtype
                and h.dtype in (torch.float16, torch.bfloat16, torch.float32))

    def _output(self, h: torch.Tensor, perm: torch.Tensor | None) -> torch.Tensor:
        """Final parameter-free layer norm and ``out_layer``, rows back in the caller's order."""
        cdt = torch.promote_types(h.dtype, torch.float32)
        with torch.autocast(device_type=h.device.type, enabled=False):
            h = F.layer_norm(h.to(cdt), (h.shape[-1],), eps=FINAL_NORM_EPS).to(h.dtype)
        out = self.out_layer(h)
        if perm is not None:
            out = torch.empty_like(out).index_copy_(0, perm, out)
        return out

    def _cross_plan(self, xs: SparseTensor, cond) -> CrossPlan | None:
        """How the blocks treat the condition (:class:`CrossPlan`): None (attend everywhere, nothing kept) while
        training; during sampling the key/value projections are kept on the :class:`Condition` and an all-zero
        condition (``Condition.null``, not with v1.0's sparse conditioning, whose projected tokens are not zero)
        becomes a constant (:meth:`guided_velocity` builds the plan of a batched guided step itself)."""
        if torch.is_grad_enabled() or not isinstance(cond, Condition):
            return None
        kv = cond.cache.setdefault(("dit_cross_kv", id(self)), {})
        if cond.null and not self.config.sparse_conditions:
            return CrossPlan(rows=0, batch=0, offsets=None, kv=None, cache={})
        return CrossPlan(rows=xs.num_voxels, batch=xs.batch_size, offsets=xs.offsets, kv=kv, cache=xs.cache)

    @torch.no_grad()
    def guided_velocity(self, x: SparseTensor, t, cond, guidance: float, uncond=None, *,
                        batched: bool = True) -> SparseTensor:
        """Classifier-free guidance: ``v_u + guidance * (v_c - v_u)`` of the condition ``cond`` and ``uncond``
        (default :meth:`Condition.zeros_like`), as a SparseTensor on ``x``'s coordinates (float32 features).

        ``batched``: one forward over both (each batch element twice: conditioned, then unconditioned, sharing the
        coordinates; the doubled coordinate set and its block layout are built once and kept in ``x.cache``);
        otherwise two forwards. With a zeroed (``null``) ``uncond`` the unconditioned rows skip the cross-attention
        (see :class:`Condition`)."""
        if not isinstance(x, SparseTensor):
            raise TypeError(f"x must be a SparseTensor, got {type(x).__name__}")
        cond = cond if isinstance(cond, Condition) else Condition(cond)
        uncond = cond.zeros_like() if uncond is None else (uncond if isinstance(uncond, Condition)
                                                           else Condition(uncond))
        if not batched or not uncond.null or self.config.sparse_conditions:
            shared = {}  # the first block's self-attention, computed once for both passes
            v_c = self(x, t, cond, shared=shared).feats.float()
            v_u = self(x, t, uncond, shared=shared).feats.float()
            return x.replace(v_u + guidance * (v_c - v_u))
        batch = x.batch_size
        pair_coords, pair_cache = self._guidance_pair(x)
        pair = SparseTensor(pair_coords, torch.cat([x.feats, x.feats]), batch_size=2 * batch,
                            resolution=x.resolution, cache=pair_cache, validate=False)
        t = torch.as_tensor(t, device=x.device).reshape(-1)
        t = t if t.shape[0] == 1 else t.repeat(2)  # one timestep for all: one modulation row
        xs, perm = self.to_layout_order(pair)
        context, mask = self._context(cond, batch, x.device)
        context = torch.cat([context, context])  # the unconditioned half never reads it (null rows)
        mask = None if mask is None else torch.cat([mask, mask])
        head_offsets = xs.offsets[:batch + 1]
        kv = cond.cache.setdefault(("dit_cross_kv", id(self)), {})
        cross = CrossPlan(rows=x.num_voxels, batch=batch, offsets=head_offsets, kv=kv,
                          cache=xs.cache.setdefault("dit_guidance_head", {}))
        h = self._blocks(xs, t, context, mask, cross)
        v = self._output(h, perm).float()
        v_c, v_u = v[:x.num_voxels], v[x.num_voxels:]
        return x.replace(v_u + guidance * (v_c - v_u))

    def _guidance_pair(self, x: SparseTensor) -> tuple[torch.Tensor, dict]:
        """Coordinates of ``x`` twice (batch ``b`` and ``b + B``) and their cache, built once per coordinate set."""
        key = "dit_guidance_pair"
        if key not in x.cache:
            shifted = x.coords.clone()
            shifted[:, 0] += x.batch_size
            x.cache[key] = (torch.cat([x.coords, shifted]), {})
        return x.cache[key]


# ---------------------------------------------------------------------------------------------------------------
# loading


def load_dit(path, *, config: DiTConfig | None = None, weights: str = "ema", device="cpu", strict: bool = True,
             return_meta: bool = False):
    """A :class:`SparseDiT` (eval mode) from a checkpoint file; with ``return_meta`` also the checkpoint's metadata
    document (``{}`` for files without one).

    Accepted: a checkpoint of the DiT trainer (:func:`model.io.save_checkpoint` format; model
    weights under their names, EMA weights under ``ema.<name>``, the config in the metadata document under
    ``dit_config``; ``weights`` picks ``"ema"`` (default; the model weights when there is no EMA) or ``"model"``),
    a plain safetensors state dict with the released names (pass ``config``), or a released ``.ckpt``/``.pt`` torch
    file holding the state dict, possibly under ``"dit"`` (pass ``config``; read with ``weights_only=True``).
    ``config`` overrides the stored configuration (e.g. ``DiTConfig.released_1024()`` or a stored one with another
    ``backend``).
    """
    if weights not in ("ema", "model"):
        raise ValueError(f"weights must be 'ema' or 'model', got {weights!r}")
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"DiT checkpoint {path} does not exist")
    meta: dict = {}
    if path.endswith(".safetensors"):
        from safetensors import safe_open

        from model.io import CHECKPOINT_FORMAT, load_checkpoint

        with safe_open(path, framework="pt") as fh:
            fmt = (fh.metadata() or {}).get("format")
        if fmt == CHECKPOINT_FORMAT:
            ck = load_checkpoint(path)
            meta = ck.meta
            tensors = ck.model
        else:
            from safetensors.torch import load_file

            tensors = load_file(path)
    else:
        blob = torch.load(path, map_location="cpu", weights_only=True)
        tensors = blob.get("dit", blob) if isinstance(blob, dict) else None
        if not isinstance(tensors, dict):
            raise ValueError(f"{path}: expected a state dict (or a dict with key 'dit')")
    has_ema = any(k.startswith("ema.") for k in tensors)
    if weights == "ema" and has_ema:
        state = {k[4:]: v for k, v in tensors.items() if k.startswith("ema.")}
    else:
        state = {k: v for k, v in tensors.items() if not k.startswith("ema.")}
    if config is None and "dit_config" in meta:
        config = DiTConfig.from_dict(meta["dit_config"])
    if config is None:
        raise ValueError(f"{path} carries no DiT configuration: pass config= (e.g. DiTConfig.released_1024())")
    model = SparseDiT(config)
    model.load_state_dict(state, strict=strict)
    model = model.to(device).eval()
    return (model, meta) if return_meta else model
