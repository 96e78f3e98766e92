"""The whole pipeline at scale: wall time, peak RSS and disk written of every stage, one process each.

    python benchmarks/pipeline_scale.py --idle yes                       # 20M rows, 15 fields, 3M ids
    python benchmarks/pipeline_scale.py --rows 2000000 --idle yes        # another size (merged into the file)
    python benchmarks/pipeline_scale.py --rows 200000 --train-steps 20   # a quick proof that it runs

A synthetic click log (``data.dataset=synthetic``: power-law skewed user and item ids, by default
rows/20 users and rows/10 items, i.e. 1M + 2M = 3M ids at 20M rows; a label that depends on the
user-item mood match, item quality and user activity, so AUC means something) goes through, each as
its own ``python -m flip.cli <stage>`` process:

    preprocess -> validate -> drift -> scratch (DCNv2, one epoch, all rows, one seed)
    -> evaluate (the runs folder holds only scratch) -> package -> predict (the test split's raw values)

Per stage: wall ``seconds``, ``peak_rss_gib`` (the child's own ``ru_maxrss`` from ``os.wait4``: the
largest RSS of the process or any process it waited for, never a sum), ``disk_written_bytes`` (files
the stage created or changed under the working folder) and ``rows_per_second`` / ``samples_per_second``
where they apply. ``--train-steps N`` caps training at N batches (``finetune.max_rows``); its epoch time
is then extrapolated from the measured samples/s and the entry says ``extrapolated: true``.

Results: ``benchmarks/results/pipeline_scale.json`` (``--out``), one entry per size keyed by rows,
merged into the file, written after every stage. Resumable: a stage already recorded for this size
with its outputs present (in ``--work``) is skipped, unless ``--fresh``; once a stage reruns, every later
stage reruns too, except with ``--rerun validate evaluate ...``, which measures those stages again
(stages whose outputs no later stage reads) and keeps every other stage's record. Targets (20M rows,
2 cores, 24 GiB): every stage under 4 GiB peak RSS, validate and drift each under 5 minutes, training
at least 30k samples/s, predict at least 100k rows/s.
The script only drives the CLI (it imports nothing heavy), so its own RSS stays small.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, command, machine, save  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
STAGES = ["preprocess", "validate", "drift", "train", "evaluate", "package", "predict"]
TARGETS = {"peak_rss_gib": 4.0, "validate_seconds": 300, "drift_seconds": 300, "train_samples_per_second": 30_000,
           "predict_rows_per_second": 100_000}
GIB = 1024 ** 3
# stages whose outputs no later stage reads: --rerun measures them again without rerunning the rest
LEAVES = {"validate", "drift", "evaluate", "predict"}


def snapshot(folder: Path) -> dict[str, tuple[int, int]]:
    out = {}
    for dirpath, _, files in os.walk(folder):
        for name in files:
            p = os.path.join(dirpath, name)
            try:
                st = os.stat(p)
            except OSError:
                continue
            out[p] = (st.st_size, st.st_mtime_ns)
    return out


def run_stage(args: list[str], work: Path, log: Path) -> dict:
    """One ``flip`` stage as a child process: wall seconds, its own peak RSS, bytes it wrote under
    ``work``; its stdout is kept in ``log`` (and echoed), its stderr (progress) goes to ours."""
    cmd = [sys.executable, "-m", "flip.cli", *args]
    print("$ " + " ".join(cmd), flush=True)
    before = snapshot(work)
    start = time.perf_counter()
    with open(log, "w") as fh:
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=fh, env={**os.environ, "PYTHONUNBUFFERED": "1"})
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)  # reaped here: Popen must not wait again
    seconds = time.perf_counter() - start
    text = log.read_text()
    print(text, end="", flush=True)
    if proc.returncode != 0:
        raise SystemExit(f"stage failed (exit {proc.returncode}): {' '.join(cmd)}; its output: {log}")
    after = snapshot(work)
    written = sum(size for p, (size, mtime) in after.items() if before.get(p) != (size, mtime) and p != str(log))
    return {"seconds": round(seconds, 2), "peak_rss_gib": round(usage.ru_maxrss * 1024 / GIB, 3),
            "disk_written_bytes": written, "command": " ".join(["flip", *args]), "stdout": text.strip()[-2000:]}


def load_results(path: Path) -> dict:
    if path.exists():
        return json.loads(path.read_text())
    return {}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=20_000_000)
    parser.add_argument("--fields", type=int, default=15)
    parser.add_argument("--users", type=int, default=0, help="distinct users (default rows/20)")
    parser.add_argument("--items", type=int, default=0, help="distinct items (default rows/10)")
    parser.add_argument("--train-steps", type=int, default=0, help="cap training at N batches (extrapolated)")
    parser.add_argument("--batch-size", type=int, default=1024, help="finetune.batch_size")
    parser.add_argument("--work", default="", help="working folder (default: $TMPDIR/flip-pipeline-scale/rows-N)")
    parser.add_argument("--out", default=str(RESULTS / "pipeline_scale.json"))
    parser.add_argument("--idle", choices=["yes", "no"], default="no", help="was the machine idle (recorded)")
    parser.add_argument("--fresh", action="store_true", help="rerun every stage of this size from scratch")
    parser.add_argument("--rerun", nargs="+", default=[], choices=sorted(LEAVES),
                        help="rerun only these stages (whose outputs no later stage reads), keeping the rest")
    a = parser.parse_args()
    out = Path(a.out)
    if out.suffix != ".json":
        raise SystemExit(f"--out {out}: give a .json file name")
    users, items = a.users or max(a.rows // 20, 1), a.items or max(a.rows // 10, 1)
    work = Path(a.work or Path(tempfile.gettempdir()) / "flip-pipeline-scale" / f"rows-{a.rows}").resolve()
    settings = {"rows": a.rows, "fields": a.fields, "users": users, "items": items, "train_steps": a.train_steps,
                "batch_size": a.batch_size}

    results = load_results(out)
    sizes = results.get("sizes", {})
    entry = sizes.get(str(a.rows), {})
    if a.fresh or entry.get("settings") != settings:
        if entry and not a.fresh:
            print(f"settings differ from the recorded entry for {a.rows} rows: rerunning every stage", flush=True)
        entry = {}
        shutil.rmtree(work, ignore_errors=True)
    (work / "raw").mkdir(parents=True, exist_ok=True)  # the synthetic source reads no files
    entry.update({"rows": a.rows, "settings": settings, "idle": a.idle == "yes", "command": command(),
                  "machine": machine(), "work": str(work)})
    stages = entry.setdefault("stages", {})

    def record() -> None:
        sizes[str(a.rows)] = entry
        save(out.stem, {"note": "one entry per size (rows); see benchmarks/pipeline_scale.py",
                        "targets": TARGETS, "sizes": dict(sorted(sizes.items(), key=lambda kv: int(kv[0])))},
             directory=out.parent, echo=False)

    data, reports = work / "processed", work / "reports"
    run_dir, bundle = work / "runs" / "scratch", work / "serve" / "scratch"
    test_values, scores = work / "test_values.parquet", work / "scores.parquet"
    S = ["-S", "data.dataset=synthetic", "-S", f"data.synthetic.rows={a.rows}", "-S",
         f"data.synthetic.fields={a.fields}", "-S", f"data.synthetic.users={users}", "-S",
         f"data.synthetic.items={items}", "-S", f"finetune.batch_size={a.batch_size}"]
    train_S = ["-S", "finetune.strategy=scratch", "-S", "finetune.train_rows=0", "-S", "finetune.eval_rows=0",
               "-S", "finetune.lr_grid=[]", "-S", "run.seeds=[2012]", "-S", "finetune.epochs=1"]
    if a.train_steps:
        train_S += ["-S", f"finetune.max_rows={a.train_steps * a.batch_size}"]
    markers = {"preprocess": data / "meta.json", "validate": reports / "validation" / "validation.json",
               "drift": reports / "drift" / "drift.json", "train": run_dir / "metrics.json",
               "evaluate": reports / "eval.json", "package": bundle / "model.json", "predict": scores}
    rerun = False
    for name in STAGES:
        if not rerun and name in stages and markers[name].exists() and name not in a.rerun:
            print(f"[{name}] already done for {a.rows} rows: skipped (--fresh reruns it)", flush=True)
            continue
        rerun = rerun or name not in a.rerun  # a leaf rerun leaves the later stages' records standing
        log = work / f"{name}.log"
        if name == "preprocess":
            r = run_stage(["preprocess", "-q", *S, "--raw", str(work / "raw"), "--out", str(data)], work, log)
        elif name == "validate":
            r = run_stage(["validate", *S, "--data", str(data), "--out", str(reports / "validation")], work, log)
        elif name == "drift":
            r = run_stage(["drift", *S, "--data", str(data), "--out", str(reports / "drift")], work, log)
        elif name == "train":
            shutil.rmtree(run_dir, ignore_errors=True)  # an interrupted run would resume; a benchmark starts clean
            r = run_stage(["finetune", *S, *train_S, "--data", str(data), "--out", str(run_dir)], work, log)
        elif name == "evaluate":
            r = run_stage(["evaluate", *S, "--data", str(data), "--runs", str(run_dir.parent), "--out", str(reports)],
                          work, log)
        elif name == "package":
            r = run_stage(["package", *S, "--run", str(run_dir), "--data", str(data), "--out", str(bundle)], work, log)
        else:
            # the test split as raw field values (what a caller would send), written by its own process
            subprocess.run([sys.executable, "-c", "import sys, pyarrow.parquet as pq; "
                            "from flip.data.preprocess import split_values; "
                            "pq.write_table(split_values(sys.argv[1], 'test'), sys.argv[2])",
                            str(data), str(test_values)], cwd=ROOT, check=True)
            r = run_stage(["predict", "-q", "--model", str(bundle), "--input", str(test_values), "--out", str(scores)],
                          work, log)
        r.update(measures(name, r, work, data, run_dir, a))
        r.update({"idle": a.idle == "yes", "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())})
        stages[name] = r
        record()
        print(f"[{name}] {r['seconds']:.1f} s, peak RSS {r['peak_rss_gib']:.2f} GiB", flush=True)
    entry["verdict"] = verdict(stages)
    record()
    print(json.dumps({"rows": a.rows, "idle": a.idle, "verdict": entry["verdict"],
                      "stages": {k: {m: v for m, v in s.items() if m not in ("stdout", "command")}
                                 for k, s in stages.items()}}, indent=2))
    print(f"-> {out}")


def measures(name: str, r: dict, work: Path, data: Path, run_dir: Path, a) -> dict:
    """Throughput of a stage, from its outputs (meta.json counts, the run's metrics, predict's line)."""
    meta = json.loads((data / "meta.json").read_text())
    counts = meta["counts"]
    m: dict = {}
    if name == "preprocess":
        m["rows_per_second"] = round(counts["total"] / r["seconds"])
        m["counts"] = counts
        m["vocab_size"] = meta["vocab_size"]
        m["distinct_ids"] = {f["name"]: f["train_values"] for f in meta["fields"]
                             if f["name"] in (meta["user_field"], meta["item_field"])}
        m["positive_rate"] = meta["positive_rate"]["total"]
    elif name in ("validate", "drift"):
        m["rows_per_second"] = round(counts["total"] / r["seconds"])
    elif name == "evaluate":
        m["rows_per_second"] = round((counts["valid"] + counts["test"]) / r["seconds"])
        m["runs"] = ["scratch"]  # the runs folder holds only scratch: no strategy comparison is scored
    elif name == "train":
        from flip.runs import RunDir  # standard library only

        seed = next(iter(RunDir(run_dir).seeds().values()))
        metrics = seed.metrics()
        sps = float(metrics["train"]["samples_per_second"])
        trained = int(metrics["train"]["steps"]) * a.batch_size if a.train_steps else counts["train"]
        m.update({"samples_per_second": round(sps), "train_rows": counts["train"], "trained_rows": min(trained, counts["train"]),
                  "steps": metrics["train"]["steps"], "train_seconds": round(float(metrics["train"]["seconds"]), 2),
                  "test_auc": metrics["test"]["auc"], "valid_auc": metrics["valid"]["auc"],
                  "extrapolated": bool(a.train_steps)})
        if a.train_steps:
            # the measured wall minus the capped epoch's training, plus a whole epoch at the measured rate
            m["epoch_seconds_estimate"] = round(r["seconds"] - m["trained_rows"] / sps + counts["train"] / sps, 1)
    elif name == "predict":
        m["rows_per_second_wall"] = round(counts["test"] / r["seconds"])
        found = re.search(r"scored ([\d,]+) rows \(([\d,]+) rows/s\)", r["stdout"])
        m["rows_per_second"] = int(found.group(2).replace(",", "")) if found else m["rows_per_second_wall"]
        auc = re.search(r"AUC ([\d.]+)", r["stdout"])
        if auc:
            m["test_auc"] = float(auc.group(1))
    return m


def verdict(stages: dict) -> dict:
    """Pass/miss against the targets, for the stages that ran."""
    v = {}
    for name, s in stages.items():
        v[f"{name}_peak_rss_under_{TARGETS['peak_rss_gib']:g}_gib"] = s["peak_rss_gib"] < TARGETS["peak_rss_gib"]
    for name in ("validate", "drift"):
        if name in stages:
            v[f"{name}_under_5_min"] = stages[name]["seconds"] < TARGETS[f"{name}_seconds"]
    if "train" in stages:
        v["train_at_least_30k_samples_per_second"] = stages["train"]["samples_per_second"] >= TARGETS[
            "train_samples_per_second"]
    if "predict" in stages:
        v["predict_at_least_100k_rows_per_second"] = stages["predict"]["rows_per_second"] >= TARGETS[
            "predict_rows_per_second"]
    for k, ok in v.items():
        print(f"{'PASS' if ok else 'MISS'}  {k}", flush=True)
    return v


if __name__ == "__main__":
    main()
