"""Training: the generic loop (``loop``) and its callbacks (``callbacks``: logs, early stopping,
checkpoints), ``flip finetune`` (``finetune``: the entry point; ``tasks``: what the loop trains and on
which data; ``builders``: one builder per row of ``flip.strategy_table``; ``selection``: seeds and
learning-rate selection), ``flip pretrain`` (``pretrain``; ``without_alignment``: Table 5's row with no
objective), ``fingerprint`` (what identifies a run) and ``sparse_updates`` (row-sparse lazy-Adam updates
of the vocabulary tables, ``id_model.embedding_updates``). What a run leaves on disk: ``flip.runs``."""

from flip.strategy_table import Strategy, get_strategy
from flip.train.callbacks import SimulatedCrash, crash_after
from flip.train.tasks import CtrData, TabularTask, load_ctr_data, make_optimizer
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
