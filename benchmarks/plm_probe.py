"""How much a language model's frozen sentence states know about clicks: a linear probe.

    python benchmarks/plm_probe.py minilm-l6 models/pretrain/plm [--data DIR]

For each model: encode the last 3,000 training rows and 2,000 evenly spaced test rows of the
processed dataset (max_length 64), fit a logistic regression on the [CLS] state and, separately, on
the mean of the token states, and report its test AUC. A language model whose alignment pretraining
erased what its states carried about clicks scores near 0.5 here (see README, Profiles). Prints and
writes ``benchmarks/results/plm_probe.json`` with the command and the machine.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))


def main() -> None:
    import numpy as np
    import pyarrow.parquet as pq
    import torch
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import roc_auc_score

    from common import save
    from flip.config import PlmConfig
    from flip.models.plm import load_plm

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("models", nargs="+", help="language models: alias, directory or hub id")
    ap.add_argument("--data", default="data/processed/movielens-1m")
    ap.add_argument("--train-rows", type=int, default=3000)
    ap.add_argument("--test-rows", type=int, default=2000)
    args = ap.parse_args()
    torch.set_num_threads(2)
    train = pq.read_table(f"{args.data}/train.parquet", columns=["text", "label"]).to_pandas().tail(args.train_rows)
    test = pq.read_table(f"{args.data}/test.parquet", columns=["text", "label"]).to_pandas()
    test = test.iloc[np.linspace(0, len(test) - 1, args.test_rows).round().astype(int)]
    results = {}
    for name in args.models:
        enc, tok = load_plm(PlmConfig(name=name, max_length=64))
        enc.eval()

        def features(texts):
            out = []
            with torch.inference_mode():
                for i in range(0, len(texts), 128):
                    b = tok(list(texts[i:i + 128]), padding=True, truncation=True, max_length=64, return_tensors="pt")
                    states = enc(b["input_ids"], b["attention_mask"])
                    m = b["attention_mask"].unsqueeze(-1).float()
                    out.append(torch.cat([states[:, 0], (states * m).sum(1) / m.sum(1)], 1))
            return torch.cat(out).float().numpy()

        a, b = features(train["text"].values), features(test["text"].values)
        d = a.shape[1] // 2
        results[name] = {}
        for pooling, cols in (("cls", slice(0, d)), ("mean", slice(d, None))):
            probe = LogisticRegression(max_iter=2000).fit(a[:, cols], train["label"])
            auc = float(roc_auc_score(test["label"], probe.predict_proba(b[:, cols])[:, 1]))
            results[name][pooling] = {"test_auc": auc, "mean_norm": float(np.linalg.norm(a[:, cols], axis=1).mean())}
            print(f"{name} {pooling}: probe test AUC {auc:.4f}")
    save("plm_probe", {"data": args.data, "train_rows": args.train_rows, "test_rows": args.test_rows,
                       "models": results})


if __name__ == "__main__":
    main()
