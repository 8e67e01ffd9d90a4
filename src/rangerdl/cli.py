"""The ``rangerdl`` command line: ``main(argv) -> int``.

Each subcommand lives with the code it drives and registers itself here; heavy imports (torch,
numpy) happen only when a subcommand runs, so ``rangerdl --help`` is instant.
"""

from __future__ import annotations

import argparse
import faulthandler
import logging
import os
import sys
from collections.abc import Sequence

from rangerdl import __version__
from rangerdl._fileio import DiskFullError


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="rangerdl",
        description="Ranger optimizer, distributed Lookahead training and memory-mapped datasets.",
    )
    parser.add_argument("--version", action="version", version=f"rangerdl {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    from rangerdl.data import commands as data_commands
    from rangerdl.distributed import commands as distributed_commands
    from rangerdl.train import commands as train_commands
    from rangerdl.workflow import commands as workflow_commands

    train_commands.register(sub)
    data_commands.register(sub)
    workflow_commands.register(sub)
    distributed_commands.register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(list(sys.argv[1:] if argv is None else argv))
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(levelname)s %(name)s: %(message)s",
    )
    if args.command is None:
        parser.print_help()
        return 2
    if extra and not getattr(args, "accepts_extra", False):
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    # A fatal signal (SIGBUS from a segment file truncated under its map, SIGSEGV) prints the
    # Python stack instead of a bare "Bus error".
    if not faulthandler.is_enabled():
        faulthandler.enable()
    try:
        return int(args.run(args, extra) or 0)
    except BrokenPipeError:  # `rangerdl plan ... | head`: the reader left; no traceback
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141  # 128 + SIGPIPE, as a shell reports it
    except (ValueError, FileNotFoundError, DiskFullError) as exc:
        print(f"rangerdl {args.command}: error: {exc}", file=sys.stderr)
        return 1
