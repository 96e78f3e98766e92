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
    optimizer steps (reduced CPU profile). The prediction layer of the ID model (``fc``, and a
    first-order term where the model has one) takes no part in pretraining: it is frozen (the
    authors' code computes it and throws it away; finetuning puts a fresh head there).

Precision
    ``pretrain.precision`` (see :mod:`flip.train.precision`): ``auto`` = bf16 autocast where
    the hardware does bf16 natively (CUDA, CPUs with AVX512-BF16/AMX), else fp32; ``bf16`` /
    ``fp32`` force it. Weights and optimizer state stay fp32.

Randomness, resuming
    The loop seeds everything with ``run.seeds[0]`` (one pretraining run; finetuning repeats
    seeds) and draws the batch order. Masks and NCE noise come from a CPU ``torch.Generator`` of
    their own, seeded from the run seed and checkpointed with the task, so the same seed gives the
    same run and a resumed run (``FLIP_CRASH_AFTER_STEPS`` / a kill, then the same command) ends
    with the same metrics and weights as an uninterrupted one. Checkpoints: every epoch and every
    ``run.checkpoint_every`` batches (``OUT/checkpoint/``, removed at the end).

Distributed (torchrun)
    The same command runs on one CPU, one GPU or N GPUs/nodes: ``torchrun --nproc-per-node N -m
    flip.cli pretrain ...``. When ``WORLD_SIZE > 1`` the process group is initialised (NCCL on
    CUDA, gloo on CPU or with ``run.device=cpu``), each rank uses ``cuda:LOCAL_RANK`` and the
    model is wrapped in DDP (``find_unused_parameters`` only when an ablation leaves an encoder
    unused). Every rank walks the same permutation; each global batch of ``batch_size`` rows is
    cut into contiguous, balanced per-rank slices. So that N ranks compute what one process
    would:

    * masks are drawn on the GLOBAL batch from the shared generator (identical on every rank),
      then sliced; NCE noise too (each rank skips the draws that belong to the ranks before it,
      so all generators stay in step);
    * each objective's local loss is rescaled by ``W * n_local / n_global`` (n = masked tokens
      for MLM, masked fields for MTM, rows for ICL), so that DDP's gradient average equals the
      gradient of the global-batch mean;
    * ICL negatives are all-gathered across ranks by ``flip.align.objectives`` with an autograd
      all-gather (every rank's block carries its gradient), so with the scaling above the ICL
      gradient matches a single process too (the authors' code keeps only the local block's
      gradient; with the paper's dot-product similarity that partial gradient made ICL diverge on
      2 ranks, ``tests/train/test_ddp.py``);
    * dropout draws differ per rank (each rank's RNG is offset after model initialisation).

    Only rank 0 writes ``OUT``; rank ``r > 0`` runs the loop in ``OUT/.rank-r`` (its own
    checkpoints, needed to resume; removed at the end). Logged losses are all-reduced global means.

Outputs (``OUT``)
    ``config.json``      the full configuration (``flip.config.Config`` as a dict)
    ``run.json``         fingerprint, seed, device, versions, world size
    ``metrics.json``     ``loss``/``mlm``/``mtm``/``icl`` (final = mean of the last
                         min(50, steps) batches), ``mean`` (over the whole run), accuracies,
                         ``steps``, ``samples_per_second``, ``seconds``, ``batch_size``,
                         ``max_length``, ``mean_tokens``, ``plm``, ``params``, FLOPs per sample
                         (formula in :func:`flops_per_sample`), ``achieved_tflops``, ``train``
                         (the loop's own numbers)
    ``log.jsonl``        the loop's log; each ``step`` record carries ``step`` (optimizer steps so
                         far; the loop's step-in-epoch is kept as ``epoch_step``), ``loss``,
                         ``mlm``, ``mtm``, ``icl`` (+ ``*_acc``), ``samples_per_second``, ``lr``;
                         ``epoch`` records carry the epoch means per objective
    ``losses.json``      the step records as a list (DVC plots: x ``step``, y ``mlm``/``mtm``/``icl``)
    ``model.safetensors``  the whole ``FlipPretrainModel`` state dict (encoders + heads)
    ``id_model.safetensors``  the ID model alone (``IdModel.state_dict()``; ``fc`` untrained)
    ``plm/``             the aligned encoder + tokenizer in Hugging Face format: ``plm.name=OUT/plm``
                         loads it with ``load_plm``
    ``dataset_meta.json``  the processed dataset's ``meta.json`` (finetuning checks the vocabulary)

Finetuning (``flip.train.strategies``) reads ``id_model.safetensors``, ``plm/``, ``config.json`` and
``dataset_meta.json``.

Imports only torch, numpy, pyarrow, safetensors, tqdm, PyYAML and the standard library (transformers
lazily, through ``flip.models.plm``); nothing happens at import.
"""

from __future__ import annotations

import contextlib
import datetime
import hashlib
import json
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
from flip.align.model import OBJECTIVES, FlipPretrainModel, load_feature_counts, pretrain_batch
from flip.config import Config
from flip.data.tensors import load_meta, load_tabular
from flip.data.tokens import TokenizedSplit, tokenize_split
from flip.io import atomic_file, read_json, write_json
from flip.models.layers import HEAD_MODULES
from flip.train.identity import pretrain_fingerprint
from flip.train.loop import (
    LoopSettings,
    Task,
    finished_metrics,
    fit,
    resolve_device,
    set_threads,
)
from flip.train.precision import autocast, use_bf16

__all__ = [
    "DistContext",
    "PretrainData",
    "PretrainTask",
    "flops_per_sample",
    "init_distributed",
    "load_pretrain_data",
    "pretrain",
    "pretrain_settings",
]

# per-batch statistics kept by the task, in this order
STAT_KEYS = ("loss", "mlm", "mtm", "icl", "mlm_acc", "mtm_acc", "icl_acc", "mlm_tokens", "mtm_fields")
RECENT = 50  # "final" losses = mean over the last RECENT batches


# ----------------------------------------------------------------------------------- distributed
@dataclass
class DistContext:
    """Where this process stands in a (possibly trivial) process group."""

    world: int = 1
    rank: int = 0
    local_rank: int = 0
    owns_group: bool = False  # this module initialised the group (and destroys it at the end)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world > 1

    def barrier(self) -> None:
        if self.distributed:
            import torch.distributed as dist

            dist.barrier()

    def bounds(self, n: int, rank: int | None = None) -> tuple[int, int]:
        """Contiguous balanced slice ``[lo, hi)`` of ``n`` rows for ``rank`` (default: this one)."""
        r = self.rank if rank is None else rank
        return (r * n) // self.world, ((r + 1) * n) // self.world


def init_distributed(device_name: str) -> tuple[DistContext, torch.device]:
    """Join the torchrun process group when ``WORLD_SIZE > 1`` (NCCL on CUDA, gloo on CPU).

    An already-initialised group (e.g. by a test) is used as it is. Returns the context and the
    device of this rank (``cuda:LOCAL_RANK`` on CUDA).
    """
    import torch.distributed as dist

    world = int(os.environ.get("WORLD_SIZE", "1") or 1)
    if dist.is_available() and dist.is_initialized():
        ctx = DistContext(dist.get_world_size(), dist.get_rank(), int(os.environ.get("LOCAL_RANK", "0") or 0))
    elif world > 1:
        device = resolve_device(device_name)
        backend = "nccl" if device.type == "cuda" else "gloo"
        # generous timeout: rank 0 tokenizes the training split while the others wait at a barrier
        dist.init_process_group(backend=backend, timeout=datetime.timedelta(hours=2))
        ctx = DistContext(dist.get_world_size(), dist.get_rank(), int(os.environ.get("LOCAL_RANK", "0") or 0), True)
    else:
        return DistContext(), resolve_device(device_name)
    device = resolve_device(device_name)
    if device.type == "cuda":
        device = torch.device("cuda", ctx.local_rank)
        torch.cuda.set_device(device)
    return ctx, device


def _all_reduce_sum(t: torch.Tensor, ctx: DistContext) -> torch.Tensor:
    if ctx.distributed:
        import torch.distributed as dist

        t = t.clone()
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def pretrain_bf16(cfg: Config, device: torch.device) -> bool:
    """Whether pretraining runs under bf16 autocast (``pretrain.precision``, see flip.train.precision)."""
    return use_bf16(cfg.pretrain.precision, device, "pretrain.precision")


# ------------------------------------------------------------------------------------------ data
@dataclass
class PretrainData:
    """The training split as tensors on the device: ids, tokens, metadata, feature counts."""

    dataset_dir: Path
    meta: dict[str, Any]
    x: torch.Tensor  # (N, F) int64 global ids
    tokens: TokenizedSplit  # tensors on the device
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
    tab = load_tabular(d, "train").head(cfg.pretrain.max_rows)
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
    return PretrainData(d, meta, tab.x.to(device), tokens.to(device), counts)


# ------------------------------------------------------------------------------------------ model
class _PresetMaskModel(FlipPretrainModel):
    """``FlipPretrainModel`` whose masks may be drawn outside ``forward`` (on the global batch of a
    distributed step) and handed in: ``model.preset = masks`` before the call. Same state dict."""

    preset: dict[str, torch.Tensor] | None = None

    def mask(self, batch: dict[str, torch.Tensor], generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
        preset, self.preset = self.preset, None
        if preset is not None:
            return preset
        return super().mask(batch, generator)


def _freeze_heads(id_model: nn.Module) -> list[str]:
    """Freeze the prediction layer(s) of an ID model (unused by pretraining); returns their names."""
    frozen = []
    for name in HEAD_MODULES:
        module = getattr(id_model, name, None)
        if isinstance(module, nn.Module):
            for p in module.parameters():
                p.requires_grad_(False)
            frozen.append(name)
    return frozen


def _encoders_used(pcfg: Any) -> tuple[bool, bool]:
    """(PLM used, ID model used) by the enabled objectives (an unused one needs find_unused_parameters)."""
    mlm, mtm, icl = (float(getattr(pcfg, f"{k}_weight")) > 0 for k in OBJECTIVES)
    joint = bool(pcfg.joint_reconstruction)
    return mlm or icl or (mtm and joint), mtm or icl or (mlm and joint)


def _non_embedding_params(module: nn.Module) -> int:
    emb = {id(p) for m in module.modules() if isinstance(m, nn.Embedding) for p in m.parameters(recurse=False)}
    return sum(p.numel() for p in module.parameters() if id(p) not in emb)


def flops_per_sample(model: FlipPretrainModel, tokens: float, masked_tokens: float, masked_fields: float,
                     batch_size: int) -> float:
    """Analytic training FLOPs of one sample (forward + backward = 3 x forward), matmuls only.

    With ``T`` real tokens per sample, ``P_t`` the PLM's non-embedding parameters, ``n`` its
    layers, ``d`` its width, ``P_v`` the ID model's non-embedding parameters (embedding lookups
    are free), ``D_v`` = dim of v, ``V_t`` the text vocabulary, ``m`` masked tokens and ``k``
    masked fields per sample, ``K`` NCE noise ids, ``D_e`` the ID embedding size, ``p`` the ICL
    projection size, ``B`` the global batch:

        fwd = a·(2·P_t·T + 4·n·T²·d)                                   PLM passes (a = 1 or 2)
            + b·2·P_v                                                  ID passes (b = 1 or 2)
            + m·2·((d + D_v)·d + d·V_t)                                MLM head on masked tokens
            + 2·D_v·d + 4·T·d + 2·F·(D_v + d)·H + k·2·(H·D_e + (1+K)·D_e)   MTM
            + 2·p·(d + D_v) + 4·B·p                                    ICL projections + logits
        FLOPs/sample = 3 · fwd

    ``4·n·T²·d`` is the attention score and weighted-sum matmuls. Padding tokens are not counted,
    so MFU computed from this is conservative.
    """
    use_plm, use_id = _encoders_used(model.cfg)
    plm, idm = model.plm, model.id_model
    d = int(plm.hidden_size)
    layers = int(getattr(getattr(getattr(plm, "model", None), "config", None), "num_hidden_layers", 0) or 0)
    P_t = _non_embedding_params(plm)
    P_v = _non_embedding_params(idm)
    for name in HEAD_MODULES:  # the frozen prediction layer does not run
        m = getattr(idm, name, None)
        if isinstance(m, nn.Module):
            P_v -= _non_embedding_params(m)
    D_v = int(idm.output_dim)
    T = float(tokens)
    plm_pass = 2.0 * P_t * T + 4.0 * layers * T * T * d
    need_w = model.icl is not None or (model.mtm is not None and model.mtm.joint)
    need_v = model.icl is not None or (model.mlm is not None and model.mlm.joint)
    fwd = (int(need_w) + int(model.mlm is not None)) * plm_pass if use_plm else 0.0
    fwd += (int(need_v) + int(model.mtm is not None)) * 2.0 * P_v if use_id else 0.0
    if model.mlm is not None:
        fwd += masked_tokens * 2.0 * _non_embedding_params(model.mlm)
    if model.mtm is not None:
        heads = model.mtm.heads
        F_, H = int(heads.num_fields), int(heads.hidden_dim)
        De = int(model.mtm.out_embedding.embedding_dim)
        in_dim = int(heads.w1.shape[0])
        fwd += (2.0 * D_v * d + 4.0 * T * d) if model.mtm.joint else 0.0
        fwd += 2.0 * in_dim * F_ * H + masked_fields * 2.0 * (H * De + (1 + model.mtm.num_negatives) * De)
    if model.icl is not None:
        p = int(model.cfg.projection_dim)
        fwd += 2.0 * p * (d + D_v) + 4.0 * batch_size * p
    return 3.0 * fwd


# ------------------------------------------------------------------------------------------- task
class PretrainTask(Task):
    """The loop's view of pretraining (see the module docstring for the distributed scheme).

    ``model`` is the bare ``FlipPretrainModel`` (what is checkpointed and saved); ``ddp`` the DDP
    wrapper used for the forward pass when ``ctx.world > 1``. ``loss(idx)`` takes the GLOBAL batch.
    """

    def __init__(self, cfg: Config, data: PretrainData, device: torch.device, seed: int,
                 ctx: DistContext | None = None, plm: nn.Module | None = None) -> None:
        from flip.models import build_id_model
        from flip.models.plm import load_plm

        self.cfg, self.data, self.device = cfg, data, device
        self.ctx = ctx or DistContext()
        pcfg = cfg.pretrain
        id_model = build_id_model(cfg.id_model, data.num_fields, data.vocab_size)
        self.frozen = _freeze_heads(id_model)
        if plm is None:
            plm, _ = load_plm(cfg.plm)
        model = _PresetMaskModel(id_model, plm, pcfg, data.meta, data.counts).to(device)
        self.model = model
        self.n_train = len(data)
        self.eval_sets = {}
        self.bf16 = pretrain_bf16(cfg, device)

        # one rate for everything (the paper), or the language model at pretrain.plm_lr (> 0) and the
        # rest (ID model, the fresh MLM/MTM/ICL heads) at pretrain.lr
        plm_ids = {id(p) for p in model.plm.parameters()} if pcfg.plm_lr > 0 else set()
        params = [p for p in model.parameters() if p.requires_grad and id(p) not in plm_ids]
        groups = [{"params": params}]
        if plm_ids:
            groups.append({"params": [p for p in model.plm.parameters() if p.requires_grad], "lr": pcfg.plm_lr})
        fused = {"fused": True} if device.type in ("cpu", "cuda") else {}
        self.optimizer = torch.optim.AdamW(groups, lr=pcfg.lr, weight_decay=pcfg.weight_decay, **fused)
        self.batch_size = int(pcfg.batch_size)
        self.accum = max(1, int(pcfg.grad_accum))
        self.steps_per_epoch = math.ceil(self.n_train / self.batch_size)
        self.total_steps = pretrain_total_steps(pcfg, self.n_train)
        warmup, total = int(pcfg.warmup_steps), self.total_steps

        def lr_factor(step: int) -> float:
            if warmup > 0 and step < warmup:
                return (step + 1) / warmup
            progress = (step - warmup) / max(1, total - warmup)
            return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lr_factor)

        self.ddp: nn.Module | None = None
        if self.ctx.distributed:
            from torch.nn.parallel import DistributedDataParallel as DDP

            use_plm, use_id = _encoders_used(pcfg)
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

        # loop position (mirrors fit's counters, to know where fit writes its log records)
        self.epoch, self.step, self.global_step, self.micro = 0, 0, 0, 0
        self.log_every = 100
        self.max_steps = int(pcfg.max_steps)
        K = len(STAT_KEYS)
        z = lambda: torch.zeros(K, dtype=torch.float64, device=device)  # noqa: E731
        self.window, self.window_n = z(), 0
        self.epoch_sum, self.epoch_n = z(), 0
        self.total_sum, self.total_n = z(), 0
        self.recent = torch.zeros(RECENT, K, dtype=torch.float64, device=device)
        self.recent_count = 0
        self.token_sum = torch.zeros((), dtype=torch.float64, device=device)  # real tokens seen (FLOPs)
        self.records: list[dict[str, Any]] = []
        self.epoch_records: list[dict[str, Any]] = []
        self._resumed_step: int | None = None
        self._checked = not self.ctx.distributed

    # ----------------------------------------------------------------------- distributed details
    def _scale_hook(self, name: str):
        def hook(module: nn.Module, inputs: Any, output: dict[str, torch.Tensor]):
            scale = self._scales.get(name)
            if scale is None:
                return None
            return {**output, "loss": output["loss"] * scale.to(output["loss"].dtype)}

        return hook

    def _check_ranks_in_step(self) -> None:
        """All ranks must resume from the same checkpoint position (each keeps its own)."""
        import torch.distributed as dist

        mine = torch.tensor([self.global_step, self.epoch, self.step], dtype=torch.long, device=self.device)
        every = [torch.zeros_like(mine) for _ in range(self.ctx.world)]
        dist.all_gather(every, mine)
        positions = [tuple(int(v) for v in t.tolist()) for t in every]
        if len(set(positions)) != 1:
            raise RuntimeError(
                f"ranks resumed from different checkpoints (global_step, epoch, step per rank: {positions}); "
                "delete OUT/checkpoint and OUT/.rank-*/checkpoint to start over")
        self._checked = True

    # ------------------------------------------------------------------------------------- loss
    def loss(self, idx: torch.Tensor) -> torch.Tensor:
        if not self._checked:
            self._check_ranks_in_step()
        ctx, model = self.ctx, self.model
        batch = pretrain_batch(self.data.x, self.data.tokens, idx)  # the global batch, trimmed
        B = int(idx.shape[0])
        masks = model.mask(batch, self.generator)  # global draws, identical on every rank
        W = ctx.world
        skip_before = skip_after = 0
        if ctx.distributed:
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
            self._scales = self._rank_scales(batch, masks, local_masks, B, hi - lo, W, empty)
            if model.mtm is not None and model.mtm.loss_type == "nce":
                per_rank = [int(masks["tab_fields"][a:b].sum()) for a, b in (ctx.bounds(B, r) for r in range(W))]
                K = model.mtm.num_negatives
                skip_before = sum(per_rank[:ctx.rank]) * K
                skip_after = sum(per_rank[ctx.rank + 1:]) * K
        else:
            local, local_masks = batch, masks
        self.token_sum += batch["attention_mask"].sum()  # real tokens of the global batch (no sync)
        if skip_before:
            torch.rand(skip_before, generator=self.generator, dtype=torch.float64)
        model.preset = local_masks
        module = self.ddp if self.ddp is not None else model
        last_micro = self.micro + 1 == self.accum or self.step + 1 == self.steps_per_epoch
        sync = contextlib.nullcontext() if (self.ddp is None or last_micro) else self.ddp.no_sync()
        with sync, autocast(self.device, self.bf16):
            out = module(local, self.generator)
        model.preset = None
        if skip_after:
            torch.rand(skip_after, generator=self.generator, dtype=torch.float64)
        self._record(out, B, W)
        return out["loss"]

    def _rank_scales(self, batch, masks, local_masks, B, rows, W, empty) -> dict[str, torch.Tensor]:
        """``W * n_local / n_global`` per objective (0 for a padding-only rank)."""
        scales: dict[str, torch.Tensor] = {}
        dev = self.device

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

    # ---------------------------------------------------------------------------- statistics
    def _record(self, out: dict[str, torch.Tensor], B: int, W: int) -> None:
        """Accumulate this batch's (rank-local share of the) statistics; write a record where fit does."""
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
        self.window += u * B
        self.window_n += B
        self.epoch_sum += u * B
        self.epoch_n += B
        self.total_sum += u * B
        self.total_n += B
        self.recent[self.recent_count % RECENT] = u
        self.recent_count += 1

        # the loop's counters after this batch
        self.micro += 1
        if self.micro == self.accum or self.step + 1 == self.steps_per_epoch:
            self.micro = 0
            self.global_step += 1
        self.step += 1
        stop = self.max_steps > 0 and self.global_step >= self.max_steps and self.micro == 0
        if self.step % self.log_every == 0 or self.step == self.steps_per_epoch or stop:
            mean = _all_reduce_sum(self.window, self.ctx) / max(self.window_n, 1)
            self.records.append({"epoch": self.epoch + 1, "epoch_step": self.step, "step": self.global_step,
                                 **_stats_dict(mean.tolist())})
            self.window.zero_()
            self.window_n = 0
        if self.step == self.steps_per_epoch or stop:
            mean = _all_reduce_sum(self.epoch_sum, self.ctx) / max(self.epoch_n, 1)
            self.epoch_records.append({"epoch": self.epoch + 1, **_stats_dict(mean.tolist())})
            self.epoch_sum.zero_()
            self.epoch_n = 0
            self.epoch += 1
            self.step = 0

    def statistics(self) -> dict[str, Any]:
        """Final (last ``RECENT`` batches) and whole-run means per statistic, global over ranks."""
        total = _all_reduce_sum(self.total_sum, self.ctx) / max(self.total_n, 1)
        n = min(self.recent_count, RECENT)
        recent = _all_reduce_sum(self.recent, self.ctx)
        if n < RECENT:
            final = recent[:n].mean(0) if n else total
        else:
            final = recent.mean(0)
        return {"final": _stats_dict(final.tolist()), "mean": _stats_dict(total.tolist()),
                "records": list(self.records), "epochs": list(self.epoch_records),
                "global_step": self.global_step, "samples": self.total_n, "rows": self.n_train,
                "mean_tokens": float(self.token_sum) / max(self.total_n, 1)}

    def predict(self, split: str, idx: torch.Tensor) -> torch.Tensor:  # pragma: no cover - no eval sets
        raise RuntimeError("pretraining has no evaluation split")

    # ------------------------------------------------------------------------------ checkpoint
    def extra_state(self) -> dict[str, Any]:
        state = {
            "generator": self.generator.get_state(),
            "position": torch.tensor([self.epoch, self.step, self.global_step, self.micro]),
            "epoch_sum": self.epoch_sum.cpu(), "epoch_n": self.epoch_n,
            "total_sum": self.total_sum.cpu(), "total_n": self.total_n,
            "recent": self.recent.cpu(), "recent_count": self.recent_count,
            "tokens": self.token_sum.detach().cpu(),
            "records": json.dumps(self.records), "epoch_records": json.dumps(self.epoch_records),
        }
        if self.on_checkpoint is not None:
            self.on_checkpoint(self)
        return state

    on_checkpoint: Any = None  # called with the task at every checkpoint (the summary sidecar)

    def load_extra_state(self, state: dict[str, Any]) -> None:
        self.generator.set_state(state["generator"])
        self.epoch, self.step, self.global_step, self.micro = (int(v) for v in state["position"].tolist())
        self.epoch_sum = state["epoch_sum"].to(self.device)
        self.epoch_n = int(state["epoch_n"])
        self.total_sum = state["total_sum"].to(self.device)
        self.total_n = int(state["total_n"])
        self.recent = state["recent"].to(self.device)
        self.recent_count = int(state["recent_count"])
        self.token_sum = state["tokens"].to(self.device)
        self.records = json.loads(state["records"])
        self.epoch_records = json.loads(state["epoch_records"])
        # the loop restarts its log window at a resume: so do we
        self.window.zero_()
        self.window_n = 0


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


def _stats_dict(values: list[float]) -> dict[str, float | None]:
    out: dict[str, float | None] = {}
    for key, v in zip(STAT_KEYS, values):
        out[key] = None if (v is None or math.isnan(v)) else float(v)
    return out


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
    if int(pcfg.max_steps) > 0:
        total = min(total, int(pcfg.max_steps))
    return max(1, total)


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
    )


def pretrain(cfg: Config, dataset_dir: str | Path, out_dir: str | Path) -> dict[str, Any]:
    """Run (or resume, or recognise as finished) the pretraining stage; returns ``metrics.json``.

    See the module docstring for what is trained, the distributed scheme and the output layout.
    """
    from flip.models.plm import load_tokenizer
    from flip.train.unaligned import nothing_to_align, save_unaligned

    dataset_dir, out = Path(dataset_dir), Path(out_dir)
    from flip.models import check_model_name

    check_model_name(cfg.id_model.name)  # before any work or output
    if nothing_to_align(cfg):  # Table 5's "w/o MLM&MTM&ICL": the initial models, in a pretraining run's layout
        return save_unaligned(cfg, dataset_dir, out) if os.environ.get("RANK", "0") == "0" else {}
    set_threads(cfg.run.threads)
    ctx, device = init_distributed(cfg.run.device)
    try:
        seed = int(cfg.run.seeds[0]) if cfg.run.seeds else 0
        fingerprint = pretrain_fingerprint(cfg, dataset_dir, seed, ctx.world)

        # a finished run (rank 0 decides for everyone)
        done = finished_metrics(out, fingerprint) if ctx.is_main else None
        done = _broadcast(done, ctx)
        if done is not None:
            if ctx.is_main:
                done = _complete_outputs(cfg, dataset_dir, out, done)
            return done

        tokenizer = load_tokenizer(cfg.plm.name)
        data = load_pretrain_data(cfg, dataset_dir, tokenizer, device, ctx, progress=cfg.run.progress)
        run_dir = out if ctx.is_main else out / f".rank-{ctx.rank}"
        holder: dict[str, PretrainTask] = {}
        settings = pretrain_settings(cfg, device, len(data), ctx)

        def build() -> PretrainTask:
            task = PretrainTask(cfg, data, device, seed, ctx)
            task.log_every = settings.log_every
            if ctx.is_main:
                task.on_checkpoint = lambda t: write_json(out / "objectives.json", t.statistics())
            elif ctx.distributed:
                task.on_checkpoint = lambda t: t.statistics()  # the same collectives as rank 0
            holder["task"] = task
            return task

        info = {"stage": "pretrain", "dataset_dir": str(dataset_dir), "world_size": ctx.world,
                "plm": cfg.plm.name, "precision": "bf16" if pretrain_bf16(cfg, device) else "fp32"}
        fit_metrics = fit(build, settings, run_dir, seed=seed, config=cfg.to_dict(), fingerprint=fingerprint, info=info)
        task = holder.get("task")
        summary = task.statistics() if task is not None else None
        result = None
        if ctx.is_main:
            if summary is not None:
                write_json(out / "objectives.json", summary)
            result = _complete_outputs(cfg, dataset_dir, out, fit_metrics, task=task)
        elif ctx.distributed:
            shutil.rmtree(run_dir, ignore_errors=True)
        return _broadcast(result, ctx)
    finally:
        if ctx.owns_group:
            import torch.distributed as dist

            dist.barrier()
            dist.destroy_process_group()


def _broadcast(obj: Any, ctx: DistContext) -> Any:
    if not ctx.distributed:
        return obj
    import torch.distributed as dist

    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def _complete_outputs(cfg: Config, dataset_dir: Path, out: Path, metrics: dict[str, Any],
                      task: PretrainTask | None = None) -> dict[str, Any]:
    """Write what the loop does not (parts, merged log, losses.json, full metrics); idempotent, so a
    run killed between the loop's outputs and these is completed by running the command again."""
    if "objectives" in metrics and (out / "plm").is_dir() and (out / "id_model.safetensors").exists():
        return metrics
    summary_file = out / "objectives.json"
    summary = read_json(summary_file) if summary_file.exists() else None
    if summary is None:
        raise RuntimeError(f"{out}: the pretraining statistics (objectives.json) are missing; delete {out} and rerun")

    # the encoders, separately: id_model.safetensors + plm/ (Hugging Face format)
    model = task.model if task is not None else _rebuild_model(cfg, dataset_dir, out)
    tmp = out / ".parts.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_parts(tmp)
    for name in ("id_model.safetensors", "plm"):
        target = out / name
        if target.is_dir():
            shutil.rmtree(target)
        os.replace(tmp / name, target)
    shutil.rmtree(tmp, ignore_errors=True)
    write_json(out / "dataset_meta.json", load_meta(dataset_dir))
    if (Path(dataset_dir) / "vocab.parquet").exists():  # lets a later dataset reuse this run (vocabulary map)
        shutil.copy2(Path(dataset_dir) / "vocab.parquet", out / "vocab.parquet")

    # log.jsonl: per-objective values in the loop's step/epoch records
    records = {(r["epoch"], r["epoch_step"]): r for r in summary["records"]}
    epochs = {r["epoch"]: r for r in summary["epochs"]}
    lines, losses = [], []
    log_file = out / "log.jsonl"
    for line in log_file.read_text(encoding="utf-8").splitlines() if log_file.exists() else []:
        rec = json.loads(line)
        if rec.get("event") == "step":
            if "epoch_step" not in rec:  # not merged yet (this function may run twice)
                mine = records.get((rec.get("epoch"), rec.get("step")))
                rec["epoch_step"] = rec.get("step")
                rec["step"] = rec.get("global_step", rec.get("step"))
                if mine is not None:
                    rec.update({k: v for k, v in mine.items() if k not in ("epoch", "epoch_step", "step")})
            losses.append({"step": rec["step"], **{k: rec.get(k) for k in ("loss", *OBJECTIVES)}})
        elif rec.get("event") == "epoch" and rec.get("epoch") in epochs:
            rec.update({k: v for k, v in epochs[rec["epoch"]].items() if k != "epoch"})
        lines.append(json.dumps(rec))
    with atomic_file(log_file) as tmpf:
        tmpf.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    write_json(out / "losses.json", losses)

    # metrics.json
    final, mean = summary["final"], summary["mean"]
    train = metrics.get("train", metrics)
    mean_tokens = float(summary.get("mean_tokens") or 0.0)
    masked_tokens = float(mean.get("mlm_tokens") or 0.0)
    masked_fields = float(mean.get("mtm_fields") or 0.0)
    flops = flops_per_sample(model, mean_tokens, masked_tokens, masked_fields, cfg.pretrain.batch_size)
    sps = float(train.get("samples_per_second", 0.0))
    run = read_json(out / "run.json") if (out / "run.json").exists() else {}
    result = {
        **{k: final.get(k) for k in ("loss", *OBJECTIVES)},
        "accuracy": {k: final.get(f"{k}_acc") for k in OBJECTIVES},
        "mean": {k: mean.get(k) for k in ("loss", *OBJECTIVES)},
        "mean_accuracy": {k: mean.get(f"{k}_acc") for k in OBJECTIVES},
        "objectives": [k for k in OBJECTIVES if final.get(k) is not None],
        "steps": int(train.get("steps", summary.get("global_step", 0))),
        "epochs": int(train.get("epochs", 0)),
        "samples": int(summary.get("samples", 0)),
        "rows": int(summary.get("rows", 0)),
        "samples_per_second": sps,
        "seconds": float(train.get("seconds", 0.0)),
        "batch_size": int(cfg.pretrain.batch_size),
        "grad_accum": int(cfg.pretrain.grad_accum),
        "world_size": int(run.get("world_size", 1)),
        "max_length": int(cfg.plm.max_length),
        "mean_tokens": mean_tokens,
        "masked_tokens_per_sample": masked_tokens,
        "masked_fields_per_sample": masked_fields,
        "plm": cfg.plm.name,
        "id_model": cfg.id_model.name,
        "device": run.get("device"),
        "precision": run.get("precision"),
        "params": int(metrics.get("params", sum(p.numel() for p in model.parameters()))),
        "plm_params": int(sum(p.numel() for p in model.plm.parameters())),
        "id_model_params": int(sum(p.numel() for p in model.id_model.parameters())),
        "flops_per_sample": flops,
        "achieved_tflops": flops * sps / 1e12,
        "train": train,
    }
    write_json(out / "metrics.json", result)
    return result


def _rebuild_model(cfg: Config, dataset_dir: Path, out: Path) -> FlipPretrainModel:
    """The pretraining module with the run's final weights (``model.safetensors``)."""
    from safetensors.torch import load_file

    from flip.models import build_id_model
    from flip.models.plm import load_plm

    meta = load_meta(dataset_dir)
    plm, _ = load_plm(cfg.plm)
    id_model = build_id_model(cfg.id_model, len(meta["fields"]), int(meta["vocab_size"]))
    model = FlipPretrainModel(id_model, plm, cfg.pretrain, meta, load_feature_counts(dataset_dir, meta["vocab_size"]))
    model.load_state_dict(load_file(str(out / "model.safetensors")))
    return model

