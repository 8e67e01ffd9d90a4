"""``rangerdl data ...`` subcommands (built by issue #3)."""

from __future__ import annotations

import argparse
from typing import Any


def register(sub: Any) -> None:
    parser = sub.add_parser("data", help="prepare and inspect datasets")
    parser.set_defaults(run=_not_yet)


def _not_yet(args: argparse.Namespace, extra: list[str]) -> int:
    raise ValueError("'rangerdl data' is not implemented yet")
