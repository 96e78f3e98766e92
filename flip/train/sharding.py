"""Under torchrun, each rank reads only its rows of the training split, and N ranks train on the same
global batches as one process.

The loop draws the epoch's permutation of the training rows exactly as a single process does (the
same generator, the same seed), and cuts every global batch of ``batch_size`` rows into contiguous,
balanced per-rank slices (:meth:`flip.train.distributed.DistContext.bounds`). So global batch ``k``
on N ranks is the very set of rows of batch ``k`` of a single-process run at the same (global)
``batch_size``, whatever N is. At the start of each epoch (:meth:`TrainShard.start_epoch`) a rank
works out which rows its slices of that epoch hold, about ``n_train / N`` of them, and reads just
those from ``train.parquet`` (:func:`flip.data.tensors.read_rows`: one row group at a time), never
the whole split; a batch (:meth:`TrainShard.batch`) then looks its slice up in them.

A slice left empty (a last batch with fewer rows than ranks) takes a stand-in row with weight 0, so
that every rank runs a forward and backward pass and DDP's all-reduce never waits on a rank that
skipped one.

Nothing happens at import.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from flip.data.tensors import TabularSplit, read_rows
from flip.train.distributed import DistContext

__all__ = ["TrainShard"]


@dataclass
class TrainShard:
    """This rank's rows of the training split: ``n`` rows, file positions ``start .. start + n - 1`` of
    ``DIR/train.parquet`` (training row ``i`` is file row ``start + i``)."""

    dataset_dir: Path
    start: int
    n: int
    ctx: DistContext
    device: torch.device
    ids: torch.Tensor | None = None  # (m,) sorted training-row indices this rank holds this epoch
    rows: TabularSplit | None = None  # their ids and labels, on the device

    def __len__(self) -> int:
        return self.n

    def local(self, idx: torch.Tensor) -> tuple[torch.Tensor, bool]:
        """This rank's slice of the global batch ``idx`` and whether it is a weight-0 stand-in."""
        lo, hi = self.ctx.bounds(int(idx.shape[0]))
        if hi > lo:
            return idx[lo:hi], False
        return idx[max(0, lo - 1):max(1, lo)], True

    def start_epoch(self, perm: torch.Tensor, batch_size: int) -> None:
        """Read the rows of this rank's slices of every batch of the epoch's permutation ``perm``."""
        bs = int(batch_size)
        mine = [self.local(perm[s:s + bs])[0] for s in range(0, self.n, bs)]
        ids = torch.unique(torch.cat(mine).cpu()) if mine else torch.zeros(0, dtype=torch.long)  # sorted
        if self.ids is not None and torch.equal(ids, self.ids):  # a resumed epoch: the same rows
            return
        self.rows = read_rows(self.dataset_dir, "train", ids.numpy().astype(np.int64) + self.start).to(self.device)
        self.ids = ids.to(self.device)

    def batch(self, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, bool]:
        """``(x, y, stand_in)`` of this rank's slice of the global batch ``idx``."""
        if self.ids is None or self.rows is None:
            raise RuntimeError("TrainShard.batch before start_epoch")
        mine, stand_in = self.local(idx)
        pos = torch.searchsorted(self.ids, mine)
        return self.rows.x.index_select(0, pos), self.rows.y.index_select(0, pos), stand_in
