"""Packaging: every third-party module the package imports is declared, and the conda env repeats the declaration.

Imports are read from the source (``ast``, so imports inside functions count too) and mapped to distributions
with ``importlib.metadata.packages_distributions()``: ``import SimpleITK`` -> ``simpleitk``, ``import yaml`` ->
``pyyaml``. A module that no installed distribution provides is reported as well, rather than passed over.
"""

from __future__ import annotations

import ast
import sys
from importlib.metadata import packages_distributions
from pathlib import Path

import yaml
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

from conftest import REPO

PACKAGE = "pretrain_det3d"
SRC = REPO / "src"
PYPROJECT = REPO / "pyproject.toml"
CONDA_ENV = REPO / "envs" / "pretrain_det3d.yaml"


def imported_modules(root: Path) -> dict[str, set[str]]:
    """Top-level names of the absolute imports in every ``.py`` file under ``root`` -> files importing them."""
    found: dict[str, set[str]] = {}
    for path in sorted(root.rglob("*.py")):
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            else:
                continue
            for name in names:
                found.setdefault(name.split(".")[0], set()).add(str(path.relative_to(root)))
    return found


def third_party(modules: dict[str, set[str]]) -> dict[str, set[str]]:
    skip = set(sys.stdlib_module_names) | {PACKAGE, "__future__"}
    return {name: files for name, files in modules.items() if name not in skip}


def declared(pyproject: Path) -> dict[str, Requirement]:
    """pyproject's run-time ``dependencies`` by canonical distribution name."""
    project = tomllib.loads(pyproject.read_text(encoding="utf-8"))["project"]
    requirements = [Requirement(line) for line in project["dependencies"]]
    return {canonicalize_name(r.name): r for r in requirements}


def undeclared_imports(src: Path, pyproject: Path) -> list[str]:
    """One line per third-party module under ``src`` whose distribution pyproject does not declare."""
    providers = packages_distributions()
    names = declared(pyproject)
    problems = []
    for module, files in sorted(third_party(imported_modules(src)).items()):
        distributions = {canonicalize_name(d) for d in providers.get(module, [])}
        where = ", ".join(sorted(files))
        if not distributions:
            problems.append(f"{module} (imported in {where}) is provided by no installed distribution")
        elif not distributions & names.keys():
            problems.append(f"{module} (imported in {where}) needs one of {sorted(distributions)} in pyproject.toml")
    return problems


def conda_pip_requirements(env_file: Path) -> dict[str, Requirement]:
    env = yaml.safe_load(env_file.read_text(encoding="utf-8"))
    pip_lists = [item["pip"] for item in env["dependencies"] if isinstance(item, dict) and "pip" in item]
    assert len(pip_lists) == 1, f"{env_file}: expected one pip: list, found {len(pip_lists)}"
    requirements = [Requirement(line) for line in pip_lists[0]]
    return {canonicalize_name(r.name): r for r in requirements}


def env_mismatches(pyproject: Path, env_file: Path) -> list[str]:
    env = conda_pip_requirements(env_file)
    problems = []
    for name, requirement in sorted(declared(pyproject).items()):
        if name not in env:
            problems.append(f"{requirement} is missing from {env_file.name}")
        elif env[name].specifier != requirement.specifier:
            problems.append(f"{name}: pyproject says '{requirement.specifier}', {env_file.name} says '{env[name].specifier}'")
    return problems


def test_every_imported_third_party_module_is_declared():
    assert undeclared_imports(SRC, PYPROJECT) == []


def test_every_dependency_is_in_the_conda_env_with_the_same_bounds():
    assert env_mismatches(PYPROJECT, CONDA_ENV) == []


def test_the_import_scan_sees_imports_inside_functions():
    modules = imported_modules(SRC)
    # retina_unet imports torchvision at module level, the benchmark imports batchgenerators inside a function
    assert "pretrain_det3d/models/retina_unet.py" in modules["torchvision"]
    assert "pretrain_det3d/benchmark/comparisons.py" in modules["batchgenerators"]
    assert "os" in modules and "os" not in third_party(modules)


def test_a_missing_declaration_is_reported(tmp_path):
    """The check fails when a dependency is dropped (the state before torchvision was declared)."""
    text = PYPROJECT.read_text(encoding="utf-8")
    lines = [line for line in text.splitlines() if not line.strip().startswith('"torchvision')]
    assert len(lines) == len(text.splitlines()) - 1
    stripped = tmp_path / "pyproject.toml"
    stripped.write_text("\n".join(lines) + "\n", encoding="utf-8")
    problems = undeclared_imports(SRC, stripped)
    assert len(problems) == 1 and problems[0].startswith("torchvision ")
    assert env_mismatches(stripped, CONDA_ENV) == []


def test_a_dependency_missing_from_the_conda_env_is_reported(tmp_path):
    text = CONDA_ENV.read_text(encoding="utf-8")
    stripped = tmp_path / "env.yaml"
    stripped.write_text("\n".join(l for l in text.splitlines() if "openpyxl" not in l) + "\n", encoding="utf-8")
    assert env_mismatches(PYPROJECT, stripped) == [f"{declared(PYPROJECT)['openpyxl']} is missing from env.yaml"]


def test_the_licence_is_declared():
    project = tomllib.loads(PYPROJECT.read_text(encoding="utf-8"))["project"]
    assert project["license"] == "Apache-2.0"
    assert "Apache License" in (REPO / "LICENSE").read_text(encoding="utf-8")
