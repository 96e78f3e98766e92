"""The paper's nine ID-based baselines trained from scratch on the MovieLens-1M copy.

    python benchmarks/id_models.py                    # all nine, paper defaults (params.yaml)
    python benchmarks/id_models.py --models dcnv2 deepfm --seeds 2012 2013
    python benchmarks/id_models.py --models dcnv2 --variant fp32 -S finetune.precision=fp32

Each model: `flip finetune -S finetune.strategy=scratch -S id_model.name=<model>` (batch 1024, Adam 1e-3,
embedding L2 1e-4, dropout 0.1, early stopping on validation AUC, the best epoch scored once on
test). Prints and saves benchmarks/results/id_models.json (AUC, logloss, samples/s, parameters) beside
the paper's Table 2 column for MovieLens-1M. Throughput is the training loop's own measurement:
run it on an idle machine. ``--variant NAME`` stores the rows as variants of the models (e.g. other
precision or cross network), beside the main table's rows instead of replacing them.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import save  # noqa: E402

from flip.config import load_config  # noqa: E402
from flip.data.preprocess import preprocess  # noqa: E402
from flip.evaluate.paper import MODEL_ROW, TABLE2  # noqa: E402
from flip.train.tasks import finetune_bf16  # noqa: E402
from flip.train.finetune import finetune  # noqa: E402
from flip.train.loop import resolve_device  # noqa: E402

MODELS = ["afm", "pnn", "widedeep", "dcn", "deepfm", "xdeepfm", "afn", "autoint", "dcnv2"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=MODELS)
    parser.add_argument("--seeds", nargs="+", type=int, default=[2012])
    parser.add_argument("--workdir", default=os.path.join(tempfile.gettempdir(), "flip-id-models"))
    parser.add_argument("-S", "--set", dest="overrides", action="append", default=[])
    parser.add_argument("--variant", default="", help="label for rows that differ from the defaults (-S ...)")
    a = parser.parse_args()
    root = Path(__file__).resolve().parents[1]
    mirror = Path(os.environ.get("FLIP_DATA_MIRROR", root.parent / "shared" / "data"))
    work = Path(a.workdir)
    data = work / "processed" / "movielens-1m"
    base = load_config(root / "params.yaml", ["run.progress=false", *a.overrides])
    if not (data / "meta.json").exists():
        preprocess(base, mirror / "ml-1m", data, progress=False)
    rows = []
    for name in a.models:
        cfg = load_config(root / "params.yaml", ["run.progress=false", "finetune.strategy=scratch",
                                                 f"id_model.name={name}", f"run.seeds={a.seeds}", *a.overrides])
        start = time.time()
        m = finetune(cfg, data, work / "runs" / (f"{name}-{a.variant}" if a.variant else name))
        paper = TABLE2["movielens-1m"][MODEL_ROW[name]]
        rows.append({"model": name, "variant": a.variant, "paper_row": MODEL_ROW[name],
                     "valid_auc": round(m["valid"]["auc"], 4),
                     "test_auc": round(m["test"]["auc"], 4), "test_logloss": round(m["test"]["logloss"], 4),
                     "test_auc_std": round(m.get("std", {}).get("test", {}).get("auc", 0.0), 4),
                     "samples_per_second": round(m["train"]["samples_per_second"]),
                     "epochs": m["train"]["epochs"], "params": m.get("params"), "seconds": round(time.time() - start),
                     "precision": "bf16" if finetune_bf16(cfg, resolve_device(cfg.run.device)) else "fp32",
                     "paper_auc": paper[0], "paper_logloss": paper[1]})
        print(rows[-1], flush=True)
    # merge with earlier runs of other models (each row keeps the command that produced it)
    import json

    from common import RESULTS, command

    old = RESULTS / "id_models.json"
    previous = json.loads(old.read_text()) if old.exists() else {}
    earlier = previous.get("models", []) + previous.get("variants", [])
    for r in rows:
        r["command"] = command()

    def key(r: dict) -> tuple[str, str]:
        return r["model"], r.get("variant", "")

    done = {key(r) for r in rows}
    merged = [r for r in earlier if key(r) not in done] + rows
    merged.sort(key=lambda r: (MODELS.index(r["model"]) if r["model"] in MODELS else 99, r.get("variant", "")))
    main_rows = [r for r in merged if not r.get("variant")]
    save("id_models", {"dataset": "movielens-1m copy (users 1-2999; 360,434 samples)", "seeds": a.seeds,
                       "overrides": a.overrides, "models": main_rows,
                       "variants": [r for r in merged if r.get("variant")],
                       "missing": [m for m in MODELS if m not in {r["model"] for r in main_rows}],
                       "meets_auc_0.84": all(r["test_auc"] >= 0.84 for r in main_rows)})


if __name__ == "__main__":
    main()
