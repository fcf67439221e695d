"""The code's shape, read with ``ast``: short functions, no private names taken from another simxent module,
and torch.distributed reached only through simxent/dist.py."""
import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
MAX_LINES = 60

# Functions still longer than MAX_LINES while they are being split. Each entry is debt made visible: the list
# only shrinks, and a function that is not on it fails the test as soon as it passes MAX_LINES.
LONG_FUNCTIONS_BEING_SPLIT: set[str] = set()
# Modules that may still import torch.distributed themselves instead of going through simxent.dist.
DISTRIBUTED_IMPORTERS_BEING_MOVED: set[str] = set()


def package_modules() -> dict[str, ast.Module]:
    """simxent's modules by dotted name below the package (``train``, ``configs.x``), parsed."""
    package = ROOT / "simxent"
    return {".".join(p.relative_to(package).with_suffix("").parts): ast.parse(p.read_text(), str(p))
            for p in sorted(package.rglob("*.py"))}


def script_modules() -> dict[str, ast.Module]:
    return {f"scripts/{p.name}": ast.parse(p.read_text(), str(p)) for p in sorted((ROOT / "scripts").glob("*.py"))}


def long_functions(tree: ast.Module, module: str) -> dict[str, int]:
    """``module.qualified.name`` -> lines (``def`` line to last line) of every function longer than MAX_LINES,
    methods and nested functions included."""
    found = {}

    def visit(node, prefix):
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                name = f"{prefix}.{child.name}"
                lines = child.end_lineno - child.lineno + 1
                if not isinstance(child, ast.ClassDef) and lines > MAX_LINES:
                    found[name] = lines
                visit(child, name)
            else:
                visit(child, prefix)
    visit(tree, module)
    return found


def is_private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))  # __version__ is public


def private_imports(tree: ast.Module) -> list[str]:
    """Private names this module takes from simxent: ``from .m import _x``, ``import simxent._m``, and
    ``m._x`` where ``m`` is a simxent module it imported."""
    found, modules = [], set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and (node.level > 0 or (node.module or "").split(".")[0] == "simxent"):
            source = "." * node.level + (node.module or "")
            found += [f"line {node.lineno}: {source}.{a.name}" for a in node.names
                      if is_private(a.name) or any(is_private(p) for p in source.strip(".").split(".") if p)]
            modules.update(a.asname or a.name for a in node.names)  # may be modules: checked by attribute below
        elif isinstance(node, ast.Import):
            for a in node.names:
                if a.name.split(".")[0] == "simxent":
                    found += [f"line {node.lineno}: {a.name}" for p in a.name.split(".") if is_private(p)]
                    modules.add(a.asname or a.name)
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and is_private(node.attr) and ast.unparse(node.value) in modules:
            found.append(f"line {node.lineno}: {ast.unparse(node)}")
    return found


def distributed_uses(tree: ast.Module) -> list[int]:
    """Lines that import or reach torch.distributed."""
    lines = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import) and any(a.name.startswith("torch.distributed") for a in node.names):
            lines.append(node.lineno)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and (
                (node.module or "").startswith("torch.distributed")
                or (node.module == "torch" and any(a.name == "distributed" for a in node.names))):
            lines.append(node.lineno)
        elif isinstance(node, ast.Attribute) and node.attr == "distributed" and ast.unparse(node.value) == "torch":
            lines.append(node.lineno)
    return sorted(set(lines))


def test_no_function_is_longer_than_60_lines_but_those_being_split():
    long = {}
    for module, tree in package_modules().items():
        long.update(long_functions(tree, module))
    unlisted = {name: lines for name, lines in long.items() if name not in LONG_FUNCTIONS_BEING_SPLIT}
    assert not unlisted, f"functions over {MAX_LINES} lines (split them): {unlisted}"


def test_no_private_name_is_imported_from_another_simxent_module():
    found = {name: private_imports(tree) for name, tree in {**package_modules(), **script_modules()}.items()}
    found = {name: lines for name, lines in found.items() if lines}
    assert not found, f"private simxent names used outside their module (give them a public name): {found}"


def test_only_dist_imports_torch_distributed():
    found = {name: lines for name, tree in package_modules().items()
             if name != "dist" and name not in DISTRIBUTED_IMPORTERS_BEING_MOVED and (lines := distributed_uses(tree))}
    assert not found, f"torch.distributed outside simxent/dist.py (go through simxent.dist): {found}"
    assert distributed_uses(package_modules()["dist"])  # the check sees dist.py's own imports


# ---- the checks themselves, on made-up modules


def function_of(lines: int) -> str:
    body = "\n".join(f"    x{i} = {i}" for i in range(lines - 2))
    return f"def f():\n    '''doc'''\n{body}\n"


@pytest.mark.parametrize("lines, flagged", [(MAX_LINES, False), (MAX_LINES + 1, True)])
def test_a_new_long_function_is_caught(lines, flagged):
    source = function_of(lines) + "class C:\n" + "\n".join("    " + s for s in function_of(lines).splitlines())
    found = long_functions(ast.parse(source), "m")
    assert found == ({"m.f": lines, "m.C.f": lines} if flagged else {})


@pytest.mark.parametrize("source, found", [
    ("from .loss import _Symmetric, nt_xent", ["line 1: .loss._Symmetric"]),
    ("from simxent.cli import _run", ["line 1: simxent.cli._run"]),
    ("from simxent import cli\ncli._run(main)", ["line 2: cli._run"]),
    ("import simxent.loss as L\nL._F.apply(x)", ["line 2: L._F"]),
    ("from ._private import thing", ["line 1: ._private.thing"]),
    ("from . import __version__\nfrom .loss import nt_xent\nfrom os import _exit", []),
    ("import simxent.cli\nself._cache = 1", []),
])
def test_private_imports_are_caught(source, found):
    assert private_imports(ast.parse(source)) == found


@pytest.mark.parametrize("source, found", [
    ("import torch.distributed as dist", [1]),
    ("from torch.distributed import all_reduce", [1]),
    ("from torch import distributed", [1]),
    ("import torch\n\ntorch.distributed.barrier()", [3]),
    ("import torch\nfrom .dist import barrier\ntorch.cuda.is_available()", []),
])
def test_distributed_uses_are_caught(source, found):
    assert distributed_uses(ast.parse(source)) == found
