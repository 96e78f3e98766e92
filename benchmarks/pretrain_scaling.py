"""How FLIP's gain grows with pretraining: FLIP_ID after pretraining on more and more rows, against scratch.

    python benchmarks/pretrain_scaling.py --idle yes                        # 2k, 8k, 32k rows (~1 h here)
    python benchmarks/pretrain_scaling.py --sizes 2000 8000 32000 128000 --idle yes   # add a point

For each size N (``--sizes``): ``flip pretrain`` with the quick profile's settings (``params.yaml``)
and ``pretrain.train_rows=N`` (the N most recent training rows, one epoch), then ``flip finetune`` of
``flip_id`` from it on the whole training split, scored on the whole valid/test splits (the
``full_flip_id`` stage: ``finetune.train_rows=0``, ``finetune.eval_rows=0``, ``finetune.lr_grid=[]``),
with the seeds of ``run.seeds`` (3 by default). Next to it, once: ``full_scratch`` with the same
seeds and settings. Each point reports the paired test-AUC difference FLIP_ID − scratch (mean over
seeds, DeLong's 95% interval and two-sided p on the whole test split:
``flip.evaluate.significance.paired_delta``), each seed's difference, the pretraining's final losses,
wall time and samples/s.

Resumable: the runs live in ``--work`` (default ``runs/pretrain_scaling``) and a finished run is
reused (``flip.train.fingerprint``), a killed one resumes from its checkpoint; a point already in the
results file with the same settings is not recomputed. The results file is rewritten after every
point. Writes ``benchmarks/results/pretrain_scaling.json`` (``points``: rows, seeds, delta, ci_low,
ci_high, p_value, time, ...) and the figure ``benchmarks/results/pretrain_scaling.png``
(``flip.evaluate.figures.pretrain_scaling``: ΔAUC with its interval against pretraining rows, log
axis, the paper's +0.0052 as a line); ``flip report`` shows the same figure. Wall times are only
meaningful on an otherwise idle machine: say so with ``--idle``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks.common import RESULTS, machine, save  # noqa: E402
from benchmarks.flip_ml1m import (paired_deltas, processed_dataset, profile_config, run_finetuning,  # noqa: E402
                                  run_pretraining)

NAME = "pretrain_scaling"
FULL_DATA = ["finetune.train_rows=0", "finetune.eval_rows=0", "finetune.lr_grid=[]"]
PAPER_FLIP_ID_DELTA = 0.0052  # the paper's Table 3, MovieLens-1M: FLIP_ID over the ID model (DCNv2)


def _summary(row: dict[str, Any]) -> dict[str, Any]:
    keep = ("test_auc", "valid_auc", "test_logloss", "seeds", "std", "seconds", "train_samples_per_second")
    return {k: row[k] for k in keep if k in row}


def precisions(work: Path) -> dict[str, Any]:
    """The precision each kind of run trained in (``pretrain.precision`` / ``finetune.precision`` auto
    means bf16 autocast where the CPU has AVX512-BF16/AMX: runs differ from an fp32 machine's by rounding)."""
    from flip.runs import RunDir

    found: dict[str, Any] = {}
    for kind, pattern in (("pretrain", "pretrain-*"), ("finetune", "full_scratch")):
        for d in sorted(work.glob(pattern)):
            runs = list(RunDir(d).seeds().values()) or [RunDir(d)]
            info = runs[0].info()
            if info.get("precision"):
                found[kind] = info["precision"]
                break
    return found


def reading(points: list[dict[str, Any]]) -> str:
    """What the points say, in one or two sentences (written from the numbers, not by hand)."""
    pts = sorted(points, key=lambda p: p["rows"])
    first, last = pts[0], pts[-1]
    sig = [p["rows"] for p in pts if p["p_value"] < 0.05 and p["ci_low"] > 0]
    rising = all(b["delta"] >= a["delta"] for a, b in zip(pts, pts[1:]))
    text = (f"ΔAUC goes from {first['delta']:+.4f} at {first['rows']:,} pretraining rows to {last['delta']:+.4f} at "
            f"{last['rows']:,} ({'rising at every step' if rising else 'not monotonically'}); ")
    text += (f"the interval excludes zero from {min(sig):,} rows on." if sig else "no point's interval excludes zero.")
    machines = sorted({p.get("machine", "") for p in pts})
    if len(machines) > 1:
        text += (f" The points come from {len(machines)} machines ({', '.join(machines)}; each point's machine and "
                 "date): each ΔAUC is against a scratch baseline trained in the same call, on the same machine.")
    return text


def commit() -> str:
    """The checked-out commit (the code a point ran), or "" outside a git work tree."""
    import subprocess

    try:
        out = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True,
                             text=True, timeout=30, check=False)
    except OSError:
        return ""
    return out.stdout.strip() if out.returncode == 0 else ""


def provenance(previous: dict[str, Any], pt: dict[str, Any]) -> dict[str, Any]:
    """A point from an older results file without its own machine and date takes those of the call
    that wrote the file (points of one file may come from calls on different machines and code)."""
    if "machine" in pt:
        return pt
    return {**pt, "machine": previous.get("machine", {}).get("cpu", ""), "date": previous.get("date", ""),
            "idle": previous.get("idle"), "scratch": previous.get("scratch", {}),
            "precision": previous.get("precision", {})}


def point(cfg_overrides: list[str], size: int, data: Path, work: Path, scratch_dir: Path,
          scratch: dict[str, Any], idle: bool) -> dict[str, Any]:
    """Pretrain on the ``size`` most recent training rows, finetune flip_id on all rows, compare.
    The point records its machine, date, commit and its own scratch baseline (same call, same machine)."""
    pre_cfg, _ = profile_config("quick", [*cfg_overrides, f"pretrain.train_rows={size}"])
    pre_dir = work / f"pretrain-{size}"
    pre = run_pretraining(pre_cfg, data, pre_dir)
    ft_cfg, _ = profile_config("quick", [*cfg_overrides, *FULL_DATA])
    ft_dir = work / f"flip_id-{size}"
    flip_id = run_finetuning(ft_cfg, "flip_id", data, ft_dir, pre_dir)
    delta = paired_deltas({"scratch": scratch_dir, "flip_id": ft_dir})["flip_id-scratch"]
    return {
        "rows": size, "pretrain_rows": pre["rows"], "seeds": delta["seeds"][0],
        "delta": delta["delta"], "ci_low": delta["ci_low"], "ci_high": delta["ci_high"],
        "p_value": delta["p_value"], "se": delta["se"], "per_seed": delta["per_seed"],
        "seed_std": delta["seed_std"], "test_rows": delta["rows"],
        "time": pre["train_seconds"], "samples_per_second": pre["samples_per_second"],
        "pretrain_steps": pre["steps"], "pretrain_loss": pre["loss"], "flip_id": _summary(flip_id),
        "runs": {"pretrain": str(pre_dir), "flip_id": str(ft_dir)},
        "machine": machine()["cpu"], "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "idle": idle,
        "commit": commit(), "precision": precisions(work), "scratch": _summary(scratch),
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--sizes", type=int, nargs="+", default=[2000, 8000, 32000],
                   help="pretraining rows per point (the most recent training rows)")
    p.add_argument("-S", "--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override after params.yaml, for every run (repeatable)")
    p.add_argument("--work", type=Path, default=ROOT / "runs" / NAME, help="work directory (data, runs)")
    p.add_argument("--out", type=Path, default=RESULTS, help="directory of the results JSON and figure")
    p.add_argument("--idle", choices=("yes", "no"), required=True,
                   help="was the machine otherwise idle (recorded: wall times mean little otherwise)")
    args = p.parse_args(argv)
    if any(s <= 0 for s in args.sizes):
        raise SystemExit("--sizes: every size must be a positive number of rows")

    work = args.work.resolve()
    work.mkdir(parents=True, exist_ok=True)
    overrides = [f"plm.cache_dir={work / 'tokens'}", "run.progress=false", *args.overrides]
    cfg, _ = profile_config("quick", overrides)
    data = processed_dataset(cfg, work)

    path = Path(args.out) / f"{NAME}.json"
    previous = json.loads(path.read_text()) if path.exists() else {}
    settings = {"overrides": args.overrides, "seeds": list(cfg.run.seeds)}
    done = ({pt["rows"]: provenance(previous, pt) for pt in previous.get("points", [])}
            if previous.get("settings") == settings else {})

    scratch_cfg, _ = profile_config("quick", [*overrides, *FULL_DATA])
    scratch_dir = work / "full_scratch"
    started = time.time()
    scratch = run_finetuning(scratch_cfg, "scratch", data, scratch_dir, None)
    points = [done[s] for s in sorted(done) if s not in args.sizes]
    result: dict[str, Any] = {}
    for size in sorted(set(args.sizes)):
        points.append(done[size] if size in done else
                      point(overrides, size, data, work, scratch_dir, _summary(scratch), args.idle == "yes"))
        points.sort(key=lambda pt: pt["rows"])
        pt = points[[q["rows"] for q in points].index(size)]
        print(f"pretrain rows {size:>7,}: ΔAUC {pt['delta']:+.4f} [{pt['ci_low']:+.4f}, {pt['ci_high']:+.4f}] "
              f"p {pt['p_value']:.3g}  ({pt['time']:.0f} s at {pt['samples_per_second']:.1f} samples/s)", flush=True)
        result = {
            "idle": args.idle == "yes", "precision": precisions(work), "settings": settings,
            "dataset": cfg.data.dataset, "data": str(data),
            "profile": "quick (params.yaml) + pretrain.train_rows=N; finetuning as the full_flip_id / full_scratch stages",
            "paper_flip_id_delta": PAPER_FLIP_ID_DELTA, "scratch": _summary(scratch),
            "points": points, "seconds_this_call": round(time.time() - started, 1),
            "figure": f"{NAME}.png", "reading": reading(points),
        }
        save(NAME, result, args.out, echo=False)
    from flip.evaluate.figures import pretrain_scaling

    print(pretrain_scaling(points, Path(args.out) / f"{NAME}.png", paper=PAPER_FLIP_ID_DELTA))
    return result


if __name__ == "__main__":
    main()
