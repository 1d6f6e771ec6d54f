"""The command-line vocabulary every script shares (``model.cli``, ``model.reports``), in one place.

* One spelling, one unit and one help text per common option: ``--out``, ``--device``, ``--seed``,
  ``--no-progress``, ``--time-limit MINUTES``, ``--ckpt-every N``, ``--resume`` (:func:`add_out` ...).
* Value checks for ``type=`` that name what they expect (:func:`positive_int` ...); argparse adds the option's name.
* Path checks that name the option and say what to give instead (:func:`existing_file`, :func:`checkpoint_file`
  takes a checkpoint file or the run folder a trainer wrote, :func:`output_file`, :func:`output_folder`).
* :func:`run`, the wrapper of every ``main``: a user error (:class:`UserError`, or a library ``ValueError`` /
  ``FileNotFoundError`` ...) becomes one line ``PROG: error: MESSAGE`` on stderr and exit status 2, without a
  traceback (``SSA3D_TRACEBACK=1`` shows it), and the ``--out`` file or folder the failed run created is removed.
* :func:`plain`: a docstring paragraph without reStructuredText markup, for ``--help``.
"""
from __future__ import annotations

import argparse
import contextlib
import math
import os
import re
import shutil
import sys
from pathlib import Path
from typing import Callable, Iterable

__all__ = [
    "CHECKPOINT_NAMES", "MESH_SUFFIXES", "USER_ERRORS", "add_ckpt_every", "add_config_options", "add_device",
    "add_no_progress", "add_out", "add_resume", "add_seed", "add_time_limit", "checkpoint_file", "describe_device",
    "existing_file", "existing_path", "finite_float", "json_object", "loading", "make_parser", "non_negative_float",
    "non_negative_int", "option_message", "output_file", "output_folder", "plain", "positive_float", "positive_int",
    "resolve_device", "run", "unit_interval", "UserError",
]

#: Where a run folder keeps its checkpoint: ``train_vae`` writes ``OUT/checkpoint.safetensors``, ``train_dit``
#: ``OUT/checkpoints/last.safetensors`` (and numbered ones beside it).
CHECKPOINT_NAMES = ("checkpoint.safetensors", "checkpoints/last.safetensors")
#: Mesh formats the scripts write (trimesh's exporters).
MESH_SUFFIXES = (".glb", ".gltf", ".obj", ".ply", ".stl", ".off")
#: The environment variable that makes :func:`run` show the traceback of a user error.
TRACEBACK_ENV = "SSA3D_TRACEBACK"


class UserError(Exception):
    """A mistake in the command line (a missing path, a wrong choice): :func:`run` prints the message (which names
    the option and the fix) as ``PROG: error: MESSAGE`` and exits with status 2."""


#: Exceptions :func:`run` reports as user errors: the library raises these with messages that name the input.
USER_ERRORS = (UserError, FileNotFoundError, FileExistsError, NotADirectoryError, IsADirectoryError,
               ModuleNotFoundError, ValueError)


# ---------------------------------------------------------------------------------------------------------------
# help text


_ROLE = re.compile(r":(?:class|func|meth|mod|data|attr|obj|exc|ref):`~?([^`]+)`")


def plain(text: str | None, *, paragraph: bool = True) -> str:
    """``text`` (a docstring) without reStructuredText markup: ``:class:`a.b.C``` -> ``a.b.C``, ````x```` -> ``x``;
    only its first paragraph when ``paragraph``; whitespace runs become one space."""
    text = text or ""
    if paragraph:
        text = text.strip().split("\n\n")[0]
    text = _ROLE.sub(r"\1", text).replace("``", "")
    return " ".join(text.split())


def dataclass_defaults(cls) -> dict:
    """``{field: default}`` of a configuration dataclass (factories called), for the defaults shown in --help."""
    import dataclasses

    return {f.name: f.default if f.default_factory is dataclasses.MISSING else f.default_factory()
            for f in dataclasses.fields(cls)}


def make_parser(prog: str, doc: str | None, **kwargs) -> argparse.ArgumentParser:
    """An ``ArgumentParser`` for ``python -m PROG`` described by the first paragraph of ``doc`` (plain text)."""
    return argparse.ArgumentParser(prog=f"python -m {prog}", description=plain(doc), **kwargs)


# ---------------------------------------------------------------------------------------------------------------
# value checks (argparse type=)


def _number(text: str, kind, what: str):
    try:
        value = kind(text)
    except (TypeError, ValueError):
        raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
    if isinstance(value, float) and not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}")
    return value


def positive_int(text: str) -> int:
    value = _number(text, int, "a positive integer")
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def non_negative_int(text: str) -> int:
    value = _number(text, int, "an integer >= 0")
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {text!r}")
    return value


def finite_float(text: str) -> float:
    return _number(text, float, "a finite number")


def positive_float(text: str) -> float:
    value = _number(text, float, "a number > 0")
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected a number > 0, got {text!r}")
    return value


def non_negative_float(text: str) -> float:
    value = _number(text, float, "a number >= 0")
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected a number >= 0, got {text!r}")
    return value


def json_object(text: str) -> dict:
    """A JSON object given on the command line (e.g. ``'{"num_blocks": 4}'``)."""
    import json

    try:
        value = json.loads(text)
    except json.JSONDecodeError:
        value = None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"expected a JSON object such as '{{\"num_blocks\": 4}}', got {text!r}")
    return value


def unit_interval(text: str) -> float:
    value = _number(text, float, "a number in [0, 1]")
    if not 0 <= value <= 1:
        raise argparse.ArgumentTypeError(f"expected a number in [0, 1], got {text!r}")
    return value


def share_below_one(text: str) -> float:
    """A share in ``[0, 1)`` (e.g. of the faces a decimation removes)."""
    value = _number(text, float, "a number in [0, 1)")
    if not 0 <= value < 1:
        raise argparse.ArgumentTypeError(f"expected a number in [0, 1), got {text!r}")
    return value


# ---------------------------------------------------------------------------------------------------------------
# the shared options


def add_out(p, what: str, *, default: str | None = None, shown: str | None = None, dest: str = "out"):
    """``--out PATH``: required unless ``default`` (or ``shown``, the default text of a config-file option)."""
    if default is None and shown is None:
        return p.add_argument("--out", required=True, dest=dest, metavar="PATH", help=what)
    return p.add_argument("--out", default=default, dest=dest, metavar="PATH",
                          help=f"{what} (default {shown or default})")


def add_device(p, *, default: str | None = "auto", shown: str | None = None):
    """``--device``: ``auto`` (CUDA when available, else the CPU), ``cpu``, ``cuda``, ``cuda:N``."""
    return p.add_argument("--device", default=default, metavar="DEVICE",
                          help=f"auto (CUDA when available, else the CPU), cpu, cuda or cuda:N "
                               f"(default {shown or default})")


def add_seed(p, *, default: int | None = 0, shown: str | None = None, what: str = "random seed"):
    return p.add_argument("--seed", type=non_negative_int, default=default, metavar="N",
                          help=f"{what} (default {shown if shown is not None else default})")


def add_no_progress(p, *, dest: str = "progress", default=True):
    """``--no-progress``: ``args.<dest>`` is False when given (``default`` otherwise)."""
    return p.add_argument("--no-progress", dest=dest, action="store_false", default=default,
                          help="no progress bars (default: show them)")


def add_time_limit(p, what: str = "training", *, default: float | None = None, shown: str | None = None,
                   dest: str = "time_limit", flag: str = "--time-limit"):
    """``--time-limit MINUTES``: the one spelling and unit of every time limit."""
    text = shown if shown is not None else ("none" if default is None else f"{default:g}")
    return p.add_argument(flag, dest=dest, type=positive_float, default=default, metavar="MINUTES",
                          help=f"wall-clock minutes of {what}, then stop cleanly (default {text})")


def add_ckpt_every(p, *, default: int | None = None, shown: str | None = None, dest: str = "ckpt_every"):
    text = shown if shown is not None else default
    return p.add_argument("--ckpt-every", dest=dest, type=positive_int, default=default, metavar="N",
                          help=f"write a checkpoint every N steps, and at the end (default {text})")


def add_resume(p, where: str, *, default=False):
    """``--resume``: a flag, continue from the checkpoint the same ``--out`` holds (``where``)."""
    return p.add_argument("--resume", action="store_true", default=default,
                          help=f"continue from {where} when it exists, else start afresh (default: start afresh)")


def add_config_options(p, cls, *, skip: Iterable[str] = (), flags: dict | None = None, helps: dict | None = None,
                       shown: dict | None = None) -> dict:
    """One option per field of the dataclass ``cls`` not in ``skip``: ``--field-name`` (or ``flags[field]``), of
    the type of the field's default (str when None), default None so that an unset option keeps the dataclass's
    value (or a preset's); help ``helps[field]`` with the default (``shown[field]`` or the field's default).
    Returns ``{flag: field}``."""
    import dataclasses

    flags, helps, shown = flags or {}, helps or {}, shown or {}
    made = {}
    for f in dataclasses.fields(cls):
        if f.name in skip:
            continue
        value = f.default if f.default is not dataclasses.MISSING else None
        text = shown.get(f.name, "none" if value is None else value)
        flag = flags.get(f.name, "--" + f.name.replace("_", "-"))
        what = helps.get(f.name, f.name.replace("_", " "))
        if isinstance(value, bool):
            p.add_argument(flag, dest=f.name, type=_bool, default=None, metavar="BOOL",
                           help=f"{what}: true or false (default {str(value).lower()})")
        else:
            kind = type(value) if value is not None else str
            metavar = ("MINUTES" if flag.endswith("time-limit") else "N" if kind is int
                       else f.name.split("_")[-1].upper())
            p.add_argument(flag, dest=f.name, type=kind, default=None, metavar=metavar,
                           help=what if "default" in what else f"{what} (default {text})")
        made[flag] = f.name
    return made


def _bool(text: str) -> bool:
    if text.lower() in ("true", "1", "yes"):
        return True
    if text.lower() in ("false", "0", "no"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def option_message(text: str, flags: dict) -> str:
    """A library message that starts with a field name (``count must be ...``) in terms of its flag: ``flags`` maps
    flag -> field (:func:`add_config_options`)."""
    by_field = {v: k for k, v in flags.items()}
    m = re.match(r"^(\w+)( must| has|:| \()", text)
    if m and m.group(1) in by_field:
        return by_field[m.group(1)] + text[len(m.group(1)):]
    return text


# ---------------------------------------------------------------------------------------------------------------
# path checks (after parsing; UserError names the option)


def existing_path(flag: str, value, what: str = "file or folder") -> Path:
    path = Path(value)
    if not path.exists():
        raise UserError(f"{flag}: {value} does not exist; give an existing {what}")
    return path


def existing_file(flag: str, value, what: str = "file") -> Path:
    path = existing_path(flag, value, what)
    if not path.is_file():
        raise UserError(f"{flag}: {value} is a folder; give a {what}")
    return path


def checkpoint_file(flag: str, value, names: Iterable[str] = CHECKPOINT_NAMES) -> Path:
    """The checkpoint ``value`` names: the file itself, or in a run folder the first of ``names`` it holds."""
    path = existing_path(flag, value, "checkpoint file or run folder")
    if path.is_file():
        return path
    for name in names:
        if (path / name).is_file():
            return path / name
    raise UserError(f"{flag}: the folder {value} holds no checkpoint ({' or '.join(names)}); give a checkpoint "
                    "file or the --out folder of a finished training run")


def output_file(flag: str, value, suffixes: Iterable[str] | None = MESH_SUFFIXES) -> Path:
    """An output file: not an existing folder, a known suffix (when ``suffixes``); an existing file is replaced."""
    path = Path(value)
    if path.is_dir():
        raise UserError(f"{flag}: {value} is a folder; give a file name such as {path / 'mesh.glb'}")
    if suffixes is not None and path.suffix.lower() not in suffixes:
        raise UserError(f"{flag}: cannot write {path.suffix or 'a file without extension'}; end the name with one "
                        f"of {', '.join(suffixes)}")
    _check_parent(flag, path.parent)
    return path


def output_folder(flag: str, value) -> Path:
    """An output folder: may exist (files in it are replaced), must not be a file."""
    path = Path(value)
    if path.exists() and not path.is_dir():
        raise UserError(f"{flag}: {value} is a file; give a folder (it is created when missing)")
    _check_parent(flag, path)
    return path


def _check_parent(flag: str, path: Path) -> None:
    for parent in (path, *path.parents):
        if parent.exists():
            if not parent.is_dir():
                raise UserError(f"{flag}: {parent} is a file, so {path} cannot be created; choose another path")
            return


@contextlib.contextmanager
def loading(flag: str, value):
    """Load what an option names inside ``with loading("--vae", path):``: any failure (a file of another kind, a
    checkpoint of another model) becomes a :class:`UserError` naming the option and the value."""
    try:
        yield
    except UserError:
        raise
    except Exception as exc:  # noqa: BLE001 - whatever the loader raises, the input is at fault
        text = str(exc) if isinstance(exc, (ValueError, OSError)) else f"{type(exc).__name__}: {exc}"
        raise UserError(f"{flag} {value}: cannot be loaded: {text}") from exc


def resolve_device(value, flag: str = "--device"):
    """``torch.device`` of a ``--device`` value; :class:`UserError` naming the option otherwise."""
    import torch

    if value is None or value == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(value)
    except (RuntimeError, TypeError, ValueError):
        raise UserError(f"{flag}: {value!r} is not a device; use auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"{flag} {value}: CUDA is not available here; use auto or cpu")
    if device.type not in ("cpu", "cuda"):
        raise UserError(f"{flag} {value}: only the CPU and CUDA devices are supported; use auto, cpu, cuda or cuda:N")
    return device


def describe_device(device) -> str:
    """``cpu (N threads)`` or the CUDA device's name: what a run summary says it ran on."""
    import torch

    device = torch.device(device)
    if device.type == "cpu":
        n = torch.get_num_threads()
        return f"cpu ({n} thread{'s' if n != 1 else ''})"
    if device.type == "cuda" and torch.cuda.is_available():
        return f"{device} ({torch.cuda.get_device_name(device)})"
    return str(device)


# ---------------------------------------------------------------------------------------------------------------
# the wrapper of every main


def _first_missing(path: Path) -> Path | None:
    """The outermost of ``path`` and its parents that does not exist yet (what a run would create)."""
    missing = None
    for p in (path, *path.parents):
        if p.exists() or p.is_symlink():
            break
        missing = p
    return missing


def _remove(paths: Iterable[Path], *, only_empty: bool = False) -> None:
    for p in paths:
        try:
            if p.is_dir() and not p.is_symlink():
                if only_empty:
                    p.rmdir()  # OSError when not empty: kept
                else:
                    shutil.rmtree(p)
            elif p.exists() and not only_empty:
                p.unlink()
        except OSError:
            pass


def _message(exc: BaseException) -> str:
    if isinstance(exc, ModuleNotFoundError) and exc.name and "pip install" not in str(exc):
        return f"{exc}; install it (pip install {exc.name.split('.')[0]})"
    if isinstance(exc, OSError) and exc.filename is not None and exc.strerror:
        return f"{exc.filename}: {exc.strerror}"
    return str(exc) or type(exc).__name__


def run(parser: argparse.ArgumentParser, body: Callable[[argparse.Namespace], int | None], argv=None, *,
        outputs: Callable[[argparse.Namespace], Iterable] | None = None) -> int:
    """Parse ``argv`` and run ``body(args)``; its return value (None = 0) is the exit status.

    A user error raised by ``body`` (:data:`USER_ERRORS`) prints ``PROG: error: MESSAGE`` and returns 2; the
    output paths (``outputs(args)``, default ``[args.out]``) that did not exist before are removed, so a failed
    run leaves nothing half-written. A run that returns a non-zero status removes the folders it created only when
    they are empty. Argument errors exit through ``parser.error`` (status 2) before anything is created.
    """
    args = parser.parse_args(argv)
    if outputs is None:
        out = getattr(args, "out", None)
        paths = [out] if isinstance(out, (str, os.PathLike)) else []
    else:
        paths = [p for p in outputs(args) if p is not None]
    created = [m for m in (_first_missing(Path(p)) for p in paths) if m is not None]
    try:
        status = body(args)
    except USER_ERRORS as exc:
        _remove(created)
        if os.environ.get(TRACEBACK_ENV):
            raise
        print(f"{parser.prog}: error: {_message(exc)}", file=sys.stderr)
        return 2
    status = int(status or 0)
    if status:
        _remove(created, only_empty=True)
    return status
