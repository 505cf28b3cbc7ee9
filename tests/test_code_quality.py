"""The code stays as STYLE.md asks: ruff-formatted, lint-clean, mypy --strict clean."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", *args], cwd=ROOT, capture_output=True, text=True, timeout=300
    )


def test_ruff_format_and_lint_are_clean():
    fmt = _run("ruff", "format", "--check", "gateway", "tests", "bench")
    assert fmt.returncode == 0, fmt.stdout + fmt.stderr
    lint = _run("ruff", "check", "gateway", "tests", "bench")
    assert lint.returncode == 0, lint.stdout + lint.stderr


def test_mypy_strict_is_clean_on_the_package():
    result = _run("mypy")
    assert result.returncode == 0, result.stdout + result.stderr
