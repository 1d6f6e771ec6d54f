"""model.nets.fused.head_rms_norm: the dense DiT's per-head q/k normalisation as one Triton kernel (the interpreter
on the CPU), against float64 and against MultiHeadRMSNorm's PyTorch expression."""
import math

import pytest
import torch
import torch.nn.functional as F

from model.nets.dense import MultiHeadRMSNorm
from model.nets.fused import HEAD_NORM_ROWS, head_rms_norm

DEV = "cuda" if torch.cuda.is_available() else "cpu"


def _rel(a, b):
    return float((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30))


def _expected(x, gamma):
    return F.normalize(x.double(), dim=-1) * gamma.double() * math.sqrt(x.shape[-1])


@pytest.mark.parametrize("dim", [32, 64, 48])
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-6), (torch.float16, 1e-3)])
def test_strided_q_and_k_columns_match_float64(dim, dtype, tol):
    """The q and k columns of a merged [B, N, 3, H, D] projection (strided views), rows spanning several programs,
    a head dim that is not a power of two, one all-zero row (eps: zeros out, no NaN)."""
    gen = torch.Generator().manual_seed(3)
    b, n, h = 2, HEAD_NORM_ROWS // 2 + 5, 3
    qkv = (torch.randn(b, n, 3, h, dim, generator=gen) * 2).to(DEV, dtype)
    qkv[1, 4, 0, 2] = 0
    gq, gk = (torch.randn(h, dim, generator=gen).to(DEV, dtype) for _ in range(2))
    q, k, _ = qkv.unbind(2)
    assert not q.is_contiguous()
    for x, g in ((q, gq), (k, gk)):
        y = head_rms_norm(x, g, math.sqrt(dim))
        assert y.shape == x.shape and y.dtype == dtype and y.is_contiguous()
        assert _rel(y, _expected(x, g)) < tol
    assert torch.equal(head_rms_norm(q, gq, math.sqrt(dim))[1, 4, 2], torch.zeros(dim, dtype=dtype, device=DEV))


def test_module_takes_the_kernel_only_without_autograd_on_cuda(monkeypatch):
    """MultiHeadRMSNorm: the PyTorch expression on the CPU and under autograd; the kernel's result equals it to
    float32 rounding (checked here through the function, which the module calls on CUDA)."""
    gen = torch.Generator().manual_seed(4)
    norm = MultiHeadRMSNorm(4, 16)
    with torch.no_grad():
        norm.gamma.copy_(torch.randn(4, 16, generator=gen))
    x = torch.randn(5, 7, 4, 16, generator=gen)
    called = []
    import model.nets.dense as dense

    monkeypatch.setattr(dense, "head_rms_norm", lambda *a, **k: called.append(1))
    with torch.no_grad():
        y = norm(x)  # a CPU tensor: the PyTorch expression
    assert not called
    monkeypatch.undo()
    assert _rel(head_rms_norm(x, norm.gamma.detach(), norm.scale), y) < 1e-6


def test_bad_inputs_name_the_argument():
    x = torch.randn(4, 2, 8, device=DEV)
    with pytest.raises(ValueError, match="gamma"):
        head_rms_norm(x, torch.ones(3, 8, device=DEV), 1.0)
    with pytest.raises(TypeError, match="x must be"):
        head_rms_norm(x.double(), torch.ones(2, 8, device=DEV, dtype=torch.float64), 1.0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.gpu
def test_gpu_dense_dit_fused_norm_matches_the_pytorch_expression():
    """A small dense DiT in bf16 on the GPU: the guided velocity with the fused q/k norm against the PyTorch
    expression, within bf16 noise."""
    from model.nets.dense import DenseDiT, DenseDiTConfig

    torch.manual_seed(0)
    dit = DenseDiT(DenseDiTConfig.tiny(model_channels=128, num_heads=2, cond_channels=64)).cuda().bfloat16().eval()
    for p in dit.parameters():
        torch.nn.init.normal_(p, std=0.05)
    x = torch.randn(1, dit.config.in_channels, *(dit.config.resolution,) * 3, device="cuda", dtype=torch.bfloat16)
    cond = torch.randn(1, 7, 64, device="cuda", dtype=torch.bfloat16)
    with torch.no_grad():
        fused_v = dit.guided_velocity(x, torch.tensor([500.0], device="cuda"), cond, 7.0)
        MultiHeadRMSNorm.fused = False
        try:
            plain_v = dit.guided_velocity(x, torch.tensor([500.0], device="cuda"), cond, 7.0)
        finally:
            MultiHeadRMSNorm.fused = True
    assert _rel(fused_v, plain_v) < 2e-2
