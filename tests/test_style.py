"""The code base passes ``ruff check`` (pycodestyle and pyflakes, lines up to 120; configured in pyproject.toml)."""

import importlib.util
import subprocess
import sys

import pytest
from conftest import REPO


def test_ruff_finds_nothing():
    if importlib.util.find_spec("ruff") is None:
        pytest.skip("ruff is not installed (it comes with the test extra: pip install -e '.[test]')")
    result = subprocess.run([sys.executable, "-m", "ruff", "check", "--no-cache", str(REPO)],
                            capture_output=True, text=True, cwd=REPO)
    assert result.returncode == 0, result.stdout[-3000:]
