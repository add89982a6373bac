"""Logging set-up and progress bars. Library code logs through ``logging``; it never prints."""

from __future__ import annotations

import logging
from typing import Iterable, TypeVar

from tqdm import tqdm

T = TypeVar("T")


def setup_logging(level: str = "INFO") -> None:
    """Configure the root logger once for the command line (stderr, one line per record)."""
    logging.basicConfig(
        level=getattr(logging, level.upper(), logging.INFO),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        force=True,
    )


def progress(iterable: Iterable[T], desc: str, total: int | None = None, unit: str = "it") -> Iterable[T]:
    """Wrap ``iterable`` in a tqdm bar that turns itself off when stderr is not a terminal."""
    return tqdm(iterable, desc=desc, total=total, unit=unit, disable=None, leave=False)
