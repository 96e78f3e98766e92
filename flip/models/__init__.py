"""The nine ID-based CTR models of the FLIP paper, behind one factory.

    model = build_id_model(cfg.id_model, num_fields=len(meta["fields"]), vocab_size=meta["vocab_size"])
    v = model.encode(x)        # (B, model.output_dim)   representation before the prediction layer
    y = model(x)               # (B,) logits = model.logit(v) (+ first-order term where one exists)

Every model is an ``IdModel`` (see ``flip.models.layers``) with one shared ``embedding`` table.
"""

from __future__ import annotations

from flip.models.afm import AFM
from flip.models.afn import AFN
from flip.models.autoint import AutoInt
from flip.models.dcn import DCN
from flip.models.dcnv2 import DCNv2
from flip.models.deepfm import DeepFM
from flip.models.layers import IdModel
from flip.models.pnn import PNN
from flip.models.widedeep import WideDeep
from flip.models.xdeepfm import XDeepFM

MODELS: dict[str, type[IdModel]] = {
    "dcnv2": DCNv2,
    "dcn": DCN,
    "deepfm": DeepFM,
    "autoint": AutoInt,
    "xdeepfm": XDeepFM,
    "pnn": PNN,
    "widedeep": WideDeep,
    "afn": AFN,
    "afm": AFM,
}


def check_model_name(name: str) -> None:
    """Raise a one-paragraph error for an unknown ``id_model.name``."""
    if name not in MODELS:
        from flip.errors import SettingError

        raise SettingError(f"unknown id_model.name {name!r}; valid names: {', '.join(MODELS)}. "
                           f"Fix: set id_model.name in params.yaml (or -S id_model.name=dcnv2)")


def build_id_model(cfg, num_fields: int, vocab_size: int) -> IdModel:
    """Build the model named ``cfg.name`` from an ``IdModelConfig``.

    ``num_fields`` = ``len(meta["fields"])``, ``vocab_size`` = ``meta["vocab_size"]`` (global ids,
    0 = padding, 1 = ``[MASK]``). Unknown names raise ``ValueError`` listing the valid ones.
    """
    check_model_name(cfg.name)
    return MODELS[cfg.name].from_config(cfg, num_fields, vocab_size)


__all__ = ["MODELS", "IdModel", "build_id_model", *(cls.__name__ for cls in MODELS.values())]
