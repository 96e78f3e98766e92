"""Processed Parquet -> in-memory tensors, loaded once; batches are index slices, no per-row Python.

Imports only torch, pyarrow and the standard library so that training runs on a bare GPU machine.

The processed dataset directory (written by ``flip preprocess``) holds ``{train,valid,test}.parquet``
and ``meta.json``. Each split has one int32 column per field (global feature ids: 0 = padding,
1 = the shared ``[MASK]`` feature, then per field ``offset`` = that field's OOV id and
``offset+1 .. offset+size-1`` its training-split values), ``label`` (0/1), ``timestamp``, ``row``
(position in the global time order), ``text`` and the character spans ``span_start``/``span_end``
of every field's value inside ``text``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import torch

SPLITS = ("train", "valid", "test")


def load_meta(dataset_dir: str | Path) -> dict[str, Any]:
    path = Path(dataset_dir) / "meta.json"
    if not path.exists():
        from flip.errors import FlipError

        raise FlipError(f"{dataset_dir} is not a processed dataset (no meta.json). Fix: run `flip preprocess` "
                        "(or `dvc repro preprocess`) first, or pass the folder it wrote with --data")
    with open(path, encoding="utf-8") as fh:
        return json.load(fh)


def field_names(meta: dict[str, Any]) -> list[str]:
    return [f["name"] for f in meta["fields"]]


def id_like_fields(meta: dict[str, Any]) -> list[str]:
    """Fields whose values are identifiers rather than attributes: the user and item fields, and any
    field with more than max(100, rows/200) training values (zip codes, titles). A chronological
    window always "drifts" on them (new users and items arrive), so they do not count as drift."""
    rows = int(meta["counts"]["train"])
    limit = max(100, rows // 200)
    named = {meta.get("user_field"), meta.get("item_field")}
    return [f["name"] for f in meta["fields"] if f["name"] in named or int(f["train_values"]) > limit]


@dataclass
class TabularSplit:
    """One split as tensors: ``x`` (N, F) int64 global feature ids, ``y`` (N,) float32 labels."""

    x: torch.Tensor
    y: torch.Tensor

    def __len__(self) -> int:
        return self.y.shape[0]

    def to(self, device: torch.device | str) -> "TabularSplit":
        return TabularSplit(self.x.to(device), self.y.to(device))

    def head(self, n: int) -> "TabularSplit":
        return TabularSplit(self.x[:n], self.y[:n]) if 0 < n < len(self) else self

    def tail(self, n: int) -> "TabularSplit":
        """The last ``n`` rows (the most recent ones of a time-ordered split); ``n <= 0``: all."""
        return TabularSplit(self.x[-n:], self.y[-n:]) if 0 < n < len(self) else self


def load_tabular(dataset_dir: str | Path, split: str) -> TabularSplit:
    """Read the field id columns and the label of ``split`` into tensors."""
    meta = load_meta(dataset_dir)
    names = field_names(meta)
    table = pq.read_table(Path(dataset_dir) / f"{split}.parquet", columns=[*names, "label"])
    x = torch.stack([torch.from_numpy(table.column(n).to_numpy().astype("int64")) for n in names], dim=1)
    y = torch.from_numpy(table.column("label").to_numpy().astype("float32"))
    return TabularSplit(x=x, y=y)


def split_rows(dataset_dir: str | Path, split: str) -> int:
    """Rows of ``split`` (from the Parquet footer: nothing else is read)."""
    return int(pq.ParquetFile(Path(dataset_dir) / f"{split}.parquet").metadata.num_rows)


def read_rows(dataset_dir: str | Path, split: str, positions: Any) -> TabularSplit:
    """The rows at ``positions`` (sorted, unique positions in the file: a numpy int64 array) of ``split``,
    in that order. Read one row group at a time, skipping the groups that hold none of them, so that
    memory holds only those rows (and one row group): a rank's share of a split under torchrun."""
    import numpy as np

    meta = load_meta(dataset_dir)
    names = field_names(meta)
    pos = np.asarray(positions, dtype=np.int64)
    pf = pq.ParquetFile(Path(dataset_dir) / f"{split}.parquet")
    xs, ys, start = [], [], 0
    for g in range(pf.metadata.num_row_groups):
        end = start + pf.metadata.row_group(g).num_rows
        lo, hi = np.searchsorted(pos, [start, end])
        if hi > lo:
            table = pf.read_row_group(g, columns=[*names, "label"]).take(pos[lo:hi] - start)
            xs.append(np.stack([table.column(n).to_numpy().astype("int64") for n in names], axis=1))
            ys.append(table.column("label").to_numpy().astype("float32"))
        start = end
    if len(pos) and (pos[0] < 0 or pos[-1] >= start):
        raise IndexError(f"{dataset_dir}/{split}.parquet has {start} rows; asked for row {int(pos[-1])}")
    x = np.concatenate(xs) if xs else np.zeros((0, len(names)), dtype="int64")
    y = np.concatenate(ys) if ys else np.zeros(0, dtype="float32")
    return TabularSplit(x=torch.from_numpy(x), y=torch.from_numpy(y))


def load_text(dataset_dir: str | Path, split: str) -> tuple[list[str], list[list[int]], list[list[int]]]:
    """Texts and per-field character spans (start, end) of ``split``."""
    table = pq.read_table(Path(dataset_dir) / f"{split}.parquet", columns=["text", "span_start", "span_end"])
    return (
        table.column("text").to_pylist(),
        table.column("span_start").to_pylist(),
        table.column("span_end").to_pylist(),
    )


def batches(n: int, batch_size: int, generator: torch.Generator | None = None, shuffle: bool = False):
    """Yield index tensors covering ``range(n)``: a shuffled permutation or contiguous slices."""
    order = torch.randperm(n, generator=generator) if shuffle else torch.arange(n)
    for start in range(0, n, batch_size):
        yield order[start : start + batch_size]
