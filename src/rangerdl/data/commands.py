"""``rangerdl data prepare KIND --out DIR [options]`` and ``rangerdl data inspect DIR``.

Registering the parsers imports nothing heavy; numpy and torch load when a command runs. Options
not given on the command line are not passed, so ``prepare``'s own defaults apply (the help texts
quote them; a test keeps the two in step).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

__all__ = ["OPTIONS", "register"]

# kind -> [(flags, dest, argparse kwargs, default quoted in the help)]
_Option = tuple[tuple[str, ...], str, dict[str, Any], Any]
_SEED: _Option = (("--seed",), "seed", {"type": int, "help": "split/generator seed"}, 0)
OPTIONS: dict[str, list[_Option]] = {
    "digits": [
        (("--test-fraction",), "test_fraction", {"type": float, "help": "test split"}, 0.2),
        _SEED,
    ],
    "text": [
        (
            ("--source",),
            "sources",
            {
                "nargs": "+",
                "action": "extend",
                "metavar": "PATH",
                "help": "text files, directories or globs (default: this Python's Lib/**/*.py)",
            },
            None,
        ),
        (("--seq-len",), "seq_len", {"type": int, "help": "tokens per sample"}, 256),
        (("--val-fraction",), "val_fraction", {"type": float, "help": "files for val"}, 0.05),
        (("--test-fraction",), "test_fraction", {"type": float, "help": "files for test"}, 0.05),
        _SEED,
    ],
    "arrays": [
        (
            ("--x",),
            "x",
            {"required": True, "metavar": "FILE", "help": "features .npy/.npz/.csv"},
            None,
        ),
        (("--y",), "y", {"metavar": "FILE", "help": "labels .npy/.npz/.csv"}, None),
        (
            ("--label-column",),
            "label_column",
            {"metavar": "COL", "help": "label column (name or 0-based index) of a CSV --x"},
            None,
        ),
        (("--test-fraction",), "test_fraction", {"type": float, "help": "test split"}, 0.2),
        (
            ("--task",),
            "task",
            {"choices": ["classification", "regression"], "help": "default: guessed from labels"},
            None,
        ),
        (
            ("--drop-nonfinite",),
            "drop_nonfinite",
            {"action": "store_true", "help": "drop samples holding NaN or inf instead of failing"},
            False,
        ),
        (
            ("--standardize",),
            "standardize",
            {
                "action": argparse.BooleanOptionalAction,
                "help": "scale each feature to mean 0, std 1 with the train split's statistics "
                "(stored in the metadata, applied to every split; default: on for float "
                "features with one vector per sample, CSV included; off for integer features "
                "and multi-dimensional samples)",
            },
            None,
        ),
        _SEED,
    ],
    "synthetic": [
        (("--samples",), "samples", {"type": int, "required": True, "help": "total samples"}, None),
        (
            ("--shape",),
            "shape",
            {"type": int, "nargs": "+", "metavar": "D", "help": "per-sample shape"},
            (3, 32, 32),
        ),
        (("--num-classes",), "num_classes", {"type": int, "help": "classes"}, 10),
        (
            ("--dtype",),
            "dtype",
            {"choices": ["float32", "float16", "uint8"], "help": "x dtype"},
            "float32",
        ),
        (("--test-fraction",), "test_fraction", {"type": float, "help": "test split"}, 0.1),
        _SEED,
    ],
}
_SUMMARY = {
    "digits": "scikit-learn's bundled 8x8 digits (classification, no download)",
    "text": "byte-level language modelling over text files (default: the Python stdlib)",
    "arrays": "your features and labels from .npy, .npz or .csv",
    "synthetic": "Gaussian clusters of any size and shape (memory and speed tests)",
}


def register(sub: Any) -> None:
    """Add ``data`` (with ``prepare KIND`` and ``inspect``) to the top-level subparsers."""
    data = sub.add_parser("data", help="prepare and inspect datasets")
    data.set_defaults(run=_usage(data))
    actions = data.add_subparsers(dest="data_command", metavar="ACTION")

    prepare = actions.add_parser(
        "prepare",
        help="build a dataset directory (train/, test/, ...) from a source",
        description="Build DIR/train, DIR/test (and DIR/val for text) from a built-in source.",
    )
    prepare.set_defaults(run=_usage(prepare))
    kinds = prepare.add_subparsers(dest="kind", metavar="KIND")
    for kind, options in OPTIONS.items():
        parser = kinds.add_parser(kind, help=_SUMMARY[kind], description=_SUMMARY[kind])
        parser.add_argument(
            "--out", required=True, type=Path, metavar="DIR", help="output directory"
        )
        for flags, dest, kwargs, default in options:
            help_text = kwargs.get("help", "")
            if default is not None and default is not False:
                shown = " ".join(map(str, default)) if isinstance(default, tuple) else default
                help_text = f"{help_text} (default: {shown})"
            parser.add_argument(
                *flags, dest=dest, default=argparse.SUPPRESS, **{**kwargs, "help": help_text}
            )
        parser.add_argument(
            "--segment-mb", type=int, default=512, help="segment size bound in MiB (default: 512)"
        )
        parser.add_argument(
            "--overwrite", action="store_true", help="replace an existing prepared DIR"
        )
        parser.set_defaults(run=_run_prepare, option_dests=[o[1] for o in options])

    inspect = actions.add_parser(
        "inspect",
        help="print a dataset's manifest summary and verify its files",
        description="Summarise DIR (a dataset, or a prepared directory of splits) and verify "
        "every file (sizes, dtypes, shapes and sha256); exit 1 with the reason on damage.",
    )
    inspect.add_argument("dir", type=Path, metavar="DIR")
    inspect.add_argument(
        "--quick", action="store_true", help="check sizes, dtypes and shapes only (no sha256)"
    )
    inspect.set_defaults(run=_run_inspect)


def _usage(parser: argparse.ArgumentParser) -> Any:
    def run(args: argparse.Namespace, extra: list[str]) -> int:
        parser.print_help()
        return 2

    return run


def prepare_options(args: argparse.Namespace) -> dict[str, Any]:
    """The ``prepare`` keyword options given on the command line (others keep their defaults)."""
    options = {dest: getattr(args, dest) for dest in args.option_dests if hasattr(args, dest)}
    if "shape" in options:
        options["shape"] = tuple(options["shape"])
    if args.segment_mb < 1:
        raise ValueError(f"--segment-mb must be >= 1, got {args.segment_mb}")
    return options


def _run_prepare(args: argparse.Namespace, extra: list[str]) -> int:
    from rangerdl.data.dataset import open_splits
    from rangerdl.data.sources import prepare

    out = prepare(
        args.kind,
        args.out,
        overwrite=args.overwrite,
        segment_bytes=args.segment_mb << 20,
        **prepare_options(args),
    )
    # The writer has just hashed every file: check sizes only.
    metadata: dict[str, Any] = {}
    for name, ds in open_splits(out, verify="sizes").items():
        metadata = metadata or ds.metadata
        dropped = ds.metadata.get("dropped_nonfinite_rows")
        note = f" ({dropped} samples with NaN or inf dropped before the split)" if dropped else ""
        print(
            f"{out / name}: {len(ds)} samples, {ds.nbytes / 2**20:.1f} MiB, "
            f"checksum {ds.checksum[:16]}{note}"
        )
        ds.close()
    if "standardize" in metadata:
        print(_standardize_note(metadata["standardize"]))
    return 0


def _standardize_note(stats: dict[str, Any] | None) -> str:
    """What ``prepare arrays`` did to the features."""
    if stats is None:
        return "features stored as given, not standardised (--standardize to standardise)"
    return (
        "features standardised with the train split's statistics, (x - mean) / std, in every "
        f"split (--no-standardize to keep them raw); metadata 'standardize':\n"
        f"  mean {_short(stats['mean'], 100)}\n  std  {_short(stats['std'], 100)}"
    )


def _run_inspect(args: argparse.Namespace, extra: list[str]) -> int:
    from rangerdl.data.dataset import SegmentedDataset
    from rangerdl.data.manifest import MANIFEST_NAME, split_order

    root: Path = args.dir
    if (root / MANIFEST_NAME).is_file() or not root.is_dir():
        paths = [root]
    else:
        paths = sorted(
            (p for p in root.iterdir() if (p / MANIFEST_NAME).is_file()),
            key=lambda p: split_order(p.name),
        )
        if not paths:
            raise FileNotFoundError(
                f"{root / MANIFEST_NAME} not found, nor any split directory holding one: not a "
                "rangerdl dataset, or its write did not finish"
            )
    verify = "sizes" if args.quick else "checksum"
    for path in paths:
        ds = SegmentedDataset(path, verify=verify)
        print(describe(ds, verify))
    return 0


def describe(ds: Any, verify: str) -> str:
    """A few lines summarising an opened ``SegmentedDataset``."""
    manifest = ds.manifest
    fields = "; ".join(
        f"{name} {dtype} {tuple(shape)}" for name, (dtype, shape) in ds.fields.items()
    )
    kind = ds.kind if ds.kind == "rows" else f"tokens, windows of seq_len {ds.seq_len}"
    rows = f" from {manifest.num_rows} tokens" if ds.kind == "tokens" else ""
    meta = ", ".join(f"{k}={_short(v)}" for k, v in ds.metadata.items())
    num_files = sum(len(s.files) for s in manifest.segments)
    checked = (
        "sizes, dtypes, shapes and sha256" if verify == "checksum" else "sizes, dtypes, shapes"
    )
    return "\n".join(
        [
            f"{ds.path}",
            f"  format    {manifest.raw['format']} v{manifest.raw['version']}, kind {kind}",
            f"  samples   {len(ds)}{rows} in {ds.num_segments} segment(s), {ds.nbytes / 2**20:.2f} MiB",
            f"  fields    {fields}",
            f"  metadata  {meta}",
            f"  checksum  {ds.checksum}",
            f"  verified  {num_files} file(s): {checked} OK",
        ]
    )


def _short(value: Any, width: int = 60) -> str:
    text = json.dumps(value)
    return text if len(text) <= width else text[: width - 3] + "..."
