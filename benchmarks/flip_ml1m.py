"""FLIP on MovieLens-1M: preprocess -> pretrain -> finetune scratch / flip_id / flip_plm / flip.

    python benchmarks/flip_ml1m.py --profile cpu                       # reduced, < 30 min on 2 CPU cores
    python benchmarks/flip_ml1m.py --profile paper --data DIR --plm DIR  # paper settings, one GPU
    torchrun --nproc-per-node 8 benchmarks/flip_ml1m.py --profile paper --data DIR --plm DIR   # 8 GPUs

Prints and writes ``benchmarks/results/flip_ml1m_<profile>.json``: per run the valid/test AUC and
logloss (test scored once, with the best-validation weights), α for ``flip``, training throughput;
for pretraining the losses, samples/s with batch size, sequence length, model, device and, on a
GPU, MFU; plus the command line and the machine.

Data. ``--data DIR``: an already processed dataset (``flip preprocess`` output: Parquet +
meta.json); otherwise the MovieLens-1M copy in ``FLIP_DATA_MIRROR`` or ``../shared/data`` (layout
``ml-1m/ratings.dat``...) is preprocessed into the work directory (this step needs DuckDB; with
``--data`` only torch + transformers + pyarrow (+ numpy, PyYAML, tqdm, safetensors) are needed, so
the paper profile runs on a bare GPU machine; without scikit-learn the metrics use the numpy
fallback of ``flip.evaluate.metrics``). ``--plm`` names the language model (HF id, local directory
or ``minilm-l6``); a machine without internet needs a local directory.

Profiles
--------
``paper`` (paper §4.1.4 and the authors' code; for a GPU)
    PLM ``--plm`` (default ``tinybert`` = huawei-noah/TinyBERT_General_4L_312D), max_length 100,
    DCNv2 (DCN-Mix, emb 32, DNN 300-300-128). Pretraining on the whole training split: 30 epochs,
    global batch 1024, AdamW lr 5e-5, weight decay 1e-3, cosine decay, bf16 autocast (the authors
    ran TinyBERT in fp32). Finetuning (batch 256 as the paper for ML-1M, validation early
    stopping, patience 2): scratch / flip_id Adam lr 1e-3 (20 epochs); flip_plm AdamW 5e-5; flip
    AdamW with PLM at 5e-5 and the rest at 1e-3 (10 epochs), weight decay 1e-3 for the PLM runs.
``cpu`` (reduced, documented; ~25 min on this 2-core machine)
    all-MiniLM-L6 (``minilm-l6``, offline), max_length 64 (ML-1M texts are ~52 tokens), bf16
    autocast (2.3x faster than fp32 on AVX512-BF16 CPUs). Validation and test are each a fixed
    random sample of ``--eval-rows`` (4000) rows (the same rows for every run). Pretraining: the most
    recent ``--recent-rows`` (8000) training rows (closest in time to validation/test), batch 32,
    ``--pretrain-steps`` (250) steps, AdamW lr 1e-4 with 20 warm-up steps, cosine decay. Finetuning:
    ``scratch`` and ``flip_id`` on the FULL training split (batch 1024, up to 6 epochs, patience 1);
    then ``scratch``, ``flip_id``, ``flip_plm``, ``flip`` on the same ``--recent-rows`` rows
    (``*@recent``; PLM runs: 1 epoch, batch 32, PLM lr 5e-5, the rest 1e-3), so that FLIP's
    effect is visible at equal data. ``flip@recent`` starts α at 0.5 instead of the authors' 0:
    Adam moves the scalar α by about lr = 1e-3 per step, so in 250 steps from 0 it could not get
    past ~0.25 (the authors train ~10^5 steps). ``--with-plm-scratch`` adds the unaligned-PLM
    baseline (+~5 min).

MFU (GPU): model FLOPs per pretraining sample from ``flip.train.pretrain.flops_per_sample``
(3 x forward; forward = a·(2·P_plm·T + 4·n_layers·T²·d) + b·2·P_id + MLM head on masked tokens +
MTM + ICL, T = real tokens per sample, P = non-embedding parameters, a/b = PLM / ID passes),
times samples/s, over the GPU's dense bf16 peak (``--peak-tflops`` overrides the table).
"""

from __future__ import annotations

import argparse
import json
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

# dense bf16 peak TFLOPS by device-name fragment (first match wins)
PEAK_BF16_TFLOPS = [("H200", 989.4), ("H100 PCIe", 756.0), ("H100", 989.4), ("A100", 312.0), ("L40S", 362.1),
                    ("A10G", 70.0), ("A10", 125.0), ("L4", 121.0), ("V100", 125.0), ("4090", 165.2)]

ID_MODEL = {"name": "dcnv2", "embedding_dim": 32, "dnn_hidden_units": [300, 300, 128], "dropout": 0.1,
            "cross_layers": 2, "low_rank_mixture": True, "low_rank": 32, "num_experts": 4}

PROFILES: dict[str, dict[str, Any]] = {
    "paper": {
        "plm": "tinybert", "max_length": 100,
        "pretrain": {"epochs": 30, "batch_size": 1024, "lr": 5e-5, "weight_decay": 1e-3, "warmup_steps": 0,
                     "precision": "auto"},
        "runs": [  # name, strategy, dataset ("full" | "recent"), finetune overrides
            ("scratch", "scratch", "full", {"epochs": 20, "batch_size": 256, "lr": 1e-3}),
            ("flip_id", "flip_id", "full", {"epochs": 20, "batch_size": 256, "lr": 1e-3}),
            ("flip_plm", "flip_plm", "full", {"epochs": 10, "batch_size": 256, "plm_lr": 5e-5, "weight_decay": 1e-3,
                                              "eval_batch_size": 4096}),
            ("flip", "flip", "full", {"epochs": 10, "batch_size": 256, "lr": 1e-3, "plm_lr": 5e-5,
                                      "optimizer": "adamw", "weight_decay": 1e-3, "eval_batch_size": 4096}),
        ],
        "plm_scratch": ("plm_scratch", "plm_scratch", "full", {"epochs": 10, "batch_size": 256, "plm_lr": 5e-5,
                                                               "weight_decay": 1e-3, "eval_batch_size": 4096}),
    },
    "cpu": {
        "plm": "minilm-l6", "max_length": 64, "eval_rows": 4000, "recent_rows": 8000, "pretrain_steps": 250,
        "pretrain": {"epochs": 1, "batch_size": 32, "lr": 1e-4, "weight_decay": 1e-3, "warmup_steps": 20,
                     "precision": "bf16"},
        "runs": [
            ("scratch", "scratch", "full", {"epochs": 6, "batch_size": 1024, "lr": 1e-3, "patience": 1}),
            ("flip_id", "flip_id", "full", {"epochs": 6, "batch_size": 1024, "lr": 1e-3, "patience": 1}),
            ("scratch@recent", "scratch", "recent", {"epochs": 6, "batch_size": 256, "lr": 1e-3, "patience": 1}),
            ("flip_id@recent", "flip_id", "recent", {"epochs": 6, "batch_size": 256, "lr": 1e-3, "patience": 1}),
            ("flip_plm@recent", "flip_plm", "recent", {"epochs": 1, "batch_size": 32, "plm_lr": 5e-5}),
            ("flip@recent", "flip", "recent", {"epochs": 1, "batch_size": 32, "lr": 1e-3, "plm_lr": 5e-5,
                                               "alpha_init": 0.5}),
        ],
        "plm_scratch": ("plm_scratch@recent", "plm_scratch", "recent", {"epochs": 1, "batch_size": 32,
                                                                         "plm_lr": 5e-5}),
    },
}


# ------------------------------------------------------------------------------------------ data
def mirror_dir() -> Path:
    return Path(os.environ.get("FLIP_DATA_MIRROR") or ROOT.parent / "shared" / "data")


def preprocess_ml1m(work: Path) -> Path:
    """``flip preprocess`` of the MovieLens-1M copy into ``work/processed/movielens-1m`` (once)."""
    out = work / "processed" / "movielens-1m"
    if (out / "meta.json").exists():
        return out
    raw = mirror_dir() / "ml-1m"
    if not (raw / "ratings.dat").exists():
        raise SystemExit(f"no MovieLens-1M copy at {raw}: set FLIP_DATA_MIRROR or pass --data DIR")
    from flip.config import config_from_dict
    from flip.data.preprocess import preprocess  # DuckDB: only when the data is not given processed

    preprocess(config_from_dict({"data": {"dataset": "movielens-1m"}}), raw, out, progress=False)
    return out


def derive_datasets(src: Path, work: Path, eval_rows: int, recent_rows: int, seed: int = 0) -> tuple[Path, Path]:
    """Two processed datasets sharing ``meta.json``, ``feature_counts.parquet`` and validation/test
    samples of ``eval_rows`` rows (fixed random rows, time order kept): ``full`` with the whole
    training split, ``recent`` with its last ``recent_rows`` rows."""
    import numpy as np
    import pyarrow.parquet as pq

    full, recent = work / "data" / "ml1m-full", work / "data" / "ml1m-recent"
    marker = {"src": str(src.resolve()), "eval_rows": eval_rows, "recent_rows": recent_rows, "seed": seed,
              "meta": (src / "meta.json").read_text()}
    done = work / "data" / "derived.json"
    if done.exists() and json.loads(done.read_text()) == marker:
        return full, recent
    rng = np.random.default_rng(seed)
    for d in (full, recent):
        d.mkdir(parents=True, exist_ok=True)
        for name in ("meta.json", "feature_counts.parquet"):
            (d / name).write_bytes((src / name).read_bytes())
    for split in ("valid", "test"):
        table = pq.read_table(src / f"{split}.parquet")
        keep = np.sort(rng.choice(table.num_rows, size=min(eval_rows, table.num_rows), replace=False))
        sample = table.take(keep)
        for d in (full, recent):
            pq.write_table(sample, d / f"{split}.parquet")
    train = pq.read_table(src / "train.parquet")
    pq.write_table(train, full / "train.parquet")
    pq.write_table(train.slice(max(0, train.num_rows - recent_rows)), recent / "train.parquet")
    done.write_text(json.dumps(marker))
    return full, recent


# ------------------------------------------------------------------------------------------ runs
def device_info() -> dict[str, Any]:
    import torch

    info: dict[str, Any] = {"torch": torch.__version__, "threads": torch.get_num_threads()}
    if torch.cuda.is_available():
        info.update(device="cuda", gpu=torch.cuda.get_device_name(0), gpus=torch.cuda.device_count(),
                    bf16=torch.cuda.is_bf16_supported())
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


def base_tree(args: argparse.Namespace, profile: dict[str, Any], work: Path) -> dict[str, Any]:
    return {
        "id_model": dict(ID_MODEL),
        "plm": {"name": args.plm or profile["plm"], "max_length": profile["max_length"],
                "cache_dir": str(work / "tokens")},
        "pretrain": dict(profile["pretrain"]),
        "finetune": {"l2_embedding": 1e-4, "patience": 2, "eval_batch_size": 8192, "alpha_init": 0.0},
        "run": {"seeds": [args.seed], "device": args.device, "threads": args.threads, "progress": not args.quiet},
    }


def summarise_finetune(name: str, strategy: str, metrics: dict[str, Any], out: Path, seconds: float) -> dict[str, Any]:
    row = {
        "strategy": strategy,
        "valid_auc": metrics["valid"]["auc"], "valid_logloss": metrics["valid"]["logloss"],
        "test_auc": metrics["test"]["auc"], "test_logloss": metrics["test"]["logloss"],
        "epochs": metrics["train"]["epochs"], "best_epoch": metrics["train"]["best_epoch"],
        "train_samples_per_second": metrics["train"]["samples_per_second"],
        "seconds": round(seconds, 1), "params": metrics.get("params"),
    }
    if strategy == "flip":
        from safetensors.torch import load_file

        row["alpha"] = metrics.get("alpha", float(load_file(str(out / "model.safetensors"))["alpha"].item()))
    return row


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--profile", choices=sorted(PROFILES), default="cpu")
    parser.add_argument("--data", type=Path, help="processed MovieLens-1M directory (else preprocess the copy)")
    parser.add_argument("--plm", help="language model: HF id, local directory or minilm-l6")
    parser.add_argument("--work", type=Path, help="work directory (default runs/flip_ml1m_<profile>)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--threads", type=int, default=0)
    parser.add_argument("--seed", type=int, default=2012)
    parser.add_argument("--pretrain-steps", type=int, help="cpu: pretraining steps")
    parser.add_argument("--recent-rows", type=int, help="cpu: training rows of the *@recent runs and pretraining")
    parser.add_argument("--eval-rows", type=int, help="cpu: rows sampled from validation and from test")
    parser.add_argument("--with-plm-scratch", action="store_true", help="also finetune the unaligned PLM")
    parser.add_argument("--only", nargs="*", help="run only these finetuning runs (by name)")
    parser.add_argument("--peak-tflops", type=float, help="accelerator peak (dense bf16) for MFU")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    args = parser.parse_args(argv)

    from flip.config import config_from_dict
    from flip.train.finetune import finetune
    from flip.train.pretrain import pretrain

    name = args.profile
    profile = PROFILES[name]
    work = args.work or ROOT / "runs" / f"flip_ml1m_{name}"
    work.mkdir(parents=True, exist_ok=True)
    started = time.time()
    rank = int(os.environ.get("RANK", "0") or 0)

    t0 = time.time()
    source = args.data if args.data is not None else preprocess_ml1m(work)
    settings: dict[str, Any] = {}
    if name == "cpu":
        eval_rows = args.eval_rows or profile["eval_rows"]
        recent_rows = args.recent_rows or profile["recent_rows"]
        steps = args.pretrain_steps or profile["pretrain_steps"]
        datasets = dict(zip(("full", "recent"), derive_datasets(Path(source), work, eval_rows, recent_rows)))
        pretrain_data = datasets["recent"]
        settings = {"eval_rows": eval_rows, "recent_rows": recent_rows, "pretrain_steps": steps}
    else:
        datasets = {"full": Path(source), "recent": Path(source)}
        pretrain_data = Path(source)
        steps = 0
    data_seconds = time.time() - t0

    tree = base_tree(args, profile, work)
    tree["pretrain"]["max_steps"] = steps
    pre_dir = work / "pretrain"
    t0 = time.time()
    pre = pretrain(config_from_dict(tree), pretrain_data, pre_dir)
    pre_seconds = time.time() - t0
    if rank > 0:  # torchrun: the other ranks only help with pretraining
        return {}

    info = device_info()
    peak = peak_tflops(info.get("gpu"), args.peak_tflops)
    pretraining = {
        "plm": tree["plm"]["name"], "max_length": tree["plm"]["max_length"], "mean_tokens": pre["mean_tokens"],
        "batch_size": pre["batch_size"], "world_size": pre["world_size"], "steps": pre["steps"],
        "rows": pre["rows"], "samples": pre["samples"], "precision": pre["precision"], "device": pre["device"],
        "samples_per_second": pre["samples_per_second"], "seconds": round(pre_seconds, 1),
        "loss": {k: pre[k] for k in ("loss", "mlm", "mtm", "icl")},
        "first_step_loss": _first_step(pre_dir),
        "accuracy": pre["accuracy"], "params": pre["params"], "plm_params": pre["plm_params"],
        "flops_per_sample": pre["flops_per_sample"], "achieved_tflops": pre["achieved_tflops"],
        "settings": tree["pretrain"],
    }
    if peak:
        pretraining["peak_bf16_tflops"] = peak
        pretraining["mfu"] = pre["achieved_tflops"] / peak / max(1, pre["world_size"])

    runs = list(profile["runs"]) + ([profile["plm_scratch"]] if args.with_plm_scratch else [])
    results: dict[str, Any] = {}
    for run_name, strategy, dataset, overrides in runs:
        if args.only and run_name not in args.only:
            continue
        cfg_tree = json.loads(json.dumps(tree))
        cfg_tree["finetune"].update(overrides, strategy=strategy)
        out = work / "finetune" / run_name.replace("@", "-")
        t0 = time.time()
        metrics = finetune(config_from_dict(cfg_tree), datasets[dataset], out, pretrained=pre_dir)
        results[run_name] = {**summarise_finetune(run_name, strategy, metrics, out, time.time() - t0),
                             "data": dataset, "settings": cfg_tree["finetune"]}
        print(f"{run_name:>18}: valid AUC {metrics['valid']['auc']:.4f}  test AUC {metrics['test']['auc']:.4f}  "
              f"logloss {metrics['test']['logloss']:.4f}"
              + (f"  alpha {results[run_name]['alpha']:.3f}" if "alpha" in results[run_name] else ""), flush=True)

    result = {
        "profile": name, "profile_settings": settings, "data": str(source), "work": str(work),
        "device": info, "seconds": {"data": round(data_seconds, 1), "pretrain": round(pre_seconds, 1),
                                    "total": round(time.time() - started, 1)},
        "pretraining": pretraining, "finetuning": results,
    }
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from common import save

    suffix = "" if not args.only else "_partial"
    save(f"flip_ml1m_{name}{suffix}", result)
    return result


def _first_step(out: Path) -> dict[str, Any] | None:
    log = out / "log.jsonl"
    if not log.exists():
        return None
    for line in log.read_text().splitlines():
        rec = json.loads(line)
        if rec.get("event") == "step":
            return {k: rec.get(k) for k in ("loss", "mlm", "mtm", "icl")}
    return None


if __name__ == "__main__":
    main()
