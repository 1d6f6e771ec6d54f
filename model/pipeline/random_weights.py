"""Random weights for every part of the cascade, for smoke tests and timing (the output is noise).

Two sizes, :data:`RANDOM_SIZES`, named in the weights argument as ``"random:<size>"`` (:data:`RANDOM_WEIGHTS`;
:meth:`model.pipeline.cascade.ImageToMesh.from_pretrained` and ``python -m model.cli.generate --weights`` take them):

- ``"tiny"``: a few hundred thousand parameters (8^3 / 16^3 latent grids, 32^3 / 64^3 SDF grids, a 56 px encoder):
  the whole cascade runs on a CPU in seconds. Its cascade settings (:data:`RANDOM_CONFIG`) keep the released
  proportions and extract at the fields' medians, so every stage has a surface.
- ``"released"``: the released sizes, ViT-L/14 encoder included (~2.5 B parameters), with the released settings:
  for GPU timing.

:func:`random_parts` builds them (seeded); zero-initialised layers (adaLN, output layers) get small random values so
that random-weight runs do not degenerate (zero velocity, constant outputs).
"""
from __future__ import annotations

import warnings

import torch
from torch import nn

__all__ = ["RANDOM_CONFIG", "RANDOM_PREFIX", "RANDOM_SIZES", "RANDOM_WEIGHTS", "random_parts", "random_size"]

#: Sizes of random weights.
RANDOM_SIZES = ("tiny", "released")
#: Prefix of a weights argument that asks for random weights.
RANDOM_PREFIX = "random:"
#: Weights arguments that build random weights, and their size.
RANDOM_WEIGHTS = {RANDOM_PREFIX + size: size for size in RANDOM_SIZES}
#: Cascade settings (:class:`model.pipeline.cascade.CascadeConfig` fields) of each size where they differ from the
#: released ones. Tiny keeps the released proportions (the token band is half a latent cell, the chunks cover 8
#: cells) and extracts at the medians (random fields have no meaningful level).
RANDOM_CONFIG = {
    "tiny": dict(token_band=2.0, decode_chunks_512=1, decode_chunks_1024=2, level_512="median",
                 level_1024="median"),
    "released": {},
}
#: Standard deviation of the values given to zero-initialised parameters.
_ZERO_INIT_STD = 0.02


def random_size(weights) -> str | None:
    """The size of a ``"random:<size>"`` weights argument; None for anything else (a folder, a hub id, a path).

    Raises ``ValueError`` listing the valid choices for ``"random:"`` followed by an unknown size.
    """
    if not isinstance(weights, str) or not weights.startswith(RANDOM_PREFIX):
        return None
    if weights not in RANDOM_WEIGHTS:
        raise ValueError(f"weights {weights!r}: unknown random size; valid choices: {', '.join(RANDOM_WEIGHTS)}")
    return RANDOM_WEIGHTS[weights]


def _part_configs(size: str) -> tuple[dict, object]:
    """``({part: config}, encoder config)`` of a size."""
    from model.nets.conditioning import dinov2_vitl14_reg_config, tiny_dinov2_config
    from model.nets.dense import DenseDiTConfig, DenseVAEConfig
    from model.nets.dit import DiTConfig
    from model.nets.refiner import RefinerConfig
    from model.nets.vae import VAEConfig

    if size == "tiny":
        tiny_refiner = dict(resolution=32, patch_size=16, patch_stride=8)
        return {
            "dense_vae": DenseVAEConfig.tiny(resolution=8, encoder_channels=(4, 8), decoder_channels=(8, 4)),
            "dense_dit": DenseDiTConfig.tiny(resolution=4, cond_channels=32),
            "sparse_vae_512": VAEConfig.tiny(conv_channels=(8, 16, 16), prune="none", resolution=32),
            "sparse_dit_512": DiTConfig.tiny(resolution=8),
            "sparse_vae_1024": VAEConfig.tiny(conv_channels=(8, 16, 16), prune="none", resolution=64),
            "sparse_dit_1024": DiTConfig.tiny(resolution=16, pos_factor=0.5),
            "refiner": RefinerConfig.tiny(**tiny_refiner),
            "refiner_1024": RefinerConfig.tiny(**tiny_refiner),
        }, tiny_dinov2_config()
    return {
        "dense_vae": DenseVAEConfig.released(),
        "dense_dit": DenseDiTConfig.released(),
        "sparse_vae_512": VAEConfig.released_512(prune="none"),
        "sparse_dit_512": DiTConfig.released_512(),
        "sparse_vae_1024": VAEConfig.released_1024(prune="none"),
        "sparse_dit_1024": DiTConfig.released_1024(),
        "refiner": RefinerConfig.released_512(),
        "refiner_1024": RefinerConfig.released_1024(),
    }, dinov2_vitl14_reg_config()


def _part_classes() -> dict[str, type]:
    from model.nets.dense import DenseDiT, DenseShapeVAE
    from model.nets.dit import SparseDiT
    from model.nets.refiner import SignRefiner, VoxelRefiner
    from model.nets.vae import SparseSDFVAE

    return {"dense_vae": DenseShapeVAE, "dense_dit": DenseDiT, "sparse_vae_512": SparseSDFVAE,
            "sparse_dit_512": SparseDiT, "sparse_vae_1024": SparseSDFVAE, "sparse_dit_1024": SparseDiT,
            "refiner": VoxelRefiner, "refiner_1024": SignRefiner}


def _randomise(module: nn.Module, generator: torch.Generator, std: float = _ZERO_INIT_STD) -> None:
    """Give the parameters an initialisation leaves at zero small random values (``N(0, std^2)``)."""
    with torch.no_grad():
        for p in module.parameters():
            if p.numel() and not bool(p.any()):
                noise = torch.randn(p.shape, generator=generator) * std
                p.copy_(noise.to(p.device, p.dtype))


def random_parts(size: str, *, seed: int, device: torch.device, dtype: torch.dtype,
                 home: torch.device) -> tuple[nn.Module, dict[str, nn.Module]]:
    """``(encoder, {part: module})`` with random weights of ``size`` (one of :data:`RANDOM_SIZES`), seeded with
    ``seed``: each part is initialised on ``device`` (fast on a GPU), then cast to ``dtype`` and moved to ``home``
    (the CPU when offloading). The encoder is a seeded :meth:`~model.nets.conditioning.DinoV2Encoder.random` of the
    matching size. Leaves the global random state as it was. Does not warn: the caller says the output is noise.
    """
    from model.nets.conditioning import DinoV2Encoder

    if size not in RANDOM_SIZES:
        raise ValueError(f"size must be one of {RANDOM_SIZES}, got {size!r}")
    configs, enc_config = _part_configs(size)
    classes = _part_classes()
    parts = {}
    gen = torch.Generator().manual_seed(int(seed))
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(int(seed))
        if device.type == "cuda":
            torch.cuda.manual_seed(int(seed))
        for name, cfg in configs.items():
            with device:  # initialised where it runs, then cast and sent home one by one
                module = classes[name](cfg)
            _randomise(module, gen)
            parts[name] = module.to(device=home, dtype=dtype)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the caller says it once
        encoder = DinoV2Encoder.random(enc_config, seed=int(seed))
    return encoder, parts
