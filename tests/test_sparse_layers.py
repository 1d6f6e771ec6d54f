"""SparseTensor, sparse convolution (against dense conv3d), norms, resampling, position embedding and window
attention (against the dense reference), all on CPU in float64 unless a test says otherwise."""
import pytest
import torch
import torch.nn.functional as F

import reference
from model.sparse import (
    AbsolutePositionEmbedder,
    CoordIndex,
    SparseConv3d,
    SparseGroupNorm,
    SparseLinear,
    SparseSiLU,
    SparseTensor,
    SparseTransformerBlock,
    kernel_offsets,
    kernel_to_dense_weight,
    neighbour_map,
    pool_map,
    sincos_position_embedding,
    sparse_downsample,
    sparse_subdivide,
    spconv_available,
    window_attention,
)
from model.sparse.conv import submanifold_conv3d
from model.sparse.layers import CHILD_OFFSETS


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def random_sparse(sizes, channels, extent, *, dtype=torch.float64, seed=0, resolution=None):
    """Batch elements of ``sizes`` distinct random voxels in ``[0, extent)^3`` with standard-normal features."""
    gen = torch.Generator().manual_seed(seed)
    coords, feats = [], []
    for n in sizes:
        lin = torch.randperm(extent**3, generator=gen)[:n]
        coords.append(torch.stack([lin // extent**2, (lin // extent) % extent, lin % extent], dim=1))
        feats.append(torch.randn(n, channels, generator=gen, dtype=dtype))
    return SparseTensor.from_list(coords, feats, resolution=resolution or extent)


def gather_dense(dense, x):
    """Rows ``[N, C]`` of a dense ``[B, C, R, R, R]`` grid at ``x``'s voxels."""
    c = x.coords.long()
    return dense[c[:, 0], :, c[:, 1], c[:, 2], c[:, 3]]


# -------------------------------------------------------------------------------------------------------------
# SparseTensor


def test_from_list_offsets_unbind_and_dense():
    x = random_sparse((5, 0, 7), 3, 4)
    assert x.coords.dtype == torch.int32 and x.batch_size == 3 and x.shape == (12, 3)
    assert x.offsets.tolist() == [0, 5, 5, 12]
    parts = x.unbind()
    assert [p[0].shape[0] for p in parts] == [5, 0, 7]
    y = SparseTensor.from_list([p[0] for p in parts], [p[1] for p in parts], resolution=4)
    assert torch.equal(y.coords, x.coords) and torch.equal(y.feats, x.feats)
    grid = x.dense()
    assert grid.shape == (3, 3, 4, 4, 4)
    assert torch.equal(gather_dense(grid, x), x.feats)
    assert float(grid.abs().sum()) == pytest.approx(float(x.feats.abs().sum()))


def test_replace_shares_cache_and_subset_keeps_order():
    x = random_sparse((6, 4), 2, 5)
    index = x.coord_index()
    y = x.replace(x.feats * 2)
    assert y.cache is x.cache and y.coord_index() is index
    sub = x.subset(torch.tensor([True, False] * 5))
    assert sub.cache is not x.cache and sub.num_voxels == 5
    assert torch.equal(sub.coords, x.coords[::2]) and torch.equal(sub.feats, x.feats[::2])
    assert x.to(dtype=torch.float32).cache is x.cache


def test_coord_index_lookup():
    coords = torch.tensor([[0, 1, 2, 3], [0, 0, 0, 0], [1, 1, 2, 3]])
    index = CoordIndex(coords)
    query = torch.tensor([[1, 1, 2, 3], [0, 0, 0, 0], [0, 1, 2, 4], [0, -1, 0, 0], [2, 1, 2, 3], [0, 9, 9, 9]])
    assert index.lookup(query).tolist() == [2, 1, -1, -1, -1, -1]


@pytest.mark.parametrize(
    "coords, feats, kwargs, exc, match",
    [
        (torch.zeros(3, 4), torch.zeros(3, 1), {}, TypeError, "coords must have an integer dtype"),
        ([[0, 0, 0, 0]], torch.zeros(1, 1), {}, TypeError, "coords must be a torch.Tensor"),
        (torch.zeros(3, 3, dtype=torch.long), torch.zeros(3, 1), {}, ValueError, r"coords must have shape \[N, 4\]"),
        (torch.tensor([[1, 0, 0, 0], [0, 0, 0, 1]]), torch.zeros(2, 1), {}, ValueError, "ascending batch order"),
        (torch.tensor([[0, 0, 0, 0], [0, 0, 0, 0]]), torch.zeros(2, 1), {}, ValueError, "duplicate voxels"),
        (torch.tensor([[0, -1, 0, 0]]), torch.zeros(1, 1), {}, ValueError, "non-negative"),
        (torch.tensor([[0, 0, 0, 0]]), torch.zeros(2, 1), {}, ValueError, "feats has 2 rows"),
        (torch.tensor([[0, 0, 0, 0]]), torch.zeros(1, 1, dtype=torch.long), {}, TypeError, "feats must be a floating"),
        (torch.tensor([[0, 0, 0, 0]]), torch.zeros(1), {}, ValueError, r"feats must have shape \[N, C\]"),
        (torch.tensor([[0, 4, 0, 0]]), torch.zeros(1, 1), {"resolution": 4}, ValueError, "resolution 4"),
        (torch.tensor([[1, 0, 0, 0]]), torch.zeros(1, 1), {"batch_size": 1}, ValueError, "batch_size"),
        (torch.tensor([[0, 0, 0, 0]]), torch.zeros(1, 1), {"resolution": 0}, ValueError, "resolution must be"),
    ],
)
def test_bad_input_names_the_argument(coords, feats, kwargs, exc, match):
    with pytest.raises(exc, match=match):
        SparseTensor(coords, feats, **kwargs)


def test_bad_from_list_and_replace():
    with pytest.raises(ValueError, match="coords has 2 batch elements but feats has 1"):
        SparseTensor.from_list([torch.zeros(1, 3, dtype=torch.long)] * 2, [torch.zeros(1, 1)])
    with pytest.raises(ValueError, match=r"coords\[0\] must have shape \[n, 3\]"):
        SparseTensor.from_list([torch.zeros(1, 4, dtype=torch.long)], [torch.zeros(1, 1)])
    x = random_sparse((3,), 2, 4)
    with pytest.raises(ValueError, match="feats has 2 rows"):
        x.replace(torch.zeros(2, 2))
    with pytest.raises(TypeError, match="x must be a SparseTensor"):
        SparseConv3d(2, 2)(x.feats)


# -------------------------------------------------------------------------------------------------------------
# sparse convolution


@pytest.mark.parametrize("kernel_size", [3, 1])
def test_conv_matches_dense_conv3d_forward_and_backward(kernel_size):
    torch.manual_seed(0)
    x = random_sparse((60, 45), 3, 6)
    conv = SparseConv3d(3, 4, kernel_size, backend="torch").double()
    feats = x.feats.clone().requires_grad_()
    y = conv(x.replace(feats))
    grad_out = torch.randn_like(y.feats)
    (y.feats * grad_out).sum().backward()

    feats_d = x.feats.clone().requires_grad_()
    kernel_d = conv.conv.kernel.detach().clone().requires_grad_()
    bias_d = conv.conv.bias.detach().clone().requires_grad_()
    weight = kernel_to_dense_weight(kernel_d) if kernel_size == 3 else kernel_d.T.reshape(4, 3, 1, 1, 1)
    dense = F.conv3d(x.replace(feats_d).dense(), weight, bias_d, padding=kernel_size // 2)
    y_d = gather_dense(dense, x)  # submanifold: outputs at the input voxels only
    (y_d * grad_out).sum().backward()

    torch.testing.assert_close(y.feats, y_d)
    torch.testing.assert_close(feats.grad, feats_d.grad)
    torch.testing.assert_close(conv.conv.kernel.grad, kernel_d.grad)
    torch.testing.assert_close(conv.conv.bias.grad, bias_d.grad)


def test_kernel_tap_order_is_x_fastest():
    """Tap k reads the neighbour at (k % 3 - 1, (k // 3) % 3 - 1, k // 9 - 1) (torchsparse order)."""
    offsets = kernel_offsets()
    assert offsets[0].tolist() == [-1, -1, -1] and offsets[1].tolist() == [0, -1, -1]
    assert offsets[3].tolist() == [-1, 0, -1] and offsets[9].tolist() == [-1, -1, 0]
    assert offsets[13].tolist() == [0, 0, 0]
    centre = torch.tensor([0, 2, 2, 2])
    for tap in (14, 16, 22):  # +x, +y, +z
        coords = torch.stack([centre, centre + torch.cat([torch.zeros(1, dtype=torch.long), offsets[tap]])])
        coords = coords[torch.argsort(coords[:, 1] * 100 + coords[:, 2] * 10 + coords[:, 3])]
        x = SparseTensor(coords, torch.tensor([[1.0], [1.0]], dtype=torch.float64))
        conv = SparseConv3d(1, 1, bias=False).double()
        with torch.no_grad():
            conv.conv.kernel.zero_()
            conv.conv.kernel[tap] = 1.0
        y = conv(x).feats[:, 0].detach()
        at_centre = (x.coords.long() == centre).all(1)
        assert float(y[at_centre]) == 1.0 and float(y[~at_centre]) == 0.0  # only the centre sees +offset


def test_conv_gradcheck_float64():
    x = random_sparse((9, 6), 2, 3, seed=3)
    conv = SparseConv3d(2, 3, backend="torch").double()

    def f(feats, kernel, bias):
        from model.sparse.conv import submanifold_conv3d

        return submanifold_conv3d(x.replace(feats), kernel, bias, backend="torch")

    inputs = (x.feats.clone().requires_grad_(), conv.conv.kernel.detach().clone().requires_grad_(),
              conv.conv.bias.detach().clone().requires_grad_())
    assert torch.autograd.gradcheck(f, inputs)


def test_neighbour_map_is_cached_per_coordinate_set():
    x = random_sparse((30,), 2, 5)
    conv = SparseConv3d(2, 2, backend="torch").double()
    conv(x)
    nmap = neighbour_map(x)
    conv(x.replace(x.feats + 1))
    assert neighbour_map(x.replace(x.feats)) is nmap
    total_pairs = sum(p[1].numel() for p in nmap.pairs)
    # every pair is symmetric: a neighbour at +d has us at -d
    assert total_pairs % 2 == 0


def _looked_up_rows(x, monkeypatch):
    """``x``'s neighbour table from its coordinate hash alone (a fresh cache, derivation off)."""
    from model.sparse import conv as conv_module

    monkeypatch.setattr(conv_module, "DERIVE_NEIGHBOUR_ROWS", False)
    rows = conv_module.neighbour_rows(SparseTensor(x.coords, x.feats, batch_size=x.batch_size, validate=False))
    monkeypatch.undo()
    return rows


@pytest.mark.parametrize("seed", [0, 1])
def test_derived_neighbour_rows_equal_the_lookup(seed, monkeypatch):
    """Subdividing and subsetting a set whose table exists derive the new tables from it (no hash): the same int32
    tables as a lookup, bit for bit, over several batch elements of different sizes, chained as the decoder does
    (conv, subdivide, conv, prune, conv), with voxels at the grid's faces (neighbours outside it are absent)."""
    from model.sparse.conv import NEIGHBOUR_ROWS_SOURCE_KEY, neighbour_rows

    gen = torch.Generator().manual_seed(seed)
    x = random_sparse((40, 1, 90), 2, 6, seed=seed)
    x = x.subset(torch.arange(x.num_voxels))  # a set made by subset before any table exists: a plain lookup
    assert NEIGHBOUR_ROWS_SOURCE_KEY not in x.cache
    table = neighbour_rows(x)
    assert torch.equal(table, _looked_up_rows(x, monkeypatch))
    for _ in range(2):
        y = sparse_subdivide(x)
        assert NEIGHBOUR_ROWS_SOURCE_KEY in y.cache
        derived = neighbour_rows(y)
        assert NEIGHBOUR_ROWS_SOURCE_KEY not in y.cache and neighbour_rows(y) is derived
        assert derived.dtype == torch.int32 and derived.shape == (y.num_voxels, 27)
        assert torch.equal(derived, _looked_up_rows(y, monkeypatch))
        assert 0 < int((derived >= 0).sum()) < derived.numel()  # present and absent neighbours both occur
        for rows in (torch.rand(y.num_voxels, generator=gen) < 0.4,  # a mask, then increasing row numbers
                     torch.nonzero(torch.rand(y.num_voxels, generator=gen) < 0.7).squeeze(1)):
            z = y.subset(rows)
            assert torch.equal(neighbour_rows(z), _looked_up_rows(z, monkeypatch))
        x = y.subset(torch.rand(y.num_voxels, generator=gen) < 0.3)
        neighbour_rows(x)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_derived_neighbour_rows_equal_the_lookup_on_cuda(monkeypatch):
    """The same on CUDA (its gathers read the absent neighbours' -1 as an index from the end), at a size where the
    tables have millions of entries, through the Triton convolution's decoder chain."""
    from model.sparse.conv import neighbour_rows

    x = random_sparse((3000, 500), 4, 40, dtype=torch.float32).to("cuda")
    neighbour_rows(x)
    y = sparse_subdivide(x)
    assert torch.equal(neighbour_rows(y), _looked_up_rows(y, monkeypatch))
    z = y.subset(torch.rand(y.num_voxels, device="cuda") < 0.5)
    assert torch.equal(neighbour_rows(z), _looked_up_rows(z, monkeypatch))
    conv = SparseConv3d(4, 8, backend="triton").cuda()
    with torch.no_grad():
        fresh = SparseTensor(z.coords, z.feats, batch_size=z.batch_size, validate=False)
        out = conv(z).feats
        monkeypatch.setattr("model.sparse.conv.DERIVE_NEIGHBOUR_ROWS", False)
        assert torch.equal(out, conv(fresh).feats)


def test_derived_neighbour_rows_keep_the_convolution(monkeypatch):
    """A convolution after subdivide + subset gives the same values on the derived table as on a looked-up one."""
    torch.manual_seed(0)
    x = random_sparse((25, 12), 3, 5)
    conv = SparseConv3d(3, 4, backend="torch").double()
    conv(x)
    y = sparse_subdivide(x).subset(torch.rand(8 * x.num_voxels) < 0.5)
    fresh = SparseTensor(y.coords, y.feats, batch_size=y.batch_size, validate=False)
    from model.sparse import conv as conv_module

    out = conv(y).feats
    monkeypatch.setattr(conv_module, "DERIVE_NEIGHBOUR_ROWS", False)
    assert torch.equal(out, conv(fresh).feats)


def test_conv_backends():
    x = random_sparse((20,), 2, 4)
    conv = SparseConv3d(2, 2).double()
    ref = SparseConv3d(2, 2, backend="torch").double()
    ref.load_state_dict(conv.state_dict())
    assert torch.equal(conv(x).feats, ref(x).feats)  # auto on CPU tensors = torch
    with pytest.raises(ValueError, match="backend must be one of"):
        SparseConv3d(2, 2, backend="torchsparse")
    with pytest.raises(ValueError, match="kernel_size must be 1 or 3"):
        SparseConv3d(2, 2, kernel_size=5)
    with pytest.raises(RuntimeError, match="backend='spconv' was requested"):
        SparseConv3d(2, 2, backend="spconv").double()(x)
    assert set(conv.state_dict()) == {"conv.kernel", "conv.bias"}
    assert tuple(conv.conv.kernel.shape) == (27, 2, 2)
    assert tuple(SparseConv3d(2, 5, 1).conv.kernel.shape) == (2, 5)


def test_auto_backend_never_picks_spconv(monkeypatch):
    """spconv is opt-in: even where it would be usable, "auto" runs the torch backend (the tested one)."""
    import model.sparse.conv as conv_mod

    def refuse(*args, **kwargs):
        raise AssertionError("auto picked spconv")

    monkeypatch.setattr(conv_mod, "_spconv_usable", lambda feats: None)  # pretend spconv could run
    monkeypatch.setattr(conv_mod, "_conv3_spconv", refuse)
    x = random_sparse((20,), 2, 4)
    conv = SparseConv3d(2, 2).double()
    ref = SparseConv3d(2, 2, backend="torch").double()
    ref.load_state_dict(conv.state_dict())
    assert torch.equal(conv(x).feats, ref(x).feats)
    with pytest.raises(AssertionError, match="auto picked spconv"):  # the opt-in name still reaches spconv
        SparseConv3d(2, 2, backend="spconv").double()(x)


@pytest.mark.parametrize("cin, cout", [(3, 5), (16, 32), (70, 20)])
def test_triton_conv_matches_float64(cin, cout):
    """The Triton kernel (the interpreter on a CPU) against the torch backend in float64, on fresh random voxels:
    two batch elements of different sizes, lone voxels (one present tap), channel counts below and across the tiles
    (70 = 64 + 6 input channels), with and without bias."""
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    x = random_sparse((150, 37), cin, 6, dtype=torch.float64, seed=cin)
    ref = SparseConv3d(cin, cout, backend="torch").double()
    with torch.no_grad():
        ref.conv.bias.normal_()
    expected = ref(x).feats
    tri = SparseConv3d(cin, cout, backend="triton").float().to(dev)
    tri.load_state_dict(ref.state_dict())
    with torch.no_grad():
        got = tri(x.to(device=dev).replace(x.feats.float().to(dev))).feats
        assert got.dtype == torch.float32
        assert float((got.double().cpu() - expected).norm() / expected.norm()) < 1e-5
        nobias = submanifold_conv3d(x.replace(x.feats.float()).to(device=dev), tri.conv.kernel, None,
                                    backend="triton")
        assert float((nobias.double().cpu() + ref.conv.bias - expected).norm() / expected.norm()) < 1e-5
    lone = SparseTensor(torch.tensor([[0, 0, 0, 0], [0, 5, 5, 5]]), torch.randn(2, cin))
    with torch.no_grad():
        y = SparseConv3d(cin, cout, backend="triton").to(dev)(lone.to(device=dev)).feats.cpu()
    assert y.shape == (2, cout) and torch.isfinite(y).all()


def test_triton_conv_refuses_autograd_and_auto_picks_it_only_without_grad(monkeypatch):
    import model.sparse.conv as conv_mod

    x = random_sparse((30,), 4, 4, dtype=torch.float32)
    conv = SparseConv3d(4, 4, backend="triton")
    with pytest.raises(RuntimeError, match="no backward"):
        conv(x)  # the kernel weights require grad under autograd
    calls = []
    monkeypatch.setattr(conv_mod, "_conv3_triton", lambda *a: calls.append(1) or conv_mod._conv3_torch(
        a[0].feats, conv_mod.neighbour_map(a[0]), a[1], a[2]))
    auto = SparseConv3d(4, 4)
    auto(x)  # CPU features: torch backend
    assert not calls
    monkeypatch.setattr(torch.Tensor, "is_cuda", property(lambda self: True))  # pretend the features are on a GPU
    auto(x)  # gradient recorded: torch backend
    assert not calls
    with torch.no_grad():
        auto(x)
    assert calls == [1]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available() or not spconv_available(), reason="needs CUDA and spconv")
def test_spconv_backend_matches_torch_backend():
    torch.manual_seed(0)
    x = random_sparse((500, 300), 16, 12, dtype=torch.float32).to("cuda")
    sp = SparseConv3d(16, 32, backend="spconv").cuda()
    th = SparseConv3d(16, 32, backend="torch").cuda()
    th.load_state_dict(sp.state_dict())
    grad_out = torch.randn(x.num_voxels, 32, device="cuda")
    grads = []
    for conv in (sp, th):  # training mode: forward and backward
        feats = x.feats.clone().requires_grad_()
        y = conv(x.replace(feats)).feats
        (y * grad_out).sum().backward()
        grads.append((y.detach(), feats.grad, conv.conv.kernel.grad))
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-3)
    sp.eval(), th.eval()
    with torch.no_grad():
        torch.testing.assert_close(sp(x).feats, th(x).feats, rtol=1e-3, atol=1e-3)


# -------------------------------------------------------------------------------------------------------------
# batch separation, norms, resampling


def _small_network(channels=4):
    torch.manual_seed(1)
    return torch.nn.Sequential(
        SparseConv3d(channels, channels, backend="torch"),
        SparseGroupNorm(2, channels),
        SparseSiLU(),
        SparseTransformerBlock(channels, num_heads=2, window=4, shift=2),
        SparseLinear(channels, channels),
    ).double()


def test_layers_keep_batch_elements_separate():
    x = random_sparse((80, 70), 4, 8)
    net = _small_network()
    n0 = int(x.offsets[1])
    perturbed = x.feats.clone()
    perturbed[n0:] += torch.randn_like(perturbed[n0:])
    outs = []
    for feats in (x.feats, perturbed):
        h = net(x.replace(feats))
        down = sparse_downsample(h)
        up = sparse_subdivide(down)
        outs.append((h, down, up))
    (h_a, d_a, u_a), (h_b, d_b, u_b) = outs
    for a, b in ((h_a, h_b), (d_a, d_b), (u_a, u_b)):
        first = a.offsets[1]
        assert torch.equal(a.feats[:first], b.feats[:first])  # bit-identical batch element 0
        assert not torch.equal(a.feats[first:], b.feats[first:])


def test_group_norm_statistics_per_batch_element():
    x = random_sparse((50, 0, 30), 6, 5)
    x = x.replace(x.feats * torch.tensor([1.0, 5.0, 0.1, 2.0, 3.0, 1.0], dtype=torch.float64) + 3.0)
    gn = SparseGroupNorm(3, 6).double()
    with torch.no_grad():
        gn.weight.uniform_(0.5, 1.5)
        gn.bias.uniform_(-1, 1)
    ref = torch.nn.GroupNorm(3, 6).double()
    ref.load_state_dict(gn.state_dict())
    y = gn(x)
    for (_, f_out), (_, f_in) in zip(y.unbind(), x.unbind()):
        if f_in.shape[0]:
            torch.testing.assert_close(f_out, ref(f_in.T.unsqueeze(0))[0].T)
    # computed in float32 under the hood for half inputs, returned in the input dtype
    assert gn.float()(x.to(dtype=torch.bfloat16)).dtype == torch.bfloat16


def test_subdivide_and_downsample_invert_each_other():
    x = random_sparse((40, 25), 3, 6)
    up = sparse_subdivide(x)
    assert up.num_voxels == 8 * x.num_voxels and up.resolution == 12
    assert torch.equal(up.coords[:8, 1:] - 2 * x.coords[:1, 1:], torch.tensor(CHILD_OFFSETS, dtype=torch.int32))
    assert torch.equal(up.feats[::8], x.feats)
    back = sparse_downsample(up)
    order = torch.argsort(x.coords.long()[:, 0] * 1000 + x.coords.long()[:, 1] * 100 + x.coords.long()[:, 2] * 10
                          + x.coords.long()[:, 3])
    assert torch.equal(back.coords, x.coords[order]) and back.resolution == 6
    torch.testing.assert_close(back.feats, x.feats[order])
    # the other way round: the children of the pooled voxels contain every voxel
    pooled = sparse_downsample(x)
    assert bool(sparse_subdivide(pooled).coord_index().contains(x.coords).all())


def test_downsample_is_the_mean_of_children_and_shares_the_cache():
    x = random_sparse((90,), 2, 6)
    pm = pool_map(x)
    y = sparse_downsample(x)
    parent = x.coords.clone()
    parent[:, 1:] //= 2
    for row in range(y.num_voxels):
        members = (parent == y.coords[row]).all(1)
        torch.testing.assert_close(y.feats[row], x.feats[members].mean(0))
    assert int(pm.counts.sum()) == x.num_voxels
    assert sparse_downsample(x.replace(x.feats * 3)).cache is y.cache  # one parent cache per coordinate set


def test_released_pooling_divides_by_children_plus_one():
    """Hand-computed: parents with 1, 3 and 8 children. The released SparseDownsample (scatter_reduce "mean" from a
    zero tensor, include_self=True) gives sum / (n + 1); "mean" gives sum / n."""
    one = [[0, 0, 0]]                                               # parent (0, 0, 0): 1 child
    three = [[2, 0, 0], [3, 0, 0], [3, 1, 1]]                       # parent (1, 0, 0): 3 children
    eight = [[x, y, z] for x in (0, 1) for y in (2, 3) for z in (0, 1)]  # parent (0, 1, 0): all 8 children
    coords = torch.tensor(one + three + eight)
    feats = torch.tensor([[4.0], [1.0], [2.0], [6.0]] + [[float(i)] for i in range(1, 9)], dtype=torch.float64)
    x = SparseTensor.from_list([coords], [feats], resolution=4)
    released = sparse_downsample(x, mode="released")
    mean = sparse_downsample(x)
    by_parent = {tuple(c[1:]): (float(r), float(m)) for c, r, m in
                 zip(released.coords.tolist(), released.feats[:, 0], mean.feats[:, 0])}
    assert by_parent == {(0, 0, 0): (4.0 / 2, 4.0), (1, 0, 0): (9.0 / 4, 3.0), (0, 1, 0): (36.0 / 9, 4.5)}
    # the module form and bad modes
    from model.sparse import SparseDownsample

    assert torch.equal(SparseDownsample(2, "released")(x).feats, released.feats)
    with pytest.raises(ValueError, match="pool_mode must be one of"):
        SparseDownsample(2, "max")
    with pytest.raises(ValueError, match="pool_mode must be one of"):
        sparse_downsample(x, mode="sum")


# -------------------------------------------------------------------------------------------------------------
# position embedding and window attention


def test_position_embedding_shapes_and_values():
    x = random_sparse((7, 5), 512, 30)
    emb = AbsolutePositionEmbedder(512)(x)
    assert emb.shape == (12, 512) and emb.dtype == torch.float64
    assert bool((emb[:, 510:] == 0).all())
    xyz = x.coords[:, 1:].double()
    freqs = 1.0 / 10000 ** (torch.arange(85, dtype=torch.float64) / 85)
    for axis in range(3):
        torch.testing.assert_close(emb[:, axis * 170: axis * 170 + 85], torch.sin(xyz[:, axis:axis + 1] * freqs))
        torch.testing.assert_close(emb[:, axis * 170 + 85: axis * 170 + 170], torch.cos(xyz[:, axis:axis + 1] * freqs))
    assert sincos_position_embedding(xyz, 1024).shape == (12, 1024)
    assert bool((sincos_position_embedding(xyz, 1024)[:, 1020:] == 0).all())
    half = sincos_position_embedding(xyz, 1024, factor=0.5)
    torch.testing.assert_close(half, sincos_position_embedding(xyz * 0.5, 1024))
    with pytest.raises(ValueError, match="channels must be"):
        sincos_position_embedding(xyz, 4)


@pytest.mark.parametrize("shift", [0, 4])
def test_window_attention_equals_dense_masked_attention(shift):
    x = random_sparse((150, 0, 90), 1, 20, seed=shift)
    gen = torch.Generator().manual_seed(7)
    q, k, v = (torch.randn(x.num_voxels, 3, 8, generator=gen, dtype=torch.float64).requires_grad_() for _ in range(3))
    cache = {}
    o = window_attention(q, k, v, x.coords, 8, shift, cache=cache)
    ref = reference.window_attention(q, k, v, x.coords, window=8, shift=shift)
    torch.testing.assert_close(o, ref)
    grad = torch.randn_like(o)
    g = torch.autograd.grad(o, (q, k, v), grad)
    g_ref = torch.autograd.grad(ref, (q, k, v), grad)
    for a, b in zip(g, g_ref):
        torch.testing.assert_close(a, b)
    assert ("window", 8, shift) in cache
    part = cache[("window", 8, shift)]
    window_attention(q, k, v, x.coords, 8, shift, cache=cache)
    assert cache[("window", 8, shift)] is part
    with pytest.raises(ValueError, match="shift must be"):
        window_attention(q, k, v, x.coords, 8, 8)


def test_transformer_block_checkpointing_gives_the_same_gradients():
    x = random_sparse((60, 40), 8, 10)
    torch.manual_seed(0)
    block = SparseTransformerBlock(8, num_heads=2, window=8, shift=4).double()
    grads = []
    for use_checkpoint in (False, True):
        block.use_checkpoint = use_checkpoint
        block.zero_grad()
        feats = x.feats.clone().requires_grad_()
        block(x.replace(feats)).feats.square().sum().backward()
        grads.append((feats.grad, block.attn.to_qkv.weight.grad.clone()))
    torch.testing.assert_close(grads[0][0], grads[1][0])
    torch.testing.assert_close(grads[0][1], grads[1][1])
    assert {k for k in block.state_dict()} == {
        "attn.to_qkv.weight", "attn.to_qkv.bias", "attn.to_out.weight", "attn.to_out.bias",
        "mlp.mlp.0.weight", "mlp.mlp.0.bias", "mlp.mlp.2.weight", "mlp.mlp.2.bias",
    }
