"""Errors a user can act on: each names the file, the row, the column and the fix."""

from __future__ import annotations


class FlipError(Exception):
    """Base class for errors the CLI reports as one paragraph and a non-zero exit."""


class DataError(FlipError):
    """Bad input data. The message is one paragraph: where (file, row, column), what, and the fix."""

    def __init__(
        self,
        problem: str,
        *,
        file: str | None = None,
        row: int | None = None,
        column: str | None = None,
        value: object = None,
        fix: str = "",
    ) -> None:
        self.file, self.row, self.column, self.value, self.fix = file, row, column, value, fix
        where = []
        if file is not None:
            where.append(f"file {file}")
        if row is not None:
            where.append(f"row {row}")
        if column is not None:
            where.append(f"column {column!r}")
        text = (", ".join(where) + ": " if where else "") + problem
        if value is not None:
            shown = repr(value)
            text += f" (found {shown[:120]}{'...' if len(shown) > 120 else ''})"
        if not text.endswith("."):
            text += "."
        if fix:
            text += f" Fix: {fix}"
        super().__init__(text)


class SettingError(FlipError, ValueError):
    """A setting whose value the code cannot use (an unknown strategy, model, optimizer, ...): one
    paragraph naming the key, the valid values and the fix. Also a ValueError, for library callers."""


class TransientError(DataError):
    """A failure a retry may fix (a download refused or timed out). The CLI exits 75 (EX_TEMPFAIL)
    instead of 2, so the retrain flow retries the stage, which it never does for bad input (exit 2)."""

    exit_code = 75
