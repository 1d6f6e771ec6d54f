"""The command-line scripts: one vocabulary, help text for every option with its default, and user errors that are
one-line messages with exit status 2 (no traceback, no half-written ``--out``).

Every script is called in-process through its ``main(argv)``; the bad inputs fail before any model is built, so the
whole table takes seconds. The README's commands themselves run in ``tests/test_readme_commands.py``.
"""
from __future__ import annotations

import argparse
import importlib
import importlib.util
import json
import pkgutil
import re
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
MESHES = ROOT / "tests" / "data" / "meshes"
IMAGE = ROOT / "tests" / "data" / "images" / "capsule.png"

#: Every command-line script (``python -m NAME``).
SCRIPTS = [
    "model.cli.generate", "model.cli.prepare_dit_data", "model.cli.reconstruct", "model.cli.sample",
    "model.cli.train_dit", "model.cli.train_vae", "model.reports.dit", "model.reports.generate",
    "model.reports.multi_gpu", "model.reports.vae", "model.reports.dit_demo", "model.reports.extract",
    "model.reports.refiner", "model.reports.ssa_inputs", "model.reports.cross_attention", "model.reports.mesh_transfer",
    "model.data.meshes",
    "bench.run_gpu",
]
#: Options deliberately hidden from --help (the report's torchrun worker).
INTERNAL = {("model.reports.multi_gpu", "--worker"), ("model.reports.multi_gpu", "--seconds"),
            ("model.reports.multi_gpu", "--deadline")}
#: The shared options each script must have.
VOCABULARY = {
    "model.cli.generate": {"--out", "--device", "--seed", "--no-progress"},
    "model.cli.prepare_dit_data": {"--out", "--device", "--no-progress", "--vae"},
    "model.cli.reconstruct": {"--out", "--device", "--vae"},
    "model.cli.sample": {"--out", "--device", "--seed", "--no-progress", "--vae", "--dit"},
    "model.cli.train_dit": {"--out", "--device", "--seed", "--no-progress", "--time-limit", "--ckpt-every",
                            "--resume"},
    "model.cli.train_vae": {"--out", "--device", "--seed", "--no-progress", "--time-limit", "--ckpt-every",
                            "--resume"},
    "model.reports.dit": {"--out", "--device", "--seed"},
    "model.reports.generate": {"--out", "--device", "--seed", "--no-progress"},
    "model.reports.extract": {"--out", "--device"},
    "model.reports.refiner": {"--out", "--device", "--seed"},
    "model.reports.cross_attention": {"--out", "--device", "--seed"},
    "model.reports.mesh_transfer": {"--out", "--seed"},
    "model.reports.ssa_inputs": {"--out", "--device", "--seed"},
    "model.reports.multi_gpu": {"--out", "--device", "--seed", "--time-limit"},
    "model.reports.vae": {"--out", "--device", "--seed", "--time-limit"},
    "model.reports.dit_demo": {"--out", "--device", "--seed", "--vae-time-limit", "--dit-time-limit",
                               "--ckpt-every"},
    "bench.run_gpu": {"--out", "--time-limit"},
}
#: Spellings the vocabulary replaced (each script's --help must not offer them).
OLD_SPELLINGS = {"--time-limit-min", "--time-limit-s", "--minutes", "--vae-minutes", "--dit-minutes", "--dit-budget",
                 "--save-every", "--ckpt"}
MARKUP = re.compile(r":(?:class|func|meth|mod|data|attr|obj):`|``")


def _parser(name: str) -> argparse.ArgumentParser:
    return importlib.import_module(name).build_parser()


def _options(parser) -> dict:
    return {s: a for a in parser._actions for s in a.option_strings}


def test_every_script_is_listed():
    cli = {f"model.cli.{m.name}" for m in pkgutil.iter_modules([str(ROOT / "model" / "cli")])} - {"model.cli.args"}
    reports = {f"model.reports.{m.name}" for m in pkgutil.iter_modules([str(ROOT / "model" / "reports")])
               if hasattr(importlib.import_module(f"model.reports.{m.name}"), "main")}
    assert cli | reports <= set(SCRIPTS)


def _default_texts(default) -> list[str]:
    if isinstance(default, (list, tuple)):
        return [" ".join(str(v) for v in default)]
    texts = [str(default)]
    if isinstance(default, float):
        texts.append(f"{default:g}")
    return texts


@pytest.mark.parametrize("name", SCRIPTS)
def test_every_option_has_help_that_states_its_default(name):
    parser = _parser(name)
    formatter = parser._get_formatter()
    required_groups = {a for g in parser._mutually_exclusive_groups if g.required for a in g._group_actions}
    problems = []
    assert parser.description and not MARKUP.search(parser.description), parser.description
    assert parser.prog == f"python -m {name}"
    for action in parser._actions:
        if isinstance(action, argparse._HelpAction):
            continue
        flag = action.option_strings[0] if action.option_strings else action.dest
        if action.help == argparse.SUPPRESS:
            if (name, flag) not in INTERNAL:
                problems.append(f"{flag}: hidden from --help")
            continue
        text = formatter._expand_help(action) if action.help else ""
        if not text.strip():
            problems.append(f"{flag}: no help")
            continue
        if MARKUP.search(text):
            problems.append(f"{flag}: markup in {text!r}")
        if not action.option_strings or action.nargs == 0 or action.required or action in required_groups:
            continue  # positionals, flags, required options: no default to state
        if text.count("default") != 1:
            problems.append(f"{flag}: states its default {text.count('default')} times: {text!r}")
        default = action.default
        if default not in (None, argparse.SUPPRESS) and not any(t in text for t in _default_texts(default)):
            problems.append(f"{flag}: default {default!r} not in {text!r}")
    assert not problems, "\n".join(problems)
    parser.format_help()  # formats (no stray % in a help text)


@pytest.mark.parametrize("name", sorted(VOCABULARY))
def test_one_vocabulary(name):
    options = _options(_parser(name))
    assert VOCABULARY[name] <= set(options), VOCABULARY[name] - set(options)
    assert not OLD_SPELLINGS & set(options), OLD_SPELLINGS & set(options)
    for flag, action in options.items():
        if action.nargs != 0 and ("time-limit" in flag or "minutes" in (action.dest or "")):
            assert flag.endswith("time-limit") and action.metavar == "MINUTES", flag  # one name, one unit
    if "--no-progress" in options:
        assert options["--no-progress"].nargs == 0
    if "--resume" in options:  # a flag in both trainers: continue from --out's checkpoint
        assert isinstance(options["--resume"], argparse._StoreTrueAction)


def test_checkpoint_arguments_take_a_file_or_a_run_folder(tmp_path):
    from model.cli.args import UserError, checkpoint_file

    (tmp_path / "vae").mkdir()
    (tmp_path / "vae" / "checkpoint.safetensors").write_bytes(b"x")
    (tmp_path / "dit" / "checkpoints").mkdir(parents=True)
    (tmp_path / "dit" / "checkpoints" / "last.safetensors").write_bytes(b"x")
    assert checkpoint_file("--vae", tmp_path / "vae") == tmp_path / "vae" / "checkpoint.safetensors"
    assert checkpoint_file("--dit", tmp_path / "dit") == tmp_path / "dit" / "checkpoints" / "last.safetensors"
    assert checkpoint_file("--vae", tmp_path / "vae" / "checkpoint.safetensors").name == "checkpoint.safetensors"
    with pytest.raises(UserError, match="--dit: the folder .* holds no checkpoint"):
        checkpoint_file("--dit", tmp_path)


def test_helpers_plain_text_and_device_summary():
    from model.cli.args import describe_device, plain

    assert plain("Run :class:`model.a.B` on ``x``.\n\nMore.") == "Run model.a.B on x."
    threads = torch.get_num_threads()
    assert describe_device("cpu") == f"cpu ({threads} thread{'s' if threads != 1 else ''})"


def test_train_dit_picks_the_encoder_and_backend_the_preset_needs(tmp_path):
    from model.cli.train_dit import build_config, build_parser

    data = tmp_path / "data"
    data.mkdir()
    (data / "manifest.json").write_text("{}")
    cfg = build_config(build_parser().parse_args(["--data", str(data), "--model", "tiny", "--device", "cpu",
                                                  "--time-limit", "2", "--ckpt-every", "7"]))
    assert (cfg.encoder_size, cfg.backend, cfg.time_limit_min, cfg.save_every) == ("tiny", "reference", 2.0, 7)
    cfg = build_config(build_parser().parse_args(["--data", str(data), "--model", "released_512", "--device", "cpu"]))
    assert cfg.encoder_size == "vitl14"


# ---------------------------------------------------------------------------------------------------------------
# bad inputs: exit status 2, one line naming the option, nothing left behind


PYBULLET = importlib.util.find_spec("pybullet_data") is not None
#: (script, arguments, a fragment of the message). ``{out}`` is a path that does not exist before the call and must
#: not exist after it; ``{file}`` an existing text file, ``{empty}`` an empty folder, ``{ckpt}`` a file that is no
#: checkpoint, ``{data}`` a folder with a manifest.json, ``{image}``/``{mesh}``/``{meshes}`` the bundled test data.
BAD_INPUTS = [
    ("model.cli.generate", "{image} --weights random:tiny --out {file}", "--out: {file} is a file; give a folder"),
    ("model.cli.generate", "{missing}.png --weights random:tiny --out {out}", "does not exist"),
    ("model.cli.generate", "{image} --weights random:huge --out {out} --device cpu",
     "--weights random:huge: weights 'random:huge': unknown random size; valid choices: random:tiny"),
    ("model.cli.generate", "{image} --weights {empty} --out {out} --device cpu", "--weights {empty}: "),
    ("model.cli.generate", "{image} --weights random:tiny --out {out} --device bogus",
     "--device: 'bogus' is not a device; use auto, cpu, cuda or cuda:N"),
    ("model.cli.generate", "{image} --weights random:tiny --out {out} --steps-512 0",
     "argument --steps-512: expected a positive integer, got '0'"),
    ("model.cli.generate", "{image} --weights random:tiny --out {out} --resolution 256",
     "argument --resolution: invalid choice: 256"),
    ("model.cli.generate", "{image} --weights random:tiny --out {out} --simplify-ratio 1",
     "argument --simplify-ratio: expected a number in [0, 1), got '1'"),
    ("model.cli.generate", "{image} --weights random:tiny --out {out} --faces 100 --simplify-ratio 0.5",
     "give one of --faces and --simplify-ratio, not both"),
    ("model.cli.train_vae", "--meshes {missing} --out {out}", "--meshes: {missing} does not exist"),
    ("model.cli.train_vae", "--meshes {empty} --out {out}", "--meshes: no mesh files"),
    ("model.cli.train_vae", "--out {out}", "no training meshes: give --meshes DIR"),
    ("model.cli.train_vae", "--meshes {meshes} --pybullet 2 --out {out}", "give one of --meshes and --pybullet"),
    ("model.cli.train_vae", "--meshes {meshes} --out {file}", "--out: {file} is a file"),
    ("model.cli.train_vae", "--meshes {meshes} --config {missing}.json --out {out}", "--config: {missing}.json does"),
    ("model.cli.train_vae", "--meshes {meshes} --steps 0 --out {out}", "argument --steps: expected a positive"),
    ("model.cli.train_vae", "--meshes {meshes} --model huge --out {out}", "argument --model: invalid choice"),
    ("model.cli.train_vae", "--meshes {meshes} --resolutions 4 --out {out}", "argument --resolutions: expected a grid"),
    ("model.cli.train_vae", "--meshes {meshes} --time-limit 0 --out {out}", "argument --time-limit: expected a number"),
    ("model.cli.train_vae", "--meshes {meshes} --model-overrides {{\"bogus\":1}} --out {out}",
     "--model-overrides has unknown VAEConfig fields"),
    ("model.cli.train_vae", "--meshes {meshes} --model-overrides nope --out {out}",
     "argument --model-overrides: expected a JSON object"),
    ("model.cli.train_vae", "--meshes {meshes} --held-out-fraction 1 --out {out}",
     "argument --held-out-fraction: expected a number in [0, 1)"),
    ("model.cli.train_dit", "--out {out}", "--data: required"),
    ("model.cli.train_dit", "--data {missing} --out {out}", "--data: {missing} does not exist"),
    ("model.cli.train_dit", "--data {empty} --out {out}", "--data: {empty} has no manifest.json"),
    ("model.cli.train_dit", "--data {data} --out {file}", "--out: {file} is a file"),
    ("model.cli.train_dit", "--data {data} --out {out} --resume-from {missing}", "--resume-from: {missing} does"),
    ("model.cli.train_dit", "--data {data} --out {out} --resume --resume-from {file}", "give --resume"),
    ("model.cli.train_dit", "--data {data} --out {out} --resume {file}", "unrecognized arguments: {file}"),
    ("model.cli.train_dit", "--data {data} --out {out} --save-every 5", "unrecognized arguments: --save-every"),
    ("model.cli.train_dit", "--data {data} --out {out} --ema-decay 1", "argument --ema-decay: expected a number"),
    ("model.cli.train_dit", "--data {data} --out {out} --model huge", "argument --model: invalid choice"),
    ("model.cli.train_dit", "--data {data} --out {out} --model-overrides {{\"bogus\":1}}",
     "--model/--model-overrides: "),
    ("model.cli.train_dit", "--data {data} --out {out} --device bogus", "--device: "),
    ("model.cli.prepare_dit_data", "{missing} --vae {ckpt} --out {out}", "MESHES: {missing} does not exist"),
    ("model.cli.prepare_dit_data", "{empty} --vae {ckpt} --out {out}", "MESHES: no mesh files"),
    ("model.cli.prepare_dit_data", "{meshes} --vae {missing} --out {out}", "--vae: {missing} does not exist"),
    ("model.cli.prepare_dit_data", "{meshes} --vae {empty} --out {out}", "--vae: the folder {empty} holds no"),
    ("model.cli.prepare_dit_data", "{meshes} --vae {ckpt} --out {out}", "--vae {ckpt}: cannot be loaded"),
    ("model.cli.prepare_dit_data", "{meshes} --vae {ckpt} --out {file}", "--out: {file} is a file"),
    ("model.cli.prepare_dit_data", "{meshes} --vae {ckpt} --out {out} --views 0", "argument --views: expected a"),
    ("model.cli.prepare_dit_data", "{meshes} --vae {ckpt} --out {out} --image-size 8", "argument --image-size"),
    ("model.cli.reconstruct", "{missing}.obj --vae {ckpt} --out {out}/a.glb", "MESH: {missing}.obj does not exist"),
    ("model.cli.reconstruct", "{mesh} --vae {missing} --out {out}/a.glb", "--vae: {missing} does not exist"),
    ("model.cli.reconstruct", "{mesh} --vae {ckpt} --out {out}/a.xyz", "--out: cannot write .xyz; end the name"),
    ("model.cli.reconstruct", "{mesh} --vae {ckpt} --out {empty}", "--out: {empty} is a folder; give a file name"),
    ("model.cli.reconstruct", "{mesh} --out {out}/a.glb", "one of the arguments --vae --weights is required"),
    ("model.cli.reconstruct", "{mesh} --vae {ckpt} --out {out}/a.glb", "--vae {ckpt}: cannot be loaded"),
    ("model.cli.reconstruct", "{file} --vae {ckpt} --out {out}/a.glb", "MESH {file}: cannot be loaded"),
    ("model.cli.reconstruct", "{mesh} --vae {ckpt} --ckpt {ckpt} --out {out}/a.glb",
     "unrecognized arguments: --ckpt"),
    ("model.cli.reconstruct", "{mesh} --vae {ckpt} --out {out}/a.glb --points 0", "argument --points"),
    ("model.cli.sample", "{missing}.png --dit {ckpt} --vae {ckpt} --coords {mesh} --out {out}/s.glb",
     "IMAGE: {missing}.png does not exist"),
    ("model.cli.sample", "{image} --dit {empty} --vae {ckpt} --coords {mesh} --out {out}/s.glb",
     "--dit: the folder {empty} holds no checkpoint"),
    ("model.cli.sample", "{image} --dit {ckpt} --vae {ckpt} --coords {missing}.obj --out {out}/s.glb",
     "--coords: {missing}.obj does not exist"),
    ("model.cli.sample", "{image} --dit {ckpt} --vae {ckpt} --coords {mesh} --out {out}/s.txt",
     "--out: cannot write .txt"),
    ("model.cli.sample", "{image} --dit {ckpt} --vae {ckpt} --coords {mesh} --out {out}/s.glb",
     "--dit {ckpt}: cannot be loaded"),
    ("model.cli.sample", "{image} --dit {ckpt} --vae {ckpt} --coords {mesh} --out {out}/s.glb --guidance -1",
     "argument --guidance: expected a number >= 0"),
    ("model.reports.generate", "--out {file} --dry-run", "--out: {file} is a file"),
    ("model.reports.generate", "--out {out} --dry-run --device bogus", "--device: "),
    ("model.reports.generate", "--out {out} --dry-run --simplify-ratio -0.5",
     "argument --simplify-ratio: expected a number in [0, 1)"),
    ("model.reports.extract", "--out {out} --dry-run --resolution 7", "--resolution: expected an even grid side"),
    ("model.reports.extract", "--out {out} --dry-run --mesh {missing}.obj", "--mesh: file"),
    ("model.reports.dit", "--out {out} --smoke --shape nope", "argument --shape: invalid choice"),
    ("model.reports.dit", "--out {file} --smoke", "--out: {file} is a file"),
    ("model.reports.vae", "--out {out} --count 0", "--count must be a positive int"),
    ("model.reports.vae", "--out {out} --time-limit 0", "--time-limit must be a positive number"),
    ("model.reports.vae", "--out {out} --minutes 5", "unrecognized arguments: --minutes"),
    ("model.reports.multi_gpu", "--out {out} --gpus 1", "--gpus: the report compares 1 GPU with N >= 2 GPUs"),
    ("model.reports.multi_gpu", "--out {out} --time-limit -1", "argument --time-limit: expected a number > 0"),
    ("model.reports.dit_demo", "--out {out} --stage nope", "--stage must be 'all' or a comma list"),
    ("model.reports.dit_demo", "--out {out} --views 0", "--views must be a positive int"),
    ("bench.run_gpu", "--out {file}", "--out: {file} is a file"),
    ("bench.run_gpu", "--out {out} --time-limit -1", "argument --time-limit: expected a number of minutes >= 0"),
    ("bench.run_gpu", "--out {out} --time-limit-s 60", "unrecognized arguments: --time-limit-s"),
]
if not torch.cuda.is_available():
    BAD_INPUTS += [
        ("model.cli.sample", "{image} --dit {ckpt} --vae {ckpt} --coords {mesh} --out {out}/s.glb --device cuda",
         "--device cuda: CUDA is not available here; use auto or cpu"),
        ("model.cli.train_dit", "--data {data} --out {out} --device cuda:1", "--device cuda:1: CUDA is not available"),
    ]
if not PYBULLET:
    BAD_INPUTS += [
        ("model.cli.train_vae", "--pybullet 3 --out {out}",
         "--pybullet: pybullet is not installed; install the meshes extra: pip install -e '.[meshes]'"),
        ("model.data.meshes", "--export {out}", "--export: package 'pybullet_data' is not installed"),
    ]


@pytest.fixture(scope="module")
def places(tmp_path_factory):
    root = tmp_path_factory.mktemp("bad_inputs")
    (root / "file.txt").write_text("not a mesh, a folder or a checkpoint\n")
    (root / "empty").mkdir()
    (root / "junk.safetensors").write_bytes(b"garbage")
    (root / "data").mkdir()
    (root / "data" / "manifest.json").write_text(json.dumps({"format": "ssa-dit-data/1", "items": []}))
    return dict(file=root / "file.txt", empty=root / "empty", ckpt=root / "junk.safetensors", data=root / "data",
                missing=root / "missing", image=IMAGE, mesh=MESHES / "box.obj", meshes=MESHES, root=root)


def _call(name: str, argv: list[str]) -> int:
    try:
        return importlib.import_module(name).main(argv)
    except SystemExit as exc:  # argparse's errors
        return exc.code


@pytest.mark.parametrize("name,args,fragment", BAD_INPUTS,
                         ids=[f"{n.split('.')[-1]}:{a}" for n, a, _ in BAD_INPUTS])
def test_bad_input_is_a_one_line_error_with_status_2(name, args, fragment, places, capsys, request, monkeypatch):
    monkeypatch.delenv("SSA3D_TRACEBACK", raising=False)
    out = places["root"] / f"out-{request.node.callspec.id.replace('/', '_').replace(' ', '_')[:60]}"
    fill = {k: str(v) for k, v in places.items()} | {"out": str(out)}
    argv = [word.format(**fill) for word in args.split(" ")]
    status = _call(name, argv)
    err = capsys.readouterr().err
    assert status == 2, (status, err)
    lines = [line for line in err.strip().splitlines() if line.strip()]
    assert "Traceback" not in err and lines, err
    assert lines[-1].startswith(f"python -m {name}: error: "), err  # the last line is the message ...
    assert fragment.format(**fill) in lines[-1], (fragment.format(**fill), err)  # ... naming the option
    if not err.startswith("usage:"):  # argparse's own errors print the usage first; ours are one line
        assert len(lines) == 1, err
    assert not out.exists(), f"{out} left behind"


def test_a_failed_run_removes_the_out_folder_it_created(tmp_path, capsys):
    from model.cli.args import UserError, run

    parser = argparse.ArgumentParser(prog="python -m x")
    parser.add_argument("--out")

    def fails(args):
        Path(args.out, "sub").mkdir(parents=True)
        Path(args.out, "sub", "half.txt").write_text("half")
        raise UserError("--thing: wrong")

    assert run(parser, fails, ["--out", str(tmp_path / "new" / "run")]) == 2
    assert not (tmp_path / "new").exists()
    assert capsys.readouterr().err == "python -m x: error: --thing: wrong\n"
    (tmp_path / "kept").mkdir()
    (tmp_path / "kept" / "old.txt").write_text("old")
    assert run(parser, fails, ["--out", str(tmp_path / "kept")]) == 2
    assert (tmp_path / "kept" / "old.txt").is_file()  # an --out that existed before is never removed

    def returns_1(args):
        Path(args.out).mkdir()
        return 1

    assert run(parser, returns_1, ["--out", str(tmp_path / "empty")]) == 1
    assert not (tmp_path / "empty").exists()  # a failed run's empty folder goes too


# ---------------------------------------------------------------------------------------------------------------
# progress bars of the cascade's long stages


@pytest.mark.usefixtures("one_thread")  # tests/conftest.py
def test_the_long_cascade_stages_show_progress_bars(capsys):
    """Revoxelisation, chunked decoding, the 512 refiner and the sign refiner draw a tqdm bar named after their stage
    (extraction's bar is its marching cubes over bricks); with progress off they draw none."""
    import numpy as np
    import trimesh

    from model.nets.refiner import RefinerConfig, SignRefiner, VoxelRefiner, predict_sign, refine_512
    from model.nets.vae import SparseSDFVAE, VAEConfig
    from model.pipeline.extract import sparse_sdf_to_mesh
    from model.pipeline.geometry import mesh_to_latent_coords
    from model.pipeline.pretrained import decode_chunked
    from model.sparse.tensor import SparseTensor

    torch.manual_seed(0)
    box = trimesh.creation.box(extents=(1.0, 0.6, 0.8))
    cfg = RefinerConfig.tiny()
    coords = torch.unique(torch.randint(0, 16, (300, 3)), dim=0)
    sdf = torch.rand(len(coords)) * 2 - 1
    fine = torch.unique(torch.randint(0, 32, (400, 3)), dim=0)
    vae = SparseSDFVAE(VAEConfig.tiny(prune="none", resolution=32)).eval()
    cells = torch.unique(torch.randint(0, 4, (20, 3)), dim=0).int()
    z = SparseTensor.from_list([cells], [torch.randn(len(cells), vae.config.latent_channels)])

    def run(progress):
        with torch.no_grad():
            mesh_to_latent_coords(box, resolution=64, factor=8, progress=progress)
            decode_chunked(vae, z, 2, progress=progress, desc="decode 1024")
            refine_512(VoxelRefiner(cfg).eval(), coords, sdf, torch.randn(len(coords), 8), progress=progress)
            predict_sign(SignRefiner(cfg).eval(), fine, torch.rand(len(fine)) * 2 - 1, 32, progress=progress)
        ball = np.stack(np.nonzero(np.ones((8, 8, 8))), 1)
        sparse_sdf_to_mesh(ball, np.linalg.norm(ball - 3.5, axis=1) - 2.5, 8, level=0.0, progress=progress)
        return capsys.readouterr().err

    shown = run(True)
    for desc in ("revoxelise", "decode 1024", "refine 512", "refine 1024", "marching cubes"):
        assert desc in shown, (desc, shown)
    assert run(False) == ""
