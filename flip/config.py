"""Typed configuration built from ``params.yaml`` plus dotted ``-S key=value`` overrides.

One dataclass per section of ``params.yaml``. ``load_config(path, overrides)`` reads the file,
applies overrides spelt exactly as ``dvc exp run -S`` spells them (``finetune.lr=1e-3``,
``run.seeds=[1,2,3]``), and checks every key against the dataclasses, so a typo fails loudly
instead of being ignored. The defaults are ``params.yaml``'s (the quick profile; a test checks that
``Config()`` equals it); the paper's settings are the overrides in ``profiles/paper.txt``. Only the
standard library and PyYAML are used: this module must import on a bare GPU machine that has
torch + transformers + pyarrow only.
"""

from __future__ import annotations

import dataclasses
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml


# ----------------------------------------------------------------------------------------- data
@dataclass
class CsvField:
    """One field of a user's own click log."""

    column: str  # column in the CSV/Parquet file
    name: str  # human-readable name used in the text ("Movie title")
    missing: str = ""  # what an empty value does: unknown | drop | error ("" = data.csv.missing)


@dataclass
class CsvSource:
    """A user's own click log: one or several CSV/Parquet files (globs allowed)."""

    files: list[str] = field(default_factory=list)
    fields: list[CsvField] = field(default_factory=list)
    label: str = "label"  # column holding the label or the value the rule is applied to
    # Label rule: empty -> the column already holds 0/1. Otherwise a SQL boolean expression over
    # the column named ``value``, e.g. "value > 3"; rows matching ``drop`` are removed first.
    positive: str = ""
    drop: str = ""
    timestamp: str = ""  # optional; without it rows keep file order
    user: str = ""  # column of the user id (cold-start analysis)
    item: str = ""  # column of the item id
    delimiter: str = ","
    encoding: str = "utf-8"
    # an empty feature value: unknown (kept as the value "unknown"), drop (the row) or error (stop);
    # empty user and item ids are always an error. Counted in meta.json and the validation summary.
    missing: str = "unknown"


@dataclass
class SyntheticSource:
    """Deterministic generator: any size; the words of some values carry click signal."""

    rows: int = 20_000
    fields: int = 8
    users: int = 500
    items: int = 300
    seed: int = 0


@dataclass
class DataConfig:
    dataset: str = "movielens-1m"  # movielens-1m | bookcrossing | goodreads | csv | synthetic
    mirror: str = ""  # directory with datasets in their official layout; env FLIP_DATA_MIRROR wins
    raw_dir: str = "data/raw"
    processed_dir: str = "data/processed"
    csv: CsvSource = field(default_factory=CsvSource)
    synthetic: SyntheticSource = field(default_factory=SyntheticSource)

    def resolved_mirror(self) -> str:
        return os.environ.get("FLIP_DATA_MIRROR", "") or self.mirror

    @property
    def processed_path(self) -> Path:
        return Path(self.processed_dir) / self.dataset


@dataclass
class PreprocessConfig:
    test_fraction: float = 0.1  # last 10% of the time-sorted rows
    valid_divisor: int = 9  # last floor(len(train+valid)/9) rows of train+valid are validation
    min_count: int = 1  # values seen fewer times in train map to the field's OOV id
    memory_limit: str = "3GB"  # DuckDB memory limit (spills to disk beyond it)
    threads: int = 2


@dataclass
class ValidateConfig:
    reports_dir: str = "reports"
    positive_rate_band: list[float] = field(default_factory=lambda: [0.01, 0.99])
    max_null_fraction: float = 0.0
    max_unseen_share: float = 0.05  # valid/test: at most this share of an attribute's values unseen in training
    # expected counts (warnings only when they differ: a partial copy is legitimate)
    expected_total: int = 0


# ---------------------------------------------------------------------------------------- models
@dataclass
class IdModelConfig:
    name: str = "dcnv2"  # dcnv2 | dcn | deepfm | autoint | xdeepfm | pnn | widedeep | afn | afm
    embedding_dim: int = 32
    dnn_hidden_units: list[int] = field(default_factory=lambda: [300, 300, 128])
    dropout: float = 0.1
    batch_norm: bool = False
    # DCN / DCNv2
    cross_layers: int = 2
    low_rank_mixture: bool = True  # DCN-Mix as in the authors' code; False = full-rank CrossNetV2
    low_rank: int = 32
    num_experts: int = 4
    # AutoInt
    attention_layers: int = 3
    attention_heads: int = 2
    attention_dim: int = 64
    # xDeepFM
    cin_layer_units: list[int] = field(default_factory=lambda: [128, 128])
    # AFN
    afn_log_neurons: int = 400
    afn_ensemble_dnn: bool = False  # AFN+: a DNN beside the logarithmic network (same embedding table)
    # AFM
    afm_attention_dim: int = 16
    # How the vocabulary tables (the embedding table, a first-order table, pretraining's MTM NCE scorer)
    # are updated. dense: Adam/AdamW steps every row every step (momentum moves rows the batch did not
    # use). sparse: the tables get row-sparse gradients and a lazy Adam (torch.optim.SparseAdam; the
    # weight decay of adam/adamw applied to the rows used) updates only the rows a batch looked up; the
    # rest of the model keeps the dense optimizer. A step then costs what the batch touches, not the
    # vocabulary; lazy Adam is not Adam (a row's moments advance only when it is used), so results differ
    # from dense. auto: sparse when the vocabulary has more than flip.train.sparse_updates.SPARSE_ABOVE
    # rows (and one process: DDP all-reduces dense gradients only), else dense (MovieLens-1M: dense).
    # A training setting, not part of the architecture: finetuning may differ from its pretraining run.
    embedding_updates: str = "auto"  # auto | dense | sparse

    def __post_init__(self) -> None:
        if self.embedding_updates not in ("auto", "dense", "sparse"):
            raise ConfigError(f"id_model.embedding_updates must be auto, dense or sparse, not {self.embedding_updates!r}")


@dataclass
class PlmConfig:
    name: str = "minilm-l6"  # HF id, local directory, or the alias minilm-l6 (offline default)
    max_length: int = 64  # paper: 100 (ML-1M, BookCrossing), 180 (GoodReads)
    cache_dir: str = "data/tokens"
    pooling: str = "cls"  # cls (paper: the [CLS] state) | mean (over real tokens; what sentence encoders were trained for)
    layers: int = 0  # 0 = every layer; N = the first N transformer layers of the encoder (a smaller model)
    # Training on the CPU: the encoder's dropout masks come from NumPy's PCG64 seeded by one draw of torch's
    # generator, and attention dropout runs outside SDPA (flip.models.host_dropout). The same dropout (same
    # p, i.i.d. masks), other random numbers: ~1.4x the pretraining step on a 2-core AMD CPU, whose
    # bernoulli_ is serial. false = torch's own dropout, bit for bit the earlier runs. No effect in
    # evaluation or on accelerators.
    fast_dropout: bool = True


# -------------------------------------------------------------------------------------- training
@dataclass
class PretrainConfig:
    # The optimiser and the schedule:
    epochs: int = 1  # paper: 30
    batch_size: int = 32  # paper: 1024
    lr: float = 1e-3  # paper: 5e-5
    # The language model's rate (> 0); the ID model and the fresh MLM/MTM/ICL heads train at lr. The paper
    # uses one rate for everything (plm_lr = lr = 5e-5). The quick profile's 2e-5: at lr 1e-4 for all, 250
    # steps of ICL erased what the text states knew about clicks (README, Profiles).
    plm_lr: float = 2e-5
    weight_decay: float = 1e-3
    warmup_steps: int = 20  # paper: 0
    grad_accum: int = 1
    max_steps: int = 0  # 0 = no limit; >0 stops early (reduced CPU profile)
    max_rows: int = 0  # 0 = all training rows (else the first N)
    train_rows: int = 8000  # 0 = all (paper); else the last (most recent) N: = finetune.train_rows for equal data
    precision: str = "auto"  # auto (bf16 where native: CUDA, AVX512-BF16/AMX CPUs) | fp32 | bf16
    # Speed (flip.train.bucketing, flip.align.model): length_bucketing batches rows of similar text length
    # (sorted within pools of 64 random batches, the batches then shuffled; false = the loop's plain
    # permutation, bit for bit the runs before it was on; benchmarks/results/plm_speed.json). one_text_pass runs
    # the PLM once over [complete; masked] text instead of twice: the same function, but dropout draws its
    # masks in another order, so a run differs from the two-pass one by RNG noise (identical in eval
    # mode). compile: torch.compile of the language model (dynamic shapes; needs a C++ compiler on CPU;
    # first steps are slow).
    length_bucketing: bool = True
    one_text_pass: bool = False
    compile: bool = False
    # The alignment module (flip.align.model.AlignmentSpec: what the model sees of this section):
    text_mask_ratio: float = 0.15
    tab_mask_ratio: float = 0.15
    same_fields: bool = False  # mask the same fields on both modalities
    field_level_masking: bool = True  # False = random token-level masking (ablation)
    joint_reconstruction: bool = True  # False = each modality reconstructs from itself (ablation)
    mlm_weight: float = 1.0
    mtm_weight: float = 1.0
    icl_weight: float = 1.0
    nce_negatives: int = 25
    nce_noise: str = "global"  # global | per_field
    mtm_loss: str = "nce"  # nce | softmax (exact, small vocabularies)
    temperature: float = 0.7
    similarity: str = "dot"  # dot (paper) | cosine
    icl_head: str = "linear"  # linear (paper: two linear layers) | clip (authors' code: residual MLP + LayerNorm)
    projection_dim: int = 128

    def __post_init__(self) -> None:
        if not self.plm_lr > 0:
            raise ConfigError(f"pretrain.plm_lr must be > 0, not {self.plm_lr!r} (0 no longer means pretrain.lr). "
                              "Fix: set pretrain.plm_lr in params.yaml or with -S; for the paper's one rate for "
                              "everything, set it equal to pretrain.lr")


@dataclass
class FinetuneConfig:
    strategy: str = "scratch"  # a row of flip.strategy_table.STRATEGIES
    epochs: int = 20
    batch_size: int = 1024
    lr: float = 1e-3
    plm_lr: float = 5e-5
    optimizer: str = "adam"  # adam | adamw
    weight_decay: float = 0.0
    l2_embedding: float = 1e-4
    oov_dropout: float = 0.0  # ID strategies: P(a training id is replaced by its field's OOV id)
    patience: int = 2
    eval_batch_size: int = 8192
    max_rows: int = 0  # 0 = all training rows (else the first N)
    # every strategy trains and is scored on the same rows (equal data; a language model is costly on a CPU):
    train_rows: int = 8000  # 0 = all (paper); else train on the last (most recent) N training rows
    eval_rows: int = 4000  # 0 = all (paper); else at most N validation and N test rows, evenly spaced in time
    # Learning-rate selection on the validation split; an empty grid = the single value lr / plm_lr; flip
    # selects both (the product of the two grids). The ID model's rates (paper: 1e-5, 5e-5, 1e-4, 5e-4,
    # 1e-3, 5e-3; quick: two): scratch, flip_id and flip select among them.
    lr_grid: list[float] = field(default_factory=lambda: [1e-4, 1e-3])
    # The language model's rates (and its head's); quick: [] = the authors' fixed 5e-5, as each candidate
    # is a CPU-costly run.
    plm_lr_grid: list[float] = field(default_factory=list)
    # Strategies with a language model (uses_plm in flip.strategy_table.STRATEGIES) have their own
    # schedule: a CPU budget in the quick profile, the paper's 10 epochs of 256 in profiles/paper.txt.
    plm_seeds: int = 3  # they train the first N seeds of run.seeds (all of them where it has fewer)
    plm_epochs: int = 1  # their maximum epochs (paper: 10; the ID strategies: epochs)
    plm_batch_size: int = 32  # their batch size (paper: 256, = batch_size)
    alpha_init: float = 0.5  # the authors: 0; 0.5 lets few CPU steps move it
    precision: str = "auto"  # auto (bf16 where native: CUDA, AVX512-BF16/AMX CPUs) | fp32 | bf16
    # Text strategies (flip_plm, flip): training batches of rows of similar text length (as
    # pretrain.length_bucketing; false = the loop's plain permutation, bit for bit the earlier runs).
    length_bucketing: bool = True

    def __post_init__(self) -> None:
        for key in ("plm_seeds", "plm_epochs", "plm_batch_size", "epochs", "batch_size", "eval_batch_size"):
            if getattr(self, key) < 1:
                raise ConfigError(f"finetune.{key} must be at least 1, not {getattr(self, key)!r} (0 no longer "
                                  "means another key's value). Fix: set it in params.yaml or with -S to the number "
                                  "itself (e.g. finetune.plm_epochs = finetune.epochs)")


@dataclass
class RunConfig:
    seeds: list[int] = field(default_factory=lambda: [2012, 2013, 2014])
    device: str = "auto"  # auto | cpu | cuda | cuda:0
    threads: int = 0  # torch intra-op threads; 0 = torch default
    progress: bool = True
    checkpoint_every: int = 0  # steps between mid-epoch checkpoints; 0 = epoch ends only
    # A split's ID tensors (int32, 4 bytes per field and row) larger than this many MiB are not held in
    # memory or moved whole to the device: they live in a memory-mapped file (an unlinked temporary file,
    # paged by the kernel), and each batch is gathered on the host and copied to the device. Token caches are
    # always memory-mapped; a tokenized split larger than this stays on the host too. 0 = no limit.
    resident_mib: int = 2048


@dataclass
class EvaluateConfig:
    """The evaluate stage: held-out windows, Evidently pages, small-bucket marking."""

    slices: int = 4  # the test split cut into this many consecutive time slices (drift, quality per slice)
    # Windows larger than this are sampled (seed 0) for every data-drift test: the drift stage's (the retrain
    # flow's verdict, which evaluate reads) and evaluate's other windows; and each run's valid and test
    # predictions for Evidently's prediction-drift pages (the exact AUC and logloss use every row).
    drift_rows: int = 20_000
    # Evidently HTML pages, ~5 MB each: main (one per strategy; the test window's data-drift page is the drift
    # stage's, always written) | all (every window) | none. Every window's numbers are in eval.json.
    pages: str = "main"
    min_bucket_rows: int = 100  # cold-start and reliability buckets with fewer rows are marked "too few rows"

    def __post_init__(self) -> None:
        if self.pages not in ("main", "all", "none"):
            raise ConfigError(f"evaluate.pages must be main, all or none, not {self.pages!r}")


@dataclass
class ScheduleConfig:
    """Scheduled retraining served by Prefect (flows/serve.py)."""

    name: str = "weekly-retrain"
    cron: str = "0 3 * * 1"  # Mondays 03:00
    timezone: str = "UTC"
    work_pool: str = ""  # empty: serve from this process; else deploy to this work pool


@dataclass
class RetrainConfig:
    """The retraining loop (flows/pipeline.py ``retrain``): drift policy, champion/challenger gate, registry."""

    artifacts: list[str] = field(default_factory=lambda: ["flip_id", "flip"])  # dvc.yaml artifacts to gate
    stage: str = "prod"  # the GTO stage a promotion assigns
    pretrain: str = "always"  # always: re-pretrain on the new data | reuse: finetune from the last pretraining
    drift_policy: str = "warn"  # warn | stop: what attribute or target drift of the newest window does
    drift_share: float = 0.5  # drift = at least this share of attribute columns drifted
    target_drift: float = 0.05  # ... or the positive rate moved by more than this (absolute)
    max_auc_drop: float = 0.005  # gate: challenger AUC >= champion AUC - this, on the same rows
    max_logloss_rise: float = 0.01  # gate: challenger logloss <= champion logloss + this
    min_auc: float = 0.55  # gate: the challenger's AUC on the newest window is at least this
    # Commit dvc.lock when promoting (a GTO version is a git tag on a commit). False: commit nothing; HEAD's
    # dvc.lock must already record the gated bundle.
    commit: bool = True


@dataclass
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    preprocess: PreprocessConfig = field(default_factory=PreprocessConfig)
    validate: ValidateConfig = field(default_factory=ValidateConfig)
    id_model: IdModelConfig = field(default_factory=IdModelConfig)
    plm: PlmConfig = field(default_factory=PlmConfig)
    pretrain: PretrainConfig = field(default_factory=PretrainConfig)
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)
    run: RunConfig = field(default_factory=RunConfig)
    evaluate: EvaluateConfig = field(default_factory=EvaluateConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    retrain: RetrainConfig = field(default_factory=RetrainConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


class ConfigError(ValueError):
    """A params file or override that does not fit the configuration schema."""


# ------------------------------------------------------------------------------------ loading
def parse_override(text: str) -> tuple[list[str], Any]:
    """``"finetune.lr=1e-3"`` -> (["finetune", "lr"], 0.001). Values are parsed as YAML."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} must look like section.key=value")
    key, raw = text.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        raise ConfigError(f"override {text!r}: the value is not valid YAML. Fix: quote it, e.g. "
                          f"-S '{key.strip()}=\"{raw}\"'") from None
    return key.strip().split("."), value


def apply_override(tree: dict[str, Any], path: list[str], value: Any) -> None:
    node = tree
    for part in path[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override {'.'.join(path)}: {part} is not a section")
    node[path[-1]] = value


def _coerce(tp: Any, value: Any, where: str) -> Any:
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        if value is None:
            return tp()
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        return _build(tp, value, where)
    if origin is list:
        (item_tp,) = typing.get_args(tp)
        if value is None:
            return []
        if not isinstance(value, list):
            value = [value]
        return [_coerce(item_tp, v, f"{where}[{i}]") for i, v in enumerate(value)]
    if origin in (typing.Union, types.UnionType):
        return value
    if tp is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if tp is float and isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            pass
    if tp is str and value is None:
        return ""
    if tp is str and isinstance(value, (int, float)):
        return str(value)
    if tp in (int, float, str, bool) and not isinstance(value, tp) or (tp is int and isinstance(value, bool)):
        raise ConfigError(f"{where}: expected {tp.__name__}, got {value!r}")
    return value


def _build(cls: type, values: dict[str, Any], where: str = "") -> Any:
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - names)
    if unknown:
        prefix = f"{where}." if where else ""
        raise ConfigError(
            f"unknown key(s) {', '.join(prefix + u for u in unknown)}; "
            f"allowed here: {', '.join(sorted(names))}"
        )
    kwargs = {}
    for name, value in values.items():
        kwargs[name] = _coerce(hints[name], value, f"{where}.{name}" if where else name)
    return cls(**kwargs)


def config_from_dict(tree: dict[str, Any]) -> Config:
    return _build(Config, tree or {})


def load_config(path: str | os.PathLike | None = "params.yaml", overrides: list[str] | None = None) -> Config:
    """Read ``params.yaml`` (missing file -> defaults) and apply dotted overrides."""
    tree: dict[str, Any] = {}
    if path is not None and Path(path).exists():
        with open(path, encoding="utf-8") as fh:
            try:
                tree = yaml.safe_load(fh) or {}
            except yaml.YAMLError as exc:
                mark = getattr(exc, "problem_mark", None)
                where = f", line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
                problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
                raise ConfigError(f"{path}{where}: not valid YAML ({problem}). Fix: correct that line "
                                  "(indent with spaces, 'key: value', quote values with ':' or '#')") from None
        if not isinstance(tree, dict):
            raise ConfigError(f"{path}: expected sections like 'data:' and 'finetune:', found a "
                              f"{type(tree).__name__}. Fix: see the project's params.yaml for the layout")
    elif path is not None and str(path) != "params.yaml":
        raise ConfigError(f"params file {path} does not exist")
    for text in overrides or []:
        keys, value = parse_override(text)
        apply_override(tree, keys, value)
    return config_from_dict(tree)


def complete_params(path: str | os.PathLike = "params.yaml") -> list[str]:
    """Write every key that ``path`` lacks with its default, keeping the file's own values, order and
    comments; returns the keys added (a whole missing section is named once). DVC needs the complete
    file: ``dvc.yaml`` interpolates ``${data.processed_dir}`` and declares whole sections as params, which
    must be in ``params.yaml`` (``flip <stage>`` alone takes the defaults). The file is checked first (a
    typo is an error and nothing is written) and read back after (the same config as before)."""
    import copy

    from ruamel.yaml import YAML  # round-trip YAML (comments kept): DVC's own dependency

    from flip.io import atomic_file

    path = Path(path)
    before = load_config(path) if path.exists() else Config()  # ConfigError on an unknown key or a bad value
    rt = YAML()
    rt.preserve_quotes = True

    def floats(representer: Any, value: float) -> Any:  # 2.0e-05, not 2e-05: PyYAML reads that as a string
        text = repr(value)
        if "e" in text and "." not in text.split("e")[0]:
            text = text.replace("e", ".0e", 1)
        return representer.represent_scalar("tag:yaml.org,2002:float", text)

    rt.representer.add_representer(float, floats)
    doc = rt.load(path.read_text(encoding="utf-8")) if path.exists() else None
    if doc is None:
        doc = rt.map()
    added: list[str] = []

    def fill(node: Any, defaults: dict[str, Any], prefix: str) -> None:
        for key, value in defaults.items():
            if key not in node or (node[key] is None and isinstance(value, dict)):
                node[key] = copy.deepcopy(value)
                added.append(prefix + key)
            elif isinstance(value, dict) and isinstance(node[key], dict):
                fill(node[key], value, f"{prefix}{key}.")

    fill(doc, Config().to_dict(), "")
    if added:
        with atomic_file(path) as tmp:
            with open(tmp, "w", encoding="utf-8") as fh:
                rt.dump(doc, fh)
            if load_config(tmp) != before:  # the completed file means what the short one meant, or stays unwritten
                raise ConfigError(f"{path}: completing it would change its settings; nothing written (a bug: report it)")
    return added
