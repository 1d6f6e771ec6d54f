"""The DiT scripts end to end at tiny size on the CPU: prepare data (VAE latents + rendered views), train (and resume
to the same losses), sample a mesh, and the GPU report's smoke mode."""
from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch

pytest.importorskip("transformers", reason="the image encoder needs transformers")
trimesh = pytest.importorskip("trimesh")


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    """Two meshes, a tiny random VAE checkpoint, and the prepared folder (2 views of 64 px, SDF at 64^3)."""
    from model.cli.prepare_dit_data import main as prepare_main
    from model.training.common import save_checkpoint
    from model.nets.vae import SparseSDFVAE, VAEConfig

    root = tmp_path_factory.mktemp("dit_scripts")
    meshes = root / "meshes"
    meshes.mkdir()
    trimesh.creation.box(extents=[1.0, 0.5, 0.7]).export(meshes / "box.obj")
    trimesh.creation.icosphere(subdivisions=2).export(meshes / "sphere.obj")
    torch.manual_seed(0)
    vae = SparseSDFVAE(VAEConfig.tiny())
    save_checkpoint(root / "vae.safetensors", model=vae, meta={"vae_config": dataclasses.asdict(vae.config),
                                                                "data": {"tau": 2.5, "margin": 0.9}})
    data = root / "data"
    assert prepare_main([str(meshes), "--vae", str(root / "vae.safetensors"), "--out", str(data), "--views", "2",
                         "--image-size", "64", "--resolution", "64", "--no-progress"]) == 0
    return root


def test_prepare_writes_latents_views_and_manifest(prepared):
    from PIL import Image

    manifest = json.loads((prepared / "data" / "manifest.json").read_text())
    assert manifest["format"] == "ssa-dit-data/1" and not manifest["failed"]
    assert [it["name"] for it in manifest["items"]] == ["box", "sphere"]
    assert manifest["latent_resolution"] == 8 and manifest["latent_channels"] == 4
    assert (manifest["tau"], manifest["margin"]) == (2.5, 0.9)  # the VAE checkpoint's data normalisation
    for it in manifest["items"]:
        with np.load(prepared / "data" / it["latent"]) as z:
            assert z["coords"].shape == (it["tokens"], 3) and z["mean"].shape == (it["tokens"], 4)
            assert z["coords"].dtype == np.int32 and z["coords"].max() < 8
        for v in it["views"]:
            img = Image.open(prepared / "data" / v)
            assert img.mode == "RGBA" and img.size == (64, 64)
            alpha = np.asarray(img)[..., 3]
            assert 0.05 < (alpha > 0).mean() < 0.9  # the object is in view, with background around it


def _train(prepared, out, steps, *extra):
    """Options partly from a JSON config file, partly from flags (flags override the file)."""
    from model.cli.train_dit import main as train_main

    config = prepared / "train.json"
    config.write_text(json.dumps({"model": "tiny", "backend": "reference", "encoder_size": "tiny", "lr": 5.0,
                                  "batch_tokens": 600, "ema_decay": 0.9, "latent": "sample", "progress": False}))
    args = ["--config", str(config), "--data", str(prepared / "data"), "--out", str(out), "--steps", str(steps),
            "--lr", "1e-3", "--ckpt-every", "2", *extra]
    with pytest.warns(UserWarning, match="RANDOM weights"):
        assert train_main(args) == 0
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_train_resume_reproduces_the_uninterrupted_run(prepared, tmp_path):
    full = _train(prepared, tmp_path / "full", 4)
    assert [r["step"] for r in full] == [1, 2, 3, 4]
    assert all(np.isfinite(r["loss"]) and r["lr"] == 1e-3 for r in full)
    part = _train(prepared, tmp_path / "part", 2)
    resumed = _train(prepared, tmp_path / "part", 4, "--resume")
    assert [r["step"] for r in resumed] == [1, 2, 3, 4]
    assert [r["loss"] for r in resumed] == [r["loss"] for r in full]
    assert [r["loss"] for r in part] == [r["loss"] for r in full[:2]]
    run = tmp_path / "full"
    assert (run / "loss.png").is_file() and (run / "checkpoints" / "last.safetensors").is_file()
    from model.nets.dit import load_dit

    ema, meta = load_dit(run / "checkpoints" / "last.safetensors", return_meta=True)
    raw = load_dit(run / "checkpoints" / "last.safetensors", weights="model")
    assert meta["dit_config"]["model_channels"] == 64 and len(meta["latent_stats"]["std"]) == 4
    assert any(not torch.equal(a, b) for a, b in zip(ema.state_dict().values(), raw.state_dict().values()))


def test_sample_writes_a_mesh_or_the_sdf(prepared, tmp_path):
    from model.cli.sample import main as sample_main

    _train(prepared, tmp_path / "run", 2)
    out = tmp_path / "out" / "box.glb"
    with pytest.warns(UserWarning, match="RANDOM weights"):
        assert sample_main([str(prepared / "data" / "box" / "view_00.png"), "--dit",
                            str(tmp_path / "run" / "checkpoints" / "last.safetensors"), "--vae",
                            str(prepared / "vae.safetensors"), "--coords", str(prepared / "meshes" / "box.obj"),
                            "--out", str(out), "--steps", "2", "--device", "cpu"]) == 0
    with np.load(out.with_suffix(".sdf.npz")) as z:
        assert z["coords"].shape[0] == z["sdf"].shape[0] > 0 and int(z["resolution"]) == 64
    with np.load(out.with_suffix(".latent.npz")) as z:
        latent_coords = z["coords"]
    with np.load(prepared / "data" / "box" / "latent.npz") as z:
        np.testing.assert_array_equal(latent_coords, z["coords"])  # same cells as the data pipeline
    # coordinates from a .npy file work as well
    np.save(tmp_path / "coords.npy", latent_coords)
    out2 = tmp_path / "out" / "npy.glb"
    with pytest.warns(UserWarning, match="RANDOM weights"):
        assert sample_main([str(prepared / "data" / "box" / "view_00.png"), "--dit",
                            str(tmp_path / "run" / "checkpoints" / "last.safetensors"), "--vae",
                            str(prepared / "vae.safetensors"), "--coords", str(tmp_path / "coords.npy"),
                            "--out", str(out2), "--steps", "2", "--device", "cpu"]) == 0
    assert out2.with_suffix(".sdf.npz").is_file()


def test_report_smoke(tmp_path):
    from model.reports.dit import main as report_main

    assert report_main(["--smoke", "--out", str(tmp_path), "--reps", "1", "--full-reps", "1"]) == 0
    r = json.loads((tmp_path / "dit.json").read_text())
    for key in ("ssa_step_ms", "full_attention_step_ms", "ssa_sample_step_ms", "full_attention_sample_step_ms",
                "tokens", "gpu", "date"):
        assert r[key] is not None, key
    assert "peak_mem_gb" in r and r["smoke"] is True
    assert "| training step" in (tmp_path / "dit.md").read_text()
