"""Training: the generic loop (``loop``), CTR finetuning (``finetune``: the entry point; ``ctr``: its
building blocks; ``strategies``: how each strategy of ``flip.strategies`` is built) and pretraining
(``pretrain``)."""

from flip.strategies import Strategy, get_strategy
from flip.train.ctr import CtrData, TabularTask, load_ctr_data, make_optimizer
from flip.train.finetune import finetune
from flip.train.loop import EvalSet, LoopSettings, SimulatedCrash, Task, aggregate_seeds, fit, run_seeds

__all__ = [
    "CtrData",
    "EvalSet",
    "LoopSettings",
    "SimulatedCrash",
    "Strategy",
    "TabularTask",
    "Task",
    "aggregate_seeds",
    "finetune",
    "fit",
    "get_strategy",
    "load_ctr_data",
    "make_optimizer",
    "run_seeds",
]
