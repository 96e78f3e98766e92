"""A finetuning run → a self-contained model bundle that ``flip predict`` and a serving stack load.

``flip package --run models/full/flip_id --data data/processed/<ds> --out models/serve/flip_id``

The bundle (a DVC output declared as an artifact in ``dvc.yaml``, versioned with GTO):

``model.json``         what the model is: strategy, seed, validation/test AUC of that seed, the fields
                       (name, title, OOV id), the vocabulary size, the text template, the run's config
``model.safetensors``  the weights of the seed with the best validation AUC (models are selected on
                       validation; the test split plays no part)
``vocab.parquet``      the training vocabularies (field, value, id, count): unseen values take their
                       field's OOV id
``model.pt``           ID models only: TorchScript, ``(B, F) int64 ids -> (B,) click probability``, loadable
                       with ``torch.jit.load`` without this package (the vocabularies beside it)
``plm/``               models with a language model: its config and tokenizer (the weights are in
                       ``model.safetensors``, stored once)
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from flip.config import config_from_dict
from flip.errors import FlipError
from flip.io import atomic_dir, atomic_file, read_json, write_json

BUNDLE_VERSION = 1
PLM_FILES = ("config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt")


def best_seed_run(run: Path) -> tuple[Path, dict[str, Any]]:
    """The run directory of the seed with the best validation AUC (a single-seed run: the run itself)."""
    run = Path(run)
    seeds = sorted(p for p in run.glob("seed-*") if (p / "metrics.json").exists())
    candidates = seeds or ([run] if (run / "metrics.json").exists() else [])
    if not candidates or not (candidates[0] / "model.safetensors").exists():
        raise FlipError(f"{run} is not a finished finetuning run (no metrics.json and model.safetensors). "
                        "Fix: run `flip finetune` (or `dvc repro`) first.")
    scored = [(read_json(p / "metrics.json"), p) for p in candidates]
    metrics, best = max(scored, key=lambda t: float(t[0].get("valid", {}).get("auc", float("nan")) or -1.0))
    return best, metrics


def package(run: Path, data_dir: Path, out: Path, *, name: str = "", pretrained: Path | None = None) -> dict[str, Any]:
    """Write the bundle of ``run`` (its best seed) to ``out``; returns ``model.json``'s content."""
    from flip.strategies import get_strategy

    seed_dir, metrics = best_seed_run(run)
    config = read_json(seed_dir / "config.json")
    info = read_json(seed_dir / "run.json")
    strategy = get_strategy(config["finetune"]["strategy"])
    meta = read_json(Path(data_dir) / "meta.json")
    vocab = Path(data_dir) / "vocab.parquet"
    if not vocab.exists():
        raise FlipError(f"{data_dir} has no vocab.parquet (made by an older `flip preprocess`). "
                        "Fix: run `flip preprocess` again (dvc repro preprocess).")
    bundle = {
        "bundle_version": BUNDLE_VERSION,
        "artifact": name or Path(out).name,
        "strategy": strategy.name,
        "uses_id": strategy.uses_id,
        "uses_plm": strategy.uses_plm,
        "seed": info.get("seed"),
        # the language-model towers are scored as in training (bf16 autocast where the run used it)
        "text_precision": info.get("precision", "fp32") if strategy.uses_plm else "fp32",
        "valid_auc": metrics.get("valid", {}).get("auc"),
        "test_auc": metrics.get("test", {}).get("auc"),
        "source_run": str(seed_dir),
        "dataset": meta["dataset"],
        "fields": [{k: f[k] for k in ("name", "title", "offset", "size", "oov_id")} for f in meta["fields"]],
        "vocab_size": meta["vocab_size"],
        "user_field": meta.get("user_field", ""),
        "item_field": meta.get("item_field", ""),
        "text_template": meta.get("text_template", "{title} is {value}."),
        "train_time_range": meta.get("time_range", {}).get("train"),
        "config": config,
    }
    with atomic_dir(out, "package", BUNDLE_FILES) as tmp:
        shutil.copy2(seed_dir / "model.safetensors", tmp / "model.safetensors")
        shutil.copy2(vocab, tmp / "vocab.parquet")
        if strategy.uses_plm:
            plm_dir = _plm_source(config, pretrained, strategy.name)
            (tmp / "plm").mkdir()
            for f in PLM_FILES:
                if (plm_dir / f).exists():
                    shutil.copy2(plm_dir / f, tmp / "plm" / f)
        write_json(tmp / "model.json", bundle)
        if not strategy.uses_plm:
            export_torchscript(load_bundle(tmp), tmp / "model.pt")
    return bundle


def _plm_source(config: dict[str, Any], pretrained: Path | None, strategy: str) -> Path:
    from flip.strategies import STRATEGIES

    if STRATEGIES[strategy].pretrained_plm:
        if pretrained is None or not (Path(pretrained) / "plm").exists():
            raise FlipError(f"packaging a {strategy} run needs the pretraining run it started from. "
                            "Fix: pass --pretrained models/pretrain.")
        return Path(pretrained) / "plm"
    from flip.models.plm import resolve_plm_name

    return Path(resolve_plm_name(config["plm"]["name"]))


# ------------------------------------------------------------------------------------------ loading
@dataclass
class Bundle:
    """A loaded bundle: ``model`` maps a batch to logits (eval mode, fp32, CPU unless moved)."""

    path: Path
    info: dict[str, Any]
    model: nn.Module
    tokenizer: Any = None

    @property
    def fields(self) -> list[dict[str, Any]]:
        return self.info["fields"]

    @property
    def uses_plm(self) -> bool:
        return bool(self.info["uses_plm"])

    @property
    def uses_id(self) -> bool:
        return bool(self.info["uses_id"])

    @property
    def max_length(self) -> int:
        return int(self.info["config"]["plm"]["max_length"])


def load_bundle(path: Path) -> Bundle:
    """Build the bundle's model from ``model.json`` and load ``model.safetensors`` into it."""
    from safetensors.torch import load_file

    path = Path(path)
    if not (path / "model.json").exists():
        raise FlipError(f"{path} is not a model bundle (no model.json). Fix: pass a directory written by "
                        "`flip package` (models/serve/<name>), a registry version or stage, or run `dvc repro`.")
    info = read_json(path / "model.json")
    cfg = config_from_dict(info["config"])
    from flip.models import build_id_model

    tokenizer = None
    if info["uses_plm"]:
        from flip.models.fusion import FlipModel, PlmClassifier

        plm, tokenizer = _plm_from_config(path / "plm", cfg)
        if info["uses_id"]:
            id_model = build_id_model(cfg.id_model, len(info["fields"]), int(info["vocab_size"]))
            model: nn.Module = FlipModel(id_model, plm, cfg.finetune.alpha_init)
        else:
            model = PlmClassifier(plm)
    else:
        model = build_id_model(cfg.id_model, len(info["fields"]), int(info["vocab_size"]))
    model.load_state_dict(load_file(str(path / "model.safetensors")))
    model.eval()
    return Bundle(path=path, info=info, model=model, tokenizer=tokenizer)


def _plm_from_config(plm_dir: Path, cfg: Any):
    """The language model's architecture from its config (weights come from model.safetensors)."""
    from transformers import AutoConfig, AutoModel

    from flip.models.plm import PlmEncoder, keep_layers, load_tokenizer

    hf_config = AutoConfig.from_pretrained(str(plm_dir))
    try:
        model = AutoModel.from_config(hf_config, add_pooling_layer=False)
    except TypeError:
        model = AutoModel.from_config(hf_config)
    keep_layers(model, int(cfg.plm.layers or 0))
    tokenizer = load_tokenizer(str(plm_dir))
    plm = PlmEncoder(model, tokenizer, name=str(plm_dir), pooling=cfg.plm.pooling or "cls")
    return plm, tokenizer


# ------------------------------------------------------------------------------------------- export
class ProbabilityModel(nn.Module):
    """``(B, F) int64 ids -> (B,) click probabilities``: what a serving stack calls."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.model(x).float())


def export_torchscript(bundle: Bundle, path: Path) -> Path:
    """Trace the ID model (eval mode) to TorchScript at ``path``."""
    if bundle.uses_plm:
        raise FlipError("only ID-model bundles are exported to TorchScript (FLIP_ID serves at the ID model's cost)")
    scorer = ProbabilityModel(bundle.model).eval()
    example = torch.tensor([[f["oov_id"] for f in bundle.fields]] * 2, dtype=torch.int64)
    with torch.no_grad():
        traced = torch.jit.trace(scorer, example, check_trace=False)
    with atomic_file(path) as tmp:
        traced.save(str(tmp))
    return path

