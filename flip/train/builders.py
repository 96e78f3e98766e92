"""How each finetuning strategy is built (paper §3.4, Eq. 13-15); the table is ``flip.strategy_table``.

    flip finetune -S finetune.strategy=flip --pretrained models/pretrain

Each strategy is a builder ``build(cfg, data, device, pretrained) -> Task`` (named by its row of
``flip.strategy_table.STRATEGIES``) run by the generic loop (validation-AUC early stopping, test scored
once with the best weights, deterministic, resumable), made of the blocks of ``flip.train.tasks``.
``pretrained`` is a ``flip pretrain`` run directory (``flip.train.pretrain`` documents its layout); a
strategy that needs one and does not get it raises :class:`~flip.errors.FlipError` saying to run
``flip pretrain`` first or pass ``--pretrained DIR``. Every strategy fingerprints the weights it starts
from (:func:`strategy_fingerprint`: SHA-256 of the files), so a changed pretraining invalidates finished
finetuning runs.

``scratch``
    An ID model from ``flip.models.build_id_model`` trained from random initialisation (the "w/o
    FLIP" baseline of the paper): ``TabularTask`` (BCE + lookup-L2 on embeddings), Adam (or AdamW
    when ``finetune.optimizer == "adamw"``) with ``finetune.lr`` and ``finetune.weight_decay``; the
    vocabulary tables row-sparse under lazy Adam when ``id_model.embedding_updates`` says so
    (:mod:`flip.train.sparse_updates`; also for ``flip_id`` and ``flip``).
``flip_id``
    The ID model with the pretrained ID tower (every weight except the prediction layer ``fc``
    and a first-order term, which pretraining never trains: they are fresh, i.e. a new
    Linear_ID, Eq. 13), trained exactly like ``scratch``. Its ``model.safetensors`` is a plain ID
    model: it serves at the ID model's cost.
``flip_plm``
    The aligned language model (``pretrained/plm``) + a fresh Linear on [CLS] (Eq. 13,
    ``flip.models.fusion.PlmClassifier``), mean BCE, AdamW at ``finetune.plm_lr`` (paper / authors'
    code: 5e-5) with ``finetune.weight_decay``.
``plm_scratch``
    The same on the ORIGINAL language model ``cfg.plm.name`` (the PLM-based baseline; no
    ``pretrained`` needed).
``flip``
    Both pretrained towers (``flip.models.fusion.FlipModel``); ``ŷ = σ(α·logit_ID(v) + (1−α)·logit_PLM(w))``
    with α a learnable scalar initialised to ``finetune.alpha_init`` and left unconstrained (the
    authors: 0, no clamp). Loss (Eq. 15) = BCE(ŷ) + BCE(ŷ_ID) + BCE(ŷ_PLM) + ``l2_embedding``
    lookup-L2 (as ``scratch``). Two learning rates: the PLM encoder at ``finetune.plm_lr``,
    everything else (ID tower, both heads, α) at ``finetune.lr``, with ``finetune.optimizer``.
    Validation and test score ŷ. The final α is reported by :meth:`FlipTask.summary` (``alpha``)
    and stored in ``model.safetensors`` (key ``alpha``).

The ID-model configuration must equal the pretraining run's (else the weights would not fit): a
mismatch is an error naming the keys (except :data:`TRAINING_KEYS`, which say how it is trained).

Only torch, safetensors, pyarrow and the standard library are imported (transformers lazily).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import torch
from torch import nn

from flip.config import Config
from flip.errors import FlipError
from flip.io import file_sha256, read_json
from flip.models.fusion import FlipModel, PlmClassifier
from flip.models.layers import HEAD_MODULES
from flip.strategy_table import STRATEGIES, Strategy
from flip.train.tasks import (
    CtrData,
    FlipTask,
    PlmTask,
    TabularTask,
    finetune_bf16,
    load_text_splits,
    make_optimizer,
)
from flip.train.fingerprint import plm_identity
from flip.train.loop import Task
from flip.train.sparse_updates import sparse_tables

__all__ = [
    "build_flip",
    "build_flip_id",
    "build_flip_plm",
    "build_plm_scratch",
    "build_scratch",
    "load_pretrained_id_model",
    "pretrained_dir",
    "pretrained_rows",
    "remap_rows",
    "strategy_fingerprint",
    "vocabulary_map",
]


# ---------------------------------------------------------------------------------- pretrained
def pretrained_dir(pretrained: str | Path | None, strategy: str) -> Path:
    """The pretraining run directory, checked to hold what ``strategy`` reads."""
    fix = "run `flip pretrain` first or pass --pretrained DIR (the output directory of `flip pretrain`)"
    if pretrained is None:
        raise FlipError(f"finetune.strategy={strategy} starts from a FLIP pretraining run, but none was given: {fix}.")
    d = Path(pretrained)
    missing = [name for name in STRATEGIES[strategy].needs if not (d / name).exists()]
    if missing:
        raise FlipError(f"finetune.strategy={strategy}: {d} is not a finished pretraining run "
                        f"(missing {', '.join(missing)}): {fix}.")
    return d


# id_model keys that say how the model is trained, not what it is: finetuning may differ from pretraining
TRAINING_KEYS = ("embedding_updates",)


def _check_id_model(cfg: Config, pdir: Path, data: CtrData | None = None) -> torch.Tensor | None:
    """The ID-model settings must be the pretraining run's. Returns None when the feature vocabulary is
    the pretraining run's too, else the map from this dataset's ids to the run's embedding rows (a
    retrain that reuses the last pretraining on newer data: see :func:`vocabulary_map`)."""
    used = read_json(pdir / "config.json").get("id_model", {})
    mine = dataclasses.asdict(cfg.id_model)
    keys = (set(used) | set(mine)) - set(TRAINING_KEYS)
    diff = sorted(k for k in keys if used.get(k) != mine.get(k))
    if diff:
        shown = ", ".join(f"id_model.{k}={used.get(k)!r} (here {mine.get(k)!r})" for k in diff)
        raise FlipError(f"the pretraining run {pdir} used other ID-model settings: {shown}. Fix: finetune with "
                        "the same id_model settings as the pretraining run (e.g. -S id_model.KEY=VALUE).")
    if data is None:
        return None
    try:
        return pretrained_rows(pdir, Path(data.dataset_dir))
    except FileNotFoundError:  # a vocabulary file is missing: an older run or dataset
        raise FlipError(f"the pretraining run {pdir} was made on a dataset with another feature vocabulary "
                        f"than {data.dataset_dir}. Fix: pretrain on this processed dataset (or finetune on "
                        "the one it was pretrained on).") from None


def vocabulary_map(pdir: Path, old_meta: dict[str, Any], data_dir: Path, new_meta: dict[str, Any]) -> torch.Tensor:
    """(new vocab_size,) int64: for every feature id of the new dataset, the pretraining run's row of the
    same value; values the run never saw take their field's OOV row (its "unseen value" embedding)."""
    old_fields = {f["name"]: f for f in old_meta["fields"]}
    missing = [f["name"] for f in new_meta["fields"] if f["name"] not in old_fields]
    if missing:
        raise FlipError(f"the pretraining run {pdir} has no field(s) {', '.join(missing)} of {data_dir}. Fix: "
                        "pretrain on this dataset (retrain.pretrain: always).")
    old = pq.read_table(pdir / "vocab.parquet").to_pydict()
    old_id = {(f, v): i for f, v, i in zip(old["field"], old["value"], old["id"])}
    new = pq.read_table(data_dir / "vocab.parquet").to_pydict()
    index = torch.zeros(int(new_meta["vocab_size"]), dtype=torch.int64)
    index[1] = 1  # [MASK]
    for f in new_meta["fields"]:
        index[f["oov_id"]] = old_fields[f["name"]]["oov_id"]
    for f, v, i in zip(new["field"], new["value"], new["id"]):
        index[i] = old_id.get((f, v), old_fields[f]["oov_id"])
    return index


def remap_rows(state: dict[str, torch.Tensor], pdir: Path, rows: torch.Tensor) -> dict[str, torch.Tensor]:
    """Every vocabulary-sized tensor of a pretraining run's ``state`` re-indexed by ``rows``
    (:func:`vocabulary_map`): row i of the result is the run's row for this dataset's feature id i."""
    old_size = int(read_json(pdir / "dataset_meta.json")["vocab_size"])
    return {k: (v.index_select(0, rows) if v.dim() >= 1 and v.shape[0] == old_size else v) for k, v in state.items()}


def pretrained_rows(pdir: Path, dataset_dir: Path) -> torch.Tensor | None:
    """None when ``dataset_dir`` has the pretraining run's vocabulary, else :func:`vocabulary_map`."""
    old, new = read_json(pdir / "dataset_meta.json"), read_json(Path(dataset_dir) / "meta.json")
    same = [(f["name"], f["offset"], f["size"]) for f in old["fields"]] == \
        [(f["name"], f["offset"], f["size"]) for f in new["fields"]] and old["vocab_size"] == new["vocab_size"]
    return None if same else vocabulary_map(pdir, old, Path(dataset_dir), new)


def load_pretrained_id_model(model: nn.Module, pdir: Path, rows: torch.Tensor | None = None) -> list[str]:
    """Load the pretrained ID tower into ``model`` except its prediction layer (``fc``, first-order
    term), which stays as initialised. ``rows`` (from :func:`vocabulary_map`) picks, for each feature
    id of the model, the run's row of every vocabulary-sized tensor. Returns the keys left fresh."""
    from safetensors.torch import load_file

    state = load_file(str(pdir / "id_model.safetensors"))
    if rows is not None:
        state = remap_rows(state, pdir, rows)
    heads = tuple(f"{h}." for h in HEAD_MODULES)
    keep = {k: v for k, v in state.items() if not k.startswith(heads)}
    result = model.load_state_dict(keep, strict=False)
    fresh = sorted(result.missing_keys)
    wrong = [k for k in fresh if not k.startswith(heads)]
    if result.unexpected_keys or wrong:
        raise FlipError(f"{pdir / 'id_model.safetensors'} does not fit the ID model (missing {wrong}, "
                        f"unexpected {result.unexpected_keys}). Fix: finetune with the pretraining run's id_model "
                        "settings.")
    return fresh


def strategy_fingerprint(cfg: Config, strategy: Strategy, pretrained: Path | None) -> dict[str, Any] | None:
    """What identifies a run of ``strategy`` beyond the config and the dataset: the weights it starts
    from (SHA-256 of the pretrained ID model, the files of the language model); None for ``scratch``.
    Checks the pretraining run first (it holds what the strategy reads, with this ID-model setting)."""
    extra: dict[str, Any] = {}
    if strategy.needs:
        pdir = pretrained_dir(pretrained, strategy.name)
        if strategy.pretrained_id:
            _check_id_model(cfg, pdir)
            extra["id_model"] = file_sha256(pdir / "id_model.safetensors")
        if strategy.pretrained_plm:
            extra["plm"] = plm_identity(str(pdir / "plm"))
    elif strategy.uses_plm:
        extra["plm"] = plm_identity(cfg.plm.name)
    return extra or None


# --------------------------------------------------------------------------------------- builders
def build_scratch(cfg: Config, data: CtrData, device: torch.device, pretrained: Path | None = None) -> Task:
    """ID model from random initialisation (the "w/o FLIP" baseline of the paper); ``pretrained``
    is ignored."""
    from flip.models import build_id_model

    model = build_id_model(cfg.id_model, data.num_fields, data.vocab_size).to(device)
    optimizer = make_optimizer(model.parameters(), cfg.finetune, _tables(cfg, data, model))
    return TabularTask(model, optimizer, data, cfg.finetune.l2_embedding, bf16=finetune_bf16(cfg, device),
                       oov_dropout=cfg.finetune.oov_dropout)


def _tables(cfg: Config, data: CtrData, model: nn.Module) -> list[nn.Parameter]:
    """The ID model's tables that get row-sparse updates (``id_model.embedding_updates``), or none."""
    return sparse_tables(cfg.id_model.embedding_updates, data.vocab_size, model)


def _plm_optimizer(cfg: Config, params) -> torch.optim.Optimizer:
    return make_optimizer(params, dataclasses.replace(cfg.finetune, optimizer="adamw", lr=cfg.finetune.plm_lr))


def _load_plm_from(name: str, cfg: Config):
    from flip.models.plm import load_plm

    return load_plm(dataclasses.replace(cfg.plm, name=name))


def build_flip_id(cfg: Config, data: CtrData, device: torch.device, pretrained: Path | None = None) -> Task:
    """``scratch`` started from the pretrained ID tower (fresh prediction layer)."""
    from flip.models import build_id_model

    pdir = pretrained_dir(pretrained, "flip_id")
    rows = _check_id_model(cfg, pdir, data)
    model = build_id_model(cfg.id_model, data.num_fields, data.vocab_size)
    load_pretrained_id_model(model, pdir, rows)
    model = model.to(device)
    optimizer = make_optimizer(model.parameters(), cfg.finetune, _tables(cfg, data, model))
    return TabularTask(model, optimizer, data, cfg.finetune.l2_embedding,
                       bf16=finetune_bf16(cfg, device), oov_dropout=cfg.finetune.oov_dropout)


def _plm_task(cfg: Config, data: CtrData, device: torch.device, plm_name: str) -> Task:
    plm, tokenizer = _load_plm_from(plm_name, cfg)
    model = PlmClassifier(plm).to(device)
    tokens = load_text_splits(cfg, data, tokenizer, device)
    return PlmTask(model, _plm_optimizer(cfg, model.parameters()), data, tokens, device,
                   finetune_bf16(cfg, device), length_bucketing=cfg.finetune.length_bucketing)


def build_flip_plm(cfg: Config, data: CtrData, device: torch.device, pretrained: Path | None = None) -> Task:
    """The aligned language model + a fresh Linear on [CLS]."""
    pdir = pretrained_dir(pretrained, "flip_plm")
    return _plm_task(cfg, data, device, str(pdir / "plm"))


def build_plm_scratch(cfg: Config, data: CtrData, device: torch.device, pretrained: Path | None = None) -> Task:
    """The original (unaligned) language model ``cfg.plm.name`` + a fresh Linear on [CLS]."""
    return _plm_task(cfg, data, device, cfg.plm.name)


def build_flip(cfg: Config, data: CtrData, device: torch.device, pretrained: Path | None = None) -> Task:
    """Both pretrained towers, fused by a learnable α; Eq. 15 loss; two learning rates."""
    from flip.models import build_id_model

    pdir = pretrained_dir(pretrained, "flip")
    rows = _check_id_model(cfg, pdir, data)
    id_model = build_id_model(cfg.id_model, data.num_fields, data.vocab_size)
    load_pretrained_id_model(id_model, pdir, rows)
    plm, tokenizer = _load_plm_from(str(pdir / "plm"), cfg)
    model = FlipModel(id_model, plm, cfg.finetune.alpha_init).to(device)
    plm_params = {id(p) for p in model.plm.parameters()}
    groups = [
        {"params": [p for p in model.plm.parameters()], "lr": cfg.finetune.plm_lr},
        {"params": [p for p in model.parameters() if id(p) not in plm_params]},
    ]
    tokens = load_text_splits(cfg, data, tokenizer, device)
    optimizer = make_optimizer(groups, cfg.finetune, _tables(cfg, data, model.id_model))
    return FlipTask(model, optimizer, data, tokens, device, finetune_bf16(cfg, device),
                    l2_embedding=cfg.finetune.l2_embedding, length_bucketing=cfg.finetune.length_bucketing)
