"""Imports point one way: `lint-imports` checks pyproject.toml's [tool.importlinter] layers contract
(cli on top, errors at the bottom), so a wrong-way import fails the suite."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_imports_follow_the_layers():
    exe = shutil.which("lint-imports", path=str(Path(sys.executable).parent)) or shutil.which("lint-imports")
    assert exe is not None, "lint-imports is missing: install the test extra (pip install -e '.[test]')"
    # --no-cache: nothing written into the work tree
    result = subprocess.run([exe, "--no-cache"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, f"lint-imports failed:\n{result.stdout}\n{result.stderr}"
