"""Training: the generic loop (``loop``) and its callbacks (``callbacks``: logs, early stopping,
checkpoints), CTR finetuning (``finetune``: the entry point; ``ctr``: its building blocks;
``strategies``: how each strategy of ``flip.strategies`` is built; ``selection``: seeds and
learning-rate selection) and pretraining (``pretrain``). What a run leaves on disk: ``flip.runs``."""

from flip.strategies import Strategy, get_strategy
from flip.train.callbacks import SimulatedCrash, crash_after
from flip.train.ctr import CtrData, TabularTask, load_ctr_data, make_optimizer
from flip.train.finetune import finetune
from flip.train.loop import EvalSet, LoopSettings, Task, fit
from flip.train.selection import aggregate_seeds, run_seeds

__all__ = [
    "CtrData",
    "EvalSet",
    "LoopSettings",
    "SimulatedCrash",
    "Strategy",
    "TabularTask",
    "Task",
    "aggregate_seeds",
    "crash_after",
    "finetune",
    "fit",
    "get_strategy",
    "load_ctr_data",
    "make_optimizer",
    "run_seeds",
]
