"""Image to mesh (model/pipeline/cascade.py, images.py, geometry.py, random_weights.py, model/cli/generate.py,
model/reports/generate.py): the whole random tiny cascade on the CPU through the command line, input checking (one
image opener for the cascade and the encoder's preprocessing), the revoxelisation between the 512 and 1024 stages,
the layout built once per stage, extraction with the sign refiner's fill grid, the top-level API (``from model
import ImageToMesh``, ``from_pretrained("random:tiny")``) and the report's dry run.

The 1024^3 extraction from near-surface voxels only (no dense grid, memory checked) is
tests/test_extract.py::test_sphere_at_1024_from_band_only.
"""
from __future__ import annotations

import json
import warnings

import numpy as np
import pytest
import torch
import trimesh
from PIL import Image

pytest.importorskip("skimage")

from model.pipeline import cascade as C  # noqa: E402
from model.pipeline import geometry as G  # noqa: E402
from model.pipeline import images as IM  # noqa: E402
from model.pipeline.extract import sparse_sdf_to_mesh  # noqa: E402
from ssa_kernels.layout import check_layout_order  # noqa: E402

#: One Euler step per stage keeps the CPU runs short.
FEW_STEPS = ["--steps-dense", "1", "--steps-512", "1", "--steps-1024", "1"]


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    """RGB on white, RGBA, grayscale, RGB with a noisy border, a non-image file."""
    root = tmp_path_factory.mktemp("images")
    rgb = np.full((80, 96, 3), 255, np.uint8)
    rgb[18:64, 30:70] = (200, 40, 40)
    rgb[34:46, 44:56] = 255  # a white hole inside the object: not connected to the border, stays object
    Image.fromarray(rgb).save(root / "red.png")
    rgba = np.zeros((64, 64, 4), np.uint8)
    rgba[10:50, 20:44] = (30, 120, 200, 255)
    Image.fromarray(rgba, "RGBA").save(root / "blue.png")
    Image.fromarray(rgb[..., 0]).save(root / "gray.png")
    noisy = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    Image.fromarray(noisy).save(root / "noisy.png")
    (root / "notes.png").write_text("not an image")
    return root


# ---------------------------------------------------------------------------------------------------------------
# the command, end to end


@pytest.fixture(scope="module")
def cli_run(images, tmp_path_factory):
    """``python -m model.cli.generate`` with random tiny weights on an RGB image, counting the block layouts built."""
    import model.nets.ssa_layer as S
    from model.cli.generate import main

    out = tmp_path_factory.mktemp("generated")
    calls = []
    original = S.build_layout

    def counting(coords, **kwargs):
        calls.append((int(coords.shape[0]), kwargs["window"]))
        return original(coords, **kwargs)

    S.build_layout = counting
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            rc = main([str(images / "red.png"), "--weights", "random:tiny", "--out", str(out),
                       "--device", "cpu", "--no-progress", *FEW_STEPS, "--steps-1024", "2", "--faces", "50000"])
    finally:
        S.build_layout = original
    return rc, out, calls, [str(w.message) for w in caught]


def test_command_writes_a_glb_and_a_preview(cli_run):
    rc, out, _, caught = cli_run
    assert rc == 0
    mesh = trimesh.load(out / "red.glb", force="mesh")
    assert len(mesh.faces) > 0 and np.abs(np.asarray(mesh.vertices)).max() < 0.51
    assert len(mesh.faces) <= 50_000  # --faces
    png = Image.open(out / "red.png")
    assert png.size[0] > png.size[1] > 100  # the input beside the render


def test_command_warns_about_random_weights_and_prints_the_stage_table(images, tmp_path, capsys):
    from model.cli.generate import main

    rc = main([str(images / "blue.png"), "--weights", "random:tiny", "--out", str(tmp_path), "--resolution", "512",
               "--device", "cpu", "--no-progress", "--no-preview", *FEW_STEPS])
    captured = capsys.readouterr()
    assert rc == 0
    assert "RANDOM weights" in captured.err and "NOISE" in captured.err
    for stage in ("condition", "dense", "sparse_512", "decode_512", "refine_512", "total"):
        assert f"  {stage} " in captured.out
    assert "sparse_1024" not in captured.out  # resolution 512 stops after the 512 stage
    assert (tmp_path / "blue.glb").is_file() and not (tmp_path / "blue.png").exists()


def test_the_block_layout_is_built_once_per_stage(cli_run):
    """Every sampling step (and both guidance passes) of a sparse stage reuse one layout: one build per sparse
    stage, although the 1024 stage ran 2 steps x 2 guidance passes x 2 blocks."""
    _, _, calls, _ = cli_run
    assert len(calls) == 2, calls
    assert all(w == 4 for _, w in calls) and calls[0][0] != calls[1][0]  # the 512 tokens, then the 1024 tokens


# ---------------------------------------------------------------------------------------------------------------
# input checking


def test_load_rgba_masks_and_errors(images):
    rgba = IM.load_rgba(images / "red.png")
    alpha = np.asarray(rgba)[..., 3]
    assert rgba.mode == "RGBA" and alpha[0, 0] == 0 and alpha[20, 32] == 255
    assert alpha[40, 50] == 255  # white inside the object, not reachable from the border: object
    assert (alpha > 0).sum() == 46 * 40
    blue = np.asarray(IM.load_rgba(images / "blue.png"))
    assert (blue[..., 3] > 0).sum() == 40 * 24  # RGBA keeps its alpha
    opaque = np.asarray(Image.open(images / "red.png").convert("RGBA"))  # alpha 255 everywhere: background rule
    assert (np.asarray(IM.load_rgba(opaque))[..., 3] > 0).sum() == 46 * 40
    cases = [(images / "gray.png", ValueError, "grayscale"), (images / "noisy.png", ValueError, "uniform background"),
             (images / "missing.png", ValueError, "does not exist"), (images / "notes.png", ValueError, "not an image"),
             (np.zeros((8, 8), np.float32), ValueError, "uint8"), (42, TypeError, "must be a path")]
    for source, error, text in cases:
        with pytest.raises(error, match=text) as info:
            IM.load_rgba(source, name="IMAGE x")
        assert str(info.value).startswith("IMAGE x") or "IMAGE x" in str(info.value)


def test_command_rejects_bad_images_and_arguments_before_loading_weights(images, tmp_path, capsys):
    from model.cli.generate import main

    bad = (("gray.png", "grayscale"), ("noisy.png", "uniform background"), ("missing.png", "does not exist"))
    for name, text in bad:
        with pytest.raises(SystemExit) as info:
            main([str(images / name), "--weights", "no-such-folder", "--out", str(tmp_path)])
        assert info.value.code == 2
        err = capsys.readouterr().err
        assert f"IMAGE '{images / name}'" in err and text in err
    for extra, text in ((["--steps-512", "0"], "--steps-512"), (["--resolution", "256"], "--resolution"),
                        (["--guidance", "nan"], "--guidance"), (["--faces", "x"], "--faces")):
        with pytest.raises(SystemExit):
            main([str(images / "red.png"), "--weights", "random:tiny", "--out", str(tmp_path), *extra])
        assert text in capsys.readouterr().err
    rc = main([str(images / "red.png"), "--weights", str(tmp_path / "no-such-folder"), "--out", str(tmp_path),
               "--device", "cpu"])
    assert rc == 2 and "--weights" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------------------------
# between the 512 and 1024 stages


def _cell_distance_range(cells: torch.Tensor, centre: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Nearest and farthest distance from ``centre`` (all axes) to the grid points of each cell of 8^3 points."""
    lo, hi = (cells * 8).double(), (cells * 8 + 7).double()
    near = torch.clamp(torch.full_like(lo, centre), lo, hi)
    far = torch.where((lo - centre).abs() > (hi - centre).abs(), lo, hi)
    return (near - centre).norm(dim=1), (far - centre).norm(dim=1)


def test_mesh_to_latent_coords_picks_the_band_cells():
    """A sphere of radius 0.3 (unit cube, already normalised): the kept 64^3 cells are those with a 512^3 grid
    point within 4 grid steps of the sphere, up to the sampling tolerance, and all of them."""
    sphere = trimesh.creation.icosphere(subdivisions=5, radius=0.3)
    cells = G.mesh_to_latent_coords(sphere, resolution=512, factor=8, normalize=False)
    assert cells.dtype == torch.int32 and cells.shape[1] == 3
    cells = cells.long()
    assert len(torch.unique(cells, dim=0)) == len(cells)
    centre, r = 0.5 * 511, 0.3 * 511  # grid point i sits at i / 511 - 0.5
    d_near, d_far = _cell_distance_range(cells, centre)
    assert bool(((d_near < r + 4.5) & (d_far > r - 4.5)).all())  # within the band (+ half a step of tolerance)
    # every cell the surface passes through is kept, and so is every cell whose grid points come within 3.5 steps
    c = torch.arange(64)
    grid = torch.stack(torch.meshgrid(c, c, torch.tensor([31, 32, 45]), indexing="ij"), -1).reshape(-1, 3)
    g_near, g_far = _cell_distance_range(grid, centre)
    sure = (g_near < r + 3.5) & (g_far > r - 3.5)
    keys = set(map(tuple, cells.tolist()))
    assert all(tuple(g) in keys for g in grid[sure].tolist())
    # layout order for the DiT: a permutation of the same cells
    ordered = G.to_layout_order(cells, compression_block=8, selection_block=8)
    check_layout_order(ordered, compression_block=8, selection_block=8)
    assert ordered.shape == (len(cells), 4) and bool((ordered[:, 0] == 0).all())
    assert set(map(tuple, ordered[:, 1:].tolist())) == keys
    # normalisation: any placement and size of the mesh gives the cells of the normalised mesh
    moved = sphere.copy()
    moved.apply_transform(np.diag([3.0, 3.0, 3.0, 1.0]))
    moved.apply_translation([5.0, -2.0, 1.0])
    a = G.mesh_to_latent_coords(moved, resolution=128, factor=8)
    b = G.mesh_to_latent_coords(sphere, resolution=128, factor=8)
    assert torch.equal(a, b)
    with pytest.raises(ValueError, match="factor"):
        G.mesh_to_latent_coords(sphere, resolution=1024, factor=7)
    with pytest.raises(TypeError, match="mesh"):
        G.mesh_to_latent_coords("sphere.obj")
    for bad in (-1, len(sphere.vertices)):  # faces that name no vertex: an error, not a wrap-around or a crash
        faces = np.array(sphere.faces)
        faces[0, 1] = bad
        with pytest.raises(ValueError, match="faces index vertices"):
            G.mesh_to_latent_coords((sphere.vertices, faces), resolution=128, factor=8)


def test_sign_fill_grid_and_pruning_give_the_released_field_without_a_dense_grid():
    """Extraction with the sign refiner's coarse grid as the fill equals marching cubes on the dense released field
    (|SDF| * sign, decoded values kept), and dropping the voxels that cannot touch the level changes nothing."""
    from skimage.measure import marching_cubes

    from model.nets.refiner import RefinerConfig, SignRefiner, predict_sign, sign_refine_1024

    res, level = 32, 0.2
    g = (np.arange(res) + 0.5) / res - 0.5
    x, y, z = np.meshgrid(g, g, g, indexing="ij")
    sdf = (np.sqrt(x**2 + y**2 + z**2) - 0.3) * res / 3.0  # tau = 3 voxels
    band = np.abs(sdf) < 1.0
    band[: res // 2] |= np.abs(sdf[: res // 2]) < 2.5  # a thicker band on one side
    coords = torch.from_numpy(np.stack(np.nonzero(band), 1))
    values = torch.from_numpy(np.tanh(sdf[band])).float()
    torch.manual_seed(0)
    refiner = SignRefiner(RefinerConfig.tiny()).eval()
    sign = predict_sign(refiner, coords, values, res)
    inside = torch.from_numpy(sdf.reshape(res // 2, 2, res // 2, 2, res // 2, 2).mean((1, 3, 5)) < 0)
    sign = torch.where(inside, -1.0, 1.0)  # a sign grid that agrees with the shape (a trained refiner's)
    dense = sign.repeat_interleave(2, 0).repeat_interleave(2, 1).repeat_interleave(2, 2)
    dense[coords[:, 0], coords[:, 1], coords[:, 2]] = values
    padded = np.pad(dense.numpy(), 1, constant_values=1.0)
    v, f, _, _ = marching_cubes(padded, level)
    reference = trimesh.Trimesh((v - 0.5) / res - 0.5, f, process=False)
    reference.merge_vertices()
    full = sparse_sdf_to_mesh(coords, values, res, level=level, fill=sign, brick=8)
    keep = G.surface_voxels(coords, values, res, level, sign)
    assert 0 < int(keep.sum()) < len(coords)
    pruned = sparse_sdf_to_mesh(coords[keep], values[keep], res, level=level, fill=sign.numpy(), brick=8)
    assert len(full.faces) == len(pruned.faces) == len(reference.faces)
    for mesh in (full, pruned):
        np.testing.assert_allclose(np.unique(np.round(mesh.vertices, 6), axis=0),
                                   np.unique(np.round(reference.vertices, 6), axis=0), atol=1e-6)
    # a constant fill (interior="keep") prunes consistently too
    plain = sparse_sdf_to_mesh(coords, values, res, level=level, fill=1.0, brick=8)
    keep1 = G.surface_voxels(coords, values, res, level, 1.0)
    assert len(sparse_sdf_to_mesh(coords[keep1], values[keep1], res, level=level, fill=1.0, brick=8).faces) == \
        len(plain.faces)
    # the released helper still gives the dense field of the same grid
    field = sign_refine_1024(refiner, coords, values, res)
    torch.testing.assert_close(field[coords[:, 0], coords[:, 1], coords[:, 2]], values)
    with pytest.raises(ValueError, match="fill grid"):
        sparse_sdf_to_mesh(coords, values, res, fill=np.ones((5, 5, 5)))


@pytest.mark.parametrize("backend,brick", [("torch", 8), ("skimage", 4)])
def test_sign_grid_near_the_decoded_voxels_gives_the_same_mesh(backend, brick):
    """The cascade runs the sign refiner only for the patches that have the last word near a decoded voxel
    (``predict_sign(near=)``: 1 pooled voxel for the GPU marching cubes, which read the grid at corners of cells
    with a decoded corner; half a brick and one for the CPU path, which fills whole bricks): the mesh is the same,
    vertex for vertex, as with every patch run, and some patches did not run."""
    from model.nets.refiner import RefinerConfig, SignRefiner, predict_sign

    res, level = 32, 0.2
    g = np.arange(res) + 0.5
    x, y, z = np.meshgrid(g, g, g, indexing="ij")
    sdf = (np.sqrt((x - 6) ** 2 + (y - 7) ** 2 + (z - 6) ** 2) - 3.5) / 2.0  # a small sphere in one corner
    band = np.abs(sdf) < 1.0
    coords = torch.from_numpy(np.stack(np.nonzero(band), 1))
    values = torch.from_numpy(np.tanh(sdf[band])).float()
    torch.manual_seed(1)
    refiner = SignRefiner(RefinerConfig.tiny()).eval()
    near = 1 if backend == "torch" else brick // 2 + 1
    stats = {}
    with torch.no_grad():
        full = predict_sign(refiner, coords, values, res)
        part = predict_sign(refiner, coords, values, res, near=near, stats=stats)
    assert stats["skipped"] > 0 and not torch.equal(full, part)
    meshes = [sparse_sdf_to_mesh(coords, values, res, level=level, fill=fill, brick=brick, backend=backend)
              for fill in (full, part if backend == "torch" else part.numpy())]
    assert len(meshes[0].faces) > 0
    np.testing.assert_array_equal(meshes[0].vertices, meshes[1].vertices)
    np.testing.assert_array_equal(meshes[0].faces, meshes[1].faces)


# ---------------------------------------------------------------------------------------------------------------
# the library, and the report


def test_pipeline_api_given_coords_settings_and_errors(images):
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pipe = C.ImageToMesh.random_tiny(seed=1)
    coords = torch.stack(torch.meshgrid(*[torch.arange(2, 6)] * 3, indexing="ij"), -1).reshape(-1, 3)
    result = pipe.generate(images / "red.png", resolution=512, steps=1, seed=3, coords_512=coords)
    assert "dense" not in result.stages  # given voxels skip the dense stage
    assert result.coords["512"].shape == (64, 4) and result.settings["steps"] == {"dense": 1, "512": 1, "1024": 1}
    assert result.settings["dtype"] == result.settings["refiner_dtype"] == "float32"  # CPU: one dtype throughout
    table = result.stage_table()
    assert table["sparse_512"]["tokens"] == 64 and len(table["sparse_512"]["step_seconds"]) == 1
    assert json.dumps(table)  # plain values
    again = pipe(images / "red.png", resolution=512, steps={"512": 1}, seed=3, coords_512=coords)
    np.testing.assert_array_equal(again.vertices, result.mesh.vertices)  # seeded
    for kwargs, text in ((dict(resolution=256), "resolution"), (dict(steps=0), "steps"),
                         (dict(steps={"768": 2}), "unknown stages"), (dict(guidance=-1.0), "guidance"),
                         (dict(coords_512=torch.zeros(0, 3, dtype=torch.int32)), "coords_512"),
                         (dict(faces=0), "faces"), (dict(simplify_ratio=1.0), "simplify_ratio"),
                         (dict(faces=100, simplify_ratio=0.5), "not both")):
        with pytest.raises(ValueError, match=text):
            pipe.generate(images / "red.png", **kwargs)
    with pytest.raises(ValueError, match="outside"):
        pipe.generate(images / "red.png", resolution=512, steps=1, coords_512=coords + 10)
    parts = dict(pipe.parts)
    parts.pop("refiner")
    with pytest.raises(ValueError, match="missing"):
        C.ImageToMesh(pipe.encoder, parts)
    with pytest.raises(ValueError, match="interior"):
        C.CascadeConfig(interior="fill")
    for bad in (0, "four", 2.0, True):
        with pytest.raises(ValueError, match="decode_chunks_512 must be a positive int or 'auto'"):
            C.CascadeConfig(decode_chunks_512=bad)
    assert C.CascadeConfig().decode_chunks_1024 == "auto"
    assert C.CascadeConfig(decode_chunks_1024=3).decode_chunks_1024 == 3
    from model.pipeline.offload import Offloader

    with pytest.raises(ValueError, match="CUDA"):
        Offloader("cpu", [pipe.encoder])


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_offloading_lends_pinned_weights_and_changes_nothing(images):
    """offload=True: the weights stay pinned on the CPU between stages, the whole cascade (1024 included) gives the
    same mesh as with every part resident on the GPU, and simplify_ratio is accepted and checked."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        lent = C.ImageToMesh.random("tiny", seed=1, device="cuda", offload=True)
        resident = C.ImageToMesh.random("tiny", seed=1, device="cuda", offload=False)
    kwargs = dict(steps=2, seed=3)
    a = lent.generate(images / "red.png", **kwargs)
    b = resident.generate(images / "red.png", **kwargs)
    np.testing.assert_array_equal(a.mesh.vertices, b.mesh.vertices)
    np.testing.assert_array_equal(a.mesh.faces, b.mesh.faces)
    weights = [t for m in [lent.encoder, *lent.parts.values()] for t in [*m.parameters(), *m.buffers()]]
    assert all(t.device.type == "cpu" and t.is_pinned() for t in weights)
    with pytest.raises(ValueError, match="simplify_ratio"):
        lent.generate(images / "red.png", simplify_ratio=1.0)
    with pytest.raises(ValueError, match="not both"):
        lent.generate(images / "red.png", faces=100, simplify_ratio=0.5)


def test_from_pretrained_reads_a_released_folder(images, tmp_path):
    """The cascade from a folder in the released layout (tiny sizes, random weights) with a given encoder."""
    from model.pipeline.pretrained import save_released

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        tiny = C.ImageToMesh.random_tiny(seed=2)
    save_released(tmp_path / "release", tiny.parts)
    config = tiny.config.replace(steps_dense=1, steps_512=1, steps_1024=1)
    pipe = C.ImageToMesh.from_pretrained(tmp_path / "release", encoder=tiny.encoder, config=config, device="cpu")
    assert set(pipe.parts) == set(tiny.parts) and pipe.dtype == torch.float32 and pipe.backend == "reference"
    assert pipe.config == config
    assert pipe.random_weights  # the encoder is a random one
    a = pipe(images / "blue.png", resolution=512, seed=5)
    b = tiny(images / "blue.png", resolution=512, seed=5, steps=1)
    np.testing.assert_allclose(a.vertices, b.vertices, atol=1e-5)  # the same weights give the same mesh
    only_512 = C.ImageToMesh.from_pretrained(tmp_path / "release", encoder=tiny.encoder, config=config,
                                             resolution=512, device="cpu")
    assert "sparse_dit_1024" not in only_512.parts
    with pytest.raises(ValueError, match="sparse_vae_1024"):
        only_512.generate(images / "blue.png")
    with pytest.raises(ValueError, match="encoder"):
        C.ImageToMesh.from_pretrained(tmp_path / "release", encoder=str(tmp_path / "no-encoder"), device="cpu")


def test_one_image_opener_serves_the_cascade_and_the_encoder_preprocessing(images, monkeypatch):
    """``model.nets.conditioning.open_image`` is the library's only opener of image files: the cascade's
    ``load_rgba`` and the encoder preprocessing's ``load_image`` both go through it, and no other library module
    calls ``Image.open``."""
    from pathlib import Path

    import model.nets.conditioning as cond

    calls = []
    original = cond.open_image

    def counting(source, name="image"):
        calls.append(name)
        return original(source, name)

    monkeypatch.setattr(cond, "open_image", counting)
    IM.load_rgba(images / "red.png", name="IMAGE red")
    cond.load_image(images / "blue.png")
    cond.preprocess_image(images / "blue.png", size=28, border=2)
    assert calls == ["IMAGE red", "image", "image"]
    # one error for a missing file, whichever caller: a ValueError (cascade, command line) and a FileNotFoundError
    for call in (IM.load_rgba, cond.load_image):
        with pytest.raises(cond.MissingImageError, match="does not exist") as info:
            call(images / "missing.png")
        assert isinstance(info.value, ValueError) and isinstance(info.value, FileNotFoundError)
    library = Path(C.__file__).resolve().parents[1]
    openers = sorted(str(path.relative_to(library)) for path in library.rglob("*.py")
                     if path.parts[len(library.parts)] not in ("cli", "reports") and "Image.open(" in path.read_text())
    assert openers == ["nets/conditioning.py"]


def test_top_level_api_is_lazy():
    """``import model`` imports nothing heavy; ``from model import ImageToMesh`` loads the cascade on first use."""
    import subprocess
    import sys
    from pathlib import Path

    code = ("import sys, model; assert 'torch' not in sys.modules and 'model.pipeline' not in sys.modules; "
            "from model import ImageToMesh, CascadeConfig, SparseTensor, from_pretrained; "
            "import model.pipeline.cascade as c, model.pipeline.pretrained as p; "
            "assert ImageToMesh is c.ImageToMesh and CascadeConfig is c.CascadeConfig and from_pretrained is "
            "p.from_pretrained and 'ImageToMesh' in dir(model)")
    root = Path(C.__file__).resolve().parents[2]
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=root)
    assert done.returncode == 0, done.stderr
    import model

    assert model.ImageToMesh is C.ImageToMesh
    with pytest.raises(AttributeError, match="no attribute 'Nothing'"):
        model.Nothing  # noqa: B018


def test_from_pretrained_builds_random_weights_and_names_the_valid_choices(images, tmp_path, capsys):
    from model.cli.generate import main
    from model.pipeline.random_weights import RANDOM_CONFIG

    with pytest.warns(UserWarning, match="RANDOM weights"):
        pipe = C.ImageToMesh.from_pretrained("random:tiny", device="cpu", seed=1, config={"interior": "keep"})
    assert pipe.random_weights and pipe.device.type == "cpu" and pipe.dtype == torch.float32
    assert set(pipe.parts) == {"dense_vae", "dense_dit", "sparse_vae_512", "sparse_dit_512", "refiner",
                               "sparse_vae_1024", "sparse_dit_1024", "refiner_1024"}
    assert pipe.config == C.CascadeConfig(**{**RANDOM_CONFIG["tiny"], "interior": "keep"})  # tiny's settings kept
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        same = C.ImageToMesh.random("tiny", seed=1)
    for name, tensor in same.parts["sparse_dit_512"].state_dict().items():
        torch.testing.assert_close(pipe.parts["sparse_dit_512"].state_dict()[name], tensor, rtol=0, atol=0)
    for bad in ("random:huge", "random:"):
        with pytest.raises(ValueError, match="valid choices: random:tiny, random:released"):
            C.ImageToMesh.from_pretrained(bad)
    with pytest.raises(ValueError, match="config has unknown fields"):
        C.ImageToMesh.from_pretrained("random:tiny", config={"steps": 3})
    rc = main([str(images / "red.png"), "--weights", "random:huge", "--out", str(tmp_path), "--device", "cpu"])
    assert rc == 2 and "valid choices: random:tiny, random:released" in capsys.readouterr().err


def test_auto_decode_chunks_follow_the_token_budget(monkeypatch, images):
    """decode_chunks "auto": the cascade asks decode_chunk_count for the chunk count and records the one it used
    (a budget of one token per chunk forces the most chunks offered)."""
    import model.pipeline.pretrained as P

    monkeypatch.setattr(P, "DECODE_CHUNK_CHOICES", (1, 2))
    monkeypatch.setattr(P, "DECODE_CHUNK_TOKENS", 1)
    with pytest.warns(UserWarning, match="RANDOM"):
        pipe = C.ImageToMesh.random("tiny", config={"decode_chunks_512": "auto", "decode_chunks_1024": "auto"})
    result = pipe.generate(images / "red.png", resolution=1024, steps=1, progress=False)
    table = result.stage_table()
    assert table["decode_512"]["chunks"] == table["decode_1024"]["chunks"] == 2
    monkeypatch.setattr(P, "DECODE_CHUNK_TOKENS", 10**9)
    table = pipe.generate(images / "red.png", resolution=512, steps=1, progress=False).stage_table()
    assert table["decode_512"]["chunks"] == 1


def test_report_dry_run_on_cpu(tmp_path, capsys):
    from model.reports.generate import main

    rc = main(["--out", str(tmp_path), "--dry-run", "--steps-dense", "1", "--steps-512", "2", "--steps-1024", "2",
               "--no-progress", "--profile", "decode_512", "--warmup", "--decode-chunks-1024", "3",
               "--glb", str(tmp_path / "out.glb"), "--mesh-transfer", "pinned", "--neighbour-tables", "lookup",
               "--refiner-layout", "wide", "--refiner-bias-kernel"])
    assert rc == 0
    doc = json.loads((tmp_path / "generate.json").read_text())
    md = (tmp_path / "generate.md").read_text()
    assert doc["dry_run"] and "DRY RUN" in md and "NOT a measurement" in md
    assert doc["warmup_seconds"] > 0 and "Warm process" in md  # --warmup: one untimed run first
    assert list(doc["stages"]) == ["condition", "dense", "sparse_512", "decode_512", "refine_512", "revoxelise",
                                   "sparse_1024", "decode_1024", "refine_1024", "extract"]
    assert doc["stages"]["dense"]["replaced_by_given_coords"]
    # --decode-chunks-1024 replaces the tiny config's 2 chunks; the 512 decode keeps its 1
    assert doc["stages"]["decode_1024"]["chunks"] == 3 and doc["stages"]["decode_512"]["chunks"] == 1
    # the report names the command it ran, options included
    assert doc["command"].startswith("python -m model.reports.generate --out ") and "--decode-chunks-1024 3" in md
    assert doc["stages"]["sparse_1024"]["tokens"] == doc["stages"]["revoxelise"]["tokens"] > 0
    a = doc["attention_1024"]
    assert a["ssa_op_calls"] == 2 * 2  # steps x blocks: both guidance passes run as one batched forward (small stage)
    assert 0 < a["ssa_op_seconds"] <= a["self_attention_seconds"] <= a["stage_seconds"]
    # the cascade samples through the inference blocks (the path the DiT report times), never the autograd blocks
    assert a["inference_block_calls"] == 2 * 2 and a["autograd_block_calls"] == 0
    assert "4 through the sampling path" in md
    assert "estimated_seconds_at_released_steps" in doc["stages"]["sparse_1024"]
    assert doc["mesh"] and "24 GB" in md and "12 GB" in md
    # the target column, and the profiled stage (CPU: no GPU kernels)
    assert "<= 25" in md and "<= 3 (" in md
    assert doc["stages"]["decode_512"]["profile"]["gpu_ms"] == 0 and "Stage decode_512 under torch.profiler" in md
    assert doc["staged_transfer"] is False  # recorded (the CPU extraction has no device transfer to stage)
    assert "--mesh-transfer pinned" in md
    from model.nets import cross_attention_kernel
    from model.pipeline import marching_cubes
    assert marching_cubes.STAGED_TRANSFER is True and cross_attention_kernel.ENABLED is True  # restored
    from model.sparse import conv as sparse_conv
    assert doc["neighbour_tables"] == "lookup" and "--neighbour-tables lookup" in md
    assert sparse_conv.DERIVE_NEIGHBOUR_ROWS is True  # restored
    from model.nets import refiner as refiner_module
    from model.nets import refiner_layout
    assert doc["refiner_layout"] == "wide" and doc["refiner_bias_kernel"] is True and "`wide`" in md
    assert refiner_layout.DEFAULT_LAYOUT == "contiguous" and refiner_module.BIAS_KERNEL is False  # restored
    # --glb: the output mesh written after the timed run, its faces as reported
    glb = doc["output_glb"]
    assert glb["bytes"] == (tmp_path / "out.glb").stat().st_size > 0 and "written as GLB" in md
    assert len(trimesh.load(tmp_path / "out.glb", force="mesh").faces) == doc["output_faces"] > 0
    assert "profile" not in doc["stages"]["sparse_512"]
    assert main(["--out", str(tmp_path), "--dry-run", "--profile", "bogus"]) == 2
    assert "--profile: unknown stages ['bogus']" in capsys.readouterr().err


def test_refiners_run_in_float16_on_cuda_as_released():
    """part_dtype: the refiners take float16 on CUDA when the pipeline runs in a 16-bit float (released use_fp16);
    other parts, float32 pipelines and the CPU keep the pipeline's dtype."""
    from model.pipeline.checks import REFINER_DTYPE, part_dtype

    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    assert REFINER_DTYPE == torch.float16
    for dt in (torch.bfloat16, torch.float16):
        assert part_dtype("refiner", dt, cuda) == part_dtype("refiner_1024", dt, cuda) == torch.float16
        assert part_dtype("sparse_dit_1024", dt, cuda) == part_dtype("refiner", dt, cpu) == dt
    assert part_dtype("refiner", torch.float32, cuda) == torch.float32


def test_stage_recorder_counts_the_stage_pinned_allocations(monkeypatch):
    """A stage that grew PyTorch's pinned-memory pool records how many blocks and how long (CUDA faked here);
    one that did not records nothing, and the CPU has no such counters."""
    from model.pipeline.records import StageRecorder

    assert StageRecorder(torch.device("cpu"))._pinned() is None
    stats = {"num_host_alloc": 3, "host_alloc_time.total": 1_000_000.0}
    monkeypatch.setattr(torch.cuda, "host_memory_stats", lambda: dict(stats), raising=False)
    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", lambda device=None: None)
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda device=None: 7)
    recorder = StageRecorder(torch.device("cuda"))
    monkeypatch.setattr(recorder, "_sync", lambda: None)
    with recorder.stage("extract"):
        stats.update({"num_host_alloc": 5, "host_alloc_time.total": 1_750_000.0})
    with recorder.stage("simplify"):
        pass
    assert recorder.records["extract"].info == {"pinned_allocs": 2, "pinned_alloc_seconds": 0.75}
    assert recorder.records["simplify"].info == {} and recorder.records["simplify"].peak_bytes == 7


def test_nested_shells_scale_the_surface_and_reject_bad_counts(capsys):
    """``--mesh shells:K``: K copies of the shell, each scaled about the centre (the surface grows about as
    sum (1 - 0.2 i)^2); bad counts are clear errors naming --mesh."""
    from model.reports.generate import choose_mesh, main, shell_mesh

    one = shell_mesh()
    two, desc = choose_mesh("shells:2")
    assert len(two.faces) == 2 * len(one.faces) and "2 nested copies" in desc
    assert two.area == pytest.approx(one.area * (1 + 0.8**2), rel=1e-6)
    assert np.allclose(two.bounds, one.bounds)  # the copy sits inside the original's box
    for bad in ("shells:0", "shells:5", "shells:x"):
        with pytest.raises(ValueError, match="shells"):
            choose_mesh(bad)
    assert main(["--out", "unused", "--dry-run", "--mesh", "shells:9"]) == 2
    assert "--mesh" in capsys.readouterr().err
