"""FLIP on MovieLens-1M: pretrain, then finetune scratch / flip_id / flip_plm / flip, under one profile.

    python benchmarks/flip_ml1m.py                                   # quick profile (params.yaml), 2-core CPU
    python benchmarks/flip_ml1m.py --profile paper --data DIR --plm DIR   # paper profile, one GPU
    torchrun --nproc-per-node 8 benchmarks/flip_ml1m.py --profile paper --data DIR --plm DIR   # 8 GPUs
    benchmarks/gpu_check.sh                                          # the 10-minute GPU check (own docstring)

Prints and writes ``benchmarks/results/flip_ml1m_<profile>.json``: the profile, its overrides and
the resolved configuration; per strategy the valid/test AUC and logloss (test scored once, with the
best-validation weights), α for ``flip``, training throughput, and the paired test-AUC difference
to ``scratch`` (DeLong, ``flip.evaluate.significance.paired_delta``, when that module is present);
for pretraining the losses, samples/s with batch size, sequence length, model, device, FLOPs per
sample and, on a GPU, MFU; plus the command line and the machine.

Profiles: one definition, shared with the pipeline
--------------------------------------------------
The configuration is exactly the pipeline's (``make run PROFILE=<name>``):
``flip.config.load_config("params.yaml", overrides)`` where ``overrides`` are the lines of
``profiles/<name>.txt`` (``#`` comments and blank lines skipped), followed by this script's own
``-S key=value`` (repeatable, same spelling as ``flip <stage> -S`` and ``dvc exp run -S``), then
``--plm`` (= ``-S plm.name=...``), ``--seed``, ``--device``, ``--threads``. There are no settings
in this file.

``quick`` (default; ``params.yaml`` alone, whose comments say what each value is)
    What ``make run`` runs on a 2-core CPU: all-MiniLM-L6-v2 (``minilm-l6``, offline) at max_length
    64, pretraining and every strategy on the same most recent ``finetune.train_rows`` training rows,
    scored on the same ``finetune.eval_rows`` evenly spaced validation and test rows (equal data),
    learning rates selected on validation (``finetune.lr_grid``), several seeds (``run.seeds``).
    (This script's former ``cpu`` profile, with settings of its own, is gone: use ``quick``, with
    ``-S`` overrides where needed.)
``paper`` (``profiles/paper.txt``; for a GPU)
    TinyBERT-4L-312D, max_length 100, 30 pretraining epochs over the whole training split at global
    batch 1024 and lr 5e-5, finetuning on all rows at batch 256 (language-model strategies: 10
    epochs), validation early stopping, α from 0. TinyBERT needs the network (or ``--plm DIR``).

Data. ``--data DIR``: an already processed dataset (``flip preprocess`` output: Parquet +
``meta.json``); otherwise ``data.processed_dir/<dataset>`` when it exists (the pipeline's own
output), else the MovieLens-1M copy in ``FLIP_DATA_MIRROR`` or ``../shared/data`` (layout
``ml-1m/ratings.dat``...) is preprocessed into the work directory (that step needs DuckDB; with
``--data`` or an existing processed directory only torch + transformers + pyarrow (+ numpy, PyYAML,
tqdm, safetensors) are needed, so a profile runs on a bare GPU machine; without scikit-learn the
metrics use the numpy fallback of ``flip.metrics``). A machine without internet needs a
local directory for the language model (``--plm DIR``).

The GPU check (``benchmarks/gpu_check.sh``, ``benchmarks/gpu_check.py``) uses these functions with
the paper profile, all-MiniLM-L6-v2 in fp16 from a self-contained bundle (TinyBERT is not available
offline) and a pretraining schedule sized from the throughput it measures, so that it fits in 10
minutes on one H100/H200; it writes ``benchmarks/results/gpu_check.json`` with the estimated time of
the full 30-epoch schedule.

MFU (GPU): model FLOPs per pretraining sample from ``flip.align.FlipPretrainModel.flops_per_sample``
(3 x forward; forward = a·(2·P_plm·T + 4·n_layers·T²·d) + b·2·P_id + MLM head on masked tokens +
MTM + ICL, T = real tokens per sample, P = non-embedding parameters, a/b = PLM / ID passes),
times samples/s, over the GPU's dense bf16 peak (``--peak-tflops`` overrides the table).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

PARAMS = ROOT / "params.yaml"
PROFILES_DIR = ROOT / "profiles"
STRATEGIES = ("scratch", "flip_id", "flip_plm", "flip")
BASELINE = "scratch"
# paired test-AUC comparisons beyond "each against scratch": (a, b) -> a minus b
COMPARISONS = (("flip", "flip_id"), ("flip", "flip_plm"))

# dense bf16 peak TFLOPS by device-name fragment (first match wins)
PEAK_BF16_TFLOPS = [("H200", 989.4), ("H100 PCIe", 756.0), ("H100", 989.4), ("A100", 312.0), ("L40S", 362.1),
                    ("A10G", 70.0), ("A10", 125.0), ("L4", 121.0), ("V100", 125.0), ("4090", 165.2)]


# -------------------------------------------------------------------------------------- profiles
def profile_names() -> list[str]:
    """``quick`` (params.yaml alone) and every ``profiles/<name>.txt``."""
    return ["quick", *sorted(p.stem for p in PROFILES_DIR.glob("*.txt") if p.stem != "quick")]


def profile_overrides(name: str) -> list[str]:
    """The ``-S`` overrides of profile ``name``: the lines of ``profiles/<name>.txt`` (comments and
    blank lines skipped); ``quick`` has none (it is ``params.yaml``)."""
    if name == "quick":
        return []
    path = PROFILES_DIR / f"{name}.txt"
    if not path.exists():
        raise SystemExit(f"no profile {name!r}: {path} does not exist (profiles: {', '.join(profile_names())})")
    lines = [line.strip() for line in path.read_text(encoding="utf-8").splitlines()]
    return [line for line in lines if line and not line.startswith("#")]


def profile_config(name: str, extra: list[str] | None = None, params: Path = PARAMS) -> tuple[Any, list[str]]:
    """``load_config(params, profile overrides + extra)`` and the list of overrides applied."""
    from flip.config import load_config

    overrides = profile_overrides(name) + list(extra or [])
    return load_config(params, overrides), overrides


# ------------------------------------------------------------------------------------------ data
def mirror_dir() -> Path:
    return Path(os.environ.get("FLIP_DATA_MIRROR") or ROOT.parent / "shared" / "data")


def processed_dataset(cfg: Any, work: Path) -> Path:
    """The processed dataset of ``cfg.data.dataset``: the pipeline's ``data.processed_dir/<dataset>``
    when it exists, else ``flip preprocess`` of the MovieLens-1M copy into ``work/processed``."""
    own = cfg.data.processed_path
    own = own if own.is_absolute() else ROOT / own
    if (own / "meta.json").exists():
        return own
    if cfg.data.dataset != "movielens-1m":
        raise SystemExit(f"no processed {cfg.data.dataset} at {own}: run `flip preprocess` or pass --data DIR")
    out = work / "processed" / "movielens-1m"
    if (out / "meta.json").exists():
        return out
    raw = mirror_dir() / "ml-1m"
    if not (raw / "ratings.dat").exists():
        raise SystemExit(f"no MovieLens-1M copy at {raw}: set FLIP_DATA_MIRROR or pass --data DIR")
    from flip.data.preprocess import preprocess  # DuckDB: only when the data is not given processed

    preprocess(cfg, raw, out, progress=False)
    return out


# ------------------------------------------------------------------------------------------ runs
def device_info() -> dict[str, Any]:
    import torch

    info: dict[str, Any] = {"torch": torch.__version__, "threads": torch.get_num_threads()}
    try:
        import transformers

        info["transformers"] = transformers.__version__
    except ImportError:  # pragma: no cover - the core needs it
        pass
    if torch.cuda.is_available():
        info.update(device="cuda", gpu=torch.cuda.get_device_name(0), gpus=torch.cuda.device_count(),
                    bf16=torch.cuda.is_bf16_supported(), cuda=torch.version.cuda)
    else:
        info.update(device="cpu")
    return info


def peak_tflops(gpu: str | None, override: float | None) -> float | None:
    if override:
        return override
    for fragment, peak in PEAK_BF16_TFLOPS:
        if gpu and fragment in gpu:
            return peak
    return None


def first_step_loss(out: Path) -> dict[str, Any] | None:
    from flip.runs import RunDir

    steps = RunDir(out).log("step")
    return {k: steps[0].get(k) for k in ("loss", "mlm", "mtm", "icl")} if steps else None


def run_pretraining(cfg: Any, data: Path, out: Path, peak: float | None = None) -> dict[str, Any]:
    """``flip.train.pretrain.pretrain`` and its summary (losses, throughput, FLOPs, MFU when ``peak``).
    Under torchrun the other ranks return ``{}``."""
    from flip.train.pretrain import pretrain

    t0 = time.time()
    pre = pretrain(cfg, data, out)
    seconds = time.time() - t0
    if int(os.environ.get("RANK", "0") or 0) > 0:
        return {}
    summary = {
        "plm": cfg.plm.name, "max_length": cfg.plm.max_length, "mean_tokens": pre["mean_tokens"],
        "batch_size": pre["batch_size"], "world_size": pre["world_size"], "steps": pre["steps"],
        "epochs": pre.get("epochs"), "rows": pre["rows"], "samples": pre["samples"],
        "precision": pre["precision"], "device": pre["device"],
        "samples_per_second": pre["samples_per_second"], "seconds": round(seconds, 1),
        "train_seconds": pre.get("seconds"),
        "loss": {k: pre[k] for k in ("loss", "mlm", "mtm", "icl")},
        "first_step_loss": first_step_loss(out),
        "accuracy": pre["accuracy"], "params": pre["params"], "plm_params": pre["plm_params"],
        "flops_per_sample": pre["flops_per_sample"], "achieved_tflops": pre["achieved_tflops"],
        "settings": cfg.to_dict()["pretrain"],
    }
    if peak:
        summary["peak_bf16_tflops"] = peak
        summary["mfu"] = pre["achieved_tflops"] / peak / max(1, pre["world_size"])
    return summary


def run_finetuning(cfg: Any, strategy: str, data: Path, out: Path, pretrained: Path | None) -> dict[str, Any]:
    """``flip.train.finetune.finetune`` of ``strategy`` and its summary row."""
    import dataclasses

    from flip.train.finetune import finetune

    cfg = dataclasses.replace(cfg, finetune=dataclasses.replace(cfg.finetune, strategy=strategy))
    t0 = time.time()
    metrics = finetune(cfg, data, out, pretrained=pretrained)
    row = {
        "strategy": strategy,
        "valid_auc": metrics["valid"]["auc"], "valid_logloss": metrics["valid"]["logloss"],
        "test_auc": metrics["test"]["auc"], "test_logloss": metrics["test"]["logloss"],
        "epochs": metrics["train"]["epochs"], "best_epoch": metrics["train"]["best_epoch"],
        "steps": metrics["train"].get("steps"),
        "train_samples_per_second": metrics["train"]["samples_per_second"],
        "seconds": round(time.time() - t0, 1), "params": metrics.get("params"),
    }
    for key in ("alpha", "seeds", "std"):
        if key in metrics:
            row[key] = metrics[key]
    from flip.runs import RunDir

    selection = RunDir(out).selection()
    if selection is not None:
        row["selection"] = selection
    print(f"{strategy:>12}: valid AUC {row['valid_auc']:.4f}  test AUC {row['test_auc']:.4f}  "
          f"logloss {row['test_logloss']:.4f}" + (f"  alpha {row['alpha']:.3f}" if "alpha" in row else ""), flush=True)
    return row


def test_predictions(run_dir: Path) -> dict[str, tuple[Any, Any, Any]]:
    """seed -> (row, label, prob) of a finetuning run's test predictions (each finished seed)."""
    from flip.runs import RunDir

    out = {}
    for name, seed in RunDir(run_dir).seeds().items():
        if seed.has_predictions("test"):
            t = seed.prediction_arrays("test")
            out[name.removeprefix("seed-")] = (t["row"], t["label"], t["prob"])
    return out


def paired_deltas(runs: dict[str, Path]) -> dict[str, Any]:
    """Paired test-AUC differences (DeLong, mean over seeds) on the test rows every run scored:
    each strategy minus ``scratch``, and ``flip`` minus ``flip_id`` / ``flip_plm``. Empty when
    ``flip.evaluate.significance`` is absent."""
    try:
        from flip.evaluate.significance import paired_delta
    except ImportError:
        return {}
    import numpy as np

    preds = {name: test_predictions(d) for name, d in runs.items()}
    preds = {k: v for k, v in preds.items() if v}
    if len(preds) < 2:
        return {}
    common = None
    for per in preds.values():
        for row, _, _ in per.values():
            common = set(row.tolist()) if common is None else common & set(row.tolist())
    keep = np.array(sorted(common or ()), dtype=np.int64)
    if keep.size == 0:
        return {}
    aligned, y = {}, None
    for name, per in preds.items():
        aligned[name] = {}
        for seed, (row, label, prob) in per.items():
            order = np.argsort(row)
            pos = order[np.searchsorted(row, keep, sorter=order)]
            aligned[name][seed] = prob[pos].astype(np.float64)
            y = label[pos].astype(np.float64) if y is None else y
    pairs = [(a, BASELINE) for a in aligned if a != BASELINE] + list(COMPARISONS)
    result = {}
    for a, b in pairs:
        if a in aligned and b in aligned:
            try:
                result[f"{a}-{b}"] = paired_delta(y, aligned[a], aligned[b])
            except ValueError as exc:  # one class only (a tiny dry run)
                result[f"{a}-{b}"] = {"error": str(exc)}
    return result


# ------------------------------------------------------------------------------------------ main
def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--profile", choices=profile_names(), default="quick",
                        help="quick = params.yaml; NAME = params.yaml + profiles/NAME.txt (as make run PROFILE=NAME)")
    parser.add_argument("-S", "--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override after the profile, e.g. -S pretrain.max_steps=100 (repeatable)")
    parser.add_argument("--params", type=Path, default=PARAMS, help="params file (default: the repository's)")
    parser.add_argument("--data", type=Path, help="processed dataset directory (default: data.processed_dir, else "
                                                  "preprocess the MovieLens-1M copy)")
    parser.add_argument("--plm", help="language model: HF id, local directory or minilm-l6 (= -S plm.name=...)")
    parser.add_argument("--work", type=Path, help="work directory (default runs/flip_ml1m_<profile>)")
    parser.add_argument("--device", help="= -S run.device=...")
    parser.add_argument("--threads", type=int, help="= -S run.threads=...")
    parser.add_argument("--seed", type=int, help="= -S run.seeds=[SEED]")
    parser.add_argument("--strategies", nargs="+", default=list(STRATEGIES), help="finetuning strategies to run")
    parser.add_argument("--with-plm-scratch", action="store_true", help="also finetune the unaligned PLM")
    parser.add_argument("--peak-tflops", type=float, help="accelerator peak (dense bf16) for MFU")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    parser.add_argument("--results", type=Path, help="directory of the results JSON (default benchmarks/results)")
    args = parser.parse_args(argv)

    if args.quiet:
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")  # read when transformers is imported (later)
    name = args.profile
    work = (args.work or ROOT / "runs" / f"flip_ml1m_{name}").resolve()
    work.mkdir(parents=True, exist_ok=True)
    # the token cache of this work directory first, so that -S plm.cache_dir=... can still move it
    extra = [f"plm.cache_dir={work / 'tokens'}", *args.overrides]
    if args.plm:
        extra.append(f"plm.name={args.plm}")
    if args.device:
        extra.append(f"run.device={args.device}")
    if args.threads is not None:
        extra.append(f"run.threads={args.threads}")
    if args.seed is not None:
        extra.append(f"run.seeds=[{args.seed}]")
    if args.quiet:
        extra.append("run.progress=false")
    cfg, overrides = profile_config(name, extra, args.params)
    started = time.time()
    rank = int(os.environ.get("RANK", "0") or 0)

    t0 = time.time()
    data = args.data.resolve() if args.data is not None else processed_dataset(cfg, work)
    data_seconds = time.time() - t0

    info = device_info()
    peak = peak_tflops(info.get("gpu"), args.peak_tflops)
    pre_dir = work / "pretrain"
    pretraining = run_pretraining(cfg, data, pre_dir, peak)
    if rank > 0:  # torchrun: the other ranks only help with pretraining
        return {}

    strategies = list(dict.fromkeys(args.strategies + (["plm_scratch"] if args.with_plm_scratch else [])))
    results: dict[str, Any] = {}
    runs: dict[str, Path] = {}
    for strategy in strategies:
        runs[strategy] = work / "finetune" / strategy
        results[strategy] = run_finetuning(cfg, strategy, data, runs[strategy], pre_dir)

    result = {
        "profile": name, "overrides": overrides, "data": str(data), "work": str(work), "device": info,
        "config": {k: v for k, v in cfg.to_dict().items() if k in ("id_model", "plm", "pretrain", "finetune", "run")},
        "seconds": {"data": round(data_seconds, 1), "pretrain": pretraining.get("seconds"),
                    "total": round(time.time() - started, 1)},
        "pretraining": pretraining, "finetuning": results, "paired_test_auc": paired_deltas(runs),
    }
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from common import save

    partial = set(strategies) != set(STRATEGIES)
    save(f"flip_ml1m_{name}" + ("_partial" if partial else ""), result, args.results)
    return result


if __name__ == "__main__":
    main()
