"""Input images of the cascade: an RGBA image whose alpha is the object mask, from an RGBA image or from an RGB image
on a uniform background (:func:`load_rgba`).

Files are opened by :func:`model.nets.conditioning.open_image`, the library's one image opener (the encoder's
preprocessing, :func:`model.nets.conditioning.load_image`, uses it too).
"""
from __future__ import annotations

import numpy as np

__all__ = ["BACKGROUND_TOLERANCE", "MIN_BORDER_SHARE", "load_rgba"]

#: Largest per-channel difference (0..255) from the border's median colour still counted as background.
BACKGROUND_TOLERANCE = 12
#: Share of border pixels that must be background-coloured for an RGB image to count as "uniform background".
MIN_BORDER_SHARE = 0.9


def _mask_from_background(rgb: np.ndarray, tolerance: int, name: str) -> np.ndarray:
    """Alpha ``[H, W]`` uint8 of an RGB image on a uniform background (see :func:`load_rgba`)."""
    from scipy import ndimage

    h, w, _ = rgb.shape
    if h < 3 or w < 3:
        raise ValueError(f"{name}: image of {w}x{h} pixels is too small")
    border = np.concatenate([rgb[0], rgb[-1], rgb[1:-1, 0], rgb[1:-1, -1]]).astype(np.int16)
    background = np.median(border, axis=0)
    close_border = np.abs(border - background).max(1) <= tolerance
    share = float(close_border.mean())
    if share < MIN_BORDER_SHARE:
        colour = tuple(int(c) for c in background)
        raise ValueError(
            f"{name}: RGB image without a uniform background: only {100 * share:.0f}% of its border pixels lie "
            f"within {tolerance} of the border's median colour {colour} (need {100 * MIN_BORDER_SHARE:.0f}%); give "
            "an RGBA image whose alpha is the object mask")
    close = np.abs(rgb.astype(np.int16) - background).max(2) <= tolerance
    labels, _ = ndimage.label(close)  # 4-connected regions of background-coloured pixels
    edge = np.unique(np.concatenate([labels[0], labels[-1], labels[:, 0], labels[:, -1]]))
    background_mask = np.isin(labels, edge[edge > 0])
    if background_mask.all():
        raise ValueError(f"{name}: every pixel has the background colour: there is no object")
    return np.where(background_mask, 0, 255).astype(np.uint8)


def load_rgba(image, *, tolerance: int = BACKGROUND_TOLERANCE, name: str = "image"):
    """An RGBA ``PIL.Image`` whose alpha is the object mask.

    ``image``: a path, a ``PIL.Image`` or a uint8 array ``[H, W, 3|4]``. RGBA (and palette images with
    transparency) keep their alpha, as released. RGB (also RGBA without any transparent pixel, and palette images
    without transparency) must show the object on a uniform background: the background colour is the per-channel
    median of the border pixels (at least :data:`MIN_BORDER_SHARE` of them within ``tolerance`` of it), and the
    background is every pixel within ``tolerance`` of that colour that is 4-connected to the border (a flood fill
    from the border, so object pixels of the background colour stay object). The released pipeline runs the
    BiRefNet background remover on RGB input; no machine here has its weights.

    Raises ``ValueError`` (message starting with ``name``) for a missing or unreadable file, a grayscale or other
    unsupported mode, a non-uniform background or an empty object, ``TypeError`` for other argument types.
    """
    if isinstance(tolerance, bool) or not isinstance(tolerance, int) or not 0 <= tolerance <= 255:
        raise ValueError(f"tolerance must be an int in [0, 255], got {tolerance!r}")
    from model.nets.conditioning import open_image  # looked up per call: the one image opener

    img = open_image(image, name)
    mode = img.mode
    if mode == "P":
        img = img.convert("RGBA" if "transparency" in img.info else "RGB")
    elif mode in ("L", "LA", "1", "I", "I;16", "I;16B", "I;16L", "F", "La"):
        raise ValueError(f"{name}: grayscale image (mode {mode}) is not supported: give an RGBA image (alpha = "
                         "object mask) or an RGB image on a uniform background")
    elif mode not in ("RGB", "RGBA"):
        raise ValueError(f"{name}: unsupported image mode {mode!r}: give an RGBA image (alpha = object mask) or an RGB "
                         "image on a uniform background")
    if img.mode == "RGBA":
        alpha = np.asarray(img.getchannel("A"))
        if (alpha < 255).any():
            if not (alpha > 0).any():
                raise ValueError(f"{name}: the alpha channel is 0 everywhere: there is no object")
            return img
        img = img.convert("RGB")
    rgb = np.asarray(img)
    alpha = _mask_from_background(rgb, tolerance, name)
    from PIL import Image

    return Image.fromarray(np.dstack([rgb, alpha]), "RGBA")
