"""Dataset sources: each turns its raw files into the common ``samples`` table.

``SOURCES`` maps ``data.dataset`` names to modules with ``INFO`` (fields, files, downloads) and
``load(con, raw_dir, cfg)``. A user's own log is the ``csv`` source; ``synthetic`` generates data.
"""

from __future__ import annotations

import importlib
from types import ModuleType

_MODULES = {
    "movielens-1m": "movielens",
    "bookcrossing": "bookcrossing",
    "goodreads": "goodreads",
    "csv": "csv",
    "synthetic": "synthetic",
}
NAMES = tuple(_MODULES)


def get_source(name: str) -> ModuleType:
    """The source module for ``data.dataset``."""
    if name not in _MODULES:
        from flip.errors import FlipError

        raise FlipError(f"unknown dataset {name!r}; choose one of: {', '.join(NAMES)} (data.dataset in params.yaml)")
    return importlib.import_module(f"flip.data.sources.{_MODULES[name]}")
