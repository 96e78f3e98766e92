"""``flip <stage>``: one thin command per pipeline stage, called by ``dvc.yaml`` and the Prefect flows.

Every stage takes ``--params FILE`` (default ``params.yaml``) and repeatable ``-S key=value``
overrides (dotted, as in ``dvc exp run -S``); stages that write take ``--out DIR``. A folder a stage
replaces as a whole (preprocess, drift, analyze, package; validate's and evaluate's subfolders) is
refused when it holds files the stage did not write (:func:`flip.io.atomic_dir`). A command
parses the config, calls the stage function, and turns a :class:`~flip.errors.FlipError` into one
readable paragraph on stderr and exit code 2.
"""

from __future__ import annotations

import functools
import os
import sys
from pathlib import Path
from typing import Annotated, Callable, Optional

import typer

from flip.config import Config, ConfigError, load_config
from flip.errors import FlipError, TransientError
from flip.strategy_table import STRATEGIES

app = typer.Typer(
    help="FLIP: fine-grained alignment between ID-based CTR models and pretrained language models.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

Params = Annotated[Path, typer.Option("--params", "-p", help="params file")]
Overrides = Annotated[Optional[list[str]], typer.Option("--set", "-S", help="override, e.g. -S finetune.lr=1e-3")]
Out = Annotated[Optional[Path], typer.Option("--out", "-o", help="output directory (default: the path dvc.yaml uses)")]
Data = Annotated[Optional[Path], typer.Option("--data", help="processed dataset directory (default from params)")]
Quiet = Annotated[bool, typer.Option("--quiet", "-q", help="no progress output")]


def _stage(fn: Callable) -> Callable:
    """Report configuration and data errors as one paragraph and exit 2, or 75 for a
    :class:`~flip.errors.TransientError` a retry may fix (no traceback). A full disk is not bad input:
    one paragraph too, and exit 75 (the retrain flow retries it; the stage's outputs are atomic, so
    nothing half written is left)."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except (FlipError, ConfigError) as exc:
            typer.echo(f"error: {exc}", err=True)
            raise typer.Exit(getattr(exc, "exit_code", 2)) from None
        except Exception as exc:
            if not disk_full(exc):
                raise
            where = f" ({exc.filename})" if isinstance(exc, OSError) and exc.filename else ""
            typer.echo(f"error: no space left on the device{where}: {' '.join(str(exc).split())[:300]}. Fix: free "
                       "some space, or point the output (--out, DuckDB's spill directory) at a larger disk; no "
                       "output of this stage was replaced.", err=True)
            raise typer.Exit(TransientError.exit_code) from None

    return wrapper


def disk_full(exc: BaseException) -> bool:
    """An exception that says the disk is full (an OSError, or a DuckDB or library error wrapping one)."""
    import errno

    if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    return "No space left on device" in str(exc) or (exc.__cause__ is not None and disk_full(exc.__cause__))


def _config(params: Path, overrides: list[str] | None) -> Config:
    return load_config(params, overrides or [])


def raw_dir(cfg: Config) -> Path:
    return Path(cfg.data.raw_dir) / cfg.data.dataset


@app.command("params")
@_stage
def params_(params: Params = Path("params.yaml"),
            complete: Annotated[bool, typer.Option("--complete", help="write every missing key with its default")] = False):
    """Check a params file; --complete writes the keys it lacks with their defaults, keeping yours and your
    comments (dvc repro needs every key; make data and make run call it)."""
    from flip.config import complete_params

    if complete:
        added = complete_params(params)
        typer.echo(f"{params}: added {len(added)} missing key(s) with their defaults: {', '.join(added)}" if added
                   else f"{params}: complete")
        return
    _config(params, None)
    typer.echo(f"{params}: valid (`flip params --complete` writes the keys it lacks, which dvc repro needs)")


@app.command()
@_stage
def download(params: Params = Path("params.yaml"), set_: Overrides = None, out: Out = None, quiet: Quiet = False):
    """Fetch the raw files of data.dataset (or take them from FLIP_DATA_MIRROR); verify checksums."""
    from flip.data.download import download as run

    cfg = _config(params, set_)
    manifest = run(cfg, out or raw_dir(cfg), progress=not quiet)
    typer.echo(f"{cfg.data.dataset}: {len(manifest.get('files', {}))} file(s) ready ({manifest.get('origin')})")


@app.command()
@_stage
def preprocess(
    params: Params = Path("params.yaml"),
    set_: Overrides = None,
    out: Out = None,
    raw: Annotated[Optional[Path], typer.Option(help="raw files directory (default: data.raw_dir/<dataset>)")] = None,
    quiet: Quiet = False,
):
    """Label, sort, split, encode and render the text of the raw log into Parquet + meta.json (DuckDB)."""
    from flip.data.preprocess import preprocess as run

    cfg = _config(params, set_)
    run(cfg, raw or raw_dir(cfg), out or cfg.data.processed_path, progress=not quiet)


@app.command()
@_stage
def validate(params: Params = Path("params.yaml"), set_: Overrides = None, out: Out = None, data: Data = None):
    """Check the processed splits: pandera schema contract (hard) and Great Expectations quality + Data Docs."""
    from flip.data.validate import validate as run

    cfg = _config(params, set_)
    result = run(cfg, data or cfg.data.processed_path, out or Path(cfg.validate.reports_dir))
    for warning in result["warnings"]:
        typer.echo(f"warning: {warning}", err=True)
    typer.echo(f"validation passed: {result['summary']}")


@app.command()
@_stage
def pretrain(params: Params = Path("params.yaml"), set_: Overrides = None, out: Out = None, data: Data = None):
    """Modality-alignment pretraining: MLM + MTM + ICL between the ID model and the language model."""
    from flip.train.pretrain import pretrain as run

    cfg = _config(params, set_)
    out = out or Path("models/pretrain")
    metrics = run(cfg, data or cfg.data.processed_path, out)
    if os.environ.get("RANK", "0") != "0":  # under torchrun only rank 0 reports
        return
    losses = ", ".join(f"{k} {metrics[k]:.4f}" for k in ("mlm", "mtm", "icl") if isinstance(metrics.get(k), float))
    typer.echo(f"pretrained {metrics.get('steps', '?')} steps ({losses}) -> {out}")


@app.command(help=f"Train a CTR model (finetune.strategy: {' | '.join(STRATEGIES)}).")
@_stage
def finetune(params: Params = Path("params.yaml"), set_: Overrides = None, out: Out = None, data: Data = None,
             pretrained: Annotated[Optional[Path], typer.Option(help="pretraining run directory")] = None):
    """Train a CTR model with ``finetune.strategy``, a row of ``flip.strategy_table.STRATEGIES`` (the help lists them)."""
    from flip.train.finetune import finetune as run

    cfg = _config(params, set_)
    out = out or Path("models/finetune") / cfg.finetune.strategy
    metrics = run(cfg, data or cfg.data.processed_path, out, pretrained=pretrained)
    if os.environ.get("RANK", "0") != "0":  # under torchrun only rank 0 reports
        return
    typer.echo(f"test AUC {metrics['test']['auc']:.4f}  logloss {metrics['test']['logloss']:.4f}  -> {out}")


@app.command()
@_stage
def evaluate(params: Params = Path("params.yaml"), set_: Overrides = None, out: Out = None, data: Data = None,
             runs: Annotated[Path, typer.Option(help="folder of finetuning runs, one per strategy")] = Path(
                 "models/finetune"),
             full: Annotated[Optional[Path], typer.Option(
                 help="folder of full-data ID runs shown beside the equal-data comparison")] = None):
    """Score every finetuned run (AUC, logloss, calibration, cold start) and write Evidently drift reports."""
    from flip.evaluate.scoring import evaluate as run

    cfg = _config(params, set_)
    result = run(cfg, data or cfg.data.processed_path, runs, out or Path("reports"), full_dir=full)
    typer.echo(result["headline"])
    typer.echo("evaluated (test AUC): " + ", ".join(f"{n} {s['test']['auc']:.4f}" for n, s in result["strategies"].items()))


@app.command()
@_stage
def analyze(data: Data = None, params: Params = Path("params.yaml"), set_: Overrides = None, out: Out = None,
            pretrained: Annotated[Path, typer.Option(help="pretraining run directory")] = Path("models/pretrain"),
            scratch: Annotated[Path, typer.Option(help="the ID model trained from scratch (a finetune run)")] = Path(
                "models/finetune/scratch"),
            finetuned: Annotated[Path, typer.Option(help="the ID model aligned, then finetuned (a flip_id run)")] = Path(
                "models/finetune/flip_id"),
            compare: Annotated[Optional[list[str]], typer.Option(
                help="NAME=PATH of other ID-embedding weights (safetensors) for Fig. 6")] = None,
            rows: Annotated[int, typer.Option(help="test rows for Fig. 5")] = 256):
    """Fig. 5 (field-masked cross-modal similarity) and Fig. 6 (SVD of ID embeddings) as PNG + JSON."""
    from flip.evaluate.analysis import analyze as run, first_seed_weights

    cfg = _config(params, set_)
    # Fig. 6 as in the paper: the ID model aligned and then finetuned against the same model from scratch
    extra = {name: str(w) for name, w in (("scratch (no alignment)", first_seed_weights(scratch)),
                                          ("FLIP_ID (aligned, then finetuned)", first_seed_weights(finetuned)))
             if w is not None}
    extra.update(dict(item.split("=", 1) for item in compare or []))
    result = run(data or cfg.data.processed_path, pretrained, out or Path("reports/analysis"), extra_runs=extra,
                 rows=rows)
    f5 = result["fig5"]
    ranks = ", ".join(f"{name} rank {v['effective_rank']:.1f}" for name, v in result["fig6"].items())
    fig5 = (f"Fig. 5 skipped ({f5['skipped']})" if "skipped" in f5 else
            f"Fig. 5: diagonal {f5['diagonal_mean']:.3f} vs off-diagonal {f5['off_diagonal_mean']:.3f}")
    typer.echo(f"{fig5}; Fig. 6 effective ranks: {ranks}")


@app.command()
@_stage
def report(out: Out = None,
           pretrain: Annotated[Optional[Path], typer.Option(help="pretraining run directory")] = Path("models/pretrain"),
           analysis: Annotated[Optional[Path], typer.Option(help="analysis output directory")] = Path(
               "reports/analysis"),
           ablations: Annotated[Optional[Path], typer.Option(
               help="ablation table written by `flip ablations collect` (make ablations)")] = Path(
               "reports/ablations.json"),
           scaling: Annotated[Optional[Path], typer.Option(
               help="pretraining-scaling study (benchmarks/pretrain_scaling.py)")] = Path(
               "benchmarks/results/pretrain_scaling.json")):
    """Write reports/index.html and reports/summary.md from this run's outputs, beside the paper's numbers."""
    from flip.evaluate.report import report as run

    result = run(out or Path("reports"), pretrain_dir=pretrain, analysis_dir=analysis, ablations=ablations,
                 scaling=scaling)
    typer.echo(f"report: {result['html']} ({result['figures']} figures)")


@app.command()
@_stage
def drift(params: Params = Path("params.yaml"), set_: Overrides = None, out: Out = None, data: Data = None):
    """Evidently drift of the newest window (test split) against the training data: attributes and label."""
    from flip.evaluate.drift import drift as run

    cfg = _config(params, set_)
    result = run(cfg, data or cfg.data.processed_path, out or Path("reports/drift"))
    verdict = "; ".join(result["reasons"]) if result["drift"] else "no attribute or target drift"
    typer.echo(f"drift of the newest window ({result['window_rows']:,} rows): {verdict} "
               f"(policy {cfg.retrain.drift_policy}; ID-like columns not counted: {', '.join(result['id_like'])})")


@app.command()
@_stage
def package(params: Params = Path("params.yaml"), set_: Overrides = None, out: Out = None, data: Data = None,
            run: Annotated[Path, typer.Option(help="finetuning run directory (its best-validation seed is packaged)")] = Path(
                "models/full/flip_id"),
            pretrained: Annotated[Optional[Path], typer.Option(
                help="pretraining run (for models with a language model)")] = None):
    """Bundle a finetuned model for serving: weights, vocabularies, model.json (+ TorchScript for ID models)."""
    from flip.deploy.package import package as run_package

    cfg = _config(params, set_)
    out = out or Path("models/serve") / run.name
    info = run_package(run, data or cfg.data.processed_path, out, name=out.name, pretrained=pretrained)
    typer.echo(f"packaged {info['strategy']} (seed {info['seed']}, valid AUC {info['valid_auc']:.4f}) -> {out}")


def _model(spec: str, work: Path) -> Path:
    """``--model``/``--champion``: a bundle directory, or a registry version or stage fetched into
    ``work``; a failed fetch (an unknown version or stage) is one paragraph with the fix."""
    from flip.deploy.registry import resolve

    try:
        return resolve(Path("."), spec, work)
    except FlipError as exc:
        text = " ".join(str(exc).split())  # (dvc's own message spans lines)
        if "Fix:" not in text:
            text += (f" Fix: pass a bundle directory, or a version or stage the registry has for "
                     f"{spec.split('@', 1)[0]} (`gto show` lists them).")
        raise FlipError(text) from None


@app.command()
@_stage
def predict(model: Annotated[str, typer.Option(help="bundle directory, ARTIFACT@VERSION or ARTIFACT@STAGE")],
            input_: Annotated[list[Path], typer.Option("--input", "-i", help="CSV/Parquet file(s), or a raw directory")],
            out: Annotated[Path, typer.Option("--out", "-o", help="output file (.parquet or .csv)")],
            id_column: Annotated[str, typer.Option(help="input column to copy as the row id")] = "",
            batch_rows: Annotated[int, typer.Option(help="rows per scored batch (default 0: "
                                                    "flip.deploy.predict.BATCH_ROWS, 4096)")] = 0,
            max_line_bytes: Annotated[int, typer.Option(help="longest CSV line or value read, in bytes (default "
                                                        "0: flip.deploy.predict.MAX_LINE_BYTES, 2 MiB)")] = 0,
            quiet: Quiet = False):
    """Score new rows with a packaged or registered model: writes each row's id and click probability."""
    import tempfile

    from flip.deploy.predict import BATCH_ROWS
    from flip.deploy.predict import predict as run

    with tempfile.TemporaryDirectory(prefix="flip-model-") as work:
        bundle = _model(model, Path(work))
        result = run(bundle, input_, out, batch_rows=batch_rows or BATCH_ROWS, id_column=id_column, progress=not quiet,
                     max_line_bytes=max_line_bytes)
    unseen = ", ".join(f"{k} {v:,}" for k, v in result["oov_rows"].items() if v)
    quality = f"; AUC {result['auc']:.4f}, logloss {result['logloss']:.4f}" if "auc" in result else ""
    typer.echo(f"scored {result['rows']:,} rows ({result['rows_per_second']:,.0f} rows/s) -> {out}{quality}; "
               f"rows with an unseen value: {unseen or 'none'}")


@app.command()
@_stage
def gate(params: Params = Path("params.yaml"), set_: Overrides = None, data: Data = None,
         artifact: Annotated[str, typer.Option(help="artifact name in dvc.yaml")] = "flip_id",
         challenger: Annotated[Optional[Path], typer.Option(help="challenger bundle (default: the artifact's path)")] = None,
         champion: Annotated[str, typer.Option(help="champion: bundle, ARTIFACT@VERSION, ARTIFACT@STAGE; "
                                                    "default: the artifact in retrain.stage; 'none': no champion")] = "",
         out: Out = None):
    """Challenger vs champion on the newest window (paired ΔAUC with its interval); exit 0, decision in JSON."""
    import tempfile

    from flip.deploy.gate import gate as run
    from flip.deploy.registry import artifact_path, in_stage

    cfg = _config(params, set_)
    challenger = challenger or Path(artifact_path(Path("."), artifact))
    spec, version = champion, ""
    if not spec:
        current = in_stage(Path("."), artifact, cfg.retrain.stage)
        spec, version = (f"{artifact}@{current['version']}", current["version"]) if current else ("none", "")
    out = out or Path("reports/gate") / f"{artifact}.json"
    with tempfile.TemporaryDirectory(prefix="flip-champion-") as work:
        champion_dir = None if spec == "none" else _model(spec, Path(work))
        result = run(challenger, champion_dir, data or cfg.data.processed_path, cfg.retrain, out, artifact=artifact,
                     champion_version=version or spec)
    typer.echo(f"{artifact}: {'promote' if result['promote'] else 'keep the champion'}: {'; '.join(result['reasons'])}")


@app.command()
@_stage
def ablations(action: Annotated[str, typer.Argument(help="queue: queue the Table 5 experiments; collect: read "
                                                         "`dvc exp show --json` into the report's ablation table")],
              row: Annotated[Optional[list[str]], typer.Option(help="queue only this Table 5 row, e.g. 'w/o ICL'")] = None,
              out: Annotated[Path, typer.Option("--out", "-o", help="ablation table (collect)")] = Path(
                  "reports/ablations.json")):
    """The paper's Table 5 as DVC experiments (make ablations: queue, dvc exp run --run-all, collect, report)."""
    from flip.evaluate.ablations import collect_repo, queue

    if action == "queue":
        names = queue(Path("."), row)
        typer.echo(f"queued {len(names)} experiment(s): {', '.join(names)}; run them with `dvc exp run --run-all`")
    elif action == "collect":
        result = collect_repo(Path("."), out)
        typer.echo(f"{len(result['experiments'])} ablation row(s) -> {out}")
    else:
        raise FlipError(f"unknown action {action!r}: use `flip ablations queue` or `flip ablations collect`")


@app.callback()
def _tools_env() -> None:
    """(Runs before every command.) Telemetry off and the language model offline for the tools a
    stage starts (flip.environment)."""
    from flip.environment import apply

    apply()


def main() -> None:  # pragma: no cover
    app(prog_name="flip")


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
