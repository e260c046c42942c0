"""Packaging truth: every jem_core module imports on its own (no import cycle, no hidden import-order
dependency), and pyproject.toml declares every third-party package the engine imports."""
from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
MODULES = sorted(".".join(p.relative_to(REPO).with_suffix("").parts).removesuffix(".__init__")
                 for p in (REPO / "jem_core").rglob("*.py"))
# Import name → distribution name, where they differ.
DISTRIBUTIONS = {"osgeo": "GDAL"}


@pytest.mark.parametrize("module", MODULES)
def test_module_imports_alone_in_a_fresh_interpreter(module):
    done = subprocess.run([sys.executable, "-c", f"import {module}"], cwd=REPO, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]


def third_party_imports() -> set[str]:
    names = set()
    for path in (REPO / "jem_core").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                names.update(alias.name.split(".")[0] for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names.add(node.module.split(".")[0])
    return {n for n in names if n not in sys.stdlib_module_names and n != "jem_core"}


def test_pyproject_declares_every_third_party_import():
    import tomllib

    project = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    declared = {requirement.split(">")[0].split("=")[0].split("<")[0].strip().lower()
                for requirement in project["dependencies"]}
    needed = {DISTRIBUTIONS.get(name, name).lower() for name in third_party_imports()}
    assert needed <= declared, f"imported but not declared in pyproject.toml: {sorted(needed - declared)}"


def test_declared_torch_has_what_training_uses():
    """torch.nn.utils.get_total_norm came with torch 2.6: the declared minimum must not be older."""
    import tomllib

    dependencies = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))["project"]["dependencies"]
    torch_requirement = next(r for r in dependencies if r.startswith("torch"))
    major, minor = (int(part) for part in torch_requirement.split(">=")[1].split(".")[:2])
    assert (major, minor) >= (2, 6), torch_requirement
