"""model.nets.conv3d_kernel (dense 3^3 convolution with few channels) against float64 ``F.conv3d`` on the CPU.

Without CUDA the kernels run through the Triton interpreter (root conftest.py), whose cost grows with programs
(one per output row ``(b, z, y)`` and ``x`` tile) x 27 x input channels: the volumes are as small as still give
both borders and an interior along every axis, odd sizes, and one ``x`` extent of 37 voxels cut into tiles of 16
(several tiles, a partial last one). Errors are relative norms ``||got - want|| / ||want||``.
"""
import pytest
import torch
import torch.nn.functional as F

import model.nets.conv3d_kernel as ck
from model.nets.conv3d_kernel import MAX_CHANNELS, conv3d_small, supports
from tests.helpers import rel_err

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py

TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}
#: Where the kernels run: the GPU, else the CPU through the interpreter.
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
needs_kernel = pytest.mark.skipif(not (torch.cuda.is_available() or ck._interpreting()),
                                  reason="needs a CUDA GPU or TRITON_INTERPRET=1")


def _inputs(batch, cin, cout, size, dtype, *, bias=True, seed=0, device=DEVICE):
    """``x [batch, cin, *size]`` in ``dtype`` and float32 ``weight``/``bias`` (bias None when off), scaled so the
    outputs are O(1)."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, cin, *size, generator=gen).to(device=device, dtype=dtype)
    w = (torch.randn(cout, cin, 3, 3, 3, generator=gen) / (27 * cin) ** 0.5).to(device)
    b = torch.randn(cout, generator=gen).to(device) if bias else None
    return x, w, b


def _reference(x, w, b, relu):
    y = F.conv3d(x.cpu().double(), w.cpu().double(), b.cpu().double() if b is not None else None, padding=1)
    return F.relu(y) if relu else y


# (batch, Cin, Cout, size, dtype, bias, relu, block_w): every refiner channel pair, B = 1 and 2, odd sizes
CASES = [
    pytest.param(2, 1, 8, (5, 6, 7), torch.float32, True, True, None, id="1-8-B2-f32-bias-relu"),
    pytest.param(1, 8, 8, (3, 4, 37), torch.float32, False, False, 16, id="8-8-W37-3tiles-f32"),
    pytest.param(1, 16, 8, (3, 3, 7), torch.float16, True, True, None, id="16-8-f16-bias-relu"),
    pytest.param(2, 8, 27, (3, 3, 5), torch.float32, False, True, None, id="8-27-B2-f32-relu"),
    pytest.param(1, 8, 1, (4, 5, 7), torch.float16, True, False, None, id="8-1-f16-bias"),
    pytest.param(2, 3, 5, (5, 6, 7), torch.float32, True, False, None, id="3-5-B2-f32-bias"),
    pytest.param(1, 3, 5, (4, 5, 37), torch.float16, False, True, 16, id="3-5-W37-3tiles-f16-relu"),
    pytest.param(1, 3, 5, (3, 4, 37), torch.bfloat16, True, True, None, id="3-5-W37-1tile-bf16-bias-relu"),
]


#: (rows, case) pairs of the multi-row kernel: every height 3-6 against tiles of 2 and 4 rows, B = 2, 27 output
#: channels, several x tiles, float16 (each case costs seconds in the interpreter: one of each, not all pairs).
MULTI_ROW_CASES = [(2, CASES[0]), (4, CASES[0]), (2, CASES[3]), (4, CASES[2]), (2, CASES[4]), (4, CASES[6])]


@needs_kernel
@pytest.mark.parametrize("rows,case", MULTI_ROW_CASES, ids=[f"{r}rows-{c.id}" for r, c in MULTI_ROW_CASES])
def test_multi_row_fma_kernel_matches_float64_conv3d(rows, case):
    """``rows`` 2 / 4 (each input row loaded once for the output rows it is a tap of): heights that the row tiles
    do not divide, the top and bottom borders, several x tiles, B = 2, 27 output channels."""
    batch, cin, cout, size, dtype, bias, relu, block_w = case.values
    x, w, b = _inputs(batch, cin, cout, size, dtype, bias=bias, seed=rows)
    with torch.no_grad():
        got = conv3d_small(x, w, b, relu=relu, block_w=block_w, rows=rows)
        one = conv3d_small(x, w, b, relu=relu, block_w=block_w, rows=1)
    assert got.shape == (batch, cout, *size) and got.dtype == dtype
    assert rel_err(got.cpu(), _reference(x, w, b, relu)) < TOL[dtype]
    if dtype == torch.float32:  # the same products and sums in the same order as the one-row kernel
        assert rel_err(got, one) < 1e-6
    with pytest.raises(ValueError, match="rows"), torch.no_grad():
        conv3d_small(x, w, b, rows=3)


@needs_kernel
@pytest.mark.parametrize("batch,cin,cout,size,dtype,bias,relu,block_w", CASES)
def test_fma_kernel_matches_float64_conv3d(batch, cin, cout, size, dtype, bias, relu, block_w):
    x, w, b = _inputs(batch, cin, cout, size, dtype, bias=bias)
    with torch.no_grad():
        got = conv3d_small(x, w, b, relu=relu, block_w=block_w)
    assert got.shape == (batch, cout, *size) and got.dtype == dtype and got.is_contiguous()
    err = rel_err(got.cpu(), _reference(x, w, b, relu))
    assert err < TOL[dtype], err


@needs_kernel
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_dot_kernel_matches_float64_conv3d(dtype):
    """The tensor-core variant (interpreter: float32 and float16 only; its bfloat16 ``tl.dot`` is wrong there),
    several channel pairs, tiles with tails, bias and ReLU."""
    for batch, cin, cout, size, bias, relu, block_w in [(2, 8, 8, (3, 4, 37), True, True, 16),
                                                        (1, 1, 8, (4, 5, 7), False, False, None),
                                                        (1, 16, 27, (3, 4, 5), True, False, None),
                                                        (1, 3, 5, (5, 6, 7), True, True, None)]:
        x, w, b = _inputs(batch, cin, cout, size, dtype, bias=bias, seed=cin + cout)
        with torch.no_grad():
            got = conv3d_small(x, w, b, relu=relu, use_dot=True, block_w=block_w)
        err = rel_err(got.cpu(), _reference(x, w, b, relu))
        # float16 here also rounds the weights to float16 (module docstring)
        assert err < TOL[dtype], (batch, cin, cout, size, err)


@needs_kernel
def test_float64_weights_out_argument_non_contiguous_input_and_empty_volume():
    """Weights in float64 and bias in float16 are used in float32; ``out`` is written and returned; a
    channels-last input is read as NCDHW; an empty batch launches nothing."""
    x, w, b = _inputs(1, 2, 3, (3, 3, 4), torch.float32)
    x = x.contiguous(memory_format=torch.channels_last_3d)
    out = torch.full((1, 3, 3, 3, 4), float("nan"), device=DEVICE)
    with torch.no_grad():
        got = conv3d_small(x, w.double(), b.half(), out=out)
    assert got is out
    assert rel_err(got.cpu(), _reference(x, w, b.half().float(), False)) < TOL[torch.float32]
    empty = conv3d_small(torch.zeros(0, 2, 3, 3, 4, device=DEVICE), w)
    assert empty.shape == (0, 3, 3, 3, 4)


@needs_kernel
@pytest.mark.parametrize("use_dot", [False, True])
def test_int64_offsets(monkeypatch, use_dot):
    """The int64 offset path (taken from 2^31 elements on), forced on a small volume."""
    monkeypatch.setattr(ck, "INDEX_32_LIMIT", 0)
    x, w, b = _inputs(2, 2, 3, (3, 3, 20), torch.float32)
    with torch.no_grad():
        got = conv3d_small(x, w, b, relu=True, use_dot=use_dot, block_w=16, num_warps=2)
    assert rel_err(got.cpu(), _reference(x, w, b, True)) < TOL[torch.float32]


def test_launch_choice():
    """Tiles that pad the row least, the widest of those; two output x per thread (1 to 4 warps)."""
    assert [ck._block_w(w) for w in (256, 192, 37, 70, 7, 1000)] == [256, 64, 64, 32, ck.MIN_BLOCK_W, 256]
    assert [ck._fma_warps(b) for b in (16, 32, 64, 128, 256)] == [1, 1, 1, 2, 4]
    # several output rows per program up to 8 output channels (measured faster), one row for wider outputs
    assert ck._fma_launch(8, 192) == ck._fma_launch(1, 256) == ck.MULTI_ROW_LAUNCH
    assert ck.MULTI_ROW_LAUNCH[2] in ck.FMA_ROW_CHOICES and ck.MULTI_ROW_LAUNCH[2] > 1
    assert ck._fma_launch(27, 192) == (64, 1, 1) and ck._fma_launch(27, 256) == (256, 4, 1)


@needs_kernel
def test_supports():
    dev = DEVICE
    x = torch.zeros(1, 8, 4, 4, 4, device=dev, dtype=torch.bfloat16)
    w = torch.zeros(8, 8, 3, 3, 3, device=dev)
    assert supports(x, w)
    assert supports(x.float(), w.double()) and supports(x.half(), torch.zeros(MAX_CHANNELS, 8, 3, 3, 3, device=dev))
    assert not supports(x.double(), w)  # dtype
    assert not supports(x, torch.zeros(8, 8, 1, 1, 1, device=dev))  # kernel size
    assert not supports(x, torch.zeros(8, 4, 3, 3, 3, device=dev))  # Cin mismatch
    assert not supports(x, torch.zeros(MAX_CHANNELS + 1, 8, 3, 3, 3, device=dev))  # too wide
    assert not supports(x[0], w)  # rank
    assert not supports(x, w.long())
    assert not supports(x, w.requires_grad_())  # would need a backward
    with torch.no_grad():
        assert supports(x, w)


def test_supports_refuses_cpu_without_interpreter(monkeypatch):
    monkeypatch.setattr(ck, "_interpreting", lambda: False)
    assert not supports(torch.zeros(1, 8, 4, 4, 4), torch.zeros(8, 8, 3, 3, 3))
    with pytest.raises(ValueError, match="x must be a CUDA tensor"):
        conv3d_small(torch.zeros(1, 8, 4, 4, 4), torch.zeros(8, 8, 3, 3, 3))


@needs_kernel
def test_bad_inputs():
    def z(*shape, dtype=torch.float32):
        return torch.zeros(*shape, dtype=dtype, device=DEVICE)

    x, w = z(1, 4, 3, 3, 3), z(2, 4, 3, 3, 3)
    with pytest.raises(ValueError, match="x must be"):
        conv3d_small(x[0], w)
    with pytest.raises(ValueError, match="weight must be"):
        conv3d_small(x, w[0])
    with pytest.raises(ValueError, match="kernel size 3"):
        conv3d_small(x, z(2, 4, 5, 5, 5))
    with pytest.raises(ValueError, match="Cin"):
        conv3d_small(x, z(2, 3, 3, 3, 3))
    with pytest.raises(ValueError, match="torch.nn.functional.conv3d"):
        conv3d_small(z(1, MAX_CHANNELS + 1, 3, 3, 3), z(2, MAX_CHANNELS + 1, 3, 3, 3))
    with pytest.raises(ValueError, match="torch.nn.functional.conv3d"):
        conv3d_small(x, z(MAX_CHANNELS + 1, 4, 3, 3, 3))
    with pytest.raises(ValueError, match="bias must be"):
        conv3d_small(x, w, z(3))
    with pytest.raises(TypeError, match="x must be one of"):
        conv3d_small(x.double(), w)
    with pytest.raises(TypeError, match="weight must be a floating-point"):
        conv3d_small(x, w.int())
    with pytest.raises(TypeError, match="bias must be a floating-point"):
        conv3d_small(x, w, z(2, dtype=torch.int64))
    with pytest.raises(TypeError, match="x must be a torch.Tensor"):
        conv3d_small([[0.0]], w)
    with pytest.raises(TypeError, match="out must have x's dtype"):
        conv3d_small(x, w, out=z(1, 2, 3, 3, 3, dtype=torch.float16))
    with pytest.raises(ValueError, match="out must be"):
        conv3d_small(x, w, out=z(1, 3, 3, 3, 3))
    with pytest.raises(ValueError, match="share memory"):
        y = z(1, 4, 3, 3, 3)
        conv3d_small(y, z(4, 4, 3, 3, 3), out=y)
    with pytest.raises(ValueError, match="block_w"):
        conv3d_small(x, w, block_w=24)
    with pytest.raises(ValueError, match="num_warps"):
        conv3d_small(x, w, num_warps=3)
    with pytest.raises(ValueError, match="no backward"):
        conv3d_small(x, w.requires_grad_())
    if torch.cuda.is_available():
        with pytest.raises(ValueError, match="weight is on"):
            conv3d_small(x, w.detach().cpu())
        with pytest.raises(ValueError, match="bias is on"):
            conv3d_small(x, w.detach(), torch.zeros(2))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_bfloat16_8_to_8_at_64_cubed():
    """8 -> 8 at 64^3 in bfloat16 with bias and ReLU: against float64, and no worse than cuDNN's bfloat16 conv3d."""
    x, w, b = _inputs(1, 8, 8, (64, 64, 64), torch.bfloat16, device="cuda")
    want = _reference(x, w, b, True)
    with torch.no_grad():
        got = conv3d_small(x, w, b, relu=True)
        cudnn = F.relu(F.conv3d(x, w.bfloat16(), b.bfloat16(), padding=1))
    err, err_cudnn = rel_err(got.cpu(), want), rel_err(cudnn.cpu(), want)
    assert err < 1e-2, err
    assert err < 2 * err_cudnn + 1e-3, (err, err_cudnn)
    with torch.no_grad():
        dot = conv3d_small(x, w, b, relu=True, use_dot=True)
    assert rel_err(dot.cpu(), want) < 1e-2


@needs_kernel
def test_refiner_report_conv_sweep_times_every_launch(monkeypatch):
    """model.reports.refiner.sweep_conv (``--sweep-conv``) on a tiny shape: one time per launch of the sweep, the
    multi-row launches included, and the default launch named among them."""
    import model.reports.refiner as report

    monkeypatch.setattr(report, "SWEEP_SHAPES", ((2, 3, 5),))
    monkeypatch.setattr(report, "SWEEP_LAUNCHES", ((32, 1, 1), (32, 1, 2), ck.MULTI_ROW_LAUNCH))
    monkeypatch.setattr(report, "SHORTCUT_SHAPES", ((6, 3, 4),))
    monkeypatch.setattr(report, "DOT_LAUNCHES", ((16, 1),))
    out = report.sweep_conv(torch.device(DEVICE), reps=1)
    (row,) = out["rows"]
    default = report._launch_label(*ck.MULTI_ROW_LAUNCH)  # 3 output channels: the multi-row default
    assert list(row["launches"]) == ["32 x 1", "32 x 1 x 2 rows", default, report.DOT_LABEL,
                                     report._dot_label(16, 1)]
    assert all(ms > 0 for ms in row["launches"].values()) and row["default"] == default
    (short,) = out["shortcuts"]
    assert (short["cin"], short["cout"], short["side"]) == (6, 3, 4) and short["cudnn_ms"] > 0 < short["kernel_ms"]
    md = "\n".join(report._sweep_markdown(out))
    assert f"**{row['launches'][default]:.2f}**" in md and f"| 6 -> 3, 4^3 | {short['cudnn_ms']:.2f} |" in md

