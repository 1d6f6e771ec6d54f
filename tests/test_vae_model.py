"""The sparse SDF VAE: shapes, pruning rule, losses, dtypes, a CPU overfit, and the released parameter layout."""
import dataclasses
import pathlib
import re

import pytest
import torch

from model.sparse import SparseTensor
from model.nets.vae import SparseSDFVAE, VAEConfig, VAELossConfig, vae_loss

#: Where the full released listings live on the development machines (not in the repository): when present,
#: the compact copy below is checked against them.
RELEASED_LISTINGS = pathlib.Path("/work/shared/released-model")
#: The released sparse VAE state dict (both sparse_vae_512 and sparse_vae_1024, v1.1: same names and shapes),
#: copied from statedict-patterns.txt: ``{a..b}`` is every index in the range, ``{a,b}`` each listed index.
RELEASED_SPARSE_VAE = """
encoder.input_layer.weight  [512, 512]
encoder.input_layer.bias  [512]
encoder.blocks.{0..3}.attn.to_qkv.weight  [1536, 512]
encoder.blocks.{0..3}.attn.to_qkv.bias  [1536]
encoder.blocks.{0..3}.attn.to_out.weight  [512, 512]
encoder.blocks.{0..3}.attn.to_out.bias  [512]
encoder.blocks.{0..3}.mlp.mlp.0.weight  [2048, 512]
encoder.blocks.{0..3}.mlp.mlp.0.bias  [2048]
encoder.blocks.{0..3}.mlp.mlp.2.weight  [512, 2048]
encoder.blocks.{0..3}.mlp.mlp.2.bias  [512]
encoder.input_layer1.weight  [32, 1]
encoder.input_layer1.bias  [32]
encoder.downsample.0.act_layers.0.weight  [32]
encoder.downsample.0.act_layers.0.bias  [32]
encoder.downsample.0.out_layers.0.conv.kernel  [27, 32, 64]
encoder.downsample.0.out_layers.{0,3}.conv.bias  [64]
encoder.downsample.0.out_layers.1.weight  [64]
encoder.downsample.0.out_layers.1.bias  [64]
encoder.downsample.0.out_layers.3.conv.kernel  [27, 64, 64]
encoder.downsample.0.skip_connection.conv.kernel  [32, 64]
encoder.downsample.0.skip_connection.conv.bias  [64]
encoder.downsample.1.act_layers.0.weight  [64]
encoder.downsample.1.act_layers.0.bias  [64]
encoder.downsample.1.out_layers.0.conv.kernel  [27, 64, 128]
encoder.downsample.1.out_layers.{0,3}.conv.bias  [128]
encoder.downsample.1.out_layers.1.weight  [128]
encoder.downsample.1.out_layers.1.bias  [128]
encoder.downsample.1.out_layers.3.conv.kernel  [27, 128, 128]
encoder.downsample.1.skip_connection.conv.kernel  [64, 128]
encoder.downsample.1.skip_connection.conv.bias  [128]
encoder.downsample.2.act_layers.0.weight  [128]
encoder.downsample.2.act_layers.0.bias  [128]
encoder.downsample.2.out_layers.0.conv.kernel  [27, 128, 512]
encoder.downsample.2.out_layers.{0,3}.conv.bias  [512]
encoder.downsample.2.out_layers.1.weight  [512]
encoder.downsample.2.out_layers.1.bias  [512]
encoder.downsample.2.out_layers.3.conv.kernel  [27, 512, 512]
encoder.downsample.2.skip_connection.conv.kernel  [128, 512]
encoder.downsample.2.skip_connection.conv.bias  [512]
encoder.out_layer.weight  [32, 512]
encoder.out_layer.bias  [32]
decoder.input_layer.weight  [512, 16]
decoder.input_layer.bias  [512]
decoder.blocks.{0..3}.attn.to_qkv.weight  [1536, 512]
decoder.blocks.{0..3}.attn.to_qkv.bias  [1536]
decoder.blocks.{0..3}.attn.to_out.weight  [512, 512]
decoder.blocks.{0..3}.attn.to_out.bias  [512]
decoder.blocks.{0..3}.mlp.mlp.0.weight  [2048, 512]
decoder.blocks.{0..3}.mlp.mlp.0.bias  [2048]
decoder.blocks.{0..3}.mlp.mlp.2.weight  [512, 2048]
decoder.blocks.{0..3}.mlp.mlp.2.bias  [512]
decoder.upsample.0.act_layers.0.conv.kernel  [27, 512, 128]
decoder.upsample.0.act_layers.0.conv.bias  [128]
decoder.upsample.0.out_layers.0.conv.kernel  [27, 128, 128]
decoder.upsample.0.out_layers.0.conv.bias  [128]
decoder.upsample.1.act_layers.0.conv.kernel  [27, 128, 64]
decoder.upsample.1.act_layers.0.conv.bias  [64]
decoder.upsample.1.out_layers.0.conv.kernel  [27, 64, 64]
decoder.upsample.1.out_layers.0.conv.bias  [64]
decoder.upsample.2.act_layers.0.conv.kernel  [27, 64, 32]
decoder.upsample.2.act_layers.0.conv.bias  [32]
decoder.upsample.2.out_layers.0.conv.kernel  [27, 32, 32]
decoder.upsample.2.out_layers.0.conv.bias  [32]
decoder.out_layer.weight  [1, 32]
decoder.out_layer.bias  [1]
"""

#: Sphere shell of the tests: grid side, radius and band half-width (voxels).
SHELL_RESOLUTION, SHELL_RADIUS, SHELL_TAU = 32, 10.0, 1.5
#: Our keys that the released checkpoint does not have: the learned pruning heads (see model/nets/vae.py).
OURS_ONLY = {f"pruning.heads.{i}.{p}" for i in range(3) for p in ("weight", "bias")}
#: Released keys we intentionally do not have: none (every released parameter is mirrored).
RELEASED_ONLY: set = set()


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def sphere_shell(resolution=SHELL_RESOLUTION, radius=SHELL_RADIUS, tau=SHELL_TAU, dtype=torch.float32):
    """Voxels with ``|sdf| < tau`` of a centred sphere, SDF normalised by ``tau`` (so in (-1, 1)): ``[N, 1]``."""
    centres = torch.arange(resolution, dtype=torch.float64) + 0.5
    gx, gy, gz = torch.meshgrid(centres, centres, centres, indexing="ij")
    sdf = ((gx - resolution / 2) ** 2 + (gy - resolution / 2) ** 2 + (gz - resolution / 2) ** 2).sqrt() - radius
    band = sdf.abs() < tau
    return SparseTensor.from_list([torch.nonzero(band)], [(sdf[band] / tau).to(dtype).unsqueeze(1)],
                                  resolution=resolution)


def _expand(pattern):
    """``a.{0..2}.b`` -> ``a.0.b, a.1.b, a.2.b``; ``a.{0,3}.b`` -> ``a.0.b, a.3.b``."""
    m = re.search(r"\{(\d+)\.\.(\d+)\}|\{([\d,]+)\}", pattern)
    if m is None:
        return [pattern]
    values = range(int(m[1]), int(m[2]) + 1) if m[1] is not None else [int(v) for v in m[3].split(",")]
    return [name for v in values for name in _expand(pattern[:m.start()] + str(v) + pattern[m.end():])]


def released_shapes():
    """``{name: shape}`` of the released sparse VAE checkpoint (116 entries)."""
    shapes = {}
    for line in RELEASED_SPARSE_VAE.strip().splitlines():
        pattern, shape = line.split("  ")
        for name in _expand(pattern):
            shapes[name] = tuple(int(v) for v in re.findall(r"\d+", shape))
    return shapes


def listing_shapes(part):
    """``{name: shape}`` from the full listing ``statedict-<part>.txt``."""
    shapes = {}
    for line in (RELEASED_LISTINGS / f"statedict-{part}.txt").read_text().splitlines():
        if line.startswith("#") or not line.strip():
            continue
        name, shape = line.split("\t")[:2]
        shapes[name] = tuple(int(v) for v in re.findall(r"\d+", shape))
    return shapes


# -------------------------------------------------------------------------------------------------------------


def test_config_sizes_and_errors():
    cfg = VAEConfig.released_512()
    assert (cfg.downsample_factor, cfg.latent_resolution, cfg.decoder_channels) == (8, 64, (512, 128, 64, 32))
    assert VAEConfig.released_1024().latent_resolution == 128
    assert VAEConfig.tiny(num_heads=4).num_heads == 4
    for kwargs, match in [({"prune": "sdf"}, "prune must be one of"), ({"num_heads": 3}, "num_heads"),
                          ({"conv_channels": (8, 10)}, "conv_channels"), ({"prune_threshold": 1.0}, "prune_threshold"),
                          ({"conv_backend": "x"}, "conv_backend"), ({"window": 7}, "window must be even")]:
        with pytest.raises(ValueError, match=match):
            VAEConfig.tiny(**kwargs)
    with pytest.raises(ValueError, match="weight_kl"):
        VAELossConfig(weight_kl=-1.0)


def test_forward_backward_shapes_and_pruning_rule():
    torch.manual_seed(0)
    x = sphere_shell()
    assert 2000 < x.num_voxels < 6000
    vae = SparseSDFVAE(VAEConfig.tiny())
    out = vae(x, sample_posterior=True)  # training mode: union of predicted and target voxels
    latent_coords = torch.unique(torch.cat([x.coords[:, :1], x.coords[:, 1:] // 8], 1), dim=0)
    assert torch.equal(out.latent.coords, latent_coords.int()) and out.latent.shape == (latent_coords.shape[0], 4)
    assert out.posterior.logvar.shape == out.latent.shape
    sdf = out.decoded.sdf
    assert sdf.num_channels == 1 and sdf.resolution == SHELL_RESOLUTION and bool((sdf.feats.abs() < 1).all())
    assert out.decoded.features.num_channels == 8
    assert bool(sdf.coord_index().contains(x.coords).all())  # every input voxel is decoded while training
    logits, member = out.decoded.prune_logits, out.decoded.prune_targets
    assert len(logits) == len(member) == 3 and all(lg.shape == m.shape for lg, m in zip(logits, member))
    assert logits[0].shape[0] == 8 * latent_coords.shape[0]  # every child of every latent voxel is a candidate
    losses = vae_loss(out, x)
    assert set(losses) == {"loss", "sdf_in", "sdf_extra", "sdf_sharp", "kl", "prune"}
    assert all(bool(torch.isfinite(v)) for v in losses.values()) and float(losses["kl"].detach()) > 0
    losses["loss"].backward()
    missing = [n for n, p in vae.named_parameters() if p.grad is None or not bool(torch.isfinite(p.grad).all())]
    assert not missing

    vae.eval()  # inference: only predicted voxels, no union
    with torch.no_grad():
        z = vae.encode(x).mode()
        decoded = vae.decode(z)
    assert decoded.prune_targets is None and decoded.sdf.num_voxels <= 8**3 * z.num_voxels


def test_prune_none_decodes_every_fine_voxel_like_the_released_decoder():
    x = sphere_shell(resolution=16, radius=5.0)
    vae = SparseSDFVAE(VAEConfig.tiny(prune="none")).eval()
    assert vae.pruning is None
    with torch.no_grad():
        out = vae(x)
    assert out.decoded.sdf.num_voxels == 8**3 * out.latent.num_voxels and out.decoded.prune_logits == []
    losses = vae_loss(out, x)
    assert float(losses["prune"]) == 0.0 and float(losses["sdf_extra"]) > 0


def test_loss_targets_extra_and_sharp_voxels():
    torch.manual_seed(0)
    x = sphere_shell(resolution=16, radius=5.0)
    vae = SparseSDFVAE(VAEConfig.tiny(prune="none"))
    out = vae(x, sample_posterior=False)
    pred = out.decoded.sdf
    is_in = x.coord_index().contains(pred.coords)
    p = pred.feats[:, 0].detach()
    tau = 0.7
    losses = vae_loss(out, x, VAELossConfig(extra_truncation=tau))
    expected = ((p[~is_in] - torch.where(p[~is_in] >= 0, tau, -tau)) ** 2).mean()
    torch.testing.assert_close(losses["sdf_extra"].detach(), expected)
    # a true-SDF callable replaces the truncated target
    zero = vae_loss(out, x, extra_sdf=lambda c: torch.zeros(c.shape[0]))
    torch.testing.assert_close(zero["sdf_extra"].detach(), (p[~is_in] ** 2).mean())
    # sharp voxels: the MSE over the marked input voxels only
    sharp = torch.zeros(x.num_voxels, dtype=torch.bool)
    sharp[::3] = True
    s = vae_loss(out, x, sharp_mask=sharp)["sdf_sharp"].detach()
    rows = x.coord_index().lookup(pred.coords)
    marked = (rows >= 0) & sharp[rows.clamp_min(0)]
    torch.testing.assert_close(s, ((p[marked] - x.feats[rows[marked], 0]) ** 2).mean())
    with pytest.raises(ValueError, match="sharp_mask"):
        vae_loss(out, x, sharp_mask=sharp[1:])


def test_float64_gradcheck_and_bf16_autocast():
    torch.manual_seed(0)
    coords = torch.tensor([[x, y, z] for x in range(2, 5) for y in range(3, 5) for z in range(1, 3)])
    vae = SparseSDFVAE(VAEConfig.tiny(prune="none")).double().eval()
    x = SparseTensor.from_list([coords], [torch.rand(coords.shape[0], 1, dtype=torch.float64) * 2 - 1],
                               resolution=16)

    def f(feats):
        out = vae(x.replace(feats))
        return out.decoded.sdf.feats

    assert torch.autograd.gradcheck(f, (x.feats.clone().requires_grad_(),), fast_mode=True)

    vae32 = SparseSDFVAE(VAEConfig.tiny()).train()
    x32 = sphere_shell(resolution=16, radius=5.0)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = vae32(x32)
        losses = vae_loss(out, x32)
    assert out.decoded.sdf.dtype == torch.bfloat16 and losses["loss"].dtype == torch.float32
    losses["loss"].backward()
    assert all(p.grad is not None for p in vae32.parameters())


#: Overfitting one sphere shell: steps, learning rate and the factor by which the total loss must fall.
#: (Seeds 0-5 on the development machine: loss fell 11-53x, input-voxel SDF MSE 5.6-19x, recall 0.95-0.996.)
OVERFIT_STEPS, OVERFIT_LR, OVERFIT_LOSS_FACTOR, OVERFIT_SDF_FACTOR = 150, 3e-3, 5.0, 3.0
#: Fraction of the input voxels the inference rule alone (predicted voxels only) must decode after overfitting.
OVERFIT_RECALL = 0.9
#: Gradient clipping of the overfit run (keeps Adam steady on this tiny model).
OVERFIT_CLIP = 1.0


def test_tiny_vae_overfits_one_shape():
    """Training mode (union pruning rule, posterior mean): the total loss falls more than 5x and the input-voxel
    SDF MSE more than 3x in 150 Adam steps; afterwards the inference rule alone decodes > 90% of the input voxels."""
    torch.manual_seed(0)
    x = sphere_shell()
    vae = SparseSDFVAE(VAEConfig.tiny())
    opt = torch.optim.Adam(vae.parameters(), lr=OVERFIT_LR)
    history = []
    for _ in range(OVERFIT_STEPS):
        losses = vae_loss(vae(x, sample_posterior=False), x)
        opt.zero_grad()
        losses["loss"].backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), OVERFIT_CLIP)
        opt.step()
        history.append({k: float(v.detach()) for k, v in losses.items()})
    first, last = history[0], history[-5:]
    final_loss = sum(h["loss"] for h in last) / len(last)
    final_sdf = sum(h["sdf_in"] for h in last) / len(last)
    assert final_loss < first["loss"] / OVERFIT_LOSS_FACTOR, (first, last)
    assert final_sdf < first["sdf_in"] / OVERFIT_SDF_FACTOR, (first, last)
    vae.eval()
    with torch.no_grad():
        decoded = vae(x).decoded
    recall = float(decoded.sdf.coord_index().contains(x.coords).float().mean())
    assert recall > OVERFIT_RECALL, recall


@pytest.mark.parametrize("part", ["sparse_vae_512", "sparse_vae_1024"])
def test_released_parameter_names_and_shapes(part):
    cfg = VAEConfig.released_512() if part.endswith("512") else VAEConfig.released_1024()
    with torch.device("meta"):
        vae = SparseSDFVAE(cfg)
        vae_no_heads = SparseSDFVAE(dataclasses.replace(cfg, prune="none"))
    ours = {k: tuple(v.shape) for k, v in vae.state_dict().items()}
    released = released_shapes()
    assert len(released) == 116
    if RELEASED_LISTINGS.exists():
        assert listing_shapes(part) == released
    assert set(ours) - set(released) == OURS_ONLY
    assert set(released) - set(ours) == RELEASED_ONLY
    mismatched = {k: (ours[k], released[k]) for k in set(ours) & set(released) if ours[k] != released[k]}
    assert not mismatched
    assert {k: tuple(v.shape) for k, v in vae_no_heads.state_dict().items()} == released  # loads strictly
    assert sum(v.numel() for k, v in vae.state_dict().items() if k in released) == 37_874_113


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_decode_triton_convolutions_match_the_torch_backend():
    """The sampling path's decoder (auto backend: the Triton convolution without autograd) against the torch
    backend, same weights, on the GPU: equal to float noise in float32; in bfloat16 both against the float32 decode,
    the kernel (float32 sums, one rounding) no further from it than the torch backend (a rounding per tap)."""
    from model.sparse.conv import SparseConv3d

    torch.manual_seed(0)
    x = sphere_shell()
    vae = SparseSDFVAE(VAEConfig.tiny(prune="none")).eval().cuda()  # prune none: the same voxels in every run
    convs = [m for m in vae.modules() if isinstance(m, SparseConv3d)]

    def decode(dtype, backend):
        for m in convs:
            m.backend = backend
        vae.to(dtype)
        with torch.no_grad():
            z = vae.encode(x.to(device="cuda").replace(x.feats.cuda().to(dtype))).mode()
            return vae.decode(z).sdf

    ref32, auto32 = decode(torch.float32, "torch"), decode(torch.float32, "auto")
    assert torch.equal(auto32.coords, ref32.coords)
    rel = lambda a, b: float((a.feats.double() - b.feats.double()).norm() / b.feats.double().norm())  # noqa: E731
    assert rel(auto32, ref32) < 1e-5
    auto16, torch16 = decode(torch.bfloat16, "auto"), decode(torch.bfloat16, "torch")
    assert torch.equal(auto16.coords, ref32.coords)
    assert rel(auto16, ref32) <= 1.5 * rel(torch16, ref32) + 1e-3
