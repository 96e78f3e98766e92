"""Check that every number in a report comes from the run's own outputs or the paper's tables."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from flip.evaluate.paper import TABLE2, TABLE5_ML1M

# numbers that are part of the fixed wording: Table 2/5, Fig. 5/6, 95% intervals, RecSys '24, §4.6,
# the chance line at 0.5
WORDING = ["Table 2", "Table 5", "Fig. 5", "Fig. 6", "95%", "RecSys '24", "§4.6", "chance (0.5)"]
NUMBER = re.compile(r"(?<![\w.])[-+]?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?(?:e[-+]?\d+)?(?![\w])")


def _spellings(x: Any) -> set[str]:
    if isinstance(x, bool):
        return set()
    if isinstance(x, int):
        return {str(x), f"{x:,}", f"{x:+d}"}
    out = {f"{x:.{d}f}" for d in range(1, 7)} | {f"{x:+.{d}f}" for d in range(1, 7)}
    return out | {f"{x:.2g}", f"{x:g}", repr(x)} | ({str(int(x)), f"{int(x):,}"} if float(x).is_integer() else set())


def allowed_numbers(*sources: Any) -> set[str]:
    """Every spelling of every number (and list length) in the given JSON-like sources."""
    found: set[str] = set()

    def walk(node: Any) -> None:
        if isinstance(node, dict):
            for v in node.values():
                walk(v)
        elif isinstance(node, (list, tuple)):
            found.update(_spellings(len(node)))
            for v in node:
                walk(v)
        elif isinstance(node, (int, float)):
            found.update(_spellings(node))
        elif isinstance(node, str):
            for token in NUMBER.findall(node):  # numbers already inside the run's own strings (bucket names)
                found.add(token)
    for source in sources:
        walk(source)
    return found


def paper_numbers() -> list[Any]:
    return [TABLE2, TABLE5_ML1M]


def untraceable(markdown: str, allowed: set[str]) -> list[tuple[str, str]]:
    """(number, line) for every number of the report that no source holds."""
    missing = []
    for line in markdown.splitlines():
        if line.startswith("#") or line.startswith("![") or line.startswith("| commit |"):
            continue
        text = line
        for phrase in WORDING:
            text = text.replace(phrase, "")
        for token in NUMBER.findall(text):
            if token not in allowed and token.lstrip("+") not in allowed:
                missing.append((token, line[:160]))
    return missing


def read_sources(*paths: Path) -> list[Any]:
    return [json.loads(p.read_text()) for p in paths if p.exists()]
