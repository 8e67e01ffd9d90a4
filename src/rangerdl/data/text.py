"""The ``text`` source: byte-level tokens (vocab 256) of text files, split by file.

The default source is the running interpreter's standard library (``Lib/**/*.py``, tens of MB of
real text on every machine with Python; site-packages excluded).
"""

from __future__ import annotations

import glob
import os
import sysconfig
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np

from rangerdl._fileio import check_free_space
from rangerdl.data.splits import HEADROOM_BYTES, check_fraction, check_positive_int
from rangerdl.data.writer import DEFAULT_SEGMENT_BYTES, SegmentWriter

__all__ = ["default_text_sources", "prepare_text"]

_READ_BYTES = 16 << 20


def default_text_sources() -> tuple[Path, list[Path]]:
    """The running interpreter's standard library ``.py`` files (site-/dist-packages excluded)."""
    root = Path(sysconfig.get_paths()["stdlib"])
    if not root.is_dir():
        raise FileNotFoundError(f"the standard library directory {root} does not exist")
    skip = {"site-packages", "dist-packages", "__pycache__"}
    files = [
        p
        for p in root.rglob("*.py")
        if p.is_file() and not skip.intersection(p.relative_to(root).parts)
    ]
    if not files:
        raise FileNotFoundError(f"no .py files under {root}")
    return root, files


def _text_sources(sources: Sequence[str | os.PathLike[str]]) -> tuple[Path, list[Path]]:
    files: dict[Path, None] = {}
    for source in sources:
        text = os.fspath(source)
        path = Path(text)
        if path.is_dir():
            matched = [p for p in path.rglob("*") if p.is_file()]
        elif path.is_file():
            matched = [path]
        elif glob.has_magic(text):
            matched = [Path(p) for p in glob.glob(text, recursive=True) if Path(p).is_file()]
        else:
            raise FileNotFoundError(f"text source {text} does not exist")
        if not matched:
            raise FileNotFoundError(f"text source {text} matches no files")
        files.update(dict.fromkeys(p.resolve() for p in matched))
    paths = list(files)
    root = Path(os.path.commonpath([p.parent for p in paths]))
    return root, paths


def prepare_text(
    out: Path,
    *,
    segment_bytes: int = DEFAULT_SEGMENT_BYTES,
    sources: Sequence[str | os.PathLike[str]] | None = None,
    seq_len: int = 256,
    val_fraction: float = 0.05,
    test_fraction: float = 0.05,
    seed: int = 0,
) -> None:
    """Byte-level tokens (vocab 256) of text files, as windows of ``seq_len``; split by file.

    Files are ordered by path relative to their common directory; a permutation from ``seed``
    picks ``round(n * fraction)`` files (at least one when the fraction is positive) for val and
    test, so no file contributes to two splits. Each split is its files' bytes back to back.

    Args:
        out: directory to write ``train/``, ``val/``, ``test/`` into.
        segment_bytes: segment size bound.
        sources: files, directories (recursive) or glob patterns; None for the standard library.
        seq_len: tokens per sample (``x`` and ``y`` each hold ``seq_len``).
        val_fraction: fraction of files for validation.
        test_fraction: fraction of files for test.
        seed: file-assignment seed.
    """
    check_positive_int("seq_len", seq_len)
    check_fraction("val_fraction", val_fraction)
    check_fraction("test_fraction", test_fraction)
    if sources is None:
        root, files = default_text_sources()
        description = f"python {sysconfig.get_python_version()} standard library {root}/**/*.py"
    else:
        if isinstance(sources, (str, os.PathLike)):
            sources = [sources]
        root, files = _text_sources(sources)
        description = ", ".join(os.fspath(s) for s in sources)
    files.sort(key=lambda p: p.relative_to(root).as_posix())
    splits = _assign_files(files, val_fraction, test_fraction, seed)
    for split, split_files in splits.items():
        num_bytes = sum(p.stat().st_size for p in split_files)
        if num_bytes < seq_len + 1:
            raise ValueError(
                f"text split {split!r}: its {len(split_files)} file(s) hold {num_bytes} bytes, "
                f"fewer than seq_len + 1 = {seq_len + 1}; use a smaller seq_len or more files"
            )
    total = sum(p.stat().st_size for p in files)
    check_free_space(out, total + HEADROOM_BYTES, f"{total} bytes of text")
    for split, split_files in splits.items():
        metadata = {
            "task": "lm",
            "vocab_size": 256,
            "seq_len": seq_len,
            "tokenizer": "bytes",
            "source": description,
            "num_files": len(split_files),
            "split": {"val_fraction": val_fraction, "test_fraction": test_fraction, "seed": seed},
            "split_name": split,
        }
        with SegmentWriter(
            out / split,
            {"tokens": ("uint8", ())},
            kind="tokens",
            seq_len=seq_len,
            segment_bytes=segment_bytes,
            metadata=metadata,
        ) as writer:
            for data in _read_files(split_files):
                writer.append(tokens=np.frombuffer(data, np.uint8))


def _assign_files(
    files: list[Path], val_fraction: float, test_fraction: float, seed: int
) -> dict[str, list[Path]]:
    """Non-empty splits of ``files`` (each in ``files`` order), drawn by a seeded permutation."""
    counts = {
        "val": 0 if val_fraction == 0 else max(1, round(len(files) * val_fraction)),
        "test": 0 if test_fraction == 0 else max(1, round(len(files) * test_fraction)),
    }
    if len(files) - counts["val"] - counts["test"] < 1:
        raise ValueError(
            f"{len(files)} file(s) cannot be split by file into train, val ({counts['val']}) and "
            f"test ({counts['test']}); give more files, or val_fraction=0 and test_fraction=0"
        )
    chosen = np.random.default_rng(seed).permutation(len(files)).tolist()
    num_val, num_held = counts["val"], counts["val"] + counts["test"]
    picks = {"train": chosen[num_held:], "val": chosen[:num_val], "test": chosen[num_val:num_held]}
    return {name: [files[i] for i in sorted(idx)] for name, idx in picks.items() if idx}


def _read_files(files: Sequence[Path]) -> Iterator[bytes]:
    for path in files:
        with open(path, "rb") as fh:
            while data := fh.read(_READ_BYTES):
                yield data
