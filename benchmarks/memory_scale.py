"""Peak memory (RSS) of `flip validate`, `flip drift` and `flip predict` at several log sizes: how much
memory per million rows each needs (issue 21, "memory that does not grow with the log").

    python benchmarks/memory_scale.py                          # 2M and 20M rows (3M ids at 20M)
    python benchmarks/memory_scale.py --sizes 20000 60000      # a quick check that it works

For each size: a synthetic log (``data.synthetic``: 8 fields, users = rows/20 and items = rows/10,
so 20M rows hold 3M ids) is preprocessed, validated and drift-tested; a small ID model is trained on
20,000 of its rows (the bundle still holds the whole vocabulary) and packaged; the test split's raw
values (10% of the rows, with labels) are scored by `flip predict`. Each stage is its own process,
measured by ``/usr/bin/time -v`` (peak RSS of the process, DuckDB's buffers included). Resumable:
the processed data and bundle of a size are kept under ``--workdir`` and stages already measured in
``benchmarks/results/memory_scale.json`` are skipped (``--again`` measures them anew).
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, save  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
NAME = "memory_scale"


def measured(args: list[str]) -> tuple[float, float]:
    """Seconds and peak RSS (MiB) of ``flip <args>`` in its own process."""
    start = time.perf_counter()
    done = subprocess.run(["/usr/bin/time", "-v", sys.executable, "-m", "flip.cli", *args], cwd=ROOT,
                          capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if done.returncode:
        sys.exit(f"flip {args[0]} failed ({done.returncode}):\n{done.stdout[-2000:]}\n{done.stderr[-4000:]}")
    kib = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", done.stderr).group(1))
    return seconds, kib / 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[2_000_000, 20_000_000])
    parser.add_argument("--workdir", default=str(Path(tempfile.gettempdir()) / "flip-memory-scale"))
    parser.add_argument("--idle", action="store_true", help="record that the machine was idle")
    parser.add_argument("--again", action="store_true", help="measure stages already in the results again")
    a = parser.parse_args()
    previous = RESULTS / f"{NAME}.json"
    runs = json.loads(previous.read_text()).get("runs", {}) if previous.exists() and not a.again else {}
    for rows in a.sizes:
        work = Path(a.workdir) / str(rows)
        data, run, bundle = work / "processed", work / "run", work / "bundle"
        sets = ["data.dataset=synthetic", f"data.synthetic.rows={rows}", "data.synthetic.fields=8",
                f"data.synthetic.users={max(rows // 20, 50)}", f"data.synthetic.items={max(rows // 10, 30)}",
                "run.progress=false", "run.seeds=[1]", "finetune.strategy=scratch", "finetune.epochs=1",
                "finetune.train_rows=20000", "finetune.eval_rows=20000", "finetune.lr_grid=[]",
                "finetune.precision=fp32", "id_model.dnn_hidden_units=[32]"]
        s = [x for kv in sets for x in ("-S", kv)]
        record = runs.setdefault(str(rows), {})

        def stage(name: str, args: list[str], keep: bool = True) -> None:
            if name in record:
                return
            seconds, peak = measured(args)
            if keep:
                record[name] = {"seconds": round(seconds, 1), "peak_rss_mib": round(peak, 1),
                                "mib_per_million_rows": round(peak / (rows / 1e6), 1)}
                save(NAME, {"idle": a.idle, "runs": runs}, echo=False)
                print(f"{rows:,} rows: {name} {seconds:.1f} s, peak RSS {peak:,.0f} MiB", flush=True)

        if not (data / "meta.json").exists():
            stage("preprocess", ["preprocess", *s, "-q", "--raw", str(work / "raw"), "--out", str(data)])
        stage("validate", ["validate", *s, "--data", str(data), "--out", str(work / "reports")])
        stage("drift", ["drift", *s, "--data", str(data), "--out", str(work / "drift")])
        if not (bundle / "model.json").exists():
            subprocess.run([sys.executable, "-m", "flip.cli", "finetune", *s, "--data", str(data), "--out", str(run)],
                           cwd=ROOT, check=True, capture_output=True)
            subprocess.run([sys.executable, "-m", "flip.cli", "package", *s, "--data", str(data), "--run", str(run),
                            "--out", str(bundle)], cwd=ROOT, check=True, capture_output=True)
        scored = work / "test.parquet"
        if not scored.exists():
            import pyarrow.parquet as pq

            from flip.data.preprocess import split_values

            pq.write_table(split_values(data, "test"), scored)
        test_rows = json.loads((data / "meta.json").read_text())["counts"]["test"]
        if "predict" not in record:
            seconds, peak = measured(["predict", "--model", str(bundle), "--input", str(scored),
                                      "--out", str(work / "scores.parquet"), "--quiet"])
            record["predict"] = {"seconds": round(seconds, 1), "peak_rss_mib": round(peak, 1), "rows": test_rows,
                                 "mib_per_million_rows": round(peak / (test_rows / 1e6), 1)}
            print(f"{rows:,} rows: predict ({test_rows:,} rows) {seconds:.1f} s, peak RSS {peak:,.0f} MiB", flush=True)
    save(NAME, {"idle": a.idle, "note": "peak RSS per process (/usr/bin/time -v); mib_per_million_rows is "
                "peak / rows and includes the fixed cost (Python, torch, DuckDB, Great Expectations): compare "
                "sizes for the growth", "runs": runs})


if __name__ == "__main__":
    main()
