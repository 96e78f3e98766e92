"""Several seeds and learning-rate selection: how ``flip finetune`` turns runs of one seed into its result.

Seeds (:func:`run_seeds`)
    One seed of ``run.seeds``: the run is ``OUT`` itself. Several: one run per seed in ``OUT/seed-<s>/``,
    then ``OUT/config.json`` and ``OUT/metrics.json`` with the mean (also at the top level), the
    sample standard deviation (``ddof=1``) and every seed's values (:func:`aggregate_seeds`), so that
    paired tests across strategies are possible.
Learning rates (:func:`select_learning_rate`)
    When ``finetune.lr_grid`` / ``plm_lr_grid`` give several candidates (:func:`lr_candidates`), each is
    trained with the first seed in ``OUT/candidates/<lr=…>/`` and scored on the validation split only
    (it never sees the test split); the best validation AUC wins and ``OUT/selection.json`` records
    every candidate. The winner's run becomes the first seed's run (:func:`adopt`: its files copied,
    its test split scored then, once); the other seeds train with the winning rates.

The layout is :mod:`flip.runs`'; only :class:`~flip.runs.RunDir` writes it.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from flip.errors import SettingError
from flip.runs import RunDir
from flip.strategy_table import Strategy
from flip.train.fingerprint import flatten
from flip.train.loop import LoopSettings, Task, score

__all__ = ["adopt", "aggregate_seeds", "candidate_name", "lr_candidates", "run_seeds", "select_learning_rate"]


# ---------------------------------------------------------------------------------------- seeds
def _unflatten(flat: dict[str, Any]) -> dict[str, Any]:
    tree: dict[str, Any] = {}
    for name, value in flat.items():
        node = tree
        *parents, leaf = name.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    return tree


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
    result.update({"seeds": seeds, "mean": _unflatten(mean), "std": _unflatten(std),
                   "per_seed": {f"seed-{s}": per_seed[s] for s in seeds}})
    return result


def run_seeds(cfg: Any, out_dir: str | Path, run_one: Callable[[Any, Path], dict[str, Any]]) -> dict[str, Any]:
    """Run ``run_one(cfg_with_one_seed, dir)`` per seed of ``cfg.run.seeds``.

    One seed: straight into ``out_dir``. Several: into ``out_dir/seed-<s>/``, then
    ``out_dir/config.json`` and ``out_dir/metrics.json`` (see :func:`aggregate_seeds`).
    """
    run = RunDir(out_dir)
    seeds = list(cfg.run.seeds) or [0]
    if len(set(seeds)) != len(seeds):
        raise SettingError(f"run.seeds has duplicates: {seeds}")
    if len(seeds) == 1:
        return run_one(cfg, run.path)
    run.clear_single_seed()  # outputs of an earlier single-seed run here would pass for this run's
    per_seed = {}
    for s in seeds:
        cfg_s = dataclasses.replace(cfg, run=dataclasses.replace(cfg.run, seeds=[s]))
        per_seed[s] = run_one(cfg_s, run.seed_dir(s).path)
    result = aggregate_seeds(per_seed)
    run.write_config(dataclasses.asdict(cfg))
    return run.finish(result)


# ------------------------------------------------------------------------------- learning rates
def lr_candidates(cfg: Any, strategy: Strategy) -> list[dict[str, float]]:
    """The learning rates to select among: ``finetune.lr_grid`` for a strategy that trains an ID model
    times ``finetune.plm_lr_grid`` for one that trains a language model (an empty grid is the single
    value ``lr`` / ``plm_lr``). ``flip`` trains both, so each group gets its own rate."""
    f = cfg.finetune
    ids = (f.lr_grid or [f.lr]) if strategy.uses_id else [f.lr]
    plms = (f.plm_lr_grid or [f.plm_lr]) if strategy.uses_plm else [f.plm_lr]
    return [{"lr": float(a), "plm_lr": float(b)} for a in dict.fromkeys(ids) for b in dict.fromkeys(plms)]


def candidate_name(c: dict[str, float], strategy: Strategy) -> str:
    """``lr=0.001`` / ``plm_lr=5e-05`` / ``lr=0.001,plm_lr=5e-05``: the folder of a candidate."""
    parts = ([f"lr={c['lr']:g}"] if strategy.uses_id else []) + ([f"plm_lr={c['plm_lr']:g}"] if strategy.uses_plm else [])
    return ",".join(parts)


def adopt(candidate: RunDir, run: RunDir, fingerprint: str, build_task: Callable[[], Task],
          settings: LoopSettings) -> dict[str, Any]:
    """Make the finished ``candidate`` the run in ``run`` under ``fingerprint``: its files are copied,
    its weights score the test split once (predictions and metrics), and the run is finished."""
    run.adopt(candidate, fingerprint)
    device = torch.device(settings.device)
    task = build_task()
    task.model.load_state_dict(run.weights(device=str(device)))
    m, prob = score(task, "test", settings.eval_batch_size, device)
    es = task.eval_sets["test"]
    run.write_predictions("test", es.row, es.y.detach().cpu().numpy(), prob)
    return run.finish({**candidate.metrics(), "test": m})


def select_learning_rate(out: RunDir, candidates: list[dict[str, float]], strategy: Strategy,
                         train: Callable[[dict[str, float], RunDir], dict[str, Any]], seed: int) -> dict[str, Any]:
    """Train every candidate with ``train(candidate, its RunDir)`` (first seed, no test split), keep the
    best validation AUC (NaN counts as the lowest) and write ``selection.json``; returns the selection."""
    tried = []
    for c in candidates:
        m = train(c, out.candidate(candidate_name(c, strategy)))
        tried.append({**c, "valid_auc": m["valid"]["auc"], "valid_logloss": m["valid"]["logloss"],
                      "best_epoch": m["train"]["best_epoch"]})
    best = max(tried, key=lambda t: (t["valid_auc"] if t["valid_auc"] == t["valid_auc"] else -1.0))
    selection = {"metric": "valid_auc", "seed": seed, "candidates": tried,
                 "selected": {"lr": best["lr"], "plm_lr": best["plm_lr"]},
                 "grid": {"lr": sorted({c["lr"] for c in candidates}),
                          "plm_lr": sorted({c["plm_lr"] for c in candidates})}}
    out.write_selection(selection)
    return selection
