"""The house rules a green run would not show: layers point down, modules stay small."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import ROOT

PACKAGES = ("loadsnap", "scheduler", "dp_controller")
MAX_MODULE_LINES = 500


def _modules(package: str) -> list[Path]:
    return sorted((ROOT / package).rglob("*.py"))


def _imported(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), str(path))
    names: set[str] = set()
    for node in ast.walk(tree):  # function-local imports too: they hid the old upward imports
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return names


def test_library_imports_nothing_built_on_it() -> None:
    upward = {
        f"{path.relative_to(ROOT)}: {name}"
        for path in _modules("loadsnap")
        for name in _imported(path)
        if name.split(".")[0] in ("scheduler", "dp_controller")
    }
    assert upward == set()


def test_publisher_imports_beside_a_local_scheduler_module(tmp_path: Path) -> None:
    # An engine whose project has its own scheduler.py: loadsnap must not shadow or need it.
    (tmp_path / "scheduler.py").write_text("MINE = True\n")
    code = (
        "import scheduler\n"
        "from loadsnap import LoadPublisher, ShmWriter\n"
        "assert scheduler.MINE\n"
        "print(LoadPublisher.__module__)\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "loadsnap.publisher"


@pytest.mark.parametrize("package", PACKAGES)
def test_modules_stay_small(package: str) -> None:
    big = {
        str(path.relative_to(ROOT)): lines
        for path in _modules(package)
        if (lines := len(path.read_text().splitlines())) > MAX_MODULE_LINES
    }
    assert big == {}, f"split by job (STYLE.md): {big}"


def test_environment_is_read_in_one_module() -> None:
    readers = set()
    for package in PACKAGES:
        for path in _modules(package):
            tree = ast.parse(path.read_text(), str(path))
            for node in ast.walk(tree):
                if (
                    isinstance(node, ast.Attribute)
                    and node.attr in ("environ", "getenv")
                    and isinstance(node.value, ast.Name)
                    and node.value.id == "os"
                ):
                    readers.add(str(path.relative_to(ROOT)))
    assert readers == {"loadsnap/settings.py"}
