"""What every command shares about output: the consoles, progress bars and log set-up, and
keeping the model libraries' own notices and bars out of a command's output."""

from __future__ import annotations

import logging
import os

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

__all__ = [
    "console",
    "log_at",
    "progress_bars",
    "progress_console",
    "quiet_model_libraries",
    "quiet_pipeline_loading",
    "say",
]

console = Console()
# Progress goes to standard error, so that standard output holds only the results.
progress_console = Console(stderr=True)


def log_at(level: str) -> None:
    logging.basicConfig(
        level=level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )


def quiet_model_libraries() -> None:
    """Model libraries' notices and progress bars, which would bury a command's own output;
    set before they are imported, and inherited by the worker processes a command starts."""
    for variable, value in (
        ("TRANSFORMERS_VERBOSITY", "error"),
        ("DIFFUSERS_VERBOSITY", "error"),
        ("HF_HUB_DISABLE_PROGRESS_BARS", "1"),
    ):
        os.environ.setdefault(variable, value)


def quiet_pipeline_loading() -> None:
    """diffusers' "Loading pipeline components" bars, which no environment variable turns
    off (in a worker, Celery would log every refresh of them as a warning)."""
    from diffusers.utils import logging as diffusers_logging

    diffusers_logging.disable_progress_bar()


def say(text: str) -> None:
    """A line of output as it is: no markup, and a long path kept on one line."""
    console.print(text, markup=False, highlight=False, soft_wrap=True)


def progress_bars() -> Progress:
    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=progress_console,
    )
