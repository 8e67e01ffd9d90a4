"""The README's Python example runs as written and trains a good model."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def readme_python_example() -> str:
    """The first ```python block under the ``## Python`` heading of README.md."""
    text = (ROOT / "README.md").read_text()
    section = text.split("\n## Python\n", 1)[1].split("\n## ", 1)[0]
    match = re.search(r"```python\n(.*?)```", section, re.DOTALL)
    assert match, "no ```python block under ## Python"
    return match.group(1)


def run_python(code: str, cwd: Path) -> str:
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=cwd, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr
    return done.stdout


def accuracy(stdout: str) -> float:
    match = re.search(r"accuracy[^:]*: ([0-9.]+)", stdout)
    assert match, stdout
    return float(match.group(1))


@pytest.mark.slow
def test_readme_python_example_runs_and_learns(tmp_path: Path) -> None:
    code = readme_python_example()
    assert "use_slow_weights(optimizer)" in code
    out = run_python(code, tmp_path)
    assert accuracy(out) > 0.93
    assert f"test accuracy: {accuracy(out):.4f}" in (ROOT / "README.md").read_text()


@pytest.mark.slow
def test_quickstart_evaluates_the_slow_weights_and_learns(tmp_path: Path) -> None:
    code = (ROOT / "examples" / "quickstart.py").read_text()
    assert "use_slow_weights(optimizer)" in code
    assert accuracy(run_python(code, tmp_path)) > 0.93


def test_readme_says_how_to_use_the_environment_and_install_elsewhere() -> None:
    top = (ROOT / "README.md").read_text().split("\n## Python\n", 1)[0]
    assert "source .venv/bin/activate" in top and ".venv/bin/rangerdl" in top
    assert "torchrun" in top
    assert "pip install /path/to/rangerdl" in top and "pip install -e" in top
    assert "`[train] threads" in (ROOT / "README.md").read_text()
