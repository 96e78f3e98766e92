"""The one training loop every strategy runs through (scratch, FLIP finetuning, FLIP pretraining).

A strategy supplies a :class:`Task` - the model, its optimizer (and optional LR scheduler), a
``loss(idx)`` on a batch of training-row indices and a ``predict(split, idx)`` returning logits -
and :func:`fit` trains it, reading top to bottom:

1. **A finished run** (:meth:`flip.runs.RunDir.finished`: ``metrics.json`` + ``run.json`` of the same
   fingerprint) is recognised and not re-run.
2. **Seeding.** ``torch``/``random``/``numpy`` are seeded before the task is built (so model
   initialisation is seeded too); the same seed gives bit-identical weights and metrics on CPU
   (``benchmarks/same_seed_check.py``).
3. **Resuming.** A checkpoint of the same fingerprint (:class:`~flip.train.callbacks.Checkpointer`) puts
   back the model, optimizer, scheduler, :class:`FitState`, the task's extra state, the RNGs and the
   log; running the same command again after a kill ends with the same metrics as an uninterrupted run.
4. **Epochs.** An epoch is a permutation of ``range(n_train)`` drawn from a ``torch.Generator`` seeded
   with the run's seed (its state at the start of the epoch is checkpointed: the permutation is
   re-drawn); batches are slices of it: no DataLoader, no per-sample Python. ``grad_accum`` batches make
   one optimizer step; a task that trains through ``DistributedDataParallel`` (``Task.ddp``) has its
   gradients all-reduced only by the batch that ends a step (``require_backward_grad_sync``, as
   nanoGPT's loop). ``max_steps`` ends training after that many optimizer steps. :meth:`Task.order_epoch`
   may reorder the permutation (length bucketing, :mod:`flip.train.bucketing`); :meth:`Task.start_epoch`
   sees it next (a task that reads its rows per epoch, :mod:`flip.train.sharding`). A task with
   ``host_batches`` gets its batches' rows on the CPU (a language model's batch width is then a host
   max, no device sync).
5. **Validation** after every epoch (when the task has a ``valid`` split), then the callbacks
   (:mod:`flip.train.callbacks`): the step and epoch log, early stopping on validation AUC (the best
   epoch's weights are kept), checkpoints.
6. **The end** (:func:`finish`): the best weights are restored, the test split is scored once with them,
   and the outputs are written through :class:`flip.runs.RunDir` (predictions, the task's
   :meth:`Task.save_outputs` - ``model.safetensors`` by default -, ``config.json``, ``run.json``, and
   ``metrics.json`` last); the checkpoint is removed.

**Several ranks** (an initialised ``torch.distributed`` group, e.g. under torchrun): rank 0 decides whether
a run is finished and, with its validation scores, early stopping; every rank must resume from the same
position, and at the end the ranks' parameters
must hash alike (``run.json``: ``rank_weights``), else the run fails.

``flip.runs`` documents the layout of what a run leaves; several seeds and learning-rate selection are
:mod:`flip.train.selection`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import math
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from flip.io import malloc_trim
from flip.metrics import auc as auc_score
from flip.metrics import logloss as logloss_score
from flip.progress import note, progress
from flip.runs import RunDir, RunLog
from flip.train.callbacks import (Callback, Checkpointer, EarlyStopping, EpochLog, SimulatedCrash, StepLog,
                                  installed_callbacks)

TRIM_EVERY = 8  # scoring batches between returns of freed memory to the system (flip.io.malloc_trim)

__all__ = ["EvalSet", "Fit", "FitState", "LoopSettings", "SimulatedCrash", "Task", "count_parameters", "finish",
           "fit", "predict_probs", "resolve_device", "score", "seed_everything", "set_threads"]


# ------------------------------------------------------------------------------------ settings
@dataclass
class LoopSettings:
    """What the loop needs to know; strategies fill it from their config section."""

    epochs: int = 1
    batch_size: int = 1024
    eval_batch_size: int = 8192
    patience: int = 2  # epochs without validation-AUC improvement before stopping; <= 0: never
    checkpoint_every: int = 0  # batches between mid-epoch checkpoints; 0 = epoch ends only
    progress: bool = True
    device: str = "cpu"
    max_steps: int = 0  # > 0: stop after this many optimizer steps (pretraining budgets)
    grad_accum: int = 1  # batches per optimizer step
    grad_clip: float = 0.0  # > 0: clip the gradient norm to this before each optimizer step
    log_every: int = 100  # batches between ``step`` records in log.jsonl (one device sync each)
    # True: a ``step`` record's ``step`` counts optimizer steps and ``epoch_step`` is the batch in the
    # epoch (pretraining's loss curves); False: ``step`` is the batch in the epoch
    optimizer_steps: bool = False


@dataclass
class EvalSet:
    """Labels and global row ids of a split the loop scores (``predict`` gives the logits)."""

    y: torch.Tensor  # (N,) float labels, any device
    row: np.ndarray  # (N,) int64: the ``row`` column of the processed split

    def __len__(self) -> int:
        return int(self.y.shape[0])


class Task:
    """What a strategy hands to :func:`fit`.

    Subclasses set ``model`` (every trainable module; its state dict is what is checkpointed,
    kept as "best" and saved to ``model.safetensors``), ``optimizer``, optionally ``scheduler``
    (stepped after every optimizer step), ``n_train`` and ``eval_sets`` (``valid``/``test``
    :class:`EvalSet`; without ``valid`` there is no early stopping, without ``test`` no test
    metrics), and implement :meth:`loss` and :meth:`predict`. State beyond model/optimizer/
    scheduler (e.g. a noise sampler) goes through :meth:`extra_state`/:meth:`load_extra_state`.

    Optional hooks: ``ddp`` (the ``DistributedDataParallel`` wrapper that ``loss`` runs the model
    through on several ranks: the loop sets its ``require_backward_grad_sync``, so that gradients are
    all-reduced only by the batch that ends an optimizer step), ``stat_names`` (per-batch statistics
    that ``loss`` returns beside the loss: the loop averages them over the rows of each ``step`` and
    ``epoch`` record and writes them into it, :meth:`stat_fields`), :meth:`run_summary` (entries for
    ``run.json``), :meth:`save_outputs` (what the run writes besides the loop's files).
    """

    model: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: Any = None
    n_train: int
    eval_sets: dict[str, EvalSet]
    slow_scoring: bool = False  # True: scoring a split says when it starts and ends (language models)
    ddp: nn.Module | None = None  # the DDP wrapper of ``model`` when the task trains on several ranks
    stat_names: tuple[str, ...] = ()  # the per-batch statistics ``loss`` returns, by name
    max_eval_rows: int = 0  # the most rows one ``predict`` call may take (0 = any; a language model's memory)
    host_batches: bool = False  # True: ``loss`` gets its rows as a CPU tensor (pinned on CUDA); the task moves them

    def loss(self, idx: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Scalar training loss of the training rows ``idx`` (a LongTensor on the device); with
        ``stat_names``, also a (len(stat_names),) float64 tensor of this batch's statistics."""
        raise NotImplementedError

    def reduce_stats(self, total: torch.Tensor) -> torch.Tensor:
        """Sum accumulated statistics over the ranks (one process: ``total`` itself)."""
        return total

    def reduce_loss(self, total: torch.Tensor) -> torch.Tensor:
        """The global sum of ``loss * rows`` from this rank's ``total`` (one process, or a task whose
        ``loss`` already returns the global value: ``total`` itself)."""
        return total

    def order_epoch(self, perm: torch.Tensor, batch_size: int, generator: torch.Generator) -> torch.Tensor:
        """The epoch's batch order from the loop's permutation (a CPU LongTensor), e.g. length bucketing
        (:mod:`flip.train.bucketing`); it may draw from ``generator`` (the loop's, whose state at the
        epoch start is checkpointed, so a resumed run re-draws the same order). Default: ``perm``."""
        return perm

    def start_epoch(self, perm: torch.Tensor, batch_size: int) -> None:
        """Called with each epoch's permutation of the training rows before its first batch (and again
        when a run resumes mid-epoch): a task that reads its rows per epoch reads them here."""

    def stat_fields(self, total: torch.Tensor, samples: int) -> dict[str, float | None]:
        """The mean of the statistics accumulated as ``sum(stats * rows)`` over ``samples`` rows (all
        ranks), by name; NaN (an objective that is off) is None."""
        mean = self.reduce_stats(total) / max(samples, 1)
        return {k: None if math.isnan(v) else float(v) for k, v in zip(self.stat_names, mean.tolist())}

    def predict(self, split: str, idx: torch.Tensor) -> torch.Tensor:
        """(len(idx),) logits of rows ``idx`` of ``split``; called in eval mode under inference_mode."""
        raise NotImplementedError

    def extra_state(self) -> dict[str, Any]:
        return {}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        pass

    def summary(self) -> dict[str, Any]:
        """Extra numbers for ``metrics.json`` from the best weights (e.g. FLIP's fusion weight α)."""
        return {}

    def run_summary(self) -> dict[str, Any]:
        """Extra entries for ``run.json`` once training is done (called on every rank)."""
        return {}

    def save_outputs(self, run: RunDir, weights: dict[str, torch.Tensor], metrics: dict[str, Any],
                     info: dict[str, Any], log: list[dict[str, Any]]) -> dict[str, Any]:
        """The end-of-fit hook (on every rank): write the run's weights and return ``metrics.json``'s
        content. ``weights`` are the kept ones (also loaded in ``model``), ``metrics`` what the loop
        measured, ``info`` what goes into ``run.json``, ``log`` the log's records. Default:
        ``model.safetensors`` and the loop's metrics; pretraining writes its parts instead."""
        run.write_weights(weights)
        return metrics


# ------------------------------------------------------------------------------------- helpers
def resolve_device(name: str) -> torch.device:
    """``auto`` -> ``cuda`` when available, else ``cpu``; anything else as given."""
    if name in ("", "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"run.device={name!r} but CUDA is not available; use run.device=auto or cpu")
    return device


def set_threads(threads: int) -> None:
    """``run.threads`` > 0 -> ``torch.set_num_threads``; 0 keeps torch's default."""
    if threads > 0 and torch.get_num_threads() != threads:
        torch.set_num_threads(threads)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)  # also seeds every CUDA device


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@torch.inference_mode()
def predict_probs(task: Task, split: str, eval_batch_size: int, device: torch.device) -> np.ndarray:
    """Probabilities (float64) of every row of ``split``, in contiguous batches of ``eval_batch_size``
    rows (``finetune.eval_batch_size``), or of the task's ``max_eval_rows`` where that is smaller: the
    one place where a scoring batch is sized."""
    n = len(task.eval_sets[split])
    rows = min(eval_batch_size, task.max_eval_rows) if task.max_eval_rows > 0 else eval_batch_size
    was_training = task.model.training
    task.model.eval()
    out = []
    # every TRIM_EVERY batches: collect and give freed memory back (scoring a 2M-row split of a DCNv2 with a
    # 3M-id table went from 2.1 to 7.8 GiB peak RSS without; flat with)
    trim = malloc_trim()
    for k, start in enumerate(range(0, n, rows)):
        if k % TRIM_EVERY == 0:
            gc.collect()  # (reference cycles left by a batch hold its activations until the collector runs)
            trim(0)
        idx = torch.arange(start, min(n, start + rows), device=device)
        out.append(task.predict(split, idx).float())
    task.model.train(was_training)
    logits = torch.cat(out) if out else torch.empty(0)
    return torch.sigmoid(logits.double()).cpu().numpy()


def score(task: Task, split: str, eval_batch_size: int, device: torch.device,
          announce: bool = False) -> tuple[dict[str, float], np.ndarray]:
    """AUC and logloss of ``split``; ``announce``: a start and a done line (for slow scorers)."""
    n = len(task.eval_sets[split])
    note(f"scoring {split} ({n:,} rows) ...", announce)
    t0 = time.perf_counter()
    prob = predict_probs(task, split, eval_batch_size, device)
    note(f"scored {split} in {time.perf_counter() - t0:.1f}s", announce)
    y = task.eval_sets[split].y.detach().cpu().numpy().astype(np.float64)
    return {"auc": auc_score(y, prob), "logloss": logloss_score(y, prob)}, prob


# ----------------------------------------------------------------------------------- fit state
@dataclass
class FitState:
    """Where :func:`fit` stands: what a checkpoint saves and a resume restores (besides the model,
    optimizer, scheduler, the task's extra state, the RNGs and the log)."""

    gen_state: torch.Tensor  # the shuffling generator at the start of the epoch (its permutation is re-drawn)
    epoch_loss: torch.Tensor  # () float64 on the device: sum of loss * rows so far in the epoch
    epoch_stats: torch.Tensor | None  # (len(task.stat_names),) float64: the same for the task's statistics
    phase: str = "train"  # train | done
    epoch: int = 0
    step: int = 0  # batches done in the epoch
    global_step: int = 0  # optimizer steps done
    epoch_samples: int = 0
    best_metric: float | None = None  # best validation AUC so far
    best_epoch: int = 0
    bad_epochs: int = 0  # epochs in a row without improvement
    best_model: dict[str, torch.Tensor] | None = None  # CPU copy of the best weights
    seconds: dict[str, float] = field(default_factory=lambda: {"train": 0.0, "total": 0.0, "samples": 0})
    history: list[dict[str, Any]] = field(default_factory=list)  # the epoch records

    @classmethod
    def start(cls, generator: torch.Generator, device: torch.device, stats: int) -> "FitState":
        zeros = lambda *shape: torch.zeros(shape, dtype=torch.float64, device=device)  # noqa: E731
        return cls(generator.get_state(), zeros(), zeros(stats) if stats else None)

    def to_checkpoint(self, elapsed: float) -> dict[str, Any]:
        """Plain tensors and values (``torch.load(weights_only=True)`` reads them); ``elapsed``: this
        session's seconds so far, added to the total."""
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        for key in ("epoch_loss", "epoch_stats"):
            out[key] = out[key].detach().cpu() if out[key] is not None else None
        out["seconds"] = {**self.seconds, "total": self.seconds["total"] + elapsed}
        return out

    @classmethod
    def from_checkpoint(cls, ckpt: dict[str, Any], device: torch.device) -> "FitState":
        values = {f.name: ckpt[f.name] for f in dataclasses.fields(cls)}
        for key in ("epoch_loss", "epoch_stats"):
            values[key] = values[key].to(device) if values[key] is not None else None
        values["seconds"], values["history"] = dict(values["seconds"]), list(values["history"])
        return cls(**values)


@dataclass
class Fit:
    """One call of :func:`fit`: what it trains, where it stands, and what its callbacks read and change
    (Hugging Face Trainer's ``state`` and ``control`` in one). Only ``state`` is checkpointed."""

    task: Task
    settings: LoopSettings
    run: RunDir
    seed: int
    device: torch.device
    state: FitState
    generator: torch.Generator  # the data order (its state at each epoch start is in ``state``)
    log: RunLog | None = None  # opened by the Checkpointer (a resumed run's log goes on)
    resumed: bool = False
    bar: Any = None  # the epoch's progress bar
    micro: int = 0  # batches of the optimizer step under way
    stop: bool = False  # max_steps reached: the epoch and training end after this batch
    batch_rows: int = 0  # rows of the last batch, its loss * rows and statistics * rows (float64, on the device)
    batch_loss: torch.Tensor | None = None
    batch_stats: torch.Tensor | None = None
    samples_here: int = 0  # rows this process trained on in the current epoch
    paused: float = 0.0  # seconds spent writing checkpoints: not training time (:meth:`clock`)
    t_session: float = field(default_factory=time.perf_counter)

    @classmethod
    def start(cls, task: Task, settings: LoopSettings, run: RunDir, seed: int) -> "Fit":
        device = torch.device(settings.device) if not isinstance(settings.device, torch.device) else settings.device
        if int(task.n_train) <= 0:
            raise ValueError("no training rows")
        generator = torch.Generator().manual_seed(seed)
        return cls(task, settings, run, seed, device, FitState.start(generator, device, len(task.stat_names)),
                   generator)

    @property
    def n_train(self) -> int:
        return int(self.task.n_train)

    @property
    def steps_per_epoch(self) -> int:
        return math.ceil(self.n_train / int(self.settings.batch_size))

    @property
    def accum(self) -> int:
        return max(1, int(self.settings.grad_accum))

    def clock(self) -> float:
        """Seconds of training so far (checkpoint writing left out)."""
        return time.perf_counter() - self.paused

    def begin_epoch(self) -> torch.Tensor:
        """The epoch's permutation (re-drawn from the generator's state at the epoch start); a new epoch
        zeroes the epoch's sums; the epoch's progress bar is opened."""
        s, settings = self.state, self.settings
        self.generator.set_state(s.gen_state)
        perm = torch.randperm(self.n_train, generator=self.generator)
        perm = self.task.order_epoch(perm, int(settings.batch_size), self.generator)
        if not self.task.host_batches:
            perm = perm.to(self.device)
        elif self.device.type == "cuda":  # its slices copy to the GPU without waiting (non_blocking)
            perm = perm.pin_memory()
        self.task.start_epoch(perm, int(settings.batch_size))
        if s.step == 0:
            s.epoch_loss.zero_()
            s.epoch_samples = 0
            if s.epoch_stats is not None:
                s.epoch_stats.zero_()
        end = self.steps_per_epoch  # the bar's total: what this epoch will run (max_steps may end it early)
        if settings.max_steps > 0:
            end = min(end, s.step + max(settings.max_steps - s.global_step, 0) * self.accum)
        bs = int(settings.batch_size)
        self.bar = progress(min(end * bs, self.n_train), f"epoch {s.epoch + 1}/{settings.epochs}", "sample",
                            initial=min(s.step * bs, self.n_train), enabled=settings.progress)
        self.micro, self.samples_here = 0, 0
        return perm

    def train_batch(self, perm: torch.Tensor) -> None:
        """Forward, backward and (when the batch ends one) the optimizer step of the epoch's next batch."""
        s, task, settings = self.state, self.task, self.settings
        bs, step, accum = int(settings.batch_size), s.step, self.accum
        idx = perm[step * bs : (step + 1) * bs]
        ends_step = self.micro + 1 == accum or step + 1 == self.steps_per_epoch
        if task.ddp is not None:  # all-reduce the gradients only with the batch that ends the step
            task.ddp.require_backward_grad_sync = ends_step
        out = task.loss(idx)
        loss, stats = out if isinstance(out, tuple) else (out, None)
        (loss / accum if accum > 1 else loss).backward()
        self.micro += 1
        if ends_step:
            if settings.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_([p for g in task.optimizer.param_groups for p in g["params"]],
                                               settings.grad_clip)
            task.optimizer.step()
            task.optimizer.zero_grad(set_to_none=True)
            if task.scheduler is not None:
                task.scheduler.step()
            self.micro = 0
            s.global_step += 1
        self.batch_rows = nb = int(idx.shape[0])
        self.batch_loss = loss.detach().double() * nb
        s.epoch_loss += self.batch_loss
        self.batch_stats = stats * nb if stats is not None else None
        if stats is not None:
            s.epoch_stats += self.batch_stats
        s.epoch_samples += nb
        self.samples_here += nb
        s.step += 1
        if settings.max_steps > 0 and s.global_step >= settings.max_steps and self.micro == 0:
            self.stop = True

    def end_epoch(self, t_epoch: float) -> dict[str, Any]:
        """Count the epoch's time and rows; the epoch record (train loss, samples/s)."""
        s = self.state
        t_steps = self.clock() - t_epoch
        s.seconds["train"] += t_steps
        s.seconds["samples"] += self.samples_here
        record = {"epoch": s.epoch + 1, "train_loss": (self.task.reduce_loss(s.epoch_loss) / max(s.epoch_samples, 1)).item(),
                  "samples_per_second": self.samples_here / max(t_steps, 1e-9)}
        s.history.append(record)
        return record

    def next_epoch(self) -> None:
        s = self.state
        s.epoch, s.step, s.gen_state = s.epoch + 1, 0, self.generator.get_state()
        if self.stop:
            s.phase = "done"


# ----------------------------------------------------------------------------------------- fit
def fit(
    build_task: Callable[[], Task],
    settings: LoopSettings,
    out_dir: str | Path,
    *,
    seed: int,
    config: dict[str, Any],
    fingerprint: str,
    info: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Train one seed in ``out_dir`` (resuming or recognising a finished run) and return its metrics.

    ``build_task`` is called after seeding, so model initialisation follows the seed. ``config``
    is written to ``config.json``; ``fingerprint`` (:mod:`flip.train.fingerprint`) identifies the run for
    resuming and for recognising a finished one; ``info`` goes into ``run.json``.
    """
    run = RunDir(out_dir)
    done = run.finished(fingerprint)
    world, rank = _process_group()
    if world > 1:  # rank 0 decides for every rank (a rank r > 0 works in its own folder, which may be gone)
        done = _from_rank0(done)
    if done is not None:
        note(f"{run.path}: a finished run with the same settings and data is there; reusing it", settings.progress)
        return done
    run.path.mkdir(parents=True, exist_ok=True)
    checkpointer = Checkpointer(run, fingerprint, settings.checkpoint_every, settings.progress)

    seed_everything(seed)
    f = Fit.start(build_task(), settings, run, seed)
    checkpointer.restore(f)  # resuming: the model, optimizer, state, RNGs and log of the checkpoint
    if world > 1:
        _same_position(f)
    early_stopping = EarlyStopping(settings.patience)
    callbacks: list[Callback] = [StepLog(), EpochLog(), early_stopping, checkpointer, *installed_callbacks()]
    for cb in callbacks:
        cb.on_fit_start(f)
    task, state = f.task, f.state
    announce = settings.progress and task.slow_scoring  # scoring a language model takes minutes on a CPU

    task.model.train()
    task.optimizer.zero_grad(set_to_none=True)
    while state.phase == "train" and state.epoch < settings.epochs:
        perm = f.begin_epoch()
        t_epoch = f.clock()
        for cb in callbacks:
            cb.on_epoch_start(f)
        with contextlib.closing(f.bar):  # closed also when a batch raises
            while state.step < f.steps_per_epoch and not f.stop:
                f.train_batch(perm)
                for cb in callbacks:
                    cb.on_batch_end(f)
        record = f.end_epoch(t_epoch)
        valid = None
        if "valid" in task.eval_sets:
            valid = score(task, "valid", settings.eval_batch_size, f.device, announce)
            if world > 1:  # rank 0's scores decide early stopping on every rank (GPU sums may differ in the last bit)
                valid = _from_rank0(valid)
            record["valid_auc"], record["valid_logloss"] = valid[0]["auc"], valid[0]["logloss"]
        for cb in callbacks:
            cb.on_evaluate(f, record, valid)
        f.next_epoch()
        for cb in callbacks:
            cb.on_epoch_end(f, record)

    return finish(f, early_stopping.best_valid, config, fingerprint, info, announce)


def finish(f: Fit, best_valid: tuple[dict[str, float], np.ndarray] | None, config: dict[str, Any],
           fingerprint: str, info: dict[str, Any] | None, announce: bool = False) -> dict[str, Any]:
    """The end of :func:`fit`: the best weights back in the model, valid (the best epoch's scores when
    this process has them) and test scored and their predictions written, then the task's outputs,
    ``config.json``, ``run.json`` and ``metrics.json`` (last), and the checkpoint removed."""
    state, task, run, settings = f.state, f.task, f.run, f.settings
    state.phase = "done"
    assert state.best_model is not None
    task.model.load_state_dict(state.best_model)
    metrics: dict[str, Any] = {}
    for split in ("valid", "test"):
        if split not in task.eval_sets:
            continue
        if split == "valid" and best_valid is not None:  # the best epoch's scores: same weights, no rescoring
            m, prob = best_valid
        else:
            m, prob = score(task, split, settings.eval_batch_size, f.device, announce)
        metrics[split] = m
        es = task.eval_sets[split]
        run.write_predictions(split, es.row, es.y.detach().cpu().numpy(), prob)
        if split == "test":
            f.log("test", **m)
    seconds, history = state.seconds, state.history
    seconds["total"] += time.perf_counter() - f.t_session
    metrics["train"] = {
        "samples_per_second": seconds["samples"] / max(seconds["train"], 1e-9),
        "epochs": len(history),
        "best_epoch": state.best_epoch,
        "steps": state.global_step,
        "loss": history[state.best_epoch - 1]["train_loss"] if history else math.nan,
        "seconds": seconds["total"],
    }
    metrics["params"] = count_parameters(task.model)
    metrics.update(task.summary())
    ranks = _weights_agree(task.model, state.best_model)
    run_info = {"fingerprint": fingerprint, "seed": f.seed, "device": str(f.device), "torch": torch.__version__,
                "threads": torch.get_num_threads(), "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                **(info or {}), **task.run_summary(), **ranks}
    metrics = task.save_outputs(run, state.best_model, metrics, run_info, f.log.records)
    run.write_config(config)
    run.write_info(run_info)
    run.finish(metrics)
    run.remove_checkpoint()
    return metrics


# -------------------------------------------------------------------------------- several ranks
def _process_group() -> tuple[int, int]:
    """``(world size, rank)`` of an initialised ``torch.distributed`` group; ``(1, 0)`` without one."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size(), dist.get_rank()
    return 1, 0


def _from_rank0(obj: Any) -> Any:
    import torch.distributed as dist

    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def _same_position(f: Fit) -> None:
    """Every rank must start from the same place (each resumes from its own checkpoint)."""
    import torch.distributed as dist

    s = f.state
    every: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(every, (s.epoch, s.step, s.global_step))
    if len(set(every)) != 1:
        raise RuntimeError(f"{f.run.path}: the ranks resumed from different checkpoints (epoch, batch, optimizer "
                           f"steps per rank: {every}); delete OUT/checkpoint and OUT/.rank-*/ to start over")


def _weights_agree(model: nn.Module, weights: dict[str, torch.Tensor] | None) -> dict[str, Any]:
    """On several ranks: the SHA-256 of every rank's kept parameters (``run.json``'s ``rank_weights``),
    which must be one and the same (DDP keeps the replicas equal; buffers such as batch-norm running
    statistics stay per rank and are left out); nothing on one process."""
    if _process_group()[0] == 1 or weights is None:
        return {}
    import hashlib

    import torch.distributed as dist

    h = hashlib.sha256()
    for name in sorted(n for n, _ in model.named_parameters() if n in weights):
        h.update(name.encode())
        h.update(weights[name].detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    every: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(every, h.hexdigest())
    if len(set(every)) != 1:
        raise RuntimeError(f"the ranks' weights differ at the end of training (SHA-256 per rank: {every})")
    return {"rank_weights": every}
