"""model.nets.conv1x1_kernel (1^3 convolution fused with the residual sum) against float64 ``F.conv3d`` on the CPU.

Without CUDA the kernel runs through the Triton interpreter (root conftest.py). Errors are relative norms
``||got - want|| / ||want||`` against float64.
"""
import pytest
import torch
import torch.nn.functional as F

import model.nets.conv1x1_kernel as pk
from model.nets.conv1x1_kernel import MAX_COUT, conv1x1_residual, supports
from tests.helpers import rel_err

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py

TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
needs_kernel = pytest.mark.skipif(not (torch.cuda.is_available() or pk._interpreting()),
                                  reason="needs a CUDA GPU or TRITON_INTERPRET=1")


def _inputs(batch, cin, cout, size, dtype, *, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, cin, *size, generator=gen).to(device=DEVICE, dtype=dtype)
    w = (torch.randn(cout, cin, 1, 1, 1, generator=gen) / cin ** 0.5).to(DEVICE)
    b = torch.randn(cout, generator=gen).to(DEVICE)
    res = torch.randn(batch, cout, *size, generator=gen).to(device=DEVICE, dtype=dtype)
    return x, w, b, res


# (batch, Cin, Cout, size, dtype): the refiners' shortcut widths (40 -> 8, 16 -> 8, 160 -> 32), odd sizes whose
# voxel count is not a multiple of the tile, B = 2, Cout not a power of two
CASES = [
    pytest.param(1, 40, 8, (5, 6, 7), torch.bfloat16, id="40-8-bf16"),
    pytest.param(2, 16, 8, (3, 5, 7), torch.float16, id="16-8-B2-f16"),
    pytest.param(1, 160, 32, (3, 4, 5), torch.float32, id="160-32-f32"),
    pytest.param(2, 3, 5, (4, 5, 37), torch.float32, id="3-5-B2-f32"),
]


@needs_kernel
@pytest.mark.parametrize("batch,cin,cout,size,dtype", CASES)
@pytest.mark.parametrize("with_bias", [True, False], ids=["bias", "no-bias"])
@pytest.mark.parametrize("with_residual", [True, False], ids=["residual", "no-residual"])
def test_conv1x1_residual_matches_float64(batch, cin, cout, size, dtype, with_bias, with_residual):
    x, w, b, res = _inputs(batch, cin, cout, size, dtype)
    b = b if with_bias else None
    res = res if with_residual else None
    want = F.conv3d(x.cpu().double(), w.cpu().double(), b.cpu().double() if b is not None else None)
    if res is not None:
        want = want + res.cpu().double()
    with torch.no_grad():
        got = conv1x1_residual(x, w, b, res)
    assert got.dtype == dtype and got.shape == want.shape and got.is_contiguous()
    assert rel_err(got.cpu().double(), want) < TOL[dtype]


@needs_kernel
def test_in_place_into_the_residual_and_2d_weight():
    """``out=residual`` overwrites the residual with the sum; a ``[Cout, Cin]`` weight gives the same numbers."""
    x, w, b, res = _inputs(1, 40, 8, (5, 6, 7), torch.float32, seed=1)
    want = F.conv3d(x.double(), w.double(), b.double()) + res.double()
    with torch.no_grad():
        got = conv1x1_residual(x, w.view(8, 40), b, res, out=res)
    assert got.data_ptr() == res.data_ptr()
    assert rel_err(res.double(), want) < TOL[torch.float32]


@needs_kernel
def test_bad_arguments_raise_naming_them():
    x, w, b, res = _inputs(1, 4, 3, (2, 3, 4), torch.float32)
    with pytest.raises(ValueError, match="x must be"):
        conv1x1_residual(x[0], w, b)
    with pytest.raises(ValueError, match="weight must be"):
        conv1x1_residual(x, w.view(3, 4, 1, 1), b)
    with pytest.raises(ValueError, match="Cin = 4"):
        conv1x1_residual(x[:, :2], w, b)
    with pytest.raises(ValueError, match="output channels"):
        conv1x1_residual(torch.zeros(1, 2, 1, 1, 1, device=DEVICE), torch.zeros(MAX_COUT + 1, 2, device=DEVICE))
    with pytest.raises(TypeError, match="x must be one of"):
        conv1x1_residual(x.to(torch.float64), w, b)
    with pytest.raises(ValueError, match="bias must be"):
        conv1x1_residual(x, w, b[:2])
    with pytest.raises(ValueError, match="residual must be"):
        conv1x1_residual(x, w, b, res[:, :2])
    with pytest.raises(TypeError, match="residual must have"):
        conv1x1_residual(x, w, b, res.half())
    xs = x[:, :3].contiguous()
    with pytest.raises(ValueError, match="out must not share"):
        conv1x1_residual(xs, w[:, :3], b, out=xs)
    wg = w.clone().requires_grad_(True)
    with pytest.raises(ValueError, match="no backward"):
        conv1x1_residual(x, wg, b)
    with torch.no_grad():
        assert supports(x, w, res) and not supports(x, w, res[:, :2]) and not supports(x.transpose(2, 4), w)
