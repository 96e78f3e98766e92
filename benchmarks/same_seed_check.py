"""Same seed, same numbers: the training code of two commits gives bit-identical runs.

    python benchmarks/same_seed_check.py                       # base ab97bb7 vs this checkout
    python benchmarks/same_seed_check.py --base main~3 --work /tmp/ssc
    python benchmarks/same_seed_check.py --only base           # run one side now, compare later

A restructuring of the training code (issue 20: RunDir, the loop's callbacks) must change no result.
This script runs the same small but real commands with the code of ``--base`` (a temporary ``git
worktree``, removed at the end) and with this checkout, on the same inputs built once (a synthetic
dataset of 3,000 rows from ``flip preprocess``, a tiny BERT from ``tests/helpers.py``):

* ``scratch``            DCNv2 from scratch, 2 epochs (``flip finetune -S finetune.strategy=scratch``)
* ``scratch_selection``  the same with learning-rate selection over two rates and two seeds (candidates,
                         the adopted winner, the seed aggregate)
* ``pretrain``           a quick FLIP pretraining (MLM + MTM + ICL, 6 optimizer steps, a checkpoint every
                         3 batches)
* ``flip_id``            ``finetune.strategy=flip_id`` from that pretraining

and compares, run by run: every tensor of every ``*.safetensors`` file (``torch.equal``, same keys,
dtypes and shapes), every ``predictions/*.parquet`` (row, label, prob exactly), every ``metrics.json``
exactly, timings excepted (``seconds``, ``samples_per_second``, ``achieved_tflops``), and every record of
``log.jsonl`` / ``losses.json`` (less ``time`` and ``samples_per_second``). It reads the files directly,
not through ``flip.runs``, since the base may predate that module.
The learning-rate selection record is compared wherever each side keeps it (``metrics.json`` ->
``selection`` before issue 20, ``selection.json`` after). Prints and saves
``benchmarks/results/same_seed_check.json`` (command, machine, per-run figures); exits 1 on a
difference. Each side's outputs stay under ``--work`` (a side already there is reused unless ``--fresh``).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import save  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
TIMINGS = {"seconds", "samples_per_second", "achieved_tflops"}
LOG_TIMINGS = {"time", "samples_per_second"}

COMMON = [
    "data.dataset=synthetic", "data.synthetic.rows=3000", "data.synthetic.fields=6",
    "id_model.name=dcnv2", "id_model.embedding_dim=8", "id_model.dnn_hidden_units=[32,16]",
    "id_model.low_rank=4", "id_model.num_experts=2",
    "plm.max_length=48",
    "pretrain.batch_size=64", "pretrain.max_steps=6", "pretrain.warmup_steps=2", "pretrain.lr=0.001",
    "pretrain.train_rows=400", "pretrain.precision=fp32",
    "finetune.epochs=2", "finetune.batch_size=64", "finetune.train_rows=400", "finetune.eval_rows=150",
    "finetune.eval_batch_size=512", "finetune.lr_grid=[]", "finetune.precision=fp32", "finetune.patience=2",
    "run.seeds=[2012]", "run.progress=false", "run.threads=1", "run.device=cpu",
]


def runs(side: Path, data: Path) -> dict[str, list[str]]:
    """The commands of one side: name -> ``flip`` arguments (after the common overrides)."""
    finetune = ["finetune", "--data", str(data)]
    return {
        "scratch": [*finetune, "-S", "finetune.strategy=scratch", "--out", str(side / "scratch")],
        "scratch_selection": [*finetune, "-S", "finetune.strategy=scratch", "-S", "finetune.lr_grid=[0.0003,0.003]",
                              "-S", "run.seeds=[2012,2013]", "--out", str(side / "scratch_selection")],
        "pretrain": ["pretrain", "--data", str(data), "-S", "run.checkpoint_every=3", "--out", str(side / "pretrain")],
        "flip_id": [*finetune, "-S", "finetune.strategy=flip_id", "--pretrained", str(side / "pretrain"),
                    "--out", str(side / "flip_id")],
    }


def flip(code: Path, args: list[str], overrides: list[str]) -> float:
    """Run ``python -m flip.cli ARGS -S ...`` with the package of ``code``; returns the seconds."""
    env = {**os.environ, "PYTHONPATH": str(code), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
           "TOKENIZERS_PARALLELISM": "false"}
    sets = [x for o in overrides for x in ("-S", o)]
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-m", "flip.cli", args[0], *sets, *args[1:]], cwd=code, env=env, check=True)
    return time.perf_counter() - t0


def inputs(work: Path) -> tuple[Path, Path]:
    """The dataset and the tiny BERT both sides use (built once, with this checkout's code)."""
    data, bert = work / "data", work / "bert"
    if not (data / "meta.json").exists():
        flip(ROOT, ["preprocess", "--out", str(data)], COMMON)
    if not (bert / "config.json").exists():
        sys.path.insert(0, str(ROOT / "tests"))
        from helpers import write_tiny_bert_for

        write_tiny_bert_for(bert, data, texts=400)
    return data, bert


def run_side(name: str, code: Path, work: Path, data: Path, bert: Path, fresh: bool) -> dict[str, float]:
    side = work / name
    done = side / "done.json"
    if done.exists() and not fresh:
        return json.loads(done.read_text())
    shutil.rmtree(side, ignore_errors=True)
    side.mkdir(parents=True)
    overrides = [*COMMON, f"plm.name={bert}", f"plm.cache_dir={side / 'tokens'}"]  # each side its own token cache
    seconds = {run: round(flip(code, args, overrides), 1) for run, args in runs(side, data).items()}
    done.write_text(json.dumps(seconds))
    return seconds


# ------------------------------------------------------------------------------------- comparing
def _flat(tree, prefix=""):
    if isinstance(tree, dict):
        out = {}
        for k, v in tree.items():
            out.update(_flat(v, f"{prefix}{k}."))
        return out
    return {prefix[:-1]: tree}


def _metrics(path: Path) -> dict:
    return {k: v for k, v in _flat(json.loads(path.read_text())).items() if k.split(".")[-1] not in TIMINGS}


def _records(path: Path) -> list:
    """A log's records (``log.jsonl``, or ``losses.json``'s list) without their timings."""
    text = path.read_text()
    rows = json.loads(text) if path.suffix == ".json" else [json.loads(x) for x in text.splitlines() if x]
    return [{k: v for k, v in r.items() if k not in LOG_TIMINGS} for r in rows]


def _selection(run: Path) -> dict | None:
    """The learning-rate selection record: selection.json, or metrics.json's ``selection`` (before)."""
    if (run / "selection.json").exists():
        return json.loads((run / "selection.json").read_text())
    if (run / "metrics.json").exists():
        return json.loads((run / "metrics.json").read_text()).get("selection")
    return None


def compare_run(a: Path, b: Path) -> dict:
    """Every weight, prediction and metric of run ``a`` against run ``b``."""
    import pyarrow.parquet as pq
    import torch
    from safetensors.torch import load_file

    result: dict = {"tensors": 0, "elements": 0, "weight_files": 0, "prediction_files": 0, "metric_files": 0,
                    "metric_values": 0, "log_files": 0, "log_records": 0, "differences": []}
    diff = result["differences"]
    for pattern, kind in (("*.safetensors", "weights"), ("predictions/*.parquet", "predictions"),
                          ("metrics.json", "metrics"), ("log.jsonl", "log"), ("losses.json", "log")):
        files_a = {p.relative_to(a) for p in a.rglob(pattern) if "checkpoint" not in p.parts}
        files_b = {p.relative_to(b) for p in b.rglob(pattern) if "checkpoint" not in p.parts}
        for missing in sorted(files_a ^ files_b):
            diff.append(f"{kind}: {missing} only in {'base' if missing in files_a else 'head'}")
        for rel in sorted(files_a & files_b):
            if kind == "weights":
                ta, tb = load_file(str(a / rel)), load_file(str(b / rel))
                result["weight_files"] += 1
                if ta.keys() != tb.keys():
                    diff.append(f"{rel}: keys differ {sorted(ta.keys() ^ tb.keys())}")
                for k in sorted(ta.keys() & tb.keys()):
                    result["tensors"] += 1
                    result["elements"] += ta[k].numel()
                    if ta[k].dtype != tb[k].dtype or not torch.equal(ta[k], tb[k]):
                        diff.append(f"{rel}: tensor {k} differs")
            elif kind == "predictions":
                result["prediction_files"] += 1
                if not pq.read_table(a / rel).equals(pq.read_table(b / rel)):
                    diff.append(f"{rel}: predictions differ")
            elif kind == "log":
                la, lb = (_records(p / rel) for p in (a, b))
                result["log_files"] += 1
                result["log_records"] += len(la)
                if la != lb:
                    diff.append(f"{rel}: records differ (timings left out)")
            else:
                result["metric_files"] += 1
                ma, mb = _metrics(a / rel), _metrics(b / rel)
                ma = {k: v for k, v in ma.items() if not k.startswith("selection.")}  # compared below
                result["metric_values"] += len(ma)
                for k in sorted(ma.keys() | mb.keys()):
                    if ma.get(k, "<absent>") != mb.get(k, "<absent>"):
                        diff.append(f"{rel}: {k} = {ma.get(k, '<absent>')!r} (base) vs {mb.get(k, '<absent>')!r}")
    sa, sb = _selection(a), _selection(b)
    if sa != sb:
        diff.append(f"learning-rate selection differs: {sa!r} vs {sb!r}")
    result["selection_compared"] = sa is not None
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base", default="ab97bb7", help="the commit whose code is the reference")
    parser.add_argument("--work", type=Path, default=Path("/tmp/flip-same-seed"))
    parser.add_argument("--only", choices=("base", "head"), help="run one side and stop (compare later)")
    parser.add_argument("--fresh", action="store_true", help="rerun a side whose outputs are already there")
    args = parser.parse_args()
    work = args.work.resolve()
    work.mkdir(parents=True, exist_ok=True)
    data, bert = inputs(work)
    seconds: dict[str, dict[str, float]] = {}
    if args.only in (None, "base"):
        tree = work / "base-code"
        if tree.exists():
            subprocess.run(["git", "worktree", "remove", "--force", str(tree)], cwd=ROOT, check=False)
        subprocess.run(["git", "worktree", "add", "--detach", str(tree), args.base], cwd=ROOT, check=True,
                       capture_output=True)
        try:
            seconds["base"] = run_side("base", tree, work, data, bert, args.fresh)
        finally:
            subprocess.run(["git", "worktree", "remove", "--force", str(tree)], cwd=ROOT, check=True)
    if args.only in (None, "head"):
        seconds["head"] = run_side("head", ROOT, work, data, bert, args.fresh)
    if args.only:
        print(json.dumps(seconds, indent=2))
        return
    head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    dirty = bool(subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                                capture_output=True, text=True).stdout.strip())
    compared = {name: compare_run(work / "base" / name, work / "head" / name) for name in runs(work, data)}
    identical = all(not c["differences"] for c in compared.values())
    save("same_seed_check", {
        "base": args.base, "head": head + ("+uncommitted" if dirty else ""),
        "commands": {name: "flip " + " ".join([a[0], *[x for o in COMMON for x in ("-S", o)], "-S", "plm.name=BERT",
                                                    "-S", "plm.cache_dir=SIDE/tokens", *a[1:]])
                     for name, a in runs(Path("SIDE"), Path("DATA")).items()},
        "seconds": seconds, "runs": compared, "identical": identical})
    sys.exit(0 if identical else 1)


if __name__ == "__main__":
    main()
