"""The finetuning strategies: one table, read by finetuning, the CLI, evaluation, the report and packaging.

Each row says how the strategy is built (``build``: a ``module:function`` that ``flip.train.finetune``
imports when the strategy runs, ``build(cfg, data, device, pretrained) -> Task``), which models it
trains (``uses_id``: an ID model, at ``finetune.lr`` / ``lr_grid``; ``uses_plm``: a language model, at
``finetune.plm_lr`` / ``plm_lr_grid`` with ``plm_epochs``, ``plm_batch_size``, ``plm_seeds``), and what it
reads from a pretraining run (``needs``: files of ``flip pretrain``'s output; none = no pretraining).
The rows are in the report's order (the paper's: the ID baseline, FLIP_ID, the PLM baselines, FLIP).

Only the standard library: the CLI and the report read this without importing torch.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

ID_WEIGHTS = ("config.json", "id_model.safetensors", "dataset_meta.json")  # the aligned ID model
PLM_WEIGHTS = ("config.json", "plm/config.json")  # the aligned language model


@dataclass(frozen=True)
class Strategy:
    name: str
    build: str  # "module:function", spelled out so that grep finds it: build(cfg, data, device, pretrained) -> Task
    uses_id: bool = True  # trains an ID model (finetune.lr, finetune.lr_grid)
    uses_plm: bool = False  # trains a language model (finetune.plm_lr, plm_lr_grid, plm_epochs, plm_batch_size)
    needs: tuple[str, ...] = ()  # files of a pretraining run it reads; () = it starts from no pretraining

    @property
    def builder(self) -> Callable[..., Any]:
        module, _, function = self.build.partition(":")
        return getattr(importlib.import_module(module), function)

    @property
    def pretrained_id(self) -> bool:
        """Starts from the pretrained ID model."""
        return "id_model.safetensors" in self.needs

    @property
    def pretrained_plm(self) -> bool:
        """Starts from the aligned language model."""
        return "plm/config.json" in self.needs


STRATEGIES: dict[str, Strategy] = {s.name: s for s in (
    Strategy("scratch", "flip.train.builders:build_scratch"),
    Strategy("flip_id", "flip.train.builders:build_flip_id", needs=ID_WEIGHTS),
    Strategy("plm_scratch", "flip.train.builders:build_plm_scratch", uses_id=False, uses_plm=True),
    Strategy("flip_plm", "flip.train.builders:build_flip_plm", uses_id=False, uses_plm=True, needs=PLM_WEIGHTS),
    Strategy("flip", "flip.train.builders:build_flip", uses_plm=True, needs=tuple(dict.fromkeys(ID_WEIGHTS + PLM_WEIGHTS))),
)}

REPORT_ORDER = tuple(STRATEGIES)
PLM_ONLY = tuple(name for name, s in STRATEGIES.items() if not s.uses_id)  # a language model alone


def get_strategy(name: str) -> Strategy:
    """The row of ``name``; an unknown name is a one-paragraph error listing the valid ones."""
    if name in STRATEGIES:
        return STRATEGIES[name]
    from flip.errors import SettingError

    valid = ", ".join(sorted(STRATEGIES))
    raise SettingError(f"unknown finetune.strategy={name!r}; valid strategies: {valid}. "
                       "Fix: set finetune.strategy in params.yaml (or -S finetune.strategy=scratch)")


__all__ = ["PLM_ONLY", "REPORT_ORDER", "STRATEGIES", "Strategy", "get_strategy"]
