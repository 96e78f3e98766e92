"""ID tensors: int32, read row group by row group, memory-mapped beyond a budget."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import torch

from flip.data.tensors import field_names, host_array, load_meta, load_tabular


def test_host_array_beyond_the_budget_is_an_unlinked_mapped_file():
    before = set(os.listdir(tempfile.gettempdir()))
    small = host_array((10, 3), np.int32, budget_bytes=1 << 20)
    assert small.flags.owndata  # within the budget: plain memory
    big = host_array((1000, 3), np.int32, budget_bytes=1000)
    assert not big.flags.owndata and big.flags.writeable
    big[:] = 7
    assert int(big.sum()) == 7 * 3000
    maps = Path("/proc/self/maps").read_text() if Path("/proc/self/maps").exists() else ""
    if maps:
        assert any("flip-tensor-" in line and "(deleted)" in line for line in maps.splitlines())
    # nothing is left in the temporary folder, even while the array lives
    assert not [n for n in set(os.listdir(tempfile.gettempdir())) - before if n.startswith("flip-tensor-")]


def test_load_tabular_reads_every_row_group_the_same_way_with_or_without_a_budget(synthetic_data, tmp_path):
    data = Path(shutil.copytree(synthetic_data(3000), tmp_path / "ds"))
    # several row groups: rewrite train.parquet in groups of 700 rows
    table = pq.read_table(data / "train.parquet")
    pq.write_table(table, data / "train.parquet", row_group_size=700)
    assert pq.ParquetFile(data / "train.parquet").metadata.num_row_groups > 1
    names = field_names(load_meta(data))
    want_x = np.stack([table.column(n).to_numpy() for n in names], axis=1)
    want_y = table.column("label").to_numpy().astype(np.float32)
    plain = load_tabular(data, "train")
    mapped = load_tabular(data, "train", budget_bytes=1024)
    head = load_tabular(data, "train", max_rows=1000, budget_bytes=1024)
    assert plain.x.dtype == torch.int32 and plain.x.shape == want_x.shape
    np.testing.assert_array_equal(plain.x.numpy(), want_x)
    np.testing.assert_array_equal(mapped.x.numpy(), want_x)
    np.testing.assert_array_equal(plain.y.numpy(), want_y)
    np.testing.assert_array_equal(head.x.numpy(), want_x[:1000])
    np.testing.assert_array_equal(head.y.numpy(), want_y[:1000])
