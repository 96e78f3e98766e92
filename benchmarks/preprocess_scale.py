"""Preprocessing at scale: wall time and peak memory (RSS) of `flip preprocess`.

    python benchmarks/preprocess_scale.py                 # 20M-row, 15-field synthetic log (GoodReads size)
    python benchmarks/preprocess_scale.py --rows 1000000  # smaller
    python benchmarks/preprocess_scale.py --movielens     # the MovieLens-1M copy (needs FLIP_DATA_MIRROR)

Targets on the 2-core, 24 GiB machine: 20M rows under 10 minutes and 4 GiB peak RSS;
MovieLens-1M under 15 seconds. Each run is a separate `flip preprocess` process, so its peak RSS
(including DuckDB's buffers) is measured alone. Results: benchmarks/results/preprocess_*.json.
"""

from __future__ import annotations

import argparse
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import save  # noqa: E402


def run_preprocess(args: list[str], workdir: Path) -> tuple[float, float]:
    flip = [sys.executable, "-m", "flip.cli"]
    before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    start = time.perf_counter()
    subprocess.run([*flip, "preprocess", "-q", *args], check=True, cwd=workdir)
    seconds = time.perf_counter() - start
    peak_kib = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    if peak_kib < before:  # pragma: no cover - ru_maxrss is a max over all children so far
        peak_kib = before
    return seconds, peak_kib / 1024 / 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=20_000_000)
    parser.add_argument("--fields", type=int, default=15)
    parser.add_argument("--movielens", action="store_true")
    parser.add_argument("--workdir", default="")
    a = parser.parse_args()
    root = Path(__file__).resolve().parents[1]
    work = Path(a.workdir or tempfile.mkdtemp(prefix="flip-bench-"))
    out = work / "processed"
    try:
        if a.movielens:
            mirror = os.environ.get("FLIP_DATA_MIRROR", str(root.parent / "shared" / "data"))
            seconds, peak = run_preprocess(["--raw", f"{mirror}/ml-1m", "--out", str(out)], root)
            name, target = "preprocess_movielens", {"seconds": 15}
            size = {"dataset": "movielens-1m copy", "mirror": mirror}
        else:
            overrides = ["-S", "data.dataset=synthetic", "-S", f"data.synthetic.rows={a.rows}",
                         "-S", f"data.synthetic.fields={a.fields}", "-S", "data.synthetic.users=1000000",
                         "-S", "data.synthetic.items=2000000"]
            seconds, peak = run_preprocess([*overrides, "--raw", str(work), "--out", str(out)], root)
            name, target = ("preprocess_scale" if a.rows == 20_000_000 else f"preprocess_{a.rows}"), \
                {"seconds": 600, "peak_rss_gib": 4.0}
            size = {"dataset": "synthetic", "rows": a.rows, "fields": a.fields}
        import json

        meta = json.loads((out / "meta.json").read_text())
        parquet_mb = sum(p.stat().st_size for p in out.glob("*.parquet")) / 1e6
        result = {**size, "seconds": round(seconds, 1), "peak_rss_gib": round(peak, 2),
                  "rows_per_second": round(meta["counts"]["total"] / seconds), "counts": meta["counts"],
                  "vocab_size": meta["vocab_size"], "parquet_mb": round(parquet_mb, 1), "target": target,
                  "meets_target": seconds <= target["seconds"] and peak <= target.get("peak_rss_gib", 1e9)}
        save(name, result)
    finally:
        if not a.workdir:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
