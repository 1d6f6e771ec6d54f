"""``python -m model.cli.reconstruct`` end to end on CPU, its errors, and ``python -m model.reports.vae --smoke``."""
from __future__ import annotations

import json
import re

import pytest
import torch
import trimesh

pytest.importorskip("igl")
pytest.importorskip("skimage")

from model.training import common as T  # noqa: E402
from model.pipeline.reconstruct import load_vae, vae_checkpoint_meta  # noqa: E402
from model.cli.reconstruct import main
from model.nets.vae import SparseSDFVAE, VAEConfig  # noqa: E402

#: Training the tiny VAE on one sphere at 32^3 before reconstructing it: steps and learning rate (a few steps: the
#: test is about the command, the VAE's quality is tested in test_vae_model.py).
FIT_STEPS, FIT_LR = 12, 3e-3


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


@pytest.fixture(scope="module")
def fitted(tmp_path_factory):
    """A sphere mesh and a tiny-VAE checkpoint briefly trained on it at 32^3 (through the real trainer)."""
    from model.training.vae import VAETrainConfig, train

    root = tmp_path_factory.mktemp("sphere")
    trimesh.creation.icosphere(3).export(root / "sphere.obj")
    out = tmp_path_factory.mktemp("run")
    train(VAETrainConfig(meshes=str(root), cache_dir=str(tmp_path_factory.mktemp("cache")), resolutions=(32,),
                         model="tiny", batch_size=1, steps=FIT_STEPS, lr=FIT_LR, warmup_steps=5, val_meshes=0,
                         log_every=20, out=str(out), progress=False))
    return dict(mesh=root / "sphere.obj", ckpt=out / "checkpoint.safetensors", dir=root)


def test_reconstruct_end_to_end(fitted, tmp_path, capsys):
    out, js = tmp_path / "rec.glb", tmp_path / "rec.json"
    rc = main([str(fitted["mesh"]), "--vae", str(fitted["ckpt"]), "--resolution", "32", "--out", str(out),
               "--device", "cpu", "--points", "5000", "--json", str(js)])
    text = capsys.readouterr().out
    assert rc == 0, text
    for label in ("input", "latent", "mesh", "chamfer", "f-score", "normals", "time", "memory"):
        assert re.search(rf"^{label}\s", text, re.M), (label, text)
    doc = json.loads(js.read_text())
    assert doc["resolution"] == 32 and doc["input_voxels"] > 1000 and 0 <= doc["fscore"] <= 1
    assert doc["peak_memory_bytes"] > 0 and set(doc["seconds"]) >= {"sdf", "encode", "decode", "extract"}
    if not doc["empty"]:
        mesh = trimesh.load(out, force="mesh")
        assert len(mesh.faces) == doc["faces"] and abs(mesh.bounds).max() <= 0.5
        assert doc["chamfer"] > 0 and 0 < doc["normal_consistency"] <= 1


def test_reconstruct_errors(fitted, tmp_path, capsys):
    ok = ["--vae", str(fitted["ckpt"]), "--out", str(tmp_path / "x.glb"), "--resolution", "32"]
    assert main([str(tmp_path / "missing.obj")] + ok) == 2
    assert "MESH: " in (err := capsys.readouterr().err) and "does not exist" in err
    bad = tmp_path / "bad.obj"
    bad.write_text("this is not a mesh\n")
    assert main([str(bad)] + ok) == 2
    assert str(bad) in capsys.readouterr().err
    # a checkpoint of another model class
    other = T.save_checkpoint(tmp_path / "dit.safetensors", model=torch.nn.Linear(2, 2),
                              meta={"model_class": "SparseDiT"})
    args = [str(fitted["mesh"]), "--out", str(tmp_path / "x.glb"), "--resolution", "32", "--vae"]
    assert main(args + [str(other)]) == 2
    assert "holds a SparseDiT checkpoint" in capsys.readouterr().err
    # VAE weights that do not fit the architecture recorded with them
    wrong = T.save_checkpoint(tmp_path / "wrong.safetensors", model=SparseSDFVAE(VAEConfig.tiny()),
                              meta=vae_checkpoint_meta(VAEConfig.tiny(latent_channels=8), tau=2.0, margin=0.95))
    assert main(args + [str(wrong)]) == 2
    assert "do not fit the architecture" in capsys.readouterr().err
    with pytest.raises(ValueError, match="do not fit"):
        load_vae(wrong)
    assert main(args + [str(tmp_path / "none.safetensors")]) == 2
    assert "--vae: " in (err := capsys.readouterr().err) and "does not exist" in err


def test_vae_report_smoke(tmp_path):
    """The GPU report's whole path on CPU: tiny model, 32^3, a few steps, the 'big' run at 64^3; run as two calls
    (--stage train, then --stage evaluate), the form for machines with a per-command time limit."""
    from model.reports.vae import main as report_main

    meshes = tmp_path / "meshes"
    meshes.mkdir()
    trimesh.creation.box(extents=(1.0, 0.6, 0.4)).export(meshes / "box.obj")
    trimesh.creation.icosphere(2).export(meshes / "ball.obj")
    trimesh.creation.capsule(height=1.0, radius=0.3).export(meshes / "capsule.obj")
    trimesh.creation.torus(0.6, 0.2).export(meshes / "torus.obj")
    out = tmp_path / "report"
    args = ["--smoke", "--meshes", str(meshes), "--out", str(out), "--cache-dir", str(tmp_path / "cache"),
            "--max-steps", "4"]
    # the two-call form of the GPU run (training, then evaluation from what training left in OUT/train)
    assert report_main(args + ["--stage", "train"]) == 0
    assert (out / "train" / "summary.json").exists() and not (out / "vae.md").exists()
    assert report_main(args + ["--stage", "evaluate"]) == 0
    doc = json.loads((out / "vae.json").read_text())
    assert doc["environment"]["date"] and doc["environment"]["torch"] == torch.__version__
    assert doc["training"]["steps"] == 4 and doc["evaluation"]["meshes"]
    # the band ceiling (mesh of the input band itself) is within a voxel of the input, whatever the model learned
    assert all(0 <= r["fscore"] <= 1 and r["band_chamfer"] < 1 / 32 for r in doc["evaluation"]["meshes"])
    assert doc["big"]["resolution"] == 64 and doc["big"]["input_voxels"] > 0 and doc["big"]["runs"]
    md = (out / "vae.md").read_text()
    assert "F-score" in md and "64^3" in md and "Bar (mean F-score >= 0.9" in md and "--smoke" in md
    for png in ("loss.png", "reconstructions.png", "reconstruction_64.png"):
        assert (out / png).read_bytes()[:4] == b"\x89PNG", png


def test_metrics_leave_out_faces_buried_inside_the_shape():
    """Two overlapping boxes (like pybullet's objects: unions of overlapping convex parts): the surface extracted
    from their SDF matches the outer surface; the faces inside the union are left out of the comparison."""
    from model.data.sdf import mesh_to_sparse_sdf
    from model.pipeline.extract import sparse_sdf_to_mesh
    from model.pipeline.reconstruct import evaluate_mesh, normalized_mesh

    a = trimesh.creation.box(extents=(1.0, 0.4, 0.4))
    b = trimesh.creation.box(extents=(0.4, 0.4, 1.0))
    b.apply_translation((0.2, 0.0, 0.2))
    union = trimesh.util.concatenate([a, b])
    sample = mesh_to_sparse_sdf(union, 64, compute_sharp=False)
    mesh = sparse_sdf_to_mesh(sample.coords, sample.sdf_scaled, 64)
    m = evaluate_mesh(mesh, normalized_mesh(union, sample), num_points=50_000)
    assert 0.7 < m["gt_outer_fraction"] < 0.95
    assert m["fscore"] > 0.93 and m["fscore_all_faces"] < m["fscore"] - 0.05  # 0.95 and 0.87 when written
    single = evaluate_mesh(mesh, mesh, num_points=10_000)
    assert single["gt_outer_fraction"] == 1.0
