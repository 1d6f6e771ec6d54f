"""The training path of the fused layer norm + modulation (:mod:`model.nets.fused`): the autograd function's output
and every gradient (x, weight, bias, shift, scale) against a float64 PyTorch reference through
``torch.autograd.grad`` (CPU through the Triton interpreter, float32 inputs, relative errors ``||a - b|| / ||b||``),
the bfloat16 output from a float32 stream, what is saved for the backward, the refused and bad inputs, and on a GPU
the bfloat16 stream at N = 5000, C = 1024."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import model.nets.fused as fused
from tests.helpers import spy_launches

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py
interpreted = pytest.mark.skipif(not fused._interpreting(), reason="the CPU run of the kernels needs the interpreter")

EPS = 1e-6
TILE = fused.ROWS_PER_PROGRAM


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def _reference(x, weight, bias, shift, scale, batch_index):
    """Float64 ``LN(x) [* w + b] [* (1 + scale) + shift]`` (autograd through PyTorch's ops)."""
    y = F.layer_norm(x, (x.shape[1],), weight, bias, EPS)
    if shift is not None:
        if batch_index is not None:
            shift, scale = shift[batch_index], scale[batch_index]
        y = y * (1 + scale) + shift
    return y


def _case(n, c, counts, affine, mod, seed, dtype=torch.float32, mod_dtype=torch.float32, index=True,
          index_dtype=torch.int64):
    """Random inputs (all requiring grad) and ``dz``; ``counts``: rows per batch element (a sorted batch_index,
    or None for a single element when ``index`` is off)."""
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(n, c, generator=g) * 3 + 1).to(dtype)
    w = (torch.randn(c, generator=g) * 0.5 + 1) if affine else None
    b = torch.randn(c, generator=g) if affine else None
    rows = len(counts)
    shift = torch.randn(rows, c, generator=g).to(mod_dtype) if mod else None
    scale = (torch.randn(rows, c, generator=g) * 0.5).to(mod_dtype) if mod else None
    bidx = torch.repeat_interleave(torch.arange(rows), torch.tensor(counts)).to(index_dtype) if mod and index else None
    dz = torch.randn(n, c, generator=g)
    params = {"x": x, "weight": w, "bias": b, "shift": shift, "scale": scale}
    for t in params.values():
        if t is not None:
            t.requires_grad_(True)
    return params, bidx, dz


def _check(params, bidx, dz, tol=1e-5, dtype=None):
    """Fused output and gradients against the float64 reference, all within ``tol`` (relative norms)."""
    names = [k for k, v in params.items() if v is not None]
    got = fused.layer_norm_modulate(params["x"], EPS, weight=params["weight"], bias=params["bias"],
                                    shift=params["shift"], scale=params["scale"], batch_index=bidx, dtype=dtype)
    assert got.dtype == (dtype or params["x"].dtype)
    grads = torch.autograd.grad(got, [params[k] for k in names], dz.to(got.dtype))
    ref = {k: (v.detach().double().requires_grad_(True) if v is not None else None) for k, v in params.items()}
    want = _reference(ref["x"], ref["weight"], ref["bias"], ref["shift"], ref["scale"], bidx)
    want_grads = torch.autograd.grad(want, [ref[k] for k in names], dz.double())
    assert _rel(got, want) < tol, ("out", _rel(got, want))
    for k, gk, wk in zip(names, grads, want_grads):
        assert gk.dtype == params[k].dtype and gk.shape == params[k].shape, k
        assert _rel(gk, wk) < tol, (k, _rel(gk, wk))


@interpreted
@pytest.mark.parametrize("affine,mod", [(False, False), (True, False), (False, True), (True, True)])
@pytest.mark.parametrize("c", [48, 64])
def test_one_element_matches_float64(affine, mod, c):
    """One batch element (``shift [1, C]``, no batch_index), N = 37: a single partial tile; C = 48 is not a power
    of two (masked channels)."""
    _check(*_case(37, c, [37], affine, mod, seed=c + 2 * affine + mod, index=False))


@interpreted
@pytest.mark.parametrize("affine", [False, True])
@pytest.mark.parametrize("c,counts", [(48, [80, 1, 69]), (64, [1, 63, 1]), (48, [5, 0, 2 * TILE + 3])])
def test_three_elements_match_float64(affine, c, counts):
    """Three batch elements of different sizes, a 1-row one among them, tiles spanning two or three elements, N
    not a multiple of the tile (and one element without rows: zero gradients)."""
    params, bidx, dz = _case(sum(counts), c, counts, affine, True, seed=sum(counts) + affine)
    _check(params, bidx, dz)
    if 0 in counts:
        dshift, = torch.autograd.grad(fused.layer_norm_modulate(params["x"], EPS, shift=params["shift"],
                                                                scale=params["scale"], batch_index=bidx),
                                      params["shift"], dz)
        assert dshift[counts.index(0)].abs().max() == 0


@interpreted
def test_one_row_and_whole_tiles():
    """N = 1, and N an exact multiple of the tile with the element boundary on a tile edge (int32 batch_index)."""
    _check(*_case(1, 48, [1], True, True, seed=5))
    _check(*_case(1, 64, [1], False, True, seed=6, index=False))
    _check(*_case(2 * TILE, 48, [TILE, TILE], True, True, seed=7, index_dtype=torch.int32))


@interpreted
def test_unsorted_batch_index_falls_back_to_atomics():
    """A batch_index out of order still gives the right gradients (atomic path); a sorted one gives bitwise equal
    gradients run after run."""
    params, bidx, dz = _case(90, 48, [30, 1, 59], True, True, seed=8)
    perm = torch.randperm(90, generator=torch.Generator().manual_seed(0))
    _check(params, bidx[perm], dz)

    def grads():
        y = fused.layer_norm_modulate(params["x"], EPS, weight=params["weight"], bias=params["bias"],
                                      shift=params["shift"], scale=params["scale"], batch_index=bidx)
        return torch.autograd.grad(y, [v for v in params.values()], dz)

    for a, b in zip(grads(), grads()):
        assert torch.equal(a, b)


@interpreted
def test_only_some_inputs_require_grad():
    """Gradients for the inputs that ask for one; the others get None from the function."""
    params, bidx, dz = _case(70, 48, [40, 30], True, True, seed=9)
    params["x"].requires_grad_(False)
    params["weight"].requires_grad_(False)
    y = fused.layer_norm_modulate(params["x"], EPS, weight=params["weight"], bias=params["bias"],
                                  shift=params["shift"], scale=params["scale"], batch_index=bidx)
    y.backward(dz)
    assert params["x"].grad is None and params["weight"].grad is None
    ref = {k: v.detach().double().requires_grad_(True) for k, v in params.items()}
    _reference(ref["x"], ref["weight"], ref["bias"], ref["shift"], ref["scale"], bidx).backward(dz.double())
    for k in ("bias", "shift", "scale"):
        assert _rel(params[k].grad, ref[k].grad) < 1e-5, k
    x, mean, rstd = params["x"].detach(), torch.zeros(70), torch.ones(70)
    out = fused._backward(dz, x, mean, rstd, None, None, None, None, need_dx=False, need_affine=True,
                          need_mod=True)
    assert out == (None, None, None, None, None)


@interpreted
def test_saves_only_x_and_the_row_statistics():
    """The [N, C] tensors kept for the backward: x only (no output, no float32 copy)."""
    params, bidx, dz = _case(50, 48, [20, 30], True, True, seed=10, dtype=torch.bfloat16)
    saved = []

    def pack(t):
        saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fused.layer_norm_modulate(params["x"], EPS, weight=params["weight"], bias=params["bias"],
                                  shift=params["shift"], scale=params["scale"], batch_index=bidx)
    big = [t for t in saved if t.numel() >= 50 * 48]
    assert len(big) == 1 and big[0].dtype == torch.bfloat16
    assert sum(t.numel() for t in saved if t.dtype == torch.float32) <= 2 * 50 + 3 * 2 * 48


@interpreted
def test_bfloat16_output_from_float32_and_mixed_dtypes():
    """``dtype=bfloat16`` from a float32 x (the autocast case): loose agreement, gradients in the inputs' dtypes;
    a bfloat16 x with float32 shift/scale."""
    params, bidx, dz = _case(70, 64, [50, 20], True, True, seed=11)
    _check(params, bidx, dz, tol=1e-2, dtype=torch.bfloat16)
    params, bidx, dz = _case(70, 48, [50, 20], False, True, seed=12, dtype=torch.bfloat16)
    _check(params, bidx, dz, tol=1e-2)


@interpreted
def test_norm_modulate_dispatches_to_the_function(monkeypatch):
    """``norm_modulate`` with grad on: the fused function when allowed (same result and gradients as the PyTorch
    ops, ``dtype=`` on both paths); ``add=`` still refused."""
    params, bidx, dz = _case(60, 48, [25, 35], False, True, seed=13)
    norm = torch.nn.LayerNorm(48, eps=EPS)
    with torch.no_grad():
        norm.weight.normal_(1.0, 0.3)
        norm.bias.normal_()
    inputs = [params["x"], params["shift"], params["scale"], norm.weight, norm.bias]
    results = []
    for on in (False, True):
        monkeypatch.setattr(fused, "INTERPRET_ON_CPU", on)
        assert fused.use_fused(params["x"]) == on
        y = fused.norm_modulate(norm, params["x"], params["shift"], params["scale"], bidx, dtype=torch.bfloat16)
        assert y.dtype == torch.bfloat16
        assert (type(y.grad_fn).__name__ == "_NormModulateFunctionBackward") == on
        results.append([y.float(), *torch.autograd.grad(y, inputs, dz.to(y.dtype))])
        with pytest.raises(ValueError, match="inference"):
            fused.norm_modulate(norm, params["x"].detach().clone(), params["shift"], params["scale"], bidx,
                                add=torch.zeros(48))
    for a, b in zip(*results):
        assert _rel(a, b) < 1e-2
    with pytest.raises(ValueError, match="inference"):
        fused.layer_norm_modulate(params["x"], EPS, add=torch.zeros(48))


@interpreted
def test_bad_inputs_name_the_argument():
    x = torch.randn(10, 48, requires_grad=True)
    s = torch.zeros(2, 48)
    bidx = torch.zeros(10, dtype=torch.long)
    cases = [
        (ValueError, "x must", dict(x=torch.randn(2, 10, 48))),
        (TypeError, "x must", dict(x=torch.randn(10, 48, dtype=torch.float64))),
        (TypeError, "dtype must", dict(dtype=torch.float64)),
        (ValueError, "weight must have 48", dict(weight=torch.ones(47), bias=torch.zeros(47))),
        (TypeError, "bias must be a floating", dict(weight=torch.ones(48), bias=torch.zeros(48, dtype=torch.long))),
        (ValueError, "together", dict(weight=torch.ones(48))),
        (ValueError, r"shift must be \[B, 48\]", dict(shift=torch.zeros(2, 40), scale=torch.zeros(2, 40))),
        (TypeError, "scale must be a tensor", dict(shift=s, scale=1.0)),
        (ValueError, "differ", dict(shift=s, scale=torch.zeros(3, 48))),
        (ValueError, "need batch_index", dict(shift=s, scale=s)),
        (ValueError, r"batch_index must be \[10\]", dict(shift=s, scale=s, batch_index=bidx[:9])),
        (TypeError, "batch_index must be int", dict(shift=s, scale=s, batch_index=bidx.float())),
        (ValueError, "out must be", dict(out=torch.empty(10, 48, dtype=torch.bfloat16))),
    ]
    for error, message, kwargs in cases:
        kwargs = {"x": x, **kwargs}
        with pytest.raises(error, match=message):
            fused.layer_norm_modulate(kwargs.pop("x"), EPS, **kwargs)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("affine", [False, True])
def test_gpu_bfloat16_stream_matches_float64(affine):
    """bfloat16 x at N = 5000, C = 1024 (three batch elements, float32 parameters) on the GPU against the float64
    reference of the same values: output and gradients within bfloat16 accuracy; the float32 stream with bfloat16
    output too."""
    counts = [2500, 1, 2499]
    for dtype, out_dtype in ((torch.bfloat16, None), (torch.float32, torch.bfloat16)):
        params, bidx, dz = _case(5000, 1024, counts, affine, True, seed=14 + affine, dtype=dtype)
        params = {k: (v.detach().cuda().requires_grad_(True) if v is not None else None) for k, v in params.items()}
        _check(params, bidx.cuda(), dz.cuda(), tol=1e-2, dtype=out_dtype)


@interpreted
@pytest.mark.parametrize("affine,mod,counts,with_bias", [(True, False, [70], True), (False, True, [30, 1, 50], False),
                                                         (False, True, [81], True)])
def test_norm_with_projection_keeps_no_normalised_rows(affine, mod, counts, with_bias):
    """``project=(w, b)``: ``F.linear`` of the norm's output, whose backward recomputes the normalised rows. Output
    and every gradient (x, the norm's and the projection's parameters, shift, scale) against float64, and what
    autograd keeps: x, no ``[N, C]`` normalised rows, no ``[N, M]`` product."""
    n, c, m = sum(counts), 48, 20
    params, bidx, _ = _case(n, c, counts, affine, mod, seed=7)
    g = torch.Generator().manual_seed(8)
    pw = (torch.randn(m, c, generator=g) * 0.2).requires_grad_(True)
    pb = torch.randn(m, generator=g).requires_grad_(True) if with_bias else None
    dout = torch.randn(n, m, generator=g)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(tuple(t.shape)) or t, lambda t: t):
        got = fused.layer_norm_modulate(params["x"], EPS, weight=params["weight"], bias=params["bias"],
                                        shift=params["shift"], scale=params["scale"], batch_index=bidx,
                                        project=(pw, pb))
    assert saved.count((n, c)) == 1 and (n, m) not in saved  # x only
    inputs = {**params, "pw": pw, "pb": pb}
    names = [k for k, v in inputs.items() if v is not None]
    ref_in = {k: inputs[k].detach().double().requires_grad_(True) for k in names}
    want = F.linear(_reference(ref_in["x"], ref_in.get("weight"), ref_in.get("bias"), ref_in.get("shift"),
                               ref_in.get("scale"), bidx), ref_in["pw"], ref_in.get("pb"))
    assert got.shape == (n, m) and _rel(got, want) < 1e-5
    grads = torch.autograd.grad(got, [inputs[k] for k in names], dout)
    ref_grads = torch.autograd.grad(want, [ref_in[k] for k in names], dout.double())
    for name, a, b in zip(names, grads, ref_grads):
        assert a.dtype == inputs[name].dtype and _rel(a, b) < 1e-5, name
    with torch.no_grad():  # the inference form: the kernel, then the product
        assert _rel(fused.layer_norm_modulate(params["x"], EPS, weight=params["weight"], bias=params["bias"],
                                              shift=params["shift"], scale=params["scale"], batch_index=bidx,
                                              project=(pw, pb)), want) < 1e-5
    with pytest.raises(ValueError, match="project weight"):
        fused.layer_norm_modulate(params["x"], EPS, project=(torch.zeros(m, c + 1), None))
    with pytest.raises(ValueError, match="neither add"):
        fused.layer_norm_modulate(params["x"].detach(), EPS, project=(pw, pb), out=torch.empty(n, c))


def test_norm_modulate_projection_falls_back_to_pytorch():
    """The PyTorch path of ``norm_modulate(project=)`` (CPU without the interpreter flag) gives the same values."""
    norm = torch.nn.LayerNorm(16, eps=EPS, elementwise_affine=False)
    x = torch.randn(9, 16, requires_grad=True)
    w = torch.randn(5, 16, requires_grad=True)
    got = fused.norm_modulate(norm, x, project=(w, None))
    want = F.linear(F.layer_norm(x, (16,), eps=EPS), w)
    assert _rel(got, want) < 1e-6
    got.sum().backward()
    assert x.grad is not None and w.grad is not None


@pytest.mark.parametrize("device", [pytest.param("cpu", marks=interpreted), pytest.param("cuda", marks=[
    pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")])])
@pytest.mark.parametrize("project", [False, True])
@pytest.mark.parametrize("affine,mod,counts", [(True, False, [70]), (False, True, [30, 1, 50])])
def test_pass_input_adds_the_other_gradient_in_the_kernel(monkeypatch, device, project, affine, mod, counts):
    """``pass_input=True`` returns ``(out, x)``; the gradient reaching that x (a residual stream's) is added to the
    norm's ``dx`` by the backward kernel (``HAS_SKIP``), not by autograd: every gradient of ``<out, dz> + <x, dskip>``
    against float64 (float32 inputs), with and without the folded projection, with the kernel's launches
    recorded."""
    n = sum(counts)
    params, bidx, dz = _case(n, 48, counts, affine, mod, seed=n + 3 * project + affine)
    params = {k: (v.detach().to(device).requires_grad_(True) if v is not None else None) for k, v in params.items()}
    bidx = None if bidx is None else bidx.to(device)
    g = torch.Generator().manual_seed(n)
    pw = torch.randn(24, 48, generator=g).to(device).requires_grad_()
    pb = torch.randn(24, generator=g).to(device).requires_grad_()
    dz = (dz[:, :24] if project else dz).to(device)
    dskip = torch.randn(n, 48, generator=g).to(device)
    seen = spy_launches(monkeypatch, fused, ("_layer_norm_modulate_bwd_kernel",), "HAS_SKIP")
    names = [k for k, v in params.items() if v is not None]
    inputs = [params[k] for k in names] + ([pw, pb] if project else [])
    out, x_out = fused.layer_norm_modulate(params["x"], EPS, weight=params["weight"], bias=params["bias"],
                                           shift=params["shift"], scale=params["scale"], batch_index=bidx,
                                           project=(pw, pb) if project else None, pass_input=True)
    assert torch.equal(x_out, params["x"])
    got = torch.autograd.grad((out * dz).sum() + (x_out * dskip).sum(), inputs)
    assert seen == [True]
    ref = {k: (v.detach().double().requires_grad_(True) if v is not None else None) for k, v in params.items()}
    ref_p = [pw.detach().double().requires_grad_(), pb.detach().double().requires_grad_()]
    want = _reference(ref["x"], ref["weight"], ref["bias"], ref["shift"], ref["scale"], bidx)
    want = F.linear(want, *ref_p) if project else want
    want_grads = torch.autograd.grad((want * dz.double()).sum() + (ref["x"] * dskip.double()).sum(),
                                     [ref[k] for k in names] + (ref_p if project else []))
    assert _rel(out, want) < 1e-5
    for name, a, b in zip(names + ["pw", "pb"], got, want_grads):
        assert _rel(a, b) < 1e-5, (name, _rel(a, b))


def test_norm_modulate_pass_input_on_the_pytorch_path():
    """On the PyTorch path (float64 here) ``pass_input`` returns x itself beside the result."""
    norm = torch.nn.LayerNorm(16, eps=EPS).double()
    x = torch.randn(5, 16, dtype=torch.float64)
    y, x_out = fused.norm_modulate(norm, x, pass_input=True)
    assert x_out is x and torch.allclose(y, norm(x))
