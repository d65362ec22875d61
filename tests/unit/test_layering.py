"""The house's rules, checked: a worker imports only handlers/, and imports point one way.

entry points (scripts/, web/, benchmarks/) -> library (imagerec/, training/) -> core (handlers/).
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

from imagerec.paths import PROJECT_ROOT
from imagerec.torchserve import serving_python

PROJECT_PACKAGES = ("handlers", "imagerec", "training", "benchmarks", "scripts", "web", "tests")
# What each folder may import from the project (besides itself).
ALLOWED = {
    "handlers": set(),
    "imagerec": {"handlers"},
    "training": {"handlers", "imagerec"},
    "benchmarks": {"handlers", "imagerec", "training"},
    "scripts": {"handlers", "imagerec", "training"},
    "web": {"handlers", "imagerec", "training"},
}
# Build-side modules a worker must never load when it imports handlers/ (the registry's build-side
# hooks, such as resolving resnet18's weights with torchvision, import them lazily, and a worker never
# calls them: the serving-environment test below proves what a worker really loads).
NOT_IN_HANDLERS = {"subprocess", "yaml", "torchvision", "model_archiver"}


def _names(node: ast.AST) -> set[str]:
    if isinstance(node, ast.Import):
        return {alias.name for alias in node.names}
    if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
        return {node.module}
    return set()


def imported_modules(path: Path, module_level_only: bool = False) -> set[str]:
    """Modules named by import statements in the file: anywhere, or at module level only."""
    tree = ast.parse(path.read_text(), filename=str(path))
    nodes = tree.body if module_level_only else ast.walk(tree)
    return set().union(*(_names(node) for node in nodes))


@pytest.mark.parametrize("folder", sorted(ALLOWED))
def test_imports_point_one_way(folder):
    offenders = []
    for path in sorted((PROJECT_ROOT / folder).rglob("*.py")):
        for name in imported_modules(path):
            top = name.split(".")[0]
            if top in PROJECT_PACKAGES and top != folder and top not in ALLOWED[folder]:
                offenders.append(f"{path.relative_to(PROJECT_ROOT)} imports {name}")
        if folder == "handlers":
            build_side = {n for n in imported_modules(path, module_level_only=True) if n.split(".")[0] in NOT_IN_HANDLERS}
            offenders += [f"{path.relative_to(PROJECT_ROOT)} imports {name} (build side)" for name in sorted(build_side)]
    assert not offenders, "\n".join(offenders)


def test_no_code_outside_tests_changes_sys_path():
    offenders = [str(path.relative_to(PROJECT_ROOT)) for folder in ALLOWED
                 for path in (PROJECT_ROOT / folder).rglob("*.py") if "sys.path." in path.read_text()]
    assert not offenders


def test_the_worker_loads_only_runtime_modules_in_the_serving_environment():
    """Import the handler as TorchServe does, in .venv-serve (CPU torch, no torchvision), and list
    which project modules got loaded: only handlers/, and no torchvision (about 150 MB per worker)."""
    code = ("import sys, handlers.recognition_handler; "
            f"print(sorted(m for m in sys.modules if m.split('.')[0] in {PROJECT_PACKAGES!r})); "
            "print('torchvision' in sys.modules)")
    result = subprocess.run([str(serving_python()), "-c", code], capture_output=True, text=True, timeout=120,
                            cwd=PROJECT_ROOT, env={"PYTHONPATH": str(PROJECT_ROOT), "PATH": "/usr/bin:/bin"})
    assert result.returncode == 0, result.stderr
    modules_line, torchvision_line = result.stdout.strip().splitlines()[-2:]
    loaded = ast.literal_eval(modules_line)
    assert "handlers.recognition_handler" in loaded
    assert all(name.split(".")[0] == "handlers" for name in loaded), loaded
    assert torchvision_line == "False"


# Entry-point folders: the library must not reach them by path either (running a script by its path
# is an import in disguise). Docstrings may name them; code may not.
ENTRY_POINT_FOLDERS = ("scripts", "web", "benchmarks")


def _path_strings(path: Path) -> list[str]:
    """String constants of the file's code (docstrings left out) that name an entry-point folder:
    the bare folder name (as in ``ROOT / "scripts"``) or a path inside it."""
    tree = ast.parse(path.read_text(), filename=str(path))
    docstrings = {id(node.value) for node in ast.walk(tree) if isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant)}
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docstrings:
            text = node.value
            if text in ENTRY_POINT_FOLDERS or any(text.startswith(f"{folder}/") and " " not in text
                                                  for folder in ENTRY_POINT_FOLDERS):
                found.append(text)
    return found


@pytest.mark.parametrize("folder", ["handlers", "imagerec", "training"])
def test_the_library_does_not_run_entry_points_by_path(folder):
    offenders = [f"{path.relative_to(PROJECT_ROOT)}: {text!r}" for path in sorted((PROJECT_ROOT / folder).rglob("*.py"))
                 for text in _path_strings(path)]
    assert not offenders, "\n".join(offenders)


def test_the_training_library_imports_without_torch():
    """A warm train_head (features and graph cached) must not import torch: 1.7 s of its 2 s budget.
    Importing its modules is the first half of that (tests/test_training.py runs the whole warm run)."""
    code = ("import sys, training.train_head, handlers.heads, handlers.imaging, handlers.runtime, imagerec.archive; "
            "print('torch' in sys.modules)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=PROJECT_ROOT)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "False"
