"""Progress that tells the truth on a terminal and in a log.

``progress(total, desc, unit)`` is a tqdm bar when stderr is a terminal, and otherwise (Prefect, CI,
``tee``, ``dvc repro`` under a pipe) a :class:`LineProgress` that writes one plain line at each
10% of the total (at most one per 15 s; nothing for a bar that ends within seconds), instead of
hundreds of carriage-return fragments. Both take
``update(n)``, ``set_postfix(**values)`` and ``close()``. ``note(text)`` writes one line to stderr
(epoch summaries, start/done lines) when progress is on.
"""

from __future__ import annotations

import sys
import time
from typing import Any


def _human(n: float) -> str:
    for unit, size in (("M", 1e6), ("k", 1e3)):
        if abs(n) >= size:
            return f"{n / size:.2f}{unit}"
    return f"{n:.0f}"


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m:02d}:{s:02d}"


class LineProgress:
    """One line per 10% of ``total``, at most one per ``min_interval`` seconds, and one at the end
    when the whole took at least that long: done/total, rate, elapsed, ETA, postfix. A bar that ends
    within seconds (a fast epoch, followed by its summary line) writes nothing."""

    min_interval = 15.0

    def __init__(self, total: int, desc: str, unit: str, initial: int = 0, stream: Any = None) -> None:
        self.total, self.desc, self.unit = max(int(total), 0), desc, unit
        self.n = self.start_n = int(initial)
        self.stream = stream or sys.stderr
        self.t0 = self.last_line = time.perf_counter()
        self.postfix: dict[str, Any] = {}
        self.next_tenth = self._tenth(self.n) + 1
        self.closed = False

    def _tenth(self, n: int) -> int:
        return (10 * n) // self.total if self.total else 10

    def _line(self) -> str:
        elapsed = time.perf_counter() - self.t0
        rate = (self.n - self.start_n) / elapsed if elapsed > 0 else 0.0
        pct = f"{100 * self.n / self.total:3.0f}%" if self.total else ""
        eta = f", ETA {_duration((self.total - self.n) / rate)}" if rate > 0 and self.total and self.n < self.total else ""
        extra = "".join(f", {k} {v}" for k, v in self.postfix.items())
        return (f"{self.desc}: {pct} {_human(self.n)}/{_human(self.total)} {self.unit}s, "
                f"{_human(rate)} {self.unit}s/s, {_duration(elapsed)} elapsed{eta}{extra}")

    def update(self, n: int = 1) -> None:
        self.n += int(n)
        if self.total and self._tenth(self.n) >= self.next_tenth and self.n < self.total:
            self.next_tenth = self._tenth(self.n) + 1
            now = time.perf_counter()
            if now - self.last_line >= self.min_interval:
                self.last_line = now
                print(self._line(), file=self.stream, flush=True)

    def set_postfix(self, refresh: bool = False, **values: Any) -> None:
        self.postfix = values

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            if time.perf_counter() - self.t0 >= self.min_interval:
                print(self._line(), file=self.stream, flush=True)


class _Off:
    def update(self, n: int = 1) -> None:
        pass

    def set_postfix(self, refresh: bool = False, **values: Any) -> None:
        pass

    def close(self) -> None:
        pass


def progress(total: int, desc: str, unit: str = "it", *, initial: int = 0, enabled: bool = True) -> Any:
    """A bar (terminal), ten lines (anything else), or nothing (``enabled=False``)."""
    if not enabled:
        return _Off()
    if sys.stderr.isatty():
        from tqdm import tqdm

        return tqdm(total=total, initial=initial, desc=desc, unit=unit, unit_scale=True, leave=False,
                    dynamic_ncols=True, smoothing=0.1)
    return LineProgress(total, desc, unit, initial)


def note(text: str, enabled: bool = True) -> None:
    """One line on stderr (kept on a terminal too: tqdm bars above are cleared with leave=False)."""
    if enabled:
        print(text, file=sys.stderr, flush=True)


def quiet_transformers() -> None:
    """Turn off transformers' own bars ("Loading weights", "Writing model shards") where stderr is not
    a terminal: in a log each is a line of carriage-return fragments."""
    if not sys.stderr.isatty():
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
