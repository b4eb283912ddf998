"""scripts/lint_imports.sh passes on the tree and fails on an upward import or a framework import."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _run(root: Path) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(root / "scripts" / "lint_imports.sh")], capture_output=True, text=True, check=False,
                          env={"PYTHON": sys.executable, "PATH": "/usr/bin:/bin"})


def test_tree_passes():
    res = _run(ROOT)
    assert res.returncode == 0, res.stdout + res.stderr


@pytest.mark.parametrize("module, line, message", [
    ("encoder.py", "from .engine import SemToken\n", "encoder (layer 2) imports engine (layer 3)"),
    ("budget.py", "def f():\n    import semtoken_rag.cli\n", "budget (layer 2) imports cli (layer 4)"),
    ("engine.py", "import langchain_core\n", "the engine package imports langchain_core"),
    ("spans.py", "from llama_index.core import Document\n", "imports llama_index.core"),
])
def test_violations_fail(tmp_path, module, line, message):
    shutil.copytree(ROOT / "semtoken_rag", tmp_path / "semtoken_rag", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copytree(ROOT / "scripts", tmp_path / "scripts")
    with open(tmp_path / "semtoken_rag" / module, "a", encoding="utf-8") as fh:
        fh.write("\n" + line)
    res = _run(tmp_path)
    assert res.returncode == 1 and message in res.stdout, res.stdout + res.stderr
