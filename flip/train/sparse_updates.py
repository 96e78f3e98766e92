"""Row-sparse updates of the vocabulary tables (``id_model.embedding_updates``).

A dense Adam step reads and writes every row of the embedding table (and its two moment tensors) every
step: at 3M ids x 32 dims that is ~96M parameters per step for a batch that looks up ~10k rows. With
sparse updates the tables produce row-sparse gradients (``nn.Embedding(sparse=True)``, see
``IdModel.use_sparse_gradients`` and ``MtmObjective.use_sparse_gradients``) and a lazy Adam steps only
the rows a batch used; the rest of the model keeps the dense (fused) Adam/AdamW::

    tables = sparse_tables(cfg.id_model.embedding_updates, vocab_size, model)   # [] = dense
    optimizer = split_optimizer(groups, tables, lambda g: torch.optim.Adam(g, ...), weight_decay=..., decoupled=...)

:class:`LazyAdam` is ``torch.optim.SparseAdam`` (a row's moments and weights change only on the steps
that use it; the bias correction counts every step) plus the weight decay the dense optimizer would apply,
on the rows used only: L2 added to their gradient (``adam``) or decoupled shrinking (``adamw``), never a
dense op. On the first step from a fresh state a used row moves as under Adam (the moments start at
zero; SparseAdam adds eps to sqrt(v) before the bias correction, Adam after it, which matters only for
gradients near eps); afterwards dense Adam also moves unused rows by their momentum and decays them.
:class:`SplitOptimizer` runs both optimizers as one (the loop, LR schedulers and checkpoints see one
optimizer; its state dict holds both).

``auto`` picks sparse above :data:`SPARSE_ABOVE` rows (``benchmarks/sparse_embeddings.py`` measures the
DCNv2 step both ways), and dense under DDP: its gradient all-reduce (NCCL) takes dense tensors only.
Only torch is imported.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn

from flip.errors import SettingError

__all__ = ["SPARSE_ABOVE", "LazyAdam", "SplitOptimizer", "sparse_tables", "split_optimizer", "use_sparse_updates"]

# ``auto``: sparse above this many vocabulary rows. The DCNv2 step of benchmarks/sparse_embeddings.py
# (batch 1024, 8 fields, d = 32; 2-core CPU, busy, one thread) took dense/sparse 101/103 ms at 12k ids,
# 185/90 at 300k, 290/95 at 1M and 630/92 at 3M: the dense step grows with the vocabulary, the sparse
# one does not. Lazy Adam is another optimiser, so auto switches only where it is ~3x faster or more;
# MovieLens-1M (~12k ids) stays dense (results unchanged). Below this, ``sparse`` can be asked for.
SPARSE_ABOVE = 1_000_000


def use_sparse_updates(setting: str, vocab_size: int, distributed: bool = False) -> bool:
    """Whether ``id_model.embedding_updates`` (auto | dense | sparse) means row-sparse updates here."""
    if setting == "dense":
        return False
    if setting == "sparse":
        if distributed:
            raise SettingError("id_model.embedding_updates=sparse cannot train on several ranks: DDP all-reduces "
                               "dense gradients only. Fix: set id_model.embedding_updates to auto or dense for a "
                               "torchrun run")
        return True
    if setting == "auto":
        return vocab_size > SPARSE_ABOVE and not distributed
    raise SettingError(f"id_model.embedding_updates={setting!r} is not one of auto, dense, sparse. "
                       "Fix: set id_model.embedding_updates in params.yaml")


def sparse_tables(setting: str, vocab_size: int, model: nn.Module, distributed: bool = False) -> list[nn.Parameter]:
    """The tables that get row-sparse updates: those of ``model.use_sparse_gradients()`` when
    :func:`use_sparse_updates` says so (they then produce sparse gradients), else none."""
    if not use_sparse_updates(setting, vocab_size, distributed):
        return []
    return list(model.use_sparse_gradients())


class LazyAdam(torch.optim.SparseAdam):
    """``torch.optim.SparseAdam`` with weight decay on the rows a step uses: ``decoupled=False`` adds
    ``weight_decay * row`` to their gradient (Adam's L2), ``decoupled=True`` first shrinks them by
    ``1 - lr * weight_decay`` (AdamW). Each group may set its own ``lr`` and ``weight_decay``."""

    def __init__(self, params: Iterable[Any], lr: float = 1e-3, weight_decay: float = 0.0,
                 decoupled: bool = False) -> None:
        super().__init__(params, lr=lr)
        for group in self.param_groups:
            group.setdefault("weight_decay", float(weight_decay))
            group.setdefault("decoupled", bool(decoupled))

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        for group in self.param_groups:
            wd = float(group["weight_decay"])
            if wd == 0.0:
                continue
            for p in group["params"]:
                if p.grad is None or not p.grad.is_sparse:
                    continue  # SparseAdam skips the first and refuses the second
                grad = p.grad.coalesce()
                rows = grad.indices()[0]
                if group["decoupled"]:
                    p.index_copy_(0, rows, p.index_select(0, rows) * (1.0 - float(group["lr"]) * wd))
                else:
                    values = grad.values() + wd * p.index_select(0, rows)
                    p.grad = torch.sparse_coo_tensor(grad.indices(), values, grad.shape, is_coalesced=True,
                                             check_invariants=False)
        return super().step(closure)


class SplitOptimizer(torch.optim.Optimizer):
    """Two optimizers stepped as one: ``dense`` for the dense parameters, ``sparse`` (a :class:`LazyAdam`)
    for the row-sparse tables. ``param_groups`` are theirs (the dense ones first: ``param_groups[0]``
    is what the step log reports), so an LR scheduler drives both; the state dict holds both."""

    def __init__(self, dense: torch.optim.Optimizer, sparse: torch.optim.Optimizer) -> None:
        self.dense, self.sparse = dense, sparse
        super().__init__([*dense.param_groups, *sparse.param_groups], {})

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self.dense.step()
        self.sparse.step()
        return loss

    def state_dict(self) -> dict[str, Any]:
        return {"dense": self.dense.state_dict(), "sparse": self.sparse.state_dict()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if set(state_dict) != {"dense", "sparse"}:
            raise ValueError("not the state of a SplitOptimizer (dense and sparse): a checkpoint of dense updates?")
        self.dense.load_state_dict(state_dict["dense"])
        self.sparse.load_state_dict(state_dict["sparse"])
        # loading gives the two new group dicts: share them again (an LR scheduler sets their lr here)
        self.param_groups = [*self.dense.param_groups, *self.sparse.param_groups]


def split_optimizer(groups: Iterable[dict[str, Any]], tables: list[nn.Parameter],
                    make_dense: Callable[[list[dict[str, Any]]], torch.optim.Optimizer], *, lr: float,
                    weight_decay: float, decoupled: bool) -> torch.optim.Optimizer:
    """``make_dense(groups)`` when no parameter of ``groups`` is in ``tables`` (exactly the dense
    optimizer); else each group is split: its tables go to a :class:`LazyAdam` (the group's ``lr`` and
    ``weight_decay`` when it sets them, else ``lr`` / ``weight_decay``), the rest to ``make_dense``."""
    sparse_ids = {id(t) for t in tables}
    dense_groups, sparse_groups = [], []
    for group in groups:
        params = list(group["params"])
        options = {k: v for k, v in group.items() if k != "params"}
        dense = [p for p in params if id(p) not in sparse_ids]
        rows = [p for p in params if id(p) in sparse_ids]
        if dense:
            dense_groups.append({**options, "params": dense})
        if rows:
            sparse_groups.append({"params": rows, "lr": options.get("lr", lr),
                                  "weight_decay": options.get("weight_decay", weight_decay)})
    if not sparse_groups:
        return make_dense([{**g, "params": list(g["params"])} for g in groups])
    lazy = LazyAdam(sparse_groups, lr=lr, weight_decay=weight_decay, decoupled=decoupled)
    if not dense_groups:
        return lazy
    return SplitOptimizer(make_dense(dense_groups), lazy)
