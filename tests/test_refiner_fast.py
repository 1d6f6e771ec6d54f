"""The refiners' inference paths (model.nets.refiner): empty patches run once with the same result, channels-last
equals contiguous, the in-place adaptive filter and the group norm equal their plain formulas, and the timing script
(``python -m model.reports.refiner``) runs on the CPU. Tiny configurations, CPU, float32 unless said otherwise."""
from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from model.nets.refiner import (
    GroupNorm32,
    RefinerConfig,
    ResnetBlock3D,
    SignRefiner,
    VoxelRefiner,
    adaptive_filter,
    patch_offsets,
    predict_sign,
    refine_512,
)

pytestmark = pytest.mark.usefixtures("one_thread")

CL = torch.channels_last_3d


def _voxel_refiner(seed: int = 0) -> VoxelRefiner:
    """A tiny 512 refiner whose output is not vanishingly small: random signed filter logits average a field away
    (nine L1-normalised signed filters shrink it ~1e-6), so the adaptive filters get non-negative logits here."""
    torch.manual_seed(seed)
    ref = VoxelRefiner(RefinerConfig.tiny()).eval()
    with torch.no_grad():
        for block in (ref.adaptive_conv1, ref.adaptive_conv2, ref.adaptive_conv3):
            block[2].weight.abs_()
    return ref


def _sign_refiner(seed: int = 0) -> SignRefiner:
    torch.manual_seed(seed)
    return SignRefiner(RefinerConfig.tiny()).eval()


def _count_calls(module: nn.Module) -> list:
    calls = []
    module.register_forward_pre_hook(lambda m, args: calls.append(1))
    return calls


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


# ---------------------------------------------------------------------------------------------------------------
# empty patches


#: Decoded voxels of the 16^3 grid of the tiny 512 refiner (patches of 8 at offsets 0, 4, 8): two in the patch at
#: (0, 0, 0) only, one in the patch at (8, 8, 8) only, so 25 of the 27 patches are empty.
COORDS_512 = torch.tensor([[1, 1, 1], [2, 3, 1], [13, 14, 12]])


def _direct_refine(ref: VoxelRefiner, coords, sdf, feats) -> torch.Tensor:
    """Every patch through the network, from a dense grid, blended with the linear ramps (written out here)."""
    cfg = ref.config
    r, p, ov = cfg.resolution, cfg.patch_size, cfg.overlap
    offs = patch_offsets(r, p, cfg.patch_stride)
    grid_sdf = torch.ones(1, 1, r, r, r)
    grid_feats = torch.zeros(1, feats.shape[1], r, r, r)
    grid_sdf[0, 0, coords[:, 0], coords[:, 1], coords[:, 2]] = sdf
    grid_feats[0, :, coords[:, 0], coords[:, 1], coords[:, 2]] = feats.T
    ramps = []
    for i in range(len(offs)):
        w = torch.ones(p)
        if i > 0:
            w[:ov] = torch.linspace(0, 1, ov)
        if i + 1 < len(offs):
            w[p - ov:] = 1 - torch.linspace(0, 1, ov)
        ramps.append(w)
    out = torch.zeros(r, r, r)
    with torch.no_grad():
        for i, ox in enumerate(offs):
            for j, oy in enumerate(offs):
                for k, oz in enumerate(offs):
                    sl = (slice(ox, ox + p), slice(oy, oy + p), slice(oz, oz + p))
                    pred = ref(grid_sdf[(0, slice(None), *sl)][None], grid_feats[(0, slice(None), *sl)][None])[0, 0]
                    out[sl] += ramps[i][:, None, None] * ramps[j][None, :, None] * ramps[k][None, None, :] * pred
    return out


def test_refine_512_runs_empty_patches_once_with_the_same_result():
    ref = _voxel_refiner()
    gen = torch.Generator().manual_seed(1)
    sdf, feats = torch.rand(3, generator=gen) * 2 - 1, torch.randn(3, 8, generator=gen)
    calls = _count_calls(ref)
    stats = {}
    fast = refine_512(ref, COORDS_512, sdf, feats, stats=stats, channels_last=False)
    assert stats == {"patches": 27, "run": 3, "reused": 24, "empty": 25}
    assert len(calls) == 3
    calls.clear()
    every_stats = {}
    every = refine_512(ref, COORDS_512, sdf, feats, stats=every_stats, reuse_empty=False, channels_last=False)
    assert every_stats == {"patches": 27, "run": 27, "reused": 0, "empty": 25} and len(calls) == 27
    assert torch.equal(fast, every)  # exactly the same numbers
    assert float(fast.abs().max()) > 1e-2  # a field, not zeros
    direct = _direct_refine(ref, COORDS_512, sdf, feats)
    torch.testing.assert_close(fast, direct, rtol=1e-6, atol=1e-6 * float(direct.abs().max()))
    # a changed empty-patch output shows up: the reused output is really the empty patches' own
    with torch.no_grad():
        ref.conv_in.bias.add_(0.5)
    assert not torch.equal(refine_512(ref, COORDS_512, sdf, feats, channels_last=False), fast)


def test_refine_512_without_empty_patches_runs_every_patch():
    ref = _voxel_refiner()
    coords = torch.stack(torch.meshgrid(*[torch.arange(0, 16, 3)] * 3, indexing="ij"), -1).reshape(-1, 3)
    stats = {}
    refine_512(ref, coords, torch.zeros(len(coords)), torch.zeros(len(coords), 8), stats=stats)
    assert stats == {"patches": 27, "run": 27, "reused": 0, "empty": 0}


#: Decoded voxels of the 32^3 field of the tiny sign refiner (pooled to 16^3, patches of 8 at offsets 0, 4, 8): one
#: pooled voxel in the patch at (0, 0, 0) only, one in the patch at (8, 8, 8) only.
FINE_1024 = torch.tensor([[2, 2, 3], [27, 28, 26]])


def _direct_sign(sign: SignRefiner, fine, values) -> torch.Tensor:
    """Every patch through the network on the pooled dense grid ("mean" pooling: one child per parent here)."""
    cfg = sign.config
    r, p = cfg.resolution, cfg.patch_size
    grid = torch.ones(1, 1, r, r, r)
    parent = fine // 2
    grid[0, 0, parent[:, 0], parent[:, 1], parent[:, 2]] = values
    out = torch.ones(r, r, r)
    offs = patch_offsets(r, p, cfg.patch_stride)
    with torch.no_grad():
        for ox in offs:
            for oy in offs:
                for oz in offs:
                    sl = (slice(ox, ox + p), slice(oy, oy + p), slice(oz, oz + p))
                    logits = sign(grid[(0, slice(None), *sl)][None])[0, 0]
                    out[sl] = torch.where(torch.sigmoid(logits) >= 0.5, 1.0, -1.0)
    return out


def test_predict_sign_runs_empty_patches_once_with_the_same_result():
    sign = _sign_refiner()
    assert sign.config.pool_mode == "mean"
    values = torch.tensor([-0.7, 0.4])
    calls = _count_calls(sign)
    stats = {}
    fast = predict_sign(sign, FINE_1024, values, 32, stats=stats, channels_last=False)
    assert stats == {"patches": 27, "run": 3, "reused": 24, "empty": 25, "skipped": 0} and len(calls) == 3
    every_stats = {}
    every = predict_sign(sign, FINE_1024, values, 32, stats=every_stats, reuse_empty=False, channels_last=False)
    assert every_stats["run"] == 27 and every_stats["reused"] == 0
    assert torch.equal(fast, every)
    assert torch.equal(fast, _direct_sign(sign, FINE_1024, values))
    assert set(fast.unique().tolist()) == {-1.0, 1.0}  # both signs occur: the comparison sees something


@pytest.mark.parametrize("near", [0, 1, 3])
def test_predict_sign_near_the_decoded_voxels_skips_patches_and_keeps_the_wanted_values(near):
    """With ``near``, the patches that have the last word on no voxel within ``near`` of a decoded one (pooled) do
    not run; every voxel within ``near`` keeps the bits of the full run, and a patch that has the last word on
    such a voxel is never skipped."""
    sign = _sign_refiner()
    fine = torch.tensor([[2, 2, 3], [3, 2, 3], [5, 9, 4]])  # pooled: (1, 1, 1), (2, 4, 2), in the first patches
    values = torch.tensor([-0.7, -0.2, 0.4])
    full = predict_sign(sign, fine, values, 32, channels_last=False)
    calls = _count_calls(sign)
    stats = {}
    got = predict_sign(sign, fine, values, 32, channels_last=False, stats=stats, near=near)
    r = sign.config.resolution
    pooled = torch.unique(fine // 2, dim=0)
    grid = torch.stack(torch.meshgrid(*[torch.arange(r)] * 3, indexing="ij"), -1)  # [r, r, r, 3]
    wanted = ((grid[:, :, :, None, :] - pooled).abs().amax(-1) <= near).any(-1)
    assert torch.equal(got[wanted], full[wanted])
    assert stats["skipped"] > 0 and stats["run"] + stats["reused"] + stats["skipped"] == 27
    assert len(calls) == stats["run"]
    # the patches that ran are exactly those with the last word on a wanted voxel
    offs = patch_offsets(r, sign.config.patch_size, sign.config.patch_stride)
    last = torch.zeros(r, dtype=torch.long)
    for i, off in enumerate(offs):
        last[off:off + sign.config.patch_size] = i
    owners = {tuple(t) for t in torch.stack([last[grid[..., a][wanted]] for a in range(3)], 1).tolist()}
    assert 27 - stats["skipped"] == len(owners)
    with pytest.raises(ValueError, match="near"):
        predict_sign(sign, fine, values, 32, near=-1)


# ---------------------------------------------------------------------------------------------------------------
# channels-last


def _channels_last_convs(module: nn.Module) -> None:
    """Make every convolution return channels-last, as cuDNN does with channels-last weights (PyTorch's CPU
    convolutions return NCDHW for these sizes), so that every other op sees channels-last inputs."""
    def hook(m, args, out):
        return out.contiguous(memory_format=CL)

    for m in module.modules():
        if isinstance(m, (nn.Conv3d, nn.ConvTranspose3d)):
            m.register_forward_hook(hook)


def _layouts_seen(module: nn.Module) -> list:
    """(module kind, channels-last?) of the inputs of the norms and convolutions with more than one channel and more
    than one voxel (the UNet's 1^3 bottom of the tiny configuration is both layouts at once)."""
    seen = []

    def hook(m, args):
        x = args[0]
        if x.shape[1] > 1 and x[0, 0].numel() > 1:
            seen.append((type(m).__name__, x.is_contiguous(memory_format=CL) and not x.is_contiguous()))

    for m in module.modules():
        if isinstance(m, (GroupNorm32, nn.Conv3d, nn.ConvTranspose3d)):
            m.register_forward_pre_hook(hook)
    return seen


def test_refine_512_channels_last_equals_contiguous():
    ref = _voxel_refiner()
    gen = torch.Generator().manual_seed(2)
    coords = torch.unique(torch.randint(0, 16, (400, 3), generator=gen), dim=0)
    sdf, feats = torch.rand(len(coords), generator=gen) * 2 - 1, torch.randn(len(coords), 8, generator=gen)
    plain = refine_512(ref, coords, sdf, feats, channels_last=False)
    assert refine_512(ref, coords, sdf, feats).equal(plain)  # default on the CPU: contiguous
    weights_cl = []
    ref.unet3d1.conv_in.register_forward_pre_hook(
        lambda m, args: weights_cl.append(m.weight.is_contiguous(memory_format=CL) and not m.weight.is_contiguous()))
    _channels_last_convs(ref)
    seen = _layouts_seen(ref)
    stats = {}
    fast = refine_512(ref, coords, sdf, feats, channels_last=True, stats=stats)
    assert _rel(fast, plain) < 1e-5
    assert weights_cl and all(weights_cl)  # the weights were channels-last during the call ...
    assert ref.unet3d1.conv_in.weight.is_contiguous()  # ... and are contiguous again afterwards
    assert stats["run"] == 27 and seen and all(cl for _, cl in seen), [s for s in seen if not s[1]][:5]
    assert {"GroupNorm32", "Conv3d", "ConvTranspose3d"} <= {kind for kind, _ in seen}


def _sign_case(seed: int):
    """A tiny sign refiner whose forward calls append their logits to the returned list, 600 random decoded voxels
    of a 32^3 field and their values."""
    sign = _sign_refiner()
    gen = torch.Generator().manual_seed(seed)
    fine = torch.unique(torch.randint(0, 32, (600, 3), generator=gen), dim=0)
    values = torch.rand(len(fine), generator=gen) * 2 - 1
    logits = []
    sign.register_forward_hook(lambda m, args, out: logits.append(out.detach().clone()))
    return sign, fine, values, logits


def test_predict_sign_channels_last_equals_contiguous():
    sign, fine, values, logits = _sign_case(3)
    plain = predict_sign(sign, fine, values, 32, channels_last=False)
    _channels_last_convs(sign)
    seen = _layouts_seen(sign)
    fast = predict_sign(sign, fine, values, 32, channels_last=True)
    assert len(logits) == 54 and seen and all(cl for _, cl in seen)
    for a, b in zip(logits[27:], logits[:27]):
        assert _rel(a, b) < 1e-5
    margin = torch.stack(logits[:27]).abs().min()
    assert torch.equal(fast, plain) or float(margin) < 1e-5  # the signs agree unless a logit sits at 0


def test_wide_layout_equals_contiguous_and_restores_the_weights():
    """``channels_last="wide"``: during the call the weights below full resolution are channels-last (the first
    downsampler, the lower down blocks, the middle, the up blocks but the last) and those at full resolution are not;
    afterwards every weight is as before; the signs equal the NCDHW run's (unless a logit sits at 0); a bad value is
    a ValueError naming the argument."""
    from model.nets.refiner_layout import LAYOUTS, set_layout, wide_modules

    sign, fine, values, logits = _sign_case(6)
    plain = predict_sign(sign, fine, values, 32, channels_last=False)
    wide_params = {id(p) for m in wide_modules(sign) for p in m.parameters() if p.dim() == 5}
    assert wide_params and len(wide_params) < sum(1 for p in sign.parameters() if p.dim() == 5)
    during = []

    def record(m, args):  # (a wide weight?, channels-last?) of every weight whose layout is not ambiguous (1^3)
        during.append([(id(p) in wide_params, _is_cl(p)) for p in sign.parameters()
                       if p.dim() == 5 and not (p.is_contiguous() and p.is_contiguous(memory_format=CL))])

    handle = sign.register_forward_pre_hook(record)
    got = predict_sign(sign, fine, values, 32, channels_last="wide")
    handle.remove()
    assert during and all(wide == cl for wide, cl in during[0])
    assert {True, False} <= {wide for wide, _ in during[0]}
    assert all(p.is_contiguous() for p in sign.parameters())  # restored
    for a, b in zip(logits[27:], logits[:27]):
        assert _rel(a, b) < 1e-5
    assert torch.equal(got, plain) or float(torch.stack(logits[:27]).abs().min()) < 1e-5
    assert set(LAYOUTS) == {"contiguous", "channels_last", "wide"}
    with pytest.raises(ValueError, match="channels_last"):
        predict_sign(sign, fine, values, 32, channels_last="sideways")
    with pytest.raises(ValueError, match="layout"):
        set_layout(sign, "sideways")


def _is_cl(p: torch.Tensor) -> bool:
    return p.is_contiguous(memory_format=CL) and not p.is_contiguous()


def test_modules_accept_channels_last():
    torch.manual_seed(4)
    block = ResnetBlock3D(8, 16, 4, 1e-5).to(memory_format=CL)
    x = torch.randn(2, 8, 6, 5, 4)
    with torch.no_grad():
        a, b = block(x), block(x.contiguous(memory_format=CL))
    assert _rel(b, a) < 1e-5
    ref = _voxel_refiner()
    s, f = torch.rand(1, 1, 8, 8, 8) * 2 - 1, torch.randn(1, 8, 8, 8, 8)
    with torch.no_grad():
        a = ref(s, f)
        _channels_last_convs(ref)
        ref.to(memory_format=CL)
        b = ref(torch.empty_like(s, memory_format=CL).copy_(s), f.contiguous(memory_format=CL))
    assert _rel(b, a) < 1e-5


# ---------------------------------------------------------------------------------------------------------------
# adaptive filter, group norm, residual block


def _adaptive_reference(x: torch.Tensor, logits: torch.Tensor, iterations: int) -> torch.Tensor:
    """The formula in float64: w = logits / max(sum |logits|, 1e-12); x <- sum_t w_t * shift_t(pad(x))."""
    x, w = x.double(), logits.double()
    w = w / w.abs().sum(1, keepdim=True).clamp_min(1e-12)
    d, h, wd = x.shape[2:]
    for _ in range(iterations):
        padded = F.pad(x, (1, 1, 1, 1, 1, 1))
        x = sum(w[:, 9 * a + 3 * b + c][:, None] * padded[:, :, a:a + d, b:b + h, c:c + wd]
                for a in range(3) for b in range(3) for c in range(3))
    return x


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_adaptive_filter_equals_the_formula(layout):
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(2, 3, 5, 6, 7, generator=gen)
    logits = torch.randn(2, 27, 5, 6, 7, generator=gen)
    logits[0, :, 0, 0, 0] = 0  # an all-zero filter: the 1e-12 floor, output 0 there
    if layout == "channels_last":
        x, logits = x.contiguous(memory_format=CL), logits.contiguous(memory_format=CL)
    before = x.clone()
    for iterations in (1, 3):
        out = adaptive_filter(x, logits, iterations)
        expected = _adaptive_reference(x, logits, iterations)
        assert _rel(out, expected) < 1e-6
        torch.testing.assert_close(out.double(), expected, rtol=1e-5, atol=1e-6 * float(expected.abs().max()))
        assert out.dtype == x.dtype and out.shape == x.shape and out.data_ptr() != x.data_ptr()
        assert (out.is_contiguous(memory_format=CL) and not out.is_contiguous()) == (layout == "channels_last")
    assert torch.equal(x, before)  # the input is not overwritten
    assert torch.equal(adaptive_filter(x, logits, 0), x)
    # bf16: the weights and the accumulation in bf16, within bf16 noise of the formula
    out16 = adaptive_filter(x.bfloat16(), logits.bfloat16(), 3)
    assert out16.dtype == torch.bfloat16
    assert _rel(out16, _adaptive_reference(x.bfloat16(), logits.bfloat16(), 3)) < 2e-2


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_group_norm32_equals_float32_group_norm(dtype, layout):
    gen = torch.Generator().manual_seed(6)
    norm = GroupNorm32(4, 16, eps=1e-5)
    with torch.no_grad():
        norm.weight.copy_(torch.randn(16, generator=gen))
        norm.bias.copy_(torch.randn(16, generator=gen))
    norm = norm.to(dtype)
    x = (torch.randn(2, 16, 5, 4, 6, generator=gen) * 3 + 7).to(dtype)  # a mean far from 0
    if layout == "channels_last":
        x = x.contiguous(memory_format=CL)
    y = norm(x)
    expected = F.group_norm(x.float(), 4, norm.weight.float(), norm.bias.float(), 1e-5)
    assert y.dtype == dtype and y.shape == x.shape
    assert (y.is_contiguous(memory_format=CL) and not y.is_contiguous()) == (layout == "channels_last")
    # float32 statistics, one rounding to the output dtype
    assert torch.equal(y, expected.to(dtype)) or _rel(y.float(), expected) < 1e-6
    assert abs(float(y.float().mean()) - float(norm.bias.float().mean())) < 0.1  # normalised: not the raw input


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_group_norm32_cuda_native_path_matches_float32(dtype):
    gen = torch.Generator().manual_seed(7)
    norm = GroupNorm32(4, 16).cuda().to(dtype)
    x = (torch.randn(1, 16, 24, 24, 24, generator=gen) * 3 + 7).cuda().to(dtype)
    for inp in (x, x.contiguous(memory_format=CL)):
        with torch.no_grad():  # the chunked kernels run without autograd
            y = norm(inp)
        GroupNorm32.cuda_native = False
        try:
            z = norm(inp)
        finally:
            GroupNorm32.cuda_native = True
        assert y.dtype == dtype and _rel(y.float(), z.float()) < 4e-3
        assert y.is_contiguous(memory_format=CL) == inp.is_contiguous(memory_format=CL)


def test_residual_block_in_place_paths_equal_the_autograd_ones():
    torch.manual_seed(8)
    for cin in (8, 16):
        block = ResnetBlock3D(cin, 16, 4, 1e-5)
        x = torch.randn(1, cin, 6, 6, 6)
        before = x.clone()
        with torch.no_grad():
            fast = block(x)
        slow = block(x)
        assert slow.requires_grad and torch.equal(fast, slow.detach())
        assert torch.equal(x, before)  # the in-place SiLU and shortcut leave the input alone


# ---------------------------------------------------------------------------------------------------------------
# the timing script


def test_timing_script_runs_on_the_cpu(tmp_path, capsys):
    from model.reports.refiner import main

    out = tmp_path / "rep"
    assert main(["--out", str(out), "--reps", "1", "--warmup", "1", "--device", "cpu"]) == 0
    printed = capsys.readouterr().out
    assert "no CUDA GPU" in printed and "SMOKE RUN" in printed
    doc = json.loads((out / "refiner.json").read_text())
    assert doc["smoke"] is True and doc["tiny"] is True and doc["device"] == "cpu" and doc["gpu"] == "CPU"
    assert doc["commit"] is None or isinstance(doc["commit"], str)
    assert set(doc["refiners"]) == {"512", "1024"}
    for entry in doc["refiners"].values():
        rows = entry["variants"]
        assert len(rows) == 12 and not [r for r in rows if "error" in r]
        assert [(r["dtype"], r["kernels"], r["layout"]) for r in rows] == [
            ("bf16", "pytorch", "contiguous"), ("bf16", "adaptive", "contiguous"),
            ("bf16", "adaptive+conv", "contiguous"), ("bf16", "adaptive+conv+shortcut", "contiguous"),
            ("bf16", "adaptive+conv-dot", "contiguous"), ("fp16", "adaptive+conv", "contiguous"),
            ("fp16", "adaptive+conv+shortcut", "contiguous"), ("fp16", "adaptive+conv+shortcut+bias", "contiguous"),
            ("fp16", "adaptive+conv+shortcut", "channels_last_3d"),
            ("fp16", "adaptive+conv+shortcut+bias", "channels_last_3d"),
            ("fp16", "adaptive+conv+shortcut", "wide"), ("fp16", "adaptive+conv+shortcut+bias", "wide")]
        assert all(r["median_ms"] > 0 and r["finite"] and len(r["reps_ms"]) == 1 for r in rows)
        assert all(r["rel_diff"] < 0.1 for r in rows[1:])
        assert entry["fastest"] in {r["label"] for r in rows} and entry["patches_per_grid"] == 27
    md = (out / "refiner.md").read_text()
    table_rows = [line for line in md.splitlines() if line.startswith("| ") and "cudnn.benchmark" in line]
    assert md.startswith("# Dense refiners") and "SMOKE RUN" in md and len(table_rows) == 24


def test_timing_script_help_and_profile_table():
    from model.reports.refiner import kernel_kind, markdown
    from tests.test_cli import test_every_option_has_help_that_states_its_default as check_help

    check_help("model.reports.refiner")
    assert kernel_kind("void cudnn::engines_precompiled::nchwToNhwcKernel<__nv_bfloat16>") == "layout transposes"
    assert kernel_kind("sm90_xmma_fprop_implicit_gemm_bf16bf16_bf16f32") == "convolution (cuDNN)"
    assert kernel_kind("void at::native::RowwiseMomentsCUDAKernel<c10::BFloat16, float>") == "group norm"
    assert kernel_kind("void at::native::CatArrayBatchedCopy<...>") == "copy / cat / pad / fill"
    assert kernel_kind("void at::native::vectorized_elementwise_kernel<4, silu>") == "element-wise / reduction"
    assert kernel_kind("_conv3_fma_kernel") == "Triton convolution"
    assert kernel_kind("_adaptive_filter_kernel") == "Triton adaptive filter"
    assert kernel_kind("mystery") == "other"
    row = {"label": "bf16, channels_last_3d, cudnn.benchmark on", "median_ms": 100.0, "first_call_ms": 900.0,
           "peak_gb": 3.0, "first_call_peak_gb": 5.0, "grid_seconds": 2.7, "rel_diff": None, "finite": True}
    doc = {"smoke": False, "tiny": False, "gpu": "NVIDIA H100", "date": "d", "commit": "a" * 40, "torch": "t",
           "triton": "tr", "cuda": "12", "cudnn": 90100, "reps": 3, "warmup": 1,
           "refiners": {"512": {"name": "512 refiner", "patch_size": 192, "parameters": 10, "input_channels": [1, 32],
                                "patches_per_grid": 27, "variants": [row], "fastest": row["label"],
                                "speedup_of_fastest": 1.0,
                                "profile": {"variant": row["label"], "total_ms": 90.0,
                                            "kinds": {"convolution (cuDNN)": 60.0, "group norm": 30.0},
                                            "top_kernels": [["sm90_xmma_fprop", 50.0, 12]]}}}}
    md = markdown(doc)
    assert "cuDNN 90100" in md and "commit aaaaaaaaaaaa" in md and "| convolution (cuDNN) | 60.0 | 67% |" in md
    assert "| `sm90_xmma_fprop` | 50.00 | 12 |" in md and "**bf16, channels_last_3d, cudnn.benchmark on**" in md


@pytest.mark.parametrize("shape, groups", [((1, 8, 20, 20, 20), 4), ((2, 6, 3, 5, 7), 3), ((1, 4, 1, 1, 1), 2),
                                           ((2, 40, 9, 6, 5), 4), ((1, 160, 5, 4, 3), 4)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_chunked_group_norm_matches_float64(shape, groups, dtype, layout):
    """model.nets.group_norm_kernel.group_norm (Triton; the interpreter here) against float64 group norm: several chunks
    per row (20^3 x 2 channels = 16,000 values), rows shorter than a chunk, one value per channel, a large mean, the
    UNet's concatenated widths (40 and 160 channels: groups of a width that is not a power of two), several batch
    elements; in NCDHW and in channels-last (NDHWC, read and written in that layout)."""
    from model.nets.group_norm_kernel import GROUP_CHUNK, group_norm

    gen = torch.Generator().manual_seed(11)
    x = torch.randn(*shape, generator=gen, dtype=torch.float64) * 3 + 50
    w = torch.randn(shape[1], generator=gen, dtype=torch.float64)
    b = torch.randn(shape[1], generator=gen, dtype=torch.float64)
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    x, w, b = x.to(dev, dtype), w.to(dev, dtype), b.to(dev, dtype)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last_3d)
    expected = F.group_norm(x.double(), groups, w.double(), b.double(), 1e-5)  # on the rounded inputs
    y = group_norm(x, groups, w, b, 1e-5)
    assert y.dtype == dtype and y.shape == x.shape and y.stride() == x.stride()  # the input's layout kept
    tol = 1e-5 if dtype == torch.float32 else 1e-3  # float32 arithmetic, one rounding to the output dtype
    assert _rel(y.double(), expected) < tol
    # silu=True: the SiLU applied before the one rounding, the same statistics
    y_silu = group_norm(x, groups, w, b, 1e-5, silu=True)
    assert y_silu.dtype == dtype and y_silu.shape == x.shape
    assert _rel(y_silu.double(), F.silu(expected)) < tol
    if shape == (1, 8, 20, 20, 20):
        assert x[0, : shape[1] // groups].numel() > 3 * GROUP_CHUNK  # the several-chunk case is really exercised
    with pytest.raises(ValueError, match="groups"):
        group_norm(x.to(dtype), 7, None, None, 1e-5)


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_group_norm_grid_keeps_its_chunks_on_the_first_axis(monkeypatch, layout):
    """CUDA takes at most 65,535 programs along a grid's second and third axes: a 256^3 refiner patch of few
    channels has more chunks per row than that (in channels-last: 131,072 at 32 channels), so the chunks must go on
    the first axis. Shown here with small chunks (the launches are recorded, not run)."""
    import model.nets.group_norm_kernel as kernel

    grids = []

    class Recorder:
        def __getitem__(self, grid):
            grids.append(tuple(grid))
            return lambda *args, **kwargs: None

    for name in ("_group_chunk_stats_kernel", "_group_chunk_stats_cl_kernel", "_group_apply_kernel",
                 "_group_apply_cl_kernel"):
        monkeypatch.setattr(kernel, name, Recorder())
    monkeypatch.setattr(kernel, "GROUP_CHUNK", 4)
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    x = torch.zeros(2, 4, 70, 70, 70, device=dev)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last_3d)
    if dev == "cpu":
        monkeypatch.setenv("TRITON_INTERPRET", "1")
    kernel.group_norm(x, 4, None, None, 1e-5)
    assert len(grids) == 2 and max(g[0] for g in grids) > 65535
    assert all(d <= 65535 for g in grids for d in g[1:])


def test_group_norm32_silu_is_silu_of_the_norm():
    """GroupNorm32(x, silu=True) on the CPU path: the released SiLU on the rounded norm output, exactly."""
    gen = torch.Generator().manual_seed(8)
    norm = GroupNorm32(2, 6, eps=1e-5).bfloat16()
    x = torch.randn(1, 6, 4, 5, 3, generator=gen).bfloat16()
    with torch.no_grad():
        assert torch.equal(norm(x, silu=True), F.silu(norm(x)))
    y = norm(x.float().requires_grad_(), silu=True)  # autograd: the out-of-place SiLU
    assert y.requires_grad


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_refiners_with_the_triton_kernels_match_the_pytorch_path(dtype):
    """Both refiners at the released widths on a 32^3 patch: the Triton adaptive filter, few-channel
    convolutions, 1^3 shortcuts fused with the residual sum and the bias kernel after cuDNN's convolutions (all
    switched on here) against cuDNN + the 27
    addcmul passes. float32: the same function up to rounding. bf16: the two paths round at different places, so
    each is compared with the float32 PyTorch path on the same weights, and the Triton path may not be further
    from it than the PyTorch bf16 path (1.5x its error, or 3%, whichever is larger)."""
    import copy

    import model.nets.refiner as refiner

    gen = torch.Generator().manual_seed(3)
    for net, inputs in ((VoxelRefiner(RefinerConfig.released_512(patch_size=32, patch_stride=16, resolution=64)),
                         (torch.randn(1, 1, 32, 32, 32, generator=gen), torch.randn(1, 32, 32, 32, 32, generator=gen))),
                        (SignRefiner(RefinerConfig.released_1024(patch_size=32, patch_stride=16, resolution=64)),
                         (torch.randn(1, 1, 32, 32, 32, generator=gen),))):
        net32 = net.cuda().float().eval()
        net = copy.deepcopy(net32).to(dtype)
        args = [t.cuda().to(dtype) for t in inputs]
        tf32 = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
        torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False  # float32 = float32
        switches = refiner.ADAPTIVE_KERNEL, refiner.CONV_KERNEL, refiner.SHORTCUT_KERNEL, refiner.BIAS_KERNEL
        try:
            with torch.no_grad():
                refiner.ADAPTIVE_KERNEL = refiner.CONV_KERNEL = refiner.SHORTCUT_KERNEL = refiner.BIAS_KERNEL = True
                fast = net(*args)
                refiner.ADAPTIVE_KERNEL = refiner.CONV_KERNEL = refiner.SHORTCUT_KERNEL = refiner.BIAS_KERNEL = False
                slow = net(*args)
                ref = net32(*[t.float() for t in args])
        finally:
            refiner.ADAPTIVE_KERNEL, refiner.CONV_KERNEL, refiner.SHORTCUT_KERNEL, refiner.BIAS_KERNEL = switches
            torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = tf32
        assert fast.dtype == dtype and torch.isfinite(fast).all()
        name = type(net).__name__
        if dtype == torch.float32:
            assert _rel(fast, slow) < 1e-4, (name, _rel(fast, slow))
        else:
            err_fast, err_slow = _rel(fast.float(), ref), _rel(slow.float(), ref)
            assert err_fast < max(3e-2, 1.5 * err_slow), (name, err_fast, err_slow)



@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_bias_add_kernel_matches_pytorch(layout, dtype):
    """model.nets.bias_add_kernel.bias_add_ (the interpreter here): ``out += bias[c] (+ residual)`` in place, in
    float32 with one rounding, for NCDHW and channels-last tensors of two batch elements; bad input is refused."""
    from model.nets.bias_add_kernel import bias_add_, supports

    gen = torch.Generator().manual_seed(5)
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    fmt = torch.channels_last_3d if layout == "channels_last" else torch.contiguous_format
    out = torch.randn(2, 6, 5, 4, 3, generator=gen).to(dev, dtype).contiguous(memory_format=fmt)
    res = torch.randn(2, 6, 5, 4, 3, generator=gen).to(dev, dtype).contiguous(memory_format=fmt)
    bias = torch.randn(6, generator=gen).to(dev, dtype)
    want = out.double() + bias.double().view(1, -1, 1, 1, 1)
    want_res = want + res.double()
    tol = 1e-6 if dtype == torch.float32 else 1e-3
    a = out.clone(memory_format=torch.preserve_format)
    assert bias_add_(a, bias) is a and a.stride() == out.stride()
    assert _rel(a.double(), want) < tol
    b = out.clone(memory_format=torch.preserve_format)
    bias_add_(b, bias, res)
    assert _rel(b.double(), want_res) < tol
    assert supports(out, res) and not supports(out, res.contiguous() if layout == "channels_last" else
                                                res.contiguous(memory_format=torch.channels_last_3d))
    with pytest.raises(ValueError, match="bias"):
        bias_add_(out.clone(), bias[:5])
    with pytest.raises(ValueError, match="residual"):
        bias_add_(out.clone(), bias, res[:, :5])
