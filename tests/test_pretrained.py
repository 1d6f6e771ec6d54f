"""Loading the released checkpoints (model/pipeline/pretrained.py, model/pipeline/released_config.py), the dense
stage and refiner modules built from RELEASED_MODEL.md (model/nets/dense.py, model/nets/refiner.py), and
``python -m model.cli.reconstruct --weights``.

No network and no released weights here: the released layout is written with random tensors (the released names and
shapes where affordable, tiny sizes with the released names otherwise), and the full-size modules are checked
against the released listings on the meta device.
"""
from __future__ import annotations

import hashlib
import json
import math
import re
from pathlib import Path

import pytest
import torch
import yaml

from model.pipeline import pretrained as P
from model.pipeline import released_config as RC
from model.nets.dense import DenseDiT, DenseDiTConfig, DenseShapeVAE, DenseVAEConfig, pixel_shuffle_3d
from model.nets.dit import Condition, DiTConfig, SparseDiT
from model.nets.refiner import (
    RefinerConfig,
    SignRefiner,
    VoxelRefiner,
    adaptive_filter,
    predict_sign,
    refine_512,
    sign_refine_1024,
)
from model.sparse.layers import sincos_position_embedding
from model.nets.vae import SparseSDFVAE, VAEConfig

#: The hub's v1.1 config.yaml (RELEASED_MODEL.md A.1, with the published ``direct3d_s2.`` targets). Entries that are
#: not checkpoint parts (schedulers, image encoders) are ignored by the loader.
RELEASED_CONFIG_V11 = """
dense_vae:
  target: direct3d_s2.models.autoencoders.dense_vae.DenseShapeVAE
  params: {use_checkpoint: true, embed_dim: 8, in_channels: 1, out_channels: 1, model_channels_encoder: [32, 128, 512],
           num_res_blocks_encoder: 2, num_res_blocks_middle_encoder: 2, model_channels_decoder: [512, 128, 64],
           num_res_blocks_decoder: 4, num_res_blocks_middle_decoder: 4, use_fp16: true, latents_scale: 1.0,
           latents_shift: 0.0}
dense_dit:
  target: direct3d_s2.models.transformers.dense_dit.DenseDiT
  params: {resolution: 16, in_channels: 8, out_channels: 8, model_channels: 1024, cond_channels: 1024,
           num_blocks: 24, num_heads: 16, mlp_ratio: 4, patch_size: 1, pe_mode: ape, qk_rms_norm: true,
           use_checkpoint: true, use_fp16: true, latent_shape: [8, 16, 16, 16]}
dense_image_encoder:
  target: direct3d_s2.models.conditioner.DinoEncoder
  params: {model: facebookresearch/dinov2, version: dinov2_vitl14_reg, size: 518}
dense_scheduler:
  target: diffusers.schedulers.FlowMatchEulerDiscreteScheduler
  params: {num_train_timesteps: 1000, shift: 6.0}
sparse_vae_512:
  target: direct3d_s2.models.autoencoders.ss_vae.SparseSDFVAE
  params: {use_checkpoint: true, embed_dim: 16, num_head_channels_encoder: 64, model_channels_encoder: 512,
           num_heads_encoder: 8, num_blocks_encoder: 4, num_head_channels_decoder: 64, model_channels_decoder: 512,
           num_heads_decoder: 8, num_blocks_decoder: 4, resolution: 64, out_channels: 1, use_fp16: true,
           latents_scale: 1.0, latents_shift: 0.0}
sparse_dit_512:
  target: direct3d_s2.models.transformers.sparse_dit.SparseDiT
  params: {resolution: 64, in_channels: 16, out_channels: 16, model_channels: 1024, cond_channels: 1024,
           num_blocks: 24, num_heads: 32, num_kv_heads: 2, compression_block_size: 8, selection_block_size: 8,
           topk: 8, compression_version: v1, pe_mode: ape, factor: 1.0, sparse_conditions: false, qk_rms_norm: true,
           use_shift: true, use_checkpoint: true, use_fp16: true}
sparse_scheduler_512:
  target: diffusers.schedulers.FlowMatchEulerDiscreteScheduler
  params: {num_train_timesteps: 1000, shift: 6.0}
sparse_vae_1024:
  target: direct3d_s2.models.autoencoders.ss_vae.SparseSDFVAE
  params: {use_checkpoint: true, embed_dim: 16, num_head_channels_encoder: 64, model_channels_encoder: 512,
           num_heads_encoder: 8, num_blocks_encoder: 4, num_head_channels_decoder: 64, model_channels_decoder: 512,
           num_heads_decoder: 8, num_blocks_decoder: 4, resolution: 128, out_channels: 1, use_fp16: true,
           latents_scale: 1.0, latents_shift: 0.0, chunk_size: 4}
sparse_dit_1024:
  target: direct3d_s2.models.transformers.sparse_dit.SparseDiT
  params: {resolution: 128, in_channels: 16, out_channels: 16, model_channels: 1024, cond_channels: 1024,
           num_blocks: 24, num_heads: 32, num_kv_heads: 2, compression_block_size: 8, selection_block_size: 8,
           topk: 8, compression_version: v1, pe_mode: ape, factor: 0.5, sparse_conditions: false, qk_rms_norm: true,
           use_shift: true, use_checkpoint: true, use_fp16: true}
sparse_scheduler_1024:
  target: diffusers.schedulers.FlowMatchEulerDiscreteScheduler
  params: {num_train_timesteps: 1000, shift: 8.0}
sparse_image_encoder:
  target: direct3d_s2.models.conditioner.DinoEncoder
  params: {model: facebookresearch/dinov2, version: dinov2_vitl14_reg, size: 518}
refiner:
  target: direct3d_s2.models.refiner.unet_refiner.Voxel_RefinerXL
  params: {in_channels: 1, out_channels: 1, layers_per_block: 2, layers_mid_block: 2, patch_size: 192, use_fp16: true}
refiner_1024:
  target: direct3d_s2.models.refiner.unet_refiner.Voxel_RefinerXL_sign
  params: {in_channels: 1, out_channels: 1, layers_per_block: 2, layers_mid_block: 2, patch_size: 256, use_fp16: true}
"""
#: v1.0 differs in the two sparse DiTs only (RELEASED_MODEL.md A.2).
V10_DIT_CHANGES = {"sparse_dit_512": dict(compression_block_size=4, compression_version="v2", topk=32,
                                          sparse_conditions=True),
                   "sparse_dit_1024": dict(compression_block_size=4, compression_version="v2", topk=8,
                                           sparse_conditions=True)}

#: Fingerprints of the released state dicts (from released-model/statedict-<part>.txt): entries, total elements and
#: the first 32 hex digits of SHA-256 over the sorted lines "name d0,d1,..".
RELEASED_FINGERPRINTS = {
    "dense_vae": (212, 193_037_009, "dd9005785638c62a9add4c990ab5fbe6"),
    "dense_dit": (489, 559_737_864, "2dfa8245b54a712b4e03bb34ec244bf5"),
    "sparse_vae_512": (116, 37_874_113, "7578dfe957c1c21da1559d8de564a558"),
    "sparse_vae_1024": (116, 37_874_113, "7578dfe957c1c21da1559d8de564a558"),
    "sparse_dit_512": (584, 509_286_416, "1b13605a0e082ff5db6fcc1ad751672e"),
    "sparse_dit_1024": (584, 509_286_416, "1b13605a0e082ff5db6fcc1ad751672e"),
    "v1.0-sparse_dit_512": (874, 520_083_472, "36e19d2a7c1f6ba3f0b95751929133f5"),
    "v1.0-sparse_dit_1024": (874, 520_083_472, "36e19d2a7c1f6ba3f0b95751929133f5"),
    "refiner": (253, 134_740_481, "233bcd2c3da150b547cb2a1f9120d1ad"),
    "refiner_1024": (234, 134_710_881, "553cee421a26e7d1b2d24c5bb921eb9d"),
}
#: The full listings, where the development machines have them (not in the repository).
LISTINGS = Path("/work/shared/released-model")


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def _fingerprint(shapes: dict[str, tuple[int, ...]]) -> tuple[int, int, str]:
    text = "\n".join(sorted(f"{k} {','.join(str(d) for d in s)}" for k, s in shapes.items()))
    return len(shapes), sum(math.prod(s) for s in shapes.values()), hashlib.sha256(text.encode()).hexdigest()[:32]


def _listing(name: str) -> dict[str, tuple[int, ...]]:
    shapes = {}
    for line in (LISTINGS / f"statedict-{name}.txt").read_text().splitlines():
        if line.startswith("#") or not line.strip():
            continue
        key, shape = line.split("\t")[:2]
        shapes[key] = tuple(int(v) for v in re.findall(r"\d+", shape))
    return shapes


def _hub_config(version: str = "v1.1") -> dict:
    doc = yaml.safe_load(RELEASED_CONFIG_V11)
    if version == "v1.0":
        for part, changes in V10_DIT_CHANGES.items():
            doc[part]["params"].update(changes)
    return doc


def tiny_modules(seed: int = 0) -> dict[str, torch.nn.Module]:
    """Every part at tiny size (released names, small widths), random weights (zero-initialised layers too)."""
    torch.manual_seed(seed)
    mods = {
        "dense_vae": DenseShapeVAE(DenseVAEConfig.tiny()),
        "dense_dit": DenseDiT(DenseDiTConfig.tiny()),
        "sparse_vae_512": SparseSDFVAE(VAEConfig.tiny(prune="none")),
        "sparse_dit_512": SparseDiT(DiTConfig.tiny()),
        "sparse_vae_1024": SparseSDFVAE(VAEConfig.tiny(prune="none", resolution=64)),
        "sparse_dit_1024": SparseDiT(DiTConfig.tiny(resolution=32, pos_factor=0.5, compression_version="v2",
                                                    sparse_conditions=True)),
        "refiner": VoxelRefiner(RefinerConfig.tiny()),
        "refiner_1024": SignRefiner(RefinerConfig.tiny()),
    }
    with torch.no_grad():
        for m in mods.values():
            for p in m.parameters():
                p.copy_(torch.randn_like(p) * 0.1)
    return mods


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("release")
    mods = tiny_modules()
    P.save_released(folder, mods)
    return folder, mods


# ---------------------------------------------------------------------------------------------------------------
# the released layout, strict loading, round trip


def test_tiny_folder_has_the_released_layout_and_round_trips(tiny_folder):
    folder, mods = tiny_folder
    entries = {f.name: sorted(torch.load(f, weights_only=True)) for f in folder.glob("*.ckpt")}
    assert entries == {"model_dense.ckpt": ["dit", "vae"], "model_sparse_512.ckpt": ["dit", "vae"],
                       "model_sparse_1024.ckpt": ["dit", "vae"], "model_refiner.ckpt": ["refiner"],
                       "model_refiner_1024.ckpt": ["refiner"]}
    doc = yaml.safe_load((folder / "config.yaml").read_text())
    assert doc["sparse_vae_512"]["target"].endswith("ss_vae.SparseSDFVAE") and "ours" in doc["sparse_vae_512"]
    assert doc["sparse_vae_1024"]["params"]["chunk_size"] == 4

    loaded = P.from_pretrained(folder)
    assert set(loaded) == set(RC.ALL_PARTS) and loaded.root == folder
    for part, module in mods.items():
        assert type(loaded[part]) is type(module) and not loaded[part].training
        assert loaded.configs[part] == module.config
        ours, back = module.state_dict(), loaded[part].state_dict()
        assert list(back) == list(ours)
        assert all(torch.equal(ours[k], back[k]) for k in ours), part  # identical tensors
    assert loaded.options["sparse_vae_1024"]["chunk_size"] == 4
    # the loaded modules compute what the originals compute (nothing left on the meta device)
    from model.sparse.tensor import SparseTensor
    from tests.test_vae_model import sphere_shell

    with torch.no_grad():
        x = sphere_shell(resolution=16, radius=5.0)
        assert torch.equal(loaded["sparse_vae_512"](x).decoded.sdf.feats,
                           mods["sparse_vae_512"].eval()(x).decoded.sdf.feats)
        coords = torch.unique(torch.randint(0, 8, (60, 3), generator=torch.Generator().manual_seed(1)), dim=0)
        z = SparseTensor.from_list([coords], [torch.randn(len(coords), 4)], resolution=16)
        cond = torch.randn(1, 9, 32)
        assert torch.equal(loaded["sparse_dit_512"](z, 500.0, cond).feats,
                           mods["sparse_dit_512"].eval()(z, 500.0, cond).feats)
    # one part, float64, explicit config override equal to what config.yaml says
    one = P.from_pretrained(folder, parts="sparse_dit_512", dtype=torch.float64,
                            configs={"sparse_dit_512": mods["sparse_dit_512"].config})
    assert set(one) == {"sparse_dit_512"}
    assert all(p.dtype == torch.float64 for p in one["sparse_dit_512"].parameters())


def test_released_sparse_vae_at_full_size_loads_from_the_hub_config(tmp_path):
    """Random tensors of the released sparse VAE's names, shapes and dtypes (float16 weights, float32 norms) under
    the hub's config.yaml: loads strictly with no override, cast to float32."""
    from tests.test_vae_model import released_shapes

    gen = torch.Generator().manual_seed(0)
    state = {}
    for name, shape in released_shapes().items():
        dtype = torch.float32 if ".act_layers.0." in name and "conv" not in name or "out_layers.1." in name \
            else torch.float16
        state[name] = torch.randn(shape, generator=gen).to(dtype)
    torch.save({"vae": state}, tmp_path / "model_sparse_512.ckpt")
    (tmp_path / "config.yaml").write_text(RELEASED_CONFIG_V11)
    models = P.from_pretrained(tmp_path, parts="sparse_vae_512")
    vae = models["sparse_vae_512"]
    assert models.configs["sparse_vae_512"] == VAEConfig.released_512(prune="none")
    ours = vae.state_dict()
    assert set(ours) == set(state)
    assert all(ours[k].dtype == torch.float32 and torch.equal(ours[k], state[k].float()) for k in state)


def test_every_problem_is_named_and_reported_together(tiny_folder, tmp_path):
    folder, _ = tiny_folder
    for f in folder.iterdir():
        (tmp_path / f.name).write_bytes(f.read_bytes())
    blob = torch.load(tmp_path / "model_sparse_512.ckpt", weights_only=True)
    blob["vae"]["decoder.out_layerX.weight"] = blob["vae"].pop("decoder.out_layer.weight")  # renamed
    blob["dit"]["blocks.1.self_attn.proj_q.weight"] = torch.zeros(3, 5)  # wrong shape
    blob["dit"]["extra.bias"] = torch.zeros(2)  # unexpected
    torch.save(blob, tmp_path / "model_sparse_512.ckpt")
    (tmp_path / "model_refiner.ckpt").unlink()  # missing file
    with pytest.raises(P.ReleasedCheckpointError) as err:
        P.from_pretrained(tmp_path, parts=["sparse_vae_512", "sparse_dit_512", "refiner", "dense_vae"])
    problems = err.value.problems
    assert len(problems) == 5, problems
    text = str(err.value)
    assert "5 problem(s)" in text
    assert "unexpected tensor 'decoder.out_layerX.weight'" in text
    assert "missing tensor 'decoder.out_layer.weight'" in text
    assert re.search(r"'blocks\.1\.self_attn\.proj_q\.weight' has shape \[3, 5\], expected \[64, 64\]", text)
    assert "unexpected tensor 'extra.bias'" in text
    assert "model_refiner.ckpt: file not found" in text and "(needed for refiner)" in text
    # the intact parts of the same folder still load
    assert set(P.from_pretrained(tmp_path, parts=["dense_vae", "refiner_1024"])) == {"dense_vae", "refiner_1024"}


def test_config_problems_are_named(tiny_folder, tmp_path):
    folder, mods = tiny_folder
    for f in folder.iterdir():
        (tmp_path / f.name).write_bytes(f.read_bytes())
    doc = yaml.safe_load((tmp_path / "config.yaml").read_text())
    doc["dense_dit"]["target"] = "direct3d_s2.models.transformers.dense_dit.SomethingElse"
    del doc["refiner"]["ours"]
    doc["refiner"]["params"]["new_option"] = 3
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(doc))
    with pytest.raises(P.ReleasedCheckpointError) as err:
        P.from_pretrained(tmp_path, parts=["dense_dit", "refiner"])
    text = str(err.value)
    assert "dense_dit.target" in text and "SomethingElse" in text
    assert "['new_option']" in text and "(refiner)" in text
    with pytest.raises(P.ReleasedCheckpointError, match="must be a DiTConfig"):
        P.from_pretrained(tmp_path, parts="sparse_dit_512", configs={"sparse_dit_512": VAEConfig.tiny()})
    with pytest.raises(ValueError, match="unknown part"):
        P.from_pretrained(tmp_path, parts="sparse_vae")


def test_hub_id_fetches_through_snapshot_download_and_failures_say_what_to_do(tiny_folder, tmp_path, monkeypatch):
    import huggingface_hub

    folder, _ = tiny_folder
    calls = []

    def fake_download(repo_id, *, revision=None, allow_patterns=None, cache_dir=None, local_files_only=False):
        calls.append((repo_id, sorted(allow_patterns)))
        snap = tmp_path / "snapshot"
        (snap / P.DEFAULT_SUBFOLDER).mkdir(parents=True, exist_ok=True)
        for name in ("config.yaml", "model_sparse_1024.ckpt"):
            (snap / P.DEFAULT_SUBFOLDER / name).write_bytes((folder / name).read_bytes())
        return str(snap)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_download)
    models = P.from_pretrained("wushuang98/Direct3D-S2", parts="sparse_vae_1024")
    assert set(models) == {"sparse_vae_1024"}
    assert calls == [("wushuang98/Direct3D-S2", [f"{P.DEFAULT_SUBFOLDER}/config.yaml",
                                                 f"{P.DEFAULT_SUBFOLDER}/model_sparse_1024.ckpt"])]
    # the downloaded layout (a folder holding direct3d-s2-v-1-1/) also works as a local path
    assert set(P.from_pretrained(tmp_path / "snapshot", parts="sparse_vae_1024")) == {"sparse_vae_1024"}

    def offline(*args, **kwargs):
        raise OSError("Network is unreachable")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", offline)
    with pytest.raises(P.PretrainedDownloadError) as err:
        P.from_pretrained("someone/some-model", parts="sparse_vae_512")
    text = str(err.value)
    assert "'someone/some-model'" in text and "Network is unreachable" in text
    assert "`hf download someone/some-model" in text and "instead of the id" in text
    with pytest.raises(FileNotFoundError, match="no such folder, and not a model hub id"):
        P.from_pretrained(str(tmp_path / "nowhere" / "x" / "y"))


# ---------------------------------------------------------------------------------------------------------------
# full-size modules against the released listings (meta device)


def _build_meta(part: str, doc: dict):
    spec = RC.PARTS[part]
    config, _ = RC.part_config(spec, doc, None, None)
    with torch.device("meta"):
        module = spec.build(config)
    return {k: tuple(v.shape) for k, v in module.state_dict().items()}


@pytest.mark.parametrize("version,part", [("v1.1", p) for p in RC.ALL_PARTS]
                         + [("v1.0", "sparse_dit_512"), ("v1.0", "sparse_dit_1024")])
def test_modules_from_the_hub_config_have_exactly_the_released_keys_and_shapes(version, part):
    ours = _build_meta(part, _hub_config(version))
    name = part if version == "v1.1" else f"v1.0-{part}"
    if LISTINGS.is_dir():
        released = _listing(name)
        assert sorted(set(released) - set(ours)) == [] and sorted(set(ours) - set(released)) == []
        assert {k: v for k, v in ours.items() if released[k] != v} == {}
    assert _fingerprint(ours) == RELEASED_FINGERPRINTS[name]


def test_without_config_yaml_the_released_sizes_are_used_and_v10_is_recognised():
    for part in RC.ALL_PARTS:
        assert _fingerprint(_build_meta(part, {})) == RELEASED_FINGERPRINTS[part]
    v10 = RC.PARTS["sparse_dit_512"].default_config({"cond_proj.weight"})
    assert v10 == DiTConfig.released_512_v10()


# ---------------------------------------------------------------------------------------------------------------
# the dense stage modules


def test_dense_vae_forward_and_layout_rules():
    torch.manual_seed(0)
    cfg = DenseVAEConfig.tiny()
    vae = DenseShapeVAE(cfg).eval()
    x = (torch.rand(2, 1, 16, 16, 16) > 0.5).float()
    with torch.no_grad():
        logits, mean, logvar = vae(x)
    assert logits.shape == (2, 1, 16, 16, 16) and mean.shape == logvar.shape == (2, 2, 4, 4, 4)
    assert DenseVAEConfig.released().latent_resolution == 16
    # encode takes the occupancy grid and maps it to occ * 2 - 1 itself, as the released encode does
    with torch.no_grad():
        direct = vae.encoder(x * 2 - 1)
        for got, want in zip(vae.encode(x.bool()), direct):
            assert torch.equal(got, want)
        assert not torch.equal(vae.encode(x)[0], vae.encoder(x)[0])
    # pixel shuffle: channel c*8 + 4i + 2j + k -> offset (i, j, k)
    t = torch.arange(16, dtype=torch.float32).view(1, 16, 1, 1, 1)
    s = pixel_shuffle_3d(t)
    assert s.shape == (1, 2, 2, 2, 2)
    for c in range(2):
        for i in range(2):
            for j in range(2):
                for k in range(2):
                    assert s[0, c, i, j, k] == c * 8 + 4 * i + 2 * j + k
    # occupied voxels: sigmoid >= 0.1, (b, x, y, z) with z fastest
    lg = torch.full((1, 1, 3, 3, 3), -10.0)
    lg[0, 0, 1, 2, 0] = lg[0, 0, 0, 0, 2] = math.log(0.1 / 0.9) + 1e-4
    assert DenseShapeVAE.occupied_voxels(lg).tolist() == [[0, 0, 0, 2], [0, 1, 2, 0]]
    # the released pipeline compares in float16: sigmoid 0.09996 (< 0.1 in float32) rounds to fp16(0.1) = 0.09998
    edge = torch.full((1, 1, 1, 1, 2), -10.0)
    edge[0, 0, 0, 0, 1] = math.log(0.09996 / 0.90004)
    assert torch.sigmoid(edge[0, 0, 0, 0, 1]) < 0.1
    assert DenseShapeVAE.occupied_voxels(edge).tolist() == [[0, 0, 0, 1]]
    assert DenseShapeVAE.occupied_voxels(edge, dtype=torch.float32).tolist() == []
    # one float16 step further down is empty in both
    edge[0, 0, 0, 0, 1] = math.log(0.09990 / 0.90010)
    assert DenseShapeVAE.occupied_voxels(edge).tolist() == []


def test_dense_dit_forward_attention_rules_and_batch_independence():
    torch.manual_seed(0)
    cfg = DenseDiTConfig.tiny()
    dit = DenseDiT(cfg).eval()
    with torch.no_grad():
        for p in dit.parameters():
            p.copy_(torch.randn_like(p) * 0.2)
    x = torch.randn(2, 2, 4, 4, 4)
    cond = torch.randn(2, 5, 16)
    with torch.no_grad():
        out = dit(x, torch.tensor([500.0, 20.0]), cond)
        one = dit(x[1:], 20.0, cond[1:])
        masked = dit(x[:1], 500.0, Condition(torch.cat([cond[:1], torch.randn(1, 3, 16)], 1),
                                             mask=torch.tensor([[True] * 5 + [False] * 3])))
    assert out.shape == (2, 2, 4, 4, 4)
    torch.testing.assert_close(out[1:], one, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(out[:1], masked, rtol=1e-4, atol=1e-5)  # padded tokens are masked out
    # the buffer is the sin-cos embedding of the x-major grid
    grid = torch.stack(torch.meshgrid(*[torch.arange(4)] * 3, indexing="ij"), -1).reshape(-1, 3)
    torch.testing.assert_close(dit.pos_emb, sincos_position_embedding(grid, 32))
    # q/k normalisation: L2 per head x gamma x sqrt(D)
    attn = dit.blocks[0].self_attn
    q = torch.randn(1, 3, 2, 16)
    expected = q / q.norm(dim=-1, keepdim=True) * attn.q_rms_norm.gamma * 4.0
    torch.testing.assert_close(attn.q_rms_norm(q), expected)


# ---------------------------------------------------------------------------------------------------------------
# the refiners


def test_adaptive_filter_taps_and_refiner_forward():
    torch.manual_seed(0)
    x = torch.randn(1, 2, 5, 5, 5)
    onehot = torch.zeros(1, 27, 5, 5, 5)
    onehot[:, 13] = 3.0  # centre tap (a, b, c) = (1, 1, 1), any positive scale: L1-normalised
    torch.testing.assert_close(adaptive_filter(x, onehot), x)
    shift = torch.zeros(1, 27, 5, 5, 5)
    shift[:, 9 * 2 + 3 * 1 + 1] = 1.0  # offset (+1, 0, 0) along the first spatial axis, applied 3 times
    expected = torch.zeros_like(x)
    expected[:, :, :2] = x[:, :, 3:]
    torch.testing.assert_close(adaptive_filter(x, shift), expected)

    cfg = RefinerConfig.tiny()
    ref, sign = VoxelRefiner(cfg).eval(), SignRefiner(cfg).eval()
    with torch.no_grad():
        y = ref(torch.randn(1, 1, 8, 8, 8), torch.randn(1, 8, 8, 8, 8))
        s = sign(torch.randn(1, 1, 8, 8, 8))
    assert y.shape == s.shape == (1, 1, 8, 8, 8) and float(y.abs().max()) < 1


def test_refiner_whole_grid_helpers():
    torch.manual_seed(0)
    cfg = RefinerConfig.tiny()
    coords = torch.unique(torch.randint(0, 16, (300, 3)), dim=0)
    sdf, feats = torch.rand(len(coords)) * 2 - 1, torch.randn(len(coords), 8)
    ref = VoxelRefiner(cfg).eval()
    field = refine_512(ref, coords, sdf, feats)
    assert field.shape == (16, 16, 16) and bool(torch.isfinite(field).all())
    # the blending weights of the overlapping patches sum to one everywhere
    ref.forward = lambda s, f: torch.full_like(s, 0.75)
    torch.testing.assert_close(refine_512(ref, coords, sdf, feats), torch.full((16, 16, 16), 0.75))

    sign = SignRefiner(cfg).eval()
    fine = torch.unique(torch.randint(0, 32, (400, 3)), dim=0)
    values = torch.rand(len(fine)) * 2 - 1
    out = sign_refine_1024(sign, fine, values, resolution=32)
    assert out.shape == (32, 32, 32)
    torch.testing.assert_close(out[fine[:, 0], fine[:, 1], fine[:, 2]], values)
    decoded = torch.zeros(32, 32, 32, dtype=torch.bool)
    decoded[fine[:, 0], fine[:, 1], fine[:, 2]] = True
    assert set(out[~decoded].unique().tolist()) <= {-1.0, 1.0}
    with pytest.raises(ValueError, match="must be 32"):
        sign_refine_1024(sign, fine, values, resolution=64)


@pytest.mark.parametrize("pool_mode", ["released", "mean"])
def test_sign_refiner_input_is_pooled_as_released(pool_mode):
    """The sign refiner sees the decoded field pooled by 2: sum / (n + 1) over a parent's n decoded children with the
    released pooling (the published SparseDownsample), sum / n with "mean"; parents without children read 1."""
    cfg = RefinerConfig.tiny(pool_mode=pool_mode)
    sign = SignRefiner(cfg).eval()
    seen = []
    sign.register_forward_pre_hook(lambda module, args: seen.append(args[0][0, 0].clone()))
    fine = torch.tensor([[2, 2, 2], [3, 2, 2], [2, 3, 3],   # parent (1, 1, 1): 3 children
                         [0, 0, 0],                          # parent (0, 0, 0): 1 child
                         [6, 6, 6], [6, 6, 7], [6, 7, 6], [6, 7, 7], [7, 6, 6], [7, 6, 7], [7, 7, 6], [7, 7, 7]])
    values = torch.tensor([0.3, -0.6, 0.9, 0.8] + [0.1 * i for i in range(1, 9)])
    predict_sign(sign, fine, values, resolution=32)
    first = seen[0]  # the patch at offset (0, 0, 0) of the 16^3 grid
    extra = 1 if pool_mode == "released" else 0
    torch.testing.assert_close(first[1, 1, 1], torch.tensor(0.6 / (3 + extra)))
    torch.testing.assert_close(first[0, 0, 0], torch.tensor(0.8 / (1 + extra)))
    torch.testing.assert_close(first[3, 3, 3], torch.tensor(3.6 / (8 + extra)))
    assert first[2, 2, 2] == 1.0 and first[0, 1, 0] == 1.0  # no decoded child: empty space


# ---------------------------------------------------------------------------------------------------------------
# decoding and the command line


def test_chunked_decoding_matches_one_pass():
    from tests.test_vae_model import sphere_shell

    torch.manual_seed(0)
    x = sphere_shell(resolution=64, radius=20.0, tau=2.0)
    vae = SparseSDFVAE(VAEConfig.tiny(prune="none", resolution=64)).eval()
    with torch.no_grad():
        z = vae.encode(x).mode()  # 8^3 latent grid
        full, ffull = P.decode_chunked(vae, z, 1)
        chunked, fchunked = P.decode_chunked(vae, z, 2, padding=3)  # the blocks read 2.625 cells around a voxel
        thirds, _ = P.decode_chunked(vae, z, 3, padding=3)  # chunks of 3, 3 and 2 cells along each axis
        short, _ = P.decode_chunked(vae, z, 2, padding=2)
    assert full.num_voxels == chunked.num_voxels == thirds.num_voxels == 8**3 * z.num_voxels  # every child, once
    assert torch.equal(full.coords, chunked.coords) and torch.equal(full.coords, short.coords)
    assert torch.equal(full.coords, thirds.coords)
    torch.testing.assert_close(chunked.feats, full.feats)
    torch.testing.assert_close(thirds.feats, full.feats)
    torch.testing.assert_close(fchunked.feats, ffull.feats)
    assert not torch.allclose(short.feats, full.feats)  # too little context shows at the chunk seams
    with pytest.raises(ValueError, match="prune='none'"):
        P.decode_chunked(SparseSDFVAE(VAEConfig.tiny()), z, 2)


def test_decode_chunk_count_bounds_the_largest_chunk():
    """The fewest chunks per axis whose every non-empty chunk (the chunks decode_chunked decodes) holds at most
    max_tokens tokens with its padding, against a count chunk by chunk; clustered tokens, batch column, errors."""
    import itertools
    import math

    gen = torch.Generator().manual_seed(0)
    res, pad = 24, 2
    xyz = torch.cat([torch.randint(0, 6, (300, 3), generator=gen),  # a dense cluster in one corner
                     torch.randint(0, res, (200, 3), generator=gen)])
    coords = torch.cat([torch.zeros(len(xyz), 1, dtype=torch.long), xyz], 1)

    def largest(k):
        side = math.ceil(res / k)
        out = 0
        for cell in itertools.product(range(k), repeat=3):
            lo = torch.tensor(cell) * side
            if ((xyz >= lo) & (xyz < lo + side)).all(1).any():
                out = max(out, int(((xyz >= lo - pad) & (xyz < lo + side + pad)).all(1).sum()))
        return out

    sizes = {k: largest(k) for k in (1, 2, 3, 4, 8)}
    assert sizes[1] == 500 and sizes[1] > sizes[2] > sizes[3] > sizes[4] > sizes[8]
    # a count that does not divide the grid (24 / 3 = 8 cells a chunk here) is offered by default
    assert 3 in P.DECODE_CHUNK_CHOICES
    assert P.decode_chunk_count(coords, res, max_tokens=sizes[3], padding=pad) == 3
    for k in (1, 2, 4, 8):
        assert P.decode_chunk_count(coords, res, max_tokens=sizes[k], padding=pad, choices=(1, 2, 4, 8)) == k
        assert P.decode_chunk_count(xyz, res, max_tokens=sizes[k], padding=pad, choices=(1, 2, 4, 8)) == k
    assert int(xyz.max()) + 1 == res  # None: the grid side from the coordinates, as decode_chunked takes it
    assert P.decode_chunk_count(coords, None, max_tokens=sizes[4], padding=pad, choices=(1, 2, 4, 8)) == 4
    if sizes[8] > 1:  # nothing fits: the most chunks offered
        assert P.decode_chunk_count(coords, res, max_tokens=sizes[8] - 1, padding=pad, choices=(1, 2, 4, 8)) == 8
    with pytest.MonkeyPatch.context() as mp:  # counted a few tokens at a time: the same sums
        mp.setattr(P, "_COUNT_TOKENS", 7)
        assert P.decode_chunk_count(coords, res, max_tokens=sizes[2], padding=pad, choices=(1, 2, 4, 8)) == 2
        assert P.decode_chunk_count(coords, res, max_tokens=sizes[2] - 1, padding=pad, choices=(1, 2, 4, 8)) == 4
    assert P.decode_chunk_count(coords[:0], res) == min(P.DECODE_CHUNK_CHOICES)  # no tokens: one chunk
    with pytest.raises(ValueError, match="max_tokens"):
        P.decode_chunk_count(coords, res, max_tokens=0)
    with pytest.raises(ValueError, match="coords"):
        P.decode_chunk_count(coords[:, :2], res)


def test_reconstruct_with_released_weights_end_to_end(tiny_folder, tmp_path, capsys):
    pytest.importorskip("igl")
    pytest.importorskip("skimage")
    import trimesh

    from model.cli.reconstruct import main

    folder, _ = tiny_folder
    mesh = tmp_path / "sphere.obj"
    trimesh.creation.icosphere(2).export(mesh)
    for resolution, extra, part in (("32", [], "sparse_vae_512"),
                                    ("32", ["--part", "sparse_vae_1024", "--chunk-size", "2"], "sparse_vae_1024")):
        out, js = tmp_path / f"rec{resolution}.glb", tmp_path / f"rec{resolution}.json"
        rc = main([str(mesh), "--weights", str(folder), "--resolution", resolution, "--out", str(out),
                   "--device", "cpu", "--points", "2000", "--json", str(js)] + extra)
        text = capsys.readouterr().out
        assert rc == 0, text
        assert f"released {part} from {folder}" in text
        doc = json.loads(js.read_text())
        assert doc["level"] == P.RELEASED_MC_LEVEL and doc["tau"] == P.RELEASED_SDF_TAU
        assert doc["chunk_size"] == (2 if extra else 1)
        assert doc["decoded_voxels"] == 8**3 * doc["latent_voxels"]  # the released decoder keeps every child
        if doc["empty"]:
            assert "EMPTY: the decoded SDF has no surface at level 0.2" in text
        else:
            assert len(trimesh.load(out, force="mesh").faces) == doc["faces"]
    rc = main([str(mesh), "--weights", str(tmp_path / "no-such-folder"), "--out", str(tmp_path / "x.glb")])
    assert rc == 2 and "no such folder" in capsys.readouterr().err


def test_released_configurations_pool_as_the_released_model():
    """Configurations read from a released config.yaml (its params) or made without one are released ones: their
    pooling divides by n + 1 (RELEASED_MODEL.md H.1)."""
    for name in ("sparse_vae_512", "sparse_vae_1024", "sparse_dit_512", "sparse_dit_1024", "refiner",
                 "refiner_1024"):
        spec = RC.PARTS[name]
        assert spec.from_params({}, name).pool_mode == "released", name
        assert spec.default_config(None).pool_mode == "released", name
