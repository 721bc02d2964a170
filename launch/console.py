"""Terminal output shared by the commands: a stderr console, progress bars, logging."""

from __future__ import annotations

import json
import logging
from pathlib import Path

from rich.console import Console
from rich.logging import RichHandler
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

console = Console(stderr=True)
"""Progress, tables and messages go to stderr; stdout stays free for data."""


def setup_logging(debug: bool) -> None:
    logging.basicConfig(level=logging.DEBUG if debug else logging.WARNING, format="%(message)s",
                        handlers=[RichHandler(console=console, show_path=debug)])


def progress() -> Progress:
    """A progress bar with count, elapsed and remaining time."""
    return Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                    TextColumn("eta"), TimeRemainingColumn(), console=console)


def write_json(path: Path | None, data: dict) -> None:
    """Write a command's result file (if asked for), creating its folder."""
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(data, indent=2))
