"""The one training loop every strategy runs through (scratch, FLIP finetuning, FLIP pretraining).

A strategy supplies a :class:`Task` - the model, its optimizer (and optional LR scheduler), a
``loss(idx)`` on a batch of training-row indices and a ``predict(split, idx)`` returning logits -
and :func:`fit` does everything else:

* **Data order.** Every split is loaded into tensors once (by the strategy). An epoch is a
  permutation of ``range(n_train)`` drawn from a ``torch.Generator`` seeded with the run's seed;
  batches are slices of it. No DataLoader, no per-sample Python.
* **Determinism.** ``torch``/``random``/``numpy`` are seeded before the task is built (so model
  initialisation is seeded too); the same seed gives bit-identical metrics on CPU.
* **Early stopping** on validation AUC (when the task has a ``valid`` split): after every epoch
  the validation split is scored; training stops once ``patience`` epochs in a row brought no
  improvement (``patience <= 0``: never stop early). The best epoch's weights are kept (a CPU copy
  of the state dict), restored at the end, and the test split is scored once, with them.
* **Checkpoints / resume.** ``OUT/checkpoint/state.pt`` (written atomically with ``torch.save`` of
  plain state dicts and tensors, loaded with ``weights_only=True``) holds the model, optimizer and
  scheduler states, :class:`FitState` (epoch and step-in-epoch, the shuffling generator's state at
  the start of the epoch - the permutation is re-drawn from it -, the partial epoch loss, the
  early-stopping state, the best weights), the task's extra state, the global RNG states and the log. It is written at the end of every
  epoch and every ``checkpoint_every`` batches (0 = epoch ends only). Running the same command
  again continues from it and ends with the same metrics as an uninterrupted run. A finished run
  (``metrics.json`` plus ``run.json`` whose fingerprint matches) is recognised and not re-run.
  The checkpoint is removed once the outputs are written.
* **Logging.** A bar per epoch (samples/s, ETA; on a terminal a tqdm bar, elsewhere one line per
  10%: :mod:`flip.progress`; off with ``progress=False``) whose total is what will run (``max_steps``
  included), one line per epoch (train loss, validation AUC/logloss, best epoch) and one for early
  stopping or resuming, and
  ``OUT/log.jsonl``: one ``step`` record every ``log_every`` batches (mean loss since the last
  record, samples/s), one ``epoch`` record per epoch (train loss, validation metrics, throughput),
  plus ``start``/``resume``/``early_stop``/``test`` records. The loss is accumulated on the
  device and only read (one sync) when a record is written. A task's own per-batch statistics
  (``Task.stat_names``, e.g. pretraining's per-objective losses) are averaged the same way and
  written into the same ``step`` and ``epoch`` records.
* **Several ranks.** A task that trains through ``DistributedDataParallel`` (``Task.ddp``) has its
  gradients all-reduced only by the batch that ends an optimizer step: the loop sets
  ``require_backward_grad_sync`` before each batch (as nanoGPT's training loop does).
* **Outputs** (all atomic; ``metrics.json`` is written last): ``config.json``, ``run.json``
  (fingerprint, seed, device, versions), ``metrics.json``, ``model.safetensors`` (best weights)
  and ``predictions/{valid,test}.parquet`` (``row``, ``label``, ``prob``).

Several seeds: :func:`run_seeds` runs each seed in ``OUT/seed-<s>/`` and writes
``OUT/metrics.json`` with the mean (also at the top level), the sample standard deviation
(``ddof=1``) and every seed's values, so that paired tests across strategies are possible.

Simulated crash (for tests of resuming): with the environment variable
``FLIP_CRASH_AFTER_STEPS=K`` set, :func:`fit` raises :class:`SimulatedCrash` after ``K`` training
batches of the current process (after the batch and after any checkpoint due at that batch),
as a kill at that point would.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import random
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from flip.errors import SettingError
from flip.evaluate.metrics import auc as auc_score
from flip.evaluate.metrics import logloss as logloss_score
from flip.io import atomic_dir, atomic_file, read_json, write_json
from flip.progress import note, progress
from flip.train.identity import flatten

CHECKPOINT_VERSION = 2
CRASH_ENV = "FLIP_CRASH_AFTER_STEPS"

class SimulatedCrash(RuntimeError):
    """Raised by :func:`fit` when ``FLIP_CRASH_AFTER_STEPS`` asks for a simulated kill."""


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
    ``run.json``).
    """

    model: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: Any = None
    n_train: int
    eval_sets: dict[str, EvalSet]
    slow_scoring: bool = False  # True: scoring a split says when it starts and ends (language models)
    ddp: nn.Module | None = None  # the DDP wrapper of ``model`` when the task trains on several ranks
    stat_names: tuple[str, ...] = ()  # the per-batch statistics ``loss`` returns, by name

    def loss(self, idx: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Scalar training loss of the training rows ``idx`` (a LongTensor on the device); with
        ``stat_names``, also a (len(stat_names),) float64 tensor of this batch's statistics."""
        raise NotImplementedError

    def reduce_stats(self, total: torch.Tensor) -> torch.Tensor:
        """Sum accumulated statistics over the ranks (one process: ``total`` itself)."""
        return total

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


def _unflatten(flat: dict[str, Any]) -> dict[str, Any]:
    tree: dict[str, Any] = {}
    for name, value in flat.items():
        node = tree
        *parents, leaf = name.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    return tree


def finished_metrics(out_dir: Path, fingerprint: str) -> dict[str, Any] | None:
    """The metrics of a finished run in ``out_dir`` made with the same fingerprint, else None."""
    metrics, run = out_dir / "metrics.json", out_dir / "run.json"
    if not (metrics.exists() and run.exists()):
        return None
    try:
        if read_json(run).get("fingerprint") != fingerprint:
            return None
        return read_json(metrics)
    except (OSError, ValueError):
        return None


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _cpu_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """A detached CPU copy of ``model.state_dict()`` (independent storage per tensor)."""
    return {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}


def save_weights(state: dict[str, torch.Tensor], path: Path) -> None:
    """``safetensors.torch.save_file`` of a state dict, atomically (tied tensors are copied apart)."""
    from safetensors.torch import save_file

    tensors = {k: v.detach().to("cpu").clone().contiguous() for k, v in state.items()}
    with atomic_file(path) as tmp:
        save_file(tensors, str(tmp), metadata={"format": "pt"})


def write_predictions(path: Path, row: np.ndarray, y: np.ndarray, prob: np.ndarray) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.table(
        {
            "row": pa.array(np.asarray(row, dtype=np.int64)),
            "label": pa.array(np.asarray(y).astype(np.int8)),
            "prob": pa.array(np.asarray(prob, dtype=np.float64)),
        }
    )
    with atomic_file(path) as tmp:
        pq.write_table(table, tmp)


def _rng_state() -> dict[str, Any]:
    np_state = np.random.get_state(legacy=False)
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": {
            "bit_generator": np_state["bit_generator"],
            "key": torch.from_numpy(np.asarray(np_state["state"]["key"]).astype(np.int64)),
            "pos": int(np_state["state"]["pos"]),
            "has_gauss": int(np_state["has_gauss"]),
            "gauss": float(np_state["gauss"]),
        },
        "random": random.getstate(),
    }


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    n = state["numpy"]
    np.random.set_state(
        {
            "bit_generator": n["bit_generator"],
            "state": {"key": n["key"].numpy().astype(np.uint32), "pos": n["pos"]},
            "has_gauss": n["has_gauss"],
            "gauss": n["gauss"],
        }
    )
    version, internal, gauss = state["random"]
    random.setstate((version, tuple(internal), gauss))


@torch.inference_mode()
def predict_probs(task: Task, split: str, eval_batch_size: int, device: torch.device) -> np.ndarray:
    """Probabilities (float64) of every row of ``split``, in big contiguous batches."""
    n = len(task.eval_sets[split])
    was_training = task.model.training
    task.model.eval()
    out = []
    for start in range(0, n, eval_batch_size):
        idx = torch.arange(start, min(n, start + eval_batch_size), device=device)
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


def _improved(value: float, best: float | None) -> bool:
    if math.isnan(value):
        return False
    return best is None or math.isnan(best) or value > best


# ----------------------------------------------------------------------------------------- fit
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


class _Log:
    """``log.jsonl`` plus an in-memory copy that travels in the checkpoint."""

    def __init__(self, path: Path, records: list[dict[str, Any]] | None = None) -> None:
        self.path = path
        self.records = list(records or [])
        with atomic_file(path) as tmp:  # rewrite exactly what the checkpoint knew
            tmp.write_text("".join(json.dumps(r) + "\n" for r in self.records), encoding="utf-8")

    def __call__(self, event: str, **fields: Any) -> None:
        record = {"event": event, "time": round(time.time(), 3), **fields}
        self.records.append(record)
        with open(self.path, "a", encoding="utf-8") as fh:
            fh.write(json.dumps(record) + "\n")


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
    """Train one seed in ``out_dir`` (resuming or recognising a finished run) and return metrics.

    ``build_task`` is called after seeding, so model initialisation follows the seed. ``config``
    is written to ``config.json``; ``fingerprint`` (see :func:`flip.train.identity.config_fingerprint`) identifies the
    run for resuming and for recognising a finished one; ``info`` goes into ``run.json``.
    """
    out = Path(out_dir)
    done = finished_metrics(out, fingerprint)
    if done is not None:
        note(f"{out}: a finished run with the same settings and data is there; reusing it", settings.progress)
        return done
    out.mkdir(parents=True, exist_ok=True)
    device = torch.device(settings.device) if not isinstance(settings.device, torch.device) else settings.device
    ckpt_dir = out / "checkpoint"
    ckpt_file = ckpt_dir / "state.pt"

    ckpt: dict[str, Any] | None = None
    if ckpt_file.exists():
        ckpt = torch.load(ckpt_file, map_location="cpu", weights_only=True)
        if ckpt.get("version") != CHECKPOINT_VERSION or ckpt.get("fingerprint") != fingerprint:
            ckpt = None  # made by another configuration: start over
            note(f"{out}: its checkpoint was made with other settings or data: starting fresh", settings.progress)
    if ckpt is None:
        for name in ("metrics.json", "run.json"):  # a stale result must not pass for this run's
            (out / name).unlink(missing_ok=True)
        shutil.rmtree(ckpt_dir, ignore_errors=True)

    seed_everything(seed)
    task = build_task()
    model, optimizer = task.model, task.optimizer
    n_train, bs = int(task.n_train), int(settings.batch_size)
    if n_train <= 0:
        raise ValueError("no training rows")
    steps_per_epoch = math.ceil(n_train / bs)
    has_valid = "valid" in task.eval_sets
    announce = settings.progress and task.slow_scoring  # scoring a language model takes minutes on a CPU
    accum = max(1, int(settings.grad_accum))
    generator = torch.Generator().manual_seed(seed)

    # ---- state (fresh or from the checkpoint)
    state = FitState.start(generator, device, len(task.stat_names))
    best_valid: tuple[dict[str, float], np.ndarray] | None = None  # this process's best-epoch valid scores
    if ckpt is not None:
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        if task.scheduler is not None and ckpt["scheduler"] is not None:
            task.scheduler.load_state_dict(ckpt["scheduler"])
        task.load_extra_state(ckpt["extra"])
        state = FitState.from_checkpoint(ckpt, device)
        _set_rng_state(ckpt["rng"])
        log = _Log(out / "log.jsonl", ckpt["log"])
        log("resume", epoch=state.epoch + 1, step=state.step, global_step=state.global_step)
        note(f"resuming {out} from its checkpoint: epoch {state.epoch + 1}, step {state.step} of {steps_per_epoch} "
             f"({state.global_step} optimizer steps done)", settings.progress)
    else:
        log = _Log(out / "log.jsonl")
        log("start", seed=seed, device=str(device), n_train=n_train, batch_size=bs,
            steps_per_epoch=steps_per_epoch, params=count_parameters(model))
    del ckpt

    def save_checkpoint() -> None:
        elapsed = time.perf_counter() - t_session
        checkpoint = {
            "version": CHECKPOINT_VERSION,
            "fingerprint": fingerprint,
            **state.to_checkpoint(elapsed),
            "model": model.state_dict(),
            "optimizer": optimizer.state_dict(),
            "scheduler": task.scheduler.state_dict() if task.scheduler is not None else None,
            "extra": task.extra_state(),
            "rng": _rng_state(),
            "log": log.records,
        }
        with atomic_dir(ckpt_dir, "checkpoint", ("state.pt",)) as tmp:
            torch.save(checkpoint, tmp / "state.pt")

    crash_after = int(os.environ.get(CRASH_ENV, "0") or 0)
    steps_this_process = 0
    t_session = time.perf_counter()
    params = [p for g in optimizer.param_groups for p in g["params"]]

    # ---- training
    model.train()
    optimizer.zero_grad(set_to_none=True)
    while state.phase == "train" and state.epoch < settings.epochs:
        generator.set_state(state.gen_state)
        perm = torch.randperm(n_train, generator=generator).to(device)
        if state.step == 0:
            state.epoch_loss.zero_()
            state.epoch_samples = 0
            if state.epoch_stats is not None:
                state.epoch_stats.zero_()
        # the bar's total is what this epoch will really run: the rest of the epoch, or fewer
        # samples when max_steps ends training inside it
        epoch_end = steps_per_epoch
        if settings.max_steps > 0:
            epoch_end = min(steps_per_epoch, state.step + max(settings.max_steps - state.global_step, 0) * accum)
        bar = progress(min(epoch_end * bs, n_train), f"epoch {state.epoch + 1}/{settings.epochs}", "sample",
                       initial=min(state.step * bs, n_train), enabled=settings.progress)
        window_loss = torch.zeros((), dtype=torch.float64, device=device)
        window_stats = torch.zeros_like(state.epoch_stats) if state.epoch_stats is not None else None
        window_samples, window_t = 0, time.perf_counter()
        t_epoch = time.perf_counter()
        samples_here = 0
        stop_now = False
        micro = 0
        while state.step < steps_per_epoch:
            step = state.step
            idx = perm[step * bs : (step + 1) * bs]
            nb = int(idx.shape[0])
            ends_optimizer_step = micro + 1 == accum or step + 1 == steps_per_epoch
            if task.ddp is not None:  # all-reduce the gradients only with the batch that ends the step
                task.ddp.require_backward_grad_sync = ends_optimizer_step
            out_ = task.loss(idx)
            loss, stats = out_ if isinstance(out_, tuple) else (out_, None)
            (loss / accum if accum > 1 else loss).backward()
            micro += 1
            if ends_optimizer_step:
                if settings.grad_clip > 0:
                    torch.nn.utils.clip_grad_norm_(params, settings.grad_clip)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                if task.scheduler is not None:
                    task.scheduler.step()
                micro = 0
                state.global_step += 1
            lw = loss.detach().double() * nb
            state.epoch_loss += lw
            window_loss += lw
            if stats is not None:
                state.epoch_stats += stats * nb
                window_stats += stats * nb
            state.epoch_samples += nb
            window_samples += nb
            samples_here += nb
            state.step += 1
            step = state.step
            steps_this_process += 1
            bar.update(nb)
            if settings.max_steps > 0 and state.global_step >= settings.max_steps and micro == 0:
                stop_now = True
            if step % settings.log_every == 0 or step == steps_per_epoch or stop_now:
                now = time.perf_counter()
                mean = (window_loss / max(window_samples, 1)).item()  # the only sync
                rate = window_samples / max(now - window_t, 1e-9)
                record = {"epoch": state.epoch + 1, "step": step, "global_step": state.global_step, "loss": mean,
                          "samples_per_second": rate, "lr": optimizer.param_groups[0]["lr"]}
                if settings.optimizer_steps:
                    record["step"], record["epoch_step"] = state.global_step, step
                if window_stats is not None:
                    record.update(task.stat_fields(window_stats, window_samples))
                    window_stats.zero_()
                log("step", **record)
                bar.set_postfix(loss=f"{mean:.4f}", refresh=False)
                window_loss.zero_()
                window_samples = 0
                window_t = now
            if (settings.checkpoint_every > 0 and step % settings.checkpoint_every == 0
                    and micro == 0 and step < steps_per_epoch and not stop_now):
                t0 = time.perf_counter()
                save_checkpoint()
                window_t += time.perf_counter() - t0
                t_epoch += time.perf_counter() - t0
            if crash_after and steps_this_process >= crash_after:
                bar.close()
                raise SimulatedCrash(f"{CRASH_ENV}={crash_after}: simulated kill after {steps_this_process} batches")
            if stop_now:
                break
        bar.close()
        t_steps = time.perf_counter() - t_epoch
        state.seconds["train"] += t_steps
        state.seconds["samples"] += samples_here
        train_loss = (state.epoch_loss / max(state.epoch_samples, 1)).item()

        record: dict[str, Any] = {"epoch": state.epoch + 1, "train_loss": train_loss,
                                  "samples_per_second": samples_here / max(t_steps, 1e-9)}
        if has_valid:
            valid_metrics, valid_prob = score(task, "valid", settings.eval_batch_size, device, announce)
            record["valid_auc"], record["valid_logloss"] = valid_metrics["auc"], valid_metrics["logloss"]
            improved = _improved(valid_metrics["auc"], state.best_metric)
        else:
            improved = True  # no validation split: the latest weights are the best
        if improved or state.best_model is None:
            state.best_metric = record.get("valid_auc", state.best_metric)
            state.best_epoch, state.bad_epochs = state.epoch + 1, 0
            state.best_model = _cpu_state(model)
            best_valid = (valid_metrics, valid_prob) if has_valid else None
        else:
            state.bad_epochs += 1
        record["best"] = state.best_epoch == state.epoch + 1
        state.history.append(record)
        epoch_fields = {}
        if state.epoch_stats is not None:
            epoch_fields = task.stat_fields(state.epoch_stats, state.epoch_samples)
        log("epoch", **record, global_step=state.global_step, **epoch_fields)
        best_epoch = state.best_epoch
        valid_text = (f", valid AUC {record['valid_auc']:.4f} logloss {record['valid_logloss']:.4f}"
                      + (" (best)" if record["best"] else f" (best: epoch {best_epoch})") if has_valid else "")
        note(f"epoch {state.epoch + 1}/{settings.epochs}: train loss {train_loss:.4f}{valid_text}, "
             f"{record['samples_per_second']:,.0f} samples/s", settings.progress)
        state.epoch += 1
        state.step = 0
        state.gen_state = generator.get_state()
        if stop_now:
            state.phase = "done"
        elif has_valid and settings.patience > 0 and state.bad_epochs >= settings.patience:
            state.phase = "done"
            log("early_stop", epoch=state.epoch, best_epoch=best_epoch, best_valid_auc=state.best_metric)
            note(f"early stop after epoch {state.epoch}: no better validation AUC for {settings.patience} epochs; "
                 f"keeping epoch {best_epoch} (valid AUC {state.best_metric:.4f})", settings.progress)
        save_checkpoint()

    # ---- final: best weights, score once on test, write outputs
    state.phase = "done"
    best_state, best_epoch, history, seconds = state.best_model, state.best_epoch, state.history, state.seconds
    assert best_state is not None
    model.load_state_dict(best_state)
    metrics: dict[str, Any] = {}
    predictions_dir = out / "predictions"
    for split in ("valid", "test"):
        if split not in task.eval_sets:
            continue
        if split == "valid" and best_valid is not None:  # the best epoch's scores: same weights, no rescoring
            m, prob = best_valid
        else:
            m, prob = score(task, split, settings.eval_batch_size, device, announce)
        metrics[split] = m
        es = task.eval_sets[split]
        write_predictions(predictions_dir / f"{split}.parquet", es.row, es.y.detach().cpu().numpy(), prob)
        if split == "test":
            log("test", **m)
    seconds["total"] += time.perf_counter() - t_session
    metrics["train"] = {
        "samples_per_second": seconds["samples"] / max(seconds["train"], 1e-9),
        "epochs": len(history),
        "best_epoch": best_epoch,
        "steps": state.global_step,
        "loss": history[best_epoch - 1]["train_loss"] if history else math.nan,
        "seconds": seconds["total"],
    }
    metrics["params"] = count_parameters(model)
    metrics.update(task.summary())
    save_weights(best_state, out / "model.safetensors")
    write_json(out / "config.json", config)
    write_json(out / "run.json", {
        "fingerprint": fingerprint,
        "seed": seed,
        "device": str(device),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        **(info or {}),
        **task.run_summary(),
    })
    write_json(out / "metrics.json", metrics)
    shutil.rmtree(ckpt_dir, ignore_errors=True)
    return metrics


def adopt_run(src: Path, dst: Path, fingerprint: str) -> None:
    """Make the finished run in ``src`` (a selection candidate) the run in ``dst`` under ``fingerprint``:
    its files are copied into ``dst`` (other entries of ``dst`` stay) and ``run.json`` carries the new
    fingerprint; ``metrics.json`` is copied last, so an interrupted copy is not a finished run."""
    src, dst = Path(src), Path(dst)
    dst.mkdir(parents=True, exist_ok=True)
    (dst / "metrics.json").unlink(missing_ok=True)
    for item in src.iterdir():
        if item.name in ("checkpoint", "run.json", "metrics.json"):
            continue
        if item.is_dir():
            with atomic_dir(dst / item.name, "finetune", ("*",)) as tmp:  # (in the run's own folder)
                shutil.copytree(item, tmp, dirs_exist_ok=True)
        else:
            with atomic_file(dst / item.name) as tmp:
                shutil.copy2(item, tmp)
    write_json(dst / "run.json", {**read_json(src / "run.json"), "fingerprint": fingerprint, "adopted_from": str(src)})
    write_json(dst / "metrics.json", read_json(src / "metrics.json"))


def score_saved_run(build_task: Callable[[], Task], settings: LoopSettings, out_dir: str | Path, split: str) -> dict[str, Any]:
    """Score ``split`` with the weights a finished run saved (``model.safetensors``): its predictions
    and metrics are added to the run. Used to score the test split once, after selection."""
    from safetensors.torch import load_file

    out = Path(out_dir)
    device = torch.device(settings.device)
    task = build_task()
    task.model.load_state_dict(load_file(str(out / "model.safetensors"), device=str(device)))
    m, prob = score(task, split, settings.eval_batch_size, device)
    es = task.eval_sets[split]
    write_predictions(out / "predictions" / f"{split}.parquet", es.row, es.y.detach().cpu().numpy(), prob)
    metrics = read_json(out / "metrics.json")
    metrics[split] = m
    write_json(out / "metrics.json", metrics)
    return metrics


# ---------------------------------------------------------------------------------- many seeds
def aggregate_seeds(per_seed: dict[int, dict[str, Any]]) -> dict[str, Any]:
    """Mean (also at the top level), sample std (ddof=1; 0 for one seed) and per-seed values.

    ``per_seed`` maps seed -> that seed's (nested) metrics. Only numeric leaves are aggregated.
    """
    if not per_seed:
        raise ValueError("no seeds to aggregate")
    seeds = list(per_seed)
    flats = {s: flatten(m) for s, m in per_seed.items()}
    keys = [k for k, v in flats[seeds[0]].items() if isinstance(v, (int, float)) and not isinstance(v, bool)]
    mean, std = {}, {}
    for key in keys:
        values = np.array([float(flats[s].get(key, math.nan)) for s in seeds], dtype=np.float64)
        mean[key] = float(values.mean())
        std[key] = float(values.std(ddof=1)) if len(values) > 1 else 0.0
    result = _unflatten(mean)
    result.update(
        {
            "seeds": seeds,
            "mean": _unflatten(mean),
            "std": _unflatten(std),
            "per_seed": {f"seed-{s}": per_seed[s] for s in seeds},
        }
    )
    return result


def run_seeds(cfg: Any, out_dir: str | Path, run_one: Callable[[Any, Path], dict[str, Any]]) -> dict[str, Any]:
    """Run ``run_one(cfg_with_one_seed, dir)`` per seed of ``cfg.run.seeds``.

    One seed: straight into ``out_dir``. Several: into ``out_dir/seed-<s>/``, then
    ``out_dir/config.json`` and ``out_dir/metrics.json`` (see :func:`aggregate_seeds`).
    """
    out = Path(out_dir)
    seeds = list(cfg.run.seeds) or [0]
    if len(set(seeds)) != len(seeds):
        raise SettingError(f"run.seeds has duplicates: {seeds}")
    if len(seeds) == 1:
        return run_one(cfg, out)
    # outputs of an earlier single-seed run here would pass for this run's: remove them
    for name in ("metrics.json", "config.json", "run.json", "model.safetensors", "log.jsonl"):
        (out / name).unlink(missing_ok=True)
    for name in ("predictions", "checkpoint"):
        shutil.rmtree(out / name, ignore_errors=True)
    per_seed = {}
    for s in seeds:
        cfg_s = dataclasses.replace(cfg, run=dataclasses.replace(cfg.run, seeds=[s]))
        per_seed[s] = run_one(cfg_s, out / f"seed-{s}")
    result = aggregate_seeds(per_seed)
    write_json(out / "config.json", dataclasses.asdict(cfg))
    write_json(out / "metrics.json", result)
    return result
