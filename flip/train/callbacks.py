"""The parts of training that are not the training step: small objects with hooks that
:func:`flip.train.loop.fit` calls (as Hugging Face Trainer's callbacks).

Hooks, in the order ``fit`` calls them (each gets the :class:`~flip.train.loop.Fit` it works on)::

    on_fit_start(fit)                      once, after the task is built (and restored when resuming)
    on_epoch_start(fit)                    before the epoch's first batch (also a resumed, partial epoch)
    on_batch_end(fit)                      after every batch (``fit.batch_loss``, ``fit.batch_rows``, ...)
    on_evaluate(fit, record, valid)        after the epoch's batches and the validation scoring
    on_epoch_end(fit, record)              after ``fit.state`` moved on to the next epoch

``fit`` runs them in this order: :class:`StepLog`, :class:`EpochLog`, :class:`EarlyStopping`,
:class:`Checkpointer`, then any installed with :func:`installed` (tests: :func:`crash_after`).

* :class:`StepLog`: the epoch's progress bar and a ``step`` record every ``log_every`` batches (mean loss
  since the last one, samples/s, lr, the task's statistics). The loss is accumulated on the device and
  read (one sync) only when a record is written.
* :class:`EpochLog`: the ``start`` / ``resume`` / ``epoch`` records and their terminal lines.
* :class:`EarlyStopping`: keeps the best validation epoch's weights (a CPU copy, in ``fit.state``) and
  ends training after ``patience`` epochs without a better validation AUC (``early_stop`` record).
* :class:`Checkpointer`: ``OUT/checkpoint/state.pt`` at every epoch end and every ``checkpoint_every``
  batches (plain state dicts and tensors, ``torch.load(weights_only=True)``): the model, optimizer and
  scheduler, ``fit.state``, the task's extra state, the global RNGs and the log; reading it back
  (:meth:`Checkpointer.restore`) is how a run resumes.
* :class:`CrashAfter` (tests only, through :func:`crash_after`): raises :class:`SimulatedCrash` after
  ``K`` batches of one ``fit``, after that batch's other callbacks (its checkpoint included), as a
  kill at that point would.
"""

from __future__ import annotations

import contextlib
import math
import random
import time
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch

from flip.progress import note
from flip.runs import RunDir

Fit = Any  # flip.train.loop.Fit, what every hook gets (not imported: the loop imports this module)

CHECKPOINT_VERSION = 2

__all__ = ["CHECKPOINT_VERSION", "Callback", "Checkpointer", "CrashAfter", "EarlyStopping", "EpochLog",
           "SimulatedCrash", "StepLog", "crash_after", "installed"]


class Callback:
    """No-op hooks; a callback overrides those it needs."""

    def on_fit_start(self, fit: Fit) -> None:
        pass

    def on_epoch_start(self, fit: Fit) -> None:
        pass

    def on_batch_end(self, fit: Fit) -> None:
        pass

    def on_evaluate(self, fit: Fit, record: dict[str, Any], valid: tuple[dict[str, float], np.ndarray] | None) -> None:
        pass

    def on_epoch_end(self, fit: Fit, record: dict[str, Any]) -> None:
        pass


# ------------------------------------------------------------------------------------------ logs
class StepLog(Callback):
    """The progress bar and the ``step`` records (see the module docstring)."""

    def on_epoch_start(self, fit: Fit) -> None:
        stats = fit.state.epoch_stats
        self.loss = torch.zeros((), dtype=torch.float64, device=fit.device)
        self.stats = torch.zeros_like(stats) if stats is not None else None
        self.samples, self.t = 0, fit.clock()

    def on_batch_end(self, fit: Fit) -> None:
        s, settings = fit.state, fit.settings
        self.loss += fit.batch_loss
        if self.stats is not None:
            self.stats += fit.batch_stats
        self.samples += fit.batch_rows
        fit.bar.update(fit.batch_rows)
        if not (s.step % settings.log_every == 0 or s.step == fit.steps_per_epoch or fit.stop):
            return
        now = fit.clock()
        mean = (fit.task.reduce_loss(self.loss) / max(self.samples, 1)).item()  # the only sync
        record = {"epoch": s.epoch + 1, "step": s.step, "global_step": s.global_step, "loss": mean,
                  "samples_per_second": self.samples / max(now - self.t, 1e-9),
                  "lr": fit.task.optimizer.param_groups[0]["lr"]}
        if settings.optimizer_steps:
            record["step"], record["epoch_step"] = s.global_step, s.step
        if self.stats is not None:
            record.update(fit.task.stat_fields(self.stats, self.samples))
            self.stats.zero_()
        fit.log("step", **record)
        fit.bar.set_postfix(loss=f"{mean:.4f}", refresh=False)
        self.loss.zero_()
        self.samples, self.t = 0, now


class EpochLog(Callback):
    """The ``start``, ``resume`` and ``epoch`` records of ``log.jsonl`` and their terminal lines."""

    def on_fit_start(self, fit: Fit) -> None:
        s = fit.state
        if fit.resumed:
            fit.log("resume", epoch=s.epoch + 1, step=s.step, global_step=s.global_step)
            note(f"resuming {fit.run.path} from its checkpoint: epoch {s.epoch + 1}, step {s.step} of "
                 f"{fit.steps_per_epoch} ({s.global_step} optimizer steps done)", fit.settings.progress)
        else:
            fit.log("start", seed=fit.seed, device=str(fit.device), n_train=fit.n_train,
                    batch_size=fit.settings.batch_size, steps_per_epoch=fit.steps_per_epoch,
                    params=sum(p.numel() for p in fit.task.model.parameters()))

    def on_epoch_end(self, fit: Fit, record: dict[str, Any]) -> None:
        s = fit.state
        fields = fit.task.stat_fields(s.epoch_stats, s.epoch_samples) if s.epoch_stats is not None else {}
        fit.log("epoch", **record, global_step=s.global_step, **fields)
        valid = ""
        if "valid_auc" in record:
            valid = (f", valid AUC {record['valid_auc']:.4f} logloss {record['valid_logloss']:.4f}"
                     + (" (best)" if record["best"] else f" (best: epoch {s.best_epoch})"))
        note(f"epoch {record['epoch']}/{fit.settings.epochs}: train loss {record['train_loss']:.4f}{valid}, "
             f"{record['samples_per_second']:,.0f} samples/s", fit.settings.progress)


# -------------------------------------------------------------------------------- early stopping
def _improved(value: float, best: float | None) -> bool:
    if math.isnan(value):
        return False
    return best is None or math.isnan(best) or value > best


def _cpu_state(model: torch.nn.Module, copy: bool = True) -> dict[str, torch.Tensor]:
    """A detached CPU copy of ``model.state_dict()`` (independent storage per tensor); ``copy=False``:
    the tensors of a model on the CPU themselves (a device's are copied to the CPU all the same)."""
    return {k: v.detach().to("cpu", copy=copy) for k, v in model.state_dict().items()}


class EarlyStopping(Callback):
    """Keeps the best epoch's weights and stops after ``patience`` epochs without improvement.

    Without a validation split every epoch is "best" (the last weights are kept) and nothing stops
    early; ``patience <= 0`` never stops early. ``best_valid`` is the best epoch's validation scores of
    this process (None after resuming, until an epoch improves): the final scoring reuses them."""

    def __init__(self, patience: int) -> None:
        self.patience = patience
        self.best_valid: tuple[dict[str, float], np.ndarray] | None = None

    def on_evaluate(self, fit: Fit, record: dict[str, Any], valid: tuple[dict[str, float], np.ndarray] | None) -> None:
        s = fit.state
        improved = _improved(valid[0]["auc"], s.best_metric) if valid is not None else True
        if improved or s.best_model is None:
            s.best_metric = record.get("valid_auc", s.best_metric)
            s.best_epoch, s.bad_epochs = record["epoch"], 0
            # after the last epoch no step changes the weights: the model's own tensors are the kept ones
            # (no second copy of a large embedding table: 0.4 GB at 3M ids)
            last = record["epoch"] >= fit.settings.epochs
            s.best_model = _cpu_state(fit.task.model, copy=not last)
            self.best_valid = valid
        else:
            s.bad_epochs += 1
        record["best"] = s.best_epoch == record["epoch"]

    def on_epoch_end(self, fit: Fit, record: dict[str, Any]) -> None:
        s = fit.state
        if s.phase != "train" or "valid_auc" not in record or self.patience <= 0 or s.bad_epochs < self.patience:
            return
        s.phase = "done"
        fit.log("early_stop", epoch=s.epoch, best_epoch=s.best_epoch, best_valid_auc=s.best_metric)
        note(f"early stop after epoch {s.epoch}: no better validation AUC for {self.patience} epochs; "
             f"keeping epoch {s.best_epoch} (valid AUC {s.best_metric:.4f})", fit.settings.progress)


# ----------------------------------------------------------------------------------- checkpoints
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
    np.random.set_state({"bit_generator": n["bit_generator"],
                         "state": {"key": n["key"].numpy().astype(np.uint32), "pos": n["pos"]},
                         "has_gauss": n["has_gauss"], "gauss": n["gauss"]})
    version, internal, gauss = state["random"]
    random.setstate((version, tuple(internal), gauss))


class Checkpointer(Callback):
    """``OUT/checkpoint/state.pt``: written at every epoch end and every ``checkpoint_every`` batches
    (0 = epoch ends only; never inside an optimizer step), read back by :meth:`restore`.

    Made before the run is seeded: a checkpoint of another fingerprint or version is discarded (with
    the outputs an earlier run left: they must not pass for this run's)."""

    def __init__(self, run: RunDir, fingerprint: str, every: int, progress: bool) -> None:
        self.run, self.fingerprint, self.every = run, fingerprint, every
        self.saved: dict[str, Any] | None = None
        if run.checkpoint_file.exists():
            self.saved = torch.load(run.checkpoint_file, map_location="cpu", weights_only=True)
            if self.saved.get("version") != CHECKPOINT_VERSION or self.saved.get("fingerprint") != fingerprint:
                self.saved = None  # made by another configuration: start over
                note(f"{run.path}: its checkpoint was made with other settings or data: starting fresh", progress)
        if self.saved is None:
            run.discard_result()
            run.remove_checkpoint()

    def restore(self, fit: Fit) -> None:
        """Put the checkpoint (if any) into ``fit`` and open the log (with the checkpoint's records)."""
        ckpt, self.saved = self.saved, None
        fit.resumed = ckpt is not None
        if ckpt is None:
            fit.log = fit.run.open_log()
            return
        task = fit.task
        task.model.load_state_dict(ckpt["model"])
        task.optimizer.load_state_dict(ckpt["optimizer"])
        if task.scheduler is not None and ckpt["scheduler"] is not None:
            task.scheduler.load_state_dict(ckpt["scheduler"])
        task.load_extra_state(ckpt["extra"])
        fit.state = fit.state.from_checkpoint(ckpt, fit.device)
        _set_rng_state(ckpt["rng"])
        fit.log = fit.run.open_log(ckpt["log"])

    def save(self, fit: Fit) -> None:
        task = fit.task
        checkpoint = {
            "version": CHECKPOINT_VERSION,
            "fingerprint": self.fingerprint,
            **fit.state.to_checkpoint(time.perf_counter() - fit.t_session),
            "model": task.model.state_dict(),
            "optimizer": task.optimizer.state_dict(),
            "scheduler": task.scheduler.state_dict() if task.scheduler is not None else None,
            "extra": task.extra_state(),
            "rng": _rng_state(),
            "log": fit.log.records,
        }
        from flip.io import atomic_dir

        with atomic_dir(self.run.checkpoint_dir, "checkpoint", ("state.pt",)) as tmp:
            torch.save(checkpoint, tmp / "state.pt")

    def on_batch_end(self, fit: Fit) -> None:
        step = fit.state.step
        if (self.every > 0 and step % self.every == 0 and fit.micro == 0 and step < fit.steps_per_epoch
                and not fit.stop):
            t0 = time.perf_counter()
            self.save(fit)
            fit.paused += time.perf_counter() - t0  # not training time

    def on_epoch_end(self, fit: Fit, record: dict[str, Any]) -> None:
        self.save(fit)


# ---------------------------------------------------------------------------------- test hooks
class SimulatedCrash(RuntimeError):
    """Raised by :class:`CrashAfter`: a simulated kill of the training process."""


class CrashAfter(Callback):
    """Raise :class:`SimulatedCrash` after ``batches`` batches of each ``fit`` (counted from its start)."""

    def __init__(self, batches: int) -> None:
        self.batches, self.done = int(batches), 0

    def on_fit_start(self, fit: Fit) -> None:
        self.done = 0

    def on_batch_end(self, fit: Fit) -> None:
        self.done += 1
        if self.done >= self.batches:
            raise SimulatedCrash(f"simulated kill after {self.done} batches")


_INSTALLED: list[Callback] = []


@contextlib.contextmanager
def installed(*callbacks: Callback) -> Iterator[None]:
    """Every :func:`~flip.train.loop.fit` inside the block also runs ``callbacks`` (after its own)."""
    _INSTALLED.extend(callbacks)
    try:
        yield
    finally:
        for cb in callbacks:
            _INSTALLED.remove(cb)


def crash_after(batches: int) -> contextlib.AbstractContextManager[None]:
    """Tests of resuming: inside the block, each ``fit`` is killed (:class:`SimulatedCrash`) after
    ``batches`` batches, after the checkpoint due at that batch."""
    return installed(CrashAfter(batches))


def installed_callbacks() -> list[Callback]:
    return list(_INSTALLED)
