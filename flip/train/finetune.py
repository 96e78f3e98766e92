"""CTR finetuning: a registry of strategies, each a small builder of a :class:`~flip.train.loop.Task`.

``finetune(cfg, dataset_dir, out_dir)`` loads the processed splits once, looks up
``cfg.finetune.strategy`` and runs the generic loop (:func:`flip.train.loop.fit`) for every seed
in ``cfg.run.seeds`` (see :func:`flip.train.loop.run_seeds` for the output layout).

Strategies
----------
``scratch``
    An ID model from ``flip.models.build_id_model`` trained from random initialisation: Adam (or
    AdamW when ``finetune.optimizer == "adamw"``) with ``finetune.lr`` and
    ``finetune.weight_decay``; loss = mean BCE-with-logits + embedding regularisation::

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
    ``finetune.precision`` (auto | bf16 | fp32, :mod:`flip.train.precision`) decides whether the
    forward pass runs under bf16 autocast (auto: where the hardware does bf16 natively); the loss,
    the weights and the optimizer stay fp32, and validation/test are always scored in fp32.

``flip_id``, ``flip_plm``, ``plm_scratch``, ``flip``
    Need a pretrained FLIP checkpoint and/or a language model; they are added with
    :func:`register_strategy` in their own module, each a function
    ``build(cfg, data, device, pretrained) -> Task``; the loop is not touched. Until then, asking for them
    raises an error that says so.

Adding a strategy::

    @register_strategy("flip_id", fingerprint=lambda cfg, pretrained: {"weights": sha256_of(pretrained)})
    def build_flip_id(cfg: Config, data: CtrData, device: torch.device, pretrained: Path | None) -> Task:
        model = build_id_model(cfg.id_model, data.num_fields, data.vocab_size).to(device)
        model.load_state_dict(...)  # the ID tower from the pretraining run in ``pretrained``
        return TabularTask(model, make_optimizer(model.parameters(), cfg.finetune), data,
                           cfg.finetune.l2_embedding)

``pretrained`` is the pretraining run directory given to :func:`finetune` (``flip finetune
--pretrained DIR``), ``None`` when not given. ``fingerprint`` (optional) returns what else, beyond
the config and the dataset, identifies a run (e.g. a hash of the pretrained weights), so that a
finished run is not reused after its inputs changed.
"""

from __future__ import annotations

import dataclasses
import shutil
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq
import torch
import torch.nn.functional as F
from torch import nn

from flip.config import Config, FinetuneConfig
from flip.data.tensors import TabularSplit, load_meta, load_tabular
from flip.errors import SettingError
from flip.io import write_json
from flip.train.identity import dataset_fingerprint, run_fingerprint
from flip.train.loop import (
    EvalSet,
    LoopSettings,
    Task,
    adopt_run,
    finished_metrics,
    fit,
    resolve_device,
    run_seeds,
    score_saved_run,
    set_threads,
)
from flip.train.precision import autocast, use_bf16

__all__ = [
    "CtrData",
    "PLANNED_STRATEGIES",
    "lr_candidates",
    "Strategy",
    "TabularTask",
    "available_strategies",
    "finetune",
    "finetune_bf16",
    "get_strategy",
    "load_ctr_data",
    "loop_settings",
    "make_optimizer",
    "register_strategy",
]

# Strategies of the paper that other modules add later (named in the error for an unknown one).
PLANNED_STRATEGIES = ("flip_id", "flip_plm", "plm_scratch", "flip")


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
        return CtrData(self.dataset_dir, self.meta, splits, rows, positions)

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


def load_ctr_data(dataset_dir: str | Path, device: torch.device | str = "cpu", max_rows: int = 0) -> CtrData:
    """Load train/valid/test of a processed dataset onto ``device``; ``max_rows > 0`` keeps the
    first ``max_rows`` training rows (the time-earliest ones)."""
    d = Path(dataset_dir)
    meta = load_meta(d)
    splits: dict[str, TabularSplit] = {}
    rows: dict[str, np.ndarray] = {}
    for split in ("train", "valid", "test"):
        tab = load_tabular(d, split)
        if split == "train":
            tab = tab.head(max_rows)
        else:
            rows[split] = pq.read_table(d / f"{split}.parquet", columns=["row"]).column("row").to_numpy().astype(np.int64)
        splits[split] = tab.to(device)
    return CtrData(dataset_dir=d, meta=meta, splits=splits, rows=rows)


# ------------------------------------------------------------------------------------ optimizer
def make_optimizer(params: Iterable[nn.Parameter] | Iterable[dict[str, Any]], fcfg: FinetuneConfig) -> torch.optim.Optimizer:
    """Adam (``optimizer: adam``, L2 ``weight_decay`` added to the gradient) or AdamW (decoupled
    ``weight_decay``) with ``lr``. Parameter groups (e.g. a PLM at ``plm_lr``) pass through.

    On CPU the fused implementation is used (one kernel per step over all tensors, same math).
    """
    params = [{**p, "params": list(p["params"])} if isinstance(p, dict) else p for p in params]
    tensors = [t for p in params for t in (p["params"] if isinstance(p, dict) else [p])]
    device = tensors[0].device if tensors else None
    kwargs: dict[str, Any] = {"lr": fcfg.lr, "weight_decay": fcfg.weight_decay}
    if device is not None and device.type in ("cpu", "cuda"):
        kwargs["fused"] = True
    name = fcfg.optimizer.lower()
    if name == "adam":
        return torch.optim.Adam(params, **kwargs)
    if name == "adamw":
        return torch.optim.AdamW(params, **kwargs)
    raise SettingError(f"finetune.optimizer={fcfg.optimizer!r} is not supported; use adam or adamw. "
                       "Fix: set finetune.optimizer in params.yaml")


# ----------------------------------------------------------------------------------------- task
class TabularTask(Task):
    """An ID model on the tabular splits: BCE-with-logits (mean) + lookup embedding L2.

    Used by ``scratch`` and by any strategy whose model maps (B, F) ids to logits (e.g. a FLIP
    ID tower loaded from pretraining).
    """

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, data: CtrData, l2_embedding: float = 0.0,
                 scheduler: Any = None, bf16: bool = False, oov_dropout: float = 0.0) -> None:
        self.model = model
        self.bf16 = bool(bf16)
        self.device = data.train.x.device
        if not 0.0 <= oov_dropout < 1.0:
            raise SettingError(f"finetune.oov_dropout={oov_dropout} must be in [0, 1)")
        self.oov_dropout = float(oov_dropout)
        # (F,) each field's out-of-vocabulary id (the row every value unseen in training maps to)
        self.oov_ids = torch.tensor([f["oov_id"] for f in data.meta["fields"]], dtype=data.train.x.dtype,
                                    device=self.device)
        self.optimizer = optimizer
        self.scheduler = scheduler
        self.data = data
        self.l2_embedding = float(l2_embedding)
        self.train_x, self.train_y = data.train.x, data.train.y
        self.n_train = len(data.train)
        self.eval_sets = data.eval_sets()
        # The regulariser reuses the embedding output of the forward pass (captured by a hook) so
        # that the table gets one sparse-to-dense gradient per step, not two.
        self._looked_up: torch.Tensor | None = None
        if self.l2_embedding > 0:
            model.embedding.register_forward_hook(self._capture)

    def _capture(self, module: nn.Module, inputs: Any, output: torch.Tensor) -> None:
        if self._looked_up is None and torch.is_grad_enabled():
            self._looked_up = output

    def loss(self, idx: torch.Tensor) -> torch.Tensor:
        x = self.train_x.index_select(0, idx)
        y = self.train_y.index_select(0, idx)
        if self.oov_dropout > 0:  # each id -> its field's OOV id with this probability (global RNG)
            x = torch.where(torch.rand(x.shape, device=x.device) < self.oov_dropout, self.oov_ids, x)
        self._looked_up = None
        with autocast(self.device, self.bf16):  # bf16 matrix products; the loss itself is fp32
            loss = F.binary_cross_entropy_with_logits(self.model(x).float(), y)
        if self.l2_embedding > 0:
            e = self._looked_up if self._looked_up is not None else self.model.embedding(x)
            self._looked_up = None
            # (B, F, d) rows this batch looked up: sum of squares (one dot product, the cheapest
            # form with autograd), averaged over the batch
            flat = e.reshape(-1)
            loss = loss + (self.l2_embedding / x.shape[0]) * torch.dot(flat, flat)
        return loss

    def predict(self, split: str, idx: torch.Tensor) -> torch.Tensor:
        # always fp32: scoring is cheap for an ID model, and bf16 logits would create ties
        return self.model(self.data.splits[split].x.index_select(0, idx))


# ----------------------------------------------------------------------------------- registry
StrategyBuilder = Callable[[Config, CtrData, torch.device, "Path | None"], Task]


@dataclass(frozen=True)
class Strategy:
    name: str
    build: StrategyBuilder
    fingerprint: Callable[[Config, "Path | None"], dict[str, Any]] | None = None  # extra run identity
    uses_id: bool = True  # trains an ID model (finetune.lr, finetune.lr_grid)
    uses_plm: bool = False  # trains a language model (finetune.plm_lr, plm_lr_grid, plm_epochs, plm_batch_size)


_STRATEGIES: dict[str, Strategy] = {}


def register_strategy(name: str, fingerprint: Callable[[Config, Path | None], dict[str, Any]] | None = None, *,
                      uses_id: bool = True, uses_plm: bool = False):
    """Decorator: register ``build(cfg, data, device, pretrained) -> Task`` as strategy ``name``."""

    def decorate(build: StrategyBuilder) -> StrategyBuilder:
        if name in _STRATEGIES:
            raise ValueError(f"finetuning strategy {name!r} is registered twice")
        _STRATEGIES[name] = Strategy(name, build, fingerprint, uses_id, uses_plm)
        return build

    return decorate


def available_strategies() -> list[str]:
    return sorted(_STRATEGIES)


def get_strategy(name: str) -> Strategy:
    import flip.train.strategies  # noqa: F401  (registers flip_id, flip_plm, plm_scratch, flip)
    if name in _STRATEGIES:
        return _STRATEGIES[name]
    valid = ", ".join(available_strategies())
    if name in PLANNED_STRATEGIES:
        raise SettingError(
            f"finetune.strategy={name!r} is not available yet (it needs a pretrained FLIP checkpoint "
            f"and/or a language model and has not been registered); available strategies: {valid}"
        )
    raise SettingError(f"unknown finetune.strategy={name!r}; valid strategies: {valid}. "
                       "Fix: set finetune.strategy in params.yaml (or -S finetune.strategy=scratch)")


@register_strategy("scratch")
def build_scratch(cfg: Config, data: CtrData, device: torch.device, pretrained: Path | None = None) -> Task:
    """ID model from random initialisation (the "w/o FLIP" baseline of the paper); ``pretrained``
    is ignored."""
    from flip.models import build_id_model

    model = build_id_model(cfg.id_model, data.num_fields, data.vocab_size).to(device)
    optimizer = make_optimizer(model.parameters(), cfg.finetune)
    return TabularTask(model, optimizer, data, cfg.finetune.l2_embedding, bf16=finetune_bf16(cfg, device),
                       oov_dropout=cfg.finetune.oov_dropout)


def finetune_bf16(cfg: Config, device: torch.device) -> bool:
    """Whether finetuning trains under bf16 autocast (``finetune.precision``, see flip.train.precision)."""
    return use_bf16(cfg.finetune.precision, device, "finetune.precision")


# ---------------------------------------------------------------------------------- entry point
def loop_settings(cfg: Config, device: torch.device) -> LoopSettings:
    """Epochs and batch size from ``finetune``; strategies with a language model use ``plm_epochs`` /
    ``plm_batch_size`` where those are set (> 0)."""
    f, r = cfg.finetune, cfg.run
    plm = get_strategy(f.strategy).uses_plm
    return LoopSettings(
        epochs=(f.plm_epochs or f.epochs) if plm else f.epochs,
        batch_size=(f.plm_batch_size or f.batch_size) if plm else f.batch_size,
        eval_batch_size=f.eval_batch_size,
        patience=f.patience,
        checkpoint_every=r.checkpoint_every,
        progress=r.progress,
        device=str(device),
    )


def lr_candidates(cfg: Config, strategy: Strategy) -> list[dict[str, float]]:
    """The learning rates to select among: ``finetune.lr_grid`` for a strategy that trains an ID model
    times ``finetune.plm_lr_grid`` for one that trains a language model (an empty grid is the single
    value ``lr`` / ``plm_lr``). ``flip`` trains both, so each group gets its own rate."""
    f = cfg.finetune
    ids = (f.lr_grid or [f.lr]) if strategy.uses_id else [f.lr]
    plms = (f.plm_lr_grid or [f.plm_lr]) if strategy.uses_plm else [f.plm_lr]
    return [{"lr": float(a), "plm_lr": float(b)} for a in dict.fromkeys(ids) for b in dict.fromkeys(plms)]


def _with(cfg: Config, seed: int | None = None, **finetune: Any) -> Config:
    run = cfg.run if seed is None else dataclasses.replace(cfg.run, seeds=[seed])
    return dataclasses.replace(cfg, finetune=dataclasses.replace(cfg.finetune, **finetune), run=run)


def _candidate_name(c: dict[str, float], strategy: Strategy) -> str:
    parts = ([f"lr={c['lr']:g}"] if strategy.uses_id else []) + ([f"plm_lr={c['plm_lr']:g}"] if strategy.uses_plm else [])
    return ",".join(parts)


def finetune(cfg: Config, dataset_dir: str | Path, out_dir: str | Path, *,
             pretrained: str | Path | None = None) -> dict[str, Any]:
    """Train ``cfg.finetune.strategy`` on the processed dataset in ``dataset_dir`` for every seed;
    write the outputs to ``out_dir`` and return the metrics (aggregated over seeds when several).

    Every strategy trains on the same rows: the last ``finetune.train_rows`` training rows (0 = all)
    and is scored on at most ``finetune.eval_rows`` validation and test rows (0 = all), so that
    strategies compare at equal data on the same rows.

    Strategies with a language model run the first ``finetune.plm_seeds`` seeds of ``run.seeds``
    (0 = all of them).

    Learning-rate selection (when the grids give more than one candidate, see :func:`lr_candidates`):
    each candidate is trained with the first seed in ``OUT/candidates/<lr…>/`` and scored on the
    validation split only; the best validation AUC wins. The winner's run becomes that seed's run
    (its test split scored then, once), the other seeds train with the winning rates, and
    ``metrics.json`` records every candidate's validation metrics under ``selection``.

    ``pretrained``: the pretraining run directory, for the strategies that start from it.
    """
    strategy = get_strategy(cfg.finetune.strategy)  # fail before any work (and before any output)
    from flip.models import check_model_name

    check_model_name(cfg.id_model.name)
    if strategy.uses_plm and cfg.finetune.plm_seeds > 0:  # fewer seeds for the costly strategies
        cfg = dataclasses.replace(cfg, run=dataclasses.replace(cfg.run, seeds=cfg.run.seeds[:cfg.finetune.plm_seeds]))
    dataset_dir = Path(dataset_dir)
    out_dir = Path(out_dir)
    pretrained = Path(pretrained) if pretrained is not None else None
    set_threads(cfg.run.threads)
    device = resolve_device(cfg.run.device)
    dataset_id = dataset_fingerprint(dataset_dir)
    cache: dict[str, CtrData] = {}

    def data() -> CtrData:  # loaded at most once, and only if some seed has work to do
        if "data" not in cache:
            full = load_ctr_data(dataset_dir, device, cfg.finetune.max_rows)
            cache["data"] = full.subset(cfg.finetune.train_rows, cfg.finetune.eval_rows)
        return cache["data"]

    def fingerprint(cfg_s: Config, seed: int) -> str:
        extra = {"strategy": strategy.fingerprint(cfg_s, pretrained)} if strategy.fingerprint is not None else {}
        return run_fingerprint("finetune_plm" if strategy.uses_plm else "finetune", cfg_s, dataset_id, seed, extra)

    def build(cfg_s: Config, holdout_test: bool = False) -> Callable[[], Task]:
        def make() -> Task:
            task = strategy.build(cfg_s, data(), device, pretrained)
            if holdout_test:  # a selection candidate never sees the test split
                task.eval_sets = {k: v for k, v in task.eval_sets.items() if k != "test"}
            return task
        return make

    def run_one(cfg_s: Config, out: Path, holdout_test: bool = False) -> dict[str, Any]:
        seed = cfg_s.run.seeds[0] if cfg_s.run.seeds else 0
        fp = fingerprint(cfg_s, seed)
        return fit(
            build(cfg_s, holdout_test),
            loop_settings(cfg_s, device),
            out,
            seed=seed,
            config=cfg_s.to_dict(),
            fingerprint=fp + ("-candidate" if holdout_test else ""),
            info={"stage": "finetune", "strategy": strategy.name, "dataset_dir": str(dataset_dir),
                  "precision": "bf16" if finetune_bf16(cfg_s, device) else "fp32",
                  "pretrained": str(pretrained) if pretrained is not None else None},
        )

    candidates = lr_candidates(cfg, strategy)
    if len(candidates) == 1:
        shutil.rmtree(out_dir / "candidates", ignore_errors=True)
        return run_seeds(_with(cfg, **candidates[0]), out_dir, run_one)

    seeds = list(cfg.run.seeds) or [0]
    first = seeds[0]
    tried = []
    for c in candidates:
        m = run_one(_with(cfg, first, **c), out_dir / "candidates" / _candidate_name(c, strategy), holdout_test=True)
        tried.append({**c, "valid_auc": m["valid"]["auc"], "valid_logloss": m["valid"]["logloss"],
                      "best_epoch": m["train"]["best_epoch"]})
    best = max(tried, key=lambda t: (t["valid_auc"] if t["valid_auc"] == t["valid_auc"] else -1.0))
    chosen = {"lr": best["lr"], "plm_lr": best["plm_lr"]}
    final = _with(cfg, **chosen)
    selection = {"metric": "valid_auc", "seed": first, "candidates": tried, "selected": chosen,
                 "grid": {"lr": sorted({c["lr"] for c in candidates}), "plm_lr": sorted({c["plm_lr"] for c in candidates})}}
    # the winner's run is the first seed's run: adopt it, then score its test split once
    first_dir = out_dir if len(seeds) == 1 else out_dir / f"seed-{first}"
    cfg_first = _with(final, first)
    if finished_metrics(first_dir, fingerprint(cfg_first, first)) is None:
        adopt_run(out_dir / "candidates" / _candidate_name(chosen, strategy), first_dir,
                  fingerprint(cfg_first, first))
        score_saved_run(build(cfg_first), loop_settings(cfg_first, device), first_dir, "test")
    result = run_seeds(final, out_dir, run_one)
    result["selection"] = selection
    write_json(out_dir / "metrics.json", result)
    return result
