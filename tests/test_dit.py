"""The SSA layer, the sparse DiT and the image conditioning (CPU; kernels through the Triton interpreter).

Runtime on the 2-core development machine: about a minute, most of it the two kernel-vs-reference layer tests.
"""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

import model.nets.ssa_layer as ssa_layer
from model.nets.dit import Condition, DiTConfig, SparseDiT, condition_positions, timestep_embedding
from model.flow import flow_loss
from model.sparse import SparseTensor
from model.nets.ssa_layer import SpatialSparseAttention
from ssa_kernels.layout import layout_order


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def _shape(n, extent, offset=0, seed=0):
    g = torch.Generator().manual_seed(seed)
    lin = torch.randperm(extent**3, generator=g)[:n]
    return torch.stack([lin // extent**2, (lin // extent) % extent, lin % extent], 1).int() + offset


def _randomize(module, std=0.1, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * std)
    return module


def _sorted_tensor(coords_list, channels, *, compression_block, selection_block, seed=0):
    """SparseTensor of several elements, in layout order for the block sizes."""
    g = torch.Generator().manual_seed(seed)
    x = SparseTensor.from_list(coords_list, [torch.randn(c.shape[0], channels, generator=g) for c in coords_list])
    perm = layout_order(x.coords, compression_block=compression_block, selection_block=selection_block)
    return SparseTensor(x.coords[perm], x.feats[perm])


# ---------------------------------------------------------------------------------------------------------------
# the SSA layer


@pytest.mark.parametrize("version,blocks,topk,shift", [("v1", (4, 4), 2, 2), ("v2", (2, 4), 3, 0)])
def test_ssa_layer_kernels_match_reference(version, blocks, topk, shift):
    """Forward and every parameter gradient of the layer through the Triton kernels equal those through the dense
    reference (float32, ~150 tokens in two batch elements, both released compressions)."""
    mc, ms = blocks
    torch.manual_seed(0)
    layer = SpatialSparseAttention(64, 4, 2, compression_block=mc, selection_block=ms, topk=topk, window=4,
                                   shift=shift, compression_version=version, compression_groups=8)
    _randomize(layer, std=0.15)
    x = _sorted_tensor([_shape(90, 8, seed=1), _shape(60, 8, offset=2, seed=2)], 64, compression_block=mc,
                       selection_block=ms)
    results = {}
    for backend in ("reference", "kernels"):
        layer.set_mode(backend=backend)
        layer.zero_grad()
        feats = x.feats.clone().requires_grad_(True)
        out = layer(SparseTensor(x.coords, feats, cache=x.cache, validate=False)).feats
        w = torch.linspace(-1, 1, out.numel()).view_as(out)
        (out * w).sum().backward()
        grads = {n: p.grad.clone() for n, p in layer.named_parameters()}
        results[backend] = (out.detach(), feats.grad.clone(), grads)
    ref, ker = results["reference"], results["kernels"]
    _assert_close_to_scale(ker[0], ref[0], "output")
    _assert_close_to_scale(ker[1], ref[1], "input gradient")
    assert set(ker[2]) == set(ref[2])
    for name in ref[2]:
        _assert_close_to_scale(ker[2][name], ref[2][name], name)
        if name != "compression_key.out_layers.3.conv.bias":  # adds the same vector to every compressed key of a
            # sample: the compression softmax is invariant to it and the selection scores carry no gradient
            assert ref[2][name].abs().sum() > 0, f"{name} got no gradient"


def _assert_close_to_scale(actual, expected, what, rel=2e-5):
    """Largest difference within ``rel`` of the tensor's largest magnitude (float32 sums in different orders)."""
    err = float((actual - expected).abs().max())
    scale = float(expected.abs().max())
    assert err <= rel * scale + 2e-5, f"{what}: max error {err:.3g} vs scale {scale:.3g}"


@pytest.mark.parametrize("pool_mode", ["released", "mean"])
def test_compression_v1_against_the_direct_formula(pool_mode):
    """Compressed key of block j = sum over its n tokens of SiLU(x W + b) divided by n + 1 ("released": the
    published SparseDownsample) or n ("mean"); blocks of one, a few and all m^3 tokens, two batch elements."""
    from model.nets.ssa_layer import CompressionV1, block_layout

    m = 2
    full = [[x, y, z] for x in (0, 1) for y in (0, 1) for z in (0, 1)]                  # block (0,0,0): 8 tokens
    coords = [torch.tensor(full + [[2, 0, 0], [3, 1, 0], [2, 1, 1]] + [[0, 4, 4]]),      # 3 tokens, 1 token
              torch.tensor([[6, 6, 6], [4, 4, 4]])]                                      # 1 token, 1 token
    x = _sorted_tensor([c.int() for c in coords], 6, compression_block=m, selection_block=m, seed=3)
    layout = block_layout(x, compression_block=m, selection_block=m, window=m)
    comp = _randomize(CompressionV1(6, pool_mode), std=0.5).double()
    xd = x.replace(x.feats.double())
    got = comp(xd, layout)
    w, b = comp.act_layers[0].conv.kernel, comp.act_layers[0].conv.bias
    act = torch.nn.functional.silu(xd.feats @ w + b)
    key = x.coords[:, 0].long() * 10**6 + (x.coords[:, 1:].long() // m) @ torch.tensor([10**4, 10**2, 1])
    blocks = torch.unique_consecutive(key)
    assert got.shape == (len(blocks), 6) and len(blocks) == 5
    sizes = []
    for j, blk in enumerate(blocks):
        members = key == blk
        n = int(members.sum())
        sizes.append(n)
        expected = act[members].sum(0) / (n + 1 if pool_mode == "released" else n)
        torch.testing.assert_close(got[j], expected, rtol=1e-12, atol=1e-12)
    assert sorted(sizes) == [1, 1, 1, 3, 8]


def test_released_presets_pool_as_the_released_model():
    """Every released preset (and the configurations read from a released config.yaml) divides by n + 1; the
    dataclass default, for models trained here, is the true mean."""
    from model.nets.refiner import RefinerConfig
    from model.nets.vae import VAEConfig

    for name in ("released_512", "released_1024", "released_512_v10", "released_1024_v10"):
        cfg = DiTConfig.preset(name)
        assert cfg.pool_mode == "released", name
        layer = SparseDiT(cfg.replace(num_blocks=1)).blocks[0].self_attn
        assert layer.compression_key.pool_mode == layer.compression_value.pool_mode == "released"
    assert DiTConfig.tiny().pool_mode == DiTConfig().pool_mode == "mean"
    assert VAEConfig.released_512().pool_mode == VAEConfig.released_1024().pool_mode == "released"
    assert VAEConfig().pool_mode == VAEConfig.tiny().pool_mode == "mean"
    from model.nets.vae import SparseSDFVAE

    downs = SparseSDFVAE(VAEConfig.tiny(pool_mode="released")).encoder.downsample
    assert [block.down.mode for block in downs] == ["released"] * 3
    assert RefinerConfig.released_512().pool_mode == RefinerConfig.released_1024().pool_mode == "released"
    with pytest.raises(ValueError, match="pool_mode must be one of"):
        DiTConfig.tiny(pool_mode="max")
    with pytest.raises(ValueError, match="pool_mode must be one of"):
        VAEConfig.tiny(pool_mode="sum")


def test_ssa_layer_requires_layout_order_and_checks_arguments():
    layer = SpatialSparseAttention(64, 4, 2, compression_block=2, selection_block=4, topk=2, window=4,
                                   backend="reference")
    c = _shape(40, 8)
    perm = layout_order(torch.cat([torch.zeros(40, 1, dtype=torch.int32), c], 1), compression_block=2,
                        selection_block=4)
    unordered = SparseTensor(torch.cat([torch.zeros(40, 1, dtype=torch.int32), c], 1)[perm.flip(0)],
                             torch.randn(40, 64))
    with pytest.raises(ValueError, match="layout order"):
        layer(unordered)
    with pytest.raises(TypeError, match="x must be a SparseTensor"):
        layer(torch.randn(40, 64))
    with pytest.raises(ValueError, match="backend"):
        SpatialSparseAttention(64, 4, 2, backend="flash")
    with pytest.raises(ValueError, match="num_kv_heads"):
        SpatialSparseAttention(64, 4, 3)
    with pytest.raises(ValueError, match="compression_block"):
        SpatialSparseAttention(64, 4, 2, compression_block=3, selection_block=8)


def test_ssa_layer_full_attention_baseline():
    """attention="full" is plain attention per batch element over the same projections."""
    torch.manual_seed(0)
    layer = _randomize(SpatialSparseAttention(64, 4, 2, compression_block=2, selection_block=4, topk=2, window=4,
                                              backend="reference", attention="full"))
    x = _sorted_tensor([_shape(30, 6, seed=3), _shape(20, 6, seed=4)], 64, compression_block=2, selection_block=4)
    out = layer(x).feats
    for b in range(2):
        rows = x.coords[:, 0] == b
        h = x.feats[rows]
        q = (h @ layer.proj_q.weight.T).view(-1, 4, 16).transpose(0, 1)
        k = (h @ layer.proj_k.weight.T).view(-1, 2, 16).repeat_interleave(2, 1).transpose(0, 1)
        v = (h @ layer.proj_v.weight.T).view(-1, 2, 16).repeat_interleave(2, 1).transpose(0, 1)
        p = torch.softmax(q @ k.transpose(1, 2) / 4.0, -1)
        o = (p @ v).transpose(0, 1).reshape(-1, 64) @ layer.proj_o.weight.T
        torch.testing.assert_close(out[rows], o, rtol=1e-4, atol=1e-5)


# ---------------------------------------------------------------------------------------------------------------
# the DiT


def _dit(**overrides):
    torch.manual_seed(0)
    return _randomize(SparseDiT(DiTConfig.tiny(backend="reference", **overrides)), std=0.1)


def _batch(sizes=(70, 45), channels=4, seed=0):
    coords = [_shape(n, 8, offset=2 * i, seed=seed + i) for i, n in enumerate(sizes)]
    g = torch.Generator().manual_seed(seed)
    return SparseTensor.from_list(coords, [torch.randn(c.shape[0], channels, generator=g) for c in coords])


def test_dit_forward_backward_shapes_and_gradients():
    dit = _dit()
    x = _batch()
    cond = torch.randn(2, 21, 32)
    out = dit(x, torch.tensor([900.0, 100.0]), cond)
    assert isinstance(out, SparseTensor) and out.feats.shape == (x.num_voxels, 4)
    assert torch.equal(out.coords, x.coords)
    out.feats.square().mean().backward()
    missing = [n for n, p in dit.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not missing, f"parameters without gradient: {missing}"


def test_dit_restores_the_callers_token_order():
    dit = _dit()
    x = _batch()
    cond = torch.randn(2, 21, 32)
    t = torch.tensor([500.0, 300.0])
    ref = dit(x, t, cond).feats
    # shuffle rows inside each batch element (batches stay contiguous)
    g = torch.Generator().manual_seed(5)
    perm = torch.cat([torch.randperm(70, generator=g), 70 + torch.randperm(45, generator=g)])
    shuffled = SparseTensor(x.coords[perm], x.feats[perm])
    torch.testing.assert_close(dit(shuffled, t, cond).feats, ref[perm], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("sparse", [False, True])
def test_dit_batch_elements_do_not_see_each_other(sparse):
    """Perturbing one batch element (features, timestep, condition) leaves the other's output unchanged; the
    elements differ in size (and, with sparse conditioning, in condition length)."""
    dit = _dit(compression_version="v2" if sparse else "v1", sparse_conditions=sparse)
    x = _batch()
    if sparse:
        tokens = torch.randn(2, 9, 32)
        mask = torch.tensor([[True] * 9, [True] * 6 + [False] * 3])
        cond = Condition(tokens, mask, condition_positions(21)[:9].unsqueeze(0).repeat(2, 1, 1))
    else:
        cond = Condition(torch.randn(2, 21, 32))
    t = torch.tensor([400.0, 700.0])
    out = dit(x, t, cond).feats
    other = x.coords[:, 0] == 1
    feats = x.feats.clone()
    feats[other] += torch.randn(int(other.sum()), 4)
    tokens = cond.tokens.clone()
    tokens[1] = torch.randn_like(tokens[1])
    out2 = dit(x.replace(feats), torch.tensor([400.0, 50.0]), Condition(tokens, cond.mask, cond.positions)).feats
    torch.testing.assert_close(out2[~other], out[~other], rtol=0, atol=1e-6)
    assert (out2[other] - out[other]).abs().max() > 1e-3


def test_dit_builds_the_block_layout_once(monkeypatch):
    """One build_layout call per coordinate set, shared by every block and by later forwards (sampling steps) on
    tensors made with .replace(); a shuffled input reuses its sorted twin's layout too."""
    calls = []
    real = ssa_layer.build_layout

    def counting(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(ssa_layer, "build_layout", counting)
    dit = _dit(num_blocks=3)
    x = _batch()
    cond = torch.randn(2, 21, 32)
    dit(x, torch.tensor([10.0, 20.0]), cond)
    assert len(calls) == 1
    for step in range(3):
        dit(x.replace(torch.randn_like(x.feats)), torch.tensor([30.0 * step, 5.0]), cond)
    assert len(calls) == 1
    g = torch.Generator().manual_seed(0)
    perm = torch.cat([torch.randperm(70, generator=g), 70 + torch.randperm(45, generator=g)])
    y = SparseTensor(x.coords[perm], x.feats[perm])
    dit(y, torch.tensor([1.0, 2.0]), cond)
    dit(y.replace(torch.randn_like(y.feats)), torch.tensor([1.0, 2.0]), cond)
    assert len(calls) == 2


def test_zeroed_condition_changes_the_output():
    dit = _dit()
    x = _batch()
    cond = Condition(torch.randn(2, 21, 32))
    t = torch.tensor([600.0, 600.0])
    a = dit(x, t, cond).feats
    b = dit(x, t, cond.zeros_like()).feats
    assert (a - b).abs().mean() > 1e-2


def test_dit_window_shift_alternates_and_config_checks():
    cfg = DiTConfig.released_1024()
    assert [cfg.shift(i) for i in range(4)] == [0, 4, 0, 4]
    with torch.device("meta"):
        dit = SparseDiT(DiTConfig.tiny(num_blocks=4))
    assert [b.self_attn.shift for b in dit.blocks] == [0, 2, 0, 2]
    assert DiTConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ValueError, match="unknown DiTConfig keys"):
        DiTConfig.from_dict({"width": 3})
    with pytest.raises(ValueError, match="compression_version"):
        DiTConfig(compression_version="v3")
    with pytest.raises(ValueError, match="preset"):
        DiTConfig.preset("huge")


def test_timestep_embedding_is_cosine_first():
    t = torch.tensor([0.0, 500.0])
    e = timestep_embedding(t, 256)
    assert e.shape == (2, 256)
    torch.testing.assert_close(e[0, :128], torch.ones(128))
    torch.testing.assert_close(e[0, 128:], torch.zeros(128))
    f = torch.exp(-math.log(10000.0) * torch.arange(128) / 128)
    torch.testing.assert_close(e[1, :128], torch.cos(500.0 * f))


def test_tiny_dit_overfits_two_latents():
    """A tiny DiT memorises two latents: the flow loss on a fixed evaluation set of (t, noise) falls at least 3x in
    300 AdamW steps (measured: from 1.96 to about 0.40, about 5x)."""
    dit = SparseDiT(DiTConfig.tiny(backend="reference"))
    torch.manual_seed(0)
    x0 = _batch((60, 50), seed=11)
    cond = torch.randn(2, 21, 32)
    g = torch.Generator().manual_seed(123)
    evals = [(torch.rand(2, generator=g), torch.randn(x0.num_voxels, 4, generator=g)) for _ in range(8)]

    def evaluate():
        with torch.no_grad():
            return sum(float(flow_loss(dit, x0, cond, t=t, noise=n)["loss"]) for t, n in evals) / len(evals)

    before = evaluate()
    opt = torch.optim.AdamW(dit.parameters(), lr=3e-3)
    gen = torch.Generator().manual_seed(0)
    for _ in range(300):
        loss = flow_loss(dit, x0, cond, generator=gen)["loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()
    after = evaluate()
    assert after < before / 3, (before, after)


# ---------------------------------------------------------------------------------------------------------------
# released parameter names

#: Model-level keys of the released sparse DiTs (``W`` = 1024).
_TOP = [("t_embedder.mlp.0.weight", "W,256"), ("t_embedder.mlp.0.bias", "W"), ("t_embedder.mlp.2.weight", "W,W"),
        ("t_embedder.mlp.2.bias", "W"), ("input_layer.weight", "W,16"), ("input_layer.bias", "W"),
        ("out_layer.weight", "16,W"), ("out_layer.bias", "16")]
_TOP_V10 = [("cond_proj.weight", "W,W"), ("cond_proj.bias", "W")]
#: Keys of one block (``blocks.{i}.`` prefix), v1.1.
_BLOCK = [("norm2.weight", "W"), ("norm2.bias", "W"), ("self_attn.intra_block_pe", "8,8,8,64"),
          ("self_attn.proj_q.weight", "W,W"), ("self_attn.proj_k.weight", "64,W"), ("self_attn.proj_v.weight", "64,W"),
          ("self_attn.proj_o.weight", "W,W"), ("self_attn.gate.0.weight", "3,W"),
          ("cross_attn.to_q.weight", "W,W"), ("cross_attn.to_q.bias", "W"), ("cross_attn.to_kv.weight", "2048,W"),
          ("cross_attn.to_kv.bias", "2048"), ("cross_attn.to_out.weight", "W,W"), ("cross_attn.to_out.bias", "W"),
          ("mlp.mlp.0.weight", "4096,W"), ("mlp.mlp.0.bias", "4096"), ("mlp.mlp.2.weight", "W,4096"),
          ("mlp.mlp.2.bias", "W"), ("adaLN_modulation.1.weight", "6144,W"), ("adaLN_modulation.1.bias", "6144")]
_CMP_V11 = [("act_layers.0.conv.kernel", "64,64"), ("act_layers.0.conv.bias", "64")]
_CMP_V10 = [("act_layers.0.weight", "64"), ("act_layers.0.bias", "64"), ("out_layers.0.conv.kernel", "27,64,64"),
            ("out_layers.0.conv.bias", "64"), ("out_layers.1.weight", "64"), ("out_layers.1.bias", "64"),
            ("out_layers.3.conv.kernel", "27,64,64"), ("out_layers.3.conv.bias", "64")]
#: Released keys we intentionally do not have (none: every released parameter maps one to one).
MISSING_ON_PURPOSE: dict[str, str] = {}


def _released_listing(version: str) -> dict[str, list[int]]:
    def shape(s):
        return [1024 if d == "W" else int(d) for d in s.split(",")]

    keys = dict((n, shape(s)) for n, s in _TOP + (_TOP_V10 if version == "v1.0" else []))
    cmp_keys = _CMP_V10 if version == "v1.0" else _CMP_V11
    for i in range(24):
        for n, s in _BLOCK:
            keys[f"blocks.{i}.{n}"] = shape(s)
        if version == "v1.0":
            keys[f"blocks.{i}.self_attn.intra_block_pe"] = [4, 4, 4, 64]
        for which in ("compression_key", "compression_value"):
            for n, s in cmp_keys:
                keys[f"blocks.{i}.self_attn.{which}.{n}"] = shape(s)
    return keys


def _ours(config: DiTConfig) -> dict[str, list[int]]:
    with torch.device("meta"):
        dit = SparseDiT(config)
    return {k: list(v.shape) for k, v in dit.state_dict().items()}


def _shared_file(name: str) -> Path | None:
    for root in (Path(__file__).resolve().parents[2] / "shared", Path("/work/shared")):
        path = root / "released-model" / name
        if path.is_file():
            return path
    return None


@pytest.mark.parametrize("version,config,count,elements", [
    ("v1.1", DiTConfig.released_1024(), 584, 509_286_416),
    ("v1.0", DiTConfig.released_1024_v10(), 874, 520_083_472),
])
def test_released_parameter_names_and_shapes(version, config, count, elements):
    """Every key and shape of the released sparse_dit_1024 state dict (embedded compactly here) exists in our
    released_1024 model built on the meta device, and nothing else does."""
    ours = _ours(config)
    released = _released_listing(version)
    assert len(released) == count and sum(math.prod(s) for s in released.values()) == elements
    assert sorted(set(released) - set(ours)) == sorted(MISSING_ON_PURPOSE)
    assert not set(ours) - set(released), f"extra keys: {sorted(set(ours) - set(released))[:5]}"
    assert {k: ours[k] for k in released} == released


@pytest.mark.parametrize("name,config", [
    ("statedict-sparse_dit_1024.txt", DiTConfig.released_1024()),
    ("statedict-v1.0-sparse_dit_1024.txt", DiTConfig.released_1024_v10()),
    ("statedict-sparse_dit_512.txt", DiTConfig.released_512()),
    ("statedict-v1.0-sparse_dit_512.txt", DiTConfig.released_512_v10()),
])
def test_released_parameter_names_match_the_full_listing(name, config):
    path = _shared_file(name)
    if path is None:
        pytest.skip("shared/released-model is not beside this checkout")
    released = {}
    for line in path.read_text().splitlines():
        if line.startswith("#") or not line.strip():
            continue
        key, shape = line.split("\t")[:2]
        released[key] = [int(d) for d in shape.strip("[]").split(",") if d.strip()]
    assert _ours(config) == released


# ---------------------------------------------------------------------------------------------------------------
# image conditioning


def _rgba(h=100, w=200, box=(20, 60, 50, 130)):
    a = np.zeros((h, w, 4), np.uint8)
    a[..., :3] = 30
    r0, r1, c0, c1 = box
    a[r0:r1, c0:c1] = (200, 30, 30, 255)
    return a


def test_preprocess_rgba_crops_pads_and_resizes():
    from PIL import Image

    from model.nets.conditioning import preprocess_image

    pre = preprocess_image(Image.fromarray(_rgba(), "RGBA"))
    assert pre.rgb.shape == (3, 518, 518) and pre.mask.shape == (518, 518)
    rows = torch.nonzero(pre.mask.amax(1) > 0).squeeze(1)
    cols = torch.nonzero(pre.mask.amax(0) > 0).squeeze(1)
    # crop 40 x 80 -> square 80 (20 rows of padding on top) -> 518 -> +16 border (550) -> 518
    s1, s2 = 518 / 80, 518 / 550
    exp_rows = ((20 * s1 + 16) * s2, (60 * s1 + 16) * s2)
    exp_cols = ((0 * s1 + 16) * s2, (80 * s1 + 16) * s2)
    assert abs(int(rows[0]) - exp_rows[0]) <= 1.5 and abs(int(rows[-1]) + 1 - exp_rows[1]) <= 1.5
    assert abs(int(cols[0]) - exp_cols[0]) <= 1.5 and abs(int(cols[-1]) + 1 - exp_cols[1]) <= 1.5
    torch.testing.assert_close(pre.rgb[:, 259, 259], torch.tensor([200, 30, 30]) / 255.0)
    torch.testing.assert_close(pre.rgb[:, 5, 5], torch.ones(3))  # white border
    torch.testing.assert_close(pre.rgb[:, 60, 259], torch.ones(3))  # white square padding above the object


def test_preprocess_needs_alpha_or_mask(tmp_path):
    from PIL import Image

    from model.nets.conditioning import load_image, preprocess_image

    rgb = Image.fromarray(_rgba()[..., :3], "RGB")
    with pytest.raises(ValueError, match="no alpha channel"):
        preprocess_image(rgb)
    mask = Image.fromarray(_rgba()[..., 3], "L")
    rgb.save(tmp_path / "img.png")
    mask.save(tmp_path / "mask.png")
    with_mask = preprocess_image(tmp_path / "img.png", tmp_path / "mask.png")
    direct = preprocess_image(Image.fromarray(_rgba(), "RGBA"))
    torch.testing.assert_close(with_mask.rgb, direct.rgb)
    with pytest.raises(ValueError, match="do not pass a mask"):
        load_image(Image.fromarray(_rgba(), "RGBA"), mask)
    with pytest.raises(ValueError, match="mask is"):
        load_image(rgb, mask.resize((10, 10)))
    with pytest.raises(ValueError, match="unsupported mode"):
        load_image(Image.new("CMYK", (8, 8)))
    with pytest.raises(FileNotFoundError):
        load_image(tmp_path / "missing.png")


def test_encoder_dense_and_sparse_conditions():
    pytest.importorskip("transformers", reason="the image encoder needs transformers")
    from PIL import Image

    from model.nets.conditioning import DinoV2Encoder, sparse_condition, tiny_dinov2_config

    with pytest.warns(UserWarning, match="RANDOM weights"):
        enc = DinoV2Encoder.random(tiny_dinov2_config(), seed=0)
    img = Image.fromarray(_rgba(), "RGBA")
    dense = enc.encode_images([img])
    assert dense.tokens.shape == (1, 21, 32) and dense.mask is None
    torch.testing.assert_close(dense.tokens.mean(-1), torch.zeros(1, 21), atol=1e-5, rtol=0)
    # the features are the pre-final-norm tokens through a parameter-free layer norm
    x = (torch.rand(1, 3, 56, 56))
    hs = enc.model(pixel_values=(x - enc.mean) / enc.std, output_hidden_states=True).hidden_states[-1]
    torch.testing.assert_close(enc(x), torch.nn.functional.layer_norm(hs, (32,), eps=1e-5))
    # sparse: class + 4 registers + the patches under the (max-pooled) mask
    tokens = torch.randn(2, 21, 32)
    masks = torch.zeros(2, 56, 56)
    masks[0, 0, 0] = 1.0  # patch (row 0, col 0)
    masks[0, 30, 50] = 0.5  # patch (row 2, col 3)
    masks[1, 20:22, 14:16] = 1.0  # patch (row 1, col 1)
    cond = sparse_condition(tokens, masks)
    assert cond.tokens.shape == (2, 7, 32)
    assert cond.mask.tolist() == [[True] * 7, [True] * 6 + [False]]
    torch.testing.assert_close(cond.tokens[0], tokens[0, [0, 1, 2, 3, 4, 5, 5 + 2 * 4 + 3]])
    torch.testing.assert_close(cond.tokens[1, :6], tokens[1, [0, 1, 2, 3, 4, 5 + 1 * 4 + 1]])
    assert cond.positions[0].tolist() == [[0, 0, 1]] * 5 + [[0, 0, 0], [3, 2, 0]]
    assert cond.positions[1, 5].tolist() == [1, 1, 0]
