"""The "w/o MLM&MTM&ICL" row of the paper's Table 5: every pretraining objective off, so nothing is
aligned. The pretraining stage then writes the models as they start (the ID model initialised under
the run's seed, the language model as loaded) in the layout of a pretraining run, so that the
finetuning strategies, the analysis and the report run unchanged: FLIP without alignment.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

from flip.align.model import OBJECTIVES
from flip.config import Config
from flip.io import atomic_dir, write_json
from flip.runs import PRETRAIN_LAYOUT, RunDir


def nothing_to_align(cfg: Config) -> bool:
    """True when every pretraining objective has weight 0."""
    return not any(float(getattr(cfg.pretrain, f"{name}_weight")) for name in OBJECTIVES)


def save_unaligned(cfg: Config, dataset_dir: Path, out: Path) -> dict[str, Any]:
    """Write ``id_model.safetensors`` (seeded initialisation), ``plm/``, ``config.json``,
    ``dataset_meta.json``, ``vocab.parquet``, an empty ``losses.json``/``log.jsonl`` and a
    ``metrics.json`` that says no step ran."""
    import os

    import torch
    from safetensors.torch import save_file

    from flip.data.tensors import load_meta
    from flip.models import build_id_model
    from flip.models.plm import load_plm

    if os.environ.get("RANK", "0") != "0":  # under torchrun: rank 0 writes, the others have nothing to do
        return {}
    dataset_dir = Path(dataset_dir)
    seed = int(cfg.run.seeds[0]) if cfg.run.seeds else 0
    torch.manual_seed(seed)
    meta = load_meta(dataset_dir)
    id_model = build_id_model(cfg.id_model, len(meta["fields"]), int(meta["vocab_size"]))
    plm, _ = load_plm(cfg.plm)
    print("[pretrain] every objective has weight 0 (the paper's w/o MLM&MTM&ICL): nothing to align; "
          "writing the initial ID model and the language model as loaded", flush=True)
    with atomic_dir(out, "pretrain", PRETRAIN_LAYOUT) as tmp:
        run = RunDir(tmp)  # the whole directory appears at once, metrics.json in it
        save_file({k: v.detach().contiguous().clone() for k, v in id_model.state_dict().items()},
                  str(tmp / "id_model.safetensors"))
        plm.save_pretrained(tmp / "plm")
        run.write_config(cfg.to_dict())
        write_json(tmp / "dataset_meta.json", meta)
        if (dataset_dir / "vocab.parquet").exists():
            shutil.copy2(dataset_dir / "vocab.parquet", tmp / "vocab.parquet")
        write_json(tmp / "losses.json", [])
        (tmp / "log.jsonl").write_text("", encoding="utf-8")
        metrics = {"objectives": [], "steps": 0, "epochs": 0, "samples": 0, "rows": 0, "aligned": False,
                   "batch_size": int(cfg.pretrain.batch_size), "plm": cfg.plm.name, "id_model": cfg.id_model.name,
                   "seed": seed, "id_model_params": int(sum(p.numel() for p in id_model.parameters())),
                   "plm_params": int(sum(p.numel() for p in plm.parameters()))}
        run.finish(metrics)
    return metrics
