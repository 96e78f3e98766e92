"""What identifies a training run: one definition for the loop, pretraining, finetuning and ``dvc.yaml``.

A run (one seed of ``flip pretrain`` or ``flip finetune``) is identified by a SHA-256 over

* the configuration sections its stage reads (:data:`STAGE_SECTIONS`; ``dvc.yaml`` lists the same
  sections as the stage's ``params``, which ``tests/test_pipeline_definition.py`` checks), less the
  keys that never change what it computes (:data:`NON_SEMANTIC_KEYS`);
* the seed;
* what else it reads (``extra``): the processed dataset (:func:`dataset_fingerprint`), the language
  model's files (:func:`plm_identity`), the pretrained weights a strategy starts from, the number of
  ranks.

:func:`flip.train.loop.fit` reuses a finished run and resumes a checkpoint only under the same
fingerprint. Imports only the standard library (and ``flip.models.plm`` lazily).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from flip.io import file_sha256

# The config sections each training stage reads. A finetuning strategy with a language model reads
# ``plm`` too (see flip.train.builders.STRATEGIES).
STAGE_SECTIONS: dict[str, tuple[str, ...]] = {
    "pretrain": ("id_model", "plm", "pretrain", "run"),
    "finetune": ("id_model", "finetune", "run"),
    "finetune_plm": ("id_model", "plm", "finetune", "run"),
}

# Config keys that do not change what a run computes: a finished run or a checkpoint made under
# different values of these is still reused.
NON_SEMANTIC_KEYS = (
    "run.seeds",  # the seed of a run is part of its fingerprint separately
    "run.progress",
    "run.threads",
    "run.device",
    "run.checkpoint_every",
    "run.resident_mib",  # where a split's tensors live (memory or a mapped file): the same numbers, tested
    "plm.cache_dir",  # where the token cache lives
    "data.mirror",
    "data.raw_dir",
    "data.processed_dir",
    "preprocess.memory_limit",
    "preprocess.threads",
    "validate",
    "schedule",
    "retrain",
)

# The files of a language-model directory that identify it (plus any model-*.safetensors shard).
WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin", "model.safetensors.index.json", "tokenizer.json",
                "vocab.txt", "config.json")


def flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flatten(value, name + "."))
        else:
            out[name] = value
    return out


def config_fingerprint(config: dict[str, Any], seed: int, extra: dict[str, Any] | None = None,
                       sections: tuple[str, ...] | None = None) -> str:
    """sha256 over the config keys that change results (of ``sections`` only, when given), the seed
    and ``extra`` (e.g. the dataset)."""
    if sections is not None:
        config = {k: v for k, v in config.items() if k in sections}
    flat = {
        k: v
        for k, v in flatten(config).items()
        if not any(k == n or k.startswith(n + ".") for n in NON_SEMANTIC_KEYS)
    }
    payload = json.dumps({"config": flat, "seed": seed, "extra": extra or {}}, sort_keys=True, default=str)
    return hashlib.sha256(payload.encode()).hexdigest()


def dataset_fingerprint(dataset_dir: str | Path) -> dict[str, Any]:
    """Cheap identity of a processed dataset: sha256 of ``meta.json`` and the split file sizes."""
    d = Path(dataset_dir)
    if not (d / "meta.json").exists():
        from flip.data.tensors import load_meta

        load_meta(d)  # the one-paragraph "not a processed dataset" error
    meta = hashlib.sha256((d / "meta.json").read_bytes()).hexdigest()
    sizes = {p.name: p.stat().st_size for p in sorted(d.glob("*.parquet"))}
    return {"meta_sha256": meta, "sizes": sizes}


def plm_identity(name: str) -> dict[str, Any]:
    """What identifies a language model: for a local directory the SHA-256 of its weight, config and
    tokenizer files; for a hub id / alias, the resolved name."""
    from flip.models.plm import resolve_plm_name

    resolved = resolve_plm_name(name)
    path = Path(resolved)
    if not path.is_dir():
        return {"name": resolved}
    files = {f: file_sha256(path / f) for f in WEIGHT_FILES if (path / f).is_file()}
    files.update({p.name: file_sha256(p) for p in sorted(path.glob("model-*.safetensors"))})
    return {"files": files}


def run_fingerprint(stage: str, cfg: Any, dataset: dict[str, Any], seed: int, extra: dict[str, Any]) -> str:
    """Identity of one run of ``stage`` (a key of :data:`STAGE_SECTIONS`): its sections of ``cfg``,
    the dataset (:func:`dataset_fingerprint`), the seed and ``extra``."""
    extra = {"stage": stage.split("_")[0], "dataset": dataset, **extra}
    return config_fingerprint(cfg.to_dict(), seed, extra, STAGE_SECTIONS[stage])


def pretrain_fingerprint(cfg: Any, dataset_dir: str | Path, seed: int, world: int = 1) -> str:
    """Identity of a pretraining run: its sections, the dataset, the language model's files, the seed
    and the number of ranks."""
    return run_fingerprint("pretrain", cfg, dataset_fingerprint(dataset_dir), seed,
                           {"plm": plm_identity(cfg.plm.name), "world_size": int(world)})


__all__ = ["NON_SEMANTIC_KEYS", "STAGE_SECTIONS", "WEIGHT_FILES", "config_fingerprint", "dataset_fingerprint",
           "file_sha256", "flatten", "plm_identity", "pretrain_fingerprint", "run_fingerprint"]
