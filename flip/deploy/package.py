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
``.flip-output``       the marker of :func:`flip.io.atomic_dir`: ``flip package`` wrote this folder

:func:`load_bundle` (``flip predict``, ``flip gate``) checks a bundle before using it: a cut, edited or
incomplete one is one paragraph and exit 2.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from flip.config import config_from_dict
from flip.errors import DataError, FlipError
from flip.io import atomic_dir, atomic_file, read_json, write_json

BUNDLE_VERSION = 1
BUNDLE_FILES = ("model.json", "model.safetensors", "vocab.parquet", "model.pt", "plm")  # (older bundles)
PLM_FILES = ("config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt")


def best_seed_run(run: Path) -> tuple[Path, dict[str, Any]]:
    """The run directory of the seed with the best validation AUC (a single-seed run: the run itself)
    and its metrics (:meth:`flip.runs.RunDir.best_seed`)."""
    from flip.runs import RunDir

    seeds = RunDir(run).seeds()
    if not seeds or not all(s.weights_file.exists() for s in seeds.values()):
        raise FlipError(f"{run} is not a finished finetuning run (no metrics.json and model.safetensors). "
                        "Fix: run `flip finetune` (or `dvc repro`) first.")
    best = RunDir(run).best_seed("valid.auc")
    return best.path, best.metrics()


def package(run: Path, data_dir: Path, out: Path, *, name: str = "", pretrained: Path | None = None) -> dict[str, Any]:
    """Write the bundle of ``run`` (its best seed) to ``out``; returns ``model.json``'s content."""
    from flip.strategy_table import get_strategy

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
    from flip.strategy_table import STRATEGIES

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
    """Build the bundle's model from ``model.json`` and load ``model.safetensors`` into it, checking the
    bundle on the way: a cut, edited, mismatched or incomplete bundle is one paragraph
    (:class:`~flip.errors.DataError`: which file, what, and the fix), never a traceback or a download."""
    path = Path(path)
    info = read_bundle_info(path)
    check_vocabulary(path, info)
    cfg = _bundle_config(path, info)
    from flip.models import build_id_model

    tokenizer = None
    try:
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
    except FlipError:
        raise
    except (ValueError, TypeError, KeyError, RuntimeError, OSError) as exc:
        raise DataError(f"cannot build the model that model.json describes: {_one_line(exc)}",
                        file=str(path / "model.json"), fix=REPACKAGE) from None
    _load_weights(path / "model.safetensors", model)
    model.eval()
    return Bundle(path=path, info=info, model=model, tokenizer=tokenizer)


REPACKAGE = ("package the run again (`flip package`, or `dvc repro`), or fetch the registry version again "
             "(`flip predict --model ARTIFACT@VERSION`).")
_INFO_TYPES = {"strategy": str, "uses_id": bool, "uses_plm": bool, "fields": list, "vocab_size": int, "config": dict}
_FIELD_TYPES = {"name": str, "title": str, "oov_id": int}


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split())[:400]


def read_bundle_info(path: Path) -> dict[str, Any]:
    """``model.json`` of the bundle in ``path``, checked: valid JSON, a ``bundle_version`` this code
    reads, the keys and types the loader uses, field ids within the vocabulary."""
    path = Path(path)
    file = path / "model.json"
    if not file.is_file():
        raise FlipError(f"{path} is not a model bundle (no model.json). Fix: pass a directory written by "
                        "`flip package` (models/serve/<name>), a registry version or stage, or run `dvc repro`.")
    try:
        info = json.loads(file.read_text(encoding="utf-8"))
    except UnicodeDecodeError as exc:
        raise DataError(f"model.json is not UTF-8 text ({exc.reason} at byte {exc.start})", file=str(file),
                        fix=REPACKAGE) from None
    except json.JSONDecodeError as exc:
        raise DataError(f"model.json is not valid JSON ({exc.msg}, line {exc.lineno}, column {exc.colno}): "
                        "it was cut short or edited", file=str(file), fix=REPACKAGE) from None
    if not isinstance(info, dict):
        raise DataError("model.json is not a JSON object", file=str(file), fix=REPACKAGE)
    version = info.get("bundle_version")
    if version is None:
        raise DataError("model.json has no bundle_version: not a bundle written by `flip package`",
                        file=str(file), column="bundle_version", fix=REPACKAGE)
    if isinstance(version, int) and not isinstance(version, bool) and version > BUNDLE_VERSION:
        raise DataError(f"the bundle was written by a newer flip (bundle_version {version}; this flip reads "
                        f"bundle_version {BUNDLE_VERSION})", file=str(file), column="bundle_version",
                        fix="upgrade flip to the version that packaged it, or package the run with this flip.")
    if version != BUNDLE_VERSION or isinstance(version, bool):
        raise DataError(f"unknown bundle_version (this flip reads bundle_version {BUNDLE_VERSION})", file=str(file),
                        column="bundle_version", value=version, fix=REPACKAGE)
    for key, kind in _INFO_TYPES.items():
        if not isinstance(info.get(key), kind) or (kind is int and isinstance(info[key], bool)):
            raise DataError(f"model.json lacks {key!r} or it is not a {kind.__name__}", file=str(file), column=key,
                            value=info.get(key), fix=REPACKAGE)
    size = info["vocab_size"]
    if size < 1 or not info["fields"]:
        raise DataError("model.json has no fields or an empty vocabulary", file=str(file), fix=REPACKAGE)
    for k, f in enumerate(info["fields"]):
        bad = list(_FIELD_TYPES) if not isinstance(f, dict) else [
            key for key, kind in _FIELD_TYPES.items()
            if not isinstance(f.get(key), kind) or isinstance(f.get(key), bool)]
        if bad:
            raise DataError(f"field {k + 1} of model.json lacks {', '.join(bad)}", file=str(file), column="fields",
                            value=f, fix=REPACKAGE)
        if not 0 <= f["oov_id"] < size:
            raise DataError(f"the OOV id of field {f['name']!r} is outside the vocabulary (0 to {size - 1})",
                            file=str(file), column="fields", value=f["oov_id"], fix=REPACKAGE)
    names = [f["name"] for f in info["fields"]]
    if len(set(names)) != len(names):
        raise DataError("model.json names a field twice", file=str(file), column="fields", value=names, fix=REPACKAGE)
    return info


def check_vocabulary(path: Path, info: dict[str, Any]) -> None:
    """``vocab.parquet`` is readable, holds exactly the fields of ``model.json`` and ids in
    ``[0, vocab_size)`` (a value mapped outside the embedding table would fail, or worse, alias)."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    file = Path(path) / "vocab.parquet"
    if not file.is_file():
        raise DataError("the bundle has no vocab.parquet (the training vocabularies)", file=str(file), fix=REPACKAGE)
    try:
        missing = {"field", "value", "id"} - set(pq.read_schema(file).names)
        table = pq.read_table(file, columns=["field", "id"])  # (the values are read by whoever maps them)
    except (pa.ArrowException, OSError) as exc:
        raise DataError(f"vocab.parquet is unreadable (cut short or overwritten?): {_one_line(exc)}", file=str(file),
                        fix=REPACKAGE) from None
    if missing:
        raise DataError(f"vocab.parquet has no column {', '.join(sorted(missing))}", file=str(file), fix=REPACKAGE)
    if not pa.types.is_integer(table.schema.field("id").type):
        raise DataError(f"vocab.parquet's ids are {table.schema.field('id').type}, not integers", file=str(file),
                        column="id", fix=REPACKAGE)
    fields = {f["name"] for f in info["fields"]}
    found = set(pc.unique(table["field"]).to_pylist())
    if found != fields:
        raise DataError(f"the fields of vocab.parquet ({', '.join(sorted(map(str, found)))}) are not those of "
                        f"model.json ({', '.join(sorted(fields))})", file=str(file), column="field",
                        fix="keep each bundle's model.json and vocab.parquet together; " + REPACKAGE)
    ids = table["id"].to_numpy(zero_copy_only=False)
    size = int(info["vocab_size"])
    if table["id"].null_count:
        first = int(np.flatnonzero(table["id"].is_null().to_numpy(zero_copy_only=False))[0])
        raise DataError(f"{table['id'].null_count:,} vocabulary id(s) are empty", file=str(file), row=first + 1,
                        column="id", fix=REPACKAGE)
    bad = np.flatnonzero((ids < 0) | (ids >= size))
    if len(bad):
        raise DataError(f"{len(bad):,} vocabulary id(s) outside the model's vocabulary (0 to {size - 1})",
                        file=str(file), row=int(bad[0]) + 1, column="id", value=int(ids[bad[0]]), fix=REPACKAGE)


def _bundle_config(path: Path, info: dict[str, Any]) -> Any:
    from flip.config import ConfigError

    try:
        return config_from_dict(info["config"])
    except (ConfigError, ValueError, TypeError, KeyError) as exc:
        raise DataError(f"the config in model.json is not usable: {_one_line(exc)}", file=str(path / "model.json"),
                        column="config", fix=REPACKAGE) from None


def _load_weights(file: Path, model: nn.Module) -> None:
    """``model.safetensors`` into ``model``, strictly: a cut file, or weights of another model
    (missing / unexpected tensors, other shapes) is one paragraph."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    if not file.is_file():
        raise DataError("the bundle has no model.safetensors (the weights)", file=str(file), fix=REPACKAGE)
    try:
        state = load_file(str(file))
    except (SafetensorError, OSError, ValueError) as exc:
        raise DataError(f"model.safetensors is not a readable safetensors file (cut short or overwritten?): "
                        f"{_one_line(exc)}", file=str(file), fix=REPACKAGE) from None
    expected = model.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    shapes = [f"{k} is {tuple(state[k].shape)}, the model's {tuple(v.shape)}" for k, v in expected.items()
              if k in state and tuple(state[k].shape) != tuple(v.shape)]
    problems = [f"{what} {_some(keys)}" for what, keys in (("missing", missing), ("unexpected", unexpected),
                                                            ("shape of", shapes)) if keys]
    if problems:
        raise DataError(f"the weights do not fit the model that model.json describes ({'; '.join(problems)})",
                        file=str(file),
                        fix="keep each bundle's model.json and model.safetensors together; " + REPACKAGE)
    try:
        model.load_state_dict(state)
    except RuntimeError as exc:
        raise DataError(f"cannot load the weights: {_one_line(exc)}", file=str(file), fix=REPACKAGE) from None


def _some(items: list[str], n: int = 3) -> str:
    return ", ".join(items[:n]) + (f" and {len(items) - n} more" if len(items) > n else "")


def _plm_from_config(plm_dir: Path, cfg: Any):
    """The language model's architecture from its config (weights come from model.safetensors). Only
    the bundle's own ``plm/`` is read (``local_files_only``): a missing folder is an error, never a
    download (``from_pretrained`` takes a path that does not exist for a hub id)."""
    from transformers import AutoConfig, AutoModel, AutoTokenizer

    from flip.models.plm import PlmEncoder, keep_layers

    if not (plm_dir / "config.json").is_file():
        raise DataError(f"the bundle's language-model folder {plm_dir} is missing or has no config.json (this "
                        "model has a language model, whose config and tokenizer `flip package` puts there)",
                        file=str(plm_dir), fix=REPACKAGE)
    local = str(plm_dir.resolve())
    try:
        hf_config = AutoConfig.from_pretrained(local, local_files_only=True)
        tokenizer = AutoTokenizer.from_pretrained(local, use_fast=True, local_files_only=True)
    except (OSError, ValueError, KeyError) as exc:
        raise DataError(f"cannot read the language model's config or tokenizer: {_one_line(exc)}",
                        file=str(plm_dir), fix=REPACKAGE) from None
    if not getattr(tokenizer, "is_fast", False):
        raise DataError("the language model has no fast tokenizer (tokenizer.json)", file=str(plm_dir), fix=REPACKAGE)
    try:
        model = AutoModel.from_config(hf_config, add_pooling_layer=False)
    except TypeError:
        model = AutoModel.from_config(hf_config)
    keep_layers(model, int(cfg.plm.layers or 0))
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

