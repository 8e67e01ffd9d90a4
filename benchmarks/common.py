"""What the benchmark scripts share: writing results atomically."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def atomic_write_json(path: Path, payload: Any) -> None:
    """tmp -> fsync -> os.replace, so an interrupted benchmark never leaves half a result file."""
    from rangerdl._fileio import atomic_write_text

    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, json.dumps(payload, indent=1) + "\n")
