"""The language-model step before and after length bucketing: FLIP pretraining and ``flip_plm`` finetuning.

    python benchmarks/plm_speed.py --idle yes                                   # the full run (idle machine)
    python benchmarks/plm_speed.py --steps 3 --repeats 1 --loss-seeds 0 --idle no   # a quick check

Settings: the quick profile (``params.yaml``: MiniLM-L6 ``plm.name=minilm-l6``, ``plm.max_length`` 64,
``pretrain.batch_size`` / ``finetune.plm_batch_size`` 32, the last 8,000 training rows) on the MovieLens-1M
copy (``FLIP_DATA_MIRROR``, default ``../shared/data``; preprocessed once into ``--work``), or ``--data DIR``.

Arms (A/B interleaved): every arm is built first (the same seed: the same initial weights), then each
repeat runs every arm in turn for ``--warmup`` untimed and ``--steps`` timed training steps (forward,
backward, optimizer and scheduler step, as the loop runs them) on its own batch stream, which goes on
from repeat to repeat; the result per arm is the median over repeats of samples/s.

* pretraining ``before``: the path before the faster step: ``pretrain.length_bucketing=false``,
  ``plm.fast_dropout=false`` (torch's dropout and SDPA) and the rows of a batch on the device (the trim
  width read from it); ``bucketing``: only ``pretrain.length_bucketing`` on; ``after``: the defaults
  (bucketing, host dropout, the rows on the host); ``after+one_text_pass``: also ``pretrain.one_text_pass``;
* finetuning (``PlmTask``, the task of ``flip_plm``; started from ``plm.name`` itself, so no pretraining
  run is needed: the step is the same): ``before`` / ``after`` as above with ``finetune.length_bucketing``.

``speedup`` = pretraining after / before samples/s. ``mean_width``: the mean trimmed batch width (token
columns computed per row). Losses: ``--loss-seeds N`` pretrains N seeds for ``--loss-steps`` optimizer steps
with the ``before`` and the ``after`` settings (``flip pretrain`` itself, in ``--work/loss``; a finished run
is reused, so a killed benchmark goes on where it stopped) and reports the final losses (mean of the last 50
batches) per seed, their mean and spread, and after - before in units of the seeds' spread: the two should
agree within seed noise.
Writes ``benchmarks/results/plm_speed.json``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks.common import RESULTS, machine, save  # noqa: E402
from benchmarks.flip_ml1m import processed_dataset  # noqa: E402

NAME = "plm_speed"
LOSS_KEYS = ("loss", "mlm", "mtm", "icl")


class Arm:
    """One training setup with its own batch stream (the loop's permutation, ordered by the task)."""

    def __init__(self, name: str, task: Any, batch_size: int, seed: int, host: bool) -> None:
        self.name, self.task, self.bs = name, task, batch_size
        task.host_batches = host
        self.generator = torch.Generator().manual_seed(seed)
        self.perm: torch.Tensor | None = None
        self.pos, self.samples, self.widths = 0, [], []
        task.model.train()

    def next_rows(self) -> torch.Tensor:
        task = self.task
        if self.perm is None or self.pos + self.bs > self.perm.shape[0]:
            perm = task.order_epoch(torch.randperm(task.n_train, generator=self.generator), self.bs, self.generator)
            self.perm, self.pos = perm if task.host_batches else perm.to(task.device), 0
        idx = self.perm[self.pos:self.pos + self.bs]
        self.pos += self.bs
        return idx

    def step(self) -> None:
        task = self.task
        idx = self.next_rows()
        tokens = task.tokens["train"] if isinstance(getattr(task, "tokens", None), dict) else task.data.tokens
        self.widths.append(int(tokens.row_lengths[idx.cpu().numpy()].max()))
        out = task.loss(idx)
        (out[0] if isinstance(out, tuple) else out).backward()
        task.optimizer.step()
        task.optimizer.zero_grad(set_to_none=True)
        if task.scheduler is not None:
            task.scheduler.step()

    def run(self, warmup: int, steps: int) -> float:
        for _ in range(warmup):
            self.step()
        t0 = time.perf_counter()
        for _ in range(steps):
            self.step()
        rate = steps * self.bs / (time.perf_counter() - t0)
        self.samples.append(rate)
        return rate

    def result(self) -> dict[str, Any]:
        return {"samples_per_second": statistics.median(self.samples), "per_repeat": self.samples,
                "mean_width": sum(self.widths) / max(len(self.widths), 1)}


def pretrain_arms(cfg: Any, data_dir: Path, device: torch.device, seed: int) -> list[Arm]:
    import dataclasses

    from flip.models.plm import load_plm
    from flip.train.loop import seed_everything
    from flip.train.pretrain import PretrainTask, load_pretrain_data

    _, tokenizer = load_plm(cfg.plm)
    data = load_pretrain_data(cfg, data_dir, tokenizer, device, progress=False)
    arms = []
    for name, bucketing, fast, one_pass, host in (("before", False, False, False, False),
                                                  ("bucketing", True, False, False, True),
                                                  ("after", True, True, False, True),
                                                  ("after+one_text_pass", True, True, True, True)):
        c = dataclasses.replace(cfg, pretrain=dataclasses.replace(cfg.pretrain, length_bucketing=bucketing,
                                                                  one_text_pass=one_pass),
                                plm=dataclasses.replace(cfg.plm, fast_dropout=fast))
        seed_everything(seed)
        arms.append(Arm(name, PretrainTask(c, data, device, seed), cfg.pretrain.batch_size, seed, host))
    return arms


def finetune_arms(cfg: Any, data_dir: Path, device: torch.device, seed: int) -> list[Arm]:
    import dataclasses

    from flip.train.builders import build_plm_scratch
    from flip.train.loop import seed_everything
    from flip.train.tasks import load_ctr_data

    f = cfg.finetune
    data = load_ctr_data(data_dir, device, f.max_rows).subset(f.train_rows, f.eval_rows)
    arms = []
    for name, fast in (("before", False), ("after", True)):
        c = dataclasses.replace(cfg, plm=dataclasses.replace(cfg.plm, fast_dropout=fast))
        seed_everything(seed)
        task = build_plm_scratch(c, data, device)
        task.length_bucketing = fast
        arms.append(Arm(name, task, f.plm_batch_size, seed, host=fast))
    return arms


def _spread(values: list[float]) -> dict[str, float | None]:
    return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else None}


def _in_sd(before: dict[str, Any], after: dict[str, Any]) -> float:
    pooled = (((after["std"] or 0.0) ** 2 + (before["std"] or 0.0) ** 2) / 2) ** 0.5
    return (after["mean"] - before["mean"]) / max(pooled, 1e-12)


def held_out_losses(run_dir: Path, data_dir: Path, cache_dir: Path, rows: int, batch_size: int = 32) -> dict[str, float]:
    """The pretrained model of ``run_dir`` on the same inputs for every run: the first ``rows`` rows of
    the validation split in plain order, batches of ``batch_size``, masks and noise from one fixed
    generator, evaluation mode (no dropout). Training losses are means over each run's own batches,
    which bucketing composes differently (rows of similar length: other in-batch negatives for ICL);
    these compare the models themselves."""
    from flip.align.model import pretrain_batch
    from flip.data.tensors import load_tabular
    from flip.data.tokens import tokenize_split
    from flip.evaluate.analysis import _load_pretrained

    cfg, _, model, tokenizer = _load_pretrained(run_dir, data_dir)
    tab = load_tabular(data_dir, "valid", rows)
    tokens = tokenize_split(data_dir, "valid", tokenizer, cfg.plm.max_length, cache_dir, progress=False,
                            rows=np.arange(len(tab)))
    generator = torch.Generator().manual_seed(0)
    sums, n = dict.fromkeys(LOSS_KEYS, 0.0), 0
    with torch.inference_mode():
        for lo in range(0, len(tab), batch_size):
            idx = torch.arange(lo, min(len(tab), lo + batch_size))
            out = model(pretrain_batch(tab.x, tokens, idx), generator)
            for k in LOSS_KEYS:
                sums[k] += float(out[k]) * len(idx)
            n += len(idx)
    return {k: v / n for k, v in sums.items()}


def loss_runs(cfg: Any, data_dir: Path, work: Path, seeds: list[int], steps: int,
              held_out_rows: int = 2048) -> dict[str, Any]:
    import dataclasses

    from flip.train.pretrain import pretrain

    out: dict[str, Any] = {"steps": steps, "seeds": seeds, "held_out_rows": held_out_rows, "runs": {}}
    for key, after in (("before", False), ("after", True)):
        per_seed = []
        for seed in seeds:
            c = dataclasses.replace(cfg, pretrain=dataclasses.replace(cfg.pretrain, length_bucketing=after,
                                                                      max_steps=steps),
                                    plm=dataclasses.replace(cfg.plm, fast_dropout=after),
                                    run=dataclasses.replace(cfg.run, seeds=[seed], progress=False))
            run_dir = work / "loss" / f"{key}-seed{seed}-steps{steps}"
            m = pretrain(c, data_dir, run_dir)
            held = held_out_losses(run_dir, data_dir, work / "tokens", held_out_rows)
            per_seed.append({"seed": seed, **{k: m[k] for k in LOSS_KEYS}, "held_out": held})
        summary = {k: _spread([r[k] for r in per_seed]) for k in LOSS_KEYS}
        held = {k: _spread([r["held_out"][k] for r in per_seed]) for k in LOSS_KEYS}
        out["runs"][key] = {"per_seed": per_seed, **summary, "held_out": held}
    if len(seeds) > 1:  # after - before, in units of the seeds' spread (pooled standard deviation)
        runs = out["runs"]
        out["difference_in_sd"] = {k: _in_sd(runs["before"][k], runs["after"][k]) for k in LOSS_KEYS}
        out["held_out_difference_in_sd"] = {k: _in_sd(runs["before"]["held_out"][k], runs["after"]["held_out"][k])
                                            for k in LOSS_KEYS}
    return out


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, help="a processed dataset (default: preprocess the MovieLens-1M copy)")
    p.add_argument("--work", type=Path, default=ROOT / "runs" / NAME, help="work directory (data, tokens, loss runs)")
    p.add_argument("--steps", type=int, default=40, help="timed steps per arm and repeat")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--seed", type=int, default=2012)
    p.add_argument("--loss-seeds", type=int, default=3,
                   help="seeds of the loss comparison (0 = skip it and keep the results file's earlier one)")
    p.add_argument("--loss-steps", type=int, default=100, help="optimizer steps of each loss run")
    p.add_argument("--skip-finetune", action="store_true")
    p.add_argument("--losses-only", action="store_true",
                   help="only the loss comparison; the timings of the results file already there are kept")
    p.add_argument("--device", default="cpu")
    p.add_argument("--idle", choices=("yes", "no"), required=True, help="was the machine otherwise idle?")
    p.add_argument("--out", type=Path, default=None, help="results directory (default benchmarks/results)")
    p.add_argument("-S", "--set", action="append", default=[], help="config override (key=value), repeatable")
    args = p.parse_args(argv)

    from flip.config import load_config
    from flip.train.loop import resolve_device, set_threads

    overrides = ["data.dataset=movielens-1m", "plm.name=minilm-l6", f"plm.cache_dir={args.work / 'tokens'}",
                 "run.progress=false", *args.set]
    cfg = load_config(ROOT / "params.yaml", overrides)
    set_threads(cfg.run.threads)
    device = resolve_device(args.device)
    data_dir = args.data or processed_dataset(cfg, args.work)
    result: dict[str, Any] = {"idle": args.idle == "yes", "device": str(device), "threads": torch.get_num_threads(),
                              "overrides": overrides, "steps": args.steps, "warmup": args.warmup,
                              "repeats": args.repeats, "batch_size": cfg.pretrain.batch_size,
                              "max_length": cfg.plm.max_length, "machine_cores": machine()["cores"]}
    if args.losses_only:
        kept = json.loads((Path(args.out or RESULTS) / f"{NAME}.json").read_text())
        result = {**kept, "losses": loss_runs(cfg, data_dir, args.work, [args.seed + i for i in range(args.loss_seeds)],
                                               args.loss_steps)}
        # the timings' own command and date (save records this run's)
        timing = kept.get("timing") or {"command": kept.get("command"), "date": kept.get("date")}
        for key in ("command", "date", "machine"):
            result.pop(key, None)
        result["timing"] = timing
        result.pop("losses_run", None)  # the losses are this run's (its command and date)
        save(NAME, result, args.out)
        return result
    groups = {"pretrain": pretrain_arms(cfg, data_dir, device, args.seed)}
    if not args.skip_finetune:
        groups["finetune_plm"] = finetune_arms(cfg, data_dir, device, args.seed)
    for r in range(args.repeats):
        for group, arms in groups.items():
            for arm in arms:
                rate = arm.run(args.warmup if r == 0 else 0, args.steps)
                print(f"repeat {r + 1}/{args.repeats} {group:12s} {arm.name:20s} {rate:8.1f} samples/s", flush=True)
    for group, arms in groups.items():
        result[group] = {arm.name: arm.result() for arm in arms}
        res = result[group]
        res["speedup"] = res["after"]["samples_per_second"] / res["before"]["samples_per_second"]
    result["speedup"] = result["pretrain"]["speedup"]
    if args.loss_seeds > 0:
        result["losses"] = loss_runs(cfg, data_dir, args.work, [args.seed + i for i in range(args.loss_seeds)],
                                     args.loss_steps)
    else:  # timings only: an earlier loss comparison stays, under the command and date that made it
        path = Path(args.out or RESULTS) / f"{NAME}.json"
        kept = json.loads(path.read_text()) if path.exists() else {}
        if "losses" in kept:
            made = kept.get("losses_run") or {"command": kept.get("command"), "date": kept.get("date")}
            result["losses"], result["losses_run"] = kept["losses"], made
    save(NAME, result, args.out)
    return result


if __name__ == "__main__":
    main()
