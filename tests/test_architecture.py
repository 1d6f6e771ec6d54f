"""docs/architecture.md, enforced: every import of ``ssa_kernels/``, ``reference/``, ``bench/`` and ``model/`` is parsed
(``ast``: top-level, nested and lazy imports, relative ones resolved, ``importlib.import_module`` / ``__import__``
with a literal or f-string name) and checked against the package map's rules; plus file sizes and the number of
top-level modules of ``model/``. A failure names the file, the line and the offending import.
"""
from __future__ import annotations

import ast
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

#: The packages the rules speak of, and every top-level package of the project (an import of one is "of the project").
CHECKED = ("ssa_kernels", "reference", "bench", "model")
PROJECT = CHECKED + ("tests",)

#: The subpackages (and top-level modules) of ``model``, each a unit of the import rules.
MODEL_UNITS = ("model.io", "model.sparse", "model.data", "model.nets", "model.flow", "model.metrics",
               "model.pipeline", "model.training", "model.cli", "model.reports")
#: The library part of ``model`` (everything but the command-line and report scripts).
MODEL_LIBRARY = ("model.io", "model.sparse", "model.data", "model.nets", "model.flow", "model.metrics",
                 "model.pipeline", "model.training")

#: docs/architecture.md "Import rules": what each unit of ``model`` may import of ``model`` (besides itself).
MODEL_MAY_IMPORT = {
    "model.io": (),
    "model.sparse": (),
    "model.data": ("model.sparse", "model.io"),
    "model.nets": ("model.sparse", "model.io"),
    "model.flow": ("model.sparse", "model.nets", "model.io"),
    "model.metrics": ("model.data", "model.io"),
    "model.pipeline": ("model.sparse", "model.nets", "model.data", "model.flow", "model.metrics", "model.io"),
    "model.training": MODEL_LIBRARY,
    "model.cli": MODEL_LIBRARY + ("model",),
    "model.reports": MODEL_LIBRARY + ("model", "model.cli"),
    # model/__init__.py may lazily export the public API: anything of the library, not cli/reports
    "model": MODEL_LIBRARY,
}
#: What all of ``model`` may import of the other project packages (docs/architecture.md, the package table).
MODEL_MAY_IMPORT_OUTSIDE = ("ssa_kernels", "reference")

MAX_LINES = 800
MAX_MODEL_TOP_MODULES = 8


@dataclass(frozen=True)
class Import:
    file: str  # relative to the repository root
    line: int
    module: str  # the importing module, dotted
    target: str  # the imported module, dotted and absolute
    text: str  # the import statement as written

    def __str__(self):
        return f"{self.file}:{self.line}: `{self.text}` imports {self.target}"


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def is_project_module(dotted: str) -> bool:
    """Whether ``dotted`` names a module or package file of the repository."""
    base = ROOT.joinpath(*dotted.split("."))
    return base.with_suffix(".py").is_file() or (base / "__init__.py").is_file()


def _dynamic_name(node: ast.Call, module: str) -> str | None:
    """The module named by ``importlib.import_module(...)`` / ``__import__(...)``: a literal, or the literal head of
    an f-string (``f"model.nets.{name}"`` -> ``model.nets``; ``{__name__}`` stands for the importing module)."""
    f = node.func
    called = f.attr if isinstance(f, ast.Attribute) else f.id if isinstance(f, ast.Name) else None
    if called not in ("import_module", "__import__") or not node.args:
        return None
    arg = node.args[0]
    if isinstance(arg, ast.Constant) and isinstance(arg.value, str):
        return arg.value
    if isinstance(arg, ast.JoinedStr):
        head = ""
        for part in arg.values:
            if isinstance(part, ast.Constant):
                head += str(part.value)
            elif isinstance(part.value, ast.Name) and part.value.id == "__name__":
                head += module
            else:
                break
        return head.rstrip(".") or None
    return None


def parse_imports(source: str, module: str, is_package: bool, file: str = "<string>") -> list[Import]:
    """Every import of a module's source, anywhere in it, as absolute dotted targets. ``from X import n`` counts as
    an import of ``X.n`` where that is a module of the repository, else of ``X``."""
    tree = ast.parse(source)
    package = module.split(".") if is_package else module.split(".")[:-1]
    out = []

    def add(node, target):
        text = ast.get_source_segment(source, node) or ast.unparse(node)
        out.append(Import(file, node.lineno, module, target, " ".join(text.split())))

    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                add(node, alias.name)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                keep = len(package) - (node.level - 1)
                if keep < 1:
                    raise AssertionError(f"{file}:{node.lineno}: relative import goes above the top-level package")
                base = ".".join(package[:keep] + ([node.module] if node.module else []))
            else:
                base = node.module
            targets = {}  # one entry per imported module, in order
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                targets[sub if alias.name != "*" and is_project_module(sub) else base] = None
            for target in targets:
                add(node, target)
        elif isinstance(node, ast.Call):
            name = _dynamic_name(node, module)
            if name:
                add(node, name)
    return out


def source_files(package: str) -> list[Path]:
    return sorted(p for p in (ROOT / package).rglob("*.py") if "__pycache__" not in p.parts)


@cache
def imports_of(package: str) -> tuple[Import, ...]:
    out = []
    for path in source_files(package):
        out += parse_imports(path.read_text(), module_name(path), path.name == "__init__.py",
                             str(path.relative_to(ROOT)))
    return tuple(out)


def top(dotted: str) -> str:
    return dotted.split(".")[0]


def within(dotted: str, package: str) -> bool:
    return dotted == package or dotted.startswith(package + ".")


def model_unit(dotted: str) -> str | None:
    """The unit of ``model`` a module belongs to (``model.nets.dit`` -> ``model.nets``; ``model`` itself)."""
    if dotted == "model":
        return "model"
    for unit in MODEL_UNITS:
        if within(dotted, unit):
            return unit
    return None


def report(bad: list, rule: str) -> str:
    return f"{rule}: {len(bad)} offending import(s)\n" + "\n".join(f"  {b}" for b in bad)


# ----------------------------------------------------------------------------------------------------------------
# The parser itself: the rules below must not pass because imports went unseen.
# ----------------------------------------------------------------------------------------------------------------


def test_parser_sees_nested_lazy_relative_and_dynamic_imports():
    src = (
        "import os\n"
        "from . import vae\n"
        "from .ssa_layer import SSALayer\n"
        "from .. import flow\n"
        "def f():\n"
        "    import triton.language as tl\n"
        "    from model.sparse import tensor, SparseTensor\n"
        "    class A:\n"
        "        def g(self):\n"
        "            from ..sparse.conv import x\n"
        "    return importlib.import_module(f'model.pipeline.{name}'), __import__('bench.cases')\n"
        "if True:\n"
        "    try:\n"
        "        from bench import cases\n"
        "    except ImportError:\n"
        "        pass\n"
    )
    got = {(i.line, i.target) for i in parse_imports(src, "model.nets.example", False)}
    assert got == {
        (1, "os"), (2, "model.nets.vae"), (3, "model.nets.ssa_layer"), (4, "model.flow"), (6, "triton.language"),
        (7, "model.sparse.tensor"), (7, "model.sparse"), (10, "model.sparse.conv"), (11, "model.pipeline"),
        (11, "bench.cases"), (14, "bench.cases"),
    }
    # in a package's __init__, "." is the package itself; f"{__name__}.x" is relative to the importing module
    assert [i.target for i in parse_imports("from .ssa import x\n", "reference", True)] == ["reference.ssa"]
    assert [i.target for i in parse_imports("import_module(f'{__name__}.{m}')\n", "model.data", True)] == [
        "model.data"]
    with pytest.raises(AssertionError, match="above the top-level package"):
        parse_imports("from ... import x\n", "model.nets.dit", False)


@pytest.mark.parametrize("package", CHECKED)
def test_every_package_is_parsed(package):
    files = source_files(package)
    assert files, f"no source files under {package}/"
    assert imports_of(package), f"no imports found under {package}/"


# ----------------------------------------------------------------------------------------------------------------
# The rules of docs/architecture.md.
# ----------------------------------------------------------------------------------------------------------------


def test_ssa_kernels_imports_no_project_package():
    bad = [i for i in imports_of("ssa_kernels") if top(i.target) in PROJECT and top(i.target) != "ssa_kernels"]
    assert not bad, report(bad, "ssa_kernels may import nothing of the project")


def test_reference_imports_neither_ssa_kernels_nor_triton_nor_any_project_package():
    bad = [i for i in imports_of("reference")
           if top(i.target) == "triton" or (top(i.target) in PROJECT and top(i.target) != "reference")]
    assert not bad, report(bad, "reference may import neither ssa_kernels nor triton nor any project package")


def test_bench_imports_only_ssa_kernels_reference_and_model_io():
    allowed = ("bench", "ssa_kernels", "reference", "model.io")
    bad = [i for i in imports_of("bench")
           if top(i.target) in PROJECT and not any(within(i.target, a) for a in allowed)]
    assert not bad, report(bad, "bench may import only ssa_kernels, reference and model.io of the project")


def test_every_model_module_is_in_the_package_table():
    stray = [str(p.relative_to(ROOT)) for p in source_files("model") if model_unit(module_name(p)) is None]
    assert not stray, f"modules of model/ outside the table of docs/architecture.md: {stray}"


@pytest.mark.parametrize("unit", sorted(MODEL_MAY_IMPORT))
def test_model_package_imports_follow_the_table(unit):
    may = (unit,) + MODEL_MAY_IMPORT[unit]
    bad = []
    for i in imports_of("model"):
        if model_unit(i.module) != unit or top(i.target) not in PROJECT:
            continue
        if top(i.target) == "model":
            if model_unit(i.target) not in may:
                bad.append(i)
        elif top(i.target) not in MODEL_MAY_IMPORT_OUTSIDE:
            bad.append(i)
    allowed = ", ".join(MODEL_MAY_IMPORT[unit] + MODEL_MAY_IMPORT_OUTSIDE)
    assert not bad, report(bad, f"{unit} may import only {allowed} (and itself)")


def test_the_library_imports_no_benchmark_cli_or_report_module():
    forbidden = ("bench", "model.cli", "model.reports")
    bad = []
    for package in ("ssa_kernels", "reference", "model"):
        for i in imports_of(package):
            if package == "model" and model_unit(i.module) in ("model.cli", "model.reports"):
                continue
            if any(within(i.target, f) for f in forbidden):
                bad.append(i)
    assert not bad, report(bad, "the library (all but model.cli and model.reports) may not import bench, model.cli "
                                "or model.reports")


def test_source_files_are_at_most_800_lines():
    long = []
    for package in CHECKED:
        for path in source_files(package):
            n = len(path.read_text().splitlines())
            if n > MAX_LINES:
                long.append(f"{path.relative_to(ROOT)}: {n} lines")
    assert not long, f"source files over {MAX_LINES} lines:\n  " + "\n  ".join(long)


def test_model_top_level_holds_at_most_8_modules():
    modules = sorted(p.name for p in (ROOT / "model").glob("*.py") if p.name != "__init__.py")
    assert len(modules) <= MAX_MODEL_TOP_MODULES, (
        f"model/ holds {len(modules)} top-level modules besides its subpackages (at most {MAX_MODEL_TOP_MODULES}): "
        f"{modules}")
