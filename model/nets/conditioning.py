"""Image conditioning of the sparse DiT: the released preprocessing, a DINOv2 ViT-L/14-with-registers encoder
(``transformers``), dense conditioning (all tokens; v1.1) and the paper's sparse conditioning (v1.0).

Preprocessing (RELEASED_MODEL.md A.5), :func:`preprocess_image`:

1. an RGBA image (its alpha is the object mask), or an RGB image plus a separate mask file (:func:`load_image`;
   every image file the library reads is opened by :func:`open_image`);
   anything else raises ``ValueError`` (this project has no background remover: the released pipeline runs
   BiRefNet for RGB input, which needs weights no machine here can fetch);
2. crop to the inclusive bounding box of ``alpha > 0`` (the whole image when fewer than 0.1% of pixels pass);
3. composite on white in float64 (``rgb * a + 1 - a``, ``a = alpha / 255``) and convert back to uint8 by truncation;
   the mask is ``a * 255`` truncated the same way;
4. pad to a square (top/left get the floor of half the difference; RGB with 255, mask with 0), resize to ``size``
   (518; RGB bilinear, mask nearest, PIL), pad ``border`` (16) pixels on every side, resize to ``size`` again;
5. to tensors in [0, 1]: ``rgb [3, S, S]``, ``mask [S, S]``.

Encoder, :class:`DinoV2Encoder`: ImageNet normalisation, ``Dinov2WithRegistersModel``, the last hidden state
**before** DINO's final LayerNorm (``hidden_states[-1]`` with ``output_hidden_states=True``) through a parameter-free
layer norm (eps 1e-5): ``[B, 1 + 4 + (S/14)^2, C]`` = ``[B, 1374, 1024]`` for ViT-L/14 at 518 px. (The released
encoder also applies torchvision ``Resize(518)`` + ``CenterCrop(518)``, no-ops on a preprocessed image.)
Weights come from a local folder or a hub id in the ``transformers`` format (e.g. the DINOv2-with-registers large
checkpoint); :meth:`DinoV2Encoder.random` builds random weights for tests and demonstrations and says so loudly
with a warning: its features are a fixed function of the image, not DINOv2 features.

Conditions (:class:`model.nets.dit.Condition`):

- dense (v1.1): all tokens, :func:`dense_condition`;
- sparse (v1.0, paper 4.2), :func:`sparse_condition`: the mask is max-pooled over each 14x14 patch (> 0 keeps the
  patch); the class and register tokens plus the kept patch tokens, with positions (0, 0, 1) for class/register
  tokens and (column, row, 0) for patches; the DiT's ``cond_proj`` and the sin-cos embedding of these positions are
  applied inside the DiT. Batch elements keep different numbers of tokens: padded, with a mask.
"""
from __future__ import annotations

import math
import os
import warnings
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from model.nets.dit import NUM_PREFIX_TOKENS, Condition

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "DinoV2Encoder",
    "ImageFileError",
    "MissingImageError",
    "PreprocessedImage",
    "dense_condition",
    "dinov2_vitl14_reg_config",
    "load_image",
    "open_image",
    "preprocess_image",
    "sparse_condition",
    "tiny_dinov2_config",
]

#: Output side of the released preprocessing.
IMAGE_SIZE = 518
#: White border added before the second resize.
IMAGE_BORDER = 16
#: Fraction of alpha > 0 pixels under which the crop keeps the whole image.
MIN_FOREGROUND_FRACTION = 0.001
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
#: Epsilon of the parameter-free layer norm on the DINO tokens.
FEATURE_NORM_EPS = 1e-5
#: DINOv2 patch side.
PATCH_SIZE = 14
#: PIL modes that carry an alpha channel.
_ALPHA_MODES = ("RGBA", "LA", "PA", "RGBa", "La")
#: PIL modes accepted as the colour image when a separate mask is given.
_COLOUR_MODES = ("RGB", "L", "P")


# ---------------------------------------------------------------------------------------------------------------
# images


def _pil():
    from PIL import Image

    return Image


class ImageFileError(ValueError, OSError):
    """An image file that cannot be read (not an image PIL can open). A ``ValueError`` (bad input) and an
    ``OSError`` (what PIL raises for such a file)."""


class MissingImageError(ImageFileError, FileNotFoundError):
    """An image path that names no file. Also a ``FileNotFoundError``."""


def open_image(source, name: str = "image"):
    """The ``PIL.Image`` of ``source``: the library's one opener of image files (:func:`load_image` here and
    :func:`model.pipeline.images.load_rgba` of the cascade both go through it).

    ``source``: a path (the file is opened and fully read), a ``PIL.Image`` (returned as is), or a uint8 array
    ``[H, W, 3]`` (RGB) / ``[H, W, 4]`` (RGBA). The image keeps its mode; callers convert.

    Raises :class:`MissingImageError` for a path that is no file, :class:`ImageFileError` for a file PIL cannot read,
    ``ValueError`` for an array of another dtype or shape and ``TypeError`` for other argument types; every message
    starts with ``name``.
    """
    Image = _pil()
    if isinstance(source, Image.Image):
        return source
    if isinstance(source, np.ndarray):
        if source.dtype != np.uint8 or source.ndim != 3 or source.shape[2] not in (3, 4):
            raise ValueError(f"{name}: an array must be uint8 [H, W, 3] (RGB) or [H, W, 4] (RGBA), got "
                             f"{source.dtype} {source.shape}")
        return Image.fromarray(source, "RGBA" if source.shape[2] == 4 else "RGB")
    if isinstance(source, (str, os.PathLike)):
        path = os.fspath(source)
        if not os.path.isfile(path):
            raise MissingImageError(f"{name}: file {path!r} does not exist")
        try:
            img = Image.open(path)
            img.load()
        except OSError as exc:  # PIL.UnidentifiedImageError is an OSError
            raise ImageFileError(f"{name}: {path!r} is not an image PIL can read ({exc})") from exc
        return img
    raise TypeError(f"{name} must be a path, a PIL.Image or a uint8 array [H, W, 3|4], got {type(source).__name__}")


def load_image(image, mask=None):
    """An RGBA ``PIL.Image`` from ``image`` (a path, a PIL image or a uint8 array, :func:`open_image`) and, for RGB
    input, ``mask`` (the same kinds: its luminance, or its alpha when it has one, is the object mask; same size as
    the image).

    Raises ``ValueError`` for an RGB image without a mask, an RGBA image with a mask (ambiguous), mismatched sizes or
    an unsupported image mode; ``FileNotFoundError`` for a missing file; ``TypeError`` for other argument types.
    """
    Image = _pil()
    img = open_image(image, "image")
    has_alpha = img.mode in _ALPHA_MODES or (img.mode == "P" and "transparency" in img.info)
    if has_alpha:
        if mask is not None:
            raise ValueError(f"image already has an alpha channel (mode {img.mode}); do not pass a mask as well")
        return img.convert("RGBA")
    if img.mode not in _COLOUR_MODES:
        raise ValueError(f"image has unsupported mode {img.mode!r}: give an RGBA image, or an RGB image with a mask")
    if mask is None:
        raise ValueError(
            f"image has no alpha channel (mode {img.mode}) and no mask was given: pass an RGBA image, or the object "
            "mask as a separate file (mask=...; white = object); there is no background remover here")
    m = open_image(mask, "mask")
    if m.size != img.size:
        raise ValueError(f"mask is {m.size[0]}x{m.size[1]} but the image is {img.size[0]}x{img.size[1]}")
    if m.mode in _ALPHA_MODES:
        m = m.convert("RGBA").getchannel("A")
    elif m.mode in ("1", "L", "P", "RGB", "I", "I;16", "F"):
        m = m.convert("L") if m.mode not in ("I", "I;16", "F") else Image.fromarray(
            np.clip(np.asarray(m, dtype=np.float64), 0, 255).astype(np.uint8))
    else:
        raise ValueError(f"mask has unsupported mode {m.mode!r}")
    rgba = img.convert("RGB").convert("RGBA")
    rgba.putalpha(m)
    return rgba


@dataclass
class PreprocessedImage:
    """``rgb [3, S, S]`` and ``mask [S, S]``, float32 in [0, 1] (white background outside the object)."""

    rgb: torch.Tensor
    mask: torch.Tensor


def preprocess_image(image, mask=None, *, size: int = IMAGE_SIZE, border: int = IMAGE_BORDER) -> PreprocessedImage:
    """The released preprocessing (module docstring) of ``image`` (RGBA, or RGB with ``mask``; see
    :func:`load_image`) to ``size x size``."""
    Image = _pil()
    if not isinstance(size, int) or size < 1:
        raise ValueError(f"size must be a positive int, got {size!r}")
    if not isinstance(border, int) or border < 0:
        raise ValueError(f"border must be a non-negative int, got {border!r}")
    rgba = np.asarray(load_image(image, mask))  # [H, W, 4] uint8
    alpha = rgba[..., 3]
    fg = alpha > 0
    if fg.mean() >= MIN_FOREGROUND_FRACTION:
        rows, cols = np.nonzero(fg.any(1))[0], np.nonzero(fg.any(0))[0]
        rgba = rgba[rows[0]:rows[-1] + 1, cols[0]:cols[-1] + 1]
    arr = rgba.astype(np.float64) / 255.0
    a = arr[..., 3:4]
    rgb = (arr[..., :3] * a + (1.0 - a)) * 255.0
    rgb_u8 = rgb.astype(np.uint8)  # truncation, as released
    mask_u8 = (a[..., 0] * 255.0).astype(np.uint8)
    h, w = mask_u8.shape
    side = max(h, w)
    top, left = (side - h) // 2, (side - w) // 2
    sq_rgb = np.full((side, side, 3), 255, dtype=np.uint8)
    sq_rgb[top:top + h, left:left + w] = rgb_u8
    sq_mask = np.zeros((side, side), dtype=np.uint8)
    sq_mask[top:top + h, left:left + w] = mask_u8
    img_rgb = Image.fromarray(sq_rgb, "RGB").resize((size, size), Image.Resampling.BILINEAR)
    img_mask = Image.fromarray(sq_mask, "L").resize((size, size), Image.Resampling.NEAREST)
    framed_rgb = np.pad(np.asarray(img_rgb), ((border, border), (border, border), (0, 0)), constant_values=255)
    framed_mask = np.pad(np.asarray(img_mask), ((border, border), (border, border)), constant_values=0)
    img_rgb = Image.fromarray(framed_rgb, "RGB").resize((size, size), Image.Resampling.BILINEAR)
    img_mask = Image.fromarray(framed_mask, "L").resize((size, size), Image.Resampling.NEAREST)
    rgb_t = torch.from_numpy(np.asarray(img_rgb).copy()).permute(2, 0, 1).float() / 255.0
    mask_t = torch.from_numpy(np.asarray(img_mask).copy()).float() / 255.0
    return PreprocessedImage(rgb_t, mask_t)


# ---------------------------------------------------------------------------------------------------------------
# the encoder


def dinov2_vitl14_reg_config(**overrides):
    """``Dinov2WithRegistersConfig`` of DINOv2 ViT-L/14 with 4 registers at 518 px (the released image encoder)."""
    from transformers import Dinov2WithRegistersConfig

    sizes = dict(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, mlp_ratio=4, patch_size=PATCH_SIZE,
                 image_size=IMAGE_SIZE, num_register_tokens=4, layerscale_value=1.0, layer_norm_eps=1e-6,
                 qkv_bias=True, use_swiglu_ffn=False, hidden_act="gelu")
    return Dinov2WithRegistersConfig(**{**sizes, **overrides})


def tiny_dinov2_config(**overrides):
    """A tiny ``Dinov2WithRegistersConfig`` for tests: width 32, 2 layers, 2 heads, patch 14, 56 px (4x4 patches,
    21 tokens)."""
    return dinov2_vitl14_reg_config(**{"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2,
                                       "image_size": 56, **overrides})


class DinoV2Encoder(nn.Module):
    """Frozen DINOv2-with-registers image encoder giving the released conditioning features.

    ``forward(rgb [B, 3, S, S] in [0, 1]) -> [B, 1 + R + (S / patch)^2, C]`` (layer-normalised pre-final-norm
    tokens, float32). Build with :meth:`from_pretrained` (real weights) or :meth:`random` (tests/demos only).
    """

    def __init__(self, model, *, random_weights: bool = False):
        super().__init__()
        self.model = model.eval()
        self.model.requires_grad_(False)
        self.random_weights = random_weights
        cfg = model.config
        self.image_size = int(cfg.image_size)
        self.patch_size = int(cfg.patch_size)
        self.num_prefix_tokens = 1 + int(cfg.num_register_tokens)
        self.channels = int(cfg.hidden_size)
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)

    @property
    def grid(self) -> int:
        return self.image_size // self.patch_size

    @property
    def num_tokens(self) -> int:
        return self.num_prefix_tokens + self.grid**2

    @classmethod
    def from_pretrained(cls, source, **kwargs) -> "DinoV2Encoder":
        """Load ``Dinov2WithRegistersModel`` weights from a local folder or a hub id (``transformers`` format)."""
        from transformers import Dinov2WithRegistersModel

        if not isinstance(source, (str, os.PathLike)):
            raise TypeError(f"source must be a folder or a hub id, got {type(source).__name__}")
        model = Dinov2WithRegistersModel.from_pretrained(os.fspath(source), **kwargs)
        return cls(model)

    @classmethod
    def random(cls, config=None, *, seed: int = 0) -> "DinoV2Encoder":
        """Random weights (seeded, so a fixed function of the image): for tests and demonstrations only.

        Warns loudly: the features are NOT DINOv2 features and a DiT trained on them cannot use real ones.
        """
        from transformers import Dinov2WithRegistersModel

        config = config if config is not None else dinov2_vitl14_reg_config()
        warnings.warn(
            "DinoV2Encoder.random: the image encoder has RANDOM weights (seed "
            f"{seed}); its features are a fixed function of the image but NOT DINOv2 features. Use this only for "
            "tests and demonstrations; pass real weights (a local folder or hub id) for anything else.",
            UserWarning, stacklevel=2)
        state = torch.random.get_rng_state()
        try:
            torch.manual_seed(seed)
            model = Dinov2WithRegistersModel(config)
        finally:
            torch.random.set_rng_state(state)
        return cls(model, random_weights=True)

    @classmethod
    def build(cls, weights: str | None = None, *, size: str = "vitl14", seed: int = 0) -> "DinoV2Encoder":
        """``weights`` (folder or hub id) -> :meth:`from_pretrained`; ``None`` -> :meth:`random` with the
        ``size`` preset (``"vitl14"`` or ``"tiny"``)."""
        if weights:
            return cls.from_pretrained(weights)
        if size not in ("vitl14", "tiny"):
            raise ValueError(f"size must be 'vitl14' or 'tiny', got {size!r}")
        return cls.random(dinov2_vitl14_reg_config() if size == "vitl14" else tiny_dinov2_config(), seed=seed)

    @torch.no_grad()
    def forward(self, rgb: torch.Tensor) -> torch.Tensor:
        if not isinstance(rgb, torch.Tensor) or rgb.dim() != 4 or rgb.shape[1] != 3:
            raise ValueError(f"rgb must be a [B, 3, H, W] tensor, got {getattr(rgb, 'shape', type(rgb).__name__)}")
        if rgb.shape[-2:] != (self.image_size, self.image_size):
            raise ValueError(f"rgb must be {self.image_size}x{self.image_size} (preprocess_image(size=...)), "
                             f"got {tuple(rgb.shape[-2:])}")
        x = (rgb.to(self.mean.device, torch.float32) - self.mean) / self.std
        with torch.autocast(device_type=x.device.type, enabled=False):
            out = self.model(pixel_values=x, output_hidden_states=True)
            tokens = out.hidden_states[-1].float()
            return F.layer_norm(tokens, (tokens.shape[-1],), eps=FEATURE_NORM_EPS)

    def encode_images(self, images, masks=None, *, sparse: bool = False) -> Condition:
        """Preprocess and encode a list of images (paths or PIL images; ``masks`` a list of the same length for RGB
        input, or None) into a dense (default) or sparse :class:`~model.nets.dit.Condition`."""
        if not isinstance(images, (list, tuple)):
            images = [images]
            masks = None if masks is None else [masks]
        masks = [None] * len(images) if masks is None else list(masks)
        if len(masks) != len(images):
            raise ValueError(f"masks has {len(masks)} entries but images has {len(images)}")
        pre = [preprocess_image(img, m, size=self.image_size) for img, m in zip(images, masks)]
        rgb = torch.stack([p.rgb for p in pre]).to(self.mean.device)
        tokens = self(rgb)
        if not sparse:
            return dense_condition(tokens)
        alpha = torch.stack([p.mask for p in pre]).to(tokens.device)
        return sparse_condition(tokens, alpha, patch_size=self.patch_size, num_prefix=self.num_prefix_tokens)


# ---------------------------------------------------------------------------------------------------------------
# conditions


def dense_condition(tokens: torch.Tensor) -> Condition:
    """All tokens (v1.1): ``tokens [B, T, C]`` -> :class:`~model.nets.dit.Condition` without mask."""
    if not isinstance(tokens, torch.Tensor) or tokens.dim() != 3:
        raise ValueError("tokens must be a [B, T, C] tensor")
    return Condition(tokens)


def sparse_condition(tokens: torch.Tensor, masks: torch.Tensor, *, patch_size: int = PATCH_SIZE,
                     num_prefix: int = NUM_PREFIX_TOKENS) -> Condition:
    """Sparse conditioning (v1.0, paper 4.2): keep the class + register tokens and the patch tokens whose 14x14
    patch holds any foreground (max-pooled mask > 0).

    Args:
        tokens: ``[B, num_prefix + g*g, C]`` encoder tokens (patches in raster order, row-major).
        masks: ``[B, g*patch, g*patch]`` foreground masks in [0, 1] (the preprocessed alpha).

    Returns a :class:`~model.nets.dit.Condition` padded to the longest element: ``tokens [B, L, C]``, ``mask [B, L]``,
    ``positions [B, L, 3]`` (prefix (0, 0, 1); patch at row r, column c -> (c, r, 0)).
    """
    if not isinstance(tokens, torch.Tensor) or tokens.dim() != 3:
        raise ValueError("tokens must be a [B, T, C] tensor")
    if not isinstance(masks, torch.Tensor) or masks.dim() != 3 or masks.shape[0] != tokens.shape[0]:
        raise ValueError(f"masks must be a [{tokens.shape[0]}, H, W] tensor")
    b, t, c = tokens.shape
    grid = math.isqrt(t - num_prefix)
    if grid * grid != t - num_prefix:
        raise ValueError(f"{t} tokens are not {num_prefix} prefix tokens plus a square patch grid")
    if masks.shape[1:] != (grid * patch_size, grid * patch_size):
        raise ValueError(f"masks must be {grid * patch_size}x{grid * patch_size} for a {grid}x{grid} patch grid, "
                         f"got {tuple(masks.shape[1:])}")
    keep_patch = F.max_pool2d(masks.float().unsqueeze(1), patch_size).view(b, grid * grid) > 0
    keep = torch.cat([torch.ones(b, num_prefix, dtype=torch.bool, device=tokens.device),
                      keep_patch.to(tokens.device)], dim=1)  # [B, T]
    from model.nets.dit import condition_positions

    pos_all = condition_positions(t, num_prefix, device=tokens.device)
    counts = keep.sum(1)
    length = int(counts.max())
    out_tokens = tokens.new_zeros(b, length, c)
    out_pos = torch.zeros(b, length, 3, dtype=torch.long, device=tokens.device)
    out_mask = torch.arange(length, device=tokens.device).unsqueeze(0) < counts.unsqueeze(1)
    for i in range(b):
        idx = torch.nonzero(keep[i]).squeeze(1)
        out_tokens[i, :idx.numel()] = tokens[i, idx]
        out_pos[i, :idx.numel()] = pos_all[idx]
    return Condition(out_tokens, out_mask, out_pos)
