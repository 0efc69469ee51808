"""Import directions, checked by walking the AST of every module: ``parallel`` needs torch and the standard library
only, ``modeling`` adds transformers, ``training`` adds DeepSpeed, datasets and W&B, and nothing imports ``bench``
or ``tests`` (``FORBIDDEN`` below is the rule)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parents[1]
FORBIDDEN = {
    "parallel": {"transformers", "deepspeed", "datasets", "wandb", "training", "modeling", "bench", "tests"},
    "modeling": {"deepspeed", "datasets", "wandb", "training", "bench", "tests"},
    "training": {"bench", "tests"},
}


def imported_roots(path: Path) -> set[str]:
    roots = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            roots |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            roots.add(node.module.split(".")[0])
    return roots


def test_import_directions():
    violations = []
    for package, forbidden in FORBIDDEN.items():
        for path in sorted((ROOT / package).rglob("*.py")):
            bad = imported_roots(path) & forbidden
            if bad:
                violations.append(f"{path.relative_to(ROOT)} imports {sorted(bad)}")
    assert not violations, "\n".join(violations)


def test_no_module_level_global_state():
    for package in FORBIDDEN:
        for path in (ROOT / package).rglob("*.py"):
            assert not any(isinstance(n, ast.Global) for n in ast.walk(ast.parse(path.read_text()))), path
