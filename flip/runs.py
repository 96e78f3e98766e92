"""What a training run leaves on disk, and the one place that reads and writes it: :class:`RunDir`.

Read this first. A *run* is one directory. A run of one seed (what :func:`flip.train.loop.fit` makes)::

    config.json           the whole configuration it ran with (``Config.to_dict()``)
    run.json              what identifies and describes it: ``fingerprint`` (flip.train.fingerprint), ``seed``,
                          ``device``, versions, ``finished``, the stage's ``info`` (stage, strategy,
                          dataset_dir, precision, pretrained, ...), the task's ``run_summary()``;
                          ``adopted_from`` for a run adopted from a selection candidate
    log.jsonl             one JSON record a line: ``start`` (seed, device, n_train, batch_size,
                          steps_per_epoch, params), ``step``, ``epoch``, ``resume``, ``early_stop``, ``test``
    model.safetensors     the kept weights (the best validation epoch's; pretraining writes its parts instead)
    predictions/<split>.parquet   ``row``, ``label``, ``prob`` of valid and test
    checkpoint/state.pt   only while the run is unfinished: what resuming needs (flip.train.loop)
    metrics.json          the run's numbers (``valid``/``test`` AUC and logloss, ``train``, ``params``, ...)

A run of several seeds (``run.seeds``, :func:`flip.train.selection.run_seeds`)::

    config.json           the configuration with every seed
    metrics.json          mean (also at the top level), ``std`` (ddof=1), ``per_seed``, ``seeds``
    seed-<s>/             one run of one seed each, as above

Learning-rate selection (:mod:`flip.train.selection`) adds, beside the seeds::

    candidates/<lr=…>/    one run per candidate rate, first seed, never scored on test
    selection.json        metric, seed, every candidate's validation scores, the selected rates, the grid

A pretraining run (:mod:`flip.train.pretrain`) has, instead of ``model.safetensors`` and predictions:
``id_model.safetensors``, ``plm/`` (Hugging Face format), ``heads.safetensors``, ``losses.json``,
``dataset_meta.json`` and ``vocab.parquet``, written by pretraining's end-of-fit hook
(:meth:`flip.train.loop.Task.save_outputs`) from the model in memory.

Who writes what: every file above goes through this class. ``metrics.json`` has ONE writer,
:meth:`RunDir.finish`, which writes it LAST, so that it is the marker of a finished run: a directory
with ``metrics.json`` and a ``run.json`` of the same fingerprint is a finished run
(:meth:`RunDir.finished`) and is never trained again. ``finish`` is called at the end of
:func:`~flip.train.loop.fit` (a trained seed), when a selection candidate is adopted as a seed's run
(:func:`flip.train.selection.adopt`), for the seed aggregate (:func:`flip.train.selection.run_seeds`) and by
the untrained "w/o alignment" pretraining (:mod:`flip.train.without_alignment`). ``config.json`` and ``run.json``
are written by :meth:`write_config` / :meth:`write_info`, ``log.jsonl`` through :meth:`open_log`.

Reading: :meth:`seeds` (the seed runs in the order of ``run.seeds``), :meth:`best_seed` (by a metric,
e.g. what ``flip package`` serves), :meth:`first_seed` (the first of ``run.seeds``: the seed selection
trains with, what the analysis figures show), :meth:`config`, :meth:`info`, :meth:`metrics`,
:meth:`log`, :meth:`train_rows`, :meth:`selection`, :meth:`weights`, :meth:`predictions`,
:meth:`candidates`. The evaluation, packaging, analysis, report and benchmarks read runs only through
these. Imports only the standard library (torch, safetensors, pyarrow lazily); nothing happens at import.
"""

from __future__ import annotations

import json
import math
import shutil
import time
from pathlib import Path
from typing import Any

from flip.errors import FlipError
from flip.io import atomic_dir, atomic_file, read_json, write_json

CONFIG = "config.json"
INFO = "run.json"
METRICS = "metrics.json"
LOG = "log.jsonl"
WEIGHTS = "model.safetensors"
PREDICTIONS = "predictions"
CHECKPOINT = "checkpoint"
CANDIDATES = "candidates"
SELECTION = "selection.json"
# a pretraining run's files (flip.io.atomic_dir may replace an unmarked folder holding only these)
PRETRAIN_LAYOUT = (CONFIG, INFO, METRICS, LOG, WEIGHTS, PREDICTIONS, CHECKPOINT, "id_model.safetensors",
                   "heads.safetensors", "plm", "dataset_meta.json", "losses.json", "vocab.parquet")

__all__ = ["RunDir", "RunLog"]


def _lookup(tree: Any, dotted: str) -> Any:
    """``tree["a"]["b"]`` for ``"a.b"``; None when a key is missing."""
    for key in dotted.split("."):
        if not isinstance(tree, dict):
            return None
        tree = tree.get(key)
    return tree


class RunLog:
    """``log.jsonl`` being written: every record is appended to the file at once and kept in
    ``records`` (which travel in the checkpoint, so that a resumed run's log is exactly its history)."""

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

    def events(self, event: str) -> list[dict[str, Any]]:
        return [r for r in self.records if r.get("event") == event]


class RunDir:
    """One run directory (the module docstring is the layout). Cheap: it holds only the path."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)

    def __repr__(self) -> str:
        return f"RunDir({str(self.path)!r})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, RunDir) and other.path == self.path

    def __hash__(self) -> int:
        return hash(self.path)

    # ----------------------------------------------------------------------------------- paths
    @property
    def name(self) -> str:
        return self.path.name

    @property
    def config_file(self) -> Path:
        return self.path / CONFIG

    @property
    def info_file(self) -> Path:
        return self.path / INFO

    @property
    def metrics_file(self) -> Path:
        return self.path / METRICS

    @property
    def log_file(self) -> Path:
        return self.path / LOG

    @property
    def weights_file(self) -> Path:
        return self.path / WEIGHTS

    @property
    def checkpoint_dir(self) -> Path:
        return self.path / CHECKPOINT

    @property
    def checkpoint_file(self) -> Path:
        return self.checkpoint_dir / "state.pt"

    @property
    def selection_file(self) -> Path:
        return self.path / SELECTION

    def predictions_file(self, split: str) -> Path:
        return self.path / PREDICTIONS / f"{split}.parquet"

    def seed_dir(self, seed: int) -> "RunDir":
        """``seed-<seed>/`` of a run of several seeds."""
        return RunDir(self.path / f"seed-{seed}")

    def candidate(self, name: str) -> "RunDir":
        """``candidates/<name>/``: a learning-rate selection candidate."""
        return RunDir(self.path / CANDIDATES / name)

    # --------------------------------------------------------------------------------- reading
    def config(self) -> dict[str, Any]:
        return read_json(self.config_file)

    def info(self) -> dict[str, Any]:
        """``run.json`` ({} when there is none, e.g. the parent of several seeds)."""
        return read_json(self.info_file) if self.info_file.exists() else {}

    def metrics(self) -> dict[str, Any]:
        return read_json(self.metrics_file)

    def log(self, event: str | None = None) -> list[dict[str, Any]]:
        """The records of ``log.jsonl`` (those of ``event`` only, when given); [] without a log."""
        if not self.log_file.exists():
            return []
        records = [json.loads(line) for line in self.log_file.read_text(encoding="utf-8").splitlines() if line]
        return [r for r in records if event is None or r.get("event") == event]

    def train_rows(self) -> int | None:
        """How many training rows the run trained on (the loop's ``start`` record), None if unknown."""
        start = self.log("start")
        return start[0].get("n_train") if start else None

    def batch_size(self) -> int | None:
        start = self.log("start")
        return start[0].get("batch_size") if start else None

    def selection(self) -> dict[str, Any] | None:
        """``selection.json`` (the learning-rate selection), None for a run with one candidate."""
        return read_json(self.selection_file) if self.selection_file.exists() else None

    def weights(self, device: str = "cpu") -> dict[str, Any]:
        """The tensors of ``model.safetensors``."""
        from safetensors.torch import load_file

        return load_file(str(self.weights_file), device=device)

    def has_predictions(self, split: str) -> bool:
        return self.predictions_file(split).exists()

    def predictions(self, split: str):
        """``predictions/<split>.parquet`` as a pandas DataFrame (row, label, prob)."""
        import pyarrow.parquet as pq

        return pq.read_table(self.predictions_file(split)).to_pandas()

    def prediction_arrays(self, split: str, columns: tuple[str, ...] = ("row", "label", "prob")) -> dict[str, Any]:
        """The same predictions as numpy arrays, without pandas (a bare GPU machine has torch,
        transformers and pyarrow only)."""
        import pyarrow.parquet as pq

        table = pq.read_table(self.predictions_file(split), columns=list(columns))
        return {c: table.column(c).to_numpy() for c in columns}

    # ----------------------------------------------------------------------------- what it is
    def is_finished(self) -> bool:
        """``metrics.json`` is there (whatever made it): a finished run, of one seed or several."""
        return self.metrics_file.exists()

    def finished(self, fingerprint: str) -> dict[str, Any] | None:
        """The metrics of a finished run of one seed made under ``fingerprint``, else None."""
        if not (self.metrics_file.exists() and self.info_file.exists()):
            return None
        try:
            if read_json(self.info_file).get("fingerprint") != fingerprint:
                return None
            return read_json(self.metrics_file)
        except (OSError, ValueError):
            return None

    def is_single_seed(self) -> bool:
        """A run of one seed (it has ``run.json``), not the parent of ``seed-*/`` runs."""
        return self.info_file.exists()

    def seeds(self) -> dict[str, "RunDir"]:
        """The finished runs of each seed, ``{"seed-<s>": RunDir}``, in the order of the run's
        ``run.seeds`` (``config.json``); a run of one seed: ``{"seed-<s>": self}``. A ``seed-*``
        folder of a seed the run no longer has (an earlier run's) is not one of them."""
        if self.is_single_seed():
            return {f"seed-{self.info().get('seed', 0)}": self} if self.is_finished() else {}
        found = {d.name: RunDir(d) for d in sorted(self.path.glob("seed-*")) if (d / METRICS).exists()}
        try:
            order = [f"seed-{s}" for s in self.config()["run"]["seeds"]]
        except (OSError, ValueError, KeyError, TypeError):
            return found  # no configuration to order by: the folders, sorted
        return {name: found[name] for name in order if name in found}

    def first_seed(self) -> "RunDir":
        """The run of the first seed of ``run.seeds`` (the seed learning-rate selection trains with)."""
        seeds = self.seeds()
        if not seeds:
            raise FlipError(f"{self.path} holds no finished run (no metrics.json). "
                            "Fix: run `flip finetune` (or `dvc repro`) first.")
        return next(iter(seeds.values()))

    def best_seed(self, metric: str = "valid.auc") -> "RunDir":
        """The seed run with the highest ``metric`` (a dotted key of its metrics.json; NaN or missing
        counts as the lowest; ties: the earlier seed of ``run.seeds``)."""
        seeds = self.seeds()
        if not seeds:
            raise FlipError(f"{self.path} holds no finished run (no metrics.json). "
                            "Fix: run `flip finetune` (or `dvc repro`) first.")

        def value(run: RunDir) -> float:
            v = _lookup(run.metrics(), metric)
            return float(v) if isinstance(v, (int, float)) and not math.isnan(float(v)) else -math.inf

        return max(seeds.values(), key=value)

    def candidates(self) -> dict[str, "RunDir"]:
        """The learning-rate selection candidates, ``{name: RunDir}`` (finished or not)."""
        d = self.path / CANDIDATES
        return {c.name: RunDir(c) for c in sorted(d.iterdir()) if c.is_dir()} if d.is_dir() else {}

    # --------------------------------------------------------------------------------- writing
    def write_config(self, config: dict[str, Any]) -> None:
        write_json(self.config_file, config)

    def write_info(self, info: dict[str, Any]) -> None:
        write_json(self.info_file, info)

    def write_selection(self, selection: dict[str, Any]) -> None:
        write_json(self.selection_file, selection)

    def open_log(self, records: list[dict[str, Any]] | None = None) -> RunLog:
        """``log.jsonl`` rewritten with ``records`` (a resumed run's history; none: a new log)."""
        self.path.mkdir(parents=True, exist_ok=True)
        return RunLog(self.log_file, records)

    def write_weights(self, state: dict[str, Any], name: str = WEIGHTS) -> None:
        """``safetensors`` of a state dict, atomically (tied tensors are copied apart)."""
        from safetensors.torch import save_file

        tensors = {k: v.detach().to("cpu").clone().contiguous() for k, v in state.items()}
        with atomic_file(self.path / name) as tmp:
            save_file(tensors, str(tmp), metadata={"format": "pt"})

    def write_predictions(self, split: str, row: Any, y: Any, prob: Any) -> None:
        import numpy as np
        import pyarrow as pa
        import pyarrow.parquet as pq

        table = pa.table({
            "row": pa.array(np.asarray(row, dtype=np.int64)),
            "label": pa.array(np.asarray(y).astype(np.int8)),
            "prob": pa.array(np.asarray(prob, dtype=np.float64)),
        })
        with atomic_file(self.predictions_file(split)) as tmp:
            pq.write_table(table, tmp)

    def finish(self, metrics: dict[str, Any]) -> dict[str, Any]:
        """Write ``metrics.json``: the last write of a run, which makes it a finished one. The only
        writer of ``metrics.json``. Returns ``metrics``."""
        write_json(self.metrics_file, metrics)
        return metrics

    # ------------------------------------------------------------------------------- clearing
    def discard_result(self) -> None:
        """Remove ``metrics.json`` and ``run.json``: an earlier run's result must not pass for the next."""
        for f in (self.metrics_file, self.info_file):
            f.unlink(missing_ok=True)

    def remove_checkpoint(self) -> None:
        shutil.rmtree(self.checkpoint_dir, ignore_errors=True)

    def remove_candidates(self) -> None:
        shutil.rmtree(self.path / CANDIDATES, ignore_errors=True)
        self.selection_file.unlink(missing_ok=True)

    def clear_single_seed(self) -> None:
        """Remove the files of a run of one seed (before this directory becomes the parent of several)."""
        for name in (METRICS, CONFIG, INFO, WEIGHTS, LOG):
            (self.path / name).unlink(missing_ok=True)
        for name in (PREDICTIONS, CHECKPOINT):
            shutil.rmtree(self.path / name, ignore_errors=True)

    def adopt(self, source: "RunDir", fingerprint: str) -> None:
        """Make the finished run ``source`` (a selection candidate) this run under ``fingerprint``: its
        files are copied here (other entries stay) and ``run.json`` carries the new fingerprint and
        ``adopted_from``. Not ``metrics.json``: the caller finishes the run (:meth:`finish`)."""
        self.path.mkdir(parents=True, exist_ok=True)
        self.metrics_file.unlink(missing_ok=True)
        for item in source.path.iterdir():
            if item.name in (CHECKPOINT, INFO, METRICS):
                continue
            if item.is_dir():
                with atomic_dir(self.path / item.name, "finetune", ("*",)) as tmp:  # (in the run's own folder)
                    shutil.copytree(item, tmp, dirs_exist_ok=True)
            else:
                with atomic_file(self.path / item.name) as tmp:
                    shutil.copy2(item, tmp)
        self.write_info({**source.info(), "fingerprint": fingerprint, "adopted_from": str(source.path)})
