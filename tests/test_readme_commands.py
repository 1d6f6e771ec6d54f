"""Every command in the README's ```bash blocks works as written.

A command that ends in ``# needs: WHAT`` (a CUDA GPU, a download, the released weights, the ``meshes`` extra, minutes
of time: :data:`NEEDS`) is only checked: its arguments must parse (``python -m`` commands, through the script's own
parser) and the extras it installs must exist. Every other command runs for real, in the README's order, in one
temporary folder holding a copy of ``tests/data`` (so the README's relative paths work and nothing is written into
the repository), on the CPU, with ``python`` the interpreter running the tests: the data-dependent chain
train_vae -> reconstruct -> prepare_dit_data -> train_dit -> sample runs once, sharing its outputs.
"""
from __future__ import annotations

import importlib
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
#: What a ``# needs: ...`` marker may name.
NEEDS = {
    "gpu": "a CUDA GPU",
    "network": "a download (pip, the model hub)",
    "weights": "the released Direct3D-S2 weights",
    "pybullet": "the meshes extra: pip install -e '.[meshes]'",
    "long": "minutes of time (the test suite itself)",
}
_NEEDS = re.compile(r"#\s*needs:\s*([a-z0-9_, -]+?)\s*$")
#: What each runnable command must leave behind (paths relative to the folder the commands run in).
OUTPUTS = {
    "model.cli.train_vae": ["runs/vae/checkpoint.safetensors", "runs/vae/metrics.jsonl", "runs/vae/loss.png"],
    "model.cli.reconstruct": ["recon.glb"],
    "model.cli.prepare_dit_data": ["runs/dit_data/manifest.json", "runs/dit_data/box/view_00.png"],
    "model.cli.train_dit": ["runs/dit/checkpoints/last.safetensors", "runs/dit/metrics.jsonl"],
    "model.cli.sample": ["sample.sdf.npz"],
    "model.cli.generate": ["out/capsule.glb", "out/capsule.png"],
    "bench.run_gpu": ["runs/bench-cpu/benchmark.md", "runs/bench-cpu/raw/benchmark-raw.json"],
}


@dataclass
class Command:
    line: int  # of README.md
    text: str  # the command, continuation lines joined, comments dropped
    needs: set = field(default_factory=set)

    @property
    def argv(self) -> list[str]:
        return shlex.split(self.text)

    @property
    def module(self) -> str | None:
        """``X`` of ``python -m X ...`` (None for any other command)."""
        argv = self.argv
        if len(argv) >= 3 and argv[0] in ("python", "python3") and argv[1] == "-m":
            return argv[2]
        return None

    def __str__(self) -> str:
        return f"README.md:{self.line}: {self.text}"


def readme_commands(text: str | None = None) -> list[Command]:
    """The commands of the ```bash blocks, in order."""
    text = README.read_text() if text is None else text
    commands = []
    for block in re.finditer(r"^```bash\n(.*?)^```", text, flags=re.S | re.M):
        first = text[:block.start()].count("\n") + 2
        pending, start = "", None
        for i, raw in enumerate(block.group(1).splitlines()):
            line = raw.strip()
            if not pending and (not line or line.startswith("#")):
                continue
            start = first + i if not pending else start
            if line.endswith("\\"):
                pending += line[:-1] + " "
                continue
            full = pending + line
            pending = ""
            m = _NEEDS.search(full)
            needs = {w.strip() for w in m.group(1).split(",") if w.strip()} if m else set()
            words = shlex.split(full, comments=True)
            commands.append(Command(start, shlex.join(words), needs))
    return commands


COMMANDS = readme_commands()
RUNNABLE = [c for c in COMMANDS if not c.needs]
CHECKED = [c for c in COMMANDS if c.needs]


def test_the_readme_has_commands_and_every_marker_is_known():
    assert len(RUNNABLE) >= 7 and len(CHECKED) >= 8
    for cmd in COMMANDS:
        assert cmd.needs <= set(NEEDS), f"{cmd}: unknown marker {cmd.needs - set(NEEDS)}; known: {sorted(NEEDS)}"
    for cmd in RUNNABLE:  # a runnable command is one of ours, and GPU / network work is marked
        assert cmd.module is not None, f"{cmd}: only `python -m ...` commands run unmarked"
        assert "wushuang98" not in cmd.text and "/path/to" not in cmd.text, f"{cmd}: needs a marker"
    # the data chain is there, in this order
    order = [c.module for c in RUNNABLE]
    chain = ["model.cli.train_vae", "model.cli.reconstruct", "model.cli.prepare_dit_data", "model.cli.train_dit",
             "model.cli.sample"]
    assert [m for m in order if m in chain] == chain


def _parse(cmd: Command):
    """The script's own parser on the command's arguments (SystemExit on an argument error)."""
    module = importlib.import_module(cmd.module)
    argv = cmd.argv[3:]
    if cmd.module == "bench.run_gpu":
        argv, _ = module.split_argv(argv)
    return module.build_parser().parse_args(argv)


@pytest.mark.parametrize("cmd", CHECKED, ids=lambda c: f"line{c.line}")
def test_marked_commands_parse(cmd):
    tomllib = pytest.importorskip("tomllib")  # Python >= 3.11
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    for words in (part.split() for part in re.split(r"&&|;", cmd.text)):
        if words[:2] == ["pip", "install"]:
            for spec in words[2:]:
                m = re.fullmatch(r"""['"]?\.\[([a-z,]+)\]['"]?""", spec)
                if m:
                    assert set(m.group(1).split(",")) <= set(extras), f"{cmd}: unknown extra"
    if cmd.module is not None and cmd.module.split(".")[0] in ("model", "bench"):
        try:
            _parse(cmd)
        except SystemExit as exc:
            pytest.fail(f"{cmd}: the arguments do not parse (exit status {exc.code})")


def test_the_readme_bash_blocks_run_as_written(tmp_path):
    """Runs every unmarked command, in order, the way a new user would (bash, from a folder with the README's
    relative paths), on the CPU; checks what each wrote."""
    shutil.copytree(ROOT / "tests" / "data", tmp_path / "tests" / "data")
    env = dict(os.environ)
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    env.update(CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    env.pop("SSA3D_TRACEBACK", None)
    seconds = {}
    for cmd in RUNNABLE:
        t0 = time.perf_counter()
        proc = subprocess.run(["bash", "-c", cmd.text], cwd=tmp_path, env=env, capture_output=True, text=True,
                              timeout=300)
        seconds[f"line {cmd.line}"] = round(time.perf_counter() - t0, 1)
        assert proc.returncode == 0, f"{cmd}\nexit {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
        assert "Traceback" not in proc.stderr, f"{cmd}\n{proc.stderr[-3000:]}"
        for path in OUTPUTS.get(cmd.module, []):
            assert (tmp_path / path).is_file(), f"{cmd}: did not write {path}"
    print("seconds per README command:", seconds)
