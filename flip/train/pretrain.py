"""``flip pretrain``: FLIP modality-alignment pretraining (paper §3.3, §4.1.4) through the generic loop.

    metrics = pretrain(cfg, "data/processed/movielens-1m", "models/pretrain")

A :class:`~flip.align.FlipPretrainModel` (``build_id_model(cfg.id_model)`` + ``load_plm(cfg.plm)``
+ the MLM / MTM / ICL heads of ``cfg.pretrain``) is trained on the **training split only** (its
first ``pretrain.max_rows`` rows when > 0) by :func:`flip.train.loop.fit`: a :class:`PretrainTask`
with no evaluation sets, so there is no early stopping and the weights kept are the last step's
(the paper and the authors' code have no pretraining validation; their "best" is the last epoch).

Optimisation
    AdamW(``pretrain.lr``, ``pretrain.weight_decay``) over every trainable parameter (one group,
    as the authors' code), optional linear warm-up over ``warmup_steps`` optimizer steps, then
    cosine decay to 0 over the run's total optimizer steps, ``epochs * ceil(ceil(N / batch) /
    grad_accum)`` capped by ``max_steps`` (stepped per optimizer step; the authors step a cosine
    per epoch). ``batch_size`` is the GLOBAL batch of one forward/backward (split over the ranks);
    ``grad_accum`` batches make one optimizer step. ``max_steps > 0`` stops after that many
    optimizer steps (reduced CPU profile). With ``id_model.embedding_updates`` resolving to sparse
    (:mod:`flip.train.sparse_updates`) the vocabulary tables - the ID embeddings and MTM's NCE scorer
    (output embeddings and bias; noise ids are gathered, never scored over the vocabulary) - get
    row-sparse gradients and a lazy AdamW-like step on the rows used. The prediction layer of the ID model (``fc``, and a
    first-order term where the model has one) takes no part in pretraining: it is frozen (the
    authors' code computes it and throws it away; finetuning puts a fresh head there).

Precision
    ``pretrain.precision`` (:mod:`flip.train.precision`: ``auto`` = bf16 autocast where the hardware
    does bf16 natively, else fp32; ``bf16`` / ``fp32``). Weights and optimizer state stay fp32.

Speed
    ``pretrain.length_bucketing`` (default on): batches of rows of similar text length, in random
    order (:mod:`flip.train.bucketing`), so fewer padding columns are computed. A step never waits on
    the device: the training split stays on the host (ids in memory, tokens memory-mapped from their
    cache), and each global batch is assembled there - its rows (``Task.host_batches``), its trim
    width, its masks, this rank's share, the masked positions and pairs and the NCE noise
    (``FlipPretrainModel.mask_indices``) - and copied to the device in one go. ``plm.fast_dropout``
    (default on): CPU dropout masks from a fast generator (:mod:`flip.models.host_dropout`).
    ``one_text_pass``: one PLM call over [complete; masked] text. ``compile``: ``torch.compile`` of
    the PLM.

Randomness, resuming
    The loop seeds everything with ``run.seeds[0]`` (one pretraining run; finetuning repeats
    seeds) and draws the batch order (bucketed when asked, from the same generator). Masks and NCE
    noise come from a CPU ``torch.Generator`` of their own, seeded from the run seed and checkpointed
    with the task, so the same seed gives the same run and a resumed run (a kill, then the same
    command) ends with the same metrics and weights as an uninterrupted one. Checkpoints: every epoch
    and every ``run.checkpoint_every`` batches (``OUT/checkpoint/``, removed at the end).

Distributed (torchrun)
    The same command runs on one CPU, one GPU or N GPUs/nodes: ``torchrun --nproc-per-node N -m
    flip.cli pretrain ...``; :mod:`flip.train.distributed` says how N ranks compute what one process
    would. Only rank 0 writes ``OUT``; rank ``r > 0`` runs the loop in ``OUT/.rank-r`` (its own
    checkpoints, needed to resume; removed at the end). Logged losses are all-reduced global means.

Outputs (``OUT``)
    ``config.json``      the full configuration (``flip.config.Config`` as a dict)
    ``run.json``         fingerprint, seed, device, versions, world size, ``statistics`` (below)
    ``metrics.json``     ``loss``/``mlm``/``mtm``/``icl`` (final = mean of the last min(50, steps)
                         batches), ``mean`` (whole run), accuracies, ``steps``, throughput,
                         ``mean_tokens``, ``params``, FLOPs per sample
                         (``FlipPretrainModel.flops_per_sample``), ``achieved_tflops``, ``train``
    ``log.jsonl``        the loop's log (``LoopSettings.optimizer_steps``: ``step`` counts optimizer
                         steps, ``epoch_step`` the batch in the epoch); step and epoch records carry
                         ``loss``, ``mlm``, ``mtm``, ``icl`` (+ ``*_acc``), the task's ``STAT_KEYS``
    ``losses.json``      the step records as a list (DVC plots: x ``step``, y ``mlm``/``mtm``/``icl``)
    ``heads.safetensors``  the MLM/MTM/ICL heads (each weight stored once: the encoders are below)
    ``id_model.safetensors``  the ID model alone (``IdModel.state_dict()``; ``fc`` untrained)
    ``plm/``             the aligned encoder + tokenizer in Hugging Face format: ``plm.name=OUT/plm``
                         loads it with ``load_plm``
    ``dataset_meta.json``  the processed dataset's ``meta.json`` (finetuning checks the vocabulary)

The loop writes ``config.json``, ``run.json``, ``log.jsonl`` and ``metrics.json`` (last); everything
else is written by :meth:`PretrainTask.save_outputs`, the loop's end-of-fit hook, from the model in
memory (``flip.runs`` is the layout). Finetuning (``flip.train.builders``) reads
``id_model.safetensors``, ``plm/``, ``config.json`` and ``dataset_meta.json``.

Imports only torch, numpy, pyarrow, safetensors, tqdm, PyYAML and the standard library (transformers
lazily, through ``flip.models.plm``); nothing happens at import.
"""

from __future__ import annotations

import hashlib
import math
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from flip.align.masking import IGNORE_INDEX
from flip.align.model import OBJECTIVES, AlignmentSpec, FlipPretrainModel, load_feature_counts, pretrain_batch
from flip.config import Config
from flip.data.tensors import load_meta, load_tabular
from flip.data.tokens import TokenizedSplit, tokenize_split
from flip.errors import FlipError
from flip.io import write_json
from flip.runs import RunDir
from flip.train.bucketing import bucket_by_length
from flip.train.distributed import DistContext, all_reduce_sum, broadcast, check_same_position, init_distributed
from flip.train.fingerprint import pretrain_fingerprint
from flip.train.loop import LoopSettings, Task, fit, set_threads
from flip.train.precision import autocast, use_bf16
from flip.train.sparse_updates import sparse_tables, split_optimizer

__all__ = ["PretrainData", "PretrainTask", "init_distributed", "load_pretrain_data", "pretrain", "pretrain_settings",
           "pretrain_total_steps", "rank_share"]

# per-batch statistics of the task (the loop's step/epoch records, the final metrics), in this order
STAT_KEYS = ("loss", "mlm", "mtm", "icl", "mlm_acc", "mtm_acc", "icl_acc", "mlm_tokens", "mtm_fields")
RECENT = 50  # "final" losses = mean over the last RECENT batches


def pretrain_bf16(cfg: Config, device: torch.device) -> bool:
    """Whether pretraining runs under bf16 autocast (``pretrain.precision``, see flip.train.precision)."""
    return use_bf16(cfg.pretrain.precision, device, "pretrain.precision")


# ------------------------------------------------------------------------------------------ data
@dataclass
class PretrainData:
    """The training split on the host (each batch is assembled there and copied to the device): ids,
    tokens, metadata, feature counts."""

    dataset_dir: Path
    meta: dict[str, Any]
    x: torch.Tensor  # (N, F) int32 global ids, on the host (memory-mapped beyond run.resident_mib)
    tokens: TokenizedSplit  # on the host, memory-mapped from the token cache
    counts: torch.Tensor  # (V,) float64 training frequency of every id (NCE noise)

    def __len__(self) -> int:
        return int(self.x.shape[0])

    @property
    def num_fields(self) -> int:
        return len(self.meta["fields"])

    @property
    def vocab_size(self) -> int:
        return int(self.meta["vocab_size"])


def load_pretrain_data(cfg: Config, dataset_dir: str | Path, tokenizer: Any, device: torch.device,
                       ctx: DistContext | None = None, progress: bool = True) -> PretrainData:
    """The training split (first ``pretrain.max_rows`` rows when > 0, then the last
    ``pretrain.train_rows`` of those when > 0), tokenized with the cache of ``flip.data.tokens``
    (rank 0 tokenizes first; the other ranks then read its cache)."""
    ctx = ctx or DistContext()
    d = Path(dataset_dir)
    meta = load_meta(d)
    tab = load_tabular(d, "train", cfg.pretrain.max_rows, cfg.run.resident_mib << 20)
    positions = np.arange(len(tab))
    if 0 < cfg.pretrain.train_rows < len(tab):  # the most recent rows: those finetune.train_rows trains on
        positions = positions[-cfg.pretrain.train_rows:]
        tab = tab.tail(cfg.pretrain.train_rows)
    tokens = None  # only the rows used are tokenized (rank 0 first; the other ranks read its cache)
    if ctx.is_main:
        tokens = tokenize_split(d, "train", tokenizer, cfg.plm.max_length, cfg.plm.cache_dir, progress=progress,
                                rows=positions)
    ctx.barrier()
    if tokens is None:
        tokens = tokenize_split(d, "train", tokenizer, cfg.plm.max_length, cfg.plm.cache_dir, progress=False,
                                rows=positions)
    if len(tokens) != len(tab):
        raise ValueError(f"{d}: {len(tokens)} tokenized rows for {len(tab)} training rows")
    counts = load_feature_counts(d, int(meta["vocab_size"]))
    return PretrainData(d, meta, tab.x, tokens, counts)


# ------------------------------------------------------------------------------------------- task
class PretrainTask(Task):
    """The loop's view of pretraining (see the module docstring for the distributed scheme).

    ``model`` is the bare ``FlipPretrainModel`` (what is checkpointed and saved); ``ddp`` the DDP
    wrapper used for the forward pass when ``ctx.world > 1``. ``loss(idx)`` takes the GLOBAL batch and
    returns the loss and the batch's ``STAT_KEYS``, which the loop writes into its records.
    """

    stat_names = STAT_KEYS
    host_batches = True  # the batch's rows on the CPU: its trim width is a host max (no device sync)

    def __init__(self, cfg: Config, data: PretrainData, device: torch.device, seed: int,
                 ctx: DistContext | None = None, plm: nn.Module | None = None) -> None:
        from flip.models import build_id_model
        from flip.models.plm import load_plm

        self.cfg, self.data, self.device = cfg, data, device
        self.ctx = ctx or DistContext()
        pcfg = cfg.pretrain
        id_model = build_id_model(cfg.id_model, data.num_fields, data.vocab_size)
        id_model.freeze_head()  # the prediction layer takes no part in pretraining
        if plm is None:
            plm, _ = load_plm(cfg.plm)
        model = FlipPretrainModel(id_model, plm, AlignmentSpec.of(pcfg), data.meta, data.counts,
                                  one_text_pass=pcfg.one_text_pass).to(device)
        if pcfg.compile:  # in place: the state dict keeps its names
            model.plm.compile(dynamic=True)
        self.model = model
        self.n_train = len(data)
        self.eval_sets = {}
        self.bf16 = pretrain_bf16(cfg, device)

        # the language model at pretrain.plm_lr, the rest (ID model, the fresh MLM/MTM/ICL heads) at
        # pretrain.lr (the paper's one rate: plm_lr = lr; Adam's update is per element, so two groups at
        # one rate compute what one group does)
        plm_ids = {id(p) for p in model.plm.parameters()}
        groups = [{"params": [p for p in model.parameters() if p.requires_grad and id(p) not in plm_ids]},
                  {"params": [p for p in model.plm.parameters() if p.requires_grad], "lr": pcfg.plm_lr}]
        fused = {"fused": True} if device.type in ("cpu", "cuda") else {}
        # id_model.embedding_updates: the vocabulary tables (ID embeddings, MTM's NCE scorer) row-sparse
        tables = sparse_tables(cfg.id_model.embedding_updates, data.vocab_size, model, self.ctx.distributed)
        self.optimizer = split_optimizer(
            groups, tables, lambda g: torch.optim.AdamW(g, lr=pcfg.lr, weight_decay=pcfg.weight_decay, **fused),
            lr=pcfg.lr, weight_decay=pcfg.weight_decay, decoupled=True)
        warmup, total = int(pcfg.warmup_steps), pretrain_total_steps(pcfg, self.n_train)

        def lr_factor(step: int) -> float:
            if warmup > 0 and step < warmup:
                return (step + 1) / warmup
            progress = (step - warmup) / max(1, total - warmup)
            return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lr_factor)

        if self.ctx.distributed:
            from torch.nn.parallel import DistributedDataParallel as DDP

            passes = model.passes
            use_plm, use_id = passes["plm"] or passes["plm_masked"], passes["id"] or passes["id_masked"]
            # buffers are constants here (noise tables, position ids): no per-step broadcast (with
            # id_model.batch_norm the running statistics stay per rank; rank 0's are saved)
            self.ddp = DDP(model, device_ids=[device.index] if device.type == "cuda" else None,
                           find_unused_parameters=not (use_plm and use_id), broadcast_buffers=False,
                           gradient_as_bucket_view=True)
            # per-rank dropout streams (the loop seeded every rank alike; initialisation is done)
            torch.manual_seed(_derive_seed(seed, 1 + self.ctx.rank))
        # masks + NCE noise: one CPU generator, identical on every rank
        self.generator = torch.Generator().manual_seed(_derive_seed(seed, 0))
        self._scales: dict[str, torch.Tensor] = {}
        if self.ctx.distributed:
            for name in OBJECTIVES:
                module = getattr(model, name, None)
                if module is not None:
                    module.register_forward_hook(self._scale_hook(name))

        # whole-run statistics (the loop averages each step's and epoch's from what ``loss`` returns)
        K = len(STAT_KEYS)
        self.total_sum, self.total_n = torch.zeros(K, dtype=torch.float64, device=device), 0
        self.recent = torch.zeros(RECENT, K, dtype=torch.float64, device=device)
        self.recent_count = 0
        self.token_sum = torch.zeros((), dtype=torch.float64, device=device)  # real tokens seen (FLOPs)
        self._checked = not self.ctx.distributed

    # ----------------------------------------------------------------------- distributed details
    def _scale_hook(self, name: str):
        def hook(module: nn.Module, inputs: Any, output: dict[str, torch.Tensor]):
            scale = self._scales.get(name)
            if scale is None:
                return None
            return {**output, "loss": output["loss"] * scale.to(output["loss"].dtype)}

        return hook

    def order_epoch(self, perm: torch.Tensor, batch_size: int, generator: torch.Generator) -> torch.Tensor:
        """``pretrain.length_bucketing``: batches of rows of similar text length (:mod:`flip.train.bucketing`)."""
        if not self.cfg.pretrain.length_bucketing:
            return perm
        return bucket_by_length(perm, self.data.tokens.row_lengths, batch_size, generator)

    # ------------------------------------------------------------------------------------- loss
    def loss(self, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if not self._checked:  # all ranks must resume from the same checkpoint position (each keeps its own)
            check_same_position(self.ctx, [self.recent_count, self.total_n], self.device)
            self._checked = True
        ctx, model = self.ctx, self.model
        # The global batch, its masks, this rank's share and every index and noise draw are made on the
        # host, where the data lives; then copied to the device at once: the step never waits on it.
        batch = pretrain_batch(self.data.x, self.data.tokens, idx)  # trimmed to its longest text
        B = int(idx.shape[0])
        masks = model.mask(batch, self.generator)  # global draws, identical on every rank
        W = ctx.world
        skip_before = skip_after = 0
        if ctx.distributed:
            local, local_masks, scales, skip_before, skip_after = rank_share(model, batch, masks, ctx)
            self._scales = {k: v.to(self.device, non_blocking=True) for k, v in scales.items()}
        else:
            local, local_masks = batch, masks
        self.token_sum += int(batch["attention_mask"].sum())  # real tokens of the global batch
        if skip_before:
            torch.rand(skip_before, generator=self.generator, dtype=torch.float64)
        local_masks = {**local_masks, **model.mask_indices(local_masks, self.generator)}  # draws this rank's noise
        if skip_after:
            torch.rand(skip_after, generator=self.generator, dtype=torch.float64)
        local = {k: v.to(self.device, non_blocking=True) for k, v in local.items()}
        local_masks = {k: v.to(self.device, non_blocking=True) for k, v in local_masks.items()}
        module = self.ddp if self.ddp is not None else model  # the loop decides whether DDP syncs gradients
        with autocast(self.device, self.bf16):
            out = module(local, self.generator, local_masks)
        return out["loss"], self._statistics(out, B, W)

    # ---------------------------------------------------------------------------- statistics
    def _statistics(self, out: dict[str, torch.Tensor], B: int, W: int) -> torch.Tensor:
        """This batch's (rank-local share of the) statistics, (len(STAT_KEYS),) float64; accumulated
        into the whole-run ones here, into the step and epoch records by the loop."""
        dev = self.device
        vals = []
        for key in STAT_KEYS:
            if key == "loss":
                v = out["loss"].detach().double() / W
            elif key in OBJECTIVES:
                v = out[key].double() / W if key in out else torch.full((), math.nan, dtype=torch.float64, device=dev)
            elif key.endswith("_acc"):
                name = key[:-4]
                if name in out:
                    scale = self._scales.get(name)
                    v = out[key].double() * (scale.double() if scale is not None else 1.0) / W
                else:
                    v = torch.full((), math.nan, dtype=torch.float64, device=dev)
            else:  # mlm_tokens / mtm_fields of this rank per sample of the batch: summed over ranks = global
                v = out[key].double() / B if key in out else torch.zeros((), dtype=torch.float64, device=dev)
            vals.append(v.to(dev).reshape(()))
        u = torch.stack(vals)  # (K,)
        self.total_sum += u * B
        self.total_n += B
        self.recent[self.recent_count % RECENT] = u
        self.recent_count += 1
        return u

    def reduce_stats(self, total: torch.Tensor) -> torch.Tensor:
        return all_reduce_sum(total, self.ctx)

    def run_summary(self) -> dict[str, Any]:
        """``statistics`` for run.json: final (last ``RECENT`` batches) and whole-run means per
        statistic, global over ranks (what metrics.json is made from, see :meth:`save_outputs`)."""
        total = all_reduce_sum(self.total_sum, self.ctx) / max(self.total_n, 1)
        n = min(self.recent_count, RECENT)
        recent = all_reduce_sum(self.recent, self.ctx)
        if n < RECENT:
            final = recent[:n].mean(0) if n else total
        else:
            final = recent.mean(0)
        return {"statistics": {"final": _named(final), "mean": _named(total), "samples": self.total_n,
                               "rows": self.n_train, "mean_tokens": float(self.token_sum) / max(self.total_n, 1)}}

    def save_outputs(self, run: RunDir, weights: dict[str, torch.Tensor], metrics: dict[str, Any],
                     info: dict[str, Any], log: list[dict[str, Any]]) -> dict[str, Any]:
        """The end-of-fit hook: rank 0 writes the parts from the model in memory (the final weights are
        loaded in it) - ``id_model.safetensors``, ``plm/``, ``heads.safetensors`` -, ``losses.json`` (the
        log's step records), ``dataset_meta.json`` and ``vocab.parquet``; every rank returns the
        pretraining metrics (the loop writes them to ``metrics.json``)."""
        if self.ctx.is_main:
            _save_parts(self.model, weights, run)
            write_json(run.path / "dataset_meta.json", self.data.meta)
            vocab = self.data.dataset_dir / "vocab.parquet"
            if vocab.exists():  # lets a later dataset reuse this run (vocabulary map)
                shutil.copy2(vocab, run.path / "vocab.parquet")
            write_json(run.path / "losses.json", [{"step": r["step"], **{k: r.get(k) for k in ("loss", *OBJECTIVES)}}
                                                  for r in log if r.get("event") == "step"])
        return pretrain_metrics(self.cfg, self.model, metrics, info)

    def predict(self, split: str, idx: torch.Tensor) -> torch.Tensor:  # pragma: no cover - no eval sets
        raise RuntimeError("pretraining has no evaluation split")

    # ------------------------------------------------------------------------------ checkpoint
    def extra_state(self) -> dict[str, Any]:
        return {
            "generator": self.generator.get_state(),
            "total_sum": self.total_sum.cpu(), "total_n": self.total_n,
            "recent": self.recent.cpu(), "recent_count": self.recent_count,
            "tokens": self.token_sum.detach().cpu(),
        }

    def load_extra_state(self, state: dict[str, Any]) -> None:
        self.generator.set_state(state["generator"])
        self.total_sum = state["total_sum"].to(self.device)
        self.total_n = int(state["total_n"])
        self.recent = state["recent"].to(self.device)
        self.recent_count = int(state["recent_count"])
        self.token_sum = state["tokens"].to(self.device)


# ------------------------------------------------------------- a global batch over the ranks
def rank_share(model: Any, batch: dict[str, torch.Tensor], masks: dict[str, torch.Tensor], ctx: DistContext):
    """This rank's contiguous slice of a global batch and of its masks (``model.mask`` on the global
    batch), trimmed to the slice's longest text; the scale of each objective's local loss
    (``W * n_local / n_global``); and the NCE noise draws of the ranks before and after this one,
    which the rank skips so that every rank's generator stays in step. Returns
    ``(local, local_masks, scales, skip_before, skip_after)``."""
    B, W = int(batch["x"].shape[0]), ctx.world
    lo, hi = ctx.bounds(B)
    empty = hi == lo
    if empty:  # fewer rows than ranks (a tiny last batch): a stand-in row, nothing masked, weight 0
        lo, hi = max(0, lo - 1), max(1, lo)
    local = {k: v[lo:hi] for k, v in batch.items()}
    local_masks = {k: v[lo:hi] for k, v in masks.items()}
    if empty:
        local_masks = _nothing_masked(local, local_masks)
    width = int(local["attention_mask"].sum(dim=1).max())
    for k in ("input_ids", "attention_mask"):
        local[k] = local[k][:, :width]
    for k in ("masked_ids", "mlm_labels"):
        if k in local_masks:
            local_masks[k] = local_masks[k][:, :width]
    scales = _rank_scales(batch, masks, local_masks, B, hi - lo, W, empty)
    skip_before = skip_after = 0
    if model.mtm is not None and model.mtm.loss_type == "nce":
        per_rank = [int(masks["tab_fields"][a:b].sum()) for a, b in (ctx.bounds(B, r) for r in range(W))]
        K = model.mtm.num_negatives
        skip_before = sum(per_rank[:ctx.rank]) * K
        skip_after = sum(per_rank[ctx.rank + 1:]) * K
    return local, local_masks, scales, skip_before, skip_after


def _rank_scales(batch, masks, local_masks, B, rows, W, empty) -> dict[str, torch.Tensor]:
    """``W * n_local / n_global`` per objective (0 for a padding-only rank)."""
    scales: dict[str, torch.Tensor] = {}
    dev = batch["x"].device

    def ratio(local: torch.Tensor, total: torch.Tensor) -> torch.Tensor:
        if empty:
            return torch.zeros((), device=dev)
        return W * local.float() / total.float().clamp_min(1.0)

    if "mlm_labels" in masks:
        scales["mlm"] = ratio((local_masks["mlm_labels"] != IGNORE_INDEX).sum(), (masks["mlm_labels"] != IGNORE_INDEX).sum())
    if "tab_fields" in masks:
        scales["mtm"] = ratio(local_masks["tab_fields"].sum(), masks["tab_fields"].sum())
    scales["icl"] = ratio(torch.tensor(rows, device=dev), torch.tensor(B, device=dev))
    return scales


def _nothing_masked(batch: dict[str, torch.Tensor], masks: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``masks`` of the rows of ``batch`` with nothing masked (a stand-in row that must not count)."""
    out = dict(masks)
    for key in ("text_fields", "tab_fields"):
        if key in out:
            out[key] = torch.zeros_like(out[key])
    if "masked_ids" in out:
        out["masked_ids"] = batch["input_ids"].clone()
        out["mlm_labels"] = torch.full_like(out["mlm_labels"], IGNORE_INDEX)
    if "x_masked" in out:
        out["x_masked"] = batch["x"].clone()
    return out


def _named(values: torch.Tensor) -> dict[str, float | None]:  # as Task.stat_fields, of reduced means
    return {k: None if math.isnan(v) else float(v) for k, v in zip(STAT_KEYS, values.tolist())}


def _derive_seed(seed: int, stream: int) -> int:
    """A seed for an independent stream ``stream`` of run seed ``seed`` (stable across versions)."""
    h = hashlib.sha256(f"flip-pretrain:{seed}:{stream}".encode()).digest()
    return int.from_bytes(h[:8], "little") & (2**63 - 1)


# --------------------------------------------------------------------------------- entry points
def pretrain_total_steps(pcfg: Any, n_train: int) -> int:
    """Optimizer steps of the whole run: ``epochs * ceil(ceil(N / batch) / grad_accum)``, capped by
    ``max_steps`` when > 0."""
    batches = math.ceil(n_train / max(1, int(pcfg.batch_size)))
    total = int(pcfg.epochs) * math.ceil(batches / max(1, int(pcfg.grad_accum)))
    return max(1, min(total, int(pcfg.max_steps)) if int(pcfg.max_steps) > 0 else total)


def pretrain_settings(cfg: Config, device: torch.device, n_train: int, ctx: DistContext | None = None) -> LoopSettings:
    p, r = cfg.pretrain, cfg.run
    ctx = ctx or DistContext()
    total = pretrain_total_steps(p, n_train)
    return LoopSettings(
        epochs=p.epochs,
        batch_size=p.batch_size,
        patience=0,
        checkpoint_every=r.checkpoint_every,
        progress=r.progress and ctx.is_main,
        device=str(device),
        max_steps=p.max_steps,
        grad_accum=max(1, p.grad_accum),
        log_every=max(1, min(50, total * max(1, p.grad_accum) // 100)),
        optimizer_steps=True,
    )


def pretrain(cfg: Config, dataset_dir: str | Path, out_dir: str | Path) -> dict[str, Any]:
    """Run (or resume, or recognise as finished) the pretraining stage; returns ``metrics.json``
    (the module docstring says what is trained and what is written)."""
    from flip.models import check_model_name
    from flip.models.plm import load_tokenizer
    from flip.train.without_alignment import nothing_to_align, save_unaligned

    dataset_dir, out = Path(dataset_dir), Path(out_dir)
    check_model_name(cfg.id_model.name)  # before any work or output
    if nothing_to_align(cfg):  # Table 5's "w/o MLM&MTM&ICL": the initial models, in a pretraining run's layout
        return save_unaligned(cfg, dataset_dir, out)
    set_threads(cfg.run.threads)
    ctx, device = init_distributed(cfg.run.device)
    try:
        seed = int(cfg.run.seeds[0]) if cfg.run.seeds else 0
        fingerprint = pretrain_fingerprint(cfg, dataset_dir, seed, ctx.world)

        # a finished run (rank 0 decides for everyone)
        done = RunDir(out).finished(fingerprint) if ctx.is_main else None
        done = broadcast(done, ctx)
        if done is not None:
            missing = [p for p in PARTS if not (out / p).exists()] if ctx.is_main else []
            if missing:  # an older version's run interrupted before its parts were written
                raise FlipError(f"{out} holds a pretraining run without {', '.join(missing)}. Fix: delete {out} "
                                "and run `flip pretrain` again.")
            return done

        tokenizer = load_tokenizer(cfg.plm.name)
        data = load_pretrain_data(cfg, dataset_dir, tokenizer, device, ctx, progress=cfg.run.progress)
        run_dir = out if ctx.is_main else out / f".rank-{ctx.rank}"
        settings = pretrain_settings(cfg, device, len(data), ctx)
        info = {"stage": "pretrain", "dataset_dir": str(dataset_dir), "world_size": ctx.world,
                "plm": cfg.plm.name, "precision": "bf16" if pretrain_bf16(cfg, device) else "fp32"}
        result = fit(lambda: PretrainTask(cfg, data, device, seed, ctx), settings, run_dir, seed=seed,
                     config=cfg.to_dict(), fingerprint=fingerprint, info=info)
        if not ctx.is_main:
            result = None
            if ctx.distributed:
                shutil.rmtree(run_dir, ignore_errors=True)
        return broadcast(result, ctx)
    finally:
        if ctx.owns_group:
            import torch.distributed as dist

            dist.barrier()
            dist.destroy_process_group()


PARTS = ("id_model.safetensors", "plm", "heads.safetensors")  # what save_outputs writes besides the loop


def _save_parts(model: FlipPretrainModel, weights: dict[str, torch.Tensor], run: RunDir) -> None:
    """The encoders separately (``id_model.safetensors``, ``plm/``: FlipPretrainModel.save_parts, made
    aside and moved into place) and the MLM/MTM/ICL heads (``heads.safetensors``): each weight once."""
    out = run.path
    tmp = out / ".parts.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_parts(tmp)
    for name in ("id_model.safetensors", "plm"):
        target = out / name
        if target.is_dir():
            shutil.rmtree(target)
        os.replace(tmp / name, target)
    shutil.rmtree(tmp, ignore_errors=True)
    run.write_weights(FlipPretrainModel.split_state_dict(weights)["heads"], "heads.safetensors")


def pretrain_metrics(cfg: Config, model: FlipPretrainModel, metrics: dict[str, Any],
                     info: dict[str, Any]) -> dict[str, Any]:
    """``metrics.json`` of a pretraining run: the task's statistics (``info["statistics"]``, see
    :meth:`PretrainTask.run_summary`), the loop's ``train`` numbers, sizes and FLOPs."""
    summary = info["statistics"]
    final, mean = summary["final"], summary["mean"]
    train = metrics.get("train", metrics)
    mean_tokens = float(summary.get("mean_tokens") or 0.0)
    masked_tokens = float(mean.get("mlm_tokens") or 0.0)
    masked_fields = float(mean.get("mtm_fields") or 0.0)
    flops = model.flops_per_sample(mean_tokens, masked_tokens, masked_fields, cfg.pretrain.batch_size)
    sps = float(train.get("samples_per_second", 0.0))
    return {
        **{k: final.get(k) for k in ("loss", *OBJECTIVES)},
        "accuracy": {k: final.get(f"{k}_acc") for k in OBJECTIVES},
        "mean": {k: mean.get(k) for k in ("loss", *OBJECTIVES)},
        "mean_accuracy": {k: mean.get(f"{k}_acc") for k in OBJECTIVES},
        "objectives": [k for k in OBJECTIVES if final.get(k) is not None],
        "steps": int(train["steps"]),
        "epochs": int(train.get("epochs", 0)),
        "samples": int(summary.get("samples", 0)),
        "rows": int(summary.get("rows", 0)),
        "samples_per_second": sps,
        "seconds": float(train.get("seconds", 0.0)),
        "batch_size": int(cfg.pretrain.batch_size),
        "grad_accum": int(cfg.pretrain.grad_accum),
        "world_size": int(info.get("world_size", 1)),
        "max_length": int(cfg.plm.max_length),
        "mean_tokens": mean_tokens,
        "masked_tokens_per_sample": masked_tokens,
        "masked_fields_per_sample": masked_fields,
        "plm": cfg.plm.name,
        "id_model": cfg.id_model.name,
        "device": info.get("device"),
        "precision": info.get("precision"),
        "params": int(metrics.get("params", sum(p.numel() for p in model.parameters()))),
        "plm_params": int(sum(p.numel() for p in model.plm.parameters())),
        "id_model_params": int(sum(p.numel() for p in model.id_model.parameters())),
        "flops_per_sample": flops,
        "achieved_tflops": flops * sps / 1e12,
        "train": train,
    }
