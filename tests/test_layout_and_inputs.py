"""Layout order, compression-block numbering, shell shapes and bad-input errors."""
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import reference
from ssa_kernels.shapes import SHAPES, shape_coords, shell_coords
from ssa_kernels.layout import (
    check_layout_order,
    compression_block_index,
    layout_order,
    selection_block_index,
)
from tests.helpers import random_coords, random_inputs

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def test_layout_order_sorts_by_batch_selection_block_sub_block_voxel():
    coords = torch.tensor(
        [
            [1, 0, 0, 0],
            [0, 8, 0, 0],  # selection block (1, 0, 0)
            [0, 0, 0, 9],  # selection block (0, 0, 1)
            [0, 5, 0, 0],  # selection block 0, compression sub-block (1, 0, 0)
            [0, 0, 3, 0],  # selection block 0, sub-block 0, voxel (0, 3, 0)
            [0, 1, 0, 0],  # sub-block 0, voxel (1, 0, 0)
        ]
    )
    perm = layout_order(coords, compression_block=4, selection_block=8)
    assert coords[perm].tolist() == [[0, 0, 3, 0], [0, 1, 0, 0], [0, 5, 0, 0], [0, 0, 0, 9], [0, 8, 0, 0], [1, 0, 0, 0]]
    check_layout_order(coords[perm], compression_block=4, selection_block=8)
    with pytest.raises(ValueError, match="layout order"):
        check_layout_order(coords, compression_block=4, selection_block=8)


@pytest.mark.parametrize("mc,ms", [(2, 4), (4, 4), (2, 8), (4, 8), (8, 8)])
def test_reference_layout_order_equals_the_kernels(mc, ms):
    """The oracle's own layout order (reference.layout, digit by digit) against ssa_kernels' mixed-radix keys,
    on random voxels of several batch elements given in random order."""
    gen = torch.Generator().manual_seed(100 * mc + ms)
    for sizes, extent in (((50, 0, 130, 7), 13), ((1,), 3), ((200, 200), 9)):
        parts = []
        for b, n in enumerate(sizes):
            lin = torch.randperm(extent**3, generator=gen)[:n]
            xyz = torch.stack([lin // extent**2, (lin // extent) % extent, lin % extent], 1)
            parts.append(torch.cat([torch.full((n, 1), b), xyz], 1))
        coords = torch.cat(parts)
        coords = coords[torch.randperm(coords.shape[0], generator=gen)]
        perm = reference.layout_order(coords, compression_block=mc, selection_block=ms)
        assert torch.equal(perm, layout_order(coords, compression_block=mc, selection_block=ms))
        ordered = coords[perm]
        reference.check_layout_order(ordered, compression_block=mc, selection_block=ms)
        if ordered.shape[0] > 1:
            with pytest.raises(ValueError, match="layout order"):
                reference.check_layout_order(ordered.flip(0), compression_block=mc, selection_block=ms)
            with pytest.raises(ValueError, match="duplicate"):
                reference.check_layout_order(ordered[[0, 0]], compression_block=mc, selection_block=ms)


def test_reference_imports_neither_triton_nor_ssa_kernels():
    """The oracle must not depend on what it checks (docs/architecture.md)."""
    code = ("import sys, reference\n"
            "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('triton', 'ssa_kernels'))\n"
            "print(bad)\n"
            "sys.exit(1 if bad else 0)\n")
    run = subprocess.run([sys.executable, "-c", code], cwd=Path(__file__).resolve().parents[1], capture_output=True,
                         text=True, timeout=300, check=False)
    assert run.returncode == 0, f"import reference pulled in {run.stdout.strip()} {run.stderr[-2000:]}"


@pytest.mark.parametrize("mc,ms", [(4, 8), (8, 8), (2, 8), (1, 4)])
def test_blocks_are_contiguous_runs_numbered_like_the_reference(mc, ms):
    gen = torch.Generator().manual_seed(mc * 10 + ms)
    coords = random_coords((300, 0, 120), 24, compression_block=mc, selection_block=ms, generator=gen)
    cid = compression_block_index(coords, compression_block=mc, selection_block=ms)
    sid = selection_block_index(coords, compression_block=mc, selection_block=ms)
    assert torch.equal(cid, reference.block_ids(coords, mc))
    assert torch.equal(sid, reference.block_ids(coords, ms))
    # runs: ids never decrease along the token order
    assert bool((cid[1:] >= cid[:-1]).all()) and bool((sid[1:] >= sid[:-1]).all())
    # a permutation of the same tokens sorts back to the same order
    shuffled = coords[torch.randperm(coords.shape[0], generator=gen)]
    assert torch.equal(shuffled[layout_order(shuffled, compression_block=mc, selection_block=ms)], coords)


@pytest.mark.parametrize("name", list(SHAPES))
def test_shell_token_and_block_counts(name):
    s = SHAPES[name]
    coords = shell_coords(s.resolution, s.tau)
    assert coords.shape[0] == s.tokens
    expected_blocks = {
        "shell-512": (224, 964),
        "shell-1024-thin": (916, 3800),
        "shell-1024": (992, 4660),
        "shell-2048-thin": (3576, 14884),
        "shell-2048": (4056, 18828),
    }[name]
    for m, n in zip((8, 4), expected_blocks):
        assert torch.unique(coords[:, 1:] // m, dim=0).shape[0] == n


def test_shape_coords_are_in_layout_order():
    coords = shape_coords("shell-512", compression_block=4, selection_block=8)
    check_layout_order(coords, compression_block=4, selection_block=8)
    with pytest.raises(ValueError, match="unknown shape"):
        shape_coords("shell-4096")


def _good():
    gen = torch.Generator().manual_seed(0)
    coords = random_coords((30, 20), 12, compression_block=4, selection_block=8, generator=gen)
    inp = random_inputs(coords, 4, 2, 8, compression_block=4, selection_block=8, generator=gen)
    kw = dict(compression_block=4, selection_block=8, topk=2, window=8, shift=0)
    return inp, coords, kw


def _call(inp, coords, kw):
    return reference.spatial_sparse_attention(*inp, coords, **kw)


@pytest.mark.parametrize(
    "mutate,exc,match",
    [
        (lambda i, c, k: i.__setitem__(0, i[0][:, :3]), ValueError, "multiple of the number of kv heads"),
        (lambda i, c, k: i.__setitem__(1, i[1][:-1]), ValueError, "k and v must have the same shape"),
        (lambda i, c, k: i.__setitem__(0, i[0][:-1]), ValueError, "tokens"),
        (lambda i, c, k: i.__setitem__(0, i[0][..., :4]), ValueError, "head_dim"),
        (lambda i, c, k: i.__setitem__(3, i[3][:-1]), ValueError, "k_cmp and v_cmp"),
        (lambda i, c, k: (i.__setitem__(3, i[3][:-1]), i.__setitem__(4, i[4][:-1])), ValueError, "compression blocks"),
        (lambda i, c, k: i.__setitem__(5, i[5][:, :2]), ValueError, "gate"),
        (lambda i, c, k: i.__setitem__(2, i[2].float()), TypeError, "dtype"),
        (lambda i, c, k: i.__setitem__(0, i[0][0]), ValueError, "3 dimensions"),
        (lambda i, c, k: i.__setitem__(0, [1, 2]), TypeError, "q must be a torch.Tensor"),
        (lambda i, c, k: k.update(compression_block=3), ValueError, "must divide selection_block"),
        (lambda i, c, k: k.update(topk=0), ValueError, "topk"),
        (lambda i, c, k: k.update(shift=8), ValueError, "shift"),
        (lambda i, c, k: k.update(window=0), ValueError, "window"),
        (lambda i, c, k: k.update(scale=-1.0), ValueError, "scale"),
    ],
)
def test_bad_input_gets_a_clear_error(mutate, exc, match):
    inp, coords, kw = _good()
    mutate(inp, coords, kw)
    with pytest.raises(exc, match=match):
        _call(inp, coords, kw)


def test_bad_coordinates():
    inp, coords, kw = _good()
    with pytest.raises(ValueError, match="integer dtype"):
        _call(inp, coords.double(), kw)
    neg = coords.clone()
    neg[0, 1] = -1
    with pytest.raises(ValueError, match="non-negative"):
        _call(inp, neg, kw)
    with pytest.raises(ValueError, match="layout order"):
        _call(inp, coords.flip(0), kw)
    dup = coords.clone()
    dup[1] = dup[0]
    with pytest.raises(ValueError, match="duplicate|layout order"):
        _call(inp, dup, kw)
    with pytest.raises(ValueError, match=r"\[N, 4\]"):
        _call(inp, coords[:, :3], kw)
