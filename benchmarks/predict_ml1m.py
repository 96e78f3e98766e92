"""`flip predict` with the packaged FLIP_ID on MovieLens-1M: exactness, throughput, peak memory.

    python benchmarks/predict_ml1m.py PROJECT     # PROJECT ran `dvc repro package@flip_id` on ML-1M

1. Exactness: the test split, as raw values (``split_values``), scored by ``flip predict`` gives the
   same AUC as the evaluation of that run (the packaged seed's ``predictions/test.parquet``, scored
   as ``flip evaluate`` scores it) and the same probabilities row by row.
2. Throughput (rows/s, median of ``--repeats`` runs, each a fresh ``flip predict`` process so that
   its peak RSS is its own): a Parquet field table (the test split, and the test split repeated
   ``--scale`` times: memory must not grow with the input), and the raw ML-1M directory read by the
   dataset's own reader (every rating, in the pipeline's time order).
3. The bare model's forward pass on the same ids (already encoded, in memory), batch 8192: the
   ceiling that ``flip predict`` is compared with.

Run it alone: on 2 cores a second CPU-heavy process halves every number here.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import save  # noqa: E402

from flip.data.preprocess import split_values  # noqa: E402
from flip.deploy.package import load_bundle  # noqa: E402
from flip.metrics import auc  # noqa: E402
from flip.runs import RunDir  # noqa: E402

FLIP = str(Path(sys.executable).parent / "flip")


# runs a command and reports its peak RSS (KiB) on stderr's last line: each measurement is a fresh
# wrapper process, so RUSAGE_CHILDREN is that one command's own maximum
PEAK = ("import resource, subprocess, sys; r = subprocess.run(sys.argv[1:]); "
        "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, file=sys.stderr); sys.exit(r.returncode)")


def run_predict(bundle: Path, inputs: list[Path], out: Path) -> dict:
    """One `flip predict` process: wall time, the rows/s it reports, and its peak RSS (MiB)."""
    args = [sys.executable, "-c", PEAK, FLIP, "predict", "--model", str(bundle), "--out", str(out), "--quiet"]
    for p in inputs:
        args += ["--input", str(p)]
    t0 = time.perf_counter()
    done = subprocess.run(args, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if done.returncode != 0:
        raise SystemExit(done.stderr)
    line = done.stdout.strip().splitlines()[-1]
    rows = int(line.split("scored ")[1].split(" rows")[0].replace(",", ""))
    rate = float(line.split("(")[1].split(" rows/s")[0].replace(",", ""))
    peak_kib = int(done.stderr.strip().splitlines()[-1])
    return {"rows": rows, "wall_s": wall, "rows_per_s_scoring": rate, "rows_per_s_wall": rows / wall,
            "peak_rss_mib": peak_kib / 1024, "summary": line}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("project", type=Path)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--scale", type=int, default=20)
    ap.add_argument("--idle", default="yes", help="was the machine otherwise idle (recorded)")
    args = ap.parse_args()
    project = args.project.resolve()
    bundle = project / "models/serve/flip_id"
    data = project / "data/processed/movielens-1m"
    info = json.loads((bundle / "model.json").read_text())
    seed_dir = Path(info["source_run"]) if Path(info["source_run"]).is_absolute() else project / info["source_run"]
    torch.set_num_threads(2)

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        test = split_values(data, "test")
        pq.write_table(test, tmp / "test.parquet")
        big = pa.concat_tables([test] * args.scale)
        pq.write_table(big, tmp / "test_x_scale.parquet")

        # 1. exactness
        run_predict(bundle, [tmp / "test.parquet"], tmp / "scores.parquet")
        mine = pd.read_parquet(tmp / "scores.parquet")
        theirs = RunDir(seed_dir).predictions("test")
        assert list(mine["row"]) == list(theirs["row"])
        metrics = RunDir(seed_dir).metrics()
        exact = {
            "rows": len(mine), "seed": info["seed"],
            "auc_flip_predict": auc(mine["label"], mine["prob"]),
            "auc_evaluation_predictions": auc(theirs["label"], theirs["prob"]),
            "auc_run_metrics": metrics["test"]["auc"],
            "max_abs_prob_diff": float(np.abs(mine["prob"].to_numpy() - theirs["prob"].to_numpy()).max()),
        }
        exact["auc_equal"] = exact["auc_flip_predict"] == exact["auc_run_metrics"]

        # 2. throughput and memory, one fresh process per run
        inputs = {"test_parquet": [tmp / "test.parquet"], f"test_x{args.scale}_parquet": [tmp / "test_x_scale.parquet"],
                  "raw_ml1m_directory": [project / "data/raw/movielens-1m"]}
        throughput = {}
        for name, files in inputs.items():
            runs = [run_predict(bundle, files, tmp / f"{name}.parquet") for _ in range(args.repeats)]
            throughput[name] = {
                "rows": runs[0]["rows"],
                "rows_per_s_wall_median": statistics.median(r["rows_per_s_wall"] for r in runs),
                "rows_per_s_scoring_median": statistics.median(r["rows_per_s_scoring"] for r in runs),
                "wall_s": [round(r["wall_s"], 2) for r in runs],
                "peak_rss_mib": max(r["peak_rss_mib"] for r in runs),
                "input_mib": round(sum(f.stat().st_size if f.is_file() else sum(x.stat().st_size for x in f.iterdir())
                                       for f in files) / 2**20, 1),
            }
            print(name, json.dumps(throughput[name]))

    # 3. the bare model's forward pass on the same ids
    b = load_bundle(bundle)
    fields = [f["name"] for f in b.fields]
    x = torch.from_numpy(pq.read_table(data / "test.parquet", columns=fields).to_pandas()[fields].to_numpy()
                         .astype(np.int64))
    x = x.repeat(args.scale, 1)
    times = []
    with torch.no_grad():
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            for lo in range(0, len(x), 8192):
                torch.sigmoid(b.model(x[lo:lo + 8192]))
            times.append(time.perf_counter() - t0)
    bare = len(x) / statistics.median(times)
    big_rate = throughput[f"test_x{args.scale}_parquet"]["rows_per_s_wall_median"]
    save("predict_ml1m", {
        "idle": args.idle,
        "bundle": {k: info[k] for k in ("artifact", "strategy", "seed", "valid_auc", "test_auc")},
        "model": info["config"]["id_model"]["name"], "batch_rows": 8192, "torch_threads": 2,
        "exactness": exact,
        "throughput": throughput,
        "bare_forward_rows_per_s": bare,
        "flip_predict_vs_bare_forward": big_rate / bare,
        "note": "rows_per_s_wall: the whole `flip predict` process (start-up, imports, reading, DuckDB joins, "
                "scoring, writing); rows_per_s_scoring: from the start of scoring to the last batch written. "
                "peak_rss_mib: the `flip predict` process's peak RSS; it must not grow with the input's size.",
    })


if __name__ == "__main__":
    main()
