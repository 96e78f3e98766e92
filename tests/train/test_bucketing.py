"""Length bucketing (flip.train.bucketing) and the loop's order hook (Task.order_epoch, host_batches).

* bucketing returns a permutation of the same rows whose full batches are of similar length, in a
  random order, the short rest last, and the same one for the same generator state;
* with bucketing off the loop's batches are exactly today's ``randperm`` slices (bit for bit);
* a resumed run re-draws the same bucketed batches (the generator's epoch-start state is checkpointed);
* host widths: ``TokenizedSplit.batch`` of rows given on the CPU equals the device-read trim.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from flip.data.tokens import TokenizedSplit
from flip.train.bucketing import bucket_by_length
from flip.train.callbacks import SimulatedCrash, crash_after
from flip.train.loop import LoopSettings, Task, fit


def lengths_of(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(5, 65, size=n)


def test_bucketing_is_a_permutation_of_similar_length_batches_in_random_order():
    n, bs = 1000, 32
    lengths = lengths_of(n)
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(1))
    out = bucket_by_length(perm, lengths, bs, torch.Generator().manual_seed(2), pool_batches=8)
    assert out.dtype == torch.long and sorted(out.tolist()) == list(range(n))
    width = lambda p: sum(int(lengths[p[i:i + bs].numpy()].max()) for i in range(0, n, bs))  # noqa: E731
    assert width(out) < 0.8 * width(perm)  # padding columns computed: far fewer
    # the rest (n % bs rows) comes last; the full batches are not in pool order (shuffled)
    full = n // bs * bs
    assert set(out[full:].tolist()) <= set(perm[-(n % bs) - 7 * bs:].tolist())  # from the last pool
    firsts = [int(lengths[out[i]]) for i in range(0, full, bs)]
    assert firsts != sorted(firsts, reverse=True)
    # deterministic under the generator's state; another state, another order
    again = bucket_by_length(perm, lengths, bs, torch.Generator().manual_seed(2), pool_batches=8)
    other = bucket_by_length(perm, lengths, bs, torch.Generator().manual_seed(3), pool_batches=8)
    assert torch.equal(out, again) and not torch.equal(out, other)


class Linear(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.zeros(()))


class RowsTask(Task):
    """Records the rows of every batch; optionally buckets by the given lengths on the host."""

    def __init__(self, n: int, lengths: np.ndarray | None = None, host: bool = False) -> None:
        self.model = Linear()
        self.optimizer = torch.optim.SGD(self.model.parameters(), lr=0.1)
        self.n_train, self.eval_sets = n, {}
        self.lengths, self.host_batches = lengths, host
        self.rows: list[list[int]] = []

    def order_epoch(self, perm, batch_size, generator):
        return perm if self.lengths is None else bucket_by_length(perm, self.lengths, batch_size, generator)

    def loss(self, idx):
        assert idx.device.type == "cpu"
        self.rows.append(idx.tolist())
        return self.model.w * float(idx.sum())


def run_rows(tmp_path, n=70, bs=8, epochs=3, **task):
    holder = {}

    def build():
        holder["task"] = RowsTask(n, **task)
        return holder["task"]

    fit(build, LoopSettings(epochs=epochs, batch_size=bs, patience=0, progress=False), tmp_path, seed=5,
        config={}, fingerprint="f")
    return holder["task"].rows


@pytest.mark.parametrize("host", [False, True])
def test_without_bucketing_the_batches_are_todays_randperm_slices(tmp_path, host):
    """Off (the default hook), with or without host batches: epoch e's batches are the slices of the
    e-th ``randperm`` of a generator seeded with the run seed, exactly as before the hook existed."""
    n, bs = 70, 8
    rows = run_rows(tmp_path, n, bs, host=host)
    g = torch.Generator().manual_seed(5)
    expected = []
    for _ in range(3):
        p = torch.randperm(n, generator=g)
        expected += [p[i:i + bs].tolist() for i in range(0, n, bs)]
    assert rows == expected


def test_bucketed_batches_are_resumed_identically(tmp_path):
    n, bs, lengths = 70, 8, lengths_of(70)
    ref = run_rows(tmp_path / "ref", n, bs, lengths=lengths, host=True)
    assert ref != run_rows(tmp_path / "plain", n, bs, host=True)
    holder = {}

    def build():
        holder["task"] = RowsTask(n, lengths=lengths, host=True)
        return holder["task"]

    settings = LoopSettings(epochs=3, batch_size=bs, patience=0, progress=False, checkpoint_every=2)
    with crash_after(13), pytest.raises(SimulatedCrash):  # 9 batches an epoch: killed in epoch 2
        fit(build, settings, tmp_path / "run", seed=5, config={}, fingerprint="f")
    before = holder["task"].rows
    fit(build, settings, tmp_path / "run", seed=5, config={}, fingerprint="f")
    after = holder["task"].rows
    # the killed run did ref's first batches; the resumed one ref's last ones from its checkpoint on
    assert before == ref[:len(before)] and 0 < len(after) < len(ref) and after == ref[len(ref) - len(after):]
    assert len(before) + len(after) >= len(ref)


def test_host_width_equals_the_device_read_trim():
    rng = np.random.default_rng(0)
    n, L = 50, 16
    lengths = rng.integers(3, L + 1, size=n)
    mask = torch.from_numpy((np.arange(L)[None, :] < lengths[:, None]).astype(np.uint8))
    ids = torch.from_numpy(rng.integers(5, 100, size=(n, L)).astype(np.int32)) * mask
    spans = torch.zeros(n, 3, dtype=torch.int32)
    split = TokenizedSplit(ids, mask, spans, spans + 1)
    assert np.array_equal(split.row_lengths, lengths)
    idx = torch.tensor([3, 17, 4, 40])
    got = split.batch(idx)
    width = int(mask[idx].sum(1).max())  # what batch() read from the device before
    assert got["input_ids"].shape[1] == width and torch.equal(got["input_ids"], ids[idx, :width].long())
    assert torch.equal(got["attention_mask"], mask[idx, :width].long())
    assert split.batch(slice(10, 20))["input_ids"].shape[1] == int(lengths[10:20].max())
    sub = split.take(torch.tensor([5, 1]))
    assert sub.row_lengths.tolist() == [lengths[5], lengths[1]] and split.head(7).row_lengths.tolist() == lengths[:7].tolist()
