"""Training: the generic loop (``loop``) and CTR finetuning strategies (``finetune``)."""

from flip.train.finetune import (
    CtrData,
    TabularTask,
    available_strategies,
    finetune,
    get_strategy,
    load_ctr_data,
    make_optimizer,
    register_strategy,
)
from flip.train.loop import EvalSet, LoopSettings, SimulatedCrash, Task, aggregate_seeds, fit, run_seeds

__all__ = [
    "CtrData",
    "EvalSet",
    "LoopSettings",
    "SimulatedCrash",
    "TabularTask",
    "Task",
    "aggregate_seeds",
    "available_strategies",
    "finetune",
    "fit",
    "get_strategy",
    "load_ctr_data",
    "make_optimizer",
    "register_strategy",
    "run_seeds",
]
