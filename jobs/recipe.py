"""The command lines that made a checkpoint, kept beside it so that its model card can show them."""

from __future__ import annotations

import sys
from pathlib import Path


def command_line(module: str, earlier: Path | None = None) -> str:
    """This run's command line, after the lines recorded in `earlier` when that file exists: a stage
    that starts from another stage's checkpoint keeps the whole recipe, one line per stage."""
    line = " ".join([f"python -m {module}", *sys.argv[1:]])
    if earlier is not None and earlier.exists():
        return earlier.read_text().strip() + "\n" + line
    return line
