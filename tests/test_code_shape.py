"""The house rules a reader relies on, checked on the source (unit tier: no process is launched):
core modules stay small, functions short, parallel/ free of Hugging Face, every public parameter of the core
packages annotated, and bench measuring through the run's observers, never by patching training's names."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parents[1]
CORE = ("parallel", "modeling", "training")
MAX_CORE_FILE_LINES = 400
MAX_FUNCTION_LINES = 60
# The Hugging Face classes parallel/ must not know by name: its layers take plain torch modules and tensors.
HF_NAMES = ("Conv1D", "PreTrainedModel", "PretrainedConfig", "GenerationMixin")


def _sources(*packages: str) -> list[Path]:
    return sorted(p for package in packages for p in (ROOT / package).rglob("*.py"))


def _tree(path: Path) -> ast.Module:
    return ast.parse(path.read_text(), filename=str(path))


def _name(path: Path) -> str:
    return str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else path.name


def _functions(tree: ast.AST):
    return (n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef)))


def test_core_modules_stay_under_400_lines():
    long = {str(p.relative_to(ROOT)): n for p in _sources(*CORE)
            if (n := len(p.read_text().splitlines())) > MAX_CORE_FILE_LINES}
    assert not long, f"split these modules (lines): {long}"


def test_no_function_over_60_lines_outside_tests():
    paths = _sources(*CORE, "bench", "scripts") + [ROOT / "train.py"]
    long = {f"{p.relative_to(ROOT)}:{f.lineno} {f.name}": f.end_lineno - f.lineno + 1
            for p in paths for f in _functions(_tree(p)) if f.end_lineno - f.lineno + 1 > MAX_FUNCTION_LINES}
    assert not long, f"split these functions (lines): {long}"


def test_parallel_knows_nothing_of_hugging_face():
    found = []
    for path in _sources("parallel"):
        text = path.read_text()
        for node in ast.walk(_tree(path)):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                names = [node.module or ""]
            else:
                continue
            found += [f"{path.name}: import {n}" for n in names if n.split(".")[0] in ("transformers", "modeling")]
        found += [f"{path.name}: {name}" for name in HF_NAMES if name in text]
    assert not found, found


def unannotated_public_parameters(paths: list[Path]) -> list[str]:
    """Parameters of public functions and methods (names without a leading underscore, in public classes, not
    nested in functions) that carry no annotation; ``self``/``cls`` excepted."""
    missing: list[str] = []

    def visit(path: Path, node: ast.AST, public: bool) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.ClassDef):
                visit(path, child, public and not child.name.startswith("_"))
            elif isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)):
                dunder = child.name.startswith("__") and child.name.endswith("__")
                if public and (dunder or not child.name.startswith("_")):
                    args = child.args
                    params = [*args.posonlyargs, *args.args, *args.kwonlyargs,
                              *(a for a in (args.vararg, args.kwarg) if a)]
                    missing.extend(f"{_name(path)}:{child.lineno} {child.name}({a.arg})" for a in params
                                   if a.annotation is None and a.arg not in ("self", "cls"))

    for path in paths:
        visit(path, _tree(path), True)
    return missing


def test_every_public_parameter_of_the_core_packages_is_annotated():
    missing = unannotated_public_parameters(_sources(*CORE))
    assert not missing, f"{len(missing)} unannotated: {missing[:40]}"


def _training_aliases(tree: ast.Module) -> set[str]:
    """Names a bench module binds to training modules or their attributes (``import training.loop as loop``,
    ``from training import checkpoint``, ``from training.pipeline import PipelineRunner``)."""
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {(a.asname or a.name).split(".")[0] for a in node.names if a.name.split(".")[0] == "training"}
        elif isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] == "training":
            names |= {a.asname or a.name for a in node.names}
    return names


def monkeypatches_of_training(path: Path) -> list[str]:
    """Assignments to an attribute of a training name, and ``setattr`` on one, in ``path``."""
    tree = _tree(path)
    aliases = _training_aliases(tree)

    def root(expr) -> str | None:
        while isinstance(expr, ast.Attribute):
            expr = expr.value
        return expr.id if isinstance(expr, ast.Name) else None

    found = []
    for node in ast.walk(tree):
        targets = []
        if isinstance(node, (ast.Assign, ast.AugAssign, ast.AnnAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            targets = [t for group in targets for t in (group.elts if isinstance(group, ast.Tuple) else [group])]
        elif isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "setattr":
            targets = [ast.Attribute(value=node.args[0], attr="?")] if node.args else []
        elif isinstance(node, ast.Call) and len(node.args) >= 2 and isinstance(node.args[1], ast.Constant) \
                and isinstance(node.args[1].value, str) and root(node.args[0]) in aliases:
            targets = [ast.Attribute(value=node.args[0], attr="?")]  # a patching helper: f(module, "name", ...)
        found += [f"{path.name}:{node.lineno}" for t in targets
                  if isinstance(t, ast.Attribute) and root(t) in aliases]
    return found


def test_bench_patches_no_training_name():
    found = [hit for path in _sources("bench") for hit in monkeypatches_of_training(path)]
    assert not found, f"bench must measure through training's observers, not patch it: {found}"


def test_the_checks_can_fail(tmp_path):
    """Each check above finds what it is for in a file made to break it."""
    bad = tmp_path / "bad.py"
    bad.write_text("import training.loop as loop\nfrom training import checkpoint\n\n"
                   "def f(a, b: int):\n    loop._step = None\n    setattr(checkpoint, 'save', None)\n"
                   "    _around(loop, '_run', a)\n"
                   + "    x = 1\n" * 60)
    assert monkeypatches_of_training(bad) == ["bad.py:5", "bad.py:6", "bad.py:7"]
    assert unannotated_public_parameters([bad]) == ["bad.py:4 f(a)"]
    assert [f.end_lineno - f.lineno + 1 for f in _functions(_tree(bad))] == [64]
