"""Fixtures for the training tests: a tiny processed dataset with a learnable signal.

The dataset follows the ``flip preprocess`` output contract exactly: ``{train,valid,test}.parquet``
(one int32 column of global ids per field, ``label``, ``timestamp``, ``row``, ``text``,
``span_start``/``span_end``) and ``meta.json``. The click probability is
``sigmoid(2 * a[user] + 2 * b[item] - 0.3)`` with ``a, b ~ N(0, 1)``; the other fields are noise.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from helpers import preset_config

FIELDS = [  # name, title, number of distinct values
    ("user_id", "User", 60),
    ("item_id", "Movie", 50),
    ("gender", "Gender", 2),
    ("age", "Age", 7),
    ("occupation", "Occupation", 12),
]
SPLIT_SIZES = {"train": 3000, "valid": 500, "test": 500}


def write_tiny_dataset(root: Path, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    n = sum(SPLIT_SIZES.values())
    raw = {name: rng.integers(0, size, n) for name, _, size in FIELDS}
    a = rng.normal(size=60)
    b = rng.normal(size=50)
    logit = 2.0 * a[raw["user_id"]] + 2.0 * b[raw["item_id"]] - 0.3
    label = (rng.random(n) < 1.0 / (1.0 + np.exp(-logit))).astype(np.int64)

    meta_fields, offset = [], 2  # 0 = padding, 1 = [MASK]
    for name, title, size in FIELDS:
        meta_fields.append({"name": name, "title": title, "offset": offset, "size": size + 1, "oov_id": offset})
        offset += size + 1
    texts, starts, ends = [], [], []
    for i in range(n):
        parts, s_list, e_list, pos = [], [], [], 0
        for name, title, _ in FIELDS:
            prefix, value = f"{title}: ", f"{name[0]}{raw[name][i]}"
            piece = prefix + value + ". "
            s_list.append(pos + len(prefix))
            e_list.append(pos + len(prefix) + len(value))
            parts.append(piece)
            pos += len(piece)
        texts.append("".join(parts).rstrip())
        starts.append(s_list)
        ends.append(e_list)

    root.mkdir(parents=True, exist_ok=True)
    bounds, lo = {}, 0
    for split, size in SPLIT_SIZES.items():
        bounds[split] = (lo, lo + size)
        lo += size
    for split, (lo, hi) in bounds.items():
        cols = {}
        for f, (name, _, _) in zip(meta_fields, FIELDS):
            cols[name] = pa.array((raw[name][lo:hi] + f["offset"] + 1).astype(np.int32), pa.int32())
        cols["label"] = pa.array(label[lo:hi], pa.int64())
        cols["timestamp"] = pa.array(np.arange(lo, hi, dtype=np.int64) * 60 + 1_000_000_000, pa.int64())
        cols["row"] = pa.array(np.arange(lo, hi, dtype=np.int64), pa.int64())
        cols["text"] = pa.array(texts[lo:hi], pa.string())
        cols["span_start"] = pa.array(starts[lo:hi], pa.list_(pa.int32()))
        cols["span_end"] = pa.array(ends[lo:hi], pa.list_(pa.int32()))
        pq.write_table(pa.table(cols), root / f"{split}.parquet")
    meta = {
        "dataset": "tiny",
        "fields": meta_fields,
        "vocab_size": offset,
        "pad_id": 0,
        "mask_id": 1,
        "user_field": "user_id",
        "item_field": "item_id",
        "counts": {"total": n, **SPLIT_SIZES},
    }
    (root / "meta.json").write_text(json.dumps(meta, indent=2), encoding="utf-8")
    return root


@pytest.fixture(scope="session")
def tiny_dataset(tmp_path_factory) -> Path:
    return write_tiny_dataset(tmp_path_factory.mktemp("data") / "tiny")


@pytest.fixture(autouse=True)
def keep_torch_threads():
    """``run.threads`` sets torch's process-wide thread count: restore it after every test."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def make_config():
    """``make_config(finetune={...}, ...)``: the ``tiny_loop`` preset with the test's sections."""
    return lambda **sections: preset_config("tiny_loop", sections)
