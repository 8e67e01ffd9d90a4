"""The tables in README.md and docs/ are the ones the results JSON gives (benchmarks/report.py).

A block ``<!-- table: NAME -->`` ... ``<!-- /table -->`` must hold exactly ``tables()[NAME]``;
``--check`` names the file and the table of each block that does not, and of each unknown name.
"""

from __future__ import annotations

import importlib
import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
REPORT = REPO / "benchmarks" / "report.py"
sys.path.append(str(REPO / "benchmarks"))  # after everything else: shadows nothing
report = importlib.import_module("report")


def _check(root: Path, *flags: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(REPORT), f"--root={root}", *flags],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=REPO,
    )


def _copy_docs(dest: Path) -> Path:
    dest.mkdir()
    shutil.copy(REPO / "README.md", dest / "README.md")
    shutil.copytree(REPO / "docs", dest / "docs")
    return dest


def test_every_table_block_in_readme_and_docs_matches_the_results() -> None:
    proc = _check(REPO, "--check")
    assert proc.returncode == 0, proc.stderr


def test_the_promised_tables_are_generated() -> None:
    made = report.tables()
    for name in (
        "ttq_headline",
        "ttq_cells",
        "optimizer_step",
        "convergence",
        "data_loader",
        "keras_step",
        "netsim",
        "outer_ablation",
        "plan_check",
    ):
        assert made[name].count("\n|") >= 2, name  # a header, a rule and at least one row
    assert "| ranger_k8_bf16_overlap4_eager |" in made["ttq_headline"]


def test_a_tampered_block_fails_the_check_and_docs_rewrites_it(tmp_path: Path) -> None:
    root = _copy_docs(tmp_path / "repo")
    page = root / "docs" / "tampered.md"
    page.write_text("# t\n\n<!-- table: netsim -->\n<!-- /table -->\n\nafter\n")
    proc = _check(root, "--docs")  # the copy as the results say, whatever the real files hold
    assert proc.returncode == 0, proc.stderr
    real = report.tables()["netsim"]
    assert page.read_text() == f"# t\n\n<!-- table: netsim -->\n{real}\n<!-- /table -->\n\nafter\n"
    assert _check(root, "--check").returncode == 0

    readme = root / "README.md"
    blocks = list(report.BLOCK.finditer(readme.read_text()))
    tampered = [(page, "netsim")] + ([(readme, blocks[0].group(2))] if blocks else [])
    page.write_text(page.read_text().replace("0.874 s", "0.500 s"))
    if blocks:
        text = readme.read_text()
        end = blocks[0].end(3)
        readme.write_text(text[:end] + "| 1 | 2 |\n" + text[end:])
    proc = _check(root, "--check")
    assert proc.returncode != 0
    for path, name in tampered:
        assert f"{path}: table {name!r} differs" in proc.stderr, proc.stderr
    assert _check(root, "--docs").returncode == 0
    assert _check(root, "--check").returncode == 0


def test_an_unknown_table_name_fails_the_check(tmp_path: Path) -> None:
    root = _copy_docs(tmp_path / "repo")
    (root / "docs" / "unknown.md").write_text("<!-- table: no_such_table -->\n\n<!-- /table -->\n")
    proc = _check(root, "--check")
    assert proc.returncode != 0
    assert "unknown.md" in proc.stderr and "'no_such_table'" in proc.stderr
