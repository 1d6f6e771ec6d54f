"""The released parts of Direct3D-S2 and their configurations (RELEASED_MODEL.md A, B, G).

:data:`PARTS` names each released part (:class:`PartSpec`): the file and entry holding its state dict, the released
class (``target`` of config.yaml), our module and config class, and the two directions of the configuration mapping:
config.yaml ``params`` (the released constructor parameters) -> our dataclass config (unknown parameters are
errors, each naming the part), and our config -> ``params``. :func:`part_config` picks a part's config (an override,
config.yaml's ``ours`` fields or its ``params``, else the released sizes); :func:`config_entry` writes a part's
config.yaml entry (with ``ours`` when the released parameters cannot express our config, e.g. the tiny test sizes).

Loading and saving the weights themselves is :mod:`model.pipeline.pretrained`.
"""
from __future__ import annotations

import dataclasses
import importlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping

import torch
from torch import nn

__all__ = [
    "ALL_PARTS",
    "CONFIG_FILE",
    "DEFAULT_OPTIONS",
    "PARTS",
    "PartSpec",
    "config_entry",
    "normalise_parts",
    "part_config",
    "read_config_yaml",
]

CONFIG_FILE = "config.yaml"
#: Released sparse VAE: SDF voxels per latent voxel side (three subdivide levels).
_SPARSE_VAE_FACTOR = 8
#: Released refiners: grid side they run on, and patches per axis.
_REFINER_GRID = 512
_REFINER_PATCHES = 3


# ---------------------------------------------------------------------------------------------------------------
# configuration mapping (config.yaml params <-> our dataclass configs)


def _take(params: Mapping, known: dict[str, Any], part: str) -> dict[str, Any]:
    """``params`` completed with the ``known`` defaults; unknown keys raise ``ValueError`` naming them."""
    if not isinstance(params, Mapping):
        raise ValueError(f"{part}: params must be a mapping, got {type(params).__name__}")
    unknown = sorted(set(params) - set(known))
    if unknown:
        raise ValueError(f"{part}: config.yaml params {unknown} are not understood by this loader")
    return {**known, **params}


def _require(cond: bool, message: str) -> None:
    if not cond:
        raise ValueError(message)


def _config_from_fields(cls, values: Mapping, part: str):
    """A dataclass config from its field values (lists back to tuples); unknown fields raise."""
    if not isinstance(values, Mapping):
        raise ValueError(f"{part}: 'ours' must be a mapping, got {type(values).__name__}")
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - names)
    if unknown:
        raise ValueError(f"{part}: 'ours' has fields {unknown} that {cls.__name__} does not have")
    return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in values.items()})


def _config_fields(config) -> dict:
    return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(config).items()}


# sparse VAE ------------------------------------------------------------------------------------------------------

_SPARSE_VAE_PARAMS = dict(use_checkpoint=True, embed_dim=16, num_head_channels_encoder=64, model_channels_encoder=512,
                          num_heads_encoder=8, num_blocks_encoder=4, num_head_channels_decoder=64,
                          model_channels_decoder=512, num_heads_decoder=8, num_blocks_decoder=4, resolution=64,
                          out_channels=1, use_fp16=True, latents_scale=1.0, latents_shift=0.0, chunk_size=1)


def _sparse_vae_default(resolution: int):
    from model.nets.vae import VAEConfig

    def make(state_keys=None):
        return VAEConfig(resolution=resolution, prune="none", pool_mode="released")
    return make


def _sparse_vae_from_params(params: Mapping, part: str):
    from model.nets.vae import VAEConfig

    p = _take(params, _SPARSE_VAE_PARAMS, part)
    _require(p["model_channels_encoder"] == p["model_channels_decoder"],
             f"{part}: encoder and decoder widths differ ({p['model_channels_encoder']} vs "
             f"{p['model_channels_decoder']}); our VAE has one width")
    _require(p["num_heads_encoder"] == p["num_heads_decoder"],
             f"{part}: encoder and decoder head counts differ; our VAE has one")
    for side in ("encoder", "decoder"):
        _require(p[f"num_heads_{side}"] * p[f"num_head_channels_{side}"] == p[f"model_channels_{side}"],
                 f"{part}: num_heads_{side} x num_head_channels_{side} != model_channels_{side}")
    _require(float(p["latents_scale"]) == 1.0 and float(p["latents_shift"]) == 0.0,
             f"{part}: latents_scale/latents_shift other than 1/0 are not supported (the released ones are 1/0)")
    return VAEConfig(latent_channels=p["embed_dim"], model_channels=p["model_channels_encoder"],
                     num_heads=p["num_heads_encoder"], encoder_blocks=p["num_blocks_encoder"],
                     decoder_blocks=p["num_blocks_decoder"], resolution=p["resolution"] * _SPARSE_VAE_FACTOR,
                     out_channels=p["out_channels"], prune="none", pool_mode="released")


def _sparse_vae_params(config) -> dict:
    heads, width = config.num_heads, config.model_channels
    return dict(use_checkpoint=True, embed_dim=config.latent_channels, num_head_channels_encoder=width // heads,
                model_channels_encoder=width, num_heads_encoder=heads, num_blocks_encoder=config.encoder_blocks,
                num_head_channels_decoder=width // heads, model_channels_decoder=width, num_heads_decoder=heads,
                num_blocks_decoder=config.decoder_blocks, resolution=config.latent_resolution,
                out_channels=config.out_channels, use_fp16=True, latents_scale=1.0, latents_shift=0.0)


# sparse DiT ------------------------------------------------------------------------------------------------------

_SPARSE_DIT_PARAMS = dict(resolution=64, in_channels=16, out_channels=16, model_channels=1024, cond_channels=1024,
                          num_blocks=24, num_heads=32, num_kv_heads=2, compression_block_size=8,
                          selection_block_size=8, topk=8, compression_version="v1", pe_mode="ape", factor=1.0,
                          sparse_conditions=False, qk_rms_norm=True, use_shift=True, use_checkpoint=True,
                          use_fp16=True, window_size=8, mlp_ratio=4)


def _sparse_dit_default(resolution: int):
    from model.nets.dit import DiTConfig

    def make(state_keys=None):
        v10 = state_keys is not None and "cond_proj.weight" in state_keys
        if resolution == 64:
            return DiTConfig.released_512_v10() if v10 else DiTConfig.released_512()
        return DiTConfig.released_1024_v10() if v10 else DiTConfig.released_1024()
    return make


def _sparse_dit_from_params(params: Mapping, part: str):
    from model.nets.dit import DiTConfig

    p = _take(params, _SPARSE_DIT_PARAMS, part)
    _require(p["pe_mode"] == "ape", f"{part}: pe_mode {p['pe_mode']!r} is not supported (released: 'ape')")
    # qk_rms_norm has no effect in the released sparse DiT (RELEASED_MODEL.md F); use_checkpoint/use_fp16 are runtime
    return DiTConfig(resolution=p["resolution"], in_channels=p["in_channels"], out_channels=p["out_channels"],
                     model_channels=p["model_channels"], cond_channels=p["cond_channels"], num_blocks=p["num_blocks"],
                     num_heads=p["num_heads"], num_kv_heads=p["num_kv_heads"],
                     compression_block=p["compression_block_size"], selection_block=p["selection_block_size"],
                     topk=p["topk"], window=p["window_size"], compression_version=p["compression_version"],
                     pos_factor=float(p["factor"]), sparse_conditions=bool(p["sparse_conditions"]),
                     use_shift=bool(p["use_shift"]), mlp_ratio=float(p["mlp_ratio"]), pool_mode="released")


def _sparse_dit_params(config) -> dict:
    return dict(resolution=config.resolution, in_channels=config.in_channels, out_channels=config.out_channels,
                model_channels=config.model_channels, cond_channels=config.cond_channels,
                num_blocks=config.num_blocks, num_heads=config.num_heads, num_kv_heads=config.num_kv_heads,
                compression_block_size=config.compression_block, selection_block_size=config.selection_block,
                topk=config.topk, compression_version=config.compression_version, pe_mode="ape",
                factor=float(config.pos_factor), sparse_conditions=bool(config.sparse_conditions), qk_rms_norm=True,
                use_shift=bool(config.use_shift), use_checkpoint=True, use_fp16=True, window_size=config.window,
                mlp_ratio=config.mlp_ratio)


# dense VAE / DiT -------------------------------------------------------------------------------------------------

_DENSE_VAE_PARAMS = dict(use_checkpoint=True, embed_dim=8, in_channels=1, out_channels=1,
                         model_channels_encoder=[32, 128, 512], num_res_blocks_encoder=2,
                         num_res_blocks_middle_encoder=2, model_channels_decoder=[512, 128, 64],
                         num_res_blocks_decoder=4, num_res_blocks_middle_decoder=4, use_fp16=True, latents_scale=1.0,
                         latents_shift=0.0)


def _dense_vae_default(state_keys=None):
    from model.nets.dense import DenseVAEConfig

    return DenseVAEConfig.released()


def _dense_vae_from_params(params: Mapping, part: str):
    from model.nets.dense import DenseVAEConfig

    p = _take(params, _DENSE_VAE_PARAMS, part)
    _require(float(p["latents_scale"]) == 1.0 and float(p["latents_shift"]) == 0.0,
             f"{part}: latents_scale/latents_shift other than 1/0 are not supported (the released ones are 1/0)")
    enc, dec = tuple(p["model_channels_encoder"]), tuple(p["model_channels_decoder"])
    # the occupancy grid: the released latent is 16^3 (dense_dit resolution) at 64^3
    return DenseVAEConfig(in_channels=p["in_channels"], out_channels=p["out_channels"], latent_channels=p["embed_dim"],
                          encoder_channels=enc, encoder_res_blocks=p["num_res_blocks_encoder"],
                          encoder_middle_blocks=p["num_res_blocks_middle_encoder"], decoder_channels=dec,
                          decoder_res_blocks=p["num_res_blocks_decoder"],
                          decoder_middle_blocks=p["num_res_blocks_middle_decoder"])


def _dense_vae_params(config) -> dict:
    return dict(use_checkpoint=True, embed_dim=config.latent_channels, in_channels=config.in_channels,
                out_channels=config.out_channels, model_channels_encoder=list(config.encoder_channels),
                num_res_blocks_encoder=config.encoder_res_blocks,
                num_res_blocks_middle_encoder=config.encoder_middle_blocks,
                model_channels_decoder=list(config.decoder_channels), num_res_blocks_decoder=config.decoder_res_blocks,
                num_res_blocks_middle_decoder=config.decoder_middle_blocks, use_fp16=True, latents_scale=1.0,
                latents_shift=0.0)


_DENSE_DIT_PARAMS = dict(resolution=16, in_channels=8, out_channels=8, model_channels=1024, cond_channels=1024,
                         num_blocks=24, num_heads=16, mlp_ratio=4, patch_size=1, pe_mode="ape", qk_rms_norm=True,
                         use_checkpoint=True, use_fp16=True, latent_shape=None)


def _dense_dit_default(state_keys=None):
    from model.nets.dense import DenseDiTConfig

    return DenseDiTConfig.released()


def _dense_dit_from_params(params: Mapping, part: str):
    from model.nets.dense import DenseDiTConfig

    p = _take(params, _DENSE_DIT_PARAMS, part)
    _require(p["patch_size"] == 1, f"{part}: patch_size {p['patch_size']} is not supported (released: 1)")
    _require(p["pe_mode"] == "ape", f"{part}: pe_mode {p['pe_mode']!r} is not supported (released: 'ape')")
    r = p["resolution"]
    if p["latent_shape"] is not None:
        _require(list(p["latent_shape"]) == [p["in_channels"], r, r, r],
                 f"{part}: latent_shape {p['latent_shape']} does not match in_channels and resolution")
    return DenseDiTConfig(resolution=r, in_channels=p["in_channels"], out_channels=p["out_channels"],
                          model_channels=p["model_channels"], cond_channels=p["cond_channels"],
                          num_blocks=p["num_blocks"], num_heads=p["num_heads"], mlp_ratio=float(p["mlp_ratio"]),
                          qk_rms_norm=bool(p["qk_rms_norm"]))


def _dense_dit_params(config) -> dict:
    r = config.resolution
    return dict(resolution=r, in_channels=config.in_channels, out_channels=config.out_channels,
                model_channels=config.model_channels, cond_channels=config.cond_channels,
                num_blocks=config.num_blocks, num_heads=config.num_heads, mlp_ratio=config.mlp_ratio, patch_size=1,
                pe_mode="ape", qk_rms_norm=bool(config.qk_rms_norm), use_checkpoint=True, use_fp16=True,
                latent_shape=[config.in_channels, r, r, r])


# refiners --------------------------------------------------------------------------------------------------------

_REFINER_PARAMS = dict(in_channels=1, out_channels=1, layers_per_block=2, layers_mid_block=2, patch_size=192,
                       use_fp16=True)


def _refiner_default(sign: bool):
    from model.nets.refiner import RefinerConfig

    def make(state_keys=None):
        return RefinerConfig.released_1024() if sign else RefinerConfig.released_512()
    return make


def _refiner_from_params(sign: bool):
    def convert(params: Mapping, part: str):
        from model.nets.refiner import RefinerConfig

        p = _take(params, {**_REFINER_PARAMS, "patch_size": 256 if sign else 192}, part)
        patch = p["patch_size"]
        _require((_REFINER_GRID - patch) % (_REFINER_PATCHES - 1) == 0,
                 f"{part}: patch_size {patch} does not tile the {_REFINER_GRID}^3 grid in "
                 f"{_REFINER_PATCHES} patches per axis")
        return RefinerConfig(in_channels=p["in_channels"], out_channels=p["out_channels"],
                             layers_per_block=p["layers_per_block"], layers_mid_block=p["layers_mid_block"],
                             patch_size=patch, patch_stride=(_REFINER_GRID - patch) // (_REFINER_PATCHES - 1),
                             pool_mode="released")
    return convert


def _refiner_params(config) -> dict:
    return dict(in_channels=config.in_channels, out_channels=config.out_channels,
                layers_per_block=config.layers_per_block, layers_mid_block=config.layers_mid_block,
                patch_size=config.patch_size, use_fp16=True)


# ---------------------------------------------------------------------------------------------------------------
# parts


def _model_attr(path: str):
    """The object ``path`` = ``"<module of model.nets>.<name>"`` (imported on first use)."""
    module, _, name = path.rpartition(".")
    return getattr(importlib.import_module(f"model.nets.{module}"), name)


def _builder(path: str) -> Callable[[Any], nn.Module]:
    """``config -> module`` for the class ``path`` (see :func:`_model_attr`), imported when first built."""
    return lambda config: _model_attr(path)(config)


def _identity(name: str) -> str:
    return name


@dataclass(frozen=True)
class PartSpec:
    """One released part: where it lives (``file``, ``entry``), the released class (``target``), how to build our
    module, and how released parameters/tensor names map to ours.

    ``rename(released_name) -> our_name`` and ``unrename`` (its inverse) are the key map; ``relayout`` /
    ``unrelayout(our_name, tensor)`` re-lay tensors whose layout differs (identity today: our modules mirror the
    released names and layouts one to one).
    """

    name: str
    file: str
    entry: str
    target: str
    config_class: str
    build: Callable[[Any], nn.Module]
    default_config: Callable[..., Any]
    from_params: Callable[[Mapping, str], Any]
    to_params: Callable[[Any], dict]
    rename: Callable[[str], str] = _identity
    unrename: Callable[[str], str] = _identity
    relayout: Callable[[str, torch.Tensor], torch.Tensor] = lambda name, t: t
    unrelayout: Callable[[str, torch.Tensor], torch.Tensor] = lambda name, t: t

    def config_cls(self):
        """The dataclass of this part's config (``config_class`` is ``"<module of model>.<class>"``)."""
        return _model_attr(self.config_class)


_TARGET = "direct3d_s2.models."
PARTS: dict[str, PartSpec] = {
    spec.name: spec for spec in [
        PartSpec("dense_vae", "model_dense.ckpt", "vae", _TARGET + "autoencoders.dense_vae.DenseShapeVAE",
                 "dense.DenseVAEConfig", _builder("dense.DenseShapeVAE"), _dense_vae_default, _dense_vae_from_params,
                 _dense_vae_params),
        PartSpec("dense_dit", "model_dense.ckpt", "dit", _TARGET + "transformers.dense_dit.DenseDiT",
                 "dense.DenseDiTConfig", _builder("dense.DenseDiT"), _dense_dit_default, _dense_dit_from_params,
                 _dense_dit_params),
        PartSpec("sparse_vae_512", "model_sparse_512.ckpt", "vae", _TARGET + "autoencoders.ss_vae.SparseSDFVAE",
                 "vae.VAEConfig", _builder("vae.SparseSDFVAE"), _sparse_vae_default(512), _sparse_vae_from_params,
                 _sparse_vae_params),
        PartSpec("sparse_dit_512", "model_sparse_512.ckpt", "dit", _TARGET + "transformers.sparse_dit.SparseDiT",
                 "dit.DiTConfig", _builder("dit.SparseDiT"), _sparse_dit_default(64), _sparse_dit_from_params,
                 _sparse_dit_params),
        PartSpec("sparse_vae_1024", "model_sparse_1024.ckpt", "vae", _TARGET + "autoencoders.ss_vae.SparseSDFVAE",
                 "vae.VAEConfig", _builder("vae.SparseSDFVAE"), _sparse_vae_default(1024), _sparse_vae_from_params,
                 _sparse_vae_params),
        PartSpec("sparse_dit_1024", "model_sparse_1024.ckpt", "dit", _TARGET + "transformers.sparse_dit.SparseDiT",
                 "dit.DiTConfig", _builder("dit.SparseDiT"), _sparse_dit_default(128), _sparse_dit_from_params,
                 _sparse_dit_params),
        PartSpec("refiner", "model_refiner.ckpt", "refiner", _TARGET + "refiner.unet_refiner.Voxel_RefinerXL",
                 "refiner.RefinerConfig", _builder("refiner.VoxelRefiner"), _refiner_default(False),
                 _refiner_from_params(False), _refiner_params),
        PartSpec("refiner_1024", "model_refiner_1024.ckpt", "refiner",
                 _TARGET + "refiner.unet_refiner.Voxel_RefinerXL_sign", "refiner.RefinerConfig",
                 _builder("refiner.SignRefiner"), _refiner_default(True), _refiner_from_params(True), _refiner_params),
    ]
}
ALL_PARTS = tuple(PARTS)
#: Runtime options of a part read from config.yaml that are not part of our config: ``chunk_size`` of the VAEs.
DEFAULT_OPTIONS = {"sparse_vae_1024": {"chunk_size": 4}}


def normalise_parts(parts) -> tuple[str, ...]:
    """``parts`` (None for all, one name, or several) as a tuple of known part names without repeats, in order;
    ``ValueError`` naming unknown parts or an empty selection."""
    if parts is None:
        return ALL_PARTS
    if isinstance(parts, str):
        parts = (parts,)
    parts = tuple(dict.fromkeys(parts))
    unknown = [p for p in parts if p not in PARTS]
    if unknown:
        raise ValueError(f"unknown part(s) {unknown}; known: {list(ALL_PARTS)}")
    if not parts:
        raise ValueError("parts must name at least one part")
    return parts


# ---------------------------------------------------------------------------------------------------------------
# config.yaml


def read_config_yaml(root: Path, problems: list[str]) -> dict:
    """The parts mapping of ``root/config.yaml`` (``{}`` without the file); problems are appended to ``problems``."""
    path = root / CONFIG_FILE
    if not path.is_file():
        return {}
    import yaml

    try:
        doc = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        problems.append(f"{CONFIG_FILE}: not valid YAML ({exc})")
        return {}
    if doc is None:
        return {}
    if not isinstance(doc, dict):
        problems.append(f"{CONFIG_FILE}: expected a mapping of parts, got {type(doc).__name__}")
        return {}
    return doc


def part_config(spec: PartSpec, doc: Mapping, state_keys, override) -> tuple[Any, dict]:
    """``(config, options)`` of one part: the override, else config.yaml's ``ours`` or ``params``, else the
    released defaults. ``ValueError`` naming the part for entries we cannot map."""
    options = dict(DEFAULT_OPTIONS.get(spec.name, {}))
    entry = doc.get(spec.name)
    if entry is not None:
        if not isinstance(entry, Mapping):
            raise ValueError(f"{CONFIG_FILE}: entry {spec.name!r} must be a mapping with target and params")
        target = entry.get("target")
        expected_cls = spec.target.rsplit(".", 1)[1]
        if target is not None and str(target).strip().rsplit(".", 1)[-1] != expected_cls:
            raise ValueError(f"{CONFIG_FILE}: {spec.name}.target is {target!r}, expected a {expected_cls}")
        params = entry.get("params") or {}
        if isinstance(params, Mapping) and "chunk_size" in params:
            options["chunk_size"] = int(params["chunk_size"])
    if override is not None:
        cls = spec.config_cls()
        if not isinstance(override, cls):
            raise ValueError(f"configs[{spec.name!r}] must be a {cls.__name__}, got {type(override).__name__}")
        return override, options
    if entry is None:
        return spec.default_config(state_keys), options
    if "ours" in entry:
        return _config_from_fields(spec.config_cls(), entry["ours"], spec.name), options
    return spec.from_params(params, spec.name), options


def config_entry(part: str, config) -> dict:
    """The config.yaml entry of ``part`` with our ``config``: ``target``, ``params`` and, when the released parameters
    do not determine our config, ``ours`` (its fields)."""
    spec = PARTS[part]
    params = {**spec.to_params(config), **DEFAULT_OPTIONS.get(part, {})}
    entry = {"target": spec.target, "params": params}
    try:
        same = spec.from_params(params, part) == config
    except ValueError:
        same = False
    if not same:
        entry["ours"] = _config_fields(config)
    return entry
