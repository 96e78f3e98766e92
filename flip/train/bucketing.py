"""Length bucketing of an epoch's permutation: batches of rows of similar length, in a random order.

    perm = bucket_by_length(perm, lengths, batch_size, generator)   # a permutation of the same rows

A language-model batch is trimmed to its longest row (``flip.data.tokens.TokenizedSplit.batch``), so a
batch of short texts costs less than one with a single long text among them. The epoch's permutation
(drawn by :mod:`flip.train.loop`) is cut into pools of ``POOL_BATCHES`` batches; each pool is sorted by
length (longest first, ties in the permutation's order: a stable sort), the full batches of the whole
epoch are then shuffled with ``generator``, and the rows that do not fill a batch stay last (the
loop's batches are fixed-size slices; its last one may be short). This is fairseq's and Hugging Face's
``group_by_length`` scheme: batches stay random (a pool is 64 random batches' rows; which batches come
first is drawn), only the rows inside a batch are alike in length.

Deterministic: the result depends only on ``perm``, ``lengths`` and the generator's state, which the
loop checkpoints at the epoch start, so a resumed run re-draws the same batches. Off
(``pretrain.length_bucketing`` / ``finetune.length_bucketing`` false) the loop's permutation is used
as it is and nothing is drawn.
"""

from __future__ import annotations

import numpy as np
import torch

POOL_BATCHES = 64  # batches per sorting pool (fairseq/HF use 50-100)

__all__ = ["POOL_BATCHES", "bucket_by_length"]


def bucket_by_length(perm: torch.Tensor, lengths: np.ndarray, batch_size: int, generator: torch.Generator,
                     pool_batches: int = POOL_BATCHES) -> torch.Tensor:
    """``perm`` (N,) CPU LongTensor, ``lengths`` (rows of the split,) host lengths; returns the bucketed
    permutation (same rows, CPU LongTensor); draws one ``randperm`` of the full batches from ``generator``."""
    n, bs = int(perm.shape[0]), int(batch_size)
    if n == 0 or bs < 1:
        return perm
    rows = perm.numpy()
    pool = bs * max(1, int(pool_batches))
    parts = []
    for lo in range(0, n, pool):
        chunk = rows[lo:lo + pool]
        parts.append(chunk[np.argsort(-np.asarray(lengths)[chunk], kind="stable")])
    ordered = torch.from_numpy(np.concatenate(parts))
    full = n // bs
    batches = ordered[: full * bs].view(full, bs)
    shuffled = batches[torch.randperm(full, generator=generator)].reshape(-1)
    return torch.cat([shuffled, ordered[full * bs:]])
