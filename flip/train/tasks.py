"""The building blocks of CTR finetuning, shared by every strategy (``flip.train.builders``).

Data
    :class:`CtrData`: the processed splits as tensors on the training device, loaded once
    (:func:`load_ctr_data`), and the equal-data subset every strategy trains and is scored on
    (:meth:`CtrData.subset`); :func:`load_text_splits`: their tokenized text (``flip.data.tokens``'
    cache; the tokenizer of the language model used, ``plm.max_length``, ``plm.cache_dir``).
Optimizer, precision
    :func:`make_optimizer` (``finetune.optimizer``: Adam with L2 or AdamW, fused where it can be; with
    ``id_model.embedding_updates`` the vocabulary tables row-sparse, :mod:`flip.train.sparse_updates`);
    :func:`finetune_bf16` (``finetune.precision``, :mod:`flip.train.precision`: the forward pass under
    bf16 autocast where asked; the loss, the weights and the optimizer stay fp32, and validation/test
    are always scored in fp32).
Tasks (what :func:`flip.train.loop.fit` trains)
    :class:`TabularTask`: an ID model on the tabular splits: mean BCE-with-logits + embedding
    regularisation::

        l2_embedding * (1/B) * sum_{b in batch} sum_{f in fields} ||E[x_bf]||^2

    i.e. the squared L2 norm of the embedding rows *looked up* in the batch, summed over the
    fields of a sample and averaged over the batch (a row used by several samples counts once per
    use, so frequent features are regularised more, as in DeepCTR/FuxiCTR-style lookup
    regularisation; unused rows get no gradient from it). The padding row 0 is zero and frozen.
    ``finetune.oov_dropout`` (default 0) replaces each training id by its field's out-of-vocabulary
    id with that probability, so that the OOV rows - where every value unseen in training lands,
    e.g. the new users of a chronological test period - learn an "unseen value" embedding instead
    of keeping their random initialisation (which models that take logarithms of embeddings, AFN,
    turn into extreme values).
    :class:`PlmTask`: a ``PlmClassifier`` on the tokenized splits, mean BCE. :class:`FlipTask`: a
    ``FlipModel``, Eq. 15 (three BCE terms) + the same lookup-L2. Text batches are trimmed to the
    batch's longest row (a host max: their rows reach the task on the CPU), and with
    ``finetune.length_bucketing`` made of rows of similar length (``flip.train.bucketing``); a text
    task scores at most ``EVAL_CHUNK`` rows per forward (its
    ``max_eval_rows``, which caps ``finetune.eval_batch_size`` in ``flip.train.loop.predict_probs``).

Only torch, numpy, pyarrow and the standard library are imported.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq
import torch
import torch.nn.functional as F
from torch import nn

from flip.config import Config, FinetuneConfig
from flip.data.tensors import TabularSplit, load_meta, load_tabular, split_rows
from flip.data.tokens import TokenizedSplit, tokenize_split
from flip.errors import SettingError
from flip.train.bucketing import bucket_by_length
from flip.train.distributed import DistContext, all_reduce_sum
from flip.train.loop import EvalSet, Task
from flip.train.precision import autocast, use_bf16
from flip.train.sharding import TrainShard
from flip.train.sparse_updates import split_optimizer

__all__ = [
    "EVAL_CHUNK",
    "CtrData",
    "FlipTask",
    "PlmTask",
    "TabularTask",
    "finetune_bf16",
    "load_ctr_data",
    "load_sharded_ctr_data",
    "load_text_splits",
    "make_optimizer",
]

EVAL_CHUNK = {"cuda": 1024, "cpu": 256}  # rows per PLM forward when scoring a split


# ----------------------------------------------------------------------------------------- data
@dataclass
class CtrData:
    """The processed splits as tensors on the training device, loaded once per ``finetune`` call."""

    dataset_dir: Path
    meta: dict[str, Any]
    splits: dict[str, TabularSplit]  # train (first ``max_rows`` rows when asked), valid, test
    rows: dict[str, np.ndarray] = field(default_factory=dict)  # ``row`` column of valid/test
    # positions of the kept rows in each split file (None = its first len(split) rows)
    positions: dict[str, np.ndarray | None] = field(default_factory=dict)
    # under torchrun: this rank's rows of the training split, read per epoch (``splits["train"]`` is empty)
    shard: TrainShard | None = None

    def subset(self, train_last: int = 0, eval_rows: int = 0) -> "CtrData":
        """The last ``train_last`` training rows (the most recent) and at most ``eval_rows`` rows of
        valid and test, evenly spaced in time (a fixed, deterministic subsample); 0 keeps all.
        Used for every strategy (``finetune.train_rows``, ``finetune.eval_rows``), so that a language
        model, whose rows are expensive on a CPU, and the ID models compare on equal data."""
        splits, rows, positions = dict(self.splits), dict(self.rows), dict(self.positions)
        n = len(self.splits["train"])
        if 0 < train_last < n:
            keep = torch.arange(n - train_last, n)
            base = self.positions.get("train")
            positions["train"] = (base if base is not None else np.arange(n))[keep.numpy()]
            t = self.splits["train"]
            splits["train"] = TabularSplit(t.x[keep.to(t.x.device)], t.y[keep.to(t.y.device)])
        for split in ("valid", "test"):
            m = len(self.splits[split])
            if 0 < eval_rows < m:
                pick = np.unique(np.linspace(0, m - 1, eval_rows).round().astype(np.int64))
                base = self.positions.get(split)
                positions[split] = (base if base is not None else np.arange(m))[pick]
                t, idx = self.splits[split], torch.from_numpy(pick)
                splits[split] = TabularSplit(t.x[idx.to(t.x.device)], t.y[idx.to(t.y.device)])
                rows[split] = self.rows[split][pick]
        return CtrData(self.dataset_dir, self.meta, splits, rows, positions, self.shard)

    @property
    def num_fields(self) -> int:
        return len(self.meta["fields"])

    @property
    def vocab_size(self) -> int:
        return int(self.meta["vocab_size"])

    @property
    def train(self) -> TabularSplit:
        return self.splits["train"]

    def eval_sets(self) -> dict[str, EvalSet]:
        return {s: EvalSet(y=self.splits[s].y, row=self.rows[s]) for s in ("valid", "test") if s in self.splits}


def load_ctr_data(dataset_dir: str | Path, device: torch.device | str = "cpu", max_rows: int = 0,
                  read_train: bool = True, budget_bytes: int = 0) -> CtrData:
    """Load train/valid/test of a processed dataset onto ``device``; ``max_rows > 0`` keeps the
    first ``max_rows`` training rows (the time-earliest ones). ``read_train=False``: the training
    split is left empty (a :class:`~flip.train.sharding.TrainShard` reads it, :func:`load_sharded_ctr_data`).
    ``budget_bytes`` (> 0, ``run.resident_mib``): a split's ids larger than that stay in a memory-mapped
    file on the host (``flip.data.tensors.host_array``), and the split is never moved whole to the device
    (the tasks gather each batch on the host and copy it over)."""
    d = Path(dataset_dir)
    meta = load_meta(d)
    splits: dict[str, TabularSplit] = {}
    rows: dict[str, np.ndarray] = {}
    for split in ("train", "valid", "test"):
        if split == "train" and not read_train:
            splits[split] = TabularSplit(torch.zeros(0, len(meta["fields"]), dtype=torch.int32, device=device),
                                         torch.zeros(0, device=device))
            continue
        tab = load_tabular(d, split, max_rows if split == "train" else 0, budget_bytes)
        if split != "train":
            rows[split] = pq.read_table(d / f"{split}.parquet", columns=["row"]).column("row").to_numpy().astype(np.int64)
        splits[split] = tab if 0 < budget_bytes < tab.x.numel() * tab.x.element_size() else tab.to(device)
    return CtrData(dataset_dir=d, meta=meta, splits=splits, rows=rows)


def gather(t: torch.Tensor, idx: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Rows ``idx`` of ``t``, taken where ``t`` lives (the device, or the host for a split kept there)
    and then moved to ``device``."""
    rows = t.index_select(0, idx if idx.device == t.device else idx.to(t.device))
    return rows if rows.device == device else rows.to(device, non_blocking=True)


def load_sharded_ctr_data(dataset_dir: str | Path, device: torch.device, fcfg: FinetuneConfig, ctx: DistContext) -> CtrData:
    """Under torchrun: the valid/test rows every strategy is scored on (as ``load_ctr_data(...).subset``),
    read whole by every rank, and the training rows of ``load_ctr_data(..., fcfg.max_rows).subset(
    fcfg.train_rows)`` as a :class:`~flip.train.sharding.TrainShard`: each epoch this rank reads only its
    share of them (:mod:`flip.train.sharding`)."""
    d = Path(dataset_dir)
    total = split_rows(d, "train")
    m = min(fcfg.max_rows, total) if fcfg.max_rows > 0 else total
    start = m - fcfg.train_rows if 0 < fcfg.train_rows < m else 0
    data = load_ctr_data(d, device, read_train=False).subset(0, fcfg.eval_rows)
    data.shard = TrainShard(d, start, m - start, ctx, torch.device(device))
    return data


# ------------------------------------------------------------------------------------ optimizer
def make_optimizer(params: Iterable[nn.Parameter] | Iterable[dict[str, Any]], fcfg: FinetuneConfig,
                   tables: list[nn.Parameter] | None = None) -> torch.optim.Optimizer:
    """Adam (``optimizer: adam``, L2 ``weight_decay`` added to the gradient) or AdamW (decoupled
    ``weight_decay``) with ``lr``. Parameter groups (e.g. a PLM at ``plm_lr``) pass through.

    On CPU the fused implementation is used (one kernel per step over all tensors, same math).
    ``tables``: row-sparse tables (``flip.train.sparse_updates.sparse_tables``), stepped by a lazy Adam
    with the same rate and weight decay (``flip.train.sparse_updates``); none: the dense optimizer alone.
    """
    params = [{**p, "params": list(p["params"])} if isinstance(p, dict) else p for p in params]
    tensors = [t for p in params for t in (p["params"] if isinstance(p, dict) else [p])]
    device = tensors[0].device if tensors else None
    kwargs: dict[str, Any] = {"lr": fcfg.lr, "weight_decay": fcfg.weight_decay}
    if device is not None and device.type in ("cpu", "cuda"):
        kwargs["fused"] = True
    name = fcfg.optimizer.lower()
    if name not in ("adam", "adamw"):
        raise SettingError(f"finetune.optimizer={fcfg.optimizer!r} is not supported; use adam or adamw. "
                           "Fix: set finetune.optimizer in params.yaml")
    dense = torch.optim.Adam if name == "adam" else torch.optim.AdamW
    if not tables:
        return dense(params, **kwargs)
    groups = params if params and isinstance(params[0], dict) else [{"params": params}]
    return split_optimizer(groups, tables, lambda g: dense(g, **kwargs), lr=fcfg.lr,
                           weight_decay=fcfg.weight_decay, decoupled=name == "adamw")


# ----------------------------------------------------------------------------------------- task
class TabularTask(Task):
    """An ID model on the tabular splits: BCE-with-logits (mean) + lookup embedding L2.

    Used by ``scratch`` and by any strategy whose model maps (B, F) ids to logits (e.g. a FLIP
    ID tower loaded from pretraining).

    Under torchrun (``data.shard`` set) the model trains through DDP and each rank computes its slice of
    every global batch (:mod:`flip.train.sharding`); its loss is ``W / B * (sum of the slice's BCE +
    l2_embedding * the slice's squared looked-up rows)``, so that DDP's gradient average is the gradient
    of the single-process loss of the whole batch. Dropout and ``oov_dropout`` draw per rank.
    """

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, data: CtrData, l2_embedding: float = 0.0,
                 scheduler: Any = None, bf16: bool = False, oov_dropout: float = 0.0) -> None:
        self.model = model
        self.bf16 = bool(bf16)
        self.device = next(model.parameters()).device
        # a training split kept on the host (over run.resident_mib) is indexed there: the loop's rows on the CPU
        self.host_batches = data.train.x.device != self.device
        if not 0.0 <= oov_dropout < 1.0:
            raise SettingError(f"finetune.oov_dropout={oov_dropout} must be in [0, 1)")
        self.oov_dropout = float(oov_dropout)
        # (F,) each field's out-of-vocabulary id (the row every value unseen in training maps to)
        self.oov_ids = torch.tensor([f["oov_id"] for f in data.meta["fields"]], dtype=torch.long,
                                    device=self.device)
        self.optimizer = optimizer
        self.scheduler = scheduler
        self.data = data
        self.l2_embedding = float(l2_embedding)
        self.train_x, self.train_y = data.train.x, data.train.y
        self.shard = data.shard
        self.n_train = len(data.shard) if data.shard is not None else len(data.train)
        self.eval_sets = data.eval_sets()
        if data.shard is not None and data.shard.ctx.distributed:
            from torch.nn.parallel import DistributedDataParallel as DDP

            dev = data.shard.device
            self.ddp = DDP(model, device_ids=[dev.index] if dev.type == "cuda" else None, broadcast_buffers=False)
            # per-rank dropout streams (every rank was seeded alike; initialisation is done)
            torch.manual_seed(torch.initial_seed() + 1_000_003 * (1 + data.shard.ctx.rank))
        # The regulariser reuses the embedding output of the forward pass (captured by a hook) so
        # that the table gets one sparse-to-dense gradient per step, not two.
        self._looked_up: torch.Tensor | None = None
        if self.l2_embedding > 0:
            model.embedding.register_forward_hook(self._capture)

    def _capture(self, module: nn.Module, inputs: Any, output: torch.Tensor) -> None:
        if self._looked_up is None and torch.is_grad_enabled():
            self._looked_up = output

    def start_epoch(self, perm: torch.Tensor, batch_size: int) -> None:
        if self.shard is not None:
            self.shard.start_epoch(perm, batch_size)

    def reduce_loss(self, total: torch.Tensor) -> torch.Tensor:
        if self.shard is None:
            return total
        return all_reduce_sum(total, self.shard.ctx) / self.shard.ctx.world

    def loss(self, idx: torch.Tensor) -> torch.Tensor:
        if self.shard is not None:
            x, y, stand_in = self.shard.batch(idx)
            x = x.long()
            weight = 0.0 if stand_in else self.shard.ctx.world / idx.shape[0]  # W / B: see the class docstring
        else:
            x, y = gather(self.train_x, idx, self.device).long(), gather(self.train_y, idx, self.device)
        if self.oov_dropout > 0:  # each id -> its field's OOV id with this probability (global RNG)
            x = torch.where(torch.rand(x.shape, device=x.device) < self.oov_dropout, self.oov_ids, x)
        self._looked_up = None
        module = self.ddp if self.ddp is not None else self.model
        reduction = "mean" if self.shard is None else "sum"
        with autocast(self.device, self.bf16):  # bf16 matrix products; the loss itself is fp32
            loss = F.binary_cross_entropy_with_logits(module(x).float(), y, reduction=reduction)
        if self.l2_embedding > 0:
            e = self._looked_up if self._looked_up is not None else self.model.embedding(x)
            self._looked_up = None
            # (B, F, d) rows this batch looked up: sum of squares (one dot product, the cheapest
            # form with autograd), averaged over the batch
            flat = e.reshape(-1)
            l2 = torch.dot(flat, flat)
            loss = loss + (self.l2_embedding / x.shape[0]) * l2 if self.shard is None else loss + self.l2_embedding * l2
        return loss if self.shard is None else loss * weight

    def predict(self, split: str, idx: torch.Tensor) -> torch.Tensor:
        # always fp32: scoring is cheap for an ID model, and bf16 logits would create ties
        return self.model(gather(self.data.splits[split].x, idx, self.device).long())


def finetune_bf16(cfg: Config, device: torch.device) -> bool:
    """Whether finetuning trains under bf16 autocast (``finetune.precision``, see flip.train.precision)."""
    return use_bf16(cfg.finetune.precision, device, "finetune.precision")


# ----------------------------------------------------------------------------------------- text
def load_text_splits(cfg: Config, data: CtrData, tokenizer: Any, device: torch.device) -> dict[str, TokenizedSplit]:
    """Tokenized train (its first ``len(data.train)`` rows)/valid/test on ``device``, from the cache."""
    out: dict[str, TokenizedSplit] = {}
    for split, tab in data.splits.items():
        pos = data.positions.get(split)
        rows = pos if pos is not None else np.arange(len(tab))  # only the rows used are tokenized
        tokens = tokenize_split(data.dataset_dir, split, tokenizer, cfg.plm.max_length, cfg.plm.cache_dir,
                                progress=cfg.run.progress, rows=rows)
        if len(tokens) != len(tab):
            raise ValueError(f"{data.dataset_dir}/{split}: {len(tokens)} tokenized rows for {len(tab)} rows")
        budget = cfg.run.resident_mib << 20  # a larger split stays memory-mapped on the host
        out[split] = tokens if 0 < budget < tokens.nbytes else tokens.to(device)
    return out


# ----------------------------------------------------------------------------------------- tasks
class _TextTaskBase(Task):
    slow_scoring = True
    host_batches = True  # the batch's rows on the CPU: its trim width is a host max (no device sync)

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, data: CtrData,
                 tokens: dict[str, TokenizedSplit], device: torch.device, bf16: bool,
                 length_bucketing: bool = False) -> None:
        self.length_bucketing = bool(length_bucketing)
        self.model = model
        self.optimizer = optimizer
        self.scheduler = None
        self.data = data
        self.tokens = tokens
        self.device = device
        self.bf16 = bf16
        self.n_train = len(data.train)
        self.eval_sets = data.eval_sets()
        self.max_eval_rows = EVAL_CHUNK.get(device.type, 256)

    def order_epoch(self, perm: torch.Tensor, batch_size: int, generator: torch.Generator) -> torch.Tensor:
        """``finetune.length_bucketing``: batches of rows of similar text length (:mod:`flip.train.bucketing`)."""
        if not self.length_bucketing:
            return perm
        return bucket_by_length(perm, self.tokens["train"].row_lengths, batch_size, generator)

    def _logits(self, split: str, idx: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def predict(self, split: str, idx: torch.Tensor) -> torch.Tensor:
        return self._logits(split, idx).float()


class PlmTask(_TextTaskBase):
    """A ``PlmClassifier`` on the tokenized splits: mean BCE-with-logits."""

    def _logits(self, split: str, idx: torch.Tensor) -> torch.Tensor:
        b = self.tokens[split].batch(idx, self.device)
        with autocast(self.device, self.bf16):
            return self.model(b["input_ids"], b["attention_mask"]).float()

    def loss(self, idx: torch.Tensor) -> torch.Tensor:
        y = gather(self.data.train.y, idx, self.device)
        return F.binary_cross_entropy_with_logits(self._logits("train", idx), y)


class FlipTask(_TextTaskBase):
    """``FlipModel``: Eq. 15 loss + lookup-L2 on the ID embeddings; predictions are the joint logit."""

    def __init__(self, *args: Any, l2_embedding: float = 0.0, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.l2_embedding = float(l2_embedding)

    def _forward(self, split: str, idx: torch.Tensor):
        x = gather(self.data.splits[split].x, idx, self.device).long()
        b = self.tokens[split].batch(idx, self.device)
        with autocast(self.device, self.bf16):
            return (*self.model(x, b["input_ids"], b["attention_mask"]), x)

    def _logits(self, split: str, idx: torch.Tensor) -> torch.Tensor:
        return self._forward(split, idx)[0]

    def loss(self, idx: torch.Tensor) -> torch.Tensor:
        y = gather(self.data.train.y, idx, self.device)
        joint, logit_id, logit_plm, x = self._forward("train", idx)
        bce = F.binary_cross_entropy_with_logits
        loss = bce(joint, y) + bce(logit_id, y) + bce(logit_plm, y)
        if self.l2_embedding > 0:  # as TabularTask: (l2 / B) * sum of squared looked-up rows
            flat = self.model.id_model.embedding(x).float().reshape(-1)
            loss = loss + (self.l2_embedding / x.shape[0]) * torch.dot(flat, flat)
        return loss

    def summary(self) -> dict[str, Any]:
        """Entries for ``metrics.json``: the final α (of the weights ``fit`` kept)."""
        return {"alpha": float(self.model.alpha.detach().float().item())}
