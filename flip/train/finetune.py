"""``flip finetune``: train ``finetune.strategy`` (a row of ``flip.strategy_table.STRATEGIES``) on a processed dataset.

    metrics = finetune(cfg, "data/processed/movielens-1m", "models/finetune/scratch")

:func:`finetune` loads the processed splits once (``flip.train.tasks``), looks the strategy up in the
table, builds its task (``flip.train.builders``) and runs the generic loop
(:func:`flip.train.loop.fit`) for every seed in ``cfg.run.seeds``, after selecting the learning rates on
validation when the grids give several (:mod:`flip.train.selection`: seeds, selection; :mod:`flip.runs`:
the output layout). What identifies a run: ``flip.train.fingerprint`` (the config sections the stage
reads, the dataset, the seed and :func:`flip.train.builders.strategy_fingerprint`: the weights the
strategy starts from, so that a finished run is not reused after its inputs changed).

Under torchrun (``WORLD_SIZE > 1``: ``torchrun --nproc-per-node N -m flip.cli finetune ...``) the
ID-model strategies (``scratch``, ``flip_id``) train through DDP, each rank reading only its rows of
the training split (:mod:`flip.train.sharding`): the global batch at every step is the single
process's at the same ``finetune.batch_size``, so N ranks end with the weights of one process (within
float rounding). Every rank scores valid and test itself (early stopping decides alike); only rank 0
writes ``OUT``, rank ``r > 0`` works in ``OUT/.rank-r`` (removed at the end). The strategies with a
language model run in one process.

Adding a strategy: a builder ``build(cfg, data, device, pretrained) -> Task`` in
``flip.train.builders`` (``pretrained`` is the pretraining run directory, ``flip finetune
--pretrained DIR``, or None) and its row in ``flip.strategy_table.STRATEGIES``; the loop is not touched.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from flip.config import Config
from flip.runs import RunDir
from flip.strategy_table import get_strategy
from flip.errors import SettingError
from flip.train.tasks import CtrData, finetune_bf16, load_ctr_data, load_sharded_ctr_data
from flip.train.fingerprint import dataset_fingerprint, run_fingerprint
from flip.train.loop import LoopSettings, Task, fit, set_threads
from flip.train.selection import adopt, candidate_name, lr_candidates, run_seeds, select_learning_rate
from flip.train.builders import strategy_fingerprint

__all__ = ["finetune", "loop_settings", "lr_candidates"]


# ---------------------------------------------------------------------------------- entry point
def loop_settings(cfg: Config, device: torch.device, main: bool = True) -> LoopSettings:
    """Epochs and batch size from ``finetune``: ``epochs`` / ``batch_size``, or ``plm_epochs`` /
    ``plm_batch_size`` for the strategies with a language model."""
    f, r = cfg.finetune, cfg.run
    plm = get_strategy(f.strategy).uses_plm
    return LoopSettings(
        epochs=f.plm_epochs if plm else f.epochs,
        batch_size=f.plm_batch_size if plm else f.batch_size,
        eval_batch_size=f.eval_batch_size,
        patience=f.patience,
        checkpoint_every=r.checkpoint_every,
        progress=r.progress and main,
        device=str(device),
    )


def _with(cfg: Config, seed: int | None = None, **finetune: Any) -> Config:
    run = cfg.run if seed is None else dataclasses.replace(cfg.run, seeds=[seed])
    return dataclasses.replace(cfg, finetune=dataclasses.replace(cfg.finetune, **finetune), run=run)


def finetune(cfg: Config, dataset_dir: str | Path, out_dir: str | Path, *,
             pretrained: str | Path | None = None) -> dict[str, Any]:
    """Train ``cfg.finetune.strategy`` on the processed dataset in ``dataset_dir`` for every seed;
    write the outputs to ``out_dir`` and return the metrics (aggregated over seeds when several).

    Every strategy trains on the same rows: the last ``finetune.train_rows`` training rows (0 = all)
    and is scored on at most ``finetune.eval_rows`` validation and test rows (0 = all), so that
    strategies compare at equal data on the same rows.

    Strategies with a language model run the first ``finetune.plm_seeds`` seeds of ``run.seeds``.

    Learning-rate selection (when the grids give more than one candidate, see
    :func:`flip.train.selection.lr_candidates`): each candidate is trained with the first seed in
    ``OUT/candidates/<lr…>/`` and scored on the validation split only; the best validation AUC wins.
    The winner's run becomes that seed's run (its test split scored then, once), the other seeds train
    with the winning rates, and ``OUT/selection.json`` records every candidate's validation metrics.

    ``pretrained``: the pretraining run directory, for the strategies that start from it.
    """
    strategy = get_strategy(cfg.finetune.strategy)  # fail before any work (and before any output)
    from flip.models import check_model_name

    check_model_name(cfg.id_model.name)
    if strategy.uses_plm:  # fewer seeds for the costly strategies
        cfg = dataclasses.replace(cfg, run=dataclasses.replace(cfg.run, seeds=cfg.run.seeds[:cfg.finetune.plm_seeds]))
    from flip.train.distributed import init_distributed

    dataset_dir = Path(dataset_dir)
    pretrained = Path(pretrained) if pretrained is not None else None
    set_threads(cfg.run.threads)
    ctx, device = init_distributed(cfg.run.device)
    try:
        if ctx.distributed and strategy.uses_plm:
            raise SettingError(f"finetune.strategy={strategy.name} trains a language model, which runs in one "
                               "process; under torchrun only the ID-model strategies (scratch, flip_id) train. "
                               "Fix: run this strategy without torchrun")
        out_dir = Path(out_dir) if ctx.is_main else Path(out_dir) / f".rank-{ctx.rank}"
        result = _finetune(cfg, strategy, dataset_dir, out_dir, pretrained, ctx, device)
        if not ctx.is_main:
            import shutil

            shutil.rmtree(out_dir, ignore_errors=True)
        return result
    finally:
        if ctx.owns_group:
            import torch.distributed as dist

            dist.barrier()
            dist.destroy_process_group()


def _finetune(cfg: Config, strategy: Any, dataset_dir: Path, out_dir: Path, pretrained: Path | None, ctx: Any,
              device: torch.device) -> dict[str, Any]:
    """:func:`finetune` on this rank (``ctx``: :class:`flip.train.distributed.DistContext`)."""
    dataset_id = dataset_fingerprint(dataset_dir)
    cache: dict[str, CtrData] = {}

    def data() -> CtrData:  # loaded at most once, and only if some seed has work to do
        if "data" not in cache:
            if ctx.distributed:  # each rank reads its rows of the training split, epoch by epoch
                cache["data"] = load_sharded_ctr_data(dataset_dir, device, cfg.finetune, ctx)
            else:
                full = load_ctr_data(dataset_dir, device, cfg.finetune.max_rows, budget_bytes=cfg.run.resident_mib << 20)
                cache["data"] = full.subset(cfg.finetune.train_rows, cfg.finetune.eval_rows)
        return cache["data"]

    def fingerprint(cfg_s: Config, seed: int) -> str:
        identity = strategy_fingerprint(cfg_s, strategy, pretrained)
        extra = {"strategy": identity} if identity is not None else {}
        if ctx.distributed:  # the same rows and batches, but not bit for bit the same sums
            extra["world_size"] = ctx.world
        return run_fingerprint("finetune_plm" if strategy.uses_plm else "finetune", cfg_s, dataset_id, seed, extra)

    def build(cfg_s: Config, holdout_test: bool = False) -> Callable[[], Task]:
        def make() -> Task:
            task = strategy.builder(cfg_s, data(), device, pretrained)
            if holdout_test:  # a selection candidate never sees the test split
                task.eval_sets = {k: v for k, v in task.eval_sets.items() if k != "test"}
            return task
        return make

    def run_one(cfg_s: Config, out: Path, holdout_test: bool = False) -> dict[str, Any]:
        seed = cfg_s.run.seeds[0] if cfg_s.run.seeds else 0
        fp = fingerprint(cfg_s, seed)
        return fit(
            build(cfg_s, holdout_test),
            loop_settings(cfg_s, device, ctx.is_main),
            out,
            seed=seed,
            config=cfg_s.to_dict(),
            fingerprint=fp + ("-candidate" if holdout_test else ""),
            info={"stage": "finetune", "strategy": strategy.name, "dataset_dir": str(dataset_dir),
                  "precision": "bf16" if finetune_bf16(cfg_s, device) else "fp32",
                  "pretrained": str(pretrained) if pretrained is not None else None,
                  **({"world_size": ctx.world} if ctx.distributed else {})},
        )

    out = RunDir(out_dir)
    candidates = lr_candidates(cfg, strategy)
    if len(candidates) == 1:
        out.remove_candidates()
        return run_seeds(_with(cfg, **candidates[0]), out_dir, run_one)

    seeds = list(cfg.run.seeds) or [0]
    first = seeds[0]
    selection = select_learning_rate(
        out, candidates, strategy, lambda c, cand: run_one(_with(cfg, first, **c), cand.path, holdout_test=True),
        first)
    final = _with(cfg, **selection["selected"])
    # the winner's run is the first seed's run: adopt it (its test split scored then, once)
    first_run = out if len(seeds) == 1 else out.seed_dir(first)
    cfg_first = _with(final, first)
    # (rank 0 alone: scoring needs no other rank, and the first seed's fit below follows rank 0's run)
    if ctx.is_main and first_run.finished(fingerprint(cfg_first, first)) is None:
        adopt(out.candidate(candidate_name(selection["selected"], strategy)), first_run,
              fingerprint(cfg_first, first), build(cfg_first), loop_settings(cfg_first, device))
    return run_seeds(final, out_dir, run_one)
