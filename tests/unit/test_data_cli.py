"""``rangerdl data prepare`` / ``rangerdl data inspect`` as a user runs them."""

from __future__ import annotations

import inspect
import subprocess
import sys
from pathlib import Path

import pytest

from rangerdl.cli import main
from rangerdl.data import SegmentedDataset
from rangerdl.data.commands import OPTIONS
from rangerdl.data.sources import SOURCES


def test_prepare_then_inspect(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "digits"
    assert main(["data", "prepare", "digits", "--out", str(out), "--test-fraction", "0.5"]) == 0
    printed = capsys.readouterr().out
    assert f"{out / 'train'}: 899 samples" in printed and f"{out / 'test'}: 898 samples" in printed
    assert main(["data", "inspect", str(out / "train")]) == 0
    report = capsys.readouterr().out
    checksum = SegmentedDataset(out / "train").checksum
    assert f"checksum  {checksum}" in report
    assert "x float32 (1, 8, 8); y int64 ()" in report
    assert "sizes, dtypes, shapes and sha256 OK" in report
    assert main(["data", "inspect", str(out), "--quick"]) == 0
    both = capsys.readouterr().out
    assert both.index(str(out / "train")) < both.index(str(out / "test"))


def test_inspect_reports_damage_with_exit_1(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "syn"
    assert (
        main(
            [
                "data",
                "prepare",
                "synthetic",
                "--out",
                str(out),
                "--samples",
                "64",
                "--shape",
                "4",
                "2",
            ]
        )
        == 0
    )
    capsys.readouterr()
    victim = next((out / "test").glob("*.x.npy"))
    data = bytearray(victim.read_bytes())
    data[-1] ^= 1
    victim.write_bytes(bytes(data))
    assert main(["data", "inspect", str(out)]) == 1
    err = capsys.readouterr().err
    assert err.startswith("rangerdl data: error: ") and victim.name in err and "sha256" in err
    assert main(["data", "inspect", str(out), "--quick"]) == 0  # sizes still match
    victim.unlink()
    capsys.readouterr()
    assert main(["data", "inspect", str(out / "test")]) == 1
    assert "segment file is missing" in capsys.readouterr().err
    assert main(["data", "inspect", str(tmp_path / "missing")]) == 1
    assert "does not exist" in capsys.readouterr().err


def test_prepare_passes_only_given_options(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "s"
    args = [
        "data",
        "prepare",
        "synthetic",
        "--out",
        str(out),
        "--samples",
        "30",
        "--shape",
        "2",
        "3",
    ]
    assert main([*args, "--num-classes", "3", "--segment-mb", "1"]) == 0
    meta = SegmentedDataset(out / "train").metadata
    assert meta["input_shape"] == [2, 3] and meta["num_classes"] == 3
    assert main(args) == 1  # exists
    assert "--overwrite" in capsys.readouterr().err
    assert main([*args, "--overwrite", "--test-fraction", "0.5"]) == 0
    assert len(SegmentedDataset(out / "train")) == 15


def test_help_defaults_are_the_python_defaults() -> None:
    for kind, options in OPTIONS.items():
        parameters = inspect.signature(SOURCES[kind]).parameters
        accepted = {name for name, p in parameters.items() if p.kind is p.KEYWORD_ONLY} - {
            "segment_bytes"
        }
        assert {dest for _, dest, _, _ in options} == accepted, kind
        for _, dest, _, shown in options:
            default = parameters[dest].default
            if default is not inspect.Parameter.empty:
                assert shown == default, (kind, dest)


def test_bare_data_command_prints_usage(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["data"]) == 2
    assert "prepare" in capsys.readouterr().out
    assert main(["data", "prepare"]) == 2
    assert "synthetic" in capsys.readouterr().out


def test_importing_data_and_cli_loads_neither_numpy_nor_torch() -> None:
    code = (
        "import sys, rangerdl.data, rangerdl.data.commands, rangerdl.cli\n"
        "rangerdl.cli.build_parser()\n"
        "print(sorted(m for m in ('numpy', 'torch') if m in sys.modules))"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]"
