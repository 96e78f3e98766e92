"""Processed Parquet -> in-memory tensors, loaded once; batches are index slices, no per-row Python.

Imports only torch, numpy, pyarrow and the standard library so that training runs on a bare GPU machine.

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

import numpy as np
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
    """One split as tensors: ``x`` (N, F) int32 global feature ids (batches take ``.long()`` of their
    rows), ``y`` (N,) float32 labels. ``x`` may live in a memory-mapped file (:func:`load_tabular`)."""

    x: torch.Tensor
    y: torch.Tensor

    def __len__(self) -> int:
        return self.y.shape[0]

    @property
    def nbytes(self) -> int:
        return self.x.numel() * self.x.element_size() + self.y.numel() * self.y.element_size()

    def to(self, device: torch.device | str) -> "TabularSplit":
        return TabularSplit(self.x.to(device), self.y.to(device))

    def head(self, n: int) -> "TabularSplit":
        return TabularSplit(self.x[:n], self.y[:n]) if 0 < n < len(self) else self

    def tail(self, n: int) -> "TabularSplit":
        """The last ``n`` rows (the most recent ones of a time-ordered split); ``n <= 0``: all."""
        return TabularSplit(self.x[-n:], self.y[-n:]) if 0 < n < len(self) else self


def host_array(shape: tuple[int, ...], dtype: Any, budget_bytes: int = 0) -> np.ndarray:
    """An uninitialised array of ``shape``: in memory, or, when larger than ``budget_bytes`` (> 0), in a
    memory-mapped file of ``tempfile.gettempdir()`` that is unlinked at once (the mapping keeps it; the
    kernel pages it in and out, and nothing is left behind when the process ends, even by kill -9)."""
    import mmap
    import os
    import tempfile

    dtype = np.dtype(dtype)
    nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if budget_bytes <= 0 or nbytes <= budget_bytes or nbytes == 0:
        return np.empty(shape, dtype)
    fd, name = tempfile.mkstemp(prefix="flip-tensor-", suffix=".bin")
    try:
        os.unlink(name)
        os.ftruncate(fd, nbytes)
        mapped = mmap.mmap(fd, nbytes)
    finally:
        os.close(fd)
    return np.frombuffer(mapped, dtype=dtype).reshape(shape)


def load_tabular(dataset_dir: str | Path, split: str, max_rows: int = 0, budget_bytes: int = 0) -> TabularSplit:
    """The field ids (int32) and labels of ``split``, its first ``max_rows`` rows when > 0. Read one row
    group at a time into the result (memory holds the result and one row group); ids larger than
    ``budget_bytes`` (> 0, ``run.resident_mib``) go to a memory-mapped file (:func:`host_array`)."""
    meta = load_meta(dataset_dir)
    names = field_names(meta)
    pf = pq.ParquetFile(Path(dataset_dir) / f"{split}.parquet")
    total = pf.metadata.num_rows
    n = min(total, max_rows) if max_rows > 0 else total
    x = host_array((n, len(names)), np.int32, budget_bytes)
    y = np.empty(n, np.float32)
    start = 0
    for g in range(pf.metadata.num_row_groups):
        if start >= n:
            break
        table = pf.read_row_group(g, columns=[*names, "label"])
        take = min(table.num_rows, n - start)
        for j, name in enumerate(names):
            x[start:start + take, j] = table.column(name).to_numpy()[:take]
        y[start:start + take] = table.column("label").to_numpy()[:take]
        start += take
        del table
    return TabularSplit(x=torch.from_numpy(x), y=torch.from_numpy(y))


def split_rows(dataset_dir: str | Path, split: str) -> int:
    """Rows of ``split`` (from the Parquet footer: nothing else is read)."""
    return int(pq.ParquetFile(Path(dataset_dir) / f"{split}.parquet").metadata.num_rows)


def read_rows(dataset_dir: str | Path, split: str, positions: Any) -> TabularSplit:
    """The rows at ``positions`` (sorted, unique positions in the file: a numpy int64 array) of ``split``,
    in that order. Read one row group at a time, skipping the groups that hold none of them, so that
    memory holds only those rows (and one row group): a rank's share of a split under torchrun."""
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
            xs.append(np.stack([table.column(n).to_numpy().astype("int32") for n in names], axis=1))
            ys.append(table.column("label").to_numpy().astype("float32"))
        start = end
    if len(pos) and (pos[0] < 0 or pos[-1] >= start):
        raise IndexError(f"{dataset_dir}/{split}.parquet has {start} rows; asked for row {int(pos[-1])}")
    x = np.concatenate(xs) if xs else np.zeros((0, len(names)), dtype="int32")
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
